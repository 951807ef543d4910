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

use std::collections::BTreeSet;

use cairn_protocol::gc::{self, BatchRef, GcStatement};
use cairn_protocol::identity::SiteId;
use cairn_protocol::ids::{ChunkId, SnapshotId};
use cairn_protocol::record::{Record, RecordKind, Tombstone, TOMBSTONE_VERSION};
use cairn_protocol::retention::{self, Candidate, Civil, Count, Policy};

use super::Run;
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

    /// O2: a prune at `site`, on its `turn`-th live node.
    pub(super) fn prune(&mut self, site: usize, turn: usize) {
        let Some(node) = honest_live_node(&self.world, site, turn) else {
            return;
        };
        // A node's backup holds its store's lock from its first dedup to its commit: a
        // prune there waits (here: is left for the next one).
        if self
            .images
            .iter()
            .any(|i| i.in_progress.as_ref().is_some_and(|(n, _)| *n == node))
        {
            self.world.coverage.gc_prune_waited_for_backup += 1;
            return;
        }
        let owner = self.world.sites[site].id;
        let engine = self.world.nodes[node].engine.as_ref().expect("live");
        // Mark: every kept snapshot of the site this node knows of.
        let mut live = BTreeSet::new();
        let mut forgotten = Vec::new();
        for record in engine
            .catalog()
            .by_author(owner)
            .filter(|r| r.kind == RecordKind::Snapshot)
        {
            let Some(&(image, idx)) = self.snapshot_index.get(&record.key) else {
                continue;
            };
            let ids = self.images[image].snapshots[idx]
                .chunks
                .iter()
                .map(|c| c.id);
            if record.is_tombstone() {
                forgotten.extend(ids);
            } else {
                live.extend(ids);
            }
        }
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

    /// Twice what a holder may wait before deleting, and a day: long past every grace.
    fn retire_after_ms(&self) -> u64 {
        let grace_ms = self.grace_ms().max(self.world.config.gc_grace_min_ms);
        2 * grace_ms + 24 * HOUR_US / 1000
    }

    fn grace_ms(&self) -> u64 {
        self.world
            .scenario
            .gc
            .as_ref()
            .map_or(0, |g| hours_us(g.grace_hours) / 1000)
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
            "gc: {} snapshots forgotten, {} prunes, {} garbage chunks; {} copies collected at partners, {} swept at owners; left at rest: {at_partners} copies at partners, {at_owner} at owners",
            c.gc_forgotten,
            c.gc_prunes,
            garbage.len(),
            c.gc_collected,
            c.gc_swept,
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
