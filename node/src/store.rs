//! The local chunk store: sealed chunks in append-only pack files, located through the
//! metadata index.
//!
//! Pack format 1: a 16-byte header (`CAIRNPAK`, version byte, 7 zero bytes), then entries:
//!
//! ```text
//! u32 ENTRY_MAGIC | [32] chunk id | u32 sealed_len | sealed bytes | [16] checksum
//! ```
//!
//! where the checksum is BLAKE3 over everything before it in the entry, truncated. The
//! checksum lets recovery tell a torn tail from a complete entry without the vault key.
//!
//! Write order (what makes a crash at any instant safe):
//! 1. entries are appended to the open pack;
//! 2. the pack is fsynced (and the packs directory, when the pack is new);
//! 3. the index gets the entries' locations and the pack's committed length in one atomic
//!    batch, and is flushed;
//! 4. only after that are snapshot records committed, in their own flushed batch.
//!
//! So an indexed chunk is always on disk, and a snapshot only names indexed chunks. On open,
//! a pack longer than its committed length is scanned from there: whole entries are indexed
//! (so a re-run backup reuses them) and the torn remainder is cut off.
//!
//! Packs are only appended to, except by `repack` (store/repack.rs), which copies a pack's
//! live entries elsewhere and then retires it through a `retired-pack/` catalog key that
//! `recover` finishes first.

pub mod index;
pub mod repack;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_protocol::identity::SiteId;
use cairn_protocol::ChunkId;
use thiserror::Error;

use index::decode_counter;
pub use index::{ChunkLocation, IndexBatch, MetaIndex, SledIndex};
pub use repack::{
    CrashPoint, PackUsage, RepackProgress, Repacked, Swept, KEY_RETIRED_PACK, SWEEP_BATCH_IDS_MAX,
};

const PACK_MAGIC: &[u8; 8] = b"CAIRNPAK";
pub const PACK_VERSION: u8 = 1;
/// Largest entry a pack holds: a sealed chunk, plus its owner's 64-byte signature when
/// it is a partner's chunk stored as the mesh carries it.
pub const ENTRY_BYTES_MAX: usize = cairn_protocol::blob::BLOB_BYTES_MAX;
const PACK_HEADER_BYTES: u64 = 16;
const ENTRY_MAGIC: u32 = 0xCA1C_0E01;
const ENTRY_HEAD_BYTES: u64 = 4 + 32 + 4;
const ENTRY_CHECKSUM_BYTES: u64 = 16;
/// A pack is closed once it passes this size; restore reads from many packs at once.
pub const PACK_BYTES_TARGET: u64 = 128 << 20;
/// Pack files one reader keeps open.
const READER_OPEN_PACKS_MAX: usize = 32;
/// Written pack bytes between nudges to the kernel to start writeback.
const PACK_WRITEBACK_BYTES: u64 = 16 << 20;
/// Buffered bytes between the pipeline and a pack file.
const PACK_WRITE_BUFFER_BYTES: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId(pub u32);

/// Catalog counters, each a u64 under a prefix + site id: bytes this store holds for that
/// site, bytes that site holds for us, and when we last heard from it (unix ms).
const KEY_HELD_FOR: &[u8] = b"held/";
const KEY_HELD_BY: &[u8] = b"held-by/";
const KEY_SEEN: &[u8] = b"seen/";

/// What this node and another site store for each other, and when it was last heard from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteUsage {
    /// Sealed bytes of that site's chunks in this store.
    pub held_for_them_bytes: u64,
    /// Sealed bytes of this site's chunks that site has confirmed it holds.
    pub held_by_them_bytes: u64,
    pub last_seen_unix_ms: Option<u64>,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store index: {0}")]
    Index(String),
    #[error("chunk {id} is not in the store")]
    MissingChunk { id: ChunkId },
    #[error("pack {path} is damaged: {why}")]
    DamagedPack { path: PathBuf, why: String },
    #[error("snapshot {id} was forgotten: its record is final and is never signed again")]
    Forgotten { id: cairn_protocol::SnapshotId },
    #[error("the data dir is read-only (a backup disk mounted read-only?): this command changes it, so remount it read-write; snapshots, verify, restore and site show work as it is")]
    ReadOnly,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct Store {
    packs_dir: PathBuf,
    index: Box<dyn MetaIndex>,
    /// Problems found on open that leave the store usable (a truncated pack): shown to the
    /// user, and found in detail by `cairn verify`.
    pub warnings: Vec<String>,
    /// Packs unlinked by this process so far: a reader that sees it change lets go of the
    /// files it holds open, so a retired pack's space is given back.
    retired: AtomicU64,
    /// `PACK_BYTES_TARGET`, smaller in tests that need many packs.
    pack_bytes_target: u64,
}

