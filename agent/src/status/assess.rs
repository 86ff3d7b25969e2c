//! Observations → report: the verdict, the problems and the rows. Pure (no I/O, no clock: "now" is the
//! observation time), so fixed observations always give the same report.
//!
//! Rules, in short (docs/status.md has the full list):
//! * a server that does not answer, a failed gossip member, a server autopilot calls unhealthy, a sealed Vault
//!   node, no leader, no active Vault node, a bootstrap that is not done, a missing escrow receipt, an agent that
//!   reported a failed boot: **degraded** (exit 1);
//! * a question that could not be asked (coordination unreadable, no status token, no API of a tier answered
//!   while nothing else did either): **unknown** (exit 2) — unless something is known to be wrong;
//! * a node that has left the cluster (its last boot succeeded, Consul says `left` or no longer lists it, and
//!   no tier still counts it): **departed** — listed, never counted as expected or failed, no problem.

use super::model::*;
use crate::coordination::{TierPhase, TierState};
use crate::publish::NodeRecord;
use std::collections::BTreeMap;

/// The note of a server that raft no longer lists and that is gone (a replaced or removed VM).
const LEFTOVER: &str = "not in raft (replaced or removed)";

/// Consul forgets a member no sooner than this after it left (serf's tombstone timeout, 24 h; a failed member
/// is reaped after `reconnect_timeout`, 72 h by default). A node that Consul does not list and whose boot record
/// is younger cannot have been reaped: it has not joined yet (agents publish their record as soon as their
/// services start), or never did — not departed.
pub const REAPED_AFTER_SECS: i64 = 24 * 3600;

/// Consul's gossip members, name → status (`None`: the member list is unknown).
fn members_by_name(o: &Observations) -> Option<BTreeMap<&str, &str>> {
    match &o.consul.members {
        Some(Ok(ms)) => Some(
            ms.iter()
                .map(|m| (m.name.as_str(), m.status.as_str()))
                .collect(),
        ),
        _ => None,
    }
}

/// Nodes whose last boot succeeded and whose Consul agent has gone since: name → `left` (a graceful leave or
/// `consul force-leave`) or `absent` (no longer a member: reaped; only when the record is older than
/// [`REAPED_AFTER_SECS`]). Empty when the member list is unknown: nobody is assumed gone. A `failed` member
/// is not gone (the VM may only be down) until Consul reaps it. Whether such a node counts as departed also
/// depends on the tiers (a server raft still lists, a Nomad node not `down`): see [`assess`].
fn gone_from_consul(o: &Observations) -> BTreeMap<String, &'static str> {
    let Some(members) = members_by_name(o) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for r in o.records.iter().filter(|r| r.boot.ok) {
        match members.get(r.boot.node.as_str()) {
            Some(&"left") => {
                out.insert(r.boot.node.clone(), "left");
            }
            None if o.observed_unix - r.published_unix >= REAPED_AFTER_SECS => {
                out.insert(r.boot.node.clone(), "absent");
            }
            _ => {}
        }
    }
    out
}

/// `ip:port` → `ip`.
pub fn host(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

/// `42s`, `5m`, `3h`, `2d` — how long before `now`.
pub fn age(now: i64, then: i64) -> String {
    let s = (now - then).max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, severity: Severity, area: &str, subject: Option<&str>, message: String) {
        self.0.push(Problem {
            severity,
            area: area.into(),
            subject: subject.map(String::from),
            message,
        });
    }
    fn bad(&mut self, area: &str, subject: Option<&str>, message: String) {
        self.add(Severity::Degraded, area, subject, message)
    }
    fn unknown(&mut self, area: &str, subject: Option<&str>, message: String) {
        self.add(Severity::Unknown, area, subject, message)
    }
}

fn phase_name(p: TierPhase) -> &'static str {
    match p {
        TierPhase::Initializing => "initializing",
        TierPhase::Initialized => "initialized",
        TierPhase::Escrowed => "escrowed",
        TierPhase::Done => "done",
        TierPhase::NeedsOperator => "needs-operator",
    }
}

fn bootstrap_report(s: &TierState) -> Bootstrap {
    Bootstrap {
        phase: phase_name(s.phase).into(),
        leader_node: s.leader.clone(),
        updated_unix: s.updated_unix,
        message: s.message.clone(),
        escrow_id: s.escrow_id.clone(),
        receipts: s
            .receipts
            .iter()
            .map(|r| Receipt {
                target: r.target.clone(),
                object: r.object.clone(),
                written_unix: r.written_unix,
            })
            .collect(),
    }
}

