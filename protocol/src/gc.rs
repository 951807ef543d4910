//! Garbage collection's formats and pure steps (docs/retention.md, sections 1 and 3.2).
//!
//! After `forget`, an owner's node lists the chunk ids no kept snapshot uses in
//! immutable, content-addressed *batches*, and names the batches in force in one signed
//! *statement* per site (record kind `GcStatement`, key all zeros). A statement carries
//! its *basis*: the digest of the site's snapshot records it was computed from
//! (`Catalog::snapshot_digest`). A holder acts on a statement only while that basis equals
//! its own digest (rule H2), so a statement signed without some snapshot does nothing at a
//! holder that knows the snapshot.
//!
//! Statement body, version 1:
//!
//! ```text
//! u8 version | u64 basis | u64 grace_ms | u16 n
//! | n x ([32] batch id | u32 n_ids | u64 bytes | u64 listed_unix_ms)
//! ```
//!
//! Nothing here reads a clock or a disk: callers pass times and id sets in.

use std::collections::BTreeSet;

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::ChunkId;

/// Ids in one batch: 512 KiB of ids, a day's garbage of a large image in a few batches.
pub const GC_BATCH_IDS_MAX: usize = 16_384;
/// Batches one statement names: 128 x 60 bytes keeps a statement near 7.5 KiB, inside a
/// record body.
pub const GC_BATCHES_MAX: usize = 128;
/// What an owner asks holders to wait, by default, before deleting what a statement
/// lists: 24 h 5 min (Proxmox Backup Server's figure).
pub const GC_GRACE_DEFAULT_MS: u64 = (24 * 60 + 5) * 60_000;

/// How long a node of the owner's site lets its snapshot digest differ from the basis of
/// the statement in force before it re-signs that statement on its own basis (the
/// fallback re-sign, docs/retention.md 3.3). Covers commits whose O3 restate was lost and
/// tombstones from a node that went away.
pub const GC_RESTATE_AFTER_MS: u64 = 10 * 60_000;

const STATEMENT_FORMAT: u8 = 1;
const BATCH_CONTEXT: &[u8] = b"cairn gc batch v1";

/// A batch's name: BLAKE3 over a context and its sorted ids, so a holder that fetched the
/// ids can check them against the statement that named them (rule H1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchId(pub [u8; 32]);

impl BatchId {
    /// The id of a batch with these ids, which must be sorted and distinct.
    pub fn of(ids: &[ChunkId]) -> BatchId {
        let mut hasher = BatchHasher::default();
        for id in ids {
            hasher.update(id);
        }
        hasher.finish()
    }
}

/// `BatchId::of` over ids that arrive in pieces: a holder hashes a batch as it fetches
/// it and never keeps the whole list. Refuses ids out of order, since a batch is sorted.
#[derive(Clone, Debug)]
pub struct BatchHasher {
    hasher: blake3::Hasher,
    last: Option<ChunkId>,
    count: usize,
}

impl Default for BatchHasher {
    fn default() -> BatchHasher {
        let mut hasher = blake3::Hasher::new();
        hasher.update(BATCH_CONTEXT);
        BatchHasher {
            hasher,
            last: None,
            count: 0,
        }
    }
}

impl BatchHasher {
    /// Adds the next id; false (and nothing added) when it is not above the last one.
    pub fn update(&mut self, id: &ChunkId) -> bool {
        if self.last.is_some_and(|last| *id <= last) {
            return false;
        }
        self.hasher.update(&id.0);
        self.last = Some(*id);
        self.count += 1;
        true
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn finish(&self) -> BatchId {
        BatchId(*self.hasher.finalize().as_bytes())
    }
}

/// A batch as a statement names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRef {
    pub id: BatchId,
    pub n_ids: u32,
    /// The listed chunks' sizes as this site stored them, for status displays.
    pub bytes: u64,
    /// When the batch was first listed, on the signer's clock: informational (holders
    /// time grace on their own clock) and what retirement counts from.
    pub listed_unix_ms: u64,
}

