//! The server tiers' data disk: the managed disk the ARM template attaches at LUN 0 of every Consul, Vault and
//! Nomad server. It holds what must survive an image roll (`az vmss update-instances` replaces the OS disk):
//! the products' raft data and the escrow spool (see `Layout::data_disk_dir`).
//!
//! `hashistack-agent disk prepare` (run by `hashistack-data.service`, ordered before the agent and the
//! services: docs/systemd.md) finds the disk by its stable path, formats it **only when it is blank**, and
//! mounts it. Blank means: `blkid -p` (low-level probing, no cache) finds no signature at all — no filesystem,
//! no partition table, no RAID/LVM member — *and* the first and last MiB are all zero (a GPT's backup header
//! lives at the end). Anything else is refused and nothing is written: a filesystem that is not ours (ext4
//! labelled [`LABEL`]) may be someone's data. The block device operations sit behind [`BlockDevices`] so the
//! decisions are tested with a fake, and [`SystemDevices`] (blkid, mkfs.ext4, mount) is tested on loop devices.
//!
//! The agent's own `boot` never mounts (its unit has a private mount namespace): on a server tier it only
//! checks that the mount point is mounted ([`check_mounted`]) before it writes anything.

use crate::retry::{self, Attempt, RetryError, RetryPolicy, TimeoutError};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The filesystem label that marks a data disk as ours (ext4 allows 16 bytes).
pub const LABEL: &str = "hashistack-data";
pub const FS_TYPE: &str = "ext4";
/// Nothing on the data disk is a device, a setuid binary or meant to be executed.
pub const MOUNT_OPTIONS: &str = "noatime,nodev,nosuid,noexec";
/// How many bytes at the start and at the end of a device must be zero for it to count as blank.
pub const ZERO_CHECK_BYTES: u64 = 1 << 20;
/// The unit that runs `disk prepare` (named in operator messages).
pub const UNIT: &str = "hashistack-data.service";

/// What a device holds, as far as probing can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No signature, and zeros at both ends: safe to format.
    Blank,
    Filesystem {
        fs_type: String,
        label: Option<String>,
        uuid: Option<String>,
    },
    PartitionTable {
        pt_type: String,
    },
    /// No known signature but data (non-zero bytes), or several conflicting signatures.
    Unrecognised {
        detail: String,
    },
}

impl Content {
    /// Our filesystem: ext4 labelled [`LABEL`].
    pub fn is_ours(&self) -> bool {
        matches!(self, Content::Filesystem { fs_type, label: Some(l), .. } if fs_type == FS_TYPE && l == LABEL)
    }

    pub fn describe(&self) -> String {
        match self {
            Content::Blank => "nothing (blank)".into(),
            Content::Filesystem {
                fs_type,
                label,
                uuid,
            } => format!(
                "a {fs_type} filesystem{}{}",
                label
                    .as_ref()
                    .map(|l| format!(" labelled {l:?}"))
                    .unwrap_or_else(|| " without a label".into()),
                uuid.as_ref()
                    .map(|u| format!(" (UUID {u})"))
                    .unwrap_or_default()
            ),
            Content::PartitionTable { pt_type } => format!("a {pt_type} partition table"),
            Content::Unrecognised { detail } => detail.clone(),
        }
    }
}

/// Where the disk belongs in Azure, for the operator's next step (from IMDS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Site {
    pub role: String,
    pub resource_group: String,
    pub scale_set: String,
    pub vm: String,
}

