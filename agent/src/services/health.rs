//! Probes of the services' own HTTPS APIs, trusting the cluster CA. Each probe has a short deadline.

use super::Health;
pub use crate::tls::HttpsClientError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Probe {
    /// Consul/Nomad: the agent answers and knows its raft leader.
    Leader {
        leader: String,
    },
    NoLeader,
    /// Vault: seal status.
    Vault {
        initialized: bool,
        sealed: bool,
    },
    Unreachable {
        error: String,
    },
}

#[derive(Deserialize)]
struct SealStatus {
    initialized: bool,
    sealed: bool,
}

pub fn client_for(
    ca_file: &std::path::Path,
    timeout: Duration,
) -> Result<reqwest::Client, HttpsClientError> {
    client_for_name(ca_file, timeout, None)
}

/// As [`client_for`]; with `Some((name, addr))`, requests to `name` go to `addr` and the certificate is
/// checked for `name`.
pub fn client_for_name(
    ca_file: &std::path::Path,
    timeout: Duration,
    resolve: Option<(&str, std::net::SocketAddr)>,
) -> Result<reqwest::Client, HttpsClientError> {
    let cert = crate::tls::ca_certificate(ca_file)?;
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([cert])
        .timeout(timeout);
    if let Some((name, addr)) = resolve {
        b = b.resolve(name, addr);
    }
    b.build().map_err(HttpsClientError::Build)
}

pub async fn probe(h: &Health, timeout: Duration) -> Probe {
    let (addr, ca, path, tls_name) = match h {
        Health::ConsulHttps { addr, ca_file } => (addr, ca_file, "/v1/status/leader", None),
        Health::NomadHttps {
            addr,
            ca_file,
            tls_name,
        } => (addr, ca_file, "/v1/status/leader", tls_name.as_deref()),
        Health::VaultHttps { addr, ca_file } => (addr, ca_file, "/v1/sys/seal-status", None),
    };
    let client = match client_for_name(ca, timeout, tls_name.zip(addr.parse().ok())) {
        Ok(c) => c,
        Err(e) => {
            return Probe::Unreachable {
                error: e.to_string(),
            }
        }
    };
    let url = match tls_name.zip(addr.rsplit_once(':')) {
        Some((name, (_, port))) => format!("https://{name}:{port}{path}"),
        None => format!("https://{addr}{path}"),
    };
    let resp = match client.get(url).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            return Probe::Unreachable {
                error: format!("HTTP {}", r.status().as_u16()),
            }
        }
        Err(e) => {
            return Probe::Unreachable {
                error: e.without_url().to_string(),
            }
        }
    };
    match h {
        Health::VaultHttps { .. } => match resp.json::<SealStatus>().await {
            Ok(s) => Probe::Vault {
                initialized: s.initialized,
                sealed: s.sealed,
            },
            Err(_) => Probe::Unreachable {
                error: "seal-status response did not parse".into(),
            },
        },
        _ => match resp.json::<String>().await {
            Ok(l) if !l.is_empty() => Probe::Leader { leader: l },
            Ok(_) => Probe::NoLeader,
            Err(_) => Probe::Unreachable {
                error: "status/leader response did not parse".into(),
            },
        },
    }
}
