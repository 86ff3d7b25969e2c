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
//!
//! One module per product over shared helpers: `consul.rs`, `vault.rs` and `nomad.rs` judge their tier,
//! `common.rs` holds what they share (problems, bootstrap and status token, the server table); this file judges
//! the nodes, who has departed, the verdict and the summary line.

mod common;
mod consul;
mod nomad;
mod vault;

pub use common::{age, host};

use super::model::*;
use common::{assess_snapshot, err_short, members_by_name, Problems, LEFTOVER};
use std::collections::BTreeMap;

/// Consul forgets a member no sooner than this after it left (serf's tombstone timeout, 24 h; a failed member
/// is reaped after `reconnect_timeout`, 72 h by default). A node that Consul does not list and whose boot record
/// is younger cannot have been reaped: it has not joined yet (agents publish their record as soon as their
/// services start), or never did — not departed.
pub const REAPED_AFTER_SECS: i64 = 24 * 3600;

/// How long after it published its boot record a node may be missing from Consul's member list: its agent
/// publishes the record once its services started, and its Consul agent joins within seconds (retry_join
/// every few seconds). Past this, a node Consul does not list has not joined: a problem.
pub const JOIN_GRACE_SECS: i64 = 120;

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
        consul::consul(o, anything_answered, &mut p),
        vault::vault(o, anything_answered, &mut p),
        nomad::nomad(o, &gone, &mut p),
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
    // Every node runs a Consul agent: one that booted a while ago and that Consul does not list never joined (or
    // was removed without leaving). Not departed: that needs 24 h (or a `left`).
    for n in nodes
        .iter()
        .filter(|n| n.ok && !n.departed && n.member.as_deref() == Some("absent"))
        .filter(|n| o.observed_unix - n.published_unix >= JOIN_GRACE_SECS)
    {
        p.bad(
            "nodes",
            Some(&n.name),
            format!(
                "{}: not a Consul member {} after its boot: its Consul agent has not joined (its consul log: gossip \
                 key, port 8301, retry_join), or it was removed with `consul force-leave -prune` (then delete its \
                 boot record: docs/status.md#departed-nodes)",
                n.name,
                age(o.observed_unix, n.published_unix)
            ),
        );
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
