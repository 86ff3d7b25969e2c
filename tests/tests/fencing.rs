//! Fencing of the tier state (issue 12, item 2), end to end against real Azurite and OpenBao: a bootstrap
//! leader frozen past its lease (SIGSTOP) while another server takes over must, once resumed (SIGCONT), find
//! its state write refused by storage (its `If-None-Match`/`If-Match` no longer holds), leave the new leader's
//! state as it is, and never initialize a second time. The pause is injected (`faults.pause_at =
//! "before-state-write"`) after the leader's own lease check and before its request: the one window its lease
//! clock cannot close, which only storage can.
//!
//! Loopback nets 160-169.

use hashistack_agent::boot::BootRecord;
use hashistack_agent::bootstrap::PausePoint;
use hashistack_agent::coordination::TierPhase;
use hashistack_agent::node::Role;
use hashistack_e2e::{assert_done_once, count_outcome, inits, nodes_of, options, tools};
use hashistack_lab::Lab;
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_is_fenced_off_by_storage() {
    let mut o = options("fencing-pause", 160);
    o.start_agents = false;
    let mut lab = Lab::up(o, tools()).await.unwrap();
    let vault = nodes_of(&lab, Role::VaultServer);
    let v0 = vault[0];
    for i in nodes_of(&lab, Role::ConsulServer) {
        lab.start_agent(i).unwrap();
    }
    // vault-0 boots alone, takes the lease, passes its pre-flight and lease check, and freezes right before
    // it writes `initializing`.
    let mut cfg = lab.node_config(v0);
    cfg.faults.pause_at = Some(PausePoint::BeforeStateWrite);
    lab.write_node_config(v0, &cfg).unwrap();
    lab.start_agent(v0).unwrap();
    let start = Instant::now();
    while !lab.agent_stopped(v0) {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "vault-0 never reached its first state write: {:?}",
            lab.boot_record(v0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        lab.tier_state("vault").await.is_none(),
        "paused before its first state write"
    );

    // The other servers boot; once the frozen leader's lease (15 s in the lab) has run out, one of them takes
    // it over and bootstraps the tier.
    for &i in &vault[1..] {
        lab.start_agent(i).unwrap();
    }
    let start = Instant::now();
    while lab.tier_state("vault").await.map(|s| s.phase) != Some(TierPhase::Done) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "vault: not done by another server within 300 s: {:?}",
            lab.tier_state("vault").await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let taken = assert_done_once(&lab, "vault").await;
    assert_ne!(
        taken.leader, lab.nodes[v0].def.name,
        "another server bootstrapped"
    );
    assert!(lab.agent_stopped(v0), "vault-0 stayed frozen meanwhile");

    // Resumed: its write carries the condition of what it saw under its lease (no state), storage refuses it,
    // and it stops without calling init.
    lab.continue_agent(v0);
    let rec = wait_bootstrap_result(&lab, v0, Duration::from_secs(120)).await;
    assert_eq!(rec.bootstrap.as_deref(), Some("failed"), "{rec:?}");
    let err = rec.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("refused by storage")
            && (err.contains("HTTP 409") || err.contains("HTTP 412")),
        "vault-0's write was refused by storage: {err:?}"
    );
    assert!(!err.contains('\n'), "one line: {err:?}");

    // The tier state is the new leader's, untouched; one init in its history; one node bootstrapped.
    let after = lab.tier_state("vault").await.expect("state");
    assert_eq!(
        after, taken,
        "the tier state is the new leader's, untouched"
    );
    assert_eq!(inits(&after), 1, "{:?}", after.history);
    assert_eq!(count_outcome(&lab, Role::VaultServer, "bootstrapped"), 1);
    lab.down().await;
}

// ---------------------------------------------------------------------------------------------------------
// The protocol against real Azurite and the Key Vault double, with a scripted tier in place of a product:
// what the storage fence, the stale spool and the escrows made before use do, without servers to wait for.
// ---------------------------------------------------------------------------------------------------------

use hashistack_agent::azure::Azure;
use hashistack_agent::bootstrap::{
    self, member::JoinPolicy, Ctx, Outcome, Tier, TierError, TierFailure,
};
use hashistack_agent::coordination::{self, Expect, TierState, WriteError};
use hashistack_agent::escrow::{self, envelope, Targets};
use hashistack_agent::retry::RetryPolicy;
use hashistack_lab::lab::IMDS_PORT;
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

