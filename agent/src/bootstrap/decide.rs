//! What a server of a tier does with its bootstrap, decided from what it knows: the tier state, its spool, what
//! its own server and the earlier leaders say, the product's answer to the bootstrap call, the clock. Pure, so
//! that every row of the state machine (docs/bootstrap.md, "Every transition") is a table test (below); the
//! driver (`bootstrap/driver.rs`) gathers the facts, acts on the decisions and does the I/O.

use crate::coordination::{TierPhase, TierState};
use crate::escrow::ReceiptTarget::{Blob, Keyvault};
use std::time::Duration;

/// Every transition docs/bootstrap.md documents, by the name its table "Every transition" gives it. Each is
/// what one of the decisions below concludes ([`Transition::of`] on each decision); the tests check that the
/// table rows reach every one and that the document's table names exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transition {
    DoneBeforeLease,
    NeedsOperatorStops,
    TakeLease,
    FinishSpool,
    OrphanStaleSpool,
    AlreadyDone,
    DoneConfigurationInterrupted,
    MarkDone,
    WaitForPeer,
    InitializedNothingEscrowed,
    AskEarlierLeaders,
    Bootstrap,
    EarlierLeaderNotInitialized,
    EarlierLeaderInitialized,
    PreviousLeaderUnreachable,
    Escrow,
    EscrowedBeforeUse,
    DoneEscrowedBeforeUse,
    WaitForPeerAfterCall,
    AlreadyBootstrapped,
    ResetHalfInitialized,
    HalfInitialized,
    CallRefused,
    CallFailed,
}

impl Transition {
    pub const ALL: [Transition; 24] = [
        Transition::DoneBeforeLease,
        Transition::NeedsOperatorStops,
        Transition::TakeLease,
        Transition::FinishSpool,
        Transition::OrphanStaleSpool,
        Transition::AlreadyDone,
        Transition::DoneConfigurationInterrupted,
        Transition::MarkDone,
        Transition::WaitForPeer,
        Transition::InitializedNothingEscrowed,
        Transition::AskEarlierLeaders,
        Transition::Bootstrap,
        Transition::EarlierLeaderNotInitialized,
        Transition::EarlierLeaderInitialized,
        Transition::PreviousLeaderUnreachable,
        Transition::Escrow,
        Transition::EscrowedBeforeUse,
        Transition::DoneEscrowedBeforeUse,
        Transition::WaitForPeerAfterCall,
        Transition::AlreadyBootstrapped,
        Transition::ResetHalfInitialized,
        Transition::HalfInitialized,
        Transition::CallRefused,
        Transition::CallFailed,
    ];

    /// Its name in docs/bootstrap.md.
    pub fn name(self) -> &'static str {
        match self {
            Transition::DoneBeforeLease => "done-before-lease",
            Transition::NeedsOperatorStops => "needs-operator-stops",
            Transition::TakeLease => "take-lease",
            Transition::FinishSpool => "finish-spool",
            Transition::OrphanStaleSpool => "orphan-stale-spool",
            Transition::AlreadyDone => "already-done",
            Transition::DoneConfigurationInterrupted => "done-configuration-interrupted",
            Transition::MarkDone => "mark-done",
            Transition::WaitForPeer => "wait-for-peer",
            Transition::InitializedNothingEscrowed => "initialized-nothing-escrowed",
            Transition::AskEarlierLeaders => "ask-earlier-leaders",
            Transition::Bootstrap => "bootstrap",
            Transition::EarlierLeaderNotInitialized => "earlier-leader-not-initialized",
            Transition::EarlierLeaderInitialized => "earlier-leader-initialized",
            Transition::PreviousLeaderUnreachable => "previous-leader-unreachable",
            Transition::Escrow => "escrow",
            Transition::EscrowedBeforeUse => "escrowed-before-use",
            Transition::DoneEscrowedBeforeUse => "done-escrowed-before-use",
            Transition::WaitForPeerAfterCall => "wait-for-peer-after-call",
            Transition::AlreadyBootstrapped => "already-bootstrapped",
            Transition::ResetHalfInitialized => "reset-half-initialized",
            Transition::HalfInitialized => "half-initialized",
            Transition::CallRefused => "call-refused",
            Transition::CallFailed => "call-failed",
        }
    }
}

