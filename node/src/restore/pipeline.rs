//! The restore pipeline. The calling thread walks the manifest and routes each data
//! extent; worker threads read, open (decrypt, decompress, check the id) and `pwrite` each
//! chunk at its offset; a dispatcher thread keeps up to `REMOTE_FETCHES_MAX` fetches from
//! the mesh in flight for chunks the local store lacks or holds damaged.
//!
//! ```text
//! walker ── located here ──────────────> local queue ──> workers ──> pwrite at offset
//!    │   ── maybe already written ──────> (Check job)  ─┘   │ local copy damaged
//!    └──── not here ──> remote queue <───────────────────────┘
//!                         └─> dispatcher ─(slot)─> RemoteChunks::request
//!                                 answers (any thread) ──> workers: open, verify, pwrite;
//!                                 a bad answer is asked again, its sender excluded
//! ```
//!
//! Resume. An interrupted restore keeps `OUT.cairn-partial`; the next run checks each data
//! extent against the partial file before fetching anything: the bytes at its offset are
//! hashed with the vault's chunk-id key and the chunk is skipped when they hash to its id.
//! Regions the file has never written are holes, found with `SEEK_DATA` without reading
//! them (a data chunk is never all zeros: those are zero extents), so only written regions
//! are read back. This needs no journal: a journal entry would have to be made durable
//! after its data (an fsync per batch) or it could claim bytes a power cut lost; the hash
//! is true whatever happened, including SIGKILL mid-write, a power cut, or a partial file
//! left by a restore of another snapshot (whose zero extents are punched back to holes).
//! Its cost is one local read and hash of what is already written, far cheaper than
//! fetching it again over a WAN.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use cairn_protocol::seal::Opener;
use cairn_protocol::{ChunkId, Extent, SnapshotRecord};
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Select, Sender};

use super::{RestoreError, RestoreOptions};
use crate::cancel::Cancel;
use crate::fetch::{
    sealed_bytes_max, Checked, Fetched, RemoteChunks, RemoteError, Tries, DROPPED,
    REMOTE_FETCHES_MAX, REMOTE_FETCH_BYTES_MAX,
};
use crate::store::{ChunkLocation, PackReader};
use crate::vault::{ChunkError, Vault};

/// Extents queued to restore workers: bounds memory to this many small records.
const RESTORE_QUEUE_MAX: usize = 256;
/// Extents waiting for a fetch slot: small records, so the walk runs ahead of a slow WAN
/// and keeps the workers busy with what is held here meanwhile.
const REMOTE_QUEUE_MAX: usize = 4096;
/// Largest block of zeros written at once to a block device.
const ZERO_WRITE_BYTES: usize = 1 << 20;
/// Restored data between nudges to the kernel to write back what is dirty.
const WRITEBACK_EVERY_BYTES: u64 = 128 << 20;
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Where the image is written.
pub(super) struct Output<'f> {
    pub file: &'f File,
    pub path: &'f Path,
    pub is_device: bool,
    /// The file holds what an interrupted restore wrote: check before writing.
    pub resuming: bool,
}

/// Data bytes by where they came from.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub resumed_bytes: u64,
    pub local_bytes: u64,
    pub remote_bytes: u64,
    pub n_refused: u64,
}

