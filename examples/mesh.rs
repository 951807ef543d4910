//! The mesh, shown with real processes: three offices with two nodes each, every node a
//! `cairn node run` on loopback. Office A backs up a server image; the mesh copies every
//! chunk to R = 3 sites; then office A burns down (its nodes are killed and their data
//! dirs deleted). A fresh machine recovers the site from its recovery key through the
//! partners, restores the image from the mesh and compares it byte for byte.
//!
//!   cargo run --release --example mesh [-- SIZE_MIB]     (default 64 MiB)
//!
//! With `CAIRN_EXAMPLE_BENCH=1` it also measures, before office A burns, a local restore
//! on a1 (every chunk in its own pack store) against a restore on a fresh machine of
//! office A that fetches from all three sites, and prints the bytes each site sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn::mesh::{at_r, image_status, site_name, wait_for, Mesh, Node};
use cairn::{assert_same_file, random_bytes, text_bytes, write};

/// Set in the nodes this example starts: they are this same executable running the
/// `cairn` CLI, so `cargo run --example mesh` needs no other binary built first.
const AS_CLI: &str = "CAIRN_EXAMPLE_AS_CLI";
/// Local and mesh restores the benchmark alternates.
const BENCH_ROUNDS: usize = 3;

fn main() -> ExitCode {
    if std::env::var_os(AS_CLI).is_some() {
        return cairn_node::cli::main();
    }
    std::env::set_var(AS_CLI, "1");
    match std::env::current_exe() {
        Ok(exe) => std::env::set_var("CAIRN_BIN", exe),
        Err(e) => {
            eprintln!("error: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let size_mib: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().context("SIZE_MIB must be a whole number")?,
        None => 64,
    };
    if size_mib == 0 {
        bail!("SIZE_MIB must be at least 1");
    }
    let mut tmp = Some(tempfile::Builder::new().prefix("cairn-mesh-").tempdir()?);
    let root = tmp.as_ref().expect("just made").path().to_owned();
    // CAIRN_EXAMPLE_KEEP=1 keeps the data dirs and node logs for a look afterwards.
    if std::env::var_os("CAIRN_EXAMPLE_KEEP").is_some() {
        tmp.take().map(tempfile::TempDir::keep);
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let mut step = |what: &str| {
        println!(
            "[{:6.1}s] {what} ({:.1}s)",
            started.elapsed().as_secs_f64(),
            last.elapsed().as_secs_f64()
        );
        last = Instant::now();
    };
    println!("cairn mesh example in {}\n", root.display());

    let mut mesh = Mesh::build(&root, 3, 2, &mut step)?;

    // A server image: half text-like (compresses), half random (does not).
    let image = root.join("fileserver.img");
    let half = size_mib << 19;
    let mut bytes = text_bytes(half, 1);
    bytes.extend(random_bytes(half, 2));
    write(&image, &bytes);
    drop(bytes);
    let a1 = &mesh.sites[0][0];
    let out = a1.ok(&["backup", "fileserver", image.to_str().context("utf-8")?])?;
    step(&format!(
        "office A backed up a {size_mib} MiB image: {}",
        out.lines().next().unwrap_or_default()
    ));

    wait_for(Duration::from_secs(600), "every chunk at 3 sites", || {
        Ok(at_r(&a1.status()?, "fileserver"))
    })?;
    let status = a1.status()?;
    let row = image_status(&status, "fileserver").context("image in status")?;
    let copies: Vec<String> = row["copies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {} chunks",
                c["site_name"].as_str().unwrap_or("?"),
                c["chunks"]
            )
        })
        .collect();
    step(&format!(
        "every chunk is at R = 3 sites: {}",
        copies.join(", ")
    ));

    if std::env::var_os("CAIRN_EXAMPLE_BENCH").is_some() {
        bench_three_sites(&mesh, &image, &mut step)?;
    }

    for node in &mut mesh.sites[0] {
        node.kill();
        std::fs::remove_dir_all(&node.data_dir)?;
    }
    step("office A is gone: both its nodes killed, their data dirs deleted");

    let fresh = root.join("a-new-machine");
    let mut recovered = mesh.recover(0, &fresh)?;
    step("a fresh machine recovered office A's keys from its recovery key, through a partner");

    recovered.start(&mesh.addresses_outside(0))?;
    wait_for(
        Duration::from_secs(120),
        "the snapshot record from the mesh",
        || {
            Ok(recovered
                .ok(&["snapshots", "fileserver"])?
                .contains("fileserver"))
        },
    )?;
    step("its node joined the mesh and learnt office A's snapshots from the partners");

    let restored = root.join("restored.img");
    let out = recovered.ok(&["restore", "fileserver", restored.to_str().context("utf-8")?])?;
    step(&format!(
        "restored from the mesh: {}",
        out.lines().next().unwrap_or_default()
    ));
    assert_same_file(&image, &restored);
    step("the restored image matches the original byte for byte");
    println!("\nall done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The restore benchmark: a local restore on a1, then a fresh machine of office A (its
/// nodes still running) that restores from the mesh, drawing on all three sites.
fn bench_three_sites(mesh: &Mesh, image: &Path, step: &mut dyn FnMut(&str)) -> Result<()> {
    let root = image
        .parent()
        .context("the image is in the example's dir")?;
    let a1 = &mesh.sites[0][0];
    let mut fresh = mesh.recover(0, &root.join("a-bench-machine"))?;
    fresh.name = "a-bench".into();
    fresh.log = root.join("a-bench.log");
    let everyone: Vec<String> = mesh.nodes().map(Node::address).collect();
    fresh.start(&everyone)?;
    wait_for(
        Duration::from_secs(120),
        "the bench machine to learn the snapshot",
        || {
            Ok(fresh
                .ok(&["snapshots", "fileserver"])?
                .contains("fileserver"))
        },
    )?;
    // Every node must have said hello before the clock starts.
    wait_for(
        Duration::from_secs(60),
        "the bench machine to see every node",
        || {
            let status = fresh.status()?;
            let live = status["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["state"] == "live" && p["last_seen_unix_ms"].is_u64())
                .count();
            Ok(live >= mesh.nodes().count())
        },
    )?;
    // Wall time, and the CPU time every node process used meanwhile: what the machine
    // spent on the restore, senders included.
    let cpu = || -> Duration {
        mesh.nodes()
            .chain(std::iter::once(&fresh))
            .filter_map(Node::cpu_time)
            .sum()
    };
    // (wall s, CPU s of every node, CPU s of the restoring node, the restore's summary)
    let timed_restore = |node: &Node, out: &Path| -> Result<(f64, f64, f64, serde_json::Value)> {
        let (started, cpu_before) = (Instant::now(), cpu());
        let own_before = node.cpu_time().unwrap_or_default();
        let json = node.ok(&["restore", "fileserver", utf8(out)?, "--json"])?;
        let secs = started.elapsed().as_secs_f64();
        let cpu_secs = (cpu() - cpu_before).as_secs_f64();
        let own_secs = (node.cpu_time().unwrap_or_default() - own_before).as_secs_f64();
        assert_same_file(image, out);
        std::fs::remove_file(out)?;
        Ok((secs, cpu_secs, own_secs, serde_json::from_str(&json)?))
    };
    let mib = |bytes: &serde_json::Value| bytes.as_u64().unwrap_or(0) as f64 / f64::from(1 << 20);

    step("bench: a fresh machine of office A runs beside a1, connected to every node");

    // Local and mesh restores alternate, so both see the same background load.
    let mut ratios = Vec::new();
    for round in 1..=BENCH_ROUNDS {
        let (local_secs, local_cpu, a1_cpu, local) =
            timed_restore(a1, &root.join("bench-local.img"))?;
        step(&format!(
            "bench {round}: local restore on a1 in {local_secs:.2}s ({local_cpu:.2}s CPU in all nodes, {a1_cpu:.2}s in a1), {:.1} MiB/s ({:.0} MiB from its own store, {:.0} MiB remote)",
            mib(&local["data_bytes"]) / local_secs,
            mib(&local["local_bytes"]),
            mib(&local["remote_bytes"]),
        ));
        let before = received_by_site(mesh, &fresh.status()?);
        let (mesh_secs, mesh_cpu, fresh_cpu, remote) =
            timed_restore(&fresh, &root.join("bench-mesh.img"))?;
        let after = received_by_site(mesh, &fresh.status()?);
        let from: Vec<String> = after
            .iter()
            .map(|(site, bytes)| {
                let sent = bytes - before.get(site).copied().unwrap_or(0);
                format!("{site} {:.0} MiB", sent as f64 / f64::from(1 << 20))
            })
            .collect();
        ratios.push(local_secs / mesh_secs);
        step(&format!(
            "bench {round}: fresh machine restored in {mesh_secs:.2}s ({mesh_cpu:.2}s CPU in all nodes, {fresh_cpu:.2}s in the restoring one), {:.1} MiB/s ({:.0} MiB fetched, {:.0} MiB local; wire bytes from {}): {:.0}% of the local rate",
            mib(&remote["data_bytes"]) / mesh_secs,
            mib(&remote["remote_bytes"]),
            mib(&remote["local_bytes"]),
            from.join(", "),
            100.0 * local_secs / mesh_secs,
        ));
    }
    ratios.sort_by(f64::total_cmp);
    step(&format!(
        "bench: mesh restore at {:.0}% of the local rate (median of {BENCH_ROUNDS}; range {:.0}% to {:.0}%)",
        100.0 * ratios[ratios.len() / 2],
        100.0 * ratios[0],
        100.0 * ratios[ratios.len() - 1],
    ));
    fresh.kill();
    Ok(())
}

/// Bytes a node received from each site's nodes, by site name.
fn received_by_site(mesh: &Mesh, status: &serde_json::Value) -> BTreeMap<String, u64> {
    let mut by_site = BTreeMap::new();
    for peer in status["peers"].as_array().into_iter().flatten() {
        let id = peer["site_id"].as_str().unwrap_or("?");
        let site = match mesh.site_ids.iter().position(|s| s == id) {
            Some(i) => site_name(i),
            None => id.to_owned(),
        };
        *by_site.entry(site).or_insert(0) += peer["received_bytes"].as_u64().unwrap_or(0);
    }
    by_site
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().context("utf-8 path")
}
