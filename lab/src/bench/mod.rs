//! `hashistack-lab bench`: the numbers in `docs/PERFORMANCE.md`.
//!
//! Per run it brings up a lab of its own (distinct loopback net and state directory) and measures:
//! - the agent's boot critical path, as the agent records it in `boot.json` (`critical_path_ms`: from the
//!   start of `main` to configs written and services started; the agent never waits for peers), for
//!   - cold boots as `Lab::up` starts them (all agents at once, certificates issued, versions detected),
//!   - warm reboots, one node at a time (nothing changes: cached versions, certificates kept),
//!   - cold boots one node at a time (the node's certificates and version cache removed first),
//!   - first boots from an image that carries the version cache (certificates removed, cache kept);
//!
//!   for the one-at-a-time boots also spawn → `boot.json` written, on the lab's clock (adds exec, dynamic
//!   loading and runtime start-up, which the agent's own clock cannot see);
//! - the agent's peak RSS: `VmHWM` of `/proc/<agent pid>/status` once it has booted, and for the agents
//!   `Lab::up` started once the lab is healthy (tier bootstrap done; they stay alive supervising);
//! - the time from calling `Lab::up` to `wait_healthy` returning OK.
//!
//! Once per bench: the size of the stripped release agent binary (`--agent-release`, or built with
//! `cargo build --release -p hashistack-agent`).
//!
//! Then **time to bootstrapped, per tier** ([`tier_run`]): per run, one lab whose agents run the tier
//! bootstrap (leader election, init / ACL bootstrap, post-bootstrap configuration, escrow) and one *floor*
//! lab with the same binaries and configs whose agents only render and start the servers
//! (`LabOptions.bootstrap = false`), bootstrapped by the bench itself with the minimal API calls (no
//! election, no escrow). Both are timed from the agents' spawn; see docs/PERFORMANCE.md for the exact
//! definitions. This is a measurement, not a test: nothing here asserts a time.
//!
//! Where things are: this file holds the options, the whole run ([`run`]) and what it records about the machine
//! and the tools; `boots.rs` the agent boot measurements (one lab per run: cold, warm, cold alone, cold with the
//! version cache; RSS; the release binary); `tiers.rs` the time to bootstrapped per tier (the agent-driven and
//! the floor lab, the bench's observers and the floor's own API calls); `snapshot.rs` the snapshot bench
//! (`--only snapshot`); `scale.rs` the scale simulation (`--only scale`: many worker agents at once against the
//! throttled Key Vault double); `report.rs` the goals, the samples, the summary lines and the tables; `doc.rs`
//! the generated sections of docs/PERFORMANCE.md (`hashistack-lab bench-doc`).

mod boots;
pub mod doc;
mod report;
mod scale;
mod snapshot;
mod tiers;

pub use boots::{build_release_agent, elf_stripped, peak_rss};
pub use report::{
    summarise, summarise_tiers, tier_table, BenchReport, BootSample, Line, RunSample, TierLine,
    GOAL_BINARY_BYTES, GOAL_BOOTSTRAP_RATIO, GOAL_CRITICAL_PATH_MS, GOAL_RSS_BYTES,
};
pub use scale::{scale_run, AgentSample, Rates, ScaleOptions, ScaleReport};
pub use snapshot::{
    measure_cli, run_measured, snapshot_agent, snapshot_run, SnapshotBench, SnapshotBenchOptions,
    SNAPSHOT_MAX_RSS_BYTES,
};
pub use tiers::{tier_run, Mode, TierRun};

use crate::tools::{repo_root, Tools};
use boots::one_run;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub state_dir: PathBuf,
    pub net: u8,
    pub runs: u32,
    pub consul_servers: u8,
    pub vault_servers: u8,
    /// Deadline for one lab to become healthy.
    pub timeout: Duration,
    /// The stripped release agent; built with cargo when absent.
    pub agent_release: Option<PathBuf>,
    /// The agent the labs run [default: $HASHISTACK_AGENT, else the release agent].
    pub lab_agent: Option<PathBuf>,
    pub verbose: bool,
    /// Run the agent boot measurements (critical path, RSS, size, lab time-to-healthy).
    pub boot: bool,
    /// Run the time-to-bootstrapped measurements (agent-driven vs floor, per tier).
    pub bootstrap: bool,
    /// Pairs of labs (agent-driven + floor) for the tier bootstrap.
    pub bootstrap_runs: u32,
    /// State directories of the tier-bootstrap labs: `<this>-agent` and `<this>-floor`.
    pub bootstrap_state_dir: PathBuf,
    /// Loopback nets of the agent-driven and the floor lab.
    pub bootstrap_nets: (u8, u8),
    /// Nomad servers in the tier-bootstrap labs (the lab's Nomad contract double; 0: no Nomad tier).
    pub nomad_servers: u8,
    /// Keep the tier-bootstrap labs' state directories (logs, boot records) after each run.
    pub keep: bool,
    /// Before each tier-bootstrap lab, wait (up to 10 minutes) until the 1-minute load average is at most this
    /// (a shared machine: other engineers' builds and test labs).
    pub max_load: Option<f64>,
}

