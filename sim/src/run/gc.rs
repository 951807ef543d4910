//! Retention and garbage collection in a run (docs/retention.md, section 5): the owner's
//! side played from the simulator's truth, through the protocol's own functions, and the
//! holders' side by the real engines.
//!
//! - **Forget** (O1): after each snapshot and each acknowledgement, an image with
//!   `keep_last` forgets what `retention::decide` does not keep; a live node of its site
//!   signs the tombstones and restates the statement on the new basis.
//! - **Prune** (O2): every `prune_every_hours` a live node of each site marks every kept
//!   snapshot its catalog knows (their chunk lists are the truth, as reading manifests
//!   would give), lists `dead = (its own-site chunks ∪ forgotten chunks) − live` in new
//!   batches, signs a statement naming the batches in force on its snapshot digest, and
//!   sweeps its own dead copies off its disk.
//! - **A commit revives** (O3): the node that takes a snapshot re-issues every batch that
//!   lists one of the snapshot's chunks without those ids, on the new basis.
//! - **Invariant 11**: whenever an engine collects a chunk, or a prune sweeps one, a chunk
//!   of a kept, acknowledged snapshot must still have good copies at R sites.
//! - **Invariant 13**: a node never saves a live record of a forgotten snapshot after the
//!   tombstone, and no engine acknowledges a forgotten snapshot (`world::checks`).

use std::collections::{BTreeMap, BTreeSet};

use cairn_protocol::gc::{self, BatchRef, GcStatement};
use cairn_protocol::identity::SiteId;
use cairn_protocol::ids::{ChunkId, SnapshotId};
use cairn_protocol::record::{Record, RecordKind, Tombstone, TOMBSTONE_VERSION};
use cairn_protocol::retention::{self, Candidate, Civil, Count, Policy};

use super::{Image, Run};
use crate::world::{hours_us, World, HOUR_US};

impl Run {
    /// O1: the image's policy, applied now.
    pub(super) fn apply_policy(&mut self, image_idx: usize) {
        let spec = &self.world.scenario.images[image_idx];
        let (keep_last, forget_newest_every) = (spec.keep_last, spec.forget_newest_every);
        let Some(keep_last) = keep_last else {
            return;
        };
        let image = &self.images[image_idx];
        let site = image.site;
        // By hand: the newest acknowledged snapshot, while an older one is kept.
        let acked: Vec<[u8; 32]> = image
            .snapshots
            .iter()
            .filter(|s| s.acked_us.is_some() && s.forgotten_us.is_none())
            .map(|s| s.key)
            .collect();
        let n_acked = image
            .snapshots
            .iter()
            .filter(|s| s.acked_us.is_some())
            .count();
        let by_hand = forget_newest_every
            .filter(|every| {
                *every > 0
                    && n_acked.is_multiple_of(*every as usize)
                    && n_acked > image.forgot_newest_at
                    && acked.len() >= 2
            })
            .and_then(|_| acked.last().copied());
        let candidates: Vec<Candidate> = image
            .snapshots
            .iter()
            .filter(|s| s.forgotten_us.is_none())
            .map(|s| Candidate {
                id: SnapshotId(s.key[..16].try_into().expect("16 bytes")),
                time_unix_ms: s.taken_us / 1000,
                civil: civil_of(s.taken_us),
                acknowledged: s.acked_us.is_some(),
            })
            .collect();
        let policy = Policy {
            last: Some(Count::Of(keep_last)),
            ..Policy::default()
        };
        let decisions = retention::decide(&policy, &candidates).expect("keep_last is a policy");
        let mut forget: Vec<[u8; 32]> = decisions
            .iter()
            .filter(|d| !d.keep())
            .map(|d| {
                let mut key = [0u8; 32];
                key[..16].copy_from_slice(&d.id.0);
                key
            })
            .collect();
        if let Some(key) = by_hand.filter(|k| !forget.contains(k)) {
            forget.push(key);
        }
        if forget.is_empty() {
            return;
        }
        let Some(node) = honest_live_node(&self.world, site, 0) else {
            return; // nobody at the office: it forgets later
        };
        if forget.last() == by_hand.as_ref() {
            self.images[image_idx].forgot_newest_at = n_acked;
            self.world.coverage.gc_forgot_newest += 1;
        }
        let key = self.world.sites[site].key.clone();
        let now_us = self.world.now_us;
        let owner = self.world.sites[site].id;
        let basis_before = self.world.nodes[node]
            .engine
            .as_ref()
            .expect("live")
            .catalog()
            .snapshot_digest(&owner);
        for snapshot_key in forget {
            let body = Tombstone {
                forgotten_unix_ms: now_us / 1000,
            }
            .encode();
            let tombstone = Record::sign(
                &key,
                RecordKind::Snapshot,
                snapshot_key,
                TOMBSTONE_VERSION,
                body,
            );
            self.world.signed(tombstone.clone());
            self.world.forgotten.insert(snapshot_key);
            let engine = self.world.nodes[node].engine.as_mut().expect("live");
            engine
                .handle_local_record(tombstone, now_us / 1000)
                .expect("a site's own tombstone is valid");
            let snap = self.images[image_idx]
                .snapshots
                .iter_mut()
                .find(|s| s.key == snapshot_key)
                .expect("a candidate");
            snap.forgotten_us = Some(now_us);
            if snap.acked_us.is_some() {
                for chunk in &snap.chunks {
                    if let Some(n) = self.world.acked_chunks.get_mut(&chunk.id) {
                        *n -= 1;
                        if *n == 0 {
                            self.world.acked_chunks.remove(&chunk.id);
                        }
                    }
                }
            }
            self.world.coverage.gc_forgotten += 1;
        }
        // Tombstones only take liveness away: the same batches, on the new basis, if
        // they were right for this node's view before them.
        restate(&mut self.world, node, basis_before, &BTreeSet::new());
        self.world.pump(node);
    }

