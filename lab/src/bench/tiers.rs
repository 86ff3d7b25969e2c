//! Time to bootstrapped, per tier: agent-driven next to a floor measured in the same run. One lab per
//! [`Mode`]: the agents bootstrap (election, init, configuration, escrow), or they only start the servers and
//! the bench makes the minimal API calls itself (the floor). Observers poll the lab every 100 ms and record when
//! each milestone was first seen, relative to the agents' spawn ([`tier_run`]).

use super::{load_avg, say, BenchError, BenchOptions};
use crate::lab::{Lab, LabOptions};
use crate::tools::Tools;
use hashistack_agent::coordination::{TierPhase, TierState};
use hashistack_agent::node::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often the bench looks at a tier-bootstrap lab (and how often the floor retries its calls).
const OBSERVE_EVERY: Duration = Duration::from_millis(100);
/// How often the bench reads each tier's coordination state (agent-driven labs). Seldom: those reads go to the
/// lab's storage, which the agents' own bootstrap waits on and the floor's never does, so at [`OBSERVE_EVERY`] the
/// bench's reads slowed the very path it timed (docs/PERFORMANCE.md, tier bench Method, item 3). A tier's `done`
/// is timed by its lead agent's log line ([`logged_done`]); the state's phases are coarse marks.
const STATE_EVERY: Duration = Duration::from_secs(1);
/// Per-request timeout of the bench's observations.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a tier-bootstrap lab gets bootstrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The agents do it (`LabOptions.bootstrap = true`): election, init, configuration, escrow.
    Agent,
    /// The agents only render and start the servers; the bench makes the minimal API calls.
    Floor,
}

/// One tier-bootstrap lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierRun {
    pub run: u32,
    pub mode: Mode,
    /// `Lab::up` called → returned (emulators up, agents spawned), seconds; not part of any measured time.
    pub up_s: f64,
    /// 1-minute load average just before `Lab::up`.
    pub load_avg: f64,
    /// Seconds after the agents were spawned at which the bench first saw each `tier:milestone`.
    pub milestones: BTreeMap<String, f64>,
    /// Agent-driven: which node led each tier's bootstrap (coordination state).
    pub leaders: BTreeMap<String, String>,
}

impl TierRun {
    pub(super) fn summary(&self) -> String {
        let mut s = format!("{:?}: up {:.1} s;", self.mode, self.up_s);
        for k in [
            "vault:bootstrapped",
            "consul:bootstrapped",
            "consul:with-agent-tokens",
            "nomad:bootstrapped",
        ] {
            if let Some(v) = self.milestones.get(k) {
                s.push_str(&format!(" {k} {v:.2} s;"));
            }
        }
        s
    }
}

/// First-seen times of milestones, on the bench's clock relative to the agents' spawn.
struct Marks {
    t0: Instant,
    seen: std::sync::Mutex<BTreeMap<String, f64>>,
}

impl Marks {
    fn new(t0: Instant) -> Self {
        Marks {
            t0,
            seen: std::sync::Mutex::new(BTreeMap::new()),
        }
    }
    fn mark(&self, key: &str) {
        self.mark_secs(key, self.t0.elapsed().as_secs_f64());
    }
    /// Records `key` at a time taken earlier (e.g. when a request that succeeded was sent).
    fn mark_at(&self, key: &str, at: Instant) {
        self.mark_secs(key, at.saturating_duration_since(self.t0).as_secs_f64());
    }
    /// Records `key` (once: the first record stays) at `secs` after `t0`, e.g. from an agent's log.
    fn mark_secs(&self, key: &str, secs: f64) {
        self.seen
            .lock()
            .expect("marks")
            .entry(key.to_string())
            .or_insert(secs);
    }
    fn has(&self, key: &str) -> bool {
        self.seen.lock().expect("marks").contains_key(key)
    }
    fn take(&self) -> BTreeMap<String, f64> {
        self.seen.lock().expect("marks").clone()
    }
}