/// The owner of each partner chunk this store holds: `held-chunk/` id -> site id. Chunks
/// without one are this site's own. Written by the mesh's storage thread.
pub const KEY_HELD_CHUNK: &[u8] = b"held-chunk/";

/// The highest pack id ever retired: a new pack's id is past it, so no id is reused.
pub(crate) const KEY_PACK_ID_MAX: &[u8] = b"pack-id-max";

/// Chunks a damaged or missing pack took with it, by whose they were: what is true to
/// tell the user differs. A partner's chunk is the mesh's to repair; only this site's own
/// data is stored again by a backup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct LostChunks {
    n_own: usize,
    n_held: usize,
}

impl LostChunks {
    fn advice(&self) -> String {
        let held = format!(
            "{} chunks held for partner sites lost; a running node fetches them again from their other holders",
            self.n_held
        );
        let own = format!(
            "{} of this site's chunks lost; a running node fetches them back from the sites that hold copies, the next backup of an affected image stores them again, and `cairn verify` names the affected snapshots",
            self.n_own
        );
        match (self.n_own, self.n_held) {
            (0, 0) => "no chunks lost".into(),
            (0, _) => held,
            (_, 0) => own,
            _ => format!("{own}; {held}"),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and recovers from an interrupted write.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let packs_dir = dir.join("packs");
        fs::create_dir_all(&packs_dir).map_err(io(&packs_dir))?;
        let index = Box::new(SledIndex::open(&dir.join("index"))?);
        let mut store = Store {
            packs_dir,
            index,
            warnings: Vec::new(),
            retired: AtomicU64::new(0),
            pack_bytes_target: PACK_BYTES_TARGET,
        };
        store.recover()?;
        Ok(store)
    }

    /// Opens the store of a data dir this process cannot write, for reading: the index is
    /// a private copy (see `SledIndex::open_read_only`) that refuses commits, and the
    /// recovery of an interrupted write is skipped, as it would change packs. A pack's
    /// uncommitted tail was never indexed, so reads see what the last commit saw; a
    /// truncated or missing pack shows as missing chunks, as `cairn verify` reports.
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        let packs_dir = dir.join("packs");
        let index = Box::new(SledIndex::open_read_only(&dir.join("index"))?);
        Ok(Store {
            packs_dir,
            index,
            warnings: Vec::new(),
            retired: AtomicU64::new(0),
            pack_bytes_target: PACK_BYTES_TARGET,
        })
    }

