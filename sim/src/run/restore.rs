//! Restores: the final restore drill of every image on a fresh machine of its site
//! (invariant 3), and restore drills while faults run, through a live node of the site,
//! on a sample of a snapshot's chunks: they may fail (every holder unreachable), which is
//! counted, but they never return wrong bytes as good.

use std::collections::BTreeMap;

use cairn_protocol::engine::{ChunkRef, Event};
use cairn_protocol::identity::NodeId;
use cairn_protocol::ids::ChunkId;

use super::Run;
use crate::world::{Reported, HOUR_US};

/// Fetches a restore keeps in flight.
const RESTORE_FETCHES_IN_FLIGHT: usize = 256;
const RESTORE_DEADLINE_US: u64 = 48 * HOUR_US;
/// Chunks one drill fetches, and how long it may take before it is abandoned.
const DRILL_CHUNKS_MAX: usize = 24;
const DRILL_DEADLINE_US: u64 = HOUR_US;

/// A restore drill in progress while faults run.
pub(super) struct Drill {
    pub node: usize,
    incarnation: u64,
    started_us: u64,
    /// Chunks asked for, with the nodes that sent bad bytes for each.
    outstanding: BTreeMap<ChunkId, (ChunkRef, Vec<NodeId>)>,
}

impl Run {
    /// Starts a drill: the next image with an acknowledged snapshot, through a live,
    /// honest node of its site, on a sample of that snapshot's chunks.
    pub(super) fn start_drill(&mut self) {
        if self.drill.is_some() {
            return;
        }
        for k in 0..self.images.len() {
            let image_idx = (self.next_drill_image + k) % self.images.len();
            let image = &self.images[image_idx];
            let Some(snapshot) = image
                .snapshots
                .iter()
                .rev()
                .find(|s| s.acked_us.is_some() && s.forgotten_us.is_none())
            else {
                continue;
            };
            let nodes: Vec<usize> = self
                .world
                .live_nodes_of(image.site)
                .into_iter()
                .filter(|n| self.world.hostile_now(*n).is_none())
                .collect();
            if nodes.is_empty() {
                continue;
            }
            let node = nodes[self.world.rng.below(nodes.len() as u64) as usize];
            let chunks = snapshot.chunks.clone();
            let mut outstanding = BTreeMap::new();
            for _ in 0..DRILL_CHUNKS_MAX.min(chunks.len()) {
                let chunk = chunks[self.world.rng.below(chunks.len() as u64) as usize];
                outstanding.insert(chunk.id, (chunk, Vec::new()));
            }
            self.next_drill_image = image_idx + 1;
            self.world.coverage.drills += 1;
            self.drill = Some(Drill {
                node,
                incarnation: self.world.nodes[node].incarnation,
                started_us: self.world.now_us,
                outstanding: BTreeMap::new(),
            });
            for (id, (chunk, excluded)) in outstanding {
                self.world.coverage.drill_fetches += 1;
                self.fetch(node, chunk, &[]);
                self.drill
                    .as_mut()
                    .expect("set above")
                    .outstanding
                    .insert(id, (chunk, excluded));
            }
            return;
        }
    }

    /// Ends the drill when it is done, its node went down, or it ran out of time.
    pub(super) fn tend_drill(&mut self) {
        let Some(drill) = &self.drill else {
            return;
        };
        let node = &self.world.nodes[drill.node];
        let gone = node.engine.is_none() || node.incarnation != drill.incarnation;
        if gone
            || drill.outstanding.is_empty()
            || self.world.now_us > drill.started_us + DRILL_DEADLINE_US
        {
            self.drill = None;
        }
    }

    pub(super) fn drill_event(&mut self, reported: Reported) {
        let (node, partitioned) = (reported.node, reported.partitioned);
        match reported.event {
            Event::Fetched {
                id, from, sealed, ..
            } => {
                let drill = self.drill.as_mut().expect("routed here for a drill");
                let Some((chunk, mut excluded)) = drill.outstanding.remove(&id) else {
                    return;
                };
                if self.world.is_good_sealed(&id, &sealed) {
                    if partitioned {
                        self.world.coverage.restore_during_partition += 1;
                    }
                    return;
                }
                self.world.coverage.bad_copies_routed_around += 1;
                excluded.push(from);
                self.fetch(node, chunk, &excluded);
                self.drill
                    .as_mut()
                    .expect("still running")
                    .outstanding
                    .insert(id, (chunk, excluded));
            }
            Event::FetchFailed { id, .. } => {
                let drill = self.drill.as_mut().expect("routed here for a drill");
                if drill.outstanding.remove(&id).is_some() {
                    self.world.coverage.drill_fetch_failures += 1;
                }
            }
            _ => {}
        }
    }

    /// Invariant 3: restore the newest acknowledged snapshot of every image through a
    /// live node of its site, checking every chunk's bytes.
    pub(super) fn restore_all(&mut self) {
        for image_idx in 0..self.images.len() {
            let image = &self.images[image_idx];
            let Some(snapshot_idx) = image
                .snapshots
                .iter()
                .rposition(|s| s.acked_us.is_some() && s.forgotten_us.is_none())
            else {
                // A snapshot is acknowledged at R sites; while fewer than R of the sites
                // that may hold the owner's chunks are standing, none can be. The check
                // at rest still requires its chunks at every standing one.
                let owner = self.world.sites[image.site].id;
                if let (_, Some(excuse)) = self.sites_wanted(owner) {
                    self.report.notes.push(format!(
                        "image {}: {} snapshots taken, none acknowledged; excused: {excuse}",
                        image.name,
                        image.snapshots.len()
                    ));
                } else if !image.snapshots.is_empty() {
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
        let mut in_flight: BTreeMap<ChunkId, Vec<NodeId>> = BTreeMap::new();
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
                        if self.world.is_good_sealed(&id, &sealed) {
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

    fn fetch(&mut self, node: usize, chunk: ChunkRef, exclude: &[NodeId]) {
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