/// An HTTPS client for the servers' APIs: trusts the lab CA and the cluster CA, which exists only once the
/// first server-tier agent created the cluster material in Key Vault (`None` until then).
fn api_client(lab: &Lab) -> Option<reqwest::Client> {
    lab.cluster_ca()?;
    Some(lab.https())
}

fn nodes_of(lab: &Lab, role: Role) -> Vec<Ipv4Addr> {
    lab.nodes
        .iter()
        .filter(|n| n.def.role == role)
        .map(|n| n.def.ip)
        .collect()
}

async fn get_json(c: &reqwest::Client, url: String) -> Option<serde_json::Value> {
    let r = c.get(url).timeout(PROBE_TIMEOUT).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// `GET /v1/status/leader` answers a non-empty address (Consul and Nomad).
async fn knows_leader(c: &reqwest::Client, ip: Ipv4Addr, port: u16) -> bool {
    get_json(c, format!("https://{ip}:{port}/v1/status/leader"))
        .await
        .and_then(|v| v.as_str().map(|s| !s.is_empty()))
        .unwrap_or(false)
}

/// Vault seal status: `Some((initialized, sealed))` when it answers.
async fn seal_status(c: &reqwest::Client, ip: Ipv4Addr) -> Option<(bool, bool)> {
    let v = get_json(c, format!("https://{ip}:8200/v1/sys/seal-status")).await?;
    Some((v["initialized"].as_bool()?, v["sealed"].as_bool()?))
}

/// A tier's coordination state blob, read as the lab (as `Lab::tier_state`, with a reused client).
async fn tier_state(c: &reqwest::Client, lab: &Lab, token: &str, tier: &str) -> Option<TierState> {
    let name = hashistack_agent::coordination::state_blob_name(&lab.opts.cluster, tier);
    let r = c
        .get(format!("{}coordination/{name}", lab.blob_endpoint()))
        .bearer_auth(token)
        .header("x-ms-version", "2021-12-02")
        .timeout(PROBE_TIMEOUT)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    serde_json::from_slice(&r.bytes().await.ok()?).ok()
}

fn phase_rank(p: &TierPhase) -> Option<usize> {
    match p {
        TierPhase::Initializing => Some(0),
        TierPhase::Initialized => Some(1),
        TierPhase::Escrowed => Some(2),
        TierPhase::Done => Some(3),
        TierPhase::NeedsOperator => None,
    }
}
const PHASE_MARKS: [&str; 4] = [
    "state-initializing",
    "state-initialized",
    "state-escrowed",
    "state-done",
];

/// The tiers of a lab: (tier, role).
fn tiers(lab: &Lab) -> Vec<(&'static str, Role)> {
    let mut t = vec![("vault", Role::VaultServer), ("consul", Role::ConsulServer)];
    if !nodes_of(lab, Role::NomadServer).is_empty() {
        t.push(("nomad", Role::NomadServer));
    }
    t
}

/// What marks a run as finished, per mode.
fn finished(lab: &Lab, mode: Mode, m: &Marks) -> bool {
    tiers(lab).iter().all(|(tier, _)| {
        let need: &[&str] = match (mode, *tier) {
            (Mode::Agent, "vault") => &[
                "vault:state-done",
                "vault:unsealed",
                "vault:every-node-done",
            ],
            (Mode::Agent, "consul") => &[
                "consul:state-done",
                "consul:agent-tokens",
                "consul:every-node-done",
            ],
            (Mode::Agent, _) => &["nomad:state-done", "nomad:every-node-done"],
            (Mode::Floor, "vault") => &["vault:unsealed"],
            (Mode::Floor, "consul") => &["consul:acl-bootstrapped"],
            (Mode::Floor, _) => &["nomad:acl-bootstrapped"],
        };
        need.iter().all(|k| m.has(k))
    })
}

/// Sleeps one [`OBSERVE_EVERY`], or fails once the run's deadline has passed.
async fn next_tick(
    start: Instant,
    deadline: Duration,
    m: &Marks,
    what: &str,
) -> Result<(), BenchError> {
    tick(start, deadline, m, what, OBSERVE_EVERY).await
}

/// Sleeps `every`, or fails once the run's deadline has passed.
async fn tick(
    start: Instant,
    deadline: Duration,
    m: &Marks,
    what: &str,
    every: Duration,
) -> Result<(), BenchError> {
    if start.elapsed() > deadline {
        return Err(BenchError::Failed(format!(
            "{what} not seen within {deadline:?}; seen: {:?}",
            m.take()
        )));
    }
    tokio::time::sleep(every).await;
    Ok(())
}

/// `vault:answering` every Vault server has answered seal-status; `vault:initialized` one says
/// initialized; `vault:unsealed` every one is initialized and unsealed. One loop per server, so a server
/// busy with `sys/init` (its seal-status waits for the init to finish) delays no other observation.
async fn watch_vault(
    lab: &Lab,
    m: &Arc<Marks>,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    let vaults = nodes_of(lab, Role::VaultServer);
    let client = loop {
        if let Some(c) = api_client(lab) {
            break c;
        }
        next_tick(start, deadline, m, "the cluster CA").await?;
    };
    let latest = Arc::new(std::sync::Mutex::new(vec![None; vaults.len()]));
    let mut loops = tokio::task::JoinSet::new();
    for (i, ip) in vaults.iter().enumerate() {
        let (c, ip, m, latest) = (client.clone(), *ip, m.clone(), latest.clone());
        loops.spawn(async move {
            loop {
                if let Some((init, sealed)) = seal_status(&c, ip).await {
                    let mut st = latest.lock().expect("seal status");
                    st[i] = Some((init, sealed));
                    if init {
                        m.mark("vault:initialized");
                    }
                    if st.iter().all(Option::is_some) {
                        m.mark("vault:answering");
                    }
                    if st.iter().all(|s| *s == Some((true, false))) {
                        m.mark("vault:unsealed");
                    }
                    if init && !sealed {
                        return;
                    }
                }
                tokio::time::sleep(OBSERVE_EVERY).await;
            }
        });
    }
    // The loops are aborted when `loops` is dropped (done or past the deadline).
    loop {
        if m.has("vault:unsealed") {
            return Ok(());
        }
        next_tick(start, deadline, m, "every Vault server unsealed").await?;
    }
}

/// `<tier>:leader`: the tier's first server knows a leader (Consul, Nomad).
async fn watch_leader(
    lab: &Lab,
    m: &Marks,
    tier: &str,
    role: Role,
    port: u16,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    let Some(ip) = nodes_of(lab, role).first().copied() else {
        return Ok(());
    };
    let mut client = None;
    loop {
        if client.is_none() {
            client = api_client(lab);
        }
        if let Some(c) = &client {
            if knows_leader(c, ip, port).await {
                m.mark(&format!("{tier}:leader"));
                return Ok(());
            }
        }
        next_tick(start, deadline, m, &format!("{tier} leader")).await?;
    }
}

/// `consul:agent-tokens`: every node's Consul has its agent token (`etc/consul.d/acl-tokens.json`, what
/// `LabHealth` checks).
async fn watch_tokens(
    lab: &Lab,
    m: &Marks,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    loop {
        if lab
            .nodes
            .iter()
            .all(|n| n.root.join("etc/consul.d/acl-tokens.json").is_file())
        {
            m.mark("consul:agent-tokens");
            return Ok(());
        }
        next_tick(start, deadline, m, "every Consul agent token").await?;
    }
}

/// `<tier>:state-<phase>`: the tier's coordination state reached that phase (or a later one).
async fn watch_state(
    lab: &Lab,
    m: &Marks,
    tier: &str,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let storage = crate::imds::lab_token("https://storage.azure.com", now, 3600);
    let https = lab.https();
    loop {
        if let Some(st) = tier_state(&https, lab, &storage, tier).await {
            let Some(rank) = phase_rank(&st.phase) else {
                return Err(BenchError::Failed(format!(
                    "{tier}: needs an operator: {}",
                    st.message.unwrap_or_default()
                )));
            };
            for p in &PHASE_MARKS[..=rank] {
                m.mark(&format!("{tier}:{p}"));
            }
            if st.phase == TierPhase::Done {
                return Ok(());
            }
        }
        tick(
            start,
            deadline,
            m,
            &format!("{tier} tier state done"),
            STATE_EVERY,
        )
        .await?;
    }
}

/// Fails the run as soon as an agent records a failed boot or bootstrap; ends when the run is finished.
/// Agent-driven: `<tier>:every-node-done` once every server of the tier recorded its bootstrap outcome in its
/// boot record (the leader "bootstrapped", the others "already-done" when they saw the tier done), as
/// `LabHealth::bootstrapped` requires.
async fn watch_agents(
    lab: &Lab,
    mode: Mode,
    m: &Marks,
    start: Instant,
    deadline: Duration,
) -> Result<(), BenchError> {
    loop {
        if mode == Mode::Agent {
            let records: Vec<_> = (0..lab.nodes.len()).map(|i| lab.boot_record(i)).collect();
            for (i, r) in records.iter().enumerate() {
                if let Some(r) = r.as_ref().filter(|r| !r.ok) {
                    return Err(BenchError::Failed(format!(
                        "agent on {} failed: {}",
                        lab.nodes[i].def.name,
                        r.last_error.clone().unwrap_or_default()
                    )));
                }
            }
            for (tier, role) in tiers(lab) {
                let done = lab
                    .nodes
                    .iter()
                    .zip(&records)
                    .filter(|(n, _)| n.def.role == role)
                    .all(|(_, r)| {
                        matches!(
                            r.as_ref().and_then(|r| r.bootstrap.as_deref()),
                            Some("bootstrapped" | "already-done" | "recovered")
                        )
                    });
                if done {
                    m.mark(&format!("{tier}:every-node-done"));
                }
            }
        }
        if finished(lab, mode, m) {
            return Ok(());
        }
        next_tick(start, deadline, m, "every tier bootstrapped").await?;
    }
}

/// Watches a tier-bootstrap lab and records when each milestone is first seen, every [`OBSERVE_EVERY`]
/// with one concurrent loop per kind of milestone (so a slow answer delays no other milestone): Vault seal
/// status, Consul and Nomad leaders, and for agent-driven labs each tier's coordination state and the
/// Consul agent tokens. Returns when the run is finished (see [`finished`]); fails on a failed agent, a
/// tier that needs an operator, or the deadline.
async fn observe(
    lab: &Lab,
    mode: Mode,
    m: &Arc<Marks>,
    deadline: Duration,
) -> Result<(), BenchError> {
    let start = Instant::now();
    let agent = mode == Mode::Agent;
    let nomad = !nodes_of(lab, Role::NomadServer).is_empty();
    let skip = || async { Ok::<(), BenchError>(()) };
    tokio::try_join!(
        watch_vault(lab, m, start, deadline),
        watch_leader(lab, m, "consul", Role::ConsulServer, 8501, start, deadline),
        watch_leader(lab, m, "nomad", Role::NomadServer, 4646, start, deadline),
        async {
            if agent {
                watch_tokens(lab, m, start, deadline).await
            } else {
                skip().await
            }
        },
        async {
            if agent {
                watch_state(lab, m, "vault", start, deadline).await
            } else {
                skip().await
            }
        },
        async {
            if agent {
                watch_state(lab, m, "consul", start, deadline).await
            } else {
                skip().await
            }
        },
        async {
            if agent && nomad {
                watch_state(lab, m, "nomad", start, deadline).await
            } else {
                skip().await
            }
        },
        watch_agents(lab, mode, m, start, deadline),
    )
    .map(|_| ())
}

/// The floor's Vault: `PUT /v1/sys/init` (recovery shares 5, threshold 3; auto-unseal) on the tier's first
/// server, retried every [`OBSERVE_EVERY`] until it answers 200 (`vault:init-returned`; `vault:init-sent`: when that request was sent). The secrets it returns
/// are dropped. The observer then sees every server unsealed (`vault:unsealed`).
async fn floor_vault(lab: &Lab, m: &Marks, deadline: Duration) -> Result<(), BenchError> {
    let ip = *nodes_of(lab, Role::VaultServer)
        .first()
        .ok_or_else(|| BenchError::Failed("no vault-server".into()))?;
    let body = serde_json::json!({"recovery_shares": 5, "recovery_threshold": 3});
    let start = Instant::now();
    let mut client = None;
    loop {
        if client.is_none() {
            client = api_client(lab);
        }
        if let Some(c) = &client {
            let sent = Instant::now();
            let r = c
                .put(format!("https://{ip}:8200/v1/sys/init"))
                .json(&body)
                .timeout(Duration::from_secs(60))
                .send()
                .await;
            if let Ok(r) = r {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                if status == 200 {
                    m.mark_at("vault:init-sent", sent);
                    m.mark("vault:init-returned");
                    return Ok(());
                }
                if text.contains("already initialized") {
                    return Err(BenchError::Failed(
                        "floor: Vault already initialized".into(),
                    ));
                }
            }
        }
        if start.elapsed() > deadline {
            return Err(BenchError::Failed(format!(
                "floor: Vault init did not succeed within {deadline:?}"
            )));
        }
        tokio::time::sleep(OBSERVE_EVERY).await;
    }
}

/// The floor's ACL bootstrap (Consul, Nomad): `PUT /v1/acl/bootstrap` on the tier's first server (Consul: on the
/// leader that server names, `via_leader`), retried
/// every [`OBSERVE_EVERY`] while it cannot answer or answers "legacy mode" / "No cluster leader" / 5xx, until
/// 200 (`<tier>:acl-bootstrapped`; `<tier>:acl-sent`: when that request was sent). The management token it
/// returns is dropped.
async fn floor_acl(
    lab: &Lab,
    m: &Marks,
    tier: &str,
    role: Role,
    port: u16,
    via_leader: bool,
    deadline: Duration,
) -> Result<(), BenchError> {
    let Some(first) = nodes_of(lab, role).first().copied() else {
        return Ok(());
    };
    let start = Instant::now();
    let mut client = None;
    loop {
        if client.is_none() {
            client = api_client(lab);
        }
        if let Some(c) = &client {
            // Consul: to the leader the first server names, as the agent sends it (a 1.x follower refuses the
            // bootstrap in ACL legacy mode, seconds after its leader could take it); no leader named: the first
            // server. Nomad: the first server, as the agent calls its own (it forwards to the leader).
            let ip = match via_leader {
                true => leader_ip(c, first, port).await.unwrap_or(first),
                false => first,
            };
            let sent = Instant::now();
            if let Ok(r) = c
                .put(format!("https://{ip}:{port}/v1/acl/bootstrap"))
                .timeout(Duration::from_secs(60))
                .send()
                .await
            {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                if status == 200 {
                    m.mark_at(&format!("{tier}:acl-sent"), sent);
                    m.mark(&format!("{tier}:acl-bootstrapped"));
                    return Ok(());
                }
                if text.contains("no longer allowed") || text.contains("already done") {
                    return Err(BenchError::Failed(format!(
                        "floor: {tier} ACLs already bootstrapped: {}",
                        text.trim()
                    )));
                }
            }
        }
        if start.elapsed() > deadline {
            return Err(BenchError::Failed(format!(
                "floor: {tier} ACL bootstrap did not succeed within {deadline:?}"
            )));
        }
        tokio::time::sleep(OBSERVE_EVERY).await;
    }
}

/// The address of the leader that the server at `ip` names (`/v1/status/leader`: `ip:port` of its RPC).
async fn leader_ip(c: &reqwest::Client, ip: Ipv4Addr, port: u16) -> Option<Ipv4Addr> {
    let r = c
        .get(format!("https://{ip}:{port}/v1/status/leader"))
        .timeout(PROBE_TIMEOUT)
        .send()
        .await
        .ok()?;
    let leader: String = r.json().await.ok()?;
    match leader.parse::<std::net::SocketAddr>().ok()?.ip() {
        std::net::IpAddr::V4(v4) => Some(v4),
        std::net::IpAddr::V6(_) => None,
    }
}

/// How much later than the bench's first sight of `done` the lead agent's log may place its done write: the
/// write's answer reaches the agent after storage committed it.
const LOG_SLACK: f64 = 0.1;

/// When the lead agent's `done` write was answered, in seconds after `t0_wall`: its log line "bootstrapped and
/// escrowed" (`driver::lead`, logged right after that write returned), from the JSON log the lab keeps of
/// every agent. `None`: no such line (the tier was not bootstrapped by this lab's agents).
fn logged_done(log_dir: &Path, leader: &str, tier: &str, t0_wall: SystemTime) -> Option<f64> {
    let text = std::fs::read_to_string(log_dir.join(format!("agent-{leader}.log"))).ok()?;
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"] == "bootstrapped and escrowed" && v["fields"]["tier"] == tier
        })?;
    let at = time::OffsetDateTime::parse(
        line["timestamp"].as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    let t0 = time::OffsetDateTime::from(t0_wall);
    Some((at - t0).as_seconds_f64())
}

