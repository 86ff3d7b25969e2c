//! Nomad ACL bootstrap with a caller-chosen `BootstrapSecret` (Nomad ≥ 1.3.2): the secret is generated
//! here, escrowed to both targets by the protocol ([`Tier::pre_secret`]) and only then sent to
//! `POST /v1/acl/bootstrap`. Because the secret is known, the call is idempotent: a retry that finds
//! "ACL bootstrap already done" checks `GET /v1/acl/token/self` with our secret, and success means our own
//! earlier attempt landed. "No cluster leader" and other 5xx answers are retried; "already done" with
//! someone else's token is final (the protocol's needs-operator path, or the previous leader's escrow).
//!
//! After the bootstrap, with the management token still in memory ([`Tier::configure`]), the tier creates
//! the read-only token of `hashistack-agent status`: the ACL policy `status-read` (node, agent and operator
//! read; [`crate::names::NOMAD_RULES`]) and a client token with it, handed over through the status
//! vault like the Consul and Vault status tokens (docs/status.md#status-tokens). Every call has a deadline
//! and a verdict per answer ([`classify_acl`]): no leader, 429 and 5xx are retried, other answers are final.
//! A rerun finds its earlier token by name and hands the same one over again instead of making another.

use super::http::{AclBootstrap, AclSecrets, TokenResponse};
pub use super::http::{Answer, CallError};
use super::{Tier, TierError, TierFailure};
use crate::retry::{retry, Attempt, RetryError, RetryPolicy};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

/// How long the bootstrap call keeps retrying retryable answers.
const BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(120);
/// Between retryable answers ("No cluster leader" while the servers elect one, 5xx): the secret escrowed before
/// use makes a resend harmless, so the call is sent as often as the floor sends it.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Deadlines of the status-token calls: right after the ACL bootstrap the servers may still settle (a
/// leader election answers "No cluster leader"), so up to a minute in all, 10 s per attempt.
pub fn status_token_policy() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_secs(60),
        attempt_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
    }
}

pub struct NomadTier {
    pub api: String,
    pub ca_file: PathBuf,
    /// The `BootstrapSecret` (a UUID), generated once per run and escrowed before use.
    secret: Zeroizing<String>,
    /// The shared cluster-material Key Vault (client, URI).
    pub shared: Option<(crate::azure::Azure, String)>,
    /// The status vault (URI; same client as `shared`): the read-only status token goes there, where only
    /// the jumpbox may read it. `None`: no status token is created.
    pub status_vault: Option<String>,
    /// The servers vault, where the tier's snapshot credential goes. `None`: none is created.
    pub snapshot: Option<super::snapshot_tokens::HandOver>,
}

/// Why an ACL call of the status-token step did not succeed (the error carries the status and Nomad's
/// error text or the transport error — never a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// Worth another attempt while the deadline allows.
    Retry(CallError),
    /// Retrying cannot help.
    Final(CallError),
}

impl<T> From<Failed> for Attempt<T, CallError> {
    fn from(f: Failed) -> Self {
        match f {
            Failed::Retry(e) => Attempt::Retry(e),
            Failed::Final(e) => Attempt::Fail(e),
        }
    }
}

/// The verdict on an answer to an ACL call (`what` names the call in the error): 2xx is done; "No cluster
/// leader", 429 and 5xx are retried (an election, a busy or settling server); any other answer is final
/// (403 `Permission denied`, 400 with Nomad's validation text, 404).
pub fn classify_acl(what: &str, status: u16, body: &str) -> Result<(), Failed> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let short: String = body.trim().chars().take(200).collect();
    let e = CallError::refused(what, status, short);
    if body.contains("No cluster leader") || status >= 500 || status == 429 {
        Err(Failed::Retry(e))
    } else {
        Err(Failed::Final(e))
    }
}

/// `GET /v1/acl/tokens` entry (no secret in it).
#[derive(Deserialize)]
struct TokenStub {
    #[serde(rename = "AccessorID")]
    accessor_id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Policies", default)]
    policies: Option<Vec<String>>,
}

