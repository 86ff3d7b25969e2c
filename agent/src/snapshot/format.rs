//! The encrypted snapshot format (`hsnap` v1), streamed in both directions: the sealer turns a product's snapshot
//! into frames as its bytes arrive, the opener checks and decrypts them as they are read back. Neither holds more
//! than one chunk. Documented in docs/runbooks.md ("The snapshot format").
//!
//! ```text
//! magic    8 bytes   "HSSNAP\0\x01"
//! hlen     u32 BE    length of the header (at most 16 KiB)
//! header   hlen      JSON: format, cluster, tier, node, created_unix, index, chunk_size, cipher,
//!                    kek_id, wrap_alg, wrapped_key (the data key wrapped by Key Vault, base64)
//! frames   …         each: u32 BE length L (16 ≤ L ≤ chunk_size + 16), then L bytes of AES-256-GCM
//!                    ciphertext with its tag; the last frame (and only it) is flagged final
//! ```
//!
//! Frame `i` (from 0) is sealed with the snapshot's own data key (fresh for every snapshot), the nonce
//! `0u32 ‖ i as u64` (big endian; unique because the key is never reused), and the associated data
//! `"hashistack-snapshot/v1" ‖ SHA-256(magic ‖ hlen ‖ header) ‖ i as u64 ‖ final as u8`. So every frame
//! authenticates the whole header (cluster, tier, index, wrapped key), its position, and whether the stream
//! ends there: an altered header or frame, frames swapped, dropped or added, a stream cut at a frame
//! boundary or carrying bytes after the final frame — each fails to open.

use super::super::escrow::envelope::DataKey;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

pub const MAGIC: &[u8; 8] = b"HSSNAP\0\x01";
pub const FORMAT: u32 = 1;
pub const CIPHER: &str = "AES-256-GCM";
pub const WRAP_ALG: &str = "RSA-OAEP-256";
/// Plaintext bytes per frame.
pub const CHUNK_SIZE: u32 = 1 << 20;
pub const MAX_HEADER: u32 = 16 * 1024;
const TAG_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"hashistack-snapshot/v1";

/// The clear header: what the snapshot is and how to open it. Authenticated by every frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub cluster: String,
    /// consul, vault or nomad
    pub tier: String,
    /// The node (the tier's leader) that took it.
    pub node: String,
    pub created_unix: i64,
    /// The product's raft index when the snapshot was taken (0: the product does not say).
    pub index: u64,
    pub chunk_size: u32,
    pub cipher: String,
    /// The Key Vault key (with version) that wrapped the data key.
    pub kek_id: String,
    pub wrap_alg: String,
    /// The data key wrapped with `kek_id`, base64.
    pub wrapped_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a hashistack snapshot (bad magic)")]
    Magic,
    #[error("snapshot header is malformed: {0}")]
    Header(String),
    #[error("snapshot is truncated (it ends before its final frame)")]
    Truncated,
    #[error("snapshot frame {0} does not authenticate (corrupt or altered, or the wrong key)")]
    Frame(u64),
    #[error("snapshot frame {0} has an impossible length {1}")]
    FrameLength(u64, u32),
    #[error("snapshot has bytes after its final frame")]
    Trailing,
    #[error("snapshot data key has the wrong length")]
    Key,
}

fn nonce(i: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&i.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(header_hash: &[u8; 32], i: u64, last: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_LABEL.len() + 32 + 9);
    a.extend_from_slice(AAD_LABEL);
    a.extend_from_slice(header_hash);
    a.extend_from_slice(&i.to_be_bytes());
    a.push(last as u8);
    a
}

fn aead(key: &DataKey) -> Result<LessSafeKey, FormatError> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.bytes()).map_err(|_| FormatError::Key)?,
    ))
}

