//! Join tokens: how a new machine becomes a node of an existing site by copying text, with
//! no network in between. The new machine shows its node id; a node of the site certifies
//! that id and seals the site key and the vault key to it; the token it prints is useless
//! to anyone but the holder of that node key, so it may travel by mail or chat.
//!
//! Token format, version 1 (text: `cairn-join-` and the base32 of these bytes):
//!
//! ```text
//! u8 JOIN_VERSION | [32] site id | u16 + site name
//! | u16 + node certificate record (signed by the site key, naming the new node)
//! | u16 + wrapped-keys record (empty when the site has none)
//! | u64 expires (unix ms) | [32] ephemeral ed25519 public key | [24] nonce
//! | u16 + sealed keys | [64] ed25519 signature by the site key over JOIN_CONTEXT + all of the above
//! ```
//!
//! Sealed keys: XChaCha20-Poly1305 of site secret key[32] + vault key[32], with every byte
//! before `sealed keys` as associated data, under
//! `derive_key(SEAL_KEY_CONTEXT, shared secret + ephemeral public key + node id)`. The
//! shared secret is X25519 between a fresh ephemeral key and the new node's key, both
//! ed25519 keys taken to Montgomery form (`VerifyingKey::to_montgomery`, with
//! `SigningKey::to_scalar_bytes` as the secret), so the node needs no second key pair.
//! Using one key for signing and for this key agreement is what "On using the same key
//! pair for Ed25519 and an X25519 based KEM" (eprint 2021/509) analyses; the context
//! strings keep the two uses apart.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::{SigningKey, VerifyingKey};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{sign, NodeId, SiteId};
use crate::keys::VaultKey;
use crate::record::{
    get_name, put_name, validate, NodeCert, Record, RecordError, RecordKind, TrustView,
};
use crate::token::{from_text, to_text, TextError};

