//! Nomad workload identities in Vault (Nomad ≥ 1.7): Vault trusts the JWTs Nomad signs for its workloads
//! through a JWT auth method, exactly as Nomad's "Vault integration with workload identity" documents (what
//! `nomad setup vault` creates): the auth method `jwt-nomad`, its default role `nomad-workloads` (audience
//! `vault.io`, user claim `/nomad_job_id`, claim mappings `nomad_namespace`, `nomad_job_id`, `nomad_task`) and
//! the ACL policy `nomad-workloads` templated on the job's namespace and id, with a KV v2 mount at `secret/`.
//!
//! Two steps, by two credentials (docs/trust-model.md, "Nomad workloads and Vault"):
//! 1. [`prepare`], once, by the Vault tier's bootstrap leader with the fresh root token: the KV mount, the auth
//!    method, the policy, the role — everything that does not need Nomad — and a token that may write only
//!    the auth method's configuration (policy `hashistack-nomad-jwt-config`), handed over in the servers Key
//!    Vault. Vault checks the JWKS URL when the configuration is written, so that part must wait for Nomad.
//!    It also writes the smoke test's canary, `secret/data/default/hashistack-smoke` = `{"canary": "<a fixed
//!    public marker>"}` (names.rs): not a secret, the value `hashistack-agent smoke`'s canary job must read.
//! 2. [`ensure_config`], at every boot of a Vault or Nomad server once *both* tiers are done (whichever
//!    finishes last writes it; the other finds it written): the JWKS URL of the Nomad servers and the cluster
//!    CA, with that token. Read first, written only when different: idempotent across reboots.

use super::http::CallError;
use crate::names::{
    NOMAD_JWT_CONFIG_POLICY, NOMAD_JWT_CONFIG_RULES, NOMAD_JWT_MOUNT, NOMAD_VAULT_AUDIENCE,
    NOMAD_WORKLOAD_POLICY, NOMAD_WORKLOAD_ROLE, SMOKE_CANARY, SMOKE_CANARY_KEY, SMOKE_SECRET_PATH,
    VAULT_TOKEN_PERIOD, WORKLOAD_KV_MOUNT,
};
use crate::retry::{retry, Attempt, RetryPolicy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use zeroize::Zeroizing;

/// The path Nomad serves its public signing keys on (Nomad's `structs.JWKSPath`).
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The algorithms Nomad signs workload identities with (RS256, EdDSA for keys made before Nomad 1.7).
pub const SUPPORTED_ALGS: [&str; 2] = ["RS256", "EdDSA"];

/// Why a step failed. Never carries a token; a server's error text is cut short.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadIdentityError {
    #[error("workload identity: {0}")]
    Client(String),
    #[error("workload identity: {what}: {source}")]
    Request {
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("workload identity: {what}: HTTP {status}{}", detail_suffix(.detail))]
    Status {
        what: &'static str,
        status: u16,
        detail: String,
    },
    #[error("workload identity: {what}: the answer did not parse")]
    Parse { what: &'static str },
    #[error("workload identity: {0}")]
    Gave(String),
    #[error("workload identity: {0}")]
    Azure(#[from] crate::azure::AzureError),
    #[error(
        "workload identity: no configuration token in the servers Key Vault ({secret}) although the Vault tier is done: \
         its bootstrap did not prepare workload identities; see docs/bootstrap.md#nomad-workload-identities"
    )]
    NoToken { secret: String },
}

fn detail_suffix(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(": {d}")
    }
}

// ----- typed request bodies ---------------------------------------------------------------------------------

/// `POST /v1/sys/mounts/:path` and `POST /v1/sys/auth/:path`.
#[derive(Debug, Serialize, PartialEq)]
pub struct MountRequest {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'static str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<&'static str, &'static str>,
}

