//! Azure SDK clients (Blob Storage, Key Vault) built over the node's managed identity, and the one place
//! where SDK errors are classified as retryable or final. SDK-internal retries are off: every call goes
//! through `retry::retry` with an explicit deadline, so a dead endpoint costs seconds, not minutes.

use crate::retry::{retry, Attempt, RetryError, RetryPolicy, TimeoutError};
use crate::tls::HttpsClientError;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, RetryOptions, Transport, Url};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use azure_storage_blob::{
    BlobClient, BlobClientOptions, BlobContainerClient, BlobContainerClientOptions,
};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod gate;
use gate::{next_attempt, GatedClient, ATTEMPT};
pub use gate::{Entered, Gate, Gates};

/// An Azure call that failed. Carries status and service error code only: never a request or response body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct AzureError {
    pub what: String,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub detail: String,
}

impl TimeoutError for AzureError {
    fn timeout(after: Duration) -> Self {
        AzureError {
            what: "request".into(),
            status: None,
            code: None,
            detail: format!("no answer within {after:?}"),
        }
    }
}

impl AzureError {
    pub fn from_sdk(what: &str, e: &azure_core::Error) -> Self {
        let (status, code) = match e.kind() {
            ErrorKind::HttpResponse {
                status, error_code, ..
            } => (Some(u16::from(*status)), error_code.clone()),
            _ => (None, None),
        };
        let detail = match (status, &code) {
            (Some(s), Some(c)) if *c != s.to_string() => format!("HTTP {s} {c}"),
            (Some(s), _) => format!("HTTP {s}"),
            _ => match e.kind() {
                ErrorKind::Connection => "cannot connect".to_string(),
                ErrorKind::Io => "I/O error".to_string(),
                ErrorKind::Credential => format!("credential: {e}"),
                _ => "request failed".to_string(),
            },
        };
        AzureError {
            what: what.to_string(),
            status,
            code,
            detail,
        }
    }

    /// Whether trying again can help: throttling, server errors, timeouts, connection failures, and 401
    /// (a token that expired in flight). 400/404/409/412 are final answers.
    pub fn retryable(&self) -> bool {
        match self.status {
            // 403 is retried too: Azure documents that new role assignments can take minutes to apply, and a
            // freshly deployed VM boots inside that window. The deadline bounds it.
            Some(s) => s == 401 || s == 403 || s == 408 || s == 429 || (500..600).contains(&s),
            None => !self.detail.starts_with("credential"),
        }
    }

    pub fn is(&self, status: u16) -> bool {
        self.status == Some(status)
    }
}

/// The longest `Retry-After` the agent honours; a longer one is cut to it (the deadline bounds the whole call).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a throttled (429) or unavailable (503) answer asks the caller to wait: Azure's `x-ms-retry-after-ms`
/// and `retry-after-ms`, else the standard `Retry-After` (seconds or an HTTP date), read by the SDK's own
/// parser; capped at [`MAX_RETRY_AFTER`]. Key Vault documents `Retry-After` on its 429s (service limits), Blob
/// Storage on its 503 "server busy".
pub fn retry_after(e: &azure_core::Error) -> Option<Duration> {
    let ErrorKind::HttpResponse {
        raw_response: Some(raw),
        ..
    } = e.kind()
    else {
        return None;
    };
    retry_after_in(raw.headers())
}

/// [`retry_after`] from an answer's headers.
fn retry_after_in(headers: &azure_core::http::headers::Headers) -> Option<Duration> {
    use azure_core::http::headers::{RETRY_AFTER, RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS};
    let after = azure_core::http::policies::get_retry_after(
        headers,
        time::OffsetDateTime::now_utc,
        &[X_MS_RETRY_AFTER_MS, RETRY_AFTER_MS, RETRY_AFTER],
    )?;
    let after = Duration::try_from(after).unwrap_or(Duration::ZERO);
    Some(after.min(MAX_RETRY_AFTER))
}

/// `after` plus up to a quarter more, so that agents throttled together do not come back together.
pub fn jittered(after: Duration) -> Duration {
    after + after.mul_f64(rand::random::<f64>() / 4.0)
}

