//! Helpers shared by the agent's integration tests: fixtures, a scripted fake IMDS (axum), running the
//! real `hashistack-agent` binary, walking rendered trees, and finding the lab's real binaries.
#![allow(dead_code)]

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn workspace_dir() -> PathBuf {
    crate_dir()
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

pub fn fixtures_dir() -> PathBuf {
    crate_dir().join("tests/fixtures")
}

/// The IMDS instance documents, one per role (agent/tests/fixtures/imds/<name>.json).
pub const ROLE_FIXTURES: [&str; 6] = [
    "consul-server",
    "vault-server-transit",
    "vault-server-akv",
    "nomad-server",
    "worker",
    "jumpbox",
];

pub fn imds_fixture_path(name: &str) -> PathBuf {
    fixtures_dir().join("imds").join(format!("{name}.json"))
}

pub fn imds_fixture(name: &str) -> Value {
    let p = imds_fixture_path(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn tags_list(doc: &mut Value) -> &mut Vec<Value> {
    doc.pointer_mut("/compute/tagsList")
        .and_then(Value::as_array_mut)
        .expect("fixture has compute.tagsList")
}

/// Sets (or adds) a tag in `compute.tagsList`.
pub fn set_tag(doc: &mut Value, name: &str, value: &str) {
    let list = tags_list(doc);
    match list.iter_mut().find(|t| t["name"] == name) {
        Some(t) => t["value"] = Value::from(value),
        None => list.push(serde_json::json!({"name": name, "value": value})),
    }
}

/// Adds a tag even if one of that name exists already.
pub fn push_tag(doc: &mut Value, name: &str, value: &str) {
    tags_list(doc).push(serde_json::json!({"name": name, "value": value}));
}

pub fn remove_tag(doc: &mut Value, name: &str) {
    let list = tags_list(doc);
    let before = list.len();
    list.retain(|t| t["name"] != name);
    assert!(list.len() < before, "fixture has no tag {name}");
}

pub fn tag(doc: &Value, name: &str) -> Option<String> {
    doc.pointer("/compute/tagsList")?
        .as_array()?
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["value"].as_str().map(str::to_string))
}

pub fn set_ip(doc: &mut Value, ip: &str) {
    *doc.pointer_mut("/network/interface/0/ipv4/ipAddress/0/privateIpAddress")
        .expect("fixture has a private IP") = Value::from(ip);
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hashistack-agent"))
}

/// A `hashistack-agent` command with a fixed umask (so modes in goldens do not depend on the caller's) and
/// without environment that changes where logs go.
pub fn agent_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(agent_bin());
    cmd.args(args)
        .env_remove("JOURNAL_STREAM")
        .env_remove("HASHISTACK_LOG")
        .env_remove("RUST_LOG");
    // SAFETY: umask is async-signal-safe and touches no shared memory.
    unsafe {
        cmd.pre_exec(|| {
            nix::libc::umask(0o022);
            Ok(())
        });
    }
    cmd
}

pub fn run_agent<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    agent_command(args).output().expect("run hashistack-agent")
}

/// `hashistack-agent render --metadata <metadata> --out <out>`, with `--<product>-version <version>` for each
/// of `versions` (e.g. `("consul", "1.8.7")`).
pub fn run_render(metadata: &Path, out: &Path, versions: &[(&str, &str)]) -> Output {
    let mut args: Vec<std::ffi::OsString> = vec![
        "render".into(),
        "--metadata".into(),
        metadata.into(),
        "--out".into(),
        out.into(),
    ];
    for (product, version) in versions {
        args.push(format!("--{product}-version").into());
        args.push(version.into());
    }
    run_agent(args)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One entry of a directory tree, relative to its root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub rel: String,
    pub dir: bool,
    pub mode: u32,
}

