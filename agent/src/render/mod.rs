//! Rendering: NodeSpec (+ versions, + key material) → the files and services this node needs.
//! Pure: reads nothing, writes nothing. Typed config structs are serialised to JSON; no string templates.

pub mod consul;
pub mod dns;
pub mod nomad;
pub mod operator;
pub mod vault;

use crate::config::{AgentConfig, Owners};
use crate::files::{DirSpec, FileSpec, Owner};
use crate::node::{Join, NodeSpec, Role};
use crate::services::ServiceSpec;
use crate::tls::NodeCert;
use crate::version::{Installed, Product};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where things live on a node. Every path is under `root` (`/` on a VM).
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    /// `paths.vault_audit_file`, when the configuration names one (see [`vault::audit_file`]).
    pub vault_audit_file: Option<PathBuf>,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_path_buf(),
            vault_audit_file: None,
        }
    }
    /// The layout the agent's `[paths]` configuration describes.
    pub fn from_paths(p: &crate::config::PathsConfig) -> Self {
        Layout {
            root: p.root.clone(),
            vault_audit_file: p.vault_audit_file.clone(),
        }
    }
    fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }
    pub fn config_dir(&self, p: Product) -> PathBuf {
        self.at(&format!("/etc/{}.d", p.as_str()))
    }
    pub fn config_file(&self, p: Product) -> PathBuf {
        self.config_dir(p).join(format!("{}.json", p.as_str()))
    }
    /// Secret settings (gossip keys) live in their own file so the main config holds nothing secret.
    pub fn gossip_file(&self, p: Product) -> PathBuf {
        self.config_dir(p).join("gossip.json")
    }
    pub fn tls_dir(&self, p: Product) -> PathBuf {
        self.config_dir(p).join("tls")
    }
    pub fn ca_file(&self, p: Product) -> PathBuf {
        self.tls_dir(p).join("ca.pem")
    }
    pub fn cert_file(&self, p: Product) -> PathBuf {
        self.tls_dir(p).join(format!("{}.pem", p.as_str()))
    }
    pub fn key_file(&self, p: Product) -> PathBuf {
        self.tls_dir(p).join(format!("{}-key.pem", p.as_str()))
    }
    pub fn issued_file(&self, p: Product) -> PathBuf {
        self.tls_dir(p).join(format!("{}.issued.json", p.as_str()))
    }
    /// The server tiers' data disk (LUN 0) is mounted here; on other roles it is an unused, empty directory.
    /// Everything a server must keep across an image roll lives under it (docs/architecture.md).
    pub fn data_disk_dir(&self) -> PathBuf {
        self.at("/var/lib/hashistack-data")
    }
    /// A product's data directory: on the data disk on server tiers (every product there, the Consul
    /// client included, so a reimaged node keeps its node id), on the OS disk elsewhere.
    pub fn data_dir(&self, p: Product, role: Role) -> PathBuf {
        if role.is_server_tier() {
            self.data_disk_dir().join(p.as_str())
        } else {
            self.at(&format!("/opt/{}/data", p.as_str()))
        }
    }
    /// The escrow spool (server tiers only bootstrap): on the data disk, so an interrupted bootstrap's
    /// secrets survive an image roll of the node that holds them.
    pub fn spool_dir(&self) -> PathBuf {
        self.data_disk_dir().join("escrow-spool")
    }
    pub fn env_file(&self, service: &str) -> PathBuf {
        self.at(&format!("/etc/hashistack/env/{service}.env"))
    }
    /// World-readable: what operators need without privileges (the jumpbox only; render/operator.rs).
    pub fn operator_dir(&self) -> PathBuf {
        self.at("/etc/hashistack/operator")
    }
    pub fn operator_ca_file(&self) -> PathBuf {
        self.operator_dir().join("ca.pem")
    }
    pub fn operator_env_file(&self, p: Product) -> PathBuf {
        self.operator_dir().join(format!("{}.env", p.as_str()))
    }
    pub fn state_dir(&self) -> PathBuf {
        self.at("/var/lib/hashistack")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.at("/var/log/hashistack")
    }
}

