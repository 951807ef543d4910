//! cairn-sim: run scenarios, swarms of seeds, and benchmarks of the replication engine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use cairn_sim::{bench, swarm, Report, Run, Scenario};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cairn-sim",
    version,
    about = "Deterministic simulation of the cairn mesh: the real replication engine on a virtual network, with faults, checked against the mesh's invariants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario with one seed and check every invariant.
    Run {
        /// Scenario file (sim/scenarios/*.toml); the built-in four-offices one if absent.
        #[arg(long, conflicts_with = "swarm")]
        scenario: Option<PathBuf>,
        /// Use the scenario swarm testing draws from this seed.
        #[arg(long)]
        swarm: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Run twice and compare the hashes of the two event traces.
        #[arg(long)]
        check_determinism: bool,
        /// With --swarm: cut every image to at most this size.
        #[arg(long, requires = "swarm")]
        image_gib_max: Option<f64>,
    },
    /// Run many seeds, each with its own scenario and fault mix, on every core.
    Swarm {
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        /// Threads; all cores by default.
        #[arg(long)]
        jobs: Option<usize>,
        /// Cut every image to at most this size (quick runs).
        #[arg(long)]
        image_gib_max: Option<f64>,
        /// Append one JSON line per finished seed to FILE; a rerun with the same FILE
        /// skips the seeds it holds, so a stopped run continues where it was.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Run nothing: print the summary over these files of `--out` lines (shards).
        #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with = "out")]
        merge: Vec<PathBuf>,
    },
    /// Print the scenario swarm testing draws from a seed.
    Show {
        #[arg(long)]
        seed: u64,
        /// Cut every image of the swarm's scenario to at most this size.
        #[arg(long)]
        image_gib_max: Option<f64>,
    },
    /// Measure the engine and the mesh and print the numbers.
    Bench {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Node counts for the gossip-spread measurement.
        #[arg(long, value_delimiter = ',', default_values_t = vec![50, 200, 1000])]
        spread: Vec<usize>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Run {
            scenario,
            swarm,
            seed,
            check_determinism,
            image_gib_max,
        } => {
            let (loaded, replay) = load(scenario.as_ref(), swarm, seed, image_gib_max)?;
            let started = Instant::now();
            let report = Run::new(loaded.clone(), seed).execute();
            let wall = started.elapsed().as_secs_f64();
            print_report(&loaded, seed, &report, wall);
            if check_determinism {
                let again = Run::new(loaded, seed).execute();
                if again.trace_hash != report.trace_hash {
                    println!(
                        "NOT DETERMINISTIC: trace {} then {}",
                        report.trace_hash, again.trace_hash
                    );
                    println!("replay: {replay} --check-determinism");
                    return Ok(ExitCode::from(1));
                }
                println!("deterministic: two runs gave trace {}", report.trace_hash);
            }
            if !report.violations.is_empty() {
                println!("replay: {replay}");
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Swarm {
            seeds,
            first_seed,
            jobs,
            image_gib_max,
            out,
            merge,
        } => {
            if !merge.is_empty() {
                let mut lines = Vec::new();
                for path in &merge {
                    lines.extend(swarm::read_ledger(path)?);
                }
                let summary = swarm::Summary::of(&lines);
                print_swarm_summary(&summary, &merged_caps(&lines));
                return Ok(exit_for(&summary));
            }
            let jobs =
                jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let started = Instant::now();
            let lines = match &out {
                Some(path) => {
                    let mut ledger = swarm::Ledger::open(path, image_gib_max)?;
                    let held = (first_seed..first_seed + seeds)
                        .filter(|s| ledger.holds(*s))
                        .count();
                    if held > 0 {
                        eprintln!(
                            "{held} of the {seeds} seeds are in {} already: running the rest",
                            path.display()
                        );
                    }
                    swarm::run_into(&mut ledger, first_seed, seeds, jobs, image_gib_max, true)?
                }
                None => swarm::run_seeds(first_seed, seeds, jobs, image_gib_max, true)
                    .iter()
                    .map(|r| swarm::SeedLine::of(r, image_gib_max))
                    .collect(),
            };
            let summary = swarm::Summary::of(&lines);
            let cap = image_gib_max.map_or(String::new(), |g| format!(" --image-gib-max {g}"));
            print_swarm_summary(&summary, &cap);
            println!(
                "this run: {:.1} s on {jobs} threads",
                started.elapsed().as_secs_f64()
            );
            Ok(exit_for(&summary))
        }
        Command::Show {
            seed,
            image_gib_max,
        } => {
            println!(
                "{:#?}",
                swarm::scenario_for_seed_capped(seed, image_gib_max)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { seed, spread } => {
            let day = bench::one_day(seed);
            println!(
                "one simulated day, 12 nodes in 4 sites: {:.2} s wall (target < 10 s)",
                day.wall_secs
            );
            println!(
                "  {} events, {} engine calls, {} messages ({} dropped): {:.0} engine calls/s",
                day.events,
                day.engine_calls,
                day.messages,
                day.dropped,
                day.engine_calls as f64 / day.wall_secs
            );
            let by_type: Vec<String> = day
                .by_type
                .iter()
                .map(|(name, (n, bytes))| {
                    format!(
                        "{name} {n} ({:.1} MiB)",
                        *bytes as f64 / (1u64 << 20) as f64
                    )
                })
                .collect();
            println!("  messages by type: {}", by_type.join(", "));
            for n in spread {
                let started = Instant::now();
                let result = bench::spread(n, seed);
                let log2 = (n as f64).log2();
                let target = 2.0 * log2 + 5.0;
                match result.rounds {
                    Some(rounds) => println!(
                        "gossip spread to 99% of {n} nodes: {rounds} rounds; log2(N) = {log2:.1}, target <= {target:.1}; idle traffic {:.0} bytes per node per round ({:.1} s wall)",
                        result.idle_bytes_per_round,
                        started.elapsed().as_secs_f64()
                    ),
                    None => println!("gossip spread to 99% of {n} nodes: not reached in 200 rounds"),
                }
            }
            let repair = bench::repair(seed);
            println!(
                "repair after losing a site: {:.2} GiB to move, bandwidth bound {:.0} s",
                repair.bytes_to_move as f64 / (1u64 << 30) as f64,
                repair.bound_secs
            );
            match (repair.from_loss_secs, repair.from_dead_secs) {
                (Some(loss), Some(dead)) => println!(
                    "  back at R {loss:.0} s after the loss ({:.2}x the bound); {dead:.0} s after the site is declared dead ({:.0} s timeout): {:.2}x the bound (target <= 1.3x)",
                    loss / repair.bound_secs,
                    repair.dead_after_secs,
                    dead / repair.bound_secs
                ),
                _ => println!("  NOT back at R within 48 simulated hours"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(
    path: Option<&PathBuf>,
    swarm: bool,
    seed: u64,
    image_gib_max: Option<f64>,
) -> anyhow::Result<(Scenario, String)> {
    if swarm {
        let cap = image_gib_max.map_or(String::new(), |g| format!(" --image-gib-max {g}"));
        return Ok((
            swarm::scenario_for_seed_capped(seed, image_gib_max),
            format!("cairn-sim run --swarm --seed {seed}{cap}"),
        ));
    }
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read scenario {}", path.display()))?;
            let scenario = Scenario::parse(&text)
                .with_context(|| format!("scenario {} is not valid", path.display()))?;
            Ok((
                scenario,
                format!("cairn-sim run --scenario {} --seed {seed}", path.display()),
            ))
        }
        None => Ok((
            Scenario::parse(cairn_sim::DEFAULT_SCENARIO).expect("built-in scenario parses"),
            format!("cairn-sim run --seed {seed}"),
        )),
    }
}

/// The `--image-gib-max` of a replay command for seeds of merged ledgers (the first
/// line's; `swarm` keeps one value per ledger).
fn merged_caps(lines: &[swarm::SeedLine]) -> String {
    lines
        .first()
        .and_then(|l| l.image_gib_max)
        .map_or(String::new(), |g| format!(" --image-gib-max {g}"))
}

fn exit_for(summary: &swarm::Summary) -> ExitCode {
    if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Failures with their replay commands, the counts, the slowest and mean seed, and every
/// coverage counter summed over the seeds with how many seeds reached it; the rare paths
/// no seed reached are called out.
fn print_swarm_summary(summary: &swarm::Summary, cap: &str) {
    for (seed, violations) in &summary.failures {
        println!("seed {seed} FAILED:");
        for v in violations {
            println!("  {v}");
        }
        println!("  replay: cairn-sim run --swarm --seed {seed}{cap}");
    }
    let failed: Vec<String> = summary
        .failures
        .iter()
        .map(|(s, _)| s.to_string())
        .collect();
    println!(
        "{} seeds, {} failed{}, {} with losses beyond the fault budget",
        summary.seeds.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" (seeds {})", failed.join(", "))
        },
        summary.with_losses_beyond_budget,
    );
    if let Some((seed, secs)) = summary.slowest {
        println!(
            "slowest: seed {seed} in {secs:.1} s; mean {:.1} s a seed, {:.1} s of seed time for {:.0} simulated hours",
            summary.mean_wall_secs, summary.total_wall_secs, summary.sim_hours
        );
    }
    // In the counters' own order; a counter only an older ledger names comes last.
    let rows = cairn_sim::coverage::Coverage::default().rows();
    let known: Vec<(&str, bool)> = rows.iter().map(|(name, _, rare)| (*name, *rare)).collect();
    let extra = summary
        .coverage
        .keys()
        .filter(|name| !known.iter().any(|(k, _)| k == name))
        .map(|name| (name.as_str(), false));
    println!("coverage (total over seeds; seeds that reached it):");
    for (name, rare) in known.iter().copied().chain(extra) {
        let (n, seeds) = summary.coverage.get(name).copied().unwrap_or((0, 0));
        let flag = if rare && n == 0 {
            "  <- NEVER REACHED"
        } else {
            ""
        };
        println!("  {name:28} {n:>12} {seeds:>6}{flag}");
    }
    println!(
        "liveness: {} of {} seeds converged within the bound, the slowest {:.0} h after the heal",
        summary.converged,
        summary.seeds.len(),
        summary.converged_worst_hours
    );
}

fn print_report(scenario: &Scenario, seed: u64, report: &Report, wall_secs: f64) {
    println!(
        "scenario {} seed {seed}: {:.1} simulated hours in {wall_secs:.1} s",
        scenario.name, report.sim_hours
    );
    println!(
        "snapshots: {} taken, {} acknowledged at R = {}; {} restores byte-exact ({:.2} GiB)",
        report.snapshots_taken,
        report.snapshots_acked,
        scenario.replication_factor,
        report.restores_ok,
        report.restored_bytes as f64 / (1u64 << 30) as f64
    );
    for note in &report.notes {
        println!("  {note}");
    }
    match report.converged_after_hours {
        Some(h) => println!("liveness: converged and at R {h:.0} h into the liveness phase"),
        None => println!("liveness: not converged by the end of the liveness phase"),
    }
    for (excuse, n) in &report.excuses {
        match excuse.strip_prefix("records: ") {
            Some(excuse) => println!("  excused: {n} (node, record) pairs: {excuse}"),
            None => println!("  excused: {n} chunks: {excuse}"),
        }
    }
    let reached: Vec<String> = report
        .coverage
        .rows()
        .into_iter()
        .filter(|(_, n, _)| *n > 0)
        .map(|(name, n, _)| format!("{name} {n}"))
        .collect();
    println!("coverage: {}", reached.join(", "));
    for loss in &report.losses_beyond_budget {
        println!("LOSS BEYOND FAULT BUDGET: {loss}");
    }
    for violation in &report.violations {
        println!("VIOLATION: {violation}");
    }
    if report.violations.is_empty() {
        println!("all invariants held");
    }
    println!("trace {}", report.trace_hash);
}