    pub fn index(&self) -> &dyn MetaIndex {
        &*self.index
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.index.chunk(id)?.is_some())
    }

    fn pack_path(&self, pack: PackId) -> PathBuf {
        self.packs_dir.join(format!("{:08}.pack", pack.0))
    }

    fn pack_ids_on_disk(&self) -> Result<Vec<PackId>, StoreError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.packs_dir).map_err(io(&self.packs_dir))? {
            let entry = entry.map_err(io(&self.packs_dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".pack").and_then(|n| n.parse().ok()) {
                ids.push(PackId(n));
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn recover(&mut self) -> Result<(), StoreError> {
        // First: a retired pack has no committed length, so the tail scan below would
        // index its entries again.
        self.finish_retired()?;
        let committed: HashMap<PackId, u64> = self.index.packs()?.into_iter().collect();
        let on_disk = self.pack_ids_on_disk()?;
        for (&pack, _) in committed.iter().filter(|(pack, _)| !on_disk.contains(pack)) {
            let lost = self.forget_chunks_past(pack, 0)?;
            self.warnings.push(format!(
                "pack {} is missing: {}",
                self.pack_path(pack).display(),
                lost.advice()
            ));
        }
        for pack in on_disk {
            let path = self.pack_path(pack);
            let file_len = fs::metadata(&path).map_err(io(&path))?.len();
            let committed_len = committed.get(&pack).copied().unwrap_or(0);
            if file_len < committed_len {
                let lost = self.cut_truncated(pack, file_len)?;
                self.warnings.push(format!(
                    "pack {} was truncated to {file_len} of {committed_len} bytes: {}",
                    path.display(),
                    lost.advice()
                ));
            } else if file_len > committed_len {
                self.recover_tail(pack, committed_len, file_len)?;
            }
        }
        Ok(())
    }

    /// Reads the whole, checksummed entries of a pack from `from` up to `file_len`.
    /// Returns them and the offset where the last one ends.
    fn scan_entries(
        &self,
        pack: PackId,
        file: &File,
        from: u64,
        file_len: u64,
    ) -> Result<(Vec<(ChunkId, ChunkLocation)>, u64), StoreError> {
        let path = self.pack_path(pack);
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        reader.seek(SeekFrom::Start(from)).map_err(io(&path))?;
        let mut entries = Vec::new();
        let mut good_len = from;
        while let Some((id, sealed_len)) = read_entry(&mut reader, file_len - good_len) {
            let location = ChunkLocation {
                pack,
                offset: good_len + ENTRY_HEAD_BYTES,
                len_bytes: sealed_len as u32,
            };
            entries.push((id, location));
            good_len += ENTRY_HEAD_BYTES + sealed_len + ENTRY_CHECKSUM_BYTES;
        }
        Ok((entries, good_len))
    }

    fn has_pack_header(file: &mut File) -> bool {
        let mut header = [0u8; PACK_HEADER_BYTES as usize];
        file.read_exact(&mut header).is_ok() && header == pack_header()
    }

    /// Indexes the whole entries past a pack's committed length and cuts off the rest.
    fn recover_tail(
        &mut self,
        pack: PackId,
        committed_len: u64,
        file_len: u64,
    ) -> Result<(), StoreError> {
        let path = self.pack_path(pack);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut from = committed_len;
        if committed_len == 0 {
            if file_len < PACK_HEADER_BYTES {
                // Never committed and not even a whole header: a pack created at the crash.
                drop(file);
                fs::remove_file(&path).map_err(io(&path))?;
                return Ok(());
            }
            if !Store::has_pack_header(&mut file) {
                self.warnings.push(format!(
                    "{} is not a cairn pack; it was left untouched",
                    path.display()
                ));
                return Ok(());
            }
            from = PACK_HEADER_BYTES;
        }
        let (chunks, good_len) = self.scan_entries(pack, &file, from, file_len)?;
        if good_len < file_len {
            file.set_len(good_len).map_err(io(&path))?;
        }
        file.sync_all().map_err(io(&path))?;
        self.index.commit(IndexBatch {
            chunks,
            packs: vec![(pack, good_len)],
            ..IndexBatch::default()
        })
    }

    /// A committed pack lost its tail outside cairn: keep the whole entries that remain,
    /// forget the chunks that were cut off so the next backup stores them again, and carry
    /// on appending after what remains. Returns what was lost.
    fn cut_truncated(&mut self, pack: PackId, file_len: u64) -> Result<LostChunks, StoreError> {
        let path = self.pack_path(pack);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let good_len = if file_len >= PACK_HEADER_BYTES && Store::has_pack_header(&mut file) {
            self.scan_entries(pack, &file, PACK_HEADER_BYTES, file_len)?
                .1
        } else {
            0
        };
        file.set_len(good_len).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        self.forget_chunks_past(pack, good_len)
    }

    /// Removes from the index every chunk of `pack` that does not end by `good_len`, and
    /// records `good_len` as the pack's committed length (or forgets the pack at 0).
    fn forget_chunks_past(
        &mut self,
        pack: PackId,
        good_len: u64,
    ) -> Result<LostChunks, StoreError> {
        let lost: Vec<ChunkId> = self
            .index
            .chunks_in_pack(pack)?
            .into_iter()
            .filter(|(_, location)| {
                location.offset + u64::from(location.len_bytes) + ENTRY_CHECKSUM_BYTES > good_len
            })
            .map(|(id, _)| id)
            .collect();
        let mut counted = LostChunks::default();
        for id in &lost {
            if self
                .index
                .catalog_get(&[KEY_HELD_CHUNK, &id.0].concat())?
                .is_some()
            {
                counted.n_held += 1;
            } else {
                counted.n_own += 1;
            }
        }
        let mut batch = IndexBatch {
            removed_chunks: lost,
            ..IndexBatch::default()
        };
        if good_len == 0 {
            batch.removed_packs.push(pack);
        } else {
            batch.packs.push((pack, good_len));
        }
        self.index.commit(batch)?;
        Ok(counted)
    }

    /// Starts writing; the caller is the store's only writer (the data dir lock ensures it).
    pub fn writer(&self) -> PackWriter<'_> {
        PackWriter {
            store: self,
            open: None,
            batch: IndexBatch::default(),
            defer_commits: false,
            fresh_pack: false,
        }
    }

    pub fn reader(&self) -> PackReader<'_> {
        PackReader {
            store: self,
            files: HashMap::new(),
            retired_seen: self.retired.load(Ordering::Acquire),
        }
    }

    /// Commits snapshot records. Call only after the writer that stored their chunks has
    /// committed.
    pub fn commit_snapshots(
        &self,
        snapshots: Vec<(cairn_protocol::SnapshotId, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        self.index.commit(IndexBatch {
            snapshots,
            ..IndexBatch::default()
        })
    }

    /// Counts `delta_bytes` more (or, negative, fewer) of `owner`'s sealed bytes held in
    /// this store. The mesh calls it when it stores or drops a partner's chunk; the count
    /// never goes below zero. Returns the new count.
    pub fn add_held_for(&self, owner: &SiteId, delta_bytes: i64) -> Result<u64, StoreError> {
        self.add_counter(KEY_HELD_FOR, owner, delta_bytes)
    }

    /// Sets how many of this site's sealed bytes `holder` holds, as the running node
    /// last counted them from the copies the mesh confirmed.
    pub fn set_held_by(&self, holder: &SiteId, bytes: u64) -> Result<(), StoreError> {
        let key = [KEY_HELD_BY, &holder.0].concat();
        self.index.catalog_update_u64(&key, &|_| bytes)?;
        Ok(())
    }

    /// Notes that `site` was heard from at `now_unix_ms` (an older time changes nothing).
    pub fn note_seen(&self, site: &SiteId, now_unix_ms: u64) -> Result<(), StoreError> {
        let key = [KEY_SEEN, &site.0].concat();
        self.index
            .catalog_update_u64(&key, &|seen| seen.max(now_unix_ms))?;
        Ok(())
    }

    pub fn usage(&self, site: &SiteId) -> Result<SiteUsage, StoreError> {
        let counter = |prefix: &[u8]| -> Result<Option<u64>, StoreError> {
            let stored = self.index.catalog_get(&[prefix, &site.0].concat())?;
            stored.as_deref().map(decode_counter).transpose()
        };
        Ok(SiteUsage {
            held_for_them_bytes: counter(KEY_HELD_FOR)?.unwrap_or(0),
            held_by_them_bytes: counter(KEY_HELD_BY)?.unwrap_or(0),
            last_seen_unix_ms: counter(KEY_SEEN)?,
        })
    }

    fn add_counter(
        &self,
        prefix: &[u8],
        site: &SiteId,
        delta_bytes: i64,
    ) -> Result<u64, StoreError> {
        let key = [prefix, &site.0].concat();
        self.index
            .catalog_update_u64(&key, &|count| count.saturating_add_signed(delta_bytes))
    }

    /// Total bytes in pack files.
    pub fn packs_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for pack in self.pack_ids_on_disk()? {
            let path = self.pack_path(pack);
            total += fs::metadata(&path).map_err(io(&path))?.len();
        }
        Ok(total)
    }
}

