//! Key Vault's challenge authentication: an unauthenticated request gets 401 with the `WWW-Authenticate`
//! challenge naming the tenant and the resource; a bearer JWT is decoded without a signature check (like
//! Azurite) and must carry the Key Vault audience, a `sts.windows.net` issuer, a valid `exp`/`nbf` window and
//! an `oid`, which becomes the principal the RBAC check looks up.

use super::routes::KvErr;
use super::store::{from_b64url, now};
use super::RESOURCE;
use crate::imds::LAB_TENANT;
use hyper::header::HeaderValue;
use serde_json::Value;

pub(super) fn challenge() -> String {
    format!(
        "Bearer authorization=\"https://login.microsoftonline.com/{LAB_TENANT}\", resource=\"{RESOURCE}\""
    )
}

/// Decodes the bearer JWT (no signature check) and returns the caller's oid.
pub(super) fn authenticate(auth: Option<&HeaderValue>) -> Result<String, KvErr> {
    let token = auth
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            KvErr::unauthorized("AKV10000: Request is missing a Bearer or PoP token.")
        })?;
    let malformed = || KvErr::unauthorized("Bearer token is malformed (not a JWT).");
    let payload = token.split('.').nth(1).ok_or_else(malformed)?;
    let claims: Value = from_b64url(payload)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(malformed)?;
    let aud = claims["aud"].as_str().unwrap_or("");
    if aud.trim_end_matches('/') != RESOURCE {
        return Err(KvErr::unauthorized(format!(
            "Invalid audience. Expected {RESOURCE}, found: {aud}."
        )));
    }
    let iss = claims["iss"].as_str().unwrap_or("");
    if !iss.starts_with("https://sts.windows.net/") {
        return Err(KvErr::unauthorized(format!("Invalid issuer: {iss}.")));
    }
    let t = now();
    match claims["exp"].as_i64() {
        Some(exp) if exp > t => {}
        Some(_) => return Err(KvErr::unauthorized("Token has expired.")),
        None => return Err(KvErr::unauthorized("Token has no exp claim.")),
    }
    match claims["nbf"].as_i64() {
        Some(nbf) if nbf <= t => {}
        Some(_) => return Err(KvErr::unauthorized("Token is not valid yet (nbf).")),
        None => return Err(KvErr::unauthorized("Token has no nbf claim.")),
    }
    claims["oid"]
        .as_str()
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .ok_or_else(|| KvErr::unauthorized("Token has no oid claim."))
}
