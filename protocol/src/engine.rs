//! The Engine: one node's share of the mesh as a deterministic state machine. It gossips
//! the catalog, tracks which peers are alive, decides where every chunk belongs, pushes
//! and repairs copies, trims extra ones and serves restores. It does no IO, reads no clock
//! and draws no OS randomness: time comes in with every call, randomness from the seed,
//! and everything it wants done comes out of the `poll_*` methods. The node runs it over
//! libp2p and a pack store; the simulator runs hundreds of them on a virtual network.
//!
//! Submodules: `message` (the wire messages), `guard` (checks on every message, strikes
//! and cut-offs for peers that send bad ones), `membership` (heartbeats and failure
//! detection), `gossip` (catalog anti-entropy), `replication` (placement, sync, pushes,
//! trims, snapshots acknowledged), `audit` (holders prove they keep what they hold),
//! `scrub` (this node re-reads its own copies), `fetch` (restores).
//!
//! Chunks travel and are stored as blobs (`crate::blob`): the sealed bytes signed by the
//! owner site. The engine checks the signature of every blob it receives and of every
//! copy it reads from its own disk, and never stores, serves or pushes one that fails.

mod audit;
mod fetch;
mod gc;
mod gossip;
mod guard;
mod membership;
pub mod message;
mod pull;
mod replication;
mod scrub;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use crate::catalog::{Catalog, Insert, RecordKey, TrustSets};
use crate::identity::{NodeId, SiteId};
use crate::ids::ChunkId;
use crate::record::{Record, RecordError, TrustView};
use crate::rng::Rng;

pub use audit::{
    AUDITS_IN_FLIGHT_MAX, AUDIT_ANSWERS_PER_PEER_MAX, AUDIT_EXCLUSION_MS, AUDIT_FAILURE_POINTS,
    AUDIT_PASS_POINTS, AUDIT_POINTS_MAX,
};
pub use fetch::{FetchError, FETCHES_MAX};
pub use gc::{GC_AGREEMENT_FRESH_MS, GC_BATCH_FETCHES_MAX};
pub use guard::{CUT_OFF_MS, STRIKES_MAX, STRIKE_MEMORY_MS};
use membership::Peer;
pub use membership::PeerState;
pub use message::Message;
pub use pull::PULLS_PER_SOURCE_MAX;
pub use replication::capacity_weight;
use replication::{Held, PendingSnapshot, PushQueue, ReadPurpose};
pub use scrub::SCRUB_READ_INTERVAL_MIN_MS;

/// How many peers one engine tracks.
pub const PEERS_MAX: usize = 4096;
/// Chunks one engine holds (the node's disk bounds this long before).
pub const HELD_CHUNKS_MAX: usize = 1 << 26;
/// Snapshots waiting to reach R sites.
pub const PENDING_SNAPSHOTS_MAX: usize = 1024;
/// Outputs waiting for the caller to take them; the caller drains after every call, so
/// reaching this is a bug in the caller.
pub const OUTPUTS_MAX: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// R: distinct sites that hold each chunk, the owner's included.
    pub replication_factor: usize,
    pub gossip_interval_ms: u64,
    /// Silence after which a peer is suspected (still placed on), then declared dead (its
    /// chunks are placed elsewhere).
    pub suspect_after_ms: u64,
    pub dead_after_ms: u64,
    /// How often this node compares its chunks with one co-holder.
    pub sync_interval_ms: u64,
    /// Bound on the bytes per second this node pushes to others, so a flapping peer
    /// cannot start a storm.
    pub push_bytes_per_sec: u64,
    /// How many pushes may wait for an acknowledgement at once.
    pub pushes_in_flight_max: usize,
    /// How long a copy beyond R is kept before it is deleted (only once every target
    /// confirmed it holds the chunk).
    pub trim_grace_ms: u64,
    /// How long a push, fetch or audit waits for an answer before giving up on that peer.
    pub request_timeout_ms: u64,
    /// Garbage collection (docs/retention.md, H4): the least time a chunk stays condemned
    /// here before it is deleted on its owner's word, whatever grace the owner asks.
    pub gc_grace_min_ms: u64,
    /// In any window of this length, this node deletes on one owner's word at most
    /// `gc_window_percent` of what it held for that owner when the window began (and at
    /// least `gc_window_min_bytes`): what a stolen site key can wipe.
    pub gc_window_ms: u64,
    pub gc_window_percent: u64,
    pub gc_window_min_bytes: u64,
    /// How often this node audits one co-holder of one chunk it holds itself.
    pub audit_interval_ms: u64,
    /// How long one pass of the scrub (re-reading every chunk this node holds) takes; the
    /// reads are spread evenly, at most one per `SCRUB_READ_INTERVAL_MIN_MS`.
    pub scrub_period_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            replication_factor: 3,
            gossip_interval_ms: 2_000,
            suspect_after_ms: 30_000,
            dead_after_ms: 300_000,
            sync_interval_ms: 5_000,
            push_bytes_per_sec: 40 << 20,
            pushes_in_flight_max: 32,
            trim_grace_ms: 3_600_000,
            gc_grace_min_ms: 24 * 3_600_000,
            gc_window_ms: 7 * 24 * 3_600_000,
            gc_window_percent: 50,
            gc_window_min_bytes: 1 << 30,
            request_timeout_ms: 60_000,
            audit_interval_ms: 300_000,
            scrub_period_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// What `Engine::held_copies` knows of one held chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldCopies {
    /// Distinct sites known to hold it, this node's first.
    pub sites: Vec<SiteId>,
    /// Targets at other sites that neither confirmed it nor claimed, by a sync root equal
    /// to ours, to hold everything we both should (since a start or a placement change),
    /// and did not say they lack it either: not known yet.
    pub targets_unknown: usize,
}

