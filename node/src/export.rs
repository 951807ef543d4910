//! `cairn export`: serves a snapshot as an NBD disk (protocol side in
//! `cairn_protocol::nbd`), so qemu, `qemu-img` or `nbdcopy` read it as a block device
//! without a restore: a VM boots from it while nothing of the image is on this machine.
//!
//! The manifest is walked once at start into a table of extents (offset → chunk or zero
//! run): a 100 GiB image of 1 MiB chunks is about 100,000 entries, a few MiB. A read opens
//! the chunks it covers from the local store, or, inside a running node, fetches them from
//! the mesh (the fetch path of restore, verified the same way), and keeps the last
//! `CACHE_BYTES` of opened chunks, shared by every connection. Zero extents are answered
//! as holes (`OFFSET_HOLE`, `base:allocation`), without a fetch or a read.
//!
//! The export is read-only: a VM writes to an overlay of its own on top (qemu's `-snapshot`
//! or a qcow2 file whose backing file is the export's URI), so the snapshot can never be
//! changed through it. It listens on a unix socket or on loopback only: NBD has no
//! authentication and the data goes out in plaintext.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cairn_protocol::manifest::ManifestError;
use cairn_protocol::nbd::{self, Command, ExportInfo, Negotiation, Next, Request, Session};
use cairn_protocol::{Extent, SnapshotRecord};
use serde::Serialize;
use thiserror::Error;

use crate::cancel::Cancel;
use crate::fetch::RemoteChunks;
use crate::vault::{ChunkError, Vault};

/// Opened chunks kept for the next reads, across connections.
pub const CACHE_BYTES: usize = 256 << 20;
/// Connections served at once; more are closed at accept (qemu opens one, or a few with
/// multi-conn).
pub const CONNECTIONS_MAX: usize = 16;
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// Data extents opened ahead of a connection that reads in order: a VM booting or a
/// `qemu-img convert` then waits on the mesh for one chunk at a time at most once.
pub const READ_AHEAD: usize = 8;
/// Threads opening chunks ahead; each fetch from the mesh waits on one holder, so a few
/// in parallel hide a WAN's round trips.
pub const AHEAD_WORKERS: usize = 4;
/// The longest descriptor in a `BLOCK_STATUS` reply: a u32, kept 4 KiB aligned.
const DESCRIPTOR_MAX: u64 = 0xffff_f000;

/// Where an export listens: `unix:PATH` or `HOST:PORT` on loopback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = ExportError;

    fn from_str(s: &str) -> Result<Listen, ExportError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ExportError::BadAddress(s.to_owned()));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| ExportError::BadAddress(s.to_owned()))?;
        if !addr.ip().is_loopback() {
            return Err(ExportError::NotLoopback(addr));
        }
        Ok(Listen::Tcp(addr))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("--nbd {0:?}: give unix:PATH or 127.0.0.1:PORT")]
    BadAddress(String),
    #[error("--nbd {0}: NBD has no authentication and sends the disk in plaintext, so an export listens only on loopback (127.0.0.0/8, ::1) or a unix socket")]
    NotLoopback(SocketAddr),
    #[error("{0} is in use by another export; stop it or pick another path")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or pick another path")]
    NotASocket(PathBuf),
    #[error("cannot listen on {what}")]
    Listen { what: String, source: io::Error },
    #[error("the export did not start listening in {0:?}")]
    NotReady(Duration),
    #[error("manifest of {image}@{snapshot} is unreadable at byte {offset}: {why}")]
    Manifest {
        image: String,
        snapshot: String,
        offset: u64,
        why: String,
    },
}

/// The image as a table of extents, in order.
struct Layout {
    starts: Vec<u64>,
    extents: Vec<Extent>,
    size: u64,
}

impl Layout {
    fn load(
        vault: &Vault,
        record: &SnapshotRecord,
        remote: Option<&dyn RemoteChunks>,
    ) -> Result<Layout, ExportError> {
        let (mut starts, mut extents) = (Vec::new(), Vec::new());
        vault
            .walk_manifest_from(record, remote, |offset, extent| {
                starts.push(offset);
                extents.push(extent);
                true
            })
            .map_err(
                |(offset, e): (u64, ManifestError<ChunkError>)| ExportError::Manifest {
                    image: record.image.to_string(),
                    snapshot: record.id.short(),
                    offset,
                    why: e.to_string(),
                },
            )?;
        Ok(Layout {
            starts,
            extents,
            size: record.size_bytes,
        })
    }

