//! Process backend (the lab): spawns the same command lines the units run, as children of the agent,
//! and supervises them — restarting a child that exits, stopping all on shutdown. Children get
//! PR_SET_PDEATHSIG so they never outlive a killed agent. Output goes to `<log_dir>/<name>.log`.

use super::{read_env_file, Action, ServiceError, ServiceManager, ServiceSpec};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

pub struct ProcessManager {
    log_dir: PathBuf,
    pid_dir: PathBuf,
    children: Mutex<HashMap<String, (ServiceSpec, Child)>>,
}

impl ProcessManager {
    pub fn new(log_dir: PathBuf, pid_dir: PathBuf) -> Self {
        ProcessManager {
            log_dir,
            pid_dir,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn spawn(&self, svc: &ServiceSpec) -> Result<Child, ServiceError> {
        let err = |source| ServiceError::Spawn {
            service: svc.name.clone(),
            program: svc.command[0].clone(),
            source,
        };
        std::fs::create_dir_all(&self.log_dir).map_err(err)?;
        std::fs::create_dir_all(&self.pid_dir).map_err(err)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{}.log", svc.name)))
            .map_err(err)?;
        let mut cmd = Command::new(&svc.command[0]);
        cmd.args(&svc.command[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(err)?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(path) = &svc.env_file {
            for (k, v) in read_env_file(path).map_err(err)? {
                cmd.env(k, v);
            }
        }
        // SAFETY: prctl is async-signal-safe and touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(err)?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(
                self.pid_dir.join(format!("{}.pid", svc.name)),
                format!("{pid}\n"),
            );
        }
        tracing::info!(service = %svc.name, pid = child.id(), "started");
        Ok(child)
    }

    async fn terminate(name: &str, child: &mut Child) {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                tracing::warn!(service = name, "did not stop within 15s; killing");
                let _ = child.kill().await;
            }
        }
    }

    /// Restarts children that exited, until `shutdown` resolves; then stops them all.
    pub async fn supervise(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    let mut children = self.children.lock().await;
                    for (name, (spec, child)) in children.iter_mut() {
                        if let Ok(Some(status)) = child.try_wait() {
                            tracing::warn!(service = %name, %status, "exited; restarting");
                            match self.spawn(spec) {
                                Ok(c) => *child = c,
                                Err(e) => tracing::error!(service = %name, error = %e, "restart failed"),
                            }
                        }
                    }
                }
            }
        }
        self.stop_all().await;
    }
}

#[async_trait::async_trait]
impl ServiceManager for ProcessManager {
    async fn restart_host_unit(&self, _unit: &str) -> Result<bool, ServiceError> {
        Ok(false)
    }

    async fn apply(&self, svc: &ServiceSpec, config_changed: bool) -> Result<Action, ServiceError> {
        let mut children = self.children.lock().await;
        if let Some((_, child)) = children.get_mut(&svc.name) {
            let alive = matches!(child.try_wait(), Ok(None));
            if alive && !config_changed {
                return Ok(Action::AlreadyRunning);
            }
            if alive {
                Self::terminate(&svc.name, child).await;
                let c = self.spawn(svc)?;
                children.insert(svc.name.clone(), (svc.clone(), c));
                return Ok(Action::Restarted);
            }
        }
        let c = self.spawn(svc)?;
        children.insert(svc.name.clone(), (svc.clone(), c));
        Ok(Action::Started)
    }

    async fn is_running(&self, svc: &ServiceSpec) -> Result<bool, ServiceError> {
        let mut children = self.children.lock().await;
        Ok(children
            .get_mut(&svc.name)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None))))
    }

    async fn reload(&self, svc: &ServiceSpec) -> Result<(), ServiceError> {
        let children = self.children.lock().await;
        let pid = children
            .get(&svc.name)
            .and_then(|(_, c)| c.id())
            .ok_or_else(|| ServiceError::Failed {
                service: svc.name.clone(),
                message: "not running".into(),
            })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .map_err(|e| ServiceError::Failed {
            service: svc.name.clone(),
            message: format!("SIGHUP: {e}"),
        })
    }

    async fn stop(&self, svc: &ServiceSpec) -> Result<(), ServiceError> {
        let mut children = self.children.lock().await;
        if let Some((_, mut child)) = children.remove(&svc.name) {
            Self::terminate(&svc.name, &mut child).await;
            let _ = std::fs::remove_file(self.pid_dir.join(format!("{}.pid", svc.name)));
            tracing::info!(service = %svc.name, "stopped");
        }
        Ok(())
    }

    async fn stop_all(&self) {
        let mut children = self.children.lock().await;
        // Stop in reverse start order: dependants (vault, nomad) before consul.
        let mut names: Vec<String> = children.keys().cloned().collect();
        names.sort_by_key(|n| if n == "consul" { 1 } else { 0 });
        for name in names {
            if let Some((_, mut child)) = children.remove(&name) {
                Self::terminate(&name, &mut child).await;
                let _ = std::fs::remove_file(self.pid_dir.join(format!("{name}.pid")));
                tracing::info!(service = %name, "stopped");
            }
        }
    }
}
