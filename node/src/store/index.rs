//! The metadata index: chunk id -> location in a pack, how much of each pack is committed,
//! the sealed snapshot records, and small catalog entries (signed records, partners,
//! counters). Bulk bytes never go here. The rest of the node sees only
//! the `MetaIndex` trait; `SledIndex` is the implementation.

use std::path::Path;

use cairn_protocol::{ChunkId, SnapshotId};

use super::{PackId, StoreError};

/// Where a sealed chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: PackId,
    pub offset: u64,
    pub len_bytes: u32,
}

impl ChunkLocation {
    fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&self.pack.0.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..].copy_from_slice(&self.len_bytes.to_le_bytes());
        out
    }
    fn decode(bytes: &[u8]) -> Option<ChunkLocation> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(ChunkLocation {
            pack: PackId(u32::from_le_bytes(bytes[..4].try_into().ok()?)),
            offset: u64::from_le_bytes(bytes[4..12].try_into().ok()?),
            len_bytes: u32::from_le_bytes(bytes[12..].try_into().ok()?),
        })
    }
}

/// Catalog (key, value) pairs.
pub type CatalogEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Changes applied together: all or none, and durable when `commit` returns.
#[derive(Default, Debug)]
pub struct IndexBatch {
    pub chunks: Vec<(ChunkId, ChunkLocation)>,
    /// A pack and the length of it that is now written, fsynced and indexed.
    pub packs: Vec<(PackId, u64)>,
    pub snapshots: Vec<(SnapshotId, Vec<u8>)>,
    /// Snapshots forgotten (applied after `snapshots`).
    pub removed_snapshots: Vec<SnapshotId>,
    pub removed_chunks: Vec<ChunkId>,
    pub removed_packs: Vec<PackId>,
    /// Small catalog entries (signed records, partners, used tokens), by key.
    pub catalog: CatalogEntries,
    /// Catalog keys to remove (applied before `catalog`).
    pub removed_catalog: Vec<Vec<u8>>,
}

pub trait MetaIndex: Send + Sync {
    fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLocation>, StoreError>;
    fn commit(&self, batch: IndexBatch) -> Result<(), StoreError>;
    /// Committed length of every pack the index knows.
    fn packs(&self) -> Result<Vec<(PackId, u64)>, StoreError>;
    /// Sealed snapshot records, in id order.
    fn snapshots(&self) -> Result<Vec<(SnapshotId, Vec<u8>)>, StoreError>;
    fn n_chunks(&self) -> usize;
    fn catalog_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Catalog entries whose key starts with `prefix`, in key order.
    fn catalog_scan(&self, prefix: &[u8]) -> Result<CatalogEntries, StoreError>;
    /// Replaces the u64 at catalog `key` (0 when absent) with `update` of it, atomically
    /// against other updates and durably; returns the new value.
    fn catalog_update_u64(
        &self,
        key: &[u8],
        update: &dyn Fn(u64) -> u64,
    ) -> Result<u64, StoreError>;
    /// Every chunk stored in `pack` (a full scan: for repairs, not hot paths).
    fn chunks_in_pack(&self, pack: PackId) -> Result<Vec<(ChunkId, ChunkLocation)>, StoreError>;
    /// Every chunk the index knows (a full scan: at a node's start, not on hot paths).
    fn chunks(&self) -> Result<Vec<(ChunkId, ChunkLocation)>, StoreError>;
}

/// A catalog counter's stored bytes as a u64.
pub fn decode_counter(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_le_bytes)
        .map_err(|_| StoreError::Index("malformed counter in the catalog".into()))
}

const PREFIX_CHUNK: u8 = b'c';
const PREFIX_PACK: u8 = b'p';
const PREFIX_SNAPSHOT: u8 = b's';
const PREFIX_CATALOG: u8 = b'k';

pub struct SledIndex {
    db: sled::Db,
    /// Set for an index opened from a read-only data dir: `db` is then a private copy in
    /// a temporary dir (sled cannot open a database it may not write), kept while open.
    read_only_copy: Option<tempfile::TempDir>,
}

fn index_error(e: sled::Error) -> StoreError {
    StoreError::Index(e.to_string())
}

