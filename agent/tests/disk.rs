//! The server tiers' data disk, against the real tools: `blkid -p` and `mkfs.ext4` on file-backed images
//! (no privileges needed), the whole `prepare` (probe, format only when blank, mount) on loop devices when this
//! machine allows them (root and `losetup`; otherwise that test says so and stops), and the `disk prepare` and
//! `boot` commands' decisions and messages with a fake IMDS.

mod common;

use common::{agent_command, imds_fixture, start, text, Reply, Script};
use hashistack_agent::disk::{self, Action, BlockDevices, Content, DiskError, Site, SystemDevices};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib * MIB).unwrap();
    p
}

fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    let o = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

fn digest(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A DOS (MBR) partition table with one Linux partition, written byte by byte (no partitioning tool needed).
fn partition(path: &Path) {
    let size = std::fs::metadata(path).unwrap().len() / 512;
    let mut entry = vec![0u8, 0, 0, 0, 0x83, 0, 0, 0];
    entry.extend_from_slice(&2048u32.to_le_bytes());
    entry.extend_from_slice(&((size - 2048) as u32).to_le_bytes());
    write_at(path, 446, &entry);
    write_at(path, 510, &[0x55, 0xaa]);
}

#[tokio::test]
async fn file_images_probe_as_blank_ours_or_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let devs = SystemDevices::default();

    let blank = image(dir.path(), "blank.img", 16);
    assert_eq!(devs.probe(&blank).await.unwrap(), Content::Blank);
    // Formatting a blank image makes it ours.
    devs.mkfs(&blank, disk::LABEL).await.unwrap();
    assert!(devs.probe(&blank).await.unwrap().is_ours());

    // Another label, another filesystem type, a partition table: all foreign.
    let other = image(dir.path(), "other.img", 16);
    sh(
        "mkfs.ext4",
        &["-q", "-L", "backup", other.to_str().unwrap()],
    );
    let c = devs.probe(&other).await.unwrap();
    assert!(
        matches!(&c, Content::Filesystem { label: Some(l), .. } if l == "backup"),
        "{c:?}"
    );
    assert!(!c.is_ours());
    let ext2 = image(dir.path(), "ext2.img", 16);
    sh(
        "mkfs.ext2",
        &["-q", "-L", disk::LABEL, ext2.to_str().unwrap()],
    );
    let c = devs.probe(&ext2).await.unwrap();
    assert!(!c.is_ours(), "our label on ext2 is not ours: {c:?}");
    let mbr = image(dir.path(), "mbr.img", 16);
    partition(&mbr);
    assert_eq!(
        devs.probe(&mbr).await.unwrap(),
        Content::PartitionTable {
            pt_type: "dos".into()
        }
    );

    // No signature blkid knows, but data: at the start, and in the last MiB (where a GPT keeps its backup).
    for (name, offset) in [("start.img", 4096), ("end.img", 16 * MIB - 10)] {
        let p = image(dir.path(), name, 16);
        write_at(&p, offset, b"\x01data");
        let c = devs.probe(&p).await.unwrap();
        assert!(
            matches!(&c, Content::Unrecognised { detail } if detail.contains(&format!("offset {offset}"))),
            "{name}: {c:?}"
        );
    }
    // Something unreadable is an error, never "blank".
    let e = devs
        .probe(&dir.path().join("absent.img"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, DiskError::Io { .. } | DiskError::Command { .. }),
        "{e}"
    );
}

/// A loop device over an image file, detached (and unmounted) on drop.
struct Loop {
    dev: PathBuf,
    mounted: Option<PathBuf>,
}

