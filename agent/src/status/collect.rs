//! Collection: reads the coordination container (tier states, published node records) with the node's managed
//! identity, the status tokens from the status Key Vault (jumpbox-readable only), and the products' HTTPS APIs trusting the cluster CA.
//! Every call has a deadline ([`HTTP_TIMEOUT`], [`azure_policy`]) and independent calls run concurrently, so a
//! dead server costs at most a few seconds and never hangs the command.

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

/// What the observer (normally the jumpbox) needs to look at its cluster.
pub struct Collector {
    spec: NodeSpec,
    az: Azure,
    credential: Arc<ImdsCredential>,
    /// For listing blobs (the SDK's pager needs a stream library the agent does not carry).
    azure_http: reqwest::Client,
    /// For the products' APIs: trusts only the cluster CA.
    http: Result<reqwest::Client, String>,
    consul_token: Option<Zeroizing<String>>,
    vault_token: Option<Zeroizing<String>>,
    nomad_token: Option<Zeroizing<String>>,
    vault_renewed: bool,
}

fn short(e: &reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let connect = e.is_connect();
    let mut src: &dyn std::error::Error = e;
    while let Some(s) = src.source() {
        src = s;
    }
    if timeout {
        format!("no answer within {HTTP_TIMEOUT:?}")
    } else if connect {
        // The innermost cause says it best ("Connection refused", "No route to host").
        let text = src.to_string();
        let text = match text.find(" (os error") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        format!("cannot connect: {text}")
    } else {
        format!("request failed: {src}")
    }
}

