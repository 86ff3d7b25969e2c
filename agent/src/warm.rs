//! The warm boot's material on disk: what the node last read from Key Vault (or created there), kept by the agent
//! in `/var/lib/hashistack/material.json` (0600, the agent's own user) so that a reboot with unchanged material
//! renders and starts the services without waiting for Key Vault; the `converge` step (converge.rs) confirms it with
//! Key Vault once the services run (docs/trust-model.md#warm-boots).
//!
//! It holds only what the rendered files already hold on this node: the CA certificate, the gossip keys, the
//! Consul tokens, the Nomad client certificate and key (workers), and the CA key on Consul servers only (their
//! `connect-ca.json` holds it already). Vault and Nomad servers never keep the CA key here: their warm boot uses
//! the node certificates on disk while they are still good, and otherwise boots cold.
//!
//! It is used only when it is what this agent wrote (a regular file, not a link, owned by the agent's user, mode
//! 0600), for this node's cluster, role, name and vaults, in this format, and confirmed by Key Vault within
//! [`MAX_UNCONFIRMED`]; anything else is one log line (never a value) and a cold boot.

use crate::files::{self, FileError, Owner};
use crate::material::{ClusterMaterial, Vaults};
use crate::node::{NodeSpec, Role};
use crate::render::{self, Layout};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The format written; a file in any other is not used (the next boot is cold and rewrites it).
pub const SCHEMA: u32 = 1;
/// How long after its last confirmation by Key Vault the material on disk may start services: a node that
/// cannot reach Key Vault for longer boots cold (and waits for Key Vault) instead.
pub const MAX_UNCONFIRMED: Duration = Duration::from_secs(7 * 24 * 3600);
/// Its mode: the agent's user only.
pub const MODE: u32 = 0o600;

pub fn path(layout: &Layout) -> PathBuf {
    layout.state_dir().join("material.json")
}

/// Where the material came from: a file for another cluster, role, node or vault is not this node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize)]
pub struct Source {
    pub cluster: String,
    pub role: String,
    pub node: String,
    pub shared_vault: String,
    pub servers_vault: Option<String>,
}

impl Source {
    pub fn of(spec: &NodeSpec, vaults: &Vaults) -> Source {
        Source {
            cluster: spec.cluster.clone(),
            role: spec.role.to_string(),
            node: spec.node_name.clone(),
            shared_vault: vaults.shared.clone(),
            servers_vault: vaults.servers.clone(),
        }
    }
}

/// The material on disk. Zeroized on drop; never printed.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct DiskMaterial {
    pub schema: u32,
    pub source: Source,
    /// When Key Vault last confirmed this material (Unix seconds).
    pub confirmed_unix: i64,
    pub ca_cert: String,
    /// Consul servers only.
    pub ca_key: Option<String>,
    pub consul_gossip_key: String,
    pub nomad_gossip_key: Option<String>,
    pub nomad_client_cert: Option<String>,
    pub nomad_client_key: Option<String>,
    pub consul_agent_token: Option<String>,
    pub consul_nomad_token: Option<String>,
}

impl std::fmt::Debug for DiskMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskMaterial")
            .field("source", &self.source)
            .field("confirmed_unix", &self.confirmed_unix)
            .finish_non_exhaustive()
    }
}

impl DiskMaterial {
    /// What this node keeps of the material Key Vault gave it (see the module's notes for what it leaves out).
    pub fn from_cluster(m: &ClusterMaterial, source: Source, role: Role, now_unix: i64) -> Self {
        let s = |z: &Zeroizing<String>| z.as_str().to_string();
        DiskMaterial {
            schema: SCHEMA,
            source,
            confirmed_unix: now_unix,
            ca_cert: m.ca_cert.clone(),
            ca_key: m
                .ca_key
                .as_ref()
                .filter(|_| role == Role::ConsulServer)
                .map(s),
            consul_gossip_key: s(&m.consul_gossip_key),
            nomad_gossip_key: m.nomad_gossip_key.as_ref().map(s),
            nomad_client_cert: m.nomad_client.as_ref().map(|(c, _)| c.clone()),
            nomad_client_key: m.nomad_client.as_ref().map(|(_, k)| s(k)),
            consul_agent_token: m.consul_agent_token.as_ref().map(s),
            consul_nomad_token: m.consul_nomad_token.as_ref().map(s),
        }
    }

