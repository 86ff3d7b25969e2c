//! A **contract double of the Azure Key Vault data-plane REST API** — not Key Vault, not an emulator
//! shipped by anyone: a small in-process server that answers the documented routes in the documented
//! shapes, well enough that the official Azure SDK for Rust clients (`azure_security_keyvault_secrets`
//! and `azure_security_keyvault_keys` 1.0.0) work against it unchanged. The lab needs it because no Key
//! Vault emulator is installable here (see lab/components.md).
//!
//! What it copies from the real service (Microsoft's REST reference, api-version as the SDK sends it):
//! - HTTPS only, one vault per listening address (`https://127.<net>.0.1:<port>/`); see [`VaultSpec`].
//! - Challenge auth: a request without `Authorization: Bearer` gets 401 with
//!   `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>", resource="https://vault.azure.net"`.
//!   A bearer JWT is decoded **without a signature check** (like Azurite) and must have `aud`
//!   `https://vault.azure.net` (trailing slash optional), `exp` in the future, `nbf` in the past, `iss`
//!   starting `https://sts.windows.net/` and an `oid`; otherwise 401 with a KeyVaultError body.
//! - **Azure RBAC**: the token's `oid` is the principal; every operation needs its real data action
//!   ([`actions`]) from an assignment at vault, key or secret-name-prefix scope ([`Scope`]); otherwise 403
//!   `Forbidden` / innererror `ForbiddenByRbac`. Azurite cannot do this; it is why the double exists.
//! - Routes: `PUT /secrets/{name}`, `GET /secrets/{name}[/{version}]`, `GET /secrets/{name}/versions`,
//!   `POST /keys/{name}/create` (RSA / RSA-HSM, 2048/3072/4096 bits, all software keys here),
//!   `GET /keys/{name}[/{version}]` (public JWK), `GET /keys/{name}/versions`,
//!   `POST /keys/{name}[/{version}]/wrapkey|unwrapkey` (RSA-OAEP-256 only; anything else is 400
//!   `BadParameter`). An empty version segment (`/keys/k//wrapkey`, as the SDK sends it) means "latest".
//!   Versions are 32 hex digits.
//!
//! What it adds for tests: [`Fault`] injection per operation (status, delay, connection reset; for the
//! next N requests or until cleared), a log of served requests ([`Vault::served`]) that never holds a
//! request or response body, and admin helpers that bypass RBAC ([`Vault::create_key`], [`Vault::set_secret`],
//! [`Vault::secret_value`]) the way ARM and the portal do.
//!
//! State lives in memory and vanishes with the double, unless [`VaultSpec::persist`] names a JSON file
//! (0600; secret values in clear, RSA private keys as PKCS#8): then secrets and keys (not role
//! assignments or faults) are loaded at start and rewritten after every change.

use crate::imds::LAB_TENANT;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair, KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, PublicKeyComponents, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// The audience of Key Vault tokens, and the `resource` of the challenge.
pub const RESOURCE: &str = "https://vault.azure.net";
/// The api-version the SDK 1.0.0 clients send.
pub const API_VERSION: &str = "2025-07-01";
/// Accepted api-versions (the SDK's, and the 7.x line the REST reference documents).
pub const API_VERSIONS: &[&str] = &[
    "7.0",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "2025-07-01",
];
/// Lab vault names (cf. the ARM template's `kvs-…` and `kve-…` vaults).
pub const SHARED_VAULT: &str = "shared";
pub const ESCROW_VAULT: &str = "escrow";
/// Server tiers only: the CA key and the Nomad gossip key (ARM `kvc-…`).
pub const SERVERS_VAULT: &str = "servers";
/// Status tokens: server tiers write, only the jumpbox reads (ARM `kvj-…`).
pub const STATUS_VAULT: &str = "status";
/// The value of the per-tier escrow secrets' first version, as the ARM template creates them (no escrow yet).
pub const ESCROW_PLACEHOLDER: &str =
    "placeholder created by the deployment; escrow versions follow (hashistack-agent escrow open reads the version its receipt pins)";
/// The escrow key-encryption key, created by ARM (`escrowKeyName`) and here by [`KeyVaultDouble::model_arm`].
pub const ESCROW_KEY: &str = "escrow-wrap";
/// The snapshot key-encryption key in the escrow vault (ARM `snapshotKeyName`): server tiers wrap, operators unwrap.
pub const SNAPSHOT_KEY: &str = hashistack_agent::names::SNAPSHOT_KEY;

/// Azure's Key Vault data actions (role definitions' `dataActions`). A grant may end in `*`.
pub mod actions {
    pub const SECRETS_SET: &str = "Microsoft.KeyVault/vaults/secrets/setSecret/action";
    pub const SECRETS_GET: &str = "Microsoft.KeyVault/vaults/secrets/getSecret/action";
    pub const SECRETS_READ_METADATA: &str = "Microsoft.KeyVault/vaults/secrets/readMetadata/action";
    pub const KEYS_CREATE: &str = "Microsoft.KeyVault/vaults/keys/create/action";
    pub const KEYS_READ: &str = "Microsoft.KeyVault/vaults/keys/read";
    pub const KEYS_WRAP: &str = "Microsoft.KeyVault/vaults/keys/wrap/action";
    pub const KEYS_UNWRAP: &str = "Microsoft.KeyVault/vaults/keys/unwrap/action";
}

/// The data actions of the roles the ARM template assigns (built-in roles: Azure's definitions).
pub mod roles {
    use super::actions::*;
    /// Built-in "Key Vault Secrets User".
    pub const SECRETS_USER: &[&str] = &[SECRETS_GET, SECRETS_READ_METADATA];
    /// Built-in "Key Vault Crypto Service Encryption User".
    pub const CRYPTO_SERVICE_ENCRYPTION_USER: &[&str] = &[KEYS_READ, KEYS_WRAP, KEYS_UNWRAP];
    /// Built-in "Key Vault Administrator" (data plane).
    pub const ADMINISTRATOR: &[&str] = &["Microsoft.KeyVault/vaults/*"];
    /// Custom roles of arm-templates/azuredeploy.json.
    pub const ESCROW_SECRET_WRITER: &[&str] = &[SECRETS_SET];
    /// The same write-only data action, assigned on the status vault (ARM: the escrow writer role).
    pub const SECRET_WRITER: &[&str] = &[SECRETS_SET];
    pub const ESCROW_KEY_WRAPPER: &[&str] = &[KEYS_WRAP];
    pub const ESCROW_KEY_UNWRAPPER: &[&str] = &[KEYS_UNWRAP];
    pub const CLUSTER_MATERIAL_WRITER: &[&str] = &[SECRETS_GET, SECRETS_SET];
}

