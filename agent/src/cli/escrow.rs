//! `hashistack-agent escrow open | verify`, for operators, with their own Azure identity (`az login`, or a
//! managed identity): open fetches, unwraps and decrypts a tier's escrowed secrets — to standard output or a new
//! 0600 file, PGP messages written out for `gpg --decrypt` — and verify checks every escrow receipt against the
//! object it pins, without decrypting anything (one row per receipt, `WARN` rows for newer versions).

use super::fail;
use clap::Subcommand;
use hashistack_agent::escrow::operator::{self, Opened, VerifyLine};
use hashistack_agent::escrow::{self, Targets};
use hashistack_agent::files::{self, FileSpec, Owner};
use hashistack_agent::retry::RetryPolicy;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct EscrowTarget {
    /// Cluster name (the `hashistack-cluster` tag).
    #[arg(long)]
    pub(super) cluster: String,
    /// Storage account blob endpoint (ARM output `blobEndpoint`).
    #[arg(long, env = "HASHISTACK_BLOB_ENDPOINT")]
    pub(super) blob_endpoint: String,
    /// Escrow Key Vault URI (ARM output `escrowKeyVaultUri`).
    #[arg(long, env = "HASHISTACK_ESCROW_VAULT_URI")]
    pub(super) escrow_vault_uri: String,
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
pub enum EscrowCommand {
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

/// Why the operator's Azure clients could not be made (exit 2: the flags or the machine's setup).
#[derive(Debug, thiserror::Error)]
pub(super) enum EscrowAzureError {
    #[error("Azure CLI credential: {0}")]
    Cli(azure_core::Error),
    #[error("{0}")]
    Client(#[from] hashistack_agent::tls::HttpsClientError),
}

pub(super) fn escrow_azure(
    t: &EscrowTarget,
) -> Result<hashistack_agent::azure::Azure, EscrowAzureError> {
    use std::sync::Arc;
    let credential: Arc<dyn azure_core::credentials::TokenCredential> = match t.credential {
        CredentialKind::AzureCli => {
            azure_identity::AzureCliCredential::new(None).map_err(EscrowAzureError::Cli)?
        }
        CredentialKind::Imds => {
            let imds = hashistack_agent::imds::ImdsClient::new(
                &t.imds_endpoint,
                hashistack_agent::retry::RetryPolicy::imds(std::time::Duration::from_secs(30)),
            );
            Arc::new(hashistack_agent::identity::ImdsCredential::new(imds, None))
        }
    };
    Ok(hashistack_agent::azure::Azure::new(
        credential,
        t.ca_file.as_deref(),
        !t.lab,
    )?)
}

pub(super) fn normalise(url: &str) -> String {
    if url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    }
}

pub async fn run(cmd: EscrowCommand) -> ExitCode {
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
            open(
                &az,
                &targets,
                &target.cluster,
                tier,
                out.as_deref(),
                pgp_dir.as_deref(),
                policy,
            )
            .await
        }
        EscrowCommand::Verify { target } => verify(&az, &targets, &target.cluster, policy).await,
    }
}

async fn open(
    az: &hashistack_agent::azure::Azure,
    targets: &Targets,
    cluster: &str,
    tier: &str,
    out: Option<&Path>,
    pgp_dir: Option<&Path>,
    policy: RetryPolicy,
) -> ExitCode {
    if !operator::TIERS.contains(&tier) {
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
    let opened = match operator::open(az, targets, cluster, tier, policy).await {
        Ok(p) => p,
        Err(e) => return fail(1, e),
    };
    for line in opened_notes(cluster, tier, &opened) {
        eprintln!("{line}");
    }
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
            Ok(None) => eprintln!("{cluster}/{tier} is not a PGP escrow: --pgp-dir ignored"),
            Err(e) => return fail(1, e),
        }
    } else if escrow::pgp::PgpPayload::from_opened(&plain).is_some() {
        eprintln!(
            "{cluster}/{tier} is a PGP escrow: its secrets are OpenPGP messages to the operators' keys; add \
             --pgp-dir DIR to write them out for gpg --decrypt (docs/pgp-escrow.md)"
        );
    }
    match out {
        Some(path) => {
            let f = FileSpec {
                path: path.to_path_buf(),
                content: plain.to_vec(),
                mode: 0o600,
                owner: Owner::Current,
                secret: true,
            };
            if let Err(e) = files::create_new(&f) {
                return fail(1, e);
            }
            eprintln!(
                "secrets of {cluster}/{tier} written to {} (mode 0600)",
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

/// What `escrow open` says on stderr about what it opened: warnings first, then which escrow and copy.
fn opened_notes(cluster: &str, tier: &str, opened: &Opened) -> Vec<String> {
    let mut out: Vec<String> = opened
        .warnings
        .iter()
        .map(|w| format!("WARNING: {cluster}/{tier}: {w}"))
        .collect();
    out.push(format!(
        "{cluster}/{tier}: escrow {} opened from its pinned {} copy",
        opened.escrow_id, opened.target
    ));
    out
}

async fn verify(
    az: &hashistack_agent::azure::Azure,
    targets: &Targets,
    cluster: &str,
    policy: RetryPolicy,
) -> ExitCode {
    match operator::verify(az, targets, cluster, policy).await {
        Ok(lines) => {
            let bad = lines.iter().filter(|l| !l.ok).count();
            for l in &lines {
                println!("{}", verify_row(l));
                for w in &l.warnings {
                    println!("{}", warn_row(l, w));
                    eprintln!("WARNING: {cluster}/{}: {w}", l.tier);
                }
            }
            if lines.is_empty() {
                println!("no tier of cluster {cluster} has been bootstrapped");
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

/// One row of `escrow verify`: `ok`/`BAD`, tier, target, object, detail.
fn verify_row(l: &VerifyLine) -> String {
    format!(
        "{:<4} {:<7} {:<9} {:<60} {}",
        if l.ok { "ok" } else { "BAD" },
        l.tier,
        l.target,
        l.object,
        l.detail
    )
}

/// A `WARN` row under a receipt's row (a newer version, another finding).
fn warn_row(l: &VerifyLine, warning: &str) -> String {
    format!(
        "{:<4} {:<7} {:<9} {:<60} {warning}",
        "WARN", l.tier, l.target, l.object
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_rows_line_up() {
        let l = VerifyLine {
            tier: "vault".into(),
            target: "keyvault".into(),
            object: "c1-vault-escrow/0123".into(),
            ok: false,
            detail: "sha256 differs".into(),
            warnings: vec!["a newer version exists".into()],
        };
        let pad = |s: &str, n: usize| format!("{s:<n$}");
        assert_eq!(
            verify_row(&l),
            format!(
                "BAD  vault   keyvault  {} sha256 differs",
                pad("c1-vault-escrow/0123", 60)
            )
        );
        assert_eq!(
            warn_row(&l, "a newer version exists"),
            format!(
                "WARN vault   keyvault  {} a newer version exists",
                pad("c1-vault-escrow/0123", 60)
            )
        );
        assert!(verify_row(&VerifyLine { ok: true, ..l }).starts_with("ok   vault "));
    }
}
