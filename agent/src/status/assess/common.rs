//! What the three tiers' assessments share: the problem list, the bootstrap record and the status token of a
//! tier, the expected tier size from the nodes' tags, the server table (raft configuration, autopilot, the
//! absent and leftover servers, one problem line per unwell server), the tier's snapshots (its record), and the small words and formats
//! (`host`, `age`, versions, shortened errors) the report uses.

use super::super::model::*;
use crate::coordination::{TierPhase, TierState};
use crate::escrow::ReceiptTarget;
use crate::publish::NodeRecord;
use std::collections::BTreeMap;

/// The note of a server that raft no longer lists and that is gone (a replaced or removed VM).
pub(super) const LEFTOVER: &str = "not in raft (replaced or removed)";

/// Consul's gossip members, name → status (`None`: the member list is unknown).
pub(super) fn members_by_name(o: &Observations) -> Option<BTreeMap<&str, &str>> {
    match &o.consul.members {
        Some(Ok(ms)) => Some(
            ms.iter()
                .map(|m| (m.name.as_str(), m.status.as_str()))
                .collect(),
        ),
        _ => None,
    }
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

pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(
        &mut self,
        severity: Severity,
        area: &str,
        subject: Option<&str>,
        message: String,
    ) {
        self.0.push(Problem {
            severity,
            area: area.into(),
            subject: subject.map(String::from),
            message,
        });
    }
    pub(super) fn bad(&mut self, area: &str, subject: Option<&str>, message: String) {
        self.add(Severity::Degraded, area, subject, message)
    }
    pub(super) fn unknown(&mut self, area: &str, subject: Option<&str>, message: String) {
        self.add(Severity::Unknown, area, subject, message)
    }
}

pub(super) fn phase_name(p: TierPhase) -> &'static str {
    match p {
        TierPhase::Initializing => "initializing",
        TierPhase::Initialized => "initialized",
        TierPhase::Escrowed => "escrowed",
        TierPhase::Done => "done",
        TierPhase::NeedsOperator => "needs-operator",
    }
}

pub(super) fn bootstrap_report(s: &TierState) -> Bootstrap {
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
                target: r.target,
                object: r.object.clone(),
                written_unix: r.written_unix,
            })
            .collect(),
    }
}

