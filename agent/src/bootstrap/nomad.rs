//! Nomad ACL bootstrap with a caller-chosen `BootstrapSecret` (Nomad ≥ 1.3.2): the secret is generated
//! here, escrowed to both targets by the protocol ([`Tier::pre_secret`]) and only then sent to
//! `POST /v1/acl/bootstrap`. Because the secret is known, the call is idempotent: a retry that finds
//! "ACL bootstrap already done" checks `GET /v1/acl/token/self` with our secret, and success means our own
//! earlier attempt landed. "No cluster leader" and other 5xx answers are retried; "already done" with
//! someone else's token is final (the protocol's needs-operator path, or the previous leader's escrow).

use super::{Tier, TierFailure};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// How long the bootstrap call keeps retrying retryable answers.
const BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(120);

pub struct NomadTier {
    pub api: String,
    pub ca_file: PathBuf,
    /// The `BootstrapSecret` (a UUID), generated once per run and escrowed before use.
    secret: Zeroizing<String>,
}

/// What is escrowed for the Nomad tier. Before the call `accessor_id` is empty (the server chooses it).
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct NomadSecrets {
    pub kind: String,
    pub accessor_id: String,
    pub secret_id: String,
}

#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct TokenResponse {
    #[serde(rename = "AccessorID")]
    accessor_id: String,
    #[serde(rename = "SecretID")]
    secret_id: String,
}

/// What a non-200 ACL bootstrap answer means.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// No leader yet, an election, a 5xx: try again.
    Retry,
    /// "ACL bootstrap already done (reset index: N)": final unless the token is ours.
    AlreadyDone(String),
    /// Anything else (ACLs disabled, a bad reset index, a rejected secret): final.
    Final(String),
}

/// Classifies an ACL bootstrap answer that is not 200. Nomad ≥ 1.4 answers "already done" with 400,
/// older versions with 500 and an "rpc error:" prefix: the text decides, not the status.
pub fn classify(status: u16, body: &str) -> Answer {
    let short: String = body.trim().chars().take(200).collect();
    if body.contains("ACL bootstrap already done") {
        return Answer::AlreadyDone(short);
    }
    if body.contains("Invalid bootstrap reset index")
        || body.contains("ACL support disabled")
        || body.contains("invalid acl token")
    {
        return Answer::Final(format!("ACL bootstrap: HTTP {status}: {short}"));
    }
    if body.contains("No cluster leader") || status >= 500 || status == 429 {
        return Answer::Retry;
    }
    Answer::Final(format!("ACL bootstrap: HTTP {status}: {short}"))
}

