//! Collection: reads the coordination container (tier states, published node records) with the node's managed
//! identity, the status tokens from the status Key Vault (jumpbox-readable only), and the products' HTTPS APIs trusting the cluster CA.
//! Every call has a deadline ([`HTTP_TIMEOUT`], [`azure_policy`]) and independent calls run concurrently, so a
//! dead server costs at most a few seconds and never hangs the command.

mod consul;
mod nomad;
mod vault;

use consul::collect_consul;
use nomad::collect_nomad;
use vault::collect_vault;

use super::model::*;
use super::tokens;
use crate::azure::Azure;
use crate::config::AgentConfig;
use crate::coordination;
use crate::election::COORDINATION_CONTAINER;
use crate::identity::ImdsCredential;
use crate::imds::ImdsClient;
use crate::node::NodeSpec;
use crate::publish::{self, NodeRecord};
use crate::render::Layout;
use crate::retry::RetryPolicy;
use crate::tls::HttpsClientError;
use crate::version::Product;
use azure_core::credentials::TokenCredential;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Per-request deadline for the products' APIs.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// Ports of the products' HTTPS APIs.
pub const CONSUL_PORT: u16 = crate::render::consul::HTTPS_PORT;
pub const VAULT_PORT: u16 = crate::render::vault::API_PORT;
pub const NOMAD_PORT: u16 = crate::render::nomad::HTTP_PORT;
/// Upper bound of one whole collection (each part has its own, shorter deadlines).
pub const COLLECT_DEADLINE: Duration = Duration::from_secs(20);

/// Deadline for each Azure call (retries included).
pub fn azure_policy() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(3),
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
    }
}

