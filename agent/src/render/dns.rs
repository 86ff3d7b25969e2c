//! `.consul` names on the hosts and in Docker containers (docs/dns.md).
//!
//! - Every node: a systemd-resolved drop-in, `/etc/systemd/resolved.conf.d/consul.conf`, that sends the
//!   `consul` domain (routing-only, `~consul`) to the local Consul agent's DNS port; every other name keeps
//!   going to the VNet's resolver. The image's `/etc/resolv.conf` points at resolved's stub (127.0.0.53), so
//!   every process on the host resolves `vault.service.consul`, `nomad.service.consul`, `<node>.node.consul`.
//! - Workers: Docker containers cannot reach 127.0.0.53 (their loopback is their own), so resolved also listens
//!   on the Docker bridge's address (`DNSStubListenerExtra=172.17.0.1`), Docker's daemon pins that bridge
//!   address (`bip`) and gives containers that resolver (`dns`): containers resolve `.consul` through resolved,
//!   and everything else as the host does. (Consul's own docs also describe binding Consul's DNS to the bridge;
//!   Docker's `dns` takes no port, so that needs Consul on port 53 and Consul started after Docker — resolved
//!   already listens on 53 and binds the extra address before the bridge exists.)
//!
//! Both are typed structs: the drop-in is written in systemd's INI syntax by [`ResolvedDropIn::to_ini`], the
//! daemon configuration as JSON.

use super::{json_file, Layout, Plan, RenderOptions};
use crate::files::FileSpec;
use crate::node::{NodeSpec, Role};

/// Consul's DNS port (its default; the rendered configuration does not move it).
pub const CONSUL_DNS_PORT: u16 = 8600;
/// The Docker bridge's address on workers (`bip`), where resolved listens for containers.
pub const DOCKER_BRIDGE_IP: &str = "172.17.0.1";
pub const DOCKER_BRIDGE_CIDR: &str = "172.17.0.1/16";

/// `[Resolve]` of resolved.conf(5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDropIn {
    /// `DNS=`: servers, `address:port`.
    pub dns: Vec<String>,
    /// `Domains=`: `~consul` routes the domain without making it a search domain.
    pub domains: Vec<String>,
    /// `DNSStubListenerExtra=`: more addresses the stub listens on (workers: the Docker bridge).
    pub stub_listener_extra: Vec<String>,
}

impl ResolvedDropIn {
    /// The file's text: one `[Resolve]` section, one `Key=value` line per set key, list values space-separated.
    pub fn to_ini(&self) -> String {
        let mut s = String::from("# Rendered by hashistack-agent (docs/dns.md): .consul names go to the local Consul agent.\n[Resolve]\n");
        for (k, v) in [
            ("DNS", &self.dns),
            ("Domains", &self.domains),
            ("DNSStubListenerExtra", &self.stub_listener_extra),
        ] {
            if !v.is_empty() {
                s.push_str(k);
                s.push('=');
                s.push_str(&v.join(" "));
                s.push('\n');
            }
        }
        s
    }
}

/// Docker's `/etc/docker/daemon.json` (the keys the agent sets).
#[derive(Debug, serde::Serialize)]
pub struct DockerDaemon {
    pub bip: String,
    pub dns: Vec<String>,
}

pub fn resolved_drop_in(spec: &NodeSpec, opts: &RenderOptions) -> ResolvedDropIn {
    // Consul's DNS listens on its client addresses: 127.0.0.1 on a VM (`listen.loopback`), else the node's own.
    let host = if opts.loopback {
        "127.0.0.1".to_string()
    } else {
        spec.ip.to_string()
    };
    ResolvedDropIn {
        dns: vec![format!("{host}:{CONSUL_DNS_PORT}")],
        domains: vec!["~consul".into()],
        stub_listener_extra: if spec.role == Role::Worker {
            vec![DOCKER_BRIDGE_IP.into()]
        } else {
            vec![]
        },
    }
}

pub fn docker_daemon() -> DockerDaemon {
    DockerDaemon {
        bip: DOCKER_BRIDGE_CIDR.into(),
        dns: vec![DOCKER_BRIDGE_IP.into()],
    }
}

pub fn resolved_file(layout: &Layout) -> std::path::PathBuf {
    layout.root.join("etc/systemd/resolved.conf.d/consul.conf")
}

pub fn docker_daemon_file(layout: &Layout) -> std::path::PathBuf {
    layout.root.join("etc/docker/daemon.json")
}

/// Adds the drop-in (every node) and Docker's daemon configuration (workers), and the image's units they
/// belong to, restarted when they change.
pub fn render(spec: &NodeSpec, layout: &Layout, opts: &RenderOptions, plan: &mut Plan) {
    let root = opts.owner("root");
    plan.files.push(FileSpec {
        path: resolved_file(layout),
        content: resolved_drop_in(spec, opts).to_ini().into_bytes(),
        mode: 0o644,
        owner: root.clone(),
        secret: false,
    });
    plan.host_units.push(HostUnit {
        unit: "systemd-resolved.service".into(),
        watch: resolved_file(layout),
    });
    if spec.role == Role::Worker {
        plan.files.push(json_file(
            docker_daemon_file(layout),
            &docker_daemon(),
            0o644,
            root,
            false,
        ));
        plan.host_units.push(HostUnit {
            unit: "docker.service".into(),
            watch: docker_daemon_file(layout),
        });
    }
}

/// A unit of the image the agent configures but does not run (restarted when its file changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUnit {
    pub unit: String,
    pub watch: std::path::PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_in_is_resolved_syntax() {
        let d = ResolvedDropIn {
            dns: vec!["127.0.0.1:8600".into()],
            domains: vec!["~consul".into()],
            stub_listener_extra: vec!["172.17.0.1".into()],
        };
        assert_eq!(
            d.to_ini(),
            "# Rendered by hashistack-agent (docs/dns.md): .consul names go to the local Consul agent.\n\
             [Resolve]\nDNS=127.0.0.1:8600\nDomains=~consul\nDNSStubListenerExtra=172.17.0.1\n"
        );
        let plain = ResolvedDropIn {
            stub_listener_extra: vec![],
            ..d
        };
        assert!(!plain.to_ini().contains("DNSStubListenerExtra"));
    }

    #[test]
    fn docker_uses_the_bridge_resolver() {
        assert_eq!(
            serde_json::to_value(docker_daemon()).unwrap(),
            serde_json::json!({"bip": "172.17.0.1/16", "dns": ["172.17.0.1"]})
        );
    }
}
