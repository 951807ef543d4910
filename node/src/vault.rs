//! A vault: an open data dir with its store and derived keys. This is the API the CLI, the
//! examples and the tests use for backup, restore and verify on one node.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use cairn_protocol::keys::VaultKeys;
use cairn_protocol::manifest::{ManifestError, ManifestWalk};
use cairn_protocol::record::{Record, RecordKind, Tombstone};
use cairn_protocol::seal::{Opener, SealError};
use cairn_protocol::{ChunkId, Extent, ImageName, SnapshotId, SnapshotRecord};
use thiserror::Error;

use crate::datadir::{DataDir, DataDirError};
use crate::fetch::{fetch_blocking, FetchError, RemoteChunks};
use crate::records;
use crate::store::{ChunkLocation, PackReader, Store, StoreError};
use crate::units;

#[derive(Debug, Error)]
pub enum VaultError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("chunk {id}")]
    Seal { id: ChunkId, source: SealError },
    #[error("snapshot record {id} is damaged: {why}")]
    DamagedRecord { id: SnapshotId, why: String },
    #[error("no image named {0:?} in this vault (`cairn snapshots` lists them)")]
    UnknownImage(String),
    #[error("image {image} has no snapshot {wanted:?} (`cairn snapshots {image}` lists them)")]
    UnknownSnapshot { image: String, wanted: String },
    #[error("{wanted:?} matches more than one snapshot of {image}: give more characters")]
    AmbiguousSnapshot { image: String, wanted: String },
    #[error("{0}")]
    BadSpec(String),
    #[error("snapshot {id} (asked for as {image}@...) was forgotten at {at}: its data may already be gone")]
    Forgotten {
        image: String,
        id: SnapshotId,
        at: String,
    },
}

/// A chunk that could not be read or opened.
#[derive(Debug, Error)]
pub enum ChunkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    /// Unusable here, and the mesh did not deliver it either.
    #[error("{local}; from the mesh: {remote}")]
    Unavailable {
        local: Box<ChunkError>,
        remote: Box<FetchError>,
    },
}

pub struct Vault {
    pub dir: DataDir,
    pub store: Store,
    pub keys: VaultKeys,
    /// Snapshots something reads for a while (an export, so a VM), each with the number
    /// of its readers: a prune keeps their chunks even once they are forgotten.
    pins: Mutex<BTreeMap<SnapshotId, (SnapshotRecord, usize)>>,
}

/// A snapshot kept from prune while this lives (`Vault::pin`).
pub struct Pinned<'a> {
    vault: &'a Vault,
    id: SnapshotId,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let mut pins = self.vault.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, readers)) = pins.get_mut(&self.id) {
            *readers -= 1;
            if *readers == 0 {
                pins.remove(&self.id);
            }
        }
    }
}

impl Vault {
    pub fn init(root: &Path, site_name: &str) -> Result<Vault, VaultError> {
        Vault::from_dir(DataDir::init(root, site_name)?)
    }

    pub fn open(root: &Path) -> Result<Vault, VaultError> {
        Vault::from_dir(DataDir::open(root)?)
    }

    /// Opens the store of a data dir already open.
    pub fn from_dir(dir: DataDir) -> Result<Vault, VaultError> {
        let store = match dir.read_only {
            true => Store::open_read_only(&dir.store_dir())?,
            false => Store::open(&dir.store_dir())?,
        };
        let keys = dir.vault_key.derive();
        Ok(Vault {
            dir,
            store,
            keys,
            pins: Mutex::default(),
        })
    }

