//! The PGP escrow option (docs/pgp-escrow.md): operators' OpenPGP public keys, validated at boot, and the
//! escrow payload rewritten so that it holds only what those keys can open.
//!
//! - Vault encrypts recovery key *i* to operator key *i* itself (`recovery_pgp_keys` in `sys/init`).
//! - Every other secret of a payload (Vault's root token, Consul's and Nomad's management tokens) is
//!   encrypted here, by the agent, to every operator key (one message, one recipient per key: any one
//!   operator can open it, as any one operator can open the escrow without PGP).
//! - Fields known not to be secret (`kind`, `recovery_threshold`, `accessor_id`) stay readable; anything
//!   else is encrypted, so a field added to a payload later is never escrowed in clear by mistake.
//!
//! The agent never holds a private key: `escrow open` writes the messages out for `gpg --decrypt`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use pgp::composed::{Deserializable, Esk, Message, MessageBuilder, SignedPublicKey};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::types::KeyDetails;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

/// Payload fields that are not secret and stay readable in a PGP escrow.
pub const CLEAR_FIELDS: [&str; 3] = ["kind", "recovery_threshold", "accessor_id"];
/// The field holding Vault's recovery keys (PGP-encrypted by Vault, one per operator key, in key order).
pub const RECOVERY_KEYS_FIELD: &str = "recovery_keys_base64";

/// Where a key list came from, for error messages (`userData hashistack.pgpKeys`, `agent config
/// bootstrap.recovery_pgp_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    UserData,
    AgentConfig,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySource::UserData => "userData hashistack.pgpKeys",
            KeySource::AgentConfig => "agent config bootstrap.recovery_pgp_keys",
        })
    }
}

/// Why a list of operator keys is refused. Each message is one line and names the entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PgpKeyError {
    #[error("{from} has {got} PGP keys; the PGP escrow needs exactly one per recovery share ({shares}, bootstrap.recovery_shares)")]
    Count {
        from: KeySource,
        got: usize,
        shares: u8,
    },
    #[error("{from}[{index}]: not base64 (export a key with: gpg --export <id> | base64 -w0)")]
    NotBase64 { from: KeySource, index: usize },
    #[error("{from}[{index}]: ASCII-armored; give base64 of the binary key (gpg --export <id> | base64 -w0)")]
    Armored { from: KeySource, index: usize },
    #[error("{from}[{index}]: not an OpenPGP public key ({reason})")]
    NotAKey {
        from: KeySource,
        index: usize,
        reason: String,
    },
    #[error("{from}[{index}]: holds {count} keys; give one key per entry")]
    Several {
        from: KeySource,
        index: usize,
        count: usize,
    },
    #[error("{from}[{index}]: key {fingerprint} is revoked")]
    Revoked {
        from: KeySource,
        index: usize,
        fingerprint: String,
    },
    #[error("{from}[{index}]: key {fingerprint} has no usable encryption subkey (none flagged for encryption, valid and unexpired)")]
    NoEncryptionKey {
        from: KeySource,
        index: usize,
        fingerprint: String,
    },
    #[error(
        "{from}[{index}]: key {fingerprint} is used twice; every recovery share needs its own key"
    )]
    Duplicate {
        from: KeySource,
        index: usize,
        fingerprint: String,
    },
}

/// What can fail while encrypting to validated keys (the system RNG, the library).
#[derive(Debug, thiserror::Error)]
pub enum PgpError {
    #[error("PGP encryption to the operator keys failed: {0}")]
    Encrypt(String),
    #[error("escrow payload for PGP: {0}")]
    Payload(String),
}

