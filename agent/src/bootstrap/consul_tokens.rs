//! Least-privilege Consul agent token, created right after the ACL bootstrap with the management token and
//! handed to every node through the shared Key Vault (`<cluster>-consul-agent-token`). Agents render it as
//! `acl.tokens.agent` and reload Consul (ACL tokens are reloadable on SIGHUP).

use super::http::CallError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use zeroize::Zeroizing;

pub const AGENT_POLICY: &str = "hashistack-agent";

pub use crate::names::agent_token_secret;

/// Consul ACL rules in their JSON form: register any node, read services (what an agent needs).
pub fn agent_rules() -> serde_json::Value {
    serde_json::json!({
        "node_prefix": {"": {"policy": "write"}},
        "service_prefix": {"": {"policy": "read"}},
        "agent_prefix": {"": {"policy": "read"}}
    })
}

#[derive(Serialize)]
struct PolicyReq<'a> {
    #[serde(rename = "Name")]
    name: &'a str,
    #[serde(rename = "Description")]
    description: &'a str,
    #[serde(rename = "Rules")]
    rules: String,
}

#[derive(Serialize)]
struct TokenReq<'a> {
    #[serde(rename = "Description")]
    description: &'a str,
    #[serde(rename = "Policies")]
    policies: Vec<PolicyLink<'a>>,
}

#[derive(Serialize)]
struct PolicyLink<'a> {
    #[serde(rename = "Name")]
    name: &'a str,
}

#[derive(Deserialize)]
struct TokenResp {
    #[serde(rename = "SecretID")]
    secret_id: String,
}

/// Creates the agent policy and a token for it; returns the token's secret.
pub async fn create_agent_token(
    api: &str,
    ca_file: &Path,
    management: &str,
) -> Result<Zeroizing<String>, CallError> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(20))
        .map_err(|e| CallError::Client(e.to_string()))?;
    let policy = PolicyReq {
        name: AGENT_POLICY,
        description: "hashistack: Consul agents (node registration, service read)",
        rules: agent_rules().to_string(),
    };
    let r = c
        .put(format!("{api}/v1/acl/policy"))
        .header("X-Consul-Token", management)
        .json(&policy)
        .send()
        .await
        .map_err(|e| CallError::transport("agent policy", e))?;
    let status = r.status().as_u16();
    // An earlier, interrupted run may have created it already ("Invalid Policy: A Policy with Name … already exists").
    if status != 200
        && !r
            .text()
            .await
            .unwrap_or_default()
            .contains("already exists")
    {
        return Err(CallError::status("agent policy", status));
    }
    let token = TokenReq {
        description: "hashistack: agent token",
        policies: vec![PolicyLink { name: AGENT_POLICY }],
    };
    let r = c
        .put(format!("{api}/v1/acl/token"))
        .header("X-Consul-Token", management)
        .json(&token)
        .send()
        .await
        .map_err(|e| CallError::transport("agent token", e))?;
    if !r.status().is_success() {
        return Err(CallError::status("agent token", r.status().as_u16()));
    }
    let t: TokenResp = r
        .json()
        .await
        .map_err(|_| CallError::unparsable("agent token"))?;
    Ok(Zeroizing::new(t.secret_id))
}

// ----- Nomad's Consul token --------------------------------------------------------------------------------
//
// Nomad agents (servers and clients) talk to their local Consul agent with `consul.token`: they register their
// own services (`nomad`, `nomad-client`) and jobs' services with their checks, update TTL checks, deregister,
// and read the catalog and health of services (automatic clustering). Created once by the Consul tier's
// bootstrap and handed to the nodes that run Nomad through the shared Key Vault
// (`<cluster>-consul-nomad-token`), written there before the agent token that every node waits for.

pub const NOMAD_POLICY: &str = "hashistack-nomad";

/// The token's fixed accessor ID: a rerun (a re-bootstrap after a reset, an interrupted configuration) finds
/// and reuses the token instead of minting another, so nodes keep the secret they have and Nomad does not
/// restart. Accessor IDs are not secret.
pub const NOMAD_TOKEN_ACCESSOR: &str = "4e6f6d61-6400-4c00-8000-636f6e73756c";

pub use crate::names::nomad_token_secret;

