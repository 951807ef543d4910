//! The swarm's ledger: one JSON line per finished seed in the file `--out` names, so a
//! long run survives being stopped (a rerun with the same file skips the seeds it holds)
//! and shards run apart merge into one summary (`cairn-sim swarm --merge FILE...`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SeedResult;

/// One finished seed, as one line of the ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedLine {
    pub seed: u64,
    /// The images' size cap the seed ran with; seeds of one ledger all share it.
    pub image_gib_max: Option<f64>,
    pub ok: bool,
    /// Every violated invariant, one string each; empty when `ok`.
    pub failures: Vec<String>,
    pub losses_beyond_budget: usize,
    pub wall_secs: f64,
    pub sim_hours: f64,
    pub trace: String,
    pub converged_after_hours: Option<f64>,
    /// Every coverage counter by name.
    pub coverage: BTreeMap<String, u64>,
}

impl SeedLine {
    pub fn of(result: &SeedResult, image_gib_max: Option<f64>) -> SeedLine {
        let report = &result.report;
        SeedLine {
            seed: result.seed,
            image_gib_max,
            ok: report.violations.is_empty(),
            failures: report.violations.clone(),
            losses_beyond_budget: report.losses_beyond_budget.len(),
            wall_secs: result.wall_secs,
            sim_hours: report.sim_hours,
            trace: report.trace_hash.clone(),
            converged_after_hours: report.converged_after_hours,
            coverage: report
                .coverage
                .rows()
                .into_iter()
                .map(|(name, n, _)| (name.to_string(), n))
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot read swarm ledger {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write swarm ledger {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("swarm ledger {path}, line {line}, is not a seed's line")]
    Line {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "swarm ledger {path} holds seeds run with --image-gib-max {found:?}, not {wanted:?}: use another --out file"
    )]
    Settings {
        path: PathBuf,
        found: Option<f64>,
        wanted: Option<f64>,
    },
}

/// The lines of a ledger. A last line cut short (the run was killed while writing it)
/// is left out; any other line that does not parse is an error.
pub fn read(path: &Path) -> Result<Vec<SeedLine>, LedgerError> {
    let text = std::fs::read_to_string(path).map_err(|source| LedgerError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut lines = Vec::new();
    for (idx, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str(line).map_err(|source| LedgerError::Line {
            path: path.to_path_buf(),
            line: idx + 1,
            source,
        })?;
        lines.push(parsed);
    }
    Ok(lines)
}

/// A ledger opened to append to: the lines already in it, and the file with any cut-short
/// last line removed, so the next line starts on a line of its own.
pub struct Ledger {
    path: PathBuf,
    file: File,
    pub lines: Vec<SeedLine>,
}

impl Ledger {
    /// Opens (or creates) the ledger at `path` for seeds run with `image_gib_max`.
    pub fn open(path: &Path, image_gib_max: Option<f64>) -> Result<Ledger, LedgerError> {
        let write_error = |source| LedgerError::Write {
            path: path.to_path_buf(),
            source,
        };
        let lines = if path.exists() {
            read(path)?
        } else {
            Vec::new()
        };
        if let Some(other) = lines.iter().find(|l| l.image_gib_max != image_gib_max) {
            return Err(LedgerError::Settings {
                path: path.to_path_buf(),
                found: other.image_gib_max,
                wanted: image_gib_max,
            });
        }
        if path.exists() {
            let text = std::fs::read(path).map_err(|source| LedgerError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let keep = text
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |end| end + 1);
            if keep < text.len() {
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(write_error)?;
                file.set_len(keep as u64).map_err(write_error)?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(write_error)?;
        Ok(Ledger {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    pub fn holds(&self, seed: u64) -> bool {
        self.lines.iter().any(|l| l.seed == seed)
    }

    /// Appends one finished seed, flushed before it returns: a kill loses at most the
    /// seeds still running.
    pub fn append(&mut self, line: SeedLine) -> Result<(), LedgerError> {
        let mut text = serde_json::to_string(&line).expect("a seed's line always serialises");
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| LedgerError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.lines.push(line);
        Ok(())
    }
}

/// What a set of seeds came to: the figures `swarm` and `swarm --merge` print.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Each seed once, in order (a seed in two shards counts once, its first line).
    pub seeds: Vec<u64>,
    /// Failed seeds with their violations.
    pub failures: Vec<(u64, Vec<String>)>,
    pub with_losses_beyond_budget: usize,
    /// The slowest seed and its wall seconds.
    pub slowest: Option<(u64, f64)>,
    pub mean_wall_secs: f64,
    pub total_wall_secs: f64,
    pub sim_hours: f64,
    /// Coverage counters summed over the seeds (`*_max` ones the largest), with how
    /// many seeds reached each, by name.
    pub coverage: BTreeMap<String, (u64, usize)>,
    pub converged: usize,
    /// The latest convergence, in hours after the heal.
    pub converged_worst_hours: f64,
    /// Trace hashes by seed.
    pub traces: BTreeMap<u64, String>,
}

impl Summary {
    pub fn of(lines: &[SeedLine]) -> Summary {
        let mut by_seed: BTreeMap<u64, &SeedLine> = BTreeMap::new();
        for line in lines {
            by_seed.entry(line.seed).or_insert(line);
        }
        let lines: Vec<&SeedLine> = by_seed.values().copied().collect();
        let total_wall_secs: f64 = lines.iter().map(|l| l.wall_secs).sum();
        let mut coverage: BTreeMap<String, (u64, usize)> = BTreeMap::new();
        for line in &lines {
            for (name, n) in &line.coverage {
                let entry = coverage.entry(name.clone()).or_default();
                entry.0 = if name.ends_with("_max") {
                    entry.0.max(*n)
                } else {
                    entry.0 + n
                };
                entry.1 += usize::from(*n > 0);
            }
        }
        let converged: Vec<f64> = lines
            .iter()
            .filter_map(|l| l.converged_after_hours)
            .collect();
        Summary {
            seeds: by_seed.keys().copied().collect(),
            failures: lines
                .iter()
                .filter(|l| !l.ok)
                .map(|l| (l.seed, l.failures.clone()))
                .collect(),
            with_losses_beyond_budget: lines.iter().filter(|l| l.losses_beyond_budget > 0).count(),
            slowest: lines
                .iter()
                .max_by(|a, b| a.wall_secs.total_cmp(&b.wall_secs))
                .map(|l| (l.seed, l.wall_secs)),
            mean_wall_secs: if lines.is_empty() {
                0.0
            } else {
                total_wall_secs / lines.len() as f64
            },
            total_wall_secs,
            sim_hours: lines.iter().map(|l| l.sim_hours).sum(),
            coverage,
            converged: converged.len(),
            converged_worst_hours: converged.iter().copied().fold(0.0, f64::max),
            traces: lines.iter().map(|l| (l.seed, l.trace.clone())).collect(),
        }
    }

    /// The summary with the figures of wall time left out: what two runs of the same
    /// seeds must agree on.
    pub fn without_wall_times(&self) -> Summary {
        Summary {
            slowest: None,
            mean_wall_secs: 0.0,
            total_wall_secs: 0.0,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seed: u64, ok: bool, wall_secs: f64) -> SeedLine {
        SeedLine {
            seed,
            image_gib_max: Some(0.06),
            ok,
            failures: if ok {
                vec![]
            } else {
                vec![format!("invariant 4 at seed {seed}")]
            },
            losses_beyond_budget: 0,
            wall_secs,
            sim_hours: 48.0,
            trace: format!("{seed:016x}"),
            converged_after_hours: Some(1.0),
            coverage: [
                ("old_disks".to_string(), seed % 2),
                ("lie_caught_after_secs_max".to_string(), seed),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cairn-sim-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn a_line_cut_short_by_a_kill_is_dropped_and_the_next_append_starts_clean() {
        let path = temp_path("cut.jsonl");
        let mut ledger = Ledger::open(&path, Some(0.06)).expect("opens");
        ledger.append(line(1, true, 2.0)).expect("appends");
        drop(ledger);
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("reopens");
        file.write_all(br#"{"seed":2,"image_gib"#)
            .expect("writes half a line");
        drop(file);
        let mut ledger = Ledger::open(&path, Some(0.06)).expect("opens again");
        assert!(ledger.holds(1) && !ledger.holds(2));
        ledger.append(line(2, false, 3.0)).expect("appends");
        let lines = read(&path).expect("reads");
        assert_eq!(lines, vec![line(1, true, 2.0), line(2, false, 3.0)]);
    }

    #[test]
    fn a_ledger_of_other_settings_is_refused() {
        let path = temp_path("settings.jsonl");
        let mut ledger = Ledger::open(&path, Some(0.06)).expect("opens");
        ledger.append(line(1, true, 2.0)).expect("appends");
        drop(ledger);
        let error = Ledger::open(&path, None).err().expect("refused");
        assert!(
            error.to_string().contains("--image-gib-max Some(0.06)"),
            "{error}"
        );
    }

    #[test]
    fn shards_merge_to_the_summary_of_one_run() {
        let all: Vec<SeedLine> = (1..=6).map(|s| line(s, s != 4, s as f64)).collect();
        let (first, second) = all.split_at(2);
        // Shards given in any order, one seed given twice.
        let mut merged: Vec<SeedLine> = second.to_vec();
        merged.extend_from_slice(first);
        merged.push(line(3, true, 3.0));
        let summary = Summary::of(&merged);
        assert_eq!(summary, Summary::of(&all));
        assert_eq!(summary.seeds, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            summary.failures,
            vec![(4, vec!["invariant 4 at seed 4".to_string()])]
        );
        assert_eq!(summary.slowest, Some((6, 6.0)));
        assert_eq!(summary.mean_wall_secs, 3.5);
        assert_eq!(summary.coverage["old_disks"], (3, 3));
        assert_eq!(summary.coverage["lie_caught_after_secs_max"], (6, 6));
    }
}
