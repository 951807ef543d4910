//! `cairn prune`: gives disk back after `forget` (docs/retention.md, 2.2 and rule O2).
//!
//! 1. **Mark** (no lock): every chunk of every kept snapshot of the site, made here or on
//!    another node of the site, through `manifest::mark` (each distinct manifest node read
//!    once; missing nodes fetched from the mesh inside a running node). A kept snapshot
//!    whose manifest cannot be read stops the prune before anything is written.
//! 2. **Publish** (under the store's write lock, which a backup holds from its first
//!    dedup lookup to its commit): mark what was committed meanwhile, then list this
//!    node's own chunks outside the mark and the chunks of snapshots forgotten here, in
//!    the statement `gc::prune_plan` gives, signed on this node's snapshot digest, in one
//!    index batch with its batches and the `gc-pending/` keys it settles.
//! 3. **Sweep** (same lock): drop this site's own chunks outside the mark from the index.
//!    Partner chunks are not touched: the engine deletes those on their owner's word.
//! 4. **Repack**: rewrite packs mostly garbage, a pack at a time (`Store::repack`).
//!
//! Inside a running node, the engine gets the batches and the statement before the sweep,
//! so it has frozen the chunks (rule H3) before they leave the index.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Instant;

use cairn_protocol::gc::{self, PrunePlan};
use cairn_protocol::ids::ChunkId;
use cairn_protocol::manifest::{self, ManifestError};
use cairn_protocol::{SnapshotId, SnapshotRecord};
use serde::Serialize;
use thiserror::Error;

use crate::fetch::RemoteChunks;
use crate::gc::{GcSettings, Signed, KEY_GC_PENDING};
use crate::records;
use crate::store::{IndexBatch, RepackProgress, Repacked, StoreError, Swept, KEY_HELD_CHUNK};
use crate::units;
use crate::vault::{ChunkError, Vault, VaultError};

/// A batch leaves the statement this long after it was first listed: longer than any
/// holder's grace plus its deletion window, so every holder has had its chance.
pub const GC_BATCH_RETIRE_MS: u64 = 30 * 24 * 3_600_000;

#[derive(Debug, Error)]
pub enum PruneError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("snapshot {snapshot} cannot be marked, so nothing was pruned (every kept snapshot's manifest must be read before anything is dropped)")]
    Mark {
        snapshot: String,
        #[source]
        source: ManifestError<ChunkError>,
    },
}

/// What a prune does, with `dry_run` what it would do.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Kept snapshots marked, and the distinct chunks they use.
    pub snapshots_kept: usize,
    /// Forgotten snapshots an export still reads, kept whole until it stops.
    pub snapshots_pinned: usize,
    pub chunks_live: usize,
    /// Forgotten snapshots whose garbage this prune lists, and those it could not read
    /// (kept for the next prune).
    pub snapshots_forgotten: usize,
    pub snapshots_forgotten_unreadable: usize,
    /// This site's chunks in this store that no kept snapshot uses: swept.
    pub swept: Swept,
    /// Ids newly listed for the mesh to collect, and the statement's batches.
    pub listed_new: usize,
    pub batches: usize,
    pub batches_revived: bool,
    pub listed_deferred: usize,
    /// The statement signed (none when there was nothing to list or restate).
    pub statement_version: Option<u64>,
    pub repacked: Repacked,
    /// Pack bytes before and after, on this node's disk.
    pub pack_bytes_before: u64,
    pub pack_bytes_after: u64,
    pub seconds: f64,
}

/// What a long prune is doing, for a progress bar.
pub enum PruneProgress {
    Mark { done: usize, of: usize },
    Waiting,
    Sweep { n_chunks: usize },
    Repack(RepackProgress),
}

pub struct PruneOptions<'a> {
    pub dry_run: bool,
    pub settings: GcSettings,
    /// Inside a running node: where missing manifest nodes come from, and the lock
    /// backups hold.
    pub remote: Option<&'a dyn RemoteChunks>,
    pub write_lock: Option<&'a Mutex<()>>,
    /// Told the statement and the swept ids, in that order (a running node hands them
    /// to its engine).
    pub on_signed: &'a dyn Fn(&Signed),
    pub on_swept: &'a dyn Fn(&[ChunkId]),
    pub now_unix_ms: u64,
}

