//! End-to-end: `hashistack-agent status` on the lab's jumpbox, for each state an operator must tell apart —
//! healthy, bootstrapping, a Consul server killed, a Vault node stopped, a node with a wrong role tag, an escrow
//! receipt missing. Each asserts the verdict line, the exit code and the specific line; every run must finish
//! within a few seconds, dead servers included.

use hashistack_agent::coordination::{self, TierPhase, TierState};
use hashistack_agent::node::{Role, TAG_ROLE};
use hashistack_e2e::{agent, all_vault_voters, escrow_open, get_as, healthy_lab, options};
use hashistack_lab::lab::NodeDef;
use hashistack_lab::Lab;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Longest a single `status` run may take (every call has a deadline; a dead server must not stretch it).
const RUN_LIMIT: Duration = Duration::from_secs(12);

struct Run {
    code: i32,
    out: String,
}

impl Run {
    fn verdict(&self) -> &str {
        self.out.lines().next().unwrap_or("")
    }
    /// The first line after the verdict line that holds every needle.
    fn line(&self, needles: &[&str]) -> Option<&str> {
        self.out
            .lines()
            .skip(1)
            .find(|l| needles.iter().all(|n| l.contains(n)))
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.out).unwrap_or_else(|e| panic!("{e}: {}", self.out))
    }
}

async fn status(lab: &Lab, extra: &[&str]) -> Run {
    let j = lab.jumpbox().expect("the lab has a jumpbox");
    let start = Instant::now();
    let o = tokio::process::Command::new(agent(lab))
        .arg("status")
        .arg("--config")
        .arg(&lab.nodes[j].config_path)
        .args(extra)
        .env_remove("NO_COLOR")
        .output()
        .await
        .expect("run hashistack-agent status");
    let took = start.elapsed();
    // Shown when a test fails: every run, in order.
    eprintln!(
        "--- status {} ({took:?}, exit {:?}):\n{}",
        extra.join(" "),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout)
    );
    let run = Run {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
    };
    assert!(
        took < RUN_LIMIT,
        "status took {took:?}:\n{}\n{}",
        run.out,
        String::from_utf8_lossy(&o.stderr)
    );
    run
}

