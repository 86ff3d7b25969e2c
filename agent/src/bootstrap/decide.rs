//! What the lease holder does with a tier, decided from what it knows: the tier state, what its own server
//! says, the clock. Pure, so that every row of the decision is a table test (below); `lead_bootstrap` in
//! `bootstrap/mod.rs` gathers the facts, acts on the decision and does the I/O.

use crate::coordination::{TierPhase, TierState};
use std::time::Duration;

/// What the lease holder knows when it decides (its own spool is empty: a spooled envelope is always finished
/// first, before anything is decided).
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub state: &'a TierState,
    /// This node's name.
    pub me: &'a str,
    pub now_unix: i64,
    /// How long another node's unfinished bootstrap may take to come back (`bootstrap.peer_grace_secs`).
    pub peer_grace: Duration,
    /// What this node's own server says (`None`: it cannot tell without a token, e.g. Consul).
    pub local_initialized: Option<bool>,
    /// Whether the tier's bootstrap call creates a cluster on the node that makes it (Vault's init).
    pub creates_cluster: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The tier is done: nothing to do.
    AlreadyDone,
    /// Escrowed to both targets, then the run that would configure the tier was cut off: `done`, with the note
    /// naming docs/bootstrap.md#finish-configuration (whether or not this node's own server has joined yet).
    DoneConfigurationInterrupted,
    /// This node's server is initialized and both escrow receipts exist: record `done`.
    MarkDone,
    /// Another node's bootstrap is unfinished and may still finish from its spool: wait for it.
    WaitForPeer,
    /// This node's server is initialized, nothing is escrowed, and nobody may still finish: `needs-operator`
    /// (docs/bootstrap.md#bootstrapped-but-nothing-escrowed).
    InitializedNothingEscrowed,
    /// Before initializing, ask these earlier leaders whether they did (each may have made a cluster).
    AskEarlierLeaders(Vec<String>),
    /// Nothing says the tier was bootstrapped, or could have been: bootstrap it.
    Bootstrap,
}

/// Whether the node that last led this tier (not `me`) may still come back and finish from its spool.
pub fn peer_may_finish(f: &Facts) -> bool {
    matches!(
        f.state.phase,
        TierPhase::Initializing | TierPhase::Initialized
    ) && f.state.leader != f.me
        && f.now_unix - f.state.updated_unix < f.peer_grace.as_secs() as i64
}

/// Every other node that recorded `initializing` for this tier, in the order they first did. Every init call is
/// preceded by such an entry of the node that makes it, so these are exactly the nodes that may have made a
/// cluster.
pub fn earlier_leaders(state: &TierState, me: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (phase, node, _) in &state.history {
        if *phase == TierPhase::Initializing && node != me && !out.contains(node) {
            out.push(node.clone());
        }
    }
    out
}