/// One operator's key: what Vault is given (base64 of the binary key, exactly as supplied), its
/// fingerprint, and the subkey the agent encrypts to.
#[derive(Clone)]
pub struct OperatorKey {
    pub base64: String,
    pub fingerprint: String,
    key: SignedPublicKey,
    /// Index of the encryption subkey in `key.public_subkeys`.
    subkey: usize,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The validated operator keys of a deployment, one per recovery share, in order.
#[derive(Debug, Clone)]
pub struct OperatorKeys {
    pub source: KeySource,
    pub keys: Vec<OperatorKey>,
}

fn rng() -> rand_08::rngs::ThreadRng {
    rand_08::thread_rng()
}

impl OperatorKeys {
    /// Parses and checks `list` (base64 of binary OpenPGP public keys): the count must be `shares`, each
    /// entry one public key with a valid encryption subkey, no key twice; a trial encryption to each proves
    /// the agent can encrypt to it (so nothing after the bootstrap call can fail on a key).
    pub fn parse(source: KeySource, list: &[String], shares: u8) -> Result<Self, PgpKeyError> {
        if list.len() != shares as usize {
            return Err(PgpKeyError::Count {
                from: source,
                got: list.len(),
                shares,
            });
        }
        let mut keys: Vec<OperatorKey> = Vec::with_capacity(list.len());
        for (index, entry) in list.iter().enumerate() {
            let k = parse_one(source, index, entry)?;
            if keys.iter().any(|o| o.fingerprint == k.fingerprint) {
                return Err(PgpKeyError::Duplicate {
                    from: source,
                    index,
                    fingerprint: k.fingerprint,
                });
            }
            k.encrypt(b"hashistack: trial encryption")
                .map_err(|e| PgpKeyError::NotAKey {
                    from: source,
                    index,
                    reason: e.to_string(),
                })?;
            keys.push(k);
        }
        Ok(OperatorKeys { source, keys })
    }

    /// The keys as Vault's `sys/init` takes them (`recovery_pgp_keys`).
    pub fn base64_list(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.base64.clone()).collect()
    }

    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.fingerprint.clone()).collect()
    }

    /// One binary OpenPGP message that any one of the keys opens.
    pub fn encrypt_to_all(&self, plain: &[u8]) -> Result<Vec<u8>, PgpError> {
        let mut b =
            MessageBuilder::from_reader("", plain).seipd_v1(rng(), SymmetricKeyAlgorithm::AES256);
        for k in &self.keys {
            b.encrypt_to_key(rng(), &k.key.public_subkeys[k.subkey])
                .map_err(|e| PgpError::Encrypt(e.to_string()))?;
        }
        b.to_vec(rng())
            .map_err(|e| PgpError::Encrypt(e.to_string()))
    }

    /// Rewrites a tier's escrow payload (JSON, clear) into its PGP form: non-secret fields kept, Vault's
    /// recovery keys checked to be addressed to key *i* (encrypted here if they are not), every other
    /// field encrypted to all keys. The result holds nothing the keys cannot open.
    pub fn protect(&self, payload: &[u8]) -> Result<Zeroizing<Vec<u8>>, PgpError> {
        let value: Zeroizing<String> = Zeroizing::new(
            String::from_utf8(payload.to_vec())
                .map_err(|_| PgpError::Payload("not UTF-8".into()))?,
        );
        let mut map: serde_json::Map<String, Value> = serde_json::from_str(&value)
            .map_err(|_| PgpError::Payload("not a JSON object".into()))?;
        let mut out = PgpPayload {
            kind: String::new(),
            recovery_threshold: None,
            accessor_id: None,
            pgp_messages: Vec::new(),
        };
        let fingerprints = self.fingerprints();
        let names: Vec<String> = map.keys().cloned().collect();
        for name in names {
            let v = map.remove(&name).unwrap_or(Value::Null);
            match name.as_str() {
                "kind" => out.kind = v.as_str().unwrap_or_default().to_string(),
                "recovery_threshold" => out.recovery_threshold = v.as_u64().map(|n| n as u8),
                "accessor_id" => out.accessor_id = v.as_str().map(str::to_string),
                RECOVERY_KEYS_FIELD => {
                    let shares: Vec<String> = serde_json::from_value(v)
                        .map_err(|_| PgpError::Payload("recovery keys are not a list".into()))?;
                    if shares.len() != self.keys.len() {
                        return Err(PgpError::Payload(format!(
                            "{} recovery keys for {} operator keys",
                            shares.len(),
                            self.keys.len()
                        )));
                    }
                    for (i, share) in shares.iter().enumerate() {
                        let share = Zeroizing::new(share.clone());
                        let k = &self.keys[i];
                        let (bytes, by) = match B64.decode(share.as_bytes()) {
                            Ok(b) if k.addressed_by(&b) => (b, EncryptedBy::Vault),
                            // Vault did not encrypt it (it should have): never escrow it in clear.
                            _ => (k.encrypt(share.as_bytes())?, EncryptedBy::Agent),
                        };
                        out.pgp_messages.push(PgpMessage {
                            name: format!("recovery-key-{}", i + 1),
                            recipients: vec![k.fingerprint.clone()],
                            encrypted_by: by,
                            message_base64: B64.encode(bytes),
                        });
                    }
                }
                _ => {
                    let plain: Zeroizing<String> = Zeroizing::new(match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    });
                    if plain.is_empty() {
                        continue;
                    }
                    out.pgp_messages.push(PgpMessage {
                        name: name.replace('_', "-"),
                        recipients: fingerprints.clone(),
                        encrypted_by: EncryptedBy::Agent,
                        message_base64: B64.encode(self.encrypt_to_all(plain.as_bytes())?),
                    });
                }
            }
        }
        Ok(crate::escrow::payload(&out))
    }
}

