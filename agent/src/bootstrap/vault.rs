//! Vault/OpenBao bootstrap: `PUT /v1/sys/init` with recovery shares (auto-unseal), then an audit device
//! and raft autopilot with dead-server cleanup (scale sets replace VMs).

use super::{Tier, TierFailure};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Operators' PGP public keys (base64 of the binary key, as `vault operator init -recovery-pgp-keys` takes):
/// with them, Vault returns each recovery key encrypted to one operator, and the root token to another.
#[derive(Debug, Clone, Default)]
pub struct PgpKeys {
    pub recovery: Vec<String>,
    pub root_token: Option<String>,
}

/// The `PUT /v1/sys/init` body for an auto-unsealed Vault.
#[derive(Debug, Serialize, PartialEq)]
pub struct InitRequest {
    pub recovery_shares: u8,
    pub recovery_threshold: u8,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recovery_pgp_keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_token_pgp_key: Option<String>,
}

pub fn init_request(shares: u8, threshold: u8, pgp: &PgpKeys) -> InitRequest {
    InitRequest {
        recovery_shares: shares,
        recovery_threshold: threshold,
        recovery_pgp_keys: pgp.recovery.clone(),
        root_token_pgp_key: pgp.root_token.clone(),
    }
}

pub struct VaultTier {
    pub pgp: PgpKeys,
    pub api: String,
    pub ca_file: PathBuf,
    pub recovery_shares: u8,
    pub recovery_threshold: u8,
    pub servers: u8,
    pub audit_file: PathBuf,
    /// The shared cluster-material Key Vault (client, URI), where tokens for other nodes are handed over.
    pub shared: Option<(crate::azure::Azure, String)>,
}

#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct InitResponse {
    #[serde(default)]
    recovery_keys_base64: Vec<String>,
    root_token: String,
}

/// What is escrowed for the Vault tier.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct VaultSecrets {
    pub kind: String,
    pub recovery_keys_base64: Vec<String>,
    pub recovery_threshold: u8,
    pub root_token: String,
}

#[derive(Deserialize)]
struct SealStatus {
    initialized: bool,
    sealed: bool,
}

impl VaultTier {
    fn client(&self, timeout: Duration) -> Result<reqwest::Client, String> {
        crate::services::health::client_for(&self.ca_file, timeout)
    }

    async fn seal_status(&self) -> Result<SealStatus, String> {
        let c = self.client(Duration::from_secs(5))?;
        let r = c
            .get(format!("{}/v1/sys/seal-status", self.api))
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        r.json::<SealStatus>()
            .await
            .map_err(|_| "seal-status did not parse".to_string())
    }
}

