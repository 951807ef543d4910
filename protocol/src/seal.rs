//! Sealing: a chunk's plaintext is compressed with zstd (kept raw when that does not
//! shrink it), then encrypted with XChaCha20-Poly1305 under the vault's seal key.
//!
//! Sealed format, version 1:
//!
//! ```text
//! [0]      SEAL_VERSION (1)
//! [1]      compression: 0 = raw, 1 = zstd
//! [2..26]  nonce (24 random bytes chosen by the caller)
//! [26..]   ciphertext, then the 16-byte Poly1305 tag
//! ```
//!
//! The associated data is the two header bytes followed by the chunk id, so a sealed chunk
//! moved under another id, or with its header edited, fails to open. After decryption the
//! plaintext is hashed again and must match the id: a chunk opens only as what it claims.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::XNonce;
use thiserror::Error;

use crate::chunk::CHUNK_BYTES_MAX;
use crate::ids::ChunkId;
use crate::keys::VaultKeys;

pub const SEAL_VERSION: u8 = 1;
pub const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const HEADER_BYTES: usize = 2 + NONCE_BYTES;
/// Bytes a sealed chunk adds to its (compressed) body.
pub const SEAL_OVERHEAD_BYTES: usize = HEADER_BYTES + TAG_BYTES;
/// The largest sealed chunk a reader accepts.
pub const SEALED_BYTES_MAX: usize = CHUNK_BYTES_MAX + SEAL_OVERHEAD_BYTES;

const COMPRESSION_RAW: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed chunk is truncated ({n_bytes} bytes)")]
    Truncated { n_bytes: usize },
    #[error("sealed chunk is {n_bytes} bytes, over the limit of {SEALED_BYTES_MAX}")]
    TooLarge { n_bytes: usize },
    #[error("sealed chunk has format version {0}, newer than this build reads ({SEAL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("sealed chunk names unknown compression {0}")]
    UnknownCompression(u8),
    #[error("sealed chunk failed authentication: altered, damaged, or stored under another id")]
    Authentication,
    #[error("sealed chunk does not decompress: {0}")]
    Decompress(String),
    #[error("chunk content does not match its id")]
    IdMismatch,
    #[error("zstd compression failed: {0}")]
    Compress(String),
}

/// Seals chunks. Holds a reusable zstd context, so keep one per thread.
pub struct Sealer {
    compressor: zstd::bulk::Compressor<'static>,
}

impl Sealer {
    pub fn new(zstd_level: i32) -> Result<Sealer, SealError> {
        let compressor = zstd::bulk::Compressor::new(zstd_level)
            .map_err(|e| SealError::Compress(e.to_string()))?;
        Ok(Sealer { compressor })
    }

    /// Seals `plaintext`, whose id the caller has computed with `keys.chunk_id`.
    /// `nonce` must be fresh random bytes; protocol takes randomness as an input.
    pub fn seal(
        &mut self,
        keys: &VaultKeys,
        id: &ChunkId,
        plaintext: &[u8],
        nonce: [u8; NONCE_BYTES],
    ) -> Result<Vec<u8>, SealError> {
        assert!(
            plaintext.len() <= CHUNK_BYTES_MAX,
            "chunker bounds chunk size"
        );
        debug_assert_eq!(keys.chunk_id(plaintext), *id);
        // Room for the worst case up front, so the buffer is never regrown (and doubled).
        let mut sealed = Vec::with_capacity(
            HEADER_BYTES
                + zstd::zstd_safe::compress_bound(plaintext.len()).max(plaintext.len())
                + TAG_BYTES,
        );
        sealed.extend_from_slice(&[SEAL_VERSION, COMPRESSION_ZSTD]);
        sealed.extend_from_slice(&nonce);
        // Compress straight into the output buffer; fall back to raw when it did not shrink.
        sealed.resize(
            HEADER_BYTES + zstd::zstd_safe::compress_bound(plaintext.len()),
            0,
        );
        let n_compressed = self
            .compressor
            .compress_to_buffer(plaintext, &mut sealed[HEADER_BYTES..])
            .map_err(|e| SealError::Compress(e.to_string()))?;
        if n_compressed < plaintext.len() {
            sealed.truncate(HEADER_BYTES + n_compressed);
        } else {
            sealed[1] = COMPRESSION_RAW;
            sealed.truncate(HEADER_BYTES);
            sealed.extend_from_slice(plaintext);
        }
        let aad = associated_data(sealed[0], sealed[1], id);
        let (header, body) = sealed.split_at_mut(HEADER_BYTES);
        let tag = keys
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&header[2..]), &aad, body)
            .expect("XChaCha20-Poly1305 encrypts any length below its 256 GiB limit");
        sealed.extend_from_slice(&tag);
        Ok(sealed)
    }
}

