//! Vault (or OpenBao) server configuration: integrated raft storage, TLS listeners, auto-unseal.
//! Azure: `seal "azurekeyvault"` with the managed identity. Lab: `seal "transit"` against a second server.
//! Both come from the node's `hashistack-vault-seal` tag through the same code path.
//!
//! The file audit device: OpenBao ≥ 2.4 gets it declared here (`audit` stanza), because OpenBao refuses
//! audit devices created through the API; HashiCorp Vault has no such stanza and gets it from the tier
//! bootstrap (`PUT /v1/sys/audit/file`, agent/src/bootstrap/vault/).

use super::{env_file, identity_env, json_file, path_str, Layout, Material, Plan, RenderOptions};
use crate::files::Owner;
use crate::node::{Join, NodeSpec, Seal};
use crate::services::ServiceSpec;
use crate::version::{Installed, Product, Version};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const API_PORT: u16 = 8200;
pub const CLUSTER_PORT: u16 = 8201;

#[derive(Serialize)]
pub struct VaultConfig {
    pub ui: bool,
    pub cluster_name: String,
    pub api_addr: String,
    pub cluster_addr: String,
    /// Integrated storage recommends disabling mlock (it maps its database file); swap is off on the image.
    /// OpenBao removed mlock (2.0) and warns about the key, so it is left out there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_mlock: Option<bool>,
    pub listener: Vec<Listener>,
    pub storage: Storage,
    pub seal: SealBlock,
    /// Declared audit devices (OpenBao ≥ 2.4 only; see [`declares_audit_devices`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<AuditStanza>,
    /// Prometheus metrics at `/v1/sys/metrics?format=prometheus`, for a token with `read` on `sys/metrics`
    /// (`unauthenticated_metrics_access` stays off: docs/operability.md).
    pub telemetry: super::PrometheusTelemetry,
    pub log_level: String,
    pub log_format: String,
}

/// The audit device's mount path, the same whether declared (OpenBao) or enabled through the API (Vault):
/// `sys/audit` lists it as `file/`.
pub const AUDIT_DEVICE_PATH: &str = "file";

/// The device's description, declared or enabled.
pub const AUDIT_DESCRIPTION: &str = "hashistack: every request";

/// First OpenBao release that reads `audit` stanzas from the server configuration: 2.4.0 (openbao.org
/// docs/release-notes/2-3-0: from 2.3.2 "audit subsystem will no longer allow creation of new devices via the
/// API except by setting unsafe_allow_api_audit_creation. In the v2.4.0 release, support for
/// configuration-based audit device definition will be added"; docs/configuration/audit for the syntax).
pub const OPENBAO_DECLARATIVE_AUDIT: Version = Version::new(2, 4, 0);

/// Whether the installed server takes its audit devices from the configuration file. HashiCorp Vault
/// (1.x, through 1.21) has no `audit` stanza — its devices are enabled through `sys/audit` — and would only
/// warn about an unknown key, so the stanza is rendered for OpenBao ≥ 2.4.0 alone.
pub fn declares_audit_devices(installed: &Installed) -> bool {
    installed.is_openbao() && installed.version >= OPENBAO_DECLARATIVE_AUDIT
}

/// Where the file audit device writes: `paths.vault_audit_file`, else `/var/log/vault/audit.log` under the
/// layout root — the only log path
/// vault.service may write (`LogsDirectory=vault`, systemd/vault.service).
pub fn audit_file(layout: &Layout) -> PathBuf {
    layout
        .vault_audit_file
        .clone()
        .unwrap_or_else(|| layout.root.join("var/log/vault/audit.log"))
}

/// A logrotate(8) rule, typed; [`LogrotateRule::to_text`] writes logrotate's syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogrotateRule {
    pub path: String,
    /// `daily`, `weekly`, …
    pub frequency: &'static str,
    /// Rotated files kept.
    pub rotate: u32,
    /// Rotated early when bigger (`maxsize`).
    pub max_size: &'static str,
    pub compress: bool,
    /// The newest rotated file stays uncompressed (a writer that has not reopened yet still writes to it).
    pub delay_compress: bool,
    pub missing_ok: bool,
    pub not_if_empty: bool,
    /// `nocreate`: the writer creates the new file itself (its own owner and mode) when it reopens.
    pub no_create: bool,
    /// Run once after rotating (`sharedscripts`, `postrotate` … `endscript`).
    pub post_rotate: Vec<String>,
}

