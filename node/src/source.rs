//! Where an image is read from: a regular file (holes found with SEEK_DATA/SEEK_HOLE and
//! never read), a block device, or a stream (stdin). Whatever the source, it is presented as
//! a sequence of pieces at absolute offsets, each either bytes to chunk or a known hole, with
//! data pieces never crossing a multiple of `SEGMENT_BYTES`.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use cairn_protocol::chunk::SEGMENT_BYTES;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot read {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is a directory; give an image file, a block device, or - for stdin")]
    Directory { path: PathBuf },
    #[error("reading {path} failed at byte {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    #[error("{path} shrank while it was read (ended at byte {offset}); back it up while it is not being resized")]
    Shrank { path: PathBuf, offset: u64 },
    #[error("{path} changed size while it was read ({before} bytes before, {after} after); back it up while it is not being resized")]
    Resized {
        path: PathBuf,
        before: u64,
        after: u64,
    },
}

enum Input {
    /// Seekable with a known size; `sparse` when SEEK_DATA works on it.
    Positioned {
        file: File,
        sparse: bool,
    },
    Stream(Box<dyn Read + Send>),
}

pub struct Source {
    path: PathBuf,
    input: Input,
    /// Known for files and devices, not for streams.
    pub size_bytes: Option<u64>,
}

/// One piece of the source, in order.
pub enum Piece {
    /// `len` bytes were read into the buffer at image offset `offset`.
    Data { offset: u64, len: usize },
    /// A hole: `len` bytes of zeros the source does not store.
    Hole { offset: u64, len: u64 },
}

impl Source {
    /// A stream read once, front to back, of unknown size (a pipe).
    pub fn stream(name: &str, input: Box<dyn Read + Send>) -> Source {
        Source {
            path: name.into(),
            input: Input::Stream(input),
            size_bytes: None,
        }
    }