/// Object ids of the lab's principals: one per user-assigned identity of the ARM template, plus an
/// operator. The fake IMDS of each node issues tokens with its role's identity (see [`principal_for`]).
pub mod principals {
    pub const CONSUL: &str = "00000000-0000-4000-8000-00000000c001";
    pub const VAULT: &str = "00000000-0000-4000-8000-00000000c002";
    pub const NOMAD: &str = "00000000-0000-4000-8000-00000000c003";
    pub const WORKERS: &str = "00000000-0000-4000-8000-00000000c004";
    pub const JUMPBOX: &str = "00000000-0000-4000-8000-00000000c005";
    /// The operator of `escrow open` (ARM parameter `operatorObjectId`).
    pub const OPERATOR: &str = "00000000-0000-4000-8000-0000000000f0";
}

/// The managed identity a node of this role runs as.
pub fn principal_for(role: hashistack_agent::node::Role) -> &'static str {
    use hashistack_agent::node::Role;
    match role {
        Role::ConsulServer => principals::CONSUL,
        Role::VaultServer => principals::VAULT,
        Role::NomadServer => principals::NOMAD,
        Role::Worker => principals::WORKERS,
        Role::Jumpbox => principals::JUMPBOX,
    }
}

/// Where a role assignment applies inside one vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole vault (`Microsoft.KeyVault/vaults/<v>`).
    Vault,
    /// One key (`…/vaults/<v>/keys/<name>`): key operations on that key only.
    Key(String),
    /// Secrets whose name starts with this prefix (`…/vaults/<v>/secrets/<name>` for each): secret operations only.
    SecretPrefix(String),
    /// Exactly one secret (`…/vaults/<v>/secrets/<name>`, Azure's single-secret scope): secret operations on it only.
    Secret(String),
}

#[derive(Debug, Clone)]
pub struct Assignment {
    pub principal: String,
    pub actions: Vec<String>,
    pub scope: Scope,
}

/// The operations the double serves; faults and the request log name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    SetSecret,
    GetSecret,
    ListSecretVersions,
    CreateKey,
    GetKey,
    ListKeyVersions,
    WrapKey,
    UnwrapKey,
}

impl Op {
    fn action(self) -> &'static str {
        match self {
            Op::SetSecret => actions::SECRETS_SET,
            Op::GetSecret => actions::SECRETS_GET,
            Op::ListSecretVersions => actions::SECRETS_READ_METADATA,
            Op::CreateKey => actions::KEYS_CREATE,
            Op::GetKey | Op::ListKeyVersions => actions::KEYS_READ,
            Op::WrapKey => actions::KEYS_WRAP,
            Op::UnwrapKey => actions::KEYS_UNWRAP,
        }
    }
    fn is_secret(self) -> bool {
        matches!(self, Op::SetSecret | Op::GetSecret | Op::ListSecretVersions)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this status and a KeyVaultError body (429 adds `Retry-After: 1`, 401 a challenge).
    Status(u16),
    /// Wait this long, then go on (a later matching Status/Reset fault still applies).
    Delay(Duration),
    /// Close the connection without an answer.
    Reset,
}

/// A programmed misbehaviour. Faults apply to authenticated requests only (the SDK's unauthenticated
/// challenge round trip never consumes one), before the RBAC check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `None`: every operation.
    pub op: Option<Op>,
    pub action: FaultAction,
    /// Requests left to hit; `None`: until [`Vault::clear_faults`].
    pub remaining: Option<u32>,
}

impl Fault {
    pub fn status(op: impl Into<Option<Op>>, status: u16) -> Self {
        Fault {
            op: op.into(),
            action: FaultAction::Status(status),
            remaining: None,
        }
    }
    pub fn delay(op: impl Into<Option<Op>>, delay: Duration) -> Self {
        Fault {
            op: op.into(),
            action: FaultAction::Delay(delay),
            remaining: None,
        }
    }
    pub fn reset(op: impl Into<Option<Op>>) -> Self {
        Fault {
            op: op.into(),
            action: FaultAction::Reset,
            remaining: None,
        }
    }
    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
}