/// The tier's bootstrap record and its problems. Returns whether the bootstrap is done.
fn assess_bootstrap(
    tier: &str,
    state: &Got<Option<TierState>>,
    now: i64,
    p: &mut Problems,
) -> (Option<Bootstrap>, bool) {
    match state {
        None => (None, false),
        Some(Err(e)) => {
            p.unknown(tier, None, format!("cannot read the bootstrap state: {e}"));
            (None, false)
        }
        Some(Ok(None)) => {
            p.bad(
                tier,
                None,
                "not bootstrapped yet (no bootstrap state in the coordination container)".into(),
            );
            (None, false)
        }
        Some(Ok(Some(s))) => {
            let b = bootstrap_report(s);
            match s.phase {
                TierPhase::NeedsOperator => p.bad(
                    tier,
                    None,
                    format!(
                        "bootstrap needs an operator: {}",
                        s.message.as_deref().unwrap_or("(no message)")
                    ),
                ),
                TierPhase::Initializing | TierPhase::Initialized => p.bad(
                    tier,
                    None,
                    format!(
                        "bootstrap in progress: {} by {}, {} ago",
                        phase_name(s.phase),
                        s.leader,
                        age(now, s.updated_unix)
                    ),
                ),
                TierPhase::Escrowed | TierPhase::Done => {
                    let missing: Vec<&str> = ["blob", "keyvault"]
                        .into_iter()
                        .filter(|t| !s.receipts.iter().any(|r| r.target == *t))
                        .collect();
                    if !missing.is_empty() {
                        p.bad(
                            tier,
                            None,
                            format!(
                                "escrow receipt missing: {} (bootstrap secrets may not be recoverable; run `hashistack-agent escrow verify`)",
                                missing.join(", ")
                            ),
                        );
                    }
                    if s.phase == TierPhase::Escrowed {
                        p.bad(
                            tier,
                            None,
                            format!(
                                "bootstrap in progress: escrowed by {}, {} ago, configuration not finished",
                                s.leader,
                                age(now, s.updated_unix)
                            ),
                        );
                    }
                }
            }
            (Some(b), s.phase == TierPhase::Done)
        }
    }
}

fn token_word(t: &TokenState) -> String {
    match t {
        TokenState::Present => "present",
        TokenState::Missing => "missing",
        TokenState::Error(_) => "error",
        TokenState::NotTried => "not-tried",
    }
    .into()
}

/// Problems with the status token, when the tier is bootstrapped (before that, there is none to have).
fn assess_token(tier: &str, secret: &str, t: &TokenState, done: bool, p: &mut Problems) {
    match t {
        TokenState::Missing if done => p.unknown(
            tier,
            None,
            format!("status token `{secret}` is not in the status Key Vault: raft and membership details unknown (docs/status.md#status-tokens)"),
        ),
        TokenState::Error(e) => p.unknown(
            tier,
            None,
            format!("cannot fetch the status token `{secret}`: {e}"),
        ),
        _ => {}
    }
}

/// The tier's snapshots, from its record (`None`: not collected). DEGRADED when the last attempt failed, when the
/// newest snapshot is older than twice the interval, and when a tier bootstrapped more than twice the (default)
/// interval ago has none at all.
fn assess_snapshot(
    tier: &TierReport,
    got: Option<&Got<Option<crate::snapshot::Record>>>,
    now: i64,
    p: &mut Problems,
) -> Option<SnapshotReport> {
    let got = got?.as_ref()?;
    let name = tier.tier.as_str();
    let mut r = SnapshotReport {
        state: "unknown".into(),
        interval_secs: None,
        retention_days: None,
        blob: None,
        node: None,
        created_unix: None,
        age_secs: None,
        index: None,
        plaintext_bytes: None,
        stored_bytes: None,
        last_attempt_ok: None,
        last_attempt_node: None,
        last_attempt_unix: None,
        last_error: None,
    };
    let record = match got {
        Err(e) => {
            p.unknown(name, None, format!("cannot read the snapshot record: {e}"));
            return Some(r);
        }
        Ok(rec) => rec,
    };
    let interval = record.as_ref().map_or(
        crate::node::SnapshotSettings::default().interval_secs,
        |x| x.interval_secs,
    );
    r.interval_secs = Some(interval);
    let Some(rec) = record else {
        r.state = "none".into();
        let done_since = tier
            .bootstrap
            .as_ref()
            .filter(|b| b.phase == "done")
            .map(|b| b.updated_unix);
        if let Some(since) = done_since {
            if now - since > 2 * interval as i64 {
                p.bad(
                    name,
                    None,
                    format!(
                        "no snapshot yet, {} after the bootstrap (hashistack-snapshot.timer takes one every {}; docs/runbooks.md#snapshots)",
                        age(now, since),
                        age(interval as i64, 0)
                    ),
                );
            }
        }
        return Some(r);
    };
    r.retention_days = Some(rec.retention_days);
    if let Some(t) = &rec.last_success {
        r.blob = Some(t.blob.clone());
        r.node = Some(t.node.clone());
        r.created_unix = Some(t.created_unix);
        r.age_secs = Some(now - t.created_unix);
        r.index = Some(t.index);
        r.plaintext_bytes = Some(t.plaintext_bytes);
        r.stored_bytes = Some(t.stored_bytes);
    }
    if let Some(a) = &rec.last_attempt {
        r.last_attempt_ok = Some(a.ok);
        r.last_attempt_node = Some(a.node.clone());
        r.last_attempt_unix = Some(a.at_unix);
        r.last_error = a.error.clone();
    }
    let stale = rec
        .last_success
        .as_ref()
        .is_none_or(|t| now - t.created_unix > 2 * interval as i64);
    r.state = if r.last_attempt_ok == Some(false) {
        "failed"
    } else if stale {
        "stale"
    } else {
        "ok"
    }
    .into();
    if let Some(a) = rec.last_attempt.as_ref().filter(|a| !a.ok) {
        p.bad(
            name,
            Some(&a.node),
            format!(
                "the last snapshot attempt failed {} ago: {}",
                age(now, a.at_unix),
                a.error.as_deref().unwrap_or("(no message)")
            ),
        );
    }
    if stale {
        p.bad(
            name,
            None,
            match &rec.last_success {
                Some(t) => format!(
                    "the newest snapshot is {} old (interval {}; docs/runbooks.md#snapshots)",
                    age(now, t.created_unix),
                    age(interval as i64, 0)
                ),
                None => "no snapshot has succeeded yet (docs/runbooks.md#snapshots)".into(),
            },
        );
    }
    Some(r)
}

