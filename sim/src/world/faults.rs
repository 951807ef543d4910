//! Faults: the scenario's crashes, lost and rotting disks, partitions and trust changes,
//! and the heal that starts the liveness phase.
//!
//! Disk faults:
//! - `corrupt`: bytes of stored chunks flip; the node is not told.
//! - `lost_writes`: a crash loses the storage operations of its last seconds (the disk
//!   acknowledged them but had not flushed). The crash comes during the node's next write
//!   after the fault's hour (within `LOST_WRITES_ARMED_US_MAX`), so there is something to
//!   lose. Only nodes such a fault will hit keep the journal that makes this possible.
//! - `old_disk`: the node comes back with a copy of its disk taken hours before: its
//!   records are older (grants since revoked), chunks deleted since are back, chunks
//!   written since are gone.

use std::collections::VecDeque;

use cairn_protocol::catalog::RecordKey;
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::Record;

use super::{hours_us, Disk, DiskChunk, Ev, SimNode, World, GIB};
use crate::scenario::FaultKind;

/// How far back a journal reaches: longer than any lost-writes window.
const JOURNAL_US_MAX: u64 = 120 * 1_000_000;
const JOURNAL_ENTRIES_MAX: usize = 1 << 16;
/// How long a lost-writes fault waits for a write before it crashes the node anyway.
const LOST_WRITES_ARMED_US_MAX: u64 =
    (crate::scenario::LOST_WRITES_WAIT_HOURS_MAX * super::HOUR_US as f64) as u64;

/// A lost-writes fault waiting for the node's next write.
#[derive(Clone, Copy, Debug)]
pub struct LostWritesArmed {
    window_us: u64,
    down_us: u64,
}

/// How to undo one storage operation that never reached the disk.
#[derive(Clone, Debug)]
pub enum Undo {
    ChunkAdded(ChunkId),
    ChunkRemoved(ChunkId, DiskChunk),
    /// A record saved or dropped: what the key held before.
    Record(RecordKey, Option<Record>),
}

impl World {
    /// Schedules the scenario's faults, the disk copies old-disk faults come back with,
    /// and a journal for every node a lost-writes fault will hit.
    pub(super) fn schedule_faults(&mut self) {
        for (idx, fault) in self.scenario.faults.clone().iter().enumerate() {
            let at_us = hours_us(fault.at_hours);
            self.schedule(at_us, Ev::Fault(idx));
            match &fault.kind {
                FaultKind::OldDisk { age_hours, .. } => {
                    self.schedule(
                        at_us.saturating_sub(hours_us(*age_hours)),
                        Ev::SaveImage(idx),
                    );
                }
                FaultKind::LostWrites { site, node, .. } => {
                    let site = self.scenario.site_index(site).expect("checked at parse");
                    let node = self.sites[site].nodes[*node];
                    self.nodes[node].journal.get_or_insert_with(VecDeque::new);
                }
                _ => {}
            }
        }
    }

    fn node_of(&self, site: &str, node: usize) -> (usize, usize) {
        let site = self.scenario.site_index(site).expect("checked at parse");
        (site, self.sites[site].nodes[node])
    }

    fn destroyed_at(&mut self, site: usize) {
        self.destructive.push((self.now_us, self.now_us, site));
    }

