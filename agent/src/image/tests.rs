use super::check::mismatch;
use super::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::os::unix::fs::PermissionsExt;
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
    assert!(unit
        .contains("ExecStart=/usr/sbin/nft -f /etc/hashistack/nftables/hashistack-imds-guard.nft"));
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
    std::os::unix::fs::chown(p(root.path(), "/opt/consul"), Some(4242), Some(NOMAD_UID)).unwrap();
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
    verify(root.path(), &contract().with_version_checks(false)).unwrap_or_else(|f| panic!("{f}"));
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
