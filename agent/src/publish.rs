//! Publishing this node's boot record for the cluster view: at the end of each boot and on failure, every agent
//! writes its non-secret [`BootRecord`] (plus the address and tier size its own tags declare) to the
//! coordination container at `<cluster>/nodes/<node>.json`, where `hashistack-agent status` reads it. A node that
//! never joined a cluster (a bad role tag, an image without a binary) still shows up there.
//!
//! Best effort with a short deadline: publishing never blocks or fails a boot. It needs only two tags to parse,
//! `hashistack-cluster` and `hashistack-blob-endpoint` (a node whose other tags are wrong still publishes); a node
//! whose cluster or blob endpoint tag is missing or malformed cannot publish, and only its journal tells.

use crate::azure::{call, Azure};
use crate::config::AgentConfig;
use crate::election::COORDINATION_CONTAINER;
use crate::imds::{ImdsClient, InstanceMetadata};
use crate::node::{self as tags, NodeSpec};
use crate::record::BootRecord;
use crate::retry::RetryPolicy;
use azure_core::http::RequestContent;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The whole publish, metadata and token included, never takes longer than this.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Version of the published document (`format`).
pub const FORMAT: u32 = 1;

/// What a node publishes: its boot record, flattened, and what status needs to place it in the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub format: u32,
    #[serde(flatten)]
    pub boot: BootRecord,
    /// The node's private IPv4 address (where its APIs listen).
    pub ip: Option<String>,
    /// The raw `hashistack-role` tag, also when it is not a valid role (then `role` is null).
    pub role_tag: Option<String>,
    /// Tier sizes this node's tags declare: `consul-servers`, `vault-servers`, `nomad-servers` (only a server's
    /// own tier carries one).
    #[serde(default)]
    pub expects: BTreeMap<String, u8>,
    pub published_unix: i64,
}

/// Blob name of a node's record.
pub fn record_blob_name(cluster: &str, node: &str) -> String {
    format!("{cluster}/nodes/{node}.json")
}

/// Prefix under which every node record of a cluster lives.
pub fn records_prefix(cluster: &str) -> String {
    format!("{cluster}/nodes/")
}

/// The address `node` published in its boot record (`None`: no record, or none with an address).
pub async fn read_ip(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    node: &str,
    policy: RetryPolicy,
) -> Result<Option<String>, crate::azure::AzureError> {
    let blob = az.blob(
        blob_endpoint,
        COORDINATION_CONTAINER,
        &record_blob_name(cluster, node),
    )?;
    let r = call(policy, "boot record read", || {
        let blob = &blob;
        async move { blob.download(None).await?.body.collect().await }
    })
    .await;
    match r {
        Ok(bytes) => Ok(serde_json::from_slice::<NodeRecord>(&bytes)
            .ok()
            .and_then(|r| r.ip)),
        Err(e) if e.is(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where and as whom to publish, from the metadata alone (no NodeSpec needed).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub cluster: String,
    pub blob_endpoint: String,
    pub node: String,
    pub identity_client_id: Option<String>,
    pub ip: Option<String>,
    pub role_tag: Option<String>,
    pub expects: BTreeMap<String, u8>,
}

fn tag<'a>(md: &'a InstanceMetadata, name: &str) -> Option<&'a str> {
    md.compute
        .tags_list
        .iter()
        .find(|t| t.name == name)
        .map(|t| t.value.trim())
        .filter(|v| !v.is_empty())
}

