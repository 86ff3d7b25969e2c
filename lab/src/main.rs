//! `hashistack-lab`: bring the Azure-in-a-box lab up or down, or measure it.

use clap::{Parser, Subcommand};
use hashistack_lab::tools::{repo_root, Tools};
use hashistack_lab::{Lab, LabOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "hashistack-lab",
    version,
    about = "Azure-in-a-box: fake IMDS per node, Azurite, a transit seal provider, and real Consul and OpenBao servers configured by real agents, all on loopback."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Lab state directory [default: <repo>/.lab/default].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Second octet of the loopback network the nodes use (127.<net>.0.x).
    #[arg(long, default_value_t = 77)]
    net: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Start the lab, wait until the clusters are healthy, print their status and run the post-deploy smoke
    /// test on the jumpbox (exit 1 if it fails), then keep running until Ctrl-C.
    Up {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 3)]
        consul_servers: u8,
        #[arg(long, default_value_t = 3)]
        vault_servers: u8,
        /// Nomad servers, run by the Nomad contract double unless --nomad-bin names a real `nomad`.
        #[arg(long, default_value_t = 3)]
        nomad_servers: u8,
        #[arg(long)]
        nomad_bin: Option<PathBuf>,
        /// Workers (scale set hs-workers): a Consul client and a Nomad client each; they never hold the CA key.
        #[arg(long, default_value_t = 2)]
        workers: u8,
        /// Keep the state directory after shutdown.
        #[arg(long)]
        keep: bool,
        /// Stop as soon as the clusters are healthy (for scripts and CI).
        #[arg(long)]
        exit_when_healthy: bool,
        /// How long to wait for health, in seconds.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Measure agent boot critical path, agent peak RSS, release binary size, lab time-to-healthy, and time to
    /// bootstrapped per tier next to a floor (docs/PERFORMANCE.md). Uses its own loopback nets and state
    /// directories.
    Bench {
        /// Lab state directory [default: <repo>/.lab/bench].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 90)]
        net: u8,
        /// Number of labs to bring up.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// The stripped release agent [default: built with `cargo build --release -p hashistack-agent`].
        #[arg(long)]
        agent_release: Option<PathBuf>,
        /// The agent the labs run [default: $HASHISTACK_AGENT, else the release agent].
        #[arg(long)]
        lab_agent: Option<PathBuf>,
        /// Print the report as JSON on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only one part: `boot` (critical path, RSS, size), `bootstrap` (time to bootstrapped per
        /// tier, agent-driven vs floor) or `snapshot` (snapshot and restore of a Consul tier holding
        /// --snapshot-mb of data: times and the agent's peak RSS, which must stay under 30 MB). `snapshot` runs
        /// only when asked for. `scale` (only when asked for): --agents worker agents booting at once against
        /// Azurite and the Key Vault double with its service limit on (--kv-limit per 10 s), services not
        /// started; fails unless every agent finishes within --deadline and honours every Retry-After.
        #[arg(long, value_parser = ["boot", "bootstrap", "snapshot", "scale"])]
        only: Option<String>,
        /// Scale bench: worker agents booting at once.
        #[arg(long, default_value_t = 200)]
        agents: u32,
        /// Scale bench: the shared vault's limit, transactions per 10 s (Azure's is 4000; lowered so a few
        /// hundred agents press it as thousands of workers would press Azure's).
        #[arg(long, default_value_t = 400)]
        kv_limit: u32,
        /// Scale bench: each agent's deadline in seconds (its material and per-call deadlines, and spawn -> exit).
        #[arg(long, default_value_t = 120)]
        deadline: u64,
        /// Loopback net of the scale bench's lab (workers on 127.<net>.1.x and up).
        #[arg(long, default_value_t = 186)]
        scale_net: u8,
        /// Data in the snapshot bench's Consul tier, in MB.
        #[arg(long, default_value_t = 100)]
        snapshot_mb: u32,
        /// Loopback net of the snapshot bench's lab.
        #[arg(long, default_value_t = 146)]
        snapshot_net: u8,
        /// Pairs of tier-bootstrap labs (one agent-driven, one floor each).
        #[arg(long, default_value_t = 3)]
        bootstrap_runs: u32,
        /// State directories of the tier-bootstrap labs: <this>-agent and <this>-floor
        /// [default: <repo>/.lab/bench-bootstrap].
        #[arg(long)]
        bootstrap_state_dir: Option<PathBuf>,
        /// Loopback net of the agent-driven tier-bootstrap lab.
        #[arg(long, default_value_t = 97)]
        agent_net: u8,
        /// Loopback net of the floor tier-bootstrap lab.
        #[arg(long, default_value_t = 98)]
        floor_net: u8,
        /// Nomad servers in the tier-bootstrap labs (the Nomad contract double); 0 leaves the tier out.
        #[arg(long, default_value_t = 3)]
        nomad_servers: u8,
        /// Keep the tier-bootstrap labs' state directories (logs, boot records) after each run.
        #[arg(long)]
        keep: bool,
        /// Before each tier-bootstrap lab, wait (up to 10 minutes) until the 1-minute load average is at most
        /// this (on a machine shared with other builds and labs).
        #[arg(long)]
        max_load: Option<f64>,
    },
    /// Regenerate the generated sections of docs/PERFORMANCE.md (between `<!-- bench:begin NAME -->` and
    /// `<!-- bench:end NAME -->`) from the bench JSON committed beside it (docs/bench/latest.json).
    BenchDoc {
        /// A `bench --only scale --json` output to store in the inputs first.
        #[arg(long)]
        scale: Option<PathBuf>,
        /// A `bench --json` output (boot and/or tier bootstrap) to store in the inputs first.
        #[arg(long)]
        bench: Option<PathBuf>,
        /// The inputs [default: <repo>/docs/bench/latest.json].
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// The page [default: <repo>/docs/PERFORMANCE.md].
        #[arg(long)]
        doc: Option<PathBuf>,
        /// Change nothing; exit 1 if the page differs from what the inputs generate.
        #[arg(long)]
        check: bool,
    },
    /// The bench's measuring helper: run PROGRAM as this process's only child and write its exit code, output and
    /// peak RSS (getrusage) to OUT as JSON.
    #[command(hide = true)]
    Rss {
        out: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop a lab started from another shell and remove its state unless --keep.
    Down {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        keep: bool,
    },
}