impl Site {
    /// A Uniform scale set's VM is named `<scale set>_<instance id>`.
    fn instance_id(&self) -> &str {
        self.vm
            .rsplit_once('_')
            .map(|(_, id)| id)
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .unwrap_or("<instance id>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "data disk: no device at {} after {}s: this {role} keeps its raft data and escrow spool on the data disk \
         at LUN 0 and starts nothing without it. Next step: make the scale set's model attach it \
         (`az vmss show -g {rg} -n {ss} --query virtualMachineProfile.storageProfile.dataDisks` must list lun 0; \
         arm-templates/azuredeploy.json does), apply the model to this VM (`az vmss update-instances -g {rg} -n {ss} \
         --instance-ids {id}`), then on the VM `systemctl restart {UNIT} hashistack-agent.service`",
        device.display(), waited.as_secs(), role = site.role, rg = site.resource_group, ss = site.scale_set,
        id = site.instance_id()
    )]
    Missing {
        device: PathBuf,
        waited: Duration,
        site: Box<Site>,
    },
    #[error(
        "data disk {} ({}) holds {}; refusing to format it, nothing was written. Next step: if that data is not \
         needed, erase it (`wipefs --all {}`), then `systemctl restart {UNIT} hashistack-agent.service`; if it is, \
         detach this disk and attach a blank one at LUN 0",
        device.display(), resolved.display(), content.describe(), device.display()
    )]
    Foreign {
        device: PathBuf,
        resolved: PathBuf,
        content: Content,
    },
    #[error(
        "data disk: {} is already a mount point of another device; expected {} ({}). Next step: `findmnt {}` \
         shows what is mounted there; unmount it, then `systemctl restart {UNIT} hashistack-agent.service`",
        mount_point.display(), device.display(), resolved.display(), mount_point.display()
    )]
    OtherMount {
        mount_point: PathBuf,
        device: PathBuf,
        resolved: PathBuf,
    },
    #[error(
        "data disk: {} is not mounted, so this {role} writes nothing (its raft data and escrow spool belong on \
         the data disk, not on the OS disk). Next step: `journalctl -b -u {UNIT}` says why the disk was not \
         mounted; once that is fixed, `systemctl restart {UNIT} hashistack-agent.service`",
        mount_point.display()
    )]
    NotMounted { mount_point: PathBuf, role: String },
    #[error(
        "data disk {} belongs to {} (first used by {}); this node is {} in cluster {}, so it \
         writes and starts nothing on it. Next step: attach a blank disk at LUN 0 to this VM; or, if the data on \
         this one is not needed, erase the disk (`wipefs --all` on its device), then `systemctl restart {UNIT} \
         hashistack-agent.service`",
        .0.dir.display(), owner_of(&.0.found_cluster, &.0.found_role), .0.found_node, .0.role, .0.cluster
    )]
    OtherCluster(Box<OtherClusterDisk>),
    #[error(
        "data disk {}: its marker {MARKER} does not parse ({detail}); nothing was written or started. Next step: \
         read it; if this disk is this node's, remove the marker and `systemctl restart hashistack-agent.service`",
        dir.display()
    )]
    BadMarker { dir: PathBuf, detail: String },
    #[error("data disk: {what} {}: {detail}", path.display())]
    Command {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("data disk: {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TimeoutError for DiskError {
    fn timeout(after: Duration) -> Self {
        DiskError::Command {
            what: "timed out after",
            path: PathBuf::from(format!("{}s", after.as_secs())),
            detail: "waiting for the device".into(),
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| DiskError::Io { what, path, source }
}

/// The block device operations `prepare` needs.
#[async_trait::async_trait]
pub trait BlockDevices: Send + Sync {
    /// What the device holds. Must never report [`Content::Blank`] for a device it could not read.
    async fn probe(&self, device: &Path) -> Result<Content, DiskError>;
    /// Makes an ext4 filesystem labelled `label`. Only ever called on a device that probed blank.
    async fn mkfs(&self, device: &Path, label: &str) -> Result<(), DiskError>;
    async fn mount(&self, device: &Path, at: &Path) -> Result<(), DiskError>;
    /// The device id (`st_dev`) of the filesystem mounted at `at`, or `None` when `at` is no mount point.
    fn mounted(&self, at: &Path) -> Result<Option<u64>, DiskError>;
    /// The device number (`st_rdev`) of a block device, as a filesystem mounted from it reports it in `st_dev`.
    fn device_id(&self, device: &Path) -> Result<u64, DiskError>;
}

/// What `prepare` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Already mounted from this disk (the oneshot ran before in this boot).
    AlreadyMounted,
    /// Our filesystem was there: mounted, not formatted.
    Mounted,
    /// The disk was blank: formatted, then mounted.
    FormattedAndMounted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub device: PathBuf,
    pub resolved: PathBuf,
    pub action: Action,
}

/// Waits for `device` (up to `wait`), then mounts it at `mount_point`, formatting it first only if blank.
pub async fn prepare(
    devs: &dyn BlockDevices,
    device: &Path,
    mount_point: &Path,
    wait: Duration,
    site: &Site,
) -> Result<Prepared, DiskError> {
    let missing = || DiskError::Missing {
        device: device.to_path_buf(),
        waited: wait,
        site: Box::new(site.clone()),
    };
    // The udev link appears when the disk is attached and udev has run; on a fresh VM that can be after boot.
    let policy = RetryPolicy {
        deadline: wait,
        attempt_timeout: Duration::from_secs(5),
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
    };
    let missing = &missing;
    let resolved = retry::retry(policy, move |_| async move {
        match std::fs::canonicalize(device) {
            Ok(p) => Attempt::Done(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Attempt::Retry(missing()),
            Err(e) => Attempt::Fail(io("resolve", device)(e)),
        }
    })
    .await
    .map_err(|e| match e {
        RetryError::Final(e) => e,
        RetryError::Deadline { .. } => missing(),
    })?;
    let id = devs.device_id(&resolved)?;
    if let Some(mounted) = devs.mounted(mount_point)? {
        return if mounted == id {
            Ok(Prepared {
                device: device.to_path_buf(),
                resolved,
                action: Action::AlreadyMounted,
            })
        } else {
            Err(DiskError::OtherMount {
                mount_point: mount_point.to_path_buf(),
                device: device.to_path_buf(),
                resolved,
            })
        };
    }
    let content = devs.probe(&resolved).await?;
    let action = if content.is_ours() {
        Action::Mounted
    } else if content == Content::Blank {
        tracing::info!(device = %resolved.display(), "data disk is blank: formatting it (ext4, label {LABEL})");
        devs.mkfs(&resolved, LABEL).await?;
        let after = devs.probe(&resolved).await?;
        if !after.is_ours() {
            return Err(DiskError::Command {
                what: "mkfs",
                path: resolved,
                detail: format!("after formatting, the device holds {}", after.describe()),
            });
        }
        Action::FormattedAndMounted
    } else {
        return Err(DiskError::Foreign {
            device: device.to_path_buf(),
            resolved,
            content,
        });
    };
    std::fs::create_dir_all(mount_point).map_err(io("create mount point", mount_point))?;
    devs.mount(&resolved, mount_point).await?;
    match devs.mounted(mount_point)? {
        Some(m) if m == id => Ok(Prepared {
            device: device.to_path_buf(),
            resolved,
            action,
        }),
        _ => Err(DiskError::Command {
            what: "mount",
            path: mount_point.to_path_buf(),
            detail: format!(
                "mount reported success but {} is not mounted there",
                resolved.display()
            ),
        }),
    }
}

/// Whether `at` is a mount point: its filesystem differs from its parent's. `None` if it is not.
pub fn mount_point_dev(at: &Path) -> Result<Option<u64>, DiskError> {
    let meta = match std::fs::metadata(at) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("stat", at)(e)),
    };
    let parent = at.join("..");
    let pmeta = std::fs::metadata(&parent).map_err(io("stat", &parent))?;
    Ok((meta.dev() != pmeta.dev() || meta.ino() == pmeta.ino()).then_some(meta.dev()))
}

/// The agent's check before it writes anything on a server tier: the data disk is mounted.
pub fn check_mounted(mount_point: &Path, role: &str) -> Result<(), DiskError> {
    match mount_point_dev(mount_point)? {
        Some(_) => Ok(()),
        None => Err(DiskError::NotMounted {
            mount_point: mount_point.to_path_buf(),
            role: role.into(),
        }),
    }
}

/// The file on a data disk that says whose it is: written at its first use, checked at every boot.
pub const MARKER: &str = "hashistack-disk.json";

fn owner_of(cluster: &str, role: &str) -> String {
    format!("cluster {cluster}'s {role} tier")
}

/// A data disk whose marker names another cluster or tier.
#[derive(Debug)]
pub struct OtherClusterDisk {
    pub dir: PathBuf,
    pub found_cluster: String,
    pub found_role: String,
    pub found_node: String,
    pub cluster: String,
    pub role: String,
}

/// What the marker records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub format: u32,
    pub cluster: String,
    pub role: String,
    /// The node that first used the disk (a reimaged or replaced VM keeps a disk under another name).
    pub first_node: String,
    pub created_unix: i64,
}

