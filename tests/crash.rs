//! A backup killed with SIGKILL at any point leaves a store that opens cleanly, lists no
//! half-made snapshot, verifies, and reuses what was already stored when the backup runs
//! again. A restore killed midway resumes from its partial file.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cairn::{assert_same_file, random_bytes, write, Site};

const MIB: usize = 1 << 20;

fn packs_bytes(site: &Site) -> u64 {
    let dir = site.data_dir().join("store/packs");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// After a kill: the store opens, holds only complete snapshots, verifies clean, and a
/// re-run of the backup stores only what was not stored before.
fn check_after_kill(site: &Site, image: &str, source: &std::path::Path, expect_reuse: bool) {
    let listed: serde_json::Value =
        serde_json::from_str(&site.ok(&["snapshots", "--json"])).unwrap();
    for row in listed.as_array().unwrap() {
        assert_ne!(
            row["image"], image,
            "a killed backup left a snapshot: {row}"
        );
    }
    assert!(
        site.run(&["verify"]).status.success(),
        "verify fails after a kill"
    );
    let summary = site.backup(image, source);
    let (n_chunks, n_new) = (
        summary["n_chunks"].as_u64().unwrap(),
        summary["n_chunks_new"].as_u64().unwrap(),
    );
    if expect_reuse {
        assert!(n_new < n_chunks, "nothing reused after the kill: {summary}");
    }
    let out = site.path(&format!("{image}.out"));
    site.ok(&["restore", image, out.to_str().unwrap(), "--force"]);
    assert_same_file(source, &out);
    assert!(site.run(&["verify"]).status.success());
}

#[test]
fn a_backup_killed_mid_stream_is_recovered_and_reused() {
    let site = Site::new();
    let bytes = random_bytes(48 * MIB, 77);
    let source = site.path("big.img");
    write(&source, &bytes);

    let mut child = site
        .command(&["backup", "big", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Two full segments go in; the third never completes, so the backup cannot finish.
    stdin.write_all(&bytes[..40 * MIB]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while packs_bytes(&site) < 12 * MIB as u64 {
        assert!(
            Instant::now() < deadline,
            "the backup never wrote its first chunks"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(stdin);
    check_after_kill(&site, "big", &source, true);
}

#[test]
fn backups_killed_at_many_instants_never_damage_the_store() {
    let site = Site::new();
    let keep = site.path("keep.img");
    write(&keep, &random_bytes(2 * MIB, 1));
    site.backup("keep", &keep);
    let source = site.path("victim.img");
    write(&source, &random_bytes(64 * MIB, 2));
    // Time one whole backup of such a source elsewhere, then kill at points spread over
    // that time: at start-up, while chunking, while committing.
    let scratch = Site::new();
    let started = Instant::now();
    scratch.backup("victim", &source);
    let full = started.elapsed();
    let mut n_killed = 0;
    let mut seed = 100;
    for percent in [0u32, 10, 25, 40, 55, 70, 85, 95] {
        // One timing cannot be trusted on a loaded or cold machine: a backup that beats
        // its kill is retried with a shorter delay, so every instant gets its kill.
        let mut delay = full * percent / 100;
        for _attempt in 0..4 {
            // New bytes every time: a source the store already holds would back up by
            // deduplication alone, far faster than the measured time.
            seed += 1;
            write(&source, &random_bytes(64 * MIB, seed));
            if kill_backup_after(&site, &source, delay) {
                n_killed += 1;
                // Whatever was written, the old snapshot restores and verify passes.
                let out = site.path("keep.out");
                site.ok(&["restore", "keep", out.to_str().unwrap(), "--force"]);
                assert_same_file(&keep, &out);
                assert!(
                    site.run(&["verify"]).status.success(),
                    "verify fails after a kill at {delay:?} ({percent}% of {full:?})"
                );
                break;
            }
            delay = delay * 6 / 10;
        }
    }
    assert!(
        n_killed >= 7,
        "only {n_killed} of 8 kill instants landed before the backup finished ({full:?} each)"
    );
    // And a final, uninterrupted run restores exactly.
    let out = site.path("victim.out");
    site.backup("victim", &source);
    site.ok(&["restore", "victim", out.to_str().unwrap()]);
    assert_same_file(&source, &out);
}

/// Starts a backup, kills it after `delay`, and checks the snapshot count: one more if it
/// finished first, unchanged if it was killed. Returns whether it was killed.
fn kill_backup_after(site: &Site, source: &std::path::Path, delay: Duration) -> bool {
    let count = || {
        site.ok(&["snapshots", "--json"])
            .matches("\"victim\"")
            .count()
    };
    let n_before = count();
    let mut child = site
        .command(&["backup", "victim", source.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let finished = child.wait().unwrap().success();
    let n_after = count();
    if finished {
        assert_eq!(n_after, n_before + 1, "a finished backup made one snapshot");
    } else {
        assert_eq!(n_after, n_before, "a killed backup left a snapshot");
    }
    !finished
}

#[test]
fn a_restore_killed_midway_resumes_where_it_stopped() {
    let site = Site::new();
    let source = site.path("big.img");
    write(&source, &random_bytes(128 * MIB, 31));
    site.backup("big", &source);
    let out = site.path("big.out");
    let partial = site.path("big.out.cairn-partial");
    let allocated = || std::fs::metadata(&partial).map_or(0, |m| m.blocks() * 512);
    // Kill once some of it is written; a restore that wins the race is run again.
    let mut killed = false;
    for _attempt in 0..5 {
        let _ = std::fs::remove_file(&out);
        let mut child = site
            .command(&["restore", "big", out.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        while allocated() < 8 * MIB as u64 && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        if !child.wait().unwrap().success() {
            killed = true;
            break;
        }
    }
    assert!(killed, "every restore finished before it could be killed");
    assert!(
        !out.exists(),
        "a killed restore left a file that looks whole"
    );
    let kept = allocated();
    assert!(kept > 0);

    let summary: serde_json::Value =
        serde_json::from_str(&site.ok(&["restore", "big", out.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_same_file(&source, &out);
    assert!(!partial.exists());
    let resumed = summary["resumed_bytes"].as_u64().unwrap();
    let local = summary["local_bytes"].as_u64().unwrap();
    assert!(resumed > 0 && local > 0, "{summary}");
    assert_eq!(resumed + local, 128 * MIB as u64, "{summary}");
}