/// Every entry under `root` (not `root` itself), sorted.
pub fn walk(root: &Path) -> Vec<Entry> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<Entry>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let e = e.expect("read_dir entry");
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            out.push(Entry {
                rel,
                dir: meta.is_dir(),
                mode: meta.permissions().mode() & 0o7777,
            });
            if meta.is_dir() {
                go(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

/// Files under `root` with their content.
pub fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    walk(root)
        .into_iter()
        .filter(|e| !e.dir)
        .map(|e| {
            let c = std::fs::read(root.join(&e.rel)).expect("read file");
            (e.rel, c)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// A scripted fake IMDS.

/// What the fake IMDS answers to one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this body.
    Ok(String),
    /// This status with a short body.
    Status(u16, String),
    /// Sleep, then answer.
    Slow(Duration, Box<Reply>),
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.uri.path()
    }
    pub fn query(&self) -> BTreeMap<String, String> {
        axum::extract::Query::<BTreeMap<String, String>>::try_from_uri(&self.uri)
            .map(|q| q.0)
            .unwrap_or_default()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

type Responder = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

/// A fake IMDS whose answer to the n-th request (0-based) is decided by a closure.
pub struct Script {
    hits: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    respond: Box<Responder>,
}

impl Script {
    pub fn new(respond: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Script {
            hits: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            respond: Box::new(respond),
        })
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(State(s): State<Arc<Script>>, uri: Uri, headers: HeaderMap) -> Response {
    let seen = Seen { uri, headers };
    let n = s.hits.fetch_add(1, Ordering::SeqCst);
    s.seen.lock().unwrap().push(seen.clone());
    let mut reply = (s.respond)(n, &seen);
    loop {
        match reply {
            Reply::Slow(d, next) => {
                tokio::time::sleep(d).await;
                reply = *next;
            }
            Reply::Ok(body) => {
                return (
                    StatusCode::OK,
                    [("content-type", "application/json; charset=utf-8")],
                    Body::from(body),
                )
                    .into_response()
            }
            Reply::Status(code, body) => {
                return (
                    StatusCode::from_u16(code).expect("valid status"),
                    Body::from(body),
                )
                    .into_response()
            }
        }
    }
}

pub fn router(script: Arc<Script>) -> Router {
    Router::new().fallback(handle).with_state(script)
}

/// Serves `script` on an already bound listener, in the background.
pub fn serve_on(listener: tokio::net::TcpListener, script: Arc<Script>) {
    tokio::spawn(async move {
        axum::serve(listener, router(script)).await.ok();
    });
}

/// Starts a fake IMDS on 127.0.0.1 and returns its base URL.
pub async fn start(script: Arc<Script>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = l.local_addr().unwrap();
    serve_on(l, script);
    format!("http://{addr}")
}

/// A port on 127.0.0.1 with nothing listening (it was free a moment ago).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------------------
// Real binaries (the lab's consul, bao, python with jsonschema).

/// Looks a tool up: the environment variable, then the lab's `.tools/env.sh`, then `PATH`.
pub fn find_tool(env_var: &str, path_name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
    }
    let env_sh = workspace_dir().join(".tools/env.sh");
    if let Ok(text) = std::fs::read_to_string(env_sh) {
        let prefix = format!("export {env_var}=");
        for line in text.lines() {
            if let Some(v) = line.trim().strip_prefix(&prefix) {
                let p = PathBuf::from(v.trim_matches('"').trim_matches('\''));
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(path_name))
        .find(|p| p.is_file())
}

/// Whether this run must have the real binaries (CI) rather than skip without them.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The tool, or `None` after printing why the test is skipped. Under CI a missing tool is a failure.
pub fn require_tool(env_var: &str, path_name: &str, what: &str) -> Option<PathBuf> {
    match find_tool(env_var, path_name) {
        Some(p) => Some(p),
        None if in_ci() => panic!(
            "{what} not found (set {env_var} or put {path_name} on PATH; `bash lab/setup.sh` installs it) and CI is set"
        ),
        None => {
            eprintln!(
                "SKIPPED: {what} not found (set {env_var}, put {path_name} on PATH, or run `bash lab/setup.sh`)"
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rendering with full key material through the library, as boot does.

use hashistack_agent::boot;
use hashistack_agent::config::{AgentConfig, Owners};
use hashistack_agent::imds::InstanceMetadata;
use hashistack_agent::node::NodeSpec;
use hashistack_agent::render::{self, Layout, Plan, RenderOptions, Versions};
use hashistack_agent::version::{self, Installed, Product};

/// Cluster material in `dir`: CA, gossip keys, transit token; and an agent config rooted at `root`.
pub fn agent_config(dir: &Path, root: &Path, loopback: bool, seal_token: &str) -> AgentConfig {
    use base64::Engine;
    let (ca, key) = hashistack_agent::tls::generate_ca(
        "hashistack test CA",
        30,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    // The shared Nomad client certificate a worker uses (workers never read the CA key).
    let client = hashistack_agent::tls::ClusterCa::from_pem(&ca, &key)
        .unwrap()
        .issue(
            "client.global.nomad",
            &["client.global.nomad".into(), "localhost".into()],
            30,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    std::fs::write(dir.join("nomad-client.pem"), &client.cert_pem).unwrap();
    std::fs::write(dir.join("nomad-client-key.pem"), &client.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    std::fs::write(dir.join("ca-key.pem"), key).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    std::fs::write(dir.join("consul.key"), b64.encode([7u8; 32])).unwrap();
    std::fs::write(dir.join("nomad.key"), b64.encode([9u8; 32])).unwrap();
    std::fs::write(dir.join("transit.token"), seal_token).unwrap();
    let mut cfg = AgentConfig::default();
    cfg.paths.root = root.to_path_buf();
    cfg.paths.owners = Owners::CurrentUser;
    cfg.listen.loopback = loopback;
    cfg.tls.ca_cert = dir.join("ca.pem");
    cfg.tls.ca_key = dir.join("ca-key.pem");
    cfg.tls.nomad_client_cert = dir.join("nomad-client.pem");
    cfg.tls.nomad_client_key = dir.join("nomad-client-key.pem");
    cfg.gossip.consul_key_file = dir.join("consul.key");
    cfg.gossip.nomad_key_file = dir.join("nomad.key");
    cfg.vault.seal_token_file = Some(dir.join("transit.token"));
    // No block device here: server tiers' data disk is a directory under `root` (as in the lab).
    cfg.disk.mode = hashistack_agent::config::DiskMode::Directory;
    cfg
}

/// Renders a node with full material (certificates, gossip keys, env files) into `cfg.paths.root`, as boot
/// would, and writes it.
pub fn render_with_material(
    doc: &Value,
    cfg: &AgentConfig,
    versions: &Versions,
) -> (NodeSpec, Plan) {
    let md = InstanceMetadata::from_json(&serde_json::to_vec(doc).unwrap()).unwrap();
    let spec = NodeSpec::from_metadata(&md).unwrap();
    let layout = Layout::new(&cfg.paths.root);
    let material = boot::load_material(cfg, &spec, &layout, None).unwrap();
    let plan = render::render(
        &spec,
        &layout,
        &RenderOptions::from_config(cfg),
        versions,
        Some(&material),
    )
    .unwrap();
    boot::write_plan(&plan).unwrap();
    (spec, plan)
}

pub fn versions(consul: Option<&Installed>, vault: Option<&Installed>) -> Versions {
    let mut v = Versions::new();
    v.insert(
        Product::Consul,
        consul
            .cloned()
            .unwrap_or_else(|| version::assumed_current(Product::Consul)),
    );
    v.insert(
        Product::Vault,
        vault
            .cloned()
            .unwrap_or_else(|| version::assumed_current(Product::Vault)),
    );
    v.insert(Product::Nomad, version::assumed_current(Product::Nomad));
    v
}
