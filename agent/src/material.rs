//! Cluster material — the cluster CA and the gossip keys — created once by the first server-tier node and
//! shared through the cluster's Key Vault. Nodes that boot before it exists wait for it (with a deadline).
//! Only server tiers may create it, under a blob lease of their own ("material"), so it is created once.
//!
//! Create-only, as far as Key Vault allows: Key Vault has no `If-None-Match` on secrets (every `setSecret`
//! adds a version), so creation is guarded instead. The CA certificate is the sentinel, written last: once it
//! exists, the material exists and is never created again — a CA certificate without the server-only secrets
//! beside it is an older layout and stops the boot ([`MaterialError::MigrationRequired`]), never a reason to
//! create. Each write is preceded by the creator's lease check (its own monotonic clock, election.rs); the
//! sentinel is read again right before it is written (present: another creator finished, use theirs); after
//! it, every secret is read back and must be this creator's (else [`MaterialError::Conflict`]); the Nomad
//! client key is the one exception (only workers read it: its certificate, written after it, stands for the
//! pair, and a late key that does not match its certificate fails the workers' TLS). The window
//! that remains: a creator frozen past its lease between its check and one `setSecret` lands that one write
//! late; the read-back of the creator that finished meanwhile does not see it, but every reader does: a
//! mismatched CA key and certificate are refused when loaded (tls.rs), and Key Vault keeps the earlier
//! version to restore (docs/bootstrap.md#cluster-material-conflict).

use crate::azure::{call_gated, Azure, AzureError, Gate, Sends};
use crate::election;
use crate::retry::{retry, Attempt, RetryError, RetryPolicy, TimeoutError};
use azure_core::http::RequestContent;
use azure_security_keyvault_secrets::models::SetSecretParameters;
use azure_security_keyvault_secrets::SecretClient;
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
    /// Read Nomad's Consul token (nodes that run Nomad only: Nomad servers and workers).
    pub nomad_consul_token: bool,
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
    /// Nomad's Consul token (read only where `Vaults::nomad_consul_token`), once the Consul tier's bootstrap
    /// has created it. Handed over before the agent token.
    pub consul_nomad_token: Option<Zeroizing<String>>,
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
    /// The shared vault holds a CA certificate, the servers vault lacks the server-only secrets: a deployment
    /// from before the vault split. Never a reason to create new material (it would replace the CA).
    #[error(
        "cluster material: migration required: the shared vault holds the CA certificate ({cert}) but the \
         servers vault has no {missing}; nothing was created: docs/bootstrap.md#migration-required"
    )]
    MigrationRequired { cert: String, missing: String },
    /// Another node wrote material while this one created it (a creator frozen past its lease).
    #[error(
        "cluster material: another node wrote {names} while this node created the material; none of it is \
         used: docs/bootstrap.md#cluster-material-conflict"
    )]
    Conflict { names: String },
    #[error("cluster material: {0}; nothing more was written")]
    Lease(#[from] election::LeaseLost),
}

async fn get(
    az: &Azure,
    vault: &str,
    name: &str,
    policy: RetryPolicy,
) -> Result<Option<Zeroizing<String>>, AzureError> {
    read(&Kv::new(az, vault)?, name, policy).await
}

/// One vault's secrets client and its throttle gate (shared by every call of this process to the vault:
/// a 429's `Retry-After` holds them all, [`Gate`]).
pub struct Kv {
    client: std::sync::Arc<SecretClient>,
    gate: std::sync::Arc<Gate>,
}

impl Kv {
    fn new(az: &Azure, vault: &str) -> Result<Self, AzureError> {
        Ok(Kv {
            client: az.secrets(vault)?,
            gate: az.gate(vault),
        })
    }
}

