//! Wrapped keys: a site's secret keys sealed under a key stretched from its recovery key
//! with Argon2id, so the record can travel through the mesh (and sit on partners' disks)
//! without anyone being able to open it, and a fresh machine holding the recovery key can.
//!
//! Body format, version 1:
//!
//! ```text
//! u8 WRAP_VERSION | u32 argon2 memory KiB | u32 passes | u32 lanes | [16] salt | [24] nonce
//! | u16 + sealed bytes (XChaCha20-Poly1305 of site key[32] + vault key[32];
//!                       associated data: the version byte and the site id)
//! ```

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{RecoveryKey, SiteId};
use crate::keys::VaultKey;

pub const WRAP_VERSION: u8 = 1;

/// Argon2id cost. `RECOMMENDED` is what sites use; tests pass cheaper ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub passes: u32,
    pub lanes: u32,
}

impl KdfParams {
    pub const RECOMMENDED: KdfParams = KdfParams {
        memory_kib: 64 << 10,
        passes: 3,
        lanes: 1,
    };
    /// The most a record may ask a reader to spend: a hostile record must not exhaust memory.
    pub const MEMORY_KIB_MAX: u32 = 1 << 20;
    pub const PASSES_MAX: u32 = 16;
    pub const LANES_MAX: u32 = 8;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WrapError {
    #[error("malformed wrapped keys")]
    Decode(#[from] DecodeError),
    #[error("wrong recovery key for site {0} (or the wrapped keys were altered)")]
    WrongKey(SiteId),
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKeys {
    pub kdf: KdfParams,
    pub salt: [u8; 16],
    pub nonce: [u8; 24],
    pub sealed: Vec<u8>,
}

fn kek(
    recovery: &RecoveryKey,
    salt: &[u8; 16],
    kdf: KdfParams,
) -> Result<XChaCha20Poly1305, WrapError> {
    let params = argon2::Params::new(kdf.memory_kib, kdf.passes, kdf.lanes, Some(32))
        .map_err(|e| WrapError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    argon
        .hash_password_into(&recovery.0, salt, &mut key)
        .map_err(|e| WrapError::Kdf(e.to_string()))?;
    Ok(XChaCha20Poly1305::new(&key.into()))
}

fn aad(site: &SiteId) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[0] = WRAP_VERSION;
    aad[1..].copy_from_slice(&site.0);
    aad
}

impl WrappedKeys {
    /// Seals a site's keys. `salt` and `nonce` are fresh random bytes from the caller.
    pub fn wrap(
        site: &SiteId,
        site_secret: &[u8; 32],
        vault_key: &VaultKey,
        recovery: &RecoveryKey,
        kdf: KdfParams,
        salt: [u8; 16],
        nonce: [u8; 24],
    ) -> Result<WrappedKeys, WrapError> {
        let mut plain = [0u8; 64];
        plain[..32].copy_from_slice(site_secret);
        plain[32..].copy_from_slice(vault_key.as_bytes());
        let sealed = kek(recovery, &salt, kdf)?
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(site),
                },
            )
            .expect("XChaCha20-Poly1305 seals 64 bytes");
        Ok(WrappedKeys {
            kdf,
            salt,
            nonce,
            sealed,
        })
    }

    /// Opens the keys: (site secret key, vault key).
    pub fn unwrap(
        &self,
        site: &SiteId,
        recovery: &RecoveryKey,
    ) -> Result<([u8; 32], VaultKey), WrapError> {
        let plain = kek(recovery, &self.salt, self.kdf)?
            .decrypt(
                XNonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.sealed,
                    aad: &aad(site),
                },
            )
            .map_err(|_| WrapError::WrongKey(*site))?;
        let site_secret: [u8; 32] = plain[..32]
            .try_into()
            .map_err(|_| WrapError::WrongKey(*site))?;
        let vault: [u8; 32] = plain[32..]
            .try_into()
            .map_err(|_| WrapError::WrongKey(*site))?;
        Ok((site_secret, VaultKey::from_bytes(vault)))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(WRAP_VERSION);
        w.u32(self.kdf.memory_kib);
        w.u32(self.kdf.passes);
        w.u32(self.kdf.lanes);
        w.array(&self.salt);
        w.array(&self.nonce);
        w.short_bytes(&self.sealed);
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> Result<WrappedKeys, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("wrapped keys", WRAP_VERSION)?;
        let kdf = KdfParams {
            memory_kib: r.u32()?,
            passes: r.u32()?,
            lanes: r.u32()?,
        };
        if kdf.memory_kib > KdfParams::MEMORY_KIB_MAX
            || kdf.passes > KdfParams::PASSES_MAX
            || kdf.lanes > KdfParams::LANES_MAX
        {
            return Err(DecodeError::Invalid {
                what: "wrapped keys",
                why: format!("key derivation cost {kdf:?} over the limit"),
            });
        }
        let salt = r.array()?;
        let nonce = r.array()?;
        let sealed = r.short_bytes()?.to_vec();
        r.finish()?;
        Ok(WrappedKeys {
            kdf,
            salt,
            nonce,
            sealed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        passes: 1,
        lanes: 1,
    };

    fn wrapped() -> WrappedKeys {
        WrappedKeys::wrap(
            &SiteId([1; 32]),
            &[2; 32],
            &VaultKey::from_bytes([3; 32]),
            &RecoveryKey([4; 20]),
            CHEAP,
            [5; 16],
            [6; 24],
        )
        .unwrap()
    }

    #[test]
    fn the_right_recovery_key_opens_and_a_wrong_one_does_not() {
        let wrapped = WrappedKeys::decode(&wrapped().encode()).unwrap();
        let (site_secret, vault) = wrapped
            .unwrap(&SiteId([1; 32]), &RecoveryKey([4; 20]))
            .unwrap();
        assert_eq!(site_secret, [2; 32]);
        assert_eq!(vault, VaultKey::from_bytes([3; 32]));
        assert_eq!(
            wrapped.unwrap(&SiteId([1; 32]), &RecoveryKey([9; 20])),
            Err(WrapError::WrongKey(SiteId([1; 32])))
        );
        // Bound to its site: the same blob presented for another site does not open.
        assert!(wrapped
            .unwrap(&SiteId([7; 32]), &RecoveryKey([4; 20]))
            .is_err());
    }

    #[test]
    fn hostile_costs_are_refused_before_any_work() {
        let mut hostile = wrapped();
        hostile.kdf.memory_kib = u32::MAX;
        assert!(WrappedKeys::decode(&hostile.encode()).is_err());
    }

    proptest! {
        // A flip can raise the Argon2 cost up to its limit, so keep the case count modest.
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_flipped_bit_fails(bit: usize) {
            let mut bytes = wrapped().encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let opened = WrappedKeys::decode(&bytes).ok().and_then(|w| w.unwrap(&SiteId([1; 32]), &RecoveryKey([4; 20])).ok());
            prop_assert!(opened.is_none());
        }
    }
}