    /// The material in the form the renderer's loader takes (`ca_key` only where it was kept).
    pub fn to_cluster(&self) -> ClusterMaterial {
        let z = |s: &String| Zeroizing::new(s.clone());
        ClusterMaterial {
            ca_cert: self.ca_cert.clone(),
            ca_key: self.ca_key.as_ref().map(z),
            consul_gossip_key: z(&self.consul_gossip_key),
            nomad_gossip_key: self.nomad_gossip_key.as_ref().map(z),
            nomad_client: match (&self.nomad_client_cert, &self.nomad_client_key) {
                (Some(c), Some(k)) => Some((c.clone(), z(k))),
                _ => None,
            },
            consul_agent_token: self.consul_agent_token.as_ref().map(z),
            consul_nomad_token: self.consul_nomad_token.as_ref().map(z),
        }
    }

    /// Whether the material Key Vault holds now is the same as this (what the warm boot rendered from).
    pub fn same_as(&self, other: &DiskMaterial) -> bool {
        self.ca_cert == other.ca_cert
            && self.ca_key == other.ca_key
            && self.consul_gossip_key == other.consul_gossip_key
            && self.nomad_gossip_key == other.nomad_gossip_key
            && self.nomad_client_cert == other.nomad_client_cert
            && self.nomad_client_key == other.nomad_client_key
            && self.consul_agent_token == other.consul_agent_token
            && self.consul_nomad_token == other.consul_nomad_token
    }
}

/// Why the material on disk was not used (the boot is then cold). Never holds a value from the file.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotWarm {
    #[error("no material on disk (first boot)")]
    Absent,
    #[error("{0}: unreadable: {1}")]
    Unreadable(String, String),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("{path}: owned by uid {uid}, not by the agent's user (uid {agent})")]
    Owner { path: String, uid: u32, agent: u32 },
    #[error("{path}: mode {mode:o}, not {MODE:o}")]
    Mode { path: String, mode: u32 },
    #[error("{0}: not in this agent's format")]
    Format(String),
    #[error("the material on disk is for another {0}")]
    Source(&'static str),
    #[error("the material on disk was last confirmed by Key Vault {0} s ago (more than {max} s)", max = MAX_UNCONFIRMED.as_secs())]
    Stale(i64),
    #[error("the material on disk lacks what a {0} needs")]
    Incomplete(String),
    #[error("the {0} certificate on disk is not good for a warm boot (to be issued or renewed)")]
    Certificate(String),
    #[error("the material on disk is unusable: {0}")]
    Unusable(String),
}

