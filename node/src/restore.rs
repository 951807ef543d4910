//! Restore: rebuilds a snapshot into a file or block device on every core. This thread walks
//! the manifest and hands data extents to workers, which read, open (decrypt, decompress,
//! check the id) and write each chunk at its offset. Zero extents become holes in a regular
//! file; on a block device they are written as zeros. A regular file is written under a
//! temporary name and renamed into place only when complete, so an interrupted restore
//! never leaves a file that looks whole.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_protocol::seal::Opener;
use cairn_protocol::{ChunkId, Extent, SnapshotRecord};
use crossbeam_channel::bounded;
use serde::Serialize;
use thiserror::Error;

use crate::store::ChunkLocation;
use crate::vault::{ChunkError, Vault};

/// Extents queued to restore workers: bounds memory to this many small records.
const RESTORE_QUEUE_MAX: usize = 256;
/// Largest block of zeros written at once to a block device.
const ZERO_WRITE_BYTES: usize = 1 << 20;
/// Restored data between nudges to the kernel to write back what is dirty.
const WRITEBACK_EVERY_BYTES: u64 = 128 << 20;

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("{0} is a directory; give the path of the image file or block device to write")]
    IsDirectory(PathBuf),
    #[error("{path} holds {device_bytes} bytes, too small for the {image_bytes}-byte image")]
    DeviceTooSmall {
        path: PathBuf,
        device_bytes: u64,
        image_bytes: u64,
    },
    #[error("{path}: {source}")]
    Output { path: PathBuf, source: io::Error },
    #[error("manifest of {image}@{snapshot} is unreadable at byte {offset}: {why}")]
    Manifest {
        image: String,
        snapshot: String,
        offset: u64,
        why: String,
    },
    #[error("chunk {id} at byte {offset} of {image}@{snapshot} is damaged: {source}")]
    Chunk {
        image: String,
        snapshot: String,
        offset: u64,
        id: ChunkId,
        source: Box<ChunkError>,
    },
    #[error(
        "chunk {id} at byte {offset} opened to {actual} bytes, but the manifest says {expected}"
    )]
    Length {
        id: ChunkId,
        offset: u64,
        expected: u32,
        actual: usize,
    },
}

