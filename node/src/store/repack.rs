//! Giving disk back (the store half of `cairn prune`, docs/retention.md 2.2 phases 3 and 4):
//! `sweep` drops chunks from the index, `repack` rewrites packs whose bytes are mostly no
//! longer indexed and retires the old ones.
//!
//! Retiring a pack, in this order, so that kill -9 at any instant leaves a store that opens
//! with every live chunk readable and no dropped chunk back:
//! 1. its live entries are appended with the normal writer, and fsynced;
//! 2. one index batch re-points them, records the new pack lengths, removes the old pack
//!    from `packs` and adds a `retired-pack/` key for it;
//! 3. the old pack file is unlinked and the packs directory fsynced;
//! 4. the `retired-pack/` key is removed.
//!
//! `Store::recover` unlinks every pack a `retired-pack/` key names before it looks at
//! packs: a retired pack has no committed length any more, so its tail scan would index
//! all of its entries again (garbage, and partner chunks whose `held-chunk/` marks are
//! gone, which would then be taken for this site's own).
//!
//! Pack ids are never reused (a reader may still hold a retired pack's file open): the
//! batch that retires a pack raises `pack-id-max` to its id, and a new pack's id is past
//! it. The newest pack may be retired too (a small store has only one): its live entries
//! then go to a new pack, never to itself.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use cairn_protocol::identity::SiteId;
use cairn_protocol::ChunkId;

use super::{
    entry_checksum, entry_head, io, ChunkLocation, IndexBatch, PackId, Store, StoreError,
    ENTRY_CHECKSUM_BYTES, ENTRY_HEAD_BYTES, KEY_HELD_CHUNK, PACK_HEADER_BYTES,
};

/// `retired-pack/` + pack id (u32 big-endian) -> empty: a pack whose entries the index no
/// longer names, to be unlinked (by `repack`, or by `recover` after a crash).
pub const KEY_RETIRED_PACK: &[u8] = b"retired-pack/";
/// Chunk ids dropped in one index batch by `sweep`.
pub const SWEEP_BATCH_IDS_MAX: usize = 4096;

/// What `sweep` dropped from the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Swept {
    pub n_chunks: u64,
    /// Sealed bytes, as the index gives their lengths.
    pub bytes: u64,
}

/// A committed pack: its size on disk, and the bytes of the entries the index points at.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PackUsage {
    pub pack: u32,
    pub bytes: u64,
    /// Whole entries (head, sealed bytes, checksum) of chunks the index locates here.
    pub live_bytes: u64,
}

impl PackUsage {
    /// The share of the pack no indexed entry uses (the header counts as used).
    pub fn unused_share(&self) -> f64 {
        let unused = self
            .bytes
            .saturating_sub(PACK_HEADER_BYTES)
            .saturating_sub(self.live_bytes);
        if self.bytes == 0 {
            0.0
        } else {
            unused as f64 / self.bytes as f64
        }
    }
}

/// What `repack` did. A pack counts once: as rewritten when it had live entries to copy,
/// as deleted when it had none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Repacked {
    pub packs_rewritten: u64,
    pub packs_deleted: u64,
    /// Pack bytes on disk when the run started and when it ended.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Entry bytes copied to new places.
    pub bytes_copied: u64,
    /// Packs left as they are because an entry failed its checksum: `cairn verify` names
    /// what it holds. Nothing is copied from a damaged pack, so no damage is hidden.
    pub packs_damaged: u64,
}

/// Reported after each pack a repack considered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepackProgress {
    Pack {
        done: u64,
        of: u64,
        bytes_copied: u64,
    },
}

/// A point in `sweep` or `repack` where a test can stop the run as a crash would. In debug
/// builds, `CAIRN_TEST_CRASH_AT=<name>` makes the process abort (as kill -9 would) the
/// first time it reaches that point, so an end-to-end test can crash the real binary there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// `sweep-batch`: a sweep batch committed, more to come.
    SweepBatch,
    /// `repack-copied`: a pack's live entries are written and fsynced, not indexed.
    RepackCopied,
    /// `repack-committed`: the index points at the copies and names the old pack retired;
    /// its file is still there.
    RepackCommitted,
    /// `repack-unlinked`: the old pack's file is gone, its `retired-pack/` key is not.
    RepackUnlinked,
}

