//! The real driver ([`lead`]) run with in-memory fakes of its traits and of the product. Every fake writes
//! what it was asked into one log, so each test asserts what was called, in what order, and what was not.

use super::*;
use crate::bootstrap::TierError;
use crate::escrow::{envelope::DataKey, Prepared};
use crate::files::FileError;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

type Log = Arc<Mutex<Vec<String>>>;

fn note(log: &Log, what: String) {
    log.lock().unwrap().push(what);
}

/// Steps that must run at the same time: a step named in `pairs` does not finish until its partner has started,
/// so a driver that runs the two one after the other never gets past the first (the test's timeout fails it).
/// With no pairs (the default) every step goes straight on.
#[derive(Default)]
struct Overlap {
    pairs: Mutex<Vec<(String, String)>>,
    started: Mutex<Vec<String>>,
    changed: tokio::sync::Notify,
}

impl Overlap {
    fn require(&self, a: &str, b: &str) {
        self.pairs.lock().unwrap().push((a.into(), b.into()));
    }

    async fn step(&self, name: &str) {
        self.started.lock().unwrap().push(name.into());
        self.changed.notify_waiters();
        let partner = self.pairs.lock().unwrap().iter().find_map(|(a, b)| {
            (a == name)
                .then(|| b.clone())
                .or_else(|| (b == name).then(|| a.clone()))
        });
        let Some(partner) = partner else { return };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.started.lock().unwrap().contains(&partner) {
                return;
            }
            changed.await;
        }
    }
}

