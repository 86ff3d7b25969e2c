//! The checks themselves: one [`Verifier`] walks a root against a contract and collects every problem.

use super::*;
use crate::retry::{retry_blocking, Attempt, RetryError, RetryPolicy};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};

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

/// Why a version command gave no version line.
#[derive(Debug, thiserror::Error)]
enum VersionError {
    #[error("cannot run: {0}")]
    Spawn(std::io::Error),
    #[error("did not finish within {} s", VERSION_TIMEOUT.as_secs())]
    Timeout,
    #[error("cannot wait for it: {0}")]
    Wait(std::io::Error),
    #[error("exited with {status}{}", said(.line))]
    Exited {
        status: std::process::ExitStatus,
        line: Option<String>,
    },
    #[error("printed nothing, expected a version")]
    Silent,
}

fn said(line: &Option<String>) -> String {
    line.as_ref()
        .map(|l| format!(" saying \"{l}\""))
        .unwrap_or_default()
}

/// The first line a version command prints (stdout, else stderr), or why it failed.
fn run_version(binary: &Path, args: &[String]) -> Result<String, VersionError> {
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
    .map_err(|e| match e {
        RetryError::Final(e) | RetryError::Deadline { last: e, .. } => VersionError::Spawn(e),
    })?;
    let wait = RetryPolicy::poll(VERSION_TIMEOUT, Duration::from_millis(20), Duration::ZERO);
    let status = retry_blocking(wait, |_| match child.try_wait() {
        Ok(Some(status)) => Attempt::Done(status),
        Ok(None) => Attempt::Retry(VersionError::Timeout),
        Err(e) => Attempt::Fail(VersionError::Wait(e)),
    });
    let status = match status {
        Ok(s) => s,
        Err(RetryError::Final(e)) => return Err(e),
        Err(RetryError::Deadline { last, .. }) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(last);
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
        return Err(VersionError::Exited { status, line });
    }
    line.ok_or(VersionError::Silent)
}

/// `None` when `line` satisfies `expect`; otherwise what was expected.
pub(super) fn mismatch(line: &str, expect: &Expect) -> Option<String> {
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