impl RestoreError {
    fn chunk(
        record: &SnapshotRecord,
        offset: u64,
        id: ChunkId,
        source: ChunkError,
    ) -> RestoreError {
        RestoreError::Chunk {
            image: record.image.to_string(),
            snapshot: record.id.short(),
            offset,
            id,
            source: Box::new(source),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RestoreSummary {
    pub image: String,
    pub snapshot: String,
    pub output: String,
    pub size_bytes: u64,
    pub data_bytes: u64,
    pub seconds: f64,
}

pub fn restore(
    vault: &Vault,
    record: &SnapshotRecord,
    out: &Path,
    force: bool,
    n_workers: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let output_err = |path: &Path| {
        let path = path.to_owned();
        move |source| RestoreError::Output { path, source }
    };
    let out_meta = std::fs::metadata(out).ok();
    let is_device = out_meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    if out_meta.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(RestoreError::IsDirectory(out.to_owned()));
    }
    if !force && out.symlink_metadata().is_ok() {
        return Err(RestoreError::Exists(out.to_owned()));
    }
    let target = if is_device {
        out.to_owned()
    } else {
        partial_path(out)
    };
    // Removes the partial file on every way out but success.
    let mut partial = PartialFile(if is_device {
        None
    } else {
        Some(target.clone())
    });
    let file = if is_device {
        let file = OpenOptions::new()
            .write(true)
            .open(&target)
            .map_err(output_err(&target))?;
        let device_bytes = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .map_err(output_err(&target))?;
        if device_bytes < record.size_bytes {
            return Err(RestoreError::DeviceTooSmall {
                path: target,
                device_bytes,
                image_bytes: record.size_bytes,
            });
        }
        file
    } else {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&target)
            .map_err(output_err(&target))?;
        file.set_len(record.size_bytes)
            .map_err(output_err(&target))?;
        file
    };

    let data_bytes = Mutex::new(0u64);
    let first_error: Mutex<Option<RestoreError>> = Mutex::new(None);
    let fail = |e: RestoreError| {
        first_error.lock().expect("not poisoned").get_or_insert(e);
    };
    let (tx, rx) = bounded::<(u64, ChunkId, u32, ChunkLocation)>(RESTORE_QUEUE_MAX);
    std::thread::scope(|scope| {
        for _ in 0..n_workers.max(1) {
            let rx = rx.clone();
            let (file, target, fail, data_bytes) = (&file, &target, &fail, &data_bytes);
            scope.spawn(move || {
                let mut reader = vault.store.reader();
                let mut opener = Opener::new();
                for (offset, id, len_bytes, location) in rx {
                    let plain = match vault.load_chunk_at(&mut reader, &mut opener, &id, &location)
                    {
                        Ok(plain) => plain,
                        Err(source) => {
                            fail(RestoreError::chunk(record, offset, id, source));
                            return;
                        }
                    };
                    if plain.len() != len_bytes as usize {
                        fail(RestoreError::Length {
                            id,
                            offset,
                            expected: len_bytes,
                            actual: plain.len(),
                        });
                        return;
                    }
                    if let Err(e) = file.write_all_at(&plain, offset) {
                        fail(RestoreError::Output {
                            path: target.clone(),
                            source: e,
                        });
                        return;
                    }
                    let total = {
                        let mut data_bytes = data_bytes.lock().expect("not poisoned");
                        *data_bytes += plain.len() as u64;
                        *data_bytes
                    };
                    if total / WRITEBACK_EVERY_BYTES
                        != (total - plain.len() as u64) / WRITEBACK_EVERY_BYTES
                    {
                        start_writeback(file);
                    }
                }
            });
        }
        drop(rx);
        let mut last_progress = Instant::now();
        let mut prefetcher = vault.store.reader();
        let zeros = vec![0u8; if is_device { ZERO_WRITE_BYTES } else { 0 }];
        let walked = vault.walk_manifest(record, |offset, extent| {
            if first_error.lock().expect("not poisoned").is_some() {
                return false;
            }
            if last_progress.elapsed() > Duration::from_millis(100) {
                progress(offset);
                last_progress = Instant::now();
            }
            match extent {
                // Prefetching here, RESTORE_QUEUE_MAX chunks ahead of the workers, keeps the
                // disk busy with many reads at once.
                Extent::Data { id, len_bytes } => match prefetcher.prefetch(&id) {
                    Ok(location) => tx.send((offset, id, len_bytes, location)).is_ok(),
                    Err(source) => {
                        fail(RestoreError::chunk(record, offset, id, source.into()));
                        false
                    }
                },
                Extent::Zero { len_bytes } if is_device => {
                    match write_zeros(&file, &zeros, offset, len_bytes) {
                        Ok(()) => true,
                        Err(e) => {
                            fail(RestoreError::Output {
                                path: target.clone(),
                                source: e,
                            });
                            false
                        }
                    }
                }
                Extent::Zero { .. } => true,
            }
        });
        drop(tx);
        if let Err((offset, e)) = walked {
            fail(RestoreError::Manifest {
                image: record.image.to_string(),
                snapshot: record.id.short(),
                offset,
                why: e.to_string(),
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("not poisoned") {
        return Err(e);
    }
    file.sync_all().map_err(output_err(&target))?;
    if !is_device {
        std::fs::rename(&target, out).map_err(output_err(out))?;
        partial.0 = None;
        let dir = out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(output_err(dir))?;
    }
    progress(record.size_bytes);
    Ok(RestoreSummary {
        image: record.image.to_string(),
        snapshot: record.id.short(),
        output: out.display().to_string(),
        size_bytes: record.size_bytes,
        data_bytes: data_bytes.into_inner().expect("not poisoned"),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Asks the kernel to start writing dirty pages now, without waiting, so the final fsync
/// finds little left to do instead of the whole image.
fn start_writeback(file: &File) {
    // SAFETY: sync_file_range on an fd we own, whole file; a failure only loses the head start.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

struct PartialFile(Option<PathBuf>);

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".cairn-partial");
    out.with_file_name(name)
}

fn write_zeros(file: &File, zeros: &[u8], offset: u64, len_bytes: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
