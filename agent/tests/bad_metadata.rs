//! The bad-metadata suite: IMDS documents broken one way each, run end to end through the real binary.
//!
//! For every case, `hashistack-agent render --metadata <doc> --out <dir>` and `hashistack-agent boot` (against
//! a local IMDS serving the document) must exit 2 with exactly one stderr line naming the tag or field, and
//! write nothing (boot leaves only its failure record, var/lib/hashistack/boot.json).

mod common;

use common::{
    agent_command, imds_fixture, push_tag, remove_tag, run_agent, set_ip, set_tag, start, text,
    walk, Reply, Script,
};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

enum Doc {
    /// A good fixture with one edit.
    Edit(&'static str, fn(&mut Value)),
    /// Raw bytes served/written as the document.
    Raw(&'static str),
}

struct Case {
    name: &'static str,
    doc: Doc,
    /// Every one of these must appear in the error line.
    names: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    use Doc::*;
    vec![
        Case {
            name: "missing role",
            doc: Edit("consul-server", |d| remove_tag(d, "hashistack-role")),
            names: &["hashistack-role", "missing"],
        },
        Case {
            name: "unknown role",
            doc: Edit("consul-server", |d| {
                set_tag(d, "hashistack-role", "consul-sever")
            }),
            names: &["hashistack-role", "consul-sever"],
        },
        Case {
            name: "empty role",
            doc: Edit("consul-server", |d| set_tag(d, "hashistack-role", "  ")),
            names: &["hashistack-role", "empty"],
        },
        Case {
            name: "missing cluster",
            doc: Edit("worker", |d| remove_tag(d, "hashistack-cluster")),
            names: &["hashistack-cluster", "missing"],
        },
        Case {
            name: "bad cluster name",
            doc: Edit("worker", |d| set_tag(d, "hashistack-cluster", "Prod_1")),
            names: &["hashistack-cluster", "Prod_1"],
        },
        Case {
            name: "cluster name too long",
            doc: Edit("jumpbox", |d| {
                set_tag(
                    d,
                    "hashistack-cluster",
                    "a-cluster-name-that-is-far-too-long",
                )
            }),
            names: &["hashistack-cluster", "longer than 32"],
        },
        Case {
            name: "bad datacenter",
            doc: Edit("jumpbox", |d| {
                set_tag(d, "hashistack-datacenter", "East US")
            }),
            names: &["hashistack-datacenter", "[a-z0-9-_]"],
        },
        Case {
            name: "unknown hashistack tag (typo)",
            doc: Edit("consul-server", |d| {
                push_tag(d, "hashistack-consul-jion", "10.0.0.1")
            }),
            names: &["hashistack-consul-jion", "unknown"],
        },
        Case {
            name: "duplicated tag",
            doc: Edit("consul-server", |d| {
                push_tag(d, "hashistack-cluster", "other")
            }),
            names: &["hashistack-cluster", "twice"],
        },
        Case {
            name: "missing consul join",
            doc: Edit("jumpbox", |d| remove_tag(d, "hashistack-consul-join")),
            names: &["hashistack-consul-join", "missing"],
        },
        Case {
            name: "malformed join IP",
            doc: Edit("vault-server-transit", |d| {
                set_tag(d, "hashistack-consul-join", "127.0.0.31 127.0.0.300")
            }),
            names: &["hashistack-consul-join", "127.0.0.300"],
        },
        Case {
            name: "azure join missing vm_scale_set",
            doc: Edit("consul-server", |d| {
                set_tag(
                    d,
                    "hashistack-consul-join",
                    "provider=azure resource_group=rg-hashistack-prod",
                )
            }),
            names: &["hashistack-consul-join", "vm_scale_set"],
        },
        Case {
            name: "join word without key=value",
            doc: Edit("nomad-server", |d| {
                set_tag(d, "hashistack-nomad-join", "provider=azure hs-nomad")
            }),
            names: &["hashistack-nomad-join", "key=value"],
        },
        Case {
            name: "server count 2",
            doc: Edit("consul-server", |d| {
                set_tag(d, "hashistack-consul-servers", "2")
            }),
            names: &["hashistack-consul-servers", "\"2\""],
        },
        Case {
            name: "server count 0",
            doc: Edit("vault-server-akv", |d| {
                set_tag(d, "hashistack-vault-servers", "0")
            }),
            names: &["hashistack-vault-servers", "\"0\""],
        },
        Case {
            name: "server count three",
            doc: Edit("nomad-server", |d| {
                set_tag(d, "hashistack-nomad-servers", "three")
            }),
            names: &["hashistack-nomad-servers", "three"],
        },
        Case {
            name: "missing server count",
            doc: Edit("consul-server", |d| {
                remove_tag(d, "hashistack-consul-servers")
            }),
            names: &["hashistack-consul-servers", "missing"],
        },
        Case {
            name: "vault-server missing seal",
            doc: Edit("vault-server-transit", |d| {
                remove_tag(d, "hashistack-vault-seal")
            }),
            names: &["hashistack-vault-seal", "missing"],
        },
        Case {
            name: "unknown seal type",
            doc: Edit("vault-server-akv", |d| {
                set_tag(d, "hashistack-vault-seal", "awskms kms_key_id=abc")
            }),
            names: &["hashistack-vault-seal", "awskms"],
        },
        Case {
            name: "azurekeyvault seal without tenant id",
            doc: Edit("vault-server-akv", |d| {
                remove_tag(d, "hashistack-tenant-id")
            }),
            names: &["hashistack-tenant-id", "missing"],
        },
        Case {
            name: "azurekeyvault seal with a bad tenant id",
            doc: Edit("vault-server-akv", |d| {
                set_tag(d, "hashistack-tenant-id", "contoso.onmicrosoft.com")
            }),
            names: &["hashistack-tenant-id", "GUID"],
        },
        Case {
            name: "transit seal missing key_name",
            doc: Edit("vault-server-transit", |d| {
                set_tag(
                    d,
                    "hashistack-vault-seal",
                    "transit address=http://127.0.0.2:8200 mount_path=transit/",
                )
            }),
            names: &["hashistack-vault-seal", "key_name"],
        },
        Case {
            name: "transit seal address not a URL",
            doc: Edit("vault-server-transit", |d| {
                set_tag(
                    d,
                    "hashistack-vault-seal",
                    "transit address=127.0.0.2:8200 key_name=k mount_path=transit/",
                )
            }),
            names: &["hashistack-vault-seal", "address"],
        },
        Case {
            name: "seal setting given twice",
            doc: Edit("vault-server-akv", |d| {
                set_tag(
                    d,
                    "hashistack-vault-seal",
                    "azurekeyvault vault_name=a key_name=b key_name=c",
                )
            }),
            names: &["hashistack-vault-seal", "key_name"],
        },
        Case {
            name: "bad client id GUID",
            doc: Edit("worker", |d| {
                set_tag(
                    d,
                    "hashistack-identity-client-id",
                    "3c1d5e7f-9a2b-4c6d-8e0f",
                )
            }),
            names: &["hashistack-identity-client-id", "GUID"],
        },
        // Required tags that were once silently optional: a server tier without them skipped its whole
        // bootstrap and exited 0.
        Case {
            name: "server tier without blob endpoint",
            doc: Edit("consul-server", |d| {
                remove_tag(d, "hashistack-blob-endpoint")
            }),
            names: &["hashistack-blob-endpoint", "missing"],
        },
        Case {
            name: "server tier without escrow vault",
            doc: Edit("vault-server-transit", |d| {
                remove_tag(d, "hashistack-escrow-vault-uri")
            }),
            names: &["hashistack-escrow-vault-uri", "missing"],
        },
        Case {
            name: "server tier without status vault",
            doc: Edit("nomad-server", |d| {
                remove_tag(d, "hashistack-status-vault-uri")
            }),
            names: &["hashistack-status-vault-uri", "missing"],
        },
        Case {
            name: "jumpbox without status vault",
            doc: Edit("jumpbox", |d| remove_tag(d, "hashistack-status-vault-uri")),
            names: &["hashistack-status-vault-uri", "missing"],
        },
        Case {
            name: "worker without blob endpoint",
            doc: Edit("worker", |d| remove_tag(d, "hashistack-blob-endpoint")),
            names: &["hashistack-blob-endpoint", "missing"],
        },
        Case {
            name: "vault address on a consul server",
            doc: Edit("consul-server", |d| {
                set_tag(d, "hashistack-vault-address", "https://10.42.2.10:8200")
            }),
            names: &[
                "hashistack-vault-address",
                "does not apply to role consul-server",
            ],
        },
        Case {
            name: "nomad address on a worker",
            doc: Edit("worker", |d| {
                set_tag(d, "hashistack-nomad-address", "https://10.42.3.10:4646")
            }),
            names: &["hashistack-nomad-address", "does not apply to role worker"],
        },
        Case {
            name: "http nomad address",
            doc: Edit("vault-server-akv", |d| {
                set_tag(d, "hashistack-nomad-address", "http://10.42.3.10:4646")
            }),
            names: &["hashistack-nomad-address", "https"],
        },
        Case {
            name: "http blob endpoint",
            doc: Edit("consul-server", |d| {
                set_tag(
                    d,
                    "hashistack-blob-endpoint",
                    "http://hsprodx2f.blob.core.windows.net/",
                )
            }),
            names: &["hashistack-blob-endpoint", "https"],
        },
        Case {
            name: "key vault URI without host",
            doc: Edit("jumpbox", |d| {
                set_tag(d, "hashistack-keyvault-uri", "https:///")
            }),
            names: &["hashistack-keyvault-uri"],
        },
        Case {
            name: "missing private IP",
            doc: Edit("consul-server", |d| {
                d.pointer_mut("/network/interface/0/ipv4/ipAddress")
                    .unwrap()
                    .as_array_mut()
                    .unwrap()
                    .clear()
            }),
            names: &["privateIpAddress", "missing"],
        },
        Case {
            name: "no network interface",
            doc: Edit("worker", |d| {
                d["network"]["interface"] = Value::Array(vec![]);
            }),
            names: &["privateIpAddress", "missing"],
        },
        Case {
            name: "non-IPv4 private IP",
            doc: Edit("consul-server", |d| set_ip(d, "fd00:20:1::4")),
            names: &["privateIpAddress", "fd00:20:1::4"],
        },
        Case {
            name: "missing computer name",
            doc: Edit("nomad-server", |d| {
                d["compute"]["osProfile"]
                    .as_object_mut()
                    .unwrap()
                    .remove("computerName");
            }),
            names: &["compute.osProfile.computerName", "missing"],
        },
        Case {
            name: "invalid computer name",
            doc: Edit("nomad-server", |d| {
                d["compute"]["osProfile"]["computerName"] = Value::from("hs nomad/2");
            }),
            names: &["compute.osProfile.computerName", "DNS label"],
        },
        Case {
            name: "seal tag on a consul-server",
            doc: Edit("consul-server", |d| {
                set_tag(
                    d,
                    "hashistack-vault-seal",
                    "azurekeyvault vault_name=a key_name=b",
                )
            }),
            names: &["hashistack-vault-seal", "does not apply", "consul-server"],
        },
        Case {
            name: "nomad server count on a worker",
            doc: Edit("worker", |d| set_tag(d, "hashistack-nomad-servers", "3")),
            names: &["hashistack-nomad-servers", "does not apply", "worker"],
        },
        Case {
            name: "consul server count on a vault-server",
            doc: Edit("vault-server-akv", |d| {
                set_tag(d, "hashistack-consul-servers", "3")
            }),
            names: &["hashistack-consul-servers", "does not apply"],
        },
        Case {
            name: "body not JSON",
            doc: Raw("<html><body>upstream connect error</body></html>"),
            names: &["instance metadata", "JSON"],
        },
        Case {
            name: "truncated JSON",
            doc: Raw("{\"compute\": {\"name\": \"hs-consul_0\", \"tagsList\": ["),
            names: &["instance metadata", "JSON"],
        },
    ]
}

fn document(doc: &Doc) -> Vec<u8> {
    match doc {
        Doc::Edit(base, edit) => {
            let mut v = imds_fixture(base);
            edit(&mut v);
            serde_json::to_vec_pretty(&v).unwrap()
        }
        Doc::Raw(s) => s.as_bytes().to_vec(),
    }
}

/// The one error line, checked for shape and content.
fn check_stderr(case: &Case, how: &str, stderr: &[u8]) -> String {
    let s = text(stderr);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{how} [{}]: stderr must be exactly one line, got {s:?}",
        case.name
    );
    let line = lines[0];
    assert!(
        line.starts_with("hashistack-agent: "),
        "{how} [{}]: {line}",
        case.name
    );
    for n in case.names {
        assert!(
            line.contains(n),
            "{how} [{}]: error line must name {n:?}: {line}",
            case.name
        );
    }
    line.to_string()
}

#[test]
fn there_are_at_least_fifteen_cases_and_the_fixtures_are_good() {
    assert!(cases().len() >= 15);
    // Every base fixture renders cleanly, so each failure below comes from its one edit.
    for base in common::ROLE_FIXTURES {
        let out = tempfile::tempdir().unwrap();
        let o = run_agent([
            "render".as_ref(),
            "--metadata".as_ref(),
            common::imds_fixture_path(base).as_os_str(),
            "--out".as_ref(),
            out.path().as_os_str(),
            "--consul-version".as_ref(),
            "1.20.0".as_ref(),
            "--vault-version".as_ref(),
            "1.18.0".as_ref(),
            "--nomad-version".as_ref(),
            "1.9.0".as_ref(),
        ]);
        assert!(o.status.success(), "{base}: {}", text(&o.stderr));
        assert!(!walk(out.path()).is_empty());
    }
}

#[test]
fn render_rejects_bad_metadata_with_one_line_and_writes_nothing() {
    for case in cases() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("imds.json");
        std::fs::write(&md, document(&case.doc)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let o = run_agent([
            "render".as_ref(),
            "--metadata".as_ref(),
            md.as_os_str(),
            "--out".as_ref(),
            out.path().as_os_str(),
            "--consul-version".as_ref(),
            "1.8.7".as_ref(),
        ]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "render [{}]: exit code; stderr {}",
            case.name,
            text(&o.stderr)
        );
        check_stderr(&case, "render", &o.stderr);
        assert!(
            o.stdout.is_empty(),
            "render [{}]: nothing listed: {}",
            case.name,
            text(&o.stdout)
        );
        assert_eq!(
            walk(out.path()),
            vec![],
            "render [{}]: --out must stay empty",
            case.name
        );
    }
}

fn boot_config(dir: &Path, endpoint: &str, root: &Path) -> std::path::PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[imds]\nendpoint = \"{endpoint}\"\ndeadline_secs = 20\n\
             [paths]\nroot = \"{}\"\nowners = \"current-user\"\n\
             [services]\nbackend = \"process\"\nconsul_bin = \"/nonexistent/consul\"\n\
             vault_bin = \"/nonexistent/vault\"\nnomad_bin = \"/nonexistent/nomad\"\n\
             [disk]\nmode = \"directory\"\n\
             [tls]\nca_cert = \"{0}/ca.pem\"\nca_key = \"{0}/ca-key.pem\"\n",
            root.display()
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_rejects_bad_metadata_with_one_line_and_writes_only_its_record() {
    for case in cases() {
        let body = text(&document(&case.doc));
        let script = Script::new(move |_, _| Reply::Ok(body.clone()));
        let endpoint = start(script.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let cfg = boot_config(dir.path(), &endpoint, root.path());

        let mut cmd = tokio::process::Command::from(agent_command([
            "boot".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ]));
        cmd.kill_on_drop(true);
        let o = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("boot [{}] did not finish", case.name))
            .expect("run boot");
        assert_eq!(
            o.status.code(),
            Some(2),
            "boot [{}]: exit code; stderr {}",
            case.name,
            text(&o.stderr)
        );
        let line = check_stderr(&case, "boot", &o.stderr);
        // One instance-metadata request (bad input is final). A failed boot still tries to publish its
        // record (docs/status.md), which may ask IMDS for a storage token: that is not a retry.
        let instance = script
            .seen()
            .iter()
            .filter(|s| s.path() == "/metadata/instance")
            .count();
        assert_eq!(
            instance, 1,
            "boot [{}]: one instance-metadata request",
            case.name
        );

        // Only the failure record; no /etc, /opt, certificates or keys.
        let entries: Vec<String> = walk(root.path())
            .into_iter()
            .filter(|e| !e.dir)
            .map(|e| e.rel)
            .collect();
        assert_eq!(
            entries,
            vec!["var/lib/hashistack/boot.json".to_string()],
            "boot [{}]: only the boot record is written",
            case.name
        );
        assert!(
            !root.path().join("etc").exists() && !root.path().join("opt").exists(),
            "boot [{}]: no /etc or /opt",
            case.name
        );
        let rec: Value = serde_json::from_slice(
            &std::fs::read(root.path().join("var/lib/hashistack/boot.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["ok"], false, "boot [{}]: {rec}", case.name);
        let err = rec["last_error"].as_str().expect("last_error recorded");
        assert!(
            line.ends_with(err),
            "boot [{}]: the record holds the same error as stderr: {err:?} vs {line:?}",
            case.name
        );
        for n in case.names {
            assert!(err.contains(n), "boot [{}]: record names {n:?}", case.name);
        }
        let phase = rec["phase"].as_str().unwrap();
        assert!(
            phase == "node-spec" || phase == "metadata",
            "boot [{}]: phase {phase}",
            case.name
        );
    }
}

/// Tags are a control channel: a blob endpoint or a vault tag pointing outside the cloud's own domains stops the
/// boot with one line naming the tag, and nothing — not even the failure record's publish, which would carry a
/// storage token — reaches that host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_tag_off_the_clouds_domains_gets_no_token() {
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = collector.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let accept = tokio::spawn(async move {
        while let Ok((_s, _)) = collector.accept().await {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    for (tag, doc_name) in [
        ("hashistack-blob-endpoint", "consul-server"),
        ("hashistack-escrow-vault-uri", "vault-server-akv"),
        ("hashistack-keyvault-uri", "worker"),
    ] {
        let mut doc = imds_fixture(doc_name);
        set_tag(&mut doc, tag, &format!("https://127.0.0.1:{port}/"));
        let body = text(&serde_json::to_vec(&doc).unwrap());
        let script = Script::new(move |_, _| Reply::Ok(body.clone()));
        let endpoint = start(script.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let cfg = boot_config(dir.path(), &endpoint, root.path());
        let mut cmd = tokio::process::Command::from(agent_command([
            "boot".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ]));
        cmd.kill_on_drop(true);
        let o = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("boot finishes")
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{tag}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{tag}: one line: {err}");
        assert!(
            lines[0].contains(tag) && lines[0].contains("domain"),
            "{tag}: {err}"
        );
        // With a bad blob endpoint the failure record is not published at all: no token is even asked for.
        // (With a good one it is published there, to the cloud's own storage.)
        if tag == "hashistack-blob-endpoint" {
            let tokens = script
                .seen()
                .iter()
                .filter(|s| s.path().contains("identity/oauth2/token"))
                .count();
            assert_eq!(tokens, 0, "{tag}: no managed-identity token was asked for");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the collector got a connection"
    );
    accept.abort();
}
