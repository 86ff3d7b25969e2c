//! Envelope encryption of escrowed secrets: a fresh 256-bit data key per bootstrap encrypts the payload
//! with AES-256-GCM; the data key is wrapped by a Key Vault key (RSA-OAEP-256) that VM identities may use
//! to wrap but never to unwrap. Plaintext lives only in zeroizing buffers.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// A data key before wrapping. Zeroized on drop; never printed.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(&mut k[..]).expect("system RNG");
        DataKey(k)
    }
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut k = Zeroizing::new([0u8; 32]);
        if b.len() != 32 {
            return None;
        }
        k.copy_from_slice(b);
        Some(DataKey(k))
    }
    pub fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

/// The escrowed object, as stored in Blob Storage and Key Vault. Contains no plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub format: u32,
    pub escrow_id: String,
    pub cluster: String,
    pub tier: String,
    pub created_unix: i64,
    /// The Key Vault key (with version) that wrapped the data key.
    pub kek_id: String,
    pub wrap_alg: String,
    pub wrapped_key: String,
    pub nonce: String,
    /// AES-256-GCM ciphertext with tag, base64.
    pub ciphertext: String,
}

impl Envelope {
    pub fn aad(escrow_id: &str, cluster: &str, tier: &str) -> Vec<u8> {
        format!("hashistack-escrow/v1/{cluster}/{tier}/{escrow_id}").into_bytes()
    }

    /// SHA-256 of the ciphertext: what receipts record and `escrow verify` compares.
    pub fn ciphertext_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.ciphertext.as_bytes()))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("envelope serialises")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope: data key has the wrong length")]
    BadKey,
    #[error("envelope: decryption failed (wrong key, or the object was altered)")]
    Decrypt,
    #[error("envelope: malformed field {0}")]
    Malformed(&'static str),
}

/// Length of the AES-256-GCM tag sealing appends.
pub const TAG_LEN: usize = 16;

/// Encrypts `plaintext` (consumed and zeroized) under `key`.
#[allow(clippy::too_many_arguments)]
pub fn seal(
    key: &DataKey,
    mut plaintext: Zeroizing<Vec<u8>>,
    escrow_id: &str,
    cluster: &str,
    tier: &str,
    kek_id: &str,
    wrapped_key: &[u8],
    created_unix: i64,
) -> Result<Envelope, EnvelopeError> {
    let aead = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.bytes()).map_err(|_| EnvelopeError::BadKey)?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).expect("system RNG");
    let aad = Envelope::aad(escrow_id, cluster, tier);
    // Sealing appends the tag: without room for it the Vec would reallocate and leave the plaintext behind in
    // the allocation it frees. So it gets the room first, by a copy whose source is zeroized on drop.
    if plaintext.capacity() < plaintext.len() + TAG_LEN {
        let mut roomy = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_LEN));
        roomy.extend_from_slice(&plaintext);
        plaintext = roomy;
    }
    let mut buf: Vec<u8> = std::mem::take(&mut *plaintext);
    let capacity = buf.capacity();
    let r = aead.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&aad[..]),
        &mut buf,
    );
    debug_assert_eq!(
        buf.capacity(),
        capacity,
        "sealing in place never reallocates"
    );
    if r.is_err() {
        buf.zeroize();
        return Err(EnvelopeError::BadKey);
    }
    Ok(Envelope {
        format: 1,
        escrow_id: escrow_id.into(),
        cluster: cluster.into(),
        tier: tier.into(),
        created_unix,
        kek_id: kek_id.into(),
        wrap_alg: "RSA-OAEP-256".into(),
        wrapped_key: B64.encode(wrapped_key),
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(&buf),
    })
}

/// Decrypts an envelope with its (unwrapped) data key.
pub fn open(env: &Envelope, key: &DataKey) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let aead = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.bytes()).map_err(|_| EnvelopeError::BadKey)?,
    );
    let nonce: [u8; NONCE_LEN] = B64
        .decode(&env.nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or(EnvelopeError::Malformed("nonce"))?;
    let mut buf = Zeroizing::new(
        B64.decode(&env.ciphertext)
            .map_err(|_| EnvelopeError::Malformed("ciphertext"))?,
    );
    let aad = Envelope::aad(&env.escrow_id, &env.cluster, &env.tier);
    let plain_len = aead
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..]),
            &mut buf[..],
        )
        .map_err(|_| EnvelopeError::Decrypt)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_length_is_the_algorithms() {
        assert_eq!(TAG_LEN, AES_256_GCM.tag_len());
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let k = DataKey::generate();
        let secret = b"root-token-s.abc123".to_vec();
        let env = seal(
            &k,
            Zeroizing::new(secret.clone()),
            "e1",
            "lab",
            "vault",
            "kid/1",
            b"wrapped",
            1,
        )
        .unwrap();
        assert!(!String::from_utf8_lossy(&env.to_json()).contains("root-token"));
        assert_eq!(&open(&env, &k).unwrap()[..], &secret[..]);
        let other = DataKey::generate();
        assert_eq!(open(&env, &other).unwrap_err(), EnvelopeError::Decrypt);
        let mut moved = env.clone();
        moved.tier = "consul".into();
        assert_eq!(
            open(&moved, &k).unwrap_err(),
            EnvelopeError::Decrypt,
            "AAD binds cluster/tier/id"
        );
        assert_eq!(env.ciphertext_sha256().len(), 64);
        assert!(!format!("{k:?}").contains(&hex::encode(k.bytes())));
    }
}
