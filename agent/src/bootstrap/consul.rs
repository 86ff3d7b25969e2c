//! Consul ACL bootstrap (`PUT /v1/acl/bootstrap`), on one of two paths decided by the Consul version
//! ([`BootstrapPath::for_version`]):
//!
//! - **Consul ≥ 1.15.0** takes a caller-chosen `BootstrapSecret`: the agent generates it (a random UUID, kept
//!   zeroizing), the protocol escrows it to both targets ([`Tier::pre_secret`]) and only then is it sent.
//!   With the secret known, the call is idempotent: "ACL bootstrap no longer allowed" is checked with
//!   `GET /v1/acl/token/self` and our secret, and success means our own earlier attempt landed.
//! - **Older Consul** (the lab's 1.8.7) generates the token itself: bootstrap and escrow at once (the token
//!   is spooled and escrowed right after the call returns it).
//!
//! "The ACL system is currently in legacy mode." (a few seconds after a 1.x leader election), "No cluster
//! leader", 429 and 5xx are retried; "ACL bootstrap no longer allowed (reset index: N)" is final unless the
//! token is ours; "Invalid bootstrap reset index", "ACL support disabled", a rejected secret and other 4xx
//! are final.

pub use super::http::Answer;
use super::http::{AclBootstrap, AclSecrets, CallError, ToLeader, TokenResponse};
use super::{Tier, TierError, TierFailure};
use crate::retry::{retry, Attempt, RetryError, RetryPolicy, TimeoutError};
use crate::version::Version;
use std::path::PathBuf;
use std::time::Duration;
use zeroize::Zeroizing;

/// First Consul release whose `PUT /v1/acl/bootstrap` takes a caller-chosen `BootstrapSecret`: 1.15.0.
/// Source: hashicorp/consul CHANGELOG.md, "## 1.15.0 (February 23, 2023)", IMPROVEMENTS: "acl: Added option
/// to allow for an operator-generated bootstrap token to be passed to the `acl bootstrap` command.
/// [GH-14437]" (hashicorp/consul#14437, which added `BootstrapSecret` to the request body of the HTTP API).
pub const BOOTSTRAP_SECRET_SINCE: Version = Version::new(1, 15, 0);

/// How long the bootstrap call keeps retrying retryable answers.
const BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(120);
/// How long `token/self` (is the token ours?) may take through retryable answers.
const CHECK_DEADLINE: Duration = Duration::from_secs(30);
/// Between retryable answers. Consul 1.x answers "legacy mode" until its leader switches to the new ACL system:
/// at once when it establishes leadership and every server already advertises ACL support, else at the leader's
/// next ACL-mode check (50 ms after the server started, then doubling: 0.1, 0.2, 0.4, 0.8, 1.6 s, …). No endpoint
/// blocks until then (the switch shows only as the servers' `acls` tag in `/v1/agent/members`, which would be
/// polled all the same), so the call itself is the probe, sent as often as the floor sends it.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);

/// How the management token comes to be.
pub enum BootstrapPath {
    /// Consul ≥ 1.15.0: this `BootstrapSecret` (a UUID generated for this run) is escrowed before use.
    CallerSecret(Zeroizing<String>),
    /// Older Consul: the server generates the token; it is escrowed right after the call.
    ServerGenerated,
}

impl BootstrapPath {
    /// Whether a Consul of this version takes a caller-chosen `BootstrapSecret`. Unknown: no (the
    /// server-generated path works on every version).
    pub fn takes_caller_secret(version: Option<Version>) -> bool {
        version.is_some_and(|v| v >= BOOTSTRAP_SECRET_SINCE)
    }

    /// The path for the Consul version the running server or the installed binary reports; on the
    /// caller-secret path a fresh secret from the system RNG.
    pub fn for_version(version: Option<Version>) -> Self {
        if Self::takes_caller_secret(version) {
            BootstrapPath::CallerSecret(crate::ids::uuid_v4())
        } else {
            BootstrapPath::ServerGenerated
        }
    }

    fn secret(&self) -> Option<&str> {
        match self {
            BootstrapPath::CallerSecret(s) => Some(s.as_str()),
            BootstrapPath::ServerGenerated => None,
        }
    }
}

impl std::fmt::Debug for BootstrapPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootstrapPath::CallerSecret(_) => "CallerSecret(<redacted>)",
            BootstrapPath::ServerGenerated => "ServerGenerated",
        })
    }
}

