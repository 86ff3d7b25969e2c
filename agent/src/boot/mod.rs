//! `hashistack-agent boot`: metadata → NodeSpec → files → services, idempotent at every boot.
//! Everything that can be wrong with the inputs is found before the first byte is written.

use crate::config::{AgentConfig, Backend};
use crate::files::{self, FileError};
use crate::imds::{ImdsClient, ImdsError, InstanceMetadata};
use crate::node::{NodeSpec, SpecError};
use crate::render::{self, Layout, Plan, RenderOptions, Versions};
use crate::retry::{RetryError, RetryPolicy};
use crate::services::{process::ProcessManager, systemd::Systemd, ServiceError, ServiceManager};

use crate::version::{self, Installed, Product, VersionError};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Imds(#[from] RetryError<ImdsError>),
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    UserData(#[from] crate::userdata::UserDataError),
    #[error("{0}")]
    OperatorKeys(#[from] crate::escrow::pgp::PgpKeyError),
    #[error("{0}")]
    Material(String),
    /// The Azure clients cannot be built (the agent config's `azure.extra_ca_file`).
    #[error("{0}")]
    AzureClient(#[from] crate::tls::HttpsClientError),
    /// Only where certificates may not be issued (a warm boot, which then boots cold).
    #[error("{0} certificate: none on disk still good for this CA and these names")]
    NoKeptCert(Product),
    #[error("{0}")]
    Version(#[from] VersionError),
    #[error("{0}")]
    ClusterMaterial(#[from] crate::material::MaterialError),
    #[error("{0}")]
    Render(#[from] render::RenderError),
    #[error("{0}")]
    Files(#[from] FileError),
    #[error("{0}")]
    Service(#[from] ServiceError),
    #[error("{0}")]
    Disk(#[from] crate::disk::DiskError),
}

impl BootError {
    /// 2: the inputs are wrong (config, metadata, tags, key material); 1: something failed at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            BootError::Config(_)
            | BootError::Spec(_)
            | BootError::UserData(_)
            | BootError::OperatorKeys(_)
            | BootError::Material(_)
            | BootError::AzureClient(_) => 2,
            BootError::Imds(RetryError::Final(ImdsError::Body { .. })) => 2,
            _ => 1,
        }
    }

    pub fn phase(&self) -> Phase {
        match self {
            BootError::Config(_) => Phase::Config,
            BootError::Imds(_) => Phase::Metadata,
            BootError::Spec(_) | BootError::UserData(_) | BootError::OperatorKeys(_) => {
                Phase::NodeSpec
            }
            BootError::Material(_)
            | BootError::AzureClient(_)
            | BootError::NoKeptCert(_)
            | BootError::Version(_)
            | BootError::Render(_)
            | BootError::ClusterMaterial(_) => Phase::Render,
            BootError::Files(_) => Phase::Write,
            BootError::Service(_) => Phase::Services,
            BootError::Disk(_) => Phase::Disk,
        }
    }
}

pub use crate::record::{record_path, BootRecord, Phase};

mod material;
use material::fetch_material_with;
pub use material::load_material;
pub(crate) use material::{fetch_material, material_vaults, warm_material};

pub(crate) fn write_record(layout: &Layout, rec: &BootRecord) {
    let f = render::json_file(
        record_path(layout),
        rec,
        0o644,
        files::Owner::Current,
        false,
    );
    if let Err(e) = files::write_atomic(&f) {
        tracing::warn!(error = %e, "cannot write boot record");
    }
}

/// What boot produced, for the caller (and the lab) to keep supervising.
pub struct Booted {
    pub spec: NodeSpec,
    pub plan: Plan,
    pub manager: std::sync::Arc<dyn BootManager>,
    pub record: BootRecord,
    /// Operators' PGP keys for the escrow (server tiers with the option on; docs/pgp-escrow.md).
    pub operator_keys: Option<std::sync::Arc<crate::escrow::pgp::OperatorKeys>>,
    /// A warm boot: the material on disk it started the services from, for `converge::run` to confirm.
    pub warm: Option<crate::warm::DiskMaterial>,
    /// The products' versions this boot rendered for (a re-render after the boot uses them again).
    pub versions: Versions,
    /// A cold boot's Azure clients (`None` on a warm boot): the tier bootstrap goes on with them, over the
    /// connections, identity tokens and Key Vault challenges the boot already has.
    pub azure: Option<crate::azure::Azure>,
}

/// A service manager that may need to keep running after boot (the process backend).
#[async_trait::async_trait]
pub trait BootManager: ServiceManager {
    async fn run_until(
        &self,
        shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    );
}

#[async_trait::async_trait]
impl BootManager for Systemd {
    async fn run_until(
        &self,
        _shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) {
    }
}

#[async_trait::async_trait]
impl BootManager for ProcessManager {
    async fn run_until(
        &self,
        shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) {
        self.supervise(shutdown).await
    }
}

/// Fetches metadata with the configured endpoint and deadline.
pub async fn fetch_metadata(cfg: &AgentConfig) -> Result<InstanceMetadata, BootError> {
    let client = ImdsClient::new(&cfg.imds.endpoint, RetryPolicy::imds(cfg.imds_deadline()));
    Ok(client.instance().await?)
}

/// Versions of the binaries a node needs, cached by (path, size, mtime) so a normal boot spawns nothing.
pub async fn detect_versions(
    cfg: &AgentConfig,
    layout: &Layout,
    products: &[Product],
) -> Result<Versions, BootError> {
    #[derive(Serialize, Deserialize, Default)]
    struct Cache(BTreeMap<String, (u64, i64, String, String)>);
    let cache_path = layout.state_dir().join("versions.json");
    let mut cache: Cache = std::fs::read(&cache_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut out = Versions::new();
    let mut dirty = false;
    for &p in products {
        let bin = bin_for(cfg, p);
        let key = bin.display().to_string();
        let stamp = std::fs::metadata(&bin).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.size(), m.mtime())
        });
        let cached = match (stamp, cache.0.get(&key)) {
            (Some((size, mtime)), Some((s, t, dist, v))) if *s == size && *t == mtime => {
                version::Version::parse(v).map(|version| Installed {
                    distribution: dist.clone(),
                    version,
                })
            }
            _ => None,
        };
        let installed = match cached {
            Some(i) => i,
            None => {
                let i = version::detect(p, &bin).await?;
                if let Some((size, mtime)) = stamp {
                    cache.0.insert(
                        key,
                        (size, mtime, i.distribution.clone(), i.version.to_string()),
                    );
                    dirty = true;
                }
                i
            }
        };
        out.insert(p, installed);
    }
    if dirty {
        let f = render::json_file(cache_path, &cache, 0o644, files::Owner::Current, false);
        let _ = files::write_atomic(&f);
    }
    Ok(out)
}

pub fn bin_for(cfg: &AgentConfig, p: Product) -> PathBuf {
    match p {
        Product::Consul => cfg.services.consul_bin.clone(),
        Product::Vault => cfg.services.vault_bin.clone(),
        Product::Nomad => cfg.services.nomad_bin.clone(),
    }
}

/// Writes the plan; returns the paths that changed (never their content).
pub fn write_plan(plan: &Plan) -> Result<Vec<PathBuf>, BootError> {
    let mut changed = Vec::new();
    for d in &plan.dirs {
        files::ensure_dir(d)?;
    }
    for f in &plan.files {
        if files::write_atomic(f)? {
            changed.push(f.path.clone());
        }
    }
    Ok(changed)
}

/// The whole boot up to services started. `started` is when the process began (for the critical path).
pub async fn boot(
    cfg: &AgentConfig,
    started: Instant,
) -> Result<Booted, (BootError, Option<BootRecord>, Option<InstanceMetadata>)> {
    let layout = Layout::from_paths(&cfg.paths);
    let mut record = BootRecord::starting(env!("CARGO_PKG_VERSION"), std::process::id());
    let mut metadata = None;
    let result = boot_inner(cfg, &layout, started, &mut record, &mut metadata).await;
    record.finished_unix = time::OffsetDateTime::now_utc().unix_timestamp();
    match result {
        Ok((spec, plan, manager, operator_keys, warm, versions, azure)) => {
            record.ok = true;
            record.phase = Phase::Done;
            write_record(&layout, &record);
            Ok(Booted {
                spec,
                plan,
                manager,
                record,
                operator_keys,
                warm,
                versions,
                azure,
            })
        }
        Err(e) => {
            record.phase = e.phase();
            record.last_error = Some(e.to_string());
            write_record(&layout, &record);
            Err((e, Some(record), metadata))
        }
    }
}

async fn boot_inner(
    cfg: &AgentConfig,
    layout: &Layout,
    started: Instant,
    rec: &mut BootRecord,
    md_out: &mut Option<InstanceMetadata>,
) -> Result<
    (
        NodeSpec,
        Plan,
        std::sync::Arc<dyn BootManager>,
        Option<std::sync::Arc<crate::escrow::pgp::OperatorKeys>>,
        Option<crate::warm::DiskMaterial>,
        Versions,
        Option<crate::azure::Azure>,
    ),
    BootError,
> {
    let mut lap = started;
    let mut timed = |rec: &mut BootRecord, step: &str| {
        let now = Instant::now();
        let us = now.duration_since(lap).as_micros() as u64;
        rec.phases_us.insert(step.into(), us);
        lap = now;
    };
    timed(rec, "start");
    rec.phase = Phase::Metadata;
    let md = fetch_metadata(cfg).await?;
    *md_out = Some(md.clone());
    timed(rec, "metadata");
    rec.node = md.node_name();
    rec.phase = Phase::NodeSpec;
    let spec = NodeSpec::from_metadata(&md)?;
    crate::node::check_endpoints(&spec, &md.compute.az_environment, cfg.azure.endpoints)?;
    rec.role = Some(spec.role.to_string());
    rec.cluster = Some(spec.cluster.clone());
    tracing::info!(role = %spec.role, cluster = %spec.cluster, node = %spec.node_name, ip = %spec.ip, "node identified");
    // Warm or cold, from the material kept on disk; a cold boot's Azure clients (their trust store loaded)
    // and identity token are prepared while the userData is checked — nothing is written or sent to Key Vault
    // before the inputs are checked.
    // (A tag the material needs that is missing is reported after the userData and the data disk, as before.)
    let key_vault = match cfg.material.source {
        crate::config::MaterialSource::Files => None,
        crate::config::MaterialSource::Keyvault => Some(material_vaults(&spec).map(|vaults| {
            let source = crate::warm::Source::of(&spec, &vaults);
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let disk = crate::warm::load(layout, &source, nix::unistd::geteuid().as_raw(), now);
            (vaults, source, disk, now)
        })),
    };
    let cold = matches!(&key_vault, Some(Ok((_, _, Err(_), _))));
    let prepare = async {
        if !cold {
            return Ok(None);
        }
        let az = azure_for(cfg, &spec)?;
        if let Some(resource) = crate::node::key_vault_resource(&md.compute.az_environment) {
            az.prefetch_token(&resource).await;
        }
        Ok::<_, BootError>(Some(az))
    };
    // Before anything is written: a bad userData or operator key stops the boot here.
    let (operator_keys, prepared) = tokio::join!(operator_keys(cfg, &spec), prepare);
    let (operator_keys, prepared) = (operator_keys?, prepared?);
    timed(rec, "user-data");

    // Server tiers keep their data on the data disk, which hashistack-data.service mounted before this unit
    // started (this unit's mount namespace is private: it cannot mount). Without it, write nothing at all:
    // data written to the empty mount point on the OS disk would be lost at the next image roll.
    if spec.role.is_server_tier() && cfg.disk.mode == crate::config::DiskMode::Device {
        rec.phase = Phase::Disk;
        crate::disk::check_mounted(&layout.data_disk_dir(), &spec.role.to_string())?;
    }
    // The data disk is this cluster's and this tier's (or new: then marked so), before anything is written.
    if spec.role.is_server_tier() {
        rec.phase = Phase::Disk;
        let dir = layout.data_disk_dir();
        std::fs::create_dir_all(&dir).map_err(|e| crate::disk::DiskError::Io {
            what: "create",
            path: dir.clone(),
            source: e,
        })?;
        let owner = match cfg.paths.owners {
            crate::config::Owners::ServiceUsers => crate::files::Owner::named("root", "root"),
            crate::config::Owners::CurrentUser => crate::files::Owner::Current,
        };
        let claim = crate::disk::claim(
            &dir,
            &spec.cluster,
            &spec.role.to_string(),
            &spec.node_name,
            &owner,
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )?;
        if claim == crate::disk::Claim::New {
            tracing::info!(dir = %dir.display(), "data disk marked as this cluster's and tier's");
        }
    }

    rec.phase = Phase::Render;
    let key_vault = key_vault.transpose()?;
    // Warm: the material the agent kept on disk, unchanged since Key Vault last confirmed it, starts the
    // services at once; `converge::run` confirms it with Key Vault afterwards. Cold: wait for Key Vault, while
    // the products' versions are detected (both are inputs to render only).
    let mut keep = None;
    let mut from_key_vault = false;
    let (warm, material_fetch) = match key_vault {
        None => {
            rec.material = Some("files".into());
            (None, None)
        }
        Some((vaults, source, disk, now)) => {
            match disk.and_then(|d| warm_material(cfg, &spec, layout, &d).map(|m| (m, d))) {
                Ok(found) => (Some(found), None),
                Err(why) => {
                    if why != crate::warm::NotWarm::Absent {
                        tracing::info!(reason = %why, "cold boot: the cluster material comes from Key Vault");
                    }
                    (None, Some((vaults, source, now)))
                }
            }
        }
    };
    let fetch = async {
        let Some((vaults, source, now)) = &material_fetch else {
            return Ok(None);
        };
        let az = match &prepared {
            Some(az) => az.clone(),
            None => azure_for(cfg, &spec)?,
        };
        let m = fetch_material_with(&az, cfg, &spec, vaults, true).await?;
        Ok::<_, BootError>(Some((m, source.clone(), *now)))
    };
    let products = spec.products();
    let detect = async {
        let t = Instant::now();
        let v = detect_versions(cfg, layout, &products).await?;
        Ok::<_, BootError>((v, t.elapsed()))
    };
    // The first error ends both (a node whose binary cannot be probed does not wait out the material's
    // deadline; a creation cut short is a creator that died: its lease expires, the next creator starts over).
    let ((versions, versions_took), fetched) = tokio::try_join!(detect, fetch)?;
    rec.versions = versions
        .iter()
        .map(|(p, i)| (p.to_string(), format!("{} {}", i.distribution, i.version)))
        .collect();
    // The steps stay a partition of the critical path: `versions` is the probe's own time, `material` what
    // the material took beyond it (the Key Vault fetch ran beside the probe).
    timed(rec, "versions");
    let joined_us = rec.phases_us.get("versions").copied().unwrap_or(0);
    let versions_us = (versions_took.as_micros() as u64).min(joined_us);
    rec.phases_us.insert("versions".into(), versions_us);
    let shared = match fetched {
        Some((m, source, now)) => {
            keep = Some(crate::warm::DiskMaterial::from_cluster(
                &m, source, spec.role, now,
            ));
            from_key_vault = true;
            Some(m)
        }
        None => None,
    };
    if from_key_vault {
        rec.material = Some("key-vault".into());
    }
    let (material, warm) = match warm {
        Some((m, disk)) => {
            rec.material = Some("disk".into());
            rec.converge = Some("pending".into());
            (m, Some(disk))
        }
        None => (load_material(cfg, &spec, layout, shared.as_ref())?, None),
    };
    drop(shared);
    timed(rec, "material");
    *rec.phases_us.entry("material".into()).or_default() += joined_us - versions_us;
    let opts = RenderOptions::from_config(cfg);
    let plan = render::render(&spec, layout, &opts, &versions, Some(&material))?;
    drop(material);
    timed(rec, "render");

    rec.phase = Phase::Write;
    let changed = write_plan(&plan)?;
    timed(rec, "write");
    rec.files_changed = changed.iter().map(|p| p.display().to_string()).collect();
    if !changed.is_empty() {
        tracing::info!(files = changed.len(), "configuration changed");
    }

    rec.phase = Phase::Services;
    let manager: std::sync::Arc<dyn BootManager> = match cfg.services.backend {
        Backend::Systemd => std::sync::Arc::new(Systemd::default()),
        Backend::Process => std::sync::Arc::new(ProcessManager::new(
            layout.log_dir(),
            layout.state_dir().join("pids"),
        )),
    };
    apply_services(manager.as_ref(), &spec, &plan, &changed, rec).await?;
    timed(rec, "services");
    rec.critical_path_ms = Some(started.elapsed().as_millis() as u64);
    // After the critical path: what a cold boot read from Key Vault is kept for the next, warm, boot.
    if let Some(k) = keep {
        if let Err(e) = crate::warm::save(layout, &k) {
            tracing::warn!(error = %e, "cannot keep the cluster material on disk: the next boot is cold too");
        }
    }
    Ok((spec, plan, manager, operator_keys, warm, versions, prepared))
}

/// Starts the plan's services, restarting those whose files are among `changed` (and the image's units the
/// agent configures, when their file changed). Returns the services restarted.
pub(crate) async fn apply_services(
    manager: &dyn BootManager,
    spec: &NodeSpec,
    plan: &Plan,
    changed: &[PathBuf],
    rec: &mut BootRecord,
) -> Result<Vec<String>, BootError> {
    let mut restarted = Vec::new();
    for svc in &plan.services {
        if consul_waits_for_token(spec, plan, svc) {
            tracing::info!(
                service = %svc.name,
                "not started yet: its auto-encrypt certificate request needs the Consul agent token, which the Consul tier's bootstrap hands over"
            );
            continue;
        }
        // A service restarts when a file it reads changed.
        let touched = changed
            .iter()
            .any(|c| svc.watch.iter().any(|w| c.starts_with(w)));
        let action = manager.apply(svc, touched).await?;
        tracing::info!(service = %svc.name, ?action, "service applied");
        if action == crate::services::Action::Restarted {
            restarted.push(svc.name.clone());
        }
        rec.services.insert(svc.name.clone(), action);
    }
    // The image's units the agent configures (systemd-resolved, Docker): restarted when their file changed.
    for u in &plan.host_units {
        if changed.iter().any(|c| c == &u.watch) && manager.restart_host_unit(&u.unit).await? {
            tracing::info!(unit = %u.unit, "configuration changed; restarted");
            restarted.push(u.unit.clone());
        }
    }
    Ok(restarted)
}

/// The operators' PGP keys of a server tier that bootstraps (docs/pgp-escrow.md): from the scale set's
/// userData (`hashistack.pgpKeys`) when it has any — they replace `bootstrap.recovery_pgp_keys` of
/// agent.toml — else from agent.toml; validated against `bootstrap.recovery_shares`. `None`: option off.
pub async fn operator_keys(
    cfg: &AgentConfig,
    spec: &NodeSpec,
) -> Result<Option<std::sync::Arc<crate::escrow::pgp::OperatorKeys>>, BootError> {
    use crate::escrow::pgp::{KeySource, OperatorKeys};
    if !spec.role.is_server_tier() || !cfg.bootstrap.enabled {
        return Ok(None);
    }
    let client = ImdsClient::new(&cfg.imds.endpoint, RetryPolicy::imds(cfg.imds_deadline()));
    let user_data = crate::userdata::parse(&client.user_data().await?)?;
    let (source, list) = if !user_data.pgp_keys.is_empty() {
        if !cfg.bootstrap.recovery_pgp_keys.is_empty() {
            tracing::info!(
                "PGP keys in userData replace bootstrap.recovery_pgp_keys of the agent config"
            );
        }
        (KeySource::UserData, user_data.pgp_keys)
    } else {
        (
            KeySource::AgentConfig,
            cfg.bootstrap.recovery_pgp_keys.clone(),
        )
    };
    if list.is_empty() {
        return Ok(None);
    }
    let keys = OperatorKeys::parse(source, &list, cfg.bootstrap.recovery_shares)?;
    tracing::info!(%source, fingerprints = ?keys.fingerprints(), "PGP escrow: secrets are escrowed encrypted to these operator keys");
    Ok(Some(std::sync::Arc::new(keys)))
}

/// Whether `svc` is an auto-encrypt Consul (workers, the jumpbox) rendered without the agent token: Consul
/// 1.8 would retry its certificate request forever inside its start-up and never take the token on a
/// reload, so it starts only once `converge::consul_token` has rendered the token.
fn consul_waits_for_token(
    spec: &NodeSpec,
    plan: &Plan,
    svc: &crate::services::ServiceSpec,
) -> bool {
    svc.name == "consul"
        && render::consul::uses_auto_encrypt(spec.role)
        && !plan
            .files
            .iter()
            .any(|f| f.path.ends_with("acl-tokens.json"))
}

/// What the steps that run at once after the services started (the tier bootstrap and the Consul agent token,
/// `cli/boot.rs`) read of the boot: borrowed, never changed by either. What they change goes through
/// [`SharedRecord`] (the boot record) or is returned to the caller (a new plan), which applies it after both.
pub struct Started<'a> {
    pub spec: &'a NodeSpec,
    /// A cold boot's Azure clients ([`Booted::azure`]).
    pub azure: Option<&'a crate::azure::Azure>,
    pub plan: &'a Plan,
    pub manager: &'a std::sync::Arc<dyn BootManager>,
    pub operator_keys: Option<&'a std::sync::Arc<crate::escrow::pgp::OperatorKeys>>,
}

/// The boot record while several steps run at once: each changes only its own fields, under the lock, and
/// writes the whole record before releasing it, so the file always holds every step's latest and no step sees
/// another's half-made update.
pub struct SharedRecord<'a> {
    layout: Layout,
    record: std::sync::Mutex<&'a mut BootRecord>,
}

impl Booted {
    /// Splits the boot into what the steps after the services started read ([`Started`]) and the boot record
    /// they update ([`SharedRecord`]).
    pub fn split(&mut self, cfg: &AgentConfig) -> (Started<'_>, SharedRecord<'_>) {
        (
            Started {
                spec: &self.spec,
                azure: self.azure.as_ref(),
                plan: &self.plan,
                manager: &self.manager,
                operator_keys: self.operator_keys.as_ref(),
            },
            SharedRecord {
                layout: Layout::from_paths(&cfg.paths),
                record: std::sync::Mutex::new(&mut self.record),
            },
        )
    }
}

impl<'a> SharedRecord<'a> {
    fn lock(&self) -> std::sync::MutexGuard<'_, &'a mut BootRecord> {
        // A step that panicked holding the lock left a record that is still whole (every update is a few field
        // assignments): keep using it.
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Applies `f` to the record and writes it.
    pub fn update(&self, f: impl FnOnce(&mut BootRecord)) {
        let mut r = self.lock();
        f(&mut r);
        write_record(&self.layout, &r);
    }
    /// Applies `f` to the record without writing it (the next [`update`](Self::update) writes it).
    pub fn update_unwritten(&self, f: impl FnOnce(&mut BootRecord)) {
        f(&mut self.lock());
    }
    /// The record as it is now.
    pub fn snapshot(&self) -> BootRecord {
        self.lock().clone()
    }
}

/// The one-time tier bootstrap (server tiers only), after the services run. Updates and rewrites the boot record.
pub async fn bootstrap_phase(
    cfg: &AgentConfig,
    booted: &Started<'_>,
    record: &SharedRecord<'_>,
) -> Result<Option<crate::bootstrap::Outcome>, crate::bootstrap::BootstrapError> {
    use crate::bootstrap::{self, consul::ConsulTier, vault::VaultTier, Ctx};
    let spec = booted.spec;
    let layout = Layout::from_paths(&cfg.paths);
    // Server tiers always have an escrow vault (a required tag there); other roles have no tier bootstrap.
    let (blob, Some(escrow_vault)) = (spec.blob_endpoint.clone(), spec.escrow_vault_uri.clone())
    else {
        return Ok(None);
    };
    if !cfg.bootstrap.enabled
        || !matches!(
            spec.role,
            crate::node::Role::ConsulServer
                | crate::node::Role::VaultServer
                | crate::node::Role::NomadServer
        )
    {
        return Ok(None);
    }
    // A cold boot's clients, when there are: their connections, identity tokens and Key Vault challenges are
    // warm (a first request to a vault costs a 401 round trip, a new connection a TLS handshake).
    let az = match booted.azure {
        Some(az) => az.clone(),
        None => azure_for(cfg, spec).map_err(|e| bootstrap::BootstrapError::Tier {
            tier: spec.role.to_string(),
            message: e.to_string(),
        })?,
    };
    let mut policy = crate::escrow::policy();
    policy.deadline = std::time::Duration::from_secs(cfg.bootstrap.azure_deadline_secs);
    let ctx = Ctx {
        az,
        targets: crate::escrow::Targets {
            blob_endpoint: blob,
            escrow_vault_uri: escrow_vault,
        },
        cluster: spec.cluster.clone(),
        node: spec.node_name.clone(),
        spool_dir: layout.spool_dir(),
        policy,
        follower_deadline: std::time::Duration::from_secs(cfg.bootstrap.follower_deadline_secs),
        crash_at: cfg.faults.crash_at,
        pause_at: cfg.faults.pause_at,
        fence: Default::default(),
        lease_secs: cfg.bootstrap.lease_secs as i32,
        peer_grace: std::time::Duration::from_secs(cfg.bootstrap.peer_grace_secs),
        operator_keys: booted.operator_keys.cloned(),
        join: crate::bootstrap::member::JoinPolicy {
            grace: std::time::Duration::from_secs(cfg.bootstrap.join_grace_secs),
            deadline: std::time::Duration::from_secs(cfg.bootstrap.join_deadline_secs),
            poll: std::time::Duration::from_millis(500),
        },
    };
    record.update_unwritten(|r| r.phase = Phase::Bootstrap);
    let snapshot =
        spec.servers_vault_uri
            .clone()
            .map(|uri| crate::bootstrap::snapshot_tokens::HandOver {
                az: ctx.az.clone(),
                servers_vault: uri,
                cluster: spec.cluster.clone(),
            });
    let result = match spec.role {
        crate::node::Role::NomadServer => {
            let mut tier = crate::bootstrap::nomad::NomadTier::new(
                format!("https://{}:{}", spec.ip, render::nomad::HTTP_PORT),
                layout.ca_file(Product::Nomad),
            );
            tier.shared = spec.keyvault_uri.clone().map(|uri| (ctx.az.clone(), uri));
            tier.status_vault = spec.status_vault_uri.clone();
            tier.snapshot = snapshot;
            bootstrap::run(&ctx, &tier).await
        }
        crate::node::Role::VaultServer => {
            let v = spec.vault.as_ref().expect("vault settings");
            let tier = VaultTier {
                recovery_pgp_keys: booted
                    .operator_keys
                    .as_ref()
                    .map(|k| k.base64_list())
                    .unwrap_or_default(),
                api: format!("https://{}:{}", spec.ip, render::vault::API_PORT),
                ca_file: layout.ca_file(Product::Vault),
                recovery_shares: cfg.bootstrap.recovery_shares,
                recovery_threshold: cfg.bootstrap.recovery_threshold,
                servers: v.servers,
                // vault.service may write only under /var/log/vault (ReadWritePaths in systemd/vault.service).
                audit_file: crate::render::vault::audit_file(&layout),
                shared: spec.keyvault_uri.clone().map(|uri| (ctx.az.clone(), uri)),
                status_vault: spec.status_vault_uri.clone(),
                workload_identity: spec.servers_vault_uri.clone().map(|servers_vault| {
                    crate::bootstrap::vault::WorkloadIdentityHandover {
                        az: ctx.az.clone(),
                        servers_vault,
                        secret: crate::names::nomad_jwt_token_secret(&spec.cluster),
                    }
                }),
                snapshot,
                local: booted
                    .plan
                    .services
                    .iter()
                    .find(|s| s.name == "vault")
                    .map(|svc| {
                        Box::new(crate::bootstrap::vault::ServiceStorage {
                            manager: (*booted.manager).clone(),
                            service: svc.clone(),
                            data_dir: layout.data_dir(Product::Vault, spec.role),
                        }) as Box<dyn crate::bootstrap::vault::LocalStorage>
                    }),
            };
            bootstrap::run(&ctx, &tier).await
        }
        _ => {
            // The installed Consul's version (detected at this boot; cached) decides whether the management
            // token is escrowed before use (Consul >= 1.15 takes a BootstrapSecret) or right after the call.
            let consul_version = match detect_versions(cfg, &layout, &[Product::Consul]).await {
                Ok(v) => v.get(&Product::Consul).map(|i| i.version),
                Err(e) => {
                    tracing::warn!(error = %e, "Consul version unknown: its management token is escrowed right after the ACL bootstrap");
                    None
                }
            };
            let tier = ConsulTier {
                api: format!("https://{}:{}", spec.ip, render::consul::HTTPS_PORT),
                ca_file: layout.ca_file(Product::Consul),
                shared: spec.keyvault_uri.clone().map(|uri| (ctx.az.clone(), uri)),
                status_vault: spec.status_vault_uri.clone(),
                snapshot,
                cluster: spec.cluster.clone(),
                path: crate::bootstrap::consul::BootstrapPath::for_version(consul_version),
            };
            bootstrap::run(&ctx, &tier).await
        }
    };
    record.update(|r| {
        r.finished_unix = time::OffsetDateTime::now_utc().unix_timestamp();
        match &result {
            Ok(o) => {
                r.phase = Phase::Done;
                r.bootstrap = Some(
                    serde_json::to_value(o)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                );
            }
            Err(e) => {
                r.ok = false;
                r.last_error = Some(e.to_string());
                r.bootstrap = Some("failed".into());
            }
        }
    });
    result.map(Some)
}

/// Azure SDK clients over this node's managed identity (our IMDS client), per the agent config.
pub fn azure_for(
    cfg: &AgentConfig,
    spec: &NodeSpec,
) -> Result<crate::azure::Azure, crate::tls::HttpsClientError> {
    let imds = ImdsClient::new(&cfg.imds.endpoint, RetryPolicy::imds(cfg.imds_deadline()));
    let credential = std::sync::Arc::new(crate::identity::ImdsCredential::new(
        imds,
        spec.identity_client_id.clone(),
    ));
    crate::azure::Azure::new(
        credential,
        cfg.azure.extra_ca_file.as_deref(),
        cfg.azure.verify_challenge_resource,
    )
}