fn pack_header() -> [u8; PACK_HEADER_BYTES as usize] {
    let mut header = [0u8; PACK_HEADER_BYTES as usize];
    header[..8].copy_from_slice(PACK_MAGIC);
    header[8] = PACK_VERSION;
    header
}

fn entry_checksum(head: &[u8], sealed: &[u8]) -> [u8; ENTRY_CHECKSUM_BYTES as usize] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(head);
    hasher.update(sealed);
    let mut out = [0u8; ENTRY_CHECKSUM_BYTES as usize];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..ENTRY_CHECKSUM_BYTES as usize]);
    out
}

fn entry_head(id: &ChunkId, sealed_len: u32) -> [u8; ENTRY_HEAD_BYTES as usize] {
    let mut head = [0u8; ENTRY_HEAD_BYTES as usize];
    head[..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    head[4..36].copy_from_slice(&id.0);
    head[36..].copy_from_slice(&sealed_len.to_le_bytes());
    head
}

/// Reads one whole, checksummed entry of at most `remaining` bytes; None at a torn or
/// damaged entry or the end.
fn read_entry(reader: &mut impl Read, remaining: u64) -> Option<(ChunkId, u64)> {
    let mut head = [0u8; ENTRY_HEAD_BYTES as usize];
    reader.read_exact(&mut head).ok()?;
    if head[..4] != ENTRY_MAGIC.to_le_bytes() {
        return None;
    }
    let id = ChunkId(head[4..36].try_into().ok()?);
    let sealed_len = u64::from(u32::from_le_bytes(head[36..].try_into().ok()?));
    if sealed_len > ENTRY_BYTES_MAX as u64
        || ENTRY_HEAD_BYTES + sealed_len + ENTRY_CHECKSUM_BYTES > remaining
    {
        return None;
    }
    let mut sealed = vec![0u8; sealed_len as usize];
    reader.read_exact(&mut sealed).ok()?;
    let mut checksum = [0u8; ENTRY_CHECKSUM_BYTES as usize];
    reader.read_exact(&mut checksum).ok()?;
    (checksum == entry_checksum(&head, &sealed)).then_some((id, sealed_len))
}

struct OpenPack {
    id: PackId,
    path: PathBuf,
    file: BufWriter<File>,
    len: u64,
    /// Bytes up to here have been handed to the kernel for writeback.
    writeback_len: u64,
    is_new: bool,
}

/// Appends sealed chunks to pack files; `commit` makes them durable and indexed.
pub struct PackWriter<'s> {
    store: &'s Store,
    open: Option<OpenPack>,
    batch: IndexBatch,
    /// Set by repack: a full pack is fsynced but not indexed, and `finish` hands back the
    /// whole batch, so the copies are indexed in the batch that retires their old pack.
    defer_commits: bool,
    /// Set by repack when it retires the newest pack: copies go to a new pack, never to
    /// the one being retired.
    fresh_pack: bool,
}

