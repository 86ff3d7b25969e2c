//! The boot record: what a node's last boot did, written by `boot`, published by `publish` and read by `status`.
//! It lives here, below all three, so that the writers and the reader share it without importing each other.

use crate::render::Layout;
use crate::services::Action;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Config,
    Metadata,
    NodeSpec,
    /// Server tiers: checking that the data disk is mounted.
    Disk,
    Render,
    Write,
    Services,
    Bootstrap,
    Done,
}

/// The non-secret record of this node's last boot, read by `status` (and published for the cluster view).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootRecord {
    pub agent_version: String,
    /// Process id of the agent that wrote this record (tells one boot from the next).
    pub pid: u32,
    pub node: String,
    pub role: Option<String>,
    pub cluster: Option<String>,
    pub phase: Phase,
    pub ok: bool,
    pub last_error: Option<String>,
    pub finished_unix: i64,
    pub critical_path_ms: Option<u64>,
    /// Microseconds spent in each step of the critical path ("start": process start → boot begins).
    #[serde(default)]
    pub phases_us: BTreeMap<String, u64>,
    pub versions: BTreeMap<String, String>,
    pub files_changed: Vec<String>,
    pub services: BTreeMap<String, Action>,
    /// The tier bootstrap's outcome on server tiers ("bootstrapped", "already-done", …) or its error.
    #[serde(default)]
    pub bootstrap: Option<String>,
    /// Vault and Nomad servers, after a successful tier bootstrap: what became of Vault's JWT auth method for
    /// Nomad workloads at this boot ("written", "unchanged", "waiting for the <tier> tier") or its error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<String>,
    /// Where this boot's cluster material came from: "files", "key-vault" (a cold boot waited for it) or "disk"
    /// (a warm boot: what the agent kept, confirmed with Key Vault after the services started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub material: Option<String>,
    /// A warm boot's confirmation with Key Vault (docs/trust-model.md#warm-boots): "pending", "unchanged",
    /// "changed: …" (what restarted), "unconfirmed: …" or "withdrawn: …" (services stopped), with the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converge: Option<String>,
}

impl BootRecord {
    /// The record a boot starts with: this agent, nothing done yet (phase `metadata`, not ok).
    pub fn starting(agent_version: &str, pid: u32) -> Self {
        BootRecord {
            agent_version: agent_version.into(),
            pid,
            node: String::new(),
            role: None,
            cluster: None,
            phase: Phase::Metadata,
            ok: false,
            last_error: None,
            finished_unix: 0,
            critical_path_ms: None,
            phases_us: BTreeMap::new(),
            versions: BTreeMap::new(),
            files_changed: vec![],
            services: BTreeMap::new(),
            bootstrap: None,
            workload_identity: None,
            material: None,
            converge: None,
        }
    }
}

pub fn record_path(layout: &Layout) -> PathBuf {
    layout.state_dir().join("boot.json")
}
