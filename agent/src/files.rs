//! Atomic, idempotent file writes with explicit modes and owners.
//!
//! A write goes to a 0600 temp file in the target directory, is fsynced, gets its final owner and mode, is
//! renamed over the target, and the directory is fsynced. A file whose content, mode and owner already match
//! is not touched at all (re-rendering the same inputs changes nothing, not even mtimes).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Who should own a file. `Current` leaves ownership to the running user (the lab, offline renders).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Current,
    Named { user: String, group: String },
}

impl Owner {
    pub fn named(user: &str, group: &str) -> Owner {
        Owner::Named {
            user: user.into(),
            group: group.into(),
        }
    }
}

/// One file the agent wants on disk.
#[derive(Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    pub owner: Owner,
    /// Holds key material: never printed, and left out of offline renders.
    pub secret: bool,
}

impl std::fmt::Debug for FileSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSpec")
            .field("path", &self.path)
            .field("bytes", &self.content.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .field("owner", &self.owner)
            .field("secret", &self.secret)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirSpec {
    pub path: PathBuf,
    pub mode: u32,
    pub owner: Owner,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: owner {who} does not exist on this machine")]
    NoSuchOwner { path: PathBuf, who: String },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Resolves an owner to (uid, gid); `None` for the current user.
pub fn resolve(owner: &Owner, path: &Path) -> Result<Option<(u32, u32)>, FileError> {
    match owner {
        Owner::Current => Ok(None),
        Owner::Named { user, group } => {
            let u = nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .ok_or_else(|| FileError::NoSuchOwner {
                    path: path.to_owned(),
                    who: format!("user {user}"),
                })?;
            let g = nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .ok_or_else(|| FileError::NoSuchOwner {
                    path: path.to_owned(),
                    who: format!("group {group}"),
                })?;
            Ok(Some((u.uid.as_raw(), g.gid.as_raw())))
        }
    }
}

/// Creates a directory (and parents, 0755 root-owned where missing) with the given mode and owner.
pub fn ensure_dir(d: &DirSpec) -> Result<bool, FileError> {
    let ids = resolve(&d.owner, &d.path)?;
    let mut changed = false;
    if !d.path.is_dir() {
        if let Some(parent) = d.path.parent() {
            fs::create_dir_all(parent).map_err(io(parent, "create directory"))?;
        }
        fs::create_dir(&d.path).map_err(io(&d.path, "create directory"))?;
        changed = true;
    }
    let meta = fs::metadata(&d.path).map_err(io(&d.path, "stat"))?;
    if meta.mode() & 0o7777 != d.mode {
        fs::set_permissions(&d.path, fs::Permissions::from_mode(d.mode))
            .map_err(io(&d.path, "chmod"))?;
        changed = true;
    }
    if let Some((uid, gid)) = ids {
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::chown(&d.path, Some(uid), Some(gid))
                .map_err(io(&d.path, "chown"))?;
            changed = true;
        }
    }
    Ok(changed)
}

/// Whether the file on disk already is exactly `f`.
fn up_to_date(f: &FileSpec, ids: Option<(u32, u32)>) -> bool {
    let Ok(meta) = fs::symlink_metadata(&f.path) else {
        return false;
    };
    if !meta.is_file() || meta.mode() & 0o7777 != f.mode || meta.len() != f.content.len() as u64 {
        return false;
    }
    if let Some((uid, gid)) = ids {
        if meta.uid() != uid || meta.gid() != gid {
            return false;
        }
    }
    fs::read(&f.path).map(|c| c == f.content).unwrap_or(false)
}

/// Writes `f` atomically unless it is already up to date. Returns whether anything changed.
pub fn write_atomic(f: &FileSpec) -> Result<bool, FileError> {
    let ids = resolve(&f.owner, &f.path)?;
    if up_to_date(f, ids) {
        return Ok(false);
    }
    let dir = match f.path.parent() {
        // A bare relative name (`--out vault.json`): its directory is the current one.
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => {
            return Err(FileError::Io {
                path: f.path.clone(),
                op: "find parent directory",
                source: std::io::ErrorKind::InvalidInput.into(),
            })
        }
    };
    fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
    let name = f
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io(&tmp, "create temp file"))?;
        file.write_all(&f.content).map_err(io(&tmp, "write"))?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io(&tmp, "chown"))?;
        }
        file.set_permissions(fs::Permissions::from_mode(f.mode))
            .map_err(io(&tmp, "chmod"))?;
        file.sync_all().map_err(io(&tmp, "fsync"))?;
        drop(file);
        fs::rename(&tmp, &f.path).map_err(io(&f.path, "rename into place"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir, "fsync directory"))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|_| true)
}

