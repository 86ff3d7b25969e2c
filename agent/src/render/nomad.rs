//! Nomad agent configuration: server on the nomad-server tier, client with the Docker driver on workers.

use super::{
    env_file, identity_env, join_list, json_file, path_str, Layout, Material, Plan, RenderOptions,
};
use crate::files::Owner;
use crate::node::{NodeSpec, Role};
use crate::services::ServiceSpec;
use crate::version::{Installed, Product};
use serde::Serialize;

pub const HTTP_PORT: u16 = 4646;
/// Where Ubuntu's containernetworking-plugins package (pinned in packer) puts the CNI reference plugins that
/// Nomad's bridge networking and Connect sidecars run; `image verify` checks them (image/mod.rs).
pub const CNI_DIR: &str = "/usr/lib/cni";

#[derive(Serialize)]
pub struct NomadConfig {
    pub region: String,
    pub datacenter: String,
    pub name: String,
    pub data_dir: String,
    pub bind_addr: String,
    pub advertise: Advertise,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Server>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<Client>,
    pub acl: Acl,
    pub tls: Tls,
    pub consul: Consul,
    pub vault: Vault,
    pub telemetry: Telemetry,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<Plugins>,
    pub disable_update_check: bool,
    pub log_level: String,
    pub log_json: bool,
}

#[derive(Serialize)]
pub struct Advertise {
    pub http: String,
    pub rpc: String,
    pub serf: String,
}

#[derive(Serialize)]
pub struct Server {
    pub enabled: bool,
    pub bootstrap_expect: u8,
    pub raft_multiplier: u8,
    pub server_join: ServerJoin,
}

#[derive(Serialize)]
pub struct Client {
    pub enabled: bool,
    pub server_join: ServerJoin,
    /// The CNI plugins for bridge networking and Connect sidecars ([`CNI_DIR`]).
    pub cni_path: String,
}

#[derive(Serialize)]
pub struct ServerJoin {
    pub retry_join: Vec<String>,
}

#[derive(Serialize)]
pub struct Acl {
    pub enabled: bool,
}

#[derive(Serialize)]
pub struct Tls {
    pub http: bool,
    pub rpc: bool,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    pub verify_server_hostname: bool,
    pub verify_https_client: bool,
}

#[derive(Serialize)]
pub struct Consul {
    pub address: String,
    pub ssl: bool,
    pub ca_file: String,
}

/// Nomad's `vault` block in the workload-identity model (Nomad >= 1.7; docs/bootstrap.md#nomad-workload-identities):
/// servers sign each task's identity for Vault (`default_identity`, audience `vault.io`); clients log in with it
/// to Vault's JWT auth method `jwt-nomad` (its default role) and hand the task its Vault token. No Vault token
/// on any Nomad agent.
#[derive(Serialize)]
pub struct Vault {
    pub enabled: bool,
    /// Clients: Vault's address (tag `hashistack-vault-address`, else Vault's active node in Consul's DNS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Clients: the cluster CA, which issued Vault's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Clients: where the JWT auth method is mounted, with Nomad's trailing slash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_auth_backend_path: Option<String>,
    /// Servers: the identity every task with a `vault` block gets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_identity: Option<DefaultIdentity>,
}

#[derive(Serialize)]
pub struct DefaultIdentity {
    pub aud: Vec<String>,
    pub ttl: String,
}

/// The `vault` block for a Nomad server or client, as Nomad's Vault integration documents each.
pub fn vault_block(spec: &NodeSpec, layout: &Layout) -> Vault {
    use crate::names::{NOMAD_JWT_MOUNT, NOMAD_VAULT_AUDIENCE, NOMAD_VAULT_IDENTITY_TTL};
    if spec.role == Role::NomadServer {
        Vault {
            enabled: true,
            address: None,
            ca_file: None,
            jwt_auth_backend_path: None,
            default_identity: Some(DefaultIdentity {
                aud: vec![NOMAD_VAULT_AUDIENCE.into()],
                ttl: NOMAD_VAULT_IDENTITY_TTL.into(),
            }),
        }
    } else {
        Vault {
            enabled: true,
            address: Some(spec.vault_api()),
            ca_file: Some(path_str(&layout.ca_file(Product::Nomad))),
            jwt_auth_backend_path: Some(format!("{NOMAD_JWT_MOUNT}/")),
            default_identity: None,
        }
    }
}

/// Nomad's `telemetry` block: Prometheus format at `/v1/metrics?format=prometheus`, with allocation and node
/// metrics (docs/operability.md).
#[derive(Serialize)]
pub struct Telemetry {
    pub collection_interval: String,
    pub disable_hostname: bool,
    pub prometheus_metrics: bool,
    pub publish_allocation_metrics: bool,
    pub publish_node_metrics: bool,
}

#[derive(Serialize)]
pub struct Plugins {
    pub docker: DockerPlugin,
}

#[derive(Serialize)]
pub struct DockerPlugin {
    pub config: DockerConfig,
}

#[derive(Serialize)]
pub struct DockerConfig {
    pub allow_privileged: bool,
    pub volumes: DockerVolumes,
}

