//! A `cairn backup` or `cairn restore` that runs inside the node stops when its command
//! goes away (SIGKILL) or is interrupted (Ctrl-C, which half-closes the control
//! connection and waits for the node's last word): either cancels the job. A
//! cancelled backup leaves no snapshot; a cancelled restore keeps `OUT.cairn-partial`,
//! which the next run resumes; the node logs both.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn::mesh::{wait_for, Mesh, Node};
use cairn::{assert_same_file, random_bytes, write};

#[test]
fn a_killed_command_cancels_its_backup_or_restore_inside_the_node() {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-cancel-")
        .tempdir()
        .expect("temp dir");
    let mut step = |what: &str| eprintln!("cancel: {what}");
    let outcome = Mesh::build(tmp.path(), 1, 1, &mut step).and_then(|mesh| {
        let node = &mesh.sites[0][0];
        let outcome = backup_of_a_pipe(node)
            .and_then(|()| restore(node, tmp.path()))
            .and_then(|()| ctrl_c_in_the_node(node));
        outcome.with_context(|| format!("node log:\n{}", node.log_tail()))
    });
    if let Err(e) = outcome {
        panic!("{e:#}");
    }
}

fn snapshots(node: &Node) -> Result<Vec<serde_json::Value>> {
    let out = node.ok(&["snapshots", "--json"])?;
    Ok(serde_json::from_str(&out)?)
}

/// The pipe makes it deterministic: the client is killed while the pipe stays open, so
/// the backup inside the node is waiting for more when its command goes away.
fn backup_of_a_pipe(node: &Node) -> Result<()> {
    let mut client = client(node, &["backup", "piped", "-", "--json"])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut pipe = client.stdin.take().expect("piped stdin");
    // Far more than a pipe holds: once written, the node has read most of it.
    pipe.write_all(&random_bytes(8 << 20, 1))?;
    client.kill()?;
    client.wait()?;
    wait_for(
        Duration::from_secs(10),
        "the node to log the cancelled backup",
        || {
            Ok(node
                .log_text()
                .contains("backup cancelled: the command that asked for it"))
        },
    )?;
    // The end of the stream: a backup still running would now make its snapshot.
    drop(pipe);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let snapshots = snapshots(node)?;
        ensure!(
            snapshots.is_empty(),
            "a cancelled backup made {snapshots:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What it appended to packs is not half a commit: the next backup and verify are clean.
    let mut after = self::client(node, &["backup", "after", "-", "--json"])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut pipe = after.stdin.take().expect("piped stdin");
    pipe.write_all(&random_bytes(4 << 20, 1))?;
    drop(pipe);
    ensure!(
        after.wait()?.success(),
        "the backup after a cancelled one failed"
    );
    node.ok(&["verify"])?;
    ensure!(
        snapshots(node)?.len() == 1,
        "the backup after a cancelled one is missing"
    );
    Ok(())
}

fn restore(node: &Node, root: &Path) -> Result<()> {
    let image = root.join("big.img");
    write(&image, &random_bytes(256 << 20, 2));
    node.ok(&["backup", "big", image.to_str().expect("utf-8"), "--json"])?;
    let out = root.join("big.out");
    let partial = root.join("big.out.cairn-partial");
    let out_arg = out.to_str().expect("utf-8");
    let mut client = client(node, &["restore", "big", out_arg, "--json"]).spawn()?;
    // The partial file appears as the restore starts writing: kill its command then.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !partial.exists() {
        ensure!(Instant::now() < deadline, "the restore never started");
        ensure!(
            client.try_wait()?.is_none(),
            "the restore ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    client.kill()?;
    client.wait()?;
    wait_for(
        Duration::from_secs(10),
        "the node to log the cancelled restore",
        || {
            Ok(node
                .log_text()
                .contains("restore cancelled: the command that asked for it"))
        },
    )?;
    // Given time to finish, a restore still running would put the output in place.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(!out.exists(), "a cancelled restore wrote {}", out.display());
    ensure!(
        partial.exists(),
        "a cancelled restore removed its partial file"
    );
    let started = Instant::now();
    let summary: serde_json::Value =
        serde_json::from_str(&node.ok(&["restore", "big", out_arg, "--json"])?)?;
    eprintln!(
        "cancel: the rerun restored {} bytes in {:?}, {} of them resumed",
        summary["size_bytes"],
        started.elapsed(),
        summary["resumed_bytes"]
    );
    assert_same_file(&image, &out);
    ensure!(
        !partial.exists(),
        "the finished restore left its partial file"
    );
    Ok(())
}

/// Ctrl-C on a command the node runs stops it as it stops one run here: the command
/// lives on to print the node's one line and exits 1, and no snapshot is made.
fn ctrl_c_in_the_node(node: &Node) -> Result<()> {
    let mut client = node
        .command(&["backup", "interrupted", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut pipe = client.stdin.take().expect("piped stdin");
    pipe.write_all(&random_bytes(8 << 20, 4))?;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(client.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.try_wait()?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "Ctrl-C did not stop the backup in the node"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(pipe);
    let out = client.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "Ctrl-C in the node: {:?}, stderr {stderr:?}",
        out.status
    );
    ensure!(
        stderr.trim_end() == "error: cancelled before the snapshot was made; nothing was recorded",
        "Ctrl-C in the node printed {stderr:?}"
    );
    ensure!(
        !snapshots(node)?.iter().any(|s| s["image"] == "interrupted"),
        "a backup stopped by Ctrl-C made a snapshot"
    );
    Ok(())
}

fn client(node: &Node, args: &[&str]) -> Command {
    let mut command = node.command(args);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    command
}

/// Without a node, Ctrl-C stops a backup the same way: one line saying so, no snapshot.
#[test]
fn ctrl_c_stops_a_backup_run_without_a_node() {
    let site = cairn::Site::new();
    let mut client = site
        .command(&["backup", "piped", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cairn runs");
    let mut pipe = client.stdin.take().expect("piped stdin");
    pipe.write_all(&random_bytes(8 << 20, 3))
        .expect("cairn reads");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(client.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "Ctrl-C did not stop the backup");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(pipe);
    let out = client.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "error: cancelled before the snapshot was made; nothing was recorded"
    );
    assert_eq!(site.ok(&["snapshots", "--json"]).trim(), "[]");
}
