use super::*;

fn seen(at: f64, status: u16, who: &str, retry_after: Option<u64>) -> Seen {
    Seen {
        at,
        answered: at,
        // Sent a millisecond before it arrived.
        sent_after: at - 0.001,
        status,
        principal: Some(who.into()),
        retry_after,
    }
}

#[test]
fn an_early_retry_is_counted_and_a_patient_one_is_not() {
    let log = vec![
        seen(0.0, 429, "a", Some(2)),
        seen(2.1, 200, "a", None),
        seen(0.5, 429, "b", Some(3)),
        seen(1.0, 429, "b", Some(3)),
        seen(4.5, 200, "b", None),
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

/// A 429 answered at `answered` (it arrived 10 ms before).
fn throttled_at(answered: f64, who: &str, retry_after: u64) -> Seen {
    Seen {
        at: answered - 0.01,
        answered,
        sent_after: answered - 0.02,
        status: 429,
        principal: Some(who.into()),
        retry_after: Some(retry_after),
    }
}

/// A request already on the wire when the 429 was answered cannot have honoured it: not early. The requests
/// after it are judged against the 429 all the same.
#[test]
fn a_request_on_the_wire_at_the_429_is_not_early_and_the_ones_after_it_are_judged() {
    let log = vec![
        throttled_at(1.0, "a", 1),
        // Arrived while the 429 was being answered.
        seen(0.995, 200, "a", None),
        // Arrived after the 429's answer, but sent before it (its connection's last answer came earlier): a
        // request the loaded double read late.
        Seen {
            sent_after: 0.9,
            ..seen(1.02, 200, "a", None)
        },
        // Patient: 1.05 s after the 429's answer.
        seen(2.05, 200, "a", None),
    ];
    let d = retry_discipline(&log);
    let a = d["a"];
    assert_eq!((a.0, a.1, a.2), (4, 1, 0));
    assert!((a.3.unwrap() - 0.05).abs() < 1e-9, "{:?}", a.3);
}

/// An agent that ignores Retry-After is still counted early — also behind a request that was on the wire
/// (the old pairwise check compared each request with the one just before it only), and once per request
/// however many holds it falls in.
#[test]
fn an_agent_that_ignores_retry_after_is_counted_early() {
    let log = vec![
        throttled_at(1.0, "x", 2),
        seen(0.999, 200, "x", None),
        // Its other reads went on at their own pace.
        seen(1.2, 200, "x", None),
        throttled_at(1.5, "x", 2),
        seen(1.6, 200, "x", None),
        seen(3.6, 200, "x", None),
    ];
    let d = retry_discipline(&log);
    let x = d["x"];
    assert_eq!(
        (x.0, x.1, x.2),
        (6, 2, 3),
        "1.2, 1.49 (the second 429's request) and 1.6"
    );
    assert!((x.3.unwrap() - (0.1 - 2.0)).abs() < 1e-9, "{:?}", x.3);
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
