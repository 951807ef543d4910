//! Backup jobs: the `[[backup]]` entries of node.toml, run by the node on their schedule
//! so an office is backed up without anyone typing a command.
//!
//! ```toml
//! [[backup]]
//! image = "fileserver"
//! source = "/dev/vg0/fileserver"          # a file or block device; or instead
//! # source_command = "pg_dump -Fc shop"  # a command's stdout
//! schedule = "daily 02:00"                # see when.rs
//! keep = { last = 7, daily = 14, weekly = 8, monthly = 12 }
//! before = "lvcreate -s -n fs-snap -L 5G vg0/fileserver"
//! source_during = "/dev/vg0/fs-snap"      # read instead of source while it exists
//! after = "lvremove -y vg0/fs-snap"
//! hook_timeout = "10m"                    # each hook's bound [default: 10m]
//! ```
//!
//! A qcow2 file as `source` (or `source_during`) is backed up as its guest's disk, through
//! `qemu-img` (qcow2.rs).
//!
//! A run: `before` (if any; a failure ends the run, nothing is backed up), the backup
//! through the same in-node path and write lock as `cairn backup`, then `after` (once
//! `before` succeeded, whatever the backup did), then, after a snapshot, `keep` through
//! the same forget as `cairn forget` (without `keep`, `[retention.IMAGE]` if there is one).
//!
//! When (anacron's rule): a job runs once the first scheduled time after its last run's
//! start has passed, so a job missed while the machine was off runs once at start, and a
//! job never run runs at once. A failed run is retried after 1 min, doubling with each
//! failure in a row, at most the job's period. One thread per job runs its runs one after
//! another, so two runs of a job never overlap.
//!
//! State: `job/IMAGE` in the index's catalog holds `JobState` as JSON. A run marks itself
//! running there first; a node that finds that mark at its start was stopped mid-run and
//! records the run as interrupted (a failure), which the retry rule then runs again.

pub mod hook;
pub mod qcow2;
pub mod when;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::retention::{Count, Policy};
use cairn_protocol::ImageName;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::backup::BackupSummary;
use crate::source::Source;
use crate::store::{IndexBatch, MetaIndex, StoreError};
use crate::units::{now_unix_ms, parse_duration_ms};
pub use hook::HookRun;
pub use when::When;

/// Catalog prefix of a job's state; the key ends with the image name.
pub const KEY_JOB: &[u8] = b"job/";
/// A node.toml with more jobs than this is surely a mistake.
pub const JOBS_MAX: usize = 256;
pub const HOOK_TIMEOUT_DEFAULT_MS: u64 = 10 * 60_000;
/// The first retry's wait; each failure in a row doubles it, up to the job's period.
pub const RETRY_FIRST_MS: u64 = 60_000;
/// Longest sleep between two looks at the clock: a clock set forward is noticed soon.
const WAKE_MS_MAX: u64 = 1_000;
/// The error line a run keeps, at most.
const ERROR_BYTES_MAX: usize = 1024;

#[derive(Debug, Error)]
pub enum JobError {
    #[error("[[backup]] job {job}: {why}")]
    Config { job: String, why: String },
    #[error("more than {JOBS_MAX} [[backup]] jobs")]
    TooMany,
    #[error("job state of {image}")]
    State {
        image: String,
        #[source]
        source: StoreError,
    },
}

/// Where a job reads its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobSource {
    /// A file or a block device.
    Path(PathBuf),
    /// The stdout of `sh -c COMMAND`; a non-zero exit fails the run before the commit.
    Command(String),
}

/// One `[[backup]]` job, checked.
#[derive(Clone, Debug)]
pub struct Job {
    pub image: ImageName,
    pub source: JobSource,
    pub schedule: String,
    pub when: When,
    /// `None`: `keep` was not given (the node may fill it from `[retention.IMAGE]`).
    pub keep: Option<Policy>,
    pub before: Option<String>,
    pub source_during: Option<PathBuf>,
    pub after: Option<String>,
    pub hook_timeout_ms: u64,
}

const KEYS: [&str; 9] = [
    "image",
    "source",
    "source_command",
    "schedule",
    "keep",
    "before",
    "source_during",
    "after",
    "hook_timeout",
];
const KEEP_KEYS: [&str; 7] = [
    "last", "hourly", "daily", "weekly", "monthly", "yearly", "within",
];