/// Why collection could not ask a question, or got no usable answer. Carries no token and no response body beyond
/// a product's first error line (short and secret-free: "ACL not found", "permission denied").
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("instance metadata: {0}")]
    Metadata(#[from] crate::retry::RetryError<crate::imds::ImdsError>),
    /// The observer's own tags.
    #[error("{0}")]
    Spec(#[from] crate::node::SpecError),
    /// The Azure clients (the extra CA file of the agent config).
    #[error("{0}")]
    AzureClient(#[from] HttpsClientError),
    /// The products' client: the cluster CA is not on this machine.
    #[error("cluster CA: {0} (status runs on a booted node: the jumpbox)")]
    ClusterCa(Arc<HttpsClientError>),
    #[error("managed identity token: no answer within 5s")]
    TokenTimeout,
    #[error("{0}")]
    Token(azure_core::Error),
    #[error("list node records: {0}")]
    List(Transport),
    #[error("list node records: HTTP {0}")]
    ListStatus(u16),
    #[error("node records: {0}")]
    Records(Box<CollectError>),
    /// A product API call that got no answer.
    #[error("{0}")]
    Transport(Transport),
    /// A refusal or an error status, with the first line of the product's error text.
    #[error("HTTP {status}{}", hint.as_deref().map(|h| format!(": {h}")).unwrap_or_default())]
    Status { status: u16, hint: Option<String> },
    /// serde names the missing or mistyped field; the bodies parsed here hold no secrets.
    #[error("{path} (HTTP {status}): response did not parse: {source}")]
    Unparsable {
        path: String,
        status: u16,
        source: serde_json::Error,
    },
}

/// A request that got no answer, in the fewest words.
#[derive(Debug, thiserror::Error)]
pub enum Transport {
    #[error("no answer within {:?}", HTTP_TIMEOUT)]
    Timeout,
    /// The innermost cause says it best ("Connection refused", "No route to host").
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Failed(String),
}

impl From<CollectError> for NoAnswer {
    fn from(e: CollectError) -> Self {
        NoAnswer::of(&e)
    }
}

/// What the observer (normally the jumpbox) needs to look at its cluster.
pub struct Collector {
    spec: NodeSpec,
    az: Azure,
    credential: Arc<ImdsCredential>,
    /// For listing blobs (the SDK's pager needs a stream library the agent does not carry).
    azure_http: reqwest::Client,
    /// For the products' APIs: trusts only the cluster CA.
    http: Result<reqwest::Client, Arc<HttpsClientError>>,
    consul_token: Option<Zeroizing<String>>,
    vault_token: Option<Zeroizing<String>>,
    nomad_token: Option<Zeroizing<String>>,
    vault_renewed: bool,
}

fn short(e: &reqwest::Error) -> Transport {
    let timeout = e.is_timeout();
    let connect = e.is_connect();
    let mut src: &dyn std::error::Error = e;
    while let Some(s) = src.source() {
        src = s;
    }
    if timeout {
        Transport::Timeout
    } else if connect {
        let text = src.to_string();
        let text = match text.find(" (os error") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        Transport::Connect(text)
    } else {
        Transport::Failed(src.to_string())
    }
}

impl Collector {
    /// Identifies the observer from its metadata (deadline 5 s) and prepares the clients.
    pub async fn new(cfg: &AgentConfig) -> Result<Collector, CollectError> {
        let quick = RetryPolicy::imds(Duration::from_secs(5));
        let md = ImdsClient::new(&cfg.imds.endpoint, quick)
            .instance()
            .await?;
        let spec = NodeSpec::from_metadata(&md)?;
        crate::node::check_endpoints(&spec, &md.compute.az_environment, cfg.azure.endpoints)?;
        let credential = Arc::new(ImdsCredential::new(
            ImdsClient::new(&cfg.imds.endpoint, quick),
            spec.identity_client_id.clone(),
        ));
        let az = Azure::new(
            credential.clone(),
            cfg.azure.extra_ca_file.as_deref(),
            cfg.azure.verify_challenge_resource,
        )?;
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(4));
        if let Some(path) = &cfg.azure.extra_ca_file {
            b = b.add_root_certificate(crate::tls::ca_certificate(path)?);
        }
        let azure_http = b.build().map_err(HttpsClientError::Build)?;
        // The jumpbox's world-readable copy (operators run status without sudo); elsewhere, as root, Consul's.
        let layout = Layout::from_paths(&cfg.paths);
        let ca = [layout.operator_ca_file(), layout.ca_file(Product::Consul)]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| layout.operator_ca_file());
        let http = crate::services::health::client_for(&ca, HTTP_TIMEOUT).map_err(Arc::new);
        Ok(Collector {
            spec,
            az,
            credential,
            azure_http,
            http,
            consul_token: None,
            vault_token: None,
            nomad_token: None,
            vault_renewed: false,
        })
    }

    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// One full look at the cluster, bounded by [`COLLECT_DEADLINE`].
    pub async fn collect(&mut self) -> Observations {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut o = Observations {
            cluster: self.spec.cluster.clone(),
            observer: self.spec.node_name.clone(),
            observed_unix: now,
            ..Default::default()
        };
        if tokio::time::timeout(COLLECT_DEADLINE, self.collect_into(&mut o))
            .await
            .is_err()
        {
            o.records_error.get_or_insert_with(|| {
                format!("collection did not finish within {COLLECT_DEADLINE:?}")
            });
        }
        o
    }

    async fn collect_into(&mut self, o: &mut Observations) {
        // 1. Azure: tier states, node records, status tokens — all at once.
        let (states, records, tokens, snapshots) = tokio::join!(
            self.tier_states(),
            self.records(),
            self.tokens(),
            self.snapshot_records()
        );
        (o.consul.state, o.vault.state, o.nomad.state) = states;
        o.snapshots = snapshots;
        match records {
            Ok((r, unreadable)) => {
                o.records = r;
                if !unreadable.is_empty() {
                    o.records_error =
                        Some(format!("unreadable records: {}", unreadable.join(", ")));
                }
            }
            Err(e) => o.records_error = Some(e.to_string()),
        }
        let [c, v, n] = tokens;
        for (slot, value) in [
            (&mut self.consul_token, c.1),
            (&mut self.vault_token, v.1),
            (&mut self.nomad_token, n.1),
        ] {
            if value.is_some() {
                *slot = value;
            }
        }
        (o.consul.token, o.vault.token, o.nomad.token) = (c.0, v.0, n.0);

        // 2. The products, each tier at once.
        let http = match &self.http {
            Ok(h) => h.clone(),
            Err(e) => {
                let e = NoAnswer::from(CollectError::ClusterCa(e.clone()));
                o.consul.leader = Some(Err(e.clone()));
                o.vault.health = servers_of(&o.records, "vault-server", VAULT_PORT)
                    .into_iter()
                    .map(|(name, address)| Probed {
                        name,
                        address,
                        answer: Some(Err(e.clone())),
                    })
                    .collect();
                return;
            }
        };
        let consul_servers = servers_of(&o.records, "consul-server", CONSUL_PORT);
        let vault_servers = servers_of(&o.records, "vault-server", VAULT_PORT);
        let nomad_servers = servers_of(&o.records, "nomad-server", NOMAD_PORT);
        let local = format!("{}:{CONSUL_PORT}", self.spec.ip);
        let consul_token = self.consul_token.clone();
        let vault_token = self.vault_token.clone();
        let nomad_token = self.nomad_token.clone();
        let renew = !self.vault_renewed && vault_token.is_some();
        let (consul, vault, nomad) = tokio::join!(
            collect_consul(
                &http,
                &local,
                &consul_servers,
                consul_token.as_deref().map(|s| s.as_str()),
                &o.records
            ),
            collect_vault(
                &http,
                &vault_servers,
                vault_token.as_deref().map(|s| s.as_str()),
                renew
            ),
            collect_nomad(
                &http,
                &nomad_servers,
                nomad_token.as_deref().map(|s| s.as_str())
            ),
        );
        if renew {
            self.vault_renewed = true;
        }
        let (state, token) = (o.consul.state.take(), o.consul.token.clone());
        o.consul = ConsulObs {
            state,
            token,
            ..consul
        };
        let (state, token) = (o.vault.state.take(), o.vault.token.clone());
        o.vault = VaultObs {
            state,
            token,
            ..vault
        };
        let (state, token) = (o.nomad.state.take(), o.nomad.token.clone());
        o.nomad = NomadObs {
            state,
            token,
            ..nomad
        };
    }

    async fn tier_states(
        &self,
    ) -> (
        Got<Option<coordination::TierState>>,
        Got<Option<coordination::TierState>>,
        Got<Option<coordination::TierState>>,
    ) {
        let blob = self.spec.blob_endpoint.as_str();
        let read = |tier: &'static str| async move {
            coordination::read(&self.az, blob, &self.spec.cluster, tier, azure_policy())
                .await
                .map_err(|e| NoAnswer::of(&e))
        };
        let (c, v, n) = tokio::join!(read("consul"), read("vault"), read("nomad"));
        (Some(c), Some(v), Some(n))
    }

    /// Each tier's snapshot record (docs/runbooks.md#snapshots).
    async fn snapshot_records(&self) -> BTreeMap<String, Got<Option<crate::snapshot::Record>>> {
        let blob = self.spec.blob_endpoint.as_str();
        let read = |tier: &'static str| async move {
            let r = crate::snapshot::read_record(
                &self.az,
                blob,
                &self.spec.cluster,
                tier,
                azure_policy(),
            )
            .await
            .map_err(|e| NoAnswer::of(&e));
            (tier.to_string(), Some(r))
        };
        let (c, v, n) = tokio::join!(read("consul"), read("vault"), read("nomad"));
        BTreeMap::from([c, v, n])
    }

    async fn storage_token(&self) -> Result<Zeroizing<String>, CollectError> {
        let t = tokio::time::timeout(
            Duration::from_secs(5),
            self.credential
                .get_token(&["https://storage.azure.com/.default"], None),
        )
        .await
        .map_err(|_| CollectError::TokenTimeout)?
        .map_err(CollectError::Token)?;
        Ok(Zeroizing::new(t.token.secret().to_string()))
    }

    /// Lists and reads `<cluster>/nodes/*.json`. Returns the records and the names that did not parse.
    async fn records(&self) -> Result<(Vec<NodeRecord>, Vec<String>), CollectError> {
        let blob = self.spec.blob_endpoint.as_str();
        let token = self.storage_token().await?;
        let container = format!("{blob}{COORDINATION_CONTAINER}");
        let prefix = publish::records_prefix(&self.spec.cluster);
        let mut names = vec![];
        let mut marker: Option<String> = None;
        for _ in 0..50 {
            let mut req = self
                .azure_http
                .get(&container)
                .query(&[
                    ("restype", "container"),
                    ("comp", "list"),
                    ("prefix", prefix.as_str()),
                ])
                .bearer_auth(token.as_str())
                .header("x-ms-version", "2021-12-02");
            if let Some(m) = &marker {
                req = req.query(&[("marker", m.as_str())]);
            }
            let r = req
                .send()
                .await
                .map_err(|e| CollectError::List(short(&e)))?;
            let status = r.status().as_u16();
            if status != 200 {
                return Err(CollectError::ListStatus(status));
            }
            let xml = r.text().await.map_err(|e| CollectError::List(short(&e)))?;
            names.extend(
                xml_values(&xml, "Name")
                    .into_iter()
                    .filter(|n| n.ends_with(".json")),
            );
            marker = xml_values(&xml, "NextMarker")
                .into_iter()
                .find(|m| !m.is_empty());
            if marker.is_none() {
                break;
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for name in names {
            let (http, url, token) = (
                self.azure_http.clone(),
                format!("{container}/{name}"),
                token.clone(),
            );
            set.spawn(async move {
                let r = http
                    .get(url)
                    .bearer_auth(token.as_str())
                    .header("x-ms-version", "2021-12-02")
                    .send()
                    .await;
                let parsed = match r {
                    Ok(r) if r.status().is_success() => r
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<NodeRecord>(&b).ok()),
                    _ => None,
                };
                (name, parsed)
            });
        }
        let mut records = vec![];
        let mut bad = vec![];
        while let Some(j) = set.join_next().await {
            match j {
                Ok((_, Some(r))) => records.push(r),
                Ok((name, None)) => bad.push(name),
                Err(_) => {}
            }
        }
        records.sort_by(|a, b| a.boot.node.cmp(&b.boot.node));
        bad.sort();
        Ok((records, bad))
    }

    /// What `hashistack-agent smoke` needs, found exactly as `status` finds it: the client trusting the cluster CA,
    /// the observer's own Consul agent, the Consul status token (service read), and the Nomad servers of the
    /// published node records.
    pub async fn endpoints(&self) -> Result<Endpoints, CollectError> {
        let http = self.http.clone().map_err(CollectError::ClusterCa)?;
        let consul_token = async {
            match self.spec.status_vault_uri.clone() {
                Some(vault) => {
                    tokens::fetch(&self.az, &vault, tokens::CONSUL_SECRET, azure_policy()).await
                }
                None => (
                    TokenState::Error("this node has no hashistack-status-vault-uri tag".into()),
                    None,
                ),
            }
        };
        let (records, (token_state, consul_token)) = tokio::join!(self.records(), consul_token);
        let (records, _) = records.map_err(|e| CollectError::Records(Box::new(e)))?;
        Ok(Endpoints {
            http,
            consul: format!("{}:{CONSUL_PORT}", self.spec.ip),
            consul_token,
            consul_token_state: token_state,
            nomad: servers_of(&records, "nomad-server", NOMAD_PORT)
                .into_iter()
                .map(|(_, a)| a)
                .collect(),
        })
    }

    /// Fetches the status tokens not yet held (each run until one exists: a bootstrap may finish meanwhile).
    async fn tokens(&self) -> [(TokenState, Option<Zeroizing<String>>); 3] {
        let Some(vault) = self.spec.status_vault_uri.clone() else {
            let e = TokenState::Error("this node has no hashistack-status-vault-uri tag".into());
            return [(e.clone(), None), (e.clone(), None), (e, None)];
        };
        let get = |held: bool, name: &'static str| {
            let (az, vault) = (self.az.clone(), vault.clone());
            async move {
                if held {
                    (TokenState::Present, None)
                } else {
                    tokens::fetch(&az, &vault, name, azure_policy()).await
                }
            }
        };
        let (c, v, n) = tokio::join!(
            get(self.consul_token.is_some(), tokens::CONSUL_SECRET),
            get(self.vault_token.is_some(), tokens::VAULT_SECRET),
            get(self.nomad_token.is_some(), tokens::NOMAD_SECRET),
        );
        [c, v, n]
    }
}

