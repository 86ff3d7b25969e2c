//! The PGP escrow's input (docs/pgp-escrow.md): a vault-server whose scale set's userData carries a bad
//! operator key, the wrong number of keys, or a document that is not one, must stop its boot with one
//! stderr line naming the problem, exit 2, and write nothing but its failure record — no configuration, no
//! service, so no Vault is ever started or initialized. The real binary against a scripted IMDS.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{agent_command, imds_fixture, start, text, walk, Reply, Script};
use pgp::composed::{EncryptionCaps, KeyType, SecretKeyParamsBuilder, SubkeyParamsBuilder};
use pgp::ser::Serialize as _;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// base64 of a binary OpenPGP public key with an encryption subkey, as `gpg --export <id> | base64 -w0`.
fn public_key(uid: &str) -> String {
    let mut p = SecretKeyParamsBuilder::default();
    p.key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .primary_user_id(uid.into())
        .subkeys(vec![SubkeyParamsBuilder::default()
            .key_type(KeyType::ECDH(
                pgp::crypto::ecc_curve::ECCCurve::Curve25519Legacy,
            ))
            .can_encrypt(EncryptionCaps::All)
            .build()
            .unwrap()]);
    let secret = p.build().unwrap().generate(rand_08::thread_rng()).unwrap();
    B64.encode(secret.to_public_key().to_bytes().unwrap())
}

fn user_data(keys: &[String]) -> String {
    B64.encode(serde_json::json!({"hashistack": {"pgpKeys": keys}}).to_string())
}

struct Case {
    name: &'static str,
    user_data: String,
    /// Every one of these must appear in the error line.
    names: Vec<&'static str>,
}

fn cases() -> Vec<Case> {
    let good: Vec<String> = (0..5)
        .map(|i| public_key(&format!("operator {i}")))
        .collect();
    let mut malformed = good.clone();
    malformed[2] = B64.encode(b"this is not an OpenPGP key");
    let mut armored = good.clone();
    armored[4] = "-----BEGIN PGP PUBLIC KEY BLOCK-----".into();
    vec![
        Case {
            name: "malformed key",
            user_data: user_data(&malformed),
            names: vec![
                "userData hashistack.pgpKeys[2]",
                "not an OpenPGP public key",
            ],
        },
        Case {
            name: "armored key",
            user_data: user_data(&armored),
            names: vec![
                "userData hashistack.pgpKeys[4]",
                "ASCII-armored",
                "base64 -w0",
            ],
        },
        Case {
            name: "wrong count",
            user_data: user_data(&good[..3]),
            names: vec![
                "userData hashistack.pgpKeys",
                "has 3 PGP keys",
                "recovery share (5",
            ],
        },
        Case {
            name: "not base64",
            user_data: "{\"hashistack\":{}}".into(),
            names: vec!["userData", "not base64"],
        },
        Case {
            name: "typo in the document",
            user_data: B64.encode(r#"{"hashistack": {"pgpkeys": []}}"#),
            names: vec!["userData hashistack", "pgpkeys"],
        },
    ]
}

fn boot_config(dir: &Path, endpoint: &str, root: &Path) -> std::path::PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[imds]\nendpoint = \"{endpoint}\"\ndeadline_secs = 20\n\
             [paths]\nroot = \"{}\"\nowners = \"current-user\"\n\
             [services]\nbackend = \"process\"\nconsul_bin = \"/nonexistent/consul\"\n\
             vault_bin = \"/nonexistent/vault\"\nnomad_bin = \"/nonexistent/nomad\"\n\
             [tls]\nca_cert = \"{0}/ca.pem\"\nca_key = \"{0}/ca-key.pem\"\n",
            root.display()
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operator_keys_in_user_data_stop_the_boot_with_one_line_and_exit_2() {
    let doc = imds_fixture("vault-server-akv").to_string();
    for case in cases() {
        let (doc, ud) = (doc.clone(), case.user_data.clone());
        let script = Script::new(move |_, seen| match seen.path() {
            "/metadata/instance" => Reply::Ok(doc.clone()),
            "/metadata/instance/compute/userData"
                if seen.query().get("format").map(String::as_str) == Some("text")
                    && seen.query().get("api-version").map(String::as_str)
                        == Some("2021-01-01") =>
            {
                Reply::Ok(ud.clone())
            }
            _ => Reply::Status(400, "{}".into()),
        });
        let endpoint = start(script.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let cfg = boot_config(dir.path(), &endpoint, root.path());

        let mut cmd = tokio::process::Command::from(agent_command([
            "boot".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ]));
        // Only the error line on stderr (the info log of the identified node is not the point here).
        cmd.env("HASHISTACK_LOG", "off").kill_on_drop(true);
        let o = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("boot [{}] did not finish", case.name))
            .expect("run boot");
        let stderr = text(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(2),
            "[{}]: exit code; stderr {stderr}",
            case.name
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "[{}]: one line: {stderr:?}", case.name);
        let line = lines[0];
        assert!(
            line.starts_with("hashistack-agent: "),
            "[{}]: {line}",
            case.name
        );
        for n in &case.names {
            assert!(
                line.contains(n),
                "[{}]: the line names {n:?}: {line}",
                case.name
            );
        }
        // The keys themselves (public, but long) are never echoed.
        assert!(line.len() < 300, "[{}]: {line}", case.name);
        assert!(
            script
                .seen()
                .iter()
                .any(|s| s.path() == "/metadata/instance/compute/userData"),
            "[{}]: userData was asked for",
            case.name
        );

        // Nothing but the failure record: no configuration, no certificate, no service, no init.
        let entries: Vec<String> = walk(root.path())
            .into_iter()
            .filter(|e| !e.dir)
            .map(|e| e.rel)
            .collect();
        assert_eq!(
            entries,
            vec!["var/lib/hashistack/boot.json".to_string()],
            "[{}]: only the boot record is written",
            case.name
        );
        let rec: Value = serde_json::from_slice(
            &std::fs::read(root.path().join("var/lib/hashistack/boot.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["ok"], false);
        assert_eq!(rec["phase"], "node-spec", "[{}]: {rec}", case.name);
        assert!(rec["services"].as_object().unwrap().is_empty());
        assert!(
            rec["bootstrap"].is_null(),
            "[{}]: no bootstrap: {rec}",
            case.name
        );
        let err = rec["last_error"].as_str().unwrap();
        assert!(line.ends_with(err), "[{}]: {err:?} vs {line:?}", case.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_do_not_read_user_data() {
    // Only server tiers escrow: a worker never asks for userData, whatever is in it.
    let doc = imds_fixture("worker").to_string();
    let script = Script::new(move |_, seen| match seen.path() {
        "/metadata/instance" => Reply::Ok(doc.clone()),
        _ => Reply::Status(400, "{}".into()),
    });
    let endpoint = start(script.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let cfg = boot_config(dir.path(), &endpoint, root.path());
    let mut cmd = tokio::process::Command::from(agent_command([
        "boot".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ]));
    cmd.env("HASHISTACK_LOG", "off").kill_on_drop(true);
    let _ = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await;
    assert!(
        !script.seen().iter().any(|s| s.path().contains("userData")),
        "a worker asked for userData"
    );
}
