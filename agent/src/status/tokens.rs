//! The read-only status tokens: created once by each tier's bootstrap (with the fresh root credential),
//! handed over through the status Key Vault (tag `hashistack-status-vault-uri`: server tiers write it, only the
//! jumpbox identity reads it), fetched by `hashistack-agent status`.
//! See docs/status.md#status-tokens for who can read them.

use super::model::TokenState;
use crate::azure::Azure;
use crate::retry::RetryPolicy;
use std::path::Path;
use std::time::Duration;
use zeroize::Zeroizing;

/// Key Vault secret names in the status vault.
pub const CONSUL_SECRET: &str = "status-consul-token";
pub const VAULT_SECRET: &str = "status-vault-token";
pub const NOMAD_SECRET: &str = "status-nomad-token";

pub const CONSUL_POLICY: &str = "operator-read";
/// Consul ACL rules of the `operator-read` policy: raft and autopilot (operator), the member list and
/// catalog (agent, node, service) — all read-only.
pub const CONSUL_RULES: &str = r#"operator = "read"
agent_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service_prefix "" { policy = "read" }
"#;

pub const VAULT_POLICY: &str = "status-read";
/// Vault policy `status-read`: health, seal and HA status, raft configuration and autopilot state — and renewing
/// itself (the token is periodic; every `status` run renews it).
pub const VAULT_RULES: &str = r#"path "sys/health" { capabilities = ["read"] }
path "sys/seal-status" { capabilities = ["read"] }
path "sys/ha-status" { capabilities = ["read"] }
path "sys/storage/raft/configuration" { capabilities = ["read"] }
path "sys/storage/raft/autopilot/state" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
"#;
/// Period of the Vault status token (Vault caps it at the system max TTL, 768h by default).
pub const VAULT_TOKEN_PERIOD: &str = "768h";

pub const NOMAD_POLICY: &str = "status-read";
/// Nomad ACL rules of the `status-read` policy: the node list (client nodes ready or down, and the server
/// members), the agent API and the raft configuration — all read-only.
pub const NOMAD_RULES: &str = r#"node { policy = "read" }
agent { policy = "read" }
operator { policy = "read" }
"#;
/// The Nomad status token's name: a rerun of the tier's configuration finds its earlier token by it.
pub const NOMAD_TOKEN_NAME: &str = "hashistack-agent status (read-only)";

/// Stores a status token in the status Key Vault (`vault`: client and URI; at bootstrap; 403 is retried while role assignments apply).
pub async fn hand_over(vault: &(Azure, String), name: &str, value: &str) -> Result<(), String> {
    let (az, vault) = vault;
    crate::material::put_secret(az, vault, name, value)
        .await
        .map_err(|e| format!("status token hand-over: {e}"))
}

/// Fetches a status token.
pub async fn fetch(
    az: &Azure,
    vault: &str,
    name: &str,
    policy: RetryPolicy,
) -> (TokenState, Option<Zeroizing<String>>) {
    match crate::material::get_secret(az, vault, name, policy).await {
        Ok(Some(v)) if !v.is_empty() => (TokenState::Present, Some(v)),
        Ok(_) => (TokenState::Missing, None),
        Err(e) => (TokenState::Error(e.detail), None),
    }
}

async fn send_json(
    req: reqwest::RequestBuilder,
    what: &str,
) -> Result<Zeroizing<Vec<u8>>, (Option<u16>, String)> {
    let r = req
        .send()
        .await
        .map_err(|e| (None, format!("{what}: {}", e.without_url())))?;
    let status = r.status().as_u16();
    let bytes = Zeroizing::new(r.bytes().await.map(|b| b.to_vec()).unwrap_or_default());
    if (200..300).contains(&status) {
        Ok(bytes)
    } else {
        let already = String::from_utf8_lossy(&bytes).contains("already exists");
        Err((
            Some(status),
            format!(
                "{what}: HTTP {status}{}",
                if already { " (already exists)" } else { "" }
            ),
        ))
    }
}

/// Creates the Consul `operator-read` policy and a token for it with the management token; returns the token.
/// Retried for up to a minute while the servers settle after the ACL bootstrap.
pub async fn create_consul(
    api: &str,
    ca_file: &Path,
    management: &str,
) -> Result<Zeroizing<String>, String> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(10))?;
    let start = std::time::Instant::now();
    loop {
        let req = c
            .put(format!("{api}/v1/acl/policy"))
            .header("X-Consul-Token", management)
            .json(&serde_json::json!({
                "Name": CONSUL_POLICY,
                "Description": "hashistack-agent status: read raft, autopilot, members and catalog",
                "Rules": CONSUL_RULES,
            }));
        match send_json(req, "status policy").await {
            Ok(_) => break,
            // An earlier, interrupted run created it: the token only needs its name.
            Err((_, e)) if e.contains("already exists") => break,
            Err((_, e)) if start.elapsed() > Duration::from_secs(60) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let req = c
        .put(format!("{api}/v1/acl/token"))
        .header("X-Consul-Token", management)
        .json(&serde_json::json!({
            "Description": "hashistack-agent status (read-only)",
            "Policies": [{"Name": CONSUL_POLICY}],
        }));
    let body = send_json(req, "status token").await.map_err(|(_, e)| e)?;
    #[derive(serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
    struct Created {
        #[serde(rename = "SecretID")]
        secret_id: String,
    }
    let mut t: Created = serde_json::from_slice(&body)
        .map_err(|_| "status token: response did not parse".to_string())?;
    Ok(Zeroizing::new(std::mem::take(&mut t.secret_id)))
}

/// Creates the Vault `status-read` policy and an orphan periodic token for it with the root token.
pub async fn create_vault(
    api: &str,
    ca_file: &Path,
    root: &str,
) -> Result<Zeroizing<String>, String> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(30))?;
    // Right after the unseal a standby or a settling raft may answer 5xx: retry those briefly.
    let start = std::time::Instant::now();
    loop {
        let req = c
            .put(format!("{api}/v1/sys/policies/acl/{VAULT_POLICY}"))
            .header("X-Vault-Token", root)
            .json(&serde_json::json!({"policy": VAULT_RULES}));
        match send_json(req, "status policy").await {
            Ok(_) => break,
            Err((Some(s), e)) if s < 500 => return Err(e),
            Err((_, e)) if start.elapsed() > Duration::from_secs(30) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let req = c
        .post(format!("{api}/v1/auth/token/create-orphan"))
        .header("X-Vault-Token", root)
        .json(&serde_json::json!({
            "policies": [VAULT_POLICY],
            "no_default_policy": true,
            "period": VAULT_TOKEN_PERIOD,
            "renewable": true,
            "display_name": "hashistack-status",
            "meta": {"purpose": "hashistack-agent status (read-only)"},
        }));
    let body = send_json(req, "status token").await.map_err(|(_, e)| e)?;
    #[derive(serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
    struct Auth {
        client_token: String,
    }
    #[derive(serde::Deserialize)]
    struct Created {
        auth: Auth,
    }
    let mut t: Created = serde_json::from_slice(&body)
        .map_err(|_| "status token: response did not parse".to_string())?;
    Ok(Zeroizing::new(std::mem::take(&mut t.auth.client_token)))
}
