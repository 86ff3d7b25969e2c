//! The replicated state (the part of Nomad's raft state the double keeps): ACL tokens and policies, nodes.

use super::*;

/// A token as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Policies")]
    pub policies: Option<Vec<String>>,
    #[serde(rename = "Roles")]
    pub roles: Option<Vec<String>>,
    #[serde(rename = "Global")]
    pub global: bool,
    #[serde(rename = "CreateTime")]
    pub create_time: String,
    #[serde(rename = "ExpirationTime")]
    pub expiration_time: Option<String>,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
}

/// The replicated state: the raft index, whether the cluster ever formed, the ACL tables and the nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub index: u64,
    pub formed: bool,
    /// The index of the last ACL bootstrap (Nomad's "reset index"); 0 before the first one.
    pub bootstrap_index: u64,
    pub tokens: Vec<Token>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// The keyring (Nomad's root keys), made by the leader when the cluster forms: signs workload identities.
    #[serde(default)]
    pub keyring: Vec<crate::nomad_identity::RootKey>,
    /// Jobs and their allocations (lab/src/nomad_double/jobs/).
    #[serde(default)]
    pub jobs: Vec<jobs::Job>,
    #[serde(default)]
    pub allocs: Vec<jobs::Alloc>,
}

/// An API error: status and the plain-text body Nomad sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError(pub u16, pub String);

/// A random UUID (v4 layout), as Nomad's `uuid.Generate` shapes them.
pub fn uuid() -> String {
    hashistack_agent::ids::uuid_v4().to_string()
}