/// Secrets needed to render a complete node. Absent for offline renders, which then write no key material.
pub struct Material {
    pub ca_pem: String,
    pub certs: BTreeMap<Product, NodeCert>,
    pub consul_gossip_key: String,
    pub nomad_gossip_key: String,
    pub seal_token: Option<String>,
    /// `acl.tokens.agent` for Consul, once the Consul tier's bootstrap handed it over.
    pub consul_agent_token: Option<String>,
    /// Nomad's own Consul token (`consul.token`, nodes that run Nomad only), once the Consul tier's bootstrap
    /// handed it over: rendered into `consul-token.json` (0640) next to `nomad.json`.
    pub nomad_consul_token: Option<String>,
    /// Consul servers only: the cluster CA key, given to Consul's built-in CA so that the certificates it
    /// signs for auto-encrypt clients chain to the cluster CA (`connect-ca.json`, 0640).
    pub consul_connect_ca_key: Option<String>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("certs", &self.certs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Everything `render` decides.
#[derive(Debug, Default)]
pub struct Plan {
    pub dirs: Vec<DirSpec>,
    pub files: Vec<FileSpec>,
    pub services: Vec<ServiceSpec>,
    /// Units of the image the agent only configures (systemd-resolved, Docker): restarted when their file changed.
    pub host_units: Vec<dns::HostUnit>,
}

/// Rendering options that come from the agent config, not from the node.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    pub owners: Owners,
    pub loopback: bool,
    pub consul_bin: PathBuf,
    pub vault_bin: PathBuf,
    pub nomad_bin: PathBuf,
}

impl RenderOptions {
    pub fn from_config(c: &AgentConfig) -> Self {
        RenderOptions {
            owners: c.paths.owners,
            loopback: c.listen.loopback,
            consul_bin: c.services.consul_bin.clone(),
            vault_bin: c.services.vault_bin.clone(),
            nomad_bin: c.services.nomad_bin.clone(),
        }
    }

    pub(crate) fn owner(&self, user: &str) -> Owner {
        match self.owners {
            Owners::ServiceUsers => Owner::named(user, user),
            Owners::CurrentUser => Owner::Current,
        }
    }
}

/// How long each product keeps metrics for a Prometheus scrape (`telemetry.prometheus_retention_time`): the
/// `/v1/agent/metrics` (Consul), `/v1/sys/metrics` (Vault) endpoints answer `?format=prometheus` only when it
/// is set. A scraper polling every 15–60 s finds every gauge.
pub const PROMETHEUS_RETENTION: &str = "60s";

/// Consul's and Vault's `telemetry` block (the same keys in both; docs/operability.md).
#[derive(Debug, serde::Serialize)]
pub struct PrometheusTelemetry {
    pub prometheus_retention_time: String,
    /// Metric names without the node's hostname: one series per metric, the node in the scrape's labels.
    pub disable_hostname: bool,
}

impl PrometheusTelemetry {
    pub fn new() -> Self {
        PrometheusTelemetry {
            prometheus_retention_time: PROMETHEUS_RETENTION.into(),
            disable_hostname: true,
        }
    }
}

impl Default for PrometheusTelemetry {
    fn default() -> Self {
        Self::new()
    }
}

/// Versions of the installed binaries, per product.
pub type Versions = BTreeMap<Product, Installed>;

/// The service user that owns a product's files on this role. The Nomad client runs as root (Docker).
pub fn service_user(p: Product, role: Role) -> &'static str {
    match (p, role) {
        (Product::Consul, _) => "consul",
        (Product::Vault, _) => "vault",
        (Product::Nomad, Role::Worker) => "root",
        (Product::Nomad, _) => "nomad",
    }
}

/// The names a node's certificate for `p` carries.
pub fn cert_sans(spec: &NodeSpec, p: Product) -> Vec<String> {
    let mut sans = vec![spec.node_name.clone()];
    match (p, spec.role) {
        (Product::Consul, Role::ConsulServer) => {
            sans.push(format!("server.{}.consul", spec.datacenter))
        }
        (Product::Consul, _) => sans.push(format!("client.{}.consul", spec.datacenter)),
        (Product::Vault, _) => {
            sans.push("vault.service.consul".into());
            sans.push("active.vault.service.consul".into());
            // The load balancer's address clients use (tag hashistack-vault-address).
            if let Some(a) = &spec.vault_address {
                sans.push(crate::node::url_host(a).to_string());
            }
        }
        (Product::Nomad, Role::NomadServer) => {
            sans.push("server.global.nomad".into());
            // Vault fetches the servers' JWKS by this name (workload identities; node.rs DEFAULT_NOMAD_ADDRESS).
            sans.push("nomad.service.consul".into());
        }
        (Product::Nomad, _) => sans.push("client.global.nomad".into()),
    }
    sans.push("localhost".into());
    sans.push(spec.ip.to_string());
    sans.push("127.0.0.1".into());
    sans
}

pub fn join_list(j: &Join) -> Vec<String> {
    match j {
        Join::Cloud(expr) => vec![expr.clone()],
        Join::Static(ips) => ips.iter().map(|ip| ip.to_string()).collect(),
    }
}

pub(crate) fn path_str(p: &Path) -> String {
    p.display().to_string()
}

pub(crate) fn json_file(
    path: PathBuf,
    value: &impl serde::Serialize,
    mode: u32,
    owner: Owner,
    secret: bool,
) -> FileSpec {
    let mut content = serde_json::to_vec_pretty(value).expect("config structs always serialise");
    content.push(b'\n');
    FileSpec {
        path,
        content,
        mode,
        owner,
        secret,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("no installed version known for {0}")]
    NoVersion(Product),
}

