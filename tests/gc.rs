//! Retention and garbage collection with real processes (docs/retention.md): forget and
//! prune at the owner give space back at the partners after their grace, and the kept
//! snapshot still restores from the mesh on a fresh machine; an owner that burns before
//! its word reaches anyone gets nothing collected; a prune killed at any step leaves a
//! store a rerun finishes.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cairn::mesh::{held_by_site, make_image, scenario, utf8, wait_at_r, wait_for, Mesh, Node};
use cairn::{assert_same_file, random_bytes, write, Site};

/// Seconds where offices wait a day: the owner asks 2 s, holders wait 2 s at least.
const FAST_GC: &str = "[gc]\ngrace = \"2s\"\ngrace_min = \"2s\"\n";

/// Restarts every node with `FAST_GC` in its node.toml.
fn fast_gc(mesh: &mut Mesh) -> Result<()> {
    for site in &mut mesh.sites {
        for node in site.iter_mut() {
            node.stop();
            std::fs::write(node.data_dir.join("node.toml"), FAST_GC)?;
            node.extra_args = vec!["--repack-interval".into(), "2s".into()];
        }
    }
    let addresses: Vec<String> = mesh.nodes().map(Node::address).collect();
    for site in &mut mesh.sites {
        for node in site.iter_mut() {
            let others: Vec<String> = addresses
                .iter()
                .filter(|a| **a != node.address())
                .cloned()
                .collect();
            node.start(&others)?;
        }
    }
    Ok(())
}

/// Waits until `forget fs --keep-last 1` would forget `n` snapshots: the node marks a
/// snapshot acknowledged a moment after status shows it at R, and forget keeps an
/// unacknowledged one.
fn wait_forgettable(node: &Node, n: u64) -> Result<()> {
    wait_for(
        Duration::from_secs(30),
        "the older snapshots acknowledged",
        || {
            let dry = node.ok(&["forget", "fs", "--keep-last", "1", "--dry-run", "--json"])?;
            Ok(serde_json::from_str::<serde_json::Value>(&dry)?["forgotten"] == n)
        },
    )
}

