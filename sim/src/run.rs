//! One simulation run: the images and their snapshots, the faults, and the invariant
//! checkers, from start to the final restore.
//!
//! Invariants:
//! 1. No acknowledged snapshot loses a chunk while fewer than R distinct sites suffered
//!    destructive faults inside the repair window (checked whenever a chunk's last copy
//!    goes, and hourly). Losses beyond that budget are reported, never silent.
//! 2. Once faults end, within `settle_hours`: every pair of live nodes holds the same
//!    records for every site both trust, and every chunk is at R distinct sites (or at
//!    every eligible site that still exists, when fewer than R do).
//! 3. Restoring the newest acknowledged snapshot of every image through the mesh gives
//!    exactly the bytes that were backed up.
//! 4. At rest, no chunk has more than R + `copies_slack` copies.
//! 5. No write takes a site past the quota it grants, or stores for a site it revoked.

use std::collections::{BTreeMap, BTreeSet};

use cairn_protocol::blob::sign_blob;
use cairn_protocol::engine::{ChunkRef, Event};
use cairn_protocol::identity::SiteId;
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{Record, RecordKind, TrustView};
use cairn_protocol::rng::Rng;

use crate::scenario::Scenario;
use crate::world::{hours_us, DiskChunk, Ev, World, GIB, HOUR_US};

const CHUNK_BYTES_MIN: u64 = 256 << 10;
const CHUNK_BYTES_MAX: u64 = 768 << 10;
/// One manifest chunk per this many data chunks, as the real manifest tree has.
const DATA_CHUNKS_PER_MANIFEST_CHUNK: usize = 256;
const MANIFEST_CHUNK_BYTES: u64 = 24 << 10;
/// Fetches a restore keeps in flight.
const RESTORE_FETCHES_IN_FLIGHT: usize = 256;
const RESTORE_DEADLINE_US: u64 = 48 * HOUR_US;

/// The stand-in sealed bytes of a chunk: short, and a function of its id, so a restore
/// can be checked byte for byte. On disk and on the wire they travel as a blob signed by
/// the owner site (`cairn_protocol::blob`), which every engine checks.
pub fn stand_in(id: &ChunkId) -> Vec<u8> {
    blake3::hash(&id.0).as_bytes()[..16].to_vec()
}

pub struct Snapshot {
    pub key: [u8; 32],
    pub chunks: Vec<ChunkRef>,
    pub acked_us: Option<u64>,
}

pub struct Image {
    pub site: usize,
    pub name: String,
    pub slots: Vec<(ChunkId, u64)>,
    pub change: f64,
    pub every_us: u64,
    pub snapshots: Vec<Snapshot>,
    rng: Rng,
    generation: u64,
}

impl Image {
    fn new(world: &mut World, idx: usize) -> Image {
        let spec = world.scenario.images[idx].clone();
        let site = world
            .scenario
            .site_index(&spec.site)
            .expect("checked at parse");
        let mut rng = world.rng.fork();
        let n_slots =
            ((spec.size_gib * GIB) as u64 / ((CHUNK_BYTES_MIN + CHUNK_BYTES_MAX) / 2)).max(1);
        let mut image = Image {
            site,
            name: spec.name.clone(),
            slots: Vec::new(),
            change: spec.change_per_snapshot,
            every_us: hours_us(spec.snapshot_every_hours),
            snapshots: Vec::new(),
            rng: rng.fork(),
            generation: 0,
        };
        for _ in 0..n_slots {
            let chunk = image.new_chunk();
            image.slots.push(chunk);
        }
        image
    }

    fn new_chunk(&mut self) -> (ChunkId, u64) {
        let mut id = [0u8; 32];
        self.rng.fill(&mut id);
        (
            ChunkId(id),
            self.rng.range(CHUNK_BYTES_MIN, CHUNK_BYTES_MAX),
        )
    }

