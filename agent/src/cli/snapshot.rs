//! `hashistack-agent snapshot` (docs/runbooks.md#snapshots): without a subcommand, what
//! `hashistack-snapshot.timer` runs on every server (the tier's leader takes a snapshot when one is due); `snapshot
//! list | restore` for operators, with their own Azure identity (the escrow commands' target flags).

use super::escrow::{escrow_azure, normalise, EscrowTarget};
use super::fail;
use clap::Subcommand;
use hashistack_agent::config::AgentConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum SnapshotCommand {
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

pub async fn run(config: Option<PathBuf>, now: bool, command: Option<SnapshotCommand>) -> ExitCode {
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
