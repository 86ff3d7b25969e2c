//! A **contract double of Nomad's documented HTTP API** — not Nomad, and not anything HashiCorp ships: a
//! small server that answers the few routes the agent and the tests use, in the shapes and with the error
//! texts Nomad's API reference and source document. The lab needs it because Nomad ≥ 1.7 is not open
//! source and cannot be installed here (see lab/components.md, "Nomad contract double").
//!
//! It is an executable the agent runs exactly like the real binary: `hashistack-lab` started through a
//! link named `nomad` (the lab makes `<state_dir>/bin/nomad -> hashistack-lab`) behaves as
//! - `nomad version`: prints `Nomad v1.9.5 (hashistack contract double)`;
//! - `nomad agent -config=<dir|file> …`: reads every `*.json` of each directory (the agent's `nomad.json`
//!   and `gossip.json`), merged; serves HTTP(S) on `bind_addr:<ports.http, 4646>` with `tls.cert_file` and
//!   `tls.key_file` when `tls.http` is true; exits 0 on SIGTERM or SIGINT; SIGHUP reloads the certificate.
//!
//! Copied from Nomad (API docs `/v1/status`, `/v1/acl/*`, `/v1/agent`, `/v1/nodes`, `/v1/node`,
//! `/v1/operator/raft`; `nomad/acl_endpoint.go`, `command/agent/acl_endpoint.go`, `acl/policy.go`,
//! `nomad/structs`):
//! - `GET /v1/status/leader` → `"<ip>:4647"`; `GET /v1/status/peers` → `["<ip>:4647", …]`; both answer
//!   500 `No cluster leader` until the servers formed a cluster.
//! - `PUT|POST /v1/acl/bootstrap` with an optional body `{"BootstrapSecret": "<uuid>"}` (Nomad ≥ 1.3.2):
//!   the first call creates the management token `{"AccessorID","SecretID","Name":"Bootstrap Token",
//!   "Type":"management","Global":true,…}`, using the given secret as `SecretID`; later calls answer 400
//!   `ACL bootstrap already done (reset index: N)`; a secret that is not a UUID is 400 `invalid acl token`
//!   (checked after "already done", as Nomad does); ACLs off is 400 `ACL support disabled`.
//!   The documented reset: a file `<data_dir>/server/acl-bootstrap-reset` on the leader holding N allows
//!   one more bootstrap; another number is 400 `Invalid bootstrap reset index (specified M, reset index: N)`.
//!   Earlier tokens stay valid after a reset (as documented).
//! - ACL policies: `PUT|POST /v1/acl/policy/:name` `{"Name","Description","Rules"}` (an upsert, empty 200
//!   answer; the body's name must match the path, else 400 `ACL policy name does not match request path`;
//!   an invalid name, description or rules is 400 `policy 0 invalid: 1 error occurred: …` with Nomad's
//!   texts, e.g. `failed to parse rules: Invalid node policy: &acl.NodePolicy{Policy:"reed"}` or
//!   `Invalid or duplicate policy keys: nod`); `GET /v1/acl/policies` (stubs; a client token sees only its
//!   own policies) and `GET /v1/acl/policy/:name` (with `RulesJSON`; 404 `ACL policy not found`).
//!   Rules are a hand-parsed subset of Nomad's HCL policy language (and its JSON form): the blocks `node`,
//!   `agent` and `operator` with `policy = "deny" | "read" | "write"`. `namespace`, `node_pool`,
//!   `host_volume`, `plugin`, `quota` and operator `capabilities` are valid Nomad but refused by the double
//!   with a 400 that says so. Merging follows Nomad: `deny` wins, otherwise the most privilege.
//! - ACL tokens: `PUT|POST /v1/acl/token` `{"Name","Type","Policies","Global"}` creates a token (400
//!   `token 0 invalid: …` with `client token missing policies or roles`, `management token cannot be
//!   associated with policies or roles`, `token type must be client or management`, `token name too
//!   long`); `GET /v1/acl/tokens` (stubs without secrets, management only); `GET /v1/acl/token/:accessor`
//!   (management, or the token itself; 404 `ACL token not found`); `GET /v1/acl/token/self`.
//!   Every ACL write needs a management token (403 `Permission denied`) and goes to the leader.
//! - Enforcement (ACLs on): `GET /v1/nodes`, `GET /v1/node/:id` and `GET /v1/agent/members` need
//!   `node:read` (as in Nomad, where `Status.Members` checks node read), `GET /v1/agent/self` needs
//!   `agent:read`, `GET /v1/operator/raft/configuration` needs `operator:read`; a management token passes
//!   everything; no token is the anonymous token (the `anonymous` policy, if one exists); an unknown
//!   secret is 403 `ACL token not found`; a refused capability is 403 `Permission denied`.
//! - Client nodes: `GET /v1/nodes` (optionally `?prefix=`) lists stubs `{Address, ID, Datacenter, Name,
//!   NodeClass, NodePool, Version, Drain, SchedulingEligibility, Status, StatusDescription, Drivers,
//!   HostVolumes, LastDrain, CreateIndex, ModifyIndex}`; `GET /v1/node/:id` the node (never its
//!   `SecretID`; 404 `node not found`). A node is `ready` while it heartbeats and `down` once no heartbeat
//!   arrived within `server.min_heartbeat_ttl` + `server.heartbeat_grace`; a heartbeat from a `down` node
//!   makes it `ready` again. A new leader gives every node a fresh TTL (Nomad's failover grace). Node
//!   events (`Node registered`, `Node heartbeat missed`, `Node reregistered by heartbeat`) keep the last 10.
//! - `GET /v1/operator/raft/configuration` → `{"Index","Servers":[{"ID","Node","Address","Leader",
//!   "Voter","RaftProtocol"}]}` (the answering servers; IDs persisted in `<data_dir>/server/node-id`).
//! - Snapshots (API docs `/v1/operator/snapshot`; `command/agent/operator_endpoint.go`,
//!   `nomad/operator_endpoint.go` of Nomad 1.x): `GET /v1/operator/snapshot` (forwarded to the leader unless
//!   `?stale`) and `PUT|POST /v1/operator/snapshot` (at the leader) need a management token (403 `Permission
//!   denied` otherwise; the `snapshot-save` operator capability is Nomad 2.0's); the save answers the archive with
//!   `Digest: sha-256=<base64>`; a restore of an archive that does not read is 500 `failed to restore from
//!   snapshot: …`. The archive is the double's own (its replicated store), not Nomad's gzipped tar.
//! - Non-leader servers forward ACL writes and registrations to the leader; a client agent forwards the
//!   cluster-wide routes to its servers and resolves tokens through them (`/v1/acl/token/self`,
//!   `/v1/acl/policy/:name`) for its own `/v1/agent/self`.
//! - Workload identities (lab/src/nomad_identity.rs, from `nomad/encrypter.go`, `nomad/structs/identity.go`,
//!   `workload_id.go`, `command/agent/keyring_endpoint.go`): the leader creates a root key (RSA 2048) when the
//!   cluster forms, replicated with the rest of the state; `GET /.well-known/jwks.json` (unauthenticated, any
//!   agent; clients ask their servers) lists its public key (`{"keys": [{"use": "sig", "kty": "RSA", "kid",
//!   "alg": "RS256", "n", "e"}]}`); identities are RS256 JWTs with header `kid` and Nomad's claims.
//!
//! Not Nomad, the double's own plumbing (documented so nobody mistakes it for Nomad):
//! - Clustering is a stand-in for raft and serf: every server polls the `server_join.retry_join` peers over
//!   HTTPS at `/v1/double/peer` (guarded by the gossip key `server.encrypt`); once `bootstrap_expect`
//!   servers answer (a majority after the cluster first formed), all agree that the lowest answering
//!   address leads. The replicated state — ACL tokens and policies, and client nodes — lives in one
//!   store with a raft-like index: only the leader writes it, pushes every write to the answering
//!   followers before it answers, and every server adopts the highest-indexed copy it sees; it is persisted
//!   in `<data_dir>/server/double-state.json` (0600) so a restart keeps it. Heartbeat times are the
//!   leader's memory only (as in Nomad); only status changes are writes.
//! - Client registration: where a real client speaks mTLS RPC on 4647, the double's client (`client.enabled`)
//!   sends its node to `PUT /v1/double/node` over HTTPS on a server's HTTP port, with `tls.cert_file` /
//!   `tls.key_file` as its client certificate, at once and then every HeartbeatTTL/2. The servers request a
//!   client certificate on every TLS connection (optional, so ordinary API clients need none) and verify
//!   it against `tls.ca_file`, the way Nomad's RPC with `verify_incoming` does: a certificate from another
//!   CA fails the handshake, and a registration without one is refused (403). The node ID and node secret
//!   are generated once and kept in `<data_dir>/client/client-id` and `secret-id` (0600); a registration
//!   under a known ID with another secret is refused (`node secret ID does not match`). Without
//!   `tls.ca_file` nobody can register.
//! - `PUT /v1/double/identity` (guarded by the gossip key): signs a task's identity from `{"Namespace", "JobID",
//!   "Group", "Task", "AllocID", "Identity", "Audience", "TTLSeconds", "IssuedAt"?}` — a stand-in for the
//!   identities Nomad's plan applier signs for each allocation, so tests can hold one (and an expired one).
//!
//! - Jobs and allocations (lab/src/nomad_jobs.rs, its header says which routes and from which Nomad sources):
//!   `PUT|POST /v1/jobs`, `GET /v1/job/:id`, `GET /v1/job/:id/allocations`, `GET /v1/allocation/:id`,
//!   `DELETE /v1/job/:id?purge=`, `GET /v1/client/fs/cat/:alloc_id?path=`; a trivial scheduler at the leader,
//!   and a client that runs allocations as child processes against the lab's real Vault and Consul (plumbing
//!   `/v1/double/allocs`, mTLS and the node secret).
//!
//! What it does **not** do: real scheduling (evaluations, deployments, bin packing, constraints, restarts),
//! drivers other than a process stand-in for `exec`/`raw_exec` and fingerprinting, namespaces, roles, auth
//! methods, token updates and expiry, ACL deletes, blocking queries and `X-Nomad-Index`, regions and
//! federation, RPC and serf ports, `verify_https_client`, HCL configuration files.
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// Jobs, allocations, the client that runs them, and the client fs API (lab/src/nomad_jobs.rs).
#[path = "nomad_jobs.rs"]
pub mod jobs;

pub const VERSION: &str = "1.9.5";
pub const VERSION_LINE: &str = "Nomad v1.9.5 (hashistack contract double)";
pub const DEFAULT_HTTP_PORT: u16 = 4646;
pub const RPC_PORT: u16 = 4647;
/// The double's stand-in for serf/raft between servers; not a Nomad route.
pub const PEER_PATH: &str = "/v1/double/peer";
const PEER_KEY_HEADER: &str = "x-nomad-double-key";
const FORWARDED_HEADER: &str = "x-nomad-double-forwarded";
/// Client registration and heartbeats (stand-in for Nomad's `Node.Register`/`Node.UpdateStatus` RPCs on
/// 4647); needs a client certificate signed by `tls.ca_file`. Not a Nomad route.
pub const NODE_PATH: &str = "/v1/double/node";
/// Nomad's JWKS route (`structs.JWKSPath`).
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Signs a task's workload identity on request (stand-in for the identity Nomad's plan applier signs for each
/// allocation); guarded by the servers' gossip key like the peer route. Not a Nomad route.
pub const IDENTITY_PATH: &str = "/v1/double/identity";
/// The first bytes of the double's snapshot archive.
pub const SNAPSHOT_MAGIC: &[u8] = b"nomad-contract-double-snapshot/1\n";
/// Where a client keeps its node ID (and node secret), as Nomad does under `<data_dir>/client`.
pub const CLIENT_ID_FILE: &str = "client-id";
pub const CLIENT_SECRET_FILE: &str = "secret-id";
/// Where a server keeps its raft ID.
pub const SERVER_ID_FILE: &str = "node-id";
/// The double's defaults for `server.min_heartbeat_ttl` and `server.heartbeat_grace` (Nomad's are 10s
/// each; the lab wants a dead client noticed within seconds). A node is `down` after TTL + grace without
/// a heartbeat; clients heartbeat every TTL/2.
pub const DEFAULT_MIN_HEARTBEAT_TTL: Duration = Duration::from_secs(4);
pub const DEFAULT_HEARTBEAT_GRACE: Duration = Duration::from_secs(2);
pub const RESET_FILE: &str = "acl-bootstrap-reset";
pub const STATE_FILE: &str = "double-state.json";

/// RFC 3339 in UTC with nanoseconds, as Nomad prints times.
fn rfc3339(t: time::OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

fn log(msg: impl AsRef<str>) {
    eprintln!(
        "{} [INFO] nomad contract double: {}",
        rfc3339(time::OffsetDateTime::now_utc()),
        msg.as_ref()
    );
}

/// Whether this process was started through a link (or copy) named `nomad`.
pub fn invoked_as_nomad() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "nomad"))
        .unwrap_or(false)
}

/// `nomad <args>` as the double understands it (`args[0]` is the program name).
pub async fn cli(args: &[String]) -> ExitCode {
    match args.get(1).map(String::as_str) {
        Some("version" | "-version" | "--version" | "-v") => {
            println!("{VERSION_LINE}");
            ExitCode::SUCCESS
        }
        Some("agent") => {
            let mut paths = Vec::new();
            let mut it = args[2..].iter();
            while let Some(a) = it.next() {
                let a = a.trim_start_matches('-');
                if let Some(v) = a.strip_prefix("config=") {
                    paths.push(PathBuf::from(v));
                } else if a == "config" {
                    match it.next() {
                        Some(v) => paths.push(PathBuf::from(v)),
                        None => return usage("-config needs a value"),
                    }
                } else {
                    return usage(&format!("unsupported agent flag -{a}"));
                }
            }
            if paths.is_empty() {
                return usage("agent needs -config=<dir|file>");
            }
            let cfg = match Config::load(&paths) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("nomad contract double: configuration: {e}");
                    return ExitCode::from(1);
                }
            };
            match run(cfg, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nomad contract double: {e}");
                    ExitCode::from(1)
                }
            }
        }
        other => usage(&format!(
            "unsupported command {:?} (the double implements `version` and `agent`)",
            other.unwrap_or("")
        )),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "nomad contract double: {msg}\nusage: nomad version | nomad agent -config=<dir|file>"
    );
    ExitCode::from(1)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => log("caught SIGTERM; shutting down"),
        _ = int.recv() => log("caught SIGINT; shutting down"),
    }
}

// ---------------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub region: String,
    pub datacenter: String,
    pub data_dir: PathBuf,
    pub bind: IpAddr,
    pub http_port: u16,
    pub server: Option<ServerConfig>,
    pub client: Option<ClientConfig>,
    pub acl_enabled: bool,
    pub tls: Option<TlsConfig>,
    /// `vault.default_identity` (servers) and the files a client re-reads for its `vault`/`consul` blocks.
    pub jobs: jobs::JobsConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bootstrap_expect: usize,
    /// Other servers (their addresses; the own address is dropped).
    pub peers: Vec<IpAddr>,
    pub encrypt: Option<String>,
    /// `server.min_heartbeat_ttl`: the TTL handed to clients (they heartbeat every TTL/2).
    pub min_heartbeat_ttl: Duration,
    /// `server.heartbeat_grace`: how much longer than the TTL the leader waits before a node is `down`.
    pub heartbeat_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub servers: Vec<IpAddr>,
    /// `client.node_class` (empty by default, as in Nomad).
    pub node_class: String,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: Option<PathBuf>,
}

/// Objects merge key by key; anything else is replaced by the later file (Nomad appends lists; the
/// agent never splits one list over two files).
fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Go's `time.ParseDuration` for what configs use: a sequence of `<number><unit>` with units `ns`, `us`,
/// `µs`, `ms`, `s`, `m`, `h` (`10s`, `1m30s`, `1.5s`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("time: invalid duration {s:?}");
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("time: missing unit in duration {s:?}"))?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "time: unknown unit {:?} in duration {s:?}",
                    &rest[..u]
                ))
            }
        };
        total += value * scale;
        rest = &rest[u..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// The host name, as Nomad's default for `name`.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn parse_join(entries: &[Value], what: &str) -> Result<Vec<IpAddr>, String> {
    entries
        .iter()
        .map(|v| {
            let s = v.as_str().ok_or(format!("{what}: entries must be strings"))?;
            if s.contains('=') {
                return Err(format!(
                    "{what}: cloud auto-join ({s:?}) is not implemented by the double; list addresses"
                ));
            }
            let host = s.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| {
                s.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
            });
            host.map_err(|_| format!("{what}: {s:?} is not an IP address (optionally with a port)"))
        })
        .collect()
}

