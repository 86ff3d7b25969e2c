//! `hashistack-lab bench --only scale`: many worker agents booting at once against the lab's Azurite and the
//! Key Vault double **with the service limit on** (issue 14 item 3).
//!
//! The lab runs no servers: the bench seeds the shared vault with the cluster material and both Consul tokens,
//! as the server tiers leave it once bootstrapped, and starts `--agents` workers at the same instant. Each worker
//! is a real `hashistack-agent boot` with its own fake IMDS and its own identity (`oid`; each granted Key Vault
//! Secrets User on the shared vault, like a system-assigned identity), the systemd backend with a `systemctl`
//! that does nothing (services are rendered, never started; the agent exits when its boot is done), and the version
//! cache an image carries (so 200 agents do not start 400 Go binaries on the bench's two cores). Blob requests go
//! through a counting TLS proxy in front of Azurite; Key Vault requests are counted by the double itself.
//!
//! Recorded per agent: exit status, spawn → exit on the bench's clock, its boot record (ok, critical path), the
//! Key Vault requests and 429s it got, and every retry sent **before** the `Retry-After` of the 429 it answered
//! (from the double's arrival log, by identity). Per vault and for storage: requests, admissions, 429s, peak and
//! mean rates. The run fails (`missed`) when an agent fails, exceeds the deadline, or retries early.

use super::{load_avg, machine, profile_of, say_if, BenchError};
use crate::keyvault::{roles, Scope, Served, Throttle, SHARED_VAULT};
use crate::lab::{Lab, LabOptions, NodeDef, AZURITE_PORT};
use crate::procs;
use crate::tools::Tools;
use hashistack_agent::config::{AgentConfig, Backend};
use hashistack_agent::node::Role;
use hashistack_agent::render::Layout;
use hashistack_agent::version::Product;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The port of the counting proxy in front of Azurite (on the emulators' address, whose certificate it reuses).
pub const STORAGE_PROXY_PORT: u16 = AZURITE_PORT + 10;
/// Azure's published limits the model compares against.
pub const AZURE_KV_LIMIT: Throttle = Throttle::AZURE;
/// Standard storage account, requests per second (Azure Storage scalability targets).
pub const AZURE_STORAGE_RPS: f64 = 20_000.0;

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub state_dir: PathBuf,
    pub net: u8,
    /// Worker agents booting at once.
    pub agents: u32,
    /// The shared vault's limit during the run (a lowered one, so a few hundred agents press it as thousands
    /// would press Azure's 4,000 per 10 s).
    pub limit: Throttle,
    /// Each agent's deadline: the agent's own material and per-call deadlines, and the bench's spawn → exit check.
    pub deadline: Duration,
    pub verbose: bool,
}

impl ScaleOptions {
    pub fn new(state_dir: PathBuf, net: u8) -> Self {
        ScaleOptions {
            state_dir,
            net,
            agents: 200,
            limit: Throttle {
                limit: 400,
                window: Duration::from_secs(10),
            },
            deadline: Duration::from_secs(120),
            verbose: true,
        }
    }
}

/// One worker agent of the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentSample {
    pub node: String,
    /// `None`: still running at the deadline (killed).
    pub exit_code: Option<i32>,
    /// Release (all agents at once) → exit, seconds (bench clock).
    pub done_s: Option<f64>,
    /// The boot record says ok.
    pub boot_ok: bool,
    pub critical_path_ms: Option<u64>,
    /// Authenticated Key Vault requests (all vaults) and how many were answered 429.
    pub kv_requests: u32,
    pub kv_429: u32,
    /// Requests sent before the `Retry-After` of the 429 they followed had passed.
    pub early_retries: u32,
    /// The shortest gap between a 429 and this agent's next request, minus its `Retry-After`, seconds (≥ 0 when
    /// honoured; `None` without a 429 followed by a request).
    pub min_retry_margin_s: Option<f64>,
    pub last_error: Option<String>,
}

/// Requests to one endpoint over the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rates {
    pub endpoint: String,
    pub requests: u32,
    /// Answered other than 429 (Key Vault: the transactions the limit counts, plus 401 challenges).
    pub served: u32,
    pub throttled: u32,
    /// Unauthenticated challenge round trips (Key Vault).
    pub challenges: u32,
    /// First → last request, seconds from the spawn of the first agent.
    pub first_s: f64,
    pub last_s: f64,
    /// Requests in the busiest second, and answered-not-429 in it.
    pub peak_per_s: u32,
    pub peak_served_per_s: u32,
    /// Requests per second from the first to the last request.
    pub mean_per_s: f64,
    /// The most admitted (authenticated, not 429) in any window of the limit (Key Vault; must be ≤ the limit).
    pub max_admitted_per_window: Option<u32>,
}

