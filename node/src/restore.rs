//! Restore: rebuilds a snapshot into a file or block device on every core, from the local
//! store first and, for chunks missing or damaged there, from the mesh (`fetch.rs`),
//! verifying every chunk. This file owns the output: a regular file is written under a
//! temporary name (`OUT.cairn-partial`) and renamed into place only when complete, so an
//! interrupted restore never leaves a file that looks whole. The partial file is kept when
//! a restore is interrupted, and the next run resumes it: every chunk whose bytes are
//! already in place is skipped (see `pipeline.rs` for how that is checked, and why).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_protocol::{ChunkId, SnapshotRecord};
use serde::Serialize;
use thiserror::Error;

use crate::cancel::Cancel;
use crate::fetch::{FetchError, RemoteChunks};
use crate::units;
use crate::vault::{ChunkError, Vault};

mod pipeline;

#[derive(Debug, Error)]
pub enum RestoreError {
    /// The job was cancelled (its command went away, or Ctrl-C).
    #[error("cancelled")]
    Cancelled,
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
    #[error("{path} is a {kind}, not a file or block device: restore into a file and copy it from there")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{0} is a chain of symlinks too long to follow; give the path it should end at")]
    LinkLoop(PathBuf),
    #[error("{0} is being written by another restore; wait for it to finish or stop it")]
    Busy(PathBuf),
    #[error("{path}")]
    Output { path: PathBuf, source: io::Error },
    #[error("manifest of {image}@{snapshot} is unreadable at byte {offset}: {why}")]
    Manifest {
        image: String,
        snapshot: String,
        offset: u64,
        why: String,
    },
    #[error("chunk {id} at byte {offset} of {image}@{snapshot} is damaged")]
    Chunk {
        image: String,
        snapshot: String,
        offset: u64,
        id: ChunkId,
        source: Box<ChunkError>,
    },
    #[error(
        "chunk {id} at byte {offset} of {image}@{snapshot} could not be restored: {local}; from the mesh: {remote}"
    )]
    Unavailable {
        image: String,
        snapshot: String,
        offset: u64,
        id: ChunkId,
        /// Why the local copy could not be used (missing or damaged).
        local: Box<ChunkError>,
        remote: Box<FetchError>,
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
    /// Any of the above after some of the image was written: the partial file is kept.
    #[error(
        "{}; the {} restored so far stay in {}: run the same restore again to resume, or pass --fresh to start over",
        units::chain(&**cause), units::bytes(*kept_bytes), partial.display()
    )]
    Interrupted {
        /// Shown with its causes inside the message, before the advice, so not a `source`.
        cause: Box<RestoreError>,
        partial: PathBuf,
        kept_bytes: u64,
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

    /// The error itself, without the note that a partial file was kept.
    pub fn cause(&self) -> &RestoreError {
        match self {
            RestoreError::Interrupted { cause, .. } => cause.cause(),
            other => other,
        }
    }
}

/// How to restore.
#[derive(Clone, Copy)]
pub struct RestoreOptions<'a> {
    /// Overwrite OUT if it exists.
    pub force: bool,
    /// Ignore what an interrupted restore left in `OUT.cairn-partial` and start over.
    pub fresh: bool,
    pub n_workers: usize,
    /// Where chunks missing or damaged in the local store come from. Without it a restore
    /// uses the local store alone, and a missing or damaged chunk fails it.
    pub remote: Option<&'a dyn RemoteChunks>,
    /// Mode bits for a new output file, as the caller's umask allows (`0o666 & !umask`);
    /// None leaves them to this process's umask (a command run directly).
    pub file_mode: Option<u32>,
    /// Stops the restore when set, keeping the partial file for the next run to resume.
    pub cancel: Option<&'a Cancel>,
}