impl Job {
    /// The jobs of node.toml's `[[backup]]` tables, each refused with one line naming
    /// the job and the key.
    pub fn parse_all(tables: &[toml::Table]) -> Result<Vec<Job>, JobError> {
        if tables.len() > JOBS_MAX {
            return Err(JobError::TooMany);
        }
        let mut jobs: Vec<Job> = Vec::with_capacity(tables.len());
        for (idx, table) in tables.iter().enumerate() {
            let job = Job::parse(idx, table)?;
            if jobs.iter().any(|j| j.image == job.image) {
                return Err(JobError::Config {
                    job: format!("{:?}", job.image.as_str()),
                    why: "another [[backup]] job has this image: give each job its own image"
                        .into(),
                });
            }
            jobs.push(job);
        }
        Ok(jobs)
    }

    fn parse(idx: usize, table: &toml::Table) -> Result<Job, JobError> {
        let name = match table.get("image").and_then(|v| v.as_str()) {
            Some(image) => format!("{image:?}"),
            None => format!("#{}", idx + 1),
        };
        let bad = |why: String| JobError::Config {
            job: name.clone(),
            why,
        };
        if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(bad(format!(
                "unknown key {key:?} (a job takes {})",
                KEYS.join(", ")
            )));
        }
        let text = |key: &str| -> Result<Option<String>, JobError> {
            match table.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
                Some(_) => Err(bad(format!("{key} must be a non-empty string"))),
            }
        };
        let image = text("image")?.ok_or_else(|| bad("image is missing".into()))?;
        let image = ImageName::new(&image).map_err(|e| bad(format!("image: {e}")))?;
        let source = match (text("source")?, text("source_command")?) {
            (Some(path), None) => JobSource::Path(PathBuf::from(path)),
            (None, Some(command)) => JobSource::Command(command),
            (None, None) => return Err(bad("source is missing (or give source_command)".into())),
            (Some(_), Some(_)) => {
                return Err(bad("source and source_command both given: give one".into()))
            }
        };
        let schedule = text("schedule")?.ok_or_else(|| bad("schedule is missing".into()))?;
        let when = When::parse(&schedule).map_err(|e| bad(format!("schedule: {e}")))?;
        if when.next_after(now_unix_ms()).is_none() {
            return Err(bad(format!("schedule: {schedule:?} never comes round")));
        }
        let keep = match table.get("keep") {
            None => None,
            Some(toml::Value::Table(keep)) => Some(parse_keep(keep).map_err(bad)?),
            Some(_) => {
                return Err(bad(
                    "keep must be a table like { last = 7, daily = 14 }".into()
                ))
            }
        };
        let hook_timeout_ms = match text("hook_timeout")? {
            None => HOOK_TIMEOUT_DEFAULT_MS,
            Some(t) => parse_duration_ms(&t).map_err(|e| bad(format!("hook_timeout: {e}")))?,
        };
        Ok(Job {
            image,
            source,
            schedule,
            when,
            keep,
            before: text("before")?,
            source_during: text("source_during")?.map(PathBuf::from),
            after: text("after")?,
            hook_timeout_ms,
        })
    }

    /// The job's name in logs and status lines.
    pub fn name(&self) -> &str {
        self.image.as_str()
    }
}

/// `keep = { ... }`: `cairn forget`'s --keep-* rules without the prefix.
fn parse_keep(keep: &toml::Table) -> Result<Policy, String> {
    if let Some(key) = keep.keys().find(|k| !KEEP_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "keep: unknown rule {key:?} (rules are {})",
            KEEP_KEYS.join(", ")
        ));
    }
    let count = |key: &str| -> Result<Option<Count>, String> {
        let bad = |v: &dyn std::fmt::Display| {
            format!("keep.{key}: {v} is not a count: give a number or \"unlimited\"")
        };
        match keep.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(-1)) => Ok(Some(Count::Unlimited)),
            Some(toml::Value::Integer(n)) => u32::try_from(*n)
                .map(|n| Some(Count::Of(n)))
                .map_err(|_| bad(n)),
            Some(toml::Value::String(s)) if s == "unlimited" => Ok(Some(Count::Unlimited)),
            Some(v) => Err(bad(v)),
        }
    };
    let within_ms = match keep.get("within") {
        None => None,
        Some(toml::Value::String(s)) => {
            Some(parse_duration_ms(s).map_err(|e| format!("keep.within: {e}"))?)
        }
        Some(v) => return Err(format!("keep.within: {v} is not a duration like \"30d\"")),
    };
    let policy = Policy {
        last: count("last")?,
        hourly: count("hourly")?,
        daily: count("daily")?,
        weekly: count("weekly")?,
        monthly: count("monthly")?,
        yearly: count("yearly")?,
        within_ms,
    };
    if policy.is_empty() {
        return Err("keep keeps nothing: give at least one rule, e.g. { last = 7 }".into());
    }
    Ok(policy)
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    Ok,
    Failed,
    /// The node stopped during the run; counted as a failure.
    Interrupted,
}