/// Machine load during the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peak {
    pub agents_alive: u32,
    /// Sum of the live agents' resident sets (`VmRSS`), MB.
    pub agents_rss_mb: f64,
    pub load_avg: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScaleReport {
    pub date_utc: String,
    pub machine: String,
    pub load_avg: (f64, f64),
    pub agent: PathBuf,
    pub agent_profile: String,
    pub agents: u32,
    /// The shared vault's limit during the run, and Azure's.
    pub limit: u32,
    pub window_s: f64,
    pub azure_limit: u32,
    pub deadline_s: f64,
    pub finished: u32,
    pub failed: u32,
    pub over_deadline: u32,
    pub early_retries: u32,
    /// The smallest (next request − 429) − `Retry-After` over every agent, seconds (≥ 0: all honoured).
    pub min_retry_margin_s: Option<f64>,
    /// Release of the first agent → release of the last (all are spawned first, held, then released).
    pub spawn_span_s: f64,
    /// Release of the first agent → exit of the last.
    pub wall_s: f64,
    /// spawn → exit over the agents that finished: median, 90th percentile, max.
    pub done_median_s: f64,
    pub done_p90_s: f64,
    pub done_max_s: f64,
    pub critical_path_median_ms: f64,
    pub critical_path_max_ms: f64,
    pub agents_throttled: u32,
    /// Key Vault transactions (authenticated, not 429) per agent boot, and challenges; blob requests per boot.
    pub kv_transactions_per_agent: f64,
    pub kv_challenges_per_agent: f64,
    pub storage_requests_per_agent: f64,
    pub vaults: Vec<Rates>,
    pub storage: Rates,
    pub peak: Peak,
    pub samples: Vec<AgentSample>,
}

impl ScaleReport {
    /// One line per failed goal: every agent finished ok within its deadline and honoured every `Retry-After`.
    pub fn missed(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.failed > 0 {
            let names: Vec<String> = self
                .samples
                .iter()
                .filter(|s| !(s.exit_code == Some(0) && s.boot_ok))
                .take(5)
                .map(|s| {
                    format!(
                        "{} (exit {:?}: {})",
                        s.node,
                        s.exit_code,
                        s.last_error.as_deref().unwrap_or("no error recorded")
                    )
                })
                .collect();
            out.push(format!(
                "scale: {} of {} agents failed, e.g. {}",
                self.failed,
                self.agents,
                names.join("; ")
            ));
        }
        if self.over_deadline > 0 {
            out.push(format!(
                "scale: {} agents took longer than the {:.0} s deadline (max {:.1} s)",
                self.over_deadline, self.deadline_s, self.done_max_s
            ));
        }
        if self.early_retries > 0 {
            out.push(format!(
                "scale: {} retries came before the Retry-After of the 429 they followed",
                self.early_retries
            ));
        }
        for v in &self.vaults {
            if let Some(m) = v.max_admitted_per_window.filter(|m| *m > self.limit) {
                out.push(format!(
                    "scale: vault {} admitted {m} transactions in one {:.0} s window, over its limit {}",
                    v.endpoint, self.window_s, self.limit
                ));
            }
        }
        out
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "hashistack-lab bench --only scale, {} (UTC): {} worker agents at once; agent {} ({})\nmachine: {} (load average {:.1} at start, {:.1} at end)\n",
            self.date_utc,
            self.agents,
            self.agent.display(),
            self.agent_profile,
            self.machine,
            self.load_avg.0,
            self.load_avg.1
        );
        s.push_str(&format!(
            "shared vault limit {} per {:.0} s (Azure: {}), deadline {:.0} s per agent\n\n",
            self.limit, self.window_s, self.azure_limit, self.deadline_s
        ));
        s.push_str(&format!(
            "agents finished {} / {}, failed {}, over the deadline {}, early retries {}, throttled at least once {}\n",
            self.finished,
            self.agents,
            self.failed,
            self.over_deadline,
            self.early_retries,
            self.agents_throttled
        ));
        s.push_str(&format!(
            "release -> done: median {:.1} s, p90 {:.1} s, max {:.1} s; all released within {:.3} s, all done {:.1} s after the first release\n",
            self.done_median_s, self.done_p90_s, self.done_max_s, self.spawn_span_s, self.wall_s
        ));
        if let Some(m) = self.min_retry_margin_s {
            s.push_str(&format!(
                "Retry-After: the earliest retry came {m:.3} s after the 429's Retry-After had passed (negative: early)\n"
            ));
        }
        s.push_str(&format!(
            "critical path (agent clock): median {:.0} ms, max {:.0} ms\n",
            self.critical_path_median_ms, self.critical_path_max_ms
        ));
        s.push_str(&format!(
            "per agent boot: {:.2} Key Vault transactions + {:.2} challenges, {:.2} blob requests\n",
            self.kv_transactions_per_agent,
            self.kv_challenges_per_agent,
            self.storage_requests_per_agent
        ));
        s.push_str(&format!(
            "peak: {} agents alive, {:.0} MB agents' RSS, load average {:.1}\n\n",
            self.peak.agents_alive, self.peak.agents_rss_mb, self.peak.load_avg
        ));
        s.push_str(&format!(
            "{:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>13}\n",
            "ENDPOINT",
            "REQS",
            "SERVED",
            "429",
            "401",
            "PEAK/s",
            "SERVED/s",
            "MEAN/s",
            "MAX/WINDOW"
        ));
        for r in self.vaults.iter().chain(std::iter::once(&self.storage)) {
            s.push_str(&format!(
                "{:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9.1} {:>13}\n",
                r.endpoint,
                r.requests,
                r.served,
                r.throttled,
                r.challenges,
                r.peak_per_s,
                r.peak_served_per_s,
                r.mean_per_s,
                r.max_admitted_per_window
                    .map_or("-".to_string(), |m| m.to_string())
            ));
        }
        s
    }
}

