//! Non-secret coordination state per cluster and tier, in the `coordination` container:
//! which phase the tier's bootstrap reached, who did it and when, and the escrow receipts. Only the
//! lease holder writes it; every node, `status` and operators read it.

use crate::azure::{call, Azure, AzureError};
use crate::election::COORDINATION_CONTAINER;
use crate::escrow::Receipt;
use crate::retry::RetryPolicy;
use azure_core::http::RequestContent;
use serde::{Deserialize, Serialize};

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
        }
    }

    pub fn set(&mut self, phase: TierPhase, node: &str, message: Option<String>) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.phase = phase;
        self.leader = node.into();
        self.updated_unix = now;
        self.message = message;
        self.history.push((phase, node.into(), now));
    }

    pub fn escrowed_to(&self, target: &str) -> bool {
        self.receipts
            .iter()
            .any(|r| r.target == target && Some(r.object.as_str()).is_some())
    }
}

pub fn state_blob_name(cluster: &str, tier: &str) -> String {
    format!("{cluster}/{tier}/state.json")
}

/// Reads a tier's state; `Ok(None)` when the tier was never bootstrapped.
pub async fn read(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<Option<TierState>, AzureError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &state_blob_name(cluster, tier),
    )?;
    let r = call(policy, "coordination read", || {
        let blob = &blob;
        async move { blob.download(None).await?.body.collect().await }
    })
    .await;
    match r {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AzureError {
                what: "coordination read".into(),
                status: None,
                code: None,
                detail: format!("state.json does not parse: {e}"),
            }),
        Err(e) if e.is(404) => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn write(
    az: &Azure,
    blob_endpoint: &str,
    state: &TierState,
    policy: RetryPolicy,
) -> Result<(), AzureError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &state_blob_name(&state.cluster, &state.tier),
    )?;
    let body = serde_json::to_vec_pretty(state).expect("state serialises");
    call(policy, "coordination write", || {
        let (blob, body) = (&blob, body.clone());
        async move {
            blob.upload(RequestContent::from(body), None)
                .await
                .map(|_| ())
        }
    })
    .await
}