#[derive(Default)]
struct Counters {
    resumed_bytes: AtomicU64,
    local_bytes: AtomicU64,
    remote_bytes: AtomicU64,
    n_refused: AtomicU64,
    /// Written by this run: paces writeback.
    written_bytes: AtomicU64,
    /// Image bytes finished, zero runs included: what progress shows.
    done_bytes: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct DataExtent {
    offset: u64,
    id: ChunkId,
    len_bytes: u32,
}

enum LocalJob {
    /// Found in the store, its read already started.
    Read(DataExtent, ChunkLocation),
    /// The partial file may already hold it: check that before anything else.
    Check(DataExtent),
}

/// A chunk to fetch from the mesh, and why the local store could not give it.
struct RemoteJob {
    extent: DataExtent,
    local: ChunkError,
}

/// One answer to a fetch. It carries a sender for the retry, so the answer channel stays
/// open exactly while some fetch is still outstanding.
struct Answer {
    job: RemoteJob,
    tries: Tries,
    answer: Result<Fetched, RemoteError>,
    reply: Sender<Answer>,
}

/// The callback's payload. Dropped without an answer (a source that lost the request), it
/// answers with an error itself, so the fetch slot is never lost and restore never hangs.
struct Reply {
    answers: Sender<Answer>,
    pending: Option<(RemoteJob, Tries)>,
}

impl Reply {
    fn send(mut self, answer: Result<Fetched, RemoteError>) {
        let (job, tries) = self.pending.take().expect("a reply is sent once");
        // An error means the restore already ended; the answer is not needed.
        let _ = self.answers.send(Answer {
            job,
            tries,
            answer,
            reply: self.answers.clone(),
        });
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some((job, tries)) = self.pending.take() {
            let _ = self.answers.send(Answer {
                job,
                tries,
                answer: Err(RemoteError(DROPPED.into())),
                reply: self.answers.clone(),
            });
        }
    }
}

/// Fetch slots: at most `REMOTE_FETCHES_MAX` fetches and `REMOTE_FETCH_BYTES_MAX` sealed
/// bytes outstanding (one fetch always fits, whatever its size).
#[derive(Default)]
struct Slots {
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct SlotState {
    n_fetches: usize,
    n_bytes: u64,
    stopped: bool,
}

impl Slots {
    /// Waits for a slot; false once the restore has failed.
    fn acquire(&self, n_bytes: u64) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        loop {
            if state.stopped {
                return false;
            }
            if state.n_fetches == 0
                || (state.n_fetches < REMOTE_FETCHES_MAX
                    && state.n_bytes + n_bytes <= REMOTE_FETCH_BYTES_MAX)
            {
                state.n_fetches += 1;
                state.n_bytes += n_bytes;
                return true;
            }
            state = self.changed.wait(state).expect("not poisoned");
        }
    }

    fn release(&self, n_bytes: u64) {
        let mut state = self.state.lock().expect("not poisoned");
        assert!(
            state.n_fetches > 0 && state.n_bytes >= n_bytes,
            "slot released twice"
        );
        state.n_fetches -= 1;
        state.n_bytes -= n_bytes;
        self.changed.notify_one();
    }

    fn stop(&self) {
        self.state.lock().expect("not poisoned").stopped = true;
        self.changed.notify_all();
    }
}

struct Pipeline<'a> {
    vault: &'a Vault,
    record: &'a SnapshotRecord,
    output: &'a Output<'a>,
    remote: Option<&'a dyn RemoteChunks>,
    cancel: Option<&'a Cancel>,
    counters: Counters,
    first_error: Mutex<Option<RestoreError>>,
    failed: AtomicBool,
    slots: Slots,
    /// Dropped on failure: wakes every worker at once.
    stop: Mutex<Option<Sender<()>>>,
}

/// What each worker thread keeps.
struct Worker<'s> {
    reader: PackReader<'s>,
    opener: Opener,
    /// Reused for reading back regions of a partial file.
    buf: Vec<u8>,
}

