//! Vault/OpenBao bootstrap: `PUT /v1/sys/init` with recovery shares (auto-unseal), then the file audit
//! device and raft autopilot with dead-server cleanup (scale sets replace VMs).
//!
//! The audit device: OpenBao ≥ 2.4 declares it in its configuration (rendered by agent/src/render/vault.rs)
//! and refuses API-created devices; HashiCorp Vault has no such configuration and takes
//! `PUT /v1/sys/audit/file`. Either way the result is verified with `GET /v1/sys/audit` and reported as it is.

use super::http::CallError;
use super::{Tier, TierError, TierFailure};
use crate::render::vault::{AUDIT_DESCRIPTION, AUDIT_DEVICE_PATH};
use crate::retry::{retry, Attempt, NotYet, RetryError, RetryPolicy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The `PUT /v1/sys/init` body for an auto-unsealed Vault. With operators' PGP keys (base64 of the binary
/// key, as `vault operator init -recovery-pgp-keys` takes them), Vault returns recovery key *i* encrypted to
/// key *i*. `root_token_pgp_key` is never sent: the agent needs the root token in clear for the
/// post-bootstrap configuration, and encrypts it to the operator keys itself before it is escrowed
/// (escrow/pgp.rs).
#[derive(Debug, Serialize, PartialEq)]
pub struct InitRequest {
    pub recovery_shares: u8,
    pub recovery_threshold: u8,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recovery_pgp_keys: Vec<String>,
}

pub fn init_request(shares: u8, threshold: u8, recovery_pgp_keys: &[String]) -> InitRequest {
    InitRequest {
        recovery_shares: shares,
        recovery_threshold: threshold,
        recovery_pgp_keys: recovery_pgp_keys.to_vec(),
    }
}

pub struct VaultTier {
    /// Operators' PGP keys, one per recovery share (empty: the recovery keys come back in clear).
    pub recovery_pgp_keys: Vec<String>,
    pub api: String,
    pub ca_file: PathBuf,
    pub recovery_shares: u8,
    pub recovery_threshold: u8,
    pub servers: u8,
    pub audit_file: PathBuf,
    /// The shared cluster-material Key Vault (client, URI), where tokens for other nodes are handed over.
    pub shared: Option<(crate::azure::Azure, String)>,
    /// The status vault (URI; same client as `shared`), where only the jumpbox may read the status token.
    pub status_vault: Option<String>,
    /// Where the Nomad workload identities' configuration token is handed over (the servers Key Vault and the
    /// secret's name; bootstrap/workload_identity.rs). `None`: the tier does not prepare workload identities.
    pub workload_identity: Option<WorkloadIdentityHandover>,
    /// The servers vault, where the tier's snapshot credential goes. `None`: none is created.
    pub snapshot: Option<super::snapshot_tokens::HandOver>,
    /// This node's Vault storage, for the one repair the bootstrap makes itself (a half-initialized node after
    /// its own init call was cut off). `None`: that case needs an operator.
    pub local: Option<Box<dyn LocalStorage>>,
}

/// The servers Key Vault (client, URI) and the secret name the JWT configuration token goes to.
pub struct WorkloadIdentityHandover {
    pub az: crate::azure::Azure,
    pub servers_vault: String,
    pub secret: String,
}

/// The local Vault's storage: wiped and the server restarted by [`Tier::reset_local`].
#[async_trait::async_trait]
pub trait LocalStorage: Send + Sync {
    async fn reset(&self) -> Result<(), TierError>;
}

/// On a node: stop the service, empty its data directory (raft), start it again.
pub struct ServiceStorage {
    pub manager: std::sync::Arc<dyn crate::services::ServiceManager>,
    pub service: crate::services::ServiceSpec,
    pub data_dir: PathBuf,
}

#[async_trait::async_trait]
impl LocalStorage for ServiceStorage {
    async fn reset(&self) -> Result<(), TierError> {
        let step = |step: &'static str| {
            move |e: &dyn std::fmt::Display| TierError::Step {
                step,
                detail: e.to_string(),
            }
        };
        self.manager
            .stop(&self.service)
            .await
            .map_err(|e| step("storage reset: stop")(&e))?;
        empty_dir(&self.data_dir).map_err(|e| TierError::Step {
            step: "storage reset: empty",
            detail: format!("{}: {e}", self.data_dir.display()),
        })?;
        self.manager
            .apply(&self.service, false)
            .await
            .map(|_| ())
            .map_err(|e| step("storage reset: start")(&e))
    }
}

