//! Cluster material — the cluster CA and the gossip keys — created once by the first server-tier node and
//! shared through the cluster's Key Vault. Nodes that boot before it exists wait for it (with a deadline).
//! Only server tiers may create it, under a blob lease of their own ("material"), so it is created once.

use crate::azure::{call, Azure, AzureError};
use crate::election;
use crate::retry::RetryPolicy;
use azure_core::http::RequestContent;
use azure_security_keyvault_secrets::models::SetSecretParameters;
use base64::Engine;
use std::time::Duration;
use tokio::time::Instant;
use zeroize::Zeroizing;

/// Where the cluster material lives. Secrets are split by who may read them (docs/trust-model.md):
/// - `shared`: every cluster identity reads it — the CA certificate, the Consul gossip key, the Consul agent
///   token and the Nomad client certificate with its key;
/// - `servers`: only the server tiers read it — the CA key and the Nomad gossip key (Nomad gossip is
///   server-to-server). Workers and the jumpbox are never given this vault, so they never hold the CA key.
#[derive(Debug, Clone)]
pub struct Vaults {
    pub shared: String,
    /// `Some` on server tiers only.
    pub servers: Option<String>,
    /// Read the shared Nomad client certificate and key (workers only: nobody else needs the key in memory).
    pub nomad_client: bool,
}

/// The secrets a node renders from. Zeroized on drop. Server-only parts are `None` on workers and the jumpbox.
pub struct ClusterMaterial {
    pub ca_cert: String,
    pub ca_key: Option<Zeroizing<String>>,
    pub consul_gossip_key: Zeroizing<String>,
    pub nomad_gossip_key: Option<Zeroizing<String>>,
    /// The Nomad client certificate and key (one for all clients, issued when the material was created).
    pub nomad_client: Option<(String, Zeroizing<String>)>,
    /// The Consul agent token, once the Consul tier's bootstrap has created it.
    pub consul_agent_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for ClusterMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterMaterial(<redacted>)")
    }
}

/// Key Vault secret names (alphanumerics and dashes), per cluster.
pub struct Names {
    /// In the shared vault. Written last: a reader that sees it sees everything else.
    pub ca_cert: String,
    pub consul_gossip_key: String,
    pub nomad_client_cert: String,
    pub nomad_client_key: String,
    /// In the servers vault.
    pub ca_key: String,
    pub nomad_gossip_key: String,
}

impl Names {
    /// The secrets of the shared vault (every cluster identity reads them).
    pub fn shared(&self) -> [&str; 4] {
        [
            &self.ca_cert,
            &self.consul_gossip_key,
            &self.nomad_client_cert,
            &self.nomad_client_key,
        ]
    }
    /// The secrets of the servers vault (server tiers only).
    pub fn servers(&self) -> [&str; 2] {
        [&self.ca_key, &self.nomad_gossip_key]
    }
}

pub fn names(cluster: &str) -> Names {
    Names {
        ca_cert: format!("{cluster}-cluster-ca-cert"),
        consul_gossip_key: format!("{cluster}-consul-gossip-key"),
        nomad_client_cert: format!("{cluster}-nomad-client-cert"),
        nomad_client_key: format!("{cluster}-nomad-client-key"),
        ca_key: format!("{cluster}-cluster-ca-key"),
        nomad_gossip_key: format!("{cluster}-nomad-gossip-key"),
    }
}

/// SANs of the shared Nomad client certificate (Nomad checks `client.<region>.nomad` with `verify_server_hostname`).
pub const NOMAD_CLIENT_SANS: &[&str] = &["client.global.nomad", "localhost", "127.0.0.1"];

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    #[error(
        "cluster material not in Key Vault within {0:?} (the first server-tier node creates it)"
    )]
    Timeout(Duration),
    #[error(
        "Consul agent token not in Key Vault within {0:?} (the Consul tier's bootstrap creates it)"
    )]
    NoAgentToken(Duration),
    #[error("cluster material in Key Vault is unusable: {0}")]
    Invalid(String),
}