/// One request as the bench saw it: arrival and answer (seconds from t0), status, identity, `Retry-After`.
#[derive(Debug, Clone)]
struct Seen {
    at: f64,
    /// When the answer was ready to be written (storage: the arrival; only Key Vault's answers are judged).
    answered: f64,
    /// The client sent it no earlier than this (Key Vault: its connection's previous answer, or its accept).
    sent_after: f64,
    /// The connection it came on (Key Vault; storage: 0).
    connection: u64,
    status: u16,
    principal: Option<String>,
    retry_after: Option<u64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Rates of one endpoint's requests; `window`: count admissions per window of the limit (Key Vault).
fn rates(endpoint: &str, seen: &[Seen], window: Option<f64>) -> Rates {
    let mut at: Vec<f64> = seen.iter().map(|s| s.at).collect();
    at.sort_by(f64::total_cmp);
    let (first_s, last_s) = (
        at.first().copied().unwrap_or(0.0),
        at.last().copied().unwrap_or(0.0),
    );
    let mut per_s: BTreeMap<i64, (u32, u32)> = BTreeMap::new();
    for s in seen {
        let e = per_s.entry(s.at.floor() as i64).or_default();
        e.0 += 1;
        if s.status != 429 {
            e.1 += 1;
        }
    }
    let max_admitted_per_window = window.map(|w| {
        let mut adm: Vec<f64> = seen
            .iter()
            .filter(|s| s.principal.is_some() && s.status != 429)
            .map(|s| s.at)
            .collect();
        adm.sort_by(f64::total_cmp);
        let mut best = 0usize;
        let mut j = 0usize;
        for i in 0..adm.len() {
            while adm[i] - adm[j] >= w {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best as u32
    });
    let n = seen.len() as u32;
    Rates {
        endpoint: endpoint.to_string(),
        requests: n,
        served: seen.iter().filter(|s| s.status != 429).count() as u32,
        throttled: seen.iter().filter(|s| s.status == 429).count() as u32,
        challenges: seen.iter().filter(|s| s.principal.is_none()).count() as u32,
        first_s,
        last_s,
        peak_per_s: per_s.values().map(|v| v.0).max().unwrap_or(0),
        peak_served_per_s: per_s.values().map(|v| v.1).max().unwrap_or(0),
        mean_per_s: if last_s > first_s {
            f64::from(n) / (last_s - first_s)
        } else {
            f64::from(n)
        },
        max_admitted_per_window,
    }
}

/// Per identity: requests, 429s, requests sent inside the hold of a 429 before them, and the smallest margin
/// seen (gap − Retry-After, the gap from a 429's answer to that identity's next request).
///
/// The rule: a 429 answered at `t` with `Retry-After: r` holds its identity's requests to that vault until
/// `t + r`; a request that arrives before `t + r` and that the client provably sent after it had **read** the
/// 429 is early. The double sees arrivals only, and on a loaded machine both ends lag (the double reads a request
/// late; the agent reads an answer late): neither an arrival after `t` nor a send after `t` proves the client had
/// seen the 429, and counting those would count reads sent together with the throttled one. What the double can
/// prove, serving HTTP/1.1 without pipelining: a request on the 429's own connection came after the client read
/// the 429 (a client reuses a connection only once it has read its answer); and a request on any connection was
/// sent after the answer before it on that connection, or (its first) after the connection's accept
/// (`Served::sent_after`) — so one whose `sent_after` is at or after the arrival of the 429 connection's next
/// request was sent after the client had read the 429 too. A 429 whose connection is never reused judges
/// nothing beyond that. Every 429 is checked against every later request, not only the next.
/// A 429's hold: answer time, Retry-After, connection, when the client had provably read it.
type Hold = (f64, f64, u64, Option<f64>);

fn retry_discipline(seen: &[Seen]) -> BTreeMap<String, (u32, u32, u32, Option<f64>)> {
    let mut by: BTreeMap<String, Vec<&Seen>> = BTreeMap::new();
    for s in seen {
        if let Some(p) = &s.principal {
            by.entry(p.clone()).or_default().push(s);
        }
    }
    by.into_iter()
        .map(|(p, mut v)| {
            v.sort_by(|a, b| a.at.total_cmp(&b.at));
            // Per 429: its answer `t`, its Retry-After, its connection, and from when the client had
            // provably read it: its connection's next request arrived (HTTP/1.1: an answer is read before the
            // connection is reused); `None`: never reused.
            let holds: Vec<Hold> = v
                .iter()
                .filter_map(|q| match (q.status, q.retry_after) {
                    (429, Some(after)) => {
                        let read = v
                            .iter()
                            .filter(|r| r.connection == q.connection && r.at > q.answered)
                            .map(|r| r.at)
                            .reduce(f64::min);
                        Some((q.answered, after as f64, q.connection, read))
                    }
                    _ => None,
                })
                .collect();
            let after_read = |r: &Seen, &(t, _, conn, read): &Hold| {
                (r.connection == conn && r.at > t) || read.is_some_and(|x| r.sent_after >= x)
            };
            let throttled = v.iter().filter(|s| s.status == 429).count() as u32;
            let early = v
                .iter()
                .filter(|r| holds.iter().any(|h| after_read(r, h) && r.at < h.0 + h.1))
                .count() as u32;
            let margin = holds
                .iter()
                .filter_map(|h| {
                    let next = v.iter().find(|r| after_read(r, h))?;
                    Some((next.at - h.0) - h.1)
                })
                .reduce(f64::min);
            (p, (v.len() as u32, throttled, early, margin))
        })
        .collect()
}

/// The identity (`oid`) of worker `i`: one per agent, so the double's log tells the agents apart.
pub fn worker_oid(i: u32) -> String {
    format!("00000000-0000-4000-8001-{i:012}")
}

/// Worker `i`'s address: 127.<net>.<1 + i / 250>.<1 + i % 250> (the lab's own nodes live on 127.<net>.0.x).
pub fn worker_ip(net: u8, i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, net, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// The workers' definitions: the lab's worker tags (as its `hs-workers` scale set carries them) with the blob
/// endpoint moved to the counting proxy.
fn worker_defs(o: &ScaleOptions, base: &LabOptions) -> Result<Vec<NodeDef>, BenchError> {
    let mut tmpl_opts = base.clone();
    (tmpl_opts.consul_servers, tmpl_opts.vault_servers) = (3, 3);
    (tmpl_opts.nomad_servers, tmpl_opts.workers) = (3, 1);
    tmpl_opts.jumpbox = Some(false);
    let tmpl = crate::lab::node_defs(&tmpl_opts)
        .into_iter()
        .find(|d| d.role == Role::Worker)
        .ok_or_else(|| BenchError::Failed("no worker in the lab's node definitions".into()))?;
    let blob = format!(
        "https://{}:{STORAGE_PROXY_PORT}/devstoreaccount1/",
        base.ip(1)
    );
    Ok((0..o.agents)
        .map(|i| {
            let mut d = tmpl.clone();
            d.name = format!("worker-{i:03}");
            d.ip = worker_ip(o.net, i);
            for (k, v) in d.tags.iter_mut() {
                if k == hashistack_agent::node::TAG_BLOB_ENDPOINT {
                    *v = blob.clone();
                }
            }
            d
        })
        .collect())
}

/// What the server tiers leave in the shared vault once bootstrapped: the CA certificate, the Consul gossip key,
/// the Nomad client certificate and key, the Consul agent token and Nomad's Consul token.
fn seed_shared_vault(lab: &Lab) -> Result<(), BenchError> {
    use base64::Engine;
    let kv = lab
        .keyvault
        .as_ref()
        .and_then(|k| k.vault(SHARED_VAULT))
        .ok_or_else(|| BenchError::Failed("the lab has no shared vault".into()))?;
    let cluster = &lab.opts.cluster;
    let now = time::OffsetDateTime::now_utc();
    let failed = |e: String| BenchError::Failed(format!("seeding the shared vault: {e}"));
    let (ca_pem, ca_key) =
        hashistack_agent::tls::generate_ca(&format!("hashistack {cluster} cluster CA"), 30, now)
            .map_err(|e| failed(e.to_string()))?;
    let ca = hashistack_agent::tls::ClusterCa::from_pem(&ca_pem, &ca_key)
        .map_err(|e| failed(e.to_string()))?;
    let sans: Vec<String> = hashistack_agent::material::NOMAD_CLIENT_SANS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let client = ca
        .issue("client.global.nomad", &sans, 30, now)
        .map_err(|e| failed(e.to_string()))?;
    let gossip = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let token = || hashistack_agent::ids::uuid_v4().to_string();
    let n = hashistack_agent::material::names(cluster);
    for (name, value) in [
        (n.consul_gossip_key, gossip),
        (n.nomad_client_key, client.key_pem),
        (n.nomad_client_cert, client.cert_pem),
        (
            hashistack_agent::names::agent_token_secret(cluster),
            token(),
        ),
        (
            hashistack_agent::names::nomad_token_secret(cluster),
            token(),
        ),
        (n.ca_cert, ca_pem),
    ] {
        kv.set_secret(&name, &value)
            .map_err(|e| failed(e.to_string()))?;
    }
    Ok(())
}

/// `systemctl` for agents whose services are not to be started: every unit "inactive" (exit 3, as
/// systemctl(1) documents for is-active), every other verb succeeds and does nothing.
fn fake_systemctl(dir: &Path) -> Result<PathBuf, BenchError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", dir.display())))?;
    let p = dir.join("systemctl");
    std::fs::write(
        &p,
        "#!/bin/sh\n# hashistack-lab bench --only scale: services are not started.\ncase \"$1\" in is-active) exit 3;; esac\nexit 0\n",
    )
    .and_then(|_| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)))
    .map_err(|e| BenchError::Failed(format!("{}: {e}", p.display())))?;
    Ok(dir.to_path_buf())
}

type ProxyLog = Arc<Mutex<Vec<(Instant, u16, Option<String>)>>>;

/// The `oid` claim of a request's bearer token (no signature check: the lab's tokens are unsigned).
fn bearer_oid(h: &hyper::HeaderMap) -> Option<String> {
    use base64::Engine;
    let t = h
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t.split('.').nth(1)?)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    v["oid"].as_str().map(str::to_string)
}