    /// O2: a prune at `site`, on its live nodes in turn.
    pub(super) fn prune(&mut self, site: usize) {
        let turn = self.gc_track.prune_turn.get(&site).copied().unwrap_or(0);
        let Some(node) = honest_live_node(&self.world, site, turn) else {
            return;
        };
        // A node's backup holds its store's lock from its first dedup to its commit: a
        // prune there waits for it (here: is tried again at the next hourly step).
        if self
            .images
            .iter()
            .any(|i| i.in_progress.as_ref().is_some_and(|(n, _)| *n == node))
        {
            self.world.coverage.gc_prune_waited_for_backup += 1;
            self.gc_track.prune_waiting.insert(site);
            return;
        }
        self.gc_track.prune_turn.insert(site, turn + 1);
        let owner = self.world.sites[site].id;
        let Some((live, forgotten)) = mark(&self.world, &self.images, &self.snapshot_index, node)
        else {
            self.world.coverage.gc_mark_incomplete += 1;
            return;
        };
        let engine = self.world.nodes[node].engine.as_ref().expect("live");
        let local: Vec<ChunkId> = self.world.nodes[node]
            .disk
            .chunks
            .iter()
            .filter(|(_, c)| c.owner == owner)
            .map(|(id, _)| *id)
            .collect();
        let swept: Vec<ChunkId> = local
            .iter()
            .filter(|id| !live.contains(*id))
            .copied()
            .collect();
        let dead = gc::dead(local, forgotten, &live);
        let now_ms = self.world.now_us / 1000;
        let statement = engine.gc_statement(&owner);
        let sizes = &self.world.chunk_sizes;
        let plan = gc::prune_plan(
            statement.as_ref(),
            |b| engine.gc_batch(&owner, b).map(<[ChunkId]>::to_vec),
            &dead,
            &live,
            now_ms,
            self.retire_after_ms(),
            |id| sizes.get(id).copied().unwrap_or(0),
        );
        self.world.coverage.gc_batch_dropped_unknown += plan.n_dropped_unknown as u64;
        self.note_unlisted(site, &plan, statement.as_ref(), &dead, now_ms);
        if plan.revived {
            self.world.coverage.gc_revived_batches += 1;
        }
        let mut batches = Vec::with_capacity(plan.batches.len());
        for (batch, ids) in plan.batches {
            let engine = self.world.nodes[node].engine.as_mut().expect("live");
            if engine.gc_batch(&owner, &batch.id).is_none() {
                engine.handle_gc_batch(ids, now_ms);
            }
            batches.push(batch);
        }
        if std::env::var_os("CAIRN_SIM_TRACE_GC").is_some() {
            eprintln!(
                "gc prune: site {site} node {node} at {:.2} h: {} batches, {} new, {} dead",
                self.world.now_us as f64 / HOUR_US as f64,
                batches.len(),
                plan.n_new,
                dead.len()
            );
        }
        sign_statement(&mut self.world, node, batches);
        // Sweep: this node's own copies no kept snapshot it knows uses.
        for id in &swept {
            if self.world.remove_copy(node, id).is_some() {
                self.world
                    .check_gc_deletion(node, id, "swept by its site's prune");
                self.world.coverage.gc_swept += 1;
            }
        }
        let engine = self.world.nodes[node].engine.as_mut().expect("live");
        engine.handle_swept(&swept, now_ms);
        self.world.coverage.gc_prunes += 1;
        self.world.pump(node);
    }

