//! The nodes: their definitions (the scale sets' tags), configurations and lifecycles.

use super::*;

/// The tags the lab's scale sets carry (cf. the ARM templates, which carry the Azure values).
pub fn node_defs(o: &LabOptions) -> Vec<NodeDef> {
    let consul_ips: Vec<Ipv4Addr> = (0..o.consul_servers).map(|i| o.ip(11 + i)).collect();
    let vault_ips: Vec<Ipv4Addr> = (0..o.vault_servers).map(|i| o.ip(21 + i)).collect();
    let list = |ips: &[Ipv4Addr]| {
        ips.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let common = |role: Role| {
        vec![
            (tags::TAG_ROLE.to_string(), role.to_string()),
            (tags::TAG_CLUSTER.into(), o.cluster.clone()),
            (tags::TAG_DATACENTER.into(), "dc1".into()),
            (tags::TAG_CONSUL_JOIN.into(), list(&consul_ips)),
            (
                tags::TAG_BLOB_ENDPOINT.into(),
                format!("https://{}:{AZURITE_PORT}/devstoreaccount1/", o.ip(1)),
            ),
            (
                tags::TAG_KEYVAULT_URI.into(),
                format!("https://{}:{KEYVAULT_PORT}/", o.ip(1)),
            ),
        ]
    };
    let server_vaults = |t: &mut Vec<(String, String)>| {
        t.push((
            tags::TAG_ESCROW_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_ESCROW_PORT}/", o.ip(1)),
        ));
        t.push((
            tags::TAG_SERVERS_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_SERVERS_PORT}/", o.ip(1)),
        ));
        t.push((
            tags::TAG_STATUS_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_STATUS_PORT}/", o.ip(1)),
        ));
    };
    let mut defs = Vec::new();
    for (i, ip) in consul_ips.iter().enumerate() {
        let mut t = common(Role::ConsulServer);
        t.push((
            tags::TAG_CONSUL_SERVERS.into(),
            o.consul_servers.to_string(),
        ));
        server_vaults(&mut t);
        defs.push(NodeDef {
            name: format!("consul-{i}"),
            role: Role::ConsulServer,
            ip: *ip,
            scale_set: "hs-consul".into(),
            tags: t,
        });
    }
    for (i, ip) in vault_ips.iter().enumerate() {
        let mut t = common(Role::VaultServer);
        t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        if let Some(a) = o.nomad_address() {
            t.push((tags::TAG_NOMAD_ADDRESS.into(), a));
        }
        t.push((tags::TAG_VAULT_JOIN.into(), list(&vault_ips)));
        t.push((tags::TAG_VAULT_SERVERS.into(), o.vault_servers.to_string()));
        t.push((
            tags::TAG_VAULT_SEAL.into(),
            format!(
                "transit address=http://{}:{TRANSIT_PORT} key_name=autounseal mount_path=transit/",
                o.ip(2)
            ),
        ));
        server_vaults(&mut t);
        defs.push(NodeDef {
            name: format!("vault-{i}"),
            role: Role::VaultServer,
            ip: *ip,
            scale_set: "hs-vault".into(),
            tags: t,
        });
    }
    let nomad_ips: Vec<Ipv4Addr> = (0..o.nomad_servers).map(|i| o.ip(31 + i)).collect();
    for (i, ip) in nomad_ips.iter().enumerate() {
        let mut t = common(Role::NomadServer);
        t.push((tags::TAG_NOMAD_JOIN.into(), list(&nomad_ips)));
        t.push((tags::TAG_NOMAD_SERVERS.into(), o.nomad_servers.to_string()));
        if o.vault_servers > 0 {
            t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        }
        if let Some(a) = o.nomad_address() {
            t.push((tags::TAG_NOMAD_ADDRESS.into(), a));
        }
        server_vaults(&mut t);
        defs.push(NodeDef {
            name: format!("nomad-{i}"),
            role: Role::NomadServer,
            ip: *ip,
            scale_set: "hs-nomad".into(),
            tags: t,
        });
    }
    // Workers: no servers vault, no status vault, no escrow vault (cf. the ARM template's hs-workers tags).
    for i in 0..o.workers {
        let mut t = common(Role::Worker);
        t.push((tags::TAG_NOMAD_JOIN.into(), list(&nomad_ips)));
        if o.vault_servers > 0 {
            t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        }
        defs.push(NodeDef {
            name: format!("worker-{i}"),
            role: Role::Worker,
            ip: o.ip(41 + i),
            scale_set: "hs-workers".into(),
            tags: t,
        });
    }
    // The operators' jumpbox (a VM, not a scale set): a Consul client, and where `hashistack-agent status` runs.
    if o.jumpbox.unwrap_or(o.start_agents) {
        let mut t = common(Role::Jumpbox);
        if o.vault_servers > 0 {
            t.push((tags::TAG_VAULT_ADDRESS.into(), o.vault_address()));
        }
        t.push((
            tags::TAG_STATUS_VAULT_URI.into(),
            format!("https://{}:{KEYVAULT_STATUS_PORT}/", o.ip(1)),
        ));
        defs.push(NodeDef {
            name: "jumpbox".into(),
            role: Role::Jumpbox,
            ip: o.ip(5),
            scale_set: String::new(),
            tags: t,
        });
    }
    defs
}