/// A lab with storage, Key Vault and node identities, and no agent running.
async fn storage_lab(name: &str, net: u8) -> Lab {
    let mut o = options(name, net);
    o.start_agents = false;
    o.consul_servers = 1;
    o.vault_servers = 1;
    o.nomad_servers = 1;
    Lab::up(o, tools()).await.unwrap()
}

/// Azure clients as the identity of the lab's first node of `role`.
fn azure_as(lab: &Lab, role: Role) -> Azure {
    let i = nodes_of(lab, role)[0];
    let imds = hashistack_agent::imds::ImdsClient::new(
        &format!("http://{}:{IMDS_PORT}", lab.nodes[i].def.ip),
        RetryPolicy::imds(Duration::from_secs(30)),
    );
    let cred = Arc::new(hashistack_agent::identity::ImdsCredential::new(imds, None));
    Azure::new(cred, Some(&lab.opts.state_dir.join("ca.pem")), false).unwrap()
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_secs(30),
        attempt_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    }
}

/// The bootstrap settings of node `node` (a server of `role`) of the lab's cluster, its spool under `spool`.
fn ctx(lab: &Lab, role: Role, node: &str, spool: &std::path::Path) -> Ctx {
    Ctx {
        az: azure_as(lab, role),
        targets: Targets {
            blob_endpoint: lab.blob_endpoint(),
            escrow_vault_uri: lab.escrow_vault_uri(),
        },
        cluster: lab.opts.cluster.clone(),
        node: node.into(),
        spool_dir: spool.join(node),
        policy: quick(),
        follower_deadline: Duration::from_secs(60),
        crash_at: None,
        pause_at: None,
        fence: Default::default(),
        lease_secs: 15,
        // The previous leader is never waited for: each round below is a new leader after a lost one.
        peer_grace: Duration::ZERO,
        operator_keys: None,
        join: JoinPolicy {
            grace: Duration::from_secs(1),
            deadline: Duration::from_secs(1),
            poll: Duration::from_millis(100),
        },
    }
}

/// What the scripted product answers to its bootstrap call.
#[derive(Clone, Copy)]
enum Script {
    /// The call succeeds: the payload is `{"secret": "<name>"}`.
    Succeeds(&'static str),
    /// The answer is lost (the call may have landed): an error, nothing spooled.
    AnswerLost,
    /// The product says it was bootstrapped, and token/self with our secret says it is not ours.
    AlreadyDoneNotOurs,
}

struct Scripted {
    name: &'static str,
    /// The secret escrowed before use, if the tier takes one.
    pre: Option<&'static str>,
    script: Script,
    calls: Mutex<u32>,
}

#[async_trait::async_trait]
impl Tier for Scripted {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn wait_ready(&self, _: Duration) -> Result<(), TierError> {
        Ok(())
    }
    async fn already_bootstrapped(&self) -> Result<Option<bool>, TierError> {
        Ok(None)
    }
    fn pre_secret(&self) -> Option<Zeroizing<Vec<u8>>> {
        self.pre
            .map(|s| Zeroizing::new(format!("{{\"secret\":\"{s}\"}}").into_bytes()))
    }
    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        *self.calls.lock().unwrap() += 1;
        match self.script {
            Script::Succeeds(s) => Ok(Zeroizing::new(
                format!("{{\"secret\":\"{s}\"}}").into_bytes(),
            )),
            Script::AnswerLost => Err(TierFailure::Other("ACL bootstrap: answer lost".into())),
            Script::AlreadyDoneNotOurs => Err(TierFailure::AlreadyDone(
                "ACL bootstrap already done (reset index: 7)".into(),
            )),
        }
    }
    async fn configure(&self, _: &[u8]) -> Result<(), TierError> {
        Ok(())
    }
}

fn scripted(name: &'static str, pre: Option<&'static str>, script: Script) -> Scripted {
    Scripted {
        name,
        pre,
        script,
        calls: Mutex::new(0),
    }
}