    /// The index of the extent holding byte `offset` (< size).
    fn find(&self, offset: u64) -> usize {
        self.starts.partition_point(|&start| start <= offset) - 1
    }

    /// Calls `each(index, extent start, extent)` for every extent overlapping
    /// `offset..offset + len`, in order, until it returns false.
    fn overlapping(
        &self,
        offset: u64,
        len: u64,
        mut each: impl FnMut(usize, u64, &Extent) -> bool,
    ) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        for i in self.find(offset)..self.extents.len() {
            if self.starts[i] >= end || !each(i, self.starts[i], &self.extents[i]) {
                return;
            }
        }
    }
}

/// Opened chunks by extent index, the least recently used evicted first, and the
/// chunks being opened right now (by a reader or ahead of one), so none is opened twice
/// at once.
#[derive(Default)]
struct Cache {
    chunks: BTreeMap<usize, (Arc<Vec<u8>>, u64)>,
    bytes: usize,
    tick: u64,
    opening: std::collections::BTreeSet<usize>,
}

impl Cache {
    fn get(&mut self, index: usize) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        self.chunks.get_mut(&index).map(|(plain, used)| {
            *used = tick;
            plain.clone()
        })
    }

    fn put(&mut self, index: usize, plain: Arc<Vec<u8>>) {
        self.tick += 1;
        self.bytes += plain.len();
        if let Some((old, _)) = self.chunks.insert(index, (plain, self.tick)) {
            self.bytes -= old.len();
        }
        while self.bytes > CACHE_BYTES && self.chunks.len() > 1 {
            let oldest = self
                .chunks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&i, _)| i)
                .expect("not empty");
            if let Some((old, _)) = self.chunks.remove(&oldest) {
                self.bytes -= old.len();
            }
        }
    }
}

/// What an export served, for its closing line.
#[derive(Debug, Default, Serialize)]
pub struct ExportSummary {
    pub image: String,
    pub snapshot: String,
    pub address: String,
    pub size_bytes: u64,
    pub connections: u64,
    pub requests: u64,
    /// Bytes of image answered to reads (holes included).
    pub read_bytes: u64,
    /// Chunks opened (from the local store or fetched), not counting cache hits.
    pub chunks_opened: u64,
    pub seconds: f64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    read_bytes: AtomicU64,
    chunks_opened: AtomicU64,
}

/// Everything a connection reads from, shared by all of them.
struct Shared<'a> {
    vault: &'a Vault,
    remote: Option<&'a dyn RemoteChunks>,
    layout: Layout,
    info: ExportInfo,
    cache: Mutex<Cache>,
    /// Told whenever a chunk being opened is done with (opened or failed).
    opened: Condvar,
    /// Extent indices to open ahead of a sequential reader.
    ahead: crossbeam_channel::Sender<usize>,
    counters: Counters,
}

type Load<'a> = dyn FnMut(&cairn_protocol::ChunkId) -> Result<Vec<u8>, ChunkError> + 'a;

impl Shared<'_> {
    /// The plaintext of data extent `index`: from the cache, from whoever is opening it
    /// already (waited for), or opened here with `load`.
    fn chunk(&self, index: usize, load: &mut Load<'_>) -> Result<Arc<Vec<u8>>, ChunkError> {
        let mut cache = self.cache.lock().expect("cache lock");
        loop {
            if let Some(plain) = cache.get(index) {
                return Ok(plain);
            }
            if !cache.opening.contains(&index) {
                break;
            }
            cache = self.opened.wait(cache).expect("cache lock");
        }
        cache.opening.insert(index);
        drop(cache);
        let Extent::Data { id, .. } = self.layout.extents[index] else {
            unreachable!("only data extents are loaded");
        };
        let loaded = load(&id).map(Arc::new);
        let mut cache = self.cache.lock().expect("cache lock");
        cache.opening.remove(&index);
        if let Ok(plain) = &loaded {
            self.counters.chunks_opened.fetch_add(1, Ordering::Relaxed);
            cache.put(index, plain.clone());
        }
        drop(cache);
        self.opened.notify_all();
        loaded
    }

    /// Whether extent `index` is cached or being opened.
    fn has(&self, index: usize) -> bool {
        let cache = self.cache.lock().expect("cache lock");
        cache.chunks.contains_key(&index) || cache.opening.contains(&index)
    }
}

