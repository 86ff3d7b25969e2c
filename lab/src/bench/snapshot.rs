//! `hashistack-lab bench --only snapshot` (issue 11, item 6): a Consul tier holding `--snapshot-mb` MB of KV data,
//! `hashistack-agent snapshot --now` and `snapshot restore` each measured (time, peak RSS) under `hashistack-lab rss`.

use super::{machine, profile_of, BenchError};
use crate::lab::{Lab, LabOptions};
use crate::tools::Tools;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// The agent measured (and run by the lab's one Consul server): see [`snapshot_agent`].
    pub agent: PathBuf,
}

/// The agent the snapshot bench measures: `--agent-release`, else `--lab-agent`, else `$HASHISTACK_AGENT`, else
/// `None` (the caller builds the release agent). A path given that is not an executable file is refused, naming
/// it, before any lab starts.
pub fn snapshot_agent(
    agent_release: Option<&Path>,
    lab_agent: Option<&Path>,
    env_agent: Option<&Path>,
) -> Result<Option<PathBuf>, BenchError> {
    use std::os::unix::fs::PermissionsExt;
    let Some(p) = agent_release.or(lab_agent).or(env_agent) else {
        return Ok(None);
    };
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(Some(p.to_path_buf())),
        Ok(_) => Err(BenchError::Failed(format!(
            "{}: not an executable file",
            p.display()
        ))),
        Err(e) => Err(BenchError::Failed(format!("{}: {e}", p.display()))),
    }
}

/// One measured snapshot and restore of a Consul tier holding `data_bytes` of KV data.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotBench {
    pub machine: String,
    /// The measured agent's path and build profile (`release`, `debug`, …).
    pub agent: PathBuf,
    pub agent_profile: &'static str,
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
             agent                 {} ({})\n\
             data written          {:>8.1} MB (Consul KV, 500 kB random values)\n\
             snapshot (plaintext)  {:>8.1} MB, stored encrypted {:.1} MB\n\
             snapshot              {:>8} ms, agent peak RSS {:.1} MB\n\
             restore (check+load)  {:>8} ms, agent peak RSS {:.1} MB\n\
             RSS limit             {:>8.1} MB: {}\n",
            self.machine,
            self.agent.display(),
            self.agent_profile,
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
    let mut tools = tools;
    tools.agent = o.agent.clone();
    let agent = o.agent.clone();
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
            agent: agent.clone(),
            agent_profile: profile_of(&agent),
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