async fn get(
    az: &Azure,
    vault: &str,
    name: &str,
    policy: RetryPolicy,
) -> Result<Option<Zeroizing<String>>, AzureError> {
    let secrets = az.secrets(vault)?;
    let r = call(policy, "cluster material read", || {
        let secrets = &secrets;
        async move { secrets.get_secret(name, None).await?.into_model() }
    })
    .await;
    match r {
        Ok(s) => Ok(s.value.map(Zeroizing::new)),
        Err(e) if e.is(404) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn set(
    az: &Azure,
    vault: &str,
    name: &str,
    value: &str,
    policy: RetryPolicy,
) -> Result<(), AzureError> {
    let secrets = az.secrets(vault)?;
    call(policy, "cluster material write", || {
        let params = SetSecretParameters {
            value: Some(value.to_string()),
            ..Default::default()
        };
        let secrets = &secrets;
        async move {
            let body: RequestContent<SetSecretParameters> = params.try_into()?;
            secrets.set_secret(name, body, None).await.map(|_| ())
        }
    })
    .await
}

async fn read_all(
    az: &Azure,
    vaults: &Vaults,
    cluster: &str,
    policy: RetryPolicy,
) -> Result<Option<ClusterMaterial>, AzureError> {
    let n = names(cluster);
    let shared = vaults.shared.as_str();
    // The CA certificate is written last: a reader that sees it sees them all.
    let Some(cert) = get(az, shared, &n.ca_cert, policy).await? else {
        return Ok(None);
    };
    let Some(consul) = get(az, shared, &n.consul_gossip_key, policy).await? else {
        return Ok(None);
    };
    let nomad_client = if vaults.nomad_client {
        match (
            get(az, shared, &n.nomad_client_cert, policy).await?,
            get(az, shared, &n.nomad_client_key, policy).await?,
        ) {
            (Some(c), Some(k)) => Some((c.to_string(), k)),
            _ => None,
        }
    } else {
        None
    };
    let (ca_key, nomad_gossip_key) = match &vaults.servers {
        Some(servers) => {
            let (Some(key), Some(nomad)) = (
                get(az, servers, &n.ca_key, policy).await?,
                get(az, servers, &n.nomad_gossip_key, policy).await?,
            ) else {
                return Ok(None);
            };
            (Some(key), Some(nomad))
        }
        None => (None, None),
    };
    let token = get(
        az,
        shared,
        &crate::names::agent_token_secret(cluster),
        policy,
    )
    .await?;
    Ok(Some(ClusterMaterial {
        ca_cert: cert.to_string(),
        ca_key,
        consul_gossip_key: consul,
        nomad_gossip_key,
        nomad_client,
        consul_agent_token: token,
    }))
}

fn gossip_key() -> Zeroizing<String> {
    let mut b = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(&mut b[..]).expect("system RNG");
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&b[..]))
}

