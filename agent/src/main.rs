//! The `hashistack-agent` command line: parses it and dispatches to one module per command (`cli/`).

mod cli;

use clap::{Parser, Subcommand};
use cli::disk::DiskCommand;
use cli::escrow::EscrowCommand;
use cli::image::ImageCommand;
use cli::snapshot::SnapshotCommand;
use hashistack_agent::logging::{self, LogFormat};
use hashistack_agent::{smoke, status};
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let started = Instant::now();
    let parsed = Cli::parse();
    logging::init(parsed.log_format, parsed.verbose);
    match parsed.command {
        Command::Boot { config } => cli::boot::run(config, started).await,
        Command::Render {
            metadata,
            config,
            out,
            consul_version,
            vault_version,
            nomad_version,
        } => {
            cli::render::run(
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
        Command::Escrow { command } => cli::escrow::run(command).await,
        Command::Snapshot {
            config,
            now,
            command,
        } => cli::snapshot::run(config, now, command).await,
        Command::Disk {
            command: DiskCommand::Prepare { config },
        } => cli::disk::prepare(config).await,
        Command::Image {
            command: ImageCommand::Verify { root },
        } => cli::image::verify(&root).await,
    }
}
