//! Consul agent configuration (server on the consul-server tier, client everywhere else).
//!
//! Syntax follows the installed version: Consul 1.12 moved TLS settings into a `tls` block and 1.14 added
//! `ports.grpc_tls`; older releases (the lab's 1.8.7) take the flat `verify_*`/`*_file` keys.

use super::{
    env_file, identity_env, join_list, json_file, path_str, Layout, Material, Plan, RenderOptions,
};
use crate::files::Owner;
use crate::node::{NodeSpec, Role};
use crate::services::ServiceSpec;
use crate::version::{Installed, Product, Version};
use serde::Serialize;

pub const HTTPS_PORT: u16 = 8501;
const TLS_BLOCK_SINCE: Version = Version::new(1, 12, 0);
const GRPC_TLS_SINCE: Version = Version::new(1, 14, 0);
const UI_CONFIG_SINCE: Version = Version::new(1, 9, 0);

#[derive(Serialize)]
pub struct ConsulConfig {
    pub datacenter: String,
    pub primary_datacenter: String,
    pub node_name: String,
    pub data_dir: String,
    pub server: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_expect: Option<u8>,
    pub bind_addr: String,
    pub advertise_addr: String,
    pub client_addr: String,
    pub retry_join: Vec<String>,
    pub encrypt_verify_incoming: bool,
    pub encrypt_verify_outgoing: bool,
    pub ports: Ports,
    pub performance: Performance,
    pub acl: Acl,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub legacy_tls: Option<LegacyTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_encrypt: Option<AutoEncrypt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<Connect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autopilot: Option<Autopilot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ui: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ui_config: Option<UiConfig>,
    pub telemetry: super::PrometheusTelemetry,
    pub disable_update_check: bool,
    pub log_level: String,
    pub log_json: bool,
}

#[derive(Serialize)]
pub struct Ports {
    /// Plain HTTP is off: the API is served over HTTPS only.
    pub http: i32,
    pub https: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_tls: Option<u16>,
    /// Servers: -1 turns the WAN gossip listener (8302) off. One datacenter per cluster (docs/network.md); a second
    /// one would need WAN federation, its port opened between the datacenters' servers, and this removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serf_wan: Option<i32>,
}

#[derive(Serialize)]
pub struct Performance {
    pub raft_multiplier: u8,
}

#[derive(Serialize)]
pub struct Acl {
    pub enabled: bool,
    pub default_policy: String,
    pub down_policy: String,
    pub enable_token_persistence: bool,
}

/// Consul < 1.12 TLS keys (top level).
#[derive(Serialize)]
pub struct LegacyTls {
    pub ca_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    pub verify_incoming_rpc: bool,
    pub verify_incoming_https: bool,
    pub verify_outgoing: bool,
    pub verify_server_hostname: bool,
    pub tls_min_version: String,
}

/// Consul ≥ 1.12 `tls` block.
#[derive(Serialize)]
pub struct Tls {
    pub defaults: TlsDefaults,
    pub internal_rpc: InternalRpc,
    pub https: TlsHttps,
}

#[derive(Serialize)]
pub struct TlsDefaults {
    pub ca_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    pub verify_incoming: bool,
    pub verify_outgoing: bool,
    pub tls_min_version: String,
}

#[derive(Serialize)]
pub struct InternalRpc {
    pub verify_server_hostname: bool,
}

#[derive(Serialize)]
pub struct TlsHttps {
    /// The HTTPS API authenticates with ACL tokens; client certificates are not required there.
    pub verify_incoming: bool,
}

/// Servers: `allow_tls` (sign client certificates). Workers and the jumpbox: `tls` (ask the servers for a
/// certificate at start, authorised by the agent token), so they never hold the CA key.
#[derive(Serialize)]
pub struct AutoEncrypt {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_tls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_san: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_san: Vec<String>,
}

/// Servers: Connect on, which runs the built-in CA that signs auto-encrypt client certificates.
#[derive(Serialize)]
pub struct Connect {
    pub enabled: bool,
}

