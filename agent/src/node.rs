//! NodeSpec: what this node is, parsed once from IMDS metadata and its tags (see docs/tags.md).
//! Every later step takes a NodeSpec, never raw tags: parse, don't validate later.

use crate::imds::InstanceMetadata;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

pub const TAG_PREFIX: &str = "hashistack-";
pub const TAG_ROLE: &str = "hashistack-role";
pub const TAG_CLUSTER: &str = "hashistack-cluster";
pub const TAG_DATACENTER: &str = "hashistack-datacenter";
pub const TAG_CONSUL_JOIN: &str = "hashistack-consul-join";
pub const TAG_CONSUL_SERVERS: &str = "hashistack-consul-servers";
pub const TAG_VAULT_JOIN: &str = "hashistack-vault-join";
pub const TAG_VAULT_SERVERS: &str = "hashistack-vault-servers";
pub const TAG_VAULT_SEAL: &str = "hashistack-vault-seal";
pub const TAG_NOMAD_JOIN: &str = "hashistack-nomad-join";
pub const TAG_NOMAD_SERVERS: &str = "hashistack-nomad-servers";
pub const TAG_TENANT_ID: &str = "hashistack-tenant-id";
pub const TAG_IDENTITY_CLIENT_ID: &str = "hashistack-identity-client-id";
pub const TAG_BLOB_ENDPOINT: &str = "hashistack-blob-endpoint";
pub const TAG_KEYVAULT_URI: &str = "hashistack-keyvault-uri";
pub const TAG_ESCROW_VAULT_URI: &str = "hashistack-escrow-vault-uri";
pub const TAG_SERVERS_VAULT_URI: &str = "hashistack-servers-vault-uri";
pub const TAG_STATUS_VAULT_URI: &str = "hashistack-status-vault-uri";
/// Every role that talks to Vault (Vault and Nomad servers, workers, the jumpbox): the address clients use for
/// Vault (the internal load balancer's), an https URL; it goes into Vault's certificate, the jumpbox's vault.env
/// and the Nomad clients' `vault` block. Without it: [`DEFAULT_VAULT_ADDRESS`].
pub const TAG_VAULT_ADDRESS: &str = "hashistack-vault-address";
/// Vault and Nomad servers (optional): where Vault reaches the Nomad servers' HTTP API for their JWKS (workload
/// identities). Without it: [`DEFAULT_NOMAD_ADDRESS`], the Nomad servers' service in Consul's DNS.
pub const TAG_NOMAD_ADDRESS: &str = "hashistack-nomad-address";
/// Vault's active node through Consul's DNS (Vault registers itself in Consul; the name is in its certificate).
pub const DEFAULT_VAULT_ADDRESS: &str = "https://active.vault.service.consul:8200";
/// The Nomad servers through Consul's DNS (Nomad registers its servers as `nomad`; the name is in their
/// certificates).
pub const DEFAULT_NOMAD_ADDRESS: &str = "https://nomad.service.consul:4646";
/// Server tiers: how often the tier's leader takes an encrypted snapshot (`30m`, `1h`, `1d`; default 1h).
pub const TAG_SNAPSHOT_INTERVAL: &str = "hashistack-snapshot-interval";
/// Server tiers: how many days snapshots are kept (the ARM template's lifecycle rule deletes them then; default 30).
pub const TAG_SNAPSHOT_RETENTION_DAYS: &str = "hashistack-snapshot-retention-days";

const KNOWN_TAGS: &[&str] = &[
    TAG_ROLE,
    TAG_CLUSTER,
    TAG_DATACENTER,
    TAG_CONSUL_JOIN,
    TAG_CONSUL_SERVERS,
    TAG_VAULT_JOIN,
    TAG_VAULT_SERVERS,
    TAG_VAULT_SEAL,
    TAG_NOMAD_JOIN,
    TAG_NOMAD_SERVERS,
    TAG_TENANT_ID,
    TAG_IDENTITY_CLIENT_ID,
    TAG_BLOB_ENDPOINT,
    TAG_KEYVAULT_URI,
    TAG_ESCROW_VAULT_URI,
    TAG_SERVERS_VAULT_URI,
    TAG_STATUS_VAULT_URI,
    TAG_VAULT_ADDRESS,
    TAG_NOMAD_ADDRESS,
    TAG_SNAPSHOT_INTERVAL,
    TAG_SNAPSHOT_RETENTION_DAYS,
];

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ConsulServer,
    VaultServer,
    NomadServer,
    Worker,
    Jumpbox,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::ConsulServer,
        Role::VaultServer,
        Role::NomadServer,
        Role::Worker,
        Role::Jumpbox,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ConsulServer => "consul-server",
            Role::VaultServer => "vault-server",
            Role::NomadServer => "nomad-server",
            Role::Worker => "worker",
            Role::Jumpbox => "jumpbox",
        }
    }

    pub fn is_server_tier(self) -> bool {
        matches!(
            self,
            Role::ConsulServer | Role::VaultServer | Role::NomadServer
        )
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or(())
    }
}

