//! End-to-end Nomad tier: ACL bootstrap with a `BootstrapSecret` escrowed before use, exactly once among
//! the Nomad servers, recoverable by operators; a leader killed right after the bootstrap call leaves the
//! tier recoverable from the escrow made before the call. Nomad ≥ 1.7 cannot be installed here, so the lab
//! runs the Nomad contract double (lab/src/nomad_double.rs) through `<state_dir>/bin/nomad`; a real `nomad`
//! on PATH is exercised as well when there is one.

use hashistack_agent::bootstrap::CrashPoint;
use hashistack_agent::coordination::TierPhase;
use hashistack_agent::node::Role;
use hashistack_e2e::{escrow_cmd, files_containing, healthy_lab, options, tools};
use hashistack_lab::Lab;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn count_outcome(lab: &Lab, role: Role, outcome: &str) -> usize {
    (0..lab.nodes.len())
        .filter(|&i| lab.nodes[i].def.role == role)
        .filter(|&i| lab.boot_record(i).and_then(|r| r.bootstrap).as_deref() == Some(outcome))
        .count()
}

fn nomad_ips(lab: &Lab) -> Vec<std::net::Ipv4Addr> {
    lab.nodes
        .iter()
        .filter(|n| n.def.role == Role::NomadServer)
        .map(|n| n.def.ip)
        .collect()
}

async fn assert_done_once(lab: &Lab) -> hashistack_agent::coordination::TierState {
    let st = lab
        .tier_state("nomad")
        .await
        .expect("nomad coordination state");
    assert_eq!(st.phase, TierPhase::Done, "{st:?}");
    for target in ["blob", "keyvault"] {
        assert!(
            st.receipts.iter().any(|r| r.target == target),
            "no {target} receipt: {st:?}"
        );
    }
    let inits = st
        .history
        .iter()
        .filter(|(p, _, _)| *p == TierPhase::Initializing)
        .count();
    assert_eq!(inits, 1, "bootstrapped more than once: {:?}", st.history);
    st
}

/// `escrow open --tier nomad` as the operator: the secret, which must authenticate as a management token on
/// every Nomad server.
async fn recovered_secret_works(lab: &Lab, operator: &str) -> String {
    let o = escrow_cmd(lab, operator, &["open", "--tier", "nomad"]);
    assert!(
        o.status.success(),
        "escrow open nomad: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "nomad-acl-bootstrap");
    let secret = v["secret_id"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 36, "a UUID");
    let http = lab.https();
    for ip in nomad_ips(lab) {
        let r = http
            .get(format!("https://{ip}:4646/v1/acl/token/self"))
            .header("X-Nomad-Token", &secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "recovered token on {ip}");
        let t: Value = r.json().await.unwrap();
        assert_eq!(t["Type"], "management");
        assert_eq!(t["SecretID"], secret.as_str());
        // And nobody can bootstrap again.
        let r = http
            .post(format!("https://{ip}:4646/v1/acl/bootstrap"))
            .send()
            .await
            .unwrap();
        let (status, body) = (r.status().as_u16(), r.text().await.unwrap());
        assert!(
            body.contains("ACL bootstrap already done (reset index: "),
            "{ip}: HTTP {status} {body}"
        );
    }
    secret
}

async fn nomad_lab_bootstraps_once(name: &str, net: u8, nomad_bin: Option<PathBuf>) {
    let mut o = options(name, net);
    o.nomad_servers = 3;
    o.nomad_bin = nomad_bin;
    let mut lab = healthy_lab(o).await;
    assert_eq!(count_outcome(&lab, Role::NomadServer, "bootstrapped"), 1);
    assert_eq!(count_outcome(&lab, Role::NomadServer, "already-done"), 2);
    assert_done_once(&lab).await;
    // The other tiers are unaffected.
    assert_eq!(count_outcome(&lab, Role::ConsulServer, "bootstrapped"), 1);
    assert_eq!(count_outcome(&lab, Role::VaultServer, "bootstrapped"), 1);

    // The leader escrowed the secret before it sent it (its log says so, in that order).
    let leader = (0..lab.nodes.len())
        .find(|&i| {
            lab.boot_record(i).and_then(|r| r.bootstrap).as_deref() == Some("bootstrapped")
                && lab.nodes[i].def.role == Role::NomadServer
        })
        .unwrap();
    let log = std::fs::read_to_string(
        lab.opts
            .state_dir
            .join(format!("logs/agent-{}.log", lab.nodes[leader].def.name)),
    )
    .unwrap();
    let before = log
        .find("bootstrap secret escrowed before use")
        .expect("pre-escrow logged");
    let done = log
        .find("bootstrapped and escrowed")
        .expect("bootstrap logged");
    assert!(before < done);

    let operator = lab.operator_imds().await.unwrap();
    let secret = recovered_secret_works(&lab, &operator).await;

    // Every receipt of every tier matches its object.
    let o = escrow_cmd(&lab, &operator, &["verify"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "verify: {out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("ok") && l.contains("nomad"))
            .count(),
        2,
        "{out}"
    );

    // The secret is in no log, record or spool; only in the server's own state (like Nomad's raft data).
    let leaks = files_containing(&lab.opts.state_dir, &[secret], &["/opt/nomad/data"]);
    assert!(leaks.is_empty(), "secret found in {leaks:?}");
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_tier_escrows_before_use_bootstraps_once_and_the_recovered_token_works() {
    nomad_lab_bootstraps_once("nomad", 101, None).await;
}

/// The same against a real `nomad` when one is on PATH (Nomad ≥ 1.7 is not installable here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nomad_when_on_path() {
    let real = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nomad"))
            .find(|p| p.is_file())
    });
    let Some(real) = real else {
        eprintln!("SKIPPED: no `nomad` on PATH; the Nomad tier was tested against the contract double only");
        return;
    };
    eprintln!("testing the Nomad tier against {}", real.display());
    nomad_lab_bootstraps_once("nomad-real", 103, Some(real)).await;
}