/// A random UUID v4 from the system RNG (aws-lc).
pub fn new_uuid() -> Zeroizing<String> {
    let mut b = Zeroizing::new([0u8; 16]);
    aws_lc_rs::rand::fill(&mut b[..]).expect("system RNG");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = Zeroizing::new(hex::encode(&b[..]));
    Zeroizing::new(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

impl NomadTier {
    pub fn new(api: String, ca_file: PathBuf) -> Self {
        NomadTier {
            api,
            ca_file,
            secret: new_uuid(),
        }
    }

    fn client(&self, timeout: Duration) -> Result<reqwest::Client, String> {
        crate::services::health::client_for(&self.ca_file, timeout)
    }

    fn payload(&self, accessor_id: String, secret_id: String) -> Zeroizing<Vec<u8>> {
        crate::escrow::payload(&NomadSecrets {
            kind: "nomad-acl-bootstrap".into(),
            accessor_id,
            secret_id,
        })
    }

    /// Whether our secret is a valid token (our own earlier attempt landed): its accessor ID if so.
    async fn own_token(&self, c: &reqwest::Client) -> Option<String> {
        let r = c
            .get(format!("{}/v1/acl/token/self", self.api))
            .header("X-Nomad-Token", self.secret.as_str())
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let t: TokenResponse = r.json().await.ok()?;
        (t.secret_id == *self.secret).then(|| t.accessor_id.clone())
    }
}

#[async_trait::async_trait]
impl Tier for NomadTier {
    fn name(&self) -> &'static str {
        "nomad"
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
                if !r.status().is_success() {
                    return None;
                }
                r.json::<String>().await.ok().filter(|l| !l.is_empty())
            };
            if leader.await.is_some() {
                return Ok(());
            }
            if start.elapsed() > deadline {
                return Err(format!("local Nomad has no leader within {deadline:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn already_bootstrapped(&self) -> Result<Option<bool>, String> {
        Ok(None)
    }

    fn pre_secret(&self) -> Option<Zeroizing<Vec<u8>>> {
        Some(self.payload(String::new(), self.secret.to_string()))
    }

    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        // Generous timeout: with a known secret a lost answer is harmless (the retry finds our token).
        let c = self
            .client(Duration::from_secs(60))
            .map_err(TierFailure::Other)?;
        let body = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({ "BootstrapSecret": self.secret.as_str() }))
                .expect("json"),
        );
        let start = std::time::Instant::now();
        let mut last = String::new();
        while start.elapsed() < BOOTSTRAP_DEADLINE {
            let sent = c
                .post(format!("{}/v1/acl/bootstrap", self.api))
                .header("Content-Type", "application/json")
                .body(body.to_vec())
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    // Never reached the server, or its answer was lost: both are safe to retry.
                    last = format!("ACL bootstrap: {}", e.without_url());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let mut bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            if status == 200 {
                let parsed: Result<TokenResponse, _> = serde_json::from_slice(&bytes);
                bytes.zeroize();
                let mut t = parsed.map_err(|_| {
                    TierFailure::Other("ACL bootstrap response did not parse".into())
                })?;
                if t.secret_id != *self.secret {
                    // A server that ignores BootstrapSecret (Nomad < 1.3.2): its own token is escrowed
                    // right after this call, as for tiers without a caller-chosen secret.
                    tracing::warn!(
                        "Nomad did not use the escrowed BootstrapSecret; escrowing the token it generated"
                    );
                }
                return Ok(self.payload(
                    std::mem::take(&mut t.accessor_id),
                    std::mem::take(&mut t.secret_id),
                ));
            }
            let text = String::from_utf8_lossy(&bytes).to_string();
            match classify(status, &text) {
                Answer::Retry => last = format!("ACL bootstrap: HTTP {status}"),
                Answer::AlreadyDone(detail) => {
                    return match self.own_token(&c).await {
                        Some(accessor) => {
                            tracing::info!(
                                "ACL bootstrap already done with our escrowed secret (an earlier attempt landed)"
                            );
                            Ok(self.payload(accessor, self.secret.to_string()))
                        }
                        None => Err(TierFailure::AlreadyDone(detail)),
                    };
                }
                Answer::Final(message) => return Err(TierFailure::Other(message)),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(TierFailure::Other(format!(
            "{last} (still failing after {BOOTSTRAP_DEADLINE:?})"
        )))
    }

    async fn configure(&self, _secrets: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_answers_are_classified() {
        assert_eq!(classify(500, "No cluster leader"), Answer::Retry);
        assert_eq!(classify(503, ""), Answer::Retry);
        assert!(matches!(
            classify(400, "ACL bootstrap already done (reset index: 7)"),
            Answer::AlreadyDone(m) if m.contains("reset index: 7")
        ));
        // Older Nomad: 500 with the RPC error prefix.
        assert!(matches!(
            classify(
                500,
                "rpc error: ACL bootstrap already done (reset index: 11)"
            ),
            Answer::AlreadyDone(_)
        ));
        for final_ in [
            (
                400,
                "Invalid bootstrap reset index (specified 3, reset index: 7)",
            ),
            (400, "ACL support disabled"),
            (400, "invalid acl token"),
            (403, "Permission denied"),
        ] {
            assert!(
                matches!(classify(final_.0, final_.1), Answer::Final(_)),
                "{final_:?}"
            );
        }
    }

    #[test]
    fn secrets_are_v4_uuids_and_escrowed_before_the_call() {
        let a = new_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert!(matches!(a.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
        assert_ne!(*a, *new_uuid());
        let t = NomadTier::new("https://127.0.0.1:4646".into(), "/nonexistent".into());
        let pre = t.pre_secret().expect("nomad escrows before use");
        let v: serde_json::Value = serde_json::from_slice(&pre).unwrap();
        assert_eq!(v["kind"], "nomad-acl-bootstrap");
        assert_eq!(v["secret_id"].as_str().unwrap(), t.secret.as_str());
        assert_eq!(v["accessor_id"], "");
    }
}
