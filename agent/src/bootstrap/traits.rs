//! What the bootstrap driver (`driver.rs`) needs from the world, each behind a small trait: the tier state's
//! storage and the lease ([`Storage`]), the escrow targets ([`EscrowTargets`]), the local spool ([`Spool`]); the
//! product is [`super::Tier`]. A look's claim of the lease and the state before the driver runs (`claim.rs`) is
//! [`Claims`]. The production implementations below wrap the Azure and disk code unchanged;
//! unit tests (`driver/tests.rs`, `claim.rs`) run the real code with in-memory fakes that record every call.

use crate::azure::{Azure, AzureError};
use crate::coordination::{self, Expect, TierState, WriteError};
use crate::election::{self, Leadership, LeaseLost};
use crate::escrow::{self, envelope::Envelope, Prepared, Receipt, Targets, UploadError};
use crate::files::FileError;
use crate::retry::RetryPolicy;
use std::path::{Path, PathBuf};

/// The tier state's storage under this node's lease.
#[async_trait::async_trait]
pub trait Storage: Send + Sync {
    /// Whether this node still holds the tier's lease, by its own clock (no request).
    fn check_lease(&self) -> Result<(), LeaseLost>;
    /// Writes the tier state, fenced: refused before the request once the lease clock ran out
    /// ([`WriteError::Lease`]), and by storage when the state changed since this node read it under its lease
    /// ([`WriteError::Fenced`]).
    async fn save(&self, state: &TierState) -> Result<(), WriteError>;
    /// The address `node` published in its boot record (`None`: no record).
    async fn peer_ip(&self, node: &str) -> Result<Option<String>, AzureError>;
}

/// The two escrow targets and the escrow key. (Its futures need not be `Send`: the blob upload's is not.)
#[async_trait::async_trait(?Send)]
pub trait EscrowTargets: Send + Sync {
    /// A fresh data key wrapped by the escrow key, under a fresh escrow id.
    async fn prepare(&self) -> Result<Prepared, AzureError>;
    /// Create-only upload to Blob; the receipt pins what was written.
    async fn upload_blob(&self, env: &Envelope) -> Result<Receipt, UploadError>;
    /// A new version of the tier's escrow secret in Key Vault; the receipt pins it.
    async fn upload_keyvault(&self, env: &Envelope) -> Result<Receipt, UploadError>;
    /// A superseded bootstrap's envelope, as an orphan; returns the object's path.
    async fn upload_orphan(&self, env: &Envelope) -> Result<String, AzureError>;
}

/// This node's escrow spool (on its data disk).
pub trait Spool: Send + Sync {
    /// Writes the envelope (fsynced, atomic, 0600) and returns where.
    fn write(&self, env: &Envelope) -> Result<PathBuf, FileError>;
    /// Removes a spooled envelope whose escrow is recorded.
    fn remove(&self, path: &Path) -> std::io::Result<()>;
}

/// [`Storage`] in the coordination container, under the lease `lead` (the fence armed by `look`).
pub struct AzureStorage<'a> {
    pub az: &'a Azure,
    pub blob_endpoint: &'a str,
    pub cluster: &'a str,
    pub fence: &'a coordination::Fence,
    pub lead: &'a Leadership,
    pub policy: RetryPolicy,
    pub pause_at: Option<super::PausePoint>,
}

#[async_trait::async_trait]
impl Storage for AzureStorage<'_> {
    fn check_lease(&self) -> Result<(), LeaseLost> {
        self.lead.check()
    }

    async fn save(&self, state: &TierState) -> Result<(), WriteError> {
        let ticket = self.fence.ticket(&state.tier)?;
        super::pause_if(self.pause_at, super::PausePoint::BeforeStateWrite);
        coordination::write(
            self.az,
            self.blob_endpoint,
            state,
            self.fence,
            ticket,
            self.policy,
        )
        .await
    }

    async fn peer_ip(&self, node: &str) -> Result<Option<String>, AzureError> {
        crate::publish::read_ip(self.az, self.blob_endpoint, self.cluster, node, self.policy).await
    }
}

/// What a claim needs from the coordination storage ([`AzureClaims`] in production; used by
/// `claim.rs`).
#[async_trait::async_trait]
pub trait Claims: Send + Sync {
    /// A lease this node holds.
    type Lease: Send;
    /// Tries once (with retries for transient errors) to take the tier's lease; `None`: another node holds it.
    async fn try_lease(&self) -> Result<Option<Self::Lease>, AzureError>;
    /// Gives the lease up (best effort: it expires by itself otherwise).
    async fn release(&self, lease: Self::Lease);
    /// The tier state, read without the lease.
    async fn read(&self) -> Result<Option<TierState>, AzureError>;
    /// The tier state under the lease, with what the next fenced write must find.
    async fn read_for_update(&self) -> Result<(Option<TierState>, Expect), AzureError>;
}

/// [`Claims`] in the coordination container: the tier's lease blob and state blob.
pub struct AzureClaims<'a> {
    pub az: &'a Azure,
    pub blob_endpoint: &'a str,
    /// The tier's lock blob, kept across looks (created once per process); it names the cluster and tier.
    pub lock: &'a election::Lock,
    pub policy: RetryPolicy,
    pub lease_secs: i32,
}

#[async_trait::async_trait]
impl Claims for AzureClaims<'_> {
    type Lease = Leadership;

    async fn try_lease(&self) -> Result<Option<Leadership>, AzureError> {
        self.lock
            .try_acquire(self.az, self.blob_endpoint, self.policy, self.lease_secs)
            .await
    }

    async fn release(&self, lease: Leadership) {
        lease.release().await
    }

    async fn read(&self) -> Result<Option<TierState>, AzureError> {
        self.read_for_update().await.map(|(state, _)| state)
    }

    async fn read_for_update(&self) -> Result<(Option<TierState>, Expect), AzureError> {
        coordination::read_for_update(
            self.az,
            self.blob_endpoint,
            self.lock.cluster(),
            self.lock.tier(),
            self.policy,
        )
        .await
    }
}

/// [`EscrowTargets`] in Azure: the escrow container and the escrow Key Vault.
pub struct AzureEscrow<'a> {
    pub az: &'a Azure,
    pub targets: &'a Targets,
    pub policy: RetryPolicy,
}

#[async_trait::async_trait(?Send)]
impl EscrowTargets for AzureEscrow<'_> {
    async fn prepare(&self) -> Result<Prepared, AzureError> {
        escrow::prepare(self.az, self.targets, self.policy).await
    }

    async fn upload_blob(&self, env: &Envelope) -> Result<Receipt, UploadError> {
        escrow::upload_blob(self.az, self.targets, env, self.policy).await
    }

    async fn upload_keyvault(&self, env: &Envelope) -> Result<Receipt, UploadError> {
        escrow::upload_keyvault(self.az, self.targets, env, self.policy).await
    }

    async fn upload_orphan(&self, env: &Envelope) -> Result<String, AzureError> {
        escrow::upload_orphan(self.az, self.targets, env, self.policy).await
    }
}

/// [`Spool`] in a directory (`Layout::spool_dir`).
pub struct DiskSpool<'a> {
    pub dir: &'a Path,
}

impl Spool for DiskSpool<'_> {
    fn write(&self, env: &Envelope) -> Result<PathBuf, FileError> {
        escrow::spool(self.dir, env)
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }
}
