//! Each tier's snapshot credential, created once by the tier's bootstrap with the fresh root credential and kept
//! in the servers Key Vault (`<cluster>-<tier>-snapshot-token`), which only the server tiers' identities read; the
//! tier's leader reads it at every snapshot (snapshot/mod.rs). Rules and names in names.rs;
//! docs/trust-model.md says who can read it and what it allows.

use super::http::CallError;
use super::TierError;
use crate::azure::Azure;
use crate::names::{
    CONSUL_SNAPSHOT_POLICY, CONSUL_SNAPSHOT_RULES, NOMAD_SNAPSHOT_TOKEN_NAME,
    VAULT_SNAPSHOT_POLICY, VAULT_SNAPSHOT_RULES, VAULT_TOKEN_PERIOD,
};
use crate::retry::{retry, Attempt, RetryPolicy};
use std::path::Path;
use std::time::Duration;
use zeroize::Zeroizing;

/// Where a tier's bootstrap puts its snapshot credential.
#[derive(Clone)]
pub struct HandOver {
    pub az: Azure,
    /// The servers vault's URI.
    pub servers_vault: String,
    pub cluster: String,
}

impl HandOver {
    pub async fn put(&self, tier: &str, token: &str) -> Result<(), TierError> {
        crate::material::put_secret(
            &self.az,
            &self.servers_vault,
            &crate::names::snapshot_token_secret(&self.cluster, tier),
            token,
        )
        .await
        .map_err(|source| TierError::HandOver {
            what: "snapshot credential hand-over",
            source,
        })
    }
}

fn settle() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_secs(60),
        attempt_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_millis(500),
    }
}

/// What a refused write says when the object exists (Consul: "Invalid Policy: A Policy with Name … already exists").
const ALREADY_EXISTS: &str = "already exists";

/// One call: the body on 2xx; otherwise whether to try again (no answer, 429, 5xx, Consul's "legacy mode"
/// right after its ACL bootstrap) and the call and status (never a body with a token).
async fn send(req: reqwest::RequestBuilder, what: &str) -> Attempt<Zeroizing<Vec<u8>>, CallError> {
    let r = match req.send().await {
        Ok(r) => r,
        Err(e) => return Attempt::Retry(CallError::transport(what, e)),
    };
    let status = r.status().as_u16();
    let body = Zeroizing::new(r.bytes().await.map(|b| b.to_vec()).unwrap_or_default());
    if (200..300).contains(&status) {
        return Attempt::Done(body);
    }
    let text = String::from_utf8_lossy(&body);
    let legacy = text.contains("legacy mode");
    let e = if text.contains(ALREADY_EXISTS) {
        CallError::refused(what, status, ALREADY_EXISTS)
    } else {
        CallError::status(what, status)
    };
    if status >= 500 || status == 429 || legacy {
        Attempt::Retry(e)
    } else {
        Attempt::Fail(e)
    }
}

/// Whether a refusal says the object exists.
fn already_exists(e: &CallError) -> bool {
    matches!(e, CallError::Status { detail, .. } if detail == ALREADY_EXISTS)
}

fn client(ca_file: &Path, timeout: Duration) -> Result<reqwest::Client, CallError> {
    crate::services::health::client_for(ca_file, timeout)
        .map_err(|e| CallError::Client(e.to_string()))
}

/// Consul: the `hashistack-snapshot` policy (`acl = "write"`) and a token for it.
pub async fn create_consul(
    api: &str,
    ca_file: &Path,
    management: &str,
) -> Result<Zeroizing<String>, TierError> {
    let c = client(ca_file, Duration::from_secs(10))?;
    retry(settle(), |_| {
        let req = c
            .put(format!("{api}/v1/acl/policy"))
            .header("X-Consul-Token", management)
            .json(&serde_json::json!({
                "Name": CONSUL_SNAPSHOT_POLICY,
                "Description": "hashistack-agent snapshot: GET /v1/snapshot needs ACL write",
                "Rules": CONSUL_SNAPSHOT_RULES,
            }));
        async move {
            match send(req, "snapshot policy").await {
                Attempt::Fail(e) if already_exists(&e) => Attempt::Done(()),
                Attempt::Done(_) => Attempt::Done(()),
                Attempt::Retry(e) => Attempt::Retry(e),
                Attempt::RetryAfter(e, after) => Attempt::RetryAfter(e, after),
                Attempt::Fail(e) => Attempt::Fail(e),
            }
        }
    })
    .await?;
    let body = retry(settle(), |_| {
        let req = c
            .put(format!("{api}/v1/acl/token"))
            .header("X-Consul-Token", management)
            .json(&serde_json::json!({
                "Description": "hashistack-agent snapshot",
                "Policies": [{"Name": CONSUL_SNAPSHOT_POLICY}],
            }));
        async move { send(req, "snapshot token").await }
    })
    .await?;
    Ok(super::http::acl_secret(&body, "snapshot token")?)
}