/// Where the cluster's APIs answer, as `status` finds them ([`Collector::endpoints`]).
pub struct Endpoints {
    /// HTTPS client trusting only the cluster CA (per-request deadline [`HTTP_TIMEOUT`]).
    pub http: reqwest::Client,
    /// The observer's own Consul agent (`ip:port`).
    pub consul: String,
    /// The Consul status token (read-only: operator, agent, node and service read).
    pub consul_token: Option<Zeroizing<String>>,
    pub consul_token_state: TokenState,
    /// The Nomad servers' HTTPS APIs (`ip:port`), from the published node records.
    pub nomad: Vec<String>,
}

/// `(name, ip:port)` of every published node of `role`.
fn servers_of(records: &[NodeRecord], role: &str, port: u16) -> Vec<(String, String)> {
    records
        .iter()
        .filter(|r| r.boot.role.as_deref() == Some(role))
        .filter_map(|r| Some((r.boot.node.clone(), format!("{}:{port}", r.ip.as_deref()?))))
        .collect()
}

/// The text of every `<tag>…</tag>` (blob names are plain; the five XML entities are decoded).
pub fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = vec![];
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(
            after[..j]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        );
        rest = &after[j + close.len()..];
    }
    out
}

/// GET `https://<addr><path>` with an optional token header; the JSON body of a success (or of one of `also`), or
/// why there is none, as the observations keep it.
async fn get_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    addr: &str,
    path: &str,
    token: Option<(&str, &str)>,
    also: &[u16],
) -> Result<T, NoAnswer> {
    Ok(fetch_json(http, addr, path, token, also).await?)
}

