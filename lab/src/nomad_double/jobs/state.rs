//! The replicated state: jobs and allocations, and the trivial scheduler at the leader.

use super::*;

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

pub(super) fn terminal(client_status: &str) -> bool {
    matches!(client_status, "complete" | "failed" | "lost")
}

pub(super) fn now_ns() -> i64 {
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