/// A Vault ACL policy in its JSON form (Vault takes HCL or JSON): path → capabilities.
#[derive(Debug, Serialize, PartialEq)]
pub struct AclPolicy {
    pub path: BTreeMap<String, PathRule>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PathRule {
    pub capabilities: Vec<&'static str>,
}

/// `PUT /v1/sys/policies/acl/:name`.
#[derive(Debug, Serialize)]
struct PolicyWrite {
    policy: String,
}

/// `POST /v1/auth/jwt-nomad/role/nomad-workloads`: Nomad's documented default role.
#[derive(Debug, Serialize, PartialEq)]
pub struct JwtRole {
    pub role_type: &'static str,
    pub bound_audiences: Vec<&'static str>,
    pub user_claim: &'static str,
    pub user_claim_json_pointer: bool,
    pub claim_mappings: BTreeMap<&'static str, &'static str>,
    pub token_type: &'static str,
    pub token_period: &'static str,
    pub token_policies: Vec<&'static str>,
}

/// `POST /v1/auth/jwt-nomad/config` (and what `GET` answers, for the fields we set).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwtConfig {
    pub jwks_url: String,
    pub jwks_ca_pem: String,
    pub jwt_supported_algs: Vec<String>,
    pub default_role: String,
}

/// The ACL policy `nomad-workloads` for the auth method whose accessor is `accessor`: a job reads
/// `secret/data/<namespace>/<job>` and everything under it, lists its namespace's metadata and the mount's.
pub fn workloads_policy(accessor: &str) -> AclPolicy {
    let alias =
        |claim: &str| format!("{{{{identity.entity.aliases.{accessor}.metadata.{claim}}}}}");
    let (ns, job) = (alias("nomad_namespace"), alias("nomad_job_id"));
    let kv = WORKLOAD_KV_MOUNT;
    let rule = |caps: &[&'static str]| PathRule {
        capabilities: caps.to_vec(),
    };
    AclPolicy {
        path: BTreeMap::from([
            (format!("{kv}/data/{ns}/{job}/*"), rule(&["read"])),
            (format!("{kv}/data/{ns}/{job}"), rule(&["read"])),
            (format!("{kv}/metadata/{ns}/*"), rule(&["list"])),
            (format!("{kv}/metadata/*"), rule(&["list"])),
        ]),
    }
}

/// Nomad's default role for workloads (`nomad setup vault`'s `vault-wi-default-role.json`).
pub fn workloads_role() -> JwtRole {
    JwtRole {
        role_type: "jwt",
        bound_audiences: vec![NOMAD_VAULT_AUDIENCE],
        user_claim: "/nomad_job_id",
        user_claim_json_pointer: true,
        claim_mappings: BTreeMap::from([
            ("nomad_namespace", "nomad_namespace"),
            ("nomad_job_id", "nomad_job_id"),
            ("nomad_task", "nomad_task"),
        ]),
        token_type: "service",
        token_period: "30m",
        token_policies: vec![NOMAD_WORKLOAD_POLICY],
    }
}

/// The auth method's configuration: the Nomad servers' JWKS (`nomad_address` + [`JWKS_PATH`]) verified with
/// the cluster CA.
pub fn desired_config(nomad_address: &str, ca_pem: &str) -> JwtConfig {
    JwtConfig {
        jwks_url: format!("{}{JWKS_PATH}", nomad_address.trim_end_matches('/')),
        jwks_ca_pem: ca_pem.to_string(),
        jwt_supported_algs: SUPPORTED_ALGS.iter().map(|s| s.to_string()).collect(),
        default_role: NOMAD_WORKLOAD_ROLE.into(),
    }
}

/// Whether the configuration Vault holds is ours (PEMs compared without surrounding whitespace).
pub fn config_matches(have: &JwtConfig, want: &JwtConfig) -> bool {
    let mut a = have.jwt_supported_algs.clone();
    let mut b = want.jwt_supported_algs.clone();
    a.sort();
    b.sort();
    have.jwks_url == want.jwks_url
        && have.jwks_ca_pem.trim() == want.jwks_ca_pem.trim()
        && a == b
        && have.default_role == want.default_role
}

// ----- calls ------------------------------------------------------------------------------------------------

fn settle(deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        deadline,
        attempt_timeout: Duration::from_secs(15),
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(2),
    }
}

