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
//! `cargo build --release -p hashistack-agent`). This is a measurement, not a test: nothing here asserts a time.

use crate::lab::{Lab, LabOptions};
use crate::tools::{repo_root, Tools};
use hashistack_agent::boot::BootRecord;
use hashistack_agent::render::Layout;
use hashistack_agent::version::Product;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The agent's steps in boot order (`BootRecord::phases_us`).
const PHASE_ORDER: [&str; 7] = [
    "start", "metadata", "versions", "material", "render", "write", "services",
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
    pub agent_release: PathBuf,
    pub binary_bytes: u64,
    pub binary_stripped: Option<bool>,
    pub consul: String,
    pub bao: String,
    pub lines: Vec<Line>,
    pub boots: Vec<BootSample>,
    pub labs: Vec<RunSample>,
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
    binary_bytes: u64,
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
    lines.push(line(
        "release agent binary, stripped",
        "MB",
        vec![binary_bytes as f64 / 1e6],
        Some(GOAL_BINARY_BYTES as f64 / 1e6),
    ));
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
        s.push_str(&format!(
            "{:<53} {:>4} {:>10} {:>10} {:>10}  {}\n",
            "METRIC", "N", "MEDIAN", "MAX", "GOAL", "RESULT"
        ));
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
        s.push_str(
            "\ncritical path by boot and role, then by step (agent clock), median/max ms:\n",
        );
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
        s.push_str(&format!(
            "\nbinary: {} ({} bytes, {})\n",
            self.agent_release.display(),
            self.binary_bytes,
            match self.binary_stripped {
                Some(true) => "no .symtab/.debug_* sections",
                Some(false) => "NOT stripped",
                None => "not an ELF64 file",
            }
        ));
        s
    }
}

/// Runs the whole bench: `o.runs` labs, each torn down afterwards.
pub async fn run(o: &BenchOptions, mut tools: Tools) -> Result<BenchReport, BenchError> {
    let release = match &o.agent_release {
        Some(p) => p.clone(),
        None => build_release_agent(o)?,
    };
    let binary_bytes = std::fs::metadata(&release)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", release.display())))?
        .len();
    tools.agent = o
        .lab_agent
        .clone()
        .or_else(|| std::env::var_os("HASHISTACK_AGENT").map(PathBuf::from))
        .unwrap_or_else(|| release.clone());
    say(
        o,
        format!(
            "{} runs; labs on 127.{}.0.x, state in {}; lab agent {}",
            o.runs,
            o.net,
            o.state_dir.display(),
            tools.agent.display()
        ),
    );
    let load_start = load_avg();
    let mut boots = Vec::new();
    let mut labs = Vec::new();
    for run in 1..=o.runs {
        say(o, format!("run {run}/{}: Lab::up", o.runs));
        labs.push(one_run(o, &tools, run, &mut boots).await?);
    }
    let n_nodes = (o.consul_servers + o.vault_servers) as usize;
    let lines = summarise(&boots, &labs, binary_bytes, n_nodes);
    Ok(BenchReport {
        date_utc: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        runs: o.runs,
        nodes: format!(
            "{} consul-server + {} vault-server",
            o.consul_servers, o.vault_servers
        ),
        machine: machine(),
        load_avg: (load_start, load_avg()),
        lab_agent_profile: profile_of(&tools.agent),
        lab_agent: tools.agent.clone(),
        binary_stripped: elf_stripped(&release),
        agent_release: release,
        binary_bytes,
        consul: tool_version(&tools.consul),
        bao: tool_version(&tools.bao),
        lines,
        boots,
        labs,
    })
}
