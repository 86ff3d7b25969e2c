//! The lab's health: each node's products, waits, and the table `lab status` prints.

use super::*;

impl Lab {
    pub async fn health(&self) -> LabHealth {
        let t = Duration::from_secs(3);
        let mut nodes = Vec::new();
        for n in &self.nodes {
            let consul_ca = n.root.join("etc/consul.d/tls/ca.pem");
            let consul = health::probe(
                &hashistack_agent::services::Health::ConsulHttps {
                    addr: format!("{}:8501", n.def.ip),
                    ca_file: consul_ca.clone(),
                },
                t,
            )
            .await;
            let peers = if n.def.role == Role::ConsulServer {
                consul_peers(&n.def.ip, &consul_ca, t).await
            } else {
                None
            };
            let vault = if n.def.role == Role::VaultServer {
                Some(
                    health::probe(
                        &hashistack_agent::services::Health::VaultHttps {
                            addr: format!("{}:8200", n.def.ip),
                            ca_file: n.root.join("etc/vault.d/tls/ca.pem"),
                        },
                        t,
                    )
                    .await,
                )
            } else {
                None
            };
            let nomad = if matches!(n.def.role, Role::NomadServer | Role::Worker) {
                Some(
                    health::probe(
                        &hashistack_agent::services::Health::NomadHttps {
                            addr: format!("{}:4646", n.def.ip),
                            ca_file: n.root.join("etc/nomad.d/tls/ca.pem"),
                            tls_name: (n.def.role == Role::Worker)
                                .then(|| "client.global.nomad".into()),
                        },
                        t,
                    )
                    .await,
                )
            } else {
                None
            };
            let boot = self
                .nodes
                .iter()
                .position(|m| m.def.name == n.def.name)
                .and_then(|i| self.boot_record(i));
            nodes.push(NodeHealth {
                name: n.def.name.clone(),
                role: n.def.role.to_string(),
                ip: n.def.ip.to_string(),
                boot_ok: boot.as_ref().map(|b| b.ok),
                boot_error: boot.as_ref().and_then(|b| b.last_error.clone()),
                bootstrap: boot.and_then(|b| b.bootstrap),
                consul,
                raft_peers: peers,
                vault,
                nomad,
                gossip_encrypted: n.root.join("etc/consul.d/gossip.json").is_file(),
                agent_token: n.root.join("etc/consul.d/acl-tokens.json").is_file(),
            });
        }
        LabHealth {
            consul_servers: self.opts.consul_servers,
            vault_servers: self.opts.vault_servers,
            bootstrap_expected: self.opts.bootstrap,
            nodes,
        }
    }