impl CrashPoint {
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::SweepBatch => "sweep-batch",
            CrashPoint::RepackCopied => "repack-copied",
            CrashPoint::RepackCommitted => "repack-committed",
            CrashPoint::RepackUnlinked => "repack-unlinked",
        }
    }

    /// Aborts the process at this point when `CAIRN_TEST_CRASH_AT` names it (debug builds
    /// only; release builds never read the variable).
    fn abort_if_asked(self) {
        #[cfg(debug_assertions)]
        if std::env::var("CAIRN_TEST_CRASH_AT").is_ok_and(|name| name == self.name()) {
            eprintln!("CAIRN_TEST_CRASH_AT={}: aborting here", self.name());
            std::process::abort();
        }
    }
}

/// Told of each crash point as it is reached; true stops the run there, leaving the store
/// as a crash would (the tests' stop points).
type StopAt<'a> = &'a dyn Fn(CrashPoint) -> bool;

fn never_stop(_: CrashPoint) -> bool {
    false
}

fn reached(point: CrashPoint, stop_at: StopAt<'_>) -> bool {
    point.abort_if_asked();
    stop_at(point)
}

fn retired_key(pack: PackId) -> Vec<u8> {
    [KEY_RETIRED_PACK, &pack.0.to_be_bytes()[..]].concat()
}

fn entry_bytes(location: &ChunkLocation) -> u64 {
    ENTRY_HEAD_BYTES + u64::from(location.len_bytes) + ENTRY_CHECKSUM_BYTES
}

impl Store {
    /// Drops these chunks' index entries and their `held-chunk/` marks, in index batches of
    /// at most `SWEEP_BATCH_IDS_MAX` ids. Idempotent: ids not in the index are skipped.
    /// Pack bytes stay until `repack`. Returns what was dropped (bytes = sealed lengths
    /// from the index). Inside a node, call it with the store's write lock held, as prune
    /// does, so no backup dedups against a chunk between its lookup and its commit.
    pub fn sweep(&self, ids: &[ChunkId]) -> Result<Swept, StoreError> {
        self.sweep_until(ids, &never_stop)
    }

    fn sweep_until(&self, ids: &[ChunkId], stop_at: StopAt<'_>) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        let mut batches = ids.chunks(SWEEP_BATCH_IDS_MAX).peekable();
        while let Some(ids) = batches.next() {
            let mut batch = IndexBatch::default();
            let mut held_delta: BTreeMap<[u8; 32], i64> = BTreeMap::new();
            for id in ids {
                let Some(location) = self.index.chunk(id)? else {
                    continue;
                };
                let mark = [KEY_HELD_CHUNK, &id.0].concat();
                if let Some(owner) = self.index.catalog_get(&mark)? {
                    if let Ok(owner) = <[u8; 32]>::try_from(&owner[..]) {
                        *held_delta.entry(owner).or_default() -= i64::from(location.len_bytes);
                    }
                }
                batch.removed_chunks.push(*id);
                batch.removed_catalog.push(mark);
                swept.n_chunks += 1;
                swept.bytes += u64::from(location.len_bytes);
            }
            if batch.removed_chunks.is_empty() {
                continue;
            }
            self.index.commit(batch)?;
            // A partner's chunk (prune passes only this site's, but the count stays true
            // for any caller): what `cairn trust list` shows as held for it.
            for (owner, delta) in held_delta {
                self.add_held_for(&SiteId(owner), delta)?;
            }
            if batches.peek().is_some() && reached(CrashPoint::SweepBatch, stop_at) {
                break;
            }
        }
        Ok(swept)
    }

    /// Committed packs with their size on disk and the bytes of entries the index still
    /// points at (one scan of the index, not one per pack).
    pub fn pack_usage(&self) -> Result<Vec<PackUsage>, StoreError> {
        Ok(self.pack_usage_and_live()?.0)
    }

