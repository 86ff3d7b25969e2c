//! Escrow of bootstrap secrets: envelope-encrypted, spooled to local disk (0600, fsynced) before upload,
//! then written create-only to Blob Storage and to the escrow Key Vault. A VM identity may write there but
//! never read; operators recover with `hashistack-agent escrow open`.

pub mod envelope;
pub mod operator;
pub mod pgp;

use crate::azure::{call, Azure, AzureError};
use crate::files::{self, FileSpec, Owner};
use crate::retry::RetryPolicy;
use azure_core::http::RequestContent;
use azure_security_keyvault_keys::models::{EncryptionAlgorithm, KeyOperationParameters};
use azure_security_keyvault_secrets::models::SetSecretParameters;
use azure_storage_blob::models::BlobClientUploadOptions;
use envelope::{DataKey, Envelope};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

pub const ESCROW_CONTAINER: &str = "escrow";
pub const ESCROW_KEY_NAME: &str = "escrow-wrap";

/// Where escrow goes: the storage account and the write-only escrow vault.
#[derive(Debug, Clone)]
pub struct Targets {
    pub blob_endpoint: String,
    pub escrow_vault_uri: String,
}

/// Proof that an escrowed object was written (non-secret; kept in the coordination state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// "blob" or "keyvault"
    pub target: String,
    /// Blob path or Key Vault secret name.
    pub object: String,
    /// Blob ETag or Key Vault secret version.
    pub version: String,
    pub ciphertext_sha256: String,
    pub written_unix: i64,
}

/// A data key wrapped by the escrow key, ready before the secrets exist (so nothing after init needs the network
/// before the secrets are safe on local disk).
pub struct Prepared {
    pub escrow_id: String,
    pub key: DataKey,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("escrow_id", &self.escrow_id)
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

pub fn new_escrow_id() -> String {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    format!(
        "{}-{}",
        time::OffsetDateTime::now_utc().unix_timestamp(),
        hex::encode(b)
    )
}

pub fn policy() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_secs(120),
        attempt_timeout: Duration::from_secs(20),
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(10),
    }
}

/// Wraps a fresh data key with the escrow key (wrap permission only).
pub async fn prepare(az: &Azure, t: &Targets, policy: RetryPolicy) -> Result<Prepared, AzureError> {
    let keys = az.keys(&t.escrow_vault_uri)?;
    let key = DataKey::generate();
    let result = call(policy, "escrow key wrap", || {
        let params = KeyOperationParameters {
            algorithm: Some(EncryptionAlgorithm::RsaOaep256),
            value: Some(key.bytes().to_vec()),
            ..Default::default()
        };
        let keys = &keys;
        async move {
            let body: RequestContent<KeyOperationParameters> = params.try_into()?;
            keys.wrap_key(ESCROW_KEY_NAME, body, None)
                .await?
                .into_model()
        }
    })
    .await?;
    let kek_id = result.kid.clone().unwrap_or_default();
    let wrapped = result.result.clone().unwrap_or_default();
    if kek_id.is_empty() || wrapped.is_empty() {
        return Err(AzureError {
            what: "escrow key wrap".into(),
            status: None,
            code: None,
            detail: "response lacks kid or value".into(),
        });
    }
    Ok(Prepared {
        escrow_id: new_escrow_id(),
        key,
        kek_id,
        wrapped,
    })
}

/// Writes the envelope to the local spool `spool_dir` (`Layout::spool_dir`: on the data disk) — 0600, fsynced,
/// atomic — before any upload.
pub fn spool(spool_dir: &Path, env: &Envelope) -> Result<PathBuf, files::FileError> {
    let path = spool_dir.join(format!("{}-{}.json", env.tier, env.escrow_id));
    files::ensure_dir(&files::DirSpec {
        path: spool_dir.to_path_buf(),
        mode: 0o700,
        owner: Owner::Current,
    })?;
    files::write_atomic(&FileSpec {
        path: path.clone(),
        content: env.to_json(),
        mode: 0o600,
        owner: Owner::Current,
        secret: false,
    })?;
    Ok(path)
}