    /// Keeps `record`'s chunks from any prune in this process until the guard drops, even
    /// if the snapshot is forgotten meanwhile: a VM running on an export must not find its
    /// disk's blocks gone. A prune in another process cannot run while this one holds the
    /// data dir.
    pub fn pin(&self, record: &SnapshotRecord) -> Pinned<'_> {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.entry(record.id)
            .or_insert_with(|| (record.clone(), 0))
            .1 += 1;
        Pinned {
            vault: self,
            id: record.id,
        }
    }

    /// The snapshots pinned now.
    pub fn pinned(&self) -> Vec<SnapshotRecord> {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.values().map(|(record, _)| record.clone()).collect()
    }

    /// Reads and opens one chunk: its plaintext, checked against its id.
    pub fn load_chunk(
        &self,
        reader: &mut PackReader<'_>,
        opener: &mut Opener,
        id: &ChunkId,
    ) -> Result<Vec<u8>, ChunkError> {
        let sealed = reader.read(id)?;
        Ok(opener.open(&self.keys, id, &sealed)?)
    }

    /// `load_chunk` for a chunk already located (see `PackReader::prefetch`).
    pub fn load_chunk_at(
        &self,
        reader: &mut PackReader<'_>,
        opener: &mut Opener,
        id: &ChunkId,
        location: &ChunkLocation,
    ) -> Result<Vec<u8>, ChunkError> {
        let sealed = reader.read_located(id, location)?;
        Ok(opener.open(&self.keys, id, &sealed)?)
    }

    /// Every readable snapshot, oldest first (ties broken by id). Damaged records are
    /// skipped here; `snapshots_checked` reports them.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, VaultError> {
        Ok(self.snapshots_checked()?.0)
    }

    /// Every readable snapshot, and an error for each record that does not open or decode,
    /// so one damaged record never hides the others.
    ///
    /// Snapshots come from the index (made here) and from this site's snapshot records in
    /// the catalog (made on any node of the site, gossiped here): on a machine rebuilt with
    /// `cairn recover`, the catalog is the only source.
    pub fn snapshots_checked(&self) -> Result<(Vec<SnapshotRecord>, Vec<VaultError>), VaultError> {
        let mut opener = Opener::new();
        let (mut records, mut damaged) = (Vec::new(), Vec::new());
        let mut stored: BTreeMap<SnapshotId, Vec<u8>> =
            self.store.index().snapshots()?.into_iter().collect();
        let index = self.store.index();
        for record in records::scan(index, &self.dir.site_id(), RecordKind::Snapshot)? {
            match snapshot_id_of_key(&record.key) {
                Some(id) if record.is_tombstone() => {
                    stored.remove(&id);
                }
                Some(id) => {
                    stored.entry(id).or_insert(record.body);
                }
                None => damaged.push(VaultError::DamagedRecord {
                    id: SnapshotId(record.key[..16].try_into().expect("16 of 32 bytes")),
                    why: "its catalog key is not a zero-padded snapshot id".into(),
                }),
            }
        }
        for (id, stored) in stored {
            match self.decode_record(&mut opener, id, &stored) {
                Ok(record) => records.push(record),
                Err(e) => damaged.push(e),
            }
        }
        records.sort_by_key(|r| (r.time_unix_ms, r.id));
        Ok((records, damaged))
    }

    /// The catalog record that carries snapshot `id` of this vault to the site's other
    /// nodes and partners, signed by the site key: kind Snapshot, key the snapshot id
    /// zero-padded, body the bytes the index keeps for it (the record's seal id, then the
    /// sealed `SnapshotRecord`), so partners carry it without being able to read it.
    pub fn snapshot_catalog_record(&self, id: &SnapshotId) -> Result<Record, VaultError> {
        let body = self
            .store
            .index()
            .snapshots()?
            .into_iter()
            .find(|(stored_id, _)| stored_id == id)
            .map(|(_, body)| body)
            .ok_or_else(|| VaultError::DamagedRecord {
                id: *id,
                why: "not in this store's index".into(),
            })?;
        let key = records::snapshot_key(id);
        Ok(records::sign_next(self, RecordKind::Snapshot, key, body)?)
    }

    fn decode_record(
        &self,
        opener: &mut Opener,
        id: SnapshotId,
        stored: &[u8],
    ) -> Result<SnapshotRecord, VaultError> {
        let damaged = |why: String| VaultError::DamagedRecord { id, why };
        let (record_id, sealed) = stored
            .split_at_checked(32)
            .ok_or_else(|| damaged("too short".into()))?;
        let record_id = ChunkId(record_id.try_into().expect("split at 32"));
        let plain = opener
            .open(&self.keys, &record_id, sealed)
            .map_err(|e| damaged(units::chain(&e)))?;
        let record = SnapshotRecord::decode(&plain).map_err(|e| damaged(units::chain(&e)))?;
        if record.id != id {
            return Err(damaged("stored under another id".into()));
        }
        Ok(record)
    }

    /// Resolves `IMAGE` (latest snapshot) or `IMAGE@SNAPSHOT` (an id or a unique prefix).
    pub fn resolve(&self, spec: &str) -> Result<SnapshotRecord, VaultError> {
        let (image, wanted) = match spec.split_once('@') {
            Some((image, wanted)) => (image, Some(wanted)),
            None => (spec, None),
        };
        ImageName::new(image).map_err(|e| VaultError::BadSpec(e.to_string()))?;
        let mut matching: Vec<SnapshotRecord> = self
            .snapshots()?
            .into_iter()
            .filter(|r| r.image.as_str() == image)
            .collect();
        if matching.is_empty() {
            return Err(VaultError::UnknownImage(image.to_owned()));
        }
        let Some(wanted) = wanted else {
            return Ok(matching.pop().expect("not empty"));
        };
        let wanted_lower = wanted.to_ascii_lowercase();
        let found: Vec<SnapshotRecord> = matching
            .into_iter()
            .filter(|r| !wanted.is_empty() && r.id.to_string().starts_with(&wanted_lower))
            .collect();
        match found.len() {
            0 => Err(self
                .forgotten(image, wanted)?
                .unwrap_or(VaultError::UnknownSnapshot {
                    image: image.to_owned(),
                    wanted: wanted.to_owned(),
                })),
            1 => Ok(found.into_iter().next().expect("one")),
            _ => Err(VaultError::AmbiguousSnapshot {
                image: image.to_owned(),
                wanted: wanted.to_owned(),
            }),
        }
    }

    /// The error for `IMAGE@WANTED` when `wanted` names exactly one forgotten snapshot of
    /// this site. A tombstone does not say which image it was, so the message names the
    /// snapshot only.
    fn forgotten(&self, image: &str, wanted: &str) -> Result<Option<VaultError>, VaultError> {
        if wanted.is_empty() {
            return Ok(None);
        }
        let wanted_lower = wanted.to_ascii_lowercase();
        let index = self.store.index();
        let mut found = records::scan(index, &self.dir.site_id(), RecordKind::Snapshot)?
            .into_iter()
            .filter(Record::is_tombstone)
            .filter_map(|r| {
                let id = snapshot_id_of_key(&r.key)?;
                let at = Tombstone::decode(&r.body).ok()?.forgotten_unix_ms;
                id.to_string()
                    .starts_with(&wanted_lower)
                    .then_some((id, at))
            });
        Ok(match (found.next(), found.next()) {
            (Some((id, at_unix_ms)), None) => Some(VaultError::Forgotten {
                image: image.to_owned(),
                id,
                at: format!("{} UTC", units::utc(at_unix_ms)),
            }),
            _ => None,
        })
    }

    /// Loads chunks as plaintext: from the local store, else (with `remote`) fetched
    /// from the mesh and waited for.
    pub fn loader<'a>(
        &'a self,
        remote: Option<&'a dyn RemoteChunks>,
    ) -> impl FnMut(&ChunkId) -> Result<Vec<u8>, ChunkError> + 'a {
        let mut reader = self.store.reader();
        let mut opener = Opener::new();
        move |id: &ChunkId| match self.load_chunk(&mut reader, &mut opener, id) {
            Ok(plain) => Ok(plain),
            Err(local) => match remote {
                Some(remote) => {
                    fetch_blocking(remote, &self.keys, &mut opener, id).map_err(|remote| {
                        ChunkError::Unavailable {
                            local: Box::new(local),
                            remote: Box::new(remote),
                        }
                    })
                }
                None => Err(local),
            },
        }
    }

    /// The bytes the index or the catalog keeps for snapshot `id` (its seal id, then the
    /// sealed record), if this site has a live record of it.
    pub fn stored_snapshot(&self, id: &SnapshotId) -> Result<Option<Vec<u8>>, VaultError> {
        let index = self.store.index();
        if let Some((_, body)) = index.snapshots()?.into_iter().find(|(s, _)| s == id) {
            return Ok(Some(body));
        }
        let key = records::snapshot_key(id);
        Ok(
            records::get(index, &self.dir.site_id(), RecordKind::Snapshot, &key)?
                .filter(|r| !r.is_tombstone())
                .map(|r| r.body),
        )
    }

    /// Opens bytes `stored_snapshot` returned.
    pub fn open_stored_snapshot(
        &self,
        id: SnapshotId,
        stored: &[u8],
    ) -> Result<SnapshotRecord, VaultError> {
        self.decode_record(&mut Opener::new(), id, stored)
    }

    /// Walks a snapshot's manifest, calling `each(offset, extent)` in image order until it
    /// returns false. An error comes with the image offset where the walk stopped.
    pub fn walk_manifest(
        &self,
        record: &SnapshotRecord,
        each: impl FnMut(u64, Extent) -> bool,
    ) -> Result<(), (u64, ManifestError<ChunkError>)> {
        self.walk_manifest_from(record, None, each)
    }

    /// `walk_manifest`, fetching from `remote` (and waiting for) every manifest node that
    /// is missing or damaged in the local store.
    pub fn walk_manifest_from(
        &self,
        record: &SnapshotRecord,
        remote: Option<&dyn RemoteChunks>,
        mut each: impl FnMut(u64, Extent) -> bool,
    ) -> Result<(), (u64, ManifestError<ChunkError>)> {
        let mut load = self.loader(remote);
        let mut walk = ManifestWalk::new(record.manifest_root());
        loop {
            match walk.next(&mut load) {
                Ok(Some((offset, extent))) => {
                    if !each(offset, extent) {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err((walk.offset(), e)),
            }
        }
    }
}

/// The snapshot id a Snapshot record's key names: 16 bytes, then 16 zero bytes.
fn snapshot_id_of_key(key: &[u8; 32]) -> Option<SnapshotId> {
    let (id, padding) = key.split_at(16);
    padding
        .iter()
        .all(|b| *b == 0)
        .then(|| SnapshotId(id.try_into().expect("16 bytes")))
}