/// `magic ‖ hlen ‖ header`, as written at the start of the stream.
pub fn encode_header(h: &Header) -> Vec<u8> {
    let json = serde_json::to_vec(h).expect("header serialises");
    let mut out = Vec::with_capacity(12 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Parses the header at the start of `prefix`: `Ok(None)` when more bytes are needed, else the header and the
/// length of the encoded header (where the frames start).
pub fn parse_header(prefix: &[u8]) -> Result<Option<(Header, usize)>, FormatError> {
    if prefix.len() < MAGIC.len() {
        return if MAGIC.starts_with(prefix) {
            Ok(None)
        } else {
            Err(FormatError::Magic)
        };
    }
    if &prefix[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    if prefix.len() < 12 {
        return Ok(None);
    }
    let hlen = u32::from_be_bytes(prefix[8..12].try_into().expect("4 bytes"));
    if hlen == 0 || hlen > MAX_HEADER {
        return Err(FormatError::Header(format!("length {hlen}")));
    }
    let end = 12 + hlen as usize;
    if prefix.len() < end {
        return Ok(None);
    }
    let h: Header =
        serde_json::from_slice(&prefix[12..end]).map_err(|e| FormatError::Header(e.to_string()))?;
    if h.format != FORMAT {
        return Err(FormatError::Header(format!(
            "format {} (expected {FORMAT})",
            h.format
        )));
    }
    if h.cipher != CIPHER || h.wrap_alg != WRAP_ALG {
        return Err(FormatError::Header(format!(
            "cipher {} / wrap {} (expected {CIPHER} / {WRAP_ALG})",
            h.cipher, h.wrap_alg
        )));
    }
    if h.chunk_size == 0 || h.chunk_size > 64 << 20 {
        return Err(FormatError::Header(format!("chunk size {}", h.chunk_size)));
    }
    Ok(Some((h, end)))
}

/// Encrypts a stream into frames. Feed plaintext with [`Sealer::push`], end with [`Sealer::finish`]; framed
/// bytes are appended to the caller's buffer. Holds at most one chunk of plaintext (zeroized as it goes).
pub struct Sealer {
    key: LessSafeKey,
    header_hash: [u8; 32],
    chunk: usize,
    pending: Vec<u8>,
    index: u64,
    plaintext_bytes: u64,
}

impl Sealer {
    /// Returns the sealer and the encoded header (the first bytes of the stream).
    pub fn new(key: &DataKey, header: &Header) -> Result<(Self, Vec<u8>), FormatError> {
        let encoded = encode_header(header);
        let header_hash: [u8; 32] = Sha256::digest(&encoded).into();
        let chunk = header.chunk_size as usize;
        Ok((
            Sealer {
                key: aead(key)?,
                header_hash,
                chunk,
                pending: Vec::with_capacity(chunk + TAG_LEN),
                index: 0,
                plaintext_bytes: 0,
            },
            encoded,
        ))
    }

    fn seal(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let a = aad(&self.header_hash, self.index, last);
        self.key
            .seal_in_place_append_tag(nonce(self.index), Aad::from(&a[..]), &mut self.pending)
            .map_err(|_| FormatError::Key)?;
        out.extend_from_slice(&(self.pending.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.pending);
        self.pending.zeroize();
        self.pending.clear();
        self.index += 1;
        Ok(())
    }

    /// Adds plaintext; every full chunk followed by more data becomes a (non-final) frame in `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), FormatError> {
        self.plaintext_bytes += data.len() as u64;
        while !data.is_empty() {
            if self.pending.len() == self.chunk {
                self.seal(false, out)?;
            }
            let take = (self.chunk - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seals what is left (possibly nothing) as the final frame. Returns the plaintext length.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<u64, FormatError> {
        self.seal(true, out)?;
        Ok(self.plaintext_bytes)
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.pending.zeroize();
    }
}

/// Checks and decrypts frames. Feed the bytes after the header with [`Opener::push`] in any slicing; each
/// authenticated frame's plaintext goes to `sink`; [`Opener::finish`] fails unless the final frame was seen.
pub struct Opener {
    key: LessSafeKey,
    header_hash: [u8; 32],
    chunk: usize,
    buf: Vec<u8>,
    index: u64,
    done: bool,
    plaintext_bytes: u64,
}

impl Opener {
    /// `encoded_header`: the stream's first bytes as [`parse_header`] measured them (hashed into every frame).
    pub fn new(key: &DataKey, header: &Header, encoded_header: &[u8]) -> Result<Self, FormatError> {
        Ok(Opener {
            key: aead(key)?,
            header_hash: Sha256::digest(encoded_header).into(),
            chunk: header.chunk_size as usize,
            buf: Vec::new(),
            index: 0,
            done: false,
            plaintext_bytes: 0,
        })
    }

    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        sink: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), OpenError<E>> {
        while !data.is_empty() {
            if self.done {
                return Err(OpenError::Format(FormatError::Trailing));
            }
            // The length prefix, then the frame.
            let need = if self.buf.len() < 4 {
                4 - self.buf.len()
            } else {
                let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes"));
                if (len as usize) < TAG_LEN || len as usize > self.chunk + TAG_LEN {
                    return Err(OpenError::Format(FormatError::FrameLength(self.index, len)));
                }
                4 + len as usize - self.buf.len()
            };
            let take = need.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
                if self.buf.len() == 4 + len && len >= TAG_LEN {
                    self.open_frame(sink)?;
                }
            }
        }
        Ok(())
    }

    fn open_frame<E>(
        &mut self,
        sink: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), OpenError<E>> {
        // A frame is final if it opens as final; a full chunk may be either, a short one only final.
        let i = self.index;
        let plain_len = self.buf.len() - 4 - TAG_LEN;
        let mut attempts: &[bool] = &[false, true];
        if plain_len < self.chunk {
            attempts = &[true];
        }
        for &last in attempts {
            let mut work = self.buf[4..].to_vec();
            let a = aad(&self.header_hash, i, last);
            if let Ok(plain) = self
                .key
                .open_in_place(nonce(i), Aad::from(&a[..]), &mut work)
            {
                let r = sink(plain);
                self.plaintext_bytes += plain.len() as u64;
                work.zeroize();
                self.buf.clear();
                self.index += 1;
                self.done = last;
                return r.map_err(OpenError::Sink);
            }
        }
        Err(OpenError::Format(FormatError::Frame(i)))
    }

    /// Plaintext bytes authenticated so far.
    pub fn plaintext_bytes(&self) -> u64 {
        self.plaintext_bytes
    }

    pub fn finish(self) -> Result<u64, FormatError> {
        if self.done && self.buf.is_empty() {
            Ok(self.plaintext_bytes)
        } else {
            Err(FormatError::Truncated)
        }
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

/// A failed [`Opener::push`]: the stream's fault, or the sink's.
#[derive(Debug)]
pub enum OpenError<E> {
    Format(FormatError),
    Sink(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(chunk: u32) -> Header {
        Header {
            format: FORMAT,
            cluster: "lab".into(),
            tier: "consul".into(),
            node: "hs-consul000000".into(),
            created_unix: 1,
            index: 42,
            chunk_size: chunk,
            cipher: CIPHER.into(),
            kek_id: "https://kv/keys/snapshot-wrap/1".into(),
            wrap_alg: WRAP_ALG.into(),
            wrapped_key: "d3JhcHBlZA==".into(),
        }
    }

    fn seal_all(key: &DataKey, h: &Header, data: &[u8], slice: usize) -> Vec<u8> {
        let (mut s, mut out) = Sealer::new(key, h).unwrap();
        for part in data.chunks(slice.max(1)) {
            s.push(part, &mut out).unwrap();
        }
        assert_eq!(s.finish(&mut out).unwrap(), data.len() as u64);
        out
    }

    fn open_all(key: &DataKey, stream: &[u8], slice: usize) -> Result<Vec<u8>, FormatError> {
        let (h, at) = parse_header(stream)?.ok_or(FormatError::Truncated)?;
        let mut o = Opener::new(key, &h, &stream[..at])?;
        let mut plain = Vec::new();
        for part in stream[at..].chunks(slice.max(1)) {
            match o.push(part, &mut |p: &[u8]| {
                plain.extend_from_slice(p);
                Ok::<(), ()>(())
            }) {
                Ok(()) => {}
                Err(OpenError::Format(e)) => return Err(e),
                Err(OpenError::Sink(())) => unreachable!(),
            }
        }
        o.finish()?;
        Ok(plain)
    }

    /// A deterministic pseudo-random byte string (xorshift), reproducible from its seed.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn round_trips_at_every_boundary_and_slicing() {
        let key = DataKey::generate();
        let chunk = 16u32;
        for n in [0usize, 1, 15, 16, 17, 32, 33, 100] {
            let data = bytes(n as u64 + 7, n);
            for slice in [1usize, 3, 16, 1000] {
                let s = seal_all(&key, &header(chunk), &data, slice);
                for read in [1usize, 5, 21, 4096] {
                    assert_eq!(
                        open_all(&key, &s, read).unwrap(),
                        data,
                        "n={n} slice={slice} read={read}"
                    );
                }
            }
        }
    }

    #[test]
    fn tampering_truncation_and_trailing_bytes_are_refused() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        println!("seed {seed}");
        let key = DataKey::generate();
        let data = bytes(seed, 100);
        let s = seal_all(&key, &header(16), &data, 7);
        let (_, at) = parse_header(&s).unwrap().unwrap();
        // Every single-bit flip anywhere in the stream is caught (header: by parse or by every frame's AAD).
        let mut x = seed;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pos = (x >> 33) as usize % s.len();
            let mut bad = s.clone();
            bad[pos] ^= 1 << ((x >> 20) % 8);
            assert!(
                open_all(&key, &bad, 9).is_err(),
                "flip at {pos} (seed {seed})"
            );
        }
        // Cut anywhere: truncated (at a frame boundary too).
        for cut in [at, at + 1, at + 20, s.len() - 1, s.len() - 36] {
            assert!(open_all(&key, &s[..cut], 4096).is_err(), "cut at {cut}");
        }
        let frame = 4 + 16 + 16;
        assert_eq!(
            open_all(&key, &s[..at + 2 * frame], 4096).unwrap_err(),
            FormatError::Truncated
        );
        // Bytes after the final frame.
        let mut long = s.clone();
        long.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            open_all(&key, &long, 4096).unwrap_err(),
            FormatError::Trailing
        );
        // Frames swapped.
        let mut swapped = s[..at].to_vec();
        swapped.extend_from_slice(&s[at + frame..at + 2 * frame]);
        swapped.extend_from_slice(&s[at..at + frame]);
        swapped.extend_from_slice(&s[at + 2 * frame..]);
        assert_eq!(
            open_all(&key, &swapped, 4096).unwrap_err(),
            FormatError::Frame(0)
        );
        // Another key.
        assert_eq!(
            open_all(&DataKey::generate(), &s, 4096).unwrap_err(),
            FormatError::Frame(0)
        );
        // A header rewritten (another tier) with valid JSON: every frame refuses it.
        let mut h = parse_header(&s).unwrap().unwrap().0;
        h.tier = "vault".into();
        let mut moved = encode_header(&h);
        moved.extend_from_slice(&s[at..]);
        assert_eq!(
            open_all(&key, &moved, 4096).unwrap_err(),
            FormatError::Frame(0)
        );
        // Not a snapshot at all.
        assert_eq!(
            parse_header(b"{\"not\": 1}").unwrap_err(),
            FormatError::Magic
        );
        assert_eq!(parse_header(&MAGIC[..3]).unwrap(), None);
    }
}