/// How peers are found: a go-discover expression for cloud auto-join, or fixed addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    /// e.g. `provider=azure resource_group=rg vm_scale_set=hs-consul`
    Cloud(String),
    Static(Vec<Ipv4Addr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seal {
    AzureKeyVault {
        vault_name: String,
        key_name: String,
        tenant_id: String,
    },
    Transit {
        address: String,
        key_name: String,
        mount_path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSettings {
    pub join: Join,
    pub servers: u8,
    pub seal: Seal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NomadSettings {
    pub join: Join,
    /// Expected servers; only on the nomad-server tier.
    pub servers: Option<u8>,
}

/// Snapshots of a server tier (docs/tags.md): how often, and how long they are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSettings {
    pub interval_secs: u64,
    pub retention_days: u32,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            interval_secs: 3600,
            retention_days: 30,
        }
    }
}

/// `30m`, `1h`, `1d`: between 5 minutes (the timer's period) and 7 days.
fn parse_interval(tag: &str, v: &str) -> Result<u64, SpecError> {
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let mult = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(tag_err(
                tag,
                format!("{v:?} is not a duration (a number and m, h or d: 30m, 1h, 1d)"),
            ))
        }
    };
    let secs = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| tag_err(tag, format!("{v:?} is not a duration")))?;
    if !(300..=7 * 86400).contains(&secs) {
        return Err(tag_err(tag, format!("{v:?} is outside 5m..7d")));
    }
    Ok(secs)
}

/// Everything a node is. Built only by [`NodeSpec::from_metadata`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub role: Role,
    pub cluster: String,
    pub datacenter: String,
    pub node_name: String,
    pub vm_id: String,
    pub scale_set: String,
    pub resource_group: String,
    pub subscription_id: String,
    pub location: String,
    pub zone: String,
    pub ip: Ipv4Addr,
    pub consul_join: Join,
    /// `bootstrap_expect` for the consul-server tier.
    pub consul_servers: Option<u8>,
    pub vault: Option<VaultSettings>,
    pub nomad: Option<NomadSettings>,
    pub identity_client_id: Option<String>,
    /// Every role: boot records are published there (and server tiers coordinate and escrow there).
    pub blob_endpoint: String,
    /// The shared vault every cluster identity reads: CA certificate, Consul gossip key and agent token,
    /// the Nomad client certificate.
    pub keyvault_uri: Option<String>,
    /// Server tiers only (required there): the write-only escrow vault.
    pub escrow_vault_uri: Option<String>,
    /// Server tiers only: the vault with the CA key and the Nomad gossip key (no worker or jumpbox reads it).
    pub servers_vault_uri: Option<String>,
    /// Server tiers (write) and the jumpbox (read), required on both: the read-only status tokens.
    pub status_vault_uri: Option<String>,
    /// Every role but Consul servers (optional): Vault's client address (its load balancer), an https URL.
    pub vault_address: Option<String>,
    /// Vault and Nomad servers (optional): the Nomad servers' HTTP API as Vault reaches it, an https URL.
    pub nomad_address: Option<String>,
    /// Server tiers only: the tier's snapshot schedule and retention (defaults when the tags are absent).
    pub snapshots: Option<SnapshotSettings>,
}

/// One problem with the node's metadata, naming the tag or field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name} {name}: {problem}")]
pub struct SpecError {
    /// "tag" or "IMDS field"
    pub source_name: &'static str,
    pub name: String,
    pub problem: String,
}