fn valid_cluster(v: &str) -> bool {
    v.len() <= 32
        && v.starts_with(|c: char| c.is_ascii_lowercase())
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn valid_node(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Why a boot record is not published (it stays on the node's disk).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("tag hashistack-cluster is missing or malformed")]
    Cluster,
    #[error("tag hashistack-blob-endpoint is missing or not an https URL")]
    BlobEndpoint,
    #[error("IMDS compute.osProfile.computerName is missing or not a host name")]
    NodeName,
    #[error("tag hashistack-blob-endpoint is missing: the boot record stays local")]
    NoBlobEndpoint,
    #[error(
        "tag hashistack-blob-endpoint is not on this cloud's storage domain: the boot record stays local"
    )]
    ForeignBlobEndpoint,
    #[error("no metadata: the boot record stays local")]
    NoMetadata,
    #[error("{0}")]
    Client(#[from] crate::tls::HttpsClientError),
    #[error("{0}")]
    Azure(#[from] crate::azure::AzureError),
}

/// The publish target from a metadata document. `Err` says why this node cannot publish.
pub fn target(md: &InstanceMetadata) -> Result<Target, PublishError> {
    let cluster = tag(md, tags::TAG_CLUSTER)
        .filter(|c| valid_cluster(c))
        .ok_or(PublishError::Cluster)?;
    let endpoint = tag(md, tags::TAG_BLOB_ENDPOINT)
        .filter(|e| {
            e.strip_prefix("https://").is_some_and(|r| {
                !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace)
            })
        })
        .ok_or(PublishError::BlobEndpoint)?;
    let node = md.node_name();
    let node = node.as_str();
    if !valid_node(node) {
        return Err(PublishError::NodeName);
    }
    let guid = |v: &str| {
        let parts: Vec<&str> = v.split('-').collect();
        parts.len() == 5
            && parts
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(p, l)| p.len() == l && p.chars().all(|c| c.is_ascii_hexdigit()))
    };
    let mut expects = BTreeMap::new();
    for (t, key) in [
        (tags::TAG_CONSUL_SERVERS, "consul-servers"),
        (tags::TAG_VAULT_SERVERS, "vault-servers"),
        (tags::TAG_NOMAD_SERVERS, "nomad-servers"),
    ] {
        if let Some(n) = tag(md, t).and_then(|v| v.parse::<u8>().ok()) {
            expects.insert(key.to_string(), n);
        }
    }
    let ip = md.primary_private_ip();
    Ok(Target {
        cluster: cluster.to_string(),
        blob_endpoint: if endpoint.ends_with('/') {
            endpoint.to_string()
        } else {
            format!("{endpoint}/")
        },
        node: node.to_string(),
        identity_client_id: tag(md, tags::TAG_IDENTITY_CLIENT_ID)
            .filter(|v| guid(v))
            .map(|v| v.to_ascii_lowercase()),
        ip: (!ip.is_empty()).then(|| ip.to_string()),
        role_tag: tag(md, tags::TAG_ROLE).map(String::from),
        expects,
    })
}

/// The document a node publishes.
pub fn document(t: &Target, record: &BootRecord, now_unix: i64) -> NodeRecord {
    let mut boot = record.clone();
    if boot.node.is_empty() {
        boot.node = t.node.clone();
    }
    if boot.cluster.is_none() {
        boot.cluster = Some(t.cluster.clone());
    }
    NodeRecord {
        format: FORMAT,
        boot,
        ip: t.ip.clone(),
        role_tag: t.role_tag.clone(),
        expects: t.expects.clone(),
        published_unix: now_unix,
    }
}

fn target_from_spec(spec: &NodeSpec, role_tag: &str) -> Option<Target> {
    let mut expects = BTreeMap::new();
    if let Some(n) = spec.consul_servers {
        expects.insert("consul-servers".into(), n);
    }
    if let Some(v) = &spec.vault {
        expects.insert("vault-servers".into(), v.servers);
    }
    if let Some(n) = spec.nomad.as_ref().and_then(|n| n.servers) {
        expects.insert("nomad-servers".into(), n);
    }
    Some(Target {
        cluster: spec.cluster.clone(),
        blob_endpoint: spec.blob_endpoint.clone(),
        node: spec.node_name.clone(),
        identity_client_id: spec.identity_client_id.clone(),
        ip: Some(spec.ip.to_string()),
        role_tag: Some(role_tag.to_string()),
        expects,
    })
}

async fn publish_inner(
    cfg: &AgentConfig,
    record: &BootRecord,
    spec: Option<&NodeSpec>,
    metadata: Option<&crate::imds::InstanceMetadata>,
) -> Result<String, PublishError> {
    let quick = RetryPolicy::imds(Duration::from_secs(4));
    let t = match (spec, metadata) {
        (Some(s), _) => target_from_spec(s, s.role.as_str()).ok_or(PublishError::NoBlobEndpoint)?,
        // A boot that failed after reading its metadata (e.g. a bad tag): publish from what it read.
        (None, Some(md)) => {
            let t = target(md)?;
            if !crate::node::blob_endpoint_allowed(
                &t.blob_endpoint,
                &md.compute.az_environment,
                cfg.azure.endpoints,
            ) {
                return Err(PublishError::ForeignBlobEndpoint);
            }
            t
        }
        (None, None) => return Err(PublishError::NoMetadata),
    };
    let credential = std::sync::Arc::new(crate::identity::ImdsCredential::new(
        ImdsClient::new(&cfg.imds.endpoint, quick),
        t.identity_client_id.clone(),
    ));
    let az = Azure::new(
        credential,
        cfg.azure.extra_ca_file.as_deref(),
        cfg.azure.verify_challenge_resource,
    )?;
    let name = record_blob_name(&t.cluster, &t.node);
    let doc = document(&t, record, time::OffsetDateTime::now_utc().unix_timestamp());
    let body = serde_json::to_vec_pretty(&doc).expect("record serialises");
    let blob = az.blob(&t.blob_endpoint, COORDINATION_CONTAINER, &name)?;
    let policy = RetryPolicy {
        deadline: Duration::from_secs(8),
        attempt_timeout: Duration::from_secs(4),
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(2),
    };
    call(policy, "publish boot record", || {
        let (blob, body) = (&blob, body.clone());
        async move {
            blob.upload(RequestContent::from(body), None)
                .await
                .map(|_| ())
        }
    })
    .await?;
    Ok(name)
}

