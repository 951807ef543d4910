//! Replication and repair: where each held chunk belongs, how copies get there, and when
//! an extra copy may go.
//!
//! - Placement (`rebuild_placement`): for every owner whose chunks this node holds, the
//!   sites that store for it and their nodes that are not dead; each held chunk gets its
//!   R target nodes from `placement::targets`. Recomputed only when trust or membership
//!   changes, never per message.
//! - Sync: for every co-target peer and owner, this node keeps per-partition XOR digests
//!   of the chunks both should hold and it does hold. Every `sync_interval_ms` it sends
//!   one peer its digests; differing partitions are listed (`SyncIds`) and each side
//!   pushes what the other lacks. Converged peers exchange 64 u64s per owner.
//! - Offers: a node holding a chunk it is not a target for (the owner's backup node, a
//!   site that was replaced, a returning node) offers it to the targets, pushes what they
//!   lack, and deletes its copy only after `trim_grace_ms` and once every one of at least
//!   R targets confirmed it holds the chunk, or a target of its own site did (then the
//!   copy adds no site). New snapshots are offered the same way, and
//!   acknowledged once every chunk is confirmed at R distinct sites.
//! - Pushes go through one queue, rate-limited by a token bucket and bounded in flight.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::message::{Message, IDS_PER_MESSAGE_MAX, PARTITIONS};
use super::{
    chunk_hash, partition_of, partition_start, ChunkRef, Engine, Event, PeerState, StorageOp,
    HELD_CHUNKS_MAX, PENDING_SNAPSHOTS_MAX,
};
use crate::identity::{NodeId, SiteId};
use crate::ids::ChunkId;
use crate::placement::{self, Candidate, SiteNodes};

/// Chunk writes waiting for the disk.
pub const WRITES_IN_FLIGHT_MAX: usize = 256;
/// Pushes waiting their turn.
pub const PUSH_QUEUE_MAX: usize = 1 << 20;

#[derive(Clone, Debug)]
pub(super) struct Held {
    pub owner: SiteId,
    pub size_bytes: u64,
    pub targets: Vec<NodeId>,
    /// Set while this node is not one of the targets.
    pub excess_since_ms: Option<u64>,
    /// Targets that said they hold the chunk since placement last changed, each with
    /// the snapshot digest for the owner it said so with. A confirmation counts (toward
    /// a snapshot at R, or a trim) only while that digest equals this node's own
    /// (`Engine::counts`, rule H5).
    pub confirmed: BTreeMap<NodeId, u64>,
    /// Targets whose sync listed the chunk's partition without it, since they last
    /// confirmed it: what status counts as missing there rather than unknown.
    pub lacking: BTreeSet<NodeId>,
    /// When this node last offered the chunk to anyone.
    pub offered_at_ms: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct PendingSnapshot {
    /// Chunks not yet at R sites, with the sites confirmed so far.
    pub chunks: BTreeMap<ChunkId, BTreeSet<SiteId>>,
}

#[derive(Clone, Debug)]
pub(super) enum ReadPurpose {
    Push {
        to: NodeId,
    },
    Serve {
        to: NodeId,
        owner: SiteId,
    },
    Fetch {
        owner: SiteId,
    },
    /// This node's copy, to check it is still good.
    Scrub,
    /// This node's copy, to know what `to` must answer to an audit.
    Audit {
        to: NodeId,
    },
    /// This node's copy, to answer an audit from `to`.
    AuditAnswer {
        to: NodeId,
        owner: SiteId,
        nonce: [u8; 32],
    },
}

/// Per owner: the sites that may hold its chunks and their nodes that are not dead.
#[derive(Clone, Debug, Default)]
pub(super) struct Placement {
    pub by_owner: BTreeMap<SiteId, Vec<SiteNodes>>,
}

impl Placement {
    pub fn targets(&self, owner: &SiteId, id: &ChunkId, r: usize) -> Vec<NodeId> {
        self.by_owner
            .get(owner)
            .map(|sites| placement::targets(id, owner, sites, r))
            .unwrap_or_default()
    }