/// Removes everything inside `dir` (the directory itself, its owner and mode stay).
pub fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// What a refused `sys/init` means (status, the server's first error).
pub fn classify_init_refusal(status: u16, body: &[u8]) -> TierFailure {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    let first = serde_json::from_slice::<Errors>(body)
        .ok()
        .and_then(|e| e.errors.into_iter().next())
        .unwrap_or_default();
    let detail: String = first.chars().take(300).collect();
    match status {
        400 if detail.contains("already initialized") => {
            TierFailure::AlreadyDone("Vault is already initialized".into())
        }
        // OpenBao/Vault: "could not bootstrap clustered storage: error bootstrapping cluster: cluster already
        // has state" — raft was bootstrapped by an init that never wrote its seal configuration.
        400 if detail.contains("cluster already has state") => {
            TierFailure::HalfInitialized(format!("init: HTTP {status}: {detail}"))
        }
        400..=499 => TierFailure::Refused(format!("init: HTTP {status}: {detail}")),
        _ => TierFailure::Other(format!("init: HTTP {status}")),
    }
}

#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct InitResponse {
    #[serde(default)]
    recovery_keys_base64: Vec<String>,
    root_token: String,
}

/// What is escrowed for the Vault tier.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct VaultSecrets {
    pub kind: String,
    pub recovery_keys_base64: Vec<String>,
    pub recovery_threshold: u8,
    pub root_token: String,
}

#[derive(Deserialize)]
struct SealStatus {
    initialized: bool,
    sealed: bool,
}

/// One audit device as `GET /v1/sys/audit` lists it (keyed by mount path, e.g. `file/`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct AuditMount {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct AuditList {
    #[serde(default)]
    data: BTreeMap<String, AuditMount>,
}

/// Our device in a `sys/audit` listing.
#[derive(Debug, PartialEq, Eq)]
pub enum AuditDeviceState {
    /// `file/` is a file device writing to the expected path.
    Active,
    /// Nothing is mounted at `file/`.
    Missing,
    /// Something else is mounted at `file/`: reported, never replaced.
    Different(String),
}

/// Looks for the `file/` device writing to `expected` among the listed devices.
pub fn audit_device_state(
    devices: &BTreeMap<String, AuditMount>,
    expected: &Path,
) -> AuditDeviceState {
    let Some(m) = devices.get(&format!("{AUDIT_DEVICE_PATH}/")) else {
        return AuditDeviceState::Missing;
    };
    let path = m.options.get("file_path").map(String::as_str);
    if m.kind == "file" && path == Some(expected.to_string_lossy().as_ref()) {
        AuditDeviceState::Active
    } else {
        AuditDeviceState::Different(format!(
            "type {}, file_path {}",
            m.kind,
            path.unwrap_or("(none)")
        ))
    }
}

/// What an answer to `PUT /v1/sys/audit/file` means.
#[derive(Debug, PartialEq, Eq)]
pub enum EnableAnswer {
    Enabled,
    /// "path already in use": enabled before (an earlier run); the listing decides whether it is ours.
    InUse,
    /// OpenBao ≥ 2.3.2: "cannot enable audit device via API; use declarative, config-based audit device
    /// management instead". The device must come from the configuration.
    DeclarativeOnly,
    /// A standby, an unsealing node, a 5xx: try again.
    Retry(CallError),
    Final(CallError),
}

pub fn classify_enable(status: u16, body: &str) -> EnableAnswer {
    match status {
        200..=299 => EnableAnswer::Enabled,
        400 if body.contains("already in use") => EnableAnswer::InUse,
        400 if body.contains("cannot enable audit device via API") => EnableAnswer::DeclarativeOnly,
        429 | 500..=599 => EnableAnswer::Retry(CallError::status("audit device", status)),
        _ => EnableAnswer::Final(CallError::status("audit device", status)),
    }
}

/// How the audit device came to be active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditVia {
    /// Listed by the server without an API call: declared in its configuration (OpenBao).
    Configuration,
    /// Enabled through `PUT /v1/sys/audit/file` (HashiCorp Vault), then listed.
    Api,
}