    /// The next version of the image: some chunks rewritten, plus fresh manifest chunks.
    fn next_version(&mut self, owner: SiteId) -> Vec<ChunkRef> {
        if self.generation > 0 {
            for slot in 0..self.slots.len() {
                if self.rng.chance(self.change) {
                    self.slots[slot] = self.new_chunk();
                }
            }
        }
        self.generation += 1;
        let mut chunks: Vec<ChunkRef> = self
            .slots
            .iter()
            .map(|(id, size_bytes)| ChunkRef {
                owner,
                id: *id,
                size_bytes: *size_bytes,
            })
            .collect();
        let n_manifest = self.slots.len().div_ceil(DATA_CHUNKS_PER_MANIFEST_CHUNK);
        for _ in 0..n_manifest {
            let mut id = [0u8; 32];
            self.rng.fill(&mut id);
            chunks.push(ChunkRef {
                owner,
                id: ChunkId(id),
                size_bytes: MANIFEST_CHUNK_BYTES,
            });
        }
        chunks.sort_by_key(|c| c.id);
        chunks.dedup_by_key(|c| c.id);
        chunks
    }
}

#[derive(Default, Debug)]
pub struct Report {
    pub violations: Vec<String>,
    /// Losses past the fault budget: expected given the faults, still reported.
    pub losses_beyond_budget: Vec<String>,
    pub notes: Vec<String>,
    pub snapshots_taken: usize,
    pub snapshots_acked: usize,
    pub restores_ok: usize,
    pub restored_bytes: u64,
    pub trace_hash: String,
    pub sim_hours: f64,
    /// Chunk bytes pushed between nodes over the whole run (replication and repair).
    pub push_bytes: u64,
}

pub struct Run {
    pub world: World,
    pub images: Vec<Image>,
    /// Chunks of acknowledged snapshots, with how many such snapshots hold each.
    acked_chunks: BTreeMap<ChunkId, u32>,
    snapshot_index: BTreeMap<[u8; 32], (usize, usize)>,
    lost_beyond_budget: BTreeSet<ChunkId>,
    /// Fetch answers, for the restore in progress.
    fetch_events: Vec<crate::world::Reported>,
    pub report: Report,
}

impl Run {
    pub fn new(scenario: Scenario, seed: u64) -> Run {
        let mut world = World::new(scenario, seed);
        let images = (0..world.scenario.images.len())
            .map(|idx| Image::new(&mut world, idx))
            .collect();
        Run {
            world,
            images,
            acked_chunks: BTreeMap::new(),
            snapshot_index: BTreeMap::new(),
            lost_beyond_budget: BTreeSet::new(),
            fetch_events: Vec::new(),
            report: Report::default(),
        }
    }

    /// The whole run: the scenario's days, the settle time after the last fault, the
    /// final checks and the restores.
    pub fn execute(mut self) -> Report {
        let scenario = &self.world.scenario;
        let faults_end_us = hours_us(scenario.faults_end_hours());
        let settle_us = hours_us(scenario.settle_hours);
        let end_us = hours_us(scenario.days * 24.0).max(faults_end_us + settle_us);
        // Snapshots stop a settle period before the end, so the last one can reach R.
        let snapshots_until_us = end_us.saturating_sub(settle_us);
        self.advance(end_us, snapshots_until_us);
        self.collect_events();
        self.check_losses();
        self.check_at_rest();
        self.restore_all();
        self.report
            .violations
            .append(&mut self.world.quota_violations);
        self.report.trace_hash = self.world.trace.finalize().to_hex().to_string();
        self.report.push_bytes = self.world.stats.by_type.get("push").map_or(0, |(_, b)| *b);
        self.report.sim_hours = self.world.now_us as f64 / HOUR_US as f64;
        self.report
    }

    pub fn advance(&mut self, until_us: u64, snapshots_until_us: u64) {
        let images = &mut self.images;
        let mut pending_checks = false;
        let mut snapshot_events = Vec::new();
        self.world.run_until(until_us, |world, ev| match ev {
            Ev::Fault(idx) => {
                let kind = world.scenario.faults[idx].kind.clone();
                world.apply_fault(&kind);
            }
            Ev::Restart(node) => {
                if !world.sites[world.nodes[node].site].destroyed {
                    world.start_node(node, false);
                }
            }
            Ev::Heal { from, to } => {
                world.blocked.remove(&(from, to));
            }
            Ev::Snapshot(idx) => {
                let image = &mut images[idx];
                if world.now_us <= snapshots_until_us {
                    if let Some(taken) = take_snapshot(world, image) {
                        snapshot_events.push((idx, taken));
                    }
                }
                let next = world.now_us + image.every_us;
                world.schedule(next, Ev::Snapshot(idx));
            }
            Ev::Check => {
                pending_checks = true;
                let next = world.now_us + HOUR_US;
                world.schedule(next, Ev::Check);
            }
            Ev::Deliver { .. } | Ev::Timer { .. } => unreachable!("world handles these"),
        });
        for (image, snapshot) in snapshot_events {
            let key = self.images[image].snapshots[snapshot].key;
            self.snapshot_index.insert(key, (image, snapshot));
            self.report.snapshots_taken += 1;
        }
        self.collect_events();
        if pending_checks {
            self.check_losses();
        }
    }