/// The first error of a Vault answer (`{"errors": [...]}`), cut to 200 characters.
fn first_error(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    serde_json::from_slice::<Errors>(body)
        .ok()
        .and_then(|e| e.errors.into_iter().next())
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

/// An answer that is not an error for the caller.
#[derive(Debug, Clone, Copy)]
enum Tolerate {
    /// A 400 whose first error contains this: "already done".
    BadRequest(&'static str),
    /// 404: nothing there yet (a configuration never written).
    NotFound,
}

/// One authenticated call, retried while Vault settles (connection errors, 429, 5xx); a `tolerate`d answer
/// gives an empty body. Returns the body.
async fn call(
    (c, token, deadline): (&reqwest::Client, &str, Duration),
    method: reqwest::Method,
    url: &str,
    body: Option<&serde_json::Value>,
    what: &'static str,
    tolerate: Option<Tolerate>,
) -> Result<Vec<u8>, WorkloadIdentityError> {
    let r = retry(settle(deadline), |_| {
        let mut req = c
            .request(method.clone(), url)
            .header("X-Vault-Token", token);
        if let Some(b) = body {
            req = req.json(b);
        }
        async move {
            let r = match req.send().await {
                Ok(r) => r,
                Err(e) => return Attempt::Retry(CallError::transport(what, e)),
            };
            let status = r.status().as_u16();
            let bytes = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            let detail = first_error(&bytes);
            match status {
                200..=299 => Attempt::Done(Ok(bytes)),
                400 if matches!(tolerate, Some(Tolerate::BadRequest(t)) if detail.contains(t)) => {
                    Attempt::Done(Ok(Vec::new()))
                }
                404 if matches!(tolerate, Some(Tolerate::NotFound)) => {
                    Attempt::Done(Ok(Vec::new()))
                }
                429 | 500..=599 => Attempt::Retry(CallError::status(what, status)),
                _ => Attempt::Done(Err(WorkloadIdentityError::Status {
                    what,
                    status,
                    detail,
                })),
            }
        }
    })
    .await;
    match r {
        Ok(answer) => answer,
        Err(e) => Err(WorkloadIdentityError::Gave(e.to_string())),
    }
}

/// Step 1, with the root token at the Vault tier's bootstrap: the KV v2 mount `secret/`, the JWT auth method
/// `jwt-nomad`, the policy `nomad-workloads` (templated on the method's accessor), the role
/// `nomad-workloads`, and a periodic orphan token of the policy `hashistack-nomad-jwt-config`, returned.
/// Idempotent: a mount already in use is kept; policies and the role are overwritten with the same content.
pub async fn prepare(
    api: &str,
    ca_file: &Path,
    root: &str,
) -> Result<Zeroizing<String>, WorkloadIdentityError> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(30))
        .map_err(|e| WorkloadIdentityError::Client(e.to_string()))?;
    let d = Duration::from_secs(60);
    let post = reqwest::Method::POST;
    let kv = MountRequest {
        kind: "kv",
        description: Some(
            "hashistack: secrets of Nomad workloads (secret/data/<namespace>/<job>/...)",
        ),
        options: BTreeMap::from([("version", "2")]),
    };
    call(
        (&c, root, d),
        post.clone(),
        &format!("{api}/v1/sys/mounts/{WORKLOAD_KV_MOUNT}"),
        Some(&json(&kv)),
        "kv mount",
        Some(Tolerate::BadRequest("path is already in use")),
    )
    .await?;
    let jwt = MountRequest {
        kind: "jwt",
        description: Some("hashistack: Nomad workload identities"),
        options: BTreeMap::new(),
    };
    call(
        (&c, root, d),
        post.clone(),
        &format!("{api}/v1/sys/auth/{NOMAD_JWT_MOUNT}"),
        Some(&json(&jwt)),
        "jwt auth method",
        Some(Tolerate::BadRequest("path is already in use")),
    )
    .await?;
    let accessor = auth_accessor(&c, api, root, d).await?;
    let policy = PolicyWrite {
        policy: serde_json::to_string(&workloads_policy(&accessor)).expect("policy serialises"),
    };
    call(
        (&c, root, d),
        reqwest::Method::PUT,
        &format!("{api}/v1/sys/policies/acl/{NOMAD_WORKLOAD_POLICY}"),
        Some(&json(&policy)),
        "workloads policy",
        None,
    )
    .await?;
    call(
        (&c, root, d),
        post.clone(),
        &format!("{api}/v1/auth/{NOMAD_JWT_MOUNT}/role/{NOMAD_WORKLOAD_ROLE}"),
        Some(&json(&workloads_role())),
        "workloads role",
        None,
    )
    .await?;
    // The smoke test's canary (names.rs): a fixed public marker the canary job reads with its identity.
    call(
        (&c, root, d),
        post.clone(),
        &format!("{api}/v1/{SMOKE_SECRET_PATH}"),
        Some(&json(&canary_write())),
        "smoke canary",
        None,
    )
    .await?;
    let config_policy = PolicyWrite {
        policy: NOMAD_JWT_CONFIG_RULES.into(),
    };
    call(
        (&c, root, d),
        reqwest::Method::PUT,
        &format!("{api}/v1/sys/policies/acl/{NOMAD_JWT_CONFIG_POLICY}"),
        Some(&json(&config_policy)),
        "jwt config policy",
        None,
    )
    .await?;
    let create = TokenCreate {
        policies: vec![NOMAD_JWT_CONFIG_POLICY],
        no_default_policy: true,
        period: VAULT_TOKEN_PERIOD,
        renewable: true,
        display_name: "hashistack-nomad-jwt-config",
    };
    let body = call(
        (&c, root, d),
        post,
        &format!("{api}/v1/auth/token/create-orphan"),
        Some(&json(&create)),
        "jwt config token",
        None,
    )
    .await?;
    let body = Zeroizing::new(body);
    #[derive(Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
    struct Auth {
        client_token: String,
    }
    #[derive(Deserialize)]
    struct Created {
        auth: Auth,
    }
    let mut t: Created =
        serde_json::from_slice(&body).map_err(|_| WorkloadIdentityError::Parse {
            what: "jwt config token",
        })?;
    Ok(Zeroizing::new(std::mem::take(&mut t.auth.client_token)))
}