fn tag_err(name: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        source_name: "tag",
        name: name.to_string(),
        problem: problem.into(),
    }
}
fn field_err(name: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        source_name: "IMDS field",
        name: name.to_string(),
        problem: problem.into(),
    }
}

struct Tags<'a>(BTreeMap<&'a str, &'a str>);

impl<'a> Tags<'a> {
    fn required(&self, name: &str) -> Result<&'a str, SpecError> {
        match self.0.get(name) {
            None => Err(tag_err(name, "missing")),
            Some(v) if v.trim().is_empty() => Err(tag_err(name, "empty")),
            Some(v) => Ok(v.trim()),
        }
    }
    fn optional(&self, name: &str) -> Option<&'a str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }
    /// A tag that only some roles use must not appear on the others: a stray tag is a sign of a mis-tagged tier.
    fn forbid(&self, name: &str, role: Role) -> Result<(), SpecError> {
        match self.0.get(name) {
            Some(_) => Err(tag_err(name, format!("does not apply to role {role}"))),
            None => Ok(()),
        }
    }
}

fn parse_name(tag: &str, v: &str, allow_underscore: bool) -> Result<String, SpecError> {
    let ok_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (allow_underscore && c == '_')
    };
    if v.len() > 32 {
        return Err(tag_err(tag, format!("{v:?} is longer than 32 characters")));
    }
    if !v.starts_with(|c: char| c.is_ascii_lowercase()) || !v.chars().all(ok_char) {
        return Err(tag_err(
            tag,
            format!(
                "{v:?} must start with a lowercase letter and hold only {}",
                if allow_underscore {
                    "[a-z0-9-_]"
                } else {
                    "[a-z0-9-]"
                }
            ),
        ));
    }
    Ok(v.to_string())
}

fn parse_count(tag: &str, v: &str) -> Result<u8, SpecError> {
    match v.parse::<u8>() {
        Ok(n @ (1 | 3 | 5 | 7)) => Ok(n),
        _ => Err(tag_err(
            tag,
            format!("{v:?} is not a server count (1, 3, 5 or 7)"),
        )),
    }
}

fn parse_join(tag: &str, v: &str) -> Result<Join, SpecError> {
    if v.starts_with("provider=") {
        let mut provider = "";
        for word in v.split_whitespace() {
            let Some((k, val)) = word.split_once('=') else {
                return Err(tag_err(tag, format!("{word:?} is not key=value")));
            };
            if val.is_empty() {
                return Err(tag_err(tag, format!("{k} has an empty value")));
            }
            if k == "provider" {
                provider = val;
            }
        }
        if provider == "azure" {
            for k in ["resource_group", "vm_scale_set"] {
                if !v
                    .split_whitespace()
                    .any(|w| w.starts_with(&format!("{k}=")))
                {
                    return Err(tag_err(tag, format!("provider=azure needs {k}=")));
                }
            }
        }
        return Ok(Join::Cloud(
            v.split_whitespace().collect::<Vec<_>>().join(" "),
        ));
    }
    let mut addrs = Vec::new();
    for word in v.split_whitespace() {
        let ip: Ipv4Addr = word.parse().map_err(|_| {
            tag_err(
                tag,
                format!("{word:?} is neither an IPv4 address nor a provider= expression"),
            )
        })?;
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    Ok(Join::Static(addrs))
}

fn parse_kv(tag: &str, words: &[&str]) -> Result<BTreeMap<String, String>, SpecError> {
    let mut m = BTreeMap::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(tag_err(tag, format!("{w:?} is not key=value")));
        };
        if v.is_empty() {
            return Err(tag_err(tag, format!("{k} has an empty value")));
        }
        if m.insert(k.to_string(), v.to_string()).is_some() {
            return Err(tag_err(tag, format!("{k} is given twice")));
        }
    }
    Ok(m)
}

