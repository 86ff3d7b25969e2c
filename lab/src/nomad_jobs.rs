//! Jobs and allocations in the **Nomad contract double** (a child module of lab/src/nomad_double.rs): the
//! routes `hashistack-agent smoke` uses, in the shapes Nomad's HTTP API documents, and a client that runs the
//! canary job against the lab's REAL OpenBao and Consul. Not Nomad; read, never copied, from Nomad's
//! `command/agent/job_endpoint.go`, `alloc_endpoint.go`, `fs_endpoint.go`, `api/jobs.go`, `api/allocations.go`,
//! `nomad/structs/structs.go` (Allocation, TaskState, TaskEvent, JobRegisterResponse) and `nomad/structs/errors.go`;
//! task events from `client/allocrunner/taskrunner/vault_hook.go` and `template/template.go`.
//!
//! Servers (ACLs on: a management token; namespace capabilities `submit-job`, `read-job`, `read-fs` of
//! non-management tokens are refused, as the double's policies have no `namespace` rules):
//! - `PUT|POST /v1/jobs` `{"Job": {...}}` (Nomad's JSON job specification) → `{"EvalID", "EvalCreateIndex",
//!   "JobModifyIndex", "Warnings", "Index", "KnownLeader", "LastContact"}`; a job of the same ID is replaced (its
//!   allocations are stopped). At the leader, in the replicated store, a trivial scheduler places one
//!   allocation per group `Count` on a `ready` client node of the job's `Datacenters` (`*` matches all), round
//!   robin, with each dynamic port from 20000–32000, and signs each task's Vault identity (`vault_default`,
//!   `vault.default_identity` `aud`/`ttl` of the server's config; lab/src/nomad_identity.rs) into the
//!   allocation, as Nomad's plan applier does. No ready node: no allocation (Nomad would block the eval).
//!   Drivers other than `exec`/`raw_exec`, service providers other than `consul`, and templates other than
//!   plain text or `{{ with secret "PATH" }}{{ .Data.data.KEY }}{{ end }}` are refused with a 400 that says so.
//! - `GET /v1/job/:id` (404 `job not found`; `Status` `pending`, `running` or `dead`), `GET
//!   /v1/job/:id/allocations` (allocation stubs), `GET /v1/allocation/:id` (with its `Job`; 404 `alloc not
//!   found`), `DELETE /v1/job/:id` (`?purge=true` removes the job; without, `Stop` and `dead`): its allocations
//!   get `DesiredStatus` `stop`; stopped allocations of a purged job are removed once their client reports them
//!   terminal.
//! - `GET /v1/client/fs/cat/:alloc_id?path=` forwarded to the client that runs the allocation (Nomad forwards by
//!   RPC); 404 `Unknown allocation "<id>"`.
//!
//! Client (the double's `client.enabled` agent):
//! - `GET /v1/client/fs/cat/:alloc_id?path=` (ACL `read-fs`: management), a file under the allocation directory
//!   `<data_dir>/alloc/<id>/` (no `..`); a missing file is 404 `stat <path>: no such file or directory`.
//! - It polls its servers every 500 ms for its allocations (plumbing, below) and runs each: task directory
//!   `<data_dir>/alloc/<id>/<task>/{local,secrets}`; with a `vault` block, logs in to the REAL Vault
//!   (`vault.address`, `vault.ca_file` of its config) at `auth/<jwt_auth_backend_path>login` with the
//!   allocation's signed identity (role: the task's `vault.role`, else the auth method's default); renders the
//!   templates (`secret` reads with that Vault token); starts the task's `command`/`args` (`${NOMAD_*}`
//!   interpolated) as a child process — the lab's stand-in for `exec`: no isolation, cwd = task directory,
//!   `NOMAD_*` environment, output in `alloc/logs/<task>.std{out,err}.0`; registers each service and check with
//!   the LOCAL REAL Consul agent (`consul.address`, `consul.ca_file`, `consul.token` of its config, re-read at
//!   each start: the agent adds `consul-token.json` after the Consul tier's bootstrap) under Nomad's service ID
//!   `_nomad-task-<alloc>-<task>-<service>-<port label>`; and reports `ClientStatus` and `TaskStates` (events
//!   `Received`, `Task Setup`, `Started`, `Killing`, `Killed`, `Template`, `Terminated`).
//!   Failures, with Nomad's task event texts: a login Vault refuses → `Killing` `Vault: failed to derive vault
//!   token: …`, a secret read Vault refuses → `Killing` `Template failed: vault.read(PATH): …` (both fail the
//!   allocation); a secret that does not exist → `Template` `Missing: vault.read(PATH)` and the allocation stays
//!   `pending` while it is looked for again (as consul-template blocks). A task that exits is `failed` (no
//!   restarts). A stopped allocation: the process killed, the service deregistered, `complete`.
//!
//! Plumbing, not Nomad (mTLS client certificate signed by `tls.ca_file`, like `/v1/double/node`, plus the node
//! secret in `x-nomad-double-node-secret`): `GET /v1/double/allocs?node_id=` (the node's allocations, with
//! their job and signed identities) and `PUT /v1/double/allocs` `{"NodeID", "Allocs": [{"ID", "ClientStatus",
//! "ClientDescription", "TaskStates"}]}` (applied at the leader).
//!
//! Not done: evaluations and deployments (an `EvalID` is returned, never stored), blocked evals and
//! rescheduling, restarts, resources and bin packing, constraints, namespaces other than `default`, job
//! versions, `X-Nomad-Index` and blocking queries, `fs` routes other than `cat`, logs and exec.

use super::{
    api_error, denied, json_resp, log, not_found, query_param, read_body, rfc3339, text, token_of,
    uuid, Agent, Answer, ApiError, Resp, Store, Write, WriteTarget,
};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The client's allocation poll and status updates (plumbing; see the module header).
pub const ALLOCS_PATH: &str = "/v1/double/allocs";
const NODE_SECRET_HEADER: &str = "x-nomad-double-node-secret";
/// Nomad's default dynamic port range.
pub const MIN_DYNAMIC_PORT: u16 = 20000;
pub const MAX_DYNAMIC_PORT: u16 = 32000;
/// The name of a task's Vault identity (Nomad's `vault_` prefix + the Vault cluster `default`).
pub const VAULT_IDENTITY: &str = "vault_default";

// ---------------------------------------------------------------------------------------------------
// Configuration

/// The job-related parts of an agent's configuration.
#[derive(Debug, Clone, Default)]
pub struct JobsConfig {
    /// Servers: `vault.default_identity.aud` (default `["vault.io"]`).
    pub identity_aud: Vec<String>,
    /// Servers: `vault.default_identity.ttl` (0: no expiry).
    pub identity_ttl: Duration,
    /// The configuration files, re-read by a client at each allocation start (its Vault and Consul blocks).
    pub sources: Vec<PathBuf>,
}

impl JobsConfig {
    pub fn from_value(v: &Value) -> Result<JobsConfig, String> {
        let aud = v
            .pointer("/vault/default_identity/aud")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_else(|| vec!["vault.io".to_string()]);
        let ttl = match v
            .pointer("/vault/default_identity/ttl")
            .and_then(Value::as_str)
        {
            Some(t) => {
                super::parse_duration(t).map_err(|e| format!("vault.default_identity.ttl: {e}"))?
            }
            None => Duration::ZERO,
        };
        Ok(JobsConfig {
            identity_aud: aud,
            identity_ttl: ttl,
            sources: vec![],
        })
    }
}

/// A client's `vault` and `consul` blocks, as read when an allocation starts.
#[derive(Clone)]
struct Products {
    vault_address: Option<String>,
    vault_ca: Option<PathBuf>,
    jwt_path: String,
    consul_address: String,
    consul_ssl: bool,
    consul_ca: Option<PathBuf>,
    consul_token: Option<String>,
}

impl Products {
    fn load(sources: &[PathBuf]) -> Result<Products, String> {
        let v = super::load_merged(sources)?;
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(String::from);
        Ok(Products {
            vault_address: s("/vault/address").map(|a| a.trim_end_matches('/').to_string()),
            vault_ca: s("/vault/ca_file").map(PathBuf::from),
            jwt_path: s("/vault/jwt_auth_backend_path").unwrap_or_else(|| "jwt-nomad/".into()),
            consul_address: s("/consul/address").unwrap_or_else(|| "127.0.0.1:8500".into()),
            consul_ssl: v
                .pointer("/consul/ssl")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            consul_ca: s("/consul/ca_file").map(PathBuf::from),
            consul_token: s("/consul/token"),
        })
    }
}

