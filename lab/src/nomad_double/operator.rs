//! The operator and agent routes: raft configuration, `/v1/agent/self`, members, snapshots.

use super::*;

impl Agent {
    pub(super) async fn raft_configuration(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::OperatorRead).await?;
        let rt = self.rt.lock().expect("runtime");
        if rt.leader.is_none() {
            return Err(no_leader());
        }
        let servers: Vec<Value> = rt
            .alive
            .iter()
            .map(|(ip, (name, id))| {
                json!({
                    "ID": id,
                    "Node": format!("{name}.{}", self.cfg.region),
                    "Address": Self::rpc_addr(*ip),
                    "Leader": rt.leader == Some(*ip),
                    "Voter": true,
                    "RaftProtocol": "3",
                })
            })
            .collect();
        Ok(json_resp(
            &json!({"Index": rt.store.index, "Servers": servers}),
        ))
    }

    pub(super) async fn agent_self(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::AgentRead).await?;
        let rt = self.rt.lock().expect("runtime");
        let server = self.cfg.server.as_ref();
        Ok(json_resp(&json!({
            "config": {
                "Region": self.cfg.region,
                "Datacenter": self.cfg.datacenter,
                "NodeName": self.cfg.name,
                "DataDir": self.cfg.data_dir.display().to_string(),
                "BindAddr": self.cfg.bind.to_string(),
                "Version": {"Version": VERSION, "VersionPrerelease": "", "VersionMetadata": ""},
                "ACL": {"Enabled": self.cfg.acl_enabled},
                "Server": {"Enabled": server.is_some(), "BootstrapExpect": server.map(|s| s.bootstrap_expect).unwrap_or(0)},
                "Client": {"Enabled": self.cfg.client.is_some(), "NodeClass": self.cfg.client.as_ref().map(|c| c.node_class.clone()).unwrap_or_default()},
                "TLSConfig": {"EnableHTTP": self.cfg.tls.is_some()},
            },
            "member": if server.is_some() { self.member(self.cfg.bind, &self.cfg.name) } else { Value::Null },
            "stats": {
                "nomad": {
                    "server": server.is_some().to_string(),
                    "leader": (rt.leader == Some(self.cfg.bind)).to_string(),
                    "leader_addr": rt.leader.map(Self::rpc_addr).unwrap_or_default(),
                    "known_regions": "1",
                },
                "raft": {"applied_index": rt.store.index.to_string()},
            },
        })))
    }

    /// `GET /v1/operator/snapshot` (Nomad's `snapshotSaveRequest` and `Operator.SnapshotSave`): forwarded to the
    /// leader unless `?stale`; a management token (Nomad < 2.0; 2.0 added the `snapshot-save` operator
    /// capability); the body streamed with `Digest: sha-256=<base64>` of it. The body is the double's own archive
    /// (`SNAPSHOT_MAGIC` and its replicated store as JSON), not Nomad's gzipped tar: only its round trip through
    /// a restore is part of the contract.
    pub(super) async fn snapshot_save(&self, req: &Request<Incoming>) -> Answer {
        let stale = req.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|p| p == "stale" || p.starts_with("stale="))
        });
        if !stale {
            let leader = self.rt.lock().expect("runtime").leader;
            match leader {
                None => return Err(no_leader()),
                Some(l) if l != self.cfg.bind => {
                    let mut rb = self
                        .http()
                        .get(self.url(l, "/v1/operator/snapshot"))
                        .timeout(Duration::from_secs(30));
                    let token = token_of(req);
                    if !token.is_empty() {
                        rb = rb.header("X-Nomad-Token", token);
                    }
                    let Ok(r) = rb.send().await else {
                        return Err(no_leader());
                    };
                    let digest = r.headers().get("Digest").cloned();
                    let mut resp = relay(r, "text/plain").await;
                    if let Some(d) = digest {
                        resp.headers_mut().insert("Digest", d);
                    }
                    return Ok(resp);
                }
                Some(_) => {}
            }
        }
        // ACLs off: everyone may (Nomad resolves no ACL then).
        if !self
            .authz(&token_of(req))
            .await
            .map_err(api_error)?
            .management
        {
            return Err(denied());
        }
        let store = self.rt.lock().expect("runtime").store.clone();
        let mut body = SNAPSHOT_MAGIC.to_vec();
        body.extend_from_slice(&serde_json::to_vec(&store).expect("store serialises"));
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
        use base64::Engine;
        let digest = format!(
            "sha-256={}",
            base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
        );
        log(format!("snapshot saved at index {}", store.index));
        let mut resp = respond(200, "application/octet-stream", Bytes::from(body));
        resp.headers_mut().insert(
            "Digest",
            hyper::header::HeaderValue::from_str(&digest).expect("header value"),
        );
        Ok(resp)
    }

    /// `PUT|POST /v1/operator/snapshot` (Nomad's `snapshotRestoreRequest` and `Operator.SnapshotRestore`): at the
    /// leader, a management token only; an archive that does not read is 500 `failed to restore from snapshot:
    /// …` and changes nothing. The restored state takes an index above the current one (as a raft restore does),
    /// so every server adopts it.
    pub(super) async fn snapshot_restore(&self, req: Request<Incoming>) -> Answer {
        if !self
            .authz(&token_of(&req))
            .await
            .map_err(api_error)?
            .management
        {
            return Err(denied());
        }
        let w = Write::read(req, 64 << 20).await?;
        self.at_leader(&w, "/v1/operator/snapshot", &w.token)
            .await?;
        let restored: Store = w
            .body
            .strip_prefix(SNAPSHOT_MAGIC)
            .ok_or_else(|| "not a snapshot archive".to_string())
            .and_then(|b| serde_json::from_slice(b).map_err(|e| e.to_string()))
            .map_err(|e| text(500, format!("failed to restore from snapshot: {e}")))?;
        let index = self
            .commit(|s| {
                let index = s.index.max(restored.index) + 1;
                *s = restored;
                s.index = index;
                s.formed = true;
                Ok(index)
            })
            .await
            .map_err(api_error)?;
        log(format!("snapshot restored (index {index})"));
        Ok(text(200, ""))
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

    /// Nomad's `Status.Members` checks node read (not agent read).
    pub(super) async fn agent_members(&self, req: &Request<Incoming>) -> Answer {
        self.require(req, Cap::NodeRead).await?;
        let rt = self.rt.lock().expect("runtime");
        let members: Vec<Value> = rt
            .alive
            .iter()
            .map(|(ip, (name, _))| self.member(*ip, name))
            .collect();
        Ok(json_resp(&json!({
            "ServerName": format!("{}.{}", self.cfg.name, self.cfg.region),
            "ServerRegion": self.cfg.region,
            "ServerDC": self.cfg.datacenter,
            "Members": members,
        })))
    }
}
