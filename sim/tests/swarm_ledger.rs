//! `cairn-sim swarm --out`: a swarm stopped part way (here: after its first seed, while
//! writing the next line) and run again into the same file ends with the same seeds,
//! verdicts and traces as one run, and runs no seed twice.

use std::io::Write;

use cairn_sim::swarm::{read_ledger, run_into, Ledger, Summary};

/// Quick seeds (about 5 s each at 60 MiB in a release build), cut further.
const FIRST_SEED: u64 = 24;
const SEEDS: u64 = 3;
const CAP: Option<f64> = Some(0.02);

#[test]
fn a_swarm_stopped_and_run_again_into_its_file_gives_the_summary_of_one_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let whole_path = dir.path().join("whole.jsonl");
    let halves_path = dir.path().join("halves.jsonl");

    let mut whole = Ledger::open(&whole_path, CAP).expect("opens");
    let one_run = run_into(&mut whole, FIRST_SEED, SEEDS, 2, CAP, false).expect("runs");
    assert_eq!(one_run.len(), SEEDS as usize);

    // The first seed, then a kill while the next line was half written.
    let mut halves = Ledger::open(&halves_path, CAP).expect("opens");
    run_into(&mut halves, FIRST_SEED, 1, 1, CAP, false).expect("runs");
    drop(halves);
    let first_line = std::fs::read_to_string(&halves_path).expect("reads");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&halves_path)
        .expect("reopens");
    file.write_all(br#"{"seed":25,"image_gib_max":0.02,"ok":tr"#)
        .expect("writes half a line");
    drop(file);

    // Run again over the whole range: only the seeds not in the file run.
    let mut halves = Ledger::open(&halves_path, CAP).expect("opens again");
    assert!(halves.holds(FIRST_SEED) && !halves.holds(FIRST_SEED + 1));
    let resumed = run_into(&mut halves, FIRST_SEED, SEEDS, 2, CAP, false).expect("runs");
    let text = std::fs::read_to_string(&halves_path).expect("reads");
    assert!(
        text.starts_with(&first_line),
        "the seed run before the stop is kept as it was, not run again"
    );
    let on_disk = read_ledger(&halves_path).expect("reads");
    let mut seeds: Vec<u64> = on_disk.iter().map(|l| l.seed).collect();
    seeds.sort_unstable();
    assert_eq!(seeds, vec![24, 25, 26], "each seed once, the cut line gone");

    let whole_summary = Summary::of(&one_run);
    let resumed_summary = Summary::of(&resumed);
    assert_eq!(
        resumed_summary.without_wall_times(),
        whole_summary.without_wall_times()
    );
    assert_eq!(resumed_summary.seeds, vec![24, 25, 26]);
    assert!(whole_summary.traces.values().all(|t| t.len() == 64));
    // The two files as shards merge to the same summary too.
    let mut both = read_ledger(&whole_path).expect("reads");
    both.extend(on_disk);
    assert_eq!(
        Summary::of(&both).without_wall_times(),
        whole_summary.without_wall_times()
    );
}
