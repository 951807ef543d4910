//! The engine's disk: a thread that carries out `StorageOp`s against the vault's pack
//! store and sled index and reports completions back to the node's loop. Writes that
//! arrive together share one pack fsync and one index commit. Partner chunks are stored
//! as the mesh carries them (sealed bytes and the owner's signature) with their owner
//! noted beside them. This site's own chunks have one format on disk however they
//! arrived, a backup's or the mesh's: the sealed chunk the vault opens, signed again when
//! read for the mesh. A chunk of this site's that reaches this node through the mesh (it
//! is the site's second node, or its pack was lost and fetched back) has its signature
//! checked and dropped before it is written, so verify, restore and dedup use it as
//! their own.
//!
//! The node's own bookkeeping (a snapshot confirmed at R, when a site was last heard
//! from, what partners hold) comes here too, as `Note`s: every index commit waits for an
//! fsync, and on the node's loop that wait stalls every peer (issue 14's 11 s pings).
//! None of it is something the engine or a peer relies on having been persisted: a
//! note lost in a crash is counted or confirmed again after the restart.

use std::sync::{Arc, Mutex};

use cairn_protocol::engine::{ChunkRef, StorageOp};
use cairn_protocol::identity::SiteId;
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{Record, RecordKind};
use crossbeam_channel::{Receiver, Sender};

use crate::records;
use crate::store::{IndexBatch, StoreError, ENTRY_BYTES_MAX, KEY_HELD_CHUNK};
use crate::vault::Vault;

/// Ops carried out per batch: bounds the time before the first completion is reported.
const OPS_PER_BATCH_MAX: usize = 256;

/// A completion for the engine.
#[derive(Debug)]
pub enum Done {
    Write { op: u64, ok: bool },
    Read { op: u64, blob: Option<Vec<u8>> },
}

/// What the node's loop writes without waiting: applied with the next batch, answered
/// to no one.
#[derive(Debug)]
pub enum Note {
    /// Catalog entries to set (a snapshot confirmed at R sites).
    Catalog(Vec<(Vec<u8>, Vec<u8>)>),
    /// `site` was heard from at this time (`cairn trust list`'s last seen).
    Seen { site: SiteId, now_unix_ms: u64 },
    /// This site's bytes each partner holds (`cairn trust list`'s they hold for us).
    HeldBy(Vec<(SiteId, u64)>),
}

/// What the storage thread is given: the engine's ops, and the loop's notes.
#[derive(Debug)]
pub enum Job {
    Engine(StorageOp),
    Note(Note),
}

/// What the node's loop keeps: where to send ops.
pub struct Storage {
    ops: Sender<Job>,
}