/// Every `*.json` of the given directories (sorted by name) and the given files, merged.
pub fn load_merged(paths: &[PathBuf]) -> Result<Value, String> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.is_file())
                .collect();
            v.sort();
            for f in v {
                match f.extension().and_then(|x| x.to_str()) {
                    Some("json") => files.push(f),
                    Some("hcl") => {
                        return Err(format!(
                            "{}: HCL is not read by the double (JSON only)",
                            f.display()
                        ))
                    }
                    _ => {}
                }
            }
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err("no *.json configuration found".into());
    }
    let mut merged = json!({});
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", f.display()))?;
        merge(&mut merged, v);
    }
    Ok(merged)
}

impl Config {
    /// Reads and merges the given files and every `*.json` of the given directories (sorted by name).
    pub fn load(paths: &[PathBuf]) -> Result<Config, String> {
        let mut c = Config::from_value(&load_merged(paths)?)?;
        c.jobs.sources = paths.to_vec();
        Ok(c)
    }

    pub fn from_value(v: &Value) -> Result<Config, String> {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(String::from);
        let b = |p: &str| v.pointer(p).and_then(Value::as_bool).unwrap_or(false);
        let bind: IpAddr = s("/bind_addr")
            .unwrap_or_else(|| "0.0.0.0".into())
            .parse()
            .map_err(|_| "bind_addr: not an IP address".to_string())?;
        let data_dir = PathBuf::from(s("/data_dir").ok_or("data_dir is required")?);
        let http_port = v
            .pointer("/ports/http")
            .and_then(Value::as_u64)
            .map(|p| p as u16)
            .unwrap_or(DEFAULT_HTTP_PORT);
        let server = if b("/server/enabled") {
            let join = v
                .pointer("/server/server_join/retry_join")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let peers: Vec<IpAddr> = parse_join(&join, "server_join.retry_join")?
                .into_iter()
                .filter(|ip| *ip != bind)
                .collect();
            let duration = |p: &str, default: Duration| match s(p) {
                Some(d) => {
                    parse_duration(&d).map_err(|e| format!("{}: {e}", &p[1..].replace('/', ".")))
                }
                None => Ok(default),
            };
            Some(ServerConfig {
                min_heartbeat_ttl: duration(
                    "/server/min_heartbeat_ttl",
                    DEFAULT_MIN_HEARTBEAT_TTL,
                )?,
                heartbeat_grace: duration("/server/heartbeat_grace", DEFAULT_HEARTBEAT_GRACE)?,
                bootstrap_expect: v
                    .pointer("/server/bootstrap_expect")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
                    .max(1) as usize,
                peers,
                encrypt: s("/server/encrypt"),
            })
        } else {
            None
        };
        let client = if b("/client/enabled") {
            let join = v
                .pointer("/client/server_join/retry_join")
                .or_else(|| v.pointer("/client/servers"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            Some(ClientConfig {
                servers: parse_join(&join, "client.server_join.retry_join")?,
                node_class: s("/client/node_class").unwrap_or_default(),
            })
        } else {
            None
        };
        if server.is_none() && client.is_none() {
            return Err("neither server.enabled nor client.enabled".into());
        }
        let tls = if b("/tls/http") {
            Some(TlsConfig {
                cert_file: s("/tls/cert_file")
                    .ok_or("tls.cert_file is required")?
                    .into(),
                key_file: s("/tls/key_file").ok_or("tls.key_file is required")?.into(),
                ca_file: s("/tls/ca_file").map(PathBuf::from),
            })
        } else {
            None
        };
        Ok(Config {
            name: s("/name")
                .or_else(hostname)
                .unwrap_or_else(|| bind.to_string()),
            region: s("/region").unwrap_or_else(|| "global".into()),
            datacenter: s("/datacenter").unwrap_or_else(|| "dc1".into()),
            data_dir,
            bind,
            http_port,
            server,
            client,
            acl_enabled: b("/acl/enabled"),
            tls,
            jobs: jobs::JobsConfig::from_value(v)?,
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The replicated state (the part of Nomad's raft state the double keeps): ACL tokens and policies, nodes

/// A token as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Policies")]
    pub policies: Option<Vec<String>>,
    #[serde(rename = "Roles")]
    pub roles: Option<Vec<String>>,
    #[serde(rename = "Global")]
    pub global: bool,
    #[serde(rename = "CreateTime")]
    pub create_time: String,
    #[serde(rename = "ExpirationTime")]
    pub expiration_time: Option<String>,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
}

/// The replicated state: the raft index, whether the cluster ever formed, the ACL tables and the nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub index: u64,
    pub formed: bool,
    /// The index of the last ACL bootstrap (Nomad's "reset index"); 0 before the first one.
    pub bootstrap_index: u64,
    pub tokens: Vec<Token>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// The keyring (Nomad's root keys), made by the leader when the cluster forms: signs workload identities.
    #[serde(default)]
    pub keyring: Vec<crate::nomad_identity::RootKey>,
    /// Jobs and their allocations (lab/src/nomad_jobs.rs).
    #[serde(default)]
    pub jobs: Vec<jobs::Job>,
    #[serde(default)]
    pub allocs: Vec<jobs::Alloc>,
}

/// An API error: status and the plain-text body Nomad sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError(pub u16, pub String);

/// A random UUID (v4 layout), as Nomad's `uuid.Generate` shapes them.
pub fn uuid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Nomad's `helper.IsUUID`: 36 characters, hex digits (any case) and dashes at 8, 13, 18, 23.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Store {
    /// `ACL.Bootstrap` at the leader. `reset_file` is the number in `<data_dir>/server/acl-bootstrap-reset`.
    pub fn bootstrap(
        &mut self,
        secret: Option<&str>,
        reset_file: Option<u64>,
    ) -> Result<Token, ApiError> {
        if self.bootstrap_index != 0 {
            match reset_file.unwrap_or(0) {
                0 => {
                    return Err(ApiError(
                        400,
                        format!(
                            "ACL bootstrap already done (reset index: {})",
                            self.bootstrap_index
                        ),
                    ))
                }
                n if n != self.bootstrap_index => {
                    return Err(ApiError(
                        400,
                        format!(
                            "Invalid bootstrap reset index (specified {n}, reset index: {})",
                            self.bootstrap_index
                        ),
                    ))
                }
                _ => {}
            }
        }
        let secret_id = match secret.filter(|s| !s.is_empty()) {
            Some(s) if is_uuid(s) => s.to_string(),
            Some(_) => return Err(ApiError(400, "invalid acl token".into())),
            None => uuid(),
        };
        self.index += 1;
        let token = Token {
            accessor_id: uuid(),
            secret_id,
            name: "Bootstrap Token".into(),
            kind: "management".into(),
            policies: None,
            roles: None,
            global: true,
            create_time: rfc3339(time::OffsetDateTime::now_utc()),
            expiration_time: None,
            create_index: self.index,
            modify_index: self.index,
        };
        self.bootstrap_index = self.index;
        self.tokens.push(token.clone());
        Ok(token)
    }

    pub fn token_by_secret(&self, secret: &str) -> Option<&Token> {
        if secret.is_empty() {
            return None;
        }
        self.tokens.iter().find(|t| t.secret_id == secret)
    }

    fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// What a secret may do (Nomad's `ResolveToken`): no secret is the anonymous token (the `anonymous`
    /// policy, if there is one); an unknown secret is 403 `ACL token not found`. Policies a token names
    /// that do not exist grant nothing (Nomad allows such dangling links).
    pub fn resolve(&self, secret: &str) -> Result<Authz, ApiError> {
        let (token, names) = if secret.is_empty() {
            (None, vec!["anonymous".to_string()])
        } else {
            let t = self
                .token_by_secret(secret)
                .ok_or_else(|| ApiError(403, "ACL token not found".into()))?;
            if t.kind == "management" {
                return Ok(Authz::management(Some(t.clone())));
            }
            (Some(t.clone()), t.policies.clone().unwrap_or_default())
        };
        Ok(Authz::client(
            token,
            names.iter().filter_map(|n| self.policy(n)),
        ))
    }

    /// `ACL.UpsertPolicies` at the leader (the caller checked for a management token).
    pub fn upsert_policy(&mut self, p: PolicyWrite) -> Result<u64, ApiError> {
        let mut errs = Vec::new();
        if !valid_policy_name(&p.name) {
            errs.push(format!("invalid name '{}'", p.name));
        }
        if let Err(e) = parse_rules(&p.rules) {
            errs.push(format!("failed to parse rules: {e}"));
        }
        if p.description.len() > MAX_POLICY_DESCRIPTION {
            errs.push(format!("description longer than {MAX_POLICY_DESCRIPTION}"));
        }
        if !errs.is_empty() {
            return Err(ApiError(
                400,
                format!("policy 0 invalid: {}", multierror(&errs)),
            ));
        }
        self.index += 1;
        let index = self.index;
        match self.policies.iter_mut().find(|x| x.name == p.name) {
            Some(existing) => {
                existing.description = p.description;
                existing.rules = p.rules;
                existing.modify_index = index;
            }
            None => self.policies.push(Policy {
                name: p.name,
                description: p.description,
                rules: p.rules,
                create_index: index,
                modify_index: index,
            }),
        }
        Ok(index)
    }

    /// `ACL.UpsertTokens` for a new token at the leader (the caller checked for a management token).
    pub fn create_token(&mut self, w: TokenWrite) -> Result<Token, ApiError> {
        if !w.accessor_id.is_empty() {
            return Err(ApiError(
                400,
                "token updates (a request with AccessorID) are not implemented by the Nomad contract double"
                    .into(),
            ));
        }
        if w.expiration_ttl
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != "")
            || w.expiration_time.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err(ApiError(
                400,
                "token expiry (ExpirationTTL, ExpirationTime) is not implemented by the Nomad contract double"
                    .into(),
            ));
        }
        let mut errs = Vec::new();
        if w.name.len() > MAX_TOKEN_NAME {
            errs.push("token name too long".to_string());
        }
        let has_roles = !w.roles.as_ref().is_none_or(|r| r.is_empty());
        match w.kind.as_str() {
            "client" if w.policies.is_empty() && !has_roles => {
                errs.push("client token missing policies or roles".into())
            }
            "client" => {}
            "management" if !w.policies.is_empty() || has_roles => {
                errs.push("management token cannot be associated with policies or roles".into())
            }
            "management" => {}
            _ => errs.push("token type must be client or management".into()),
        }
        if !errs.is_empty() {
            return Err(ApiError(
                400,
                format!("token 0 invalid: {}", multierror(&errs)),
            ));
        }
        if has_roles {
            return Err(ApiError(
                400,
                "ACL roles are not implemented by the Nomad contract double".into(),
            ));
        }
        self.index += 1;
        let token = Token {
            accessor_id: uuid(),
            secret_id: uuid(),
            name: w.name,
            policies: (w.kind == "client").then_some(w.policies),
            kind: w.kind,
            roles: None,
            global: w.global,
            create_time: rfc3339(time::OffsetDateTime::now_utc()),
            expiration_time: None,
            create_index: self.index,
            modify_index: self.index,
        };
        self.tokens.push(token.clone());
        Ok(token)
    }

    /// `Node.Register` / `Node.UpdateStatus` at the leader: a new node, a changed node, or a heartbeat.
    /// Returns whether the store changed (a raft write); a plain heartbeat of a ready node changes nothing.
    pub fn register_node(
        &mut self,
        r: NodeRegistration,
        now: time::OffsetDateTime,
    ) -> Result<bool, ApiError> {
        if !is_uuid(&r.id) {
            return Err(ApiError(400, "missing node ID".into()));
        }
        if r.name.is_empty() {
            return Err(ApiError(400, "missing node name".into()));
        }
        if r.secret_id.is_empty() {
            return Err(ApiError(400, "missing node secret ID".into()));
        }
        let next = self.index + 1;
        let changed = match self.nodes.iter_mut().find(|n| n.id == r.id) {
            Some(n) => {
                if n.secret_id != r.secret_id {
                    return Err(ApiError(
                        400,
                        "node secret ID does not match. Not registering node.".into(),
                    ));
                }
                let mut changed = false;
                if n.status != "ready" {
                    let msg = if n.status == "down" {
                        "Node reregistered by heartbeat"
                    } else {
                        "Node registered"
                    };
                    n.status = "ready".into();
                    n.status_updated_at = now.unix_timestamp();
                    n.push_event(msg, now, next);
                    changed = true;
                }
                let fields = (
                    &r.name,
                    &r.datacenter,
                    &r.node_class,
                    &r.http_addr,
                    &r.address,
                    &r.version,
                    r.tls_enabled,
                );
                if fields
                    != (
                        &n.name,
                        &n.datacenter,
                        &n.node_class,
                        &n.http_addr,
                        &n.address,
                        &n.version,
                        n.tls_enabled,
                    )
                {
                    n.name = r.name;
                    n.datacenter = r.datacenter;
                    n.node_class = r.node_class;
                    n.http_addr = r.http_addr;
                    n.address = r.address;
                    n.version = r.version;
                    n.tls_enabled = r.tls_enabled;
                    changed = true;
                }
                if changed {
                    n.modify_index = next;
                }
                changed
            }
            None => {
                let mut n = Node {
                    id: r.id,
                    secret_id: r.secret_id,
                    name: r.name,
                    datacenter: r.datacenter,
                    node_class: r.node_class,
                    node_pool: "default".into(),
                    http_addr: r.http_addr,
                    address: r.address,
                    tls_enabled: r.tls_enabled,
                    version: r.version,
                    status: "ready".into(),
                    status_description: String::new(),
                    status_updated_at: now.unix_timestamp(),
                    drain: false,
                    scheduling_eligibility: "eligible".into(),
                    events: vec![],
                    create_index: next,
                    modify_index: next,
                };
                n.push_event("Node registered", now, next);
                self.nodes.push(n);
                true
            }
        };
        if changed {
            self.index = next;
        }
        Ok(changed)
    }

    /// Marks a node `down` (its heartbeat TTL passed). Returns whether it changed.
    pub fn mark_down(&mut self, id: &str, now: time::OffsetDateTime) -> bool {
        let next = self.index + 1;
        let Some(n) = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id && n.status != "down")
        else {
            return false;
        };
        n.status = "down".into();
        n.status_updated_at = now.unix_timestamp();
        n.modify_index = next;
        n.push_event("Node heartbeat missed", now, next);
        self.index = next;
        true
    }

    pub fn load(path: &Path) -> Result<Store, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Store::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Atomic, fsynced, 0600 (it holds token secrets, as Nomad's raft data does).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("store serialises"))
            .and_then(|_| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

// ---------------------------------------------------------------------------------------------------
// ACL policies: the subset of Nomad's policy language the double implements

const MAX_POLICY_DESCRIPTION: usize = 256;
const MAX_TOKEN_NAME: usize = 256;

/// A policy as the API shows it (`RulesJSON` is added on read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Description")]
    pub description: String,
    #[serde(rename = "Rules")]
    pub rules: String,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
}

/// The body of `PUT /v1/acl/policy/:name`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PolicyWrite {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Description")]
    pub description: String,
    #[serde(rename = "Rules")]
    pub rules: String,
}

/// The body of `PUT /v1/acl/token`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TokenWrite {
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Policies")]
    pub policies: Vec<String>,
    #[serde(rename = "Roles")]
    pub roles: Option<Vec<Value>>,
    #[serde(rename = "Global")]
    pub global: bool,
    #[serde(rename = "ExpirationTTL")]
    pub expiration_ttl: Option<Value>,
    #[serde(rename = "ExpirationTime")]
    pub expiration_time: Option<Value>,
}

/// Nomad's `ValidPolicyName`: `^[a-zA-Z0-9-]{1,128}$`.
fn valid_policy_name(n: &str) -> bool {
    (1..=128).contains(&n.len()) && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// go-multierror's text: `1 error occurred:\n\t* …\n\n`.
fn multierror(errs: &[String]) -> String {
    let head = if errs.len() == 1 {
        "1 error occurred:".to_string()
    } else {
        format!("{} errors occurred:", errs.len())
    };
    let items: String = errs.iter().map(|e| format!("\n\t* {e}")).collect();
    format!("{head}{items}\n\n")
}

/// A coarse policy level (`policy = "…"` of the `node`, `agent` and `operator` blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Deny,
    Read,
    Write,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        match s {
            "deny" => Some(Level::Deny),
            "read" => Some(Level::Read),
            "write" => Some(Level::Write),
            _ => None,
        }
    }
    fn word(self) -> &'static str {
        match self {
            Level::Deny => "deny",
            Level::Read => "read",
            Level::Write => "write",
        }
    }
}