/// Reads the cluster material, creating it first if this node may (server tiers) and nobody has.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_or_create(
    az: &Azure,
    vaults: &Vaults,
    blob_endpoint: Option<&str>,
    cluster: &str,
    may_create: bool,
    need_agent_token: bool,
    lease_secs: i32,
    policy: RetryPolicy,
    deadline: Duration,
) -> Result<ClusterMaterial, MaterialError> {
    let start = Instant::now();
    let mut m = fetch_or_create_inner(
        az,
        vaults,
        blob_endpoint,
        cluster,
        may_create,
        lease_secs,
        policy,
        deadline,
        start,
    )
    .await?;
    if need_agent_token && m.consul_agent_token.is_none() {
        let name = crate::names::agent_token_secret(cluster);
        tracing::info!(cluster, "waiting for the Consul agent token in Key Vault");
        loop {
            if let Some(t) = get(az, &vaults.shared, &name, policy).await? {
                m.consul_agent_token = Some(t);
                break;
            }
            if start.elapsed() > deadline {
                return Err(MaterialError::NoAgentToken(deadline));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(m)
}

#[allow(clippy::too_many_arguments)]
async fn fetch_or_create_inner(
    az: &Azure,
    vaults: &Vaults,
    blob_endpoint: Option<&str>,
    cluster: &str,
    may_create: bool,
    lease_secs: i32,
    policy: RetryPolicy,
    deadline: Duration,
    start: Instant,
) -> Result<ClusterMaterial, MaterialError> {
    let mut announced = false;
    loop {
        if let Some(m) = read_all(az, vaults, cluster, policy).await? {
            return Ok(m);
        }
        if let (true, Some(blob), Some(servers)) = (may_create, blob_endpoint, &vaults.servers) {
            if let Some(lead) =
                election::try_acquire(az, blob, cluster, "material", policy, lease_secs).await?
            {
                // Re-check under the lease: the previous holder may have just finished.
                let r = match read_all(az, vaults, cluster, policy).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => create(az, &vaults.shared, servers, cluster, policy).await,
                    Err(e) => Err(e.into()),
                };
                lead.release().await;
                return r;
            }
        }
        if !announced {
            tracing::info!(cluster, "waiting for the cluster material in Key Vault");
            announced = true;
        }
        if start.elapsed() > deadline {
            return Err(MaterialError::Timeout(deadline));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn create(
    az: &Azure,
    shared: &str,
    servers: &str,
    cluster: &str,
    policy: RetryPolicy,
) -> Result<ClusterMaterial, MaterialError> {
    let now = time::OffsetDateTime::now_utc();
    let (ca_cert, ca_key) =
        crate::tls::generate_ca(&format!("hashistack {cluster} cluster CA"), 3650, now)
            .map_err(|e| MaterialError::Invalid(e.to_string()))?;
    let ca = crate::tls::ClusterCa::from_pem(&ca_cert, &ca_key)
        .map_err(|e| MaterialError::Invalid(e.to_string()))?;
    let sans: Vec<String> = NOMAD_CLIENT_SANS.iter().map(|s| s.to_string()).collect();
    let client = ca
        .issue("client.global.nomad", &sans, NOMAD_CLIENT_CERT_DAYS, now)
        .map_err(|e| MaterialError::Invalid(e.to_string()))?;
    let m = ClusterMaterial {
        ca_cert,
        ca_key: Some(Zeroizing::new(ca_key)),
        consul_gossip_key: gossip_key(),
        nomad_gossip_key: Some(gossip_key()),
        nomad_client: Some((client.cert_pem, Zeroizing::new(client.key_pem))),
        consul_agent_token: None,
    };
    let n = names(cluster);
    let (Some(ca_key), Some(nomad), Some((client_cert, client_key))) =
        (&m.ca_key, &m.nomad_gossip_key, &m.nomad_client)
    else {
        unreachable!("just built");
    };
    // Server-only secrets first, the shared CA certificate last (the readers' sentinel).
    set(az, servers, &n.ca_key, ca_key, policy).await?;
    set(az, servers, &n.nomad_gossip_key, nomad, policy).await?;
    set(az, shared, &n.nomad_client_key, client_key, policy).await?;
    set(az, shared, &n.nomad_client_cert, client_cert, policy).await?;
    set(
        az,
        shared,
        &n.consul_gossip_key,
        &m.consul_gossip_key,
        policy,
    )
    .await?;
    set(az, shared, &n.ca_cert, &m.ca_cert, policy).await?;
    tracing::info!(
        cluster,
        "created the cluster CA, the gossip keys and the Nomad client certificate in Key Vault"
    );
    Ok(m)
}

/// Lifetime of the shared Nomad client certificate (re-issued by rotating the cluster material; see
/// docs/runbooks.md).
pub const NOMAD_CLIENT_CERT_DAYS: u32 = 825;

/// Writes one secret to the shared vault (tokens handed from the bootstrap leader to other nodes).
pub async fn put_secret(
    az: &Azure,
    vault: &str,
    name: &str,
    value: &str,
) -> Result<(), AzureError> {
    set(az, vault, name, value, crate::escrow::policy()).await
}

/// Reads one optional secret from the shared vault.
pub async fn get_secret(
    az: &Azure,
    vault: &str,
    name: &str,
    policy: RetryPolicy,
) -> Result<Option<Zeroizing<String>>, AzureError> {
    get(az, vault, name, policy).await
}