    /// Every node that may hold `owner`'s chunks.
    pub fn storer_nodes(&self, owner: &SiteId) -> Vec<NodeId> {
        self.by_owner
            .get(owner)
            .map(|sites| {
                sites
                    .iter()
                    .flat_map(|s| s.nodes.iter().map(|c| c.id))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Pushes waiting, in flight, and the token bucket that paces them.
pub(super) struct PushQueue {
    queue: VecDeque<(NodeId, ChunkId)>,
    queued: BTreeSet<(NodeId, ChunkId)>,
    in_flight: BTreeMap<(NodeId, ChunkId), u64>,
    bytes_per_sec: u64,
    /// Bytes that may be sent now; negative after a chunk larger than the balance.
    tokens: i64,
    refilled_at_ms: u64,
}

impl PushQueue {
    pub fn new(bytes_per_sec: u64, now_ms: u64) -> PushQueue {
        assert!(bytes_per_sec > 0, "a zero push rate would stop all repair");
        PushQueue {
            queue: VecDeque::new(),
            queued: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            bytes_per_sec,
            tokens: 0,
            refilled_at_ms: now_ms,
        }
    }

    fn burst(&self) -> i64 {
        // One second of sending, and at least one largest chunk.
        (self.bytes_per_sec.max(16 << 20)) as i64
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.refilled_at_ms);
        let add = u128::from(elapsed_ms) * u128::from(self.bytes_per_sec) / 1000;
        self.tokens = (i128::from(self.tokens) + add as i128).min(i128::from(self.burst())) as i64;
        self.refilled_at_ms = now_ms;
    }

    /// When a queued push could next start, if one is waiting on the rate limit alone.
    pub fn ready_at(&self) -> Option<u64> {
        if self.queue.is_empty() {
            return None;
        }
        let earliest_expiry = self.in_flight.values().min().copied();
        if self.tokens > 0 {
            return earliest_expiry.or(Some(self.refilled_at_ms));
        }
        let wait_ms = (1 - self.tokens) as u64 * 1000 / self.bytes_per_sec + 1;
        let at = self.refilled_at_ms + wait_ms;
        Some(earliest_expiry.map_or(at, |e| e.min(at)))
    }

    pub fn len(&self) -> usize {
        self.queue.len() + self.in_flight.len()
    }
}

impl Engine {
    /// Adds a chunk to what this node holds (after a write, at load, for a new snapshot).
    pub(super) fn hold(&mut self, chunk: ChunkRef) {
        if self.held.contains_key(&chunk.id) {
            return;
        }
        assert!(
            self.held.len() < HELD_CHUNKS_MAX,
            "node holds at most HELD_CHUNKS_MAX"
        );
        self.held.insert(
            chunk.id,
            Held {
                owner: chunk.owner,
                size_bytes: chunk.size_bytes,
                targets: Vec::new(),
                excess_since_ms: None,
                confirmed: BTreeMap::new(),
                lacking: BTreeSet::new(),
                offered_at_ms: None,
            },
        );
        *self.used_by_owner.entry(chunk.owner).or_insert(0) += chunk.size_bytes;
        self.gc_note_held(chunk.owner);
        if !self.placement_stale {
            self.place_owner(chunk.owner);
            self.place_chunk(chunk.id);
        }
    }

    /// Forgets a chunk (deleted, or found lost on disk).
    pub(super) fn unhold(&mut self, id: &ChunkId) {
        let Some(held) = self.held.remove(id) else {
            return;
        };
        let used = self.used_by_owner.entry(held.owner).or_insert(0);
        *used = used.saturating_sub(held.size_bytes);
        // A frozen (condemned) chunk is already out of the digests.
        if held.excess_since_ms.is_none() && !self.gc_frozen(id) {
            self.xor_pair_digests(id, &held.owner, &held.targets);
        }
        if let Some(since) = held.excess_since_ms {
            self.excess_by_since.remove(&(since, *id));
        }
        self.excess.remove(id);
    }

    pub(super) fn xor_pair_digests(&mut self, id: &ChunkId, owner: &SiteId, targets: &[NodeId]) {
        let partition = partition_of(id);
        for target in targets {
            if *target != self.node {
                let digests = self
                    .pair_digests
                    .entry((*target, *owner))
                    .or_insert([0; PARTITIONS]);
                digests[partition] ^= chunk_hash(id);
            }
        }
    }

    pub(super) fn rebuild_placement(&mut self) {
        self.placement_stale = false;
        let mut owners: BTreeSet<SiteId> = self.used_by_owner.keys().copied().collect();
        owners.insert(self.site);
        let by_owner = owners
            .into_iter()
            .map(|owner| (owner, self.owner_sites(owner)))
            .collect();
        self.placement = Placement { by_owner };
        self.pair_digests.clear();
        self.their_roots.clear();
        self.excess.clear();
        // `excess_since_ms` outlives a rebuild (a chunk still excess keeps its time), so
        // its index does too: `place_chunk` updates it.
        let ids: Vec<ChunkId> = self.held.keys().copied().collect();
        for id in ids {
            self.place_chunk(id);
        }
    }

    /// Adds one owner to a placement that is otherwise current (its first chunk here,
    /// or a restore of it), without re-placing every held chunk.
    pub(super) fn place_owner(&mut self, owner: SiteId) {
        if self.placement_stale {
            self.rebuild_placement();
        }
        if !self.placement.by_owner.contains_key(&owner) {
            let sites = self.owner_sites(owner);
            self.placement.by_owner.insert(owner, sites);
        }
    }

    /// The sites that may hold `owner`'s chunks, with their nodes that are not dead.
    fn owner_sites(&self, owner: SiteId) -> Vec<SiteNodes> {
        self.catalog
            .storers_for(owner)
            .into_iter()
            .map(|(site, weight)| SiteNodes {
                site,
                weight,
                nodes: self.placeable_nodes(site),
            })
            .collect()
    }

    /// This site's nodes (with this one) or a partner's, those not declared dead and not
    /// excluded for failing audits.
    fn placeable_nodes(&self, site: SiteId) -> Vec<Candidate<NodeId>> {
        let now_ms = self.now_ms;
        let mut nodes: Vec<Candidate<NodeId>> = self
            .peers
            .iter()
            .filter(|(_, p)| p.site == site && p.state != PeerState::Dead && !p.is_excluded(now_ms))
            .map(|(id, p)| Candidate {
                id: *id,
                key: id.0,
                weight: capacity_weight(p.capacity_bytes),
            })
            .collect();
        if site == self.site {
            let capacity = self
                .catalog
                .node_certs()
                // Only this site's certificate: another trusted site may certify this
                // node's id as its own (a false claim with a genuine signature), and a
                // capacity read from that would rank this node differently here than
                // at its site's other nodes, so each could take the other for the
                // target and both trim.
                .find(|c| c.node == self.node && c.site == self.site)
                .map_or(CAPACITY_UNSTATED_BYTES, |c| {
                    capacity_weight(c.capacity_bytes)
                });
            nodes.push(Candidate {
                id: self.node,
                key: self.node.0,
                weight: capacity,
            });
        }
        nodes
    }

    /// Computes one held chunk's targets and files it as in place or excess.
    fn place_chunk(&mut self, id: ChunkId) {
        let r = self.config.replication_factor;
        let now_ms = self.now_ms;
        let Some(held) = self.held.get(&id) else {
            return;
        };
        let owner = held.owner;
        let targets = self.placement.targets(&owner, &id, r);
        let in_place = targets.contains(&self.node);
        let frozen = self.gc_frozen(&id);
        let held = self.held.get_mut(&id).expect("looked up above");
        held.targets = targets.clone();
        held.confirmed.clear();
        held.lacking.clear();
        if in_place {
            if let Some(since) = held.excess_since_ms.take() {
                self.excess_by_since.remove(&(since, id));
            }
            if !frozen {
                self.xor_pair_digests(&id, &owner, &targets);
            }
        } else {
            let since = *held.excess_since_ms.get_or_insert(now_ms);
            self.excess_by_since.insert((since, id));
            self.excess.insert(id);
            if !frozen {
                for target in targets {
                    self.offer(target, owner, id);
                }
            }
        }
    }

    pub(super) fn offer(&mut self, to: NodeId, owner: SiteId, id: ChunkId) {
        if let Some(held) = self.held.get_mut(&id) {
            held.offered_at_ms = Some(self.now_ms);
        }
        if to != self.node {
            self.offers.entry((to, owner)).or_default().push(id);
        }
    }

    pub(super) fn flush_offers(&mut self) {
        let offers = std::mem::take(&mut self.offers);
        for ((to, owner), mut ids) in offers {
            ids.sort_unstable();
            ids.dedup();
            for batch in ids.chunks(IDS_PER_MESSAGE_MAX) {
                self.send(
                    to,
                    Message::Offer {
                        owner,
                        ids: batch.to_vec(),
                    },
                );
            }
        }
    }

    fn may_store_for(&self, owner: &SiteId) -> bool {
        *owner == self.site || self.trust.partners.contains(owner)
    }

    fn quota_left(&self, owner: &SiteId) -> u64 {
        if *owner == self.site {
            return u64::MAX;
        }
        let granted = self
            .catalog
            .grant(self.site, *owner)
            .filter(|g| !g.revoked)
            .map_or(0, |g| g.quota_bytes);
        // The quota is the site's; each node takes a share in proportion to the capacity
        // it offers, so the site as a whole never exceeds it without nodes coordinating.
        let (mine, total) = self
            .catalog
            .node_certs()
            .filter(|c| c.site == self.site)
            .fold((0u128, 0u128), |(mine, total), c| {
                let capacity = u128::from(capacity_weight(c.capacity_bytes));
                let mine = if c.node == self.node { capacity } else { mine };
                (mine, total + capacity)
            });
        let granted = (u128::from(granted) * mine)
            .checked_div(total)
            .map_or(0, |share| share as u64);
        let pending: u64 = self
            .writes
            .values()
            .filter(|(_, c)| c.owner == *owner)
            .map(|(_, c)| c.size_bytes)
            .sum();
        let used = self.used_by_owner.get(owner).copied().unwrap_or(0) + pending;
        granted.saturating_sub(used)
    }

    // ---- messages -----------------------------------------------------------------

    pub(super) fn on_offer(&mut self, from: NodeId, owner: SiteId, ids: Vec<ChunkId>) {
        let may_store = self.may_store_for(&owner);
        // Condemned chunks are neither confirmed nor pulled back (H3).
        let (have, lacking): (Vec<ChunkId>, Vec<ChunkId>) = ids
            .into_iter()
            .filter(|id| !self.gc_refuses(&owner, id))
            .partition(|id| self.held.contains_key(id));
        if may_store {
            // The owner's site decides where its chunks go. Another holder offers by its
            // own view of placement, which can differ from the owner's for good: a site
            // that revoked a third site no longer sees that site's grants, so it places
            // the owner's chunks elsewhere. A copy it offers outside this node's own
            // placement would be extra in every view but the offerer's, and kept there.
            let from_owner = self.peers.get(&from).is_some_and(|p| p.site == owner);
            if !from_owner {
                self.place_owner(owner);
            }
            let r = self.config.replication_factor;
            for id in lacking {
                if from_owner || self.placement.targets(&owner, &id, r).contains(&self.node) {
                    self.pulls.offered(from, owner, id);
                }
            }
        }
        if !have.is_empty() {
            let basis = self.catalog.snapshot_digest(&owner);
            self.send(
                from,
                Message::Need {
                    owner,
                    need: Vec::new(),
                    have,
                    basis,
                },
            );
        }
        self.request_more(from);
    }

    /// Asks `source` for as many offered chunks as its share allows.
    fn request_more(&mut self, source: NodeId) {
        let until_ms = self.now_ms + self.config.request_timeout_ms;
        let mut by_owner: BTreeMap<SiteId, Vec<ChunkId>> = BTreeMap::new();
        for (owner, id) in self.pulls.next_for(source, until_ms) {
            by_owner.entry(owner).or_default().push(id);
        }
        for (owner, need) in by_owner {
            let basis = self.catalog.snapshot_digest(&owner);
            self.send(
                source,
                Message::Need {
                    owner,
                    need,
                    have: Vec::new(),
                    basis,
                },
            );
        }
    }

    pub(super) fn on_need(
        &mut self,
        from: NodeId,
        owner: SiteId,
        need: Vec<ChunkId>,
        have: Vec<ChunkId>,
        basis: u64,
    ) {
        for id in have {
            self.confirm(from, owner, &id, basis);
        }
        if need.is_empty() {
            return;
        }
        // Chunks go only to sites that may hold the owner's chunks (this node's view).
        let from_site = self.peers.get(&from).map(|p| p.site);
        let may_hold = from_site == Some(owner)
            || self
                .catalog
                .storers_for(owner)
                .iter()
                .any(|(site, _)| Some(*site) == from_site);
        if !may_hold {
            self.counters.messages_refused += 1;
            return;
        }
        for id in need {
            if self.held.get(&id).is_some_and(|h| h.owner == owner) && !self.gc_frozen(&id) {
                self.queue_push(from, id);
            }
        }
    }

    pub(super) fn on_push(
        &mut self,
        from: NodeId,
        owner: SiteId,
        id: ChunkId,
        size_bytes: u64,
        sealed: Vec<u8>,
    ) {
        if self.gc_refuses(&owner, &id) {
            // Condemned here, or deleted under the statement in force (H3): the pusher's
            // digest differs from ours, and once its new snapshot record arrives here the
            // statement is inactive and the chunk is taken.
            self.send_push_ack(from, owner, id, false);
            return;
        }
        if let Some(held) = self.held.get(&id) {
            // Held for this owner: stored. Held under another owner (a node whose index
            // misfiled it, or a peer pushing someone else's id): not stored for this one,
            // so the owner never counts a copy that is not kept for it.
            let stored = held.owner == owner;
            self.send_push_ack(from, owner, id, stored);
            return;
        }
        if self.writes.values().any(|(_, c)| c.id == id) {
            return; // already being written; the pusher retries after its timeout
        }
        let fits = self.may_store_for(&owner)
            && sealed.len() as u64 <= size_bytes
            && self.writes.len() < WRITES_IN_FLIGHT_MAX
            && self.quota_left(&owner) >= size_bytes;
        if !fits {
            self.send_push_ack(from, owner, id, false);
            return;
        }
        // The bytes must be the owner's chunk `id` before they are stored; a holder
        // cannot open them, but it can check the owner's signature.
        if self.blobs.verify(&owner, &id, &sealed).is_none() {
            self.counters.bad_blobs_received += 1;
            // The request goes back to the pool when it times out, and the other holders
            // are asked first.
            self.strike(from, format!("push of chunk {id:?} with a bad signature"));
            self.send_push_ack(from, owner, id, false);
            return;
        }
        let op = self.next_op();
        self.writes.insert(
            op,
            (
                from,
                ChunkRef {
                    owner,
                    id,
                    size_bytes,
                },
            ),
        );
        self.push_storage(StorageOp::Write {
            op,
            owner,
            id,
            sealed,
        });
    }

    pub(super) fn write_done(&mut self, from: NodeId, chunk: ChunkRef, ok: bool) {
        if let Some(source) = self.pulls.arrived(&chunk.id) {
            self.request_more(source);
        }
        if ok {
            self.hold(chunk);
            self.push_event(Event::ChunkStored { chunk, from });
        }
        if from != self.node {
            self.send_push_ack(from, chunk.owner, chunk.id, ok);
        }
    }

    fn send_push_ack(&mut self, to: NodeId, owner: SiteId, id: ChunkId, stored: bool) {
        let basis = self.catalog.snapshot_digest(&owner);
        self.send(
            to,
            Message::PushAck {
                owner,
                id,
                stored,
                basis,
            },
        );
    }

    pub(super) fn on_push_ack(
        &mut self,
        from: NodeId,
        owner: SiteId,
        id: ChunkId,
        stored: bool,
        basis: u64,
    ) {
        self.pushes.in_flight.remove(&(from, id));
        if stored {
            self.confirm(from, owner, &id, basis);
        } else {
            self.push_event(Event::PushRefused { to: from, id });
        }
    }

    /// A peer's digests of the chunks of `owner` we should both hold: one root first
    /// (what a converged pair exchanges), all partitions when the roots differ.
    pub(super) fn on_sync_digest(&mut self, from: NodeId, owner: SiteId, digests: Vec<u64>) {
        let mine = self
            .pair_digests
            .get(&(from, owner))
            .copied()
            .unwrap_or([0; PARTITIONS]);
        if digests.len() == 1 {
            if self.pair_digests.contains_key(&(from, owner)) {
                self.their_roots.insert((from, owner), digests[0]);
            }
            if digests[0] != root_of(&mine) {
                self.send(
                    from,
                    Message::SyncDigest {
                        owner,
                        digests: mine.to_vec(),
                    },
                );
            }
            return;
        }
        if digests.len() != PARTITIONS {
            return;
        }
        for partition in 0..PARTITIONS {
            if mine[partition] != digests[partition] {
                let ids = self.shared_ids(from, owner, partition);
                let basis = self.catalog.snapshot_digest(&owner);
                self.send(
                    from,
                    Message::SyncIds {
                        owner,
                        partition: partition as u16,
                        ids,
                        reply: true,
                        basis,
                    },
                );
            }
        }
    }

    /// The chunks of one partition of `owner` that this node holds and that both it and
    /// `peer` should hold.
    fn shared_ids(&self, peer: NodeId, owner: SiteId, partition: usize) -> Vec<ChunkId> {
        let start = partition_start(partition);
        self.held
            .range(start..)
            .take_while(|(id, _)| partition_of(id) == partition)
            .filter(|(id, h)| {
                h.owner == owner
                    && h.excess_since_ms.is_none()
                    && h.targets.contains(&peer)
                    && !self.gc_frozen(id)
            })
            .map(|(id, _)| *id)
            .take(IDS_PER_MESSAGE_MAX)
            .collect()
    }

    pub(super) fn on_sync_ids(
        &mut self,
        from: NodeId,
        owner: SiteId,
        partition: u16,
        theirs: Vec<ChunkId>,
        reply: bool,
        basis: u64,
    ) {
        let partition = usize::from(partition);
        if partition >= PARTITIONS {
            return;
        }
        let mine = self.shared_ids(from, owner, partition);
        let theirs: BTreeSet<ChunkId> = theirs.into_iter().collect();
        for id in &theirs {
            self.confirm(from, owner, id, basis);
        }
        // Offer rather than push: the receiver asks only one holder for each chunk, so two
        // holders repairing the same target do not both send it.
        for id in &mine {
            if !theirs.contains(id) {
                // It lacks the chunk now, whatever it confirmed before (a lost pack):
                // status must not count it there until it confirms again.
                if let Some(held) = self.held.get_mut(id) {
                    held.confirmed.remove(&from);
                    held.lacking.insert(from);
                }
                self.offer(from, owner, *id);
            }
        }
        let mine: BTreeSet<ChunkId> = mine.into_iter().collect();
        if reply && theirs.iter().any(|id| !mine.contains(id)) {
            let basis = self.catalog.snapshot_digest(&owner);
            self.send(
                from,
                Message::SyncIds {
                    owner,
                    partition: partition as u16,
                    ids: mine.into_iter().collect(),
                    reply: false,
                    basis,
                },
            );
        }
    }

    // ---- pushes -------------------------------------------------------------------

    fn queue_push(&mut self, to: NodeId, id: ChunkId) {
        let key = (to, id);
        if to == self.node
            || self.pushes.queued.contains(&key)
            || self.pushes.in_flight.contains_key(&key)
            || self.pushes.queue.len() >= PUSH_QUEUE_MAX
        {
            return;
        }
        self.pushes.queued.insert(key);
        self.pushes.queue.push_back(key);
    }

    pub(super) fn start_pushes(&mut self, now_ms: u64) {
        self.pushes.refill(now_ms);
        let expired: Vec<(NodeId, ChunkId)> = self
            .pushes
            .in_flight
            .iter()
            .filter(|(_, deadline)| **deadline <= now_ms)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            self.pushes.in_flight.remove(&key);
        }
        while self.pushes.in_flight.len() < self.config.pushes_in_flight_max
            && self.pushes.tokens > 0
        {
            let Some(key) = self.pushes.queue.pop_front() else {
                break;
            };
            self.pushes.queued.remove(&key);
            let (to, id) = key;
            let Some(size_bytes) = self.held.get(&id).map(|h| h.size_bytes) else {
                continue;
            };
            if self
                .peers
                .get(&to)
                .is_none_or(|p| p.state == PeerState::Dead || p.is_cut_off(now_ms))
            {
                continue;
            }
            self.pushes.tokens -= size_bytes.min(i64::MAX as u64) as i64;
            self.pushes
                .in_flight
                .insert(key, now_ms + self.config.request_timeout_ms);
            let op = self.next_op();
            self.reads.insert(op, (ReadPurpose::Push { to }, id));
            self.push_storage(StorageOp::Read { op, id });
        }
    }

    /// A read of this node's own copy finished. The blob is checked against its owner's
    /// signature before anything uses it: a copy that cannot be read or fails the check is
    /// lost (a damaged one deleted), and is never pushed, served or audited from.
    pub(super) fn read_done(
        &mut self,
        purpose: ReadPurpose,
        id: ChunkId,
        blob: Option<Vec<u8>>,
        now_ms: u64,
    ) {
        let held = self.held.get(&id).map(|h| (h.owner, h.size_bytes));
        let good = match (&blob, held) {
            (Some(blob), Some((owner, _))) => self.blobs.verify(&owner, &id, blob).is_some(),
            _ => false,
        };
        if !good {
            if let Some((owner, _)) = held {
                self.unhold(&id);
                if blob.is_some() {
                    self.counters.corrupt_chunks_found += 1;
                    self.push_storage(StorageOp::Delete { owner, id });
                }
                self.push_event(Event::ChunkLost { id });
            }
            self.read_failed(purpose, id, now_ms);
            return;
        }
        let blob = blob.expect("checked good above");
        let (owner, size_bytes) = held.expect("checked good above");
        let sealed = || &blob[..blob.len() - crate::blob::BLOB_SIGNATURE_BYTES];
        match purpose {
            ReadPurpose::Push { to } => self.send(
                to,
                Message::Push {
                    owner,
                    id,
                    size_bytes,
                    sealed: blob,
                },
            ),
            ReadPurpose::Serve { to, owner } => self.send(
                to,
                Message::FetchReply {
                    owner,
                    id,
                    sealed: Some(blob),
                },
            ),
            ReadPurpose::Fetch { owner } => {
                let sealed = sealed().to_vec();
                self.fetches.remove(&id);
                self.push_event(Event::Fetched {
                    owner,
                    id,
                    from: self.node,
                    sealed,
                });
            }
            ReadPurpose::Scrub => {}
            ReadPurpose::Audit { to } => self.audit_read(to, id, sealed()),
            ReadPurpose::AuditAnswer { to, owner, nonce } => {
                self.answer_audit(to, owner, id, nonce, Some(sealed()))
            }
        }
    }

    /// What a read that found no good copy means for the one who asked for it.
    fn read_failed(&mut self, purpose: ReadPurpose, id: ChunkId, now_ms: u64) {
        match purpose {
            ReadPurpose::Push { to } => {
                self.pushes.in_flight.remove(&(to, id));
            }
            ReadPurpose::Serve { to, owner } => self.send(
                to,
                Message::FetchReply {
                    owner,
                    id,
                    sealed: None,
                },
            ),
            ReadPurpose::Fetch { owner } => self.fetch_remote(owner, id, now_ms),
            ReadPurpose::Scrub => {}
            ReadPurpose::Audit { to } => self.audit_read_failed(to, id),
            ReadPurpose::AuditAnswer { to, owner, nonce } => {
                self.answer_audit(to, owner, id, nonce, None)
            }
        }
    }

    // ---- confirmations, snapshots, trims ------------------------------------------

    /// `node` said it holds `id` of `owner`, knowing the owner's snapshots whose digest
    /// is `basis`. Rule H5: it counts toward a snapshot at R sites only when `basis` is
    /// this node's own digest, so a counted holder holds every snapshot record this node
    /// does, and no garbage statement lacking one of them is active there
    /// (docs/retention.md, section 4). A confirmation on another basis is remembered, in
    /// case the digests meet again, and the chunk is offered again at the next tidy walk
    /// (the holder will usually have the record by then).
    pub(super) fn confirm(&mut self, node: NodeId, owner: SiteId, id: &ChunkId, basis: u64) {
        let Some(site) = self.peers.get(&node).map(|p| p.site) else {
            return;
        };
        let current = basis == self.catalog.snapshot_digest(&owner);
        if let Some(held) = self.held.get_mut(id).filter(|h| h.owner == owner) {
            if held.targets.contains(&node) {
                held.confirmed.insert(node, basis);
            }
            held.lacking.remove(&node);
            if !current {
                held.offered_at_ms = None;
            }
        }
        if !current {
            self.counters.confirmations_on_other_basis += 1;
            return;
        }
        if owner != self.site {
            return; // pending snapshots are this site's
        }
        let r = self.config.replication_factor;
        let mut done = Vec::new();
        for (snapshot, pending) in &mut self.pending_snapshots {
            if let Some(sites) = pending.chunks.get_mut(id) {
                sites.insert(site);
                if sites.len() >= r {
                    pending.chunks.remove(id);
                }
                if pending.chunks.is_empty() {
                    done.push(*snapshot);
                }
            }
        }
        for snapshot in done {
            self.pending_snapshots.remove(&snapshot);
            self.push_event(Event::SnapshotReplicated { snapshot });
        }
    }

    pub(super) fn track_snapshot(&mut self, snapshot: [u8; 32], chunks: &[ChunkRef]) {
        if self.pending_snapshots.len() >= PENDING_SNAPSHOTS_MAX {
            return; // not tracked: it still replicates, it is just never acknowledged
        }
        if self.placement_stale {
            self.rebuild_placement();
        }
        let r = self.config.replication_factor;
        let mut pending = PendingSnapshot::default();
        for chunk in chunks {
            let mut sites = BTreeSet::from([self.site]);
            if let Some(held) = self.held.get(&chunk.id) {
                // Confirmations from before this snapshot's record was here do not
                // count for it (H5): its record changed this node's digest.
                sites.extend(
                    held.confirmed
                        .keys()
                        .filter(|n| self.counts(held, n))
                        .filter_map(|n| self.peers.get(n).map(|p| p.site)),
                );
                if sites.len() < r {
                    for target in held.targets.clone() {
                        self.offer(target, chunk.owner, chunk.id);
                    }
                }
            }
            if sites.len() < r {
                pending.chunks.insert(chunk.id, sites);
            }
        }
        if pending.chunks.is_empty() {
            self.push_event(Event::SnapshotReplicated { snapshot });
        } else {
            self.pending_snapshots.insert(snapshot, pending);
        }
    }

    pub(super) fn sync_round(&mut self, now_ms: u64) {
        for source in self.pulls.expire(now_ms) {
            self.request_more(source);
        }
        self.sync_with_next_peer();
        // Re-offers wait a request timeout anyway and trims an hour's grace, so walking the
        // extra copies four times per request timeout loses little and costs far less.
        if now_ms >= self.next_tidy_ms {
            self.next_tidy_ms = now_ms + self.config.request_timeout_ms / 4;
            self.reoffer(now_ms);
            self.trim(now_ms);
            self.gc_tick(now_ms);
        }
    }

    fn sync_with_next_peer(&mut self) {
        let peers: Vec<NodeId> = self
            .pair_digests
            .keys()
            .map(|(peer, _)| *peer)
            .filter(|p| {
                self.peers
                    .get(p)
                    .is_some_and(|p| p.state != PeerState::Dead)
            })
            .collect::<BTreeSet<NodeId>>()
            .into_iter()
            .collect();
        if peers.is_empty() {
            return;
        }
        let peer = peers[self.sync_cursor % peers.len()];
        self.sync_cursor = self.sync_cursor.wrapping_add(1);
        let owners: Vec<(SiteId, [u64; PARTITIONS])> = self
            .pair_digests
            .range((peer, SiteId([0; 32]))..=(peer, SiteId([0xff; 32])))
            .map(|((_, owner), digests)| (*owner, *digests))
            .collect();
        for (owner, digests) in owners {
            self.send(
                peer,
                Message::SyncDigest {
                    owner,
                    digests: vec![root_of(&digests)],
                },
            );
        }
    }

    /// Offers again what is not yet confirmed: chunks of snapshots not yet at R sites,
    /// and extra copies whose targets have not all confirmed.
    fn reoffer(&mut self, now_ms: u64) {
        // A target that was offered a chunk is pulling it at its own pace; offer again
        // only once a request could have timed out.
        let due = |held: &Held| {
            held.offered_at_ms
                .is_none_or(|at| now_ms.saturating_sub(at) >= self.config.request_timeout_ms)
        };
        let mut offers = Vec::new();
        for pending in self.pending_snapshots.values() {
            for (id, sites) in &pending.chunks {
                let Some(held) = self.held.get(id).filter(|h| due(h) && !self.gc_frozen(id)) else {
                    continue;
                };
                for target in &held.targets {
                    let site = self.peers.get(target).map(|p| p.site);
                    if site.is_some_and(|s| !sites.contains(&s)) {
                        offers.push((*target, held.owner, *id));
                    }
                }
            }
        }
        for id in &self.excess {
            let Some(held) = self.held.get(id).filter(|h| due(h) && !self.gc_frozen(id)) else {
                continue;
            };
            for target in &held.targets {
                if !self.counts(held, target) {
                    offers.push((*target, held.owner, *id));
                }
            }
        }
        for (to, owner, id) in offers {
            self.offer(to, owner, id);
        }
    }

    /// Deletes extra copies that every one of at least R targets confirmed (a target whose
    /// site revoked this one never can, and is not waited for), or a target of this
    /// node's site confirmed, once the grace period is over; and, after the same grace, the chunks of an owner this site
    /// no longer stores for (whose other holders have had that long to repair).
    fn trim(&mut self, now_ms: u64) {
        let r = self.config.replication_factor;
        let grace_ms = self.config.trim_grace_ms;
        // Only copies past their grace can go: the index names them without a walk over
        // every extra copy. (A zero grace makes every extra copy ripe, timed or not.)
        let candidates: Vec<ChunkId> = if grace_ms == 0 {
            self.excess.iter().copied().collect()
        } else {
            let Some(cutoff_ms) = now_ms.checked_sub(grace_ms) else {
                return;
            };
            let by_id: BTreeSet<ChunkId> = self
                .excess_by_since
                .range(..=(cutoff_ms, ChunkId([0xff; 32])))
                .map(|(since, id)| {
                    debug_assert_eq!(self.held[id].excess_since_ms, Some(*since));
                    *id
                })
                .collect();
            by_id.into_iter().collect()
        };
        if candidates.is_empty() {
            return;
        }
        // Owners whose chunks this site should no longer hold: it no longer stores for
        // them, or they no longer place on it (they revoked it or cut its quota to 0).
        // In the second case the owner's site refuses this node, so the targets never all
        // confirm to it: waiting for that would keep the copies forever.
        let owners: BTreeSet<SiteId> = candidates.iter().map(|id| self.held[id].owner).collect();
        let unwanted_owners: BTreeSet<SiteId> = owners
            .into_iter()
            .filter(|owner| {
                *owner != self.site
                    && (!self.may_store_for(owner)
                        || !self
                            .catalog
                            .storers_for(*owner)
                            .iter()
                            .any(|(site, _)| *site == self.site))
            })
            .collect();
        // Chunks of snapshots this node still waits to see at R sites: their copies stay
        // here until then, whatever else holds them.
        let awaited = |id: &ChunkId| {
            self.pending_snapshots
                .values()
                .any(|p| p.chunks.contains_key(id))
        };
        // Sites that revoked this one refuse its nodes, so their targets never confirm to
        // it; the other targets, syncing with them, repair what they lack.
        let refusing: BTreeSet<SiteId> = self
            .peers
            .values()
            .map(|p| p.site)
            .filter(|site| {
                self.catalog
                    .grant(*site, self.site)
                    .is_some_and(|g| g.revoked)
            })
            .collect();
        let answers = |held: &Held, t: &NodeId| {
            self.counts(held, t)
                || self
                    .peers
                    .get(t)
                    .is_some_and(|p| refusing.contains(&p.site))
        };
        let doomed: Vec<ChunkId> = candidates
            .iter()
            .filter(|id| {
                let held = &self.held[*id];
                if self.gc_frozen(id) {
                    return false; // garbage collection's to delete, under its rules
                }
                let since = held.excess_since_ms.unwrap_or(now_ms);
                let ripe = now_ms.saturating_sub(since) >= grace_ms;
                let safe = held.targets.len() >= r
                    && held.targets.iter().all(|t| answers(held, t))
                    && held.targets.iter().any(|t| self.counts(held, t));
                // A target of this node's own site holds it: this copy adds no site, and
                // that target, syncing with the others, repairs what they lack. Waiting
                // for every target instead keeps the copy forever when one never
                // confirms: fewer than R sites standing, or a target whose site's view of
                // placement differs for good (one site revoked another, the owner did not).
                let site_kept = !awaited(id)
                    && held.targets.iter().any(|t| {
                        self.counts(held, t)
                            && self.peers.get(t).is_some_and(|p| p.site == self.site)
                    });
                let unwanted = unwanted_owners.contains(&held.owner);
                ripe && (safe || site_kept || unwanted)
            })
            .copied()
            .collect();
        for id in doomed {
            let owner = self.held[&id].owner;
            self.unhold(&id);
            self.push_storage(StorageOp::Delete { owner, id });
            self.push_event(Event::Trimmed { id });
        }
    }
}

impl Engine {
    /// True when `node`'s confirmation of `held` counts now: it came with this node's
    /// current snapshot digest for the owner (rule H5). Trims use it too: an extra copy
    /// goes only once its targets confirmed knowing every snapshot this node knows.
    pub(super) fn counts(&self, held: &Held, node: &NodeId) -> bool {
        held.confirmed.get(node) == Some(&self.catalog.snapshot_digest(&held.owner))
    }
}

/// The digest of a whole shared set: XOR of its partitions' digests.
pub(super) fn root_of(digests: &[u64; PARTITIONS]) -> u64 {
    digests.iter().fold(0, |acc, d| acc ^ d)
}

/// What a node that states no capacity (0 in its certificate) counts as.
pub const CAPACITY_UNSTATED_BYTES: u64 = 1 << 40;

/// A node's weight in placement inside its site: its stated capacity.
pub fn capacity_weight(capacity_bytes: u64) -> u64 {
    if capacity_bytes == 0 {
        CAPACITY_UNSTATED_BYTES
    } else {
        capacity_bytes
    }
}