    fn collect_events(&mut self) {
        for reported in std::mem::take(&mut self.world.reported) {
            if matches!(
                reported.event,
                Event::Fetched { .. } | Event::FetchFailed { .. }
            ) {
                self.fetch_events.push(reported);
                continue;
            }
            if let Event::SnapshotReplicated { snapshot } = reported.event {
                if let Some(&(image, idx)) = self.snapshot_index.get(&snapshot) {
                    let snap = &mut self.images[image].snapshots[idx];
                    if snap.acked_us.is_none() {
                        snap.acked_us = Some(self.world.now_us);
                        self.report.snapshots_acked += 1;
                        for chunk in &snap.chunks {
                            *self.acked_chunks.entry(chunk.id).or_insert(0) += 1;
                        }
                    }
                }
            }
        }
    }

    /// Invariant 1: every chunk whose last copy went.
    fn check_losses(&mut self) {
        let r = self.world.scenario.replication_factor;
        let window_us = hours_us(self.world.scenario.repair_window_hours);
        for (id, at_us) in std::mem::take(&mut self.world.zeroed) {
            if !self.acked_chunks.contains_key(&id) || self.world.copies.contains_key(&id) {
                continue;
            }
            let sites_hit: BTreeSet<usize> = self
                .world
                .destructive
                .iter()
                .filter(|(t, _)| *t <= at_us && at_us - *t <= window_us)
                .map(|(_, site)| *site)
                .collect();
            let what = format!(
                "chunk {id:?} of an acknowledged snapshot lost at {:.2} h",
                at_us as f64 / HOUR_US as f64
            );
            if sites_hit.len() >= r {
                self.lost_beyond_budget.insert(id);
                self.report.losses_beyond_budget.push(format!(
                    "{what}: {} sites suffered destructive faults in the window (R = {r})",
                    sites_hit.len()
                ));
            } else {
                self.report.violations.push(format!(
                    "invariant 1: {what}, with only {} sites hit in the window (R = {r})",
                    sites_hit.len()
                ));
            }
        }
    }

