//! `hashistack-agent image verify`: the gold image contract (owned by the packer work).
//!
//! [`ImageContract::standard`] is what `packer/` produces: the binaries (and, on the image itself, their
//! versions), the service users, the directories with their owners and modes, the units of `systemd/`
//! (byte for byte: they are compiled into the agent) and which units are enabled. [`verify`] checks a root
//! directory against a contract and returns every problem at once, each one line naming the path and what
//! was expected, e.g. `/etc/vault.d: owner is root, expected vault`.
//!
//! Everything is read under `root`, so synthetic roots work: owners and groups are resolved through
//! `<root>/etc/passwd` and `<root>/etc/group`, never through the host's name service. Only the version
//! check executes something (`<root><binary> <args>`); it is off unless [`ImageContract::check_versions`]
//! is set, which [`verify_image`] does for the real root `/` only. Symbolic links of binaries are followed
//! as the host resolves them, so a synthetic root should use relative links.

mod check;

pub use check::verify;
use serde::Deserialize;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where packer installs the units: `/etc/systemd/system` takes precedence over the units that HashiCorp's
/// packages install in `/usr/lib/systemd/system`.
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// The target whose `.wants` directory holds the one enabled unit.
pub const WANTS_DIR: &str = "/etc/systemd/system/multi-user.target.wants";
/// Written by `packer/scripts/30-layout.sh`: the Consul, Vault and Nomad versions baked into the image.
pub const MANIFEST_PATH: &str = "/etc/hashistack/image.json";
/// How long one version command may run.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(20);

/// The units of `systemd/`, as this agent was built with them: (file name, content).
pub const UNITS: [(&str, &str); 9] = [
    (
        "hashistack-agent.service",
        include_str!("../../../systemd/hashistack-agent.service"),
    ),
    (
        "hashistack-imds-guard.service",
        include_str!("../../../systemd/hashistack-imds-guard.service"),
    ),
    (
        "hashistack-data.service",
        include_str!("../../../systemd/hashistack-data.service"),
    ),
    (
        "consul.service",
        include_str!("../../../systemd/consul.service"),
    ),
    (
        "vault.service",
        include_str!("../../../systemd/vault.service"),
    ),
    (
        "nomad.service",
        include_str!("../../../systemd/nomad.service"),
    ),
    (
        "nomad-client.service",
        include_str!("../../../systemd/nomad-client.service"),
    ),
    (
        "hashistack-snapshot.service",
        include_str!("../../../systemd/hashistack-snapshot.service"),
    ),
    (
        "hashistack-snapshot.timer",
        include_str!("../../../systemd/hashistack-snapshot.timer"),
    ),
];

/// Where packer installs the IMDS guard's nftables rules (docs/trust-model.md#workloads-and-imds).
pub const NFT_DIR: &str = "/etc/hashistack/nftables";
/// The IMDS guard's rules, as this agent was built with them: (file name, content). The first is loaded on every
/// role by `hashistack-imds-guard.service`, the second on workers by `nomad-client.service`.
pub const NFT_RULES: [(&str, &str); 2] = [
    (
        "hashistack-imds-guard.nft",
        include_str!("../../../systemd/hashistack-imds-guard.nft"),
    ),
    (
        "hashistack-imds-workers.nft",
        include_str!("../../../systemd/hashistack-imds-workers.nft"),
    ),
];

/// Where an enabled unit's link lives: timers under `timers.target.wants`, services under [`WANTS_DIR`].
pub fn wants_dir_for(unit: &str) -> &'static str {
    if unit.ends_with(".timer") {
        "/etc/systemd/system/timers.target.wants"
    } else {
        WANTS_DIR
    }
}

/// Shells that refuse an interactive login.
const NOLOGIN_SHELLS: [&str; 4] = [
    "/usr/sbin/nologin",
    "/sbin/nologin",
    "/bin/false",
    "/usr/bin/false",
];

