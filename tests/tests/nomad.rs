//! End-to-end Nomad tier: ACL bootstrap with a `BootstrapSecret` escrowed before use, exactly once among
//! the Nomad servers, recoverable by operators; a leader killed right after the bootstrap call leaves the
//! tier recoverable from the escrow made before the call; the read-only status token the bootstrap creates
//! (a client token: node, agent and operator read, no ACL writes), and `hashistack-agent status` counting
//! the workers' Nomad clients ready, then down when one stops heartbeating. Nomad ≥ 1.7 cannot be
//! installed here, so the lab runs the Nomad contract double (lab/src/nomad_double/) through
//! `<state_dir>/bin/nomad`; a real `nomad` on PATH is exercised as well when there is one.

use hashistack_agent::bootstrap::CrashPoint;
use hashistack_agent::names::{NOMAD_POLICY, NOMAD_SECRET, NOMAD_TOKEN_NAME};
use hashistack_agent::node::Role;
use hashistack_e2e::{
    assert_done_once, count_outcome, escrow_cmd, escrow_open, files_containing, get_as,
    healthy_lab, jumpbox_status, nodes_of, options, tools, wait_healthy,
};
use hashistack_lab::Lab;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn nomad_ips(lab: &Lab) -> Vec<std::net::Ipv4Addr> {
    nodes_of(lab, Role::NomadServer)
        .into_iter()
        .map(|i| lab.nodes[i].def.ip)
        .collect()
}

/// `escrow open --tier nomad` as the operator: the secret, which must authenticate as a management token on
/// every Nomad server.
async fn recovered_secret_works(lab: &Lab, operator: &str) -> String {
    let v: Value = serde_json::from_slice(&escrow_open(lab, operator, "nomad")).unwrap();
    assert_eq!(v["kind"], "nomad-acl-bootstrap");
    let secret = v["secret_id"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 36, "a UUID");
    let http = lab.https();
    for ip in nomad_ips(lab) {
        let (status, t) = get_as(
            lab,
            &format!("https://{ip}:4646/v1/acl/token/self"),
            "X-Nomad-Token",
            &secret,
        )
        .await;
        assert_eq!(status, 200, "recovered token on {ip}");
        let t: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(t["Type"], "management");
        assert_eq!(t["SecretID"], secret.as_str());
        // And nobody can bootstrap again.
        let r = http
            .post(format!("https://{ip}:4646/v1/acl/bootstrap"))
            .send()
            .await
            .unwrap();
        let (status, body) = (r.status().as_u16(), r.text().await.unwrap());
        assert!(
            body.contains("ACL bootstrap already done (reset index: "),
            "{ip}: HTTP {status} {body}"
        );
    }
    secret
}

