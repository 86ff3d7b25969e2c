//! Report → text. The table is for a person at a glance: the verdict line first, then one table per concern,
//! aligned, with colour only when asked for (a terminal without `NO_COLOR`). `--json` is the report itself.

use super::assess::age;
use super::model::*;
use crate::escrow::ReceiptTarget;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tone {
    Plain,
    Good,
    Bad,
    Warn,
    Dim,
}

fn paint(text: &str, tone: Tone, color: bool) -> String {
    if !color {
        return text.to_string();
    }
    let code = match tone {
        Tone::Plain => return text.to_string(),
        Tone::Good => "32",
        Tone::Bad => "1;31",
        Tone::Warn => "33",
        Tone::Dim => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<(String, Tone)>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Self {
        Table {
            head: head.to_vec(),
            rows: vec![],
        }
    }
    fn row(&mut self, cells: Vec<(String, Tone)>) {
        self.rows.push(cells);
    }
    fn render(&self, color: bool, out: &mut String) {
        let n = self.head.len();
        let mut w: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, (t, _)) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(t.chars().count());
            }
        }
        let line = |cells: Vec<(String, Tone)>, out: &mut String| {
            let last = cells.len().saturating_sub(1);
            let mut s = String::new();
            for (i, (t, tone)) in cells.into_iter().enumerate() {
                let pad = if i == last {
                    0
                } else {
                    w[i] - t.chars().count() + 2
                };
                s.push_str(&paint(&t, tone, color));
                s.push_str(&" ".repeat(pad));
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        line(
            self.head
                .iter()
                .map(|h| (h.to_string(), Tone::Dim))
                .collect(),
            out,
        );
        for r in &self.rows {
            line(r.clone(), out);
        }
    }
}

fn plain(s: impl Into<String>) -> (String, Tone) {
    (s.into(), Tone::Plain)
}

fn dash() -> (String, Tone) {
    ("-".into(), Tone::Dim)
}

fn opt(s: &Option<String>) -> (String, Tone) {
    s.as_ref().map(|v| plain(v.clone())).unwrap_or_else(dash)
}

/// `2024-05-01 12:00:00 UTC`
pub fn utc(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => unix.to_string(),
    }
}

fn verdict_tone(v: Verdict) -> Tone {
    match v {
        Verdict::Healthy => Tone::Good,
        Verdict::Degraded => Tone::Bad,
        Verdict::Unknown => Tone::Warn,
    }
}

fn bootstrap_cell(t: &TierReport, now: i64) -> (String, Tone) {
    match &t.bootstrap {
        // No state at all, or it could not be read.
        None if t.acl == "unknown" => ("?".into(), Tone::Warn),
        None => ("none".into(), Tone::Bad),
        Some(b) => (
            format!(
                "{} by {}, {} ago",
                b.phase,
                b.leader_node,
                age(now, b.updated_unix)
            ),
            if b.phase == "done" {
                Tone::Good
            } else {
                Tone::Bad
            },
        ),
    }
}