/// The tier size the tier's nodes declare in their tags (the most common value; ties: the larger).
fn expected(o: &Observations, key: &str) -> Option<u8> {
    let mut count: BTreeMap<u8, usize> = BTreeMap::new();
    for r in &o.records {
        if let Some(n) = r.expects.get(key) {
            *count.entry(*n).or_default() += 1;
        }
    }
    count
        .into_iter()
        .max_by_key(|(n, c)| (*c, *n))
        .map(|(n, _)| n)
}

fn records_of<'a>(o: &'a Observations, role: &'a str) -> impl Iterator<Item = &'a NodeRecord> {
    o.records
        .iter()
        .filter(move |r| r.boot.role.as_deref() == Some(role))
}

fn name_for_ip(o: &Observations, ip: &str) -> Option<String> {
    o.records
        .iter()
        .find(|r| r.ip.as_deref() == Some(ip))
        .map(|r| r.boot.node.clone())
}

/// Strips the distribution word: `consul 1.8.7` → `1.8.7`.
fn bare_version(v: &str) -> String {
    v.rsplit(' ')
        .next()
        .unwrap_or(v)
        .trim_start_matches('v')
        .to_string()
}

fn distinct_versions(servers: &[ServerReport]) -> Vec<String> {
    let mut v: Vec<String> = servers.iter().filter_map(|s| s.version.clone()).collect();
    v.sort();
    v.dedup();
    v
}

/// The problem line for a call made with a status token that failed: a refusal (401/403) blames the token,
/// anything else says what could not be done.
fn token_call_failed(e: &str, doing: &str) -> String {
    if e.starts_with("HTTP 401") || e.starts_with("HTTP 403") {
        format!("status token refused: {}", err_short(e))
    } else {
        format!("{doing}: {}", err_short(e))
    }
}

fn err_short(e: &str) -> String {
    let e = e.trim();
    if e.chars().count() > 160 {
        format!("{}…", e.chars().take(160).collect::<String>())
    } else {
        e.to_string()
    }
}

struct Servers(BTreeMap<String, ServerReport>);

impl Servers {
    fn entry(&mut self, name: &str) -> &mut ServerReport {
        self.0
            .entry(name.to_string())
            .or_insert_with(|| ServerReport {
                name: name.to_string(),
                ..Default::default()
            })
    }
}