/// Nomad's documented Consul ACL requirements for its agents without Consul Connect and without workload
/// identities (docs/bootstrap.md, "Nomad's Consul token"): read agents (`GET /v1/agent/self`), read nodes
/// (catalog and health answers), write services (register and deregister services and their checks, update
/// TTL checks). No `acl = "write"` (Nomad needs it only to derive Service Identity tokens for Connect or for
/// workload-identity setups; in Consul it is as strong as a management token), no `key_prefix`, no
/// `operator`, and `node_prefix` read only: the node itself is registered by the Consul agent's own token.
pub fn nomad_rules() -> serde_json::Value {
    serde_json::json!({
        "agent_prefix": {"": {"policy": "read"}},
        "node_prefix": {"": {"policy": "read"}},
        "service_prefix": {"": {"policy": "write"}}
    })
}

/// Why Nomad's Consul token could not be made. Never carries a token or a response body.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("Nomad's Consul token: {0}")]
    Client(#[from] crate::services::health::HttpsClientError),
    #[error("Nomad's Consul token: {what}: {source}")]
    Request {
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("Nomad's Consul token: {what}: HTTP {status}")]
    Status { what: &'static str, status: u16 },
    #[error("Nomad's Consul token: {what}: the answer did not parse")]
    Parse { what: &'static str },
}

#[derive(Serialize)]
struct NomadTokenReq<'a> {
    #[serde(rename = "AccessorID")]
    accessor_id: &'a str,
    #[serde(rename = "Description")]
    description: &'a str,
    #[serde(rename = "Policies")]
    policies: Vec<PolicyLink<'a>>,
}

/// Creates (or finds) the policy `hashistack-nomad` and the token with the fixed accessor
/// [`NOMAD_TOKEN_ACCESSOR`]; returns the token's secret. Idempotent: a second run returns the same secret.
pub async fn ensure_nomad_token(
    api: &str,
    ca_file: &Path,
    management: &str,
) -> Result<Zeroizing<String>, TokenError> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(20))
        .map_err(TokenError::Client)?;
    let send = |what: &'static str, req: reqwest::RequestBuilder| async move {
        req.header("X-Consul-Token", management)
            .send()
            .await
            .map_err(|e| TokenError::Request {
                what,
                source: e.without_url(),
            })
    };
    let policy = PolicyReq {
        name: NOMAD_POLICY,
        description: "hashistack: Nomad agents (service registration and checks, catalog read)",
        rules: nomad_rules().to_string(),
    };
    let r = send(
        "policy",
        c.put(format!("{api}/v1/acl/policy")).json(&policy),
    )
    .await?;
    let status = r.status().as_u16();
    // "Invalid Policy: A Policy with Name … already exists": an earlier run made it.
    if status != 200
        && !r
            .text()
            .await
            .unwrap_or_default()
            .contains("already exists")
    {
        return Err(TokenError::Status {
            what: "policy",
            status,
        });
    }
    if let Some(secret) = read_nomad_token(&c, api, management).await? {
        return Ok(secret);
    }
    let token = NomadTokenReq {
        accessor_id: NOMAD_TOKEN_ACCESSOR,
        description: "hashistack: Nomad agents",
        policies: vec![PolicyLink { name: NOMAD_POLICY }],
    };
    let r = send("token", c.put(format!("{api}/v1/acl/token")).json(&token)).await?;
    if r.status().is_success() {
        let t: TokenResp = r
            .json()
            .await
            .map_err(|_| TokenError::Parse { what: "token" })?;
        return Ok(Zeroizing::new(t.secret_id));
    }
    // Made meanwhile by someone else with the same accessor: read it back.
    let status = r.status().as_u16();
    match read_nomad_token(&c, api, management).await? {
        Some(secret) => Ok(secret),
        None => Err(TokenError::Status {
            what: "token",
            status,
        }),
    }
}

/// The token with the fixed accessor, if it exists.
async fn read_nomad_token(
    c: &reqwest::Client,
    api: &str,
    management: &str,
) -> Result<Option<Zeroizing<String>>, TokenError> {
    const WHAT: &str = "token read";
    let r = c
        .get(format!("{api}/v1/acl/token/{NOMAD_TOKEN_ACCESSOR}"))
        .header("X-Consul-Token", management)
        .send()
        .await
        .map_err(|e| TokenError::Request {
            what: WHAT,
            source: e.without_url(),
        })?;
    match r.status().as_u16() {
        200 => r
            .json::<TokenResp>()
            .await
            .map(|t| Some(Zeroizing::new(t.secret_id)))
            .map_err(|_| TokenError::Parse { what: WHAT }),
        // Consul answers an unknown accessor with 403 "ACL not found".
        403 if r.text().await.unwrap_or_default().contains("ACL not found") => Ok(None),
        status => Err(TokenError::Status { what: WHAT, status }),
    }
}