/// The escrow each receipt of `target` is for: its escrow id (the Key Vault object is one secret per tier, so
/// the object name no longer tells), else the object name of a receipt written before receipts named it.
fn receipt_ids(st: &TierState, target: escrow::ReceiptTarget) -> Vec<String> {
    st.receipts
        .iter()
        .filter(|r| r.target == target)
        .map(|r| r.escrow_id.clone().unwrap_or_else(|| r.object.clone()))
        .collect()
}

/// Two holders of one tier's lease, one after the other, the first frozen with a write permission in hand:
/// its write is refused by storage (409 for a create, 412 for an update), and its next permission is refused
/// by its own lease clock. Nothing it tried is in the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_writes_are_fenced_by_the_lease_clock_and_by_storage() {
    let lab = storage_lab("fencing-storage", 161).await;
    let az = azure_as(&lab, Role::VaultServer);
    let blob = lab.blob_endpoint();
    let lease = 15;
    for (round, tier) in ["create", "update"].into_iter().enumerate() {
        if round == 1 {
            // The update round starts from an existing state.
            let (s, expect) = coordination::read_for_update(&az, &blob, "lab", tier, quick())
                .await
                .unwrap();
            assert!(s.is_none() && expect == Expect::Absent);
            let l =
                hashistack_agent::election::try_acquire(&az, &blob, "lab", tier, quick(), lease)
                    .await
                    .unwrap()
                    .expect("free lease");
            let fence = coordination::Fence::default();
            fence.arm(l.clock(), Expect::Absent);
            let st = TierState::new("lab", tier, "n0");
            coordination::write(
                &az,
                &blob,
                &st,
                &fence,
                fence.ticket(tier).unwrap(),
                quick(),
            )
            .await
            .unwrap();
            l.release().await;
        }
        // A takes the lease, reads, and takes its write permission; then it freezes (here: simply waits).
        let a = hashistack_agent::election::try_acquire(&az, &blob, "lab", tier, quick(), lease)
            .await
            .unwrap()
            .expect("A gets the lease");
        let (_, expect) = coordination::read_for_update(&az, &blob, "lab", tier, quick())
            .await
            .unwrap();
        let fence_a = coordination::Fence::default();
        fence_a.arm(a.clock(), expect);
        let ticket_a = fence_a.ticket(tier).expect("A's clock is fresh");
        // B waits for A's lease to run out (A's renewals are stopped: A is frozen), takes over and writes.
        drop(a);
        let start = Instant::now();
        let b = loop {
            if let Some(b) =
                hashistack_agent::election::try_acquire(&az, &blob, "lab", tier, quick(), lease)
                    .await
                    .unwrap()
            {
                break b;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{tier}: B never got the lease"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let (_, expect) = coordination::read_for_update(&az, &blob, "lab", tier, quick())
            .await
            .unwrap();
        let fence_b = coordination::Fence::default();
        fence_b.arm(b.clock(), expect);
        let mut st_b = TierState::new("lab", tier, "B");
        st_b.set(coordination::TierPhase::Initializing, "B", None);
        coordination::write(
            &az,
            &blob,
            &st_b,
            &fence_b,
            fence_b.ticket(tier).unwrap(),
            quick(),
        )
        .await
        .expect("B writes");
        // A thaws: its request goes out with the condition of what it read, and storage refuses it.
        let mut st_a = TierState::new("lab", tier, "A");
        st_a.set(coordination::TierPhase::Initializing, "A", None);
        match coordination::write(&az, &blob, &st_a, &fence_a, ticket_a, quick()).await {
            Err(WriteError::Fenced { status, .. }) => {
                assert_eq!(status, if round == 0 { 409 } else { 412 }, "{tier}")
            }
            other => panic!("{tier}: A's write was not fenced: {other:?}"),
        }
        // And A's own clock refuses any further permission: nothing more is even sent.
        assert!(
            fence_a.ticket(tier).is_err(),
            "{tier}: A's lease clock ran out"
        );
        let stored = coordination::read(&az, &blob, "lab", tier, quick())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored, st_b, "{tier}: the state is B's");
        // B goes on writing (its fence moved to its own write's ETag).
        st_b.set(coordination::TierPhase::Initialized, "B", None);
        coordination::write(
            &az,
            &blob,
            &st_b,
            &fence_b,
            fence_b.ticket(tier).unwrap(),
            quick(),
        )
        .await
        .expect("B's next write");
        b.release().await;
    }
    lab.down().await;
}

