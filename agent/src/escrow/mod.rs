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

/// Proof that an escrowed object was written (non-secret; kept in the coordination state). It pins the exact
/// version written: `escrow open` and `escrow verify` fetch that version and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub target: ReceiptTarget,
    /// `escrow/<blob path>` or the Key Vault secret name.
    pub object: String,
    /// Blob: the version id Azure answered (`x-ms-version-id`; empty where the account keeps no versions, as
    /// Azurite). Key Vault: the secret version (the last segment of setSecret's `id`).
    pub version: String,
    /// Blob: the ETag of what we wrote (the pin where no version id exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The escrow this receipt belongs to (absent in receipts written before receipts pinned versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escrow_id: Option<String>,
    pub ciphertext_sha256: String,
    pub written_unix: i64,
}

/// Where a copy of an escrow is kept. Receipts store it as `"blob"` / `"keyvault"` (the names stored receipts
/// have always used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ReceiptTarget {
    /// The storage account's escrow container.
    #[serde(rename = "blob")]
    Blob,
    /// The escrow Key Vault's secret.
    #[serde(rename = "keyvault")]
    Keyvault,
}

impl ReceiptTarget {
    /// Both targets, in the order `escrow open` tries them.
    pub const ALL: [ReceiptTarget; 2] = [ReceiptTarget::Blob, ReceiptTarget::Keyvault];

    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptTarget::Blob => "blob",
            ReceiptTarget::Keyvault => "keyvault",
        }
    }
}

impl std::fmt::Display for ReceiptTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Receipt {
    /// Whether this receipt records (a copy of) the escrow `escrow_id`.
    pub fn is_for(&self, escrow_id: &str) -> bool {
        match &self.escrow_id {
            Some(id) => id == escrow_id,
            // Older receipts named the escrow id in the object.
            None => self.object.contains(escrow_id),
        }
    }
}

/// Why an escrow upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    /// The fresh, never-published name we tried to create already exists: someone else wrote it. It is never
    /// taken as our own upload.
    #[error("escrow blob {name} already exists and was not written by this upload (a conflicting name: see the storage account's audit log)")]
    Conflict { name: String },
    /// The service answered without what the receipt must pin.
    #[error("{what}: the answer lacks {missing}; nothing can be pinned")]
    Unpinnable {
        what: &'static str,
        missing: &'static str,
    },
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
    let (key, kek_id, wrapped) = wrap_fresh_key(
        az,
        &t.escrow_vault_uri,
        ESCROW_KEY_NAME,
        "escrow key wrap",
        policy,
    )
    .await?;
    Ok(Prepared {
        escrow_id: new_escrow_id(),
        key,
        kek_id,
        wrapped,
    })
}

