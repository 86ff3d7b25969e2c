//! Encrypted raft snapshots of the server tiers, to Blob Storage through the node's managed identity
//! (docs/runbooks.md#snapshots).
//!
//! `hashistack-agent snapshot` (run by `hashistack-snapshot.timer` every few minutes on every server) does nothing
//! unless this node is its tier's leader (active node) and a snapshot is due (the tag
//! `hashistack-snapshot-interval`). Then it streams the product's snapshot through the encryptor
//! ([`format`]: a fresh AES-256-GCM data key, wrapped by the wrap-only Key Vault key `snapshot-wrap`) into a block
//! blob (Put Block per 2 MiB, then Put Block List with `If-None-Match: *`) in the `snapshots` container, and
//! records the attempt in `coordination/<cluster>/<tier>/snapshot.json` for `status`. Memory does not grow with
//! the snapshot: one chunk of plaintext and one block of ciphertext at most.
//!
//! Operators list and restore with their own identity ([`operator`]); VM identities cannot read snapshots or
//! unwrap their keys.

pub mod format;
pub mod operator;
pub mod product;

use crate::azure::{call, Azure, AzureError};
use crate::coordination::Expect;
use crate::election::COORDINATION_CONTAINER;
use crate::names::{SNAPSHOT_CONTAINER, SNAPSHOT_KEY};
use crate::retry::RetryPolicy;
use azure_core::http::{Etag, RequestContent};
use azure_core::Bytes;
use azure_storage_blob::models::{
    BlobClientUploadOptions, BlockBlobClientCommitBlockListOptions, BlockLookupList,
};
use product::Tier;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Ciphertext bytes per staged block (Azure allows 50 000 blocks per blob: 2 MiB blocks hold snapshots up to
/// ~97 GiB, and keep the agent's memory small: one block in flight, one filling).
pub const BLOCK_SIZE: usize = 2 << 20;
/// A due snapshot may start this much before its interval has fully passed (the timer's period is not exact).
pub const DUE_SLACK_SECS: i64 = 120;

/// One snapshot that reached the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// The blob's name in the `snapshots` container.
    pub blob: String,
    pub node: String,
    pub index: u64,
    pub created_unix: i64,
    /// The product's snapshot, in bytes.
    pub plaintext_bytes: u64,
    /// The encrypted blob, in bytes.
    pub stored_bytes: u64,
    pub duration_ms: u64,
}

/// The last attempt, successful or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempted {
    pub node: String,
    pub at_unix: i64,
    pub ok: bool,
    /// One line (never a token or a body).
    pub error: Option<String>,
}

/// `coordination/<cluster>/<tier>/snapshot.json`: what `status` reads. Written by the tier's leader after every
/// attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub cluster: String,
    pub tier: String,
    pub interval_secs: u64,
    pub retention_days: u32,
    pub last_attempt: Option<Attempted>,
    pub last_success: Option<Taken>,
}

impl Record {
    pub fn new(cluster: &str, tier: &str, settings: crate::node::SnapshotSettings) -> Self {
        Record {
            cluster: cluster.into(),
            tier: tier.into(),
            interval_secs: settings.interval_secs,
            retention_days: settings.retention_days,
            last_attempt: None,
            last_success: None,
        }
    }

    /// Whether a snapshot is due at `now`: none yet, the last attempt failed, or the newest is an interval old.
    pub fn due(&self, now: i64, interval_secs: u64) -> bool {
        if self.last_attempt.as_ref().is_some_and(|a| !a.ok) {
            return true;
        }
        match &self.last_success {
            None => true,
            Some(t) => now - t.created_unix + DUE_SLACK_SECS >= interval_secs as i64,
        }
    }
}

/// Its own blob beside the tier state (not in it: the timer's writes never race the bootstrap's fenced state
/// writes), under the tier's prefix `<cluster>/<tier>/`, the only coordination path besides `material/` and
/// `nodes/` a tier's identity may write (the ARM template's ABAC condition, docs/trust-model.md).
pub fn record_blob_name(cluster: &str, tier: &str) -> String {
    format!("{cluster}/{tier}/snapshot.json")
}

