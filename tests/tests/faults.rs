//! Faults during the tier bootstrap, end to end (real Azurite, the Key Vault contract double, real Consul 1.8.7 and
//! OpenBao): storage down, the escrow vault answering 403/429/5xx, dropping connections or answering too late.
//! Inside the agents' Azure deadline the bootstrap retries and ends bootstrapped and escrowed; a fault that
//! outlasts it ends in a recorded failure (boot record `ok=false` with one line naming what failed, coordination
//! state not `done`) with nothing lost and no second init, and a later boot completes the tier.

use hashistack_agent::boot::{BootRecord, Phase};
use hashistack_agent::coordination::TierPhase;
use hashistack_agent::escrow::envelope::Envelope;
use hashistack_agent::node::Role;
use hashistack_e2e::{
    assert_done_once, count_outcome, escrow_cmd, escrow_open, files_containing, get_as, nodes_of,
    options, tools, wait_healthy,
};
use hashistack_lab::keyvault::{principals, Fault, Op, Vault, ESCROW_VAULT};
use hashistack_lab::lab::AZURITE_PORT;
use hashistack_lab::Lab;
use serde_json::Value;
use std::time::{Duration, Instant};

fn escrow_vault(lab: &Lab) -> Vault {
    lab.keyvault
        .as_ref()
        .and_then(|kv| kv.vault(ESCROW_VAULT))
        .expect("the lab's escrow vault")
        .clone()
}

/// Lowers the node's Azure deadline (every Blob and Key Vault call of its bootstrap gives up after this long).
fn set_azure_deadline(lab: &Lab, i: usize, secs: u64) {
    let mut cfg = lab.node_config(i);
    cfg.bootstrap.azure_deadline_secs = secs;
    lab.write_node_config(i, &cfg).unwrap();
}