    /// Applies a scenario fault.
    pub fn apply_fault(&mut self, fault: usize) {
        match self.scenario.faults[fault].kind.clone() {
            FaultKind::Crash {
                site,
                node,
                for_hours,
            } => {
                let (_, idx) = self.node_of(&site, node);
                if self.nodes[idx].engine.is_some() {
                    self.stop_node(idx);
                    self.schedule(self.now_us + hours_us(for_hours), Ev::Restart(idx));
                }
            }
            FaultKind::DiskLoss {
                site,
                node,
                for_hours,
            } => {
                let (site, idx) = self.node_of(&site, node);
                self.stop_node(idx);
                self.wipe_disk(idx);
                self.destroyed_at(site);
                self.schedule(self.now_us + hours_us(for_hours), Ev::Restart(idx));
            }
            FaultKind::Corrupt { site, node, count } => {
                let (site, idx) = self.node_of(&site, node);
                self.corrupt_chunks(idx, count);
                self.destroyed_at(site);
            }
            FaultKind::LostWrites {
                site,
                node,
                window_secs,
                for_hours,
            } => {
                let (_, idx) = self.node_of(&site, node);
                self.nodes[idx].lost_writes_armed = Some(LostWritesArmed {
                    window_us: (window_secs * 1e6) as u64,
                    down_us: hours_us(for_hours),
                });
                self.schedule(self.now_us + LOST_WRITES_ARMED_US_MAX, Ev::LoseWrites(idx));
            }
            FaultKind::OldDisk {
                site,
                node,
                for_hours,
                ..
            } => {
                let (site, idx) = self.node_of(&site, node);
                let image = self.disk_images.remove(&fault).unwrap_or_default();
                self.stop_node(idx);
                self.nodes[idx].comes_back_with = Some(image);
                self.destroyed_at(site);
                self.schedule(self.now_us + hours_us(for_hours), Ev::Restart(idx));
            }
            FaultKind::DestroySite { site } => {
                let site = self.scenario.site_index(&site).expect("checked at parse");
                self.sites[site].destroyed = true;
                for idx in self.sites[site].nodes.clone() {
                    self.stop_node(idx);
                    self.wipe_disk(idx);
                }
                self.destroyed_at(site);
            }
            FaultKind::RecoverSite { site } => {
                let site = self.scenario.site_index(&site).expect("checked at parse");
                let _ = self.recover_site(site);
            }
            FaultKind::Partition {
                from,
                to,
                one_way,
                for_hours,
            } => {
                let a = self.scenario.site_index(&from).expect("checked at parse");
                let b = self.scenario.site_index(&to).expect("checked at parse");
                self.blocked.insert((a, b));
                let heal_at = self.now_us + hours_us(for_hours);
                self.schedule(heal_at, Ev::Heal { from: a, to: b });
                if !one_way {
                    self.blocked.insert((b, a));
                    self.schedule(heal_at, Ev::Heal { from: b, to: a });
                }
            }
            FaultKind::Revoke { by, of } => {
                let a = self.scenario.site_index(&by).expect("checked at parse");
                let b = self.scenario.site_index(&of).expect("checked at parse");
                let record = self.sign_grant(a, b, 0, true);
                self.grant_changed_at
                    .insert((a, self.sites[b].id), self.now_us);
                self.revoked_at.insert((a, b), self.now_us);
                self.hand_to_site(a, record);
            }
            FaultKind::Quota { by, of, gib } => {
                let a = self.scenario.site_index(&by).expect("checked at parse");
                let b = self.scenario.site_index(&of).expect("checked at parse");
                let record = self.sign_grant(a, b, (gib * GIB) as u64, false);
                self.grant_changed_at
                    .insert((a, self.sites[b].id), self.now_us);
                self.hand_to_site(a, record);
            }
        }
    }

    /// A write reached a node a lost-writes fault waits on: it crashes within the window,
    /// so the writes of this burst are lost.
    pub(super) fn wrote(&mut self, node: usize) {
        if let Some(armed) = self.nodes[node].lost_writes_armed {
            let delay_us = self.rng.below(armed.window_us / 2 + 1);
            self.schedule(self.now_us + delay_us, Ev::LoseWrites(node));
        }
    }

    /// The crash of a lost-writes fault: its last `window_us` of storage operations never
    /// reached the disk.
    pub(super) fn lose_writes(&mut self, node: usize) {
        let Some(armed) = self.nodes[node].lost_writes_armed.take() else {
            return; // already crashed by an earlier trigger
        };
        if self.nodes[node].engine.is_none() {
            return; // down already: nothing in flight to lose
        }
        self.stop_node(node);
        self.lose_unflushed(node, armed.window_us);
        self.destroyed_at(self.nodes[node].site);
        self.schedule(self.now_us + armed.down_us, Ev::Restart(node));
    }