/// One secret through a client that is kept for the whole fetch (its vault's challenge and connection are
/// reused by every read); `None`: no such secret.
async fn read(
    kv: &Kv,
    name: &str,
    policy: RetryPolicy,
) -> Result<Option<Zeroizing<String>>, AzureError> {
    let secrets = &kv.client;
    let r = call_gated(
        &kv.gate,
        Sends::Read,
        policy,
        "cluster material read",
        || async move { secrets.get_secret(name, None).await?.into_model() },
    )
    .await;
    match r {
        Ok(s) => Ok(s.value.map(Zeroizing::new)),
        Err(e) if e.is(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`read`] where this node reads that secret (`Some` client), else nothing.
async fn read_if(
    secrets: Option<&Kv>,
    name: &str,
    policy: RetryPolicy,
) -> Result<Option<Zeroizing<String>>, AzureError> {
    match secrets {
        Some(c) => read(c, name, policy).await,
        None => Ok(None),
    }
}

/// A value already read, else read again (see [`read_all`]).
async fn again(
    found: Option<Zeroizing<String>>,
    secrets: Option<&Kv>,
    name: &str,
    policy: RetryPolicy,
) -> Result<Option<Zeroizing<String>>, AzureError> {
    match found {
        Some(v) => Ok(Some(v)),
        None => read_if(secrets, name, policy).await,
    }
}

/// One secrets client per vault, for every read of one fetch.
pub struct Clients {
    shared: Kv,
    servers: Option<Kv>,
}

impl Clients {
    pub fn new(az: &Azure, vaults: &Vaults) -> Result<Self, AzureError> {
        Ok(Clients {
            shared: Kv::new(az, &vaults.shared)?,
            servers: vaults
                .servers
                .as_deref()
                .map(|v| Kv::new(az, v))
                .transpose()?,
        })
    }
}

/// One secret written through a client kept for the whole fetch (see [`read`]).
async fn write(kv: &Kv, name: &str, value: &str, policy: RetryPolicy) -> Result<(), AzureError> {
    let secrets = &kv.client;
    call_gated(
        &kv.gate,
        Sends::Write,
        policy,
        "cluster material write",
        || {
            let params = SetSecretParameters {
                value: Some(value.to_string()),
                ..Default::default()
            };
            async move {
                let body: RequestContent<SetSecretParameters> = params.try_into()?;
                secrets.set_secret(name, body, None).await.map(|_| ())
            }
        },
    )
    .await
}

async fn set(
    az: &Azure,
    vault: &str,
    name: &str,
    value: &str,
    policy: RetryPolicy,
) -> Result<(), AzureError> {
    write(&Kv::new(az, vault)?, name, value, policy).await
}

/// What a creation-complete check found: the sentinel decides ([`Names::ca_cert`], written last).
#[derive(Debug, PartialEq, Eq)]
pub enum Completeness {
    /// No CA certificate: the material was never created (or its creation never finished).
    NotCreated,
    /// The CA certificate and everything this node reads beside it.
    Complete,
    /// The CA certificate, without these server-only secrets: an older layout, to migrate.
    MigrationRequired(Vec<String>),
    /// The CA certificate, without these shared secrets (written before it by every creator).
    Incomplete(Vec<String>),
}

/// Judges what was found: the names of the secrets present, from the shared and (server tiers) servers
/// vaults. `servers`: whether this node reads the servers vault.
pub fn completeness(n: &Names, present: &dyn Fn(&str) -> bool, servers: bool) -> Completeness {
    if !present(&n.ca_cert) {
        return Completeness::NotCreated;
    }
    if servers {
        let missing: Vec<String> = n
            .servers()
            .iter()
            .filter(|s| !present(s))
            .map(|s| s.to_string())
            .collect();
        if !missing.is_empty() {
            return Completeness::MigrationRequired(missing);
        }
    }
    if !present(&n.consul_gossip_key) {
        return Completeness::Incomplete(vec![n.consul_gossip_key.clone()]);
    }
    Completeness::Complete
}

/// Every secret this node reads: the CA certificate (the sentinel) alone, then the rest all at once over one
/// client per vault (two round trips' time, not one per secret).
async fn read_all(
    clients: &Clients,
    vaults: &Vaults,
    cluster: &str,
    policy: RetryPolicy,
) -> Result<Option<ClusterMaterial>, MaterialError> {
    let n = names(cluster);
    let shared = &clients.shared;
    let servers = clients.servers.as_ref();
    let client_vault = vaults.nomad_client.then_some(shared);
    let nomad_token_vault = vaults.nomad_consul_token.then_some(shared);
    let agent_token = crate::names::agent_token_secret(cluster);
    let nomad_token = crate::names::nomad_token_secret(cluster);
    // The sentinel alone first: one request answers the shared vault's challenge (the client keeps it for the
    // reads after it, instead of one challenge per concurrent read), finds a throttled vault (its gate then
    // holds the rest), and, while the material does not exist yet, is the whole look.
    let Some(cert) = read(shared, &n.ca_cert, policy).await? else {
        return Ok(None);
    };
    let (consul, ca_key, nomad_gossip_key, client_cert, client_key, token, nomad_token) = tokio::try_join!(
        read(shared, &n.consul_gossip_key, policy),
        read_if(servers, &n.ca_key, policy),
        read_if(servers, &n.nomad_gossip_key, policy),
        read_if(client_vault, &n.nomad_client_cert, policy),
        read_if(client_vault, &n.nomad_client_key, policy),
        read(shared, &agent_token, policy),
        read_if(nomad_token_vault, &nomad_token, policy),
    )?;
    // The CA certificate is written last: a reader that sees it sees them all — once it has seen it. Read at
    // once, a secret written just before it may have been looked for just before it was written (a creator in
    // the middle of its writes): what is missing beside the certificate is read again, now.
    let (consul, ca_key, nomad_gossip_key, client_cert, client_key) = tokio::try_join!(
        again(consul, Some(shared), &n.consul_gossip_key, policy),
        again(ca_key, servers, &n.ca_key, policy),
        again(nomad_gossip_key, servers, &n.nomad_gossip_key, policy),
        again(client_cert, client_vault, &n.nomad_client_cert, policy),
        again(client_key, client_vault, &n.nomad_client_key, policy),
    )?;
    let found = |name: &str| {
        name == n.ca_cert
            || (name == n.consul_gossip_key && consul.is_some())
            || (name == n.ca_key && ca_key.is_some())
            || (name == n.nomad_gossip_key && nomad_gossip_key.is_some())
    };
    match completeness(&n, &found, vaults.servers.is_some()) {
        Completeness::Complete => {}
        Completeness::NotCreated => return Ok(None),
        Completeness::MigrationRequired(missing) => {
            return Err(MaterialError::MigrationRequired {
                cert: n.ca_cert.clone(),
                missing: missing.join(" and "),
            })
        }
        Completeness::Incomplete(missing) => {
            return Err(MaterialError::Invalid(format!(
                "the CA certificate exists without {}",
                missing.join(", ")
            )))
        }
    }
    let consul = consul.expect("complete");
    let nomad_client = match (client_cert, client_key) {
        (Some(c), Some(k)) => Some((c.to_string(), k)),
        _ => None,
    };
    Ok(Some(ClusterMaterial {
        ca_cert: cert.to_string(),
        ca_key,
        consul_gossip_key: consul,
        nomad_gossip_key,
        nomad_client,
        consul_agent_token: token,
        consul_nomad_token: nomad_token,
    }))
}

async fn get_nomad_token(
    clients: &Clients,
    cluster: &str,
    policy: RetryPolicy,
) -> Result<Option<Zeroizing<String>>, AzureError> {
    read(
        &clients.shared,
        &crate::names::nomad_token_secret(cluster),
        policy,
    )
    .await
}

fn gossip_key() -> Zeroizing<String> {
    let mut b = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(&mut b[..]).expect("system RNG");
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&b[..]))
}