/// Bytes in a node's pack files.
fn packs_bytes(node: &Node) -> u64 {
    std::fs::read_dir(node.data_dir.join("store").join("packs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn prune_json(node: &Node) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&node.ok(&["prune", "--json"])?)?)
}

/// Three snapshots of one image at office A, each mostly new data, all at R; then
/// `forget --keep-last 1` and `prune` at A. Both partners' stores fall to about the kept
/// snapshot's chunks, A's own packs shrink, and a fresh machine recovered from A's key
/// restores the kept snapshot byte for byte from the mesh.
#[test]
fn forget_and_prune_give_space_back_at_partners_and_the_kept_snapshot_restores() {
    scenario("gc-mesh", |root, step| {
        let mut mesh = Mesh::build(root, 3, 1, step)?;
        fast_gc(&mut mesh)?;
        step("every node restarted with a 2 s grace");
        let owner = &mesh.sites[0][0];
        let mut images = Vec::new();
        for seed in 0..3 {
            let image = make_image(root, &format!("fs{seed}.img"), 6, 10 * seed + 1);
            owner.ok(&["backup", "fs", utf8(&image)?])?;
            wait_at_r(owner, "fs", 120)?;
            images.push(image);
            std::thread::sleep(Duration::from_millis(5));
        }
        let held_before = [held_by_site(&mesh, 1, 0)?, held_by_site(&mesh, 2, 0)?];
        let packs_before = [
            packs_bytes(&mesh.sites[1][0]),
            packs_bytes(&mesh.sites[2][0]),
        ];
        step(&format!(
            "3 snapshots of 6 MiB at R; partners hold {held_before:?} chunks of A's"
        ));

        wait_forgettable(owner, 2)?;
        owner.ok(&["forget", "fs", "--keep-last", "1"])?;
        let report = prune_json(owner)?;
        let swept = report["swept"]["n_chunks"].as_u64().context("swept")?;
        let listed = report["listed_new"].as_u64().context("listed")?;
        ensure!(swept > 0 && listed >= swept, "prune at A: {report}");
        ensure!(
            report["pack_bytes_after"].as_u64() < report["pack_bytes_before"].as_u64(),
            "A's packs did not shrink: {report}"
        );
        step(&format!(
            "A forgot 2 snapshots and pruned: {swept} chunks dropped, {listed} listed"
        ));

        // Each partner keeps the kept snapshot's chunks (a third of what it held, give or
        // take the text half shared between snapshots) and gives the rest back.
        wait_for(
            Duration::from_secs(120),
            "the partners to give space back",
            || {
                for (i, holder) in [1, 2].into_iter().enumerate() {
                    let held = held_by_site(&mesh, holder, 0)?;
                    if held * 2 > held_before[i] {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        let held_after = [held_by_site(&mesh, 1, 0)?, held_by_site(&mesh, 2, 0)?];
        step(&format!("partners now hold {held_after:?} chunks of A's"));
        // And their disks give the bytes back: each node rewrites its packs every 2 s.
        wait_for(
            Duration::from_secs(60),
            "the partners' packs to shrink",
            || {
                Ok([1, 2].iter().all(|&s| {
                    let now = packs_bytes(&mesh.sites[s][0]);
                    now * 10 < packs_before[s - 1] * 7
                }))
            },
        )?;
        step(&format!(
            "partners' packs {packs_before:?} -> {:?} bytes",
            [
                packs_bytes(&mesh.sites[1][0]),
                packs_bytes(&mesh.sites[2][0])
            ]
        ));
        let kept_chunks = owner.status()?["images"][0]["chunks"].as_u64().unwrap_or(0);
        ensure!(
            held_after.iter().all(|h| *h >= kept_chunks),
            "a partner gave back a chunk of the kept snapshot: holds {held_after:?}, the kept snapshot has {kept_chunks}"
        );

        let recovered = mesh.recover_running(0, &root.join("a-new-machine"), "fs")?;
        let listed = recovered.ok(&["snapshots", "fs", "--json"])?;
        let listed: serde_json::Value = serde_json::from_str(&listed)?;
        ensure!(
            listed.as_array().map(Vec::len) == Some(1),
            "the recovered site should know only the kept snapshot: {listed}"
        );
        let restored = root.join("restored.img");
        recovered.ok(&["restore", "fs", utf8(&restored)?])?;
        assert_same_file(&images[2], &restored);
        step("a fresh machine recovered A and restored the kept snapshot byte for byte");
        Ok(())
    });
}

/// Office A forgets and prunes while its node is stopped, then burns before its node
/// runs again: no partner ever hears its word, so nothing of A's is collected.
#[test]
fn an_owner_that_burns_before_its_forget_reaches_anyone_loses_nothing_at_partners() {
    scenario("gc-burnt-owner", |root, step| {
        let mut mesh = Mesh::build(root, 3, 1, step)?;
        fast_gc(&mut mesh)?;
        let image = make_image(root, "fs0.img", 4, 1);
        mesh.sites[0][0].ok(&["backup", "fs", utf8(&image)?])?;
        wait_at_r(&mesh.sites[0][0], "fs", 120)?;
        let image = make_image(root, "fs1.img", 4, 2);
        mesh.sites[0][0].ok(&["backup", "fs", utf8(&image)?])?;
        wait_at_r(&mesh.sites[0][0], "fs", 120)?;
        wait_forgettable(&mesh.sites[0][0], 1)?;
        let held_before = [held_by_site(&mesh, 1, 0)?, held_by_site(&mesh, 2, 0)?];

        let owner = &mut mesh.sites[0][0];
        owner.stop();
        owner.ok(&["forget", "fs", "--keep-last", "1"])?;
        let report = prune_json(owner)?;
        ensure!(
            report["listed_new"].as_u64() > Some(0),
            "the stopped owner's prune lists garbage: {report}"
        );
        std::fs::remove_dir_all(&owner.data_dir)?;
        step("A forgot, pruned with its node stopped, and burnt");

        // Many graces and tidy walks pass; the partners hold on.
        std::thread::sleep(Duration::from_secs(25));
        let held_after = [held_by_site(&mesh, 1, 0)?, held_by_site(&mesh, 2, 0)?];
        ensure!(
            held_after == held_before,
            "partners deleted a burnt owner's chunks on silence: {held_before:?} -> {held_after:?}"
        );
        step(&format!("partners still hold {held_after:?} chunks of A's"));
        Ok(())
    });
}

/// `cairn prune` killed (abort, as kill -9) at each step of its pack rewrite and its
/// sweep; each rerun finishes, and the kept snapshot restores byte for byte.
#[test]
fn a_prune_killed_at_any_step_is_finished_by_a_rerun() {
    // (`sweep-batch` needs a sweep of more than one batch, 4096 ids: the store unit tests
    // cover it.)
    for crash_at in ["repack-copied", "repack-committed", "repack-unlinked"] {
        let site = Site::new();
        let image = site.path("fs.img");
        let mut kept = Vec::new();
        for seed in 0..3 {
            kept = random_bytes(3 << 20, seed);
            write(&image, &kept);
            site.backup("fs", &image);
            std::thread::sleep(Duration::from_millis(5));
        }
        site.ok(&["forget", "fs", "--keep-last", "1"]);
        let crashed = site
            .command(&["prune"])
            .env("CAIRN_TEST_CRASH_AT", crash_at)
            .output()
            .expect("cairn runs");
        assert!(
            !crashed.status.success(),
            "{crash_at}: the prune should have died there"
        );
        let rerun: serde_json::Value =
            serde_json::from_str(&site.ok(&["prune", "--json"])).unwrap();
        assert!(
            rerun["pack_bytes_after"].as_u64() < Some(3 * (3 << 20)),
            "{crash_at}: the rerun left the store at {rerun}"
        );
        site.ok(&["verify"]);
        let restored = site.path("restored");
        site.ok(&["restore", "fs", restored.to_str().unwrap()]);
        assert_eq!(std::fs::read(&restored).unwrap(), kept, "{crash_at}");
        let again: serde_json::Value =
            serde_json::from_str(&site.ok(&["prune", "--json"])).unwrap();
        assert_eq!(again["swept"]["n_chunks"], 0, "{crash_at}: {again}");
    }
}
