//! The products' snapshot APIs, as documented: who leads, the raft index, save (a streamed `GET`) and restore (a
//! streamed `PUT`/`POST`).
//!
//! | tier | leader | save | restore |
//! |---|---|---|---|
//! | consul | `GET /v1/status/leader` = this node's `ip:8300` | `GET /v1/snapshot` (index: `X-Consul-Index`) | `PUT /v1/snapshot` |
//! | vault | `GET /v1/sys/leader` `is_self` (index: `raft_committed_index`) | `GET /v1/sys/storage/raft/snapshot` | `POST /v1/sys/storage/raft/snapshot[-force]` |
//! | nomad | `GET /v1/status/leader` = this node's `ip:4647` (index: `/v1/agent/self` `stats.raft.applied_index`) | `GET /v1/operator/snapshot` | `PUT /v1/operator/snapshot` |

use crate::tls::HttpsClientError;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Consul,
    Vault,
    Nomad,
}

/// Why a product call failed (never holds a token or a body beyond the product's short error text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct ProductError {
    pub what: String,
    pub status: Option<u16>,
    pub detail: String,
}

impl ProductError {
    fn new(what: &str, status: Option<u16>, detail: impl Into<String>) -> Self {
        ProductError {
            what: what.into(),
            status,
            detail: detail.into(),
        }
    }
    /// Whether another attempt can help (no answer, 429, 5xx).
    pub fn retryable(&self) -> bool {
        match self.status {
            None => true,
            Some(s) => s == 429 || s >= 500,
        }
    }
}

impl crate::retry::TimeoutError for ProductError {
    fn timeout(after: Duration) -> Self {
        ProductError::new("request", None, format!("no answer within {after:?}"))
    }
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Consul, Tier::Vault, Tier::Nomad];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Consul => "consul",
            Tier::Vault => "vault",
            Tier::Nomad => "nomad",
        }
    }

    pub fn parse(s: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn for_role(role: crate::node::Role) -> Option<Tier> {
        use crate::node::Role;
        match role {
            Role::ConsulServer => Some(Tier::Consul),
            Role::VaultServer => Some(Tier::Vault),
            Role::NomadServer => Some(Tier::Nomad),
            _ => None,
        }
    }

    pub fn token_header(self) -> &'static str {
        match self {
            Tier::Consul => "X-Consul-Token",
            Tier::Vault => "X-Vault-Token",
            Tier::Nomad => "X-Nomad-Token",
        }
    }

    fn snapshot_path(self) -> &'static str {
        match self {
            Tier::Consul => "/v1/snapshot",
            Tier::Vault => "/v1/sys/storage/raft/snapshot",
            Tier::Nomad => "/v1/operator/snapshot",
        }
    }
}

/// An HTTPS client for a product API that trusts only the cluster CA. No overall timeout (a snapshot takes as long
/// as its size needs); connecting and every read are bounded.
pub fn client(ca_file: &Path) -> Result<reqwest::Client, HttpsClientError> {
    let cert = crate::tls::ca_certificate(ca_file)?;
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([cert])
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .build()
        .map_err(HttpsClientError::Build)
}

async fn short_error(what: &str, r: reqwest::Response) -> ProductError {
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    // The products' error texts are short and hold no secret; keep the first line only.
    let text: String = body
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    ProductError::new(
        what,
        Some(status),
        format!("HTTP {status} {text}").trim_end().to_string(),
    )
}

async fn get_json(
    http: &reqwest::Client,
    url: String,
    token: Option<(&str, &str)>,
    what: &str,
) -> Result<serde_json::Value, ProductError> {
    let mut req = http.get(url).timeout(Duration::from_secs(15));
    if let Some((h, t)) = token {
        req = req.header(h, t);
    }
    let r = req
        .send()
        .await
        .map_err(|e| ProductError::new(what, None, e.without_url().to_string()))?;
    if !r.status().is_success() {
        return Err(short_error(what, r).await);
    }
    r.json()
        .await
        .map_err(|_| ProductError::new(what, None, "answer did not parse"))
}