/// What a gold image must look like.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageContract {
    pub binaries: Vec<Binary>,
    pub users: Vec<ServiceUser>,
    pub directories: Vec<Entry>,
    pub files: Vec<FileEntry>,
    /// Paths that must not exist, with the reason.
    pub absent: Vec<(PathBuf, String)>,
    /// Binaries that must carry no file capability (`security.capability` extended attribute).
    pub no_file_capabilities: Vec<PathBuf>,
    /// Units that must be enabled (a link in [`WANTS_DIR`]).
    pub enabled_units: Vec<String>,
    /// Units that must not be enabled anywhere under `/etc/systemd/system/*.wants` or `*.requires`.
    pub disabled_units: Vec<String>,
    /// Run the binaries' version commands. Only meaningful where the binaries can run: the real root.
    pub check_versions: bool,
}

/// An executable with its owner, group and mode, and how to ask for its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Binary {
    pub entry: Entry,
    pub version: Option<VersionCheck>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionCheck {
    pub args: Vec<String>,
    pub expect: Expect,
}

/// What the first line of a version command's output must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// Anything, as long as the command succeeds and prints something.
    Any,
    /// The first line starts with this text.
    Prefix(String),
    /// The first line starts with `prefix` + `version`, and the version ends there: `Consul v1.21.4` matches
    /// `Consul v1.21.4` and `Consul v1.21.4+ent`, not `Consul v1.21.40`.
    Version { prefix: String, version: String },
}

/// A system account for a service, whose primary group has the same role.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUser {
    pub name: String,
    pub group: String,
}

/// A path with the owner, group and permission bits it must have.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    pub owner: String,
    pub group: String,
    pub mode: u32,
}

/// A regular file; with `content`, its exact bytes, and `source` naming where they come from.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub entry: Entry,
    pub content: Option<&'static str>,
    pub source: &'static str,
}

/// The versions baked into an image (`/etc/hashistack/image.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub consul: String,
    pub vault: String,
    pub nomad: String,
}

/// What passed.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub root: PathBuf,
    /// One line per check that passed.
    pub passed: Vec<String>,
}

/// Every problem found, one precise line each.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyFailed {
    pub root: PathBuf,
    pub problems: Vec<String>,
}

fn entry(path: &str, owner: &str, group: &str, mode: u32) -> Entry {
    Entry {
        path: PathBuf::from(path),
        owner: owner.into(),
        group: group.into(),
        mode,
    }
}

pub use crate::render::nomad::CNI_DIR;
/// The plugins Nomad's `bridge` network mode and Connect need.
pub const CNI_PLUGINS: &[&str] = &["bridge", "firewall", "host-local", "loopback", "portmap"];

fn binary(path: &str, args: &[&str], expect: Expect) -> Binary {
    Binary {
        entry: entry(path, "root", "root", 0o755),
        version: Some(VersionCheck {
            args: args.iter().map(|a| a.to_string()).collect(),
            expect,
        }),
    }
}

