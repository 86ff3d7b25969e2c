//! Starting and checking the node's services, behind one trait with two backends:
//! systemd on a VM, and a process supervisor for the lab. Both start exactly the same command lines.

pub mod health;
pub mod process;
pub mod systemd;

use std::path::PathBuf;

/// A service the node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Short name: consul, vault, nomad, nomad-client.
    pub name: String,
    /// The systemd unit shipped in the image.
    pub unit: String,
    /// Program and arguments (the units run the same command).
    pub command: Vec<String>,
    /// `KEY=value` environment file, if any.
    pub env_file: Option<PathBuf>,
    /// Files and directories whose change requires a restart.
    pub watch: Vec<PathBuf>,
    /// How to tell the service answers.
    pub health: Health,
}

/// How to probe a service's API (TLS, trusting the cluster CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    ConsulHttps {
        addr: String,
        ca_file: PathBuf,
    },
    VaultHttps {
        addr: String,
        ca_file: PathBuf,
    },
    /// `tls_name`: the name to verify instead of the address (a worker's Nomad client serves the shared
    /// client certificate, whose name is `client.global.nomad`, not the node's address).
    NomadHttps {
        addr: String,
        ca_file: PathBuf,
        tls_name: Option<String>,
    },
}

/// What applying a service did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Started,
    Restarted,
    AlreadyRunning,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{service}: {message}")]
    Failed { service: String, message: String },
    #[error("{service}: cannot run {program}: {source}")]
    Spawn {
        service: String,
        program: String,
        source: std::io::Error,
    },
}

#[async_trait::async_trait]
pub trait ServiceManager: Send + Sync {
    /// Makes sure the service runs: starts it if stopped, restarts it if `config_changed` and it runs.
    async fn apply(&self, svc: &ServiceSpec, config_changed: bool) -> Result<Action, ServiceError>;
    /// Whether the service's process is up (not whether its API answers).
    async fn is_running(&self, svc: &ServiceSpec) -> Result<bool, ServiceError>;
    /// Asks a running service to re-read its configuration (SIGHUP; `systemctl reload`).
    async fn reload(&self, svc: &ServiceSpec) -> Result<(), ServiceError>;
    /// Stops one service and waits until it has exited (`systemctl stop`; SIGTERM, then SIGKILL). Stopping a
    /// stopped service succeeds.
    async fn stop(&self, svc: &ServiceSpec) -> Result<(), ServiceError>;
    /// Stops every service this manager started (the process backend on shutdown; a no-op for systemd).
    async fn stop_all(&self);
    /// Restarts a unit the image owns and the agent only configures (`systemd-resolved`, `docker`) if it runs,
    /// after one of its files changed (`systemctl try-restart`). Returns whether it asked. The process backend
    /// has no such units (the lab): it does nothing.
    async fn restart_host_unit(&self, unit: &str) -> Result<bool, ServiceError>;
}

/// Reads an `EnvironmentFile=` style file into pairs (blank lines and `#` comments ignored).
pub fn read_env_file(path: &std::path::Path) -> std::io::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}