/// The tier's bootstrap record and its problems. Returns whether the bootstrap is done.
pub(super) fn assess_bootstrap(
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
                    let missing: Vec<&str> = ReceiptTarget::ALL
                        .into_iter()
                        .filter(|t| !s.receipts.iter().any(|r| r.target == *t))
                        .map(ReceiptTarget::as_str)
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

pub(super) fn token_word(t: &TokenState) -> String {
    match t {
        TokenState::Present => "present",
        TokenState::Missing => "missing",
        TokenState::Error(_) => "error",
        TokenState::NotTried => "not-tried",
    }
    .into()
}

/// Problems with the status token, when the tier is bootstrapped (before that, there is none to have).
pub(super) fn assess_token(tier: &str, secret: &str, t: &TokenState, done: bool, p: &mut Problems) {
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

/// The tier size the tier's nodes declare in their tags (the most common value; ties: the larger).
pub(super) fn expected(o: &Observations, key: &str) -> Option<u8> {
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

pub(super) fn records_of<'a>(
    o: &'a Observations,
    role: &'a str,
) -> impl Iterator<Item = &'a NodeRecord> {
    o.records
        .iter()
        .filter(move |r| r.boot.role.as_deref() == Some(role))
}

pub(super) fn name_for_ip(o: &Observations, ip: &str) -> Option<String> {
    o.records
        .iter()
        .find(|r| r.ip.as_deref() == Some(ip))
        .map(|r| r.boot.node.clone())
}

/// Strips the distribution word: `consul 1.8.7` → `1.8.7`.
pub(super) fn bare_version(v: &str) -> String {
    v.rsplit(' ')
        .next()
        .unwrap_or(v)
        .trim_start_matches('v')
        .to_string()
}

pub(super) fn distinct_versions(servers: &[ServerReport]) -> Vec<String> {
    let mut v: Vec<String> = servers.iter().filter_map(|s| s.version.clone()).collect();
    v.sort();
    v.dedup();
    v
}

/// The problem line for a call made with a status token that failed: a refusal (401/403) blames the token,
/// anything else says what could not be done.
pub(super) fn token_call_failed(e: &str, doing: &str) -> String {
    if e.starts_with("HTTP 401") || e.starts_with("HTTP 403") {
        format!("status token refused: {}", err_short(e))
    } else {
        format!("{doing}: {}", err_short(e))
    }
}

pub(super) fn err_short(e: &str) -> String {
    let e = e.trim();
    if e.chars().count() > 160 {
        format!("{}…", e.chars().take(160).collect::<String>())
    } else {
        e.to_string()
    }
}

pub(super) struct Servers(pub(super) BTreeMap<String, ServerReport>);

impl Servers {
    pub(super) fn entry(&mut self, name: &str) -> &mut ServerReport {
        self.0
            .entry(name.to_string())
            .or_insert_with(|| ServerReport {
                name: name.to_string(),
                ..Default::default()
            })
    }
}

impl Servers {
    /// Every server of a raft configuration, with its address and its role in raft.
    pub(super) fn add_raft(&mut self, raft: &[RaftServer]) {
        for r in raft {
            let e = self.entry(&r.node);
            e.address = Some(host(&r.address).to_string());
            e.raft = Some(RaftRole::of(r.leader, r.voter));
        }
    }

    /// Autopilot's view of each server: its health, its version, and its address when nothing gave one yet.
    pub(super) fn add_autopilot(&mut self, ap: &Autopilot) {
        for a in &ap.servers {
            let e = self.entry(&a.name);
            e.healthy = Some(a.healthy);
            if e.address.is_none() {
                e.address = Some(host(&a.address).to_string());
            }
            if !a.version.is_empty() {
                e.version = Some(bare_version(&a.version));
            }
        }
    }

    /// Once the raft configuration is known, a server it does not list is `absent` from it.
    pub(super) fn mark_absent_from_raft(&mut self) {
        for e in self.0.values_mut() {
            if e.raft.is_none() {
                e.raft = Some(RaftRole::Absent);
            }
        }
    }

    /// The servers counted against the tier size: all but the leftovers of replaced or removed VMs.
    pub(super) fn counted(&self) -> usize {
        self.0
            .values()
            .filter(|e| e.note.as_deref() != Some(LEFTOVER))
            .count()
    }
}

/// A server whose probe failed: unreachable, and why.
pub(super) fn mark_unreachable(e: &mut ServerReport, err: &str) {
    e.reachable = Some(false);
    e.note = Some(format!("unreachable ({})", err_short(err)));
}

/// The start of a server's list of problems: its probe's failure, if it did not answer.
pub(super) fn unreachable_why(e: &ServerReport) -> Vec<String> {
    let mut why = vec![];
    if e.reachable == Some(false) {
        why.push(e.note.clone().unwrap_or_else(|| "unreachable".into()));
    }
    why
}

/// Judges one server by its list of problems: none, and it is well (true); else its note says why and the
/// tier gets one problem line naming it.
pub(super) fn judge_server(
    tier: &str,
    e: &mut ServerReport,
    why: Vec<String>,
    p: &mut Problems,
) -> bool {
    if why.is_empty() {
        return true;
    }
    e.note = Some(why.join("; "));
    p.bad(
        tier,
        Some(&e.name),
        format!("{}: {}", e.name, why.join("; ")),
    );
    false
}

/// No server of the tier answered: degraded when another tier's API answered (this one is down), unknown
/// when none did (the jumpbox may be cut off: nothing can be told).
pub(super) fn none_answered(
    anything_answered: bool,
    tier: &str,
    message: String,
    p: &mut Problems,
) {
    let sev = if anything_answered {
        Severity::Degraded
    } else {
        Severity::Unknown
    };
    p.add(sev, tier, None, message);
}

/// Consul and Vault: the servers counted against the size the nodes declare (`hashistack-<tier>-servers`).
pub(super) fn check_server_count(
    tier: &str,
    counted: usize,
    expected: Option<u8>,
    p: &mut Problems,
) {
    if let Some(want) = expected {
        if counted < want as usize {
            p.bad(
                tier,
                None,
                format!("{counted} servers known, {want} expected (hashistack-{tier}-servers)"),
            );
        } else if counted > want as usize {
            p.bad(
                tier,
                None,
                format!("{counted} servers, {want} expected (hashistack-{tier}-servers)"),
            );
        }
    }
}

/// The tier size is unknown while no server of the tier has published its boot record.
pub(super) fn expected_unknown(tier: &str, expected: Option<u8>, p: &mut Problems) {
    if expected.is_none() {
        p.unknown(
            tier,
            None,
            format!(
                "expected server count unknown (no {tier}-server has published its boot record)"
            ),
        );
    }
}

/// Why a question got no answer (`None`: it was not asked, or it was answered).
pub(super) fn failed<T>(got: &Got<T>) -> Option<&str> {
    match got {
        Some(Err(e)) => Some(e.as_str()),
        _ => None,
    }
}

/// Questions that got no answer: one unknown each, `cannot read the <question>: <why>`.
pub(super) fn unreadable(tier: &str, questions: &[(&str, Option<&str>)], p: &mut Problems) {
    for (name, e) in questions {
        if let Some(e) = e {
            p.unknown(
                tier,
                None,
                format!("cannot read the {name}: {}", err_short(e)),
            );
        }
    }
}

/// Raft's failure tolerance, as autopilot reports it.
pub(super) fn failure_tolerance(ap: &Got<Autopilot>) -> Option<i64> {
    ap.as_ref()
        .and_then(|a| a.as_ref().ok())
        .map(|a| a.failure_tolerance)
}

/// Vault and Nomad: the ACL word from the bootstrap alone (`unknown` when its state could not be read).
pub(super) fn acl_from_bootstrap(done: bool, state: &Got<Option<TierState>>) -> &'static str {
    if done {
        "bootstrapped"
    } else if matches!(state, Some(Ok(_))) {
        "not-bootstrapped"
    } else {
        "unknown"
    }
}

/// The tier's snapshots, from its record (`None`: not collected). DEGRADED when the last attempt failed, when the
/// newest snapshot is older than twice the interval, and when a tier bootstrapped more than twice the (default)
/// interval ago has none at all.
pub(super) fn assess_snapshot(
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