impl Lab {
    pub fn agent_config(&self, def: &NodeDef, root: &Path) -> AgentConfig {
        let o = &self.opts;
        let mut c = AgentConfig::default();
        c.imds.endpoint = format!("http://{}:{IMDS_PORT}", def.ip);
        c.imds.deadline_secs = 60;
        c.paths.root = root.to_path_buf();
        c.paths.owners = Owners::CurrentUser;
        // One audit file for all Vault servers: OpenBao refuses to make a server active whose declared audit
        // device differs from the one in storage, and on Azure every server names /var/log/vault/audit.log.
        c.paths.vault_audit_file = Some(self.vault_audit_log());
        c.services.backend = Backend::Process;
        c.services.consul_bin = self.tools.consul.clone();
        c.services.vault_bin = self.tools.bao.clone();
        c.services.nomad_bin = self.nomad_bin();
        c.listen.loopback = false;
        // The cluster CA and gossip keys come from the shared Key Vault, created by the first server (as on
        // Azure); the lab CA above only signs the emulators' certificates, like a public CA would.
        c.material.source = hashistack_agent::config::MaterialSource::Keyvault;
        c.vault.seal_token_file = Some(o.state_dir.join("secrets/transit.token"));
        // The emulators' certificates come from the lab CA, and the Key Vault double lives on 127.x.
        c.azure.extra_ca_file = Some(o.state_dir.join("ca.pem"));
        c.azure.verify_challenge_resource = false;
        // The lab's emulators live on loopback, and its transit seal is plain http.
        c.azure.endpoints = hashistack_agent::config::EndpointPolicy::Any;
        c.bootstrap.enabled = o.bootstrap;
        c.bootstrap.follower_deadline_secs = 300;
        c.bootstrap.azure_deadline_secs = 60;
        // Azure's shortest lease: a crashed leader's lease frees up in 15 s instead of 60.
        c.bootstrap.lease_secs = 15;
        c.bootstrap.peer_grace_secs = 90;
        // The lab cannot mount: a server's "data disk" is the directory <root>/var/lib/hashistack-data, which
        // `reimage` keeps (lab/components.md). The agent's disk step is off by configuration, as on any
        // machine without a data disk device.
        c.disk.mode = hashistack_agent::config::DiskMode::Directory;
        c
    }

    /// The file every lab Vault server's audit device writes (`paths.vault_audit_file`), shared as the
    /// declared device must be the same on every server of a cluster.
    pub fn vault_audit_log(&self) -> PathBuf {
        self.opts.state_dir.join("vault-audit/audit.log")
    }

    pub fn node_config(&self, i: usize) -> AgentConfig {
        AgentConfig::load(&self.nodes[i].config_path).expect("lab-written agent config")
    }

    pub fn write_node_config(&self, i: usize, cfg: &AgentConfig) -> Result<(), LabError> {
        let text =
            toml::to_string(cfg).map_err(|e| LabError::Failed(format!("agent config: {e}")))?;
        std::fs::write(&self.nodes[i].config_path, text).map_err(io("agent.toml"))
    }

    /// Adds a node: its root directory, agent config and fake IMDS (not yet its agent).
    pub async fn add_node(&mut self, def: NodeDef) -> Result<usize, LabError> {
        let root = self.opts.state_dir.join("nodes").join(&def.name);
        std::fs::create_dir_all(root.join("etc/hashistack")).map_err(io("node root"))?;
        let config_path = root.join("etc/hashistack/agent.toml");
        let cfg = self.agent_config(&def, &root);
        let text =
            toml::to_string(&cfg).map_err(|e| LabError::Failed(format!("agent config: {e}")))?;
        std::fs::write(&config_path, text).map_err(io("agent.toml"))?;
        let doc =
            imds::instance_document(&def.name, &def.scale_set, &def.ip.to_string(), &def.tags);
        let state = Arc::new(Mutex::new(ImdsState {
            oid: keyvault::principal_for(def.role).into(),
            user_data: self
                .opts
                .user_data
                .get(&def.role)
                .cloned()
                .unwrap_or_default(),
            ..ImdsState::new(doc)
        }));
        let task = imds::serve(SocketAddr::from((def.ip, IMDS_PORT)), state.clone())
            .await
            .map_err(io(format!("fake IMDS on {}", def.ip)))?;
        self.nodes.push(Node {
            def,
            root,
            config_path,
            imds: state,
            imds_task: task,
            agent: None,
        });
        Ok(self.nodes.len() - 1)
    }

