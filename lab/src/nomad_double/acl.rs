//! ACL policies and tokens: the subset of Nomad's policy language the double implements, and the `/v1/acl/*` routes.

use super::*;

pub(super) const MAX_POLICY_DESCRIPTION: usize = 256;
pub(super) const MAX_TOKEN_NAME: usize = 256;

/// A policy as the API shows it (`RulesJSON` is added on read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Description")]
    pub description: String,
    #[serde(rename = "Rules")]
    pub rules: String,
    #[serde(rename = "CreateIndex")]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex")]
    pub modify_index: u64,
}

/// The body of `PUT /v1/acl/policy/:name`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PolicyWrite {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Description")]
    pub description: String,
    #[serde(rename = "Rules")]
    pub rules: String,
}

/// The body of `PUT /v1/acl/token`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TokenWrite {
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Policies")]
    pub policies: Vec<String>,
    #[serde(rename = "Roles")]
    pub roles: Option<Vec<Value>>,
    #[serde(rename = "Global")]
    pub global: bool,
    #[serde(rename = "ExpirationTTL")]
    pub expiration_ttl: Option<Value>,
    #[serde(rename = "ExpirationTime")]
    pub expiration_time: Option<Value>,
}

/// Nomad's `ValidPolicyName`: `^[a-zA-Z0-9-]{1,128}$`.
pub(super) fn valid_policy_name(n: &str) -> bool {
    (1..=128).contains(&n.len()) && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// go-multierror's text: `1 error occurred:\n\t* …\n\n`.
pub(super) fn multierror(errs: &[String]) -> String {
    let head = if errs.len() == 1 {
        "1 error occurred:".to_string()
    } else {
        format!("{} errors occurred:", errs.len())
    };
    let items: String = errs.iter().map(|e| format!("\n\t* {e}")).collect();
    format!("{head}{items}\n\n")
}

/// A coarse policy level (`policy = "…"` of the `node`, `agent` and `operator` blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Deny,
    Read,
    Write,
}

impl Level {
    pub(super) fn parse(s: &str) -> Option<Level> {
        match s {
            "deny" => Some(Level::Deny),
            "read" => Some(Level::Read),
            "write" => Some(Level::Write),
            _ => None,
        }
    }
    fn word(self) -> &'static str {
        match self {
            Level::Deny => "deny",
            Level::Read => "read",
            Level::Write => "write",
        }
    }
}

/// Nomad's merge: `deny` wins over everything, otherwise the most privilege.
fn merge_level(a: Option<Level>, b: Option<Level>) -> Option<Level> {
    match (a, b) {
        (Some(Level::Deny), _) | (_, Some(Level::Deny)) => Some(Level::Deny),
        (Some(Level::Write), _) | (_, Some(Level::Write)) => Some(Level::Write),
        (Some(Level::Read), _) | (_, Some(Level::Read)) => Some(Level::Read),
        _ => None,
    }
}

fn allows_read(l: Option<Level>) -> bool {
    matches!(l, Some(Level::Read | Level::Write))
}

/// Parsed rules: the blocks the double implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    pub node: Option<Level>,
    pub agent: Option<Level>,
    pub operator: Option<Level>,
}

impl Rules {
    fn merge(&mut self, o: &Rules) {
        self.node = merge_level(self.node, o.node);
        self.agent = merge_level(self.agent, o.agent);
        self.operator = merge_level(self.operator, o.operator);
    }

    /// Nomad's `RulesJSON` (the parsed policy), for the blocks the double implements.
    fn to_json(self) -> Value {
        let block = |l: Option<Level>| match l {
            Some(l) => json!({"Policy": l.word()}),
            None => Value::Null,
        };
        json!({
            "Namespaces": null,
            "NodePools": null,
            "HostVolumes": null,
            "Agent": block(self.agent),
            "Node": block(self.node),
            "Operator": block(self.operator),
            "Quota": null,
            "Plugin": null,
        })
    }
}

/// A capability a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    NodeRead,
    AgentRead,
    OperatorRead,
}

/// What a request's token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    pub management: bool,
    pub rules: Rules,
    /// The token (None: anonymous, or ACLs disabled).
    pub token: Option<Token>,
}

impl Authz {
    pub(super) fn management(token: Option<Token>) -> Authz {
        Authz {
            management: true,
            rules: Rules::default(),
            token,
        }
    }
    /// A client token (None: anonymous) with these policies: their rules merged. Stored policies were
    /// validated on write; evaluation is lenient, as in Nomad.
    pub(super) fn client<'a>(
        token: Option<Token>,
        policies: impl IntoIterator<Item = &'a Policy>,
    ) -> Authz {
        let mut rules = Rules::default();
        for p in policies {
            if let Ok(r) = parse_rules(&p.rules) {
                rules.merge(&r);
            }
        }
        Authz {
            management: false,
            rules,
            token,
        }
    }
    pub fn allows(&self, c: Cap) -> bool {
        self.management
            || match c {
                Cap::NodeRead => allows_read(self.rules.node),
                Cap::AgentRead => allows_read(self.rules.agent),
                Cap::OperatorRead => allows_read(self.rules.operator),
            }
    }
}