/// Nomad's `helper.IsUUID`: 36 characters, hex digits (any case) and dashes at 8, 13, 18, 23.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Store {
    /// `ACL.Bootstrap` at the leader. `reset_file` is the number in `<data_dir>/server/acl-bootstrap-reset`.
    pub fn bootstrap(
        &mut self,
        secret: Option<&str>,
        reset_file: Option<u64>,
    ) -> Result<Token, ApiError> {
        if self.bootstrap_index != 0 {
            match reset_file.unwrap_or(0) {
                0 => {
                    return Err(ApiError(
                        400,
                        format!(
                            "ACL bootstrap already done (reset index: {})",
                            self.bootstrap_index
                        ),
                    ))
                }
                n if n != self.bootstrap_index => {
                    return Err(ApiError(
                        400,
                        format!(
                            "Invalid bootstrap reset index (specified {n}, reset index: {})",
                            self.bootstrap_index
                        ),
                    ))
                }
                _ => {}
            }
        }
        let secret_id = match secret.filter(|s| !s.is_empty()) {
            Some(s) if is_uuid(s) => s.to_string(),
            Some(_) => return Err(ApiError(400, "invalid acl token".into())),
            None => uuid(),
        };
        self.index += 1;
        let token = Token {
            accessor_id: uuid(),
            secret_id,
            name: "Bootstrap Token".into(),
            kind: "management".into(),
            policies: None,
            roles: None,
            global: true,
            create_time: rfc3339(time::OffsetDateTime::now_utc()),
            expiration_time: None,
            create_index: self.index,
            modify_index: self.index,
        };
        self.bootstrap_index = self.index;
        self.tokens.push(token.clone());
        Ok(token)
    }

    pub fn token_by_secret(&self, secret: &str) -> Option<&Token> {
        if secret.is_empty() {
            return None;
        }
        self.tokens.iter().find(|t| t.secret_id == secret)
    }

    pub(super) fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// What a secret may do (Nomad's `ResolveToken`): no secret is the anonymous token (the `anonymous`
    /// policy, if there is one); an unknown secret is 403 `ACL token not found`. Policies a token names
    /// that do not exist grant nothing (Nomad allows such dangling links).
    pub fn resolve(&self, secret: &str) -> Result<Authz, ApiError> {
        let (token, names) = if secret.is_empty() {
            (None, vec!["anonymous".to_string()])
        } else {
            let t = self
                .token_by_secret(secret)
                .ok_or_else(|| ApiError(403, "ACL token not found".into()))?;
            if t.kind == "management" {
                return Ok(Authz::management(Some(t.clone())));
            }
            (Some(t.clone()), t.policies.clone().unwrap_or_default())
        };
        Ok(Authz::client(
            token,
            names.iter().filter_map(|n| self.policy(n)),
        ))
    }

    /// `ACL.UpsertPolicies` at the leader (the caller checked for a management token).
    pub fn upsert_policy(&mut self, p: PolicyWrite) -> Result<u64, ApiError> {
        let mut errs = Vec::new();
        if !valid_policy_name(&p.name) {
            errs.push(format!("invalid name '{}'", p.name));
        }
        if let Err(e) = parse_rules(&p.rules) {
            errs.push(format!("failed to parse rules: {e}"));
        }
        if p.description.len() > MAX_POLICY_DESCRIPTION {
            errs.push(format!("description longer than {MAX_POLICY_DESCRIPTION}"));
        }
        if !errs.is_empty() {
            return Err(ApiError(
                400,
                format!("policy 0 invalid: {}", multierror(&errs)),
            ));
        }
        self.index += 1;
        let index = self.index;
        match self.policies.iter_mut().find(|x| x.name == p.name) {
            Some(existing) => {
                existing.description = p.description;
                existing.rules = p.rules;
                existing.modify_index = index;
            }
            None => self.policies.push(Policy {
                name: p.name,
                description: p.description,
                rules: p.rules,
                create_index: index,
                modify_index: index,
            }),
        }
        Ok(index)
    }

    /// `ACL.UpsertTokens` for a new token at the leader (the caller checked for a management token).
    pub fn create_token(&mut self, w: TokenWrite) -> Result<Token, ApiError> {
        if !w.accessor_id.is_empty() {
            return Err(ApiError(
                400,
                "token updates (a request with AccessorID) are not implemented by the Nomad contract double"
                    .into(),
            ));
        }
        if w.expiration_ttl
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != "")
            || w.expiration_time.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err(ApiError(
                400,
                "token expiry (ExpirationTTL, ExpirationTime) is not implemented by the Nomad contract double"
                    .into(),
            ));
        }
        let mut errs = Vec::new();
        if w.name.len() > MAX_TOKEN_NAME {
            errs.push("token name too long".to_string());
        }
        let has_roles = !w.roles.as_ref().is_none_or(|r| r.is_empty());
        match w.kind.as_str() {
            "client" if w.policies.is_empty() && !has_roles => {
                errs.push("client token missing policies or roles".into())
            }
            "client" => {}
            "management" if !w.policies.is_empty() || has_roles => {
                errs.push("management token cannot be associated with policies or roles".into())
            }
            "management" => {}
            _ => errs.push("token type must be client or management".into()),
        }
        if !errs.is_empty() {
            return Err(ApiError(
                400,
                format!("token 0 invalid: {}", multierror(&errs)),
            ));
        }
        if has_roles {
            return Err(ApiError(
                400,
                "ACL roles are not implemented by the Nomad contract double".into(),
            ));
        }
        self.index += 1;
        let token = Token {
            accessor_id: uuid(),
            secret_id: uuid(),
            name: w.name,
            policies: (w.kind == "client").then_some(w.policies),
            kind: w.kind,
            roles: None,
            global: w.global,
            create_time: rfc3339(time::OffsetDateTime::now_utc()),
            expiration_time: None,
            create_index: self.index,
            modify_index: self.index,
        };
        self.tokens.push(token.clone());
        Ok(token)
    }

    /// `Node.Register` / `Node.UpdateStatus` at the leader: a new node, a changed node, or a heartbeat.
    /// Returns whether the store changed (a raft write); a plain heartbeat of a ready node changes nothing.
    pub fn register_node(
        &mut self,
        r: NodeRegistration,
        now: time::OffsetDateTime,
    ) -> Result<bool, ApiError> {
        if !is_uuid(&r.id) {
            return Err(ApiError(400, "missing node ID".into()));
        }
        if r.name.is_empty() {
            return Err(ApiError(400, "missing node name".into()));
        }
        if r.secret_id.is_empty() {
            return Err(ApiError(400, "missing node secret ID".into()));
        }
        let next = self.index + 1;
        let changed = match self.nodes.iter_mut().find(|n| n.id == r.id) {
            Some(n) => {
                if n.secret_id != r.secret_id {
                    return Err(ApiError(
                        400,
                        "node secret ID does not match. Not registering node.".into(),
                    ));
                }
                let mut changed = false;
                if n.status != "ready" {
                    let msg = if n.status == "down" {
                        "Node reregistered by heartbeat"
                    } else {
                        "Node registered"
                    };
                    n.status = "ready".into();
                    n.status_updated_at = now.unix_timestamp();
                    n.push_event(msg, now, next);
                    changed = true;
                }
                let fields = (
                    &r.name,
                    &r.datacenter,
                    &r.node_class,
                    &r.http_addr,
                    &r.address,
                    &r.version,
                    r.tls_enabled,
                );
                if fields
                    != (
                        &n.name,
                        &n.datacenter,
                        &n.node_class,
                        &n.http_addr,
                        &n.address,
                        &n.version,
                        n.tls_enabled,
                    )
                {
                    n.name = r.name;
                    n.datacenter = r.datacenter;
                    n.node_class = r.node_class;
                    n.http_addr = r.http_addr;
                    n.address = r.address;
                    n.version = r.version;
                    n.tls_enabled = r.tls_enabled;
                    changed = true;
                }
                if changed {
                    n.modify_index = next;
                }
                changed
            }
            None => {
                let mut n = Node {
                    id: r.id,
                    secret_id: r.secret_id,
                    name: r.name,
                    datacenter: r.datacenter,
                    node_class: r.node_class,
                    node_pool: "default".into(),
                    http_addr: r.http_addr,
                    address: r.address,
                    tls_enabled: r.tls_enabled,
                    version: r.version,
                    status: "ready".into(),
                    status_description: String::new(),
                    status_updated_at: now.unix_timestamp(),
                    drain: false,
                    scheduling_eligibility: "eligible".into(),
                    events: vec![],
                    create_index: next,
                    modify_index: next,
                };
                n.push_event("Node registered", now, next);
                self.nodes.push(n);
                true
            }
        };
        if changed {
            self.index = next;
        }
        Ok(changed)
    }

    /// Marks a node `down` (its heartbeat TTL passed). Returns whether it changed.
    pub fn mark_down(&mut self, id: &str, now: time::OffsetDateTime) -> bool {
        let next = self.index + 1;
        let Some(n) = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id && n.status != "down")
        else {
            return false;
        };
        n.status = "down".into();
        n.status_updated_at = now.unix_timestamp();
        n.modify_index = next;
        n.push_event("Node heartbeat missed", now, next);
        self.index = next;
        true
    }

    pub fn load(path: &Path) -> Result<Store, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Store::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Atomic, fsynced, 0600 (it holds token secrets, as Nomad's raft data does).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("store serialises"))
            .and_then(|_| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bootstrap_uses_the_given_secret_and_later_ones_report_the_reset_index() {
        let mut s = Store::default();
        let secret = uuid();
        let t = s.bootstrap(Some(&secret), None).unwrap();
        assert_eq!(t.secret_id, secret);
        assert_eq!(
            (t.name.as_str(), t.kind.as_str(), t.global),
            ("Bootstrap Token", "management", true)
        );
        assert!(is_uuid(&t.accessor_id) && t.accessor_id != secret);
        assert_eq!(t.create_index, s.bootstrap_index);
        let v = serde_json::to_value(&t).unwrap();
        for k in [
            "AccessorID",
            "SecretID",
            "Name",
            "Type",
            "Global",
            "CreateIndex",
            "ModifyIndex",
        ] {
            assert!(v.get(k).is_some(), "{k} in {v}");
        }
        let n = s.bootstrap_index;
        // Again, with the same or another secret, or none: already done, never a second token.
        for again in [Some(secret.as_str()), Some(uuid().as_str()), None] {
            assert_eq!(
                s.bootstrap(again, None),
                Err(ApiError(
                    400,
                    format!("ACL bootstrap already done (reset index: {n})")
                ))
            );
        }
        assert_eq!(s.tokens.len(), 1);
        assert_eq!(s.token_by_secret(&secret), Some(&t));
        assert!(s.token_by_secret("").is_none());
        assert!(s.token_by_secret(&uuid()).is_none());
    }

    #[test]
    fn generated_secret_and_invalid_secret() {
        let mut s = Store::default();
        assert_eq!(
            s.bootstrap(Some("not-a-uuid"), None),
            Err(ApiError(400, "invalid acl token".into()))
        );
        assert_eq!(s.bootstrap_index, 0, "a refused bootstrap changes nothing");
        let t = s.bootstrap(None, None).unwrap();
        assert!(is_uuid(&t.secret_id));
        // "already done" is checked before the secret's shape, as in Nomad.
        assert!(s
            .bootstrap(Some("x"), None)
            .unwrap_err()
            .1
            .contains("already done"));
    }

    #[test]
    fn reset_index_file_allows_exactly_the_documented_rebootstrap() {
        let mut s = Store::default();
        let first = s.bootstrap(Some(&uuid()), None).unwrap();
        let n = s.bootstrap_index;
        assert_eq!(
            s.bootstrap(None, Some(n + 5)),
            Err(ApiError(
                400,
                format!(
                    "Invalid bootstrap reset index (specified {}, reset index: {n})",
                    n + 5
                )
            ))
        );
        let second = s.bootstrap(None, Some(n)).unwrap();
        assert!(second.create_index > n);
        // The old token stays valid (documented), and the stale reset file no longer matches.
        assert!(s.token_by_secret(&first.secret_id).is_some());
        assert!(s
            .bootstrap(None, Some(n))
            .unwrap_err()
            .1
            .starts_with("Invalid bootstrap reset index"));
    }

    #[test]
    fn uuids() {
        assert!(is_uuid("2b778dd9-f5f1-6f29-b4b4-9a5fa948757a"));
        assert!(is_uuid("2B778DD9-F5F1-6F29-B4B4-9A5FA948757A"));
        assert!(!is_uuid("2b778dd9f5f16f29b4b49a5fa948757a"));
        assert!(!is_uuid("2b778dd9-f5f1-6f29-b4b4-9a5fa948757g"));
        let u = uuid();
        assert!(is_uuid(&u) && u.as_bytes()[14] == b'4');
        assert_ne!(uuid(), uuid());
    }

    #[test]
    fn policies_tokens_and_what_they_allow() {
        let mut s = Store::default();
        let mgmt = s.bootstrap(Some(&uuid()), None).unwrap();
        let pw = |name: &str, rules: &str| PolicyWrite {
            name: name.into(),
            description: "d".into(),
            rules: rules.into(),
        };
        // Bad name, bad rules, long description: one multierror, as Nomad's ACLPolicy.Validate.
        let e = s
            .upsert_policy(PolicyWrite {
                description: "x".repeat(300),
                ..pw("bad name", "nod {}")
            })
            .unwrap_err();
        assert_eq!(e.0, 400);
        assert_eq!(
            e.1,
            "policy 0 invalid: 3 errors occurred:\n\t* invalid name 'bad name'\n\t* failed to parse rules: \
             Invalid policy: nod {}\n\t* description longer than 256\n\n"
        );
        s.upsert_policy(pw("status-read", STATUS_RULES)).unwrap();
        s.upsert_policy(pw("nodes", r#"node { policy = "read" }"#))
            .unwrap();
        // An upsert: writing it again changes the rules and the modify index only.
        let created = s.policy("nodes").unwrap().create_index;
        s.upsert_policy(pw("nodes", r#"node { policy = "write" }"#))
            .unwrap();
        let p = s.policy("nodes").unwrap();
        assert_eq!(p.create_index, created);
        assert!(p.modify_index > created);
        s.upsert_policy(pw("nodes", r#"node { policy = "read" }"#))
            .unwrap();

        let tw = |kind: &str, policies: &[&str]| TokenWrite {
            name: "t".into(),
            kind: kind.into(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        for (w, want) in [
            (tw("client", &[]), "client token missing policies or roles"),
            (
                tw("management", &["nodes"]),
                "management token cannot be associated with policies or roles",
            ),
            (
                tw("root", &["nodes"]),
                "token type must be client or management",
            ),
        ] {
            assert_eq!(
                s.create_token(w),
                Err(ApiError(
                    400,
                    format!("token 0 invalid: 1 error occurred:\n\t* {want}\n\n")
                ))
            );
        }
        let nodes_only = s.create_token(tw("client", &["nodes"])).unwrap();
        assert!(is_uuid(&nodes_only.accessor_id) && is_uuid(&nodes_only.secret_id));
        assert_eq!(nodes_only.policies, Some(vec!["nodes".to_string()]));
        let status = s.create_token(tw("client", &["status-read"])).unwrap();
        // A dangling policy link is allowed (as in Nomad) and grants nothing.
        let dangling = s.create_token(tw("client", &["no-such-policy"])).unwrap();

        let a = s.resolve(&nodes_only.secret_id).unwrap();
        assert!(!a.management);
        assert!(a.allows(Cap::NodeRead));
        assert!(!a.allows(Cap::AgentRead) && !a.allows(Cap::OperatorRead));
        let a = s.resolve(&status.secret_id).unwrap();
        assert!(a.allows(Cap::NodeRead) && a.allows(Cap::AgentRead) && a.allows(Cap::OperatorRead));
        let a = s.resolve(&dangling.secret_id).unwrap();
        assert!(!a.allows(Cap::NodeRead));
        let a = s.resolve(&mgmt.secret_id).unwrap();
        assert!(a.management && a.allows(Cap::OperatorRead));
        assert_eq!(
            s.resolve(&uuid()),
            Err(ApiError(403, "ACL token not found".into()))
        );
        // No token: the anonymous policy, when there is one.
        assert!(!s.resolve("").unwrap().allows(Cap::NodeRead));
        s.upsert_policy(pw("anonymous", r#"node { policy = "read" }"#))
            .unwrap();
        assert!(s.resolve("").unwrap().allows(Cap::NodeRead));
        // deny wins over read when policies merge.
        s.upsert_policy(pw("no-nodes", r#"node { policy = "deny" }"#))
            .unwrap();
        let both = s
            .create_token(tw("client", &["nodes", "no-nodes"]))
            .unwrap();
        assert!(!s.resolve(&both.secret_id).unwrap().allows(Cap::NodeRead));
    }

    #[test]
    fn nodes_register_heartbeat_go_down_and_come_back() {
        let mut s = Store::default();
        let now = time::OffsetDateTime::now_utc();
        let reg = NodeRegistration {
            id: uuid(),
            secret_id: uuid(),
            name: "worker-0".into(),
            datacenter: "dc1".into(),
            node_class: String::new(),
            http_addr: "10.0.0.4:4646".into(),
            address: "10.0.0.4".into(),
            tls_enabled: true,
            version: VERSION.into(),
        };
        assert!(s.register_node(reg.clone(), now).unwrap());
        let i = s.index;
        // A heartbeat of a ready, unchanged node is no write.
        assert!(!s.register_node(reg.clone(), now).unwrap());
        assert_eq!(s.index, i);
        let stub = s.nodes[0].stub();
        for (k, v) in [
            ("Status", json!("ready")),
            ("Name", json!("worker-0")),
            ("SchedulingEligibility", json!("eligible")),
            ("Drain", json!(false)),
            ("Version", json!(VERSION)),
            ("Address", json!("10.0.0.4")),
        ] {
            assert_eq!(stub[k], v, "{k}");
        }
        assert!(stub.get("SecretID").is_none() && s.nodes[0].public().get("SecretID").is_none());
        // Another secret under the same ID is refused.
        let thief = NodeRegistration {
            secret_id: uuid(),
            ..reg.clone()
        };
        assert_eq!(
            s.register_node(thief, now),
            Err(ApiError(
                400,
                "node secret ID does not match. Not registering node.".into()
            ))
        );
        assert!(s.mark_down(&reg.id, now));
        assert!(!s.mark_down(&reg.id, now), "already down");
        assert_eq!(s.nodes[0].status, "down");
        assert!(s.register_node(reg.clone(), now).unwrap());
        assert_eq!(s.nodes[0].status, "ready");
        let events: Vec<&str> = s.nodes[0]
            .events
            .iter()
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(
            events,
            [
                "Node registered",
                "Node heartbeat missed",
                "Node reregistered by heartbeat"
            ]
        );
        assert_eq!(
            s.register_node(
                NodeRegistration {
                    id: "x".into(),
                    ..reg
                },
                now
            ),
            Err(ApiError(400, "missing node ID".into()))
        );
    }
}
