//! Child processes of the lab: logs to files, a pid file each (for `hashistack-lab down` from another
//! shell), PR_SET_PDEATHSIG so nothing outlives the lab, and an orderly stop (SIGTERM, then SIGKILL).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

pub struct Proc {
    pub name: String,
    pub child: Child,
    pub pid_file: PathBuf,
    pub log: PathBuf,
}

pub fn spawn(
    name: &str,
    program: &Path,
    args: &[String],
    envs: &[(String, String)],
    log_dir: &Path,
    pid_dir: &Path,
) -> std::io::Result<Proc> {
    std::fs::create_dir_all(log_dir)?;
    std::fs::create_dir_all(pid_dir)?;
    let log = log_dir.join(format!("{name}.log"));
    let f = OpenOptions::new().create(true).append(true).open(&log)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", program.display())))?;
    let pid_file = pid_dir.join(format!("{name}.pid"));
    std::fs::write(&pid_file, format!("{}\n", child.id().unwrap_or(0)))?;
    Ok(Proc {
        name: name.to_string(),
        child,
        pid_file,
        log,
    })
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// SIGKILL at once (crash injection, power loss).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.pid_file);
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Stops processes recorded in `pid_dir` by a lab running in another process (`hashistack-lab down`).
pub fn kill_pid_files(pid_dir: &Path) -> usize {
    signal_pid_files(pid_dir, nix::sys::signal::Signal::SIGTERM)
}

/// Sends `sig` to every process recorded in `pid_dir` and removes the pid files.
pub fn signal_pid_files(pid_dir: &Path, sig: nix::sys::signal::Signal) -> usize {
    let Ok(entries) = std::fs::read_dir(pid_dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Some(pid) = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if pid > 1 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok() {
                n += 1;
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
    n
}