/// Runs one SDK call under `policy`, classifying failures (403 retried: role assignments still propagating).
pub async fn call<T, F, Fut>(policy: RetryPolicy, what: &str, f: F) -> Result<T, AzureError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = azure_core::Result<T>>,
{
    call_classified(policy, what, AzureError::retryable, f).await
}

/// Like [`call`], but a 403 is final: for operators, whose permissions are not in the middle of being granted.
pub async fn call_strict<T, F, Fut>(policy: RetryPolicy, what: &str, f: F) -> Result<T, AzureError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = azure_core::Result<T>>,
{
    call_classified(
        policy,
        what,
        |e: &AzureError| !e.is(403) && e.retryable(),
        f,
    )
    .await
}

/// What a gated call sends: whether it may be withdrawn once let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sends {
    /// A read: one still unanswered when another request to the vault is throttled is withdrawn and sent again
    /// after the hold (see `azure/gate.rs`).
    Read,
    /// A write: once let through, never withdrawn (it may have landed).
    Write,
}

/// Like [`call`], through `gate`: the throttle gate of the vault the call goes to ([`Azure::gate`]).
pub async fn call_gated<T, F, Fut>(
    gate: &Gate,
    sends: Sends,
    policy: RetryPolicy,
    what: &str,
    f: F,
) -> Result<T, AzureError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = azure_core::Result<T>>,
{
    let gated = Gated {
        gate,
        withdraw: sends == Sends::Read,
    };
    call_inner(policy, what, AzureError::retryable, Some(gated), f).await
}

/// A gated call: its vault's gate, and whether an unanswered request is withdrawn at another's 429.
#[derive(Clone, Copy)]
struct Gated<'a> {
    gate: &'a Gate,
    withdraw: bool,
}

async fn call_classified<T, F, Fut>(
    policy: RetryPolicy,
    what: &str,
    retryable: fn(&AzureError) -> bool,
    f: F,
) -> Result<T, AzureError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = azure_core::Result<T>>,
{
    call_inner(policy, what, retryable, None, f).await
}

async fn call_inner<T, F, Fut>(
    policy: RetryPolicy,
    what: &str,
    retryable: fn(&AzureError) -> bool,
    gated: Option<Gated<'_>>,
    mut f: F,
) -> Result<T, AzureError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = azure_core::Result<T>>,
{
    let gate = gated.map(|g| g.gate);
    let r = retry(policy, |_| {
        // SDK futures send nothing until polled: the gate is passed first.
        let fut = f();
        async move {
            let entered = match gate {
                Some(g) => match g.enter().await {
                    Ok(e) => Some(e),
                    // Held: not sent; the loop waits out the hold (or ends with the 429 if the deadline
                    // comes first).
                    Err((left, cause)) => return Attempt::RetryAfter(cause, left),
                },
                None => None,
            };
            // The attempt's number, for the transport: a 429 to it must not withdraw it.
            let attempt = next_attempt();
            let fut = ATTEMPT.scope(attempt, fut);
            let sent = std::time::Instant::now();
            let out = match (gated, &entered) {
                (
                    Some(Gated {
                        gate: g,
                        withdraw: true,
                    }),
                    Some(e),
                ) => tokio::select! {
                    // The gate first: a read woken by the connection a 429 freed must not be sent on it.
                    biased;
                    cause = g.throttled_since(e.generation, attempt) => {
                        return match g.hold() {
                            Some((left, held)) => Attempt::RetryAfter(held, left),
                            None => Attempt::Retry(cause),
                        };
                    }
                    out = fut => out,
                },
                _ => fut.await,
            };
            // Each attempt's round trip (the bench's timelines: docs/PERFORMANCE.md); names the call only.
            tracing::debug!(
                what,
                ms = sent.elapsed().as_millis() as u64,
                status = match &out {
                    Ok(_) => None,
                    Err(e) => e.http_status().map(u16::from),
                },
                "azure call"
            );
            match out {
                Ok(v) => {
                    if let (Some(g), Some(e)) = (gate, &entered) {
                        g.answered(e);
                    }
                    Attempt::Done(v)
                }
                Err(e) => {
                    let err = AzureError::from_sdk(what, &e);
                    let after = retry_after(&e).map(jittered);
                    if let (Some(g), Some(entered)) = (gate, &entered) {
                        if err.is(429) {
                            // Counted once, whether or not the transport saw it first.
                            g.throttled(Some(entered.generation), attempt, after, &err);
                        } else if err.status.is_some() {
                            g.answered(entered);
                        }
                    }
                    // The gate's hold, where there is one, is at least this call's own.
                    let after = match gate.and_then(Gate::hold) {
                        Some((left, _)) => Some(after.map_or(left, |a| a.max(left))),
                        None => after,
                    };
                    if !retryable(&err) {
                        Attempt::Fail(err)
                    } else if let Some(after) = after {
                        Attempt::RetryAfter(err, after)
                    } else {
                        Attempt::Retry(err)
                    }
                }
            }
        }
    })
    .await;
    r.map_err(|e| match e {
        RetryError::Final(e) => e,
        RetryError::Deadline {
            attempts,
            elapsed,
            last,
        } => AzureError {
            detail: format!(
                "{} (gave up after {attempts} attempts in {:.1}s)",
                last.detail,
                elapsed.as_secs_f64()
            ),
            ..last
        },
    })
}