impl OperatorKey {
    fn encrypt(&self, plain: &[u8]) -> Result<Vec<u8>, PgpError> {
        let mut b =
            MessageBuilder::from_reader("", plain).seipd_v1(rng(), SymmetricKeyAlgorithm::AES256);
        b.encrypt_to_key(rng(), &self.key.public_subkeys[self.subkey])
            .map_err(|e| PgpError::Encrypt(e.to_string()))?;
        b.to_vec(rng())
            .map_err(|e| PgpError::Encrypt(e.to_string()))
    }

    /// Whether `message` is an OpenPGP encrypted message whose every recipient is this key's
    /// encryption subkey (what Vault produces for recovery share *i*).
    fn addressed_by(&self, message: &[u8]) -> bool {
        let sub = &self.key.public_subkeys[self.subkey].key;
        let id = sub.legacy_key_id();
        let fp = sub.fingerprint();
        match Message::from_bytes(message) {
            Ok(Message::Encrypted { esk, .. }) => {
                !esk.is_empty()
                    && esk.iter().all(|e| match e {
                        Esk::PublicKeyEncryptedSessionKey(p) => {
                            p.id().map(|i| *i == id).unwrap_or(false)
                                || matches!(p.fingerprint(), Ok(Some(f)) if *f == fp)
                        }
                        _ => false,
                    })
            }
            _ => false,
        }
    }
}

fn parse_one(source: KeySource, index: usize, entry: &str) -> Result<OperatorKey, PgpKeyError> {
    let trimmed = entry.trim();
    if trimmed.starts_with("-----BEGIN") {
        return Err(PgpKeyError::Armored {
            from: source,
            index,
        });
    }
    let bytes = B64.decode(trimmed).map_err(|_| PgpKeyError::NotBase64 {
        from: source,
        index,
    })?;
    if bytes.starts_with(b"-----BEGIN") {
        return Err(PgpKeyError::Armored {
            from: source,
            index,
        });
    }
    let not_a_key = |reason: String| PgpKeyError::NotAKey {
        from: source,
        index,
        reason,
    };
    if bytes.is_empty() {
        return Err(not_a_key("empty".into()));
    }
    let parsed: Vec<_> = SignedPublicKey::from_bytes_many(&bytes[..])
        .map_err(|e| not_a_key(one_line(&e.to_string())))?
        .collect();
    let mut keys = Vec::new();
    for k in parsed {
        keys.push(k.map_err(|e| not_a_key(one_line(&e.to_string())))?);
    }
    let key = match keys.len() {
        0 => return Err(not_a_key("no public key packet".into())),
        1 => keys.pop().expect("one key"),
        count => {
            return Err(PgpKeyError::Several {
                from: source,
                index,
                count,
            })
        }
    };
    key.verify_bindings().map_err(|e| {
        not_a_key(format!(
            "self-signatures do not verify: {}",
            one_line(&e.to_string())
        ))
    })?;
    let fingerprint = format!("{:X}", key.primary_key.fingerprint());
    if !key.details.revocation_signatures.is_empty() {
        return Err(PgpKeyError::Revoked {
            from: source,
            index,
            fingerprint,
        });
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let subkey = key
        .public_subkeys
        .iter()
        .position(|s| {
            if !s.key.algorithm().can_encrypt() {
                return false;
            }
            if s.signatures
                .iter()
                .any(|sig| sig.typ() == Some(pgp::packet::SignatureType::SubkeyRevocation))
            {
                return false;
            }
            // The newest binding signature decides the flags and the expiry.
            let Some(binding) = s
                .signatures
                .iter()
                .filter(|sig| sig.typ() == Some(pgp::packet::SignatureType::SubkeyBinding))
                .max_by_key(|sig| sig.created().map(|t| t.as_secs()).unwrap_or(0))
            else {
                return false;
            };
            let flags = binding.key_flags();
            if !(flags.encrypt_comms() || flags.encrypt_storage()) {
                return false;
            }
            match binding.key_expiration_time().map(|d| d.as_secs()) {
                Some(secs) if secs > 0 => (s.key.created_at().as_secs() as i64 + secs as i64) > now,
                _ => true,
            }
        })
        .ok_or_else(|| PgpKeyError::NoEncryptionKey {
            from: source,
            index,
            fingerprint: fingerprint.clone(),
        })?;
    Ok(OperatorKey {
        base64: trimmed.to_string(),
        fingerprint,
        key,
        subkey,
    })
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(160).collect()
}

/// Who encrypted a message: Vault (recovery keys) or the agent (tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncryptedBy {
    Vault,
    Agent,
}