/// Envelopes still waiting for upload (a crash between spool and receipt).
pub fn pending(spool_dir: &Path) -> Vec<(PathBuf, Envelope)> {
    let Ok(rd) = std::fs::read_dir(spool_dir) else {
        return vec![];
    };
    let mut v: Vec<_> = rd
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            Some((
                e.path(),
                serde_json::from_slice::<Envelope>(&std::fs::read(e.path()).ok()?).ok()?,
            ))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn blob_name(env: &Envelope) -> String {
    format!("{}/{}/{}.json", env.cluster, env.tier, env.escrow_id)
}

pub fn secret_name(env: &Envelope) -> String {
    // Key Vault secret names: 1-127 alphanumerics and dashes.
    format!("{}-{}-{}", env.cluster, env.tier, env.escrow_id)
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-")
}

/// Create-only upload to the `escrow` container. A 409 for our own unique name means an earlier attempt
/// (whose answer was lost) already wrote it.
pub async fn upload_blob(
    az: &Azure,
    t: &Targets,
    env: &Envelope,
    policy: RetryPolicy,
) -> Result<Receipt, AzureError> {
    let name = blob_name(env);
    let blob = az.blob(&t.blob_endpoint, ESCROW_CONTAINER, &name)?;
    let body = env.to_json();
    let r = call(policy, "escrow blob upload", || {
        let blob = &blob;
        let body = body.clone();
        async move {
            let opts = BlobClientUploadOptions::default().if_not_exists();
            blob.upload(RequestContent::from(body), Some(opts))
                .await
                .map(|_| ())
        }
    })
    .await;
    match r {
        Ok(()) => {}
        Err(e) if e.is(409) => {
            tracing::info!(object = %name, "escrow blob already present (earlier attempt landed)")
        }
        Err(e) => return Err(e),
    }
    Ok(Receipt {
        target: "blob".into(),
        object: format!("{ESCROW_CONTAINER}/{name}"),
        version: String::new(),
        ciphertext_sha256: env.ciphertext_sha256(),
        written_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
    })
}

/// Writes the envelope as a new secret in the escrow vault (setSecret permission only).
pub async fn upload_keyvault(
    az: &Azure,
    t: &Targets,
    env: &Envelope,
    policy: RetryPolicy,
) -> Result<Receipt, AzureError> {
    let secrets = az.secrets(&t.escrow_vault_uri)?;
    let name = secret_name(env);
    let value = String::from_utf8(env.to_json()).expect("JSON is UTF-8");
    let bundle = call(policy, "escrow key vault write", || {
        let params = SetSecretParameters {
            value: Some(value.clone()),
            content_type: Some("application/vnd.hashistack.escrow+json".into()),
            ..Default::default()
        };
        let (secrets, name) = (&secrets, &name);
        async move {
            let body: RequestContent<SetSecretParameters> = params.try_into()?;
            secrets.set_secret(name, body, None).await?.into_model()
        }
    })
    .await?;
    let version = bundle
        .id
        .as_deref()
        .and_then(|id| id.rsplit('/').next())
        .unwrap_or("")
        .to_string();
    Ok(Receipt {
        target: "keyvault".into(),
        object: name,
        version,
        ciphertext_sha256: env.ciphertext_sha256(),
        written_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
    })
}

/// Secrets to escrow, serialised once into a zeroizing buffer that never reallocates: its size is counted
/// first, and it has room for the AEAD tag, so sealing it in place ([`envelope::seal`]) does not move the
/// plaintext either (a growing `Vec` leaves copies of what it held in the allocations it frees).
pub fn payload(value: &impl Serialize) -> Zeroizing<Vec<u8>> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    serde_json::to_writer(&mut n, value).expect("payload serialises");
    let mut buf = Zeroizing::new(Vec::with_capacity(n.0 + envelope::TAG_LEN));
    serde_json::to_writer(&mut *buf, value).expect("payload serialises");
    buf
}

/// Where a spooled envelope of a superseded bootstrap goes: beside the tier's escrows, under `orphans/`, so
/// nothing that reads the tier's escrow by its state ever takes it for the live one.
pub fn orphan_blob_name(env: &Envelope) -> String {
    format!(
        "{}/{}/orphans/{}.json",
        env.cluster, env.tier, env.escrow_id
    )
}

/// Create-only upload of a superseded bootstrap's envelope (bootstrap/mod.rs: a stale spool) to
/// `escrow/<cluster>/<tier>/orphans/<escrow id>.json`, marked with the metadata `hashistack_orphan=true`.
/// A 409 is an earlier attempt of the same upload (the name is the envelope's own escrow id). Returns the
/// object's path.
pub async fn upload_orphan(
    az: &Azure,
    t: &Targets,
    env: &Envelope,
    policy: RetryPolicy,
) -> Result<String, AzureError> {
    let name = orphan_blob_name(env);
    let blob = az.blob(&t.blob_endpoint, ESCROW_CONTAINER, &name)?;
    let body = env.to_json();
    let r = call(policy, "escrow orphan upload", || {
        let blob = &blob;
        let body = body.clone();
        async move {
            let opts = BlobClientUploadOptions {
                metadata: Some(
                    [("hashistack_orphan".to_string(), "true".to_string())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            }
            .if_not_exists();
            blob.upload(RequestContent::from(body), Some(opts))
                .await
                .map(|_| ())
        }
    })
    .await;
    match r {
        Ok(()) => {}
        Err(e) if e.is(409) => {
            tracing::info!(object = %name, "orphaned escrow already present (earlier attempt landed)")
        }
        Err(e) => return Err(e),
    }
    Ok(format!("{ESCROW_CONTAINER}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_serialised_without_reallocating_and_with_room_for_the_tag() {
        #[derive(serde::Serialize)]
        struct S {
            root_token: String,
            keys: Vec<String>,
        }
        let v = S {
            root_token: "s.".to_string() + &"x".repeat(300),
            keys: (0..5)
                .map(|i| format!("key-{i}-{}", "y".repeat(40)))
                .collect(),
        };
        let p = payload(&v);
        assert_eq!(p.as_slice(), serde_json::to_vec(&v).unwrap().as_slice());
        // Exactly the counted size plus the tag: a Vec that had grown would have a rounded-up capacity.
        assert_eq!(p.capacity(), p.len() + envelope::TAG_LEN);
    }
}