/// Nomad's merge: `deny` wins over everything, otherwise the most privilege.
fn merge_level(a: Option<Level>, b: Option<Level>) -> Option<Level> {
    match (a, b) {
        (Some(Level::Deny), _) | (_, Some(Level::Deny)) => Some(Level::Deny),
        (Some(Level::Write), _) | (_, Some(Level::Write)) => Some(Level::Write),
        (Some(Level::Read), _) | (_, Some(Level::Read)) => Some(Level::Read),
        _ => None,
    }
}

fn allows_read(l: Option<Level>) -> bool {
    matches!(l, Some(Level::Read | Level::Write))
}

/// Parsed rules: the blocks the double implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    pub node: Option<Level>,
    pub agent: Option<Level>,
    pub operator: Option<Level>,
}

impl Rules {
    fn merge(&mut self, o: &Rules) {
        self.node = merge_level(self.node, o.node);
        self.agent = merge_level(self.agent, o.agent);
        self.operator = merge_level(self.operator, o.operator);
    }

    /// Nomad's `RulesJSON` (the parsed policy), for the blocks the double implements.
    fn to_json(self) -> Value {
        let block = |l: Option<Level>| match l {
            Some(l) => json!({"Policy": l.word()}),
            None => Value::Null,
        };
        json!({
            "Namespaces": null,
            "NodePools": null,
            "HostVolumes": null,
            "Agent": block(self.agent),
            "Node": block(self.node),
            "Operator": block(self.operator),
            "Quota": null,
            "Plugin": null,
        })
    }
}

/// A capability a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    NodeRead,
    AgentRead,
    OperatorRead,
}

/// What a request's token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    pub management: bool,
    pub rules: Rules,
    /// The token (None: anonymous, or ACLs disabled).
    pub token: Option<Token>,
}

impl Authz {
    fn management(token: Option<Token>) -> Authz {
        Authz {
            management: true,
            rules: Rules::default(),
            token,
        }
    }
    /// A client token (None: anonymous) with these policies: their rules merged. Stored policies were
    /// validated on write; evaluation is lenient, as in Nomad.
    fn client<'a>(token: Option<Token>, policies: impl IntoIterator<Item = &'a Policy>) -> Authz {
        let mut rules = Rules::default();
        for p in policies {
            if let Ok(r) = parse_rules(&p.rules) {
                rules.merge(&r);
            }
        }
        Authz {
            management: false,
            rules,
            token,
        }
    }
    pub fn allows(&self, c: Cap) -> bool {
        self.management
            || match c {
                Cap::NodeRead => allows_read(self.rules.node),
                Cap::AgentRead => allows_read(self.rules.agent),
                Cap::OperatorRead => allows_read(self.rules.operator),
            }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
}

/// HCL tokens with their 1-based line and column; comments (`#`, `//`, `/* */`) dropped.
fn hcl_tokens(src: &str) -> Result<Vec<(Tok, usize, usize)>, String> {
    let chars: Vec<char> = src.chars().collect();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let mut out = Vec::new();
    let advance = |i: &mut usize, line: &mut usize, col: &mut usize, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let (l0, c0) = (line, col);
        if c.is_whitespace() || c == ',' {
            advance(&mut i, &mut line, &mut col, c);
        } else if c == '#' || (c == '/' && chars.get(i + 1) == Some(&'/')) {
            while i < chars.len() && chars[i] != '\n' {
                let d = chars[i];
                advance(&mut i, &mut line, &mut col, d);
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            advance(&mut i, &mut line, &mut col, '/');
            advance(&mut i, &mut line, &mut col, '*');
            loop {
                if i + 1 >= chars.len() {
                    return Err(format!("At {l0}:{c0}: comment not terminated"));
                }
                if chars[i] == '*' && chars[i + 1] == '/' {
                    advance(&mut i, &mut line, &mut col, '*');
                    advance(&mut i, &mut line, &mut col, '/');
                    break;
                }
                let d = chars[i];
                advance(&mut i, &mut line, &mut col, d);
            }
        } else if c == '"' {
            advance(&mut i, &mut line, &mut col, c);
            let mut s = String::new();
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(format!("At {l0}:{c0}: literal not terminated"));
                };
                if d == '\n' {
                    return Err(format!("At {l0}:{c0}: literal not terminated"));
                }
                advance(&mut i, &mut line, &mut col, d);
                match d {
                    '"' => break,
                    '\\' => {
                        let Some(&e) = chars.get(i) else {
                            return Err(format!("At {l0}:{c0}: literal not terminated"));
                        };
                        advance(&mut i, &mut line, &mut col, e);
                        s.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    }
                    other => s.push(other),
                }
            }
            out.push((Tok::Str(s), l0, c0));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut s = String::new();
            while let Some(&d) = chars.get(i) {
                if d.is_ascii_alphanumeric() || d == '_' || d == '-' || d == '.' {
                    s.push(d);
                    advance(&mut i, &mut line, &mut col, d);
                } else {
                    break;
                }
            }
            out.push((Tok::Ident(s), l0, c0));
        } else if c.is_ascii_digit() || c == '-' {
            let mut s = String::new();
            while let Some(&d) = chars.get(i) {
                if d.is_ascii_digit() || d == '-' || d == '.' {
                    s.push(d);
                    advance(&mut i, &mut line, &mut col, d);
                } else {
                    break;
                }
            }
            out.push((Tok::Num(s), l0, c0));
        } else if matches!(c, '{' | '}' | '=' | '[' | ']') {
            advance(&mut i, &mut line, &mut col, c);
            out.push((Tok::Punct(c), l0, c0));
        } else {
            return Err(format!("At {l0}:{c0}: illegal char"));
        }
    }
    Ok(out)
}

/// One `key [label] [=] { … }` or `key = value` item of an HCL body.
#[derive(Debug)]
enum Item {
    Block {
        key: String,
        label: Option<String>,
        body: Vec<Item>,
    },
    Attr {
        key: String,
        value: AttrValue,
    },
}

#[derive(Debug)]
enum AttrValue {
    Str(String),
    Other,
}

fn hcl_body(
    toks: &[(Tok, usize, usize)],
    pos: &mut usize,
    nested: bool,
) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    loop {
        let Some((t, l, c)) = toks.get(*pos) else {
            return if nested {
                Err("object expected closing RBRACE got: EOF".into())
            } else {
                Ok(items)
            };
        };
        let key = match t {
            Tok::Punct('}') if nested => {
                *pos += 1;
                return Ok(items);
            }
            Tok::Ident(k) | Tok::Str(k) => k.clone(),
            other => return Err(format!("At {l}:{c}: unexpected token {other:?}")),
        };
        *pos += 1;
        let mut label = None;
        if let Some((Tok::Str(s), _, _)) = toks.get(*pos) {
            label = Some(s.clone());
            *pos += 1;
        }
        let mut assigned = false;
        if let Some((Tok::Punct('='), _, _)) = toks.get(*pos) {
            assigned = true;
            *pos += 1;
        }
        match toks.get(*pos) {
            Some((Tok::Punct('{'), _, _)) => {
                *pos += 1;
                let body = hcl_body(toks, pos, true)?;
                items.push(Item::Block { key, label, body });
            }
            Some((Tok::Str(s), _, _)) if assigned && label.is_none() => {
                items.push(Item::Attr {
                    key,
                    value: AttrValue::Str(s.clone()),
                });
                *pos += 1;
            }
            Some((Tok::Num(_) | Tok::Ident(_), _, _)) if assigned && label.is_none() => {
                items.push(Item::Attr {
                    key,
                    value: AttrValue::Other,
                });
                *pos += 1;
            }
            Some((Tok::Punct('['), _, _)) if assigned && label.is_none() => {
                let mut depth = 0;
                while let Some((t, _, _)) = toks.get(*pos) {
                    *pos += 1;
                    match t {
                        Tok::Punct('[') => depth += 1,
                        Tok::Punct(']') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                items.push(Item::Attr {
                    key,
                    value: AttrValue::Other,
                });
            }
            Some((_, l, c)) => {
                return Err(format!(
                    "At {l}:{c}: key '{key}' expected start of object ('{{') or assignment ('=')"
                ))
            }
            None => {
                return Err(format!(
                    "key '{key}' expected start of object ('{{') or assignment ('=')"
                ))
            }
        }
    }
}

/// The JSON form of a policy (`{"node": {"policy": "read"}, …}`) as the same items.
fn json_items(v: &Value) -> Result<Vec<Item>, String> {
    let Value::Object(m) = v else {
        return Err("root should be an object".into());
    };
    let mut items = Vec::new();
    for (k, v) in m {
        match v {
            Value::String(s) => items.push(Item::Attr {
                key: k.clone(),
                value: AttrValue::Str(s.clone()),
            }),
            Value::Object(inner)
                if inner.values().all(|x| x.is_object())
                    && matches!(k.as_str(), "namespace" | "host_volume" | "node_pool") =>
            {
                for (label, body) in inner {
                    items.push(Item::Block {
                        key: k.clone(),
                        label: Some(label.clone()),
                        body: json_items(body)?,
                    });
                }
            }
            Value::Object(_) => items.push(Item::Block {
                key: k.clone(),
                label: None,
                body: json_items(v)?,
            }),
            _ => items.push(Item::Attr {
                key: k.clone(),
                value: AttrValue::Other,
            }),
        }
    }
    Ok(items)
}

/// Nomad's `acl.Parse` in strict mode, for the blocks the double implements; the error texts are Nomad's
/// (`Invalid node policy: &acl.NodePolicy{Policy:"reed"}`, `Invalid or duplicate policy keys: nod`,
/// `Invalid policy: <raw>`), plus a clear refusal of valid Nomad blocks the double does not implement.
pub fn parse_rules(raw: &str) -> Result<Rules, String> {
    if raw.is_empty() {
        // Nomad's hot path: empty rules are an empty (valid, powerless) policy.
        return Ok(Rules::default());
    }
    let items = if raw.trim_start().starts_with('{') {
        let v: Value =
            serde_json::from_str(raw).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?;
        json_items(&v).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?
    } else {
        let toks = hcl_tokens(raw).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?;
        let mut pos = 0;
        hcl_body(&toks, &mut pos, false).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?
    };
    let mut extra: Vec<String> = Vec::new();
    // The value of each block's `policy` (None: the block is absent), in Nomad's check order.
    let mut blocks: [(&str, Option<String>); 3] =
        [("agent", None), ("node", None), ("operator", None)];
    for item in &items {
        let (key, label, body) = match item {
            Item::Block { key, label, body } => (key.as_str(), label, body),
            Item::Attr { key, .. } => {
                extra.push(key.clone());
                continue;
            }
        };
        match key {
            "namespace" | "node_pool" | "host_volume" | "plugin" | "quota" => {
                return Err(format!(
                    "{key} rules are valid Nomad but not implemented by the Nomad contract double \
                     (it implements node, agent and operator)"
                ))
            }
            "node" | "agent" | "operator" => {
                let slot = blocks
                    .iter_mut()
                    .find(|(k, _)| *k == key)
                    .expect("known block");
                if label.is_some() || slot.1.is_some() {
                    extra.push(key.to_string());
                    continue;
                }
                let mut policy = String::new();
                for it in body {
                    match it {
                        Item::Attr {
                            key: k,
                            value: AttrValue::Str(v),
                        } if k == "policy" => policy = v.clone(),
                        Item::Attr { key: k, .. } if k == "capabilities" && key == "operator" => {
                            return Err(
                                "operator capabilities are valid Nomad but not implemented by the \
                                        Nomad contract double (use policy = \"read\" or \"write\")"
                                    .into(),
                            )
                        }
                        Item::Attr { key: k, .. } | Item::Block { key: k, .. } => {
                            extra.push(k.clone())
                        }
                    }
                }
                slot.1 = Some(policy);
            }
            other => extra.push(other.to_string()),
        }
    }
    if blocks.iter().all(|(_, v)| v.is_none()) {
        return Err(format!("Invalid policy: {raw}"));
    }
    if !extra.is_empty() {
        return Err(format!(
            "Invalid or duplicate policy keys: {}",
            extra.join(", ")
        ));
    }
    let mut rules = Rules::default();
    for (key, value) in blocks {
        let Some(value) = value else { continue };
        let level = Level::parse(&value);
        if level.is_none() && !(key == "operator" && value.is_empty()) {
            let ty = match key {
                "node" => "NodePolicy",
                "agent" => "AgentPolicy",
                _ => "OperatorPolicy",
            };
            return Err(format!(
                "Invalid {key} policy: &acl.{ty}{{Policy:{value:?}}}"
            ));
        }
        match key {
            "node" => rules.node = level,
            "agent" => rules.agent = level,
            _ => rules.operator = level,
        }
    }
    Ok(rules)
}

// ---------------------------------------------------------------------------------------------------
// Client nodes

/// A node event (`Events` of `GET /v1/node/:id`; the last 10 are kept, as in Nomad).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "Subsystem")]
    pub subsystem: String,
    #[serde(rename = "Timestamp")]
    pub timestamp: String,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
}

/// A client node as the store keeps it (with its secret, which the API never shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Datacenter")]
    pub datacenter: String,
    #[serde(rename = "NodeClass")]
    pub node_class: String,
    #[serde(rename = "NodePool")]
    pub node_pool: String,
    #[serde(rename = "HTTPAddr")]
    pub http_addr: String,
    /// The node's IP (`Address` of the list stub).
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "TLSEnabled")]
    pub tls_enabled: bool,
    /// The client agent's version (`Attributes["nomad.version"]`, `Version` of the stub).
    #[serde(rename = "Version")]
    pub version: String,
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "StatusDescription")]
    pub status_description: String,
    #[serde(rename = "StatusUpdatedAt")]
    pub status_updated_at: i64,
    #[serde(rename = "Drain")]
    pub drain: bool,
    #[serde(rename = "SchedulingEligibility")]
    pub scheduling_eligibility: String,
    #[serde(rename = "Events")]
    pub events: Vec<NodeEvent>,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
}

impl Node {
    fn push_event(&mut self, msg: &str, now: time::OffsetDateTime, index: u64) {
        self.events.push(NodeEvent {
            message: msg.into(),
            subsystem: "Cluster".into(),
            timestamp: rfc3339(now),
            create_index: index,
        });
        let n = self.events.len();
        if n > 10 {
            self.events.drain(..n - 10);
        }
    }

    /// `GET /v1/nodes` entry (`NodeListStub`).
    pub fn stub(&self) -> Value {
        json!({
            "Address": self.address,
            "ID": self.id,
            "Datacenter": self.datacenter,
            "Name": self.name,
            "NodeClass": self.node_class,
            "NodePool": self.node_pool,
            "Version": self.version,
            "Drain": self.drain,
            "SchedulingEligibility": self.scheduling_eligibility,
            "Status": self.status,
            "StatusDescription": self.status_description,
            "Drivers": {},
            "HostVolumes": {},
            "LastDrain": null,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        })
    }

    /// `GET /v1/node/:id` (sanitized: no `SecretID`, as Nomad's `Node.Sanitize`).
    pub fn public(&self) -> Value {
        json!({
            "ID": self.id,
            "Name": self.name,
            "Datacenter": self.datacenter,
            "NodeClass": self.node_class,
            "NodePool": self.node_pool,
            "HTTPAddr": self.http_addr,
            "TLSEnabled": self.tls_enabled,
            "Attributes": {
                "nomad.version": self.version,
                "unique.hostname": self.name,
                "unique.network.ip-address": self.address,
                "kernel.name": "linux",
            },
            "Meta": {},
            "Drain": self.drain,
            "DrainStrategy": null,
            "SchedulingEligibility": self.scheduling_eligibility,
            "Status": self.status,
            "StatusDescription": self.status_description,
            "StatusUpdatedAt": self.status_updated_at,
            "Events": self.events,
            "Drivers": {},
            "HostVolumes": {},
            "LastDrain": null,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        })
    }
}

