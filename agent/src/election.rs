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
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// One try for the tier's lease by a process that keeps no [`Lock`] (a tool, a test playing another node):
/// the lock blob is created first, as at a process's first try.
pub async fn try_acquire(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
    lease_secs: i32,
) -> Result<Option<Leadership>, AzureError> {
    Lock::new(cluster, tier)
        .try_acquire(az, blob_endpoint, policy, lease_secs)
        .await
}

/// A tier's lock blob (the blob that is leased), and whether this process knows it exists: it created it,
/// or found it there. A node that polls for a lease held elsewhere then sends one request per try (the
/// acquire) instead of two (create, then acquire). A lock blob removed since (an operator's reset) makes the
/// acquire answer 404: it is created again, and the acquire sent again.
#[derive(Debug)]
pub struct Lock {
    cluster: String,
    tier: String,
    exists: AtomicBool,
}

impl Lock {
    pub fn new(cluster: &str, tier: &str) -> Self {
        Lock {
            cluster: cluster.into(),
            tier: tier.into(),
            exists: AtomicBool::new(false),
        }
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn tier(&self) -> &str {
        &self.tier
    }

    /// Tries once (with retries for transient errors) to become the tier's leader. `Ok(None)`: someone else is.
    pub async fn try_acquire(
        &self,
        az: &Azure,
        blob_endpoint: &str,
        policy: RetryPolicy,
        lease_secs: i32,
    ) -> Result<Option<Leadership>, AzureError> {
        let blob = az.blob(
            blob_endpoint,
            COORDINATION_CONTAINER,
            &lock_blob_name(&self.cluster, &self.tier),
        )?;
        let lease_id = crate::ids::uuid_v4().to_string();
        let sent = std::sync::Mutex::new(Instant::now());
        let acquired = with_lock(
            &self.exists,
            || create_lock(&blob, policy),
            || {
                *sent.lock().expect("not poisoned") = Instant::now();
                acquire(&blob, &lease_id, policy, lease_secs)
            },
        )
        .await;
        match acquired {
            Ok(()) => {}
            Err(e) if e.is(409) => return Ok(None),
            Err(e) => return Err(e),
        }
        let sent = *sent.lock().expect("not poisoned");
        let tier = self.tier.as_str();
        // Counted from before the acquire's first attempt: a retried acquire only makes the deadline more
        // conservative.
        let (tx, rx) = watch::channel(Some(valid_until(sent, lease_secs)));
        let renew_blob = az.blob(
            blob_endpoint,
            COORDINATION_CONTAINER,
            &lock_blob_name(&self.cluster, tier),
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
}

/// The lock blob's part of an acquire: `create` (create-only, idempotent) before the first `acquire` of a
/// process, never after one that found the blob; and once more, with the acquire again, when the acquire
/// answers 404 (the blob is gone). Answers the acquire's result.
async fn with_lock<C, CF, A, AF>(
    exists: &AtomicBool,
    create: C,
    acquire: A,
) -> Result<(), AzureError>
where
    C: Fn() -> CF,
    CF: Future<Output = Result<(), AzureError>>,
    A: Fn() -> AF,
    AF: Future<Output = Result<(), AzureError>>,
{
    if !exists.load(Ordering::Relaxed) {
        create().await?;
        exists.store(true, Ordering::Relaxed);
    }
    match acquire().await {
        Err(e) if e.is(404) => {
            exists.store(false, Ordering::Relaxed);
            create().await?;
            exists.store(true, Ordering::Relaxed);
            acquire().await
        }
        r => r,
    }
}

/// Creates the lock blob if it does not exist. It existing already (409), or being leased right now (412), is
/// success.
async fn create_lock(blob: &BlobClient, policy: RetryPolicy) -> Result<(), AzureError> {
    let created = call(policy, "coordination lock create", || async {
        blob.upload(
            RequestContent::from(Vec::<u8>::new()),
            Some(BlobClientUploadOptions::default().if_not_exists()),
        )
        .await
        .map(|_| ())
    })
    .await;
    match created {
        Err(e) if e.is(409) || e.is(412) => Ok(()),
        r => r,
    }
}

/// One lease acquire on the lock blob, with `lease_id` proposed.
async fn acquire(
    blob: &BlobClient,
    lease_id: &str,
    policy: RetryPolicy,
    lease_secs: i32,
) -> Result<(), AzureError> {
    call(policy, "coordination lease acquire", || async {
        let opts = BlobClientAcquireLeaseOptions {
            proposed_lease_id: Some(lease_id.to_string()),
            ..Default::default()
        };
        blob.acquire_lease(lease_secs, Some(opts)).await.map(|_| ())
    })
    .await
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

    /// An in-memory lock blob: whether it exists, and every request in order.
    #[derive(Default)]
    struct Blob {
        exists: std::sync::Mutex<bool>,
        log: std::sync::Mutex<Vec<&'static str>>,
    }

    impl Blob {
        async fn create(&self) -> Result<(), AzureError> {
            self.log.lock().unwrap().push("create");
            *self.exists.lock().unwrap() = true;
            Ok(())
        }
        /// Held elsewhere (409) when the blob exists; 404 when it does not.
        async fn acquire(&self) -> Result<(), AzureError> {
            self.log.lock().unwrap().push("acquire");
            let status = if *self.exists.lock().unwrap() {
                409
            } else {
                404
            };
            Err(AzureError {
                what: "coordination lease acquire".into(),
                status: Some(status),
                code: None,
                detail: String::new(),
            })
        }
        fn log(&self) -> Vec<&'static str> {
            self.log.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn the_lock_blob_is_created_once_per_process_not_at_every_try() {
        let (blob, exists) = (Blob::default(), AtomicBool::new(false));
        for _ in 0..3 {
            let r = with_lock(&exists, || blob.create(), || blob.acquire()).await;
            assert!(r.unwrap_err().is(409), "held elsewhere");
        }
        assert_eq!(blob.log(), ["create", "acquire", "acquire", "acquire"]);
    }

    #[tokio::test]
    async fn a_lock_blob_removed_since_is_created_again_and_the_acquire_sent_again() {
        let (blob, exists) = (Blob::default(), AtomicBool::new(true));
        let r = with_lock(&exists, || blob.create(), || blob.acquire()).await;
        assert!(r.unwrap_err().is(409), "the second acquire's answer");
        assert_eq!(blob.log(), ["acquire", "create", "acquire"]);
        assert!(exists.load(Ordering::Relaxed));
    }
}
