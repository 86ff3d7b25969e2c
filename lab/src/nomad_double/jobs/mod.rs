//! Jobs and allocations in the **Nomad contract double** (a child module of lab/src/nomad_double/): the
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

//!
//! Where things are: this file holds the configuration the jobs need; `spec.rs` the job specification, its
//! templates and validation; `state.rs` jobs and allocations in the replicated store and the scheduler;
//! `routes.rs` the job, allocation and fs routes and the plumbing; `client.rs` the client that runs
//! allocations; `tests.rs` the scheduler, purge and refusals.

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

mod client;
mod routes;
mod spec;
mod state;
#[cfg(test)]
mod tests;

pub use routes::*;
pub use spec::*;
pub use state::*;

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