    /// Flips one byte in each of up to `count` good chunks on a node's disk.
    pub fn corrupt_chunks(&mut self, node: usize, count: usize) {
        let good: Vec<ChunkId> = self.nodes[node]
            .disk
            .chunks
            .iter()
            .filter(|(_, c)| c.good)
            .map(|(id, _)| *id)
            .collect();
        for _ in 0..count.min(good.len()) {
            let id = good[self.rng.below(good.len() as u64) as usize];
            let chunk = self.nodes[node]
                .disk
                .chunks
                .get_mut(&id)
                .expect("listed above");
            if chunk.body.is_empty() {
                continue;
            }
            let at = self.rng.below(chunk.body.len() as u64) as usize;
            chunk.body[at] ^= 1 << self.rng.below(8);
            if chunk.good {
                self.trace(&id, || format!("node {node} copy rots"));
                let chunk = self.nodes[node]
                    .disk
                    .chunks
                    .get_mut(&id)
                    .expect("listed above");
                chunk.good = false;
                chunk.bad_since_us = self.now_us;
                self.coverage.copies_corrupted += 1;
                self.in_disk_fault = true;
                self.lose_good_copy(&id);
                self.in_disk_fault = false;
            }
        }
    }

    /// Notes a storage operation in the node's journal, if it keeps one.
    pub(super) fn journal(&mut self, node: usize, undo: Undo) {
        let now_us = self.now_us;
        let Some(journal) = self.nodes[node].journal.as_mut() else {
            return;
        };
        while journal
            .front()
            .is_some_and(|(t, _)| *t + JOURNAL_US_MAX < now_us)
            || journal.len() >= JOURNAL_ENTRIES_MAX
        {
            journal.pop_front();
        }
        journal.push_back((now_us, undo));
    }

    /// Undoes, newest first, the storage operations of the last `window_us`.
    fn lose_unflushed(&mut self, node: usize, window_us: u64) {
        let Some(mut journal) = self.nodes[node].journal.take() else {
            return;
        };
        let since_us = self.now_us.saturating_sub(window_us);
        self.in_disk_fault = true;
        while let Some((at_us, undo)) = journal.pop_back() {
            if at_us < since_us {
                break;
            }
            self.coverage.storage_ops_lost += 1;
            match undo {
                Undo::ChunkAdded(id) => {
                    let _ = self.remove_copy(node, &id);
                }
                Undo::ChunkRemoved(id, chunk) => self.add_copy(node, id, chunk),
                Undo::Record(key, before) => {
                    let records = &mut self.nodes[node].disk.records;
                    match before {
                        Some(record) => records.insert(key, record),
                        None => records.remove(&key),
                    };
                }
            }
        }
        self.in_disk_fault = false;
        self.nodes[node].journal = Some(VecDeque::new());
    }

    /// Copies a node's disk for the old-disk fault `fault`.
    pub(super) fn save_image(&mut self, fault: usize) {
        let FaultKind::OldDisk { site, node, .. } = &self.scenario.faults[fault].kind else {
            return;
        };
        let (_, idx) = self.node_of(&site.clone(), *node);
        self.disk_images.insert(fault, self.nodes[idx].disk.clone());
    }

    /// Swaps a node's disk for another (an old copy of it).
    fn replace_disk(&mut self, node: usize, disk: Disk) {
        let now_held = &self.nodes[node].disk;
        self.coverage.old_disks += 1;
        self.coverage.old_disk_chunks_back += disk
            .chunks
            .keys()
            .filter(|id| !now_held.chunks.contains_key(id))
            .count() as u64;
        self.coverage.old_disk_chunks_gone += now_held
            .chunks
            .keys()
            .filter(|id| !disk.chunks.contains_key(id))
            .count() as u64;
        self.coverage.old_disk_stale_records += disk
            .records
            .iter()
            .filter(|(key, r)| self.truth.get(key).is_some_and(|t| t.version > r.version))
            .count() as u64;
        self.wipe_disk(node);
        for (id, chunk) in disk.chunks {
            self.add_copy(node, id, chunk);
        }
        self.nodes[node].disk.records = disk.records;
    }

