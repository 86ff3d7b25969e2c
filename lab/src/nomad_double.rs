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
//! Copied from Nomad (API docs `/v1/status`, `/v1/acl/bootstrap`, `/v1/acl/token/self`, `/v1/agent`, and
//! `nomad/acl_endpoint.go`):
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
//! - Non-leader servers forward the bootstrap to the leader; ACL state is cluster-wide.
//! - `GET /v1/acl/token/self` with `X-Nomad-Token` (or `Authorization: Bearer`) → the token, else 403
//!   `ACL token not found`. `GET /v1/agent/self` and `GET /v1/agent/members` need a management token when
//!   ACLs are on (403 `Permission denied`), and answer a minimal subset of the documented fields.
//!
//! What it does **not** do: scheduling, jobs, nodes, allocations, policies, roles, other token routes,
//! blocking queries, regions/federation, mTLS (`verify_https_client`), RPC and serf ports, HCL configs.
//! Clustering is a stand-in for raft and serf: every server polls the `server_join.retry_join` peers over
//! HTTPS at `/v1/double/peer` (not a Nomad route; guarded by the gossip key `server.encrypt`); once
//! `bootstrap_expect` servers answer (a majority after the cluster first formed), all agree that the
//! lowest answering address leads. ACL state is replicated by every server adopting the highest-indexed
//! copy it sees, and persisted in `<data_dir>/server/double-state.json` (0600) so a restart keeps it.
//! A client (`client.enabled`) answers `/v1/status/*` by asking its servers.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

pub const VERSION: &str = "1.9.5";
pub const VERSION_LINE: &str = "Nomad v1.9.5 (hashistack contract double)";
pub const DEFAULT_HTTP_PORT: u16 = 4646;
pub const RPC_PORT: u16 = 4647;
/// The double's stand-in for serf/raft between servers; not a Nomad route.
pub const PEER_PATH: &str = "/v1/double/peer";
const PEER_KEY_HEADER: &str = "x-nomad-double-key";
const FORWARDED_HEADER: &str = "x-nomad-double-forwarded";
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
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bootstrap_expect: usize,
    /// Other servers (their addresses; the own address is dropped).
    pub peers: Vec<IpAddr>,
    pub encrypt: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub servers: Vec<IpAddr>,
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