/// One run of a job, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub start_unix_ms: u64,
    pub duration_ms: u64,
    pub result: RunResult,
    /// The image's size, as backed up (0 when no snapshot was made).
    pub bytes: u64,
    /// Bytes stored for the first time by this run, before compression.
    #[serde(default)]
    pub new_bytes: u64,
    /// The snapshot made, if one was.
    pub snapshot: Option<String>,
    /// Snapshots the job's `keep` forgot after it.
    #[serde(default)]
    pub forgotten: u64,
    /// What went wrong, on one line.
    pub error: Option<String>,
    #[serde(default)]
    pub hooks: Vec<HookRun>,
}

/// What the index keeps of a job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub last_run: Option<RunRecord>,
    /// Set while a run is under way (and found set at start after a crash).
    pub running_since_unix_ms: Option<u64>,
    pub runs: u64,
    pub failures: u64,
    /// Failures since the last success: what the retry's wait doubles with.
    pub failures_in_a_row: u32,
    pub last_success_unix_ms: Option<u64>,
}

impl JobState {
    pub fn load(index: &dyn MetaIndex, image: &ImageName) -> Result<JobState, JobError> {
        let stored = index
            .catalog_get(&key(image))
            .map_err(|source| JobError::State {
                image: image.to_string(),
                source,
            })?;
        // A state this version cannot read (written by a newer one) starts afresh: the
        // worst that does is one run sooner than due.
        Ok(stored
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default())
    }

    pub fn save(&self, index: &dyn MetaIndex, image: &ImageName) -> Result<(), JobError> {
        let bytes = serde_json::to_vec(self).expect("job state serialises");
        index
            .commit(IndexBatch {
                catalog: vec![(key(image), bytes)],
                ..IndexBatch::default()
            })
            .map_err(|source| JobError::State {
                image: image.to_string(),
                source,
            })
    }

    /// When the job runs next: at once if it never ran, else at the first scheduled time
    /// after the last run's start (anacron's rule), or sooner for the retry of a failure.
    pub fn next_run_unix_ms(&self, job: &Job, now_unix_ms: u64) -> u64 {
        let Some(last) = &self.last_run else {
            return now_unix_ms;
        };
        let scheduled = job.when.next_after(last.start_unix_ms).unwrap_or(u64::MAX);
        if last.result == RunResult::Ok {
            return scheduled;
        }
        let ended = last.start_unix_ms + last.duration_ms;
        scheduled
            .min(ended + retry_wait_ms(self.failures_in_a_row, job.when.period_ms(now_unix_ms)))
    }

    fn record(&mut self, run: RunRecord) {
        self.runs += 1;
        if run.result == RunResult::Ok {
            self.failures_in_a_row = 0;
            self.last_success_unix_ms = Some(run.start_unix_ms);
        } else {
            self.failures += 1;
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        }
        self.running_since_unix_ms = None;
        self.last_run = Some(run);
    }
}

fn key(image: &ImageName) -> Vec<u8> {
    [KEY_JOB, image.as_str().as_bytes()].concat()
}

/// The retry's wait after `failures_in_a_row` failures: 1 min, doubling, at most the
/// period.
pub fn retry_wait_ms(failures_in_a_row: u32, period_ms: u64) -> u64 {
    let doublings = failures_in_a_row.saturating_sub(1).min(20);
    (RETRY_FIRST_MS << doublings).min(period_ms)
}

