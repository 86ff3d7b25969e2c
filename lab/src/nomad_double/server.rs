//! The servers' plumbing: polling peers, the leader, heartbeats, forwarding, replication, authorization and routing.

use super::*;

impl Agent {
    pub(super) fn rpc_addr(ip: IpAddr) -> String {
        SocketAddr::new(ip, RPC_PORT).to_string()
    }

    pub(super) fn url(&self, ip: IpAddr, path: &str) -> String {
        format!(
            "{}://{}{path}",
            self.cfg.scheme(),
            SocketAddr::new(ip, self.cfg.http_port)
        )
    }

    pub(super) fn http(&self) -> reqwest::Client {
        self.http.lock().expect("http client").clone()
    }

    pub(super) fn servers_of_client(&self) -> Vec<IpAddr> {
        self.cfg
            .client
            .as_ref()
            .map(|c| c.servers.clone())
            .unwrap_or_default()
    }

    pub(super) fn reset_file(&self) -> Option<u64> {
        let p = self.cfg.data_dir.join("server").join(RESET_FILE);
        let raw = std::fs::read_to_string(&p).ok()?;
        match raw.trim().parse::<u64>() {
            Ok(n) => {
                log(format!(
                    "bootstrap file parsed: {} (reset index {n})",
                    p.display()
                ));
                Some(n)
            }
            Err(_) => {
                log(format!("failed to parse bootstrap file {}", p.display()));
                None
            }
        }
    }

    pub(super) fn persist(&self, store: &Store) {
        if let Err(e) = store.save(&self.state_file) {
            log(format!("could not persist state: {e}"));
        }
    }

