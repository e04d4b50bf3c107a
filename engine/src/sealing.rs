//! Encryption at rest: every block an encrypted volume stores is sealed with AES-256-GCM.
//!
//! ```text
//! sealed block: nonce (12 random bytes) · ciphertext of the payload · tag (16 bytes)
//! key: HMAC-SHA256(block key, "bucketdisk chunk key v1" · volume tag u64 · chunk id u64)
//! associated data: "bucketdisk block v1" · volume tag u64 · chunk id u64 · offset u64
//!                  · block number u64                                          (all LE)
//! ```
//!
//! The payload sealed is what a plain volume stores (the block's LZ4 encoding, or the raw block),
//! so compression still pays. The associated data binds a sealed block to the place it was
//! written and to the block of the disk it holds: the same bytes at another offset, in another
//! chunk or another volume's chunk do not authenticate, nor does a block map row pointing one
//! block at another's stored bytes, so a block moved or swapped in the store or in the map is an
//! error, never data. The key the
//! user holds never reaches the store; the volume records a random salt and a check value made
//! from it, so a wrong key is told apart at open instead of as a stream of I/O errors.
//!
//! One block key (derived from the user's key) serves every volume sharing that key, so a clone
//! reads its parent's chunks. Each chunk's blocks are sealed under a key of their own derived
//! from it, the volume and the chunk id (never reused): a random 96-bit nonce is then drawn at
//! most a few thousand times per key, far inside NIST SP 800-38D's bound of 2³² per key, however
//! much is written.

use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use openssl::symm::{Cipher, Crypter, Mode};
use serde::{Deserialize, Serialize};

/// Bytes a sealed block has beyond its payload: the nonce and the tag.
pub const SEAL_OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;
const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
const KEY_BYTES: usize = 32;
/// The cipher name `volume.json` records (the only one so far).
pub const CIPHER: &str = "aes-256-gcm";
/// The environment variable a key may be given in (64 hex digits).
pub const KEY_ENV: &str = "BUCKETDISK_KEY";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "a key is 32 bytes: 64 hex digits or 32 raw bytes (e.g. `openssl rand -hex 32`), not {0}"
    )]
    Malformed(String),
    #[error("volume {volume} is encrypted: give its key with --key-file FILE or {KEY_ENV}")]
    Missing { volume: String },
    #[error("volume {volume} is encrypted with another key than the one given")]
    Wrong { volume: String },
    #[error("volume {volume} is encrypted with {cipher}, which this version cannot read")]
    UnknownCipher { volume: String, cipher: String },
    #[error("encryption: {0}")]
    Crypto(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("a sealed block of {0} bytes is shorter than its nonce and tag")]
    TooShort(usize),
    #[error(
        "the block does not authenticate: damaged, moved from elsewhere, or sealed with another key"
    )]
    NotAuthentic,
    #[error("encryption: {0}")]
    Crypto(String),
}

fn crypto(e: openssl::error::ErrorStack) -> SealError {
    SealError::Crypto(e.to_string())
}

fn key_crypto(e: openssl::error::ErrorStack) -> KeyError {
    KeyError::Crypto(e.to_string())
}

/// The key a user gives for encrypted volumes. Zeroed when dropped; never printed.
pub struct VolumeKey([u8; KEY_BYTES]);

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(redacted)")
    }
}

impl VolumeKey {
    /// A key as a key file holds it: 64 hex digits (surrounding whitespace ignored) or exactly
    /// 32 raw bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(bytes).map(str::trim).ok();
        if let Some(hex) = text.filter(|t| t.len() == 2 * KEY_BYTES) {
            return Self::from_hex(hex);
        }
        let raw: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| KeyError::Malformed(format!("{} bytes", bytes.len())))?;
        // 32 random bytes are all printable once in 10¹⁴: this is a passphrase, which the
        // check value in the bucket would let anyone guess at offline.
        if raw.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            return Err(KeyError::Malformed(
                "32 printable characters (a passphrase)".into(),
            ));
        }
        Ok(VolumeKey(raw))
    }

    /// [`Self::parse`] of a key file's bytes, which are wiped once read.
    pub fn from_file_bytes(mut bytes: Vec<u8>) -> Result<Self, KeyError> {
        let key = Self::parse(&bytes);
        wipe(&mut bytes);
        key
    }

    /// A key as 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, KeyError> {
        let hex = hex.trim();
        if hex.len() != 2 * KEY_BYTES {
            return Err(KeyError::Malformed(format!("{} characters", hex.len())));
        }
        let mut bytes = crate::hex::decode(hex.as_bytes())
            .ok_or_else(|| KeyError::Malformed("a non-hex digit".into()))?;
        let mut key = [0u8; KEY_BYTES];
        key.copy_from_slice(&bytes);
        wipe(&mut bytes);
        Ok(VolumeKey(key))
    }

    /// A pseudo-random key for `purpose` (HKDF-SHA256 with one output block).
    fn derive(&self, purpose: &[u8]) -> Result<[u8; KEY_BYTES], KeyError> {
        let mut prk = hmac(b"bucketdisk v1", &self.0).map_err(key_crypto)?;
        let mut info = purpose.to_vec();
        info.push(1);
        let key = hmac(&prk, &info).map_err(key_crypto);
        wipe(&mut prk);
        key
    }
}