/// How the disk was claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No marker: this disk is new to the cluster; the marker was written.
    New,
    /// The marker names this cluster and role.
    Ours,
}

/// The agent's check before it writes anything on a server tier's data disk: the disk (at `dir`) is this
/// cluster's and this role's, or new (then it is marked so). A disk of another cluster or tier (an attach by
/// mistake, a disk reused across deployments) is refused before anything is written or started: its raft data
/// would be joined to the wrong cluster, or its secrets spooled where they do not belong.
pub fn claim(
    dir: &Path,
    cluster: &str,
    role: &str,
    node: &str,
    owner: &crate::files::Owner,
    now_unix: i64,
) -> Result<Claim, DiskError> {
    let path = dir.join(MARKER);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let m: Marker = serde_json::from_slice(&bytes).map_err(|e| DiskError::BadMarker {
                dir: dir.to_path_buf(),
                detail: e.to_string(),
            })?;
            if m.cluster == cluster && m.role == role {
                Ok(Claim::Ours)
            } else {
                Err(DiskError::OtherCluster(Box::new(OtherClusterDisk {
                    dir: dir.to_path_buf(),
                    found_cluster: m.cluster,
                    found_role: m.role,
                    found_node: m.first_node,
                    cluster: cluster.into(),
                    role: role.into(),
                })))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let m = Marker {
                format: 1,
                cluster: cluster.into(),
                role: role.into(),
                first_node: node.into(),
                created_unix: now_unix,
            };
            crate::files::write_atomic(&crate::files::FileSpec {
                path: path.clone(),
                content: serde_json::to_vec_pretty(&m).expect("marker serialises"),
                mode: 0o644,
                owner: owner.clone(),
                secret: false,
            })
            .map_err(|e| DiskError::Command {
                what: "write marker",
                path,
                detail: e.to_string(),
            })?;
            Ok(Claim::New)
        }
        Err(e) => Err(io("read marker", &path)(e)),
    }
}