impl RestoreOptions<'_> {
    /// Local store only, no overwriting, resuming a partial file if there is one.
    pub fn local(n_workers: usize) -> RestoreOptions<'static> {
        RestoreOptions {
            force: false,
            fresh: false,
            n_workers,
            remote: None,
            file_mode: None,
            cancel: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RestoreSummary {
    pub image: String,
    pub snapshot: String,
    pub output: String,
    pub size_bytes: u64,
    /// Bytes of data chunks in the image (zero runs excluded): the sum of the next three.
    pub data_bytes: u64,
    /// Already in place in the partial file an interrupted restore left.
    pub resumed_bytes: u64,
    /// Read from this node's store.
    pub local_bytes: u64,
    /// Fetched from other nodes.
    pub remote_bytes: u64,
    /// Answers from other nodes refused because they failed verification.
    pub n_refused: u64,
    pub seconds: f64,
}

pub fn restore(
    vault: &Vault,
    record: &SnapshotRecord,
    out: &Path,
    options: &RestoreOptions<'_>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let out = &resolve_links(out)?;
    let mut target = Target::open(out, record.size_bytes, options)?;
    let output = pipeline::Output {
        file: &target.file,
        path: &target.path,
        is_device: target.is_device,
        resuming: target.resuming,
    };
    let (counts, error) = pipeline::run(vault, record, &output, options, progress);
    let kept_bytes = counts.resumed_bytes + counts.local_bytes + counts.remote_bytes;
    if let Some(error) = error {
        return Err(target.abandon(error, kept_bytes));
    }
    if let Err(error) = target.finish(out) {
        return Err(target.abandon(error, kept_bytes));
    }
    progress(record.size_bytes);
    Ok(RestoreSummary {
        image: record.image.to_string(),
        snapshot: record.id.short(),
        output: out.display().to_string(),
        size_bytes: record.size_bytes,
        data_bytes: kept_bytes,
        resumed_bytes: counts.resumed_bytes,
        local_bytes: counts.local_bytes,
        remote_bytes: counts.remote_bytes,
        n_refused: counts.n_refused,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn output_err(path: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Output {
        path: path.to_owned(),
        source,
    }
}

/// Where the image goes: a block device, written in place, or a partial file renamed
/// into place at the end.
struct Target {
    file: File,
    /// The path written: the device, or the partial file.
    path: PathBuf,
    is_device: bool,
    /// A partial file an interrupted restore left is being continued.
    resuming: bool,
    /// The partial file, while it is ours to remove: it held nothing when this run began,
    /// and nothing of this run is worth keeping yet.
    remove_on_drop: Option<PathBuf>,
}

impl Target {
    fn open(
        out: &Path,
        size_bytes: u64,
        options: &RestoreOptions<'_>,
    ) -> Result<Target, RestoreError> {
        // `out` has no symlinks left at its end (see `resolve_links`), so this is the
        // file itself; only a regular file or nothing is ever renamed over.
        let out_meta = match std::fs::symlink_metadata(out) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(output_err(out)(e)),
        };
        if let Some(meta) = &out_meta {
            let file_type = meta.file_type();
            if file_type.is_dir() {
                return Err(RestoreError::IsDirectory(out.to_owned()));
            }
            if !file_type.is_file() && !file_type.is_block_device() {
                return Err(RestoreError::NotAFile {
                    path: out.to_owned(),
                    kind: kind_of(&file_type),
                });
            }
        }
        if !options.force && out_meta.is_some() {
            return Err(RestoreError::Exists(out.to_owned()));
        }
        if out_meta.is_some_and(|m| m.file_type().is_block_device()) {
            return Target::open_device(out, size_bytes);
        }
        let path = partial_path(out);
        let existed = path.symlink_metadata().is_ok();
        let mut open = OpenOptions::new();
        open.read(true).write(true).create(true).truncate(false);
        if let Some(mode) = options.file_mode {
            open.mode(mode);
        }
        let file = open.open(&path).map_err(output_err(&path))?;
        if let (Some(mode), false) = (options.file_mode, existed) {
            // The node's own umask also masked `mode`; the caller's alone decides.
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(output_err(&path))?;
        }
        let target = Target {
            file,
            path,
            is_device: false,
            resuming: false,
            remove_on_drop: None,
        };
        target.lock()?;
        target.start(size_bytes, options.fresh)
    }

    fn open_device(out: &Path, size_bytes: u64) -> Result<Target, RestoreError> {
        let file = OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(output_err(out))?;
        let device_bytes =
            io::Seek::seek(&mut &file, io::SeekFrom::End(0)).map_err(output_err(out))?;
        if device_bytes < size_bytes {
            return Err(RestoreError::DeviceTooSmall {
                path: out.to_owned(),
                device_bytes,
                image_bytes: size_bytes,
            });
        }
        // A device cannot tell written regions from old contents without reading all of
        // it, so a restore to a device always writes every chunk.
        Ok(Target {
            file,
            path: out.to_owned(),
            is_device: true,
            resuming: false,
            remove_on_drop: None,
        })
    }

    /// Two restores writing one partial file would each skip what the other wrote half of.
    fn lock(&self) -> Result<(), RestoreError> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        // SAFETY: flock on an fd we own; the lock goes with the fd when the file closes.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Err(RestoreError::Busy(self.path.clone()))
        } else {
            Err(output_err(&self.path)(e))
        }
    }

    /// Sizes the partial file; anything it already holds is resumed unless `fresh`.
    fn start(mut self, size_bytes: u64, fresh: bool) -> Result<Target, RestoreError> {
        let held_bytes = self.file.metadata().map_err(output_err(&self.path))?.len();
        if fresh && held_bytes > 0 {
            self.file.set_len(0).map_err(output_err(&self.path))?;
        }
        self.resuming = !fresh && held_bytes > 0;
        if !self.resuming {
            // Holds nothing worth keeping yet. Only set once locked: a partial file another
            // restore is writing is never removed.
            self.remove_on_drop = Some(self.path.clone());
        }
        self.file
            .set_len(size_bytes)
            .map_err(output_err(&self.path))?;
        Ok(self)
    }

    /// Makes the finished image durable and puts it in place.
    fn finish(&mut self, out: &Path) -> Result<(), RestoreError> {
        self.file.sync_all().map_err(output_err(&self.path))?;
        if self.is_device {
            return Ok(());
        }
        // Checked again: something other than a file may have appeared at OUT meanwhile.
        match std::fs::symlink_metadata(out) {
            Ok(meta) if !meta.file_type().is_file() => {
                return Err(RestoreError::NotAFile {
                    path: out.to_owned(),
                    kind: kind_of(&meta.file_type()),
                })
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(output_err(out)(e)),
            _ => {}
        }
        std::fs::rename(&self.path, out).map_err(output_err(out))?;
        self.remove_on_drop = None;
        let dir = out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(output_err(dir))
    }

    /// Gives up: a partial file with something in it stays for the next run to resume;
    /// one this run made and wrote nothing to goes.
    fn abandon(&mut self, error: RestoreError, kept_bytes: u64) -> RestoreError {
        if self.is_device || kept_bytes == 0 {
            return error;
        }
        self.remove_on_drop = None;
        RestoreError::Interrupted {
            cause: Box::new(error),
            partial: self.path.clone(),
            kept_bytes,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(path) = &self.remove_on_drop {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Symlinks a restore follows before it looks at what OUT is.
const LINK_HOPS_MAX: usize = 40;

/// Follows symlinks at the end of `out` to the path they name, even one that does not
/// exist yet, so the image goes where the link points and the link itself stays.
fn resolve_links(out: &Path) -> Result<PathBuf, RestoreError> {
    let mut path = out.to_owned();
    for _ in 0..LINK_HOPS_MAX {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&path).map_err(output_err(&path))?;
                let dir = path.parent().unwrap_or(Path::new(""));
                path = dir.join(target);
            }
            _ => return Ok(path),
        }
    }
    Err(RestoreError::LinkLoop(out.to_owned()))
}

/// What a file type is called in an error.
fn kind_of(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_char_device() {
        "character device"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// The name an image is written under until it is complete.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".cairn-partial");
    out.with_file_name(name)
}