/// What a job needs of the node it runs in: the same backup and forget `cairn backup` and
/// `cairn forget` run there (same write lock, same hand-over to the mesh).
pub trait JobHost: Send + Sync + 'static {
    fn backup(&self, image: &ImageName, source: Source) -> Result<BackupSummary, String>;
    /// Forgets what `policy` does not keep; returns how many snapshots it forgot.
    fn forget(&self, image: &ImageName, policy: &Policy) -> Result<u64, String>;
    fn index(&self) -> &dyn MetaIndex;
    /// Where a qcow2 source's guest view is written for the run.
    fn scratch_dir(&self) -> PathBuf;
}

/// Starts one thread per job. A run the node was stopped in is recorded as interrupted
/// first.
pub fn start(host: Arc<dyn JobHost>, jobs: &[Job]) -> Result<(), JobError> {
    for job in jobs {
        let mut state = JobState::load(host.index(), &job.image)?;
        if let Some(since) = state.running_since_unix_ms {
            tracing::warn!(
                operation = "backup",
                job = true,
                image = job.image.as_str(),
                snapshot = "",
                bytes = 0u64,
                duration_ms = now_unix_ms().saturating_sub(since),
                result = "interrupted",
                reason = "the node stopped during the run",
                "backup job {}: the node stopped during its run of {}; it runs again",
                job.name(),
                crate::units::utc(since)
            );
            state.record(RunRecord {
                start_unix_ms: since,
                duration_ms: now_unix_ms().saturating_sub(since),
                result: RunResult::Interrupted,
                bytes: 0,
                new_bytes: 0,
                snapshot: None,
                forgotten: 0,
                error: Some("interrupted: the node stopped during the run".into()),
                hooks: Vec::new(),
            });
            state.save(host.index(), &job.image)?;
        }
        let name = format!("{:?}", job.name());
        let (host, job) = (host.clone(), job.clone());
        std::thread::Builder::new()
            .name(format!("cairn-job-{}", job.name()))
            .spawn(move || run_forever(&*host, &job))
            .map_err(|e| JobError::Config {
                job: name,
                why: format!("cannot start its thread: {e}"),
            })?;
    }
    Ok(())
}

fn run_forever(host: &dyn JobHost, job: &Job) {
    loop {
        let state = match JobState::load(host.index(), &job.image) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!("backup job {}: {}", job.name(), crate::units::chain(&e));
                std::thread::sleep(Duration::from_secs(60));
                continue;
            }
        };
        let now = now_unix_ms();
        let next = state.next_run_unix_ms(job, now);
        if next > now {
            std::thread::sleep(Duration::from_millis((next - now).min(WAKE_MS_MAX)));
            continue;
        }
        if let Err(e) = run_once(host, job, state) {
            tracing::error!("backup job {}: {}", job.name(), crate::units::chain(&e));
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}

