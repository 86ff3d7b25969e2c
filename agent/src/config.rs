//! `/etc/hashistack/agent.toml`: how this agent reaches its environment. Everything a node *is* comes from
//! IMDS tags (see `node`); this file only says where things are on this machine. Unknown keys are an error.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/etc/hashistack/agent.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub imds: ImdsConfig,
    pub paths: PathsConfig,
    pub services: ServicesConfig,
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    pub gossip: GossipConfig,
    pub vault: VaultConfig,
    pub azure: AzureConfig,
    pub bootstrap: BootstrapConfig,
    pub faults: FaultsConfig,
    pub material: MaterialConfig,
    pub disk: DiskConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMode {
    /// Server tiers keep their data on the block device `disk.device`, which `hashistack-agent disk prepare`
    /// (hashistack-data.service) formats when blank and mounts; `boot` checks that it is mounted.
    Device,
    /// The data disk is a plain directory under `paths.root` (the lab, which cannot mount): nothing is
    /// probed, formatted or mounted, and `boot` checks nothing.
    Directory,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    pub mode: DiskMode,
    /// The server tiers' data disk: LUN 0 by Azure's stable udev link.
    pub device: PathBuf,
    /// How long `disk prepare` waits for the device to appear.
    pub wait_secs: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            mode: DiskMode::Device,
            device: "/dev/disk/azure/scsi1/lun0".into(),
            wait_secs: 120,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MaterialSource {
    /// The cluster CA and gossip keys live in the cluster's Key Vault (tag `hashistack-keyvault-uri`);
    /// the first server-tier node creates them.
    Keyvault,
    /// From the files named in `[tls]` and `[gossip]` (pre-provisioned images, offline tests).
    Files,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaterialConfig {
    pub source: MaterialSource,
    /// How long a node waits for another node to create the material.
    pub deadline_secs: u64,
}

impl Default for MaterialConfig {
    fn default() -> Self {
        MaterialConfig {
            source: MaterialSource::Keyvault,
            deadline_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AzureConfig {
    /// A CA to trust for Azure endpoints besides the system roots (the lab's emulators use a lab CA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_ca_file: Option<PathBuf>,
    /// Require Key Vault's authentication challenge to name the vault's own domain (keep on in Azure).
    pub verify_challenge_resource: bool,
    /// Which hosts the endpoint tags may name. `azure-only` (default): the storage and Key Vault domains of the
    /// cloud IMDS reports, and an https transit seal; `any`: whatever parses (the lab's loopback emulators, an
    /// http transit seal). Tags are a control channel: whoever edits them could otherwise point the agent's
    /// managed-identity tokens at their own host (docs/trust-model.md).
    pub endpoints: EndpointPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointPolicy {
    #[default]
    AzureOnly,
    Any,
}

impl Default for AzureConfig {
    fn default() -> Self {
        AzureConfig {
            extra_ca_file: None,
            verify_challenge_resource: true,
            endpoints: EndpointPolicy::AzureOnly,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapConfig {
    /// Run the one-time bootstrap on server tiers (lease, init, escrow).
    pub enabled: bool,
    pub recovery_shares: u8,
    pub recovery_threshold: u8,
    /// How long a node that lost the election waits for the leader to finish.
    pub follower_deadline_secs: u64,
    /// Deadline for each Azure call (retries included).
    pub azure_deadline_secs: u64,
    /// Leader lease length (Azure allows 15–60 s).
    pub lease_secs: u32,
    /// How long another node's unfinished bootstrap may take to come back and finish (a VM reboot).
    pub peer_grace_secs: u64,
    /// How long this node's own server may stay uninitialized in a bootstrapped tier before the agent resets
    /// its storage so it joins afresh (Vault: a join cut off by a power loss; docs/bootstrap.md#server-not-joined).
    pub join_grace_secs: u64,
    /// How long this node's own server may take in all to join the bootstrapped tier's cluster.
    pub join_deadline_secs: u64,
    /// Operators' PGP public keys (base64 of the binary key), one per recovery share: the PGP escrow option
    /// (docs/pgp-escrow.md). Keys in the scale set's userData (`hashistack.pgpKeys`) replace these.
    pub recovery_pgp_keys: Vec<String>,
    /// No longer supported (an error when set): the agent encrypts the root token to every operator key
    /// itself, after using it for the post-bootstrap configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_token_pgp_key: Option<String>,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            enabled: true,
            recovery_shares: 5,
            recovery_threshold: 3,
            follower_deadline_secs: 900,
            lease_secs: 60,
            peer_grace_secs: 600,
            join_grace_secs: 30,
            join_deadline_secs: 300,
            recovery_pgp_keys: Vec::new(),
            root_token_pgp_key: None,
            azure_deadline_secs: 120,
        }
    }
}

/// Crash injection for the lab's tests: the agent kills itself at the named bootstrap phase boundary.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FaultsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_at: Option<CrashPoint>,
    /// Pause injection: the agent stops itself (SIGSTOP, once) at the named point; the test resumes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_at: Option<PausePoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImdsConfig {
    /// Base URL of the instance metadata service. Never reached through a proxy.
    pub endpoint: String,
    /// Total time allowed for IMDS to answer at boot, retries included.
    pub deadline_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// The node's filesystem root. `/` on a VM; a per-node directory in the lab. Every rendered path,
    /// and every path written inside a config file, is under it.
    pub root: PathBuf,
    /// Who owns rendered files: the service users (`consul`, `vault`, `nomad`) as on the image, or the user
    /// running the agent (the lab runs unprivileged layouts).
    pub owners: Owners,
    /// The file Vault's audit device writes, as Vault's configuration and `sys/audit` name it. Default:
    /// `/var/log/vault/audit.log` under `root`. Every server of a cluster must name the same file: OpenBao
    /// checks its declared audit devices against the ones in storage, and a server whose device differs
    /// refuses to become active. On VMs the default is the same everywhere; the lab, whose nodes have
    /// different roots, names one shared file for all its Vault servers.
    pub vault_audit_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Owners {
    ServiceUsers,
    CurrentUser,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub backend: Backend,
    pub consul_bin: PathBuf,
    pub vault_bin: PathBuf,
    pub nomad_bin: PathBuf,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Enable and start systemd units (the VM image).
    Systemd,
    /// Spawn and supervise the binaries as children of the agent (the lab).
    Process,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Also serve the local HTTP APIs on 127.0.0.1 (on a VM, so local tools work). The lab turns this off
    /// because all its nodes share one loopback interface.
    pub loopback: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Cluster CA certificate and key (PEM) from which the agent issues this node's certificates. Only
    /// server tiers read `ca_key`; workers and the jumpbox read `ca_cert` alone.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Workers: the Nomad client certificate and key (PEM) shared by all clients, issued from the CA by
    /// whoever holds its key (with `material.source = "keyvault"` they come from the shared vault instead).
    pub nomad_client_cert: PathBuf,
    pub nomad_client_key: PathBuf,
    /// Validity of issued node certificates; they are re-issued when less than a third remains.
    pub node_cert_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// Files holding the base64 32-byte gossip encryption keys.
    pub consul_key_file: PathBuf,
    pub nomad_key_file: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// File holding the token for a `transit` seal (the lab's stand-in for Key Vault). Unused with
    /// `azurekeyvault`, which authenticates with the managed identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seal_token_file: Option<PathBuf>,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        ImdsConfig {
            endpoint: "http://169.254.169.254".into(),
            deadline_secs: 300,
        }
    }
}
impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            root: PathBuf::from("/"),
            owners: Owners::ServiceUsers,
            vault_audit_file: None,
        }
    }
}
impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            backend: Backend::Systemd,
            consul_bin: "/usr/bin/consul".into(),
            vault_bin: "/usr/bin/vault".into(),
            nomad_bin: "/usr/bin/nomad".into(),
        }
    }
}
impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig { loopback: true }
    }
}
impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_cert: "/etc/hashistack/tls/ca.pem".into(),
            ca_key: "/etc/hashistack/tls/ca-key.pem".into(),
            nomad_client_cert: "/etc/hashistack/tls/nomad-client.pem".into(),
            nomad_client_key: "/etc/hashistack/tls/nomad-client-key.pem".into(),
            node_cert_days: 365,
        }
    }
}
impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            consul_key_file: "/etc/hashistack/gossip/consul.key".into(),
            nomad_key_file: "/etc/hashistack/gossip/nomad.key".into(),
        }
    }
}