pub struct ConsulTier {
    pub api: String,
    pub ca_file: PathBuf,
    /// The shared cluster-material Key Vault (client, URI), where tokens for other nodes are handed over.
    pub shared: Option<(crate::azure::Azure, String)>,
    /// The status vault (URI; same client as `shared`): the read-only status token goes there, where only
    /// the jumpbox may read it. `None`: no status token is created.
    pub status_vault: Option<String>,
    /// The servers vault, where the tier's snapshot credential goes. `None`: none is created.
    pub snapshot: Option<super::snapshot_tokens::HandOver>,
    pub cluster: String,
    /// Escrow before use (Consul ≥ 1.15.0) or at once: [`BootstrapPath::for_version`].
    pub path: BootstrapPath,
}

/// The escrow payload's kind for the Consul tier.
const KIND: &str = "consul-acl-bootstrap";

/// Classifies an ACL bootstrap answer that is not 200 ("ACL bootstrap no longer allowed (reset index: N)"
/// is [`Answer::AlreadyDone`]). The text decides before the status: Consul answers "no longer allowed"
/// with 403, and most RPC errors (legacy mode among them) with 500.
pub fn classify(status: u16, body: &str) -> Answer {
    let short: String = body.trim().chars().take(200).collect();
    if body.contains("ACL bootstrap no longer allowed") {
        return Answer::AlreadyDone(short);
    }
    if body.contains("Invalid bootstrap reset index")
        || body.contains("ACL support disabled")
        || body.to_ascii_lowercase().contains("uuid")
    {
        return Answer::Final(format!("ACL bootstrap: HTTP {status}: {short}"));
    }
    if body.contains("legacy mode")
        || body.contains("No cluster leader")
        || status >= 500
        || status == 429
    {
        return Answer::Retry;
    }
    Answer::Final(format!("ACL bootstrap: HTTP {status}: {short}"))
}

/// An error of one `token/self` check (statuses and transport errors only, never the token).
#[derive(Debug)]
struct CheckError(String);

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TimeoutError for CheckError {
    fn timeout(after: Duration) -> Self {
        CheckError(format!("token/self: no answer within {after:?}"))
    }
}

impl ConsulTier {
    fn client(&self, timeout: Duration) -> Result<reqwest::Client, CallError> {
        crate::services::health::client_for(&self.ca_file, timeout)
            .map_err(|e| CallError::Client(e.to_string()))
    }

    /// Where the post-bootstrap ACL calls go. The ACL bootstrap went to the raft leader
    /// (docs/bootstrap.md#consul-acl-legacy-mode), and this node's own server, if a follower, may still be in
    /// legacy mode: it refuses ACL writes (500 "legacy mode") until its next ACL-mode check. So: the leader's API
    /// once it takes the management token; else (no leader named, its API unreachable) this node's server once
    /// it does. Polled every [`RETRY_EVERY`] up to [`BOOTSTRAP_DEADLINE`].
    async fn acl_api(&self, management: &str) -> Result<String, TierError> {
        let c = self.client(Duration::from_secs(5))?;
        let local = reqwest::Url::parse(&self.api).map_err(|_| TierError::Step {
            step: "Consul API address",
            detail: self.api.clone(),
        })?;
        let route = ToLeader::default();
        let policy = RetryPolicy::poll(BOOTSTRAP_DEADLINE, RETRY_EVERY, Duration::from_secs(5));
        retry(policy, |_| async {
            let leader = route.url(&c, &local).await;
            let base = leader.as_ref().unwrap_or(&local);
            let mut url = base.clone();
            url.set_path("/v1/acl/token/self");
            match c.get(url).header("X-Consul-Token", management).send().await {
                Ok(r) if r.status().is_success() => {
                    Attempt::Done(base.as_str().trim_end_matches('/').to_string())
                }
                Ok(r) => Attempt::Retry(CallError::status("token/self", r.status().as_u16())),
                Err(e) => {
                    if leader.is_some() {
                        route.failed(&e);
                    }
                    Attempt::Retry(CallError::transport("token/self", e))
                }
            }
        })
        .await
        .map_err(TierError::from)
    }

