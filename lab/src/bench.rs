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

use crate::lab::{Lab, LabOptions};
use crate::tools::{repo_root, Tools};
use hashistack_agent::boot::BootRecord;
use hashistack_agent::coordination::{TierPhase, TierState};
use hashistack_agent::node::Role;
use hashistack_agent::render::Layout;
use hashistack_agent::version::Product;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The agent's steps in boot order (`BootRecord::phases_us`).
const PHASE_ORDER: [&str; 8] = [
    "start",
    "metadata",
    "user-data",
    "versions",
    "material",
    "render",
    "write",
    "services",
];

pub const GOAL_CRITICAL_PATH_MS: f64 = 100.0;
/// Goals are in MB = 10^6 bytes (the stricter reading of "MB").
pub const GOAL_RSS_BYTES: u64 = 20_000_000;
pub const GOAL_BINARY_BYTES: u64 = 15_000_000;

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

/// One agent boot.
#[derive(Debug, Clone, Serialize)]
pub struct BootSample {
    pub run: u32,
    pub node: String,
    pub role: String,
    pub kind: &'static str,
    /// The agent's own `critical_path_ms`.
    pub critical_path_ms: u64,
    /// Spawn → `boot.json` written, on the lab's clock (one-at-a-time boots only).
    pub spawn_to_record_ms: Option<f64>,
    /// Per-phase milliseconds, when the agent records them.
    pub phases_ms: BTreeMap<String, f64>,
    pub files_changed: usize,
    /// `VmHWM` of the agent after this boot, bytes.
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSample {
    pub run: u32,
    pub up_returned_s: f64,
    pub healthy_s: f64,
    /// `VmHWM` of the agents `Lab::up` started, read after all were healthy and booted, just before the
    /// warm reboots.
    pub steady_rss_bytes: Vec<u64>,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub metric: String,
    pub unit: &'static str,
    pub n: usize,
    pub median: Option<f64>,
    pub max: f64,
    /// Goal on the max (every sample within it); `None` for information-only lines.
    pub goal: Option<f64>,
    pub pass: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub date_utc: String,
    pub runs: u32,
    pub nodes: String,
    pub machine: String,
    /// 1-minute load average of the machine when the bench started and when it ended (others may be busy).
    pub load_avg: (f64, f64),
    pub lab_agent: PathBuf,
    pub lab_agent_profile: &'static str,
    pub agent_release: Option<PathBuf>,
    pub binary_bytes: Option<u64>,
    pub binary_stripped: Option<bool>,
    pub consul: String,
    pub bao: String,
    pub lines: Vec<Line>,
    pub boots: Vec<BootSample>,
    pub labs: Vec<RunSample>,
    /// Time to bootstrapped: one line per tier (agent-driven vs floor).
    pub tier_lines: Vec<TierLine>,
    /// Every tier-bootstrap lab with its observed milestones.
    pub tier_runs: Vec<TierRun>,
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
    if o.verbose {
        eprintln!("bench: {}", msg.as_ref());
    }
}

/// `VmHWM` (peak resident set) of a process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Whether an ELF64 little-endian file has no symbol table and no DWARF (`None` if it is not one).
pub fn elf_stripped(path: &Path) -> Option<bool> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return None;
    }
    let u16at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?) as usize);
    let u32at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?) as usize);
    let u64at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?) as usize);
    let (shoff, shentsize, shnum, shstrndx) =
        (u64at(0x28)?, u16at(0x3a)?, u16at(0x3c)?, u16at(0x3e)?);
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u64at(sh(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let name_off = strtab + u32at(sh(i))?;
        let end = b.get(name_off..)?.iter().position(|&c| c == 0)? + name_off;
        let name = &b[name_off..end];
        if name == b".symtab" || name.starts_with(b".debug_") {
            return Some(false);
        }
    }
    Some(true)
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

/// Builds the release agent once with cargo (the release profile strips) and returns its path.
pub fn build_release_agent(o: &BenchOptions) -> Result<PathBuf, BenchError> {
    let root = repo_root();
    say(
        o,
        "building the release agent: cargo build --release -p hashistack-agent (takes minutes)",
    );
    let status = std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
        .args(["build", "--release", "-p", "hashistack-agent"])
        .current_dir(&root)
        .status()
        .map_err(|e| BenchError::Failed(format!("cargo: {e}")))?;
    if !status.success() {
        return Err(BenchError::Failed(format!(
            "cargo build --release -p hashistack-agent: {status}"
        )));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/hashistack-agent"))
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

/// Waits for the first record the node's current agent writes (it rewrites it after the tier bootstrap),
/// polling every 2 ms so the file's mtime tells when the agent wrote it.
async fn first_record(
    lab: &Lab,
    i: usize,
    deadline: Duration,
) -> Result<(BootRecord, SystemTime), BenchError> {
    let pid = lab.nodes[i]
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .ok_or_else(|| BenchError::Failed("agent not running".into()))?;
    let path = Layout::new(&lab.nodes[i].root)
        .state_dir()
        .join("boot.json");
    let mtime = || std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let start = Instant::now();
    let mut seen = None;
    while start.elapsed() < deadline {
        let before = mtime();
        if before.is_some() && before != seen {
            let rec = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<BootRecord>(&b).ok());
            if mtime() == before {
                seen = before;
                if let (Some(r), Some(m)) = (rec, before) {
                    if r.pid == pid && (r.ok || r.last_error.is_some()) {
                        return Ok((r, m));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(BenchError::Failed(format!(
        "{}: agent did not finish booting within {deadline:?}",
        lab.nodes[i].def.name
    )))
}

fn agent_peak_rss(lab: &Lab, i: usize) -> Option<u64> {
    lab.nodes[i]
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .and_then(peak_rss)
}

fn sample(run: u32, kind: &'static str, r: &BootRecord, peak: Option<u64>) -> BootSample {
    BootSample {
        run,
        node: r.node.clone(),
        role: r.role.clone().unwrap_or_default(),
        kind,
        critical_path_ms: r.critical_path_ms.unwrap_or(0),
        spawn_to_record_ms: None,
        phases_ms: r
            .phases_us
            .iter()
            .map(|(k, us)| (k.clone(), *us as f64 / 1000.0))
            .collect(),
        files_changed: r.files_changed.len(),
        peak_rss_bytes: peak,
    }
}

/// Restarts node `i` (after `prepare` on its stopped state) and measures that boot alone.
async fn boot_alone(
    lab: &mut Lab,
    i: usize,
    run: u32,
    kind: &'static str,
    prepare: impl FnOnce(&Path),
) -> Result<BootSample, BenchError> {
    lab.stop_agent(i).await;
    prepare(&lab.nodes[i].root);
    let t0 = SystemTime::now();
    lab.start_agent(i)?;
    let (r, written) = first_record(lab, i, Duration::from_secs(60)).await?;
    if !r.ok {
        return Err(BenchError::Failed(format!(
            "{}: {kind} boot failed: {}",
            r.node,
            r.last_error.unwrap_or_default()
        )));
    }
    let mut s = sample(run, kind, &r, agent_peak_rss(lab, i));
    s.spawn_to_record_ms = written
        .duration_since(t0)
        .ok()
        .map(|d| d.as_secs_f64() * 1000.0);
    Ok(s)
}

/// Removes what a first boot creates: the node's certificates and the binary-version cache.
fn make_cold(root: &Path) {
    let _ = std::fs::remove_file(Layout::new(root).state_dir().join("versions.json"));
    remove_certs(root);
}

/// A first boot from an image that already carries the version cache: only the certificates are new.
fn remove_certs(root: &Path) {
    let layout = Layout::new(root);
    for p in [Product::Consul, Product::Vault, Product::Nomad] {
        for f in [
            layout.issued_file(p),
            layout.cert_file(p),
            layout.key_file(p),
        ] {
            let _ = std::fs::remove_file(f);
        }
    }
}

async fn one_run(
    o: &BenchOptions,
    tools: &Tools,
    run: u32,
    boots: &mut Vec<BootSample>,
) -> Result<RunSample, BenchError> {
    let mut lo = LabOptions::new(o.state_dir.clone(), o.net);
    lo.consul_servers = o.consul_servers;
    lo.vault_servers = o.vault_servers;
    let started = Instant::now();
    let mut lab = Lab::up(lo, tools.clone()).await?;
    let up_returned_s = started.elapsed().as_secs_f64();
    let result = async {
        let healthy = lab.wait_healthy(o.timeout).await;
        let healthy_s = started.elapsed().as_secs_f64();
        if let Err((e, h)) = healthy {
            return Err(BenchError::Failed(format!("{e}\n{}", h.table())));
        }
        say(
            o,
            format!("run {run}: healthy {healthy_s:.1} s after Lab::up was called"),
        );
        let n = lab.nodes.len();
        for i in 0..n {
            let r = lab.wait_booted(i, Duration::from_secs(60)).await?;
            boots.push(sample(run, "cold-concurrent", &r, agent_peak_rss(&lab, i)));
        }
        // The agents Lab::up started have booted, bootstrapped and supervised until now: their high-water mark.
        let steady_rss_bytes: Vec<u64> = (0..n).filter_map(|i| agent_peak_rss(&lab, i)).collect();
        for i in 0..n {
            let s = boot_alone(&mut lab, i, run, "warm", |_| {}).await?;
            if s.files_changed != 0 {
                say(
                    o,
                    format!(
                        "warning: warm reboot of {} changed {} files",
                        s.node, s.files_changed
                    ),
                );
            }
            boots.push(s);
        }
        for i in 0..n {
            boots.push(boot_alone(&mut lab, i, run, "cold-alone", make_cold).await?);
        }
        for i in 0..n {
            boots.push(boot_alone(&mut lab, i, run, "cold-cached-ver", remove_certs).await?);
        }
        say(o, format!("run {run}: {} boots measured", 4 * n));
        Ok(RunSample {
            run,
            up_returned_s,
            healthy_s,
            steady_rss_bytes,
        })
    }
    .await;
    lab.down().await;
    result
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn line(metric: impl Into<String>, unit: &'static str, mut v: Vec<f64>, goal: Option<f64>) -> Line {
    let max = v.iter().cloned().fold(f64::NAN, f64::max);
    let n = v.len();
    Line {
        metric: metric.into(),
        unit,
        n,
        median: median(&mut v),
        max,
        goal,
        pass: goal.map(|g| n > 0 && max <= g),
    }
}

pub fn summarise(
    boots: &[BootSample],
    labs: &[RunSample],
    binary_bytes: Option<u64>,
    n_nodes: usize,
) -> Vec<Line> {
    let mut lines = Vec::new();
    let of = |kind: &'static str| boots.iter().filter(move |b| b.kind == kind);
    for (kind, label) in [
        (
            "cold-concurrent",
            format!("critical path, cold: {n_nodes} agents at once (Lab::up)"),
        ),
        ("cold-alone", "critical path, cold: one node alone".into()),
        (
            "cold-cached-ver",
            "critical path, cold, version cache in image: alone".into(),
        ),
        ("warm", "critical path, warm reboot: one node alone".into()),
    ] {
        lines.push(line(
            label,
            "ms",
            of(kind).map(|b| b.critical_path_ms as f64).collect(),
            Some(GOAL_CRITICAL_PATH_MS),
        ));
    }
    for (kind, label) in [
        ("cold-alone", "  spawn -> boot.json, cold alone (lab clock)"),
        ("warm", "  spawn -> boot.json, warm (lab clock)"),
    ] {
        lines.push(line(
            label,
            "ms",
            of(kind).filter_map(|b| b.spawn_to_record_ms).collect(),
            None,
        ));
    }
    lines.push(line(
        "agent peak RSS (VmHWM), right after each boot",
        "MB",
        boots
            .iter()
            .filter_map(|b| b.peak_rss_bytes)
            .map(|b| b as f64 / 1e6)
            .collect(),
        Some(GOAL_RSS_BYTES as f64 / 1e6),
    ));
    lines.push(line(
        "agent peak RSS (VmHWM), Lab::up agents once healthy",
        "MB",
        labs.iter()
            .flat_map(|l| l.steady_rss_bytes.iter())
            .map(|b| *b as f64 / 1e6)
            .collect(),
        Some(GOAL_RSS_BYTES as f64 / 1e6),
    ));
    if let Some(bytes) = binary_bytes {
        lines.push(line(
            "release agent binary, stripped",
            "MB",
            vec![bytes as f64 / 1e6],
            Some(GOAL_BINARY_BYTES as f64 / 1e6),
        ));
    }
    lines.push(line(
        "Lab::up returned (emulators up, agents spawned)",
        "s",
        labs.iter().map(|l| l.up_returned_s).collect(),
        None,
    ));
    lines.push(line(
        "lab healthy (Lab::up called -> wait_healthy OK)",
        "s",
        labs.iter().map(|l| l.healthy_s).collect(),
        None,
    ));
    lines
}

impl BenchReport {
    /// One line per goal the run missed (empty: every goal met). A line without a goal never misses.
    pub fn missed(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in &self.lines {
            if let (Some(false), Some(goal)) = (l.pass, l.goal) {
                out.push(if l.n == 0 {
                    format!("{}: no samples (goal <= {goal} {})", l.metric, l.unit)
                } else {
                    format!(
                        "{}: max {:.1} {} > goal {goal} {}",
                        l.metric, l.max, l.unit, l.unit
                    )
                });
            }
        }
        for t in &self.tier_lines {
            if t.pass == Some(false) {
                out.push(format!(
                    "{} bootstrapped vs floor: {:.2} (median) / {:.2} (max) > goal {GOAL_BOOTSTRAP_RATIO}",
                    t.tier,
                    t.ratio_median.unwrap_or(f64::NAN),
                    t.ratio_max.unwrap_or(f64::NAN)
                ));
            }
        }
        out
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "hashistack-lab bench, {} (UTC): {} runs of {}; lab agent: {} ({})\nmachine: {} (load average {:.1} at start, {:.1} at end); {}; {}\n\n",
            self.date_utc,
            self.runs,
            self.nodes,
            self.lab_agent.display(),
            self.lab_agent_profile,
            self.machine,
            self.load_avg.0,
            self.load_avg.1,
            self.consul,
            self.bao
        );
        let fmt = |v: f64, unit: &str| match unit {
            "ms" => format!("{v:.0} ms"),
            "s" => format!("{v:.1} s"),
            _ => format!("{v:.1} {unit}"),
        };
        if !self.lines.is_empty() {
            s.push_str(&format!(
                "{:<53} {:>4} {:>10} {:>10} {:>10}  {}\n",
                "METRIC", "N", "MEDIAN", "MAX", "GOAL", "RESULT"
            ));
        }
        for l in &self.lines {
            s.push_str(&format!(
                "{:<53} {:>4} {:>10} {:>10} {:>10}  {}\n",
                l.metric,
                l.n,
                l.median
                    .map(|m| fmt(m, l.unit))
                    .unwrap_or_else(|| "-".into()),
                if l.n == 0 {
                    "-".into()
                } else {
                    fmt(l.max, l.unit)
                },
                l.goal
                    .map(|g| format!("<= {}", fmt(g, l.unit)))
                    .unwrap_or_else(|| "-".into()),
                match l.pass {
                    Some(true) => "PASS",
                    Some(false) => "MISS",
                    None => "info",
                }
            ));
        }
        // Critical path and its phases per kind of boot and role: median/max.
        let mut groups: BTreeMap<(&str, &str), Vec<&BootSample>> = BTreeMap::new();
        for b in &self.boots {
            groups.entry((b.kind, &b.role)).or_default().push(b);
        }
        if !self.boots.is_empty() {
            s.push_str(
                "\ncritical path by boot and role, then by step (agent clock), median/max ms:\n",
            );
        }
        for ((kind, role), bs) in groups {
            let mut total: Vec<f64> = bs.iter().map(|b| b.critical_path_ms as f64).collect();
            let max = total.iter().cloned().fold(0.0, f64::max);
            let med = median(&mut total).unwrap_or(0.0);
            s.push_str(&format!("  {kind:<16} {role:<14} {med:>4.0}/{max:<4.0}:"));
            for p in PHASE_ORDER {
                let mut v: Vec<f64> = bs
                    .iter()
                    .filter_map(|b| b.phases_ms.get(p).copied())
                    .collect();
                if v.is_empty() {
                    continue;
                }
                let max = v.iter().cloned().fold(0.0, f64::max);
                let med = median(&mut v).unwrap_or(0.0);
                s.push_str(&format!(" {p} {med:.1}/{max:.1}"));
            }
            s.push('\n');
        }
        if let (Some(release), Some(bytes)) = (&self.agent_release, self.binary_bytes) {
            s.push_str(&format!(
                "\nbinary: {} ({} bytes, {})\n",
                release.display(),
                bytes,
                match self.binary_stripped {
                    Some(true) => "no .symtab/.debug_* sections",
                    Some(false) => "NOT stripped",
                    None => "not an ELF64 file",
                }
            ));
        }
        if !self.tier_runs.is_empty() {
            s.push('\n');
            s.push_str(&tier_table(&self.tier_lines, &self.tier_runs));
        }
        s
    }
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
        lab_agent_profile: profile_of(&tools.agent),
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

// ---------------------------------------------------------------------------------------------------------
// Time to bootstrapped, per tier: agent-driven next to a floor measured in the same run.

/// Goal: agent-driven time to bootstrapped ≤ 1.25 × the floor.
pub const GOAL_BOOTSTRAP_RATIO: f64 = 1.25;
/// How often the bench looks at a tier-bootstrap lab (and how often the floor retries its calls).
const OBSERVE_EVERY: Duration = Duration::from_millis(100);
/// Per-request timeout of the bench's observations.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a tier-bootstrap lab gets bootstrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The agents do it (`LabOptions.bootstrap = true`): election, init, configuration, escrow.
    Agent,
    /// The agents only render and start the servers; the bench makes the minimal API calls.
    Floor,
}

/// One tier-bootstrap lab.
#[derive(Debug, Clone, Serialize)]
pub struct TierRun {
    pub run: u32,
    pub mode: Mode,
    /// `Lab::up` called → returned (emulators up, agents spawned), seconds; not part of any measured time.
    pub up_s: f64,
    /// 1-minute load average just before `Lab::up`.
    pub load_avg: f64,
    /// Seconds after the agents were spawned at which the bench first saw each `tier:milestone`.
    pub milestones: BTreeMap<String, f64>,
    /// Agent-driven: which node led each tier's bootstrap (coordination state).
    pub leaders: BTreeMap<String, String>,
}

impl TierRun {
    fn summary(&self) -> String {
        let mut s = format!("{:?}: up {:.1} s;", self.mode, self.up_s);
        for k in [
            "vault:bootstrapped",
            "consul:bootstrapped",
            "consul:with-agent-tokens",
            "nomad:bootstrapped",
        ] {
            if let Some(v) = self.milestones.get(k) {
                s.push_str(&format!(" {k} {v:.2} s;"));
            }
        }
        s
    }
}

/// One line of the time-to-bootstrapped table.
#[derive(Debug, Clone, Serialize)]
pub struct TierLine {
    pub tier: String,
    /// What "bootstrapped" means on this line, for each mode.
    pub agent_definition: String,
    pub floor_definition: String,
    /// Seconds from the agents' spawn, one per run.
    pub agent_s: Vec<f64>,
    pub floor_s: Vec<f64>,
    pub agent_median: Option<f64>,
    pub agent_max: Option<f64>,
    pub floor_median: Option<f64>,
    pub floor_max: Option<f64>,
    /// median(agent) / median(floor) and max(agent) / max(floor).
    pub ratio_median: Option<f64>,
    pub ratio_max: Option<f64>,
    /// Both ratios within [`GOAL_BOOTSTRAP_RATIO`].
    pub pass: Option<bool>,
}

/// First-seen times of milestones, on the bench's clock relative to the agents' spawn.
struct Marks {
    t0: Instant,
    seen: std::sync::Mutex<BTreeMap<String, f64>>,
}

impl Marks {
    fn new(t0: Instant) -> Self {
        Marks {
            t0,
            seen: std::sync::Mutex::new(BTreeMap::new()),
        }
    }
    fn mark(&self, key: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        self.seen
            .lock()
            .expect("marks")
            .entry(key.to_string())
            .or_insert(t);
    }
    /// Records `key` at a time taken earlier (e.g. when a request that succeeded was sent).
    fn mark_at(&self, key: &str, at: Instant) {
        let t = at.saturating_duration_since(self.t0).as_secs_f64();
        self.seen
            .lock()
            .expect("marks")
            .entry(key.to_string())
            .or_insert(t);
    }
    fn has(&self, key: &str) -> bool {
        self.seen.lock().expect("marks").contains_key(key)
    }
    fn take(&self) -> BTreeMap<String, f64> {
        self.seen.lock().expect("marks").clone()
    }
}

/// An HTTPS client for the servers' APIs: trusts the lab CA and the cluster CA, which exists only once the
/// first server-tier agent created the cluster material in Key Vault (`None` until then).
fn api_client(lab: &Lab) -> Option<reqwest::Client> {
    lab.cluster_ca()?;
    Some(lab.https())
}

fn nodes_of(lab: &Lab, role: Role) -> Vec<Ipv4Addr> {
    lab.nodes
        .iter()
        .filter(|n| n.def.role == role)
        .map(|n| n.def.ip)
        .collect()
}

async fn get_json(c: &reqwest::Client, url: String) -> Option<serde_json::Value> {
    let r = c.get(url).timeout(PROBE_TIMEOUT).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// `GET /v1/status/leader` answers a non-empty address (Consul and Nomad).
async fn knows_leader(c: &reqwest::Client, ip: Ipv4Addr, port: u16) -> bool {
    get_json(c, format!("https://{ip}:{port}/v1/status/leader"))
        .await
        .and_then(|v| v.as_str().map(|s| !s.is_empty()))
        .unwrap_or(false)
}

/// Vault seal status: `Some((initialized, sealed))` when it answers.
async fn seal_status(c: &reqwest::Client, ip: Ipv4Addr) -> Option<(bool, bool)> {
    let v = get_json(c, format!("https://{ip}:8200/v1/sys/seal-status")).await?;
    Some((v["initialized"].as_bool()?, v["sealed"].as_bool()?))
}

/// A tier's coordination state blob, read as the lab (as `Lab::tier_state`, with a reused client).
async fn tier_state(c: &reqwest::Client, lab: &Lab, token: &str, tier: &str) -> Option<TierState> {
    let name = hashistack_agent::coordination::state_blob_name(&lab.opts.cluster, tier);
    let r = c
        .get(format!("{}coordination/{name}", lab.blob_endpoint()))
        .bearer_auth(token)
        .header("x-ms-version", "2021-12-02")
        .timeout(PROBE_TIMEOUT)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    serde_json::from_slice(&r.bytes().await.ok()?).ok()
}

fn phase_rank(p: &TierPhase) -> Option<usize> {
    match p {
        TierPhase::Initializing => Some(0),
        TierPhase::Initialized => Some(1),
        TierPhase::Escrowed => Some(2),
        TierPhase::Done => Some(3),
        TierPhase::NeedsOperator => None,
    }
}
const PHASE_MARKS: [&str; 4] = [
    "state-initializing",
    "state-initialized",
    "state-escrowed",
    "state-done",
];

/// The tiers of a lab: (tier, role).
fn tiers(lab: &Lab) -> Vec<(&'static str, Role)> {
    let mut t = vec![("vault", Role::VaultServer), ("consul", Role::ConsulServer)];
    if !nodes_of(lab, Role::NomadServer).is_empty() {
        t.push(("nomad", Role::NomadServer));
    }
    t
}

/// What marks a run as finished, per mode.
fn finished(lab: &Lab, mode: Mode, m: &Marks) -> bool {
    tiers(lab).iter().all(|(tier, _)| {
        let need: &[&str] = match (mode, *tier) {
            (Mode::Agent, "vault") => &[
                "vault:state-done",
                "vault:unsealed",
                "vault:every-node-done",
            ],
            (Mode::Agent, "consul") => &[
                "consul:state-done",
                "consul:agent-tokens",
                "consul:every-node-done",
            ],
            (Mode::Agent, _) => &["nomad:state-done", "nomad:every-node-done"],
            (Mode::Floor, "vault") => &["vault:unsealed"],
            (Mode::Floor, "consul") => &["consul:acl-bootstrapped"],
            (Mode::Floor, _) => &["nomad:acl-bootstrapped"],
        };
        need.iter().all(|k| m.has(k))
    })
}

/// Sleeps one [`OBSERVE_EVERY`], or fails once the run's deadline has passed.
async fn next_tick(
    start: Instant,
    deadline: Duration,
    m: &Marks,
    what: &str,
) -> Result<(), BenchError> {
    if start.elapsed() > deadline {
        return Err(BenchError::Failed(format!(
            "{what} not seen within {deadline:?}; seen: {:?}",
            m.take()
        )));
    }
    tokio::time::sleep(OBSERVE_EVERY).await;
    Ok(())
}

/// `vault:answering` every Vault server has answered seal-status; `vault:initialized` one says
/// initialized; `vault:unsealed` every one is initialized and unsealed. One loop per server, so a server
/// busy with `sys/init` (its seal-status waits for the init to finish) delays no other observation.
async fn watch_vault(
    lab: &Lab,
    m: &Arc<Marks>,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    let vaults = nodes_of(lab, Role::VaultServer);
    let client = loop {
        if let Some(c) = api_client(lab) {
            break c;
        }
        next_tick(start, deadline, m, "the cluster CA").await?;
    };
    let latest = Arc::new(std::sync::Mutex::new(vec![None; vaults.len()]));
    let mut loops = tokio::task::JoinSet::new();
    for (i, ip) in vaults.iter().enumerate() {
        let (c, ip, m, latest) = (client.clone(), *ip, m.clone(), latest.clone());
        loops.spawn(async move {
            loop {
                if let Some((init, sealed)) = seal_status(&c, ip).await {
                    let mut st = latest.lock().expect("seal status");
                    st[i] = Some((init, sealed));
                    if init {
                        m.mark("vault:initialized");
                    }
                    if st.iter().all(Option::is_some) {
                        m.mark("vault:answering");
                    }
                    if st.iter().all(|s| *s == Some((true, false))) {
                        m.mark("vault:unsealed");
                    }
                    if init && !sealed {
                        return;
                    }
                }
                tokio::time::sleep(OBSERVE_EVERY).await;
            }
        });
    }
    // The loops are aborted when `loops` is dropped (done or past the deadline).
    loop {
        if m.has("vault:unsealed") {
            return Ok(());
        }
        next_tick(start, deadline, m, "every Vault server unsealed").await?;
    }
}

/// `<tier>:leader`: the tier's first server knows a leader (Consul, Nomad).
async fn watch_leader(
    lab: &Lab,
    m: &Marks,
    tier: &str,
    role: Role,
    port: u16,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    let Some(ip) = nodes_of(lab, role).first().copied() else {
        return Ok(());
    };
    let mut client = None;
    loop {
        if client.is_none() {
            client = api_client(lab);
        }
        if let Some(c) = &client {
            if knows_leader(c, ip, port).await {
                m.mark(&format!("{tier}:leader"));
                return Ok(());
            }
        }
        next_tick(start, deadline, m, &format!("{tier} leader")).await?;
    }
}

/// `consul:agent-tokens`: every node's Consul has its agent token (`etc/consul.d/acl-tokens.json`, what
/// `LabHealth` checks).
async fn watch_tokens(
    lab: &Lab,
    m: &Marks,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    loop {
        if lab
            .nodes
            .iter()
            .all(|n| n.root.join("etc/consul.d/acl-tokens.json").is_file())
        {
            m.mark("consul:agent-tokens");
            return Ok(());
        }
        next_tick(start, deadline, m, "every Consul agent token").await?;
    }
}

/// `<tier>:state-<phase>`: the tier's coordination state reached that phase (or a later one).
async fn watch_state(
    lab: &Lab,
    m: &Marks,
    tier: &str,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let storage = crate::imds::lab_token("https://storage.azure.com", now, 3600);
    let https = lab.https();
    loop {
        if let Some(st) = tier_state(&https, lab, &storage, tier).await {
            let Some(rank) = phase_rank(&st.phase) else {
                return Err(BenchError::Failed(format!(
                    "{tier}: needs an operator: {}",
                    st.message.unwrap_or_default()
                )));
            };
            for p in &PHASE_MARKS[..=rank] {
                m.mark(&format!("{tier}:{p}"));
            }
            if st.phase == TierPhase::Done {
                return Ok(());
            }
        }
        next_tick(start, deadline, m, &format!("{tier} tier state done")).await?;
    }
}

/// Fails the run as soon as an agent records a failed boot or bootstrap; ends when the run is finished.
/// Agent-driven: `<tier>:every-node-done` once every server of the tier recorded its bootstrap outcome in its
/// boot record (the leader "bootstrapped", the others "already-done" when they saw the tier done), as
/// `LabHealth::bootstrapped` requires.
async fn watch_agents(
    lab: &Lab,
    mode: Mode,
    m: &Marks,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    loop {
        if mode == Mode::Agent {
            let records: Vec<_> = (0..lab.nodes.len()).map(|i| lab.boot_record(i)).collect();
            for (i, r) in records.iter().enumerate() {
                if let Some(r) = r.as_ref().filter(|r| !r.ok) {
                    return Err(BenchError::Failed(format!(
                        "agent on {} failed: {}",
                        lab.nodes[i].def.name,
                        r.last_error.clone().unwrap_or_default()
                    )));
                }
            }
            for (tier, role) in tiers(lab) {
                let done = lab
                    .nodes
                    .iter()
                    .zip(&records)
                    .filter(|(n, _)| n.def.role == role)
                    .all(|(_, r)| {
                        matches!(
                            r.as_ref().and_then(|r| r.bootstrap.as_deref()),
                            Some("bootstrapped" | "already-done" | "recovered")
                        )
                    });
                if done {
                    m.mark(&format!("{tier}:every-node-done"));
                }
            }
        }
        if finished(lab, mode, m) {
            return Ok(());
        }
        next_tick(start, deadline, m, "every tier bootstrapped").await?;
    }
}

/// Watches a tier-bootstrap lab and records when each milestone is first seen, every [`OBSERVE_EVERY`]
/// with one concurrent loop per kind of milestone (so a slow answer delays no other milestone): Vault seal
/// status, Consul and Nomad leaders, and for agent-driven labs each tier's coordination state and the
/// Consul agent tokens. Returns when the run is finished (see [`finished`]); fails on a failed agent, a
/// tier that needs an operator, or the deadline.
async fn observe(
    lab: &Lab,
    mode: Mode,
    m: &Arc<Marks>,
    deadline: Duration,
) -> Result<(), BenchError> {
    let start = Instant::now();
    let agent = mode == Mode::Agent;
    let nomad = !nodes_of(lab, Role::NomadServer).is_empty();
    let skip = || async { Ok::<(), BenchError>(()) };
    tokio::try_join!(
        watch_vault(lab, m, start, deadline),
        watch_leader(lab, m, "consul", Role::ConsulServer, 8501, start, deadline),
        watch_leader(lab, m, "nomad", Role::NomadServer, 4646, start, deadline),
        async {
            if agent {
                watch_tokens(lab, m, start, deadline).await
            } else {
                skip().await
            }
        },
        async {
            if agent {
                watch_state(lab, m, "vault", start, deadline).await
            } else {
                skip().await
            }
        },
        async {
            if agent {
                watch_state(lab, m, "consul", start, deadline).await
            } else {
                skip().await
            }
        },
        async {
            if agent && nomad {
                watch_state(lab, m, "nomad", start, deadline).await
            } else {
                skip().await
            }
        },
        watch_agents(lab, mode, m, start, deadline),
    )
    .map(|_| ())
}

/// The floor's Vault: `PUT /v1/sys/init` (recovery shares 5, threshold 3; auto-unseal) on the tier's first
/// server, retried every [`OBSERVE_EVERY`] until it answers 200 (`vault:init-returned`; `vault:init-sent`: when that request was sent). The secrets it returns
/// are dropped. The observer then sees every server unsealed (`vault:unsealed`).
async fn floor_vault(lab: &Lab, m: &Marks, deadline: Duration) -> Result<(), BenchError> {
    let ip = *nodes_of(lab, Role::VaultServer)
        .first()
        .ok_or_else(|| BenchError::Failed("no vault-server".into()))?;
    let body = serde_json::json!({"recovery_shares": 5, "recovery_threshold": 3});
    let start = Instant::now();
    let mut client = None;
    loop {
        if client.is_none() {
            client = api_client(lab);
        }
        if let Some(c) = &client {
            let sent = Instant::now();
            let r = c
                .put(format!("https://{ip}:8200/v1/sys/init"))
                .json(&body)
                .timeout(Duration::from_secs(60))
                .send()
                .await;
            if let Ok(r) = r {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                if status == 200 {
                    m.mark_at("vault:init-sent", sent);
                    m.mark("vault:init-returned");
                    return Ok(());
                }
                if text.contains("already initialized") {
                    return Err(BenchError::Failed(
                        "floor: Vault already initialized".into(),
                    ));
                }
            }
        }
        if start.elapsed() > deadline {
            return Err(BenchError::Failed(format!(
                "floor: Vault init did not succeed within {deadline:?}"
            )));
        }
        tokio::time::sleep(OBSERVE_EVERY).await;
    }
}

/// The floor's ACL bootstrap (Consul, Nomad): `PUT /v1/acl/bootstrap` on the tier's first server, retried
/// every [`OBSERVE_EVERY`] while it cannot answer or answers "legacy mode" / "No cluster leader" / 5xx, until
/// 200 (`<tier>:acl-bootstrapped`; `<tier>:acl-sent`: when that request was sent). The management token it
/// returns is dropped.
async fn floor_acl(
    lab: &Lab,
    m: &Marks,
    tier: &str,
    role: Role,
    port: u16,
    deadline: Duration,
) -> Result<(), BenchError> {
    let Some(ip) = nodes_of(lab, role).first().copied() else {
        return Ok(());
    };
    let start = Instant::now();
    let mut client = None;
    loop {
        if client.is_none() {
            client = api_client(lab);
        }
        if let Some(c) = &client {
            let sent = Instant::now();
            if let Ok(r) = c
                .put(format!("https://{ip}:{port}/v1/acl/bootstrap"))
                .timeout(Duration::from_secs(60))
                .send()
                .await
            {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                if status == 200 {
                    m.mark_at(&format!("{tier}:acl-sent"), sent);
                    m.mark(&format!("{tier}:acl-bootstrapped"));
                    return Ok(());
                }
                if text.contains("no longer allowed") || text.contains("already done") {
                    return Err(BenchError::Failed(format!(
                        "floor: {tier} ACLs already bootstrapped: {}",
                        text.trim()
                    )));
                }
            }
        }
        if start.elapsed() > deadline {
            return Err(BenchError::Failed(format!(
                "floor: {tier} ACL bootstrap did not succeed within {deadline:?}"
            )));
        }
        tokio::time::sleep(OBSERVE_EVERY).await;
    }
}

/// One tier-bootstrap lab: `Lab::up` (agent-driven or floor), observed until every tier is bootstrapped;
/// `t0` is `Lab::up` returning, i.e. right after it spawned the last agent.
pub async fn tier_run(
    o: &BenchOptions,
    tools: &Tools,
    run: u32,
    mode: Mode,
) -> Result<TierRun, BenchError> {
    let (suffix, net) = match mode {
        Mode::Agent => ("agent", o.bootstrap_nets.0),
        Mode::Floor => ("floor", o.bootstrap_nets.1),
    };
    let dir = PathBuf::from(format!("{}-{suffix}", o.bootstrap_state_dir.display()));
    let mut lo = LabOptions::new(dir, net);
    lo.consul_servers = o.consul_servers;
    lo.vault_servers = o.vault_servers;
    lo.nomad_servers = o.nomad_servers;
    lo.bootstrap = mode == Mode::Agent;
    lo.keep = o.keep;
    if let Some(max) = o.max_load {
        let waiting = Instant::now();
        while load_avg() > max && waiting.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        if waiting.elapsed() > Duration::from_secs(1) {
            say(
                o,
                format!(
                    "  waited {:.0} s for load average <= {max} (now {:.1})",
                    waiting.elapsed().as_secs_f64(),
                    load_avg()
                ),
            );
        }
    }
    let load = load_avg();
    let called = Instant::now();
    let lab = Lab::up(lo, tools.clone()).await?;
    let t0 = Instant::now();
    let marks = Arc::new(Marks::new(t0));
    let deadline = o.timeout;
    let result = match mode {
        Mode::Agent => observe(&lab, mode, &marks, deadline).await,
        Mode::Floor => tokio::try_join!(
            observe(&lab, mode, &marks, deadline),
            floor_vault(&lab, &marks, deadline),
            floor_acl(&lab, &marks, "consul", Role::ConsulServer, 8501, deadline),
            floor_acl(&lab, &marks, "nomad", Role::NomadServer, 4646, deadline),
        )
        .map(|_| ()),
    };
    let mut leaders = BTreeMap::new();
    if mode == Mode::Agent {
        for (tier, _) in tiers(&lab) {
            if let Some(st) = lab.tier_state(tier).await {
                leaders.insert(tier.to_string(), st.leader);
            }
        }
    }
    if let Err(e) = &result {
        say(
            o,
            format!("{mode:?} lab failed: {e}\n{}", lab.health().await.table()),
        );
        say(
            o,
            format!("logs: {}", lab.opts.state_dir.join("logs").display()),
        );
    }
    lab.down().await;
    result?;
    let mut ms = marks.take();
    // The definitions of "bootstrapped" (docs/PERFORMANCE.md).
    let both = |a: &str, b: &str| Some(ms.get(a)?.max(*ms.get(b)?));
    let derived: Vec<(&str, Option<f64>)> = match mode {
        Mode::Agent => vec![
            (
                "vault:bootstrapped",
                both("vault:state-done", "vault:unsealed"),
            ),
            ("consul:bootstrapped", ms.get("consul:state-done").copied()),
            (
                "consul:with-agent-tokens",
                both("consul:state-done", "consul:agent-tokens"),
            ),
            ("nomad:bootstrapped", ms.get("nomad:state-done").copied()),
        ],
        Mode::Floor => vec![
            ("vault:bootstrapped", ms.get("vault:unsealed").copied()),
            (
                "consul:bootstrapped",
                ms.get("consul:acl-bootstrapped").copied(),
            ),
            (
                "nomad:bootstrapped",
                ms.get("nomad:acl-bootstrapped").copied(),
            ),
        ],
    };
    for (k, v) in derived {
        if let Some(v) = v {
            ms.insert(k.to_string(), v);
        }
    }
    Ok(TierRun {
        run,
        mode,
        up_s: (t0 - called).as_secs_f64(),
        load_avg: load,
        milestones: ms,
        leaders,
    })
}

/// The time-to-bootstrapped lines: vault, consul, consul with every agent's token, nomad (when present).
pub fn summarise_tiers(runs: &[TierRun], nomad: bool) -> Vec<TierLine> {
    let mut out = Vec::new();
    let mut specs = vec![
        (
            "vault",
            "vault:bootstrapped",
            "tier state done + every Vault server initialized and unsealed",
            "PUT /v1/sys/init on one server; every server initialized and unsealed",
        ),
        (
            "consul",
            "consul:bootstrapped",
            "tier state done (ACL bootstrap, agent/status tokens, escrow)",
            "PUT /v1/acl/bootstrap answered 200",
        ),
        (
            "consul + agent tokens",
            "consul:with-agent-tokens",
            "tier state done + every node's Consul has its agent token",
            "PUT /v1/acl/bootstrap answered 200",
        ),
    ];
    if nomad {
        specs.push((
            "nomad",
            "nomad:bootstrapped",
            "tier state done (secret escrowed before use, ACL bootstrap, escrow)",
            "PUT /v1/acl/bootstrap answered 200",
        ));
    }
    for (tier, key, agent_def, floor_def) in specs {
        let floor_key = if key == "consul:with-agent-tokens" {
            "consul:bootstrapped"
        } else {
            key
        };
        let of = |mode: Mode, k: &str| -> Vec<f64> {
            runs.iter()
                .filter(|r| r.mode == mode)
                .filter_map(|r| r.milestones.get(k).copied())
                .collect()
        };
        let (agent_s, floor_s) = (of(Mode::Agent, key), of(Mode::Floor, floor_key));
        let max = |v: &[f64]| v.iter().cloned().reduce(f64::max);
        let (agent_median, floor_median) =
            (median(&mut agent_s.clone()), median(&mut floor_s.clone()));
        let (agent_max, floor_max) = (max(&agent_s), max(&floor_s));
        let ratio = |a: Option<f64>, f: Option<f64>| Some(a? / f?);
        let (ratio_median, ratio_max) = (
            ratio(agent_median, floor_median),
            ratio(agent_max, floor_max),
        );
        let pass = match (ratio_median, ratio_max) {
            (Some(a), Some(b)) => Some(a <= GOAL_BOOTSTRAP_RATIO && b <= GOAL_BOOTSTRAP_RATIO),
            _ => None,
        };
        out.push(TierLine {
            tier: tier.into(),
            agent_definition: agent_def.into(),
            floor_definition: floor_def.into(),
            agent_s,
            floor_s,
            agent_median,
            agent_max,
            floor_median,
            floor_max,
            ratio_median,
            ratio_max,
            pass,
        });
    }
    out
}

/// The time-to-bootstrapped table and the milestones behind it.
pub fn tier_table(lines: &[TierLine], runs: &[TierRun]) -> String {
    let pairs = runs.iter().filter(|r| r.mode == Mode::Agent).count();
    let loads: Vec<String> = runs.iter().map(|r| format!("{:.1}", r.load_avg)).collect();
    let mut s = format!(
        "time to bootstrapped, seconds from the agents' spawn, {pairs} agent-driven + {} floor labs (load average before each: {}):\n",
        runs.len() - pairs,
        loads.join(" ")
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    s.push_str(&format!(
        "{:<22} {:>15} {:>15} {:>13} {:>7}  {}\n",
        "TIER", "AGENT med/max", "FLOOR med/max", "RATIO med/max", "GOAL", "RESULT"
    ));
    for l in lines {
        s.push_str(&format!(
            "{:<22} {:>15} {:>15} {:>13} {:>7}  {}\n",
            l.tier,
            format!("{} / {}", f(l.agent_median), f(l.agent_max)),
            format!("{} / {}", f(l.floor_median), f(l.floor_max)),
            format!("{} / {}", f(l.ratio_median), f(l.ratio_max)),
            format!("<= {GOAL_BOOTSTRAP_RATIO}"),
            match l.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "-",
            }
        ));
    }
    s.push_str("definitions (agent | floor):\n");
    for l in lines {
        s.push_str(&format!(
            "  {}: {} | {}\n",
            l.tier, l.agent_definition, l.floor_definition
        ));
    }
    s.push_str("milestones, seconds from the agents' spawn, median/max (first seen by the bench, 100 ms polling):\n");
    for mode in [Mode::Agent, Mode::Floor] {
        let mut keys: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in runs.iter().filter(|r| r.mode == mode) {
            for (k, v) in &r.milestones {
                keys.entry(k.clone()).or_default().push(*v);
            }
        }
        let mut by_tier: BTreeMap<String, Vec<(String, f64, f64)>> = BTreeMap::new();
        for (k, mut v) in keys {
            let max = v.iter().cloned().fold(0.0, f64::max);
            let med = median(&mut v).unwrap_or(0.0);
            let (tier, what) = k.split_once(':').unwrap_or(("", &k));
            by_tier
                .entry(tier.to_string())
                .or_default()
                .push((what.to_string(), med, max));
        }
        s.push_str(&format!("  {mode:?}:\n"));
        for (tier, mut v) in by_tier {
            v.sort_by(|a, b| a.1.total_cmp(&b.1));
            let parts: Vec<String> = v
                .iter()
                .map(|(k, med, max)| format!("{k} {med:.2}/{max:.2}"))
                .collect();
            s.push_str(&format!("    {tier}: {}\n", parts.join(", ")));
        }
    }
    let mut leaders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.mode == Mode::Agent) {
        for (t, n) in &r.leaders {
            leaders.entry(t.clone()).or_default().push(n.clone());
        }
    }
    if !leaders.is_empty() {
        s.push_str("  leaders (agent-driven):");
        for (t, ns) in leaders {
            s.push_str(&format!(" {t} {};", ns.join(",")));
        }
        s.push('\n');
    }
    s
}

// ----- snapshots (`hashistack-lab bench --only snapshot`) ---------------------------------------------------

/// The agent's peak RSS must stay under this while it snapshots or restores, whatever the snapshot's size
/// (issue 11: memory does not grow with the snapshot). The bench fails above it.
pub const SNAPSHOT_MAX_RSS_BYTES: u64 = 30_000_000;

#[derive(Debug, Clone)]
pub struct SnapshotBenchOptions {
    pub state_dir: PathBuf,
    pub net: u8,
    /// Data written to Consul's KV store before the snapshot, in MB (10^6 bytes), as 500 kB values.
    pub data_mb: u32,
    pub verbose: bool,
}

/// One measured snapshot and restore of a Consul tier holding `data_bytes` of KV data.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotBench {
    pub machine: String,
    pub data_bytes: u64,
    /// Consul's snapshot (gzipped tar; the values are random, so it does not shrink).
    pub snapshot_bytes: u64,
    /// The encrypted blob.
    pub stored_bytes: u64,
    /// `hashistack-agent snapshot --now` on the leader, spawn to exit.
    pub snapshot_ms: u64,
    pub snapshot_peak_rss_bytes: u64,
    /// `hashistack-agent snapshot restore` (both passes: check, then restore), spawn to exit.
    pub restore_ms: u64,
    pub restore_peak_rss_bytes: u64,
}

impl SnapshotBench {
    pub fn table(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        format!(
            "snapshot bench on {}\n\
             data written          {:>8.1} MB (Consul KV, 500 kB random values)\n\
             snapshot (plaintext)  {:>8.1} MB, stored encrypted {:.1} MB\n\
             snapshot              {:>8} ms, agent peak RSS {:.1} MB\n\
             restore (check+load)  {:>8} ms, agent peak RSS {:.1} MB\n\
             RSS limit             {:>8.1} MB: {}\n",
            self.machine,
            mb(self.data_bytes),
            mb(self.snapshot_bytes),
            mb(self.stored_bytes),
            self.snapshot_ms,
            mb(self.snapshot_peak_rss_bytes),
            self.restore_ms,
            mb(self.restore_peak_rss_bytes),
            mb(SNAPSHOT_MAX_RSS_BYTES),
            if self
                .snapshot_peak_rss_bytes
                .max(self.restore_peak_rss_bytes)
                < SNAPSHOT_MAX_RSS_BYTES
            {
                "ok"
            } else {
                "EXCEEDED"
            }
        )
    }
}

/// Runs `program args` as this process's only child and returns its exit status, stdout, stderr and peak RSS
/// (`getrusage(RUSAGE_CHILDREN)`: the largest waited-for child — exact only in a process with no other children,
/// which is why the bench runs it through `hashistack-lab rss`, see [`measure_cli`]).
pub fn run_measured(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
) -> std::io::Result<(std::process::Output, u64)> {
    let out = std::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(std::io::Error::other)?;
    // Linux reports ru_maxrss in KiB.
    Ok((out, usage.max_rss() as u64 * 1024))
}

/// `hashistack-lab rss <out.json> -- <program> <args…>`: runs the program as the only child of a fresh process and
/// writes `{"code", "stdout", "stderr", "max_rss_bytes"}` to `out.json`.
pub fn measure_cli(out: &Path, program: &Path, args: &[String]) -> std::process::ExitCode {
    match run_measured(program, args, &[]) {
        Ok((o, rss)) => {
            let v = serde_json::json!({
                "code": o.status.code(),
                "stdout": String::from_utf8_lossy(&o.stdout),
                "stderr": String::from_utf8_lossy(&o.stderr),
                "max_rss_bytes": rss,
            });
            match std::fs::write(out, v.to_string()) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hashistack-lab rss: {}: {e}", out.display());
                    std::process::ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("hashistack-lab rss: {}: {e}", program.display());
            std::process::ExitCode::from(1)
        }
    }
}

/// Runs `agent args` (with `env`) through `hashistack-lab rss` and returns (wall time, stdout, peak RSS); a
/// non-zero exit is an error.
async fn measured_agent(
    agent: &Path,
    args: &[String],
    env: &[(String, String)],
    scratch: &Path,
) -> Result<(Duration, String, u64), BenchError> {
    let out_file = scratch.join("rss.json");
    let lab_bin = std::env::current_exe().map_err(|e| BenchError::Failed(e.to_string()))?;
    let start = Instant::now();
    let st = tokio::process::Command::new(&lab_bin)
        .arg("rss")
        .arg(&out_file)
        .arg("--")
        .arg(agent)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .await
        .map_err(|e| BenchError::Failed(format!("{}: {e}", lab_bin.display())))?;
    let took = start.elapsed();
    if !st.success() {
        return Err(BenchError::Failed(format!(
            "hashistack-lab rss exited {st}"
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&out_file).map_err(|e| BenchError::Failed(e.to_string()))?,
    )
    .map_err(|e| BenchError::Failed(e.to_string()))?;
    if v["code"] != serde_json::json!(0) {
        return Err(BenchError::Failed(format!(
            "hashistack-agent {}: exit {}: {}",
            args.first().cloned().unwrap_or_default(),
            v["code"],
            v["stderr"].as_str().unwrap_or("").trim()
        )));
    }
    Ok((
        took,
        v["stdout"].as_str().unwrap_or("").to_string(),
        v["max_rss_bytes"].as_u64().unwrap_or(0),
    ))
}

/// Brings up one Consul server (and nothing else), writes `data_mb` of random KV values, then times
/// `hashistack-agent snapshot --now` and `hashistack-agent snapshot restore` and their peak RSS. Fails when
/// either peak RSS reaches [`SNAPSHOT_MAX_RSS_BYTES`].
pub async fn snapshot_run(
    o: &SnapshotBenchOptions,
    tools: Tools,
) -> Result<SnapshotBench, BenchError> {
    let mut lo = LabOptions::new(o.state_dir.clone(), o.net);
    lo.consul_servers = 1;
    lo.vault_servers = 0;
    lo.nomad_servers = 0;
    lo.jumpbox = Some(false);
    lo.verbose = o.verbose;
    let agent = tools.agent.clone();
    let mut lab = Lab::up(lo, tools).await?;
    let result: Result<SnapshotBench, BenchError> = async {
        lab.wait_healthy(Duration::from_secs(180))
            .await
            .map_err(|(e, h)| BenchError::Failed(format!("{e}\n{}", h.table())))?;
        let operator = lab.operator_imds().await?;
        let azure_args = |lab: &Lab| -> Vec<String> {
            vec![
                "--cluster".into(),
                lab.opts.cluster.clone(),
                "--blob-endpoint".into(),
                lab.blob_endpoint(),
                "--escrow-vault-uri".into(),
                lab.escrow_vault_uri(),
                "--credential".into(),
                "imds".into(),
                "--imds-endpoint".into(),
                operator.clone(),
                "--lab".into(),
                "--ca-file".into(),
                lab.ca_cert.display().to_string(),
            ]
        };
        let mut args = vec![
            "escrow".to_string(),
            "open".into(),
            "--tier".into(),
            "consul".into(),
        ];
        args.extend(azure_args(&lab));
        let opened = tokio::process::Command::new(&agent)
            .args(&args)
            .output()
            .await
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        let secrets: serde_json::Value = serde_json::from_slice(&opened.stdout)
            .map_err(|_| BenchError::Failed("escrow open: no JSON".into()))?;
        let token = secrets["secret_id"]
            .as_str()
            .ok_or_else(|| BenchError::Failed("escrow open: no secret_id".into()))?
            .to_string();
        let ip = lab.nodes[0].def.ip;
        let api = format!("https://{ip}:8501");
        // ~data_mb of incompressible KV data, 4 writers.
        let values = (o.data_mb as usize * 1_000_000).div_ceil(500_000);
        let http = lab.https();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (http, api, token, next) = (http.clone(), api.clone(), token.clone(), next.clone());
            writers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= values {
                        return Ok::<(), String>(());
                    }
                    let mut v = vec![0u8; 500_000];
                    aws_lc_rs::rand::fill(&mut v).expect("RNG");
                    let r = http
                        .put(format!("{api}/v1/kv/bench/{i:05}"))
                        .header("X-Consul-Token", &token)
                        .timeout(Duration::from_secs(60))
                        .body(v)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if !r.status().is_success() {
                        return Err(format!("KV write {i}: HTTP {}", r.status()));
                    }
                }
            });
        }
        while let Some(r) = writers.join_next().await {
            r.map_err(|e| BenchError::Failed(e.to_string()))?
                .map_err(BenchError::Failed)?;
        }
        if o.verbose {
            eprintln!("bench: {values} values written");
        }
        let scratch = lab.opts.state_dir.join("bench");
        std::fs::create_dir_all(&scratch).map_err(|e| BenchError::Failed(e.to_string()))?;
        let cfg = lab.nodes[0].config_path.display().to_string();
        let (snap_took, out, snap_rss) = measured_agent(
            &agent,
            &["snapshot".into(), "--now".into(), "--config".into(), cfg],
            &[],
            &scratch,
        )
        .await?;
        let blob = out
            .strip_prefix("snapshot ")
            .and_then(|r| r.split_whitespace().next())
            .ok_or_else(|| BenchError::Failed(format!("snapshot: {out}")))?
            .to_string();
        let record: serde_json::Value = serde_json::from_slice(
            &lab.read_blob(
                "coordination",
                &hashistack_agent::snapshot::record_blob_name(&lab.opts.cluster, "consul"),
            )
            .await
            .ok_or_else(|| BenchError::Failed("no snapshot record".into()))?,
        )
        .map_err(|e| BenchError::Failed(e.to_string()))?;
        let ca = scratch.join("cluster-ca.pem");
        std::fs::write(&ca, lab.cluster_ca().unwrap_or_default())
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        let mut args: Vec<String> = vec![
            "snapshot".into(),
            "restore".into(),
            "--tier".into(),
            "consul".into(),
            "--blob".into(),
            blob,
            "--addr".into(),
            api.clone(),
            "--api-ca-file".into(),
            ca.display().to_string(),
        ];
        args.extend(azure_args(&lab));
        let (restore_took, _, restore_rss) = measured_agent(
            &agent,
            &args,
            &[("CONSUL_HTTP_TOKEN".into(), token.clone())],
            &scratch,
        )
        .await?;
        let last = &record["last_success"];
        Ok(SnapshotBench {
            machine: machine(),
            data_bytes: values as u64 * 500_000,
            snapshot_bytes: last["plaintext_bytes"].as_u64().unwrap_or(0),
            stored_bytes: last["stored_bytes"].as_u64().unwrap_or(0),
            snapshot_ms: snap_took.as_millis() as u64,
            snapshot_peak_rss_bytes: snap_rss,
            restore_ms: restore_took.as_millis() as u64,
            restore_peak_rss_bytes: restore_rss,
        })
    }
    .await;
    lab.down().await;
    let r = result?;
    let peak = r.snapshot_peak_rss_bytes.max(r.restore_peak_rss_bytes);
    if peak >= SNAPSHOT_MAX_RSS_BYTES {
        return Err(BenchError::Failed(format!(
            "the agent's peak RSS was {:.1} MB, at or above the {:.1} MB limit:\n{}",
            peak as f64 / 1e6,
            SNAPSHOT_MAX_RSS_BYTES as f64 / 1e6,
            r.table()
        )));
    }
    Ok(r)
}

#[cfg(test)]
mod goal_tests {
    use super::*;

    fn report(lines: Vec<Line>, tier_lines: Vec<TierLine>) -> BenchReport {
        BenchReport {
            date_utc: String::new(),
            runs: 1,
            nodes: String::new(),
            machine: String::new(),
            load_avg: (0.5, 0.5),
            lab_agent: PathBuf::new(),
            lab_agent_profile: "release",
            agent_release: None,
            binary_bytes: None,
            binary_stripped: None,
            consul: String::new(),
            bao: String::new(),
            lines,
            boots: vec![],
            labs: vec![],
            tier_lines,
            tier_runs: vec![],
        }
    }

    #[test]
    fn a_missed_goal_is_named_and_information_lines_never_miss() {
        let r = report(
            vec![
                line("critical path, warm", "ms", vec![7.0, 23.0], Some(100.0)),
                line("critical path, cold", "ms", vec![90.0, 168.0], Some(100.0)),
                line("lab healthy", "s", vec![40.0], None),
                line("peak RSS", "MB", vec![], Some(30.0)),
            ],
            vec![],
        );
        assert_eq!(
            r.missed(),
            vec![
                "critical path, cold: max 168.0 ms > goal 100 ms".to_string(),
                "peak RSS: no samples (goal <= 30 MB)".to_string(),
            ]
        );
        let ok = report(
            vec![line("critical path, warm", "ms", vec![7.0], Some(100.0))],
            vec![],
        );
        assert!(ok.missed().is_empty());
    }
}
