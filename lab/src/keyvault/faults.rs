//! Fault injection, what the double adds for tests: a [`Fault`] per operation (an error status, a delay, a
//! connection reset), for the next N matching requests or until cleared. Faults apply to authenticated
//! requests only, before the RBAC check; [`take_faults`] consumes them and [`injected`] shapes the error answer.
//!
//! And the service limit, as Azure documents it ([`Throttle`], off by default): a vault admits at most
//! `limit` transactions in any `window` and answers the others 429 `Throttled` with `Retry-After`.

use super::rbac::Op;
use super::routes::KvErr;
use super::VaultState;
use hyper::StatusCode;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this status and a KeyVaultError body (429 adds `Retry-After: 1`, 401 a challenge).
    Status(u16),
    /// Wait this long, then go on (a later matching Status/Reset fault still applies).
    Delay(Duration),
    /// Close the connection without an answer.
    Reset,
}

/// A programmed misbehaviour. Faults apply to authenticated requests only (the SDK's unauthenticated
/// challenge round trip never consumes one), before the RBAC check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `None`: every operation.
    pub op: Option<Op>,
    pub action: FaultAction,
    /// Requests left to hit; `None`: until [`Vault::clear_faults`].
    pub remaining: Option<u32>,
}

impl Fault {
    pub fn status(op: impl Into<Option<Op>>, status: u16) -> Self {
        Fault {
            op: op.into(),
            action: FaultAction::Status(status),
            remaining: None,
        }
    }
    pub fn delay(op: impl Into<Option<Op>>, delay: Duration) -> Self {
        Fault {
            op: op.into(),
            action: FaultAction::Delay(delay),
            remaining: None,
        }
    }
    pub fn reset(op: impl Into<Option<Op>>) -> Self {
        Fault {
            op: op.into(),
            action: FaultAction::Reset,
            remaining: None,
        }
    }
    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
}

/// Takes the faults that match `op`: total delay, then the first Status/Reset (consuming counts).
pub(super) fn take_faults(st: &mut VaultState, op: Op) -> (Duration, Option<FaultAction>) {
    let mut delay = Duration::ZERO;
    let mut terminal = None;
    for f in st.faults.iter_mut() {
        if f.op.is_some_and(|o| o != op) || f.remaining == Some(0) {
            continue;
        }
        match &f.action {
            FaultAction::Delay(d) => delay += *d,
            a if terminal.is_none() => terminal = Some(a.clone()),
            _ => continue,
        }
        if let Some(n) = f.remaining.as_mut() {
            *n -= 1;
        }
    }
    st.faults.retain(|f| f.remaining != Some(0));
    (delay, terminal)
}

/// Key Vault's transaction limit, per vault. Azure documents it in "Azure Key Vault service limits"
/// (<https://learn.microsoft.com/en-us/azure/key-vault/general/service-limits>: secrets, managed storage account
/// keys and vault transactions, and software RSA 2,048-bit keys, "maximum transactions allowed in 10 seconds, per
/// vault per region": 4,000) and its answer beyond it in "Azure Key Vault throttling guidance"
/// (<https://learn.microsoft.com/en-us/azure/key-vault/general/overview-throttling>: HTTP 429 "Too many
/// requests"; "Failed requests that return a 429 do not count towards the throttle limits"), with the
/// `Retry-After` the throttling guidance tells clients to honour.
///
/// How the double counts (Azure does not document its algorithm): every **authenticated** request the vault
/// admits is one transaction, whatever the operation (the per-key-type weights of the limits table are not
/// modelled: the lab's keys serve a handful of wraps); the SDK's unauthenticated challenge round trip and the
/// 429s themselves are not counted. The window **slides**: a request is admitted when fewer than `limit`
/// transactions were admitted in the `window` before it, so no `window`-long span ever holds more than `limit`
/// — the documented limit read strictly (a fixed window would let up to twice the limit through around its
/// boundary). The 429's `Retry-After` is the whole seconds until the oldest admitted transaction leaves the
/// window (at least 1), i.e. when a slot frees up; one lab process serves several vaults and each counts alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub limit: u32,
    pub window: Duration,
}

impl Throttle {
    /// Azure's published limit for secrets: 4,000 transactions per 10 seconds per vault.
    pub const AZURE: Throttle = Throttle {
        limit: 4000,
        window: Duration::from_secs(10),
    };
}

/// A vault's throttle: its limit (`None`: off, the default) and the admission times inside the window.
#[derive(Debug, Default)]
pub(super) struct Throttling {
    pub(super) limit: Option<Throttle>,
    admitted: VecDeque<Instant>,
}

impl Throttling {
    pub(super) fn set(&mut self, limit: Option<Throttle>) {
        self.limit = limit;
        self.admitted.clear();
    }