/// What a client sends to `PUT /v1/double/node`: its node, at registration and with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Datacenter")]
    pub datacenter: String,
    #[serde(rename = "NodeClass")]
    pub node_class: String,
    #[serde(rename = "HTTPAddr")]
    pub http_addr: String,
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "TLSEnabled")]
    pub tls_enabled: bool,
    #[serde(rename = "Version")]
    pub version: String,
}

/// The ID and secret of this client node: read from `<data_dir>/client`, created (0600) the first time.
pub fn client_identity(data_dir: &Path) -> Result<(String, String), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = data_dir.join("client");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let read_or_create = |name: &str| -> Result<String, String> {
        let p = dir.join(name);
        if let Ok(s) = std::fs::read_to_string(&p) {
            let s = s.trim().to_string();
            if is_uuid(&s) {
                return Ok(s);
            }
        }
        let id = uuid();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        use std::io::Write;
        f.write_all(id.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(id)
    };
    Ok((
        read_or_create(CLIENT_ID_FILE)?,
        read_or_create(CLIENT_SECRET_FILE)?,
    ))
}

// ---------------------------------------------------------------------------------------------------
// The agent

struct Agent {
    cfg: Config,
    state_file: PathBuf,
    /// This server's raft ID (persisted in `<data_dir>/server/node-id`).
    raft_id: String,
    /// `http(s)://` client trusting `tls.ca_file` and presenting `tls.cert_file` (peers, forwarding,
    /// registration); rebuilt when SIGHUP reloads the certificate.
    http: Mutex<reqwest::Client>,
    rt: Mutex<Runtime>,
}

#[derive(Default)]
struct Runtime {
    /// Servers that answered the last poll (self included): address → (name, raft ID).
    alive: BTreeMap<IpAddr, (String, String)>,
    leader: Option<IpAddr>,
    store: Store,
    /// Leader only: the last heartbeat of each node (Nomad keeps these timers in memory, not in raft).
    heartbeats: HashMap<String, Instant>,
    /// Whether this server led at the last heartbeat check (a new leader resets every node's timer).
    was_leader: bool,
}

#[derive(Serialize, Deserialize)]
struct PeerView {
    name: String,
    addr: IpAddr,
    #[serde(default)]
    id: String,
    store: Store,
}

type Resp = Response<Full<Bytes>>;

/// A handler's answer; `Err`: answered early (refused, no leader, or relayed from the leader).
type Answer = Result<Resp, Resp>;

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("response")
}

fn text(status: u16, body: impl Into<String>) -> Resp {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn json_resp(v: &impl Serialize) -> Resp {
    respond(
        200,
        "application/json",
        serde_json::to_vec(v).expect("serialises"),
    )
}

/// Another agent's answer, as it came: status, content type (`default_type` if it names none), body.
async fn relay(r: reqwest::Response, default_type: &str) -> Resp {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(default_type)
        .to_string();
    let body = r.bytes().await.unwrap_or_default();
    respond(status, &ct, body)
}

fn no_leader() -> Resp {
    text(500, "No cluster leader")
}

fn denied() -> Resp {
    text(403, "Permission denied")
}

fn api_error(e: ApiError) -> Resp {
    text(e.0, e.1)
}

fn acl_disabled() -> Resp {
    text(400, "ACL support disabled")
}

fn not_found() -> Resp {
    text(404, "404 page not found")
}

fn token_of(req: &Request<Incoming>) -> String {
    let h = req.headers();
    if let Some(t) = h.get("x-nomad-token").and_then(|v| v.to_str().ok()) {
        return t.trim().to_string();
    }
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

/// A query parameter (no percent-decoding: the double's parameters are IDs and prefixes).
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    })
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Resp> {
    Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| text(400, "Request body too large"))
}

/// A write's request, as read before it is applied here or forwarded.
struct Write {
    /// Sent on by a server to its leader.
    forwarded: bool,
    token: String,
    body: Bytes,
}

impl Write {
    async fn read(req: Request<Incoming>, limit: usize) -> Result<Write, Resp> {
        let forwarded = req.headers().contains_key(FORWARDED_HEADER);
        let token = token_of(&req);
        let body = read_body(req, limit).await?;
        Ok(Write {
            forwarded,
            token,
            body,
        })
    }
}

/// Where a write goes.
enum WriteTarget {
    Here,
    /// To these agents; `true`: marked as forwarded (server to leader), so that it is not forwarded again.
    Forward(Vec<IpAddr>, bool),
    NoLeader,
}

impl Agent {
    fn rpc_addr(ip: IpAddr) -> String {
        SocketAddr::new(ip, RPC_PORT).to_string()
    }

    fn url(&self, ip: IpAddr, path: &str) -> String {
        format!(
            "{}://{}{path}",
            self.cfg.scheme(),
            SocketAddr::new(ip, self.cfg.http_port)
        )
    }

    fn http(&self) -> reqwest::Client {
        self.http.lock().expect("http client").clone()
    }

    fn servers_of_client(&self) -> Vec<IpAddr> {
        self.cfg
            .client
            .as_ref()
            .map(|c| c.servers.clone())
            .unwrap_or_default()
    }

    fn reset_file(&self) -> Option<u64> {
        let p = self.cfg.data_dir.join("server").join(RESET_FILE);
        let raw = std::fs::read_to_string(&p).ok()?;
        match raw.trim().parse::<u64>() {
            Ok(n) => {
                log(format!(
                    "bootstrap file parsed: {} (reset index {n})",
                    p.display()
                ));
                Some(n)
            }
            Err(_) => {
                log(format!("failed to parse bootstrap file {}", p.display()));
                None
            }
        }
    }

    fn persist(&self, store: &Store) {
        if let Err(e) = store.save(&self.state_file) {
            log(format!("could not persist state: {e}"));
        }
    }

