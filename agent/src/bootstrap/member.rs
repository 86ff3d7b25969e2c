//! After a tier is bootstrapped (by this node or another), this node's own server must become a member of
//! that one cluster. Raft products join on their own (`retry_join`), with one exception the agent repairs:
//! a Vault/OpenBao server whose join was cut off by a power loss keeps raft state without the cluster's seal
//! configuration, and every later join attempt is refused with "cluster already has state" — for ever.
//!
//! Such a server holds nothing of value: without the seal configuration it has no barrier, no keys and no
//! data (a member that received the cluster's data reports `initialized`). So a server still uninitialized
//! after a grace period, in a tier that is done, has its storage reset once (stop, empty, start) and joins
//! afresh. A server that is initialized but stays sealed, or that never answers, is never reset: that is
//! the seal or the network, and the operator gets the one step to take.

use crate::retry::{retry, Attempt, RetryPolicy, TimeoutError};
use std::future::Future;
use std::time::Duration;

/// What this node's own server says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalState {
    /// Initialized and unsealed: a member of the cluster.
    Member,
    /// Initialized (it holds the cluster's seal configuration) but sealed.
    Sealed,
    /// Not initialized: not joined yet, or stuck with storage from a join that was cut off.
    Uninitialized,
    /// No usable answer (the transport's words; never a secret).
    Unreachable(String),
}

impl std::fmt::Display for LocalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalState::Member => f.write_str("initialized, unsealed"),
            LocalState::Sealed => f.write_str("initialized, sealed"),
            LocalState::Uninitialized => f.write_str("not initialized"),
            LocalState::Unreachable(e) => write!(f, "no answer ({e})"),
        }
    }
}

impl TimeoutError for LocalState {
    fn timeout(after: Duration) -> Self {
        LocalState::Unreachable(format!("no answer within {after:?}"))
    }
}

/// How this node's server became (or already was) a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The tier has nothing to check (or the server was a member at once / within the grace).
    Member,
    /// It stayed uninitialized for the grace period; its storage was reset and it joined afresh.
    RejoinedAfterReset,
}

/// Why this node's server is not a member at the deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinFailure {
    #[error("its server is initialized but still sealed after {waited:?} (the seal key is unreachable or refused)")]
    Sealed { waited: Duration },
    #[error("its server did not answer within {waited:?}: {last}")]
    Unreachable { waited: Duration, last: String },
    #[error("its server is still not initialized {waited:?} after the tier was done{}", if *.reset { ", even after its storage was reset" } else { "" })]
    NeverJoined { waited: Duration, reset: bool },
    #[error("its server stayed uninitialized (a join cut off by a power loss leaves it so) and resetting its storage failed: {0}")]
    ResetFailed(String),
}

/// The waits: `grace` before an uninitialized server is reset, `deadline` for the whole convergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinPolicy {
    pub grace: Duration,
    pub deadline: Duration,
    /// Time between two looks at the local server.
    pub poll: Duration,
}

fn poll_policy(p: &JoinPolicy, deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        deadline,
        attempt_timeout: Duration::from_secs(5).min(deadline),
        initial_backoff: p.poll,
        max_backoff: p.poll,
    }
}