/// The body of a `GcStatement` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcStatement {
    /// The signer's snapshot digest for its own site when it signed.
    pub basis: u64,
    /// How long the owner asks holders to keep a listed chunk after they condemn it.
    pub grace_ms: u64,
    pub batches: Vec<BatchRef>,
}

impl GcStatement {
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.batches.len() <= GC_BATCHES_MAX,
            "callers bound a statement's batches"
        );
        let mut w = Writer::with_capacity(19 + 52 * self.batches.len());
        w.u8(STATEMENT_FORMAT);
        w.u64(self.basis);
        w.u64(self.grace_ms);
        w.u16(self.batches.len() as u16);
        for batch in &self.batches {
            w.array(&batch.id.0);
            w.u32(batch.n_ids);
            w.u64(batch.bytes);
            w.u64(batch.listed_unix_ms);
        }
        w.finish()
    }

    /// Decodes and checks the bounds: at most `GC_BATCHES_MAX` batches, each of 1 to
    /// `GC_BATCH_IDS_MAX` ids, no batch named twice.
    pub fn decode(bytes: &[u8]) -> Result<GcStatement, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("gc statement", STATEMENT_FORMAT)?;
        let basis = r.u64()?;
        let grace_ms = r.u64()?;
        let n = r.u16()?;
        if usize::from(n) > GC_BATCHES_MAX {
            return Err(DecodeError::TooMany {
                what: "gc statement batches",
                count: u64::from(n),
                max: GC_BATCHES_MAX as u64,
            });
        }
        let mut batches = Vec::with_capacity(usize::from(n));
        let mut seen = BTreeSet::new();
        for _ in 0..n {
            let batch = BatchRef {
                id: BatchId(r.array()?),
                n_ids: r.u32()?,
                bytes: r.u64()?,
                listed_unix_ms: r.u64()?,
            };
            if batch.n_ids == 0 || batch.n_ids as usize > GC_BATCH_IDS_MAX {
                return Err(DecodeError::Invalid {
                    what: "gc batch",
                    why: format!("{} ids, outside 1 to {GC_BATCH_IDS_MAX}", batch.n_ids),
                });
            }
            if !seen.insert(batch.id) {
                return Err(DecodeError::Invalid {
                    what: "gc statement",
                    why: "a batch named twice".into(),
                });
            }
            batches.push(batch);
        }
        r.finish()?;
        Ok(GcStatement {
            basis,
            grace_ms,
            batches,
        })
    }

    pub fn lists(&self, batch: &BatchId) -> bool {
        self.batches.iter().any(|b| b.id == *batch)
    }
}

/// The garbage a prune lists: chunks this node holds of its own site, and chunks of
/// forgotten snapshots, that no kept snapshot uses. `live` is the mark (every chunk of
/// every kept snapshot of the site, at one basis). Sorted, distinct.
pub fn dead(
    local: impl IntoIterator<Item = ChunkId>,
    forgotten: impl IntoIterator<Item = ChunkId>,
    live: &BTreeSet<ChunkId>,
) -> Vec<ChunkId> {
    let all: BTreeSet<ChunkId> = local.into_iter().chain(forgotten).collect();
    all.into_iter().filter(|id| !live.contains(id)).collect()
}

/// Cuts sorted ids into batches of at most `GC_BATCH_IDS_MAX`, each with its id.
pub fn cut_batches(ids: &[ChunkId]) -> Vec<(BatchId, Vec<ChunkId>)> {
    debug_assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
    ids.chunks(GC_BATCH_IDS_MAX)
        .map(|piece| (BatchId::of(piece), piece.to_vec()))
        .collect()
}