    /// Invariant 12's excuses: the dead ids this prune could not list (past
    /// `GC_BATCHES_MAX`), and the ids of batches it retired.
    fn note_unlisted(
        &mut self,
        site: usize,
        plan: &gc::PrunePlan,
        statement: Option<&GcStatement>,
        dead: &[ChunkId],
        now_ms: u64,
    ) {
        let listed: BTreeSet<ChunkId> = plan
            .batches
            .iter()
            .flat_map(|(_, ids)| ids)
            .copied()
            .collect();
        let deferred: BTreeSet<ChunkId> = dead
            .iter()
            .filter(|id| !listed.contains(*id))
            .copied()
            .collect();
        self.world.coverage.gc_batches_max_deferred += plan.n_deferred as u64;
        self.gc_track.deferred.insert(site, deferred);
        self.gc_track.retired.retain(|id| !listed.contains(id));
        if plan.n_retired == 0 {
            return;
        }
        let owner = self.world.sites[site].id;
        let retire_after_ms = self.retire_after_ms();
        for batch in statement.map(|s| s.batches.as_slice()).unwrap_or_default() {
            if now_ms.saturating_sub(batch.listed_unix_ms) < retire_after_ms {
                continue;
            }
            for node in self.world.sites[site].nodes.clone() {
                if let Some(ids) = self.world.nodes[node]
                    .engine
                    .as_ref()
                    .and_then(|e| e.gc_batch(&owner, &batch.id))
                {
                    self.gc_track
                        .retired
                        .extend(ids.iter().filter(|id| !listed.contains(*id)));
                    break;
                }
            }
        }
        self.world.coverage.gc_batches_retired += plan.n_retired as u64;
    }

    fn retire_after_ms(&self) -> u64 {
        retire_after_ms(&self.world)
    }

    /// Garbage left at rest, for the report: chunks of forgotten snapshots no kept one
    /// uses, and their copies at the owner's nodes and at partners.
    pub(super) fn gc_figures(&mut self) {
        if self.world.scenario.gc.is_none() {
            return;
        }
        let mut kept = BTreeSet::new();
        let mut garbage = BTreeSet::new();
        for image in &self.images {
            for snapshot in &image.snapshots {
                let ids = snapshot.chunks.iter().map(|c| c.id);
                if snapshot.forgotten_us.is_some() {
                    garbage.extend(ids);
                } else {
                    kept.extend(ids);
                }
            }
        }
        garbage.retain(|id| !kept.contains(id));
        let (mut at_owner, mut at_partners) = (0u64, 0u64);
        for node in &self.world.nodes {
            for (id, chunk) in &node.disk.chunks {
                if garbage.contains(id) {
                    if self.world.sites[node.site].id == chunk.owner {
                        at_owner += 1;
                    } else {
                        at_partners += 1;
                    }
                }
            }
        }
        let c = &self.world.coverage;
        self.report.notes.push(format!(
            "gc: {} snapshots forgotten, {} prunes, {} garbage chunks; {} copies collected at partners, {} swept at owners; left at rest: {at_partners} copies at partners, {at_owner} at owners ({} not yet past their bound)",
            c.gc_forgotten,
            c.gc_prunes,
            garbage.len(),
            c.gc_collected,
            c.gc_swept,
            self.gc_track.not_due,
        ));
        self.world.coverage.gc_garbage_left_at_partners = at_partners;
    }
}