/// Whether this node (`ip`) is its tier's leader (Consul, Nomad) or active node (Vault).
pub async fn is_leader(
    tier: Tier,
    http: &reqwest::Client,
    api: &str,
    ip: Ipv4Addr,
) -> Result<bool, ProductError> {
    match tier {
        Tier::Consul | Tier::Nomad => {
            let v = get_json(http, format!("{api}/v1/status/leader"), None, "leader").await?;
            let port = if tier == Tier::Consul { 8300 } else { 4647 };
            Ok(v.as_str() == Some(&format!("{ip}:{port}")))
        }
        Tier::Vault => {
            let v = get_json(http, format!("{api}/v1/sys/leader"), None, "leader").await?;
            Ok(v["is_self"].as_bool() == Some(true))
        }
    }
}

/// The raft index before the snapshot, where the product says it outside the snapshot stream (0: unknown).
pub async fn index_before(
    tier: Tier,
    http: &reqwest::Client,
    api: &str,
    token: &str,
) -> Result<u64, ProductError> {
    let num = |v: &serde_json::Value| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    };
    match tier {
        // Consul answers the snapshot itself with X-Consul-Index.
        Tier::Consul => Ok(0),
        Tier::Vault => {
            let v = get_json(http, format!("{api}/v1/sys/leader"), None, "leader").await?;
            Ok(num(&v["raft_committed_index"]))
        }
        Tier::Nomad => {
            let v = get_json(
                http,
                format!("{api}/v1/agent/self"),
                Some((tier.token_header(), token)),
                "agent self",
            )
            .await?;
            Ok(num(&v["stats"]["raft"]["applied_index"]))
        }
    }
}

/// Starts a snapshot download: the response (its body not yet read) and the index the product gave with it.
pub async fn save(
    tier: Tier,
    http: &reqwest::Client,
    api: &str,
    token: &str,
) -> Result<(reqwest::Response, Option<u64>), ProductError> {
    let r = http
        .get(format!("{api}{}", tier.snapshot_path()))
        .header(tier.token_header(), token)
        .send()
        .await
        .map_err(|e| ProductError::new("snapshot", None, e.without_url().to_string()))?;
    if !r.status().is_success() {
        return Err(short_error("snapshot", r).await);
    }
    let index = r
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok((r, index))
}

/// Restores a snapshot from a stream of plaintext. `force` (Vault only): `snapshot-force`, for a snapshot of
/// another Vault cluster (a tier rebuilt from nothing has a new keyring).
pub async fn restore(
    tier: Tier,
    http: &reqwest::Client,
    api: &str,
    token: &str,
    force: bool,
    body: reqwest::Body,
) -> Result<(), ProductError> {
    let url = match (tier, force) {
        (Tier::Vault, true) => format!("{api}/v1/sys/storage/raft/snapshot-force"),
        _ => format!("{api}{}", tier.snapshot_path()),
    };
    let req = match tier {
        Tier::Vault => http.post(url),
        Tier::Consul | Tier::Nomad => http.put(url),
    };
    let r = req
        .header(tier.token_header(), token)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .map_err(|e| ProductError::new("restore", None, e.without_url().to_string()))?;
    if !r.status().is_success() {
        return Err(short_error("restore", r).await);
    }
    Ok(())
}

/// Vault: renews the periodic snapshot token (it expires after its period without a renewal).
pub async fn renew_vault_token(
    http: &reqwest::Client,
    api: &str,
    token: &str,
) -> Result<(), ProductError> {
    let r = http
        .post(format!("{api}/v1/auth/token/renew-self"))
        .header("X-Vault-Token", token)
        .json(&serde_json::json!({}))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| ProductError::new("token renewal", None, e.without_url().to_string()))?;
    if !r.status().is_success() {
        return Err(short_error("token renewal", r).await);
    }
    Ok(())
}
