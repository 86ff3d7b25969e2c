//! One retry loop for every external call: a total deadline, a per-attempt timeout, capped exponential
//! backoff, and an explicit verdict per attempt (done, retry, or fail at once).

use std::future::Future;
use std::time::Duration;

/// How long and how often to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up after this long in total (attempts and sleeps included).
    pub deadline: Duration,
    /// Upper bound for one attempt; an attempt that takes longer counts as a retryable timeout.
    pub attempt_timeout: Duration,
    /// First sleep between attempts; doubled after each retry up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The policy for IMDS: Azure documents that IMDS may answer 404/410/429/5xx while a VM starts.
    pub fn imds(deadline: Duration) -> Self {
        RetryPolicy {
            deadline,
            attempt_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What one attempt concluded.
#[derive(Debug)]
pub enum Attempt<T, E> {
    Done(T),
    /// A transient condition: try again while the deadline allows.
    Retry(E),
    /// A transient condition, and the next attempt should wait at least this long (a `Retry-After` answer, or
    /// a look that is costly to repeat); otherwise as `Retry`.
    RetryAfter(E, Duration),
    /// A final answer: retrying cannot help.
    Fail(E),
}

impl<T, E> Attempt<T, E> {
    /// The same verdict with its error mapped.
    pub fn map_err<F>(self, f: impl FnOnce(E) -> F) -> Attempt<T, F> {
        match self {
            Attempt::Done(v) => Attempt::Done(v),
            Attempt::Retry(e) => Attempt::Retry(f(e)),
            Attempt::RetryAfter(e, after) => Attempt::RetryAfter(f(e), after),
            Attempt::Fail(e) => Attempt::Fail(f(e)),
        }
    }
}

/// Why the loop stopped without a result.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E: std::fmt::Display> {
    #[error("{0}")]
    Final(E),
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    Deadline {
        attempts: u32,
        elapsed: Duration,
        last: E,
    },
}

impl<E: std::fmt::Display> RetryError<E> {
    pub fn last(&self) -> &E {
        match self {
            RetryError::Final(e) => e,
            RetryError::Deadline { last, .. } => last,
        }
    }
}

/// The reason a poll is not done yet (plain text, never a secret), for waits whose "not yet" is not an error
/// type of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotYet(pub String);

impl std::fmt::Display for NotYet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TimeoutError for NotYet {
    fn timeout(after: Duration) -> Self {
        NotYet(format!("no answer within {after:?}"))
    }
}

impl RetryPolicy {
    /// A poll: look every `every` until `deadline` (no backoff growth), each look bounded by `attempt`.
    pub fn poll(deadline: Duration, every: Duration, attempt: Duration) -> Self {
        RetryPolicy {
            deadline,
            attempt_timeout: attempt,
            initial_backoff: every,
            max_backoff: every,
        }
    }

    /// A poll whose looks are never cut short: each look bounds itself (e.g. it writes under a lease and must
    /// not stop half-way). The deadline is checked between looks; the first look always runs.
    pub fn poll_whole(deadline: Duration, every: Duration) -> Self {
        RetryPolicy {
            deadline,
            attempt_timeout: WHOLE,
            initial_backoff: every,
            max_backoff: every,
        }
    }
}

/// `attempt_timeout` of a policy whose attempts are never cut short ([`RetryPolicy::poll_whole`]).
const WHOLE: Duration = Duration::MAX;

/// Marker for an attempt that exceeded `attempt_timeout`.
pub trait TimeoutError {
    fn timeout(after: Duration) -> Self;
}

/// An attempt gets at least this long; with less left before the deadline the loop stops.
const MIN_ATTEMPT: Duration = Duration::from_millis(5);

/// The bookkeeping [`retry`] and [`retry_blocking`] share: attempts, backoff, and the verdict on each outcome.
struct Schedule {
    policy: RetryPolicy,
    start: std::time::Instant,
    backoff: Duration,
    attempts: u32,
}

impl Schedule {
    fn new(policy: RetryPolicy) -> Self {
        Schedule {
            policy,
            start: std::time::Instant::now(),
            backoff: policy.initial_backoff,
            attempts: 0,
        }
    }

    fn remaining(&self) -> Duration {
        self.policy.deadline.saturating_sub(self.start.elapsed())
    }

    /// Starts an attempt: its number and how long it may take.
    fn next(&mut self) -> (u32, Duration) {
        self.attempts += 1;
        (
            self.attempts,
            self.policy.attempt_timeout.min(self.remaining()),
        )
    }

    /// What an attempt's outcome means: `Err` ends the loop with it (the value, a final error, or the
    /// deadline); `Ok` is the wait before the next attempt, with the error kept in case none follows.
    #[allow(clippy::type_complexity)]
    fn judge<T, E: std::fmt::Display>(
        &mut self,
        outcome: Attempt<T, E>,
    ) -> Result<(Duration, E), Result<T, RetryError<E>>> {
        let (e, wait) = match outcome {
            Attempt::Done(v) => return Err(Ok(v)),
            Attempt::Fail(e) => return Err(Err(RetryError::Final(e))),
            Attempt::Retry(e) => (e, self.backoff),
            Attempt::RetryAfter(e, after) => (e, self.backoff.max(after)),
        };
        if self.start.elapsed() + wait >= self.policy.deadline {
            return Err(Err(self.deadline(e)));
        }
        tracing::debug!(attempt = self.attempts, error = %e, wait_ms = wait.as_millis() as u64, "retrying");
        self.backoff = (self.backoff * 2).min(self.policy.max_backoff);
        Ok((wait, e))
    }

    /// After the wait: with too little time left for a real attempt, the loop ends with the error it has
    /// (not a zero-length timeout).
    fn resume<E: std::fmt::Display>(&self, e: E) -> Result<(), RetryError<E>> {
        if self.remaining() < MIN_ATTEMPT {
            Err(self.deadline(e))
        } else {
            Ok(())
        }
    }

    fn deadline<E: std::fmt::Display>(&self, last: E) -> RetryError<E> {
        RetryError::Deadline {
            attempts: self.attempts,
            elapsed: self.start.elapsed(),
            last,
        }
    }
}

/// Runs `op` until it is done, fails finally, or the deadline passes.
pub async fn retry<T, E, F, Fut>(policy: RetryPolicy, mut op: F) -> Result<T, RetryError<E>>
where
    E: std::fmt::Display + TimeoutError,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt<T, E>>,
{
    let mut s = Schedule::new(policy);
    loop {
        let (attempt, budget) = s.next();
        let outcome = if policy.attempt_timeout == WHOLE {
            op(attempt).await
        } else {
            match tokio::time::timeout(budget, op(attempt)).await {
                Ok(o) => o,
                Err(_) => Attempt::Retry(E::timeout(budget)),
            }
        };
        let (wait, e) = match s.judge(outcome) {
            Ok(w) => w,
            Err(end) => return end,
        };
        tokio::time::sleep(wait).await;
        s.resume(e)?;
    }
}

/// [`retry`] for blocking code (a child process, a file that is busy for milliseconds): the same verdicts
/// and deadline, no per-attempt timeout (a blocking attempt cannot be cut; each bounds itself).
pub fn retry_blocking<T, E, F>(policy: RetryPolicy, mut op: F) -> Result<T, RetryError<E>>
where
    E: std::fmt::Display,
    F: FnMut(u32) -> Attempt<T, E>,
{
    let mut s = Schedule::new(policy);
    loop {
        let (attempt, _) = s.next();
        let (wait, e) = match s.judge(op(attempt)) {
            Ok(w) => w,
            Err(end) => return end,
        };
        std::thread::sleep(wait);
        s.resume(e)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_poll_looks_at_a_constant_interval_until_done_or_the_deadline() {
        let p = RetryPolicy::poll(
            Duration::from_millis(300),
            Duration::from_millis(20),
            Duration::from_millis(50),
        );
        assert_eq!(p.initial_backoff, p.max_backoff);
        let looks = AtomicU32::new(0);
        let done = retry(p, |_| async {
            if looks.fetch_add(1, Ordering::SeqCst) < 2 {
                Attempt::Retry(NotYet("sealed".into()))
            } else {
                Attempt::Done(7)
            }
        })
        .await;
        assert_eq!(done.unwrap(), 7);
        assert_eq!(looks.load(Ordering::SeqCst), 3);
        let never = retry(p, |_| async {
            Attempt::<(), _>::Retry(NotYet("sealed".into()))
        })
        .await;
        match never {
            Err(RetryError::Deadline { attempts, last, .. }) => {
                assert_eq!(last, NotYet("sealed".into()));
                // ~300 ms at one look per ~20 ms: many looks, not a doubling backoff's handful.
                assert!(attempts >= 8, "{attempts}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_whole_poll_never_cuts_a_look_and_stops_between_looks() {
        let p = RetryPolicy::poll_whole(Duration::from_millis(100), Duration::from_millis(10));
        let looks = AtomicU32::new(0);
        // A look longer than the whole deadline still finishes (with a bounded poll it would be cut).
        let r = retry(p, |_| async {
            looks.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(250)).await;
            Attempt::<i32, NotYet>::Done(1)
        })
        .await;
        assert_eq!(r.unwrap(), 1);
        // A look that finishes late and says "not yet" is the last one.
        looks.store(0, Ordering::SeqCst);
        let r: Result<(), _> = retry(p, |_| async {
            looks.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(150)).await;
            Attempt::Retry(NotYet("creating elsewhere".into()))
        })
        .await;
        assert!(
            matches!(r, Err(RetryError::Deadline { attempts: 1, .. })),
            "{r:?}"
        );
        assert_eq!(looks.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retry_after_waits_at_least_as_long_as_asked() {
        let p = RetryPolicy::poll(
            Duration::from_secs(5),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        let start = std::time::Instant::now();
        let looks = AtomicU32::new(0);
        let r = retry(p, |_| async {
            if looks.fetch_add(1, Ordering::SeqCst) == 0 {
                Attempt::RetryAfter(NotYet("429".into()), Duration::from_millis(300))
            } else {
                Attempt::Done(())
            }
        })
        .await;
        assert!(r.is_ok());
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        // A wait that would pass the deadline ends the loop at once, with the last answer.
        let start = std::time::Instant::now();
        let r: Result<(), _> = retry(p, |_| async {
            Attempt::RetryAfter(NotYet("429".into()), Duration::from_secs(60))
        })
        .await;
        assert!(
            matches!(r, Err(RetryError::Deadline { attempts: 1, .. })),
            "{r:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_blocking_retry_has_the_same_verdicts() {
        let p = RetryPolicy::poll(
            Duration::from_millis(200),
            Duration::from_millis(5),
            Duration::from_millis(5),
        );
        let mut n = 0;
        let r = retry_blocking(p, |_| {
            n += 1;
            if n < 3 {
                Attempt::Retry(E("busy"))
            } else {
                Attempt::Done(n)
            }
        });
        assert_eq!(r.unwrap(), 3);
        let r: Result<(), _> = retry_blocking(p, |_| Attempt::Fail(E("no such file")));
        assert!(matches!(r, Err(RetryError::Final(E("no such file")))));
        let r: Result<(), _> = retry_blocking(p, |_| Attempt::Retry(E("busy")));
        match r {
            Err(RetryError::Deadline { attempts, last, .. }) => {
                assert!(attempts > 5, "{attempts}");
                assert_eq!(last, E("busy"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[derive(Debug, PartialEq)]
    struct E(&'static str);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl TimeoutError for E {
        fn timeout(_: Duration) -> Self {
            E("timeout")
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::from_millis(400),
            attempt_timeout: Duration::from_millis(100),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn retries_until_done() {
        let n = AtomicU32::new(0);
        let r = retry(quick(), |_| async {
            if n.fetch_add(1, Ordering::SeqCst) < 3 {
                Attempt::Retry(E("busy"))
            } else {
                Attempt::Done(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn final_error_stops_at_once() {
        let n = AtomicU32::new(0);
        let r: Result<(), _> = retry(quick(), |_| async {
            n.fetch_add(1, Ordering::SeqCst);
            Attempt::Fail(E("bad request"))
        })
        .await;
        assert!(matches!(r, Err(RetryError::Final(E("bad request")))));
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn deadline_bounds_the_loop_and_keeps_last_error() {
        let start = std::time::Instant::now();
        let r: Result<(), _> = retry(quick(), |_| async { Attempt::Retry(E("503")) }).await;
        match r {
            Err(RetryError::Deadline { attempts, last, .. }) => {
                assert!(attempts > 3);
                assert_eq!(last, E("503"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn slow_attempt_is_a_retryable_timeout() {
        let n = AtomicU32::new(0);
        let r = retry(quick(), |_| async {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Attempt::<u8, E>::Done(1)
        })
        .await;
        assert_eq!(r.unwrap(), 1);
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