/// Before leading, from the state as read and this node's spool (every server, at every boot): read under the
/// lease the node just took, or without it when another node holds it (`claim.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeLease {
    /// `done` and nothing spooled here: outcome `already-done` (a lease taken is given back), nothing else happens.
    AlreadyDone,
    /// `needs-operator` and nothing spooled here: stop with the recorded message (a lease taken is given back).
    NeedsOperator,
    /// Anything else (or a spooled envelope to finish): lead under the lease (or wait for the node holding it).
    TakeLease,
}

pub fn before_lease(state: Option<&TierState>, spool_empty: bool) -> BeforeLease {
    match state.map(|s| s.phase) {
        Some(TierPhase::Done) if spool_empty => BeforeLease::AlreadyDone,
        Some(TierPhase::NeedsOperator) if spool_empty => BeforeLease::NeedsOperator,
        _ => BeforeLease::TakeLease,
    }
}

/// What the lease holder does with one envelope in its spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolAction {
    /// This node's own interrupted bootstrap: upload it to both targets, `escrowed`, then `done` with the note
    /// naming docs/bootstrap.md#finish-configuration (outcome `recovered`).
    Finish,
    /// A superseded bootstrap's (the state names another escrow, completed): upload it as an orphan, leave the
    /// state alone (docs/bootstrap.md#stale-spool).
    Orphan,
}

/// Whether a spooled envelope (its escrow id) belongs to a superseded bootstrap: the tier state names another
/// escrow and that escrow completed (`escrowed`/`done`). Such a spool is a second init's (or a replaced
/// state's) and is never written back into the state.
pub fn on_spool(state: &TierState, spooled_escrow_id: &str) -> SpoolAction {
    let superseded = matches!(state.phase, TierPhase::Escrowed | TierPhase::Done)
        && state
            .escrow_id
            .as_deref()
            .is_some_and(|id| id != spooled_escrow_id);
    if superseded {
        SpoolAction::Orphan
    } else {
        SpoolAction::Finish
    }
}

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
    let escrowed = s.escrowed_to(Blob) && s.escrowed_to(Keyvault);
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

impl Decision {
    pub fn transition(&self) -> Transition {
        match self {
            Decision::AlreadyDone => Transition::AlreadyDone,
            Decision::DoneConfigurationInterrupted => Transition::DoneConfigurationInterrupted,
            Decision::MarkDone => Transition::MarkDone,
            Decision::WaitForPeer => Transition::WaitForPeer,
            Decision::InitializedNothingEscrowed => Transition::InitializedNothingEscrowed,
            Decision::AskEarlierLeaders(_) => Transition::AskEarlierLeaders,
            Decision::Bootstrap => Transition::Bootstrap,
        }
    }
}

/// What an earlier leader's server answered "are you initialized?" ([`Decision::AskEarlierLeaders`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAnswer {
    Initialized,
    NotInitialized,
    /// It could not be asked: no boot record with its address, powered off, no answer.
    CannotBeAsked,
}

/// What one earlier leader's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerVerdict {
    /// It did not make a cluster: ask the next one (after the last, bootstrap).
    AskNext,
    /// It made a cluster: `needs-operator`, naming it (docs/bootstrap.md#bootstrapped-but-nothing-escrowed).
    InitializedElsewhere,
    /// It may have made one: `needs-operator` (docs/bootstrap.md#previous-leader-unreachable). Never a second cluster.
    Unreachable,
}