fn consul(o: &Observations, anything_answered: bool, p: &mut Problems) -> TierReport {
    let c = &o.consul;
    let now = o.observed_unix;
    let tier = "consul";
    let expected_servers = expected(o, "consul-servers");
    let (bootstrap, done) = assess_bootstrap(tier, &c.state, now, p);
    assess_token(tier, crate::names::CONSUL_SECRET, &c.token, done, p);

    let mut s = Servers(BTreeMap::new());
    let raft_known = matches!(c.raft, Some(Ok(_)));
    let leader_addr = match &c.leader {
        Some(Ok(l)) if !l.is_empty() => Some(l.clone()),
        _ => None,
    };
    if let Some(Ok(raft)) = &c.raft {
        for r in raft {
            let e = s.entry(&r.node);
            e.address = Some(host(&r.address).to_string());
            e.raft = Some(
                if r.leader {
                    "leader"
                } else if r.voter {
                    "voter"
                } else {
                    "non-voter"
                }
                .into(),
            );
        }
    } else if let Some(Ok(peers)) = &c.peers {
        for a in peers {
            let ip = host(a);
            let name = name_for_ip(o, ip).unwrap_or_else(|| ip.to_string());
            let e = s.entry(&name);
            e.address = Some(ip.to_string());
            e.raft = Some(
                if leader_addr.as_deref() == Some(a.as_str()) {
                    "leader"
                } else {
                    "voter"
                }
                .into(),
            );
        }
    }
    if let Some(Ok(ap)) = &c.autopilot {
        for a in &ap.servers {
            let e = s.entry(&a.name);
            e.healthy = Some(a.healthy);
            if e.address.is_none() {
                e.address = Some(host(&a.address).to_string());
            }
            if !a.version.is_empty() {
                e.version = Some(bare_version(&a.version));
            }
        }
    }
    if let Some(Ok(members)) = &c.members {
        for m in members.iter().filter(|m| m.role == "consul") {
            if raft_known && !s.0.contains_key(&m.name) && m.status == "left" {
                continue;
            }
            let e = s.entry(&m.name);
            e.member = Some(m.status.clone());
            if e.address.is_none() {
                e.address = Some(m.addr.clone());
            }
            if e.version.is_none() && !m.version.is_empty() {
                e.version = Some(bare_version(&m.version));
            }
        }
    }
    for pr in &c.probes {
        // A published server that neither raft nor gossip knows counts only if it answers (else: a VM that was replaced).
        if raft_known && !s.0.contains_key(&pr.name) && !matches!(pr.answer, Some(Ok(_))) {
            continue;
        }
        let e = s.entry(&pr.name);
        if e.address.is_none() {
            e.address = Some(pr.address.clone());
        }
        match &pr.answer {
            Some(Ok(_)) => e.reachable = Some(true),
            Some(Err(err)) => {
                e.reachable = Some(false);
                e.note = Some(format!("unreachable ({})", err_short(err)));
            }
            None => {}
        }
    }
    for r in records_of(o, "consul-server") {
        if let Some(e) = s.0.get_mut(&r.boot.node) {
            if e.version.is_none() {
                e.version = r.boot.versions.get("consul").map(|v| bare_version(v));
            }
        }
    }
    if raft_known {
        for e in s.0.values_mut() {
            if e.raft.is_none() {
                e.raft = Some("absent".into());
            }
        }
    }

    let answered =
        matches!(c.leader, Some(Ok(_))) || c.probes.iter().any(|p| matches!(p.answer, Some(Ok(_))));
    let leader = leader_addr.as_ref().map(|a| {
        c.raft
            .as_ref()
            .and_then(|r| r.as_ref().ok())
            .and_then(|r| r.iter().find(|x| x.address == *a).map(|x| x.node.clone()))
            .or_else(|| name_for_ip(o, host(a)))
            .unwrap_or_else(|| a.clone())
    });
    let mut healthy_servers = 0;
    if !answered {
        let sev = if anything_answered {
            Severity::Degraded
        } else {
            Severity::Unknown
        };
        let via = c
            .via
            .clone()
            .unwrap_or_else(|| format!("{} servers", c.probes.len()));
        p.add(
            sev,
            tier,
            None,
            format!("no Consul API answered (tried {via})"),
        );
    } else {
        if matches!(c.leader, Some(Ok(ref l)) if l.is_empty()) {
            p.bad(
                tier,
                None,
                "no raft leader: the servers have no quorum".into(),
            );
        }
        for e in s.0.values_mut() {
            let mut why = vec![];
            let leftover = raft_known
                && e.raft.as_deref() == Some("absent")
                && (e.reachable == Some(false)
                    || matches!(e.member.as_deref(), Some("failed" | "left")));
            if leftover {
                e.note = Some(LEFTOVER.into());
                continue;
            }
            if e.reachable == Some(false) {
                why.push(e.note.clone().unwrap_or_else(|| "unreachable".into()));
            }
            if let Some(m) = e.member.as_deref().filter(|m| *m != "alive") {
                why.push(format!("gossip member {m}"));
            }
            if e.healthy == Some(false) {
                why.push("autopilot: unhealthy".into());
            }
            if e.raft.as_deref() == Some("absent") {
                why.push("not in the raft configuration".into());
            }
            if why.is_empty() {
                healthy_servers += 1;
            } else {
                e.note = Some(why.join("; "));
                p.bad(
                    tier,
                    Some(&e.name),
                    format!("{}: {}", e.name, why.join("; ")),
                );
            }
        }
        let counted =
            s.0.values()
                .filter(|e| e.note.as_deref() != Some(LEFTOVER))
                .count();
        if let Some(want) = expected_servers {
            if counted < want as usize {
                p.bad(
                    tier,
                    None,
                    format!("{counted} servers known, {want} expected (hashistack-consul-servers)"),
                );
            } else if counted > want as usize {
                p.bad(
                    tier,
                    None,
                    format!("{counted} servers, {want} expected (hashistack-consul-servers)"),
                );
            }
        }
        for (name, r) in [
            (
                "raft configuration",
                c.raft.as_ref().map(|r| r.as_ref().map(|_| ())),
            ),
            (
                "autopilot health",
                c.autopilot.as_ref().map(|r| r.as_ref().map(|_| ())),
            ),
            (
                "gossip members",
                c.members.as_ref().map(|r| r.as_ref().map(|_| ())),
            ),
        ] {
            if let Some(Err(e)) = r {
                p.unknown(
                    tier,
                    None,
                    format!("cannot read the {name}: {}", err_short(e)),
                );
            }
        }
    }
    if expected_servers.is_none() {
        p.unknown(
            tier,
            None,
            "expected server count unknown (no consul-server has published its boot record)".into(),
        );
    }
    let clients = match &c.members {
        Some(Ok(ms)) => {
            let cl: Vec<&Member> = ms
                .iter()
                .filter(|m| m.role != "consul" && m.status != "left")
                .collect();
            for m in cl.iter().filter(|m| m.status == "failed") {
                p.bad(
                    tier,
                    Some(&m.name),
                    format!("{}: client agent failed (gossip)", m.name),
                );
            }
            Some(Clients {
                ready: cl.iter().filter(|m| m.status == "alive").count(),
                total: cl.len(),
            })
        }
        _ => None,
    };
    let acl = match (&c.acl, &c.state) {
        (Some(Ok(_)), _) => "bootstrapped",
        (_, Some(Ok(None))) => "not-bootstrapped",
        (_, Some(Ok(Some(st)))) if st.phase != TierPhase::Done => "not-bootstrapped",
        _ => "unknown",
    };
    if let Some(Err(e)) = &c.acl {
        if done && c.token == TokenState::Present {
            p.unknown(
                tier,
                None,
                token_call_failed(e, "cannot check the status token"),
            );
        }
    }
    let servers: Vec<ServerReport> = s.0.into_values().collect();
    TierReport {
        tier: tier.into(),
        deployed: true,
        expected_servers,
        healthy_servers,
        leader,
        failure_tolerance: c
            .autopilot
            .as_ref()
            .and_then(|a| a.as_ref().ok())
            .map(|a| a.failure_tolerance),
        acl: acl.into(),
        initialized: None,
        sealed: None,
        active_node: None,
        versions: distinct_versions(&servers),
        clients,
        bootstrap,
        status_token: token_word(&c.token),
        servers,
        departed_clients: vec![],
        snapshot: None,
    }
}