/// A piece of a read's answer.
enum Piece {
    /// `plain[from..to]`.
    Data(Arc<Vec<u8>>, usize, usize),
    Zero(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Data(_, from, to) => (to - from) as u64,
            Piece::Zero(len) => *len,
        }
    }
}

/// A connection's way to the chunks: its own store reader, the shared cache.
struct Disk<'s, 'a, L> {
    shared: &'s Shared<'a>,
    load: L,
    /// Where the next read starts if the client reads in order.
    next_offset: u64,
    /// Extents below this index were already queued to be opened ahead.
    queued_to: usize,
}

impl<L: FnMut(&cairn_protocol::ChunkId) -> Result<Vec<u8>, ChunkError>> Disk<'_, '_, L> {
    fn chunk(&mut self, index: usize) -> Result<Arc<Vec<u8>>, ChunkError> {
        self.shared.chunk(index, &mut self.load)
    }

    /// Queues the `READ_AHEAD` data extents after `last` to be opened ahead.
    fn read_ahead(&mut self, last: usize) {
        let extents = &self.shared.layout.extents;
        let mut i = self.queued_to.max(last + 1);
        let mut n_data = extents[last + 1..i.min(extents.len())]
            .iter()
            .filter(|e| matches!(e, Extent::Data { .. }))
            .count();
        while i < extents.len() && n_data < READ_AHEAD {
            if matches!(extents[i], Extent::Data { .. }) {
                n_data += 1;
                // A full queue means the workers are behind: skip rather than wait.
                if !self.shared.has(i) && self.shared.ahead.try_send(i).is_err() {
                    break;
                }
            }
            i += 1;
        }
        self.queued_to = i;
    }

    /// The pieces of `offset..offset + len` (in bounds, checked by the session).
    fn read(&mut self, offset: u64, len: u64) -> Result<Vec<Piece>, ChunkError> {
        let mut wanted = Vec::new();
        self.shared
            .layout
            .overlapping(offset, len, |i, start, extent| {
                wanted.push((i, start, *extent));
                true
            });
        let end = offset + len;
        let sequential = offset == self.next_offset;
        self.next_offset = end;
        if let (true, Some(&(last, _, _))) = (sequential, wanted.last()) {
            self.read_ahead(last);
        }
        let mut pieces: Vec<Piece> = Vec::with_capacity(wanted.len());
        for (i, start, extent) in wanted {
            let from = offset.max(start);
            let to = end.min(start + extent.len_bytes());
            match extent {
                Extent::Zero { .. } => match pieces.last_mut() {
                    Some(Piece::Zero(n)) => *n += to - from,
                    _ => pieces.push(Piece::Zero(to - from)),
                },
                Extent::Data { len_bytes, .. } => {
                    let plain = self.chunk(i)?;
                    if plain.len() != len_bytes as usize {
                        // The id check passed, so the manifest disagrees with its own chunk.
                        return Err(ChunkError::Seal(
                            cairn_protocol::seal::SealError::IdMismatch,
                        ));
                    }
                    pieces.push(Piece::Data(
                        plain,
                        (from - start) as usize,
                        (to - start) as usize,
                    ));
                }
            }
        }
        Ok(pieces)
    }

    /// `base:allocation` descriptors from `offset`, at most `len` bytes of them.
    fn status(&self, offset: u64, len: u64, one: bool) -> Vec<(u32, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        let end = offset.saturating_add(len).min(self.shared.layout.size);
        self.shared
            .layout
            .overlapping(offset, end - offset, |_, start, extent| {
                let from = offset.max(start);
                let to = end.min(start + extent.len_bytes());
                let flags = match extent {
                    Extent::Zero { .. } => nbd::STATE_HOLE | nbd::STATE_ZERO,
                    Extent::Data { .. } => 0,
                };
                match out.last_mut() {
                    Some((n, f)) if *f == flags => *n += to - from,
                    _ => out.push((to - from, flags)),
                }
                !(one || out.len() > nbd::EXTENTS_MAX)
            });
        out.truncate(if one { 1 } else { nbd::EXTENTS_MAX });
        // A descriptor is a u32: a long zero run is cut, and the reply ends with it.
        let mut descriptors = Vec::with_capacity(out.len());
        for (n, flags) in out {
            if n > DESCRIPTOR_MAX {
                descriptors.push((DESCRIPTOR_MAX as u32, flags));
                break;
            }
            descriptors.push((n as u32, flags));
        }
        descriptors
    }
}

