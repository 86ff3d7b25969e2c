//! End-to-end: an image roll (`az vmss update-instances`) replaces a server's OS disk and keeps its data
//! disk. In the lab, `Lab::reimage` removes everything under the node's root except
//! `var/lib/hashistack-data` (the data disk, a directory here: lab/components.md) and boots the agent again.
//! The node must rejoin with its raft data, nothing may bootstrap again, its configs must come back byte for
//! byte, and a whole tier reimaged one node at a time must keep quorum and its data.

use hashistack_agent::node::Role;
use hashistack_e2e::{
    all_vault_voters, assert_done_once, escrow_open, healthy_lab, nodes_of, options, tree_digest,
    wait_healthy,
};
use hashistack_lab::Lab;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The node's configuration files (everything under etc/ but the TLS directories: a reimaged node has lost
/// its certificate and key with the OS disk and is issued new ones from the same cluster CA).
fn configs(lab: &Lab, i: usize) -> BTreeMap<PathBuf, String> {
    tree_digest(&lab.nodes[i].root.join("etc"))
        .into_iter()
        .filter(|(p, _)| !p.components().any(|c| c.as_os_str() == "tls"))
        .collect()
}

/// Reimages node `i` and waits until its agent booted and finished the tier bootstrap step: its outcome.
async fn reimage_and_wait(lab: &mut Lab, i: usize) -> String {
    lab.reimage(i).await.unwrap();
    let rec = lab.wait_booted(i, Duration::from_secs(120)).await.unwrap();
    assert!(rec.ok, "{}: {:?}", lab.nodes[i].def.name, rec.last_error);
    let start = Instant::now();
    loop {
        let rec = lab.boot_record(i).unwrap();
        if let Some(outcome) = rec.bootstrap {
            return outcome;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{}: no bootstrap outcome: {rec:?}",
            lab.nodes[i].def.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Retries `op` for up to 60 s (a leader election after a server went away takes a few seconds).
async fn eventually<F, Fut>(what: &str, mut op: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Value, String>>,
{
    let start = Instant::now();
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > Duration::from_secs(60) => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn consul_put(lab: &Lab, via: usize, token: &str, key: &str, value: &str) {
    let url = format!("https://{}:8501/v1/kv/{key}", lab.nodes[via].def.ip);
    eventually(&format!("consul PUT {key}"), || async {
        let r = lab
            .https()
            .put(&url)
            .header("X-Consul-Token", token)
            .body(value.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body = r.text().await.map_err(|e| e.to_string())?;
        (status.is_success() && body.trim() == "true")
            .then_some(Value::Null)
            .ok_or(format!("{status} {body}"))
    })
    .await;
}

async fn consul_get(lab: &Lab, via: usize, token: &str, key: &str) -> String {
    let url = format!("https://{}:8501/v1/kv/{key}?raw", lab.nodes[via].def.ip);
    let v = eventually(&format!("consul GET {key}"), || async {
        let r = lab
            .https()
            .get(&url)
            .header("X-Consul-Token", token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body = r.text().await.map_err(|e| e.to_string())?;
        status
            .is_success()
            .then_some(Value::String(body.clone()))
            .ok_or(format!("{status} {body}"))
    })
    .await;
    v.as_str().unwrap().to_string()
}

/// A request to Vault, through any server that is up (standbys forward to the active node).
async fn vault(
    lab: &Lab,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Value {
    let servers = nodes_of(lab, Role::VaultServer);
    eventually(&format!("vault {method} {path}"), || {
        let method = method.clone();
        let body = body.clone();
        let servers = servers.clone();
        async move {
            let mut last = String::new();
            for &i in &servers {
                let url = format!("https://{}:8200/v1/{path}", lab.nodes[i].def.ip);
                let mut req = lab
                    .https()
                    .request(method.clone(), &url)
                    .header("X-Vault-Token", token);
                if let Some(b) = &body {
                    req = req.json(b);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        let text = r.text().await.unwrap_or_default();
                        return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
                    }
                    Ok(r) => last = format!("{}: {}", url, r.status()),
                    Err(e) => last = format!("{url}: {e}"),
                }
            }
            Err(last)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reimaging_servers_one_at_a_time_keeps_the_cluster_and_its_data() {
    let mut lab = healthy_lab(options("reimage", 123)).await;
    assert_done_once(&lab, "consul").await;
    assert_done_once(&lab, "vault").await;
    let operator = lab.operator_imds().await.unwrap();
    let consul: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "consul")).unwrap();
    let consul_token = consul["secret_id"].as_str().unwrap().to_string();
    let vault_secrets: Value =
        serde_json::from_slice(&escrow_open(&lab, &operator, "vault")).unwrap();
    let root = vault_secrets["root_token"].as_str().unwrap().to_string();

    // Data written before: a Consul KV value and a Vault secret.
    let consul_servers = nodes_of(&lab, Role::ConsulServer);
    let vault_servers = nodes_of(&lab, Role::VaultServer);
    consul_put(
        &lab,
        consul_servers[0],
        &consul_token,
        "reimage/before",
        "kept",
    )
    .await;
    vault(
        &lab,
        reqwest::Method::POST,
        "sys/mounts/reimage",
        &root,
        Some(json!({"type": "kv", "options": {"version": "1"}})),
    )
    .await;
    vault(
        &lab,
        reqwest::Method::PUT,
        "reimage/before",
        &root,
        Some(json!({"value": "kept"})),
    )
    .await;

    let before: Vec<_> = (0..lab.nodes.len()).map(|i| configs(&lab, i)).collect();
    let node_ids: Vec<_> = consul_servers
        .iter()
        .chain(&vault_servers)
        .map(|&i| {
            let id = lab.nodes[i]
                .root
                .join("var/lib/hashistack-data/consul/node-id");
            std::fs::read_to_string(&id).unwrap_or_else(|e| panic!("{}: {e}", id.display()))
        })
        .collect();

    // The Consul tier, then the Vault tier, one server at a time.
    for (tier, servers) in [("consul", &consul_servers), ("vault", &vault_servers)] {
        for &i in servers.iter() {
            let name = lab.nodes[i].def.name.clone();
            let outcome = reimage_and_wait(&mut lab, i).await;
            // The tier is bootstrapped: the reimaged node sees that and does nothing.
            assert_eq!(outcome, "already-done", "{name}");
            // While it rejoins, the others keep quorum: writes go through another server.
            let other = consul_servers.iter().copied().find(|&c| c != i).unwrap();
            consul_put(
                &lab,
                other,
                &consul_token,
                &format!("reimage/during-{name}"),
                &name,
            )
            .await;
            if tier == "vault" {
                vault(
                    &lab,
                    reqwest::Method::PUT,
                    &format!("reimage/during-{name}"),
                    &root,
                    Some(json!({"value": name})),
                )
                .await;
            }
            wait_healthy(&lab, Duration::from_secs(120)).await;
            if tier == "vault" {
                // As the runbook says: the next server only once raft is whole again. Autopilot promotes the
                // rejoined server back to voter after its stabilization time.
                all_vault_voters(&lab, &root, 3).await;
            }
            // Nothing bootstrapped again.
            assert_done_once(&lab, tier).await;
            // The same configuration, byte for byte.
            let now = configs(&lab, i);
            assert_eq!(now, before[i], "{name}: configs changed across the reimage");
        }
    }

    // Every server kept its Consul node id (the data disk's consul/node-id), so none rejoined as a new node.
    let after: Vec<_> = consul_servers
        .iter()
        .chain(&vault_servers)
        .map(|&i| {
            std::fs::read_to_string(
                lab.nodes[i]
                    .root
                    .join("var/lib/hashistack-data/consul/node-id"),
            )
            .unwrap()
        })
        .collect();
    assert_eq!(after, node_ids);
    // The data is all there, read through every Consul server.
    for &c in &consul_servers {
        assert_eq!(
            consul_get(&lab, c, &consul_token, "reimage/before").await,
            "kept"
        );
        for &i in consul_servers.iter().chain(&vault_servers) {
            let name = &lab.nodes[i].def.name;
            assert_eq!(
                consul_get(&lab, c, &consul_token, &format!("reimage/during-{name}")).await,
                *name
            );
        }
    }
    let v = vault(&lab, reqwest::Method::GET, "reimage/before", &root, None).await;
    assert_eq!(v["data"]["value"], "kept", "{v}");
    for &i in &vault_servers {
        let name = &lab.nodes[i].def.name;
        let v = vault(
            &lab,
            reqwest::Method::GET,
            &format!("reimage/during-{name}"),
            &root,
            None,
        )
        .await;
        assert_eq!(v["data"]["value"], *name, "{v}");
    }
    // Three voters, the same three.
    all_vault_voters(&lab, &root, 3).await;

    // A data disk of another cluster attached by mistake: the agent refuses it before it writes or starts
    // anything, with one line naming both; the disk stays as it was. The right disk back: the node rejoins.
    let v0 = vault_servers[0];
    let marker = lab.nodes[v0]
        .root
        .join("var/lib/hashistack-data")
        .join(hashistack_agent::disk::MARKER);
    let ours = std::fs::read(&marker).expect("the data disk carries its marker");
    let mut foreign: Value = serde_json::from_slice(&ours).unwrap();
    assert_eq!(foreign["role"], "vault-server", "{foreign}");
    foreign["cluster"] = json!("another");
    let foreign = serde_json::to_vec(&foreign).unwrap();
    lab.stop_agent(v0).await;
    lab.kill_node_services(v0);
    std::fs::write(&marker, &foreign).unwrap();
    lab.reimage(v0).await.unwrap();
    let rec = lab.wait_booted(v0, Duration::from_secs(120)).await.unwrap();
    let err = rec.last_error.clone().unwrap_or_default();
    assert!(!rec.ok, "{rec:?}");
    assert!(
        err.contains("belongs to cluster another's vault-server tier")
            && err.contains("this node is vault-server in cluster lab")
            && err.contains("Next step"),
        "{err}"
    );
    assert!(rec.services.is_empty(), "nothing started: {rec:?}");
    assert_eq!(
        std::fs::read(&marker).unwrap(),
        foreign,
        "the disk is left as it was"
    );
    let seal = format!("https://{}:8200/v1/sys/seal-status", lab.nodes[v0].def.ip);
    assert!(
        lab.https().get(seal).send().await.is_err(),
        "no Vault started"
    );
    lab.stop_agent(v0).await;
    std::fs::write(&marker, &ours).unwrap();
    assert_eq!(reimage_and_wait(&mut lab, v0).await, "already-done");
    wait_healthy(&lab, Duration::from_secs(120)).await;
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimaged_node_finishes_an_interrupted_escrow_from_its_data_disk() {
    // The escrow spool lives on the data disk: a leader that initialized Vault, spooled the secrets and lost its
    // OS disk before the upload still completes the escrow after the reimage.
    use hashistack_agent::bootstrap::CrashPoint;
    let mut o = options("reimage-spool", 124);
    o.start_agents = false;
    o.consul_servers = 1;
    o.vault_servers = 1;
    let mut lab = Lab::up(o, hashistack_e2e::tools()).await.unwrap();
    let consul = nodes_of(&lab, Role::ConsulServer)[0];
    let v = nodes_of(&lab, Role::VaultServer)[0];
    lab.start_agent(consul).unwrap();
    let mut cfg = lab.node_config(v);
    cfg.faults.crash_at = Some(CrashPoint::AfterSpool);
    lab.write_node_config(v, &cfg).unwrap();
    lab.start_agent(v).unwrap();
    // The agent kills itself right after the spool's fsync.
    let spool = lab.nodes[v]
        .root
        .join("var/lib/hashistack-data/escrow-spool");
    let start = Instant::now();
    while std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "nothing spooled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agent = lab.nodes[v].agent.as_mut().unwrap();
    tokio::time::timeout(Duration::from_secs(60), agent.child.wait())
        .await
        .expect("the agent crashes at the injected point")
        .unwrap();
    // The image roll: a fresh OS disk (and an agent.toml without the fault), the same data disk.
    let outcome = reimage_and_wait(&mut lab, v).await;
    assert_eq!(outcome, "recovered");
    assert_done_once(&lab, "vault").await;
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool emptied after the upload"
    );
    lab.down().await;
}