/// The first pause between looks for the cluster material: a creator that holds the lease usually finishes
/// within a few hundred milliseconds, and a node that waits a whole second for it waits for nothing.
pub const MATERIAL_POLL_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between looks for the cluster material (the pace of a node that boots long before any
/// server tier: docs/PERFORMANCE.md#at-scale).
pub const MATERIAL_POLL_MAX: Duration = Duration::from_secs(1);

/// How long the few ([`Pace::Few`]) look for the cluster material every [`MATERIAL_POLL_FIRST`]: the material's
/// creator, a server booted with them, usually writes it within a second.
pub const MATERIAL_FEW_FAST: Duration = Duration::from_secs(10);

/// The pause after look number `look` (1-based), `elapsed` into the wait, for the cluster material found none:
/// for the few ([`Pace::Few`]) [`MATERIAL_POLL_FIRST`] during the first [`MATERIAL_FEW_FAST`]; otherwise
/// [`MATERIAL_POLL_FIRST`] doubled after each look up to [`MATERIAL_POLL_MAX`] (0.1, 0.2, 0.4, 0.8, 1, 1, … s);
/// plus up to a quarter more by `jitter` in [0, 1) so that nodes booted together do not look together.
/// A server that had just missed the material used to wait 0.4–0.8 s for its next look, on the bootstrap's
/// critical path (the Nomad tier's leader came ~0.3 s later with the agents than without).
pub fn material_pause(look: u32, jitter: f64, elapsed: Duration, pace: Pace) -> Duration {
    let base = if pace == Pace::Few && elapsed < MATERIAL_FEW_FAST {
        MATERIAL_POLL_FIRST
    } else {
        let doublings = look.saturating_sub(1).min(16);
        (MATERIAL_POLL_FIRST * 2u32.pow(doublings)).min(MATERIAL_POLL_MAX)
    };
    base + base.mul_f64(jitter.clamp(0.0, 1.0) / 4.0)
}

/// How long a node looks for the Consul agent token at the quick pace (0.5 s): the Consul tier's bootstrap
/// usually hands the token over within this.
pub const AGENT_TOKEN_QUICK: Duration = Duration::from_secs(30);
/// The pause between looks after that: a fleet of workers booted before the Consul tier was bootstrapped must
/// not flood the shared vault the tier's leader writes the token to (docs/PERFORMANCE.md#at-scale).
pub const AGENT_TOKEN_SLOW: Duration = Duration::from_secs(8);
/// How long a server-tier node looks at the fastest pace (every [`AGENT_TOKEN_SERVER_EVERY`]): the servers boot
/// together with the Consul tier, whose bootstrap hands the token over a few seconds later.
pub const AGENT_TOKEN_SERVER_FAST: Duration = Duration::from_secs(10);
/// The fastest pace, for the few ([`Pace::Few`]). At most 3 tiers of 7 servers and a jumpbox look this often,
/// for at most [`AGENT_TOKEN_SERVER_FAST`]: ≤ 220 reads a second, about half of Key Vault's 4,000 per 10 s per
/// vault.
pub const AGENT_TOKEN_SERVER_EVERY: Duration = Duration::from_millis(100);

/// Who waits (for the cluster material, for the agent token), which sets the pace of its looks
/// ([`material_pause`], [`agent_token_pause`]). The few's quick looks (≤ 22 nodes, ~10 a second each, for at most
/// 10 s, one read per look) stay under ~220 reads a second on the shared vault, whichever they wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// A server-tier node or the jumpbox: a bounded few (≤ 7 per tier, one jumpbox), booted with the cluster, whose
    /// wait is on the bootstrap's critical path.
    Few,
    /// A worker: possibly thousands, so never faster than 0.5 s.
    Fleet,
}