/// O3: right after node `node` committed a snapshot using `used`, the statement is
/// restated on its new basis, without those ids. Called with nothing used after a forget.
/// Only a statement that was right for this node's view just before (`basis_before`, its
/// snapshot digest then) can be carried over so: one signed on another view may list ids
/// of a snapshot this node knows and the statement's signer did not, and only a prune's
/// full mark can tell.
pub(super) fn restate(world: &mut World, node: usize, basis_before: u64, used: &BTreeSet<ChunkId>) {
    let owner = world.sites[world.nodes[node].site].id;
    let engine = world.nodes[node].engine.as_ref().expect("live");
    let Some(statement) = engine.gc_statement(&owner) else {
        return;
    };
    let sizes = &world.chunk_sizes;
    let restated = gc::restate(
        &statement,
        basis_before,
        |b| engine.gc_batch(&owner, b).map(<[ChunkId]>::to_vec),
        used,
        |id| sizes.get(id).copied().unwrap_or(0),
    );
    let Ok(restated) = restated else {
        // Another view's statement, or a batch this node cannot read: it signs nothing,
        // and the statement stays inactive wherever the new snapshot is known.
        world.coverage.gc_restate_skipped += 1;
        return;
    };
    let now_ms = world.now_us / 1000;
    let mut batches = Vec::with_capacity(restated.len());
    for (batch, ids) in restated {
        let engine = world.nodes[node].engine.as_mut().expect("live");
        if !ids.is_empty() && engine.gc_batch(&owner, &batch.id).is_none() {
            engine.handle_gc_batch(ids, now_ms);
        }
        batches.push(batch);
    }
    if batches
        .iter()
        .map(|b| b.id)
        .ne(statement.batches.iter().map(|b| b.id))
    {
        world.coverage.gc_revived_batches += 1;
    }
    sign_statement(world, node, batches);
}

/// Mark: the chunks of every kept snapshot of `node`'s site that its catalog knows (the
/// truth's chunk lists stand in for reading manifests), and those of the forgotten ones.
/// `None` when a kept snapshot's chunks cannot be found (the node's prune stops before it
/// signs, as a real mark does on a manifest it cannot read): a statement on a basis that
/// holds a snapshot its mark missed could list that snapshot's chunks (found by the
/// fallback re-sign in `retention.toml` seed 2, with a snapshot committed in the same
/// hourly step, before `snapshot_index` knew it).
fn mark(
    world: &World,
    images: &[Image],
    snapshot_index: &BTreeMap<[u8; 32], (usize, usize)>,
    node: usize,
) -> Option<(BTreeSet<ChunkId>, Vec<ChunkId>)> {
    let owner = world.sites[world.nodes[node].site].id;
    let engine = world.nodes[node].engine.as_ref().expect("live");
    let mut live = BTreeSet::new();
    let mut forgotten = Vec::new();
    for record in engine
        .catalog()
        .by_author(owner)
        .filter(|r| r.kind == RecordKind::Snapshot)
    {
        let snapshot = snapshot_index
            .get(&record.key)
            .map(|&(image, idx)| &images[image].snapshots[idx])
            .or_else(|| {
                images
                    .iter()
                    .flat_map(|i| &i.snapshots)
                    .find(|s| s.key == record.key)
            });
        let ids = match snapshot {
            Some(snapshot) => snapshot.chunks.iter().map(|c| c.id),
            None if record.is_tombstone() => continue,
            None => return None,
        };
        if record.is_tombstone() {
            forgotten.extend(ids);
        } else {
            live.extend(ids);
        }
    }
    Some((live, forgotten))
}

/// The fallback re-sign (docs/retention.md 3.3), on every live, honest node of every
/// site: once its snapshot digest has differed from the statement's basis for
/// `GC_RESTATE_AFTER_MS` (`gc::RestateWatch`), it restates the batches in force against
/// the live set of every kept snapshot it knows (`prune_plan` with no new garbage) and
/// signs them on its own basis.
pub(super) fn fallback_tick(
    world: &mut World,
    images: &[Image],
    snapshot_index: &BTreeMap<[u8; 32], (usize, usize)>,
    track: &mut Track,
) {
    if !world
        .scenario
        .gc
        .as_ref()
        .is_some_and(|g| g.fallback_resign)
    {
        return;
    }
    let now_ms = world.now_us / 1000;
    for site in 0..world.sites.len() {
        let owner = world.sites[site].id;
        for node in world.live_nodes_of(site) {
            if world.hostile_now(node).is_some() {
                continue;
            }
            let started_us = world.nodes[node].started_us;
            let engine = world.nodes[node].engine.as_ref().expect("live");
            let basis = engine.gc_statement(&owner).map(|s| s.basis);
            let digest = engine.catalog().snapshot_digest(&owner);
            let (since, watch) = track.watch.entry(node).or_default();
            if *since != started_us {
                // A new process: its clock starts again.
                *since = started_us;
                *watch = gc::RestateWatch::default();
            }
            if !watch.due(basis, digest, now_ms) {
                continue;
            }
            if images
                .iter()
                .any(|i| i.in_progress.as_ref().is_some_and(|(n, _)| *n == node))
            {
                continue; // its commit restates (O3), or the next tick does
            }
            let Some((live, _)) = mark(world, images, snapshot_index, node) else {
                world.coverage.gc_mark_incomplete += 1;
                continue;
            };
            let engine = world.nodes[node].engine.as_ref().expect("live");
            let statement = engine.gc_statement(&owner);
            let sizes = &world.chunk_sizes;
            let plan = gc::prune_plan(
                statement.as_ref(),
                |b| engine.gc_batch(&owner, b).map(<[ChunkId]>::to_vec),
                &[],
                &live,
                now_ms,
                retire_after_ms(world),
                |id| sizes.get(id).copied().unwrap_or(0),
            );
            world.coverage.gc_batch_dropped_unknown += plan.n_dropped_unknown as u64;
            let mut batches = Vec::with_capacity(plan.batches.len());
            for (batch, ids) in plan.batches {
                let engine = world.nodes[node].engine.as_mut().expect("live");
                if engine.gc_batch(&owner, &batch.id).is_none() {
                    engine.handle_gc_batch(ids, now_ms);
                }
                batches.push(batch);
            }
            if std::env::var_os("CAIRN_SIM_TRACE_GC").is_some() {
                eprintln!(
                    "gc fallback: site {site} node {node} at {:.2} h: {} batches",
                    world.now_us as f64 / HOUR_US as f64,
                    batches.len()
                );
            }
            sign_statement(world, node, batches);
            world.coverage.gc_fallback_resigned += 1;
            world.pump(node);
        }
    }
}

