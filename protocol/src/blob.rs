//! Blobs: a sealed chunk as the mesh carries it, signed by the site that owns it, so a
//! holder with no vault key can still tell a good copy from a forged or rotted one.
//!
//! Blob format, version 1 (the version is in the signing context):
//!
//! ```text
//! sealed bytes | [64] ed25519 signature by the owner site's key over
//!                     BLOB_CONTEXT | [32] chunk id | [32] blake3(sealed bytes)
//! ```
//!
//! A site id is the site's public key, so anyone who knows a chunk's owner and id checks
//! its blob with `verify_blob`. Signatures are deterministic (ed25519), so every honest
//! copy of one chunk is the same bytes. A later format changes the context string; a
//! reader then tries each context it knows.
//!
//! `audit_proof` is what a holder answers an audit with: a hash over a fresh nonce and
//! the sealed bytes, which only a node holding those bytes can compute.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signature, SigningKey, Verifier, VerifyingKey};

use crate::identity::{sign, SiteId};
use crate::ids::ChunkId;
use crate::memo::VerifiedMemo;

/// What a blob's signature is over, before the chunk id and the hash of the sealed bytes.
pub const BLOB_CONTEXT: &[u8] = b"cairn chunk v1";
pub const BLOB_SIGNATURE_BYTES: usize = 64;
/// The largest blob: the largest sealed chunk and its signature.
pub const BLOB_BYTES_MAX: usize = crate::seal::SEALED_BYTES_MAX + BLOB_SIGNATURE_BYTES;
const AUDIT_CONTEXT: &str = "cairn 2026-11 audit proof v1";

fn signed_message(id: &ChunkId, sealed: &[u8]) -> [u8; 64] {
    let mut message = [0u8; 64];
    message[..32].copy_from_slice(&id.0);
    message[32..].copy_from_slice(blake3::hash(sealed).as_bytes());
    message
}

/// The blob of a sealed chunk: the sealed bytes followed by the owner site's signature.
pub fn sign_blob(site_key: &SigningKey, id: &ChunkId, sealed: &[u8]) -> Vec<u8> {
    assert!(
        sealed.len() <= crate::seal::SEALED_BYTES_MAX,
        "callers seal bounded chunks"
    );
    let signature = sign(site_key, BLOB_CONTEXT, &signed_message(id, sealed));
    let mut blob = Vec::with_capacity(sealed.len() + BLOB_SIGNATURE_BYTES);
    blob.extend_from_slice(sealed);
    blob.extend_from_slice(&signature);
    debug_assert_eq!(
        verify_blob(&SiteId(site_key.verifying_key().to_bytes()), id, &blob),
        Some(sealed)
    );
    blob
}

/// The sealed bytes of `blob` when `owner` signed them as chunk `id`; `None` for anything
/// else (too short, too long, altered, another chunk's, another site's).
pub fn verify_blob<'a>(owner: &SiteId, id: &ChunkId, blob: &'a [u8]) -> Option<&'a [u8]> {
    if blob.len() < BLOB_SIGNATURE_BYTES || blob.len() > BLOB_BYTES_MAX {
        return None;
    }
    let (sealed, signature) = blob.split_at(blob.len() - BLOB_SIGNATURE_BYTES);
    let signature: &[u8; 64] = signature.try_into().expect("split at 64 from the end");
    owner
        .verifies(BLOB_CONTEXT, &signed_message(id, sealed), signature)
        .then_some(sealed)
}

/// Blobs a `BlobVerifier` remembers having verified.
pub const VERIFIED_BLOBS_MAX: usize = 8192;
/// Owner keys a `BlobVerifier` keeps decompressed.
pub const OWNER_KEYS_MAX: usize = 1024;

/// `verify_blob` for a node that checks the same blobs again and again (read before
/// each push, audit and scrub): it keeps owners' keys decompressed and remembers the
/// last `VERIFIED_BLOBS_MAX` blobs that verified, by a hash over the owner, the id, the
/// hash of the sealed bytes and the signature. Signature checking is a pure function of
/// those, so a remembered blob needs no second check; its sealed bytes are still hashed
/// every time, so rot is still found.
pub struct BlobVerifier {
    keys: BTreeMap<SiteId, Option<VerifyingKey>>,
    verified: Verified,
}

/// A memo of verified blobs that many verifiers share: every engine of one simulated
/// mesh checks the same blobs (each copy of a chunk is the same bytes), and a check is a
/// pure function of them, so one check serves them all.
pub type SharedBlobMemo = Arc<Mutex<VerifiedMemo>>;

enum Verified {
    Own(VerifiedMemo),
    Shared(SharedBlobMemo),
}