/// Opens sealed chunks. Holds a reusable zstd context, so keep one per thread.
pub struct Opener {
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Opener {
    pub fn new() -> Opener {
        Opener {
            decompressor: zstd::bulk::Decompressor::new()
                .expect("zstd allocates a decompression context"),
        }
    }

    /// Opens a sealed chunk and checks that its content hashes to `id`.
    pub fn open(
        &mut self,
        keys: &VaultKeys,
        id: &ChunkId,
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        if sealed.len() > SEALED_BYTES_MAX {
            return Err(SealError::TooLarge {
                n_bytes: sealed.len(),
            });
        }
        if sealed.len() < SEAL_OVERHEAD_BYTES {
            return Err(SealError::Truncated {
                n_bytes: sealed.len(),
            });
        }
        let (version, compression) = (sealed[0], sealed[1]);
        if version != SEAL_VERSION {
            return Err(SealError::UnsupportedVersion(version));
        }
        if compression != COMPRESSION_RAW && compression != COMPRESSION_ZSTD {
            return Err(SealError::UnknownCompression(compression));
        }
        let nonce = XNonce::from_slice(&sealed[2..HEADER_BYTES]);
        let (body, tag) = sealed[HEADER_BYTES..].split_at(sealed.len() - SEAL_OVERHEAD_BYTES);
        let mut body = body.to_vec();
        keys.cipher
            .decrypt_in_place_detached(
                nonce,
                &associated_data(version, compression, id),
                &mut body,
                tag.into(),
            )
            .map_err(|_| SealError::Authentication)?;
        let plaintext = if compression == COMPRESSION_ZSTD {
            // The frame states its content size; trusting it only up to the chunk bound
            // keeps a hostile frame from making us allocate more.
            let n_bytes = match zstd::zstd_safe::get_frame_content_size(&body) {
                Ok(Some(n_bytes)) if n_bytes <= CHUNK_BYTES_MAX as u64 => n_bytes as usize,
                _ => {
                    return Err(SealError::Decompress(
                        "missing or oversized content size".into(),
                    ))
                }
            };
            let plaintext = self
                .decompressor
                .decompress(&body, n_bytes)
                .map_err(|e| SealError::Decompress(e.to_string()))?;
            if plaintext.len() != n_bytes {
                return Err(SealError::Decompress("content size mismatch".into()));
            }
            plaintext
        } else {
            body
        };
        if keys.chunk_id(&plaintext) != *id {
            return Err(SealError::IdMismatch);
        }
        Ok(plaintext)
    }
}

impl Default for Opener {
    fn default() -> Opener {
        Opener::new()
    }
}

fn associated_data(version: u8, compression: u8, id: &ChunkId) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[0] = version;
    aad[1] = compression;
    aad[2..].copy_from_slice(&id.0);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::VaultKey;
    use proptest::prelude::*;

    fn keys() -> VaultKeys {
        VaultKey::from_bytes([9; 32]).derive()
    }

    fn seal(plaintext: &[u8]) -> (ChunkId, Vec<u8>) {
        let keys = keys();
        let id = keys.chunk_id(plaintext);
        (
            id,
            Sealer::new(3)
                .unwrap()
                .seal(&keys, &id, plaintext, [7; NONCE_BYTES])
                .unwrap(),
        )
    }

    proptest! {
        #[test]
        fn seal_open_round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..20_000), zeros in 0usize..20_000) {
            let mut plaintext = plaintext;
            plaintext.extend(std::iter::repeat_n(0u8, zeros));
            let (id, sealed) = seal(&plaintext);
            prop_assert!(sealed.len() <= plaintext.len() + SEAL_OVERHEAD_BYTES);
            prop_assert_eq!(Opener::new().open(&keys(), &id, &sealed).unwrap(), plaintext);
        }

        #[test]
        fn any_flipped_bit_fails_to_open(plaintext in proptest::collection::vec(any::<u8>(), 1..4_000), bit: usize) {
            let (id, mut sealed) = seal(&plaintext);
            let bit = bit % (sealed.len() * 8);
            sealed[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Opener::new().open(&keys(), &id, &sealed).is_err());
        }

        #[test]
        fn any_truncation_fails_to_open(plaintext in proptest::collection::vec(any::<u8>(), 1..4_000), cut: usize) {
            let (id, sealed) = seal(&plaintext);
            let cut = cut % sealed.len();
            prop_assert!(Opener::new().open(&keys(), &id, &sealed[..cut]).is_err());
        }
    }

    #[test]
    fn compressible_data_shrinks_and_random_data_stays_raw() {
        let text = b"accounting ledger entry\n".repeat(1000);
        let (_, sealed) = seal(&text);
        assert_eq!(sealed[1], COMPRESSION_ZSTD);
        assert!(sealed.len() < text.len() / 10);

        let mut state = 1u32;
        let noise: Vec<u8> = (0..10_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        let (_, sealed) = seal(&noise);
        assert_eq!(sealed[1], COMPRESSION_RAW);
        assert_eq!(sealed.len(), noise.len() + SEAL_OVERHEAD_BYTES);
    }

    #[test]
    fn a_chunk_swapped_under_another_id_fails_authentication() {
        let (_, sealed_a) = seal(b"chunk a");
        let (id_b, _) = seal(b"chunk b");
        assert_eq!(
            Opener::new().open(&keys(), &id_b, &sealed_a),
            Err(SealError::Authentication)
        );
    }

    #[test]
    fn a_chunk_sealed_under_another_vault_fails_authentication() {
        let (id, sealed) = seal(b"payroll");
        let other = VaultKey::from_bytes([10; 32]).derive();
        assert_eq!(
            Opener::new().open(&other, &id, &sealed),
            Err(SealError::Authentication)
        );
    }

    #[test]
    fn newer_versions_are_named() {
        let (id, mut sealed) = seal(b"x");
        sealed[0] = 2;
        assert_eq!(
            Opener::new().open(&keys(), &id, &sealed),
            Err(SealError::UnsupportedVersion(2))
        );
    }
}