/// Twice what a holder may wait before deleting, and a day: long past every grace.
fn retire_after_ms(world: &World) -> u64 {
    let grace_ms = world
        .scenario
        .gc
        .as_ref()
        .map_or(0, |g| hours_us(g.grace_hours) / 1000)
        .max(world.config.gc_grace_min_ms);
    2 * grace_ms + 24 * HOUR_US / 1000
}

/// Coverage: a backup at `node` used chunks the statement in force lists as garbage
/// (it deduplicated against them), the race rules O3, H2 and H5 close.
pub(super) fn count_dedup_of_listed(world: &mut World, node: usize, used: &BTreeSet<ChunkId>) {
    let owner = world.sites[world.nodes[node].site].id;
    let engine = world.nodes[node].engine.as_ref().expect("live");
    let Some(statement) = engine.gc_statement(&owner) else {
        return;
    };
    let listed = statement
        .batches
        .iter()
        .filter_map(|b| engine.gc_batch(&owner, &b.id))
        .flatten()
        .filter(|id| used.contains(*id))
        .count();
    world.coverage.gc_dedup_of_listed += listed as u64;
}

/// Signs the site's next statement at `node` on its snapshot digest now.
fn sign_statement(world: &mut World, node: usize, batches: Vec<BatchRef>) {
    let site = world.nodes[node].site;
    let owner = world.sites[site].id;
    let engine = world.nodes[node].engine.as_ref().expect("live");
    let version = engine
        .catalog()
        .get(&statement_key(owner))
        .map_or(1, |r| r.version + 1);
    let grace_ms = world
        .scenario
        .gc
        .as_ref()
        .map_or(0, |g| hours_us(g.grace_hours) / 1000);
    if std::env::var_os("CAIRN_SIM_TRACE_GC").is_some() {
        eprintln!(
            "gc sign: site {site} node {node} at {:.4} h v{version} basis {:x} batches {:?}",
            world.now_us as f64 / HOUR_US as f64,
            engine.catalog().snapshot_digest(&owner),
            batches
                .iter()
                .map(|b| (cairn_protocol::ids::hex(&b.id.0[..4]), b.n_ids))
                .collect::<Vec<_>>()
        );
    }
    let statement = GcStatement {
        basis: engine.catalog().snapshot_digest(&owner),
        grace_ms,
        batches,
    };
    let record = Record::sign(
        &world.sites[site].key,
        RecordKind::GcStatement,
        [0; 32],
        version,
        statement.encode(),
    );
    world.signed(record.clone());
    let now_ms = world.now_us / 1000;
    let engine = world.nodes[node].engine.as_mut().expect("live");
    engine
        .handle_local_record(record, now_ms)
        .expect("a site's own statement is valid");
    world.coverage.gc_statements += 1;
}

fn statement_key(owner: SiteId) -> cairn_protocol::catalog::RecordKey {
    cairn_protocol::catalog::RecordKey {
        author: owner,
        kind: RecordKind::GcStatement,
        key: [0; 32],
    }
}

/// The `turn`-th live, honest node of a site (in turn), if any.
fn honest_live_node(world: &World, site: usize, turn: usize) -> Option<usize> {
    let live: Vec<usize> = world
        .live_nodes_of(site)
        .into_iter()
        .filter(|n| world.hostile_now(*n).is_none())
        .collect();
    (!live.is_empty()).then(|| live[turn % live.len()])
}

