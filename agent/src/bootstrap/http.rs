//! What the tiers share in talking to their local server's HTTP API: the wait for a leader, the ACL
//! bootstrap call of Consul and Nomad (the same protocol: a caller-chosen `BootstrapSecret` escrowed before
//! use makes it idempotent), what that call escrows, and the error of one call in a retry loop.

use super::TierFailure;
use crate::retry::{retry, Attempt, NotYet, RetryError, RetryPolicy, TimeoutError};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// An error of one call to a server's HTTP API: which call, and what went wrong — never a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No answer: the connection, TLS, or the client's own timeout (the transport's words, without the URL).
    #[error("{call}: {detail}")]
    Transport { call: String, detail: String },
    /// An answer with a status the call does not take, with the server's first error line if it gave one.
    #[error("{call}: HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status {
        call: String,
        status: u16,
        detail: String,
    },
    /// A success whose body is not what the API documents.
    #[error("{call}: response did not parse")]
    Unparsable { call: String },
    /// No answer within one attempt's time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The HTTPS client could not be made (the CA file is missing or unreadable).
    #[error("HTTPS client: {0}")]
    Client(String),
}

impl CallError {
    /// A request that got no answer.
    pub fn transport(call: impl Into<String>, e: reqwest::Error) -> Self {
        CallError::Transport {
            call: call.into(),
            detail: e.without_url().to_string(),
        }
    }
    /// An answer with `status` and no detail worth repeating.
    pub fn status(call: impl Into<String>, status: u16) -> Self {
        CallError::Status {
            call: call.into(),
            status,
            detail: String::new(),
        }
    }
    /// An answer with `status` and the server's words (never a token: callers pass error texts only).
    pub fn refused(call: impl Into<String>, status: u16, detail: impl Into<String>) -> Self {
        CallError::Status {
            call: call.into(),
            status,
            detail: detail.into(),
        }
    }
    pub fn unparsable(call: impl Into<String>) -> Self {
        CallError::Unparsable { call: call.into() }
    }
    /// The answer's status, if the server answered.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            CallError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl TimeoutError for CallError {
    fn timeout(after: Duration) -> Self {
        CallError::Timeout(after)
    }
}

/// How often [`wait_for_leader`] asks: a local request, answered at once.
pub const LEADER_POLL: Duration = Duration::from_millis(25);

/// Polls `GET {api}/v1/status/leader` every [`LEADER_POLL`] until it names a leader; an error once `deadline` has
/// passed (`product` names the server in it).
pub(super) async fn wait_for_leader(
    c: &reqwest::Client,
    api: &str,
    product: &'static str,
    deadline: Duration,
) -> Result<(), super::TierError> {
    let policy = RetryPolicy::poll(deadline, LEADER_POLL, Duration::from_secs(10));
    retry(policy, |_| async {
        let leader = async {
            let r = c.get(format!("{api}/v1/status/leader")).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.json::<String>().await.ok().filter(|l| !l.is_empty())
        };
        match leader.await {
            Some(_) => Attempt::Done(()),
            None => Attempt::Retry(NotYet("no leader".into())),
        }
    })
    .await
    .map_err(|_| super::TierError::NoLeader {
        product,
        waited: deadline,
    })
}

/// Polls `GET {api}/v1/status/leader` every [`LEADER_POLL`] until the server answers at all (any HTTP status:
/// "No cluster leader" included); an error once `deadline` has passed.
pub(super) async fn wait_for_answer(
    c: &reqwest::Client,
    api: &str,
    product: &'static str,
    deadline: Duration,
) -> Result<(), super::TierError> {
    let policy = RetryPolicy::poll(deadline, LEADER_POLL, Duration::from_secs(10));
    retry(policy, |_| async {
        match c.get(format!("{api}/v1/status/leader")).send().await {
            Ok(_) => Attempt::Done(()),
            Err(e) => Attempt::Retry(NotYet(e.without_url().to_string())),
        }
    })
    .await
    .map_err(|e| super::TierError::NotReady {
        product,
        waited: deadline,
        last: e.to_string(),
    })
}

