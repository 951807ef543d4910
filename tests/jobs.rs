//! Backup jobs run by the node (`[[backup]]` in node.toml): a job on "every 10s" runs,
//! applies its keep and shows in status; a failing `before` hook fails the run and leaves
//! no snapshot; a source that grows while it is read fails cleanly; a node killed mid-run
//! records the run as interrupted and runs the job again; `status --check` names each
//! problem. Loopback only; every wait is bounded.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cairn::mesh::{image_status, scenario, utf8, wait_for, Mesh, Node};
use cairn::{random_bytes, write};

/// A site of one node running `config` as its node.toml.
fn lone_node(root: &Path, config: &str, step: &mut dyn FnMut(&str)) -> Result<Mesh> {
    let mut mesh = Mesh::build(root, 1, 1, step)?;
    let node = &mut mesh.sites[0][0];
    node.stop();
    std::fs::write(node.data_dir.join("node.toml"), config)?;
    node.start(&[])?;
    Ok(mesh)
}

fn job(status: &serde_json::Value, image: &str) -> Result<serde_json::Value> {
    status["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["image"] == image)
        .cloned()
        .with_context(|| format!("status lists job {image}: {status}"))
}

fn snapshots(node: &Node, image: &str) -> Result<Vec<serde_json::Value>> {
    let list: serde_json::Value = serde_json::from_str(&node.ok(&["snapshots", "--json"])?)?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["image"] == image)
        .cloned()
        .collect())
}

fn check(node: &Node, extra: &[&str]) -> Output {
    let mut args = vec!["status", "--check"];
    args.extend_from_slice(extra);
    node.run(&args)
}

fn lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_job_every_10s_runs_applies_its_keep_and_shows_in_status() {
    scenario("jobs-every", |root, step| {
        let image = root.join("fs.img");
        write(&image, &random_bytes(3 << 20, 1));
        let config = format!(
            "[[backup]]\nimage = \"fs\"\nsource = \"{}\"\nschedule = \"every 10s\"\nkeep = {{ last = 2 }}\nafter = \"echo after: $CAIRN_RESULT\"\n",
            utf8(&image)?
        );
        let mesh = lone_node(root, &config, step)?;
        let node = &mesh.sites[0][0];
        step("node running with one job");
        wait_for(Duration::from_secs(60), "three runs of the job", || {
            Ok(job(&node.status()?, "fs")?["runs"].as_u64() >= Some(3))
        })?;
        let status = node.status()?;
        let fs = job(&status, "fs")?;
        step(&format!("after three runs: {fs}"));
        let last = &fs["last_run"];
        ensure!(last["result"] == "ok", "{fs}");
        ensure!(last["bytes"] == 3 << 20, "{fs}");
        ensure!(last["hooks"][0]["output_tail"] == "after: ok\n", "{fs}");
        ensure!(fs["failures"] == 0 && fs["schedule"] == "every 10s", "{fs}");
        ensure!(fs["period_ms"] == 10_000, "{fs}");
        let next = fs["next_run_unix_ms"].as_u64().context("a next run")?;
        let now = status["now_unix_ms"].as_u64().context("now")?;
        ensure!(next <= now + 10_000, "next run within a period: {fs}");
        ensure!(
            fs["newest_at_r_unix_ms"].is_u64(),
            "a lone site's snapshot counts: {fs}"
        );
        // keep = { last = 2 }: three runs leave two snapshots.
        let kept = snapshots(node, "fs")?;
        ensure!(kept.len() == 2, "keep last 2 after 3 runs: {kept:?}");
        ensure!(
            kept.iter().any(|s| {
                let (id, short) = (s["snapshot"].as_str(), last["snapshot"].as_str());
                id.zip(short)
                    .is_some_and(|(id, short)| id.starts_with(short))
            }),
            "the last run's snapshot is kept: {kept:?} {last}"
        );
        let text = node.ok(&["status"])?;
        let row = text
            .lines()
            .find(|l| l.starts_with("fs ") && l.contains("every 10s"))
            .with_context(|| format!("a job row in:\n{text}"))?;
        ensure!(row.contains(" ok "), "{row}");
        let healthy = check(node, &[]);
        ensure!(
            healthy.status.code() == Some(0) && healthy.stdout.is_empty(),
            "a healthy node checks silently: {healthy:?}"
        );
        // The source goes: the runs fail, and the newest snapshot ages past twice the
        // period.
        std::fs::remove_file(&image)?;
        let mut seen = Vec::new();
        let named = wait_for(
            Duration::from_secs(60),
            "--check to name both problems",
            || {
                let out = check(node, &[]);
                let found = lines(&out);
                seen = found.clone();
                let has = |prefix: &str, part: &str| {
                    found
                        .iter()
                        .any(|l| l.starts_with(prefix) && l.contains(part))
                };
                Ok(out.status.code() == Some(1)
                    && has("job fs: its last run", "failed: cannot read")
                    && has(
                        "job fs: its newest snapshot at R sites is",
                        "more than twice its period (10s)",
                    ))
            },
        );
        named.with_context(|| format!("--check said {seen:?}"))?;
        Ok(())
    });
}

