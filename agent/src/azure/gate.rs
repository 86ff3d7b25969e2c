//! The throttle gate of one vault, and the transport that closes it the moment a 429 comes back.
//!
//! Azure's throttling guidance: after a 429, wait its `Retry-After` before any further request to that vault, not
//! only the request that was answered. The gate holds every gated call of the process to the vault for that long,
//! then lets them through one at a time until one request sent after the last 429 is answered without one.
//!
//! The transport ([`GatedClient`]) marks the gate as soon as a 429's status line is read, before its body: until the
//! body is read the connection cannot go back to the HTTP client's pool, so no other request of this process can be
//! sent on it after the 429. And a read let through the gate earlier but still unanswered is withdrawn at that
//! moment ([`Gate::throttled_since`]): it may be waiting inside the HTTP client for a connection, the 429's own among
//! them, and would otherwise go out inside the hold. Withdrawing one already on the wire costs one more read later,
//! never a wrong answer (reads only; a write is never withdrawn: it may have landed).

use super::{jittered, retry_after_in, AzureError};
use azure_core::http::{AsyncRawResponse, HttpClient, Request, StatusCode, Url};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One vault's throttle gate, shared by every gated call of this process to that vault ([`Gates::gate`]).
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
    single: tokio::sync::Semaphore,
    /// Wakes the requests let through before a 429 ([`Gate::throttled_since`]).
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct GateState {
    /// Nothing is sent before this.
    until: Option<Instant>,
    /// The 429 that set the hold (a held call that runs out of deadline ends with it).
    cause: Option<AzureError>,
    /// One request at a time.
    single: bool,
    /// Counts 429s: an answer reopens the gate only if its request was sent after the last one.
    generation: u64,
    /// The latest 429s: their generation and the attempt they answered (0: not known).
    recent: Vec<(u64, u64)>,
}

/// How many of the latest 429s a gate remembers for [`Gate::throttled_since`] (one per concurrent request is ample).
const RECENT: usize = 32;

/// A request let through the gate: the generation it was sent in, and its turn while one at a time.
pub struct Entered<'a> {
    pub(super) generation: u64,
    _turn: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            state: Default::default(),
            single: tokio::sync::Semaphore::new(1),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is left of the hold, with the 429 that set it; `None`: not held.
    pub fn hold(&self) -> Option<(Duration, AzureError)> {
        let st = self.lock();
        let left = st.until?.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then(|| (left, st.cause.clone().expect("set with the hold")))
    }

    /// Whether requests go one at a time.
    pub fn single(&self) -> bool {
        self.lock().single
    }

    /// Lets a request through, or says how long the hold still lasts. One at a time: waits for its turn.
    pub(super) async fn enter(&self) -> Result<Entered<'_>, (Duration, AzureError)> {
        if let Some(h) = self.hold() {
            return Err(h);
        }
        let turn = if self.single() {
            let t = self
                .single
                .acquire()
                .await
                .expect("the gate's semaphore is never closed");
            // Another request may have been throttled while this one waited for its turn.
            if let Some(h) = self.hold() {
                return Err(h);
            }
            Some(t)
        } else {
            None
        };
        Ok(Entered {
            generation: self.lock().generation,
            _turn: turn,
        })
    }

    /// A 429 to the request `attempt` (0: not known), sent in `sent_in` (`None`: not known): holds the vault for
    /// `after` (if it said) from now, and goes one at a time. Counted once: a 429 the transport already counted
    /// (the generation moved since `sent_in`) only extends the hold.
    pub(super) fn throttled(
        &self,
        sent_in: Option<u64>,
        attempt: u64,
        after: Option<Duration>,
        cause: &AzureError,
    ) {
        let mut st = self.lock();
        if sent_in.is_none_or(|g| g == st.generation) {
            st.generation += 1;
            let g = st.generation;
            st.recent.push((g, attempt));
            if st.recent.len() > RECENT {
                st.recent.remove(0);
            }
        }
        st.single = true;
        if let Some(after) = after {
            let until = Instant::now() + after;
            if st.until.is_none_or(|u| u < until) {
                st.until = Some(until);
                st.cause = Some(cause.clone());
            }
        }
        if st.cause.is_none() {
            st.cause = Some(cause.clone());
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// An answer other than a 429: full concurrency again, if the request was sent after the last 429.
    pub(super) fn answered(&self, entered: &Entered<'_>) {
        let mut st = self.lock();
        if st.generation == entered.generation {
            st.single = false;
        }
    }

    /// Ends when a 429 to another request than `attempt` comes back after generation `since`, with that 429.
    pub(super) async fn throttled_since(&self, since: u64, attempt: u64) -> AzureError {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let st = self.lock();
                if st.recent.iter().any(|&(g, a)| g > since && a != attempt) {
                    return st.cause.clone().expect("set by every 429");
                }
            }
            changed.await;
        }
    }
}

tokio::task_local! {
    /// The gated attempt the current task is sending (so its own 429 does not withdraw it).
    pub(super) static ATTEMPT: u64;
}

/// A new attempt number (never 0).
pub(super) fn next_attempt() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The gates of one factory and its clones, one per vault origin.
#[derive(Debug, Clone, Default)]
pub struct Gates(Arc<Mutex<HashMap<String, Arc<Gate>>>>);

/// A vault URI or request URL as its gate's key: its origin (`https://name.vault.azure.net`).
pub(super) fn key(uri: &str) -> String {
    match Url::parse(uri) {
        Ok(u) => u.origin().ascii_serialization(),
        Err(_) => uri.trim_end_matches('/').to_ascii_lowercase(),
    }
}

