//! `hashistack-lab bench`'s command line, before any lab starts: the agent it is told to measure is the one it
//! measures. (The snapshot bench once ignored `--agent-release` and `--lab-agent` and measured the debug agent
//! next to the lab binary, so a "release" figure in docs/PERFORMANCE.md was the debug agent's; the scale bench
//! ignored `--lab-agent` and `--agent-release` the same way until 2026-12-06.)

use std::process::Command;

fn lab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hashistack-lab"))
}

#[test]
fn the_snapshot_bench_refuses_an_agent_it_cannot_run_before_starting_a_lab() {
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--agent-release", "--lab-agent"] {
        let missing = dir.path().join("no-such-agent");
        let out = lab()
            .args(["bench", "--only", "snapshot", flag])
            .arg(&missing)
            // A net no suite uses: were a lab to start, it would not collide with anything.
            .args(["--snapshot-net", "199"])
            .env("HASHISTACK_AGENT", "/bin/false")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(&missing.display().to_string()),
            "{flag}: the error names the agent: {stderr}"
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{flag}: one line, nothing started: {stderr}"
        );
    }
}

#[test]
fn the_scale_bench_runs_the_agent_it_is_given_and_refuses_one_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--lab-agent", "--agent-release"] {
        let missing = dir.path().join("no-such-agent");
        let out = lab()
            .args(["bench", "--only", "scale", "--agents", "1", flag])
            .arg(&missing)
            // A net no suite uses: were a lab to start, it would not collide with anything.
            .args(["--scale-net", "198"])
            .env("HASHISTACK_AGENT", "/bin/false")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(&missing.display().to_string()),
            "{flag}: the error names the agent: {stderr}"
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{flag}: one line, nothing started: {stderr}"
        );
    }
}