fn parse_seal(tag: &str, v: &str, tenant: Option<&str>) -> Result<Seal, SpecError> {
    let words: Vec<&str> = v.split_whitespace().collect();
    let (kind, rest) = words.split_first().ok_or_else(|| tag_err(tag, "empty"))?;
    let mut kv = parse_kv(tag, rest)?;
    let mut take = |k: &str| {
        kv.remove(k)
            .ok_or_else(|| tag_err(tag, format!("{kind} seal needs {k}=")))
    };
    let seal = match *kind {
        "azurekeyvault" => {
            let vault_name = take("vault_name")?;
            let key_name = take("key_name")?;
            let tenant_id = tenant.ok_or_else(|| {
                tag_err(TAG_TENANT_ID, "missing (the azurekeyvault seal needs it)")
            })?;
            Seal::AzureKeyVault {
                vault_name,
                key_name,
                tenant_id: parse_guid(TAG_TENANT_ID, tenant_id)?,
            }
        }
        "transit" => {
            let address = take("address")?;
            if !(address.starts_with("https://") || address.starts_with("http://")) {
                return Err(tag_err(
                    tag,
                    format!("transit address {address:?} is not an http(s) URL"),
                ));
            }
            let key_name = take("key_name")?;
            let mut mount_path = take("mount_path")?;
            if !mount_path.ends_with('/') {
                mount_path.push('/');
            }
            Seal::Transit {
                address,
                key_name,
                mount_path,
            }
        }
        other => {
            return Err(tag_err(
                tag,
                format!("unknown seal type {other:?} (azurekeyvault or transit)"),
            ))
        }
    };
    if let Some(k) = kv.keys().next() {
        return Err(tag_err(tag, format!("unknown seal setting {k:?}")));
    }
    Ok(seal)
}

fn parse_guid(tag: &str, v: &str) -> Result<String, SpecError> {
    let parts: Vec<&str> = v.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = parts.len() == 5
        && parts
            .iter()
            .zip(lens)
            .all(|(p, l)| p.len() == l && p.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(tag_err(tag, format!("{v:?} is not a GUID")))
    }
}

fn parse_https_url(tag: &str, v: &str) -> Result<String, SpecError> {
    let Some(rest) = v.strip_prefix("https://") else {
        return Err(tag_err(tag, format!("{v:?} is not an https:// URL")));
    };
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(tag_err(tag, format!("{v:?} has no host")));
    }
    Ok(if v.ends_with('/') {
        v.to_string()
    } else {
        format!("{v}/")
    })
}

impl NodeSpec {
    /// Parses a node's identity and settings. Pure: no I/O.
    pub fn from_metadata(md: &InstanceMetadata) -> Result<NodeSpec, SpecError> {
        let mut map = BTreeMap::new();
        for t in &md.compute.tags_list {
            if t.name.starts_with(TAG_PREFIX) && !KNOWN_TAGS.contains(&t.name.as_str()) {
                return Err(tag_err(
                    &t.name,
                    "unknown hashistack tag (see docs/tags.md)",
                ));
            }
            if map.insert(t.name.as_str(), t.value.as_str()).is_some() {
                return Err(tag_err(&t.name, "given twice"));
            }
        }
        let tags = Tags(map);

        let role_s = tags.required(TAG_ROLE)?;
        let role: Role = role_s.parse().map_err(|_| {
            tag_err(TAG_ROLE, format!("unknown role {role_s:?} (consul-server, vault-server, nomad-server, worker, jumpbox)"))
        })?;
        let cluster = parse_name(TAG_CLUSTER, tags.required(TAG_CLUSTER)?, false)?;
        let datacenter = parse_name(
            TAG_DATACENTER,
            tags.optional(TAG_DATACENTER).unwrap_or("dc1"),
            true,
        )?;

        // The computer name, not compute.name (`hs-worker_17` on a scale set): Consul and Nomad node names must be
        // DNS labels to be found as <node>.node.consul (docs/tags.md, "The node's own identity").
        let node_name = md.node_name();
        let node_name = node_name.as_str();
        if node_name.is_empty() {
            return Err(field_err("compute.osProfile.computerName", "missing"));
        }
        if node_name.len() > 63
            || node_name.starts_with('-')
            || node_name.ends_with('-')
            || !node_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(field_err(
                "compute.osProfile.computerName",
                format!("{node_name:?} is not a DNS label (letters, digits, '-')"),
            ));
        }
        let ip_s = md.primary_private_ip();
        if ip_s.is_empty() {
            return Err(field_err(
                "network.interface[0].ipv4.ipAddress[0].privateIpAddress",
                "missing",
            ));
        }
        let ip: Ipv4Addr = ip_s.parse().map_err(|_| {
            field_err(
                "network.interface[0].ipv4.ipAddress[0].privateIpAddress",
                format!("{ip_s:?} is not an IPv4 address"),
            )
        })?;

