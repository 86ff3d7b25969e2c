//! End-to-end: the runbook "scale workers" (docs/runbooks.md) tried in the lab, and what `hashistack-agent
//! status` shows at each step.
//!
//! Lab: 3 Consul servers, 1 Vault server, 1 Nomad server (the Nomad contract double), 1 worker and the jumpbox.
//! * **scale out**: a new worker is only a new VM with the scale set's tags — `worker-1`, defined exactly as
//!   the lab's scale set defines it, is added at run time and boots: status stays healthy, 2/2 Nomad clients
//!   ready, `worker-1` an alive Consul member;
//! * **scale in**: drain `worker-1`'s Nomad node (when the Nomad in use can: the contract double has no drain
//!   endpoint, which the test notes), then let the VM go (an orderly shutdown: its Consul agent leaves) —
//!   status never turns degraded, and ends healthy with `worker-1` listed as departed, 1/1 Nomad clients;
//! * **a worker lost without a clean shutdown** (SIGKILL of the agent and its services): Consul marks it
//!   failed, Nomad down — degraded, naming it; `consul force-leave` (the runbook's step for a VM that is gone)
//!   makes it departed and status healthy again.

use hashistack_agent::node::Role;
use hashistack_e2e::{agent, escrow_cmd, healthy_lab, options};
use hashistack_lab::lab::node_defs;
use hashistack_lab::Lab;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Longest a single `status` run may take (every call in it has a deadline).
const RUN_LIMIT: Duration = Duration::from_secs(15);

/// `hashistack-agent status [--json]` on the lab's jumpbox: (exit code, stdout).
async fn run_status(lab: &Lab, json: bool) -> (i32, String) {
    let j = lab.jumpbox().expect("the lab has a jumpbox");
    let mut cmd = tokio::process::Command::new(agent(lab));
    cmd.arg("status")
        .arg("--config")
        .arg(&lab.nodes[j].config_path)
        .env_remove("NO_COLOR")
        .kill_on_drop(true);
    if json {
        cmd.arg("--json");
    }
    let start = Instant::now();
    let o = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("status did not finish within {RUN_LIMIT:?}"))
        .expect("run hashistack-agent status");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!(
        "--- status{} ({:?}, exit {:?}):\n{}",
        if json { " --json" } else { "" },
        start.elapsed(),
        o.status.code(),
        if json {
            // The verdict line is enough in the log; the whole report when a test fails is printed by it.
            serde_json::from_str::<Value>(&out)
                .map(|v| v["summary"].to_string())
                .unwrap_or_else(|_| out.clone())
        } else {
            out.clone()
        }
    );
    (o.status.code().unwrap_or(-1), out)
}

async fn status_json(lab: &Lab) -> (i32, Value) {
    let (code, out) = run_status(lab, true).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["exit_code"], code, "{v}");
    (code, v)
}

