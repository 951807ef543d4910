//! Ingest: turns a source into a snapshot on every core with bounded memory.
//!
//! ```text
//! reader thread ──segments──> N worker threads ──sealed chunks + extents──> this thread
//!  (source.rs)               chunk, zero-check,                         append to packs,
//!                            id, dedup, compress, seal                  reorder extents,
//!                                                                       build manifest
//! ```
//!
//! Memory bound: the reader fills buffers from a fixed pool of `workers + 2` segments of
//! `SEGMENT_BYTES`, and a buffer returns to the pool only when a worker is done with it;
//! the channel to this thread holds at most `workers` results, each at most one segment of
//! sealed chunks. With 16 MiB segments that is (workers + 2 + 2 x workers + 1) x 16 MiB in
//! the worst case: 144 MiB on 2 cores. Extents wait for reordering as small records only.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_protocol::chunk::{is_zero, SEGMENT_BYTES};
use cairn_protocol::manifest::{ManifestBuilder, ManifestRoot};
use cairn_protocol::seal::{SealError, Sealer, NONCE_BYTES};
use cairn_protocol::{
    ChunkId, ChunkerParams, Extent, ImageName, SnapshotId, SnapshotRecord, CHUNKER_DEFAULT,
};
use crossbeam_channel::{bounded, Receiver, Sender};
use serde::Serialize;
use thiserror::Error;

use crate::cancel::Cancel;
use crate::datadir::random_bytes;
use crate::source::{Piece, Source, SourceError};
use crate::store::{PackWriter, StoreError};
use crate::units::now_unix_ms;
use crate::vault::Vault;

pub const ZSTD_LEVEL_DEFAULT: i32 = 2;

#[derive(Debug, Error)]
pub enum BackupError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sealing failed")]
    Seal(#[from] SealError),
    #[error("{0}")]
    Chunker(String),
    #[error("{path} changed size while it was read ({expected} bytes before, {actual} read); back it up while it is not being resized")]
    SizeChanged {
        path: std::path::PathBuf,
        expected: u64,
        actual: u64,
    },
    /// The job was cancelled (its command went away, or Ctrl-C): no snapshot was made.
    #[error("cancelled before the snapshot was made; nothing was recorded")]
    Cancelled,
}

#[derive(Clone, Copy, Debug)]
pub struct BackupOptions {
    pub chunker: ChunkerParams,
    pub zstd_level: i32,
    pub n_workers: usize,
}

