//! Snapshot records: the small signed-off fact "image I had this content at time T", which
//! points at a manifest root. Later issues carry these in the catalog with the body sealed;
//! the encoding is the canonical one from `codec`.
//!
//! Record format, version 1:
//!
//! ```text
//! u8  SNAPSHOT_VERSION
//! [16] snapshot id
//! u64 time_unix_ms
//! u64 size_bytes
//! [32] manifest root id
//! u16 + bytes: image name (1..=IMAGE_NAME_BYTES_MAX bytes, see ImageName)
//! ```

use std::fmt;

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::{ChunkId, SnapshotId};
use crate::manifest::ManifestRoot;

pub const SNAPSHOT_VERSION: u8 = 1;
pub const IMAGE_NAME_BYTES_MAX: usize = 64;

/// An image's name: 1 to 64 characters of ASCII letters, digits, '.', '_' and '-', not
/// starting with '.' or '-', so it is safe in paths, URLs and `IMAGE@SNAPSHOT` syntax.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ImageName(String);

impl ImageName {
    pub fn new(name: &str) -> Result<ImageName, DecodeError> {
        let invalid = |why: &str| DecodeError::Invalid {
            what: "image name",
            why: format!("{name:?}: {why}"),
        };
        if name.is_empty() || name.len() > IMAGE_NAME_BYTES_MAX {
            return Err(invalid("must be 1 to 64 characters"));
        }
        if name.starts_with(['.', '-']) {
            return Err(invalid("must not start with '.' or '-'"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(invalid("may hold only letters, digits, '.', '_' and '-'"));
        }
        Ok(ImageName(name.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub image: ImageName,
    pub time_unix_ms: u64,
    pub size_bytes: u64,
    pub root: ChunkId,
}

impl SnapshotRecord {
    pub fn manifest_root(&self) -> ManifestRoot {
        ManifestRoot {
            id: self.root,
            size_bytes: self.size_bytes,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128);
        w.u8(SNAPSHOT_VERSION);
        w.array(&self.id.0);
        w.u64(self.time_unix_ms);
        w.u64(self.size_bytes);
        w.array(&self.root.0);
        w.short_bytes(self.image.as_str().as_bytes());
        let bytes = w.finish();
        debug_assert_eq!(SnapshotRecord::decode(&bytes).as_ref(), Ok(self));
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<SnapshotRecord, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("snapshot record", SNAPSHOT_VERSION)?;
        let id = SnapshotId(r.array()?);
        let time_unix_ms = r.u64()?;
        let size_bytes = r.u64()?;
        let root = ChunkId(r.array()?);
        let name = std::str::from_utf8(r.short_bytes()?).map_err(|_| DecodeError::Invalid {
            what: "image name",
            why: "not UTF-8".into(),
        })?;
        let image = ImageName::new(name)?;
        r.finish()?;
        Ok(SnapshotRecord {
            id,
            image,
            time_unix_ms,
            size_bytes,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn record_round_trips(id: [u8; 16], time_unix_ms: u64, size_bytes: u64, root: [u8; 32], name in "[a-z0-9][a-z0-9._-]{0,63}") {
            let record = SnapshotRecord {
                id: SnapshotId(id),
                image: ImageName::new(&name).unwrap(),
                time_unix_ms,
                size_bytes,
                root: ChunkId(root),
            };
            prop_assert_eq!(SnapshotRecord::decode(&record.encode()).unwrap(), record);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = SnapshotRecord::decode(&bytes);
        }
    }

    #[test]
    fn image_names_are_checked() {
        assert!(ImageName::new("fileserver").is_ok());
        assert!(ImageName::new("db-01.prod_2").is_ok());
        for bad in ["", "-x", ".hidden", "a/b", "a@b", "a b", &"x".repeat(65)] {
            assert!(ImageName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