impl Verified {
    fn contains(&self, memo: &[u8; 32]) -> bool {
        match self {
            Verified::Own(own) => own.contains(memo),
            Verified::Shared(shared) => shared
                .lock()
                .expect("no verifier panics holding the memo")
                .contains(memo),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Verified::Own(own) => own.len(),
            Verified::Shared(shared) => shared.lock().expect("not poisoned").len(),
        }
    }

    fn insert(&mut self, memo: [u8; 32]) {
        match self {
            Verified::Own(own) => own.insert(memo),
            Verified::Shared(shared) => shared
                .lock()
                .expect("no verifier panics holding the memo")
                .insert(memo),
        }
    }
}

impl Default for BlobVerifier {
    fn default() -> BlobVerifier {
        BlobVerifier::remembering(VERIFIED_BLOBS_MAX)
    }
}

impl BlobVerifier {
    fn remembering(verified_max: usize) -> BlobVerifier {
        BlobVerifier {
            keys: BTreeMap::new(),
            verified: Verified::Own(VerifiedMemo::remembering(verified_max)),
        }
    }

    /// A verifier that remembers in `memo`, with every other verifier given it.
    pub fn sharing(memo: SharedBlobMemo) -> BlobVerifier {
        BlobVerifier {
            keys: BTreeMap::new(),
            verified: Verified::Shared(memo),
        }
    }

    /// The same answer as `verify_blob`, usually faster.
    pub fn verify<'a>(&mut self, owner: &SiteId, id: &ChunkId, blob: &'a [u8]) -> Option<&'a [u8]> {
        if blob.len() < BLOB_SIGNATURE_BYTES || blob.len() > BLOB_BYTES_MAX {
            return None;
        }
        let (sealed, signature) = blob.split_at(blob.len() - BLOB_SIGNATURE_BYTES);
        let message = signed_message(id, sealed);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&owner.0);
        hasher.update(&message);
        hasher.update(signature);
        let memo = *hasher.finalize().as_bytes();
        if self.verified.contains(&memo) {
            return Some(sealed);
        }
        if !self.keys.contains_key(owner) && self.keys.len() >= OWNER_KEYS_MAX {
            self.keys.clear();
        }
        let key = self
            .keys
            .entry(*owner)
            .or_insert_with(|| VerifyingKey::from_bytes(&owner.0).ok())
            .as_ref()?;
        let signature = Signature::from_bytes(signature.try_into().expect("split at 64"));
        key.verify(&[BLOB_CONTEXT, &message[..]].concat(), &signature)
            .ok()?;
        self.verified.insert(memo);
        Some(sealed)
    }
}

