use super::*;

fn seen(at: f64, status: u16, who: &str, retry_after: Option<u64>) -> Seen {
    Seen {
        at,
        answered: at,
        // Sent a millisecond before it arrived, on a connection of its own (unless set).
        sent_after: at - 0.001,
        connection: (at * 1e6) as u64 + 1000,
        status,
        principal: Some(who.into()),
        retry_after,
    }
}

/// `s` on connection `c`, sent after `sent_after`.
fn on(c: u64, sent_after: f64, s: Seen) -> Seen {
    Seen {
        connection: c,
        sent_after,
        ..s
    }
}

#[test]
fn an_early_retry_is_counted_and_a_patient_one_is_not() {
    let log = vec![
        on(1, 0.0, seen(0.0, 429, "a", Some(2))),
        on(1, 0.0, seen(2.1, 200, "a", None)),
        on(2, 0.4, seen(0.5, 429, "b", Some(3))),
        on(2, 0.5, seen(1.0, 429, "b", Some(3))),
        on(2, 1.0, seen(4.5, 200, "b", None)),
        seen(0.2, 200, "c", None),
    ];
    let d = retry_discipline(&log);
    let a = d["a"];
    assert_eq!((a.0, a.1, a.2), (2, 1, 0));
    assert!((a.3.unwrap() - 0.1).abs() < 1e-9);
    // b came back 0.5 s after a 429 that asked for 3 s: early (margin -2.5), then waited 3.5 s.
    let b = d["b"];
    assert_eq!((b.0, b.1, b.2), (3, 2, 1));
    assert!((b.3.unwrap() + 2.5).abs() < 1e-9);
    assert_eq!(d["c"], (1, 0, 0, None));
}

/// A 429 answered at `answered` (it arrived 10 ms before) on connection 1.
fn throttled_at(answered: f64, who: &str, retry_after: u64) -> Seen {
    Seen {
        at: answered - 0.01,
        answered,
        sent_after: answered - 0.02,
        connection: 1,
        status: 429,
        principal: Some(who.into()),
        retry_after: Some(retry_after),
    }
}

/// A request the client sent before it read the 429 cannot have honoured it: not early — on the wire at the
/// answer, or sent on another connection before the client had read it, however late the double read it.
#[test]
fn a_request_sent_before_the_429_was_read_is_not_early() {
    let log = vec![
        throttled_at(1.0, "a", 1),
        // Arrived while the 429 was being answered.
        on(2, 0.9, seen(0.995, 200, "a", None)),
        // Arrived after the 429's answer, on a connection whose last answer came before it.
        on(3, 0.9, seen(1.02, 200, "a", None)),
        // Sent after the 429's answer was written, but before the client had provably read it (the 429's
        // connection is next used at 2.05).
        on(4, 1.01, seen(1.03, 200, "a", None)),
        // Patient: on the 429's connection, 1.05 s after its answer.
        on(1, 1.0, seen(2.05, 200, "a", None)),
    ];
    let d = retry_discipline(&log);
    let a = d["a"];
    assert_eq!((a.0, a.1, a.2), (5, 1, 0));
    assert!((a.3.unwrap() - 0.05).abs() < 1e-9, "{:?}", a.3);
}

/// An agent that ignores Retry-After is still counted early: its retry on the 429's connection, and its other
/// reads sent after that (the old pairwise check compared each request with the one just before it only).
#[test]
fn an_agent_that_ignores_retry_after_is_counted_early() {
    let log = vec![
        throttled_at(1.0, "x", 2),
        // On the wire: not early.
        on(2, 0.9, seen(0.999, 200, "x", None)),
        // Retried at once on the 429's connection: the client had read the 429.
        on(1, 1.0, seen(1.2, 200, "x", None)),
        // Its other reads, sent after that.
        Seen {
            sent_after: 1.3,
            connection: 3,
            ..throttled_at(1.5, "x", 2)
        },
        on(4, 1.55, seen(1.6, 200, "x", None)),
        // After both holds.
        on(1, 1.2, seen(3.6, 200, "x", None)),
    ];
    let d = retry_discipline(&log);
    let x = d["x"];
    assert_eq!(
        (x.0, x.1, x.2),
        (6, 2, 3),
        "1.2, 1.49 (the second 429's request) and 1.6"
    );
    assert!((x.3.unwrap() - (0.2 - 2.0)).abs() < 1e-9, "{:?}", x.3);
}

#[test]
fn rates_count_peaks_and_the_busiest_window() {
    let mut log: Vec<Seen> = (0..30)
        .map(|i| seen(f64::from(i) * 0.125, 200, "a", None))
        .collect();
    log.push(seen(0.05, 429, "b", Some(1)));
    log.push(Seen {
        at: 0.0,
        answered: 0.0,
        sent_after: 0.0,
        connection: 0,
        status: 401,
        principal: None,
        retry_after: None,
    });
    let r = rates("shared", &log, Some(1.0));
    assert_eq!(
        (r.requests, r.served, r.throttled, r.challenges),
        (32, 31, 1, 1)
    );
    assert_eq!(r.peak_per_s, 10);
    assert_eq!(r.peak_served_per_s, 9);
    // Admissions (authenticated, not 429) 125 ms apart: 8 in any 1 s window.
    assert_eq!(r.max_admitted_per_window, Some(8));
}

#[test]
fn worker_addresses_stay_off_the_labs_own_nodes() {
    assert_eq!(worker_ip(186, 0), Ipv4Addr::new(127, 186, 1, 1));
    assert_eq!(worker_ip(186, 249), Ipv4Addr::new(127, 186, 1, 250));
    assert_eq!(worker_ip(186, 250), Ipv4Addr::new(127, 186, 2, 1));
    assert_ne!(worker_oid(1), worker_oid(2));
}
