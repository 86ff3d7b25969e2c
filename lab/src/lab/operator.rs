//! What an operator does from outside the cluster: IMDS identities, the Nomad management token, smoke, the `nomad` link.

use super::*;

impl Lab {
    /// Starts a fake IMDS for the operator's identity (what `az login` is on a workstation), for `escrow open`.
    pub async fn operator_imds(&mut self) -> Result<String, LabError> {
        self.identity_imds("operator", 250, crate::keyvault::principals::OPERATOR)
            .await
    }

    /// The operator's IMDS endpoint, started at the first call ([`Self::operator_imds`] binds a fixed address).
    pub async fn operator_once(&mut self) -> Result<String, LabError> {
        if let Some(e) = &self.operator_endpoint {
            return Ok(e.clone());
        }
        let e = self.operator_imds().await?;
        self.operator_endpoint = Some(e.clone());
        Ok(e)
    }

    /// Waits until a node's boot record notes that Vault's `jwt-nomad` auth method points at the Nomad servers'
    /// JWKS (`written` or `unchanged`): before that, no workload can log in to Vault.
    pub async fn wait_workload_identity(&self, within: Duration) -> Result<(), LabError> {
        let start = Instant::now();
        loop {
            let noted: Vec<String> = (0..self.nodes.len())
                .filter_map(|i| self.boot_record(i).and_then(|r| r.workload_identity))
                .collect();
            if noted.iter().any(|n| n == "written" || n == "unchanged") {
                return Ok(());
            }
            if start.elapsed() > within {
                return Err(LabError::Failed(format!(
                    "Vault's jwt-nomad auth method not configured within {within:?} (boot records note {noted:?})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The Nomad management token, opened from escrow by the operator's identity in this process (what
    /// `hashistack-agent escrow open --tier nomad` prints as `secret_id`). Starts the operator's IMDS once.
    pub async fn nomad_management_token(&mut self) -> Result<zeroize::Zeroizing<String>, LabError> {
        use hashistack_agent::escrow::{self, operator, Targets};
        let endpoint = self.operator_once().await?;
        let imds = hashistack_agent::imds::ImdsClient::new(
            &endpoint,
            hashistack_agent::retry::RetryPolicy::imds(Duration::from_secs(30)),
        );
        let credential = Arc::new(hashistack_agent::identity::ImdsCredential::new(imds, None));
        let az = hashistack_agent::azure::Azure::new(credential, Some(&self.ca_cert), false)
            .map_err(|e| LabError::Failed(e.to_string()))?;
        let targets = Targets {
            blob_endpoint: format!("{}/", self.blob_endpoint().trim_end_matches('/')),
            escrow_vault_uri: format!("{}/", self.escrow_vault_uri().trim_end_matches('/')),
        };
        let mut policy = escrow::policy();
        policy.deadline = Duration::from_secs(60);
        let opened = operator::open(&az, &targets, &self.opts.cluster, "nomad", policy)
            .await
            .map_err(|e| LabError::Failed(format!("escrow open nomad: {e}")))?;
        #[derive(serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
        struct Acl {
            secret_id: String,
        }
        let mut acl: Acl = serde_json::from_slice(&opened.plain).map_err(|_| {
            LabError::Failed("escrow open nomad: no secret_id in the opened secrets".into())
        })?;
        Ok(zeroize::Zeroizing::new(std::mem::take(&mut acl.secret_id)))
    }

    /// `hashistack-agent smoke --token-file -` on the jumpbox with `token` on its standard input (never on its
    /// command line), plus `extra` arguments; its output as it finished. Output goes to pipes unless `inherit`.
    pub async fn smoke(
        &self,
        token: &str,
        extra: &[&str],
        inherit: bool,
    ) -> Result<std::process::Output, LabError> {
        use tokio::io::AsyncWriteExt;
        let j = self
            .jumpbox()
            .ok_or_else(|| LabError::Failed("the lab has no jumpbox".into()))?;
        let pipe = || {
            if inherit {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::piped()
            }
        };
        let mut child = tokio::process::Command::new(&self.tools.agent)
            .args(["smoke", "--token-file", "-", "--config"])
            .arg(&self.nodes[j].config_path)
            .args(extra)
            .env_remove("NOMAD_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(pipe())
            .stderr(pipe())
            .spawn()
            .map_err(io("hashistack-agent smoke".to_string()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        for part in [token.as_bytes(), b"\n"] {
            stdin
                .write_all(part)
                .await
                .map_err(io("smoke stdin".to_string()))?;
        }
        drop(stdin);
        child
            .wait_with_output()
            .await
            .map_err(io("hashistack-agent smoke".to_string()))
    }

    /// Starts a fake IMDS on 127.<net>.0.`host` whose tokens carry `oid` (a VM identity outside any node, for tests
    /// that act as that identity: e.g. a hostile server of one tier).
    pub async fn identity_imds(
        &mut self,
        name: &str,
        host: u8,
        oid: &str,
    ) -> Result<String, LabError> {
        let ip = self.opts.ip(host);
        let doc = imds::instance_document(name, "", &ip.to_string(), &[]);
        let mut st = ImdsState::new(doc);
        st.oid = oid.to_string();
        let state = Arc::new(Mutex::new(st));
        let task = imds::serve(SocketAddr::from((ip, IMDS_PORT)), state)
            .await
            .map_err(io(format!("operator IMDS on {ip}")))?;
        self.extra_tasks.push(task);
        Ok(format!("http://{ip}:{IMDS_PORT}"))
    }

    /// The `nomad` the agents run: `opts.nomad_bin`, else the contract double's link.
    pub fn nomad_bin(&self) -> PathBuf {
        self.opts
            .nomad_bin
            .clone()
            .unwrap_or_else(|| self.opts.state_dir.join("bin/nomad"))
    }

    /// `<state_dir>/bin/nomad -> hashistack-lab`: started under that name, the lab binary is the Nomad
    /// contract double (lab/src/nomad_double/). The lab binary: $HASHISTACK_LAB, this process when it is
    /// `hashistack-lab`, else the one next to the agent (cargo's target dir).
    pub(super) fn link_nomad_double(&self) -> Result<(), LabError> {
        let exe = std::env::current_exe()
            .ok()
            .filter(|p| p.file_name().is_some_and(|n| n == "hashistack-lab"));
        let lab_bin = std::env::var_os("HASHISTACK_LAB")
            .map(PathBuf::from)
            .or(exe)
            .unwrap_or_else(|| self.tools.agent.with_file_name("hashistack-lab"));
        if self.opts.nomad_servers > 0 && self.opts.nomad_bin.is_none() && !lab_bin.is_file() {
            return Err(LabError::Failed(format!(
                "the Nomad contract double needs the lab binary at {} (cargo build --workspace --bins)",
                lab_bin.display()
            )));
        }
        let link = self.opts.state_dir.join("bin/nomad");
        std::fs::create_dir_all(self.opts.state_dir.join("bin")).map_err(io("bin dir"))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lab_bin, &link).map_err(io(link.display().to_string()))
    }
}