/// A chunk as the engine knows it: whose it is, its id, and its size as a blob (the
/// sealed bytes and the owner's signature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub owner: SiteId,
    pub id: ChunkId,
    pub size_bytes: u64,
}

/// What the caller must do to the node's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// Store a chunk's blob durably, as it is, then call `handle_write_done(op, ..)`. The
    /// engine has checked the owner's signature.
    Write {
        op: u64,
        owner: SiteId,
        id: ChunkId,
        sealed: Vec<u8>,
    },
    /// Read a chunk's blob, then call `handle_read_done(op, ..)`. For this site's own
    /// chunks the caller signs the sealed bytes it reads (`crate::blob::sign_blob`).
    Read {
        op: u64,
        id: ChunkId,
    },
    Delete {
        owner: SiteId,
        id: ChunkId,
    },
    /// Persist a catalog record (replacing any older one under its key).
    SaveRecord(Record),
    DropRecord(RecordKey),
}

/// Things a person or the simulator's checkers may want to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    PeerSuspected(NodeId),
    PeerDead(NodeId),
    PeerLive(NodeId),
    /// Every chunk of the snapshot is confirmed at R distinct sites.
    SnapshotReplicated {
        snapshot: [u8; 32],
    },
    ChunkStored {
        chunk: ChunkRef,
        from: NodeId,
    },
    /// A peer would not take a chunk (quota full, or it does not store for the owner).
    PushRefused {
        to: NodeId,
        id: ChunkId,
    },
    /// This node's copy of a chunk could not be read back, or no longer matches its
    /// owner's signature; it is forgotten (and a damaged copy deleted) so repair brings it
    /// back from another site.
    ChunkLost {
        id: ChunkId,
    },
    Trimmed {
        id: ChunkId,
    },
    /// A condemned chunk deleted on its owner's word (garbage collection, H4).
    Collected {
        owner: SiteId,
        id: ChunkId,
    },
    /// A fetched chunk: its sealed bytes, the owner's signature checked and removed. The
    /// caller opens them with the vault key and, if they do not open, fetches again
    /// excluding `from`.
    Fetched {
        owner: SiteId,
        id: ChunkId,
        from: NodeId,
        sealed: Vec<u8>,
    },
    /// No reachable holder had the chunk.
    FetchFailed {
        owner: SiteId,
        id: ChunkId,
    },
    RecordRejected {
        from: NodeId,
        error: String,
    },
    /// A message from a node that is not a peer of a trusted site; it changed nothing.
    MessageRefused {
        from: NodeId,
    },
    /// A message (or a record or blob in it) from a peer failed a check: malformed,
    /// oversized, forged, or not the sender's to send. It changed nothing and counts as a
    /// strike against the peer.
    MessageDropped {
        from: NodeId,
        reason: String,
    },
    /// A peer reached `STRIKES_MAX` strikes: its messages are refused until `until_ms`.
    PeerCutOff {
        node: NodeId,
        until_ms: u64,
    },
    /// A co-holder did not prove it holds a chunk.
    AuditFailed {
        node: NodeId,
        id: ChunkId,
        failure: AuditFailure,
    },
    /// A co-holder failed audits repeatedly (`AUDIT_POINTS_MAX`): this node places no
    /// chunks on it until `until_ms`, so its chunks are copied elsewhere.
    HolderExcluded {
        node: NodeId,
        until_ms: u64,
    },
}

