//! The operator's side of escrow: `escrow open` (fetch, unwrap with the operator's own identity, decrypt)
//! and `escrow verify` (every receipt has a matching object; nothing decrypted). VM identities cannot do
//! either: they may write escrow and wrap, never read or unwrap.

use super::envelope::{self, DataKey, Envelope};
use super::{blob_name, secret_name, Targets, ESCROW_CONTAINER};
use crate::azure::{call_strict as call, Azure, AzureError};
use crate::coordination::{self, TierState};
use crate::retry::RetryPolicy;
use azure_core::http::RequestContent;
use azure_security_keyvault_keys::models::{EncryptionAlgorithm, KeyOperationParameters};
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
}

pub const TIERS: [&str; 3] = ["consul", "vault", "nomad"];

async fn fetch_envelope(
    az: &Azure,
    t: &Targets,
    state: &TierState,
    policy: RetryPolicy,
) -> Result<Envelope, OpenError> {
    let tier = state.tier.clone();
    let missing = |message: String| OpenError::Missing {
        tier: tier.clone(),
        message,
    };
    let id = state
        .escrow_id
        .clone()
        .ok_or_else(|| missing("no escrow id recorded".into()))?;
    let probe = Envelope {
        format: 1,
        escrow_id: id,
        cluster: state.cluster.clone(),
        tier: state.tier.clone(),
        created_unix: 0,
        kek_id: String::new(),
        wrap_alg: String::new(),
        wrapped_key: String::new(),
        nonce: String::new(),
        ciphertext: String::new(),
    };
    // Blob first; the Key Vault copy if the blob is unavailable.
    let blob = az.blob(&t.blob_endpoint, ESCROW_CONTAINER, &blob_name(&probe))?;
    let from_blob = call(policy, "escrow blob read", || {
        let blob = &blob;
        async move { blob.download(None).await?.body.collect().await }
    })
    .await;
    let bytes = match from_blob {
        Ok(b) => b.to_vec(),
        Err(blob_err) => {
            tracing::warn!(error = %blob_err, "blob copy unavailable; reading the Key Vault copy");
            let secrets = az.secrets(&t.escrow_vault_uri)?;
            let name = secret_name(&probe);
            let s = call(policy, "escrow key vault read", || {
                let (secrets, name) = (&secrets, &name);
                async move { secrets.get_secret(name, None).await?.into_model() }
            })
            .await?;
            s.value.unwrap_or_default().into_bytes()
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| missing(format!("escrowed object does not parse: {e}")))
}

/// Fetches, unwraps and decrypts the newest escrow of `tier`.
pub async fn open(
    az: &Azure,
    t: &Targets,
    cluster: &str,
    tier: &str,
    policy: RetryPolicy,
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let state = coordination::read(az, &t.blob_endpoint, cluster, tier, policy)
        .await?
        .ok_or_else(|| OpenError::Missing {
            tier: tier.into(),
            message: "never bootstrapped (no coordination state)".into(),
        })?;
    let env = fetch_envelope(az, t, &state, policy).await?;
    // kek_id: https://<vault>/keys/<name>/<version>
    let mut parts = env.kek_id.trim_end_matches('/').rsplit('/');
    let (version, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    use base64::Engine;
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(&env.wrapped_key)
        .map_err(|_| envelope::EnvelopeError::Malformed("wrapped_key"))?;
    let keys = az.keys(&t.escrow_vault_uri)?;
    let r = call(policy, "escrow key unwrap", || {
        let params = KeyOperationParameters {
            algorithm: Some(EncryptionAlgorithm::RsaOaep256),
            value: Some(wrapped.clone()),
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
    let key = DataKey::from_bytes(&raw).ok_or(envelope::EnvelopeError::BadKey)?;
    Ok(envelope::open(&env, &key)?)
}

#[derive(Debug, Serialize)]
pub struct VerifyLine {
    pub tier: String,
    pub target: String,
    pub object: String,
    pub ok: bool,
    pub detail: String,
}

/// Checks every receipt of every bootstrapped tier against the stored objects (by ciphertext SHA-256).
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
        for target in ["blob", "keyvault"] {
            if !state.receipts.is_empty() && !state.receipts.iter().any(|r| r.target == target) {
                out.push(VerifyLine {
                    tier: tier.into(),
                    target: target.into(),
                    object: "-".into(),
                    ok: false,
                    detail: format!("phase {:?} with no {target} receipt", state.phase),
                });
            }
        }
        if state.receipts.is_empty() {
            out.push(VerifyLine {
                tier: tier.into(),
                target: "-".into(),
                object: "-".into(),
                ok: false,
                detail: format!("phase {:?} with no escrow receipt", state.phase),
            });
        }
        for r in &state.receipts {
            let found: Result<String, String> = match r.target.as_str() {
                "blob" => {
                    let name = r
                        .object
                        .strip_prefix(&format!("{ESCROW_CONTAINER}/"))
                        .unwrap_or(&r.object)
                        .to_string();
                    match az.blob(&t.blob_endpoint, ESCROW_CONTAINER, &name) {
                        Ok(blob) => call(policy, "escrow blob read", || {
                            let blob = &blob;
                            async move { blob.download(None).await?.body.collect().await }
                        })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            serde_json::from_slice::<Envelope>(&b).map_err(|e| e.to_string())
                        })
                        .map(|e| e.ciphertext_sha256()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                _ => match az.secrets(&t.escrow_vault_uri) {
                    Ok(secrets) => call(policy, "escrow key vault read", || {
                        let (secrets, name) = (&secrets, &r.object);
                        async move { secrets.get_secret(name, None).await?.into_model() }
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        serde_json::from_str::<Envelope>(&s.value.unwrap_or_default())
                            .map_err(|e| e.to_string())
                    })
                    .map(|e| e.ciphertext_sha256()),
                    Err(e) => Err(e.to_string()),
                },
            };
            let (ok, detail) = match found {
                Ok(sha) if sha == r.ciphertext_sha256 => {
                    (true, "present, ciphertext matches the receipt".to_string())
                }
                Ok(sha) => (
                    false,
                    format!(
                        "ciphertext differs from the receipt ({sha} != {})",
                        r.ciphertext_sha256
                    ),
                ),
                Err(e) => (false, e),
            };
            out.push(VerifyLine {
                tier: tier.into(),
                target: r.target.clone(),
                object: r.object.clone(),
                ok,
                detail,
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
