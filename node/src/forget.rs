//! `cairn forget`: turns snapshots a retention policy lets go (or one named snapshot) into
//! tombstones, the final version of their catalog record (docs/retention.md, 2.1 and
//! 3.1). Forgetting takes liveness away and deletes nothing: the chunks stay until
//! `prune` finds them unused, and the mesh gives space back only on the owner's signed
//! word. The tombstones gossip like any other record of the site, so every node of the
//! site and every partner drops the snapshot, and no old disk or replay brings it back.

use cairn_protocol::record::{Record, RecordKind, TrustGrant};
use cairn_protocol::retention::{self, Candidate, Civil, Policy};
use cairn_protocol::{SnapshotId, SnapshotRecord};
use serde::Serialize;
use thiserror::Error;

use crate::gc;
use crate::records;
use crate::store::{IndexBatch, StoreError};
use crate::units;
use crate::vault::{Vault, VaultError};

/// Catalog key marking a snapshot confirmed at R sites (written by the node).
pub const KEY_ACKED: &[u8] = b"acked/";

/// What to forget.
#[derive(Clone, Debug)]
pub enum Selection {
    /// Every snapshot of `image` the policy does not keep.
    Policy { image: String, policy: Policy },
    /// Exactly one snapshot, as `IMAGE@SNAPSHOT`.
    One { spec: String },
}

#[derive(Debug, Error)]
pub enum ForgetError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] retention::PolicyError),
    #[error("name one snapshot as IMAGE@SNAPSHOT; {0:?} names the image's newest one, which is too easy to forget by accident")]
    NoSnapshotNamed(String),
    #[error("snapshot time {0} ms cannot be read as a local date")]
    BadTime(u64),
}

/// One snapshot in the answer, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct Line {
    pub snapshot: String,
    pub time: String,
    pub keep: bool,
    /// Why it is kept (empty when forgotten), as `--dry-run` prints them.
    pub reasons: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForgetReport {
    pub image: String,
    pub dry_run: bool,
    pub snapshots: Vec<Line>,
    pub forgotten: usize,
    pub kept: usize,
}

/// Decides what `selection` forgets and, unless `dry_run`, forgets it: one index batch
/// writes every tombstone and takes the snapshots out of the index's table. Returns the
/// tombstones, for a running node to hand to its engine (a stopped node's engine loads
/// them from the index at its next start).
pub fn forget(
    vault: &Vault,
    selection: &Selection,
    dry_run: bool,
    now_unix_ms: u64,
) -> Result<(ForgetReport, Vec<Record>), ForgetError> {
    let (image, lines, doomed) = match selection {
        Selection::One { spec } => {
            if !spec.contains('@') {
                return Err(ForgetError::NoSnapshotNamed(spec.clone()));
            }
            let snapshot = vault.resolve(spec)?;
            let line = Line {
                snapshot: snapshot.id.to_string(),
                time: units::utc(snapshot.time_unix_ms),
                keep: false,
                reasons: Vec::new(),
            };
            (snapshot.image.to_string(), vec![line], vec![snapshot.id])
        }
        Selection::Policy { image, policy } => {
            let snapshots: Vec<SnapshotRecord> = vault
                .snapshots()?
                .into_iter()
                .filter(|s| s.image.as_str() == image)
                .collect();
            if snapshots.is_empty() {
                return Err(VaultError::UnknownImage(image.clone()).into());
            }
            let (lines, doomed) = apply(vault, policy, &snapshots)?;
            (image.clone(), lines, doomed)
        }
    };
    let report = ForgetReport {
        image,
        dry_run,
        forgotten: doomed.len(),
        kept: lines.iter().filter(|l| l.keep).count(),
        snapshots: lines,
    };
    if dry_run || doomed.is_empty() {
        return Ok((report, Vec::new()));
    }
    let basis_before = gc::snapshot_digest(vault)?;
    let tombstones: Vec<Record> = doomed
        .iter()
        .map(|id| records::sign_tombstone(vault, id, now_unix_ms))
        .collect();
    // Each forgotten snapshot waits under `gc-pending/` for the prune that lists its
    // garbage: after the tombstone, the stored body is the only way to its manifest.
    let mut pending = Vec::with_capacity(doomed.len());
    for id in &doomed {
        if let Some(body) = vault.stored_snapshot(id)? {
            let key = records::snapshot_key(id);
            pending.push(([gc::KEY_GC_PENDING, &key].concat(), body));
        }
    }
    let mut catalog: Vec<_> = tombstones.iter().map(records::entry).collect();
    catalog.extend(pending);
    vault.store.index().commit(IndexBatch {
        catalog,
        removed_snapshots: doomed,
        ..IndexBatch::default()
    })?;
    // Tombstones only take liveness away: the statement in force holds on the new basis
    // with no walk, when it was signed on this node's view (rule O3).
    gc::restate(vault, basis_before, &Default::default())?;
    Ok((report, tombstones))
}

