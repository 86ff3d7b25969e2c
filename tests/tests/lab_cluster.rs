//! End-to-end: real agents configure real Consul 1.8.7 and OpenBao servers from fake-IMDS tags.

use hashistack_agent::node::TAG_ROLE;
use hashistack_agent::services::health::Probe;
use hashistack_e2e::{healthy_lab, inits, options, tree_digest};
use hashistack_lab::lab::{NodeDef, IMDS_PORT};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consul_and_three_vault_servers_come_up_from_tags() {
    // Without the bootstrap, as the agent-core issue defined it: Vault servers up and not initialized.
    let mut o = options("cluster", 81);
    o.bootstrap = false;
    let lab = healthy_lab(o).await;
    let h = lab.health().await;
    // One leader that every agent (servers and the vault nodes' clients) agrees on, with 3 raft voters.
    let leader = h.consul_leader().expect("agreed leader");
    assert!(
        leader.starts_with("127.81.0.1"),
        "leader is a consul server: {leader}"
    );
    for n in h.nodes.iter().filter(|n| n.role == "consul-server") {
        assert_eq!(n.raft_peers, Some(3), "{}", n.name);
    }
    // Vault servers run from rendered configs, sealed and not initialized (the bootstrap initializes them).
    let vaults: Vec<_> = h.nodes.iter().filter_map(|n| n.vault.clone()).collect();
    assert_eq!(vaults.len(), 3);
    assert!(
        vaults.iter().all(|v| *v
            == Probe::Vault {
                initialized: false,
                sealed: true
            }),
        "{vaults:?}"
    );

    for (i, n) in lab.nodes.iter().enumerate() {
        let rec = lab.boot_record(i).expect("boot record");
        assert!(
            rec.ok && rec.last_error.is_none(),
            "{}: {:?}",
            n.def.name,
            rec.last_error
        );
        // Plain HTTP is off (the health probes above went over HTTPS, trusting only the cluster CA).
        assert!(std::net::TcpStream::connect_timeout(
            &format!("{}:8500", n.def.ip).parse().unwrap(),
            Duration::from_millis(300)
        )
        .is_err());
    }
    // Gossip is encrypted: an agent without the key is refused by the servers.
    let rogue_dir = lab.opts.state_dir.join("rogue");
    let log = lab.opts.state_dir.join("rogue.log");
    let mut rogue = std::process::Command::new(&lab.tools.consul)
        .args([
            "agent",
            "-data-dir",
            rogue_dir.to_str().unwrap(),
            "-bind",
            "127.81.0.98",
            "-client",
            "127.81.0.98",
            "-node",
            "rogue",
        ])
        .args([
            "-http-port",
            "-1",
            "-dns-port",
            "-1",
            "-retry-join",
            "127.81.0.11",
        ])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("Remote state is encrypted and encryption is not configured")
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = rogue.kill();
    let _ = rogue.wait();
    assert!(
        refused,
        "an unencrypted agent was not refused:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboots_are_idempotent() {
    // Every role: Consul, Vault and Nomad servers, a worker and the jumpbox.
    let mut o = options("reboot", 82);
    o.nomad_servers = 1;
    o.workers = 1;
    let mut lab = healthy_lab(o).await;
    let etc: Vec<_> = lab
        .nodes
        .iter()
        .map(|n| tree_digest(&n.root.join("etc")))
        .collect();
    let rounds: u32 = std::env::var("REBOOT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for round in 0..rounds {
        for i in 0..lab.nodes.len() {
            lab.reboot(i).await.unwrap();
        }
        for i in 0..lab.nodes.len() {
            lab.wait_booted(i, Duration::from_secs(60)).await.unwrap();
        }
        if let Err((e, h)) = lab.wait_healthy(Duration::from_secs(120)).await {
            panic!("round {round}: {e}\n{}", h.table());
        }
        for (i, n) in lab.nodes.iter().enumerate() {
            let now = tree_digest(&n.root.join("etc"));
            let diff: Vec<_> = now
                .iter()
                .filter(|(k, v)| etc[i].get(*k) != Some(v))
                .map(|(k, _)| k)
                .collect();
            assert!(
                diff.is_empty() && now.len() == etc[i].len(),
                "round {round}: {} config changed on reboot: {diff:?}",
                n.def.name
            );
            let rec = lab.boot_record(i).unwrap();
            assert!(
                rec.files_changed.is_empty(),
                "{}: rewrote {:?}",
                n.def.name,
                rec.files_changed
            );
        }
    }
    for tier in ["consul", "vault", "nomad"] {
        let st = lab.tier_state(tier).await.unwrap();
        assert_eq!(
            inits(&st),
            1,
            "{tier} bootstrapped once across {rounds} reboots"
        );
    }
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_bad_role_tag_fails_clearly_and_starts_nothing() {
    let mut lab = healthy_lab(options("badtag", 83)).await;
    let mut def = lab.nodes[0].def.clone();
    def.name = "stray-0".into();
    def.ip = lab.opts.ip(99);
    for t in def.tags.iter_mut() {
        if t.0 == TAG_ROLE {
            t.1 = "consul-sever".into();
        }
    }
    let i = lab.add_node(NodeDef { ..def }).await.unwrap();
    lab.start_agent(i).unwrap();
    let agent = lab.nodes[i].agent.as_mut().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), agent.child.wait())
        .await
        .expect("agent exits")
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let log = agent.log_tail(5);
    assert!(
        log.contains("hashistack-role") && log.contains("consul-sever"),
        "{log}"
    );
    let root = &lab.nodes[i].root;
    assert!(!root.join("etc/consul.d").exists(), "nothing rendered");
    assert!(
        !root.join("var/lib/hashistack/pids").exists(),
        "nothing started"
    );
    let rec = lab.boot_record(i).expect("failure is recorded for status");
    assert!(!rec.ok);
    assert!(rec.last_error.unwrap().contains("hashistack-role"));
    assert_eq!(IMDS_PORT, 16925);
    lab.down().await;
}
