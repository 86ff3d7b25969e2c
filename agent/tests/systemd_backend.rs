//! The systemd backend (what every VM uses) against a fake `systemctl` that keeps systemctl(1)'s documented exit
//! codes and messages for the verbs the agent uses (agent/tests/fixtures/fake-systemctl). These machines have no
//! systemd as PID 1; docs/systemd.md says what this exercises and what it does not.

use hashistack_agent::services::systemd::Systemd;
use hashistack_agent::services::{Action, Health, ServiceError, ServiceManager, ServiceSpec};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Fake {
    dir: tempfile::TempDir,
    systemd: Systemd,
}

impl Fake {
    fn new(timeout: Duration) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        for d in ["units", "active", "enabled", "failed", "fail-start", "hang"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        // The backend runs a program; a wrapper script fixes the state directory for it.
        let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-systemctl");
        let wrapper = dir.path().join("systemctl");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/bash\nFAKE_SYSTEMD='{}' exec '{}' \"$@\"\n",
                dir.path().display(),
                fake.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let systemd = Systemd {
            systemctl: wrapper.display().to_string(),
            timeout,
        };
        Fake { dir, systemd }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// Installs a unit file like the image's (ExecReload= as in systemd/*.service, or without it).
    fn install(&self, unit: &str, reload: bool) {
        let text = if reload {
            "[Service]\nExecReload=/bin/kill --signal HUP $MAINPID\n"
        } else {
            "[Service]\n"
        };
        std::fs::write(self.path(&format!("units/{unit}")), text).unwrap();
    }
    fn touch(&self, rel: &str) {
        std::fs::write(self.path(rel), "").unwrap();
    }
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
    fn jobs(&self, unit: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(&format!("jobs-{unit}")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
    fn active(&self, unit: &str) -> bool {
        self.path(&format!("active/{unit}")).exists()
    }
}

fn spec(name: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        unit: format!("{name}.service"),
        command: vec![format!("/usr/bin/{name}")],
        env_file: None,
        watch: vec![],
        health: Health::ConsulHttps {
            addr: "127.0.0.1:8501".into(),
            ca_file: "/nonexistent".into(),
        },
    }
}

fn failed_message(e: ServiceError) -> String {
    match e {
        ServiceError::Failed { service, message } => {
            assert_eq!(service, "consul");
            message
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn start_then_nothing_then_restart_on_a_changed_config() {
    let f = Fake::new(Duration::from_secs(10));
    f.install("consul.service", true);
    let svc = spec("consul");

    assert_eq!(f.systemd.apply(&svc, true).await.unwrap(), Action::Started);
    assert!(f.active("consul.service"));
    // The image's units have no [Install] section: `enable` links nothing; the agent starts them every boot.
    assert!(!f.path("enabled/consul.service").exists());
    assert_eq!(
        f.calls(),
        [
            "enable --quiet consul.service",
            "is-active --quiet consul.service",
            "start consul.service"
        ]
    );

    // Running and unchanged: no job at all.
    assert_eq!(
        f.systemd.apply(&svc, false).await.unwrap(),
        Action::AlreadyRunning
    );
    assert_eq!(f.jobs("consul.service"), ["start"]);

    // Running and changed: restart (not reload: the products do not re-read every setting on SIGHUP).
    assert_eq!(
        f.systemd.apply(&svc, true).await.unwrap(),
        Action::Restarted
    );
    assert_eq!(f.jobs("consul.service"), ["start", "restart"]);
    // The agent never writes unit files (the image ships them), so it never needs daemon-reload.
    assert!(!f.calls().iter().any(|c| c.starts_with("daemon-reload")));
}

#[tokio::test]
async fn a_stopped_unit_is_started_even_when_its_config_did_not_change() {
    let f = Fake::new(Duration::from_secs(10));
    f.install("consul.service", true);
    assert_eq!(
        f.systemd.apply(&spec("consul"), false).await.unwrap(),
        Action::Started
    );
    assert!(f.active("consul.service"));
}

#[tokio::test]
async fn a_unit_that_fails_to_start_is_an_error_with_systemds_first_line() {
    let f = Fake::new(Duration::from_secs(10));
    f.install("consul.service", true);
    f.touch("fail-start/consul.service");
    let e = f.systemd.apply(&spec("consul"), true).await.unwrap_err();
    let m = failed_message(e);
    assert!(m.contains("systemctl start consul.service failed"), "{m}");
    assert!(
        m.contains(
            "Job for consul.service failed because the control process exited with error code."
        ),
        "{m}"
    );
    // A failed unit is not active: the next boot starts it again.
    assert!(!f.systemd.is_running(&spec("consul")).await.unwrap());
}

#[tokio::test]
async fn a_unit_the_image_lacks_is_an_error_naming_it() {
    let f = Fake::new(Duration::from_secs(10));
    let e = f.systemd.apply(&spec("consul"), true).await.unwrap_err();
    let m = failed_message(e);
    assert!(m.contains("consul.service does not exist"), "{m}");
}

#[tokio::test]
async fn is_active_exit_codes_are_read_as_documented() {
    let f = Fake::new(Duration::from_secs(10));
    f.install("consul.service", true);
    let svc = spec("consul");
    assert!(!f.systemd.is_running(&svc).await.unwrap(), "3: not active");
    f.touch("active/consul.service");
    assert!(f.systemd.is_running(&svc).await.unwrap(), "0: active");
    assert!(
        !f.systemd.is_running(&spec("nomad")).await.unwrap(),
        "4: no such unit is not running"
    );
    // systemd unreachable: not "stopped" (which would start a second copy) but an error.
    f.touch("no-bus");
    let m = failed_message(f.systemd.is_running(&svc).await.unwrap_err());
    assert!(m.contains("Failed to connect to bus"), "{m}");
}

#[tokio::test]
async fn reload_needs_an_active_unit_with_execreload() {
    let f = Fake::new(Duration::from_secs(10));
    f.install("consul.service", true);
    let svc = spec("consul");
    let m = failed_message(f.systemd.reload(&svc).await.unwrap_err());
    assert!(
        m.contains("systemctl reload consul.service failed: Job for consul.service failed."),
        "{m}"
    );
    f.touch("active/consul.service");
    f.systemd.reload(&svc).await.unwrap();
    assert_eq!(f.jobs("consul.service"), ["reload"]);

    let g = Fake::new(Duration::from_secs(10));
    g.install("consul.service", false);
    g.touch("active/consul.service");
    let m = failed_message(g.systemd.reload(&svc).await.unwrap_err());
    assert!(m.contains("Job type reload is not applicable"), "{m}");
}

#[tokio::test]
async fn stop_stops_a_running_unit_and_a_stopped_one_is_fine() {
    let f = Fake::new(Duration::from_secs(10));
    f.install("consul.service", true);
    let svc = spec("consul");
    f.touch("active/consul.service");
    f.systemd.stop(&svc).await.unwrap();
    assert!(!f.active("consul.service"));
    f.systemd.stop(&svc).await.unwrap();
    assert_eq!(f.jobs("consul.service"), ["stop", "stop"]);
    assert!(!f.systemd.is_running(&svc).await.unwrap());
}

#[tokio::test]
async fn a_systemctl_that_hangs_is_killed_at_the_deadline() {
    let f = Fake::new(Duration::from_millis(700));
    f.install("consul.service", true);
    f.touch("hang/start");
    let e = f.systemd.apply(&spec("consul"), true).await.unwrap_err();
    let m = failed_message(e);
    assert!(
        m.contains("systemctl start consul.service did not finish within"),
        "{m}"
    );
    // The hung systemctl does not outlive the call.
    let pid: i32 = std::fs::read_to_string(f.path("hang/start.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut gone = false;
    for _ in 0..50 {
        if nix_kill0(pid) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            gone = true;
            break;
        }
    }
    assert!(gone, "the hung systemctl {pid} was not killed");
}

#[tokio::test]
async fn a_missing_systemctl_is_a_spawn_error() {
    let s = Systemd {
        systemctl: "/nonexistent/systemctl".into(),
        timeout: Duration::from_secs(5),
    };
    match s.apply(&spec("consul"), true).await.unwrap_err() {
        ServiceError::Spawn { program, .. } => assert_eq!(program, "/nonexistent/systemctl"),
        other => panic!("{other:?}"),
    }
}

/// Whether a process exists (signal 0), without a zombie counting: reads /proc state.
fn nix_kill0(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_none_or(|st| st != "Z"),
        Err(_) => false,
    }
}