/// One ACL call with the management token: the answer's body (zeroized on drop: it may hold a token), or
/// the verdict on a failure.
async fn acl_call(req: reqwest::RequestBuilder, what: &str) -> Result<Zeroizing<Vec<u8>>, Failed> {
    let r = match req.send().await {
        Ok(r) => r,
        // Never reached the server, or the answer was lost: every call here is safe to repeat (the policy
        // is an upsert; the token is looked up by name before one is created).
        Err(e) => return Err(Failed::Retry(CallError::transport(what, e))),
    };
    let status = r.status().as_u16();
    let body = Zeroizing::new(r.bytes().await.map(|b| b.to_vec()).unwrap_or_default());
    classify_acl(what, status, &String::from_utf8_lossy(&body))?;
    Ok(body)
}

/// Creates (or finds) the status policy and token with the management token: returns the token's secret
/// and whether an earlier run's token was reused. Each step is retried within `policy`.
pub async fn create_status_token(
    api: &str,
    ca_file: &Path,
    management: &str,
    policy: RetryPolicy,
) -> Result<(Zeroizing<String>, bool), RetryError<CallError>> {
    use crate::names::{NOMAD_POLICY, NOMAD_RULES, NOMAD_TOKEN_NAME};
    let c = crate::services::health::client_for(ca_file, policy.attempt_timeout)
        .map_err(|e| RetryError::Final(CallError::Client(e.to_string())))?;
    // 1. The policy: an upsert, so one that exists (an earlier run) is simply written again.
    let body = serde_json::json!({
        "Name": NOMAD_POLICY,
        "Description": "hashistack-agent status: read nodes, agent and raft (read-only)",
        "Rules": NOMAD_RULES,
    });
    retry(policy, |_| {
        let req = c
            .put(format!("{api}/v1/acl/policy/{NOMAD_POLICY}"))
            .header("X-Nomad-Token", management)
            .json(&body);
        async move {
            match acl_call(req, "status policy").await {
                Ok(_) => Attempt::Done(()),
                Err(f) => f.into(),
            }
        }
    })
    .await?;

    // 2. The token: the one an earlier run made (found by name, its secret read back), else a new one.
    //    Looking first on every attempt also makes a create whose answer was lost harmless.
    let found = retry(policy, |_| {
        let (c, api) = (c.clone(), api.to_string());
        async move {
            let list = match acl_call(
                c.get(format!("{api}/v1/acl/tokens"))
                    .header("X-Nomad-Token", management),
                "status token list",
            )
            .await
            {
                Ok(b) => b,
                Err(f) => return f.into(),
            };
            let Ok(stubs) = serde_json::from_slice::<Vec<TokenStub>>(&list) else {
                return Attempt::Fail(CallError::unparsable("status token list"));
            };
            let earlier = stubs.into_iter().find(|t| {
                t.name == NOMAD_TOKEN_NAME
                    && t.kind == "client"
                    && t.policies
                        .as_ref()
                        .is_some_and(|p| p.iter().any(|p| p == NOMAD_POLICY))
            });
            let (req, reused, what) = match &earlier {
                Some(t) => (
                    c.get(format!("{api}/v1/acl/token/{}", t.accessor_id))
                        .header("X-Nomad-Token", management),
                    true,
                    "status token read",
                ),
                None => (
                    c.put(format!("{api}/v1/acl/token"))
                        .header("X-Nomad-Token", management)
                        .json(&serde_json::json!({
                            "Name": NOMAD_TOKEN_NAME,
                            "Type": "client",
                            "Policies": [NOMAD_POLICY],
                            "Global": true,
                        })),
                    false,
                    "status token",
                ),
            };
            let body = match acl_call(req, what).await {
                Ok(b) => b,
                Err(f) => return f.into(),
            };
            match serde_json::from_slice::<TokenResponse>(&body) {
                Ok(mut t) if !t.secret_id.is_empty() => Attempt::Done((
                    Zeroizing::new(std::mem::take(&mut t.secret_id)),
                    std::mem::take(&mut t.accessor_id),
                    reused,
                )),
                _ => Attempt::Fail(CallError::unparsable(what)),
            }
        }
    })
    .await?;
    let (secret, accessor, reused) = found;
    tracing::info!(
        accessor = %accessor,
        reused,
        "Nomad status token {}",
        if reused { "found (an earlier run made it)" } else { "created" }
    );
    Ok((secret, reused))
}