/// `POST /v1/secret/data/default/hashistack-smoke` (KV v2): `{"data": {"canary": "<marker>"}}`.
#[derive(Debug, Serialize, PartialEq)]
pub struct KvWrite {
    pub data: BTreeMap<&'static str, &'static str>,
}

/// The smoke test's canary secret: the public marker `hashistack-agent smoke` compares the rendered file with.
pub fn canary_write() -> KvWrite {
    KvWrite {
        data: BTreeMap::from([(SMOKE_CANARY_KEY, SMOKE_CANARY)]),
    }
}

#[derive(Serialize)]
struct TokenCreate {
    policies: Vec<&'static str>,
    no_default_policy: bool,
    period: &'static str,
    renewable: bool,
    display_name: &'static str,
}

/// A typed request body as JSON.
fn json(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("request bodies serialise")
}

/// The accessor of the `jwt-nomad/` auth method (`GET /v1/sys/auth`).
async fn auth_accessor(
    c: &reqwest::Client,
    api: &str,
    root: &str,
    d: Duration,
) -> Result<String, WorkloadIdentityError> {
    #[derive(Deserialize)]
    struct Mount {
        accessor: String,
    }
    #[derive(Deserialize)]
    struct Mounts {
        data: BTreeMap<String, Mount>,
    }
    const WHAT: &str = "auth methods";
    let body = call(
        (c, root, d),
        reqwest::Method::GET,
        &format!("{api}/v1/sys/auth"),
        None,
        WHAT,
        None,
    )
    .await?;
    let m: Mounts =
        serde_json::from_slice(&body).map_err(|_| WorkloadIdentityError::Parse { what: WHAT })?;
    m.data
        .get(&format!("{NOMAD_JWT_MOUNT}/"))
        .map(|m| m.accessor.clone())
        .ok_or(WorkloadIdentityError::Status {
            what: WHAT,
            status: 200,
            detail: format!("{NOMAD_JWT_MOUNT}/ is not listed"),
        })
}

/// What [`ensure_config`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// Vault already held this configuration: nothing written.
    Unchanged,
    Written,
}