    /// `pack_usage`, and the live entries of each pack, in offset order.
    #[allow(clippy::type_complexity)]
    fn pack_usage_and_live(
        &self,
    ) -> Result<
        (
            Vec<PackUsage>,
            BTreeMap<PackId, Vec<(ChunkId, ChunkLocation)>>,
        ),
        StoreError,
    > {
        let mut live: BTreeMap<PackId, Vec<(ChunkId, ChunkLocation)>> = BTreeMap::new();
        for (id, location) in self.index.chunks()? {
            live.entry(location.pack).or_default().push((id, location));
        }
        let mut usage = Vec::new();
        for (pack, _) in self.index.packs()? {
            let path = self.pack_path(pack);
            let bytes = match fs::metadata(&path) {
                Ok(meta) => meta.len(),
                // Committed but gone: recovery's business, not a pack to rewrite.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            };
            let entries = live.entry(pack).or_default();
            entries.sort_by_key(|(_, location)| location.offset);
            usage.push(PackUsage {
                pack: pack.0,
                bytes,
                live_bytes: entries.iter().map(|(_, l)| entry_bytes(l)).sum(),
            });
        }
        Ok((usage, live))
    }

    /// Rewrites every committed pack whose unreferenced share is at least `unused_min` (0.10 = borg compact's 10 %): copies its
    /// live entries with the normal writer, then retires the old pack (see the module doc).
    /// A pack with no live entry is simply retired. `write_lock`, when given (inside a
    /// running node: the mesh's write lock, the one backups hold), is taken per pack, not
    /// for the whole run, so the caller must not hold it (it is not reentrant).
    pub fn repack(
        &self,
        unused_min: f64,
        write_lock: Option<&Mutex<()>>,
        progress: &dyn Fn(RepackProgress),
    ) -> Result<Repacked, StoreError> {
        self.repack_until(unused_min, write_lock, progress, &never_stop)
    }

    fn repack_until(
        &self,
        unused_min: f64,
        write_lock: Option<&Mutex<()>>,
        progress: &dyn Fn(RepackProgress),
        stop_at: StopAt<'_>,
    ) -> Result<Repacked, StoreError> {
        assert!(
            (0.0..=1.0).contains(&unused_min),
            "the repack threshold is a share, checked where it is configured"
        );
        let mut repacked = Repacked {
            bytes_before: self.packs_bytes()?,
            ..Repacked::default()
        };
        let newest = self.pack_ids_on_disk()?.last().map(|p| p.0);
        let (usage, mut live) = self.pack_usage_and_live()?;
        let mut candidates: Vec<PackUsage> = usage
            .into_iter()
            .filter(|u| u.live_bytes == 0 || u.unused_share() >= unused_min)
            .collect();
        // The newest first: its copies go to a new pack, and every later copy lands past
        // it (a writer never appends to a pack older than a retired one), so no copy
        // lands in a pack this run retires later from its stale scan.
        candidates.sort_by_key(|u| (Some(u.pack) != newest, u.pack));
        let of = candidates.len() as u64;
        for (done, candidate) in candidates.iter().enumerate() {
            let pack = PackId(candidate.pack);
            let entries = live.remove(&pack).unwrap_or_default();
            let _guard = write_lock.map(|lock| lock.lock().unwrap_or_else(|e| e.into_inner()));
            let outcome = self.retire_pack(pack, entries, stop_at)?;
            match outcome {
                Retired::Stopped => break,
                Retired::Skipped => {}
                Retired::Damaged => repacked.packs_damaged += 1,
                Retired::Done { bytes_copied } => {
                    if bytes_copied == 0 {
                        repacked.packs_deleted += 1;
                    } else {
                        repacked.packs_rewritten += 1;
                    }
                    repacked.bytes_copied += bytes_copied;
                }
            }
            progress(RepackProgress::Pack {
                done: done as u64 + 1,
                of,
                bytes_copied: repacked.bytes_copied,
            });
        }
        repacked.bytes_after = self.packs_bytes()?;
        Ok(repacked)
    }

    /// Steps 1 to 4 for one pack; the caller holds the write lock. `entries` are the pack's
    /// live entries as the run's index scan found them; each is checked again here.
    fn retire_pack(
        &self,
        pack: PackId,
        entries: Vec<(ChunkId, ChunkLocation)>,
        stop_at: StopAt<'_>,
    ) -> Result<Retired, StoreError> {
        let path = self.pack_path(pack);
        let committed_len = self
            .index
            .packs()?
            .into_iter()
            .find_map(|(p, len)| (p == pack).then_some(len));
        let file_len = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Retired::Skipped),
            Err(e) => return Err(io(&path)(e)),
        };
        if committed_len != Some(file_len) {
            // Not committed, or an uncommitted tail: recovery's business.
            return Ok(Retired::Skipped);
        }
        // Only entries still located here: the index may have moved on since the scan.
        let mut still = Vec::with_capacity(entries.len());
        for (id, location) in entries {
            if self.index.chunk(&id)? == Some(location) {
                still.push((id, location));
            }
        }
        let file = File::open(&path).map_err(io(&path))?;
        let mut writer = self.writer();
        writer.defer_commits = true;
        writer.fresh_pack = self.pack_ids_on_disk()?.last() == Some(&pack);
        let mut bytes_copied = 0;
        let mut damaged = false;
        let mut entry = Vec::new();
        for (id, location) in &still {
            entry.resize(entry_bytes(location) as usize, 0);
            file.read_exact_at(&mut entry, location.offset - ENTRY_HEAD_BYTES)
                .map_err(io(&path))?;
            let (head, rest) = entry.split_at(ENTRY_HEAD_BYTES as usize);
            let (sealed, checksum) = rest.split_at(location.len_bytes as usize);
            // The head is the one `append` writes for this id and length, so the checked
            // checksum is the copy's too.
            if head != entry_head(id, location.len_bytes)
                || checksum != entry_checksum(head, sealed)
            {
                // Copied so far: indexed below, so no uncommitted tail is left. The rest,
                // and the pack, stay where verify finds them.
                damaged = true;
                break;
            }
            writer.append_checked(id, sealed, checksum)?;
            bytes_copied += entry_bytes(location);
        }
        let mut batch = writer.finish()?;
        if reached(CrashPoint::RepackCopied, stop_at) {
            return Ok(Retired::Stopped);
        }
        // Re-point only what still is where it was copied from: a chunk dropped meanwhile
        // (the mesh deletes partner chunks under the same lock) stays dropped, and its copy
        // is garbage for a later repack.
        let mut repointed = Vec::with_capacity(batch.chunks.len());
        for ((id, new_location), (old_id, old_location)) in batch.chunks.iter().zip(&still) {
            debug_assert_eq!(id, old_id, "the writer appends in order");
            if self.index.chunk(id)? == Some(*old_location) {
                repointed.push((*id, *new_location));
            }
        }
        batch.chunks = repointed;
        if damaged {
            self.index.commit(batch)?;
            return Ok(Retired::Damaged);
        }
        batch.removed_packs.push(pack);
        batch.catalog.push((retired_key(pack), Vec::new()));
        let id_max = match self.index.catalog_get(super::KEY_PACK_ID_MAX)? {
            Some(bytes) => super::decode_counter(&bytes)?.max(u64::from(pack.0)),
            None => u64::from(pack.0),
        };
        batch.catalog.push((
            super::KEY_PACK_ID_MAX.to_vec(),
            id_max.to_le_bytes().to_vec(),
        ));
        self.index.commit(batch)?;
        if reached(CrashPoint::RepackCommitted, stop_at) {
            return Ok(Retired::Stopped);
        }
        self.unlink_pack(pack)?;
        if reached(CrashPoint::RepackUnlinked, stop_at) {
            return Ok(Retired::Stopped);
        }
        self.index.commit(IndexBatch {
            removed_catalog: vec![retired_key(pack)],
            ..IndexBatch::default()
        })?;
        Ok(Retired::Done { bytes_copied })
    }

    /// Step 3: the file goes, durably, and readers let go of the files they hold open.
    fn unlink_pack(&self, pack: PackId) -> Result<(), StoreError> {
        let path = self.pack_path(pack);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        File::open(&self.packs_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io(&self.packs_dir))?;
        self.retired.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Finishes what a crash interrupted after step 2: every pack a `retired-pack/` key
    /// names is unlinked, then the keys go. Runs first in `recover`.
    pub(super) fn finish_retired(&mut self) -> Result<(), StoreError> {
        let keys: Vec<Vec<u8>> = self
            .index
            .catalog_scan(KEY_RETIRED_PACK)?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        for key in &keys {
            let id = <[u8; 4]>::try_from(&key[KEY_RETIRED_PACK.len()..])
                .map_err(|_| StoreError::Index("malformed retired-pack key".into()))?;
            let pack = PackId(u32::from_be_bytes(id));
            if self.index.packs()?.iter().any(|(p, _)| *p == pack) {
                // Never written so by repack (one batch removes the pack and adds the
                // key): keep the file, as the index may still locate chunks in it.
                self.warnings.push(format!(
                    "{} is named retired but is still committed; it was kept",
                    self.pack_path(pack).display()
                ));
                continue;
            }
            self.unlink_pack(pack)?;
        }
        self.index.commit(IndexBatch {
            removed_catalog: keys,
            ..IndexBatch::default()
        })
    }
}

enum Retired {
    Done {
        bytes_copied: u64,
    },
    /// Not a whole, committed pack any more; left alone.
    Skipped,
    Damaged,
    /// A test's stop point.
    Stopped,
}

#[cfg(test)]
mod tests;
