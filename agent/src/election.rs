//! Leader election per cluster and tier with an Azure Blob lease (60 s, renewed every 20 s). Only server
//! tiers take a lease. Whether this node still holds it is decided by its own monotonic clock
//! ([`LeaseClock`]): the lease counts from the moment the last successful acquire or renewal was *sent*, less a
//! safety margin, so a process that was paused (SIGSTOP, a frozen VM) past its lease knows it lost it without
//! asking anyone. The bootstrap checks it at every safe point and before every coordination write; the writes
//! themselves are fenced by storage (coordination.rs), which covers the last gap between check and request.

use crate::azure::{call, Azure, AzureError};
use crate::retry::RetryPolicy;
use azure_core::http::RequestContent;
use azure_storage_blob::models::{BlobClientAcquireLeaseOptions, BlobClientUploadOptions};
use azure_storage_blob::BlobClient;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub const COORDINATION_CONTAINER: &str = "coordination";
/// Azure allows leases of 15 to 60 seconds; renewal runs every third of the lease.
pub const LEASE_SECS: i32 = 60;

#[derive(Debug, thiserror::Error)]
#[error("leadership of {tier} lost (lease not renewed in time)")]
pub struct LeaseLost {
    pub tier: String,
}

/// How much earlier than the lease itself this node stops trusting it: a quarter of the lease, at least 2 s
/// (15 s of Azure's 60 s lease; 3.75 s of the lab's 15 s). Covers clock-rate differences and the time between
/// a check and the request it guards reaching storage.
pub fn safety_margin(lease_secs: i32) -> Duration {
    (Duration::from_secs(lease_secs.max(0) as u64) / 4).max(Duration::from_secs(2))
}

/// Until when a lease acquired or renewed by a request *sent* at `sent` may be trusted.
pub fn valid_until(sent: Instant, lease_secs: i32) -> Instant {
    sent + Duration::from_secs(lease_secs.max(0) as u64).saturating_sub(safety_margin(lease_secs))
}

/// This node's view of its lease, by its own monotonic clock: valid until a deadline moved forward by each
/// successful renewal, or lost (a renewal failed). Cloned into whatever must stop when the lease is gone.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    tier: String,
    /// `None`: lost for good.
    until: watch::Receiver<Option<Instant>>,
}

impl LeaseClock {
    /// A clock valid until `until` that nothing renews (the leadership's renewal task owns the sender).
    pub fn fixed(tier: &str, until: Option<Instant>) -> Self {
        let (_tx, rx) = watch::channel(until);
        LeaseClock {
            tier: tier.into(),
            until: rx,
        }
    }

    /// Fails once the lease may have expired (its deadline passed) or a renewal failed.
    pub fn check(&self) -> Result<(), LeaseLost> {
        match *self.until.borrow() {
            Some(until) if Instant::now() < until => Ok(()),
            _ => Err(LeaseLost {
                tier: self.tier.clone(),
            }),
        }
    }

    pub fn tier(&self) -> &str {
        &self.tier
    }
}

/// The lease of one tier, held by this node.
pub struct Leadership {
    tier: String,
    blob: BlobClient,
    lease_id: String,
    clock: LeaseClock,
    renewer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

pub fn lock_blob_name(cluster: &str, tier: &str) -> String {
    format!("{cluster}/{tier}/leader.lock")
}

/// Tries once (with retries for transient errors) to become the tier's leader. `Ok(None)`: someone else is.
pub async fn try_acquire(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
    lease_secs: i32,
) -> Result<Option<Leadership>, AzureError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &lock_blob_name(cluster, tier),
    )?;
    // The lock blob must exist before it can be leased; creating it is create-only and idempotent.
    let created = call(policy, "coordination lock create", || {
        let blob = &blob;
        async move {
            blob.upload(
                RequestContent::from(Vec::<u8>::new()),
                Some(BlobClientUploadOptions::default().if_not_exists()),
            )
            .await
            .map(|_| ())
        }
    })
    .await;
    match created {
        Ok(()) => {}
        // 409 BlobAlreadyExists; 412 LeaseIdMissing: it exists and is leased right now.
        Err(e) if e.is(409) || e.is(412) => {}
        Err(e) => return Err(e),
    }
    let lease_id = crate::ids::uuid_v4().to_string();
    let sent = Instant::now();
    let acquired = call(policy, "coordination lease acquire", || {
        let (blob, id) = (&blob, lease_id.clone());
        async move {
            let opts = BlobClientAcquireLeaseOptions {
                proposed_lease_id: Some(id),
                ..Default::default()
            };
            blob.acquire_lease(lease_secs, Some(opts)).await.map(|_| ())
        }
    })
    .await;
    match acquired {
        Ok(()) => {}
        Err(e) if e.is(409) => return Ok(None),
        Err(e) => return Err(e),
    }
    // Counted from before the first attempt: a retried acquire only makes the deadline more conservative.
    let (tx, rx) = watch::channel(Some(valid_until(sent, lease_secs)));
    let renew_blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &lock_blob_name(cluster, tier),
    )?;
    let renewer = tokio::spawn(renew_loop(
        renew_blob,
        lease_id.clone(),
        tier.to_string(),
        tx,
        lease_secs,
    ));
    tracing::info!(tier, "won the leader lease");
    Ok(Some(Leadership {
        tier: tier.to_string(),
        blob,
        lease_id,
        clock: LeaseClock {
            tier: tier.to_string(),
            until: rx,
        },
        renewer,
    }))
}