    /// Invariants 2 and 4, at the end: catalogs converged, every chunk at R sites, none
    /// with too many copies.
    fn check_at_rest(&mut self) {
        let world = &self.world;
        let live: Vec<usize> = (0..world.nodes.len())
            .filter(|n| world.nodes[*n].engine.is_some())
            .collect();
        let mut diverged = 0;
        for pair in live.windows(2) {
            let a = world.nodes[pair[0]].engine.as_ref().expect("live");
            let b = world.nodes[pair[1]].engine.as_ref().expect("live");
            for author in a.catalog().authors() {
                if b.trust().is_trusted(&author)
                    && a.catalog().digest(&author) != b.catalog().digest(&author)
                {
                    diverged += 1;
                }
            }
        }
        if diverged > 0 {
            self.report.violations.push(format!(
                "invariant 2: {diverged} (node pair, author) catalogs still differ after settling"
            ));
        }
        let r = world.scenario.replication_factor;
        let slack = world.scenario.copies_slack;
        let mut holders: BTreeMap<ChunkId, (BTreeSet<usize>, usize)> = BTreeMap::new();
        for &node in &live {
            for id in world.nodes[node].disk.chunks.keys() {
                let entry = holders.entry(*id).or_default();
                entry.0.insert(world.nodes[node].site);
                entry.1 += 1;
            }
        }
        let mut under = 0u64;
        let mut under_example = None;
        let mut over = 0u64;
        let mut above_r = 0u64;
        let mut checked = BTreeSet::new();
        for image in &self.images {
            let owner = world.sites[image.site].id;
            let eligible = world
                .truth
                .storers_for(owner)
                .into_iter()
                .filter(|(site, _)| {
                    world
                        .sites
                        .iter()
                        .any(|s| s.id == *site && !s.destroyed && !s.nodes.is_empty())
                })
                .count();
            let want = r.min(eligible);
            for snapshot in &image.snapshots {
                for chunk in &snapshot.chunks {
                    if !checked.insert(chunk.id) || self.lost_beyond_budget.contains(&chunk.id) {
                        continue;
                    }
                    let (sites, copies) = holders.get(&chunk.id).cloned().unwrap_or_default();
                    if sites.len() < want {
                        under += 1;
                        under_example.get_or_insert((chunk.id, sites.len()));
                    }
                    if copies > r + slack {
                        over += 1;
                    }
                    if copies > r {
                        above_r += 1;
                    }
                }
            }
        }
        if under > 0 {
            let (id, n) = under_example.expect("set with under");
            self.report.violations.push(format!(
                "invariant 2: {under} chunks below R sites after settling (e.g. {id:?} at {n})"
            ));
        }
        if over > 0 {
            self.report.violations.push(format!(
                "invariant 4: {over} chunks with more than R + {slack} copies at rest"
            ));
        }
        // Invariant 5 at rest: a site holds no more for a partner than it grants now.
        for ((site, owner), held) in &world.site_held {
            let site_id = world.sites[*site].id;
            if *owner == site_id || *held == 0 {
                continue;
            }
            let quota = world.truth.grant(site_id, *owner).map_or(0, |g| {
                if g.revoked {
                    0
                } else {
                    g.quota_bytes
                }
            });
            if *held > quota {
                self.report.violations.push(format!(
                    "invariant 5: site {} holds {held} bytes for a partner at rest, over its quota of {quota}",
                    world.sites[*site].name
                ));
            }
        }
        // Invariant 5 at rest: a site holds nothing for an owner either side revoked.
        for &node in &live {
            let site = world.nodes[node].site;
            let site_id = world.sites[site].id;
            for chunk in world.nodes[node].disk.chunks.values() {
                if chunk.owner == site_id {
                    continue;
                }
                let revoked =
                    |a: SiteId, b: SiteId| world.truth.grant(a, b).is_none_or(|g| g.revoked);
                if revoked(site_id, chunk.owner) || revoked(chunk.owner, site_id) {
                    self.report.violations.push(format!(
                        "invariant 5: site {} still holds chunks of a partner whose trust was revoked",
                        world.sites[site].name
                    ));
                    break;
                }
            }
        }
        self.report.notes.push(format!(
            "at rest: {} distinct chunks checked, {above_r} with more than R copies, {} live nodes",
            checked.len(),
            live.len()
        ));
    }

    /// Invariant 3: restore the newest acknowledged snapshot of every image through a
    /// live node of its site, checking every chunk's bytes.
    fn restore_all(&mut self) {
        for image_idx in 0..self.images.len() {
            let image = &self.images[image_idx];
            let Some(snapshot_idx) = image.snapshots.iter().rposition(|s| s.acked_us.is_some())
            else {
                if !image.snapshots.is_empty() {
                    self.report.violations.push(format!(
                        "image {}: {} snapshots taken, none acknowledged",
                        image.name,
                        image.snapshots.len()
                    ));
                }
                continue;
            };
            let site = image.site;
            if self.world.live_nodes_of(site).is_empty() {
                self.report.notes.push(format!(
                    "image {}: its site is destroyed and not recovered; restore skipped",
                    image.name
                ));
                continue;
            }
            // A restore drill on a fresh machine of the site: nothing local, all from the mesh.
            let node = self.world.recover_site(site);
            self.restore(image_idx, snapshot_idx, node);
        }
    }