impl Drop for VolumeKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Result<[u8; 32], openssl::error::ErrorStack> {
    let key = PKey::hmac(key)?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key)?;
    signer.update(data)?;
    let mut out = [0u8; 32];
    signer.sign(&mut out)?;
    Ok(out)
}

/// Overwrites key material before its memory is let go (not optimised away).
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

/// What `volume.json` records of an encrypted volume: never the key, only what tells a right
/// key from a wrong one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub cipher: String,
    /// Random, per volume (a clone keeps its source's): makes the check value say nothing about
    /// whether two volumes share a key.
    pub salt: String,
    /// HMAC of the salt under a key derived from the user's key (128 bits, hex).
    pub key_check: String,
}

impl Encryption {
    /// A new volume's record for `key`.
    pub fn new(key: &VolumeKey) -> Result<Self, KeyError> {
        let salt = crate::metadata::random_id().map_err(|e| KeyError::Crypto(e.to_string()))?;
        let key_check = Self::check_value(key, &salt)?;
        Ok(Encryption {
            cipher: CIPHER.to_string(),
            salt,
            key_check,
        })
    }

    fn check_value(key: &VolumeKey, salt: &str) -> Result<String, KeyError> {
        let check_key = key.derive(b"key check")?;
        let mac = hmac(&check_key, salt.as_bytes()).map_err(key_crypto)?;
        Ok(crate::hex::encode(&mac[..16]))
    }

    /// The sealer of volume `volume`'s blocks, if `key` is the key this record was made with.
    pub fn sealer(&self, volume: &str, key: Option<&VolumeKey>) -> Result<BlockSealer, KeyError> {
        if self.cipher != CIPHER {
            return Err(KeyError::UnknownCipher {
                volume: volume.to_string(),
                cipher: self.cipher.clone(),
            });
        }
        let key = key.ok_or_else(|| KeyError::Missing {
            volume: volume.to_string(),
        })?;
        let given = Self::check_value(key, &self.salt)?;
        // Both are public values (the check is stored in the bucket): no timing to hide.
        if given != self.key_check {
            return Err(KeyError::Wrong {
                volume: volume.to_string(),
            });
        }
        Ok(BlockSealer {
            key: key.derive(b"block key")?,
        })
    }
}

/// Seals and opens the blocks of the volumes sharing one user key. Its key is zeroed on drop.
pub struct BlockSealer {
    key: [u8; KEY_BYTES],
}

impl Drop for BlockSealer {
    fn drop(&mut self) {
        wipe(&mut self.key);
    }
}

impl BlockSealer {
    /// The seal of chunk `chunk`, written by the volume tagged `volume` (see
    /// `ChunkStore::owner_of`): its key derived once for all the chunk's blocks.
    pub fn for_chunk(&self, volume: u64, chunk: u64) -> Result<ChunkSeal, SealError> {
        let mut info = [0u8; 39];
        info[..23].copy_from_slice(b"bucketdisk chunk key v1");
        info[23..31].copy_from_slice(&volume.to_le_bytes());
        info[31..39].copy_from_slice(&chunk.to_le_bytes());
        Ok(ChunkSeal {
            key: hmac(&self.key, &info).map_err(crypto)?,
            volume,
            chunk,
        })
    }
}

/// Where a sealed block belongs: the block of the disk it holds and its offset in its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub block: u64,
    pub offset: u64,
}

/// Seals and opens the blocks of one chunk: its key, and the place its blocks' associated data
/// binds them to. Its key is zeroed on drop.
pub struct ChunkSeal {
    key: [u8; KEY_BYTES],
    volume: u64,
    chunk: u64,
}

impl Drop for ChunkSeal {
    fn drop(&mut self) {
        wipe(&mut self.key);
    }
}

impl ChunkSeal {
    /// What binds a block to its place: this chunk (of its volume), its offset in it and the
    /// block of the disk it holds.
    fn associated_data(&self, place: Place) -> [u8; 51] {
        let mut ad = [0u8; 51];
        ad[..19].copy_from_slice(b"bucketdisk block v1");
        ad[19..27].copy_from_slice(&self.volume.to_le_bytes());
        ad[27..35].copy_from_slice(&self.chunk.to_le_bytes());
        ad[35..43].copy_from_slice(&place.offset.to_le_bytes());
        ad[43..51].copy_from_slice(&place.block.to_le_bytes());
        ad
    }