impl Loop {
    fn attach(img: &Path) -> Loop {
        let o = sh("losetup", &["--find", "--show", img.to_str().unwrap()]);
        Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
            mounted: None,
        }
    }
    fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            sh("umount", &[m.to_str().unwrap()]);
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Loop devices need root and a kernel that offers them; this sandbox may not.
fn loop_devices_available() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let free = Command::new("losetup")
        .arg("-f")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !(root && free) {
        eprintln!(
            "SKIPPED: loop devices are not available here (root: {root}, `losetup -f` works: {free}); \
             file_images_probe_as_blank_ours_or_foreign covers probing and formatting without them"
        );
    }
    root && free
}

#[tokio::test]
async fn prepare_on_loop_devices_formats_only_blank_disks_and_keeps_data() {
    if !loop_devices_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let devs = SystemDevices::default();
    let site = Site::default();
    let mnt = dir.path().join("root/var/lib/hashistack-data");
    let wait = Duration::from_secs(2);

    // A blank disk: formatted, mounted.
    let img = image(dir.path(), "data.img", 64);
    let mut lo = Loop::attach(&img);
    // The stable path is a link to the device, as /dev/disk/azure/scsi1/lun0 is.
    let link = dir.path().join("lun0");
    std::os::unix::fs::symlink(&lo.dev, &link).unwrap();
    let p = disk::prepare(&devs, &link, &mnt, wait, &site)
        .await
        .unwrap();
    lo.mounted = Some(mnt.clone());
    assert_eq!(p.action, Action::FormattedAndMounted);
    assert_eq!(p.resolved, lo.dev);
    assert!(disk::mount_point_dev(&mnt).unwrap().is_some());
    std::fs::create_dir_all(mnt.join("consul/raft")).unwrap();
    std::fs::write(mnt.join("consul/raft/raft.db"), b"term 7").unwrap();
    // Run again in the same boot: nothing to do.
    let p = disk::prepare(&devs, &link, &mnt, wait, &site)
        .await
        .unwrap();
    assert_eq!(p.action, Action::AlreadyMounted);

    // Ours, after a "reimage" (unmounted, OS disk replaced): mounted, not formatted, data kept.
    lo.umount();
    let uuid_before = devs.probe(&lo.dev).await.unwrap();
    let p = disk::prepare(&devs, &link, &mnt, wait, &site)
        .await
        .unwrap();
    lo.mounted = Some(mnt.clone());
    assert_eq!(p.action, Action::Mounted);
    assert_eq!(
        std::fs::read(mnt.join("consul/raft/raft.db")).unwrap(),
        b"term 7"
    );
    assert_eq!(
        devs.probe(&lo.dev).await.unwrap(),
        uuid_before,
        "same filesystem"
    );
    drop(lo);

    // Foreign disks: another filesystem with data, a partition table, unrecognised bytes. Refused, the
    // image is byte for byte unchanged and nothing is mounted.
    let foreign = image(dir.path(), "foreign.img", 64);
    sh(
        "mkfs.ext4",
        &["-q", "-L", "backup", foreign.to_str().unwrap()],
    );
    let mbr = image(dir.path(), "mbr.img", 64);
    partition(&mbr);
    let junk = image(dir.path(), "junk.img", 64);
    write_at(&junk, 100, b"\x42");
    for (img, what) in [
        (&foreign, "ext4 filesystem labelled \"backup\""),
        (&mbr, "a dos partition table"),
        (&junk, "a non-zero byte at offset 100"),
    ] {
        let before = digest(img);
        let lo = Loop::attach(img);
        let link = dir.path().join("lun0-foreign");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lo.dev, &link).unwrap();
        let e = disk::prepare(&devs, &link, &mnt, wait, &site)
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DiskError::Foreign { .. }), "{msg}");
        assert!(
            msg.contains(what) && msg.contains("refusing to format"),
            "{msg}"
        );
        assert!(
            disk::mount_point_dev(&mnt).unwrap().is_none(),
            "nothing mounted"
        );
        drop(lo);
        assert_eq!(digest(img), before, "{what}: nothing written");
    }

    // A missing disk: a clear error after the wait, nothing created.
    let e = disk::prepare(&devs, &dir.path().join("lun0-absent"), &mnt, wait, &site)
        .await
        .unwrap_err();
    assert!(matches!(e, DiskError::Missing { .. }), "{e}");
}

