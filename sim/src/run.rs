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
//! 6. A corrupted copy is never served as good: an honest node never sends or stores a
//!    chunk whose bytes are wrong.
//! 7. Audits catch a holder that lies (or a copy that rotted) within a stated time.
//! 8. Nothing from the outsider, or from a site this one revoked, is ever accepted.
//! 9. Every record a node keeps was really signed by its author, and no older version
//!    replaces a newer one (forgeries, replays, old disks).
//! 10. Every peer is taken for a node of the site that really certified it.
//!
//! 6, 8, 9 and 10 are checked as things happen (`world::checks`); 2, 3 and 4 in the
//! liveness phase (`rest`, `restore`): after the faults, partitions heal, stopped nodes
//! restart and hostile nodes stop, and the mesh must converge within `settle_hours`.

mod gc;
mod rest;
mod restore;

use std::collections::{BTreeMap, BTreeSet};

use cairn_protocol::engine::{ChunkRef, Event};
use cairn_protocol::identity::SiteId;
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{Record, RecordKind};
use cairn_protocol::rng::Rng;

use crate::coverage::Coverage;
use crate::scenario::Scenario;
use crate::world::{hours_us, DiskChunk, Ev, World, GIB, HOUR_US};

/// How often the owners' nodes look at whether a fallback re-sign is due.
pub const GC_TICK_US: u64 = 60_000_000;

const CHUNK_BYTES_MIN: u64 = 256 << 10;
const CHUNK_BYTES_MAX: u64 = 768 << 10;
/// One manifest chunk per this many data chunks, as the real manifest tree has.
const DATA_CHUNKS_PER_MANIFEST_CHUNK: usize = 256;
const MANIFEST_CHUNK_BYTES: u64 = 24 << 10;

/// The stand-in sealed bytes of a chunk: short, and a function of its id, so a restore
/// can be checked byte for byte. On disk and on the wire they travel as a blob signed by
/// the owner site (`World::register_chunk`), which every engine checks.
pub fn stand_in(id: &ChunkId) -> Vec<u8> {
    blake3::hash(&id.0).as_bytes()[..16].to_vec()
}

pub struct Snapshot {
    pub key: [u8; 32],
    pub chunks: Vec<ChunkRef>,
    pub taken_us: u64,
    pub acked_us: Option<u64>,
    /// When its site forgot it (its tombstone signed).
    pub forgotten_us: Option<u64>,
}

pub struct Image {
    pub site: usize,
    pub name: String,
    pub slots: Vec<(ChunkId, u64)>,
    pub change: f64,
    pub every_us: u64,
    pub snapshots: Vec<Snapshot>,
    /// Its index in the scenario.
    pub index: usize,
    /// A backup that takes time, between its start and its commit: the node and chunks.
    pub in_progress: Option<(usize, Vec<ChunkRef>)>,
    /// The count of acknowledged snapshots at which the newest was last forgotten by
    /// hand (`forget_newest_every`).
    pub forgot_newest_at: usize,
    /// When a backup last used each chunk (it dedups or writes it at its start): a chunk
    /// no kept snapshot uses is garbage from the later of this and its last forget.
    pub used_at_us: BTreeMap<ChunkId, u64>,
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
            index: idx,
            in_progress: None,
            forgot_newest_at: 0,
            used_at_us: BTreeMap::new(),
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
    pub coverage: Coverage,
    /// Hours into the liveness phase at which the mesh was first found converged and at
    /// R (checked hourly); `None` if it never was within `settle_hours`.
    pub converged_after_hours: Option<f64>,
    /// Why some chunks are allowed below R at the end, with how many each excuses; keys
    /// that start with "records: " excuse (node, record) pairs from invariant 2.
    pub excuses: BTreeMap<String, u64>,
}