    /// Admits a transaction at `now` (`Ok`), or says how many whole seconds to wait (`Err`, for `Retry-After`).
    pub(super) fn admit(&mut self, now: Instant) -> Result<(), u64> {
        let Some(t) = self.limit else {
            return Ok(());
        };
        while self
            .admitted
            .front()
            .is_some_and(|a| now.saturating_duration_since(*a) >= t.window)
        {
            self.admitted.pop_front();
        }
        if (self.admitted.len() as u64) < u64::from(t.limit) {
            self.admitted.push_back(now);
            return Ok(());
        }
        let oldest = *self.admitted.front().expect("limit reached, so not empty");
        let free_in = (oldest + t.window).saturating_duration_since(now);
        Err(free_in.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// The 429 of a throttled request, with its `Retry-After` in seconds.
pub(super) fn throttled(retry_after: u64) -> KvErr {
    KvErr {
        retry_after: Some(retry_after),
        ..KvErr::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttled",
            "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
        )
    }
}

pub(super) fn injected(status: u16) -> KvErr {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let msg = "Injected by the Key Vault double (fault injection).";
    match status.as_u16() {
        401 => KvErr::unauthorized(msg),
        403 => KvErr {
            inner: Some("ForbiddenByRbac"),
            ..KvErr::new(status, "Forbidden", msg)
        },
        429 => KvErr::new(status, "Throttled", msg),
        500 => KvErr::new(status, "InternalServerError", msg),
        503 => KvErr::new(status, "ServiceUnavailable", msg),
        400 => KvErr::bad(msg),
        404 => KvErr::new(status, "NotFound", msg),
        _ => KvErr::new(status, "Injected", msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_count_down_and_combine() {
        let mut st = VaultState::default();
        st.faults
            .push(Fault::delay(None, Duration::from_millis(5)).times(1));
        st.faults.push(Fault::status(Op::GetSecret, 503).times(2));
        let (d, t) = take_faults(&mut st, Op::SetSecret);
        assert_eq!((d, t), (Duration::from_millis(5), None));
        let (d, t) = take_faults(&mut st, Op::GetSecret);
        assert_eq!((d, t), (Duration::ZERO, Some(FaultAction::Status(503))));
        let (_, t) = take_faults(&mut st, Op::GetSecret);
        assert_eq!(t, Some(FaultAction::Status(503)));
        let (_, t) = take_faults(&mut st, Op::GetSecret);
        assert_eq!(t, None);
        assert!(st.faults.is_empty());
    }

    fn limit(n: u32) -> Throttling {
        let mut t = Throttling::default();
        t.set(Some(Throttle {
            limit: n,
            window: Duration::from_secs(10),
        }));
        t
    }

    #[test]
    fn off_by_default_admits_everything() {
        let mut t = Throttling::default();
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(t.admit(now), Ok(()));
        }
    }

    #[test]
    fn under_the_limit_no_429() {
        let mut t = limit(5);
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(t.admit(t0 + Duration::from_secs(i)), Ok(()), "request {i}");
        }
    }

    #[test]
    fn over_the_limit_429_with_retry_after_until_a_slot_frees() {
        let mut t = limit(3);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(t.admit(t0 + Duration::from_secs(i)), Ok(()));
        }
        // The oldest admission (t0) leaves the window at t0 + 10 s: 7.5 s after t0 + 2.5 s, rounded up to 8.
        assert_eq!(t.admit(t0 + Duration::from_millis(2500)), Err(8));
        // A 429 does not count: still three admissions in the window, and the same answer later on.
        assert_eq!(t.admit(t0 + Duration::from_millis(9500)), Err(1));
        // Served again once the window has slid past the oldest admission, and only for one more.
        assert_eq!(t.admit(t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!(t.admit(t0 + Duration::from_millis(10_100)), Err(1));
        // After a whole window without requests, the full limit again.
        let later = t0 + Duration::from_secs(30);
        for _ in 0..3 {
            assert_eq!(t.admit(later), Ok(()));
        }
        assert_eq!(t.admit(later), Err(10));
    }

    #[test]
    fn a_sliding_window_never_holds_more_than_the_limit() {
        // Requests every 100 ms for 60 s against 20 per 10 s: every 10 s span admits at most 20, and the vault
        // keeps admitting (2 per second on average) instead of stopping after a burst.
        let mut t = limit(20);
        let t0 = Instant::now();
        let admitted: Vec<Duration> = (0..600)
            .map(|i| Duration::from_millis(100 * i))
            .filter(|d| t.admit(t0 + *d).is_ok())
            .collect();
        for (i, a) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|b| **b < *a + Duration::from_secs(10))
                .count();
            assert!(
                in_window <= 20,
                "{in_window} admitted in the 10 s from {a:?}"
            );
        }
        assert_eq!(admitted.len(), 120);
    }
}