/// Vault: the `hashistack-snapshot` policy (read `sys/storage/raft/snapshot`, renew itself) and an orphan periodic
/// token for it.
pub async fn create_vault(
    api: &str,
    ca_file: &Path,
    root: &str,
) -> Result<Zeroizing<String>, TierError> {
    let c = client(ca_file, Duration::from_secs(30))?;
    retry(settle(), |_| {
        let req = c
            .put(format!("{api}/v1/sys/policies/acl/{VAULT_SNAPSHOT_POLICY}"))
            .header("X-Vault-Token", root)
            .json(&serde_json::json!({"policy": VAULT_SNAPSHOT_RULES}));
        async move { send(req, "snapshot policy").await }
    })
    .await?;
    let body = retry(settle(), |_| {
        let req = c
            .post(format!("{api}/v1/auth/token/create-orphan"))
            .header("X-Vault-Token", root)
            .json(&serde_json::json!({
                "policies": [VAULT_SNAPSHOT_POLICY],
                "no_default_policy": true,
                "period": VAULT_TOKEN_PERIOD,
                "renewable": true,
                "display_name": "hashistack-snapshot",
                "meta": {"purpose": "hashistack-agent snapshot"},
            }));
        async move { send(req, "snapshot token").await }
    })
    .await?;
    Ok(super::http::vault_client_token(&body, "snapshot token")?)
}

/// Nomad: a management token named `hashistack snapshot` (Nomad < 2.0 saves snapshots for management tokens
/// only). An earlier run's token is found by name and reused.
pub async fn create_nomad(
    api: &str,
    ca_file: &Path,
    management: &str,
) -> Result<Zeroizing<String>, TierError> {
    let c = client(ca_file, Duration::from_secs(10))?;
    #[derive(serde::Deserialize)]
    struct Stub {
        #[serde(rename = "AccessorID")]
        accessor_id: String,
        #[serde(rename = "Name", default)]
        name: String,
        #[serde(rename = "Type", default)]
        kind: String,
    }
    let body = retry(settle(), |_| {
        let c = c.clone();
        async move {
            let list = match send(
                c.get(format!("{api}/v1/acl/tokens"))
                    .header("X-Nomad-Token", management),
                "snapshot token list",
            )
            .await
            {
                Attempt::Done(b) => b,
                Attempt::Retry(e) => return Attempt::Retry(e),
                Attempt::RetryAfter(e, after) => return Attempt::RetryAfter(e, after),
                Attempt::Fail(e) => return Attempt::Fail(e),
            };
            let Ok(stubs) = serde_json::from_slice::<Vec<Stub>>(&list) else {
                return Attempt::Fail(CallError::unparsable("snapshot token list"));
            };
            let req = match stubs
                .iter()
                .find(|t| t.name == NOMAD_SNAPSHOT_TOKEN_NAME && t.kind == "management")
            {
                Some(t) => c
                    .get(format!("{api}/v1/acl/token/{}", t.accessor_id))
                    .header("X-Nomad-Token", management),
                None => c
                    .put(format!("{api}/v1/acl/token"))
                    .header("X-Nomad-Token", management)
                    .json(&serde_json::json!({
                        "Name": NOMAD_SNAPSHOT_TOKEN_NAME,
                        "Type": "management",
                        "Global": true,
                    })),
            };
            send(req, "snapshot token").await
        }
    })
    .await?;
    Ok(super::http::acl_secret(&body, "snapshot token")?)
}