/// The escrow payload's kind for the Nomad tier.
const KIND: &str = "nomad-acl-bootstrap";

/// Classifies an ACL bootstrap answer that is not 200 ("ACL bootstrap already done (reset index: N)" is
/// [`Answer::AlreadyDone`]). Nomad ≥ 1.4 answers "already done" with 400, older versions with 500 and an
/// "rpc error:" prefix: the text decides, not the status.
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

impl NomadTier {
    pub fn new(api: String, ca_file: PathBuf) -> Self {
        NomadTier {
            api,
            ca_file,
            secret: crate::ids::uuid_v4(),
            shared: None,
            status_vault: None,
            snapshot: None,
        }
    }

    fn client(&self, timeout: Duration) -> Result<reqwest::Client, CallError> {
        crate::services::health::client_for(&self.ca_file, timeout)
            .map_err(|e| CallError::Client(e.to_string()))
    }

    /// Whether our secret is a valid token (our own earlier attempt landed): its accessor ID if so, `None`
    /// when Nomad says it does not know it. Transport errors, 5xx, 429 and "No cluster leader" are asked
    /// again until `deadline`, then the question stays open (`Err`): never "someone else bootstrapped".
    async fn own_token(
        &self,
        c: &reqwest::Client,
        deadline: Duration,
    ) -> Result<Option<String>, RetryError<CallError>> {
        own_token(c, &self.api, &self.secret, deadline).await
    }
}

/// How long `token/self` (is the token ours?) may take through retryable answers.
const CHECK_DEADLINE: Duration = Duration::from_secs(30);

/// What one `GET /v1/acl/token/self` answer says about our secret.
#[derive(Debug, PartialEq, Eq)]
pub enum SelfAnswer {
    /// 200 naming our secret: its accessor ID.
    Ours(String),
    /// Nomad does not know the secret (403/404 "ACL token not found"), or a 200 for another token.
    NotOurs,
    /// Ask again: no leader, 429, 5xx (and transport errors, classified before any answer).
    Retry(CallError),
    /// Retrying cannot help (another 4xx, an answer that does not parse).
    Final(CallError),
}

/// The verdict on a `token/self` answer (`secret`: ours, compared with the answer's `SecretID`).
pub fn classify_self(status: u16, body: &[u8], secret: &str) -> SelfAnswer {
    let text = String::from_utf8_lossy(body);
    if text.contains("No cluster leader") || status == 429 || status >= 500 {
        return SelfAnswer::Retry(CallError::status("token/self", status));
    }
    match status {
        200 => match serde_json::from_slice::<TokenResponse>(body) {
            Ok(t) if t.secret_id == secret => SelfAnswer::Ours(t.accessor_id.clone()),
            Ok(_) => SelfAnswer::NotOurs,
            Err(_) => SelfAnswer::Final(CallError::unparsable("token/self")),
        },
        403 | 404 if text.contains("ACL token not found") => SelfAnswer::NotOurs,
        _ => SelfAnswer::Final(CallError::status("token/self", status)),
    }
}

/// `GET {api}/v1/acl/token/self` with `secret`, retried through [`SelfAnswer::Retry`] until `deadline`.
pub async fn own_token(
    c: &reqwest::Client,
    api: &str,
    secret: &str,
    deadline: Duration,
) -> Result<Option<String>, RetryError<CallError>> {
    let url = format!("{api}/v1/acl/token/self");
    let policy = RetryPolicy {
        deadline,
        attempt_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(2),
    };
    retry(policy, |_| {
        let req = c.get(&url).header("X-Nomad-Token", secret).send();
        async move {
            let r = match req.await {
                Ok(r) => r,
                Err(e) => return Attempt::Retry(CallError::transport("token/self", e)),
            };
            let status = r.status().as_u16();
            let body = Zeroizing::new(r.bytes().await.map(|b| b.to_vec()).unwrap_or_default());
            match classify_self(status, &body, secret) {
                SelfAnswer::Ours(accessor) => Attempt::Done(Some(accessor)),
                SelfAnswer::NotOurs => Attempt::Done(None),
                SelfAnswer::Retry(e) => Attempt::Retry(e),
                SelfAnswer::Final(e) => Attempt::Fail(e),
            }
        }
    })
    .await
}

