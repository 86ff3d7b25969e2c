//! The converge step of a warm boot: once the services run from the material the agent kept on disk
//! ([`crate::warm`]), read the material from Key Vault and settle the difference — nothing, a re-render with only
//! the changed services restarted, or (Key Vault refused the node, or holds no material) the services stopped.
//! What it decides and why: docs/trust-model.md#warm-boots. Also the later converges of every boot: the Consul
//! agent token handed over by the Consul tier ([`consul_token`]) and Nomad's workload identities in Vault
//! ([`workload_identity`]).

use crate::boot::{
    apply_services, azure_for, detect_versions, fetch_material, load_material, material_vaults,
    write_plan, write_record, BootError, Booted, SharedRecord, Started,
};
use crate::config::AgentConfig;
use crate::render::{self, Layout, RenderOptions};
use crate::version::Product;

/// What confirming a warm boot's material with Key Vault found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converged {
    /// Key Vault holds what the services started from: nothing restarted.
    Unchanged,
    /// Key Vault holds other material (rotated by an operator, or a token handed over since): the node was
    /// re-rendered and these services (or the image's units) restarted — only those whose files changed.
    Changed { restarted: Vec<String> },
}

/// How a warm boot's confirmation failed: the services keep running from disk, or were stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    /// Key Vault could not be asked (unreachable, throttled, failing) within the deadlines, or answered with
    /// material this node cannot use: the services keep running from disk; the agent exits non-zero.
    #[error(
        "cluster material on disk not confirmed by Key Vault (the services run from disk): {0}"
    )]
    Unconfirmed(BootError),
    /// Key Vault refused this node (403 past the call deadline) or no longer holds the material: the services
    /// started from disk were stopped and the material on disk removed (the next boot is cold).
    #[error(
        "cluster material withdrawn in Key Vault: services stopped, material on disk removed: {0}"
    )]
    Withdrawn(BootError),
}

/// After a warm boot started the services from disk: reads the material from Key Vault (never creating it) and
/// compares. Unchanged: nothing restarts. Changed: re-render, and restart only the services whose files
/// changed. Key Vault says no (403) or has no material: stop the services, remove the material on disk.
/// Unreachable: keep running. Bounded by `material.deadline_secs` (each call by `bootstrap.azure_deadline_secs`).
/// `Ok(None)`: a cold boot (nothing to confirm). Updates and rewrites the boot record.
pub async fn run(
    cfg: &AgentConfig,
    booted: &mut Booted,
) -> Result<Option<Converged>, ConvergeError> {
    let Some(disk) = booted.warm.take() else {
        return Ok(None);
    };
    let layout = Layout::from_paths(&cfg.paths);
    let r = converge_step(cfg, booted, &layout, &disk).await;
    booted.record.converge = Some(match &r {
        Ok(Converged::Unchanged) => "unchanged".into(),
        Ok(Converged::Changed { restarted }) if restarted.is_empty() => {
            "changed: nothing to restart".into()
        }
        Ok(Converged::Changed { restarted }) => {
            format!("changed: restarted {}", restarted.join(", "))
        }
        Err(ConvergeError::Unconfirmed(e)) => format!("unconfirmed: {e}"),
        Err(ConvergeError::Withdrawn(e)) => format!("withdrawn: {e}"),
    });
    if let Err(e) = &r {
        booted.record.ok = false;
        booted.record.last_error = Some(e.to_string());
    }
    write_record(&layout, &booted.record);
    r.map(Some)
}

async fn converge_step(
    cfg: &AgentConfig,
    booted: &mut Booted,
    layout: &Layout,
    disk: &crate::warm::DiskMaterial,
) -> Result<Converged, ConvergeError> {
    let vaults = material_vaults(&booted.spec).map_err(ConvergeError::Unconfirmed)?;
    let fetched = fetch_material(cfg, &booted.spec, &vaults, false).await;
    settle(cfg, booted, layout, disk, &vaults, fetched).await
}

