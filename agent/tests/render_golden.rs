//! Rendering goldens: every role fixture × Consul 1.8.7 (the lab) and 1.20.0 (current), rendered offline by
//! the real binary and compared byte for byte with agent/tests/golden/<case>/tree, plus a manifest of every
//! path and mode (agent/tests/golden/<case>/manifest.txt).
//!
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test -p hashistack-agent --test render_golden`
//! and review the diff.

mod common;

use common::{files, imds_fixture_path, run_agent, text, walk, ROLE_FIXTURES};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const CONSUL_VERSIONS: [&str; 2] = ["1.8.7", "1.20.0"];
const VAULT_VERSION: &str = "1.18.0";
const OPENBAO_VERSION: &str = "openbao-2.7.2";
const NOMAD_VERSION: &str = "1.9.0";

fn golden_root() -> PathBuf {
    common::crate_dir().join("tests/golden")
}

fn updating() -> bool {
    std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1")
}

/// `render` for one fixture and Consul version into `out`; returns stdout lines.
fn render(fixture: &str, consul: &str, vault: &str, out: &Path) -> Vec<String> {
    let o = run_agent([
        "render".as_ref(),
        "--metadata".as_ref(),
        imds_fixture_path(fixture).as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--consul-version".as_ref(),
        consul.as_ref(),
        "--vault-version".as_ref(),
        vault.as_ref(),
        "--nomad-version".as_ref(),
        NOMAD_VERSION.as_ref(),
    ]);
    assert!(
        o.status.success(),
        "render {fixture} consul {consul}: {}",
        text(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "render {fixture}: nothing on stderr: {}",
        text(&o.stderr)
    );
    text(&o.stdout).lines().map(str::to_string).collect()
}

fn manifest(root: &Path) -> String {
    walk(root)
        .iter()
        .map(|e| {
            format!(
                "{} {:04o} {}\n",
                if e.dir { "d" } else { "f" },
                e.mode,
                e.rel
            )
        })
        .collect()
}

/// `(case, fixture, consul version, vault version)`: every role × both Consul syntaxes with HashiCorp Vault, plus
/// the lab's combination for the vault tier (Consul 1.8.7, OpenBao 2.7.2: a declarative audit device).
fn cases() -> Vec<(String, &'static str, &'static str, &'static str)> {
    let mut v = Vec::new();
    for f in ROLE_FIXTURES {
        for c in CONSUL_VERSIONS {
            v.push((format!("{f}-consul-{c}"), f, c, VAULT_VERSION));
        }
    }
    v.push((
        format!("vault-server-transit-consul-1.8.7-{OPENBAO_VERSION}"),
        "vault-server-transit",
        "1.8.7",
        OPENBAO_VERSION,
    ));
    v
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    let (a, b) = (text(a), text(b));
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}: rendered {x:?}, golden {y:?}", i + 1);
        }
    }
    format!(
        "rendered has {} lines, golden {}",
        a.lines().count(),
        b.lines().count()
    )
}

#[test]
fn rendered_trees_match_the_goldens() {
    let mut failures = Vec::new();
    for (case, fixture, consul, vault) in cases() {
        let out = tempfile::tempdir().unwrap();
        render(fixture, consul, vault, out.path());
        let rendered = files(out.path());
        let man = manifest(out.path());
        let gdir = golden_root().join(&case);
        if updating() {
            let _ = std::fs::remove_dir_all(&gdir);
            for (rel, content) in &rendered {
                let p = gdir.join("tree").join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, content).unwrap();
            }
            std::fs::write(gdir.join("manifest.txt"), &man).unwrap();
            eprintln!("updated golden {case}");
            continue;
        }
        let golden = files(&gdir.join("tree"));
        if golden.is_empty() {
            failures.push(format!(
                "{case}: no golden (run with UPDATE_GOLDEN=1 to create it)"
            ));
            continue;
        }
        let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
        if names(&rendered) != names(&golden) {
            failures.push(format!(
                "{case}: files differ: rendered {:?}, golden {:?}",
                names(&rendered),
                names(&golden)
            ));
            continue;
        }
        for (rel, content) in &rendered {
            if content != &golden[rel] {
                failures.push(format!(
                    "{case}: {rel}: {}",
                    first_difference(content, &golden[rel])
                ));
            }
        }
        let gman = std::fs::read_to_string(gdir.join("manifest.txt")).unwrap_or_default();
        if man != gman {
            failures.push(format!(
                "{case}: manifest differs:\n--- rendered\n{man}--- golden\n{gman}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatch(es) (UPDATE_GOLDEN=1 regenerates; review the diff):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn golden_directory_holds_exactly_the_cases() {
    if updating() {
        return;
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(golden_root())
        .expect("agent/tests/golden exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = cases().into_iter().map(|c| c.0).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "stale or missing golden cases");
}

/// What each role renders, and the version-dependent syntax, stated directly (not only via goldens).
#[test]
fn role_products_and_version_syntax() {
    for (case, fixture, consul, vault) in cases() {
        let out = tempfile::tempdir().unwrap();
        render(fixture, consul, vault, out.path());
        let names: Vec<String> = files(out.path()).into_keys().collect();
        // Every node: the resolved drop-in for `.consul` (docs/dns.md); workers: Docker's resolver too.
        let expected: &[&str] = match fixture {
            "consul-server" | "jumpbox" => &[
                "etc/consul.d/consul.json",
                "etc/systemd/resolved.conf.d/consul.conf",
            ],
            "vault-server-transit" | "vault-server-akv" => &[
                "etc/consul.d/consul.json",
                "etc/logrotate.d/vault-audit",
                "etc/systemd/resolved.conf.d/consul.conf",
                "etc/vault.d/vault.json",
            ],
            "worker" => &[
                "etc/consul.d/consul.json",
                "etc/docker/daemon.json",
                "etc/nomad.d/nomad.json",
                "etc/systemd/resolved.conf.d/consul.conf",
            ],
            _ => &[
                "etc/consul.d/consul.json",
                "etc/nomad.d/nomad.json",
                "etc/systemd/resolved.conf.d/consul.conf",
            ],
        };
        assert_eq!(names, expected, "{case}");
        if let Ok(raw) = std::fs::read(out.path().join("etc/vault.d/vault.json")) {
            // OpenBao ≥ 2.4 takes its audit device from the configuration only; HashiCorp Vault from the API.
            let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
            assert_eq!(
                v["audit"][0]["file"]["file"]["options"]["file_path"] == "/var/log/vault/audit.log",
                vault.starts_with("openbao-"),
                "{case}"
            );
            assert_eq!(
                v.get("audit").is_some(),
                vault.starts_with("openbao-"),
                "{case}"
            );
        }

        let c: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.path().join("etc/consul.d/consul.json")).unwrap(),
        )
        .unwrap();
        let server = fixture == "consul-server";
        assert_eq!(c["server"], server, "{case}");
        // Nodes that never hold the CA key take their Consul certificate over auto_encrypt.
        let auto = matches!(fixture, "worker" | "jumpbox");
        assert_eq!(c["auto_encrypt"]["tls"] == true, auto, "{case}");
        assert_eq!(c["auto_encrypt"]["allow_tls"] == true, server, "{case}");
        assert_eq!(c["connect"]["enabled"] == true, server, "{case}");
        let has_cert =
            c.get("cert_file").is_some() || c["tls"]["defaults"].get("cert_file").is_some();
        assert_eq!(
            has_cert, !auto,
            "{case}: certificate files only where the CA issues them"
        );
        assert_eq!(c["acl"]["default_policy"], "deny", "{case}");
        assert_eq!(c["ports"]["http"], -1, "{case}: plain HTTP off");
        // One datacenter (docs/network.md): servers turn the WAN listener off; the NSG does not open 8302.
        if server {
            assert_eq!(c["ports"]["serf_wan"], -1, "{case}: WAN off");
        } else {
            assert!(c["ports"].get("serf_wan").is_none(), "{case}");
        }
        assert_eq!(c["performance"]["raft_multiplier"], 1, "{case}");
        assert_eq!(c["encrypt_verify_incoming"], true, "{case}");
        if consul == "1.8.7" {
            assert!(c.get("tls").is_none(), "{case}: no tls block before 1.12");
            assert_eq!(c["verify_incoming_rpc"], !auto, "{case}");
            assert_eq!(c["verify_server_hostname"], true, "{case}");
            assert!(c["ports"].get("grpc_tls").is_none(), "{case}");
            assert!(c.get("ui_config").is_none(), "{case}");
        } else {
            assert!(c.get("verify_incoming_rpc").is_none(), "{case}");
            assert_eq!(c["tls"]["defaults"]["verify_incoming"], !auto, "{case}");
            assert_eq!(
                c["tls"]["internal_rpc"]["verify_server_hostname"], true,
                "{case}"
            );
            assert_eq!(c["ports"]["grpc_tls"], 8503, "{case}");
            assert!(
                c.get("ui").is_none(),
                "{case}: `ui` is deprecated since 1.9"
            );
        }
    }
}

#[test]
fn rerender_is_byte_identical_and_touches_nothing() {
    for (case, fixture, consul, vault) in cases() {
        let out = tempfile::tempdir().unwrap();
        let first = render(fixture, consul, vault, out.path());
        let tree: Vec<String> = files(out.path()).into_keys().collect();
        assert_eq!(first.len(), tree.len(), "{case}: one line per file");
        for line in &first {
            assert!(
                !line.ends_with("(unchanged)"),
                "{case}: first render: {line}"
            );
            let rel = Path::new(line)
                .strip_prefix(out.path())
                .unwrap_or_else(|_| panic!("{case}: printed path {line} is under --out"));
            assert!(
                tree.contains(&rel.display().to_string()),
                "{case}: {line} exists"
            );
        }
        let stamp = |root: &Path| -> Vec<(String, u64, i64, i64)> {
            walk(root)
                .into_iter()
                .map(|e| {
                    let m = std::fs::metadata(root.join(&e.rel)).unwrap();
                    (e.rel, m.ino(), m.mtime(), m.mtime_nsec())
                })
                .collect()
        };
        let before = stamp(out.path());
        let content_before = files(out.path());
        std::thread::sleep(std::time::Duration::from_millis(20));

        let second = render(fixture, consul, vault, out.path());
        assert_eq!(second.len(), first.len(), "{case}");
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(&format!("{a} (unchanged)"), b, "{case}");
        }
        assert_eq!(
            stamp(out.path()),
            before,
            "{case}: nothing touched (inodes and mtimes)"
        );
        assert_eq!(files(out.path()), content_before, "{case}");
    }
}

#[test]
fn a_changed_input_rewrites_only_the_changed_file() {
    let out = tempfile::tempdir().unwrap();
    render("nomad-server", "1.8.7", VAULT_VERSION, out.path());
    let nomad = out.path().join("etc/nomad.d/nomad.json");
    let ino = std::fs::metadata(&nomad).unwrap().ino();
    let lines = render("nomad-server", "1.20.0", VAULT_VERSION, out.path());
    let consul = out.path().join("etc/consul.d/consul.json");
    assert!(
        lines.contains(&consul.display().to_string()),
        "consul.json rewritten: {lines:?}"
    );
    assert!(
        lines.contains(&format!("{} (unchanged)", nomad.display())),
        "nomad.json untouched: {lines:?}"
    );
    assert_eq!(std::fs::metadata(&nomad).unwrap().ino(), ino);
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&consul).unwrap()).unwrap();
    assert!(c.get("tls").is_some(), "now in 1.20 syntax");
    // No temp files left behind by the rewrite.
    assert!(walk(out.path()).iter().all(|e| !e.rel.contains(".tmp-")));
}

#[test]
fn offline_render_holds_no_key_material() {
    for (case, fixture, consul, vault) in cases() {
        let out = tempfile::tempdir().unwrap();
        render(fixture, consul, vault, out.path());
        for e in walk(out.path()) {
            let name = Path::new(&e.rel).file_name().unwrap().to_string_lossy();
            assert!(name != "gossip.json", "{case}: {}", e.rel);
            assert!(!name.ends_with(".pem"), "{case}: {}", e.rel);
            assert!(!name.ends_with(".env"), "{case}: {}", e.rel);
            assert!(!e.rel.starts_with("etc/hashistack"), "{case}: {}", e.rel);
        }
        for (rel, content) in files(out.path()) {
            let s = text(&content);
            for needle in [
                "PRIVATE KEY",
                "BEGIN CERTIFICATE",
                "VAULT_TOKEN",
                "AZURE_CLIENT_ID",
            ] {
                assert!(!s.contains(needle), "{case}: {rel} contains {needle}");
            }
            if rel.ends_with(".conf") || rel.starts_with("etc/logrotate.d/") {
                continue; // the resolved drop-in and the logrotate rule: not JSON; the needles above hold
            }
            let v: serde_json::Value = serde_json::from_str(&s).expect("JSON");
            fn has_key(v: &serde_json::Value, k: &str) -> bool {
                match v {
                    serde_json::Value::Object(m) => {
                        m.contains_key(k) || m.values().any(|x| has_key(x, k))
                    }
                    serde_json::Value::Array(a) => a.iter().any(|x| has_key(x, k)),
                    _ => false,
                }
            }
            for k in ["encrypt", "token", "client_secret"] {
                assert!(!has_key(&v, k), "{case}: {rel} has key {k}");
            }
        }
    }
}

/// As boot renders at every boot: with key material, a second render keeps the certificates and keys it
/// issued the first time, so nothing changes on disk and no service restarts.
#[test]
fn rerender_with_material_keeps_certificates_and_touches_nothing() {
    use hashistack_agent::render::{self, Layout, RenderOptions};
    for fixture in ROLE_FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let cfg = common::agent_config(dir.path(), root.path(), true, "s.transit-token");
        let vs = common::versions(None, None);
        let (spec, first) = common::render_with_material(&common::imds_fixture(fixture), &cfg, &vs);
        let before = files(root.path());
        // The jumpbox holds no private key at all: its Consul certificate comes over auto_encrypt.
        assert_eq!(
            before.keys().any(|k| k.ends_with("-key.pem")),
            fixture != "jumpbox",
            "{fixture}: keys written"
        );
        // The CA key reaches the disk of Consul servers only (their built-in Connect CA signs auto-encrypt
        // certificates with it); no other role writes it anywhere.
        let ca_key = std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
        let body: String = ca_key.lines().filter(|l| !l.starts_with("-----")).collect();
        let holders: Vec<&String> = before
            .iter()
            // PEM lines joined, whether written raw or as a JSON string (`\n` escapes).
            .filter(|(_, c)| text(c).replace("\\n", "").replace('\n', "").contains(&body))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            !holders.is_empty(),
            fixture == "consul-server",
            "{fixture}: CA key in {holders:?}"
        );
        for f in &first.files {
            if f.secret {
                let mode = std::fs::metadata(&f.path).unwrap().mode() & 0o777;
                assert_eq!(
                    mode & 0o007,
                    0,
                    "{fixture}: {} is not world-readable",
                    f.path.display()
                );
            }
        }

        let layout = Layout::new(root.path());
        let material = hashistack_agent::boot::load_material(&cfg, &spec, &layout, None).unwrap();
        let second = render::render(
            &spec,
            &layout,
            &RenderOptions::from_config(&cfg),
            &vs,
            Some(&material),
        )
        .unwrap();
        let changed = hashistack_agent::boot::write_plan(&second).unwrap();
        assert_eq!(
            changed,
            Vec::<PathBuf>::new(),
            "{fixture}: second boot changes nothing"
        );
        assert_eq!(files(root.path()), before, "{fixture}");
    }
}