impl Storage {
    /// Starts the storage thread. `write_lock` is held while packs are written: the
    /// store has one writer at a time, and backups run in the same process.
    pub fn start(
        vault: Arc<Vault>,
        write_lock: Arc<Mutex<()>>,
        done: tokio::sync::mpsc::UnboundedSender<Done>,
    ) -> Storage {
        let (ops, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("cairn-storage".into())
            .spawn(move || run(&vault, &write_lock, &rx, &done))
            .expect("spawn the storage thread");
        Storage { ops }
    }

    pub fn submit(&self, op: StorageOp) {
        // The thread ends only when this sender is dropped.
        let _ = self.ops.send(Job::Engine(op));
    }

    /// Hands the node's bookkeeping to the storage thread: the loop never waits for it.
    pub fn note(&self, note: Note) {
        let _ = self.ops.send(Job::Note(note));
    }
}

fn run(
    vault: &Vault,
    write_lock: &Mutex<()>,
    rx: &Receiver<Job>,
    done: &tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let own = vault.dir.site_id();
    let mut reader = vault.store.reader();
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < OPS_PER_BATCH_MAX {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut writes = Vec::new();
        let mut batch = IndexBatch::default();
        let mut held_delta: Vec<(SiteId, i64)> = Vec::new();
        let mut notes = Vec::new();
        for job in ops {
            let op = match job {
                Job::Engine(op) => op,
                Job::Note(Note::Catalog(entries)) => {
                    batch.catalog.extend(entries);
                    continue;
                }
                Job::Note(note) => {
                    notes.push(note);
                    continue;
                }
            };
            match op {
                StorageOp::Write {
                    op,
                    owner,
                    id,
                    sealed,
                } => writes.push((op, owner, id, sealed)),
                StorageOp::Read { op, id } => {
                    let blob = reader.read(&id).ok().map(|sealed| {
                        if owner_of(vault, &id).is_none() {
                            own_blob(vault, &id, sealed)
                        } else {
                            sealed
                        }
                    });
                    let _ = done.send(Done::Read { op, blob });
                }
                StorageOp::Delete { owner, id } => {
                    if owner == own {
                        // This site's own chunks are its local backup: never dropped here.
                        continue;
                    }
                    if let Ok(Some(location)) = vault.store.index().chunk(&id) {
                        batch.removed_chunks.push(id);
                        batch.removed_catalog.push([KEY_HELD_CHUNK, &id.0].concat());
                        held_delta.push((owner, -i64::from(location.len_bytes)));
                    }
                }
                StorageOp::SaveRecord(record) => save_record(vault, &mut batch, &record),
                StorageOp::DropRecord(key) => {
                    batch
                        .removed_catalog
                        .push(records::key_of(&key.author, key.kind, &key.key));
                }
            }
        }
        let write_results = if writes.is_empty() {
            Vec::new()
        } else {
            let _guard = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            write_chunks(vault, writes, &mut held_delta)
        };
        // A batch that drops chunks commits under the write lock: a repack re-points a
        // pack's chunks under it, so a chunk dropped here is never brought back there.
        let _dropping = (!batch.removed_chunks.is_empty())
            .then(|| write_lock.lock().unwrap_or_else(|e| e.into_inner()));
        let committed = match vault.store.index().commit(batch) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("the index refused a batch of the engine's changes: {e}");
                false
            }
        };
        for (owner, delta) in held_delta {
            if owner != own {
                let _ = vault.store.add_held_for(&owner, delta);
            }
        }
        for (op, ok) in write_results {
            let _ = done.send(Done::Write {
                op,
                ok: ok && committed,
            });
        }
        for note in notes {
            apply_note(vault, note);
        }
    }
}

/// The counters of `cairn trust list`, after the batch's completions went out.
fn apply_note(vault: &Vault, note: Note) {
    let result = match note {
        Note::Catalog(_) => Ok(()), // part of the batch
        Note::Seen { site, now_unix_ms } => vault.store.note_seen(&site, now_unix_ms),
        Note::HeldBy(held) => held
            .iter()
            .try_for_each(|(site, bytes)| vault.store.set_held_by(site, *bytes)),
    };
    if let Err(e) = result {
        tracing::debug!("cannot note what trust list shows: {e}");
    }
}

/// Appends partner chunks to the packs and indexes them with their owners; every write
/// in the batch succeeds or fails together.
fn write_chunks(
    vault: &Vault,
    writes: Vec<(u64, SiteId, ChunkId, Vec<u8>)>,
    held_delta: &mut Vec<(SiteId, i64)>,
) -> Vec<(u64, bool)> {
    let own = vault.dir.site_id();
    let mut results = Vec::new();
    let (writes, too_big): (Vec<_>, Vec<_>) = writes
        .into_iter()
        .partition(|(_, _, _, blob)| blob.len() <= ENTRY_BYTES_MAX);
    results.extend(too_big.into_iter().map(|(op, ..)| (op, false)));
    let mut kept = Vec::with_capacity(writes.len());
    for (op, owner, id, blob) in writes {
        if owner != own {
            kept.push((op, owner, id, blob));
            continue;
        }
        // The engine checked the signature; it is checked again here because dropping
        // it is what makes the bytes this site's own from now on.
        match own_sealed(&own, &id, blob) {
            Some(sealed) => kept.push((op, owner, id, sealed)),
            None => results.push((op, false)),
        }
    }
    let writes = kept;
    // Owners first: an owner entry without its chunk is harmless, but a chunk indexed
    // without its owner (a crash between two commits, or an entry re-indexed when the
    // pack is reopened) would be taken for this site's own.
    let owners = IndexBatch {
        catalog: writes
            .iter()
            .filter(|(_, owner, ..)| *owner != own)
            .map(|(_, owner, id, _)| ([KEY_HELD_CHUNK, &id.0].concat(), owner.0.to_vec()))
            .collect(),
        ..IndexBatch::default()
    };
    if vault.store.index().commit(owners).is_err() {
        results.extend(writes.into_iter().map(|(op, ..)| (op, false)));
        return results;
    }
    let mut writer = vault.store.writer();
    let mut appended = Vec::new();
    for (op, owner, id, blob) in writes {
        match writer.append(&id, &blob) {
            Ok(_) => appended.push((op, owner, blob.len() as i64)),
            Err(_) => results.push((op, false)),
        }
    }
    let ok = writer.commit().is_ok();
    for (op, owner, len) in appended {
        if ok {
            held_delta.push((owner, len));
        }
        results.push((op, ok));
    }
    results
}

