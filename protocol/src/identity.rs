//! Who is who: site and node ids (ed25519 public keys), fingerprints, and the recovery key.
//! All print in the checked, grouped form of `humanid` so people can compare them over the
//! phone and a typo is caught.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::codec::DecodeError;
use crate::humanid;

const CONTEXT_FINGERPRINT: &str = "cairn 2026-11 site fingerprint v1";
pub const FINGERPRINT_BYTES: usize = 20;
pub const RECOVERY_KEY_BYTES: usize = 20;

/// A site: its ed25519 public (verifying) key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteId(pub [u8; 32]);

/// A node: its ed25519 public key, later also its libp2p identity.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

/// A short hash of a site id, for people to compare before trusting.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; FINGERPRINT_BYTES]);

/// The secret printed once at `cairn init` from which a fresh machine recovers the site:
/// 160 random bits, stretched with Argon2id before use (see `wrap`).
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryKey(pub [u8; RECOVERY_KEY_BYTES]);

/// Signs `message` under a domain-separating `context`, so a signature made for one kind
/// of object can never be replayed as another.
pub fn sign(key: &SigningKey, context: &[u8], message: &[u8]) -> [u8; 64] {
    key.sign(&[context, message].concat()).to_bytes()
}

impl SiteId {
    /// True when `signature` is this site's signature over `context` and `message`.
    pub fn verifies(&self, context: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
        VerifyingKey::from_bytes(&self.0)
            .and_then(|key| {
                key.verify(
                    &[context, message].concat(),
                    &Signature::from_bytes(signature),
                )
            })
            .is_ok()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        let hash = blake3::derive_key(CONTEXT_FINGERPRINT, &self.0);
        let mut out = [0u8; FINGERPRINT_BYTES];
        out.copy_from_slice(&hash[..FINGERPRINT_BYTES]);
        Fingerprint(out)
    }
}

macro_rules! human_id {
    ($name:ident, $n:expr, $what:literal) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&humanid::encode(&self.0))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    concat!(stringify!($name), "({})"),
                    &humanid::encode(&self.0)[..7]
                )
            }
        }
        impl FromStr for $name {
            type Err = DecodeError;
            fn from_str(text: &str) -> Result<$name, DecodeError> {
                humanid::decode::<$n>($what, text).map($name)
            }
        }
    };
}
human_id!(SiteId, 32, "site id");
human_id!(NodeId, 32, "node id");
human_id!(Fingerprint, FINGERPRINT_BYTES, "fingerprint");

impl fmt::Display for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&humanid::encode(&self.0))
    }
}

impl fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryKey(..)")
    }
}

impl FromStr for RecoveryKey {
    type Err = DecodeError;
    fn from_str(text: &str) -> Result<RecoveryKey, DecodeError> {
        humanid::decode::<RECOVERY_KEY_BYTES>("recovery key", text).map(RecoveryKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ids_and_keys_round_trip(bytes: [u8; 32], secret: [u8; RECOVERY_KEY_BYTES]) {
            prop_assert_eq!(SiteId(bytes).to_string().parse::<SiteId>().unwrap(), SiteId(bytes));
            prop_assert_eq!(NodeId(bytes).to_string().to_lowercase().parse::<NodeId>().unwrap(), NodeId(bytes));
            let fingerprint = SiteId(bytes).fingerprint();
            prop_assert_eq!(fingerprint.to_string().parse::<Fingerprint>().unwrap(), fingerprint);
            prop_assert_eq!(RecoveryKey(secret).to_string().parse::<RecoveryKey>().unwrap(), RecoveryKey(secret));
        }
    }

    #[test]
    fn fingerprints_differ_between_sites_and_from_the_id() {
        let (a, b) = (SiteId([1; 32]), SiteId([2; 32]));
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert!(!a.to_string().starts_with(&a.fingerprint().to_string()[..7]));
        assert!(!format!("{:?}", RecoveryKey([7; RECOVERY_KEY_BYTES])).contains('7'));
    }
}
