//! The `hashistack-agent` command line.

use clap::{Parser, Subcommand};
use hashistack_agent::config::AgentConfig;
use hashistack_agent::imds::InstanceMetadata;
use hashistack_agent::logging::{self, LogFormat};
use hashistack_agent::node::NodeSpec;
use hashistack_agent::render::{self, Layout, RenderOptions, Versions};
use hashistack_agent::version::{self, Installed, Product, Version};
use hashistack_agent::{boot, publish, smoke, status};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "hashistack-agent",
    version,
    about = "Turns an Azure VM into a Consul, Vault or Nomad node from its metadata tags.",
    long_about = "Run by systemd at every boot (`boot`). Reads Azure IMDS and the node's tags (docs/tags.md), renders \
Consul/Vault/Nomad configuration, and starts the services the node's role needs.\n\nExit codes: 0 ok, 1 run-time failure, \
2 bad input (agent config, metadata, tags or key material)."
)]
struct Cli {
    /// Log format on stderr (under systemd, logs go to the journal unless json is asked for).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// More detail in logs.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Configure this node from its metadata and start its services (idempotent; what systemd runs).
    Boot {
        /// Agent config file [default: /etc/hashistack/agent.toml, or built-in defaults when absent].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Render the configuration tree for a metadata document, offline: no network, no CA, no services,
    /// no key material. Writes the tree a VM would have, rooted at --out.
    Render {
        /// IMDS instance metadata JSON (as `GET /metadata/instance` returns it).
        #[arg(long)]
        metadata: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Render for this Consul version instead of detecting the installed binary.
        #[arg(long)]
        consul_version: Option<String>,
        /// Render for this Vault version (`1.18.0`), or OpenBao's (`openbao-2.7.2`).
        #[arg(long)]
        vault_version: Option<String>,
        #[arg(long)]
        nomad_version: Option<String>,
    },
    /// The whole cluster at a glance (on the jumpbox): verdict, tiers, servers, failed agents, problems.
    /// Exit codes: 0 healthy, 1 degraded, 2 cannot tell. docs/status.md explains every line.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output (schema hashistack-status/1, docs/status.md).
        #[arg(long)]
        json: bool,
        /// Only this node: identity, role, rendered files, local services and their APIs.
        #[arg(long)]
        node: bool,
        /// Refresh every SECS seconds (default 5) until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "5")]
        watch: Option<u64>,
    },
    /// Post-deploy smoke test (on the jumpbox): submits a tiny canary job, waits until it runs, its service
    /// passes in Consul and its template read its Vault secret, prints each step with its timing, and cleans
    /// up. Exit codes: 0 all green, 1 a step failed, 2 bad usage. docs/deploy.md.
    Smoke {
        #[arg(long)]
        config: Option<PathBuf>,
        /// File holding a Nomad token that may submit jobs; `-` reads it from standard input
        /// (e.g. `escrow open --tier nomad ... | jq -r .secret_id | hashistack-agent smoke --token-file -`).
        /// Without it: the NOMAD_TOKEN environment variable.
        #[arg(long, value_name = "PATH|-")]
        token_file: Option<String>,
        /// How long the steps may take in all (cleanup has as long again).
        #[arg(long, value_name = "SECS", default_value_t = 180)]
        timeout: u64,
        /// One JSON document (schema hashistack-smoke/1) instead of one line per step.
        #[arg(long)]
        json: bool,
    },
    /// Operators: recover or check escrowed bootstrap secrets with your own Azure identity.
    Escrow {
        #[command(subcommand)]
        command: EscrowCommand,
    },
    /// Encrypted raft snapshots (docs/runbooks.md#snapshots). Without a subcommand (what hashistack-snapshot.timer
    /// runs on every server): if this node leads its tier and a snapshot is due, take one. Exit codes: 0 taken or
    /// nothing to do, 1 the snapshot failed (recorded for `status`), 2 bad input.
    #[command(args_conflicts_with_subcommands = true)]
    Snapshot {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Take one now, even if the newest is recent (still only on the tier's leader).
        #[arg(long)]
        now: bool,
        #[command(subcommand)]
        command: Option<SnapshotCommand>,
    },
    /// The server tiers' data disk (run by hashistack-data.service before the agent and the services).
    Disk {
        #[command(subcommand)]
        command: DiskCommand,
    },
    /// Checks of the VM image itself.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

#[derive(clap::Args)]
struct EscrowTarget {
    /// Cluster name (the `hashistack-cluster` tag).
    #[arg(long)]
    cluster: String,
    /// Storage account blob endpoint (ARM output `blobEndpoint`).
    #[arg(long, env = "HASHISTACK_BLOB_ENDPOINT")]
    blob_endpoint: String,
    /// Escrow Key Vault URI (ARM output `escrowKeyVaultUri`).
    #[arg(long, env = "HASHISTACK_ESCROW_VAULT_URI")]
    escrow_vault_uri: String,
    /// Whose identity: `azure-cli` (your `az login`) or `imds` (a managed identity, e.g. an operator VM).
    #[arg(long, value_enum, default_value = "azure-cli")]
    credential: CredentialKind,
    /// IMDS endpoint for `--credential imds`.
    #[arg(long, default_value = "http://169.254.169.254")]
    imds_endpoint: String,
    /// Extra CA to trust for the endpoints (the lab's emulators).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Accept a Key Vault challenge naming another host (only for the lab's Key Vault on 127.x).
    #[arg(long)]
    lab: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CredentialKind {
    AzureCli,
    Imds,
}

#[derive(Subcommand)]
enum EscrowCommand {
    /// Fetch, unwrap and decrypt a tier's escrowed secrets (recovery keys, root/bootstrap tokens).
    Open {
        #[command(flatten)]
        target: EscrowTarget,
        /// consul, vault or nomad
        #[arg(long)]
        tier: String,
        /// Write the secrets to this new file (mode 0600; never replaces an existing file) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// PGP escrow (docs/pgp-escrow.md): also write each PGP message as DIR/<tier>-<name>.gpg for
        /// `gpg --decrypt`.
        #[arg(long, value_name = "DIR")]
        pgp_dir: Option<PathBuf>,
    },
    /// Check that every escrow receipt has a matching object, without decrypting anything.
    Verify {
        #[command(flatten)]
        target: EscrowTarget,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Operators: the snapshots of a cluster in the `snapshots` container (names, times, sizes; nothing decrypted).
    List {
        #[command(flatten)]
        target: EscrowTarget,
        /// Only this tier: consul, vault or nomad.
        #[arg(long)]
        tier: Option<String>,
    },
    /// Operators: check a snapshot end to end (header, cluster, tier, every frame), then restore it into the tier.
    /// The token comes from the environment: CONSUL_HTTP_TOKEN, VAULT_TOKEN or NOMAD_TOKEN.
    Restore {
        #[command(flatten)]
        target: EscrowTarget,
        /// consul, vault or nomad
        #[arg(long)]
        tier: String,
        /// The snapshot's blob name (from `snapshot list`) [default: the newest of the tier].
        #[arg(long)]
        blob: Option<String>,
        /// The tier's API: https://<leader>:8501 (Consul), the Vault load balancer https://<lb>:8200, https://<leader>:4646 (Nomad).
        #[arg(long)]
        addr: String,
        /// The cluster CA (PEM) the tier's API is verified with.
        #[arg(long)]
        api_ca_file: PathBuf,
        /// Vault: restore a snapshot of a tier that was rebuilt since (`snapshot-force`: its keyring differs).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum DiskCommand {
    /// On server tiers: wait for the data disk (disk.device, LUN 0), format it only if it is blank (no
    /// signature, zeros at both ends), and mount it at /var/lib/hashistack-data. A disk holding anything else is
    /// refused untouched. Other roles, and disk.mode = "directory": nothing to do. Exit codes: 0 mounted or
    /// nothing to do, 1 the disk is missing, foreign or cannot be mounted (the message says what to do), 2 bad input.
    Prepare {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Check that an image root satisfies the gold-image contract (binaries, users, directories, units).
    Verify {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("hashistack-agent: {msg}");
    ExitCode::from(code)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.verbose);
    match cli.command {
        Command::Boot { config } => run_boot(config, started).await,
        Command::Render {
            metadata,
            config,
            out,
            consul_version,
            vault_version,
            nomad_version,
        } => {
            run_render(
                metadata,
                config,
                out,
                [consul_version, vault_version, nomad_version],
            )
            .await
        }
        Command::Status {
            config,
            json,
            node,
            watch,
        } => {
            let args = status::cli::Args {
                config,
                node,
                json,
                watch,
            };
            ExitCode::from(status::cli::run(args).await)
        }
        Command::Smoke {
            config,
            token_file,
            timeout,
            json,
        } => ExitCode::from(
            smoke::run(smoke::Args {
                config,
                token_file,
                timeout: std::time::Duration::from_secs(timeout),
                json,
            })
            .await,
        ),
        Command::Escrow { command } => run_escrow(command).await,
        Command::Snapshot {
            config,
            now,
            command,
        } => run_snapshot(config, now, command).await,
        Command::Disk {
            command: DiskCommand::Prepare { config },
        } => run_disk_prepare(config).await,
        Command::Image {
            command: ImageCommand::Verify { root },
        } => run_image_verify(&root).await,
    }
}

async fn run_boot(config: Option<PathBuf>, started: Instant) -> ExitCode {
    let cfg = match AgentConfig::load_or_default(config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let mut booted = match boot::boot(&cfg, started).await {
        Ok(b) => b,
        Err((e, record, metadata)) => {
            // Without metadata (IMDS unreachable) there is nowhere to publish to.
            if let (Some(r), Some(md)) = (&record, &metadata) {
                publish::publish_failure(&cfg, r, md).await;
            }
            return fail(e.exit_code() as u8, e);
        }
    };
    let publishing = publish::spawn(&cfg, &booted.record, Some(&booted.spec));
    tracing::info!(
        critical_path_ms = booted.record.critical_path_ms,
        "services started"
    );
    // The services keep running whatever the bootstrap concludes; a failure is recorded for `status` and
    // makes the unit fail, so it is visible.
    let mut code = ExitCode::SUCCESS;
    let bootstrap = boot::bootstrap_phase(&cfg, &mut booted).await;
    let ran = !matches!(bootstrap, Ok(None));
    let newer = ran.then_some(&booted.record);
    publishing.then(&cfg, newer, Some(&booted.spec)).await;
    let bootstrapped = matches!(bootstrap, Ok(Some(_)));
    match bootstrap {
        Ok(Some(outcome)) => tracing::info!(?outcome, "tier bootstrap"),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "tier bootstrap failed");
            eprintln!("hashistack-agent: {e}");
            code = ExitCode::from(1);
        }
    }
    match boot::converge_consul_token(&cfg, &mut booted).await {
        Ok(true) => {}
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "consul agent token");
            code = ExitCode::from(1);
        }
    }
    if bootstrapped {
        use hashistack_agent::bootstrap::workload_identity::Converged;
        match boot::converge_workload_identity(&cfg, &mut booted).await {
            Ok(None) => {}
            Ok(Some(Converged::Waiting { tier })) => tracing::info!(
                waiting_for = tier,
                "Nomad workload identities: Vault's JWT auth method is configured by the tier that finishes last"
            ),
            Ok(Some(Converged::Ensured(how))) => {
                tracing::info!(?how, "Nomad workload identities: Vault's JWT auth method points at the Nomad servers' JWKS")
            }
            Err(e) => {
                tracing::error!(error = %e, "Nomad workload identities");
                eprintln!("hashistack-agent: {e}");
                code = ExitCode::from(1);
            }
        }
    }
    // The process backend keeps supervising its children until SIGTERM/SIGINT; systemd returns at once.
    let shutdown = Box::pin(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down");
    });
    booted.manager.run_until(shutdown).await;
    code
}

async fn run_disk_prepare(config: Option<PathBuf>) -> ExitCode {
    use hashistack_agent::config::DiskMode;
    use hashistack_agent::disk;
    let cfg = match AgentConfig::load_or_default(config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let layout = Layout::from_paths(&cfg.paths);
    if cfg.disk.mode == DiskMode::Directory {
        println!(
            "disk.mode = directory: the data directory is {}; nothing to probe, format or mount",
            layout.data_disk_dir().display()
        );
        return ExitCode::SUCCESS;
    }
    let md = match boot::fetch_metadata(&cfg).await {
        Ok(m) => m,
        Err(e) => return fail(e.exit_code() as u8, e),
    };
    let spec = match NodeSpec::from_metadata(&md) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    if !spec.role.is_server_tier() {
        println!("role {} has no data disk: nothing to do", spec.role);
        return ExitCode::SUCCESS;
    }
    let site = disk::Site {
        role: spec.role.to_string(),
        resource_group: md.compute.resource_group_name.clone(),
        scale_set: md.compute.vm_scale_set_name.clone(),
        vm: md.compute.name.clone(),
    };
    match disk::prepare(
        &disk::SystemDevices::default(),
        &cfg.disk.device,
        &layout.data_disk_dir(),
        std::time::Duration::from_secs(cfg.disk.wait_secs),
        &site,
    )
    .await
    {
        Ok(p) => {
            let what = match p.action {
                disk::Action::AlreadyMounted => "already mounted",
                disk::Action::Mounted => "mounted (not formatted: it holds our filesystem)",
                disk::Action::FormattedAndMounted => "was blank: formatted and mounted",
            };
            println!(
                "data disk {} ({}) {what} at {}",
                p.device.display(),
                p.resolved.display(),
                layout.data_disk_dir().display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

async fn run_render(
    metadata: PathBuf,
    config: Option<PathBuf>,
    out: PathBuf,
    overrides: [Option<String>; 3],
) -> ExitCode {
    // Offline: an explicit --config is read; otherwise built-in defaults (never the machine's own agent.toml).
    let cfg = match config {
        Some(p) => match AgentConfig::load(&p) {
            Ok(c) => c,
            Err(e) => return fail(2, e),
        },
        None => AgentConfig::default(),
    };
    let bytes = match std::fs::read(&metadata) {
        Ok(b) => b,
        Err(e) => return fail(2, format!("metadata {}: {e}", metadata.display())),
    };
    let md = match InstanceMetadata::from_json(&bytes) {
        Ok(m) => m,
        Err(e) => return fail(2, format!("metadata {}: {e}", metadata.display())),
    };
    let spec = match NodeSpec::from_metadata(&md) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    let mut versions = Versions::new();
    for (p, over) in [Product::Consul, Product::Vault, Product::Nomad]
        .into_iter()
        .zip(overrides)
    {
        if !spec.products().contains(&p) {
            continue;
        }
        let installed = match over {
            // `1.18.0`, or `openbao-2.7.2` for OpenBao (which differs from HashiCorp Vault in configuration).
            Some(v) => match v
                .strip_prefix("openbao-")
                .filter(|_| p == Product::Vault)
                .map_or_else(
                    || {
                        Version::parse(&v)
                            .map(|ver| (version::assumed_current(p).distribution, ver))
                    },
                    |rest| Version::parse(rest).map(|ver| ("OpenBao".into(), ver)),
                ) {
                Some((distribution, version)) => Installed {
                    distribution,
                    version,
                },
                None => return fail(2, format!("--{p}-version {v:?} is not a version")),
            },
            None => match version::detect(p, &boot::bin_for(&cfg, p)).await {
                Ok(i) => i,
                Err(_) => version::assumed_current(p),
            },
        };
        versions.insert(p, installed);
    }
    let root = PathBuf::from("/");
    let mut plan = match render::render(
        &spec,
        &Layout::new(&root),
        &RenderOptions::from_config(&cfg),
        &versions,
        None,
    ) {
        Ok(p) => p,
        Err(e) => return fail(1, e),
    };
    // Offline renders are owned by whoever runs them.
    for f in &mut plan.files {
        f.owner = hashistack_agent::files::Owner::Current;
    }
    for d in &mut plan.dirs {
        d.owner = hashistack_agent::files::Owner::Current;
    }
    render::rebase(&mut plan, &root, &out);
    match boot::write_plan(&plan) {
        Ok(changed) => {
            for f in &plan.files {
                println!(
                    "{}{}",
                    f.path.display(),
                    if changed.contains(&f.path) {
                        ""
                    } else {
                        " (unchanged)"
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

async fn run_image_verify(root: &std::path::Path) -> ExitCode {
    match hashistack_agent::image::verify_image(root) {
        Ok(report) => {
            println!("{report}");
            // On the image itself, record the binaries' versions now (keyed by path, size and mtime, which
            // image capture preserves), so a VM's first boot spawns no `version` probes.
            if root == std::path::Path::new("/") {
                let cfg = AgentConfig::default();
                let layout = Layout::from_paths(&cfg.paths);
                let all = [Product::Consul, Product::Vault, Product::Nomad];
                if let Err(e) = boot::detect_versions(&cfg, &layout, &all).await {
                    eprintln!("hashistack-agent: version cache not written: {e}");
                    return ExitCode::from(1);
                }
                println!(
                    "version cache written to {}",
                    layout.state_dir().join("versions.json").display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(failed) => {
            eprintln!("{failed}");
            ExitCode::from(1)
        }
    }
}

fn escrow_azure(t: &EscrowTarget) -> Result<hashistack_agent::azure::Azure, String> {
    use std::sync::Arc;
    let credential: Arc<dyn azure_core::credentials::TokenCredential> = match t.credential {
        CredentialKind::AzureCli => azure_identity::AzureCliCredential::new(None)
            .map_err(|e| format!("Azure CLI credential: {e}"))?,
        CredentialKind::Imds => {
            let imds = hashistack_agent::imds::ImdsClient::new(
                &t.imds_endpoint,
                hashistack_agent::retry::RetryPolicy::imds(std::time::Duration::from_secs(30)),
            );
            Arc::new(hashistack_agent::identity::ImdsCredential::new(imds, None))
        }
    };
    hashistack_agent::azure::Azure::new(credential, t.ca_file.as_deref(), !t.lab)
}

fn normalise(url: &str) -> String {
    if url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    }
}

async fn run_escrow(cmd: EscrowCommand) -> ExitCode {
    use hashistack_agent::escrow::{self, operator, Targets};
    let (EscrowCommand::Open { target, .. } | EscrowCommand::Verify { target }) = &cmd;
    let az = match escrow_azure(target) {
        Ok(a) => a,
        Err(e) => return fail(2, e),
    };
    let targets = Targets {
        blob_endpoint: normalise(&target.blob_endpoint),
        escrow_vault_uri: normalise(&target.escrow_vault_uri),
    };
    let mut policy = escrow::policy();
    policy.deadline = std::time::Duration::from_secs(60);
    match &cmd {
        EscrowCommand::Open {
            target,
            tier,
            out,
            pgp_dir,
        } => {
            if !operator::TIERS.contains(&tier.as_str()) {
                return fail(
                    2,
                    format!("--tier {tier:?}: expected consul, vault or nomad"),
                );
            }
            if let Some(path) = out {
                if std::fs::symlink_metadata(path).is_ok() {
                    return fail(
                        2,
                        format!(
                            "--out {}: already exists; escrow open never replaces a file (choose a new name)",
                            path.display()
                        ),
                    );
                }
            }
            let opened = match operator::open(&az, &targets, &target.cluster, tier, policy).await {
                Ok(p) => p,
                Err(e) => return fail(1, e),
            };
            for w in &opened.warnings {
                eprintln!("WARNING: {}/{tier}: {w}", target.cluster);
            }
            eprintln!(
                "{}/{tier}: escrow {} opened from its pinned {} copy",
                target.cluster, opened.escrow_id, opened.target
            );
            let plain = opened.plain;
            // A PGP escrow holds messages only the operators' own keys open: point at them.
            if let Some(dir) = pgp_dir {
                match operator::write_pgp_messages(dir, tier, &plain) {
                    Ok(Some(files)) => {
                        for (path, recipients) in &files {
                            eprintln!(
                                "{} (opens with {}): gpg --decrypt {}",
                                path.display(),
                                recipients.join(" or "),
                                path.display()
                            );
                        }
                    }
                    Ok(None) => eprintln!(
                        "{}/{tier} is not a PGP escrow: --pgp-dir ignored",
                        target.cluster
                    ),
                    Err(e) => return fail(1, e),
                }
            } else if escrow::pgp::PgpPayload::from_opened(&plain).is_some() {
                eprintln!(
                    "{}/{tier} is a PGP escrow: its secrets are OpenPGP messages to the operators' keys; add \
                     --pgp-dir DIR to write them out for gpg --decrypt (docs/pgp-escrow.md)",
                    target.cluster
                );
            }
            match out {
                Some(path) => {
                    let f = hashistack_agent::files::FileSpec {
                        path: path.clone(),
                        content: plain.to_vec(),
                        mode: 0o600,
                        owner: hashistack_agent::files::Owner::Current,
                        secret: true,
                    };
                    if let Err(e) = hashistack_agent::files::create_new(&f) {
                        return fail(1, e);
                    }
                    eprintln!(
                        "secrets of {}/{tier} written to {} (mode 0600)",
                        target.cluster,
                        path.display()
                    );
                }
                None => {
                    use std::io::Write;
                    let mut so = std::io::stdout();
                    let _ = so.write_all(&plain);
                    let _ = so.write_all(b"\n");
                }
            }
            ExitCode::SUCCESS
        }
        EscrowCommand::Verify { target } => {
            match operator::verify(&az, &targets, &target.cluster, policy).await {
                Ok(lines) => {
                    let bad = lines.iter().filter(|l| !l.ok).count();
                    for l in &lines {
                        println!(
                            "{:<4} {:<7} {:<9} {:<60} {}",
                            if l.ok { "ok" } else { "BAD" },
                            l.tier,
                            l.target,
                            l.object,
                            l.detail
                        );
                        for w in &l.warnings {
                            println!(
                                "{:<4} {:<7} {:<9} {:<60} {w}",
                                "WARN", l.tier, l.target, l.object
                            );
                            eprintln!("WARNING: {}/{}: {w}", target.cluster, l.tier);
                        }
                    }
                    if lines.is_empty() {
                        println!(
                            "no tier of cluster {} has been bootstrapped",
                            target.cluster
                        );
                    }
                    if bad == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => fail(1, e),
            }
        }
    }
}

async fn run_snapshot(
    config: Option<PathBuf>,
    now: bool,
    command: Option<SnapshotCommand>,
) -> ExitCode {
    use hashistack_agent::snapshot::{self, operator, product::Tier, Outcome};
    let Some(command) = command else {
        let cfg = match AgentConfig::load_or_default(config.as_deref()) {
            Ok(c) => c,
            Err(e) => return fail(2, e),
        };
        return match snapshot::run(&cfg, now).await {
            Ok(Outcome::NotAServer) => {
                println!("not a server tier: nothing to snapshot");
                ExitCode::SUCCESS
            }
            Ok(Outcome::NotLeader) => {
                println!("not the tier's leader: nothing to do");
                ExitCode::SUCCESS
            }
            Ok(Outcome::NotDue { age_secs }) => {
                println!("the newest snapshot is {age_secs}s old: not due");
                ExitCode::SUCCESS
            }
            Ok(Outcome::Taken(t)) => {
                println!(
                    "snapshot {} (index {}, {} bytes, {} stored) in {} ms",
                    t.blob, t.index, t.plaintext_bytes, t.stored_bytes, t.duration_ms
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.exit_code(), e),
        };
    };
    let (SnapshotCommand::List { target, .. } | SnapshotCommand::Restore { target, .. }) = &command;
    let az = match escrow_azure(target) {
        Ok(a) => a,
        Err(e) => return fail(2, e),
    };
    let blob_endpoint = normalise(&target.blob_endpoint);
    let key_vault = normalise(&target.escrow_vault_uri);
    let policy = snapshot::policy(std::time::Duration::from_secs(60));
    let parse_tier = |t: &str| {
        Tier::parse(t).ok_or_else(|| format!("--tier {t:?}: expected consul, vault or nomad"))
    };
    match command {
        SnapshotCommand::List { target, tier } => {
            let tier = match tier.as_deref().map(parse_tier).transpose() {
                Ok(t) => t,
                Err(e) => return fail(2, e),
            };
            match operator::list(&az, &blob_endpoint, &target.cluster, tier, policy).await {
                Ok(all) => {
                    if all.is_empty() {
                        println!("no snapshot of cluster {}", target.cluster);
                    }
                    for l in all {
                        let when = time::OffsetDateTime::from_unix_timestamp(l.created_unix)
                            .map(|t| t.to_string())
                            .unwrap_or_default();
                        println!(
                            "{:<7} {:<32} index {:<10} {:>12} bytes  by {:<20} {}",
                            l.tier, when, l.index, l.stored_bytes, l.node, l.blob
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }
        SnapshotCommand::Restore {
            target,
            tier,
            blob,
            addr,
            api_ca_file,
            force,
        } => {
            let tier = match parse_tier(&tier) {
                Ok(t) => t,
                Err(e) => return fail(2, e),
            };
            let var = match tier {
                Tier::Consul => "CONSUL_HTTP_TOKEN",
                Tier::Vault => "VAULT_TOKEN",
                Tier::Nomad => "NOMAD_TOKEN",
            };
            let token = match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => zeroize::Zeroizing::new(t.trim().to_string()),
                _ => {
                    return fail(
                        2,
                        format!(
                            "{var} is not set (a token that may restore the {} tier)",
                            tier.name()
                        ),
                    )
                }
            };
            let http = match snapshot::product::client(&api_ca_file) {
                Ok(c) => c,
                Err(e) => return fail(2, format!("--api-ca-file: {e}")),
            };
            let store = operator::Store {
                az: &az,
                blob_endpoint: &blob_endpoint,
                key_vault_uri: &key_vault,
            };
            let blob = match blob {
                Some(b) => b,
                None => match operator::latest(&store, &target.cluster, tier, policy).await {
                    Ok(b) => b,
                    Err(e) => return fail(e.exit_code(), e),
                },
            };
            let dest = operator::Target {
                tier,
                http: &http,
                api: addr.trim_end_matches('/'),
                token: &token,
                force,
            };
            match operator::restore(&store, &target.cluster, &blob, &dest, policy).await {
                Ok(r) => {
                    println!(
                        "restored {} into the {} tier: index {}, taken by {} at {}, {} bytes",
                        r.blob,
                        tier.name(),
                        r.header.index,
                        r.header.node,
                        r.header.created_unix,
                        r.plaintext_bytes
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.exit_code(), e),
            }
        }
    }
}
