//! Node certificates issued at boot from the cluster CA (rcgen; never a shell-out to openssl).
//!
//! A certificate is kept across boots while it was issued by the current CA for the same names and more
//! than a third of its validity remains, so re-rendering is byte-identical; otherwise a new key and
//! certificate are issued. A small non-secret sidecar records what the certificate was issued for.

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// The cluster CA as loaded from its PEM files. The key never leaves this struct.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("sha256", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cluster CA certificate is not a usable PEM certificate")]
    BadCaCert,
    #[error("cluster CA key is not a usable PEM private key")]
    BadCaKey,
    #[error("cluster CA key does not belong to the cluster CA certificate")]
    CaKeyMismatch,
    #[error("cannot issue certificate: {0}")]
    Issue(String),
    #[error("certificate is not a usable PEM certificate")]
    BadCert,
    #[error("certificate key is not a usable PEM private key")]
    BadKey,
}

/// Why an HTTPS client trusting a CA file could not be made (the file names the CA; nothing secret).
#[derive(Debug, thiserror::Error)]
pub enum HttpsClientError {
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a PEM certificate", path.display())]
    NotPem { path: std::path::PathBuf },
    #[error("{0}")]
    Build(reqwest::Error),
}

/// The CA certificate in `path`, for a client to trust.
pub fn ca_certificate(path: &std::path::Path) -> Result<reqwest::Certificate, HttpsClientError> {
    let pem = std::fs::read(path).map_err(|source| HttpsClientError::Read {
        path: path.to_owned(),
        source,
    })?;
    reqwest::Certificate::from_pem(&pem).map_err(|_| HttpsClientError::NotPem {
        path: path.to_owned(),
    })
}

/// What a node certificate was issued for (stored beside it; contains nothing secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedFor {
    pub ca_sha256: String,
    pub sans: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
}

pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub issued_for: IssuedFor,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("issued_for", &self.issued_for)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| TlsError::BadCaKey)?;
        // Parse once now so a broken CA fails before anything is rendered.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(|_| TlsError::BadCaCert)?;
        // A key from one creation and a certificate from another (two creators raced) would issue
        // certificates nobody trusts: refuse the pair.
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|_| TlsError::BadCaCert)?;
        let cert = pem.parse_x509().map_err(|_| TlsError::BadCaCert)?;
        if cert.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&key)
        {
            return Err(TlsError::CaKeyMismatch);
        }
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key in PEM, for the one consumer that must hold it: Consul's built-in CA on Consul servers.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn fingerprint(&self) -> String {
        ca_sha256(&self.cert_pem)
    }

    /// Issues a server+client certificate for `sans` (DNS names or IP addresses), valid `days`.
    pub fn issue(
        &self,
        common_name: &str,
        sans: &[String],
        days: u32,
        now: OffsetDateTime,
    ) -> Result<NodeCert, TlsError> {
        let issuer =
            Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(|_| TlsError::BadCaCert)?;
        let mut params =
            CertificateParams::new(sans.to_vec()).map_err(|e| TlsError::Issue(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_before = now - Duration::minutes(5);
        let not_after = now + Duration::days(days as i64);
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(|e| TlsError::Issue(e.to_string()))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| TlsError::Issue(e.to_string()))?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issued_for: IssuedFor {
                ca_sha256: self.fingerprint(),
                sans: sans.to_vec(),
                not_before: not_before.unix_timestamp(),
                not_after: not_after.unix_timestamp(),
            },
        })
    }
}

/// A certificate this node did not issue (the shared Nomad client certificate, handed over with the cluster
/// material): checks that both PEMs parse and records what the certificate says it is for.
pub fn adopt(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<NodeCert, TlsError> {
    KeyPair::from_pem(key_pem).map_err(|_| TlsError::BadKey)?;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|_| TlsError::BadCert)?;
    let cert = pem.parse_x509().map_err(|_| TlsError::BadCert)?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))
                            .to_string(),
                    ),
                    16 => sans.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))
                            .to_string(),
                    ),
                    _ => return Err(TlsError::BadCert),
                },
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    Ok(NodeCert {
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        issued_for: IssuedFor {
            ca_sha256: hex::encode(Sha256::digest(ca_pem.as_bytes())),
            sans,
            not_before,
            not_after,
        },
    })
}

/// Whether an existing certificate may be kept: same CA, same names, and over a third of its life left.
pub fn still_good(
    existing: &IssuedFor,
    ca: &ClusterCa,
    sans: &[String],
    now: OffsetDateTime,
) -> bool {
    still_good_for(existing, &ca.fingerprint(), sans, now)
}

/// The fingerprint [`IssuedFor::ca_sha256`] records, from the CA certificate alone (no key needed).
pub fn ca_sha256(ca_cert_pem: &str) -> String {
    hex::encode(Sha256::digest(ca_cert_pem.as_bytes()))
}

/// [`still_good`] for a node that holds the CA certificate only (a warm boot of a Vault or Nomad server).
pub fn still_good_for(
    existing: &IssuedFor,
    ca_sha256: &str,
    sans: &[String],
    now: OffsetDateTime,
) -> bool {
    let life = existing.not_after - existing.not_before;
    existing.ca_sha256 == ca_sha256
        && existing.sans == sans
        && existing.not_after - now.unix_timestamp() > life / 3
}

/// Makes a CA (the lab uses this to provision the cluster CA; on Azure it is created once at bootstrap).
pub fn generate_ca(
    common_name: &str,
    days: u32,
    now: OffsetDateTime,
) -> Result<(String, String), TlsError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| TlsError::Issue(e.to_string()))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days as i64);
    let key = KeyPair::generate().map_err(|e| TlsError::Issue(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::Issue(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_and_keeps_certificates() {
        let now = OffsetDateTime::now_utc();
        let (c, k) = generate_ca("test CA", 30, now).unwrap();
        let ca = ClusterCa::from_pem(&c, &k).unwrap();
        let sans = vec![
            "n1".to_string(),
            "server.dc1.consul".into(),
            "10.0.1.4".into(),
            "localhost".into(),
        ];
        let nc = ca.issue("n1", &sans, 90, now).unwrap();
        assert!(nc.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(nc.key_pem.contains("PRIVATE KEY"));
        assert!(still_good(&nc.issued_for, &ca, &sans, now));
        assert!(
            !still_good(&nc.issued_for, &ca, &sans[..3], now),
            "names changed"
        );
        assert!(
            !still_good(&nc.issued_for, &ca, &sans, now + Duration::days(70)),
            "late in life"
        );
        let (c2, k2) = generate_ca("other CA", 30, now).unwrap();
        // A key from another creation is refused, whichever way round.
        assert!(matches!(
            ClusterCa::from_pem(&c, &k2),
            Err(TlsError::CaKeyMismatch)
        ));
        assert!(matches!(
            ClusterCa::from_pem(&c2, &k),
            Err(TlsError::CaKeyMismatch)
        ));
        assert!(
            !still_good(
                &nc.issued_for,
                &ClusterCa::from_pem(&c2, &k2).unwrap(),
                &sans,
                now
            ),
            "CA changed"
        );
        assert!(!format!("{ca:?} {nc:?}").contains("PRIVATE"));
    }

    #[test]
    fn rejects_garbage() {
        let now = OffsetDateTime::now_utc();
        let (c, k) = generate_ca("test CA", 30, now).unwrap();
        assert!(matches!(
            ClusterCa::from_pem("nope", &k),
            Err(TlsError::BadCaCert)
        ));
        assert!(matches!(
            ClusterCa::from_pem(&c, "nope"),
            Err(TlsError::BadCaKey)
        ));
    }
}