async fn renew_loop(
    blob: BlobClient,
    lease_id: String,
    tier: String,
    tx: watch::Sender<Option<Instant>>,
    lease_secs: i32,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(lease_secs as u64 / 3)).await;
        let Some(until) = *tx.borrow() else { return };
        // Renewal may retry until the lease can no longer be trusted; a renewal after that (a process paused
        // past its lease) is never sent: someone else may hold the lease by now.
        let remaining = until.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            tracing::error!(tier = %tier, "leader lease expired before it could be renewed (process paused?)");
            tx.send_replace(None);
            return;
        }
        let policy = RetryPolicy {
            deadline: remaining,
            attempt_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(3),
        };
        let sent = std::sync::Mutex::new(Instant::now());
        let r = call(policy, "coordination lease renew", || {
            let (blob, id) = (&blob, lease_id.clone());
            *sent.lock().expect("not poisoned") = Instant::now();
            async move { blob.renew_lease(id, None).await.map(|_| ()) }
        })
        .await;
        match r {
            // The attempt that succeeded was sent at `sent`: the lease runs from no earlier than that.
            Ok(()) => {
                let sent = *sent.lock().expect("not poisoned");
                tx.send_replace(Some(valid_until(sent, lease_secs)));
            }
            Err(e) => {
                tracing::error!(tier = %tier, error = %e, "leader lease lost");
                tx.send_replace(None);
                return;
            }
        }
    }
}

impl Leadership {
    /// A safe point: fails if the lease may have expired by this node's clock, or a renewal failed.
    pub fn check(&self) -> Result<(), LeaseLost> {
        self.clock.check()
    }

    /// The lease's clock, for whatever must stop when the lease is gone (the coordination fence).
    pub fn clock(&self) -> LeaseClock {
        self.clock.clone()
    }

    /// Gives the lease up (best effort; it expires by itself within 60 s otherwise).
    pub async fn release(self) {
        self.renewer.abort();
        let _ = self.blob.release_lease(self.lease_id.clone(), None).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_trusted_for_less_than_its_length_from_the_request() {
        assert_eq!(safety_margin(60), Duration::from_secs(15));
        assert_eq!(safety_margin(15), Duration::from_millis(3750));
        assert_eq!(safety_margin(4), Duration::from_secs(2));
        let sent = Instant::now();
        assert_eq!(valid_until(sent, 60), sent + Duration::from_secs(45));
        assert_eq!(valid_until(sent, 15), sent + Duration::from_millis(11250));
        // Renewal runs every third of the lease: a renewal always has time before the clock runs out.
        for lease in [15, 30, 60] {
            assert!(valid_until(sent, lease) > sent + Duration::from_secs(lease as u64 / 3));
        }
    }

    #[test]
    fn a_clock_past_its_deadline_fails_the_check_without_any_failed_renewal() {
        let now = Instant::now();
        let valid = LeaseClock::fixed("vault", Some(now + Duration::from_secs(3600)));
        assert!(valid.check().is_ok());
        // A process paused past its lease: no renewal ever failed (none ran), yet the lease is not trusted.
        let expired = LeaseClock::fixed("vault", Some(now));
        let e = expired.check().unwrap_err();
        assert_eq!(e.tier, "vault");
        assert!(e.to_string().contains("leadership of vault lost"), "{e}");
        assert!(LeaseClock::fixed("vault", None).check().is_err());
    }

    #[tokio::test]
    async fn a_failed_renewal_marks_the_clock_lost_at_once() {
        let (tx, rx) = watch::channel(Some(Instant::now() + Duration::from_secs(3600)));
        let clock = LeaseClock {
            tier: "consul".into(),
            until: rx,
        };
        assert!(clock.clone().check().is_ok());
        tx.send(None).unwrap();
        assert!(clock.check().is_err());
    }
}