/// Creates `f` as a new file, never replacing anything: the content goes to a temp file with a random name,
/// created `O_EXCL | O_NOFOLLOW` with mode 0600 in the target directory, fsynced and given its mode and owner, then
/// hard-linked to the target name (which fails if anything, even a dangling symlink, is there) and unlinked. A
/// crash leaves at most the temp file, never a partial target.
pub fn create_new(f: &FileSpec) -> Result<(), FileError> {
    let ids = resolve(&f.owner, &f.path)?;
    let dir = match f.path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => {
            return Err(FileError::Io {
                path: f.path.clone(),
                op: "find parent directory",
                source: std::io::ErrorKind::InvalidInput.into(),
            })
        }
    };
    if fs::symlink_metadata(&f.path).is_ok() {
        return Err(FileError::Io {
            path: f.path.clone(),
            op: "create (refusing to replace an existing file)",
            source: std::io::ErrorKind::AlreadyExists.into(),
        });
    }
    let name = f
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut rnd = [0u8; 12];
    aws_lc_rs::rand::fill(&mut rnd).expect("system RNG");
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(rnd)));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io(&tmp, "create temp file"))?;
        file.write_all(&f.content).map_err(io(&tmp, "write"))?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io(&tmp, "chown"))?;
        }
        file.set_permissions(fs::Permissions::from_mode(f.mode))
            .map_err(io(&tmp, "chmod"))?;
        file.sync_all().map_err(io(&tmp, "fsync"))?;
        drop(file);
        fs::hard_link(&tmp, &f.path)
            .map_err(io(&f.path, "create (refusing to replace an existing file)"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir, "fsync directory"))
    })();
    let _ = fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {

    fn secret_spec(path: &Path, content: &[u8]) -> FileSpec {
        FileSpec {
            path: path.to_path_buf(),
            content: content.to_vec(),
            mode: 0o600,
            owner: Owner::Current,
            secret: true,
        }
    }

    #[test]
    fn create_new_writes_0600_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.json");
        create_new(&secret_spec(&p, b"s3cret")).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"s3cret");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.json")]);
    }

    #[test]
    fn create_new_never_replaces_a_file_or_follows_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let existing = d.path().join("existing");
        fs::write(&existing, b"keep me").unwrap();
        let e = create_new(&secret_spec(&existing, b"new")).unwrap_err();
        assert!(e.to_string().contains("refusing to replace"), "{e}");
        assert_eq!(fs::read(&existing).unwrap(), b"keep me");
        // A symlink planted at the target (even a dangling one) is not written through.
        let target = d.path().join("elsewhere");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_new(&secret_spec(&link, b"new")).is_err());
        assert!(!target.exists(), "nothing written through the symlink");
    }

    #[test]
    fn create_new_temp_names_are_random_not_the_pid() {
        // A predictable temp name (`.<name>.tmp-<pid>`) lets another user plant it first; the temp file must be
        // created with O_EXCL under a fresh random name. Plant the old predictable name as a symlink: a create
        // that used it would follow it or fail.
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        let planted = d
            .path()
            .join(format!(".out.json.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let p = d.path().join("out.json");
        create_new(&secret_spec(&p, b"secret")).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(fs::read(&p).unwrap(), b"secret");
    }

    use super::*;

    fn spec(dir: &Path, content: &str, mode: u32) -> FileSpec {
        FileSpec {
            path: dir.join("a/b.json"),
            content: content.as_bytes().to_vec(),
            mode,
            owner: Owner::Current,
            secret: false,
        }
    }

    #[test]
    fn writes_with_mode_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let f = spec(d.path(), "{}", 0o640);
        assert!(write_atomic(&f).unwrap());
        let m1 = fs::metadata(&f.path).unwrap();
        assert_eq!(m1.mode() & 0o7777, 0o640);
        assert_eq!(fs::read_to_string(&f.path).unwrap(), "{}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!write_atomic(&f).unwrap(), "same input must change nothing");
        let m2 = fs::metadata(&f.path).unwrap();
        assert_eq!(
            (m1.ino(), m1.mtime_nsec()),
            (m2.ino(), m2.mtime_nsec()),
            "file untouched"
        );
        // no temp files left behind
        assert_eq!(fs::read_dir(f.path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn mode_or_content_change_rewrites() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(&spec(d.path(), "{}", 0o640)).unwrap();
        assert!(write_atomic(&spec(d.path(), "{}", 0o600)).unwrap());
        assert!(write_atomic(&spec(d.path(), "{\"a\":1}", 0o600)).unwrap());
        assert_eq!(
            fs::read_to_string(d.path().join("a/b.json")).unwrap(),
            "{\"a\":1}"
        );
    }

    #[test]
    fn missing_owner_is_an_error_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut f = spec(d.path(), "{}", 0o640);
        f.owner = Owner::named("no-such-user-hashistack", "no-such-user-hashistack");
        let e = write_atomic(&f).unwrap_err().to_string();
        assert!(
            e.contains("user no-such-user-hashistack does not exist"),
            "{e}"
        );
        assert!(!f.path.exists());
    }

    #[test]
    fn named_owner_is_applied() {
        // root and its group exist everywhere; as root this exercises chown, elsewhere it must fail cleanly.
        let d = tempfile::tempdir().unwrap();
        let mut f = spec(d.path(), "{}", 0o640);
        f.owner = Owner::named("root", "root");
        if nix::unistd::geteuid().is_root() {
            write_atomic(&f).unwrap();
            assert_eq!(fs::metadata(&f.path).unwrap().uid(), 0);
        }
    }

    #[test]
    fn debug_never_shows_content() {
        let d = tempfile::tempdir().unwrap();
        let f = spec(d.path(), "topsecret", 0o600);
        assert!(!format!("{f:?}").contains("topsecret"));
    }
}
