//! End-to-end: Nomad workload identities in Vault (issue 10, item 2), on the real OpenBao of the lab.
//!
//! The Vault tier's bootstrap creates Nomad's documented JWT auth method `jwt-nomad` (default role and policy
//! `nomad-workloads`, KV v2 at `secret/`) and a token that may only write its configuration; once both the
//! Vault and the Nomad tier are done, the node that sees both done points the auth method at the Nomad servers'
//! JWKS with the cluster CA. The Nomad contract double signs identities with Nomad's claims (RS256, its JWKS).
//! Proven here: a job's identity logs in and reads its own secrets, not another job's; an expired identity, one
//! for another audience and one signed by another key are refused; the order in which the tiers finish does
//! not matter, and a reboot writes nothing.
//!
//! Nets 130–132 (this suite's).

use hashistack_agent::names::nomad_jwt_token_secret;
use hashistack_agent::node::Role;
use hashistack_e2e::{escrow_open, healthy_lab, nodes_of, options, tools, wait_healthy};
use hashistack_lab::keyvault::SERVERS_VAULT;
use hashistack_lab::nomad_identity::{claims, IdentityRequest, RootKey};
use hashistack_lab::Lab;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// One call to Vault through its load balancer (the active node), with `token`; status 0 when no answer.
async fn vault(
    lab: &Lab,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}/v1/{path}", lab.opts.vault_address());
    let mut req = lab.https().request(method.clone(), &url);
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    // The load balancer drops connections until its probe has found the active node (0: no answer).
    let r = match req.send().await {
        Ok(r) => r,
        Err(e) => return (0, Value::String(format!("{method} {path}: {e}"))),
    };
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The root token, as an operator opens it from escrow.
async fn root_token(lab: &mut Lab) -> String {
    let operator = lab.operator_imds().await.unwrap();
    let v: Value = serde_json::from_slice(&escrow_open(lab, &operator, "vault")).unwrap();
    v["root_token"].as_str().unwrap().to_string()
}

/// Waits until `auth/jwt-nomad/config` names a JWKS URL; returns the configuration.
async fn wait_config(lab: &Lab, root: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let (s, b) = vault(
            lab,
            reqwest::Method::GET,
            "auth/jwt-nomad/config",
            Some(root),
            None,
        )
        .await;
        if s == 200
            && b["data"]["jwks_url"]
                .as_str()
                .is_some_and(|u| !u.is_empty())
        {
            return b["data"].clone();
        }
        assert!(
            start.elapsed() < within,
            "auth/jwt-nomad/config not written within {within:?}: {s} {b}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A task's identity as the Nomad double signs it (its plumbing route, with the servers' gossip key).
async fn identity(
    lab: &Lab,
    namespace: &str,
    job: &str,
    audience: &str,
    issued_at: Option<i64>,
) -> String {
    let n = &lab.nodes[nodes_of(lab, Role::NomadServer)[0]];
    let gossip: Value =
        serde_json::from_slice(&std::fs::read(n.root.join("etc/nomad.d/gossip.json")).unwrap())
            .unwrap();
    let req = IdentityRequest {
        region: "global".into(),
        namespace: namespace.into(),
        job_id: job.into(),
        group: job.into(),
        task: "app".into(),
        alloc_id: hashistack_lab::nomad_double::uuid(),
        identity: "vault_default".into(),
        audience: vec![audience.into()],
        ttl_secs: 3600,
        issued_at,
    };
    let r = lab
        .https()
        .put(format!("https://{}:4646/v1/double/identity", n.def.ip))
        .header(
            "x-nomad-double-key",
            gossip["server"]["encrypt"].as_str().unwrap(),
        )
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    v["JWT"].as_str().unwrap().to_string()
}

async fn login(lab: &Lab, jwt: &str) -> (u16, Value) {
    vault(
        lab,
        reqwest::Method::POST,
        "auth/jwt-nomad/login",
        None,
        Some(json!({"jwt": jwt})),
    )
    .await
}

/// Logs in with `jwt` (asserted to succeed) and returns the Vault token and its policies.
async fn login_ok(lab: &Lab, jwt: &str) -> (String, Vec<String>, Value) {
    let (s, b) = login(lab, jwt).await;
    assert_eq!(s, 200, "login: {b}");
    let policies = serde_json::from_value(b["auth"]["token_policies"].clone()).unwrap();
    (
        b["auth"]["client_token"].as_str().unwrap().to_string(),
        policies,
        b["auth"]["metadata"].clone(),
    )
}

/// How many times the Vault servers' audit log (one file for the lab's cluster) recorded a write of
/// `auth/jwt-nomad/config`.
fn config_writes(lab: &Lab) -> usize {
    std::fs::read_to_string(lab.vault_audit_log())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["type"] == "request"
                && e["request"]["path"] == "auth/jwt-nomad/config"
                && matches!(
                    e["request"]["operation"].as_str(),
                    Some("update" | "create")
                )
        })
        .count()
}

