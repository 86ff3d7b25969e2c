//! Client nodes: their documents, registration and heartbeats (server side), and the client's loop.

use super::*;

/// A node event (`Events` of `GET /v1/node/:id`; the last 10 are kept, as in Nomad).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "Subsystem")]
    pub subsystem: String,
    #[serde(rename = "Timestamp")]
    pub timestamp: String,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
}

/// A client node as the store keeps it (with its secret, which the API never shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Datacenter")]
    pub datacenter: String,
    #[serde(rename = "NodeClass")]
    pub node_class: String,
    #[serde(rename = "NodePool")]
    pub node_pool: String,
    #[serde(rename = "HTTPAddr")]
    pub http_addr: String,
    /// The node's IP (`Address` of the list stub).
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "TLSEnabled")]
    pub tls_enabled: bool,
    /// The client agent's version (`Attributes["nomad.version"]`, `Version` of the stub).
    #[serde(rename = "Version")]
    pub version: String,
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "StatusDescription")]
    pub status_description: String,
    #[serde(rename = "StatusUpdatedAt")]
    pub status_updated_at: i64,
    #[serde(rename = "Drain")]
    pub drain: bool,
    #[serde(rename = "SchedulingEligibility")]
    pub scheduling_eligibility: String,
    #[serde(rename = "Events")]
    pub events: Vec<NodeEvent>,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
}

impl Node {
    pub(super) fn push_event(&mut self, msg: &str, now: time::OffsetDateTime, index: u64) {
        self.events.push(NodeEvent {
            message: msg.into(),
            subsystem: "Cluster".into(),
            timestamp: rfc3339(now),
            create_index: index,
        });
        let n = self.events.len();
        if n > 10 {
            self.events.drain(..n - 10);
        }
    }

    /// `GET /v1/nodes` entry (`NodeListStub`).
    pub fn stub(&self) -> Value {
        json!({
            "Address": self.address,
            "ID": self.id,
            "Datacenter": self.datacenter,
            "Name": self.name,
            "NodeClass": self.node_class,
            "NodePool": self.node_pool,
            "Version": self.version,
            "Drain": self.drain,
            "SchedulingEligibility": self.scheduling_eligibility,
            "Status": self.status,
            "StatusDescription": self.status_description,
            "Drivers": {},
            "HostVolumes": {},
            "LastDrain": null,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        })
    }

    /// `GET /v1/node/:id` (sanitized: no `SecretID`, as Nomad's `Node.Sanitize`).
    pub fn public(&self) -> Value {
        json!({
            "ID": self.id,
            "Name": self.name,
            "Datacenter": self.datacenter,
            "NodeClass": self.node_class,
            "NodePool": self.node_pool,
            "HTTPAddr": self.http_addr,
            "TLSEnabled": self.tls_enabled,
            "Attributes": {
                "nomad.version": self.version,
                "unique.hostname": self.name,
                "unique.network.ip-address": self.address,
                "kernel.name": "linux",
            },
            "Meta": {},
            "Drain": self.drain,
            "DrainStrategy": null,
            "SchedulingEligibility": self.scheduling_eligibility,
            "Status": self.status,
            "StatusDescription": self.status_description,
            "StatusUpdatedAt": self.status_updated_at,
            "Events": self.events,
            "Drivers": {},
            "HostVolumes": {},
            "LastDrain": null,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        })
    }
}

/// What a client sends to `PUT /v1/double/node`: its node, at registration and with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Datacenter")]
    pub datacenter: String,
    #[serde(rename = "NodeClass")]
    pub node_class: String,
    #[serde(rename = "HTTPAddr")]
    pub http_addr: String,
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "TLSEnabled")]
    pub tls_enabled: bool,
    #[serde(rename = "Version")]
    pub version: String,
}

/// The ID and secret of this client node: read from `<data_dir>/client`, created (0600) the first time.
pub fn client_identity(data_dir: &Path) -> Result<(String, String), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = data_dir.join("client");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let read_or_create = |name: &str| -> Result<String, String> {
        let p = dir.join(name);
        if let Ok(s) = std::fs::read_to_string(&p) {
            let s = s.trim().to_string();
            if is_uuid(&s) {
                return Ok(s);
            }
        }
        let id = uuid();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        use std::io::Write;
        f.write_all(id.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(id)
    };
    Ok((
        read_or_create(CLIENT_ID_FILE)?,
        read_or_create(CLIENT_SECRET_FILE)?,
    ))
}

