//! The one-time bootstrap of a server tier, exactly once per cluster, with escrow before anything can be
//! lost:
//!
//! ```text
//!   lease ─► pre-flight (wrap a data key; write-test both targets) ─► state=initializing
//!         ─► init / ACL bootstrap ─► seal + spool (local, fsynced) ─► state=initialized
//!         ─► blob ─► key vault ─► state=escrowed (receipts), spool removed
//!         ─► post-bootstrap config (the secret still in memory) ─► state=done
//! ```
//!
//! A tier whose product takes a caller-chosen secret ([`Tier::pre_secret`], Nomad's `BootstrapSecret`)
//! escrows it to both targets before the call (escrow before use); the call is then idempotent.
//!
//! A crash anywhere is recovered at the next boot: a spooled envelope is uploaded again (create-only,
//! idempotent), and a tier whose server is initialized with nothing spooled or escrowed is reported as
//! `needs-operator` with the documented recovery (docs/bootstrap.md) — never initialized twice.

pub mod claim;
pub mod consul;
pub mod consul_tokens;
pub mod decide;
pub mod driver;
mod http;
pub mod member;
pub mod nomad;
pub mod snapshot_tokens;
pub mod status_tokens;
pub mod traits;
pub mod vault;
pub mod workload_identity;

use crate::azure::{Azure, AzureError};
use crate::coordination;
use crate::election;
use crate::escrow::{self, envelope, Targets};
use crate::retry::{retry, Attempt, RetryError, RetryPolicy};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use zeroize::Zeroizing;

pub use crate::config::{CrashPoint, PausePoint};