// ----- DNS -----------------------------------------------------------------------------------------------
//
// Consul answers DNS queries with the agent's default token, the anonymous token unless `acl.tokens.default`
// is set; with `default_policy = "deny"` it then answers nothing. Consul's documented setup for DNS with ACLs
// gives the anonymous token a policy that reads nodes and services (what a DNS answer exposes, and no more).

pub const DNS_POLICY: &str = "hashistack-dns";
/// The anonymous token's fixed accessor ID in Consul.
pub const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";

/// Rules of the DNS policy: read node and service names and addresses.
pub fn dns_rules() -> serde_json::Value {
    serde_json::json!({
        "node_prefix": {"": {"policy": "read"}},
        "service_prefix": {"": {"policy": "read"}}
    })
}

/// Why the DNS policy could not be set. Never carries a token or a response body.
#[derive(Debug, thiserror::Error)]
pub enum DnsPolicyError {
    #[error("Consul DNS policy: {0}")]
    Client(#[from] crate::services::health::HttpsClientError),
    #[error("Consul DNS policy: {what}: {source}")]
    Request {
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("Consul DNS policy: {what}: HTTP {status}")]
    Status { what: &'static str, status: u16 },
}

#[derive(Serialize)]
struct AnonymousUpdate<'a> {
    #[serde(rename = "AccessorID")]
    accessor_id: &'a str,
    #[serde(rename = "Description")]
    description: &'a str,
    #[serde(rename = "Policies")]
    policies: Vec<PolicyLink<'a>>,
}

/// Creates the policy `hashistack-dns` (or finds it) and links it to the anonymous token. Idempotent.
pub async fn ensure_dns_policy(
    api: &str,
    ca_file: &Path,
    management: &str,
) -> Result<(), DnsPolicyError> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(20))
        .map_err(DnsPolicyError::Client)?;
    let policy = PolicyReq {
        name: DNS_POLICY,
        description: "hashistack: DNS answers (anonymous token: read nodes and services)",
        rules: dns_rules().to_string(),
    };
    let r = c
        .put(format!("{api}/v1/acl/policy"))
        .header("X-Consul-Token", management)
        .json(&policy)
        .send()
        .await
        .map_err(|e| DnsPolicyError::Request {
            what: "dns policy",
            source: e.without_url(),
        })?;
    let status = r.status().as_u16();
    if status != 200
        && !r
            .text()
            .await
            .unwrap_or_default()
            .contains("already exists")
    {
        return Err(DnsPolicyError::Status {
            what: "dns policy",
            status,
        });
    }
    let update = AnonymousUpdate {
        accessor_id: ANONYMOUS_ACCESSOR,
        description: "Anonymous Token (hashistack: DNS answers)",
        policies: vec![PolicyLink { name: DNS_POLICY }],
    };
    let r = c
        .put(format!("{api}/v1/acl/token/{ANONYMOUS_ACCESSOR}"))
        .header("X-Consul-Token", management)
        .json(&update)
        .send()
        .await
        .map_err(|e| DnsPolicyError::Request {
            what: "anonymous token",
            source: e.without_url(),
        })?;
    match r.status().as_u16() {
        200 => Ok(()),
        status => Err(DnsPolicyError::Status {
            what: "anonymous token",
            status,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nomad_rules_are_the_documented_minimum() {
        assert_eq!(
            nomad_rules(),
            serde_json::json!({
                "agent_prefix": {"": {"policy": "read"}},
                "node_prefix": {"": {"policy": "read"}},
                "service_prefix": {"": {"policy": "write"}}
            })
        );
        let text = nomad_rules().to_string();
        for absent in ["\"acl\"", "key_prefix", "operator", "mesh"] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
    }

    #[test]
    fn the_accessor_is_a_uuid() {
        let parts: Vec<_> = NOMAD_TOKEN_ACCESSOR.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert!(NOMAD_TOKEN_ACCESSOR
            .chars()
            .all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