/// Reads the material on disk, if it is what this agent wrote for this node and was confirmed within
/// [`MAX_UNCONFIRMED`] of `now_unix`. `agent_uid`: the user the agent runs as (its files' owner).
pub fn load(
    layout: &Layout,
    source: &Source,
    agent_uid: u32,
    now_unix: i64,
) -> Result<DiskMaterial, NotWarm> {
    let p = path(layout);
    let shown = p.display().to_string();
    let meta = match std::fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(NotWarm::Absent),
        Err(e) => return Err(NotWarm::Unreadable(shown, e.kind().to_string())),
    };
    if !meta.file_type().is_file() {
        return Err(NotWarm::NotAFile(shown));
    }
    if meta.uid() != agent_uid {
        return Err(NotWarm::Owner {
            path: shown,
            uid: meta.uid(),
            agent: agent_uid,
        });
    }
    if meta.mode() & 0o7777 != MODE {
        return Err(NotWarm::Mode {
            path: shown,
            mode: meta.mode() & 0o7777,
        });
    }
    let bytes = Zeroizing::new(
        std::fs::read(&p).map_err(|e| NotWarm::Unreadable(shown.clone(), e.kind().to_string()))?,
    );
    // serde_json's errors quote no input, but say nothing of it anyway: the file holds secrets.
    let m: DiskMaterial = serde_json::from_slice(&bytes).map_err(|_| NotWarm::Format(shown))?;
    if m.schema != SCHEMA {
        return Err(NotWarm::Format(path(layout).display().to_string()));
    }
    let s = &m.source;
    for (what, same) in [
        ("cluster", s.cluster == source.cluster),
        ("role", s.role == source.role),
        ("node name", s.node == source.node),
        ("shared vault", s.shared_vault == source.shared_vault),
        ("servers vault", s.servers_vault == source.servers_vault),
    ] {
        if !same {
            return Err(NotWarm::Source(what));
        }
    }
    let age = now_unix - m.confirmed_unix;
    if !(0..=MAX_UNCONFIRMED.as_secs() as i64).contains(&age) {
        return Err(NotWarm::Stale(age));
    }
    Ok(m)
}

/// Writes the material on disk (atomically, 0600, the agent's own user). Returns whether it changed.
pub fn save(layout: &Layout, m: &DiskMaterial) -> Result<bool, FileError> {
    let mut f = render::json_file(path(layout), m, MODE, Owner::Current, true);
    let r = files::write_atomic(&f);
    f.content.zeroize();
    r
}