fn apply(
    vault: &Vault,
    policy: &Policy,
    snapshots: &[SnapshotRecord],
) -> Result<(Vec<Line>, Vec<SnapshotId>), ForgetError> {
    let mesh = has_partners(vault)?;
    let index = vault.store.index();
    let mut candidates = Vec::with_capacity(snapshots.len());
    for s in snapshots {
        let key = records::snapshot_key(&s.id);
        // A vault with no partners has no R to reach: every snapshot counts as safe.
        // In a mesh, only the node's mark of R confirmations does.
        let acknowledged = !mesh || index.catalog_get(&[KEY_ACKED, &key].concat())?.is_some();
        candidates.push(Candidate {
            id: s.id,
            time_unix_ms: s.time_unix_ms,
            civil: local_civil(s.time_unix_ms).ok_or(ForgetError::BadTime(s.time_unix_ms))?,
            acknowledged,
        });
    }
    let decisions = retention::decide(policy, &candidates)?;
    let lines = decisions
        .iter()
        .map(|d| Line {
            snapshot: d.id.to_string(),
            time: units::utc(d.time_unix_ms),
            keep: d.keep(),
            reasons: d.reasons.iter().map(ToString::to_string).collect(),
        })
        .collect();
    let doomed = decisions
        .iter()
        .filter(|d| !d.keep())
        .map(|d| d.id)
        .collect();
    Ok((lines, doomed))
}

/// True when this site grants storage to any partner, so its snapshots have R sites to
/// reach.
pub(crate) fn has_partners(vault: &Vault) -> Result<bool, StoreError> {
    let grants = records::scan(
        vault.store.index(),
        &vault.dir.site_id(),
        RecordKind::TrustGrant,
    )?;
    Ok(grants
        .iter()
        .filter_map(|r| TrustGrant::decode(&r.body).ok())
        .any(|g| !g.revoked))
}

/// The civil hour of `time_unix_ms` in this machine's time zone (`localtime_r`), for the
/// policy's buckets.
pub fn local_civil(time_unix_ms: u64) -> Option<Civil> {
    let tm = units::local_tm(time_unix_ms)?;
    Civil::new(
        tm.tm_year + 1900,
        u8::try_from(tm.tm_mon + 1).ok()?,
        u8::try_from(tm.tm_mday).ok()?,
        u8::try_from(tm.tm_hour).ok()?,
    )
}

