//! The newcomer's demonstration: make a disk image, back it up, change it the way a server
//! changes, back it up again, restore both snapshots and show they match byte for byte and
//! what the vault stored. Everything lives in a temporary directory that is removed after.
//!
//!   cargo run --release --example demo [-- SIZE_MIB]     (default 512 MiB)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cairn::{assert_same_file, random_bytes, text_bytes};
use cairn_node::backup::{backup, BackupOptions, BackupSummary};
use cairn_node::restore::{restore, RestoreOptions};
use cairn_node::source::Source;
use cairn_node::units::bytes;
use cairn_node::Vault;
use cairn_protocol::ImageName;

const MIB: u64 = 1 << 20;

fn main() -> Result<()> {
    let size_mib: u64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .context("SIZE_MIB must be a whole number of MiB")?,
        None => 512,
    };
    if size_mib < 64 {
        bail!("SIZE_MIB must be at least 64");
    }
    let tmp = tempfile::tempdir()?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("cairn demo in {} ({workers} cores)\n", tmp.path().display());

    let vault = Vault::init(&tmp.path().join("data"), "Demo Office")?;
    println!("1. created site \"Demo Office\" with fresh site and vault keys");

    let image_path = tmp.path().join("fileserver.img");
    make_image(&image_path, size_mib * MIB)?;
    println!(
        "2. made a {} sparse disk image: system files, logs, user documents, free space",
        bytes(size_mib * MIB)
    );

    let image = ImageName::new("fileserver")?;
    let first = step_backup(&vault, &image, &image_path, "3. backed up v1")?;
    let v1_copy = tmp.path().join("fileserver-v1.img");
    std::fs::copy(&image_path, &v1_copy)?;

    change_image(&image_path, size_mib * MIB)?;
    println!("4. changed the image: new log lines, a package upgrade, new documents");
    let second = step_backup(&vault, &image, &image_path, "5. backed up v2")?;

    let snapshots = vault.snapshots()?;
    for (n, (record, original)) in snapshots.iter().zip([&v1_copy, &image_path]).enumerate() {
        let out = tmp.path().join(format!("restored-v{}.img", n + 1));
        let summary = restore(
            &vault,
            record,
            &out,
            &RestoreOptions::local(workers),
            &|_| {},
        )?;
        assert_same_file(original, &out);
        println!(
            "{}. restored {}@{} in {:.2}s: byte-for-byte equal to v{}",
            6 + n,
            record.image,
            record.id.short(),
            summary.seconds,
            n + 1
        );
    }

    let stored = vault.store.packs_bytes()?;
    println!(
        "\nwhat the vault holds for two {} snapshots:",
        bytes(size_mib * MIB)
    );
    println!(
        "  v1: {} of data, {} new, stored as {}",
        bytes(first.size_bytes - first.zero_bytes),
        bytes(first.new_bytes),
        bytes(first.stored_bytes)
    );
    println!(
        "  v2: {} of data, only {} new ({:.1}x dedup), stored as {}",
        bytes(second.size_bytes - second.zero_bytes),
        bytes(second.new_bytes),
        second.dedup_ratio(),
        bytes(second.stored_bytes)
    );
    println!(
        "  store on disk: {} in pack files, all of it encrypted",
        bytes(stored)
    );
    Ok(())
}

fn step_backup(
    vault: &Vault,
    image: &ImageName,
    path: &Path,
    label: &str,
) -> Result<BackupSummary> {
    let started = Instant::now();
    let source = Source::open(path.to_str().context("utf-8 path")?)?;
    let summary = backup(vault, image, source, BackupOptions::default(), &|_| {})?;
    println!(
        "{label} as snapshot {}: {} chunks, {} new, {} stored, in {:.2}s",
        summary.snapshot,
        summary.n_chunks,
        summary.n_chunks_new,
        bytes(summary.stored_bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}

/// A disk-like image: compressible "system" and log regions, incompressible documents, and
/// holes for free space, at fixed offsets like a filesystem's.
fn make_image(path: &Path, size: u64) -> Result<()> {
    let file = File::create(path)?;
    file.set_len(size)?;
    let quarter = size / 4;
    file.write_all_at(&text_bytes((quarter / 2) as usize, 1), 0)?;
    file.write_all_at(&random_bytes((quarter / 2) as usize, 2), quarter)?;
    file.write_all_at(&text_bytes((quarter / 4) as usize, 3), 2 * quarter)?;
    Ok(())
}

/// Changes in place: log lines appended, a region rewritten, new documents in free space.
fn change_image(path: &Path, size: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let quarter = size / 4;
    file.write_all_at(&text_bytes(4 * MIB as usize, 99), 2 * quarter + quarter / 4)?;
    file.write_all_at(&random_bytes(MIB as usize, 98), quarter / 8)?;
    file.write_all_at(&random_bytes(8 * MIB as usize, 97), 3 * quarter)?;
    Ok(())
}