#[async_trait::async_trait]
impl Tier for VaultTier {
    fn name(&self) -> &'static str {
        "vault"
    }

    async fn wait_ready(&self, deadline: Duration) -> Result<(), String> {
        let start = std::time::Instant::now();
        loop {
            match self.seal_status().await {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > deadline => {
                    return Err(format!(
                        "local Vault not answering within {deadline:?}: {e}"
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn already_bootstrapped(&self) -> Result<Option<bool>, String> {
        Ok(Some(self.seal_status().await?.initialized))
    }

    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        // Generous timeout: an init that succeeded on the server while the client gave up would leave the
        // secrets nowhere. Only a connection that never reached the server is retried.
        let c = self
            .client(Duration::from_secs(180))
            .map_err(TierFailure::Other)?;
        let body = init_request(self.recovery_shares, self.recovery_threshold, &self.pgp);
        let mut attempts = 0;
        let resp = loop {
            attempts += 1;
            match c
                .put(format!("{}/v1/sys/init", self.api))
                .json(&body)
                .send()
                .await
            {
                Ok(r) => break r,
                Err(e) if e.is_connect() && attempts < 10 => {
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
                Err(e) => return Err(TierFailure::Other(format!("init: {}", e.without_url()))),
            }
        };
        let status = resp.status().as_u16();
        let mut bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        if status == 400 && String::from_utf8_lossy(&bytes).contains("already initialized") {
            return Err(TierFailure::AlreadyDone(
                "Vault is already initialized".into(),
            ));
        }
        if status != 200 {
            bytes.zeroize();
            return Err(TierFailure::Other(format!("init: HTTP {status}")));
        }
        let parsed: Result<InitResponse, _> = serde_json::from_slice(&bytes);
        bytes.zeroize();
        let mut init =
            parsed.map_err(|_| TierFailure::Other("init response did not parse".into()))?;
        let secrets = VaultSecrets {
            kind: "vault-init".into(),
            recovery_keys_base64: std::mem::take(&mut init.recovery_keys_base64),
            recovery_threshold: self.recovery_threshold,
            root_token: std::mem::take(&mut init.root_token),
        };
        Ok(crate::escrow::payload(&secrets))
    }

    async fn configure(&self, secrets: &[u8]) -> Result<(), String> {
        let s: VaultSecrets = serde_json::from_slice(secrets)
            .map_err(|_| "escrow payload did not parse".to_string())?;
        let token = Zeroizing::new(s.root_token.clone());
        drop(s);
        if self.pgp.root_token.is_some() {
            return Err("post-bootstrap configuration skipped: the root token is PGP-encrypted to an operator; \
                        see docs/bootstrap.md#finish-configuration"
                .into());
        }
        // Auto-unseal follows init within seconds; the active node then takes writes.
        let start = std::time::Instant::now();
        loop {
            match self.seal_status().await {
                Ok(st) if !st.sealed => break,
                _ if start.elapsed() > Duration::from_secs(60) => {
                    return Err("Vault did not unseal within 60s of init".into())
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        let c = self.client(Duration::from_secs(30))?;
        let send = |method: reqwest::Method, path: &str, body: serde_json::Value| {
            c.request(method, format!("{}{path}", self.api))
                .header("X-Vault-Token", token.as_str())
                .json(&body)
                .send()
        };
        let mut last = String::new();
        for _ in 0..40 {
            let audit = send(
                reqwest::Method::PUT,
                "/v1/sys/audit/file",
                serde_json::json!({"type": "file", "options": {"file_path": self.audit_file.display().to_string()}}),
            )
            .await;
            match audit {
                Ok(r) if r.status().is_success() => {
                    last.clear();
                    break;
                }
                Ok(r) if r.status().as_u16() == 400 => {
                    let body = r.text().await.unwrap_or_default();
                    if body.contains("already in use") {
                        // Enabled by an earlier run.
                        last.clear();
                    } else {
                        // OpenBao refuses audit devices through the API (they are declared in its config
                        // file); say so instead of claiming success.
                        last = "audit device not enabled: the server refuses API-enabled audit devices (HTTP 400); \
                                see docs/bootstrap.md#finish-configuration"
                            .to_string();
                    }
                    break;
                }
                Ok(r) => last = format!("audit device: HTTP {}", r.status().as_u16()),
                Err(e) => last = format!("audit device: {}", e.without_url()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let audit_problem = last;
        let min_quorum = (self.servers / 2 + 1).max(3).min(self.servers.max(1));
        // Right after the unseal, raft may still answer 500 for a moment: retry briefly.
        let mut autopilot = Err(String::new());
        for _ in 0..40 {
            autopilot = match send(
                reqwest::Method::POST,
                "/v1/sys/storage/raft/autopilot/configuration",
                serde_json::json!({"cleanup_dead_servers": true, "dead_server_last_contact_threshold": "10m", "min_quorum": min_quorum}),
            )
            .await
            {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("autopilot: HTTP {}", r.status().as_u16())),
                Err(e) => Err(format!("autopilot: {}", e.without_url())),
            };
            if autopilot.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The read-only token of `hashistack-agent status` (docs/status.md#status-tokens): orphan, periodic.
        // Created whatever became of the autopilot configuration.
        let status_token = match &self.shared {
            Some(shared) => {
                match crate::status::tokens::create_vault(&self.api, &self.ca_file, &token).await {
                    Ok(t) => {
                        crate::status::tokens::hand_over(
                            shared,
                            crate::status::tokens::VAULT_SECRET,
                            &t,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }
            }
            None => Ok(()),
        };
        autopilot?;
        status_token?;
        if audit_problem.is_empty() {
            Ok(())
        } else {
            Err(audit_problem)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_request_without_and_with_pgp_keys() {
        let plain = serde_json::to_value(init_request(5, 3, &PgpKeys::default())).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({"recovery_shares": 5, "recovery_threshold": 3})
        );
        let pgp = PgpKeys {
            recovery: vec!["a".into(), "b".into(), "c".into()],
            root_token: Some("r".into()),
        };
        let with = serde_json::to_value(init_request(3, 2, &pgp)).unwrap();
        assert_eq!(
            with,
            serde_json::json!({"recovery_shares": 3, "recovery_threshold": 2, "recovery_pgp_keys": ["a", "b", "c"], "root_token_pgp_key": "r"})
        );
    }
}