/// The real thing: `blkid`, `mkfs.ext4`, `mount` (found on `PATH` unless given as paths).
#[derive(Debug, Clone)]
pub struct SystemDevices {
    pub blkid: PathBuf,
    pub mkfs: PathBuf,
    pub mount: PathBuf,
    /// Deadline for one command.
    pub timeout: Duration,
}

impl Default for SystemDevices {
    fn default() -> Self {
        SystemDevices {
            blkid: "blkid".into(),
            mkfs: "mkfs.ext4".into(),
            mount: "mount".into(),
            timeout: Duration::from_secs(600),
        }
    }
}

impl SystemDevices {
    async fn run(
        &self,
        what: &'static str,
        bin: &Path,
        args: &[&std::ffi::OsStr],
    ) -> Result<std::process::Output, DiskError> {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(self.timeout, cmd.output()).await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) => Err(DiskError::Command {
                what,
                path: bin.to_path_buf(),
                detail: e.to_string(),
            }),
            Err(_) => Err(DiskError::Command {
                what,
                path: bin.to_path_buf(),
                detail: format!("no answer within {}s", self.timeout.as_secs()),
            }),
        }
    }
}

fn first_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The offset of the first non-zero byte in the first and in the last [`ZERO_CHECK_BYTES`] of `path`.
pub fn first_nonzero(path: &Path) -> Result<Option<u64>, DiskError> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let size = f.seek(SeekFrom::End(0)).map_err(io("size of", path))?;
    let mut buf = vec![0u8; ZERO_CHECK_BYTES.min(size) as usize];
    for start in [0, size.saturating_sub(ZERO_CHECK_BYTES)] {
        f.seek(SeekFrom::Start(start)).map_err(io("seek", path))?;
        f.read_exact(&mut buf).map_err(io("read", path))?;
        if let Some(i) = buf.iter().position(|&b| b != 0) {
            return Ok(Some(start + i as u64));
        }
    }
    Ok(None)
}