impl Pace {
    pub fn of(role: crate::node::Role) -> Pace {
        if role.is_server_tier() || role == crate::node::Role::Jumpbox {
            Pace::Few
        } else {
            Pace::Fleet
        }
    }
}

/// The pause after a look for the agent token that found none, `elapsed` into the wait: for the few (servers, jumpbox)
/// 0.1 s during the first [`AGENT_TOKEN_SERVER_FAST`]; then (and for workers from the start) 0.5 s
/// during the first `quick`; then [`AGENT_TOKEN_SLOW`].
pub fn agent_token_pause(elapsed: Duration, quick: Duration, pace: Pace) -> Duration {
    if pace == Pace::Few && elapsed < AGENT_TOKEN_SERVER_FAST.min(quick) {
        AGENT_TOKEN_SERVER_EVERY
    } else if elapsed < quick {
        Duration::from_millis(500)
    } else {
        AGENT_TOKEN_SLOW
    }
}

/// Who may create the cluster material when Key Vault has none: a server-tier node, under the `material` lease
/// in the cluster's storage account (and only with the servers vault, where the CA key goes).
#[derive(Debug, Clone, Copy)]
pub struct Creator<'a> {
    pub blob_endpoint: &'a str,
    pub lease_secs: i32,
}

/// Whether a fetch also waits for the Consul agent token (handed over by the Consul tier's bootstrap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentToken {
    /// Take it if it is there; a node without it still renders and starts what does not need it.
    IfPresent,
    /// Wait for it within the deadline (a Consul agent that cannot start without it), looking at this pace.
    Wait(Pace),
}

