//! The canary job, built from typed structs in the JSON job specification Nomad's HTTP API documents
//! (`PUT /v1/jobs` with `{"Job": {...}}`; field names as in Nomad's `api/jobs.go`, `api/tasks.go`,
//! `api/services.go`, `api/resources.go`; durations in nanoseconds, as Go's `time.Duration` marshals).

use crate::names::{SMOKE_JOB, SMOKE_NAMESPACE, SMOKE_SECRET_PATH};
use serde::Serialize;
use std::time::Duration;

/// The canary's group, task, port label and Consul service.
pub const GROUP: &str = "smoke";
pub const TASK: &str = "web";
pub const PORT_LABEL: &str = "http";
pub const SERVICE: &str = SMOKE_JOB;
/// Where the task's template renders the canary secret (relative to the task directory).
pub const CANARY_FILE: &str = "local/canary.txt";
/// The page the task serves (its HTTP check asks for `/`).
pub const INDEX_FILE: &str = "local/www/index.html";
pub const INDEX_PAGE: &str = "hashistack-smoke: the post-deploy canary job\n";
/// The task's command: Ubuntu images ship python3; `exec` runs it in the task directory.
pub const COMMAND: &str = "/usr/bin/python3";
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `{"Job": {...}}`, the body of `PUT /v1/jobs`.
#[derive(Debug, Serialize)]
pub struct JobRegisterRequest {
    #[serde(rename = "Job")]
    pub job: Job,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Job {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub namespace: String,
    #[serde(rename = "Type")]
    pub kind: String,
    pub datacenters: Vec<String>,
    pub task_groups: Vec<TaskGroup>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaskGroup {
    pub name: String,
    pub count: u32,
    pub networks: Vec<Network>,
    pub tasks: Vec<Task>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Network {
    pub dynamic_ports: Vec<Port>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Port {
    pub label: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Task {
    pub name: String,
    pub driver: String,
    pub config: ExecConfig,
    /// `vault {}`: the task gets a Vault token through its default workload identity and the auth method's
    /// default role.
    pub vault: Vault,
    pub templates: Vec<Template>,
    pub services: Vec<Service>,
    pub resources: Resources,
}

/// The `exec` driver's configuration (lower-case keys, as task driver configs are).
#[derive(Debug, Serialize)]
pub struct ExecConfig {
    pub command: String,
    pub args: Vec<String>,
}

/// An empty `vault {}` block: no role (the auth method's default), no policies (workload identity).
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Vault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Template {
    pub embedded_tmpl: String,
    pub dest_path: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    pub name: String,
    pub port_label: String,
    pub provider: String,
    pub checks: Vec<Check>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Check {
    #[serde(rename = "Type")]
    pub kind: String,
    pub path: String,
    /// Nanoseconds.
    pub interval: u64,
    /// Nanoseconds.
    pub timeout: u64,
}

#[derive(Debug, Serialize)]
pub struct Resources {
    #[serde(rename = "CPU")]
    pub cpu: u32,
    #[serde(rename = "MemoryMB")]
    pub memory_mb: u32,
}

/// The template that renders the canary secret (consul-template's `secret` function on the KV v2 path).
pub fn canary_template() -> String {
    format!(
        r#"{{{{ with secret "{SMOKE_SECRET_PATH}" }}}}{{{{ .Data.data.canary }}}}{{{{ end }}}}"#
    )
}

/// The canary job: a service job, one group, one task.
pub fn canary_job() -> JobRegisterRequest {
    let port = |v: &str| format!("${{NOMAD_{v}_{PORT_LABEL}}}");
    JobRegisterRequest {
        job: Job {
            id: SMOKE_JOB.into(),
            name: SMOKE_JOB.into(),
            namespace: SMOKE_NAMESPACE.into(),
            kind: "service".into(),
            datacenters: vec!["*".into()],
            task_groups: vec![TaskGroup {
                name: GROUP.into(),
                count: 1,
                networks: vec![Network {
                    dynamic_ports: vec![Port {
                        label: PORT_LABEL.into(),
                    }],
                }],
                tasks: vec![Task {
                    name: TASK.into(),
                    driver: "exec".into(),
                    config: ExecConfig {
                        command: COMMAND.into(),
                        args: [
                            "-m",
                            "http.server",
                            &port("PORT"),
                            "--bind",
                            &port("IP"),
                            "--directory",
                            "local/www",
                        ]
                        .map(String::from)
                        .to_vec(),
                    },
                    vault: Vault { role: None },
                    templates: vec![
                        Template {
                            embedded_tmpl: canary_template(),
                            dest_path: CANARY_FILE.into(),
                        },
                        Template {
                            embedded_tmpl: INDEX_PAGE.into(),
                            dest_path: INDEX_FILE.into(),
                        },
                    ],
                    services: vec![Service {
                        name: SERVICE.into(),
                        port_label: PORT_LABEL.into(),
                        provider: "consul".into(),
                        checks: vec![Check {
                            kind: "http".into(),
                            path: "/".into(),
                            interval: CHECK_INTERVAL.as_nanos() as u64,
                            timeout: CHECK_TIMEOUT.as_nanos() as u64,
                        }],
                    }],
                    resources: Resources {
                        cpu: 100,
                        memory_mb: 64,
                    },
                }],
            }],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_is_nomads_documented_json_job_specification() {
        let v = serde_json::to_value(canary_job()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"Job": {
                "ID": "hashistack-smoke", "Name": "hashistack-smoke", "Namespace": "default",
                "Type": "service", "Datacenters": ["*"],
                "TaskGroups": [{
                    "Name": "smoke", "Count": 1,
                    "Networks": [{"DynamicPorts": [{"Label": "http"}]}],
                    "Tasks": [{
                        "Name": "web", "Driver": "exec",
                        "Config": {"command": "/usr/bin/python3", "args": [
                            "-m", "http.server", "${NOMAD_PORT_http}", "--bind", "${NOMAD_IP_http}",
                            "--directory", "local/www"]},
                        "Vault": {},
                        "Templates": [
                            {"EmbeddedTmpl": "{{ with secret \"secret/data/default/hashistack-smoke\" }}{{ .Data.data.canary }}{{ end }}",
                             "DestPath": "local/canary.txt"},
                            {"EmbeddedTmpl": INDEX_PAGE, "DestPath": "local/www/index.html"}
                        ],
                        "Services": [{"Name": "hashistack-smoke", "PortLabel": "http", "Provider": "consul",
                            "Checks": [{"Type": "http", "Path": "/", "Interval": 2_000_000_000u64,
                                        "Timeout": 2_000_000_000u64}]}],
                        "Resources": {"CPU": 100, "MemoryMB": 64}
                    }]
                }]
            }})
        );
    }
}
