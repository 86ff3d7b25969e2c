//! Which product and version is installed, so configs are rendered in the syntax that binary accepts.

use std::fmt;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Product {
    Consul,
    Vault,
    Nomad,
}

impl Product {
    pub fn as_str(self) -> &'static str {
        match self {
            Product::Consul => "consul",
            Product::Vault => "vault",
            Product::Nomad => "nomad",
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A semantic version with the distribution it came from (HashiCorp Vault or OpenBao speak the same API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }

    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().trim_start_matches('v');
        let core = s
            .split(|c: char| c == '-' || c == '+' || c.is_whitespace())
            .next()?;
        let mut it = core.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version {
            major: it.next()??,
            minor: it.next()??,
            patch: it.next().unwrap_or(Some(0))?,
        };
        Some(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What `<binary> version` said.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Installed {
    /// "Consul", "Vault", "OpenBao", "Nomad"
    pub distribution: String,
    pub version: Version,
}

impl Installed {
    /// OpenBao (a fork of HashiCorp Vault) speaks Vault's API but differs in configuration: the distribution
    /// word `bao version` prints ("OpenBao v2.7.2 …") tells them apart; `vault version` prints "Vault".
    pub fn is_openbao(&self) -> bool {
        self.distribution == "OpenBao"
    }
}

/// Newest releases this agent knows the syntax of; used when rendering offline without a binary.
pub fn assumed_current(p: Product) -> Installed {
    let (distribution, version) = match p {
        Product::Consul => ("Consul", Version::new(1, 20, 0)),
        Product::Vault => ("Vault", Version::new(1, 18, 0)),
        Product::Nomad => ("Nomad", Version::new(1, 9, 0)),
    };
    Installed {
        distribution: distribution.into(),
        version,
    }
}

/// Parses the first line of `consul version`, `vault version`, `bao version`, `nomad version`.
pub fn parse_version_output(p: Product, out: &str) -> Option<Installed> {
    let first = out.lines().next()?.trim();
    let mut words = first.split_whitespace();
    let dist = words.next()?;
    let expected: &[&str] = match p {
        Product::Consul => &["Consul"],
        Product::Vault => &["Vault", "OpenBao"],
        Product::Nomad => &["Nomad"],
    };
    if !expected.contains(&dist) {
        return None;
    }
    let version = Version::parse(words.next()?)?;
    Some(Installed {
        distribution: dist.to_string(),
        version,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("{product} binary {path}: cannot run: {source}")]
    Spawn {
        product: Product,
        path: String,
        source: std::io::Error,
    },
    #[error("{product} binary {path}: `version` did not answer within {0:?}", .after)]
    Timeout {
        product: Product,
        path: String,
        after: Duration,
    },
    #[error("{product} binary {path}: `version` printed no recognisable version")]
    Unrecognised { product: Product, path: String },
}

/// Runs `<bin> version` with a deadline.
pub async fn detect(p: Product, bin: &Path) -> Result<Installed, VersionError> {
    let path = bin.display().to_string();
    let after = Duration::from_secs(10);
    let out = tokio::process::Command::new(bin)
        .arg("version")
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(after, out).await {
        Err(_) => {
            return Err(VersionError::Timeout {
                product: p,
                path,
                after,
            })
        }
        Ok(Err(source)) => {
            return Err(VersionError::Spawn {
                product: p,
                path,
                source,
            })
        }
        Ok(Ok(o)) => o,
    };
    parse_version_output(p, &String::from_utf8_lossy(&out.stdout))
        .ok_or(VersionError::Unrecognised { product: p, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_version_lines() {
        let c = parse_version_output(
            Product::Consul,
            "Consul v1.8.7\nRevision \nProtocol 2 spoken by default\n",
        )
        .unwrap();
        assert_eq!(c.version, Version::new(1, 8, 7));
        let b = parse_version_output(
            Product::Vault,
            "OpenBao v2.7.2 (abc), built 2026-01-01T00:00:00Z\n",
        )
        .unwrap();
        assert_eq!(
            (b.distribution.as_str(), b.version),
            ("OpenBao", Version::new(2, 7, 2))
        );
        assert!(b.is_openbao());
        let v = parse_version_output(
            Product::Vault,
            "Vault v1.18.3 (7ae4eca5403bf574f142cd8f987b8d83bafcd1de), built 2024-12-16T14:00:53Z",
        )
        .unwrap();
        assert_eq!(v.version, Version::new(1, 18, 3));
        assert!(!v.is_openbao());
        let n = parse_version_output(
            Product::Nomad,
            "Nomad v1.9.5\nBuildDate 2025-01-14T18:35:12Z\n",
        )
        .unwrap();
        assert_eq!(n.version, Version::new(1, 9, 5));
        assert!(Version::parse("1.20.0-rc1").unwrap() > Version::new(1, 8, 7));
    }

    #[test]
    fn rejects_other_output() {
        assert!(parse_version_output(Product::Consul, "Nomad v1.9.5").is_none());
        assert!(parse_version_output(Product::Consul, "").is_none());
        assert!(parse_version_output(Product::Consul, "Consul vX").is_none());
    }
}
