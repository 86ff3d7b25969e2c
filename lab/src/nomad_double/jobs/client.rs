//! The client: runs its allocations as child processes against the lab's real Vault and Consul.

use super::*;

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
    pub(in crate::nomad_double) async fn alloc_runner(
        self: Arc<Self>,
        node_id: String,
        secret: String,
    ) {
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
