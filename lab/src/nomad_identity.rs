//! Workload identities as the Nomad contract double signs them, following Nomad's source (not copied):
//! - the keyring: the leader creates a root key when the cluster forms (Nomad's `initializeKeyring`), kept in
//!   the replicated state; Nomad ≥ 1.7 gives every root key an RSA key and signs with it, RS256
//!   (`nomad/encrypter.go` `SignClaims`: header `kid` = the root key's ID, `typ` = `JWT`);
//! - `GET /.well-known/jwks.json` (`structs.JWKSPath`, `command/agent/keyring_endpoint.go` `JWKSRequest`): the
//!   public keys as a JSON Web Key Set, `{"keys": [{"use": "sig", "kty": "RSA", "kid", "alg": "RS256", "n",
//!   "e"}]}`;
//! - the claims of a task's identity (`nomad/structs/workload_id.go` `WorkloadIdentityClaimsBuilder.Build`,
//!   `nomad/structs/identity.go`): `nomad_namespace`, `nomad_job_id`, `nomad_allocation_id`, `nomad_task`
//!   (`nomad_service` for service identities instead), `vault_role`/`vault_namespace` only when the task's
//!   `vault` block sets them, and the registered claims `sub` = `<region>:<namespace>:<job>:<group>:<task>:<identity>`,
//!   `aud` (a string when there is one audience, as go-jose writes it), `iat` = `nbf` = now, `exp` = now + TTL
//!   (none without a TTL), `jti` a fresh UUID; `iss` only when the server sets `oidc_issuer` (the lab does not).

use base64::Engine;
use serde::{Deserialize, Serialize};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// One root key of the keyring: its ID and its RSA private key (PKCS#8 DER, base64), in the replicated state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootKey {
    #[serde(rename = "KeyID")]
    pub key_id: String,
    #[serde(rename = "CreateTime")]
    pub create_time: i64,
    #[serde(rename = "RSAKey")]
    pub rsa_pkcs8: String,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl RootKey {
    /// A new root key with a 2048-bit RSA key (Nomad's size).
    pub fn generate(key_id: String) -> RootKey {
        use aws_lc_rs::encoding::AsDer;
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .expect("RSA key generation");
        let der = kp.as_der().expect("PKCS#8 encoding");
        RootKey {
            key_id,
            create_time: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
            rsa_pkcs8: base64::engine::general_purpose::STANDARD.encode(der.as_ref()),
        }
    }

    fn pair(&self) -> Result<aws_lc_rs::rsa::KeyPair, String> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(&self.rsa_pkcs8)
            .map_err(|_| "root key: not base64".to_string())?;
        aws_lc_rs::rsa::KeyPair::from_pkcs8(&der)
            .map_err(|_| "root key: not an RSA PKCS#8 key".into())
    }

    /// The public key as Nomad's JWKS lists it.
    pub fn jwk(&self) -> Result<serde_json::Value, String> {
        use aws_lc_rs::signature::KeyPair;
        let kp = self.pair()?;
        let c = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(kp.public_key());
        Ok(serde_json::json!({
            "use": "sig",
            "kty": "RSA",
            "kid": self.key_id,
            "alg": "RS256",
            "n": b64(&c.n),
            "e": b64(&c.e),
        }))
    }

    /// A compact JWS of `claims`, RS256, with Nomad's header.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, String> {
        let kp = self.pair()?;
        let header = serde_json::json!({"alg": "RS256", "kid": self.key_id, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0u8; kp.public_modulus_len()];
        kp.sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .map_err(|_| "RS256 signing failed".to_string())?;
        Ok(format!("{input}.{}", b64(&sig)))
    }
}

/// The JSON Web Key Set of a keyring.
pub fn jwks(keys: &[RootKey]) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = keys.iter().filter_map(|k| k.jwk().ok()).collect();
    serde_json::json!({ "keys": keys })
}