/// Rule O3, a commit revives: each batch that lists a chunk `used` names is re-issued
/// without those ids, as a new batch with a new id (an emptied batch is dropped). Returns
/// the batches to list in the next statement, in the order given, with each changed
/// batch's `listed_unix_ms` kept (the revived ids leave; the rest stay as old).
pub fn revive(
    batches: &[(BatchRef, Vec<ChunkId>)],
    used: &BTreeSet<ChunkId>,
    size_of: impl Fn(&ChunkId) -> u64,
) -> Vec<(BatchRef, Vec<ChunkId>)> {
    let mut out = Vec::with_capacity(batches.len());
    for (batch, ids) in batches {
        if !ids.iter().any(|id| used.contains(id)) {
            out.push((*batch, ids.clone()));
            continue;
        }
        let kept: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        if kept.is_empty() {
            continue;
        }
        let bytes = kept.iter().map(&size_of).sum();
        out.push((
            BatchRef {
                id: BatchId::of(&kept),
                n_ids: kept.len() as u32,
                bytes,
                listed_unix_ms: batch.listed_unix_ms,
            },
            kept,
        ));
    }
    out
}

/// A batch and its ids, as a signer knows them.
pub type KnownBatch = (BatchRef, Vec<ChunkId>);

/// Why a node must not restate after a commit or a forget (rule O3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestateSkip {
    /// The statement was signed on another view than this node's just before: it may lack
    /// snapshots this node knows, so restating it on the new basis could make it active
    /// where those snapshots are known. The fallback re-sign covers it.
    OtherBasis,
    /// A batch may list an id the new snapshot uses, and this node cannot read the batch.
    UnknownBatch,
}

/// Rule O3, and forget's restate: the batches of the statement a node signs after it
/// committed a snapshot using `used` (empty for tombstones, which only take liveness
/// away). Allowed only when `statement.basis` was this node's snapshot digest just before
/// (`basis_before`). A batch `known` cannot read is carried unchanged (with no ids) when
/// nothing is used, and makes the node sign nothing otherwise.
pub fn restate(
    statement: &GcStatement,
    basis_before: u64,
    known: impl Fn(&BatchId) -> Option<Vec<ChunkId>>,
    used: &BTreeSet<ChunkId>,
    size_of: impl Fn(&ChunkId) -> u64,
) -> Result<Vec<KnownBatch>, RestateSkip> {
    if statement.basis != basis_before {
        return Err(RestateSkip::OtherBasis);
    }
    let mut batches = Vec::with_capacity(statement.batches.len());
    for batch in &statement.batches {
        match known(&batch.id) {
            Some(ids) => batches.push((*batch, ids)),
            None if used.is_empty() => batches.push((*batch, Vec::new())),
            None => return Err(RestateSkip::UnknownBatch),
        }
    }
    if used.is_empty() {
        return Ok(batches);
    }
    Ok(revive(&batches, used, size_of))
}

/// The fallback re-sign's clock at one node of the owner's site: since when its snapshot
/// digest has differed from the basis of the statement in force. In memory only: a node
/// that restarts waits `GC_RESTATE_AFTER_MS` again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestateWatch {
    differs_since_ms: Option<u64>,
}

impl RestateWatch {
    /// Fed the basis of the statement in force (`None`: the site has none) and this
    /// node's snapshot digest for its own site, now: true when the two have differed for
    /// `GC_RESTATE_AFTER_MS` and the node must re-sign (the batches in force restated
    /// against the live set of every kept snapshot it knows, `prune_plan` with no new
    /// garbage, on its own basis). Once it has, the basis is its digest and the clock
    /// stops; a statement signed elsewhere on another view starts it again.
    pub fn due(&mut self, basis: Option<u64>, digest: u64, now_ms: u64) -> bool {
        if basis.is_none_or(|basis| basis == digest) {
            self.differs_since_ms = None;
            return false;
        }
        let since_ms = *self.differs_since_ms.get_or_insert(now_ms);
        now_ms.saturating_sub(since_ms) >= GC_RESTATE_AFTER_MS
    }
}

/// The batches of the statement a prune signs (rule O2, docs/retention.md 2.2 phase 2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrunePlan {
    /// Every batch of the next statement, in force ones first, with its ids.
    pub batches: Vec<KnownBatch>,
    /// How many of `batches` are new (at the end).
    pub n_new: usize,
    /// Dead ids not listed now, past `GC_BATCHES_MAX`: the next prune lists them.
    pub n_deferred: usize,
    /// Batches of the statement in force dropped because this node cannot read them.
    pub n_dropped_unknown: usize,
    /// Batches dropped by age (`retire_after_ms` since first listed).
    pub n_retired: usize,
    /// True when an in-force batch lost ids a kept snapshot uses.
    pub revived: bool,
}