/// A civil time for simulated time: days of 24 hours from 2026-01-01 (months of 28
/// days, which is all `keep_last` needs and keeps daily buckets real).
fn civil_of(us: u64) -> Civil {
    let hours = us / HOUR_US;
    let day = hours / 24;
    let month = 1 + (day / 28) % 12;
    let year = 2026 + (day / (28 * 12)) as i32;
    Civil::new(year, month as u8, 1 + (day % 28) as u8, (hours % 24) as u8)
        .expect("in range by construction")
}

/// What the owner's side remembers between events, for invariant 12's bound and excuses.
#[derive(Default)]
pub struct Track {
    /// Per site, how many prunes it ran: the next prune goes to the next live node.
    prune_turn: BTreeMap<usize, usize>,
    /// Sites whose prune waits for a backup on its node.
    pub(super) prune_waiting: BTreeSet<usize>,
    /// Per site, dead ids its last prune could not list (past `GC_BATCHES_MAX`).
    deferred: BTreeMap<usize, BTreeSet<ChunkId>>,
    /// Ids of batches that retired (their holders are left to reconciliation, not built).
    retired: BTreeSet<ChunkId>,
    /// When a partition between two sites (either way) last ended.
    partition_ended_us: BTreeMap<(usize, usize), u64>,
    /// (node, chunk) copies of garbage found past their bound, for the report, with
    /// the bound and whether the node is of the owner's site.
    late: BTreeMap<(usize, ChunkId), (u64, bool)>,
    /// Garbage copies left at rest that are not past their bound yet, and why others are
    /// excused, counted by name.
    not_due: u64,
    /// Per node, the fallback re-sign's clock, and the process start it belongs to.
    watch: BTreeMap<usize, (u64, gc::RestateWatch)>,
    /// Prunes run before this time (the liveness phase's end less an hour).
    pub(super) prunes_until_us: u64,
}

impl Track {
    pub(super) fn prunes_allowed(&self, now_us: u64) -> bool {
        self.prunes_until_us == 0 || now_us < self.prunes_until_us
    }

    /// A partition between sites `a` and `b` ended now.
    pub(super) fn partition_ended(&mut self, a: usize, b: usize, now_us: u64) {
        let key = (a.min(b), a.max(b));
        self.partition_ended_us.insert(key, now_us);
    }
}

/// Why a garbage copy past its bound is still allowed (invariant 12's excuses).
const EXCUSE_OWNER_GONE: &str = "garbage: its owner site is gone (destroyed, not recovered)";
const EXCUSE_WINDOW: &str = "garbage: deletion deferred by the holder's window budget";
const EXCUSE_BATCHES_MAX: &str =
    "garbage: not listed yet, past GC_BATCHES_MAX batches in the statement";
const EXCUSE_TAKEN_BACK: &str =
    "garbage: taken here in an inactive gap after it became garbage, condemned afresh on its return";
const EXCUSE_RETIRED: &str = "garbage: its batch retired, left to reconciliation (not built)";

impl Run {
    /// Every chunk a backup used that no kept snapshot (nor a backup in progress) uses
    /// now, with the time it became garbage: the last forget of a snapshot using it, or
    /// the last backup that used it, whichever is later.
    fn garbage_since(&self) -> BTreeMap<ChunkId, (usize, u64)> {
        let mut live = BTreeSet::new();
        let mut garbage: BTreeMap<ChunkId, (usize, u64)> = BTreeMap::new();
        for image in &self.images {
            if let Some((_, chunks)) = &image.in_progress {
                live.extend(chunks.iter().map(|c| c.id));
            }
            for snapshot in &image.snapshots {
                match snapshot.forgotten_us {
                    None => live.extend(snapshot.chunks.iter().map(|c| c.id)),
                    Some(at) => {
                        for chunk in &snapshot.chunks {
                            let entry = garbage.entry(chunk.id).or_insert((image.site, at));
                            entry.1 = entry.1.max(at);
                        }
                    }
                }
            }
            for (id, used_us) in &image.used_at_us {
                let entry = garbage.entry(*id).or_insert((image.site, *used_us));
                entry.1 = entry.1.max(*used_us);
            }
        }
        garbage.retain(|id, _| !live.contains(id));
        garbage
    }