/// Three leaders of a tier whose product takes a secret escrowed before use: the first two lose their call's
/// answer (it may have landed), the third hears "already done" and token/self says its own secret is not the
/// live one. Both earlier secrets stay escrowed and named in the state; the third's is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_leaders_secret_escrowed_before_use_is_kept_until_token_self_decides() {
    let lab = storage_lab("fencing-pre-escrow", 162).await;
    let spool = tempfile::tempdir().unwrap();
    let mut escrows = Vec::new();
    for (node, secret) in [("n1", "s1"), ("n2", "s2")] {
        let c = ctx(&lab, Role::NomadServer, node, spool.path());
        let tier = scripted("nomad", Some(secret), Script::AnswerLost);
        let e = bootstrap::run(&c, &tier).await.unwrap_err();
        assert!(e.to_string().contains("answer lost"), "{e}");
        let st = lab.tier_state("nomad").await.expect("state");
        assert_eq!(st.phase, coordination::TierPhase::Initializing);
        escrows.push(st.escrow_id.clone().expect("the escrow made before use"));
    }
    let st = lab.tier_state("nomad").await.unwrap();
    for id in &escrows {
        for target in escrow::ReceiptTarget::ALL {
            assert!(
                receipt_ids(&st, target)
                    .iter()
                    .any(|o| o.contains(id.as_str())),
                "{target} receipt of {id} kept while unproven: {st:?}"
            );
        }
    }
    let c = ctx(&lab, Role::NomadServer, "n3", spool.path());
    let tier = scripted("nomad", Some("s3"), Script::AlreadyDoneNotOurs);
    assert_eq!(bootstrap::run(&c, &tier).await.unwrap(), Outcome::Recovered);
    let st = lab.tier_state("nomad").await.unwrap();
    assert_eq!(st.phase, coordination::TierPhase::Done, "{st:?}");
    assert_eq!(st.pre_escrows, escrows, "both candidates, in order");
    for id in &escrows {
        for target in escrow::ReceiptTarget::ALL {
            assert!(
                receipt_ids(&st, target)
                    .iter()
                    .any(|o| o.contains(id.as_str())),
                "{target} receipt of {id} kept: {st:?}"
            );
        }
        assert!(st
            .message
            .as_deref()
            .unwrap_or_default()
            .contains(id.as_str()));
    }
    assert_eq!(
        st.receipts.len(),
        4,
        "n3's own secret (not live) is dropped: {st:?}"
    );
    lab.down().await;
}