    /// One round of the stand-in for serf and raft: poll the peers, adopt the newest state, elect.
    async fn poll_peers(self: &Arc<Self>) {
        let Some(server) = &self.cfg.server else {
            return;
        };
        let mut set = tokio::task::JoinSet::new();
        for ip in &server.peers {
            let (me, ip) = (self.clone(), *ip);
            let key = server.encrypt.clone().unwrap_or_default();
            set.spawn(async move {
                let r = me
                    .http()
                    .get(me.url(ip, PEER_PATH))
                    .header(PEER_KEY_HEADER, key)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .ok()?;
                if !r.status().is_success() {
                    return None;
                }
                r.json::<PeerView>().await.ok()
            });
        }
        let mut views = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(Some(v)) = r {
                views.push(v);
            }
        }
        let mut rt = self.rt.lock().expect("runtime");
        let mut alive = BTreeMap::new();
        alive.insert(self.cfg.bind, (self.cfg.name.clone(), self.raft_id.clone()));
        let mut adopt: Option<Store> = None;
        for v in views {
            if v.store.index > adopt.as_ref().unwrap_or(&rt.store).index {
                adopt = Some(v.store.clone());
            }
            alive.insert(v.addr, (v.name, v.id));
        }
        if let Some(s) = adopt {
            log(format!("replicated state at index {} from a peer", s.index));
            rt.store = s;
            self.persist(&rt.store);
        }
        let quorum = if rt.store.formed {
            server.bootstrap_expect / 2 + 1
        } else {
            server.bootstrap_expect
        };
        let leader = (alive.len() >= quorum)
            .then(|| alive.keys().next().copied())
            .flatten();
        if leader.is_some() && !rt.store.formed {
            rt.store.formed = true;
            rt.store.index += 1;
            self.persist(&rt.store);
        }
        // Nomad's leader initializes the keyring when it establishes leadership; followers adopt it.
        if leader == Some(self.cfg.bind) && rt.store.keyring.is_empty() {
            rt.store
                .keyring
                .push(crate::nomad_identity::RootKey::generate(uuid()));
            rt.store.index += 1;
            self.persist(&rt.store);
            log("keyring initialized: a new root key signs workload identities");
        }
        if leader != rt.leader {
            match leader {
                Some(l) => log(format!(
                    "cluster leader is {} ({} of {} servers answering)",
                    Self::rpc_addr(l),
                    alive.len(),
                    server.peers.len() + 1
                )),
                None => log(format!(
                    "no cluster leader: {} of {} servers answering, {quorum} needed",
                    alive.len(),
                    server.peers.len() + 1
                )),
            }
        }
        rt.leader = leader;
        rt.alive = alive;
    }

    /// Leader only: marks `down` every node whose last heartbeat is older than TTL + grace. A server that
    /// just became leader first gives every node a full TTL from now (Nomad's failover grace).
    async fn check_heartbeats(&self) {
        let Some(server) = &self.cfg.server else {
            return;
        };
        let limit = server.min_heartbeat_ttl + server.heartbeat_grace;
        let (downed, store) = {
            let mut rt = self.rt.lock().expect("runtime");
            if rt.leader != Some(self.cfg.bind) {
                rt.heartbeats.clear();
                rt.was_leader = false;
                return;
            }
            let now = Instant::now();
            if !rt.was_leader {
                rt.was_leader = true;
                let ids: Vec<String> = rt.store.nodes.iter().map(|n| n.id.clone()).collect();
                for id in ids {
                    rt.heartbeats.insert(id, now);
                }
            }
            let expired: Vec<(String, String)> = rt
                .store
                .nodes
                .iter()
                .filter(|n| n.status != "down")
                .filter(|n| {
                    rt.heartbeats
                        .get(&n.id)
                        .is_some_and(|t| now.duration_since(*t) > limit)
                })
                .map(|n| (n.id.clone(), n.name.clone()))
                .collect();
            // A node the map does not know (registered through another leader) starts its TTL now.
            let unknown: Vec<String> = rt
                .store
                .nodes
                .iter()
                .filter(|n| !rt.heartbeats.contains_key(&n.id))
                .map(|n| n.id.clone())
                .collect();
            for id in unknown {
                rt.heartbeats.insert(id, now);
            }
            let wall = time::OffsetDateTime::now_utc();
            let mut downed = Vec::new();
            for (id, name) in expired {
                if rt.store.mark_down(&id, wall) {
                    downed.push(name);
                }
            }
            if downed.is_empty() {
                return;
            }
            self.persist(&rt.store);
            (downed, rt.store.clone())
        };
        for name in &downed {
            log(format!(
                "node {name}: heartbeat missed for more than {limit:?}; marked down"
            ));
        }
        self.replicate(&store).await;
    }

    /// Forwards a request (method, path and query, token, body) to the first target that answers and
    /// relays its answer; `mark`: as forwarded (a server to its leader), so that it is not forwarded again.
    async fn forward(
        &self,
        targets: &[IpAddr],
        mark: bool,
        method: &Method,
        path_and_query: &str,
        token: &str,
        body: Bytes,
    ) -> Resp {
        for ip in targets {
            let mut rb = self
                .http()
                .request(method.clone(), self.url(*ip, path_and_query))
                .timeout(Duration::from_secs(30));
            if mark {
                rb = rb.header(FORWARDED_HEADER, "1");
            }
            if !token.is_empty() {
                rb = rb.header("X-Nomad-Token", token);
            }
            if !body.is_empty() {
                rb = rb
                    .header("content-type", "application/json")
                    .body(body.clone());
            }
            let Ok(r) = rb.send().await else { continue };
            return relay(r, "text/plain").await;
        }
        no_leader()
    }

    /// `Ok` where `w` is applied here (the leader); else the answer: no leader, or the leader's (the
    /// servers') answer to `w` forwarded as a PUT to `path`, with `token` (`""`: none).
    async fn at_leader(&self, w: &Write, path: &str, token: &str) -> Result<(), Resp> {
        match self.write_target(w.forwarded) {
            WriteTarget::Here => Ok(()),
            WriteTarget::NoLeader => Err(no_leader()),
            WriteTarget::Forward(t, mark) => Err(self
                .forward(&t, mark, &Method::PUT, path, token, w.body.clone())
                .await),
        }
    }

    /// Where a write (ACL changes, registrations) is applied: at the leader.
    fn write_target(&self, forwarded: bool) -> WriteTarget {
        if self.cfg.server.is_none() {
            return WriteTarget::Forward(self.servers_of_client(), false);
        }
        match self.rt.lock().expect("runtime").leader {
            None => WriteTarget::NoLeader,
            Some(l) if l == self.cfg.bind => WriteTarget::Here,
            // The sender thinks we lead; we do not (yet): retryable, as in an election.
            Some(_) if forwarded => WriteTarget::NoLeader,
            Some(l) => WriteTarget::Forward(vec![l], true),
        }
    }

    /// The capabilities of the request's token: from the replicated store on a server; on a client
    /// through its servers (`/v1/acl/token/self`, then each policy), as a Nomad client asks its servers.
    async fn authz(&self, secret: &str) -> Result<Authz, ApiError> {
        if !self.cfg.acl_enabled {
            return Ok(Authz::management(None));
        }
        if self.cfg.server.is_some() {
            return self.rt.lock().expect("runtime").store.resolve(secret);
        }
        let servers = self.servers_of_client();
        let get = |path: String| {
            let (http, servers, secret) = (self.http(), servers.clone(), secret.to_string());
            let urls: Vec<String> = servers.iter().map(|ip| self.url(*ip, &path)).collect();
            async move {
                for u in urls {
                    let mut rb = http.get(&u).timeout(Duration::from_secs(5));
                    if !secret.is_empty() {
                        rb = rb.header("X-Nomad-Token", &secret);
                    }
                    if let Ok(r) = rb.send().await {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        return Ok((status, body));
                    }
                }
                Err(ApiError(500, "No cluster leader".into()))
            }
        };
        let (names, token) = if secret.is_empty() {
            (vec!["anonymous".to_string()], None)
        } else {
            let (status, body) = get("/v1/acl/token/self".into()).await?;
            if status != 200 {
                return Err(ApiError(status, body));
            }
            let t: Token = serde_json::from_str(&body).map_err(|e| ApiError(500, e.to_string()))?;
            if t.kind == "management" {
                return Ok(Authz::management(Some(t)));
            }
            (t.policies.clone().unwrap_or_default(), Some(t))
        };
        let mut policies = Vec::new();
        for n in names {
            let (status, body) = get(format!("/v1/acl/policy/{n}")).await?;
            if status == 200 {
                policies.extend(serde_json::from_str::<Policy>(&body).ok());
            }
        }
        Ok(Authz::client(token, &policies))
    }

    /// `Err(answer)` unless the request's token has `cap`.
    async fn require(&self, req: &Request<Incoming>, cap: Cap) -> Result<Authz, Resp> {
        let a = self.authz(&token_of(req)).await.map_err(api_error)?;
        if a.allows(cap) {
            Ok(a)
        } else {
            Err(denied())
        }
    }

    /// The capabilities of the request's token, for the ACL endpoints (refused when ACLs are disabled).
    async fn acl_authz(&self, req: &Request<Incoming>) -> Result<Authz, Resp> {
        if !self.cfg.acl_enabled {
            return Err(acl_disabled());
        }
        self.authz(&token_of(req)).await.map_err(api_error)
    }

    /// The management check of every ACL write and of the token list.
    async fn require_management(&self, req: &Request<Incoming>) -> Result<(), Resp> {
        if self.acl_authz(req).await?.management {
            Ok(())
        } else {
            Err(denied())
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, client_cert: bool) -> Resp {
        self.route(req, client_cert)
            .await
            .unwrap_or_else(|early| early)
    }

    async fn route(&self, req: Request<Incoming>, client_cert: bool) -> Answer {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let is_write = method == Method::PUT || method == Method::POST;
        // A client agent answers status and its own /v1/agent/self; everything cluster-wide is the servers'.
        if self.cfg.server.is_none()
            && !matches!(
                path.as_str(),
                "/v1/status/leader" | "/v1/status/peers" | "/v1/agent/self" | "/v1/acl/bootstrap"
            )
            && (path.starts_with("/v1/nodes")
                || path.starts_with("/v1/node/")
                || path.starts_with("/v1/acl/")
                || path.starts_with("/v1/operator/")
                || path == "/v1/agent/members"
                || jobs::forwarded_by_clients(&path))
        {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or(path.clone());
            let token = token_of(&req);
            let body = read_body(req, 1 << 20).await?;
            return Ok(self
                .forward(&self.servers_of_client(), false, &method, &pq, &token, body)
                .await);
        }
        if jobs::handles(&path) {
            return self.jobs_route(req, client_cert).await;
        }
        match (&method, path.as_str()) {
            (&Method::GET, "/v1/status/leader") => Ok(self.status(true).await),
            (&Method::GET, "/v1/status/peers") => Ok(self.status(false).await),
            (&Method::GET, PEER_PATH) => Ok(self.peer_view(&req)),
            (&Method::PUT, PEER_PATH) => self.peer_apply(req).await,
            (&Method::PUT, NODE_PATH) => self.node_register(req, client_cert).await,
            (&Method::GET, JWKS_PATH) => Ok(self.jwks().await),
            (_, JWKS_PATH) => Ok(text(405, "Invalid method")),
            (&Method::PUT, IDENTITY_PATH) => self.sign_identity(req).await,
            (_, NODE_PATH) => Ok(text(405, "Invalid method")),
            (m, "/v1/acl/bootstrap") if m == Method::PUT || m == Method::POST => {
                self.acl_bootstrap(req).await
            }
            (_, "/v1/acl/bootstrap") => Ok(text(405, "Invalid method")),
            (&Method::GET, "/v1/acl/token/self") => Ok(self.token_self(&req)),
            (&Method::GET, "/v1/acl/tokens") => self.token_list(&req).await,
            (_, "/v1/acl/token") if is_write => self.token_create(req).await,
            (&Method::GET, p) if p.starts_with("/v1/acl/token/") => {
                let accessor = p["/v1/acl/token/".len()..].to_string();
                self.token_get(&req, &accessor).await
            }
            (&Method::GET, "/v1/acl/policies") => self.policy_list(&req).await,
            (_, p) if p.starts_with("/v1/acl/policy/") && is_write => {
                let name = p["/v1/acl/policy/".len()..].to_string();
                self.policy_write(req, &name).await
            }
            (&Method::GET, p) if p.starts_with("/v1/acl/policy/") => {
                let name = p["/v1/acl/policy/".len()..].to_string();
                self.policy_get(&req, &name).await
            }
            (&Method::GET, "/v1/nodes") => self.node_list(&req).await,
            (&Method::GET, p) if p.starts_with("/v1/node/") => {
                let id = p["/v1/node/".len()..].to_string();
                self.node_get(&req, &id).await
            }
            (&Method::GET, "/v1/operator/raft/configuration") => {
                self.raft_configuration(&req).await
            }
            (&Method::GET, "/v1/agent/self") => self.agent_self(&req).await,
            (&Method::GET, "/v1/agent/members") => self.agent_members(&req).await,
            (&Method::GET, "/v1/operator/snapshot") => self.snapshot_save(&req).await,
            (m, "/v1/operator/snapshot") if m == Method::PUT || m == Method::POST => {
                self.snapshot_restore(req).await
            }
            (_, "/v1/operator/snapshot") => Ok(text(405, "Invalid method")),
            _ => Ok(not_found()),
        }
    }

    /// `GET /.well-known/jwks.json`: the keyring's public keys (a client agent asks its servers, as Nomad's
    /// `Keyring.ListPublic` RPC does). Unauthenticated, as in Nomad.
    async fn jwks(&self) -> Resp {
        if self.cfg.server.is_none() {
            return self
                .ask(&self.servers_of_client(), JWKS_PATH)
                .await
                .unwrap_or_else(no_leader);
        }
        let rt = self.rt.lock().expect("runtime");
        json_resp(&crate::nomad_identity::jwks(&rt.store.keyring))
    }

    /// `PUT /v1/double/identity` (plumbing): `{"Namespace","JobID","Group","Task","AllocID","Identity",
    /// "Audience","TTLSeconds","IssuedAt"?}` → `{"JWT"}`, signed with the newest root key.
    async fn sign_identity(&self, req: Request<Incoming>) -> Answer {
        if let Some(refused) = self.peer_refusal(&req) {
            return Err(refused);
        }
        let body = read_body(req, 1 << 16).await?;
        let r: crate::nomad_identity::IdentityRequest = serde_json::from_slice(&body)
            .map_err(|e| text(400, format!("bad identity request: {e}")))?;
        let key = {
            let rt = self.rt.lock().expect("runtime");
            rt.store.keyring.last().cloned()
        };
        let Some(key) = key else {
            return Err(text(500, "no active root key"));
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let jwt = key
            .sign(&crate::nomad_identity::claims(&r, now, &uuid()))
            .map_err(|e| text(500, e))?;
        Ok(json_resp(&json!({ "JWT": jwt })))
    }

    async fn status(&self, leader_only: bool) -> Resp {
        if self.cfg.server.is_none() {
            let path = if leader_only {
                "/v1/status/leader"
            } else {
                "/v1/status/peers"
            };
            return self
                .ask(&self.servers_of_client(), path)
                .await
                .unwrap_or_else(no_leader);
        }
        let rt = self.rt.lock().expect("runtime");
        match rt.leader {
            None => no_leader(),
            Some(l) if leader_only => json_resp(&Self::rpc_addr(l)),
            Some(_) => json_resp(
                &rt.alive
                    .keys()
                    .map(|ip| Self::rpc_addr(*ip))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Asks other agents; the first success wins (client mode status).
    async fn ask(&self, targets: &[IpAddr], path: &str) -> Option<Resp> {
        for ip in targets {
            let Ok(r) = self
                .http()
                .get(self.url(*ip, path))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            else {
                continue;
            };
            let answer = relay(r, "application/json").await;
            if answer.status() == 200 {
                return Some(answer);
            }
        }
        None
    }

    fn peer_key_ok(&self, req: &Request<Incoming>) -> bool {
        let Some(server) = &self.cfg.server else {
            return false;
        };
        let given = req
            .headers()
            .get(PEER_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        given == server.encrypt.as_deref().unwrap_or("")
    }

    /// The refusal of a peer request: not a server, or not the servers' key.
    fn peer_refusal(&self, req: &Request<Incoming>) -> Option<Resp> {
        if self.cfg.server.is_none() {
            Some(not_found())
        } else if !self.peer_key_ok(req) {
            Some(denied())
        } else {
            None
        }
    }

    fn peer_view(&self, req: &Request<Incoming>) -> Resp {
        if let Some(refused) = self.peer_refusal(req) {
            return refused;
        }
        let rt = self.rt.lock().expect("runtime");
        json_resp(&PeerView {
            name: self.cfg.name.clone(),
            addr: self.cfg.bind,
            id: self.raft_id.clone(),
            store: rt.store.clone(),
        })
    }

    async fn peer_apply(&self, req: Request<Incoming>) -> Answer {
        if let Some(refused) = self.peer_refusal(&req) {
            return Err(refused);
        }
        let body = read_body(req, 8 << 20).await?;
        let Ok(store) = serde_json::from_slice::<Store>(&body) else {
            return Err(text(400, "bad state"));
        };
        let mut rt = self.rt.lock().expect("runtime");
        if store.index > rt.store.index {
            rt.store = store;
            self.persist(&rt.store);
        }
        Ok(text(200, ""))
    }

    async fn acl_bootstrap(&self, req: Request<Incoming>) -> Answer {
        if !self.cfg.acl_enabled {
            return Err(acl_disabled());
        }
        let w = Write::read(req, 64 * 1024).await?;
        let secret: Option<String> = if w.body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            serde_json::from_slice::<Value>(&w.body)
                .map_err(|e| text(400, format!("failed to decode request body: {e}")))?
                .get("BootstrapSecret")
                .and_then(Value::as_str)
                .map(String::from)
        };
        self.at_leader(&w, "/v1/acl/bootstrap", "").await?;
        let reset = self.reset_file();
        let (result, store) = {
            let mut rt = self.rt.lock().expect("runtime");
            let r = rt.store.bootstrap(secret.as_deref(), reset);
            if r.is_ok() {
                self.persist(&rt.store);
            }
            (r, rt.store.clone())
        };
        match result {
            Ok(t) => {
                // Like a raft commit: the followers have it before the caller hears of it.
                self.replicate(&store).await;
                log(format!(
                    "ACL bootstrap: management token created (accessor {}, index {}, {})",
                    t.accessor_id,
                    t.create_index,
                    if secret.is_some() {
                        "operator-provided secret"
                    } else {
                        "generated secret"
                    }
                ));
                Ok(json_resp(&t))
            }
            Err(ApiError(status, msg)) => {
                log(format!("ACL bootstrap refused: {msg}"));
                Err(text(status, msg))
            }
        }
    }

    /// Pushes the store to every answering peer (they adopt a higher index) and waits for their answers.
    async fn replicate(&self, store: &Store) {
        let Some(server) = &self.cfg.server else {
            return;
        };
        let peers: Vec<IpAddr> = {
            let rt = self.rt.lock().expect("runtime");
            rt.alive
                .keys()
                .copied()
                .filter(|ip| *ip != self.cfg.bind)
                .collect()
        };
        let mut acks = 1;
        for ip in &peers {
            let r = self
                .http()
                .put(self.url(*ip, PEER_PATH))
                .header(PEER_KEY_HEADER, server.encrypt.clone().unwrap_or_default())
                .json(store)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                acks += 1;
            }
        }
        if acks < server.bootstrap_expect / 2 + 1 {
            log(format!(
                "index {} replicated to {acks} servers only",
                store.index
            ));
        }
    }

    /// Applies a write to the store at the leader: persist, replicate, answer.
    async fn commit<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (out, store) = {
            let mut rt = self.rt.lock().expect("runtime");
            let out = f(&mut rt.store)?;
            self.persist(&rt.store);
            (out, rt.store.clone())
        };
        self.replicate(&store).await;
        Ok(out)
    }

    fn token_self(&self, req: &Request<Incoming>) -> Resp {
        if !self.cfg.acl_enabled {
            return acl_disabled();
        }
        let secret = token_of(req);
        let rt = self.rt.lock().expect("runtime");
        match rt.store.token_by_secret(&secret) {
            Some(t) => json_resp(t),
            None => text(403, "ACL token not found"),
        }
    }

    async fn token_create(&self, req: Request<Incoming>) -> Answer {
        self.require_management(&req).await?;
        let w = Write::read(req, 1 << 20).await?;
        self.at_leader(&w, "/v1/acl/token", &w.token).await?;
        let tw: TokenWrite =
            serde_json::from_slice(&w.body).map_err(|e| text(400, e.to_string()))?;
        let t = self
            .commit(|s| s.create_token(tw))
            .await
            .map_err(api_error)?;
        log(format!(
            "ACL token created: accessor {}, type {}, policies {:?}",
            t.accessor_id,
            t.kind,
            t.policies.clone().unwrap_or_default()
        ));
        Ok(json_resp(&t))
    }

    async fn token_list(&self, req: &Request<Incoming>) -> Answer {
        self.require_management(req).await?;
        let rt = self.rt.lock().expect("runtime");
        let stubs: Vec<Value> = rt
            .store
            .tokens
            .iter()
            .map(|t| {
                let mut v = serde_json::to_value(t).expect("token serialises");
                v.as_object_mut().expect("object").remove("SecretID");
                v
            })
            .collect();
        Ok(json_resp(&stubs))
    }

    async fn token_get(&self, req: &Request<Incoming>, accessor: &str) -> Answer {
        let a = self.acl_authz(req).await?;
        let rt = self.rt.lock().expect("runtime");
        match rt.store.tokens.iter().find(|t| t.accessor_id == accessor) {
            Some(t) if a.management || a.token.as_ref() == Some(t) => Ok(json_resp(t)),
            Some(_) => Err(denied()),
            None if a.management => Err(text(404, "ACL token not found")),
            None => Err(denied()),
        }
    }

    async fn policy_write(&self, req: Request<Incoming>, name: &str) -> Answer {
        self.require_management(&req).await?;
        let w = Write::read(req, 1 << 20).await?;
        let p: PolicyWrite =
            serde_json::from_slice(&w.body).map_err(|e| text(400, e.to_string()))?;
        if p.name != name {
            return Err(text(400, "ACL policy name does not match request path"));
        }
        self.at_leader(&w, &format!("/v1/acl/policy/{name}"), &w.token)
            .await?;
        let index = self
            .commit(|s| s.upsert_policy(p))
            .await
            .map_err(api_error)?;
        log(format!("ACL policy {name} written (index {index})"));
        Ok(text(200, ""))
    }

    /// The policy names a non-management token may read (its own).
    fn own_policies(a: &Authz) -> Vec<String> {
        a.token
            .as_ref()
            .and_then(|t| t.policies.clone())
            .unwrap_or_default()
    }

    async fn policy_list(&self, req: &Request<Incoming>) -> Answer {
        let a = self.acl_authz(req).await?;
        let own = Self::own_policies(&a);
        let rt = self.rt.lock().expect("runtime");
        let stubs: Vec<Value> = rt
            .store
            .policies
            .iter()
            .filter(|p| a.management || own.contains(&p.name))
            .map(|p| {
                json!({"Name": p.name, "Description": p.description, "JobACL": null,
                       "CreateIndex": p.create_index, "ModifyIndex": p.modify_index})
            })
            .collect();
        Ok(json_resp(&stubs))
    }

    async fn policy_get(&self, req: &Request<Incoming>, name: &str) -> Answer {
        let a = self.acl_authz(req).await?;
        if !a.management && name != "anonymous" && !Self::own_policies(&a).iter().any(|p| p == name)
        {
            return Err(denied());
        }
        let rt = self.rt.lock().expect("runtime");
        match rt.store.policy(name) {
            Some(p) => {
                let mut v = serde_json::to_value(p).expect("policy serialises");
                let rules = parse_rules(&p.rules).unwrap_or_default();
                v["RulesJSON"] = rules.to_json();
                v["JobACL"] = Value::Null;
                Ok(json_resp(&v))
            }
            None => Err(text(404, "ACL policy not found")),
        }
    }

    async fn node_list(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::NodeRead).await?;
        let prefix = query_param(req, "prefix").unwrap_or_default();
        let rt = self.rt.lock().expect("runtime");
        let mut nodes: Vec<&Node> = rt
            .store
            .nodes
            .iter()
            .filter(|n| n.id.starts_with(&prefix))
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(json_resp(
            &nodes.iter().map(|n| n.stub()).collect::<Vec<_>>(),
        ))
    }

    async fn node_get(&self, req: &Request<Incoming>, id: &str) -> Answer {
        self.require(req, Cap::NodeRead).await?;
        let rt = self.rt.lock().expect("runtime");
        match rt.store.nodes.iter().find(|n| n.id == id) {
            Some(n) => Ok(json_resp(&n.public())),
            None => Err(text(404, "node not found")),
        }
    }

    /// A client's registration or heartbeat (the stand-in for `Node.Register`/`Node.UpdateStatus`): only
    /// over a TLS connection whose client certificate `tls.ca_file` signed; applied at the leader.
    async fn node_register(&self, req: Request<Incoming>, client_cert: bool) -> Answer {
        let Some(server) = &self.cfg.server else {
            return Err(not_found());
        };
        if !client_cert {
            return Err(text(
                403,
                "Permission denied: node registration needs a client certificate signed by tls.ca_file (mTLS)",
            ));
        }
        let w = Write::read(req, 1 << 20).await?;
        let reg: NodeRegistration = serde_json::from_slice(&w.body)
            .map_err(|e| text(400, format!("failed to decode request body: {e}")))?;
        self.at_leader(&w, NODE_PATH, "").await?;
        let (name, id) = (reg.name.clone(), reg.id.clone());
        let now = time::OffsetDateTime::now_utc();
        let (changed, store, status, count) = {
            let mut rt = self.rt.lock().expect("runtime");
            let before = rt
                .store
                .nodes
                .iter()
                .find(|n| n.id == id)
                .map(|n| n.status.clone());
            let changed = rt.store.register_node(reg, now).map_err(api_error)?;
            rt.heartbeats.insert(id.clone(), Instant::now());
            if changed {
                self.persist(&rt.store);
            }
            (changed, rt.store.clone(), before, rt.store.nodes.len())
        };
        if changed {
            self.replicate(&store).await;
            log(match status.as_deref() {
                None => format!("node {name} ({id}) registered: ready"),
                Some("down") => format!("node {name} ({id}) heartbeat after down: ready"),
                _ => format!("node {name} ({id}) updated"),
            });
        }
        Ok(json_resp(&json!({
            "HeartbeatTTL": server.min_heartbeat_ttl.as_nanos() as u64,
            "LeaderRPCAddr": Self::rpc_addr(self.cfg.bind),
            "NumNodes": count,
            "Index": store.index,
        })))
    }

    async fn raft_configuration(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::OperatorRead).await?;
        let rt = self.rt.lock().expect("runtime");
        if rt.leader.is_none() {
            return Err(no_leader());
        }
        let servers: Vec<Value> = rt
            .alive
            .iter()
            .map(|(ip, (name, id))| {
                json!({
                    "ID": id,
                    "Node": format!("{name}.{}", self.cfg.region),
                    "Address": Self::rpc_addr(*ip),
                    "Leader": rt.leader == Some(*ip),
                    "Voter": true,
                    "RaftProtocol": "3",
                })
            })
            .collect();
        Ok(json_resp(
            &json!({"Index": rt.store.index, "Servers": servers}),
        ))
    }

    async fn agent_self(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::AgentRead).await?;
        let rt = self.rt.lock().expect("runtime");
        let server = self.cfg.server.as_ref();
        Ok(json_resp(&json!({
            "config": {
                "Region": self.cfg.region,
                "Datacenter": self.cfg.datacenter,
                "NodeName": self.cfg.name,
                "DataDir": self.cfg.data_dir.display().to_string(),
                "BindAddr": self.cfg.bind.to_string(),
                "Version": {"Version": VERSION, "VersionPrerelease": "", "VersionMetadata": ""},
                "ACL": {"Enabled": self.cfg.acl_enabled},
                "Server": {"Enabled": server.is_some(), "BootstrapExpect": server.map(|s| s.bootstrap_expect).unwrap_or(0)},
                "Client": {"Enabled": self.cfg.client.is_some(), "NodeClass": self.cfg.client.as_ref().map(|c| c.node_class.clone()).unwrap_or_default()},
                "TLSConfig": {"EnableHTTP": self.cfg.tls.is_some()},
            },
            "member": if server.is_some() { self.member(self.cfg.bind, &self.cfg.name) } else { Value::Null },
            "stats": {
                "nomad": {
                    "server": server.is_some().to_string(),
                    "leader": (rt.leader == Some(self.cfg.bind)).to_string(),
                    "leader_addr": rt.leader.map(Self::rpc_addr).unwrap_or_default(),
                    "known_regions": "1",
                },
                "raft": {"applied_index": rt.store.index.to_string()},
            },
        })))
    }

    /// `GET /v1/operator/snapshot` (Nomad's `snapshotSaveRequest` and `Operator.SnapshotSave`): forwarded to the
    /// leader unless `?stale`; a management token (Nomad < 2.0; 2.0 added the `snapshot-save` operator
    /// capability); the body streamed with `Digest: sha-256=<base64>` of it. The body is the double's own archive
    /// (`SNAPSHOT_MAGIC` and its replicated store as JSON), not Nomad's gzipped tar: only its round trip through
    /// a restore is part of the contract.
    async fn snapshot_save(&self, req: &Request<Incoming>) -> Answer {
        let stale = req.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|p| p == "stale" || p.starts_with("stale="))
        });
        if !stale {
            let leader = self.rt.lock().expect("runtime").leader;
            match leader {
                None => return Err(no_leader()),
                Some(l) if l != self.cfg.bind => {
                    let mut rb = self
                        .http()
                        .get(self.url(l, "/v1/operator/snapshot"))
                        .timeout(Duration::from_secs(30));
                    let token = token_of(req);
                    if !token.is_empty() {
                        rb = rb.header("X-Nomad-Token", token);
                    }
                    let Ok(r) = rb.send().await else {
                        return Err(no_leader());
                    };
                    let digest = r.headers().get("Digest").cloned();
                    let mut resp = relay(r, "text/plain").await;
                    if let Some(d) = digest {
                        resp.headers_mut().insert("Digest", d);
                    }
                    return Ok(resp);
                }
                Some(_) => {}
            }
        }
        // ACLs off: everyone may (Nomad resolves no ACL then).
        if !self
            .authz(&token_of(req))
            .await
            .map_err(api_error)?
            .management
        {
            return Err(denied());
        }
        let store = self.rt.lock().expect("runtime").store.clone();
        let mut body = SNAPSHOT_MAGIC.to_vec();
        body.extend_from_slice(&serde_json::to_vec(&store).expect("store serialises"));
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
        use base64::Engine;
        let digest = format!(
            "sha-256={}",
            base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
        );
        log(format!("snapshot saved at index {}", store.index));
        let mut resp = respond(200, "application/octet-stream", Bytes::from(body));
        resp.headers_mut().insert(
            "Digest",
            hyper::header::HeaderValue::from_str(&digest).expect("header value"),
        );
        Ok(resp)
    }

    /// `PUT|POST /v1/operator/snapshot` (Nomad's `snapshotRestoreRequest` and `Operator.SnapshotRestore`): at the
    /// leader, a management token only; an archive that does not read is 500 `failed to restore from snapshot:
    /// …` and changes nothing. The restored state takes an index above the current one (as a raft restore does),
    /// so every server adopts it.
    async fn snapshot_restore(&self, req: Request<Incoming>) -> Answer {
        if !self
            .authz(&token_of(&req))
            .await
            .map_err(api_error)?
            .management
        {
            return Err(denied());
        }
        let w = Write::read(req, 64 << 20).await?;
        self.at_leader(&w, "/v1/operator/snapshot", &w.token)
            .await?;
        let restored: Store = w
            .body
            .strip_prefix(SNAPSHOT_MAGIC)
            .ok_or_else(|| "not a snapshot archive".to_string())
            .and_then(|b| serde_json::from_slice(b).map_err(|e| e.to_string()))
            .map_err(|e| text(500, format!("failed to restore from snapshot: {e}")))?;
        let index = self
            .commit(|s| {
                let index = s.index.max(restored.index) + 1;
                *s = restored;
                s.index = index;
                s.formed = true;
                Ok(index)
            })
            .await
            .map_err(api_error)?;
        log(format!("snapshot restored (index {index})"));
        Ok(text(200, ""))
    }

    fn member(&self, ip: IpAddr, name: &str) -> Value {
        json!({
            "Name": format!("{name}.{}", self.cfg.region),
            "Addr": ip.to_string(),
            "Port": 4648,
            "Status": "alive",
            "Tags": {
                "role": "nomad",
                "region": self.cfg.region,
                "dc": self.cfg.datacenter,
                "build": VERSION,
                "port": RPC_PORT.to_string(),
                "expect": self.cfg.server.as_ref().map(|s| s.bootstrap_expect.to_string()).unwrap_or_default(),
            },
        })
    }

    /// Nomad's `Status.Members` checks node read (not agent read).
    async fn agent_members(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::NodeRead).await?;
        let rt = self.rt.lock().expect("runtime");
        let members: Vec<Value> = rt
            .alive
            .iter()
            .map(|(ip, (name, _))| self.member(*ip, name))
            .collect();
        Ok(json_resp(&json!({
            "ServerName": format!("{}.{}", self.cfg.name, self.cfg.region),
            "ServerRegion": self.cfg.region,
            "ServerDC": self.cfg.datacenter,
            "Members": members,
        })))
    }

    /// A client's node document (sent with every heartbeat).
    fn registration(&self, id: &str, secret: &str) -> NodeRegistration {
        NodeRegistration {
            id: id.into(),
            secret_id: secret.into(),
            name: self.cfg.name.clone(),
            datacenter: self.cfg.datacenter.clone(),
            node_class: self
                .cfg
                .client
                .as_ref()
                .map(|c| c.node_class.clone())
                .unwrap_or_default(),
            http_addr: SocketAddr::new(self.cfg.bind, self.cfg.http_port).to_string(),
            address: self.cfg.bind.to_string(),
            tls_enabled: self.cfg.tls.is_some(),
            version: VERSION.into(),
        }
    }

    /// The client's side: register, then heartbeat every HeartbeatTTL/2, with the first server that
    /// answers (the servers forward to their leader).
    async fn client_loop(self: Arc<Self>, id: String, secret: String) {
        let servers = self.servers_of_client();
        let reg = self.registration(&id, &secret);
        let mut registered = false;
        let mut last_error = String::new();
        loop {
            let mut next = Duration::from_secs(1);
            let mut error = None;
            for ip in &servers {
                let r = self
                    .http()
                    .put(self.url(*ip, NODE_PATH))
                    .json(&reg)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let v: Value = r.json().await.unwrap_or_default();
                        let ttl = v["HeartbeatTTL"].as_u64().unwrap_or(2_000_000_000);
                        next = (Duration::from_nanos(ttl) / 2)
                            .clamp(Duration::from_millis(50), Duration::from_secs(30));
                        error = None;
                        break;
                    }
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        error = Some(format!("{ip}: HTTP {status}: {}", body.trim()));
                    }
                    Err(e) => error = Some(format!("{ip}: {e}")),
                }
            }
            match error {
                None if !registered => {
                    registered = true;
                    last_error.clear();
                    log(format!(
                        "node registration complete (node {id}, heartbeat every {next:?})"
                    ));
                }
                None => {}
                Some(e) if e != last_error => {
                    if registered {
                        log(format!("heartbeat failed: {e}"));
                    } else {
                        log(format!("node registration failed: {e}"));
                    }
                    registered = false;
                    last_error = e;
                }
                Some(_) => {}
            }
            tokio::time::sleep(next).await;
        }
    }
}