/// One served request (no bodies, ever).
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub op: Option<Op>,
    pub status: u16,
    /// The token's `oid`, when the request was authenticated.
    pub principal: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SecretVersion {
    version: String,
    value: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    enabled: bool,
    created: i64,
    updated: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyVersion {
    version: String,
    kty: String,
    key_ops: Vec<String>,
    /// PKCS#8 DER, base64.
    pkcs8: String,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    enabled: bool,
    created: i64,
    updated: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Store {
    secrets: BTreeMap<String, Vec<SecretVersion>>,
    keys: BTreeMap<String, Vec<KeyVersion>>,
}

#[derive(Default)]
struct VaultState {
    store: Store,
    assignments: Vec<Assignment>,
    faults: Vec<Fault>,
    served: Vec<Served>,
}

struct VaultInner {
    name: String,
    addr: SocketAddr,
    url: String,
    persist: Option<PathBuf>,
    state: Mutex<VaultState>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set by [`Vault::stop`]: open connections close too.
    down: tokio::sync::watch::Sender<bool>,
}

/// One vault of the double: a cheap handle (clone it freely) to its state and controls.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<VaultInner>,
}

/// What to serve: one entry per vault.
#[derive(Debug, Clone)]
pub struct VaultSpec {
    pub name: String,
    /// Port 0 picks a free port ([`Vault::url`] tells which).
    pub addr: SocketAddr,
    /// JSON file to load at start and rewrite after every change (None: memory only).
    pub persist: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyVaultError {
    #[error("TLS material: {0}")]
    Tls(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Bad(String),
}

fn ioe(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KeyVaultError {
    let what = what.into();
    move |source| KeyVaultError::Io { what, source }
}

/// The double: several vaults, each on its own address, sharing one TLS certificate.
pub struct KeyVaultDouble {
    vaults: Vec<Vault>,
}

impl KeyVaultDouble {
    /// Starts one HTTPS listener per vault with the given PEM certificate chain and PKCS#8 key.
    pub async fn start(
        cert_chain_pem: &str,
        key_pem: &str,
        specs: &[VaultSpec],
    ) -> Result<KeyVaultDouble, KeyVaultError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| KeyVaultError::Tls(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| KeyVaultError::Tls(format!("key: {e}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KeyVaultError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| KeyVaultError::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let mut vaults = Vec::new();
        for spec in specs {
            let store = match &spec.persist {
                Some(p) if p.exists() => {
                    let bytes = std::fs::read(p).map_err(ioe(p.display().to_string()))?;
                    serde_json::from_slice(&bytes)
                        .map_err(|e| KeyVaultError::Bad(format!("{}: {e}", p.display())))?
                }
                _ => Store::default(),
            };
            let listener = tokio::net::TcpListener::bind(spec.addr)
                .await
                .map_err(ioe(format!(
                    "Key Vault double {} on {}",
                    spec.name, spec.addr
                )))?;
            let addr = listener.local_addr().map_err(ioe("local_addr"))?;
            let inner = Arc::new(VaultInner {
                name: spec.name.clone(),
                addr,
                url: format!("https://{addr}"),
                persist: spec.persist.clone(),
                state: Mutex::new(VaultState {
                    store,
                    ..Default::default()
                }),
                task: Mutex::new(None),
                down: tokio::sync::watch::Sender::new(false),
            });
            let task = tokio::spawn(accept_loop(listener, acceptor.clone(), inner.clone()));
            *inner.task.lock().expect("task") = Some(task);
            vaults.push(Vault { inner });
        }
        Ok(KeyVaultDouble { vaults })
    }

    /// The lab's four vaults on `host`: `shared` (cluster material every node reads) on `base_port`, `escrow`
    /// on the next port, `servers` (CA key, Nomad gossip key) on the one after, and `status` (status tokens)
    /// after that; persisted under `persist_dir` when given.
    pub async fn start_lab(
        cert_chain_pem: &str,
        key_pem: &str,
        host: std::net::Ipv4Addr,
        base_port: u16,
        persist_dir: Option<&Path>,
    ) -> Result<KeyVaultDouble, KeyVaultError> {
        if let Some(d) = persist_dir {
            std::fs::create_dir_all(d).map_err(ioe(d.display().to_string()))?;
        }
        let spec = |name: &str, port: u16| VaultSpec {
            name: name.into(),
            addr: SocketAddr::from((host, port)),
            persist: persist_dir.map(|d| d.join(format!("{name}.json"))),
        };
        Self::start(
            cert_chain_pem,
            key_pem,
            &[
                spec(SHARED_VAULT, base_port),
                spec(ESCROW_VAULT, base_port + 1),
                spec(SERVERS_VAULT, base_port + 2),
                spec(STATUS_VAULT, base_port + 3),
            ],
        )
        .await
    }

    pub fn vault(&self, name: &str) -> Option<&Vault> {
        self.vaults.iter().find(|v| v.inner.name == name)
    }

    pub fn vaults(&self) -> &[Vault] {
        &self.vaults
    }

    /// Grants `actions` to `principal` on vault `vault` (panics on an unknown vault name: a lab bug).
    pub fn grant(&self, vault: &str, principal: &str, actions: &[&str], scope: Scope) {
        self.vault(vault)
            .unwrap_or_else(|| panic!("no vault {vault:?} in the Key Vault double"))
            .grant(principal, actions, scope);
    }

    /// The ARM template's Key Vault role assignments, escrow key and per-tier escrow secrets, for the lab's
    /// vaults: server identities (Consul, Vault, Nomad) read and write cluster material (`shared` and
    /// `servers`), write status tokens (`status`), set their own tier's escrow secret
    /// (`<cluster>-<tier>-escrow`, created with a placeholder version as ARM does; single-secret scope) and
    /// nothing else in escrow, and wrap with the escrow key; workers and the jumpbox read the `shared` vault only;
    /// the jumpbox alone reads `status`; the operator reads escrow secrets and unwraps. (The unseal vault is not
    /// modelled: the lab unseals with transit.)
    pub fn model_arm(&self, cluster: &str) -> Result<(), KeyVaultError> {
        use principals::*;
        let (Some(shared), Some(escrow), Some(servers), Some(status)) = (
            self.vault(SHARED_VAULT),
            self.vault(ESCROW_VAULT),
            self.vault(SERVERS_VAULT),
            self.vault(STATUS_VAULT),
        ) else {
            return Err(KeyVaultError::Bad(
                "model_arm needs the shared, escrow, servers and status vaults".into(),
            ));
        };
        for key in [ESCROW_KEY, SNAPSHOT_KEY] {
            if escrow.key_versions(key).is_empty() {
                escrow.create_key(key, 3072)?;
            }
        }
        for (p, tier) in [(CONSUL, "consul"), (VAULT, "vault"), (NOMAD, "nomad")] {
            shared.grant(p, roles::CLUSTER_MATERIAL_WRITER, Scope::Vault);
            servers.grant(p, roles::CLUSTER_MATERIAL_WRITER, Scope::Vault);
            status.grant(p, roles::SECRET_WRITER, Scope::Vault);
            let secret = hashistack_agent::escrow::tier_secret_name(cluster, tier);
            if escrow.secret_version_count(&secret) == 0 {
                escrow.set_secret_typed(&secret, ESCROW_PLACEHOLDER, Some("text/plain"))?;
            }
            escrow.grant(p, roles::ESCROW_SECRET_WRITER, Scope::Secret(secret));
            escrow.grant(p, roles::ESCROW_KEY_WRAPPER, Scope::Key(ESCROW_KEY.into()));
            escrow.grant(
                p,
                roles::ESCROW_KEY_WRAPPER,
                Scope::Key(SNAPSHOT_KEY.into()),
            );
        }
        for p in [WORKERS, JUMPBOX] {
            shared.grant(p, roles::SECRETS_USER, Scope::Vault);
        }
        status.grant(JUMPBOX, roles::SECRETS_USER, Scope::Vault);
        escrow.grant(OPERATOR, roles::SECRETS_USER, Scope::Vault);
        escrow.grant(
            OPERATOR,
            roles::ESCROW_KEY_UNWRAPPER,
            Scope::Key(ESCROW_KEY.into()),
        );
        escrow.grant(
            OPERATOR,
            roles::ESCROW_KEY_UNWRAPPER,
            Scope::Key(SNAPSHOT_KEY.into()),
        );
        Ok(())
    }

    /// Stops every listener (state stays in memory; persisted files stay on disk).
    pub fn stop(&self) {
        for v in &self.vaults {
            v.stop();
        }
    }
}

impl Drop for KeyVaultDouble {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Vault {
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }
    /// The vault URL to give the SDK, with the trailing slash Azure prints (`https://127.77.0.1:8443/`).
    pub fn url(&self) -> String {
        format!("{}/", self.inner.url)
    }

    fn state(&self) -> MutexGuard<'_, VaultState> {
        self.inner.state.lock().expect("key vault double state")
    }

    /// Adds a role assignment (like `az role assignment create`, effective immediately).
    pub fn grant(&self, principal: &str, actions: &[&str], scope: Scope) {
        self.state().assignments.push(Assignment {
            principal: principal.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            scope,
        });
    }
    /// Removes every assignment of `principal`.
    pub fn revoke_all(&self, principal: &str) {
        self.state()
            .assignments
            .retain(|a| a.principal != principal);
    }
    pub fn assignments(&self) -> Vec<Assignment> {
        self.state().assignments.clone()
    }

    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }
    /// Faults still armed (a `times(n)` fault disappears after its n-th hit).
    pub fn faults(&self) -> Vec<Fault> {
        self.state().faults.clone()
    }

    pub fn served(&self) -> Vec<Served> {
        self.state().served.clone()
    }
    pub fn clear_served(&self) {
        self.state().served.clear();
    }

    /// Admin (RBAC-free) key creation, like ARM's `Microsoft.KeyVault/vaults/keys`; returns the kid.
    pub fn create_key(&self, name: &str, bits: u32) -> Result<String, KeyVaultError> {
        let kv =
            new_rsa_key("RSA-HSM", bits, None, None).map_err(|e| KeyVaultError::Bad(e.message))?;
        let kid = format!("{}/keys/{name}/{}", self.inner.url, kv.version);
        let mut st = self.state();
        st.store.keys.entry(name.into()).or_default().push(kv);
        self.persist(&st)?;
        Ok(kid)
    }
    /// Versions of a key, oldest first.
    pub fn key_versions(&self, name: &str) -> Vec<String> {
        self.state()
            .store
            .keys
            .get(name)
            .map(|v| v.iter().map(|k| k.version.clone()).collect())
            .unwrap_or_default()
    }
    /// Admin (RBAC-free) secret write; returns the new version.
    pub fn set_secret(&self, name: &str, value: &str) -> Result<String, KeyVaultError> {
        self.set_secret_typed(name, value, None)
    }
    /// Admin (RBAC-free) secret write with a content type (as ARM's `Microsoft.KeyVault/vaults/secrets`); returns
    /// the new version.
    pub fn set_secret_typed(
        &self,
        name: &str,
        value: &str,
        content_type: Option<&str>,
    ) -> Result<String, KeyVaultError> {
        let now = now();
        let sv = SecretVersion {
            version: new_version(),
            value: value.into(),
            content_type: content_type.map(str::to_string),
            tags: None,
            enabled: true,
            created: now,
            updated: now,
        };
        let version = sv.version.clone();
        let mut st = self.state();
        st.store.secrets.entry(name.into()).or_default().push(sv);
        self.persist(&st)?;
        Ok(version)
    }
    /// Admin (RBAC-free) read of a secret's latest value, for tests that check what was escrowed.
    pub fn secret_value(&self, name: &str) -> Option<String> {
        self.state()
            .store
            .secrets
            .get(name)
            .and_then(|v| v.last())
            .map(|s| s.value.clone())
    }
    /// Secret names, sorted.
    pub fn secret_names(&self) -> Vec<String> {
        self.state().store.secrets.keys().cloned().collect()
    }
    /// Number of versions of a secret.
    pub fn secret_version_count(&self, name: &str) -> usize {
        self.state()
            .store
            .secrets
            .get(name)
            .map(|v| v.len())
            .unwrap_or(0)
    }

    /// Stops listening and closes open connections (connection refused from now on, like a vault that
    /// is down); state is kept.
    pub fn stop(&self) {
        if let Some(t) = self.inner.task.lock().expect("task").take() {
            t.abort();
        }
        self.inner.down.send_replace(true);
    }

    fn persist(&self, st: &VaultState) -> Result<(), KeyVaultError> {
        let Some(path) = &self.inner.persist else {
            return Ok(());
        };
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&st.store).expect("store serializes");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(ioe(tmp.display().to_string()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(ioe(tmp.display().to_string()))?;
        std::fs::rename(&tmp, path).map_err(ioe(path.display().to_string()))
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, tls: TlsAcceptor, inner: Arc<VaultInner>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (tls, inner) = (tls.clone(), inner.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            else {
                return;
            };
            let mut down = inner.down.subscribe();
            let svc = hyper::service::service_fn(move |req| handle(inner.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = down.wait_for(|d| *d) => {}
            }
        });
    }
}

/// Returned by the service to make hyper drop the connection (the Reset fault).
#[derive(Debug)]
struct ResetConnection;
impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by fault injection")
    }
}
impl std::error::Error for ResetConnection {}

type Resp = Response<Full<Bytes>>;

/// An error answer in the KeyVaultError shape.
struct KvErr {
    status: StatusCode,
    code: &'static str,
    message: String,
    inner: Option<&'static str>,
}

impl KvErr {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        KvErr {
            status,
            code,
            message: message.into(),
            inner: None,
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        KvErr::new(StatusCode::BAD_REQUEST, "BadParameter", message)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        KvErr::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }
    fn response(&self) -> Resp {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(inner) = self.inner {
            error["innererror"] = json!({"code": inner});
        }
        let mut r = json_response(self.status, &json!({ "error": error }));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_str(&challenge()).expect("ascii"),
            );
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn challenge() -> String {
    format!(
        "Bearer authorization=\"https://login.microsoftonline.com/{LAB_TENANT}\", resource=\"{RESOURCE}\""
    )
}

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(
        "x-ms-request-id",
        HeaderValue::from_str(&uuid_like()).expect("ascii"),
    );
    r
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn new_version() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uuid_like() -> String {
    let v = new_version();
    format!(
        "{}-{}-{}-{}-{}",
        &v[0..8],
        &v[8..12],
        &v[12..16],
        &v[16..20],
        &v[20..32]
    )
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn from_b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The route of a request: operation, object name, optional version ("" = latest).
struct Route {
    op: Op,
    name: String,
    version: String,
}

fn route(method: &Method, path: &str) -> Result<Route, KvErr> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let r = |op: Op, name: &str, version: &str| {
        Ok(Route {
            op,
            name: name.to_string(),
            version: version.to_string(),
        })
    };
    let not_allowed = || {
        Err(KvErr::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("The requested resource does not support http method {method}."),
        ))
    };
    match segs.as_slice() {
        ["secrets", name] | ["secrets", name, ""] => match *method {
            Method::PUT => r(Op::SetSecret, name, ""),
            Method::GET => r(Op::GetSecret, name, ""),
            _ => not_allowed(),
        },
        ["secrets", name, "versions"] => match *method {
            Method::GET => r(Op::ListSecretVersions, name, ""),
            _ => not_allowed(),
        },
        ["secrets", name, version] => match *method {
            Method::GET => r(Op::GetSecret, name, version),
            _ => not_allowed(),
        },
        ["keys", name, "create"] => match *method {
            Method::POST => r(Op::CreateKey, name, ""),
            _ => not_allowed(),
        },
        ["keys", name, "versions"] => match *method {
            Method::GET => r(Op::ListKeyVersions, name, ""),
            _ => not_allowed(),
        },
        ["keys", name, op @ ("wrapkey" | "unwrapkey")]
        | ["keys", name, _, op @ ("wrapkey" | "unwrapkey")]
            if *method == Method::POST =>
        {
            let version = if segs.len() == 4 { segs[2] } else { "" };
            let op = if *op == "wrapkey" {
                Op::WrapKey
            } else {
                Op::UnwrapKey
            };
            r(op, name, version)
        }
        ["keys", name] | ["keys", name, ""] => match *method {
            Method::GET => r(Op::GetKey, name, ""),
            _ => not_allowed(),
        },
        ["keys", name, version] => match *method {
            Method::GET => r(Op::GetKey, name, version),
            _ => not_allowed(),
        },
        _ => Err(KvErr::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("The Key Vault double has no route for {method} {path}"),
        )),
    }
}

fn api_version(query: Option<&str>) -> Result<(), KvErr> {
    let v = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "api-version")
        .map(|(_, v)| v);
    match v {
        None | Some("") => Err(KvErr::bad("The api-version query parameter is missing.")),
        Some(v) if API_VERSIONS.contains(&v) => Ok(()),
        Some(v) => Err(KvErr::bad(format!(
            "The specified version ({v}) is not recognized. Consider using the latest supported version ({API_VERSION})."
        ))),
    }
}

/// Decodes the bearer JWT (no signature check) and returns the caller's oid.
fn authenticate(auth: Option<&HeaderValue>) -> Result<String, KvErr> {
    let token = auth
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            KvErr::unauthorized("AKV10000: Request is missing a Bearer or PoP token.")
        })?;
    let malformed = || KvErr::unauthorized("Bearer token is malformed (not a JWT).");
    let payload = token.split('.').nth(1).ok_or_else(malformed)?;
    let claims: Value = from_b64url(payload)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(malformed)?;
    let aud = claims["aud"].as_str().unwrap_or("");
    if aud.trim_end_matches('/') != RESOURCE {
        return Err(KvErr::unauthorized(format!(
            "Invalid audience. Expected {RESOURCE}, found: {aud}."
        )));
    }
    let iss = claims["iss"].as_str().unwrap_or("");
    if !iss.starts_with("https://sts.windows.net/") {
        return Err(KvErr::unauthorized(format!("Invalid issuer: {iss}.")));
    }
    let t = now();
    match claims["exp"].as_i64() {
        Some(exp) if exp > t => {}
        Some(_) => return Err(KvErr::unauthorized("Token has expired.")),
        None => return Err(KvErr::unauthorized("Token has no exp claim.")),
    }
    match claims["nbf"].as_i64() {
        Some(nbf) if nbf <= t => {}
        Some(_) => return Err(KvErr::unauthorized("Token is not valid yet (nbf).")),
        None => return Err(KvErr::unauthorized("Token has no nbf claim.")),
    }
    claims["oid"]
        .as_str()
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .ok_or_else(|| KvErr::unauthorized("Token has no oid claim."))
}

