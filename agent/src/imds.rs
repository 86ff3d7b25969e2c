//! Azure Instance Metadata Service client: instance metadata (with tags) and managed-identity tokens.
//!
//! Azure documents IMDS as best-effort while a VM boots: 404, 410, 429 and 5xx are retried with backoff
//! inside a total deadline; 400, 401, 403, 405 and unparseable bodies are final. IMDS must never be reached
//! through a proxy, so the HTTP client ignores proxy settings.

use crate::retry::{retry, Attempt, RetryError, RetryPolicy, TimeoutError};
use serde::Deserialize;
use std::time::Duration;

pub const INSTANCE_API_VERSION: &str = "2023-11-15";
pub const IDENTITY_API_VERSION: &str = "2018-02-01";
/// The first IMDS version that serves `compute/userData`.
pub const USER_DATA_API_VERSION: &str = "2021-01-01";

/// What went wrong in one exchange with IMDS. Messages never contain a response body.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS {what}: HTTP {status}")]
    Status { what: &'static str, status: u16 },
    #[error("IMDS {what}: cannot connect: {detail}")]
    Connect { what: &'static str, detail: String },
    #[error("IMDS {what}: no answer within {0:?}", .after)]
    Timeout { what: &'static str, after: Duration },
    #[error("IMDS {what}: response is not valid JSON of the expected shape: {detail}")]
    Body { what: &'static str, detail: String },
}

impl TimeoutError for ImdsError {
    fn timeout(after: Duration) -> Self {
        ImdsError::Timeout {
            what: "request",
            after,
        }
    }
}

/// Whether an HTTP status from IMDS is worth retrying (per Azure's IMDS documentation).
pub fn status_is_retryable(status: u16) -> bool {
    matches!(status, 404 | 410 | 429) || (500..600).contains(&status)
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct InstanceMetadata {
    pub compute: Compute,
    pub network: Network,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Compute {
    /// The Azure cloud (`AzurePublicCloud`, `AzureUSGovernmentCloud`, `AzureChinaCloud`): which service domains
    /// endpoint tags may name (node::check_endpoints).
    pub az_environment: String,
    /// The VM's resource name (`hs-worker_17` on a scale set): not a valid host name, so not the node name.
    pub name: String,
    pub os_profile: OsProfile,
    pub vm_id: String,
    pub vm_scale_set_name: String,
    pub resource_group_name: String,
    pub subscription_id: String,
    pub location: String,
    pub zone: String,
    pub tags_list: Vec<Tag>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct OsProfile {
    /// The guest's host name (`hs-worker000017` on a scale set: prefix + index): the node name.
    pub computer_name: String,
}

impl InstanceMetadata {
    /// The node's name: the computer name, lowercased (Consul and Nomad node names, DNS labels).
    pub fn node_name(&self) -> String {
        self.compute
            .os_profile
            .computer_name
            .trim()
            .to_ascii_lowercase()
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Tag {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Network {
    pub interface: Vec<Interface>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Interface {
    pub ipv4: Ipv4Info,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Ipv4Info {
    pub ip_address: Vec<IpAddress>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct IpAddress {
    pub private_ip_address: String,
    pub public_ip_address: String,
}

impl InstanceMetadata {
    /// Parses an IMDS instance document. Errors name the JSON position, never quote values.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ImdsError> {
        serde_json::from_slice(bytes).map_err(|e| ImdsError::Body {
            what: "instance metadata",
            detail: describe(&e),
        })
    }

    /// The primary NIC's first private IPv4 address, as text (empty when absent).
    pub fn primary_private_ip(&self) -> &str {
        self.network
            .interface
            .first()
            .and_then(|i| i.ipv4.ip_address.first())
            .map(|a| a.private_ip_address.as_str())
            .unwrap_or("")
    }
}

/// A serde error without the offending value (a token response must never be echoed).
fn describe(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected type or missing field",
        Category::Eof => "truncated",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

/// The managed-identity token endpoint's answer (`expires_on` is unix seconds as a string).
#[derive(Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub expires_on: String,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

/// Whether `endpoint` is a plain-HTTP URL.
fn plain_http(endpoint: &str) -> bool {
    endpoint
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
}

#[derive(Debug, Clone)]
pub struct ImdsClient {
    http: reqwest::Client,
    endpoint: String,
    policy: RetryPolicy,
}

impl ImdsClient {
    pub fn new(endpoint: &str, policy: RetryPolicy) -> Self {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2));
        // IMDS is plain HTTP (Azure's is http://169.254.169.254): a client for it needs no TLS trust store, and
        // loading the system's (what a default client does, at every construction) costs milliseconds of a
        // boot's critical path. An https endpoint keeps the system roots.
        if plain_http(endpoint) {
            builder = builder.tls_certs_only([]);
        }
        let http = builder
            .build()
            .expect("static HTTP client configuration is valid");
        ImdsClient {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            policy,
        }
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// `GET /metadata/instance`, retried per the IMDS rules until the deadline.
    pub async fn instance(&self) -> Result<InstanceMetadata, RetryError<ImdsError>> {
        let url = format!(
            "{}/metadata/instance?api-version={INSTANCE_API_VERSION}",
            self.endpoint
        );
        let body = self.get("instance metadata", &url, &[]).await?;
        InstanceMetadata::from_json(&body).map_err(RetryError::Final)
    }

    /// `GET /metadata/instance/compute/userData` (base64 text, as the scale set's `userData` was given; empty
    /// when none is set), retried per the IMDS rules. The answer is returned as is, never logged.
    pub async fn user_data(&self) -> Result<String, RetryError<ImdsError>> {
        let url = format!("{}/metadata/instance/compute/userData", self.endpoint);
        let body = self
            .get(
                "user data",
                &url,
                &[("api-version", USER_DATA_API_VERSION), ("format", "text")],
            )
            .await?;
        String::from_utf8(body).map_err(|_| {
            RetryError::Final(ImdsError::Body {
                what: "user data",
                detail: "not UTF-8 text".into(),
            })
        })
    }

    /// `GET /metadata/identity/oauth2/token` for `resource`, optionally for a user-assigned identity.
    pub async fn token(
        &self,
        resource: &str,
        client_id: Option<&str>,
    ) -> Result<TokenResponse, RetryError<ImdsError>> {
        let url = format!("{}/metadata/identity/oauth2/token", self.endpoint);
        let mut query = vec![
            ("api-version", IDENTITY_API_VERSION),
            ("resource", resource),
        ];
        if let Some(id) = client_id {
            query.push(("client_id", id));
        }
        let body = self.get("identity token", &url, &query).await?;
        serde_json::from_slice(&body).map_err(|e| {
            RetryError::Final(ImdsError::Body {
                what: "identity token",
                detail: describe(&e),
            })
        })
    }

    async fn get(
        &self,
        what: &'static str,
        url: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<u8>, RetryError<ImdsError>> {
        retry(self.policy, |attempt| async move {
            tracing::debug!(what, attempt, "IMDS request");
            let resp = match self
                .http
                .get(url)
                .query(query)
                .header("Metadata", "true")
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) if e.is_timeout() => {
                    return Attempt::Retry(ImdsError::Timeout {
                        what,
                        after: self.policy.attempt_timeout,
                    })
                }
                // Connection refused/reset: IMDS not up yet, or a network blip. `without_url` keeps query
                // strings out of messages.
                Err(e) => {
                    return Attempt::Retry(ImdsError::Connect {
                        what,
                        detail: e.without_url().to_string(),
                    })
                }
            };
            let status = resp.status().as_u16();
            if status != 200 {
                let err = ImdsError::Status { what, status };
                return if status_is_retryable(status) {
                    Attempt::Retry(err)
                } else {
                    Attempt::Fail(err)
                };
            }
            match resp.bytes().await {
                Ok(b) => Attempt::Done(b.to_vec()),
                Err(e) => Attempt::Retry(ImdsError::Connect {
                    what,
                    detail: e.without_url().to_string(),
                }),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_endpoints_go_without_a_trust_store() {
        assert!(plain_http("http://169.254.169.254"));
        assert!(plain_http("HTTP://127.77.0.31:16925"));
        assert!(!plain_http("https://imds.example"));
        assert!(!plain_http("http"));
    }

    /// A client for a plain-HTTP IMDS (no trust store loaded) still fetches over HTTP.
    #[tokio::test]
    async fn a_plain_http_client_fetches() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let app = axum::Router::new().route(
            "/metadata/identity/oauth2/token",
            axum::routing::get(|| async { r#"{"access_token":"t","expires_on":"1"}"# }),
        );
        tokio::spawn(async move { axum::serve(l, app).await });
        let c = ImdsClient::new(
            &format!("http://127.0.0.1:{port}"),
            RetryPolicy::imds(Duration::from_secs(5)),
        );
        let t = c.token("https://vault.azure.net", None).await.unwrap();
        assert_eq!(t.expires_on, "1");
    }
}
