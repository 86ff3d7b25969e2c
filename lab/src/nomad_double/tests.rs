//! The double in-process over HTTPS: servers, a client, registration (mTLS), heartbeats, ACL enforcement.

use super::*;

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    ca: hashistack_agent::tls::ClusterCa,
}

impl Pki {
    fn new() -> Pki {
        let now = time::OffsetDateTime::now_utc();
        let (ca_pem, ca_key) =
            hashistack_agent::tls::generate_ca("double test CA", 1, now).unwrap();
        let ca = hashistack_agent::tls::ClusterCa::from_pem(&ca_pem, &ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        Pki { dir, ca_pem, ca }
    }
    /// A node certificate for `ip`: (cert path, key path).
    fn issue(&self, name: &str, ip: IpAddr) -> (PathBuf, PathBuf) {
        let c = self
            .ca
            .issue(name, &[ip.to_string()], 1, time::OffsetDateTime::now_utc())
            .unwrap();
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key = self.dir.path().join(format!("{name}-key.pem"));
        std::fs::write(&cert, &c.cert_pem).unwrap();
        std::fs::write(&key, &c.key_pem).unwrap();
        (cert, key)
    }
    /// A node certificate and key for `ip`, as one PEM client identity.
    fn identity(&self, name: &str, ip: IpAddr) -> Vec<u8> {
        let (cert, key) = self.issue(name, ip);
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        pem
    }
    fn tls(&self, name: &str, ip: IpAddr) -> Value {
        let (cert, key) = self.issue(name, ip);
        json!({"http": true, "cert_file": cert, "key_file": key,
               "ca_file": self.dir.path().join("ca.pem")})
    }
    /// An API client trusting the CA, with `identity` (PEM cert + key) as its client certificate.
    fn http(&self, identity: Option<Vec<u8>>) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()]);
        if let Some(id) = identity {
            b = b.identity(reqwest::Identity::from_pem(&id).unwrap());
        }
        b.build().unwrap()
    }
}

/// An agent running in-process: its stop signal and its task.
type Running = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), String>>,
);

fn start(cfg: Config) -> Running {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(run(cfg, async move {
        let _ = rx.await;
    }));
    (tx, h)
}

/// Stops the agents, each cleanly.
async fn stop(agents: impl IntoIterator<Item = Running>) {
    for (tx, h) in agents {
        let _ = tx.send(());
        h.await.unwrap().unwrap();
    }
}

async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, String) {
    let mut rb = http.get(url);
    if let Some(t) = token {
        rb = rb.header("X-Nomad-Token", t);
    }
    match rb.send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap()),
        Err(e) => (0, e.to_string()),
    }
}