/// Runs the restore into `output`; the counts, and the first error if it failed.
pub(super) fn run(
    vault: &Vault,
    record: &SnapshotRecord,
    output: &Output<'_>,
    options: &RestoreOptions<'_>,
    progress: &(dyn Fn(u64) + Sync),
) -> (Counts, Option<RestoreError>) {
    let (stop_tx, stop_rx) = bounded::<()>(0);
    let pipeline = Pipeline {
        vault,
        record,
        output,
        remote: options.remote,
        cancel: options.cancel,
        counters: Counters::default(),
        first_error: Mutex::new(None),
        failed: AtomicBool::new(false),
        slots: Slots::default(),
        stop: Mutex::new(Some(stop_tx)),
    };
    let (local_tx, local_rx) = bounded::<LocalJob>(RESTORE_QUEUE_MAX);
    let (remote_tx, remote_rx) = bounded::<RemoteJob>(REMOTE_QUEUE_MAX);
    let (answers_tx, answers_rx) = unbounded::<Answer>();
    // Every thread holds a sender; the channel closes when the last one ends.
    let (alive_tx, alive_rx) = bounded::<()>(0);
    let remote_tx = pipeline.remote.map(|_| remote_tx);
    std::thread::scope(|scope| {
        let pipeline = &pipeline;
        for _ in 0..options.n_workers.max(1) {
            let (local_rx, answers_rx, stop_rx) =
                (local_rx.clone(), answers_rx.clone(), stop_rx.clone());
            let (remote_tx, alive) = (remote_tx.clone(), alive_tx.clone());
            scope.spawn(move || {
                let _alive = alive;
                pipeline.work(local_rx, answers_rx, remote_tx, stop_rx);
            });
        }
        if let Some(remote) = pipeline.remote {
            let alive = alive_tx.clone();
            scope.spawn(move || {
                let _alive = alive;
                pipeline.dispatch(remote, remote_rx, answers_tx);
            });
        } else {
            drop((remote_rx, answers_tx));
        }
        drop((local_rx, answers_rx, stop_rx, alive_tx));
        pipeline.walk(local_tx, remote_tx, progress);
        // The walk is done; fetches may still be arriving.
        while let Err(RecvTimeoutError::Timeout) = alive_rx.recv_timeout(PROGRESS_EVERY) {
            if pipeline.cancel.is_some_and(Cancel::is_cancelled) && !pipeline.failed() {
                pipeline.fail(RestoreError::Cancelled);
            }
            progress(pipeline.counters.done_bytes.load(Ordering::Relaxed));
        }
    });
    let counters = &pipeline.counters;
    let counts = Counts {
        resumed_bytes: counters.resumed_bytes.load(Ordering::Relaxed),
        local_bytes: counters.local_bytes.load(Ordering::Relaxed),
        remote_bytes: counters.remote_bytes.load(Ordering::Relaxed),
        n_refused: counters.n_refused.load(Ordering::Relaxed),
    };
    (
        counts,
        pipeline.first_error.into_inner().expect("not poisoned"),
    )
}