impl SledIndex {
    pub fn open(path: &Path) -> Result<SledIndex, StoreError> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(64 << 20)
            .mode(sled::Mode::HighThroughput);
        // The data dir lock already keeps other processes out. Within one process, sled's
        // flusher thread can hold its file lock for a moment after the last handle drops, so
        // an immediate reopen retries briefly instead of failing.
        let mut attempts_left = SLED_OPEN_ATTEMPTS_MAX;
        loop {
            match config.open() {
                Ok(db) => {
                    return Ok(SledIndex {
                        db,
                        read_only_copy: None,
                    })
                }
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && attempts_left > 1 =>
                {
                    attempts_left -= 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(index_error(e)),
            }
        }
    }
}

impl SledIndex {
    /// Opens the index of a data dir this process cannot write: sled needs to write even
    /// to read, so it opens a copy in a temporary dir, and every commit is refused so that
    /// nothing is silently kept only in the copy. The copy costs one read of the index.
    pub fn open_read_only(path: &Path) -> Result<SledIndex, StoreError> {
        let copy = tempfile::Builder::new()
            .prefix("cairn-index-")
            .tempdir()
            .map_err(|e| StoreError::Io {
                path: std::env::temp_dir(),
                source: e,
            })?;
        let copy_path = copy.path().join("index");
        copy_dir(path, &copy_path)?;
        let mut index = SledIndex::open(&copy_path)?;
        index.read_only_copy = Some(copy);
        Ok(index)
    }

    fn writable(&self) -> Result<(), StoreError> {
        match self.read_only_copy {
            Some(_) => Err(StoreError::ReadOnly),
            None => Ok(()),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io(&source))?.is_dir() {
            copy_dir(&source, &target)?;
        } else {
            std::fs::copy(&source, &target).map_err(io(&source))?;
        }
    }
    Ok(())
}

/// Tries to open sled while another handle in this process lets go: 2 s in all.
const SLED_OPEN_ATTEMPTS_MAX: u32 = 100;

fn key(prefix: u8, body: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + body.len());
    key.push(prefix);
    key.extend_from_slice(body);
    key
}

impl MetaIndex for SledIndex {
    fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLocation>, StoreError> {
        match self.db.get(key(PREFIX_CHUNK, &id.0)).map_err(index_error)? {
            None => Ok(None),
            Some(value) => ChunkLocation::decode(&value)
                .map(Some)
                .ok_or_else(|| StoreError::Index(format!("malformed location for chunk {id}"))),
        }
    }

    fn commit(&self, batch: IndexBatch) -> Result<(), StoreError> {
        self.writable()?;
        let mut sled_batch = sled::Batch::default();
        for (id, location) in &batch.chunks {
            sled_batch.insert(key(PREFIX_CHUNK, &id.0), &location.encode()[..]);
        }
        for (pack, len) in &batch.packs {
            sled_batch.insert(
                key(PREFIX_PACK, &pack.0.to_be_bytes()),
                &len.to_le_bytes()[..],
            );
        }
        for (id, record) in &batch.snapshots {
            sled_batch.insert(key(PREFIX_SNAPSHOT, &id.0), record.as_slice());
        }
        for id in &batch.removed_snapshots {
            sled_batch.remove(key(PREFIX_SNAPSHOT, &id.0));
        }
        for id in &batch.removed_chunks {
            sled_batch.remove(key(PREFIX_CHUNK, &id.0));
        }
        for pack in &batch.removed_packs {
            sled_batch.remove(key(PREFIX_PACK, &pack.0.to_be_bytes()));
        }
        for k in &batch.removed_catalog {
            sled_batch.remove(key(PREFIX_CATALOG, k));
        }
        for (k, v) in &batch.catalog {
            sled_batch.insert(key(PREFIX_CATALOG, k), v.as_slice());
        }
        self.db.apply_batch(sled_batch).map_err(index_error)?;
        crate::mesh::lag::note_disk_wait("an index commit");
        self.db.flush().map_err(index_error)?;
        Ok(())
    }

    fn packs(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([PREFIX_PACK]) {
            let (k, v) = item.map_err(index_error)?;
            let (Ok(id), Ok(len)) = (<[u8; 4]>::try_from(&k[1..]), <[u8; 8]>::try_from(&v[..]))
            else {
                return Err(StoreError::Index("malformed pack entry".into()));
            };
            out.push((PackId(u32::from_be_bytes(id)), u64::from_le_bytes(len)));
        }
        Ok(out)
    }

    fn snapshots(&self) -> Result<Vec<(SnapshotId, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([PREFIX_SNAPSHOT]) {
            let (k, v) = item.map_err(index_error)?;
            let id = <[u8; 16]>::try_from(&k[1..])
                .map_err(|_| StoreError::Index("malformed snapshot key".into()))?;
            out.push((SnapshotId(id), v.to_vec()));
        }
        Ok(out)
    }