pub const JOIN_VERSION: u8 = 1;
pub const JOIN_PREFIX: &str = "cairn-join-";
const JOIN_CONTEXT: &[u8] = b"cairn 2026-11 join v1\0";
const SEAL_KEY_CONTEXT: &str = "cairn 2026-11 join seal key v1";
/// Site secret key and vault key, plus the AEAD tag.
const SEALED_KEYS_BYTES: usize = 32 + 32 + 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum JoinTokenError {
    #[error("not a cairn join token (it should start with {JOIN_PREFIX})")]
    NotAJoinToken,
    #[error("not a cairn token: what follows {JOIN_PREFIX} is no join token; copy the whole token again")]
    NotAToken,
    #[error("join token is damaged or truncated")]
    Decode(#[from] DecodeError),
    #[error("join token signature does not verify: it was altered or forged")]
    BadSignature,
    #[error("join token carries a bad record")]
    Record(#[from] RecordError),
    #[error("join token expired {0} minutes ago; run `cairn site add-node` again for a new one")]
    Expired(u64),
    #[error("this join token is sealed to node {token_node}, not to this machine's node {this_node}: ask for a token for this machine's node id")]
    OtherNode {
        token_node: NodeId,
        this_node: NodeId,
    },
    #[error("the keys in this join token do not open with this node's key: it was altered")]
    Unseal,
    #[error("the site key in this join token does not belong to site {0}")]
    SiteKeyMismatch(SiteId),
    #[error("node id {0} is not a usable ed25519 public key: copy it again from `cairn join` on the new machine")]
    BadNodeId(NodeId),
}

/// The keys a join token gives its node.
#[derive(Debug)]
pub struct SiteKeys {
    pub site_key: SigningKey,
    pub vault_key: VaultKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub site: SiteId,
    pub site_name: String,
    /// The signed node certificate, as the catalog keeps it.
    pub node_record: Record,
    /// Its body, decoded: the node the token is for.
    pub node_cert: NodeCert,
    /// The site's wrapped-keys record, so the new node can carry it too.
    pub wrapped_keys: Option<Record>,
    pub expires_unix_ms: u64,
    pub ephemeral: [u8; 32],
    pub nonce: [u8; 24],
    pub sealed: Vec<u8>,
    pub signature: [u8; 64],
}

/// Trusts one site: what a joining node knows before it has a catalog.
struct OnlySite(SiteId);

impl TrustView for OnlySite {
    fn is_trusted(&self, site: &SiteId) -> bool {
        *site == self.0
    }
}

/// The node's key in a form keys can be sealed to: refused when the id is no curve point,
/// or a point of small order (every secret shared with it would be the same).
pub fn node_key(node: &NodeId) -> Result<VerifyingKey, JoinTokenError> {
    VerifyingKey::from_bytes(&node.0)
        .ok()
        .filter(|key| !key.is_weak())
        .ok_or(JoinTokenError::BadNodeId(*node))
}

/// The cipher that seals keys between an ephemeral key and a node key.
fn seal_cipher(shared: [u8; 32], ephemeral: &[u8; 32], node: &NodeId) -> XChaCha20Poly1305 {
    let key = blake3::derive_key(
        SEAL_KEY_CONTEXT,
        &[&shared[..], ephemeral, &node.0].concat(),
    );
    XChaCha20Poly1305::new(&key.into())
}

impl JoinToken {
    /// Seals `site_key` and `vault_key` to the node that `node_record` certifies.
    /// `ephemeral_secret` and `nonce` are fresh random bytes from the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn issue(
        site_key: &SigningKey,
        vault_key: &VaultKey,
        site_name: &str,
        node_record: Record,
        wrapped_keys: Option<Record>,
        expires_unix_ms: u64,
        ephemeral_secret: [u8; 32],
        nonce: [u8; 24],
    ) -> Result<JoinToken, JoinTokenError> {
        let site = SiteId(site_key.verifying_key().to_bytes());
        validate(&node_record, &OnlySite(site)).expect("callers sign the node certificate");
        assert_eq!(node_record.kind, RecordKind::NodeCert);
        let node_cert = NodeCert::decode(&node_record.body).expect("validated above");
        let node = node_key(&node_cert.node)?;
        let ephemeral_key = SigningKey::from_bytes(&ephemeral_secret);
        let shared = node
            .to_montgomery()
            .mul_clamped(ephemeral_key.to_scalar_bytes())
            .to_bytes();
        let mut token = JoinToken {
            site,
            site_name: site_name.to_owned(),
            node_record,
            node_cert,
            wrapped_keys,
            expires_unix_ms,
            ephemeral: ephemeral_key.verifying_key().to_bytes(),
            nonce,
            sealed: Vec::new(),
            signature: [0; 64],
        };
        let plain = [site_key.to_bytes(), *vault_key.as_bytes()].concat();
        token.sealed = seal_cipher(shared, &token.ephemeral, &token.node_cert.node)
            .encrypt(
                XNonce::from_slice(&token.nonce),
                Payload {
                    msg: &plain,
                    aad: &token.header().finish(),
                },
            )
            .expect("XChaCha20-Poly1305 seals 64 bytes");
        token.signature = sign(site_key, JOIN_CONTEXT, &token.unsigned().finish());
        Ok(token)
    }

    /// Every byte before the sealed keys: their associated data.
    fn header(&self) -> Writer {
        let mut w = Writer::default();
        w.u8(JOIN_VERSION);
        w.array(&self.site.0);
        put_name(&mut w, &self.site_name);
        w.short_bytes(&self.node_record.encode());
        w.short_bytes(
            &self
                .wrapped_keys
                .as_ref()
                .map(Record::encode)
                .unwrap_or_default(),
        );
        w.u64(self.expires_unix_ms);
        w.array(&self.ephemeral);
        w.array(&self.nonce);
        w
    }

    fn unsigned(&self) -> Writer {
        let mut w = self.header();
        w.short_bytes(&self.sealed);
        w
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = self.unsigned();
        w.array(&self.signature);
        let bytes = w.finish();
        debug_assert_eq!(JoinToken::decode(&bytes).as_ref(), Ok(self));
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<JoinToken, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("join token", JOIN_VERSION)?;
        let site = SiteId(r.array()?);
        let site_name = get_name(&mut r, "site name")?;
        let node_record = Record::decode(r.short_bytes()?)?;
        if node_record.kind != RecordKind::NodeCert {
            return Err(DecodeError::Invalid {
                what: "join token",
                why: "it does not carry a node certificate".into(),
            });
        }
        let node_cert = NodeCert::decode(&node_record.body)?;
        let wrapped_keys = match r.short_bytes()? {
            [] => None,
            bytes => Some(Record::decode(bytes)?),
        };
        let expires_unix_ms = r.u64()?;
        let ephemeral = r.array()?;
        let nonce = r.array()?;
        let sealed = r.short_bytes()?.to_vec();
        if sealed.len() != SEALED_KEYS_BYTES {
            return Err(DecodeError::Invalid {
                what: "join token",
                why: format!(
                    "sealed keys are {} bytes, not {SEALED_KEYS_BYTES}",
                    sealed.len()
                ),
            });
        }
        let signature = r.array()?;
        r.finish()?;
        Ok(JoinToken {
            site,
            site_name,
            node_record,
            node_cert,
            wrapped_keys,
            expires_unix_ms,
            ephemeral,
            nonce,
            sealed,
            signature,
        })
    }

    pub fn to_text(&self) -> String {
        to_text(JOIN_PREFIX, &self.encode())
    }

    /// Parses and checks a token: its form, the site's signature over all of it, the
    /// records it carries, and that it has not expired. It is not opened yet.
    pub fn from_text(text: &str, now_unix_ms: u64) -> Result<JoinToken, JoinTokenError> {
        let bytes =
            from_text(JOIN_PREFIX, "join token", JOIN_VERSION, text).map_err(
                |error| match error {
                    TextError::NoPrefix => JoinTokenError::NotAJoinToken,
                    TextError::NotAToken => JoinTokenError::NotAToken,
                    TextError::Decode(error) => JoinTokenError::Decode(error),
                },
            )?;
        let token = JoinToken::decode(&bytes)?;
        if !token
            .site
            .verifies(JOIN_CONTEXT, &token.unsigned().finish(), &token.signature)
        {
            return Err(JoinTokenError::BadSignature);
        }
        let site_only = OnlySite(token.site);
        validate(&token.node_record, &site_only)?;
        if let Some(wrapped_keys) = &token.wrapped_keys {
            validate(wrapped_keys, &site_only)?;
            if wrapped_keys.kind != RecordKind::WrappedKeys {
                return Err(
                    RecordError::NotAllowed("expected the wrapped-keys record".into()).into(),
                );
            }
        }
        if now_unix_ms > token.expires_unix_ms {
            return Err(JoinTokenError::Expired(
                (now_unix_ms - token.expires_unix_ms) / 60_000,
            ));
        }
        Ok(token)
    }

    /// Opens the sealed keys with the node key the token was made for, and checks that
    /// the site key is the site's.
    pub fn open(&self, node_key: &SigningKey) -> Result<SiteKeys, JoinTokenError> {
        let this_node = NodeId(node_key.verifying_key().to_bytes());
        if this_node != self.node_cert.node {
            return Err(JoinTokenError::OtherNode {
                token_node: self.node_cert.node,
                this_node,
            });
        }
        let ephemeral = VerifyingKey::from_bytes(&self.ephemeral)
            .ok()
            .filter(|key| !key.is_weak())
            .ok_or(JoinTokenError::Unseal)?;
        let shared = ephemeral
            .to_montgomery()
            .mul_clamped(node_key.to_scalar_bytes())
            .to_bytes();
        let plain = seal_cipher(shared, &self.ephemeral, &this_node)
            .decrypt(
                XNonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.sealed,
                    aad: &self.header().finish(),
                },
            )
            .map_err(|_| JoinTokenError::Unseal)?;
        let (site_secret, vault) = plain.split_at(32);
        let site_key =
            SigningKey::from_bytes(site_secret.try_into().map_err(|_| JoinTokenError::Unseal)?);
        if site_key.verifying_key().to_bytes() != self.site.0 {
            return Err(JoinTokenError::SiteKeyMismatch(self.site));
        }
        let vault_key = VaultKey::from_bytes(vault.try_into().map_err(|_| JoinTokenError::Unseal)?);
        Ok(SiteKeys {
            site_key,
            vault_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;

    fn site_key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn node_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn node_record(
        site_key: &SigningKey,
        node: NodeId,
        name: &str,
        addresses: Vec<String>,
        capacity_bytes: u64,
    ) -> Record {
        let cert = NodeCert {
            node,
            site: SiteId(site_key.verifying_key().to_bytes()),
            name: name.into(),
            addresses,
            capacity_bytes,
        };
        Record::sign(site_key, RecordKind::NodeCert, node.0, 1, cert.encode())
    }

    fn token_for(node: &SigningKey) -> JoinToken {
        let site_key = site_key();
        let node_id = NodeId(node.verifying_key().to_bytes());
        let wrapped = Record::sign(
            &site_key,
            RecordKind::WrappedKeys,
            [0; 32],
            1,
            crate::wrap::WrappedKeys {
                kdf: crate::wrap::KdfParams::RECOMMENDED,
                salt: [1; 16],
                nonce: [2; 24],
                sealed: vec![3; 80],
            }
            .encode(),
        );
        JoinToken::issue(
            &site_key,
            &VaultKey::from_bytes([9; 32]),
            "Smith & Co, Main St",
            node_record(
                &site_key,
                node_id,
                "front desk",
                vec!["/ip4/10.0.0.7/udp/4001/quic-v1".into()],
                2 << 40,
            ),
            Some(wrapped),
            2_000_000,
            [5; 32],
            [6; 24],
        )
        .unwrap()
    }

    #[test]
    fn the_node_it_is_for_opens_it() {
        let node = node_key(7);
        let token = token_for(&node);
        let parsed = JoinToken::from_text(&format!(" {}\n", token.to_text()), NOW).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.node_cert.name, "front desk");
        let keys = parsed.open(&node).unwrap();
        assert_eq!(keys.site_key.to_bytes(), site_key().to_bytes());
        assert_eq!(keys.vault_key, VaultKey::from_bytes([9; 32]));
    }

    #[test]
    fn another_node_cannot_open_it() {
        let token = token_for(&node_key(7));
        let other = node_key(8);
        assert!(matches!(
            token.open(&other),
            Err(JoinTokenError::OtherNode { .. })
        ));
        // Even pretending to be the node (the check above skipped) does not open the keys.
        let mut forged = token.clone();
        forged.node_cert.node = NodeId(other.verifying_key().to_bytes());
        assert_eq!(forged.open(&other).unwrap_err(), JoinTokenError::Unseal);
    }

    #[test]
    fn expired_truncated_and_foreign_tokens_are_refused() {
        let text = token_for(&node_key(7)).to_text();
        assert_eq!(
            JoinToken::from_text(&text, 2_000_000 + 5 * 60_000),
            Err(JoinTokenError::Expired(5))
        );
        for cut in [1, 5, 40, text.len() - JOIN_PREFIX.len()] {
            assert!(matches!(
                JoinToken::from_text(&text[..text.len() - cut], NOW),
                Err(JoinTokenError::Decode(_))
            ));
        }
        assert_eq!(
            JoinToken::from_text("cairn-invite-abc", NOW),
            Err(JoinTokenError::NotAJoinToken)
        );
    }

    #[test]
    fn a_site_key_that_is_not_the_sites_is_refused() {
        // Re-seal another key under the same token and re-sign it, as a buggy issuer might.
        let node = node_key(7);
        let mut token = token_for(&node);
        let ephemeral_key = SigningKey::from_bytes(&[5; 32]);
        let shared = node
            .verifying_key()
            .to_montgomery()
            .mul_clamped(ephemeral_key.to_scalar_bytes())
            .to_bytes();
        token.sealed = seal_cipher(shared, &token.ephemeral, &token.node_cert.node)
            .encrypt(
                XNonce::from_slice(&token.nonce),
                Payload {
                    msg: &[[4u8; 32], [9; 32]].concat(),
                    aad: &token.header().finish(),
                },
            )
            .unwrap();
        token.signature = sign(&site_key(), JOIN_CONTEXT, &token.unsigned().finish());
        let parsed = JoinToken::from_text(&token.to_text(), NOW).unwrap();
        assert_eq!(
            parsed.open(&node).unwrap_err(),
            JoinTokenError::SiteKeyMismatch(token.site)
        );
    }

    #[test]
    fn a_node_id_that_is_no_key_is_refused() {
        let site_key = site_key();
        // The identity point: small order, so every shared secret would be the same.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let record = node_record(&site_key, NodeId(identity), "x", vec![], 0);
        let issued = JoinToken::issue(
            &site_key,
            &VaultKey::from_bytes([9; 32]),
            "s",
            record,
            None,
            1,
            [5; 32],
            [6; 24],
        );
        assert_eq!(
            issued.unwrap_err(),
            JoinTokenError::BadNodeId(NodeId(identity))
        );
    }

    proptest! {
        #[test]
        fn tokens_round_trip(
            node_seed: u8,
            site_name in "[a-zA-Z0-9 &,]{1,64}",
            node_name in "[a-zA-Z0-9 ]{1,64}",
            addresses in proptest::collection::vec("[a-z0-9/.:-]{1,60}", 0..4),
            capacity_bytes: u64,
            expires_unix_ms: u64,
            ephemeral: [u8; 32],
            nonce: [u8; 24],
        ) {
            let (site_key, node) = (site_key(), node_key(node_seed));
            prop_assume!(node.verifying_key() != site_key.verifying_key());
            let node_id = NodeId(node.verifying_key().to_bytes());
            let record = node_record(&site_key, node_id, &node_name, addresses, capacity_bytes);
            let token = JoinToken::issue(&site_key, &VaultKey::from_bytes([9; 32]), &site_name, record, None, expires_unix_ms, ephemeral, nonce).unwrap();
            let parsed = JoinToken::from_text(&token.to_text(), 0).unwrap();
            prop_assert_eq!(&parsed, &token);
            prop_assert_eq!(parsed.open(&node).unwrap().vault_key, VaultKey::from_bytes([9; 32]));
        }

        #[test]
        fn any_flipped_bit_is_refused(bit: usize) {
            let node = node_key(7);
            let mut bytes = token_for(&node).encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let opened = JoinToken::from_text(&to_text(JOIN_PREFIX, &bytes), NOW).and_then(|t| t.open(&node));
            prop_assert!(opened.is_err());
        }

        #[test]
        fn parsing_never_panics(text in "cairn-join-[a-z2-7]{0,600}") {
            let _ = JoinToken::from_text(&text, 0);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = JoinToken::decode(&bytes);
        }
    }
}
