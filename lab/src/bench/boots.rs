//! The agent boot measurements of one run: a lab of its own brought up with `Lab::up` (every agent booting at
//! once), then each node rebooted alone — warm, cold (certificates and version cache removed) and cold with the
//! version cache an image would carry — reading each boot's critical path and phases from `boot.json`, the
//! spawn-to-record time on the lab's clock and the agent's peak RSS; and the release binary to size.

use super::report::{BootSample, RunSample};
use super::{say, BenchError, BenchOptions};
use crate::lab::{Lab, LabOptions};
use crate::tools::{repo_root, Tools};
use hashistack_agent::boot::BootRecord;
use hashistack_agent::render::Layout;
use hashistack_agent::version::Product;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

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
        kind: kind.to_string(),
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

/// A first boot from an image that already carries the version cache: only the certificates are new (and
/// the material a warm boot starts from is not there yet).
fn remove_certs(root: &Path) {
    let layout = Layout::new(root);
    let _ = std::fs::remove_file(hashistack_agent::warm::path(&layout));
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

pub(super) async fn one_run(
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