/// What a task's identity is made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityRequest {
    #[serde(rename = "Region", default = "global")]
    pub region: String,
    #[serde(rename = "Namespace")]
    pub namespace: String,
    #[serde(rename = "JobID")]
    pub job_id: String,
    #[serde(rename = "Group")]
    pub group: String,
    #[serde(rename = "Task")]
    pub task: String,
    #[serde(rename = "AllocID")]
    pub alloc_id: String,
    /// The identity's name: `default`, or `vault_default` for the Vault identity (Nomad's
    /// `WorkloadIdentityVaultPrefix` + the Vault cluster's name).
    #[serde(rename = "Identity")]
    pub identity: String,
    #[serde(rename = "Audience")]
    pub audience: Vec<String>,
    /// Seconds; 0: no expiry.
    #[serde(rename = "TTLSeconds", default)]
    pub ttl_secs: i64,
    /// When it is signed (Unix seconds); by default now. Lets a test make an identity that expired long ago.
    #[serde(rename = "IssuedAt", default)]
    pub issued_at: Option<i64>,
}

fn global() -> String {
    "global".into()
}

/// The claims Nomad puts in a task's workload identity.
pub fn claims(r: &IdentityRequest, now: i64, jti: &str) -> serde_json::Value {
    let iat = r.issued_at.unwrap_or(now);
    let sub = [
        r.region.as_str(),
        &r.namespace,
        &r.job_id,
        &r.group,
        &r.task,
        &r.identity,
    ]
    .join(":");
    let mut c = serde_json::json!({
        "nomad_namespace": r.namespace,
        "nomad_job_id": r.job_id,
        "nomad_allocation_id": r.alloc_id,
        "nomad_task": r.task,
        "sub": sub,
        "nbf": iat,
        "iat": iat,
        "jti": jti,
    });
    match r.audience.as_slice() {
        [] => {}
        [one] => c["aud"] = serde_json::json!(one),
        many => c["aud"] = serde_json::json!(many),
    }
    if r.ttl_secs > 0 {
        c["exp"] = serde_json::json!(iat + r.ttl_secs);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> IdentityRequest {
        IdentityRequest {
            region: "global".into(),
            namespace: "default".into(),
            job_id: "web".into(),
            group: "web".into(),
            task: "server".into(),
            alloc_id: "5b2ab7e4-7a1b-4f3c-9d3e-0a7d5cbbd5a1".into(),
            identity: "vault_default".into(),
            audience: vec!["vault.io".into()],
            ttl_secs: 3600,
            issued_at: None,
        }
    }

    #[test]
    fn claims_are_nomads() {
        let c = claims(&req(), 1_700_000_000, "j-1");
        assert_eq!(
            c,
            serde_json::json!({
                "nomad_namespace": "default", "nomad_job_id": "web",
                "nomad_allocation_id": "5b2ab7e4-7a1b-4f3c-9d3e-0a7d5cbbd5a1", "nomad_task": "server",
                "sub": "global:default:web:web:server:vault_default", "aud": "vault.io",
                "nbf": 1_700_000_000, "iat": 1_700_000_000, "exp": 1_700_003_600, "jti": "j-1"
            })
        );
        let mut two = req();
        two.audience.push("other".into());
        two.ttl_secs = 0;
        let c = claims(&two, 5, "j");
        assert_eq!(c["aud"], serde_json::json!(["vault.io", "other"]));
        assert!(c.get("exp").is_none(), "no TTL, no expiry");
    }

    #[test]
    fn a_signed_identity_verifies_with_the_jwks_key() {
        let k = RootKey::generate("key-1".into());
        let jwt = k.sign(&claims(&req(), 1_700_000_000, "j")).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[0])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "RS256", "kid": "key-1", "typ": "JWT"})
        );
        let set = jwks(std::slice::from_ref(&k));
        let jwk = &set["keys"][0];
        assert_eq!(
            (
                jwk["kty"].as_str(),
                jwk["alg"].as_str(),
                jwk["use"].as_str()
            ),
            (Some("RSA"), Some("RS256"), Some("sig"))
        );
        let d = |s: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s.as_str().unwrap())
                .unwrap()
        };
        let public = aws_lc_rs::rsa::PublicKeyComponents {
            n: d(&jwk["n"]),
            e: d(&jwk["e"]),
        };
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        let msg = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                msg.as_bytes(),
                &sig,
            )
            .expect("the JWKS key verifies the signature");
        let mut tampered = msg.clone().into_bytes();
        tampered[parts[0].len() + 3] ^= 1;
        assert!(public
            .verify(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                &tampered,
                &sig
            )
            .is_err());
    }
}