impl Default for BackupOptions {
    fn default() -> BackupOptions {
        BackupOptions {
            chunker: CHUNKER_DEFAULT,
            zstd_level: ZSTD_LEVEL_DEFAULT,
            n_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BackupSummary {
    pub image: String,
    pub snapshot: String,
    /// Logical size of the image.
    pub size_bytes: u64,
    /// Bytes actually read from the source (holes are skipped, not read).
    pub read_bytes: u64,
    /// Bytes in zero chunks and holes: never stored.
    pub zero_bytes: u64,
    pub n_chunks: u64,
    pub n_chunks_new: u64,
    /// Plaintext bytes of chunks this backup stored for the first time.
    pub new_bytes: u64,
    /// What those chunks took in the store after compression and sealing.
    pub stored_bytes: u64,
    pub seconds: f64,
}

impl BackupSummary {
    /// Non-zero image bytes per new byte stored before compression.
    pub fn dedup_ratio(&self) -> f64 {
        ratio(self.size_bytes - self.zero_bytes, self.new_bytes)
    }
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.new_bytes, self.stored_bytes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 {
            1.0
        } else {
            f64::INFINITY
        }
    } else {
        a as f64 / b as f64
    }
}

/// What the reader hands the workers.
struct Work {
    idx: u64,
    piece: Piece,
    buffer: Option<Vec<u8>>,
}

/// What a worker hands back: the extents of one piece, and the chunks no one had stored.
struct Done {
    idx: u64,
    extents: Vec<Extent>,
    new_chunks: Vec<(ChunkId, Vec<u8>, usize)>,
    read_bytes: u64,
}

/// Chunks stored earlier in this run, not yet in the index, so no two workers seal the same.
type InFlight = Mutex<HashSet<ChunkId>>;

pub fn backup(
    vault: &Vault,
    image: &ImageName,
    source: Source,
    options: BackupOptions,
    progress: &dyn Fn(u64),
) -> Result<BackupSummary, BackupError> {
    backup_until(vault, image, source, options, &Cancel::new(), progress)
}

/// `backup`, stopping with `BackupError::Cancelled` once `cancel` is set. A cancelled
/// backup records no snapshot and commits nothing: packs it already wrote hold chunks no
/// index entry names, which the store treats as free space (as after a crash).
pub fn backup_until(
    vault: &Vault,
    image: &ImageName,
    source: Source,
    options: BackupOptions,
    cancel: &Cancel,
    progress: &dyn Fn(u64),
) -> Result<BackupSummary, BackupError> {
    options.chunker.validate().map_err(BackupError::Chunker)?;
    let started = Instant::now();
    let (source_path, source_bytes) = (source.path().to_owned(), source.size_bytes);
    let n_workers = options.n_workers.max(1);
    let in_flight: InFlight = Mutex::new(HashSet::new());
    let stop = AtomicBool::new(false);
    let (free_tx, free_rx) = bounded::<Vec<u8>>(n_workers + 2);
    for _ in 0..n_workers + 2 {
        free_tx
            .send(vec![0u8; SEGMENT_BYTES])
            .expect("pool has room for every buffer");
    }
    let (work_tx, work_rx) = bounded::<Work>(n_workers);
    let (done_tx, done_rx) = bounded::<Result<Done, BackupError>>(n_workers);

    let mut summary = BackupSummary {
        image: image.to_string(),
        ..BackupSummary::default()
    };
    let mut writer = vault.store.writer();
    let outcome = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_source(source, free_rx, work_tx, &stop, cancel));
        for _ in 0..n_workers {
            let (work_rx, done_tx, free_tx) = (work_rx.clone(), done_tx.clone(), free_tx.clone());
            let in_flight = &in_flight;
            scope.spawn(move || work(vault, options, work_rx, done_tx, free_tx, in_flight));
        }
        drop((work_rx, done_tx, free_tx));
        let result = collect(
            vault,
            &mut writer,
            &in_flight,
            done_rx,
            &mut summary,
            cancel,
            progress,
        );
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let read = reader.join().expect("reader thread does not panic");
        // A reader stopped by the flag ends early or fails: either is the cancellation.
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let root = result?;
        read?;
        Ok::<_, BackupError>(root)
    });
    let root = outcome?;
    if let Some(expected) = source_bytes.filter(|&n| n != root.size_bytes) {
        return Err(BackupError::SizeChanged {
            path: source_path,
            expected,
            actual: root.size_bytes,
        });
    }

    // The last moment to stop: after the commit the snapshot exists.
    if cancel.is_cancelled() {
        return Err(BackupError::Cancelled);
    }
    // Write order step 4: chunks are durable and indexed before the record names them.
    writer.commit()?;
    let time_unix_ms = now_unix_ms();
    let record = SnapshotRecord {
        id: SnapshotId(random_bytes()),
        image: image.clone(),
        time_unix_ms,
        size_bytes: root.size_bytes,
        root: root.id,
    };
    let plain = record.encode();
    let record_id = vault.keys.chunk_id(&plain);
    let mut stored = record_id.0.to_vec();
    stored.extend(Sealer::new(options.zstd_level)?.seal(
        &vault.keys,
        &record_id,
        &plain,
        random_bytes(),
    )?);
    vault.store.commit_snapshots(vec![(record.id, stored)])?;

    summary.snapshot = record.id.short();
    summary.size_bytes = record.size_bytes;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn read_source(
    source: Source,
    free_rx: Receiver<Vec<u8>>,
    work_tx: Sender<Work>,
    stop: &AtomicBool,
    cancel: &Cancel,
) -> Result<(), SourceError> {
    let mut idx = 0;
    source.pieces(
        || free_rx.recv().ok(),
        |piece, buffer| {
            let sent = work_tx.send(Work { idx, piece, buffer }).is_ok();
            idx += 1;
            sent && !stop.load(Ordering::Relaxed) && !cancel.is_cancelled()
        },
    )
}

fn work(
    vault: &Vault,
    options: BackupOptions,
    work_rx: Receiver<Work>,
    done_tx: Sender<Result<Done, BackupError>>,
    free_tx: Sender<Vec<u8>>,
    in_flight: &InFlight,
) {
    let mut sealer = match Sealer::new(options.zstd_level) {
        Ok(sealer) => sealer,
        Err(e) => {
            let _ = done_tx.send(Err(e.into()));
            return;
        }
    };
    for Work { idx, piece, buffer } in work_rx {
        let result = match piece {
            Piece::Hole { len, .. } => Ok(Done {
                idx,
                extents: vec![Extent::Zero { len_bytes: len }],
                new_chunks: Vec::new(),
                read_bytes: 0,
            }),
            Piece::Data { len, .. } => {
                let buffer = buffer.expect("data pieces carry a buffer");
                let result =
                    chunk_segment(vault, options, &mut sealer, in_flight, idx, &buffer[..len]);
                let _ = free_tx.send(buffer);
                result
            }
        };
        if done_tx.send(result).is_err() {
            return;
        }
    }
}

