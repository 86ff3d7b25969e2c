//! End-to-end PGP escrow (docs/pgp-escrow.md): five operators make key pairs with gpg, their public keys
//! reach the server tiers through the scale sets' userData (the lab's fake IMDS serves it as Azure does), and
//! the real OpenBao, the real Consul 1.8.7 and the Nomad contract double bootstrap. Proven here:
//!
//! - OpenBao returned each recovery key PGP-encrypted to its operator; decrypted with gpg, three of them
//!   satisfy OpenBao's own `sys/generate-root` (two do not: the threshold is enforced) and the root token
//!   it yields is a root token;
//! - the root token, Consul's and Nomad's management tokens are escrowed encrypted by the agent to the
//!   operator keys; gpg decrypts them and they work against OpenBao, Consul and Nomad;
//! - the post-bootstrap configuration still ran (the agent used the clear root token in memory);
//! - no secret is anywhere in clear: not in the opened escrow envelopes, nor in any file the lab produced.

use base64::Engine;
use hashistack_agent::node::Role;
use hashistack_e2e::{
    assert_done_once, count_outcome, escrow_cmd, files_containing, get_as, healthy_lab, nodes_of,
    options,
};
use hashistack_lab::Lab;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A scratch GnuPG home with the operators' key pairs.
struct Operators {
    home: tempfile::TempDir,
    fingerprints: Vec<String>,
}