    /// Waits until every Consul server agrees on a leader with all peers, every Consul client knows the
    /// leader, and every Vault server answers (uninitialized until the bootstrap).
    pub async fn wait_healthy(
        &self,
        deadline: Duration,
    ) -> Result<LabHealth, (LabError, LabHealth)> {
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let h = self.health().await;
            if h.healthy() {
                return Ok(h);
            }
            if let Some(bad) = h.nodes.iter().find(|n| n.boot_ok == Some(false)) {
                let e = LabError::Failed(format!(
                    "agent on {} failed: {}",
                    bad.name,
                    bad.boot_error.clone().unwrap_or_default()
                ));
                return Err((e, h));
            }
            if start.elapsed() > deadline {
                return Err((
                    LabError::Failed(format!("cluster not healthy within {deadline:?}")),
                    h,
                ));
            }
            if self.opts.verbose && last_report.elapsed() > Duration::from_secs(3) {
                last_report = Instant::now();
                say(
                    &self.opts,
                    format!("waiting ({}s): {}", start.elapsed().as_secs(), h.progress()),
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

async fn consul_peers(ip: &Ipv4Addr, ca: &Path, t: Duration) -> Option<usize> {
    let c = health::client_for(ca, t).ok()?;
    let peers: Vec<String> = c
        .get(format!("https://{ip}:8501/v1/status/peers"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(peers.len())
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeHealth {
    pub name: String,
    pub role: String,
    pub ip: String,
    pub boot_ok: Option<bool>,
    pub boot_error: Option<String>,
    pub consul: Probe,
    pub raft_peers: Option<usize>,
    pub vault: Option<Probe>,
    /// Nomad servers: their HTTPS API knows the leader.
    pub nomad: Option<Probe>,
    pub gossip_encrypted: bool,
    /// The agent's tier bootstrap outcome (server tiers).
    pub bootstrap: Option<String>,
    /// Consul runs with the least-privilege agent token handed over by the Consul tier's bootstrap.
    pub agent_token: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabHealth {
    pub consul_servers: u8,
    pub vault_servers: u8,
    pub bootstrap_expected: bool,
    pub nodes: Vec<NodeHealth>,
}

impl LabHealth {
    /// Whether a node's Consul agent is expected to run. Workers and the jumpbox start Consul only once the
    /// Consul tier's bootstrap handed out the agent token (their auto-encrypt certificate request needs it):
    /// in a lab without the bootstrap they wait, and are not counted.
    fn consul_expected(&self, n: &NodeHealth) -> bool {
        self.bootstrap_expected || !matches!(n.role.as_str(), "worker" | "jumpbox")
    }

    pub fn consul_leader(&self) -> Option<String> {
        let expected: Vec<&NodeHealth> = self
            .nodes
            .iter()
            .filter(|n| self.consul_expected(n))
            .collect();
        let leaders: Vec<&str> = expected
            .iter()
            .filter_map(|n| match &n.consul {
                Probe::Leader { leader } => Some(leader.as_str()),
                _ => None,
            })
            .collect();
        let first = leaders.first()?;
        (leaders.len() == expected.len() && leaders.iter().all(|l| l == first))
            .then(|| first.to_string())
    }

    pub fn consul_healthy(&self) -> bool {
        let servers_ok = self
            .nodes
            .iter()
            .filter(|n| n.role == "consul-server")
            .all(|n| n.raft_peers == Some(self.consul_servers as usize));
        servers_ok
            && self.consul_leader().is_some()
            && self
                .nodes
                .iter()
                .filter(|n| self.consul_expected(n))
                .all(|n| n.gossip_encrypted)
    }

    /// Healthy: Consul formed; without bootstrap every Vault answers; with it every Vault is initialized and
    /// unsealed and every server agent finished its tier's bootstrap.
    pub fn healthy(&self) -> bool {
        if !self.consul_healthy() || !self.nomad_led() {
            return false;
        }
        if !self.bootstrap_expected {
            return self.vault_answering();
        }
        self.vault_unsealed() && self.bootstrapped() && self.nodes.iter().all(|n| n.agent_token)
    }

    pub fn vault_unsealed(&self) -> bool {
        self.nodes.iter().filter_map(|n| n.vault.as_ref()).all(|v| {
            *v == Probe::Vault {
                initialized: true,
                sealed: false,
            }
        })
    }

    /// Every Nomad server knows the same leader (vacuous without Nomad servers).
    pub fn nomad_led(&self) -> bool {
        let leaders: Vec<&str> = self
            .nodes
            .iter()
            .filter_map(|n| match &n.nomad {
                Some(Probe::Leader { leader }) => Some(leader.as_str()),
                _ => None,
            })
            .collect();
        let servers = self.nodes.iter().filter(|n| n.nomad.is_some()).count();
        leaders.len() == servers && leaders.windows(2).all(|w| w[0] == w[1])
    }

    pub fn bootstrapped(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.role.as_str(),
                    "consul-server" | "vault-server" | "nomad-server"
                )
            })
            .all(|n| {
                matches!(
                    n.bootstrap.as_deref(),
                    Some("bootstrapped" | "already-done" | "recovered")
                )
            })
    }

    pub fn vault_answering(&self) -> bool {
        self.nodes
            .iter()
            .filter_map(|n| n.vault.as_ref())
            .all(|v| matches!(v, Probe::Vault { .. }))
    }

    pub fn progress(&self) -> String {
        let consul_up = self
            .nodes
            .iter()
            .filter(|n| matches!(n.consul, Probe::Leader { .. }))
            .count();
        let vault_up = self
            .nodes
            .iter()
            .filter(|n| matches!(n.vault, Some(Probe::Vault { .. })))
            .count();
        format!(
            "consul agents with a leader {consul_up}/{}, vault servers answering {vault_up}/{}",
            self.nodes.len(),
            self.vault_servers
        )
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let verdict = if self.healthy() {
            "HEALTHY"
        } else {
            "NOT HEALTHY"
        };
        s.push_str(&format!(
            "{verdict}: consul leader {}\n",
            self.consul_leader().unwrap_or_else(|| "none".into())
        ));
        s.push_str(&format!(
            "{:<10} {:<14} {:<14} {:<8} {:<24} {:<12} {:<26} {:<14} {}\n",
            "NODE", "ROLE", "IP", "BOOT", "CONSUL", "RAFT PEERS", "VAULT", "NOMAD", "BOOTSTRAP"
        ));
        for n in &self.nodes {
            let consul = match &n.consul {
                Probe::Leader { .. } => "alive, TLS+gossip".to_string(),
                Probe::NoLeader => "no leader".into(),
                Probe::Unreachable { .. } => "unreachable".into(),
                Probe::Vault { .. } => "?".into(),
            };
            let vault = match &n.vault {
                None => "-".to_string(),
                Some(Probe::Vault {
                    initialized,
                    sealed,
                }) => {
                    format!(
                        "{}, {}",
                        if *initialized {
                            "initialized"
                        } else {
                            "not initialized"
                        },
                        if *sealed { "sealed" } else { "unsealed" }
                    )
                }
                Some(Probe::Unreachable { error }) => format!("unreachable ({error})"),
                Some(_) => "?".into(),
            };
            let nomad = match &n.nomad {
                None => "-",
                Some(Probe::Leader { .. }) => "leader known",
                Some(Probe::NoLeader) => "no leader",
                Some(Probe::Unreachable { .. }) => "unreachable",
                Some(_) => "?",
            };
            let boot = match n.boot_ok {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "running",
            };
            s.push_str(&format!(
                "{:<10} {:<14} {:<14} {:<8} {:<24} {:<12} {:<26} {:<14} {}\n",
                n.name,
                n.role,
                n.ip,
                boot,
                consul,
                n.raft_peers
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                vault,
                nomad,
                n.bootstrap.as_deref().unwrap_or("-")
            ));
        }
        s
    }
}