impl LogrotateRule {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "# Rendered by hashistack-agent (docs/operability.md).\n{} {{\n",
            self.path
        );
        let mut line = |l: &str| {
            s.push_str("    ");
            s.push_str(l);
            s.push('\n');
        };
        line(self.frequency);
        line(&format!("rotate {}", self.rotate));
        line(&format!("maxsize {}", self.max_size));
        for (on, word) in [
            (self.compress, "compress"),
            (self.delay_compress, "delaycompress"),
            (self.missing_ok, "missingok"),
            (self.not_if_empty, "notifempty"),
            (self.no_create, "nocreate"),
        ] {
            if on {
                line(word);
            }
        }
        if !self.post_rotate.is_empty() {
            line("sharedscripts");
            line("postrotate");
            for c in &self.post_rotate {
                line(&format!("    {c}"));
            }
            line("endscript");
        }
        s.push_str("}\n");
        s
    }
}

/// Where the audit log's rotation rule goes (logrotate's drop-in directory, run daily by the image's timer).
pub fn audit_logrotate_file(layout: &Layout) -> PathBuf {
    layout.root.join("etc/logrotate.d/vault-audit")
}

/// The audit log's rotation: daily or at 100 MB, 14 kept, compressed; then Vault is sent SIGHUP, on which its
/// file audit device reopens its file (Vault's file audit device documentation: "log rotation … send a SIGHUP");
/// `nocreate`, so Vault creates the new file with its own owner and mode (0600).
pub fn audit_logrotate(layout: &Layout) -> LogrotateRule {
    LogrotateRule {
        path: audit_file(layout).display().to_string(),
        frequency: "daily",
        rotate: 14,
        max_size: "100M",
        compress: true,
        delay_compress: true,
        missing_ok: true,
        not_if_empty: true,
        no_create: true,
        post_rotate: vec![
            "/bin/systemctl kill --signal=HUP --kill-whom=main vault.service >/dev/null 2>&1 || true".into(),
        ],
    }
}

/// One `audit "<type>" "<path>" { … }` block in OpenBao's JSON form:
/// `{"audit": [{"file": {"<path>": {"description": …, "options": {…}}}}]}`.
#[derive(Serialize)]
pub struct AuditStanza {
    /// Devices of type `file`, by mount path.
    pub file: BTreeMap<String, AuditDevice>,
}

#[derive(Serialize)]
pub struct AuditDevice {
    pub description: String,
    pub options: FileAuditOptions,
}

/// Options of a `file` device (a string→string map in OpenBao's configuration, as in the API).
#[derive(Serialize)]
pub struct FileAuditOptions {
    pub file_path: String,
}

#[derive(Serialize)]
pub struct Listener {
    pub tcp: TcpListener,
}

#[derive(Serialize)]
pub struct TcpListener {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_address: Option<String>,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub tls_min_version: String,
}

#[derive(Serialize)]
pub struct Storage {
    pub raft: Raft,
}

#[derive(Serialize)]
pub struct Raft {
    pub path: String,
    pub node_id: String,
    pub performance_multiplier: u8,
    /// Empty on a single-server tier, and then left out: OpenBao rejects `retry_join: []`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retry_join: Vec<RetryJoin>,
}

#[derive(Serialize)]
pub struct RetryJoin {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_join: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_join_scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_api_addr: Option<String>,
    pub leader_ca_cert_file: String,
}

#[derive(Serialize)]
pub enum SealBlock {
    #[serde(rename = "azurekeyvault")]
    AzureKeyVault {
        tenant_id: String,
        vault_name: String,
        key_name: String,
    },
    #[serde(rename = "transit")]
    Transit {
        address: String,
        key_name: String,
        mount_path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_ca_cert: Option<String>,
    },
}