fn tls_acceptor(t: &TlsConfig) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert_file {}: {e}", t.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| format!("tls.key_file {}: {e}", t.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    // With a CA: ask every client for a certificate and verify it (a wrong one fails the handshake);
    // API clients without one are still served, and only registration insists on one.
    let builder = match &t.ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The agent's own HTTPS client: trusts `tls.ca_file`, presents `tls.cert_file`/`tls.key_file`.
fn http_client(cfg: &Config) -> Result<reqwest::Client, String> {
    http_builder(cfg)?.build().map_err(|e| e.to_string())
}

/// [`http_client`]'s builder (a server adds `resolve` to reach a client by its certificate's name).
fn http_builder(cfg: &Config) -> Result<reqwest::ClientBuilder, String> {
    let mut b = reqwest::Client::builder().no_proxy();
    if let Some(t) = &cfg.tls {
        if let Some(ca) = &t.ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            b = b.tls_certs_only([cert]);
        }
        let mut pem = std::fs::read(&t.cert_file)
            .map_err(|e| format!("tls.cert_file {}: {e}", t.cert_file.display()))?;
        pem.push(b'\n');
        pem.extend(
            std::fs::read(&t.key_file)
                .map_err(|e| format!("tls.key_file {}: {e}", t.key_file.display()))?,
        );
        let id = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"));
        pem.fill(0);
        b = b.identity(id?);
    }
    Ok(b)
}

/// This server's raft ID: read from `<data_dir>/server/node-id`, created the first time.
fn server_id(server_dir: &Path) -> Result<String, String> {
    let p = server_dir.join(SERVER_ID_FILE);
    if let Ok(s) = std::fs::read_to_string(&p) {
        if is_uuid(s.trim()) {
            return Ok(s.trim().to_string());
        }
    }
    let id = uuid();
    std::fs::write(&p, &id).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(id)
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let server_dir = cfg.data_dir.join("server");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&server_dir)
            .map_err(|e| format!("data_dir {}: {e}", server_dir.display()))?;
    }
    let state_file = server_dir.join(STATE_FILE);
    let store = Store::load(&state_file)?;
    let raft_id = server_id(&server_dir)?;
    let client_id = match &cfg.client {
        Some(_) => Some(client_identity(&cfg.data_dir)?),
        None => None,
    };
    let acceptor = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    let acceptor = Arc::new(Mutex::new(acceptor));
    let addr = SocketAddr::new(cfg.bind, cfg.http_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    let agent = Arc::new(Agent {
        http: Mutex::new(http_client(&cfg)?),
        state_file,
        raft_id,
        rt: Mutex::new(Runtime {
            store,
            ..Default::default()
        }),
        cfg,
    });
    log(format!(
        "Nomad v{VERSION} contract double ({} mode) serving the documented HTTP API subset on {}://{addr}; \
         ACLs {}; state index {}",
        if agent.cfg.server.is_some() { "server" } else { "client" },
        agent.cfg.scheme(),
        if agent.cfg.acl_enabled { "enabled" } else { "disabled" },
        agent.rt.lock().expect("runtime").store.index,
    ));
    if let Some(s) = &agent.cfg.server {
        log(format!(
            "server: bootstrap_expect {}, peers {:?}, heartbeat TTL {:?} + grace {:?}",
            s.bootstrap_expect, s.peers, s.min_heartbeat_ttl, s.heartbeat_grace
        ));
    }
    let poller = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                agent.poll_peers().await;
                agent.check_heartbeats().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let client = client_id.map(|(id, secret)| {
        let agent = agent.clone();
        log(format!(
            "client: node {id}, servers {:?}",
            agent.servers_of_client()
        ));
        tokio::spawn(agent.clone().alloc_runner(id.clone(), secret.clone()));
        tokio::spawn(agent.client_loop(id, secret))
    });
    let reloader = {
        let (agent, acceptor) = (agent.clone(), acceptor.clone());
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match agent.cfg.tls.as_ref().map(tls_acceptor).transpose() {
                    Ok(a) => {
                        *acceptor.lock().expect("acceptor") = a;
                        if let Ok(c) = http_client(&agent.cfg) {
                            *agent.http.lock().expect("http client") = c;
                        }
                        log("caught SIGHUP: reloaded the TLS certificate");
                    }
                    Err(e) => log(format!("caught SIGHUP: keeping the old certificate: {e}")),
                }
            }
        })
    };
    let accept = async {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let agent = agent.clone();
            let tls = acceptor.lock().expect("acceptor").clone();
            tokio::spawn(async move {
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(tls) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
                        else {
                            return;
                        };
                        // rustls verified any certificate the client presented against tls.ca_file.
                        let client_cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .is_some_and(|c| !c.is_empty());
                        let svc = hyper::service::service_fn(move |req| {
                            let agent = agent.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    agent.handle(req, client_cert).await,
                                )
                            }
                        });
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    None => {
                        let svc = hyper::service::service_fn(move |req| {
                            let agent = agent.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(agent.handle(req, false).await)
                            }
                        });
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
    poller.abort();
    reloader.abort();
    if let Some(c) = client {
        c.abort();
    }
    log("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bootstrap_uses_the_given_secret_and_later_ones_report_the_reset_index() {
        let mut s = Store::default();
        let secret = uuid();
        let t = s.bootstrap(Some(&secret), None).unwrap();
        assert_eq!(t.secret_id, secret);
        assert_eq!(
            (t.name.as_str(), t.kind.as_str(), t.global),
            ("Bootstrap Token", "management", true)
        );
        assert!(is_uuid(&t.accessor_id) && t.accessor_id != secret);
        assert_eq!(t.create_index, s.bootstrap_index);
        let v = serde_json::to_value(&t).unwrap();
        for k in [
            "AccessorID",
            "SecretID",
            "Name",
            "Type",
            "Global",
            "CreateIndex",
            "ModifyIndex",
        ] {
            assert!(v.get(k).is_some(), "{k} in {v}");
        }
        let n = s.bootstrap_index;
        // Again, with the same or another secret, or none: already done, never a second token.
        for again in [Some(secret.as_str()), Some(uuid().as_str()), None] {
            assert_eq!(
                s.bootstrap(again, None),
                Err(ApiError(
                    400,
                    format!("ACL bootstrap already done (reset index: {n})")
                ))
            );
        }
        assert_eq!(s.tokens.len(), 1);
        assert_eq!(s.token_by_secret(&secret), Some(&t));
        assert!(s.token_by_secret("").is_none());
        assert!(s.token_by_secret(&uuid()).is_none());
    }

    #[test]
    fn generated_secret_and_invalid_secret() {
        let mut s = Store::default();
        assert_eq!(
            s.bootstrap(Some("not-a-uuid"), None),
            Err(ApiError(400, "invalid acl token".into()))
        );
        assert_eq!(s.bootstrap_index, 0, "a refused bootstrap changes nothing");
        let t = s.bootstrap(None, None).unwrap();
        assert!(is_uuid(&t.secret_id));
        // "already done" is checked before the secret's shape, as in Nomad.
        assert!(s
            .bootstrap(Some("x"), None)
            .unwrap_err()
            .1
            .contains("already done"));
    }

    #[test]
    fn reset_index_file_allows_exactly_the_documented_rebootstrap() {
        let mut s = Store::default();
        let first = s.bootstrap(Some(&uuid()), None).unwrap();
        let n = s.bootstrap_index;
        assert_eq!(
            s.bootstrap(None, Some(n + 5)),
            Err(ApiError(
                400,
                format!(
                    "Invalid bootstrap reset index (specified {}, reset index: {n})",
                    n + 5
                )
            ))
        );
        let second = s.bootstrap(None, Some(n)).unwrap();
        assert!(second.create_index > n);
        // The old token stays valid (documented), and the stale reset file no longer matches.
        assert!(s.token_by_secret(&first.secret_id).is_some());
        assert!(s
            .bootstrap(None, Some(n))
            .unwrap_err()
            .1
            .starts_with("Invalid bootstrap reset index"));
    }

    #[test]
    fn uuids() {
        assert!(is_uuid("2b778dd9-f5f1-6f29-b4b4-9a5fa948757a"));
        assert!(is_uuid("2B778DD9-F5F1-6F29-B4B4-9A5FA948757A"));
        assert!(!is_uuid("2b778dd9f5f16f29b4b49a5fa948757a"));
        assert!(!is_uuid("2b778dd9-f5f1-6f29-b4b4-9a5fa948757g"));
        let u = uuid();
        assert!(is_uuid(&u) && u.as_bytes()[14] == b'4');
        assert_ne!(uuid(), uuid());
    }

    #[test]
    fn config_merges_the_agents_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("nomad.json"),
            r#"{"name":"n1","data_dir":"/tmp/x","bind_addr":"127.0.0.31","acl":{"enabled":true},
               "server":{"enabled":true,"bootstrap_expect":3,"server_join":{"retry_join":["127.0.0.31","127.0.0.32","127.0.0.33:4648"]}},
               "tls":{"http":true,"cert_file":"c.pem","key_file":"k.pem","ca_file":"ca.pem"}}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("gossip.json"),
            r#"{"server":{"encrypt":"k3y"}}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let c = Config::load(&[d.path().to_path_buf()]).unwrap();
        let s = c.server.unwrap();
        assert_eq!(s.bootstrap_expect, 3);
        assert_eq!(s.encrypt.as_deref(), Some("k3y"));
        assert_eq!(
            s.peers,
            vec![
                "127.0.0.32".parse::<IpAddr>().unwrap(),
                "127.0.0.33".parse().unwrap()
            ]
        );
        assert!(c.acl_enabled && c.tls.is_some());
        assert_eq!(c.http_port, DEFAULT_HTTP_PORT);
        let bad = json!({"data_dir":"/x","server":{"enabled":true,"server_join":{"retry_join":["provider=azure tag_name=x"]}}});
        assert!(Config::from_value(&bad).unwrap_err().contains("auto-join"));
    }

    // ----------------------------------------------------------------------------------------------
    // ACL policies and tokens

    const STATUS_RULES: &str = r#"# read-only status
