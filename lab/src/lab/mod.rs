//! Azure-in-a-box: a fake IMDS per node, Azurite, the Key Vault contract double, a transit OpenBao standing in for
//! Key Vault auto-unseal, and one real `hashistack-agent` per node using the process backend. Every node has
//! its own loopback address `127.<net>.0.x`, so the default product ports work as on separate VMs, and two
//! labs with different `net` values never collide.
//!
//! Where things are: this file holds the options, the error, the lab's state and small helpers; `up.rs` starting
//! the emulators and the transit OpenBao, and taking the lab down; `azure.rs` what stands in for Azure (the HTTPS
//! client, Blob Storage, Key Vault URIs); `nodes.rs` the nodes' definitions, configurations and lifecycles
//! (start, stop, kill, reimage, reboot); `operator.rs` what an operator does from outside (IMDS identities, the
//! Nomad management token, smoke, the `nomad` link); `status.rs` the lab's health and its table.

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

mod azure;
mod nodes;
mod operator;
mod status;
mod up;

pub use nodes::*;
pub use status::*;

pub const IMDS_PORT: u16 = 16925;
pub const AZURITE_PORT: u16 = 10000;
/// Azurite's CPU priority, ahead of the nodes' (0). It stands for Azure Blob Storage, which no VM takes CPU
/// from; on a small machine, at the nodes' priority, its answers wait behind ten booting nodes (0.1–0.5 s
/// each where it needs 3–5 ms), and every agent waits on them (docs/PERFORMANCE.md, "The lab's storage").
/// Azurite uses little CPU over a lab's boot (about one CPU-second), so the nodes lose little of theirs.
pub const AZURITE_NICE: i32 = -10;
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