/// Runs status until `done` holds (the cluster settles, gossip notices a failure), at most `deadline`.
async fn status_until(lab: &Lab, deadline: Duration, done: impl Fn(&Run) -> bool) -> Run {
    let start = Instant::now();
    loop {
        let r = status(lab, &[]).await;
        if done(&r) {
            return r;
        }
        if start.elapsed() > deadline {
            panic!(
                "status never got there within {deadline:?}; last:\n{}",
                r.out
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn index_of(lab: &Lab, name: &str) -> usize {
    lab.node_index(name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// Healthy and settled: every Vault standby promoted to voter. OpenBao's autopilot keeps a node that just joined
/// as a non-voter and may call it unhealthy until its first health report reaches the leader, so a test that
/// changes one thing and then expects it to be the only problem must start from here.
async fn healthy_status(lab: &Lab) -> Run {
    status_until(lab, Duration::from_secs(90), |r| {
        r.code == 0 && !r.out.contains("non-voter")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_cluster_is_healthy_with_every_tier_and_node() {
    let lab = healthy_lab(options("status-healthy", 40)).await;
    let r = healthy_status(&lab).await;
    assert!(
        r.verdict()
            .starts_with("HEALTHY  cluster lab: consul 3/3 servers, vault 3/3 unsealed"),
        "{}",
        r.out
    );
    assert!(!r.out.contains('\x1b'), "no colour into a pipe:\n{}", r.out);
    let consul = r.line(&["consul", "3/3"]).expect("consul tier row");
    assert!(
        consul.contains("bootstrapped")
            && consul.contains("done by")
            && consul.contains("blob, keyvault"),
        "{consul}"
    );
    let vault = r.line(&["vault", "3/3", "active"]).expect("vault tier row");
    assert!(
        vault.contains("initialized, unsealed") && vault.contains("blob, keyvault"),
        "{vault}"
    );
    assert!(r.line(&["nomad", "not deployed"]).is_some(), "{}", r.out);
    for name in [
        "consul-0", "consul-1", "consul-2", "vault-0", "vault-1", "vault-2",
    ] {
        let l = r
            .line(&[name, "healthy"])
            .unwrap_or_else(|| panic!("{name}:\n{}", r.out));
        assert!(!l.contains("UNREACHABLE"), "{l}");
    }
    assert!(
        r.line(&["agents: 7 published, 7 ok, 0 failed"]).is_some(),
        "{}",
        r.out
    );
    assert!(!r.out.contains("PROBLEMS"), "{}", r.out);

    // The JSON report: the documented schema, same verdict.
    let j = status(&lab, &["--json"]).await;
    assert_eq!(j.code, 0, "{}", j.out);
    let v = j.json();
    assert_eq!(v["schema"], "hashistack-status/1");
    assert_eq!(v["verdict"], "healthy");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["observer"], "jumpbox");
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    let tiers = v["tiers"].as_array().unwrap();
    assert_eq!(
        tiers
            .iter()
            .map(|t| t["tier"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["consul", "vault", "nomad"]
    );
    for t in &tiers[..2] {
        assert_eq!(t["expected_servers"], 3, "{t}");
        assert_eq!(t["healthy_servers"], 3, "{t}");
        assert_eq!(t["acl"], "bootstrapped", "{t}");
        assert_eq!(t["status_token"], "present", "{t}");
        assert_eq!(t["bootstrap"]["phase"], "done", "{t}");
        assert_eq!(
            t["bootstrap"]["receipts"].as_array().unwrap().len(),
            2,
            "{t}"
        );
        assert!(t["leader"].as_str().is_some(), "{t}");
        assert_eq!(t["servers"].as_array().unwrap().len(), 3, "{t}");
    }
    assert!(tiers[1]["active_node"]
        .as_str()
        .unwrap()
        .starts_with("vault-"));
    assert_eq!(tiers[1]["sealed"], false);
    assert_eq!(tiers[2]["deployed"], false);
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 7);
    assert!(
        nodes
            .iter()
            .all(|n| n["ok"] == true && n["phase"] == "done"),
        "{nodes:?}"
    );

    // --watch refreshes: two JSON lines, then it is stopped.
    let j = lab.jumpbox().unwrap();
    let mut child = tokio::process::Command::new(agent(&lab))
        .args(["status", "--json", "--watch", "1", "--config"])
        .arg(&lab.nodes[j].config_path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let l = tokio::time::timeout(RUN_LIMIT, lines.next_line())
            .await
            .expect("a refresh")
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["schema"], "hashistack-status/1");
    }
    child.kill().await.unwrap();

    // The per-node view is still there.
    let n = status(&lab, &["--node"]).await;
    assert!(
        n.out.contains("jumpbox") && n.out.contains("role=jumpbox"),
        "{}",
        n.out
    );
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrapping_in_progress_is_degraded_and_says_where_it_is() {
    // Servers up, no tier bootstrapped yet; Consul's bootstrap caught mid-way (state written as its leader does).
    let mut o = options("status-bootstrapping", 41);
    o.bootstrap = false;
    let lab = healthy_lab(o).await;
    let mut st = TierState::new("lab", "consul", "consul-0");
    st.set(TierPhase::Initializing, "consul-0", None);
    lab.write_blob(
        "coordination",
        &coordination::state_blob_name("lab", "consul"),
        serde_json::to_vec(&st).unwrap(),
    )
    .await
    .unwrap();
    let r = status_until(&lab, Duration::from_secs(60), |r| {
        r.line(&[
            "✗ consul",
            "bootstrap in progress: initializing by consul-0",
        ])
        .is_some()
    })
    .await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.verdict().starts_with("DEGRADED  cluster lab: "),
        "{}",
        r.out
    );
    assert!(
        r.line(&["✗ vault", "not bootstrapped yet"]).is_some(),
        "{}",
        r.out
    );
    let vault = r
        .line(&["vault", "NOT initialized"])
        .expect("vault tier row");
    assert!(vault.contains("none"), "no bootstrap record: {vault}");
    // Before the bootstrap, sealed and uninitialized Vault servers are expected: no line per server.
    assert!(r.line(&["✗ vault", "vault-0"]).is_none(), "{}", r.out);
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consul_server_is_reported_within_seconds() {
    let mut lab = healthy_lab(options("status-consul-down", 42)).await;
    healthy_status(&lab).await;
    let i = index_of(&lab, "consul-1");
    lab.kill_agent(i).await;
    // The first run after the kill already sees the dead API (each call has a deadline; see RUN_LIMIT).
    let r = status(&lab, &[]).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.verdict()
            .starts_with("DEGRADED  cluster lab: consul: consul-1: unreachable"),
        "{}",
        r.out
    );
    let row = r
        .line(&["consul-1", "consul", "UNREACHABLE"])
        .expect("server row");
    assert!(row.contains("cannot connect"), "{row}");
    assert!(
        r.line(&["✗ consul", "consul-1: unreachable"]).is_some(),
        "{}",
        r.out
    );
    // Gossip notices too, within seconds.
    let r = status_until(&lab, Duration::from_secs(60), |r| {
        r.line(&["✗ consul", "consul-1: unreachable", "gossip member failed"])
            .is_some()
    })
    .await;
    assert_eq!(r.code, 1);
    assert!(r.line(&["consul", "2/3"]).is_some(), "{}", r.out);
    lab.down().await;
}

/// The lab node whose Vault is active (`sys/leader`, asked of every Vault server until one answers).
async fn active_vault(lab: &Lab) -> String {
    for n in lab.nodes.iter().filter(|n| n.def.role == Role::VaultServer) {
        let url = format!("https://{}:8200/v1/sys/leader", n.def.ip);
        let (status, body) = get_as(lab, &url, "X-Vault-Request", "true").await;
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        if status != 200 {
            continue;
        }
        let addr = v["leader_address"].as_str().unwrap_or_default();
        if let Some(a) = lab.nodes.iter().find(|a| {
            a.def.role == Role::VaultServer && addr == format!("https://{}:8200", a.def.ip)
        }) {
            return a.def.name.clone();
        }
    }
    panic!("no Vault server names an active node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vault_node_is_reported() {
    let mut lab = healthy_lab(options("status-vault-down", 43)).await;
    healthy_status(&lab).await;
    // Raft whole first: a server stopped before autopilot promoted the others to voters would leave them
    // without a quorum (seen under load), which is not what this test is about.
    let operator = lab.operator_imds().await.unwrap();
    let opened: serde_json::Value =
        serde_json::from_slice(&escrow_open(&lab, &operator, "vault")).unwrap();
    all_vault_voters(&lab, opened["root_token"].as_str().unwrap(), 3).await;
    // The active node: a standby must take over, which it can only do when its declared audit device is the
    // one in storage (the same file on every server).
    let active = active_vault(&lab).await;
    let i = index_of(&lab, &active);
    lab.stop_agent(i).await;
    let r = status_until(&lab, Duration::from_secs(60), |r| {
        r.line(&["✗ vault", &format!("{active}: unreachable")])
            .is_some()
    })
    .await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.verdict().starts_with("DEGRADED  cluster lab: "),
        "{}",
        r.out
    );
    assert!(
        r.line(&[&active, "vault", "UNREACHABLE"]).is_some(),
        "{}",
        r.out
    );
    // The other two still serve: a standby takes over within seconds (raft elects a new leader first).
    let start = std::time::Instant::now();
    let vault = loop {
        let v = status(&lab, &["--json"]).await.json();
        let vault = v["tiers"][1].clone();
        if vault["active_node"].is_string() || start.elapsed() > Duration::from_secs(60) {
            break vault;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(vault["healthy_servers"], 2, "{vault}");
    assert!(
        vault["active_node"].as_str().is_some_and(|a| a != active),
        "{vault}"
    );
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wrong_role_tag_shows_up_with_its_error() {
    let mut lab = healthy_lab(options("status-badtag", 44)).await;
    healthy_status(&lab).await;
    let mut def: NodeDef = lab.nodes[index_of(&lab, "consul-0")].def.clone();
    def.name = "stray-0".into();
    def.ip = lab.opts.ip(99);
    for t in def.tags.iter_mut() {
        if t.0 == TAG_ROLE {
            t.1 = "consul-sever".into();
        }
    }
    let i = lab.add_node(def).await.unwrap();
    lab.start_agent(i).unwrap();
    let agent_proc = lab.nodes[i].agent.as_mut().unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), agent_proc.child.wait())
        .await
        .expect("agent exits")
        .unwrap();
    assert_eq!(exit.code(), Some(2));
    let r = status_until(&lab, Duration::from_secs(60), |r| {
        r.line(&["✗ nodes", "stray-0"]).is_some()
    })
    .await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.verdict()
            .starts_with("DEGRADED  cluster lab: nodes: stray-0: agent failed in phase node-spec"),
        "{}",
        r.out
    );
    let row = r
        .line(&["stray-0", "? (consul-sever)", "node-spec"])
        .expect("failed agent row");
    assert!(row.contains("hashistack-role"), "{row}");
    assert!(
        r.line(&["agents: 8 published, 7 ok, 1 failed"]).is_some(),
        "{}",
        r.out
    );
    // The rest of the cluster is fine: the stray node is the only problem.
    let v = status(&lab, &["--json"]).await.json();
    assert_eq!(v["problems"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["problems"][0]["subject"], "stray-0");
    let n = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "stray-0")
        .unwrap()
        .clone();
    assert_eq!(n["role"], Value::Null);
    assert_eq!(n["role_tag"], "consul-sever");
    assert_eq!(n["ok"], false);
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_escrow_receipt_is_degraded() {
    let lab = healthy_lab(options("status-receipt", 45)).await;
    healthy_status(&lab).await;
    let mut st = lab.tier_state("vault").await.expect("vault state");
    assert!(!st.receipts.is_empty());
    st.receipts.clear();
    lab.write_blob(
        "coordination",
        &coordination::state_blob_name("lab", "vault"),
        serde_json::to_vec_pretty(&st).unwrap(),
    )
    .await
    .unwrap();
    let r = status(&lab, &[]).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.verdict()
            .starts_with("DEGRADED  cluster lab: vault: escrow receipt missing: blob, keyvault"),
        "{}",
        r.out
    );
    assert!(
        r.line(&["vault", "MISSING blob, keyvault"]).is_some(),
        "{}",
        r.out
    );
    assert!(
        r.line(&["✗ vault", "escrow receipt missing: blob, keyvault"])
            .is_some(),
        "{}",
        r.out
    );
    // Only the receipts are the problem.
    let v = status(&lab, &["--json"]).await.json();
    assert_eq!(v["problems"].as_array().unwrap().len(), 1, "{v}");
    lab.down().await;
}

/// A server stopped in an orderly way leaves Consul (its Consul client leaves on terminate), like a VM a scale
/// set removed — but raft still lists it, so it is a problem, not a departed node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_that_left_consul_is_a_problem_not_departed() {
    let mut lab = healthy_lab(options("status-left-server", 111)).await;
    healthy_status(&lab).await;
    let i = index_of(&lab, "vault-2");
    lab.stop_agent(i).await;
    let start = Instant::now();
    let v = loop {
        let v = status(&lab, &["--json"]).await.json();
        let member = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "vault-2")
            .map(|n| n["member"].clone());
        if member == Some(Value::from("left")) {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "vault-2's Consul agent never showed as left: {v:#}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(v["verdict"], "degraded", "{v:#}");
    let n = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "vault-2")
        .unwrap();
    assert_eq!(n["departed"], false, "raft still lists vault-2: {n}");
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["subject"] == "vault-2"
                && p["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("vault-2: unreachable"))),
        "{v:#}"
    );
    let r = status(&lab, &[]).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.line(&["departed"]).is_none(), "{}", r.out);
    lab.down().await;
}
