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
//!   Rules are a subset of Nomad's HCL policy language (and its JSON form), read with `hcl-rs` (HCL's native
//!   syntax: one item per line; hcl.rs says what differs from Nomad's HCL 1): the blocks `node`,
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
//!   `workload_id.go`, `command/agent/keyring_endpoint.go`): the leader creates a root key (RSA 2048) in the
//!   background once it leads (`nomad/leader.go`: `go s.initializeKeyring(stopCh)`; leadership and the ACL
//!   bootstrap do not wait for it), replicated with the rest of the state; `GET /.well-known/jwks.json` (unauthenticated, any
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
//! - Jobs and allocations (lab/src/nomad_double/jobs/, its header says which routes and from which Nomad sources):
//!   `PUT|POST /v1/jobs`, `GET /v1/job/:id`, `GET /v1/job/:id/allocations`, `GET /v1/allocation/:id`,
//!   `DELETE /v1/job/:id?purge=`, `GET /v1/client/fs/cat/:alloc_id?path=`; a trivial scheduler at the leader,
//!   and a client that runs allocations as child processes against the lab's real Vault and Consul (plumbing
//!   `/v1/double/allocs`, mTLS and the node secret).
//!
//! What it does **not** do: real scheduling (evaluations, deployments, bin packing, constraints, restarts),
//! drivers other than a process stand-in for `exec`/`raw_exec` and fingerprinting, namespaces, roles, auth
//! methods, token updates and expiry, ACL deletes, blocking queries and `X-Nomad-Index`, regions and
//! federation, RPC and serf ports, `verify_https_client`, HCL configuration files.
//!
//! Where things are: this file holds the command line, the agent's shared state and the response helpers;
//! `config.rs` the configuration; `store.rs` the replicated state (tokens, policies, nodes, bootstrap);
//! `acl.rs` policies, tokens, what a token may do, and the `/v1/acl/*` routes; `hcl.rs` the policy rules'
//! parser; `nodes.rs` client nodes, their routes and the client's registration loop; `operator.rs` the
//! operator and agent routes (raft, self, members, snapshots); `server.rs` clustering, forwarding,
//! replication, authorization and routing; `run.rs` TLS and the serving loop; `jobs/` jobs and allocations;
//! `tests.rs` the double in-process over HTTPS.
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

/// Jobs, allocations, the client that runs them, and the client fs API (lab/src/nomad_double/jobs/).
pub mod jobs;

mod acl;
mod config;
mod hcl;
mod nodes;
mod operator;
mod run;
mod server;
mod store;
#[cfg(test)]
mod tests;

pub use acl::*;
pub use config::*;
pub use hcl::*;
pub use nodes::*;
pub use run::*;
pub use store::*;

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
// The agent

/// Makes a root key with the given key ID (RSA 2048: a random prime search, tens to hundreds of milliseconds).
type KeyGen = fn(String) -> crate::nomad_identity::RootKey;

struct Agent {
    cfg: Config,
    /// The leader's root-key generator ([`Agent::initialize_keyring`]).
    keygen: KeyGen,
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
    /// Leader only: a root key is being generated ([`Agent::initialize_keyring`]).
    keyring_pending: bool,
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

/// The rules of a read-only status policy (the unit tests' example).
#[cfg(test)]
const STATUS_RULES: &str = r#"# read-only status
node { policy = "read" }
agent {
  policy = "read"
}
operator { policy = "read" } // raft
"#;
