//! A site's own chunks that reach one of its nodes through the mesh (the site's second
//! node, placed on by the first node's backup) are stored as the vault stores a backup's:
//! a backup there dedups against them and verifies clean, and a restore there reads them
//! from its own disk.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cairn::mesh::{wait_for, Mesh};
use cairn::{assert_same_file, random_bytes, text_bytes, write};

#[test]
fn chunks_of_this_site_from_the_mesh_verify_and_restore_as_local() {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-own-chunks-")
        .tempdir()
        .expect("temp dir");
    if let Err(e) = run(tmp.path()) {
        panic!("{e:#}");
    }
}

fn run(root: &Path) -> Result<()> {
    let mut step = |what: &str| eprintln!("own-chunks: {what}");
    let mesh = Mesh::build(root, 1, 2, &mut step)?;
    let (a1, a2) = (&mesh.sites[0][0], &mesh.sites[0][1]);
    let mut bytes = text_bytes(4 << 20, 3);
    bytes.extend(random_bytes(4 << 20, 4));
    let image = root.join("fs.img");
    write(&image, &bytes);
    let path = image.to_str().context("utf-8 temp path")?;
    a1.ok(&["backup", "fs", path])?;
    step("a1 backed up 8 MiB");

    // Placement puts about half of the site's chunks on a2: it gets them from a1.
    wait_for(
        Duration::from_secs(60),
        "a2 to store chunks a1 pushed",
        || Ok(a2.status()?["chunks_own"].as_u64().unwrap_or(0) >= 4),
    )?;
    let pushed = a2.status()?["chunks_own"].as_u64().unwrap_or(0);
    step(&format!("a2 holds {pushed} of the site's chunks from a1"));

    // A backup on a2 of the same image dedups against those chunks: its snapshot is all
    // on a2's disk, half of it as the mesh brought it, and verifies clean.
    a2.ok(&["backup", "fs2", path])?;
    let verify = a2.run(&["verify", "fs2"]);
    ensure!(
        verify.status.success(),
        "verify on a2 of a snapshot made there failed ({:?}): {}{}",
        verify.status.code(),
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // a1's snapshot restored on a2: what a2 holds is read from its disk. Its record
    // travels by gossip, apart from the chunks, so wait until a2 lists it.
    wait_for(
        Duration::from_secs(60),
        "a2 to learn a1's snapshot of fs",
        || Ok(a2.ok(&["snapshots", "fs"]).is_ok()),
    )?;
    let out = root.join("restored.img");
    let summary: serde_json::Value = serde_json::from_str(&a2.ok(&[
        "restore",
        "fs",
        out.to_str().context("utf-8 temp path")?,
        "--json",
    ])?)?;
    let local = summary["local_bytes"].as_u64().unwrap_or(0);
    ensure!(
        local > 0,
        "a2 holds {pushed} chunks of the image yet read none of them locally: {summary}"
    );
    assert_same_file(&image, &out);
    step(&format!("restored on a2: {local} bytes read locally"));
    Ok(())
}