/// The boot record of the node's current agent once its tier bootstrap concluded (either way).
async fn wait_bootstrap_result(lab: &Lab, i: usize, deadline: Duration) -> BootRecord {
    let pid = lab.nodes[i].agent.as_ref().and_then(|a| a.pid());
    let start = Instant::now();
    loop {
        if let Some(r) = lab
            .boot_record(i)
            .filter(|r| Some(r.pid) == pid && r.bootstrap.is_some())
        {
            return r;
        }
        assert!(
            start.elapsed() < deadline,
            "{}: no bootstrap result within {deadline:?}: {:?}",
            lab.nodes[i].def.name,
            lab.boot_record(i)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the node's current agent has started its services and is inside the tier bootstrap.
async fn wait_in_bootstrap(lab: &Lab, i: usize, deadline: Duration) {
    let pid = lab.nodes[i].agent.as_ref().and_then(|a| a.pid());
    let start = Instant::now();
    loop {
        let r = lab.boot_record(i).filter(|r| Some(r.pid) == pid);
        if let Some(r) = &r {
            assert!(
                r.ok,
                "{}: boot failed: {:?}",
                lab.nodes[i].def.name, r.last_error
            );
            if r.bootstrap.is_none() {
                return;
            }
            panic!(
                "{}: bootstrap already concluded: {r:?}",
                lab.nodes[i].def.name
            );
        }
        assert!(
            start.elapsed() < deadline,
            "{}: services not started within {deadline:?}",
            lab.nodes[i].def.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_tier_done(lab: &Lab, tier: &str, deadline: Duration) {
    let start = Instant::now();
    while lab.tier_state(tier).await.map(|s| s.phase) != Some(TierPhase::Done) {
        assert!(
            start.elapsed() < deadline,
            "{tier}: not done within {deadline:?}: {:?}",
            lab.tier_state(tier).await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A failed bootstrap as status shows it: not ok, one line naming what failed.
fn assert_clear_failure(lab: &Lab, i: usize, rec: &BootRecord, names: &[&str]) -> String {
    let node = &lab.nodes[i].def.name;
    assert!(!rec.ok, "{node}: {rec:?}");
    assert_eq!(rec.phase, Phase::Bootstrap, "{node}: {rec:?}");
    assert_eq!(rec.bootstrap.as_deref(), Some("failed"), "{node}: {rec:?}");
    let err = rec.last_error.clone().unwrap_or_default();
    assert!(!err.is_empty() && !err.contains('\n'), "{node}: {err:?}");
    for n in names {
        assert!(err.contains(n), "{node}: {err:?} does not say {n:?}");
    }
    err
}

/// The status of `auth/token/lookup-self` with `token` on node `i`'s Vault (200: the token authenticates).
async fn vault_token_status(lab: &Lab, i: usize, token: &str) -> u16 {
    let url = format!(
        "https://{}:8200/v1/auth/token/lookup-self",
        lab.nodes[i].def.ip
    );
    get_as(lab, &url, "X-Vault-Token", token).await.0
}

async fn vault_initialized(lab: &Lab, i: usize) -> bool {
    let r = lab
        .https()
        .get(format!(
            "https://{}:8200/v1/sys/seal-status",
            lab.nodes[i].def.ip
        ))
        .send()
        .await
        .expect("seal-status answers");
    let v: Value = r.json().await.expect("seal-status JSON");
    v["initialized"].as_bool().expect("initialized field")
}

fn spooled(lab: &Lab, i: usize) -> Vec<std::path::PathBuf> {
    let dir = lab.nodes[i]
        .root
        .join("var/lib/hashistack-data/escrow-spool");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Statuses the escrow vault answered to the server tiers' identities (0: connection dropped).
fn served_to_servers(v: &Vault) -> Vec<(Option<Op>, u16)> {
    v.served()
        .into_iter()
        .filter(|s| {
            matches!(
                s.principal.as_deref(),
                Some(principals::CONSUL | principals::VAULT)
            )
        })
        .map(|s| (s.op, s.status))
        .collect()
}

/// The escrow vault refuses (403, as while role assignments propagate), throttles (429), fails (500, 503), drops
/// connections and answers later than the agent's per-attempt timeout, all during both tiers' bootstraps: every
/// call is retried inside the deadline and both tiers end bootstrapped once and escrowed, with secrets that
/// operators open and that appear in no log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escrow_vault_errors_within_the_deadline_are_retried() {
    let mut o = options("fault-kv-transient", 95);
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    let kv = escrow_vault(&lab);
    kv.inject(Fault::status(Op::WrapKey, 403).times(2));
    kv.inject(Fault::status(Op::WrapKey, 500).times(2));
    // Longer than the 20 s per-attempt timeout of the escrow policy: the agent gives up on that answer.
    kv.inject(Fault::delay(Op::SetSecret, Duration::from_secs(22)).times(1));
    kv.inject(Fault::status(Op::SetSecret, 429).times(2));
    kv.inject(Fault::status(Op::SetSecret, 503).times(2));
    kv.inject(Fault::reset(Op::SetSecret).times(2));
    for i in 0..lab.nodes.len() {
        lab.start_agent(i).unwrap();
    }
    wait_healthy(&lab, Duration::from_secs(170)).await;

    assert!(
        kv.faults().is_empty(),
        "faults never hit: {:?}",
        kv.faults()
    );
    let served = served_to_servers(&kv);
    for (op, status) in [
        (Op::WrapKey, 403),
        (Op::WrapKey, 500),
        (Op::SetSecret, 429),
        (Op::SetSecret, 503),
        (Op::SetSecret, 0),
    ] {
        assert!(
            served.contains(&(Some(op), status)),
            "{op:?} {status} not served to a server: {served:?}"
        );
    }
    for role in [Role::ConsulServer, Role::VaultServer] {
        assert_eq!(count_outcome(&lab, role, "bootstrapped"), 1, "{role}");
        for i in nodes_of(&lab, role) {
            let r = lab.boot_record(i).unwrap();
            assert!(r.ok && r.last_error.is_none(), "{r:?}");
        }
    }
    assert_done_once(&lab, "vault").await;
    assert_done_once(&lab, "consul").await;

    // What was escrowed through the faults opens and works.
    let operator = lab.operator_imds().await.unwrap();
    let vault: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "vault")).unwrap();
    let root = vault["root_token"].as_str().unwrap().to_string();
    let mut needles: Vec<String> =
        serde_json::from_value(vault["recovery_keys_base64"].clone()).unwrap();
    assert_eq!(needles.len(), 5);
    let v0 = nodes_of(&lab, Role::VaultServer)[0];
    assert_eq!(
        vault_token_status(&lab, v0, &root).await,
        200,
        "recovered root token authenticates"
    );
    let consul: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "consul")).unwrap();
    let secret_id = consul["secret_id"].as_str().unwrap().to_string();
    let (status, _) = get_as(
        &lab,
        &format!("https://{}:8501/v1/acl/token/self", lab.nodes[0].def.ip),
        "X-Consul-Token",
        &secret_id,
    )
    .await;
    assert_eq!(status, 200, "recovered Consul token authenticates");
    let o = escrow_cmd(&lab, &operator, &["verify"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok")).count(),
        4,
        "{out}"
    );

    // Error paths logged a lot; none of it may carry a secret.
    needles.push(root);
    needles.push(secret_id);
    let leaks = files_containing(
        &lab.opts.state_dir,
        &needles,
        &[
            "/opt/consul/data",
            "/var/lib/hashistack-data/consul",
            "/var/lib/hashistack-data/vault",
        ],
    );
    assert!(leaks.is_empty(), "secrets found in {leaks:?}");
    lab.down().await;
}

/// Azurite (coordination and escrow storage) is down while the Vault tier bootstraps. A node whose deadline
/// passes records a clear failure naming the coordination state and initializes nothing; the others keep
/// retrying, and once storage is back one of them bootstraps the tier; the failed node's next boot finds it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_during_bootstrap_is_retried_within_the_deadline_and_reported_after_it() {
    let mut o = options("fault-azurite", 96);
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    // The Consul tier first, with storage up (it also creates the cluster material).
    for i in nodes_of(&lab, Role::ConsulServer) {
        lab.start_agent(i).unwrap();
    }
    wait_tier_done(&lab, "consul", Duration::from_secs(120)).await;

    let mut azurite = lab.azurite.take().expect("Azurite runs");
    azurite.stop(Duration::from_secs(10)).await;
    let blob_addr = std::net::SocketAddr::from((lab.opts.ip(1), AZURITE_PORT));
    assert!(
        std::net::TcpStream::connect_timeout(&blob_addr, Duration::from_millis(500)).is_err(),
        "Azurite still answers"
    );
    let vaults = nodes_of(&lab, Role::VaultServer);
    let short = vaults[0];
    set_azure_deadline(&lab, short, 8);
    for &i in &vaults {
        lab.start_agent(i).unwrap();
    }
    for &i in &vaults {
        wait_in_bootstrap(&lab, i, Duration::from_secs(90)).await;
    }
    let rec = wait_bootstrap_result(&lab, short, Duration::from_secs(60)).await;
    assert_clear_failure(&lab, short, &rec, &["coordination", "gave up"]);
    for &i in &vaults {
        assert!(
            !vault_initialized(&lab, i).await,
            "initialized without storage"
        );
    }
    // The others are still inside their 60 s deadline, retrying.
    for &i in &vaults[1..] {
        assert!(lab.nodes[i].agent.as_mut().unwrap().alive());
        assert_eq!(lab.boot_record(i).unwrap().bootstrap, None, "{i}");
    }

    lab.restart_azurite().await.unwrap();
    for &i in &vaults[1..] {
        let r = wait_bootstrap_result(&lab, i, Duration::from_secs(90)).await;
        assert!(r.ok, "{}: {r:?}", lab.nodes[i].def.name);
    }
    // Storage kept its data through the restart.
    assert_done_once(&lab, "consul").await;
    set_azure_deadline(&lab, short, 60);
    lab.reboot(short).await.unwrap();
    let rec = wait_bootstrap_result(&lab, short, Duration::from_secs(90)).await;
    assert!(rec.ok, "{rec:?}");
    wait_healthy(&lab, Duration::from_secs(120)).await;
    assert_done_once(&lab, "vault").await;
    assert_eq!(count_outcome(&lab, Role::VaultServer, "bootstrapped"), 1);
    assert_eq!(
        lab.boot_record(short).unwrap().bootstrap.as_deref(),
        Some("already-done")
    );
    lab.down().await;
}

/// The escrow vault stops taking writes right after the leader's pre-flight, so Vault is initialized but its
/// escrow cannot complete. The leader records a clear failure, keeps the envelope in its spool, and the tier is
/// not `done`; the other servers wait rather than initialize again. When the vault is back, the leader's next
/// boot uploads the spooled envelope, and the secrets it carries are the working ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escrow_outage_after_init_keeps_the_envelope_spooled_until_a_later_boot() {
    let mut o = options("fault-kv-after-init", 97);
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    for i in nodes_of(&lab, Role::ConsulServer) {
        lab.start_agent(i).unwrap();
    }
    wait_tier_done(&lab, "consul", Duration::from_secs(120)).await;

    let kv = escrow_vault(&lab);
    let vaults = nodes_of(&lab, Role::VaultServer);
    let leader = vaults[0];
    set_azure_deadline(&lab, leader, 10);
    lab.start_agent(leader).unwrap();
    // The pre-flight's test write is the Vault identity's first successful secret write: fail every later one.
    let start = Instant::now();
    while !kv.served().iter().any(|s| {
        s.op == Some(Op::SetSecret)
            && s.principal.as_deref() == Some(principals::VAULT)
            && (200..300).contains(&s.status)
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no pre-flight write"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kv.inject(Fault::status(Op::SetSecret, 503));

    let rec = wait_bootstrap_result(&lab, leader, Duration::from_secs(90)).await;
    assert_clear_failure(
        &lab,
        leader,
        &rec,
        &["escrow key vault write", "503", "gave up"],
    );
    assert!(
        vault_initialized(&lab, leader).await,
        "init happened before the outage"
    );
    let st = lab.tier_state("vault").await.expect("vault state");
    assert_eq!(st.phase, TierPhase::Initialized, "{st:?}");
    assert_eq!(st.leader, lab.nodes[leader].def.name);
    let escrow_id = st.escrow_id.clone().expect("escrow id recorded");
    // No secret lost: the envelope is on the leader's disk (0600) and the blob copy landed.
    let spool = spooled(&lab, leader);
    assert_eq!(spool.len(), 1, "{spool:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&spool[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let env: Envelope = serde_json::from_slice(&std::fs::read(&spool[0]).unwrap()).unwrap();
    assert_eq!(env.escrow_id, escrow_id);
    // Escrow blob names carry a fresh nonce per upload attempt (published only in the receipt).
    let copies = lab
        .list_blobs("escrow", &format!("lab/vault/{escrow_id}-"))
        .await
        .unwrap();
    assert_eq!(copies.len(), 1, "{copies:?}");

    // The rest of the tier boots during the outage: it waits for the leader's spool, and initializes nothing.
    for &i in &vaults[1..] {
        lab.start_agent(i).unwrap();
    }
    for &i in &vaults[1..] {
        wait_in_bootstrap(&lab, i, Duration::from_secs(90)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for &i in &vaults[1..] {
        assert_eq!(lab.boot_record(i).unwrap().bootstrap, None);
    }

    // The vault is back; the leader's next boot completes the escrow from its spool.
    kv.clear_faults();
    lab.reboot(leader).await.unwrap();
    let rec = wait_bootstrap_result(&lab, leader, Duration::from_secs(90)).await;
    assert!(rec.ok, "{rec:?}");
    assert_eq!(rec.bootstrap.as_deref(), Some("recovered"));
    assert!(
        spooled(&lab, leader).is_empty(),
        "spool emptied once escrowed"
    );
    wait_healthy(&lab, Duration::from_secs(120)).await;
    assert_done_once(&lab, "vault").await;
    let st = lab.tier_state("vault").await.unwrap();
    assert_eq!(st.escrow_id.as_deref(), Some(escrow_id.as_str()));
    assert!(
        st.message
            .unwrap_or_default()
            .contains("docs/bootstrap.md#finish-configuration"),
        "the note points at the follow-up"
    );
    assert_eq!(count_outcome(&lab, Role::VaultServer, "bootstrapped"), 0);
    assert_eq!(count_outcome(&lab, Role::VaultServer, "recovered"), 1);
    assert_eq!(count_outcome(&lab, Role::VaultServer, "already-done"), 2);

    // The envelope that waited in the spool holds the working root token.
    let operator = lab.operator_imds().await.unwrap();
    let vault: Value = serde_json::from_slice(&escrow_open(&lab, &operator, "vault")).unwrap();
    let root = vault["root_token"].as_str().unwrap().to_string();
    assert_eq!(vault_token_status(&lab, leader, &root).await, 200);
    let o = escrow_cmd(&lab, &operator, &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let mut needles: Vec<String> =
        serde_json::from_value(vault["recovery_keys_base64"].clone()).unwrap();
    needles.push(root);
    let leaks = files_containing(
        &lab.opts.state_dir,
        &needles,
        &[
            "/opt/consul/data",
            "/var/lib/hashistack-data/consul",
            "/var/lib/hashistack-data/vault",
        ],
    );
    assert!(leaks.is_empty(), "secrets found in {leaks:?}");
    lab.down().await;
}

/// The escrow key refuses every server (403: the wrap role never assigned) for longer than the deadline. Every
/// server of both tiers records a clear failure naming the escrow key; nothing is initialized, nothing is spooled,
/// no tier is `done`. Once the role works, the next boot bootstraps each tier once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escrow_key_refused_past_the_deadline_initializes_nothing_until_a_later_boot() {
    let mut o = options("fault-kv-forbidden", 98);
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    let kv = escrow_vault(&lab);
    kv.inject(Fault::status(Op::WrapKey, 403));
    let servers: Vec<usize> = (0..lab.nodes.len())
        .filter(|&i| lab.nodes[i].def.role.is_server_tier())
        .collect();
    for &i in &servers {
        set_azure_deadline(&lab, i, 6);
        lab.start_agent(i).unwrap();
    }
    for &i in &servers {
        let rec = wait_bootstrap_result(&lab, i, Duration::from_secs(120)).await;
        assert_clear_failure(&lab, i, &rec, &["escrow key wrap", "403", "gave up"]);
        assert!(spooled(&lab, i).is_empty());
    }
    for tier in ["consul", "vault"] {
        let st = lab.tier_state(tier).await;
        assert!(
            st.as_ref().is_none_or(|s| s.phase != TierPhase::Done),
            "{tier}: {st:?}"
        );
    }
    for i in nodes_of(&lab, Role::VaultServer) {
        assert!(!vault_initialized(&lab, i).await);
    }
    assert!(served_to_servers(&kv).contains(&(Some(Op::WrapKey), 403)));
    assert!(
        !served_to_servers(&kv)
            .iter()
            .any(|(op, _)| *op == Some(Op::SetSecret)),
        "nothing written to escrow before the wrap worked"
    );

    kv.clear_faults();
    for &i in &servers {
        lab.reboot(i).await.unwrap();
    }
    for &i in &servers {
        let rec = wait_bootstrap_result(&lab, i, Duration::from_secs(120)).await;
        assert!(rec.ok, "{rec:?}");
    }
    wait_healthy(&lab, Duration::from_secs(150)).await;
    for (tier, role) in [("consul", Role::ConsulServer), ("vault", Role::VaultServer)] {
        assert_done_once(&lab, tier).await;
        assert_eq!(count_outcome(&lab, role, "bootstrapped"), 1, "{tier}");
    }
    lab.down().await;
}
