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

use crate::retry::{retry_blocking, Attempt, RetryError, RetryPolicy};
use serde::Deserialize;
use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
        include_str!("../../systemd/hashistack-agent.service"),
    ),
    (
        "hashistack-imds-guard.service",
        include_str!("../../systemd/hashistack-imds-guard.service"),
    ),
    (
        "hashistack-data.service",
        include_str!("../../systemd/hashistack-data.service"),
    ),
    (
        "consul.service",
        include_str!("../../systemd/consul.service"),
    ),
    ("vault.service", include_str!("../../systemd/vault.service")),
    ("nomad.service", include_str!("../../systemd/nomad.service")),
    (
        "nomad-client.service",
        include_str!("../../systemd/nomad-client.service"),
    ),
    (
        "hashistack-snapshot.service",
        include_str!("../../systemd/hashistack-snapshot.service"),
    ),
    (
        "hashistack-snapshot.timer",
        include_str!("../../systemd/hashistack-snapshot.timer"),
    ),
];

/// Where packer installs the IMDS guard's nftables rules (docs/trust-model.md#workloads-and-imds).
pub const NFT_DIR: &str = "/etc/hashistack/nftables";
/// The IMDS guard's rules, as this agent was built with them: (file name, content). The first is loaded on every
/// role by `hashistack-imds-guard.service`, the second on workers by `nomad-client.service`.
pub const NFT_RULES: [(&str, &str); 2] = [
    (
        "hashistack-imds-guard.nft",
        include_str!("../../systemd/hashistack-imds-guard.nft"),
    ),
    (
        "hashistack-imds-workers.nft",
        include_str!("../../systemd/hashistack-imds-workers.nft"),
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

impl ImageManifest {
    /// Reads `<root>/etc/hashistack/image.json`; the error is one line naming the file.
    pub fn load(root: &Path) -> Result<Self, String> {
        let text = fs::read_to_string(under(root, Path::new(MANIFEST_PATH)))
            .map_err(|e| format!("{MANIFEST_PATH}: {}", io_reason(&e)))?;
        let m: ImageManifest = serde_json::from_str(&text)
            .map_err(|e| format!("{MANIFEST_PATH}: not a valid manifest: {e}"))?;
        for (name, v) in [
            ("consul", &m.consul),
            ("vault", &m.vault),
            ("nomad", &m.nomad),
        ] {
            if !is_exact_version(v) {
                return Err(format!(
                    "{MANIFEST_PATH}: {name} version \"{v}\" is not an exact version like 1.2.3"
                ));
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
            Ok(_) => Err(VerifyFailed {
                root: root.to_owned(),
                problems: vec![problem],
            }),
            Err(mut failed) => {
                failed.problems.insert(0, problem);
                Err(failed)
            }
        },
    }
}

/// Checks `root` against `contract`, collecting every problem.
pub fn verify(root: &Path, contract: &ImageContract) -> Result<VerifyReport, VerifyFailed> {
    let mut v = Verifier {
        root,
        ids: Ids::load(root),
        passed: Vec::new(),
        problems: Vec::new(),
    };
    v.users(&contract.users);
    for b in &contract.binaries {
        v.binary(b, contract.check_versions);
    }
    for d in &contract.directories {
        v.node(d, Kind::Directory, None, "");
    }
    for f in &contract.files {
        v.node(&f.entry, Kind::File, f.content, f.source);
    }
    for (path, why) in &contract.absent {
        v.absent(path, why);
    }
    for path in &contract.no_file_capabilities {
        v.no_file_capability(path);
    }
    v.units(&contract.enabled_units, &contract.disabled_units);
    if v.problems.is_empty() {
        Ok(VerifyReport {
            root: root.to_owned(),
            passed: v.passed,
        })
    } else {
        Err(VerifyFailed {
            root: root.to_owned(),
            problems: v.problems,
        })
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

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    shell: String,
}

/// Users and groups of the root being verified.
struct Ids {
    users: Vec<PasswdEntry>,
    groups: HashMap<u32, String>,
    group_ids: HashMap<String, u32>,
    problems: Vec<String>,
}

impl Ids {
    fn load(root: &Path) -> Ids {
        let mut ids = Ids {
            users: Vec::new(),
            groups: HashMap::new(),
            group_ids: HashMap::new(),
            problems: vec![],
        };
        match fs::read_to_string(under(root, Path::new("/etc/passwd"))) {
            Ok(text) => {
                for line in text
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                {
                    let f: Vec<&str> = line.split(':').collect();
                    match (
                        f.len(),
                        f.get(2).and_then(|s| s.parse().ok()),
                        f.get(3).and_then(|s| s.parse().ok()),
                    ) {
                        (7, Some(uid), Some(gid)) => ids.users.push(PasswdEntry {
                            name: f[0].into(),
                            uid,
                            gid,
                            shell: f[6].into(),
                        }),
                        _ => ids
                            .problems
                            .push(format!("/etc/passwd: malformed line \"{line}\"")),
                    }
                }
            }
            Err(e) => ids.problems.push(format!("/etc/passwd: {}", io_reason(&e))),
        }
        match fs::read_to_string(under(root, Path::new("/etc/group"))) {
            Ok(text) => {
                for line in text
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                {
                    let f: Vec<&str> = line.split(':').collect();
                    match (f.len(), f.get(2).and_then(|s| s.parse::<u32>().ok())) {
                        (4, Some(gid)) => {
                            ids.groups.entry(gid).or_insert_with(|| f[0].to_string());
                            ids.group_ids.entry(f[0].to_string()).or_insert(gid);
                        }
                        _ => ids
                            .problems
                            .push(format!("/etc/group: malformed line \"{line}\"")),
                    }
                }
            }
            Err(e) => ids.problems.push(format!("/etc/group: {}", io_reason(&e))),
        }
        ids
    }

    fn user(&self, name: &str) -> Option<&PasswdEntry> {
        self.users.iter().find(|u| u.name == name)
    }

    fn user_name(&self, uid: u32) -> String {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.name.clone())
            .unwrap_or_else(|| format!("uid {uid}"))
    }

    fn group_name(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| format!("gid {gid}"))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Directory,
    File,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Directory => "a directory",
            Kind::File => "a regular file",
        }
    }
}

fn describe(ft: fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

struct Verifier<'a> {
    root: &'a Path,
    ids: Ids,
    passed: Vec<String>,
    problems: Vec<String>,
}

impl Verifier<'_> {
    fn users(&mut self, users: &[ServiceUser]) {
        self.problems.append(&mut self.ids.problems);
        for u in users {
            let mut ok = true;
            let group_gid = self.ids.group_ids.get(&u.group).copied();
            if group_gid.is_none() {
                self.problems
                    .push(format!("group {}: missing from /etc/group", u.group));
                ok = false;
            }
            match self.ids.user(&u.name) {
                None => {
                    self.problems
                        .push(format!("user {}: missing from /etc/passwd", u.name));
                    ok = false;
                }
                Some(p) => {
                    if group_gid.is_some_and(|g| g != p.gid) {
                        let actual = self.ids.group_name(p.gid);
                        self.problems.push(format!(
                            "user {}: primary group is {actual}, expected {}",
                            u.name, u.group
                        ));
                        ok = false;
                    }
                    if p.uid == 0 || p.uid >= 1000 {
                        self.problems.push(format!(
                            "user {}: uid {} is not a system uid, expected 1-999",
                            u.name, p.uid
                        ));
                        ok = false;
                    }
                    if !NOLOGIN_SHELLS.contains(&p.shell.as_str()) {
                        self.problems.push(format!(
                            "user {}: login shell is {}, expected one of {}",
                            u.name,
                            p.shell,
                            NOLOGIN_SHELLS.join(", ")
                        ));
                        ok = false;
                    }
                }
            }
            if ok {
                self.passed
                    .push(format!("user {} (group {}, no login)", u.name, u.group));
            }
        }
    }

    /// Owner, group and mode of `meta` against `want`; pushes problems, returns whether all matched.
    fn ownership(&mut self, want: &Entry, meta: &fs::Metadata) -> bool {
        let path = want.path.display();
        let mut ok = true;
        let owner = self.ids.user_name(meta.uid());
        if owner != want.owner {
            self.problems
                .push(format!("{path}: owner is {owner}, expected {}", want.owner));
            ok = false;
        }
        let group = self.ids.group_name(meta.gid());
        if group != want.group {
            self.problems
                .push(format!("{path}: group is {group}, expected {}", want.group));
            ok = false;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode != want.mode {
            self.problems.push(format!(
                "{path}: mode is {mode:04o}, expected {:04o}",
                want.mode
            ));
            ok = false;
        }
        ok
    }

    fn node(&mut self, want: &Entry, kind: Kind, content: Option<&str>, source: &str) {
        let path = want.path.display().to_string();
        let full = under(self.root, &want.path);
        let meta = match fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) => {
                self.problems.push(format!(
                    "{path}: {}, expected {} ({}:{} {:04o})",
                    io_reason(&e),
                    kind.noun(),
                    want.owner,
                    want.group,
                    want.mode
                ));
                return;
            }
        };
        let is_kind = match kind {
            Kind::Directory => meta.file_type().is_dir(),
            Kind::File => meta.file_type().is_file(),
        };
        if !is_kind {
            self.problems.push(format!(
                "{path}: is {}, expected {}",
                describe(meta.file_type()),
                kind.noun()
            ));
            return;
        }
        let mut ok = self.ownership(want, &meta);
        if let Some(expected) = content {
            match fs::read(&full) {
                Ok(actual) if actual == expected.as_bytes() => {}
                Ok(_) => {
                    self.problems.push(format!(
                        "{path}: content differs from {source} this agent was built with"
                    ));
                    ok = false;
                }
                Err(e) => {
                    self.problems.push(format!("{path}: {}", io_reason(&e)));
                    ok = false;
                }
            }
        }
        if ok {
            let what = if content.is_some() {
                format!(", same as {source}")
            } else {
                String::new()
            };
            self.passed.push(format!(
                "{path} ({}:{} {:04o}{what})",
                want.owner, want.group, want.mode
            ));
        }
    }

    fn binary(&mut self, b: &Binary, check_version: bool) {
        let want = &b.entry;
        let path = want.path.display().to_string();
        let full = under(self.root, &want.path);
        let meta = match fs::metadata(&full) {
            Ok(m) => m,
            Err(e) => {
                self.problems.push(format!(
                    "{path}: {}, expected an executable file",
                    io_reason(&e)
                ));
                return;
            }
        };
        if !meta.is_file() {
            self.problems.push(format!(
                "{path}: is {}, expected an executable file",
                describe(meta.file_type())
            ));
            return;
        }
        if !self.ownership(want, &meta) {
            return;
        }
        let mut line = format!("{path} ({}:{} {:04o}", want.owner, want.group, want.mode);
        if check_version {
            if let Some(check) = &b.version {
                match run_version(&full, &check.args) {
                    Err(problem) => {
                        self.problems
                            .push(format!("{path} {}: {problem}", check.args.join(" ")));
                        return;
                    }
                    Ok(first) => {
                        if let Some(expected) = mismatch(&first, &check.expect) {
                            self.problems.push(format!(
                                "{path} {}: prints \"{first}\", expected {expected}",
                                check.args.join(" ")
                            ));
                            return;
                        }
                        line.push_str(&format!(", {first}"));
                    }
                }
            }
        }
        line.push(')');
        self.passed.push(line);
    }

    fn absent(&mut self, path: &Path, why: &str) {
        match fs::symlink_metadata(under(self.root, path)) {
            Ok(m) => self.problems.push(format!(
                "{}: exists ({}), expected absent: {why}",
                path.display(),
                describe(m.file_type())
            )),
            Err(_) => self.passed.push(format!("{} absent", path.display())),
        }
    }

    fn no_file_capability(&mut self, path: &Path) {
        let full = under(self.root, path);
        match file_capability(&full) {
            Ok(false) => self.passed.push(format!("{} has no file capability", path.display())),
            Ok(true) => self.problems.push(format!(
                "{}: has file capabilities (security.capability), expected none: under the unit's empty \
                 capability bounding set it could not be executed",
                path.display()
            )),
            // A missing binary is already reported by the binaries check.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => self.problems.push(format!("{}: cannot read extended attributes: {e}", path.display())),
        }
    }

    fn units(&mut self, enabled: &[String], disabled: &[String]) {
        for unit in enabled {
            let wants_dir = wants_dir_for(unit);
            let link = under(self.root, Path::new(wants_dir)).join(unit);
            match fs::symlink_metadata(&link) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = fs::read_link(&link).ok();
                    if target.as_deref().and_then(Path::file_name)
                        == Some(std::ffi::OsStr::new(unit))
                    {
                        self.passed
                            .push(format!("{unit} enabled ({wants_dir}/{unit})"));
                    } else {
                        self.problems.push(format!(
                            "{unit}: {wants_dir}/{unit} points to {}, expected {UNIT_DIR}/{unit}",
                            target
                                .map(|t| t.display().to_string())
                                .unwrap_or_else(|| "nothing readable".into())
                        ));
                    }
                }
                Ok(m) => self.problems.push(format!(
                    "{unit}: {wants_dir}/{unit} is {}, expected a symlink to {UNIT_DIR}/{unit}",
                    describe(m.file_type())
                )),
                Err(_) => self.problems.push(format!(
                    "{unit}: not enabled, expected a link in {wants_dir}"
                )),
            }
        }
        let system = under(self.root, Path::new(UNIT_DIR));
        let mut dirs: Vec<String> = fs::read_dir(&system)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .filter(|n| n.ends_with(".wants") || n.ends_with(".requires"))
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        for unit in disabled {
            let found: Vec<String> = dirs
                .iter()
                .filter(|d| fs::symlink_metadata(system.join(d).join(unit)).is_ok())
                .map(|d| format!("{UNIT_DIR}/{d}/{unit}"))
                .collect();
            if found.is_empty() {
                self.passed.push(format!("{unit} not enabled"));
            } else {
                self.problems.push(format!(
                    "{unit}: enabled ({}), expected not enabled: hashistack-agent starts what a role needs",
                    found.join(", ")
                ));
            }
        }
    }
}

