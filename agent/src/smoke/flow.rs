//! The smoke test's calls and waits. Every wait is [`RetryPolicy::poll`] bounded by the `--timeout` deadline;
//! what each answer means (done, not yet, or a final failure) is decided by the pure `classify_*` functions.
//! Cleanup runs whatever happened before it, with a deadline of its own, so a failed smoke leaves nothing.

use super::job::{self, CANARY_FILE, TASK};
use super::report::{Outcome, Step};
use crate::names::{SMOKE_CANARY, SMOKE_JOB};
use crate::retry::{retry, Attempt, RetryError, RetryPolicy, TimeoutError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// How often a wait looks, and how long one look may take.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
pub const ATTEMPT: Duration = Duration::from_secs(5);

/// Why a step is not done. Never carries a token; product error texts are cut short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("{what}: cannot connect: {detail}")]
    Unreachable { what: &'static str, detail: String },
    #[error("{what}: HTTP {status}{}", suffix(.detail))]
    Http {
        what: &'static str,
        status: u16,
        detail: String,
    },
    #[error("{what}: the answer did not parse: {detail}")]
    Parse { what: &'static str, detail: String },
    #[error("{0}")]
    NotYet(String),
    #[error("allocation {alloc} failed: {event}")]
    AllocFailed { alloc: String, event: String },
    #[error("the rendered canary is {got:?}, not Vault's marker {want:?}")]
    Mismatch { got: String, want: &'static str },
}

fn suffix(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(": {d}")
    }
}

impl TimeoutError for StepError {
    fn timeout(after: Duration) -> Self {
        StepError::NotYet(format!("no answer within {after:?}"))
    }
}

/// The first line of an error body, at most 200 characters (Nomad and Consul answer errors in plain text).
fn first_line(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(200)
        .collect()
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// An answer's status and body.
pub type Answer = (u16, Vec<u8>);

/// The common reading of an answer: `None` for a success; 429 and 5xx are worth another look, other non-2xx
/// answers are final.
fn http_error<T>(what: &'static str, (status, body): &Answer) -> Option<Attempt<T, StepError>> {
    let e = StepError::Http {
        what,
        status: *status,
        detail: first_line(body),
    };
    match status {
        200..=299 => None,
        429 | 500..=599 => Some(Attempt::Retry(e)),
        _ => Some(Attempt::Fail(e)),
    }
}

fn parse<'a, T: Deserialize<'a>>(what: &'static str, body: &'a [u8]) -> Result<T, StepError> {
    serde_json::from_slice(body).map_err(|e| StepError::Parse {
        what,
        detail: e.to_string(),
    })
}

/// `PUT /v1/jobs`: `{"EvalID", "JobModifyIndex", ...}` on success.
pub fn classify_submit(a: &Answer) -> Attempt<u64, StepError> {
    #[derive(Deserialize)]
    struct Registered {
        #[serde(rename = "JobModifyIndex")]
        job_modify_index: u64,
    }
    if let Some(not_done) = http_error("submit", a) {
        return not_done;
    }
    match parse::<Registered>("submit", &a.1) {
        Ok(r) => Attempt::Done(r.job_modify_index),
        Err(e) => Attempt::Fail(e),
    }
}

/// An allocation as `GET /v1/job/:id/allocations` lists it (the fields the smoke reads).
#[derive(Debug, Clone, Deserialize)]
pub struct AllocStub {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "NodeName", default)]
    pub node_name: String,
    #[serde(rename = "DesiredStatus")]
    pub desired_status: String,
    #[serde(rename = "ClientStatus")]
    pub client_status: String,
    #[serde(rename = "TaskStates", default)]
    pub task_states: Option<BTreeMap<String, TaskState>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskState {
    #[serde(rename = "Events", default)]
    pub events: Option<Vec<TaskEvent>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskEvent {
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "DisplayMessage", default)]
    pub display_message: String,
}

impl AllocStub {
    /// The newest task event that says something (`<Type>: <DisplayMessage>`).
    fn last_event(&self) -> Option<String> {
        self.task_states
            .iter()
            .flat_map(|m| m.values())
            .flat_map(|s| s.events.iter().flatten())
            .rfind(|e| !e.display_message.is_empty())
            .map(|e| format!("{}: {}", e.kind, e.display_message))
    }
}

/// Until an allocation the job wants running (`DesiredStatus` `run`) is `running`: done with its ID; one that
/// `failed` (or was `lost`) is final, with its last task event; `pending` is not yet.
pub fn classify_allocations(a: &Answer) -> Attempt<AllocStub, StepError> {
    const WHAT: &str = "allocations";
    if let Some(not_done) = http_error(WHAT, a) {
        return not_done;
    }
    let allocs: Vec<AllocStub> = match parse(WHAT, &a.1) {
        Ok(v) => v,
        Err(e) => return Attempt::Fail(e),
    };
    let wanted: Vec<&AllocStub> = allocs
        .iter()
        .filter(|a| a.desired_status == "run")
        .collect();
    if let Some(r) = wanted.iter().find(|a| a.client_status == "running") {
        return Attempt::Done((*r).clone());
    }
    if let Some(f) = wanted
        .iter()
        .find(|a| matches!(a.client_status.as_str(), "failed" | "lost"))
    {
        return Attempt::Fail(StepError::AllocFailed {
            alloc: short_id(&f.id).into(),
            event: f
                .last_event()
                .unwrap_or_else(|| format!("client status {}", f.client_status)),
        });
    }
    Attempt::Retry(StepError::NotYet(match wanted.first() {
        None => "Nomad has placed no allocation yet".into(),
        Some(p) => format!(
            "allocation {} is {}{}",
            short_id(&p.id),
            p.client_status,
            p.last_event()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ),
    }))
}

/// An entry of Consul's `GET /v1/health/service/:service`.
#[derive(Debug, Deserialize)]
pub struct HealthEntry {
    #[serde(rename = "Service")]
    pub service: HealthService,
}

#[derive(Debug, Deserialize)]
pub struct HealthService {
    #[serde(rename = "ID")]
    pub id: String,
}

/// Nomad's Consul service ID for a task's service: `_nomad-task-<alloc>-<task>-<service>-<port label>`.
pub fn service_id(alloc: &str) -> String {
    format!(
        "_nomad-task-{alloc}-{TASK}-{}-{}",
        job::SERVICE,
        job::PORT_LABEL
    )
}

/// `GET /v1/health/service/hashistack-smoke?passing=true`: done once the allocation's instance is listed.
pub fn classify_passing(a: &Answer, alloc: &str) -> Attempt<(), StepError> {
    const WHAT: &str = "Consul health";
    if let Some(not_done) = http_error(WHAT, a) {
        return not_done;
    }
    let entries: Vec<HealthEntry> = match parse(WHAT, &a.1) {
        Ok(v) => v,
        Err(e) => return Attempt::Fail(e),
    };
    let want = service_id(alloc);
    if entries.iter().any(|e| e.service.id == want) {
        Attempt::Done(())
    } else {
        Attempt::Retry(StepError::NotYet(format!(
            "Consul lists {} passing instance(s) of {}, not {want}",
            entries.len(),
            job::SERVICE
        )))
    }
}

/// `GET /v1/client/fs/cat/:alloc?path=web/local/canary.txt`: the rendered marker must be Vault's. A file not
/// there yet (404, or Nomad's 500 "no such file or directory") is looked at again.
pub fn classify_canary(a: &Answer) -> Attempt<(), StepError> {
    const WHAT: &str = "read the canary file";
    let (status, body) = a;
    if *status == 404 || (*status == 500 && first_line(body).contains("no such file")) {
        return Attempt::Retry(StepError::Http {
            what: WHAT,
            status: *status,
            detail: first_line(body),
        });
    }
    if let Some(not_done) = http_error(WHAT, a) {
        return not_done;
    }
    let got = String::from_utf8_lossy(body);
    if got.trim() == SMOKE_CANARY {
        Attempt::Done(())
    } else {
        Attempt::Fail(StepError::Mismatch {
            got: got.trim().chars().take(80).collect(),
            want: SMOKE_CANARY,
        })
    }
}

/// `DELETE /v1/job/hashistack-smoke?purge=true`: done, and done too when there is no such job.
pub fn classify_purge(a: &Answer) -> Attempt<(), StepError> {
    if a.0 == 404 {
        return Attempt::Done(());
    }
    http_error("purge", a).unwrap_or(Attempt::Done(()))
}

/// Consul's `GET /v1/health/service/hashistack-smoke` (passing or not): done once it lists nothing.
pub fn classify_gone(a: &Answer) -> Attempt<(), StepError> {
    const WHAT: &str = "Consul health";
    if let Some(not_done) = http_error(WHAT, a) {
        return not_done;
    }
    match parse::<Vec<HealthEntry>>(WHAT, &a.1) {
        Ok(v) if v.is_empty() => Attempt::Done(()),
        Ok(v) => Attempt::Retry(StepError::NotYet(format!(
            "Consul still lists {} instance(s) of {}",
            v.len(),
            job::SERVICE
        ))),
        Err(e) => Attempt::Fail(e),
    }
}

/// Where the smoke test talks to (found as `status` finds them), and with what.
pub struct Target {
    pub http: reqwest::Client,
    /// `https` (tests may serve plain HTTP).
    pub scheme: &'static str,
    /// The Nomad servers (`ip:port`); each look asks them in turn until one answers.
    pub nomad: Vec<String>,
    /// The local Consul agent (`ip:port`).
    pub consul: String,
    pub consul_token: Option<Zeroizing<String>>,
}

impl Target {
    async fn send(
        &self,
        what: &'static str,
        rb: reqwest::RequestBuilder,
    ) -> Result<Answer, StepError> {
        let r = rb.send().await.map_err(|e| StepError::Unreachable {
            what,
            detail: innermost(&e),
        })?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        Ok((status, body))
    }

    /// One call to the first Nomad server that answers.
    async fn nomad(
        &self,
        what: &'static str,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, StepError> {
        let mut last = StepError::Unreachable {
            what,
            detail: "no Nomad server is published in the node records".into(),
        };
        for server in &self.nomad {
            let mut rb = self
                .http
                .request(method.clone(), format!("{}://{server}{path}", self.scheme))
                .header("X-Nomad-Token", token);
            if let Some(b) = body {
                rb = rb.json(b);
            }
            match self.send(what, rb).await {
                Ok(a) => return Ok(a),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn consul(&self, what: &'static str, path: &str) -> Result<Answer, StepError> {
        let mut rb = self
            .http
            .get(format!("{}://{}{path}", self.scheme, self.consul));
        if let Some(t) = &self.consul_token {
            rb = rb.header("X-Consul-Token", t.as_str());
        }
        self.send(what, rb).await
    }
}

/// The innermost cause of a failed request ("Connection refused"), without URLs.
fn innermost(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "no answer in time".into();
    }
    let mut src: &dyn std::error::Error = e;
    while let Some(s) = src.source() {
        src = s;
    }
    let t = src.to_string();
    match t.find(" (os error") {
        Some(i) => t[..i].to_string(),
        None => t,
    }
}

/// A transport failure is worth another look; otherwise `classify` decides.
fn judged<T>(
    r: Result<Answer, StepError>,
    classify: impl FnOnce(&Answer) -> Attempt<T, StepError>,
) -> Attempt<T, StepError> {
    match r {
        Ok(a) => classify(&a),
        Err(e) => Attempt::Retry(e),
    }
}

fn policy(deadline: Duration) -> RetryPolicy {
    RetryPolicy::poll(deadline.max(Duration::from_millis(1)), POLL_EVERY, ATTEMPT)
}

/// Why a step failed: a final answer, or the last one when its deadline passed.
#[derive(Debug, thiserror::Error)]
pub enum StepFailure {
    #[error("{0}")]
    Final(StepError),
    #[error("not done within {elapsed:.0?}: {last}")]
    Deadline { elapsed: Duration, last: StepError },
}

fn failure(e: RetryError<StepError>) -> StepFailure {
    match e {
        RetryError::Final(e) => StepFailure::Final(e),
        RetryError::Deadline { elapsed, last, .. } => StepFailure::Deadline { elapsed, last },
    }
}

/// Runs the smoke test: each step's outcome goes to `emit` as it ends. Steps after a failure are skipped,
/// except cleanup, which always runs (with `timeout` of its own).
pub async fn run(
    t: &Target,
    token: &str,
    timeout: Duration,
    emit: &mut dyn FnMut(&Outcome),
) -> Vec<Outcome> {
    let started = Instant::now();
    let left = || timeout.saturating_sub(started.elapsed());
    let mut out = vec![];
    let mut record = |step: Step, since: Instant, r: Result<Option<String>, StepFailure>| {
        let o = Outcome {
            step,
            ok: r.is_ok(),
            ms: since.elapsed().as_millis() as u64,
            detail: r.unwrap_or_else(|e| Some(e.to_string())),
        };
        emit(&o);
        let ok = o.ok;
        out.push(o);
        ok
    };
    let spec = serde_json::to_value(job::canary_job()).expect("the job serialises");
    let get = reqwest::Method::GET;

    // 1. Submit.
    let since = Instant::now();
    let submitted = retry(policy(left()), |_| async {
        judged(
            t.nomad(
                "submit",
                token,
                reqwest::Method::PUT,
                "/v1/jobs",
                Some(&spec),
            )
            .await,
            classify_submit,
        )
    })
    .await;
    let mut green = record(
        Step::Submit,
        since,
        submitted.map(|_| None).map_err(failure),
    );

    // 2. An allocation runs.
    let mut alloc: Option<AllocStub> = None;
    if green {
        let since = Instant::now();
        let path = format!("/v1/job/{SMOKE_JOB}/allocations");
        let r = retry(policy(left()), |_| async {
            judged(
                t.nomad("allocations", token, get.clone(), &path, None)
                    .await,
                classify_allocations,
            )
        })
        .await;
        let detail = r.as_ref().ok().map(|a| {
            let on = if a.node_name.is_empty() {
                String::new()
            } else {
                format!(" on {}", a.node_name)
            };
            format!("allocation {}{on}", short_id(&a.id))
        });
        alloc = r.as_ref().ok().cloned();
        green = record(Step::Running, since, r.map(|_| detail).map_err(failure));
    }

    // 3. Its service is registered and passing in Consul.
    if let (true, Some(a)) = (green, &alloc) {
        let since = Instant::now();
        let path = format!("/v1/health/service/{}?passing=true", job::SERVICE);
        let r = retry(policy(left()), |_| async {
            judged(t.consul("Consul health", &path).await, |x| {
                classify_passing(x, &a.id)
            })
        })
        .await;
        green = record(Step::Passing, since, r.map(|_| None).map_err(failure));
    }

    // 4. The template rendered the Vault secret.
    if let (true, Some(a)) = (green, &alloc) {
        let since = Instant::now();
        let path = format!("/v1/client/fs/cat/{}?path={TASK}/{CANARY_FILE}", a.id);
        let r = retry(policy(left()), |_| async {
            judged(
                t.nomad("read the canary file", token, get.clone(), &path, None)
                    .await,
                classify_canary,
            )
        })
        .await;
        record(Step::Secret, since, r.map(|_| None).map_err(failure));
    }

    // 5. Cleanup, always.
    let since = Instant::now();
    let purge_path = format!("/v1/job/{SMOKE_JOB}?purge=true");
    let purged = retry(policy(timeout), |_| async {
        judged(
            t.nomad("purge", token, reqwest::Method::DELETE, &purge_path, None)
                .await,
            classify_purge,
        )
    })
    .await;
    let cleaned = match purged {
        Err(e) => Err(failure(e)),
        Ok(()) => {
            let path = format!("/v1/health/service/{}", job::SERVICE);
            retry(policy(timeout.saturating_sub(since.elapsed())), |_| async {
                judged(t.consul("Consul health", &path).await, classify_gone)
            })
            .await
            .map_err(failure)
        }
    };
    record(Step::Cleanup, since, cleaned.map(|_| None));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(status: u16, v: serde_json::Value) -> Answer {
        (status, v.to_string().into_bytes())
    }

    fn alloc(
        id: &str,
        desired: &str,
        client: &str,
        events: serde_json::Value,
    ) -> serde_json::Value {
        json!({"ID": id, "NodeName": "worker-0", "DesiredStatus": desired, "ClientStatus": client,
               "TaskStates": {"web": {"State": "pending", "Failed": client == "failed", "Events": events}}})
    }

    #[test]
    fn submit_is_done_on_nomads_answer_retried_on_5xx_and_final_on_a_refusal() {
        let ok = answer(
            200,
            json!({"EvalID": "e", "EvalCreateIndex": 9, "JobModifyIndex": 9, "Warnings": ""}),
        );
        assert!(matches!(classify_submit(&ok), Attempt::Done(9)));
        assert!(matches!(
            classify_submit(&(500, b"No cluster leader".to_vec())),
            Attempt::Retry(_)
        ));
        match classify_submit(&(403, b"Permission denied".to_vec())) {
            Attempt::Fail(e) => assert_eq!(e.to_string(), "submit: HTTP 403: Permission denied"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn allocations_running_is_done_pending_is_not_yet_failed_is_final_with_its_event() {
        let id = "1a2b3c4d-0000-4000-8000-000000000000";
        let none = answer(200, json!([]));
        assert!(matches!(
            classify_allocations(&none),
            Attempt::Retry(StepError::NotYet(_))
        ));
        let pending = answer(
            200,
            json!([alloc(
                id,
                "run",
                "pending",
                json!([{"Type": "Received", "DisplayMessage": "Task received by client"}])
            )]),
        );
        match classify_allocations(&pending) {
            Attempt::Retry(StepError::NotYet(m)) => {
                assert_eq!(
                    m,
                    "allocation 1a2b3c4d is pending (Received: Task received by client)"
                )
            }
            other => panic!("{other:?}"),
        }
        let running = answer(
            200,
            json!([
                alloc("old", "stop", "complete", json!([])),
                alloc(id, "run", "running", json!([]))
            ]),
        );
        assert!(matches!(classify_allocations(&running), Attempt::Done(a) if a.id == id));
        let failed = answer(
            200,
            json!([alloc(
                id,
                "run",
                "failed",
                json!([
                    {"Type": "Received", "DisplayMessage": "Task received by client"},
                    {"Type": "Killing", "DisplayMessage": "Template failed: vault.read(secret/data/default/hashistack-smoke): permission denied"}
                ])
            )]),
        );
        match classify_allocations(&failed) {
            Attempt::Fail(e) => assert_eq!(
                e.to_string(),
                "allocation 1a2b3c4d failed: Killing: Template failed: vault.read(secret/data/default/hashistack-smoke): permission denied"
            ),
            other => panic!("{other:?}"),
        }
        // A stopped allocation of an earlier run is not this run's failure.
        let stale = answer(200, json!([alloc(id, "stop", "failed", json!([]))]));
        assert!(matches!(classify_allocations(&stale), Attempt::Retry(_)));
        assert!(matches!(
            classify_allocations(&(403, b"Permission denied".to_vec())),
            Attempt::Fail(_)
        ));
    }

    #[test]
    fn passing_needs_this_allocations_instance_and_gone_needs_none() {
        let id = "1a2b3c4d-0000-4000-8000-000000000000";
        let mine = answer(200, json!([{"Service": {"ID": service_id(id)}}]));
        assert_eq!(
            service_id(id),
            format!("_nomad-task-{id}-web-hashistack-smoke-http")
        );
        assert!(matches!(classify_passing(&mine, id), Attempt::Done(())));
        let other = answer(200, json!([{"Service": {"ID": service_id("other")}}]));
        assert!(matches!(classify_passing(&other, id), Attempt::Retry(_)));
        assert!(matches!(
            classify_passing(&answer(200, json!([])), id),
            Attempt::Retry(_)
        ));
        assert!(matches!(
            classify_passing(&(403, b"Permission denied".to_vec()), id),
            Attempt::Fail(_)
        ));
        assert!(matches!(
            classify_gone(&answer(200, json!([]))),
            Attempt::Done(())
        ));
        assert!(matches!(classify_gone(&mine), Attempt::Retry(_)));
    }

    #[test]
    fn the_canary_must_be_vaults_marker() {
        assert!(matches!(
            classify_canary(&(200, format!("{SMOKE_CANARY}\n").into_bytes())),
            Attempt::Done(())
        ));
        assert!(matches!(
            classify_canary(&(200, b"<no value>".to_vec())),
            Attempt::Fail(StepError::Mismatch { .. })
        ));
        assert!(matches!(
            classify_canary(&(
                500,
                b"stat web/local/canary.txt: no such file or directory".to_vec()
            )),
            Attempt::Retry(_)
        ));
        assert!(matches!(
            classify_canary(&(403, b"Permission denied".to_vec())),
            Attempt::Fail(_)
        ));
    }

    #[test]
    fn purge_of_a_job_that_is_not_there_is_clean() {
        assert!(matches!(
            classify_purge(&(404, b"job not found".to_vec())),
            Attempt::Done(())
        ));
        assert!(matches!(
            classify_purge(&answer(200, json!({"EvalID": ""}))),
            Attempt::Done(())
        ));
        assert!(matches!(classify_purge(&(500, vec![])), Attempt::Retry(_)));
        assert!(matches!(classify_purge(&(403, vec![])), Attempt::Fail(_)));
    }

    /// A fake of the few Nomad and Consul routes smoke calls (shapes as in the tests above), on plain HTTP.
    mod fake {
        use axum::extract::{Path, State};
        use axum::http::{HeaderMap, StatusCode, Uri};
        use axum::routing::{delete, get, put};
        use axum::Router;
        use std::sync::{Arc, Mutex};

        pub const TOKEN: &str = "nomad-management-token";
        pub const ALLOC: &str = "1a2b3c4d-0000-4000-8000-000000000000";

        #[derive(Default)]
        pub struct World {
            /// The allocation's client status (`running`, `failed`).
            pub client_status: String,
            pub submitted: u32,
            pub purges: Vec<String>,
            pub registered: bool,
            pub alloc_looks: u32,
        }
        pub type Shared = Arc<Mutex<World>>;

        fn ok(h: &HeaderMap) -> bool {
            h.get("X-Nomad-Token").and_then(|v| v.to_str().ok()) == Some(TOKEN)
        }

        pub async fn serve(w: Shared) -> String {
            let app = Router::new()
                .route(
                    "/v1/jobs",
                    put(|State(w): State<Shared>, h: HeaderMap| async move {
                        if !ok(&h) {
                            return (StatusCode::FORBIDDEN, "Permission denied".to_string());
                        }
                        let mut w = w.lock().unwrap();
                        w.submitted += 1;
                        w.registered = w.client_status == "running";
                        (StatusCode::OK, r#"{"EvalID":"e","EvalCreateIndex":7,"JobModifyIndex":7,"Warnings":""}"#.to_string())
                    }),
                )
                .route(
                    "/v1/job/{id}/allocations",
                    get(|State(w): State<Shared>| async move {
                        let mut w = w.lock().unwrap();
                        w.alloc_looks += 1;
                        let events = if w.client_status == "failed" {
                            r#"[{"Type":"Killing","DisplayMessage":"Vault: failed to derive vault token: role \"nomad-workloads\" could not be found"}]"#
                        } else {
                            "[]"
                        };
                        format!(
                            r#"[{{"ID":"{ALLOC}","NodeName":"w0","DesiredStatus":"run","ClientStatus":"{}","TaskStates":{{"web":{{"Events":{events}}}}}}}]"#,
                            w.client_status
                        )
                    }),
                )
                .route(
                    "/v1/job/{id}",
                    delete(|State(w): State<Shared>, uri: Uri| async move {
                        let mut w = w.lock().unwrap();
                        w.purges.push(uri.query().unwrap_or("").to_string());
                        w.registered = false;
                        r#"{"EvalID":"e2"}"#
                    }),
                )
                .route(
                    "/v1/health/service/{name}",
                    get(|State(w): State<Shared>, Path(_n): Path<String>| async move {
                        if w.lock().unwrap().registered {
                            format!(r#"[{{"Service":{{"ID":"_nomad-task-{ALLOC}-web-hashistack-smoke-http"}}}}]"#)
                        } else {
                            "[]".to_string()
                        }
                    }),
                )
                .route(
                    "/v1/client/fs/cat/{id}",
                    get(|| async { format!("{}\n", crate::names::SMOKE_CANARY) }),
                )
                .with_state(w);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
            addr
        }
    }

    async fn run_against(status: &str) -> (Vec<Outcome>, Vec<String>, fake::Shared) {
        let w: fake::Shared = Default::default();
        w.lock().unwrap().client_status = status.into();
        let addr = fake::serve(w.clone()).await;
        let t = Target {
            http: reqwest::Client::new(),
            scheme: "http",
            nomad: vec!["127.0.0.1:1".into(), addr.clone()],
            consul: addr,
            consul_token: None,
        };
        let mut lines = vec![];
        let out = run(&t, fake::TOKEN, Duration::from_secs(10), &mut |o| {
            lines.push(crate::smoke::report::line(o))
        })
        .await;
        (out, lines, w)
    }

    #[tokio::test]
    async fn a_green_run_walks_every_step_and_purges() {
        let (out, lines, w) = run_against("running").await;
        let steps: Vec<(Step, bool)> = out.iter().map(|o| (o.step, o.ok)).collect();
        assert_eq!(
            steps,
            [
                (Step::Submit, true),
                (Step::Running, true),
                (Step::Passing, true),
                (Step::Secret, true),
                (Step::Cleanup, true)
            ],
            "{lines:?}"
        );
        assert_eq!(lines.len(), 5, "each step is emitted as it ends");
        assert_eq!(w.lock().unwrap().purges, ["purge=true"]);
    }

    #[tokio::test]
    async fn a_failed_allocation_is_final_named_and_still_cleaned_up() {
        let (out, lines, w) = run_against("failed").await;
        let steps: Vec<(Step, bool)> = out.iter().map(|o| (o.step, o.ok)).collect();
        assert_eq!(
            steps,
            [
                (Step::Submit, true),
                (Step::Running, false),
                (Step::Cleanup, true)
            ],
            "{lines:?}"
        );
        assert!(
            lines[1].contains(
                "allocation 1a2b3c4d failed: Killing: Vault: failed to derive vault token"
            ),
            "{lines:?}"
        );
        let w = w.lock().unwrap();
        assert_eq!(
            w.alloc_looks, 1,
            "a failed allocation is final: no second look"
        );
        assert_eq!(w.purges, ["purge=true"], "cleanup ran after the failure");
    }

    #[tokio::test]
    async fn a_refused_token_fails_the_submit_and_cleanup_still_runs() {
        let w: fake::Shared = Default::default();
        let addr = fake::serve(w.clone()).await;
        let t = Target {
            http: reqwest::Client::new(),
            scheme: "http",
            nomad: vec![addr.clone()],
            consul: addr,
            consul_token: None,
        };
        let out = run(&t, "wrong", Duration::from_secs(5), &mut |_| {}).await;
        assert_eq!(out.len(), 2);
        assert!(!out[0].ok);
        assert_eq!(
            out[0].detail.as_deref(),
            Some("submit: HTTP 403: Permission denied")
        );
        assert_eq!(out[1].step, Step::Cleanup);
        assert_eq!(w.lock().unwrap().submitted, 0);
    }
}
