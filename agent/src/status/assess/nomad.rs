//! The Nomad tier, optional (deployed when a Nomad server or worker published its record, a tier state exists
//! or a server is known): servers from each published server's `/v1/status/leader` and the raft peers, the
//! leader most servers name, the tier size, and (with the status token) the client nodes — every booted worker
//! expected among them, except nodes that have departed.

use super::super::model::*;
use super::common::*;
use std::collections::BTreeMap;

/// The Nomad tier. `gone`: [`super::gone_from_consul`].
pub(super) fn nomad(
    o: &Observations,
    gone: &BTreeMap<String, &'static str>,
    p: &mut Problems,
) -> TierReport {
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
    report.acl = acl_from_bootstrap(done, &n.state).into();
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
            Some(Err(err)) => mark_unreachable(e, err),
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
                RaftRole::Leader
            } else if peers.iter().any(|a| host(a) == addr) {
                RaftRole::Voter
            } else {
                RaftRole::Absent
            };
            e.raft = Some(role);
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
        let mut why = unreachable_why(e);
        if e.raft == Some(RaftRole::Absent) {
            why.push("not in the raft configuration".into());
        }
        if judge_server(tier, e, why, p) {
            report.healthy_servers += 1;
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