#[derive(Serialize)]
pub struct DockerVolumes {
    pub enabled: bool,
}

/// `consul-token.json` (0640, secret): Nomad's Consul ACL token in a file of its own, merged by Nomad with the
/// rest of its config directory, so `nomad.json` holds nothing secret.
#[derive(Serialize)]
pub struct ConsulTokenFile<'a> {
    pub consul: ConsulToken<'a>,
}

#[derive(Serialize)]
pub struct ConsulToken<'a> {
    pub token: &'a str,
}

/// Where Nomad's Consul token is rendered.
pub fn consul_token_file(layout: &Layout) -> std::path::PathBuf {
    layout.config_dir(Product::Nomad).join("consul-token.json")
}

#[derive(Serialize)]
pub struct GossipConfig<'a> {
    pub server: GossipServer<'a>,
}

#[derive(Serialize)]
pub struct GossipServer<'a> {
    pub encrypt: &'a str,
}

pub fn config(
    spec: &NodeSpec,
    layout: &Layout,
    _opts: &RenderOptions,
    _installed: &Installed,
) -> NomadConfig {
    let p = Product::Nomad;
    let settings = spec
        .nomad
        .as_ref()
        .expect("nomad nodes always carry nomad settings");
    let join = ServerJoin {
        retry_join: join_list(&settings.join),
    };
    let ip = spec.ip.to_string();
    let (server, client, plugin) = match spec.role {
        Role::NomadServer => (
            Some(Server {
                enabled: true,
                bootstrap_expect: settings.servers.unwrap_or(3),
                raft_multiplier: 1,
                server_join: join,
            }),
            None,
            None,
        ),
        _ => (
            None,
            Some(Client {
                enabled: true,
                server_join: join,
                cni_path: CNI_DIR.into(),
            }),
            Some(Plugins {
                docker: DockerPlugin {
                    config: DockerConfig {
                        allow_privileged: false,
                        volumes: DockerVolumes { enabled: false },
                    },
                },
            }),
        ),
    };
    NomadConfig {
        region: "global".into(),
        datacenter: spec.datacenter.clone(),
        name: spec.node_name.clone(),
        data_dir: path_str(&layout.data_dir(p, spec.role)),
        bind_addr: ip.clone(),
        advertise: Advertise {
            http: ip.clone(),
            rpc: ip.clone(),
            serf: ip.clone(),
        },
        server,
        client,
        acl: Acl { enabled: true },
        tls: Tls {
            http: true,
            rpc: true,
            ca_file: path_str(&layout.ca_file(p)),
            cert_file: path_str(&layout.cert_file(p)),
            key_file: path_str(&layout.key_file(p)),
            verify_server_hostname: true,
            verify_https_client: false,
        },
        consul: Consul {
            address: format!("{}:{}", spec.ip, super::consul::HTTPS_PORT),
            ssl: true,
            ca_file: path_str(&layout.ca_file(Product::Consul)),
        },
        vault: vault_block(spec, layout),
        telemetry: Telemetry {
            collection_interval: "10s".into(),
            disable_hostname: true,
            prometheus_metrics: true,
            publish_allocation_metrics: true,
            publish_node_metrics: true,
        },
        plugin,
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
    let p = Product::Nomad;
    let cfg = config(spec, layout, opts, installed);
    plan.files.push(json_file(
        layout.config_file(p),
        &cfg,
        0o640,
        owner.clone(),
        false,
    ));
    let server = spec.role == Role::NomadServer;
    let (name, unit) = if server {
        ("nomad", "nomad.service")
    } else {
        ("nomad-client", "nomad-client.service")
    };
    // One node runs either the server or the client; both units read nomad.env.
    let env_path = layout.env_file("nomad");
    if let Some(m) = material {
        if server {
            let g = GossipConfig {
                server: GossipServer {
                    encrypt: &m.nomad_gossip_key,
                },
            };
            plan.files.push(json_file(
                layout.gossip_file(p),
                &g,
                0o640,
                owner.clone(),
                true,
            ));
        }
        if let Some(token) = m.nomad_consul_token.as_deref() {
            plan.files.push(json_file(
                consul_token_file(layout),
                &ConsulTokenFile {
                    consul: ConsulToken { token },
                },
                0o640,
                owner,
                true,
            ));
        }
        let vars = identity_env(spec);
        plan.files
            .push(env_file(env_path.clone(), &vars, opts.owner("root")));
    }
    plan.services.push(ServiceSpec {
        name: name.into(),
        unit: unit.into(),
        command: vec![
            path_str(&opts.nomad_bin),
            "agent".into(),
            format!("-config={}", path_str(&layout.config_dir(p))),
        ],
        env_file: material.map(|_| env_path.clone()),
        watch: vec![layout.config_dir(p), env_path.clone()],
        health: crate::services::Health::NomadHttps {
            addr: format!("{}:{HTTP_PORT}", spec.ip),
            ca_file: layout.ca_file(p),
            tls_name: (spec.role == Role::Worker).then(|| "client.global.nomad".into()),
        },
    });
}