pub fn on_peer(answer: PeerAnswer) -> PeerVerdict {
    match answer {
        PeerAnswer::NotInitialized => PeerVerdict::AskNext,
        PeerAnswer::Initialized => PeerVerdict::InitializedElsewhere,
        PeerAnswer::CannotBeAsked => PeerVerdict::Unreachable,
    }
}

impl PeerVerdict {
    pub fn transition(self) -> Transition {
        match self {
            PeerVerdict::AskNext => Transition::EarlierLeaderNotInitialized,
            PeerVerdict::InitializedElsewhere => Transition::EarlierLeaderInitialized,
            PeerVerdict::Unreachable => Transition::PreviousLeaderUnreachable,
        }
    }
}

/// Why the product refused the bootstrap call, as far as the decision goes (`bootstrap::TierFailure` without
/// its words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    AlreadyDone,
    HalfInitialized,
    Refused,
    Other,
}

/// What the lease holder knows after its bootstrap call.
#[derive(Debug, Clone, Copy)]
pub struct AfterFacts<'a> {
    /// The facts as they were before this node's pre-flight overwrote the state (its `state` is that state).
    pub before: Facts<'a>,
    /// This node escrowed a caller-chosen secret before the call ([`super::Tier::pre_secret`]).
    pub pre_escrowed: bool,
    /// The call's answer holds that very secret ([`super::Tier::holds_pre_secret`]); `false` for a server that
    /// ignored it and made a token of its own, and for every failure.
    pub answer_is_pre_secret: bool,
    /// This node already reset its half-initialized storage and called again in this run.
    pub started_over: bool,
}

/// What the lease holder does with its bootstrap call's answer (`T`: the secrets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCall<T> {
    /// The secrets: spool, `initialized`, escrow to both targets, `escrowed`, configure, `done`.
    Escrow(T),
    /// The secrets are the ones this node escrowed before the call: that escrow is the tier's (no second
    /// one); `escrowed` naming it (earlier leaders' unproven escrows dropped) while the configuration runs,
    /// then `done`.
    EscrowedBeforeUse(T),
    /// "Already bootstrapped", and an earlier leader's secret escrowed before use holds the live one: `done`
    /// naming that escrow (or every such escrow).
    DoneEscrowedBeforeUse,
    /// "Already bootstrapped" by another node whose escrow may still come (within its grace): put its state
    /// back and wait for it.
    WaitForPeer,
    /// "Already bootstrapped" and nothing escrowed: `needs-operator` (docs/bootstrap.md#<tier>-already-bootstrapped).
    AlreadyBootstrapped,
    /// This node's own interrupted call left its storage half-initialized: reset it and call again, once.
    ResetAndCallAgain,
    /// Half-initialized storage the agent does not reset: `needs-operator` (docs/bootstrap.md#half-initialized).
    HalfInitialized,
    /// A final refusal: `needs-operator` (docs/bootstrap.md#bootstrap-call-refused).
    Refused,
    /// Anything else: the boot fails with the error, the state stays `initializing` (the next boot decides).
    Fail,
}

pub fn after_call<T>(f: &AfterFacts, answer: Result<T, Failure>) -> AfterCall<T> {
    let s = f.before.state;
    match answer {
        Ok(secrets) if f.pre_escrowed && f.answer_is_pre_secret => {
            AfterCall::EscrowedBeforeUse(secrets)
        }
        Ok(secrets) => AfterCall::Escrow(secrets),
        Err(Failure::AlreadyDone)
            if f.pre_escrowed
                && (!s.pre_escrows.is_empty()
                    || (s.escrowed_to(Blob) && s.escrowed_to(Keyvault))) =>
        {
            AfterCall::DoneEscrowedBeforeUse
        }
        Err(Failure::AlreadyDone) if peer_may_finish(&f.before) => AfterCall::WaitForPeer,
        Err(Failure::AlreadyDone) => AfterCall::AlreadyBootstrapped,
        Err(Failure::HalfInitialized)
            if !f.started_over && s.phase == TierPhase::Initializing && s.leader == f.before.me =>
        {
            AfterCall::ResetAndCallAgain
        }
        Err(Failure::HalfInitialized) => AfterCall::HalfInitialized,
        Err(Failure::Refused) => AfterCall::Refused,
        Err(Failure::Other) => AfterCall::Fail,
    }
}

