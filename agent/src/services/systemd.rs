//! systemd backend: `systemctl` with deadlines. The image ships the units disabled; the agent enables and
//! starts them at boot (so a node never starts a service before its config is rendered).

use super::{Action, ServiceError, ServiceManager, ServiceSpec};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Systemd {
    pub systemctl: String,
    pub timeout: Duration,
}

impl Default for Systemd {
    fn default() -> Self {
        Systemd {
            systemctl: "systemctl".into(),
            timeout: Duration::from_secs(90),
        }
    }
}

impl Systemd {
    async fn run(
        &self,
        service: &str,
        args: &[&str],
    ) -> Result<std::process::Output, ServiceError> {
        let fut = tokio::process::Command::new(&self.systemctl)
            .args(args)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(ServiceError::Failed {
                service: service.into(),
                message: format!(
                    "systemctl {} did not finish within {:?}",
                    args.join(" "),
                    self.timeout
                ),
            }),
            Ok(Err(source)) => Err(ServiceError::Spawn {
                service: service.into(),
                program: self.systemctl.clone(),
                source,
            }),
            Ok(Ok(out)) => Ok(out),
        }
    }

    async fn must(&self, service: &str, args: &[&str]) -> Result<(), ServiceError> {
        let out = self.run(service, args).await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(failure(service, args, &out))
        }
    }
}

/// A failed systemctl call: the command and systemctl's first stderr line (which names the unit and the cause).
fn failure(service: &str, args: &[&str], out: &std::process::Output) -> ServiceError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ServiceError::Failed {
        service: service.into(),
        message: format!(
            "systemctl {} failed: {}",
            args.join(" "),
            stderr.lines().next().unwrap_or("").trim()
        ),
    }
}

#[async_trait::async_trait]
impl ServiceManager for Systemd {
    async fn restart_host_unit(&self, unit: &str) -> Result<bool, ServiceError> {
        self.must(unit, &["try-restart", unit]).await.map(|_| true)
    }

    async fn apply(&self, svc: &ServiceSpec, config_changed: bool) -> Result<Action, ServiceError> {
        self.must(&svc.name, &["enable", "--quiet", &svc.unit])
            .await?;
        let running = self.is_running(svc).await?;
        match (running, config_changed) {
            (true, false) => Ok(Action::AlreadyRunning),
            (true, true) => self
                .must(&svc.name, &["restart", &svc.unit])
                .await
                .map(|_| Action::Restarted),
            (false, _) => self
                .must(&svc.name, &["start", &svc.unit])
                .await
                .map(|_| Action::Started),
        }
    }

    /// systemctl(1) EXIT STATUS: 0 active; 3 not active (inactive, failed, activating); 4 no such unit. Anything
    /// else (1 "Failed to connect to bus") says nothing about the unit: an error, never "stopped", which would
    /// have the caller start a second copy.
    async fn is_running(&self, svc: &ServiceSpec) -> Result<bool, ServiceError> {
        let args = ["is-active", "--quiet", svc.unit.as_str()];
        let out = self.run(&svc.name, &args).await?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(3 | 4) => Ok(false),
            _ => Err(failure(&svc.name, &args, &out)),
        }
    }

    async fn reload(&self, svc: &ServiceSpec) -> Result<(), ServiceError> {
        self.must(&svc.name, &["reload", &svc.unit]).await
    }

    async fn stop(&self, svc: &ServiceSpec) -> Result<(), ServiceError> {
        self.must(&svc.name, &["stop", &svc.unit]).await
    }

    async fn stop_all(&self) {}
}