/// How an audit failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditFailure {
    /// The proof did not match this node's own copy.
    Wrong,
    /// The holder said it does not have the chunk.
    Missing,
    /// No answer within `request_timeout_ms`, though the holder answered other requests
    /// meanwhile.
    Late,
    /// No answer, and no answer to anything else this node sent either: the link (a
    /// one-way partition) may be at fault rather than the holder, so it does not count
    /// against the holder.
    Unreachable,
}

/// What this engine counted since it started, for reports and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Messages that failed a check (each one a strike; `Event::MessageDropped`).
    pub messages_dropped: u64,
    /// Messages refused unread: from unknown or untrusted nodes, or peers cut off.
    pub messages_refused: u64,
    /// Times a peer was cut off (`Event::PeerCutOff`).
    pub peers_cut_off: u64,
    /// Blobs from peers (pushes, fetch replies) whose signature did not hold.
    pub bad_blobs_received: u64,
    /// Records from peers that failed validation (`Event::RecordRejected`).
    pub records_rejected: u64,
    pub audits_sent: u64,
    /// Audits sent a second time after the first went unanswered.
    pub audits_retried: u64,
    pub audits_passed: u64,
    /// Audits failed wrong, missing or late (`AuditFailure::Unreachable` is not counted).
    pub audits_failed: u64,
    /// Audits unanswered by a peer that answered nothing else either.
    pub audits_unreachable: u64,
    /// Audits of this node's copies it answered with a proof.
    pub audits_answered: u64,
    /// Times a holder was excluded from placement (`Event::HolderExcluded`).
    pub holders_excluded: u64,
    pub scrub_reads: u64,
    /// Confirmations that came with another snapshot digest for the owner than this
    /// node's (rule H5): remembered, not counted.
    pub confirmations_on_other_basis: u64,
    /// Garbage batches fetched and checked against their ids.
    pub gc_batches_fetched: u64,
    /// Condemned chunks a later statement no longer listed.
    pub gc_revived: u64,
    /// Chunks deleted on their owner's word, and their bytes.
    pub gc_collected: u64,
    pub gc_collected_bytes: u64,
    /// Tidy walks that left ripe garbage for the next window (the budget was spent).
    pub gc_window_deferred: u64,
    /// Copies on this node's disk found damaged (by the scrub, an audit, a push or a
    /// fetch reading them).
    pub corrupt_chunks_found: u64,
}

/// One node's replication state machine.
///
/// Call order, as with quinn-proto's `Connection`: feed every input through a `handle_*`
/// method with the current time; after each call drain `poll_transmit`, `poll_storage`
/// and `poll_event` until they return `None`; then call `handle_timeout` no later than
/// `poll_timeout` says. Storage completions (`handle_write_done`, `handle_read_done`) are
/// inputs like any other. On restart, build a new engine and feed it what was persisted:
/// `load_records` with every saved record and `load_chunk` for every chunk on disk, before
/// any other input.
pub struct Engine {
    config: EngineConfig,
    node: NodeId,
    site: SiteId,
    rng: Rng,
    /// The time of the latest input.
    now_ms: u64,
    catalog: Catalog,
    trust: TrustSets,
    peers: BTreeMap<NodeId, Peer>,
    /// The site named by the certificate each peer presented when it connected
    /// (`handle_connect`): it settles a node id that two trusted sites certify, one of
    /// them falsely (at most `PEERS_MAX`).
    presented: BTreeMap<NodeId, SiteId>,
    beat_cursor: usize,
    held: BTreeMap<ChunkId, Held>,
    used_by_owner: BTreeMap<SiteId, u64>,
    /// Placement must be recomputed: membership or trust changed.
    placement_stale: bool,
    placement: replication::Placement,
    pair_digests: BTreeMap<(NodeId, SiteId), [u64; message::PARTITIONS]>,
    sync_cursor: usize,
    offers: BTreeMap<(NodeId, SiteId), Vec<ChunkId>>,
    pushes: PushQueue,
    next_op: u64,
    writes: BTreeMap<u64, (NodeId, ChunkRef)>,
    reads: BTreeMap<u64, (ReadPurpose, ChunkId)>,
    /// Chunks this node lacks, who offered them, and whom it asked.
    pulls: pull::Pulls,
    /// Held chunks this node is not a target for.
    excess: std::collections::BTreeSet<ChunkId>,
    /// The excess chunks by `Held::excess_since_ms`: the tidy's trim looks only at those
    /// past their grace instead of walking every extra copy every 15 s.
    excess_by_since: std::collections::BTreeSet<(u64, ChunkId)>,
    pending_snapshots: BTreeMap<[u8; 32], PendingSnapshot>,
    /// Garbage collection's holder state (`gc`).
    gc: gc::GcState,
    fetches: BTreeMap<ChunkId, fetch::Fetch>,
    /// Fetches waiting on each peer.
    fetch_load: BTreeMap<NodeId, u32>,
    next_gossip_ms: u64,
    next_sync_ms: u64,
    /// When extra copies and unconfirmed snapshot chunks are next re-offered or trimmed
    /// (every quarter of the request timeout).
    next_tidy_ms: u64,
    /// The audit in flight to each co-holder (at most one each).
    audits: BTreeMap<NodeId, audit::PendingAudit>,
    /// The sync root each co-holder last sent for the chunks of an owner we should both
    /// hold: equal to ours, it is the peer's claim to hold every one of them.
    their_roots: BTreeMap<(NodeId, SiteId), u64>,
    next_audit_ms: u64,
    /// The last chunk picked for an audit.
    audit_cursor: Option<ChunkId>,
    next_scrub_ms: u64,
    /// The last chunk the scrub read.
    scrub_cursor: Option<ChunkId>,
    /// The earliest end of a cut-off or placement exclusion (`u64::MAX`: none).
    next_penalty_end_ms: u64,
    counters: EngineCounters,
    /// Checks blobs against their owners' signatures, remembering recent ones.
    blobs: crate::blob::BlobVerifier,
    /// Checks records' signatures, remembering recent ones.
    records_verified: crate::record::RecordVerifier,
    transmits: VecDeque<(NodeId, Message)>,
    storage: VecDeque<StorageOp>,
    events: VecDeque<Event>,
}