impl Pipeline<'_> {
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Keeps the first error and stops the walk and the fetches; workers still write what
    /// is already queued to them, then end.
    fn fail(&self, error: RestoreError) {
        self.first_error
            .lock()
            .expect("not poisoned")
            .get_or_insert(error);
        self.failed.store(true, Ordering::Release);
        self.slots.stop();
        drop(self.stop.lock().expect("not poisoned").take());
    }

    fn output_error(&self, source: io::Error) -> RestoreError {
        RestoreError::Output {
            path: self.output.path.to_owned(),
            source,
        }
    }

    /// The calling thread: walks the manifest and routes every extent.
    fn walk(
        &self,
        local_tx: Sender<LocalJob>,
        remote_tx: Option<Sender<RemoteJob>>,
        progress: &(dyn Fn(u64) + Sync),
    ) {
        let mut last_progress = Instant::now();
        let mut prefetcher = self.vault.store.reader();
        let zeros_len = if self.output.is_device {
            ZERO_WRITE_BYTES
        } else {
            0
        };
        let zeros = vec![0u8; zeros_len];
        let mut written = self.output.resuming.then(|| DataMap::new(self.output.file));
        let walked = self
            .vault
            .walk_manifest_from(self.record, self.remote, |offset, extent| {
                if self.failed() {
                    return false;
                }
                if self.cancel.is_some_and(Cancel::is_cancelled) {
                    self.fail(RestoreError::Cancelled);
                    return false;
                }
                if last_progress.elapsed() > PROGRESS_EVERY {
                    progress(self.counters.done_bytes.load(Ordering::Relaxed));
                    last_progress = Instant::now();
                }
                match extent {
                    Extent::Data { id, len_bytes } => self.route(
                        DataExtent {
                            offset,
                            id,
                            len_bytes,
                        },
                        &mut prefetcher,
                        written.as_mut(),
                        &local_tx,
                        remote_tx.as_ref(),
                    ),
                    Extent::Zero { len_bytes } => {
                        self.zero(offset, len_bytes, &zeros, written.as_mut())
                    }
                }
            });
        drop((local_tx, remote_tx));
        if let Err((offset, e)) = walked {
            self.fail(RestoreError::Manifest {
                image: self.record.image.to_string(),
                snapshot: self.record.id.short(),
                offset,
                why: crate::units::chain(&e),
            });
        }
    }

    /// Sends a data extent to be checked in place, read here, or fetched.
    fn route(
        &self,
        extent: DataExtent,
        prefetcher: &mut PackReader<'_>,
        written: Option<&mut DataMap<'_>>,
        local_tx: &Sender<LocalJob>,
        remote_tx: Option<&Sender<RemoteJob>>,
    ) -> bool {
        if let Some(written) = written {
            match written.may_hold_data(extent.offset, u64::from(extent.len_bytes)) {
                Ok(true) => return local_tx.send(LocalJob::Check(extent)).is_ok(),
                Ok(false) => {}
                Err(e) => {
                    self.fail(self.output_error(e));
                    return false;
                }
            }
        }
        // Prefetching here, RESTORE_QUEUE_MAX chunks ahead of the workers, keeps the disk
        // busy with many reads at once.
        match prefetcher.prefetch(&extent.id) {
            Ok(location) => local_tx.send(LocalJob::Read(extent, location)).is_ok(),
            Err(local) => match remote_tx {
                Some(remote_tx) => remote_tx
                    .send(RemoteJob {
                        extent,
                        local: local.into(),
                    })
                    .is_ok(),
                None => {
                    self.fail(RestoreError::chunk(
                        self.record,
                        extent.offset,
                        extent.id,
                        local.into(),
                    ));
                    false
                }
            },
        }
    }

    /// A zero run: a hole in a file (punched if a resumed file has data there), zeros on
    /// a device.
    fn zero(
        &self,
        offset: u64,
        len_bytes: u64,
        zeros: &[u8],
        written: Option<&mut DataMap<'_>>,
    ) -> bool {
        let done = if self.output.is_device {
            write_zeros(self.output.file, zeros, offset, len_bytes)
        } else if let Some(written) = written {
            match written.may_hold_data(offset, len_bytes) {
                Ok(true) => punch_hole(self.output.file, offset, len_bytes),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            Ok(())
        };
        match done {
            Ok(()) => {
                self.counters
                    .done_bytes
                    .fetch_add(len_bytes, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.fail(self.output_error(e));
                false
            }
        }
    }

    /// A worker thread: local jobs and fetched chunks until both are done, or a failure.
    fn work(
        &self,
        local_rx: Receiver<LocalJob>,
        answers: Receiver<Answer>,
        mut remote_tx: Option<Sender<RemoteJob>>,
        stop: Receiver<()>,
    ) {
        let mut worker = Worker {
            reader: self.vault.store.reader(),
            opener: Opener::new(),
            buf: Vec::new(),
        };
        let (mut local_open, mut answers_open, mut stop_open) = (true, true, true);
        while local_open || answers_open {
            let mut select = Select::new();
            let stop_idx = stop_open.then(|| select.recv(&stop));
            let local_idx = local_open.then(|| select.recv(&local_rx));
            if answers_open {
                select.recv(&answers);
            }
            let op = select.select();
            if Some(op.index()) == stop_idx {
                // A failure: answers still on their way are not waited for, but what is
                // queued here or has arrived is still written, so a rerun has less to do.
                let _ = op.recv(&stop);
                (stop_open, answers_open) = (false, false);
            } else if Some(op.index()) == local_idx {
                match op.recv(&local_rx) {
                    Ok(job) => self.local(job, &mut worker, remote_tx.as_ref(), &answers),
                    Err(_) => {
                        // No more local jobs, so nothing more for this worker to forward:
                        // let the remote queue close once the others are done too.
                        local_open = false;
                        remote_tx = None;
                    }
                }
            } else {
                match op.recv(&answers) {
                    Ok(answer) => self.answer(answer, &mut worker),
                    Err(_) => answers_open = false,
                }
            }
        }
        while let Ok(answer) = answers.try_recv() {
            self.answer(answer, &mut worker);
        }
    }

    fn local(
        &self,
        job: LocalJob,
        worker: &mut Worker<'_>,
        remote_tx: Option<&Sender<RemoteJob>>,
        answers: &Receiver<Answer>,
    ) {
        let (extent, location) = match job {
            LocalJob::Read(extent, location) => (extent, Some(location)),
            LocalJob::Check(extent) => match self.in_place(&extent, &mut worker.buf) {
                Ok(true) => {
                    let n_bytes = u64::from(extent.len_bytes);
                    let counters = &self.counters;
                    counters.resumed_bytes.fetch_add(n_bytes, Ordering::Relaxed);
                    counters.done_bytes.fetch_add(n_bytes, Ordering::Relaxed);
                    return;
                }
                Ok(false) => (extent, None),
                Err(e) => return self.fail(self.output_error(e)),
            },
        };
        let (reader, opener) = (&mut worker.reader, &mut worker.opener);
        let loaded = match location {
            Some(location) => self
                .vault
                .load_chunk_at(reader, opener, &extent.id, &location),
            None => self.vault.load_chunk(reader, opener, &extent.id),
        };
        match (loaded, remote_tx) {
            (Ok(plain), _) => self.write(&extent, &plain, &self.counters.local_bytes),
            // Already failed: only what can be written from here is.
            (Err(_), _) if self.failed() => {}
            (Err(local), Some(remote_tx)) => {
                self.forward(RemoteJob { extent, local }, remote_tx, answers, worker)
            }
            (Err(local), None) => self.fail(RestoreError::chunk(
                self.record,
                extent.offset,
                extent.id,
                local,
            )),
        }
    }

    /// Whether the output already holds this chunk's bytes at its offset.
    fn in_place(&self, extent: &DataExtent, buf: &mut Vec<u8>) -> io::Result<bool> {
        buf.resize(extent.len_bytes as usize, 0);
        self.output.file.read_exact_at(buf, extent.offset)?;
        Ok(self.vault.keys.chunk_id(buf) == extent.id)
    }

    /// Hands a chunk the local store could not give to the dispatcher. While its queue is
    /// full this worker answers fetched chunks, which frees the slots that drain it.
    fn forward(
        &self,
        job: RemoteJob,
        remote_tx: &Sender<RemoteJob>,
        answers: &Receiver<Answer>,
        worker: &mut Worker<'_>,
    ) {
        loop {
            let mut select = Select::new();
            let send_idx = select.send(remote_tx);
            select.recv(answers);
            let op = select.select();
            if op.index() == send_idx {
                // An error: the dispatcher stopped after a failure.
                let _ = op.send(remote_tx, job);
                return;
            }
            match op.recv(answers) {
                Ok(answer) => self.answer(answer, worker),
                Err(_) => {
                    // No fetch outstanding and the dispatcher gone: only after a failure.
                    let _ = remote_tx.try_send(job);
                    return;
                }
            }
        }
    }

    /// One answer from the mesh: write it, ask again elsewhere, or fail. After a failure a
    /// good answer that has already arrived is still written, but nothing is asked again.
    fn answer(&self, answer: Answer, worker: &mut Worker<'_>) {
        let Answer {
            job,
            mut tries,
            answer,
            reply,
        } = answer;
        let remote = self.remote.expect("answers come only from a remote source");
        let id = job.extent.id;
        match tries.check(remote, &self.vault.keys, &mut worker.opener, &id, answer) {
            // The slot stays taken by the retry.
            Checked::Retry if !self.failed() => return issue(remote, &reply, job, tries),
            Checked::Retry => {}
            Checked::Plain(plain) => self.write(&job.extent, &plain, &self.counters.remote_bytes),
            Checked::Failed(remote_error) => self.fail(RestoreError::Unavailable {
                image: self.record.image.to_string(),
                snapshot: self.record.id.short(),
                offset: job.extent.offset,
                id,
                local: Box::new(job.local),
                remote: Box::new(remote_error),
            }),
        }
        self.counters
            .n_refused
            .fetch_add(u64::from(tries.n_refused), Ordering::Relaxed);
        self.slots.release(sealed_bytes_max(job.extent.len_bytes));
    }

    /// Writes a verified chunk at its offset and counts it under `source`.
    fn write(&self, extent: &DataExtent, plain: &[u8], source: &AtomicU64) {
        if plain.len() != extent.len_bytes as usize {
            return self.fail(RestoreError::Length {
                id: extent.id,
                offset: extent.offset,
                expected: extent.len_bytes,
                actual: plain.len(),
            });
        }
        if let Err(e) = self.output.file.write_all_at(plain, extent.offset) {
            return self.fail(self.output_error(e));
        }
        let n_bytes = plain.len() as u64;
        source.fetch_add(n_bytes, Ordering::Relaxed);
        self.counters
            .done_bytes
            .fetch_add(n_bytes, Ordering::Relaxed);
        let total = self
            .counters
            .written_bytes
            .fetch_add(n_bytes, Ordering::Relaxed)
            + n_bytes;
        if total / WRITEBACK_EVERY_BYTES != (total - n_bytes) / WRITEBACK_EVERY_BYTES {
            start_writeback(self.output.file);
        }
    }

    /// The dispatcher thread: starts a fetch for each queued extent as slots free up.
    fn dispatch(
        &self,
        remote: &dyn RemoteChunks,
        jobs: Receiver<RemoteJob>,
        answers: Sender<Answer>,
    ) {
        for job in jobs {
            if !self.slots.acquire(sealed_bytes_max(job.extent.len_bytes)) {
                return;
            }
            issue(remote, &answers, job, Tries::default());
        }
    }
}

/// Asks `remote` for a chunk; the answer comes back on `answers`.
fn issue(remote: &dyn RemoteChunks, answers: &Sender<Answer>, job: RemoteJob, tries: Tries) {
    let id = job.extent.id;
    let exclude = tries.exclude.clone();
    let reply = Reply {
        answers: answers.clone(),
        pending: Some((job, tries)),
    };
    remote.request(id, &exclude, Box::new(move |answer| reply.send(answer)));
}

/// Which regions of a partial file hold data, found with `SEEK_DATA`/`SEEK_HOLE` as the
/// walk moves forward, so regions never written are never read.
struct DataMap<'f> {
    file: &'f File,
    /// The data run at or after the last lookup: [start, end); u64::MAX when none.
    data_start: u64,
    data_end: u64,
}

