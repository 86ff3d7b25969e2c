use super::*;

fn seen(at: f64, status: u16, who: &str, retry_after: Option<u64>) -> Seen {
    Seen {
        at,
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

#[test]
fn rates_count_peaks_and_the_busiest_window() {
    let mut log: Vec<Seen> = (0..30)
        .map(|i| seen(f64::from(i) * 0.125, 200, "a", None))
        .collect();
    log.push(seen(0.05, 429, "b", Some(1)));
    log.push(Seen {
        at: 0.0,
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