    /// Powers a node on: runs its agent (`hashistack-agent boot`), which renders and starts its services.
    pub fn start_agent(&mut self, i: usize) -> Result<(), LabError> {
        // A boot starts from nothing: no process of the node's previous life survives.
        self.kill_node_services(i);
        let node = &self.nodes[i];
        let args = vec![
            "--log-format".into(),
            "json".into(),
            "boot".into(),
            "--config".into(),
            node.config_path.display().to_string(),
        ];
        let name = format!("agent-{}", node.def.name);
        let p = procs::spawn(
            &name,
            &self.tools.agent,
            &args,
            &[],
            &self.log_dir,
            &self.pid_dir,
            None,
        )
        .map_err(io("start agent"))?;
        self.nodes[i].agent = Some(p);
        Ok(())
    }

    /// Orderly shutdown of a node (the agent stops its services).
    pub async fn stop_agent(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].agent.take() {
            p.stop(Duration::from_secs(30)).await;
        }
    }

    /// Power loss: SIGKILL the agent and every service it started (a VM's processes do not survive it).
    pub async fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].agent.take() {
            p.kill().await;
        }
        self.kill_node_services(i);
    }

    /// Resumes a node's agent that stopped itself (`faults.pause_at`) or was stopped: SIGCONT to the agent only.
    pub fn continue_agent(&self, i: usize) {
        if let Some(pid) = self.nodes[i].agent.as_ref().and_then(|a| a.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }

    /// Whether the node's agent is stopped (SIGSTOP): its state in `/proc/<pid>/stat` is `T`.
    pub fn agent_stopped(&self, i: usize) -> bool {
        let Some(pid) = self.nodes[i].agent.as_ref().and_then(|a| a.pid()) else {
            return false;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state …`: the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("T")
    }

    /// SIGKILLs the services recorded by the node's agent (pid files under its state directory).
    pub fn kill_node_services(&self, i: usize) {
        let pids = self.nodes[i].root.join("var/lib/hashistack/pids");
        procs::signal_pid_files(&pids, nix::sys::signal::Signal::SIGKILL);
    }

    /// What an image roll (`az vmss update-instances`) does to a VM: power off, replace the OS disk with a
    /// fresh one from the image, power on. Everything under the node's root is removed except its data disk
    /// (`Layout::data_disk_dir`, `<root>/var/lib/hashistack-data`): configs, certificates, the agent's state
    /// (boot record, version cache) and logs are gone, the raft data and the escrow spool stay. The image's
    /// agent.toml is written again and the agent boots.
    pub async fn reimage(&mut self, i: usize) -> Result<(), LabError> {
        self.stop_agent(i).await;
        self.kill_node_services(i);
        let root = self.nodes[i].root.clone();
        let keep = hashistack_agent::render::Layout::new(&root).data_disk_dir();
        wipe_except(&root, &keep)?;
        let cfg = self.agent_config(&self.nodes[i].def, &root);
        std::fs::create_dir_all(root.join("etc/hashistack")).map_err(io("node root"))?;
        self.write_node_config(i, &cfg)?;
        self.start_agent(i)
    }

    pub async fn reboot(&mut self, i: usize) -> Result<(), LabError> {
        self.stop_agent(i).await;
        self.start_agent(i)
    }

    /// Waits until the node's current agent has finished its boot (successfully or not) and returns its record.
    pub async fn wait_booted(
        &self,
        i: usize,
        deadline: Duration,
    ) -> Result<hashistack_agent::boot::BootRecord, LabError> {
        let pid = self.nodes[i]
            .agent
            .as_ref()
            .and_then(|a| a.pid())
            .ok_or_else(|| LabError::Failed("agent not running".into()))?;
        let start = Instant::now();
        loop {
            if let Some(r) = self
                .boot_record(i)
                .filter(|r| r.pid == pid && (r.ok || r.last_error.is_some()))
            {
                return Ok(r);
            }
            if start.elapsed() > deadline {
                return Err(LabError::Failed(format!(
                    "{}: agent did not finish booting within {deadline:?}",
                    self.nodes[i].def.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.def.name == name)
    }

    /// The boot record an agent wrote, if any.
    pub fn boot_record(&self, i: usize) -> Option<hashistack_agent::boot::BootRecord> {
        let p = self.nodes[i].root.join("var/lib/hashistack/boot.json");
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }
}