fn action_matches(granted: &str, wanted: &str) -> bool {
    granted == wanted
        || granted == "*"
        || granted
            .strip_suffix('*')
            .is_some_and(|prefix| wanted.starts_with(prefix))
}

fn authorize(st: &VaultState, vault: &str, principal: &str, route: &Route) -> Result<(), KvErr> {
    let action = route.op.action();
    let allowed = st.assignments.iter().any(|a| {
        a.principal == principal
            && a.actions.iter().any(|g| action_matches(g, action))
            && match &a.scope {
                Scope::Vault => true,
                Scope::Key(k) => !route.op.is_secret() && *k == route.name,
                Scope::SecretPrefix(p) => {
                    route.op.is_secret() && route.name.starts_with(p.as_str())
                }
                // Key Vault object names are case-insensitive.
                Scope::Secret(n) => route.op.is_secret() && n.eq_ignore_ascii_case(&route.name),
            }
    });
    if allowed {
        return Ok(());
    }
    let collection = if route.op.is_secret() {
        "secrets"
    } else {
        "keys"
    };
    Err(KvErr {
        status: StatusCode::FORBIDDEN,
        code: "Forbidden",
        message: format!(
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: oid={principal};iss=https://sts.windows.net/{LAB_TENANT}/\r\nAction: '{action}'\r\nResource: '/subscriptions/00000000-0000-4000-8000-000000000001/resourcegroups/rg-hashistack-lab/providers/microsoft.keyvault/vaults/{vault}/{collection}/{}'\r\nAssignment: (not found)\r\nDecisionReason: 'DeniedWithNoValidRBAC'\r\nVault: {vault};location=lab\r\n",
            route.name.to_lowercase()
        ),
        inner: Some("ForbiddenByRbac"),
    })
}

