//! `hashistack-lab bench`'s command line, before any lab starts: the agent it is told to measure is the one it
//! measures. (The snapshot bench once ignored `--agent-release` and `--lab-agent` and measured the debug agent
//! next to the lab binary, so a "release" figure in docs/PERFORMANCE.md was the debug agent's; the scale bench
//! ignored `--lab-agent` and `--agent-release` the same way until 2026-12-06.)

use std::process::Command;

fn lab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hashistack-lab"))
}

/// `bench --only <only> <flag> <missing path> <extra…>` exits 2 with one line naming the path, for each flag.
fn refuses_a_missing_agent(only: &str, flags: [&str; 2], extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    for flag in flags {
        let missing = dir.path().join("no-such-agent");
        let out = lab()
            .args(["bench", "--only", only, flag])
            .arg(&missing)
            .args(extra)
            .env("HASHISTACK_AGENT", "/bin/false")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{only} {flag}: {stderr}");
        assert!(
            stderr.contains(&missing.display().to_string()),
            "{only} {flag}: the error names the agent: {stderr}"
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{only} {flag}: one line, nothing started: {stderr}"
        );
    }
}

#[test]
fn the_snapshot_bench_refuses_an_agent_it_cannot_run_before_starting_a_lab() {
    // A net no suite uses: were a lab to start, it would not collide with anything.
    refuses_a_missing_agent(
        "snapshot",
        ["--agent-release", "--lab-agent"],
        &["--snapshot-net", "199"],
    );
}

#[test]
fn the_scale_bench_runs_the_agent_it_is_given_and_refuses_one_it_cannot_run() {
    refuses_a_missing_agent(
        "scale",
        ["--lab-agent", "--agent-release"],
        &["--agents", "1", "--scale-net", "198"],
    );
}