async fn fetch_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    addr: &str,
    path: &str,
    token: Option<(&str, &str)>,
    also: &[u16],
) -> Result<T, CollectError> {
    let mut req = http.get(format!("https://{addr}{path}"));
    if let Some((header, value)) = token {
        req = req.header(header, value);
    }
    let r = req
        .send()
        .await
        .map_err(|e| CollectError::Transport(short(&e)))?;
    let status = r.status().as_u16();
    if !(r.status().is_success() || also.contains(&status)) {
        let body = r.text().await.unwrap_or_default();
        let first = body.lines().next().unwrap_or("").trim();
        // Product error bodies are short and carry no secrets ("ACL not found", "permission denied").
        let hint: String = first.chars().take(160).collect();
        return Err(CollectError::Status {
            status,
            hint: (!hint.is_empty()).then_some(hint),
        });
    }
    let body = r
        .bytes()
        .await
        .map_err(|e| CollectError::Transport(short(&e)))?;
    serde_json::from_slice::<T>(&body).map_err(|source| CollectError::Unparsable {
        path: path.split('?').next().unwrap_or(path).to_string(),
        status,
        source,
    })
}

async fn probe_all<T: DeserializeOwned + Send + 'static>(
    http: &reqwest::Client,
    servers: &[(String, String)],
    path: &'static str,
) -> Vec<Probed<T>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, (name, address)) in servers.iter().enumerate() {
        let (http, name, address) = (http.clone(), name.clone(), address.clone());
        set.spawn(async move {
            let answer = get_json::<T>(&http, &address, path, None, &[]).await;
            (
                i,
                Probed {
                    name,
                    address: crate::status::assess::host(&address).to_string(),
                    answer: Some(answer),
                },
            )
        });
    }
    let mut out: Vec<(usize, Probed<T>)> = vec![];
    while let Some(Ok(x)) = set.join_next().await {
        out.push(x);
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests;
