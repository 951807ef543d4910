//! The vault key and the keys derived from it. A site's vault key is a 256-bit secret shared
//! by its nodes; nothing is ever keyed with it directly. Each use gets its own key through
//! BLAKE3's key derivation with a fixed context string, so the chunk-id key, which partners
//! indirectly learn about by seeing ids, is unrelated to the encryption key.

use std::fmt;

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

use crate::ids::ChunkId;

const CONTEXT_CHUNK_ID: &str = "cairn 2026-11 chunk id v1";
const CONTEXT_SEAL: &str = "cairn 2026-11 seal v1";

/// A site's vault key. Debug output never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct VaultKey([u8; 32]);

impl VaultKey {
    pub fn from_bytes(bytes: [u8; 32]) -> VaultKey {
        VaultKey(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// The keys a node needs to name, seal and open chunks.
    pub fn derive(&self) -> VaultKeys {
        let id_key = blake3::derive_key(CONTEXT_CHUNK_ID, &self.0);
        let seal_key = blake3::derive_key(CONTEXT_SEAL, &self.0);
        VaultKeys {
            id_key,
            cipher: XChaCha20Poly1305::new(&seal_key.into()),
        }
    }
}

impl fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultKey(..)")
    }
}

/// Keys derived from a vault key: cheap to share between threads by reference.
#[derive(Clone)]
pub struct VaultKeys {
    id_key: [u8; 32],
    pub(crate) cipher: XChaCha20Poly1305,
}

impl VaultKeys {
    /// A chunk's id: BLAKE3 keyed with a secret derived from the vault key, so a partner
    /// that holds chunks cannot test whether a known file is among them.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        let mut hasher = blake3::Hasher::new_keyed(&self.id_key);
        // Large chunks hash faster split across SIMD lanes; update_rayon is not used because
        // the caller already runs one chunk per core.
        hasher.update(plaintext);
        ChunkId(*hasher.finalize().as_bytes())
    }
}

impl fmt::Debug for VaultKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultKeys(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_depend_on_the_vault_key() {
        let a = VaultKey::from_bytes([1; 32]).derive();
        let b = VaultKey::from_bytes([2; 32]).derive();
        assert_eq!(a.chunk_id(b"office"), a.chunk_id(b"office"));
        assert_ne!(a.chunk_id(b"office"), b.chunk_id(b"office"));
        // Not the plain (unkeyed) BLAKE3 hash either.
        assert_ne!(a.chunk_id(b"office").0, *blake3::hash(b"office").as_bytes());
    }

    #[test]
    fn debug_hides_key_bytes() {
        let key = VaultKey::from_bytes([0xab; 32]);
        assert!(!format!("{key:?}").contains("ab"));
    }
}
