//! A cancellation flag a long job (a backup, a restore) checks between pieces of work:
//! set when the command that asked for the job has gone (its control connection dropped,
//! see `control.rs`) or when the user pressed Ctrl-C on a command running without a node.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How often a blocked read of a pipe looks at the flag.
pub const POLL_INTERVAL_MS: i32 = 100;

/// Cheap to clone; every clone sees the same flag.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The error a cancelled read gives.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// A reader of a pipe or socket that gives up once `cancel` is set, even while nothing
/// arrives: a backup of `-` fed by a writer that stalls would otherwise block forever in
/// `read` after its command went away.
pub struct CancellableReader<R> {
    inner: R,
    cancel: Cancel,
}

impl<R: Read + AsFd> CancellableReader<R> {
    pub fn new(inner: R, cancel: Cancel) -> Self {
        CancellableReader { inner, cancel }
    }
}

impl<R: Read + AsFd> Read for CancellableReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.cancel.is_cancelled() {
                // Not `Interrupted`: readers retry that, and would spin here.
                return Err(io::Error::other(Cancelled));
            }
            let mut poll_fd = libc::pollfd {
                fd: self.inner.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own, for a descriptor that stays open while borrowed.
            let n_ready = unsafe { libc::poll(&mut poll_fd, 1, POLL_INTERVAL_MS) };
            if n_ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // Readable, at its end, or failed: `read` says which without blocking.
            if n_ready > 0 {
                return self.inner.read(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    #[test]
    fn a_blocked_read_gives_up_once_cancelled() {
        let (mut writer, reader) = UnixStream::pair().unwrap();
        let cancel = Cancel::new();
        let mut reader = CancellableReader::new(reader, cancel.clone());
        writer.write_all(b"abc").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).unwrap(), 3);
        let canceller = {
            let cancel = cancel.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                cancel.cancel();
            })
        };
        let started = Instant::now();
        // The writer stays open: only the flag can end this read.
        let error = reader.read(&mut buf).unwrap_err();
        assert_eq!(error.to_string(), "cancelled");
        // What `read_exact` and friends retry would spin instead of ending.
        assert_ne!(error.kind(), io::ErrorKind::Interrupted);
        assert!(started.elapsed() < Duration::from_secs(10));
        canceller.join().unwrap();
        drop(writer);
    }
}