/// The text `cairn forget` prints: one line per snapshot, what happens to it and why.
pub fn render(report: &ForgetReport) -> String {
    let mut out = String::new();
    for line in &report.snapshots {
        let verdict = if line.keep { "keep  " } else { "forget" };
        let why = if line.keep {
            line.reasons.join(", ")
        } else {
            "no rule keeps it".to_string()
        };
        out.push_str(&format!(
            "{verdict}  {}  {}  {why}\n",
            &line.snapshot[..line.snapshot.len().min(12)],
            line.time
        ));
    }
    let verb = if report.dry_run {
        "would forget"
    } else {
        "forgot"
    };
    out.push_str(&format!(
        "{}: {verb} {} snapshot(s), {} kept\n",
        report.image, report.forgotten, report.kept
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{backup, BackupOptions};
    use crate::source::Source;
    use cairn_protocol::retention::Count;
    use cairn_protocol::ImageName;

    fn vault_with_snapshots(n: usize) -> (tempfile::TempDir, Vault, Vec<SnapshotId>) {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::init(&dir.path().join("data"), "forget test").unwrap();
        let image = ImageName::new("fileserver").unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let path = dir.path().join(format!("image{i}"));
            std::fs::write(&path, vec![i as u8 + 1; 200_000]).unwrap();
            let source = Source::open(path.to_str().unwrap()).unwrap();
            let summary =
                backup(&vault, &image, source, BackupOptions::default(), &|_| {}).unwrap();
            ids.push(
                vault
                    .resolve(&format!("fileserver@{}", summary.snapshot))
                    .unwrap()
                    .id,
            );
            // Distinct milliseconds, so the order is the order of the backups.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        (dir, vault, ids)
    }

    /// What the node writes once a snapshot is confirmed at R sites.
    fn mark_acknowledged(vault: &Vault, id: &SnapshotId) {
        let key = records::snapshot_key(id);
        vault
            .store
            .index()
            .commit(IndexBatch {
                catalog: vec![([KEY_ACKED, &key].concat(), 1u64.to_le_bytes().to_vec())],
                ..IndexBatch::default()
            })
            .unwrap();
    }

    fn keep_last(n: u32) -> Selection {
        Selection::Policy {
            image: "fileserver".into(),
            policy: Policy {
                last: Some(Count::Of(n)),
                ..Policy::default()
            },
        }
    }

    #[test]
    fn forget_keeps_what_the_policy_keeps_and_tombstones_the_rest() {
        let (_dir, vault, ids) = vault_with_snapshots(3);
        let (dry, none) = forget(&vault, &keep_last(1), true, 1).unwrap();
        assert!(none.is_empty());
        assert_eq!((dry.forgotten, dry.kept), (2, 1));
        assert_eq!(
            vault.snapshots().unwrap().len(),
            3,
            "a dry run changed the vault"
        );

        let (report, tombstones) = forget(&vault, &keep_last(1), false, 1).unwrap();
        assert_eq!(report.forgotten, 2);
        assert_eq!(tombstones.len(), 2);
        assert!(tombstones.iter().all(Record::is_tombstone));
        let left: Vec<SnapshotId> = vault.snapshots().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(left, vec![ids[2]]);
        // A forgotten snapshot is named as forgotten, not as unknown.
        let err = vault
            .resolve(&format!("fileserver@{}", ids[0]))
            .unwrap_err();
        assert!(
            matches!(err, VaultError::Forgotten { id, .. } if id == ids[0]),
            "{err}"
        );
        // Its record is final: nothing signs a live version again.
        let again = vault.snapshot_catalog_record(&ids[0]);
        assert!(again.is_err());
        let key = records::snapshot_key(&ids[0]);
        let signed = records::sign_next(&vault, RecordKind::Snapshot, key, vec![1; 40]);
        assert!(matches!(signed, Err(StoreError::Forgotten { .. })));
        // Forgetting again finds nothing more to forget.
        let (second, none) = forget(&vault, &keep_last(1), false, 2).unwrap();
        assert_eq!((second.forgotten, none.len()), (0, 0));
    }

    #[test]
    fn one_snapshot_is_forgotten_only_when_named() {
        let (_dir, vault, ids) = vault_with_snapshots(2);
        let err = forget(
            &vault,
            &Selection::One {
                spec: "fileserver".into(),
            },
            false,
            1,
        )
        .unwrap_err();
        assert!(matches!(err, ForgetError::NoSnapshotNamed(_)), "{err}");
        let spec = format!("fileserver@{}", &ids[1].to_string()[..8]);
        let (report, tombstones) = forget(&vault, &Selection::One { spec }, false, 1).unwrap();
        assert_eq!((report.forgotten, tombstones.len()), (1, 1));
        let left: Vec<SnapshotId> = vault.snapshots().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(left, vec![ids[0]]);
    }

    #[test]
    fn in_a_mesh_a_snapshot_not_yet_at_r_is_kept() {
        let (_dir, vault, ids) = vault_with_snapshots(2);
        // A partner grant makes this a mesh site; no snapshot is marked acknowledged.
        let grant = TrustGrant {
            grantee: cairn_protocol::identity::SiteId([9; 32]),
            quota_bytes: 1 << 30,
            revoked: false,
        };
        let record =
            records::sign_next(&vault, RecordKind::TrustGrant, [9; 32], grant.encode()).unwrap();
        records::save(vault.store.index(), &record).unwrap();
        let (report, _) = forget(&vault, &keep_last(1), false, 1).unwrap();
        assert_eq!(report.forgotten, 0);
        assert!(report
            .snapshots
            .iter()
            .all(|l| l.reasons == ["not yet at R sites"]));
        // Once the newest is acknowledged, the older one goes.
        mark_acknowledged(&vault, &ids[1]);
        let (report, _) = forget(&vault, &keep_last(1), false, 1).unwrap();
        assert_eq!(
            report.forgotten, 0,
            "the older one is not acknowledged either"
        );
        mark_acknowledged(&vault, &ids[0]);
        let (report, _) = forget(&vault, &keep_last(1), false, 1).unwrap();
        assert_eq!(report.forgotten, 1);
        let left: Vec<SnapshotId> = vault.snapshots().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(left, vec![ids[1]]);
    }
}