node { policy = "read" }
agent {
  policy = "read"
}
operator { policy = "read" } // raft
"#;

    #[test]
    fn policy_rules_parse_the_implemented_subset_like_nomad() {
        let r = parse_rules(STATUS_RULES).unwrap();
        assert_eq!(
            r,
            Rules {
                node: Some(Level::Read),
                agent: Some(Level::Read),
                operator: Some(Level::Read)
            }
        );
        // The JSON form, `=` before a block, /* */ comments.
        assert_eq!(
            parse_rules(r#"{"node": {"policy": "write"}}"#)
                .unwrap()
                .node,
            Some(Level::Write)
        );
        let r = parse_rules("/* a */ agent = { policy = \"deny\" }").unwrap();
        assert_eq!((r.agent, r.node), (Some(Level::Deny), None));
        // Empty rules are Nomad's hot path: valid, and grant nothing.
        assert_eq!(parse_rules("").unwrap(), Rules::default());

        let bad = |rules: &str| parse_rules(rules).unwrap_err();
        assert_eq!(
            bad(r#"node { policy = "reed" }"#),
            r#"Invalid node policy: &acl.NodePolicy{Policy:"reed"}"#
        );
        assert_eq!(
            bad("agent { }"),
            r#"Invalid agent policy: &acl.AgentPolicy{Policy:""}"#
        );
        assert_eq!(
            bad(r#"node { policy = "read" } nod { policy = "read" }"#),
            "Invalid or duplicate policy keys: nod"
        );
        assert_eq!(
            bad(r#"node { policy = "read" } node { policy = "write" }"#),
            "Invalid or duplicate policy keys: node"
        );
        assert_eq!(
            bad(r#"node { policy = "read" level = "x" }"#),
            "Invalid or duplicate policy keys: level"
        );
        assert_eq!(
            bad(r#"nod { policy = "read" }"#),
            r#"Invalid policy: nod { policy = "read" }"#
        );
        assert!(bad(r#"node { policy = "read" "#).starts_with("Failed to parse ACL Policy: "));
        assert!(bad(r#"node { policy = "read }"#).starts_with("Failed to parse ACL Policy: "));
        for unsupported in [
            r#"namespace "default" { policy = "read" }"#,
            r#"host_volume "x" { policy = "write" }"#,
            r#"operator { capabilities = ["snapshot-save"] }"#,
        ] {
            let e = bad(unsupported);
            assert!(
                e.contains("not implemented by the Nomad contract double"),
                "{e}"
            );
        }
    }

    #[test]
    fn policies_tokens_and_what_they_allow() {
        let mut s = Store::default();
        let mgmt = s.bootstrap(Some(&uuid()), None).unwrap();
        let pw = |name: &str, rules: &str| PolicyWrite {
            name: name.into(),
            description: "d".into(),
            rules: rules.into(),
        };
        // Bad name, bad rules, long description: one multierror, as Nomad's ACLPolicy.Validate.
        let e = s
            .upsert_policy(PolicyWrite {
                description: "x".repeat(300),
                ..pw("bad name", "nod {}")
            })
            .unwrap_err();
        assert_eq!(e.0, 400);
        assert_eq!(
            e.1,
            "policy 0 invalid: 3 errors occurred:\n\t* invalid name 'bad name'\n\t* failed to parse rules: \
             Invalid policy: nod {}\n\t* description longer than 256\n\n"
        );
        s.upsert_policy(pw("status-read", STATUS_RULES)).unwrap();
        s.upsert_policy(pw("nodes", r#"node { policy = "read" }"#))
            .unwrap();
        // An upsert: writing it again changes the rules and the modify index only.
        let created = s.policy("nodes").unwrap().create_index;
        s.upsert_policy(pw("nodes", r#"node { policy = "write" }"#))
            .unwrap();
        let p = s.policy("nodes").unwrap();
        assert_eq!(p.create_index, created);
        assert!(p.modify_index > created);
        s.upsert_policy(pw("nodes", r#"node { policy = "read" }"#))
            .unwrap();

        let tw = |kind: &str, policies: &[&str]| TokenWrite {
            name: "t".into(),
            kind: kind.into(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        for (w, want) in [
            (tw("client", &[]), "client token missing policies or roles"),
            (
                tw("management", &["nodes"]),
                "management token cannot be associated with policies or roles",
            ),
            (
                tw("root", &["nodes"]),
                "token type must be client or management",
            ),
        ] {
            assert_eq!(
                s.create_token(w),
                Err(ApiError(
                    400,
                    format!("token 0 invalid: 1 error occurred:\n\t* {want}\n\n")
                ))
            );
        }
        let nodes_only = s.create_token(tw("client", &["nodes"])).unwrap();
        assert!(is_uuid(&nodes_only.accessor_id) && is_uuid(&nodes_only.secret_id));
        assert_eq!(nodes_only.policies, Some(vec!["nodes".to_string()]));
        let status = s.create_token(tw("client", &["status-read"])).unwrap();
        // A dangling policy link is allowed (as in Nomad) and grants nothing.
        let dangling = s.create_token(tw("client", &["no-such-policy"])).unwrap();

        let a = s.resolve(&nodes_only.secret_id).unwrap();
        assert!(!a.management);
        assert!(a.allows(Cap::NodeRead));
        assert!(!a.allows(Cap::AgentRead) && !a.allows(Cap::OperatorRead));
        let a = s.resolve(&status.secret_id).unwrap();
        assert!(a.allows(Cap::NodeRead) && a.allows(Cap::AgentRead) && a.allows(Cap::OperatorRead));
        let a = s.resolve(&dangling.secret_id).unwrap();
        assert!(!a.allows(Cap::NodeRead));
        let a = s.resolve(&mgmt.secret_id).unwrap();
        assert!(a.management && a.allows(Cap::OperatorRead));
        assert_eq!(
            s.resolve(&uuid()),
            Err(ApiError(403, "ACL token not found".into()))
        );
        // No token: the anonymous policy, when there is one.
        assert!(!s.resolve("").unwrap().allows(Cap::NodeRead));
        s.upsert_policy(pw("anonymous", r#"node { policy = "read" }"#))
            .unwrap();
        assert!(s.resolve("").unwrap().allows(Cap::NodeRead));
        // deny wins over read when policies merge.
        s.upsert_policy(pw("no-nodes", r#"node { policy = "deny" }"#))
            .unwrap();
        let both = s
            .create_token(tw("client", &["nodes", "no-nodes"]))
            .unwrap();
        assert!(!s.resolve(&both.secret_id).unwrap().allows(Cap::NodeRead));
    }

    #[test]
    fn nodes_register_heartbeat_go_down_and_come_back() {
        let mut s = Store::default();
        let now = time::OffsetDateTime::now_utc();
        let reg = NodeRegistration {
            id: uuid(),
            secret_id: uuid(),
            name: "worker-0".into(),
            datacenter: "dc1".into(),
            node_class: String::new(),
            http_addr: "10.0.0.4:4646".into(),
            address: "10.0.0.4".into(),
            tls_enabled: true,
            version: VERSION.into(),
        };
        assert!(s.register_node(reg.clone(), now).unwrap());
        let i = s.index;
        // A heartbeat of a ready, unchanged node is no write.
        assert!(!s.register_node(reg.clone(), now).unwrap());
        assert_eq!(s.index, i);
        let stub = s.nodes[0].stub();
        for (k, v) in [
            ("Status", json!("ready")),
            ("Name", json!("worker-0")),
            ("SchedulingEligibility", json!("eligible")),
            ("Drain", json!(false)),
            ("Version", json!(VERSION)),
            ("Address", json!("10.0.0.4")),
        ] {
            assert_eq!(stub[k], v, "{k}");
        }
        assert!(stub.get("SecretID").is_none() && s.nodes[0].public().get("SecretID").is_none());
        // Another secret under the same ID is refused.
        let thief = NodeRegistration {
            secret_id: uuid(),
            ..reg.clone()
        };
        assert_eq!(
            s.register_node(thief, now),
            Err(ApiError(
                400,
                "node secret ID does not match. Not registering node.".into()
            ))
        );
        assert!(s.mark_down(&reg.id, now));
        assert!(!s.mark_down(&reg.id, now), "already down");
        assert_eq!(s.nodes[0].status, "down");
        assert!(s.register_node(reg.clone(), now).unwrap());
        assert_eq!(s.nodes[0].status, "ready");
        let events: Vec<&str> = s.nodes[0]
            .events
            .iter()
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(
            events,
            [
                "Node registered",
                "Node heartbeat missed",
                "Node reregistered by heartbeat"
            ]
        );
        assert_eq!(
            s.register_node(
                NodeRegistration {
                    id: "x".into(),
                    ..reg
                },
                now
            ),
            Err(ApiError(400, "missing node ID".into()))
        );
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10x").is_err());
        let c = Config::from_value(&json!({"data_dir": "/x", "server": {"enabled": true,
            "min_heartbeat_ttl": "300ms", "heartbeat_grace": "1s"}}))
        .unwrap();
        let s = c.server.unwrap();
        assert_eq!(
            (s.min_heartbeat_ttl, s.heartbeat_grace),
            (Duration::from_millis(300), Duration::from_secs(1))
        );
        assert!(Config::from_value(
            &json!({"data_dir": "/x", "server": {"enabled": true, "heartbeat_grace": "soon"}})
        )
        .unwrap_err()
        .contains("server.heartbeat_grace"));
    }

    // ----------------------------------------------------------------------------------------------
    // A server and a client over HTTPS: registration (mTLS), heartbeats, ACL enforcement

    struct Pki {
        dir: tempfile::TempDir,
        ca_pem: String,
        ca: hashistack_agent::tls::ClusterCa,
    }

    impl Pki {
        fn new() -> Pki {
            let now = time::OffsetDateTime::now_utc();
            let (ca_pem, ca_key) =
                hashistack_agent::tls::generate_ca("double test CA", 1, now).unwrap();
            let ca = hashistack_agent::tls::ClusterCa::from_pem(&ca_pem, &ca_key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
            Pki { dir, ca_pem, ca }
        }
        /// A node certificate for `ip`: (cert path, key path).
        fn issue(&self, name: &str, ip: IpAddr) -> (PathBuf, PathBuf) {
            let c = self
                .ca
                .issue(name, &[ip.to_string()], 1, time::OffsetDateTime::now_utc())
                .unwrap();
            let cert = self.dir.path().join(format!("{name}.pem"));
            let key = self.dir.path().join(format!("{name}-key.pem"));
            std::fs::write(&cert, &c.cert_pem).unwrap();
            std::fs::write(&key, &c.key_pem).unwrap();
            (cert, key)
        }
        /// A node certificate and key for `ip`, as one PEM client identity.
        fn identity(&self, name: &str, ip: IpAddr) -> Vec<u8> {
            let (cert, key) = self.issue(name, ip);
            let mut pem = std::fs::read(cert).unwrap();
            pem.extend(std::fs::read(key).unwrap());
            pem
        }
        fn tls(&self, name: &str, ip: IpAddr) -> Value {
            let (cert, key) = self.issue(name, ip);
            json!({"http": true, "cert_file": cert, "key_file": key,
                   "ca_file": self.dir.path().join("ca.pem")})
        }
        /// An API client trusting the CA, with `identity` (PEM cert + key) as its client certificate.
        fn http(&self, identity: Option<Vec<u8>>) -> reqwest::Client {
            let mut b = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()]);
            if let Some(id) = identity {
                b = b.identity(reqwest::Identity::from_pem(&id).unwrap());
            }
            b.build().unwrap()
        }
    }

    /// An agent running in-process: its stop signal and its task.
    type Running = (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), String>>,
    );

    fn start(cfg: Config) -> Running {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(run(cfg, async move {
            let _ = rx.await;
        }));
        (tx, h)
    }

    /// Stops the agents, each cleanly.
    async fn stop(agents: impl IntoIterator<Item = Running>) {
        for (tx, h) in agents {
            let _ = tx.send(());
            h.await.unwrap().unwrap();
        }
    }

    async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, String) {
        let mut rb = http.get(url);
        if let Some(t) = token {
            rb = rb.header("X-Nomad-Token", t);
        }
        match rb.send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap()),
            Err(e) => (0, e.to_string()),
        }
    }

    async fn put(
        http: &reqwest::Client,
        url: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, String) {
        let mut rb = http.put(url).json(&body);
        if let Some(t) = token {
            rb = rb.header("X-Nomad-Token", t);
        }
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Three in-process servers over HTTPS: one leader everywhere, bootstrap forwarded from followers,
    /// state replicated and kept over a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_servers_agree_forward_and_persist() {
        let pki = Pki::new();
        let ips: Vec<IpAddr> = (31..34)
            .map(|h| format!("127.63.0.{h}").parse().unwrap())
            .collect();
        let port = 24646;
        let cfg_for = |i: usize| {
            Config::from_value(&json!({
                "name": format!("n{i}"), "bind_addr": ips[i].to_string(), "ports": {"http": port},
                "data_dir": pki.dir.path().join(format!("data{i}")).display().to_string(),
                "acl": {"enabled": true},
                "server": {"enabled": true, "bootstrap_expect": 3, "encrypt": "k",
                           "server_join": {"retry_join": ips.iter().map(|i| i.to_string()).collect::<Vec<_>>()}},
                "tls": pki.tls(&format!("n{i}"), ips[i]),
            }))
            .unwrap()
        };
        let http = pki.http(None);
        let url = |i: usize, p: &str| format!("https://{}:{port}{p}", ips[i]);
        let mut nodes = vec![start(cfg_for(0)), start(cfg_for(1))];
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Two of three expected: no leader, and a bootstrap is refused as retryable.
        assert_eq!(
            get(&http, &url(0, "/v1/status/leader"), None).await,
            (500, "No cluster leader".into())
        );
        nodes.push(start(cfg_for(2)));
        let leader = eventually("a common leader", Duration::from_secs(20), || async {
            let mut seen = Vec::new();
            for i in 0..3 {
                if let (200, body) = get(&http, &url(i, "/v1/status/leader"), None).await {
                    seen.push(serde_json::from_str::<String>(&body).unwrap());
                }
            }
            (seen.len() == 3 && seen.iter().all(|l| *l == seen[0])).then(|| seen[0].clone())
        })
        .await;
        assert_eq!(leader, "127.63.0.31:4647");
        let (_, body) = get(&http, &url(2, "/v1/status/peers"), None).await;
        assert_eq!(serde_json::from_str::<Vec<String>>(&body).unwrap().len(), 3);
        // Bootstrap through a follower: forwarded to the leader.
        let secret = uuid();
        let r = http
            .post(url(2, "/v1/acl/bootstrap"))
            .json(&json!({ "BootstrapSecret": secret }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let t: Value = r.json().await.unwrap();
        assert_eq!(t["SecretID"], secret.as_str());
        assert_eq!(t["Type"], "management");
        for i in 0..3 {
            let r = http.put(url(i, "/v1/acl/bootstrap")).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 400);
            assert!(r
                .text()
                .await
                .unwrap()
                .starts_with("ACL bootstrap already done (reset index: "));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        for i in 0..3 {
            let (st, _) = get(&http, &url(i, "/v1/acl/token/self"), Some(&secret)).await;
            assert_eq!(st, 200, "token/self on n{i}");
            assert_eq!(get(&http, &url(i, "/v1/agent/self"), None).await.0, 403);
        }
        let (st, _) = get(&http, &url(1, "/v1/acl/token/self"), Some(&uuid())).await;
        assert_eq!(st, 403);
        // A client that knows only a follower registers through it (forwarded to the leader, with the
        // follower's own client certificate); every server lists the node.
        let client_ip: IpAddr = "127.63.0.41".parse().unwrap();
        let client = start(
            Config::from_value(&json!({
                "name": "worker-0", "bind_addr": client_ip.to_string(), "ports": {"http": port},
                "data_dir": pki.dir.path().join("client").display().to_string(), "acl": {"enabled": true},
                "client": {"enabled": true, "server_join": {"retry_join": [ips[2].to_string()]}},
                "tls": pki.tls("w", client_ip),
            }))
            .unwrap(),
        );
        eventually("the node replicated", Duration::from_secs(30), || async {
            let mut ready = 0;
            for i in 0..3 {
                let (_, body) = get(&http, &url(i, "/v1/nodes"), Some(&secret)).await;
                let v: Vec<Value> = serde_json::from_str(&body).unwrap();
                if v.len() == 1 && v[0]["Status"] == "ready" && v[0]["Name"] == "worker-0" {
                    ready += 1;
                }
            }
            (ready == 3).then_some(())
        })
        .await;
        stop([client]).await;
        // Stop everything, start again: the ACL state survived.
        stop(nodes).await;
        let nodes = [start(cfg_for(0)), start(cfg_for(1)), start(cfg_for(2))];
        let (st, _) = eventually(
            "a leader after restart",
            Duration::from_secs(40),
            || async {
                let r = http.put(url(1, "/v1/acl/bootstrap")).send().await.unwrap();
                let st = r.status().as_u16();
                (st != 500).then_some((st, r.text().await.unwrap()))
            },
        )
        .await;
        assert_eq!(st, 400, "still bootstrapped after restart");
        let (st, body) = get(&http, &url(0, "/v1/agent/members"), Some(&secret)).await;
        assert_eq!(st, 200);
        let m: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(m["Members"].as_array().unwrap().len(), 3);
        let (_, body) = get(&http, &url(1, "/v1/nodes"), Some(&secret)).await;
        let v: Vec<Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(v.len(), 1, "the node survived the restart: {v:?}");
        stop(nodes).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_registers_over_mtls_heartbeats_goes_down_and_acls_are_enforced() {
        let pki = Pki::new();
        let port = 24647;
        let server_ip: IpAddr = "127.64.0.31".parse().unwrap();
        let client_ip: IpAddr = "127.64.0.41".parse().unwrap();
        let data = |n: &str| pki.dir.path().join(n).display().to_string();
        let server_cfg = Config::from_value(&json!({
            "name": "nomad-0", "bind_addr": server_ip.to_string(), "ports": {"http": port},
            "data_dir": data("server"), "acl": {"enabled": true},
            "server": {"enabled": true, "bootstrap_expect": 1, "encrypt": "k",
                       "min_heartbeat_ttl": "400ms", "heartbeat_grace": "200ms",
                       "server_join": {"retry_join": [server_ip.to_string()]}},
            "tls": pki.tls("nomad-0", server_ip),
        }))
        .unwrap();
        let client_cfg = || {
            Config::from_value(&json!({
                "name": "worker-0", "bind_addr": client_ip.to_string(), "ports": {"http": port},
                "datacenter": "dc2", "data_dir": data("client"), "acl": {"enabled": true},
                "client": {"enabled": true, "node_class": "batch",
                           "server_join": {"retry_join": [server_ip.to_string()]}},
                "tls": pki.tls("worker-0", client_ip),
            }))
            .unwrap()
        };
        let http = pki.http(None);
        let s = |p: &str| format!("https://{server_ip}:{port}{p}");
        let c = |p: &str| format!("https://{client_ip}:{port}{p}");
        let server = start(server_cfg);
        eventually("a leader", Duration::from_secs(10), || async {
            (get(&http, &s("/v1/status/leader"), None).await.0 == 200).then_some(())
        })
        .await;
        let mgmt = uuid();
        let (st, _) = put(
            &http,
            &s("/v1/acl/bootstrap"),
            None,
            json!({"BootstrapSecret": mgmt}),
        )
        .await;
        assert_eq!(st, 200);
        // Without a token, or with an unknown one: refused.
        assert_eq!(
            get(&http, &s("/v1/nodes"), None).await,
            (403, "Permission denied".into())
        );
        assert_eq!(
            get(&http, &s("/v1/nodes"), Some(&uuid())).await,
            (403, "ACL token not found".into())
        );

        // The client registers with its CA-signed certificate and shows `ready`.
        let client = start(client_cfg());
        let nodes: Vec<Value> =
            eventually("the client node ready", Duration::from_secs(10), || async {
                let (st, body) = get(&http, &s("/v1/nodes"), Some(&mgmt)).await;
                assert_eq!(st, 200, "{body}");
                let v: Vec<Value> = serde_json::from_str(&body).unwrap();
                (v.len() == 1 && v[0]["Status"] == "ready").then_some(v)
            })
            .await;
        let n = &nodes[0];
        assert_eq!(
            (
                &n["Name"],
                &n["Datacenter"],
                &n["NodeClass"],
                &n["Drain"],
                &n["SchedulingEligibility"],
                &n["Version"]
            ),
            (
                &json!("worker-0"),
                &json!("dc2"),
                &json!("batch"),
                &json!(false),
                &json!("eligible"),
                &json!(VERSION)
            )
        );
        let id = n["ID"].as_str().unwrap().to_string();
        assert!(is_uuid(&id));
        assert_eq!(
            std::fs::read_to_string(pki.dir.path().join("client/client/client-id")).unwrap(),
            id,
            "the node ID is persisted under <data_dir>/client"
        );
        let (st, body) = get(&http, &s(&format!("/v1/node/{id}")), Some(&mgmt)).await;
        assert_eq!(st, 200);
        let full: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(full["ID"], id.as_str());
        assert!(
            full.get("SecretID").is_none(),
            "never the node secret: {full}"
        );
        assert_eq!(
            get(&http, &s(&format!("/v1/node/{}", uuid())), Some(&mgmt)).await,
            (404, "node not found".into())
        );

        // Registration without a client certificate, or with one from another CA, is refused.
        let reg = json!({"ID": uuid(), "SecretID": uuid(), "Name": "rogue", "Datacenter": "dc1",
                         "NodeClass": "", "HTTPAddr": "127.64.0.99:4646", "Address": "127.64.0.99",
                         "TLSEnabled": true, "Version": VERSION});
        let (st, body) = put(&http, &s(NODE_PATH), None, reg.clone()).await;
        assert_eq!(st, 403, "{body}");
        assert!(body.contains("client certificate"), "{body}");
        let other = Pki::new();
        let rogue = pki.http(Some(
            other.identity("rogue", "127.64.0.99".parse().unwrap()),
        ));
        let r = rogue.put(s(NODE_PATH)).json(&reg).send().await;
        assert!(
            r.is_err(),
            "a certificate from another CA fails the handshake: {r:?}"
        );
        // A CA-signed certificate cannot take over a registered node ID without its secret.
        let signed = pki.http(Some(
            pki.identity("worker-x", "127.64.0.98".parse().unwrap()),
        ));
        let mut hijack = reg.clone();
        hijack["ID"] = json!(id);
        let (st, body) = put(&signed, &s(NODE_PATH), None, hijack).await;
        assert_eq!(
            (st, body.as_str()),
            (400, "node secret ID does not match. Not registering node.")
        );
        assert_eq!(
            get(&http, &s("/v1/nodes"), Some(&mgmt))
                .await
                .1
                .matches("\"ID\"")
                .count(),
            1,
            "no rogue node"
        );

        // Policies and a client token with node:read only.
        let (st, body) = put(&http, &s("/v1/acl/policy/nodes"), Some(&mgmt),
            json!({"Name": "nodes", "Description": "node read", "Rules": "node { policy = \"read\" }"})).await;
        assert_eq!((st, body.as_str()), (200, ""));
        let (st, body) = put(
            &http,
            &s("/v1/acl/policy/status-read"),
            Some(&mgmt),
            json!({"Name": "status-read", "Description": "", "Rules": STATUS_RULES}),
        )
        .await;
        assert_eq!((st, body.as_str()), (200, ""));
        let (st, body) = put(
            &http,
            &s("/v1/acl/policy/other"),
            Some(&mgmt),
            json!({"Name": "nodes", "Rules": "node { policy = \"read\" }"}),
        )
        .await;
        assert_eq!(
            (st, body.as_str()),
            (400, "ACL policy name does not match request path")
        );
        let (st, body) = put(
            &http,
            &s("/v1/acl/policy/bad"),
            Some(&mgmt),
            json!({"Name": "bad", "Rules": "node { policy = \"reed\" }"}),
        )
        .await;
        assert_eq!(st, 400);
        assert!(body.starts_with("policy 0 invalid: 1 error occurred:\n\t* failed to parse rules: Invalid node policy"), "{body}");
        let (st, body) = put(
            &http,
            &s("/v1/acl/token"),
            Some(&mgmt),
            json!({"Name": "nodes reader", "Type": "client", "Policies": ["nodes"]}),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let reader: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (&reader["Type"], &reader["Policies"]),
            (&json!("client"), &json!(["nodes"]))
        );
        let rt = reader["SecretID"].as_str().unwrap();
        let (st, body) = get(&http, &s("/v1/acl/token/self"), Some(rt)).await;
        assert_eq!(st, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["Policies"],
            json!(["nodes"])
        );

        // It reaches the nodes, and nothing else.
        assert_eq!(get(&http, &s("/v1/nodes"), Some(rt)).await.0, 200);
        assert_eq!(
            get(&http, &s(&format!("/v1/node/{id}")), Some(rt)).await.0,
            200
        );
        assert_eq!(get(&http, &s("/v1/agent/members"), Some(rt)).await.0, 200);
        for p in [
            "/v1/agent/self",
            "/v1/operator/raft/configuration",
            "/v1/acl/tokens",
        ] {
            assert_eq!(
                get(&http, &s(p), Some(rt)).await,
                (403, "Permission denied".into()),
                "{p}"
            );
        }
        let (st, body) = put(
            &http,
            &s("/v1/acl/token"),
            Some(rt),
            json!({"Name": "escalate", "Type": "management"}),
        )
        .await;
        assert_eq!((st, body.as_str()), (403, "Permission denied"));
        let (st, body) = put(
            &http,
            &s("/v1/acl/policy/nodes"),
            Some(rt),
            json!({"Name": "nodes", "Rules": "node { policy = \"write\" }"}),
        )
        .await;
        assert_eq!((st, body.as_str()), (403, "Permission denied"));
        let (st, body) = get(&http, &s("/v1/acl/policies"), Some(rt)).await;
        assert_eq!(st, 200);
        let names: Vec<Value> = serde_json::from_str::<Vec<Value>>(&body)
            .unwrap()
            .into_iter()
            .map(|p| p["Name"].clone())
            .collect();
        assert_eq!(
            names,
            vec![json!("nodes")],
            "a client token lists its own policies only"
        );
        assert_eq!(
            get(&http, &s("/v1/acl/policy/status-read"), Some(rt))
                .await
                .0,
            403
        );

        // The status policy: agent and operator read too.
        let (_, body) = put(
            &http,
            &s("/v1/acl/token"),
            Some(&mgmt),
            json!({"Name": "status", "Type": "client", "Policies": ["status-read"]}),
        )
        .await;
        let status: Value = serde_json::from_str(&body).unwrap();
        let stt = status["SecretID"].as_str().unwrap();
        assert_eq!(get(&http, &s("/v1/agent/self"), Some(stt)).await.0, 200);
        let (st, body) = get(&http, &s("/v1/operator/raft/configuration"), Some(stt)).await;
        assert_eq!(st, 200);
        let raft: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(raft["Servers"][0]["Leader"], true);
        assert_eq!(raft["Servers"][0]["Address"], format!("{server_ip}:4647"));
        // Token reads: management sees all (no secrets in the list); a client token only itself.
        let (st, body) = get(&http, &s("/v1/acl/tokens"), Some(&mgmt)).await;
        assert_eq!(st, 200);
        assert!(
            !body.contains("SecretID") && body.contains("nodes reader"),
            "{body}"
        );
        let acc = reader["AccessorID"].as_str().unwrap();
        assert_eq!(
            get(&http, &s(&format!("/v1/acl/token/{acc}")), Some(rt))
                .await
                .0,
            200
        );
        assert_eq!(
            get(&http, &s(&format!("/v1/acl/token/{acc}")), Some(stt))
                .await
                .0,
            403
        );

        // Through the client agent: cluster routes are forwarded, its own agent/self is checked remotely.
        assert_eq!(get(&http, &c("/v1/nodes"), Some(rt)).await.0, 200);
        assert_eq!(get(&http, &c("/v1/agent/self"), Some(rt)).await.0, 403);
        assert_eq!(get(&http, &c("/v1/agent/self"), Some(stt)).await.0, 200);

        // Heartbeats stop: the node goes down after TTL + grace (600 ms here), not before.
        stop([client]).await;
        let stopped = std::time::Instant::now();
        let node_status = || async {
            let (_, body) = get(&http, &s(&format!("/v1/node/{id}")), Some(&mgmt)).await;
            serde_json::from_str::<Value>(&body).unwrap()
        };
        let down = eventually("the node down", Duration::from_secs(5), || async {
            let n = node_status().await;
            (n["Status"] == "down").then_some(n)
        })
        .await;
        assert!(
            stopped.elapsed() >= Duration::from_millis(400),
            "down too early: {:?}",
            stopped.elapsed()
        );
        assert!(
            down["Events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["Message"] == "Node heartbeat missed"),
            "{down}"
        );
        // The client comes back with the same node ID: ready again.
        let client = start(client_cfg());
        let back = eventually("the node ready again", Duration::from_secs(10), || async {
            let n = node_status().await;
            (n["Status"] == "ready").then_some(n)
        })
        .await;
        assert!(
            back["Events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["Message"] == "Node reregistered by heartbeat"),
            "{back}"
        );
        let (st, body) = get(&http, &s("/v1/nodes"), Some(&mgmt)).await;
        assert_eq!(
            (st, serde_json::from_str::<Vec<Value>>(&body).unwrap().len()),
            (200, 1)
        );
        stop([client, server]).await;
    }
}
