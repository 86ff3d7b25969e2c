//! One look's claim on a tier ([`super::settle`]): the bootstrap lease first, then the tier state read under
//! it, while this node's own server gets ready. The claim sends storage requests only, so it need not wait for
//! the server; and nothing that needs the server runs before it answers: a look waits for both
//! ([`when_ready`]).
//!
//! The lease comes before the first read. The state read under the lease is the one every decision and the
//! fence rest on, so a read before it would only let a node skip the lease on a tier that is done; on a
//! cluster's first boot it is one more storage round trip on the way to the bootstrap call. A node that finds
//! the lease taken reads the state without it, to see whether the tier is done meanwhile.

use super::decide::{self, BeforeLease};
pub use super::traits::Claims;
use super::{crash_if, BootstrapError, CrashPoint};
use crate::coordination::{Expect, TierState};
use std::future::Future;
use std::time::{Duration, Instant};

/// What a claim found. (One per look, moved once: the size of `Lead` costs nothing worth a box.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Claimed<L> {
    /// The tier is done: nothing is left for this node.
    Done,
    /// Another node holds the lease: the tier's phase as read.
    Other(String),
    /// This node holds the lease: the state under it and what its next write must find.
    Lead {
        lease: L,
        state: Option<TierState>,
        expect: Expect,
    },
}

/// How often a node that found the lease held by another tries it again (a lease attempt before its state
/// read; between them, a look only reads the state): it takes over a lease given back or expired within this.
/// Seldom next to the follower's poll (500 ms): while ten nodes boot, every request to the coordination
/// storage delays the leader's own (docs/PERFORMANCE.md, "Calls per boot"); and a lease that is not given
/// back lasts `bootstrap.lease_secs` (15–60 s) anyway.
pub const LEASE_RETRY: Duration = Duration::from_secs(2);

/// Whether a look tries the lease, or only reads the state (a node that found the lease held by another a
/// moment ago: [`lease_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryLease {
    Yes,
    No,
}

/// Whether a look at `now` tries the lease, when this node last found it held by another at `held_at`:
/// not until [`LEASE_RETRY`] after that.
pub fn lease_now(held_at: Option<Instant>, now: Instant) -> TryLease {
    match held_at {
        Some(at) if now.duration_since(at) < LEASE_RETRY => TryLease::No,
        _ => TryLease::Yes,
    }
}

/// Takes the tier's lease and reads its state under it; gives the lease back when the tier is done or needs
/// an operator. `spool_empty`: this node's spool holds no envelope of the tier (one that does takes the lease
/// whatever the state says: it may finish the escrow). [`TryLease::No`]: the state is read without the
/// lease, as when another node holds it.
pub async fn claim<C: Claims>(
    c: &C,
    tier: &str,
    spool_empty: bool,
    lease: TryLease,
    crash_at: Option<CrashPoint>,
) -> Result<Claimed<C::Lease>, BootstrapError> {
    let lease = match lease {
        TryLease::Yes => c.try_lease().await?,
        TryLease::No => None,
    };
    let Some(lease) = lease else {
        let state = c.read().await?;
        return match decide::before_lease(state.as_ref(), spool_empty) {
            BeforeLease::AlreadyDone => Ok(Claimed::Done),
            BeforeLease::NeedsOperator => Err(needs_operator(tier, state)),
            BeforeLease::TakeLease => Ok(Claimed::Other(
                state
                    .map(|s| format!("{:?}", s.phase))
                    .unwrap_or_else(|| "none".into()),
            )),
        };
    };
    crash_if(crash_at, CrashPoint::AfterLease);
    // Under the lease: the previous holder may have finished just before releasing it. Every state write from
    // here on must find what this read found (the fence).
    let (state, expect) = match c.read_for_update().await {
        Ok(read) => read,
        Err(e) => {
            c.release(lease).await;
            return Err(e.into());
        }
    };
    match decide::before_lease(state.as_ref(), spool_empty) {
        BeforeLease::TakeLease => Ok(Claimed::Lead {
            lease,
            state,
            expect,
        }),
        BeforeLease::AlreadyDone => {
            c.release(lease).await;
            Ok(Claimed::Done)
        }
        BeforeLease::NeedsOperator => {
            c.release(lease).await;
            Err(needs_operator(tier, state))
        }
    }
}

