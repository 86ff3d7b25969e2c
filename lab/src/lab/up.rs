//! Starting the lab (emulators, the transit OpenBao, the nodes) and taking it down.

use super::*;

impl Lab {
    pub async fn up(opts: LabOptions, tools: Tools) -> Result<Lab, LabError> {
        let o = &opts;
        if o.state_dir.exists() {
            // A previous lab that was not taken down: stop what it left and start clean.
            procs::kill_pid_files(&o.state_dir.join("pids"));
            std::fs::remove_dir_all(&o.state_dir)
                .map_err(io(format!("remove old state {}", o.state_dir.display())))?;
        }
        let secrets = o.state_dir.join("secrets");
        std::fs::create_dir_all(&secrets).map_err(io("create state dir"))?;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod secrets"))?;
        let pid_dir = o.state_dir.join("pids");
        let log_dir = o.state_dir.join("logs");
        std::fs::write(
            o.state_dir.join("lab.pid"),
            format!("{}\n", std::process::id()),
        )
        .map_err(io("lab.pid"))?;

        // Cluster PKI and gossip keys (on Azure the bootstrap creates these once and keeps them in Key Vault).
        say(
            o,
            "creating the lab CA, emulator certificate and gossip keys",
        );
        let now = time::OffsetDateTime::now_utc();
        let (ca_pem, ca_key) = hashistack_agent::tls::generate_ca("hashistack lab CA", 30, now)
            .map_err(|e| LabError::Failed(e.to_string()))?;
        let ca = hashistack_agent::tls::ClusterCa::from_pem(&ca_pem, &ca_key)
            .map_err(|e| LabError::Failed(e.to_string()))?;
        let emu = ca
            .issue(
                "lab emulators",
                &[o.ip(1).to_string(), "localhost".into(), "127.0.0.1".into()],
                30,
                now,
            )
            .map_err(|e| LabError::Failed(e.to_string()))?;
        let ca_cert = o.state_dir.join("ca.pem");
        std::fs::write(&ca_cert, &ca_pem).map_err(io("ca.pem"))?;
        write_secret(&secrets.join("ca-key.pem"), &ca_key)?;
        std::fs::write(o.state_dir.join("emulator.pem"), &emu.cert_pem)
            .map_err(io("emulator.pem"))?;
        write_secret(&secrets.join("emulator-key.pem"), &emu.key_pem)?;

        let mut lab = Lab {
            opts: opts.clone(),
            tools,
            nodes: Vec::new(),
            ca_cert,
            azurite: None,
            keyvault: None,
            transit: None,
            pid_dir,
            log_dir,
            extra_tasks: Vec::new(),
            operator_endpoint: None,
        };
        lab.start_emulators().await?;
        lab.start_transit().await?;
        if lab.opts.vault_servers > 0 {
            let front = SocketAddr::from((lab.opts.ip(VAULT_LB_HOST), 8200));
            let backends = (0..lab.opts.vault_servers)
                .map(|i| SocketAddr::from((lab.opts.ip(21 + i), 8200)))
                .collect();
            let tasks = crate::lb::serve(front, backends)
                .await
                .map_err(io(format!("Vault load balancer on {front}")))?;
            lab.extra_tasks.extend(tasks);
        }
        lab.link_nomad_double()?;
        for def in node_defs(&lab.opts) {
            lab.add_node(def).await?;
        }
        let n = lab.nodes.len();
        if lab.opts.start_agents {
            say(&lab.opts, format!("booting {n} agents"));
            for i in 0..n {
                lab.start_agent(i)?;
            }
        }
        Ok(lab)
    }

