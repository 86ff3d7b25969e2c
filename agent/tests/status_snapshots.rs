//! Snapshot tests of `hashistack-agent status`: fixed observations → the table (plain and coloured) and the JSON
//! report, compared with the goldens under tests/status_golden/<case>/. Assessment and rendering are pure, so
//! these pin every line an operator reads and the documented JSON schema (docs/status.md).
//!
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test -p hashistack-agent --test status_snapshots`
//! and review the diff.

use hashistack_agent::boot::{BootRecord, Phase};
use hashistack_agent::coordination::{TierPhase, TierState};
use hashistack_agent::escrow::{Receipt, ReceiptTarget};
use hashistack_agent::publish::NodeRecord;
use hashistack_agent::status::assess::JOIN_GRACE_SECS;
use hashistack_agent::status::model::*;
use hashistack_agent::status::{assess, render};
use std::collections::BTreeMap;
use std::path::PathBuf;

const NOW: i64 = 1_780_000_000;

fn record(name: &str, role: &str, ip: &str, expects: &[(&str, u8)]) -> NodeRecord {
    let mut versions = BTreeMap::new();
    match role {
        "consul-server" | "jumpbox" => {
            versions.insert("consul".into(), "consul 1.20.0".into());
        }
        "vault-server" => {
            versions.insert("consul".into(), "consul 1.20.0".into());
            versions.insert("vault".into(), "vault 1.18.1".into());
        }
        _ => {
            versions.insert("consul".into(), "consul 1.20.0".into());
            versions.insert("nomad".into(), "nomad 1.9.5".into());
        }
    }
    NodeRecord {
        format: 1,
        boot: BootRecord {
            agent_version: "0.1.0".into(),
            pid: 4242,
            node: name.into(),
            role: Some(role.into()),
            cluster: Some("prod".into()),
            phase: Phase::Done,
            ok: true,
            last_error: None,
            finished_unix: NOW - 3600,
            critical_path_ms: Some(850),
            phases_us: BTreeMap::new(),
            versions,
            files_changed: vec![],
            services: BTreeMap::new(),
            bootstrap: role
                .ends_with("-server")
                .then(|| "already-done".to_string()),
            workload_identity: None,
            material: None,
            converge: None,
        },
        ip: Some(ip.into()),
        role_tag: Some(role.into()),
        expects: expects.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        published_unix: NOW - 3600,
    }
}

fn done_state(tier: &str, leader: &str) -> TierState {
    let mut s = TierState::new("prod", tier, leader);
    s.phase = TierPhase::Done;
    s.updated_unix = NOW - 86_400 * 3;
    s.escrow_id = Some("1779740800-0011223344556677".into());
    for (target, object) in [
        (
            ReceiptTarget::Blob,
            format!("escrow/prod/{tier}/1779740800-0011223344556677.json"),
        ),
        (
            ReceiptTarget::Keyvault,
            format!("prod-{tier}-1779740800-0011223344556677"),
        ),
    ] {
        s.receipts.push(Receipt {
            target,
            object,
            version: "v1".into(),
            etag: None,
            escrow_id: None,
            ciphertext_sha256: "ab".repeat(32),
            written_unix: NOW - 86_400 * 3,
        });
    }
    s
}

fn ok<T>(v: T) -> Got<T> {
    Some(Ok(v))
}

fn err<T>(e: &str) -> Got<T> {
    Some(Err(e.into()))
}

fn consul_ip(i: usize) -> String {
    format!("10.0.1.{}", 4 + i)
}
fn vault_ip(i: usize) -> String {
    format!("10.0.2.{}", 4 + i)
}
fn nomad_ip(i: usize) -> String {
    format!("10.0.3.{}", 4 + i)
}

/// A healthy production-shaped cluster: 3 Consul, 3 Vault, 3 Nomad servers, 2 workers, the jumpbox.
fn healthy() -> Observations {
    let mut records = vec![];
    for i in 0..3 {
        records.push(record(
            &format!("consul-00000{i}"),
            "consul-server",
            &consul_ip(i),
            &[("consul-servers", 3)],
        ));
        records.push(record(
            &format!("vault-00000{i}"),
            "vault-server",
            &vault_ip(i),
            &[("vault-servers", 3)],
        ));
        records.push(record(
            &format!("nomad-00000{i}"),
            "nomad-server",
            &nomad_ip(i),
            &[("nomad-servers", 3)],
        ));
    }
    for i in 0..2 {
        records.push(record(
            &format!("workers-00000{i}"),
            "worker",
            &format!("10.0.4.{}", 4 + i),
            &[],
        ));
    }
    records.push(record("prod-jumpbox", "jumpbox", "10.0.5.4", &[]));
    records.sort_by(|a, b| a.boot.node.cmp(&b.boot.node));

    let consul_servers: Vec<(String, String)> = (0..3)
        .map(|i| (format!("consul-00000{i}"), consul_ip(i)))
        .collect();
    let mut members: Vec<Member> = consul_servers
        .iter()
        .map(|(n, ip)| Member {
            name: n.clone(),
            addr: ip.clone(),
            role: "consul".into(),
            status: "alive".into(),
            version: "1.20.0".into(),
        })
        .collect();
    for r in records
        .iter()
        .filter(|r| r.boot.role.as_deref() != Some("consul-server"))
    {
        members.push(Member {
            name: r.boot.node.clone(),
            addr: r.ip.clone().unwrap(),
            role: "node".into(),
            status: "alive".into(),
            version: "1.20.0".into(),
        });
    }
    let consul = ConsulObs {
        state: ok(Some(done_state("consul", "consul-000000"))),
        token: TokenState::Present,
        via: Some("10.0.5.4:8501".into()),
        leader: ok(format!("{}:8300", consul_ip(1))),
        peers: ok((0..3).map(|i| format!("{}:8300", consul_ip(i))).collect()),
        raft: ok(consul_servers
            .iter()
            .enumerate()
            .map(|(i, (n, ip))| RaftServer {
                id: format!("id-{n}"),
                node: n.clone(),
                address: format!("{ip}:8300"),
                leader: i == 1,
                voter: true,
            })
            .collect()),
        autopilot: ok(Autopilot {
            healthy: true,
            failure_tolerance: 1,
            servers: consul_servers
                .iter()
                .enumerate()
                .map(|(i, (n, ip))| AutopilotServer {
                    id: format!("id-{n}"),
                    name: n.clone(),
                    address: format!("{ip}:8300"),
                    healthy: true,
                    status: "alive".into(),
                    leader: i == 1,
                    voter: true,
                    version: "1.20.0".into(),
                })
                .collect(),
        }),
        members: ok(members),
        acl: ok("hashistack-agent status (read-only)".into()),
        probes: consul_servers
            .iter()
            .map(|(n, ip)| Probed {
                name: n.clone(),
                address: ip.clone(),
                answer: ok(format!("{}:8300", consul_ip(1))),
            })
            .collect(),
    };
    let vault_servers: Vec<(String, String)> = (0..3)
        .map(|i| (format!("vault-00000{i}"), vault_ip(i)))
        .collect();
    let vault = VaultObs {
        state: ok(Some(done_state("vault", "vault-000002"))),
        token: TokenState::Present,
        health: vault_servers
            .iter()
            .enumerate()
            .map(|(i, (n, ip))| Probed {
                name: n.clone(),
                address: ip.clone(),
                answer: ok(VaultHealth {
                    initialized: true,
                    sealed: false,
                    standby: i != 2,
                    version: "1.18.1".into(),
                }),
            })
            .collect(),
        via: Some(format!("{}:8200", vault_ip(2))),
        raft: ok(vault_servers
            .iter()
            .enumerate()
            .map(|(i, (n, ip))| RaftServer {
                id: n.clone(),
                node: n.clone(),
                address: format!("{ip}:8201"),
                leader: i == 2,
                voter: true,
            })
            .collect()),
        autopilot: ok(Autopilot {
            healthy: true,
            failure_tolerance: 1,
            servers: vault_servers
                .iter()
                .enumerate()
                .map(|(i, (n, ip))| AutopilotServer {
                    id: n.clone(),
                    name: n.clone(),
                    address: format!("{ip}:8201"),
                    healthy: true,
                    status: "alive".into(),
                    leader: i == 2,
                    voter: true,
                    version: "1.18.1".into(),
                })
                .collect(),
        }),
    };
    let nomad = NomadObs {
        state: ok(Some(done_state("nomad", "nomad-000001"))),
        token: TokenState::Present,
        probes: (0..3)
            .map(|i| Probed {
                name: format!("nomad-00000{i}"),
                address: nomad_ip(i),
                answer: ok(format!("{}:4647", nomad_ip(0))),
            })
            .collect(),
        peers: ok((0..3).map(|i| format!("{}:4647", nomad_ip(i))).collect()),
        nodes: ok((0..2)
            .map(|i| NomadNode {
                name: format!("workers-00000{i}"),
                address: format!("10.0.4.{}", 4 + i),
                status: "ready".into(),
                eligible: true,
            })
            .collect()),
    };
    Observations {
        cluster: "prod".into(),
        observer: "prod-jumpbox".into(),
        observed_unix: NOW,
        records_error: None,
        records,
        consul,
        vault,
        nomad,
        snapshots: ["consul", "vault", "nomad"]
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                (
                    t.to_string(),
                    ok(Some(snapshot_record(t, i, 20 * 60, true))),
                )
            })
            .collect(),
    }
}

/// A tier's snapshot record: the newest taken `age` seconds before NOW by the tier's first server; the last
/// attempt succeeded (`ok`) or failed 5 minutes ago.
fn snapshot_record(tier: &str, i: usize, age: i64, ok: bool) -> hashistack_agent::snapshot::Record {
    use hashistack_agent::snapshot::{Attempted, Record, Taken};
    let node = format!("{tier}-000000");
    let created = NOW - age;
    Record {
        cluster: "prod".into(),
        tier: tier.into(),
        interval_secs: 3600,
        retention_days: 30,
        last_attempt: Some(Attempted {
            node: node.clone(),
            at_unix: if ok { created } else { NOW - 300 },
            ok,
            error: (!ok).then(|| {
                "snapshot key wrap: HTTP 403 Forbidden (gave up after 12 attempts in 120.0s)"
                    .to_string()
            }),
        }),
        last_success: Some(Taken {
            blob: format!(
                "prod/{tier}/{}-{:020}-0a0b0c0{i}.hsnap",
                "20260528T184640Z",
                1000 + i as u64
            ),
            node,
            index: 1000 + i as u64,
            created_unix: created,
            plaintext_bytes: 1_250_000 * (i as u64 + 1),
            stored_bytes: 1_250_000 * (i as u64 + 1) + 200,
            duration_ms: 800,
        }),
    }
}

/// Snapshots behind: Consul's newest is 3 hours old with a 1-hour interval; Vault's last attempt failed.
fn snapshots_behind() -> Observations {
    let mut o = healthy();
    o.snapshots.insert(
        "consul".into(),
        Some(Ok(Some(snapshot_record("consul", 0, 3 * 3600, true)))),
    );
    o.snapshots.insert(
        "vault".into(),
        Some(Ok(Some(snapshot_record("vault", 1, 40 * 60, false)))),
    );
    o
}

fn consul_server_down() -> Observations {
    let mut o = healthy();
    let dead = "consul-000002";
    o.consul.probes[2].answer = err("cannot connect: Connection refused");
    if let Some(Ok(ms)) = &mut o.consul.members {
        ms.iter_mut().find(|m| m.name == dead).unwrap().status = "failed".into();
    }
    if let Some(Ok(ap)) = &mut o.consul.autopilot {
        ap.healthy = false;
        ap.failure_tolerance = 0;
        let s = ap.servers.iter_mut().find(|s| s.name == dead).unwrap();
        s.healthy = false;
        s.status = "failed".into();
    }
    o
}

fn vault_sealed_and_down() -> Observations {
    let mut o = healthy();
    o.vault.health[0].answer = ok(VaultHealth {
        initialized: true,
        sealed: true,
        standby: true,
        version: "1.18.1".into(),
    });
    o.vault.health[1].answer = err("no answer within 3s");
    if let Some(Ok(ap)) = &mut o.vault.autopilot {
        ap.healthy = false;
        ap.failure_tolerance = 0;
        for s in ap.servers.iter_mut().take(2) {
            s.healthy = false;
        }
    }
    o
}

fn bootstrapping() -> Observations {
    let mut o = healthy();
    let mut st = TierState::new("prod", "consul", "consul-000000");
    st.set(TierPhase::Initializing, "consul-000000", None);
    st.updated_unix = NOW - 12;
    st.history.clear();
    o.consul.state = ok(Some(st));
    o.consul.token = TokenState::Missing;
    o.consul.raft = None;
    o.consul.autopilot = None;
    o.consul.members = None;
    o.consul.acl = None;
    o.vault.state = ok(None);
    o.vault.token = TokenState::Missing;
    o.vault.raft = None;
    o.vault.autopilot = None;
    o.vault.via = None;
    for h in &mut o.vault.health {
        h.answer = ok(VaultHealth {
            initialized: false,
            sealed: true,
            standby: true,
            version: "1.18.1".into(),
        });
    }
    o.nomad = NomadObs::default();
    o.records
        .retain(|r| !matches!(r.boot.role.as_deref(), Some("nomad-server" | "worker")));
    for r in &mut o.records {
        r.boot.bootstrap = None;
        r.boot.finished_unix = NOW - 40;
        r.published_unix = NOW - 40;
    }
    o
}

fn bad_tag_and_missing_receipt() -> Observations {
    let mut o = healthy();
    let mut stray = record(
        "stray-0",
        "consul-server",
        "10.0.1.99",
        &[("consul-servers", 3)],
    );
    stray.boot.role = None;
    stray.role_tag = Some("consul-sever".into());
    stray.boot.ok = false;
    stray.boot.phase = Phase::NodeSpec;
    stray.boot.bootstrap = None;
    stray.boot.versions.clear();
    stray.boot.finished_unix = NOW - 95;
    stray.boot.last_error = Some(
        "tag hashistack-role: unknown role \"consul-sever\" (consul-server, vault-server, nomad-server, worker, jumpbox)"
            .into(),
    );
    o.records.push(stray);
    if let Some(Ok(Some(st))) = &mut o.vault.state {
        st.receipts.clear();
    }
    o
}

fn cannot_tell() -> Observations {
    let mut o = healthy();
    o.records.clear();
    o.records_error = Some("list node records: cannot connect: Connection refused".into());
    for s in [&mut o.consul.state, &mut o.vault.state, &mut o.nomad.state] {
        *s = err("coordination read: cannot connect (gave up after 4 attempts in 5.0s)");
    }
    o.consul = ConsulObs {
        state: o.consul.state.clone(),
        token: TokenState::Error("cannot connect".into()),
        via: Some("10.0.5.4:8501 and 0 servers".into()),
        leader: err("cannot connect: Connection refused"),
        ..Default::default()
    };
    o.vault = VaultObs {
        state: o.vault.state.clone(),
        token: TokenState::Error("cannot connect".into()),
        ..Default::default()
    };
    o.nomad = NomadObs {
        state: o.nomad.state.clone(),
        token: TokenState::Error("cannot connect".into()),
        ..Default::default()
    };
    o
}

/// A Nomad client stopped heartbeating: its node is `down`.
fn nomad_client_down() -> Observations {
    let mut o = healthy();
    if let Some(Ok(nodes)) = &mut o.nomad.nodes {
        nodes[1].status = "down".into();
    }
    o
}

/// A worker booted (its record says ok) but Nomad does not list a client node for it.
fn nomad_worker_unregistered() -> Observations {
    let mut o = healthy();
    o.records
        .push(record("workers-000002", "worker", "10.0.4.6", &[]));
    o.records.sort_by(|a, b| a.boot.node.cmp(&b.boot.node));
    o
}

/// The Nomad status token is refused (deleted, or its policy changed).
fn nomad_token_refused() -> Observations {
    let mut o = healthy();
    o.nomad.nodes = err("HTTP 403: Permission denied");
    o
}

/// Adds a Consul gossip member (a client: role `node`).
fn add_member(o: &mut Observations, name: &str, addr: &str, status: &str) {
    if let Some(Ok(ms)) = &mut o.consul.members {
        ms.push(Member {
            name: name.into(),
            addr: addr.into(),
            role: "node".into(),
            status: status.into(),
            version: "1.20.0".into(),
        });
    }
}

fn set_member(o: &mut Observations, name: &str, status: &str) {
    if let Some(Ok(ms)) = &mut o.consul.members {
        ms.iter_mut()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
            .status = status.into();
    }
}

fn nomad_node(name: &str, address: &str, status: &str) -> NomadNode {
    NomadNode {
        name: name.into(),
        address: address.into(),
        status: status.into(),
        eligible: status == "ready",
    }
}

fn aged(mut r: NodeRecord, secs: i64) -> NodeRecord {
    r.boot.finished_unix = NOW - secs;
    r.published_unix = NOW - secs;
    r
}

/// After scale-ins: workers and a Nomad server that have left the cluster, their boot records still there.
/// * workers-000002 stopped gracefully 2 days after its boot: Consul `left`, its Nomad node `down`;
/// * workers-000003 left 5 days ago: Consul has reaped it, Nomad has garbage-collected its node;
/// * workers-000009's record was deleted by hand, its Nomad node is still listed `down`, Consul says `left`;
/// * nomad-000003 (the tier went from 4 servers to 3): Consul `left`, no raft peer, unreachable.
///
/// Healthy: none of them is counted or a problem; they are listed on one line.
fn departed_nodes() -> Observations {
    let mut o = healthy();
    o.records.push(aged(
        record("workers-000002", "worker", "10.0.4.6", &[]),
        2 * 86_400,
    ));
    o.records.push(aged(
        record("workers-000003", "worker", "10.0.4.7", &[]),
        5 * 86_400,
    ));
    o.records.push(aged(
        record(
            "nomad-000003",
            "nomad-server",
            "10.0.3.7",
            &[("nomad-servers", 3)],
        ),
        9 * 86_400,
    ));
    o.records.sort_by(|a, b| a.boot.node.cmp(&b.boot.node));
    add_member(&mut o, "workers-000002", "10.0.4.6", "left");
    add_member(&mut o, "workers-000009", "10.0.4.13", "left");
    add_member(&mut o, "nomad-000003", "10.0.3.7", "left");
    if let Some(Ok(nodes)) = &mut o.nomad.nodes {
        nodes.push(nomad_node("workers-000002", "10.0.4.6", "down"));
        nodes.push(nomad_node("workers-000009", "10.0.4.13", "down"));
    }
    o.nomad.probes.push(Probed {
        name: "nomad-000003".into(),
        address: "10.0.3.7".into(),
        answer: err("cannot connect: Connection refused"),
    });
    o
}

/// A worker went without leaving (power loss, a VM deleted without a clean shutdown): Consul marks it
/// `failed`, Nomad `down`. Degraded, naming it twice; not departed until Consul reaps it (72 h) or an
/// operator runs `consul force-leave`.
fn worker_failed() -> Observations {
    let mut o = healthy();
    set_member(&mut o, "workers-000001", "failed");
    if let Some(Ok(nodes)) = &mut o.nomad.nodes {
        nodes[1].status = "down".into();
    }
    o
}

fn golden_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/status_golden")
        .join(case)
}

fn update() -> bool {
    std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1")
}

fn check(case: &str, file: &str, actual: &str, failures: &mut Vec<String>) {
    let path = golden_dir(case).join(file);
    if update() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    match std::fs::read_to_string(&path) {
        Ok(want) if want == actual => {}
        Ok(want) => failures.push(format!(
            "{case}/{file} differs.\n--- golden\n{want}\n--- actual\n{actual}"
        )),
        Err(_) => failures.push(format!(
            "{case}/{file}: no golden (run with UPDATE_GOLDEN=1 to create it)"
        )),
    }
}

fn cases() -> Vec<(&'static str, Observations, Verdict)> {
    vec![
        ("healthy", healthy(), Verdict::Healthy),
        ("snapshots-behind", snapshots_behind(), Verdict::Degraded),
        (
            "consul-server-down",
            consul_server_down(),
            Verdict::Degraded,
        ),
        (
            "vault-sealed-and-down",
            vault_sealed_and_down(),
            Verdict::Degraded,
        ),
        ("bootstrapping", bootstrapping(), Verdict::Degraded),
        (
            "bad-tag-and-missing-receipt",
            bad_tag_and_missing_receipt(),
            Verdict::Degraded,
        ),
        ("cannot-tell", cannot_tell(), Verdict::Unknown),
        ("nomad-client-down", nomad_client_down(), Verdict::Degraded),
        (
            "nomad-worker-unregistered",
            nomad_worker_unregistered(),
            Verdict::Degraded,
        ),
        (
            "nomad-token-refused",
            nomad_token_refused(),
            Verdict::Unknown,
        ),
        ("departed-nodes", departed_nodes(), Verdict::Healthy),
        ("worker-failed", worker_failed(), Verdict::Degraded),
    ]
}

#[test]
fn tables_and_json_match_the_goldens() {
    let mut failures = vec![];
    for (case, obs, verdict) in cases() {
        let report = assess(&obs);
        assert_eq!(report.verdict, verdict, "{case}: {}", report.summary);
        assert_eq!(report.exit_code, verdict.exit_code(), "{case}");
        check(
            case,
            "table.txt",
            &render::table(&report, false),
            &mut failures,
        );
        check(
            case,
            "report.json",
            &(render::json(&report, true) + "\n"),
            &mut failures,
        );
        if case == "consul-server-down" {
            check(
                case,
                "table.ansi",
                &render::table(&report, true),
                &mut failures,
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatch(es) (UPDATE_GOLDEN=1 regenerates; review the diff):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_verdict_line_comes_first_and_the_plain_table_has_no_escape_codes() {
    for (case, obs, verdict) in cases() {
        let r = assess(&obs);
        let plain = render::table(&r, false);
        assert!(plain.starts_with(verdict.word()), "{case}: {plain}");
        assert!(!plain.contains('\x1b'), "{case}");
        let color = render::table(&r, true);
        assert!(color.contains('\x1b'), "{case}: colour when asked");
        assert_eq!(plain.lines().count(), color.lines().count(), "{case}");
    }
}

#[test]
fn the_report_round_trips_and_keeps_its_schema() {
    let r = assess(&consul_server_down());
    let text = render::json(&r, true);
    let back: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema"], SCHEMA);
    // The documented top-level fields (docs/status.md), no more, no fewer.
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "cluster",
            "exit_code",
            "nodes",
            "observed_unix",
            "observer",
            "problems",
            "schema",
            "summary",
            "tiers",
            "verdict"
        ]
    );
}

#[test]
fn observations_round_trip_through_json() {
    // Observations are the input format of these snapshots (and what `--json` would be built from).
    let o = bad_tag_and_missing_receipt();
    let text = serde_json::to_string(&o).unwrap();
    let back: Observations = serde_json::from_str(&text).unwrap();
    assert_eq!(assess(&back), assess(&o));
}

fn node<'a>(r: &'a Report, name: &str) -> &'a NodeReport {
    r.nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn subjects(r: &Report) -> Vec<(Severity, String, String)> {
    r.problems
        .iter()
        .map(|p| {
            (
                p.severity,
                p.subject.clone().unwrap_or_default(),
                p.message.clone(),
            )
        })
        .collect()
}

#[test]
fn departed_nodes_are_listed_not_counted_and_not_problems() {
    let r = assess(&departed_nodes());
    assert_eq!(r.verdict, Verdict::Healthy, "{:?}", subjects(&r));
    for name in ["workers-000002", "workers-000003", "nomad-000003"] {
        assert!(node(&r, name).departed, "{name}");
    }
    assert_eq!(node(&r, "workers-000002").member.as_deref(), Some("left"));
    assert_eq!(node(&r, "workers-000003").member.as_deref(), Some("absent"));
    assert!(r.nodes.iter().filter(|n| n.departed).all(|n| n.ok));
    assert_eq!(
        r.nodes.iter().filter(|n| n.departed).count(),
        3,
        "exactly the three"
    );
    let nomad = &r.tiers[2];
    assert_eq!(nomad.clients, Some(Clients { ready: 2, total: 2 }));
    assert_eq!(nomad.departed_clients, ["workers-000002", "workers-000009"]);
    assert_eq!(nomad.servers.len(), 3, "the removed Nomad server is no row");
    assert_eq!(r.tiers[0].clients, Some(Clients { ready: 9, total: 9 }));
    assert!(
        r.summary.ends_with("12 agents ok, 4 departed"),
        "{}",
        r.summary
    );
    let table = render::table(&r, false);
    assert!(
        table.contains("agents: 15 published, 12 ok, 0 failed, 3 departed\n"),
        "{table}"
    );
    let line = table
        .lines()
        .find(|l| l.starts_with("departed (left the cluster, not counted): "))
        .expect("one departed line");
    // Most recent boot first; the node without a record last.
    let order: Vec<usize> = [
        "workers-000002 (left; last boot 2d ago)",
        "workers-000003 (no longer a member; last boot 5d ago)",
        "nomad-000003 (left; last boot 9d ago)",
        "workers-000009 (Nomad node down; no boot record)",
    ]
    .iter()
    .map(|w| line.find(w).unwrap_or_else(|| panic!("{w} in {line}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{line}");
}

#[test]
fn a_failed_member_is_a_problem_and_not_departed() {
    let r = assess(&worker_failed());
    assert_eq!(r.verdict, Verdict::Degraded);
    let s = subjects(&r);
    assert!(s.contains(&(
        Severity::Degraded,
        "workers-000001".into(),
        "workers-000001: client agent failed (gossip)".into()
    )));
    assert!(s.contains(&(
        Severity::Degraded,
        "workers-000001".into(),
        "workers-000001: client node down".into()
    )));
    assert!(!node(&r, "workers-000001").departed);
    assert_eq!(node(&r, "workers-000001").member.as_deref(), Some("failed"));
    assert!(!render::table(&r, false).contains("departed"));
    // `consul force-leave` turns it into `left`: departed, healthy again.
    let mut o = worker_failed();
    set_member(&mut o, "workers-000001", "left");
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Healthy, "{:?}", subjects(&r));
    assert!(node(&r, "workers-000001").departed);
    assert_eq!(r.tiers[2].clients, Some(Clients { ready: 1, total: 1 }));
}

#[test]
fn a_failed_boot_stays_a_problem_even_when_its_node_left() {
    let mut o = bad_tag_and_missing_receipt();
    add_member(&mut o, "stray-0", "10.0.1.99", "left");
    if let Some(r) = o.records.iter_mut().find(|r| r.boot.node == "stray-0") {
        r.published_unix = NOW - 30 * 86_400;
        r.boot.finished_unix = NOW - 30 * 86_400;
    }
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Degraded);
    assert!(!node(&r, "stray-0").departed);
    assert!(r
        .problems
        .iter()
        .any(|p| p.subject.as_deref() == Some("stray-0")
            && p.message.contains("agent failed in phase node-spec")));
    // And without any member entry at all (a node that never joined): the same.
    let r = assess(&bad_tag_and_missing_receipt());
    assert!(!node(&r, "stray-0").departed);
    assert_eq!(node(&r, "stray-0").member.as_deref(), Some("absent"));
}

#[test]
fn without_the_member_list_nobody_departs() {
    let mut o = departed_nodes();
    o.consul.members = err("HTTP 403: Permission denied");
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Degraded);
    assert!(r.nodes.iter().all(|n| !n.departed && n.member.is_none()));
    assert!(r.tiers[2].departed_clients.is_empty());
    let s = subjects(&r);
    for (who, what) in [
        ("workers-000002", "workers-000002: client node down"),
        ("workers-000009", "workers-000009: client node down"),
        (
            "workers-000003",
            "workers-000003: no Nomad client node (the worker booted, Nomad does not list it)",
        ),
    ] {
        assert!(
            s.contains(&(Severity::Degraded, who.into(), what.into())),
            "{s:?}"
        );
    }
}

#[test]
fn a_recent_record_that_consul_does_not_list_is_not_departed() {
    // Consul forgets a member 24 h after it left at the earliest: a younger record is a node that has not
    // joined (yet), and its problems stay visible.
    let r = assess(&nomad_worker_unregistered());
    assert_eq!(r.verdict, Verdict::Degraded);
    let w = node(&r, "workers-000002");
    assert_eq!(w.member.as_deref(), Some("absent"));
    assert!(!w.departed);
    // The same record a day older: reaped, departed.
    let mut o = nomad_worker_unregistered();
    for rec in o
        .records
        .iter_mut()
        .filter(|r| r.boot.node == "workers-000002")
    {
        rec.published_unix = NOW - 86_400;
    }
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Healthy, "{:?}", subjects(&r));
    assert!(node(&r, "workers-000002").departed);
}

#[test]
fn a_node_that_never_joined_consul_is_a_problem_after_the_join_grace() {
    // A worker Nomad lists as ready whose Consul agent never joined (a wrong gossip key, port 8301 closed).
    let mut o = healthy();
    o.records.push(aged(
        record("workers-000002", "worker", "10.0.4.6", &[]),
        600,
    ));
    o.records.sort_by(|a, b| a.boot.node.cmp(&b.boot.node));
    if let Some(Ok(nodes)) = &mut o.nomad.nodes {
        nodes.push(nomad_node("workers-000002", "10.0.4.6", "ready"));
    }
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Degraded, "{:?}", subjects(&r));
    let s = subjects(&r);
    assert!(
        s.iter().any(|(sev, who, what)| *sev == Severity::Degraded
            && who == "workers-000002"
            && what.starts_with("workers-000002: not a Consul member 10m after its boot")),
        "{s:?}"
    );
    assert!(!node(&r, "workers-000002").departed);
    // Within the join grace it is still joining: healthy.
    for rec in o
        .records
        .iter_mut()
        .filter(|r| r.boot.node == "workers-000002")
    {
        rec.published_unix = NOW - (JOIN_GRACE_SECS - 1);
    }
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Healthy, "{:?}", subjects(&r));
}

#[test]
fn a_node_a_tier_still_counts_is_not_departed() {
    // A Vault server stopped gracefully: its Consul client left, but raft still lists it.
    let mut o = healthy();
    add_member(&mut o, "vault-000001", "10.0.2.5", "left");
    if let Some(Ok(ms)) = &mut o.consul.members {
        ms.retain(|m| !(m.name == "vault-000001" && m.status == "alive"));
    }
    o.vault.health[1].answer = err("cannot connect: Connection refused");
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Degraded);
    assert!(!node(&r, "vault-000001").departed);
    assert!(
        r.problems
            .iter()
            .any(|p| p.subject.as_deref() == Some("vault-000001")
                && p.message.contains("unreachable"))
    );
    // A worker that left Consul while Nomad still calls its node ready (before the heartbeat TTL runs out).
    let mut o = healthy();
    set_member(&mut o, "workers-000001", "left");
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Healthy);
    assert!(!node(&r, "workers-000001").departed);
    assert_eq!(r.tiers[2].clients, Some(Clients { ready: 2, total: 2 }));
    // A Nomad node that is not `down` (initializing) is not departed, whatever Consul says.
    let mut o = healthy();
    set_member(&mut o, "workers-000001", "left");
    if let Some(Ok(nodes)) = &mut o.nomad.nodes {
        nodes[1].status = "initializing".into();
    }
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Degraded);
    assert!(!node(&r, "workers-000001").departed);
}

#[test]
fn the_departed_line_names_at_most_five() {
    let mut o = healthy();
    for i in 0..8 {
        let name = format!("workers-00010{i}");
        let ip = format!("10.0.4.{}", 100 + i);
        o.records.push(aged(
            record(&name, "worker", &ip, &[]),
            86_400 * (2 + i as i64),
        ));
        add_member(&mut o, &name, &ip, "left");
    }
    let r = assess(&o);
    assert_eq!(r.verdict, Verdict::Healthy);
    let table = render::table(&r, false);
    let line = table
        .lines()
        .find(|l| l.starts_with("departed"))
        .expect("departed line");
    assert_eq!(line.matches("; last boot").count(), 5, "{line}");
    assert!(line.ends_with(", +3 more (--json lists them)"), "{line}");
    assert!(
        line.contains("workers-000100 (left; last boot 2d ago)"),
        "{line}"
    );
    assert!(!line.contains("workers-000107"), "oldest left out: {line}");
    assert_eq!(
        table.lines().filter(|l| l.starts_with("departed")).count(),
        1
    );
}

#[test]
fn reports_without_the_departed_fields_still_parse() {
    // hashistack-status/1 grew `nodes[].member`, `nodes[].departed` and `tiers[].departed_clients`; a report
    // written before them reads with their defaults.
    let r = assess(&departed_nodes());
    let mut v: serde_json::Value = serde_json::from_str(&render::json(&r, false)).unwrap();
    for n in v["nodes"].as_array_mut().unwrap() {
        let n = n.as_object_mut().unwrap();
        n.remove("member");
        n.remove("departed");
    }
    for t in v["tiers"].as_array_mut().unwrap() {
        t.as_object_mut().unwrap().remove("departed_clients");
    }
    let back: Report = serde_json::from_value(v).unwrap();
    assert!(back.nodes.iter().all(|n| !n.departed && n.member.is_none()));
    assert!(back.tiers.iter().all(|t| t.departed_clients.is_empty()));
    assert_eq!(back.schema, SCHEMA);
}
