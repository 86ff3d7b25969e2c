//! The Vault tier: servers from the raft configuration, autopilot and each published server's
//! `/v1/sys/health`; initialized, sealed and the active node, the tier size, and (with the status token) whether
//! raft and autopilot could be read. Healthy for Vault means answering and unsealed.

use super::super::model::*;
use super::common::*;
use std::collections::BTreeMap;

pub(super) fn vault(o: &Observations, anything_answered: bool, p: &mut Problems) -> TierReport {
    let v = &o.vault;
    let now = o.observed_unix;
    let tier = "vault";
    let expected_servers = expected(o, "vault-servers");
    let (bootstrap, done) = assess_bootstrap(tier, &v.state, now, p);
    assess_token(tier, crate::names::VAULT_SECRET, &v.token, done, p);
    let mut s = Servers(BTreeMap::new());
    let raft_known = matches!(v.raft, Some(Ok(_)));
    if let Some(Ok(raft)) = &v.raft {
        s.add_raft(raft);
    }
    if let Some(Ok(ap)) = &v.autopilot {
        s.add_autopilot(ap);
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
            Some(Err(err)) => mark_unreachable(e, err),
            None => {}
        }
    }
    if raft_known {
        s.mark_absent_from_raft();
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
        none_answered(
            anything_answered,
            tier,
            if v.health.is_empty() {
                "no Vault server known (no vault-server has published its boot record)".into()
            } else {
                format!("no Vault server answered (tried {})", v.health.len())
            },
            p,
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
                raft_known && e.raft == Some(RaftRole::Absent) && e.reachable == Some(false);
            if leftover {
                e.note = Some(LEFTOVER.into());
                continue;
            }
            let mut why = unreachable_why(e);
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
            if e.raft == Some(RaftRole::Absent) && e.initialized != Some(false) {
                why.push("not in the raft configuration".into());
            }
            if judge_server(tier, e, why, p) {
                // Healthy for Vault means answering and unsealed.
                healthy_servers += usize::from(e.sealed == Some(false));
            }
        }
        check_server_count(tier, s.counted(), expected_servers, p);
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
            unreadable(
                tier,
                &[
                    ("raft configuration", failed(&v.raft)),
                    ("autopilot state", failed(&v.autopilot)),
                ],
                p,
            );
        }
    }
    expected_unknown(tier, expected_servers, p);
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
        failure_tolerance: failure_tolerance(&v.autopilot),
        acl: acl_from_bootstrap(done, &v.state).into(),
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