#[test]
fn a_failing_before_hook_fails_the_run_and_leaves_no_snapshot() {
    scenario("jobs-hook", |root, step| {
        let image = root.join("fs.img");
        write(&image, &random_bytes(1 << 20, 2));
        let after_mark = root.join("after-ran");
        let copy = root.join("lv-snap.img");
        let mut config = format!(
            "[[backup]]\nimage = \"fs\"\nsource = \"{}\"\nschedule = \"daily 02:00\"\nbefore = \"echo no volume group vg0; exit 3\"\nafter = \"touch {}\"\n",
            utf8(&image)?,
            utf8(&after_mark)?
        );
        // A dump that fails half-way, one that works, and an LVM-like snapshot made by
        // `before`, read through `source_during` and removed by `after`.
        config += "[[backup]]\nimage = \"db\"\nsource_command = \"printf partial; echo dump failed >&2; exit 4\"\nschedule = \"daily 02:00\"\n";
        config += &format!(
            "[[backup]]\nimage = \"db2\"\nsource_command = \"cat {}\"\nschedule = \"daily 02:00\"\n",
            utf8(&image)?
        );
        config += &format!(
            "[[backup]]\nimage = \"lv\"\nsource = \"{0}\"\nschedule = \"daily 02:00\"\nbefore = \"head -c 65536 {0} > {1}\"\nsource_during = \"{1}\"\nafter = \"rm {1}\"\n",
            utf8(&image)?,
            utf8(&copy)?
        );
        let mesh = lone_node(root, &config, step)?;
        let node = &mesh.sites[0][0];
        wait_for(
            Duration::from_secs(30),
            "the first run of each job to end",
            || {
                let status = node.status()?;
                for image in ["fs", "db", "db2", "lv"] {
                    if job(&status, image)?["runs"].as_u64() < Some(1) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        let status = node.status()?;
        let db = job(&status, "db")?;
        ensure!(db["last_run"]["result"] == "failed", "{db}");
        let error = db["last_run"]["error"].as_str().unwrap_or_default();
        ensure!(
            error.contains("source_command exit status: 4: dump failed"),
            "{db}"
        );
        ensure!(
            snapshots(node, "db")?.is_empty(),
            "a failed dump makes no snapshot"
        );
        let db2 = job(&status, "db2")?;
        ensure!(
            db2["last_run"]["result"] == "ok" && db2["last_run"]["bytes"] == 1 << 20,
            "{db2}"
        );
        let lv = job(&status, "lv")?;
        ensure!(lv["last_run"]["result"] == "ok", "{lv}");
        let lv_snapshots = snapshots(node, "lv")?;
        ensure!(
            lv_snapshots.len() == 1 && lv_snapshots[0]["size_bytes"] == 65536,
            "source_during was read, not source: {lv_snapshots:?}"
        );
        ensure!(!copy.exists(), "after removed the copy");
        let fs = job(&status, "fs")?;
        step(&format!("{fs}"));
        let last = &fs["last_run"];
        ensure!(last["result"] == "failed", "{fs}");
        ensure!(
            last["error"] == "the before hook exited with status 3: no volume group vg0",
            "{fs}"
        );
        ensure!(last["hooks"][0]["exit_code"] == 3, "{fs}");
        ensure!(last["snapshot"].is_null() && fs["failures"] == 1, "{fs}");
        ensure!(snapshots(node, "fs")?.is_empty(), "no snapshot");
        ensure!(
            !after_mark.exists(),
            "after runs only once before succeeded"
        );
        // Retried after a minute, not on the next 02:00.
        let retry = fs["next_run_unix_ms"].as_u64().context("next run")?;
        let ended =
            last["start_unix_ms"].as_u64().unwrap_or(0) + last["duration_ms"].as_u64().unwrap_or(0);
        ensure!(retry == ended + 60_000, "retry in 1 min: {fs}");
        let out = check(node, &[]);
        let problems = lines(&out);
        ensure!(out.status.code() == Some(1), "{out:?}");
        let problems: Vec<&String> = problems
            .iter()
            .filter(|l| l.starts_with("job fs:"))
            .collect();
        ensure!(
            problems.len() == 1
                && problems[0].starts_with("job fs: its last run (")
                && problems[0]
                    .ends_with("failed: the before hook exited with status 3: no volume group vg0"),
            "{problems:?}"
        );
        Ok(())
    });
}

#[test]
fn a_source_that_grows_mid_read_fails_cleanly() {
    scenario("jobs-grow", |root, step| {
        let image = root.join("fs.img");
        write(&image, &random_bytes(64 << 20, 3));
        // The before hook leaves a writer appending a byte every 10 ms (for at most 30 s),
        // so the 64 MiB read sees the file grow.
        let grow = format!(
            "setsid sh -c 'i=0; while [ $i -lt 3000 ]; do printf x >> {0}; sleep 0.01; i=$((i+1)); done' </dev/null >/dev/null 2>&1 & sleep 0.2",
            utf8(&image)?
        );
        let config = format!(
            "[[backup]]\nimage = \"fs\"\nsource = \"{}\"\nschedule = \"daily 02:00\"\nbefore = \"{}\"\n",
            utf8(&image)?,
            grow.replace('"', "\\\"")
        );
        let mesh = lone_node(root, &config, step)?;
        let node = &mesh.sites[0][0];
        wait_for(Duration::from_secs(60), "the first run to end", || {
            Ok(job(&node.status()?, "fs")?["runs"].as_u64() >= Some(1))
        })?;
        let fs = job(&node.status()?, "fs")?;
        step(&format!("{fs}"));
        ensure!(fs["last_run"]["result"] == "failed", "{fs}");
        let error = fs["last_run"]["error"].as_str().unwrap_or_default();
        ensure!(error.contains("changed size while it was read"), "{fs}");
        ensure!(snapshots(node, "fs")?.is_empty(), "no snapshot");
        // The node is fine: a typed backup of a still file works.
        let still = root.join("still.img");
        write(&still, &random_bytes(1 << 20, 4));
        node.ok(&["backup", "other", utf8(&still)?])?;
        Ok(())
    });
}

#[test]
fn a_node_killed_mid_run_records_it_interrupted_and_runs_the_job_again() {
    scenario("jobs-restart", |root, step| {
        let image = root.join("fs.img");
        write(&image, &random_bytes(1 << 20, 5));
        let slow = format!(
            "[[backup]]\nimage = \"fs\"\nsource = \"{}\"\nschedule = \"every 10s\"\nbefore = \"sleep 20\"\n",
            utf8(&image)?
        );
        let mut mesh = lone_node(root, &slow, step)?;
        let node = &mut mesh.sites[0][0];
        wait_for(Duration::from_secs(30), "the run to start", || {
            Ok(job(&node.status()?, "fs")?["running_since_unix_ms"].is_u64())
        })?;
        node.kill();
        step("killed mid-run");
        let fast = slow.replace("sleep 20", "true");
        std::fs::write(node.data_dir.join("node.toml"), fast)?;
        node.start(&[])?;
        let fs = job(&node.status()?, "fs")?;
        step(&format!("after the restart: {fs}"));
        ensure!(
            fs["last_run"]["result"] == "interrupted" || fs["runs"].as_u64() >= Some(2),
            "{fs}"
        );
        wait_for(Duration::from_secs(40), "the job to run again", || {
            Ok(job(&node.status()?, "fs")?["last_run"]["result"] == "ok")
        })?;
        let fs = job(&node.status()?, "fs")?;
        ensure!(
            fs["failures"] == 1 && fs["runs"] == 2,
            "one interrupted, one ok: {fs}"
        );
        ensure!(snapshots(node, "fs")?.len() == 1, "one snapshot");
        Ok(())
    });
}

#[test]
fn check_names_an_old_snapshot_data_below_r_and_an_unseen_partner() {
    scenario("jobs-check", |root, step| {
        let mut mesh = Mesh::build(root, 2, 1, step)?;
        let image = root.join("fs.img");
        write(&image, &random_bytes(1 << 20, 6));
        mesh.sites[1][0].stop();
        step("site B stopped");
        // A job that made a snapshot once and now fails (its source is gone).
        let config = format!(
            "[[backup]]\nimage = \"fs\"\nsource = \"{}\"\nschedule = \"every 2s\"\n",
            utf8(&image)?
        );
        let node = &mut mesh.sites[0][0];
        node.stop();
        std::fs::write(node.data_dir.join("node.toml"), config)?;
        node.start(&[])?;
        wait_for(Duration::from_secs(30), "a snapshot", || {
            Ok(!snapshots(node, "fs")?.is_empty())
        })?;
        std::fs::remove_file(&image)?;
        let status = node.status()?;
        let fs_image = image_status(&status, "fs").context("image row")?;
        ensure!(
            fs_image["below_target_since_unix_ms"].is_u64(),
            "{fs_image}"
        );
        // Thresholds as in production: none of the time-based problems yet.
        let out = check(node, &[]);
        let default_lines = lines(&out);
        ensure!(
            !default_lines
                .iter()
                .any(|l| l.starts_with("image ") || l.starts_with("partner ")),
            "{default_lines:?}"
        );
        // With short thresholds each condition is named; site B never took a copy, so
        // no snapshot is at R, which the node names once it is up twice the period.
        let mut seen = Vec::new();
        let named = wait_for(Duration::from_secs(30), "every problem named", || {
            let out = check(
                node,
                &["--check-below-r-after", "1s", "--check-unseen-after", "2s"],
            );
            let found = lines(&out);
            seen = found.clone();
            let has = |prefix: &str, part: &str| {
                found
                    .iter()
                    .any(|l| l.starts_with(prefix) && l.contains(part))
            };
            Ok(out.status.code() == Some(1)
                && has("job fs: its last run", "failed")
                && has(
                    "job fs: no snapshot at R sites yet",
                    "twice its period is 4s",
                )
                && has("image fs: below R (", "of copies missing")
                && has("partner \"Office B\": not seen for", "(last "))
        });
        named.with_context(|| format!("--check said {seen:?}"))?;
        let out = check(
            node,
            &["--check-below-r-after", "1s", "--check-unseen-after", "2s"],
        );
        step(&format!(
            "--check says:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ));
        let metrics_lines = lines(&out);
        ensure!(
            metrics_lines.len() == 4,
            "one line per problem: {metrics_lines:?}"
        );
        Ok(())
    });
}

#[test]
fn node_run_refuses_a_bad_job_in_one_line_naming_the_job_and_the_key() {
    let site = cairn::Site::new();
    for (job, expected) in [
        (
            "image = \"fs\"\nsourc = \"/x\"\nschedule = \"hourly\"",
            "error: [[backup]] job \"fs\": unknown key \"sourc\"",
        ),
        (
            "image = \"fs\"\nsource = \"/x\"\nschedule = \"at two\"",
            "error: [[backup]] job \"fs\": schedule: \"at two\" is not a schedule",
        ),
        (
            "image = \"fs\"\nsource = \"/x\"\nschedule = \"hourly\"\nkeep = { last = \"seven\" }",
            "error: [[backup]] job \"fs\": keep.last: \"seven\" is not a count",
        ),
    ] {
        std::fs::write(
            site.data_dir().join("node.toml"),
            format!("[[backup]]\n{job}\n"),
        )
        .unwrap();
        let line = site.fails(&["node", "run", "--no-mdns", "--listen", "127.0.0.1:0"]);
        assert!(line.starts_with(expected), "{line}");
    }
}

/// True when `tool --version` runs; a test that needs it says why it returns early.
fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_qcow2_source_is_backed_up_as_the_guest_sees_it() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("skipped: qemu-img or qemu-io is missing (Debian: apt-get install qemu-utils)");
        return;
    }
    scenario("jobs-qcow2", |root, step| {
        let disk = root.join("vm.qcow2");
        let run = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()?;
            ensure!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            utf8(&disk)?,
            "64M",
        ])?;
        run(&[
            "qemu-io",
            "-c",
            "write -P 0x61 1M 256k",
            "-c",
            "write -P 0x62 40M 64k",
            utf8(&disk)?,
        ])?;
        let guest = root.join("guest.raw");
        run(&[
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            utf8(&disk)?,
            utf8(&guest)?,
        ])?;
        let config = format!(
            "[[backup]]\nimage = \"vm\"\nsource = \"{}\"\nschedule = \"daily 02:00\"\n",
            utf8(&disk)?
        );
        let mesh = lone_node(root, &config, step)?;
        let node = &mesh.sites[0][0];
        wait_for(Duration::from_secs(30), "the run to end", || {
            Ok(job(&node.status()?, "vm")?["runs"].as_u64() >= Some(1))
        })?;
        let vm = job(&node.status()?, "vm")?;
        ensure!(vm["last_run"]["result"] == "ok", "{vm}");
        ensure!(
            vm["last_run"]["bytes"] == 64 << 20,
            "the guest's size, not the file's: {vm}"
        );
        let restored = root.join("restored.raw");
        node.ok(&["restore", "vm", utf8(&restored)?])?;
        cairn::assert_same_file(&guest, &restored);
        ensure!(
            !node.data_dir.join("job-scratch/vm.raw").exists(),
            "the guest view is removed after the run"
        );
        Ok(())
    });
}