/// Runs a prune; see the module's text.
pub fn prune(
    vault: &Vault,
    options: &PruneOptions<'_>,
    progress: &dyn Fn(PruneProgress),
) -> Result<PruneReport, PruneError> {
    let started = Instant::now();
    let mut report = PruneReport {
        dry_run: options.dry_run,
        pack_bytes_before: vault.store.packs_bytes()?,
        ..PruneReport::default()
    };
    // 1. Mark, with no lock: backups go on meanwhile.
    let mut live = BTreeSet::new();
    let mut marked = BTreeSet::new();
    let kept = vault.snapshots()?;
    for (i, snapshot) in kept.iter().enumerate() {
        progress(PruneProgress::Mark {
            done: i,
            of: kept.len(),
        });
        mark(vault, options.remote, snapshot, &mut live)?;
        marked.insert(snapshot.id);
    }

    // 2. Publish, under the lock from here to the end of the sweep.
    progress(PruneProgress::Waiting);
    let _writing = options
        .write_lock
        .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
    // What was committed since the mark began, usually nothing or one snapshot whose
    // manifest mostly shares nodes already read.
    let kept = vault.snapshots()?;
    for snapshot in kept.iter().filter(|s| !marked.contains(&s.id)) {
        mark(vault, options.remote, snapshot, &mut live)?;
    }
    // Snapshots an export reads (a VM's disk), forgotten or not, stay whole until it
    // stops. Read after `kept`: an export pins, then checks its snapshot is still kept,
    // so one that pins after this line finds a snapshot forgotten before `kept` was read
    // and refuses to start, and every other is kept or marked here.
    let pinned: Vec<SnapshotRecord> = vault
        .pinned()
        .into_iter()
        .filter(|p| !kept.iter().any(|k| k.id == p.id))
        .collect();
    for snapshot in &pinned {
        mark(vault, options.remote, snapshot, &mut live)?;
    }
    report.snapshots_kept = kept.len();
    report.snapshots_pinned = pinned.len();
    report.chunks_live = live.len();

    let index = vault.store.index();
    let held: BTreeSet<Vec<u8>> = index
        .catalog_scan(KEY_HELD_CHUNK)?
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let local: Vec<ChunkId> = index
        .chunks()?
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !live.contains(id) && !held.contains(&[KEY_HELD_CHUNK, &id.0].concat()))
        .collect();
    let pinned_ids: BTreeSet<SnapshotId> = pinned.iter().map(|p| p.id).collect();
    let (forgotten, settled) = forgotten_chunks(vault, &live, &pinned_ids, &mut report)?;
    let dead = gc::dead(local.iter().copied(), forgotten, &live);
    let statement = crate::gc::statement(vault)?;
    let plan = match &statement {
        Some(s) => {
            let known = crate::gc::known_batches(index, s)?;
            gc::prune_plan(
                Some(s),
                |id| known.get(id).cloned(),
                &dead,
                &live,
                options.now_unix_ms,
                GC_BATCH_RETIRE_MS,
                |id| crate::gc::stored_size(index, id),
            )
        }
        None => gc::prune_plan(
            None,
            |_| None,
            &dead,
            &live,
            options.now_unix_ms,
            GC_BATCH_RETIRE_MS,
            |id| crate::gc::stored_size(index, id),
        ),
    };
    report.listed_new = plan.batches[plan.batches.len() - plan.n_new..]
        .iter()
        .map(|(b, _)| b.n_ids as usize)
        .sum();
    report.batches = plan.batches.len();
    report.batches_revived = plan.revived;
    report.listed_deferred = plan.n_deferred;
    report.swept = Swept {
        n_chunks: local.len() as u64,
        bytes: local
            .iter()
            .map(|id| crate::gc::stored_size(index, id))
            .sum(),
    };
    if options.dry_run {
        report.pack_bytes_after = report.pack_bytes_before;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    if let Some(signed) = publish(vault, statement.is_some(), plan, &settled, options)? {
        report.statement_version = Some(signed.record.version);
        (options.on_signed)(&signed);
    }

    // 3. Sweep this site's own copies no kept snapshot uses.
    progress(PruneProgress::Sweep {
        n_chunks: local.len(),
    });
    report.swept = vault.store.sweep(&local)?;
    (options.on_swept)(&local);
    drop(_writing);

    // 4. Repack, taking the lock a pack at a time.
    report.repacked = vault.store.repack(
        f64::from(options.settings.repack_unused_percent) / 100.0,
        options.write_lock,
        &|p| progress(PruneProgress::Repack(p)),
    )?;
    report.pack_bytes_after = vault.store.packs_bytes()?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn mark(
    vault: &Vault,
    remote: Option<&dyn RemoteChunks>,
    snapshot: &SnapshotRecord,
    live: &mut BTreeSet<ChunkId>,
) -> Result<(), PruneError> {
    let mut load = vault.loader(remote);
    manifest::mark(snapshot.manifest_root(), live, &mut load).map_err(|source| PruneError::Mark {
        snapshot: format!("{}@{}", snapshot.image, snapshot.id.short()),
        source,
    })
}

/// The chunks of the snapshots forgotten here whose garbage is not listed yet
/// (`gc-pending/`), outside `live`, and the pending keys this prune settles. A forgotten
/// snapshot whose manifest cannot be read here is left pending: its chunks in this store
/// are listed anyway (they are outside the mark), and the next prune tries again. So is
/// one still `pinned`: its chunks are in `live` now, and must be listed once it is not.
fn forgotten_chunks(
    vault: &Vault,
    live: &BTreeSet<ChunkId>,
    pinned: &BTreeSet<SnapshotId>,
    report: &mut PruneReport,
) -> Result<(Vec<ChunkId>, Vec<Vec<u8>>), PruneError> {
    let mut chunks = BTreeSet::new();
    let mut settled = Vec::new();
    for (key, body) in vault.store.index().catalog_scan(KEY_GC_PENDING)? {
        let Ok(snapshot_key) = <[u8; 32]>::try_from(&key[KEY_GC_PENDING.len()..]) else {
            settled.push(key); // not a key this build writes: nothing to list
            continue;
        };
        let id: SnapshotId = records::snapshot_id_of_key(&snapshot_key);
        if pinned.contains(&id) {
            continue;
        }
        let readable = vault
            .open_stored_snapshot(id, &body)
            .map_err(PruneError::from)
            .and_then(|snapshot| {
                // The live set is the floor: nodes it holds are not read again.
                let mut ids = live.clone();
                mark(vault, None, &snapshot, &mut ids)?;
                Ok(ids)
            });
        match readable {
            Ok(ids) => {
                chunks.extend(ids.into_iter().filter(|id| !live.contains(id)));
                settled.push(key);
                report.snapshots_forgotten += 1;
            }
            Err(e) => {
                report.snapshots_forgotten_unreadable += 1;
                tracing::warn!(
                    "forgotten snapshot {} stays pending: {}",
                    id.short(),
                    units::chain(&e)
                );
            }
        }
    }
    Ok((chunks.into_iter().collect(), settled))
}

/// Signs and stores the statement `plan` gives, with its new batches, settling the
/// pending snapshots and dropping the batches no statement names any more.
fn publish(
    vault: &Vault,
    had_statement: bool,
    plan: PrunePlan,
    settled: &[Vec<u8>],
    options: &PruneOptions<'_>,
) -> Result<Option<Signed>, PruneError> {
    let index = vault.store.index();
    let mut batch = IndexBatch {
        removed_catalog: settled.to_vec(),
        ..IndexBatch::default()
    };
    let named: BTreeSet<Vec<u8>> = plan
        .batches
        .iter()
        .map(|(b, _)| [crate::gc::KEY_GC_BATCH, &b.id.0].concat())
        .collect();
    batch.removed_catalog.extend(
        index
            .catalog_scan(crate::gc::KEY_GC_BATCH)?
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| !named.contains(key)),
    );
    let signed = if plan.batches.is_empty() && !had_statement {
        None // nothing to list, and no statement to restate
    } else {
        let basis = crate::gc::snapshot_digest(vault)?;
        Some(crate::gc::sign(
            vault,
            plan.batches,
            basis,
            options.settings.grace_ms,
            &mut batch,
        )?)
    };
    index.commit(batch)?;
    Ok(signed)
}