/// The secret of a token a Consul or Nomad token-create answer carries (`SecretID`); `what` names the call.
pub(super) fn acl_secret(body: &[u8], what: &str) -> Result<Zeroizing<String>, CallError> {
    #[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
    struct Created {
        #[serde(rename = "SecretID")]
        secret_id: String,
    }
    let mut t: Created = serde_json::from_slice(body).map_err(|_| CallError::unparsable(what))?;
    Ok(Zeroizing::new(std::mem::take(&mut t.secret_id)))
}

/// The token a Vault token-create answer carries (`auth.client_token`); `what` names the call.
pub(super) fn vault_client_token(body: &[u8], what: &str) -> Result<Zeroizing<String>, CallError> {
    #[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
    struct Auth {
        client_token: String,
    }
    #[derive(Deserialize)]
    struct Created {
        auth: Auth,
    }
    let mut t: Created = serde_json::from_slice(body).map_err(|_| CallError::unparsable(what))?;
    Ok(Zeroizing::new(std::mem::take(&mut t.auth.client_token)))
}

/// What is escrowed for a tier bootstrapped through its ACL system (Consul, Nomad). Escrowed before use,
/// `accessor_id` is empty (the server chooses it).
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct AclSecrets {
    pub kind: String,
    pub accessor_id: String,
    pub secret_id: String,
}

impl AclSecrets {
    /// Whether the escrow payload `payload` holds the management token whose secret is `secret`.
    pub fn holds(payload: &[u8], secret: &str) -> bool {
        serde_json::from_slice::<AclSecrets>(payload).is_ok_and(|s| s.secret_id == secret)
    }

    /// The escrow payload of a management token (`kind`: the tier's, e.g. `consul-acl-bootstrap`).
    pub fn payload(kind: &str, accessor_id: String, secret_id: String) -> Zeroizing<Vec<u8>> {
        crate::escrow::payload(&AclSecrets {
            kind: kind.into(),
            accessor_id,
            secret_id,
        })
    }
}

/// A token in an ACL answer (bootstrap, `token/self`).
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
pub(super) struct TokenResponse {
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
}

/// The ACL bootstrap body on the caller-secret path.
#[derive(Serialize)]
struct BootstrapRequest<'a> {
    #[serde(rename = "BootstrapSecret")]
    bootstrap_secret: &'a str,
}

/// What a non-200 ACL bootstrap answer means (each product's `classify` decides).
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// No leader yet, an election (Consul: legacy mode), 429, 5xx: try again.
    Retry,
    /// The ACL system was bootstrapped before: final unless the token is ours.
    AlreadyDone(String),
    /// Anything else (ACLs disabled, a bad reset index, a rejected secret, other 4xx): final.
    Final(String),
}

/// `text` with every occurrence of `secret` replaced, before any of it reaches an error or a log.
fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => text.replace(s, "<secret>"),
        _ => text.to_string(),
    }
}

/// One tier's ACL bootstrap call, sent until it yields a token, a final answer, or `deadline` passes.
pub(super) struct AclBootstrap<'a> {
    /// The product, as log lines name it.
    pub product: &'static str,
    /// The escrow payload's kind ([`AclSecrets::payload`]).
    pub kind: &'static str,
    pub method: reqwest::Method,
    pub url: String,
    /// The caller-chosen `BootstrapSecret`, escrowed before use, if any. With it a lost answer is harmless
    /// (the retry finds our token); without it only a request that never reached the server is sent again.
    pub secret: Option<&'a str>,
    /// How long retryable answers are retried.
    pub deadline: Duration,
    /// The pause after a retryable answer.
    pub retry_every: Duration,
    /// The product's verdict on an answer that is not 200.
    pub classify: fn(u16, &str) -> Answer,
    /// Consul: send each request to the raft leader's API instead ([`ToLeader`]); `None`: always to `url`.
    pub to_leader: Option<ToLeader>,
}

/// Consul 1.x: each request goes to the raft leader's API (`url` with the leader's address in place of the local
/// server's). The leader leaves ACL legacy mode as it takes over; a follower refuses the bootstrap ("legacy mode")
/// until its own ACL-mode check comes round, at doubling intervals from its start (50 ms … 12.8 s … 30 s): up to
/// tens of seconds after the leader could have taken it (docs/bootstrap.md#consul-acl-legacy-mode). The local
/// server names the leader (`/v1/status/leader`, `ip:port` of its RPC); when it names none, or the leader's API
/// cannot be reached (an older template that opens 8501 to the jumpbox only), the request goes to `url`.
#[derive(Debug, Default)]
pub struct ToLeader {
    unreachable: std::sync::atomic::AtomicBool,
}

