//! Least-privilege Consul agent token, created right after the ACL bootstrap with the management token and
//! handed to every node through the shared Key Vault (`<cluster>-consul-agent-token`). Agents render it as
//! `acl.tokens.agent` and reload Consul (ACL tokens are reloadable on SIGHUP).

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
) -> Result<Zeroizing<String>, String> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(20))?;
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
        .map_err(|e| format!("agent policy: {}", e.without_url()))?;
    let status = r.status().as_u16();
    // An earlier, interrupted run may have created it already ("Invalid Policy: A Policy with Name … already exists").
    if status != 200
        && !r
            .text()
            .await
            .unwrap_or_default()
            .contains("already exists")
    {
        return Err(format!("agent policy: HTTP {status}"));
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
        .map_err(|e| format!("agent token: {}", e.without_url()))?;
    if !r.status().is_success() {
        return Err(format!("agent token: HTTP {}", r.status().as_u16()));
    }
    let t: TokenResp = r
        .json()
        .await
        .map_err(|_| "agent token response did not parse".to_string())?;
    Ok(Zeroizing::new(t.secret_id))
}
