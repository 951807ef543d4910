//! The mesh, shown with real processes: three offices with two nodes each, every node a
//! `cairn node run` on loopback. Office A backs up a server image; the mesh copies every
//! chunk to R = 3 sites; then office A burns down (its nodes are killed and their data
//! dirs deleted). A fresh machine recovers the site from its recovery key through the
//! partners, restores the image from the mesh and compares it byte for byte.
//!
//!   cargo run --release --example mesh [-- SIZE_MIB]     (default 64 MiB)

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn::mesh::{at_r, image_status, wait_for, Mesh};
use cairn::{assert_same_file, random_bytes, text_bytes, write};

/// Set in the nodes this example starts: they are this same executable running the
/// `cairn` CLI, so `cargo run --example mesh` needs no other binary built first.
const AS_CLI: &str = "CAIRN_EXAMPLE_AS_CLI";

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
