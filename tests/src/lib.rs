//! Shared helpers for the end-to-end suites: each test gets its own lab on its own loopback network.

use hashistack_agent::coordination::{TierPhase, TierState};
use hashistack_agent::escrow::ReceiptTarget;
use hashistack_agent::node::Role;
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
    wait_healthy(&lab, Duration::from_secs(120)).await;
    lab
}

/// Waits until the lab is healthy; else panics with the health table and where the logs are.
pub async fn wait_healthy(lab: &Lab, deadline: Duration) {
    if let Err((e, h)) = lab.wait_healthy(deadline).await {
        let logs = lab.opts.state_dir.join("logs");
        panic!("{e}\n{}\nlogs in {}", h.table(), logs.display());
    }
}

/// The indices of the lab's nodes of `role`.
pub fn nodes_of(lab: &Lab, role: Role) -> Vec<usize> {
    (0..lab.nodes.len())
        .filter(|&i| lab.nodes[i].def.role == role)
        .collect()
}

/// How many nodes of `role` recorded the bootstrap outcome `outcome` (`bootstrapped`, `already-done`, …).
pub fn count_outcome(lab: &Lab, role: Role, outcome: &str) -> usize {
    nodes_of(lab, role)
        .into_iter()
        .filter(|&i| lab.boot_record(i).and_then(|r| r.bootstrap).as_deref() == Some(outcome))
        .count()
}

/// How many times the tier's state went through `initializing` (a bootstrap call was made).
pub fn inits(st: &TierState) -> usize {
    st.history
        .iter()
        .filter(|(p, _, _)| *p == TierPhase::Initializing)
        .count()
}

/// The tier's coordination state, asserted `done`, with receipts from both escrow targets and initialized
/// exactly once.
pub async fn assert_done_once(lab: &Lab, tier: &str) -> TierState {
    let st = lab
        .tier_state(tier)
        .await
        .unwrap_or_else(|| panic!("{tier}: no coordination state"));
    assert_eq!(st.phase, TierPhase::Done, "{tier}: {st:?}");
    for target in ReceiptTarget::ALL {
        assert!(
            st.receipts.iter().any(|r| r.target == target),
            "{tier}: no {target} receipt: {st:?}"
        );
    }
    assert_eq!(
        inits(&st),
        1,
        "{tier}: initialized more than once: {:?}",
        st.history
    );
    st
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

/// `escrow open --tier <tier>` as the operator behind `operator` (its IMDS endpoint), asserted to succeed:
/// the opened secrets (JSON).
pub fn escrow_open(lab: &Lab, operator: &str, tier: &str) -> Vec<u8> {
    let o = escrow_cmd(lab, operator, &["open", "--tier", tier]);
    assert!(
        o.status.success(),
        "escrow open {tier}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// `GET url` through the lab's HTTPS client with the token in `header` (`X-Vault-Token`, `X-Consul-Token`,
/// `X-Nomad-Token`): the status and the body.
pub async fn get_as(lab: &Lab, url: &str, header: &str, token: &str) -> (u16, String) {
    let r = lab
        .https()
        .get(url)
        .header(header, token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `hashistack-agent status --json` on the jumpbox: its exit code and its output (the JSON report), which is
/// also printed.
pub async fn jumpbox_status(lab: &Lab) -> (i32, String) {
    let j = lab.jumpbox().expect("the lab has a jumpbox");
    let o = tokio::process::Command::new(agent(lab))
        .arg("status")
        .arg("--config")
        .arg(&lab.nodes[j].config_path)
        .arg("--json")
        .output()
        .await
        .expect("run hashistack-agent status");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("--- status --json (exit {:?}):\n{out}", o.status.code());
    (o.status.code().unwrap_or(-1), out)
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

/// Waits (up to 120 s) until Vault's raft holds the tier's `servers` as voters, with distinct node ids, asked
/// with `root` through the first Vault server. Autopilot promotes a joined server to voter only after its
/// stabilization time: stopping a server before that can leave the others without a quorum.
pub async fn all_vault_voters(lab: &Lab, root: &str, servers: usize) {
    let first = nodes_of(lab, Role::VaultServer)[0];
    let url = format!(
        "https://{}:8200/v1/sys/storage/raft/configuration",
        lab.nodes[first].def.ip
    );
    let start = std::time::Instant::now();
    loop {
        let (_, body) = get_as(lab, &url, "X-Vault-Token", root).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let peers = v["data"]["config"]["servers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ids: std::collections::BTreeSet<_> =
            peers.iter().filter_map(|s| s["node_id"].as_str()).collect();
        if peers.len() == servers
            && ids.len() == servers
            && peers.iter().all(|s| s["voter"] == true)
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "vault raft not whole: {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (up to `deadline`) until `tier`'s coordination state reaches `phase`, and returns that state.
pub async fn wait_phase(lab: &Lab, tier: &str, phase: TierPhase, deadline: Duration) -> TierState {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = lab.tier_state(tier).await.filter(|s| s.phase == phase) {
            return s;
        }
        assert!(
            start.elapsed() < deadline,
            "{tier} tier not {phase:?} within {deadline:?}: {:?}",
            lab.tier_state(tier).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Azure clients (Blob, Key Vault) as lab node `i`'s managed identity, through its IMDS, trusting the lab's CA.
pub fn azure_as_node(lab: &Lab, i: usize) -> hashistack_agent::azure::Azure {
    let imds = hashistack_agent::imds::ImdsClient::new(
        &format!(
            "http://{}:{}",
            lab.nodes[i].def.ip,
            hashistack_lab::lab::IMDS_PORT
        ),
        hashistack_agent::retry::RetryPolicy::imds(Duration::from_secs(30)),
    );
    let cred = std::sync::Arc::new(hashistack_agent::identity::ImdsCredential::new(imds, None));
    hashistack_agent::azure::Azure::new(cred, Some(&lab.opts.state_dir.join("ca.pem")), false)
        .expect("Azure clients for a lab node")
}
