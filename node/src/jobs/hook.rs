//! A job's hooks (`before`, `after`) and its `source_command`: commands run with `sh -c`,
//! bounded in time (hooks) and in the output kept (all of them), so a hook that hangs or
//! talks a lot never stalls the node or fills its index.

use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Output a hook's result keeps: the last this many bytes of its stdout, then of its
/// stderr.
pub const HOOK_OUTPUT_TAIL_BYTES_MAX: usize = 2048;
/// How often a running hook is looked at for its exit or its deadline.
const HOOK_POLL_MS: u64 = 20;
/// After a hook exits (or is killed), how long its output readers may take to finish: a
/// grandchild it left running may hold the pipes open.
pub const HOOK_DRAIN_MS: u64 = 1_000;

/// What one hook did, as the job's result keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    /// `before`, `after` or `source_command`.
    pub hook: String,
    /// `null`: killed (by the timeout or a signal) or never started.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// The end of its stdout and stderr, at most `HOOK_OUTPUT_TAIL_BYTES_MAX` each.
    pub output_tail: String,
}

impl HookRun {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// One line for the job's error: what failed and how.
    pub fn failure(&self) -> String {
        let how = match (self.timed_out, self.exit_code) {
            (true, _) => format!("was killed after {} ms (its timeout)", self.duration_ms),
            (false, Some(code)) => format!("exited with status {code}"),
            (false, None) => "was killed by a signal or could not start".to_string(),
        };
        let last_line = self
            .output_tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        if last_line.is_empty() {
            format!("the {} hook {how}", self.hook)
        } else {
            format!("the {} hook {how}: {}", self.hook, last_line.trim())
        }
    }
}

/// The last `HOOK_OUTPUT_TAIL_BYTES_MAX` bytes of a stream.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<Vec<u8>>>);

impl Tail {
    fn push(&self, bytes: &[u8]) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.extend_from_slice(bytes);
        if kept.len() > HOOK_OUTPUT_TAIL_BYTES_MAX {
            let excess = kept.len() - HOOK_OUTPUT_TAIL_BYTES_MAX;
            kept.drain(..excess);
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Reads `input` to its end on a thread of its own, keeping the tail; the channel
    /// says when it is done.
    pub fn collect(
        &self,
        mut input: impl Read + Send + 'static,
    ) -> crossbeam_channel::Receiver<()> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let tail = self.clone();
        // Without a thread the output is lost; the hook still runs, its pipe closing with it.
        let _ = std::thread::Builder::new()
            .name("cairn-hook-output".into())
            .spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = input.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    tail.push(&buffer[..n]);
                }
                let _ = done_tx.send(());
            });
        done_rx
    }
}

/// `sh -c COMMAND` in a process group of its own (so a timeout kills what it started
/// too), with `env` added to its environment.
pub fn shell(command: &str, env: &[(&str, String)]) -> Command {
    let mut shell = Command::new("sh");
    shell.arg("-c").arg(command).stdin(Stdio::null());
    for (key, value) in env {
        shell.env(key, value);
    }
    shell.process_group(0);
    shell
}

/// Kills a child's whole process group.
pub fn kill_group(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill takes plain integers; a group already gone gives ESRCH.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// Runs a hook to its end or its timeout, and says what it did.
pub fn run_hook(name: &str, command: &str, env: &[(&str, String)], timeout: Duration) -> HookRun {
    let started = Instant::now();
    let mut run = HookRun {
        hook: name.to_owned(),
        ..HookRun::default()
    };
    let mut child = match shell(command, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            run.output_tail = format!("cannot start sh: {e}");
            return run;
        }
    };
    let (out, err) = (Tail::default(), Tail::default());
    let mut drained = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        drained.push(out.collect(stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        drained.push(err.collect(stderr));
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= timeout => {
                run.timed_out = true;
                kill_group(&child);
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(HOOK_POLL_MS)),
            Err(_) => break None,
        }
    };
    // What it left running in its group goes too: a hook's work ends with the hook.
    kill_group(&child);
    let drain_until = Instant::now() + Duration::from_millis(HOOK_DRAIN_MS);
    for done in drained {
        let _ = done.recv_deadline(drain_until);
    }
    run.exit_code = if run.timed_out {
        None
    } else {
        status.and_then(|s| s.code())
    };
    run.duration_ms = started.elapsed().as_millis() as u64;
    let (out, err) = (out.text(), err.text());
    run.output_tail = match (out.is_empty(), err.is_empty()) {
        (_, true) => out,
        (true, false) => err,
        (false, false) => format!("{out}\n{err}"),
    };
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_keeps_its_status_and_output_tail() {
        let ok = run_hook(
            "before",
            "echo hello; echo oops >&2",
            &[],
            Duration::from_secs(10),
        );
        assert_eq!(ok.exit_code, Some(0));
        assert!(ok.succeeded());
        assert_eq!(ok.output_tail, "hello\n\noops\n");
        let failed = run_hook(
            "before",
            "echo \"$CAIRN_IMAGE is busy\"; exit 3",
            &[("CAIRN_IMAGE", "fs".into())],
            Duration::from_secs(10),
        );
        assert_eq!(failed.exit_code, Some(3));
        assert_eq!(
            failed.failure(),
            "the before hook exited with status 3: fs is busy"
        );
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let started = Instant::now();
        let run = run_hook(
            "after",
            "sleep 30 & sleep 30",
            &[],
            Duration::from_millis(200),
        );
        assert!(run.timed_out);
        assert_eq!(run.exit_code, None);
        assert!(!run.succeeded());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the background sleep holds no pipe open"
        );
        assert!(run.failure().contains("its timeout"), "{}", run.failure());
    }

    #[test]
    fn the_output_kept_is_bounded() {
        let run = run_hook(
            "before",
            "head -c 100000 /dev/zero | tr '\\0' x; echo end",
            &[],
            Duration::from_secs(10),
        );
        assert!(run.output_tail.len() <= HOOK_OUTPUT_TAIL_BYTES_MAX);
        assert!(run.output_tail.ends_with("xend\n"));
    }
}