/// One fetch of the cluster material: where from, who may create it, and how long to wait.
pub struct Fetch<'a> {
    pub az: &'a Azure,
    pub vaults: &'a Vaults,
    pub cluster: &'a str,
    /// `Some` on server tiers: this node may create the material.
    pub creator: Option<Creator<'a>>,
    pub agent_token: AgentToken,
    /// The pace of the looks for material that does not exist yet.
    pub pace: Pace,
    /// Each Key Vault call's retry policy.
    pub policy: RetryPolicy,
    /// The whole fetch's deadline (material, then the agent token).
    pub deadline: Duration,
}

impl Fetch<'_> {
    /// Reads the cluster material, creating it first if this node may and nobody has.
    pub async fn run(&self) -> Result<ClusterMaterial, MaterialError> {
        let start = Instant::now();
        let clients = Clients::new(self.az, self.vaults)?;
        let mut m = self.material(&clients, self.deadline).await?;
        let waits = match self.agent_token {
            AgentToken::Wait(pace) if m.consul_agent_token.is_none() => Some(pace),
            _ => None,
        };
        if let Some(pace) = waits {
            let left = self.deadline.saturating_sub(start.elapsed());
            m.consul_agent_token = Some(self.agent_token(&clients, left, pace).await?);
            // Handed over before the agent token: present now unless its creation failed (the Consul tier's
            // state says so) or an older agent bootstrapped the cluster.
            if self.vaults.nomad_consul_token && m.consul_nomad_token.is_none() {
                m.consul_nomad_token = get_nomad_token(&clients, self.cluster, self.policy).await?;
            }
        }
        Ok(m)
    }

    /// The material, looked for within `left`: quickly at first, then every second ([`material_pause`]).
    async fn material(
        &self,
        clients: &Clients,
        left: Duration,
    ) -> Result<ClusterMaterial, MaterialError> {
        // Each look may create the material under the lease: never cut short by the poll.
        let start = Instant::now();
        let lock = &election::Lock::new(self.cluster, "material");
        let r = retry(
            RetryPolicy::poll_whole(left, MATERIAL_POLL_FIRST),
            |attempt| async move {
                match look(self, clients, lock).await {
                    Ok(Some(m)) => Attempt::Done(m),
                    Ok(None) => {
                        if attempt == 1 {
                            tracing::info!(
                                cluster = self.cluster,
                                "waiting for the cluster material in Key Vault"
                            );
                        }
                        Attempt::RetryAfter(
                            Wait::NotYet,
                            material_pause(
                                attempt,
                                rand::random::<f64>(),
                                start.elapsed(),
                                self.pace,
                            ),
                        )
                    }
                    Err(e) => Attempt::Fail(Wait::Failed(e)),
                }
            },
        )
        .await;
        match r {
            Ok(m) => Ok(m),
            Err(RetryError::Final(Wait::Failed(e))) => Err(e),
            Err(_) => Err(MaterialError::Timeout(self.deadline)),
        }
    }

    /// The Consul agent token, looked for every 500 ms within `left`.
    async fn agent_token(
        &self,
        clients: &Clients,
        left: Duration,
        pace: Pace,
    ) -> Result<Zeroizing<String>, MaterialError> {
        let name = crate::names::agent_token_secret(self.cluster);
        tracing::info!(
            cluster = self.cluster,
            "waiting for the Consul agent token in Key Vault"
        );
        // Each look is a whole Key Vault read under its own retry policy: never cut short by the poll. Quick at
        // first, slow after AGENT_TOKEN_QUICK (agent_token_pause).
        let start = std::time::Instant::now();
        let every = agent_token_pause(Duration::ZERO, AGENT_TOKEN_QUICK, pace);
        let r = retry(RetryPolicy::poll_whole(left, every), |_| async {
            match read(&clients.shared, &name, self.policy).await {
                Ok(Some(t)) => Attempt::Done(t),
                Ok(None) => Attempt::RetryAfter(
                    Wait::NotYet,
                    agent_token_pause(start.elapsed(), AGENT_TOKEN_QUICK, pace),
                ),
                Err(e) => Attempt::Fail(Wait::Failed(e.into())),
            }
        })
        .await;
        match r {
            Ok(t) => Ok(t),
            Err(RetryError::Final(Wait::Failed(e))) => Err(e),
            Err(_) => Err(MaterialError::NoAgentToken(self.deadline)),
        }
    }
}