    async fn start_emulators(&mut self) -> Result<(), LabError> {
        let o = self.opts.clone();
        let host = o.ip(1);
        if let Some(azurite) = self.tools.azurite.clone() {
            say(
                &o,
                format!("starting Azurite (blob, HTTPS, OAuth) on {host}:{AZURITE_PORT}"),
            );
            let dir = o.state_dir.join("azurite");
            std::fs::create_dir_all(&dir).map_err(io("azurite dir"))?;
            self.azurite = Some(self.spawn_azurite(&azurite)?);
            wait_for("Azurite", Duration::from_secs(60), || {
                tcp_open(SocketAddr::from((host, AZURITE_PORT)))
            })
            .await?;
            // What the ARM template creates: the coordination, escrow and snapshots containers.
            for container in ["coordination", "escrow", "snapshots"] {
                self.create_container(container).await?;
            }
        } else {
            say(
                &o,
                "Azurite not installed: blob storage unavailable (run lab/setup.sh)",
            );
        }
        say(
            &o,
            format!(
                "starting the Key Vault contract double on {host}:{KEYVAULT_PORT} (shared), {KEYVAULT_ESCROW_PORT} (escrow), {KEYVAULT_SERVERS_PORT} (servers) and {KEYVAULT_STATUS_PORT} (status)"
            ),
        );
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(io(p.display().to_string()));
        let kv = KeyVaultDouble::start_lab(
            &read(o.state_dir.join("emulator.pem"))?,
            &read(o.state_dir.join("secrets/emulator-key.pem"))?,
            host,
            KEYVAULT_PORT,
            Some(&o.state_dir.join("secrets/keyvault")),
        )
        .await
        .map_err(|e| LabError::Failed(format!("Key Vault double: {e}")))?;
        kv.model_arm(&self.opts.cluster)
            .map_err(|e| LabError::Failed(format!("Key Vault double: {e}")))?;
        self.keyvault = Some(kv);
        Ok(())
    }

    /// Azurite, ahead of the nodes for the CPU ([`AZURITE_NICE`]).
    fn spawn_azurite(&self, azurite: &Path) -> Result<procs::Proc, LabError> {
        let p = procs::spawn(
            "azurite",
            azurite,
            &self.azurite_args(),
            &[],
            &self.log_dir,
            &self.pid_dir,
            Some(AZURITE_NICE),
        )
        .map_err(io("start azurite"))?;
        if p.nice() != Some(AZURITE_NICE) {
            say(
                &self.opts,
                format!(
                    "Azurite runs at the nodes' CPU priority (raising it to nice {AZURITE_NICE} needs CAP_SYS_NICE): \
                     while many nodes boot its answers wait for CPU (docs/PERFORMANCE.md, \"The lab's storage\")"
                ),
            );
        }
        Ok(p)
    }

    fn azurite_args(&self) -> Vec<String> {
        let o = &self.opts;
        vec![
            "--blobHost".into(),
            o.ip(1).to_string(),
            "--blobPort".into(),
            AZURITE_PORT.to_string(),
            "--location".into(),
            o.state_dir.join("azurite").display().to_string(),
            "--cert".into(),
            o.state_dir.join("emulator.pem").display().to_string(),
            "--key".into(),
            o.state_dir
                .join("secrets/emulator-key.pem")
                .display()
                .to_string(),
            "--oauth".into(),
            "basic".into(),
            "--skipApiVersionCheck".into(),
            "--disableTelemetry".into(),
            "--loose".into(),
        ]
    }

    /// Starts Azurite again on the same address and data, stopping it first if it runs (fault tests take
    /// storage down with `lab.azurite.take()` and bring it back with this).
    pub async fn restart_azurite(&mut self) -> Result<(), LabError> {
        let azurite = self
            .tools
            .azurite
            .clone()
            .ok_or_else(|| LabError::Failed("Azurite not installed".into()))?;
        if let Some(mut p) = self.azurite.take() {
            p.stop(Duration::from_secs(10)).await;
        }
        self.azurite = Some(self.spawn_azurite(&azurite)?);
        let addr = SocketAddr::from((self.opts.ip(1), AZURITE_PORT));
        wait_for("Azurite", Duration::from_secs(60), || tcp_open(addr)).await
    }