/// Where the process may be killed on purpose (crash-injection tests set `faults.crash_at` in agent.toml;
/// the bootstrap in bootstrap/mod.rs kills itself there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrashPoint {
    AfterLease,
    AfterInit,
    AfterSpool,
    BetweenTargets,
    BeforeReceipt,
    /// Escrowed to both targets and the spool removed; the post-bootstrap configuration not run.
    AfterEscrow,
}

/// Where the process may stop itself on purpose (`faults.pause_at`; bootstrap/mod.rs raises SIGSTOP there,
/// once per process), as a frozen VM or a long GC pause would stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PausePoint {
    /// After the lease check of a coordination write, before the request: the window only storage closes.
    BeforeStateWrite,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("agent config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("agent config {path}: {problem}")]
    Invalid { path: PathBuf, problem: Invalid },
}

/// What is wrong with a config that parsed: one line naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("imds.endpoint {0:?} is not an http(s) URL")]
    ImdsEndpoint(String),
    #[error("imds.deadline_secs must be at least 1")]
    ImdsDeadline,
    #[error("paths.root {0:?} is not an absolute path")]
    RelativeRoot(PathBuf),
    #[error(
        "bootstrap.root_token_pgp_key is no longer supported: with bootstrap.recovery_pgp_keys (or userData \
         hashistack.pgpKeys) the agent encrypts the root token to every operator key itself; remove it \
         (docs/pgp-escrow.md)"
    )]
    RootTokenPgpKey,
    #[error(
        "bootstrap.recovery_pgp_keys has {keys} keys; it needs one per recovery share ({shares})"
    )]
    PgpKeysPerShare { keys: usize, shares: u8 },
    #[error("bootstrap.lease_secs must be between 15 and 60 (Azure's lease limits)")]
    LeaseSecs,
    #[error("bootstrap.recovery_threshold must be between 1 and bootstrap.recovery_shares")]
    RecoveryThreshold,
    #[error("disk.device {0:?} is not an absolute path (or set disk.mode = \"directory\")")]
    RelativeDevice(PathBuf),
    #[error("disk.wait_secs must be at least 1")]
    DiskWait,
    #[error("tls.node_cert_days must be between 1 and 825")]
    NodeCertDays,
}