/// The first line a version command prints (stdout, else stderr), or why it failed.
fn run_version(binary: &Path, args: &[String]) -> Result<String, String> {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // ETXTBSY: a file that was just written may briefly still be open for writing in a process that is
    // between fork and exec; that passes within milliseconds.
    let busy = RetryPolicy::poll(
        Duration::from_secs(1),
        Duration::from_millis(20),
        Duration::ZERO,
    );
    let mut child = retry_blocking(busy, |_| match command.spawn() {
        Ok(child) => Attempt::Done(child),
        Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => Attempt::Retry(e),
        Err(e) => Attempt::Fail(e),
    })
    .map_err(|e| format!("cannot run: {}", e.last()))?;
    let wait = RetryPolicy::poll(VERSION_TIMEOUT, Duration::from_millis(20), Duration::ZERO);
    let status = retry_blocking(wait, |_| match child.try_wait() {
        Ok(Some(status)) => Attempt::Done(status),
        Ok(None) => Attempt::Retry(format!(
            "did not finish within {} s",
            VERSION_TIMEOUT.as_secs()
        )),
        Err(e) => Attempt::Fail(format!("cannot wait for it: {e}")),
    });
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            if matches!(e, RetryError::Deadline { .. }) {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(e.last().clone());
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let first = |s: &str| {
        s.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(String::from)
    };
    let line = first(&out).or_else(|| first(&err));
    if !status.success() {
        return Err(format!(
            "exited with {status}{}",
            line.map(|l| format!(" saying \"{l}\"")).unwrap_or_default()
        ));
    }
    line.ok_or_else(|| "printed nothing, expected a version".to_string())
}

/// `None` when `line` satisfies `expect`; otherwise what was expected.
fn mismatch(line: &str, expect: &Expect) -> Option<String> {
    match expect {
        Expect::Any => None,
        Expect::Prefix(p) if line.starts_with(p.as_str()) => None,
        Expect::Prefix(p) => Some(format!("a line starting \"{p}\"")),
        Expect::Version { prefix, version } => {
            let want = format!("{prefix}{version}");
            match line.strip_prefix(want.as_str()) {
                Some(rest) if !rest.starts_with(|c: char| c.is_ascii_digit() || c == '.') => None,
                _ => Some(format!("version {version} (\"{want}\")")),
            }
        }
    }
}

/// Whether `path` carries a `security.capability` extended attribute.
fn file_capability(path: &Path) -> std::io::Result<bool> {
    use nix::libc;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    let name = c"security.capability";
    // SAFETY: both pointers are valid NUL-terminated strings; a null buffer of size 0 only asks for the size.
    let n = unsafe { libc::getxattr(c_path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if n >= 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    const CONSUL_UID: u32 = 990;
    const VAULT_UID: u32 = 991;
    const NOMAD_UID: u32 = 992;

    /// A root that satisfies the standard contract pinned to `manifest()`, with shell scripts standing in
    /// for the binaries (they print what the real ones print).
    fn good_root() -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        let w = |p: &str, content: &str, uid: u32, gid: u32, mode: u32| {
            let full = under(r, Path::new(p));
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(&full, content).unwrap();
            std::os::unix::fs::chown(&full, Some(uid), Some(gid)).unwrap();
            fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
        };
        w(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\n\
             consul:x:990:990:HashiCorp consul:/opt/consul:/usr/sbin/nologin\n\
             vault:x:991:991:HashiCorp vault:/opt/vault:/usr/sbin/nologin\n\
             nomad:x:992:992:HashiCorp nomad:/opt/nomad:/usr/sbin/nologin\n",
            0,
            0,
            0o644,
        );
        w(
            "/etc/group",
            "root:x:0:\nconsul:x:990:\nvault:x:991:\nnomad:x:992:\n",
            0,
            0,
            0o644,
        );
        let script = |line: &str| format!("#!/bin/sh\necho '{line}'\necho 'more detail'\n");
        let agent_version = format!("hashistack-agent {}", env!("CARGO_PKG_VERSION"));
        w(
            "/usr/local/bin/hashistack-agent",
            &script(&agent_version),
            0,
            0,
            0o755,
        );
        w("/usr/bin/consul", &script("Consul v1.21.4"), 0, 0, 0o755);
        w(
            "/usr/bin/vault",
            &script("Vault v1.20.4 (abcdef), built 2025-09-01T00:00:00Z"),
            0,
            0,
            0o755,
        );
        w("/usr/bin/nomad", &script("Nomad v1.10.5"), 0, 0, 0o755);
        w(
            "/usr/bin/docker",
            &script("Docker version 27.5.1, build 27.5.1-0ubuntu3"),
            0,
            0,
            0o755,
        );
        w("/usr/bin/jq", &script("jq-1.7.1"), 0, 0, 0o755);
        w(
            "/usr/sbin/nft",
            &script("nftables v1.0.9 (Old Doc Yak #3)"),
            0,
            0,
            0o755,
        );
        for plugin in CNI_PLUGINS {
            w(
                &format!("{CNI_DIR}/{plugin}"),
                &script("CNI plugin"),
                0,
                0,
                0o755,
            );
        }
        for (p, uid, gid, mode) in [
            ("/etc/hashistack", 0, 0, 0o755),
            ("/etc/hashistack/env", 0, 0, 0o750),
            (NFT_DIR, 0, 0, 0o755),
            ("/etc/consul.d", CONSUL_UID, CONSUL_UID, 0o750),
            ("/opt/consul", CONSUL_UID, CONSUL_UID, 0o750),
            ("/etc/vault.d", VAULT_UID, VAULT_UID, 0o750),
            ("/opt/vault", VAULT_UID, VAULT_UID, 0o750),
            ("/etc/nomad.d", 0, NOMAD_UID, 0o750),
            ("/opt/nomad", NOMAD_UID, NOMAD_UID, 0o750),
            ("/var/lib/hashistack-data", 0, 0, 0o755),
        ] {
            let full = under(r, Path::new(p));
            fs::create_dir_all(&full).unwrap();
            std::os::unix::fs::chown(&full, Some(uid), Some(gid)).unwrap();
            fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
        }
        for (name, content) in UNITS {
            w(&format!("{UNIT_DIR}/{name}"), content, 0, 0, 0o644);
        }
        for (name, content) in NFT_RULES {
            w(&format!("{NFT_DIR}/{name}"), content, 0, 0, 0o644);
        }
        w(
            MANIFEST_PATH,
            r#"{"consul":"1.21.4","vault":"1.20.4","nomad":"1.10.5"}"#,
            0,
            0,
            0o644,
        );
        let wants = under(r, Path::new(WANTS_DIR));
        fs::create_dir_all(&wants).unwrap();
        symlink(
            "/etc/systemd/system/hashistack-agent.service",
            wants.join("hashistack-agent.service"),
        )
        .unwrap();
        symlink(
            "/etc/systemd/system/hashistack-imds-guard.service",
            wants.join("hashistack-imds-guard.service"),
        )
        .unwrap();
        let timers = under(r, Path::new(wants_dir_for("hashistack-snapshot.timer")));
        fs::create_dir_all(&timers).unwrap();
        symlink(
            "/etc/systemd/system/hashistack-snapshot.timer",
            timers.join("hashistack-snapshot.timer"),
        )
        .unwrap();
        // Base-system units are enabled too; only the listed ones matter.
        symlink(
            "/usr/lib/systemd/system/ssh.service",
            wants.join("ssh.service"),
        )
        .unwrap();
        dir
    }

    fn manifest() -> ImageManifest {
        ImageManifest {
            consul: "1.21.4".into(),
            vault: "1.20.4".into(),
            nomad: "1.10.5".into(),
        }
    }

    fn contract() -> ImageContract {
        ImageContract::standard()
            .pin_versions(&manifest())
            .with_version_checks(true)
    }

    fn problems(root: &Path) -> Vec<String> {
        match verify(root, &contract()) {
            Ok(report) => panic!("expected a failure, got:\n{report}"),
            Err(failed) => failed.problems,
        }
    }

    fn p(root: &Path, path: &str) -> PathBuf {
        under(root, Path::new(path))
    }

    #[test]
    fn good_root_satisfies_the_contract_and_reports_what_it_checked() {
        let root = good_root();
        let report = verify(root.path(), &contract()).unwrap_or_else(|f| panic!("{f}"));
        let text = report.to_string();
        assert!(
            text.contains("ok   /usr/bin/consul (root:root 0755, Consul v1.21.4)"),
            "{text}"
        );
        assert!(
            text.contains("ok   /etc/vault.d (vault:vault 0750)"),
            "{text}"
        );
        assert!(
            text.contains("ok   hashistack-agent.service enabled"),
            "{text}"
        );
        assert!(text.contains("ok   consul.service not enabled"), "{text}");
        assert!(
            text.contains("ok   /etc/systemd/system/vault.service (root:root 0644, same as systemd/vault.service)"),
            "{text}"
        );
        // verify_image reads the manifest and, off the real root, runs nothing.
        verify_image(root.path()).unwrap_or_else(|f| panic!("{f}"));
    }

    #[test]
    fn imds_guard_missing_edited_or_not_enabled() {
        let root = good_root();
        let r = root.path();
        fs::remove_file(p(r, "/etc/hashistack/nftables/hashistack-imds-workers.nft")).unwrap();
        fs::write(
            p(r, "/etc/hashistack/nftables/hashistack-imds-guard.nft"),
            "table inet hashistack_imds {}\n",
        )
        .unwrap();
        fs::remove_file(p(
            r,
            "/etc/systemd/system/multi-user.target.wants/hashistack-imds-guard.service",
        ))
        .unwrap();
        fs::remove_file(p(r, "/usr/sbin/nft")).unwrap();
        let got = problems(r);
        for want in [
            "/etc/hashistack/nftables/hashistack-imds-workers.nft",
            "/etc/hashistack/nftables/hashistack-imds-guard.nft",
            "hashistack-imds-guard.service",
            "/usr/sbin/nft",
        ] {
            assert!(
                got.iter().any(|l| l.contains(want)),
                "{want} not reported in {got:#?}"
            );
        }
    }

    #[test]
    fn imds_rules_drop_forwarded_and_foreign_uid_traffic_to_imds() {
        // What the rules say, read structurally (nft -c checks their syntax in tests/infra when nft is installed).
        let guard = NFT_RULES[0].1;
        assert!(guard.contains("hook forward"), "{guard}");
        assert!(
            guard.contains("ip daddr 169.254.169.254 counter drop"),
            "{guard}"
        );
        let workers = NFT_RULES[1].1;
        assert!(workers.contains("hook output"), "{workers}");
        assert!(workers.contains(r#"ip daddr 169.254.169.254 meta skuid { 0, "consul" } accept"#));
        assert!(workers.contains("ip daddr 169.254.169.254 counter drop"));
        let unit = UNITS
            .iter()
            .find(|(n, _)| *n == "hashistack-imds-guard.service")
            .unwrap()
            .1;
        assert!(
            unit.contains("Before=network-pre.target docker.service"),
            "{unit}"
        );
        assert!(
            unit.contains("nomad.service nomad-client.service"),
            "{unit}"
        );
        assert!(unit.contains(
            "ExecStart=/usr/sbin/nft -f /etc/hashistack/nftables/hashistack-imds-guard.nft"
        ));
        let client = UNITS
            .iter()
            .find(|(n, _)| *n == "nomad-client.service")
            .unwrap()
            .1;
        assert!(
            client.contains("Requires=hashistack-imds-guard.service"),
            "{client}"
        );
        assert!(client.contains(
            "ExecStartPre=/usr/sbin/nft -f /etc/hashistack/nftables/hashistack-imds-workers.nft"
        ));
    }

    #[test]
    fn missing_binary() {
        let root = good_root();
        fs::remove_file(p(root.path(), "/usr/bin/nomad")).unwrap();
        assert_eq!(
            problems(root.path()),
            ["/usr/bin/nomad: missing, expected an executable file"]
        );
    }

    #[test]
    fn binary_not_executable() {
        let root = good_root();
        fs::set_permissions(
            p(root.path(), "/usr/bin/jq"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert_eq!(
            problems(root.path()),
            ["/usr/bin/jq: mode is 0644, expected 0755"]
        );
    }

    #[test]
    fn wrong_owner() {
        let root = good_root();
        std::os::unix::fs::chown(p(root.path(), "/etc/vault.d"), Some(0), None).unwrap();
        assert_eq!(
            problems(root.path()),
            ["/etc/vault.d: owner is root, expected vault"]
        );
    }

    #[test]
    fn wrong_group_and_unknown_owner() {
        let root = good_root();
        std::os::unix::fs::chown(p(root.path(), "/opt/consul"), Some(4242), Some(NOMAD_UID))
            .unwrap();
        assert_eq!(
            problems(root.path()),
            [
                "/opt/consul: owner is uid 4242, expected consul",
                "/opt/consul: group is nomad, expected consul"
            ]
        );
    }

    #[test]
    fn wrong_mode() {
        let root = good_root();
        fs::set_permissions(
            p(root.path(), "/etc/hashistack/env"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(
            problems(root.path()),
            ["/etc/hashistack/env: mode is 0755, expected 0750"]
        );
    }

    #[test]
    fn unit_file_wrong_mode_and_edited() {
        let root = good_root();
        let unit = p(root.path(), "/etc/systemd/system/consul.service");
        fs::write(&unit, "[Service]\nExecStart=/usr/bin/consul agent -dev\n").unwrap();
        fs::set_permissions(&unit, fs::Permissions::from_mode(0o664)).unwrap();
        assert_eq!(
            problems(root.path()),
            [
                "/etc/systemd/system/consul.service: mode is 0664, expected 0644",
                "/etc/systemd/system/consul.service: content differs from systemd/consul.service this agent was \
                 built with",
            ]
        );
    }

    #[test]
    fn missing_directory_and_directory_that_is_a_file() {
        let root = good_root();
        fs::remove_dir(p(root.path(), "/etc/hashistack/env")).unwrap();
        fs::remove_dir(p(root.path(), "/opt/nomad")).unwrap();
        fs::write(p(root.path(), "/opt/nomad"), "").unwrap();
        assert_eq!(
            problems(root.path()),
            [
                "/etc/hashistack/env: missing, expected a directory (root:root 0750)",
                "/opt/nomad: is a regular file, expected a directory",
            ]
        );
    }

    #[test]
    fn unit_not_enabled() {
        let root = good_root();
        fs::remove_file(p(
            root.path(),
            "/etc/systemd/system/multi-user.target.wants/hashistack-agent.service",
        ))
        .unwrap();
        assert_eq!(
            problems(root.path()),
            ["hashistack-agent.service: not enabled, expected a link in /etc/systemd/system/multi-user.target.wants"]
        );
    }

    #[test]
    fn extra_units_enabled() {
        let root = good_root();
        let sys = p(root.path(), UNIT_DIR);
        symlink(
            "/etc/systemd/system/consul.service",
            sys.join("multi-user.target.wants/consul.service"),
        )
        .unwrap();
        fs::create_dir_all(sys.join("sockets.target.wants")).unwrap();
        symlink(
            "/usr/lib/systemd/system/docker.socket",
            sys.join("sockets.target.wants/docker.socket"),
        )
        .unwrap();
        assert_eq!(
            problems(root.path()),
            [
                "consul.service: enabled (/etc/systemd/system/multi-user.target.wants/consul.service), expected \
                 not enabled: hashistack-agent starts what a role needs",
                "docker.socket: enabled (/etc/systemd/system/sockets.target.wants/docker.socket), expected not \
                 enabled: hashistack-agent starts what a role needs",
            ]
        );
    }

    #[test]
    fn missing_user() {
        let root = good_root();
        let passwd = p(root.path(), "/etc/passwd");
        let text = fs::read_to_string(&passwd).unwrap();
        fs::write(
            &passwd,
            text.lines()
                .filter(|l| !l.starts_with("vault:"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .unwrap();
        // The directories still belong to uid 991, which now has no name.
        assert_eq!(
            problems(root.path()),
            [
                "user vault: missing from /etc/passwd",
                "/etc/vault.d: owner is uid 991, expected vault",
                "/opt/vault: owner is uid 991, expected vault",
            ]
        );
    }

    #[test]
    fn user_with_login_shell_and_wrong_group() {
        let root = good_root();
        let passwd = p(root.path(), "/etc/passwd");
        let text = fs::read_to_string(&passwd).unwrap().replace(
            "nomad:x:992:992:HashiCorp nomad:/opt/nomad:/usr/sbin/nologin",
            "nomad:x:992:0:HashiCorp nomad:/opt/nomad:/bin/bash",
        );
        fs::write(&passwd, text).unwrap();
        assert_eq!(
            problems(root.path()),
            [
                "user nomad: primary group is root, expected nomad",
                "user nomad: login shell is /bin/bash, expected one of /usr/sbin/nologin, /sbin/nologin, \
                 /bin/false, /usr/bin/false",
            ]
        );
    }

    #[test]
    fn wrong_version() {
        let root = good_root();
        fs::write(
            p(root.path(), "/usr/bin/consul"),
            "#!/bin/sh\necho 'Consul v1.21.40'\n",
        )
        .unwrap();
        assert_eq!(
            problems(root.path()),
            ["/usr/bin/consul version: prints \"Consul v1.21.40\", expected version 1.21.4 (\"Consul v1.21.4\")"]
        );
        // Off the real root the version is not asked, so the same root passes without the flag.
        verify(root.path(), &contract().with_version_checks(false))
            .unwrap_or_else(|f| panic!("{f}"));
    }

    #[test]
    fn version_command_that_fails_or_is_the_wrong_product() {
        let root = good_root();
        fs::write(
            p(root.path(), "/usr/bin/vault"),
            "#!/bin/sh\necho 'no such command' >&2\nexit 3\n",
        )
        .unwrap();
        fs::write(
            p(root.path(), "/usr/bin/docker"),
            "#!/bin/sh\necho 'podman version 4.9.3'\n",
        )
        .unwrap();
        assert_eq!(
            problems(root.path()),
            [
                "/usr/bin/vault version: exited with exit status: 3 saying \"no such command\"",
                "/usr/bin/docker --version: prints \"podman version 4.9.3\", expected a line starting \
                 \"Docker version \"",
            ]
        );
    }

    #[test]
    fn leftovers_from_the_packages() {
        let root = good_root();
        fs::write(
            p(root.path(), "/etc/consul.d/consul.hcl"),
            "data_dir = \"/opt/consul\"\n",
        )
        .unwrap();
        fs::create_dir_all(p(root.path(), "/opt/vault/tls")).unwrap();
        let vault = p(root.path(), "/usr/bin/vault");
        // cap_ipc_lock=+ep, as the vault package's postinst sets it (VFS_CAP_REVISION_2 | EFFECTIVE).
        let cap: [u8; 20] = [
            1, 0, 0, 2, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        set_xattr(&vault, "security.capability", &cap);
        assert_eq!(
            problems(root.path()),
            [
                "/etc/consul.d/consul.hcl: exists (a regular file), expected absent: packaged sample config, \
                 would be merged into the rendered one",
                "/opt/vault/tls: exists (a directory), expected absent: key pair generated at image build time, \
                 every VM would share it",
                "/usr/bin/vault: has file capabilities (security.capability), expected none: under the unit's \
                 empty capability bounding set it could not be executed",
            ]
        );
    }

    #[test]
    fn manifest_missing_or_unpinned() {
        let root = good_root();
        fs::write(
            p(root.path(), MANIFEST_PATH),
            r#"{"consul":"latest","vault":"1.20.4","nomad":"1.10.5"}"#,
        )
        .unwrap();
        let failed = verify_image(root.path()).unwrap_err();
        assert_eq!(
            failed.problems,
            ["/etc/hashistack/image.json: consul version \"latest\" is not an exact version like 1.2.3"]
        );
        fs::remove_file(p(root.path(), MANIFEST_PATH)).unwrap();
        let failed = verify_image(root.path()).unwrap_err();
        assert_eq!(
            failed.problems,
            [
                "/etc/hashistack/image.json: missing",
                "/etc/hashistack/image.json: missing, expected a regular file (root:root 0644)",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let root = good_root();
        fs::remove_file(p(root.path(), "/usr/bin/docker")).unwrap();
        std::os::unix::fs::chown(p(root.path(), "/etc/consul.d"), Some(0), Some(0)).unwrap();
        fs::remove_file(p(
            root.path(),
            "/etc/systemd/system/multi-user.target.wants/hashistack-agent.service",
        ))
        .unwrap();
        let failed = verify(root.path(), &contract()).unwrap_err();
        assert_eq!(failed.problems.len(), 4, "{failed}");
        assert!(
            failed
                .to_string()
                .ends_with("breaks the contract: 4 problem(s)"),
            "{failed}"
        );
    }

    #[test]
    fn version_matching() {
        let v = Expect::Version {
            prefix: "Consul v".into(),
            version: "1.21.4".into(),
        };
        assert_eq!(mismatch("Consul v1.21.4", &v), None);
        assert_eq!(mismatch("Consul v1.21.4+ent", &v), None);
        assert!(mismatch("Consul v1.21.40", &v).is_some());
        assert!(mismatch("Consul v1.21.4.1", &v).is_some());
        assert!(mismatch("Consul v1.21", &v).is_some());
        assert_eq!(mismatch("whatever", &Expect::Any), None);
        assert!(is_exact_version("1.10.5"));
        assert!(!is_exact_version("1.10"));
        assert!(!is_exact_version("latest"));
        assert!(!is_exact_version("1.10.x"));
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        use nix::libc;
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let c_name = CString::new(name).unwrap();
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let rc = unsafe {
            libc::setxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            rc,
            0,
            "setxattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}