    /// Invariant 12 (docs/retention.md 4 (b)): a copy of garbage on a live, honest node
    /// past `t_g + T_spread + T_prune + T_spread + max(grace, grace_min) + 1 h` (a
    /// partner; T_spread = 1 h), or
    /// past `t_g + (nodes of the site + 1) x T_prune + 1 h` (a node of the owner's site,
    /// whose copies go only by its own prune's sweep, the site's prunes taking its nodes
    /// in turn), counted from the holder's, the owner site's or their link's return when
    /// later, is late unless a named excuse holds. Hourly, the late ones are remembered;
    /// `at_rest` reports them and the excuses.
    pub(super) fn check_garbage_gone(&mut self, at_rest: bool) {
        let Some(spec) = self.world.scenario.gc.clone() else {
            return;
        };
        let garbage = self.garbage_since();
        let now_us = self.world.now_us;
        let prune_us = hours_us(spec.prune_every_hours);
        let wait_us = hours_us(spec.grace_hours).max(self.world.config.gc_grace_min_ms * 1000);
        let mut excuses: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut not_due = 0u64;
        for node in 0..self.world.nodes.len() {
            let Some(engine) = self.world.nodes[node].engine.as_ref() else {
                continue;
            };
            if self.world.hostile_now(node).is_some() {
                continue;
            }
            let site = self.world.nodes[node].site;
            for id in self.world.nodes[node].disk.chunks.keys() {
                let Some(&(owner_site, since_us)) = garbage.get(id) else {
                    continue;
                };
                let owner = &self.world.sites[owner_site];
                let owner_back_us = owner
                    .nodes
                    .iter()
                    .map(|n| self.world.nodes[*n].started_us)
                    .max()
                    .unwrap_or(0);
                let link_back_us = self
                    .gc_track
                    .partition_ended_us
                    .get(&(site.min(owner_site), site.max(owner_site)))
                    .copied()
                    .unwrap_or(0);
                let from_us = since_us
                    .max(self.world.nodes[node].started_us)
                    .max(owner_back_us)
                    .max(link_back_us);
                // A prune waits for a backup on its node, and is tried again hourly.
                let backup_wait_us = self
                    .images
                    .iter()
                    .filter(|i| i.site == owner_site)
                    .map(|i| self.world.scenario.images[i.index].backup_minutes)
                    .filter(|m| *m > 0.0)
                    .map(|m| (m * 60e6) as u64 + HOUR_US)
                    .max()
                    .unwrap_or(0);
                let from_us = from_us + backup_wait_us;
                let bound_us = if site == owner_site {
                    from_us + (owner.nodes.len() as u64 + 1) * prune_us + HOUR_US
                } else {
                    // T_spread before the prune too: a prune lists only tombstones its
                    // node has heard of (here a prune and a forget can share an instant).
                    from_us + HOUR_US + prune_us + HOUR_US + wait_us + HOUR_US
                };
                if crate::world::trace_chunk(id) {
                    for image in &self.images {
                        for snap in &image.snapshots {
                            if snap.chunks.iter().any(|c| c.id == *id) {
                                eprintln!(
                                    "  in snapshot taken {:.2} h forgotten {:?}",
                                    snap.taken_us as f64 / HOUR_US as f64,
                                    snap.forgotten_us.map(|f| f as f64 / HOUR_US as f64)
                                );
                            }
                        }
                        eprintln!(
                            "  used_at {:?}",
                            image.used_at_us.get(id).map(|f| *f as f64 / HOUR_US as f64)
                        );
                    }
                    eprintln!(
                        "gc chunk {id:?} at node {node} {:.2} h bound {:.2} h: {}",
                        now_us as f64 / HOUR_US as f64,
                        bound_us as f64 / HOUR_US as f64,
                        engine.gc_explain(&owner.id, id, now_us / 1000)
                    );
                }
                if now_us <= bound_us {
                    not_due += 1;
                    continue;
                }
                let excuse = if owner.destroyed {
                    Some(EXCUSE_OWNER_GONE)
                } else if site != owner_site && engine.gc_window_deferred(&owner.id, now_us / 1000)
                {
                    Some(EXCUSE_WINDOW)
                } else if self
                    .gc_track
                    .deferred
                    .get(&owner_site)
                    .is_some_and(|d| d.contains(id))
                {
                    Some(EXCUSE_BATCHES_MAX)
                } else if self.gc_track.retired.contains(id) {
                    Some(EXCUSE_RETIRED)
                } else if self
                    .world
                    .copy_added_us
                    .get(&(node, *id))
                    .is_some_and(|added_us| {
                        // The bound again, from when this copy was taken.
                        let again_us = if site == owner_site {
                            (owner.nodes.len() as u64 + 1) * prune_us + HOUR_US
                        } else {
                            HOUR_US + wait_us + HOUR_US
                        };
                        *added_us > since_us && now_us <= added_us + again_us
                    })
                {
                    // Taken after it became garbage: only while the statement was
                    // inactive here (H3 freezes it otherwise). At a partner its grace
                    // starts when a statement is active again (unless it deleted it
                    // before: then it keeps its condemned time and goes at once); at a
                    // node of the owner's site it goes at that node's next prune.
                    Some(EXCUSE_TAKEN_BACK)
                } else {
                    None
                };
                match excuse {
                    Some(name) => *excuses.entry(name).or_insert(0) += 1,
                    None => {
                        if std::env::var_os("CAIRN_SIM_TRACE_GC").is_some()
                            && !self.gc_track.late.contains_key(&(node, *id))
                        {
                            eprintln!(
                                "gc late: {id:?} at node {node} (site {site}, owner site {owner_site}) since {:.2} h from {:.2} h bound {:.2} h now {:.2} h",
                                since_us as f64 / HOUR_US as f64,
                                from_us as f64 / HOUR_US as f64,
                                bound_us as f64 / HOUR_US as f64,
                                now_us as f64 / HOUR_US as f64
                            );
                            eprintln!(
                                "  explain: {}",
                                engine.gc_explain(&owner.id, id, now_us / 1000)
                            );
                        }
                        self.gc_track
                            .late
                            .entry((node, *id))
                            .or_insert((bound_us, site == owner_site));
                    }
                }
            }
        }
        if !at_rest {
            return;
        }
        self.gc_track.not_due = not_due;
        for (name, n) in excuses {
            self.report.excuses.insert(name.to_string(), n);
        }
        if let Some(((node, id), (bound_us, _))) = self.gc_track.late.iter().next() {
            let at_owners = self.gc_track.late.values().filter(|(_, own)| *own).count();
            self.report.violations.push(format!(
                "invariant 12: {} garbage copies held past their bound, {at_owners} of them at their owner's nodes (e.g. chunk {id:?} at node {node}, due gone by {:.2} h)",
                self.gc_track.late.len(),
                *bound_us as f64 / HOUR_US as f64
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use cairn_protocol::ids::ChunkId;

    use crate::scenario::Scenario;
    use crate::world::{DiskChunk, HOUR_US};

    fn late(run: &super::Run) -> usize {
        run.report
            .violations
            .iter()
            .filter(|v| v.starts_with("invariant 12"))
            .count()
    }

    #[test]
    fn invariant_12_fires_on_a_garbage_copy_left_past_its_bound_unless_its_owner_is_gone() {
        let mut scenario =
            Scenario::parse(include_str!("../../scenarios/retention.toml")).expect("parses");
        scenario.faults.clear();
        for image in &mut scenario.images {
            image.size_gib = 0.01;
        }
        let mut run = super::Run::new(scenario, 1);
        run.advance(HOUR_US, HOUR_US);
        // A chunk the fileserver's backup used at 0 h and no snapshot keeps, left on a
        // partner's disk.
        let id = ChunkId([0x5a; 32]);
        let owner_site = run.images[0].site;
        run.images[0].used_at_us.insert(id, 0);
        let partner = (0..run.world.nodes.len())
            .find(|n| run.world.nodes[*n].site != owner_site)
            .expect("a partner node");
        let body = run.world.nodes[partner]
            .disk
            .chunks
            .values()
            .next()
            .map(|c| c.body.clone())
            .unwrap_or_default();
        run.world.add_copy(
            partner,
            id,
            DiskChunk {
                owner: run.world.sites[owner_site].id,
                size_bytes: 1 << 19,
                body,
                good: true,
                bad_since_us: 0,
            },
        );
        // Within its bound: nothing.
        run.check_garbage_gone(true);
        assert_eq!(late(&run), 0, "{:?}", run.report.violations);
        // Past it (grace, prune period, backup and spread all passed): a violation.
        run.world.now_us = 40 * HOUR_US;
        run.check_garbage_gone(true);
        assert_eq!(late(&run), 1, "{:?}", run.report.violations);
        // The same copy with its owner site destroyed is excused by name.
        let mut run2 = run;
        run2.report.violations.clear();
        run2.gc_track = super::Track::default();
        run2.world.sites[owner_site].destroyed = true;
        run2.check_garbage_gone(true);
        assert_eq!(late(&run2), 0, "{:?}", run2.report.violations);
        assert_eq!(run2.report.excuses.get(super::EXCUSE_OWNER_GONE), Some(&1));
    }
}