/// The sealed chunk inside a blob of this site's, when the site signed it as `id`.
fn own_sealed(own: &SiteId, id: &ChunkId, mut blob: Vec<u8>) -> Option<Vec<u8>> {
    let sealed_len = cairn_protocol::blob::verify_blob(own, id, &blob)?.len();
    blob.truncate(sealed_len);
    Some(blob)
}

/// Rewrites the chunks of this site's that an older build stored as mesh blobs (marked
/// with this site as their owner) into the vault's format, and drops the marks. Runs
/// before the node's loop starts, with the store's write lock held. Safe to stop at any
/// point: the pack is fsynced and indexed before a mark is dropped, and an entry whose
/// bytes no longer carry the site's signature (rewritten by a run that was stopped before
/// it dropped the mark) only loses its mark. Returns how many chunks were rewritten.
pub fn migrate_own_blobs(vault: &Vault) -> Result<usize, StoreError> {
    let own = vault.dir.site_id();
    let index = vault.store.index();
    let marked: Vec<ChunkId> = index
        .catalog_scan(KEY_HELD_CHUNK)?
        .into_iter()
        .filter(|(_, owner)| owner[..] == own.0[..])
        .filter_map(|(key, _)| <[u8; 32]>::try_from(&key[KEY_HELD_CHUNK.len()..]).ok())
        .map(ChunkId)
        .collect();
    if marked.is_empty() {
        return Ok(0);
    }
    let mut reader = vault.store.reader();
    let mut writer = vault.store.writer();
    let mut n_rewritten = 0;
    for id in &marked {
        let Ok(stored) = reader.read(id) else {
            continue; // a lost pack: the mesh brings the chunk back in the new format
        };
        if let Some(sealed) = own_sealed(&own, id, stored) {
            writer.append(id, &sealed)?;
            n_rewritten += 1;
        }
    }
    writer.commit()?;
    index.commit(IndexBatch {
        removed_catalog: marked
            .iter()
            .map(|id| [KEY_HELD_CHUNK, &id.0].concat())
            .collect(),
        ..IndexBatch::default()
    })?;
    Ok(n_rewritten)
}

/// The owner of a partner chunk held here; None for this site's own chunks.
fn owner_of(vault: &Vault, id: &ChunkId) -> Option<SiteId> {
    let bytes = vault
        .store
        .index()
        .catalog_get(&[KEY_HELD_CHUNK, &id.0].concat())
        .ok()??;
    Some(SiteId(bytes.try_into().ok()?))
}

/// A record from the engine: kept under its catalog key. This site's own snapshot
/// records are also written where `cairn snapshots` and `cairn restore` look, so a
/// recovered node learns its site's snapshots from the mesh.
fn save_record(vault: &Vault, batch: &mut IndexBatch, record: &Record) {
    batch.catalog.push(records::entry(record));
    tracing::debug!(
        "saving record kind {:?} of {} version {}",
        record.kind,
        record.author,
        record.version
    );
    if record.kind == RecordKind::Snapshot && record.author == vault.dir.site_id() {
        let id = records::snapshot_id_of_key(&record.key);
        if record.is_tombstone() {
            // Forgotten on another node of the site: gone from `cairn snapshots` here too.
            batch.removed_snapshots.push(id);
        } else {
            batch.snapshots.push((id, record.body.clone()));
        }
    }
}

/// This site's sealed chunk as the mesh carries it: signed with the site key, so every
/// holder can check it without the vault key.
pub fn own_blob(vault: &Vault, id: &ChunkId, sealed: Vec<u8>) -> Vec<u8> {
    cairn_protocol::blob::sign_blob(&vault.dir.site_key, id, &sealed)
}

/// Bytes a blob adds to the sealed chunk.
pub const BLOB_EXTRA_BYTES: u64 = cairn_protocol::blob::BLOB_SIGNATURE_BYTES as u64;

