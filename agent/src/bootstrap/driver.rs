//! The lease holder's part of the bootstrap protocol: a thin driver over the decisions of `decide.rs`. It gathers
//! the facts (the tier state, the spool, what the product and the earlier leaders say, the clock), acts on each
//! decision, and does the I/O through small traits (`traits.rs`) and the product's [`Tier`], so that unit tests
//! (`driver/tests.rs`) run it with in-memory fakes.

use super::decide::{self, AfterCall, Decision, PeerAnswer, PeerVerdict, SpoolAction};
use super::traits::{EscrowTargets, Spool, Storage};
use super::{crash_if, BootstrapError, CrashPoint, Outcome, Tier, TierFailure};
use crate::coordination::{TierPhase, TierState, WriteError};
use crate::escrow::{envelope, pgp::OperatorKeys, Prepared, Receipt, ReceiptTarget};
use std::path::PathBuf;
use std::time::Duration;
use zeroize::Zeroizing;

/// What the driver works with: this node's settings and the world behind its traits.
pub struct Driver<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    /// How long an unfinished bootstrap by another node is given to complete from that node's spool.
    pub peer_grace: Duration,
    pub crash_at: Option<CrashPoint>,
    /// The PGP escrow option (docs/pgp-escrow.md). `None`: off.
    pub operator_keys: Option<&'a OperatorKeys>,
    pub storage: &'a dyn Storage,
    pub escrow: &'a dyn EscrowTargets,
    pub spool: &'a dyn Spool,
    /// The clock the decisions read (unix seconds).
    pub now_unix: fn() -> i64,
}

/// How long the local server may take to take the bootstrap call ([`Tier::wait_callable`]), the lease held.
const READY_FOR_CALL: Duration = Duration::from_secs(300);
/// How long the local server may take to answer again after a reset of its storage.
const READY_AFTER_RESET: Duration = Duration::from_secs(300);

impl Driver<'_> {
    /// Writes the tier state, fenced ([`Storage::save`]).
    async fn save(&self, state: &TierState) -> Result<(), BootstrapError> {
        self.storage.save(state).await.map_err(|e| match e {
            WriteError::Lease(lost) => BootstrapError::Lease(lost),
            e => BootstrapError::Write(e),
        })
    }

    /// The payload as it is escrowed: in its PGP form when operators' keys are configured, else as it is.
    fn for_escrow(&self, tier: &str, payload: &[u8]) -> Result<Zeroizing<Vec<u8>>, BootstrapError> {
        match self.operator_keys {
            Some(keys) => keys.protect(payload).map_err(|source| BootstrapError::Pgp {
                tier: tier.into(),
                source,
            }),
            None => Ok(Zeroizing::new(payload.to_vec())),
        }
    }

    /// Uploads an envelope to both targets; receipts for those that succeeded are added to `state`.
    async fn deliver(
        &self,
        state: &mut TierState,
        env: &envelope::Envelope,
    ) -> Result<(), BootstrapError> {
        let missing = |t: ReceiptTarget| {
            !state
                .receipts
                .iter()
                .any(|r: &Receipt| r.target == t && r.is_for(&env.escrow_id))
        };
        // Both targets at once: they are independent, and each receipt is recorded only with the other's.
        let blob = async {
            if !missing(ReceiptTarget::Blob) {
                return Ok(None);
            }
            let r = self.escrow.upload_blob(env).await?;
            // The blob landed; the Key Vault copy may or may not have.
            crash_if(self.crash_at, CrashPoint::BetweenTargets);
            Ok::<_, BootstrapError>(Some(r))
        };
        let keyvault = async {
            if !missing(ReceiptTarget::Keyvault) {
                return Ok(None);
            }
            Ok::<_, BootstrapError>(Some(self.escrow.upload_keyvault(env).await?))
        };
        let (blob, keyvault) = tokio::try_join!(blob, keyvault)?;
        state.receipts.extend(blob.into_iter().chain(keyvault));
        crash_if(self.crash_at, CrashPoint::BeforeReceipt);
        Ok(())
    }

    /// Records `needs-operator` with `msg` (the one step an operator takes) and returns the error that says the same.
    async fn needs_operator(
        &self,
        state: &mut TierState,
        tier: &str,
        msg: String,
    ) -> Result<BootstrapError, BootstrapError> {
        state.set(TierPhase::NeedsOperator, self.node, Some(msg.clone()));
        self.save(state).await?;
        Ok(BootstrapError::NeedsOperator {
            tier: tier.into(),
            message: msg,
        })
    }

    fn facts<'s>(
        &'s self,
        state: &'s TierState,
        local_initialized: Option<bool>,
        creates_cluster: bool,
    ) -> decide::Facts<'s> {
        decide::Facts {
            state,
            me: self.node,
            now_unix: (self.now_unix)(),
            peer_grace: self.peer_grace,
            local_initialized,
            creates_cluster,
        }
    }
}