/// `connect-ca.json` (servers, 0640, secret): the built-in CA provider uses the cluster CA, so auto-encrypt
/// client certificates chain to the same root every other certificate does (reading this configuration back
/// through the API needs `operator:write` since Consul 1.8.6).
#[derive(Serialize)]
pub struct ConnectCaFile<'a> {
    pub connect: ConnectCa<'a>,
}

#[derive(Serialize)]
pub struct ConnectCa<'a> {
    pub ca_provider: &'static str,
    pub ca_config: ConnectCaConfig<'a>,
}

#[derive(Serialize)]
pub struct ConnectCaConfig<'a> {
    pub private_key: &'a str,
    pub root_cert: &'a str,
}

#[derive(Serialize)]
pub struct Autopilot {
    pub cleanup_dead_servers: bool,
}

#[derive(Serialize)]
pub struct UiConfig {
    pub enabled: bool,
}

/// The agent's ACL token, in a file of its own (0640): `{"acl": {"tokens": {"agent": …}}}`.
#[derive(Serialize)]
pub struct AclTokensFile<'a> {
    pub acl: AclTokens<'a>,
}

#[derive(Serialize)]
pub struct AclTokens<'a> {
    pub tokens: AgentToken<'a>,
}

#[derive(Serialize)]
pub struct AgentToken<'a> {
    pub agent: &'a str,
}

/// The gossip key, in a file of its own (mode 0640) so consul.json holds nothing secret.
#[derive(Serialize)]
pub struct GossipConfig<'a> {
    pub encrypt: &'a str,
}

/// Whether this role's Consul agent gets its certificate from the servers (`auto_encrypt`) instead of the CA.
pub fn uses_auto_encrypt(role: Role) -> bool {
    !role.is_server_tier()
}