/// The text `cairn prune` prints.
pub fn render(report: &PruneReport) -> String {
    let verb = if report.dry_run { "would " } else { "" };
    let mut out = format!(
        "marked {} kept snapshot(s): {} chunks in use\n",
        report.snapshots_kept, report.chunks_live
    );
    out.push_str(&format!(
        "{verb}drop {} chunks of this site's ({}) no kept snapshot uses\n",
        report.swept.n_chunks,
        units::bytes(report.swept.bytes)
    ));
    out.push_str(&format!(
        "{verb}list {} chunk(s) for the partners to give back, after their grace",
        report.listed_new
    ));
    if report.listed_deferred > 0 {
        out.push_str(&format!(
            " ({} more at the next prune: the statement is full)",
            report.listed_deferred
        ));
    }
    out.push('\n');
    if report.snapshots_pinned > 0 {
        out.push_str(&format!(
            "{} forgotten snapshot(s) kept whole while an export or VM reads them; the next prune after it stops gives them back\n",
            report.snapshots_pinned
        ));
    }
    if report.snapshots_forgotten_unreadable > 0 {
        out.push_str(&format!(
            "{} forgotten snapshot(s) could not be read here and stay pending\n",
            report.snapshots_forgotten_unreadable
        ));
    }
    if !report.dry_run {
        out.push_str(&format!(
            "rewrote {} pack(s), deleted {}; packs {} -> {}, {} freed in {:.1} s\n",
            report.repacked.packs_rewritten,
            report.repacked.packs_deleted,
            units::bytes(report.pack_bytes_before),
            units::bytes(report.pack_bytes_after),
            units::bytes(
                report
                    .pack_bytes_before
                    .saturating_sub(report.pack_bytes_after)
            ),
            report.seconds
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{backup, BackupOptions};
    use crate::forget::{forget, Selection};
    use crate::restore::{restore, RestoreOptions};
    use crate::source::Source;
    use cairn_protocol::retention::{Count, Policy};
    use cairn_protocol::ImageName;

    /// Three snapshots of one image, each a fresh random image of 3 MiB with a shared
    /// first MiB: most of each is its own, so forgetting two leaves garbage in packs.
    fn vault_with_images() -> (tempfile::TempDir, Vault, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::init(&dir.path().join("data"), "prune test").unwrap();
        let image = ImageName::new("fileserver").unwrap();
        let shared: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut images = Vec::new();
        for n in 0..3u64 {
            let mut bytes = shared.clone();
            let mut x = n + 1;
            bytes.extend((0..2u32 << 20).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }));
            let path = dir.path().join(format!("image{n}"));
            std::fs::write(&path, &bytes).unwrap();
            let source = Source::open(path.to_str().unwrap()).unwrap();
            backup(&vault, &image, source, BackupOptions::default(), &|_| {}).unwrap();
            images.push(bytes);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        (dir, vault, images)
    }

    fn options(dry_run: bool) -> PruneOptions<'static> {
        PruneOptions {
            dry_run,
            settings: GcSettings::default(),
            remote: None,
            write_lock: None,
            on_signed: &|_| {},
            on_swept: &|_| {},
            now_unix_ms: 1_000,
        }
    }

    fn keep_last_1() -> Selection {
        Selection::Policy {
            image: "fileserver".into(),
            policy: Policy {
                last: Some(Count::Of(1)),
                ..Policy::default()
            },
        }
    }

    #[test]
    fn prune_gives_back_what_forgotten_snapshots_alone_used_and_the_kept_one_restores() {
        let (dir, vault, images) = vault_with_images();
        let n_chunks = vault.store.index().n_chunks();
        forget(&vault, &keep_last_1(), false, 1).unwrap();
        assert_eq!(
            vault
                .store
                .index()
                .catalog_scan(KEY_GC_PENDING)
                .unwrap()
                .len(),
            2,
            "each forgotten snapshot waits for the prune"
        );

        let dry = prune(&vault, &options(true), &|_| {}).unwrap();
        assert!(dry.swept.n_chunks > 0);
        assert_eq!(
            vault.store.index().n_chunks(),
            n_chunks,
            "a dry run dropped chunks"
        );
        assert!(crate::gc::statement(&vault).unwrap().is_none());

        let report = prune(&vault, &options(false), &|_| {}).unwrap();
        assert_eq!(report.swept.n_chunks, dry.swept.n_chunks);
        assert_eq!(report.snapshots_kept, 1);
        assert_eq!(report.snapshots_forgotten, 2);
        assert!(
            report.pack_bytes_after * 10 < report.pack_bytes_before * 6,
            "two of three mostly distinct snapshots forgotten: {} -> {} pack bytes",
            report.pack_bytes_before,
            report.pack_bytes_after
        );
        assert!(vault
            .store
            .index()
            .catalog_scan(KEY_GC_PENDING)
            .unwrap()
            .is_empty());
        // The statement lists what was swept, on this node's basis, for the partners.
        let statement = crate::gc::statement(&vault).unwrap().expect("signed");
        assert_eq!(statement.basis, crate::gc::snapshot_digest(&vault).unwrap());
        let listed: usize = statement.batches.iter().map(|b| b.n_ids as usize).sum();
        assert_eq!(listed as u64, report.swept.n_chunks);
        assert_eq!(report.statement_version, Some(1));

        let kept = vault.resolve("fileserver").unwrap();
        let out = dir.path().join("restored");
        restore(&vault, &kept, &out, &RestoreOptions::local(2), &|_| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), images[2]);

        // A rerun finds nothing more, and restates the same batches.
        let again = prune(&vault, &options(false), &|_| {}).unwrap();
        assert_eq!(again.swept.n_chunks, 0);
        assert_eq!(again.listed_new, 0);
        assert_eq!(again.batches, statement.batches.len());
    }

    #[test]
    fn a_kept_snapshot_that_cannot_be_read_stops_the_prune_before_anything_goes() {
        let (_dir, vault, _) = vault_with_images();
        forget(&vault, &keep_last_1(), false, 1).unwrap();
        let kept = vault.resolve("fileserver").unwrap();
        vault.store.sweep(&[kept.manifest_root().id]).unwrap();
        let n_chunks = vault.store.index().n_chunks();
        let err = prune(&vault, &options(false), &|_| {}).unwrap_err();
        assert!(matches!(err, PruneError::Mark { .. }), "{err}");
        assert_eq!(vault.store.index().n_chunks(), n_chunks);
        assert!(crate::gc::statement(&vault).unwrap().is_none());
    }

    #[test]
    fn a_commit_restates_the_statement_without_the_ids_it_uses() {
        let (dir, vault, images) = vault_with_images();
        // The kept snapshot's record, as a node signs it at start.
        crate::mesh::snapshots_to_publish(&vault, false).unwrap();
        forget(&vault, &keep_last_1(), false, 1).unwrap();
        prune(&vault, &options(false), &|_| {}).unwrap();
        let before = crate::gc::statement(&vault).unwrap().unwrap();
        // A backup of the first (forgotten, pruned) image again: its chunks were listed.
        let path = dir.path().join("again");
        std::fs::write(&path, &images[0]).unwrap();
        let image = ImageName::new("fileserver").unwrap();
        let source = Source::open(path.to_str().unwrap()).unwrap();
        backup(&vault, &image, source, BackupOptions::default(), &|_| {}).unwrap();
        let published = crate::mesh::snapshots_to_publish(&vault, false).unwrap();
        assert_eq!(published.snapshots.len(), 1);
        assert_eq!(published.statements.len(), 1, "the commit restated (O3)");
        let after = crate::gc::statement(&vault).unwrap().unwrap();
        assert_eq!(after.basis, crate::gc::snapshot_digest(&vault).unwrap());
        assert_ne!(after.basis, before.basis);
        let used: BTreeSet<ChunkId> = published.snapshots[0].1.iter().map(|c| c.id).collect();
        let known = crate::gc::known_batches(vault.store.index(), &after).unwrap();
        assert_eq!(
            known.len(),
            after.batches.len(),
            "every batch is stored here"
        );
        assert!(
            known.values().flatten().all(|id| !used.contains(id)),
            "a listed id the new snapshot uses"
        );
    }

    #[test]
    fn a_forgotten_snapshot_an_export_reads_stays_whole_until_it_stops() {
        let (dir, vault, images) = vault_with_images();
        let oldest = vault.snapshots().unwrap().remove(0);
        let pin = vault.pin(&oldest);
        forget(&vault, &keep_last_1(), false, 1).unwrap();

        let report = prune(&vault, &options(false), &|_| {}).unwrap();
        assert_eq!(report.snapshots_pinned, 1);
        assert_eq!(report.snapshots_forgotten, 1, "the unpinned one goes");
        assert!(render(&report).contains("kept whole while an export or VM reads"));
        // Every chunk of the pinned snapshot still reads.
        let out = dir.path().join("pinned");
        restore(&vault, &oldest, &out, &RestoreOptions::local(2), &|_| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), images[0]);
        // None of them is listed for the partners either.
        let mut used = BTreeSet::new();
        mark(&vault, None, &oldest, &mut used).unwrap();
        let statement = crate::gc::statement(&vault).unwrap().expect("signed");
        let known = crate::gc::known_batches(vault.store.index(), &statement).unwrap();
        assert!(known.values().flatten().all(|id| !used.contains(id)));
        assert_eq!(
            vault
                .store
                .index()
                .catalog_scan(KEY_GC_PENDING)
                .unwrap()
                .len(),
            1,
            "the pinned snapshot stays pending"
        );

        // Once the export stops, the next prune gives its own chunks back and lists them.
        drop(pin);
        let after = prune(&vault, &options(false), &|_| {}).unwrap();
        assert_eq!(after.snapshots_pinned, 0);
        assert_eq!(after.snapshots_forgotten, 1);
        assert!(after.swept.n_chunks > 0);
        assert!(after.listed_new > 0);
        assert!(vault
            .store
            .index()
            .catalog_scan(KEY_GC_PENDING)
            .unwrap()
            .is_empty());
    }
}