/// The lease holder's run: finishes a spooled escrow, or decides (decide.rs) and bootstraps. `Ok(None)`: the tier
/// is not finished and this node must wait (another node's escrow may still come).
pub async fn lead(
    d: &Driver<'_>,
    tier: &dyn Tier,
    state: Option<TierState>,
    pending: Vec<(PathBuf, envelope::Envelope)>,
) -> Result<Option<Outcome>, BootstrapError> {
    let name = tier.name();
    let mut state = state.unwrap_or_else(|| TierState::new(d.cluster, name, d.node));

    // 1. An interrupted bootstrap of ours: its secrets are safe in the spool; finish the escrow.
    if !pending.is_empty() {
        let mut recovered = false;
        for (path, env) in &pending {
            d.storage.check_lease()?;
            match decide::on_spool(&state, &env.escrow_id) {
                // A bootstrap that was superseded (the state names another escrow, completed): its envelope is
                // kept, as an orphan, and the state is never pointed back at it.
                SpoolAction::Orphan => {
                    let object = d.escrow.upload_orphan(env).await?;
                    tracing::warn!(
                        tier = name,
                        spooled = %env.escrow_id,
                        current = state.escrow_id.as_deref().unwrap_or_default(),
                        %object,
                        "the spooled escrow belongs to a superseded bootstrap: uploaded as an orphan, tier state left alone (docs/bootstrap.md#stale-spool)"
                    );
                    d.spool.remove(path).map_err(BootstrapError::SpoolRemove)?;
                }
                SpoolAction::Finish => {
                    recovered = true;
                    state.escrow_id = Some(env.escrow_id.clone());
                    state.receipts.retain(|r| r.is_for(&env.escrow_id));
                    d.deliver(&mut state, env).await?;
                    state.set(
                        TierPhase::Escrowed,
                        d.node,
                        Some("escrow completed from the local spool after an interruption".into()),
                    );
                    d.save(&state).await?;
                    d.spool.remove(path).map_err(BootstrapError::SpoolRemove)?;
                }
            }
        }
        if recovered {
            // The root credential died with the interrupted run: configuration that needed it is the operator's.
            let note = format!(
                "escrow completed from the local spool after an interruption; post-bootstrap configuration of {name} \
                 (audit device, autopilot) may be missing: see docs/bootstrap.md#finish-configuration"
            );
            state.set(TierPhase::Done, d.node, Some(note));
            d.save(&state).await?;
            return Ok(Some(Outcome::Recovered));
        }
    }
    if state.phase == TierPhase::Done {
        return Ok(Some(Outcome::AlreadyDone));
    }

    // 2. Decide from the state, this node's own server and the clock (decide.rs, table-tested).
    let local_initialized =
        tier.already_bootstrapped()
            .await
            .map_err(|source| BootstrapError::Product {
                tier: name.into(),
                source,
            })?;
    match decide::decide(&d.facts(&state, local_initialized, tier.creates_cluster())) {
        Decision::AlreadyDone => return Ok(Some(Outcome::AlreadyDone)),
        Decision::DoneConfigurationInterrupted => {
            let note = format!(
                "escrowed, but the post-bootstrap configuration of {name} by {} was interrupted and may be \
                 missing: see docs/bootstrap.md#finish-configuration",
                state.leader
            );
            state.set(TierPhase::Done, d.node, Some(note));
            d.save(&state).await?;
            return Ok(Some(Outcome::Recovered));
        }
        Decision::MarkDone => {
            state.set(TierPhase::Done, d.node, state.message.clone());
            d.save(&state).await?;
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
                state.leader, state.updated_unix, d.node
            );
            return Err(d.needs_operator(&mut state, name, msg).await?);
        }
        // Each earlier leader may have made a cluster: one that says initialized, or cannot be asked, stops
        // the tier for an operator. Never a second cluster.
        Decision::AskEarlierLeaders(nodes) => {
            if let Some(msg) = init_elsewhere(d, tier, &state, &nodes).await? {
                return Err(d.needs_operator(&mut state, name, msg).await?);
            }
        }
        Decision::Bootstrap => {}
    }

    // 3. Pre-flight: wrap a fresh data key, and prove both escrow targets accept writes. A tier whose secret is
    //    escrowed before use proves them with that escrow (to both targets, before the call): its two data keys
    //    are wrapped at once, and there is no separate probe.
    let state_before = state.clone();
    let pre_secret = tier.pre_secret();
    let (prepared, pre) = match pre_secret {
        Some(payload) => {
            let (prepared, pre) = tokio::try_join!(d.escrow.prepare(), d.escrow.prepare())?;
            (prepared, Some((payload, pre)))
        }
        None => {
            let prepared = d.escrow.prepare().await?;
            preflight(d, name, &prepared.escrow_id).await?;
            (prepared, None)
        }
    };
    d.storage.check_lease()?;
    state.escrow_id = Some(prepared.escrow_id.clone());
    // Earlier leaders' secrets escrowed before use stay until token/self proves which one is live.
    state.keep_pre_escrow_receipts();
    let pre_escrowed = match pre {
        Some((payload, pre)) => {
            escrow_before_use(d, name, &mut state, payload, pre).await?;
            true
        }
        None => false,
    };
    // `initializing` is recorded while the server gets ready to take the call (Nomad: while its servers elect a
    // leader); the call comes only after both. A server that never gets ready stops the run with the state
    // `initializing` and no call made: the next leader bootstraps, after `peer_grace`.
    d.storage.check_lease()?;
    let note = pre_escrowed.then(|| "bootstrap secret escrowed before use".to_string());
    state.set(TierPhase::Initializing, d.node, note);
    // A refused write stops the wait; an answer from the server (ready or not) still lets the write finish, so
    // the state is what this run says it is.
    let ready = {
        let (save, ready) = (d.save(&state), tier.wait_callable(READY_FOR_CALL));
        tokio::pin!(save, ready);
        tokio::select! {
            saved = &mut save => {
                saved?;
                ready.await
            }
            answered = &mut ready => {
                save.await?;
                answered
            }
        }
    };
    ready.map_err(|source| BootstrapError::Product {
        tier: name.into(),
        source,
    })?;
    d.storage.check_lease()?;

    // 4. The bootstrap call, then straight to local disk.
    let mut answer = tier.bootstrap().await;
    // A note that stays in the state's message up to `done`.
    let mut started_over: Option<String> = None;
    let (secrets, proven) = loop {
        let after = decide::AfterFacts {
            before: d.facts(&state_before, None, false),
            pre_escrowed,
            answer_is_pre_secret: answer.as_ref().is_ok_and(|s| tier.holds_pre_secret(s)),
            started_over: started_over.is_some(),
        };
        let (decided, detail) = match answer {
            Ok(secrets) => (Ok(secrets), String::new()),
            Err(TierFailure::AlreadyDone(s)) => (Err(decide::Failure::AlreadyDone), s),
            Err(TierFailure::HalfInitialized(s)) => (Err(decide::Failure::HalfInitialized), s),
            Err(TierFailure::Refused(s)) => (Err(decide::Failure::Refused), s),
            Err(TierFailure::Other(s)) => (Err(decide::Failure::Other), s),
        };
        match decide::after_call(&after, decided) {
            AfterCall::Escrow(secrets) => break (secrets, false),
            AfterCall::EscrowedBeforeUse(secrets) => break (secrets, true),
            // Our own call was cut off (power loss) after the server began it and before it wrote anything
            // secret: nothing exists to lose, and no other node has used this storage (an uninitialized server
            // admits no peer). Start it over, once.
            AfterCall::ResetAndCallAgain => {
                tracing::warn!(tier = name, %detail, "this node's interrupted bootstrap left its storage half-initialized; resetting it and calling again");
                if let Err(e) = tier.reset_local().await {
                    let msg = half_initialized_step(
                        name,
                        d.node,
                        &format!("{detail}; the reset failed: {e}"),
                    );
                    return Err(d.needs_operator(&mut state, name, msg).await?);
                }
                tier.wait_ready(READY_AFTER_RESET).await.map_err(|source| {
                    BootstrapError::Product {
                        tier: name.into(),
                        source,
                    }
                })?;
                d.storage.check_lease()?;
                started_over = Some("an interrupted bootstrap call was started over after resetting this node's half-initialized storage".into());
                answer = tier.bootstrap().await;
            }
            // An earlier leader escrowed its secret before use and its call landed, but the answer (or that
            // agent) was lost: the escrow it recorded holds the bootstrap token.
            // (token/self with our secret said it is not the live one: ours is dropped, the earlier ones stay.)
            AfterCall::DoneEscrowedBeforeUse => {
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
                done.set(TierPhase::Done, d.node, Some(msg));
                d.save(&done).await?;
                tracing::info!(
                    tier = name,
                    "bootstrapped earlier with a secret escrowed before use"
                );
                return Ok(Some(Outcome::Recovered));
            }
            AfterCall::WaitForPeer => {
                tracing::info!(tier = name, leader = %state_before.leader, "bootstrapped by another node whose escrow is not confirmed yet; waiting for it");
                // Put back the other node's record (our pre-flight overwrote it), so its grace is not extended.
                d.save(&state_before).await?;
                return Ok(None);
            }
            AfterCall::AlreadyBootstrapped => {
                let msg = format!(
                    "{name} reports it was already bootstrapped ({detail}) but nothing was escrowed: follow docs/bootstrap.md#{name}-already-bootstrapped"
                );
                if pre_escrowed {
                    // Our secret was escrowed but never used: the state must not point operators at it.
                    state.receipts.clear();
                    state.pre_escrows.clear();
                    state.escrow_id = None;
                }
                return Err(d.needs_operator(&mut state, name, msg).await?);
            }
            AfterCall::HalfInitialized => {
                let msg = half_initialized_step(name, d.node, &detail);
                return Err(d.needs_operator(&mut state, name, msg).await?);
            }
            AfterCall::Refused => {
                let msg = format!(
                    "{name} refused its bootstrap call on {}: {detail}. Fix what the server names, then clear the tier state and reboot {}: docs/bootstrap.md#bootstrap-call-refused",
                    d.node, d.node
                );
                return Err(d.needs_operator(&mut state, name, msg).await?);
            }
            AfterCall::Fail => {
                return Err(BootstrapError::Tier {
                    tier: name.into(),
                    message: detail,
                })
            }
        }
    };
    crash_if(d.crash_at, CrashPoint::AfterInit);
    let configured = if proven {
        // 5'. The product took the secret escrowed before use: that escrow is the tier's, so nothing is spooled
        //     or escrowed again (the accessor ID it lacks is not secret: `token/self` gives it). Earlier
        //     leaders' unproven escrows are dropped; `escrowed` is recorded while the configuration runs.
        let own = state.escrow_id.clone().unwrap_or_default();
        state.receipts.retain(|r| r.is_for(&own));
        state.pre_escrows.clear();
        state.set(TierPhase::Escrowed, d.node, started_over.clone());
        let (recorded, configured) = tokio::join!(d.save(&state), tier.configure(&secrets));
        recorded?;
        crash_if(d.crash_at, CrashPoint::AfterEscrow);
        configured
    } else {
        // With the PGP option, the clear payload stays in memory for the configuration below and only its PGP
        // form is sealed and spooled (the keys were proven at boot by a trial encryption to each).
        let escrowed = d.for_escrow(name, &secrets)?;
        let env = envelope::seal(
            &prepared.key,
            escrowed,
            &prepared.escrow_id,
            d.cluster,
            name,
            &prepared.kek_id,
            &prepared.wrapped,
            (d.now_unix)(),
        )?;
        let spool_path = d.spool.write(&env)?;
        crash_if(d.crash_at, CrashPoint::AfterSpool);
        state.set(TierPhase::Initialized, d.node, started_over.clone());
        let initialized = state.clone();

        // 5. Escrow to both targets, while `initialized` is recorded, so the secrets sit in the spool for a moment,
        //    not for the whole configuration below; then the receipts, and the spool goes.
        if pre_escrowed {
            // A server that ignored the secret escrowed before use made a token of its own: its escrow replaces
            // the one the state named until now; and the call succeeded, so no earlier leader's call landed.
            state.escrow_id = Some(prepared.escrow_id.clone());
            state.receipts.clear();
            state.pre_escrows.clear();
        }
        let (recorded, delivered) = tokio::join!(d.save(&initialized), d.deliver(&mut state, &env));
        if let Err(e) = recorded {
            // The secrets are safe in the spool; `escrowed` below records the state again.
            tracing::warn!(error = %e, "could not record the initialized state");
        }
        delivered?;
        state.set(TierPhase::Escrowed, d.node, started_over.clone());
        d.save(&state).await?;
        d.spool
            .remove(&spool_path)
            .map_err(BootstrapError::SpoolRemove)?;
        crash_if(d.crash_at, CrashPoint::AfterEscrow);

        // 6. Configuration that needs the fresh root credential, still in memory (never read back from escrow).
        tier.configure(&secrets).await
    };
    if let Err(e) = configured {
        let message = e.to_string();
        tracing::error!(tier = name, %message, "post-bootstrap configuration failed");
        let incomplete = format!("post-bootstrap configuration incomplete: {message}");
        state.message = Some(match &started_over {
            Some(note) => format!("{note}; {incomplete}"),
            None => incomplete,
        });
    }
    drop(secrets);
    state.set(TierPhase::Done, d.node, state.message.clone());
    d.save(&state).await?;
    tracing::info!(tier = name, escrow_id = %state.escrow_id.as_deref().unwrap_or_default(), "bootstrapped and escrowed");
    Ok(Some(Outcome::Bootstrapped))
}

