//! Non-secret coordination state per cluster and tier, in the `coordination` container:
//! which phase the tier's bootstrap reached, who did it and when, and the escrow receipts. Only the
//! lease holder writes it; every node, `status` and operators read it.
//!
//! Every write is fenced twice ([`Fence`]): by the writer's own lease clock (election.rs) just before the
//! request, and by storage — the write carries `If-Match` with the ETag this holder read under its lease (or
//! last wrote), or `If-None-Match: *` when there was no state. A holder that was paused past its lease while
//! another node took over and wrote the state gets 412 (or 409) and stops: its view is stale.

use crate::azure::{call, Azure, AzureError};
use crate::election::{LeaseClock, LeaseLost, COORDINATION_CONTAINER};
use crate::escrow::Receipt;
use crate::retry::RetryPolicy;
use azure_core::http::{Etag, RequestContent};
use azure_storage_blob::models::{BlobClientDownloadOptions, BlobClientUploadOptions};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TierPhase {
    /// The leader ran its pre-flight and is about to initialize / bootstrap.
    Initializing,
    /// Initialized; secrets spooled locally, escrow upload not yet confirmed.
    Initialized,
    /// Escrowed to every target; post-bootstrap configuration may still run.
    Escrowed,
    /// Bootstrapped, escrowed and configured.
    Done,
    /// Cannot proceed without an operator (see `message` and docs/bootstrap.md).
    NeedsOperator,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierState {
    pub cluster: String,
    pub tier: String,
    pub phase: TierPhase,
    pub leader: String,
    pub escrow_id: Option<String>,
    pub receipts: Vec<Receipt>,
    pub updated_unix: i64,
    pub message: Option<String>,
    /// Every phase change: (phase, node, unix time).
    pub history: Vec<(TierPhase, String, i64)>,
    /// Escrow ids of bootstrap secrets escrowed before use (Consul ≥ 1.15, Nomad) by leaders whose call may
    /// have landed, not yet proven live or dead: their receipts are kept until `token/self` with a secret
    /// proves which one the product took (docs/bootstrap.md#several-secrets-escrowed-before-use).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_escrows: Vec<String>,
}

impl TierState {
    pub fn new(cluster: &str, tier: &str, leader: &str) -> Self {
        TierState {
            cluster: cluster.into(),
            tier: tier.into(),
            phase: TierPhase::Initializing,
            leader: leader.into(),
            escrow_id: None,
            receipts: vec![],
            updated_unix: 0,
            message: None,
            history: vec![],
            pre_escrows: vec![],
        }
    }

    /// Drops every receipt except those of the unproven escrows made before use ([`Self::pre_escrows`]).
    pub fn keep_pre_escrow_receipts(&mut self) {
        let ids = &self.pre_escrows;
        self.receipts.retain(|r| ids.iter().any(|id| r.is_for(id)));
    }

    /// Forgets an escrow made before use, with its receipts: its secret was proven not to be the live one.
    pub fn drop_pre_escrow(&mut self, escrow_id: &str) {
        self.pre_escrows.retain(|id| id != escrow_id);
        self.receipts.retain(|r| !r.is_for(escrow_id));
    }

    pub fn set(&mut self, phase: TierPhase, node: &str, message: Option<String>) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.phase = phase;
        self.leader = node.into();
        self.updated_unix = now;
        self.message = message;
        self.history.push((phase, node.into(), now));
    }

    pub fn escrowed_to(&self, target: crate::escrow::ReceiptTarget) -> bool {
        self.receipts
            .iter()
            .any(|r| r.target == target && Some(r.object.as_str()).is_some())
    }
}

pub fn state_blob_name(cluster: &str, tier: &str) -> String {
    format!("{cluster}/{tier}/state.json")
}

/// What a fenced write expects to find in storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No state blob at all (`If-None-Match: *`).
    Absent,
    /// The state with this ETag (`If-Match`).
    Etag(String),
}