impl AgentConfig {
    pub fn imds_deadline(&self) -> Duration {
        Duration::from_secs(self.imds.deadline_secs)
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Reads the config if it exists; the defaults otherwise (only for the default path).
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => Self::load(p),
            None if Path::new(DEFAULT_PATH).exists() => Self::load(Path::new(DEFAULT_PATH)),
            None => Ok(Self::default()),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's message spans several lines (it quotes the input); keep the first, which names the key.
            message: e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })?;
        cfg.check().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), Invalid> {
        let ep = &self.imds.endpoint;
        if !(ep.starts_with("http://") || ep.starts_with("https://")) {
            return Err(Invalid::ImdsEndpoint(ep.clone()));
        }
        if self.imds.deadline_secs == 0 {
            return Err(Invalid::ImdsDeadline);
        }
        if !self.paths.root.is_absolute() {
            return Err(Invalid::RelativeRoot(self.paths.root.clone()));
        }
        let b = &self.bootstrap;
        if b.root_token_pgp_key.is_some() {
            return Err(Invalid::RootTokenPgpKey);
        }
        if !b.recovery_pgp_keys.is_empty()
            && b.recovery_pgp_keys.len() != b.recovery_shares as usize
        {
            return Err(Invalid::PgpKeysPerShare {
                keys: b.recovery_pgp_keys.len(),
                shares: b.recovery_shares,
            });
        }
        if !(15..=60).contains(&b.lease_secs) {
            return Err(Invalid::LeaseSecs);
        }
        if b.recovery_threshold == 0 || b.recovery_threshold > b.recovery_shares {
            return Err(Invalid::RecoveryThreshold);
        }
        if self.disk.mode == DiskMode::Device {
            if !self.disk.device.is_absolute() {
                return Err(Invalid::RelativeDevice(self.disk.device.clone()));
            }
            if self.disk.wait_secs == 0 {
                return Err(Invalid::DiskWait);
            }
        }
        if self.tls.node_cert_days == 0 || self.tls.node_cert_days > 825 {
            return Err(Invalid::NodeCertDays);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(t, Path::new("agent.toml"))
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), AgentConfig::default());
        assert_eq!(
            AgentConfig::default().imds.endpoint,
            "http://169.254.169.254"
        );
        assert_eq!(
            AgentConfig::default().imds_deadline(),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn lab_style_config_parses() {
        let c = parse(
            r#"
            [imds]
            endpoint = "http://127.77.0.31:16925"
            deadline_secs = 30
            [paths]
            root = "/tmp/lab/node1"
            owners = "current-user"
            [services]
            backend = "process"
            vault_bin = "/opt/bao"
            [listen]
            loopback = false
            [vault]
            seal_token_file = "/tmp/lab/transit.token"
            "#,
        )
        .unwrap();
        assert_eq!(c.services.backend, Backend::Process);
        assert_eq!(c.paths.owners, Owners::CurrentUser);
        assert!(!c.listen.loopback);
        assert_eq!(c.services.consul_bin, PathBuf::from("/usr/bin/consul"));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = parse("[imds]\nendpont = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("endpont"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = parse("[imsd]\n").unwrap_err().to_string();
        assert!(e.contains("imsd"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse("[imds]\nendpoint = \"169.254.169.254\"\n")
            .unwrap_err()
            .to_string()
            .contains("imds.endpoint"));
        assert!(parse("[imds]\ndeadline_secs = 0\n").is_err());
        assert!(parse("[paths]\nroot = \"relative\"\n")
            .unwrap_err()
            .to_string()
            .contains("paths.root"));
        assert!(parse("[disk]\ndevice = \"\"\n")
            .unwrap_err()
            .to_string()
            .contains("disk.device"));
        assert!(parse("[disk]\nmode = \"tmpfs\"\n")
            .unwrap_err()
            .to_string()
            .contains("tmpfs"));
        assert_eq!(
            parse("[disk]\nmode = \"directory\"\ndevice = \"\"\n")
                .unwrap()
                .disk
                .mode,
            DiskMode::Directory
        );
        let e = parse("[bootstrap]\nroot_token_pgp_key = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bootstrap.root_token_pgp_key is no longer supported"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert!(parse("[services]\nbackend = \"docker\"\n")
            .unwrap_err()
            .to_string()
            .contains("docker"));
    }

    #[test]
    fn each_invalid_value_is_one_line_naming_its_key() {
        let lines = [
            (
                Invalid::ImdsDeadline,
                "imds.deadline_secs must be at least 1",
            ),
            (
                Invalid::PgpKeysPerShare { keys: 2, shares: 5 },
                "bootstrap.recovery_pgp_keys has 2 keys; it needs one per recovery share (5)",
            ),
            (
                Invalid::LeaseSecs,
                "bootstrap.lease_secs must be between 15 and 60 (Azure's lease limits)",
            ),
            (
                Invalid::RelativeDevice("sdc".into()),
                "disk.device \"sdc\" is not an absolute path (or set disk.mode = \"directory\")",
            ),
            (
                Invalid::NodeCertDays,
                "tls.node_cert_days must be between 1 and 825",
            ),
        ];
        for (e, text) in lines {
            assert_eq!(e.to_string(), text);
        }
        let e = parse("[bootstrap]\nlease_secs = 90\n").unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Invalid {
                    problem: Invalid::LeaseSecs,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "agent config agent.toml: bootstrap.lease_secs must be between 15 and 60 (Azure's lease limits)"
        );
    }
}
