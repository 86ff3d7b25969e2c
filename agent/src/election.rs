//! Leader election per cluster and tier with an Azure Blob lease (60 s, renewed every 20 s). Only server
//! tiers take a lease. Losing the lease (renewals failing until it would have expired) flips `lost`, and the
//! bootstrap stops at its next safe point.

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

/// The lease of one tier, held by this node.
pub struct Leadership {
    tier: String,
    blob: BlobClient,
    lease_id: String,
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

fn lease_uuid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
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
    let created = call(policy, "leader lock create", || {
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
    let lease_id = lease_uuid();
    let acquired = call(policy, "leader lease acquire", || {
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
    let (tx, rx) = watch::channel(false);
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
        lost: rx,
        renewer,
    }))
}

async fn renew_loop(
    blob: BlobClient,
    lease_id: String,
    tier: String,
    tx: watch::Sender<bool>,
    lease_secs: i32,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(lease_secs as u64 / 3)).await;
        let expires = last_ok + Duration::from_secs(lease_secs as u64);
        let remaining = expires
            .saturating_duration_since(Instant::now())
            .saturating_sub(Duration::from_secs(2));
        let policy = RetryPolicy {
            deadline: remaining,
            attempt_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(3),
        };
        let r = call(policy, "leader lease renew", || {
            let (blob, id) = (&blob, lease_id.clone());
            async move { blob.renew_lease(id, None).await.map(|_| ()) }
        })
        .await;
        match r {
            Ok(()) => last_ok = Instant::now(),
            Err(e) => {
                tracing::error!(tier = %tier, error = %e, "leader lease lost");
                let _ = tx.send(true);
                return;
            }
        }
    }
}

impl Leadership {
    /// A safe point: fails if the lease was lost.
    pub fn check(&self) -> Result<(), LeaseLost> {
        if *self.lost.borrow() {
            Err(LeaseLost {
                tier: self.tier.clone(),
            })
        } else {
            Ok(())
        }
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