async fn nomad_lab_bootstraps_once(name: &str, net: u8, nomad_bin: Option<PathBuf>) {
    let mut o = options(name, net);
    o.nomad_servers = 3;
    o.nomad_bin = nomad_bin;
    let mut lab = healthy_lab(o).await;
    assert_eq!(count_outcome(&lab, Role::NomadServer, "bootstrapped"), 1);
    assert_eq!(count_outcome(&lab, Role::NomadServer, "already-done"), 2);
    assert_done_once(&lab, "nomad").await;
    // The other tiers are unaffected.
    assert_eq!(count_outcome(&lab, Role::ConsulServer, "bootstrapped"), 1);
    assert_eq!(count_outcome(&lab, Role::VaultServer, "bootstrapped"), 1);

    // The leader escrowed the secret before it sent it (its log says so, in that order).
    let leader = (0..lab.nodes.len())
        .find(|&i| {
            lab.boot_record(i).and_then(|r| r.bootstrap).as_deref() == Some("bootstrapped")
                && lab.nodes[i].def.role == Role::NomadServer
        })
        .unwrap();
    let log = std::fs::read_to_string(
        lab.opts
            .state_dir
            .join(format!("logs/agent-{}.log", lab.nodes[leader].def.name)),
    )
    .unwrap();
    let before = log
        .find("bootstrap secret escrowed before use")
        .expect("pre-escrow logged");
    let done = log
        .find("bootstrapped and escrowed")
        .expect("bootstrap logged");
    assert!(before < done);

    let operator = lab.operator_imds().await.unwrap();
    let secret = recovered_secret_works(&lab, &operator).await;

    // Every receipt of every tier matches its object.
    let o = escrow_cmd(&lab, &operator, &["verify"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "verify: {out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("ok") && l.contains("nomad"))
            .count(),
        2,
        "{out}"
    );

    // The secret is in no log, record or spool; only in the server's own state (like Nomad's raft data).
    let leaks = files_containing(
        &lab.opts.state_dir,
        &[secret],
        &["/opt/nomad/data", "/var/lib/hashistack-data/nomad"],
    );
    assert!(leaks.is_empty(), "secret found in {leaks:?}");
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_tier_escrows_before_use_bootstraps_once_and_the_recovered_token_works() {
    nomad_lab_bootstraps_once("nomad", 101, None).await;
}

/// The same against a real `nomad` when one is on PATH (Nomad ≥ 1.7 is not installable here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nomad_when_on_path() {
    let real = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nomad"))
            .find(|p| p.is_file())
    });
    let Some(real) = real else {
        eprintln!("SKIPPED: no `nomad` on PATH; the Nomad tier was tested against the contract double only");
        return;
    };
    eprintln!("testing the Nomad tier against {}", real.display());
    nomad_lab_bootstraps_once("nomad-real", 103, Some(real)).await;
}