pub fn config(
    spec: &NodeSpec,
    layout: &Layout,
    opts: &RenderOptions,
    installed: &Installed,
) -> VaultConfig {
    let p = Product::Vault;
    let settings = spec
        .vault
        .as_ref()
        .expect("vault-server nodes always carry vault settings");
    let ca = path_str(&layout.ca_file(p));
    let tcp = |address: String, cluster_address: Option<String>| Listener {
        tcp: TcpListener {
            address,
            cluster_address,
            tls_cert_file: path_str(&layout.cert_file(p)),
            tls_key_file: path_str(&layout.key_file(p)),
            tls_min_version: "tls12".into(),
        },
    };
    let mut listener = vec![tcp(
        format!("{}:{API_PORT}", spec.ip),
        Some(format!("{}:{CLUSTER_PORT}", spec.ip)),
    )];
    if opts.loopback {
        listener.push(tcp(format!("127.0.0.1:{API_PORT}"), None));
    }
    let retry_join = match &settings.join {
        Join::Cloud(expr) => vec![RetryJoin {
            auto_join: Some(expr.clone()),
            auto_join_scheme: Some("https".into()),
            leader_api_addr: None,
            leader_ca_cert_file: ca.clone(),
        }],
        Join::Static(ips) => ips
            .iter()
            .filter(|ip| **ip != spec.ip)
            .map(|ip| RetryJoin {
                auto_join: None,
                auto_join_scheme: None,
                leader_api_addr: Some(format!("https://{ip}:{API_PORT}")),
                leader_ca_cert_file: ca.clone(),
            })
            .collect(),
    };
    let seal = match &settings.seal {
        Seal::AzureKeyVault {
            vault_name,
            key_name,
            tenant_id,
        } => SealBlock::AzureKeyVault {
            tenant_id: tenant_id.clone(),
            vault_name: vault_name.clone(),
            key_name: key_name.clone(),
        },
        Seal::Transit {
            address,
            key_name,
            mount_path,
        } => SealBlock::Transit {
            address: address.clone(),
            key_name: key_name.clone(),
            mount_path: mount_path.clone(),
            tls_ca_cert: address.starts_with("https://").then(|| ca.clone()),
        },
    };
    let audit = if declares_audit_devices(installed) {
        vec![AuditStanza {
            file: BTreeMap::from([(
                AUDIT_DEVICE_PATH.to_string(),
                AuditDevice {
                    description: AUDIT_DESCRIPTION.into(),
                    options: FileAuditOptions {
                        file_path: path_str(&audit_file(layout)),
                    },
                },
            )]),
        }]
    } else {
        Vec::new()
    };
    VaultConfig {
        ui: true,
        cluster_name: spec.cluster.clone(),
        api_addr: format!("https://{}:{API_PORT}", spec.ip),
        cluster_addr: format!("https://{}:{CLUSTER_PORT}", spec.ip),
        disable_mlock: (!installed.is_openbao()).then_some(true),
        listener,
        storage: Storage {
            raft: Raft {
                path: path_str(&layout.data_dir(p, spec.role)),
                node_id: spec.node_name.clone(),
                performance_multiplier: 1,
                retry_join,
            },
        },
        seal,
        audit,
        telemetry: super::PrometheusTelemetry::new(),
        log_level: "info".into(),
        log_format: "json".into(),
    }
}