    fn restore(&mut self, image_idx: usize, snapshot_idx: usize, node: usize) {
        let chunks = self.images[image_idx].snapshots[snapshot_idx]
            .chunks
            .clone();
        let name = self.images[image_idx].name.clone();
        let started_us = self.world.now_us;
        let deadline_us = started_us + RESTORE_DEADLINE_US;
        let mut next = 0;
        let mut in_flight: BTreeMap<ChunkId, Vec<cairn_protocol::identity::NodeId>> =
            BTreeMap::new();
        let mut done = 0usize;
        let mut bad_bytes = 0usize;
        let mut failed = Vec::new();
        while done + failed.len() < chunks.len() && self.world.now_us < deadline_us {
            while in_flight.len() < RESTORE_FETCHES_IN_FLIGHT && next < chunks.len() {
                let chunk = chunks[next];
                next += 1;
                self.fetch(node, chunk, &[]);
                in_flight.insert(chunk.id, Vec::new());
            }
            let step_to = self.world.now_us + 1_000_000;
            self.advance(step_to, 0);
            for reported in std::mem::take(&mut self.fetch_events) {
                if reported.node != node {
                    continue;
                }
                match reported.event {
                    Event::Fetched {
                        owner,
                        id,
                        from,
                        sealed,
                    } => {
                        let Some(mut excluded) = in_flight.remove(&id) else {
                            continue;
                        };
                        if sealed == stand_in(&id) {
                            done += 1;
                            self.report.restored_bytes += self.world.chunk_sizes[&id];
                        } else {
                            bad_bytes += 1;
                            excluded.push(from);
                            let size_bytes = self.world.chunk_sizes[&id];
                            self.fetch(
                                node,
                                ChunkRef {
                                    owner,
                                    id,
                                    size_bytes,
                                },
                                &excluded,
                            );
                            in_flight.insert(id, excluded);
                        }
                    }
                    Event::FetchFailed { id, .. } if in_flight.remove(&id).is_some() => {
                        failed.push(id);
                    }
                    _ => {}
                }
            }
        }
        let elapsed_h = (self.world.now_us - started_us) as f64 / HOUR_US as f64;
        let lost: Vec<&ChunkId> = failed
            .iter()
            .filter(|id| !self.lost_beyond_budget.contains(id))
            .collect();
        if done == chunks.len() {
            self.report.restores_ok += 1;
            self.report.notes.push(format!(
                "image {name}: restored {} chunks byte-exact in {elapsed_h:.2} simulated hours ({bad_bytes} bad copies routed around)",
                chunks.len()
            ));
        } else if !lost.is_empty() || done + failed.len() < chunks.len() {
            self.report.violations.push(format!(
                "invariant 3: restoring image {name} got {done} of {} chunks ({} failed, {} still missing after {elapsed_h:.1} h)",
                chunks.len(),
                failed.len(),
                chunks.len() - done - failed.len()
            ));
        } else {
            self.report.losses_beyond_budget.push(format!(
                "image {name}: {} chunks lost beyond the fault budget could not be restored",
                failed.len()
            ));
        }
    }

    fn fetch(
        &mut self,
        node: usize,
        chunk: ChunkRef,
        exclude: &[cairn_protocol::identity::NodeId],
    ) {
        let now_ms = self.world.now_us / 1000;
        let engine = self.world.nodes[node]
            .engine
            .as_mut()
            .expect("restorer is live");
        engine
            .handle_fetch(chunk.owner, chunk.id, exclude, now_ms)
            .expect("restore keeps fetches under the engine's limit");
        self.world.pump(node);
    }
}

/// A backup at the image's site: the new chunks are written to one live node's disk, and
/// its engine is handed the snapshot record and chunk list.
fn take_snapshot(world: &mut World, image: &mut Image) -> Option<usize> {
    let node = *world.live_nodes_of(image.site).first()?;
    let owner = world.sites[image.site].id;
    let chunks = image.next_version(owner);
    for chunk in &chunks {
        world.chunk_sizes.insert(chunk.id, chunk.size_bytes);
        if !world.nodes[node].disk.chunks.contains_key(&chunk.id) {
            world.add_copy(
                node,
                chunk.id,
                DiskChunk {
                    owner,
                    size_bytes: chunk.size_bytes,
                    body: sign_blob(
                        &world.sites[image.site].key,
                        &chunk.id,
                        &stand_in(&chunk.id),
                    ),
                },
            );
        }
    }
    let mut key = [0u8; 32];
    world.rng.fill(&mut key[..16]);
    let mut body = vec![0u8; 64];
    world.rng.fill(&mut body);
    let record = Record::sign(
        &world.sites[image.site].key,
        RecordKind::Snapshot,
        key,
        1,
        body,
    );
    world.truth.insert(record.clone());
    let now_ms = world.now_us / 1000;
    let engine = world.nodes[node].engine.as_mut().expect("live node");
    engine
        .handle_new_snapshot(record, &chunks, now_ms)
        .expect("the site's own snapshot record is valid");
    world.pump(node);
    image.snapshots.push(Snapshot {
        key,
        chunks,
        acked_us: None,
    });
    Some(image.snapshots.len() - 1)
}