fn vault(o: &Observations, anything_answered: bool, p: &mut Problems) -> TierReport {
    let v = &o.vault;
    let now = o.observed_unix;
    let tier = "vault";
    let expected_servers = expected(o, "vault-servers");
    let (bootstrap, done) = assess_bootstrap(tier, &v.state, now, p);
    assess_token(tier, crate::names::VAULT_SECRET, &v.token, done, p);
    let mut s = Servers(BTreeMap::new());
    let raft_known = matches!(v.raft, Some(Ok(_)));
    if let Some(Ok(raft)) = &v.raft {
        for r in raft {
            let e = s.entry(&r.node);
            e.address = Some(host(&r.address).to_string());
            e.raft = Some(
                if r.leader {
                    "leader"
                } else if r.voter {
                    "voter"
                } else {
                    "non-voter"
                }
                .into(),
            );
        }
    }
    if let Some(Ok(ap)) = &v.autopilot {
        for a in &ap.servers {
            let e = s.entry(&a.name);
            e.healthy = Some(a.healthy);
            if e.address.is_none() {
                e.address = Some(host(&a.address).to_string());
            }
            if !a.version.is_empty() {
                e.version = Some(bare_version(&a.version));
            }
        }
    }
    for h in &v.health {
        if raft_known && !s.0.contains_key(&h.name) && !matches!(h.answer, Some(Ok(_))) {
            continue;
        }
        let e = s.entry(&h.name);
        if e.address.is_none() {
            e.address = Some(h.address.clone());
        }
        match &h.answer {
            Some(Ok(hl)) => {
                e.reachable = Some(true);
                e.initialized = Some(hl.initialized);
                e.sealed = Some(hl.sealed);
                e.active = Some(hl.initialized && !hl.sealed && !hl.standby);
                if !hl.version.is_empty() {
                    e.version = Some(bare_version(&hl.version));
                }
            }
            Some(Err(err)) => {
                e.reachable = Some(false);
                e.note = Some(format!("unreachable ({})", err_short(err)));
            }
            None => {}
        }
    }
    if raft_known {
        for e in s.0.values_mut() {
            if e.raft.is_none() {
                e.raft = Some("absent".into());
            }
        }
    }
    let answering: Vec<&ServerReport> =
        s.0.values().filter(|e| e.reachable == Some(true)).collect();
    let initialized =
        (!answering.is_empty()).then(|| answering.iter().all(|e| e.initialized == Some(true)));
    let sealed = (!answering.is_empty()).then(|| answering.iter().any(|e| e.sealed == Some(true)));
    let active_node = answering
        .iter()
        .find(|e| e.active == Some(true))
        .map(|e| e.name.clone());
    let answered = !answering.is_empty();
    let mut healthy_servers = 0;
    if !answered {
        let sev = if anything_answered {
            Severity::Degraded
        } else {
            Severity::Unknown
        };
        p.add(
            sev,
            tier,
            None,
            if v.health.is_empty() {
                "no Vault server known (no vault-server has published its boot record)".into()
            } else {
                format!("no Vault server answered (tried {})", v.health.len())
            },
        );
    } else {
        if done && active_node.is_none() {
            p.bad(
                tier,
                None,
                "no active node: Vault serves no requests".into(),
            );
        }
        for e in s.0.values_mut() {
            let leftover =
                raft_known && e.raft.as_deref() == Some("absent") && e.reachable == Some(false);
            if leftover {
                e.note = Some(LEFTOVER.into());
                continue;
            }
            let mut why = vec![];
            if e.reachable == Some(false) {
                why.push(e.note.clone().unwrap_or_else(|| "unreachable".into()));
            }
            // Before the bootstrap is done, "not initialized" and "sealed" are the expected state: the bootstrap line says so.
            if done && e.initialized == Some(false) {
                why.push("not initialized".into());
            }
            if done && e.sealed == Some(true) {
                why.push("sealed".into());
            }
            if e.healthy == Some(false) {
                why.push("autopilot: unhealthy".into());
            }
            if e.raft.as_deref() == Some("absent") && e.initialized != Some(false) {
                why.push("not in the raft configuration".into());
            }
            if why.is_empty() {
                // Healthy for Vault means answering and unsealed.
                healthy_servers += usize::from(e.sealed == Some(false));
            } else {
                e.note = Some(why.join("; "));
                p.bad(
                    tier,
                    Some(&e.name),
                    format!("{}: {}", e.name, why.join("; ")),
                );
            }
        }
        let counted =
            s.0.values()
                .filter(|e| e.note.as_deref() != Some(LEFTOVER))
                .count();
        if let Some(want) = expected_servers {
            if counted < want as usize {
                p.bad(
                    tier,
                    None,
                    format!("{counted} servers known, {want} expected (hashistack-vault-servers)"),
                );
            } else if counted > want as usize {
                p.bad(
                    tier,
                    None,
                    format!("{counted} servers, {want} expected (hashistack-vault-servers)"),
                );
            }
        }
        if let Some(Ok(ap)) = &v.autopilot {
            if !ap.healthy && !p.0.iter().any(|x| x.area == tier && x.subject.is_some()) {
                p.bad(
                    tier,
                    None,
                    "autopilot reports the raft cluster unhealthy".into(),
                );
            }
        }
        if done && v.token == TokenState::Present {
            for (name, r) in [
                (
                    "raft configuration",
                    v.raft.as_ref().map(|r| r.as_ref().map(|_| ())),
                ),
                (
                    "autopilot state",
                    v.autopilot.as_ref().map(|r| r.as_ref().map(|_| ())),
                ),
            ] {
                if let Some(Err(e)) = r {
                    p.unknown(
                        tier,
                        None,
                        format!("cannot read the {name}: {}", err_short(e)),
                    );
                }
            }
        }
    }
    if expected_servers.is_none() {
        p.unknown(
            tier,
            None,
            "expected server count unknown (no vault-server has published its boot record)".into(),
        );
    }
    let leader = v
        .raft
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .and_then(|r| r.iter().find(|x| x.leader).map(|x| x.node.clone()))
        .or_else(|| active_node.clone());
    let servers: Vec<ServerReport> = s.0.into_values().collect();
    TierReport {
        tier: tier.into(),
        deployed: true,
        expected_servers,
        healthy_servers,
        leader,
        failure_tolerance: v
            .autopilot
            .as_ref()
            .and_then(|a| a.as_ref().ok())
            .map(|a| a.failure_tolerance),
        acl: if done {
            "bootstrapped"
        } else if matches!(v.state, Some(Ok(_))) {
            "not-bootstrapped"
        } else {
            "unknown"
        }
        .into(),
        initialized,
        sealed,
        active_node,
        versions: distinct_versions(&servers),
        clients: None,
        bootstrap,
        status_token: token_word(&v.token),
        servers,
        departed_clients: vec![],
        snapshot: None,
    }
}