/// One run: marks it running, runs it, records how it ended.
pub fn run_once(host: &dyn JobHost, job: &Job, mut state: JobState) -> Result<RunRecord, JobError> {
    let start_unix_ms = now_unix_ms();
    state.running_since_unix_ms = Some(start_unix_ms);
    state.save(host.index(), &job.image)?;
    tracing::info!("backup job {}: starting", job.name());
    let started = std::time::Instant::now();
    let mut run = RunRecord {
        start_unix_ms,
        duration_ms: 0,
        result: RunResult::Ok,
        bytes: 0,
        new_bytes: 0,
        snapshot: None,
        forgotten: 0,
        error: None,
        hooks: Vec::new(),
    };
    let mut errors: Vec<String> = Vec::new();
    let timeout = Duration::from_millis(job.hook_timeout_ms);
    let env = |result: &str| {
        vec![
            ("CAIRN_IMAGE", job.image.to_string()),
            ("CAIRN_RESULT", result.to_owned()),
        ]
    };
    let before_ok = match &job.before {
        Some(command) => {
            let before = hook::run_hook("before", command, &env(""), timeout);
            let ok = before.succeeded();
            if !ok {
                errors.push(before.failure());
            }
            run.hooks.push(before);
            ok
        }
        None => true,
    };
    if before_ok {
        match back_up(host, job) {
            Ok(summary) => {
                run.bytes = summary.size_bytes;
                run.new_bytes = summary.new_bytes;
                run.snapshot = Some(summary.snapshot);
            }
            Err(e) => errors.push(e),
        }
        if let Some(command) = &job.after {
            let result = if errors.is_empty() { "ok" } else { "failed" };
            let after = hook::run_hook("after", command, &env(result), timeout);
            if !after.succeeded() {
                errors.push(after.failure());
            }
            run.hooks.push(after);
        }
    }
    if let (Some(policy), Some(_)) = (&job.keep, &run.snapshot) {
        match host.forget(&job.image, policy) {
            Ok(n) => run.forgotten = n,
            Err(e) => errors.push(format!("the snapshot was made, but keep failed: {e}")),
        }
    }
    run.duration_ms = started.elapsed().as_millis() as u64;
    if !errors.is_empty() {
        run.result = RunResult::Failed;
        let mut line = errors.join("; ");
        if line.len() > ERROR_BYTES_MAX {
            let mut end = ERROR_BYTES_MAX;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        run.error = Some(line);
    }
    log_run(job, &run);
    state.record(run.clone());
    state.save(host.index(), &job.image)?;
    Ok(run)
}

/// The run's one structured line, with the fields `cairn backup` logs (`--log-format
/// json` makes them JSON), `job = true` (a job's run, not a typed command) and, when it
/// succeeded, how many snapshots its keep forgot.
fn log_run(job: &Job, run: &RunRecord) {
    let snapshot = run.snapshot.as_deref().unwrap_or("");
    match &run.error {
        None => tracing::info!(
            operation = "backup",
            job = true,
            image = job.image.as_str(),
            snapshot,
            bytes = run.bytes,
            duration_ms = run.duration_ms,
            forgotten = run.forgotten,
            result = "ok",
            "backup job {}: backed up {} as {snapshot} in {} ms, forgot {}",
            job.name(),
            crate::units::bytes(run.bytes),
            run.duration_ms,
            run.forgotten
        ),
        Some(reason) => tracing::warn!(
            operation = "backup",
            job = true,
            image = job.image.as_str(),
            snapshot,
            bytes = run.bytes,
            duration_ms = run.duration_ms,
            result = "failed",
            reason = reason.as_str(),
            "backup job {} failed: {reason}",
            job.name()
        ),
    }
}

/// The backup part of a run, from `source_during` while it exists, else the source.
fn back_up(host: &dyn JobHost, job: &Job) -> Result<BackupSummary, String> {
    let during = job.source_during.as_ref().filter(|p| p.exists());
    match (during, &job.source) {
        (Some(path), _) | (None, JobSource::Path(path)) if qcow2::is_qcow2(path) => {
            let view = qcow2::guest_view(path, &host.scratch_dir(), job.name())?;
            let source = open_path(&view.path)?;
            host.backup(&job.image, source)
        }
        (Some(path), _) | (None, JobSource::Path(path)) => {
            let source = open_path(path)?;
            host.backup(&job.image, source)
        }
        (None, JobSource::Command(command)) => {
            let mut child = hook::shell(command, &[("CAIRN_IMAGE", job.image.to_string())])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start source_command: {e}"))?;
            let stderr = hook::Tail::default();
            let stderr_done = child.stderr.take().map(|err| stderr.collect(err));
            let stdout = child.stdout.take().expect("stdout was piped");
            let reader = CommandOutput {
                stdout,
                child,
                stderr,
                stderr_done,
                finished: false,
            };
            host.backup(
                &job.image,
                Source::stream("source_command", Box::new(reader)),
            )
        }
    }
}

fn open_path(path: &Path) -> Result<Source, String> {
    Source::open(&path.to_string_lossy()).map_err(|e| crate::units::chain(&e))
}

/// A `source_command`'s stdout that ends in an error unless the command exits 0, so the
/// backup fails before its commit and a broken dump never becomes a snapshot.
struct CommandOutput {
    stdout: std::process::ChildStdout,
    child: Child,
    stderr: hook::Tail,
    /// Says when all of stderr was read, so the error line has its last words.
    stderr_done: Option<crossbeam_channel::Receiver<()>>,
    finished: bool,
}

impl Read for CommandOutput {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stdout.read(buffer)?;
        if n > 0 || self.finished || buffer.is_empty() {
            return Ok(n);
        }
        let status = self.child.wait()?;
        self.finished = true;
        if status.success() {
            return Ok(0);
        }
        if let Some(done) = &self.stderr_done {
            let _ = done.recv_timeout(Duration::from_millis(hook::HOOK_DRAIN_MS));
        }
        let tail = self.stderr.text();
        let last = tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(std::io::Error::other(format!(
            "source_command {status}{}{}",
            if last.is_empty() { "" } else { ": " },
            last.trim()
        )))
    }
}