/// A fresh data key, wrapped (RSA-OAEP-256) by the Key Vault key `key_name` of `vault_uri`: the key, the wrapping
/// key's id (with its version) and the wrapped bytes. Needs only the wrap permission on that key.
pub async fn wrap_fresh_key(
    az: &Azure,
    vault_uri: &str,
    key_name: &str,
    what: &str,
    policy: RetryPolicy,
) -> Result<(DataKey, String, Vec<u8>), AzureError> {
    let keys = az.keys(vault_uri)?;
    let key = DataKey::generate();
    let result = call(policy, what, || {
        let params = KeyOperationParameters {
            algorithm: Some(EncryptionAlgorithm::RsaOaep256),
            value: Some(key.bytes().to_vec()),
            ..Default::default()
        };
        let keys = &keys;
        async move {
            let body: RequestContent<KeyOperationParameters> = params.try_into()?;
            keys.wrap_key(key_name, body, None).await?.into_model()
        }
    })
    .await?;
    let kek_id = result.kid.clone().unwrap_or_default();
    let wrapped = result.result.clone().unwrap_or_default();
    if kek_id.is_empty() || wrapped.is_empty() {
        return Err(AzureError {
            what: what.into(),
            status: None,
            code: None,
            detail: "response lacks kid or value".into(),
        });
    }
    Ok((key, kek_id, wrapped))
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

/// The blob path of one upload attempt: `<cluster>/<tier>/<escrow id>-<nonce>.json`. The nonce is fresh for
/// every attempt and published only in the receipt, after the upload, so a name that already exists can only
/// be someone else's object: a 409 is a conflict, never "our earlier attempt landed".
pub fn blob_name(env: &Envelope, nonce: &str) -> String {
    format!(
        "{}/{}/{}-{nonce}.json",
        env.cluster, env.tier, env.escrow_id
    )
}

/// The prefix every escrow blob of a tier lives under (the tier's role assignment is limited to it).
pub fn tier_prefix(cluster: &str, tier: &str) -> String {
    format!("{cluster}/{tier}/")
}

fn nonce() -> String {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    hex::encode(b)
}

/// The tier's escrow secret in the escrow Key Vault: one secret per tier, `<cluster>-<tier>-escrow`, created by the
/// ARM template with the tier's identity allowed to set it and nothing else. Every escrow is a new version of it;
/// receipts pin the version.
pub fn tier_secret_name(cluster: &str, tier: &str) -> String {
    // Key Vault secret names: 1-127 alphanumerics and dashes.
    format!("{cluster}-{tier}-escrow")
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-")
}

pub fn secret_name(env: &Envelope) -> String {
    tier_secret_name(&env.cluster, &env.tier)
}

/// Create-only upload to the `escrow` container under a fresh name per attempt (see [`blob_name`]); the receipt
/// pins the version id (and ETag) Azure answered. An answer lost in transit leaves an orphan copy of the same
/// envelope under the attempt's name; the receipt names only the copy whose answer arrived.
pub async fn upload_blob(
    az: &Azure,
    t: &Targets,
    env: &Envelope,
    policy: RetryPolicy,
) -> Result<Receipt, UploadError> {
    upload_blob_with(az, t, env, policy, nonce).await
}

/// [`upload_blob`] with the attempt names' nonce source injected (tests name the attempt to collide with).
pub async fn upload_blob_with(
    az: &Azure,
    t: &Targets,
    env: &Envelope,
    policy: RetryPolicy,
    mut next_nonce: impl FnMut() -> String,
) -> Result<Receipt, UploadError> {
    use azure_storage_blob::models::BlobClientUploadResult;
    let body = env.to_json();
    let tried = std::cell::RefCell::new(String::new());
    let r: Result<BlobClientUploadResult, AzureError> = call(policy, "escrow blob upload", || {
        let name = blob_name(env, &next_nonce());
        *tried.borrow_mut() = name.clone();
        let body = body.clone();
        let blob = az.blob(&t.blob_endpoint, ESCROW_CONTAINER, &name);
        async move {
            let blob = blob.map_err(|e| {
                azure_core::Error::with_message(azure_core::error::ErrorKind::Other, e.to_string())
            })?;
            let opts = BlobClientUploadOptions::default().if_not_exists();
            blob.upload(RequestContent::from(body), Some(opts)).await
        }
    })
    .await;
    let name = tried.into_inner();
    let answer = match r {
        Ok(a) => a,
        Err(e) if e.is(409) => {
            tracing::error!(object = %name, "escrow blob name conflict: the fresh name already exists; not taken as our upload");
            return Err(UploadError::Conflict {
                name: format!("{ESCROW_CONTAINER}/{name}"),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let etag = answer.etag.as_ref().map(|e| e.to_string());
    if etag.is_none() && answer.version_id.is_none() {
        return Err(UploadError::Unpinnable {
            what: "escrow blob upload",
            missing: "both an ETag and a version id",
        });
    }
    Ok(Receipt {
        target: ReceiptTarget::Blob,
        object: format!("{ESCROW_CONTAINER}/{name}"),
        version: answer.version_id.clone().unwrap_or_default(),
        etag,
        escrow_id: Some(env.escrow_id.clone()),
        ciphertext_sha256: env.ciphertext_sha256(),
        written_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
    })
}

/// Writes the envelope as a new version of the tier's escrow secret (setSecret permission only); the receipt pins
/// the version Key Vault answered.
pub async fn upload_keyvault(
    az: &Azure,
    t: &Targets,
    env: &Envelope,
    policy: RetryPolicy,
) -> Result<Receipt, UploadError> {
    let secrets = az.secrets(&t.escrow_vault_uri)?;
    let name = secret_name(env);
    let value = Zeroizing::new(String::from_utf8(env.to_json()).expect("JSON is UTF-8"));
    let bundle = call(policy, "escrow key vault write", || {
        let params = SetSecretParameters {
            value: Some(value.to_string()),
            content_type: Some(ESCROW_CONTENT_TYPE.into()),
            ..Default::default()
        };
        let (secrets, name) = (&secrets, &name);
        async move {
            let body: RequestContent<SetSecretParameters> = params.try_into()?;
            secrets.set_secret(name, body, None).await?.into_model()
        }
    })
    .await?;
    let version =
        bundle
            .id
            .as_deref()
            .and_then(secret_version_of)
            .ok_or(UploadError::Unpinnable {
                what: "escrow key vault write",
                missing: "the secret version (id)",
            })?;
    Ok(Receipt {
        target: ReceiptTarget::Keyvault,
        object: name,
        version,
        etag: None,
        escrow_id: Some(env.escrow_id.clone()),
        ciphertext_sha256: env.ciphertext_sha256(),
        written_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
    })
}

/// The content type of escrow secrets (a template's placeholder version has another).
pub const ESCROW_CONTENT_TYPE: &str = "application/vnd.hashistack.escrow+json";

/// The version of a secret id `https://<vault>/secrets/<name>/<version>`; `None` when it names no version.
pub fn secret_version_of(id: &str) -> Option<String> {
    let path = id.split_once("/secrets/")?.1;
    let mut parts = path.trim_end_matches('/').split('/');
    let (_name, version) = (parts.next()?, parts.next()?);
    (!version.is_empty() && parts.next().is_none()).then(|| version.to_string())
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

/// Create-only upload of a superseded bootstrap's envelope (bootstrap/driver.rs: a stale spool) to
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

    fn env(escrow_id: &str) -> Envelope {
        Envelope {
            format: 1,
            escrow_id: escrow_id.into(),
            cluster: "hs".into(),
            tier: "vault".into(),
            created_unix: 0,
            kek_id: String::new(),
            wrap_alg: "RSA-OAEP-256".into(),
            wrapped_key: String::new(),
            nonce: String::new(),
            ciphertext: "Y2lwaGVy".into(),
        }
    }

    #[test]
    fn blob_names_carry_a_fresh_nonce_under_the_tier_prefix() {
        let e = env("1700000000-0011223344556677");
        let (a, b) = (blob_name(&e, &nonce()), blob_name(&e, &nonce()));
        assert_ne!(a, b, "every attempt writes a name of its own");
        for n in [&a, &b] {
            assert!(n.starts_with(&tier_prefix("hs", "vault")), "{n}");
            assert!(
                n.starts_with("hs/vault/1700000000-0011223344556677-"),
                "{n}"
            );
            assert!(n.ends_with(".json"), "{n}");
        }
        // The name published with the escrow id alone (what an attacker can predict) is never the one written.
        assert_ne!(a, "hs/vault/1700000000-0011223344556677.json");
    }

    #[test]
    fn one_key_vault_secret_per_tier_named_as_the_template_creates_it() {
        assert_eq!(tier_secret_name("hs", "vault"), "hs-vault-escrow");
        assert_eq!(
            secret_name(&env("a")),
            secret_name(&env("b")),
            "escrows are versions of one secret"
        );
        assert_eq!(tier_secret_name("my_cl", "nomad"), "my-cl-nomad-escrow");
    }

    #[test]
    fn secret_versions_are_read_from_the_id_setsecret_answers() {
        assert_eq!(
            secret_version_of("https://kve.vault.azure.net/secrets/hs-vault-escrow/0123abcd")
                .as_deref(),
            Some("0123abcd")
        );
        assert_eq!(
            secret_version_of("https://kve.vault.azure.net/secrets/hs-vault-escrow"),
            None
        );
        assert_eq!(
            secret_version_of("https://kve.vault.azure.net/secrets/hs-vault-escrow/"),
            None
        );
        assert_eq!(
            secret_version_of("https://kve.vault.azure.net/keys/k/v"),
            None
        );
    }

    #[test]
    fn receipts_pin_and_older_receipts_still_parse() {
        let old = r#"{"target":"blob","object":"escrow/hs/vault/1700-aa.json","version":"","ciphertext_sha256":"00","written_unix":1}"#;
        let r: Receipt = serde_json::from_str(old).unwrap();
        assert_eq!((r.etag.as_deref(), r.escrow_id.as_deref()), (None, None));
        assert!(r.is_for("1700-aa") && !r.is_for("1700-bb"));
        let new = Receipt {
            etag: Some("\"0x1\"".into()),
            escrow_id: Some("1700-bb".into()),
            ..r
        };
        let back: Receipt = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
        assert!(back.is_for("1700-bb") && !back.is_for("1700-aa"));
        // A receipt's escrow id decides, not a name that happens to contain another id.
        let tricky = Receipt {
            object: "escrow/hs/vault/1700-aa-x.json".into(),
            ..back
        };
        assert!(!tricky.is_for("1700-aa"));
    }

    #[test]
    fn receipt_targets_keep_their_stored_names() {
        // A tier state's receipts as an earlier agent stored them (coordination/<cluster>/<tier>.json).
        let stored = r#"[{"target":"blob","object":"escrow/hs/vault/1700-aa.json","version":"","etag":"\"0x8D\"","escrow_id":"1700-aa","ciphertext_sha256":"00","written_unix":1},{"target":"keyvault","object":"hs-vault-escrow","version":"0123abcd","escrow_id":"1700-aa","ciphertext_sha256":"00","written_unix":2}]"#;
        let receipts: Vec<Receipt> = serde_json::from_str(stored).unwrap();
        assert_eq!(
            receipts.iter().map(|r| r.target).collect::<Vec<_>>(),
            ReceiptTarget::ALL
        );
        assert_eq!(serde_json::to_string(&receipts).unwrap(), stored);
        for t in ReceiptTarget::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert!(serde_json::from_str::<ReceiptTarget>(r#""disk""#).is_err());
    }
}