    /// One round of the stand-in for serf and raft: poll the peers, adopt the newest state, elect.
    pub(super) async fn poll_peers(self: &Arc<Self>) {
        let Some(server) = &self.cfg.server else {
            return;
        };
        let mut set = tokio::task::JoinSet::new();
        for ip in &server.peers {
            let (me, ip) = (self.clone(), *ip);
            let key = server.encrypt.clone().unwrap_or_default();
            set.spawn(async move {
                let r = me
                    .http()
                    .get(me.url(ip, PEER_PATH))
                    .header(PEER_KEY_HEADER, key)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .ok()?;
                if !r.status().is_success() {
                    return None;
                }
                r.json::<PeerView>().await.ok()
            });
        }
        let mut views = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(Some(v)) = r {
                views.push(v);
            }
        }
        let mut rt = self.rt.lock().expect("runtime");
        let mut alive = BTreeMap::new();
        alive.insert(self.cfg.bind, (self.cfg.name.clone(), self.raft_id.clone()));
        let mut adopt: Option<Store> = None;
        for v in views {
            if v.store.index > adopt.as_ref().unwrap_or(&rt.store).index {
                adopt = Some(v.store.clone());
            }
            alive.insert(v.addr, (v.name, v.id));
        }
        if let Some(s) = adopt {
            log(format!("replicated state at index {} from a peer", s.index));
            rt.store = s;
            self.persist(&rt.store);
        }
        let quorum = if rt.store.formed {
            server.bootstrap_expect / 2 + 1
        } else {
            server.bootstrap_expect
        };
        let leader = (alive.len() >= quorum)
            .then(|| alive.keys().next().copied())
            .flatten();
        if leader.is_some() && !rt.store.formed {
            rt.store.formed = true;
            rt.store.index += 1;
            self.persist(&rt.store);
        }
        // Nomad's leader initializes the keyring as it establishes leadership, in the background: leadership
        // (and with it the ACL bootstrap) does not wait for the key (nomad/leader.go, establishLeadership:
        // `go s.initializeKeyring(stopCh)`). Followers adopt it with the rest of the state.
        if leader == Some(self.cfg.bind) && rt.store.keyring.is_empty() && !rt.keyring_pending {
            rt.keyring_pending = true;
            tokio::spawn(self.clone().initialize_keyring());
        }
        if leader != rt.leader {
            match leader {
                Some(l) => log(format!(
                    "cluster leader is {} ({} of {} servers answering)",
                    Self::rpc_addr(l),
                    alive.len(),
                    server.peers.len() + 1
                )),
                None => log(format!(
                    "no cluster leader: {} of {} servers answering, {quorum} needed",
                    alive.len(),
                    server.peers.len() + 1
                )),
            }
        }
        rt.leader = leader;
        rt.alive = alive;
    }

    /// Leader only, in the background: makes the first root key and writes it, unless this server lost the
    /// leadership meanwhile or a key exists by then (as Nomad's `initializeKeyring`).
    async fn initialize_keyring(self: Arc<Self>) {
        let keygen = self.keygen;
        let key = tokio::task::spawn_blocking(move || keygen(uuid())).await;
        let mut rt = self.rt.lock().expect("runtime");
        rt.keyring_pending = false;
        let Ok(key) = key else {
            log("could not initialize keyring: the key generation failed");
            return;
        };
        if rt.leader == Some(self.cfg.bind) && rt.store.keyring.is_empty() {
            rt.store.keyring.push(key);
            rt.store.index += 1;
            self.persist(&rt.store);
            log("keyring initialized: a new root key signs workload identities");
        }
    }

    /// Leader only: marks `down` every node whose last heartbeat is older than TTL + grace. A server that
    /// just became leader first gives every node a full TTL from now (Nomad's failover grace).
    pub(super) async fn check_heartbeats(&self) {
        let Some(server) = &self.cfg.server else {
            return;
        };
        let limit = server.min_heartbeat_ttl + server.heartbeat_grace;
        let (downed, store) = {
            let mut rt = self.rt.lock().expect("runtime");
            if rt.leader != Some(self.cfg.bind) {
                rt.heartbeats.clear();
                rt.was_leader = false;
                return;
            }
            let now = Instant::now();
            if !rt.was_leader {
                rt.was_leader = true;
                let ids: Vec<String> = rt.store.nodes.iter().map(|n| n.id.clone()).collect();
                for id in ids {
                    rt.heartbeats.insert(id, now);
                }
            }
            let expired: Vec<(String, String)> = rt
                .store
                .nodes
                .iter()
                .filter(|n| n.status != "down")
                .filter(|n| {
                    rt.heartbeats
                        .get(&n.id)
                        .is_some_and(|t| now.duration_since(*t) > limit)
                })
                .map(|n| (n.id.clone(), n.name.clone()))
                .collect();
            // A node the map does not know (registered through another leader) starts its TTL now.
            let unknown: Vec<String> = rt
                .store
                .nodes
                .iter()
                .filter(|n| !rt.heartbeats.contains_key(&n.id))
                .map(|n| n.id.clone())
                .collect();
            for id in unknown {
                rt.heartbeats.insert(id, now);
            }
            let wall = time::OffsetDateTime::now_utc();
            let mut downed = Vec::new();
            for (id, name) in expired {
                if rt.store.mark_down(&id, wall) {
                    downed.push(name);
                }
            }
            if downed.is_empty() {
                return;
            }
            self.persist(&rt.store);
            (downed, rt.store.clone())
        };
        for name in &downed {
            log(format!(
                "node {name}: heartbeat missed for more than {limit:?}; marked down"
            ));
        }
        self.replicate(&store).await;
    }

    /// Forwards a request (method, path and query, token, body) to the first target that answers and
    /// relays its answer; `mark`: as forwarded (a server to its leader), so that it is not forwarded again.
    pub(super) async fn forward(
        &self,
        targets: &[IpAddr],
        mark: bool,
        method: &Method,
        path_and_query: &str,
        token: &str,
        body: Bytes,
    ) -> Resp {
        for ip in targets {
            let mut rb = self
                .http()
                .request(method.clone(), self.url(*ip, path_and_query))
                .timeout(Duration::from_secs(30));
            if mark {
                rb = rb.header(FORWARDED_HEADER, "1");
            }
            if !token.is_empty() {
                rb = rb.header("X-Nomad-Token", token);
            }
            if !body.is_empty() {
                rb = rb
                    .header("content-type", "application/json")
                    .body(body.clone());
            }
            let Ok(r) = rb.send().await else { continue };
            return relay(r, "text/plain").await;
        }
        no_leader()
    }

    /// `Ok` where `w` is applied here (the leader); else the answer: no leader, or the leader's (the
    /// servers') answer to `w` forwarded as a PUT to `path`, with `token` (`""`: none).
    pub(super) async fn at_leader(&self, w: &Write, path: &str, token: &str) -> Result<(), Resp> {
        match self.write_target(w.forwarded) {
            WriteTarget::Here => Ok(()),
            WriteTarget::NoLeader => Err(no_leader()),
            WriteTarget::Forward(t, mark) => Err(self
                .forward(&t, mark, &Method::PUT, path, token, w.body.clone())
                .await),
        }
    }

    /// Where a write (ACL changes, registrations) is applied: at the leader.
    pub(super) fn write_target(&self, forwarded: bool) -> WriteTarget {
        if self.cfg.server.is_none() {
            return WriteTarget::Forward(self.servers_of_client(), false);
        }
        match self.rt.lock().expect("runtime").leader {
            None => WriteTarget::NoLeader,
            Some(l) if l == self.cfg.bind => WriteTarget::Here,
            // The sender thinks we lead; we do not (yet): retryable, as in an election.
            Some(_) if forwarded => WriteTarget::NoLeader,
            Some(l) => WriteTarget::Forward(vec![l], true),
        }
    }

    /// The capabilities of the request's token: from the replicated store on a server; on a client
    /// through its servers (`/v1/acl/token/self`, then each policy), as a Nomad client asks its servers.
    pub(super) async fn authz(&self, secret: &str) -> Result<Authz, ApiError> {
        if !self.cfg.acl_enabled {
            return Ok(Authz::management(None));
        }
        if self.cfg.server.is_some() {
            return self.rt.lock().expect("runtime").store.resolve(secret);
        }
        let servers = self.servers_of_client();
        let get = |path: String| {
            let (http, servers, secret) = (self.http(), servers.clone(), secret.to_string());
            let urls: Vec<String> = servers.iter().map(|ip| self.url(*ip, &path)).collect();
            async move {
                for u in urls {
                    let mut rb = http.get(&u).timeout(Duration::from_secs(5));
                    if !secret.is_empty() {
                        rb = rb.header("X-Nomad-Token", &secret);
                    }
                    if let Ok(r) = rb.send().await {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        return Ok((status, body));
                    }
                }
                Err(ApiError(500, "No cluster leader".into()))
            }
        };
        let (names, token) = if secret.is_empty() {
            (vec!["anonymous".to_string()], None)
        } else {
            let (status, body) = get("/v1/acl/token/self".into()).await?;
            if status != 200 {
                return Err(ApiError(status, body));
            }
            let t: Token = serde_json::from_str(&body).map_err(|e| ApiError(500, e.to_string()))?;
            if t.kind == "management" {
                return Ok(Authz::management(Some(t)));
            }
            (t.policies.clone().unwrap_or_default(), Some(t))
        };
        let mut policies = Vec::new();
        for n in names {
            let (status, body) = get(format!("/v1/acl/policy/{n}")).await?;
            if status == 200 {
                policies.extend(serde_json::from_str::<Policy>(&body).ok());
            }
        }
        Ok(Authz::client(token, &policies))
    }

    /// `Err(answer)` unless the request's token has `cap`.
    pub(super) async fn require(&self, req: &Request<Incoming>, cap: Cap) -> Result<Authz, Resp> {
        let a = self.authz(&token_of(req)).await.map_err(api_error)?;
        if a.allows(cap) {
            Ok(a)
        } else {
            Err(denied())
        }
    }

    /// The capabilities of the request's token, for the ACL endpoints (refused when ACLs are disabled).
    pub(super) async fn acl_authz(&self, req: &Request<Incoming>) -> Result<Authz, Resp> {
        if !self.cfg.acl_enabled {
            return Err(acl_disabled());
        }
        self.authz(&token_of(req)).await.map_err(api_error)
    }

    /// The management check of every ACL write and of the token list.
    pub(super) async fn require_management(&self, req: &Request<Incoming>) -> Result<(), Resp> {
        if self.acl_authz(req).await?.management {
            Ok(())
        } else {
            Err(denied())
        }
    }

    pub(super) async fn handle(self: Arc<Self>, req: Request<Incoming>, client_cert: bool) -> Resp {
        self.route(req, client_cert)
            .await
            .unwrap_or_else(|early| early)
    }

    async fn route(&self, req: Request<Incoming>, client_cert: bool) -> Answer {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let is_write = method == Method::PUT || method == Method::POST;
        // A client agent answers status and its own /v1/agent/self; everything cluster-wide is the servers'.
        if self.cfg.server.is_none()
            && !matches!(
                path.as_str(),
                "/v1/status/leader" | "/v1/status/peers" | "/v1/agent/self" | "/v1/acl/bootstrap"
            )
            && (path.starts_with("/v1/nodes")
                || path.starts_with("/v1/node/")
                || path.starts_with("/v1/acl/")
                || path.starts_with("/v1/operator/")
                || path == "/v1/agent/members"
                || jobs::forwarded_by_clients(&path))
        {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or(path.clone());
            let token = token_of(&req);
            let body = read_body(req, 1 << 20).await?;
            return Ok(self
                .forward(&self.servers_of_client(), false, &method, &pq, &token, body)
                .await);
        }
        if jobs::handles(&path) {
            return self.jobs_route(req, client_cert).await;
        }
        match (&method, path.as_str()) {
            (&Method::GET, "/v1/status/leader") => Ok(self.status(true).await),
            (&Method::GET, "/v1/status/peers") => Ok(self.status(false).await),
            (&Method::GET, PEER_PATH) => Ok(self.peer_view(&req)),
            (&Method::PUT, PEER_PATH) => self.peer_apply(req).await,
            (&Method::PUT, NODE_PATH) => self.node_register(req, client_cert).await,
            (&Method::GET, JWKS_PATH) => Ok(self.jwks().await),
            (_, JWKS_PATH) => Ok(text(405, "Invalid method")),
            (&Method::PUT, IDENTITY_PATH) => self.sign_identity(req).await,
            (_, NODE_PATH) => Ok(text(405, "Invalid method")),
            (m, "/v1/acl/bootstrap") if m == Method::PUT || m == Method::POST => {
                self.acl_bootstrap(req).await
            }
            (_, "/v1/acl/bootstrap") => Ok(text(405, "Invalid method")),
            (&Method::GET, "/v1/acl/token/self") => Ok(self.token_self(&req)),
            (&Method::GET, "/v1/acl/tokens") => self.token_list(&req).await,
            (_, "/v1/acl/token") if is_write => self.token_create(req).await,
            (&Method::GET, p) if p.starts_with("/v1/acl/token/") => {
                let accessor = p["/v1/acl/token/".len()..].to_string();
                self.token_get(&req, &accessor).await
            }
            (&Method::GET, "/v1/acl/policies") => self.policy_list(&req).await,
            (_, p) if p.starts_with("/v1/acl/policy/") && is_write => {
                let name = p["/v1/acl/policy/".len()..].to_string();
                self.policy_write(req, &name).await
            }
            (&Method::GET, p) if p.starts_with("/v1/acl/policy/") => {
                let name = p["/v1/acl/policy/".len()..].to_string();
                self.policy_get(&req, &name).await
            }
            (&Method::GET, "/v1/nodes") => self.node_list(&req).await,
            (&Method::GET, p) if p.starts_with("/v1/node/") => {
                let id = p["/v1/node/".len()..].to_string();
                self.node_get(&req, &id).await
            }
            (&Method::GET, "/v1/operator/raft/configuration") => {
                self.raft_configuration(&req).await
            }
            (&Method::GET, "/v1/agent/self") => self.agent_self(&req).await,
            (&Method::GET, "/v1/agent/members") => self.agent_members(&req).await,
            (&Method::GET, "/v1/operator/snapshot") => self.snapshot_save(&req).await,
            (m, "/v1/operator/snapshot") if m == Method::PUT || m == Method::POST => {
                self.snapshot_restore(req).await
            }
            (_, "/v1/operator/snapshot") => Ok(text(405, "Invalid method")),
            _ => Ok(not_found()),
        }
    }

    /// `GET /.well-known/jwks.json`: the keyring's public keys (a client agent asks its servers, as Nomad's
    /// `Keyring.ListPublic` RPC does). Unauthenticated, as in Nomad.
    async fn jwks(&self) -> Resp {
        if self.cfg.server.is_none() {
            return self
                .ask(&self.servers_of_client(), JWKS_PATH)
                .await
                .unwrap_or_else(no_leader);
        }
        let rt = self.rt.lock().expect("runtime");
        json_resp(&crate::nomad_identity::jwks(&rt.store.keyring))
    }

    /// `PUT /v1/double/identity` (plumbing): `{"Namespace","JobID","Group","Task","AllocID","Identity",
    /// "Audience","TTLSeconds","IssuedAt"?}` → `{"JWT"}`, signed with the newest root key.
    async fn sign_identity(&self, req: Request<Incoming>) -> Answer {
        if let Some(refused) = self.peer_refusal(&req) {
            return Err(refused);
        }
        let body = read_body(req, 1 << 16).await?;
        let r: crate::nomad_identity::IdentityRequest = serde_json::from_slice(&body)
            .map_err(|e| text(400, format!("bad identity request: {e}")))?;
        let key = {
            let rt = self.rt.lock().expect("runtime");
            rt.store.keyring.last().cloned()
        };
        let Some(key) = key else {
            return Err(text(500, "no active root key"));
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let jwt = key
            .sign(&crate::nomad_identity::claims(&r, now, &uuid()))
            .map_err(|e| text(500, e))?;
        Ok(json_resp(&json!({ "JWT": jwt })))
    }

    async fn status(&self, leader_only: bool) -> Resp {
        if self.cfg.server.is_none() {
            let path = if leader_only {
                "/v1/status/leader"
            } else {
                "/v1/status/peers"
            };
            return self
                .ask(&self.servers_of_client(), path)
                .await
                .unwrap_or_else(no_leader);
        }
        let rt = self.rt.lock().expect("runtime");
        match rt.leader {
            None => no_leader(),
            Some(l) if leader_only => json_resp(&Self::rpc_addr(l)),
            Some(_) => json_resp(
                &rt.alive
                    .keys()
                    .map(|ip| Self::rpc_addr(*ip))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Asks other agents; the first success wins (client mode status).
    async fn ask(&self, targets: &[IpAddr], path: &str) -> Option<Resp> {
        for ip in targets {
            let Ok(r) = self
                .http()
                .get(self.url(*ip, path))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            else {
                continue;
            };
            let answer = relay(r, "application/json").await;
            if answer.status() == 200 {
                return Some(answer);
            }
        }
        None
    }

    fn peer_key_ok(&self, req: &Request<Incoming>) -> bool {
        let Some(server) = &self.cfg.server else {
            return false;
        };
        let given = req
            .headers()
            .get(PEER_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        given == server.encrypt.as_deref().unwrap_or("")
    }

    /// The refusal of a peer request: not a server, or not the servers' key.
    fn peer_refusal(&self, req: &Request<Incoming>) -> Option<Resp> {
        if self.cfg.server.is_none() {
            Some(not_found())
        } else if !self.peer_key_ok(req) {
            Some(denied())
        } else {
            None
        }
    }

    fn peer_view(&self, req: &Request<Incoming>) -> Resp {
        if let Some(refused) = self.peer_refusal(req) {
            return refused;
        }
        let rt = self.rt.lock().expect("runtime");
        json_resp(&PeerView {
            name: self.cfg.name.clone(),
            addr: self.cfg.bind,
            id: self.raft_id.clone(),
            store: rt.store.clone(),
        })
    }

    async fn peer_apply(&self, req: Request<Incoming>) -> Answer {
        if let Some(refused) = self.peer_refusal(&req) {
            return Err(refused);
        }
        let body = read_body(req, 8 << 20).await?;
        let Ok(store) = serde_json::from_slice::<Store>(&body) else {
            return Err(text(400, "bad state"));
        };
        let mut rt = self.rt.lock().expect("runtime");
        if store.index > rt.store.index {
            rt.store = store;
            self.persist(&rt.store);
        }
        Ok(text(200, ""))
    }

    /// Pushes the store to every answering peer (they adopt a higher index) and waits for their answers.
    pub(super) async fn replicate(&self, store: &Store) {
        let Some(server) = &self.cfg.server else {
            return;
        };
        let peers: Vec<IpAddr> = {
            let rt = self.rt.lock().expect("runtime");
            rt.alive
                .keys()
                .copied()
                .filter(|ip| *ip != self.cfg.bind)
                .collect()
        };
        let mut acks = 1;
        for ip in &peers {
            let r = self
                .http()
                .put(self.url(*ip, PEER_PATH))
                .header(PEER_KEY_HEADER, server.encrypt.clone().unwrap_or_default())
                .json(store)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                acks += 1;
            }
        }
        if acks < server.bootstrap_expect / 2 + 1 {
            log(format!(
                "index {} replicated to {acks} servers only",
                store.index
            ));
        }
    }

    /// Applies a write to the store at the leader: persist, replicate, answer.
    pub(super) async fn commit<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (out, store) = {
            let mut rt = self.rt.lock().expect("runtime");
            let out = f(&mut rt.store)?;
            self.persist(&rt.store);
            (out, rt.store.clone())
        };
        self.replicate(&store).await;
        Ok(out)
    }
}