        let consul_join = parse_join(TAG_CONSUL_JOIN, tags.required(TAG_CONSUL_JOIN)?)?;
        let consul_servers = match role {
            Role::ConsulServer => Some(parse_count(
                TAG_CONSUL_SERVERS,
                tags.required(TAG_CONSUL_SERVERS)?,
            )?),
            _ => {
                tags.forbid(TAG_CONSUL_SERVERS, role)?;
                None
            }
        };
        let vault = match role {
            Role::VaultServer => Some(VaultSettings {
                join: parse_join(TAG_VAULT_JOIN, tags.required(TAG_VAULT_JOIN)?)?,
                servers: parse_count(TAG_VAULT_SERVERS, tags.required(TAG_VAULT_SERVERS)?)?,
                seal: parse_seal(
                    TAG_VAULT_SEAL,
                    tags.required(TAG_VAULT_SEAL)?,
                    tags.optional(TAG_TENANT_ID),
                )?,
            }),
            _ => {
                for t in [TAG_VAULT_JOIN, TAG_VAULT_SERVERS, TAG_VAULT_SEAL] {
                    tags.forbid(t, role)?;
                }
                None
            }
        };
        let nomad = match role {
            Role::NomadServer => Some(NomadSettings {
                join: parse_join(TAG_NOMAD_JOIN, tags.required(TAG_NOMAD_JOIN)?)?,
                servers: Some(parse_count(
                    TAG_NOMAD_SERVERS,
                    tags.required(TAG_NOMAD_SERVERS)?,
                )?),
            }),
            Role::Worker => {
                tags.forbid(TAG_NOMAD_SERVERS, role)?;
                Some(NomadSettings {
                    join: parse_join(TAG_NOMAD_JOIN, tags.required(TAG_NOMAD_JOIN)?)?,
                    servers: None,
                })
            }
            _ => {
                tags.forbid(TAG_NOMAD_JOIN, role)?;
                tags.forbid(TAG_NOMAD_SERVERS, role)?;
                None
            }
        };
        let identity_client_id = tags
            .optional(TAG_IDENTITY_CLIENT_ID)
            .map(|v| parse_guid(TAG_IDENTITY_CLIENT_ID, v))
            .transpose()?;
        if let Some(t) = tags.optional(TAG_TENANT_ID) {
            parse_guid(TAG_TENANT_ID, t)?;
        }
        let url = |t: &str| tags.optional(t).map(|v| parse_https_url(t, v)).transpose();
        // What each role cannot work without (docs/tags.md, "required for"): a missing one is a bad tag like any
        // other, never a step silently skipped.
        let required_url = |t: &str| parse_https_url(t, tags.required(t)?);
        let blob_endpoint = required_url(TAG_BLOB_ENDPOINT)?;
        let escrow_vault_uri = if role.is_server_tier() {
            Some(required_url(TAG_ESCROW_VAULT_URI)?)
        } else {
            url(TAG_ESCROW_VAULT_URI)?
        };
        let status_vault_uri = if role.is_server_tier() || role == Role::Jumpbox {
            Some(required_url(TAG_STATUS_VAULT_URI)?)
        } else {
            url(TAG_STATUS_VAULT_URI)?
        };
        // Secrets are split by who may read them (docs/trust-model.md): a tag naming a vault this role has no
        // business with is a mis-tagged tier, refused before anything is read.
        if !role.is_server_tier() {
            tags.forbid(TAG_SERVERS_VAULT_URI, role)?;
        }
        if role == Role::Worker {
            tags.forbid(TAG_STATUS_VAULT_URI, role)?;
        }
        if role == Role::ConsulServer {
            tags.forbid(TAG_VAULT_ADDRESS, role)?;
        }
        let vault_address = url(TAG_VAULT_ADDRESS)?;
        if !matches!(role, Role::VaultServer | Role::NomadServer) {
            tags.forbid(TAG_NOMAD_ADDRESS, role)?;
        }
        let nomad_address = url(TAG_NOMAD_ADDRESS)?;
        let snapshots = if role.is_server_tier() {
            let d = SnapshotSettings::default();
            Some(SnapshotSettings {
                interval_secs: tags
                    .optional(TAG_SNAPSHOT_INTERVAL)
                    .map(|v| parse_interval(TAG_SNAPSHOT_INTERVAL, v))
                    .transpose()?
                    .unwrap_or(d.interval_secs),
                retention_days: match tags.optional(TAG_SNAPSHOT_RETENTION_DAYS) {
                    None => d.retention_days,
                    Some(v) => match v.parse::<u32>() {
                        Ok(n @ 1..=3650) => n,
                        _ => {
                            return Err(tag_err(
                                TAG_SNAPSHOT_RETENTION_DAYS,
                                format!("{v:?} is not a number of days (1..3650)"),
                            ))
                        }
                    },
                },
            })
        } else {
            tags.forbid(TAG_SNAPSHOT_INTERVAL, role)?;
            tags.forbid(TAG_SNAPSHOT_RETENTION_DAYS, role)?;
            None
        };

