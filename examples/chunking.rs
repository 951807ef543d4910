//! Measures how FastCDC's bounds trade dedup against per-chunk overhead on a series of
//! images: for each parameter set, backs up v1, v2, v3 into a fresh vault and prints the
//! bytes stored after each, the chunk count, mean chunk size and time. The table in
//! docs/chunking.md comes from this.
//!
//!   cargo run --release --example chunking -- IMAGES_DIR [ZSTD_LEVEL]
//!
//! IMAGES_DIR holds server-v1.img .. server-v3.img (../shared/bench/make-images.sh).

use std::path::PathBuf;

use anyhow::{Context, Result};
use cairn_node::backup::{backup, BackupOptions};
use cairn_node::source::Source;
use cairn_node::Vault;
use cairn_protocol::{ChunkerParams, ImageName};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let images = PathBuf::from(
        args.next()
            .context("usage: chunking IMAGES_DIR [ZSTD_LEVEL]")?,
    );
    let zstd_level: i32 = args
        .next()
        .map_or(Ok(3), |l| l.parse())
        .context("ZSTD_LEVEL is a number")?;
    const KIB: u32 = 1024;
    let sets = [
        ChunkerParams {
            min_bytes: 64 * KIB,
            avg_bytes: 256 * KIB,
            max_bytes: 1024 * KIB,
        },
        ChunkerParams {
            min_bytes: 128 * KIB,
            avg_bytes: 512 * KIB,
            max_bytes: 2048 * KIB,
        },
        ChunkerParams {
            min_bytes: 256 * KIB,
            avg_bytes: 1024 * KIB,
            max_bytes: 4096 * KIB,
        },
        ChunkerParams {
            min_bytes: 512 * KIB,
            avg_bytes: 2048 * KIB,
            max_bytes: 8192 * KIB,
        },
    ];
    println!("zstd level {zstd_level}");
    println!(
        "{:>16} {:>14} {:>14} {:>14} {:>10} {:>14} {:>9}",
        "min/avg/max KiB",
        "stored v1 MiB",
        "stored v2 MiB",
        "stored v3 MiB",
        "chunks",
        "mean chunk KiB",
        "time s"
    );
    for params in sets {
        let tmp = tempfile::tempdir()?;
        let vault = Vault::init(&tmp.path().join("data"), "chunking")?;
        let image = ImageName::new("server")?;
        let options = BackupOptions {
            chunker: params,
            zstd_level,
            ..BackupOptions::default()
        };
        let (mut stored, mut n_chunks, mut new_bytes, mut seconds) = (Vec::new(), 0, 0, 0.0);
        for v in 1..=3 {
            let path = images.join(format!("server-v{v}.img"));
            let source = Source::open(path.to_str().context("utf-8 path")?)?;
            let summary = backup(&vault, &image, source, options, &|_| {})?;
            n_chunks += summary.n_chunks_new;
            new_bytes += summary.new_bytes;
            seconds += summary.seconds;
            stored.push(vault.store.packs_bytes()? as f64 / (1 << 20) as f64);
        }
        println!(
            "{:>16} {:>14.1} {:>14.1} {:>14.1} {:>10} {:>14.0} {:>9.2}",
            format!(
                "{}/{}/{}",
                params.min_bytes / KIB,
                params.avg_bytes / KIB,
                params.max_bytes / KIB
            ),
            stored[0],
            stored[1],
            stored[2],
            n_chunks,
            new_bytes as f64 / n_chunks.max(1) as f64 / 1024.0,
            seconds
        );
    }
    Ok(())
}
