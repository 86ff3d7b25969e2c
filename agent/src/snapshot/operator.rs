//! The operator's side of snapshots: `snapshot list` and `snapshot restore`, with the operator's own identity (read
//! on the `snapshots` container, unwrap on `snapshot-wrap`: VM identities have neither).
//!
//! A restore reads the blob twice, pinned to one ETag: the first pass checks the header (magic, format, cluster,
//! tier, wrapping key) and authenticates every frame to the final one, sending nothing anywhere; only then the
//! second pass decrypts into the product's restore endpoint. A corrupt, truncated, wrong-tier or wrong-cluster
//! snapshot is refused with one line before the product is called.

use super::format::{self, FormatError, Header, OpenError, Opener};
use super::product::{self, Tier};
use super::SnapshotError;
use crate::azure::{call_strict as call, Azure, AzureError};
use crate::names::{SNAPSHOT_CONTAINER, SNAPSHOT_KEY};
use crate::retry::RetryPolicy;
use azure_core::Bytes;
use azure_storage_blob::models::{BlobClientDownloadOptions, BlobContainerClientListBlobsOptions};
use futures_util::StreamExt;
use std::num::NonZero;

/// One snapshot in the container (from its name and metadata; nothing is decrypted).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    pub blob: String,
    pub tier: String,
    pub created_unix: i64,
    pub index: u64,
    pub node: String,
    pub stored_bytes: u64,
    pub plaintext_bytes: Option<u64>,
}

/// Snapshots of `cluster` (one tier or all), oldest first.
pub async fn list(
    az: &Azure,
    blob_endpoint: &str,
    cluster: &str,
    tier: Option<Tier>,
    policy: RetryPolicy,
) -> Result<Vec<Listed>, AzureError> {
    let container = az.container(blob_endpoint, SNAPSHOT_CONTAINER)?;
    let prefix = match tier {
        Some(t) => format!("{cluster}/{}/", t.name()),
        None => format!("{cluster}/"),
    };
    call(policy, "snapshot list", || {
        let (container, prefix) = (&container, prefix.clone());
        async move {
            let opts = BlobContainerClientListBlobsOptions {
                prefix: Some(prefix),
                include: Some(vec![
                    azure_storage_blob::models::ListBlobsIncludeItem::Metadata,
                ]),
                ..Default::default()
            };
            let mut pager = container.list_blobs(Some(opts))?;
            let mut out = Vec::new();
            while let Some(item) = pager.next().await {
                let item = item?;
                let Some(name) = item.name.clone() else {
                    continue;
                };
                if !name.ends_with(".hsnap") {
                    continue;
                }
                let meta = item
                    .metadata
                    .as_ref()
                    .and_then(|m| m.values.clone())
                    .unwrap_or_default();
                let m = |k: &str| meta.get(k).cloned().unwrap_or_default();
                out.push(Listed {
                    tier: name.split('/').nth(1).unwrap_or("").to_string(),
                    created_unix: m("created").parse().unwrap_or(0),
                    index: m("index").parse().unwrap_or(0),
                    node: m("node"),
                    stored_bytes: item
                        .properties
                        .as_ref()
                        .and_then(|p| p.content_length)
                        .unwrap_or(0),
                    plaintext_bytes: m("plaintextbytes").parse().ok(),
                    blob: name,
                });
            }
            Ok(out)
        }
    })
    .await
    .map(|mut v| {
        v.sort_by(|a, b| a.blob.cmp(&b.blob));
        v
    })
}

/// Where the snapshot is read from and its key unwrapped: the operator's ARM outputs.
pub struct Store<'a> {
    pub az: &'a Azure,
    pub blob_endpoint: &'a str,
    /// The escrow vault's URI (it holds `snapshot-wrap`): the unwrap goes there, never to a host named by the blob.
    pub key_vault_uri: &'a str,
}

/// Where the snapshot goes: the tier's API (the leader's, or the Vault load balancer) and a token that may restore.
pub struct Target<'a> {
    pub tier: Tier,
    pub http: &'a reqwest::Client,
    pub api: &'a str,
    pub token: &'a str,
    /// Vault: `snapshot-force` (a snapshot of a tier rebuilt since, whose keyring differs).
    pub force: bool,
}

/// What was restored.
#[derive(Debug, Clone)]
pub struct Restored {
    pub blob: String,
    pub header: Header,
    pub plaintext_bytes: u64,
}

async fn stream(
    store: &Store<'_>,
    blob: &str,
    etag: Option<&azure_core::http::Etag>,
    policy: RetryPolicy,
) -> Result<
    (
        azure_storage_blob::models::BlobClientDownloadResult,
        Option<azure_core::http::Etag>,
    ),
    AzureError,
> {
    let client = store
        .az
        .blob(store.blob_endpoint, SNAPSHOT_CONTAINER, blob)?;
    let r = call(policy, "snapshot read", || {
        let client = &client;
        let opts = BlobClientDownloadOptions {
            if_match: etag.cloned(),
            parallel: NonZero::new(1),
            partition_size: NonZero::new(1 << 20),
            ..Default::default()
        };
        async move { client.download(Some(opts)).await }
    })
    .await?;
    let tag = r.properties.etag.clone();
    Ok((r, tag))
}

fn refused(blob: &str, why: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Refused(format!("snapshot {blob} refused: {why}"))
}