pub fn render(
    spec: &NodeSpec,
    layout: &Layout,
    opts: &RenderOptions,
    installed: &Installed,
    material: Option<&Material>,
    owner: Owner,
    plan: &mut Plan,
) {
    let p = Product::Vault;
    let cfg = config(spec, layout, opts, installed);
    plan.files
        .push(json_file(layout.config_file(p), &cfg, 0o640, owner, false));
    plan.files.push(crate::files::FileSpec {
        path: audit_logrotate_file(layout),
        content: audit_logrotate(layout).to_text().into_bytes(),
        mode: 0o644,
        owner: opts.owner("root"),
        secret: false,
    });
    let env_path = layout.env_file("vault");
    if let Some(m) = material {
        let mut vars = identity_env(spec);
        if let (Seal::Transit { .. }, Some(tok)) = (
            &spec.vault.as_ref().expect("vault settings").seal,
            m.seal_token.as_deref(),
        ) {
            vars.push(("VAULT_TOKEN", tok));
        }
        plan.files
            .push(env_file(env_path.clone(), &vars, opts.owner("root")));
    }
    plan.services.push(ServiceSpec {
        name: "vault".into(),
        unit: "vault.service".into(),
        command: vec![
            path_str(&opts.vault_bin),
            "server".into(),
            format!("-config={}", path_str(&layout.config_dir(p))),
        ],
        env_file: material.map(|_| env_path.clone()),
        watch: vec![layout.config_dir(p), env_path.clone()],
        health: crate::services::Health::VaultHttps {
            addr: format!("{}:{API_PORT}", spec.ip),
            ca_file: layout.ca_file(p),
        },
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::InstanceMetadata;
    use crate::version::Version;

    fn spec() -> NodeSpec {
        let md = InstanceMetadata::from_json(include_bytes!(
            "../../tests/fixtures/imds/vault-server-transit.json"
        ))
        .unwrap();
        NodeSpec::from_metadata(&md).unwrap()
    }

    fn rendered(distribution: &str, version: Version) -> serde_json::Value {
        let opts = RenderOptions::from_config(&crate::config::AgentConfig::default());
        let installed = Installed {
            distribution: distribution.into(),
            version,
        };
        serde_json::to_value(config(
            &spec(),
            &Layout::new(std::path::Path::new("/")),
            &opts,
            &installed,
        ))
        .unwrap()
    }

    #[test]
    fn disable_mlock_only_where_the_binary_knows_it() {
        assert_eq!(
            rendered("Vault", Version::new(1, 18, 0))["disable_mlock"],
            true
        );
        // OpenBao removed mlock in 2.0 and warns about the unknown key.
        assert!(rendered("OpenBao", Version::new(2, 7, 2))
            .get("disable_mlock")
            .is_none());
    }

    #[test]
    fn audit_device_declared_only_where_the_server_reads_it() {
        let bao = rendered("OpenBao", Version::new(2, 7, 2));
        assert_eq!(
            bao["audit"],
            serde_json::json!([{"file": {"file": {
                "description": "hashistack: every request",
                "options": {"file_path": "/var/log/vault/audit.log"}
            }}}])
        );
        assert!(rendered("OpenBao", Version::new(2, 4, 0))
            .get("audit")
            .is_some());
        // OpenBao 2.3.x refuses API-created devices but cannot declare them yet; HashiCorp Vault has no stanza.
        assert!(rendered("OpenBao", Version::new(2, 3, 2))
            .get("audit")
            .is_none());
        assert!(rendered("Vault", Version::new(1, 21, 0))
            .get("audit")
            .is_none());
    }

    #[test]
    fn the_audit_log_rotation_signals_vault() {
        let r = audit_logrotate(&Layout::new(std::path::Path::new("/")));
        assert_eq!(
            r.to_text(),
            "# Rendered by hashistack-agent (docs/operability.md).\n\
             /var/log/vault/audit.log {\n    daily\n    rotate 14\n    maxsize 100M\n    compress\n    delaycompress\n    \
             missingok\n    notifempty\n    nocreate\n    sharedscripts\n    postrotate\n        \
             /bin/systemctl kill --signal=HUP --kill-whom=main vault.service >/dev/null 2>&1 || true\n    endscript\n}\n"
        );
    }

    #[test]
    fn audit_file_is_under_the_layout_root() {
        assert_eq!(
            audit_file(&Layout::new(std::path::Path::new("/srv/node-1"))),
            std::path::Path::new("/srv/node-1/var/log/vault/audit.log")
        );
    }

    #[test]
    fn static_join_skips_this_node_and_transit_over_http_has_no_ca() {
        let v = rendered("Vault", Version::new(1, 18, 0));
        let joins: Vec<&str> = v["storage"]["raft"]["retry_join"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["leader_api_addr"].as_str().unwrap())
            .collect();
        assert_eq!(
            joins,
            ["https://127.0.0.41:8200", "https://127.0.0.43:8200"],
            "127.0.0.42 is this node"
        );
        assert_eq!(v["seal"]["transit"]["address"], "http://127.0.0.2:8200");
        assert!(v["seal"]["transit"].get("tls_ca_cert").is_none());
    }
}
