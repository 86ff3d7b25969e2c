//! End-to-end: workers and the jumpbox never hold the cluster CA key, yet their Consul and Nomad agents run
//! with TLS certificates that chain to the cluster CA; and only the jumpbox identity can read the status tokens.
//!
//! Lab: 3 Consul servers, 1 Vault server, 1 Nomad server, 2 workers and the jumpbox, all booted at once.

use hashistack_agent::material;
use hashistack_agent::services::health::{self, Probe};
use hashistack_agent::services::Health;
use hashistack_e2e::{files_containing, healthy_lab, jumpbox_status, options};
use hashistack_lab::imds::lab_token_for;
use hashistack_lab::keyvault::{principals, SERVERS_VAULT, SHARED_VAULT, STATUS_VAULT};
use hashistack_lab::Lab;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// GET one secret from vault `vault` of the Key Vault double as principal `oid`; returns the HTTP status.
async fn get_secret_as(lab: &Lab, vault: &str, name: &str, oid: &str) -> u16 {
    let kv = lab.keyvault.as_ref().expect("Key Vault double");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = lab_token_for("https://vault.azure.net", oid, now, 600);
    let url = format!(
        "{}secrets/{name}?api-version=7.5",
        kv.vault(vault).expect("vault").url()
    );
    lab.https()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("Key Vault double answers")
        .status()
        .as_u16()
}