impl Agent {
    pub(super) async fn node_list(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::NodeRead).await?;
        let prefix = query_param(req, "prefix").unwrap_or_default();
        let rt = self.rt.lock().expect("runtime");
        let mut nodes: Vec<&Node> = rt
            .store
            .nodes
            .iter()
            .filter(|n| n.id.starts_with(&prefix))
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(json_resp(
            &nodes.iter().map(|n| n.stub()).collect::<Vec<_>>(),
        ))
    }

    pub(super) async fn node_get(&self, req: &Request<Incoming>, id: &str) -> Answer {
        self.require(req, Cap::NodeRead).await?;
        let rt = self.rt.lock().expect("runtime");
        match rt.store.nodes.iter().find(|n| n.id == id) {
            Some(n) => Ok(json_resp(&n.public())),
            None => Err(text(404, "node not found")),
        }
    }

    /// A client's registration or heartbeat (the stand-in for `Node.Register`/`Node.UpdateStatus`): only
    /// over a TLS connection whose client certificate `tls.ca_file` signed; applied at the leader.
    pub(super) async fn node_register(&self, req: Request<Incoming>, client_cert: bool) -> Answer {
        let Some(server) = &self.cfg.server else {
            return Err(not_found());
        };
        if !client_cert {
            return Err(text(
                403,
                "Permission denied: node registration needs a client certificate signed by tls.ca_file (mTLS)",
            ));
        }
        let w = Write::read(req, 1 << 20).await?;
        let reg: NodeRegistration = serde_json::from_slice(&w.body)
            .map_err(|e| text(400, format!("failed to decode request body: {e}")))?;
        self.at_leader(&w, NODE_PATH, "").await?;
        let (name, id) = (reg.name.clone(), reg.id.clone());
        let now = time::OffsetDateTime::now_utc();
        let (changed, store, status, count) = {
            let mut rt = self.rt.lock().expect("runtime");
            let before = rt
                .store
                .nodes
                .iter()
                .find(|n| n.id == id)
                .map(|n| n.status.clone());
            let changed = rt.store.register_node(reg, now).map_err(api_error)?;
            rt.heartbeats.insert(id.clone(), Instant::now());
            if changed {
                self.persist(&rt.store);
            }
            (changed, rt.store.clone(), before, rt.store.nodes.len())
        };
        if changed {
            self.replicate(&store).await;
            log(match status.as_deref() {
                None => format!("node {name} ({id}) registered: ready"),
                Some("down") => format!("node {name} ({id}) heartbeat after down: ready"),
                _ => format!("node {name} ({id}) updated"),
            });
        }
        Ok(json_resp(&json!({
            "HeartbeatTTL": server.min_heartbeat_ttl.as_nanos() as u64,
            "LeaderRPCAddr": Self::rpc_addr(self.cfg.bind),
            "NumNodes": count,
            "Index": store.index,
        })))
    }

    /// A client's node document (sent with every heartbeat).
    fn registration(&self, id: &str, secret: &str) -> NodeRegistration {
        NodeRegistration {
            id: id.into(),
            secret_id: secret.into(),
            name: self.cfg.name.clone(),
            datacenter: self.cfg.datacenter.clone(),
            node_class: self
                .cfg
                .client
                .as_ref()
                .map(|c| c.node_class.clone())
                .unwrap_or_default(),
            http_addr: SocketAddr::new(self.cfg.bind, self.cfg.http_port).to_string(),
            address: self.cfg.bind.to_string(),
            tls_enabled: self.cfg.tls.is_some(),
            version: VERSION.into(),
        }
    }

    /// The client's side: register, then heartbeat every HeartbeatTTL/2, with the first server that
    /// answers (the servers forward to their leader).
    pub(super) async fn client_loop(self: Arc<Self>, id: String, secret: String) {
        let servers = self.servers_of_client();
        let reg = self.registration(&id, &secret);
        let mut registered = false;
        let mut last_error = String::new();
        loop {
            let mut next = Duration::from_secs(1);
            let mut error = None;
            for ip in &servers {
                let r = self
                    .http()
                    .put(self.url(*ip, NODE_PATH))
                    .json(&reg)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let v: Value = r.json().await.unwrap_or_default();
                        let ttl = v["HeartbeatTTL"].as_u64().unwrap_or(2_000_000_000);
                        next = (Duration::from_nanos(ttl) / 2)
                            .clamp(Duration::from_millis(50), Duration::from_secs(30));
                        error = None;
                        break;
                    }
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        error = Some(format!("{ip}: HTTP {status}: {}", body.trim()));
                    }
                    Err(e) => error = Some(format!("{ip}: {e}")),
                }
            }
            match error {
                None if !registered => {
                    registered = true;
                    last_error.clear();
                    log(format!(
                        "node registration complete (node {id}, heartbeat every {next:?})"
                    ));
                }
                None => {}
                Some(e) if e != last_error => {
                    if registered {
                        log(format!("heartbeat failed: {e}"));
                    } else {
                        log(format!("node registration failed: {e}"));
                    }
                    registered = false;
                    last_error = e;
                }
                Some(_) => {}
            }
            tokio::time::sleep(next).await;
        }
    }
}
