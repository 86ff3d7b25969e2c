//! End-to-end: encrypted snapshots (docs/runbooks.md#snapshots) on the real Consul 1.8.7 and OpenBao, and Nomad
//! through its contract double.
//!
//! - Only the tier's leader takes a snapshot; it lands in the `snapshots` container, encrypted, and is recorded.
//! - Rebuild from nothing: data, ACL tokens and policies, Vault secrets and tokens are written; a snapshot is
//!   taken; every server of the tier is destroyed with its data; the tier comes up fresh (a new bootstrap, new
//!   root credentials); the operator restores with their own identity; the original data and tokens work again.
//! - A corrupt, truncated, wrong-tier or wrong-cluster snapshot, and a VM identity trying to restore, are refused
//!   with one line before the product is touched.
//!
//! Networks 140-142 (140: Consul rebuilt; 141: refusals and Nomad; 142: Vault rebuilt).

use hashistack_agent::coordination::TierPhase;
use hashistack_agent::node::Role;
use hashistack_e2e::{
    agent, all_vault_voters, escrow_open, healthy_lab, nodes_of, options, wait_healthy, wait_phase,
};
use hashistack_lab::Lab;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

/// Retries `op` for up to 90 s (elections, a restore settling).
async fn eventually<F, Fut, T>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > Duration::from_secs(90) => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// One HTTPS request with a token header: status and body.
async fn call(
    lab: &Lab,
    method: reqwest::Method,
    url: &str,
    header: &str,
    token: &str,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let mut req = lab.https().request(method, url).header(header, token);
    if let Some(b) = body {
        req = req.body(b);
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

/// An ACL request to a Consul server, repeated while that server answers "legacy mode" (a 1.x follower refuses
/// ACL calls until its own ACL-mode check comes round, up to 30 s after it started: docs/bootstrap.md#consul-acl-legacy-mode);
/// the first other answer.
async fn acl_call(lab: &Lab, url: &str, token: &str) -> (u16, String) {
    eventually(&format!("GET {url} outside legacy mode"), || async {
        let r = call(
            lab,
            reqwest::Method::GET,
            url,
            "X-Consul-Token",
            token,
            None,
        )
        .await?;
        if r.0 == 500 && r.1.contains("legacy mode") {
            Err(format!("{r:?}"))
        } else {
            Ok(r)
        }
    })
    .await
}

/// A request that must succeed (retried while the tier settles): the body as JSON (or a string).
async fn ok(
    lab: &Lab,
    method: reqwest::Method,
    url: &str,
    header: &str,
    token: &str,
    body: Option<Value>,
) -> Value {
    eventually(&format!("{method} {url}"), || {
        let (method, body) = (method.clone(), body.clone());
        async move {
            let (s, text) =
                call(lab, method, url, header, token, body.map(|b| b.to_string())).await?;
            if (200..300).contains(&s) {
                Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
            } else {
                Err(format!("{s} {text}"))
            }
        }
    })
    .await
}

/// `hashistack-agent snapshot --now` on node `i` (as its timer would run it, forced).
fn snapshot_on(lab: &Lab, i: usize) -> Output {
    std::process::Command::new(agent(lab))
        .arg("snapshot")
        .arg("--now")
        .arg("--config")
        .arg(&lab.nodes[i].config_path)
        .output()
        .expect("run hashistack-agent snapshot")
}

/// Runs the snapshot on every server of `role`: exactly one (the leader) takes it. Returns the blob name.
fn snapshot_tier(lab: &Lab, role: Role) -> String {
    let mut taken = Vec::new();
    for i in nodes_of(lab, role) {
        let o = snapshot_on(lab, i);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{}: {out}{}",
            lab.nodes[i].def.name,
            String::from_utf8_lossy(&o.stderr)
        );
        if let Some(rest) = out.strip_prefix("snapshot ") {
            taken.push(rest.split_whitespace().next().unwrap().to_string());
        } else {
            assert!(out.contains("not the tier's leader"), "{out}");
        }
    }
    assert_eq!(taken.len(), 1, "exactly the leader snapshots: {taken:?}");
    taken.pop().unwrap()
}

/// `hashistack-agent snapshot <args>` as the identity behind `imds` (the operator's, or a VM's).
fn snapshot_cmd(
    lab: &Lab,
    imds: &str,
    cluster: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut c = std::process::Command::new(agent(lab));
    c.arg("snapshot")
        .args(args)
        .args(["--cluster", cluster])
        .args(["--blob-endpoint", &lab.blob_endpoint()])
        .args(["--escrow-vault-uri", &lab.escrow_vault_uri()])
        .args(["--credential", "imds", "--imds-endpoint", imds, "--lab"])
        .arg("--ca-file")
        .arg(&lab.ca_cert);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run hashistack-agent snapshot")
}

/// The cluster CA as a file (what an operator has on the jumpbox).
fn cluster_ca_file(lab: &Lab) -> PathBuf {
    let p = lab.opts.state_dir.join("cluster-ca.pem");
    std::fs::write(&p, lab.cluster_ca().expect("cluster CA")).unwrap();
    p
}

#[allow(clippy::too_many_arguments)]
fn restore(
    lab: &Lab,
    imds: &str,
    cluster: &str,
    tier: &str,
    blob: &str,
    addr: &str,
    token_var: &str,
    token: &str,
    force: bool,
) -> Output {
    let ca = cluster_ca_file(lab);
    let mut args = vec![
        "restore",
        "--tier",
        tier,
        "--blob",
        blob,
        "--addr",
        addr,
        "--api-ca-file",
        ca.to_str().unwrap(),
    ];
    if force {
        args.push("--force");
    }
    snapshot_cmd(lab, imds, cluster, &args, &[(token_var, token)])
}

/// Destroys every server of `role` with its data (the whole node root), forgets the tier's bootstrap state (the
/// runbook's "rebuild a tier from nothing"), and boots the servers again from their tags.
async fn destroy_and_rebuild(lab: &mut Lab, role: Role, tier: &str) {
    let servers = nodes_of(lab, role);
    for &i in &servers {
        lab.kill_agent(i).await;
    }
    for &i in &servers {
        let root = lab.nodes[i].root.clone();
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::create_dir_all(root.join("etc/hashistack")).unwrap();
        let cfg = lab.agent_config(&lab.nodes[i].def, &root);
        lab.write_node_config(i, &cfg).unwrap();
    }
    lab.delete_blob(
        "coordination",
        &hashistack_agent::coordination::state_blob_name(&lab.opts.cluster, tier),
    )
    .await
    .unwrap();
    for &i in &servers {
        lab.start_agent(i).unwrap();
    }
    // The old state is gone: the first Done is the rebuilt tier's.
    wait_phase(lab, tier, TierPhase::Done, Duration::from_secs(240)).await;
}

fn one_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line: {err}");
    lines[0].to_string()
}