        Ok(NodeSpec {
            role,
            cluster,
            datacenter,
            node_name: node_name.to_string(),
            vm_id: md.compute.vm_id.clone(),
            scale_set: md.compute.vm_scale_set_name.clone(),
            resource_group: md.compute.resource_group_name.clone(),
            subscription_id: md.compute.subscription_id.clone(),
            location: md.compute.location.clone(),
            zone: md.compute.zone.clone(),
            ip,
            consul_join,
            consul_servers,
            vault,
            nomad,
            identity_client_id,
            blob_endpoint,
            keyvault_uri: url(TAG_KEYVAULT_URI)?,
            escrow_vault_uri,
            servers_vault_uri: url(TAG_SERVERS_VAULT_URI)?,
            status_vault_uri,
            vault_address,
            nomad_address,
            snapshots,
        })
    }

    /// Vault's address for clients: the tag, else Vault's active node in Consul's DNS.
    pub fn vault_api(&self) -> String {
        self.vault_address
            .clone()
            .unwrap_or_else(|| DEFAULT_VAULT_ADDRESS.into())
            .trim_end_matches('/')
            .to_string()
    }

    /// The Nomad servers' HTTP API as Vault reaches it: the tag, else the `nomad` service in Consul's DNS.
    pub fn nomad_api(&self) -> String {
        self.nomad_address
            .clone()
            .unwrap_or_else(|| DEFAULT_NOMAD_ADDRESS.into())
            .trim_end_matches('/')
            .to_string()
    }

    /// Products this node runs, in start order.
    pub fn products(&self) -> Vec<crate::version::Product> {
        use crate::version::Product::*;
        match self.role {
            Role::ConsulServer | Role::Jumpbox => vec![Consul],
            Role::VaultServer => vec![Consul, Vault],
            Role::NomadServer | Role::Worker => vec![Consul, Nomad],
        }
    }
}

/// Key Vault's token resource in an Azure cloud (what its challenge names: `https://vault.azure.net` on the
/// public cloud), by IMDS `compute.azEnvironment`.
pub fn key_vault_resource(az_environment: &str) -> Option<String> {
    cloud_domains(az_environment).map(|(_, vault)| format!("https://{}", &vault[1..]))
}

/// The service domains of an Azure cloud, by IMDS `compute.azEnvironment`: (blob, Key Vault).
fn cloud_domains(az_environment: &str) -> Option<(&'static str, &'static str)> {
    match az_environment {
        "AzurePublicCloud" => Some((".blob.core.windows.net", ".vault.azure.net")),
        "AzureUSGovernmentCloud" => {
            Some((".blob.core.usgovcloudapi.net", ".vault.usgovcloudapi.net"))
        }
        "AzureChinaCloud" => Some((".blob.core.chinacloudapi.cn", ".vault.azure.cn")),
        _ => None,
    }
}

