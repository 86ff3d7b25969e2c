//! The operator's side of escrow: `escrow open` (fetch, unwrap with the operator's own identity, decrypt)
//! and `escrow verify` (every receipt has its object; nothing decrypted). VM identities cannot do either: they
//! may write escrow and wrap, never read or unwrap.
//!
//! Both fetch exactly the versions the receipts pin (blob version id, else the ETag; Key Vault secret version),
//! check that the object is the tier's and cluster's escrow the state names and that its ciphertext hash is the
//! receipt's, and warn when a newer version of the object exists (written after the escrow: a forgery, or
//! a redeployment's placeholder). `open` falls back to the other target when one cannot be fetched, checked or
//! decrypted.

use super::envelope::{self, DataKey, Envelope};
use super::{secret_version_of, Receipt, ReceiptTarget, Targets, ESCROW_CONTAINER};
use crate::azure::{call_strict as call, Azure, AzureError};
use crate::coordination::{self, TierState};
use crate::retry::RetryPolicy;
use azure_core::http::RequestContent;
use azure_security_keyvault_keys::models::{EncryptionAlgorithm, KeyOperationParameters};
use azure_security_keyvault_secrets::models::SecretClientGetSecretOptions;
use azure_storage_blob::models::{BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders};
use serde::Serialize;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    #[error("{0}")]
    Envelope(#[from] envelope::EnvelopeError),
    #[error("{tier}: {message}")]
    Missing { tier: String, message: String },
    /// Every pinned copy failed; one reason per target.
    #[error("{tier}: no escrowed copy could be opened: {}", reasons.join("; "))]
    Unusable { tier: String, reasons: Vec<String> },
}

pub const TIERS: [&str; 3] = ["consul", "vault", "nomad"];

/// Why a tier's state pins no escrow copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpinned {
    #[error("no escrow id recorded")]
    NoEscrowId,
    #[error("no receipt names escrow {0}")]
    NoReceipt(String),
}

/// Why one pinned copy could not be used: it could not be fetched, is not the escrow the state names, or did
/// not open. Never carries the object's content.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    #[error("{0}")]
    Envelope(#[from] envelope::EnvelopeError),
    /// serde's message names the field, never its value.
    #[error("the object does not parse as an escrow envelope: {0}")]
    Unparsable(serde_json::Error),
    #[error(
        "{object} no longer holds the pinned content (its ETag is no longer {etag}) and the account keeps no \
         versions to read the pinned one"
    )]
    Replaced { object: String, etag: String },
    #[error("{0}: the receipt pins no secret version")]
    NoSecretVersion(String),
    #[error("{object}: Key Vault answered version {answered} for the pinned {pinned}")]
    OtherVersion {
        object: String,
        answered: String,
        pinned: String,
    },
    #[error("the object is cluster {found:?}'s escrow, not {want:?}'s")]
    OtherCluster { found: String, want: String },
    #[error("the object is tier {found:?}'s escrow, not {want:?}'s")]
    OtherTier { found: String, want: String },
    #[error("the object is escrow {found:?}, the state names {want:?}")]
    OtherEscrow { found: String, want: String },
    #[error("ciphertext differs from the receipt ({found} != {want})")]
    OtherCiphertext { found: String, want: String },
    /// The data key's unwrap.
    #[error("{0}")]
    Unwrap(#[from] OpenError),
}

/// The receipts of the escrow the state names, blob first (the order `open` tries them in).
pub fn pinned_receipts(state: &TierState) -> Result<Vec<Receipt>, Unpinned> {
    let id = state.escrow_id.as_deref().ok_or(Unpinned::NoEscrowId)?;
    let mut v: Vec<Receipt> = state
        .receipts
        .iter()
        .filter(|r| r.is_for(id))
        .cloned()
        .collect();
    if v.is_empty() {
        return Err(Unpinned::NoReceipt(id.to_string()));
    }
    v.sort_by_key(|r| r.target);
    Ok(v)
}

