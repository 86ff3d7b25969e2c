//! The services the agent renders against the systemd units shipped in the image (systemd/*.service): same
//! unit names, same command lines, and the environment file the agent writes is the one the unit reads, with
//! `AZURE_CLIENT_ID` wherever the node has a user-assigned identity.

mod common;

use common::{agent_config, imds_fixture, render_with_material, tag, versions, ROLE_FIXTURES};
use hashistack_agent::services::read_env_file;
use std::path::{Path, PathBuf};

struct Unit {
    environment_file: Option<PathBuf>,
    exec_start: Vec<String>,
}

fn unit(name: &str) -> Unit {
    let path = common::workspace_dir().join("systemd").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the agent starts a unit that does not exist)",
            path.display()
        )
    });
    let value = |key: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    };
    Unit {
        environment_file: value("EnvironmentFile")
            .map(|v| PathBuf::from(v.trim_start_matches('-'))),
        exec_start: value("ExecStart")
            .expect("ExecStart")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    }
}

/// `<root>/etc/x` → `/etc/x`, for paths and for `-flag=<root>/etc/x` arguments.
fn unroot(s: &str, root: &Path) -> String {
    let r = root.display().to_string();
    s.replace(&r, "")
}

#[test]
fn rendered_services_match_the_systemd_units() {
    for fixture in ROLE_FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let cfg = agent_config(dir.path(), root.path(), true, "s.transit");
        let doc = imds_fixture(fixture);
        let client_id = tag(&doc, "hashistack-identity-client-id");
        let (_, plan) = render_with_material(&doc, &cfg, &versions(None, None));
        assert!(!plan.services.is_empty(), "{fixture}");
        for svc in &plan.services {
            let u = unit(&svc.unit);
            let cmd: Vec<String> = svc.command.iter().map(|a| unroot(a, root.path())).collect();
            assert_eq!(
                cmd, u.exec_start,
                "{fixture}/{}: the process backend runs what the unit runs",
                svc.name
            );
            match (&u.environment_file, &svc.env_file) {
                (Some(want), Some(have)) => {
                    assert_eq!(
                        PathBuf::from(unroot(&have.display().to_string(), root.path())),
                        *want,
                        "{fixture}/{}: the agent writes the env file the unit reads",
                        svc.name
                    );
                    assert!(
                        svc.watch.contains(have),
                        "{fixture}/{}: a changed env file restarts the service",
                        svc.name
                    );
                    let env = read_env_file(have).unwrap();
                    if let Some(id) = &client_id {
                        assert!(
                            env.iter().any(|(k, v)| k == "AZURE_CLIENT_ID" && v == id),
                            "{fixture}/{}: AZURE_CLIENT_ID for the user-assigned identity: {:?}",
                            svc.name,
                            env.iter().map(|(k, _)| k).collect::<Vec<_>>()
                        );
                    }
                }
                (Some(want), None) => {
                    assert!(
                        client_id.is_none(),
                        "{fixture}/{}: the unit reads {} but the agent writes no env file, so the service \
                         never sees AZURE_CLIENT_ID",
                        svc.name,
                        want.display()
                    );
                }
                (None, Some(have)) => panic!(
                    "{fixture}/{}: the agent writes {} but the unit reads no EnvironmentFile",
                    svc.name,
                    have.display()
                ),
                (None, None) => {}
            }
        }
    }
}
