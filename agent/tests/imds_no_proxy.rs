//! IMDS is never reached through a proxy, whatever the environment says.
//!
//! Proxy variables are process-global, so this binary holds exactly one test and sets them before anything
//! else runs. The "proxy" is a live server that counts what reaches it; a control client with default
//! settings proves the variables are in effect here.

mod common;

use common::{imds_fixture, start, Reply, Script};
use hashistack_agent::imds::ImdsClient;
use hashistack_agent::retry::RetryPolicy;
use std::time::Duration;

#[tokio::test]
async fn imds_requests_ignore_proxy_environment() {
    let proxy = Script::new(|_, _| Reply::Status(502, "proxied".into()));
    let proxy_url = start(proxy.clone()).await;
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        std::env::set_var(var, &proxy_url);
    }
    for var in ["NO_PROXY", "no_proxy"] {
        std::env::remove_var(var);
    }

    let doc = imds_fixture("worker").to_string();
    let imds = Script::new(move |_, _| Reply::Ok(doc.clone()));
    let imds_url = start(imds.clone()).await;

    // Control: an ordinary client honours the variables and lands on the proxy.
    let control = reqwest::Client::new()
        .get(format!("{imds_url}/metadata/instance"))
        .send()
        .await
        .expect("the proxy answers");
    assert_eq!(
        control.status().as_u16(),
        502,
        "control went through the proxy"
    );
    assert_eq!(proxy.hits(), 1);
    assert_eq!(imds.hits(), 0);

    let policy = RetryPolicy {
        deadline: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(2),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    };
    let md = ImdsClient::new(&imds_url, policy)
        .instance()
        .await
        .expect("IMDS answers directly");
    assert_eq!(md.compute.name, "hs-worker_17");
    assert_eq!(imds.hits(), 1, "went straight to IMDS");
    assert_eq!(
        proxy.hits(),
        1,
        "the proxy saw nothing from the IMDS client"
    );

    // Tokens use the same client.
    let _ = ImdsClient::new(&imds_url, policy)
        .token("https://vault.azure.net", None)
        .await;
    assert_eq!(imds.hits(), 2);
    assert_eq!(proxy.hits(), 1);
}