/// Renders the node. With `material == None` (offline) no key material, certificate or env file is produced.
pub fn render(
    spec: &NodeSpec,
    layout: &Layout,
    opts: &RenderOptions,
    versions: &Versions,
    material: Option<&Material>,
) -> Result<Plan, RenderError> {
    let mut plan = Plan::default();
    for p in spec.products() {
        let installed = versions.get(&p).ok_or(RenderError::NoVersion(p))?;
        let owner = opts.owner(service_user(p, spec.role));
        plan.dirs.push(DirSpec {
            path: layout.config_dir(p),
            mode: 0o750,
            owner: owner.clone(),
        });
        plan.dirs.push(DirSpec {
            path: layout.tls_dir(p),
            mode: 0o750,
            owner: owner.clone(),
        });
        plan.dirs.push(DirSpec {
            path: layout.data_dir(p, spec.role),
            mode: 0o750,
            owner: owner.clone(),
        });
        if p == Product::Vault {
            // The audit device's directory (the only log path vault.service may write).
            plan.dirs.push(DirSpec {
                path: layout.root.join("var/log/vault"),
                mode: 0o750,
                owner: owner.clone(),
            });
        }
        match p {
            Product::Consul => {
                consul::render(spec, layout, opts, installed, material, owner, &mut plan)
            }
            Product::Vault => {
                vault::render(spec, layout, opts, installed, material, owner, &mut plan)
            }
            Product::Nomad => {
                nomad::render(spec, layout, opts, installed, material, owner, &mut plan)
            }
        }
        if let Some(m) = material {
            tls_files(
                layout,
                p,
                m,
                opts.owner(service_user(p, spec.role)),
                &mut plan,
            );
        }
    }
    if let Some(m) = material {
        operator::render(spec, layout, opts, m, &mut plan);
    }
    // Every node runs a Consul agent: `.consul` names through it (docs/dns.md).
    dns::render(spec, layout, opts, &mut plan);
    if material.is_some() {
        let env_dir = layout
            .env_file("x")
            .parent()
            .expect("env file has a parent")
            .to_path_buf();
        plan.dirs.insert(
            0,
            DirSpec {
                path: env_dir,
                mode: 0o700,
                owner: opts.owner("root"),
            },
        );
    }
    Ok(plan)
}

/// The CA certificate always; the node's certificate and key when it has one for `p` (a Consul client gets
/// its certificate from the servers over `auto_encrypt` and holds none on disk).
fn tls_files(layout: &Layout, p: Product, m: &Material, owner: Owner, plan: &mut Plan) {
    let f = |path, content: &str, mode, secret| FileSpec {
        path,
        content: content.as_bytes().to_vec(),
        mode,
        owner: owner.clone(),
        secret,
    };
    plan.files
        .push(f(layout.ca_file(p), &m.ca_pem, 0o644, false));
    let Some(cert) = m.certs.get(&p) else { return };
    plan.files
        .push(f(layout.cert_file(p), &cert.cert_pem, 0o644, false));
    plan.files
        .push(f(layout.key_file(p), &cert.key_pem, 0o600, true));
    plan.files.push(json_file(
        layout.issued_file(p),
        &cert.issued_for,
        0o644,
        owner.clone(),
        false,
    ));
}

/// Environment every service gets: the user-assigned identity, when there is one (Azure SDKs and go-discover
/// select it by `AZURE_CLIENT_ID`).
pub(crate) fn identity_env(spec: &NodeSpec) -> Vec<(&'static str, &str)> {
    spec.identity_client_id
        .as_deref()
        .map(|id| vec![("AZURE_CLIENT_ID", id)])
        .unwrap_or_default()
}

/// An `EnvironmentFile=` for a unit: `KEY=value` lines. Values are single-line by construction.
pub(crate) fn env_file(path: PathBuf, vars: &[(&str, &str)], owner: Owner) -> FileSpec {
    let mut s = String::new();
    for (k, v) in vars {
        s.push_str(k);
        s.push('=');
        s.push_str(v);
        s.push('\n');
    }
    FileSpec {
        path,
        content: s.into_bytes(),
        mode: 0o600,
        owner,
        secret: true,
    }
}

/// Files under `root` re-rooted at `out` (for `render --out`): `/etc/consul.d/x` → `<out>/etc/consul.d/x`.
pub fn rebase(plan: &mut Plan, root: &Path, out: &Path) {
    let re = |p: &mut PathBuf| {
        if let Ok(rel) = p.strip_prefix(root) {
            *p = out.join(rel);
        }
    };
    plan.files.iter_mut().for_each(|f| re(&mut f.path));
    plan.dirs.iter_mut().for_each(|d| re(&mut d.path));
}