pub struct Run {
    pub world: World,
    pub images: Vec<Image>,
    snapshot_index: BTreeMap<[u8; 32], (usize, usize)>,
    lost_beyond_budget: BTreeSet<ChunkId>,
    /// Fetch answers, for the restore in progress.
    fetch_events: Vec<crate::world::Reported>,
    /// The restore drill in progress while faults run.
    drill: Option<restore::Drill>,
    next_drill_image: usize,
    gc_track: gc::Track,
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
            snapshot_index: BTreeMap::new(),
            lost_beyond_budget: BTreeSet::new(),
            fetch_events: Vec::new(),
            drill: None,
            next_drill_image: 0,
            gc_track: gc::Track::default(),
            report: Report::default(),
        }
    }

    /// The whole run: the faults until the heal, then the liveness phase (`settle_hours`
    /// for the mesh to converge and get back to R), the final checks and the restores.
    pub fn execute(mut self) -> Report {
        let heal_us = self.world.heal_us;
        let settle_us = hours_us(self.world.scenario.settle_hours);
        // Snapshots stop at the heal, so the last one can reach R in the liveness phase.
        // Hour by hour, so drills start and the hourly checks run on time.
        while self.world.now_us < heal_us {
            let step_to = (self.world.now_us + HOUR_US).min(heal_us);
            self.advance(step_to, heal_us);
        }
        self.drill = None;
        self.world.check_lies();
        for (a, b) in self.world.blocked.clone() {
            self.gc_track.partition_ended(a, b, heal_us);
        }
        self.world.heal();
        // Penalties engines imposed during the faults (cut-offs, placement exclusions)
        // hold their views apart until they end: the bound counts from then.
        let penalties_end_us = self.world.penalties_until_us.max(heal_us);
        if penalties_end_us > heal_us {
            self.report.excuses.insert(
                format!(
                    "liveness bound counted from {:.1} h after the heal, when the last penalty imposed during the faults ends",
                    (penalties_end_us - heal_us) as f64 / HOUR_US as f64
                ),
                0,
            );
        }
        self.liveness(penalties_end_us + settle_us);
        self.collect_events();
        self.check_losses();
        self.world.check_peer_sites();
        self.check_at_rest();
        self.check_garbage_gone(true);
        self.gc_figures();
        self.restore_all();
        self.report.violations.append(&mut self.world.violations);
        self.report.trace_hash = self.world.trace.finalize().to_hex().to_string();
        self.report.push_bytes = self.world.stats.by_type.get("push").map_or(0, |(_, b)| *b);
        self.report.sim_hours = self.world.now_us as f64 / HOUR_US as f64;
        self.report.coverage = self.world.coverage.clone();
        self.report
    }

    pub fn advance(&mut self, until_us: u64, snapshots_until_us: u64) {
        let images = &mut self.images;
        let (snapshot_index, gc_track) = (&self.snapshot_index, &mut self.gc_track);
        let mut pending_checks = false;
        let mut drills_due = 0;
        let mut snapshot_events = Vec::new();
        let mut prunes = Vec::new();
        let mut partitions_ended = Vec::new();
        self.world.run_until(until_us, |world, ev| match ev {
            Ev::Fault(idx) => world.apply_fault(idx),
            Ev::Restart(node) => world.restart_node(node),
            Ev::Drill => {
                drills_due += 1;
                if let Some(every) = world.scenario.drill_every_hours {
                    let next = world.now_us + hours_us(every);
                    if next < world.heal_us {
                        world.schedule(next, Ev::Drill);
                    }
                }
            }
            Ev::Heal { from, to } => {
                world.blocked.remove(&(from, to));
                partitions_ended.push((from, to));
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
            Ev::Prune(site) => {
                prunes.push(site);
                if let Some(gc) = &world.scenario.gc {
                    // Through the liveness phase too: the owner's scheduler prunes daily.
                    let next = world.now_us + hours_us(gc.prune_every_hours);
                    world.schedule(next, Ev::Prune(site));
                }
            }
            Ev::GcTick => {
                gc::fallback_tick(world, images, snapshot_index, gc_track);
                world.schedule(world.now_us + GC_TICK_US, Ev::GcTick);
            }
            Ev::Commit(idx) => {
                if let Some(taken) = finish_backup(world, &mut images[idx]) {
                    snapshot_events.push((idx, taken));
                }
            }
            Ev::Check => {
                pending_checks = true;
                let next = world.now_us + HOUR_US;
                world.schedule(next, Ev::Check);
            }
            Ev::Deliver { .. }
            | Ev::Timer { .. }
            | Ev::SaveImage(_)
            | Ev::HostileTick(_)
            | Ev::OutsiderTick
            | Ev::AdmissionTimer { .. }
            | Ev::StrangerDue { .. }
            | Ev::LoseWrites(_) => unreachable!("world handles these"),
        });
        for (image, snapshot) in snapshot_events {
            let key = self.images[image].snapshots[snapshot].key;
            self.snapshot_index.insert(key, (image, snapshot));
            self.report.snapshots_taken += 1;
            self.apply_policy(image);
        }
        self.collect_events();
        for (from, to) in partitions_ended {
            self.gc_track.partition_ended(from, to, self.world.now_us);
        }
        prunes.extend(std::mem::take(&mut self.gc_track.prune_waiting));
        prunes.sort_unstable();
        prunes.dedup();
        for site in prunes {
            if self.gc_track.prunes_allowed(self.world.now_us) {
                self.prune(site);
            }
        }
        self.tend_drill();
        if drills_due > 0 && !self.world.healed {
            self.start_drill();
        }
        if pending_checks {
            self.check_losses();
            self.world.check_peer_sites();
            self.world.check_lies();
            self.check_garbage_gone(false);
        }
    }

    fn collect_events(&mut self) {
        for reported in std::mem::take(&mut self.world.reported) {
            if matches!(
                reported.event,
                Event::Fetched { .. } | Event::FetchFailed { .. }
            ) {
                if self.drill.as_ref().is_some_and(|d| d.node == reported.node) {
                    self.drill_event(reported);
                } else {
                    self.fetch_events.push(reported);
                }
                continue;
            }
            if let Event::SnapshotReplicated { snapshot } = reported.event {
                if let Some(&(image, idx)) = self.snapshot_index.get(&snapshot) {
                    let snap = &mut self.images[image].snapshots[idx];
                    if snap.acked_us.is_none() {
                        snap.acked_us = Some(self.world.now_us);
                        self.report.snapshots_acked += 1;
                        if snap.forgotten_us.is_none() {
                            for chunk in &snap.chunks {
                                *self.world.acked_chunks.entry(chunk.id).or_insert(0) += 1;
                            }
                        }
                        self.apply_policy(image);
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
            if !self.world.acked_chunks.contains_key(&id) || self.world.copies.contains_key(&id) {
                continue;
            }
            let sites_hit: BTreeSet<usize> = self
                .world
                .destructive
                .iter()
                .filter(|(from, until, _)| *from <= at_us && at_us <= until + window_us)
                .map(|(_, _, site)| *site)
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
}

/// A backup at the image's site: the new chunks are written to one live node's disk, and
/// its engine is handed the snapshot record and chunk list.
fn take_snapshot(world: &mut World, image: &mut Image) -> Option<usize> {
    if image.in_progress.is_some() {
        return None; // the last backup is still running
    }
    // The backup runs on an honest machine of the office when there is one. At the heal's
    // instant, not on one the heal is about to retire when another is up: the wipe would
    // take the snapshot's record before any gossip, while the office had a machine to
    // keep it (swarm seed 118).
    let live = world.live_nodes_of(image.site);
    let retiring = |n: usize| world.now_us >= world.heal_us && world.retired_at_heal(n);
    let node = *live
        .iter()
        .find(|n| world.hostile_now(**n).is_none() && !retiring(**n))
        .or_else(|| live.iter().find(|n| world.hostile_now(**n).is_none()))
        .or(live.first())?;
    let owner = world.sites[image.site].id;
    let chunks = image.next_version(owner);
    write_backup(world, node, owner, image.site, &chunks);
    if world.scenario.gc.is_some() {
        for chunk in &chunks {
            image.used_at_us.insert(chunk.id, world.now_us);
        }
    }
    let minutes = world.scenario.images[image.index].backup_minutes;
    if minutes > 0.0 {
        // Deduplicated against the disk now; the record and the engine at the end.
        let at = world.now_us + (minutes * 60e6) as u64;
        world.schedule(at, Ev::Commit(image.index));
        image.in_progress = Some((node, chunks));
        return None;
    }
    commit_snapshot(world, image, node, chunks)
}

/// The end of a backup that took time: its node commits it, if it is still up.
pub(crate) fn finish_backup(world: &mut World, image: &mut Image) -> Option<usize> {
    let (node, chunks) = image.in_progress.take()?;
    // Crashed mid-backup: no snapshot, its chunks stay on the disk.
    world.nodes[node].engine.as_ref()?;
    commit_snapshot(world, image, node, chunks)
}

/// The new chunks of a backup written to its node's disk.
fn write_backup(world: &mut World, node: usize, owner: SiteId, site: usize, chunks: &[ChunkRef]) {
    for chunk in chunks {
        let body = world.register_chunk(site, chunk);
        if !world.nodes[node].disk.chunks.contains_key(&chunk.id) {
            world.add_copy(
                node,
                chunk.id,
                DiskChunk {
                    owner,
                    size_bytes: chunk.size_bytes,
                    body,
                    good: true,
                    bad_since_us: 0,
                },
            );
        }
    }
}

/// The commit: the snapshot record signed and handed, with its chunks, to the engine.
fn commit_snapshot(
    world: &mut World,
    image: &mut Image,
    node: usize,
    chunks: Vec<ChunkRef>,
) -> Option<usize> {
    let owner = world.sites[image.site].id;
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
    world.signed(record.clone());
    let now_ms = world.now_us / 1000;
    let engine = world.nodes[node].engine.as_mut().expect("live node");
    let basis_before = engine.catalog().snapshot_digest(&owner);
    engine
        .handle_new_snapshot(record, &chunks, now_ms)
        .expect("the site's own snapshot record is valid");
    world.pump(node);
    // O3: the commit revives what the statement in force lists of it.
    let used: BTreeSet<ChunkId> = chunks.iter().map(|c| c.id).collect();
    gc::count_dedup_of_listed(world, node, &used);
    let skip = world
        .scenario
        .gc
        .as_ref()
        .map_or(0.0, |g| g.skip_restate_chance);
    if skip > 0.0 && world.rng.chance(skip) {
        world.coverage.gc_restate_skipped += 1;
    } else {
        gc::restate(world, node, basis_before, &used);
        world.pump(node);
    }
    image.snapshots.push(Snapshot {
        key,
        chunks,
        taken_us: world.now_us,
        acked_us: None,
        forgotten_us: None,
    });
    Some(image.snapshots.len() - 1)
}