impl<T> AfterCall<T> {
    pub fn transition(&self) -> Transition {
        match self {
            AfterCall::Escrow(_) => Transition::Escrow,
            AfterCall::EscrowedBeforeUse(_) => Transition::EscrowedBeforeUse,
            AfterCall::DoneEscrowedBeforeUse => Transition::DoneEscrowedBeforeUse,
            AfterCall::WaitForPeer => Transition::WaitForPeerAfterCall,
            AfterCall::AlreadyBootstrapped => Transition::AlreadyBootstrapped,
            AfterCall::ResetAndCallAgain => Transition::ResetHalfInitialized,
            AfterCall::HalfInitialized => Transition::HalfInitialized,
            AfterCall::Refused => Transition::CallRefused,
            AfterCall::Fail => Transition::CallFailed,
        }
    }
}

impl BeforeLease {
    pub fn transition(self) -> Transition {
        match self {
            BeforeLease::AlreadyDone => Transition::DoneBeforeLease,
            BeforeLease::NeedsOperator => Transition::NeedsOperatorStops,
            BeforeLease::TakeLease => Transition::TakeLease,
        }
    }
}

impl SpoolAction {
    pub fn transition(self) -> Transition {
        match self {
            SpoolAction::Finish => Transition::FinishSpool,
            SpoolAction::Orphan => Transition::OrphanStaleSpool,
        }
    }
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

    /// The lease holder's decision ([`decide`]): each row asserted; the transitions they reach.
    fn decision_rows() -> Vec<Transition> {
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
        rows.into_iter()
            .map(|(what, s, local, creates, want)| {
                assert_eq!(decide(&facts(&s, local, creates)), want, "{what}");
                want.transition()
            })
            .collect()
    }

    #[test]
    fn the_decision_table() {
        decision_rows();
    }

    /// Before the lease ([`before_lease`]).
    fn before_lease_rows() -> Vec<Transition> {
        let rows: Vec<(&str, Option<TierState>, bool, BeforeLease)> =
            vec![
            ("no state", None, true, BeforeLease::TakeLease),
            ("done", Some(state(Done, "other", 5, &[], BOTH)), true, BeforeLease::AlreadyDone),
            (
                "done, but an envelope in this node's spool",
                Some(state(Done, "other", 5, &[], BOTH)),
                false,
                BeforeLease::TakeLease,
            ),
            (
                "needs-operator",
                Some(state(NeedsOperator, "other", 5, &[], &[])),
                true,
                BeforeLease::NeedsOperator,
            ),
            (
                "needs-operator, but an envelope in this node's spool (it may finish the escrow)",
                Some(state(NeedsOperator, "other", 5, &[], &[])),
                false,
                BeforeLease::TakeLease,
            ),
            (
                "initializing by another node",
                Some(state(Initializing, "other", 5, &[], &[])),
                true,
                BeforeLease::TakeLease,
            ),
            (
                "escrowed",
                Some(state(Escrowed, "other", 5, &[], BOTH)),
                true,
                BeforeLease::TakeLease,
            ),
        ];
        rows.into_iter()
            .map(|(what, s, empty, want)| {
                assert_eq!(before_lease(s.as_ref(), empty), want, "{what}");
                want.transition()
            })
            .collect()
    }

    #[test]
    fn the_before_lease_table() {
        before_lease_rows();
    }