/// A TLS-terminating proxy in front of Azurite that logs each request's arrival, status and identity.
async fn storage_proxy(
    lab: &Lab,
    log: ProxyLog,
) -> Result<tokio::task::JoinHandle<()>, BenchError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let st = &lab.opts.state_dir;
    let read = |p: PathBuf| {
        std::fs::read(&p).map_err(|e| BenchError::Failed(format!("{}: {e}", p.display())))
    };
    let cert_pem = read(st.join("emulator.pem"))?;
    let key_pem = read(st.join("secrets/emulator-key.pem"))?;
    let tls = |e: String| BenchError::Failed(format!("storage proxy TLS: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let addr = SocketAddr::from((lab.opts.ip(1), STORAGE_PROXY_PORT));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| BenchError::Failed(format!("storage proxy on {addr}: {e}")))?;
    let upstream = lab.blob_endpoint();
    let upstream = upstream
        .trim_end_matches('/')
        .trim_end_matches("/devstoreaccount1")
        .to_string();
    let client = lab.https();
    Ok(tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            // No Nagle, as the storage front end it stands in front of (see keyvault/routes.rs accept_loop).
            let _ = tcp.set_nodelay(true);
            let (acceptor, client, upstream, log) = (
                acceptor.clone(),
                client.clone(),
                upstream.clone(),
                log.clone(),
            );
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (client, upstream, log) = (client.clone(), upstream.clone(), log.clone());
                    async move {
                        let at = Instant::now();
                        let oid = bearer_oid(req.headers());
                        let r = forward(&client, &upstream, req).await;
                        let status = r.as_ref().map_or(502, |r| r.status().as_u16());
                        log.lock().expect("proxy log").push((at, status, oid));
                        Ok::<_, std::convert::Infallible>(r.unwrap_or_else(|_| {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                            r
                        }))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ()> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| ())?.to_bytes();
    let url = format!(
        "{upstream}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut rb = client.request(parts.method, url).body(body);
    for (k, v) in parts.headers.iter() {
        if k != hyper::header::HOST && k != hyper::header::CONTENT_LENGTH {
            rb = rb.header(k, v);
        }
    }
    let r = rb.send().await.map_err(|_| ())?;
    let mut out = Response::builder().status(r.status());
    for (k, v) in r.headers() {
        if k != hyper::header::CONTENT_LENGTH && k != hyper::header::TRANSFER_ENCODING {
            out = out.header(k, v);
        }
    }
    let bytes = r.bytes().await.map_err(|_| ())?;
    out.body(Full::new(bytes)).map_err(|_| ())
}

fn vm_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Runs the scale simulation once: a lab without servers, `o.agents` workers booted at once, then torn down.
pub async fn scale_run(o: &ScaleOptions, tools: Tools) -> Result<ScaleReport, BenchError> {
    let say = |m: String| say_if(o.verbose, m);
    if o.agents == 0 || o.agents > 250 * 200 {
        return Err(BenchError::Failed(format!(
            "--agents {}: between 1 and 50000",
            o.agents
        )));
    }
    let mut lo = LabOptions::new(o.state_dir.clone(), o.net);
    (
        lo.consul_servers,
        lo.vault_servers,
        lo.nomad_servers,
        lo.workers,
    ) = (0, 0, 0, 0);
    (lo.jumpbox, lo.start_agents, lo.bootstrap) = (Some(false), false, false);
    lo.verbose = o.verbose;
    let defs = worker_defs(o, &lo)?;
    say(format!(
        "scale: lab on 127.{}.0.x (Azurite, Key Vault double), {} workers on 127.{}.1.1+",
        o.net, o.agents, o.net
    ));
    let mut lab = Lab::up(lo, tools.clone()).await?;
    let result = run_in(o, &tools, &mut lab, defs).await;
    lab.down().await;
    result
}

async fn run_in(
    o: &ScaleOptions,
    tools: &Tools,
    lab: &mut Lab,
    defs: Vec<NodeDef>,
) -> Result<ScaleReport, BenchError> {
    let say = |m: String| say_if(o.verbose, m);
    let load_start = load_avg();
    seed_shared_vault(lab)?;
    let shared = lab
        .keyvault
        .as_ref()
        .and_then(|k| k.vault(SHARED_VAULT))
        .cloned()
        .ok_or_else(|| BenchError::Failed("the lab has no shared vault".into()))?;
    let proxy_log: ProxyLog = Arc::default();
    let proxy = storage_proxy(lab, proxy_log.clone()).await?;
    let fakebin = fake_systemctl(&lab.opts.state_dir.join("fakebin"))?;
    let secs = o.deadline.as_secs().max(1);
    for (i, def) in defs.into_iter().enumerate() {
        let oid = worker_oid(i as u32);
        let n = lab.add_node(def).await?;
        lab.nodes[n].imds.lock().expect("imds").oid = oid.clone();
        shared.grant(&oid, roles::SECRETS_USER, Scope::Vault);
        let mut cfg = lab.node_config(n);
        cfg.services.backend = Backend::Systemd;
        cfg.material.deadline_secs = secs;
        cfg.bootstrap.azure_deadline_secs = secs;
        lab.write_node_config(n, &cfg)?;
    }
    // The version cache an image carries: probed once here, copied to every node.
    let cfg0: AgentConfig = lab.node_config(0);
    let layout0 = Layout::from_paths(&cfg0.paths);
    hashistack_agent::boot::detect_versions(&cfg0, &layout0, &[Product::Consul, Product::Nomad])
        .await
        .map_err(|e| BenchError::Failed(format!("version cache: {e}")))?;
    let cache = layout0.state_dir().join("versions.json");
    for n in 1..lab.nodes.len() {
        let dir = Layout::new(&lab.nodes[n].root).state_dir();
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::copy(&cache, dir.join("versions.json")))
            .map_err(|e| BenchError::Failed(format!("{}: {e}", dir.display())))?;
    }
    shared.clear_served();
    shared.throttle(Some(o.limit));
    let path = format!(
        "{}:{}",
        fakebin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (log_dir, pid_dir) = (
        lab.opts.state_dir.join("logs"),
        lab.opts.state_dir.join("pids"),
    );
    say(format!(
        "scale: shared vault limited to {} per {:?}; spawning {} agents",
        o.limit.limit,
        o.limit.window,
        lab.nodes.len()
    ));
    // All at once: each agent is spawned behind a shell that stops itself (SIGSTOP) before it execs the agent;
    // once every one is stopped, one SIGCONT each releases them within milliseconds of each other. Spawning 200
    // processes one after another would otherwise take seconds on two busy cores.
    let alive = Arc::new(AtomicUsize::new(0));
    let pids: Arc<Mutex<Vec<u32>>> = Arc::default();
    let mut procs_ = Vec::new();
    let spawned = Instant::now();
    for n in 0..lab.nodes.len() {
        let node = &lab.nodes[n];
        let args: Vec<String> = vec![
            "-c".into(),
            "kill -STOP $$; exec \"$0\" \"$@\"".into(),
            tools.agent.display().to_string(),
            "--log-format".into(),
            "json".into(),
            "boot".into(),
            "--config".into(),
            node.config_path.display().to_string(),
        ];
        let p = procs::spawn(
            &format!("agent-{}", node.def.name),
            Path::new("/bin/sh"),
            &args,
            &[("PATH".to_string(), path.clone())],
            &log_dir,
            &pid_dir,
            None,
        )
        .map_err(|e| BenchError::Failed(format!("spawn agent: {e}")))?;
        procs_.push((n, p));
    }
    let stopped = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
            .unwrap_or(false)
    };
    while !procs_.iter().all(|(_, p)| p.pid().is_some_and(stopped)) {
        if spawned.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Failed(
                "the agents' start barrier: not every shell stopped within 120 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    say(format!(
        "scale: {} agents spawned and held in {:.1} s; releasing them",
        procs_.len(),
        spawned.elapsed().as_secs_f64()
    ));
    let t0 = Instant::now();
    let mut waits = tokio::task::JoinSet::new();
    for (n, mut p) in procs_ {
        if let Some(pid) = p.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
            pids.lock().expect("pids").push(pid);
        }
        alive.fetch_add(1, Ordering::SeqCst);
        let (alive, limit) = (alive.clone(), o.deadline + Duration::from_secs(10));
        waits.spawn(async move {
            let r = tokio::time::timeout(limit, p.child.wait()).await;
            let done = t0.elapsed().as_secs_f64();
            alive.fetch_sub(1, Ordering::SeqCst);
            let out = match r {
                Ok(Ok(st)) => (n, st.code(), Some(done)),
                _ => {
                    p.kill().await;
                    (n, None, None)
                }
            };
            let _ = std::fs::remove_file(&p.pid_file);
            out
        });
    }
    // The machine while they run: agents alive, their resident memory, the load average.
    let sampling = {
        let (alive, pids) = (alive.clone(), pids.clone());
        tokio::spawn(async move {
            let mut peak = Peak {
                agents_alive: 0,
                agents_rss_mb: 0.0,
                load_avg: 0.0,
            };
            loop {
                let a = alive.load(Ordering::SeqCst) as u32;
                let rss: u64 = pids
                    .lock()
                    .expect("pids")
                    .iter()
                    .filter_map(|p| vm_rss(*p))
                    .sum();
                peak.agents_alive = peak.agents_alive.max(a);
                peak.agents_rss_mb = peak.agents_rss_mb.max(rss as f64 / 1e6);
                peak.load_avg = peak.load_avg.max(load_avg());
                if a == 0 {
                    return peak;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let spawn_span_s = t0.elapsed().as_secs_f64();
    let mut exits = BTreeMap::new();
    while let Some(r) = waits.join_next().await {
        let (n, code, done) = r.map_err(|e| BenchError::Failed(format!("agent wait: {e}")))?;
        exits.insert(n, (code, done));
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let peak = sampling
        .await
        .map_err(|e| BenchError::Failed(format!("sampler: {e}")))?;
    shared.throttle(None);
    proxy.abort();
    say(format!("scale: all agents done after {wall_s:.1} s"));

    let rel = |at: Instant| at.saturating_duration_since(t0).as_secs_f64();
    let kv_seen: Vec<Seen> = shared
        .served()
        .iter()
        .map(|s: &Served| Seen {
            at: rel(s.at),
            answered: rel(s.answered),
            sent_after: rel(s.sent_after),
            connection: s.connection,
            status: s.status,
            principal: s.principal.clone(),
            retry_after: s.retry_after,
        })
        .collect();
    let blob_seen: Vec<Seen> = proxy_log
        .lock()
        .expect("proxy log")
        .iter()
        .map(|(at, status, oid)| Seen {
            at: rel(*at),
            answered: rel(*at),
            sent_after: 0.0,
            connection: 0,
            status: *status,
            principal: oid.clone(),
            retry_after: None,
        })
        .collect();
    let discipline = retry_discipline(&kv_seen);
    let mut samples = Vec::new();
    for (n, node) in lab.nodes.iter().enumerate() {
        let (code, done) = exits.get(&n).cloned().unwrap_or((None, None));
        let rec = lab.boot_record(n);
        let oid = worker_oid(n as u32);
        let (kv_requests, kv_429, early, margin) =
            discipline.get(&oid).cloned().unwrap_or((0, 0, 0, None));
        samples.push(AgentSample {
            node: node.def.name.clone(),
            exit_code: code,
            done_s: done,
            boot_ok: rec.as_ref().is_some_and(|r| r.ok),
            critical_path_ms: rec.as_ref().and_then(|r| r.critical_path_ms),
            kv_requests,
            kv_429,
            early_retries: early,
            min_retry_margin_s: margin,
            last_error: rec.and_then(|r| r.last_error),
        });
    }
    let agents = samples.len() as u32;
    let ok = |s: &AgentSample| s.exit_code == Some(0) && s.boot_ok;
    let deadline_s = o.deadline.as_secs_f64();
    let mut done: Vec<f64> = samples
        .iter()
        .filter(|s| ok(s))
        .filter_map(|s| s.done_s)
        .collect();
    done.sort_by(f64::total_cmp);
    let mut cp: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.critical_path_ms.map(|c| c as f64))
        .collect();
    cp.sort_by(f64::total_cmp);
    let vault = rates(SHARED_VAULT, &kv_seen, Some(o.limit.window.as_secs_f64()));
    let storage = rates("storage", &blob_seen, None);
    let per = |x: u32| f64::from(x) / f64::from(agents.max(1));
    Ok(ScaleReport {
        date_utc: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        machine: machine(),
        load_avg: (load_start, load_avg()),
        agent: tools.agent.clone(),
        agent_profile: profile_of(&tools.agent).to_string(),
        agents,
        limit: o.limit.limit,
        window_s: o.limit.window.as_secs_f64(),
        azure_limit: AZURE_KV_LIMIT.limit,
        deadline_s,
        finished: samples.iter().filter(|s| ok(s)).count() as u32,
        failed: samples.iter().filter(|s| !ok(s)).count() as u32,
        over_deadline: samples
            .iter()
            .filter(|s| s.done_s.is_none_or(|d| d > deadline_s))
            .count() as u32,
        early_retries: samples.iter().map(|s| s.early_retries).sum(),
        min_retry_margin_s: samples
            .iter()
            .filter_map(|s| s.min_retry_margin_s)
            .reduce(f64::min),
        spawn_span_s,
        wall_s,
        done_median_s: percentile(&done, 0.5),
        done_p90_s: percentile(&done, 0.9),
        done_max_s: done.last().copied().unwrap_or(f64::NAN),
        critical_path_median_ms: percentile(&cp, 0.5),
        critical_path_max_ms: cp.last().copied().unwrap_or(f64::NAN),
        agents_throttled: samples.iter().filter(|s| s.kv_429 > 0).count() as u32,
        kv_transactions_per_agent: per(vault.served - vault.challenges),
        kv_challenges_per_agent: per(vault.challenges),
        storage_requests_per_agent: per(storage.requests),
        vaults: vec![vault],
        storage,
        peak,
        samples,
    })
}

#[cfg(test)]
mod tests;