/// A connected client, on either kind of socket.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_blocking(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(false),
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(false)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(listen: &Listen) -> Result<Listener, ExportError> {
        let err = |source| ExportError::Listen {
            what: listen.to_string(),
            source,
        };
        let listener = match listen {
            Listen::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr).map_err(err)?),
            Listen::Unix(path) => {
                clear_stale_socket(path)?;
                let listener = UnixListener::bind(path).map_err(err)?;
                // The disk in plaintext: only this user (qemu run as the same user, or root).
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(err)?;
                Listener::Unix(listener, path.clone())
            }
        };
        match &listener {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(err)?;
        Ok(listener)
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }

    /// The NBD URI a client opens this export with.
    fn uri(&self, name: &str) -> String {
        match self {
            Listener::Unix(_, path) => format!("nbd+unix:///{name}?socket={}", path.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("nbd://{addr}/{name}"),
                Err(_) => format!("nbd:///{name}"),
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A socket file left by an export that died is removed; a live one, or a file that is
/// not a socket, is left alone with an error.
fn clear_stale_socket(path: &Path) -> Result<(), ExportError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ExportError::NotASocket(path.to_owned()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ExportError::SocketInUse(path.to_owned()));
    }
    std::fs::remove_file(path).map_err(|source| ExportError::Listen {
        what: format!("unix:{}", path.display()),
        source,
    })
}

/// Serves `record` at `listen` until `cancel` is set. `ready` gets the URI to give qemu
/// once the socket listens.
pub fn serve(
    vault: &Vault,
    record: &SnapshotRecord,
    remote: Option<&dyn RemoteChunks>,
    listen: &Listen,
    cancel: &Cancel,
    ready: &dyn Fn(&str),
) -> Result<ExportSummary, ExportError> {
    let started = Instant::now();
    let layout = Layout::load(vault, record, remote)?;
    let name = record.image.to_string();
    let (ahead_tx, ahead_rx) = crossbeam_channel::bounded(READ_AHEAD * AHEAD_WORKERS);
    let shared = Shared {
        vault,
        remote,
        layout,
        info: ExportInfo {
            description: format!("{}@{}", record.image, record.id.short()),
            name: name.clone(),
            size: record.size_bytes,
            writable: false,
        },
        cache: Mutex::new(Cache::default()),
        opened: Condvar::new(),
        ahead: ahead_tx,
        counters: Counters::default(),
    };
    let listener = Listener::bind(listen)?;
    let uri = listener.uri(&name);
    ready(&uri);
    let open: Mutex<Vec<Stream>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let shared = &shared;
        for _ in 0..AHEAD_WORKERS {
            let ahead = ahead_rx.clone();
            scope.spawn(move || {
                let mut load = shared.vault.loader(shared.remote);
                while !cancel.is_cancelled() {
                    if let Ok(index) = ahead.recv_timeout(ACCEPT_POLL) {
                        // A chunk that fails here fails its reader's own open too.
                        let _ = shared.chunk(index, &mut load);
                    }
                }
            });
        }
        let mut threads = Vec::new();
        while !cancel.is_cancelled() {
            threads.retain(|t: &std::thread::ScopedJoinHandle<'_, ()>| !t.is_finished());
            let stream = match listener.accept() {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "export: accept failed");
                    std::thread::sleep(ACCEPT_POLL);
                    continue;
                }
            };
            if threads.len() >= CONNECTIONS_MAX {
                tracing::warn!(
                    max = CONNECTIONS_MAX,
                    "export: connection refused, too many open"
                );
                continue;
            }
            let (Ok(()), Ok(clone)) = (stream.set_blocking(), stream.try_clone()) else {
                continue;
            };
            open.lock().expect("open lock").push(clone);
            shared.counters.connections.fetch_add(1, Ordering::Relaxed);
            threads.push(scope.spawn(move || {
                if let Err(e) = connection(stream, shared) {
                    tracing::debug!(error = %e, "export: connection ended");
                }
            }));
        }
        // Unblocks every connection thread's read; the scope then joins them.
        for stream in open.lock().expect("open lock").iter() {
            stream.shutdown();
        }
    });
    let c = &shared.counters;
    Ok(ExportSummary {
        image: name,
        snapshot: record.id.short(),
        address: uri,
        size_bytes: record.size_bytes,
        connections: c.connections.load(Ordering::Relaxed),
        requests: c.requests.load(Ordering::Relaxed),
        read_bytes: c.read_bytes.load(Ordering::Relaxed),
        chunks_opened: c.chunks_opened.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// How long `serve_during` waits for the export to listen (the manifest walk comes first,
/// and may fetch from the mesh).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `record` at `listen` while `job(uri)` runs, then stops the export: for a
/// command of ours that reads the snapshot through qemu (a conversion, a VM). An error of
/// the export's own (an unreadable manifest) wins over the job's, since it says more.
pub fn serve_during<T, E: From<ExportError>>(
    vault: &Vault,
    record: &SnapshotRecord,
    remote: Option<&dyn RemoteChunks>,
    listen: &Listen,
    job: impl FnOnce(&str) -> Result<T, E>,
) -> Result<(T, ExportSummary), E> {
    let stop = Cancel::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            serve(vault, record, remote, listen, &stop, &|uri: &str| {
                let _ = ready_tx.send(uri.to_owned());
            })
        });
        let result = match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(uri) => job(&uri),
            Err(_) => Err(ExportError::NotReady(READY_TIMEOUT).into()),
        };
        stop.cancel();
        let served = server.join().expect("export thread")?;
        Ok((result?, served))
    })
}

