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

/// Starts `program`, logging to `<log_dir>/<name>.log`, its pid in `<pid_dir>/<name>.pid`. `nice`: a scheduling
/// priority (-20 to 19) set before the program starts, so that each of its threads has it; one above the lab's
/// own needs `CAP_SYS_NICE`, and without it the process runs at the lab's ([`Proc::nice`] tells which it got).
pub fn spawn(
    name: &str,
    program: &Path,
    args: &[String],
    envs: &[(String, String)],
    log_dir: &Path,
    pid_dir: &Path,
    nice: Option<i32>,
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
        cmd.pre_exec(move || {
            if let Some(n) = nice {
                // SAFETY: setpriority is a plain system call. Refused (EPERM): the lab's priority is kept.
                nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, n);
            }
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

    /// The process's scheduling priority (its main thread's), from `/proc`.
    pub fn nice(&self) -> Option<i32> {
        nice_of(self.pid()?)
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

/// The scheduling priority of process `pid` (its main thread's): field 19 of `/proc/<pid>/stat`, counted after
/// the command name (which may hold spaces) closes at the last ')'.
fn nice_of(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(16)?
        .parse()
        .ok()
}

/// Stops many processes at once: SIGTERM to all, then up to `grace` for them to exit, then SIGKILL to what is left.
/// `waiting` is told, once, which processes are still running after the first second (so a person watching knows
/// what the stop waits for). Returns the names of the processes that had to be killed.
pub async fn stop_all(
    mut procs: Vec<Proc>,
    grace: Duration,
    mut waiting: impl FnMut(&[String]),
) -> Vec<String> {
    for p in &procs {
        if let Some(pid) = p.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let start = std::time::Instant::now();
    let mut told = false;
    loop {
        procs.retain_mut(|p| {
            let running = matches!(p.child.try_wait(), Ok(None));
            if !running {
                let _ = std::fs::remove_file(&p.pid_file);
            }
            running
        });
        if procs.is_empty() || start.elapsed() >= grace {
            break;
        }
        if !told && start.elapsed() >= Duration::from_secs(1).min(grace / 2) {
            waiting(&procs.iter().map(|p| p.name.clone()).collect::<Vec<_>>());
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut killed = Vec::new();
    for mut p in procs {
        p.kill().await;
        killed.push(p.name);
    }
    killed
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, script: &str, dir: &Path) -> Proc {
        spawn(
            name,
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &[],
            &dir.join("logs"),
            &dir.join("pids"),
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_niced_process_runs_at_its_priority_or_at_the_labs_when_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spawn_at = |name: &str, nice| {
            spawn(
                name,
                Path::new("/bin/sh"),
                &["-c".into(), "exec sleep 30".into()],
                &[],
                &dir.path().join("logs"),
                &dir.path().join("pids"),
                nice,
            )
            .unwrap()
        };
        let own = nice_of(std::process::id()).unwrap();
        let mut plain = spawn_at("plain", None);
        assert_eq!(plain.nice(), Some(own));
        // Lower is always allowed.
        let mut lower = spawn_at("lower", Some((own + 3).min(19)));
        assert_eq!(lower.nice(), Some((own + 3).min(19)));
        // Higher needs CAP_SYS_NICE (root here and in CI); refused, the process still runs, at ours.
        let mut higher = spawn_at("higher", Some(own - 5));
        let root = nix::unistd::geteuid().is_root();
        assert_eq!(higher.nice(), Some(if root { own - 5 } else { own }));
        for p in [&mut plain, &mut lower, &mut higher] {
            p.kill().await;
        }
    }

    #[tokio::test]
    async fn stop_all_terminates_together_and_kills_only_what_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        // `exec sleep` takes SIGTERM's default action; the trap makes the shell ignore it (sleep inherits that).
        let polite = sh("polite", "exec sleep 30", dir.path());
        let stubborn1 = sh("stubborn-1", "trap '' TERM; sleep 30", dir.path());
        let stubborn2 = sh("stubborn-2", "trap '' TERM; sleep 30", dir.path());
        let pids: Vec<i32> = [&polite, &stubborn1, &stubborn2]
            .iter()
            .map(|p| p.pid().unwrap() as i32)
            .collect();
        // Let the shells install their traps.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut told = Vec::new();
        let mut killed = stop_all(
            vec![polite, stubborn1, stubborn2],
            Duration::from_millis(1500),
            |names| told = names.to_vec(),
        )
        .await;
        killed.sort();
        assert_eq!(killed, ["stubborn-1", "stubborn-2"]);
        assert_eq!(
            told,
            ["stubborn-1", "stubborn-2"],
            "what the stop waited for"
        );
        for pid in pids {
            assert!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
                "pid {pid} still exists"
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("pids")).unwrap().count(),
            0,
            "pid files left"
        );
    }
}