    /// A dev-mode OpenBao with a transit key: the lab's stand-in for the Key Vault key that auto-unseals Vault.
    async fn start_transit(&mut self) -> Result<(), LabError> {
        let o = self.opts.clone();
        let addr = SocketAddr::from((o.ip(2), TRANSIT_PORT));
        say(
            &o,
            format!("starting the transit seal provider (OpenBao dev) on {addr}"),
        );
        let token = format!(
            "lab-transit-{}",
            random_b64(12).replace(['/', '+', '='], "")
        );
        let token_file = o.state_dir.join("secrets/transit.token");
        write_secret(&token_file, &token)?;
        let args: Vec<String> = vec![
            "server".into(),
            "-dev".into(),
            format!("-dev-listen-address={addr}"),
            format!("-dev-root-token-id={token}"),
            "-dev-no-store-token".into(),
        ];
        let envs = vec![(
            "HOME".to_string(),
            o.state_dir.join("transit-home").display().to_string(),
        )];
        self.transit = Some(
            procs::spawn(
                "transit",
                &self.tools.bao,
                &args,
                &envs,
                &self.log_dir,
                &self.pid_dir,
                None,
            )
            .map_err(io("start transit bao"))?,
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let base = format!("http://{addr}");
        wait_for("transit OpenBao", Duration::from_secs(60), || {
            let (http, base) = (http.clone(), base.clone());
            async move {
                http.get(format!("{base}/v1/sys/health"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await?;
        let post = |path: &str, body: serde_json::Value| {
            http.post(format!("{base}{path}"))
                .header("X-Vault-Token", &token)
                .json(&body)
                .send()
        };
        let r = post(
            "/v1/sys/mounts/transit",
            serde_json::json!({"type": "transit"}),
        )
        .await
        .map_err(|e| LabError::Failed(e.to_string()))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "enabling transit: HTTP {}",
                r.status()
            )));
        }
        let r = post("/v1/transit/keys/autounseal", serde_json::json!({}))
            .await
            .map_err(|e| LabError::Failed(e.to_string()))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "creating transit key: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// Stops everything this lab started, and removes its state unless `keep`.
    /// Stops everything at once: every agent is asked to stop (SIGTERM) together and given `DOWN_GRACE`, then what
    /// is left and every service the agents started are killed (the lab's data is thrown away or kept as is with
    /// `--keep`; nothing needs an orderly leave). Says what it waits for when that takes more than a second.
    pub async fn down(mut self) {
        const DOWN_GRACE: Duration = Duration::from_secs(5);
        let verbose = self.opts.verbose;
        let say = |what: &'static str| {
            move |names: &[String]| {
                if verbose {
                    eprintln!(
                        "lab: stopping: waiting for {what} {} to exit (killed after {}s)",
                        names.join(", "),
                        DOWN_GRACE.as_secs()
                    );
                }
            }
        };
        let agents: Vec<Proc> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.agent.take())
            .collect();
        procs::stop_all(agents, DOWN_GRACE, say("agents")).await;
        for i in 0..self.nodes.len() {
            self.kill_node_services(i);
            self.nodes[i].imds_task.abort();
        }
        for t in self.extra_tasks.drain(..) {
            t.abort();
        }
        if let Some(kv) = self.keyvault.take() {
            kv.stop();
        }
        let emulators: Vec<Proc> = [self.transit.take(), self.azurite.take()]
            .into_iter()
            .flatten()
            .collect();
        procs::stop_all(emulators, DOWN_GRACE, say("emulators")).await;
        let _ = std::fs::remove_file(self.opts.state_dir.join("lab.pid"));
        if !self.opts.keep {
            let _ = std::fs::remove_dir_all(&self.opts.state_dir);
        }
    }
}

impl Drop for Lab {
    /// A lab dropped without `down` (a failed test): nothing it started may outlive it.
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(p) = self.nodes[i].agent.as_mut() {
                let _ = p.child.start_kill();
            }
            self.kill_node_services(i);
        }
    }
}