/// A holder's answer to an audit of chunk `id` with `nonce`: only computable from the
/// sealed bytes themselves, and different for every nonce.
pub fn audit_proof(nonce: &[u8; 32], id: &ChunkId, sealed: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(AUDIT_CONTEXT);
    hasher.update(nonce);
    hasher.update(&id.0);
    hasher.update(sealed);
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn site(key: &SigningKey) -> SiteId {
        SiteId(key.verifying_key().to_bytes())
    }

    #[test]
    fn a_signed_blob_verifies_and_gives_back_the_sealed_bytes() {
        let id = ChunkId([7; 32]);
        let sealed = b"sealed bytes of a chunk".to_vec();
        let blob = sign_blob(&key(1), &id, &sealed);
        assert_eq!(blob.len(), sealed.len() + BLOB_SIGNATURE_BYTES);
        assert_eq!(verify_blob(&site(&key(1)), &id, &blob), Some(&sealed[..]));
        // Deterministic: every honest copy of a chunk is the same bytes.
        assert_eq!(sign_blob(&key(1), &id, &sealed), blob);
        // An empty sealed part is still a blob (the signature covers it).
        let empty = sign_blob(&key(1), &id, &[]);
        assert_eq!(verify_blob(&site(&key(1)), &id, &empty), Some(&[][..]));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let (id, owner) = (ChunkId([3; 32]), site(&key(2)));
        let blob = sign_blob(&key(2), &id, b"0123456789abcdef");
        for bit in 0..blob.len() * 8 {
            let mut bad = blob.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(verify_blob(&owner, &id, &bad), None, "bit {bit} flipped");
        }
    }

    #[test]
    fn another_id_owner_or_length_is_refused() {
        let (id, owner) = (ChunkId([3; 32]), site(&key(2)));
        let blob = sign_blob(&key(2), &id, b"0123456789abcdef");
        assert_eq!(verify_blob(&owner, &ChunkId([4; 32]), &blob), None);
        assert_eq!(verify_blob(&site(&key(5)), &id, &blob), None);
        assert_eq!(verify_blob(&owner, &id, &blob[..blob.len() - 1]), None);
        assert_eq!(verify_blob(&owner, &id, &blob[1..]), None);
        let mut longer = blob.clone();
        longer.insert(0, 0);
        assert_eq!(verify_blob(&owner, &id, &longer), None);
        assert_eq!(verify_blob(&owner, &id, &[]), None);
        assert_eq!(verify_blob(&owner, &id, &blob[blob.len() - 64..]), None);
        // Signed by another site in the owner's name.
        let forged = sign_blob(&key(9), &id, b"0123456789abcdef");
        assert_eq!(verify_blob(&owner, &id, &forged), None);
    }

    #[test]
    fn audit_proofs_depend_on_nonce_id_and_every_byte() {
        let (id, sealed) = (ChunkId([1; 32]), vec![5u8; 100]);
        let proof = audit_proof(&[0; 32], &id, &sealed);
        assert_eq!(audit_proof(&[0; 32], &id, &sealed), proof);
        assert_ne!(audit_proof(&[1; 32], &id, &sealed), proof);
        assert_ne!(audit_proof(&[0; 32], &ChunkId([2; 32]), &sealed), proof);
        let mut rotted = sealed.clone();
        rotted[99] ^= 1;
        assert_ne!(audit_proof(&[0; 32], &id, &rotted), proof);
    }

    #[test]
    fn verifiers_sharing_a_memo_check_a_blob_once_and_still_refuse_altered_ones() {
        let (id, owner) = (ChunkId([3; 32]), site(&key(2)));
        let blob = sign_blob(&key(2), &id, b"0123456789abcdef");
        let memo: SharedBlobMemo = Arc::new(Mutex::new(VerifiedMemo::remembering(16)));
        let mut first = BlobVerifier::sharing(memo.clone());
        let mut second = BlobVerifier::sharing(memo.clone());
        assert_eq!(
            first.verify(&owner, &id, &blob),
            Some(&b"0123456789abcdef"[..])
        );
        assert_eq!(memo.lock().expect("not poisoned").len(), 1);
        assert_eq!(
            second.verify(&owner, &id, &blob),
            Some(&b"0123456789abcdef"[..])
        );
        assert_eq!(memo.lock().expect("not poisoned").len(), 1, "checked once");
        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert_eq!(second.verify(&owner, &id, &bad), None);
        assert_eq!(first.verify(&site(&key(5)), &id, &blob), None);
        assert_eq!(
            memo.lock().expect("not poisoned").len(),
            1,
            "failures are not kept"
        );
    }

    #[test]
    fn the_remembering_verifier_agrees_with_verify_blob() {
        let (id, owner) = (ChunkId([3; 32]), site(&key(2)));
        let blob = sign_blob(&key(2), &id, b"0123456789abcdef");
        let mut verifier = BlobVerifier::default();
        for _ in 0..2 {
            assert_eq!(
                verifier.verify(&owner, &id, &blob),
                Some(&b"0123456789abcdef"[..])
            );
            // Having seen the good blob, it still refuses every altered one.
            for bit in 0..blob.len() * 8 {
                let mut bad = blob.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(
                    verifier.verify(&owner, &id, &bad),
                    None,
                    "bit {bit} flipped"
                );
            }
            assert_eq!(verifier.verify(&owner, &ChunkId([4; 32]), &blob), None);
            assert_eq!(verifier.verify(&site(&key(5)), &id, &blob), None);
            assert_eq!(verifier.verify(&SiteId([0xff; 32]), &id, &blob), None);
        }
    }

    #[test]
    fn the_remembering_verifier_forgets_the_oldest_and_stays_right() {
        let owner = site(&key(2));
        let mut verifier = BlobVerifier::remembering(2);
        let blobs: Vec<(ChunkId, Vec<u8>)> = (0..3u8)
            .map(|i| {
                (
                    ChunkId([i; 32]),
                    sign_blob(&key(2), &ChunkId([i; 32]), &[i; 8]),
                )
            })
            .collect();
        for (id, blob) in blobs.iter().chain(&blobs) {
            assert_eq!(verifier.verify(&owner, id, blob), Some(&blob[..8]));
            assert!(verifier.verified.len() <= 2);
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_verify(bytes in prop::collection::vec(any::<u8>(), 0..200), seed: u8) {
            prop_assert_eq!(verify_blob(&site(&key(seed)), &ChunkId([0; 32]), &bytes), None);
        }

        #[test]
        fn blobs_round_trip(sealed in prop::collection::vec(any::<u8>(), 0..300), id: [u8; 32], seed: u8) {
            let blob = sign_blob(&key(seed), &ChunkId(id), &sealed);
            prop_assert_eq!(verify_blob(&site(&key(seed)), &ChunkId(id), &blob), Some(&sealed[..]));
        }
    }
}