    /// Whether `secret` is a valid token (an earlier attempt with it landed): its accessor ID if so.
    /// `Ok(None)`: Consul does not know it (403 "ACL not found" before 1.15, 404 "Supplied token does not
    /// exist" from 1.15). Retryable answers are retried until `deadline`; then the question stays open (`Err`).
    async fn own_token(
        &self,
        c: &reqwest::Client,
        secret: &str,
        deadline: Duration,
    ) -> Result<Option<String>, RetryError<CheckError>> {
        let url = format!("{}/v1/acl/token/self", self.api);
        let policy = RetryPolicy {
            deadline,
            attempt_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(2),
        };
        retry(policy, |_| {
            let req = c.get(&url).header("X-Consul-Token", secret).send();
            async move {
                let r = match req.await {
                    Ok(r) => r,
                    Err(e) => {
                        return Attempt::Retry(CheckError(format!(
                            "token/self: {}",
                            e.without_url()
                        )))
                    }
                };
                let status = r.status().as_u16();
                if status == 200 {
                    return match r.json::<TokenResponse>().await {
                        Ok(t) => {
                            Attempt::Done((t.secret_id == secret).then(|| t.accessor_id.clone()))
                        }
                        Err(_) => {
                            Attempt::Fail(CheckError("token/self: the answer did not parse".into()))
                        }
                    };
                }
                let text = r.text().await.unwrap_or_default();
                if text.contains("ACL not found") || text.contains("does not exist") {
                    return Attempt::Done(None);
                }
                match status {
                    403 | 404 => Attempt::Done(None),
                    429 | 500..=599 => {
                        Attempt::Retry(CheckError(format!("token/self: HTTP {status}")))
                    }
                    _ => Attempt::Fail(CheckError(format!("token/self: HTTP {status}"))),
                }
            }
        })
        .await
    }

    /// The bootstrap call, retrying retryable answers until `deadline`; `check` bounds the `token/self`
    /// question after "no longer allowed" on the caller-secret path.
    async fn bootstrap_within(
        &self,
        deadline: Duration,
        check: Duration,
    ) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        // Generous timeout: on the server-generated path an answer lost after the server made the token
        // would leave the token nowhere.
        let c = self
            .client(deadline)
            .map_err(|e| TierFailure::Other(e.to_string()))?;
        AclBootstrap {
            product: "Consul",
            kind: KIND,
            method: reqwest::Method::PUT,
            url: format!("{}/v1/acl/bootstrap", self.api),
            secret: self.path.secret(),
            deadline,
            retry_every: RETRY_EVERY,
            classify,
            to_leader: Some(ToLeader::default()),
        }
        .call(&c, |s| self.own_token(&c, s, check))
        .await
    }
}