/// Takes the faults that match `op`: total delay, then the first Status/Reset (consuming counts).
fn take_faults(st: &mut VaultState, op: Op) -> (Duration, Option<FaultAction>) {
    let mut delay = Duration::ZERO;
    let mut terminal = None;
    for f in st.faults.iter_mut() {
        if f.op.is_some_and(|o| o != op) || f.remaining == Some(0) {
            continue;
        }
        match &f.action {
            FaultAction::Delay(d) => delay += *d,
            a if terminal.is_none() => terminal = Some(a.clone()),
            _ => continue,
        }
        if let Some(n) = f.remaining.as_mut() {
            *n -= 1;
        }
    }
    st.faults.retain(|f| f.remaining != Some(0));
    (delay, terminal)
}

fn injected(status: u16) -> KvErr {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let msg = "Injected by the Key Vault double (fault injection).";
    match status.as_u16() {
        401 => KvErr::unauthorized(msg),
        403 => KvErr {
            inner: Some("ForbiddenByRbac"),
            ..KvErr::new(status, "Forbidden", msg)
        },
        429 => KvErr::new(status, "Throttled", msg),
        500 => KvErr::new(status, "InternalServerError", msg),
        503 => KvErr::new(status, "ServiceUnavailable", msg),
        400 => KvErr::bad(msg),
        404 => KvErr::new(status, "NotFound", msg),
        _ => KvErr::new(status, "Injected", msg),
    }
}