fn phase_name(p: TierPhase) -> String {
    serde_json::to_value(p)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// The tier state in memory; refuses the `refuse`-th write (1-based) as storage refuses a fenced one (409).
struct FakeStorage {
    log: Log,
    state: Mutex<Option<TierState>>,
    writes: Mutex<usize>,
    refuse: Option<usize>,
    lease_held: bool,
    /// Boot records: node → address.
    records: BTreeMap<String, String>,
    overlap: Arc<Overlap>,
}

#[async_trait::async_trait]
impl Storage for FakeStorage {
    fn check_lease(&self) -> Result<(), crate::election::LeaseLost> {
        if self.lease_held {
            Ok(())
        } else {
            Err(crate::election::LeaseLost {
                tier: "vault".into(),
            })
        }
    }

    async fn save(&self, state: &TierState) -> Result<(), WriteError> {
        self.overlap
            .step(&format!("storage.save {}", phase_name(state.phase)))
            .await;
        let n = {
            let mut w = self.writes.lock().unwrap();
            *w += 1;
            *w
        };
        if self.refuse == Some(n) {
            note(
                &self.log,
                format!("storage.save {} refused", phase_name(state.phase)),
            );
            return Err(WriteError::Fenced {
                tier: state.tier.clone(),
                status: 409,
            });
        }
        note(
            &self.log,
            format!("storage.save {}", phase_name(state.phase)),
        );
        *self.state.lock().unwrap() = Some(state.clone());
        Ok(())
    }

    async fn peer_ip(&self, node: &str) -> Result<Option<String>, crate::azure::AzureError> {
        note(&self.log, format!("storage.peer_ip {node}"));
        Ok(self.records.get(node).cloned())
    }
}

/// Escrow ids `e1`, `e2`, … in the order of `prepare`; receipts for every upload.
struct FakeEscrow {
    log: Log,
    prepared: Mutex<usize>,
    overlap: Arc<Overlap>,
}

fn receipt(target: ReceiptTarget, env: &envelope::Envelope) -> Receipt {
    Receipt {
        target,
        object: format!("{target}/{}", env.escrow_id),
        version: "v1".into(),
        etag: None,
        escrow_id: Some(env.escrow_id.clone()),
        ciphertext_sha256: env.ciphertext_sha256(),
        written_unix: 1,
    }
}

#[async_trait::async_trait(?Send)]
impl EscrowTargets for FakeEscrow {
    async fn prepare(&self) -> Result<Prepared, crate::azure::AzureError> {
        let n = {
            let mut p = self.prepared.lock().unwrap();
            *p += 1;
            *p
        };
        note(&self.log, format!("escrow.prepare e{n}"));
        self.overlap.step(&format!("escrow.prepare e{n}")).await;
        Ok(Prepared {
            escrow_id: format!("e{n}"),
            key: DataKey::generate(),
            kek_id: "kek/1".into(),
            wrapped: vec![1, 2, 3],
        })
    }

    async fn upload_blob(
        &self,
        env: &envelope::Envelope,
    ) -> Result<Receipt, crate::escrow::UploadError> {
        note(&self.log, format!("escrow.blob {}", env.escrow_id));
        self.overlap
            .step(&format!("escrow.blob {}", env.escrow_id))
            .await;
        Ok(receipt(ReceiptTarget::Blob, env))
    }

    async fn upload_keyvault(
        &self,
        env: &envelope::Envelope,
    ) -> Result<Receipt, crate::escrow::UploadError> {
        note(&self.log, format!("escrow.keyvault {}", env.escrow_id));
        self.overlap
            .step(&format!("escrow.keyvault {}", env.escrow_id))
            .await;
        Ok(receipt(ReceiptTarget::Keyvault, env))
    }

    async fn upload_orphan(
        &self,
        env: &envelope::Envelope,
    ) -> Result<String, crate::azure::AzureError> {
        note(&self.log, format!("escrow.orphan {}", env.escrow_id));
        Ok(format!("orphans/{}", env.escrow_id))
    }
}

/// The spool's files in memory, by path.
struct FakeSpool {
    log: Log,
    files: Mutex<BTreeMap<PathBuf, envelope::Envelope>>,
}

fn spool_path(escrow_id: &str) -> PathBuf {
    PathBuf::from(format!("/spool/vault-{escrow_id}.json"))
}

impl Spool for FakeSpool {
    fn write(&self, env: &envelope::Envelope) -> Result<PathBuf, FileError> {
        note(&self.log, format!("spool.write {}", env.escrow_id));
        let path = spool_path(&env.escrow_id);
        self.files.lock().unwrap().insert(path.clone(), env.clone());
        Ok(path)
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        let env = self
            .files
            .lock()
            .unwrap()
            .remove(path)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        note(&self.log, format!("spool.remove {}", env.escrow_id));
        Ok(())
    }
}

/// A Vault-like product: its answers queued per call.
struct FakeTier {
    log: Log,
    local_initialized: Option<bool>,
    creates_cluster: bool,
    answers: Mutex<VecDeque<Result<Zeroizing<Vec<u8>>, TierFailure>>>,
    /// Address → what that server says (`None`: it cannot be asked).
    peers: BTreeMap<String, Option<bool>>,
    pre_secret: Option<Vec<u8>>,
    configure_fails: bool,
    configured_with: Mutex<Option<Vec<u8>>>,
    /// A tier that waits before its call ([`Tier::wait_callable`], Nomad's leader): whether the server then
    /// takes it (`Some(false)`: no leader by the deadline). `None`: the default (nothing to wait for, not logged).
    callable: Option<bool>,
    overlap: Arc<Overlap>,
}

const SECRETS: &[u8] = br#"{"kind":"vault-init","root_token":"s.fake"}"#;

#[async_trait::async_trait]
impl Tier for FakeTier {
    fn name(&self) -> &'static str {
        "vault"
    }
    async fn wait_ready(&self, _deadline: Duration) -> Result<(), TierError> {
        note(&self.log, "tier.wait_ready".into());
        Ok(())
    }
    async fn wait_callable(&self, deadline: Duration) -> Result<(), TierError> {
        match self.callable {
            None => Ok(()),
            Some(ok) => {
                self.overlap.step("tier.wait_callable").await;
                note(&self.log, "tier.wait_callable".into());
                if ok {
                    Ok(())
                } else {
                    Err(TierError::NoLeader {
                        product: "Nomad",
                        waited: deadline,
                    })
                }
            }
        }
    }
    async fn already_bootstrapped(&self) -> Result<Option<bool>, TierError> {
        note(&self.log, "tier.already_bootstrapped".into());
        Ok(self.local_initialized)
    }
    fn pre_secret(&self) -> Option<Zeroizing<Vec<u8>>> {
        self.pre_secret.clone().map(Zeroizing::new)
    }
    fn holds_pre_secret(&self, secrets: &[u8]) -> bool {
        self.pre_secret.as_deref() == Some(secrets)
    }
    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        note(&self.log, "tier.bootstrap".into());
        self.answers
            .lock()
            .unwrap()
            .pop_front()
            .expect("a queued answer for each bootstrap call")
    }
    async fn configure(&self, secrets: &[u8]) -> Result<(), TierError> {
        self.overlap.step("tier.configure").await;
        note(&self.log, "tier.configure".into());
        *self.configured_with.lock().unwrap() = Some(secrets.to_vec());
        if self.configure_fails {
            return Err(TierError::Step {
                step: "autopilot",
                detail: "HTTP 500".into(),
            });
        }
        Ok(())
    }
    async fn reset_local(&self) -> Result<(), TierError> {
        note(&self.log, "tier.reset_local".into());
        Ok(())
    }
    fn creates_cluster(&self) -> bool {
        self.creates_cluster
    }
    async fn peer_initialized(&self, ip: &str) -> Result<bool, TierError> {
        note(&self.log, format!("tier.peer_initialized {ip}"));
        match self.peers.get(ip).copied().flatten() {
            Some(answer) => Ok(answer),
            None => Err(TierError::Step {
                step: "seal-status",
                detail: "cannot connect".into(),
            }),
        }
    }
}