impl ImageContract {
    /// The image that `packer/` builds. Versions are checked by product name only; [`Self::pin_versions`]
    /// pins them to a manifest. Version commands are off; [`Self::with_version_checks`] turns them on.
    pub fn standard() -> Self {
        let binaries = vec![
            binary(
                "/usr/local/bin/hashistack-agent",
                &["--version"],
                Expect::Version {
                    prefix: "hashistack-agent ".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                },
            ),
            binary(
                "/usr/bin/consul",
                &["version"],
                Expect::Prefix("Consul v".into()),
            ),
            binary(
                "/usr/bin/vault",
                &["version"],
                Expect::Prefix("Vault v".into()),
            ),
            binary(
                "/usr/bin/nomad",
                &["version"],
                Expect::Prefix("Nomad v".into()),
            ),
            binary(
                "/usr/bin/docker",
                &["--version"],
                Expect::Prefix("Docker version ".into()),
            ),
            binary("/usr/bin/jq", &["--version"], Expect::Prefix("jq-".into())),
            // Loads the IMDS guard's rules (hashistack-imds-guard.service, nomad-client.service).
            binary(
                "/usr/sbin/nft",
                &["--version"],
                Expect::Prefix("nftables v".into()),
            ),
        ]
        .into_iter()
        // The CNI reference plugins Nomad's bridge networking and Connect sidecars run (Ubuntu's
        // containernetworking-plugins, pinned in packer; Nomad's client `cni_path`): present and executable.
        .chain(CNI_PLUGINS.iter().map(|p| Binary {
            entry: entry(&format!("{CNI_DIR}/{p}"), "root", "root", 0o755),
            version: None,
        }))
        .collect();
        let users = ["consul", "vault", "nomad"]
            .iter()
            .map(|n| ServiceUser {
                name: n.to_string(),
                group: n.to_string(),
            })
            .collect();
        let directories = vec![
            // Traversable by operators: /etc/hashistack/operator (the jumpbox's CA and CLI environments) must be
            // reachable without sudo; what is secret below it has its own mode (env/ 0750, files 0600).
            entry("/etc/hashistack", "root", "root", 0o755),
            entry("/etc/hashistack/env", "root", "root", 0o750),
            entry(NFT_DIR, "root", "root", 0o755),
            entry("/etc/consul.d", "consul", "consul", 0o750),
            entry("/opt/consul", "consul", "consul", 0o750),
            entry("/etc/vault.d", "vault", "vault", 0o750),
            entry("/opt/vault", "vault", "vault", 0o750),
            // Written by the agent (root), read by the Nomad server (group nomad) and the client (root).
            entry("/etc/nomad.d", "root", "nomad", 0o750),
            entry("/opt/nomad", "nomad", "nomad", 0o750),
            // The server tiers' data disk is mounted here (hashistack-data.service); on the OS disk, and on
            // other roles, it stays an empty directory that only root may write.
            entry("/var/lib/hashistack-data", "root", "root", 0o755),
        ];
        let mut files: Vec<FileEntry> = UNITS
            .iter()
            .map(|(name, content)| FileEntry {
                entry: entry(&format!("{UNIT_DIR}/{name}"), "root", "root", 0o644),
                content: Some(content),
                source: unit_source(name),
            })
            .collect();
        files.extend(NFT_RULES.iter().map(|(name, content)| FileEntry {
            entry: entry(&format!("{NFT_DIR}/{name}"), "root", "root", 0o644),
            content: Some(content),
            source: if name.contains("workers") {
                "systemd/hashistack-imds-workers.nft"
            } else {
                "systemd/hashistack-imds-guard.nft"
            },
        }));
        files.push(FileEntry {
            entry: entry(MANIFEST_PATH, "root", "root", 0o644),
            content: None,
            source: "packer/scripts/30-layout.sh",
        });
        let sample = "packaged sample config, would be merged into the rendered one";
        let absent = [
            ("/etc/consul.d/consul.hcl", sample),
            ("/etc/vault.d/vault.hcl", sample),
            ("/etc/vault.d/agent.hcl", sample),
            ("/etc/nomad.d/nomad.hcl", sample),
            ("/etc/nomad.d/client.hcl", sample),
            ("/etc/nomad.d/server.hcl", sample),
            (
                "/opt/vault/tls",
                "key pair generated at image build time, every VM would share it",
            ),
        ]
        .iter()
        .map(|(p, why)| (PathBuf::from(p), why.to_string()))
        .collect();
        ImageContract {
            binaries,
            users,
            directories,
            files,
            absent,
            no_file_capabilities: vec![PathBuf::from("/usr/bin/vault")],
            // The IMDS guard runs at every boot, before Docker and Nomad; everything else is started by the agent.
            enabled_units: vec![
                "hashistack-agent.service".into(),
                "hashistack-imds-guard.service".into(),
                "hashistack-snapshot.timer".into(),
            ],
            disabled_units: [
                // Pulled in by hashistack-agent.service (Wants=), never enabled on its own.
                "hashistack-data.service",
                // Started by its timer only.
                "hashistack-snapshot.service",
                "consul.service",
                "vault.service",
                "nomad.service",
                "nomad-client.service",
                "docker.service",
                "docker.socket",
                "containerd.service",
            ]
            .iter()
            .map(|u| u.to_string())
            .collect(),
            check_versions: false,
        }
    }

