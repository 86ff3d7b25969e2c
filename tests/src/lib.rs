//! Shared helpers for the end-to-end suites: each test gets its own lab on its own loopback network.

use hashistack_lab::tools::{repo_root, Tools};
use hashistack_lab::{Lab, LabOptions};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A lab for one test: state under target/e2e/<name>, network 127.<net>.0.x (unique per test).
pub fn options(name: &str, net: u8) -> LabOptions {
    let dir = repo_root().join("target/e2e").join(name);
    let mut o = LabOptions::new(dir, net);
    o.verbose = std::env::var_os("LAB_VERBOSE").is_some();
    o.keep = std::env::var_os("LAB_KEEP").is_some();
    o
}

pub fn tools() -> Tools {
    Tools::discover().unwrap_or_else(|e| {
        panic!("{e} (the test runner, tests/run.sh, installs and builds everything)")
    })
}

pub async fn healthy_lab(o: LabOptions) -> Lab {
    let lab = Lab::up(o, tools())
        .await
        .unwrap_or_else(|e| panic!("lab up: {e}"));
    if let Err((e, h)) = lab.wait_healthy(Duration::from_secs(120)).await {
        let logs = lab.opts.state_dir.join("logs");
        panic!("{e}\n{}\nlogs in {}", h.table(), logs.display());
    }
    lab
}

/// SHA-256 of every file under `dir` (relative path → digest), for byte-identity checks.
pub fn tree_digest(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(b) = std::fs::read(&p) {
                out.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    hex::encode(Sha256::digest(&b)),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The agent binary the lab runs.
pub fn agent(lab: &Lab) -> PathBuf {
    lab.tools.agent.clone()
}

/// `hashistack-agent escrow open` against the lab as the identity behind `imds_endpoint`.
pub fn escrow_cmd(lab: &Lab, imds_endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(agent(lab))
        .arg("escrow")
        .args(args)
        .args(["--cluster", &lab.opts.cluster])
        .args(["--blob-endpoint", &lab.blob_endpoint()])
        .args(["--escrow-vault-uri", &lab.escrow_vault_uri()])
        .args([
            "--credential",
            "imds",
            "--imds-endpoint",
            imds_endpoint,
            "--lab",
        ])
        .arg("--ca-file")
        .arg(&lab.ca_cert)
        .output()
        .expect("run hashistack-agent escrow")
}

/// Every file under `dir` whose content contains any of `needles`, skipping the given subpaths.
pub fn files_containing(dir: &Path, needles: &[String], skip: &[&str]) -> Vec<PathBuf> {
    fn walk(d: &Path, needles: &[String], skip: &[&str], out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if skip.iter().any(|s| p.to_string_lossy().contains(s)) {
                continue;
            }
            if p.is_dir() {
                walk(&p, needles, skip, out);
            } else if let Ok(b) = std::fs::read(&p) {
                let text = String::from_utf8_lossy(&b);
                if needles
                    .iter()
                    .any(|n| !n.is_empty() && text.contains(n.as_str()))
                {
                    out.push(p);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, needles, skip, &mut out);
    out
}