/// The checks on a fetched object: it is the escrow `escrow_id` of `cluster`/`tier`, and its ciphertext is the
/// one the receipt recorded.
pub fn check_envelope(
    env: &Envelope,
    cluster: &str,
    tier: &str,
    escrow_id: &str,
    receipt: &Receipt,
) -> Result<(), CopyError> {
    if env.cluster != cluster {
        return Err(CopyError::OtherCluster {
            found: env.cluster.clone(),
            want: cluster.into(),
        });
    }
    if env.tier != tier {
        return Err(CopyError::OtherTier {
            found: env.tier.clone(),
            want: tier.into(),
        });
    }
    if env.escrow_id != escrow_id {
        return Err(CopyError::OtherEscrow {
            found: env.escrow_id.clone(),
            want: escrow_id.into(),
        });
    }
    let sha = env.ciphertext_sha256();
    if sha != receipt.ciphertext_sha256 {
        return Err(CopyError::OtherCiphertext {
            found: sha,
            want: receipt.ciphertext_sha256.clone(),
        });
    }
    Ok(())
}

/// One pinned object, fetched: the envelope (if it parsed) and what was seen beside it.
struct Fetched {
    env: Result<Envelope, CopyError>,
    /// Newer versions and other findings for the operator.
    warnings: Vec<String>,
}

fn parse(bytes: &[u8]) -> Result<Envelope, CopyError> {
    serde_json::from_slice(bytes).map_err(CopyError::Unparsable)
}

/// Fetches exactly the version `r` pins, and looks for newer versions of the same object.
async fn fetch_pinned(az: &Azure, t: &Targets, r: &Receipt, policy: RetryPolicy) -> Fetched {
    match r.target {
        ReceiptTarget::Blob => fetch_blob(az, t, r, policy).await,
        ReceiptTarget::Keyvault => fetch_secret(az, t, r, policy).await,
    }
}

