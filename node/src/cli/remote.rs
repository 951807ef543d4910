//! Who a command runs for, and how it reaches a running node. The node holds the store
//! open (sled allows one process), so a command on a data dir whose node runs is sent to
//! the node as a typed request: the operation, already parsed and with its paths made
//! absolute in the command's own working directory, and what the command's process knows
//! (uid, umask, whether its stdin and stderr are terminals, their width, its stdin itself
//! for `backup IMAGE -`). The node runs the same function per operation a command without
//! a node runs (`cli::execute`), for a `Caller` whose output comes back over the control
//! socket: stdout and stderr lines, the progress bar's drawing, and questions that need a
//! yes. The client replays it all on its own terminal, so a command looks the same
//! whether a node runs or not. When the command goes away (SIGKILL, a closed terminal), the
//! control connection drops and the caller's `cancel` is set: its backup or restore stops.
//! Ctrl-C half-closes it instead (`control::hang_up_on_interrupt`), so the node cancels
//! the same way and the command still prints how it stopped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use super::Operation;
use crate::cancel::Cancel;
use crate::control;
use crate::mesh::MeshHandle;
use crate::status::NodeStatus;
use crate::vault::Vault;

/// How long a command inside the node waits for its user's yes or no.
const ANSWER_WAIT: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Run one operation inside the node, for the command that sent it.
    Run {
        operation: Operation,
        caller: CallerInfo,
    },
    /// The user's answer to a `Confirm`.
    Answer {
        ticket: u64,
        yes: bool,
    },
    Status,
}

/// What the command's process knows that the node cannot see for itself.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CallerInfo {
    pub uid: u32,
    /// For files the node creates for the command (a restore's output).
    pub umask: u32,
    pub stdin_terminal: bool,
    pub stderr_terminal: bool,
    pub width: u16,
}

impl CallerInfo {
    /// This process's.
    pub fn here() -> CallerInfo {
        CallerInfo {
            // SAFETY: getuid has no preconditions and cannot fail.
            uid: unsafe { libc::getuid() },
            umask: current_umask(),
            stdin_terminal: std::io::stdin().is_terminal(),
            stderr_terminal: std::io::stderr().is_terminal(),
            width: terminal_width(),
        }
    }
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

/// The running node an operation runs inside, when it does.
pub struct InNode {
    pub vault: Arc<Vault>,
    pub mesh: MeshHandle,
}

/// Who an operation runs for: this process, or a command connected to the node.
pub struct Caller {
    pub info: CallerInfo,
    /// Set when the command is gone or interrupted: long jobs stop.
    pub cancel: Cancel,
    sink: Sink,
    /// The command's stdin, when it sent it (`cairn backup IMAGE -`); taken once.
    stdin: Mutex<Option<File>>,
}

enum Sink {
    /// This process's stdout and stderr.
    Here,
    /// A command connected to the node.
    Remote {
        out: Sender<Response>,
        answers: Arc<Answers>,
    },
}

impl Caller {
    /// This process, running the operation itself.
    pub fn here() -> Caller {
        Caller {
            info: CallerInfo::here(),
            cancel: Cancel::new(),
            sink: Sink::Here,
            stdin: Mutex::new(None),
        }
    }

    /// A command connected to the node; its output goes to `out`.
    pub fn remote(
        info: CallerInfo,
        out: Sender<Response>,
        answers: Arc<Answers>,
        stdin: Option<File>,
        cancel: Cancel,
    ) -> Caller {
        Caller {
            info,
            cancel,
            sink: Sink::Remote { out, answers },
            stdin: Mutex::new(stdin),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self.sink, Sink::Remote { .. })
    }

    /// A line on the caller's stdout.
    pub fn out(&self, text: String) {
        match &self.sink {
            Sink::Remote { out, .. } => {
                let _ = out.send(Response::Out(text + "\n"));
            }
            Sink::Here => print_or_exit(&mut std::io::stdout().lock(), &format!("{text}\n")),
        }
    }

    /// A line on the caller's stderr.
    pub fn err(&self, text: String) {
        match &self.sink {
            Sink::Remote { out, .. } => {
                let _ = out.send(Response::Err(text + "\n"));
            }
            Sink::Here => eprintln!("{text}"),
        }
    }

    /// The stdin the command sent, if any and not taken yet.
    pub fn take_stdin(&self) -> Option<File> {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Mode bits for a file the node creates for the command: what the command's umask
    /// allows. None here: this process's own umask applies by itself.
    pub fn file_mode(&self) -> Option<u32> {
        self.is_remote().then(|| file_mode(Some(self.info.umask)))
    }

    /// Asks the user; false when nobody answers. On this process's own terminal when
    /// the operation runs here.
    pub fn ask(&self, question: &str) -> std::io::Result<bool> {
        let Sink::Remote { out, answers } = &self.sink else {
            eprint!("{question} [y/N] ");
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            return Ok(is_yes(&answer));
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let ticket = {
            let mut waiting = answers.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.0 += 1;
            let ticket = waiting.0;
            waiting.1.insert(ticket, tx);
            ticket
        };
        let sent = out.send(Response::Confirm {
            ticket,
            question: question.to_owned(),
        });
        let yes = sent.is_ok() && rx.recv_timeout(ANSWER_WAIT).unwrap_or(false);
        answers
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(&ticket);
        Ok(yes)
    }

    /// Tells a command connected to the node its exit code: its last frame.
    pub fn send_exit(&self, code: u8) {
        if let Sink::Remote { out, .. } = &self.sink {
            let _ = out.send(Response::Exit(code));
        }
    }

    /// Where a progress bar draws for a command connected to the node.
    pub fn remote_term(&self) -> Option<RemoteTerm> {
        match &self.sink {
            Sink::Remote { out, .. } => Some(RemoteTerm {
                out: out.clone(),
                width: self.info.width,
            }),
            Sink::Here => None,
        }
    }
}

fn is_yes(answer: &str) -> bool {
    matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
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

/// Draws a progress bar on the terminal of the command's user.
#[derive(Debug)]
pub struct RemoteTerm {
    out: Sender<Response>,
    width: u16,
}

impl RemoteTerm {
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

/// The client: runs `operation` in the node of `data_dir` for this process and plays
/// back what it prints. A backup of `-` hands the node this process's stdin, which the
/// node then reads itself. Returns the operation's exit code.
pub fn forward(data_dir: &Path, operation: Operation) -> Result<u8> {
    let send_stdin = operation.reads_stdin();
    let request = Request::Run {
        operation,
        caller: CallerInfo::here(),
    };
    let mut code = 1;
    let mut stderr = std::io::stderr();
    let stdin = std::io::stdin();
    let fd = send_stdin.then(|| stdin.as_fd());
    control::hang_up_on_interrupt();
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
                let yes = std::io::stdin().read_line(&mut answer).is_ok() && is_yes(&answer);
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