/// The tokens a Consul tier's bootstrap hands over through Key Vault, as (vault, secret) — docs/runbooks.md,
/// "rebuild a tier from nothing", step 5: the Consul agent token and Nomad's Consul token (shared vault), the
/// status token (status vault), the snapshot credential (servers vault). Only those the lab's tier wrote.
fn consul_handed_over(lab: &Lab) -> Vec<(&'static str, String, String)> {
    use hashistack_agent::names;
    use hashistack_lab::keyvault::{SERVERS_VAULT, SHARED_VAULT, STATUS_VAULT};
    let cluster = &lab.opts.cluster;
    [
        (SHARED_VAULT, names::agent_token_secret(cluster)),
        (SHARED_VAULT, names::nomad_token_secret(cluster)),
        (STATUS_VAULT, names::CONSUL_SECRET.to_string()),
        (
            SERVERS_VAULT,
            names::snapshot_token_secret(cluster, "consul"),
        ),
    ]
    .into_iter()
    .filter_map(|(vault, name)| {
        let v = lab.keyvault.as_ref()?.vault(vault)?.secret_value(&name)?;
        Some((vault, name, v))
    })
    .collect()
}

/// `hashistack-agent snapshot --now` on every Consul server: whether one of them took a snapshot.
fn any_consul_snapshot_taken(lab: &Lab) -> bool {
    nodes_of(lab, Role::ConsulServer).into_iter().any(|i| {
        let o = snapshot_on(lab, i);
        o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("snapshot ")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_comes_back_from_nothing_with_its_data_and_tokens() {
    let mut lab = healthy_lab(options("snapshots-rebuild", 140)).await;
    let operator = lab.operator_imds().await.unwrap();
    let consul0 = nodes_of(&lab, Role::ConsulServer)[0];
    let consul_api = format!("https://{}:8501", lab.nodes[consul0].def.ip);
    let mgmt: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "consul")).unwrap();
    let mgmt = mgmt["secret_id"].as_str().unwrap().to_string();
    use reqwest::Method;
    let c = "X-Consul-Token";

    // Consul: a KV value, a policy and a token that may read it.
    ok(
        &lab,
        Method::PUT,
        &format!("{consul_api}/v1/kv/app/config"),
        c,
        &mgmt,
        Some(json!("v1")),
    )
    .await;
    ok(
        &lab,
        Method::PUT,
        &format!("{consul_api}/v1/acl/policy"),
        c,
        &mgmt,
        Some(json!({"Name": "app-read", "Rules": "key_prefix \"app/\" { policy = \"read\" }"})),
    )
    .await;
    let app = ok(
        &lab,
        Method::PUT,
        &format!("{consul_api}/v1/acl/token"),
        c,
        &mgmt,
        Some(json!({"Description": "app", "Policies": [{"Name": "app-read"}]})),
    )
    .await;
    let app_token = app["SecretID"].as_str().unwrap().to_string();
    let config_url = format!("{consul_api}/v1/kv/app/config?raw");
    assert_eq!(
        call(&lab, Method::GET, &config_url, c, &app_token, None)
            .await
            .unwrap(),
        (200, "\"v1\"".into())
    );

    // Snapshots: only each tier's leader takes one; both recorded.
    let consul_blob = snapshot_tier(&lab, Role::ConsulServer);
    for (tier, blob) in [("consul", &consul_blob)] {
        let rec: Value = serde_json::from_slice(
            &lab.read_blob(
                "coordination",
                &hashistack_agent::snapshot::record_blob_name("lab", tier),
            )
            .await
            .expect("record"),
        )
        .unwrap();
        assert_eq!(rec["last_success"]["blob"], json!(blob), "{rec}");
        assert_eq!(rec["last_attempt"]["ok"], json!(true), "{rec}");
        let bytes = lab
            .read_blob("snapshots", blob)
            .await
            .expect("snapshot blob");
        assert!(bytes.starts_with(b"HSSNAP\0\x01"));
        // Encrypted: no secret of the tier appears in the stored object.
        for secret in [&mgmt, &app_token] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{tier} snapshot holds a token in clear"
            );
        }
    }
    // A second run on the leader within the interval takes nothing (the timer's case).
    let leader = nodes_of(&lab, Role::ConsulServer).into_iter().find(|&i| {
        let o = std::process::Command::new(agent(&lab))
            .args(["snapshot", "--config"])
            .arg(&lab.nodes[i].config_path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).contains("not due")
    });
    assert!(leader.is_some(), "the leader finds its snapshot recent");

    // Consul from nothing. What its bootstrap handed over through Key Vault, as the snapshot knows it.
    let handed_before = consul_handed_over(&lab);
    let names: Vec<&str> = handed_before.iter().map(|(_, n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"status-consul-token")
            && names.iter().any(|n| n.ends_with("-consul-agent-token")),
        "{names:?}"
    );
    destroy_and_rebuild(&mut lab, Role::ConsulServer, "consul").await;
    let new_mgmt: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "consul")).unwrap();
    let new_mgmt = new_mgmt["secret_id"].as_str().unwrap().to_string();
    assert_ne!(new_mgmt, mgmt, "the rebuilt tier bootstrapped anew");
    let (s, _) = eventually("the old token is unknown to the rebuilt tier", || async {
        let r = call(&lab, Method::GET, &config_url, c, &app_token, None).await?;
        if r.0 == 403 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert_eq!(s, 403);
    let o = restore(
        &lab,
        &operator,
        "lab",
        "consul",
        &consul_blob,
        &consul_api,
        "CONSUL_HTTP_TOKEN",
        &new_mgmt,
        false,
    );
    assert!(
        o.status.success(),
        "consul restore: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r = eventually("the original app token reads its key again", || async {
        let r = call(&lab, Method::GET, &config_url, c, &app_token, None).await?;
        if r.0 == 200 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert_eq!(r.1, "\"v1\"");
    let token_self = format!("{consul_api}/v1/acl/token/self");
    let (s, body) = acl_call(&lab, &token_self, &mgmt).await;
    assert_eq!(s, 200, "the original management token works again: {body}");
    let policies = ok(
        &lab,
        Method::GET,
        &format!("{consul_api}/v1/acl/policies"),
        c,
        &mgmt,
        None,
    )
    .await;
    assert!(policies.to_string().contains("app-read"), "{policies}");
    // The restored state replaced the rebuilt one: the rebuilt tier's management token is gone.
    let (s, body) = acl_call(&lab, &token_self, &new_mgmt).await;
    assert_eq!(
        s, 403,
        "the rebuilt tier's management token outlived the restore: {body}"
    );

    // Runbook step 5. The rebuilt tier handed over tokens of its own through Key Vault; the restored state does
    // not know them, and knows the ones the snapshot's tier handed over.
    let handed_rebuilt = consul_handed_over(&lab);
    assert_eq!(handed_rebuilt.len(), handed_before.len());
    for ((_, name, old), (_, _, new)) in handed_before.iter().zip(&handed_rebuilt) {
        assert_ne!(old, new, "{name}: the rebuilt tier handed over a new token");
        let (s, body) = acl_call(&lab, &token_self, new).await;
        assert_eq!(
            s, 403,
            "{name}: the rebuilt tier's token is unknown after the restore: {body}"
        );
        let (s, body) = acl_call(&lab, &token_self, old).await;
        assert_eq!(
            s, 200,
            "{name}: the snapshot's token is known again: {body}"
        );
    }
    // So the tier's snapshot credential (the rebuilt one, in the servers vault) is refused: no snapshot.
    assert!(
        !any_consul_snapshot_taken(&lab),
        "a snapshot was taken with the rebuilt tier's credential"
    );
    // Set each secret back to the version current when the snapshot was taken (what the operator does with
    // `az keyvault secret set --value "$(az keyvault secret show --id <old version id> …)"`), then restart
    // hashistack-agent on every node.
    for (vault, name, old) in &handed_before {
        let v = lab.keyvault.as_ref().unwrap().vault(vault).unwrap();
        v.set_secret(name, old).unwrap();
    }
    for i in 0..lab.nodes.len() {
        lab.reboot(i).await.unwrap();
    }
    wait_healthy(&lab, Duration::from_secs(180)).await;
    // The snapshot credential works again, and status (the jumpbox, with the status token) is healthy.
    eventually(
        "the leader snapshots with the restored credential",
        || async {
            if any_consul_snapshot_taken(&lab) {
                Ok(())
            } else {
                Err("no snapshot taken".to_string())
            }
        },
    )
    .await;
    let j = lab.jumpbox().expect("the lab has a jumpbox");
    eventually("status is healthy after step 5", || async {
        let o = tokio::process::Command::new(agent(&lab))
            .args(["status", "--json", "--config"])
            .arg(&lab.nodes[j].config_path)
            .output()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
        if v["verdict"] == "healthy" {
            Ok(())
        } else {
            Err(format!("{v:#}"))
        }
    })
    .await;

    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_comes_back_from_nothing_with_its_data_and_tokens() {
    let mut lab = healthy_lab(options("snapshots-vault", 142)).await;
    let operator = lab.operator_imds().await.unwrap();
    let vault_api = lab.opts.vault_address();
    let vault_escrow: Value =
        serde_json::from_slice(&escrow_open(&lab, &operator, "vault")).unwrap();
    let root = vault_escrow["root_token"].as_str().unwrap().to_string();
    use reqwest::Method;
    let v = "X-Vault-Token";

    // Vault: a KV secret, a policy and a token for it.
    ok(
        &lab,
        Method::POST,
        &format!("{vault_api}/v1/sys/mounts/kv"),
        v,
        &root,
        Some(json!({"type": "kv"})),
    )
    .await;
    ok(
        &lab,
        Method::PUT,
        &format!("{vault_api}/v1/kv/app"),
        v,
        &root,
        Some(json!({"password": "hunter2"})),
    )
    .await;
    ok(
        &lab,
        Method::PUT,
        &format!("{vault_api}/v1/sys/policies/acl/app"),
        v,
        &root,
        Some(json!({"policy": "path \"kv/app\" { capabilities = [\"read\"] }"})),
    )
    .await;
    let t = ok(
        &lab,
        Method::POST,
        &format!("{vault_api}/v1/auth/token/create-orphan"),
        v,
        &root,
        Some(json!({"policies": ["app"], "ttl": "24h"})),
    )
    .await;
    let vault_app = t["auth"]["client_token"].as_str().unwrap().to_string();
    // The snapshot holds all three servers as voters (the rebuilt tier's servers rejoin under the same ids).
    all_vault_voters(&lab, &root, 3).await;

    let vault_blob = snapshot_tier(&lab, Role::VaultServer);
    let bytes = lab
        .read_blob("snapshots", &vault_blob)
        .await
        .expect("snapshot blob");
    for secret in [&root, &vault_app] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "vault snapshot holds a token in clear"
        );
    }

    // Vault from nothing.
    destroy_and_rebuild(&mut lab, Role::VaultServer, "vault").await;
    let new_vault: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "vault")).unwrap();
    let new_root = new_vault["root_token"].as_str().unwrap().to_string();
    assert_ne!(new_root, root);
    // The restore replaces the raft state of the whole tier: every rebuilt server must be a voter first, or the
    // one that joins after it misses it.
    all_vault_voters(&lab, &new_root, 3).await;
    // The rebuilt Vault answers through the load balancer with its new root token.
    ok(
        &lab,
        Method::GET,
        &format!("{vault_api}/v1/auth/token/lookup-self"),
        v,
        &new_root,
        None,
    )
    .await;
    let o = restore(
        &lab,
        &operator,
        "lab",
        "vault",
        &vault_blob,
        &vault_api,
        "VAULT_TOKEN",
        &new_root,
        true,
    );
    assert!(
        o.status.success(),
        "vault restore: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let secret = ok(
        &lab,
        Method::GET,
        &format!("{vault_api}/v1/kv/app"),
        v,
        &vault_app,
        None,
    )
    .await;
    assert_eq!(secret["data"]["password"], json!("hunter2"), "{secret}");
    ok(
        &lab,
        Method::GET,
        &format!("{vault_api}/v1/auth/token/lookup-self"),
        v,
        &root,
        None,
    )
    .await;
    // The restored state replaced the rebuilt one: its root token is gone, and the tier is whole again, every
    // server a voter and unsealed with the restored keyring.
    let (s, body) = call(
        &lab,
        Method::GET,
        &format!("{vault_api}/v1/auth/token/lookup-self"),
        v,
        &new_root,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        s, 403,
        "the rebuilt tier's root token outlived the restore: {body}"
    );
    all_vault_voters(&lab, &root, 3).await;
    for i in nodes_of(&lab, Role::VaultServer) {
        let url = format!("https://{}:8200/v1/sys/seal-status", lab.nodes[i].def.ip);
        // Standbys seal and unseal again with the restored keyring (auto-unseal): wait for that, within bounds.
        eventually(
            &format!("{} unsealed after the restore", lab.nodes[i].def.name),
            || async {
                match call(&lab, Method::GET, &url, v, &root, None).await? {
                    (200, body) if body.contains("\"sealed\":false") => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshots_and_vm_identities_are_refused_before_anything_is_touched() {
    let mut o = options("snapshots-refused", 141);
    o.consul_servers = 1;
    o.vault_servers = 0;
    o.nomad_servers = 1;
    let mut lab = healthy_lab(o).await;
    let operator = lab.operator_imds().await.unwrap();
    let consul0 = nodes_of(&lab, Role::ConsulServer)[0];
    let nomad0 = nodes_of(&lab, Role::NomadServer)[0];
    let consul_api = format!("https://{}:8501", lab.nodes[consul0].def.ip);
    let nomad_api = format!("https://{}:4646", lab.nodes[nomad0].def.ip);
    let mgmt: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "consul")).unwrap();
    let mgmt = mgmt["secret_id"].as_str().unwrap().to_string();
    use reqwest::Method;
    let c = "X-Consul-Token";
    // 3 MB of hex digests (half of it entropy, so Consul's gzip leaves ~1.5 MB): the snapshot spans two 1 MiB
    // frames, so a stream cut on a frame boundary can be offered.
    let mut d = [0u8; 32];
    for i in 0..6 {
        let mut v = String::with_capacity(500_000);
        while v.len() < 499_968 {
            use sha2::Digest;
            d = sha2::Sha256::digest(d).into();
            v.push_str(&hex::encode(d));
        }
        let url = format!("{consul_api}/v1/kv/bulk/{i}");
        ok(&lab, Method::PUT, &url, c, &mgmt, Some(Value::String(v))).await;
    }
    let blob = snapshot_tier(&lab, Role::ConsulServer);
    // Written after the snapshot: any restore would remove it.
    ok(
        &lab,
        Method::PUT,
        &format!("{consul_api}/v1/kv/after"),
        c,
        &mgmt,
        Some(json!("1")),
    )
    .await;
    let after_is_there = || {
        let lab = &lab;
        let (url, mgmt) = (format!("{consul_api}/v1/kv/after?raw"), mgmt.clone());
        async move {
            call(lab, Method::GET, &url, c, &mgmt, None)
                .await
                .unwrap()
                .0
                == 200
        }
    };
    assert!(after_is_there().await);

    let good = lab.read_blob("snapshots", &blob).await.unwrap();
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x20;
    let truncated = good[..good.len() - 40].to_vec();
    let cut_at_frame = {
        // Header, then the first frame only: a stream cut on a frame boundary.
        let hlen = u32::from_be_bytes(good[8..12].try_into().unwrap()) as usize;
        let at = 12 + hlen;
        let flen = u32::from_be_bytes(good[at..at + 4].try_into().unwrap()) as usize;
        good[..at + 4 + flen].to_vec()
    };
    let mut not_ours = b"{\"not\": \"a snapshot\"}".to_vec();
    not_ours.extend_from_slice(&[0; 64]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("lab/consul/corrupt.hsnap", corrupt, "does not authenticate"),
        ("lab/consul/truncated.hsnap", truncated, "truncated"),
        ("lab/consul/cut.hsnap", cut_at_frame, "truncated"),
        (
            "lab/consul/foreign.hsnap",
            not_ours,
            "not a hashistack snapshot",
        ),
    ];
    for (name, bytes, why) in &cases {
        lab.write_blob("snapshots", name, bytes.clone())
            .await
            .unwrap();
        let o = restore(
            &lab,
            &operator,
            "lab",
            "consul",
            name,
            &consul_api,
            "CONSUL_HTTP_TOKEN",
            &mgmt,
            false,
        );
        assert_eq!(o.status.code(), Some(1), "{name}");
        let line = one_line(&o);
        assert!(
            line.contains("refused") && line.contains(why),
            "{name}: {line}"
        );
        assert!(after_is_there().await, "{name}: the tier was touched");
    }
    // Wrong tier: a Consul snapshot offered to Nomad; wrong cluster: offered as another cluster's.
    let o = restore(
        &lab,
        &operator,
        "lab",
        "nomad",
        &blob,
        &nomad_api,
        "NOMAD_TOKEN",
        &mgmt,
        false,
    );
    let line = one_line(&o);
    assert!(
        line.contains("is a snapshot of lab/consul, not of lab/nomad"),
        "{line}"
    );
    let o = restore(
        &lab,
        &operator,
        "other",
        "consul",
        &blob,
        &consul_api,
        "CONSUL_HTTP_TOKEN",
        &mgmt,
        false,
    );
    let line = one_line(&o);
    assert!(line.contains("not of other/consul"), "{line}");
    assert!(after_is_there().await);
    // A VM identity cannot unwrap a snapshot's key (it may wrap only).
    let vm_imds = format!(
        "http://{}:{}",
        lab.nodes[consul0].def.ip,
        hashistack_lab::lab::IMDS_PORT
    );
    let o = restore(
        &lab,
        &vm_imds,
        "lab",
        "consul",
        &blob,
        &consul_api,
        "CONSUL_HTTP_TOKEN",
        &mgmt,
        false,
    );
    assert_eq!(o.status.code(), Some(1));
    let line = one_line(&o);
    assert!(line.contains("403"), "{line}");
    assert!(after_is_there().await);
    // The untouched original restores (so the refusals above were the checks', not a broken restore).
    let o = restore(
        &lab,
        &operator,
        "lab",
        "consul",
        &blob,
        &consul_api,
        "CONSUL_HTTP_TOKEN",
        &mgmt,
        false,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eventually("the restore removed the later key", || async {
        (!after_is_there().await)
            .then_some(())
            .ok_or("still there".to_string())
    })
    .await;

    // Nomad, through its contract double: a policy written after the snapshot is gone after the restore; the
    // list shows both tiers' snapshots.
    let nomad_mgmt: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "nomad")).unwrap();
    let nomad_mgmt = nomad_mgmt["secret_id"].as_str().unwrap().to_string();
    let nomad_blob = snapshot_tier(&lab, Role::NomadServer);
    let n = "X-Nomad-Token";
    ok(
        &lab,
        Method::PUT,
        &format!("{nomad_api}/v1/acl/policy/later"),
        n,
        &nomad_mgmt,
        Some(json!({"Name": "later", "Rules": "node { policy = \"read\" }"})),
    )
    .await;
    let o = restore(
        &lab,
        &operator,
        "lab",
        "nomad",
        &nomad_blob,
        &nomad_api,
        "NOMAD_TOKEN",
        &nomad_mgmt,
        false,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (s, _) = call(
        &lab,
        Method::GET,
        &format!("{nomad_api}/v1/acl/policy/later"),
        n,
        &nomad_mgmt,
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 404, "the policy written after the snapshot is gone");
    let o = snapshot_cmd(&lab, &operator, "lab", &["list"], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains(&blob) && out.contains(&nomad_blob),
        "{out}"
    );
    record_writes_are_fenced_by_storage(&lab, consul0).await;
    wait_healthy(&lab, Duration::from_secs(60)).await;
    lab.down().await;
}

/// The snapshot record is written only over what its writer read (`If-Match`/`If-None-Match: *`), as the tier
/// state is: a leader that lost leadership mid-run (A) cannot overwrite the record the new leader (B) wrote since
/// A read it; a retried write that already landed is success. On Azurite, as node `i`'s identity.
async fn record_writes_are_fenced_by_storage(lab: &Lab, i: usize) {
    use hashistack_agent::coordination::Expect;
    use hashistack_agent::snapshot::{self, RecordError};
    let az = hashistack_e2e::azure_as_node(lab, i);
    let blob = lab.blob_endpoint();
    let pol = snapshot::policy(Duration::from_secs(30));
    let tier = "consul";
    let (a_read, a_expect) = snapshot::read_record_for_update(&az, &blob, "lab", tier, pol)
        .await
        .unwrap();
    let a_read = a_read.expect("the leader recorded its snapshots");
    assert!(matches!(a_expect, Expect::Etag(_)), "{a_expect:?}");
    let (b_read, b_expect) = snapshot::read_record_for_update(&az, &blob, "lab", tier, pol)
        .await
        .unwrap();
    let mut b_rec = b_read.unwrap();
    b_rec.last_attempt.as_mut().unwrap().node = "B".into();
    snapshot::write_record(&az, &blob, &b_rec, &b_expect, pol)
        .await
        .expect("B writes over what it read");
    let mut a_rec = a_read.clone();
    a_rec.last_attempt.as_mut().unwrap().node = "A".into();
    match snapshot::write_record(&az, &blob, &a_rec, &a_expect, pol).await {
        Err(RecordError::Superseded { status, .. }) => assert_eq!(status, 412),
        other => panic!("A's stale write was not refused: {other:?}"),
    }
    let (stored, now) = snapshot::read_record_for_update(&az, &blob, "lab", tier, pol)
        .await
        .unwrap();
    assert_eq!(stored.as_ref(), Some(&b_rec), "B's record stands");
    // B's write repeated with B's old condition (its first answer lost): storage refuses it, the stored record
    // is exactly B's, so it is success.
    snapshot::write_record(&az, &blob, &b_rec, &b_expect, pol)
        .await
        .expect("a landed write, retried, is success");
    // A record for a tier that has none is created only if still absent.
    let mut other = a_read;
    other.tier = "fence-check".into();
    snapshot::write_record(&az, &blob, &other, &Expect::Absent, pol)
        .await
        .unwrap();
    other.last_attempt.as_mut().unwrap().node = "late".into();
    match snapshot::write_record(&az, &blob, &other, &Expect::Absent, pol).await {
        Err(RecordError::Superseded { status, .. }) => assert_eq!(status, 409),
        other => panic!("a second create was not refused: {other:?}"),
    }
    lab.delete_blob(
        "coordination",
        &snapshot::record_blob_name("lab", "fence-check"),
    )
    .await
    .unwrap();
    assert!(matches!(now, Expect::Etag(_)));
}