/// How long a device the server must have from its configuration (it refused the API) may take to be listed.
const DECLARED_AUDIT_GRACE: Duration = Duration::from_secs(15);

/// Retries for the audit calls right after the unseal (the active node may answer 5xx for a moment).
fn audit_policy(deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        deadline,
        attempt_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(2),
    }
}

/// Why the file audit device is not active as configured: worded for the operator, with the procedure.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// `sys/audit` could not be listed.
    #[error(transparent)]
    Listing(RetryError<CallError>),
    /// Enabling the device through the API failed.
    #[error(transparent)]
    Enable(RetryError<CallError>),
    /// Another device is mounted at the path (never replaced).
    #[error(
        "audit device not active as configured: {path}/ is {found}, expected a file device writing to {}; \
         see docs/bootstrap.md#finish-configuration",
        .expected.display(),
        path = AUDIT_DEVICE_PATH
    )]
    Different { found: String, expected: PathBuf },
    /// The API said enabled, the listing does not show it.
    #[error(
        "audit device: enabled through the API but sys/audit does not list {path}/; \
         see docs/bootstrap.md#finish-configuration",
        path = AUDIT_DEVICE_PATH
    )]
    NotListed,
    /// The server refuses API-enabled devices and lists no declared one.
    #[error(
        "audit device not active: the server refuses API-enabled audit devices and sys/audit \
         lists no declared {path}/ device (the agent declares it for OpenBao >= {since}); \
         see docs/bootstrap.md#finish-configuration",
        path = AUDIT_DEVICE_PATH,
        since = crate::render::vault::OPENBAO_DECLARATIVE_AUDIT
    )]
    NotDeclared,
}

impl VaultTier {
    fn client(&self, timeout: Duration) -> Result<reqwest::Client, CallError> {
        crate::services::health::client_for(&self.ca_file, timeout)
            .map_err(|e| CallError::Client(e.to_string()))
    }

    async fn seal_status(&self) -> Result<SealStatus, CallError> {
        let c = self.client(Duration::from_secs(5))?;
        let r = c
            .get(format!("{}/v1/sys/seal-status", self.api))
            .send()
            .await
            .map_err(|e| CallError::transport("seal-status", e))?;
        r.json::<SealStatus>()
            .await
            .map_err(|_| CallError::unparsable("seal-status"))
    }

    /// `GET /v1/sys/audit` with the root token: the devices the server has mounted. The request is itself
    /// audited, and a server whose every device fails to log refuses it: a listing proves the listed device
    /// writes.
    async fn audit_devices(
        &self,
        c: &reqwest::Client,
        token: &str,
    ) -> Result<BTreeMap<String, AuditMount>, AuditError> {
        let url = format!("{}/v1/sys/audit", self.api);
        retry(audit_policy(Duration::from_secs(30)), |_| {
            let req = c.get(&url).header("X-Vault-Token", token).send();
            async move {
                let r = match req.await {
                    Ok(r) => r,
                    Err(e) => return Attempt::Retry(CallError::transport("sys/audit", e)),
                };
                let status = r.status().as_u16();
                match status {
                    200 => match r.json::<AuditList>().await {
                        Ok(l) => Attempt::Done(l.data),
                        Err(_) => Attempt::Fail(CallError::unparsable("sys/audit")),
                    },
                    429 | 500..=599 => Attempt::Retry(CallError::status("sys/audit", status)),
                    _ => Attempt::Fail(CallError::status("sys/audit", status)),
                }
            }
        })
        .await
        .map_err(AuditError::Listing)
    }

    /// Makes sure the file audit device is active and says how; an error says why not, for the tier state.
    /// A device the configuration declares (OpenBao) is listed as soon as the server is unsealed and no API
    /// call is made; otherwise (HashiCorp Vault) it is enabled through the API. Either way the listing is
    /// the proof.
    pub async fn ensure_audit(
        &self,
        c: &reqwest::Client,
        token: &str,
    ) -> Result<AuditVia, AuditError> {
        self.ensure_audit_within(c, token, DECLARED_AUDIT_GRACE)
            .await
    }

