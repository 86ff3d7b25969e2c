//! End-to-end: a warm reboot starts the services from the material the agent kept on disk, without waiting for
//! Key Vault, and converges with Key Vault afterwards (docs/trust-model.md#warm-boots): unchanged material
//! restarts nothing; a gossip key an operator rotated in Key Vault is rendered and only Consul restarts; a node
//! whose identity lost its access stops its services and boots cold (and fails) from then on. A boot without
//! material on disk still waits for Key Vault.
//!
//! Lab: 3 Consul servers, 1 Vault server, 1 Nomad server, 1 worker, all booted at once (net 190).

use hashistack_agent::boot::BootRecord;
use hashistack_agent::material;
use hashistack_agent::node::Role;
use hashistack_agent::render::Layout;
use hashistack_e2e::{healthy_lab, nodes_of, options};
use hashistack_lab::keyvault::{principal_for, Fault, Op, SERVERS_VAULT, SHARED_VAULT};
use hashistack_lab::Lab;
use std::time::{Duration, Instant};

/// Waits until the node's current agent has recorded the outcome of its converge step.
async fn converged(lab: &Lab, i: usize) -> BootRecord {
    let start = Instant::now();
    loop {
        let rec = lab.boot_record(i).expect("boot record");
        if rec.converge.as_deref().is_some_and(|c| c != "pending") {
            return rec;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{}: no converge outcome: {rec:?}",
            lab.nodes[i].def.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kept(lab: &Lab, i: usize) -> std::path::PathBuf {
    hashistack_agent::warm::path(&Layout::new(&lab.nodes[i].root))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_reboots_start_from_disk_and_converge_with_key_vault() {
    let mut o = options("warm_boot", 190);
    o.vault_servers = 1;
    o.nomad_servers = 1;
    o.workers = 1;
    let mut lab = healthy_lab(o).await;
    let kv = lab.keyvault.as_ref().expect("Key Vault double");
    let (shared, servers) = (
        kv.vault(SHARED_VAULT).unwrap().clone(),
        kv.vault(SERVERS_VAULT).unwrap().clone(),
    );
    let worker = nodes_of(&lab, Role::Worker)[0];
    let consul = nodes_of(&lab, Role::ConsulServer)[1];
    let vault = nodes_of(&lab, Role::VaultServer)[0];

    // The first boots were cold: they waited for Key Vault, and kept what it gave them.
    for i in [worker, consul, vault] {
        let rec = lab.boot_record(i).unwrap();
        assert_eq!(rec.material.as_deref(), Some("key-vault"), "{rec:?}");
        assert!(kept(&lab, i).is_file(), "{}", lab.nodes[i].def.name);
    }

    // Warm reboots while every secret read fails: the services start from disk all the same, and the converge
    // confirms the material once Key Vault answers again, restarting nothing.
    for i in [worker, consul, vault] {
        let name = lab.nodes[i].def.name.clone();
        shared.inject(Fault::status(Op::GetSecret, 503));
        servers.inject(Fault::status(Op::GetSecret, 503));
        lab.reboot(i).await.unwrap();
        let rec = lab.wait_booted(i, Duration::from_secs(60)).await.unwrap();
        assert!(rec.ok, "{name}: {:?}", rec.last_error);
        assert_eq!(rec.material.as_deref(), Some("disk"), "{name}: {rec:?}");
        assert_eq!(rec.converge.as_deref(), Some("pending"), "{name}: {rec:?}");
        assert!(
            !rec.services.is_empty(),
            "{name}: services started: {rec:?}"
        );
        assert!(
            rec.files_changed.is_empty(),
            "{name}: {:?}",
            rec.files_changed
        );
        shared.clear_faults();
        servers.clear_faults();
        let rec = converged(&lab, i).await;
        assert_eq!(
            rec.converge.as_deref(),
            Some("unchanged"),
            "{name}: {rec:?}"
        );
        assert!(rec.ok, "{name}: {:?}", rec.last_error);
        assert!(
            rec.files_changed.is_empty(),
            "{name}: {:?}",
            rec.files_changed
        );
    }

    // An operator rotates the Consul gossip key in Key Vault: the worker's next boot starts from disk (the old
    // key), then renders the new one and restarts Consul only.
    let names = material::names(&lab.opts.cluster);
    let rotated = "cm90YXRlZC1nb3NzaXAta2V5LWZvci10aGUtdGVzdCE=".to_string();
    assert_eq!(rotated.len(), 44);
    shared
        .set_secret(&names.consul_gossip_key, &rotated)
        .unwrap();
    lab.reboot(worker).await.unwrap();
    let rec = lab
        .wait_booted(worker, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(rec.material.as_deref(), Some("disk"), "{rec:?}");
    let rec = converged(&lab, worker).await;
    assert_eq!(
        rec.converge.as_deref(),
        Some("changed: restarted consul"),
        "{rec:?}"
    );
    let gossip = Layout::new(&lab.nodes[worker].root)
        .gossip_file(hashistack_agent::version::Product::Consul);
    let text = std::fs::read_to_string(&gossip).unwrap();
    assert!(text.contains(&rotated), "{}", gossip.display());
    let on_disk = std::fs::read_to_string(kept(&lab, worker)).unwrap();
    assert!(on_disk.contains(&rotated), "the rotated key is kept");

    // Without material on disk, a boot is cold and waits for Key Vault (through a few failed reads).
    std::fs::remove_file(kept(&lab, worker)).unwrap();
    shared.inject(Fault::status(Op::GetSecret, 503).times(3));
    lab.reboot(worker).await.unwrap();
    let rec = lab
        .wait_booted(worker, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(rec.ok, "{:?}", rec.last_error);
    assert_eq!(rec.material.as_deref(), Some("key-vault"), "{rec:?}");
    assert_eq!(rec.converge, None);
    assert!(kept(&lab, worker).is_file());

    // The workers' identity loses its access to the shared vault: the warm boot starts from disk, the converge
    // is refused, the services stop and the material on disk goes; the next boot is cold and fails.
    let mut cfg = lab.node_config(worker);
    cfg.bootstrap.azure_deadline_secs = 5;
    lab.write_node_config(worker, &cfg).unwrap();
    shared.revoke_all(principal_for(Role::Worker));
    lab.reboot(worker).await.unwrap();
    let rec = lab
        .wait_booted(worker, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(rec.material.as_deref(), Some("disk"), "{rec:?}");
    let rec = converged(&lab, worker).await;
    let outcome = rec.converge.clone().unwrap();
    assert!(outcome.starts_with("withdrawn: "), "{rec:?}");
    assert!(outcome.contains("403"), "{outcome}");
    assert!(!rec.ok);
    assert!(!kept(&lab, worker).exists());
    let pids = lab.nodes[worker].root.join("var/lib/hashistack/pids");
    let left: Vec<_> = std::fs::read_dir(&pids)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "services still recorded as running: {left:?}"
    );
    lab.reboot(worker).await.unwrap();
    let rec = lab
        .wait_booted(worker, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!rec.ok, "{rec:?}");
    assert_eq!(rec.material, None, "{rec:?}");
    assert!(rec.services.is_empty(), "{rec:?}");
    lab.down().await;
}
