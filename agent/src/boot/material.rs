//! The cluster material of one boot: from the agent's files, from Key Vault (a cold boot), or from what the agent
//! kept on disk (a warm boot, [`crate::warm`]); and the node certificates issued from it or kept.

use super::{azure_for, BootError};
use crate::config::AgentConfig;
use crate::node::{NodeSpec, Seal, SpecError};
use crate::render::{self, Layout, Material};
use crate::tls::{self, ClusterCa, IssuedFor, NodeCert};
use crate::version::Product;
use base64::Engine;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

fn read_secret_file(what: &str, path: &Path) -> Result<String, BootError> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| BootError::Material(format!("{what} {}: {e}", path.display())))?;
    Ok(s.trim().to_string())
}

fn gossip_key(what: &str, path: &Path) -> Result<String, BootError> {
    let k = read_secret_file(what, path)?;
    match base64::engine::general_purpose::STANDARD.decode(&k) {
        Ok(b) if b.len() == 32 => Ok(k),
        _ => Err(BootError::Material(format!(
            "{what} {}: not a base64-encoded 32-byte key",
            path.display()
        ))),
    }
}

/// Loads the CA, gossip keys and seal token — from Key Vault (`shared`) or from files — and issues (or
/// keeps) the node's certificates.
///
/// Only server tiers load the CA key. Workers and the jumpbox get the CA certificate alone: their Consul
/// agent obtains its certificate from the servers (`auto_encrypt`), and a worker's Nomad client uses the
/// shared client certificate issued when the cluster material was created.
pub fn load_material(
    cfg: &AgentConfig,
    spec: &NodeSpec,
    layout: &Layout,
    shared: Option<&crate::material::ClusterMaterial>,
) -> Result<Material, BootError> {
    material_with(cfg, spec, layout, shared, Certs::KeepOrIssue)
}

/// Whether loading the material may issue node certificates (it needs the CA key) or only keep those on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Certs {
    KeepOrIssue,
    /// A warm boot: the certificates on disk, still good for the CA certificate, or an error (then a cold boot).
    KeepOnly,
}

