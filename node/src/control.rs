//! The local control socket: how `cairn` commands reach the node running on this machine
//! (`cairn node run`), which holds the data dir, instead of opening it themselves.
//!
//! Files in the data dir (which is mode 0700):
//!
//! ```text
//! node.sock        the Unix socket, mode 0600; bound as node.sock.new and renamed into
//!                  place, so it never exists with looser permissions
//! node.sock.lock   held with flock (and naming the pid) while a server runs, so two nodes
//!                  never share a data dir and a stale node.sock left by a crashed node is
//!                  replaced without racing a node that is starting
//! ```
//!
//! The server also reads each connecting peer's uid (`SO_PEERCRED`; `getpeereid` on the
//! BSDs) and refuses any user but its own, root included: the mode bits stop other users
//! on Linux, and this stops them where socket permissions are not enforced.
//!
//! One request per connection, in frames of a u32 little-endian length and that many
//! bytes of JSON (at most `FRAME_BYTES_MAX`):
//!
//! ```text
//! command -> node   {"version": 2, "request": REQ}
//! node -> command   {"frame": RESP}     zero or more: progress, then a result
//! node -> command   "end"               the handler returned: the answer is whole
//!               or  {"error": "why"}    the node could not serve the request
//! ```
//!
//! A request may carry one open file descriptor (`"fd": true` in the envelope): right
//! after the request frame the command sends one byte with the descriptor attached
//! (`SCM_RIGHTS`), and the handler gets it. This is how `cairn backup IMAGE -` reads the
//! command's own stdin inside the node.
//!
//! A connection that closes before "end" was cut off (the node stopped or crashed), and
//! the command says so instead of taking a partial answer for a whole one. REQ and RESP
//! are the daemon's types; this module only carries them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::cancel::Cancel;

pub const SOCKET_FILE: &str = "node.sock";
const SOCKET_TEMP_FILE: &str = "node.sock.new";
const LOCK_FILE: &str = "node.sock.lock";
/// The version of the envelope around requests; a node refuses others by name.
/// Version 2: typed requests, one per operation (version 1 sent a command line for the
/// node to parse again). Nothing to migrate: both ends are the same binary, and a node
/// refuses a command of the other version, which says to restart the node after upgrading.
pub const CONTROL_VERSION: u32 = 2;
/// Big enough for a status with thousands of peers; a peer sending more is refused before
/// anything is allocated.
pub const FRAME_BYTES_MAX: u32 = 16 << 20;
/// Connections served at once; one more is told the node is busy.
pub const CONNECTIONS_MAX: usize = 16;
/// How long the node waits for a connected command to send its request.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// How long the node waits for a command that stopped reading before giving up on it.
pub const WRITE_TIMEOUT_MS: u64 = 30_000;
/// How often the node looks for a command that hung up while its job runs.
const HANGUP_POLL_MS: i32 = 100;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("a frame of {n_bytes} bytes is over the {FRAME_BYTES_MAX}-byte limit")]
    TooLarge { n_bytes: u64 },
    #[error("a frame is not the JSON expected")]
    Malformed(#[source] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("no node is running in {0} (start one with `cairn node run`)")]
    NotRunning(PathBuf),
    #[error(
        "a node is already running in {path}{holder}: stop it first, or use another --data-dir"
    )]
    AlreadyRunning { path: PathBuf, holder: String },
    #[error("data dir {path} is open to other users (mode {mode:o}): run `chmod 700 {path}`")]
    DirExposed { path: PathBuf, mode: u32 },
    #[error(
        "{0} exists and is not a socket: move it out of the data dir, then start the node again"
    )]
    NotASocket(PathBuf),
    #[error("permission denied: the node on {path} runs as another user ({owner}): run this command as that user")]
    PermissionDenied { path: PathBuf, owner: String },
    #[error("control socket path {path} is {n_bytes} bytes, longer than a Unix socket allows ({n_bytes_max}): use a shorter --data-dir")]
    PathTooLong {
        path: PathBuf,
        n_bytes: usize,
        n_bytes_max: usize,
    },
    #[error("the node refused the request: {0}")]
    Refused(String),
    #[error(
        "the node closed the connection before finishing its answer (did it stop? see its log)"
    )]
    Cut,
    #[error("the node answered with {n_frames} frames where one was expected: is it the same cairn version as this command?")]
    NotOneFrame { n_frames: usize },
    #[error("control socket {path}")]
    Frame { path: PathBuf, source: FrameError },
    #[error("control socket {path}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
struct RequestEnvelope<R> {
    version: u32,
    request: R,
    /// A descriptor follows the frame (see the module text).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fd: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply<T> {
    Frame(T),
    End,
    Error(String),
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Writes one frame; refuses, rather than sends, a value over `FRAME_BYTES_MAX` (it
/// depends on runtime data such as the number of peers, so it is not an assertion).
pub fn write_frame<T: Serialize>(writer: &mut impl Write, value: &T) -> Result<(), FrameError> {
    let mut frame = vec![0u8; 4];
    serde_json::to_writer(&mut frame, value).map_err(FrameError::Malformed)?;
    let n_bytes = frame.len() - 4;
    let n_bytes_u32 = u32::try_from(n_bytes)
        .ok()
        .filter(|n| *n <= FRAME_BYTES_MAX)
        .ok_or(FrameError::TooLarge {
            n_bytes: n_bytes as u64,
        })?;
    frame[..4].copy_from_slice(&n_bytes_u32.to_le_bytes());
    // One write for header and body, so a frame is never split between two writers'
    // frames and a reader never waits on half a header.
    writer.write_all(&frame)?;
    Ok(())
}

/// Reads one frame, or `None` at a clean end of stream between frames.
pub fn read_frame<T: DeserializeOwned>(reader: &mut impl Read) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; 4];
    let mut n_read = 0;
    while n_read < header.len() {
        match reader.read(&mut header[n_read..]) {
            Ok(0) if n_read == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => n_read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n_bytes = u32::from_le_bytes(header);
    if n_bytes > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge {
            n_bytes: u64::from(n_bytes),
        });
    }
    let mut body = vec![0u8; n_bytes as usize];
    reader.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(FrameError::Malformed)
}