pub fn decide(f: &Facts) -> Decision {
    let s = f.state;
    let escrowed = s.escrowed_to("blob") && s.escrowed_to("keyvault");
    if s.phase == TierPhase::Done {
        return Decision::AlreadyDone;
    }
    if s.phase == TierPhase::Escrowed && escrowed {
        return Decision::DoneConfigurationInterrupted;
    }
    if f.local_initialized == Some(true) {
        return if escrowed {
            Decision::MarkDone
        } else if peer_may_finish(f) {
            Decision::WaitForPeer
        } else {
            Decision::InitializedNothingEscrowed
        };
    }
    if peer_may_finish(f) {
        return Decision::WaitForPeer;
    }
    if f.creates_cluster {
        let earlier = earlier_leaders(s, f.me);
        if !earlier.is_empty() {
            return Decision::AskEarlierLeaders(earlier);
        }
    }
    Decision::Bootstrap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escrow::Receipt;
    use TierPhase::*;

    const NOW: i64 = 10_000;
    const GRACE: u64 = 600;

    fn receipt(target: &str) -> Receipt {
        serde_json::from_value(serde_json::json!({
            "target": target, "object": format!("{target}-object"), "version": "v1",
            "ciphertext_sha256": "00", "written_unix": 1
        }))
        .expect("a receipt")
    }

    /// A state at `phase` by `leader`, written `age` seconds ago, with `history` and receipts for `targets`.
    fn state(
        phase: TierPhase,
        leader: &str,
        age: i64,
        history: &[(TierPhase, &str)],
        targets: &[&str],
    ) -> TierState {
        let mut s = TierState::new("c", "vault", leader);
        s.phase = phase;
        s.updated_unix = NOW - age;
        s.history = history
            .iter()
            .map(|(p, n)| (*p, n.to_string(), NOW - age))
            .collect();
        s.receipts = targets.iter().map(|t| receipt(t)).collect();
        s
    }

    fn facts(s: &TierState, local: Option<bool>, creates_cluster: bool) -> Facts<'_> {
        Facts {
            state: s,
            me: "me",
            now_unix: NOW,
            peer_grace: Duration::from_secs(GRACE),
            local_initialized: local,
            creates_cluster,
        }
    }

    const BOTH: &[&str] = &["blob", "keyvault"];

    #[test]
    fn the_decision_table() {
        let fresh = TierState::new("c", "vault", "me");
        let other_init = [(Initializing, "other")];
        let rows: Vec<(&str, TierState, Option<bool>, bool, Decision)> = vec![
            ("a fresh tier", fresh.clone(), Some(false), true, Decision::Bootstrap),
            ("a fresh tier, Consul", fresh, None, false, Decision::Bootstrap),
            (
                "done",
                state(Done, "other", 5, &other_init, BOTH),
                Some(false),
                true,
                Decision::AlreadyDone,
            ),
            (
                "escrowed, configuration cut off, this server not joined yet",
                state(Escrowed, "other", 5, &other_init, BOTH),
                Some(false),
                true,
                Decision::DoneConfigurationInterrupted,
            ),
            (
                "escrowed to one target only, initialized here, leader within its grace",
                state(Initialized, "other", 5, &other_init, &["blob"]),
                Some(true),
                true,
                Decision::WaitForPeer,
            ),
            (
                "initialized here and escrowed",
                state(Initialized, "other", 5000, &other_init, BOTH),
                Some(true),
                true,
                Decision::MarkDone,
            ),
            (
                "initialized here, nothing escrowed, leader within its grace",
                state(Initialized, "other", 5, &other_init, &[]),
                Some(true),
                true,
                Decision::WaitForPeer,
            ),
            (
                "initialized here, nothing escrowed, leader past its grace",
                state(Initialized, "other", 5000, &other_init, &[]),
                Some(true),
                true,
                Decision::InitializedNothingEscrowed,
            ),
            (
                "initialized here by our own earlier run, nothing spooled",
                state(Initializing, "me", 5, &[(Initializing, "me")], &[]),
                Some(true),
                true,
                Decision::InitializedNothingEscrowed,
            ),
            (
                "another node's init unfinished, within its grace",
                state(Initializing, "other", 5, &other_init, &[]),
                Some(false),
                true,
                Decision::WaitForPeer,
            ),
            (
                "another node's init unfinished, past its grace: ask it first",
                state(Initializing, "other", 5000, &other_init, &[]),
                Some(false),
                true,
                Decision::AskEarlierLeaders(vec!["other".into()]),
            ),
            (
                "an earlier leader initialized and went away (the old two-cluster window): ask it",
                state(
                    Initialized,
                    "other",
                    5000,
                    &[(Initializing, "other"), (Initialized, "other")],
                    &[],
                ),
                Some(false),
                true,
                Decision::AskEarlierLeaders(vec!["other".into()]),
            ),
            (
                "another node's ACL bootstrap unfinished past its grace (Consul: the call is cluster-wide)",
                state(Initializing, "other", 5000, &other_init, &[]),
                None,
                false,
                Decision::Bootstrap,
            ),
            (
                "our own half-initialized run: nobody else to ask",
                state(Initializing, "me", 5, &[(Initializing, "me")], &[]),
                Some(false),
                true,
                Decision::Bootstrap,
            ),
        ];
        for (what, s, local, creates, want) in rows {
            assert_eq!(decide(&facts(&s, local, creates)), want, "{what}");
        }
    }

    #[test]
    fn earlier_leaders_are_every_other_initializing_node_once_in_order() {
        let s = state(
            Initializing,
            "b",
            1,
            &[
                (Initializing, "a"),
                (NeedsOperator, "c"),
                (Initializing, "me"),
                (Initializing, "b"),
                (Initializing, "a"),
                (Initialized, "d"),
            ],
            &[],
        );
        assert_eq!(earlier_leaders(&s, "me"), vec!["a", "b"]);
    }

    #[test]
    fn the_grace_is_counted_from_the_last_write_and_never_for_this_node() {
        let s = state(Initializing, "other", GRACE as i64 - 1, &[], &[]);
        assert!(peer_may_finish(&facts(&s, None, true)));
        let s = state(Initializing, "other", GRACE as i64, &[], &[]);
        assert!(!peer_may_finish(&facts(&s, None, true)));
        let s = state(Initializing, "me", 1, &[], &[]);
        assert!(!peer_may_finish(&facts(&s, None, true)));
        let s = state(NeedsOperator, "other", 1, &[], &[]);
        assert!(!peer_may_finish(&facts(&s, None, true)));
    }
}