fn invalid(e: nbd::NbdError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One client, from the greeting to its disconnect.
fn connection(mut stream: Stream, shared: &Shared<'_>) -> io::Result<()> {
    stream.write_all(&nbd::greeting())?;
    let mut flags = [0; nbd::CLIENT_FLAGS_LEN];
    stream.read_exact(&mut flags)?;
    let mut negotiation = Negotiation::new(nbd::client_flags(flags).map_err(invalid)?);
    let mut out = Vec::new();
    let session = loop {
        let mut header = [0; nbd::OPTION_HEADER_LEN];
        stream.read_exact(&mut header)?;
        let (option, len) = nbd::option_header(&header).map_err(invalid)?;
        let mut data = vec![0; len as usize];
        stream.read_exact(&mut data)?;
        out.clear();
        let next = negotiation
            .option(option, &data, &shared.info, &mut out)
            .map_err(invalid)?;
        stream.write_all(&out)?;
        match next {
            Next::Options => {}
            Next::Close => return Ok(()),
            Next::Transmit(session) => break session,
        }
    };
    let mut disk = Disk {
        shared,
        load: shared.vault.loader(shared.remote),
        next_offset: 0,
        queued_to: 0,
    };
    let mut writer = BufWriter::with_capacity(1 << 20, stream.try_clone()?);
    loop {
        let mut raw = [0; nbd::REQUEST_LEN];
        stream.read_exact(&mut raw)?;
        let request = Request::decode(&raw).map_err(invalid)?;
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        discard(&mut stream, request.payload_len())?;
        if request.command == Command::Disconnect {
            writer.flush()?;
            return Ok(());
        }
        out.clear();
        match session.check(&request) {
            Err(error) => {
                nbd::error_reply(&mut out, &session, request.cookie, error, refusal(error));
                writer.write_all(&out)?;
            }
            Ok(()) => answer(&mut disk, &session, &request, &mut out, &mut writer)?,
        }
        writer.flush()?;
    }
}

fn refusal(error: u32) -> &'static str {
    match error {
        nbd::EPERM => "the export is read-only: write to an overlay",
        nbd::EOVERFLOW => "request larger than the maximum block size",
        nbd::ENOSPC | nbd::EINVAL => "request out of bounds or not valid here",
        nbd::ENOTSUP => "not supported",
        _ => "refused",
    }
}