async fn fetch_blob(az: &Azure, t: &Targets, r: &Receipt, policy: RetryPolicy) -> Fetched {
    let mut warnings = Vec::new();
    let name = r
        .object
        .strip_prefix(&format!("{ESCROW_CONTAINER}/"))
        .unwrap_or(&r.object)
        .to_string();
    let base = match az.blob(&t.blob_endpoint, ESCROW_CONTAINER, &name) {
        Ok(b) => b,
        Err(e) => {
            return Fetched {
                env: Err(e.into()),
                warnings,
            }
        }
    };
    // The blob as it is now: a version id or ETag other than the pinned one means it was written again.
    let current = call(policy, "escrow blob properties", || {
        let base = &base;
        async move { base.get_properties(None).await }
    })
    .await;
    match &current {
        Ok(p) => {
            let version = p.version_id().ok().flatten();
            let etag = p.etag().ok().flatten().map(|e| e.to_string());
            let replaced = if r.version.is_empty() {
                r.etag.is_some() && etag != r.etag
            } else {
                version.as_deref() != Some(r.version.as_str())
            };
            if replaced {
                warnings.push(format!(
                    "{} was written again after the escrow (now version {}, ETag {}; the receipt pins {}): the newer \
                     object was NOT used. Find who wrote it: docs/runbooks.md#who-opened-or-wrote-escrow",
                    r.object,
                    version.as_deref().unwrap_or("-"),
                    etag.as_deref().unwrap_or("-"),
                    pin_text(r)
                ));
            }
        }
        Err(e) if e.is(404) && !r.version.is_empty() => warnings.push(format!(
            "{}: the current blob was deleted after the escrow (the pinned version {} is read)",
            r.object, r.version
        )),
        Err(_) => {}
    }
    let env = if !r.version.is_empty() {
        match base.with_version(&r.version) {
            Ok(pinned) => call(policy, "escrow blob read", || {
                let pinned = &pinned;
                async move { pinned.download(None).await?.body.collect().await }
            })
            .await
            .map_err(CopyError::from)
            .and_then(|b| parse(&b)),
            Err(e) => Err(AzureError::from_sdk("escrow blob read", &e).into()),
        }
    } else if let Some(etag) = &r.etag {
        // No versions (the account keeps none, as Azurite): the ETag pins the content; a replaced blob is refused.
        let read = call(policy, "escrow blob read", || {
            let base = &base;
            let opts = BlobClientDownloadOptions {
                if_match: Some(etag.clone().into()),
                ..Default::default()
            };
            async move { base.download(Some(opts)).await?.body.collect().await }
        })
        .await;
        match read {
            Ok(b) => parse(&b),
            Err(e) if e.is(412) => Err(CopyError::Replaced {
                object: r.object.clone(),
                etag: etag.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    } else {
        warnings.push(format!(
            "{}: the receipt pins no version (written by an older agent): the current blob is read and checked \
             against the receipt's hash only",
            r.object
        ));
        call(policy, "escrow blob read", || {
            let base = &base;
            async move { base.download(None).await?.body.collect().await }
        })
        .await
        .map_err(CopyError::from)
        .and_then(|b| parse(&b))
    };
    Fetched { env, warnings }
}

fn pin_text(r: &Receipt) -> String {
    if !r.version.is_empty() {
        format!("version {}", r.version)
    } else {
        format!("ETag {}", r.etag.as_deref().unwrap_or("-"))
    }
}

async fn fetch_secret(az: &Azure, t: &Targets, r: &Receipt, policy: RetryPolicy) -> Fetched {
    let mut warnings = Vec::new();
    let secrets = match az.secrets(&t.escrow_vault_uri) {
        Ok(s) => s,
        Err(e) => {
            return Fetched {
                env: Err(e.into()),
                warnings,
            }
        }
    };
    if r.version.is_empty() {
        return Fetched {
            env: Err(CopyError::NoSecretVersion(r.object.clone())),
            warnings,
        };
    }
    let got = call(policy, "escrow key vault read", || {
        let (secrets, name) = (&secrets, &r.object);
        let opts = SecretClientGetSecretOptions {
            secret_version: Some(r.version.clone()),
            ..Default::default()
        };
        async move { secrets.get_secret(name, Some(opts)).await?.into_model() }
    })
    .await;
    let (env, pinned_created) = match got {
        Ok(s) => {
            let version = s.id.as_deref().and_then(secret_version_of);
            let created = s.attributes.as_ref().and_then(|a| a.created);
            let value = Zeroizing::new(s.value.unwrap_or_default());
            if version.as_deref() != Some(r.version.as_str()) {
                (
                    Err(CopyError::OtherVersion {
                        object: r.object.clone(),
                        answered: version.unwrap_or_else(|| "-".into()),
                        pinned: r.version.clone(),
                    }),
                    created,
                )
            } else {
                (parse(value.as_bytes()), created)
            }
        }
        Err(e) => (Err(e.into()), None),
    };
    match newer_secret_versions(&secrets, &r.object, &r.version, pinned_created).await {
        Ok(newer) if !newer.is_empty() => warnings.push(format!(
            "{} has {} version(s) newer than the pinned {} ({}): they were NOT used. A template redeployment adds a \
             placeholder version (content type text/plain); anything else was written after the escrow: find who \
             wrote it: docs/runbooks.md#who-opened-or-wrote-escrow",
            r.object,
            newer.len(),
            r.version,
            newer.join(", ")
        )),
        Ok(_) => {}
        Err(e) => warnings.push(format!(
            "{}: could not list its versions to look for newer ones: {e}",
            r.object
        )),
    }
    Fetched { env, warnings }
}

/// Versions of secret `name` created after the pinned one (`version (content type)`).
async fn newer_secret_versions(
    secrets: &azure_security_keyvault_secrets::SecretClient,
    name: &str,
    pinned: &str,
    pinned_created: Option<time::OffsetDateTime>,
) -> Result<Vec<String>, AzureError> {
    use futures_core::Stream;
    let mut pager = secrets
        .list_secret_properties_versions(name, None)
        .map_err(|e| AzureError::from_sdk("escrow key vault versions", &e))?;
    let mut newer = Vec::new();
    loop {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut pager).poll_next(cx)).await;
        let Some(item) = next else { break };
        let p = item.map_err(|e| AzureError::from_sdk("escrow key vault versions", &e))?;
        let Some(version) = p.id.as_deref().and_then(secret_version_of) else {
            continue;
        };
        if version == pinned {
            continue;
        }
        let created = p.attributes.as_ref().and_then(|a| a.created);
        let is_newer = match (created, pinned_created) {
            // Key Vault's creation times are whole seconds: a version made in the pinned one's second is not
            // told apart (docs/trust-model.md).
            (Some(c), Some(pc)) => c > pc,
            // Without both creation times, any other version is reported.
            _ => true,
        };
        if is_newer {
            newer.push(format!(
                "{version} ({})",
                p.content_type.as_deref().unwrap_or("no content type")
            ));
        }
    }
    Ok(newer)
}

/// Unwraps a data key with the Key Vault key `name`/`version` of `vault_uri`, with the caller's own identity (the
/// unwrap permission: operators only). A 403 is final.
#[allow(clippy::too_many_arguments)]
pub async fn unwrap_key(
    az: &Azure,
    vault_uri: &str,
    name: &str,
    version: &str,
    wrapped: &[u8],
    what: &str,
    policy: RetryPolicy,
) -> Result<DataKey, OpenError> {
    let keys = az.keys(vault_uri)?;
    let r = call(policy, what, || {
        let params = KeyOperationParameters {
            algorithm: Some(EncryptionAlgorithm::RsaOaep256),
            value: Some(wrapped.to_vec()),
            ..Default::default()
        };
        let keys = &keys;
        async move {
            let body: RequestContent<KeyOperationParameters> = params.try_into()?;
            keys.unwrap_key(name, version, body, None)
                .await?
                .into_model()
        }
    })
    .await?;
    let raw = Zeroizing::new(r.result.clone().unwrap_or_default());
    Ok(DataKey::from_bytes(&raw).ok_or(envelope::EnvelopeError::BadKey)?)
}

async fn unwrap_and_decrypt(
    az: &Azure,
    t: &Targets,
    env: &Envelope,
    policy: RetryPolicy,
) -> Result<Zeroizing<Vec<u8>>, CopyError> {
    // kek_id: https://<vault>/keys/<name>/<version>
    let mut parts = env.kek_id.trim_end_matches('/').rsplit('/');
    let (version, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    use base64::Engine;
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(&env.wrapped_key)
        .map_err(|_| envelope::EnvelopeError::Malformed("wrapped_key"))?;
    let key = unwrap_key(
        az,
        &t.escrow_vault_uri,
        name,
        version,
        &wrapped,
        "escrow key unwrap",
        policy,
    )
    .await?;
    Ok(envelope::open(env, &key)?)
}

/// What `escrow open` recovered, and what the operator must be told.
pub struct Opened {
    pub plain: Zeroizing<Vec<u8>>,
    /// The escrow opened and the target its copy came from.
    pub escrow_id: String,
    pub target: ReceiptTarget,
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("escrow_id", &self.escrow_id)
            .field("target", &self.target)
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

/// Fetches exactly the pinned copies of the escrow the tier's state names, checks them, and unwraps and decrypts
/// the first that passes (blob first, then Key Vault).
pub async fn open(
    az: &Azure,
    t: &Targets,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<Opened, OpenError> {
    let state = coordination::read(az, &t.blob_endpoint, cluster, tier, policy)
        .await?
        .ok_or_else(|| OpenError::Missing {
            tier: tier.into(),
            message: "never bootstrapped (no coordination state)".into(),
        })?;
    let receipts = pinned_receipts(&state).map_err(|e| OpenError::Missing {
        tier: tier.into(),
        message: e.to_string(),
    })?;
    let escrow_id = state.escrow_id.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    let mut reasons = Vec::new();
    for r in &receipts {
        let fetched = fetch_pinned(az, t, r, policy).await;
        warnings.extend(fetched.warnings);
        let result = match fetched.env {
            Ok(env) => match check_envelope(&env, cluster, tier, &escrow_id, r) {
                Ok(()) => unwrap_and_decrypt(az, t, &env, policy).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(plain) => {
                return Ok(Opened {
                    plain,
                    escrow_id,
                    target: r.target,
                    warnings,
                })
            }
            Err(e) => {
                tracing::warn!(target_kind = %r.target, object = %r.object, error = %e, "pinned escrow copy unusable; trying the other target");
                warnings.push(format!(
                    "the {} copy ({}) could not be used: {e}",
                    r.target, r.object
                ));
                reasons.push(format!("{}: {e}", r.target));
            }
        }
    }
    Err(OpenError::Unusable {
        tier: tier.into(),
        reasons,
    })
}

#[derive(Debug, Serialize)]
pub struct VerifyLine {
    pub tier: String,
    pub target: String,
    pub object: String,
    pub ok: bool,
    pub detail: String,
    /// Newer versions and other findings (printed as WARN lines).
    pub warnings: Vec<String>,
}

/// Checks every receipt of every bootstrapped tier against exactly the version it pins (by ciphertext SHA-256,
/// cluster, tier and escrow id), and reports newer versions.
pub async fn verify(
    az: &Azure,
    t: &Targets,
    cluster: &str,
    policy: RetryPolicy,
) -> Result<Vec<VerifyLine>, OpenError> {
    let mut out = Vec::new();
    for tier in TIERS {
        let Some(state) = coordination::read(az, &t.blob_endpoint, cluster, tier, policy).await?
        else {
            continue;
        };
        let line = |target: &str, detail: String| VerifyLine {
            tier: tier.into(),
            target: target.into(),
            object: "-".into(),
            ok: false,
            detail,
            warnings: vec![],
        };
        let receipts = match pinned_receipts(&state) {
            Ok(r) => r,
            Err(e) => {
                out.push(line("-", format!("phase {:?}: {e}", state.phase)));
                continue;
            }
        };
        for target in ReceiptTarget::ALL {
            if !receipts.iter().any(|r| r.target == target) {
                out.push(line(
                    target.as_str(),
                    format!("phase {:?} with no {target} receipt", state.phase),
                ));
            }
        }
        let escrow_id = state.escrow_id.clone().unwrap_or_default();
        for r in &receipts {
            let fetched = fetch_pinned(az, t, r, policy).await;
            let (ok, detail) = match fetched
                .env
                .and_then(|env| check_envelope(&env, cluster, tier, &escrow_id, r))
            {
                Ok(()) => (
                    true,
                    format!(
                        "present at the pinned {}, ciphertext matches the receipt",
                        pin_text(r)
                    ),
                ),
                Err(e) => (false, e.to_string()),
            };
            out.push(VerifyLine {
                tier: tier.into(),
                target: r.target.to_string(),
                object: r.object.clone(),
                ok,
                detail,
                warnings: fetched.warnings,
            });
        }
    }
    Ok(out)
}

/// The files `write_pgp_messages` wrote, each with the fingerprints of the keys that open it.
pub type PgpFiles = Vec<(std::path::PathBuf, Vec<String>)>;

/// With the PGP escrow option (docs/pgp-escrow.md), writes each OpenPGP message of an opened payload as a
/// binary file `<dir>/<tier>-<name>.gpg` (0600, in a 0700 directory), for its holder's
/// `gpg --decrypt <file>`. Returns the files with the fingerprints that can open each; `None` when the
/// payload is not a PGP one.
pub fn write_pgp_messages(
    dir: &std::path::Path,
    tier: &str,
    opened: &[u8],
) -> Result<Option<PgpFiles>, OpenError> {
    use crate::files::{self, DirSpec, FileSpec, Owner};
    use base64::Engine;
    let Some(p) = super::pgp::PgpPayload::from_opened(opened) else {
        return Ok(None);
    };
    let file_error = |e: files::FileError| OpenError::Missing {
        tier: tier.into(),
        message: e.to_string(),
    };
    files::ensure_dir(&DirSpec {
        path: dir.to_path_buf(),
        mode: 0o700,
        owner: Owner::Current,
    })
    .map_err(file_error)?;
    let mut out = Vec::new();
    for m in &p.pgp_messages {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&m.message_base64)
            .map_err(|_| envelope::EnvelopeError::Malformed("pgp_messages[].message_base64"))?;
        let path = dir.join(format!("{tier}-{}.gpg", m.name));
        files::write_atomic(&FileSpec {
            path: path.clone(),
            content: bytes,
            mode: 0o600,
            owner: Owner::Current,
            secret: false,
        })
        .map_err(file_error)?;
        out.push((path, m.recipients.clone()));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::TierPhase;

    fn env() -> Envelope {
        Envelope {
            format: 1,
            escrow_id: "1700-aa".into(),
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

    fn receipt(target: ReceiptTarget, escrow_id: Option<&str>, sha: &str) -> Receipt {
        Receipt {
            target,
            object: format!("{target}-object"),
            version: "v1".into(),
            etag: None,
            escrow_id: escrow_id.map(str::to_string),
            ciphertext_sha256: sha.into(),
            written_unix: 0,
        }
    }

    #[test]
    fn a_fetched_object_must_be_this_escrow_of_this_cluster_and_tier() {
        let e = env();
        let r = receipt(ReceiptTarget::Blob, Some("1700-aa"), &e.ciphertext_sha256());
        check_envelope(&e, "hs", "vault", "1700-aa", &r).unwrap();
        let err = check_envelope(&e, "other", "vault", "1700-aa", &r)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster \"hs\"'s escrow, not \"other\"'s"),
            "{err}"
        );
        let err = check_envelope(&e, "hs", "consul", "1700-aa", &r)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tier \"vault\"'s escrow, not \"consul\"'s"),
            "{err}"
        );
        let err = check_envelope(&e, "hs", "vault", "1700-bb", &r)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("escrow \"1700-aa\", the state names \"1700-bb\""),
            "{err}"
        );
        let forged = Envelope {
            ciphertext: "Zm9yZ2Vk".into(),
            ..e.clone()
        };
        let err = check_envelope(&forged, "hs", "vault", "1700-aa", &r)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ciphertext differs from the receipt"), "{err}");
    }

    #[test]
    fn the_pinned_receipts_are_those_of_the_states_escrow_blob_first() {
        let mut st = TierState::new("hs", "vault", "n1");
        st.set(TierPhase::Done, "n1", None);
        assert_eq!(pinned_receipts(&st).unwrap_err(), Unpinned::NoEscrowId);
        assert_eq!(Unpinned::NoEscrowId.to_string(), "no escrow id recorded");
        st.escrow_id = Some("1700-bb".into());
        st.receipts = vec![
            receipt(ReceiptTarget::Keyvault, Some("1700-bb"), "2"),
            receipt(ReceiptTarget::Blob, Some("1700-aa"), "0"),
            receipt(ReceiptTarget::Blob, Some("1700-bb"), "1"),
        ];
        let pinned = pinned_receipts(&st).unwrap();
        assert_eq!(
            pinned
                .iter()
                .map(|r| (r.target, r.ciphertext_sha256.as_str()))
                .collect::<Vec<_>>(),
            [(ReceiptTarget::Blob, "1"), (ReceiptTarget::Keyvault, "2")]
        );
        st.escrow_id = Some("1700-cc".into());
        assert_eq!(
            pinned_receipts(&st).unwrap_err().to_string(),
            "no receipt names escrow 1700-cc"
        );
    }
}
