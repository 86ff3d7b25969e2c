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

pub mod consul;
pub mod consul_tokens;
pub mod decide;
mod http;
pub mod member;
pub mod nomad;
pub mod snapshot_tokens;
pub mod status_tokens;
pub mod vault;
pub mod workload_identity;

use crate::azure::{Azure, AzureError};
use crate::coordination::{self, TierPhase, TierState};
use crate::election::{self, Leadership};
use crate::escrow::{self, envelope, Receipt, Targets};
use crate::retry::{retry, Attempt, RetryError, RetryPolicy};
use decide::Decision;
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
    #[error("spool: {0}")]
    Spool(String),
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
    #[error("{0}")]
    Audit(String),
    /// What this tier does not do (the trait's defaults).
    #[error("this tier {0}")]
    Unsupported(&'static str),
}

/// What the product-specific part does.
#[async_trait::async_trait]
pub trait Tier: Send + Sync {
    fn name(&self) -> &'static str;
    /// Waits until the local server answers (and can take the bootstrap call).
    async fn wait_ready(&self, deadline: Duration) -> Result<(), TierError>;
    /// Whether the product says it is already bootstrapped (`None`: it cannot tell without a token).
    async fn already_bootstrapped(&self) -> Result<Option<bool>, TierError>;
    /// Escrow before use: a tier whose product takes a caller-chosen bootstrap secret returns it here as
    /// an escrow payload; the protocol escrows it to both targets (receipts recorded) before calling
    /// `bootstrap`, which must then use that secret. Default: none (the secrets are escrowed after the call).
    fn pre_secret(&self) -> Option<Zeroizing<Vec<u8>>> {
        None
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

/// The payload as it is escrowed: in its PGP form when operators' keys are configured, else as it is.
fn for_escrow(ctx: &Ctx, tier: &str, payload: &[u8]) -> Result<Zeroizing<Vec<u8>>, BootstrapError> {
    match &ctx.operator_keys {
        Some(keys) => keys.protect(payload).map_err(|e| BootstrapError::Tier {
            tier: tier.into(),
            message: e.to_string(),
        }),
        None => Ok(Zeroizing::new(payload.to_vec())),
    }
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

/// Writes the tier state, fenced: refused before the request once this node's lease clock ran out, and by
/// storage when the state changed since this node read it under its lease (coordination.rs).
async fn save(ctx: &Ctx, state: &TierState) -> Result<(), BootstrapError> {
    let ticket = ctx.fence.ticket(&state.tier)?;
    pause_if(ctx.pause_at, PausePoint::BeforeStateWrite);
    coordination::write(
        &ctx.az,
        &ctx.targets.blob_endpoint,
        state,
        &ctx.fence,
        ticket,
        ctx.policy,
    )
    .await?;
    Ok(())
}

/// Uploads an envelope to both targets; receipts for those that succeeded are added to `state`.
async fn deliver(
    ctx: &Ctx,
    state: &mut TierState,
    env: &envelope::Envelope,
) -> Result<(), BootstrapError> {
    if !state
        .receipts
        .iter()
        .any(|r: &Receipt| r.target == "blob" && r.is_for(&env.escrow_id))
    {
        let r = escrow::upload_blob(&ctx.az, &ctx.targets, env, ctx.policy).await?;
        state.receipts.push(r);
    }
    crash_if(ctx.crash_at, CrashPoint::BetweenTargets);
    if !state
        .receipts
        .iter()
        .any(|r| r.target == "keyvault" && r.is_for(&env.escrow_id))
    {
        let r = escrow::upload_keyvault(&ctx.az, &ctx.targets, env, ctx.policy).await?;
        state.receipts.push(r);
    }
    crash_if(ctx.crash_at, CrashPoint::BeforeReceipt);
    Ok(())
}

/// How often a node that found the bootstrap lease taken looks again (state read + lease attempt): it is
/// done, and can hand over to what follows its bootstrap (e.g. the Consul agent token), within this of the
/// leader finishing. Two small blob requests per follower per poll, only while a bootstrap runs.
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
    tier.wait_ready(Duration::from_secs(300))
        .await
        .map_err(|e| BootstrapError::Tier {
            tier: name.into(),
            message: e.to_string(),
        })?;
    // Each look may bootstrap the tier under the lease: never cut short. A look that held the lease but must
    // wait (the node that initialized may still come back with its spool) waits longer before the next one:
    // it re-takes the lease each time.
    let policy = RetryPolicy::poll_whole(ctx.follower_deadline, FOLLOWER_POLL);
    let r = retry(policy, |attempt| async move {
        match look(ctx, tier).await {
            Ok(Look::Finished(outcome)) => Attempt::Done(outcome),
            Ok(Look::Held(phase)) => Attempt::RetryAfter(Wait::Pending(phase), LEADER_REPOLL),
            Ok(Look::Other(phase)) => {
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

/// One look: the tier's state and this node's spool; done, needs an operator, or take the lease and lead.
async fn look(ctx: &Ctx, tier: &dyn Tier) -> Result<Look, BootstrapError> {
    let name = tier.name();
    let state = coordination::read(
        &ctx.az,
        &ctx.targets.blob_endpoint,
        &ctx.cluster,
        name,
        ctx.policy,
    )
    .await?;
    let pending: Vec<_> = escrow::pending(&ctx.spool_dir)
        .into_iter()
        .filter(|(_, e)| e.tier == name && e.cluster == ctx.cluster)
        .collect();
    if pending.is_empty() {
        if let Some(s) = &state {
            match s.phase {
                TierPhase::Done => return Ok(Look::Finished(Outcome::AlreadyDone)),
                TierPhase::NeedsOperator => {
                    return Err(BootstrapError::NeedsOperator {
                        tier: name.into(),
                        message: s.message.clone().unwrap_or_default(),
                    })
                }
                _ => {}
            }
        }
    }
    let Some(lead) = election::try_acquire(
        &ctx.az,
        &ctx.targets.blob_endpoint,
        &ctx.cluster,
        name,
        ctx.policy,
        ctx.lease_secs,
    )
    .await?
    else {
        return Ok(Look::Other(
            state
                .map(|s| format!("{:?}", s.phase))
                .unwrap_or_else(|| "none".into()),
        ));
    };
    crash_if(ctx.crash_at, CrashPoint::AfterLease);
    // Re-read under the lease: the previous holder may have finished just before releasing it. Every state
    // write from here on must find what this read found (the fence).
    let state = match coordination::read_for_update(
        &ctx.az,
        &ctx.targets.blob_endpoint,
        &ctx.cluster,
        name,
        ctx.policy,
    )
    .await
    {
        Ok((s, expect)) => {
            ctx.fence.arm(lead.clock(), expect);
            s
        }
        Err(e) => {
            lead.release().await;
            return Err(e.into());
        }
    };
    let r = lead_bootstrap(ctx, tier, &lead, state, pending).await;
    ctx.fence.disarm();
    lead.release().await;
    match r? {
        Some(outcome) => Ok(Look::Finished(outcome)),
        None => Ok(Look::Held(
            "initialized, escrow pending on another node".into(),
        )),
    }
}

async fn lead_bootstrap(
    ctx: &Ctx,
    tier: &dyn Tier,
    lead: &Leadership,
    state: Option<TierState>,
    pending: Vec<(PathBuf, envelope::Envelope)>,
) -> Result<Option<Outcome>, BootstrapError> {
    let name = tier.name();
    let mut state = state.unwrap_or_else(|| TierState::new(&ctx.cluster, name, &ctx.node));

    // 1. An interrupted bootstrap of ours: its secrets are safe in the spool; finish the escrow.
    if !pending.is_empty() {
        let mut recovered = false;
        for (path, env) in &pending {
            lead.check()?;
            // A bootstrap that was superseded (the state names another escrow, completed): its envelope is
            // kept, as an orphan, and the state is never pointed back at it.
            if superseded(&state, env) {
                let object = escrow::upload_orphan(&ctx.az, &ctx.targets, env, ctx.policy).await?;
                tracing::warn!(
                    tier = name,
                    spooled = %env.escrow_id,
                    current = state.escrow_id.as_deref().unwrap_or_default(),
                    %object,
                    "the spooled escrow belongs to a superseded bootstrap: uploaded as an orphan, tier state left alone (docs/bootstrap.md#stale-spool)"
                );
                std::fs::remove_file(path).map_err(|e| BootstrapError::Spool(e.to_string()))?;
                continue;
            }
            recovered = true;
            state.escrow_id = Some(env.escrow_id.clone());
            state.receipts.retain(|r| r.is_for(&env.escrow_id));
            deliver(ctx, &mut state, env).await?;
            state.set(
                TierPhase::Escrowed,
                &ctx.node,
                Some("escrow completed from the local spool after an interruption".into()),
            );
            save(ctx, &state).await?;
            std::fs::remove_file(path).map_err(|e| BootstrapError::Spool(e.to_string()))?;
        }
        if recovered {
            // The root credential died with the interrupted run: configuration that needed it is the operator's.
            let note = format!(
                "escrow completed from the local spool after an interruption; post-bootstrap configuration of {name} \
                 (audit device, autopilot) may be missing: see docs/bootstrap.md#finish-configuration"
            );
            state.set(TierPhase::Done, &ctx.node, Some(note));
            save(ctx, &state).await?;
            return Ok(Some(Outcome::Recovered));
        }
    }
    if state.phase == TierPhase::Done {
        return Ok(Some(Outcome::AlreadyDone));
    }

    // 2. Decide from the state, this node's own server and the clock (bootstrap/decide.rs, table-tested).
    let local_initialized =
        tier.already_bootstrapped()
            .await
            .map_err(|e| BootstrapError::Tier {
                tier: name.into(),
                message: e.to_string(),
            })?;
    let facts = decide::Facts {
        state: &state,
        me: &ctx.node,
        now_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        peer_grace: ctx.peer_grace,
        local_initialized,
        creates_cluster: tier.creates_cluster(),
    };
    match decide::decide(&facts) {
        Decision::AlreadyDone => return Ok(Some(Outcome::AlreadyDone)),
        Decision::DoneConfigurationInterrupted => {
            let note = format!(
                "escrowed, but the post-bootstrap configuration of {name} by {} was interrupted and may be \
                 missing: see docs/bootstrap.md#finish-configuration",
                state.leader
            );
            state.set(TierPhase::Done, &ctx.node, Some(note));
            save(ctx, &state).await?;
            return Ok(Some(Outcome::Recovered));
        }
        Decision::MarkDone => {
            state.set(TierPhase::Done, &ctx.node, state.message.clone());
            save(ctx, &state).await?;
            return Ok(Some(Outcome::AlreadyDone));
        }
        Decision::WaitForPeer => {
            tracing::info!(tier = name, leader = %state.leader, "another node's bootstrap is unfinished (it may have initialized; this node's server may not have joined yet); waiting for it");
            return Ok(None);
        }
        Decision::InitializedNothingEscrowed => {
            let msg = format!(
                "{name} is already initialized (by {} at {}), but no escrow receipt exists and no spooled copy is on {}. \
                 If the node that initialized it still has its data disk (/var/lib/hashistack-data/escrow-spool), boot it: it completes the escrow. \
                 Otherwise the secrets are lost: follow docs/bootstrap.md#bootstrapped-but-nothing-escrowed",
                state.leader, state.updated_unix, ctx.node
            );
            return Err(needs_operator(ctx, &mut state, name, msg).await?);
        }
        // Each earlier leader may have made a cluster: one that says initialized, or cannot be asked, stops
        // the tier for an operator. Never a second cluster.
        Decision::AskEarlierLeaders(nodes) => {
            if let Some(msg) = init_elsewhere(ctx, tier, &state, &nodes).await? {
                return Err(needs_operator(ctx, &mut state, name, msg).await?);
            }
        }
        Decision::Bootstrap => {}
    }

    // 4. Pre-flight: wrap a fresh data key, and prove both escrow targets accept writes.
    let state_before = state.clone();
    let prepared = escrow::prepare(&ctx.az, &ctx.targets, ctx.policy).await?;
    preflight(ctx, name, &prepared.escrow_id).await?;
    lead.check()?;
    state.escrow_id = Some(prepared.escrow_id.clone());
    // Earlier leaders' secrets escrowed before use stay until token/self proves which one is live.
    state.keep_pre_escrow_receipts();
    let pre_escrowed = escrow_before_use(ctx, tier, &mut state).await?;
    let note = pre_escrowed.then(|| "bootstrap secret escrowed before use".to_string());
    state.set(TierPhase::Initializing, &ctx.node, note);
    save(ctx, &state).await?;
    lead.check()?;

    // 4. The bootstrap call, then straight to local disk.
    let mut answer = tier.bootstrap().await;
    // A note that stays in the state's message up to `done`.
    let mut started_over: Option<String> = None;
    if let Err(TierFailure::HalfInitialized(detail)) = &answer {
        // Our own call was cut off (power loss) after the server began it and before it wrote anything secret:
        // nothing exists to lose, and no other node has used this storage (an uninitialized server admits no
        // peer). Start it over, once.
        if state_before.phase == TierPhase::Initializing && state_before.leader == ctx.node {
            tracing::warn!(tier = name, %detail, "this node's interrupted bootstrap left its storage half-initialized; resetting it and calling again");
            if let Err(message) = tier.reset_local().await {
                let msg = half_initialized_step(
                    name,
                    &ctx.node,
                    &format!("{detail}; the reset failed: {message}"),
                );
                return Err(needs_operator(ctx, &mut state, name, msg).await?);
            }
            tier.wait_ready(Duration::from_secs(300))
                .await
                .map_err(|e| BootstrapError::Tier {
                    tier: name.into(),
                    message: e.to_string(),
                })?;
            lead.check()?;
            started_over = Some("an interrupted bootstrap call was started over after resetting this node's half-initialized storage".into());
            answer = tier.bootstrap().await;
        }
    }
    let secrets = match answer {
        Ok(s) => s,
        // An earlier leader escrowed its secret before use and its call landed, but the answer (or that
        // agent) was lost: the escrow it recorded holds the bootstrap token.
        // (token/self with our secret said it is not the live one: ours is dropped, the earlier ones stay.)
        Err(TierFailure::AlreadyDone(_))
            if pre_escrowed
                && (!state_before.pre_escrows.is_empty()
                    || (state_before.escrowed_to("blob")
                        && state_before.escrowed_to("keyvault"))) =>
        {
            let mut done = state_before.clone();
            let msg = match done.pre_escrows.len() {
                0 | 1 => format!(
                    "{name} was bootstrapped by an earlier attempt whose secret was escrowed before use (escrow {})",
                    done.escrow_id.clone().unwrap_or_default()
                ),
                _ => format!(
                    "{name} was bootstrapped by an earlier attempt whose secret was escrowed before use; one of the \
                     escrows {} holds the live one (open each, check with token/self): \
                     docs/bootstrap.md#several-secrets-escrowed-before-use",
                    done.pre_escrows.join(", ")
                ),
            };
            done.set(TierPhase::Done, &ctx.node, Some(msg));
            save(ctx, &done).await?;
            tracing::info!(
                tier = name,
                "bootstrapped earlier with a secret escrowed before use"
            );
            return Ok(Some(Outcome::Recovered));
        }
        Err(TierFailure::AlreadyDone(_)) if peer_may_finish(ctx, &state_before) => {
            tracing::info!(tier = name, leader = %state_before.leader, "bootstrapped by another node whose escrow is not confirmed yet; waiting for it");
            // Put back the other node's record (our pre-flight overwrote it), so its grace is not extended.
            save(ctx, &state_before).await?;
            return Ok(None);
        }
        Err(TierFailure::AlreadyDone(detail)) => {
            let msg = format!(
                "{name} reports it was already bootstrapped ({detail}) but nothing was escrowed: follow docs/bootstrap.md#{name}-already-bootstrapped"
            );
            if pre_escrowed {
                // Our secret was escrowed but never used: the state must not point operators at it.
                state.receipts.clear();
                state.pre_escrows.clear();
                state.escrow_id = None;
            }
            return Err(needs_operator(ctx, &mut state, name, msg).await?);
        }
        Err(TierFailure::HalfInitialized(detail)) => {
            let msg = half_initialized_step(name, &ctx.node, &detail);
            return Err(needs_operator(ctx, &mut state, name, msg).await?);
        }
        Err(TierFailure::Refused(detail)) => {
            let msg = format!(
                "{name} refused its bootstrap call on {}: {detail}. Fix what the server names, then clear the tier state and reboot {}: docs/bootstrap.md#bootstrap-call-refused",
                ctx.node, ctx.node
            );
            return Err(needs_operator(ctx, &mut state, name, msg).await?);
        }
        Err(TierFailure::Other(message)) => {
            return Err(BootstrapError::Tier {
                tier: name.into(),
                message,
            })
        }
    };
    crash_if(ctx.crash_at, CrashPoint::AfterInit);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // With the PGP option, the clear payload stays in memory for the configuration below and only its PGP
    // form is sealed and spooled (the keys were proven at boot by a trial encryption to each).
    let escrowed = for_escrow(ctx, name, &secrets)?;
    let env = envelope::seal(
        &prepared.key,
        escrowed,
        &prepared.escrow_id,
        &ctx.cluster,
        name,
        &prepared.kek_id,
        &prepared.wrapped,
        now,
    )
    .map_err(|e| BootstrapError::Spool(e.to_string()))?;
    let spool_path =
        escrow::spool(&ctx.spool_dir, &env).map_err(|e| BootstrapError::Spool(e.to_string()))?;
    crash_if(ctx.crash_at, CrashPoint::AfterSpool);
    state.set(TierPhase::Initialized, &ctx.node, started_over.clone());
    if let Err(e) = save(ctx, &state).await {
        // The secrets are safe in the spool; the escrow below records the state again.
        tracing::warn!(error = %e, "could not record the initialized state");
    }

    // 5. Escrow to both targets at once, so the secrets sit in the spool for seconds, not for the whole
    //    configuration below; then the receipts, and the spool goes.
    if pre_escrowed {
        // Until now the state named the escrow made before use; the post-call one (with the server-chosen
        // accessor) replaces it.
        state.escrow_id = Some(prepared.escrow_id.clone());
        state.receipts.clear();
        // The product took our secret: no earlier leader's call landed.
        state.pre_escrows.clear();
    }
    deliver(ctx, &mut state, &env).await?;
    state.set(TierPhase::Escrowed, &ctx.node, started_over.clone());
    save(ctx, &state).await?;
    std::fs::remove_file(&spool_path).map_err(|e| BootstrapError::Spool(e.to_string()))?;
    crash_if(ctx.crash_at, CrashPoint::AfterEscrow);

    // 6. Configuration that needs the fresh root credential, still in memory (never read back from escrow).
    if let Err(message) = tier.configure(&secrets).await {
        tracing::error!(tier = name, %message, "post-bootstrap configuration failed");
        let incomplete = format!("post-bootstrap configuration incomplete: {message}");
        state.message = Some(match &started_over {
            Some(note) => format!("{note}; {incomplete}"),
            None => incomplete,
        });
    }
    drop(secrets);
    state.set(TierPhase::Done, &ctx.node, state.message.clone());
    save(ctx, &state).await?;
    tracing::info!(tier = name, escrow_id = %prepared.escrow_id, "bootstrapped and escrowed");
    Ok(Some(Outcome::Bootstrapped))
}

/// Escrow before use: seals the tier's caller-chosen secret under an escrow id of its own and delivers it
/// to both targets; `state` then names that escrow. No spool: until the bootstrap call the secret is in
/// effect nowhere, so a crash loses nothing (the next leader escrows a fresh one).
async fn escrow_before_use(
    ctx: &Ctx,
    tier: &dyn Tier,
    state: &mut TierState,
) -> Result<bool, BootstrapError> {
    let Some(payload) = tier.pre_secret() else {
        return Ok(false);
    };
    let pre = escrow::prepare(&ctx.az, &ctx.targets, ctx.policy).await?;
    let env = envelope::seal(
        &pre.key,
        for_escrow(ctx, tier.name(), &payload)?,
        &pre.escrow_id,
        &ctx.cluster,
        tier.name(),
        &pre.kek_id,
        &pre.wrapped,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )
    .map_err(|e| BootstrapError::Spool(e.to_string()))?;
    deliver(ctx, state, &env).await?;
    state.escrow_id = Some(pre.escrow_id.clone());
    // Unproven until the call's answer (or token/self) says whose secret the product took.
    state.pre_escrows.push(pre.escrow_id.clone());
    tracing::info!(tier = tier.name(), escrow_id = %pre.escrow_id, "bootstrap secret escrowed before use");
    Ok(true)
}

/// Records `needs-operator` with `msg` (the one step an operator takes) and returns the error that says the same.
async fn needs_operator(
    ctx: &Ctx,
    state: &mut TierState,
    tier: &str,
    msg: String,
) -> Result<BootstrapError, BootstrapError> {
    state.set(TierPhase::NeedsOperator, &ctx.node, Some(msg.clone()));
    save(ctx, state).await?;
    Ok(BootstrapError::NeedsOperator {
        tier: tier.into(),
        message: msg,
    })
}

/// The one step for a half-initialized node the agent did not (or could not) reset itself.
fn half_initialized_step(tier: &str, node: &str, detail: &str) -> String {
    format!(
        "{tier} on {node} holds storage from a bootstrap call that never completed ({detail}); no secret exists yet. \
         On {node}: stop {tier}, move its data directory aside, start it, then reboot {node}: docs/bootstrap.md#half-initialized"
    )
}

/// Asks each earlier leader of the tier ([`decide::earlier_leaders`]) whether it initialized, at the address of
/// its boot record; the first that says so, or cannot be asked, returns the operator's step.
async fn init_elsewhere(
    ctx: &Ctx,
    tier: &dyn Tier,
    state: &TierState,
    nodes: &[String],
) -> Result<Option<String>, AzureError> {
    let name = tier.name();
    for node in nodes {
        let at = state
            .history
            .iter()
            .find(|(p, n, _)| *p == TierPhase::Initializing && n == node)
            .map(|h| h.2)
            .unwrap_or_default();
        let ip = crate::publish::read_ip(
            &ctx.az,
            &ctx.targets.blob_endpoint,
            &ctx.cluster,
            node,
            ctx.policy,
        )
        .await?;
        let answer = match &ip {
            Some(ip) => tier.peer_initialized(ip).await,
            None => Err(TierError::Step {
                step: "earlier leader",
                detail: "no boot record with its address".into(),
            }),
        };
        match answer {
            Ok(false) => {
                tracing::info!(tier = name, peer = %node, "an earlier leader of this tier says it is not initialized");
            }
            Ok(true) => {
                return Ok(Some(format!(
                    "{node} (which began the {name} bootstrap at {at}) answers initialized, but no escrow is recorded and \
                     this node's server is not its member. If {node} still has its data disk, restart its agent: its spool \
                     completes the escrow; then restart the agents of the other servers. Otherwise follow \
                     docs/bootstrap.md#bootstrapped-but-nothing-escrowed"
                )))
            }
            Err(e) => {
                return Ok(Some(format!(
                    "{node} began the {name} bootstrap at {at} and cannot be asked whether it initialized ({e}); \
                     initializing here could make a second cluster. Boot {node} (its agent finishes or reports), then restart \
                     the agents of the other servers: docs/bootstrap.md#previous-leader-unreachable"
                )))
            }
        }
    }
    Ok(None)
}

/// Whether a spooled envelope belongs to a superseded bootstrap: the tier state names another escrow and
/// that escrow completed (`escrowed`/`done`). Such a spool is a second init's (or a replaced state's) and
/// is never written back into the state.
fn superseded(state: &TierState, env: &envelope::Envelope) -> bool {
    matches!(state.phase, TierPhase::Escrowed | TierPhase::Done)
        && state
            .escrow_id
            .as_deref()
            .is_some_and(|id| id != env.escrow_id)
}

/// Whether the node that last led this tier (not us) may still come back and finish from its spool.
fn peer_may_finish(ctx: &Ctx, state: &TierState) -> bool {
    decide::peer_may_finish(&decide::Facts {
        state,
        me: &ctx.node,
        now_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        peer_grace: ctx.peer_grace,
        local_initialized: None,
        creates_cluster: false,
    })
}

/// Writes a small non-secret object to each target so a permission problem is found before init.
async fn preflight(ctx: &Ctx, tier: &str, escrow_id: &str) -> Result<(), BootstrapError> {
    let probe = envelope::Envelope {
        format: 1,
        escrow_id: format!("preflight-{escrow_id}"),
        cluster: ctx.cluster.clone(),
        tier: tier.into(),
        created_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        kek_id: String::new(),
        wrap_alg: "none".into(),
        wrapped_key: String::new(),
        nonce: String::new(),
        ciphertext: String::new(),
    };
    escrow::upload_blob(&ctx.az, &ctx.targets, &probe, ctx.policy).await?;
    escrow::upload_keyvault(&ctx.az, &ctx.targets, &probe, ctx.policy).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(escrow_id: &str) -> envelope::Envelope {
        envelope::Envelope {
            format: 1,
            escrow_id: escrow_id.into(),
            cluster: "c1".into(),
            tier: "vault".into(),
            created_unix: 0,
            kek_id: String::new(),
            wrap_alg: "none".into(),
            wrapped_key: String::new(),
            nonce: String::new(),
            ciphertext: String::new(),
        }
    }

    fn state(phase: TierPhase, escrow_id: Option<&str>) -> TierState {
        let mut s = TierState::new("c1", "vault", "n1");
        s.phase = phase;
        s.escrow_id = escrow_id.map(Into::into);
        s
    }

    #[test]
    fn a_spool_is_superseded_only_by_another_completed_escrow() {
        for phase in [TierPhase::Escrowed, TierPhase::Done] {
            assert!(superseded(&state(phase, Some("200-new")), &env("100-old")));
            // Our own escrow, completed before the spool file was removed: finish it, not an orphan.
            assert!(!superseded(&state(phase, Some("100-old")), &env("100-old")));
        }
        // Another escrow not yet completed, or no state of an escrow at all: the usual recovery decides.
        for phase in [
            TierPhase::Initializing,
            TierPhase::Initialized,
            TierPhase::NeedsOperator,
        ] {
            assert!(!superseded(&state(phase, Some("200-new")), &env("100-old")));
        }
        assert!(!superseded(&state(TierPhase::Done, None), &env("100-old")));
    }
}
