//! The read-only status tokens, created once by each tier's bootstrap with the fresh root credential and handed
//! over through the status Key Vault, where only the jumpbox may read them (status/tokens.rs reads them; names and
//! policies in names.rs). See docs/status.md#status-tokens.

use super::http::CallError;
use crate::azure::Azure;
use crate::names::{CONSUL_POLICY, CONSUL_RULES, VAULT_POLICY, VAULT_RULES, VAULT_TOKEN_PERIOD};
use crate::retry::{retry, Attempt, RetryPolicy};
use std::path::Path;
use std::time::Duration;
use zeroize::Zeroizing;

/// While the servers settle after the bootstrap: a short fixed rhythm up to `deadline`.
fn settle(deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        deadline,
        attempt_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_millis(500),
    }
}

/// Stores a status token in the status Key Vault (`vault`: client and URI; at bootstrap; 403 is retried while role assignments apply).
pub async fn hand_over(
    vault: &(Azure, String),
    name: &str,
    value: &str,
) -> Result<(), super::TierError> {
    let (az, vault) = vault;
    crate::material::put_secret(az, vault, name, value)
        .await
        .map_err(|source| super::TierError::HandOver {
            what: "status token hand-over",
            source,
        })
}

/// What a refused write says when the object exists (Consul: "Invalid Policy: A Policy with Name … already exists").
const ALREADY_EXISTS: &str = "already exists";

async fn send_json(
    req: reqwest::RequestBuilder,
    what: &str,
) -> Result<Zeroizing<Vec<u8>>, CallError> {
    let r = req
        .send()
        .await
        .map_err(|e| CallError::transport(what, e))?;
    let status = r.status().as_u16();
    let bytes = Zeroizing::new(r.bytes().await.map(|b| b.to_vec()).unwrap_or_default());
    if (200..300).contains(&status) {
        Ok(bytes)
    } else if String::from_utf8_lossy(&bytes).contains(ALREADY_EXISTS) {
        Err(CallError::refused(what, status, ALREADY_EXISTS))
    } else {
        Err(CallError::status(what, status))
    }
}

/// Whether a refusal says the object exists.
fn already_exists(e: &CallError) -> bool {
    matches!(e, CallError::Status { detail, .. } if detail == ALREADY_EXISTS)
}

/// Creates the Consul `operator-read` policy and a token for it with the management token; returns the token.
/// Retried for up to a minute while the servers settle after the ACL bootstrap.
pub async fn create_consul(
    api: &str,
    ca_file: &Path,
    management: &str,
) -> Result<Zeroizing<String>, CallError> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(10))
        .map_err(|e| CallError::Client(e.to_string()))?;
    retry(settle(Duration::from_secs(60)), |_| {
        let req = c
            .put(format!("{api}/v1/acl/policy"))
            .header("X-Consul-Token", management)
            .json(&serde_json::json!({
                "Name": CONSUL_POLICY,
                "Description": "hashistack-agent status: read raft, autopilot, members and catalog",
                "Rules": CONSUL_RULES,
            }));
        async move {
            match send_json(req, "status policy").await {
                Ok(_) => Attempt::Done(()),
                // An earlier, interrupted run created it: the token only needs its name.
                Err(e) if already_exists(&e) => Attempt::Done(()),
                Err(e) => Attempt::Retry(e),
            }
        }
    })
    .await
    .map_err(|e| e.last().clone())?;
    let req = c
        .put(format!("{api}/v1/acl/token"))
        .header("X-Consul-Token", management)
        .json(&serde_json::json!({
            "Description": "hashistack-agent status (read-only)",
            "Policies": [{"Name": CONSUL_POLICY}],
        }));
    let body = send_json(req, "status token").await?;
    super::http::acl_secret(&body, "status token")
}

/// Creates the Vault `status-read` policy and an orphan periodic token for it with the root token.
pub async fn create_vault(
    api: &str,
    ca_file: &Path,
    root: &str,
) -> Result<Zeroizing<String>, CallError> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(30))
        .map_err(|e| CallError::Client(e.to_string()))?;
    // Right after the unseal a standby or a settling raft may answer 5xx: retry those briefly.
    retry(settle(Duration::from_secs(30)), |_| {
        let req = c
            .put(format!("{api}/v1/sys/policies/acl/{VAULT_POLICY}"))
            .header("X-Vault-Token", root)
            .json(&serde_json::json!({"policy": VAULT_RULES}));
        async move {
            match send_json(req, "status policy").await {
                Ok(_) => Attempt::Done(()),
                Err(e) if e.status_code().is_some_and(|s| s < 500) => Attempt::Fail(e),
                Err(e) => Attempt::Retry(e),
            }
        }
    })
    .await
    .map_err(|e| e.last().clone())?;
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
    let body = send_json(req, "status token").await?;
    super::http::vault_client_token(&body, "status token")
}