/// One look for the cluster material: what Key Vault holds, else (a node that may create it, holding the
/// `material` lease) the material it creates; `None` while another node creates it.
async fn look(
    f: &Fetch<'_>,
    clients: &Clients,
    lock: &election::Lock,
) -> Result<Option<ClusterMaterial>, MaterialError> {
    let (az, vaults, cluster, policy) = (f.az, f.vaults, f.cluster, f.policy);
    if let Some(m) = read_all(clients, vaults, cluster, policy).await? {
        return Ok(Some(m));
    }
    if let (Some(c), Some(_)) = (f.creator, &vaults.servers) {
        if let Some(lead) = lock
            .try_acquire(az, c.blob_endpoint, policy, c.lease_secs)
            .await?
        {
            // Re-check under the lease: the previous holder may have just finished.
            let r = match read_all(clients, vaults, cluster, policy).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => create(clients, &lead, vaults, cluster, policy).await,
                Err(e) => Err(e),
            };
            lead.release().await;
            return r.map(Some);
        }
    }
    Ok(None)
}

/// Why a look for material or a token did not finish: not there yet, or a final error.
#[derive(Debug)]
enum Wait {
    NotYet,
    Failed(MaterialError),
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::NotYet => f.write_str("not in Key Vault yet"),
            Wait::Failed(e) => e.fmt(f),
        }
    }
}

impl TimeoutError for Wait {
    fn timeout(_: Duration) -> Self {
        Wait::NotYet
    }
}