fn client_trusting(ca: Option<&Path>) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let cert =
            reqwest::Certificate::from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
        b = b.tls_certs_only([cert]);
    }
    b.build().map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------------
// The job specification (the part of Nomad's JSON job specification the double runs)

#[derive(Debug, Clone, Deserialize)]
pub struct JobSpec {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Namespace", default)]
    pub namespace: Option<String>,
    #[serde(rename = "Type", default)]
    pub kind: Option<String>,
    #[serde(rename = "Datacenters", default)]
    pub datacenters: Option<Vec<String>>,
    #[serde(rename = "TaskGroups", default)]
    pub task_groups: Vec<GroupSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GroupSpec {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Count", default)]
    pub count: Option<u32>,
    #[serde(rename = "Networks", default)]
    pub networks: Option<Vec<NetworkSpec>>,
    #[serde(rename = "Tasks", default)]
    pub tasks: Vec<TaskSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NetworkSpec {
    #[serde(rename = "DynamicPorts", default)]
    pub dynamic_ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PortSpec {
    #[serde(rename = "Label")]
    pub label: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskSpec {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Driver", default)]
    pub driver: String,
    #[serde(rename = "Config", default)]
    pub config: Option<DriverConfig>,
    #[serde(rename = "Env", default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(rename = "Vault", default)]
    pub vault: Option<VaultSpec>,
    #[serde(rename = "Templates", default)]
    pub templates: Option<Vec<TemplateSpec>>,
    #[serde(rename = "Services", default)]
    pub services: Option<Vec<ServiceSpec>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DriverConfig {
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaultSpec {
    #[serde(rename = "Role", default)]
    pub role: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TemplateSpec {
    #[serde(rename = "EmbeddedTmpl", default)]
    pub embedded_tmpl: String,
    #[serde(rename = "DestPath", default)]
    pub dest_path: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServiceSpec {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "PortLabel", default)]
    pub port_label: String,
    #[serde(rename = "Provider", default)]
    pub provider: Option<String>,
    #[serde(rename = "Tags", default)]
    pub tags: Option<Vec<String>>,
    #[serde(rename = "Checks", default)]
    pub checks: Option<Vec<CheckSpec>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckSpec {
    #[serde(rename = "Name", default)]
    pub name: Option<String>,
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "Path", default)]
    pub path: Option<String>,
    /// Nanoseconds.
    #[serde(rename = "Interval", default)]
    pub interval: u64,
    /// Nanoseconds.
    #[serde(rename = "Timeout", default)]
    pub timeout: u64,
}

/// A template the double renders: plain text, or one secret's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tmpl {
    Plain(String),
    /// `{{ with secret "PATH" }}{{ .Data.data.KEY }}{{ end }}`.
    SecretKey {
        path: String,
        key: String,
    },
}

/// Parses the template forms the double supports (whitespace inside the actions is free).
pub fn parse_template(src: &str) -> Result<Tmpl, String> {
    if !src.contains("{{") {
        return Ok(Tmpl::Plain(src.to_string()));
    }
    let unsupported = || {
        "the Nomad contract double renders only plain text and {{ with secret \"PATH\" }}{{ .Data.data.KEY }}{{ end }}"
            .to_string()
    };
    let actions: Vec<&str> = src
        .split("{{")
        .skip(1)
        .map(|p| p.split("}}").next().unwrap_or("").trim())
        .collect();
    let outside: String = src
        .split("{{")
        .enumerate()
        .map(|(i, p)| {
            if i == 0 {
                p
            } else {
                p.split_once("}}").map(|x| x.1).unwrap_or("")
            }
        })
        .collect();
    if actions.len() != 3 || !outside.trim().is_empty() || actions[2] != "end" {
        return Err(unsupported());
    }
    let path = actions[0]
        .strip_prefix("with secret")
        .map(str::trim)
        .and_then(|p| p.strip_prefix('"'))
        .and_then(|p| p.strip_suffix('"'))
        .ok_or_else(unsupported)?;
    let key = actions[1]
        .strip_prefix(".Data.data.")
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .ok_or_else(unsupported)?;
    Ok(Tmpl::SecretKey {
        path: path.into(),
        key: key.into(),
    })
}

/// Nomad's validation of what the double runs; the errors name what the double does not implement.
pub fn validate(spec: &JobSpec) -> Result<(), ApiError> {
    let mut errs = vec![];
    if spec.id.is_empty() {
        errs.push("Missing job ID".to_string());
    }
    if spec.task_groups.is_empty() {
        errs.push("Missing job task groups".into());
    }
    if let Some(ns) = spec.namespace.as_deref().filter(|n| *n != "default") {
        errs.push(format!(
            "namespace {ns:?}: namespaces are not implemented by the Nomad contract double"
        ));
    }
    for g in &spec.task_groups {
        if g.tasks.is_empty() {
            errs.push(format!("Task group {:?} has no tasks", g.name));
        }
        for t in &g.tasks {
            if !matches!(t.driver.as_str(), "exec" | "raw_exec") {
                errs.push(format!(
                    "task {:?}: driver {:?} is not implemented by the Nomad contract double (exec, raw_exec)",
                    t.name, t.driver
                ));
            }
            if t.config.as_ref().is_none_or(|c| c.command.is_empty()) {
                errs.push(format!("task {:?}: missing command", t.name));
            }
            for tp in t.templates.iter().flatten() {
                if let Err(e) = parse_template(&tp.embedded_tmpl) {
                    errs.push(format!(
                        "task {:?}: template {:?}: {e}",
                        t.name, tp.dest_path
                    ));
                }
                if !safe_relative(&tp.dest_path) {
                    errs.push(format!(
                        "task {:?}: template destination {:?} escapes the task directory",
                        t.name, tp.dest_path
                    ));
                }
            }
            for s in t.services.iter().flatten() {
                if s.provider.as_deref().unwrap_or("consul") != "consul" {
                    errs.push(format!(
                        "service {:?}: provider {:?} is not implemented by the Nomad contract double",
                        s.name,
                        s.provider.as_deref().unwrap_or("")
                    ));
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError(400, super::multierror(&errs)))
    }
}

/// A relative path with no `..`.
fn safe_relative(p: &str) -> bool {
    let p = Path::new(p);
    !p.as_os_str().is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

// ---------------------------------------------------------------------------------------------------
// The replicated state: jobs and allocations

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Namespace")]
    pub namespace: String,
    #[serde(rename = "Stop")]
    pub stop: bool,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
    #[serde(rename = "JobModifyIndex")]
    pub job_modify_index: u64,
    /// The job as submitted.
    #[serde(rename = "Spec")]
    pub spec: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    #[serde(rename = "Type")]
    pub kind: String,
    /// Unix nanoseconds.
    #[serde(rename = "Time")]
    pub time: i64,
    #[serde(rename = "Message", default)]
    pub message: String,
    #[serde(rename = "DisplayMessage")]
    pub display_message: String,
    #[serde(rename = "FailsTask", default)]
    pub fails_task: bool,
    #[serde(rename = "Details", default)]
    pub details: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    #[serde(rename = "State")]
    pub state: String,
    #[serde(rename = "Failed")]
    pub failed: bool,
    #[serde(rename = "Restarts", default)]
    pub restarts: u64,
    #[serde(rename = "StartedAt", default)]
    pub started_at: Option<String>,
    #[serde(rename = "FinishedAt", default)]
    pub finished_at: Option<String>,
    #[serde(rename = "Events", default)]
    pub events: Vec<TaskEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "Label")]
    pub label: String,
    #[serde(rename = "Value")]
    pub value: u16,
    #[serde(rename = "To")]
    pub to: u16,
    #[serde(rename = "HostIP")]
    pub host_ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alloc {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Namespace")]
    pub namespace: String,
    #[serde(rename = "EvalID")]
    pub eval_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "NodeID")]
    pub node_id: String,
    #[serde(rename = "NodeName")]
    pub node_name: String,
    #[serde(rename = "JobID")]
    pub job_id: String,
    #[serde(rename = "TaskGroup")]
    pub task_group: String,
    #[serde(rename = "DesiredStatus")]
    pub desired_status: String,
    #[serde(rename = "ClientStatus")]
    pub client_status: String,
    #[serde(rename = "ClientDescription", default)]
    pub client_description: String,
    #[serde(rename = "TaskStates", default)]
    pub task_states: BTreeMap<String, TaskState>,
    #[serde(rename = "Ports", default)]
    pub ports: Vec<PortMapping>,
    /// Task name → its Vault identity (a JWT); only the client that runs the allocation sees them.
    #[serde(rename = "SignedIdentities", default)]
    pub signed_identities: BTreeMap<String, String>,
    /// The job as it was when the allocation was placed.
    #[serde(rename = "Job")]
    pub job: Value,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
    #[serde(rename = "CreateTime")]
    pub create_time: i64,
    #[serde(rename = "ModifyTime")]
    pub modify_time: i64,
}

fn terminal(client_status: &str) -> bool {
    matches!(client_status, "complete" | "failed" | "lost")
}

fn now_ns() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

impl Alloc {
    /// `AllocListStub` (`GET /v1/job/:id/allocations`).
    pub fn stub(&self) -> Value {
        json!({
            "ID": self.id, "EvalID": self.eval_id, "Name": self.name, "Namespace": self.namespace,
            "NodeID": self.node_id, "NodeName": self.node_name, "JobID": self.job_id,
            "JobType": self.job.get("Type").cloned().unwrap_or(json!("service")),
            "TaskGroup": self.task_group, "DesiredStatus": self.desired_status,
            "DesiredDescription": "", "ClientStatus": self.client_status,
            "ClientDescription": self.client_description, "TaskStates": self.task_states,
            "CreateIndex": self.create_index, "ModifyIndex": self.modify_index,
            "CreateTime": self.create_time, "ModifyTime": self.modify_time,
        })
    }

    /// `GET /v1/allocation/:id`: the stub's fields, the job and the allocated ports (never the identities).
    pub fn public(&self) -> Value {
        let mut v = self.stub();
        v["Job"] = self.job.clone();
        v["AllocatedResources"] = json!({"Shared": {"Ports": self.ports}});
        v["AllocModifyIndex"] = json!(self.modify_index);
        v
    }
}

/// What the scheduler needs to sign a task's Vault identity.
pub struct Signer<'a> {
    pub aud: &'a [String],
    pub ttl: Duration,
    pub region: &'a str,
}

/// A client's report on one allocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AllocUpdate {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "ClientStatus")]
    pub client_status: String,
    #[serde(rename = "ClientDescription", default)]
    pub client_description: String,
    #[serde(rename = "TaskStates", default)]
    pub task_states: BTreeMap<String, TaskState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AllocUpdates {
    #[serde(rename = "NodeID")]
    pub node_id: String,
    #[serde(rename = "Allocs")]
    pub allocs: Vec<AllocUpdate>,
}

fn random_port(used: &[u16]) -> u16 {
    loop {
        let mut b = [0u8; 2];
        aws_lc_rs::rand::fill(&mut b).expect("system RNG");
        let p =
            MIN_DYNAMIC_PORT + u16::from_le_bytes(b) % (MAX_DYNAMIC_PORT - MIN_DYNAMIC_PORT + 1);
        if !used.contains(&p) {
            return p;
        }
    }
}

impl Store {
    /// `Job.Register` and the scheduler's placement, at the leader. Returns the job's modify index.
    pub fn register_job(&mut self, raw: Value, signer: &Signer) -> Result<u64, ApiError> {
        let spec: JobSpec =
            serde_json::from_value(raw.clone()).map_err(|e| ApiError(400, e.to_string()))?;
        validate(&spec)?;
        self.index += 1;
        let index = self.index;
        let mut raw = raw;
        raw["Namespace"] = json!("default");
        if spec.name.is_empty() {
            raw["Name"] = json!(spec.id);
        }
        if spec.kind.is_none() {
            raw["Type"] = json!("service");
        }
        if spec.datacenters.is_none() {
            raw["Datacenters"] = json!(["*"]);
        }
        match self.jobs.iter_mut().find(|j| j.id == spec.id) {
            Some(j) => {
                j.spec = raw.clone();
                j.stop = false;
                j.modify_index = index;
                j.job_modify_index = index;
            }
            None => self.jobs.push(Job {
                id: spec.id.clone(),
                namespace: "default".into(),
                stop: false,
                create_index: index,
                modify_index: index,
                job_modify_index: index,
                spec: raw.clone(),
            }),
        }
        let now = now_ns();
        for a in self.allocs.iter_mut().filter(|a| a.job_id == spec.id) {
            if a.desired_status != "stop" {
                a.desired_status = "stop".into();
                a.modify_index = index;
                a.modify_time = now;
            }
        }
        let dcs = spec.datacenters.clone().unwrap_or_else(|| vec!["*".into()]);
        let nodes: Vec<(String, String, String)> = self
            .nodes
            .iter()
            .filter(|n| n.status == "ready" && n.scheduling_eligibility == "eligible")
            .filter(|n| dcs.iter().any(|d| d == "*" || *d == n.datacenter))
            .map(|n| (n.id.clone(), n.name.clone(), n.address.clone()))
            .collect();
        if nodes.is_empty() {
            log(format!(
                "job {}: no ready client node in {dcs:?}; nothing placed",
                spec.id
            ));
            return Ok(index);
        }
        let key = self.keyring.last().cloned();
        let eval = uuid();
        let mut turn = index as usize;
        for g in &spec.task_groups {
            for i in 0..g.count.unwrap_or(1) {
                let (node_id, node_name, address) = nodes[turn % nodes.len()].clone();
                turn += 1;
                let used: Vec<u16> = self
                    .allocs
                    .iter()
                    .filter(|a| a.node_id == node_id && !terminal(&a.client_status))
                    .flat_map(|a| a.ports.iter().map(|p| p.value))
                    .collect();
                let mut ports = vec![];
                for label in g
                    .networks
                    .iter()
                    .flatten()
                    .flat_map(|n| n.dynamic_ports.iter().flatten())
                    .map(|p| p.label.clone())
                {
                    let mut taken = used.clone();
                    taken.extend(ports.iter().map(|p: &PortMapping| p.value));
                    let value = random_port(&taken);
                    ports.push(PortMapping {
                        label,
                        value,
                        to: 0,
                        host_ip: address.clone(),
                    });
                }
                let id = uuid();
                let mut identities = BTreeMap::new();
                for t in g.tasks.iter().filter(|t| t.vault.is_some()) {
                    let Some(k) = &key else {
                        return Err(ApiError(500, "no active root key".into()));
                    };
                    let req = crate::nomad_identity::IdentityRequest {
                        region: signer.region.into(),
                        namespace: "default".into(),
                        job_id: spec.id.clone(),
                        group: g.name.clone(),
                        task: t.name.clone(),
                        alloc_id: id.clone(),
                        identity: VAULT_IDENTITY.into(),
                        audience: signer.aud.to_vec(),
                        ttl_secs: signer.ttl.as_secs() as i64,
                        issued_at: None,
                    };
                    let jwt = k
                        .sign(&crate::nomad_identity::claims(
                            &req,
                            time::OffsetDateTime::now_utc().unix_timestamp(),
                            &uuid(),
                        ))
                        .map_err(|e| ApiError(500, e))?;
                    identities.insert(t.name.clone(), jwt);
                }
                let states = g
                    .tasks
                    .iter()
                    .map(|t| {
                        (
                            t.name.clone(),
                            TaskState {
                                state: "pending".into(),
                                ..Default::default()
                            },
                        )
                    })
                    .collect();
                self.allocs.push(Alloc {
                    id,
                    namespace: "default".into(),
                    eval_id: eval.clone(),
                    name: format!("{}.{}[{i}]", spec.id, g.name),
                    node_id,
                    node_name,
                    job_id: spec.id.clone(),
                    task_group: g.name.clone(),
                    desired_status: "run".into(),
                    client_status: "pending".into(),
                    client_description: String::new(),
                    task_states: states,
                    ports,
                    signed_identities: identities,
                    job: raw.clone(),
                    create_index: index,
                    modify_index: index,
                    create_time: now,
                    modify_time: now,
                });
            }
        }
        Ok(index)
    }

    /// `Job.Deregister` at the leader: its allocations are stopped; `purge` removes the job.
    pub fn deregister_job(&mut self, id: &str, purge: bool) -> Result<u64, ApiError> {
        self.index += 1;
        let index = self.index;
        let now = now_ns();
        for a in self.allocs.iter_mut().filter(|a| a.job_id == id) {
            if a.desired_status != "stop" {
                a.desired_status = "stop".into();
                a.modify_index = index;
                a.modify_time = now;
            }
        }
        if purge {
            self.jobs.retain(|j| j.id != id);
        } else if let Some(j) = self.jobs.iter_mut().find(|j| j.id == id) {
            j.stop = true;
            j.modify_index = index;
            j.job_modify_index = index;
        }
        self.collect_garbage();
        Ok(index)
    }

    /// A client's report on its allocations, at the leader. Returns whether anything changed.
    pub fn update_allocs(&mut self, u: AllocUpdates) -> bool {
        let next = self.index + 1;
        let now = now_ns();
        let mut changed = false;
        for up in u.allocs {
            let Some(a) = self
                .allocs
                .iter_mut()
                .find(|a| a.id == up.id && a.node_id == u.node_id)
            else {
                continue;
            };
            if (&a.client_status, &a.client_description, &a.task_states)
                != (&up.client_status, &up.client_description, &up.task_states)
            {
                a.client_status = up.client_status;
                a.client_description = up.client_description;
                a.task_states = up.task_states;
                a.modify_index = next;
                a.modify_time = now;
                changed = true;
            }
        }
        let before = self.allocs.len();
        self.collect_garbage();
        changed |= self.allocs.len() != before;
        if changed {
            self.index = next;
        }
        changed
    }

    /// Removes stopped, terminal allocations whose job is gone.
    fn collect_garbage(&mut self) {
        let jobs: Vec<String> = self.jobs.iter().map(|j| j.id.clone()).collect();
        self.allocs.retain(|a| {
            !(a.desired_status == "stop" && terminal(&a.client_status) && !jobs.contains(&a.job_id))
        });
    }

    /// The job as `GET /v1/job/:id` shows it.
    pub fn job_public(&self, id: &str) -> Option<Value> {
        let j = self.jobs.iter().find(|j| j.id == id)?;
        let allocs: Vec<&Alloc> = self
            .allocs
            .iter()
            .filter(|a| a.job_id == id && a.desired_status == "run")
            .collect();
        let status = if j.stop {
            "dead"
        } else if allocs.iter().any(|a| a.client_status == "running") {
            "running"
        } else {
            "pending"
        };
        let mut v = j.spec.clone();
        v["Status"] = json!(status);
        v["Stop"] = json!(j.stop);
        v["CreateIndex"] = json!(j.create_index);
        v["ModifyIndex"] = json!(j.modify_index);
        v["JobModifyIndex"] = json!(j.job_modify_index);
        Some(v)
    }
}

// ---------------------------------------------------------------------------------------------------
// Routes

/// Whether a path is one of this module's (answered by [`Agent::jobs_route`]).
pub fn handles(path: &str) -> bool {
    path == "/v1/jobs"
        || path.starts_with("/v1/job/")
        || path.starts_with("/v1/allocation/")
        || path.starts_with("/v1/client/fs/")
        || path == ALLOCS_PATH
}

/// Whether a client agent sends the path on to its servers (everything cluster-wide).
pub fn forwarded_by_clients(path: &str) -> bool {
    path == "/v1/jobs" || path.starts_with("/v1/job/") || path.starts_with("/v1/allocation/")
}

impl Agent {
    /// Namespace capabilities (`submit-job`, `read-job`, `read-fs`): with ACLs on, a management token.
    async fn require_job_acl(&self, req: &Request<Incoming>) -> Result<(), Resp> {
        if !self.cfg.acl_enabled {
            return Ok(());
        }
        let a = self.authz(&token_of(req)).await.map_err(api_error)?;
        if a.management {
            Ok(())
        } else {
            Err(denied())
        }
    }

    pub(super) async fn jobs_route(&self, req: Request<Incoming>, client_cert: bool) -> Answer {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let is_write = method == Method::PUT || method == Method::POST;
        match (&method, path.as_str()) {
            (_, "/v1/jobs") if is_write => self.job_register(req).await,
            (&Method::GET, ALLOCS_PATH) => self.client_allocs(req, client_cert).await,
            (&Method::PUT, ALLOCS_PATH) => self.client_update(req, client_cert).await,
            (&Method::GET, p) if p.starts_with("/v1/client/fs/cat/") => {
                let id = p["/v1/client/fs/cat/".len()..].to_string();
                self.fs_cat(req, &id).await
            }
            (&Method::GET, p) if p.starts_with("/v1/allocation/") => {
                self.require_job_acl(&req).await?;
                let id = &p["/v1/allocation/".len()..];
                let rt = self.rt.lock().expect("runtime");
                match rt.store.allocs.iter().find(|a| a.id == id) {
                    Some(a) => Ok(json_resp(&a.public())),
                    None => Err(text(404, "alloc not found")),
                }
            }
            (&Method::GET, p) if p.starts_with("/v1/job/") && p.ends_with("/allocations") => {
                self.require_job_acl(&req).await?;
                let id = &p["/v1/job/".len()..p.len() - "/allocations".len()];
                let rt = self.rt.lock().expect("runtime");
                let stubs: Vec<Value> = rt
                    .store
                    .allocs
                    .iter()
                    .filter(|a| a.job_id == id)
                    .map(Alloc::stub)
                    .collect();
                Ok(json_resp(&stubs))
            }
            (&Method::GET, p) if p.starts_with("/v1/job/") => {
                self.require_job_acl(&req).await?;
                let id = &p["/v1/job/".len()..];
                let rt = self.rt.lock().expect("runtime");
                match rt.store.job_public(id) {
                    Some(v) => Ok(json_resp(&v)),
                    None => Err(text(404, "job not found")),
                }
            }
            (&Method::DELETE, p) if p.starts_with("/v1/job/") => {
                let id = p["/v1/job/".len()..].to_string();
                self.job_delete(req, &id).await
            }
            (_, p) if p.starts_with("/v1/client/fs/") => Err(not_found()),
            _ => Ok(text(405, "Invalid method")),
        }
    }

    /// Where a job write goes: here (the leader), or forwarded with its method.
    async fn job_write_at_leader(
        &self,
        w: &Write,
        method: &Method,
        path_and_query: &str,
    ) -> Result<(), Resp> {
        match self.write_target(w.forwarded) {
            WriteTarget::Here => Ok(()),
            WriteTarget::NoLeader => Err(super::no_leader()),
            WriteTarget::Forward(t, mark) => Err(self
                .forward(&t, mark, method, path_and_query, &w.token, w.body.clone())
                .await),
        }
    }

    async fn job_register(&self, req: Request<Incoming>) -> Answer {
        if self.cfg.server.is_none() {
            return Err(not_found());
        }
        self.require_job_acl(&req).await?;
        let w = Write::read(req, 4 << 20).await?;
        #[derive(Deserialize)]
        struct Register {
            #[serde(rename = "Job")]
            job: Option<Value>,
        }
        let r: Register = serde_json::from_slice(&w.body)
            .map_err(|e| text(400, format!("failed to decode request body: {e}")))?;
        let job = r.job.ok_or_else(|| text(400, "Job must be specified"))?;
        let spec: JobSpec = serde_json::from_value(job.clone())
            .map_err(|e| text(400, format!("failed to decode request body: {e}")))?;
        validate(&spec).map_err(api_error)?;
        self.job_write_at_leader(&w, &Method::PUT, "/v1/jobs")
            .await?;
        let signer = Signer {
            aud: &self.cfg.jobs.identity_aud,
            ttl: self.cfg.jobs.identity_ttl,
            region: &self.cfg.region,
        };
        let index = self
            .commit(|s| s.register_job(job, &signer))
            .await
            .map_err(api_error)?;
        log(format!("job {} registered (index {index})", spec.id));
        Ok(json_resp(&json!({
            "EvalID": uuid(), "EvalCreateIndex": index, "JobModifyIndex": index, "Warnings": "",
            "Index": index, "LastContact": 0, "KnownLeader": true,
        })))
    }

    async fn job_delete(&self, req: Request<Incoming>, id: &str) -> Answer {
        if self.cfg.server.is_none() {
            return Err(not_found());
        }
        self.require_job_acl(&req).await?;
        let purge = match query_param(&req, "purge").as_deref() {
            None | Some("") => false,
            Some("true" | "1" | "t" | "T" | "TRUE" | "True") => true,
            Some("false" | "0" | "f" | "F" | "FALSE" | "False") => false,
            Some(other) => {
                return Err(text(
                    400,
                    format!(
                        "Failed to parse value of \"purge\" ({other}) as a bool: strconv.ParseBool: parsing \"{other}\": invalid syntax"
                    ),
                ))
            }
        };
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let w = Write::read(req, 1 << 16).await?;
        self.job_write_at_leader(&w, &Method::DELETE, &pq).await?;
        let index = self
            .commit(|s| s.deregister_job(id, purge))
            .await
            .map_err(api_error)?;
        log(format!(
            "job {id} deregistered{} (index {index})",
            if purge { " and purged" } else { "" }
        ));
        Ok(json_resp(&json!({
            "EvalID": uuid(), "EvalCreateIndex": index, "JobModifyIndex": index,
            "VolumeEvalID": "", "VolumeEvalIndex": 0, "Index": index, "LastContact": 0, "KnownLeader": true,
        })))
    }

    async fn client_allocs(&self, req: Request<Incoming>, client_cert: bool) -> Answer {
        let node = query_param(&req, "node_id").unwrap_or_default();
        self.node_check(&node_secret(&req), client_cert, &node)
            .await?;
        let rt = self.rt.lock().expect("runtime");
        let mine: Vec<&Alloc> = rt
            .store
            .allocs
            .iter()
            .filter(|a| a.node_id == node)
            .collect();
        Ok(json_resp(&mine))
    }

    async fn client_update(&self, req: Request<Incoming>, client_cert: bool) -> Answer {
        let forwarded = req.headers().contains_key(super::FORWARDED_HEADER);
        let secret = node_secret(&req);
        let body = read_body(req, 4 << 20).await?;
        let u: AllocUpdates = serde_json::from_slice(&body)
            .map_err(|e| text(400, format!("failed to decode request body: {e}")))?;
        self.node_check(&secret, client_cert, &u.node_id).await?;
        match self.write_target(forwarded) {
            WriteTarget::Here => {}
            WriteTarget::NoLeader => return Err(super::no_leader()),
            WriteTarget::Forward(t, _) => {
                // To the leader with the node secret, over this server's own mTLS client.
                for ip in t {
                    let r = self
                        .http()
                        .put(self.url(ip, ALLOCS_PATH))
                        .header(super::FORWARDED_HEADER, "1")
                        .header(NODE_SECRET_HEADER, &secret)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    if let Ok(r) = r {
                        return Err(super::relay(r, "text/plain").await);
                    }
                }
                return Err(super::no_leader());
            }
        }
        let changed = {
            let mut rt = self.rt.lock().expect("runtime");
            let changed = rt.store.update_allocs(u);
            if changed {
                self.persist(&rt.store);
            }
            changed.then(|| rt.store.clone())
        };
        if let Some(store) = changed {
            self.replicate(&store).await;
        }
        Ok(text(200, ""))
    }

    /// The plumbing routes' check: a server, a client certificate, and the node's own secret.
    async fn node_check(&self, secret: &str, client_cert: bool, node_id: &str) -> Result<(), Resp> {
        if self.cfg.server.is_none() {
            return Err(not_found());
        }
        if !client_cert {
            return Err(text(
                403,
                "Permission denied: allocation updates need a client certificate signed by tls.ca_file (mTLS)",
            ));
        }
        let rt = self.rt.lock().expect("runtime");
        match rt.store.nodes.iter().find(|n| n.id == node_id) {
            Some(n) if !secret.is_empty() && n.secret_id == secret => Ok(()),
            Some(_) => Err(text(403, "node secret ID does not match")),
            None => Err(text(404, "node not found")),
        }
    }

    /// `GET /v1/client/fs/cat/:alloc?path=`: a server forwards to the allocation's node; a client reads it.
    async fn fs_cat(&self, req: Request<Incoming>, alloc: &str) -> Answer {
        self.require_job_acl(&req).await?;
        let rel = query_param(&req, "path").unwrap_or_else(|| "/".into());
        if self.cfg.server.is_some() {
            let node = {
                let rt = self.rt.lock().expect("runtime");
                rt.store
                    .allocs
                    .iter()
                    .find(|a| a.id == alloc)
                    .and_then(|a| rt.store.nodes.iter().find(|n| n.id == a.node_id))
                    .map(|n| (n.http_addr.clone(), n.tls_enabled))
            };
            let Some((addr, tls)) = node else {
                return Err(text(404, format!("Unknown allocation \"{alloc}\"")));
            };
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            // Nomad's servers reach a client by RPC and verify its certificate's name, `client.<region>.nomad`
            // (the workers share one certificate, without their addresses): so does this forward.
            let name = format!("client.{}.nomad", self.cfg.region);
            let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
                return Err(text(404, format!("Unknown node address {addr:?}")));
            };
            let client = super::http_builder(&self.cfg)
                .and_then(|b| b.resolve(&name, sock).build().map_err(|e| e.to_string()))
                .map_err(|e| text(500, e))?;
            let host = if tls {
                name.clone()
            } else {
                sock.ip().to_string()
            };
            let mut rb = client
                .get(format!(
                    "{}://{host}:{}{pq}",
                    if tls { "https" } else { "http" },
                    sock.port()
                ))
                .timeout(Duration::from_secs(10));
            let token = token_of(&req);
            if !token.is_empty() {
                rb = rb.header("X-Nomad-Token", token);
            }
            return match rb.send().await {
                Ok(r) => Ok(super::relay(r, "text/plain").await),
                Err(e) => Err(text(
                    404,
                    format!(
                        "Unknown node: no connection to the allocation's client: {}",
                        e.without_url()
                    ),
                )),
            };
        }
        let dir = self.cfg.data_dir.join("alloc").join(alloc);
        if !is_alloc_id(alloc) || !dir.is_dir() {
            return Err(text(404, format!("Unknown allocation \"{alloc}\"")));
        }
        let rel = rel.trim_start_matches('/');
        if !rel.is_empty() && !safe_relative(rel) {
            return Err(text(400, "path escapes the allocation directory"));
        }
        match std::fs::read(dir.join(rel)) {
            Ok(b) => Ok(super::respond(200, "text/plain", Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(text(404, format!("stat {rel}: no such file or directory")))
            }
            Err(e) => Err(text(500, format!("{rel}: {e}"))),
        }
    }
}

fn node_secret(req: &Request<Incoming>) -> String {
    req.headers()
        .get(NODE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn is_alloc_id(s: &str) -> bool {
    super::is_uuid(s)
}

// ---------------------------------------------------------------------------------------------------
// The client: runs its allocations

/// A running allocation on this client.
struct Local {
    children: Vec<tokio::process::Child>,
    /// (Consul base URL, service ID) of each registered service.
    services: Vec<(String, String)>,
    consul: Option<(reqwest::Client, Option<String>)>,
    states: BTreeMap<String, TaskState>,
    status: String,
}

fn event(kind: &str, display: impl Into<String>, fails: bool) -> TaskEvent {
    let display = display.into();
    TaskEvent {
        kind: kind.into(),
        time: now_ns(),
        message: if fails {
            display.clone()
        } else {
            String::new()
        },
        display_message: display,
        fails_task: fails,
        details: BTreeMap::new(),
    }
}

/// A Vault API error, one line in the Vault client's shape.
fn vault_error(method: &str, url: &str, status: u16, body: &str) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    let errs = serde_json::from_str::<Errors>(body)
        .map(|e| e.errors)
        .unwrap_or_default();
    format!(
        "Error making API request. URL: {method} {url} Code: {status}. Errors: {}",
        errs.iter()
            .map(|e| format!("* {e}"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// How starting an allocation ended.
enum Start {
    Running(Local),
    /// Not yet (a secret missing, Vault unreachable): the events so far; looked at again later.
    Pending(BTreeMap<String, TaskState>),
    Failed(BTreeMap<String, TaskState>, String),
}

fn interpolate(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    out
}

impl Agent {
    async fn report(&self, node_id: &str, secret: &str, allocs: Vec<AllocUpdate>) {
        if allocs.is_empty() {
            return;
        }
        let body = AllocUpdates {
            node_id: node_id.into(),
            allocs,
        };
        for ip in self.servers_of_client() {
            let r = self
                .http()
                .put(self.url(ip, ALLOCS_PATH))
                .header(NODE_SECRET_HEADER, secret)
                .json(&body)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return;
            }
        }
        log("allocation update: no server took it; will report again");
    }

    async fn fetch_allocs(&self, node_id: &str, secret: &str) -> Option<Vec<Alloc>> {
        for ip in self.servers_of_client() {
            let r = self
                .http()
                .get(self.url(ip, &format!("{ALLOCS_PATH}?node_id={node_id}")))
                .header(NODE_SECRET_HEADER, secret)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if let Ok(r) = r {
                if r.status().is_success() {
                    return r.json().await.ok();
                }
            }
        }
        None
    }

    /// The client's allocation runner: polls its servers, starts and stops its allocations, reports.
    pub(super) async fn alloc_runner(self: Arc<Self>, node_id: String, secret: String) {
        let mut local: HashMap<String, Local> = HashMap::new();
        // Allocations whose start is waiting (a secret missing): their events so far.
        let mut waiting: HashMap<String, BTreeMap<String, TaskState>> = HashMap::new();
        // What was last reported per allocation (to send changes only).
        let mut reported: HashMap<String, (String, BTreeMap<String, TaskState>)> = HashMap::new();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(allocs) = self.fetch_allocs(&node_id, &secret).await else {
                continue;
            };
            let mut updates = vec![];
            for a in &allocs {
                let (status, states) = if a.desired_status == "stop" {
                    match local.remove(&a.id) {
                        Some(l) => self.stop(a, l).await,
                        None if terminal(&a.client_status) => continue,
                        None => {
                            waiting.remove(&a.id);
                            ("complete".to_string(), a.task_states.clone())
                        }
                    }
                } else if let Some(l) = local.get_mut(&a.id) {
                    // Running: did a task exit?
                    let mut exited = None;
                    for c in &mut l.children {
                        if let Ok(Some(st)) = c.try_wait() {
                            exited = Some(st);
                        }
                    }
                    if let (Some(st), "running") = (exited, l.status.as_str()) {
                        for s in l.states.values_mut() {
                            s.events.push(event(
                                "Terminated",
                                format!("Exit Code: {}", st.code().unwrap_or(-1)),
                                false,
                            ));
                            s.state = "dead".into();
                            s.failed = true;
                            s.finished_at = Some(rfc3339(time::OffsetDateTime::now_utc()));
                        }
                        l.status = "failed".into();
                    }
                    (l.status.clone(), l.states.clone())
                } else if terminal(&a.client_status) || a.client_status == "running" {
                    continue;
                } else {
                    let so_far = waiting
                        .remove(&a.id)
                        .unwrap_or_else(|| a.task_states.clone());
                    match self.start(a, so_far).await {
                        Start::Running(l) => {
                            let r = (l.status.clone(), l.states.clone());
                            local.insert(a.id.clone(), l);
                            r
                        }
                        Start::Pending(states) => {
                            waiting.insert(a.id.clone(), states.clone());
                            ("pending".into(), states)
                        }
                        Start::Failed(states, why) => {
                            log(format!("allocation {} failed: {why}", a.id));
                            ("failed".into(), states)
                        }
                    }
                };
                if reported.get(&a.id) != Some(&(status.clone(), states.clone())) {
                    reported.insert(a.id.clone(), (status.clone(), states.clone()));
                    updates.push(AllocUpdate {
                        id: a.id.clone(),
                        client_status: status,
                        client_description: String::new(),
                        task_states: states,
                    });
                }
            }
            // Allocations the servers no longer list (garbage collected) are stopped too.
            let known: Vec<&String> = allocs.iter().map(|a| &a.id).collect();
            let gone: Vec<String> = local
                .keys()
                .filter(|k| !known.contains(k))
                .cloned()
                .collect();
            for id in gone {
                if let Some(mut l) = local.remove(&id) {
                    for c in &mut l.children {
                        let _ = c.kill().await;
                    }
                    self.deregister(&l).await;
                }
            }
            reported.retain(|k, _| known.contains(&k));
            waiting.retain(|k, _| known.contains(&k));
            self.report(&node_id, &secret, updates).await;
        }
    }

    async fn deregister(&self, l: &Local) {
        if let Some((c, token)) = &l.consul {
            for (base, id) in &l.services {
                let mut rb = c.put(format!("{base}/v1/agent/service/deregister/{id}"));
                if let Some(t) = token {
                    rb = rb.header("X-Consul-Token", t);
                }
                match rb.send().await {
                    Ok(r) if r.status().is_success() => {
                        log(format!("service {id} deregistered from Consul"))
                    }
                    Ok(r) => log(format!(
                        "service {id}: Consul deregistration: HTTP {}",
                        r.status()
                    )),
                    Err(e) => log(format!("service {id}: Consul deregistration: {e}")),
                }
            }
        }
    }

    async fn stop(&self, a: &Alloc, mut l: Local) -> (String, BTreeMap<String, TaskState>) {
        self.deregister(&l).await;
        for s in l.states.values_mut() {
            s.events.push(event(
                "Killing",
                "Sent interrupt. Waiting 5s before force killing",
                false,
            ));
        }
        for c in &mut l.children {
            let _ = c.kill().await;
        }
        for s in l.states.values_mut() {
            s.events
                .push(event("Killed", "Task successfully killed", false));
            s.state = "dead".into();
            s.finished_at = Some(rfc3339(time::OffsetDateTime::now_utc()));
        }
        log(format!("allocation {} stopped", a.id));
        let status = if l.status == "failed" {
            "failed"
        } else {
            "complete"
        };
        (status.into(), l.states)
    }

    /// Starts an allocation's tasks (see the module header for the steps and the failures).
    async fn start(&self, a: &Alloc, mut states: BTreeMap<String, TaskState>) -> Start {
        let spec: JobSpec = match serde_json::from_value(a.job.clone()) {
            Ok(s) => s,
            Err(e) => return Start::Failed(states, format!("job: {e}")),
        };
        let Some(group) = spec.task_groups.iter().find(|g| g.name == a.task_group) else {
            return Start::Failed(states, format!("no task group {:?}", a.task_group));
        };
        let fresh = states.values().all(|s| s.events.is_empty());
        if fresh {
            for s in states.values_mut() {
                s.events
                    .push(event("Received", "Task received by client", false));
                s.events
                    .push(event("Task Setup", "Building Task Directory", false));
            }
        }
        let products = match Products::load(&self.cfg.jobs.sources) {
            Ok(p) => p,
            Err(e) => return Start::Failed(states, format!("configuration: {e}")),
        };
        let alloc_dir = self.cfg.data_dir.join("alloc").join(&a.id);
        let ip = self.cfg.bind.to_string();
        let mut env: BTreeMap<String, String> = BTreeMap::from([
            ("NOMAD_ALLOC_ID".into(), a.id.clone()),
            ("NOMAD_ALLOC_NAME".into(), a.name.clone()),
            ("NOMAD_JOB_ID".into(), a.job_id.clone()),
            ("NOMAD_JOB_NAME".into(), a.job_id.clone()),
            ("NOMAD_GROUP_NAME".into(), a.task_group.clone()),
            ("NOMAD_NAMESPACE".into(), a.namespace.clone()),
            ("NOMAD_DC".into(), self.cfg.datacenter.clone()),
            ("NOMAD_REGION".into(), self.cfg.region.clone()),
            (
                "NOMAD_ALLOC_DIR".into(),
                alloc_dir.join("alloc").display().to_string(),
            ),
        ]);
        for p in &a.ports {
            env.insert(format!("NOMAD_PORT_{}", p.label), p.value.to_string());
            env.insert(format!("NOMAD_HOST_PORT_{}", p.label), p.value.to_string());
            env.insert(format!("NOMAD_IP_{}", p.label), ip.clone());
            env.insert(
                format!("NOMAD_ADDR_{}", p.label),
                format!("{ip}:{}", p.value),
            );
        }
        let mut local = Local {
            children: vec![],
            services: vec![],
            consul: None,
            states: BTreeMap::new(),
            status: "running".into(),
        };
        for task in &group.tasks {
            let tdir = alloc_dir.join(&task.name);
            for d in [
                tdir.join("local"),
                tdir.join("secrets"),
                alloc_dir.join("alloc/logs"),
            ] {
                if let Err(e) = std::fs::create_dir_all(&d) {
                    return Start::Failed(states, format!("{}: {e}", d.display()));
                }
            }
            let state = states.entry(task.name.clone()).or_default();
            // Vault: log in with the task's identity.
            let mut vault: Option<(reqwest::Client, String, String)> = None;
            if let Some(v) = &task.vault {
                let fail = |state: &mut TaskState, msg: String| {
                    state.events.push(event("Killing", msg, true));
                    state.state = "dead".into();
                    state.failed = true;
                };
                let (Some(addr), Some(jwt)) =
                    (&products.vault_address, a.signed_identities.get(&task.name))
                else {
                    fail(
                        state,
                        "Vault: failed to derive vault token: no Vault address or no identity"
                            .into(),
                    );
                    return Start::Failed(states, "no Vault address or identity".into());
                };
                let client = match client_trusting(products.vault_ca.as_deref()) {
                    Ok(c) => c,
                    Err(e) => return Start::Failed(states, e),
                };
                let url = format!("{addr}/v1/auth/{}login", products.jwt_path);
                let mut body = json!({"jwt": jwt});
                if let Some(role) = &v.role {
                    body["role"] = json!(role);
                }
                match client.put(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        let v: Value = r.json().await.unwrap_or_default();
                        match v["auth"]["client_token"].as_str() {
                            Some(t) => vault = Some((client, addr.clone(), t.to_string())),
                            None => {
                                fail(state, "Vault: failed to derive vault token: no token in the login answer".into());
                                return Start::Failed(
                                    states,
                                    "login answer without a token".into(),
                                );
                            }
                        }
                    }
                    Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
                        return Start::Pending(states);
                    }
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        let e = vault_error("PUT", &url, status, &body);
                        fail(state, format!("Vault: failed to derive vault token: {e}"));
                        return Start::Failed(states, e);
                    }
                    // A Vault that does not answer is recoverable: looked at again.
                    Err(_) => return Start::Pending(states),
                }
                // The token file Nomad writes for the task.
                if let Some((_, _, t)) = &vault {
                    let _ = write_private(&tdir.join("secrets/vault_token"), t.as_bytes());
                }
            }
            // Templates.
            for tp in task.templates.iter().flatten() {
                let rendered = match parse_template(&tp.embedded_tmpl) {
                    Ok(Tmpl::Plain(s)) => s,
                    Ok(Tmpl::SecretKey { path, key }) => {
                        let Some((client, addr, token)) = &vault else {
                            state_fail(state, format!("Template failed: vault.read({path}): the task has no vault block"));
                            return Start::Failed(states, "template needs Vault".into());
                        };
                        let url = format!("{addr}/v1/{path}");
                        match client.get(&url).header("X-Vault-Token", token).send().await {
                            Ok(r) if r.status().is_success() => {
                                let v: Value = r.json().await.unwrap_or_default();
                                match v["data"]["data"][&key].as_str() {
                                    Some(s) => s.to_string(),
                                    None => "<no value>".to_string(),
                                }
                            }
                            Ok(r) if r.status().as_u16() == 404 => {
                                let msg = format!("Missing: vault.read({path})");
                                if state.events.last().map(|e| &e.display_message) != Some(&msg) {
                                    state.events.push(event("Template", msg, false));
                                }
                                return Start::Pending(states);
                            }
                            Ok(r) if r.status().is_server_error() => return Start::Pending(states),
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let body = r.text().await.unwrap_or_default();
                                let e = vault_error("GET", &url, status, &body);
                                state_fail(
                                    state,
                                    format!("Template failed: vault.read({path}): {e}"),
                                );
                                return Start::Failed(states, e);
                            }
                            Err(_) => return Start::Pending(states),
                        }
                    }
                    Err(e) => {
                        state_fail(state, format!("Template failed: {e}"));
                        return Start::Failed(states, e);
                    }
                };
                let dest = tdir.join(&tp.dest_path);
                if let Some(parent) = dest.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                if let Err(e) = std::fs::write(&dest, rendered) {
                    state_fail(state, format!("Template failed: {}: {e}", tp.dest_path));
                    return Start::Failed(states, e.to_string());
                }
            }
            // The task's process.
            let Some(cfg) = &task.config else {
                return Start::Failed(states, "no command".into());
            };
            let mut tenv = env.clone();
            tenv.insert("NOMAD_TASK_NAME".into(), task.name.clone());
            tenv.insert(
                "NOMAD_TASK_DIR".into(),
                tdir.join("local").display().to_string(),
            );
            tenv.insert(
                "NOMAD_SECRETS_DIR".into(),
                tdir.join("secrets").display().to_string(),
            );
            for (k, v) in task.env.iter().flatten() {
                tenv.insert(k.clone(), interpolate(v, &env));
            }
            let log_file = |kind: &str| {
                std::fs::File::create(alloc_dir.join(format!("alloc/logs/{}.{kind}.0", task.name)))
            };
            let (Ok(out), Ok(err)) = (log_file("stdout"), log_file("stderr")) else {
                return Start::Failed(states, "log files".into());
            };
            let mut cmd = tokio::process::Command::new(interpolate(&cfg.command, &tenv));
            cmd.args(cfg.args.iter().map(|x| interpolate(x, &tenv)))
                .current_dir(&tdir)
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .envs(&tenv)
                .stdin(std::process::Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true);
            // The task dies with the double (as Nomad's executor would be reaped with the client in the lab).
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            match cmd.spawn() {
                Ok(c) => local.children.push(c),
                Err(e) => {
                    let msg = format!("failed to launch command with executor: {e}");
                    let state = states.entry(task.name.clone()).or_default();
                    state
                        .events
                        .push(event("Driver Failure", msg.clone(), true));
                    state.failed = true;
                    state.state = "dead".into();
                    return Start::Failed(states, msg);
                }
            }
            let state = states.entry(task.name.clone()).or_default();
            state.state = "running".into();
            state.started_at = Some(rfc3339(time::OffsetDateTime::now_utc()));
            state
                .events
                .push(event("Started", "Task started by client", false));
            // Services in Consul.
            for s in task.services.iter().flatten() {
                let port = a
                    .ports
                    .iter()
                    .find(|p| p.label == s.port_label)
                    .map(|p| p.value);
                let id = format!(
                    "_nomad-task-{}-{}-{}-{}",
                    a.id, task.name, s.name, s.port_label
                );
                let checks: Vec<Value> = s
                    .checks
                    .iter()
                    .flatten()
                    .map(|c| {
                        let name = c.name.clone().unwrap_or_else(|| format!("service: \"{}\" check", s.name));
                        let secs = |ns: u64| format!("{}ms", (ns / 1_000_000).max(1));
                        let mut v = json!({"Name": name, "Interval": secs(c.interval), "Timeout": secs(c.timeout)});
                        match c.kind.as_str() {
                            "http" => {
                                v["HTTP"] = json!(format!(
                                    "http://{ip}:{}{}",
                                    port.unwrap_or(0),
                                    c.path.clone().unwrap_or_else(|| "/".into())
                                ))
                            }
                            _ => v["TCP"] = json!(format!("{ip}:{}", port.unwrap_or(0))),
                        }
                        v
                    })
                    .collect();
                let reg = json!({
                    "ID": id, "Name": s.name, "Tags": s.tags.clone().unwrap_or_default(),
                    "Address": ip, "Port": port.unwrap_or(0),
                    "Meta": {"external-source": "nomad"}, "Checks": checks,
                });
                let scheme = if products.consul_ssl { "https" } else { "http" };
                let base = format!("{scheme}://{}", products.consul_address);
                let client = match client_trusting(products.consul_ca.as_deref()) {
                    Ok(c) => c,
                    Err(e) => return Start::Failed(states, e),
                };
                let mut rb = client
                    .put(format!("{base}/v1/agent/service/register"))
                    .json(&reg);
                if let Some(t) = &products.consul_token {
                    rb = rb.header("X-Consul-Token", t);
                }
                match rb.send().await {
                    Ok(r) if r.status().is_success() => {
                        log(format!("service {id} registered with Consul"));
                        local.services.push((base, id));
                    }
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        log(format!(
                            "service {id}: Consul registration: HTTP {status}: {}",
                            body.trim()
                        ));
                    }
                    Err(e) => log(format!("service {id}: Consul registration: {e}")),
                }
                local.consul = Some((client, products.consul_token.clone()));
            }
        }
        log(format!("allocation {} ({}) running", a.id, a.name));
        local.states = states;
        Start::Running(local)
    }
}