/// Escrow before use: seals the tier's caller-chosen secret under an escrow id of its own and delivers it
/// to both targets; `state` then names that escrow. No spool: until the bootstrap call the secret is in
/// effect nowhere, so a crash loses nothing (the next leader escrows a fresh one).
async fn escrow_before_use(
    d: &Driver<'_>,
    tier: &str,
    state: &mut TierState,
    payload: Zeroizing<Vec<u8>>,
    pre: Prepared,
) -> Result<(), BootstrapError> {
    let env = envelope::seal(
        &pre.key,
        d.for_escrow(tier, &payload)?,
        &pre.escrow_id,
        d.cluster,
        tier,
        &pre.kek_id,
        &pre.wrapped,
        (d.now_unix)(),
    )?;
    d.deliver(state, &env).await?;
    state.escrow_id = Some(pre.escrow_id.clone());
    // Unproven until the call's answer (or token/self) says whose secret the product took.
    state.pre_escrows.push(pre.escrow_id.clone());
    tracing::info!(tier, escrow_id = %pre.escrow_id, "bootstrap secret escrowed before use");
    Ok(())
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
    d: &Driver<'_>,
    tier: &dyn Tier,
    state: &TierState,
    nodes: &[String],
) -> Result<Option<String>, BootstrapError> {
    let name = tier.name();
    for node in nodes {
        let at = state
            .history
            .iter()
            .find(|(p, n, _)| *p == TierPhase::Initializing && n == node)
            .map(|h| h.2)
            .unwrap_or_default();
        let ip = d.storage.peer_ip(node).await?;
        let (answer, why) = match &ip {
            Some(ip) => match tier.peer_initialized(ip).await {
                Ok(true) => (PeerAnswer::Initialized, String::new()),
                Ok(false) => (PeerAnswer::NotInitialized, String::new()),
                Err(e) => (PeerAnswer::CannotBeAsked, e.to_string()),
            },
            None => (
                PeerAnswer::CannotBeAsked,
                "earlier leader: no boot record with its address".to_string(),
            ),
        };
        match decide::on_peer(answer) {
            PeerVerdict::AskNext => {
                tracing::info!(tier = name, peer = %node, "an earlier leader of this tier says it is not initialized");
            }
            PeerVerdict::InitializedElsewhere => {
                return Ok(Some(format!(
                    "{node} (which began the {name} bootstrap at {at}) answers initialized, but no escrow is recorded and \
                     this node's server is not its member. If {node} still has its data disk, restart its agent: its spool \
                     completes the escrow; then restart the agents of the other servers. Otherwise follow \
                     docs/bootstrap.md#bootstrapped-but-nothing-escrowed"
                )))
            }
            PeerVerdict::Unreachable => {
                return Ok(Some(format!(
                    "{node} began the {name} bootstrap at {at} and cannot be asked whether it initialized ({why}); \
                     initializing here could make a second cluster. Boot {node} (its agent finishes or reports), then restart \
                     the agents of the other servers: docs/bootstrap.md#previous-leader-unreachable"
                )))
            }
        }
    }
    Ok(None)
}

/// Writes a small non-secret object to each target so a permission problem is found before init.
async fn preflight(d: &Driver<'_>, tier: &str, escrow_id: &str) -> Result<(), BootstrapError> {
    let probe = envelope::Envelope {
        format: 1,
        escrow_id: format!("preflight-{escrow_id}"),
        cluster: d.cluster.into(),
        tier: tier.into(),
        created_unix: (d.now_unix)(),
        kek_id: String::new(),
        wrap_alg: "none".into(),
        wrapped_key: String::new(),
        nonce: String::new(),
        ciphertext: String::new(),
    };
    tokio::try_join!(
        d.escrow.upload_blob(&probe),
        d.escrow.upload_keyvault(&probe)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
