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

/// The shared secrets a node renders from. Zeroized on drop.
pub struct ClusterMaterial {
    pub ca_cert: String,
    pub ca_key: Zeroizing<String>,
    pub consul_gossip_key: Zeroizing<String>,
    pub nomad_gossip_key: Zeroizing<String>,
    /// The Consul agent token, once the Consul tier's bootstrap has created it.
    pub consul_agent_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for ClusterMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterMaterial(<redacted>)")
    }
}

/// Key Vault secret names (alphanumerics and dashes), per cluster.
pub fn names(cluster: &str) -> [String; 4] {
    [
        format!("{cluster}-cluster-ca-cert"),
        format!("{cluster}-cluster-ca-key"),
        format!("{cluster}-consul-gossip-key"),
        format!("{cluster}-nomad-gossip-key"),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("{0}")]
    Azure(#[from] AzureError),
    #[error(
        "cluster material not in Key Vault within {0:?} (the first server-tier node creates it)"
    )]
    Timeout(Duration),
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
    vault: &str,
    cluster: &str,
    policy: RetryPolicy,
) -> Result<Option<ClusterMaterial>, AzureError> {
    let [cert, key, consul, nomad] = names(cluster);
    // The CA key is written first and the Nomad key last: a reader that sees the last one sees them all.
    let Some(nomad) = get(az, vault, &nomad, policy).await? else {
        return Ok(None);
    };
    let (Some(cert), Some(key), Some(consul)) = (
        get(az, vault, &cert, policy).await?,
        get(az, vault, &key, policy).await?,
        get(az, vault, &consul, policy).await?,
    ) else {
        return Ok(None);
    };
    let token = get(
        az,
        vault,
        &crate::bootstrap::consul_tokens::agent_token_secret(cluster),
        policy,
    )
    .await?;
    Ok(Some(ClusterMaterial {
        ca_cert: cert.to_string(),
        ca_key: key,
        consul_gossip_key: consul,
        nomad_gossip_key: nomad,
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
    vault: &str,
    blob_endpoint: Option<&str>,
    cluster: &str,
    may_create: bool,
    lease_secs: i32,
    policy: RetryPolicy,
    deadline: Duration,
) -> Result<ClusterMaterial, MaterialError> {
    let start = Instant::now();
    let mut announced = false;
    loop {
        if let Some(m) = read_all(az, vault, cluster, policy).await? {
            return Ok(m);
        }
        if let (true, Some(blob)) = (may_create, blob_endpoint) {
            if let Some(lead) =
                election::try_acquire(az, blob, cluster, "material", policy, lease_secs).await?
            {
                // Re-check under the lease: the previous holder may have just finished.
                let r = match read_all(az, vault, cluster, policy).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => create(az, vault, cluster, policy).await,
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
    vault: &str,
    cluster: &str,
    policy: RetryPolicy,
) -> Result<ClusterMaterial, MaterialError> {
    let now = time::OffsetDateTime::now_utc();
    let (ca_cert, ca_key) =
        crate::tls::generate_ca(&format!("hashistack {cluster} cluster CA"), 3650, now)
            .map_err(|e| MaterialError::Invalid(e.to_string()))?;
    let m = ClusterMaterial {
        ca_cert,
        ca_key: Zeroizing::new(ca_key),
        consul_gossip_key: gossip_key(),
        nomad_gossip_key: gossip_key(),
        consul_agent_token: None,
    };
    let [cert, key, consul, nomad] = names(cluster);
    set(az, vault, &key, &m.ca_key, policy).await?;
    set(az, vault, &cert, &m.ca_cert, policy).await?;
    set(az, vault, &consul, &m.consul_gossip_key, policy).await?;
    set(az, vault, &nomad, &m.nomad_gossip_key, policy).await?;
    tracing::info!(
        cluster,
        "created the cluster CA and gossip keys in Key Vault"
    );
    Ok(m)
}

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