    /// Expect exactly the versions of `manifest` from `consul`, `vault` and `nomad`.
    pub fn pin_versions(mut self, manifest: &ImageManifest) -> Self {
        for b in &mut self.binaries {
            let pinned = match b.entry.path.to_str() {
                Some("/usr/bin/consul") => Some(("Consul v", &manifest.consul)),
                Some("/usr/bin/vault") => Some(("Vault v", &manifest.vault)),
                Some("/usr/bin/nomad") => Some(("Nomad v", &manifest.nomad)),
                _ => None,
            };
            if let (Some((prefix, version)), Some(check)) = (pinned, b.version.as_mut()) {
                check.expect = Expect::Version {
                    prefix: prefix.into(),
                    version: version.clone(),
                };
            }
        }
        self
    }

    pub fn with_version_checks(mut self, on: bool) -> Self {
        self.check_versions = on;
        self
    }
}

fn unit_source(name: &str) -> &'static str {
    match name {
        "hashistack-agent.service" => "systemd/hashistack-agent.service",
        "hashistack-data.service" => "systemd/hashistack-data.service",
        "hashistack-imds-guard.service" => "systemd/hashistack-imds-guard.service",
        "consul.service" => "systemd/consul.service",
        "vault.service" => "systemd/vault.service",
        "nomad.service" => "systemd/nomad.service",
        "hashistack-snapshot.service" => "systemd/hashistack-snapshot.service",
        "hashistack-snapshot.timer" => "systemd/hashistack-snapshot.timer",
        _ => "systemd/nomad-client.service",
    }
}

/// Why the image's manifest is unusable: one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {}", MANIFEST_PATH, io_reason(.0))]
    Unreadable(std::io::Error),
    #[error("{}: not a valid manifest: {}", MANIFEST_PATH, .0)]
    Invalid(serde_json::Error),
    #[error(
        "{}: {product} version \"{version}\" is not an exact version like 1.2.3",
        MANIFEST_PATH
    )]
    InexactVersion {
        product: &'static str,
        version: String,
    },
}

impl ImageManifest {
    /// Reads `<root>/etc/hashistack/image.json`; the error is one line naming the file.
    pub fn load(root: &Path) -> Result<Self, ManifestError> {
        let text = fs::read_to_string(under(root, Path::new(MANIFEST_PATH)))
            .map_err(ManifestError::Unreadable)?;
        let m: ImageManifest = serde_json::from_str(&text).map_err(ManifestError::Invalid)?;
        for (product, v) in [
            ("consul", &m.consul),
            ("vault", &m.vault),
            ("nomad", &m.nomad),
        ] {
            if !is_exact_version(v) {
                return Err(ManifestError::InexactVersion {
                    product,
                    version: v.clone(),
                });
            }
        }
        Ok(m)
    }
}

fn is_exact_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// What `hashistack-agent image verify [--root <dir>]` runs: the standard contract, versions pinned by the
/// image's manifest, version commands executed only when `root` is `/`.
pub fn verify_image(root: &Path) -> Result<VerifyReport, VerifyFailed> {
    let real_root = root == Path::new("/");
    let contract = ImageContract::standard().with_version_checks(real_root);
    match ImageManifest::load(root) {
        Ok(manifest) => verify(root, &contract.pin_versions(&manifest)),
        Err(problem) => match verify(root, &contract) {
            // The manifest's problem leads the list.
            Ok(_) => Err(VerifyFailed {
                root: root.to_owned(),
                problems: vec![problem.to_string()],
            }),
            Err(mut failed) => {
                failed.problems.insert(0, problem.to_string());
                Err(failed)
            }
        },
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.passed {
            writeln!(f, "ok   {line}")?;
        }
        write!(
            f,
            "image at {} satisfies the contract ({} checks)",
            self.root.display(),
            self.passed.len()
        )
    }
}

impl fmt::Display for VerifyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.problems {
            writeln!(f, "FAIL {line}")?;
        }
        write!(
            f,
            "image at {} breaks the contract: {} problem(s)",
            self.root.display(),
            self.problems.len()
        )
    }
}

impl std::error::Error for VerifyFailed {}

/// `<root>/<absolute path>`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "missing".into(),
        std::io::ErrorKind::PermissionDenied => "not readable (permission denied)".into(),
        _ => format!("cannot be read: {e}"),
    }
}

#[cfg(test)]
mod tests;