/// Reads the header from the first bytes of `body`: the header, its encoded bytes, and the bytes after it.
async fn read_header(
    blob: &str,
    body: &mut azure_core::http::AsyncResponseBody,
) -> Result<(Header, Vec<u8>, Vec<u8>), SnapshotError> {
    let mut prefix = Vec::new();
    loop {
        if let Some((h, at)) = format::parse_header(&prefix).map_err(|e| refused(blob, e))? {
            let rest = prefix.split_off(at);
            return Ok((h, prefix, rest));
        }
        match body.next().await {
            Some(Ok(b)) => prefix.extend_from_slice(&b),
            Some(Err(e)) => return Err(AzureError::from_sdk("snapshot read", &e).into()),
            None => return Err(refused(blob, FormatError::Truncated)),
        }
    }
}

/// The newest snapshot of `tier` (by name: names sort by time).
pub async fn latest(
    store: &Store<'_>,
    cluster: &str,
    tier: Tier,
    policy: RetryPolicy,
) -> Result<String, SnapshotError> {
    let all = list(store.az, store.blob_endpoint, cluster, Some(tier), policy).await?;
    all.last().map(|l| l.blob.clone()).ok_or_else(|| {
        SnapshotError::Refused(format!(
            "no snapshot of {cluster}/{} in the container",
            tier.name()
        ))
    })
}

/// Checks the whole snapshot, then restores it. See the module's documentation.
pub async fn restore(
    store: &Store<'_>,
    cluster: &str,
    blob: &str,
    target: &Target<'_>,
    policy: RetryPolicy,
) -> Result<Restored, SnapshotError> {
    // Pass 1: header, key, every frame. Nothing leaves this process.
    let (mut first, etag) = stream(store, blob, None, policy).await?;
    let (header, encoded, rest) = read_header(blob, &mut first.body).await?;
    let tier = target.tier.name();
    if header.cluster != cluster || header.tier != tier {
        return Err(refused(
            blob,
            format!(
                "it is a snapshot of {}/{}, not of {cluster}/{tier}",
                header.cluster, header.tier
            ),
        ));
    }
    // kek_id: https://<vault>/keys/<name>/<version>. Only the name and version are taken from it.
    let mut parts = header.kek_id.trim_end_matches('/').rsplit('/');
    let (version, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if name != SNAPSHOT_KEY || version.is_empty() {
        return Err(refused(
            blob,
            format!(
                "its data key is wrapped by {:?}, not by {SNAPSHOT_KEY}",
                header.kek_id
            ),
        ));
    }
    use base64::Engine;
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(&header.wrapped_key)
        .map_err(|_| refused(blob, "its wrapped key is not base64"))?;
    let key = crate::escrow::operator::unwrap_key(
        store.az,
        store.key_vault_uri,
        name,
        version,
        &wrapped,
        "snapshot key unwrap",
        policy,
    )
    .await
    .map_err(|e| match e {
        crate::escrow::operator::OpenError::Azure(a) if a.is(400) => refused(
            blob,
            "Key Vault cannot unwrap its data key (altered or wrong key)",
        ),
        other => SnapshotError::Open(other),
    })?;
    let mut check = Opener::new(&key, &header, &encoded)?;
    let mut discard = |_: &[u8]| Ok::<(), std::convert::Infallible>(());
    let fail = |e: OpenError<std::convert::Infallible>| match e {
        OpenError::Format(f) => refused(blob, f),
        OpenError::Sink(never) => match never {},
    };
    check.push(&rest, &mut discard).map_err(fail)?;
    while let Some(b) = first.body.next().await {
        let b = b.map_err(|e| AzureError::from_sdk("snapshot read", &e))?;
        check.push(&b, &mut discard).map_err(fail)?;
    }
    let plaintext_bytes = check.finish().map_err(|e| refused(blob, e))?;
    drop(first);

    // Pass 2: the same bytes (If-Match), decrypted into the product's restore endpoint.
    let (mut second, _) = stream(store, blob, etag.as_ref(), policy).await?;
    let header_out = header.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    }));
    let feed = async move {
        let r: Result<(), SnapshotError> = async {
            let (h2, encoded2, rest) = read_header(blob, &mut second.body).await?;
            if encoded2 != encoded || h2 != header {
                return Err(refused(
                    blob,
                    "it changed between the check and the restore",
                ));
            }
            let mut open = Opener::new(&key, &header, &encoded)?;
            let mut out: Vec<Bytes> = Vec::new();
            let mut collect = |p: &[u8]| {
                out.push(Bytes::copy_from_slice(p));
                Ok::<(), std::convert::Infallible>(())
            };
            open.push(&rest, &mut collect).map_err(fail)?;
            for b in out.drain(..) {
                if tx.send(Ok(b)).await.is_err() {
                    return Err(SnapshotError::Other(
                        "the product closed the restore".into(),
                    ));
                }
            }
            while let Some(b) = second.body.next().await {
                let b = b.map_err(|e| AzureError::from_sdk("snapshot read", &e))?;
                let mut collect = |p: &[u8]| {
                    out.push(Bytes::copy_from_slice(p));
                    Ok::<(), std::convert::Infallible>(())
                };
                open.push(&b, &mut collect).map_err(fail)?;
                for b in out.drain(..) {
                    if tx.send(Ok(b)).await.is_err() {
                        return Err(SnapshotError::Other(
                            "the product closed the restore".into(),
                        ));
                    }
                }
            }
            open.finish().map_err(|e| refused(blob, e))?;
            Ok(())
        }
        .await;
        if let Err(e) = &r {
            // Abort the upload: the product must not take a partial stream as a snapshot.
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
        r
    };
    let (fed, restored) = tokio::join!(
        feed,
        product::restore(
            target.tier,
            target.http,
            target.api,
            target.token,
            target.force,
            body
        )
    );
    fed?;
    restored?;
    Ok(Restored {
        blob: blob.to_string(),
        header: header_out,
        plaintext_bytes,
    })
}