/// One OpenPGP message in a PGP escrow payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgpMessage {
    /// `recovery-key-1` … `recovery-key-N`, `root-token`, `secret-id`.
    pub name: String,
    /// Fingerprints of the operator keys that can open it.
    pub recipients: Vec<String>,
    pub encrypted_by: EncryptedBy,
    /// The binary OpenPGP message, base64 (`base64 -d | gpg --decrypt`).
    pub message_base64: String,
}

/// A tier's escrow payload with the PGP option on. Holds no clear secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgpPayload {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accessor_id: Option<String>,
    pub pgp_messages: Vec<PgpMessage>,
}

impl PgpPayload {
    /// The PGP form of an opened payload, if it is one.
    pub fn from_opened(opened: &[u8]) -> Option<Self> {
        serde_json::from_slice(opened).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgp::composed::{KeyType, SecretKeyParamsBuilder, SignedSecretKey, SubkeyParamsBuilder};
    use pgp::types::Password;

    /// A key pair as `gpg --quick-gen-key` makes one: a signing primary key and an encryption subkey.
    pub(crate) fn keypair(uid: &str, encryption_subkey: bool) -> SignedSecretKey {
        let mut p = SecretKeyParamsBuilder::default();
        p.key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(true)
            .primary_user_id(uid.into());
        if encryption_subkey {
            p.subkeys(vec![SubkeyParamsBuilder::default()
                .key_type(KeyType::ECDH(
                    pgp::crypto::ecc_curve::ECCCurve::Curve25519Legacy,
                ))
                .can_encrypt(pgp::composed::EncryptionCaps::All)
                .build()
                .unwrap()]);
        }
        p.build().unwrap().generate(rng()).unwrap()
    }

    fn b64_public(k: &SignedSecretKey) -> String {
        use pgp::ser::Serialize as _;
        let public = k.to_public_key();
        B64.encode(public.to_bytes().unwrap())
    }

    fn decrypt(k: &SignedSecretKey, message: &[u8]) -> Vec<u8> {
        let mut m = Message::from_bytes(message)
            .unwrap()
            .decrypt(&Password::empty(), k)
            .unwrap();
        if m.is_compressed() {
            m = m.decompress().unwrap();
        }
        m.as_data_vec().unwrap()
    }

    #[test]
    fn keys_are_counted_parsed_and_checked_for_an_encryption_subkey() {
        let pairs: Vec<_> = (0..3).map(|i| keypair(&format!("op{i}"), true)).collect();
        let good: Vec<String> = pairs.iter().map(b64_public).collect();
        let keys = OperatorKeys::parse(KeySource::UserData, &good, 3).unwrap();
        assert_eq!(keys.keys.len(), 3);
        assert_eq!(keys.base64_list(), good);
        assert_eq!(keys.fingerprints()[0].len(), 40);

        let e = OperatorKeys::parse(KeySource::UserData, &good, 5).unwrap_err();
        assert_eq!(
            e.to_string(),
            "userData hashistack.pgpKeys has 3 PGP keys; the PGP escrow needs exactly one per recovery share (5, bootstrap.recovery_shares)"
        );
        let mut bad = good.clone();
        bad[1] = "not base64!".into();
        let e = OperatorKeys::parse(KeySource::AgentConfig, &bad, 3).unwrap_err();
        assert!(matches!(e, PgpKeyError::NotBase64 { index: 1, .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with("agent config bootstrap.recovery_pgp_keys[1]: not base64"));
        bad[1] = B64.encode(b"definitely not a key");
        let e = OperatorKeys::parse(KeySource::UserData, &bad, 3).unwrap_err();
        assert!(matches!(e, PgpKeyError::NotAKey { index: 1, .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
        bad[1] = pairs[1]
            .to_public_key()
            .to_armored_string(Default::default())
            .unwrap();
        let e = OperatorKeys::parse(KeySource::UserData, &bad, 3).unwrap_err();
        assert!(matches!(e, PgpKeyError::Armored { index: 1, .. }), "{e}");
        bad[1] = B64.encode(&bad[1]);
        let e = OperatorKeys::parse(KeySource::UserData, &bad, 3).unwrap_err();
        assert!(matches!(e, PgpKeyError::Armored { index: 1, .. }), "{e}");
        bad[1] = b64_public(&keypair("signing only", false));
        let e = OperatorKeys::parse(KeySource::UserData, &bad, 3).unwrap_err();
        assert!(
            matches!(e, PgpKeyError::NoEncryptionKey { index: 1, .. }),
            "{e}"
        );
        bad[1] = good[0].clone();
        let e = OperatorKeys::parse(KeySource::UserData, &bad, 3).unwrap_err();
        assert!(matches!(e, PgpKeyError::Duplicate { index: 1, .. }), "{e}");
    }

    #[test]
    fn protected_payload_holds_only_what_the_keys_open() {
        let pairs: Vec<_> = (0..3).map(|i| keypair(&format!("op{i}"), true)).collect();
        let keys = OperatorKeys::parse(
            KeySource::UserData,
            &pairs.iter().map(b64_public).collect::<Vec<_>>(),
            3,
        )
        .unwrap();
        // Recovery keys as Vault returns them with recovery_pgp_keys: share i encrypted to key i. Share 2
        // comes back in clear (a Vault that ignored the keys): the agent encrypts it itself.
        let shares: Vec<String> = vec![
            B64.encode(keys.keys[0].encrypt(b"share-one").unwrap()),
            B64.encode(keys.keys[1].encrypt(b"share-two").unwrap()),
            "c2hhcmUtdGhyZWUtaW4tY2xlYXI=".into(),
        ];
        let clear = serde_json::json!({
            "kind": "vault-init",
            "recovery_keys_base64": shares,
            "recovery_threshold": 2,
            "root_token": "s.the-root-token",
        });
        let protected = keys.protect(clear.to_string().as_bytes()).unwrap();
        let text = String::from_utf8(protected.to_vec()).unwrap();
        assert!(!text.contains("s.the-root-token"), "{text}");
        assert!(!text.contains("c2hhcmUtdGhyZWUtaW4tY2xlYXI="), "{text}");
        let p: PgpPayload = serde_json::from_str(&text).unwrap();
        assert_eq!(p.kind, "vault-init");
        assert_eq!(p.recovery_threshold, Some(2));
        let names: Vec<_> = p.pgp_messages.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "recovery-key-1",
                "recovery-key-2",
                "recovery-key-3",
                "root-token"
            ]
        );
        let by: Vec<_> = p.pgp_messages.iter().map(|m| m.encrypted_by).collect();
        assert_eq!(
            by,
            [
                EncryptedBy::Vault,
                EncryptedBy::Vault,
                EncryptedBy::Agent,
                EncryptedBy::Agent
            ]
        );
        let msg = |i: usize| B64.decode(&p.pgp_messages[i].message_base64).unwrap();
        assert_eq!(decrypt(&pairs[0], &msg(0)), b"share-one");
        assert_eq!(decrypt(&pairs[1], &msg(1)), b"share-two");
        assert_eq!(decrypt(&pairs[2], &msg(2)), b"c2hhcmUtdGhyZWUtaW4tY2xlYXI=");
        assert_eq!(
            p.pgp_messages[2].recipients,
            vec![keys.keys[2].fingerprint.clone()]
        );
        // The root token opens with any one of the keys.
        for k in &pairs {
            assert_eq!(decrypt(k, &msg(3)), b"s.the-root-token");
        }
        assert_eq!(p.pgp_messages[3].recipients, keys.fingerprints());

        // Consul/Nomad: the accessor stays readable, the secret does not.
        let acl = serde_json::json!({"kind": "consul-acl-bootstrap", "accessor_id": "acc-1", "secret_id": "sec-1"});
        let p: PgpPayload =
            serde_json::from_slice(&keys.protect(acl.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(p.accessor_id.as_deref(), Some("acc-1"));
        assert_eq!(p.pgp_messages.len(), 1);
        assert_eq!(p.pgp_messages[0].name, "secret-id");
        assert_eq!(
            decrypt(
                &pairs[1],
                &B64.decode(&p.pgp_messages[0].message_base64).unwrap()
            ),
            b"sec-1"
        );
    }
}
