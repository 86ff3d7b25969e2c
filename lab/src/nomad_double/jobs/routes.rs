//! Routes: jobs, allocations, the client fs API, and the client's plumbing (allocation poll and updates).

use super::*;

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

    pub(in crate::nomad_double) async fn jobs_route(
        &self,
        req: Request<Incoming>,
        client_cert: bool,
    ) -> Answer {
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
            WriteTarget::NoLeader => Err(super::super::no_leader()),
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
        let forwarded = req.headers().contains_key(super::super::FORWARDED_HEADER);
        let secret = node_secret(&req);
        let body = read_body(req, 4 << 20).await?;
        let u: AllocUpdates = serde_json::from_slice(&body)
            .map_err(|e| text(400, format!("failed to decode request body: {e}")))?;
        self.node_check(&secret, client_cert, &u.node_id).await?;
        match self.write_target(forwarded) {
            WriteTarget::Here => {}
            WriteTarget::NoLeader => return Err(super::super::no_leader()),
            WriteTarget::Forward(t, _) => {
                // To the leader with the node secret, over this server's own mTLS client.
                for ip in t {
                    let r = self
                        .http()
                        .put(self.url(ip, ALLOCS_PATH))
                        .header(super::super::FORWARDED_HEADER, "1")
                        .header(NODE_SECRET_HEADER, &secret)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    if let Ok(r) = r {
                        return Err(super::super::relay(r, "text/plain").await);
                    }
                }
                return Err(super::super::no_leader());
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
            let client = super::super::http_builder(&self.cfg)
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
                Ok(r) => Ok(super::super::relay(r, "text/plain").await),
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
            Ok(b) => Ok(super::super::respond(200, "text/plain", Bytes::from(b))),
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
    super::super::is_uuid(s)
}