/// Runs `status --json` until `done` holds, at most `deadline`; every report it saw is passed to `each`.
async fn status_until(
    lab: &Lab,
    deadline: Duration,
    mut each: impl FnMut(i32, &Value),
    done: impl Fn(i32, &Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (code, v) = status_json(lab).await;
        each(code, &v);
        if done(code, &v) {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "status never got there within {deadline:?}; last report:\n{v:#}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn tier<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["tier"] == name)
        .unwrap_or_else(|| panic!("no {name} tier: {r}"))
}

fn node<'a>(r: &'a Value, name: &str) -> Option<&'a Value> {
    r["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

fn departed(r: &Value) -> Vec<String> {
    r["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["departed"] == true)
        .map(|n| n["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// `(area, subject, message)` of every problem.
fn problems(r: &Value) -> Vec<(String, String, String)> {
    r["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
            (s("area"), s("subject"), s("message"))
        })
        .collect()
}

fn clients(r: &Value, tier_name: &str) -> Value {
    tier(r, tier_name)["clients"].clone()
}

/// The management token of a tier, as an operator recovers it (`escrow open`).
fn management_token(lab: &Lab, operator: &str, tier_name: &str) -> String {
    let o = escrow_cmd(lab, operator, &["open", "--tier", tier_name]);
    assert!(
        o.status.success(),
        "escrow open {tier_name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("escrow JSON");
    v["secret_id"].as_str().expect("a secret_id").to_string()
}

/// Consul's gossip status of `name` as the jumpbox's agent sees it (what status reads), if it is a member.
async fn consul_member(lab: &Lab, token: &str, name: &str) -> Option<u64> {
    let jumpbox = lab.nodes[lab.jumpbox().unwrap()].def.ip;
    let members: Vec<Value> = lab
        .https()
        .get(format!("https://{jumpbox}:8501/v1/agent/members"))
        .header("X-Consul-Token", token)
        .send()
        .await
        .expect("jumpbox Consul answers")
        .json()
        .await
        .expect("members JSON");
    members
        .iter()
        .find(|m| m["Name"] == name)
        .and_then(|m| m["Status"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_workers_out_and_in_and_lose_one() {
    let mut o = options("scaling", 110);
    o.vault_servers = 1;
    o.nomad_servers = 1;
    o.workers = 1;
    let mut lab = healthy_lab(o).await;
    let operator = lab.operator_imds().await.expect("operator identity");
    let consul_token = management_token(&lab, &operator, "consul");
    let nomad_token = management_token(&lab, &operator, "nomad");
    let nomad_api = format!(
        "https://{}:4646",
        lab.nodes[lab.node_index("nomad-0").expect("nomad-0")]
            .def
            .ip
    );

    // The starting point: healthy, one Nomad client ready, nobody departed.
    let r = status_until(
        &lab,
        Duration::from_secs(90),
        |_, _| {},
        |code, r| code == 0 && clients(r, "nomad") == json!({"ready": 1, "total": 1}),
    )
    .await;
    assert!(departed(&r).is_empty(), "{r:#}");
    assert_eq!(node(&r, "worker-0").unwrap()["member"], "alive", "{r:#}");

    // ---- scale out: one more VM of the workers scale set, with the scale set's tags, nothing else.
    let mut bigger = lab.opts.clone();
    bigger.workers = 2;
    let def = node_defs(&bigger)
        .into_iter()
        .find(|d| d.name == "worker-1")
        .expect("node_defs makes worker-1 for two workers");
    assert_eq!(def.role, Role::Worker);
    assert_eq!(def.scale_set, "hs-workers");
    assert_eq!(def.ip, lab.opts.ip(42));
    let w1 = lab.add_node(def).await.expect("add worker-1");
    lab.start_agent(w1).expect("start worker-1's agent");
    let rec = lab
        .wait_booted(w1, Duration::from_secs(180))
        .await
        .expect("worker-1 boots");
    assert!(rec.ok, "worker-1's boot: {rec:?}");
    let r = status_until(
        &lab,
        Duration::from_secs(90),
        |_, _| {},
        |code, r| {
            code == 0
                && clients(r, "nomad") == json!({"ready": 2, "total": 2})
                && node(r, "worker-1").is_some_and(|n| n["member"] == "alive")
        },
    )
    .await;
    assert_eq!(r["verdict"], "healthy");
    let consul = clients(&r, "consul");
    assert_eq!(
        consul["ready"], consul["total"],
        "every Consul client alive: {r:#}"
    );
    // vault-0, nomad-0, two workers and the jumpbox.
    assert_eq!(consul["total"], 5, "{r:#}");
    assert_eq!(
        consul_member(&lab, &consul_token, "worker-1").await,
        Some(1),
        "worker-1 is an alive Consul member"
    );
    assert!(departed(&r).is_empty(), "{r:#}");

    // ---- scale in: drain worker-1's Nomad node first, then let the VM go.
    let http = lab.https();
    let nodes: Vec<Value> = http
        .get(format!("{nomad_api}/v1/nodes"))
        .header("X-Nomad-Token", &nomad_token)
        .send()
        .await
        .expect("Nomad answers")
        .json()
        .await
        .expect("nodes JSON");
    let id = nodes
        .iter()
        .find(|n| n["Name"] == "worker-1")
        .and_then(|n| n["ID"].as_str())
        .unwrap_or_else(|| panic!("worker-1 is a Nomad node: {nodes:?}"))
        .to_string();
    // What `nomad node drain -enable -yes <id>` sends.
    let drain = http
        .post(format!("{nomad_api}/v1/node/{id}/drain"))
        .header("X-Nomad-Token", &nomad_token)
        .json(&json!({"DrainSpec": {"Deadline": 3_600_000_000_000u64, "IgnoreSystemJobs": false}, "MarkEligible": false}))
        .send()
        .await
        .expect("Nomad answers the drain");
    match drain.status().as_u16() {
        200 => {
            let n: Value = http
                .get(format!("{nomad_api}/v1/node/{id}"))
                .header("X-Nomad-Token", &nomad_token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(n["SchedulingEligibility"], "ineligible", "drained: {n}");
        }
        404 => eprintln!(
            "NOTE: the Nomad contract double has no drain endpoint (HTTP 404 for POST /v1/node/:id/drain): \
             the drain step of the runbook was not exercised"
        ),
        s => panic!(
            "drain: unexpected HTTP {s}: {}",
            drain.text().await.unwrap_or_default()
        ),
    }
    lab.stop_agent(w1).await;
    let mut codes = vec![];
    let r = status_until(
        &lab,
        Duration::from_secs(90),
        |code, _| codes.push(code),
        |code, r| {
            code == 0
                && departed(r) == ["worker-1"]
                && clients(r, "nomad") == json!({"ready": 1, "total": 1})
        },
    )
    .await;
    assert!(
        codes.iter().all(|c| *c == 0),
        "a scale-in never makes status degraded: exit codes {codes:?}"
    );
    let w = node(&r, "worker-1").unwrap();
    assert_eq!(w["member"], "left", "a clean shutdown leaves Consul: {w}");
    assert_eq!(w["ok"], true);
    assert_eq!(
        tier(&r, "nomad")["departed_clients"],
        json!(["worker-1"]),
        "its Nomad node is down and not counted: {r:#}"
    );
    assert!(problems(&r).is_empty(), "{r:#}");
    assert_eq!(
        consul_member(&lab, &consul_token, "worker-1").await,
        Some(3)
    );
    let (code, table) = run_status(&lab, false).await;
    assert_eq!(code, 0, "{table}");
    let first = table.lines().next().unwrap_or("");
    assert!(
        first.starts_with("HEALTHY  cluster lab: ") && first.ends_with(", 7 agents ok, 1 departed"),
        "{table}"
    );
    assert!(
        table.contains("\nagents: 8 published, 7 ok, 0 failed, 1 departed\n"),
        "{table}"
    );
    let line = table
        .lines()
        .find(|l| l.starts_with("departed (left the cluster, not counted): "))
        .unwrap_or_else(|| panic!("a departed line:\n{table}"));
    assert!(line.contains("worker-1 (left; last boot "), "{line}");
    assert!(table.contains("clients 1/1 ready"), "{table}");

    // ---- a worker lost without a clean shutdown: Consul sees it failed, Nomad down. Degraded, naming it.
    let w0 = lab.node_index("worker-0").expect("worker-0");
    lab.kill_agent(w0).await;
    let r = status_until(
        &lab,
        Duration::from_secs(90),
        |_, _| {},
        |code, r| {
            let p = problems(r);
            code == 1
                && p.contains(&(
                    "consul".into(),
                    "worker-0".into(),
                    "worker-0: client agent failed (gossip)".into(),
                ))
                && p.contains(&(
                    "nomad".into(),
                    "worker-0".into(),
                    "worker-0: client node down".into(),
                ))
        },
    )
    .await;
    assert_eq!(r["verdict"], "degraded");
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .starts_with("cluster lab: consul: worker-0: client agent failed (gossip)"),
        "{r:#}"
    );
    let w = node(&r, "worker-0").unwrap();
    assert_eq!(w["member"], "failed", "{w}");
    assert_eq!(w["departed"], false, "a failed member is not departed: {w}");
    assert_eq!(departed(&r), ["worker-1"], "{r:#}");
    // Every problem is about worker-0.
    assert!(
        problems(&r).iter().all(|(_, s, _)| s == "worker-0"),
        "{r:#}"
    );

    // The runbook's step for a VM that is gone for good: `consul force-leave` (operator:write), against the
    // jumpbox's own agent, whose member list status reads. The node is then departed: healthy again.
    let jumpbox = lab.nodes[lab.jumpbox().unwrap()].def.ip;
    let fl = http
        .put(format!(
            "https://{jumpbox}:8501/v1/agent/force-leave/worker-0"
        ))
        .header("X-Consul-Token", &consul_token)
        .send()
        .await
        .expect("force-leave answered");
    assert_eq!(fl.status().as_u16(), 200, "force-leave worker-0");
    let r = status_until(
        &lab,
        Duration::from_secs(60),
        |_, _| {},
        |code, r| code == 0 && departed(r) == ["worker-0", "worker-1"],
    )
    .await;
    assert_eq!(node(&r, "worker-0").unwrap()["member"], "left");
    assert_eq!(
        clients(&r, "nomad"),
        json!({"ready": 0, "total": 0}),
        "{r:#}"
    );
    assert!(problems(&r).is_empty(), "{r:#}");
    lab.down().await;
}