impl Operators {
    fn gpg(&self) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", self.home.path()).args([
            "--batch",
            "--quiet",
            "--no-tty",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        c
    }

    /// `n` key pairs, as operators make them (`gpg --quick-gen-key`): the first RSA (gpg's `default`), the
    /// others ed25519 with a cv25519 encryption subkey.
    fn generate(n: usize) -> Self {
        let home = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut ops = Operators {
            home,
            fingerprints: Vec::new(),
        };
        for i in 0..n {
            let uid = format!("operator {i} <op{i}@lab.invalid>");
            let algo = if i == 0 { "default" } else { "future-default" };
            let o = ops
                .gpg()
                .args(["--quick-gen-key", &uid, algo, "default", "never"])
                .output()
                .expect("run gpg (lab/setup.sh installs gnupg)");
            assert!(
                o.status.success(),
                "gpg --quick-gen-key: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let o = ops
                .gpg()
                .args(["--with-colons", "--list-keys", &uid])
                .output()
                .unwrap();
            let listing = String::from_utf8_lossy(&o.stdout).into_owned();
            let fpr = listing
                .lines()
                .find(|l| l.starts_with("fpr:"))
                .and_then(|l| l.split(':').nth(9))
                .unwrap_or_else(|| panic!("no fingerprint in {listing}"))
                .to_string();
            ops.fingerprints.push(fpr);
        }
        ops
    }

    /// `gpg --export <fingerprint> | base64 -w0`, as docs/pgp-escrow.md tells operators.
    fn exported(&self) -> Vec<String> {
        self.fingerprints
            .iter()
            .map(|f| {
                let o = self.gpg().args(["--export", f]).output().unwrap();
                assert!(o.status.success() && !o.stdout.is_empty());
                B64.encode(&o.stdout)
            })
            .collect()
    }

    /// `gpg --decrypt <file>`: the plaintext, and the key id gpg says it was encrypted to.
    fn decrypt(&self, file: &Path) -> String {
        let o = self.gpg().arg("--decrypt").arg(file).output().unwrap();
        assert!(
            o.status.success(),
            "gpg --decrypt {}: {}",
            file.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

/// `escrow open --tier <tier> --pgp-dir <dir>` as the operator: the opened payload (JSON) and the message
/// files it wrote.
fn open_pgp(lab: &Lab, operator: &str, tier: &str, dir: &Path) -> (Value, Vec<PathBuf>) {
    let o = escrow_cmd(
        lab,
        operator,
        &["open", "--tier", tier, "--pgp-dir", dir.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "escrow open {tier}: {stderr}");
    assert!(stderr.contains("gpg --decrypt"), "{stderr}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{tier}-"))
        })
        .collect();
    files.sort();
    use std::os::unix::fs::PermissionsExt;
    for f in &files {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    (v, files)
}

fn message<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["pgp_messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no message {name} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgp_escrow_holds_only_what_the_operators_keys_open() {
    let ops = Operators::generate(5);
    let user_data =
        B64.encode(serde_json::json!({"hashistack": {"pgpKeys": ops.exported()}}).to_string());
    let mut o = options("pgp-escrow", 120);
    o.nomad_servers = 3;
    for role in [Role::ConsulServer, Role::VaultServer, Role::NomadServer] {
        o.user_data.insert(role, user_data.clone());
    }
    let mut lab = healthy_lab(o).await;
    for (tier, role) in [
        ("vault", Role::VaultServer),
        ("consul", Role::ConsulServer),
        ("nomad", Role::NomadServer),
    ] {
        assert_eq!(count_outcome(&lab, role, "bootstrapped"), 1, "{tier}");
        assert_done_once(&lab, tier).await;
    }
    // The configuration that needs the root token ran: it was used in clear, in memory, before escrow.
    let st = lab.tier_state("vault").await.unwrap();
    assert!(
        !st.message
            .as_deref()
            .unwrap_or_default()
            .contains("incomplete"),
        "{st:?}"
    );

    let operator = lab.operator_imds().await.unwrap();
    let out = lab.opts.state_dir.join("operator-pgp");

    // Vault: five recovery keys, each encrypted by OpenBao to its operator, and the root token.
    let (vault, files) = open_pgp(&lab, &operator, "vault", &out);
    assert_eq!(vault["kind"], "vault-init");
    assert_eq!(vault["recovery_threshold"], 3);
    assert!(
        vault.get("root_token").is_none() && vault.get("recovery_keys_base64").is_none(),
        "{vault}"
    );
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "vault-recovery-key-1.gpg",
            "vault-recovery-key-2.gpg",
            "vault-recovery-key-3.gpg",
            "vault-recovery-key-4.gpg",
            "vault-recovery-key-5.gpg",
            "vault-root-token.gpg"
        ]
    );
    let mut shares = Vec::new();
    for (i, file) in files.iter().take(5).enumerate() {
        let m = message(&vault, &format!("recovery-key-{}", i + 1));
        assert_eq!(m["encrypted_by"], "vault", "OpenBao encrypted it: {m}");
        assert_eq!(m["recipients"], serde_json::json!([ops.fingerprints[i]]));
        let share = ops.decrypt(file);
        assert!(
            !share.is_empty() && share.chars().all(|c| c.is_ascii_hexdigit()),
            "a recovery share (hex, as OpenBao encrypts it): {share:?}"
        );
        shares.push(share);
    }
    let m = message(&vault, "root-token");
    assert_eq!(m["encrypted_by"], "agent");
    assert_eq!(m["recipients"], serde_json::json!(ops.fingerprints));
    let root = ops.decrypt(&files[5]);
    let vault_ip = lab.nodes[nodes_of(&lab, Role::VaultServer)[0]].def.ip;
    let api = format!("https://{vault_ip}:8200");
    let (status, body) = get_as(
        &lab,
        &format!("{api}/v1/auth/token/lookup-self"),
        "X-Vault-Token",
        &root,
    )
    .await;
    assert_eq!(status, 200, "the escrowed root token authenticates: {body}");
    assert!(body.contains("\"root\""), "{body}");

    // The recovery keys are OpenBao's: root generation takes them, and needs three. On the active node, which
    // sys/leader names. OpenBao forbids the unauthenticated sys/generate-root by default ("unsupported
    // operation", openbao/openbao#2912) and offers the authenticated sys/generate-root-token instead: an operator
    // with a token (here the escrowed root token) starts it, the recovery-key holders complete it.
    let http = lab.https();
    let leader: Value = http
        .get(format!("{api}/v1/sys/leader"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api = leader["leader_address"]
        .as_str()
        .unwrap_or_else(|| panic!("sys/leader: {leader}"))
        .trim_end_matches('/')
        .to_string();
    let attempt: Value = http
        .put(format!("{api}/v1/sys/generate-root-token/attempt"))
        .header("X-Vault-Token", &root)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (nonce, otp) = (
        attempt["data"]["nonce"]
            .as_str()
            .unwrap_or_else(|| panic!("generate-root-token attempt: {attempt}"))
            .to_string(),
        attempt["data"]["otp"]
            .as_str()
            .unwrap_or_else(|| panic!("generate-root-token attempt: {attempt}"))
            .to_string(),
    );
    let mut last = Value::Null;
    for (i, share) in shares.iter().take(3).enumerate() {
        let r = http
            .put(format!("{api}/v1/sys/generate-root-token/update"))
            .header("X-Vault-Token", &root)
            .json(&serde_json::json!({"key": share, "nonce": nonce}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "share {} accepted", i + 1);
        // The authenticated endpoint answers in the usual response envelope.
        let body: Value = r.json().await.unwrap();
        last = body["data"].clone();
        assert_eq!(last["progress"], i as u64 + 1, "{last}");
        assert_eq!(
            last["complete"],
            i == 2,
            "complete only at the threshold: {last}"
        );
    }
    // OpenBao answers base64 without padding; the token is that XOR the OTP.
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(
            last["encoded_token"]
                .as_str()
                .unwrap()
                .trim_end_matches('='),
        )
        .unwrap();
    assert_eq!(encoded.len(), otp.len());
    let new_root: String = encoded
        .iter()
        .zip(otp.as_bytes())
        .map(|(a, b)| (a ^ b) as char)
        .collect();
    let (status, body) = get_as(
        &lab,
        &format!("{api}/v1/auth/token/lookup-self"),
        "X-Vault-Token",
        &new_root,
    )
    .await;
    assert_eq!(
        status, 200,
        "root token generated from three recovery keys: {body}"
    );
    assert!(body.contains("\"root\""), "{body}");

    // Consul: the accessor stays readable, the management token is the operators'.
    let (consul, files) = open_pgp(&lab, &operator, "consul", &out);
    assert_eq!(consul["kind"], "consul-acl-bootstrap");
    assert!(consul.get("secret_id").is_none(), "{consul}");
    assert_eq!(files.len(), 1);
    let consul_secret = ops.decrypt(&files[0]);
    let consul_ip = lab.nodes[nodes_of(&lab, Role::ConsulServer)[0]].def.ip;
    let (status, tok) = get_as(
        &lab,
        &format!("https://{consul_ip}:8501/v1/acl/token/self"),
        "X-Consul-Token",
        &consul_secret,
    )
    .await;
    assert_eq!(status, 200, "{tok}");
    let tok: Value = serde_json::from_str(&tok).unwrap();
    assert_eq!(tok["AccessorID"], consul["accessor_id"]);
    assert!(
        tok["Policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["Name"] == "global-management"),
        "{tok}"
    );

    // Nomad: its bootstrap secret, escrowed before use, encrypted as well.
    let (nomad, files) = open_pgp(&lab, &operator, "nomad", &out);
    assert_eq!(nomad["kind"], "nomad-acl-bootstrap");
    assert!(nomad.get("secret_id").is_none(), "{nomad}");
    let nomad_secret = ops.decrypt(&files[0]);
    let nomad_ip = lab.nodes[nodes_of(&lab, Role::NomadServer)[0]].def.ip;
    let (status, t) = get_as(
        &lab,
        &format!("https://{nomad_ip}:4646/v1/acl/token/self"),
        "X-Nomad-Token",
        &nomad_secret,
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert!(t.contains("\"management\""), "{t}");

    // Without --pgp-dir, escrow open says what it holds and where to go.
    let o = escrow_cmd(&lab, &operator, &["open", "--tier", "consul"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--pgp-dir"));

    // No secret in clear anywhere: not in what the operator's Azure identity opens (above: only messages),
    // nor in any log, boot record, spool, Azurite's data or the operator's files.
    let mut needles = shares.clone();
    needles.extend([
        root.clone(),
        new_root.clone(),
        consul_secret.clone(),
        nomad_secret.clone(),
    ]);
    for opened in [&vault, &consul, &nomad] {
        let text = opened.to_string();
        for n in &needles {
            assert!(
                !text.contains(n.as_str()),
                "clear secret in an opened escrow: {text}"
            );
        }
    }
    // The products' own data hold their tokens by design (raft, the Nomad double's state).
    let leaks = files_containing(
        &lab.opts.state_dir,
        &needles,
        // The products' own data (raft holds the tokens by design), on the data disk on server tiers; the escrow
        // spool beside them is scanned.
        &[
            "/opt/consul/data",
            "/opt/vault/data",
            "/opt/nomad/data",
            "/var/lib/hashistack-data/consul/",
            "/var/lib/hashistack-data/vault/",
            "/var/lib/hashistack-data/nomad/",
        ],
    );
    assert!(leaks.is_empty(), "secrets found in {leaks:?}");
    lab.down().await;
}