impl Config {
    /// Reads and merges the given files and every `*.json` of the given directories (sorted by name).
    pub fn load(paths: &[PathBuf]) -> Result<Config, String> {
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
        Config::from_value(&merged)
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
            Some(ServerConfig {
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
            name: s("/name").unwrap_or_else(|| bind.to_string()),
            region: s("/region").unwrap_or_else(|| "global".into()),
            datacenter: s("/datacenter").unwrap_or_else(|| "dc1".into()),
            data_dir,
            bind,
            http_port,
            server,
            client,
            acl_enabled: b("/acl/enabled"),
            tls,
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
// ACL state (the part of Nomad's raft state the double keeps)

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

/// The replicated state: the raft index, whether the cluster ever formed, and the ACL tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub index: u64,
    pub formed: bool,
    /// The index of the last ACL bootstrap (Nomad's "reset index"); 0 before the first one.
    pub bootstrap_index: u64,
    pub tokens: Vec<Token>,
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

    fn is_management(&self, secret: &str) -> bool {
        self.token_by_secret(secret)
            .is_some_and(|t| t.kind == "management")
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
// The agent

struct Agent {
    cfg: Config,
    state_file: PathBuf,
    /// `http(s)://` client trusting `tls.ca_file` (peers, forwarding).
    http: reqwest::Client,
    rt: Mutex<Runtime>,
}

#[derive(Default)]
struct Runtime {
    /// Servers that answered the last poll (self included): address → name.
    alive: BTreeMap<IpAddr, String>,
    leader: Option<IpAddr>,
    store: Store,
}

#[derive(Serialize, Deserialize)]
struct PeerView {
    name: String,
    addr: IpAddr,
    store: Store,
}

fn text(status: u16, body: impl Into<String>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .expect("response")
}

fn json_resp(v: &impl Serialize) -> Response<Full<Bytes>> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(v).expect("serialises"),
        )))
        .expect("response")
}

fn no_leader() -> Response<Full<Bytes>> {
    text(500, "No cluster leader")
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
                    .http
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
        alive.insert(self.cfg.bind, self.cfg.name.clone());
        let mut adopt: Option<Store> = None;
        for v in views {
            if v.store.index > adopt.as_ref().unwrap_or(&rt.store).index {
                adopt = Some(v.store.clone());
            }
            alive.insert(v.addr, v.name);
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

    /// Asks other agents; the first success wins (client mode, and forwarding).
    async fn ask(&self, targets: &[IpAddr], path: &str) -> Option<Response<Full<Bytes>>> {
        for ip in targets {
            let Ok(r) = self
                .http
                .get(self.url(*ip, path))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            else {
                continue;
            };
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_string();
            let body = r.bytes().await.unwrap_or_default();
            if status == 200 {
                return Some(
                    Response::builder()
                        .status(200)
                        .header("content-type", ct)
                        .body(Full::new(body))
                        .expect("response"),
                );
            }
        }
        None
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/v1/status/leader") => self.status(true).await,
            (&Method::GET, "/v1/status/peers") => self.status(false).await,
            (&Method::GET, PEER_PATH) => self.peer_view(&req),
            (&Method::PUT, PEER_PATH) => self.peer_apply(req).await,
            (m, "/v1/acl/bootstrap") if m == Method::PUT || m == Method::POST => {
                self.acl_bootstrap(req).await
            }
            (_, "/v1/acl/bootstrap") => text(405, "Invalid method"),
            (&Method::GET, "/v1/acl/token/self") => self.token_self(&req),
            (&Method::GET, "/v1/agent/self") => self.agent_self(&req),
            (&Method::GET, "/v1/agent/members") => self.agent_members(&req),
            _ => text(404, "404 page not found"),
        }
    }

    async fn status(&self, leader_only: bool) -> Response<Full<Bytes>> {
        if self.cfg.server.is_none() {
            let servers = self
                .cfg
                .client
                .as_ref()
                .map(|c| c.servers.clone())
                .unwrap_or_default();
            let path = if leader_only {
                "/v1/status/leader"
            } else {
                "/v1/status/peers"
            };
            return self.ask(&servers, path).await.unwrap_or_else(no_leader);
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

    fn peer_view(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(server) = &self.cfg.server else {
            return text(404, "404 page not found");
        };
        let given = req
            .headers()
            .get(PEER_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if given != server.encrypt.as_deref().unwrap_or("") {
            return text(403, "Permission denied");
        }
        let rt = self.rt.lock().expect("runtime");
        json_resp(&PeerView {
            name: self.cfg.name.clone(),
            addr: self.cfg.bind,
            store: rt.store.clone(),
        })
    }

    async fn peer_apply(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(server) = &self.cfg.server else {
            return text(404, "404 page not found");
        };
        let given = req
            .headers()
            .get(PEER_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if given != server.encrypt.as_deref().unwrap_or("") {
            return text(403, "Permission denied");
        }
        let Ok(body) = Limited::new(req.into_body(), 1 << 20).collect().await else {
            return text(400, "Request body too large");
        };
        let Ok(store) = serde_json::from_slice::<Store>(&body.to_bytes()) else {
            return text(400, "bad state");
        };
        let mut rt = self.rt.lock().expect("runtime");
        if store.index > rt.store.index {
            rt.store = store;
            self.persist(&rt.store);
        }
        text(200, "")
    }

    async fn acl_bootstrap(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.cfg.acl_enabled {
            return text(400, "ACL support disabled");
        }
        let forwarded = req.headers().contains_key(FORWARDED_HEADER);
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(400, "Request body too large"),
        };
        let secret: Option<String> = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) => v
                    .get("BootstrapSecret")
                    .and_then(Value::as_str)
                    .map(String::from),
                Err(e) => return text(400, format!("failed to decode request body: {e}")),
            }
        };
        if self.cfg.server.is_none() {
            let servers = self.cfg.client.as_ref().map(|c| c.servers.clone());
            return self
                .forward_bootstrap(&servers.unwrap_or_default(), body)
                .await;
        }
        let leader = self.rt.lock().expect("runtime").leader;
        match leader {
            None => no_leader(),
            Some(l) if l != self.cfg.bind => {
                if forwarded {
                    // The sender thinks we lead; we do not (yet): retryable, as in an election.
                    return no_leader();
                }
                self.forward_bootstrap(&[l], body).await
            }
            Some(_) => {
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
                        json_resp(&t)
                    }
                    Err(ApiError(status, msg)) => {
                        log(format!("ACL bootstrap refused: {msg}"));
                        text(status, msg)
                    }
                }
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
                .http
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

    async fn forward_bootstrap(&self, targets: &[IpAddr], body: Bytes) -> Response<Full<Bytes>> {
        for ip in targets {
            let r = self
                .http
                .put(self.url(*ip, "/v1/acl/bootstrap"))
                .header(FORWARDED_HEADER, "1")
                .body(body.clone())
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            let Ok(r) = r else { continue };
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/plain")
                .to_string();
            let bytes = r.bytes().await.unwrap_or_default();
            return Response::builder()
                .status(status)
                .header("content-type", ct)
                .body(Full::new(bytes))
                .expect("response");
        }
        no_leader()
    }

    fn token_self(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.cfg.acl_enabled {
            return text(400, "ACL support disabled");
        }
        let secret = token_of(req);
        let rt = self.rt.lock().expect("runtime");
        match rt.store.token_by_secret(&secret) {
            Some(t) => json_resp(t),
            None => text(403, "ACL token not found"),
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        !self.cfg.acl_enabled
            || self
                .rt
                .lock()
                .expect("runtime")
                .store
                .is_management(&token_of(req))
    }

    fn agent_self(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.authorized(req) {
            return text(403, "Permission denied");
        }
        let rt = self.rt.lock().expect("runtime");
        let server = self.cfg.server.as_ref();
        json_resp(&json!({
            "config": {
                "Region": self.cfg.region,
                "Datacenter": self.cfg.datacenter,
                "NodeName": self.cfg.name,
                "DataDir": self.cfg.data_dir.display().to_string(),
                "BindAddr": self.cfg.bind.to_string(),
                "Version": {"Version": VERSION, "VersionPrerelease": "", "VersionMetadata": ""},
                "ACL": {"Enabled": self.cfg.acl_enabled},
                "Server": {"Enabled": server.is_some(), "BootstrapExpect": server.map(|s| s.bootstrap_expect).unwrap_or(0)},
                "Client": {"Enabled": self.cfg.client.is_some()},
                "TLSConfig": {"EnableHTTP": self.cfg.tls.is_some()},
            },
            "member": self.member(self.cfg.bind, &self.cfg.name),
            "stats": {
                "nomad": {
                    "server": server.is_some().to_string(),
                    "leader": (rt.leader == Some(self.cfg.bind)).to_string(),
                    "leader_addr": rt.leader.map(Self::rpc_addr).unwrap_or_default(),
                    "known_regions": "1",
                },
                "raft": {"applied_index": rt.store.index.to_string()},
            },
        }))
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

    fn agent_members(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.authorized(req) {
            return text(403, "Permission denied");
        }
        if self.cfg.server.is_none() {
            return text(
                501,
                "Client agents do not support this endpoint in the double",
            );
        }
        let rt = self.rt.lock().expect("runtime");
        let members: Vec<Value> = rt
            .alive
            .iter()
            .map(|(ip, name)| self.member(*ip, name))
            .collect();
        json_resp(&json!({
            "ServerName": format!("{}.{}", self.cfg.name, self.cfg.region),
            "ServerRegion": self.cfg.region,
            "ServerDC": self.cfg.datacenter,
            "Members": members,
        }))
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
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

fn http_client(cfg: &Config) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder().no_proxy();
    if let Some(ca) = cfg.tls.as_ref().and_then(|t| t.ca_file.as_ref()) {
        let pem = std::fs::read(ca).map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
        b = b.tls_certs_only([cert]);
    }
    b.build().map_err(|e| e.to_string())
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
    let acceptor = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    let acceptor = Arc::new(Mutex::new(acceptor));
    let addr = SocketAddr::new(cfg.bind, cfg.http_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    let agent = Arc::new(Agent {
        http: http_client(&cfg)?,
        state_file,
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
            "server: bootstrap_expect {}, peers {:?}",
            s.bootstrap_expect, s.peers
        ));
    }
    let poller = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                agent.poll_peers().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
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
                let svc = hyper::service::service_fn(move |req| {
                    let agent = agent.clone();
                    async move { Ok::<_, std::convert::Infallible>(agent.handle(req).await) }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(tls) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
                        else {
                            return;
                        };
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    None => {
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

    /// Three in-process servers over HTTPS: one leader everywhere, bootstrap forwarded from followers,
    /// state replicated and kept over a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_servers_agree_forward_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (ca_pem, ca_key) =
            hashistack_agent::tls::generate_ca("double test CA", 1, now).unwrap();
        let ca = hashistack_agent::tls::ClusterCa::from_pem(&ca_pem, &ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        let ips: Vec<IpAddr> = (31..34)
            .map(|h| format!("127.63.0.{h}").parse().unwrap())
            .collect();
        let port = 24646;
        let cfg_for = |i: usize| {
            let ip = ips[i];
            let c = ca.issue("n", &[ip.to_string()], 1, now).unwrap();
            let cert = dir.path().join(format!("n{i}.pem"));
            let key = dir.path().join(format!("n{i}-key.pem"));
            std::fs::write(&cert, &c.cert_pem).unwrap();
            std::fs::write(&key, &c.key_pem).unwrap();
            Config::from_value(&json!({
                "name": format!("n{i}"), "bind_addr": ip.to_string(), "ports": {"http": port},
                "data_dir": dir.path().join(format!("data{i}")).display().to_string(),
                "acl": {"enabled": true},
                "server": {"enabled": true, "bootstrap_expect": 3, "encrypt": "k",
                           "server_join": {"retry_join": ips.iter().map(|i| i.to_string()).collect::<Vec<_>>()}},
                "tls": {"http": true, "cert_file": cert, "key_file": key, "ca_file": dir.path().join("ca.pem")},
            }))
            .unwrap()
        };
        let start = |i: usize| {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let h = tokio::spawn(run(cfg_for(i), async move {
                let _ = rx.await;
            }));
            (tx, h)
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
            .build()
            .unwrap();
        let url = |i: usize, p: &str| format!("https://{}:{port}{p}", ips[i]);
        let mut nodes = vec![start(0), start(1)];
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Two of three expected: no leader, and a bootstrap is refused as retryable.
        let r = http.get(url(0, "/v1/status/leader")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 500);
        assert_eq!(r.text().await.unwrap(), "No cluster leader");
        nodes.push(start(2));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let leader = loop {
            assert!(std::time::Instant::now() < deadline, "no common leader");
            let mut seen = Vec::new();
            for i in 0..3 {
                if let Ok(r) = http.get(url(i, "/v1/status/leader")).send().await {
                    if r.status().is_success() {
                        seen.push(r.json::<String>().await.unwrap());
                    }
                }
            }
            if seen.len() == 3 && seen.iter().all(|l| *l == seen[0]) {
                break seen[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(leader, "127.63.0.31:4647");
        let peers: Vec<String> = http
            .get(url(2, "/v1/status/peers"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(peers.len(), 3);
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
            let r = http
                .get(url(i, "/v1/acl/token/self"))
                .header("X-Nomad-Token", &secret)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200, "token/self on n{i}");
            let r = http.get(url(i, "/v1/agent/self")).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 403);
        }
        let r = http
            .get(url(1, "/v1/acl/token/self"))
            .header("X-Nomad-Token", uuid())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403);
        // Stop everything, start again: the ACL state survived.
        for (tx, h) in nodes.drain(..) {
            let _ = tx.send(());
            h.await.unwrap().unwrap();
        }
        let mut nodes = vec![start(0), start(1), start(2)];
        let ok = loop {
            assert!(
                std::time::Instant::now() < deadline + Duration::from_secs(20),
                "no leader after restart"
            );
            let r = http.put(url(1, "/v1/acl/bootstrap")).send().await.unwrap();
            if r.status().as_u16() != 500 {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            ok.status().as_u16(),
            400,
            "still bootstrapped after restart"
        );
        let r = http
            .get(url(0, "/v1/agent/members"))
            .header("X-Nomad-Token", &secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let m: Value = r.json().await.unwrap();
        assert_eq!(m["Members"].as_array().unwrap().len(), 3);
        for (tx, h) in nodes.drain(..) {
            let _ = tx.send(());
            h.await.unwrap().unwrap();
        }
    }
}