    /// Appends `payload`, sealed for `place` in this chunk, to `out`.
    pub fn seal_into(
        &self,
        place: Place,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let mut nonce = [0u8; NONCE_BYTES];
        openssl::rand::rand_bytes(&mut nonce).map_err(crypto)?;
        let cipher = Cipher::aes_256_gcm();
        let mut crypter =
            Crypter::new(cipher, Mode::Encrypt, &self.key, Some(&nonce)).map_err(crypto)?;
        crypter
            .aad_update(&self.associated_data(place))
            .map_err(crypto)?;
        out.extend_from_slice(&nonce);
        let start = out.len();
        // OpenSSL asks for a block of slack past the input (GCM writes exactly the input).
        out.resize(start + payload.len() + cipher.block_size(), 0);
        let mut written = crypter.update(payload, &mut out[start..]).map_err(crypto)?;
        written += crypter
            .finalize(&mut out[start + written..])
            .map_err(crypto)?;
        out.truncate(start + written);
        let mut tag = [0u8; TAG_BYTES];
        crypter.get_tag(&mut tag).map_err(crypto)?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// The payload of a block sealed for `place` in this chunk, written into `out` (cleared
    /// first); an error if it does not authenticate.
    pub fn open_into(
        &self,
        place: Place,
        sealed: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::TooShort(sealed.len()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_BYTES);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_BYTES);
        let cipher = Cipher::aes_256_gcm();
        let mut crypter =
            Crypter::new(cipher, Mode::Decrypt, &self.key, Some(nonce)).map_err(crypto)?;
        crypter
            .aad_update(&self.associated_data(place))
            .map_err(crypto)?;
        crypter.set_tag(tag).map_err(crypto)?;
        out.clear();
        out.resize(ciphertext.len() + cipher.block_size(), 0);
        let mut written = crypter.update(ciphertext, out).map_err(crypto)?;
        match crypter.finalize(&mut out[written..]) {
            Ok(last) => written += last,
            Err(_) => {
                // What was decrypted did not authenticate: none of it may be used.
                out.clear();
                return Err(SealError::NotAuthentic);
            }
        }
        out.truncate(written);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> VolumeKey {
        VolumeKey([byte; KEY_BYTES])
    }

    #[test]
    fn a_block_opens_only_where_and_with_the_key_it_was_sealed() {
        let record = Encryption::new(&key(7)).expect("record");
        let sealer = record.sealer("v", Some(&key(7))).expect("sealer");
        let chunk = sealer.for_chunk(1, 2).expect("chunk seal");
        let at = |block, offset| Place { block, offset };
        let mut sealed = Vec::new();
        chunk
            .seal_into(at(4, 8), b"secret block", &mut sealed)
            .expect("seal");
        assert_eq!(sealed.len(), 12 + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let mut out = Vec::new();
        chunk.open_into(at(4, 8), &sealed, &mut out).expect("open");
        assert_eq!(out, b"secret block");
        // Moved: another offset, chunk or volume, or taken for another block of the disk.
        let other_chunk = sealer.for_chunk(1, 3).expect("chunk seal");
        let other_volume = sealer.for_chunk(5, 2).expect("chunk seal");
        for (seal, place) in [
            (&chunk, at(4, 9)),
            (&chunk, at(5, 8)),
            (&other_chunk, at(4, 8)),
            (&other_volume, at(4, 8)),
        ] {
            assert_eq!(
                seal.open_into(place, &sealed, &mut out),
                Err(SealError::NotAuthentic)
            );
        }
        // A flipped byte anywhere: nonce, ciphertext or tag.
        for byte in [0, 14, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[byte] ^= 0x20;
            assert_eq!(
                chunk.open_into(at(4, 8), &bad, &mut out),
                Err(SealError::NotAuthentic)
            );
        }
        assert_eq!(
            chunk.open_into(at(4, 8), &sealed[..20], &mut out),
            Err(SealError::TooShort(20))
        );
        // The same plaintext twice seals differently (a fresh nonce each time).
        let mut again = Vec::new();
        chunk
            .seal_into(at(4, 8), b"secret block", &mut again)
            .expect("seal");
        assert_ne!(again, sealed);
    }

    #[test]
    fn a_wrong_or_missing_key_is_told_at_open() {
        let record = Encryption::new(&key(7)).expect("record");
        assert_eq!(
            record.sealer("v", Some(&key(8))).err(),
            Some(KeyError::Wrong { volume: "v".into() })
        );
        assert_eq!(
            record.sealer("v", None).err(),
            Some(KeyError::Missing { volume: "v".into() })
        );
        let other = Encryption::new(&key(7)).expect("record");
        assert_ne!(other.key_check, record.key_check, "salted per volume");
        let unknown = Encryption {
            cipher: "rot13".into(),
            ..record
        };
        assert!(matches!(
            unknown.sealer("v", Some(&key(7))),
            Err(KeyError::UnknownCipher { .. })
        ));
    }

    #[test]
    fn keys_parse_from_hex_or_raw_bytes() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        assert_eq!(VolumeKey::parse(hex.as_bytes()).expect("hex").0[1], 0x11);
        assert_eq!(VolumeKey::parse(&[9u8; 32]).expect("raw").0, [9u8; 32]);
        assert!(VolumeKey::parse(b"short").is_err());
        assert!(VolumeKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(VolumeKey::parse(&[0u8; 33]).is_err());
        assert!(
            VolumeKey::parse(b"correct horse battery staple 123").is_err(),
            "a passphrase is not a key"
        );
    }
}
