//! Consul ACL bootstrap. Consul 1.8 (the lab) has no caller-chosen `BootstrapSecret`, so the token is
//! escrowed right after `PUT /v1/acl/bootstrap` returns it; "legacy mode" and "no leader" answers are
//! retried, "ACL bootstrap no longer allowed (reset index: N)" is final.

use super::{Tier, TierFailure};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub struct ConsulTier {
    pub api: String,
    pub ca_file: PathBuf,
    /// The shared cluster-material Key Vault (client, URI), where tokens for other nodes are handed over.
    pub shared: Option<(crate::azure::Azure, String)>,
    pub cluster: String,
}

#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct BootstrapResponse {
    #[serde(rename = "AccessorID")]
    accessor_id: String,
    #[serde(rename = "SecretID")]
    secret_id: String,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct ConsulSecrets {
    pub kind: String,
    pub accessor_id: String,
    pub secret_id: String,
}

/// Classifies an ACL bootstrap answer that is not 200.
pub fn classify(status: u16, body: &str) -> Result<(), TierFailure> {
    if body.contains("no longer allowed") {
        return Err(TierFailure::AlreadyDone(
            body.trim().chars().take(200).collect(),
        ));
    }
    if body.contains("legacy mode") || body.contains("No cluster leader") || status >= 500 {
        return Ok(()); // retryable
    }
    Err(TierFailure::Other(format!("ACL bootstrap: HTTP {status}")))
}

impl ConsulTier {
    fn client(&self, timeout: Duration) -> Result<reqwest::Client, String> {
        crate::services::health::client_for(&self.ca_file, timeout)
    }
}

#[async_trait::async_trait]
impl Tier for ConsulTier {
    fn name(&self) -> &'static str {
        "consul"
    }

    async fn wait_ready(&self, deadline: Duration) -> Result<(), String> {
        let c = self.client(Duration::from_secs(5))?;
        let start = std::time::Instant::now();
        loop {
            let leader = async {
                let r = c
                    .get(format!("{}/v1/status/leader", self.api))
                    .send()
                    .await
                    .ok()?;
                r.json::<String>().await.ok().filter(|l| !l.is_empty())
            };
            if leader.await.is_some() {
                return Ok(());
            }
            if start.elapsed() > deadline {
                return Err(format!("local Consul has no leader within {deadline:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn already_bootstrapped(&self) -> Result<Option<bool>, String> {
        Ok(None)
    }

    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        let c = self
            .client(Duration::from_secs(120))
            .map_err(TierFailure::Other)?;
        let start = std::time::Instant::now();
        loop {
            let resp = match c.put(format!("{}/v1/acl/bootstrap", self.api)).send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() && start.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    return Err(TierFailure::Other(format!(
                        "ACL bootstrap: {}",
                        e.without_url()
                    )))
                }
            };
            let status = resp.status().as_u16();
            let mut bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            if status == 200 {
                let parsed: Result<BootstrapResponse, _> = serde_json::from_slice(&bytes);
                bytes.zeroize();
                let mut r = parsed.map_err(|_| {
                    TierFailure::Other("ACL bootstrap response did not parse".into())
                })?;
                let secrets = ConsulSecrets {
                    kind: "consul-acl-bootstrap".into(),
                    accessor_id: std::mem::take(&mut r.accessor_id),
                    secret_id: std::mem::take(&mut r.secret_id),
                };
                return Ok(crate::escrow::payload(&secrets));
            }
            let text = String::from_utf8_lossy(&bytes).to_string();
            classify(status, &text)?;
            if start.elapsed() > Duration::from_secs(120) {
                return Err(TierFailure::Other(format!(
                    "ACL bootstrap: still HTTP {status} after 120s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn configure(&self, secrets: &[u8]) -> Result<(), String> {
        let s: ConsulSecrets = serde_json::from_slice(secrets)
            .map_err(|_| "escrow payload did not parse".to_string())?;
        let management = Zeroizing::new(s.secret_id.clone());
        drop(s);
        if let Some((az, vault)) = &self.shared {
            let token =
                super::consul_tokens::create_agent_token(&self.api, &self.ca_file, &management)
                    .await?;
            crate::material::put_secret(
                az,
                vault,
                &super::consul_tokens::agent_token_secret(&self.cluster),
                &token,
            )
            .await
            .map_err(|e| e.to_string())?;
            // The read-only token of `hashistack-agent status` (docs/status.md#status-tokens).
            let status =
                crate::status::tokens::create_consul(&self.api, &self.ca_file, &management).await?;
            let shared = (az.clone(), vault.clone());
            crate::status::tokens::hand_over(
                &shared,
                crate::status::tokens::CONSUL_SECRET,
                &status,
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_answers_are_classified() {
        assert!(classify(500, "The ACL system is currently in legacy mode.").is_ok());
        assert!(classify(500, "No cluster leader").is_ok());
        assert!(classify(503, "").is_ok());
        assert!(matches!(
            classify(403, "Permission denied: rpc error making call: ACL bootstrap no longer allowed (reset index: 11)"),
            Err(TierFailure::AlreadyDone(m)) if m.contains("reset index: 11")
        ));
        assert!(matches!(classify(400, "bad"), Err(TierFailure::Other(_))));
    }
}