    /// A spooled envelope ([`on_spool`]): superseded only by another completed escrow.
    fn spool_rows() -> Vec<Transition> {
        let with = |phase, id: Option<&str>| {
            let mut s = state(phase, "other", 5, &[], &[]);
            s.escrow_id = id.map(Into::into);
            s
        };
        let rows: Vec<(&str, TierState, SpoolAction)> = vec![
            (
                "escrowed, another escrow",
                with(Escrowed, Some("200-new")),
                SpoolAction::Orphan,
            ),
            (
                "done, another escrow",
                with(Done, Some("200-new")),
                SpoolAction::Orphan,
            ),
            (
                "escrowed, our own escrow (completed before the spool file was removed)",
                with(Escrowed, Some("100-old")),
                SpoolAction::Finish,
            ),
            (
                "done, our own escrow",
                with(Done, Some("100-old")),
                SpoolAction::Finish,
            ),
            (
                "initializing, another escrow",
                with(Initializing, Some("200-new")),
                SpoolAction::Finish,
            ),
            (
                "initialized, another escrow",
                with(Initialized, Some("200-new")),
                SpoolAction::Finish,
            ),
            (
                "needs-operator, another escrow",
                with(NeedsOperator, Some("200-new")),
                SpoolAction::Finish,
            ),
            (
                "done, no escrow named",
                with(Done, None),
                SpoolAction::Finish,
            ),
        ];
        rows.into_iter()
            .map(|(what, s, want)| {
                assert_eq!(on_spool(&s, "100-old"), want, "{what}");
                want.transition()
            })
            .collect()
    }

    #[test]
    fn a_spool_is_superseded_only_by_another_completed_escrow() {
        spool_rows();
    }

    /// An earlier leader's answer ([`on_peer`]).
    fn peer_rows() -> Vec<Transition> {
        [
            (PeerAnswer::NotInitialized, PeerVerdict::AskNext),
            (PeerAnswer::Initialized, PeerVerdict::InitializedElsewhere),
            (PeerAnswer::CannotBeAsked, PeerVerdict::Unreachable),
        ]
        .into_iter()
        .map(|(answer, want)| {
            assert_eq!(on_peer(answer), want, "{answer:?}");
            want.transition()
        })
        .collect()
    }

    #[test]
    fn an_earlier_leader_that_initialized_or_cannot_be_asked_stops_the_tier() {
        peer_rows();
    }