async fn handle(inner: Arc<VaultInner>, req: Request<Incoming>) -> Result<Resp, ResetConnection> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut served = Served {
        method: method.to_string(),
        path: path.clone(),
        op: None,
        status: 0,
        principal: None,
    };
    let result = serve(&inner, req, &mut served).await;
    served.status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(ResetConnection) => 0,
    };
    let mut st = inner.state.lock().expect("key vault double state");
    st.served.push(served);
    result
}

async fn serve(
    inner: &Arc<VaultInner>,
    req: Request<Incoming>,
    served: &mut Served,
) -> Result<Resp, ResetConnection> {
    let (parts, body) = req.into_parts();
    let route = match route(&parts.method, parts.uri.path()) {
        Ok(r) => r,
        Err(e) => return Ok(e.response()),
    };
    served.op = Some(route.op);
    if let Err(e) = api_version(parts.uri.query()) {
        return Ok(e.response());
    }
    let principal = match authenticate(parts.headers.get(AUTHORIZATION)) {
        Ok(p) => p,
        Err(e) => return Ok(e.response()),
    };
    served.principal = Some(principal.clone());
    let body = match Limited::new(body, 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(KvErr::bad("Request body too large or unreadable.").response()),
    };
    let (delay, terminal) = take_faults(&mut inner.state.lock().expect("state"), route.op);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match terminal {
        Some(FaultAction::Reset) => return Err(ResetConnection),
        Some(FaultAction::Status(s)) => return Ok(injected(s).response()),
        _ => {}
    }
    if !valid_name(&route.name) {
        return Ok(KvErr::bad(format!(
            "The request URI contains an invalid name: {}",
            route.name
        ))
        .response());
    }
    let vault = Vault {
        inner: inner.clone(),
    };
    // Key generation is slow-ish (RSA 3072: ~0.1–1 s): do it before taking the state lock.
    let new_key = if route.op == Op::CreateKey {
        if let Err(e) = authorize(&vault.state(), &inner.name, &principal, &route) {
            return Ok(e.response());
        }
        match create_params(&body) {
            Ok(k) => Some(k),
            Err(e) => return Ok(e.response()),
        }
    } else {
        None
    };
    let mut st = vault.state();
    if let Err(e) = authorize(&st, &inner.name, &principal, &route) {
        return Ok(e.response());
    }
    let result = execute(&vault, &mut st, &route, &body, new_key);
    Ok(match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.response(),
    })
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, KvErr> {
    serde_json::from_slice(body).map_err(|e| KvErr::bad(format!("Invalid request body: {e}")))
}

#[derive(Deserialize)]
struct AttributesIn {
    enabled: Option<bool>,
}

#[derive(Deserialize)]
struct SetSecretIn {
    value: Option<String>,
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    attributes: Option<AttributesIn>,
}

#[derive(Deserialize)]
struct CreateKeyIn {
    kty: Option<String>,
    key_size: Option<u32>,
    key_ops: Option<Vec<String>>,
    public_exponent: Option<u32>,
    tags: Option<BTreeMap<String, String>>,
    attributes: Option<AttributesIn>,
}

#[derive(Deserialize)]
struct KeyOpIn {
    alg: Option<String>,
    value: Option<String>,
}

fn create_params(body: &[u8]) -> Result<KeyVersion, KvErr> {
    let p: CreateKeyIn = parse_body(body)?;
    let kty = p.kty.unwrap_or_default();
    if kty != "RSA" && kty != "RSA-HSM" {
        return Err(KvErr::bad(format!(
            "The Key Vault double supports kty RSA and RSA-HSM only, not {kty}."
        )));
    }
    if p.public_exponent.is_some_and(|e| e != 65537) {
        return Err(KvErr::bad("Only public_exponent 65537 is supported."));
    }
    let mut k = new_rsa_key(&kty, p.key_size.unwrap_or(2048), p.key_ops, p.tags)?;
    if let Some(a) = p.attributes {
        k.enabled = a.enabled.unwrap_or(true);
    }
    Ok(k)
}

const DEFAULT_KEY_OPS: &[&str] = &[
    "encrypt",
    "decrypt",
    "sign",
    "verify",
    "wrapKey",
    "unwrapKey",
];