impl Engine {
    pub fn new(config: EngineConfig, node: NodeId, site: SiteId, seed: u64, now_ms: u64) -> Engine {
        assert!(config.replication_factor >= 1, "R is at least 1");
        assert!(config.suspect_after_ms <= config.dead_after_ms);
        let mut rng = Rng::new(seed);
        // Spread the first rounds so engines started together do not beat in lockstep.
        let next_gossip_ms = now_ms + rng.below(config.gossip_interval_ms.max(1));
        let next_sync_ms = now_ms + rng.below(config.sync_interval_ms.max(1));
        let next_audit_ms = now_ms + rng.below(config.audit_interval_ms.max(1));
        let next_scrub_ms = now_ms + SCRUB_READ_INTERVAL_MIN_MS;
        Engine {
            trust: Catalog::default().trust(site),
            pushes: PushQueue::new(config.push_bytes_per_sec, now_ms),
            config,
            node,
            site,
            rng,
            now_ms,
            catalog: Catalog::default(),
            peers: BTreeMap::new(),
            presented: BTreeMap::new(),
            beat_cursor: 0,
            held: BTreeMap::new(),
            used_by_owner: BTreeMap::new(),
            placement_stale: true,
            placement: replication::Placement::default(),
            pair_digests: BTreeMap::new(),
            sync_cursor: 0,
            offers: BTreeMap::new(),
            next_op: 0,
            writes: BTreeMap::new(),
            reads: BTreeMap::new(),
            excess: std::collections::BTreeSet::new(),
            excess_by_since: std::collections::BTreeSet::new(),
            pulls: pull::Pulls::default(),
            pending_snapshots: BTreeMap::new(),
            gc: gc::GcState::default(),
            fetches: BTreeMap::new(),
            fetch_load: BTreeMap::new(),
            next_gossip_ms,
            next_sync_ms,
            next_tidy_ms: now_ms,
            audits: BTreeMap::new(),
            their_roots: BTreeMap::new(),
            next_audit_ms,
            audit_cursor: None,
            next_scrub_ms,
            scrub_cursor: None,
            next_penalty_end_ms: u64::MAX,
            counters: EngineCounters::default(),
            blobs: crate::blob::BlobVerifier::default(),
            records_verified: crate::record::RecordVerifier::default(),
            transmits: VecDeque::new(),
            storage: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Remember verified blobs in `memo`, shared with other engines of one process (the
    /// simulator's mesh): a blob one engine checked needs no second signature check in
    /// another. Changes no answer, only the work.
    pub fn share_blob_memo(&mut self, memo: crate::blob::SharedBlobMemo) {
        self.blobs = crate::blob::BlobVerifier::sharing(memo);
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn site(&self) -> SiteId {
        self.site
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn trust(&self) -> &TrustSets {
        &self.trust
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn held(&self) -> impl Iterator<Item = ChunkRef> + '_ {
        self.held.iter().map(|(id, h)| ChunkRef {
            owner: h.owner,
            id: *id,
            size_bytes: h.size_bytes,
        })
    }

    pub fn holds(&self, id: &ChunkId) -> bool {
        self.held.contains_key(id)
    }

    pub fn peer_state(&self, node: &NodeId) -> Option<PeerState> {
        self.peers.get(node).map(|p| p.state)
    }

    pub fn peers(&self) -> impl Iterator<Item = (NodeId, SiteId, PeerState)> + '_ {
        self.peers.iter().map(|(id, p)| (*id, p.site, p.state))
    }

    /// Where a chunk of this node's site stands, for status displays: `None` once it
    /// is confirmed at R sites (or was never part of a tracked snapshot), else the
    /// sites confirmed so far.
    pub fn chunk_below_r(&self, snapshot: &[u8; 32], id: &ChunkId) -> Option<Vec<SiteId>> {
        let pending = self.pending_snapshots.get(snapshot)?;
        pending
            .chunks
            .get(id)
            .map(|sites| sites.iter().copied().collect())
    }

    /// Where a chunk this node holds is known to be now, for status displays: this site,
    /// and the site of each placement target that confirmed it since placement last
    /// changed, or whose last sync root for the owner matched ours (its claim to hold
    /// every chunk we both should hold). A target whose sync listed the chunk's partition
    /// without it is not counted, whatever it claimed before; one not heard from either
    /// way is `targets_unknown`. `None` for a chunk not held here.
    pub fn held_copies(&self, id: &ChunkId) -> Option<HeldCopies> {
        let held = self.held.get(id)?;
        let mut copies = HeldCopies {
            sites: vec![self.site],
            targets_unknown: 0,
        };
        for target in &held.targets {
            let Some(site) = self.peers.get(target).map(|p| p.site) else {
                continue;
            };
            if *target == self.node || site == self.site || held.lacking.contains(target) {
                continue;
            }
            let claimed_all = self
                .their_roots
                .get(&(*target, held.owner))
                .zip(self.pair_digests.get(&(*target, held.owner)))
                .is_some_and(|(theirs, ours)| *theirs == replication::root_of(ours));
            if held.confirmed.contains_key(target) || claimed_all {
                if !copies.sites.contains(&site) {
                    copies.sites.push(site);
                }
            } else {
                copies.targets_unknown += 1;
            }
        }
        Some(copies)
    }

    /// True while a snapshot waits for some chunk to reach R sites.
    pub fn snapshot_pending(&self, snapshot: &[u8; 32]) -> bool {
        self.pending_snapshots.contains_key(snapshot)
    }

    /// The sites placement currently names for a chunk (at most R).
    pub fn target_sites(&self, owner: &SiteId, id: &ChunkId) -> Vec<SiteId> {
        let mut sites = Vec::new();
        for node in self
            .placement
            .targets(owner, id, self.config.replication_factor)
        {
            let site = if node == self.node {
                Some(self.site)
            } else {
                self.peers.get(&node).map(|p| p.site)
            };
            if let Some(site) = site.filter(|s| !sites.contains(s)) {
                sites.push(site);
            }
        }
        sites
    }

    /// Pushes queued or waiting for an acknowledgement.
    pub fn pushes_pending(&self) -> usize {
        self.pushes.len()
    }

    pub fn pending_snapshots(&self) -> usize {
        self.pending_snapshots.len()
    }

    pub fn counters(&self) -> EngineCounters {
        self.counters
    }

    /// True while messages from `node` are refused for sending bad ones.
    pub fn is_cut_off(&self, node: &NodeId) -> bool {
        self.peers
            .get(node)
            .is_some_and(|p| p.is_cut_off(self.now_ms))
    }

    /// True while `node` is left out of placement for failing audits.
    pub fn is_excluded(&self, node: &NodeId) -> bool {
        self.peers
            .get(node)
            .is_some_and(|p| p.is_excluded(self.now_ms))
    }

    // ---- inputs -------------------------------------------------------------------

    /// Records persisted before a restart (or handed over at join or recovery). Signatures
    /// were checked when they were first accepted; trust is recomputed from them at once
    /// and the records of sites no longer trusted are dropped.
    pub fn load_records(&mut self, records: impl IntoIterator<Item = Record>) {
        for record in records {
            self.catalog.insert(record);
        }
        self.trust_changed();
    }

    /// A chunk found on this node's disk at start.
    pub fn load_chunk(&mut self, chunk: ChunkRef) {
        self.hold(chunk);
    }

    /// A record this site made (a grant, a node certificate, a snapshot): validated,
    /// merged, persisted and gossiped like any other.
    pub fn handle_local_record(&mut self, record: Record, now_ms: u64) -> Result<(), RecordError> {
        self.now_ms = self.now_ms.max(now_ms);
        self.accept_record(record, self.node, now_ms)
    }

    /// A new snapshot made on this node: its record and every chunk it references, all
    /// already stored locally. The engine replicates them and emits `SnapshotReplicated`
    /// once each chunk is confirmed at R sites.
    pub fn handle_new_snapshot(
        &mut self,
        record: Record,
        chunks: &[ChunkRef],
        now_ms: u64,
    ) -> Result<(), RecordError> {
        self.now_ms = self.now_ms.max(now_ms);
        let snapshot = record.key;
        let key = RecordKey::of(&record);
        self.accept_record(record, self.node, now_ms)?;
        for chunk in chunks {
            self.hold(*chunk);
        }
        // A snapshot the site already forgot is never waited on or acknowledged.
        if !self.catalog.get(&key).is_some_and(Record::is_tombstone) {
            self.track_snapshot(snapshot, chunks);
        }
        self.after_input(now_ms);
        Ok(())
    }

    /// A node opened a connection and presented its certificate (the transport checks
    /// that `from` holds the certificate's key). A valid certificate from a trusted site
    /// makes it a peer, of the site that certificate names even if another site claims
    /// the same node id; anything else refuses it before any message is read.
    pub fn handle_connect(
        &mut self,
        from: NodeId,
        cert: Record,
        now_ms: u64,
    ) -> Result<(), RecordError> {
        self.now_ms = self.now_ms.max(now_ms);
        if cert.kind != crate::record::RecordKind::NodeCert || cert.key != from.0 {
            return Err(RecordError::NotAllowed(
                "a connecting node must present its own node certificate".into(),
            ));
        }
        // The site this node says it belongs to, if that site really signed it (trusted
        // or not): a node that presents an untrusted site's certificate is not taken
        // for a trusted site's node on the strength of another site's claim to it.
        let presented = crate::record::NodeCert::decode(&cert.body)
            .ok()
            .filter(|c| c.node == from && c.site == cert.author)
            .filter(|_| self.records_verified.verify_signature(&cert).is_ok())
            .map(|c| c.site);
        if let Some(site) = presented {
            if self.presented.len() < PEERS_MAX || self.presented.contains_key(&from) {
                self.presented.insert(from, site);
            }
        }
        let accepted = self.accept_record(cert, from, now_ms);
        if presented.is_some_and(|site| self.peers.get(&from).is_some_and(|p| p.site != site)) {
            self.refresh_peers();
            self.placement_stale = true;
        }
        accepted?;
        self.after_input(now_ms);
        Ok(())
    }

    /// A message as it came off the wire: refused unread from a node that is not a
    /// trusted peer or is cut off, dropped (a strike) when oversized or malformed, and
    /// otherwise handled as `handle_message`.
    pub fn handle_message_bytes(&mut self, from: NodeId, bytes: &[u8], now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.admits(from) {
            return;
        }
        if bytes.len() > message::MESSAGE_BYTES_MAX {
            self.strike(
                from,
                format!(
                    "message of {} bytes, over the limit of {}",
                    bytes.len(),
                    message::MESSAGE_BYTES_MAX
                ),
            );
        } else {
            match Message::decode(bytes) {
                Ok(message) => return self.handle_message(from, message, now_ms),
                Err(error) => self.strike(from, format!("malformed message: {error}")),
            }
        }
        self.after_input(now_ms);
    }

    /// A decoded message. It is checked (`guard`) before it changes anything: from a
    /// node that is not a trusted peer, or one cut off, it is refused; one that breaks a
    /// rule is dropped and counts against its sender.
    pub fn handle_message(&mut self, from: NodeId, message: Message, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.admits(from) {
            return;
        }
        if let Err(reason) = self.check_message(from, &message) {
            self.strike(from, reason);
            self.after_input(now_ms);
            return;
        }
        self.heard_from(from, now_ms);
        if message.is_answer() {
            if let Some(peer) = self.peers.get_mut(&from) {
                peer.answered_at_ms = now_ms;
            }
        }
        match message {
            Message::Gossip {
                beats,
                digests,
                reply,
            } => self.on_gossip(from, beats, digests, reply, now_ms),
            Message::Entries { author, entries } => self.on_entries(from, author, entries),
            Message::Records { records } => self.on_records(from, records, now_ms),
            Message::Want { author, keys } => self.on_want(from, author, keys),
            Message::Offer { owner, ids } => self.on_offer(from, owner, ids),
            Message::Need {
                owner,
                need,
                have,
                basis,
            } => self.on_need(from, owner, need, have, basis),
            Message::Push {
                owner,
                id,
                size_bytes,
                sealed,
            } => self.on_push(from, owner, id, size_bytes, sealed),
            Message::PushAck {
                owner,
                id,
                stored,
                basis,
            } => self.on_push_ack(from, owner, id, stored, basis),
            Message::SyncDigest { owner, digests } => self.on_sync_digest(from, owner, digests),
            Message::SyncIds {
                owner,
                partition,
                ids,
                reply,
                basis,
            } => self.on_sync_ids(from, owner, partition, ids, reply, basis),
            Message::Fetch { owner, id } => self.on_fetch(from, owner, id),
            Message::FetchReply { owner, id, sealed } => {
                self.on_fetch_reply(from, owner, id, sealed, now_ms)
            }
            Message::Audit { owner, id, nonce } => self.on_audit(from, owner, id, nonce),
            Message::AuditReply {
                owner,
                id,
                nonce,
                proof,
            } => self.on_audit_reply(from, owner, id, nonce, proof),
            Message::GcWant {
                owner,
                batch,
                from_index,
            } => self.on_gc_want(from, owner, batch, from_index),
            Message::GcIds {
                owner,
                batch,
                from_index,
                ids,
                last,
            } => self.on_gc_ids(from, owner, batch, from_index, ids, last),
        }
        self.after_input(now_ms);
    }

    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.check_liveness(now_ms);
        self.end_penalties(now_ms);
        if now_ms >= self.next_gossip_ms {
            self.next_gossip_ms = now_ms + self.config.gossip_interval_ms;
            self.gossip_round(now_ms);
        }
        if now_ms >= self.next_sync_ms {
            self.next_sync_ms = now_ms + self.config.sync_interval_ms;
            self.sync_round(now_ms);
        }
        if now_ms >= self.next_audit_ms {
            self.next_audit_ms = now_ms + self.config.audit_interval_ms.max(1);
            self.start_audit(now_ms);
        }
        if now_ms >= self.next_scrub_ms {
            self.next_scrub_ms = now_ms + self.scrub_read_interval_ms();
            self.scrub_next();
        }
        self.expire_fetches(now_ms);
        self.expire_audits(now_ms);
        self.after_input(now_ms);
    }

    pub fn handle_write_done(&mut self, op: u64, ok: bool, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if let Some((from, chunk)) = self.writes.remove(&op) {
            self.write_done(from, chunk, ok);
        }
        self.after_input(now_ms);
    }

    /// `sealed` is the chunk's blob as read, or `None` when it could not be read. The
    /// engine checks the blob's signature before using it.
    pub fn handle_read_done(&mut self, op: u64, sealed: Option<Vec<u8>>, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if let Some((purpose, id)) = self.reads.remove(&op) {
            self.read_done(purpose, id, sealed, now_ms);
        }
        self.after_input(now_ms);
    }

    // ---- outputs ------------------------------------------------------------------

    pub fn poll_transmit(&mut self) -> Option<(NodeId, Message)> {
        self.transmits.pop_front()
    }

    pub fn poll_storage(&mut self) -> Option<StorageOp> {
        self.storage.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> u64 {
        let mut next = self
            .next_gossip_ms
            .min(self.next_sync_ms)
            .min(self.next_audit_ms)
            .min(self.next_scrub_ms);
        if let Some(at) = self.audits.values().map(|a| a.deadline_ms).min() {
            next = next.min(at);
        }
        if let Some(at) = self.pushes.ready_at() {
            next = next.min(at);
        }
        if let Some(at) = self.fetches.values().map(|f| f.deadline_ms).min() {
            next = next.min(at);
        }
        next
    }

    // ---- shared plumbing ----------------------------------------------------------

    fn send(&mut self, to: NodeId, message: Message) {
        debug_assert_ne!(to, self.node, "an engine never messages itself");
        assert!(
            self.transmits.len() < OUTPUTS_MAX,
            "caller drains transmits"
        );
        self.transmits.push_back((to, message));
    }

    fn push_storage(&mut self, op: StorageOp) {
        assert!(
            self.storage.len() < OUTPUTS_MAX,
            "caller drains storage ops"
        );
        self.storage.push_back(op);
    }

    fn push_event(&mut self, event: Event) {
        assert!(self.events.len() < OUTPUTS_MAX, "caller drains events");
        self.events.push_back(event);
    }

    fn next_op(&mut self) -> u64 {
        self.next_op += 1;
        self.next_op
    }

    /// Work every input ends with: recompute placement if it went stale, send batched
    /// offers, start the pushes the rate limit allows.
    fn after_input(&mut self, now_ms: u64) {
        if self.placement_stale {
            self.rebuild_placement();
        }
        self.flush_offers();
        self.start_pushes(now_ms);
    }

    /// Validates and merges a record from `from` (this node for local records).
    fn accept_record(
        &mut self,
        record: Record,
        from: NodeId,
        now_ms: u64,
    ) -> Result<(), RecordError> {
        if let Err(error) = self.records_verified.validate(&record, &self.trust) {
            if from != self.node {
                self.counters.records_rejected += 1;
                self.push_event(Event::RecordRejected {
                    from,
                    error: error.to_string(),
                });
            }
            return Err(error);
        }
        self.merge_valid_record(record, from, now_ms)
    }

    /// Records a peer relayed. A record from an author this node does not trust is
    /// refused (trust differs between sites, so an honest peer may send one); a record
    /// that fails any check independent of trust (signature, body, author's right to
    /// state it) can only come from a forger, and counts as one strike per message.
    fn on_records(&mut self, from: NodeId, records: Vec<Record>, now_ms: u64) {
        let mut forged = None;
        for record in records {
            match self.records_verified.validate(&record, &self.trust) {
                Ok(()) => {
                    // Only "catalog full" fails here; it is not the sender's fault.
                    let _ = self.merge_valid_record(record, from, now_ms);
                }
                Err(error) => {
                    self.counters.records_rejected += 1;
                    if !matches!(error, RecordError::UntrustedAuthor(_)) {
                        forged.get_or_insert_with(|| error.to_string());
                    }
                    self.push_event(Event::RecordRejected {
                        from,
                        error: error.to_string(),
                    });
                }
            }
        }
        if let Some(reason) = forged {
            self.strike(from, format!("forged or invalid record: {reason}"));
        }
    }

    /// Merges a record `validate` accepted.
    fn merge_valid_record(
        &mut self,
        record: Record,
        from: NodeId,
        now_ms: u64,
    ) -> Result<(), RecordError> {
        let kind = record.kind;
        match self.catalog.insert(record.clone()) {
            Insert::New | Insert::Replaced => {
                if record.is_tombstone() && record.author == self.site {
                    // Forgotten: nothing waits for it to reach R sites any more.
                    self.pending_snapshots.remove(&record.key);
                }
                let author = record.author;
                self.push_storage(StorageOp::SaveRecord(record));
                match kind {
                    crate::record::RecordKind::Snapshot
                    | crate::record::RecordKind::GcStatement => self.gc_refresh(author, now_ms),
                    _ => self.trust_changed(),
                }
            }
            Insert::Stale => {}
            Insert::Full => {
                return Err(RecordError::NotAllowed("catalog full".into()));
            }
        }
        if from == self.node {
            self.after_input(now_ms);
        }
        Ok(())
    }

    /// Recomputes trust and the peer table from the catalog; drops the records of sites
    /// no longer trusted.
    fn trust_changed(&mut self) {
        let trust = self.catalog.trust(self.site);
        {
            let dropped: Vec<SiteId> = self
                .catalog
                .authors()
                .filter(|a| !trust.is_trusted(a))
                .collect();
            for author in dropped {
                let keys: Vec<RecordKey> =
                    self.catalog.by_author(author).map(RecordKey::of).collect();
                self.catalog.remove_author(author);
                self.gc_forget_owner(&author);
                for key in keys {
                    self.push_storage(StorageOp::DropRecord(key));
                }
            }
            self.trust = trust;
        }
        self.refresh_peers();
        self.placement_stale = true;
    }
}

/// Partition of a chunk id: its top bits.
pub fn partition_of(id: &ChunkId) -> usize {
    usize::from(id.0[0]) * message::PARTITIONS / 256
}

/// The smallest id in a partition, for range scans.
fn partition_start(partition: usize) -> ChunkId {
    let mut id = [0u8; 32];
    id[0] = (partition * 256 / message::PARTITIONS) as u8;
    ChunkId(id)
}

fn chunk_hash(id: &ChunkId) -> u64 {
    u64::from_le_bytes(id.0[8..16].try_into().expect("8 bytes"))
}