fn imds_script(doc: serde_json::Value) -> std::sync::Arc<Script> {
    let body = doc.to_string();
    // A scale set without userData answers it empty (Azure: 200 with no body).
    Script::new(move |_, seen| {
        if seen.path().contains("userData") {
            Reply::Ok(String::new())
        } else {
            Reply::Ok(body.clone())
        }
    })
}

fn config(dir: &Path, endpoint: &str, root: &Path, disk: &str) -> PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[imds]\nendpoint = \"{endpoint}\"\ndeadline_secs = 20\n\
             [paths]\nroot = \"{}\"\nowners = \"current-user\"\n\
             [services]\nbackend = \"process\"\nconsul_bin = \"/nonexistent/consul\"\n\
             vault_bin = \"/nonexistent/vault\"\nnomad_bin = \"/nonexistent/nomad\"\n\
             [disk]\n{disk}\n",
            root.display()
        ),
    )
    .unwrap();
    cfg
}

async fn run(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut cmd = tokio::process::Command::from(agent_command(args));
    cmd.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("agent finishes")
        .expect("run agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_prepare_acts_on_server_tiers_only_and_names_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let absent = dir.path().join("no-such-lun0");
    let device = format!("device = \"{}\"\nwait_secs = 1", absent.display());

    // Workers and the jumpbox have no data disk: nothing happens.
    for role in ["worker", "jumpbox"] {
        let endpoint = start(imds_script(imds_fixture(role))).await;
        let cfg = config(dir.path(), &endpoint, root.path(), &device);
        let o = run(&[
            "disk".as_ref(),
            "prepare".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ])
        .await;
        assert!(o.status.success(), "{role}: {}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains("has no data disk: nothing to do"),
            "{role}"
        );
    }
    // A server tier without its disk: exit 1, one line saying exactly what to do.
    let endpoint = start(imds_script(imds_fixture("consul-server"))).await;
    let cfg = config(dir.path(), &endpoint, root.path(), &device);
    let o = run(&[
        "disk".as_ref(),
        "prepare".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("no device at {}", absent.display()))
            && err.contains("this consul-server")
            && err.contains(
                "az vmss update-instances -g rg-hashistack-prod -n hs-consul --instance-ids 0"
            )
            && err.contains("systemctl restart hashistack-data.service hashistack-agent.service"),
        "{err}"
    );
    assert!(
        !root.path().join("var").exists(),
        "nothing created: {:?}",
        common::walk(root.path())
    );
    // The lab's setting: the data disk is a directory, nothing to do (IMDS is not even asked).
    let cfg = config(
        dir.path(),
        "http://127.0.0.1:9",
        root.path(),
        "mode = \"directory\"",
    );
    let o = run(&[
        "disk".as_ref(),
        "prepare".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_on_a_server_tier_without_its_data_disk_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    for role in ["consul-server", "vault-server-akv", "nomad-server"] {
        let endpoint = start(imds_script(imds_fixture(role))).await;
        let cfg = config(dir.path(), &endpoint, root.path(), "");
        let o = run(&["boot".as_ref(), "--config".as_ref(), cfg.as_os_str()]).await;
        assert_eq!(o.status.code(), Some(1), "{role}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.contains("/var/lib/hashistack-data is not mounted")
                && err.contains("journalctl -b -u hashistack-data.service"),
            "{role}: {err}"
        );
        // Only the failure record, which names the phase.
        let written: Vec<String> = common::walk(root.path())
            .into_iter()
            .filter(|e| !e.dir)
            .map(|e| e.rel)
            .collect();
        assert_eq!(written, ["var/lib/hashistack/boot.json"], "{role}");
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.path().join("var/lib/hashistack/boot.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["phase"], "disk", "{role}");
        assert_eq!(rec["ok"], false);
    }
}