/// Longest socket path the OS accepts, in bytes, without the terminating NUL.
fn socket_path_bytes_max() -> usize {
    // SAFETY: sockaddr_un is plain old data, for which all-zero bytes are a valid value;
    // it is only measured.
    let address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_path.len() - 1
}

fn check_path_length(path: &Path) -> Result<(), ControlError> {
    let n_bytes = path.as_os_str().len();
    let n_bytes_max = socket_path_bytes_max();
    if n_bytes > n_bytes_max {
        return Err(ControlError::PathTooLong {
            path: path.to_owned(),
            n_bytes,
            n_bytes_max,
        });
    }
    Ok(())
}

fn connect(data_dir: &Path) -> Result<UnixStream, ControlError> {
    let path = socket_path(data_dir);
    check_path_length(&path)?;
    UnixStream::connect(&path).map_err(|e| connect_error(data_dir, &path, e))
}

/// Why connecting failed, in the user's terms. A data dir (mode 0700) or socket (0600)
/// of another user gives EACCES: that is a node the user may not use, not a missing one.
fn connect_error(data_dir: &Path, path: &Path, e: io::Error) -> ControlError {
    match e.kind() {
        // A socket file without a listener is what a crashed node leaves.
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning(data_dir.to_owned())
        }
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
            path: data_dir.to_owned(),
            // The data dir itself can be stat'ed when only its contents are closed.
            owner: fs::metadata(data_dir)
                .map_or("another uid".into(), |m| format!("uid {}", m.uid())),
        },
        _ => io_error(path)(e),
    }
}

/// True when a node answers on the data dir's control socket.
pub fn node_running(data_dir: &Path) -> bool {
    connect(data_dir).is_ok()
}

/// Whether a node runs on the data dir: an error when one may run but this user may not
/// reach it (it belongs to another user), so the command does not say "no node".
pub fn probe(data_dir: &Path) -> Result<bool, ControlError> {
    match connect(data_dir) {
        Ok(_) => Ok(true),
        Err(ControlError::NotRunning(_)) => Ok(false),
        Err(e @ ControlError::PermissionDenied { .. }) => Err(e),
        // Anything else (a path too long) the command's own open reports better.
        Err(_) => Ok(false),
    }
}

/// Sends `request` to the node running in `data_dir` and hands each response frame to
/// `on_frame` until the node ends its answer, or `on_frame` breaks (which closes the
/// connection: the handler's next send fails). Waits as long as the node takes, so a
/// handler that works for long should send progress frames.
pub fn call<Req: Serialize, Resp: DeserializeOwned>(
    data_dir: &Path,
    request: &Req,
    on_frame: impl FnMut(Resp) -> ControlFlow<()>,
) -> Result<(), ControlError> {
    call_with_fd(data_dir, request, None, on_frame)
}

/// `call`, handing the node an open descriptor of this process along with the request
/// (the node gets its own copy; this one stays open).
pub fn call_with_fd<Req: Serialize, Resp: DeserializeOwned>(
    data_dir: &Path,
    request: &Req,
    fd: Option<BorrowedFd<'_>>,
    mut on_frame: impl FnMut(Resp) -> ControlFlow<()>,
) -> Result<(), ControlError> {
    let path = socket_path(data_dir);
    let frame_error = |source: FrameError| ControlError::Frame {
        path: path.clone(),
        source,
    };
    let mut stream = connect(data_dir)?;
    let _interruptible = Interruptible::on(&stream);
    let envelope = RequestEnvelope {
        version: CONTROL_VERSION,
        request,
        fd: fd.is_some(),
    };
    // If this fails, the node may have refused us and closed before we finished sending:
    // its reason, read below, matters more than our failed write.
    let mut send_error = write_frame(&mut stream, &envelope).err();
    if let (None, Some(fd)) = (&send_error, fd) {
        send_error = send_fd(&stream, fd).err().map(FrameError::Io);
    }
    loop {
        let reply = match read_frame::<Reply<Resp>>(&mut stream) {
            Ok(Some(reply)) => reply,
            Ok(None) | Err(_) if send_error.is_some() => {
                return Err(frame_error(send_error.take().expect("checked")))
            }
            Ok(None) => return Err(ControlError::Cut),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(ControlError::Cut)
            }
            Err(e) => return Err(frame_error(e)),
        };
        match reply {
            Reply::Frame(response) => {
                if on_frame(response).is_break() {
                    return Ok(());
                }
            }
            Reply::End => return Ok(()),
            Reply::Error(why) => return Err(ControlError::Refused(why)),
        }
    }
}

