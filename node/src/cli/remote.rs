//! CLI commands on a data dir whose node is running. The node holds the store open (sled
//! allows one process), so the command runs inside the node, on a thread of its own,
//! and what it prints comes back over the control socket: stdout and stderr lines, the
//! progress bar's drawing, and questions that need a yes. The client replays it all on
//! its own terminal, so a command looks the same whether a node runs or not.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::control;
use crate::mesh::MeshHandle;
use crate::status::NodeStatus;
use crate::vault::Vault;

/// How long a command inside the node waits for its user's yes or no.
const ANSWER_WAIT: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Run a `cairn` command line inside the node.
    Cli {
        args: Vec<String>,
        cwd: PathBuf,
        stdin_terminal: bool,
        stderr_terminal: bool,
        width: u16,
        /// The command's umask, for files the node creates for it (a restore's output).
        #[serde(default)]
        umask: Option<u32>,
    },
    /// The user's answer to a `Confirm`.
    Answer {
        ticket: u64,
        yes: bool,
    },
    Status,
}

#[derive(Serialize, Deserialize)]
pub enum Response {
    Out(String),
    Err(String),
    Term(TermOp),
    Confirm { ticket: u64, question: String },
    Exit(u8),
    Status(Box<NodeStatus>),
}

/// What a progress bar does to a terminal.
#[derive(Debug, Serialize, Deserialize)]
pub enum TermOp {
    Line(String),
    Str(String),
    ClearLine,
    Up(usize),
    Down(usize),
    Right(usize),
    Left(usize),
}

/// A command running inside the node: where its output goes.
#[derive(Clone)]
pub struct Context {
    pub vault: Arc<Vault>,
    pub mesh: MeshHandle,
    pub cwd: PathBuf,
    pub stdin_terminal: bool,
    pub stderr_terminal: bool,
    pub width: u16,
    /// The command's umask; None from a command too old to send it.
    pub umask: Option<u32>,
    pub out: Sender<Response>,
    pub answers: Arc<Answers>,
    /// The command's stdin, when it sent it (`cairn backup IMAGE -`); taken once.
    pub stdin: Arc<Mutex<Option<std::fs::File>>>,
}

impl Context {
    /// The stdin the command sent, if any and not taken yet.
    pub fn take_stdin(&self) -> Option<std::fs::File> {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's output going to `context`.
pub fn with_context<T>(context: Context, f: impl FnOnce() -> T) -> T {
    CONTEXT.with(|c| *c.borrow_mut() = Some(context));
    let result = f();
    CONTEXT.with(|c| *c.borrow_mut() = None);
    result
}

pub fn context() -> Option<Context> {
    CONTEXT.with(|c| c.borrow().clone())
}

pub fn out(text: String) {
    match context() {
        Some(c) => {
            let _ = c.out.send(Response::Out(text + "\n"));
        }
        None => print_or_exit(&mut std::io::stdout().lock(), &format!("{text}\n")),
    }
}

/// Writes to stdout; a reader that went away (`cairn snapshots | head -1`) ends the
/// command quietly with exit 0, as ripgrep does: the reader chose to stop, which is not
/// this command failing, and a panic's exit 101 would say it was.
pub fn print_or_exit(stdout: &mut impl Write, text: &str) {
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // Anything else (a full disk) is worth a line; there is nowhere else to say it.
        eprintln!("error: cannot write the output: {e}");
        std::process::exit(1);
    }
}

pub fn err(text: String) {
    match context() {
        Some(c) => {
            let _ = c.out.send(Response::Err(text + "\n"));
        }
        None => eprintln!("{text}"),
    }
}

/// Questions waiting for their user's answer, by ticket.
#[derive(Default)]
pub struct Answers {
    waiting: Mutex<(u64, HashMap<u64, Sender<bool>>)>,
}

impl Answers {
    pub fn deliver(&self, ticket: u64, yes: bool) {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = waiting.1.get(&ticket) {
            let _ = tx.send(yes);
        }
    }
}

/// Asks the user of the command running in the node; false when nobody answers.
pub fn ask(context: &Context, question: &str) -> bool {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let ticket = {
        let mut waiting = context
            .answers
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        waiting.0 += 1;
        let ticket = waiting.0;
        waiting.1.insert(ticket, tx);
        ticket
    };
    let sent = context.out.send(Response::Confirm {
        ticket,
        question: question.to_owned(),
    });
    let yes = sent.is_ok() && rx.recv_timeout(ANSWER_WAIT).unwrap_or(false);
    context
        .answers
        .waiting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .1
        .remove(&ticket);
    yes
}

/// Draws a progress bar on the terminal of the command's user.
#[derive(Debug)]
pub struct RemoteTerm {
    out: Sender<Response>,
    width: u16,
}

impl RemoteTerm {
    pub fn new(context: &Context) -> RemoteTerm {
        RemoteTerm {
            out: context.out.clone(),
            width: context.width,
        }
    }