/// A node comes back with a spooled envelope of a bootstrap that was superseded: the tier state names a
/// newer escrow, completed. The envelope is uploaded as an orphan (create-only, under `orphans/`), the spool
/// is emptied, and the state is left exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_spool_is_uploaded_as_an_orphan_and_the_state_left_alone() {
    let lab = storage_lab("fencing-stale-spool", 163).await;
    let spool = tempfile::tempdir().unwrap();
    // n0's old envelope, sealed under a data key wrapped by the escrow key, in n0's spool.
    let c0 = ctx(&lab, Role::VaultServer, "n0", spool.path());
    let prepared = escrow::prepare(&c0.az, &c0.targets, quick()).await.unwrap();
    let env = envelope::seal(
        &prepared.key,
        Zeroizing::new(b"{\"secret\":\"old\"}".to_vec()),
        &prepared.escrow_id,
        "lab",
        "vault",
        &prepared.kek_id,
        &prepared.wrapped,
        time_now(),
    )
    .unwrap();
    escrow::spool(&c0.spool_dir, &env).unwrap();
    // n1 bootstraps the tier, escrow and all.
    let c1 = ctx(&lab, Role::VaultServer, "n1", spool.path());
    let t1 = scripted("vault", None, Script::Succeeds("new"));
    assert_eq!(
        bootstrap::run(&c1, &t1).await.unwrap(),
        Outcome::Bootstrapped
    );
    let before = lab.tier_state("vault").await.unwrap();
    assert_eq!(before.phase, coordination::TierPhase::Done);
    assert_ne!(
        before.escrow_id.as_deref(),
        Some(prepared.escrow_id.as_str())
    );
    // n0 boots with its stale spool.
    let t0 = scripted("vault", None, Script::Succeeds("never called"));
    assert_eq!(
        bootstrap::run(&c0, &t0).await.unwrap(),
        Outcome::AlreadyDone
    );
    assert_eq!(*t0.calls.lock().unwrap(), 0, "no bootstrap call");
    let after = lab.tier_state("vault").await.unwrap();
    assert_eq!(after, before, "the state is left alone");
    let orphan = lab
        .read_blob("escrow", &escrow::orphan_blob_name(&env))
        .await
        .expect("the orphan in the escrow container");
    assert_eq!(orphan, env.to_json());
    assert!(
        lab.list_blobs(
            "escrow",
            &format!("{}/{}/{}-", env.cluster, env.tier, env.escrow_id)
        )
        .await
        .unwrap()
        .is_empty(),
        "never under the tier's live escrow names"
    );
    assert!(escrow::pending(&c0.spool_dir).is_empty(), "spool emptied");
    lab.down().await;
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A deployment from before the vault split: the shared vault holds the CA certificate (and every other
/// secret), the servers vault has no CA key. A server-tier node must stop with "migration required" — one
/// line, a non-zero exit, nothing created — never make new material (which would replace the CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_without_the_servers_vault_ca_key_stops_for_a_migration() {
    let mut lab = storage_lab("fencing-migration", 164).await;
    let names = hashistack_agent::material::names(&lab.opts.cluster);
    let kv = lab.keyvault.as_ref().unwrap();
    let shared = kv
        .vault(hashistack_lab::keyvault::SHARED_VAULT)
        .unwrap()
        .clone();
    let servers = kv
        .vault(hashistack_lab::keyvault::SERVERS_VAULT)
        .unwrap()
        .clone();
    let now = ::time::OffsetDateTime::now_utc();
    let (cert, key) = hashistack_agent::tls::generate_ca("old cluster CA", 30, now).unwrap();
    shared.set_secret(&names.ca_cert, &cert).unwrap();
    shared.set_secret(&names.ca_key, &key).unwrap();
    shared
        .set_secret(
            &names.consul_gossip_key,
            "b2xkIGdvc3NpcCBrZXkgMzIgYnl0ZXMgbG9uZyEhISE=",
        )
        .unwrap();
    let shared_before: Vec<(String, usize)> = shared
        .secret_names()
        .into_iter()
        .map(|n| {
            let c = shared.secret_version_count(&n);
            (n, c)
        })
        .collect();
    assert!(servers.secret_names().is_empty());
    let c0 = nodes_of(&lab, Role::ConsulServer)[0];
    lab.start_agent(c0).unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(180),
        lab.nodes[c0].agent.as_mut().unwrap().child.wait(),
    )
    .await
    .expect("the agent stops")
    .unwrap();
    assert_ne!(status.code(), Some(0), "non-zero exit: {status:?}");
    assert!(status.code().is_some(), "an exit, not a signal: {status:?}");
    let rec = lab.boot_record(c0).expect("boot record");
    let err = rec.last_error.clone().unwrap_or_default();
    assert!(err.contains("migration required"), "{err:?}");
    assert!(
        err.contains(&names.ca_key),
        "names the missing CA key: {err:?}"
    );
    assert!(!err.contains('\n'), "one line: {err:?}");
    assert!(rec.services.is_empty(), "nothing started: {rec:?}");
    // Nothing created or replaced in either vault.
    let shared_after: Vec<(String, usize)> = shared
        .secret_names()
        .into_iter()
        .map(|n| {
            let c = shared.secret_version_count(&n);
            (n, c)
        })
        .collect();
    assert_eq!(shared_after, shared_before);
    assert_eq!(
        shared.secret_value(&names.ca_cert).as_deref(),
        Some(cert.as_str())
    );
    assert!(
        servers.secret_names().is_empty(),
        "{:?}",
        servers.secret_names()
    );
    lab.kill_agent(c0).await;
    lab.down().await;
}