fn new_rsa_key(
    kty: &str,
    bits: u32,
    key_ops: Option<Vec<String>>,
    tags: Option<BTreeMap<String, String>>,
) -> Result<KeyVersion, KvErr> {
    let size = match bits {
        2048 => KeySize::Rsa2048,
        3072 => KeySize::Rsa3072,
        4096 => KeySize::Rsa4096,
        _ => {
            return Err(KvErr::bad(format!(
                "RSA key size {bits} is not supported (2048, 3072 or 4096)."
            )))
        }
    };
    let kp = KeyPair::generate(size).map_err(|_| {
        KvErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "RSA keygen",
        )
    })?;
    let der = kp
        .as_der()
        .map_err(|_| KvErr::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "PKCS#8"))?;
    let t = now();
    Ok(KeyVersion {
        version: new_version(),
        kty: kty.into(),
        key_ops: key_ops.unwrap_or_else(|| DEFAULT_KEY_OPS.iter().map(|s| s.to_string()).collect()),
        pkcs8: base64::engine::general_purpose::STANDARD.encode(der.as_ref()),
        tags,
        enabled: true,
        created: t,
        updated: t,
    })
}

fn private_key(k: &KeyVersion) -> Result<PrivateDecryptingKey, KvErr> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(&k.pkcs8)
        .map_err(|_| {
            KvErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "key store",
            )
        })?;
    PrivateDecryptingKey::from_pkcs8(&der).map_err(|_| {
        KvErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "key store",
        )
    })
}

fn public_components(k: &KeyVersion) -> Result<(Vec<u8>, Vec<u8>), KvErr> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(&k.pkcs8)
        .map_err(|_| {
            KvErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "key store",
            )
        })?;
    let kp = KeyPair::from_pkcs8(&der).map_err(|_| {
        KvErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "key store",
        )
    })?;
    let pk = kp.public_key();
    Ok((
        pk.modulus().big_endian_without_leading_zero().to_vec(),
        pk.exponent().big_endian_without_leading_zero().to_vec(),
    ))
}

fn attributes(enabled: bool, created: i64, updated: i64) -> Value {
    json!({
        "enabled": enabled,
        "created": created,
        "updated": updated,
        "recoveryLevel": "Recoverable",
        "recoverableDays": 90
    })
}

fn secret_bundle(base: &str, name: &str, s: &SecretVersion, with_value: bool) -> Value {
    let mut v = json!({
        "id": format!("{base}/secrets/{name}/{}", s.version),
        "attributes": attributes(s.enabled, s.created, s.updated),
    });
    if with_value {
        v["value"] = json!(s.value);
    }
    if let Some(ct) = &s.content_type {
        v["contentType"] = json!(ct);
    }
    if let Some(t) = &s.tags {
        v["tags"] = json!(t);
    }
    v
}

fn key_bundle(base: &str, name: &str, k: &KeyVersion) -> Result<Value, KvErr> {
    let (n, e) = public_components(k)?;
    let mut attrs = attributes(k.enabled, k.created, k.updated);
    attrs["exportable"] = json!(false);
    let mut v = json!({
        "key": {
            "kid": format!("{base}/keys/{name}/{}", k.version),
            "kty": k.kty,
            "key_ops": k.key_ops,
            "n": b64url(&n),
            "e": b64url(&e),
        },
        "attributes": attrs,
    });
    if let Some(t) = &k.tags {
        v["tags"] = json!(t);
    }
    Ok(v)
}

fn find_secret<'a>(
    st: &'a VaultState,
    name: &str,
    version: &str,
) -> Result<&'a SecretVersion, KvErr> {
    let versions = st.store.secrets.get(name);
    let found = if version.is_empty() {
        versions.and_then(|v| v.last())
    } else {
        versions.and_then(|v| v.iter().find(|s| s.version == version))
    };
    found.ok_or_else(|| {
        let id = if version.is_empty() {
            name.to_string()
        } else {
            format!("{name}/{version}")
        };
        KvErr::new(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            format!("A secret with (name/id) {id} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"),
        )
    })
}

fn find_key<'a>(st: &'a VaultState, name: &str, version: &str) -> Result<&'a KeyVersion, KvErr> {
    let versions = st.store.keys.get(name);
    let found = if version.is_empty() {
        versions.and_then(|v| v.last())
    } else {
        versions.and_then(|v| v.iter().find(|k| k.version == version))
    };
    found.ok_or_else(|| {
        let id = if version.is_empty() {
            name.to_string()
        } else {
            format!("{name}/{version}")
        };
        KvErr::new(
            StatusCode::NOT_FOUND,
            "KeyNotFound",
            format!("A key with (name/id) {id} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"),
        )
    })
}

