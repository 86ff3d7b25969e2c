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
//! What it copies too, off by default: the service limit per vault ([`Throttle`]: 4,000 transactions per
//! 10 s, 429 with `Retry-After` beyond it), on with [`Vault::throttle`].
//!
//! What it adds for tests: [`Fault`] injection per operation (status, delay, connection reset; for the
//! next N requests or until cleared), a log of served requests ([`Vault::served`]) that never holds a
//! request or response body, and admin helpers that bypass RBAC ([`Vault::create_key`], [`Vault::set_secret`],
//! [`Vault::secret_value`]) the way ARM and the portal do.
//!
//! State lives in memory and vanishes with the double, unless [`VaultSpec::persist`] names a JSON file
//! (0600; secret values in clear, RSA private keys as PKCS#8): then secrets and keys (not role
//! assignments or faults) are loaded at start and rewritten after every change.
//!
//! Where things are: this file holds the double and each vault's handle (start, stop, role assignments, admin
//! helpers, persistence); `auth.rs` the challenge and the bearer token; `rbac.rs` data actions, roles,
//! principals and the RBAC check; `store.rs` secret and key versions, their bundles and the RSA helpers;
//! `routes.rs` the accept loop, routing and the request pipeline; `faults.rs` fault injection and the throttle.

mod auth;
mod faults;
mod rbac;
mod routes;
mod store;

pub use faults::{Fault, FaultAction, Throttle};
pub use rbac::{actions, principal_for, principals, roles, Assignment, Op, Scope};
pub use store::wrap_locally;

use routes::accept_loop;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use store::{new_rsa_key, new_version, now, SecretVersion, Store};
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

/// One served request (no bodies, ever).
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub op: Option<Op>,
    pub status: u16,
    /// The token's `oid`, when the request was authenticated.
    pub principal: Option<String>,
    /// When the request arrived (its head read), on this process's clock.
    pub at: std::time::Instant,
    /// When its answer was ready to be written (the handler returned), on the same clock: a client cannot have
    /// seen the answer before this.
    pub answered: std::time::Instant,
    /// The client sent this request no earlier than this: the answer before it on its connection (HTTP/1.1,
    /// no pipelining), or the connection's accept for its first request.
    pub sent_after: std::time::Instant,
    /// The connection it came on (numbered by the double, unique in this process).
    pub connection: u64,
    /// The `Retry-After` of the answer, in seconds (429s).
    pub retry_after: Option<u64>,
}

#[derive(Default)]
struct VaultState {
    store: Store,
    assignments: Vec<Assignment>,
    faults: Vec<Fault>,
    throttle: faults::Throttling,
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

    /// The service limit on every vault of the double (each counts its own transactions).
    pub fn throttle(&self, limit: Option<Throttle>) {
        for v in &self.vaults {
            v.throttle(limit);
        }
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

    /// Turns the service limit on (`Some`) or off (`None`, the default), starting with an empty window.
    pub fn throttle(&self, limit: Option<Throttle>) {
        self.state().throttle.set(limit);
    }
    pub fn throttle_limit(&self) -> Option<Throttle> {
        self.state().throttle.limit
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