fn state_dir(c: &Common) -> PathBuf {
    c.state_dir
        .clone()
        .unwrap_or_else(|| repo_root().join(".lab/default"))
}

#[tokio::main]
async fn main() -> ExitCode {
    // Started through the lab's `nomad` link: be the Nomad contract double (lab/src/nomad_double/).
    if hashistack_lab::nomad_double::invoked_as_nomad() {
        return hashistack_lab::nomad_double::cli(&std::env::args().collect::<Vec<_>>()).await;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Up {
            common,
            consul_servers,
            vault_servers,
            nomad_servers,
            nomad_bin,
            workers,
            keep,
            exit_when_healthy,
            timeout,
        } => {
            let tools = match Tools::discover() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("hashistack-lab: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut opts = LabOptions::new(state_dir(&common), common.net);
            opts.consul_servers = consul_servers;
            opts.vault_servers = vault_servers;
            (opts.nomad_servers, opts.nomad_bin) = (nomad_servers, nomad_bin);
            opts.workers = workers;
            opts.keep = keep;
            opts.verbose = true;
            let started = Instant::now();
            let mut lab = match Lab::up(opts, tools).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("hashistack-lab: {e}");
                    return ExitCode::from(1);
                }
            };
            let code = match lab.wait_healthy(Duration::from_secs(timeout)).await {
                Ok(h) => {
                    println!("\n{}", h.table());
                    println!(
                        "clusters healthy {:.1}s after start",
                        started.elapsed().as_secs_f64()
                    );
                    // What an operator sees on the jumpbox, once raft autopilot has promoted the new voters.
                    if let Some(j) = lab.node_index("jumpbox") {
                        let status = || {
                            std::process::Command::new(&lab.tools.agent)
                                .args(["status", "--config"])
                                .arg(&lab.nodes[j].config_path)
                                .env("NO_COLOR", "1")
                                .output()
                        };
                        let waited = Instant::now();
                        let mut out = status();
                        while out.as_ref().is_ok_and(|o| !o.status.success())
                            && waited.elapsed() < Duration::from_secs(60)
                        {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            out = status();
                        }
                        println!("\n$ hashistack-agent status   (on the jumpbox)");
                        if let Ok(o) = out {
                            print!("{}", String::from_utf8_lossy(&o.stdout));
                        }
                    }
                    // Then the post-deploy smoke test, as docs/deploy.md tells an operator: the Nomad
                    // management token from escrow (opened here as the operator), piped to the jumpbox's
                    // `hashistack-agent smoke --token-file -`.
                    if lab.jumpbox().is_some() && lab.opts.nomad_servers > 0 {
                        println!(
                            "\n$ hashistack-agent escrow open --tier nomad ... | jq -r .secret_id | \
                             hashistack-agent smoke --token-file -   (on the jumpbox)"
                        );
                        let ready = lab.wait_workload_identity(Duration::from_secs(120)).await;
                        let token = match ready {
                            Ok(()) => lab.nomad_management_token().await,
                            Err(e) => Err(e),
                        };
                        let smoke = match token {
                            Ok(token) => lab
                                .smoke(&token, &[], true)
                                .await
                                .map(|o| o.status.success())
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        match smoke {
                            Ok(true) => ExitCode::SUCCESS,
                            Ok(false) => {
                                eprintln!("hashistack-lab: the smoke test failed (its lines above say where)");
                                ExitCode::from(1)
                            }
                            Err(e) => {
                                eprintln!("hashistack-lab: cannot run the smoke test: {e}");
                                ExitCode::from(1)
                            }
                        }
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err((e, h)) => {
                    println!("\n{}", h.table());
                    eprintln!("hashistack-lab: {e}");
                    eprintln!("logs: {}", lab.opts.state_dir.join("logs").display());
                    ExitCode::from(1)
                }
            };
            if code == ExitCode::SUCCESS && !exit_when_healthy {
                println!("lab running; Ctrl-C (or `hashistack-lab down`) stops it");
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("signal");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            eprintln!("lab: stopping");
            lab.down().await;
            code
        }
        Command::Bench {
            state_dir,
            net,
            runs,
            agent_release,
            lab_agent,
            json,
            only,
            agents,
            kv_limit,
            deadline,
            scale_net,
            snapshot_mb,
            snapshot_net,
            bootstrap_runs,
            bootstrap_state_dir,
            agent_net,
            floor_net,
            nomad_servers,
            keep,
            max_load,
        } => {
            use hashistack_lab::bench;
            let tools = match Tools::discover() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("hashistack-lab: {e}");
                    return ExitCode::from(2);
                }
            };
            if only.as_deref() == Some("scale") {
                // The workers run `--lab-agent`, else `--agent-release`, else the lab's agent ($HASHISTACK_AGENT or
                // the one beside this binary); a path given that cannot run is refused before anything starts.
                let mut tools = tools;
                match bench::snapshot_agent(lab_agent.as_deref(), agent_release.as_deref(), None) {
                    Ok(Some(a)) => tools.agent = a,
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("hashistack-lab bench: {e}");
                        return ExitCode::from(2);
                    }
                }
                let mut o =
                    bench::ScaleOptions::new(repo_root().join(".lab/bench-scale"), scale_net);
                o.agents = agents;
                o.limit.limit = kv_limit;
                o.deadline = Duration::from_secs(deadline);
                return match bench::scale_run(&o, tools).await {
                    Ok(r) => bench_finish(&r, json, r.table(), r.missed()),
                    Err(e) => {
                        eprintln!("hashistack-lab bench: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            if only.as_deref() == Some("snapshot") {
                let env_agent = std::env::var_os("HASHISTACK_AGENT").map(PathBuf::from);
                let verbose = std::env::var_os("LAB_VERBOSE").is_some();
                let chosen = bench::snapshot_agent(
                    agent_release.as_deref(),
                    lab_agent.as_deref(),
                    env_agent.as_deref(),
                )
                .and_then(|a| match a {
                    Some(a) => Ok(a),
                    None => {
                        let mut b = bench::BenchOptions::new(repo_root().join(".lab/bench"), net);
                        b.verbose = verbose;
                        bench::build_release_agent(&b)
                    }
                });
                let agent = match chosen {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("hashistack-lab bench: {e}");
                        return ExitCode::from(2);
                    }
                };
                let o = bench::SnapshotBenchOptions {
                    state_dir: repo_root().join(".lab/bench-snapshot"),
                    net: snapshot_net,
                    data_mb: snapshot_mb,
                    verbose,
                    agent,
                };
                return match bench::snapshot_run(&o, tools).await {
                    Ok(r) if json => {
                        eprint!("{}", r.table());
                        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                        ExitCode::SUCCESS
                    }
                    Ok(r) => {
                        print!("{}", r.table());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("hashistack-lab bench: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            let dir = state_dir.unwrap_or_else(|| repo_root().join(".lab/bench"));
            let mut o = bench::BenchOptions::new(dir, net);
            (o.runs, o.agent_release, o.lab_agent) = (runs, agent_release, lab_agent);
            o.boot = only.as_deref() != Some("bootstrap");
            o.bootstrap = only.as_deref() != Some("boot");
            o.bootstrap_runs = bootstrap_runs;
            if let Some(d) = bootstrap_state_dir {
                o.bootstrap_state_dir = d;
            }
            (o.bootstrap_nets, o.nomad_servers, o.keep, o.max_load) =
                ((agent_net, floor_net), nomad_servers, keep, max_load);
            match bench::run(&o, tools).await {
                // A missed goal fails the bench (the load average in the table says whether the machine was quiet).
                Ok(r) => bench_finish(&r, json, r.table(), r.missed()),
                Err(e) => {
                    eprintln!("hashistack-lab bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::BenchDoc {
            scale,
            bench,
            inputs,
            doc,
            check,
        } => bench_doc(scale, bench, inputs, doc, check),
        Command::Rss { out, command } => {
            let (program, args) = command.split_first().expect("clap requires a command");
            hashistack_lab::bench::measure_cli(&out, std::path::Path::new(program), args)
        }
        Command::Down { common, keep } => {
            let dir = state_dir(&common);
            let lab_pid = std::fs::read_to_string(dir.join("lab.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = lab_pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
                for _ in 0..100 {
                    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let n = hashistack_lab::procs::kill_pid_files(&dir.join("pids"));
            if !keep {
                let _ = std::fs::remove_dir_all(&dir);
            }
            println!(
                "lab at {} stopped ({} stray processes signalled)",
                dir.display(),
                n
            );
            ExitCode::SUCCESS
        }
    }
}

/// `hashistack-lab bench-doc`: see the subcommand's help.
fn bench_doc(
    scale: Option<PathBuf>,
    bench: Option<PathBuf>,
    inputs: Option<PathBuf>,
    doc: Option<PathBuf>,
    check: bool,
) -> ExitCode {
    use hashistack_lab::bench::doc::{regenerate, DocInputs};
    let inputs = inputs.unwrap_or_else(|| repo_root().join("docs/bench/latest.json"));
    let doc = doc.unwrap_or_else(|| repo_root().join("docs/PERFORMANCE.md"));
    let fail = |msg: String| {
        eprintln!("hashistack-lab bench-doc: {msg}");
        ExitCode::from(1)
    };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut parsed: DocInputs = if inputs.exists() || check {
        match read(&inputs).and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", inputs.display()))
        }) {
            Ok(v) => v,
            Err(e) => return fail(e),
        }
    } else {
        DocInputs::default()
    };
    if let Some(p) = &scale {
        match read(p)
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display())))
        {
            Ok(r) => parsed.scale = Some(r),
            Err(e) => return fail(e),
        }
    }
    if let Some(p) = &bench {
        match read(p)
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display())))
        {
            Ok(r) => parsed.bench = Some(r),
            Err(e) => return fail(e),
        }
    }
    let page = match std::fs::read_to_string(&doc) {
        Ok(p) => p,
        Err(e) => return fail(format!("{}: {e}", doc.display())),
    };
    let new = match regenerate(&page, &parsed) {
        Ok(n) => n,
        Err(e) => return fail(format!("{}: {e}", doc.display())),
    };
    if check {
        if new == page {
            return ExitCode::SUCCESS;
        }
        return fail(format!(
            "{} differs from what {} generates (run `hashistack-lab bench-doc`)",
            doc.display(),
            inputs.display()
        ));
    }
    let json = serde_json::to_string_pretty(&parsed).expect("json") + "\n";
    let write = |p: &std::path::Path, text: &str| -> Result<(), String> {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, p))
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    if let Err(e) = write(&inputs, &json).and_then(|_| write(&doc, &new)) {
        return fail(e);
    }
    println!("{} regenerated from {}", doc.display(), inputs.display());
    ExitCode::SUCCESS
}

/// Prints a bench report (its table on stdout; with `--json`, the table on stderr and the JSON on stdout) and the
/// goals it missed, one line each; exit 1 when any was missed.
fn bench_finish(
    report: &impl serde::Serialize,
    json: bool,
    table: String,
    missed: Vec<String>,
) -> ExitCode {
    if json {
        eprint!("{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("a bench report serializes")
        );
    } else {
        print!("{table}");
    }
    for m in &missed {
        eprintln!("hashistack-lab bench: goal missed: {m}");
    }
    if missed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
