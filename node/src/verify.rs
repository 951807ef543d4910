//! Verify: reads and opens every chunk that the chosen snapshots need, on every core, and
//! names each damaged image and byte offset. A chunk shared by many snapshots is read once.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use cairn_protocol::seal::Opener;
use cairn_protocol::{ChunkId, Extent, SnapshotRecord};
use crossbeam_channel::bounded;
use serde::Serialize;

use crate::units;
use crate::vault::Vault;

const VERIFY_QUEUE_MAX: usize = 256;

/// One damaged stretch of one snapshot.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Damage {
    pub image: String,
    pub snapshot: String,
    pub offset: u64,
    pub len_bytes: u64,
    /// The damaged chunk; None when a manifest node is unreadable and everything from
    /// `offset` to the end of the image is unknown.
    pub chunk: Option<String>,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub n_snapshots: usize,
    pub n_chunks_checked: usize,
    pub bytes_checked: u64,
    pub damage: Vec<Damage>,
    pub seconds: f64,
}

pub fn verify(
    vault: &Vault,
    records: &[SnapshotRecord],
    n_workers: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> VerifyReport {
    let started = Instant::now();
    // chunk id -> None when good, Some(reason) when damaged. Filled by the workers.
    let checked: Mutex<HashMap<ChunkId, Option<String>>> = Mutex::new(HashMap::new());
    let bytes_checked = Mutex::new(0u64);
    let mut damage = Vec::new();
    let (tx, rx) = bounded::<(ChunkId, u32)>(VERIFY_QUEUE_MAX);
    std::thread::scope(|scope| {
        for _ in 0..n_workers.max(1) {
            let (rx, checked, bytes_checked) = (rx.clone(), &checked, &bytes_checked);
            scope.spawn(move || {
                let mut reader = vault.store.reader();
                let mut opener = Opener::new();
                for (id, len_bytes) in rx {
                    let outcome = match vault.load_chunk(&mut reader, &mut opener, &id) {
                        Ok(plain) if plain.len() == len_bytes as usize => None,
                        Ok(plain) => Some(format!(
                            "opens to {} bytes, manifest says {len_bytes}",
                            plain.len()
                        )),
                        Err(e) => Some(units::chain(&e)),
                    };
                    let total = {
                        let mut bytes_checked = bytes_checked.lock().expect("not poisoned");
                        *bytes_checked += u64::from(len_bytes);
                        *bytes_checked
                    };
                    progress(total);
                    checked.lock().expect("not poisoned").insert(id, outcome);
                }
            });
        }
        drop(rx);
        let mut queued: HashSet<ChunkId> = HashSet::new();
        for record in records {
            let walked = vault.walk_manifest(record, |_, extent| match extent {
                Extent::Data { id, len_bytes } if queued.insert(id) => {
                    tx.send((id, len_bytes)).is_ok()
                }
                _ => true,
            });
            if let Err((offset, e)) = walked {
                damage.push(Damage {
                    image: record.image.to_string(),
                    snapshot: record.id.short(),
                    offset,
                    len_bytes: record.size_bytes.saturating_sub(offset),
                    chunk: None,
                    why: format!(
                        "manifest unreadable, the rest of the image cannot be checked: {}",
                        units::chain(&e)
                    ),
                });
            }
        }
        drop(tx);
    });
    let checked = checked.into_inner().expect("not poisoned");
    if checked.values().any(Option::is_some) {
        // Second pass, only when something is damaged: name every place that uses it.
        for record in records {
            let _ = vault.walk_manifest(record, |offset, extent| {
                if let Extent::Data { id, len_bytes } = extent {
                    if let Some(Some(why)) = checked.get(&id) {
                        damage.push(Damage {
                            image: record.image.to_string(),
                            snapshot: record.id.short(),
                            offset,
                            len_bytes: u64::from(len_bytes),
                            chunk: Some(id.to_string()),
                            why: why.clone(),
                        });
                    }
                }
                true
            });
        }
    }
    damage
        .sort_by(|a, b| (&a.image, &a.snapshot, a.offset).cmp(&(&b.image, &b.snapshot, b.offset)));
    VerifyReport {
        n_snapshots: records.len(),
        n_chunks_checked: checked.len(),
        bytes_checked: bytes_checked.into_inner().expect("not poisoned"),
        damage,
        seconds: started.elapsed().as_secs_f64(),
    }
}