/// Factory for SDK clients sharing one credential and transport.
#[derive(Clone)]
pub struct Azure {
    credential: Arc<dyn TokenCredential>,
    transport: Transport,
    verify_challenge_resource: bool,
    /// One throttle gate per vault, shared by every clone of this factory and by its transport.
    gates: Gates,
    /// The Key Vault clients made so far, one per vault and kind, shared by every clone of this factory.
    vaults: VaultClients,
}

/// A Key Vault client learns its vault's challenge (the scope to ask a token for) from its first request, which
/// goes out without a token and is answered 401; every later request of that client carries the token at once.
/// So each vault gets one client per kind, kept for the factory's life: one challenge per vault and boot, not
/// one per operation.
#[derive(Clone, Default)]
struct VaultClients {
    keys: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<KeyClient>>>>,
    secrets: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<SecretClient>>>>,
}

/// The client of `uri` in `map` (by origin, as the gates), made by `make` the first time.
fn kept<C>(
    map: &std::sync::Mutex<std::collections::HashMap<String, Arc<C>>>,
    uri: &str,
    make: impl FnOnce() -> Result<C, AzureError>,
) -> Result<Arc<C>, AzureError> {
    let key = gate::key(uri);
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = m.get(&key) {
        return Ok(c.clone());
    }
    let c = Arc::new(make()?);
    m.insert(key, c.clone());
    Ok(c)
}

impl std::fmt::Debug for Azure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Azure").finish_non_exhaustive()
    }
}