impl Collector {
    /// Identifies the observer from its metadata (deadline 5 s) and prepares the clients.
    pub async fn new(cfg: &AgentConfig) -> Result<Collector, String> {
        let quick = RetryPolicy::imds(Duration::from_secs(5));
        let md = ImdsClient::new(&cfg.imds.endpoint, quick)
            .instance()
            .await
            .map_err(|e| format!("instance metadata: {e}"))?;
        let spec = NodeSpec::from_metadata(&md).map_err(|e| e.to_string())?;
        crate::node::check_endpoints(&spec, &md.compute.az_environment, cfg.azure.endpoints)
            .map_err(|e| e.to_string())?;
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
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|_| format!("{}: not a PEM certificate", path.display()))?;
            b = b.add_root_certificate(cert);
        }
        let azure_http = b.build().map_err(|e| e.to_string())?;
        // The jumpbox's world-readable copy (operators run status without sudo); elsewhere, as root, Consul's.
        let layout = Layout::from_paths(&cfg.paths);
        let ca = [layout.operator_ca_file(), layout.ca_file(Product::Consul)]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| layout.operator_ca_file());
        let http = crate::services::health::client_for(&ca, HTTP_TIMEOUT)
            .map_err(|e| format!("cluster CA: {e} (status runs on a booted node: the jumpbox)"));
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
            Err(e) => o.records_error = Some(e),
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
                let e = e.clone();
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
                .map_err(|e| e.to_string())
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
            .map_err(|e| e.to_string());
            (tier.to_string(), Some(r))
        };
        let (c, v, n) = tokio::join!(read("consul"), read("vault"), read("nomad"));
        BTreeMap::from([c, v, n])
    }

    async fn storage_token(&self) -> Result<String, String> {
        let t = tokio::time::timeout(
            Duration::from_secs(5),
            self.credential
                .get_token(&["https://storage.azure.com/.default"], None),
        )
        .await
        .map_err(|_| "managed identity token: no answer within 5s".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(t.token.secret().to_string())
    }

    /// Lists and reads `<cluster>/nodes/*.json`. Returns the records and the names that did not parse.
    async fn records(&self) -> Result<(Vec<NodeRecord>, Vec<String>), String> {
        let blob = self.spec.blob_endpoint.as_str();
        let token = Zeroizing::new(self.storage_token().await?);
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
                .map_err(|e| format!("list node records: {}", short(&e)))?;
            let status = r.status().as_u16();
            if status != 200 {
                return Err(format!("list node records: HTTP {status}"));
            }
            let xml = r
                .text()
                .await
                .map_err(|e| format!("list node records: {}", short(&e)))?;
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
    pub async fn endpoints(&self) -> Result<Endpoints, String> {
        let http = self.http.clone()?;
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
        let (records, _) = records.map_err(|e| format!("node records: {e}"))?;
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

/// GET `https://<addr><path>` with an optional token header; the JSON body of a success (or of one of `also`).
async fn get_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    addr: &str,
    path: &str,
    token: Option<(&str, &str)>,
    also: &[u16],
) -> Result<T, String> {
    let mut req = http.get(format!("https://{addr}{path}"));
    if let Some((header, value)) = token {
        req = req.header(header, value);
    }
    let r = req.send().await.map_err(|e| short(&e))?;
    let status = r.status().as_u16();
    if !(r.status().is_success() || also.contains(&status)) {
        let body = r.text().await.unwrap_or_default();
        let first = body.lines().next().unwrap_or("").trim();
        // Product error bodies are short and carry no secrets ("ACL not found", "permission denied").
        let hint: String = first.chars().take(160).collect();
        return Err(if hint.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {hint}")
        });
    }
    let body = r.bytes().await.map_err(|e| short(&e))?;
    // serde names the missing or mistyped field; the bodies parsed here hold no secrets.
    serde_json::from_slice::<T>(&body).map_err(|e| {
        let p = path.split('?').next().unwrap_or(path);
        format!("{p} (HTTP {status}): response did not parse: {e}")
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

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulRaftConfig {
    servers: Vec<ConsulRaftServer>,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulRaftServer {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    leader: bool,
    voter: bool,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulAutopilot {
    healthy: bool,
    failure_tolerance: i64,
    /// `null` while the servers are still stabilising after the cluster formed (seen with Consul 1.8.7).
    #[serde(default, deserialize_with = "null_as_empty")]
    servers: Vec<ConsulAutopilotServer>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulAutopilotServer {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    address: String,
    serf_status: String,
    #[serde(default)]
    version: String,
    leader: bool,
    healthy: bool,
    voter: bool,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulMember {
    name: String,
    addr: String,
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
    status: u8,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulTokenSelf {
    #[serde(default)]
    description: String,
}

fn serf_status(n: u8) -> &'static str {
    match n {
        1 => "alive",
        2 => "leaving",
        3 => "left",
        4 => "failed",
        _ => "none",
    }
}

async fn collect_consul(
    http: &reqwest::Client,
    local: &str,
    servers: &[(String, String)],
    token: Option<&str>,
    records: &[NodeRecord],
) -> ConsulObs {
    let mut o = ConsulObs::default();
    let local_probe = [("local".to_string(), local.to_string())];
    let (local_answer, mut probes) = tokio::join!(
        probe_all::<String>(http, &local_probe, "/v1/status/leader"),
        probe_all::<String>(http, servers, "/v1/status/leader"),
    );
    // The cluster-wide questions go to the observer's own agent, else to the first server that answers.
    let via = match local_answer.first().map(|p| &p.answer) {
        Some(Some(Ok(_))) => Some(local.to_string()),
        _ => probes
            .iter()
            .find(|p| matches!(p.answer, Some(Ok(_))))
            .map(|p| format!("{}:{CONSUL_PORT}", p.address)),
    };
    o.via = Some(via.clone().unwrap_or_else(|| {
        format!(
            "{local} and {} server{}",
            servers.len(),
            if servers.len() == 1 { "" } else { "s" }
        )
    }));
    let Some(via) = via else {
        o.leader = local_answer.into_iter().next().and_then(|p| p.answer);
        o.probes = probes;
        return o;
    };
    let h = token.map(|t| ("X-Consul-Token", t));
    let (leader, peers, raft, autopilot, members, acl) = tokio::join!(
        get_json::<String>(http, &via, "/v1/status/leader", None, &[]),
        get_json::<Vec<String>>(http, &via, "/v1/status/peers", None, &[]),
        async {
            match h {
                Some(h) => Some(
                    get_json::<ConsulRaftConfig>(
                        http,
                        &via,
                        "/v1/operator/raft/configuration",
                        Some(h),
                        &[],
                    )
                    .await,
                ),
                None => None,
            }
        },
        async {
            match h {
                // 429: autopilot answers with its report and "unhealthy".
                Some(h) => Some(
                    get_json::<ConsulAutopilot>(
                        http,
                        &via,
                        "/v1/operator/autopilot/health",
                        Some(h),
                        &[429],
                    )
                    .await,
                ),
                None => None,
            }
        },
        async {
            match h {
                Some(h) => Some(
                    get_json::<Vec<ConsulMember>>(http, &via, "/v1/agent/members", Some(h), &[])
                        .await,
                ),
                None => None,
            }
        },
        async {
            match h {
                Some(h) => Some(
                    get_json::<ConsulTokenSelf>(http, &via, "/v1/acl/token/self", Some(h), &[])
                        .await,
                ),
                None => None,
            }
        },
    );
    o.leader = Some(leader);
    o.peers = Some(peers.clone());
    o.raft = raft.map(|r| {
        r.map(|c| {
            c.servers
                .into_iter()
                .map(|s| RaftServer {
                    id: s.id,
                    node: s.node,
                    address: s.address,
                    leader: s.leader,
                    voter: s.voter,
                })
                .collect()
        })
    });
    o.autopilot = autopilot.map(|r| {
        r.map(|a| Autopilot {
            healthy: a.healthy,
            failure_tolerance: a.failure_tolerance,
            servers: a
                .servers
                .into_iter()
                .map(|s| AutopilotServer {
                    id: s.id,
                    name: s.name,
                    address: s.address,
                    healthy: s.healthy,
                    status: s.serf_status,
                    leader: s.leader,
                    voter: s.voter,
                    version: s.version,
                })
                .collect(),
        })
    });
    o.members = members.map(|r| {
        r.map(|ms| {
            ms.into_iter()
                .map(|m| Member {
                    role: m.tags.get("role").cloned().unwrap_or_default(),
                    version: m
                        .tags
                        .get("build")
                        .map(|b| b.split(':').next().unwrap_or("").to_string())
                        .unwrap_or_default(),
                    name: m.name,
                    addr: m.addr,
                    status: serf_status(m.status).into(),
                })
                .collect()
        })
    });
    o.acl = acl.map(|r| r.map(|t| t.description));
    // Raft peers that no record names are probed too, under the name raft gives them.
    let known: Vec<String> = probes.iter().map(|p| p.address.clone()).collect();
    let mut extra = vec![];
    let raft_names: Vec<(String, String)> = o
        .raft
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .map(|r| {
            r.iter()
                .map(|s| {
                    (
                        crate::status::assess::host(&s.address).to_string(),
                        s.node.clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if let Ok(peers) = &peers {
        for a in peers {
            let ip = crate::status::assess::host(a).to_string();
            if !known.contains(&ip) {
                let name = raft_names
                    .iter()
                    .find(|(h, _)| *h == ip)
                    .map(|(_, n)| n.clone())
                    .or_else(|| {
                        records
                            .iter()
                            .find(|r| r.ip.as_deref() == Some(ip.as_str()))
                            .map(|r| r.boot.node.clone())
                    })
                    .unwrap_or_else(|| ip.clone());
                extra.push((name, format!("{ip}:{CONSUL_PORT}")));
            }
        }
    }
    if !extra.is_empty() {
        probes.extend(probe_all::<String>(http, &extra, "/v1/status/leader").await);
    }
    o.via = Some(via);
    o.probes = probes;
    o
}

#[derive(Deserialize)]
struct VaultHealthBody {
    initialized: bool,
    sealed: bool,
    standby: bool,
    #[serde(default)]
    version: String,
}
#[derive(Deserialize)]
struct VaultData<T> {
    data: T,
}
#[derive(Deserialize)]
struct VaultRaftConfig {
    config: VaultRaftServers,
}
#[derive(Deserialize)]
struct VaultRaftServers {
    servers: Vec<VaultRaftServer>,
}
#[derive(Deserialize)]
struct VaultRaftServer {
    node_id: String,
    address: String,
    leader: bool,
    voter: bool,
}
#[derive(Deserialize)]
struct VaultAutopilot {
    healthy: bool,
    failure_tolerance: i64,
    #[serde(default)]
    servers: std::collections::BTreeMap<String, VaultAutopilotServer>,
}
#[derive(Deserialize)]
struct VaultAutopilotServer {
    id: String,
    name: String,
    address: String,
    #[serde(default)]
    node_status: String,
    healthy: bool,
    #[serde(default)]
    status: String,
    #[serde(default)]
    version: String,
}

/// Every status code sys/health can answer with, as 200, so one request tells all states apart.
const VAULT_HEALTH: &str = "/v1/sys/health?standbyok=true&perfstandbyok=true&sealedcode=200&uninitcode=200&drsecondarycode=200&performancestandbycode=200&standbycode=200";

async fn collect_vault(
    http: &reqwest::Client,
    servers: &[(String, String)],
    token: Option<&str>,
    renew: bool,
) -> VaultObs {
    let mut o = VaultObs::default();
    let health: Vec<Probed<VaultHealthBody>> = probe_all(http, servers, VAULT_HEALTH).await;
    o.health = health
        .into_iter()
        .map(|p| Probed {
            name: p.name,
            address: p.address,
            answer: p.answer.map(|r| {
                r.map(|h| VaultHealth {
                    initialized: h.initialized,
                    sealed: h.sealed,
                    standby: h.standby,
                    version: h.version,
                })
            }),
        })
        .collect();
    let Some(token) = token else { return o };
    // The active node answers the raft questions itself; any unsealed node would forward them.
    let usable = |active: bool| {
        o.health.iter().find(|p| {
            matches!(&p.answer, Some(Ok(h)) if h.initialized && !h.sealed && (!active || !h.standby))
        })
    };
    let Some(via) = usable(true)
        .or_else(|| usable(false))
        .map(|p| format!("{}:{VAULT_PORT}", p.address))
    else {
        return o;
    };
    let h = Some(("X-Vault-Token", token));
    let (raft, autopilot, _) = tokio::join!(
        get_json::<VaultData<VaultRaftConfig>>(
            http,
            &via,
            "/v1/sys/storage/raft/configuration",
            h,
            &[]
        ),
        get_json::<VaultData<VaultAutopilot>>(
            http,
            &via,
            "/v1/sys/storage/raft/autopilot/state",
            h,
            &[]
        ),
        async {
            if renew {
                let r = http
                    .post(format!("https://{via}/v1/auth/token/renew-self"))
                    .header("X-Vault-Token", token)
                    .json(&serde_json::json!({}))
                    .send()
                    .await;
                if let Err(e) = r {
                    tracing::debug!(error = %short(&e), "status token not renewed");
                }
            }
        }
    );
    o.via = Some(via);
    o.raft = Some(raft.map(|d| {
        d.data
            .config
            .servers
            .into_iter()
            .map(|s| RaftServer {
                id: s.node_id.clone(),
                node: s.node_id,
                address: s.address,
                leader: s.leader,
                voter: s.voter,
            })
            .collect()
    }));
    o.autopilot = Some(autopilot.map(|d| {
        Autopilot {
            healthy: d.data.healthy,
            failure_tolerance: d.data.failure_tolerance,
            servers: d
                .data
                .servers
                .into_values()
                .map(|s| AutopilotServer {
                    voter: s.status == "voter" || s.status == "leader",
                    leader: s.status == "leader",
                    id: s.id,
                    name: s.name,
                    address: s.address,
                    healthy: s.healthy,
                    status: s.node_status,
                    version: s.version,
                })
                .collect(),
        }
    }));
    o
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NomadNodeBody {
    name: String,
    #[serde(default)]
    address: String,
    status: String,
    #[serde(default)]
    scheduling_eligibility: String,
}

async fn collect_nomad(
    http: &reqwest::Client,
    servers: &[(String, String)],
    token: Option<&str>,
) -> NomadObs {
    let mut o = NomadObs::default();
    if servers.is_empty() {
        return o;
    }
    o.probes = probe_all::<String>(http, servers, "/v1/status/leader").await;
    let Some(via) = o
        .probes
        .iter()
        .find(|p| matches!(p.answer, Some(Ok(_))))
        .map(|p| format!("{}:{NOMAD_PORT}", p.address))
    else {
        return o;
    };
    let h = token.map(|t| ("X-Nomad-Token", t));
    let (peers, nodes) = tokio::join!(
        get_json::<Vec<String>>(http, &via, "/v1/status/peers", None, &[]),
        async {
            match h {
                Some(h) => Some(
                    get_json::<Vec<NomadNodeBody>>(http, &via, "/v1/nodes", Some(h), &[]).await,
                ),
                None => None,
            }
        }
    );
    o.peers = Some(peers);
    o.nodes = nodes.map(|r| {
        r.map(|ns| {
            ns.into_iter()
                .map(|n| NomadNode {
                    eligible: n.scheduling_eligibility == "eligible",
                    name: n.name,
                    address: n.address,
                    status: n.status,
                })
                .collect()
        })
    });
    o
}

#[cfg(test)]
mod tests {

    #[test]
    fn consul_autopilot_health_with_null_servers_parses() {
        // Consul 1.8.7's answer (HTTP 429) right after the cluster formed.
        let a: ConsulAutopilot =
            serde_json::from_str(r#"{"Healthy":false,"FailureTolerance":0,"Servers":null}"#)
                .unwrap();
        assert!(!a.healthy);
        assert!(a.servers.is_empty());
        assert!(serde_json::from_str::<ConsulAutopilot>(
            r#"{"Healthy":true,"FailureTolerance":1,"Servers":7}"#
        )
        .is_err());
    }

    use super::*;

    #[test]
    fn xml_names_and_markers() {
        let xml = "<EnumerationResults><Blobs><Blob><Name>lab/nodes/a.json</Name></Blob><Blob><Name>lab/nodes/b&amp;c.json</Name></Blob></Blobs><NextMarker /></EnumerationResults>";
        assert_eq!(
            xml_values(xml, "Name"),
            vec!["lab/nodes/a.json", "lab/nodes/b&c.json"]
        );
        assert!(xml_values(xml, "NextMarker").is_empty());
    }
}