fn state_fail(state: &mut TaskState, msg: String) {
    state.events.push(event("Killing", msg, true));
    state.state = "dead".into();
    state.failed = true;
}

fn write_private(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(p)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_plain_text_or_one_secret_key() {
        assert_eq!(
            parse_template(
                r#"{{ with secret "secret/data/default/hashistack-smoke" }}{{ .Data.data.canary }}{{ end }}"#
            ),
            Ok(Tmpl::SecretKey {
                path: "secret/data/default/hashistack-smoke".into(),
                key: "canary".into()
            })
        );
        assert_eq!(
            parse_template("{{with secret \"a/b\"}}{{.Data.data.k_1}}{{end}}"),
            Ok(Tmpl::SecretKey {
                path: "a/b".into(),
                key: "k_1".into()
            })
        );
        assert_eq!(parse_template("hello\n"), Ok(Tmpl::Plain("hello\n".into())));
        for bad in [
            "{{ key \"x\" }}",
            "{{ with secret \"a\" }}{{ .Data.data.k }}{{ end }} trailing",
            "{{ with secret \"a\" }}{{ .Data.k }}{{ end }}",
            "{{ range service \"x\" }}{{ .Address }}{{ end }}",
        ] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
    }

    fn store_with_nodes(n: usize) -> Store {
        let mut s = Store::default();
        s.keyring
            .push(crate::nomad_identity::RootKey::generate("key-1".into()));
        let now = time::OffsetDateTime::now_utc();
        for i in 0..n {
            s.register_node(
                super::super::NodeRegistration {
                    id: uuid(),
                    secret_id: uuid(),
                    name: format!("worker-{i}"),
                    datacenter: "dc1".into(),
                    node_class: String::new(),
                    http_addr: format!("10.0.0.{}:4646", 4 + i),
                    address: format!("10.0.0.{}", 4 + i),
                    tls_enabled: true,
                    version: super::super::VERSION.into(),
                },
                now,
            )
            .unwrap();
        }
        s
    }

    fn job(count: u32) -> Value {
        json!({
            "ID": "web", "Type": "service", "Datacenters": ["*"],
            "TaskGroups": [{"Name": "g", "Count": count, "Networks": [{"DynamicPorts": [{"Label": "http"}]}],
                "Tasks": [{"Name": "t", "Driver": "exec", "Config": {"command": "/bin/true"}, "Vault": {},
                    "Templates": [{"EmbeddedTmpl": "x", "DestPath": "local/x"}],
                    "Services": [{"Name": "web", "PortLabel": "http", "Provider": "consul"}]}]}]
        })
    }

    fn signer(aud: &[String]) -> Signer<'_> {
        Signer {
            aud,
            ttl: Duration::from_secs(3600),
            region: "global",
        }
    }

    #[test]
    fn the_scheduler_places_each_count_round_robin_with_ports_and_signed_vault_identities() {
        let mut s = store_with_nodes(2);
        let aud = ["vault.io".to_string()];
        let sg = signer(&aud);
        let index = s.register_job(job(2), &sg).unwrap();
        assert_eq!(s.index, index);
        assert_eq!(s.allocs.len(), 2);
        let nodes: std::collections::BTreeSet<&str> =
            s.allocs.iter().map(|a| a.node_id.as_str()).collect();
        assert_eq!(nodes.len(), 2, "one allocation on each ready node");
        for (i, a) in s.allocs.iter().enumerate() {
            assert_eq!(a.name, format!("web.g[{i}]"));
            assert_eq!(
                (a.desired_status.as_str(), a.client_status.as_str()),
                ("run", "pending")
            );
            let p = &a.ports[0];
            assert_eq!(p.label, "http");
            assert!((MIN_DYNAMIC_PORT..=MAX_DYNAMIC_PORT).contains(&p.value));
            // The task's Vault identity: Nomad's claims for this allocation, audience vault.io.
            let jwt = &a.signed_identities["t"];
            let claims: Value = serde_json::from_slice(
                &base64::Engine::decode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    jwt.split('.').nth(1).unwrap(),
                )
                .unwrap(),
            )
            .unwrap();
            assert_eq!(claims["nomad_allocation_id"], a.id);
            assert_eq!(claims["nomad_job_id"], "web");
            assert_eq!(claims["aud"], "vault.io");
            assert_eq!(claims["sub"], "global:default:web:g:t:vault_default");
            // Never in what the API shows.
            assert!(
                a.public().get("SignedIdentities").is_none()
                    && a.stub().get("SignedIdentities").is_none()
            );
        }
        assert_eq!(s.job_public("web").unwrap()["Status"], "pending");
    }

    #[test]
    fn purge_stops_the_allocations_and_they_go_once_their_client_reports_them_terminal() {
        let mut s = store_with_nodes(1);
        let aud = ["vault.io".to_string()];
        let sg = signer(&aud);
        s.register_job(job(1), &sg).unwrap();
        let (id, node) = (s.allocs[0].id.clone(), s.allocs[0].node_id.clone());
        let running = AllocUpdates {
            node_id: node.clone(),
            allocs: vec![AllocUpdate {
                id: id.clone(),
                client_status: "running".into(),
                client_description: String::new(),
                task_states: BTreeMap::new(),
            }],
        };
        assert!(s.update_allocs(running.clone()));
        assert!(
            !s.update_allocs(running),
            "the same report twice is no write"
        );
        assert_eq!(s.job_public("web").unwrap()["Status"], "running");
        // Another node cannot report on it.
        let foreign = AllocUpdates {
            node_id: uuid(),
            allocs: vec![AllocUpdate {
                id: id.clone(),
                client_status: "failed".into(),
                client_description: String::new(),
                task_states: BTreeMap::new(),
            }],
        };
        assert!(!s.update_allocs(foreign));
        s.deregister_job("web", true).unwrap();
        assert!(s.job_public("web").is_none(), "purged");
        assert_eq!(
            s.allocs[0].desired_status, "stop",
            "kept until its client stopped it"
        );
        let stopped = AllocUpdates {
            node_id: node,
            allocs: vec![AllocUpdate {
                id,
                client_status: "complete".into(),
                client_description: String::new(),
                task_states: BTreeMap::new(),
            }],
        };
        assert!(s.update_allocs(stopped));
        assert!(
            s.allocs.is_empty(),
            "a stopped, terminal allocation of a purged job is gone"
        );
    }

    #[test]
    fn no_ready_node_places_nothing_and_what_the_double_cannot_run_is_refused() {
        let mut s = store_with_nodes(0);
        let aud = ["vault.io".to_string()];
        let sg = signer(&aud);
        s.register_job(job(1), &sg).unwrap();
        assert!(s.allocs.is_empty());
        let mut docker = job(1);
        docker["TaskGroups"][0]["Tasks"][0]["Driver"] = json!("docker");
        let e = s.register_job(docker, &sg).unwrap_err();
        assert_eq!(e.0, 400);
        assert!(
            e.1.contains("driver \"docker\" is not implemented by the Nomad contract double"),
            "{}",
            e.1
        );
        let mut tmpl = job(1);
        tmpl["TaskGroups"][0]["Tasks"][0]["Templates"][0]["DestPath"] = json!("../../etc/passwd");
        assert!(s
            .register_job(tmpl, &sg)
            .unwrap_err()
            .1
            .contains("escapes the task directory"));
    }
}