impl Agent {
    pub(super) async fn acl_bootstrap(&self, req: Request<Incoming>) -> Answer {
        if !self.cfg.acl_enabled {
            return Err(acl_disabled());
        }
        let w = Write::read(req, 64 * 1024).await?;
        let secret: Option<String> = if w.body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            serde_json::from_slice::<Value>(&w.body)
                .map_err(|e| text(400, format!("failed to decode request body: {e}")))?
                .get("BootstrapSecret")
                .and_then(Value::as_str)
                .map(String::from)
        };
        self.at_leader(&w, "/v1/acl/bootstrap", "").await?;
        let reset = self.reset_file();
        let (result, store) = {
            let mut rt = self.rt.lock().expect("runtime");
            let r = rt.store.bootstrap(secret.as_deref(), reset);
            if r.is_ok() {
                self.persist(&rt.store);
            }
            (r, rt.store.clone())
        };
        match result {
            Ok(t) => {
                // Like a raft commit: the followers have it before the caller hears of it.
                self.replicate(&store).await;
                log(format!(
                    "ACL bootstrap: management token created (accessor {}, index {}, {})",
                    t.accessor_id,
                    t.create_index,
                    if secret.is_some() {
                        "operator-provided secret"
                    } else {
                        "generated secret"
                    }
                ));
                Ok(json_resp(&t))
            }
            Err(ApiError(status, msg)) => {
                log(format!("ACL bootstrap refused: {msg}"));
                Err(text(status, msg))
            }
        }
    }

    pub(super) fn token_self(&self, req: &Request<Incoming>) -> Resp {
        if !self.cfg.acl_enabled {
            return acl_disabled();
        }
        let secret = token_of(req);
        let rt = self.rt.lock().expect("runtime");
        match rt.store.token_by_secret(&secret) {
            Some(t) => json_resp(t),
            None => text(403, "ACL token not found"),
        }
    }

    pub(super) async fn token_create(&self, req: Request<Incoming>) -> Answer {
        self.require_management(&req).await?;
        let w = Write::read(req, 1 << 20).await?;
        self.at_leader(&w, "/v1/acl/token", &w.token).await?;
        let tw: TokenWrite =
            serde_json::from_slice(&w.body).map_err(|e| text(400, e.to_string()))?;
        let t = self
            .commit(|s| s.create_token(tw))
            .await
            .map_err(api_error)?;
        log(format!(
            "ACL token created: accessor {}, type {}, policies {:?}",
            t.accessor_id,
            t.kind,
            t.policies.clone().unwrap_or_default()
        ));
        Ok(json_resp(&t))
    }

    pub(super) async fn token_list(&self, req: &Request<Incoming>) -> Answer {
        self.require_management(req).await?;
        let rt = self.rt.lock().expect("runtime");
        let stubs: Vec<Value> = rt
            .store
            .tokens
            .iter()
            .map(|t| {
                let mut v = serde_json::to_value(t).expect("token serialises");
                v.as_object_mut().expect("object").remove("SecretID");
                v
            })
            .collect();
        Ok(json_resp(&stubs))
    }

    pub(super) async fn token_get(&self, req: &Request<Incoming>, accessor: &str) -> Answer {
        let a = self.acl_authz(req).await?;
        let rt = self.rt.lock().expect("runtime");
        match rt.store.tokens.iter().find(|t| t.accessor_id == accessor) {
            Some(t) if a.management || a.token.as_ref() == Some(t) => Ok(json_resp(t)),
            Some(_) => Err(denied()),
            None if a.management => Err(text(404, "ACL token not found")),
            None => Err(denied()),
        }
    }

    pub(super) async fn policy_write(&self, req: Request<Incoming>, name: &str) -> Answer {
        self.require_management(&req).await?;
        let w = Write::read(req, 1 << 20).await?;
        let p: PolicyWrite =
            serde_json::from_slice(&w.body).map_err(|e| text(400, e.to_string()))?;
        if p.name != name {
            return Err(text(400, "ACL policy name does not match request path"));
        }
        self.at_leader(&w, &format!("/v1/acl/policy/{name}"), &w.token)
            .await?;
        let index = self
            .commit(|s| s.upsert_policy(p))
            .await
            .map_err(api_error)?;
        log(format!("ACL policy {name} written (index {index})"));
        Ok(text(200, ""))
    }

    /// The policy names a non-management token may read (its own).
    fn own_policies(a: &Authz) -> Vec<String> {
        a.token
            .as_ref()
            .and_then(|t| t.policies.clone())
            .unwrap_or_default()
    }

    pub(super) async fn policy_list(&self, req: &Request<Incoming>) -> Answer {
        let a = self.acl_authz(req).await?;
        let own = Self::own_policies(&a);
        let rt = self.rt.lock().expect("runtime");
        let stubs: Vec<Value> = rt
            .store
            .policies
            .iter()
            .filter(|p| a.management || own.contains(&p.name))
            .map(|p| {
                json!({"Name": p.name, "Description": p.description, "JobACL": null,
                       "CreateIndex": p.create_index, "ModifyIndex": p.modify_index})
            })
            .collect();
        Ok(json_resp(&stubs))
    }

    pub(super) async fn policy_get(&self, req: &Request<Incoming>, name: &str) -> Answer {
        let a = self.acl_authz(req).await?;
        if !a.management && name != "anonymous" && !Self::own_policies(&a).iter().any(|p| p == name)
        {
            return Err(denied());
        }
        let rt = self.rt.lock().expect("runtime");
        match rt.store.policy(name) {
            Some(p) => {
                let mut v = serde_json::to_value(p).expect("policy serialises");
                let rules = parse_rules(&p.rules).unwrap_or_default();
                v["RulesJSON"] = rules.to_json();
                v["JobACL"] = Value::Null;
                Ok(json_resp(&v))
            }
            None => Err(text(404, "ACL policy not found")),
        }
    }
}