pub fn config(
    spec: &NodeSpec,
    layout: &Layout,
    opts: &RenderOptions,
    installed: &Installed,
) -> ConsulConfig {
    let v = installed.version;
    let server = spec.role == Role::ConsulServer;
    let p = Product::Consul;
    let (ca, cert, key) = (
        path_str(&layout.ca_file(p)),
        path_str(&layout.cert_file(p)),
        path_str(&layout.key_file(p)),
    );
    let client_addr = if opts.loopback {
        format!("127.0.0.1 {}", spec.ip)
    } else {
        spec.ip.to_string()
    };
    let modern = v >= TLS_BLOCK_SINCE;
    // Nodes that never hold the CA key (workers, the jumpbox) take their certificate over auto_encrypt; the
    // Consul clients on server-tier nodes are issued theirs from the CA like the servers.
    let auto_client = uses_auto_encrypt(spec.role);
    let (cert, key) = if auto_client {
        (None, None)
    } else {
        (Some(cert), Some(key))
    };
    ConsulConfig {
        datacenter: spec.datacenter.clone(),
        primary_datacenter: spec.datacenter.clone(),
        node_name: spec.node_name.clone(),
        data_dir: path_str(&layout.data_dir(p, spec.role)),
        server,
        bootstrap_expect: if server { spec.consul_servers } else { None },
        bind_addr: spec.ip.to_string(),
        advertise_addr: spec.ip.to_string(),
        client_addr,
        retry_join: join_list(&spec.consul_join),
        encrypt_verify_incoming: true,
        encrypt_verify_outgoing: true,
        ports: Ports {
            http: -1,
            https: HTTPS_PORT,
            grpc_tls: (v >= GRPC_TLS_SINCE).then_some(8503),
            serf_wan: (spec.role == Role::ConsulServer).then_some(-1),
        },
        performance: Performance { raft_multiplier: 1 },
        acl: Acl {
            enabled: true,
            default_policy: "deny".into(),
            down_policy: "extend-cache".into(),
            enable_token_persistence: true,
        },
        legacy_tls: (!modern).then(|| LegacyTls {
            ca_file: ca.clone(),
            cert_file: cert.clone(),
            key_file: key.clone(),
            verify_incoming_rpc: !auto_client,
            verify_incoming_https: false,
            verify_outgoing: true,
            verify_server_hostname: true,
            tls_min_version: "tls12".into(),
        }),
        tls: modern.then(|| Tls {
            defaults: TlsDefaults {
                ca_file: ca.clone(),
                cert_file: cert.clone(),
                key_file: key.clone(),
                verify_incoming: !auto_client,
                verify_outgoing: true,
                tls_min_version: "TLSv1_2".into(),
            },
            internal_rpc: InternalRpc {
                verify_server_hostname: true,
            },
            https: TlsHttps {
                verify_incoming: false,
            },
        }),
        auto_encrypt: if server {
            Some(AutoEncrypt {
                allow_tls: Some(true),
                tls: None,
                ip_san: vec![],
                dns_san: vec![],
            })
        } else if auto_client {
            Some(AutoEncrypt {
                allow_tls: None,
                tls: Some(true),
                // Consul adds localhost, 127.0.0.1 and ::1; the health check and peers dial the node's address.
                ip_san: vec![spec.ip.to_string()],
                dns_san: vec![spec.node_name.clone()],
            })
        } else {
            None
        },
        connect: server.then_some(Connect { enabled: true }),
        autopilot: server.then_some(Autopilot {
            cleanup_dead_servers: true,
        }),
        ui: (server && v < UI_CONFIG_SINCE).then_some(true),
        ui_config: (server && v >= UI_CONFIG_SINCE).then_some(UiConfig { enabled: true }),
        telemetry: super::PrometheusTelemetry::new(),
        disable_update_check: true,
        log_level: "INFO".into(),
        log_json: true,
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
    let p = Product::Consul;
    let cfg = config(spec, layout, opts, installed);
    plan.files.push(json_file(
        layout.config_file(p),
        &cfg,
        0o640,
        owner.clone(),
        false,
    ));
    let env_path = layout.env_file("consul");
    if let Some(m) = material {
        plan.files.push(json_file(
            layout.gossip_file(p),
            &GossipConfig {
                encrypt: &m.consul_gossip_key,
            },
            0o640,
            owner.clone(),
            true,
        ));
        if let Some(key) = m.consul_connect_ca_key.as_deref() {
            plan.files.push(json_file(
                layout.config_dir(p).join("connect-ca.json"),
                &ConnectCaFile {
                    connect: ConnectCa {
                        ca_provider: "consul",
                        ca_config: ConnectCaConfig {
                            private_key: key,
                            root_cert: &m.ca_pem,
                        },
                    },
                },
                0o640,
                owner.clone(),
                true,
            ));
        }
        if let Some(token) = m.consul_agent_token.as_deref() {
            plan.files.push(json_file(
                layout.config_dir(p).join("acl-tokens.json"),
                &AclTokensFile {
                    acl: AclTokens {
                        tokens: AgentToken { agent: token },
                    },
                },
                0o640,
                owner,
                true,
            ));
        }
        // Cloud auto-join (go-discover's azure provider) authenticates with the managed identity; a
        // user-assigned one is selected by AZURE_CLIENT_ID. consul.service reads this file.
        let vars = identity_env(spec);
        plan.files
            .push(env_file(env_path.clone(), &vars, opts.owner("root")));
    }
    plan.services.push(ServiceSpec {
        name: "consul".into(),
        unit: "consul.service".into(),
        command: vec![
            path_str(&opts.consul_bin),
            "agent".into(),
            format!("-config-dir={}", path_str(&layout.config_dir(p))),
        ],
        env_file: material.map(|_| env_path.clone()),
        watch: vec![layout.config_dir(p), env_path.clone()],
        health: crate::services::Health::ConsulHttps {
            addr: format!("{}:{HTTPS_PORT}", spec.ip),
            ca_file: layout.ca_file(p),
        },
    });
}