    fn send(&self, op: TermOp) -> std::io::Result<()> {
        self.out
            .send(Response::Term(op))
            .map_err(|_| std::io::Error::other("the command's user is gone"))
    }
}

impl indicatif::TermLike for RemoteTerm {
    fn width(&self) -> u16 {
        self.width
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.send(TermOp::Up(n))
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.send(TermOp::Down(n))
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.send(TermOp::Right(n))
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.send(TermOp::Left(n))
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.send(TermOp::Line(s.to_owned()))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.send(TermOp::Str(s.to_owned()))
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.send(TermOp::ClearLine)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The client: runs this process's command line in the node of `data_dir` and plays
/// back what it prints. With `send_stdin` the node gets this process's stdin and reads
/// it itself (a backup from a pipe). Returns the command's exit code.
pub fn forward(data_dir: &Path, args: Vec<String>, send_stdin: bool) -> Result<u8> {
    let request = Request::Cli {
        args,
        cwd: std::env::current_dir()?,
        stdin_terminal: std::io::stdin().is_terminal(),
        stderr_terminal: std::io::stderr().is_terminal(),
        width: terminal_width(),
        umask: Some(current_umask()),
    };
    let mut code = 1;
    let mut stderr = std::io::stderr();
    let stdin = std::io::stdin();
    let fd = send_stdin.then(|| stdin.as_fd());
    control::call_with_fd(data_dir, &request, fd, |response: Response| {
        match response {
            Response::Out(text) => print_or_exit(&mut std::io::stdout().lock(), &text),
            Response::Err(text) => eprint!("{text}"),
            Response::Term(op) => {
                let _ = match op {
                    TermOp::Line(s) => writeln!(stderr, "{s}"),
                    TermOp::Str(s) => write!(stderr, "{s}"),
                    TermOp::ClearLine => write!(stderr, "\r\x1b[2K"),
                    TermOp::Up(n) => write!(stderr, "\x1b[{n}A"),
                    TermOp::Down(n) => write!(stderr, "\x1b[{n}B"),
                    TermOp::Right(n) => write!(stderr, "\x1b[{n}C"),
                    TermOp::Left(n) => write!(stderr, "\x1b[{n}D"),
                };
                let _ = stderr.flush();
            }
            Response::Confirm { ticket, question } => {
                eprint!("{question} [y/N] ");
                let mut answer = String::new();
                let yes = std::io::stdin().read_line(&mut answer).is_ok()
                    && matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes");
                let _ = control::call(data_dir, &Request::Answer { ticket, yes }, |_: Response| {
                    ControlFlow::Continue(())
                });
            }
            Response::Exit(c) => code = c,
            Response::Status(_) => {}
        }
        ControlFlow::Continue(())
    })?;
    Ok(code)
}

/// This process's umask. Read by setting it and back, which is safe here: the client is
/// single-threaded while it builds its request.
// mode_t is u32 on Linux but u16 on macOS: the conversion is needed there.
#[allow(clippy::useless_conversion)]
fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; the old value is put back at once.
    let mask = unsafe { libc::umask(0o077) };
    unsafe { libc::umask(mask) };
    u32::from(mask) & 0o777
}

/// Mode bits for a file the node creates for the command: what the command's umask
/// allows, or owner-only when it is unknown (an image may hold /etc/shadow and keys).
pub fn file_mode(umask: Option<u32>) -> u32 {
    match umask {
        Some(mask) => 0o666 & !mask,
        None => 0o600,
    }
}

fn terminal_width() -> u16 {
    // SAFETY: TIOCGWINSZ fills a winsize we own; a failure leaves the default.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        size.ws_col
    } else {
        80
    }
}