    /// Opens `spec`: a path, or `-` for standard input.
    pub fn open(spec: &str) -> Result<Source, SourceError> {
        if spec == "-" {
            return Ok(Source::stream("stdin", Box::new(io::stdin())));
        }
        let path = PathBuf::from(spec);
        let open_err = |source| SourceError::Open {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(open_err)?;
        if meta.is_dir() {
            return Err(SourceError::Directory { path });
        }
        let file = File::open(&path).map_err(open_err)?;
        let file_type = meta.file_type();
        if meta.is_file() {
            // ENXIO at offset 0 means the whole file is one hole: sparse, and nothing to read.
            let sparse = match seek(&file, 0, libc::SEEK_DATA) {
                Ok(_) => true,
                Err(e) => e.raw_os_error() == Some(libc::ENXIO) || meta.len() == 0,
            };
            Ok(Source {
                path,
                input: Input::Positioned { file, sparse },
                size_bytes: Some(meta.len()),
            })
        } else if file_type.is_block_device() {
            let size = seek(&file, 0, libc::SEEK_END).map_err(open_err)?;
            Ok(Source {
                path,
                input: Input::Positioned {
                    file,
                    sparse: false,
                },
                size_bytes: Some(size),
            })
        } else {
            // A pipe, FIFO or character device: read it as a stream.
            Ok(Source {
                path,
                input: Input::Stream(Box::new(file)),
                size_bytes: None,
            })
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `each` with every piece in order. Data pieces are read into a buffer taken from
    /// `take_buffer` (at least `SEGMENT_BYTES` long) and handed over with it. Stops early
    /// when `each` returns false.
    pub fn pieces(
        self,
        mut take_buffer: impl FnMut() -> Option<Vec<u8>>,
        mut each: impl FnMut(Piece, Option<Vec<u8>>) -> bool,
    ) -> Result<(), SourceError> {
        let path = self.path;
        match self.input {
            Input::Positioned { file, sparse } => {
                let size = self.size_bytes.expect("positioned sources have a size");
                let mut offset = 0u64;
                while offset < size {
                    let (data_start, data_end) = if sparse {
                        data_range(&file, offset, size)
                    } else {
                        (offset, size)
                    };
                    let hole = Piece::Hole {
                        offset,
                        len: data_start - offset,
                    };
                    if data_start > offset && !each(hole, None) {
                        return Ok(());
                    }
                    let mut at = data_start;
                    while at < data_end {
                        let len = (segment_end(at).min(data_end) - at) as usize;
                        let Some(mut buffer) = take_buffer() else {
                            return Ok(());
                        };
                        // Start the next segment's read while this one is copied, so the disk
                        // always has work queued.
                        let next_len = (data_end - (at + len as u64)).min(SEGMENT_BYTES as u64);
                        advise_willneed(&file, at + len as u64, next_len);
                        read_full_at(&file, &mut buffer[..len], at)
                            .map_err(|source| SourceError::Read {
                                path: path.clone(),
                                offset: at,
                                source,
                            })?
                            .then_some(())
                            .ok_or(SourceError::Shrank {
                                path: path.clone(),
                                offset: at,
                            })?;
                        if !each(Piece::Data { offset: at, len }, Some(buffer)) {
                            return Ok(());
                        }
                        at += len as u64;
                    }
                    offset = data_end;
                }
                // Bytes appended while it was read are not in the image, and what was
                // read may mix old and new writes: no snapshot of it.
                let after = seek(&file, 0, libc::SEEK_END).map_err(|source| SourceError::Read {
                    path: path.clone(),
                    offset: size,
                    source,
                })?;
                if after != size {
                    return Err(SourceError::Resized {
                        path,
                        before: size,
                        after,
                    });
                }
                Ok(())
            }
            Input::Stream(mut stream) => {
                let mut offset = 0u64;
                loop {
                    let Some(mut buffer) = take_buffer() else {
                        return Ok(());
                    };
                    let want = SEGMENT_BYTES;
                    let mut len = 0;
                    while len < want {
                        match stream.read(&mut buffer[len..want]) {
                            Ok(0) => break,
                            Ok(n) => len += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(source) => {
                                return Err(SourceError::Read {
                                    path,
                                    offset: offset + len as u64,
                                    source,
                                })
                            }
                        }
                    }
                    if len == 0 {
                        return Ok(());
                    }
                    if !each(Piece::Data { offset, len }, Some(buffer)) {
                        return Ok(());
                    }
                    offset += len as u64;
                    if len < want {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn segment_end(offset: u64) -> u64 {
    (offset / SEGMENT_BYTES as u64 + 1) * SEGMENT_BYTES as u64
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on an fd we own; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(at as u64)
    }
}

/// The next stretch of stored data at or after `offset`: (start, end). Falls back to
/// "everything is data" if the filesystem cannot answer.
fn data_range(file: &File, offset: u64, size: u64) -> (u64, u64) {
    let start = match seek(file, offset, libc::SEEK_DATA) {
        Ok(start) => start.min(size),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return (size, size),
        Err(_) => return (offset, size),
    };
    let end = seek(file, start, libc::SEEK_HOLE).map_or(size, |end| end.min(size));
    (start, end.max(start))
}

fn advise_willneed(file: &File, offset: u64, len: u64) {
    if len > 0 {
        // SAFETY: posix_fadvise on an fd we own; only a hint, so its result is ignored.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// Reads exactly `buffer.len()` bytes at `offset`; false when the source ended first.
fn read_full_at(file: &File, buffer: &mut [u8], offset: u64) -> io::Result<bool> {
    let mut done = 0;
    while done < buffer.len() {
        match file.read_at(&mut buffer[done..], offset + done as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn collect(source: Source) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        source
            .pieces(
                || Some(vec![0u8; SEGMENT_BYTES]),
                |piece, _| {
                    out.push(match piece {
                        Piece::Data { offset, len } => (offset, len as u64, true),
                        Piece::Hole { offset, len } => (offset, len, false),
                    });
                    true
                },
            )
            .unwrap();
        out
    }

    #[test]
    fn a_file_that_grows_while_it_is_read_is_refused() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let mut file = tmp.reopen().unwrap();
        file.write_all(&vec![7u8; 2 * SEGMENT_BYTES]).unwrap();
        let source = Source::open(tmp.path().to_str().unwrap()).unwrap();
        let mut grown = false;
        let read = source.pieces(
            || Some(vec![0u8; SEGMENT_BYTES]),
            |_, _| {
                if !grown {
                    file.write_all(b"appended mid-read").unwrap();
                    grown = true;
                }
                true
            },
        );
        let e = read.unwrap_err().to_string();
        assert!(
            e.contains("changed size while it was read")
                && e.contains(&format!("{} bytes before", 2 * SEGMENT_BYTES)),
            "{e}"
        );
    }

    #[test]
    fn pieces_cover_a_sparse_file_and_respect_segments() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let mut file = tmp.reopen().unwrap();
        let seg = SEGMENT_BYTES as u64;
        file.seek(SeekFrom::Start(seg - 4096)).unwrap();
        file.write_all(&[1u8; 8192]).unwrap();
        file.set_len(3 * seg).unwrap();
        let pieces = collect(Source::open(tmp.path().to_str().unwrap()).unwrap());
        let mut next = 0;
        for &(offset, len, is_data) in &pieces {
            assert_eq!(offset, next);
            if is_data {
                assert!(
                    offset / seg == (offset + len - 1) / seg,
                    "data piece crosses a segment"
                );
            }
            next += len;
        }
        assert_eq!(next, 3 * seg);
        // Most of the file is holes that were never read (tmpfs and ext4 both report them).
        let data_bytes: u64 = pieces.iter().filter(|p| p.2).map(|p| p.1).sum();
        assert!(data_bytes < seg, "read {data_bytes} bytes of data");
    }

    #[test]
    fn missing_and_directory_sources_are_named() {
        let err = Source::open("/nonexistent/disk.img").err().unwrap();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
        assert!(matches!(
            Source::open("/").err().unwrap(),
            SourceError::Directory { .. }
        ));
    }
}