/// The control connection a call of this process is waiting on, or -1: what Ctrl-C
/// hangs up once `hang_up_on_interrupt` is set.
static CALLING: AtomicI32 = AtomicI32::new(-1);

/// Marks a connection as the one Ctrl-C hangs up, until dropped.
struct Interruptible;

impl Interruptible {
    fn on(stream: &UnixStream) -> Interruptible {
        CALLING.store(stream.as_raw_fd(), Ordering::SeqCst);
        Interruptible
    }
}

impl Drop for Interruptible {
    fn drop(&mut self) {
        CALLING.store(-1, Ordering::SeqCst);
    }
}

/// Makes Ctrl-C stop a command running in the node the way it stops one run here: the
/// first SIGINT closes this side's half of the control connection, the node sees the
/// hangup and cancels the operation, and the command goes on reading what the node says
/// as it stops (an export's summary, a backup's "cancelled") and exits with its code.
/// A second Ctrl-C kills the process as usual; one before the connection is open too.
pub fn hang_up_on_interrupt() {
    extern "C" fn on_interrupt(_signal: libc::c_int) {
        let fd = CALLING.load(Ordering::SeqCst);
        // SAFETY: shutdown(2), signal(2) and _exit(2) are async-signal-safe; `fd` is the
        // open connection `Interruptible` named (a stale one only fails with EBADF or
        // ENOTSOCK, or half-closes a socket whose call is over).
        unsafe {
            if fd < 0 {
                libc::_exit(130);
            }
            libc::shutdown(fd, libc::SHUT_WR);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
        }
    }
    // SAFETY: installs a handler that does only async-signal-safe work (above).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}

/// `call` for requests answered with exactly one frame, such as a status.
pub fn call_one<Req: Serialize, Resp: DeserializeOwned>(
    data_dir: &Path,
    request: &Req,
) -> Result<Resp, ControlError> {
    let mut answer = None;
    let mut n_frames = 0;
    call(data_dir, request, |response| {
        n_frames += 1;
        answer = Some(response);
        ControlFlow::Continue(())
    })?;
    match answer {
        Some(answer) if n_frames == 1 => Ok(answer),
        _ => Err(ControlError::NotOneFrame { n_frames }),
    }
}

/// A bound control socket, ready to serve. Dropping it (or `serve` returning) removes
/// the socket file and releases the lock.
pub struct ControlServer {
    listener: UnixListener,
    socket_path: PathBuf,
    /// (device, inode) of the socket we bound, so drop never removes another's socket.
    socket_file_id: (u64, u64),
    owner_uid: u32,
    stopping: Arc<AtomicBool>,
    _lock: File,
}

/// Stops a running `serve` from another thread.
#[derive(Clone, Debug)]
pub struct ControlStopper {
    socket_path: PathBuf,
    stopping: Arc<AtomicBool>,
}

impl ControlStopper {
    /// `serve` returns once it has seen this; connections being served finish on their
    /// own threads.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop; if it has already gone, there is nothing to wake.
        let _ = UnixStream::connect(&self.socket_path);
    }
}

impl ControlServer {
    /// Binds `DATA_DIR/node.sock`, replacing a stale socket left by a crashed node and
    /// refusing if another node runs in the data dir.
    pub fn bind(data_dir: &Path) -> Result<ControlServer, ControlError> {
        let meta = fs::metadata(data_dir).map_err(io_error(data_dir))?;
        let mode = meta.permissions().mode() & 0o777;
        if !meta.is_dir() {
            return Err(io_error(data_dir)(io::Error::from(
                io::ErrorKind::NotADirectory,
            )));
        }
        if mode & 0o077 != 0 {
            return Err(ControlError::DirExposed {
                path: data_dir.to_owned(),
                mode,
            });
        }
        let socket_path = socket_path(data_dir);
        let temp_path = data_dir.join(SOCKET_TEMP_FILE);
        check_path_length(&temp_path)?;
        let lock = lock(data_dir)?;
        remove_stale_socket(data_dir, &socket_path)?;
        remove_if_present(&temp_path)?;
        let listener = UnixListener::bind(&temp_path).map_err(io_error(&temp_path))?;
        fs::set_permissions(&temp_path, fs::Permissions::from_mode(0o600))
            .map_err(io_error(&temp_path))?;
        fs::rename(&temp_path, &socket_path).map_err(io_error(&socket_path))?;
        let meta = fs::symlink_metadata(&socket_path).map_err(io_error(&socket_path))?;
        Ok(ControlServer {
            listener,
            socket_path,
            socket_file_id: (meta.dev(), meta.ino()),
            // SAFETY: geteuid has no preconditions and cannot fail.
            owner_uid: unsafe { libc::geteuid() },
            stopping: Arc::new(AtomicBool::new(false)),
            _lock: lock,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn stopper(&self) -> ControlStopper {
        ControlStopper {
            socket_path: self.socket_path.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// Serves until stopped: each connection on its own thread (at most
    /// `CONNECTIONS_MAX`), one request each. `handler` gets the request, a `Call` (the
    /// descriptor the request carried, if any, and a flag set as soon as the command
    /// hangs up) and a `send` for response frames; `send` fails once the command has
    /// gone. A handler should give up when either says so. A handler that panics is
    /// reported to the command as a failure.
    pub fn serve<Req, Resp, H>(self, handler: H) -> Result<(), ControlError>
    where
        Req: DeserializeOwned + 'static,
        Resp: Serialize + 'static,
        H: Fn(Req, Call, &mut dyn FnMut(Resp) -> io::Result<()>) + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let n_active = Arc::new(AtomicUsize::new(0));
        loop {
            let accepted = self.listener.accept();
            if self.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) if accept_error_is_transient(&e) => {
                    // Out of descriptors or memory: wait for connections to finish.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(io_error(&self.socket_path)(e)),
            };
            if n_active.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
                n_active.fetch_sub(1, Ordering::SeqCst);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let busy = format!(
                    "the node is busy with {CONNECTIONS_MAX} control connections; try again"
                );
                let _ = write_frame(&mut stream, &Reply::<()>::Error(busy));
                continue;
            }
            let active = ActiveConnection(n_active.clone());
            let handler = handler.clone();
            let owner_uid = self.owner_uid;
            let spawned = std::thread::Builder::new()
                .name("cairn-control".into())
                .spawn(move || {
                    let _active = active;
                    serve_connection::<Req, Resp, H>(stream, owner_uid, &*handler);
                });
            // A thread that could not start drops its stream: the command sees a cut
            // connection and can retry.
            drop(spawned);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.socket_path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.socket_file_id);
        if ours {
            let _ = fs::remove_file(&self.socket_path);
        }
    }
}

/// Counts a connection being served for as long as it lives.
struct ActiveConnection(Arc<AtomicUsize>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_error_is_transient(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::EINTR
                | libc::ECONNABORTED
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
        )
    )
}

fn lock(data_dir: &Path) -> Result<File, ControlError> {
    let path = data_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error(&path))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(io_error(&path))?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(io_error(&path))?;
            Ok(file)
        }
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            Err(ControlError::AlreadyRunning {
                path: data_dir.to_owned(),
                holder,
            })
        }
        Err(fs::TryLockError::Error(e)) => Err(io_error(&path)(e)),
    }
}