async fn put(http: &reqwest::Client, url: &str, token: Option<&str>, body: Value) -> (u16, String) {
    let mut rb = http.put(url).json(&body);
    if let Some(t) = token {
        rb = rb.header("X-Nomad-Token", t);
    }
    let r = rb.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The leader that all three servers (`url(i, path)`, i = 0..3) name alike, within 20 s.
async fn common_leader(
    http: &reqwest::Client,
    url: &impl Fn(usize, &str) -> String,
    what: &str,
) -> String {
    eventually(what, Duration::from_secs(20), || async {
        let mut seen = Vec::new();
        for i in 0..3 {
            if let (200, body) = get(http, &url(i, "/v1/status/leader"), None).await {
                seen.push(serde_json::from_str::<String>(&body).unwrap());
            }
        }
        (seen.len() == 3 && seen.iter().all(|l| *l == seen[0])).then(|| seen[0].clone())
    })
    .await
}

/// Three in-process servers over HTTPS: one leader everywhere, bootstrap forwarded from followers,
/// state replicated and kept over a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_agree_forward_and_persist() {
    let pki = Pki::new();
    let ips: Vec<IpAddr> = (31..34)
        .map(|h| format!("127.63.0.{h}").parse().unwrap())
        .collect();
    let port = 24646;
    let cfg_for = |i: usize| {
        Config::from_value(&json!({
            "name": format!("n{i}"), "bind_addr": ips[i].to_string(), "ports": {"http": port},
            "data_dir": pki.dir.path().join(format!("data{i}")).display().to_string(),
            "acl": {"enabled": true},
            "server": {"enabled": true, "bootstrap_expect": 3, "encrypt": "k",
                       "server_join": {"retry_join": ips.iter().map(|i| i.to_string()).collect::<Vec<_>>()}},
            "tls": pki.tls(&format!("n{i}"), ips[i]),
        }))
        .unwrap()
    };
    let http = pki.http(None);
    let url = |i: usize, p: &str| format!("https://{}:{port}{p}", ips[i]);
    let mut nodes = vec![start(cfg_for(0)), start(cfg_for(1))];
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Two of three expected: no leader, and a bootstrap is refused as retryable.
    assert_eq!(
        get(&http, &url(0, "/v1/status/leader"), None).await,
        (500, "No cluster leader".into())
    );
    nodes.push(start(cfg_for(2)));
    let leader = common_leader(&http, &url, "a common leader").await;
    assert_eq!(leader, "127.63.0.31:4647");
    let (_, body) = get(&http, &url(2, "/v1/status/peers"), None).await;
    assert_eq!(serde_json::from_str::<Vec<String>>(&body).unwrap().len(), 3);
    // Bootstrap through a follower: forwarded to the leader.
    let secret = uuid();
    let r = http
        .post(url(2, "/v1/acl/bootstrap"))
        .json(&json!({ "BootstrapSecret": secret }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["SecretID"], secret.as_str());
    assert_eq!(t["Type"], "management");
    for i in 0..3 {
        let r = http.put(url(i, "/v1/acl/bootstrap")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        assert!(r
            .text()
            .await
            .unwrap()
            .starts_with("ACL bootstrap already done (reset index: "));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    for i in 0..3 {
        let (st, _) = get(&http, &url(i, "/v1/acl/token/self"), Some(&secret)).await;
        assert_eq!(st, 200, "token/self on n{i}");
        assert_eq!(get(&http, &url(i, "/v1/agent/self"), None).await.0, 403);
    }
    let (st, _) = get(&http, &url(1, "/v1/acl/token/self"), Some(&uuid())).await;
    assert_eq!(st, 403);
    // A client that knows only a follower registers through it (forwarded to the leader, with the
    // follower's own client certificate); every server lists the node.
    let client_ip: IpAddr = "127.63.0.41".parse().unwrap();
    let client = start(
        Config::from_value(&json!({
            "name": "worker-0", "bind_addr": client_ip.to_string(), "ports": {"http": port},
            "data_dir": pki.dir.path().join("client").display().to_string(), "acl": {"enabled": true},
            "client": {"enabled": true, "server_join": {"retry_join": [ips[2].to_string()]}},
            "tls": pki.tls("w", client_ip),
        }))
        .unwrap(),
    );
    eventually("the node replicated", Duration::from_secs(30), || async {
        let mut ready = 0;
        for i in 0..3 {
            let (_, body) = get(&http, &url(i, "/v1/nodes"), Some(&secret)).await;
            let v: Vec<Value> = serde_json::from_str(&body).unwrap();
            if v.len() == 1 && v[0]["Status"] == "ready" && v[0]["Name"] == "worker-0" {
                ready += 1;
            }
        }
        (ready == 3).then_some(())
    })
    .await;
    stop([client]).await;
    // Stop everything, start again: the ACL state survived.
    stop(nodes).await;
    let nodes = [start(cfg_for(0)), start(cfg_for(1)), start(cfg_for(2))];
    let (st, _) = eventually(
        "a leader after restart",
        Duration::from_secs(40),
        || async {
            let r = http.put(url(1, "/v1/acl/bootstrap")).send().await.unwrap();
            let st = r.status().as_u16();
            (st != 500).then_some((st, r.text().await.unwrap()))
        },
    )
    .await;
    assert_eq!(st, 400, "still bootstrapped after restart");
    let (st, body) = get(&http, &url(0, "/v1/agent/members"), Some(&secret)).await;
    assert_eq!(st, 200);
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["Members"].as_array().unwrap().len(), 3);
    let (_, body) = get(&http, &url(1, "/v1/nodes"), Some(&secret)).await;
    let v: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(v.len(), 1, "the node survived the restart: {v:?}");
    stop(nodes).await;
}

/// Held closed until the test below opens it: the slow root-key generator waits for it.
static KEYGEN_GATE: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

fn gated_keygen(id: String) -> crate::nomad_identity::RootKey {
    let (open, cv) = &KEYGEN_GATE;
    let mut g = open.lock().unwrap();
    while !*g {
        g = cv.wait(g).unwrap();
    }
    crate::nomad_identity::RootKey::generate(id)
}

/// As Nomad's leader (`go s.initializeKeyring(stopCh)` in establishLeadership), the double's leader makes its
/// root key in the background: a leader is named and the ACL bootstrap answered while the key is still being
/// made, and the key is there (and signs) once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_and_the_acl_bootstrap_do_not_wait_for_the_keyring() {
    let pki = Pki::new();
    let ips: Vec<IpAddr> = (31..34)
        .map(|h| format!("127.65.0.{h}").parse().unwrap())
        .collect();
    let port = 24646;
    let http = pki.http(None);
    let url = |i: usize, p: &str| format!("https://{}:{port}{p}", ips[i]);
    // Opened at the latest after 30 s, so that a double whose leader waits for its key (and blocks its runtime
    // meanwhile) fails the first assertion below instead of hanging.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(30));
        let (open, cv) = &KEYGEN_GATE;
        *open.lock().unwrap() = true;
        cv.notify_all();
    });
    let mut nodes = vec![];
    for i in 0..3 {
        let cfg = Config::from_value(&json!({
            "name": format!("k{i}"), "bind_addr": ips[i].to_string(), "ports": {"http": port},
            "data_dir": pki.dir.path().join(format!("data{i}")).display().to_string(),
            "acl": {"enabled": true},
            "server": {"enabled": true, "bootstrap_expect": 3, "encrypt": "k",
                       "server_join": {"retry_join": ips.iter().map(|i| i.to_string()).collect::<Vec<_>>()}},
            "tls": pki.tls(&format!("k{i}"), ips[i]),
        }))
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(run_with(
            cfg,
            async move {
                let _ = rx.await;
            },
            gated_keygen,
        ));
        nodes.push((tx, h));
    }
    // Every server names the leader (a follower that has not seen it yet answers "No cluster leader").
    let leader = common_leader(&http, &url, "a leader while the key is being made").await;
    assert_eq!(leader, "127.65.0.31:4647");
    let r = http.post(url(1, "/v1/acl/bootstrap")).send().await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "the ACL bootstrap while the key is being made"
    );
    let (st, jwks) = get(&http, &url(0, "/.well-known/jwks.json"), None).await;
    assert_eq!(st, 200);
    let keys = |body: &str| {
        serde_json::from_str::<Value>(body).unwrap()["keys"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(keys(&jwks), 0, "no root key yet: {jwks}");
    {
        let (open, cv) = &KEYGEN_GATE;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
    for i in 0..3 {
        eventually(
            "the root key, on every server",
            Duration::from_secs(20),
            || async {
                let (st, body) = get(&http, &url(i, "/.well-known/jwks.json"), None).await;
                (st == 200 && keys(&body) == 1).then_some(())
            },
        )
        .await;
    }
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_registers_over_mtls_heartbeats_goes_down_and_acls_are_enforced() {
    let pki = Pki::new();
    let port = 24647;
    let server_ip: IpAddr = "127.64.0.31".parse().unwrap();
    let client_ip: IpAddr = "127.64.0.41".parse().unwrap();
    let data = |n: &str| pki.dir.path().join(n).display().to_string();
    let server_cfg = Config::from_value(&json!({
        "name": "nomad-0", "bind_addr": server_ip.to_string(), "ports": {"http": port},
        "data_dir": data("server"), "acl": {"enabled": true},
        "server": {"enabled": true, "bootstrap_expect": 1, "encrypt": "k",
                   "min_heartbeat_ttl": "400ms", "heartbeat_grace": "200ms",
                   "server_join": {"retry_join": [server_ip.to_string()]}},
        "tls": pki.tls("nomad-0", server_ip),
    }))
    .unwrap();
    let client_cfg = || {
        Config::from_value(&json!({
            "name": "worker-0", "bind_addr": client_ip.to_string(), "ports": {"http": port},
            "datacenter": "dc2", "data_dir": data("client"), "acl": {"enabled": true},
            "client": {"enabled": true, "node_class": "batch",
                       "server_join": {"retry_join": [server_ip.to_string()]}},
            "tls": pki.tls("worker-0", client_ip),
        }))
        .unwrap()
    };
    let http = pki.http(None);
    let s = |p: &str| format!("https://{server_ip}:{port}{p}");
    let c = |p: &str| format!("https://{client_ip}:{port}{p}");
    let server = start(server_cfg);
    eventually("a leader", Duration::from_secs(10), || async {
        (get(&http, &s("/v1/status/leader"), None).await.0 == 200).then_some(())
    })
    .await;
    let mgmt = uuid();
    let (st, _) = put(
        &http,
        &s("/v1/acl/bootstrap"),
        None,
        json!({"BootstrapSecret": mgmt}),
    )
    .await;
    assert_eq!(st, 200);
    // Without a token, or with an unknown one: refused.
    assert_eq!(
        get(&http, &s("/v1/nodes"), None).await,
        (403, "Permission denied".into())
    );
    assert_eq!(
        get(&http, &s("/v1/nodes"), Some(&uuid())).await,
        (403, "ACL token not found".into())
    );

    // The client registers with its CA-signed certificate and shows `ready`.
    let client = start(client_cfg());
    let nodes: Vec<Value> =
        eventually("the client node ready", Duration::from_secs(10), || async {
            let (st, body) = get(&http, &s("/v1/nodes"), Some(&mgmt)).await;
            assert_eq!(st, 200, "{body}");
            let v: Vec<Value> = serde_json::from_str(&body).unwrap();
            (v.len() == 1 && v[0]["Status"] == "ready").then_some(v)
        })
        .await;
    let n = &nodes[0];
    assert_eq!(
        (
            &n["Name"],
            &n["Datacenter"],
            &n["NodeClass"],
            &n["Drain"],
            &n["SchedulingEligibility"],
            &n["Version"]
        ),
        (
            &json!("worker-0"),
            &json!("dc2"),
            &json!("batch"),
            &json!(false),
            &json!("eligible"),
            &json!(VERSION)
        )
    );
    let id = n["ID"].as_str().unwrap().to_string();
    assert!(is_uuid(&id));
    assert_eq!(
        std::fs::read_to_string(pki.dir.path().join("client/client/client-id")).unwrap(),
        id,
        "the node ID is persisted under <data_dir>/client"
    );
    let (st, body) = get(&http, &s(&format!("/v1/node/{id}")), Some(&mgmt)).await;
    assert_eq!(st, 200);
    let full: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(full["ID"], id.as_str());
    assert!(
        full.get("SecretID").is_none(),
        "never the node secret: {full}"
    );
    assert_eq!(
        get(&http, &s(&format!("/v1/node/{}", uuid())), Some(&mgmt)).await,
        (404, "node not found".into())
    );

    // Registration without a client certificate, or with one from another CA, is refused.
    let reg = json!({"ID": uuid(), "SecretID": uuid(), "Name": "rogue", "Datacenter": "dc1",
                     "NodeClass": "", "HTTPAddr": "127.64.0.99:4646", "Address": "127.64.0.99",
                     "TLSEnabled": true, "Version": VERSION});
    let (st, body) = put(&http, &s(NODE_PATH), None, reg.clone()).await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    let other = Pki::new();
    let rogue = pki.http(Some(
        other.identity("rogue", "127.64.0.99".parse().unwrap()),
    ));
    let r = rogue.put(s(NODE_PATH)).json(&reg).send().await;
    assert!(
        r.is_err(),
        "a certificate from another CA fails the handshake: {r:?}"
    );
    // A CA-signed certificate cannot take over a registered node ID without its secret.
    let signed = pki.http(Some(
        pki.identity("worker-x", "127.64.0.98".parse().unwrap()),
    ));
    let mut hijack = reg.clone();
    hijack["ID"] = json!(id);
    let (st, body) = put(&signed, &s(NODE_PATH), None, hijack).await;
    assert_eq!(
        (st, body.as_str()),
        (400, "node secret ID does not match. Not registering node.")
    );
    assert_eq!(
        get(&http, &s("/v1/nodes"), Some(&mgmt))
            .await
            .1
            .matches("\"ID\"")
            .count(),
        1,
        "no rogue node"
    );

    // Policies and a client token with node:read only.
    let (st, body) = put(
        &http,
        &s("/v1/acl/policy/nodes"),
        Some(&mgmt),
        json!({"Name": "nodes", "Description": "node read", "Rules": "node { policy = \"read\" }"}),
    )
    .await;
    assert_eq!((st, body.as_str()), (200, ""));
    let (st, body) = put(
        &http,
        &s("/v1/acl/policy/status-read"),
        Some(&mgmt),
        json!({"Name": "status-read", "Description": "", "Rules": STATUS_RULES}),
    )
    .await;
    assert_eq!((st, body.as_str()), (200, ""));
    let (st, body) = put(
        &http,
        &s("/v1/acl/policy/other"),
        Some(&mgmt),
        json!({"Name": "nodes", "Rules": "node { policy = \"read\" }"}),
    )
    .await;
    assert_eq!(
        (st, body.as_str()),
        (400, "ACL policy name does not match request path")
    );
    let (st, body) = put(
        &http,
        &s("/v1/acl/policy/bad"),
        Some(&mgmt),
        json!({"Name": "bad", "Rules": "node { policy = \"reed\" }"}),
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        body.starts_with(
            "policy 0 invalid: 1 error occurred:\n\t* failed to parse rules: Invalid node policy"
        ),
        "{body}"
    );
    let (st, body) = put(
        &http,
        &s("/v1/acl/token"),
        Some(&mgmt),
        json!({"Name": "nodes reader", "Type": "client", "Policies": ["nodes"]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let reader: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&reader["Type"], &reader["Policies"]),
        (&json!("client"), &json!(["nodes"]))
    );
    let rt = reader["SecretID"].as_str().unwrap();
    let (st, body) = get(&http, &s("/v1/acl/token/self"), Some(rt)).await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["Policies"],
        json!(["nodes"])
    );

    // It reaches the nodes, and nothing else.
    assert_eq!(get(&http, &s("/v1/nodes"), Some(rt)).await.0, 200);
    assert_eq!(
        get(&http, &s(&format!("/v1/node/{id}")), Some(rt)).await.0,
        200
    );
    assert_eq!(get(&http, &s("/v1/agent/members"), Some(rt)).await.0, 200);
    for p in [
        "/v1/agent/self",
        "/v1/operator/raft/configuration",
        "/v1/acl/tokens",
    ] {
        assert_eq!(
            get(&http, &s(p), Some(rt)).await,
            (403, "Permission denied".into()),
            "{p}"
        );
    }
    let (st, body) = put(
        &http,
        &s("/v1/acl/token"),
        Some(rt),
        json!({"Name": "escalate", "Type": "management"}),
    )
    .await;
    assert_eq!((st, body.as_str()), (403, "Permission denied"));
    let (st, body) = put(
        &http,
        &s("/v1/acl/policy/nodes"),
        Some(rt),
        json!({"Name": "nodes", "Rules": "node { policy = \"write\" }"}),
    )
    .await;
    assert_eq!((st, body.as_str()), (403, "Permission denied"));
    let (st, body) = get(&http, &s("/v1/acl/policies"), Some(rt)).await;
    assert_eq!(st, 200);
    let names: Vec<Value> = serde_json::from_str::<Vec<Value>>(&body)
        .unwrap()
        .into_iter()
        .map(|p| p["Name"].clone())
        .collect();
    assert_eq!(
        names,
        vec![json!("nodes")],
        "a client token lists its own policies only"
    );
    assert_eq!(
        get(&http, &s("/v1/acl/policy/status-read"), Some(rt))
            .await
            .0,
        403
    );

    // The status policy: agent and operator read too.
    let (_, body) = put(
        &http,
        &s("/v1/acl/token"),
        Some(&mgmt),
        json!({"Name": "status", "Type": "client", "Policies": ["status-read"]}),
    )
    .await;
    let status: Value = serde_json::from_str(&body).unwrap();
    let stt = status["SecretID"].as_str().unwrap();
    assert_eq!(get(&http, &s("/v1/agent/self"), Some(stt)).await.0, 200);
    let (st, body) = get(&http, &s("/v1/operator/raft/configuration"), Some(stt)).await;
    assert_eq!(st, 200);
    let raft: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(raft["Servers"][0]["Leader"], true);
    assert_eq!(raft["Servers"][0]["Address"], format!("{server_ip}:4647"));
    // Token reads: management sees all (no secrets in the list); a client token only itself.
    let (st, body) = get(&http, &s("/v1/acl/tokens"), Some(&mgmt)).await;
    assert_eq!(st, 200);
    assert!(
        !body.contains("SecretID") && body.contains("nodes reader"),
        "{body}"
    );
    let acc = reader["AccessorID"].as_str().unwrap();
    assert_eq!(
        get(&http, &s(&format!("/v1/acl/token/{acc}")), Some(rt))
            .await
            .0,
        200
    );
    assert_eq!(
        get(&http, &s(&format!("/v1/acl/token/{acc}")), Some(stt))
            .await
            .0,
        403
    );

    // Through the client agent: cluster routes are forwarded, its own agent/self is checked remotely.
    assert_eq!(get(&http, &c("/v1/nodes"), Some(rt)).await.0, 200);
    assert_eq!(get(&http, &c("/v1/agent/self"), Some(rt)).await.0, 403);
    assert_eq!(get(&http, &c("/v1/agent/self"), Some(stt)).await.0, 200);

    // Heartbeats stop: the node goes down after TTL + grace (600 ms here), not before.
    stop([client]).await;
    let stopped = std::time::Instant::now();
    let node_status = || async {
        let (_, body) = get(&http, &s(&format!("/v1/node/{id}")), Some(&mgmt)).await;
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let down = eventually("the node down", Duration::from_secs(5), || async {
        let n = node_status().await;
        (n["Status"] == "down").then_some(n)
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(400),
        "down too early: {:?}",
        stopped.elapsed()
    );
    assert!(
        down["Events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["Message"] == "Node heartbeat missed"),
        "{down}"
    );
    // The client comes back with the same node ID: ready again.
    let client = start(client_cfg());
    let back = eventually("the node ready again", Duration::from_secs(10), || async {
        let n = node_status().await;
        (n["Status"] == "ready").then_some(n)
    })
    .await;
    assert!(
        back["Events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["Message"] == "Node reregistered by heartbeat"),
        "{back}"
    );
    let (st, body) = get(&http, &s("/v1/nodes"), Some(&mgmt)).await;
    assert_eq!(
        (st, serde_json::from_str::<Vec<Value>>(&body).unwrap().len()),
        (200, 1)
    );
    stop([client, server]).await;
}