/// One run's world: a fresh Vault tier unless a test changes it.
struct World {
    log: Log,
    overlap: Arc<Overlap>,
    storage: FakeStorage,
    escrow: FakeEscrow,
    spool: FakeSpool,
    tier: FakeTier,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl World {
    fn new() -> World {
        let log: Log = Arc::default();
        let overlap: Arc<Overlap> = Arc::default();
        World {
            storage: FakeStorage {
                log: log.clone(),
                state: Mutex::new(None),
                writes: Mutex::new(0),
                refuse: None,
                lease_held: true,
                records: BTreeMap::new(),
                overlap: overlap.clone(),
            },
            escrow: FakeEscrow {
                log: log.clone(),
                prepared: Mutex::new(0),
                overlap: overlap.clone(),
            },
            spool: FakeSpool {
                log: log.clone(),
                files: Mutex::default(),
            },
            tier: FakeTier {
                log: log.clone(),
                local_initialized: Some(false),
                creates_cluster: true,
                answers: Mutex::new(VecDeque::from([Ok(Zeroizing::new(SECRETS.to_vec()))])),
                peers: BTreeMap::new(),
                pre_secret: None,
                configure_fails: false,
                configured_with: Mutex::new(None),
                callable: None,
                overlap: overlap.clone(),
            },
            log,
            overlap,
        }
    }

    /// Runs the driver on `state` (as read under the lease) and this node's spool.
    async fn run(&self, state: Option<TierState>) -> Result<Option<Outcome>, BootstrapError> {
        *self.storage.state.lock().unwrap() = state.clone();
        let pending: Vec<_> = self
            .spool
            .files
            .lock()
            .unwrap()
            .iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        let d = Driver {
            cluster: "c1",
            node: "me",
            peer_grace: Duration::from_secs(600),
            crash_at: None,
            operator_keys: None,
            storage: &self.storage,
            escrow: &self.escrow,
            spool: &self.spool,
            now_unix: now,
        };
        lead(&d, &self.tier, state, pending).await
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn stored(&self) -> Option<TierState> {
        self.storage.state.lock().unwrap().clone()
    }

    fn called(&self, prefix: &str) -> bool {
        self.log().iter().any(|l| l.starts_with(prefix))
    }
}

/// A state of `leader`'s bootstrap that began (`initializing`) `age` seconds ago.
fn begun_by(leader: &str, age: i64) -> TierState {
    let mut s = TierState::new("c1", "vault", leader);
    s.updated_unix = now() - age;
    s.history = vec![(TierPhase::Initializing, leader.into(), now() - age)];
    s
}

fn spooled(escrow_id: &str) -> envelope::Envelope {
    envelope::Envelope {
        format: 1,
        escrow_id: escrow_id.into(),
        cluster: "c1".into(),
        tier: "vault".into(),
        created_unix: 1,
        kek_id: "kek/1".into(),
        wrap_alg: "RSA-OAEP-256".into(),
        wrapped_key: "AQID".into(),
        nonce: "AAAA".into(),
        ciphertext: "AAAA".into(),
    }
}

#[tokio::test]
async fn a_fresh_tier_is_initialized_spooled_escrowed_configured_then_done() {
    let w = World::new();
    let r = w.run(None).await.expect("bootstrapped");
    assert_eq!(r, Some(Outcome::Bootstrapped));
    assert_eq!(
        w.log(),
        [
            "tier.already_bootstrapped",
            "escrow.prepare e1",
            "escrow.blob preflight-e1",
            "escrow.keyvault preflight-e1",
            "storage.save initializing",
            "tier.bootstrap",
            "spool.write e1",
            "storage.save initialized",
            "escrow.blob e1",
            "escrow.keyvault e1",
            "storage.save escrowed",
            "spool.remove e1",
            "tier.configure",
            "storage.save done",
        ]
    );
    let s = w.stored().expect("a state");
    assert_eq!(s.phase, TierPhase::Done);
    assert_eq!(s.escrow_id.as_deref(), Some("e1"));
    assert!(s.escrowed_to(ReceiptTarget::Blob) && s.escrowed_to(ReceiptTarget::Keyvault));
    assert!(s.receipts.iter().all(|r| r.is_for("e1")));
    assert_eq!(s.message, None);
    // The configuration had the secrets from memory; the spool is empty.
    assert_eq!(
        w.tier.configured_with.lock().unwrap().as_deref(),
        Some(SECRETS)
    );
    assert!(w.spool.files.lock().unwrap().is_empty());
}

/// What does not depend on each other runs at once: the escrow's two targets, the `initialized` record beside
/// the escrow, and (a secret escrowed before use) the two data keys. Each pair below waits for its partner to
/// start, so a driver that runs them one after the other never finishes.
#[tokio::test]
async fn independent_steps_run_at_once() {
    let w = World::new();
    w.overlap.require("escrow.blob e1", "escrow.keyvault e1");
    w.overlap
        .require("storage.save initialized", "escrow.blob e1");
    w.overlap
        .require("escrow.blob preflight-e1", "escrow.keyvault preflight-e1");
    let r = tokio::time::timeout(Duration::from_secs(5), w.run(None))
        .await
        .unwrap_or_else(|_| panic!("steps ran one after the other: {:?}", w.log()));
    assert_eq!(r.expect("bootstrapped"), Some(Outcome::Bootstrapped));
    let s = w.stored().unwrap();
    assert!(s.escrowed_to(ReceiptTarget::Blob) && s.escrowed_to(ReceiptTarget::Keyvault));

    let mut w = World::new();
    w.tier.pre_secret = Some(br#"{"kind":"nomad-acl","secret_id":"x"}"#.to_vec());
    w.tier.creates_cluster = false;
    w.tier.local_initialized = None;
    w.overlap.require("escrow.prepare e1", "escrow.prepare e2");
    w.overlap.require("escrow.blob e2", "escrow.keyvault e2");
    let r = tokio::time::timeout(Duration::from_secs(5), w.run(None))
        .await
        .unwrap_or_else(|_| panic!("steps ran one after the other: {:?}", w.log()));
    assert_eq!(r.expect("bootstrapped"), Some(Outcome::Bootstrapped));
}

#[tokio::test]
async fn after_a_crash_after_init_the_spooled_envelope_is_escrowed_without_asking_the_product() {
    let w = World::new();
    w.spool
        .files
        .lock()
        .unwrap()
        .insert(spool_path("e0"), spooled("e0"));
    let r = w.run(Some(begun_by("me", 30))).await.expect("recovered");
    assert_eq!(r, Some(Outcome::Recovered));
    assert_eq!(
        w.log(),
        [
            "escrow.blob e0",
            "escrow.keyvault e0",
            "storage.save escrowed",
            "spool.remove e0",
            "storage.save done",
        ]
    );
    assert!(
        !w.called("tier."),
        "the product is never asked: {:?}",
        w.log()
    );
    let s = w.stored().expect("a state");
    assert_eq!(s.phase, TierPhase::Done);
    assert_eq!(s.escrow_id.as_deref(), Some("e0"));
    assert!(s
        .message
        .as_deref()
        .is_some_and(|m| m.contains("docs/bootstrap.md#finish-configuration")));
}

#[tokio::test]
async fn a_stale_spool_is_uploaded_as_an_orphan_and_the_state_is_not_written() {
    let w = World::new();
    w.spool
        .files
        .lock()
        .unwrap()
        .insert(spool_path("e0"), spooled("e0"));
    let mut done = begun_by("other", 30);
    done.phase = TierPhase::Done;
    done.escrow_id = Some("e9".into());
    let r = w.run(Some(done.clone())).await.expect("already done");
    assert_eq!(r, Some(Outcome::AlreadyDone));
    assert_eq!(w.log(), ["escrow.orphan e0", "spool.remove e0"]);
    assert_eq!(w.stored(), Some(done));
}

#[tokio::test]
async fn a_write_refused_by_storage_stops_the_run_before_the_bootstrap_call() {
    let mut w = World::new();
    w.storage.refuse = Some(1);
    let e = w.run(None).await.expect_err("fenced off");
    assert!(
        matches!(
            e,
            BootstrapError::Write(WriteError::Fenced { status: 409, .. })
        ),
        "{e}"
    );
    let log = w.log();
    assert_eq!(
        log.last().map(String::as_str),
        Some("storage.save initializing refused")
    );
    for never in [
        "tier.bootstrap",
        "tier.configure",
        "tier.reset_local",
        "spool.write",
    ] {
        assert!(!w.called(never), "{never} was called: {log:?}");
    }
    assert_eq!(w.stored(), None, "nothing was written");
}

#[tokio::test]
async fn a_lease_lost_before_the_state_write_stops_the_run_without_a_write_or_a_call() {
    let mut w = World::new();
    w.storage.lease_held = false;
    let e = w.run(None).await.expect_err("the lease is gone");
    assert!(matches!(e, BootstrapError::Lease(_)), "{e}");
    assert!(!w.called("storage.save"), "{:?}", w.log());
    assert!(!w.called("tier.bootstrap"), "{:?}", w.log());
}

#[tokio::test]
async fn a_previous_leader_that_cannot_be_asked_stops_the_tier_and_nothing_is_initialized() {
    let mut w = World::new();
    w.storage.records.insert("old".into(), "10.0.0.5".into());
    w.tier.peers.insert("10.0.0.5".into(), None);
    let e = w
        .run(Some(begun_by("old", 5000)))
        .await
        .expect_err("an operator");
    let BootstrapError::NeedsOperator { message, .. } = &e else {
        panic!("{e}")
    };
    assert!(
        message.contains("old began the vault bootstrap")
            && message.contains("docs/bootstrap.md#previous-leader-unreachable"),
        "{message}"
    );
    assert_eq!(
        w.log(),
        [
            "tier.already_bootstrapped",
            "storage.peer_ip old",
            "tier.peer_initialized 10.0.0.5",
            "storage.save needs-operator",
        ]
    );
    assert_eq!(w.stored().map(|s| s.phase), Some(TierPhase::NeedsOperator));
}

#[tokio::test]
async fn a_previous_leader_without_a_boot_record_cannot_be_asked_either() {
    let w = World::new();
    let e = w
        .run(Some(begun_by("old", 5000)))
        .await
        .expect_err("an operator");
    assert!(
        e.to_string().contains("no boot record with its address")
            && e.to_string().contains("#previous-leader-unreachable"),
        "{e}"
    );
    assert!(!w.called("tier.peer_initialized"));
    assert!(!w.called("escrow.prepare") && !w.called("tier.bootstrap"));
}

#[tokio::test]
async fn an_earlier_leader_that_initialized_stops_the_tier_and_one_that_did_not_lets_it_bootstrap()
{
    let mut w = World::new();
    w.storage.records.insert("old".into(), "10.0.0.5".into());
    w.tier.peers.insert("10.0.0.5".into(), Some(true));
    let e = w
        .run(Some(begun_by("old", 5000)))
        .await
        .expect_err("an operator");
    assert!(
        e.to_string().contains("answers initialized")
            && e.to_string().contains("#bootstrapped-but-nothing-escrowed"),
        "{e}"
    );
    assert!(!w.called("tier.bootstrap"));

    let mut w = World::new();
    w.storage.records.insert("old".into(), "10.0.0.5".into());
    w.tier.peers.insert("10.0.0.5".into(), Some(false));
    let r = w
        .run(Some(begun_by("old", 5000)))
        .await
        .expect("bootstrapped");
    assert_eq!(r, Some(Outcome::Bootstrapped));
    let log = w.log();
    let asked = log
        .iter()
        .position(|l| l == "tier.peer_initialized 10.0.0.5");
    let called = log.iter().position(|l| l == "tier.bootstrap");
    assert!(asked.is_some() && asked < called, "{log:?}");
}

#[tokio::test]
async fn another_nodes_unfinished_bootstrap_within_its_grace_is_waited_for() {
    let w = World::new();
    let r = w.run(Some(begun_by("other", 5))).await.expect("waits");
    assert_eq!(r, None);
    assert_eq!(w.log(), ["tier.already_bootstrapped"]);
}

#[tokio::test]
async fn this_nodes_own_half_initialized_storage_is_reset_once_and_the_call_made_again() {
    let w = World::new();
    w.tier
        .answers
        .lock()
        .unwrap()
        .push_front(Err(TierFailure::HalfInitialized(
            "cluster already has state".into(),
        )));
    let r = w.run(Some(begun_by("me", 30))).await.expect("bootstrapped");
    assert_eq!(r, Some(Outcome::Bootstrapped));
    let log = w.log();
    let from = log.iter().position(|l| l == "tier.bootstrap").unwrap();
    assert_eq!(
        log[from..from + 5],
        [
            "tier.bootstrap",
            "tier.reset_local",
            "tier.wait_ready",
            "tier.bootstrap",
            "spool.write e1"
        ]
    );
    let s = w.stored().unwrap();
    assert_eq!(s.phase, TierPhase::Done);
    assert!(s
        .message
        .is_some_and(|m| m.contains("started over after resetting")));
}

#[tokio::test]
async fn a_second_half_initialized_answer_after_the_reset_is_for_an_operator() {
    let w = World::new();
    *w.tier.answers.lock().unwrap() = VecDeque::from([
        Err(TierFailure::HalfInitialized(
            "cluster already has state".into(),
        )),
        Err(TierFailure::HalfInitialized(
            "cluster already has state".into(),
        )),
    ]);
    let e = w
        .run(Some(begun_by("me", 30)))
        .await
        .expect_err("an operator");
    assert!(e.to_string().contains("#half-initialized"), "{e}");
    assert_eq!(
        w.log().iter().filter(|l| *l == "tier.reset_local").count(),
        1
    );
    assert!(!w.called("spool.write"));
}

#[tokio::test]
async fn a_refused_call_is_for_an_operator_and_nothing_is_spooled() {
    let w = World::new();
    *w.tier.answers.lock().unwrap() =
        VecDeque::from([Err(TierFailure::Refused("init: HTTP 400: bad".into()))]);
    let e = w.run(None).await.expect_err("an operator");
    assert!(
        e.to_string()
            .contains("refused its bootstrap call on me: init: HTTP 400: bad"),
        "{e}"
    );
    assert!(!w.called("spool.write") && !w.called("tier.configure"));
    assert_eq!(w.log().last().unwrap(), "storage.save needs-operator");
}

/// The answer holds the secret escrowed before use (Nomad, Consul >= 1.15): that escrow is the tier's. Nothing is
/// spooled or escrowed after the call, and `escrowed` is recorded while the configuration runs.
#[tokio::test]
async fn a_secret_the_product_took_is_escrowed_once_before_the_call_and_never_again() {
    const PRE: &[u8] = br#"{"kind":"nomad-acl","accessor_id":"","secret_id":"x"}"#;
    let mut w = World::new();
    w.tier.pre_secret = Some(PRE.to_vec());
    w.tier.creates_cluster = false;
    w.tier.local_initialized = None;
    *w.tier.answers.lock().unwrap() = VecDeque::from([Ok(Zeroizing::new(PRE.to_vec()))]);
    // An earlier leader's unproven escrow before use, with its receipts.
    let mut earlier = begun_by("old", 5000);
    earlier.escrow_id = Some("e0".into());
    earlier.pre_escrows = vec!["e0".into()];
    for target in ReceiptTarget::ALL {
        earlier.receipts.push(receipt(target, &spooled("e0")));
    }
    w.overlap.require("storage.save escrowed", "tier.configure");
    let r = tokio::time::timeout(Duration::from_secs(5), w.run(Some(earlier)))
        .await
        .unwrap_or_else(|_| panic!("steps ran one after the other: {:?}", w.log()));
    assert_eq!(r.expect("bootstrapped"), Some(Outcome::Bootstrapped));
    let log = w.log();
    let after_call = &log[log.iter().position(|l| l == "tier.bootstrap").unwrap() + 1..];
    assert!(
        after_call
            .iter()
            .all(|l| !l.starts_with("escrow.") && !l.starts_with("spool.")),
        "nothing spooled or escrowed after the call: {log:?}"
    );
    assert!(
        !after_call.iter().any(|l| l == "storage.save initialized"),
        "{log:?}"
    );
    assert_eq!(log.last().unwrap(), "storage.save done");
    let s = w.stored().unwrap();
    assert_eq!(s.phase, TierPhase::Done);
    assert_eq!(
        s.escrow_id.as_deref(),
        Some("e2"),
        "the escrow made before use"
    );
    assert!(s.pre_escrows.is_empty(), "proven: {:?}", s.pre_escrows);
    assert!(s.escrowed_to(ReceiptTarget::Blob) && s.escrowed_to(ReceiptTarget::Keyvault));
    assert!(
        s.receipts.iter().all(|r| r.is_for("e2")),
        "the earlier leader's receipts are dropped: {:?}",
        s.receipts
    );
    assert_eq!(w.tier.configured_with.lock().unwrap().as_deref(), Some(PRE));
}

/// A server that ignored the secret escrowed before use (an older Consul leader during an upgrade) answers with
/// a token of its own: that one is spooled and escrowed after the call and replaces the escrow made before use.
#[tokio::test]
async fn a_secret_chosen_by_the_agent_is_escrowed_to_both_targets_before_the_call() {
    let mut w = World::new();
    w.tier.pre_secret = Some(br#"{"kind":"nomad-acl","secret_id":"x"}"#.to_vec());
    w.tier.creates_cluster = false;
    w.tier.local_initialized = None;
    let r = w.run(None).await.expect("bootstrapped");
    assert_eq!(r, Some(Outcome::Bootstrapped));
    // Its escrow to both targets is the pre-flight: no separate probe, and both data keys are wrapped at once.
    assert_eq!(
        w.log()[..7],
        [
            "tier.already_bootstrapped",
            "escrow.prepare e1",
            "escrow.prepare e2",
            "escrow.blob e2",
            "escrow.keyvault e2",
            "storage.save initializing",
            "tier.bootstrap",
        ]
    );
    assert!(!w.called("escrow.blob preflight"), "{:?}", w.log());
    assert!(w.called("spool.write e1"), "{:?}", w.log());
    let s = w.stored().unwrap();
    // The post-call escrow replaces the one made before use.
    assert_eq!(s.escrow_id.as_deref(), Some("e1"));
    assert!(s.pre_escrows.is_empty());
    assert!(s.receipts.iter().all(|r| r.is_for("e1")));
}

/// Nomad: the lease, the pre-flight, the escrow before use and `initializing` run while the servers elect a
/// leader: the wait for it comes after the escrow before use, under the lease, at the same time as the
/// `initializing` record, and the call only after both.
#[tokio::test]
async fn a_tier_that_waits_for_its_leader_records_initializing_meanwhile_and_calls_after() {
    let mut w = World::new();
    w.tier.pre_secret = Some(br#"{"kind":"nomad-acl","secret_id":"x"}"#.to_vec());
    w.tier.creates_cluster = false;
    w.tier.local_initialized = None;
    w.tier.callable = Some(true);
    w.overlap
        .require("tier.wait_callable", "storage.save initializing");
    let r = tokio::time::timeout(Duration::from_secs(5), w.run(None))
        .await
        .unwrap_or_else(|_| panic!("steps ran one after the other: {:?}", w.log()));
    assert_eq!(r.expect("bootstrapped"), Some(Outcome::Bootstrapped));
    let log = w.log();
    assert_eq!(
        log[1..5],
        [
            "escrow.prepare e1",
            "escrow.prepare e2",
            "escrow.blob e2",
            "escrow.keyvault e2",
        ]
    );
    let mut both = log[5..7].to_vec();
    both.sort();
    assert_eq!(both, ["storage.save initializing", "tier.wait_callable"]);
    assert_eq!(log[7], "tier.bootstrap");
}

/// Storage refuses `initializing` (fenced) while the server is still electing: the run stops at once, without
/// waiting for the leader and without a call.
#[tokio::test]
async fn a_refused_initializing_record_stops_the_wait_for_the_leader() {
    let mut w = World::new();
    w.tier.pre_secret = Some(br#"{"kind":"nomad-acl","secret_id":"x"}"#.to_vec());
    w.tier.creates_cluster = false;
    w.tier.local_initialized = None;
    w.tier.callable = Some(true);
    w.storage.refuse = Some(1);
    // The leader never comes: its partner step never starts.
    w.overlap.require("tier.wait_callable", "a leader");
    let e = tokio::time::timeout(Duration::from_secs(5), w.run(None))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the run waited for the leader after its write was refused: {:?}",
                w.log()
            )
        })
        .expect_err("fenced");
    assert!(
        matches!(e, BootstrapError::Write(WriteError::Fenced { .. })),
        "{e}"
    );
    assert!(!w.called("tier.bootstrap"), "{:?}", w.log());
}

/// No leader by the deadline: the run stops before the call, with `initializing` recorded (naming the secret
/// escrowed before use as unproven); the next leader bootstraps after `peer_grace`.
#[tokio::test]
async fn a_server_that_never_takes_the_call_stops_the_run_before_the_call() {
    let mut w = World::new();
    w.tier.pre_secret = Some(br#"{"kind":"nomad-acl","secret_id":"x"}"#.to_vec());
    w.tier.creates_cluster = false;
    w.tier.local_initialized = None;
    w.tier.callable = Some(false);
    let e = w.run(None).await.expect_err("no leader");
    assert!(
        matches!(
            &e,
            BootstrapError::Product {
                source: TierError::NoLeader { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(w.called("tier.wait_callable"));
    assert!(!w.called("tier.bootstrap"), "{:?}", w.log());
    let s = w.stored().expect("initializing recorded");
    assert_eq!(s.phase, TierPhase::Initializing);
    assert_eq!(
        s.pre_escrows,
        vec!["e2".to_string()],
        "unproven: no call was made"
    );
    // What the next leader decides: wait for this node within `peer_grace`, then bootstrap (no cluster is made
    // by an ACL bootstrap, so no earlier leader is asked).
    let f = |now: i64| decide::Facts {
        state: &s,
        me: "other",
        local_initialized: None,
        creates_cluster: false,
        now_unix: now,
        peer_grace: Duration::from_secs(60),
    };
    assert_eq!(
        decide::decide(&f(s.updated_unix + 1)),
        Decision::WaitForPeer
    );
    assert_eq!(decide::decide(&f(s.updated_unix + 61)), Decision::Bootstrap);
}

#[tokio::test]
async fn a_failed_configuration_is_noted_in_the_done_state_never_fatal() {
    let mut w = World::new();
    w.tier.configure_fails = true;
    let r = w.run(None).await.expect("bootstrapped");
    assert_eq!(r, Some(Outcome::Bootstrapped));
    let s = w.stored().unwrap();
    assert_eq!(s.phase, TierPhase::Done);
    assert_eq!(
        s.message.as_deref(),
        Some("post-bootstrap configuration incomplete: autopilot: HTTP 500")
    );
}