impl<'f> DataMap<'f> {
    fn new(file: &'f File) -> DataMap<'f> {
        DataMap {
            file,
            data_start: 0,
            data_end: 0,
        }
    }

    /// Whether any of [offset, offset + len_bytes) may hold data. Offsets must not go
    /// backwards between calls.
    fn may_hold_data(&mut self, offset: u64, len_bytes: u64) -> io::Result<bool> {
        if offset >= self.data_end {
            self.data_start = match seek(self.file, offset, libc::SEEK_DATA) {
                Ok(at) => at,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => u64::MAX,
                Err(e) => return Err(e),
            };
            self.data_end = match self.data_start {
                u64::MAX => u64::MAX,
                start => seek(self.file, start, libc::SEEK_HOLE)?,
            };
        }
        Ok(self.data_start < offset.saturating_add(len_bytes))
    }
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on an fd we own; workers use pread/pwrite, which ignore its position.
    let at = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(file), offset, whence) };
    u64::try_from(at).map_err(|_| io::Error::last_os_error())
}

/// Turns a region of a file back into a hole (zeros), for a resumed file that held data
/// where this snapshot has a zero run.
fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let (Ok(at), Ok(len)) = (
        libc::off_t::try_from(offset),
        libc::off_t::try_from(len_bytes),
    ) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate on an fd we own; KEEP_SIZE leaves the file's length alone.
    let done = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at,
            len,
        )
    };
    if done == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        write_zeros(file, &vec![0u8; ZERO_WRITE_BYTES], offset, len_bytes)
    } else {
        Err(e)
    }
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
