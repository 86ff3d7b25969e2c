//! The Consul tier: servers from the raft configuration (or, without the status token, the raft peers),
//! autopilot, gossip and each published server's own answer; the leader and quorum, the tier size, the client
//! agents in gossip, and whether the status token is accepted (the ACL system is up).

use super::super::model::*;
use super::common::*;
use crate::coordination::TierPhase;
use std::collections::BTreeMap;

pub(super) fn consul(o: &Observations, anything_answered: bool, p: &mut Problems) -> TierReport {
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
        s.add_raft(raft);
    } else if let Some(Ok(peers)) = &c.peers {
        for a in peers {
            let ip = host(a);
            let name = name_for_ip(o, ip).unwrap_or_else(|| ip.to_string());
            let e = s.entry(&name);
            e.address = Some(ip.to_string());
            e.raft = Some(if leader_addr.as_deref() == Some(a.as_str()) {
                RaftRole::Leader
            } else {
                RaftRole::Voter
            });
        }
    }
    if let Some(Ok(ap)) = &c.autopilot {
        s.add_autopilot(ap);
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
            Some(Err(err)) => mark_unreachable(e, err),
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
        s.mark_absent_from_raft();
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
        let via = c
            .via
            .clone()
            .unwrap_or_else(|| format!("{} servers", c.probes.len()));
        none_answered(
            anything_answered,
            tier,
            format!("no Consul API answered (tried {via})"),
            p,
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
            let leftover = raft_known
                && e.raft == Some(RaftRole::Absent)
                && (e.reachable == Some(false)
                    || matches!(e.member.as_deref(), Some("failed" | "left")));
            if leftover {
                e.note = Some(LEFTOVER.into());
                continue;
            }
            let mut why = unreachable_why(e);
            if let Some(m) = e.member.as_deref().filter(|m| *m != "alive") {
                why.push(format!("gossip member {m}"));
            }
            if e.healthy == Some(false) {
                why.push("autopilot: unhealthy".into());
            }
            if e.raft == Some(RaftRole::Absent) {
                why.push("not in the raft configuration".into());
            }
            if judge_server(tier, e, why, p) {
                healthy_servers += 1;
            }
        }
        check_server_count(tier, s.counted(), expected_servers, p);
        unreadable(
            tier,
            &[
                ("raft configuration", failed(&c.raft)),
                ("autopilot health", failed(&c.autopilot)),
                ("gossip members", failed(&c.members)),
            ],
            p,
        );
    }
    expected_unknown(tier, expected_servers, p);
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
        failure_tolerance: failure_tolerance(&c.autopilot),
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