/// Parses `blkid -p -o export` (KEY=value lines).
pub fn parse_blkid_export(text: &str) -> Content {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    if let Some(pt_type) = get("PTTYPE") {
        return Content::PartitionTable { pt_type };
    }
    match get("TYPE") {
        Some(fs_type) => Content::Filesystem {
            fs_type,
            label: get("LABEL"),
            uuid: get("UUID"),
        },
        None => Content::Unrecognised {
            detail: format!(
                "signatures blkid reports without a type ({})",
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
        },
    }
}

#[async_trait::async_trait]
impl BlockDevices for SystemDevices {
    async fn probe(&self, device: &Path) -> Result<Content, DiskError> {
        let o = self
            .run(
                "blkid",
                &self.blkid,
                &[
                    "-p".as_ref(),
                    "-o".as_ref(),
                    "export".as_ref(),
                    device.as_os_str(),
                ],
            )
            .await?;
        match o.status.code() {
            Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&o.stdout))),
            // 2: nothing found. Belt and braces: the device must also read as zeros at both ends (this also
            // makes an unreadable device an error, never "blank").
            Some(2) => match first_nonzero(device)? {
                None => Ok(Content::Blank),
                Some(at) => Ok(Content::Unrecognised {
                    detail: format!(
                        "data blkid does not recognise (a non-zero byte at offset {at})"
                    ),
                }),
            },
            // 8: ambivalent result, several signatures.
            Some(8) => Ok(Content::Unrecognised {
                detail: format!("several conflicting signatures ({})", first_line(&o.stderr)),
            }),
            _ => Err(DiskError::Command {
                what: "blkid -p",
                path: device.to_path_buf(),
                detail: format!("{} {}", o.status, first_line(&o.stderr)),
            }),
        }
    }

    async fn mkfs(&self, device: &Path, label: &str) -> Result<(), DiskError> {
        // Never -F: mke2fs itself refuses (asks, and stdin is /dev/null) a device with a filesystem on it.
        let o = self
            .run(
                "mkfs.ext4",
                &self.mkfs,
                &[
                    "-q".as_ref(),
                    "-L".as_ref(),
                    label.as_ref(),
                    device.as_os_str(),
                ],
            )
            .await?;
        if !o.status.success() {
            return Err(DiskError::Command {
                what: "mkfs.ext4",
                path: device.to_path_buf(),
                detail: format!(
                    "{} {}",
                    o.status,
                    first_line(&[o.stderr.as_slice(), o.stdout.as_slice()].concat())
                ),
            });
        }
        Ok(())
    }

    async fn mount(&self, device: &Path, at: &Path) -> Result<(), DiskError> {
        let o = self
            .run(
                "mount",
                &self.mount,
                &[
                    "-t".as_ref(),
                    FS_TYPE.as_ref(),
                    "-o".as_ref(),
                    MOUNT_OPTIONS.as_ref(),
                    device.as_os_str(),
                    at.as_os_str(),
                ],
            )
            .await?;
        if !o.status.success() {
            return Err(DiskError::Command {
                what: "mount",
                path: device.to_path_buf(),
                detail: format!("{} {}", o.status, first_line(&o.stderr)),
            });
        }
        Ok(())
    }

    fn mounted(&self, at: &Path) -> Result<Option<u64>, DiskError> {
        mount_point_dev(at)
    }

    fn device_id(&self, device: &Path) -> Result<u64, DiskError> {
        let m = std::fs::metadata(device).map_err(io("stat", device))?;
        if !m.file_type().is_block_device() {
            return Err(DiskError::Command {
                what: "device",
                path: device.to_path_buf(),
                detail: "is not a block device".into(),
            });
        }
        Ok(m.rdev())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod marker {
        use super::super::*;
        use crate::files::Owner;

        #[test]
        fn a_new_disk_is_claimed_and_then_ours_at_every_boot() {
            let d = tempfile::tempdir().unwrap();
            let c =
                |node: &str| claim(d.path(), "prod", "vault-server", node, &Owner::Current, 100);
            assert_eq!(c("vault-0").unwrap(), Claim::New);
            let m: Marker =
                serde_json::from_slice(&std::fs::read(d.path().join(MARKER)).unwrap()).unwrap();
            assert_eq!(
                (m.cluster.as_str(), m.role.as_str(), m.first_node.as_str()),
                ("prod", "vault-server", "vault-0")
            );
            // A reimaged or replaced VM (another name) keeps using it.
            assert_eq!(c("vault-7").unwrap(), Claim::Ours);
        }

        #[test]
        fn a_disk_of_another_cluster_or_tier_is_refused_and_left_as_it_is() {
            let d = tempfile::tempdir().unwrap();
            claim(
                d.path(),
                "prod",
                "vault-server",
                "vault-0",
                &Owner::Current,
                1,
            )
            .unwrap();
            let before = std::fs::read(d.path().join(MARKER)).unwrap();
            for (cluster, role) in [("staging", "vault-server"), ("prod", "consul-server")] {
                let e = claim(d.path(), cluster, role, "n", &Owner::Current, 2).unwrap_err();
                let line = e.to_string();
                assert!(matches!(e, DiskError::OtherCluster(_)), "{line}");
                assert!(line.contains("cluster prod's vault-server tier"), "{line}");
                assert!(
                    line.contains(&format!("this node is {role} in cluster {cluster}")),
                    "{line}"
                );
                assert!(line.contains("Next step"), "{line}");
                assert!(!line.contains('\n'), "one line: {line}");
            }
            assert_eq!(std::fs::read(d.path().join(MARKER)).unwrap(), before);
        }

        #[test]
        fn an_unreadable_marker_is_refused() {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(MARKER), b"{not json").unwrap();
            let e = claim(d.path(), "prod", "vault-server", "n", &Owner::Current, 1).unwrap_err();
            assert!(matches!(e, DiskError::BadMarker { .. }), "{e}");
            assert_eq!(std::fs::read(d.path().join(MARKER)).unwrap(), b"{not json");
        }
    }
    use std::sync::Mutex;

    /// A disk in memory: what it holds, whether it is mounted, and a log of the calls.
    struct Fake {
        content: Mutex<Content>,
        mounted: Mutex<Option<u64>>,
        calls: Mutex<Vec<&'static str>>,
    }

    const DEV: u64 = 0x0820;

    impl Fake {
        fn new(c: Content) -> Self {
            Fake {
                content: Mutex::new(c),
                mounted: Mutex::new(None),
                calls: Mutex::new(vec![]),
            }
        }
        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl BlockDevices for Fake {
        async fn probe(&self, _: &Path) -> Result<Content, DiskError> {
            self.calls.lock().unwrap().push("probe");
            Ok(self.content.lock().unwrap().clone())
        }
        async fn mkfs(&self, _: &Path, label: &str) -> Result<(), DiskError> {
            self.calls.lock().unwrap().push("mkfs");
            *self.content.lock().unwrap() = Content::Filesystem {
                fs_type: "ext4".into(),
                label: Some(label.into()),
                uuid: Some("u".into()),
            };
            Ok(())
        }
        async fn mount(&self, _: &Path, _: &Path) -> Result<(), DiskError> {
            self.calls.lock().unwrap().push("mount");
            *self.mounted.lock().unwrap() = Some(DEV);
            Ok(())
        }
        fn mounted(&self, _: &Path) -> Result<Option<u64>, DiskError> {
            Ok(*self.mounted.lock().unwrap())
        }
        fn device_id(&self, _: &Path) -> Result<u64, DiskError> {
            Ok(DEV)
        }
    }

    fn ours() -> Content {
        Content::Filesystem {
            fs_type: "ext4".into(),
            label: Some(LABEL.into()),
            uuid: Some("1".into()),
        }
    }

    async fn run(f: &Fake) -> Result<Prepared, DiskError> {
        let dir = tempfile::tempdir().unwrap();
        // Any existing path stands for the device: the fake does not read it.
        prepare(
            f,
            dir.path(),
            &dir.path().join("mnt"),
            Duration::from_secs(1),
            &Site::default(),
        )
        .await
    }

    #[tokio::test]
    async fn a_blank_disk_is_formatted_then_mounted() {
        let f = Fake::new(Content::Blank);
        assert_eq!(run(&f).await.unwrap().action, Action::FormattedAndMounted);
        assert_eq!(f.calls(), ["probe", "mkfs", "probe", "mount"]);
    }

    #[tokio::test]
    async fn our_disk_is_mounted_and_never_formatted() {
        let f = Fake::new(ours());
        assert_eq!(run(&f).await.unwrap().action, Action::Mounted);
        assert_eq!(f.calls(), ["probe", "mount"]);
        // Again in the same boot: nothing to do.
        assert_eq!(run(&f).await.unwrap().action, Action::AlreadyMounted);
        assert_eq!(f.calls(), ["probe", "mount"]);
    }

    #[tokio::test]
    async fn foreign_content_is_refused_and_nothing_is_written() {
        for c in [
            Content::PartitionTable {
                pt_type: "gpt".into(),
            },
            Content::Filesystem {
                fs_type: "ext4".into(),
                label: Some("backup".into()),
                uuid: None,
            },
            Content::Filesystem {
                fs_type: "xfs".into(),
                label: Some(LABEL.into()),
                uuid: None,
            },
            Content::Filesystem {
                fs_type: "ext4".into(),
                label: None,
                uuid: None,
            },
            Content::Unrecognised {
                detail: "data blkid does not recognise (a non-zero byte at offset 7)".into(),
            },
        ] {
            let f = Fake::new(c.clone());
            let e = run(&f).await.unwrap_err();
            assert!(matches!(e, DiskError::Foreign { .. }), "{c:?}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("refusing to format") && msg.contains("wipefs --all"),
                "{msg}"
            );
            assert!(!msg.contains('\n'));
            assert_eq!(f.calls(), ["probe"], "{c:?}: only probed");
            assert_eq!(*f.content.lock().unwrap(), c);
        }
    }

    #[tokio::test]
    async fn a_missing_disk_names_the_next_step() {
        let f = Fake::new(Content::Blank);
        let site = Site {
            role: "consul-server".into(),
            resource_group: "rg1".into(),
            scale_set: "hs-consul".into(),
            vm: "hs-consul_4".into(),
        };
        let e = prepare(
            &f,
            Path::new("/nonexistent/lun0"),
            Path::new("/nonexistent/mnt"),
            Duration::from_millis(300),
            &site,
        )
        .await
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DiskError::Missing { .. }), "{msg}");
        assert!(
            msg.contains("no device at /nonexistent/lun0")
                && msg.contains("az vmss update-instances -g rg1 -n hs-consul --instance-ids 4")
                && msg.contains("systemctl restart hashistack-data.service"),
            "{msg}"
        );
        assert!(f.calls().is_empty());
    }

    #[tokio::test]
    async fn another_mount_at_the_mount_point_is_refused() {
        let f = Fake::new(ours());
        *f.mounted.lock().unwrap() = Some(DEV + 1);
        let e = run(&f).await.unwrap_err();
        assert!(matches!(e, DiskError::OtherMount { .. }), "{e}");
        assert!(f.calls().is_empty());
    }

    #[test]
    fn blkid_export_is_parsed() {
        assert!(parse_blkid_export(
            "DEVNAME=/dev/sdc\nLABEL=hashistack-data\nUUID=ab\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n"
        )
        .is_ours());
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/sdc\nPTUUID=x\nPTTYPE=gpt\n"),
            Content::PartitionTable {
                pt_type: "gpt".into()
            }
        );
        assert!(!parse_blkid_export("TYPE=ext4\nLABEL=other\n").is_ours());
        // LABEL_FATBOOT must not be read as LABEL.
        assert!(!parse_blkid_export("TYPE=vfat\nLABEL_FATBOOT=hashistack-data\n").is_ours());
    }

    #[test]
    fn not_a_mount_point_is_reported_for_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_mounted(dir.path(), "vault-server")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not mounted") && e.contains("journalctl -b -u hashistack-data.service"),
            "{e}"
        );
        // `/proc` is a mount point on every Linux machine.
        check_mounted(Path::new("/proc"), "vault-server").unwrap();
    }
}