/// How a configuration write answered, for the retry loop: Vault fetches the JWKS when the configuration is
/// written and refuses it while the Nomad servers do not answer ("error checking jwks URL"), which a Nomad
/// tier that just finished (or is restarting) does for a moment: retried. Any other 4xx is final.
pub fn classify_config_write(status: u16, detail: &str) -> Attempt<(), CallError> {
    const CALL: &str = "jwt config";
    match status {
        200..=299 => Attempt::Done(()),
        400 if detail.contains("error checking jwks URL") => {
            Attempt::Retry(CallError::refused(CALL, status, detail))
        }
        429 | 500..=599 => Attempt::Retry(CallError::status(CALL, status)),
        _ => Attempt::Fail(CallError::refused(CALL, status, detail)),
    }
}

/// Step 2: makes `auth/jwt-nomad/config` equal to `want`, with the configuration token (renewed first, so
/// that a token used at every boot never expires). Retries while the JWKS is unreachable, up to `deadline`.
pub async fn ensure_config(
    api: &str,
    ca_file: &Path,
    token: &str,
    want: &JwtConfig,
    deadline: Duration,
) -> Result<Ensured, WorkloadIdentityError> {
    let c = crate::services::health::client_for(ca_file, Duration::from_secs(30))
        .map_err(|e| WorkloadIdentityError::Client(e.to_string()))?;
    let d = Duration::from_secs(60).min(deadline);
    call(
        (&c, token, d),
        reqwest::Method::POST,
        &format!("{api}/v1/auth/token/renew-self"),
        Some(&serde_json::json!({})),
        "jwt config token renewal",
        None,
    )
    .await?;
    let url = format!("{api}/v1/auth/{NOMAD_JWT_MOUNT}/config");
    #[derive(Deserialize)]
    struct Read {
        data: Option<JwtConfig>,
    }
    let have = call(
        (&c, token, d),
        reqwest::Method::GET,
        &url,
        None,
        "jwt config read",
        // Before the first write, OpenBao answers the read with 404.
        Some(Tolerate::NotFound),
    )
    .await?;
    if let Ok(Read { data: Some(have) }) = serde_json::from_slice::<Read>(&have) {
        if config_matches(&have, want) {
            return Ok(Ensured::Unchanged);
        }
    }
    let body = serde_json::to_value(want).expect("config serialises");
    retry(settle(deadline), |_| {
        let req = c
            .post(&url)
            .header("X-Vault-Token", token)
            .json(&body)
            .send();
        async move {
            let r = match req.await {
                Ok(r) => r,
                Err(e) => return Attempt::Retry(CallError::transport("jwt config", e)),
            };
            let status = r.status().as_u16();
            let detail = first_error(&r.bytes().await.unwrap_or_default());
            classify_config_write(status, &detail)
        }
    })
    .await
    .map_err(|e| WorkloadIdentityError::Gave(e.to_string()))?;
    Ok(Ensured::Written)
}

/// What [`converge`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converged {
    /// A tier is not done yet (named): the node of the tier that finishes last writes the configuration.
    Waiting {
        tier: &'static str,
    },
    Ensured(Ensured),
}

/// Where [`converge`] reads and writes.
pub struct ConvergeCtx<'a> {
    pub az: &'a crate::azure::Azure,
    pub blob_endpoint: &'a str,
    pub cluster: &'a str,
    pub servers_vault: &'a str,
    /// Vault's address (the load balancer: the active node) and the cluster CA that verifies it.
    pub vault_api: &'a str,
    pub ca_file: &'a Path,
    /// The Nomad servers' HTTP API as Vault reaches it.
    pub nomad_api: &'a str,
    pub policy: RetryPolicy,
    /// How long the JWKS may stay unreachable before this boot gives up (the next boot tries again).
    pub deadline: Duration,
}