    /// The bootstrap call's answer ([`after_call`]).
    fn after_call_rows() -> Vec<Transition> {
        let fresh = TierState::new("c", "vault", "me");
        let mine = state(Initializing, "me", 5, &[(Initializing, "me")], &[]);
        let other_recent = state(Initializing, "other", 5, &[(Initializing, "other")], &[]);
        let other_old = state(Initializing, "other", 5000, &[(Initializing, "other")], &[]);
        let mut pre_escrowed_before = state(
            Initializing,
            "other",
            5000,
            &[(Initializing, "other")],
            BOTH,
        );
        pre_escrowed_before.pre_escrows = vec!["100-old".into()];
        let escrowed_before = state(Initialized, "other", 5000, &[(Initializing, "other")], BOTH);
        // (what, state before the pre-flight, pre-escrowed, started over, answer, want); an `Ok` answer of
        // "pre-secret" holds the secret escrowed before use.
        type Row<'a> = (
            &'a str,
            &'a TierState,
            bool,
            bool,
            Result<&'a str, Failure>,
            AfterCall<&'a str>,
        );
        let rows: Vec<Row> = vec![
            ("the secrets", &fresh, false, false, Ok("secrets"), AfterCall::Escrow("secrets")),
            ("the secrets after a restart", &mine, false, true, Ok("secrets"), AfterCall::Escrow("secrets")),
            (
                "the secret escrowed before use",
                &fresh,
                true,
                false,
                Ok("pre-secret"),
                AfterCall::EscrowedBeforeUse("pre-secret"),
            ),
            (
                "the secret escrowed before use, earlier leaders' unproven escrows beside it",
                &pre_escrowed_before,
                true,
                false,
                Ok("pre-secret"),
                AfterCall::EscrowedBeforeUse("pre-secret"),
            ),
            (
                "a server that ignored the secret escrowed before use: its own token",
                &fresh,
                true,
                false,
                Ok("secrets"),
                AfterCall::Escrow("secrets"),
            ),
            (
                "already bootstrapped; an earlier leader's secret escrowed before use",
                &pre_escrowed_before,
                true,
                false,
                Err(Failure::AlreadyDone),
                AfterCall::DoneEscrowedBeforeUse,
            ),
            (
                "already bootstrapped; an earlier escrow with both receipts (a state from before pre_escrows)",
                &escrowed_before,
                true,
                false,
                Err(Failure::AlreadyDone),
                AfterCall::DoneEscrowedBeforeUse,
            ),
            (
                "already bootstrapped; earlier receipts, but this node escrowed nothing before use",
                &escrowed_before,
                false,
                false,
                Err(Failure::AlreadyDone),
                AfterCall::AlreadyBootstrapped,
            ),
            (
                "already bootstrapped by another node within its grace",
                &other_recent,
                false,
                false,
                Err(Failure::AlreadyDone),
                AfterCall::WaitForPeer,
            ),
            (
                "already bootstrapped, nothing escrowed, nobody to wait for",
                &other_old,
                true,
                false,
                Err(Failure::AlreadyDone),
                AfterCall::AlreadyBootstrapped,
            ),
            (
                "half-initialized by this node's own interrupted call",
                &mine,
                false,
                false,
                Err(Failure::HalfInitialized),
                AfterCall::ResetAndCallAgain,
            ),
            (
                "half-initialized again after the reset",
                &mine,
                false,
                true,
                Err(Failure::HalfInitialized),
                AfterCall::HalfInitialized,
            ),
            (
                "half-initialized, the state names another node",
                &other_old,
                false,
                false,
                Err(Failure::HalfInitialized),
                AfterCall::HalfInitialized,
            ),
            ("refused", &fresh, false, false, Err(Failure::Refused), AfterCall::Refused),
            ("anything else", &mine, false, false, Err(Failure::Other), AfterCall::Fail),
        ];
        rows.into_iter()
            .map(|(what, s, pre_escrowed, started_over, answer, want)| {
                let f = AfterFacts {
                    before: facts(s, None, true),
                    pre_escrowed,
                    answer_is_pre_secret: answer == Ok("pre-secret"),
                    started_over,
                };
                assert_eq!(after_call(&f, answer), want, "{what}");
                want.transition()
            })
            .collect()
    }

    #[test]
    fn the_answer_table() {
        after_call_rows();
    }

    /// The names in the first column of docs/bootstrap.md's table "Every transition".
    fn documented_transitions() -> Vec<String> {
        let doc = include_str!("../../../docs/bootstrap.md");
        let table = doc
            .split_once("\n### Every transition\n")
            .expect("docs/bootstrap.md has the section \"Every transition\"")
            .1;
        table
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let first = l.trim_start_matches('|').split('|').next()?.trim();
                Some(first.strip_prefix('`')?.strip_suffix('`')?.to_string())
            })
            .collect()
    }

    #[test]
    fn every_documented_transition_has_a_table_row_and_every_transition_is_documented() {
        let mut reached: Vec<Transition> = [
            before_lease_rows(),
            spool_rows(),
            decision_rows(),
            peer_rows(),
            after_call_rows(),
        ]
        .concat();
        reached.sort();
        reached.dedup();
        for t in Transition::ALL {
            assert!(reached.contains(&t), "no table row reaches {}", t.name());
        }
        let documented = documented_transitions();
        let names: Vec<&str> = Transition::ALL.iter().map(|t| t.name()).collect();
        for d in &documented {
            assert!(
                names.contains(&d.as_str()),
                "docs/bootstrap.md documents {d}, which decide.rs does not know"
            );
        }
        for n in names {
            assert_eq!(
                documented.iter().filter(|d| *d == n).count(),
                1,
                "docs/bootstrap.md's table \"Every transition\" must name {n} once"
            );
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