impl PackWriter<'_> {
    pub fn append(&mut self, id: &ChunkId, sealed: &[u8]) -> Result<ChunkLocation, StoreError> {
        let head = entry_head(id, sealed.len() as u32);
        self.append_checked(id, sealed, &entry_checksum(&head, sealed))
    }

    /// `append` with the entry's checksum already known: a repack copies an entry whose
    /// head is `entry_head(id, sealed.len())` and whose checksum it has just checked, so
    /// the copied bytes are hashed once, not twice.
    pub(crate) fn append_checked(
        &mut self,
        id: &ChunkId,
        sealed: &[u8],
        checksum: &[u8],
    ) -> Result<ChunkLocation, StoreError> {
        debug_assert_eq!(
            checksum,
            entry_checksum(&entry_head(id, sealed.len() as u32), sealed),
            "the caller checked this entry's checksum"
        );
        assert!(
            sealed.len() <= ENTRY_BYTES_MAX,
            "sealer and mesh bound chunk size"
        );
        if self
            .open
            .as_ref()
            .is_some_and(|pack| pack.len >= self.store.pack_bytes_target)
        {
            if self.defer_commits {
                self.sync_open()?;
            } else {
                self.commit()?;
            }
            self.open = None;
        }
        if self.open.is_none() {
            self.open = Some(self.create_pack()?);
        }
        let pack = self.open.as_mut().expect("opened above");
        let head = entry_head(id, sealed.len() as u32);
        let write = |file: &mut BufWriter<File>| -> std::io::Result<()> {
            file.write_all(&head)?;
            file.write_all(sealed)?;
            file.write_all(checksum)
        };
        write(&mut pack.file).map_err(io(&pack.path))?;
        let location = ChunkLocation {
            pack: pack.id,
            offset: pack.len + ENTRY_HEAD_BYTES,
            len_bytes: sealed.len() as u32,
        };
        pack.len += ENTRY_HEAD_BYTES + sealed.len() as u64 + ENTRY_CHECKSUM_BYTES;
        self.batch.chunks.push((*id, location));
        if pack.len - pack.writeback_len >= PACK_WRITEBACK_BYTES {
            // Start writing back now so the fsync at commit waits for little, not for a
            // whole pack while the pipeline stalls behind it.
            pack.file.flush().map_err(io(&pack.path))?;
            // SAFETY: sync_file_range on an fd we own; a failure only loses the head start.
            unsafe {
                libc::sync_file_range(
                    std::os::fd::AsRawFd::as_raw_fd(pack.file.get_ref()),
                    pack.writeback_len as libc::off64_t,
                    (pack.len - pack.writeback_len) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            pack.writeback_len = pack.len;
        }
        Ok(location)
    }

    /// Opens the pack to append to: the newest pack if it is fully committed and has room,
    /// else a new one.
    fn create_pack(&self) -> Result<OpenPack, StoreError> {
        let committed: HashMap<PackId, u64> = self.store.index.packs()?.into_iter().collect();
        let on_disk = self.store.pack_ids_on_disk()?;
        // Past a retired pack's id too (`KEY_PACK_ID_MAX`): a reader may still hold its
        // file open.
        let retired_max = match self.store.index.catalog_get(KEY_PACK_ID_MAX)? {
            Some(bytes) => decode_counter(&bytes)? as u32,
            None => 0,
        };
        // Never append to a pack older than one a repack retired: repack retires the
        // newest pack first, so its later copies never land in a pack it will retire.
        let appendable = on_disk
            .last()
            .filter(|last| !self.fresh_pack && last.0 >= retired_max);
        if let Some(&last) = appendable {
            let path = self.store.pack_path(last);
            let len = fs::metadata(&path).map_err(io(&path))?.len();
            if committed.get(&last) == Some(&len) && len < self.store.pack_bytes_target {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                file.seek(SeekFrom::Start(len)).map_err(io(&path))?;
                let file = BufWriter::with_capacity(PACK_WRITE_BUFFER_BYTES, file);
                return Ok(OpenPack {
                    id: last,
                    path,
                    file,
                    len,
                    writeback_len: len,
                    is_new: false,
                });
            }
        }
        // A fresh id past every pack on disk or in the index: an id still named by index
        // entries is never reused.
        let newest = on_disk
            .iter()
            .chain(committed.keys())
            .map(|p| p.0)
            .chain([retired_max])
            .max()
            .unwrap_or(0);
        let id = PackId(newest + 1);
        let path = self.store.pack_path(id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut file = BufWriter::with_capacity(PACK_WRITE_BUFFER_BYTES, file);
        file.write_all(&pack_header()).map_err(io(&path))?;
        Ok(OpenPack {
            id,
            path,
            file,
            len: PACK_HEADER_BYTES,
            writeback_len: 0,
            is_new: true,
        })
    }

    /// Step 2 and 3 of the write order: fsync the pack, then index what it holds.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        self.sync_open()?;
        if self.batch.chunks.is_empty() && self.batch.packs.is_empty() {
            return Ok(());
        }
        self.store.index.commit(std::mem::take(&mut self.batch))
    }

    /// Step 2 alone: fsyncs the open pack (and the packs directory, when it is new) and
    /// notes its length in the batch.
    fn sync_open(&mut self) -> Result<(), StoreError> {
        if let Some(pack) = self.open.as_mut() {
            pack.file.flush().map_err(io(&pack.path))?;
            pack.file.get_ref().sync_data().map_err(io(&pack.path))?;
            if pack.is_new {
                File::open(&self.store.packs_dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(io(&self.store.packs_dir))?;
                pack.is_new = false;
            }
            self.batch.packs.push((pack.id, pack.len));
        }
        Ok(())
    }

    /// Step 2, and the batch for step 3, for the caller to commit with more in it.
    fn finish(mut self) -> Result<IndexBatch, StoreError> {
        self.sync_open()?;
        Ok(std::mem::take(&mut self.batch))
    }
}

/// Reads sealed chunks; keeps its pack files open. One per thread.
///
/// A repack may retire a pack between a lookup and the read (a restore prefetches its
/// locations well ahead): a read that finds the pack gone looks the chunk up once more,
/// and reads it where the repack copied it (the index pointed there before the old file
/// went).
pub struct PackReader<'s> {
    store: &'s Store,
    files: HashMap<PackId, File>,
    /// `Store::retired` when `files` was last emptied.
    retired_seen: u64,
}

/// The pack a location names is no longer there (retired since the lookup).
fn is_gone(error: &StoreError) -> bool {
    matches!(error, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

impl PackReader<'_> {
    pub fn read(&mut self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let location = self.locate(id)?;
        self.read_located(id, &location)
    }

    /// Reads a chunk at a location looked up before (`prefetch`); if its pack has been
    /// retired since, at the location the index gives now.
    pub fn read_located(
        &mut self,
        id: &ChunkId,
        location: &ChunkLocation,
    ) -> Result<Vec<u8>, StoreError> {
        match self.read_at(location) {
            Err(e) if is_gone(&e) => match self.store.index.chunk(id)? {
                Some(moved) if moved != *location => self.read_at(&moved),
                _ => Err(e),
            },
            other => other,
        }
    }

    fn locate(&self, id: &ChunkId) -> Result<ChunkLocation, StoreError> {
        self.store
            .index
            .chunk(id)?
            .ok_or(StoreError::MissingChunk { id: *id })
    }

    /// Looks a chunk up and asks the kernel to start reading it in the background, so that
    /// many reads are in flight at once (one sequential reader gets a fraction of what an
    /// SSD or virtual disk delivers at depth).
    pub fn prefetch(&mut self, id: &ChunkId) -> Result<ChunkLocation, StoreError> {
        let mut location = self.locate(id)?;
        if let Err(e) = self.file(location.pack) {
            if !is_gone(&e) {
                return Err(e);
            }
            location = self.locate(id)?;
        }
        let file = self.file(location.pack)?;
        // SAFETY: posix_fadvise on an fd we own; only a hint, so its result is ignored.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(file),
                location.offset as libc::off_t,
                libc::off_t::from(location.len_bytes),
                libc::POSIX_FADV_WILLNEED,
            );
        }
        Ok(location)
    }

    fn file(&mut self, pack: PackId) -> Result<&File, StoreError> {
        let retired = self.store.retired.load(Ordering::Acquire);
        if retired != self.retired_seen {
            // An open file of a retired pack would keep its disk space taken.
            self.files.clear();
            self.retired_seen = retired;
        }
        if !self.files.contains_key(&pack) {
            if self.files.len() >= READER_OPEN_PACKS_MAX {
                // Stay far below the process's open-file limit however many packs exist.
                let evict = *self.files.keys().next().expect("cache is not empty");
                self.files.remove(&evict);
            }
            let path = self.store.pack_path(pack);
            let file = File::open(&path).map_err(io(&path))?;
            self.files.insert(pack, file);
        }
        Ok(&self.files[&pack])
    }

    /// Reads at a location as it is; `read_located` also follows a repack.
    pub fn read_at(&mut self, location: &ChunkLocation) -> Result<Vec<u8>, StoreError> {
        let path = self.store.pack_path(location.pack);
        let file = self.file(location.pack)?;
        let mut sealed = vec![0u8; location.len_bytes as usize];
        file.read_exact_at(&mut sealed, location.offset)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    StoreError::DamagedPack {
                        path: path.clone(),
                        why: format!(
                            "it ends before byte {}, inside a chunk it should hold",
                            location.offset + u64::from(location.len_bytes)
                        ),
                    }
                } else {
                    StoreError::Io {
                        path: path.clone(),
                        source: e,
                    }
                }
            })?;
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(id: [u8; 32], sealed: &[u8]) -> Vec<u8> {
        let head = entry_head(&ChunkId(id), sealed.len() as u32);
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(sealed);
        bytes.extend_from_slice(&entry_checksum(&head, sealed));
        bytes
    }

    proptest! {
        #[test]
        fn pack_entries_round_trip(id: [u8; 32], sealed in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let bytes = entry(id, &sealed);
            prop_assert_eq!(read_entry(&mut &bytes[..], bytes.len() as u64), Some((ChunkId(id), sealed.len() as u64)));
        }

        #[test]
        fn any_flipped_bit_in_an_entry_is_caught(id: [u8; 32], sealed in proptest::collection::vec(any::<u8>(), 1..500), bit: usize) {
            let mut bytes = entry(id, &sealed);
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert_eq!(read_entry(&mut &bytes[..], bytes.len() as u64), None);
        }
    }

    #[test]
    fn usage_counts_never_go_negative_and_last_seen_only_moves_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let (partner, other) = (SiteId([1; 32]), SiteId([2; 32]));
        assert_eq!(store.usage(&partner).unwrap(), SiteUsage::default());
        assert_eq!(store.add_held_for(&partner, 100).unwrap(), 100);
        assert_eq!(store.add_held_for(&partner, -30).unwrap(), 70);
        store.set_held_by(&partner, 9).unwrap();
        store.set_held_by(&partner, 5).unwrap();
        store.note_seen(&partner, 2_000).unwrap();
        store.note_seen(&partner, 1_000).unwrap();
        assert_eq!(
            store.usage(&partner).unwrap(),
            SiteUsage {
                held_for_them_bytes: 70,
                held_by_them_bytes: 5,
                last_seen_unix_ms: Some(2_000),
            }
        );
        assert_eq!(store.add_held_for(&partner, -1_000).unwrap(), 0);
        assert_eq!(store.usage(&other).unwrap(), SiteUsage::default());
    }

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn committed_chunks_read_back_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            let mut writer = store.writer();
            writer.append(&id(1), b"sealed one").unwrap();
            writer.append(&id(2), b"sealed two").unwrap();
            writer.commit().unwrap();
        }
        let store = Store::open(tmp.path()).unwrap();
        assert!(store.warnings.is_empty());
        assert_eq!(store.reader().read(&id(2)).unwrap(), b"sealed two");
        assert!(matches!(
            store.reader().read(&id(3)),
            Err(StoreError::MissingChunk { .. })
        ));
    }

    #[test]
    fn uncommitted_whole_entries_are_reindexed_and_a_torn_tail_is_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let pack_path = tmp.path().join("packs/00000001.pack");
        {
            let store = Store::open(tmp.path()).unwrap();
            let mut writer = store.writer();
            writer.append(&id(1), b"committed").unwrap();
            writer.commit().unwrap();
            writer.append(&id(2), b"written, never committed").unwrap();
            writer.append(&id(3), b"torn").unwrap();
            // Simulate a crash: the buffered bytes reach the file, the index never hears.
            let pack = writer.open.as_mut().unwrap();
            pack.file.flush().unwrap();
            std::mem::forget(writer);
        }
        let full_len = fs::metadata(&pack_path).unwrap().len();
        let torn = OpenOptions::new().write(true).open(&pack_path).unwrap();
        torn.set_len(full_len - 3).unwrap();
        drop(torn);

        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.reader().read(&id(1)).unwrap(), b"committed");
        assert_eq!(
            store.reader().read(&id(2)).unwrap(),
            b"written, never committed"
        );
        assert!(!store.contains(&id(3)).unwrap());
        let recovered_len = fs::metadata(&pack_path).unwrap().len();
        assert_eq!(
            recovered_len,
            full_len - (ENTRY_HEAD_BYTES + 4 + ENTRY_CHECKSUM_BYTES)
        );
        // New writes go to a new pack and land after the recovered data.
        let mut writer = store.writer();
        writer.append(&id(4), b"after").unwrap();
        writer.commit().unwrap();
        assert_eq!(store.reader().read(&id(4)).unwrap(), b"after");
    }

    #[test]
    fn a_truncated_committed_pack_is_reported_and_its_lost_chunks_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            let mut writer = store.writer();
            writer.append(&id(1), &[7u8; 1000]).unwrap();
            writer.append(&id(2), &[8u8; 1000]).unwrap();
            writer.commit().unwrap();
        }
        let pack_path = tmp.path().join("packs/00000001.pack");
        // Cut into the second entry: the first survives, the second is lost.
        OpenOptions::new()
            .write(true)
            .open(&pack_path)
            .unwrap()
            .set_len(16 + 1056 + 500)
            .unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.warnings.len(), 1, "{:?}", store.warnings);
        assert!(
            store.warnings[0].contains("1 of this site's chunks lost"),
            "{:?}",
            store.warnings
        );
        assert_eq!(store.reader().read(&id(1)).unwrap(), vec![7u8; 1000]);
        assert!(
            !store.contains(&id(2)).unwrap(),
            "a lost chunk must be stored again, not deduplicated"
        );
        // Storing it again works and survives a reopen.
        let mut writer = store.writer();
        writer.append(&id(2), &[8u8; 1000]).unwrap();
        writer.commit().unwrap();
        drop(store);
        let store = Store::open(tmp.path()).unwrap();
        assert!(store.warnings.is_empty(), "{:?}", store.warnings);
        assert_eq!(store.reader().read(&id(2)).unwrap(), vec![8u8; 1000]);
    }

    #[test]
    fn a_deleted_pack_is_reported_and_its_chunks_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            let mut writer = store.writer();
            writer.append(&id(1), b"gone soon").unwrap();
            writer.commit().unwrap();
        }
        fs::remove_file(tmp.path().join("packs/00000001.pack")).unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert!(
            store.warnings[0].contains("is missing"),
            "{:?}",
            store.warnings
        );
        assert!(!store.contains(&id(1)).unwrap());
        let mut writer = store.writer();
        writer.append(&id(2), b"new").unwrap();
        writer.commit().unwrap();
        assert_eq!(store.reader().read(&id(2)).unwrap(), b"new");
    }

    #[test]
    fn a_lost_pack_of_partner_chunks_advises_no_backup() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            let mut writer = store.writer();
            writer.append(&id(1), b"a partner's").unwrap();
            writer.append(&id(2), b"another partner's").unwrap();
            writer.commit().unwrap();
            let marks = [id(1), id(2)]
                .iter()
                .map(|c| ([KEY_HELD_CHUNK, &c.0].concat(), vec![9u8; 32]))
                .collect();
            store
                .index()
                .commit(IndexBatch {
                    catalog: marks,
                    ..IndexBatch::default()
                })
                .unwrap();
        }
        fs::remove_file(tmp.path().join("packs/00000001.pack")).unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.warnings.len(), 1, "{:?}", store.warnings);
        let warning = &store.warnings[0];
        assert!(
            warning.ends_with(
                "is missing: 2 chunks held for partner sites lost; a running node fetches them again from their other holders"
            ),
            "{warning}"
        );
        assert!(!warning.contains("backup"), "{warning}");
    }

    #[test]
    fn a_lost_pack_of_both_kinds_names_each() {
        let lost = LostChunks {
            n_own: 3,
            n_held: 2,
        };
        let advice = lost.advice();
        assert!(
            advice.starts_with("3 of this site's chunks lost; "),
            "{advice}"
        );
        assert!(advice.contains("the next backup of an affected image stores them again"));
        assert!(advice.ends_with("; 2 chunks held for partner sites lost; a running node fetches them again from their other holders"));
    }

    #[test]
    fn many_small_backups_share_a_pack() {
        let tmp = tempfile::tempdir().unwrap();
        for n in 0..5u8 {
            let store = Store::open(tmp.path()).unwrap();
            let mut writer = store.writer();
            writer.append(&id(n), &[n; 100]).unwrap();
            writer.commit().unwrap();
        }
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.pack_ids_on_disk().unwrap(), vec![PackId(1)]);
        for n in 0..5u8 {
            assert_eq!(store.reader().read(&id(n)).unwrap(), vec![n; 100]);
        }
    }
}