/// The leader dies right after `POST /v1/acl/bootstrap` returned (before anything after the call reached
/// the disk). With a secret escrowed before use this is recoverable: another server finds "already done",
/// the recorded escrow holds the token, and it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_after_the_call_is_recovered_from_the_escrow_made_before_use() {
    let mut o = options("nomad-crash-after-init", 102);
    o.nomad_servers = 3;
    o.vault_servers = 0;
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    let nomad = nodes_of(&lab, Role::NomadServer);
    // Every other node boots normally.
    for i in 0..lab.nodes.len() {
        if lab.nodes[i].def.role != Role::NomadServer {
            lab.start_agent(i).unwrap();
        }
    }
    // Every Nomad server would crash after its call: only the lease holder makes one.
    for &i in &nomad {
        let mut cfg = lab.node_config(i);
        cfg.faults.crash_at = Some(CrashPoint::AfterInit);
        lab.write_node_config(i, &cfg).unwrap();
        lab.start_agent(i).unwrap();
    }
    let start = Instant::now();
    let dead = 'found: loop {
        for &i in &nomad {
            if let Ok(Some(status)) = lab.nodes[i].agent.as_mut().unwrap().child.try_wait() {
                assert_eq!(status.code(), None, "killed by a signal");
                break 'found i;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no leader crashed after its call"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    lab.kill_agent(dead).await;
    let mut cfg = lab.node_config(dead);
    cfg.faults.crash_at = None;
    lab.write_node_config(dead, &cfg).unwrap();
    lab.start_agent(dead).unwrap();
    wait_healthy(&lab, Duration::from_secs(180)).await;
    let st = assert_done_once(&lab, "nomad").await;
    assert!(
        st.message
            .as_deref()
            .unwrap_or("")
            .contains("escrowed before use"),
        "{st:?}"
    );
    assert_eq!(count_outcome(&lab, Role::NomadServer, "recovered"), 1);
    assert_eq!(count_outcome(&lab, Role::NomadServer, "bootstrapped"), 0);
    let operator = lab.operator_imds().await.unwrap();
    recovered_secret_works(&lab, &operator).await;
    lab.down().await;
}

/// The Nomad status token and the Key Vault double's vault that holds it (exactly one may).
fn status_token(lab: &Lab) -> (String, String) {
    let kv = lab
        .keyvault
        .as_ref()
        .expect("the lab runs the Key Vault double");
    let held: Vec<(String, String)> = kv
        .vaults()
        .iter()
        .filter_map(|v| Some((v.name().to_string(), v.secret_value(NOMAD_SECRET)?)))
        .collect();
    assert_eq!(
        held.len(),
        1,
        "{NOMAD_SECRET} in exactly one vault: {held:?}"
    );
    held.into_iter().next().unwrap()
}

/// Runs status on the jumpbox every second until `done` holds (exit code, report), at most `deadline`.
async fn status_until(
    lab: &Lab,
    deadline: Duration,
    done: impl Fn(i32, &Value) -> bool,
) -> (i32, Value) {
    let start = Instant::now();
    loop {
        let (code, out) = jumpbox_status(lab).await;
        let r = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        if done(code, &r) {
            return (code, r);
        }
        assert!(
            start.elapsed() < deadline,
            "status never got there within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn nomad_tier(report: &Value) -> Value {
    report["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == "nomad")
        .cloned()
        .expect("a nomad tier")
}

fn nomad_problems(report: &Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["area"] == "nomad")
        .map(|p| p["message"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The Nomad tier's bootstrap creates the status token and hands it over: a client token with the
/// `status-read` policy, which can list nodes and read the agent and raft, and cannot write ACLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_bootstrap_creates_a_read_only_status_token() {
    let mut o = options("nomad-status-token", 104);
    o.nomad_servers = 3;
    o.vault_servers = 0;
    let mut lab = healthy_lab(o).await;
    let (vault, token) = status_token(&lab);
    if lab
        .keyvault
        .as_ref()
        .unwrap()
        .vaults()
        .iter()
        .any(|v| v.name() == "status")
    {
        assert_eq!(vault, "status", "the status token goes to the status vault");
    }
    let http = lab.https();
    let call =
        |method: reqwest::Method, ip: std::net::Ipv4Addr, path: &str, body: Option<Value>| {
            let mut rb = http
                .request(method, format!("https://{ip}:4646{path}"))
                .header("X-Nomad-Token", &token);
            if let Some(b) = body {
                rb = rb.json(&b);
            }
            async move {
                let r = rb.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
    for ip in nomad_ips(&lab) {
        let (st, body) = call(reqwest::Method::GET, ip, "/v1/acl/token/self", None).await;
        assert_eq!(st, 200, "{ip}: {body}");
        let t: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(t["Type"], "client", "{t}");
        assert_eq!(t["Name"], NOMAD_TOKEN_NAME);
        assert_eq!(t["Policies"], json!([NOMAD_POLICY]));
        // What status asks: the nodes, the agent, the raft configuration.
        let (st, body) = call(reqwest::Method::GET, ip, "/v1/nodes", None).await;
        assert_eq!(st, 200, "{ip} /v1/nodes: {body}");
        assert!(body.trim_start().starts_with('['), "{body}");
        assert_eq!(
            call(reqwest::Method::GET, ip, "/v1/agent/self", None)
                .await
                .0,
            200
        );
        // The raft configuration: readable, and it lists every server once the third has joined (under load
        // that can come a moment after the tier is healthy).
        let start = std::time::Instant::now();
        let raft = loop {
            let (st, body) = call(
                reqwest::Method::GET,
                ip,
                "/v1/operator/raft/configuration",
                None,
            )
            .await;
            assert_eq!(st, 200, "{body}");
            let raft: Value = serde_json::from_str(&body).unwrap();
            if raft["Servers"].as_array().unwrap().len() == 3
                || start.elapsed() > Duration::from_secs(30)
            {
                break raft;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(raft["Servers"].as_array().unwrap().len(), 3, "{raft}");
        // Nothing it may change: no ACL writes, not even a look at other tokens.
        for (method, path, body) in [
            (
                reqwest::Method::PUT,
                "/v1/acl/policy/escalate",
                Some(json!({"Name": "escalate", "Rules": "node { policy = \"write\" }"})),
            ),
            (
                reqwest::Method::PUT,
                "/v1/acl/token",
                Some(json!({"Name": "escalate", "Type": "management"})),
            ),
            (reqwest::Method::GET, "/v1/acl/tokens", None),
        ] {
            assert_eq!(
                call(method, ip, path, body).await,
                (403, "Permission denied".to_string()),
                "{ip} {path}"
            );
        }
    }
    // Exactly one status token exists (the operator's management token lists them).
    let operator = lab.operator_imds().await.unwrap();
    let opened: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "nomad")).unwrap();
    let management = opened["secret_id"].as_str().unwrap().to_string();
    let ip = nomad_ips(&lab)[0];
    let (_, tokens) = get_as(
        &lab,
        &format!("https://{ip}:4646/v1/acl/tokens"),
        "X-Nomad-Token",
        &management,
    )
    .await;
    let tokens: Vec<Value> = serde_json::from_str(&tokens).unwrap();
    assert_eq!(
        tokens
            .iter()
            .filter(|t| t["Name"] == NOMAD_TOKEN_NAME)
            .count(),
        1,
        "{tokens:?}"
    );
    // status on the jumpbox: the token is present and accepted, no Nomad problem.
    let (_, report) = status_until(&lab, Duration::from_secs(60), |_, r| {
        nomad_tier(r)["status_token"] == "present"
    })
    .await;
    let t = nomad_tier(&report);
    assert_eq!(t["acl"], "bootstrapped", "{t}");
    assert_eq!(t["clients"], json!({"ready": 0, "total": 0}), "{t}");
    assert!(nomad_problems(&report).is_empty(), "{report}");
    // The token is in no log or record: only in the vault it was handed to and the servers' state.
    let leaks = files_containing(
        &lab.opts.state_dir,
        &[token],
        &[
            "/opt/nomad/data",
            "/var/lib/hashistack-data/nomad",
            "secrets/keyvault",
        ],
    );
    assert!(leaks.is_empty(), "status token found in {leaks:?}");
    lab.down().await;
}

/// Two workers run Nomad clients of the double: status counts 2 ready. One worker's Nomad stops (its agent
/// frozen so that nothing restarts it, then the nomad process killed): the node goes down and status is
/// degraded with a line naming it; once the agent runs again it restarts Nomad and the node is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_nomad_clients_ready_and_a_dead_one_down() {
    let mut o = options("nomad-workers", 105);
    o.nomad_servers = 3;
    o.vault_servers = 0;
    o.workers = 2;
    let lab = healthy_lab(o).await;
    let (_, report) = status_until(&lab, Duration::from_secs(90), |_, r| {
        nomad_tier(r)["clients"] == json!({"ready": 2, "total": 2})
    })
    .await;
    assert!(nomad_problems(&report).is_empty(), "{report}");
    let workers = nodes_of(&lab, Role::Worker);
    assert_eq!(workers.len(), 2);
    let victim = workers[1];
    let name = lab.nodes[victim].def.name.clone();
    let agent_pid = lab.nodes[victim]
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .expect("the worker's agent runs");
    let pid_file = lab.nodes[victim]
        .root
        .join("var/lib/hashistack/pids/nomad-client.pid");
    let nomad_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    let kill = |signal: &str, pid: u32| {
        let st = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {signal} {pid}");
    };
    kill("-STOP", agent_pid);
    kill("-KILL", nomad_pid);
    let killed = Instant::now();
    let (code, report) = status_until(&lab, Duration::from_secs(60), |_, r| {
        nomad_tier(r)["clients"] == json!({"ready": 1, "total": 2})
    })
    .await;
    eprintln!("node down after {:?}", killed.elapsed());
    assert_eq!(code, 1, "degraded");
    assert_eq!(report["verdict"], "degraded");
    let problems = nomad_problems(&report);
    assert!(
        problems
            .iter()
            .any(|m| m == &format!("{name}: client node down")),
        "{problems:?}"
    );
    // The agent runs again, restarts Nomad: ready.
    kill("-CONT", agent_pid);
    let (_, report) = status_until(&lab, Duration::from_secs(60), |_, r| {
        nomad_tier(r)["clients"] == json!({"ready": 2, "total": 2})
    })
    .await;
    assert!(nomad_problems(&report).is_empty(), "{report}");
    lab.down().await;
}