/// One tier-bootstrap lab: `Lab::up` (agent-driven or floor), observed until every tier is bootstrapped;
/// `t0` is `Lab::up` returning, i.e. right after it spawned the last agent.
pub async fn tier_run(
    o: &BenchOptions,
    tools: &Tools,
    run: u32,
    mode: Mode,
) -> Result<TierRun, BenchError> {
    let (suffix, net) = match mode {
        Mode::Agent => ("agent", o.bootstrap_nets.0),
        Mode::Floor => ("floor", o.bootstrap_nets.1),
    };
    let dir = PathBuf::from(format!("{}-{suffix}", o.bootstrap_state_dir.display()));
    let mut lo = LabOptions::new(dir, net);
    lo.consul_servers = o.consul_servers;
    lo.vault_servers = o.vault_servers;
    lo.nomad_servers = o.nomad_servers;
    lo.bootstrap = mode == Mode::Agent;
    lo.keep = o.keep;
    if let Some(max) = o.max_load {
        let waiting = Instant::now();
        while load_avg() > max && waiting.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        if waiting.elapsed() > Duration::from_secs(1) {
            say(
                o,
                format!(
                    "  waited {:.0} s for load average <= {max} (now {:.1})",
                    waiting.elapsed().as_secs_f64(),
                    load_avg()
                ),
            );
        }
    }
    let load = load_avg();
    let called = Instant::now();
    let lab = Lab::up(lo, tools.clone()).await?;
    let t0 = Instant::now();
    let t0_wall = SystemTime::now();
    let marks = Arc::new(Marks::new(t0));
    let deadline = o.timeout;
    let result = match mode {
        Mode::Agent => observe(&lab, mode, &marks, deadline).await,
        Mode::Floor => tokio::try_join!(
            observe(&lab, mode, &marks, deadline),
            floor_vault(&lab, &marks, deadline),
            floor_acl(
                &lab,
                &marks,
                "consul",
                Role::ConsulServer,
                8501,
                true,
                deadline
            ),
            floor_acl(
                &lab,
                &marks,
                "nomad",
                Role::NomadServer,
                4646,
                false,
                deadline
            ),
        )
        .map(|_| ()),
    };
    let mut leaders = BTreeMap::new();
    if mode == Mode::Agent {
        for (tier, _) in tiers(&lab) {
            if let Some(st) = lab.tier_state(tier).await {
                let logs = lab.opts.state_dir.join("logs");
                if let Some(t) = logged_done(&logs, &st.leader, tier, t0_wall) {
                    marks.mark_secs(&format!("{tier}:done-logged"), t);
                }
                leaders.insert(tier.to_string(), st.leader);
            }
        }
    }
    if let Err(e) = &result {
        say(
            o,
            format!("{mode:?} lab failed: {e}\n{}", lab.health().await.table()),
        );
        say(
            o,
            format!("logs: {}", lab.opts.state_dir.join("logs").display()),
        );
    }
    lab.down().await;
    result?;
    let mut ms = marks.take();
    // The definitions of "bootstrapped" (docs/PERFORMANCE.md). Agent-driven, a tier is done when its lead
    // agent's `done` write was acknowledged (`done-logged`), as the floor's tier is when the bench's own call
    // was answered; the bench's observation of the state blob (`state-done`) comes later by the lab storage's
    // latency under load, and stands in only when the log line is missing.
    let both = |a: Option<f64>, b: &str| Some(a?.max(*ms.get(b)?));
    let done = |tier: &str| {
        ms.get(&format!("{tier}:done-logged"))
            .or_else(|| ms.get(&format!("{tier}:state-done")))
            .copied()
    };
    if mode == Mode::Agent {
        for tier in ["vault", "consul", "nomad"] {
            let (Some(logged), Some(seen)) = (
                ms.get(&format!("{tier}:done-logged")),
                ms.get(&format!("{tier}:state-done")),
            ) else {
                continue;
            };
            // The agent logs after its write was answered; the bench cannot see `done` before it was written.
            if *logged > seen + LOG_SLACK {
                return Err(BenchError::Failed(format!(
                    "{tier}: the agent logged its done write {logged:.3} s after the spawn, but the bench saw \
                     the state done at {seen:.3} s: the clocks disagree"
                )));
            }
        }
    }
    let derived: Vec<(&str, Option<f64>)> = match mode {
        Mode::Agent => vec![
            ("vault:bootstrapped", both(done("vault"), "vault:unsealed")),
            ("consul:bootstrapped", done("consul")),
            (
                "consul:with-agent-tokens",
                both(done("consul"), "consul:agent-tokens"),
            ),
            ("nomad:bootstrapped", done("nomad")),
        ],
        Mode::Floor => vec![
            ("vault:bootstrapped", ms.get("vault:unsealed").copied()),
            (
                "consul:bootstrapped",
                ms.get("consul:acl-bootstrapped").copied(),
            ),
            (
                "nomad:bootstrapped",
                ms.get("nomad:acl-bootstrapped").copied(),
            ),
        ],
    };
    for (k, v) in derived {
        if let Some(v) = v {
            ms.insert(k.to_string(), v);
        }
    }
    Ok(TierRun {
        run,
        mode,
        up_s: (t0 - called).as_secs_f64(),
        load_avg: load,
        milestones: ms,
        leaders,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_done_time_is_the_lead_agents_log_line_for_that_tier() {
        let dir = std::env::temp_dir().join(format!("tiers-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = time::macros::datetime!(2026-12-07 01:00:00 UTC);
        // The agent's JSON log (`--log-format json`): other lines, another tier's, then this tier's.
        let log = [
            r#"{"timestamp":"2026-12-07T01:00:00.400000Z","level":"INFO","fields":{"message":"services started"}}"#,
            "not json",
            r#"{"timestamp":"2026-12-07T01:00:00.900000Z","level":"INFO","fields":{"message":"bootstrapped and escrowed","tier":"consul"}}"#,
            r#"{"timestamp":"2026-12-07T01:00:01.250000Z","level":"INFO","fields":{"message":"bootstrapped and escrowed","tier":"nomad","escrow_id":"x"}}"#,
        ]
        .join("\n");
        std::fs::write(dir.join("agent-nomad-1.log"), log).unwrap();
        let at = |node: &str, tier: &str| logged_done(&dir, node, tier, t0.into());
        assert!((at("nomad-1", "nomad").unwrap() - 1.25).abs() < 1e-9);
        assert!((at("nomad-1", "consul").unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(at("nomad-1", "vault"), None);
        assert_eq!(at("nomad-0", "nomad"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