impl BenchOptions {
    pub fn new(state_dir: PathBuf, net: u8) -> Self {
        BenchOptions {
            state_dir,
            net,
            runs: 3,
            consul_servers: 3,
            vault_servers: 3,
            timeout: Duration::from_secs(180),
            agent_release: None,
            lab_agent: None,
            verbose: true,
            boot: true,
            bootstrap: true,
            bootstrap_runs: 3,
            bootstrap_state_dir: repo_root().join(".lab/bench-bootstrap"),
            bootstrap_nets: (97, 98),
            nomad_servers: 0,
            keep: false,
            max_load: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Lab(#[from] crate::lab::LabError),
    #[error("{0}")]
    Tool(#[from] crate::tools::MissingTool),
    #[error("{0}")]
    Failed(String),
}

fn say(o: &BenchOptions, msg: impl AsRef<str>) {
    say_if(o.verbose, msg)
}

fn say_if(verbose: bool, msg: impl AsRef<str>) {
    if verbose {
        eprintln!("bench: {}", msg.as_ref());
    }
}

fn profile_of(agent: &Path) -> &'static str {
    let s = agent.display().to_string();
    if s.contains("/release/") {
        "release"
    } else if s.contains("/debug/") {
        "debug"
    } else {
        match elf_stripped(agent) {
            Some(true) => "stripped: release",
            Some(false) => "not stripped",
            None => "unknown",
        }
    }
}

fn tool_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{cpus} cores ({model}), {:.1} GiB RAM",
        mem_kb as f64 / 1024.0 / 1024.0
    )
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs the whole bench: `o.runs` labs for the boot measurements, then `o.bootstrap_runs` pairs of labs for
/// the tier bootstrap, each torn down afterwards.
pub async fn run(o: &BenchOptions, mut tools: Tools) -> Result<BenchReport, BenchError> {
    let env_agent = std::env::var_os("HASHISTACK_AGENT").map(PathBuf::from);
    let need_release = o.boot || (o.lab_agent.is_none() && env_agent.is_none());
    let release = match (&o.agent_release, need_release) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(build_release_agent(o)?),
        (None, false) => None,
    };
    let binary_bytes = match &release {
        Some(r) if o.boot => Some(
            std::fs::metadata(r)
                .map_err(|e| BenchError::Failed(format!("{}: {e}", r.display())))?
                .len(),
        ),
        _ => None,
    };
    tools.agent = o
        .lab_agent
        .clone()
        .or(env_agent)
        .or_else(|| release.clone())
        .ok_or_else(|| BenchError::Failed("no agent for the labs".into()))?;
    say(
        o,
        format!(
            "lab agent {}; boot: {} runs on 127.{}.0.x in {}; tier bootstrap: {} pairs on 127.{}.0.x / 127.{}.0.x in {}-agent / -floor",
            tools.agent.display(),
            if o.boot { o.runs } else { 0 },
            o.net,
            o.state_dir.display(),
            if o.bootstrap { o.bootstrap_runs } else { 0 },
            o.bootstrap_nets.0,
            o.bootstrap_nets.1,
            o.bootstrap_state_dir.display(),
        ),
    );
    let load_start = load_avg();
    let mut boots = Vec::new();
    let mut labs = Vec::new();
    if o.boot {
        for run in 1..=o.runs {
            say(o, format!("run {run}/{}: Lab::up", o.runs));
            labs.push(one_run(o, &tools, run, &mut boots).await?);
        }
    }
    let mut tier_runs = Vec::new();
    if o.bootstrap {
        for run in 1..=o.bootstrap_runs {
            // Alternate which lab goes first, so a drift in the machine's load favours neither.
            let order = if run % 2 == 1 {
                [Mode::Agent, Mode::Floor]
            } else {
                [Mode::Floor, Mode::Agent]
            };
            for mode in order {
                say(
                    o,
                    format!(
                        "tier bootstrap run {run}/{}: {mode:?} lab",
                        o.bootstrap_runs
                    ),
                );
                let r = tier_run(o, &tools, run, mode).await?;
                say(o, format!("  {}", r.summary()));
                tier_runs.push(r);
            }
        }
    }
    // Every node of the lab (the jumpbox included), as the first run booted them.
    let n_nodes = boots
        .iter()
        .filter(|b| b.run == 1 && b.kind == "cold-concurrent")
        .count();
    let lines = if o.boot {
        summarise(&boots, &labs, binary_bytes, n_nodes)
    } else {
        Vec::new()
    };
    let tier_lines = summarise_tiers(&tier_runs, o.nomad_servers > 0);
    Ok(BenchReport {
        date_utc: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        runs: if o.boot { o.runs } else { 0 },
        nodes: format!(
            "{} consul-server + {} vault-server{}",
            o.consul_servers,
            o.vault_servers,
            if o.bootstrap && o.nomad_servers > 0 {
                format!(
                    " (+ {} nomad-server in the tier-bootstrap labs)",
                    o.nomad_servers
                )
            } else {
                String::new()
            }
        ),
        machine: machine(),
        load_avg: (load_start, load_avg()),
        lab_agent_profile: profile_of(&tools.agent).to_string(),
        lab_agent: tools.agent.clone(),
        binary_stripped: release.as_deref().filter(|_| o.boot).and_then(elf_stripped),
        agent_release: release.filter(|_| o.boot),
        binary_bytes,
        consul: tool_version(&tools.consul),
        bao: tool_version(&tools.bao),
        lines,
        boots,
        labs,
        tier_lines,
        tier_runs,
    })
}
