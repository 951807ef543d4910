//! Identifier newtypes. Ids print as lower-case hex; snapshot ids also parse from a unique
//! prefix at the CLI, like git and restic.

use std::fmt;

use crate::codec::DecodeError;

/// The keyed BLAKE3 hash of a chunk's plaintext (see `keys::VaultKey::chunk_id`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

/// A snapshot of an image: 16 random bytes supplied by the caller. Listings order snapshots
/// by their record's time, so the id carries no time and its first characters are as
/// distinctive as any.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// The first 8 hex characters: what listings show and what people type.
    pub fn short(&self) -> String {
        hex(&self.0[..4])
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

pub fn parse_hex<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], DecodeError> {
    let text = text.as_bytes();
    if text.len() != N * 2 {
        return Err(DecodeError::Invalid {
            what,
            why: format!("expected {} hex characters, got {}", N * 2, text.len()),
        });
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let digit = |c: u8| -> Result<u8, DecodeError> {
            char::from(c)
                .to_digit(16)
                .map(|d| d as u8)
                .ok_or(DecodeError::Invalid {
                    what,
                    why: format!("{:?} is not a hex digit", char::from(c)),
                })
        };
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Ok(out)
}

macro_rules! hex_display {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex(&self.0))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), hex(&self.0[..6]))
            }
        }
    };
}
hex_display!(ChunkId);
hex_display!(SnapshotId);

impl std::str::FromStr for SnapshotId {
    type Err = DecodeError;
    fn from_str(text: &str) -> Result<SnapshotId, DecodeError> {
        parse_hex("snapshot id", text).map(SnapshotId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn snapshot_id_hex_round_trips(bytes: [u8; 16]) {
            let id = SnapshotId(bytes);
            prop_assert_eq!(id.to_string().parse::<SnapshotId>().unwrap(), id);
        }
    }

    #[test]
    fn short_ids_are_the_first_eight_hex_characters() {
        let id = SnapshotId([0xab; 16]);
        assert_eq!(id.short(), "abababab");
        assert!(id.to_string().starts_with(&id.short()));
    }

    #[test]
    fn bad_hex_is_rejected() {
        assert!("zz".repeat(16).parse::<SnapshotId>().is_err());
        assert!("ab".parse::<SnapshotId>().is_err());
    }
}