/// Reads and drops a refused write's payload, so the stream stays in step.
fn discard(stream: &mut Stream, n: u32) -> io::Result<()> {
    let copied = io::copy(&mut stream.take(u64::from(n)), &mut io::sink())?;
    if copied < u64::from(n) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn answer<L: FnMut(&cairn_protocol::ChunkId) -> Result<Vec<u8>, ChunkError>>(
    disk: &mut Disk<'_, '_, L>,
    session: &Session,
    request: &Request,
    out: &mut Vec<u8>,
    writer: &mut impl Write,
) -> io::Result<()> {
    let cookie = request.cookie;
    match request.command {
        Command::Flush => {
            nbd::done_reply(out, session, cookie);
            writer.write_all(out)
        }
        Command::BlockStatus => {
            let one = request.flags & nbd::CMD_FLAG_REQ_ONE != 0;
            let descriptors = disk.status(request.offset, u64::from(request.length), one);
            nbd::block_status_chunk(out, cookie, &descriptors);
            writer.write_all(out)
        }
        Command::Read => {
            let pieces = match disk.read(request.offset, u64::from(request.length)) {
                Ok(pieces) => pieces,
                Err(e) => {
                    tracing::warn!(offset = request.offset, error = %e, "export: read failed");
                    nbd::error_reply(out, session, cookie, nbd::EIO, &e.to_string());
                    return writer.write_all(out);
                }
            };
            disk.shared
                .counters
                .read_bytes
                .fetch_add(u64::from(request.length), Ordering::Relaxed);
            write_read(session, request, &pieces, out, writer)
        }
        // `Session::check` refuses everything else on a read-only export.
        _ => {
            nbd::error_reply(out, session, cookie, nbd::EINVAL, "not supported");
            writer.write_all(out)
        }
    }
}

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

fn write_zeros(writer: &mut (impl Write + ?Sized), mut n: u64) -> io::Result<()> {
    while n > 0 {
        let step = n.min(ZEROS.len() as u64) as usize;
        writer.write_all(&ZEROS[..step])?;
        n -= step as u64;
    }
    Ok(())
}

/// A read's answer: one chunk per piece (holes sent as holes) for a structured client
/// that allows fragments, else the bytes in one go.
fn write_read(
    session: &Session,
    request: &Request,
    pieces: &[Piece],
    out: &mut Vec<u8>,
    writer: &mut impl Write,
) -> io::Result<()> {
    let cookie = request.cookie;
    let whole = |out: &mut Vec<u8>, writer: &mut dyn Write| -> io::Result<()> {
        writer.write_all(out)?;
        for piece in pieces {
            match piece {
                Piece::Data(plain, from, to) => writer.write_all(&plain[*from..*to])?,
                Piece::Zero(n) => write_zeros(writer, *n)?,
            }
        }
        Ok(())
    };
    if !session.structured {
        nbd::simple_reply(out, cookie, 0);
        return whole(out, writer);
    }
    if request.flags & nbd::CMD_FLAG_DF != 0 || pieces.is_empty() {
        nbd::data_chunk_header(out, cookie, true, request.offset, request.length);
        return whole(out, writer);
    }
    let mut offset = request.offset;
    for (i, piece) in pieces.iter().enumerate() {
        let done = i + 1 == pieces.len();
        out.clear();
        let len = piece.len() as u32;
        match piece {
            Piece::Data(plain, from, to) => {
                nbd::data_chunk_header(out, cookie, done, offset, len);
                writer.write_all(out)?;
                writer.write_all(&plain[*from..*to])?;
            }
            Piece::Zero(_) => {
                nbd::hole_chunk(out, cookie, done, offset, len);
                writer.write_all(out)?;
            }
        }
        offset += u64::from(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_listens_on_a_unix_socket_or_loopback_only() {
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/x.sock".into())
        );
        assert!(matches!(
            "127.0.0.1:10809".parse::<Listen>(),
            Ok(Listen::Tcp(_))
        ));
        assert!(matches!(
            "[::1]:10809".parse::<Listen>(),
            Ok(Listen::Tcp(_))
        ));
        assert!(matches!(
            "0.0.0.0:10809".parse::<Listen>(),
            Err(ExportError::NotLoopback(_))
        ));
        assert!(matches!(
            "192.168.1.4:10809".parse::<Listen>(),
            Err(ExportError::NotLoopback(_))
        ));
        assert!(matches!(
            "unix:".parse::<Listen>(),
            Err(ExportError::BadAddress(_))
        ));
        assert!(matches!(
            "localhost".parse::<Listen>(),
            Err(ExportError::BadAddress(_))
        ));
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_chunk_past_its_budget() {
        let mut cache = Cache::default();
        let big = CACHE_BYTES / 3 + 1;
        for i in 0..3 {
            cache.put(i, Arc::new(vec![0; big]));
        }
        assert!(
            cache.get(0).is_none(),
            "the oldest went when the budget was passed"
        );
        assert!(cache.get(1).is_some());
        cache.put(3, Arc::new(vec![0; big]));
        assert!(cache.get(2).is_none(), "1 was used more recently than 2");
        assert!(cache.get(1).is_some() && cache.get(3).is_some());
        assert!(cache.bytes <= CACHE_BYTES);
    }
}