    fn n_chunks(&self) -> usize {
        self.db.scan_prefix([PREFIX_CHUNK]).count()
    }

    fn catalog_get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(key(PREFIX_CATALOG, k))
            .map_err(index_error)?
            .map(|v| v.to_vec()))
    }

    fn catalog_scan(&self, prefix: &[u8]) -> Result<CatalogEntries, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(key(PREFIX_CATALOG, prefix)) {
            let (k, v) = item.map_err(index_error)?;
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn catalog_update_u64(&self, k: &[u8], update: &dyn Fn(u64) -> u64) -> Result<u64, StoreError> {
        self.writable()?;
        let malformed = std::cell::Cell::new(None);
        let stored = self
            .db
            .update_and_fetch(key(PREFIX_CATALOG, k), |old| {
                let count = match old.map(decode_counter).transpose() {
                    Ok(count) => count.unwrap_or(0),
                    Err(e) => {
                        // Left as it is, and reported below.
                        malformed.set(Some(e));
                        return old.map(<[u8]>::to_vec);
                    }
                };
                Some(update(count).to_le_bytes().to_vec())
            })
            .map_err(index_error)?;
        if let Some(e) = malformed.take() {
            return Err(e);
        }
        crate::mesh::lag::note_disk_wait("an index counter update");
        self.db.flush().map_err(index_error)?;
        decode_counter(&stored.expect("the update always stores a value"))
    }

    fn chunks_in_pack(&self, pack: PackId) -> Result<Vec<(ChunkId, ChunkLocation)>, StoreError> {
        let mut all = self.chunks()?;
        all.retain(|(_, location)| location.pack == pack);
        Ok(all)
    }

    fn chunks(&self) -> Result<Vec<(ChunkId, ChunkLocation)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([PREFIX_CHUNK]) {
            let (k, v) = item.map_err(index_error)?;
            let id = <[u8; 32]>::try_from(&k[1..])
                .map_err(|_| StoreError::Index("malformed chunk key".into()))?;
            let location = ChunkLocation::decode(&v)
                .ok_or_else(|| StoreError::Index("malformed chunk location".into()))?;
            out.push((ChunkId(id), location));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn locations_round_trip(pack: u32, offset: u64, len_bytes: u32) {
            let location = ChunkLocation { pack: PackId(pack), offset, len_bytes };
            prop_assert_eq!(ChunkLocation::decode(&location.encode()), Some(location));
        }
    }

    #[test]
    fn a_batch_commits_everything_together() {
        let tmp = tempfile::tempdir().unwrap();
        let index = SledIndex::open(tmp.path()).unwrap();
        let location = ChunkLocation {
            pack: PackId(3),
            offset: 16,
            len_bytes: 9,
        };
        index
            .commit(IndexBatch {
                chunks: vec![(ChunkId([1; 32]), location)],
                packs: vec![(PackId(3), 65)],
                snapshots: vec![(SnapshotId([2; 16]), b"record".to_vec())],
                ..IndexBatch::default()
            })
            .unwrap();
        assert_eq!(index.chunk(&ChunkId([1; 32])).unwrap(), Some(location));
        assert_eq!(index.chunk(&ChunkId([9; 32])).unwrap(), None);
        assert_eq!(index.packs().unwrap(), vec![(PackId(3), 65)]);
        assert_eq!(
            index.snapshots().unwrap(),
            vec![(SnapshotId([2; 16]), b"record".to_vec())]
        );
        assert_eq!(index.n_chunks(), 1);
    }

    #[test]
    fn counters_start_at_zero_and_refuse_malformed_values() {
        let tmp = tempfile::tempdir().unwrap();
        let index = SledIndex::open(tmp.path()).unwrap();
        assert_eq!(index.catalog_update_u64(b"n", &|n| n + 5).unwrap(), 5);
        assert_eq!(index.catalog_update_u64(b"n", &|n| n * 3).unwrap(), 15);
        assert_eq!(
            index.catalog_get(b"n").unwrap(),
            Some(15u64.to_le_bytes().to_vec())
        );
        index
            .commit(IndexBatch {
                catalog: vec![(b"bad".to_vec(), b"xyz".to_vec())],
                ..IndexBatch::default()
            })
            .unwrap();
        assert!(index.catalog_update_u64(b"bad", &|n| n + 1).is_err());
        assert_eq!(index.catalog_get(b"bad").unwrap(), Some(b"xyz".to_vec()));
    }
}