impl Azure {
    /// `extra_ca`: a CA to trust besides the system roots (the lab's emulators). `verify_challenge_resource`
    /// stays true on Azure; the lab's Key Vault on 127.x cannot match `*.vault.azure.net`.
    ///
    /// Every client this factory makes shares one HTTP client: the system trust store is loaded once (the SDK's
    /// default transport builds a client, and loads it, for every SDK client), and a vault's or storage
    /// account's connections are kept across the clients of one boot.
    pub fn new(
        credential: Arc<dyn TokenCredential>,
        extra_ca: Option<&Path>,
        verify_challenge_resource: bool,
    ) -> Result<Self, HttpsClientError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            // Partitioned blob downloads need the raw bytes (as the SDK's own default transport does).
            .gzip(false)
            .deflate(false);
        if let Some(path) = extra_ca {
            builder = builder.add_root_certificate(crate::tls::ca_certificate(path)?);
        }
        let client = builder.build().map_err(HttpsClientError::Build)?;
        let gates = Gates::default();
        let client = GatedClient {
            inner: Arc::new(client),
            gates: gates.clone(),
        };
        Ok(Azure {
            credential,
            transport: Transport::new(Arc::new(client)),
            verify_challenge_resource,
            gates,
            vaults: VaultClients::default(),
        })
    }

    /// Fetches (and caches in the credential) the identity's token for `resource` ahead of the first request
    /// that needs it. A failure is not reported here: that request fetches the token again and reports it.
    pub async fn prefetch_token(&self, resource: &str) {
        let scope = format!("{resource}/.default");
        if let Err(e) = self.credential.get_token(&[scope.as_str()], None).await {
            tracing::debug!(error = %e, "identity token not prefetched");
        }
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            transport: Some(self.transport.clone()),
            retry: RetryOptions::none(),
            ..Default::default()
        }
    }

    /// `<endpoint><container>/<name>`; `endpoint` ends with `/` (NodeSpec guarantees it).
    pub fn blob(
        &self,
        endpoint: &str,
        container: &str,
        name: &str,
    ) -> Result<BlobClient, AzureError> {
        let url = Url::parse(&format!("{endpoint}{container}/{name}")).map_err(|e| AzureError {
            what: format!("blob {container}/{name}"),
            status: None,
            code: None,
            detail: e.to_string(),
        })?;
        let opts = BlobClientOptions {
            client_options: self.client_options(),
            ..Default::default()
        };
        BlobClient::new(url, Some(self.credential.clone()), Some(opts))
            .map_err(|e| AzureError::from_sdk(&format!("blob {container}/{name}"), &e))
    }

    /// `<endpoint><container>` (for listing).
    pub fn container(
        &self,
        endpoint: &str,
        container: &str,
    ) -> Result<BlobContainerClient, AzureError> {
        let what = || format!("container {container}");
        let url = Url::parse(&format!("{endpoint}{container}")).map_err(|e| AzureError {
            what: what(),
            status: None,
            code: None,
            detail: e.to_string(),
        })?;
        let opts = BlobContainerClientOptions {
            client_options: self.client_options(),
            ..Default::default()
        };
        BlobContainerClient::new(url, Some(self.credential.clone()), Some(opts))
            .map_err(|e| AzureError::from_sdk(&what(), &e))
    }

    /// The throttle gate of the vault at `vault_uri` (one per vault for this factory and its clones).
    pub fn gate(&self, vault_uri: &str) -> Arc<Gate> {
        self.gates.gate(vault_uri)
    }

    /// The keys client of `vault_uri`: made once per factory ([`VaultClients`]).
    pub fn keys(&self, vault_uri: &str) -> Result<Arc<KeyClient>, AzureError> {
        kept(&self.vaults.keys, vault_uri, || {
            let opts = KeyClientOptions {
                client_options: self.client_options(),
                verify_challenge_resource: Some(self.verify_challenge_resource),
                ..Default::default()
            };
            KeyClient::new(vault_uri, self.credential.clone(), Some(opts))
                .map_err(|e| AzureError::from_sdk("key vault keys client", &e))
        })
    }

    /// The secrets client of `vault_uri`: made once per factory ([`VaultClients`]).
    pub fn secrets(&self, vault_uri: &str) -> Result<Arc<SecretClient>, AzureError> {
        kept(&self.vaults.secrets, vault_uri, || {
            let opts = SecretClientOptions {
                client_options: self.client_options(),
                verify_challenge_resource: Some(self.verify_challenge_resource),
                ..Default::default()
            };
            SecretClient::new(vault_uri, self.credential.clone(), Some(opts))
                .map_err(|e| AzureError::from_sdk("key vault secrets client", &e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::{headers::Headers, RawResponse, StatusCode};

    #[derive(Debug)]
    struct NoCredential;
    #[async_trait::async_trait]
    impl TokenCredential for NoCredential {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            Err(azure_core::Error::with_message(
                ErrorKind::Credential,
                "none",
            ))
        }
    }

    /// On Azure (no extra CA) too, the SDK clients share the factory's one HTTP client instead of each building
    /// its own (a trust-store load and a connection pool per client).
    /// One Key Vault client per vault and kind, for the factory and its clones: its vault's challenge is learnt
    /// once (the first request of a new client is an unauthenticated one that Key Vault answers 401).
    #[test]
    fn each_vault_has_one_kept_client_per_kind() {
        let az = Azure::new(Arc::new(NoCredential), None, true).unwrap();
        let a = "https://a.vault.azure.net/";
        let k1 = az.keys(a).unwrap();
        let k2 = az.clone().keys("https://A.vault.azure.net").unwrap();
        assert!(
            Arc::ptr_eq(&k1, &k2),
            "the same vault, another spelling, a clone"
        );
        assert!(!Arc::ptr_eq(
            &k1,
            &az.keys("https://b.vault.azure.net/").unwrap()
        ));
        let s1 = az.secrets(a).unwrap();
        assert!(Arc::ptr_eq(&s1, &az.secrets(a).unwrap()));
        // Another factory (another boot, another identity): clients of its own.
        let other = Azure::new(Arc::new(NoCredential), None, true).unwrap();
        assert!(!Arc::ptr_eq(&k1, &other.keys(a).unwrap()));
    }

    #[test]
    fn every_client_shares_one_transport_with_or_without_an_extra_ca() {
        let az = Azure::new(Arc::new(NoCredential), None, true).unwrap();
        assert!(az.client_options().transport.is_some());
    }

    /// An SDK error as a throttled answer produces it: status, and the answer's headers.
    fn throttled(
        status: StatusCode,
        headers: &[(&'static str, &'static str)],
    ) -> azure_core::Error {
        let mut h = Headers::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        azure_core::Error::with_message(
            ErrorKind::HttpResponse {
                status,
                error_code: Some("Throttled".into()),
                raw_response: Some(Box::new(RawResponse::from_bytes(status, h, Vec::new()))),
            },
            "throttled",
        )
    }

    #[test]
    fn retry_after_is_read_from_the_answer_and_capped() {
        let s = StatusCode::TooManyRequests;
        assert_eq!(
            retry_after(&throttled(s, &[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        // Azure's millisecond headers come first.
        assert_eq!(
            retry_after(&throttled(
                s,
                &[("retry-after", "7"), ("x-ms-retry-after-ms", "250")]
            )),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_after(&throttled(s, &[("retry-after", "86400")])),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&throttled(s, &[])), None);
        assert_eq!(retry_after(&throttled(s, &[("retry-after", "soon")])), None);
        let a = Duration::from_secs(4);
        for _ in 0..50 {
            let j = jittered(a);
            assert!(j >= a && j <= a + a / 4, "{j:?}");
        }
    }

    /// A policy for the gate tests: `deadline`, 1 s per attempt, 5 ms between attempts.
    fn quick(deadline: Duration) -> RetryPolicy {
        RetryPolicy {
            deadline,
            attempt_timeout: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn a_call_waits_as_long_as_the_service_asks() {
        let policy = quick(Duration::from_millis(600));
        // Without Retry-After: retried at the policy's pace, many times within the deadline.
        let mut n = 0;
        let r: Result<(), _> = call(policy, "t", || {
            n += 1;
            async { Err(throttled(StatusCode::TooManyRequests, &[])) }
        })
        .await;
        assert!(r.is_err());
        assert!(n > 10, "{n} attempts");
        // Asked to wait 1 s (beyond the deadline): one attempt, then the call gives up with the 429.
        let mut n = 0;
        let r: Result<(), _> = call(policy, "t", || {
            n += 1;
            async {
                Err(throttled(
                    StatusCode::TooManyRequests,
                    &[("retry-after", "1")],
                ))
            }
        })
        .await;
        assert_eq!(n, 1);
        assert_eq!(r.unwrap_err().status, Some(429));
        // Asked to wait 100 ms: honoured, then the next attempt succeeds.
        let mut n = 0;
        let r = call(policy, "t", || {
            n += 1;
            let first = n == 1;
            async move {
                if first {
                    Err(throttled(
                        StatusCode::TooManyRequests,
                        &[("retry-after-ms", "100")],
                    ))
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n, 2);
    }

    /// Two calls to one throttled vault: the second is not sent before the first's 429 `Retry-After` has
    /// passed (the old per-call retry sent it at once), and a call whose deadline ends inside the hold ends
    /// with the 429 without sending anything.
    #[tokio::test]
    async fn a_429_holds_every_call_to_that_vault() {
        let gate = Gate::default();
        let short = quick(Duration::from_millis(100));
        let mut answered = None;
        let r: Result<(), _> = call_gated(&gate, Sends::Write, short, "a", || {
            answered = Some(std::time::Instant::now());
            async {
                Err(throttled(
                    StatusCode::TooManyRequests,
                    &[("retry-after-ms", "400")],
                ))
            }
        })
        .await;
        assert!(r.unwrap_err().is(429));
        let answered = answered.unwrap();
        assert!(gate.single());
        // Inside the hold, with less deadline than hold left: nothing sent, the 429 is the answer.
        // (Counted where the request is sent: the SDK's future sends when polled, not when made.)
        let sent = std::sync::Mutex::new(Vec::new());
        let r: Result<(), _> = call_gated(&gate, Sends::Write, short, "b", || async {
            sent.lock().unwrap().push(std::time::Instant::now());
            Ok(())
        })
        .await;
        let err = r.unwrap_err();
        assert!(err.is(429) && err.detail.contains("gave up"), "{err}");
        assert!(sent.lock().unwrap().is_empty());
        // With time to wait: sent once, not before the hold ends.
        let long = RetryPolicy {
            deadline: Duration::from_secs(5),
            ..short
        };
        call_gated(&gate, Sends::Write, long, "c", || async {
            sent.lock().unwrap().push(std::time::Instant::now());
            Ok(())
        })
        .await
        .unwrap();
        let sent_at = sent.into_inner().unwrap();
        assert_eq!(sent_at.len(), 1);
        assert!(
            sent_at[0] >= answered + Duration::from_millis(400),
            "sent {:?} after the 429, which asked for 400 ms",
            sent_at[0] - answered
        );
        // Answered without a 429: full concurrency again.
        assert!(!gate.single());
    }

    /// While a vault is throttled its calls go one at a time; the first answer to a request sent after the
    /// last 429 reopens full concurrency; an answer to a request already on the wire at the 429 does not.
    #[tokio::test]
    async fn a_throttled_vault_is_called_one_at_a_time_until_it_answers() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let gate = Gate::default();
        let policy = quick(Duration::from_secs(5));
        // On the wire before the 429: its answer does not reopen.
        let before = gate.enter().await.unwrap();
        gate.throttled(None, 0, None, &e(Some(429), "throttled"));
        gate.answered(&before);
        drop(before);
        assert!(gate.single());
        let (now, most) = (AtomicU32::new(0), AtomicU32::new(0));
        let one = || async {
            call_gated(&gate, Sends::Write, policy, "x", || async {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
            .await
        };
        let (a, b, c) = tokio::join!(one(), one(), one());
        for r in [a, b, c] {
            r.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "one at a time while throttled"
        );
        assert!(!gate.single());
        most.store(0, Ordering::SeqCst);
        let (a, b, c) = tokio::join!(one(), one(), one());
        for r in [a, b, c] {
            r.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3, "all at once once answered");
    }

    /// The race behind the scale bench's early requests: read b is let through the gate while read a is on the
    /// wire, and waits inside the HTTP client for a connection; a's 429 comes back, and reading it frees a's
    /// connection, which the client hands to b. b must not be sent on it inside the hold: the 429 withdraws b
    /// (it is sent again once the hold has passed), and a itself is not withdrawn before its answer is read.
    #[tokio::test]
    async fn a_read_waiting_for_a_connection_is_not_sent_on_the_one_a_429_frees() {
        use tokio::sync::watch;
        let gate = Gate::default();
        let policy = quick(Duration::from_secs(5));
        let hold = Duration::from_millis(300);
        let (b_in, b_in_rx) = watch::channel(false);
        let (freed, freed_rx) = watch::channel(false);
        let answered_429 = std::sync::Mutex::new(None);
        let b_sent = std::sync::Mutex::new(Vec::new());
        let mut a_calls = 0;
        let a = call_gated(&gate, Sends::Read, policy, "a", || {
            a_calls += 1;
            let first = a_calls == 1;
            let (gate, freed, answered_429) = (&gate, &freed, &answered_429);
            let mut b_in_rx = b_in_rx.clone();
            async move {
                if !first {
                    return Ok(());
                }
                // On the wire until b has been let through too.
                b_in_rx.wait_for(|b| *b).await.unwrap();
                // The transport reads the 429's status line: the gate is marked there (as GatedClient does) ...
                let own = ATTEMPT.try_with(|a| *a).unwrap();
                gate.throttled(None, own, Some(hold), &e(Some(429), "HTTP 429"));
                *answered_429.lock().unwrap() = Some(std::time::Instant::now());
                tokio::task::yield_now().await;
                // ... then its body, which frees the connection.
                freed.send(true).unwrap();
                Err(throttled(
                    StatusCode::TooManyRequests,
                    &[("retry-after-ms", "300")],
                ))
            }
        });
        let b = call_gated(&gate, Sends::Read, policy, "b", || {
            let (b_in, freed_rx, b_sent) = (&b_in, freed_rx.clone(), &b_sent);
            async move {
                b_in.send(true).unwrap();
                // Waiting for a connection: the one a's 429 frees.
                let mut freed_rx = freed_rx;
                freed_rx.wait_for(|f| *f).await.unwrap();
                b_sent.lock().unwrap().push(std::time::Instant::now());
                Ok(())
            }
        });
        let (a, b) = tokio::join!(a, b);
        a.unwrap();
        b.unwrap();
        let at = answered_429.into_inner().unwrap().expect("a read its 429");
        let sent = b_sent.into_inner().unwrap();
        assert_eq!(sent.len(), 1, "b is sent once");
        assert!(
            sent[0] >= at + hold,
            "b was sent {:?} after a's 429, inside its {hold:?} hold",
            sent[0] - at
        );
        assert_eq!(a_calls, 2, "a read its own 429, then was sent again");
    }

    #[test]
    fn one_gate_per_vault_for_a_factory_and_its_clones() {
        let az = Azure::new(Arc::new(NoCredential), None, true).unwrap();
        let a = az.gate("https://a.vault.azure.net/");
        assert!(Arc::ptr_eq(
            &a,
            &az.clone().gate("https://A.vault.azure.net")
        ));
        assert!(!Arc::ptr_eq(&a, &az.gate("https://b.vault.azure.net/")));
    }

    fn e(status: Option<u16>, detail: &str) -> AzureError {
        AzureError {
            what: "t".into(),
            status,
            code: None,
            detail: detail.into(),
        }
    }

    #[test]
    fn retryable_and_final_statuses() {
        for s in [401, 403, 408, 429, 500, 502, 503, 504] {
            assert!(e(Some(s), "").retryable(), "{s} is retried");
        }
        for s in [400, 404, 409, 412] {
            assert!(!e(Some(s), "").retryable(), "{s} is final");
        }
        assert!(e(None, "cannot connect").retryable());
        assert!(!e(None, "credential: no token").retryable());
    }

    #[tokio::test]
    async fn strict_calls_stop_at_403_and_lenient_ones_retry_it() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let policy = RetryPolicy {
            deadline: Duration::from_millis(300),
            attempt_timeout: Duration::from_millis(100),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(10),
        };
        let forbidden = || {
            azure_core::Error::new(
                ErrorKind::HttpResponse {
                    status: azure_core::http::StatusCode::Forbidden,
                    error_code: None,
                    raw_response: None,
                },
                "forbidden",
            )
        };
        let n = AtomicU32::new(0);
        let r: Result<(), _> = call_strict(policy, "x", || {
            n.fetch_add(1, Ordering::SeqCst);
            async { Err(forbidden()) }
        })
        .await;
        assert!(r.unwrap_err().is(403));
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let n = AtomicU32::new(0);
        let r: Result<(), _> = call(policy, "x", || {
            n.fetch_add(1, Ordering::SeqCst);
            async { Err(forbidden()) }
        })
        .await;
        let err = r.unwrap_err();
        assert!(err.is(403) && err.detail.contains("gave up"), "{err}");
        assert!(n.load(Ordering::SeqCst) > 1);
    }
}