/// Publishes `record` (best effort, bounded by [`DEADLINE`]); logs the outcome, never fails.
pub async fn publish(cfg: &AgentConfig, record: &BootRecord, spec: Option<&NodeSpec>) {
    publish_with(cfg, record, spec, None).await
}

/// Publishes the record of a boot that failed before its NodeSpec existed, from the metadata it read.
pub async fn publish_failure(
    cfg: &AgentConfig,
    record: &BootRecord,
    metadata: &crate::imds::InstanceMetadata,
) {
    publish_with(cfg, record, None, Some(metadata)).await
}

async fn publish_with(
    cfg: &AgentConfig,
    record: &BootRecord,
    spec: Option<&NodeSpec>,
    metadata: Option<&crate::imds::InstanceMetadata>,
) {
    match tokio::time::timeout(DEADLINE, publish_inner(cfg, record, spec, metadata)).await {
        Ok(Ok(name)) => tracing::info!(blob = %name, "boot record published"),
        // After a failed boot the failure itself is the one line an operator must see on stderr; the
        // record stays on local disk either way.
        Ok(Err(e)) if !record.ok => tracing::debug!(error = %e, "boot record not published"),
        Err(_) if !record.ok => {
            tracing::debug!(after = ?DEADLINE, "boot record not published: deadline")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "boot record not published"),
        Err(_) => tracing::warn!(after = ?DEADLINE, "boot record not published: deadline"),
    }
}

/// A publish running in the background while the boot goes on.
pub struct Publishing(tokio::task::JoinHandle<()>);

/// Starts publishing `record` in the background.
pub fn spawn(cfg: &AgentConfig, record: &BootRecord, spec: Option<&NodeSpec>) -> Publishing {
    let (cfg, record, spec) = (cfg.clone(), record.clone(), spec.cloned());
    Publishing(tokio::spawn(async move {
        publish(&cfg, &record, spec.as_ref()).await
    }))
}

impl Publishing {
    /// Lets the background publish finish (bounded), then publishes `newer` if given, so the later record is
    /// the one that stays.
    pub async fn then(
        self,
        cfg: &AgentConfig,
        newer: Option<&BootRecord>,
        spec: Option<&NodeSpec>,
    ) {
        let _ = tokio::time::timeout(DEADLINE, self.0).await;
        if let Some(r) = newer {
            publish(cfg, r, spec).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::{Compute, OsProfile, Tag};

    fn md(tags: &[(&str, &str)]) -> InstanceMetadata {
        InstanceMetadata {
            compute: Compute {
                name: "hs-consul_7".into(),
                os_profile: OsProfile {
                    computer_name: "consul-7".into(),
                },
                tags_list: tags
                    .iter()
                    .map(|(n, v)| Tag {
                        name: n.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn target_needs_only_cluster_and_blob_endpoint() {
        let t = target(&md(&[
            ("hashistack-role", "consul-sever"),
            ("hashistack-cluster", "prod"),
            (
                "hashistack-blob-endpoint",
                "https://hsx.blob.core.windows.net",
            ),
            ("hashistack-consul-servers", "3"),
        ]))
        .unwrap();
        assert_eq!(t.cluster, "prod");
        assert_eq!(t.blob_endpoint, "https://hsx.blob.core.windows.net/");
        assert_eq!(t.role_tag.as_deref(), Some("consul-sever"));
        assert_eq!(t.expects.get("consul-servers"), Some(&3));
        assert_eq!(
            record_blob_name(&t.cluster, &t.node),
            "prod/nodes/consul-7.json"
        );
    }

    #[test]
    fn no_target_without_a_valid_cluster_or_endpoint() {
        let e = target(&md(&[("hashistack-cluster", "prod")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hashistack-blob-endpoint"), "{e}");
        let e = target(&md(&[
            ("hashistack-cluster", "Prod!"),
            ("hashistack-blob-endpoint", "https://x/"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("hashistack-cluster"), "{e}");
        assert!(target(&md(&[
            ("hashistack-cluster", "prod"),
            ("hashistack-blob-endpoint", "http://x/"),
        ]))
        .is_err());
    }
}