#[async_trait::async_trait]
impl Tier for NomadTier {
    fn name(&self) -> &'static str {
        "nomad"
    }

    /// Nomad answering is enough to look for the lease: the lease, the pre-flight and the escrow before use
    /// need no leader, so they run while the servers elect one ([`Tier::wait_callable`] waits for it).
    async fn wait_ready(&self, deadline: Duration) -> Result<(), TierError> {
        let c = self.client(Duration::from_secs(5))?;
        super::http::wait_for_answer(&c, &self.api, "Nomad", deadline).await
    }

    async fn wait_callable(&self, deadline: Duration) -> Result<(), TierError> {
        let c = self.client(Duration::from_secs(5))?;
        super::http::wait_for_leader(&c, &self.api, "Nomad", deadline).await
    }

    async fn already_bootstrapped(&self) -> Result<Option<bool>, TierError> {
        Ok(None)
    }

    fn pre_secret(&self) -> Option<Zeroizing<Vec<u8>>> {
        Some(AclSecrets::payload(
            KIND,
            String::new(),
            self.secret.to_string(),
        ))
    }

    fn holds_pre_secret(&self, secrets: &[u8]) -> bool {
        AclSecrets::holds(secrets, &self.secret)
    }

    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        // Generous timeout: with a known secret a lost answer is harmless (the retry finds our token).
        let c = self
            .client(Duration::from_secs(60))
            .map_err(|e| TierFailure::Other(e.to_string()))?;
        AclBootstrap {
            product: "Nomad",
            kind: KIND,
            method: reqwest::Method::POST,
            url: format!("{}/v1/acl/bootstrap", self.api),
            secret: Some(self.secret.as_str()),
            deadline: BOOTSTRAP_DEADLINE,
            retry_every: RETRY_EVERY,
            classify,
            to_leader: None,
        }
        .call(&c, |_| self.own_token(&c, CHECK_DEADLINE))
        .await
    }

    async fn configure(&self, secrets: &[u8]) -> Result<(), TierError> {
        let (Some((az, _)), Some(status_vault)) = (&self.shared, &self.status_vault) else {
            tracing::warn!(
                "no hashistack-status-vault-uri tag: the Nomad status token was not created"
            );
            return Ok(());
        };
        let s: AclSecrets = serde_json::from_slice(secrets).map_err(|_| TierError::Payload)?;
        let management = Zeroizing::new(s.secret_id.clone());
        drop(s);
        // At once: the read-only token of `hashistack-agent status` (docs/status.md#status-tokens), and the
        // snapshot credential (docs/runbooks.md#snapshots), kept where only server tiers read it.
        let status = async {
            let (token, _) =
                create_status_token(&self.api, &self.ca_file, &management, status_token_policy())
                    .await?;
            super::status_tokens::hand_over(
                &(az.clone(), status_vault.clone()),
                crate::names::NOMAD_SECRET,
                &token,
            )
            .await?;
            Ok::<_, TierError>(())
        };
        let snapshot = async {
            if let Some(h) = &self.snapshot {
                let t = super::snapshot_tokens::create_nomad(&self.api, &self.ca_file, &management)
                    .await?;
                h.put("nomad", &t).await?;
            }
            Ok::<_, TierError>(())
        };
        let (status, snapshot) = tokio::join!(status, snapshot);
        status?;
        snapshot?;
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
        let a = crate::ids::uuid_v4();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert!(matches!(a.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
        assert_ne!(*a, *crate::ids::uuid_v4());
        let t = NomadTier::new("https://127.0.0.1:4646".into(), "/nonexistent".into());
        let pre = t.pre_secret().expect("nomad escrows before use");
        let v: serde_json::Value = serde_json::from_slice(&pre).unwrap();
        assert_eq!(v["kind"], "nomad-acl-bootstrap");
        assert_eq!(v["secret_id"].as_str().unwrap(), t.secret.as_str());
        assert_eq!(v["accessor_id"], "");
    }

    #[test]
    fn acl_answers_are_retryable_or_final() {
        assert_eq!(classify_acl("x", 200, ""), Ok(()));
        for (status, body) in [
            (500, "No cluster leader"),
            (500, "rpc error: No cluster leader"),
            (503, ""),
            (429, "too many requests"),
            (502, "bad gateway"),
        ] {
            assert!(
                matches!(classify_acl("x", status, body), Err(Failed::Retry(_))),
                "{status} {body}"
            );
        }
        for (status, body) in [
            (403, "Permission denied"),
            (403, "ACL token not found"),
            (400, "policy 0 invalid: 1 error occurred:"),
            (404, "ACL token not found"),
        ] {
            match classify_acl("status token", status, body) {
                Err(Failed::Final(e)) => {
                    let m = e.to_string();
                    assert!(
                        m.starts_with(&format!("status token: HTTP {status}")),
                        "{m}"
                    )
                }
                other => panic!("{status} {body}: {other:?}"),
            }
        }
    }

    #[test]
    fn token_self_answers_are_ours_not_ours_retryable_or_final() {
        let secret = "9b1c0d2e-1111-4222-8333-444455556666";
        let ours = serde_json::json!({"AccessorID": "acc-1", "SecretID": secret}).to_string();
        let other = serde_json::json!({"AccessorID": "acc-2", "SecretID": "other"}).to_string();
        assert_eq!(
            classify_self(200, ours.as_bytes(), secret),
            SelfAnswer::Ours("acc-1".into())
        );
        assert_eq!(
            classify_self(200, other.as_bytes(), secret),
            SelfAnswer::NotOurs
        );
        assert_eq!(
            classify_self(403, b"ACL token not found", secret),
            SelfAnswer::NotOurs
        );
        assert_eq!(
            classify_self(404, b"ACL token not found", secret),
            SelfAnswer::NotOurs
        );
        // Not "someone else bootstrapped": an election, a busy or failing server.
        for (status, body) in [
            (500, "No cluster leader"),
            (500, "rpc error: No cluster leader"),
            (502, "bad gateway"),
            (503, ""),
            (429, "too many requests"),
        ] {
            assert!(
                matches!(
                    classify_self(status, body.as_bytes(), secret),
                    SelfAnswer::Retry(_)
                ),
                "{status} {body}"
            );
        }
        for (status, body) in [(403, "Permission denied"), (400, "bad"), (200, "not json")] {
            assert!(
                matches!(
                    classify_self(status, body.as_bytes(), secret),
                    SelfAnswer::Final(_)
                ),
                "{status} {body}"
            );
        }
    }

    /// `token/self` as Nomad answers it: the first `busy` requests 500 `No cluster leader`, then our secret
    /// (200) or "ACL token not found" (403) for any other.
    async fn token_self_server(busy: u32, known: &'static str) -> String {
        use axum::http::{HeaderMap, StatusCode};
        use std::sync::atomic::{AtomicU32, Ordering};
        let left = std::sync::Arc::new(AtomicU32::new(busy));
        let app = axum::Router::new().route(
            "/v1/acl/token/self",
            axum::routing::get(move |h: HeaderMap| {
                let left = left.clone();
                async move {
                    if left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "No cluster leader".to_string(),
                        );
                    }
                    match h.get("X-Nomad-Token").and_then(|v| v.to_str().ok()) {
                        Some(s) if s == known => (
                            StatusCode::OK,
                            serde_json::json!({"AccessorID": "acc-known", "SecretID": known})
                                .to_string(),
                        ),
                        _ => (StatusCode::FORBIDDEN, "ACL token not found".to_string()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn own_token_is_an_error_not_someone_elses_bootstrap_while_nomad_cannot_answer() {
        let c = reqwest::Client::new();
        let secret = "9b1c0d2e-1111-4222-8333-444455556666";
        let short = Duration::from_millis(800);
        // Nothing listens: a transport error, asked again until the deadline, then an open question.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            drop(l);
            format!("http://{a}")
        };
        let e = own_token(&c, &closed, secret, short)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("token/self"), "{e}");
        // A server without a leader for longer than the deadline: an error too.
        let api = token_self_server(u32::MAX, secret).await;
        let e = own_token(&c, &api, secret, short)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP 500"), "{e}");
        // Once it answers: ours after a few "No cluster leader", or not ours.
        let api = token_self_server(2, secret).await;
        assert_eq!(
            own_token(&c, &api, secret, Duration::from_secs(10))
                .await
                .unwrap(),
            Some("acc-known".into())
        );
        let api = token_self_server(0, "another-secret").await;
        assert_eq!(own_token(&c, &api, secret, short).await.unwrap(), None);
    }

    /// A scripted stand-in for Nomad's ACL routes (shapes as the API documents them): answers the first
    /// `busy` requests with 500 `No cluster leader`, or every request with `refuse`.
    mod acl_fake {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, put};
        use axum::{Json, Router};
        use serde_json::{json, Value};
        use std::sync::{Arc, Mutex, MutexGuard};

        pub const MANAGEMENT: &str = "9b1c0d2e-1111-4222-8333-444455556666";

        #[derive(Default)]
        pub struct Server {
            pub busy: u32,
            pub refuse: Option<(u16, String)>,
            pub policies: Vec<Value>,
            pub tokens: Vec<Value>,
            pub requests: u32,
        }

        pub type Shared = Arc<Mutex<Server>>;

        /// An answer; `Err`: the request refused or not served (busy).
        type Reply = Result<(StatusCode, String), (StatusCode, String)>;

        /// Counts the request and locks the server for it, unless it is refused or not served.
        fn gate<'a>(
            s: &'a Shared,
            h: &HeaderMap,
        ) -> Result<MutexGuard<'a, Server>, (StatusCode, String)> {
            let mut s = s.lock().unwrap();
            s.requests += 1;
            if let Some((code, body)) = &s.refuse {
                return Err((StatusCode::from_u16(*code).unwrap(), body.clone()));
            }
            if s.busy > 0 {
                s.busy -= 1;
                return Err((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "No cluster leader".into(),
                ));
            }
            if h.get("X-Nomad-Token").and_then(|v| v.to_str().ok()) != Some(MANAGEMENT) {
                return Err((StatusCode::FORBIDDEN, "Permission denied".into()));
            }
            Ok(s)
        }

        async fn policy(
            State(s): State<Shared>,
            UrlPath(name): UrlPath<String>,
            h: HeaderMap,
            Json(body): Json<Value>,
        ) -> Reply {
            let mut s = gate(&s, &h)?;
            assert_eq!(body["Name"], name.as_str());
            s.policies.retain(|p| p["Name"] != name.as_str());
            s.policies.push(body);
            Ok((StatusCode::OK, String::new()))
        }

        async fn list(State(s): State<Shared>, h: HeaderMap) -> Reply {
            let s = gate(&s, &h)?;
            let stubs: Vec<Value> = s
                .tokens
                .iter()
                .map(|t| {
                    let mut t = t.clone();
                    t.as_object_mut().unwrap().remove("SecretID");
                    t
                })
                .collect();
            Ok((StatusCode::OK, serde_json::to_string(&stubs).unwrap()))
        }

        async fn read(
            State(s): State<Shared>,
            UrlPath(accessor): UrlPath<String>,
            h: HeaderMap,
        ) -> Reply {
            let s = gate(&s, &h)?;
            match s
                .tokens
                .iter()
                .find(|t| t["AccessorID"] == accessor.as_str())
            {
                Some(t) => Ok((StatusCode::OK, t.to_string())),
                None => Err((StatusCode::NOT_FOUND, "ACL token not found".into())),
            }
        }

        async fn create(State(s): State<Shared>, h: HeaderMap, Json(body): Json<Value>) -> Reply {
            let mut s = gate(&s, &h)?;
            let n = s.tokens.len();
            let t = json!({
                "AccessorID": format!("acc-{n}"), "SecretID": format!("secret-{n}"),
                "Name": body["Name"], "Type": body["Type"], "Policies": body["Policies"],
                "Global": body["Global"], "CreateIndex": 10 + n, "ModifyIndex": 10 + n,
            });
            s.tokens.push(t.clone());
            Ok((StatusCode::OK, t.to_string()))
        }

        pub async fn serve(state: Shared) -> String {
            let app = Router::new()
                .route("/v1/acl/policy/{name}", put(policy))
                .route("/v1/acl/tokens", get(list))
                .route("/v1/acl/token", put(create))
                .route("/v1/acl/token/{accessor}", get(read))
                .with_state(state);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            format!("http://{addr}")
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        }
    }

    async fn status_token(
        server: acl_fake::Server,
        management: &str,
    ) -> (
        Result<(Zeroizing<String>, bool), RetryError<CallError>>,
        acl_fake::Shared,
    ) {
        let state = std::sync::Arc::new(std::sync::Mutex::new(server));
        let api = acl_fake::serve(state.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let r = create_status_token(&api, &ca_file, management, quick()).await;
        (r, state)
    }

    #[tokio::test]
    async fn status_token_retries_no_leader_then_creates_policy_and_client_token() {
        let (r, state) = status_token(
            acl_fake::Server {
                busy: 3,
                ..Default::default()
            },
            acl_fake::MANAGEMENT,
        )
        .await;
        let (secret, reused) = r.unwrap();
        assert_eq!((secret.as_str(), reused), ("secret-0", false));
        let s = state.lock().unwrap();
        assert_eq!(s.policies.len(), 1);
        assert_eq!(s.policies[0]["Name"], crate::names::NOMAD_POLICY);
        assert_eq!(s.policies[0]["Rules"], crate::names::NOMAD_RULES);
        assert_eq!(s.tokens.len(), 1);
        assert_eq!(s.tokens[0]["Type"], "client");
        assert_eq!(
            s.tokens[0]["Policies"],
            serde_json::json!([crate::names::NOMAD_POLICY])
        );
    }

    #[tokio::test]
    async fn status_token_of_an_earlier_run_is_reused_not_recreated() {
        let earlier = serde_json::json!({
            "AccessorID": "acc-earlier", "SecretID": "secret-earlier",
            "Name": crate::names::NOMAD_TOKEN_NAME, "Type": "client",
            "Policies": [crate::names::NOMAD_POLICY], "Global": true,
        });
        let other = serde_json::json!({
            "AccessorID": "acc-other", "SecretID": "secret-other", "Name": "someone else's",
            "Type": "client", "Policies": ["readonly"], "Global": true,
        });
        let (r, state) = status_token(
            acl_fake::Server {
                tokens: vec![other, earlier],
                ..Default::default()
            },
            acl_fake::MANAGEMENT,
        )
        .await;
        let (secret, reused) = r.unwrap();
        assert_eq!((secret.as_str(), reused), ("secret-earlier", true));
        assert_eq!(state.lock().unwrap().tokens.len(), 2, "no new token");
    }

    #[tokio::test]
    async fn status_token_refusals_are_final_and_carry_no_secret() {
        // A token Nomad refuses: one request, no retries, and the management secret in no error.
        let wrong = "00000000-1111-4222-8333-999999999999";
        let (r, state) = status_token(acl_fake::Server::default(), wrong).await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("status policy: HTTP 403: Permission denied"),
            "{e}"
        );
        assert!(!e.contains(wrong));
        assert_eq!(state.lock().unwrap().requests, 1);
        // Nomad's validation error (400) is final too.
        let (r, state) = status_token(
            acl_fake::Server {
                refuse: Some((400, "policy 0 invalid: 1 error occurred:".into())),
                ..Default::default()
            },
            acl_fake::MANAGEMENT,
        )
        .await;
        assert!(r.unwrap_err().to_string().contains("HTTP 400"));
        assert_eq!(state.lock().unwrap().requests, 1);
        // A server that never settles: retried until the deadline, then the last error.
        let start = std::time::Instant::now();
        let (r, state) = status_token(
            acl_fake::Server {
                busy: u32::MAX,
                ..Default::default()
            },
            acl_fake::MANAGEMENT,
        )
        .await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with("gave up after") && e.contains("No cluster leader"),
            "{e}"
        );
        assert!(state.lock().unwrap().requests > 3);
        assert!(start.elapsed() < Duration::from_secs(6));
    }
}
