//! IMDS client and managed-identity credential against a scripted local IMDS.
//!
//! Retry list (404, 410, 429, 500, 503, connection refused, per-attempt timeout): retried and then successful
//! once IMDS turns healthy, and exhausting a short deadline with the last error named. Fail-fast list (400,
//! 401, 403, 405, a body that does not parse): exactly one request. Token endpoint: query, caching per
//! resource, refresh 5 minutes before expiry, `/.default` stripped, no token in any error.

mod common;

use azure_core::credentials::TokenCredential;
use common::{closed_port, imds_fixture, serve_on, start, Reply, Script};
use hashistack_agent::identity::{Clock, ImdsCredential, REFRESH_MARGIN};
use hashistack_agent::imds::{ImdsClient, ImdsError, INSTANCE_API_VERSION};
use hashistack_agent::retry::{RetryError, RetryPolicy};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// Short backoff; a deadline long enough that success never races it.
fn patient() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_secs(20),
        attempt_timeout: Duration::from_millis(500),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(40),
    }
}

/// A deadline short enough to be exhausted quickly.
fn impatient() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_millis(700),
        attempt_timeout: Duration::from_millis(200),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(40),
    }
}

fn good_doc() -> String {
    imds_fixture("consul-server").to_string()
}

/// Answers `status` to the first `failures` requests, then the good document.
fn flaky(status: u16, failures: usize) -> Arc<Script> {
    let doc = good_doc();
    Script::new(move |n, _| {
        if n < failures {
            Reply::Status(status, format!("{{\"error\":\"transient {status}\"}}"))
        } else {
            Reply::Ok(doc.clone())
        }
    })
}

fn always(status: u16) -> Arc<Script> {
    Script::new(move |_, _| Reply::Status(status, "{\"error\":\"nope\"}".into()))
}

// ----- retry list ---------------------------------------------------------------------------------------

#[tokio::test]
async fn retryable_statuses_are_retried_until_imds_answers() {
    for status in [404u16, 410, 429, 500, 503] {
        let script = flaky(status, 3);
        let url = start(script.clone()).await;
        let md = ImdsClient::new(&url, patient())
            .instance()
            .await
            .unwrap_or_else(|e| panic!("HTTP {status} then 200 should succeed, got: {e}"));
        assert_eq!(md.compute.name, "hs-consul_0", "HTTP {status}");
        assert_eq!(md.primary_private_ip(), "10.20.1.4");
        assert_eq!(script.hits(), 4, "HTTP {status}: 3 failures + 1 success");
    }
}

#[tokio::test]
async fn retryable_statuses_exhaust_the_deadline_naming_the_last_status() {
    for status in [404u16, 410, 429, 500, 503] {
        let script = always(status);
        let url = start(script.clone()).await;
        let err = ImdsClient::new(&url, impatient())
            .instance()
            .await
            .expect_err("never healthy");
        match &err {
            RetryError::Deadline { attempts, last, .. } => {
                assert!(
                    matches!(last, ImdsError::Status { status: s, .. } if *s == status),
                    "last error {last:?}"
                );
                assert_eq!(*attempts as usize, script.hits(), "one request per attempt");
                assert!(*attempts > 1, "HTTP {status} must be retried");
            }
            other => panic!("HTTP {status}: expected a deadline error, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("HTTP {status}")), "{msg}");
        assert!(msg.contains("gave up"), "{msg}");
        assert!(!msg.contains("nope"), "no response body in messages: {msg}");
    }
}

#[tokio::test]
async fn connection_refused_is_retried_until_imds_listens() {
    let port = closed_port();
    let script = Script::new({
        let doc = good_doc();
        move |_, _| Reply::Ok(doc.clone())
    });
    let s2 = script.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("rebind the closed port");
        serve_on(l, s2);
    });
    let md = ImdsClient::new(&format!("http://127.0.0.1:{port}"), patient())
        .instance()
        .await
        .expect("IMDS comes up later");
    assert_eq!(md.compute.vm_scale_set_name, "hs-consul");
    assert_eq!(
        script.hits(),
        1,
        "refused attempts never reached the server"
    );
}

