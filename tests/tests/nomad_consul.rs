//! End-to-end: Nomad's Consul token. The Consul tier's bootstrap creates a least-privilege token for Nomad
//! agents (policy `hashistack-nomad`) and hands it over through the shared Key Vault; only the nodes that run
//! Nomad (Nomad servers, workers) read it, and render it into `/etc/nomad.d/consul-token.json` (0640, the
//! owner of Nomad's config). Against the real Consul 1.8.7 of the lab, with that token, the agent API calls
//! Nomad makes for its own services and for jobs' services (register a service with HTTP, TCP and TTL
//! checks, update the TTL check, read the agent, the catalog and health, deregister) succeed, and a KV write
//! and ACL reads are refused.
//!
//! Lab: 3 Consul servers, 1 Vault server, 1 Nomad server, 1 worker and the jumpbox, all booted at once.

use hashistack_agent::bootstrap::consul_tokens::{nomad_token_secret, NOMAD_TOKEN_ACCESSOR};
use hashistack_agent::node::Role;
use hashistack_e2e::{files_containing, healthy_lab, nodes_of, options};
use hashistack_lab::keyvault::{principals, SHARED_VAULT};
use hashistack_lab::Lab;
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One call to a node's local Consul agent (HTTPS 8501, the cluster CA) with `token` (or none).
async fn consul(
    lab: &Lab,
    ip: std::net::Ipv4Addr,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut req = lab
        .https()
        .request(method.clone(), format!("https://{ip}:8501{path}"));
    if let Some(t) = token {
        req = req.header("X-Consul-Token", t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {ip}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits for the node's `consul-token.json` (written with the agent token, after the Consul tier's
/// bootstrap); returns its path.
async fn token_file(lab: &Lab, i: usize) -> PathBuf {
    let p = lab.nodes[i].root.join("etc/nomad.d/consul-token.json");
    let start = Instant::now();
    while !p.is_file() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}: no {}",
            lab.nodes[i].def.name,
            p.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    p
}

/// What a Nomad agent does on its local Consul agent with its token, for a service named `name`: all allowed.
/// Then what it must not be able to do: all refused.
async fn nomad_calls_on(lab: &Lab, ip: std::net::Ipv4Addr, name: &str, token: &str) {
    use reqwest::Method;
    let id = format!("_nomad-test-{name}");
    let ttl = format!("{id}-ttl");
    let t = Some(token);
    // Without a token Consul (default deny) refuses the registration: what follows proves the token.
    let reg = json!({
        "ID": id, "Name": name, "Address": ip.to_string(), "Port": 4646, "Tags": ["http"],
        "Checks": [
            {"CheckID": format!("{id}-http"), "Name": "Nomad HTTP", "HTTP": format!("https://{ip}:4646/v1/agent/health"),
             "TLSSkipVerify": true, "Interval": "10s", "Timeout": "2s"},
            {"CheckID": format!("{id}-tcp"), "Name": "Nomad RPC", "TCP": format!("{ip}:8501"), "Interval": "10s", "Timeout": "2s"},
            {"CheckID": ttl, "Name": "Nomad TTL", "TTL": "30s"}
        ]
    });
    let (s, b) = consul(
        lab,
        ip,
        Method::PUT,
        "/v1/agent/service/register",
        None,
        Some(reg.clone()),
    )
    .await;
    assert_eq!(s, 403, "{name} on {ip} registered without a token: {b}");

    for (method, path, body) in [
        (Method::GET, "/v1/agent/self".to_string(), None),
        (
            Method::PUT,
            "/v1/agent/service/register".to_string(),
            Some(reg),
        ),
        (
            Method::PUT,
            format!("/v1/agent/check/pass/{ttl}?note=ok"),
            None,
        ),
        (
            Method::PUT,
            format!("/v1/agent/check/update/{ttl}"),
            Some(json!({"Status": "passing", "Output": "Nomad is alive"})),
        ),
        (Method::GET, "/v1/agent/services".to_string(), None),
        (Method::GET, "/v1/agent/checks".to_string(), None),
        (Method::GET, format!("/v1/catalog/service/{name}"), None),
        (Method::GET, format!("/v1/health/service/{name}"), None),
    ] {
        let (s, b) = consul(lab, ip, method.clone(), &path, t, body).await;
        assert_eq!(s, 200, "{method} {path} on {ip}: {b}");
    }
    // The local agent syncs the service to the catalog (with its own agent token): Nomad's service
    // discovery finds it there, with its checks, and the TTL check passing.
    let start = Instant::now();
    loop {
        let (s, b) = consul(
            lab,
            ip,
            Method::GET,
            &format!("/v1/health/service/{name}"),
            t,
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        let entry = v
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["Service"]["ID"] == id.as_str());
        if let Some(e) = entry {
            let checks = e["Checks"].as_array().unwrap();
            let ttl_check = checks
                .iter()
                .find(|c| c["CheckID"] == ttl.as_str())
                .unwrap_or_else(|| panic!("{name}: no TTL check in {b}"));
            assert_eq!(ttl_check["Status"], "passing", "{b}");
            assert!(
                checks.len() >= 3,
                "{name}: the service's checks are in the catalog: {b}"
            );
            let (s, b) = consul(
                lab,
                ip,
                Method::GET,
                &format!("/v1/catalog/service/{name}"),
                t,
                None,
            )
            .await;
            assert!(s == 200 && b.contains(&id), "{b}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} never reached the catalog: {b}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Least privilege: no KV, no ACL system, no node registration, no operator.
    for (method, path, body) in [
        (Method::PUT, "/v1/kv/x", Some(json!("nomad"))),
        (Method::GET, "/v1/kv/x", None),
        (Method::GET, "/v1/acl/tokens", None),
        (Method::GET, "/v1/acl/policies", None),
        (
            Method::PUT,
            "/v1/acl/token",
            Some(json!({"Policies": [{"Name": "global-management"}]})),
        ),
        (
            Method::PUT,
            "/v1/catalog/register",
            Some(json!({"Node": "rogue", "Address": "10.9.9.9"})),
        ),
        (Method::GET, "/v1/operator/raft/configuration", None),
    ] {
        // Consul 1.8 answers 500 "The ACL system is currently in legacy mode" for a few seconds after the
        // bootstrap (shared/notes/checked-facts.md): that says nothing yet, so ask again until it does.
        let start = std::time::Instant::now();
        let (s, b) = loop {
            let (s, b) = consul(lab, ip, method.clone(), path, t, body.clone()).await;
            if s == 500 && b.contains("legacy mode") && start.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            break (s, b);
        };
        // A KV read of a key nobody wrote is 404 when allowed; refused it is 403.
        assert_eq!(s, 403, "{method} {path} on {ip} with Nomad's token: {b}");
    }

    // Deregistration, as Nomad does when a service goes away.
    let (s, b) = consul(
        lab,
        ip,
        Method::PUT,
        &format!("/v1/agent/service/deregister/{id}"),
        t,
        None,
    )
    .await;
    assert_eq!(s, 200, "deregister {id}: {b}");
    let (_, b) = consul(lab, ip, Method::GET, "/v1/agent/services", t, None).await;
    assert!(!b.contains(&id), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_gets_a_least_privilege_consul_token_that_only_nomad_nodes_read() {
    let mut o = options("nomad-consul", 106);
    o.vault_servers = 1;
    o.nomad_servers = 1;
    o.workers = 1;
    o.jumpbox = Some(true);
    let lab = healthy_lab(o).await;
    let kv = lab.keyvault.as_ref().unwrap();
    let st = lab.tier_state("consul").await.unwrap();
    assert_eq!(st.phase, hashistack_agent::coordination::TierPhase::Done);
    assert_eq!(st.message, None, "{:?}", st.message);

    let name = nomad_token_secret(&lab.opts.cluster);
    let token = kv
        .vault(SHARED_VAULT)
        .unwrap()
        .secret_value(&name)
        .expect("Nomad's Consul token in the shared vault");
    assert_eq!(token.len(), 36, "a Consul secret ID");

    let server = nodes_of(&lab, Role::NomadServer)[0];
    let worker = nodes_of(&lab, Role::Worker)[0];
    for i in [server, worker] {
        let n = &lab.nodes[i];
        let p = token_file(&lab, i).await;
        let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v, json!({"consul": {"token": token}}), "{}", n.def.name);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640, "{}", n.def.name);
        // The owner of Nomad's own config (the lab runs as one user; on a VM nomad:nomad, root on workers).
        let main = std::fs::metadata(n.root.join("etc/nomad.d/nomad.json")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (main.uid(), main.gid()),
            "{}",
            n.def.name
        );
        // Nowhere else on the node, logs included, but the material the agent keeps for a warm boot (0600, its own:
        // docs/trust-model.md#warm-boots).
        let kept = hashistack_agent::warm::path(&hashistack_agent::render::Layout::new(&n.root));
        let mut found = files_containing(&n.root, std::slice::from_ref(&token), &[]);
        found.sort();
        let mut want = vec![p.clone(), kept.clone()];
        want.sort();
        assert_eq!(found, want, "{}", n.def.name);
        let kept = std::fs::metadata(&kept).unwrap();
        assert_eq!(kept.permissions().mode() & 0o7777, 0o600, "{}", n.def.name);
    }

    // Who read it from the shared vault: the Nomad servers' and the workers' identities, nobody else.
    let served: Vec<_> = kv
        .vault(SHARED_VAULT)
        .unwrap()
        .served()
        .into_iter()
        .filter(|s| s.path.contains(&name))
        .collect();
    let readers: std::collections::BTreeSet<_> = served
        .iter()
        .filter(|s| s.method == "GET" && s.status == 200)
        .filter_map(|s| s.principal.clone())
        .collect();
    assert_eq!(
        readers,
        [principals::NOMAD, principals::WORKERS]
            .into_iter()
            .map(String::from)
            .collect(),
        "{served:?}"
    );
    // The Consul tier's leader wrote it; no other identity ever asked for it (an unauthenticated request is
    // the Key Vault challenge that precedes a client's first authenticated one: 401, nothing served).
    for s in &served {
        let p = s.principal.as_deref();
        if p.is_none() {
            assert_eq!(s.status, 401, "{s:?}");
        } else if s.method == "GET" {
            assert!(
                matches!(p, Some(principals::NOMAD | principals::WORKERS)),
                "{s:?}"
            );
        } else {
            assert_eq!(p, Some(principals::CONSUL), "{s:?}");
        }
    }
    // …and it is on no disk of a node that does not run Nomad (Consul servers keep it in their raft state,
    // as they keep every ACL token).
    for n in &lab.nodes {
        if matches!(n.def.role, Role::NomadServer | Role::Worker) {
            continue;
        }
        let found = files_containing(
            &n.root,
            std::slice::from_ref(&token),
            &["opt/consul/data", "var/lib/hashistack-data/consul"],
        );
        assert!(found.is_empty(), "{}: {found:?}", n.def.name);
    }

    // On the real Consul agents of those nodes: Nomad servers register `nomad`, clients `nomad-client`.
    nomad_calls_on(&lab, lab.nodes[server].def.ip, "nomad", &token).await;
    nomad_calls_on(&lab, lab.nodes[worker].def.ip, "nomad-client", &token).await;
    // A job's service, from the worker.
    nomad_calls_on(&lab, lab.nodes[worker].def.ip, "web", &token).await;

    // The token is the one with the fixed accessor (a re-run of the Consul tier's configuration reuses it).
    let (s, b) = consul(
        &lab,
        lab.nodes[worker].def.ip,
        reqwest::Method::GET,
        "/v1/acl/token/self",
        Some(&token),
        None,
    )
    .await;
    // token/self needs no privilege beyond the token itself.
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["AccessorID"], NOMAD_TOKEN_ACCESSOR);
    assert_eq!(v["Policies"][0]["Name"], "hashistack-nomad", "{b}");
    lab.down().await;
}