fn needs_operator(tier: &str, state: Option<TierState>) -> BootstrapError {
    BootstrapError::NeedsOperator {
        tier: tier.into(),
        message: state.and_then(|s| s.message).unwrap_or_default(),
    }
}

/// The local server's readiness and the claim, at once; the claim's answer once both are over. A claim that
/// took the lease for a server that never got ready gives the lease back, so the next node need not wait for
/// it to expire.
pub async fn when_ready<C: Claims>(
    c: &C,
    ready: impl Future<Output = Result<(), BootstrapError>>,
    claim: impl Future<Output = Result<Claimed<C::Lease>, BootstrapError>>,
) -> Result<Claimed<C::Lease>, BootstrapError> {
    let (ready, claimed) = tokio::join!(ready, claim);
    match (ready, claimed) {
        (Ok(()), claimed) => claimed,
        (Err(e), Ok(Claimed::Lead { lease, .. })) => {
            c.release(lease).await;
            Err(e)
        }
        (Err(e), _) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::azure::AzureError;
    use crate::coordination::TierPhase;
    use std::sync::{Arc, Mutex};

    /// Storage in memory; every call is logged in order.
    #[derive(Default)]
    struct Fake {
        log: Arc<Mutex<Vec<String>>>,
        /// Another node holds the lease.
        taken: bool,
        state: Option<TierState>,
        read_fails: bool,
        changed: tokio::sync::Notify,
    }

    impl Fake {
        fn note(&self, what: &str) {
            self.log.lock().unwrap().push(what.into());
            self.changed.notify_waiters();
        }
        fn calls(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
        /// Waits until `what` was called.
        async fn called(&self, what: &str) {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.calls().iter().any(|c| c == what) {
                    return;
                }
                changed.await;
            }
        }
    }

    #[async_trait::async_trait]
    impl Claims for Fake {
        type Lease = &'static str;
        async fn try_lease(&self) -> Result<Option<Self::Lease>, AzureError> {
            self.note("try_lease");
            Ok((!self.taken).then_some("lease"))
        }
        async fn release(&self, lease: Self::Lease) {
            self.note(&format!("release {lease}"));
        }
        async fn read(&self) -> Result<Option<TierState>, AzureError> {
            self.note("read");
            Ok(self.state.clone())
        }
        async fn read_for_update(&self) -> Result<(Option<TierState>, Expect), AzureError> {
            self.note("read_for_update");
            if self.read_fails {
                return Err(AzureError {
                    what: "tier state read".into(),
                    status: Some(503),
                    code: None,
                    detail: "HTTP 503".into(),
                });
            }
            Ok((self.state.clone(), Expect::Absent))
        }
    }

    fn state(phase: TierPhase) -> TierState {
        let mut s = TierState::new("lab", "nomad", "nomad-0");
        s.set(phase, "nomad-0", Some("a note".into()));
        s
    }

    fn not_ready() -> BootstrapError {
        BootstrapError::Tier {
            tier: "nomad".into(),
            message: "local Nomad not answering".into(),
        }
    }

    /// A first look's claim: the lease tried, this node's spool empty.
    fn look(
        fake: &Fake,
    ) -> impl Future<Output = Result<Claimed<&'static str>, BootstrapError>> + '_ {
        claim(fake, "nomad", true, TryLease::Yes, None)
    }

    /// Bounds a test that would hang on a look that waits for the server before it claims.
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("the claim waited for the server (or hung)")
    }

    #[tokio::test]
    async fn a_fresh_tier_is_claimed_lease_first_while_the_server_gets_ready() {
        let fake = Fake::default();
        // The server answers only once the state was read under the lease: a look that waits for the server
        // before it claims never gets there.
        let ready = async {
            fake.called("read_for_update").await;
            fake.note("ready");
            Ok(())
        };
        let claimed = within(when_ready(&fake, ready, look(&fake))).await.unwrap();
        assert!(matches!(
            claimed,
            Claimed::Lead {
                lease: "lease",
                state: None,
                expect: Expect::Absent
            }
        ));
        // No read before the lease; the lease kept.
        assert_eq!(fake.calls(), ["try_lease", "read_for_update", "ready"]);
    }

    #[tokio::test]
    async fn a_claim_that_ends_early_still_waits_for_the_server() {
        let fake = Fake {
            state: Some(state(TierPhase::Done)),
            ..Default::default()
        };
        let ready = async {
            fake.called("release lease").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            fake.note("ready");
            Ok(())
        };
        let claimed = within(when_ready(&fake, ready, look(&fake))).await.unwrap();
        assert!(matches!(claimed, Claimed::Done));
        assert_eq!(
            fake.calls(),
            ["try_lease", "read_for_update", "release lease", "ready"]
        );
    }

    #[tokio::test]
    async fn a_lease_taken_for_a_server_that_never_got_ready_is_given_back() {
        let fake = Fake::default();
        let ready = async {
            fake.called("read_for_update").await;
            Err(not_ready())
        };
        let e = within(when_ready(&fake, ready, look(&fake)))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), not_ready().to_string());
        assert_eq!(
            fake.calls(),
            ["try_lease", "read_for_update", "release lease"]
        );
    }

    #[tokio::test]
    async fn a_lease_held_elsewhere_or_not_tried_reads_the_state_without_it() {
        // The lease held by another node; or free, but this look told not to try it (it leaves it alone).
        let cases = [
            (true, TryLease::Yes, &["try_lease", "read"][..]),
            (false, TryLease::No, &["read"][..]),
        ];
        for (taken, lease, calls) in cases {
            for (phase, want_done) in [(TierPhase::Initializing, false), (TierPhase::Done, true)] {
                let fake = Fake {
                    taken,
                    state: Some(state(phase)),
                    ..Default::default()
                };
                let claimed = claim(&fake, "nomad", true, lease, None).await.unwrap();
                match claimed {
                    Claimed::Done => assert!(want_done, "{lease:?} {phase:?}"),
                    Claimed::Other(p) => {
                        assert!(!want_done, "{lease:?} {phase:?}");
                        assert_eq!(p, "Initializing");
                    }
                    Claimed::Lead { .. } => panic!("{lease:?}: no lease was to be taken"),
                }
                assert_eq!(fake.calls(), calls, "{lease:?} {phase:?}");
            }
        }
    }

    #[test]
    fn a_lease_found_held_is_tried_again_only_after_the_lease_retry() {
        let now = std::time::Instant::now();
        assert_eq!(lease_now(None, now), TryLease::Yes);
        assert_eq!(lease_now(Some(now), now), TryLease::No);
        let step = LEASE_RETRY;
        assert_eq!(lease_now(Some(now), now + step / 2), TryLease::No);
        assert_eq!(lease_now(Some(now), now + step), TryLease::Yes);
    }

    #[tokio::test]
    async fn a_tier_for_an_operator_is_reported_and_its_lease_given_back() {
        let fake = Fake {
            state: Some(state(TierPhase::NeedsOperator)),
            ..Default::default()
        };
        let e = look(&fake).await.unwrap_err();
        assert!(
            matches!(&e, BootstrapError::NeedsOperator { tier, message } if tier == "nomad" && message == "a note"),
            "{e}"
        );
        assert_eq!(
            fake.calls(),
            ["try_lease", "read_for_update", "release lease"]
        );
        // An envelope in this node's spool may finish the escrow: the lease is kept.
        let fake = Fake {
            state: Some(state(TierPhase::NeedsOperator)),
            ..Default::default()
        };
        let claimed = claim(&fake, "nomad", false, TryLease::Yes, None)
            .await
            .unwrap();
        assert!(matches!(claimed, Claimed::Lead { .. }));
        assert_eq!(fake.calls(), ["try_lease", "read_for_update"]);
    }

    #[tokio::test]
    async fn a_failed_read_under_the_lease_gives_the_lease_back() {
        let fake = Fake {
            read_fails: true,
            ..Default::default()
        };
        let e = look(&fake).await.unwrap_err();
        assert!(matches!(e, BootstrapError::Azure(_)), "{e}");
        assert_eq!(
            fake.calls(),
            ["try_lease", "read_for_update", "release lease"]
        );
    }
}