#[tokio::test]
async fn connection_refused_until_the_deadline_names_the_connect_error() {
    let port = closed_port();
    let err = ImdsClient::new(&format!("http://127.0.0.1:{port}"), impatient())
        .instance()
        .await
        .expect_err("nothing listens");
    match &err {
        RetryError::Deadline { attempts, last, .. } => {
            assert!(matches!(last, ImdsError::Connect { .. }), "{last:?}");
            assert!(*attempts > 1);
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn slow_answer_times_out_and_is_retried() {
    let doc = good_doc();
    let script = Script::new(move |n, _| {
        let ok = Reply::Ok(doc.clone());
        if n == 0 {
            Reply::Slow(Duration::from_secs(10), Box::new(ok))
        } else {
            ok
        }
    });
    let url = start(script.clone()).await;
    let policy = RetryPolicy {
        attempt_timeout: Duration::from_millis(300),
        ..patient()
    };
    let md = ImdsClient::new(&url, policy)
        .instance()
        .await
        .expect("second attempt answers");
    assert_eq!(md.compute.name, "hs-consul_0");
    assert_eq!(
        script.hits(),
        2,
        "the slow attempt was abandoned and retried"
    );
}

#[tokio::test]
async fn always_slow_exhausts_the_deadline_naming_the_timeout() {
    let script =
        Script::new(|_, _| Reply::Slow(Duration::from_secs(30), Box::new(Reply::Ok("{}".into()))));
    let url = start(script.clone()).await;
    let err = ImdsClient::new(&url, impatient())
        .instance()
        .await
        .expect_err("never answers in time");
    match &err {
        RetryError::Deadline { last, .. } => {
            assert!(matches!(last, ImdsError::Timeout { .. }), "{last:?}")
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert!(script.hits() >= 2, "timeouts are retried");
}

// ----- fail-fast list -----------------------------------------------------------------------------------

#[tokio::test]
async fn final_statuses_fail_at_once_with_one_request() {
    for status in [400u16, 401, 403, 405] {
        let script = always(status);
        let url = start(script.clone()).await;
        let err = ImdsClient::new(&url, patient())
            .instance()
            .await
            .expect_err("final status");
        assert!(
            matches!(&err, RetryError::Final(ImdsError::Status { status: s, .. }) if *s == status),
            "HTTP {status}: {err:?}"
        );
        assert!(err.to_string().contains(&format!("HTTP {status}")), "{err}");
        assert_eq!(script.hits(), 1, "HTTP {status}: exactly one request");
    }
}

#[tokio::test]
async fn unparseable_bodies_fail_at_once_with_one_request() {
    for body in [
        "<html><body>Service Unavailable</body></html>",
        "{\"compute\": [1, 2, 3]}",
        "{\"compute\": {\"tagsList\": \"hashistack-role:consul-server\"}}",
        "",
    ] {
        let script = Script::new(move |_, _| Reply::Ok(body.to_string()));
        let url = start(script.clone()).await;
        let err = ImdsClient::new(&url, patient())
            .instance()
            .await
            .expect_err("body does not parse");
        assert!(
            matches!(&err, RetryError::Final(ImdsError::Body { .. })),
            "{body:?}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("not valid JSON"), "{msg}");
        assert!(
            !msg.contains("Service Unavailable") && !msg.contains("consul-server"),
            "no body in messages: {msg}"
        );
        assert_eq!(script.hits(), 1, "{body:?}: exactly one request");
    }
}

// ----- request shape ------------------------------------------------------------------------------------

#[tokio::test]
async fn instance_request_has_metadata_header_and_api_version() {
    let doc = good_doc();
    let script = Script::new(move |_, seen| {
        // Like the real IMDS: no Metadata header, no answer.
        if seen.header("metadata").as_deref() != Some("true") {
            Reply::Status(400, "Required metadata header not specified".into())
        } else {
            Reply::Ok(doc.clone())
        }
    });
    let url = start(script.clone()).await;
    // A trailing slash on the configured endpoint must not produce `//metadata`.
    ImdsClient::new(&format!("{url}/"), patient())
        .instance()
        .await
        .expect("header present");
    let seen = script.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path(), "/metadata/instance");
    assert_eq!(seen[0].header("metadata").as_deref(), Some("true"));
    let q = seen[0].query();
    assert_eq!(
        q.get("api-version").map(String::as_str),
        Some(INSTANCE_API_VERSION)
    );
    assert!(
        INSTANCE_API_VERSION >= "2023-11-15",
        "issue 2 asks for 2023-11-15 or newer"
    );
    assert_eq!(q.len(), 1, "only api-version: {q:?}");
}

#[tokio::test]
async fn parses_the_fields_we_use_from_a_real_shaped_document() {
    let script = Script::new(|_, _| Reply::Ok(imds_fixture("vault-server-akv").to_string()));
    let url = start(script).await;
    let md = ImdsClient::new(&url, patient()).instance().await.unwrap();
    let c = &md.compute;
    assert_eq!(c.name, "hs-vault_1");
    assert_eq!(c.vm_id, "7c3e9a1f-2d4b-4f6e-8a0c-3b5d7f9e1a2c");
    assert_eq!(c.vm_scale_set_name, "hs-vault");
    assert_eq!(c.resource_group_name, "rg-hashistack-prod");
    assert_eq!(c.subscription_id, "6b1f2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d");
    assert_eq!(c.location, "eastus2");
    assert_eq!(c.zone, "2");
    assert!(c
        .tags_list
        .iter()
        .any(|t| t.name == "hashistack-role" && t.value == "vault-server"));
    assert_eq!(md.primary_private_ip(), "10.20.2.5");
}

// ----- managed identity tokens --------------------------------------------------------------------------

const T0: i64 = 1_900_000_000;
const LIFETIME: i64 = 3600;

/// A token endpoint that hands out `tok-<n>-SECRET` expiring `LIFETIME` after T0 (or after `base`).
fn token_server(base: Arc<Mutex<i64>>) -> Arc<Script> {
    Script::new(move |n, seen| {
        if seen.path() != "/metadata/identity/oauth2/token" {
            return Reply::Status(404, "".into());
        }
        let q = seen.query();
        let exp = *base.lock().unwrap() + LIFETIME;
        Reply::Ok(
            serde_json::json!({
                "access_token": format!("tok-{n}-SECRET"),
                "client_id": q.get("client_id").cloned().unwrap_or_default(),
                "expires_in": "3599",
                "expires_on": exp.to_string(),
                "ext_expires_in": "3599",
                "not_before": (exp - LIFETIME).to_string(),
                "resource": q.get("resource").cloned().unwrap_or_default(),
                "token_type": "Bearer"
            })
            .to_string(),
        )
    })
}

#[derive(Debug, Clone)]
struct FakeClock(Arc<Mutex<OffsetDateTime>>);
impl FakeClock {
    fn at(unix: i64) -> Self {
        FakeClock(Arc::new(Mutex::new(
            OffsetDateTime::from_unix_timestamp(unix).unwrap(),
        )))
    }
    fn set(&self, unix: i64) {
        *self.0.lock().unwrap() = OffsetDateTime::from_unix_timestamp(unix).unwrap();
    }
}
impl Clock for FakeClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

const VAULT_SCOPE: &str = "https://vault.azure.net/.default";
const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";

#[tokio::test]
async fn token_request_has_api_version_resource_and_client_id() {
    let script = token_server(Arc::new(Mutex::new(T0)));
    let url = start(script.clone()).await;
    let imds = ImdsClient::new(&url, patient());

    let t = imds
        .token(
            "https://vault.azure.net",
            Some("3c1d5e7f-9a2b-4c6d-8e0f-1a3b5c7d9e2f"),
        )
        .await
        .unwrap();
    assert_eq!(t.expires_on, (T0 + LIFETIME).to_string());
    let t2 = imds.token("https://storage.azure.com", None).await.unwrap();
    assert!(
        !format!("{t:?} {t2:?}").contains("SECRET"),
        "Debug redacts the token"
    );

    let seen = script.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path(), "/metadata/identity/oauth2/token");
        assert_eq!(s.header("metadata").as_deref(), Some("true"));
    }
    let q = seen[0].query();
    assert_eq!(q["api-version"], "2018-02-01");
    assert_eq!(q["resource"], "https://vault.azure.net");
    assert_eq!(q["client_id"], "3c1d5e7f-9a2b-4c6d-8e0f-1a3b5c7d9e2f");
    assert_eq!(q.len(), 3, "{q:?}");
    let q = seen[1].query();
    assert_eq!(q["api-version"], "2018-02-01");
    assert_eq!(q["resource"], "https://storage.azure.com");
    assert!(
        !q.contains_key("client_id"),
        "no client_id for a system-assigned identity: {q:?}"
    );
}

#[tokio::test]
async fn credential_strips_default_and_caches_per_resource() {
    let script = token_server(Arc::new(Mutex::new(T0)));
    let url = start(script.clone()).await;
    let clock = FakeClock::at(T0);
    let cred = ImdsCredential::with_clock(
        ImdsClient::new(&url, patient()),
        Some("3c1d5e7f-9a2b-4c6d-8e0f-1a3b5c7d9e2f".into()),
        Box::new(clock.clone()),
    );

    let a = cred.get_token(&[VAULT_SCOPE], None).await.unwrap();
    assert_eq!(a.token.secret(), "tok-0-SECRET");
    assert_eq!(a.expires_on.unix_timestamp(), T0 + LIFETIME);
    assert_eq!(script.hits(), 1);
    let q = script.seen()[0].query();
    assert_eq!(
        q["resource"], "https://vault.azure.net",
        "/.default is stripped"
    );
    assert_eq!(q["client_id"], "3c1d5e7f-9a2b-4c6d-8e0f-1a3b5c7d9e2f");

    // Same resource: served from the cache, no request.
    let b = cred.get_token(&[VAULT_SCOPE], None).await.unwrap();
    assert_eq!(b.token.secret(), "tok-0-SECRET");
    // The same resource named without /.default shares the cache entry.
    let b2 = cred
        .get_token(&["https://vault.azure.net"], None)
        .await
        .unwrap();
    assert_eq!(b2.token.secret(), "tok-0-SECRET");
    assert_eq!(script.hits(), 1, "cached");

    // Another resource: its own token.
    let c = cred.get_token(&[STORAGE_SCOPE], None).await.unwrap();
    assert_eq!(c.token.secret(), "tok-1-SECRET");
    assert_eq!(
        script.seen()[1].query()["resource"],
        "https://storage.azure.com"
    );
    assert_eq!(script.hits(), 2);
    let c2 = cred.get_token(&[STORAGE_SCOPE], None).await.unwrap();
    assert_eq!(c2.token.secret(), "tok-1-SECRET");
    let a2 = cred.get_token(&[VAULT_SCOPE], None).await.unwrap();
    assert_eq!(a2.token.secret(), "tok-0-SECRET");
    assert_eq!(script.hits(), 2, "both cached");

    assert!(
        !format!("{cred:?}").contains("SECRET"),
        "Debug of the credential shows no token: {cred:?}"
    );

    // More than one scope is refused without a request.
    assert!(cred
        .get_token(&[VAULT_SCOPE, STORAGE_SCOPE], None)
        .await
        .is_err());
    assert_eq!(script.hits(), 2);
}

#[tokio::test]
async fn credential_refreshes_within_five_minutes_of_expiry() {
    assert_eq!(REFRESH_MARGIN, Duration::from_secs(300));
    let base = Arc::new(Mutex::new(T0));
    let script = token_server(base.clone());
    let url = start(script.clone()).await;
    let clock = FakeClock::at(T0);
    let cred = ImdsCredential::with_clock(
        ImdsClient::new(&url, patient()),
        None,
        Box::new(clock.clone()),
    );
    let exp = T0 + LIFETIME;

    assert_eq!(
        cred.get_token(&[VAULT_SCOPE], None)
            .await
            .unwrap()
            .token
            .secret(),
        "tok-0-SECRET"
    );
    // 5 min + 1 s before expiry: still good.
    clock.set(exp - 301);
    assert_eq!(
        cred.get_token(&[VAULT_SCOPE], None)
            .await
            .unwrap()
            .token
            .secret(),
        "tok-0-SECRET"
    );
    assert_eq!(script.hits(), 1);

    // Inside the margin: refreshed, and the new token (with its later expiry) is cached.
    *base.lock().unwrap() = exp - 299;
    clock.set(exp - 299);
    let t = cred.get_token(&[VAULT_SCOPE], None).await.unwrap();
    assert_eq!(t.token.secret(), "tok-1-SECRET");
    assert_eq!(t.expires_on.unix_timestamp(), exp - 299 + LIFETIME);
    assert_eq!(script.hits(), 2);
    assert_eq!(
        cred.get_token(&[VAULT_SCOPE], None)
            .await
            .unwrap()
            .token
            .secret(),
        "tok-1-SECRET"
    );
    assert_eq!(script.hits(), 2, "the refreshed token is cached");

    // Long past expiry: refreshed again.
    *base.lock().unwrap() = exp + 10_000;
    clock.set(exp + 10_000);
    assert_eq!(
        cred.get_token(&[VAULT_SCOPE], None)
            .await
            .unwrap()
            .token
            .secret(),
        "tok-2-SECRET"
    );
    assert_eq!(script.hits(), 3);
}

#[tokio::test]
async fn token_errors_never_contain_the_token() {
    let secret = "eyJ0eXAiOiJKV1Qi.SECRET-VALUE.sig";
    let bodies: Vec<(u16, String)> = vec![
        // expires_on of the wrong type
        (
            200,
            format!("{{\"access_token\":\"{secret}\",\"expires_on\":1900003600}}"),
        ),
        // expires_on not a number
        (
            200,
            format!("{{\"access_token\":\"{secret}\",\"expires_on\":\"soon\"}}"),
        ),
        // expires_on out of range
        (
            200,
            format!("{{\"access_token\":\"{secret}\",\"expires_on\":\"99999999999999999\"}}"),
        ),
        // truncated JSON
        (200, format!("{{\"access_token\":\"{secret}\",\"expi")),
        // an error status whose body echoes a token
        (
            400,
            format!("{{\"error\":\"invalid_request\",\"token\":\"{secret}\"}}"),
        ),
        (
            403,
            format!("{{\"error\":\"forbidden\",\"access_token\":\"{secret}\"}}"),
        ),
    ];
    for (status, body) in bodies {
        let b = body.clone();
        let script = Script::new(move |_, _| {
            if status == 200 {
                Reply::Ok(b.clone())
            } else {
                Reply::Status(status, b.clone())
            }
        });
        let url = start(script.clone()).await;
        let cred = ImdsCredential::with_clock(
            ImdsClient::new(&url, patient()),
            None,
            Box::new(FakeClock::at(T0)),
        );
        let err = cred
            .get_token(&[VAULT_SCOPE], None)
            .await
            .expect_err("bad token answer");
        let shown = format!("{err} | {err:?}");
        assert!(
            !shown.contains("SECRET"),
            "token leaked for {body:?}: {shown}"
        );
        assert!(
            shown.contains("https://vault.azure.net"),
            "names the resource: {shown}"
        );
        assert_eq!(script.hits(), 1, "{body:?}: a final error, one request");
        // Nothing was cached from a bad answer.
        let _ = cred.get_token(&[VAULT_SCOPE], None).await;
        assert_eq!(script.hits(), 2, "{body:?}: not cached");
    }
}