fn execute(
    vault: &Vault,
    st: &mut VaultState,
    route: &Route,
    body: &[u8],
    new_key: Option<KeyVersion>,
) -> Result<Value, KvErr> {
    let base = vault.inner.url.clone();
    let name = route.name.as_str();
    let persist = |st: &VaultState| {
        vault.persist(st).map_err(|e| {
            KvErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("persisting the double's state: {e}"),
            )
        })
    };
    match route.op {
        Op::SetSecret => {
            let p: SetSecretIn = parse_body(body)?;
            let value = p
                .value
                .ok_or_else(|| KvErr::bad("The request body is missing the required 'value'."))?;
            let t = now();
            let sv = SecretVersion {
                version: new_version(),
                value,
                content_type: p.content_type,
                tags: p.tags,
                enabled: p.attributes.and_then(|a| a.enabled).unwrap_or(true),
                created: t,
                updated: t,
            };
            let out = secret_bundle(&base, name, &sv, true);
            st.store.secrets.entry(name.into()).or_default().push(sv);
            persist(st)?;
            Ok(out)
        }
        Op::GetSecret => {
            let s = find_secret(st, name, &route.version)?;
            if !s.enabled {
                return Err(KvErr {
                    inner: Some("SecretDisabled"),
                    ..KvErr::new(
                        StatusCode::FORBIDDEN,
                        "Forbidden",
                        "Operation get is not allowed on a disabled secret.",
                    )
                });
            }
            Ok(secret_bundle(&base, name, s, true))
        }
        Op::ListSecretVersions => {
            let list: Vec<Value> = st
                .store
                .secrets
                .get(name)
                .map(|v| {
                    v.iter()
                        .map(|s| secret_bundle(&base, name, s, false))
                        .collect()
                })
                .unwrap_or_default();
            Ok(json!({"value": list, "nextLink": null}))
        }
        Op::CreateKey => {
            let k = new_key.expect("create_params ran");
            let out = key_bundle(&base, name, &k)?;
            st.store.keys.entry(name.into()).or_default().push(k);
            persist(st)?;
            Ok(out)
        }
        Op::GetKey => key_bundle(&base, name, find_key(st, name, &route.version)?),
        Op::ListKeyVersions => {
            let list: Vec<Value> = st
                .store
                .keys
                .get(name)
                .map(|v| {
                    v.iter()
                        .map(|k| {
                            json!({
                                "kid": format!("{base}/keys/{name}/{}", k.version),
                                "attributes": attributes(k.enabled, k.created, k.updated),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(json!({"value": list, "nextLink": null}))
        }
        Op::WrapKey | Op::UnwrapKey => {
            let p: KeyOpIn = parse_body(body)?;
            let alg = p.alg.unwrap_or_default();
            if alg != "RSA-OAEP-256" {
                return Err(KvErr::bad(format!(
                    "The Key Vault double supports alg RSA-OAEP-256 only, not {alg}."
                )));
            }
            let input = p
                .value
                .as_deref()
                .and_then(from_b64url)
                .ok_or_else(|| KvErr::bad("'value' is missing or not base64url."))?;
            let k = find_key(st, name, &route.version)?;
            let wrap = route.op == Op::WrapKey;
            let op_name = if wrap { "wrapKey" } else { "unwrapKey" };
            if !k.enabled {
                return Err(KvErr::new(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!("Operation {op_name} is not allowed on a disabled key."),
                ));
            }
            if !k.key_ops.iter().any(|o| o == op_name) {
                return Err(KvErr::bad(format!(
                    "Operation {op_name} is not permitted on this key."
                )));
            }
            let private = private_key(k)?;
            let output = if wrap {
                let public = OaepPublicEncryptingKey::new(private.public_key())
                    .map_err(|_| KvErr::bad("Key is not usable for RSA-OAEP-256."))?;
                let mut out = vec![0u8; public.ciphertext_size()];
                let n = public
                    .encrypt(&OAEP_SHA256_MGF1SHA256, &input, &mut out, None)
                    .map_err(|_| {
                        KvErr::bad(format!(
                            "The value is too long to wrap with this key (at most {} bytes).",
                            public.max_plaintext_size(&OAEP_SHA256_MGF1SHA256)
                        ))
                    })?
                    .len();
                out.truncate(n);
                out
            } else {
                let private = OaepPrivateDecryptingKey::new(private)
                    .map_err(|_| KvErr::bad("Key is not usable for RSA-OAEP-256."))?;
                let mut out = vec![0u8; private.min_output_size()];
                let n = private
                    .decrypt(&OAEP_SHA256_MGF1SHA256, &input, &mut out, None)
                    .map_err(|_| {
                        KvErr::bad("The ciphertext could not be unwrapped with this key.")
                    })?
                    .len();
                out.truncate(n);
                out
            };
            Ok(json!({
                "kid": format!("{base}/keys/{name}/{}", k.version),
                "value": b64url(&output),
            }))
        }
    }
}

/// Wraps `plaintext` locally with a public JWK's `n` and `e` (RSA-OAEP-256), the way a client holding
/// only the public key would; the double's unwrapkey must accept the result.
pub fn wrap_locally(n: &[u8], e: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
    let public: PublicEncryptingKey = PublicKeyComponents { n, e }.try_into().ok()?;
    let public = OaepPublicEncryptingKey::new(public).ok()?;
    let mut out = vec![0u8; public.ciphertext_size()];
    let len = public
        .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
        .ok()?
        .len();
    out.truncate(len);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_the_sdk_paths() {
        let r = route(&Method::POST, "/keys/k//wrapkey").ok().unwrap();
        assert_eq!(
            (r.op, r.name.as_str(), r.version.as_str()),
            (Op::WrapKey, "k", "")
        );
        let r = route(&Method::POST, "/keys/k/abc/unwrapkey").ok().unwrap();
        assert_eq!((r.op, r.version.as_str()), (Op::UnwrapKey, "abc"));
        let r = route(&Method::GET, "/secrets/s/").ok().unwrap();
        assert_eq!((r.op, r.version.as_str()), (Op::GetSecret, ""));
        let r = route(&Method::GET, "/secrets/s/versions").ok().unwrap();
        assert_eq!(r.op, Op::ListSecretVersions);
        assert!(route(&Method::DELETE, "/secrets/s").is_err());
        assert!(route(&Method::GET, "/certificates/c").is_err());
    }

    #[test]
    fn wildcard_grants() {
        assert!(action_matches(
            "Microsoft.KeyVault/vaults/*",
            actions::KEYS_UNWRAP
        ));
        assert!(!action_matches(actions::KEYS_WRAP, actions::KEYS_UNWRAP));
        assert!(!action_matches(
            "Microsoft.KeyVault/vaults/secrets/*",
            actions::KEYS_WRAP
        ));
    }

    #[test]
    fn faults_count_down_and_combine() {
        let mut st = VaultState::default();
        st.faults
            .push(Fault::delay(None, Duration::from_millis(5)).times(1));
        st.faults.push(Fault::status(Op::GetSecret, 503).times(2));
        let (d, t) = take_faults(&mut st, Op::SetSecret);
        assert_eq!((d, t), (Duration::from_millis(5), None));
        let (d, t) = take_faults(&mut st, Op::GetSecret);
        assert_eq!((d, t), (Duration::ZERO, Some(FaultAction::Status(503))));
        let (_, t) = take_faults(&mut st, Op::GetSecret);
        assert_eq!(t, Some(FaultAction::Status(503)));
        let (_, t) = take_faults(&mut st, Op::GetSecret);
        assert_eq!(t, None);
        assert!(st.faults.is_empty());
    }
}