/// Rule O2: the batches in force, each restated only as far as this mark (`live`)
/// vouches for it, then the new garbage. Carrying a batch over unchecked is unsafe: a
/// commit whose O3 restate was lost may use a listed id, and the new basis includes that
/// commit. So every batch loses the ids `live` holds, a batch this node cannot read is
/// dropped, and one listed `retire_after_ms` ago or more retires. `dead` (sorted,
/// distinct: `dead()`) minus what the statement lists already goes into new batches.
pub fn prune_plan(
    statement: Option<&GcStatement>,
    known: impl Fn(&BatchId) -> Option<Vec<ChunkId>>,
    dead: &[ChunkId],
    live: &BTreeSet<ChunkId>,
    now_ms: u64,
    retire_after_ms: u64,
    size_of: impl Fn(&ChunkId) -> u64,
) -> PrunePlan {
    let mut plan = PrunePlan::default();
    let mut listed = BTreeSet::new();
    let mut in_force = Vec::new();
    for batch in statement.map(|s| s.batches.as_slice()).unwrap_or_default() {
        let ids = known(&batch.id);
        if let Some(ids) = &ids {
            listed.extend(ids.iter().copied());
        }
        if now_ms.saturating_sub(batch.listed_unix_ms) >= retire_after_ms {
            plan.n_retired += 1;
            continue;
        }
        match ids {
            Some(ids) => in_force.push((*batch, ids)),
            None => plan.n_dropped_unknown += 1,
        }
    }
    plan.batches = revive(&in_force, live, &size_of);
    plan.revived = plan
        .batches
        .iter()
        .map(|(b, _)| b.id)
        .ne(in_force.iter().map(|(b, _)| b.id));
    let new: Vec<ChunkId> = dead
        .iter()
        .filter(|id| !listed.contains(*id))
        .copied()
        .collect();
    for (id, ids) in cut_batches(&new) {
        if plan.batches.len() >= GC_BATCHES_MAX {
            plan.n_deferred += ids.len();
            continue;
        }
        plan.batches.push((
            BatchRef {
                id,
                n_ids: ids.len() as u32,
                bytes: ids.iter().map(&size_of).sum(),
                listed_unix_ms: now_ms,
            },
            ids,
        ));
        plan.n_new += 1;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u16) -> ChunkId {
        let mut bytes = [0u8; 32];
        bytes[..2].copy_from_slice(&n.to_be_bytes());
        ChunkId(bytes)
    }

    fn batch(ids: &[u16], listed: u64) -> (BatchRef, Vec<ChunkId>) {
        let ids: Vec<ChunkId> = ids.iter().map(|n| id(*n)).collect();
        (
            BatchRef {
                id: BatchId::of(&ids),
                n_ids: ids.len() as u32,
                bytes: 10 * ids.len() as u64,
                listed_unix_ms: listed,
            },
            ids,
        )
    }

    #[test]
    fn a_batch_hashed_in_pieces_has_the_id_of_the_whole_and_refuses_disorder() {
        let ids: Vec<ChunkId> = (0..100).map(id).collect();
        let mut hasher = BatchHasher::default();
        for piece in ids.chunks(7) {
            for i in piece {
                assert!(hasher.update(i));
            }
        }
        assert_eq!(hasher.finish(), BatchId::of(&ids));
        assert_eq!(hasher.count(), 100);
        assert!(!hasher.update(&id(5)), "an id below the last is refused");
        assert!(!hasher.update(&id(99)), "a repeated id is refused");
        assert_eq!(
            hasher.finish(),
            BatchId::of(&ids),
            "refused ids change nothing"
        );
        assert_ne!(BatchId::of(&ids[1..]), BatchId::of(&ids));
    }

    #[test]
    fn a_statement_round_trips_and_its_bounds_are_enforced() {
        let statement = GcStatement {
            basis: 0xfeed,
            grace_ms: GC_GRACE_DEFAULT_MS,
            batches: vec![batch(&[1, 2, 3], 7).0, batch(&[4], 8).0],
        };
        let bytes = statement.encode();
        assert_eq!(GcStatement::decode(&bytes), Ok(statement.clone()));
        assert!(statement.lists(&batch(&[4], 0).0.id));
        assert!(!statement.lists(&batch(&[5], 0).0.id));

        let twice = GcStatement {
            batches: vec![batch(&[1], 1).0, batch(&[1], 2).0],
            ..statement.clone()
        };
        assert!(GcStatement::decode(&twice.encode()).is_err());
        let mut empty = statement.clone();
        empty.batches[0].n_ids = 0;
        assert!(GcStatement::decode(&empty.encode()).is_err());
        let mut huge = statement.clone();
        huge.batches[0].n_ids = GC_BATCH_IDS_MAX as u32 + 1;
        assert!(GcStatement::decode(&huge.encode()).is_err());
        // 129 batches, written by hand since `encode` refuses them.
        let mut w = Writer::with_capacity(0);
        w.u8(STATEMENT_FORMAT);
        w.u64(0);
        w.u64(0);
        w.u16(GC_BATCHES_MAX as u16 + 1);
        assert!(matches!(
            GcStatement::decode(&w.finish()),
            Err(DecodeError::TooMany { .. })
        ));
        assert!(GcStatement::decode(&bytes[..bytes.len() - 1]).is_err());
        let max = GcStatement {
            batches: (0..GC_BATCHES_MAX as u16)
                .map(|n| batch(&[n], 0).0)
                .collect(),
            ..statement
        };
        assert!(max.encode().len() <= crate::record::RECORD_BODY_BYTES_MAX as usize);
    }

    #[test]
    fn dead_is_what_no_kept_snapshot_uses_and_batches_cut_at_the_bound() {
        let live: BTreeSet<ChunkId> = [2, 4].map(id).into();
        let got = dead([1, 2, 3].map(id), [3, 4, 5].map(id), &live);
        assert_eq!(got, [1, 3, 5].map(id).to_vec());

        let many: Vec<ChunkId> = (0..(GC_BATCH_IDS_MAX as u16 + 5)).map(id).collect();
        let batches = cut_batches(&many);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].1.len(), GC_BATCH_IDS_MAX);
        assert_eq!(batches[1].1.len(), 5);
        assert_eq!(batches[1].0, BatchId::of(&many[GC_BATCH_IDS_MAX..]));
        assert!(cut_batches(&[]).is_empty());
    }

    #[test]
    fn revive_removes_exactly_the_used_ids_and_renames_only_changed_batches() {
        let a = batch(&[1, 2, 3], 100);
        let b = batch(&[4, 5], 200);
        let c = batch(&[6], 300);
        let used: BTreeSet<ChunkId> = [2, 6, 9].map(id).into();
        let out = revive(&[a.clone(), b.clone(), c], &used, |_| 10);
        assert_eq!(out.len(), 2, "the batch left empty is dropped");
        assert_eq!(out[0].1, [1, 3].map(id).to_vec());
        assert_eq!(out[0].0.id, BatchId::of(&out[0].1));
        assert_ne!(out[0].0.id, a.0.id);
        assert_eq!(out[0].0.n_ids, 2);
        assert_eq!(out[0].0.bytes, 20);
        assert_eq!(out[0].0.listed_unix_ms, 100, "the rest keep their age");
        assert_eq!(out[1], b, "an untouched batch keeps its id");
    }

    #[test]
    fn restate_refuses_another_basis_and_unknown_batches_only_when_ids_are_used() {
        let a = batch(&[1, 2, 3], 100);
        let statement = GcStatement {
            basis: 7,
            grace_ms: 0,
            batches: vec![a.0],
        };
        let all = |_: &BatchId| Some(a.1.clone());
        let none = |_: &BatchId| None;
        let used: BTreeSet<ChunkId> = [2].map(id).into();
        assert_eq!(
            restate(&statement, 8, all, &used, |_| 10),
            Err(RestateSkip::OtherBasis)
        );
        let out = restate(&statement, 7, all, &used, |_| 10).unwrap();
        assert_eq!(out[0].1, [1, 3].map(id).to_vec());
        assert_eq!(
            restate(&statement, 7, none, &used, |_| 10),
            Err(RestateSkip::UnknownBatch)
        );
        let carried = restate(&statement, 7, none, &BTreeSet::new(), |_| 10).unwrap();
        assert_eq!(
            carried,
            vec![(a.0, Vec::new())],
            "a tombstone carries it over"
        );
    }

    #[test]
    fn a_restate_is_due_only_after_the_digest_differed_for_the_whole_wait() {
        let mut watch = RestateWatch::default();
        // No statement, or one on this node's basis: never due.
        assert!(!watch.due(None, 7, 0));
        assert!(!watch.due(Some(7), 7, GC_RESTATE_AFTER_MS * 5));
        // Differs from t = 1000: due only once the wait has passed.
        let t = 1_000;
        assert!(!watch.due(Some(5), 7, t));
        assert!(!watch.due(Some(5), 7, t + GC_RESTATE_AFTER_MS - 1));
        assert!(watch.due(Some(5), 7, t + GC_RESTATE_AFTER_MS));
        // The digests met again (gossip, an O3 restate): the clock starts over.
        assert!(!watch.due(Some(7), 7, t + GC_RESTATE_AFTER_MS + 1));
        let t2 = t + 2 * GC_RESTATE_AFTER_MS;
        assert!(!watch.due(Some(9), 7, t2));
        assert!(!watch.due(Some(9), 8, t2 + GC_RESTATE_AFTER_MS - 1));
        assert!(watch.due(Some(9), 8, t2 + GC_RESTATE_AFTER_MS));
    }

    #[test]
    fn a_prune_plan_revives_drops_unknown_and_retired_batches_and_lists_only_new_garbage() {
        let a = batch(&[1, 2, 3], 200);
        let unknown = batch(&[4], 200);
        let old = batch(&[5], 100);
        let statement = GcStatement {
            basis: 1,
            grace_ms: 0,
            batches: vec![a.0, unknown.0, old.0],
        };
        let known = |b: &BatchId| {
            [&a, &old]
                .into_iter()
                .find(|k| k.0.id == *b)
                .map(|k| k.1.clone())
        };
        let live: BTreeSet<ChunkId> = [2].map(id).into();
        let dead = [1, 3, 5, 6, 7].map(id);
        let plan = prune_plan(Some(&statement), known, &dead, &live, 1000, 900, |_| 10);
        assert_eq!(plan.n_retired, 1);
        assert_eq!(plan.n_dropped_unknown, 1);
        assert!(plan.revived);
        assert_eq!(plan.batches.len(), 2);
        assert_eq!(plan.batches[0].1, [1, 3].map(id).to_vec());
        assert_eq!(
            plan.batches[1].1,
            [6, 7].map(id).to_vec(),
            "ids listed already (even in a retired batch) are not listed again"
        );
        assert_eq!(plan.batches[1].0.listed_unix_ms, 1000);
        assert_eq!((plan.n_new, plan.n_deferred), (1, 0));

        let full = GcStatement {
            basis: 1,
            grace_ms: 0,
            batches: (0..GC_BATCHES_MAX as u16)
                .map(|n| batch(&[1000 + n], 500).0)
                .collect(),
        };
        let every = |b: &BatchId| {
            (0..GC_BATCHES_MAX as u16)
                .map(|n| batch(&[1000 + n], 500))
                .find(|k| k.0.id == *b)
                .map(|k| k.1)
        };
        let plan = prune_plan(Some(&full), every, &dead, &live, 1000, 900, |_| 10);
        assert_eq!(
            (plan.n_new, plan.n_deferred),
            (0, 5),
            "past the bound waits"
        );
    }
}
