//! Fault injection, what the double adds for tests: a [`Fault`] per operation (an error status, a delay, a
//! connection reset), for the next N matching requests or until cleared. Faults apply to authenticated
//! requests only, before the RBAC check; [`take_faults`] consumes them and [`injected`] shapes the error answer.

use super::rbac::Op;
use super::routes::KvErr;
use super::VaultState;
use hyper::StatusCode;
use std::time::Duration;

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
}