/// A distinctive line of a PEM body (what any copy of the key on disk would contain, raw or JSON-escaped).
fn pem_needle(pem: &str) -> String {
    pem.lines()
        .find(|l| !l.starts_with("-----") && l.len() >= 40)
        .expect("a PEM body line")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_jumpbox_run_tls_without_the_ca_key() {
    let mut o = options("workers", 70);
    o.vault_servers = 1;
    o.nomad_servers = 1;
    o.workers = 2;
    o.jumpbox = Some(true);
    let lab = healthy_lab(o).await;
    let kv = lab.keyvault.as_ref().unwrap();
    // Every tier finished its configuration, the 1-server Vault tier included (no autopilot note: dead-server
    // cleanup is not configured below 3 servers, where OpenBao refuses it).
    for tier in ["consul", "vault", "nomad"] {
        let st = lab.tier_state(tier).await.unwrap();
        assert_eq!(
            st.phase,
            hashistack_agent::coordination::TierPhase::Done,
            "{tier}"
        );
        assert_eq!(st.message, None, "{tier}: {:?}", st.message);
    }
    let names = material::names(&lab.opts.cluster);

    // The CA key exists only in the servers vault.
    let ca_key = kv
        .vault(SERVERS_VAULT)
        .unwrap()
        .secret_value(&names.ca_key)
        .expect("the CA key in the servers vault");
    for n in names.shared() {
        assert!(
            kv.vault(SHARED_VAULT).unwrap().secret_value(n).is_some(),
            "{n} in the shared vault"
        );
    }
    assert!(kv
        .vault(SHARED_VAULT)
        .unwrap()
        .secret_value(&names.ca_key)
        .is_none());

    // No worker or jumpbox identity ever asked the servers vault for anything.
    let strays: Vec<_> = kv
        .vault(SERVERS_VAULT)
        .unwrap()
        .served()
        .into_iter()
        .filter(|s| {
            matches!(
                s.principal.as_deref(),
                Some(principals::WORKERS | principals::JUMPBOX)
            )
        })
        .collect();
    assert!(strays.is_empty(), "servers vault served {strays:?}");

    // Only workers read the Nomad client key (the jumpbox runs no Nomad, servers have their own certificates).
    let key_readers: Vec<_> = kv
        .vault(SHARED_VAULT)
        .unwrap()
        .served()
        .into_iter()
        .filter(|s| {
            s.method == "GET" && s.path.contains(&names.nomad_client_key) && s.status == 200
        })
        .filter_map(|s| s.principal)
        .collect();
    assert!(
        !key_readers.is_empty() && key_readers.iter().all(|p| p == principals::WORKERS),
        "Nomad client key read by {key_readers:?}"
    );

    // …and could not if they tried (the role assignments of the ARM template, modelled by the double).
    for oid in [principals::WORKERS, principals::JUMPBOX] {
        assert_eq!(
            get_secret_as(&lab, SERVERS_VAULT, &names.ca_key, oid).await,
            403,
            "{oid} reading the CA key"
        );
    }
    assert_eq!(
        get_secret_as(&lab, SERVERS_VAULT, &names.ca_key, principals::CONSUL).await,
        200
    );

    // Status tokens: the jumpbox reads them, workers cannot, servers may only write them.
    use hashistack_agent::status::tokens::{CONSUL_SECRET, NOMAD_SECRET, VAULT_SECRET};
    for secret in [CONSUL_SECRET, VAULT_SECRET, NOMAD_SECRET] {
        assert_eq!(
            get_secret_as(&lab, STATUS_VAULT, secret, principals::JUMPBOX).await,
            200,
            "jumpbox reads {secret}"
        );
        for oid in [principals::WORKERS, principals::CONSUL, principals::NOMAD] {
            assert_eq!(
                get_secret_as(&lab, STATUS_VAULT, secret, oid).await,
                403,
                "{oid} reading {secret}"
            );
        }
        assert!(
            kv.vault(SHARED_VAULT)
                .unwrap()
                .secret_value(secret)
                .is_none(),
            "{secret} is not in the shared vault every node reads"
        );
    }

    // Nothing on a worker's or the jumpbox's disk holds the CA key; a Consul server's does (its built-in
    // Connect CA signs the auto-encrypt certificates with it), which shows the search would find it.
    let needle = vec![pem_needle(&ca_key)];
    for n in &lab.nodes {
        let found = files_containing(&n.root, &needle, &[]);
        match n.def.role.to_string().as_str() {
            "worker" | "jumpbox" => {
                assert!(found.is_empty(), "{}: CA key in {found:?}", n.def.name)
            }
            // Its config file, Consul's own raft state (the CA configuration is replicated there), and the
            // material the agent keeps for a warm boot (0600; Consul servers only: docs/trust-model.md#warm-boots).
            "consul-server" => {
                assert!(
                    found.contains(&n.root.join("etc/consul.d/connect-ca.json")),
                    "{}: {found:?}",
                    n.def.name
                );
                let kept =
                    hashistack_agent::warm::path(&hashistack_agent::render::Layout::new(&n.root));
                assert!(
                    found
                        .iter()
                        .all(|p| p.starts_with(n.root.join("etc/consul.d"))
                            || p.starts_with(n.root.join("var/lib/hashistack-data/consul"))
                            || *p == kept),
                    "{}: {found:?}",
                    n.def.name
                );
            }
            _ => assert!(found.is_empty(), "{}: CA key in {found:?}", n.def.name),
        }
    }

    let cluster_ca = lab.cluster_ca().expect("cluster CA");
    let client_cert = kv
        .vault(SHARED_VAULT)
        .unwrap()
        .secret_value(&names.nomad_client_cert)
        .unwrap();
    for n in lab
        .nodes
        .iter()
        .filter(|n| matches!(n.def.role.to_string().as_str(), "worker" | "jumpbox"))
    {
        let consul_tls = n.root.join("etc/consul.d/tls");
        // Consul: no certificate or key on disk — auto-encrypt — yet its HTTPS API verifies against the
        // cluster CA for the node's address.
        assert!(
            !consul_tls.join("consul-key.pem").exists(),
            "{}",
            n.def.name
        );
        assert!(!consul_tls.join("consul.pem").exists(), "{}", n.def.name);
        assert_eq!(
            std::fs::read_to_string(consul_tls.join("ca.pem"))
                .unwrap()
                .trim(),
            cluster_ca.trim()
        );
        let probe = health::probe(
            &Health::ConsulHttps {
                addr: format!("{}:8501", n.def.ip),
                ca_file: consul_tls.join("ca.pem"),
            },
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(probe, Probe::Leader { .. }),
            "{}: {probe:?}",
            n.def.name
        );
        // Nomad (workers): the one shared client certificate from the shared vault.
        if n.def.role.to_string() == "worker" {
            assert_eq!(
                std::fs::read_to_string(n.root.join("etc/nomad.d/tls/nomad.pem"))
                    .unwrap()
                    .trim(),
                client_cert.trim(),
                "{}",
                n.def.name
            );
        }
    }

    // The operator's view on the jumpbox: both workers are Consul members and ready Nomad clients. Consul's
    // autopilot reports the servers unhealthy for ~10 s after the cluster forms, so status may say DEGRADED
    // for a moment first; and a worker joins Consul only once it has the agent token (it looks every 0.5 s),
    // which can be a moment after the tiers are healthy (seen: healthy with worker-1 still `absent`).
    let workers_alive = |text: &str| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return false;
        };
        v["nodes"].as_array().is_some_and(|nodes| {
            ["worker-0", "worker-1"].iter().all(|w| {
                nodes
                    .iter()
                    .any(|n| n["name"] == *w && n["member"] == "alive")
            })
        })
    };
    let start = std::time::Instant::now();
    let (mut code, mut text) = jumpbox_status(&lab).await;
    while (code != 0 || !workers_alive(&text)) && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        (code, text) = jumpbox_status(&lab).await;
    }
    assert_eq!(code, 0, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for w in ["worker-0", "worker-1"] {
        let node = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == w)
            .unwrap_or_else(|| panic!("{w} in status: {text}"));
        assert_eq!(node["member"], "alive", "{w}: {text}");
        assert_eq!(node["ok"], true, "{w}: {text}");
    }

    // The operator without sudo (azureuser on Azure; `nobody` here): the product directories are closed to
    // them, the jumpbox's operator directory is not, and status gives the same verdict as root's.
    let j = lab.jumpbox().unwrap();
    let jroot = &lab.nodes[j].root;
    let operator = jroot.join("etc/hashistack/operator");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&jroot.join("etc/consul.d/tls")),
        0o750,
        "the test needs a closed product directory"
    );
    assert_eq!(mode(&operator), 0o755);
    assert_eq!(
        std::fs::read_to_string(operator.join("ca.pem"))
            .unwrap()
            .trim(),
        cluster_ca.trim()
    );
    for (f, vars) in [
        ("ca.pem", &[][..]),
        ("consul.env", &["CONSUL_HTTP_ADDR", "CONSUL_CACERT"][..]),
        ("vault.env", &["VAULT_ADDR", "VAULT_CACERT"][..]),
        ("nomad.env", &["NOMAD_CACERT"][..]),
    ] {
        assert_eq!(mode(&operator.join(f)), 0o644, "{f}");
        let text = std::fs::read_to_string(operator.join(f)).unwrap();
        for v in vars {
            assert!(text.contains(&format!("export {v}='")), "{f}: {text}");
        }
    }
    let as_nobody = |args: &[&str]| {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.args(args);
        c.env("NO_COLOR", "1");
        // Their own home, as an operator has (the CLIs read ~/.bao and the like).
        c.env("HOME", std::env::temp_dir());
        c.output().expect("setpriv")
    };
    let denied = as_nobody(&[
        "cat",
        &jroot.join("etc/consul.d/tls/ca.pem").to_string_lossy(),
    ]);
    assert!(
        !denied.status.success(),
        "nobody can read Consul's directory: the test proves nothing"
    );
    // The Consul CLI, with only the operator environment, reaches the jumpbox's agent over verified HTTPS
    // (`catalog datacenters` needs no token).
    let consul = std::env::var("HASHISTACK_CONSUL").unwrap_or_else(|_| "consul".into());
    let sh = format!(
        ". '{}' && exec '{consul}' catalog datacenters",
        operator.join("consul.env").display()
    );
    let cli = as_nobody(&["sh", "-c", &sh]);
    assert_eq!(
        String::from_utf8_lossy(&cli.stdout).trim(),
        "dc1",
        "consul CLI with consul.env: {}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // Vault through its load balancer (the lab's stands in for the template's internal one): the address is
    // in vault.env and in Vault's certificate, so a client that trusts only the cluster CA verifies it, and
    // the LB forwards to the active node only (sys/health answers 200 there alone).
    let vault_env = std::fs::read_to_string(operator.join("vault.env")).unwrap();
    let lb = lab.opts.vault_address();
    assert!(
        vault_env.contains(&format!("export VAULT_ADDR='{lb}'")),
        "{vault_env}"
    );
    // The LB probes its backends every second (lb::PROBE_INTERVAL, as Azure's probe has an interval): right
    // after Vault became active it may not have found it yet and refuses the connection; asked again for a few
    // probe intervals.
    let client = health::client_for(&operator.join("ca.pem"), Duration::from_secs(5)).unwrap();
    let start = std::time::Instant::now();
    let via_lb = loop {
        match client.get(format!("{lb}/v1/sys/health")).send().await {
            Ok(r) => break r,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("{lb}: {e}; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{lb} with the cluster CA: {e:?}"),
        }
    };
    assert_eq!(
        via_lb.status().as_u16(),
        200,
        "the LB forwards to the active node"
    );
    let bao = std::env::var("HASHISTACK_BAO").unwrap_or_else(|_| "bao".into());
    let sh = format!(
        ". '{}' && exec '{bao}' status -format=json",
        operator.join("vault.env").display()
    );
    let cli = as_nobody(&["sh", "-c", &sh]);
    let status: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap_or_else(|_| {
        panic!(
            "bao status with vault.env: {} {}",
            String::from_utf8_lossy(&cli.stdout),
            String::from_utf8_lossy(&cli.stderr)
        )
    });
    assert_eq!(status["initialized"], true, "{status}");
    assert_eq!(status["sealed"], false, "{status}");

    let agent = lab.tools.agent.to_string_lossy().into_owned();
    let config = lab.nodes[j].config_path.to_string_lossy().into_owned();
    let start = std::time::Instant::now();
    let mut o = as_nobody(&[&agent, "status", "--config", &config, "--json"]);
    while !o.status.success() && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        o = as_nobody(&[&agent, "status", "--config", &config, "--json"]);
    }
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "status as nobody: exit {:?}\n{text}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["verdict"], "healthy", "{text}");
    lab.down().await;
}