fn chunk_segment(
    vault: &Vault,
    options: BackupOptions,
    sealer: &mut Sealer,
    in_flight: &InFlight,
    idx: u64,
    segment: &[u8],
) -> Result<Done, BackupError> {
    let mut done = Done {
        idx,
        extents: Vec::new(),
        new_chunks: Vec::new(),
        read_bytes: segment.len() as u64,
    };
    for (offset, len) in options.chunker.cuts(segment) {
        let data = &segment[offset..offset + len];
        if is_zero(data) {
            done.extents.push(Extent::Zero {
                len_bytes: len as u64,
            });
            continue;
        }
        let id = vault.keys.chunk_id(data);
        done.extents.push(Extent::Data {
            id,
            len_bytes: len as u32,
        });
        if is_new(vault, in_flight, &id)? {
            let sealed = sealer.seal(&vault.keys, &id, data, random_bytes::<NONCE_BYTES>())?;
            done.new_chunks.push((id, sealed, len));
        }
    }
    Ok(done)
}

/// True exactly once per chunk id not already in the store.
fn is_new(vault: &Vault, in_flight: &InFlight, id: &ChunkId) -> Result<bool, StoreError> {
    if vault.store.contains(id)? {
        return Ok(false);
    }
    Ok(in_flight
        .lock()
        .expect("in-flight set is never poisoned")
        .insert(*id))
}

/// Where sealed chunks go on this thread: the pack writer, plus a sealer for manifest nodes.
struct Sink<'a, 's> {
    vault: &'a Vault,
    writer: &'a mut PackWriter<'s>,
    in_flight: &'a InFlight,
    sealer: Sealer,
}

impl Sink<'_, '_> {
    fn store_node(&mut self, bytes: Vec<u8>) -> Result<ChunkId, BackupError> {
        let id = self.vault.keys.chunk_id(&bytes);
        if is_new(self.vault, self.in_flight, &id)? {
            let sealed = self
                .sealer
                .seal(&self.vault.keys, &id, &bytes, random_bytes())?;
            self.writer.append(&id, &sealed)?;
        }
        Ok(id)
    }
}

/// This thread's part: store what workers sealed, put extents back in image order, and
/// build the manifest as they arrive.
fn collect(
    vault: &Vault,
    writer: &mut PackWriter<'_>,
    in_flight: &InFlight,
    done_rx: Receiver<Result<Done, BackupError>>,
    summary: &mut BackupSummary,
    cancel: &Cancel,
    progress: &dyn Fn(u64),
) -> Result<ManifestRoot, BackupError> {
    let mut sink = Sink {
        vault,
        writer,
        in_flight,
        sealer: Sealer::new(ZSTD_LEVEL_DEFAULT)?,
    };
    let mut manifest = ManifestBuilder::new();
    let mut waiting: BTreeMap<u64, Vec<Extent>> = BTreeMap::new();
    let mut next_idx = 0u64;
    let mut last_progress = Instant::now();
    for done in done_rx {
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let done = done?;
        summary.read_bytes += done.read_bytes;
        for (id, sealed, plain_len) in done.new_chunks {
            sink.writer.append(&id, &sealed)?;
            summary.n_chunks_new += 1;
            summary.new_bytes += plain_len as u64;
            summary.stored_bytes += sealed.len() as u64;
        }
        waiting.insert(done.idx, done.extents);
        while let Some(extents) = waiting.remove(&next_idx) {
            for extent in extents {
                match extent {
                    Extent::Data { .. } => summary.n_chunks += 1,
                    Extent::Zero { len_bytes } => summary.zero_bytes += len_bytes,
                }
                manifest.push(extent, &mut |bytes| sink.store_node(bytes))?;
            }
            next_idx += 1;
        }
        if last_progress.elapsed() > Duration::from_millis(100) {
            progress(manifest.size_bytes());
            last_progress = Instant::now();
        }
    }
    // Pieces left waiting mean the reader stopped early; its error is reported by the caller.
    let root = manifest.finish(&mut |bytes| sink.store_node(bytes))?;
    progress(root.size_bytes);
    Ok(root)
}