/// What the converge does with Key Vault's answer (`fetched`), given the material the services started from.
async fn settle(
    cfg: &AgentConfig,
    booted: &mut Booted,
    layout: &Layout,
    disk: &crate::warm::DiskMaterial,
    vaults: &crate::material::Vaults,
    fetched: Result<crate::material::ClusterMaterial, BootError>,
) -> Result<Converged, ConvergeError> {
    use crate::material::MaterialError;
    let spec = booted.spec.clone();
    let shared = match fetched {
        Ok(m) => m,
        Err(e) => {
            let withdrawn = match &e {
                BootError::ClusterMaterial(MaterialError::Timeout(_)) => true,
                BootError::ClusterMaterial(MaterialError::Azure(a)) => a.is(403),
                _ => false,
            };
            if !withdrawn {
                return Err(ConvergeError::Unconfirmed(e));
            }
            for svc in booted.plan.services.iter().rev() {
                if let Err(stop) = booted.manager.stop(svc).await {
                    tracing::error!(error = %stop, "cannot stop a service after the material was withdrawn");
                }
            }
            if let Err(rm) = crate::warm::remove(layout) {
                tracing::error!(error = %rm, "cannot remove the material on disk");
            }
            return Err(ConvergeError::Withdrawn(e));
        }
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let fresh = crate::warm::DiskMaterial::from_cluster(
        &shared,
        crate::warm::Source::of(&spec, vaults),
        spec.role,
        now,
    );
    let outcome = if fresh.same_as(disk) {
        Converged::Unchanged
    } else {
        let rendered = async {
            let material = load_material(cfg, &spec, layout, Some(&shared))?;
            let plan = render::render(
                &spec,
                layout,
                &RenderOptions::from_config(cfg),
                &booted.versions,
                Some(&material),
            )?;
            drop(material);
            let changed = write_plan(&plan)?;
            let restarted = apply_services(
                booted.manager.as_ref(),
                &spec,
                &plan,
                &changed,
                &mut booted.record,
            )
            .await?;
            booted
                .record
                .files_changed
                .extend(changed.iter().map(|p| p.display().to_string()));
            booted.plan = plan;
            Ok::<_, BootError>(restarted)
        };
        let restarted = rendered.await.map_err(ConvergeError::Unconfirmed)?;
        tracing::info!(restarted = ?restarted, "cluster material changed in Key Vault: re-rendered");
        Converged::Changed { restarted }
    };
    drop(shared);
    if let Err(e) = crate::warm::save(layout, &fresh) {
        tracing::warn!(error = %e, "cannot keep the confirmed cluster material on disk: the next boot is cold");
    }
    Ok(outcome)
}

/// After a successful tier bootstrap on a Vault or Nomad server: once both tiers are done, Vault's JWT auth
/// method for Nomad workloads points at the Nomad servers' JWKS (bootstrap/workload_identity.rs). `Ok(None)`:
/// not this node's business (other roles, bootstrap off, material from files).
pub async fn workload_identity(
    cfg: &AgentConfig,
    booted: &mut Booted,
) -> Result<
    Option<crate::bootstrap::workload_identity::Converged>,
    crate::bootstrap::workload_identity::WorkloadIdentityError,
> {
    use crate::bootstrap::workload_identity::{Converged, Ensured};
    let r = workload_identity_step(cfg, booted).await;
    let noted = match &r {
        Ok(None) => return r,
        Ok(Some(Converged::Waiting { tier })) => format!("waiting for the {tier} tier"),
        Ok(Some(Converged::Ensured(Ensured::Written))) => "written".into(),
        Ok(Some(Converged::Ensured(Ensured::Unchanged))) => "unchanged".into(),
        Err(e) => format!("failed: {e}"),
    };
    booted.record.workload_identity = Some(noted);
    write_record(&Layout::from_paths(&cfg.paths), &booted.record);
    r
}

async fn workload_identity_step(
    cfg: &AgentConfig,
    booted: &Booted,
) -> Result<
    Option<crate::bootstrap::workload_identity::Converged>,
    crate::bootstrap::workload_identity::WorkloadIdentityError,
> {
    use crate::bootstrap::workload_identity::{converge, ConvergeCtx};
    let spec = &booted.spec;
    let product = match spec.role {
        crate::node::Role::VaultServer => Product::Vault,
        crate::node::Role::NomadServer => Product::Nomad,
        _ => return Ok(None),
    };
    let Some(servers_vault) = spec.servers_vault_uri.as_deref() else {
        return Ok(None);
    };
    if !cfg.bootstrap.enabled || cfg.material.source != crate::config::MaterialSource::Keyvault {
        return Ok(None);
    }
    let layout = Layout::from_paths(&cfg.paths);
    let az = azure_for(cfg, spec).map_err(|e| {
        crate::bootstrap::workload_identity::WorkloadIdentityError::Client(e.to_string())
    })?;
    let mut policy = crate::escrow::policy();
    policy.deadline = std::time::Duration::from_secs(cfg.bootstrap.azure_deadline_secs);
    let ca_file = layout.ca_file(product);
    let (vault_api, nomad_api) = (spec.vault_api(), spec.nomad_api());
    let ctx = ConvergeCtx {
        az: &az,
        blob_endpoint: &spec.blob_endpoint,
        cluster: &spec.cluster,
        servers_vault,
        vault_api: &vault_api,
        ca_file: &ca_file,
        nomad_api: &nomad_api,
        policy,
        deadline: std::time::Duration::from_secs(cfg.bootstrap.follower_deadline_secs.min(300)),
    };
    converge(&ctx).await.map(Some)
}

/// Beside the tier bootstrap (they run at once, `cli/boot.rs`): a node whose Consul runs without the agent token
/// waits for the Consul tier to hand it over through Key Vault, renders it (`acl-tokens.json`) and reloads (or
/// starts) Consul. It changes only the files it renders, Consul and its own fields of the boot record; the new
/// plan and Nomad's restart (its Consul token came with it) are returned for [`finish_consul_token`], after the
/// bootstrap, so that a Nomad server is never restarted while its tier bootstraps. `Ok(None)`: nothing to do.
pub async fn consul_token(
    cfg: &AgentConfig,
    booted: &Started<'_>,
    record: &SharedRecord<'_>,
) -> Result<Option<TokenRendered>, BootError> {
    let spec = booted.spec;
    if cfg.material.source != crate::config::MaterialSource::Keyvault
        || !spec.products().contains(&Product::Consul)
    {
        return Ok(None);
    }
    if booted
        .plan
        .files
        .iter()
        .any(|f| f.path.ends_with("acl-tokens.json"))
    {
        return Ok(None);
    }
    if spec.keyvault_uri.is_none() {
        return Ok(None);
    }
    let layout = Layout::from_paths(&cfg.paths);
    let az = azure_for(cfg, spec)?;
    let mut policy = crate::escrow::policy();
    policy.deadline = std::time::Duration::from_secs(cfg.bootstrap.azure_deadline_secs);
    let deadline = std::time::Duration::from_secs(cfg.material.deadline_secs);
    let shared = crate::material::Fetch {
        az: &az,
        vaults: &material_vaults(spec)?,
        cluster: &spec.cluster,
        creator: None,
        agent_token: crate::material::AgentToken::Wait(crate::material::Pace::of(spec.role)),
        pace: crate::material::Pace::of(spec.role),
        policy,
        deadline,
    }
    .run()
    .await?;
    let versions = detect_versions(cfg, &layout, &spec.products()).await?;
    let material = load_material(cfg, spec, &layout, Some(&shared))?;
    // The token is kept with the rest, so that the next boot starts Consul at once.
    let keep = crate::warm::DiskMaterial::from_cluster(
        &shared,
        crate::warm::Source::of(spec, &material_vaults(spec)?),
        spec.role,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    );
    drop(shared);
    if let Err(e) = crate::warm::save(&layout, &keep) {
        tracing::warn!(error = %e, "cannot keep the cluster material on disk: the next boot is cold");
    }
    drop(keep);
    let plan = render::render(
        spec,
        &layout,
        &RenderOptions::from_config(cfg),
        &versions,
        Some(&material),
    )?;
    drop(material);
    let changed = write_plan(&plan)?;
    if let Some(consul) = plan.services.iter().find(|s| s.name == "consul") {
        if !booted.manager.is_running(consul).await? {
            // An auto-encrypt Consul waited for the token (see `consul_waits_for_token`): start it now.
            let action = booted.manager.apply(consul, true).await?;
            record.update_unwritten(|r| {
                r.services.insert(consul.name.clone(), action);
            });
            tracing::info!(?action, "consul agent token rendered; consul started");
        } else if changed
            .iter()
            .any(|c| consul.watch.iter().any(|w| c.starts_with(w)))
        {
            booted.manager.reload(consul).await?;
            tracing::info!("consul agent token rendered; consul reloaded");
        }
    }
    // Nomad's Consul token came with it (nodes that run Nomad): Nomad takes its `consul` block only at start,
    // so it is restarted — only when one of its files changed, and only after the tier bootstrap.
    let nomad = plan
        .services
        .iter()
        .find(|s| s.name.starts_with("nomad"))
        .filter(|nomad| {
            changed
                .iter()
                .any(|c| nomad.watch.iter().any(|w| c.starts_with(w)))
        })
        .cloned();
    record.update(|r| {
        r.files_changed
            .extend(changed.iter().map(|p| p.display().to_string()))
    });
    Ok(Some(TokenRendered { plan, nomad }))
}

/// What [`consul_token`] leaves for after the tier bootstrap.
pub struct TokenRendered {
    /// The plan with the token: the boot's plan from now on.
    pub plan: render::Plan,
    /// Nomad, when its files changed (its Consul token): restarted by [`finish_consul_token`].
    pub nomad: Option<crate::services::ServiceSpec>,
}

/// After the tier bootstrap (and [`consul_token`]) are over: the plan with the token becomes the boot's, and
/// Nomad restarts if its files changed. Rewrites the boot record.
pub async fn finish_consul_token(
    cfg: &AgentConfig,
    booted: &mut Booted,
    rendered: TokenRendered,
) -> Result<(), BootError> {
    booted.plan = rendered.plan;
    if let Some(nomad) = &rendered.nomad {
        let action = booted.manager.apply(nomad, true).await?;
        booted.record.services.insert(nomad.name.clone(), action);
        tracing::info!(?action, "nomad's consul token rendered; nomad restarted");
    }
    write_record(&Layout::from_paths(&cfg.paths), &booted.record);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{warm_material, BootManager, BootRecord, Phase};
    use crate::imds::InstanceMetadata;
    use crate::material::ClusterMaterial;
    use crate::node::NodeSpec;
    use crate::node::Role;
    use crate::render::Versions;
    use crate::services::{Action, ServiceSpec};
    use crate::services::{ServiceError, ServiceManager};
    use crate::tls::{self, ClusterCa};
    use crate::version::Product;
    use crate::warm::{DiskMaterial, NotWarm, Source};
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use zeroize::Zeroizing;

    /// A service manager that only records what it was asked: "apply consul changed=false", "stop nomad", ….
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Recorder {
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    #[async_trait::async_trait]
    impl ServiceManager for Recorder {
        async fn apply(&self, svc: &ServiceSpec, changed: bool) -> Result<Action, ServiceError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("apply {} changed={changed}", svc.name));
            Ok(if changed {
                Action::Restarted
            } else {
                Action::AlreadyRunning
            })
        }
        async fn is_running(&self, _: &ServiceSpec) -> Result<bool, ServiceError> {
            Ok(true)
        }
        async fn reload(&self, svc: &ServiceSpec) -> Result<(), ServiceError> {
            self.0.lock().unwrap().push(format!("reload {}", svc.name));
            Ok(())
        }
        async fn stop(&self, svc: &ServiceSpec) -> Result<(), ServiceError> {
            self.0.lock().unwrap().push(format!("stop {}", svc.name));
            Ok(())
        }
        async fn stop_all(&self) {}
        async fn restart_host_unit(&self, unit: &str) -> Result<bool, ServiceError> {
            self.0.lock().unwrap().push(format!("restart {unit}"));
            Ok(true)
        }
    }

    #[async_trait::async_trait]
    impl BootManager for Recorder {
        async fn run_until(
            &self,
            _: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        ) {
        }
    }

    fn spec(name: &str) -> NodeSpec {
        let path = format!(
            "{}/tests/fixtures/imds/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let md = InstanceMetadata::from_json(&std::fs::read(path).unwrap()).unwrap();
        NodeSpec::from_metadata(&md).unwrap()
    }

    fn config(root: &Path) -> AgentConfig {
        let mut cfg = AgentConfig::default();
        cfg.paths.root = root.to_path_buf();
        cfg.paths.owners = crate::config::Owners::CurrentUser;
        cfg
    }

    fn key() -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    }

    /// The cluster's material as Key Vault would hand it to this node (a new CA each call).
    struct Cluster {
        ca_cert: String,
        ca_key: String,
        consul: String,
        nomad: String,
        client: (String, String),
        token: String,
    }

    impl Cluster {
        fn new() -> Cluster {
            let now = time::OffsetDateTime::now_utc();
            let (ca_cert, ca_key) = tls::generate_ca("test CA", 30, now).unwrap();
            let ca = ClusterCa::from_pem(&ca_cert, &ca_key).unwrap();
            let sans: Vec<String> = crate::material::NOMAD_CLIENT_SANS
                .iter()
                .map(|s| s.to_string())
                .collect();
            let c = ca.issue("client.global.nomad", &sans, 30, now).unwrap();
            Cluster {
                ca_cert,
                ca_key,
                consul: key(),
                nomad: key(),
                client: (c.cert_pem, c.key_pem),
                token: "00000000-0000-4000-8000-000000000001".into(),
            }
        }

        /// What this node reads of it (workers: no CA key, no Nomad gossip key).
        fn read_by(&self, role: Role) -> ClusterMaterial {
            let server = role.is_server_tier();
            ClusterMaterial {
                ca_cert: self.ca_cert.clone(),
                ca_key: server.then(|| Zeroizing::new(self.ca_key.clone())),
                consul_gossip_key: Zeroizing::new(self.consul.clone()),
                nomad_gossip_key: server.then(|| Zeroizing::new(self.nomad.clone())),
                nomad_client: (role == Role::Worker)
                    .then(|| (self.client.0.clone(), Zeroizing::new(self.client.1.clone()))),
                consul_agent_token: Some(Zeroizing::new(self.token.clone())),
                consul_nomad_token: None,
            }
        }
    }

    fn versions() -> Versions {
        [Product::Consul, Product::Vault, Product::Nomad]
            .into_iter()
            .map(|p| (p, crate::version::assumed_current(p)))
            .collect()
    }

    /// A node booted warm from `disk` (rendered, written), with a recording service manager.
    fn warm_booted(
        cfg: &AgentConfig,
        spec: &NodeSpec,
        disk: &DiskMaterial,
    ) -> (Booted, Arc<Recorder>) {
        let layout = Layout::from_paths(&cfg.paths);
        let material = warm_material(cfg, spec, &layout, disk).unwrap();
        let plan = render::render(
            spec,
            &layout,
            &RenderOptions::from_config(cfg),
            &versions(),
            Some(&material),
        )
        .unwrap();
        write_plan(&plan).unwrap();
        let rec = Arc::new(Recorder::default());
        let booted = Booted {
            spec: spec.clone(),
            plan,
            manager: rec.clone(),
            record: BootRecord {
                node: spec.node_name.clone(),
                phase: Phase::Done,
                ok: true,
                material: Some("disk".into()),
                converge: Some("pending".into()),
                ..BootRecord::starting("", 0)
            },
            operator_keys: None,
            warm: None,
            versions: versions(),
            azure: None,
        };
        (booted, rec)
    }

    fn kv_error(status: u16) -> BootError {
        BootError::ClusterMaterial(crate::material::MaterialError::Azure(
            crate::azure::AzureError {
                what: "cluster material read".into(),
                status: Some(status),
                code: None,
                detail: format!("HTTP {status}"),
            },
        ))
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    /// A worker's warm boot: Key Vault unchanged → nothing restarts; the Consul gossip key rotated → only Consul
    /// restarts, with the new key rendered and kept; Key Vault unreachable → the services keep running; Key
    /// Vault refuses the node → its services stop and the material on disk is gone.
    #[tokio::test]
    async fn a_warm_boot_converges_with_key_vault() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        let layout = Layout::from_paths(&cfg.paths);
        let spec = spec("worker");
        let vaults = material_vaults(&spec).unwrap();
        let source = Source::of(&spec, &vaults);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut cluster = Cluster::new();
        let disk = DiskMaterial::from_cluster(
            &cluster.read_by(Role::Worker),
            source.clone(),
            Role::Worker,
            now,
        );
        crate::warm::save(&layout, &disk).unwrap();
        let disk = crate::warm::load(&layout, &source, me(), now).unwrap();
        let (mut booted, services) = warm_booted(&cfg, &spec, &disk);

        let r = settle(
            &cfg,
            &mut booted,
            &layout,
            &disk,
            &vaults,
            Ok(cluster.read_by(Role::Worker)),
        )
        .await;
        assert_eq!(r.unwrap(), Converged::Unchanged);
        assert_eq!(
            services.calls(),
            Vec::<String>::new(),
            "unchanged: nothing restarts"
        );

        let old = cluster.consul.clone();
        cluster.consul = key();
        let r = settle(
            &cfg,
            &mut booted,
            &layout,
            &disk,
            &vaults,
            Ok(cluster.read_by(Role::Worker)),
        )
        .await;
        assert_eq!(
            r.unwrap(),
            Converged::Changed {
                restarted: vec!["consul".into()]
            }
        );
        assert_eq!(
            services.calls(),
            [
                "apply consul changed=true",
                "apply nomad-client changed=false"
            ]
        );
        let gossip = std::fs::read_to_string(layout.gossip_file(Product::Consul)).unwrap();
        assert!(gossip.contains(&cluster.consul) && !gossip.contains(&old));
        let kept = crate::warm::load(&layout, &source, me(), now).unwrap();
        assert_eq!(
            kept.consul_gossip_key, cluster.consul,
            "the rotated key is kept for the next boot"
        );

        let r = settle(
            &cfg,
            &mut booted,
            &layout,
            &kept,
            &vaults,
            Err(kv_error(503)),
        )
        .await;
        assert!(matches!(r, Err(ConvergeError::Unconfirmed(_))), "{r:?}");
        assert_eq!(
            services.calls(),
            Vec::<String>::new(),
            "unreachable: the services keep running"
        );
        assert!(crate::warm::load(&layout, &source, me(), now).is_ok());

        let r = settle(
            &cfg,
            &mut booted,
            &layout,
            &kept,
            &vaults,
            Err(kv_error(403)),
        )
        .await;
        assert!(matches!(r, Err(ConvergeError::Withdrawn(_))), "{r:?}");
        assert_eq!(services.calls(), ["stop nomad-client", "stop consul"]);
        assert_eq!(
            crate::warm::load(&layout, &source, me(), now).unwrap_err(),
            NotWarm::Absent,
            "the next boot is cold"
        );
        let gone = settle(
            &cfg,
            &mut booted,
            &layout,
            &kept,
            &vaults,
            Err(BootError::ClusterMaterial(
                crate::material::MaterialError::Timeout(std::time::Duration::from_secs(1)),
            )),
        )
        .await;
        assert!(matches!(gone, Err(ConvergeError::Withdrawn(_))), "{gone:?}");
    }

    /// A Vault server keeps no CA key on disk: it boots warm only while its certificates on disk are still
    /// good for the CA certificate it kept, and a cold boot (which has the key) issues them.
    #[test]
    fn a_server_without_the_ca_key_boots_warm_only_on_good_certificates() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        let layout = Layout::from_paths(&cfg.paths);
        let spec = spec("vault-server-akv");
        // (The fixture predates the servers vault's tag: only the source's names matter here.)
        let vaults = crate::material::Vaults {
            shared: "https://kvs/".into(),
            servers: Some("https://kvc/".into()),
            nomad_client: false,
            nomad_consul_token: false,
        };
        let cluster = Cluster::new();
        let read = cluster.read_by(Role::VaultServer);
        let disk = DiskMaterial::from_cluster(&read, Source::of(&spec, &vaults), spec.role, 0);
        assert!(disk.ca_key.is_none());
        assert_eq!(
            warm_material(&cfg, &spec, &layout, &disk).unwrap_err(),
            NotWarm::Certificate("consul".into())
        );
        // The cold boot: issues the certificates with the CA key and writes them.
        let cold = load_material(&cfg, &spec, &layout, Some(&read)).unwrap();
        let plan = render::render(
            &spec,
            &layout,
            &RenderOptions::from_config(&cfg),
            &versions(),
            Some(&cold),
        )
        .unwrap();
        write_plan(&plan).unwrap();
        let warm = warm_material(&cfg, &spec, &layout, &disk).unwrap();
        for p in spec.products() {
            assert_eq!(
                warm.certs[&p].cert_pem, cold.certs[&p].cert_pem,
                "{p}: kept, not issued"
            );
        }
        // Another CA in the material on disk: its certificates are not good for it.
        let other = Cluster::new().read_by(Role::VaultServer);
        let disk = DiskMaterial::from_cluster(&other, Source::of(&spec, &vaults), spec.role, 0);
        assert!(matches!(
            warm_material(&cfg, &spec, &layout, &disk),
            Err(NotWarm::Certificate(_))
        ));
    }

    #[test]
    fn material_on_disk_without_what_the_role_needs_is_not_used() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        let layout = Layout::from_paths(&cfg.paths);
        let spec = spec("worker");
        let vaults = material_vaults(&spec).unwrap();
        let mut m = Cluster::new().read_by(Role::Worker);
        m.nomad_client = None;
        let disk = DiskMaterial::from_cluster(&m, Source::of(&spec, &vaults), spec.role, 0);
        assert_eq!(
            warm_material(&cfg, &spec, &layout, &disk).unwrap_err(),
            NotWarm::Incomplete("worker".into())
        );
    }
}
