//! Azure-in-a-box: a fake IMDS per node, Azurite, the Key Vault contract double, a transit OpenBao standing in for
//! Key Vault auto-unseal, and one real `hashistack-agent` per node using the process backend. Every node has
//! its own loopback address `127.<net>.0.x`, so the default product ports work as on separate VMs, and two
//! labs with different `net` values never collide.

use crate::imds::{self, ImdsState, Shared};
use crate::keyvault::{self, KeyVaultDouble};
use crate::procs::{self, Proc};
use crate::tools::Tools;
use hashistack_agent::config::{AgentConfig, Backend, Owners};
use hashistack_agent::node::{self as tags, Role};
use hashistack_agent::services::health::{self, Probe};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const IMDS_PORT: u16 = 16925;
pub const AZURITE_PORT: u16 = 10000;
/// The Key Vault double's `shared` vault (cluster material every node reads); `escrow`, `servers` (CA key,
/// Nomad gossip key) and `status` (status tokens) listen on the next ports.
pub const KEYVAULT_PORT: u16 = 8443;
pub const KEYVAULT_ESCROW_PORT: u16 = 8444;
pub const KEYVAULT_SERVERS_PORT: u16 = 8445;
pub const KEYVAULT_STATUS_PORT: u16 = 8446;
pub const TRANSIT_PORT: u16 = 8200;

/// The Vault load balancer's frontend host (127.<net>.0.20; Vault servers are .21+).
pub const VAULT_LB_HOST: u8 = 20;

#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Where the lab keeps its state (node roots, logs, keys). Removed by `down` unless `keep`.
    pub state_dir: PathBuf,
    /// Second octet of the lab's loopback network: nodes live at 127.<net>.0.x.
    pub net: u8,
    pub cluster: String,
    pub consul_servers: u8,
    pub vault_servers: u8,
    /// Nomad servers (scale set `hs-nomad`, 127.<net>.0.31+). `hashistack-lab up` starts 3; the default
    /// here is 0 so suites that predate the Nomad tier keep their node set.
    pub nomad_servers: u8,
    /// Workers (scale set `hs-workers`, 127.<net>.0.41+): a Consul client (auto-encrypt) and a Nomad client.
    /// Default 0; `hashistack-lab up` starts 2.
    pub workers: u8,
    /// The `nomad` the agents run; `None`: the Nomad contract double (`<state_dir>/bin/nomad`).
    pub nomad_bin: Option<PathBuf>,
    /// Add the jumpbox (127.<net>.0.5, role `jumpbox`, its own identity), where `hashistack-agent status` runs.
    /// `None`: when `up` boots the agents itself (`start_agents`); suites that stage boots node by node start
    /// only the nodes they name, so they get no jumpbox unless they ask for one.
    pub jumpbox: Option<bool>,
    pub keep: bool,
    /// Run (and wait for) the one-time tier bootstrap: Vault init, Consul ACL bootstrap, escrow.
    pub bootstrap: bool,
    /// Start every node's agent in `up` (tests that stage boots themselves turn this off).
    pub start_agents: bool,
    /// Print progress lines.
    pub verbose: bool,
    /// The scale sets' `userData` per role (base64 text, as the ARM template sets it and IMDS serves it);
    /// roles not listed have none.
    pub user_data: BTreeMap<Role, String>,
}

