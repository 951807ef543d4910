//! A small canonical binary codec: fixed-width little-endian integers, length-prefixed
//! byte strings, and a reader that rejects truncation and trailing bytes. Every stored or
//! sent format in cairn is written with it, so one encoding exists per value.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("{n_bytes} unexpected trailing bytes")]
    TrailingBytes { n_bytes: usize },
    #[error("unsupported {what} format version {version} (this build reads up to {supported})")]
    UnsupportedVersion {
        what: &'static str,
        version: u8,
        supported: u8,
    },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("{what} count {count} exceeds the limit of {max}")]
    TooMany {
        what: &'static str,
        count: u64,
        max: u64,
    },
}

/// Appends values to a byte vector.
#[derive(Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub fn with_capacity(n_bytes: usize) -> Writer {
        Writer {
            bytes: Vec::with_capacity(n_bytes),
        }
    }
    pub fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }
    pub fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    pub fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    pub fn array(&mut self, value: &[u8]) {
        self.bytes.extend_from_slice(value);
    }
    /// A byte string of at most `u16::MAX` bytes, prefixed by its length.
    pub fn short_bytes(&mut self, value: &[u8]) {
        let n_bytes = u16::try_from(value.len()).expect("short_bytes caller bounds the length");
        self.u16(n_bytes);
        self.array(value);
    }
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Reads values from a byte slice; every read is bounds-checked.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }
    pub fn take(&mut self, n_bytes: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n_bytes {
            return Err(DecodeError::Truncated {
                needed: n_bytes - self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n_bytes);
        self.bytes = tail;
        Ok(head)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn short_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n_bytes = self.u16()?;
        self.take(usize::from(n_bytes))
    }
    /// Reads a version byte and rejects versions newer than `supported`.
    pub fn version(&mut self, what: &'static str, supported: u8) -> Result<u8, DecodeError> {
        let version = self.u8()?;
        if version == 0 || version > supported {
            return Err(DecodeError::UnsupportedVersion {
                what,
                version,
                supported,
            });
        }
        Ok(version)
    }
    /// Ends decoding: a canonical encoding has no bytes left over.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                n_bytes: self.bytes.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn integers_and_strings_round_trip(a: u8, b: u16, c: u32, d: u64, s in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut w = Writer::default();
            w.u8(a); w.u16(b); w.u32(c); w.u64(d); w.short_bytes(&s);
            let bytes = w.finish();
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.u8().unwrap(), a);
            prop_assert_eq!(r.u16().unwrap(), b);
            prop_assert_eq!(r.u32().unwrap(), c);
            prop_assert_eq!(r.u64().unwrap(), d);
            prop_assert_eq!(r.short_bytes().unwrap(), &s[..]);
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn any_truncation_is_an_error(d: u64, cut in 0usize..8) {
            let bytes = d.to_le_bytes();
            let mut r = Reader::new(&bytes[..cut]);
            prop_assert_eq!(r.u64(), Err(DecodeError::Truncated { needed: 8 - cut }));
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let r = Reader::new(&[1, 2]);
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes { n_bytes: 2 }));
    }

    #[test]
    fn newer_versions_are_rejected() {
        let mut r = Reader::new(&[9]);
        assert!(matches!(
            r.version("test", 1),
            Err(DecodeError::UnsupportedVersion {
                version: 9,
                supported: 1,
                ..
            })
        ));
    }
}