/// `1.2 MB`, `840 kB`, `512 B`.
fn bytes(n: u64) -> String {
    match n {
        0..=999 => format!("{n} B"),
        1_000..=999_999 => format!("{:.0} kB", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

/// One line per tier with a snapshot record: the newest snapshot's age, size, node and index, and a failed last
/// attempt. Nothing when snapshots were not collected.
fn snapshot_lines(r: &Report, out: &mut String) {
    let now = r.observed_unix;
    for t in r.tiers.iter().filter(|t| t.deployed) {
        let Some(s) = &t.snapshot else { continue };
        let newest = match (s.created_unix, &s.node) {
            (Some(at), Some(node)) => format!(
                "{} ago, {} by {node} (index {})",
                age(now, at),
                bytes(s.plaintext_bytes.unwrap_or(0)),
                s.index.unwrap_or(0)
            ),
            _ => "none yet".into(),
        };
        let failed = match (s.last_attempt_ok, &s.last_attempt_node) {
            (Some(false), Some(node)) => format!(
                "; LAST ATTEMPT FAILED on {node}: {}",
                s.last_error.as_deref().unwrap_or("?")
            ),
            _ => String::new(),
        };
        let interval = s
            .interval_secs
            .map(|i| format!(" every {}", age(i as i64, 0)))
            .unwrap_or_default();
        out.push_str(&format!(
            "snapshot {:<6} {} [{}{interval}]{failed}\n",
            t.tier, newest, s.state
        ));
    }
}

fn escrow_cell(b: &Option<Bootstrap>) -> (String, Tone) {
    match b {
        None => dash(),
        Some(b) if b.phase == "initializing" || b.phase == "initialized" => dash(),
        Some(b) => {
            let missing: Vec<&str> = ReceiptTarget::ALL
                .into_iter()
                .filter(|t| !b.receipts.iter().any(|r| r.target == *t))
                .map(ReceiptTarget::as_str)
                .collect();
            if missing.is_empty() {
                ("blob, keyvault".into(), Tone::Good)
            } else {
                (format!("MISSING {}", missing.join(", ")), Tone::Bad)
            }
        }
    }
}

fn servers_cell(t: &TierReport) -> (String, Tone) {
    let want = t
        .expected_servers
        .map(|e| e.to_string())
        .unwrap_or_else(|| "?".into());
    let good = t
        .expected_servers
        .is_some_and(|e| t.healthy_servers >= e as usize);
    (
        format!("{}/{want}", t.healthy_servers),
        if good { Tone::Good } else { Tone::Bad },
    )
}

fn tier_state_cell(t: &TierReport) -> (String, Tone) {
    match t.tier.as_str() {
        "vault" => {
            let mut parts = vec![];
            match t.initialized {
                Some(true) => parts.push("initialized".to_string()),
                Some(false) => parts.push("NOT initialized".into()),
                None => {}
            }
            match t.sealed {
                Some(true) => parts.push("SOME SEALED".into()),
                Some(false) => parts.push("unsealed".into()),
                None => {}
            }
            if let Some(a) = &t.active_node {
                parts.push(format!("active {a}"));
            }
            let bad =
                t.initialized == Some(false) || t.sealed == Some(true) || t.active_node.is_none();
            if parts.is_empty() {
                dash()
            } else {
                (parts.join(", "), if bad { Tone::Bad } else { Tone::Good })
            }
        }
        _ => match t.clients {
            Some(c) => (
                format!(
                    "clients {}/{} {}",
                    c.ready,
                    c.total,
                    if t.tier == "nomad" { "ready" } else { "alive" }
                ),
                if c.ready == c.total {
                    Tone::Good
                } else {
                    Tone::Bad
                },
            ),
            None => dash(),
        },
    }
}

fn server_state(s: &ServerReport, tier: &str) -> (String, Tone) {
    if s.reachable == Some(false) {
        return ("UNREACHABLE".into(), Tone::Bad);
    }
    if tier == "vault" {
        return match (s.initialized, s.sealed, s.active) {
            (Some(false), _, _) => ("not initialized".into(), Tone::Warn),
            (_, Some(true), _) => ("SEALED".into(), Tone::Bad),
            (_, _, Some(true)) => ("active".into(), Tone::Good),
            (_, Some(false), _) => ("standby".into(), Tone::Good),
            _ => dash(),
        };
    }
    match s.member.as_deref() {
        Some("alive") | None if s.reachable == Some(true) => ("alive".into(), Tone::Good),
        Some(m) => (
            m.to_uppercase(),
            if m == "alive" { Tone::Good } else { Tone::Bad },
        ),
        None => dash(),
    }
}

/// At most this many departed nodes are named on their line (the JSON report lists them all).
const DEPARTED_NAMED: usize = 5;

/// One informational line: the departed nodes, most recent boot first (a Nomad client node without a boot
/// record last).
fn departed_line(r: &Report) -> Option<String> {
    let mut d: Vec<(&str, &str, Option<i64>)> = r
        .nodes
        .iter()
        .filter(|n| n.departed)
        .map(|n| {
            (
                n.name.as_str(),
                n.member.as_deref().unwrap_or("left"),
                Some(n.finished_unix),
            )
        })
        .collect();
    for t in &r.tiers {
        for c in &t.departed_clients {
            if !r.nodes.iter().any(|n| n.name == *c) {
                d.push((c.as_str(), "left", None));
            }
        }
    }
    if d.is_empty() {
        return None;
    }
    d.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(b.0)));
    let mut items: Vec<String> = d
        .iter()
        .take(DEPARTED_NAMED)
        .map(|(name, member, boot)| {
            let member = if *member == "absent" {
                "no longer a member"
            } else {
                "left"
            };
            match boot {
                Some(t) => format!(
                    "{name} ({member}; last boot {} ago)",
                    age(r.observed_unix, *t)
                ),
                None => format!("{name} (Nomad node down; no boot record)"),
            }
        })
        .collect();
    if d.len() > DEPARTED_NAMED {
        items.push(format!(
            "+{} more (--json lists them)",
            d.len() - DEPARTED_NAMED
        ));
    }
    Some(format!(
        "departed (left the cluster, not counted): {}",
        items.join(", ")
    ))
}

/// The human-readable report.
pub fn table(r: &Report, color: bool) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{}  {}\n",
        paint(r.verdict.word(), verdict_tone(r.verdict), color),
        r.summary
    ));
    out.push_str(&paint(
        &format!("seen from {} at {}", r.observer, utc(r.observed_unix)),
        Tone::Dim,
        color,
    ));
    out.push_str("\n\n");

    let mut t = Table::new(&[
        "TIER",
        "SERVERS",
        "LEADER",
        "TOLERANCE",
        "STATE",
        "ACL",
        "TOKEN",
        "BOOTSTRAP",
        "ESCROW",
    ]);
    for tier in &r.tiers {
        if !tier.deployed {
            t.row(vec![
                plain(tier.tier.clone()),
                dash(),
                dash(),
                dash(),
                ("not deployed".into(), Tone::Dim),
            ]);
            continue;
        }
        t.row(vec![
            plain(tier.tier.clone()),
            servers_cell(tier),
            match &tier.leader {
                Some(l) => (l.clone(), Tone::Plain),
                None => ("NONE".into(), Tone::Bad),
            },
            tier.failure_tolerance
                .map(|f| (f.to_string(), if f > 0 { Tone::Plain } else { Tone::Warn }))
                .unwrap_or_else(dash),
            tier_state_cell(tier),
            (
                tier.acl.clone(),
                if tier.acl == "bootstrapped" {
                    Tone::Good
                } else {
                    Tone::Warn
                },
            ),
            (
                tier.status_token.clone(),
                if tier.status_token == "present" {
                    Tone::Plain
                } else {
                    Tone::Warn
                },
            ),
            bootstrap_cell(tier, r.observed_unix),
            escrow_cell(&tier.bootstrap),
        ]);
    }
    t.render(color, &mut out);
    snapshot_lines(r, &mut out);
    out.push('\n');

    let mut t = Table::new(&[
        "SERVER",
        "TIER",
        "ADDRESS",
        "STATE",
        "RAFT",
        "AUTOPILOT",
        "VERSION",
        "NOTE",
    ]);
    for tier in r.tiers.iter().filter(|t| t.deployed) {
        for s in &tier.servers {
            t.row(vec![
                plain(s.name.clone()),
                plain(tier.tier.clone()),
                opt(&s.address),
                server_state(s, &tier.tier),
                match s.raft {
                    Some(RaftRole::Absent) => ("ABSENT".into(), Tone::Bad),
                    Some(x) => plain(x.as_str()),
                    None => dash(),
                },
                match s.healthy {
                    Some(true) => ("healthy".into(), Tone::Good),
                    Some(false) => ("UNHEALTHY".into(), Tone::Bad),
                    None => dash(),
                },
                opt(&s.version),
                s.note
                    .clone()
                    .map(|n| (n, Tone::Warn))
                    .unwrap_or_else(|| plain("")),
            ]);
        }
    }
    if t.rows.is_empty() {
        out.push_str("no servers known\n");
    } else {
        t.render(color, &mut out);
    }

    let failed: Vec<&NodeReport> = r.nodes.iter().filter(|n| !n.ok).collect();
    let departed_records = r.nodes.iter().filter(|n| n.departed).count();
    out.push('\n');
    out.push_str(&format!(
        "agents: {} published, {} ok, {} failed{}\n",
        r.nodes.len(),
        r.nodes.len() - failed.len() - departed_records,
        failed.len(),
        if departed_records > 0 {
            format!(", {departed_records} departed")
        } else {
            String::new()
        }
    ));
    if let Some(line) = departed_line(r) {
        out.push_str(&paint(&line, Tone::Dim, color));
        out.push('\n');
    }
    if !failed.is_empty() {
        let mut t = Table::new(&["NODE", "ROLE", "IP", "PHASE", "WHEN", "ERROR"]);
        for n in failed {
            t.row(vec![
                plain(n.name.clone()),
                match (&n.role, &n.role_tag) {
                    (Some(role), _) => plain(role.clone()),
                    (None, Some(tag)) => (format!("? ({tag})"), Tone::Bad),
                    (None, None) => dash(),
                },
                opt(&n.ip),
                (n.phase.clone(), Tone::Bad),
                plain(format!("{} ago", age(r.observed_unix, n.finished_unix))),
                plain(n.last_error.clone().unwrap_or_default()),
            ]);
        }
        t.render(color, &mut out);
    }

    if !r.problems.is_empty() {
        out.push('\n');
        out.push_str(&paint("PROBLEMS", Tone::Dim, color));
        out.push('\n');
        let w = r.problems.iter().map(|p| p.area.len()).max().unwrap_or(0);
        for p in &r.problems {
            let mark = match p.severity {
                Severity::Degraded => paint("✗", Tone::Bad, color),
                Severity::Unknown => paint("?", Tone::Warn, color),
            };
            out.push_str(&format!("{mark} {:<w$}  {}\n", p.area, p.message));
        }
    }
    out
}

/// The report as the documented JSON (`hashistack-status/1`), pretty or one line (for `--watch`).
pub fn json(r: &Report, pretty: bool) -> String {
    if pretty {
        serde_json::to_string_pretty(r).expect("report serialises")
    } else {
        serde_json::to_string(r).expect("report serialises")
    }
}