/// The host of an https URL that `parse_https_url` accepted (without brackets or port).
pub fn url_host(url: &str) -> &str {
    let rest = url.trim_start_matches("https://");
    let authority = rest.split('/').next().unwrap_or_default();
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// Whether a failed boot may still publish its record to this blob endpoint (read from the raw tag): the same rule
/// as [`check_endpoints`] for `hashistack-blob-endpoint`, so a bad tag never receives a storage token.
pub fn blob_endpoint_allowed(
    url: &str,
    az_environment: &str,
    policy: crate::config::EndpointPolicy,
) -> bool {
    if policy == crate::config::EndpointPolicy::Any {
        return true;
    }
    cloud_domains(az_environment).is_some_and(|(blob, _)| {
        let host = url_host(url);
        host.ends_with(blob) && host.len() > blob.len()
    })
}

/// Tags are a control channel: with `EndpointPolicy::AzureOnly` every endpoint tag must name a host of the
/// cloud's own storage or Key Vault domain, and a transit seal must be https. One error naming the tag.
pub fn check_endpoints(
    spec: &NodeSpec,
    az_environment: &str,
    policy: crate::config::EndpointPolicy,
) -> Result<(), SpecError> {
    if policy == crate::config::EndpointPolicy::Any {
        return Ok(());
    }
    let Some((blob, vault)) = cloud_domains(az_environment) else {
        return Err(field_err(
            "compute.azEnvironment",
            format!(
                "{az_environment:?} is not a cloud whose service domains the agent knows (set [azure] endpoints = \"any\" in agent.toml to accept any endpoint)"
            ),
        ));
    };
    let must_end = |tag: &str, url: &Option<String>, suffix: &str| -> Result<(), SpecError> {
        match url {
            // On a label boundary (the suffix starts with '.') and with a name before it.
            Some(u) if !url_host(u).ends_with(suffix) || url_host(u).len() <= suffix.len() => {
                Err(tag_err(
                    tag,
                    format!("{u:?} is not on this cloud's domain *{suffix} ({az_environment})"),
                ))
            }
            _ => Ok(()),
        }
    };
    must_end(TAG_BLOB_ENDPOINT, &Some(spec.blob_endpoint.clone()), blob)?;
    must_end(TAG_KEYVAULT_URI, &spec.keyvault_uri, vault)?;
    must_end(TAG_ESCROW_VAULT_URI, &spec.escrow_vault_uri, vault)?;
    must_end(TAG_SERVERS_VAULT_URI, &spec.servers_vault_uri, vault)?;
    must_end(TAG_STATUS_VAULT_URI, &spec.status_vault_uri, vault)?;
    if let Some(VaultSettings {
        seal: Seal::Transit { address, .. },
        ..
    }) = &spec.vault
    {
        if !address.starts_with("https://") {
            return Err(tag_err(
                TAG_VAULT_SEAL,
                format!(
                    "transit address {address:?} is not https (plain http is for the lab only)"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EndpointPolicy::{Any, AzureOnly};

    fn spec(name: &str) -> NodeSpec {
        let path = format!(
            "{}/tests/fixtures/imds/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let md = InstanceMetadata::from_json(&std::fs::read(path).unwrap()).unwrap();
        NodeSpec::from_metadata(&md).unwrap()
    }

    /// The resource a cold boot prefetches its identity token for: what Key Vault's challenge names.
    #[test]
    fn key_vault_resource_per_cloud() {
        let r = |env: &str| key_vault_resource(env);
        assert_eq!(
            r("AzurePublicCloud").as_deref(),
            Some("https://vault.azure.net")
        );
        assert_eq!(
            r("AzureUSGovernmentCloud").as_deref(),
            Some("https://vault.usgovcloudapi.net")
        );
        assert_eq!(
            r("AzureChinaCloud").as_deref(),
            Some("https://vault.azure.cn")
        );
        assert_eq!(r("Elsewhere"), None);
    }

    #[test]
    fn azure_endpoints_pass_on_their_own_cloud_only() {
        let s = spec("consul-server");
        assert_eq!(check_endpoints(&s, "AzurePublicCloud", AzureOnly), Ok(()));
        let e = check_endpoints(&s, "AzureChinaCloud", AzureOnly).unwrap_err();
        assert_eq!(e.name, TAG_BLOB_ENDPOINT);
        assert!(e.problem.contains("*.blob.core.chinacloudapi.cn"), "{e}");
        let e = check_endpoints(&s, "AzureStackHub", AzureOnly).unwrap_err();
        assert_eq!(e.name, "compute.azEnvironment");
    }

    #[test]
    fn a_tag_pointing_elsewhere_is_refused_naming_it() {
        let mut s = spec("nomad-server");
        s.status_vault_uri = Some("https://collector.example.com/".into());
        let e = check_endpoints(&s, "AzurePublicCloud", AzureOnly).unwrap_err();
        assert_eq!(e.name, TAG_STATUS_VAULT_URI);
        // A look-alike: the domain must be a suffix on a label boundary, with a name before it.
        s.status_vault_uri = Some("https://evilvault.azure.net/".into());
        assert!(check_endpoints(&s, "AzurePublicCloud", AzureOnly).is_err());
        s.status_vault_uri = Some("https://vault.azure.net/".into());
        assert!(check_endpoints(&s, "AzurePublicCloud", AzureOnly).is_err());
        s.status_vault_uri = Some("https://kvj-x.vault.azure.net:443/".into());
        assert_eq!(check_endpoints(&s, "AzurePublicCloud", AzureOnly), Ok(()));
    }

    #[test]
    fn an_http_transit_seal_and_loopback_endpoints_are_for_the_lab_only() {
        let s = spec("vault-server-transit");
        let e = check_endpoints(&s, "AzurePublicCloud", AzureOnly).unwrap_err();
        assert_eq!(e.name, TAG_BLOB_ENDPOINT, "loopback storage first: {e}");
        assert_eq!(check_endpoints(&s, "AzurePublicCloud", Any), Ok(()));
        let mut s = spec("vault-server-akv");
        s.vault.as_mut().unwrap().seal = Seal::Transit {
            address: "http://10.0.0.9:8200".into(),
            key_name: "k".into(),
            mount_path: "transit/".into(),
        };
        let e = check_endpoints(&s, "AzurePublicCloud", AzureOnly).unwrap_err();
        assert_eq!(e.name, TAG_VAULT_SEAL);
        assert!(e.problem.contains("not https"), "{e}");
    }
    fn with_tags(name: &str, tags: &[(&str, &str)]) -> Result<NodeSpec, SpecError> {
        let path = format!(
            "{}/tests/fixtures/imds/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut md = InstanceMetadata::from_json(&std::fs::read(path).unwrap()).unwrap();
        for (k, v) in tags {
            md.compute.tags_list.push(crate::imds::Tag {
                name: k.to_string(),
                value: v.to_string(),
            });
        }
        NodeSpec::from_metadata(&md)
    }

    #[test]
    fn snapshot_tags_default_parse_and_are_refused_off_server_tiers() {
        let s = with_tags("consul-server", &[]).unwrap();
        assert_eq!(s.snapshots, Some(SnapshotSettings::default()));
        assert_eq!(with_tags("worker", &[]).unwrap().snapshots, None);
        let s = with_tags(
            "vault-server-akv",
            &[
                (TAG_SNAPSHOT_INTERVAL, "30m"),
                (TAG_SNAPSHOT_RETENTION_DAYS, "7"),
            ],
        )
        .unwrap();
        assert_eq!(
            s.snapshots,
            Some(SnapshotSettings {
                interval_secs: 1800,
                retention_days: 7
            })
        );
        assert_eq!(
            with_tags("nomad-server", &[(TAG_SNAPSHOT_INTERVAL, "1d")])
                .unwrap()
                .snapshots
                .unwrap()
                .interval_secs,
            86400
        );
        for bad in ["1", "4m", "8d", "1w", "h", "-1h", "99999999999999999999h"] {
            let e = with_tags("consul-server", &[(TAG_SNAPSHOT_INTERVAL, bad)]).unwrap_err();
            assert_eq!(e.name, TAG_SNAPSHOT_INTERVAL, "{bad}: {e}");
        }
        for bad in ["0", "3651", "x", "1.5"] {
            let e = with_tags("consul-server", &[(TAG_SNAPSHOT_RETENTION_DAYS, bad)]).unwrap_err();
            assert_eq!(e.name, TAG_SNAPSHOT_RETENTION_DAYS, "{bad}: {e}");
        }
        for role in ["worker", "jumpbox"] {
            let e = with_tags(role, &[(TAG_SNAPSHOT_INTERVAL, "1h")]).unwrap_err();
            assert!(e.problem.contains("does not apply"), "{e}");
        }
    }
}