/// Waits until `probe` says [`LocalState::Member`]; after `grace` with the server still uninitialized, calls
/// `reset` once and waits again until the deadline.
pub async fn converge<P, PF, R, RF, E>(
    policy: JoinPolicy,
    probe: P,
    reset: R,
) -> Result<Joined, JoinFailure>
where
    P: Fn() -> PF,
    PF: Future<Output = LocalState>,
    R: FnOnce() -> RF,
    RF: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let wait = |limit: Duration| {
        let probe = &probe;
        retry(poll_policy(&policy, limit), move |_| async move {
            match probe().await {
                LocalState::Member => Attempt::Done(()),
                other => Attempt::Retry(other),
            }
        })
    };
    let grace = policy.grace.min(policy.deadline);
    let last = match wait(grace).await {
        Ok(()) => return Ok(Joined::Member),
        Err(e) => e.last().clone(),
    };
    let rest = policy.deadline.saturating_sub(grace);
    let reset_done = if last == LocalState::Uninitialized {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "this node's server is still not initialized in a bootstrapped tier (a join cut off by a power loss \
             leaves raft state that refuses every later join): resetting its storage so it joins afresh"
        );
        reset()
            .await
            .map_err(|e| JoinFailure::ResetFailed(e.to_string()))?;
        true
    } else {
        false
    };
    match wait(rest).await {
        Ok(()) if reset_done => Ok(Joined::RejoinedAfterReset),
        Ok(()) => Ok(Joined::Member),
        Err(e) => Err(match e.last().clone() {
            LocalState::Sealed => JoinFailure::Sealed {
                waited: policy.deadline,
            },
            LocalState::Unreachable(last) => JoinFailure::Unreachable {
                waited: policy.deadline,
                last,
            },
            _ => JoinFailure::NeverJoined {
                waited: policy.deadline,
                reset: reset_done,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn quick() -> JoinPolicy {
        JoinPolicy {
            grace: Duration::from_millis(150),
            deadline: Duration::from_millis(600),
            poll: Duration::from_millis(20),
        }
    }

    type Server<P, R> = (Arc<AtomicU32>, P, R);

    /// A server that answers `before` until it was reset (and `after` from then on).
    fn server(
        before: LocalState,
        after: LocalState,
    ) -> Server<
        impl Fn() -> std::future::Ready<LocalState>,
        impl FnOnce() -> std::future::Ready<Result<(), crate::bootstrap::TierError>>,
    > {
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let probe = move || {
            std::future::ready(if r.load(Ordering::SeqCst) == 0 {
                before.clone()
            } else {
                after.clone()
            })
        };
        let r = resets.clone();
        let reset = move || {
            r.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(()))
        };
        (resets, probe, reset)
    }

    #[tokio::test]
    async fn a_member_is_never_reset() {
        let (resets, probe, reset) = server(LocalState::Member, LocalState::Member);
        assert_eq!(converge(quick(), probe, reset).await, Ok(Joined::Member));
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_server_that_joins_within_the_grace_is_not_reset() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let probe = move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if n < 3 {
                LocalState::Uninitialized
            } else {
                LocalState::Member
            })
        };
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let reset = move || {
            r.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<(), String>(()))
        };
        assert_eq!(converge(quick(), probe, reset).await, Ok(Joined::Member));
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_server_stuck_uninitialized_is_reset_once_and_joins() {
        let (resets, probe, reset) = server(LocalState::Uninitialized, LocalState::Member);
        assert_eq!(
            converge(quick(), probe, reset).await,
            Ok(Joined::RejoinedAfterReset)
        );
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_server_that_never_joins_is_reported_after_one_reset() {
        let (resets, probe, reset) = server(LocalState::Uninitialized, LocalState::Uninitialized);
        let e = converge(quick(), probe, reset).await.unwrap_err();
        assert_eq!(
            e,
            JoinFailure::NeverJoined {
                waited: quick().deadline,
                reset: true
            }
        );
        assert!(
            e.to_string().contains("even after its storage was reset"),
            "{e}"
        );
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_sealed_or_silent_server_is_never_reset() {
        let (resets, probe, reset) = server(LocalState::Sealed, LocalState::Member);
        assert_eq!(
            converge(quick(), probe, reset).await,
            Err(JoinFailure::Sealed {
                waited: quick().deadline
            })
        );
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        let (resets, probe, reset) = server(
            LocalState::Unreachable("connection refused".into()),
            LocalState::Member,
        );
        match converge(quick(), probe, reset).await {
            Err(JoinFailure::Unreachable { last, .. }) => assert_eq!(last, "connection refused"),
            other => panic!("{other:?}"),
        }
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_failed_reset_is_reported_with_its_reason() {
        let probe = || std::future::ready(LocalState::Uninitialized);
        let reset = || {
            std::future::ready(Err(crate::bootstrap::TierError::Step {
                step: "stop vault",
                detail: "permission denied".into(),
            }))
        };
        assert_eq!(
            converge(quick(), probe, reset).await,
            Err(JoinFailure::ResetFailed(
                "stop vault: permission denied".into()
            ))
        );
    }
}