impl ToLeader {
    /// `local` (a URL of the local server's API) at the leader that server names; `None`: no leader named, the
    /// local server is the leader, or the leader's API was found unreachable ([`ToLeader::failed`]).
    pub async fn url(&self, c: &reqwest::Client, local: &reqwest::Url) -> Option<reqwest::Url> {
        if self.unreachable.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        leader_url(c, local).await
    }

    /// A request to the leader's API failed with `e`: whether that gives the leader up for the rest (a connection
    /// that could not be made; the request never left).
    pub fn failed(&self, e: &reqwest::Error) -> bool {
        let gone = e.is_connect();
        if gone {
            self.unreachable
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        gone
    }
}

/// `url` with its host replaced by the address in `leader` (`ip:port`, as `/v1/status/leader` answers).
fn at_leader(url: &reqwest::Url, leader: &str) -> Option<reqwest::Url> {
    let ip = leader.parse::<std::net::SocketAddr>().ok()?.ip();
    let mut u = url.clone();
    u.set_ip_host(ip).ok()?;
    Some(u)
}

/// `local` (a URL of the local server's API) at the raft leader the local server names, if that is another
/// server; `None`: no leader named, or the local server is the leader.
async fn leader_url(c: &reqwest::Client, local: &reqwest::Url) -> Option<reqwest::Url> {
    let mut ask = local.clone();
    ask.set_path("/v1/status/leader");
    ask.set_query(None);
    let r = c.get(ask).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let leader = r.json::<String>().await.ok()?;
    at_leader(local, &leader).filter(|u| u != local)
}

impl<'a> AclBootstrap<'a> {
    /// Calls until the token comes back (its escrow payload), a final answer, or the deadline. "Already
    /// done" with a caller secret asks `own_token` whether that secret is a valid token (an earlier attempt
    /// of ours landed): its accessor ID if so, `None` if not, an error while that cannot be told.
    pub async fn call<F, Fut, E>(
        &self,
        c: &reqwest::Client,
        own_token: F,
    ) -> Result<Zeroizing<Vec<u8>>, TierFailure>
    where
        F: FnOnce(&'a str) -> Fut,
        Fut: Future<Output = Result<Option<String>, E>>,
        E: std::fmt::Display,
    {
        let body = self.secret.map(|s| {
            Zeroizing::new(
                serde_json::to_vec(&BootstrapRequest {
                    bootstrap_secret: s,
                })
                .expect("json"),
            )
        });
        // Attempts are never cut short: a request cut after it reached the server could lose a token that
        // exists nowhere else (on the path without a caller secret).
        let policy = RetryPolicy::poll_whole(self.deadline, self.retry_every);
        let answer = retry(policy, |_| {
            self.attempt(c, body.as_ref().map(|b| b.as_slice()))
        })
        .await;
        let detail = match answer {
            Ok(BootstrapAnswer::Token(payload)) => return Ok(payload),
            Ok(BootstrapAnswer::AlreadyDone(detail)) => detail,
            Err(RetryError::Final(Stop::Final(f))) => return Err(f),
            Err(RetryError::Final(Stop::Transient(last)))
            | Err(RetryError::Deadline {
                last: Stop::Transient(last),
                ..
            }) => {
                return Err(TierFailure::Other(format!(
                    "{last} (still failing after {:?})",
                    self.deadline
                )))
            }
            Err(RetryError::Deadline {
                last: Stop::Final(f),
                ..
            }) => return Err(f),
        };
        let Some(s) = self.secret else {
            return Err(TierFailure::AlreadyDone(detail));
        };
        match own_token(s).await {
            Ok(Some(accessor)) => {
                tracing::info!(
                    "ACL bootstrap already done with our escrowed secret (an earlier attempt landed)"
                );
                Ok(AclSecrets::payload(self.kind, accessor, s.to_string()))
            }
            Ok(None) => Err(TierFailure::AlreadyDone(detail)),
            // Unknown whether our secret was used: not "already done by someone else" (that would drop the
            // pointer to our escrow); the next boot asks again.
            Err(e) => Err(TierFailure::Other(format!(
                "ACL bootstrap already done ({detail}); whether with our escrowed secret is not known yet: {e}"
            ))),
        }
    }

    /// Where this request goes: `url`, or the raft leader's API ([`ToLeader`]).
    async fn target(&self, c: &reqwest::Client) -> Option<reqwest::Url> {
        let local = reqwest::Url::parse(&self.url).ok()?;
        self.to_leader.as_ref()?.url(c, &local).await
    }

    /// One bootstrap request and what its answer means.
    async fn attempt(
        &self,
        c: &reqwest::Client,
        body: Option<&[u8]>,
    ) -> Attempt<BootstrapAnswer, Stop> {
        let leader = self.target(c).await;
        let url = leader.as_ref().map_or(self.url.as_str(), |u| u.as_str());
        let mut req = c.request(self.method.clone(), url);
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_vec());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            // The leader's API cannot be reached (the request never left): the local server from now on.
            Err(e)
                if leader.is_some()
                    && self
                        .to_leader
                        .as_ref()
                        .is_some_and(|route| route.failed(&e)) =>
            {
                let e = e.without_url();
                tracing::warn!(leader = %url, error = %e, "{}'s leader cannot be reached for the ACL bootstrap; asking the local server instead", self.product);
                return Attempt::Retry(Stop::Transient(format!("ACL bootstrap: {e}")));
            }
            // With a caller secret a resend is harmless; without one, only a request that never reached the
            // server is sent again.
            Err(e) if self.secret.is_some() || e.is_connect() => {
                return Attempt::Retry(Stop::Transient(format!(
                    "ACL bootstrap: {}",
                    e.without_url()
                )))
            }
            Err(e) => {
                return Attempt::Fail(Stop::Final(TierFailure::Other(format!(
                    "ACL bootstrap: {}",
                    e.without_url()
                ))))
            }
        };
        let status = resp.status().as_u16();
        let mut bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        if status == 200 {
            let parsed: Result<TokenResponse, _> = serde_json::from_slice(&bytes);
            bytes.zeroize();
            let Ok(mut t) = parsed else {
                return Attempt::Fail(Stop::Final(TierFailure::Other(
                    "ACL bootstrap response did not parse".into(),
                )));
            };
            if self.secret.is_some_and(|s| t.secret_id != s) {
                // A server that ignores BootstrapSecret (an older leader): its own token is escrowed right
                // after this call, as on the server-generated path.
                tracing::warn!(
                    "{} did not use the escrowed BootstrapSecret; escrowing the token it generated",
                    self.product
                );
            }
            return Attempt::Done(BootstrapAnswer::Token(AclSecrets::payload(
                self.kind,
                std::mem::take(&mut t.accessor_id),
                std::mem::take(&mut t.secret_id),
            )));
        }
        let text = redact(&String::from_utf8_lossy(&bytes), self.secret);
        bytes.zeroize();
        match (self.classify)(status, &text) {
            Answer::Retry => {
                Attempt::Retry(Stop::Transient(format!("ACL bootstrap: HTTP {status}")))
            }
            Answer::AlreadyDone(detail) => Attempt::Done(BootstrapAnswer::AlreadyDone(detail)),
            Answer::Final(message) => Attempt::Fail(Stop::Final(TierFailure::Other(message))),
        }
    }
}

/// What a bootstrap request that was answered yields.
enum BootstrapAnswer {
    /// The management token's escrow payload.
    Token(Zeroizing<Vec<u8>>),
    /// "Already bootstrapped": the server's words.
    AlreadyDone(String),
}

/// Why the bootstrap requests stopped without an answer.
#[derive(Debug)]
enum Stop {
    /// Worth another request (no leader, 5xx, a connection refused): what was seen.
    Transient(String),
    Final(TierFailure),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Transient(t) => f.write_str(t),
            Stop::Final(e) => write!(f, "{e:?}"),
        }
    }
}

impl TimeoutError for Stop {
    fn timeout(after: Duration) -> Self {
        Stop::Transient(format!("ACL bootstrap: no answer within {after:?}"))
    }
}