/// The workload-identity step the node's boot record notes (its current agent's).
fn workload_identity_step(lab: &Lab, i: usize) -> Option<String> {
    lab.boot_record(i).and_then(|r| r.workload_identity)
}

/// Waits until the node's current agent has noted its workload-identity step; returns it.
async fn wait_workload_identity_step(lab: &Lab, i: usize, within: Duration) -> String {
    let pid = lab.nodes[i]
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .expect("agent running");
    let start = Instant::now();
    loop {
        if let Some(r) = lab.boot_record(i).filter(|r| r.pid == pid) {
            if let Some(step) = r.workload_identity {
                return step;
            }
            assert!(
                r.last_error.is_none() || r.ok,
                "{}: {:?}",
                lab.nodes[i].def.name,
                r.last_error
            );
        }
        assert!(
            start.elapsed() < within,
            "{}: no workload identity step within {within:?}",
            lab.nodes[i].def.name
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_identity_reads_its_own_secrets_and_nothing_else() {
    let mut o = options("workload-identity", 130);
    o.vault_servers = 1;
    o.nomad_servers = 1;
    o.jumpbox = Some(false);
    let mut lab = healthy_lab(o).await;
    let root = root_token(&mut lab).await;

    // The auth method's configuration: the Nomad servers' JWKS, verified with the cluster CA; Nomad's algorithms
    // and default role.
    let cfg = wait_config(&lab, &root, Duration::from_secs(90)).await;
    assert_eq!(
        cfg["jwks_url"],
        format!(
            "{}/.well-known/jwks.json",
            lab.opts.nomad_address().unwrap()
        )
    );
    assert_eq!(
        cfg["jwks_ca_pem"].as_str().unwrap().trim(),
        lab.cluster_ca().unwrap().trim()
    );
    assert_eq!(cfg["default_role"], "nomad-workloads");
    let mut algs: Vec<String> = serde_json::from_value(cfg["jwt_supported_algs"].clone()).unwrap();
    algs.sort();
    assert_eq!(algs, ["EdDSA", "RS256"]);
    // Nomad's documented default role.
    let (s, role) = vault(
        &lab,
        reqwest::Method::GET,
        "auth/jwt-nomad/role/nomad-workloads",
        Some(&root),
        None,
    )
    .await;
    assert_eq!(s, 200, "{role}");
    assert_eq!(role["data"]["bound_audiences"], json!(["vault.io"]));
    assert_eq!(role["data"]["user_claim"], "/nomad_job_id");
    assert_eq!(role["data"]["user_claim_json_pointer"], true);
    assert_eq!(role["data"]["token_policies"], json!(["nomad-workloads"]));
    assert_eq!(
        role["data"]["claim_mappings"],
        json!({"nomad_namespace": "nomad_namespace", "nomad_job_id": "nomad_job_id", "nomad_task": "nomad_task"})
    );

    // The configuration token: in the servers vault only, and it can do nothing but the auth method's config.
    let kv = lab.keyvault.as_ref().unwrap();
    let config_token = kv
        .vault(SERVERS_VAULT)
        .unwrap()
        .secret_value(&nomad_jwt_token_secret(&lab.opts.cluster))
        .expect("the configuration token in the servers vault");
    let (s, b) = vault(
        &lab,
        reqwest::Method::POST,
        "auth/token/lookup",
        Some(&root),
        Some(json!({"token": config_token})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["data"]["policies"],
        json!(["hashistack-nomad-jwt-config"]),
        "{b}"
    );
    assert!(b["data"]["period"].as_u64().unwrap() > 0, "periodic: {b}");
    for (method, path, body) in [
        (
            reqwest::Method::POST,
            "auth/jwt-nomad/role/nomad-workloads",
            Some(json!({"token_policies": ["root"]})),
        ),
        (
            reqwest::Method::PUT,
            "sys/policies/acl/nomad-workloads",
            Some(json!({"policy": "path \"*\" { capabilities = [\"sudo\"] }"})),
        ),
        (
            reqwest::Method::GET,
            "secret/data/default/job-a/config",
            None,
        ),
    ] {
        let (s, b) = vault(&lab, method.clone(), path, Some(&config_token), body).await;
        assert_eq!(
            s, 403,
            "the configuration token must not {method} {path}: {b}"
        );
    }

    // Each job's secrets, written by an operator (root).
    for job in ["job-a", "job-b"] {
        let (s, b) = vault(
            &lab,
            reqwest::Method::POST,
            &format!("secret/data/default/{job}/config"),
            Some(&root),
            Some(json!({"data": {"password": format!("{job}-password")}})),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }

    // Job A's identity: logs in to the default role, reads its own secret, not job B's.
    let jwt_a = identity(&lab, "default", "job-a", "vault.io", None).await;
    let (token_a, policies, meta) = login_ok(&lab, &jwt_a).await;
    assert_eq!(
        policies,
        ["default", "nomad-workloads"],
        "Vault adds its default policy, as Nomad's role leaves it"
    );
    assert_eq!(meta["nomad_job_id"], "job-a", "{meta}");
    assert_eq!(meta["nomad_namespace"], "default", "{meta}");
    assert_eq!(meta["nomad_task"], "app", "{meta}");
    let (s, b) = vault(
        &lab,
        reqwest::Method::GET,
        "secret/data/default/job-a/config",
        Some(&token_a),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["data"]["password"], "job-a-password");
    let (s, b) = vault(
        &lab,
        reqwest::Method::GET,
        "secret/data/default/job-b/config",
        Some(&token_a),
        None,
    )
    .await;
    assert_eq!(s, 403, "job A read job B's secret: {b}");
    let (s, b) = vault(
        &lab,
        reqwest::Method::POST,
        "secret/data/default/job-a/config",
        Some(&token_a),
        Some(json!({"data": {"password": "overwritten"}})),
    )
    .await;
    assert_eq!(s, 403, "a job only reads its secrets: {b}");
    // And the other way round.
    let jwt_b = identity(&lab, "default", "job-b", "vault.io", None).await;
    let (token_b, _, _) = login_ok(&lab, &jwt_b).await;
    let (s, _) = vault(
        &lab,
        reqwest::Method::GET,
        "secret/data/default/job-b/config",
        Some(&token_b),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = vault(
        &lab,
        reqwest::Method::GET,
        "secret/data/default/job-a/config",
        Some(&token_b),
        None,
    )
    .await;
    assert_eq!(s, 403);
    // The same job id in another namespace is another path.
    let jwt_other_ns = identity(&lab, "team-x", "job-a", "vault.io", None).await;
    let (token_x, _, _) = login_ok(&lab, &jwt_other_ns).await;
    let (s, _) = vault(
        &lab,
        reqwest::Method::GET,
        "secret/data/default/job-a/config",
        Some(&token_x),
        None,
    )
    .await;
    assert_eq!(s, 403, "namespace team-x must not read default's job-a");

    // Refused: an identity that expired an hour ago, one for Nomad's own audience, one signed by another key
    // (same key ID), and no identity at all.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expired = identity(&lab, "default", "job-a", "vault.io", Some(now - 7200)).await;
    let (s, b) = login(&lab, &expired).await;
    assert!(matches!(s, 400 | 403), "expired identity accepted: {s} {b}");
    assert!(b.to_string().contains("expired"), "{b}");
    let wrong_aud = identity(&lab, "default", "job-a", "nomadproject.io", None).await;
    let (s, b) = login(&lab, &wrong_aud).await;
    assert!(matches!(s, 400 | 403), "wrong audience accepted: {s} {b}");
    assert!(b.to_string().contains("aud"), "{b}");
    let header: Value = {
        use base64::Engine;
        let h = jwt_a.split('.').next().unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .unwrap(),
        )
        .unwrap()
    };
    let forger = RootKey::generate(header["kid"].as_str().unwrap().to_string());
    let req = IdentityRequest {
        region: "global".into(),
        namespace: "default".into(),
        job_id: "job-a".into(),
        group: "job-a".into(),
        task: "app".into(),
        alloc_id: hashistack_lab::nomad_double::uuid(),
        identity: "vault_default".into(),
        audience: vec!["vault.io".into()],
        ttl_secs: 3600,
        issued_at: None,
    };
    let forged = forger.sign(&claims(&req, now, "forged")).unwrap();
    let (s, b) = login(&lab, &forged).await;
    assert!(matches!(s, 400 | 403), "forged identity accepted: {s} {b}");
    let (s, b) = login(&lab, "").await;
    assert!(matches!(s, 400 | 403), "{s} {b}");

    // The Nomad agents' vault block: servers sign the default identity for vault.io; (no Vault token anywhere).
    let n = &lab.nodes[nodes_of(&lab, Role::NomadServer)[0]];
    let nomad: Value =
        serde_json::from_slice(&std::fs::read(n.root.join("etc/nomad.d/nomad.json")).unwrap())
            .unwrap();
    assert_eq!(
        nomad["vault"],
        json!({"enabled": true, "default_identity": {"aud": ["vault.io"], "ttl": "1h"}})
    );
    lab.down().await;
}

/// Boots Consul, then `first` (a tier), waits until it is done, checks nothing configured the auth method's
/// JWKS yet, then boots the other tier: the configuration appears. A reboot of every Vault and Nomad server
/// then writes nothing.
async fn tiers_in_order(name: &str, net: u8, first: Role) {
    let mut o = options(name, net);
    o.vault_servers = 1;
    o.nomad_servers = 1;
    o.jumpbox = Some(false);
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    let second = if first == Role::VaultServer {
        Role::NomadServer
    } else {
        Role::VaultServer
    };
    let tier = |r: Role| {
        if r == Role::VaultServer {
            "vault"
        } else {
            "nomad"
        }
    };
    for i in nodes_of(&lab, Role::ConsulServer)
        .into_iter()
        .chain(nodes_of(&lab, first))
    {
        lab.start_agent(i).unwrap();
    }
    let start = Instant::now();
    while lab.tier_state(tier(first)).await.map(|s| s.phase)
        != Some(hashistack_agent::coordination::TierPhase::Done)
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} tier not done",
            tier(first)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for i in nodes_of(&lab, first) {
        let step = wait_workload_identity_step(&lab, i, Duration::from_secs(120)).await;
        assert_eq!(
            step,
            format!("waiting for the {} tier", tier(second)),
            "{}",
            lab.nodes[i].def.name
        );
    }
    // The first tier's nodes finished their boot without configuring anything (the other tier is not done).
    // The operator's IMDS is made once per lab: the root token is opened once, when the Vault tier is done.
    let mut root = None;
    if first == Role::VaultServer {
        let r = root.insert(root_token(&mut lab).await).clone();
        let (s, b) = vault(
            &lab,
            reqwest::Method::GET,
            "auth/jwt-nomad/config",
            Some(&r),
            None,
        )
        .await;
        assert!(
            s == 404
                || b["data"]["jwks_url"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
            "configured before the Nomad tier was done: {s} {b}"
        );
    }
    assert_eq!(config_writes(&lab), 0);
    for i in nodes_of(&lab, second) {
        lab.start_agent(i).unwrap();
    }
    wait_healthy(&lab, Duration::from_secs(150)).await;
    let root = match root {
        Some(r) => r,
        None => root_token(&mut lab).await,
    };
    let cfg = wait_config(&lab, &root, Duration::from_secs(90)).await;
    assert_eq!(
        cfg["jwks_url"],
        format!(
            "{}/.well-known/jwks.json",
            lab.opts.nomad_address().unwrap()
        )
    );
    let writes = config_writes(&lab);
    assert_eq!(writes, 1, "written once, by the tier that finished last");
    let jwt = identity(&lab, "default", "web", "vault.io", None).await;
    login_ok(&lab, &jwt).await;

    // The node that finished last wrote it; the first tier's nodes had found the other tier not done.
    let seen: Vec<Option<String>> = nodes_of(&lab, second)
        .into_iter()
        .map(|i| workload_identity_step(&lab, i))
        .collect();
    assert!(seen.contains(&Some("written".into())), "{seen:?}");

    // Reboots: both tiers see both done and find the configuration in place.
    for i in nodes_of(&lab, Role::VaultServer)
        .into_iter()
        .chain(nodes_of(&lab, Role::NomadServer))
    {
        lab.reboot(i).await.unwrap();
        let step = wait_workload_identity_step(&lab, i, Duration::from_secs(150)).await;
        assert_eq!(step, "unchanged", "{}", lab.nodes[i].def.name);
    }
    assert_eq!(
        config_writes(&lab),
        writes,
        "a reboot wrote the configuration again"
    );
    let jwt = identity(&lab, "default", "web", "vault.io", None).await;
    login_ok(&lab, &jwt).await;
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_first_then_nomad_configures_once_and_reboots_write_nothing() {
    tiers_in_order("wi-vault-first", 131, Role::VaultServer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_first_then_vault_configures_once_and_reboots_write_nothing() {
    tiers_in_order("wi-nomad-first", 132, Role::NomadServer).await;
}