impl LabOptions {
    pub fn new(state_dir: PathBuf, net: u8) -> Self {
        LabOptions {
            state_dir,
            net,
            cluster: "lab".into(),
            consul_servers: 3,
            vault_servers: 3,
            nomad_servers: 0,
            workers: 0,
            nomad_bin: None,
            jumpbox: None,
            keep: false,
            bootstrap: true,
            start_agents: true,
            verbose: false,
            user_data: BTreeMap::new(),
        }
    }
    /// Where Vault reaches the Nomad servers' JWKS (tag `hashistack-nomad-address`): the first Nomad server. On
    /// Azure the tag is absent and Vault asks Consul's DNS for `nomad.service.consul` (docs/lab-vs-azure.md).
    pub fn nomad_address(&self) -> Option<String> {
        (self.nomad_servers > 0).then(|| format!("https://{}:4646", self.ip(31)))
    }
    /// The Vault load balancer's frontend (lb.rs), as the template's `vaultApiAddress`.
    pub fn vault_address(&self) -> String {
        format!("https://{}:8200", self.ip(VAULT_LB_HOST))
    }
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.net, 0, host)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Tool(#[from] crate::tools::MissingTool),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// A node as a scale set would define it.
#[derive(Debug, Clone)]
pub struct NodeDef {
    pub name: String,
    pub role: Role,
    pub ip: Ipv4Addr,
    pub scale_set: String,
    pub tags: Vec<(String, String)>,
}

pub struct Node {
    pub def: NodeDef,
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub imds: Shared,
    imds_task: tokio::task::JoinHandle<()>,
    pub agent: Option<Proc>,
}

pub struct Lab {
    pub opts: LabOptions,
    pub tools: Tools,
    pub nodes: Vec<Node>,
    pub ca_cert: PathBuf,
    pub azurite: Option<Proc>,
    /// The in-process Key Vault contract double (vaults `shared` and `escrow`): grant roles, inject faults.
    pub keyvault: Option<KeyVaultDouble>,
    pub transit: Option<Proc>,
    pid_dir: PathBuf,
    log_dir: PathBuf,
    extra_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The operator's IMDS, once started (for escrow opens in this process).
    operator_endpoint: Option<String>,
}

fn say(opts: &LabOptions, msg: impl AsRef<str>) {
    if opts.verbose {
        eprintln!("lab: {}", msg.as_ref());
    }
}

fn write_secret(path: &Path, content: &str) -> Result<(), LabError> {
    std::fs::write(path, content).map_err(io(path.display().to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(path.display().to_string()))
}

fn random_b64(n: usize) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The tags the lab's scale sets carry (cf. the ARM templates, which carry the Azure values).
pub fn node_defs(o: &LabOptions) -> Vec<NodeDef> {
    let consul_ips: Vec<Ipv4Addr> = (0..o.consul_servers).map(|i| o.ip(11 + i)).collect();
    let vault_ips: Vec<Ipv4Addr> = (0..o.vault_servers).map(|i| o.ip(21 + i)).collect();
    let list = |ips: &[Ipv4Addr]| {
        ips.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let common = |role: Role| {
        vec![
            (tags::TAG_ROLE.to_string(), role.to_string()),
            (tags::TAG_CLUSTER.into(), o.cluster.clone()),
            (tags::TAG_DATACENTER.into(), "dc1".into()),
            (tags::TAG_CONSUL_JOIN.into(), list(&consul_ips)),
            (
                tags::TAG_BLOB_ENDPOINT.into(),
                format!("https://{}:{AZURITE_PORT}/devstoreaccount1/", o.ip(1)),
            ),
            (
                tags::TAG_KEYVAULT_URI.into(),
                format!("https://{}:{KEYVAULT_PORT}/", o.ip(1)),
            ),
        ]
    };
    let server_vaults = |t: &mut Vec<(String, String)>| {
        t.push((
            tags::TAG_ESCROW_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_ESCROW_PORT}/", o.ip(1)),
        ));
        t.push((
            tags::TAG_SERVERS_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_SERVERS_PORT}/", o.ip(1)),
        ));
        t.push((
            tags::TAG_STATUS_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_STATUS_PORT}/", o.ip(1)),
        ));
    };
    let mut defs = Vec::new();
    for (i, ip) in consul_ips.iter().enumerate() {
        let mut t = common(Role::ConsulServer);
        t.push((
            tags::TAG_CONSUL_SERVERS.into(),
            o.consul_servers.to_string(),
        ));
        server_vaults(&mut t);
        defs.push(NodeDef {
            name: format!("consul-{i}"),
            role: Role::ConsulServer,
            ip: *ip,
            scale_set: "hs-consul".into(),
            tags: t,
        });
    }
    for (i, ip) in vault_ips.iter().enumerate() {
        let mut t = common(Role::VaultServer);
        t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        if let Some(a) = o.nomad_address() {
            t.push((tags::TAG_NOMAD_ADDRESS.into(), a));
        }
        t.push((tags::TAG_VAULT_JOIN.into(), list(&vault_ips)));
        t.push((tags::TAG_VAULT_SERVERS.into(), o.vault_servers.to_string()));
        t.push((
            tags::TAG_VAULT_SEAL.into(),
            format!(
                "transit address=http://{}:{TRANSIT_PORT} key_name=autounseal mount_path=transit/",
                o.ip(2)
            ),
        ));
        server_vaults(&mut t);
        defs.push(NodeDef {
            name: format!("vault-{i}"),
            role: Role::VaultServer,
            ip: *ip,
            scale_set: "hs-vault".into(),
            tags: t,
        });
    }
    let nomad_ips: Vec<Ipv4Addr> = (0..o.nomad_servers).map(|i| o.ip(31 + i)).collect();
    for (i, ip) in nomad_ips.iter().enumerate() {
        let mut t = common(Role::NomadServer);
        t.push((tags::TAG_NOMAD_JOIN.into(), list(&nomad_ips)));
        t.push((tags::TAG_NOMAD_SERVERS.into(), o.nomad_servers.to_string()));
        if o.vault_servers > 0 {
            t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        }
        if let Some(a) = o.nomad_address() {
            t.push((tags::TAG_NOMAD_ADDRESS.into(), a));
        }
        server_vaults(&mut t);
        defs.push(NodeDef {
            name: format!("nomad-{i}"),
            role: Role::NomadServer,
            ip: *ip,
            scale_set: "hs-nomad".into(),
            tags: t,
        });
    }
    // Workers: no servers vault, no status vault, no escrow vault (cf. the ARM template's hs-workers tags).
    for i in 0..o.workers {
        let mut t = common(Role::Worker);
        t.push((tags::TAG_NOMAD_JOIN.into(), list(&nomad_ips)));
        if o.vault_servers > 0 {
            t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        }
        defs.push(NodeDef {
            name: format!("worker-{i}"),
            role: Role::Worker,
            ip: o.ip(41 + i),
            scale_set: "hs-workers".into(),
            tags: t,
        });
    }
    // The operators' jumpbox (a VM, not a scale set): a Consul client, and where `hashistack-agent status` runs.
    if o.jumpbox.unwrap_or(o.start_agents) {
        let mut t = common(Role::Jumpbox);
        if o.vault_servers > 0 {
            t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        }
        t.push((
            tags::TAG_STATUS_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_STATUS_PORT}/", o.ip(1)),
        ));
        defs.push(NodeDef {
            name: "jumpbox".into(),
            role: Role::Jumpbox,
            ip: o.ip(5),
            scale_set: String::new(),
            tags: t,
        });
    }
    defs
}

/// Removes everything under `dir` except `keep` (and the directories leading to it).
fn wipe_except(dir: &Path, keep: &Path) -> Result<(), LabError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir.display().to_string())(e)),
    };
    for e in rd {
        let p = e.map_err(io(dir.display().to_string()))?.path();
        if p == keep {
            continue;
        }
        let is_dir = p.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false);
        if is_dir && keep.starts_with(&p) {
            wipe_except(&p, keep)?;
        } else if is_dir {
            std::fs::remove_dir_all(&p).map_err(io(format!("wipe {}", p.display())))?;
        } else {
            std::fs::remove_file(&p).map_err(io(format!("wipe {}", p.display())))?;
        }
    }
    Ok(())
}

async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<(), LabError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(LabError::Failed(format!(
        "{what} not ready within {deadline:?}"
    )))
}