impl Gates {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Gate>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gate of the vault at `vault_uri`, made on first use.
    pub fn gate(&self, vault_uri: &str) -> Arc<Gate> {
        self.lock().entry(key(vault_uri)).or_default().clone()
    }

    /// The gate of `url`'s origin, if a gated call has made one.
    fn existing(&self, url: &Url) -> Option<Arc<Gate>> {
        self.lock()
            .get(&url.origin().ascii_serialization())
            .cloned()
    }
}

/// The factory's HTTP client: sends through `inner`, and marks a vault's gate throttled as soon as a 429's status
/// line and headers are read (see the module's documentation).
#[derive(Debug)]
pub struct GatedClient {
    pub inner: Arc<dyn HttpClient>,
    pub gates: Gates,
}

#[async_trait::async_trait]
impl HttpClient for GatedClient {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let rsp = self.inner.execute_request(request).await?;
        if rsp.status() == StatusCode::TooManyRequests {
            if let Some(gate) = self.gates.existing(request.url()) {
                let cause = AzureError {
                    what: "key vault".into(),
                    status: Some(429),
                    code: None,
                    detail: "HTTP 429".into(),
                };
                let after = retry_after_in(rsp.headers()).map(jittered);
                let attempt = ATTEMPT.try_with(|a| *a).unwrap_or(0);
                gate.throttled(None, attempt, after, &cause);
            }
        }
        Ok(rsp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::headers::Headers;
    use azure_core::http::Method;
    use futures_util::StreamExt;

    /// Answers 429 with `Retry-After: 1` and a body that never arrives, as a slow body on the wire.
    #[derive(Debug)]
    struct Throttling;
    #[async_trait::async_trait]
    impl HttpClient for Throttling {
        async fn execute_request(&self, _: &Request) -> azure_core::Result<AsyncRawResponse> {
            let mut h = Headers::new();
            h.insert("retry-after", "1");
            Ok(AsyncRawResponse::new(
                StatusCode::TooManyRequests,
                h,
                Box::pin(futures_util::stream::pending()),
            ))
        }
    }

    /// The gate is closed when the 429's headers are read, before a byte of its body: its connection cannot have
    /// gone back to the pool yet. Requests to other origins, and origins without a gate, are left alone.
    #[tokio::test]
    async fn a_429_closes_its_vaults_gate_before_its_body_is_read() {
        let gates = Gates::default();
        let gate = gates.gate("https://v.vault.azure.net/");
        let other = gates.gate("https://w.vault.azure.net/");
        let client = GatedClient {
            inner: Arc::new(Throttling),
            gates: gates.clone(),
        };
        let url = |s: &str| Url::parse(s).unwrap();
        let rsp = client
            .execute_request(&Request::new(
                url("https://v.vault.azure.net/secrets/x"),
                Method::Get,
            ))
            .await
            .unwrap();
        let (left, cause) = gate.hold().expect("held at the headers");
        assert!(
            left > Duration::from_millis(900) && left <= Duration::from_millis(1250),
            "{left:?}"
        );
        assert!(cause.is(429));
        assert!(gate.single());
        assert!(other.hold().is_none() && !other.single());
        // The body has not been read (it never comes).
        let mut body = rsp.into_body();
        assert!(tokio::time::timeout(Duration::from_millis(20), body.next())
            .await
            .is_err());
        client
            .execute_request(&Request::new(
                url("https://elsewhere.blob.core.windows.net/c/b"),
                Method::Get,
            ))
            .await
            .unwrap();
        assert!(
            gates.lock().len() == 2,
            "no gate made for an origin nobody gates"
        );
    }

    /// Keys are origins: the vault URI as configured and the URL of a request to it find the same gate.
    #[test]
    fn a_vault_uri_and_its_request_urls_share_one_gate() {
        let gates = Gates::default();
        let a = gates.gate("https://A.vault.azure.net/");
        let u = Url::parse("https://a.vault.azure.net:443/secrets/x?api-version=7.6").unwrap();
        assert!(Arc::ptr_eq(&a, &gates.existing(&u).unwrap()));
        let lab = gates.gate("https://127.0.0.1:8445/");
        let u = Url::parse("https://127.0.0.1:8445/secrets/x").unwrap();
        assert!(Arc::ptr_eq(&lab, &gates.existing(&u).unwrap()));
        assert!(gates
            .existing(&Url::parse("https://127.0.0.1:8446/").unwrap())
            .is_none());
    }

    /// A 429 wakes the requests let through before it, except the one it answered; one counted by the transport
    /// and again by its call is one 429.
    #[tokio::test]
    async fn a_429_withdraws_the_others_let_through_before_it_and_not_its_own() {
        let gate = Gate::default();
        let cause = AzureError {
            what: "t".into(),
            status: Some(429),
            code: None,
            detail: "HTTP 429".into(),
        };
        let e = gate.enter().await.unwrap();
        assert_eq!(e.generation, 0);
        gate.throttled(None, 7, None, &cause);
        // Counted again by the call that sent it (sent in 0, the generation has moved): still one.
        gate.throttled(Some(0), 7, None, &cause);
        assert_eq!(gate.lock().generation, 1);
        // Attempt 7's own 429 does not withdraw it ...
        let own = tokio::time::timeout(Duration::from_millis(50), gate.throttled_since(0, 7)).await;
        assert!(own.is_err());
        // ... and withdraws attempt 8, sent in the same generation.
        let other =
            tokio::time::timeout(Duration::from_millis(50), gate.throttled_since(0, 8)).await;
        assert!(other.unwrap().is(429));
        // A waiter is woken by a later 429.
        let g = &gate;
        let (woken, ()) = tokio::join!(g.throttled_since(1, 9), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            g.throttled(None, 0, None, &cause);
        });
        assert!(woken.is(429));
    }
}
