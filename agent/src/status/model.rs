//! The two data shapes of the cluster status:
//!
//! * [`Observations`] — everything collection saw, raw (what each API answered or why it did not). Snapshot tests
//!   start from a fixed `Observations` document.
//! * [`Report`] — the assessment: the verdict, the problems and one row per server, tier and node. `--json`
//!   prints it; its schema (`hashistack-status/1`) is documented in docs/status.md and only grows compatibly
//!   (new fields may appear; existing ones keep their name, type and meaning).

use crate::coordination::TierState;
use crate::publish::NodeRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const SCHEMA: &str = "hashistack-status/1";

/// The answer to one question: not asked (`None`), an answer, or why there is none.
pub type Got<T> = Option<Result<T, NoAnswer>>;

/// Why a question got no answer, as the observations keep it: the text of the typed error collection met
/// (`collect::CollectError`, an `AzureError`, …). Stored as a bare string, so the `Observations` document reads
/// and writes as it always did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(transparent)]
#[error("{0}")]
pub struct NoAnswer(String);

impl NoAnswer {
    /// The observation of a failure `e`: its one line.
    pub fn of(e: &impl std::fmt::Display) -> Self {
        NoAnswer(e.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for NoAnswer {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NoAnswer {
    fn from(s: &str) -> Self {
        NoAnswer(s.to_string())
    }
}

/// A server's place in its tier's raft configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RaftRole {
    Leader,
    Voter,
    NonVoter,
    /// Not in the raft configuration.
    Absent,
}

impl RaftRole {
    /// As the report and the table show it.
    pub fn as_str(self) -> &'static str {
        match self {
            RaftRole::Leader => "leader",
            RaftRole::Voter => "voter",
            RaftRole::NonVoter => "non-voter",
            RaftRole::Absent => "absent",
        }
    }

    /// A raft server's place from its leader and voter flags.
    pub fn of(leader: bool, voter: bool) -> Self {
        match (leader, voter) {
            (true, _) => RaftRole::Leader,
            (false, true) => RaftRole::Voter,
            (false, false) => RaftRole::NonVoter,
        }
    }

    /// Vault's autopilot `status` of a server (`leader`, `voter`, `non-voter`); `None` for anything else.
    pub fn from_autopilot(status: &str) -> Option<Self> {
        match status {
            "leader" => Some(RaftRole::Leader),
            "voter" => Some(RaftRole::Voter),
            "non-voter" => Some(RaftRole::NonVoter),
            _ => None,
        }
    }
}

impl std::fmt::Display for RaftRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the status token of a tier could be had from the status Key Vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TokenState {
    /// Fetched (its value is never part of the observations).
    Present,
    /// The secret does not exist (the tier's bootstrap has not created it).
    Missing,
    /// The status Key Vault did not answer, or refused.
    Error(String),
    /// Not looked for.
    #[default]
    NotTried,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RaftServer {
    pub id: String,
    pub node: String,
    pub address: String,
    pub leader: bool,
    pub voter: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AutopilotServer {
    pub id: String,
    pub name: String,
    pub address: String,
    pub healthy: bool,
    /// Consul: the serf status (`alive`, `failed`, …); Vault: the node status (`alive`, `left`, …).
    pub status: String,
    pub leader: bool,
    pub voter: bool,
    pub version: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Autopilot {
    pub healthy: bool,
    pub failure_tolerance: i64,
    pub servers: Vec<AutopilotServer>,
}

/// A gossip (serf) member as Consul reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub name: String,
    pub addr: String,
    /// `consul` for servers, `node` for clients.
    pub role: String,
    /// `alive`, `leaving`, `left`, `failed` (or `none`).
    pub status: String,
    pub version: String,
}

/// One direct probe of a server's own API (no token needed).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Probed<T> {
    pub name: String,
    pub address: String,
    pub answer: Got<T>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VaultHealth {
    pub initialized: bool,
    pub sealed: bool,
    pub standby: bool,
    pub version: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NomadNode {
    pub name: String,
    pub address: String,
    /// `ready`, `down`, `initializing`, `disconnected`.
    pub status: String,
    pub eligible: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConsulObs {
    pub state: Got<Option<TierState>>,
    pub token: TokenState,
    /// The agent that answered the cluster-wide questions (the jumpbox's own Consul agent first).
    pub via: Option<String>,
    /// Raft leader address (`ip:8300`), empty when there is none.
    pub leader: Got<String>,
    /// Raft peer addresses (no token needed).
    pub peers: Got<Vec<String>>,
    pub raft: Got<Vec<RaftServer>>,
    pub autopilot: Got<Autopilot>,
    pub members: Got<Vec<Member>>,
    /// `/v1/acl/token/self` with the status token: `Ok(description)`, or the refusal.
    pub acl: Got<String>,
    /// `/v1/status/leader` on each known server.
    pub probes: Vec<Probed<String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VaultObs {
    pub state: Got<Option<TierState>>,
    pub token: TokenState,
    /// `/v1/sys/health` on each known server.
    pub health: Vec<Probed<VaultHealth>>,
    pub via: Option<String>,
    pub raft: Got<Vec<RaftServer>>,
    pub autopilot: Got<Autopilot>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NomadObs {
    pub state: Got<Option<TierState>>,
    pub token: TokenState,
    /// `/v1/status/leader` on each known server.
    pub probes: Vec<Probed<String>>,
    pub peers: Got<Vec<String>>,
    pub nodes: Got<Vec<NomadNode>>,
}

/// Everything one collection saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Observations {
    pub cluster: String,
    /// The node status ran on.
    pub observer: String,
    pub observed_unix: i64,
    /// Listing or reading the published node records failed.
    pub records_error: Option<String>,
    pub records: Vec<NodeRecord>,
    pub consul: ConsulObs,
    pub vault: VaultObs,
    pub nomad: NomadObs,
    /// Each tier's snapshot record (`coordination/<cluster>/<tier>/snapshot.json`), by tier name; a tier absent
    /// here was not asked. Added compatibly.
    #[serde(default)]
    pub snapshots: BTreeMap<String, Got<Option<crate::snapshot::Record>>>,
}

// ------------------------------------------------------------------------------------------------- the report

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Healthy,
    Degraded,
    Unknown,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Degraded => 1,
            Verdict::Unknown => 2,
        }
    }
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Healthy => "HEALTHY",
            Verdict::Degraded => "DEGRADED",
            Verdict::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// Something is wrong (exit 1).
    Degraded,
    /// Something could not be checked (exit 2 when nothing is known to be wrong).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub severity: Severity,
    /// `consul`, `vault`, `nomad`, `nodes` or `coordination`.
    pub area: String,
    /// The node or server concerned, when there is one.
    pub subject: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub target: crate::escrow::ReceiptTarget,
    pub object: String,
    pub written_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    /// `initializing`, `initialized`, `escrowed`, `done`, `needs-operator`.
    pub phase: String,
    pub leader_node: String,
    pub updated_unix: i64,
    pub message: Option<String>,
    pub escrow_id: Option<String>,
    pub receipts: Vec<Receipt>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReport {
    pub name: String,
    pub address: Option<String>,
    /// Its own API answered (`null`: not probed).
    pub reachable: Option<bool>,
    /// Gossip membership (Consul): `alive`, `failed`, `left`, …
    pub member: Option<String>,
    /// `leader`, `voter`, `non-voter` or `absent` (not in the raft configuration).
    pub raft: Option<RaftRole>,
    /// Autopilot's verdict on the server.
    pub healthy: Option<bool>,
    pub initialized: Option<bool>,
    pub sealed: Option<bool>,
    /// Vault: the active node.
    pub active: Option<bool>,
    pub version: Option<String>,
    /// Why it is not fine, in a few words.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clients {
    pub ready: usize,
    pub total: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierReport {
    /// `consul`, `vault` or `nomad`.
    pub tier: String,
    /// Whether the cluster has this tier at all (Nomad is optional).
    pub deployed: bool,
    /// From the server-count tag the tier's nodes published (`null`: unknown).
    pub expected_servers: Option<u8>,
    /// Servers that answer and that the tier counts as healthy.
    pub healthy_servers: usize,
    pub leader: Option<String>,
    pub failure_tolerance: Option<i64>,
    /// `bootstrapped`, `not-bootstrapped` or `unknown`.
    pub acl: String,
    /// Vault: whether the servers are initialized / any is sealed; the active node.
    pub initialized: Option<bool>,
    pub sealed: Option<bool>,
    pub active_node: Option<String>,
    /// Distinct server versions.
    pub versions: Vec<String>,
    /// Consul: client agents alive; Nomad: client nodes ready.
    pub clients: Option<Clients>,
    pub bootstrap: Option<Bootstrap>,
    /// `present`, `missing`, `error` or `not-tried`.
    pub status_token: String,
    pub servers: Vec<ServerReport>,
    /// Nomad: client nodes it lists as `down` whose worker has departed (left Consul), by name — not counted
    /// in `clients`. Empty for Consul and Vault. Added to `hashistack-status/1` compatibly.
    #[serde(default)]
    pub departed_clients: Vec<String>,
    /// The tier's snapshots (docs/runbooks.md#snapshots); `null` when not collected. Added to
    /// `hashistack-status/1` compatibly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
}

/// A tier's newest snapshot and last attempt, from its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// `ok`, `stale` (the newest is older than twice the interval), `failed` (the last attempt failed), `none`
    /// (no snapshot yet) or `unknown` (the record could not be read).
    pub state: String,
    pub interval_secs: Option<u64>,
    pub retention_days: Option<u32>,
    /// The newest snapshot: its blob, the node that took it, when, its raft index and sizes.
    pub blob: Option<String>,
    pub node: Option<String>,
    pub created_unix: Option<i64>,
    pub age_secs: Option<i64>,
    pub index: Option<u64>,
    pub plaintext_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// The last attempt: whether it succeeded, where and when, and its error line.
    pub last_attempt_ok: Option<bool>,
    pub last_attempt_node: Option<String>,
    pub last_attempt_unix: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub role: Option<String>,
    /// The raw role tag (differs from `role` when the tag is not a valid role).
    pub role_tag: Option<String>,
    pub ip: Option<String>,
    pub ok: bool,
    pub phase: String,
    pub last_error: Option<String>,
    pub bootstrap: Option<String>,
    pub agent_version: String,
    pub versions: BTreeMap<String, String>,
    pub finished_unix: i64,
    pub published_unix: i64,
    /// Consul's gossip status of the node: `alive`, `leaving`, `left`, `failed`, or `absent` (not a member at
    /// all); `null` when the member list is unknown. Added to `hashistack-status/1` compatibly.
    #[serde(default)]
    pub member: Option<String>,
    /// The node has left the cluster: its last boot succeeded, Consul says it `left` (or no longer lists it,
    /// once the record is older than `REAPED_AFTER_SECS` (the assessment's 24 h)), and no tier still counts
    /// it (no raft configuration lists it as a server, Nomad lists no node of that name that is not `down`). A scale-in or a
    /// deleted VM: listed on one informational line, never counted as expected or failed. Added to
    /// `hashistack-status/1` compatibly (absent in older reports: false).
    #[serde(default)]
    pub departed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub cluster: String,
    pub observer: String,
    pub observed_unix: i64,
    pub verdict: Verdict,
    pub exit_code: u8,
    /// The verdict line after the verdict word.
    pub summary: String,
    pub problems: Vec<Problem>,
    /// Always `consul`, `vault`, `nomad`, in this order.
    pub tiers: Vec<TierReport>,
    /// Every published node record, by name.
    pub nodes: Vec<NodeReport>,
}