/// The Nomad tier. `gone`: [`gone_from_consul`].
fn nomad(o: &Observations, gone: &BTreeMap<String, &'static str>, p: &mut Problems) -> TierReport {
    let n = &o.nomad;
    let now = o.observed_unix;
    let tier = "nomad";
    let deployed = records_of(o, "nomad-server").next().is_some()
        || records_of(o, "worker").next().is_some()
        || matches!(n.state, Some(Ok(Some(_))))
        || !n.probes.is_empty();
    let expected_servers = expected(o, "nomad-servers");
    let mut report = TierReport {
        tier: tier.into(),
        deployed,
        expected_servers,
        healthy_servers: 0,
        leader: None,
        failure_tolerance: None,
        acl: "unknown".into(),
        initialized: None,
        sealed: None,
        active_node: None,
        versions: vec![],
        clients: None,
        bootstrap: None,
        status_token: token_word(&n.token),
        servers: vec![],
        departed_clients: vec![],
        snapshot: None,
    };
    if !deployed {
        report.acl = "-".into();
        return report;
    }
    let (bootstrap, done) = assess_bootstrap(tier, &n.state, now, p);
    assess_token(tier, crate::names::NOMAD_SECRET, &n.token, done, p);
    report.bootstrap = bootstrap;
    report.acl = if done {
        "bootstrapped"
    } else if matches!(n.state, Some(Ok(_))) {
        "not-bootstrapped"
    } else {
        "unknown"
    }
    .into();
    let mut s = Servers(BTreeMap::new());
    let mut leaders: BTreeMap<String, usize> = BTreeMap::new();
    let peers_known = match &n.peers {
        Some(Ok(peers)) => Some(peers),
        _ => None,
    };
    for pr in &n.probes {
        // A server that has left Consul, does not answer and is no raft peer: a removed VM (scale-in).
        let removed = gone.contains_key(&pr.name)
            && !matches!(pr.answer, Some(Ok(_)))
            && peers_known.is_some_and(|peers| !peers.iter().any(|a| host(a) == pr.address));
        if removed {
            continue;
        }
        let e = s.entry(&pr.name);
        e.address = Some(pr.address.clone());
        match &pr.answer {
            Some(Ok(l)) => {
                e.reachable = Some(true);
                if !l.is_empty() {
                    *leaders.entry(l.clone()).or_default() += 1;
                }
            }
            Some(Err(err)) => {
                e.reachable = Some(false);
                e.note = Some(format!("unreachable ({})", err_short(err)));
            }
            None => {}
        }
    }
    for r in records_of(o, "nomad-server") {
        if let Some(e) = s.0.get_mut(&r.boot.node) {
            e.version = r.boot.versions.get("nomad").map(|v| bare_version(v));
        }
    }
    let leader_addr = leaders.into_iter().max_by_key(|(_, c)| *c).map(|(a, _)| a);
    if let Some(Ok(peers)) = &n.peers {
        for e in s.0.values_mut() {
            let addr = e.address.clone().unwrap_or_default();
            let role = if leader_addr.as_deref().map(host) == Some(addr.as_str()) {
                "leader"
            } else if peers.iter().any(|a| host(a) == addr) {
                "voter"
            } else {
                "absent"
            };
            e.raft = Some(role.into());
        }
    }
    report.leader = leader_addr
        .as_ref()
        .map(|a| name_for_ip(o, host(a)).unwrap_or_else(|| a.clone()));
    let any_answer = s.0.values().any(|e| e.reachable == Some(true));
    if !s.0.is_empty() && !any_answer {
        p.bad(
            tier,
            None,
            format!("no Nomad server answered (tried {})", s.0.len()),
        );
    } else if !s.0.is_empty() && report.leader.is_none() {
        p.bad(
            tier,
            None,
            "no raft leader: the servers have no quorum".into(),
        );
    }
    for e in s.0.values_mut() {
        let mut why = vec![];
        if e.reachable == Some(false) {
            why.push(e.note.clone().unwrap_or_else(|| "unreachable".into()));
        }
        if e.raft.as_deref() == Some("absent") {
            why.push("not in the raft configuration".into());
        }
        if why.is_empty() {
            report.healthy_servers += 1;
        } else {
            e.note = Some(why.join("; "));
            p.bad(
                tier,
                Some(&e.name),
                format!("{}: {}", e.name, why.join("; ")),
            );
        }
    }
    if let Some(want) = expected_servers {
        if s.0.len() != want as usize {
            p.bad(
                tier,
                None,
                format!(
                    "{} servers known, {want} expected (hashistack-nomad-servers)",
                    s.0.len()
                ),
            );
        }
    }
    // Client nodes (with the status token): every node Nomad lists must be ready, and every worker that
    // booted (its published record says ok) is expected among them — except nodes that have departed: a
    // `down` node whose worker has left Consul, a booted worker that left and that Nomad no longer lists.
    match &n.nodes {
        Some(Ok(nodes)) => {
            // The status token was accepted: the ACL system is up.
            report.acl = "bootstrapped".into();
            let members = members_by_name(o);
            let mut counted = 0;
            for x in nodes {
                if x.status == "ready" {
                    counted += 1;
                    continue;
                }
                let record = o.records.iter().find(|r| r.boot.node == x.name);
                let gone_as = match record {
                    Some(_) => gone.get(&x.name).copied(),
                    // No boot record (deleted by hand, or never published): Consul alone tells.
                    None => match members.as_ref().map(|m| m.get(x.name.as_str())) {
                        Some(Some(&"left")) => Some("left"),
                        Some(None) => Some("absent"),
                        _ => None,
                    },
                };
                if gone_as.is_some() && x.status == "down" {
                    report.departed_clients.push(x.name.clone());
                    continue;
                }
                counted += 1;
                p.bad(
                    tier,
                    Some(&x.name),
                    format!("{}: client node {}", x.name, x.status),
                );
            }
            let missing: Vec<&str> = records_of(o, "worker")
                .filter(|r| r.boot.ok)
                .map(|r| r.boot.node.as_str())
                .filter(|w| !gone.contains_key(*w))
                .filter(|w| !nodes.iter().any(|x| x.name == *w))
                .collect();
            for w in &missing {
                p.bad(
                    tier,
                    Some(w),
                    format!(
                        "{w}: no Nomad client node (the worker booted, Nomad does not list it)"
                    ),
                );
            }
            report.clients = Some(Clients {
                ready: nodes.iter().filter(|x| x.status == "ready").count(),
                total: counted + missing.len(),
            });
        }
        Some(Err(e)) if done => {
            p.unknown(tier, None, token_call_failed(e, "cannot list client nodes"))
        }
        _ => {}
    }
    report.servers = s.0.into_values().collect();
    report.versions = distinct_versions(&report.servers);
    report
}