async fn create(
    clients: &Clients,
    lead: &election::Leadership,
    vaults: &Vaults,
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
        consul_nomad_token: None,
    };
    let n = names(cluster);
    let (Some(ca_key), Some(nomad), Some((client_cert, client_key))) =
        (&m.ca_key, &m.nomad_gossip_key, &m.nomad_client)
    else {
        unreachable!("just built");
    };
    let shared = &clients.shared;
    let Some(servers) = clients.servers.as_ref() else {
        return Err(MaterialError::Invalid(
            "no servers vault to create the CA key in".into(),
        ));
    };
    // Over the fetch's own clients (one per vault: its challenge answered and its connections kept). In three
    // steps, each only while this node's lease clock says it still holds the material lease: every secret
    // that stands for nothing else, at once; the Nomad client certificate (it stands for its key, written
    // before it); the shared CA certificate last (the readers' sentinel).
    let first: [(&Kv, &str, &str); 4] = [
        (servers, n.ca_key.as_str(), ca_key.as_str()),
        (servers, n.nomad_gossip_key.as_str(), nomad.as_str()),
        (shared, n.nomad_client_key.as_str(), client_key.as_str()),
        (
            shared,
            n.consul_gossip_key.as_str(),
            m.consul_gossip_key.as_str(),
        ),
    ];
    lead.check()?;
    let [a, b, c, d] = first.map(|(client, name, value)| write(client, name, value, policy));
    tokio::try_join!(a, b, c, d)?;
    lead.check()?;
    write(shared, &n.nomad_client_cert, client_cert, policy).await?;
    lead.check()?;
    // Create-only for the sentinel: another creator that finished wins, and this one's earlier writes are not
    // used (the sentinel's pair is checked when loaded).
    if read(shared, &n.ca_cert, policy).await?.is_some() {
        tracing::warn!(
            cluster,
            "another node created the cluster material meanwhile; using it"
        );
        return read_all(clients, vaults, cluster, policy)
            .await?
            .ok_or_else(|| MaterialError::Invalid("the material vanished".into()));
    }
    lead.check()?;
    write(shared, &n.ca_cert, &m.ca_cert, policy).await?;
    // Read back, all at once: every secret must be this creation's. Not the Nomad client key: only workers
    // ever read it (tests/tests/workers.rs); its certificate, written after it and read back here, stands for
    // the pair.
    let back: [(&Kv, &str, &str); 5] = [
        first[0],
        first[1],
        first[3],
        (shared, n.nomad_client_cert.as_str(), client_cert.as_str()),
        (shared, n.ca_cert.as_str(), m.ca_cert.as_str()),
    ];
    let [a, b, c, d, e] = back.map(|(client, name, _)| read(client, name, policy));
    let found = tokio::try_join!(a, b, c, d, e)?;
    let found = [found.0, found.1, found.2, found.3, found.4];
    let overwritten: Vec<String> = back
        .iter()
        .zip(&found)
        .filter(|((_, _, value), got)| got.as_deref().map(|v| v.as_str()) != Some(*value))
        .map(|((_, name, _), _)| name.to_string())
        .collect();
    if !overwritten.is_empty() {
        return Err(MaterialError::Conflict {
            names: overwritten.join(", "),
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(present: &[&str], servers: bool) -> Completeness {
        let n = names("c1");
        let set: Vec<String> = present.iter().map(|s| s.to_string()).collect();
        completeness(&n, &|name: &str| set.iter().any(|s| s == name), servers)
    }

    /// A node waiting for the agent token slows down after the quick phase: with a 1 s quick phase, a 4 s wait
    /// looks at 0, 0.5 and 1 s and then not before 9 s, where a fixed 0.5 s poll looked 8 times.
    #[tokio::test]
    async fn the_wait_for_the_agent_token_slows_down() {
        let fleet = Pace::Fleet;
        assert_eq!(
            agent_token_pause(Duration::ZERO, AGENT_TOKEN_QUICK, fleet),
            Duration::from_millis(500)
        );
        assert_eq!(
            agent_token_pause(Duration::from_secs(29), AGENT_TOKEN_QUICK, fleet),
            Duration::from_millis(500)
        );
        assert_eq!(
            agent_token_pause(Duration::from_secs(30), AGENT_TOKEN_QUICK, fleet),
            AGENT_TOKEN_SLOW
        );
        let looks = std::sync::atomic::AtomicU32::new(0);
        let start = std::time::Instant::now();
        let r: Result<(), _> = retry(
            RetryPolicy::poll_whole(Duration::from_secs(4), Duration::from_millis(500)),
            |_| async {
                looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Attempt::RetryAfter(
                    Wait::NotYet,
                    agent_token_pause(start.elapsed(), Duration::from_secs(1), Pace::Fleet),
                )
            },
        )
        .await;
        assert!(r.is_err());
        let n = looks.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=3).contains(&n), "{n} looks in 4 s");
    }

    /// A server-tier node (and the jumpbox) waits for the token on the bootstrap's critical path: it looks every
    /// 0.1 s for the first 10 s (the Consul tier hands the token over a few seconds after the servers boot), then
    /// at the fleet's pace. Workers never look faster than every 0.5 s.
    #[test]
    fn servers_look_for_the_agent_token_quickly_at_first_and_the_fleet_never_does() {
        assert_eq!(Pace::of(crate::node::Role::VaultServer), Pace::Few);
        assert_eq!(Pace::of(crate::node::Role::NomadServer), Pace::Few);
        assert_eq!(Pace::of(crate::node::Role::Jumpbox), Pace::Few);
        assert_eq!(Pace::of(crate::node::Role::Worker), Pace::Fleet);
        let server =
            |s: f64| agent_token_pause(Duration::from_secs_f64(s), AGENT_TOKEN_QUICK, Pace::Few);
        assert_eq!(server(0.0), Duration::from_millis(100));
        assert_eq!(server(9.9), Duration::from_millis(100));
        assert_eq!(server(10.0), Duration::from_millis(500));
        assert_eq!(server(29.9), Duration::from_millis(500));
        assert_eq!(server(30.0), AGENT_TOKEN_SLOW);
        // A quick phase shorter than the fast one bounds it too.
        assert_eq!(
            agent_token_pause(Duration::from_secs(2), Duration::from_secs(1), Pace::Few),
            AGENT_TOKEN_SLOW
        );
        let fleet_fastest = (0..600)
            .map(|t| {
                agent_token_pause(
                    Duration::from_millis(t * 100),
                    AGENT_TOKEN_QUICK,
                    Pace::Fleet,
                )
            })
            .min()
            .unwrap();
        assert_eq!(fleet_fastest, Duration::from_millis(500));
    }

    /// Servers and the jumpbox (the few) look for the material every 0.1 s (+ up to a quarter) for their first 10 s,
    /// then back off like everyone; workers (the fleet) back off from the first look.
    #[test]
    fn servers_look_for_the_material_quickly_at_first_and_workers_back_off() {
        let ms = |look, elapsed: u64, pace| {
            material_pause(look, 0.0, Duration::from_millis(elapsed), pace).as_millis() as u64
        };
        let few: Vec<u64> = (1..=6)
            .map(|l| ms(l, 100 * u64::from(l), Pace::Few))
            .collect();
        assert_eq!(few, [100; 6]);
        assert_eq!(ms(90, 9_900, Pace::Few), 100);
        assert_eq!(
            ms(91, 10_000, Pace::Few),
            1000,
            "after 10 s: the backed-off pace"
        );
        let fleet: Vec<u64> = (1..=6).map(|l| ms(l, 0, Pace::Fleet)).collect();
        assert_eq!(fleet, [100, 200, 400, 800, 1000, 1000]);
        let jittered = material_pause(3, 0.999_999, Duration::from_secs(1), Pace::Few);
        assert!(jittered < Duration::from_millis(125) && jittered > Duration::from_millis(124));
    }

    /// A node waiting for the cluster material looks again after 0.1 s, then 0.2, 0.4, 0.8 and 1 s (with up to
    /// a quarter more jitter), where it used to wait a whole second from the first look.
    #[test]
    fn the_wait_for_the_material_starts_quick_and_backs_off_to_a_second() {
        let ms = |look, jitter| {
            material_pause(look, jitter, Duration::ZERO, Pace::Fleet).as_millis() as u64
        };
        let without: Vec<u64> = (1..=7).map(|l| ms(l, 0.0)).collect();
        assert_eq!(without, [100, 200, 400, 800, 1000, 1000, 1000]);
        let most: Vec<u64> = (1..=7).map(|l| ms(l, 0.999_999)).collect();
        assert_eq!(most, [124, 249, 499, 999, 1249, 1249, 1249]);
        assert_eq!(ms(u32::MAX, 0.0), 1000);
        // Looks in the first 1.5 s of a wait (before jitter): at 0, 0.1, 0.3, 0.7 and 1.5 s.
        let mut at = Duration::ZERO;
        let mut looks = vec![0];
        for look in 1.. {
            at += material_pause(look, 0.0, Duration::ZERO, Pace::Fleet);
            if at > Duration::from_millis(1500) {
                break;
            }
            looks.push(at.as_millis() as u64);
        }
        assert_eq!(looks, [0, 100, 300, 700, 1500]);
    }

    #[test]
    fn without_the_ca_certificate_the_material_was_never_created() {
        assert_eq!(judge(&[], true), Completeness::NotCreated);
        // A creator that died before its last write: its partial secrets are written over by the next.
        assert_eq!(
            judge(&["c1-cluster-ca-key", "c1-nomad-gossip-key"], true),
            Completeness::NotCreated
        );
    }

    #[test]
    fn a_ca_certificate_without_the_server_only_secrets_requires_a_migration() {
        // The layout before the vault split: everything in the shared vault, nothing in the servers vault.
        assert_eq!(
            judge(&["c1-cluster-ca-cert", "c1-consul-gossip-key"], true),
            Completeness::MigrationRequired(vec![
                "c1-cluster-ca-key".into(),
                "c1-nomad-gossip-key".into()
            ])
        );
        assert_eq!(
            judge(
                &[
                    "c1-cluster-ca-cert",
                    "c1-consul-gossip-key",
                    "c1-cluster-ca-key"
                ],
                true
            ),
            Completeness::MigrationRequired(vec!["c1-nomad-gossip-key".into()])
        );
        // Workers and the jumpbox never read the servers vault: the shared secrets are all they need.
        assert_eq!(
            judge(&["c1-cluster-ca-cert", "c1-consul-gossip-key"], false),
            Completeness::Complete
        );
    }

    #[test]
    fn complete_and_incomplete_material() {
        let all = [
            "c1-cluster-ca-cert",
            "c1-consul-gossip-key",
            "c1-cluster-ca-key",
            "c1-nomad-gossip-key",
        ];
        assert_eq!(judge(&all, true), Completeness::Complete);
        assert_eq!(
            judge(&all[..1], false),
            Completeness::Incomplete(vec!["c1-consul-gossip-key".into()])
        );
    }

    #[test]
    fn the_migration_stop_is_one_line_naming_both_vaults_and_the_procedure() {
        let e = MaterialError::MigrationRequired {
            cert: "c1-cluster-ca-cert".into(),
            missing: "c1-cluster-ca-key and c1-nomad-gossip-key".into(),
        }
        .to_string();
        assert!(e.contains("migration required"), "{e}");
        assert!(
            e.contains("shared vault") && e.contains("servers vault"),
            "{e}"
        );
        assert!(e.contains("docs/bootstrap.md#migration-required"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