#[async_trait::async_trait]
impl Tier for ConsulTier {
    fn name(&self) -> &'static str {
        "consul"
    }

    /// Consul answering is enough to look for the lease: the lease and the pre-flight need no leader, so they
    /// run while the servers elect one ([`Tier::wait_callable`] waits for it).
    async fn wait_ready(&self, deadline: Duration) -> Result<(), TierError> {
        let c = self.client(Duration::from_secs(5))?;
        super::http::wait_for_answer(&c, &self.api, "Consul", deadline).await
    }

    async fn wait_callable(&self, deadline: Duration) -> Result<(), TierError> {
        let c = self.client(Duration::from_secs(5))?;
        super::http::wait_for_leader(&c, &self.api, "Consul", deadline).await
    }

    async fn already_bootstrapped(&self) -> Result<Option<bool>, TierError> {
        Ok(None)
    }

    fn pre_secret(&self) -> Option<Zeroizing<Vec<u8>>> {
        self.path
            .secret()
            .map(|s| AclSecrets::payload(KIND, String::new(), s.to_string()))
    }

    fn holds_pre_secret(&self, secrets: &[u8]) -> bool {
        self.path
            .secret()
            .is_some_and(|s| AclSecrets::holds(secrets, s))
    }

    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        self.bootstrap_within(BOOTSTRAP_DEADLINE, CHECK_DEADLINE)
            .await
    }

    async fn configure(&self, secrets: &[u8]) -> Result<(), TierError> {
        let s: AclSecrets = serde_json::from_slice(secrets).map_err(|_| TierError::Payload)?;
        let management = Zeroizing::new(s.secret_id.clone());
        drop(s);
        // The ACL bootstrap went to the leader; this node's server may still be in legacy mode.
        let api = self.acl_api(&management).await?;
        if let Some((az, vault)) = &self.shared {
            // Nomad's Consul token first: every node waits for the agent token below, so a node that sees the
            // agent token sees this one too. Its failure does not hold the agent token back (Consul would
            // stay without one on every node); it is reported once the rest is done.
            let nomad = async {
                let t = super::consul_tokens::ensure_nomad_token(&api, &self.ca_file, &management)
                    .await
                    .map_err(|e| TierError::Step {
                        step: "Nomad's Consul token",
                        detail: e.to_string(),
                    })?;
                crate::material::put_secret(
                    az,
                    vault,
                    &super::consul_tokens::nomad_token_secret(&self.cluster),
                    &t,
                )
                .await
                .map_err(|source| TierError::HandOver {
                    what: "Nomad's Consul token",
                    source,
                })
            }
            .await;
            let token =
                super::consul_tokens::create_agent_token(&api, &self.ca_file, &management).await?;
            crate::material::put_secret(
                az,
                vault,
                &super::consul_tokens::agent_token_secret(&self.cluster),
                &token,
            )
            .await
            .map_err(|source| TierError::HandOver {
                what: "agent token",
                source,
            })?;
            // What no node waits for, at once: the read-only token of `hashistack-agent status`
            // (docs/status.md#status-tokens), DNS answers for every agent (docs/dns.md) and the snapshot
            // credential (docs/runbooks.md#snapshots), kept where only server tiers read it.
            let status = async {
                let status =
                    super::status_tokens::create_consul(&api, &self.ca_file, &management).await?;
                match &self.status_vault {
                    Some(sv) => {
                        super::status_tokens::hand_over(
                            &(az.clone(), sv.clone()),
                            crate::names::CONSUL_SECRET,
                            &status,
                        )
                        .await?
                    }
                    None => tracing::warn!("no hashistack-status-vault-uri tag: the Consul status token was not handed over"),
                }
                Ok::<_, TierError>(())
            };
            let dns = async {
                super::consul_tokens::ensure_dns_policy(&api, &self.ca_file, &management)
                    .await
                    .map_err(|e| TierError::Step {
                        step: "DNS policy",
                        detail: e.to_string(),
                    })
            };
            let snapshot = async {
                if let Some(h) = &self.snapshot {
                    let t = super::snapshot_tokens::create_consul(&api, &self.ca_file, &management)
                        .await?;
                    h.put("consul", &t).await?;
                }
                Ok::<_, TierError>(())
            };
            let (status, dns, snapshot) = tokio::join!(status, dns, snapshot);
            status?;
            snapshot?;
            nomad?;
            dns?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_answers_are_classified() {
        assert_eq!(
            classify(500, "The ACL system is currently in legacy mode."),
            Answer::Retry
        );
        assert_eq!(classify(500, "No cluster leader"), Answer::Retry);
        assert_eq!(classify(503, ""), Answer::Retry);
        assert_eq!(classify(429, ""), Answer::Retry);
        assert!(matches!(
            classify(403, "Permission denied: rpc error making call: ACL bootstrap no longer allowed (reset index: 11)"),
            Answer::AlreadyDone(m) if m.contains("reset index: 11")
        ));
        for final_ in [
            (500, "rpc error making call: Invalid bootstrap reset index (specified 3, reset index: 7)"),
            (401, "ACL support disabled"),
            (500, "rpc error making call: uuid string is wrong length"),
            (400, "bad"),
            (403, "Permission denied"),
        ] {
            assert!(
                matches!(classify(final_.0, final_.1), Answer::Final(_)),
                "{final_:?}"
            );
        }
    }

    #[test]
    fn the_consul_version_decides_the_path() {
        let v = |s: &str| Version::parse(s);
        assert!(
            !BootstrapPath::takes_caller_secret(None),
            "unknown: escrow after the call"
        );
        assert!(!BootstrapPath::takes_caller_secret(v("1.8.7")), "the lab");
        assert!(!BootstrapPath::takes_caller_secret(v("1.14.11")));
        assert!(BootstrapPath::takes_caller_secret(v("1.15.0")));
        assert!(BootstrapPath::takes_caller_secret(v("1.20.0")));
        assert!(matches!(
            BootstrapPath::for_version(v("1.8.7")),
            BootstrapPath::ServerGenerated
        ));
        let path = BootstrapPath::for_version(v("1.20.0"));
        let secret = path.secret().expect("a caller secret").to_string();
        assert_eq!(secret.len(), 36);
        assert_eq!(secret.as_bytes()[14], b'4', "a v4 UUID");
        assert_eq!(format!("{path:?}"), "CallerSecret(<redacted>)");
        assert_ne!(
            BootstrapPath::for_version(v("1.20.0")).secret(),
            Some(secret.as_str()),
            "fresh per run"
        );
    }

    /// A contract double of Consul's `PUT /v1/acl/bootstrap` and `GET /v1/acl/token/self`, following the
    /// documented request and response shapes (developer.hashicorp.com/consul/api-docs/acl: optional body
    /// `{"BootstrapSecret": "<uuid>"}` from 1.15.0; `AccessorID`/`SecretID` in the answer; a second
    /// bootstrap gets 403 "Permission denied: rpc error making call: ACL bootstrap no longer allowed
    /// (reset index: N)"; a 1.x leader answers 500 "The ACL system is currently in legacy mode." for a few
    /// seconds; `token/self` with an unknown token: 403 "ACL not found", 404 from 1.15).
    mod consul_contract_double {
        use axum::body::Bytes;
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, put};
        use axum::Router;
        use std::sync::{Arc, Mutex};

        #[derive(Debug, Clone)]
        pub struct Token {
            pub accessor: String,
            pub secret: String,
        }

        /// One `PUT /v1/acl/bootstrap` as the double saw it.
        #[derive(Debug, Clone)]
        pub struct Call {
            pub body: String,
            /// The `BootstrapSecret` it carried, if any.
            pub secret: Option<String>,
            /// Whether that secret was already in escrow when the request arrived.
            pub escrowed_before: bool,
        }

        #[derive(Default)]
        pub struct Consul {
            /// Consul ≥ 1.15.0: honours `BootstrapSecret`; older versions ignore the body.
            pub takes_secret: bool,
            /// Answer "legacy mode" (500) to this many bootstrap calls first.
            pub legacy_mode: u32,
            /// Then this many plain 500s.
            pub errors_500: u32,
            /// Bootstrap, then answer 500 anyway (the answer is lost) this many times.
            pub lose_answers: u32,
            /// A final answer to every bootstrap call, e.g. (400, "…").
            pub final_answer: Option<(u16, String)>,
            /// `token/self` answers 500 to everything.
            pub token_self_down: bool,
            pub reset_index: u64,
            pub bootstrapped: Option<Token>,
            /// What the test's stand-in for the escrow protocol has escrowed, in order.
            pub escrow: Vec<String>,
            pub calls: Vec<Call>,
            /// The tokens presented to `token/self`.
            pub self_checks: Vec<String>,
            /// What `GET /v1/status/leader` names (`ip:port` of the leader's RPC); `None`: "" (no leader).
            pub leader: Option<String>,
        }

        pub type Shared = Arc<Mutex<Consul>>;

        fn uuid_like(n: u64) -> String {
            format!("00000000-0000-4000-8000-{n:012}")
        }

        async fn bootstrap(State(s): State<Shared>, body: Bytes) -> (StatusCode, String) {
            let mut c = s.lock().unwrap();
            let body = String::from_utf8_lossy(&body).to_string();
            let secret = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["BootstrapSecret"].as_str().map(String::from));
            let escrowed_before = secret.as_ref().is_some_and(|x| c.escrow.contains(x));
            c.calls.push(Call {
                body,
                secret: secret.clone(),
                escrowed_before,
            });
            if let Some((status, text)) = &c.final_answer {
                return (StatusCode::from_u16(*status).unwrap(), text.clone());
            }
            if c.legacy_mode > 0 {
                c.legacy_mode -= 1;
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The ACL system is currently in legacy mode.".into(),
                );
            }
            if c.errors_500 > 0 {
                c.errors_500 -= 1;
                return (StatusCode::INTERNAL_SERVER_ERROR, "rpc error: EOF".into());
            }
            if c.bootstrapped.is_some() {
                return (
                    StatusCode::FORBIDDEN,
                    format!(
                        "Permission denied: rpc error making call: ACL bootstrap no longer allowed (reset index: {})",
                        c.reset_index
                    ),
                );
            }
            let n = c.calls.len() as u64;
            let token = Token {
                accessor: uuid_like(1000 + n),
                secret: match (&secret, c.takes_secret) {
                    (Some(x), true) => x.clone(),
                    _ => uuid_like(2000 + n),
                },
            };
            c.bootstrapped = Some(token.clone());
            c.reset_index = 7;
            if c.lose_answers > 0 {
                c.lose_answers -= 1;
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rpc error: connection reset".into(),
                );
            }
            (
                StatusCode::OK,
                serde_json::json!({
                    "AccessorID": token.accessor,
                    "SecretID": token.secret,
                    "Description": "Bootstrap Token (Global Management)",
                    "Policies": [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}],
                    "Local": false,
                    "CreateIndex": 12,
                    "ModifyIndex": 12
                })
                .to_string(),
            )
        }

        async fn token_self(State(s): State<Shared>, h: HeaderMap) -> (StatusCode, String) {
            let mut c = s.lock().unwrap();
            let presented = h
                .get("X-Consul-Token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            c.self_checks.push(presented.clone());
            if c.legacy_mode > 0 {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The ACL system is currently in legacy mode.".into(),
                );
            }
            if c.token_self_down {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "No cluster leader".into(),
                );
            }
            match &c.bootstrapped {
                Some(t) if t.secret == presented => (
                    StatusCode::OK,
                    serde_json::json!({"AccessorID": t.accessor, "SecretID": t.secret, "Description": "Bootstrap Token (Global Management)"})
                        .to_string(),
                ),
                _ if c.takes_secret => (StatusCode::NOT_FOUND, "Supplied token does not exist".into()),
                _ => (StatusCode::FORBIDDEN, "ACL not found".into()),
            }
        }

        async fn leader(State(s): State<Shared>) -> String {
            serde_json::to_string(&s.lock().unwrap().leader.clone().unwrap_or_default()).unwrap()
        }

        /// Serves the double on 127.0.0.1; returns its base URL.
        pub async fn serve(state: Shared) -> String {
            serve_at(state, "127.0.0.1:0").await
        }

        /// Serves the double on `addr`; returns its base URL.
        pub async fn serve_at(state: Shared, addr: &str) -> String {
            let app = Router::new()
                .route("/v1/acl/bootstrap", put(bootstrap))
                .route("/v1/acl/token/self", get(token_self))
                .route("/v1/status/leader", get(leader))
                .with_state(state);
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            format!("http://{addr}")
        }
    }

    use consul_contract_double::{Consul, Shared, Token};

    struct Run {
        result: Result<AclSecrets, TierFailure>,
        /// The secret escrowed before the call, if any.
        escrowed: Option<String>,
        consul: Consul,
    }

    /// Drives the tier as the protocol does (bootstrap::driver::lead): escrow the `pre_secret` payload
    /// (here: into the double's escrow record, standing in for both targets), then call `bootstrap`.
    async fn run(consul: Consul, path: BootstrapPath, deadline: Duration) -> Run {
        let state: Shared = std::sync::Arc::new(std::sync::Mutex::new(consul));
        let api = consul_contract_double::serve(state.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let tier = ConsulTier {
            api,
            ca_file,
            shared: None,
            status_vault: None,
            snapshot: None,
            cluster: "test".into(),
            path,
        };
        let escrowed = tier.pre_secret().map(|p| {
            let s: AclSecrets = serde_json::from_slice(&p).unwrap();
            assert_eq!(s.kind, "consul-acl-bootstrap");
            assert_eq!(s.accessor_id, "", "the server chooses the accessor");
            state.lock().unwrap().escrow.push(s.secret_id.clone());
            s.secret_id.clone()
        });
        let result = tier
            .bootstrap_within(deadline, Duration::from_secs(1))
            .await
            .map(|p| serde_json::from_slice::<AclSecrets>(&p).unwrap());
        let consul = std::mem::take(&mut *state.lock().unwrap());
        Run {
            result,
            escrowed,
            consul,
        }
    }

    /// A Consul 1.x follower refuses the ACL bootstrap ("legacy mode") until its own ACL-mode check, long after
    /// its leader left legacy mode (seen with the real 1.8.7: leader at 7.2 s, followers at 12.8 s): the call goes
    /// to the leader the local server names, once. A leader whose API cannot be reached (nothing listens) is given
    /// up for the local server.
    #[tokio::test]
    async fn the_acl_bootstrap_goes_to_the_leader_its_server_names() {
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let tier = |api: String| ConsulTier {
            api,
            ca_file: ca_file.clone(),
            shared: None,
            status_vault: None,
            snapshot: None,
            cluster: "test".into(),
            path: BootstrapPath::ServerGenerated,
        };
        // A follower in legacy mode for good, naming its leader on 127.0.0.2 (the same port: one API port per
        // cluster).
        let follower: Shared = Arc::new(Mutex::new(Consul {
            legacy_mode: u32::MAX,
            ..Default::default()
        }));
        let api = consul_contract_double::serve(follower.clone()).await;
        let port = api.rsplit(':').next().unwrap().to_string();
        let leader: Shared = Arc::new(Mutex::new(Consul::default()));
        consul_contract_double::serve_at(leader.clone(), &format!("127.0.0.2:{port}")).await;
        follower.lock().unwrap().leader = Some("127.0.0.2:8300".into());
        let got = tier(api.clone())
            .bootstrap_within(Duration::from_secs(3), Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        let got: AclSecrets = serde_json::from_slice(&got).unwrap();
        // The configuration after it goes there too: this follower refuses every ACL call in legacy mode.
        assert_eq!(
            tier(api).acl_api(&got.secret_id).await.unwrap(),
            format!("http://127.0.0.2:{port}")
        );
        {
            let l = leader.lock().unwrap();
            assert_eq!(l.calls.len(), 1, "sent once, to the leader");
            assert_eq!(got.secret_id, l.bootstrapped.as_ref().unwrap().secret);
        }
        assert!(
            follower.lock().unwrap().calls.is_empty(),
            "never to the follower"
        );

        // The leader's API unreachable: the local server, which leaves legacy mode after two answers.
        let local: Shared = Arc::new(Mutex::new(Consul {
            legacy_mode: 2,
            leader: Some("127.0.0.3:8300".into()),
            ..Default::default()
        }));
        let api = consul_contract_double::serve(local.clone()).await;
        let got = tier(api.clone())
            .bootstrap_within(Duration::from_secs(5), Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        let got: AclSecrets = serde_json::from_slice(&got).unwrap();
        assert_eq!(
            tier(api.clone()).acl_api(&got.secret_id).await.unwrap(),
            api
        );
        let l = local.lock().unwrap();
        assert_eq!(l.calls.len(), 3, "legacy mode twice, then the token");
        assert_eq!(got.secret_id, l.bootstrapped.as_ref().unwrap().secret);
        drop(l);
    }

    fn caller_secret() -> BootstrapPath {
        BootstrapPath::for_version(Version::parse("1.20.0"))
    }

    #[tokio::test]
    async fn caller_secret_is_escrowed_before_the_call_that_uses_it() {
        let r = run(
            Consul {
                takes_secret: true,
                legacy_mode: 2,
                errors_500: 1,
                ..Default::default()
            },
            caller_secret(),
            Duration::from_secs(20),
        )
        .await;
        let escrowed = r.escrowed.expect("escrowed before use");
        let got = r.result.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(got.secret_id, escrowed, "the token is the escrowed secret");
        assert!(!got.accessor_id.is_empty());
        assert_eq!(
            r.consul.calls.len(),
            4,
            "legacy mode twice and a 500 were retried"
        );
        for call in &r.consul.calls {
            assert_eq!(call.secret.as_deref(), Some(escrowed.as_str()));
            assert!(
                call.escrowed_before,
                "escrow happened before the call: {call:?}"
            );
            let body: serde_json::Value = serde_json::from_str(&call.body).unwrap();
            assert_eq!(body, serde_json::json!({"BootstrapSecret": escrowed}));
        }
    }

    #[tokio::test]
    async fn a_lost_answer_is_recovered_with_the_escrowed_secret() {
        // The first call bootstraps with our secret but its answer is lost (500); the retry finds the
        // ACL system bootstrapped, and token/self with our secret proves it was our call.
        let r = run(
            Consul {
                takes_secret: true,
                lose_answers: 1,
                ..Default::default()
            },
            caller_secret(),
            Duration::from_secs(20),
        )
        .await;
        let escrowed = r.escrowed.unwrap();
        let got = r.result.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(got.secret_id, escrowed);
        assert_eq!(got.accessor_id, r.consul.bootstrapped.unwrap().accessor);
        assert_eq!(r.consul.calls.len(), 2);
        assert_eq!(r.consul.self_checks, vec![escrowed]);
    }

    #[tokio::test]
    async fn bootstrapped_by_someone_else_is_already_done_for_the_operator() {
        let other = Token {
            accessor: "11111111-1111-4111-8111-111111111111".into(),
            secret: "22222222-2222-4222-8222-222222222222".into(),
        };
        for takes_secret in [true, false] {
            let r = run(
                Consul {
                    takes_secret,
                    bootstrapped: Some(other.clone()),
                    reset_index: 11,
                    ..Default::default()
                },
                caller_secret(),
                Duration::from_secs(20),
            )
            .await;
            let escrowed = r.escrowed.unwrap();
            match r.result {
                Err(TierFailure::AlreadyDone(detail)) => {
                    assert!(detail.contains("reset index: 11"), "{detail}");
                    assert!(!detail.contains(&escrowed));
                }
                Err(e) => panic!("{e:?}"),
                Ok(_) => panic!("someone else's bootstrap taken as ours"),
            }
            assert_eq!(r.consul.calls.len(), 1, "already done is final");
            assert_eq!(
                r.consul.self_checks,
                vec![escrowed],
                "our secret was checked"
            );
        }
    }

    #[tokio::test]
    async fn an_unanswered_ownership_check_is_not_taken_as_already_done() {
        let r = run(
            Consul {
                takes_secret: true,
                lose_answers: 1,
                token_self_down: true,
                ..Default::default()
            },
            caller_secret(),
            Duration::from_secs(20),
        )
        .await;
        match r.result {
            Err(TierFailure::Other(m)) => {
                assert!(m.contains("not known yet"), "{m}");
                assert!(!m.contains(&r.escrowed.unwrap()));
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("success without an answer"),
        }
        assert!(r.consul.self_checks.len() > 1, "token/self was retried");
    }

    #[tokio::test]
    async fn final_answers_stop_at_once() {
        for (status, text) in [
            (400, "Request decode failed: invalid character"),
            (
                500,
                "rpc error making call: Invalid bootstrap reset index (specified 3, reset index: 7)",
            ),
            (401, "ACL support disabled"),
        ] {
            let r = run(
                Consul {
                    takes_secret: true,
                    final_answer: Some((status, text.into())),
                    ..Default::default()
                },
                caller_secret(),
                Duration::from_secs(20),
            )
            .await;
            assert!(
                matches!(&r.result, Err(TierFailure::Other(m)) if m.contains(&format!("HTTP {status}"))),
                "{text}"
            );
            assert_eq!(r.consul.calls.len(), 1, "{text}: not retried");
        }
    }

    #[tokio::test]
    async fn retryable_answers_are_retried_until_the_deadline() {
        let start = std::time::Instant::now();
        let r = run(
            Consul {
                takes_secret: true,
                legacy_mode: u32::MAX,
                ..Default::default()
            },
            caller_secret(),
            Duration::from_secs(1),
        )
        .await;
        assert!(
            matches!(&r.result, Err(TierFailure::Other(m)) if m.contains("HTTP 500") && m.contains("still failing after")),
            "{:?}",
            r.result.as_ref().err()
        );
        assert!(r.consul.calls.len() > 2);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn older_consul_bootstraps_without_a_secret_and_escrows_after() {
        // Consul 1.8: no BootstrapSecret, nothing escrowed before the call; legacy mode retried.
        let r = run(
            Consul {
                legacy_mode: 2,
                ..Default::default()
            },
            BootstrapPath::for_version(Version::parse("1.8.7")),
            Duration::from_secs(20),
        )
        .await;
        assert!(r.escrowed.is_none(), "no pre-secret on this path");
        let got = r.result.unwrap_or_else(|e| panic!("{e:?}"));
        let t = r.consul.bootstrapped.unwrap();
        assert_eq!(
            (got.accessor_id.as_str(), got.secret_id.as_str()),
            (t.accessor.as_str(), t.secret.as_str())
        );
        assert!(r.consul.calls.iter().all(|c| c.body.is_empty()), "no body");
        // Already done: final, and nothing to check the ownership of.
        let r = run(
            Consul {
                bootstrapped: Some(t),
                reset_index: 19,
                ..Default::default()
            },
            BootstrapPath::ServerGenerated,
            Duration::from_secs(20),
        )
        .await;
        assert!(
            matches!(r.result, Err(TierFailure::AlreadyDone(d)) if d.contains("reset index: 19"))
        );
        assert!(r.consul.self_checks.is_empty());
    }

    #[tokio::test]
    async fn a_server_that_ignores_the_secret_gets_its_own_token_escrowed_after() {
        // A ≥ 1.15 agent whose leader is older: the answer carries a token the server generated.
        let r = run(Consul::default(), caller_secret(), Duration::from_secs(20)).await;
        let got = r.result.unwrap_or_else(|e| panic!("{e:?}"));
        assert_ne!(Some(got.secret_id.clone()), r.escrowed);
        assert_eq!(got.secret_id, r.consul.bootstrapped.unwrap().secret);
    }
}