/// Called with the lock held: a socket nobody answers on is left by a crashed node.
fn remove_stale_socket(data_dir: &Path, socket_path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(socket_path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(socket_path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket(socket_path.to_owned()));
    }
    match UnixStream::connect(socket_path) {
        // Something answers without holding the lock: not ours to replace.
        Ok(_) => Err(ControlError::AlreadyRunning {
            path: data_dir.to_owned(),
            holder: String::new(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => remove_if_present(socket_path),
        Err(e) => Err(io_error(socket_path)(e)),
    }
}

fn remove_if_present(path: &Path) -> Result<(), ControlError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

/// Tells the command why it gets no answer; the node has nobody else to tell.
fn refuse(stream: &mut UnixStream, why: String) {
    let _ = write_frame(stream, &Reply::<()>::Error(why));
}

fn serve_connection<Req, Resp, H>(mut stream: UnixStream, owner_uid: u32, handler: &H)
where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Req, Call, &mut dyn FnMut(Resp) -> io::Result<()>),
{
    let _ = stream.set_read_timeout(Some(Duration::from_millis(REQUEST_TIMEOUT_MS)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
    match peer_uid(&stream) {
        Ok(uid) if uid == owner_uid => {}
        Ok(uid) => {
            let why = format!("uid {uid} may not use this node's control socket: only its owner (uid {owner_uid}) may");
            return refuse(&mut stream, why);
        }
        Err(e) => return refuse(&mut stream, format!("cannot check who is connecting: {e}")),
    }
    let envelope = match read_frame::<RequestEnvelope<serde_json::Value>>(&mut stream) {
        Ok(Some(envelope)) => envelope,
        // Connected and left without a word: `node_running` asking.
        Ok(None) => return,
        Err(e) => return refuse(&mut stream, format!("cannot read the request: {e}")),
    };
    if envelope.version != CONTROL_VERSION {
        let why = format!(
            "the command speaks control version {}, this node {CONTROL_VERSION}: restart the node after upgrading cairn",
            envelope.version
        );
        return refuse(&mut stream, why);
    }
    let request: Req = match serde_json::from_value(envelope.request) {
        Ok(request) => request,
        Err(e) => {
            let why = format!("this node does not understand the request ({e}): is it the same cairn version as the command?");
            return refuse(&mut stream, why);
        }
    };
    let fd = match envelope.fd.then(|| recv_fd(&stream)).transpose() {
        Ok(fd) => fd,
        Err(e) => return refuse(&mut stream, format!("cannot receive the file it sent: {e}")),
    };
    let gone = Cancel::new();
    let answered = Cancel::new();
    let watcher = watch_hangup(&stream, gone.clone(), answered.clone());
    let outcome = {
        let mut send = |response: Resp| -> io::Result<()> {
            write_frame(&mut stream, &Reply::Frame(response)).map_err(|e| {
                gone.cancel();
                match e {
                    FrameError::Io(e) => e,
                    other => io::Error::new(io::ErrorKind::InvalidData, other),
                }
            })
        };
        let call = Call {
            fd,
            gone: gone.clone(),
        };
        panic::catch_unwind(AssertUnwindSafe(|| handler(request, call, &mut send)))
    };
    answered.cancel();
    if let Some(watcher) = watcher {
        let _ = watcher.join();
    }
    let last = match outcome {
        Ok(()) => Reply::<()>::End,
        Err(_) => Reply::Error("the node failed while answering; see its log".into()),
    };
    let _ = write_frame(&mut stream, &last);
}

/// What a handler gets with its request besides the request itself.
pub struct Call {
    /// The descriptor the command sent along, if any.
    pub fd: Option<OwnedFd>,
    /// Set as soon as the command hangs up (Ctrl-C, SIGKILL, a closed terminal): a
    /// long job stops then, since nobody is left to take its answer.
    pub gone: Cancel,
}

/// Watches the connection for the command hanging up while its handler runs, and sets
/// `gone` when it does. After its request a command sends nothing more on the connection,
/// so anything readable is the end of the stream. Ends once `answered` is set.
fn watch_hangup(
    stream: &UnixStream,
    gone: Cancel,
    answered: Cancel,
) -> Option<std::thread::JoinHandle<()>> {
    let stream = stream.try_clone().ok()?;
    std::thread::Builder::new()
        .name("cairn-control-watch".into())
        .spawn(move || {
            while !answered.is_cancelled() && !gone.is_cancelled() {
                let mut poll_fd = libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd we own, for a descriptor this thread holds open.
                let n_ready = unsafe { libc::poll(&mut poll_fd, 1, HANGUP_POLL_MS) };
                if n_ready <= 0 {
                    continue;
                }
                let mut byte = [0u8; 1];
                // SAFETY: peeks at most one byte into a buffer we own; never blocks.
                let n_read = unsafe {
                    libc::recv(
                        stream.as_raw_fd(),
                        byte.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n_read == 0 || poll_fd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    gone.cancel();
                } else if n_read > 0 {
                    // A command that talks out of turn: not a hangup, but do not spin.
                    std::thread::sleep(Duration::from_millis(HANGUP_POLL_MS as u64));
                }
            }
        })
        .ok()
}

/// Room for the control message that carries one descriptor.
const FD_CMSG_BYTES: usize = 64;

/// Sends one byte with `fd` attached (`SCM_RIGHTS`).
fn send_fd(stream: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; FD_CMSG_BYTES / 8];
    // SAFETY: msghdr is plain data; every pointer set below points into locals that
    // outlive the call, and the control buffer (8-byte aligned) is larger than
    // CMSG_SPACE of one int, which the assertion checks.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        assert!(
            space <= FD_CMSG_BYTES,
            "one descriptor fits the control buffer"
        );
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space as _;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        libc::CMSG_DATA(header)
            .cast::<libc::c_int>()
            .write_unaligned(fd.as_raw_fd());
        loop {
            if libc::sendmsg(stream.as_raw_fd(), &message, 0) == 1 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

/// Receives the byte `send_fd` sent and the descriptor attached to it.
fn recv_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; FD_CMSG_BYTES / 8];
    // SAFETY: as in `send_fd`; the kernel writes at most msg_controllen bytes of control
    // data, and a descriptor is read only from a header it says is SCM_RIGHTS with room
    // for one.
    unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = FD_CMSG_BYTES as _;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let flags = libc::MSG_CMSG_CLOEXEC;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let flags = 0;
        let n = loop {
            let n = libc::recvmsg(stream.as_raw_fd(), &mut message, flags);
            if n >= 0 {
                break n;
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        };
        // Every descriptor that came is taken into ownership, so extra ones are closed.
        let mut fds = Vec::new();
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header).cast::<libc::c_int>();
                let n_bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..n_bytes / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
        match (n, fds.len()) {
            (1, 1) => Ok(fds.pop().expect("one")),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "expected one file descriptor with the request, got {}",
                    fds.len()
                ),
            )),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut n_bytes = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `stream`; the buffer and its length are
    // valid for the call and describe a ucred, which is what SO_PEERCRED writes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut n_bytes,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials.uid)
}

#[cfg(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
))]
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let (mut uid, mut gid) = (0, 0);
    // SAFETY: the fd is a live socket owned by `stream`; both out-pointers are valid.
    if unsafe { libc::getpeereid(stream.as_raw_fd(), &mut uid, &mut gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(uid)
}

#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
)))]
fn peer_uid(_stream: &UnixStream) -> io::Result<u32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "this system cannot tell who is on the other end of a Unix socket",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::Mutex;
    use std::thread::JoinHandle;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Request {
        Count {
            to: u32,
        },
        Echo(String),
        /// Reads the descriptor that came with the request to its end.
        ReadFd,
        Big,
        Panic,
        Wait,
        /// Waits (at most 10 s) for the command to hang up, and tells `entered` if it did.
        UntilGone,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    enum Response {
        Progress(u32),
        Done(String),
    }

    struct Running {
        stopper: ControlStopper,
        thread: Option<JoinHandle<Result<(), ControlError>>>,
    }

    impl Running {
        fn stop(mut self) -> Result<(), ControlError> {
            self.stopper.stop();
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(thread) = self.thread.take() {
                self.stopper.stop();
                let _ = thread.join();
            }
        }
    }

    /// `waiting` receives a message each time a Wait request starts, and Wait requests
    /// return once `release` is closed.
    struct Gate {
        entered: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }

    fn start(server: ControlServer, gate: Option<Gate>) -> Running {
        let stopper = server.stopper();
        let gate = Mutex::new(gate);
        let thread = std::thread::spawn(move || {
            server.serve(move |request: Request, call: Call, send| match request {
                Request::Count { to } => {
                    for n in 1..=to {
                        if send(Response::Progress(n)).is_err() {
                            return; // the command has gone
                        }
                    }
                    send(Response::Done(format!("counted to {to}"))).unwrap();
                }
                Request::Echo(text) => send(Response::Done(text)).unwrap(),
                Request::ReadFd => {
                    let mut text = String::new();
                    let read = call.fd.map(|fd| File::from(fd).read_to_string(&mut text));
                    send(Response::Done(format!("{read:?}: {text}"))).unwrap();
                }
                Request::Big => {
                    let error =
                        send(Response::Done("x".repeat(FRAME_BYTES_MAX as usize))).unwrap_err();
                    send(Response::Done(error.to_string())).unwrap();
                }
                Request::Panic => panic!("handler bug"),
                Request::Wait => {
                    let (entered, release) = {
                        let gate = gate.lock().unwrap();
                        let gate = gate.as_ref().unwrap();
                        (gate.entered.clone(), gate.release.clone())
                    };
                    entered.send(()).unwrap();
                    let _ = release.recv();
                    send(Response::Done("released".into())).unwrap();
                }
                Request::UntilGone => {
                    let entered = gate.lock().unwrap().as_ref().unwrap().entered.clone();
                    send(Response::Progress(0)).unwrap();
                    let started = std::time::Instant::now();
                    while !call.gone.is_cancelled() && started.elapsed() < Duration::from_secs(10) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if call.gone.is_cancelled() {
                        entered.send(()).unwrap();
                    }
                }
            })
        });
        Running {
            stopper,
            thread: Some(thread),
        }
    }

    /// Like a data dir: mode 0700.
    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn collect(dir: &Path, request: &Request) -> Result<Vec<Response>, ControlError> {
        let mut frames = Vec::new();
        call(dir, request, |response| {
            frames.push(response);
            ControlFlow::Continue(())
        })?;
        Ok(frames)
    }

    #[test]
    fn a_request_carries_a_descriptor_the_handler_reads() {
        let dir = private_dir();
        let running = start(ControlServer::bind(dir.path()).unwrap(), None);
        let file_path = dir.path().join("input");
        fs::write(&file_path, "bytes only the command could open").unwrap();
        let file = File::open(&file_path).unwrap();
        let mut frames = Vec::new();
        call_with_fd(
            dir.path(),
            &Request::ReadFd,
            Some(file.as_fd()),
            |r: Response| {
                frames.push(r);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert_eq!(
            frames,
            vec![Response::Done(
                "Some(Ok(33)): bytes only the command could open".into()
            )]
        );
        // Without one, the handler gets none.
        assert_eq!(
            collect(dir.path(), &Request::ReadFd).unwrap(),
            vec![Response::Done("None: ".into())]
        );
        running.stop().unwrap();
    }

    #[test]
    fn several_frames_round_trip_and_stopping_removes_the_socket() {
        let dir = private_dir();
        assert!(!node_running(dir.path()));
        let running = start(ControlServer::bind(dir.path()).unwrap(), None);
        assert!(node_running(dir.path()));
        let frames = collect(dir.path(), &Request::Count { to: 3 }).unwrap();
        assert_eq!(
            frames,
            [
                Response::Progress(1),
                Response::Progress(2),
                Response::Progress(3),
                Response::Done("counted to 3".into())
            ]
        );
        let echoed: Response = call_one(dir.path(), &Request::Echo("héllo\n\"x\"".into())).unwrap();
        assert_eq!(echoed, Response::Done("héllo\n\"x\"".into()));
        let error = call_one::<_, Response>(dir.path(), &Request::Count { to: 1 }).unwrap_err();
        assert!(
            matches!(error, ControlError::NotOneFrame { n_frames: 2 }),
            "{error}"
        );

        // Breaking early closes the connection and leaves the node serving others.
        let mut n_seen = 0;
        call(dir.path(), &Request::Count { to: 1000 }, |_: Response| {
            n_seen += 1;
            ControlFlow::Break(())
        })
        .unwrap();
        assert_eq!(n_seen, 1);
        assert_eq!(
            collect(dir.path(), &Request::Count { to: 0 })
                .unwrap()
                .len(),
            1
        );

        running.stop().unwrap();
        assert!(!dir.path().join(SOCKET_FILE).exists());
        assert!(!node_running(dir.path()));
        let error = collect(dir.path(), &Request::Count { to: 1 }).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "no node is running in {} (start one with `cairn node run`)",
                dir.path().display()
            )
        );
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        // Reading: refused from the header, before the body is allocated or read.
        let mut header = (FRAME_BYTES_MAX + 1).to_le_bytes().to_vec();
        header.extend_from_slice(b"{}");
        let error = read_frame::<serde_json::Value>(&mut &header[..]).unwrap_err();
        assert!(
            matches!(error, FrameError::TooLarge { n_bytes } if n_bytes == u64::from(FRAME_BYTES_MAX) + 1)
        );
        assert!(error.to_string().contains("over the 16777216-byte limit"));
        // Writing: refused, nothing written.
        let mut out = Vec::new();
        let error = write_frame(&mut out, &"x".repeat(FRAME_BYTES_MAX as usize)).unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { .. }), "{error}");
        assert!(out.is_empty());
        // Exactly at the limit is fine.
        let at_limit = "x".repeat(FRAME_BYTES_MAX as usize - 2);
        write_frame(&mut out, &at_limit).unwrap();
        assert_eq!(out.len(), 4 + FRAME_BYTES_MAX as usize);
        assert_eq!(read_frame::<String>(&mut &out[..]).unwrap(), Some(at_limit));

        let dir = private_dir();
        let _running = start(ControlServer::bind(dir.path()).unwrap(), None);
        // A command claiming a huge request is told why and cut off.
        let mut stream = UnixStream::connect(dir.path().join(SOCKET_FILE)).unwrap();
        stream.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let reply = read_frame::<Reply<Response>>(&mut stream).unwrap();
        assert!(
            matches!(&reply, Some(Reply::Error(why)) if why.contains("4294967295 bytes is over")),
        );
        // A handler's oversized response fails its send, and the connection stays usable.
        let frames = collect(dir.path(), &Request::Big).unwrap();
        assert_eq!(frames.len(), 1);
        assert!(matches!(&frames[0], Response::Done(why) if why.contains("over the")));
    }

    #[test]
    fn a_stale_socket_from_a_crashed_node_is_replaced() {
        let dir = private_dir();
        let path = dir.path().join(SOCKET_FILE);
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a closed listener leaves its file behind");
        assert!(!node_running(dir.path()));
        assert!(matches!(
            collect(dir.path(), &Request::Count { to: 0 }),
            Err(ControlError::NotRunning(_))
        ));
        // So does a crash between binding and renaming into place.
        drop(UnixListener::bind(dir.path().join(SOCKET_TEMP_FILE)).unwrap());
        let _running = start(ControlServer::bind(dir.path()).unwrap(), None);
        assert_eq!(
            collect(dir.path(), &Request::Count { to: 0 })
                .unwrap()
                .len(),
            1
        );
        assert!(!dir.path().join(SOCKET_TEMP_FILE).exists());
    }

    #[test]
    fn something_else_at_the_socket_path_is_left_alone() {
        let dir = private_dir();
        let path = dir.path().join(SOCKET_FILE);
        fs::write(&path, "notes").unwrap();
        let error = ControlServer::bind(dir.path()).err().unwrap();
        assert!(matches!(error, ControlError::NotASocket(_)), "{error}");
        assert!(error.to_string().contains("is not a socket"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "notes");
    }

    #[test]
    fn a_second_server_is_refused_while_the_first_runs() {
        let dir = private_dir();
        let first = ControlServer::bind(dir.path()).unwrap();
        let error = ControlServer::bind(dir.path()).err().unwrap();
        let message = error.to_string();
        assert!(
            matches!(error, ControlError::AlreadyRunning { .. }),
            "{message}"
        );
        assert!(
            message.contains(&format!("(pid {})", std::process::id())),
            "{message}"
        );
        // The refused server did not touch the first one's socket.
        let running = start(first, None);
        assert!(node_running(dir.path()));
        assert!(ControlServer::bind(dir.path()).is_err());
        running.stop().unwrap();
        // Once the first is gone, a new one starts.
        let _again = ControlServer::bind(dir.path()).unwrap();
    }

    #[test]
    fn a_live_listener_without_the_lock_is_not_replaced() {
        let dir = private_dir();
        let path = dir.path().join(SOCKET_FILE);
        let _other = UnixListener::bind(&path).unwrap();
        let error = ControlServer::bind(dir.path()).err().unwrap();
        assert!(
            matches!(error, ControlError::AlreadyRunning { .. }),
            "{error}"
        );
        assert!(path.exists());
    }

    #[test]
    fn only_the_owner_can_open_the_socket() {
        let dir = private_dir();
        let server = ControlServer::bind(dir.path()).unwrap();
        let mode = fs::symlink_metadata(server.socket_path()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(fs::symlink_metadata(server.socket_path())
            .unwrap()
            .file_type()
            .is_socket());
        let lock_mode = fs::metadata(dir.path().join(LOCK_FILE)).unwrap().mode();
        assert_eq!(lock_mode & 0o777, 0o600);

        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), unsafe { libc::geteuid() });
    }

    #[test]
    fn other_users_are_refused() {
        let dir = private_dir();
        let mut server = ControlServer::bind(dir.path()).unwrap();
        // Pretend the node runs as someone else: then this test's process is the stranger.
        server.owner_uid = server.owner_uid.wrapping_add(1);
        let _running = start(server, None);
        let error = collect(dir.path(), &Request::Count { to: 1 }).unwrap_err();
        assert!(matches!(error, ControlError::Refused(_)), "{error}");
        assert!(
            error
                .to_string()
                .contains("may not use this node's control socket: only its owner"),
            "{error}"
        );
    }

    #[test]
    fn a_data_dir_open_to_others_is_refused() {
        let dir = private_dir();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let error = ControlServer::bind(dir.path()).err().unwrap();
        assert!(
            error.to_string().ends_with(&format!(
                "(mode 755): run `chmod 700 {}`",
                dir.path().display()
            )),
            "{error}"
        );
        let error = ControlServer::bind(&dir.path().join("absent"))
            .err()
            .unwrap();
        assert!(matches!(error, ControlError::Io { .. }), "{error}");
    }

    #[test]
    fn too_long_a_path_is_named() {
        let dir = private_dir();
        let deep = dir.path().join("d".repeat(120));
        fs::create_dir(&deep).unwrap();
        fs::set_permissions(&deep, fs::Permissions::from_mode(0o700)).unwrap();
        let error = ControlServer::bind(&deep).err().unwrap();
        assert!(matches!(error, ControlError::PathTooLong { .. }), "{error}");
        assert!(error.to_string().contains("use a shorter --data-dir"));
        assert!(matches!(
            call_one::<_, Response>(&deep, &Request::Big),
            Err(ControlError::PathTooLong { .. })
        ));
    }

    #[test]
    fn connections_beyond_the_limit_are_told_the_node_is_busy() {
        let dir = private_dir();
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (release, release_rx) = crossbeam_channel::bounded::<()>(0);
        let gate = Gate {
            entered: entered_tx,
            release: release_rx,
        };
        let _running = start(ControlServer::bind(dir.path()).unwrap(), Some(gate));
        let waiting: Vec<_> = (0..CONNECTIONS_MAX)
            .map(|_| {
                let dir = dir.path().to_owned();
                std::thread::spawn(move || collect(&dir, &Request::Wait))
            })
            .collect();
        for _ in 0..CONNECTIONS_MAX {
            entered.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        let error = collect(dir.path(), &Request::Count { to: 1 }).unwrap_err();
        assert!(error.to_string().contains("busy"), "{error}");
        drop(release);
        for thread in waiting {
            let frames = thread.join().unwrap().unwrap();
            assert_eq!(frames, [Response::Done("released".into())]);
        }
        // Slots free up as connections finish.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while collect(dir.path(), &Request::Count { to: 0 }).is_err() {
            assert!(std::time::Instant::now() < deadline, "slots never freed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn bad_requests_and_failing_handlers_are_reported_to_the_command() {
        let dir = private_dir();
        let _running = start(ControlServer::bind(dir.path()).unwrap(), None);
        let raw = |envelope: serde_json::Value| -> String {
            let mut stream = UnixStream::connect(dir.path().join(SOCKET_FILE)).unwrap();
            write_frame(&mut stream, &envelope).unwrap();
            match read_frame::<Reply<Response>>(&mut stream).unwrap() {
                Some(Reply::Error(why)) => why,
                _ => panic!("expected an error reply"),
            }
        };
        let why = raw(serde_json::json!({"version": 3, "request": {"Echo": "x"}}));
        assert!(why.contains("control version 3, this node 2"), "{why}");
        let why = raw(serde_json::json!({"version": CONTROL_VERSION, "request": {"Reboot": null}}));
        assert!(why.contains("does not understand the request"), "{why}");
        let why = raw(serde_json::json!(["not", "an", "envelope"]));
        assert!(why.contains("cannot read the request"), "{why}");

        let error = collect(dir.path(), &Request::Panic).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the node refused the request: the node failed while answering; see its log"
        );
        // The node lives on.
        assert_eq!(
            collect(dir.path(), &Request::Count { to: 0 })
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_command_that_hangs_up_mid_answer_is_noticed() {
        let dir = private_dir();
        let (entered, entered_rx) = crossbeam_channel::unbounded();
        let (_release_tx, release) = crossbeam_channel::bounded(0);
        let _running = start(
            ControlServer::bind(dir.path()).unwrap(),
            Some(Gate { entered, release }),
        );
        // The command takes the first frame, then goes away without reading further
        // (as a command killed mid-backup does); it sends nothing more either way.
        let mut frames = Vec::new();
        call(dir.path(), &Request::UntilGone, |response: Response| {
            frames.push(response);
            ControlFlow::Break(())
        })
        .unwrap();
        assert_eq!(frames, [Response::Progress(0)]);
        assert!(
            entered_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the handler never learned that its command hung up"
        );
    }

    #[test]
    fn an_answer_cut_off_midway_is_not_taken_for_a_whole_one() {
        let dir = private_dir();
        let listener = UnixListener::bind(dir.path().join(SOCKET_FILE)).unwrap();
        let fake_node = std::thread::spawn(move || {
            for cut_inside_a_frame in [false, true] {
                let (mut stream, _) = listener.accept().unwrap();
                let _: Option<serde_json::Value> = read_frame(&mut stream).unwrap();
                write_frame(&mut stream, &Reply::Frame(Response::Progress(1))).unwrap();
                if cut_inside_a_frame {
                    stream.write_all(&100u32.to_le_bytes()).unwrap();
                    stream.write_all(b"{\"fr").unwrap();
                }
            }
        });
        for _ in 0..2 {
            let mut frames = Vec::new();
            let error = call(dir.path(), &Request::Count { to: 5 }, |r: Response| {
                frames.push(r);
                ControlFlow::Continue(())
            })
            .unwrap_err();
            assert!(matches!(error, ControlError::Cut), "{error}");
            assert!(error.to_string().contains("before finishing its answer"));
            assert_eq!(frames, [Response::Progress(1)]);
        }
        fake_node.join().unwrap();
    }

    #[test]
    fn another_users_node_is_permission_denied_not_missing() {
        let dir = private_dir();
        let path = socket_path(dir.path());
        let error = connect_error(
            dir.path(),
            &path,
            io::Error::from_raw_os_error(libc::EACCES),
        );
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(
            error.to_string(),
            format!(
                "permission denied: the node on {} runs as another user (uid {uid}): run this command as that user",
                dir.path().display()
            )
        );
        let missing = connect_error(
            dir.path(),
            &path,
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(matches!(missing, ControlError::NotRunning(_)));
    }
}