fn crash_if(configured: Option<CrashPoint>, here: CrashPoint) {
    if configured == Some(here) {
        tracing::warn!(point = ?here, "crash injection: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Pause injection (once per process): the agent stops itself as a frozen VM would, until SIGCONT.
fn pause_if(configured: Option<PausePoint>, here: PausePoint) {
    static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if configured == Some(here) && !PAUSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!(point = ?here, "pause injection: stopping the agent until SIGCONT");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    #[error("{0}")]
    Lease(#[from] election::LeaseLost),
    #[error("{0}")]
    Write(#[from] coordination::WriteError),
    #[error("{0}")]
    Escrow(#[from] escrow::UploadError),
    #[error("{tier}: {message}")]
    Tier { tier: String, message: String },
    #[error("{tier}: needs an operator: {message}")]
    NeedsOperator { tier: String, message: String },
    #[error("{tier}: bootstrap not finished by another node within {waited:?} (state: {phase})")]
    Timeout {
        tier: String,
        waited: Duration,
        phase: String,
    },
    /// The bootstrap's secrets could not be sealed into their envelope.
    #[error("spool: {0}")]
    Seal(#[from] envelope::EnvelopeError),
    #[error("spool: {0}")]
    SpoolWrite(#[from] crate::files::FileError),
    /// A spooled envelope whose escrow is recorded could not be removed.
    #[error("spool: {0}")]
    SpoolRemove(#[source] std::io::Error),
    /// The payload could not be rewritten into its PGP form (docs/pgp-escrow.md).
    #[error("{tier}: {source}")]
    Pgp {
        tier: String,
        #[source]
        source: escrow::pgp::PgpError,
    },
    /// The product's own step before or around the bootstrap call (waiting for its server, asking it).
    #[error("{tier}: {source}")]
    Product {
        tier: String,
        #[source]
        source: TierError,
    },
    #[error("{tier} on {node} has not joined the cluster: {failure}; see docs/bootstrap.md#server-not-joined")]
    NotJoined {
        tier: String,
        node: String,
        failure: member::JoinFailure,
    },
}

/// Why a step of a tier failed: waiting for its server, the configuration after the bootstrap, a storage
/// reset, a question to a peer. Its text becomes the tier state's message or the boot record's error: it
/// names the step and never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// A call to a server's API.
    #[error(transparent)]
    Call(#[from] http::CallError),
    /// A call to a server's API, retried until a final answer or the deadline.
    #[error(transparent)]
    Retried(#[from] crate::retry::RetryError<http::CallError>),
    /// The local server did not answer within the deadline.
    #[error("local {product} not answering within {waited:?}: {last}")]
    NotReady {
        product: &'static str,
        waited: Duration,
        last: String,
    },
    /// The local server answers but names no leader.
    #[error("local {product} has no leader within {waited:?}")]
    NoLeader {
        product: &'static str,
        waited: Duration,
    },
    /// The secrets handed to `configure` are not what this tier's bootstrap escrowed.
    #[error("escrow payload did not parse")]
    Payload,
    /// A secret handed over through Key Vault (the tokens nodes, the jumpbox or Vault's step 2 read).
    #[error("{what}: {source}")]
    HandOver {
        what: &'static str,
        #[source]
        source: AzureError,
    },
    /// A step whose failure the tier's module words for the operator (the step, and what was seen).
    #[error("{step}: {detail}")]
    Step { step: &'static str, detail: String },
    /// Nomad workload identities in Vault (its own error names the step).
    #[error(transparent)]
    WorkloadIdentity(#[from] workload_identity::WorkloadIdentityError),
    /// The audit device is not active as configured (worded for the operator, with the procedure to follow).
    #[error(transparent)]
    Audit(#[from] vault::AuditError),
    /// What this tier does not do (the trait's defaults).
    #[error("this tier {0}")]
    Unsupported(&'static str),
}

/// What the product-specific part does.
#[async_trait::async_trait]
pub trait Tier: Send + Sync {
    fn name(&self) -> &'static str;
    /// Waits until the local server answers (before this node looks for the lease).
    async fn wait_ready(&self, deadline: Duration) -> Result<(), TierError>;
    /// Waits, under the lease and after the escrow before use, until the local server takes the bootstrap call
    /// (Nomad: its cluster has a leader), so that the lease, the pre-flight, the escrow before use and the
    /// `initializing` record overlap the servers' election instead of following it. A tier whose
    /// [`wait_ready`](Tier::wait_ready) already waits for that needs nothing here (the default).
    async fn wait_callable(&self, _deadline: Duration) -> Result<(), TierError> {
        Ok(())
    }
    /// Whether the product says it is already bootstrapped (`None`: it cannot tell without a token).
    async fn already_bootstrapped(&self) -> Result<Option<bool>, TierError>;
    /// Escrow before use: a tier whose product takes a caller-chosen bootstrap secret returns it here as
    /// an escrow payload; the protocol escrows it to both targets (receipts recorded) before calling
    /// `bootstrap`, which must then use that secret. Default: none (the secrets are escrowed after the call).
    fn pre_secret(&self) -> Option<Zeroizing<Vec<u8>>> {
        None
    }
    /// Whether the bootstrap call's answer (`secrets`) holds the secret of [`pre_secret`](Tier::pre_secret),
    /// i.e. the escrow made before use is the tier's and none is needed after the call. Default: no.
    fn holds_pre_secret(&self, _secrets: &[u8]) -> bool {
        false
    }
    /// The bootstrap call. Returns the secrets as a serialisable, zeroizing payload.
    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure>;
    /// Configuration that needs the fresh root credential (audit device, autopilot, policies).
    async fn configure(&self, secrets: &[u8]) -> Result<(), TierError>;
    /// Wipes this node's own product storage and restarts the product, for [`TierFailure::HalfInitialized`]
    /// after this node's own bootstrap call was interrupted. Default: this tier cannot.
    async fn reset_local(&self) -> Result<(), TierError> {
        Err(TierError::Unsupported("cannot reset its local storage"))
    }
    /// After the tier is bootstrapped (by this node or another): waits until this node's own server is a
    /// member of that one cluster, repairing what it safely can (bootstrap/member.rs). Default: nothing to
    /// wait for (the product joins on its own, and a node that has not is the status's to report).
    async fn join(
        &self,
        _policy: member::JoinPolicy,
    ) -> Result<member::Joined, member::JoinFailure> {
        Ok(member::Joined::Member)
    }
    /// Whether this tier's bootstrap call *creates* a cluster on the node that makes it (Vault's init), so that
    /// a second call on another node would make a second cluster. Consul's and Nomad's ACL bootstraps are
    /// cluster-wide and refuse a second call: `false`.
    fn creates_cluster(&self) -> bool {
        false
    }
    /// For a tier that [`creates_cluster`](Tier::creates_cluster): whether its server at `ip` (another node of
    /// the tier) says it is initialized. `Err`: it cannot be asked (the transport's words).
    async fn peer_initialized(&self, _ip: &str) -> Result<bool, TierError> {
        Err(TierError::Unsupported("does not ask its peers"))
    }
}

/// Why a bootstrap call failed.
#[derive(Debug)]
pub enum TierFailure {
    /// The product was already bootstrapped (by an earlier run whose secrets never reached the spool).
    AlreadyDone(String),
    /// The local server holds storage state from a bootstrap call that never completed (Vault: raft bootstrapped
    /// with itself as the only voter, no seal configuration written), so it refuses the call; no secret exists.
    HalfInitialized(String),
    /// A final refusal (4xx) the agent cannot repair: the server's own words.
    Refused(String),
    Other(String),
}

/// Settings for one tier's bootstrap.
#[derive(Clone)]
pub struct Ctx {
    pub az: Azure,
    pub targets: Targets,
    pub cluster: String,
    pub node: String,
    /// The escrow spool (`Layout::spool_dir`, on the data disk).
    pub spool_dir: PathBuf,
    pub policy: RetryPolicy,
    /// How long followers wait for the leader's bootstrap to finish.
    pub follower_deadline: Duration,
    pub crash_at: Option<CrashPoint>,
    pub pause_at: Option<PausePoint>,
    /// The right to write the tier state: armed while this node holds the tier's lease (coordination.rs).
    pub fence: coordination::Fence,
    pub lease_secs: i32,
    /// How long an unfinished bootstrap by another node is given to complete from that node's spool before
    /// the tier is reported as needing an operator.
    pub peer_grace: Duration,
    /// The PGP escrow option (docs/pgp-escrow.md): every payload is rewritten to hold only what these
    /// operator keys can open before it is sealed, spooled or uploaded. `None`: off.
    pub operator_keys: Option<std::sync::Arc<escrow::pgp::OperatorKeys>>,
    /// How long this node's own server may take to join the bootstrapped cluster ([`Tier::join`]).
    pub join: member::JoinPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// This node bootstrapped the tier.
    Bootstrapped,
    /// This node finished an earlier, interrupted bootstrap (uploaded a spooled escrow).
    Recovered,
    /// Another node did it (or it was done before).
    AlreadyDone,
}

/// How often a node that found the bootstrap lease taken looks again (a state read): it is done, and can hand
/// over to what follows its bootstrap (e.g. the Consul agent token), within this of the leader finishing.
const FOLLOWER_POLL: Duration = Duration::from_millis(500);

/// Runs the tier's bootstrap protocol on this node, then waits until this node's own server is a member of
/// the one cluster the tier has.
pub async fn run(ctx: &Ctx, tier: &dyn Tier) -> Result<Outcome, BootstrapError> {
    let outcome = settle(ctx, tier).await?;
    match tier.join(ctx.join).await {
        Ok(member::Joined::Member) => {}
        Ok(member::Joined::RejoinedAfterReset) => tracing::info!(
            tier = tier.name(),
            "this node's server joined the cluster after its stuck storage was reset"
        ),
        Err(failure) => {
            return Err(BootstrapError::NotJoined {
                tier: tier.name().into(),
                node: ctx.node.clone(),
                failure,
            })
        }
    }
    Ok(outcome)
}

/// The bootstrap protocol: this node bootstraps the tier, finishes an interrupted bootstrap, or finds it done.
async fn settle(ctx: &Ctx, tier: &dyn Tier) -> Result<Outcome, BootstrapError> {
    let name = tier.name();
    // Whether this node's server has answered: the first look claims the tier while it gets ready.
    let ready = std::sync::atomic::AtomicBool::new(false);
    let ready = &ready;
    let lock = &election::Lock::new(&ctx.cluster, name);
    // When this node last found the lease held by another node: until `claim::LEASE_RETRY` after that, a look
    // only reads the state.
    let held_at = std::sync::Mutex::new(None::<std::time::Instant>);
    let held_at = &held_at;
    // Each look may bootstrap the tier under the lease: never cut short. A look that held the lease but must
    // wait (the node that initialized may still come back with its spool) waits longer before the next one:
    // it re-takes the lease each time.
    let policy = RetryPolicy::poll_whole(ctx.follower_deadline, FOLLOWER_POLL);
    let r = retry(policy, |attempt| async move {
        let last = *held_at.lock().unwrap_or_else(|e| e.into_inner());
        let lease = claim::lease_now(last, std::time::Instant::now());
        match look(ctx, tier, ready, lock, lease).await {
            Ok(Look::Finished(outcome)) => Attempt::Done(outcome),
            Ok(Look::Held(phase)) => Attempt::RetryAfter(Wait::Pending(phase), LEADER_REPOLL),
            Ok(Look::Other(phase)) => {
                if lease == claim::TryLease::Yes {
                    *held_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(std::time::Instant::now());
                }
                if attempt == 1 {
                    tracing::info!(
                        tier = name,
                        "another node holds the bootstrap lease; waiting for it to finish"
                    );
                }
                Attempt::Retry(Wait::Pending(phase))
            }
            Err(e) => Attempt::Fail(Wait::Failed(e)),
        }
    })
    .await;
    match r {
        Ok(outcome) => Ok(outcome),
        Err(
            RetryError::Final(Wait::Failed(e))
            | RetryError::Deadline {
                last: Wait::Failed(e),
                ..
            },
        ) => Err(e),
        Err(
            RetryError::Final(Wait::Pending(phase))
            | RetryError::Deadline {
                last: Wait::Pending(phase),
                ..
            },
        ) => Err(BootstrapError::Timeout {
            tier: name.into(),
            waited: ctx.follower_deadline,
            phase,
        }),
    }
}

/// The pause between two looks of a node that held the lease but had to wait.
const LEADER_REPOLL: Duration = Duration::from_secs(2);

/// What one look at the tier concluded.
enum Look {
    /// This node's part is over.
    Finished(Outcome),
    /// This node held the lease but the tier is not finished (an escrow pending on another node): the phase.
    Held(String),
    /// Another node holds the lease: the tier's phase as last read.
    Other(String),
}

/// Why [`settle`] is still waiting, or what stopped it.
enum Wait {
    Pending(String),
    Failed(BootstrapError),
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Pending(phase) => write!(f, "waiting ({phase})"),
            Wait::Failed(e) => e.fmt(f),
        }
    }
}

impl crate::retry::TimeoutError for Wait {
    fn timeout(_: Duration) -> Self {
        Wait::Pending("no answer".into())
    }
}

/// How long this node's own server may take to answer at all, before the first look can lead.
const READY: Duration = Duration::from_secs(300);

/// One look: this node's spool, then the lease and the tier's state under it ([`claim`]) while this node's
/// server gets ready; done, needs an operator, another node's turn, or lead.
async fn look(
    ctx: &Ctx,
    tier: &dyn Tier,
    ready: &std::sync::atomic::AtomicBool,
    lock: &election::Lock,
    lease: claim::TryLease,
) -> Result<Look, BootstrapError> {
    use std::sync::atomic::Ordering;
    let name = tier.name();
    let pending: Vec<_> = escrow::pending(&ctx.spool_dir)
        .into_iter()
        .filter(|(_, e)| e.tier == name && e.cluster == ctx.cluster)
        .collect();
    let claims = traits::AzureClaims {
        az: &ctx.az,
        blob_endpoint: &ctx.targets.blob_endpoint,
        lock,
        policy: ctx.policy,
        lease_secs: ctx.lease_secs,
    };
    let server = async {
        if !ready.load(Ordering::Relaxed) {
            tier.wait_ready(READY)
                .await
                .map_err(|source| BootstrapError::Product {
                    tier: name.into(),
                    source,
                })?;
            ready.store(true, Ordering::Relaxed);
        }
        Ok(())
    };
    let claimed = claim::claim(&claims, name, pending.is_empty(), lease, ctx.crash_at);
    let (lead, state) = match claim::when_ready(&claims, server, claimed).await? {
        claim::Claimed::Done => return Ok(Look::Finished(Outcome::AlreadyDone)),
        claim::Claimed::Other(phase) => return Ok(Look::Other(phase)),
        claim::Claimed::Lead {
            lease,
            state,
            expect,
        } => {
            // Every state write from here on must find what the read under the lease found (the fence).
            ctx.fence.arm(lease.clock(), expect);
            (lease, state)
        }
    };
    let storage = traits::AzureStorage {
        az: &ctx.az,
        blob_endpoint: &ctx.targets.blob_endpoint,
        cluster: &ctx.cluster,
        fence: &ctx.fence,
        lead: &lead,
        policy: ctx.policy,
        pause_at: ctx.pause_at,
    };
    let targets = traits::AzureEscrow {
        az: &ctx.az,
        targets: &ctx.targets,
        policy: ctx.policy,
    };
    let spool = traits::DiskSpool {
        dir: &ctx.spool_dir,
    };
    let driver = driver::Driver {
        cluster: &ctx.cluster,
        node: &ctx.node,
        peer_grace: ctx.peer_grace,
        crash_at: ctx.crash_at,
        operator_keys: ctx.operator_keys.as_deref(),
        storage: &storage,
        escrow: &targets,
        spool: &spool,
        now_unix: || time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let r = driver::lead(&driver, tier, state, pending).await;
    ctx.fence.disarm();
    lead.release().await;
    match r? {
        Some(outcome) => Ok(Look::Finished(outcome)),
        None => Ok(Look::Held(
            "initialized, escrow pending on another node".into(),
        )),
    }
}