/// Run by every Vault and Nomad server after its tier's bootstrap, at every boot: once both tiers are `done`
/// (coordination state), the configuration token from the servers Key Vault makes `auth/jwt-nomad/config`
/// point at the Nomad servers' JWKS. Each tier marks itself done before it looks at the other, so whichever
/// finishes last sees both done: order does not matter, and a reboot finds the configuration in place.
pub async fn converge(ctx: &ConvergeCtx<'_>) -> Result<Converged, WorkloadIdentityError> {
    for tier in ["vault", "nomad"] {
        let st =
            crate::coordination::read(ctx.az, ctx.blob_endpoint, ctx.cluster, tier, ctx.policy)
                .await?;
        if st.map(|s| s.phase) != Some(crate::coordination::TierPhase::Done) {
            return Ok(Converged::Waiting { tier });
        }
    }
    let secret = crate::names::nomad_jwt_token_secret(ctx.cluster);
    let token = crate::material::get_secret(ctx.az, ctx.servers_vault, &secret, ctx.policy)
        .await?
        .ok_or(WorkloadIdentityError::NoToken { secret })?;
    let ca_pem = std::fs::read_to_string(ctx.ca_file)
        .map_err(|e| WorkloadIdentityError::Client(format!("{}: {e}", ctx.ca_file.display())))?;
    let want = desired_config(ctx.nomad_api, &ca_pem);
    ensure_config(ctx.vault_api, ctx.ca_file, &token, &want, ctx.deadline)
        .await
        .map(Converged::Ensured)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_is_nomads_documented_template() {
        let p = serde_json::to_value(workloads_policy("auth_jwt_1234")).unwrap();
        let a = "identity.entity.aliases.auth_jwt_1234.metadata";
        assert_eq!(
            p,
            serde_json::json!({"path": {
                format!("secret/data/{{{{{a}.nomad_namespace}}}}/{{{{{a}.nomad_job_id}}}}/*"): {"capabilities": ["read"]},
                format!("secret/data/{{{{{a}.nomad_namespace}}}}/{{{{{a}.nomad_job_id}}}}"): {"capabilities": ["read"]},
                format!("secret/metadata/{{{{{a}.nomad_namespace}}}}/*"): {"capabilities": ["list"]},
                "secret/metadata/*": {"capabilities": ["list"]},
            }})
        );
        let text = p.to_string();
        assert!(
            !text.contains("\"update\"") && !text.contains("\"create\""),
            "{text}"
        );
    }

    #[test]
    fn the_canary_is_a_kv2_write_of_the_public_marker_at_the_jobs_own_path() {
        assert_eq!(
            serde_json::to_value(canary_write()).unwrap(),
            serde_json::json!({"data": {"canary": SMOKE_CANARY}})
        );
        // The workloads policy lets job `hashistack-smoke` of namespace `default` read exactly this path.
        assert_eq!(SMOKE_SECRET_PATH, "secret/data/default/hashistack-smoke");
    }

    #[test]
    fn the_role_is_nomads_default_role() {
        assert_eq!(
            serde_json::to_value(workloads_role()).unwrap(),
            serde_json::json!({
                "role_type": "jwt",
                "bound_audiences": ["vault.io"],
                "user_claim": "/nomad_job_id",
                "user_claim_json_pointer": true,
                "claim_mappings": {"nomad_namespace": "nomad_namespace", "nomad_job_id": "nomad_job_id", "nomad_task": "nomad_task"},
                "token_type": "service",
                "token_period": "30m",
                "token_policies": ["nomad-workloads"]
            })
        );
    }

    #[test]
    fn the_config_points_at_the_jwks_with_the_ca() {
        let c = desired_config("https://nomad.service.consul:4646/", "PEM\n");
        assert_eq!(
            c.jwks_url,
            "https://nomad.service.consul:4646/.well-known/jwks.json"
        );
        assert_eq!(c.default_role, "nomad-workloads");
        let mut have = c.clone();
        have.jwks_ca_pem = "PEM".into();
        have.jwt_supported_algs.reverse();
        assert!(
            config_matches(&have, &c),
            "whitespace and order do not matter"
        );
        have.jwks_url = "https://elsewhere:4646/.well-known/jwks.json".into();
        assert!(!config_matches(&have, &c));
    }

    #[test]
    fn an_unreachable_jwks_is_retried_and_other_refusals_are_final() {
        assert!(matches!(classify_config_write(204, ""), Attempt::Done(())));
        assert!(matches!(
            classify_config_write(400, "error checking jwks URL: Get \"https://x/.well-known/jwks.json\": dial tcp: connection refused"),
            Attempt::Retry(_)
        ));
        assert!(matches!(classify_config_write(503, ""), Attempt::Retry(_)));
        assert!(matches!(
            classify_config_write(400, "error checking jwks_ca_pem: could not parse"),
            Attempt::Fail(_)
        ));
        assert!(matches!(
            classify_config_write(403, "permission denied"),
            Attempt::Fail(_)
        ));
    }
}