    /// [`Self::ensure_audit`], giving a declared device `grace` to appear after an API refusal.
    async fn ensure_audit_within(
        &self,
        c: &reqwest::Client,
        token: &str,
        grace: Duration,
    ) -> Result<AuditVia, AuditError> {
        let expected = self.audit_file.as_path();
        let different = |found: String| AuditError::Different {
            found,
            expected: expected.to_path_buf(),
        };
        match audit_device_state(&self.audit_devices(c, token).await?, expected) {
            AuditDeviceState::Active => return Ok(AuditVia::Configuration),
            AuditDeviceState::Different(d) => return Err(different(d)),
            AuditDeviceState::Missing => {}
        }
        // Not declared: enable it through the API (HashiCorp Vault).
        let url = format!("{}/v1/sys/audit/{AUDIT_DEVICE_PATH}", self.api);
        let body = serde_json::json!({
            "type": "file",
            "description": AUDIT_DESCRIPTION,
            "options": {"file_path": expected.display().to_string()},
        });
        let answer = retry(audit_policy(Duration::from_secs(20)), |_| {
            let req = c
                .put(&url)
                .header("X-Vault-Token", token)
                .json(&body)
                .send();
            async move {
                let r = match req.await {
                    Ok(r) => r,
                    Err(e) => return Attempt::Retry(CallError::transport("audit device", e)),
                };
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                match classify_enable(status, &text) {
                    EnableAnswer::Retry(e) => Attempt::Retry(e),
                    EnableAnswer::Final(e) => Attempt::Fail(e),
                    a => Attempt::Done(a),
                }
            }
        })
        .await
        .map_err(AuditError::Enable)?;
        match answer {
            EnableAnswer::Enabled | EnableAnswer::InUse => {
                match audit_device_state(&self.audit_devices(c, token).await?, expected) {
                    AuditDeviceState::Active => Ok(AuditVia::Api),
                    AuditDeviceState::Different(d) => Err(different(d)),
                    AuditDeviceState::Missing => Err(AuditError::NotListed),
                }
            }
            _ => {
                // OpenBao: only a declared device can exist. It is mounted at the unseal; give a slow active
                // node a moment before saying it is not there.
                let r = retry(
                    RetryPolicy::poll(grace, Duration::from_millis(500), Duration::from_secs(10)),
                    |_| async {
                        match self.audit_devices(c, token).await {
                            Err(e) => Attempt::Done(Err(e)),
                            Ok(devices) => match audit_device_state(&devices, expected) {
                                AuditDeviceState::Active => {
                                    Attempt::Done(Ok(AuditVia::Configuration))
                                }
                                AuditDeviceState::Different(d) => Attempt::Done(Err(different(d))),
                                AuditDeviceState::Missing => {
                                    Attempt::Retry(NotYet("not listed".into()))
                                }
                            },
                        }
                    },
                )
                .await;
                match r {
                    Ok(answer) => answer,
                    // Nothing else stops the poll: only "not listed" is retried.
                    Err(RetryError::Final(_) | RetryError::Deadline { .. }) => {
                        Err(AuditError::NotDeclared)
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Tier for VaultTier {
    fn name(&self) -> &'static str {
        "vault"
    }

    async fn wait_ready(&self, deadline: Duration) -> Result<(), TierError> {
        retry(
            RetryPolicy::poll(
                deadline,
                Duration::from_millis(500),
                Duration::from_secs(10),
            ),
            |_| async {
                match self.seal_status().await {
                    Ok(_) => Attempt::Done(()),
                    Err(e) => Attempt::Retry(e),
                }
            },
        )
        .await
        .map_err(|e| TierError::NotReady {
            product: "Vault",
            waited: deadline,
            last: e.last().to_string(),
        })
    }

    async fn already_bootstrapped(&self) -> Result<Option<bool>, TierError> {
        Ok(Some(self.seal_status().await?.initialized))
    }

    async fn bootstrap(&self) -> Result<Zeroizing<Vec<u8>>, TierFailure> {
        // Generous timeout: an init that succeeded on the server while the client gave up would leave the
        // secrets nowhere. Only a connection that never reached the server is retried.
        let c = self
            .client(Duration::from_secs(180))
            .map_err(|e| TierFailure::Other(e.to_string()))?;
        let body = init_request(
            self.recovery_shares,
            self.recovery_threshold,
            &self.recovery_pgp_keys,
        );
        // Connection refusals only (the call never reached the server), at most 10; the deadline leaves every
        // attempt the client's whole 180 s.
        let resp = retry(
            RetryPolicy::poll(
                Duration::from_secs(400),
                Duration::from_secs(1),
                Duration::from_secs(190),
            ),
            |n| {
                let (c, body) = (&c, &body);
                async move {
                    match c
                        .put(format!("{}/v1/sys/init", self.api))
                        .json(body)
                        .send()
                        .await
                    {
                        Ok(r) => Attempt::Done(r),
                        Err(e) if e.is_connect() && n < 10 => {
                            Attempt::Retry(NotYet(e.without_url().to_string()))
                        }
                        Err(e) => Attempt::Fail(NotYet(e.without_url().to_string())),
                    }
                }
            },
        )
        .await
        .map_err(|e| TierFailure::Other(format!("init: {}", e.last())))?;
        let status = resp.status().as_u16();
        let mut bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        if status != 200 {
            // A refusal carries no secret; only an answer of 200 does.
            let failure = classify_init_refusal(status, &bytes);
            bytes.zeroize();
            return Err(failure);
        }
        let parsed: Result<InitResponse, _> = serde_json::from_slice(&bytes);
        bytes.zeroize();
        let mut init =
            parsed.map_err(|_| TierFailure::Other("init response did not parse".into()))?;
        let secrets = VaultSecrets {
            kind: "vault-init".into(),
            recovery_keys_base64: std::mem::take(&mut init.recovery_keys_base64),
            recovery_threshold: self.recovery_threshold,
            root_token: std::mem::take(&mut init.root_token),
        };
        Ok(crate::escrow::payload(&secrets))
    }

    async fn reset_local(&self) -> Result<(), TierError> {
        match &self.local {
            Some(l) => l.reset().await,
            None => Err(TierError::Unsupported(
                "has no handle on this node's storage",
            )),
        }
    }

    fn creates_cluster(&self) -> bool {
        true
    }

    async fn peer_initialized(&self, ip: &str) -> Result<bool, TierError> {
        let c = self.client(Duration::from_secs(3))?;
        let url = format!(
            "https://{ip}:{}/v1/sys/seal-status",
            crate::render::vault::API_PORT
        );
        let policy = RetryPolicy {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(2),
        };
        retry(policy, |_| {
            let (c, url) = (&c, &url);
            async move {
                match c.get(url.as_str()).send().await {
                    Ok(r) => match r.json::<SealStatus>().await {
                        Ok(s) => Attempt::Done(s.initialized),
                        Err(_) => Attempt::Fail(CallError::unparsable("peer seal-status")),
                    },
                    Err(e) => Attempt::Retry(CallError::transport("peer seal-status", e)),
                }
            }
        })
        .await
        .map_err(TierError::from)
    }

    async fn join(
        &self,
        policy: super::member::JoinPolicy,
    ) -> Result<super::member::Joined, super::member::JoinFailure> {
        use super::member::{converge, LocalState};
        converge(
            policy,
            || async {
                match self.seal_status().await {
                    Ok(s) if !s.initialized => LocalState::Uninitialized,
                    Ok(s) if s.sealed => LocalState::Sealed,
                    Ok(_) => LocalState::Member,
                    Err(e) => LocalState::Unreachable(e.to_string()),
                }
            },
            || self.reset_local(),
        )
        .await
    }

    async fn configure(&self, secrets: &[u8]) -> Result<(), TierError> {
        let s: VaultSecrets = serde_json::from_slice(secrets).map_err(|_| TierError::Payload)?;
        let token = Zeroizing::new(s.root_token.clone());
        drop(s);
        // Auto-unseal follows init within seconds; the active node then takes writes.
        retry(
            RetryPolicy::poll(
                Duration::from_secs(60),
                Duration::from_millis(300),
                Duration::from_secs(10),
            ),
            |_| async {
                match self.seal_status().await {
                    Ok(st) if !st.sealed => Attempt::Done(()),
                    Ok(_) => Attempt::Retry(NotYet("sealed".into())),
                    Err(e) => Attempt::Retry(NotYet(e.to_string())),
                }
            },
        )
        .await
        .map_err(|e| TierError::Step {
            step: "unseal",
            detail: format!("Vault did not unseal within 60s of init: {}", e.last()),
        })?;
        let c = self.client(Duration::from_secs(30))?;
        let send = |method: reqwest::Method, path: &str, body: serde_json::Value| {
            c.request(method, format!("{}{path}", self.api))
                .header("X-Vault-Token", token.as_str())
                .json(&body)
                .send()
        };
        let audit = match self.ensure_audit(&c, &token).await {
            Ok(via) => {
                tracing::info!(device = %format!("{AUDIT_DEVICE_PATH}/"), file = %self.audit_file.display(), ?via, "audit device active");
                Ok(())
            }
            Err(e) => Err(TierError::Audit(e)),
        };
        // Dead-server cleanup needs a quorum of at least 3 (OpenBao and Vault refuse a smaller `min_quorum`
        // with 400): a 1-server tier has nothing to prune.
        let mut autopilot = Ok(());
        if self.servers >= 3 {
            let min_quorum = (self.servers / 2 + 1).max(3).min(self.servers);
            // Right after the unseal, raft may still answer 5xx for a moment: those (and 429, and connection
            // errors) are retried briefly; any other answer is final.
            let body = serde_json::json!({"cleanup_dead_servers": true, "dead_server_last_contact_threshold": "10m", "min_quorum": min_quorum});
            autopilot = retry(
                RetryPolicy::poll(
                    Duration::from_secs(20),
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                ),
                |_| {
                    let (send, body) = (&send, &body);
                    async move {
                        const CALL: &str = "autopilot";
                        match send(
                            reqwest::Method::POST,
                            "/v1/sys/storage/raft/autopilot/configuration",
                            body.clone(),
                        )
                        .await
                        {
                            Ok(r) if r.status().is_success() => Attempt::Done(()),
                            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                                Attempt::Retry(CallError::status(CALL, r.status().as_u16()))
                            }
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let body = r.text().await.unwrap_or_default();
                                Attempt::Fail(CallError::refused(
                                    CALL,
                                    status,
                                    body.chars().take(200).collect::<String>(),
                                ))
                            }
                            Err(e) => Attempt::Retry(CallError::transport(CALL, e)),
                        }
                    }
                },
            )
            .await
            .map_err(|e| TierError::Call(e.last().clone()));
        } else {
            tracing::info!(
                servers = self.servers,
                "raft autopilot dead-server cleanup not configured: it needs at least 3 servers"
            );
        }
        // The read-only token of `hashistack-agent status` (docs/status.md#status-tokens): orphan, periodic.
        // Created whatever became of the autopilot configuration.
        let status_token = match (&self.shared, &self.status_vault) {
            (Some((az, _)), Some(sv)) => {
                let shared = &(az.clone(), sv.clone());
                match super::status_tokens::create_vault(&self.api, &self.ca_file, &token).await {
                    Ok(t) => {
                        super::status_tokens::hand_over(shared, crate::names::VAULT_SECRET, &t)
                            .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(()),
        };
        // Nomad workload identities: everything Vault needs but the JWKS (docs/bootstrap.md#nomad-workload-identities).
        let workload_identity = match &self.workload_identity {
            Some(h) => {
                match super::workload_identity::prepare(&self.api, &self.ca_file, &token).await {
                    Ok(t) => crate::material::put_secret(&h.az, &h.servers_vault, &h.secret, &t)
                        .await
                        .map_err(|source| TierError::HandOver {
                            what: "workload identity: token hand-over",
                            source,
                        }),
                    Err(e) => Err(e.into()),
                }
            }
            None => Ok(()),
        };
        // The snapshot credential (docs/runbooks.md#snapshots), kept where only server tiers read it.
        let snapshot_token = match &self.snapshot {
            Some(h) => {
                match super::snapshot_tokens::create_vault(&self.api, &self.ca_file, &token).await {
                    Ok(t) => h.put("vault", &t).await,
                    Err(e) => Err(e),
                }
            }
            None => Ok(()),
        };
        if workload_identity.is_ok() && self.workload_identity.is_some() {
            tracing::info!("Nomad workload identities prepared in Vault (auth method, role, policy, configuration token)");
        }
        autopilot?;
        status_token?;
        workload_identity?;
        snapshot_token?;
        audit
    }
}

#[cfg(test)]
mod tests;