/// The leader dies right after `POST /v1/acl/bootstrap` returned (before anything after the call reached
/// the disk). With a secret escrowed before use this is recoverable: another server finds "already done",
/// the recorded escrow holds the token, and it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_after_the_call_is_recovered_from_the_escrow_made_before_use() {
    let mut o = options("nomad-crash-after-init", 102);
    o.nomad_servers = 3;
    o.vault_servers = 0;
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    let nomad: Vec<usize> = (0..lab.nodes.len())
        .filter(|&i| lab.nodes[i].def.role == Role::NomadServer)
        .collect();
    // Every other node boots normally.
    for i in 0..lab.nodes.len() {
        if lab.nodes[i].def.role != Role::NomadServer {
            lab.start_agent(i).unwrap();
        }
    }
    // Every Nomad server would crash after its call: only the lease holder makes one.
    for &i in &nomad {
        let mut cfg = lab.node_config(i);
        cfg.faults.crash_at = Some(CrashPoint::AfterInit);
        lab.write_node_config(i, &cfg).unwrap();
        lab.start_agent(i).unwrap();
    }
    let start = Instant::now();
    let dead = 'found: loop {
        for &i in &nomad {
            if let Ok(Some(status)) = lab.nodes[i].agent.as_mut().unwrap().child.try_wait() {
                assert_eq!(status.code(), None, "killed by a signal");
                break 'found i;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no leader crashed after its call"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    lab.kill_agent(dead).await;
    let mut cfg = lab.node_config(dead);
    cfg.faults.crash_at = None;
    lab.write_node_config(dead, &cfg).unwrap();
    lab.start_agent(dead).unwrap();
    if let Err((e, h)) = lab.wait_healthy(Duration::from_secs(180)).await {
        panic!("{e}\n{}", h.table());
    }
    let st = assert_done_once(&lab).await;
    assert!(
        st.message
            .as_deref()
            .unwrap_or("")
            .contains("escrowed before use"),
        "{st:?}"
    );
    assert_eq!(count_outcome(&lab, Role::NomadServer, "recovered"), 1);
    assert_eq!(count_outcome(&lab, Role::NomadServer, "bootstrapped"), 0);
    let operator = lab.operator_imds().await.unwrap();
    recovered_secret_works(&lab, &operator).await;
    lab.down().await;
}