async fn tcp_open(addr: SocketAddr) -> bool {
    tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

impl Lab {
    pub async fn up(opts: LabOptions, tools: Tools) -> Result<Lab, LabError> {
        let o = &opts;
        if o.state_dir.exists() {
            // A previous lab that was not taken down: stop what it left and start clean.
            procs::kill_pid_files(&o.state_dir.join("pids"));
            std::fs::remove_dir_all(&o.state_dir)
                .map_err(io(format!("remove old state {}", o.state_dir.display())))?;
        }
        let secrets = o.state_dir.join("secrets");
        std::fs::create_dir_all(&secrets).map_err(io("create state dir"))?;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod secrets"))?;
        let pid_dir = o.state_dir.join("pids");
        let log_dir = o.state_dir.join("logs");
        std::fs::write(
            o.state_dir.join("lab.pid"),
            format!("{}\n", std::process::id()),
        )
        .map_err(io("lab.pid"))?;

        // Cluster PKI and gossip keys (on Azure the bootstrap creates these once and keeps them in Key Vault).
        say(
            o,
            "creating the lab CA, emulator certificate and gossip keys",
        );
        let now = time::OffsetDateTime::now_utc();
        let (ca_pem, ca_key) = hashistack_agent::tls::generate_ca("hashistack lab CA", 30, now)
            .map_err(|e| LabError::Failed(e.to_string()))?;
        let ca = hashistack_agent::tls::ClusterCa::from_pem(&ca_pem, &ca_key)
            .map_err(|e| LabError::Failed(e.to_string()))?;
        let emu = ca
            .issue(
                "lab emulators",
                &[o.ip(1).to_string(), "localhost".into(), "127.0.0.1".into()],
                30,
                now,
            )
            .map_err(|e| LabError::Failed(e.to_string()))?;
        let ca_cert = o.state_dir.join("ca.pem");
        std::fs::write(&ca_cert, &ca_pem).map_err(io("ca.pem"))?;
        write_secret(&secrets.join("ca-key.pem"), &ca_key)?;
        std::fs::write(o.state_dir.join("emulator.pem"), &emu.cert_pem)
            .map_err(io("emulator.pem"))?;
        write_secret(&secrets.join("emulator-key.pem"), &emu.key_pem)?;

        let mut lab = Lab {
            opts: opts.clone(),
            tools,
            nodes: Vec::new(),
            ca_cert,
            azurite: None,
            keyvault: None,
            transit: None,
            pid_dir,
            log_dir,
            extra_tasks: Vec::new(),
            operator_endpoint: None,
        };
        lab.start_emulators().await?;
        lab.start_transit().await?;
        if lab.opts.vault_servers > 0 {
            let front = SocketAddr::from((lab.opts.ip(VAULT_LB_HOST), 8200));
            let backends = (0..lab.opts.vault_servers)
                .map(|i| SocketAddr::from((lab.opts.ip(21 + i), 8200)))
                .collect();
            let tasks = crate::lb::serve(front, backends)
                .await
                .map_err(io(format!("Vault load balancer on {front}")))?;
            lab.extra_tasks.extend(tasks);
        }
        lab.link_nomad_double()?;
        for def in node_defs(&lab.opts) {
            lab.add_node(def).await?;
        }
        let n = lab.nodes.len();
        if lab.opts.start_agents {
            say(&lab.opts, format!("booting {n} agents"));
            for i in 0..n {
                lab.start_agent(i)?;
            }
        }
        Ok(lab)
    }

    async fn start_emulators(&mut self) -> Result<(), LabError> {
        let o = self.opts.clone();
        let host = o.ip(1);
        if let Some(azurite) = self.tools.azurite.clone() {
            say(
                &o,
                format!("starting Azurite (blob, HTTPS, OAuth) on {host}:{AZURITE_PORT}"),
            );
            let dir = o.state_dir.join("azurite");
            std::fs::create_dir_all(&dir).map_err(io("azurite dir"))?;
            let args = self.azurite_args();
            self.azurite = Some(
                procs::spawn(
                    "azurite",
                    &azurite,
                    &args,
                    &[],
                    &self.log_dir,
                    &self.pid_dir,
                )
                .map_err(io("start azurite"))?,
            );
            wait_for("Azurite", Duration::from_secs(60), || {
                tcp_open(SocketAddr::from((host, AZURITE_PORT)))
            })
            .await?;
            // What the ARM template creates: the coordination, escrow and snapshots containers.
            for container in ["coordination", "escrow", "snapshots"] {
                self.create_container(container).await?;
            }
        } else {
            say(
                &o,
                "Azurite not installed: blob storage unavailable (run lab/setup.sh)",
            );
        }
        say(
            &o,
            format!(
                "starting the Key Vault contract double on {host}:{KEYVAULT_PORT} (shared), {KEYVAULT_ESCROW_PORT} (escrow), {KEYVAULT_SERVERS_PORT} (servers) and {KEYVAULT_STATUS_PORT} (status)"
            ),
        );
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(io(p.display().to_string()));
        let kv = KeyVaultDouble::start_lab(
            &read(o.state_dir.join("emulator.pem"))?,
            &read(o.state_dir.join("secrets/emulator-key.pem"))?,
            host,
            KEYVAULT_PORT,
            Some(&o.state_dir.join("secrets/keyvault")),
        )
        .await
        .map_err(|e| LabError::Failed(format!("Key Vault double: {e}")))?;
        kv.model_arm(&self.opts.cluster)
            .map_err(|e| LabError::Failed(format!("Key Vault double: {e}")))?;
        self.keyvault = Some(kv);
        Ok(())
    }

    fn azurite_args(&self) -> Vec<String> {
        let o = &self.opts;
        vec![
            "--blobHost".into(),
            o.ip(1).to_string(),
            "--blobPort".into(),
            AZURITE_PORT.to_string(),
            "--location".into(),
            o.state_dir.join("azurite").display().to_string(),
            "--cert".into(),
            o.state_dir.join("emulator.pem").display().to_string(),
            "--key".into(),
            o.state_dir
                .join("secrets/emulator-key.pem")
                .display()
                .to_string(),
            "--oauth".into(),
            "basic".into(),
            "--skipApiVersionCheck".into(),
            "--disableTelemetry".into(),
            "--loose".into(),
        ]
    }

    /// Starts Azurite again on the same address and data, stopping it first if it runs (fault tests take
    /// storage down with `lab.azurite.take()` and bring it back with this).
    pub async fn restart_azurite(&mut self) -> Result<(), LabError> {
        let azurite = self
            .tools
            .azurite
            .clone()
            .ok_or_else(|| LabError::Failed("Azurite not installed".into()))?;
        if let Some(mut p) = self.azurite.take() {
            p.stop(Duration::from_secs(10)).await;
        }
        let p = procs::spawn(
            "azurite",
            &azurite,
            &self.azurite_args(),
            &[],
            &self.log_dir,
            &self.pid_dir,
        )
        .map_err(io("start azurite"))?;
        self.azurite = Some(p);
        let addr = SocketAddr::from((self.opts.ip(1), AZURITE_PORT));
        wait_for("Azurite", Duration::from_secs(60), || tcp_open(addr)).await
    }

    /// A dev-mode OpenBao with a transit key: the lab's stand-in for the Key Vault key that auto-unseals Vault.
    async fn start_transit(&mut self) -> Result<(), LabError> {
        let o = self.opts.clone();
        let addr = SocketAddr::from((o.ip(2), TRANSIT_PORT));
        say(
            &o,
            format!("starting the transit seal provider (OpenBao dev) on {addr}"),
        );
        let token = format!(
            "lab-transit-{}",
            random_b64(12).replace(['/', '+', '='], "")
        );
        let token_file = o.state_dir.join("secrets/transit.token");
        write_secret(&token_file, &token)?;
        let args: Vec<String> = vec![
            "server".into(),
            "-dev".into(),
            format!("-dev-listen-address={addr}"),
            format!("-dev-root-token-id={token}"),
            "-dev-no-store-token".into(),
        ];
        let envs = vec![(
            "HOME".to_string(),
            o.state_dir.join("transit-home").display().to_string(),
        )];
        self.transit = Some(
            procs::spawn(
                "transit",
                &self.tools.bao,
                &args,
                &envs,
                &self.log_dir,
                &self.pid_dir,
            )
            .map_err(io("start transit bao"))?,
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let base = format!("http://{addr}");
        wait_for("transit OpenBao", Duration::from_secs(60), || {
            let (http, base) = (http.clone(), base.clone());
            async move {
                http.get(format!("{base}/v1/sys/health"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await?;
        let post = |path: &str, body: serde_json::Value| {
            http.post(format!("{base}{path}"))
                .header("X-Vault-Token", &token)
                .json(&body)
                .send()
        };
        let r = post(
            "/v1/sys/mounts/transit",
            serde_json::json!({"type": "transit"}),
        )
        .await
        .map_err(|e| LabError::Failed(e.to_string()))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "enabling transit: HTTP {}",
                r.status()
            )));
        }
        let r = post("/v1/transit/keys/autounseal", serde_json::json!({}))
            .await
            .map_err(|e| LabError::Failed(e.to_string()))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "creating transit key: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// The lab's HTTPS client trusting the lab CA.
    /// An HTTPS client trusting the lab CA (emulators) and, once it exists, the cluster CA the first
    /// server created in Key Vault (Consul, Vault and Nomad APIs).
    pub fn https(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca_cert).expect("lab CA");
        let mut certs = vec![reqwest::Certificate::from_pem(&pem).expect("lab CA PEM")];
        if let Some(ca) = self.cluster_ca() {
            if let Ok(c) = reqwest::Certificate::from_pem(ca.as_bytes()) {
                certs.push(c);
            }
        }
        reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only(certs)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    /// The cluster CA certificate (PEM) as stored in the shared Key Vault, once created.
    pub fn cluster_ca(&self) -> Option<String> {
        let kv = self.keyvault.as_ref()?;
        let name = hashistack_agent::material::names(&self.opts.cluster).ca_cert;
        kv.vault(crate::keyvault::SHARED_VAULT)?.secret_value(&name)
    }

    pub fn blob_endpoint(&self) -> String {
        format!(
            "https://{}:{AZURITE_PORT}/devstoreaccount1/",
            self.opts.ip(1)
        )
    }

    pub fn escrow_vault_uri(&self) -> String {
        format!("https://{}:{KEYVAULT_ESCROW_PORT}/", self.opts.ip(1))
    }

    /// A storage request as the lab's "ARM" (Azurite checks token shape, not RBAC).
    async fn create_container(&self, name: &str) -> Result<(), LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .put(format!("{}{name}?restype=container", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .header("Content-Length", "0")
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("create container {name}: {e}")))?;
        if !(r.status().is_success() || r.status().as_u16() == 409) {
            return Err(LabError::Failed(format!(
                "create container {name}: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// Reads a blob as the lab (for tests: coordination state, escrow objects).
    pub async fn read_blob(&self, container: &str, name: &str) -> Option<Vec<u8>> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .get(format!("{}{container}/{name}", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.bytes().await.ok().map(|b| b.to_vec())
    }

    /// Names of the blobs in `container` under `prefix` (for tests: escrow copies, whose names carry a nonce).
    pub async fn list_blobs(&self, container: &str, prefix: &str) -> Result<Vec<String>, LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .get(format!("{}{container}", self.blob_endpoint()))
            .query(&[
                ("restype", "container"),
                ("comp", "list"),
                ("prefix", prefix),
            ])
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("list blobs {container}/{prefix}: {e}")))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "list blobs {container}/{prefix}: HTTP {}",
                r.status()
            )));
        }
        let xml = r
            .text()
            .await
            .map_err(|e| LabError::Failed(format!("list blobs {container}/{prefix}: {e}")))?;
        Ok(xml
            .split("<Name>")
            .skip(1)
            .filter_map(|s| s.split_once("</Name>").map(|(n, _)| n.to_string()))
            .collect())
    }

    /// Writes (overwrites) a blob as the lab (for tests: e.g. a tier state without its escrow receipts).
    pub async fn write_blob(
        &self,
        container: &str,
        name: &str,
        body: Vec<u8>,
    ) -> Result<(), LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .put(format!("{}{container}/{name}", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .header("x-ms-blob-type", "BlockBlob")
            .body(body)
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("write blob {container}/{name}: {e}")))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "write blob {container}/{name}: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// Deletes a blob as the lab (for tests that follow an operator procedure, e.g. removing a tier state).
    pub async fn delete_blob(&self, container: &str, name: &str) -> Result<(), LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .delete(format!("{}{container}/{name}", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("delete blob {container}/{name}: {e}")))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "delete blob {container}/{name}: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// The jumpbox's node index (where `hashistack-agent status` runs).
    pub fn jumpbox(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.def.role == Role::Jumpbox)
    }

    /// A tier's coordination state, as status and operators read it.
    pub async fn tier_state(
        &self,
        tier: &str,
    ) -> Option<hashistack_agent::coordination::TierState> {
        let b = self
            .read_blob(
                "coordination",
                &hashistack_agent::coordination::state_blob_name(&self.opts.cluster, tier),
            )
            .await?;
        serde_json::from_slice(&b).ok()
    }

    /// Starts a fake IMDS for the operator's identity (what `az login` is on a workstation), for `escrow open`.
    pub async fn operator_imds(&mut self) -> Result<String, LabError> {
        self.identity_imds("operator", 250, crate::keyvault::principals::OPERATOR)
            .await
    }

    /// The operator's IMDS endpoint, started at the first call ([`Self::operator_imds`] binds a fixed address).
    pub async fn operator_once(&mut self) -> Result<String, LabError> {
        if let Some(e) = &self.operator_endpoint {
            return Ok(e.clone());
        }
        let e = self.operator_imds().await?;
        self.operator_endpoint = Some(e.clone());
        Ok(e)
    }

    /// Waits until a node's boot record notes that Vault's `jwt-nomad` auth method points at the Nomad servers'
    /// JWKS (`written` or `unchanged`): before that, no workload can log in to Vault.
    pub async fn wait_workload_identity(&self, within: Duration) -> Result<(), LabError> {
        let start = Instant::now();
        loop {
            let noted: Vec<String> = (0..self.nodes.len())
                .filter_map(|i| self.boot_record(i).and_then(|r| r.workload_identity))
                .collect();
            if noted.iter().any(|n| n == "written" || n == "unchanged") {
                return Ok(());
            }
            if start.elapsed() > within {
                return Err(LabError::Failed(format!(
                    "Vault's jwt-nomad auth method not configured within {within:?} (boot records note {noted:?})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The Nomad management token, opened from escrow by the operator's identity in this process (what
    /// `hashistack-agent escrow open --tier nomad` prints as `secret_id`). Starts the operator's IMDS once.
    pub async fn nomad_management_token(&mut self) -> Result<zeroize::Zeroizing<String>, LabError> {
        use hashistack_agent::escrow::{self, operator, Targets};
        let endpoint = self.operator_once().await?;
        let imds = hashistack_agent::imds::ImdsClient::new(
            &endpoint,
            hashistack_agent::retry::RetryPolicy::imds(Duration::from_secs(30)),
        );
        let credential = Arc::new(hashistack_agent::identity::ImdsCredential::new(imds, None));
        let az = hashistack_agent::azure::Azure::new(credential, Some(&self.ca_cert), false)
            .map_err(LabError::Failed)?;
        let targets = Targets {
            blob_endpoint: format!("{}/", self.blob_endpoint().trim_end_matches('/')),
            escrow_vault_uri: format!("{}/", self.escrow_vault_uri().trim_end_matches('/')),
        };
        let mut policy = escrow::policy();
        policy.deadline = Duration::from_secs(60);
        let opened = operator::open(&az, &targets, &self.opts.cluster, "nomad", policy)
            .await
            .map_err(|e| LabError::Failed(format!("escrow open nomad: {e}")))?;
        #[derive(serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
        struct Acl {
            secret_id: String,
        }
        let mut acl: Acl = serde_json::from_slice(&opened.plain).map_err(|_| {
            LabError::Failed("escrow open nomad: no secret_id in the opened secrets".into())
        })?;
        Ok(zeroize::Zeroizing::new(std::mem::take(&mut acl.secret_id)))
    }

    /// `hashistack-agent smoke --token-file -` on the jumpbox with `token` on its standard input (never on its
    /// command line), plus `extra` arguments; its output as it finished. Output goes to pipes unless `inherit`.
    pub async fn smoke(
        &self,
        token: &str,
        extra: &[&str],
        inherit: bool,
    ) -> Result<std::process::Output, LabError> {
        use tokio::io::AsyncWriteExt;
        let j = self
            .jumpbox()
            .ok_or_else(|| LabError::Failed("the lab has no jumpbox".into()))?;
        let pipe = || {
            if inherit {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::piped()
            }
        };
        let mut child = tokio::process::Command::new(&self.tools.agent)
            .args(["smoke", "--token-file", "-", "--config"])
            .arg(&self.nodes[j].config_path)
            .args(extra)
            .env_remove("NOMAD_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(pipe())
            .stderr(pipe())
            .spawn()
            .map_err(io("hashistack-agent smoke".to_string()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        for part in [token.as_bytes(), b"\n"] {
            stdin
                .write_all(part)
                .await
                .map_err(io("smoke stdin".to_string()))?;
        }
        drop(stdin);
        child
            .wait_with_output()
            .await
            .map_err(io("hashistack-agent smoke".to_string()))
    }

    /// Starts a fake IMDS on 127.<net>.0.`host` whose tokens carry `oid` (a VM identity outside any node, for tests
    /// that act as that identity: e.g. a hostile server of one tier).
    pub async fn identity_imds(
        &mut self,
        name: &str,
        host: u8,
        oid: &str,
    ) -> Result<String, LabError> {
        let ip = self.opts.ip(host);
        let doc = imds::instance_document(name, "", &ip.to_string(), &[]);
        let mut st = ImdsState::new(doc);
        st.oid = oid.to_string();
        let state = Arc::new(Mutex::new(st));
        let task = imds::serve(SocketAddr::from((ip, IMDS_PORT)), state)
            .await
            .map_err(io(format!("operator IMDS on {ip}")))?;
        self.extra_tasks.push(task);
        Ok(format!("http://{ip}:{IMDS_PORT}"))
    }

    /// The `nomad` the agents run: `opts.nomad_bin`, else the contract double's link.
    pub fn nomad_bin(&self) -> PathBuf {
        self.opts
            .nomad_bin
            .clone()
            .unwrap_or_else(|| self.opts.state_dir.join("bin/nomad"))
    }

    /// `<state_dir>/bin/nomad -> hashistack-lab`: started under that name, the lab binary is the Nomad
    /// contract double (lab/src/nomad_double.rs). The lab binary: $HASHISTACK_LAB, this process when it is
    /// `hashistack-lab`, else the one next to the agent (cargo's target dir).
    fn link_nomad_double(&self) -> Result<(), LabError> {
        let exe = std::env::current_exe()
            .ok()
            .filter(|p| p.file_name().is_some_and(|n| n == "hashistack-lab"));
        let lab_bin = std::env::var_os("HASHISTACK_LAB")
            .map(PathBuf::from)
            .or(exe)
            .unwrap_or_else(|| self.tools.agent.with_file_name("hashistack-lab"));
        if self.opts.nomad_servers > 0 && self.opts.nomad_bin.is_none() && !lab_bin.is_file() {
            return Err(LabError::Failed(format!(
                "the Nomad contract double needs the lab binary at {} (cargo build --workspace --bins)",
                lab_bin.display()
            )));
        }
        let link = self.opts.state_dir.join("bin/nomad");
        std::fs::create_dir_all(self.opts.state_dir.join("bin")).map_err(io("bin dir"))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lab_bin, &link).map_err(io(link.display().to_string()))
    }

    pub fn agent_config(&self, def: &NodeDef, root: &Path) -> AgentConfig {
        let o = &self.opts;
        let mut c = AgentConfig::default();
        c.imds.endpoint = format!("http://{}:{IMDS_PORT}", def.ip);
        c.imds.deadline_secs = 60;
        c.paths.root = root.to_path_buf();
        c.paths.owners = Owners::CurrentUser;
        // One audit file for all Vault servers: OpenBao refuses to make a server active whose declared audit
        // device differs from the one in storage, and on Azure every server names /var/log/vault/audit.log.
        c.paths.vault_audit_file = Some(self.vault_audit_log());
        c.services.backend = Backend::Process;
        c.services.consul_bin = self.tools.consul.clone();
        c.services.vault_bin = self.tools.bao.clone();
        c.services.nomad_bin = self.nomad_bin();
        c.listen.loopback = false;
        // The cluster CA and gossip keys come from the shared Key Vault, created by the first server (as on
        // Azure); the lab CA above only signs the emulators' certificates, like a public CA would.
        c.material.source = hashistack_agent::config::MaterialSource::Keyvault;
        c.vault.seal_token_file = Some(o.state_dir.join("secrets/transit.token"));
        // The emulators' certificates come from the lab CA, and the Key Vault double lives on 127.x.
        c.azure.extra_ca_file = Some(o.state_dir.join("ca.pem"));
        c.azure.verify_challenge_resource = false;
        // The lab's emulators live on loopback, and its transit seal is plain http.
        c.azure.endpoints = hashistack_agent::config::EndpointPolicy::Any;
        c.bootstrap.enabled = o.bootstrap;
        c.bootstrap.follower_deadline_secs = 300;
        c.bootstrap.azure_deadline_secs = 60;
        // Azure's shortest lease: a crashed leader's lease frees up in 15 s instead of 60.
        c.bootstrap.lease_secs = 15;
        c.bootstrap.peer_grace_secs = 90;
        // The lab cannot mount: a server's "data disk" is the directory <root>/var/lib/hashistack-data, which
        // `reimage` keeps (lab/components.md). The agent's disk step is off by configuration, as on any
        // machine without a data disk device.
        c.disk.mode = hashistack_agent::config::DiskMode::Directory;
        c
    }

    /// The file every lab Vault server's audit device writes (`paths.vault_audit_file`), shared as the
    /// declared device must be the same on every server of a cluster.
    pub fn vault_audit_log(&self) -> PathBuf {
        self.opts.state_dir.join("vault-audit/audit.log")
    }

    pub fn node_config(&self, i: usize) -> AgentConfig {
        AgentConfig::load(&self.nodes[i].config_path).expect("lab-written agent config")
    }

    pub fn write_node_config(&self, i: usize, cfg: &AgentConfig) -> Result<(), LabError> {
        let text =
            toml::to_string(cfg).map_err(|e| LabError::Failed(format!("agent config: {e}")))?;
        std::fs::write(&self.nodes[i].config_path, text).map_err(io("agent.toml"))
    }

    /// Adds a node: its root directory, agent config and fake IMDS (not yet its agent).
    pub async fn add_node(&mut self, def: NodeDef) -> Result<usize, LabError> {
        let root = self.opts.state_dir.join("nodes").join(&def.name);
        std::fs::create_dir_all(root.join("etc/hashistack")).map_err(io("node root"))?;
        let config_path = root.join("etc/hashistack/agent.toml");
        let cfg = self.agent_config(&def, &root);
        let text =
            toml::to_string(&cfg).map_err(|e| LabError::Failed(format!("agent config: {e}")))?;
        std::fs::write(&config_path, text).map_err(io("agent.toml"))?;
        let doc =
            imds::instance_document(&def.name, &def.scale_set, &def.ip.to_string(), &def.tags);
        let state = Arc::new(Mutex::new(ImdsState {
            oid: keyvault::principal_for(def.role).into(),
            user_data: self
                .opts
                .user_data
                .get(&def.role)
                .cloned()
                .unwrap_or_default(),
            ..ImdsState::new(doc)
        }));
        let task = imds::serve(SocketAddr::from((def.ip, IMDS_PORT)), state.clone())
            .await
            .map_err(io(format!("fake IMDS on {}", def.ip)))?;
        self.nodes.push(Node {
            def,
            root,
            config_path,
            imds: state,
            imds_task: task,
            agent: None,
        });
        Ok(self.nodes.len() - 1)
    }

    /// Powers a node on: runs its agent (`hashistack-agent boot`), which renders and starts its services.
    pub fn start_agent(&mut self, i: usize) -> Result<(), LabError> {
        // A boot starts from nothing: no process of the node's previous life survives.
        self.kill_node_services(i);
        let node = &self.nodes[i];
        let args = vec![
            "--log-format".into(),
            "json".into(),
            "boot".into(),
            "--config".into(),
            node.config_path.display().to_string(),
        ];
        let name = format!("agent-{}", node.def.name);
        let p = procs::spawn(
            &name,
            &self.tools.agent,
            &args,
            &[],
            &self.log_dir,
            &self.pid_dir,
        )
        .map_err(io("start agent"))?;
        self.nodes[i].agent = Some(p);
        Ok(())
    }

    /// Orderly shutdown of a node (the agent stops its services).
    pub async fn stop_agent(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].agent.take() {
            p.stop(Duration::from_secs(30)).await;
        }
    }

    /// Power loss: SIGKILL the agent and every service it started (a VM's processes do not survive it).
    pub async fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].agent.take() {
            p.kill().await;
        }
        self.kill_node_services(i);
    }

    /// Resumes a node's agent that stopped itself (`faults.pause_at`) or was stopped: SIGCONT to the agent only.
    pub fn continue_agent(&self, i: usize) {
        if let Some(pid) = self.nodes[i].agent.as_ref().and_then(|a| a.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }

    /// Whether the node's agent is stopped (SIGSTOP): its state in `/proc/<pid>/stat` is `T`.
    pub fn agent_stopped(&self, i: usize) -> bool {
        let Some(pid) = self.nodes[i].agent.as_ref().and_then(|a| a.pid()) else {
            return false;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state …`: the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("T")
    }

    /// SIGKILLs the services recorded by the node's agent (pid files under its state directory).
    pub fn kill_node_services(&self, i: usize) {
        let pids = self.nodes[i].root.join("var/lib/hashistack/pids");
        procs::signal_pid_files(&pids, nix::sys::signal::Signal::SIGKILL);
    }

    /// What an image roll (`az vmss update-instances`) does to a VM: power off, replace the OS disk with a
    /// fresh one from the image, power on. Everything under the node's root is removed except its data disk
    /// (`Layout::data_disk_dir`, `<root>/var/lib/hashistack-data`): configs, certificates, the agent's state
    /// (boot record, version cache) and logs are gone, the raft data and the escrow spool stay. The image's
    /// agent.toml is written again and the agent boots.
    pub async fn reimage(&mut self, i: usize) -> Result<(), LabError> {
        self.stop_agent(i).await;
        self.kill_node_services(i);
        let root = self.nodes[i].root.clone();
        let keep = hashistack_agent::render::Layout::new(&root).data_disk_dir();
        wipe_except(&root, &keep)?;
        let cfg = self.agent_config(&self.nodes[i].def, &root);
        std::fs::create_dir_all(root.join("etc/hashistack")).map_err(io("node root"))?;
        self.write_node_config(i, &cfg)?;
        self.start_agent(i)
    }

    pub async fn reboot(&mut self, i: usize) -> Result<(), LabError> {
        self.stop_agent(i).await;
        self.start_agent(i)
    }

    /// Waits until the node's current agent has finished its boot (successfully or not) and returns its record.
    pub async fn wait_booted(
        &self,
        i: usize,
        deadline: Duration,
    ) -> Result<hashistack_agent::boot::BootRecord, LabError> {
        let pid = self.nodes[i]
            .agent
            .as_ref()
            .and_then(|a| a.pid())
            .ok_or_else(|| LabError::Failed("agent not running".into()))?;
        let start = Instant::now();
        loop {
            if let Some(r) = self
                .boot_record(i)
                .filter(|r| r.pid == pid && (r.ok || r.last_error.is_some()))
            {
                return Ok(r);
            }
            if start.elapsed() > deadline {
                return Err(LabError::Failed(format!(
                    "{}: agent did not finish booting within {deadline:?}",
                    self.nodes[i].def.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.def.name == name)
    }

    /// The boot record an agent wrote, if any.
    pub fn boot_record(&self, i: usize) -> Option<hashistack_agent::boot::BootRecord> {
        let p = self.nodes[i].root.join("var/lib/hashistack/boot.json");
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    pub async fn health(&self) -> LabHealth {
        let t = Duration::from_secs(3);
        let mut nodes = Vec::new();
        for n in &self.nodes {
            let consul_ca = n.root.join("etc/consul.d/tls/ca.pem");
            let consul = health::probe(
                &hashistack_agent::services::Health::ConsulHttps {
                    addr: format!("{}:8501", n.def.ip),
                    ca_file: consul_ca.clone(),
                },
                t,
            )
            .await;
            let peers = if n.def.role == Role::ConsulServer {
                consul_peers(&n.def.ip, &consul_ca, t).await
            } else {
                None
            };
            let vault = if n.def.role == Role::VaultServer {
                Some(
                    health::probe(
                        &hashistack_agent::services::Health::VaultHttps {
                            addr: format!("{}:8200", n.def.ip),
                            ca_file: n.root.join("etc/vault.d/tls/ca.pem"),
                        },
                        t,
                    )
                    .await,
                )
            } else {
                None
            };
            let nomad = if matches!(n.def.role, Role::NomadServer | Role::Worker) {
                Some(
                    health::probe(
                        &hashistack_agent::services::Health::NomadHttps {
                            addr: format!("{}:4646", n.def.ip),
                            ca_file: n.root.join("etc/nomad.d/tls/ca.pem"),
                            tls_name: (n.def.role == Role::Worker)
                                .then(|| "client.global.nomad".into()),
                        },
                        t,
                    )
                    .await,
                )
            } else {
                None
            };
            let boot = self
                .nodes
                .iter()
                .position(|m| m.def.name == n.def.name)
                .and_then(|i| self.boot_record(i));
            nodes.push(NodeHealth {
                name: n.def.name.clone(),
                role: n.def.role.to_string(),
                ip: n.def.ip.to_string(),
                boot_ok: boot.as_ref().map(|b| b.ok),
                boot_error: boot.as_ref().and_then(|b| b.last_error.clone()),
                bootstrap: boot.and_then(|b| b.bootstrap),
                consul,
                raft_peers: peers,
                vault,
                nomad,
                gossip_encrypted: n.root.join("etc/consul.d/gossip.json").is_file(),
                agent_token: n.root.join("etc/consul.d/acl-tokens.json").is_file(),
            });
        }
        LabHealth {
            consul_servers: self.opts.consul_servers,
            vault_servers: self.opts.vault_servers,
            bootstrap_expected: self.opts.bootstrap,
            nodes,
        }
    }

    /// Waits until every Consul server agrees on a leader with all peers, every Consul client knows the
    /// leader, and every Vault server answers (uninitialized until the bootstrap).
    pub async fn wait_healthy(
        &self,
        deadline: Duration,
    ) -> Result<LabHealth, (LabError, LabHealth)> {
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let h = self.health().await;
            if h.healthy() {
                return Ok(h);
            }
            if let Some(bad) = h.nodes.iter().find(|n| n.boot_ok == Some(false)) {
                let e = LabError::Failed(format!(
                    "agent on {} failed: {}",
                    bad.name,
                    bad.boot_error.clone().unwrap_or_default()
                ));
                return Err((e, h));
            }
            if start.elapsed() > deadline {
                return Err((
                    LabError::Failed(format!("cluster not healthy within {deadline:?}")),
                    h,
                ));
            }
            if self.opts.verbose && last_report.elapsed() > Duration::from_secs(3) {
                last_report = Instant::now();
                say(
                    &self.opts,
                    format!("waiting ({}s): {}", start.elapsed().as_secs(), h.progress()),
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Stops everything this lab started, and removes its state unless `keep`.
    /// Stops everything at once: every agent is asked to stop (SIGTERM) together and given `DOWN_GRACE`, then what
    /// is left and every service the agents started are killed (the lab's data is thrown away or kept as is with
    /// `--keep`; nothing needs an orderly leave). Says what it waits for when that takes more than a second.
    pub async fn down(mut self) {
        const DOWN_GRACE: Duration = Duration::from_secs(5);
        let verbose = self.opts.verbose;
        let say = |what: &'static str| {
            move |names: &[String]| {
                if verbose {
                    eprintln!(
                        "lab: stopping: waiting for {what} {} to exit (killed after {}s)",
                        names.join(", "),
                        DOWN_GRACE.as_secs()
                    );
                }
            }
        };
        let agents: Vec<Proc> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.agent.take())
            .collect();
        procs::stop_all(agents, DOWN_GRACE, say("agents")).await;
        for i in 0..self.nodes.len() {
            self.kill_node_services(i);
            self.nodes[i].imds_task.abort();
        }
        for t in self.extra_tasks.drain(..) {
            t.abort();
        }
        if let Some(kv) = self.keyvault.take() {
            kv.stop();
        }
        let emulators: Vec<Proc> = [self.transit.take(), self.azurite.take()]
            .into_iter()
            .flatten()
            .collect();
        procs::stop_all(emulators, DOWN_GRACE, say("emulators")).await;
        let _ = std::fs::remove_file(self.opts.state_dir.join("lab.pid"));
        if !self.opts.keep {
            let _ = std::fs::remove_dir_all(&self.opts.state_dir);
        }
    }
}

impl Drop for Lab {
    /// A lab dropped without `down` (a failed test): nothing it started may outlive it.
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(p) = self.nodes[i].agent.as_mut() {
                let _ = p.child.start_kill();
            }
            self.kill_node_services(i);
        }
    }
}

async fn consul_peers(ip: &Ipv4Addr, ca: &Path, t: Duration) -> Option<usize> {
    let c = health::client_for(ca, t).ok()?;
    let peers: Vec<String> = c
        .get(format!("https://{ip}:8501/v1/status/peers"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(peers.len())
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeHealth {
    pub name: String,
    pub role: String,
    pub ip: String,
    pub boot_ok: Option<bool>,
    pub boot_error: Option<String>,
    pub consul: Probe,
    pub raft_peers: Option<usize>,
    pub vault: Option<Probe>,
    /// Nomad servers: their HTTPS API knows the leader.
    pub nomad: Option<Probe>,
    pub gossip_encrypted: bool,
    /// The agent's tier bootstrap outcome (server tiers).
    pub bootstrap: Option<String>,
    /// Consul runs with the least-privilege agent token handed over by the Consul tier's bootstrap.
    pub agent_token: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabHealth {
    pub consul_servers: u8,
    pub vault_servers: u8,
    pub bootstrap_expected: bool,
    pub nodes: Vec<NodeHealth>,
}

impl LabHealth {
    /// Whether a node's Consul agent is expected to run. Workers and the jumpbox start Consul only once the
    /// Consul tier's bootstrap handed out the agent token (their auto-encrypt certificate request needs it):
    /// in a lab without the bootstrap they wait, and are not counted.
    fn consul_expected(&self, n: &NodeHealth) -> bool {
        self.bootstrap_expected || !matches!(n.role.as_str(), "worker" | "jumpbox")
    }

    pub fn consul_leader(&self) -> Option<String> {
        let expected: Vec<&NodeHealth> = self
            .nodes
            .iter()
            .filter(|n| self.consul_expected(n))
            .collect();
        let leaders: Vec<&str> = expected
            .iter()
            .filter_map(|n| match &n.consul {
                Probe::Leader { leader } => Some(leader.as_str()),
                _ => None,
            })
            .collect();
        let first = leaders.first()?;
        (leaders.len() == expected.len() && leaders.iter().all(|l| l == first))
            .then(|| first.to_string())
    }

    pub fn consul_healthy(&self) -> bool {
        let servers_ok = self
            .nodes
            .iter()
            .filter(|n| n.role == "consul-server")
            .all(|n| n.raft_peers == Some(self.consul_servers as usize));
        servers_ok
            && self.consul_leader().is_some()
            && self
                .nodes
                .iter()
                .filter(|n| self.consul_expected(n))
                .all(|n| n.gossip_encrypted)
    }

    /// Healthy: Consul formed; without bootstrap every Vault answers; with it every Vault is initialized and
    /// unsealed and every server agent finished its tier's bootstrap.
    pub fn healthy(&self) -> bool {
        if !self.consul_healthy() || !self.nomad_led() {
            return false;
        }
        if !self.bootstrap_expected {
            return self.vault_answering();
        }
        self.vault_unsealed() && self.bootstrapped() && self.nodes.iter().all(|n| n.agent_token)
    }

    pub fn vault_unsealed(&self) -> bool {
        self.nodes.iter().filter_map(|n| n.vault.as_ref()).all(|v| {
            *v == Probe::Vault {
                initialized: true,
                sealed: false,
            }
        })
    }

    /// Every Nomad server knows the same leader (vacuous without Nomad servers).
    pub fn nomad_led(&self) -> bool {
        let leaders: Vec<&str> = self
            .nodes
            .iter()
            .filter_map(|n| match &n.nomad {
                Some(Probe::Leader { leader }) => Some(leader.as_str()),
                _ => None,
            })
            .collect();
        let servers = self.nodes.iter().filter(|n| n.nomad.is_some()).count();
        leaders.len() == servers && leaders.windows(2).all(|w| w[0] == w[1])
    }

    pub fn bootstrapped(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.role.as_str(),
                    "consul-server" | "vault-server" | "nomad-server"
                )
            })
            .all(|n| {
                matches!(
                    n.bootstrap.as_deref(),
                    Some("bootstrapped" | "already-done" | "recovered")
                )
            })
    }

    pub fn vault_answering(&self) -> bool {
        self.nodes
            .iter()
            .filter_map(|n| n.vault.as_ref())
            .all(|v| matches!(v, Probe::Vault { .. }))
    }

    pub fn progress(&self) -> String {
        let consul_up = self
            .nodes
            .iter()
            .filter(|n| matches!(n.consul, Probe::Leader { .. }))
            .count();
        let vault_up = self
            .nodes
            .iter()
            .filter(|n| matches!(n.vault, Some(Probe::Vault { .. })))
            .count();
        format!(
            "consul agents with a leader {consul_up}/{}, vault servers answering {vault_up}/{}",
            self.nodes.len(),
            self.vault_servers
        )
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let verdict = if self.healthy() {
            "HEALTHY"
        } else {
            "NOT HEALTHY"
        };
        s.push_str(&format!(
            "{verdict}: consul leader {}\n",
            self.consul_leader().unwrap_or_else(|| "none".into())
        ));
        s.push_str(&format!(
            "{:<10} {:<14} {:<14} {:<8} {:<24} {:<12} {:<26} {:<14} {}\n",
            "NODE", "ROLE", "IP", "BOOT", "CONSUL", "RAFT PEERS", "VAULT", "NOMAD", "BOOTSTRAP"
        ));
        for n in &self.nodes {
            let consul = match &n.consul {
                Probe::Leader { .. } => "alive, TLS+gossip".to_string(),
                Probe::NoLeader => "no leader".into(),
                Probe::Unreachable { .. } => "unreachable".into(),
                Probe::Vault { .. } => "?".into(),
            };
            let vault = match &n.vault {
                None => "-".to_string(),
                Some(Probe::Vault {
                    initialized,
                    sealed,
                }) => {
                    format!(
                        "{}, {}",
                        if *initialized {
                            "initialized"
                        } else {
                            "not initialized"
                        },
                        if *sealed { "sealed" } else { "unsealed" }
                    )
                }
                Some(Probe::Unreachable { error }) => format!("unreachable ({error})"),
                Some(_) => "?".into(),
            };
            let nomad = match &n.nomad {
                None => "-",
                Some(Probe::Leader { .. }) => "leader known",
                Some(Probe::NoLeader) => "no leader",
                Some(Probe::Unreachable { .. }) => "unreachable",
                Some(_) => "?",
            };
            let boot = match n.boot_ok {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "running",
            };
            s.push_str(&format!(
                "{:<10} {:<14} {:<14} {:<8} {:<24} {:<12} {:<26} {:<14} {}\n",
                n.name,
                n.role,
                n.ip,
                boot,
                consul,
                n.raft_peers
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                vault,
                nomad,
                n.bootstrap.as_deref().unwrap_or("-")
            ));
        }
        s
    }
}