fn material_with(
    cfg: &AgentConfig,
    spec: &NodeSpec,
    layout: &Layout,
    shared: Option<&crate::material::ClusterMaterial>,
    issuing: Certs,
) -> Result<Material, BootError> {
    use crate::node::Role;
    let server = spec.role.is_server_tier();
    let needs_nomad_key = spec.role == Role::NomadServer;
    let needs_client_cert = spec.role == Role::Worker;
    let check_key = |what: &str, k: &str| match base64::engine::general_purpose::STANDARD.decode(k)
    {
        Ok(b) if b.len() == 32 => Ok(k.to_string()),
        _ => Err(BootError::Material(format!(
            "{what} from Key Vault: not a base64-encoded 32-byte key"
        ))),
    };
    let (ca_pem, ca, consul_gossip_key, nomad_gossip_key, nomad_client) = match shared {
        Some(m) => {
            let ca = match (server, &m.ca_key, issuing) {
                (false, _, _) | (true, None, Certs::KeepOnly) => None,
                (true, None, Certs::KeepOrIssue) => {
                    return Err(BootError::Material(
                        "cluster CA key: not in the servers vault".into(),
                    ))
                }
                (true, Some(key), _) => {
                    Some(ClusterCa::from_pem(&m.ca_cert, key).map_err(|e| {
                        BootError::Material(format!("cluster CA from Key Vault: {e}"))
                    })?)
                }
            };
            let consul = check_key("consul gossip key", &m.consul_gossip_key)?;
            let nomad = match (needs_nomad_key, &m.nomad_gossip_key) {
                (false, _) => String::new(),
                (true, Some(k)) => check_key("nomad gossip key", k)?,
                (true, None) => {
                    return Err(BootError::Material(
                        "nomad gossip key: not in the servers vault".into(),
                    ))
                }
            };
            let client = match (needs_client_cert, &m.nomad_client) {
                (false, _) => None,
                (true, Some((cert, key))) => {
                    Some(tls::adopt(&m.ca_cert, cert, key).map_err(|e| {
                        BootError::Material(format!("nomad client certificate from Key Vault: {e}"))
                    })?)
                }
                (true, None) => {
                    return Err(BootError::Material(
                        "nomad client certificate: not in the shared vault".into(),
                    ))
                }
            };
            (m.ca_cert.clone(), ca, consul, nomad, client)
        }
        None => {
            let ca_pem = read_secret_file("tls.ca_cert", &cfg.tls.ca_cert)?;
            let ca = if server {
                let ca_key = read_secret_file("tls.ca_key", &cfg.tls.ca_key)?;
                Some(ClusterCa::from_pem(&ca_pem, &ca_key).map_err(|e| {
                    BootError::Material(format!(
                        "{} / {}: {e}",
                        cfg.tls.ca_cert.display(),
                        cfg.tls.ca_key.display()
                    ))
                })?)
            } else {
                None
            };
            let consul = gossip_key("gossip.consul_key_file", &cfg.gossip.consul_key_file)?;
            let nomad = if needs_nomad_key {
                gossip_key("gossip.nomad_key_file", &cfg.gossip.nomad_key_file)?
            } else {
                String::new()
            };
            let client = if needs_client_cert {
                let cert = read_secret_file("tls.nomad_client_cert", &cfg.tls.nomad_client_cert)?;
                let key = read_secret_file("tls.nomad_client_key", &cfg.tls.nomad_client_key)?;
                Some(
                    tls::adopt(&ca_pem, &(cert + "\n"), &(key + "\n")).map_err(|e| {
                        BootError::Material(format!(
                            "{} / {}: {e}",
                            cfg.tls.nomad_client_cert.display(),
                            cfg.tls.nomad_client_key.display()
                        ))
                    })?,
                )
            } else {
                None
            };
            (ca_pem, ca, consul, nomad, client)
        }
    };
    let seal_token = match spec.vault.as_ref().map(|v| &v.seal) {
        Some(Seal::Transit { .. }) => {
            let path = cfg.vault.seal_token_file.as_ref().ok_or_else(|| {
                BootError::Material("agent config vault.seal_token_file: required by the transit seal in tag hashistack-vault-seal".into())
            })?;
            Some(read_secret_file("vault.seal_token_file", path)?)
        }
        _ => None,
    };
    let now = time::OffsetDateTime::now_utc();
    let mut certs = BTreeMap::new();
    if server {
        let fingerprint = tls::ca_sha256(&ca_pem);
        for p in spec.products() {
            let sans = render::cert_sans(spec, p);
            let cert = match (&ca, issuing) {
                (Some(ca), Certs::KeepOrIssue) => existing_or_new_cert(
                    layout,
                    p,
                    ca,
                    &sans,
                    cfg.tls.node_cert_days,
                    now,
                    &spec.node_name,
                )?,
                _ => kept_cert(layout, p, &fingerprint, &sans, now)
                    .ok_or(BootError::NoKeptCert(p))?,
            };
            certs.insert(p, cert);
        }
    }
    if let Some(client) = nomad_client {
        certs.insert(Product::Nomad, client);
    }
    Ok(Material {
        ca_pem: ca_pem.trim_end().to_string() + "\n",
        certs,
        consul_gossip_key,
        nomad_gossip_key,
        seal_token,
        consul_agent_token: shared
            .and_then(|m| m.consul_agent_token.as_ref().map(|t| t.to_string())),
        // Only a node that runs Nomad renders Nomad's Consul token (and only such a node reads it).
        nomad_consul_token: shared
            .filter(|_| spec.products().contains(&Product::Nomad))
            .and_then(|m| m.consul_nomad_token.as_ref().map(|t| t.to_string())),
        consul_connect_ca_key: match (spec.role, &ca) {
            (Role::ConsulServer, Some(ca)) => Some(ca.key_pem()),
            _ => None,
        },
    })
}

fn existing_or_new_cert(
    layout: &Layout,
    p: Product,
    ca: &ClusterCa,
    sans: &[String],
    days: u32,
    now: time::OffsetDateTime,
    cn: &str,
) -> Result<NodeCert, BootError> {
    match kept_cert(layout, p, &ca.fingerprint(), sans, now) {
        Some(c) => Ok(c),
        None => ca
            .issue(cn, sans, days, now)
            .map_err(|e| BootError::Material(format!("{p} certificate: {e}"))),
    }
}

/// The node's certificate for `p` on disk, if it is still good for the CA with this fingerprint and these names.
fn kept_cert(
    layout: &Layout,
    p: Product,
    ca_sha256: &str,
    sans: &[String],
    now: time::OffsetDateTime,
) -> Option<NodeCert> {
    let issued: IssuedFor =
        serde_json::from_slice(&std::fs::read(layout.issued_file(p)).ok()?).ok()?;
    if !tls::still_good_for(&issued, ca_sha256, sans, now) {
        return None;
    }
    let cert_pem = std::fs::read_to_string(layout.cert_file(p)).ok()?;
    let key_pem = std::fs::read_to_string(layout.key_file(p)).ok()?;
    Some(NodeCert {
        cert_pem,
        key_pem,
        issued_for: issued,
    })
}