/// Reads a tier's state; `Ok(None)` when the tier was never bootstrapped.
pub async fn read(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<Option<TierState>, AzureError> {
    read_for_update(az, blob_endpoint, cluster, tier, policy)
        .await
        .map(|(s, _)| s)
}

/// Reads a tier's state and what a write based on it must find ([`Expect`]), for the lease holder.
pub async fn read_for_update(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<(Option<TierState>, Expect), AzureError> {
    match read_raw(az, blob_endpoint, cluster, tier, policy).await? {
        None => Ok((None, Expect::Absent)),
        Some((bytes, etag)) => serde_json::from_slice(&bytes)
            .map(|s| (Some(s), Expect::Etag(etag)))
            .map_err(|e| AzureError {
                what: "coordination read".into(),
                status: None,
                code: None,
                detail: format!("state.json does not parse: {e}"),
            }),
    }
}

/// The state blob's bytes and ETag; `None` when there is none.
async fn read_raw(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<Option<(Vec<u8>, String)>, AzureError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &state_blob_name(cluster, tier),
    )?;
    let r = call(policy, "coordination read", || {
        let blob = &blob;
        async move {
            let d = blob.download(None::<BlobClientDownloadOptions>).await?;
            let etag = d.properties.etag.as_ref().map(|e| e.to_string());
            Ok((d.body.collect().await?, etag))
        }
    })
    .await;
    match r {
        Ok((bytes, Some(etag))) => Ok(Some((bytes.to_vec(), etag))),
        Ok((_, None)) => Err(AzureError {
            what: "coordination read".into(),
            status: None,
            code: None,
            detail: "the answer carries no ETag".into(),
        }),
        Err(e) if e.is(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why a coordination write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    /// This node's lease clock ran out (or it holds no lease): nothing was sent.
    #[error("{0}; the tier state was not written")]
    Lease(#[from] LeaseLost),
    /// Storage refused the write: the state changed since this node read it under its lease.
    #[error(
        "{tier}: tier state write refused by storage (HTTP {status}): it changed since this node read it \
         under its lease — another node took over; this node stops"
    )]
    Fenced { tier: String, status: u16 },
}

/// The right to write one tier's state, held while this node holds the tier's lease: the lease's clock and
/// what storage must still hold for a write to land (the ETag this node read under the lease or last wrote).
/// Clones share it. Unarmed (no lease), every write is refused before it is sent.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<Mutex<Option<(LeaseClock, Expect)>>>);

/// One write's permission from a [`Fence`], taken just before the request.
#[derive(Debug)]
pub struct Ticket(Expect);

impl Fence {
    /// Arms the fence for a lease just taken and the state read under it.
    pub fn arm(&self, clock: LeaseClock, expect: Expect) {
        *self.0.lock().expect("not poisoned") = Some((clock, expect));
    }

    /// Disarms it (the lease is released).
    pub fn disarm(&self) {
        *self.0.lock().expect("not poisoned") = None;
    }

    /// Permission for one write: refused when no lease is held or its clock ran out.
    pub fn ticket(&self, tier: &str) -> Result<Ticket, LeaseLost> {
        match &*self.0.lock().expect("not poisoned") {
            Some((clock, expect)) => {
                clock.check()?;
                Ok(Ticket(expect.clone()))
            }
            None => Err(LeaseLost { tier: tier.into() }),
        }
    }

    fn wrote(&self, etag: String) {
        if let Some((_, expect)) = &mut *self.0.lock().expect("not poisoned") {
            *expect = Expect::Etag(etag);
        }
    }
}

/// Writes the tier state with `ticket`'s condition, then moves `fence` to the new ETag. 409/412: the state is
/// not what this node last saw — unless it is exactly what this write carried (an earlier attempt of this
/// call landed and its answer was lost), storage fenced this node off ([`WriteError::Fenced`]).
pub async fn write(
    az: &Azure,
    blob_endpoint: &str,
    state: &TierState,
    fence: &Fence,
    ticket: Ticket,
    policy: RetryPolicy,
) -> Result<(), WriteError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &state_blob_name(&state.cluster, &state.tier),
    )?;
    let body = serde_json::to_vec_pretty(state).expect("state serialises");
    let r = call(policy, "coordination write", || {
        let (blob, body) = (&blob, body.clone());
        let opts = match &ticket.0 {
            Expect::Absent => BlobClientUploadOptions::default().if_not_exists(),
            Expect::Etag(e) => BlobClientUploadOptions {
                if_match: Some(Etag::from(e.clone())),
                ..Default::default()
            },
        };
        async move {
            let r = blob.upload(RequestContent::from(body), Some(opts)).await?;
            Ok(r.etag.map(|e| e.to_string()))
        }
    })
    .await;
    let etag = match r {
        Ok(Some(etag)) => etag,
        Ok(None) => {
            return Err(AzureError {
                what: "coordination write".into(),
                status: None,
                code: None,
                detail: "the answer carries no ETag".into(),
            }
            .into())
        }
        Err(e) if e.is(409) || e.is(412) => {
            let status = e.status.unwrap_or_default();
            match read_raw(az, blob_endpoint, &state.cluster, &state.tier, policy).await? {
                Some((stored, etag)) if stored == body => etag,
                _ => {
                    return Err(WriteError::Fenced {
                        tier: state.tier.clone(),
                        status,
                    })
                }
            }
        }
        Err(e) => return Err(e.into()),
    };
    fence.wrote(etag);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escrow::ReceiptTarget;
    use std::time::Duration;
    use tokio::time::Instant;

    fn receipt(target: ReceiptTarget, object: &str, escrow_id: Option<&str>) -> Receipt {
        Receipt {
            target,
            object: object.into(),
            version: String::new(),
            etag: None,
            escrow_id: escrow_id.map(str::to_string),
            ciphertext_sha256: String::new(),
            written_unix: 0,
        }
    }

    #[test]
    fn unproven_escrows_made_before_use_keep_their_receipts() {
        let mut s = TierState::new("c1", "nomad", "n1");
        for id in ["100-a", "200-b", "300-c"] {
            // Receipts as written before they named their escrow (the id in the object), and as written now
            // (one Key Vault secret per tier: only the receipt's escrow id tells them apart).
            s.receipts.push(receipt(
                ReceiptTarget::Blob,
                &format!("escrow/c1/nomad/{id}.json"),
                None,
            ));
            s.receipts.push(receipt(
                ReceiptTarget::Keyvault,
                "c1-nomad-escrow",
                Some(id),
            ));
        }
        s.pre_escrows = vec!["100-a".into(), "200-b".into()];
        s.keep_pre_escrow_receipts();
        assert_eq!(s.receipts.len(), 4);
        assert!(s.receipts.iter().all(|r| !r.is_for("300-c")));
        s.drop_pre_escrow("100-a");
        assert_eq!(s.pre_escrows, vec!["200-b".to_string()]);
        assert_eq!(s.receipts.len(), 2);
        // An older state without the field reads as none; an empty list is not written.
        let json = serde_json::to_string(&TierState::new("c1", "vault", "n1")).unwrap();
        assert!(!json.contains("pre_escrows"));
        let back: TierState = serde_json::from_str(&json).unwrap();
        assert!(back.pre_escrows.is_empty());
    }

    #[test]
    fn a_fence_gives_no_ticket_without_a_lease_or_past_its_clock() {
        let fence = Fence::default();
        assert!(fence.ticket("vault").is_err(), "unarmed: no lease held");
        let far = Instant::now() + Duration::from_secs(3600);
        fence.arm(LeaseClock::fixed("vault", Some(far)), Expect::Absent);
        assert!(matches!(fence.ticket("vault"), Ok(Ticket(Expect::Absent))));
        fence.wrote("\"0x1\"".into());
        assert!(
            matches!(fence.ticket("vault"), Ok(Ticket(Expect::Etag(e))) if e == "\"0x1\""),
            "the next write expects this holder's own last write"
        );
        // Clones share the fence: the bootstrap's copies see the same ETag and the same clock.
        let clone = fence.clone();
        fence.arm(
            LeaseClock::fixed("vault", Some(Instant::now())),
            Expect::Absent,
        );
        assert!(clone.ticket("vault").is_err(), "the clock ran out");
        fence.disarm();
        assert!(clone.ticket("vault").is_err());
    }
}