/// Removes the material on disk (Key Vault withdrew it): the next boot is cold.
pub fn remove(layout: &Layout) -> std::io::Result<()> {
    match std::fs::remove_file(path(layout)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn source() -> Source {
        Source {
            cluster: "c1".into(),
            role: "worker".into(),
            node: "w-0".into(),
            shared_vault: "https://kvs/".into(),
            servers_vault: None,
        }
    }

    fn material(now: i64) -> DiskMaterial {
        DiskMaterial {
            schema: SCHEMA,
            source: source(),
            confirmed_unix: now,
            ca_cert: "CERT".into(),
            ca_key: None,
            consul_gossip_key: "GOSSIP-SECRET".into(),
            nomad_gossip_key: None,
            nomad_client_cert: Some("CLIENT".into()),
            nomad_client_key: Some("CLIENT-KEY-SECRET".into()),
            consul_agent_token: Some("TOKEN-SECRET".into()),
            consul_nomad_token: None,
        }
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn what_the_agent_wrote_is_read_back_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        assert_eq!(
            load(&layout, &source(), me(), 100).unwrap_err(),
            NotWarm::Absent
        );
        assert!(save(&layout, &material(100)).unwrap());
        assert!(
            !save(&layout, &material(100)).unwrap(),
            "unchanged: untouched"
        );
        let m = load(&layout, &source(), me(), 200).unwrap();
        assert!(m.same_as(&material(0)));
        assert_eq!(
            std::fs::metadata(path(&layout)).unwrap().mode() & 0o7777,
            0o600
        );
        // Another user's file (as far as the check knows: the agent runs as someone else).
        assert!(matches!(
            load(&layout, &source(), me() + 1, 200),
            Err(NotWarm::Owner { .. })
        ));
        // Readable by others: not what the agent wrote.
        std::fs::set_permissions(path(&layout), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&layout, &source(), me(), 200).unwrap_err();
        assert_eq!(
            e,
            NotWarm::Mode {
                path: path(&layout).display().to_string(),
                mode: 0o644
            }
        );
        std::fs::set_permissions(path(&layout), std::fs::Permissions::from_mode(0o600)).unwrap();
        // A symbolic link to a file with the right owner and mode is still not the agent's file.
        let real = d.path().join("elsewhere.json");
        std::fs::rename(path(&layout), &real).unwrap();
        std::os::unix::fs::symlink(&real, path(&layout)).unwrap();
        assert_eq!(
            load(&layout, &source(), me(), 200).unwrap_err(),
            NotWarm::NotAFile(path(&layout).display().to_string())
        );
        std::fs::remove_file(path(&layout)).unwrap();
        // Garbage: one line naming the file, none of its content.
        std::fs::write(path(&layout), b"{\"schema\": 1, \"x\": \"GOSSIP-SECRET\"").unwrap();
        std::fs::set_permissions(path(&layout), std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load(&layout, &source(), me(), 200).unwrap_err().to_string();
        assert!(e.contains("material.json") && !e.contains("SECRET"), "{e}");
        remove(&layout).unwrap();
        remove(&layout).unwrap();
        assert_eq!(
            load(&layout, &source(), me(), 200).unwrap_err(),
            NotWarm::Absent
        );
    }

    #[test]
    fn material_for_another_node_or_too_long_unconfirmed_is_not_used() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        save(&layout, &material(1_000)).unwrap();
        for (what, other) in [
            (
                "cluster",
                Source {
                    cluster: "c2".into(),
                    ..source()
                },
            ),
            (
                "role",
                Source {
                    role: "jumpbox".into(),
                    ..source()
                },
            ),
            (
                "node name",
                Source {
                    node: "w-1".into(),
                    ..source()
                },
            ),
            (
                "shared vault",
                Source {
                    shared_vault: "https://other/".into(),
                    ..source()
                },
            ),
            (
                "servers vault",
                Source {
                    servers_vault: Some("https://kvc/".into()),
                    ..source()
                },
            ),
        ] {
            assert_eq!(
                load(&layout, &other, me(), 1_000).unwrap_err(),
                NotWarm::Source(what)
            );
        }
        let max = MAX_UNCONFIRMED.as_secs() as i64;
        assert!(load(&layout, &source(), me(), 1_000 + max).is_ok());
        assert_eq!(
            load(&layout, &source(), me(), 1_001 + max).unwrap_err(),
            NotWarm::Stale(max + 1)
        );
        // A clock that went backwards past the confirmation cannot vouch for it either.
        assert_eq!(
            load(&layout, &source(), me(), 999).unwrap_err(),
            NotWarm::Stale(-1)
        );
        let mut other_schema = material(1_000);
        other_schema.schema = SCHEMA + 1;
        save(&layout, &other_schema).unwrap();
        assert!(matches!(
            load(&layout, &source(), me(), 1_000),
            Err(NotWarm::Format(_))
        ));
    }

    #[test]
    fn only_consul_servers_keep_the_ca_key_and_nothing_is_printed() {
        let m = ClusterMaterial {
            ca_cert: "CERT".into(),
            ca_key: Some(Zeroizing::new("CA-KEY-SECRET".into())),
            consul_gossip_key: Zeroizing::new("GOSSIP-SECRET".into()),
            nomad_gossip_key: Some(Zeroizing::new("NOMAD-SECRET".into())),
            nomad_client: None,
            consul_agent_token: None,
            consul_nomad_token: None,
        };
        for (role, kept) in [
            (Role::ConsulServer, true),
            (Role::VaultServer, false),
            (Role::NomadServer, false),
        ] {
            let d = DiskMaterial::from_cluster(&m, source(), role, 0);
            assert_eq!(d.ca_key.is_some(), kept, "{role}");
            assert_eq!(d.to_cluster().ca_key.is_some(), kept, "{role}");
            let shown = format!("{d:?}");
            assert!(!shown.contains("SECRET"), "{shown}");
        }
        let a = DiskMaterial::from_cluster(&m, source(), Role::NomadServer, 0);
        let mut b = DiskMaterial::from_cluster(&m, source(), Role::NomadServer, 50);
        assert!(a.same_as(&b), "the confirmation time is not the material");
        b.consul_gossip_key = "ROTATED".into();
        assert!(!a.same_as(&b));
    }
}
