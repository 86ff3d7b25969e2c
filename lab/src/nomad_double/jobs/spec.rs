//! The job specification: the part of Nomad's JSON job specification the double runs, templates, validation.

use super::*;

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
        Err(ApiError(400, super::super::multierror(&errs)))
    }
}

/// A relative path with no `..`.
pub(super) fn safe_relative(p: &str) -> bool {
    let p = Path::new(p);
    !p.as_os_str().is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}
