//! `hashistack-agent status --node`: this node — identity, role, rendered files, local services and their APIs.
//! Every probe has a deadline, so a dead service is reported, not waited on.

use crate::boot::{self, BootRecord};
use crate::config::{AgentConfig, Backend};
use crate::node::NodeSpec;
use crate::render::{self, Layout, RenderOptions};
use crate::retry::RetryPolicy;
use crate::services::health::{probe, Probe};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub role: String,
    pub cluster: String,
    pub ip: String,
    pub last_boot: Option<BootRecord>,
    pub files: Vec<FileState>,
    pub services: Vec<ServiceState>,
    pub healthy: bool,
}

#[derive(Debug, Serialize)]
pub struct FileState {
    pub path: String,
    pub present: bool,
    pub mode: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ServiceState {
    pub name: String,
    pub running: bool,
    pub api: Probe,
}

pub async fn node_status(cfg: &AgentConfig) -> Result<NodeStatus, boot::BootError> {
    let layout = Layout::from_paths(&cfg.paths);
    let mut quick = cfg.clone();
    quick.imds.deadline_secs = quick.imds.deadline_secs.min(5);
    let client = crate::imds::ImdsClient::new(
        &quick.imds.endpoint,
        RetryPolicy::imds(quick.imds_deadline()),
    );
    let md = client.instance().await?;
    let spec = NodeSpec::from_metadata(&md)?;
    let versions = boot::detect_versions(cfg, &layout, &spec.products()).await?;
    let plan = render::render(
        &spec,
        &layout,
        &RenderOptions::from_config(cfg),
        &versions,
        None,
    )?;
    let last_boot: Option<BootRecord> = std::fs::read(boot::record_path(&layout))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());

    let files = plan
        .files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(&f.path).ok();
            FileState {
                path: f.path.display().to_string(),
                present: meta.is_some(),
                mode: meta.map(|m| format!("{:04o}", m.mode() & 0o7777)),
            }
        })
        .collect();
    let mut services = Vec::new();
    for svc in &plan.services {
        let running = match cfg.services.backend {
            Backend::Systemd => {
                use crate::services::ServiceManager;
                crate::services::systemd::Systemd {
                    timeout: Duration::from_secs(5),
                    ..Default::default()
                }
                .is_running(svc)
                .await
                .unwrap_or(false)
            }
            Backend::Process => pid_alive(
                &layout
                    .state_dir()
                    .join("pids")
                    .join(format!("{}.pid", svc.name)),
            ),
        };
        let api = probe(&svc.health, Duration::from_secs(3)).await;
        services.push(ServiceState {
            name: svc.name.clone(),
            running,
            api,
        });
    }
    let healthy = last_boot.as_ref().is_some_and(|b| b.ok)
        && services
            .iter()
            .all(|s| s.running && !matches!(s.api, Probe::Unreachable { .. } | Probe::NoLeader));
    Ok(NodeStatus {
        node: spec.node_name.clone(),
        role: spec.role.to_string(),
        cluster: spec.cluster.clone(),
        ip: spec.ip.to_string(),
        last_boot,
        files,
        services,
        healthy,
    })
}

fn pid_alive(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .is_some_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

pub fn print_table(s: &NodeStatus) {
    println!(
        "{} {}  role={} cluster={} ip={}",
        if s.healthy { "HEALTHY" } else { "DEGRADED" },
        s.node,
        s.role,
        s.cluster,
        s.ip
    );
    match &s.last_boot {
        Some(b) => println!(
            "last boot: phase={:?} ok={} critical_path_ms={} {}",
            b.phase,
            b.ok,
            b.critical_path_ms
                .map(|m| m.to_string())
                .unwrap_or("-".into()),
            b.last_error.as_deref().unwrap_or("")
        ),
        None => println!("last boot: none recorded"),
    }
    println!("{:<14} {:<8} API", "SERVICE", "RUNNING");
    for svc in &s.services {
        let api = match &svc.api {
            Probe::Leader { leader } => format!("leader {leader}"),
            Probe::NoLeader => "no leader".into(),
            Probe::Vault {
                initialized,
                sealed,
            } => format!("initialized={initialized} sealed={sealed}"),
            Probe::Unreachable { error } => format!("unreachable: {error}"),
        };
        println!(
            "{:<14} {:<8} {}",
            svc.name,
            if svc.running { "yes" } else { "no" },
            api
        );
    }
    println!("{:<60} MODE", "FILE");
    for f in &s.files {
        println!("{:<60} {}", f.path, f.mode.as_deref().unwrap_or("missing"));
    }
}