impl Drop for CommandOutput {
    fn drop(&mut self) {
        if !self.finished {
            hook::kill_group(&self.child);
            let _ = self.child.wait();
        }
    }
}

/// A job as `cairn status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub image: String,
    pub schedule: String,
    /// The longest wait between two scheduled runs.
    pub period_ms: u64,
    pub last_run: Option<RunRecord>,
    pub running_since_unix_ms: Option<u64>,
    /// `null` while running.
    pub next_run_unix_ms: Option<u64>,
    pub runs: u64,
    pub failures: u64,
    pub failures_in_a_row: u32,
    pub last_success_unix_ms: Option<u64>,
    /// The newest snapshot of the image confirmed at R sites; `null`: none yet.
    pub newest_at_r_unix_ms: Option<u64>,
}

/// Every job's status; `newest_at_r` gives, per image, the newest snapshot at R.
pub fn status_of(
    jobs: &[Job],
    index: &dyn MetaIndex,
    now_unix_ms: u64,
    newest_at_r: &dyn Fn(&ImageName) -> Option<u64>,
) -> Vec<JobStatus> {
    jobs.iter()
        .map(|job| {
            let state = JobState::load(index, &job.image).unwrap_or_default();
            JobStatus {
                image: job.image.to_string(),
                schedule: job.schedule.clone(),
                period_ms: job.when.period_ms(now_unix_ms),
                next_run_unix_ms: state
                    .running_since_unix_ms
                    .is_none()
                    .then(|| state.next_run_unix_ms(job, now_unix_ms).max(now_unix_ms)),
                last_run: state.last_run,
                running_since_unix_ms: state.running_since_unix_ms,
                runs: state.runs,
                failures: state.failures,
                failures_in_a_row: state.failures_in_a_row,
                last_success_unix_ms: state.last_success_unix_ms,
                newest_at_r_unix_ms: newest_at_r(&job.image),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Vec<toml::Table> {
        #[derive(Deserialize)]
        struct File {
            backup: Vec<toml::Table>,
        }
        toml::from_str::<File>(text).unwrap().backup
    }

    fn refused(text: &str) -> String {
        Job::parse_all(&table(text)).unwrap_err().to_string()
    }

    #[test]
    fn the_issues_example_parses() {
        let jobs = Job::parse_all(&table(
            r#"
            [[backup]]
            image = "fileserver"
            source = "/dev/vg0/fileserver"
            schedule = "daily 02:00"
            keep = { last = 7, daily = 14, weekly = 8, monthly = 12 }
            before = "lvcreate -s -n fs-snap -L 5G vg0/fileserver"
            source_during = "/dev/vg0/fs-snap"
            after = "lvremove -y vg0/fs-snap"

            [[backup]]
            image = "shop-db"
            source_command = "pg_dump shop"
            schedule = "0 2 * * 1-5"
            hook_timeout = "30s"
            "#,
        ))
        .unwrap();
        assert_eq!(jobs.len(), 2);
        let fs = &jobs[0];
        assert_eq!(fs.source, JobSource::Path("/dev/vg0/fileserver".into()));
        let keep = fs.keep.unwrap();
        assert_eq!(keep.last, Some(Count::Of(7)));
        assert_eq!(keep.monthly, Some(Count::Of(12)));
        assert_eq!(
            fs.source_during.as_deref(),
            Some(Path::new("/dev/vg0/fs-snap"))
        );
        assert_eq!(fs.hook_timeout_ms, HOOK_TIMEOUT_DEFAULT_MS);
        assert_eq!(jobs[1].source, JobSource::Command("pg_dump shop".into()));
        assert_eq!(jobs[1].keep, None);
        assert_eq!(jobs[1].hook_timeout_ms, 30_000);
    }

    #[test]
    fn a_bad_job_is_refused_naming_the_job_and_the_key() {
        let base = "image = \"fs\"\nsource = \"/x\"\nschedule = \"hourly\"\n";
        for (extra, expected) in [
            (
                "sourc = \"/y\"",
                "[[backup]] job \"fs\": unknown key \"sourc\"",
            ),
            (
                "keep = { lats = 3 }",
                "[[backup]] job \"fs\": keep: unknown rule \"lats\"",
            ),
            ("keep = { last = -3 }", "keep.last: -3 is not a count"),
            ("keep = { last = 0 }", "keep keeps nothing"),
            (
                "source_command = \"cat\"",
                "source and source_command both given",
            ),
            (
                "hook_timeout = \"soon\"",
                "hook_timeout: \"soon\" is not a duration",
            ),
        ] {
            let e = refused(&format!("[[backup]]\n{base}{extra}\n"));
            assert!(e.contains(expected), "{extra}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let e = refused("[[backup]]\nimage = \"fs\"\nsource = \"/x\"\nschedule = \"daily 2am\"\n");
        assert!(
            e.starts_with("[[backup]] job \"fs\": schedule: \"daily 2am\" is not a schedule"),
            "{e}"
        );
        let e = refused("[[backup]]\nsource = \"/x\"\nschedule = \"hourly\"\n");
        assert_eq!(e, "[[backup]] job #1: image is missing");
        let e = refused("[[backup]]\nimage = \"fs\"\nschedule = \"hourly\"\n");
        assert!(e.contains("source is missing"), "{e}");
        let twice = format!("[[backup]]\n{base}\n[[backup]]\n{base}");
        assert!(refused(&twice).contains("another [[backup]] job has this image"));
    }

    fn job(schedule: &str) -> Job {
        Job::parse_all(&table(&format!(
            "[[backup]]\nimage = \"fs\"\nsource = \"/x\"\nschedule = \"{schedule}\"\n"
        )))
        .unwrap()
        .remove(0)
    }

    fn ran(start: u64, result: RunResult) -> RunRecord {
        RunRecord {
            start_unix_ms: start,
            duration_ms: 1_000,
            result,
            bytes: 0,
            new_bytes: 0,
            snapshot: None,
            forgotten: 0,
            error: None,
            hooks: Vec::new(),
        }
    }

    #[test]
    fn anacron_a_missed_run_is_due_at_once_and_only_once() {
        let job = job("every 1h");
        let hour = 3_600_000;
        let never = JobState::default();
        assert_eq!(never.next_run_unix_ms(&job, 5 * hour + 7), 5 * hour + 7);
        let mut state = JobState::default();
        state.record(ran(2 * hour + 5, RunResult::Ok));
        // Off from 02:00 to 05:00: the 03:00 run was missed, so it is due now (once).
        assert_eq!(state.next_run_unix_ms(&job, 5 * hour + 7), 3 * hour);
        state.record(ran(5 * hour + 7, RunResult::Ok));
        assert_eq!(state.next_run_unix_ms(&job, 5 * hour + 8), 6 * hour);
    }

    #[test]
    fn a_failure_is_retried_after_a_minute_doubling_at_most_the_period() {
        assert_eq!(retry_wait_ms(1, 86_400_000), 60_000);
        assert_eq!(retry_wait_ms(2, 86_400_000), 120_000);
        assert_eq!(retry_wait_ms(5, 86_400_000), 960_000);
        assert_eq!(retry_wait_ms(40, 86_400_000), 86_400_000);
        assert_eq!(retry_wait_ms(1, 10_000), 10_000);
        let job = job("daily 02:00");
        let mut state = JobState::default();
        state.record(ran(1_000_000, RunResult::Failed));
        state.record(ran(1_100_000, RunResult::Interrupted));
        assert_eq!(
            (state.failures, state.failures_in_a_row, state.runs),
            (2, 2, 2)
        );
        assert_eq!(state.next_run_unix_ms(&job, 1_200_000), 1_101_000 + 120_000);
        state.record(ran(1_300_000, RunResult::Ok));
        assert_eq!(state.failures_in_a_row, 0);
        assert_eq!(state.last_success_unix_ms, Some(1_300_000));
    }
}
