//! What stands in for Azure: the HTTPS client, Blob Storage (containers, blobs, tier state), Key Vault URIs.

use super::*;

impl Lab {
    /// The lab's HTTPS client trusting the lab CA.
    /// An HTTPS client trusting the lab CA (emulators) and, once it exists, the cluster CA the first
    /// server created in Key Vault (Consul, Vault and Nomad APIs).
    pub fn https(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca_cert).expect("lab CA");
        let mut certs = vec![reqwest::Certificate::from_pem(&pem).expect("lab CA PEM")];
        if let Some(ca) = self.cluster_ca() {
            if let Ok(c) = reqwest::Certificate::from_pem(ca.as_bytes()) {
                certs.push(c);
            }
        }
        reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only(certs)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    /// The cluster CA certificate (PEM) as stored in the shared Key Vault, once created.
    pub fn cluster_ca(&self) -> Option<String> {
        let kv = self.keyvault.as_ref()?;
        let name = hashistack_agent::material::names(&self.opts.cluster).ca_cert;
        kv.vault(crate::keyvault::SHARED_VAULT)?.secret_value(&name)
    }

    pub fn blob_endpoint(&self) -> String {
        format!(
            "https://{}:{AZURITE_PORT}/devstoreaccount1/",
            self.opts.ip(1)
        )
    }

    pub fn escrow_vault_uri(&self) -> String {
        format!("https://{}:{KEYVAULT_ESCROW_PORT}/", self.opts.ip(1))
    }

    /// A storage request as the lab's "ARM" (Azurite checks token shape, not RBAC).
    pub(super) async fn create_container(&self, name: &str) -> Result<(), LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .put(format!("{}{name}?restype=container", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .header("Content-Length", "0")
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("create container {name}: {e}")))?;
        if !(r.status().is_success() || r.status().as_u16() == 409) {
            return Err(LabError::Failed(format!(
                "create container {name}: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// Reads a blob as the lab (for tests: coordination state, escrow objects).
    pub async fn read_blob(&self, container: &str, name: &str) -> Option<Vec<u8>> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .get(format!("{}{container}/{name}", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.bytes().await.ok().map(|b| b.to_vec())
    }

    /// Names of the blobs in `container` under `prefix` (for tests: escrow copies, whose names carry a nonce).
    pub async fn list_blobs(&self, container: &str, prefix: &str) -> Result<Vec<String>, LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .get(format!("{}{container}", self.blob_endpoint()))
            .query(&[
                ("restype", "container"),
                ("comp", "list"),
                ("prefix", prefix),
            ])
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("list blobs {container}/{prefix}: {e}")))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "list blobs {container}/{prefix}: HTTP {}",
                r.status()
            )));
        }
        let xml = r
            .text()
            .await
            .map_err(|e| LabError::Failed(format!("list blobs {container}/{prefix}: {e}")))?;
        Ok(xml
            .split("<Name>")
            .skip(1)
            .filter_map(|s| s.split_once("</Name>").map(|(n, _)| n.to_string()))
            .collect())
    }

    /// Writes (overwrites) a blob as the lab (for tests: e.g. a tier state without its escrow receipts).
    pub async fn write_blob(
        &self,
        container: &str,
        name: &str,
        body: Vec<u8>,
    ) -> Result<(), LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .put(format!("{}{container}/{name}", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .header("x-ms-blob-type", "BlockBlob")
            .body(body)
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("write blob {container}/{name}: {e}")))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "write blob {container}/{name}: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// Deletes a blob as the lab (for tests that follow an operator procedure, e.g. removing a tier state).
    pub async fn delete_blob(&self, container: &str, name: &str) -> Result<(), LabError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = imds::lab_token("https://storage.azure.com", now, 3600);
        let r = self
            .https()
            .delete(format!("{}{container}/{name}", self.blob_endpoint()))
            .bearer_auth(token)
            .header("x-ms-version", "2021-12-02")
            .send()
            .await
            .map_err(|e| LabError::Failed(format!("delete blob {container}/{name}: {e}")))?;
        if !r.status().is_success() {
            return Err(LabError::Failed(format!(
                "delete blob {container}/{name}: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// The jumpbox's node index (where `hashistack-agent status` runs).
    pub fn jumpbox(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.def.role == Role::Jumpbox)
    }

    /// A tier's coordination state, as status and operators read it.
    pub async fn tier_state(
        &self,
        tier: &str,
    ) -> Option<hashistack_agent::coordination::TierState> {
        let b = self
            .read_blob(
                "coordination",
                &hashistack_agent::coordination::state_blob_name(&self.opts.cluster, tier),
            )
            .await?;
        serde_json::from_slice(&b).ok()
    }
}