/// Every chunk on this node's disk, with its owner, for `Engine::load_chunk`.
pub fn held_chunks(vault: &Vault) -> Result<Vec<ChunkRef>, StoreError> {
    let own = vault.dir.site_id();
    let mut partner: std::collections::HashMap<ChunkId, SiteId> = Default::default();
    for (key, value) in vault.store.index().catalog_scan(KEY_HELD_CHUNK)? {
        if let (Ok(id), Ok(owner)) = (
            <[u8; 32]>::try_from(&key[KEY_HELD_CHUNK.len()..]),
            <[u8; 32]>::try_from(&value[..]),
        ) {
            partner.insert(ChunkId(id), SiteId(owner));
        }
    }
    Ok(vault
        .store
        .index()
        .chunks()?
        .into_iter()
        .map(|(id, location)| match partner.get(&id) {
            Some(owner) => ChunkRef {
                owner: *owner,
                id,
                size_bytes: u64::from(location.len_bytes),
            },
            None => ChunkRef {
                owner: own,
                id,
                size_bytes: u64::from(location.len_bytes) + BLOB_EXTRA_BYTES,
            },
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use cairn_protocol::identity::SiteId;
    use cairn_protocol::ids::ChunkId;

    use super::{held_chunks, migrate_own_blobs, own_blob, owner_of, write_chunks, Note, Storage};
    use crate::store::{IndexBatch, KEY_HELD_CHUNK};
    use crate::vault::Vault;
    use cairn_protocol::seal::{Opener, Sealer};

    /// A vault in a temp dir and one sealed chunk of its site.
    fn vault_with_chunk() -> (tempfile::TempDir, Vault, ChunkId, Vec<u8>, Vec<u8>) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let vault = Vault::init(&tmp.path().join("data"), "Office A").expect("init");
        let plaintext = b"a chunk of the site's own image".repeat(100);
        let id = vault.keys.chunk_id(&plaintext);
        let sealed = Sealer::new(2)
            .expect("sealer")
            .seal(&vault.keys, &id, &plaintext, [7; 24])
            .expect("seal");
        (tmp, vault, id, sealed, plaintext)
    }

    /// The `held-chunk/` mark: what the storage thread writes beside a chunk held for
    /// `owner` (and what builds before this one wrote beside an own chunk stored as a
    /// blob).
    pub(crate) fn mark_owner(vault: &Vault, id: &ChunkId, owner: &SiteId) {
        vault
            .store
            .index()
            .commit(IndexBatch {
                catalog: vec![([KEY_HELD_CHUNK, &id.0].concat(), owner.0.to_vec())],
                ..IndexBatch::default()
            })
            .expect("mark");
    }

    fn opens(vault: &Vault, id: &ChunkId) -> Result<Vec<u8>, String> {
        let mut reader = vault.store.reader();
        vault
            .load_chunk(&mut reader, &mut Opener::new(), id)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_loops_notes_are_written_by_the_storage_thread() {
        let (_tmp, vault, _, _, _) = vault_with_chunk();
        let vault = std::sync::Arc::new(vault);
        let (done_tx, _done_rx) = tokio::sync::mpsc::unbounded_channel();
        let storage = Storage::start(
            vault.clone(),
            std::sync::Arc::new(std::sync::Mutex::new(())),
            done_tx,
        );
        let partner = SiteId([5; 32]);
        storage.note(Note::Catalog(vec![(b"acked/test".to_vec(), vec![1])]));
        storage.note(Note::Seen {
            site: partner,
            now_unix_ms: 1_000,
        });
        storage.note(Note::HeldBy(vec![(partner, 4096)]));
        // The thread writes them in its next batch; wait for it, boundedly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let usage = vault.store.usage(&partner).expect("usage");
            let acked = vault.store.index().catalog_get(b"acked/test").expect("get");
            if usage.last_seen_unix_ms == Some(1_000)
                && usage.held_by_them_bytes == 4096
                && acked == Some(vec![1])
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the notes were not written: {acked:?}, {:?}, {}",
                usage.last_seen_unix_ms,
                usage.held_by_them_bytes
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_partner_chunk_is_deleted_only_under_the_write_lock() {
        // A repack re-points a pack's chunks under the write lock: a deletion committed
        // while it holds the lock would be undone by its index batch.
        let (_tmp, vault, _, _, _) = vault_with_chunk();
        let partner = SiteId([5; 32]);
        let held = ChunkId([9; 32]);
        mark_owner(&vault, &held, &partner);
        let mut writer = vault.store.writer();
        writer.append(&held, &[3; 500]).expect("append");
        writer.commit().expect("commit");
        let vault = std::sync::Arc::new(vault);
        let lock = std::sync::Arc::new(std::sync::Mutex::new(()));
        let (done_tx, _done_rx) = tokio::sync::mpsc::unbounded_channel();
        let storage = Storage::start(vault.clone(), lock.clone(), done_tx);
        let indexed = || vault.store.contains(&held).expect("index");
        let guard = lock.lock().expect("lock");
        storage.submit(cairn_protocol::engine::StorageOp::Delete {
            owner: partner,
            id: held,
        });
        // Bounded: long enough for the thread to have committed, were it not waiting.
        for _ in 0..50 {
            assert!(indexed(), "deleted while the write lock was held");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(guard);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while indexed() {
            assert!(
                std::time::Instant::now() < deadline,
                "never deleted after the lock was let go"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(owner_of(&vault, &held), None, "its mark goes with it");
    }

    #[test]
    fn a_chunk_of_this_site_from_the_mesh_is_stored_as_the_vault_stores_it() {
        let (_tmp, vault, id, sealed, plaintext) = vault_with_chunk();
        let own = vault.dir.site_id();
        let blob = own_blob(&vault, &id, sealed.clone());
        let mut held_delta = Vec::new();
        let results = write_chunks(&vault, vec![(1, own, id, blob)], &mut held_delta);
        assert_eq!(results, vec![(1, true)]);
        assert_eq!(opens(&vault, &id), Ok(plaintext));
        assert_eq!(
            owner_of(&vault, &id),
            None,
            "no partner mark on our own chunk"
        );
        assert_eq!(vault.store.reader().read(&id).expect("read"), sealed);
        // Read back for the mesh, it is a blob the site's signature covers again.
        let chunks = held_chunks(&vault).expect("held");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].owner, own);
    }

    #[test]
    fn a_blob_of_this_site_with_a_bad_signature_is_not_stored() {
        let (_tmp, vault, id, sealed, _) = vault_with_chunk();
        let mut blob = own_blob(&vault, &id, sealed);
        let last = blob.len() - 1;
        blob[last] ^= 1;
        let results = write_chunks(
            &vault,
            vec![(1, vault.dir.site_id(), id, blob)],
            &mut Vec::new(),
        );
        assert_eq!(results, vec![(1, false)]);
        assert!(vault.store.index().chunk(&id).expect("index").is_none());
    }

    #[test]
    fn chunks_an_older_build_stored_as_blobs_are_rewritten_once() {
        let (_tmp, vault, id, sealed, plaintext) = vault_with_chunk();
        let own = vault.dir.site_id();
        // What builds before this one wrote: the blob, and this site marked as owner.
        mark_owner(&vault, &id, &own);
        let mut writer = vault.store.writer();
        writer
            .append(&id, &own_blob(&vault, &id, sealed.clone()))
            .expect("append");
        writer.commit().expect("commit");
        assert!(
            opens(&vault, &id).is_err(),
            "the old format does not open as a vault chunk"
        );

        assert_eq!(migrate_own_blobs(&vault).expect("migrate"), 1);
        assert_eq!(opens(&vault, &id), Ok(plaintext));
        assert_eq!(owner_of(&vault, &id), None);
        assert_eq!(migrate_own_blobs(&vault).expect("again"), 0, "nothing left");
    }

    #[test]
    fn a_migration_stopped_before_it_dropped_the_marks_finishes_on_the_next_start() {
        let (_tmp, vault, id, sealed, plaintext) = vault_with_chunk();
        let own = vault.dir.site_id();
        // Rewritten already, the mark still there: a run stopped between its two commits.
        let mut writer = vault.store.writer();
        writer.append(&id, &sealed).expect("append");
        writer.commit().expect("commit");
        mark_owner(&vault, &id, &own);
        assert_eq!(migrate_own_blobs(&vault).expect("migrate"), 0);
        assert_eq!(owner_of(&vault, &id), None);
        assert_eq!(opens(&vault, &id), Ok(plaintext));
    }
}
