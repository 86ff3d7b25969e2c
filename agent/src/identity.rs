//! The VM's managed identity as an `azure_core::credentials::TokenCredential`, backed by our own IMDS
//! client (so the endpoint is configurable and the retry rules are ours). Every Azure SDK client in the
//! agent takes its credential from here. Tokens are cached per resource and refreshed 5 minutes before expiry.

use crate::imds::{ImdsClient, ImdsError};
use crate::retry::RetryError;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::{Error as AzError, ErrorKind};
use std::collections::HashMap;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::Mutex;

/// Refresh this long before a token expires.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Clock seam so expiry logic is testable without waiting.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> OffsetDateTime;
}

#[derive(Debug, Default)]
pub struct SystemClock;
impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

#[derive(Debug)]
pub struct ImdsCredential {
    imds: ImdsClient,
    client_id: Option<String>,
    clock: Box<dyn Clock>,
    cache: Mutex<HashMap<String, AccessToken>>,
}

impl ImdsCredential {
    pub fn new(imds: ImdsClient, client_id: Option<String>) -> Self {
        Self::with_clock(imds, client_id, Box::new(SystemClock))
    }

    pub fn with_clock(imds: ImdsClient, client_id: Option<String>, clock: Box<dyn Clock>) -> Self {
        ImdsCredential {
            imds,
            client_id,
            clock,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Azure SDK scopes are `<resource>/.default`; IMDS wants the resource.
    pub fn scope_to_resource(scope: &str) -> &str {
        scope.strip_suffix("/.default").unwrap_or(scope)
    }

    async fn fetch(&self, resource: &str) -> Result<AccessToken, RetryError<ImdsError>> {
        let resp = self.imds.token(resource, self.client_id.as_deref()).await?;
        let secs: i64 = resp.expires_on.trim().parse().map_err(|_| {
            RetryError::Final(ImdsError::Body {
                what: "identity token",
                detail: "expires_on is not unix seconds".into(),
            })
        })?;
        let expires_on = OffsetDateTime::from_unix_timestamp(secs).map_err(|_| {
            RetryError::Final(ImdsError::Body {
                what: "identity token",
                detail: "expires_on out of range".into(),
            })
        })?;
        Ok(AccessToken::new(resp.access_token, expires_on))
    }
}

#[async_trait::async_trait]
impl TokenCredential for ImdsCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let [scope] = scopes else {
            return Err(AzError::with_message(
                ErrorKind::Credential,
                "managed identity tokens take exactly one scope",
            ));
        };
        let resource = Self::scope_to_resource(scope).to_string();
        let mut cache = self.cache.lock().await;
        let margin = time::Duration::try_from(REFRESH_MARGIN).expect("small duration");
        if let Some(tok) = cache.get(&resource) {
            if tok.expires_on - margin > self.clock.now() {
                return Ok(tok.clone());
            }
        }
        let tok = self.fetch(&resource).await.map_err(|e| {
            AzError::with_message(
                ErrorKind::Credential,
                format!("managed identity token for {resource}: {e}"),
            )
        })?;
        cache.insert(resource, tok.clone());
        Ok(tok)
    }
}