/// The material of a warm boot: what the agent kept on disk ([`crate::warm`]), with the node certificates on
/// disk (never issued here). Anything missing or due for renewal: a cold boot.
pub(crate) fn warm_material(
    cfg: &AgentConfig,
    spec: &NodeSpec,
    layout: &Layout,
    disk: &crate::warm::DiskMaterial,
) -> Result<Material, crate::warm::NotWarm> {
    use crate::node::Role;
    use crate::warm::NotWarm;
    let needs = [
        (Role::ConsulServer, disk.ca_key.is_some()),
        (Role::NomadServer, disk.nomad_gossip_key.is_some()),
        (
            Role::Worker,
            disk.nomad_client_cert.is_some() && disk.nomad_client_key.is_some(),
        ),
    ];
    if needs.iter().any(|(r, has)| *r == spec.role && !has) {
        return Err(NotWarm::Incomplete(spec.role.to_string()));
    }
    let shared = disk.to_cluster();
    material_with(cfg, spec, layout, Some(&shared), Certs::KeepOnly).map_err(|e| match e {
        BootError::NoKeptCert(p) => NotWarm::Certificate(p.to_string()),
        other => NotWarm::Unusable(other.to_string()),
    })
}

/// The vaults this node reads its material from: the shared one always, the servers one on server tiers.
pub(crate) fn material_vaults(spec: &NodeSpec) -> Result<crate::material::Vaults, BootError> {
    let missing = |tag: &str, why: &str| {
        BootError::Spec(SpecError {
            source_name: "tag",
            name: tag.into(),
            problem: format!("missing ({why}; or set material.source = \"files\")"),
        })
    };
    let shared = spec.keyvault_uri.clone().ok_or_else(|| {
        missing(
            crate::node::TAG_KEYVAULT_URI,
            "cluster material comes from Key Vault",
        )
    })?;
    let servers = if spec.role.is_server_tier() {
        Some(spec.servers_vault_uri.clone().ok_or_else(|| {
            missing(
                crate::node::TAG_SERVERS_VAULT_URI,
                "server tiers keep the CA key in the servers vault",
            )
        })?)
    } else {
        None
    };
    Ok(crate::material::Vaults {
        shared,
        servers,
        nomad_client: spec.role == crate::node::Role::Worker,
        nomad_consul_token: spec.products().contains(&Product::Nomad),
    })
}

/// The cluster material from Key Vault. `may_create`: a cold boot of a server tier creates it if nobody has;
/// never the confirmation of a warm boot (a node that ran from material must never replace it).
pub(crate) async fn fetch_material(
    cfg: &AgentConfig,
    spec: &NodeSpec,
    vaults: &crate::material::Vaults,
    may_create: bool,
) -> Result<crate::material::ClusterMaterial, BootError> {
    let az = azure_for(cfg, spec)?;
    fetch_material_with(&az, cfg, spec, vaults, may_create).await
}

/// [`fetch_material`] over Azure clients already built (a cold boot builds them while it checks its inputs).
pub(crate) async fn fetch_material_with(
    az: &crate::azure::Azure,
    cfg: &AgentConfig,
    spec: &NodeSpec,
    vaults: &crate::material::Vaults,
    may_create: bool,
) -> Result<crate::material::ClusterMaterial, BootError> {
    let mut policy = crate::escrow::policy();
    policy.deadline = std::time::Duration::from_secs(cfg.bootstrap.azure_deadline_secs);
    let started = Instant::now();
    let m = crate::material::Fetch {
        az,
        vaults,
        cluster: &spec.cluster,
        creator: (may_create && spec.role.is_server_tier()).then_some(crate::material::Creator {
            blob_endpoint: spec.blob_endpoint.as_str(),
            lease_secs: cfg.bootstrap.lease_secs as i32,
        }),
        // Never wait for the agent token here: a node without it renders and starts everything but an
        // auto-encrypt Consul (`consul_waits_for_token`), so the jumpbox can show a bootstrap in progress.
        agent_token: crate::material::AgentToken::IfPresent,
        pace: crate::material::Pace::of(spec.role),
        policy,
        deadline: std::time::Duration::from_secs(cfg.material.deadline_secs),
    }
    .run()
    .await?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "cluster material from Key Vault"
    );
    Ok(m)
}