    /// Restarts a stopped node from its disk (an old one, after an old-disk fault).
    pub fn restart_node(&mut self, node: usize) {
        let n = &self.nodes[node];
        if n.engine.is_some() || n.retired || self.sites[n.site].destroyed {
            return;
        }
        if let Some(disk) = self.nodes[node].comes_back_with.take() {
            self.replace_disk(node, disk);
        }
        self.start_node(node, false);
    }

    /// The start of the liveness phase: partitions heal, stopped nodes restart, nodes
    /// whose behaviour destroyed data are retired for good (their site gets a fresh
    /// machine if it has none left), the other hostile nodes turn honest, and the
    /// outsider gives up.
    pub fn heal(&mut self) {
        self.healed = true;
        self.blocked.clear();
        for node in 0..self.nodes.len() {
            let Some(hostile) = self.nodes[node].hostile.take() else {
                continue;
            };
            if !hostile.behaviour.destroys_data() {
                continue;
            }
            let site = self.nodes[node].site;
            self.stop_node(node);
            self.wipe_disk(node);
            self.destroyed_at(site);
            self.nodes[node].retired = true;
            let others = self.sites[site]
                .nodes
                .iter()
                .any(|n| !self.nodes[*n].retired);
            if !others && !self.sites[site].destroyed {
                let _ = self.recover_site(site);
            }
        }
        for node in 0..self.nodes.len() {
            if !self.is_outsider(node) {
                self.restart_node(node);
            }
        }
    }

    /// A record signed at a site (by `cairn trust ...`): given to one live node there,
    /// which gossips it on, or with every node down to one's disk (swarm seed 103 lost
    /// such a quota change, and no node ever held the site's newest grant).
    pub fn hand_to_site(&mut self, site: usize, record: Record) {
        let now_ms = self.now_us / 1000;
        if let Some(&node) = self.sites[site]
            .nodes
            .iter()
            .find(|n| self.nodes[**n].engine.is_some())
        {
            let engine = self.nodes[node].engine.as_mut().expect("found live");
            engine
                .handle_local_record(record, now_ms)
                .expect("records the site signs are valid");
            self.pump(node);
        } else if let Some(&node) = self.sites[site]
            .nodes
            .iter()
            .find(|n| !self.nodes[**n].retired && !self.retired_at_heal(**n))
            .or(self.sites[site].nodes.first())
        {
            // Every node of the site is down: the operator's command writes the record
            // into a node's data directory, and the node loads it when it starts again
            // (a destroyed site's recovered machine gets it with the site's records).
            // Not into a node the heal wipes while the site has another to write to.
            self.nodes[node]
                .disk
                .records
                .insert(RecordKey::of(&record), record);
        }
    }

    /// A fresh machine resumes a destroyed site: a new node, certified by the site key
    /// (recovered from the recovery key), seeded with the site's records and its
    /// partners' (as `cairn recover` gets them from a partner).
    pub fn recover_site(&mut self, site: usize) -> usize {
        self.sites[site].destroyed = false;
        let mut node_id = [0u8; 32];
        self.rng.fill(&mut node_id);
        let idx = self.nodes.len();
        self.nodes.push(SimNode::new(
            site,
            cairn_protocol::identity::NodeId(node_id),
        ));
        self.node_index
            .insert(cairn_protocol::identity::NodeId(node_id), idx);
        self.sites[site].nodes.push(idx);
        self.sign_node_cert(site, idx);
        self.start_node(idx, true);
        idx
    }
}