fn nodes(o: &Observations, p: &mut Problems) -> Vec<NodeReport> {
    let mut out: Vec<NodeReport> = o
        .records
        .iter()
        .map(|r| {
            let b = &r.boot;
            NodeReport {
                name: b.node.clone(),
                role: b.role.clone(),
                role_tag: r.role_tag.clone(),
                ip: r.ip.clone(),
                ok: b.ok,
                phase: serde_json::to_value(b.phase)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                last_error: b.last_error.clone(),
                bootstrap: b.bootstrap.clone(),
                agent_version: b.agent_version.clone(),
                versions: b.versions.clone(),
                finished_unix: b.finished_unix,
                published_unix: r.published_unix,
                member: None,
                departed: false,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    for n in out.iter().filter(|n| !n.ok) {
        p.bad(
            "nodes",
            Some(&n.name),
            format!(
                "{}: agent failed in phase {} ({} ago): {}",
                n.name,
                n.phase,
                age(o.observed_unix, n.finished_unix),
                n.last_error
                    .as_deref()
                    .map(err_short)
                    .unwrap_or_else(|| "no error recorded".into())
            ),
        );
    }
    if let Some(e) = &o.records_error {
        p.unknown(
            "coordination",
            None,
            format!("cannot read the node records: {}", err_short(e)),
        );
    }
    out
}

/// The assessment of one set of observations.
pub fn assess(o: &Observations) -> Report {
    let mut p = Problems(vec![]);
    let anything_answered = matches!(o.consul.leader, Some(Ok(_)))
        || o.consul
            .probes
            .iter()
            .any(|x| matches!(x.answer, Some(Ok(_))))
        || o.vault
            .health
            .iter()
            .any(|x| matches!(x.answer, Some(Ok(_))));
    let gone = gone_from_consul(o);
    let mut tiers = vec![
        consul(o, anything_answered, &mut p),
        vault(o, anything_answered, &mut p),
        nomad(o, &gone, &mut p),
    ];
    for t in tiers.iter_mut().filter(|t| t.deployed) {
        t.snapshot = assess_snapshot(t, o.snapshots.get(&t.tier), o.observed_unix, &mut p);
    }
    let mut nodes = nodes(o, &mut p);
    let members = members_by_name(o);
    // Gone from Consul and counted by no tier: departed. A server that a raft configuration still lists (a
    // stopped Vault server's Consul client leaves too) and a Nomad node that is not `down` (still `ready`
    // until its heartbeat TTL runs out) stay where they are.
    let counted_by_a_tier = |name: &str| {
        tiers.iter().any(|t| {
            t.servers
                .iter()
                .any(|s| s.name == name && s.note.as_deref() != Some(LEFTOVER))
        }) || matches!(&o.nomad.nodes, Some(Ok(ns)) if ns.iter().any(|x| x.name == name && x.status != "down"))
    };
    for n in nodes.iter_mut() {
        n.member = members.as_ref().map(|m| {
            m.get(n.name.as_str())
                .map(|s| s.to_string())
                .unwrap_or_else(|| "absent".into())
        });
        n.departed = n.ok && gone.contains_key(&n.name) && !counted_by_a_tier(&n.name);
    }
    let departed = nodes.iter().filter(|n| n.departed).count()
        + tiers
            .iter()
            .flat_map(|t| &t.departed_clients)
            .filter(|c| !nodes.iter().any(|n| n.name == **c))
            .count();
    let mut problems = p.0;
    problems.sort_by_key(|x| match x.severity {
        Severity::Degraded => 0,
        Severity::Unknown => 1,
    });
    let verdict = if problems.iter().any(|x| x.severity == Severity::Degraded) {
        Verdict::Degraded
    } else if problems.is_empty() {
        Verdict::Healthy
    } else {
        Verdict::Unknown
    };
    let summary = match problems.first() {
        None => {
            let t = |r: &TierReport, what: &str| {
                format!(
                    "{} {}/{} {what}",
                    r.tier,
                    r.healthy_servers,
                    r.expected_servers
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "?".into())
                )
            };
            let mut parts = vec![t(&tiers[0], "servers"), t(&tiers[1], "unsealed")];
            if tiers[2].deployed {
                parts.push(t(&tiers[2], "servers"));
            }
            parts.push(format!(
                "{} agents ok",
                nodes.iter().filter(|n| !n.departed).count()
            ));
            if departed > 0 {
                parts.push(format!("{departed} departed"));
            }
            format!("cluster {}: {}", o.cluster, parts.join(", "))
        }
        Some(first) => {
            let more = match problems.len() - 1 {
                0 => String::new(),
                1 => " (+1 more problem)".into(),
                n => format!(" (+{n} more problems)"),
            };
            format!(
                "cluster {}: {}: {}{more}",
                o.cluster, first.area, first.message
            )
        }
    };
    Report {
        schema: SCHEMA.into(),
        cluster: o.cluster.clone(),
        observer: o.observer.clone(),
        observed_unix: o.observed_unix,
        verdict,
        exit_code: verdict.exit_code(),
        summary,
        problems,
        tiers,
        nodes,
    }
}
