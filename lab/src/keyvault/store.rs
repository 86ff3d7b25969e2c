//! What a vault holds: secret versions and RSA key versions (software keys, PKCS#8), the JSON they persist as,
//! the secret and key bundles Key Vault answers with (ids, attributes, public JWK), lookups by name and version
//! ("" = latest, 404 `SecretNotFound` / `KeyNotFound` otherwise), and the RSA-OAEP-256 helpers.

use super::routes::KvErr;
use super::VaultState;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair, KeySize, OaepPublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
    PublicKeyComponents, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SecretVersion {
    pub(super) version: String,
    pub(super) value: String,
    #[serde(default)]
    pub(super) content_type: Option<String>,
    #[serde(default)]
    pub(super) tags: Option<BTreeMap<String, String>>,
    pub(super) enabled: bool,
    pub(super) created: i64,
    pub(super) updated: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KeyVersion {
    pub(super) version: String,
    pub(super) kty: String,
    pub(super) key_ops: Vec<String>,
    /// PKCS#8 DER, base64.
    pub(super) pkcs8: String,
    #[serde(default)]
    pub(super) tags: Option<BTreeMap<String, String>>,
    pub(super) enabled: bool,
    pub(super) created: i64,
    pub(super) updated: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Store {
    pub(super) secrets: BTreeMap<String, Vec<SecretVersion>>,
    pub(super) keys: BTreeMap<String, Vec<KeyVersion>>,
}

pub(super) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(super) fn new_version() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub(super) fn from_b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

const DEFAULT_KEY_OPS: &[&str] = &[
    "encrypt",
    "decrypt",
    "sign",
    "verify",
    "wrapKey",
    "unwrapKey",
];

pub(super) fn new_rsa_key(
    kty: &str,
    bits: u32,
    key_ops: Option<Vec<String>>,
    tags: Option<BTreeMap<String, String>>,
) -> Result<KeyVersion, KvErr> {
    let size = match bits {
        2048 => KeySize::Rsa2048,
        3072 => KeySize::Rsa3072,
        4096 => KeySize::Rsa4096,
        _ => {
            return Err(KvErr::bad(format!(
                "RSA key size {bits} is not supported (2048, 3072 or 4096)."
            )))
        }
    };
    let kp = KeyPair::generate(size).map_err(|_| {
        KvErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "RSA keygen",
        )
    })?;
    let der = kp
        .as_der()
        .map_err(|_| KvErr::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "PKCS#8"))?;
    let t = now();
    Ok(KeyVersion {
        version: new_version(),
        kty: kty.into(),
        key_ops: key_ops.unwrap_or_else(|| DEFAULT_KEY_OPS.iter().map(|s| s.to_string()).collect()),
        pkcs8: base64::engine::general_purpose::STANDARD.encode(der.as_ref()),
        tags,
        enabled: true,
        created: t,
        updated: t,
    })
}

pub(super) fn private_key(k: &KeyVersion) -> Result<PrivateDecryptingKey, KvErr> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(&k.pkcs8)
        .map_err(|_| {
            KvErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "key store",
            )
        })?;
    PrivateDecryptingKey::from_pkcs8(&der).map_err(|_| {
        KvErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "key store",
        )
    })
}

fn public_components(k: &KeyVersion) -> Result<(Vec<u8>, Vec<u8>), KvErr> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(&k.pkcs8)
        .map_err(|_| {
            KvErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "key store",
            )
        })?;
    let kp = KeyPair::from_pkcs8(&der).map_err(|_| {
        KvErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "key store",
        )
    })?;
    let pk = kp.public_key();
    Ok((
        pk.modulus().big_endian_without_leading_zero().to_vec(),
        pk.exponent().big_endian_without_leading_zero().to_vec(),
    ))
}

pub(super) fn attributes(enabled: bool, created: i64, updated: i64) -> Value {
    json!({
        "enabled": enabled,
        "created": created,
        "updated": updated,
        "recoveryLevel": "Recoverable",
        "recoverableDays": 90
    })
}

pub(super) fn secret_bundle(base: &str, name: &str, s: &SecretVersion, with_value: bool) -> Value {
    let mut v = json!({
        "id": format!("{base}/secrets/{name}/{}", s.version),
        "attributes": attributes(s.enabled, s.created, s.updated),
    });
    if with_value {
        v["value"] = json!(s.value);
    }
    if let Some(ct) = &s.content_type {
        v["contentType"] = json!(ct);
    }
    if let Some(t) = &s.tags {
        v["tags"] = json!(t);
    }
    v
}

pub(super) fn key_bundle(base: &str, name: &str, k: &KeyVersion) -> Result<Value, KvErr> {
    let (n, e) = public_components(k)?;
    let mut attrs = attributes(k.enabled, k.created, k.updated);
    attrs["exportable"] = json!(false);
    let mut v = json!({
        "key": {
            "kid": format!("{base}/keys/{name}/{}", k.version),
            "kty": k.kty,
            "key_ops": k.key_ops,
            "n": b64url(&n),
            "e": b64url(&e),
        },
        "attributes": attrs,
    });
    if let Some(t) = &k.tags {
        v["tags"] = json!(t);
    }
    Ok(v)
}

pub(super) fn find_secret<'a>(
    st: &'a VaultState,
    name: &str,
    version: &str,
) -> Result<&'a SecretVersion, KvErr> {
    let versions = st.store.secrets.get(name);
    let found = if version.is_empty() {
        versions.and_then(|v| v.last())
    } else {
        versions.and_then(|v| v.iter().find(|s| s.version == version))
    };
    found.ok_or_else(|| {
        let id = if version.is_empty() {
            name.to_string()
        } else {
            format!("{name}/{version}")
        };
        KvErr::new(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            format!("A secret with (name/id) {id} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"),
        )
    })
}

pub(super) fn find_key<'a>(
    st: &'a VaultState,
    name: &str,
    version: &str,
) -> Result<&'a KeyVersion, KvErr> {
    let versions = st.store.keys.get(name);
    let found = if version.is_empty() {
        versions.and_then(|v| v.last())
    } else {
        versions.and_then(|v| v.iter().find(|k| k.version == version))
    };
    found.ok_or_else(|| {
        let id = if version.is_empty() {
            name.to_string()
        } else {
            format!("{name}/{version}")
        };
        KvErr::new(
            StatusCode::NOT_FOUND,
            "KeyNotFound",
            format!("A key with (name/id) {id} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"),
        )
    })
}

/// Wraps `plaintext` locally with a public JWK's `n` and `e` (RSA-OAEP-256), the way a client holding
/// only the public key would; the double's unwrapkey must accept the result.
pub fn wrap_locally(n: &[u8], e: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
    let public: PublicEncryptingKey = PublicKeyComponents { n, e }.try_into().ok()?;
    let public = OaepPublicEncryptingKey::new(public).ok()?;
    let mut out = vec![0u8; public.ciphertext_size()];
    let len = public
        .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
        .ok()?
        .len();
    out.truncate(len);
    Some(out)
}