/// `<cluster>/<tier>/<UTC time>-<index>-<id>.hsnap`: names sort by time.
pub fn blob_name(cluster: &str, tier: &str, created_unix: i64, index: u64, id: &str) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(created_unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{cluster}/{tier}/{:04}{:02}{:02}T{:02}{:02}{:02}Z-{index:020}-{id}.hsnap",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    #[error("{0}")]
    Product(#[from] product::ProductError),
    #[error("{0}")]
    Format(#[from] format::FormatError),
    #[error("{0}")]
    Open(#[from] crate::escrow::operator::OpenError),
    #[error("{0}")]
    Record(#[from] RecordError),
    /// The product API's client (the cluster CA file).
    #[error("{0}")]
    Client(#[from] crate::tls::HttpsClientError),
    /// Bad input (configuration, tags, arguments): exit 2.
    #[error("{0}")]
    Input(String),
    /// A snapshot refused before anything was touched.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

impl SnapshotError {
    pub fn exit_code(&self) -> u8 {
        match self {
            SnapshotError::Input(_) => 2,
            _ => 1,
        }
    }
}

/// Azure calls of snapshots: each attempt may carry a whole block.
pub fn policy(deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        deadline,
        attempt_timeout: Duration::from_secs(60),
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(10),
    }
}

pub async fn read_record(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<Option<Record>, AzureError> {
    read_record_for_update(az, blob_endpoint, cluster, tier, policy)
        .await
        .map(|(r, _)| r)
}

fn record_unreadable(tier: &str, detail: String) -> AzureError {
    AzureError {
        what: "snapshot record read".into(),
        status: None,
        code: None,
        detail: format!("{tier}/snapshot.json {detail}"),
    }
}

/// Reads a tier's snapshot record and what a write based on it must find in storage ([`Expect`]).
pub async fn read_record_for_update(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<(Option<Record>, Expect), AzureError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &record_blob_name(cluster, tier),
    )?;
    let r = call(policy, "snapshot record read", || {
        let blob = &blob;
        async move {
            let d = blob.download(None).await?;
            let etag = d.properties.etag.as_ref().map(|e| e.to_string());
            Ok((d.body.collect().await?, etag))
        }
    })
    .await;
    match r {
        Ok((bytes, Some(etag))) => serde_json::from_slice(&bytes)
            .map(|rec| (Some(rec), Expect::Etag(etag)))
            .map_err(|e| record_unreadable(tier, format!("does not parse: {e}"))),
        Ok((_, None)) => Err(record_unreadable(tier, "came without an ETag".into())),
        Err(e) if e.is(404) => Ok((None, Expect::Absent)),
        Err(e) => Err(e),
    }
}

/// Why a snapshot record was not written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    /// Storage refused the write: another node recorded a snapshot of the tier since this one read the record
    /// (a leadership change mid-run). Its record stands; this run's snapshot, if taken, is in the container.
    #[error(
        "{tier}: snapshot record write refused by storage (HTTP {status}): another node recorded a snapshot \
         since this one read the record; its record stands"
    )]
    Superseded { tier: String, status: u16 },
}

/// Writes the record only if storage still holds what this run read (`expect`: `If-Match` its ETag, or
/// `If-None-Match: *` when there was none), as the tier state's writes are fenced by storage (coordination.rs):
/// a leader that lost leadership mid-run cannot overwrite the newer leader's record. A 409/412 whose stored
/// record is exactly this write's (an earlier attempt landed, its answer was lost) is success.
pub async fn write_record(
    az: &Azure,
    blob_endpoint: &str,
    record: &Record,
    expect: &Expect,
    policy: RetryPolicy,
) -> Result<(), RecordError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &record_blob_name(&record.cluster, &record.tier),
    )?;
    let body = serde_json::to_vec_pretty(record).expect("record serialises");
    let r = call(policy, "snapshot record write", || {
        let (blob, body) = (&blob, body.clone());
        let opts = match expect {
            Expect::Absent => BlobClientUploadOptions::default().if_not_exists(),
            Expect::Etag(e) => BlobClientUploadOptions {
                if_match: Some(Etag::from(e.clone())),
                ..Default::default()
            },
        };
        async move {
            blob.upload(RequestContent::from(body), Some(opts))
                .await
                .map(|_| ())
        }
    })
    .await;
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.is(409) || e.is(412) => {
            let status = e.status.unwrap_or_default();
            let stored =
                read_record_for_update(az, blob_endpoint, &record.cluster, &record.tier, policy)
                    .await?
                    .0;
            if stored.as_ref() == Some(record) {
                Ok(())
            } else {
                Err(RecordError::Superseded {
                    tier: record.tier.clone(),
                    status,
                })
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Where a snapshot goes: the storage account, the vault holding `snapshot-wrap`, and whose snapshot it is.
pub struct Dest<'a> {
    pub az: &'a Azure,
    pub blob_endpoint: &'a str,
    pub key_vault_uri: &'a str,
    pub cluster: &'a str,
    pub node: &'a str,
}

/// Where a snapshot comes from: the product's API on this node and the snapshot credential.
pub struct Source<'a> {
    pub tier: Tier,
    pub http: &'a reqwest::Client,
    pub api: &'a str,
    pub token: &'a str,
}

/// A block blob written block by block, then committed create-only.
struct BlockUpload {
    blob: azure_storage_blob::BlockBlobClient,
    ids: Vec<Vec<u8>>,
    bytes: u64,
    policy: RetryPolicy,
}

impl BlockUpload {
    async fn stage(&mut self, block: Vec<u8>) -> Result<(), AzureError> {
        if block.is_empty() {
            return Ok(());
        }
        // Block ids: equal length within a blob (Azure's rule), 16 digits.
        let id = format!("{:016}", self.ids.len()).into_bytes();
        let len = block.len() as u64;
        let body = Bytes::from(block);
        call(self.policy, "snapshot block upload", || {
            let (blob, id, body) = (&self.blob, &id, body.clone());
            async move {
                let content: RequestContent<Bytes, azure_core::http::NoFormat> = body.into();
                blob.stage_block(id, len, content, None).await.map(|_| ())
            }
        })
        .await?;
        self.ids.push(id);
        self.bytes += len;
        Ok(())
    }

    /// Put Block List with `If-None-Match: *`. The name is unique (it carries a random id), so a 409/412 after a
    /// lost answer means an earlier attempt of this very commit landed.
    async fn commit(&self, metadata: HashMap<String, String>) -> Result<(), AzureError> {
        let r = call(self.policy, "snapshot commit", || {
            let list = BlockLookupList {
                latest: Some(self.ids.clone()),
                ..Default::default()
            };
            let opts = BlockBlobClientCommitBlockListOptions {
                if_none_match: Some("*".into()),
                metadata: Some(metadata.clone()),
                blob_content_type: Some("application/vnd.hashistack.snapshot".into()),
                ..Default::default()
            };
            let blob = &self.blob;
            async move {
                let body: RequestContent<BlockLookupList, azure_core::http::XmlFormat> =
                    list.try_into()?;
                blob.commit_block_list(body, Some(opts)).await.map(|_| ())
            }
        })
        .await;
        match r {
            Err(e) if (e.is(409) || e.is(412)) => {
                tracing::info!("snapshot commit already present (an earlier attempt landed)");
                Ok(())
            }
            other => other,
        }
    }
}

/// Takes one snapshot: wraps a fresh data key, streams the product's snapshot through the sealer into blocks, and
/// commits the blob. Nothing is recorded here (see [`run`]).
pub async fn take(
    src: &Source<'_>,
    dest: &Dest<'_>,
    policy: RetryPolicy,
) -> Result<Taken, SnapshotError> {
    let started = Instant::now();
    let tier = src.tier.name();
    let (key, kek_id, wrapped) = crate::escrow::wrap_fresh_key(
        dest.az,
        dest.key_vault_uri,
        SNAPSHOT_KEY,
        "snapshot key wrap",
        policy,
    )
    .await?;
    let index_before = product::index_before(src.tier, src.http, src.api, src.token).await?;
    let (mut resp, index_header) = product::save(src.tier, src.http, src.api, src.token).await?;
    let index = index_header.unwrap_or(index_before);
    let created_unix = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut idb = [0u8; 4];
    aws_lc_rs::rand::fill(&mut idb).expect("system RNG");
    let name = blob_name(dest.cluster, tier, created_unix, index, &hex::encode(idb));
    use base64::Engine;
    let header = format::Header {
        format: format::FORMAT,
        cluster: dest.cluster.into(),
        tier: tier.into(),
        node: dest.node.into(),
        created_unix,
        index,
        chunk_size: format::CHUNK_SIZE,
        cipher: format::CIPHER.into(),
        kek_id,
        wrap_alg: format::WRAP_ALG.into(),
        wrapped_key: base64::engine::general_purpose::STANDARD.encode(&wrapped),
    };
    let (mut sealer, mut buf) = format::Sealer::new(&key, &header)?;
    drop(key);
    let mut up = BlockUpload {
        blob: dest
            .az
            .blob(dest.blob_endpoint, SNAPSHOT_CONTAINER, &name)?
            .block_blob_client(),
        ids: Vec::new(),
        bytes: 0,
        policy,
    };
    let fresh = || Vec::with_capacity(BLOCK_SIZE + format::CHUNK_SIZE as usize + 64);
    loop {
        let chunk = resp.chunk().await.map_err(|e| {
            SnapshotError::Product(product::ProductError {
                what: "snapshot stream".into(),
                status: None,
                detail: e.without_url().to_string(),
            })
        })?;
        let Some(chunk) = chunk else { break };
        sealer.push(&chunk, &mut buf)?;
        if buf.len() >= BLOCK_SIZE {
            let block = std::mem::replace(&mut buf, fresh());
            up.stage(block).await?;
        }
    }
    let plaintext_bytes = sealer.finish(&mut buf)?;
    up.stage(buf).await?;
    let metadata = HashMap::from([
        ("cluster".to_string(), dest.cluster.to_string()),
        ("tier".to_string(), tier.to_string()),
        ("node".to_string(), dest.node.to_string()),
        ("index".to_string(), index.to_string()),
        ("created".to_string(), created_unix.to_string()),
        ("plaintextbytes".to_string(), plaintext_bytes.to_string()),
        ("format".to_string(), format::FORMAT.to_string()),
    ]);
    up.commit(metadata).await?;
    Ok(Taken {
        blob: name,
        node: dest.node.into(),
        index,
        created_unix,
        plaintext_bytes,
        stored_bytes: up.bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// What one run of `hashistack-agent snapshot` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not a server tier (workers, the jumpbox).
    NotAServer,
    /// Another node leads the tier.
    NotLeader,
    /// The newest snapshot is recent enough.
    NotDue {
        age_secs: i64,
    },
    Taken(Taken),
}

/// `hashistack-agent snapshot`: on a server tier's leader, when a snapshot is due (or `force`), takes one and
/// records the attempt. Every other node, and a leader with a recent snapshot, does nothing.
pub async fn run(cfg: &crate::config::AgentConfig, force: bool) -> Result<Outcome, SnapshotError> {
    use crate::render::Layout;
    use crate::version::Product;
    let md = crate::boot::fetch_metadata(cfg)
        .await
        .map_err(|e| match e.exit_code() {
            2 => SnapshotError::Input(e.to_string()),
            _ => SnapshotError::Other(e.to_string()),
        })?;
    let spec = crate::node::NodeSpec::from_metadata(&md)
        .map_err(|e| SnapshotError::Input(e.to_string()))?;
    crate::node::check_endpoints(&spec, &md.compute.az_environment, cfg.azure.endpoints)
        .map_err(|e| SnapshotError::Input(e.to_string()))?;
    let Some(tier) = Tier::for_role(spec.role) else {
        return Ok(Outcome::NotAServer);
    };
    let settings = spec.snapshots.unwrap_or_default();
    let (Some(key_vault), Some(servers_vault)) = (&spec.escrow_vault_uri, &spec.servers_vault_uri)
    else {
        return Err(SnapshotError::Input(format!(
            "tag {}: missing (the snapshot credential is kept in the servers vault)",
            crate::node::TAG_SERVERS_VAULT_URI
        )));
    };
    let az = crate::boot::azure_for(cfg, &spec).map_err(|e| SnapshotError::Input(e.to_string()))?;
    let layout = Layout::new(&cfg.paths.root);
    let (product, port) = match tier {
        Tier::Consul => (Product::Consul, crate::render::consul::HTTPS_PORT),
        Tier::Vault => (Product::Vault, crate::render::vault::API_PORT),
        Tier::Nomad => (Product::Nomad, crate::render::nomad::HTTP_PORT),
    };
    let api = format!("https://{}:{port}", spec.ip);
    let http = product::client(&layout.ca_file(product))?;
    if !product::is_leader(tier, &http, &api, spec.ip).await? {
        return Ok(Outcome::NotLeader);
    }
    let pol = policy(Duration::from_secs(
        cfg.bootstrap.azure_deadline_secs.max(60),
    ));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (record, expect) =
        read_record_for_update(&az, &spec.blob_endpoint, &spec.cluster, tier.name(), pol).await?;
    let mut record = record.unwrap_or_else(|| Record::new(&spec.cluster, tier.name(), settings));
    record.interval_secs = settings.interval_secs;
    record.retention_days = settings.retention_days;
    if !force && !record.due(now, settings.interval_secs) {
        let age = record
            .last_success
            .as_ref()
            .map_or(0, |t| now - t.created_unix);
        return Ok(Outcome::NotDue { age_secs: age });
    }
    let attempt = async {
        let secret = crate::names::snapshot_token_secret(&spec.cluster, tier.name());
        let token = crate::material::get_secret(&az, servers_vault, &secret, pol)
            .await?
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                SnapshotError::Other(format!(
                    "no snapshot credential {secret} in the servers vault (the {} tier's bootstrap creates it)",
                    tier.name()
                ))
            })?;
        if tier == Tier::Vault {
            if let Err(e) = product::renew_vault_token(&http, &api, &token).await {
                tracing::warn!(error = %e, "the Vault snapshot token was not renewed");
            }
        }
        let src = Source {
            tier,
            http: &http,
            api: &api,
            token: &token,
        };
        let dest = Dest {
            az: &az,
            blob_endpoint: &spec.blob_endpoint,
            key_vault_uri: key_vault,
            cluster: &spec.cluster,
            node: &spec.node_name,
        };
        take(&src, &dest, pol).await
    }
    .await;
    let finished = time::OffsetDateTime::now_utc().unix_timestamp();
    record.last_attempt = Some(Attempted {
        node: spec.node_name.clone(),
        at_unix: finished,
        ok: attempt.is_ok(),
        error: attempt.as_ref().err().map(|e| e.to_string()),
    });
    if let Ok(t) = &attempt {
        record.last_success = Some(t.clone());
    }
    let recorded = write_record(&az, &spec.blob_endpoint, &record, &expect, pol).await;
    let taken = attempt?;
    recorded?;
    Ok(Outcome::Taken(taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_carry_tier_and_index() {
        let a = blob_name("lab", "consul", 1_700_000_000, 42, "0a0b0c0d");
        assert_eq!(
            a,
            "lab/consul/20231114T221320Z-00000000000000000042-0a0b0c0d.hsnap"
        );
        let b = blob_name("lab", "consul", 1_700_000_001, 7, "00000000");
        assert!(a < b);
    }

    #[test]
    fn due_after_an_interval_or_a_failure() {
        let mut r = Record::new("lab", "vault", crate::node::SnapshotSettings::default());
        assert!(r.due(1000, 3600), "never taken");
        r.last_success = Some(Taken {
            blob: "b".into(),
            node: "n".into(),
            index: 1,
            created_unix: 10_000,
            plaintext_bytes: 1,
            stored_bytes: 1,
            duration_ms: 1,
        });
        r.last_attempt = Some(Attempted {
            node: "n".into(),
            at_unix: 10_000,
            ok: true,
            error: None,
        });
        assert!(!r.due(10_000 + 600, 3600));
        assert!(r.due(10_000 + 3600 - DUE_SLACK_SECS, 3600));
        r.last_attempt.as_mut().unwrap().ok = false;
        assert!(r.due(10_000 + 600, 3600), "a failed attempt is tried again");
    }
}
