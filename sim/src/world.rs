//! The simulated world: sites with keys and uplinks, nodes running the real Engine, their
//! disks, a virtual clock and one event queue. Every random choice comes from one seeded
//! generator, events at the same instant run in the order they were scheduled, and so one
//! seed replays the same run bit for bit (`trace_hash` proves it).
//!
//! Network model: a message between two offices waits for the sender's uplink (its size
//! over the office's upload bandwidth, one message at a time), then takes the link's
//! latency plus jitter; it may be lost, duplicated, or dropped by a partition. Inside an
//! office the LAN takes 1 ms and is not the bottleneck.
//!
//! `faults` holds the scenario's faults (crashes, disks that rot, lose writes or come back
//! old, partitions, trust changes) and the liveness phase's heal; `hostile` the hostile
//! node wrapper and the outsider; `checks` the invariants checked as things happen
//! (quotas, records accepted, copies served, who is heard); `admit` runs each node's
//! `cairn_protocol::admission` on the connections between processes.

mod admit;
mod checks;
mod faults;
mod hostile;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use cairn_protocol::admission::{Admission, AdmissionConfig};
use cairn_protocol::blob::sign_blob;
use cairn_protocol::catalog::{Catalog, RecordKey};
use cairn_protocol::engine::{ChunkRef, Engine, EngineConfig, Event, Message, StorageOp};
use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{NodeCert, Record, RecordKind, TrustGrant};
use cairn_protocol::rng::Rng;
use ed25519_dalek::SigningKey;

use crate::coverage::Coverage;
use crate::scenario::Scenario;

pub use admit::Stranger;
pub use checks::record_hash;
pub use faults::Undo;
pub use hostile::{HostileState, Lies, Outsider};

pub const GIB: f64 = (1u64 << 30) as f64;
pub const HOUR_US: u64 = 3_600_000_000;
const LAN_LATENCY_US: u64 = 1_000;
/// How long a site's own nodes may act on an older grant after the site changed it (and
/// a restarted node on what its disk held).
pub const GRANT_PROPAGATION_US: u64 = 10 * 60 * 1_000_000;
/// Connections one simulated process remembers (more than any scenario's nodes).
const PEERS_CONNECTED_MAX: usize = 1 << 16;
/// Superseded record versions kept for replays.
const SUPERSEDED_MAX: usize = 4096;

pub struct SiteState {
    pub name: String,
    pub key: SigningKey,
    pub id: SiteId,
    pub uplink_bytes_per_sec: f64,
    pub uplink_busy_until_us: u64,
    pub destroyed: bool,
    pub nodes: Vec<usize>,
    pub node_capacity_bytes: u64,
    /// The outsider's own site: no one grants it anything.
    pub outsider: bool,
}

/// A chunk on a simulated disk: a short stand-in blob (sealed bytes and the owner's
/// signature, `cairn_protocol::blob`), with the real size.
#[derive(Clone, Debug)]
pub struct DiskChunk {
    pub owner: SiteId,
    pub size_bytes: u64,
    pub body: Vec<u8>,
    /// The body is the chunk's true blob (not rotted, not a liar's garbage).
    pub good: bool,
    /// When a bad body became bad (rot, or a liar's write).
    pub bad_since_us: u64,
}

#[derive(Clone, Default)]
pub struct Disk {
    pub chunks: BTreeMap<ChunkId, DiskChunk>,
    pub records: BTreeMap<RecordKey, Record>,
}

pub struct SimNode {
    pub site: usize,
    pub id: NodeId,
    pub engine: Option<Engine>,
    pub disk: Disk,
    /// The timer currently scheduled for this node's engine.
    pub timer_at_us: Option<u64>,
    /// Bumped at every crash, so messages and timers meant for the old process are
    /// dropped.
    pub incarnation: u64,
    /// When the engine last started (a restarted node gets time to hear what it missed).
    pub started_us: u64,
    pub hostile: Option<HostileState>,
    /// Storage operations not yet flushed, kept only for nodes a lost-writes fault will hit.
    pub journal: Option<std::collections::VecDeque<(u64, Undo)>>,
    /// A lost-writes fault waiting for this node's next write.
    pub lost_writes_armed: Option<faults::LostWritesArmed>,
    /// The disk this node comes back with at its next restart (an old-disk fault).
    pub comes_back_with: Option<Disk>,
    /// Retired for good (a hostile node at the liveness phase).
    pub retired: bool,
    /// The peers that have connected to this process: the peer's incarnation when it
    /// did. A peer restarted since connects again (and presents its certificate).
    pub connected: BTreeMap<usize, u64>,
    /// The connection each peer in `connected` came on, as this node's admission names it.
    pub conns: BTreeMap<usize, u64>,
    /// Who may stay connected: the node's real admission policy (hello deadline, bounds,
    /// blocks), fed as `node/src/mesh/admit.rs` feeds it.
    pub admission: Admission<u64, usize>,
    /// The timer currently scheduled for this node's admission.
    pub admission_timer_at_us: Option<u64>,
}

impl SimNode {
    fn new(site: usize, id: NodeId) -> SimNode {
        SimNode {
            site,
            id,
            engine: None,
            disk: Disk::default(),
            timer_at_us: None,
            incarnation: 0,
            started_us: 0,
            hostile: None,
            journal: None,
            lost_writes_armed: None,
            comes_back_with: None,
            retired: false,
            connected: BTreeMap::new(),
            conns: BTreeMap::new(),
            admission: Admission::new(AdmissionConfig::default()),
            admission_timer_at_us: None,
        }
    }
}

#[derive(Debug)]
pub enum Ev {
    Deliver {
        to: usize,
        from: usize,
        incarnation: u64,
        message: Message,
    },
    Timer {
        node: usize,
        incarnation: u64,
    },
    Fault(usize),
    Restart(usize),
    Heal {
        from: usize,
        to: usize,
    },
    Snapshot(usize),
    Check,
    /// Copy a node's disk now, for an old-disk fault later (the fault's index).
    SaveImage(usize),
    HostileTick(usize),
    OutsiderTick,
    /// A node's admission timer (hello deadlines, blocks ending).
    AdmissionTimer {
        node: usize,
        incarnation: u64,
    },
    /// A stranger's connection reaches its hello deadline: it must be closed by now.
    StrangerDue {
        node: usize,
        conn: u64,
    },
    /// A lost-writes fault's crash (on the node's next write, or when it waited too long).
    LoseWrites(usize),
    /// Start a restore drill while faults run.
    Drill,
    /// A site prunes (the site's index).
    Prune(usize),
    /// A backup of an image that took `backup_minutes` commits (the image's index).
    Commit(usize),
    /// Garbage collection's clock at the owners' nodes (the fallback re-sign).
    GcTick,
}

enum Completion {
    Write(u64),
    Read(u64, Option<Vec<u8>>),
}

/// What the engines reported, for the checkers.
pub struct Reported {
    pub node: usize,
    pub event: Event,
    /// The node's site was cut off from another by a partition when it happened.
    pub partitioned: bool,
}

/// Verified blobs the mesh's shared memo keeps: more than the chunks of any scenario's
/// run hold (a day of the default mesh has about 12,000), so each is checked once.
const BLOB_MEMO_MAX: usize = 1 << 17;

pub struct World {
    pub scenario: Scenario,
    pub now_us: u64,
    pub rng: Rng,
    pub sites: Vec<SiteState>,
    pub nodes: Vec<SimNode>,
    pub node_index: BTreeMap<NodeId, usize>,
    /// Every record any site signed, newest version per key: what a site's own records
    /// are when it seeds a new or recovered node.
    pub truth: Catalog,
    pub config: EngineConfig,
    /// Blobs any engine of this mesh verified: every copy of a chunk is the same bytes,
    /// so one signature check serves every engine (`Engine::share_blob_memo`).
    blob_memo: cairn_protocol::blob::SharedBlobMemo,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    seq: u64,
    /// One-way latency between each pair of sites, µs.
    latency_us: Vec<Vec<u64>>,
    pub blocked: BTreeSet<(usize, usize)>,
    pub trace: blake3::Hasher,
    pub reported: Vec<Reported>,
    pub stats: Stats,
    /// Real sizes of chunks, for charging bandwidth on fetch replies.
    pub chunk_sizes: BTreeMap<ChunkId, u64>,
    /// The true bytes of every chunk backed up, as its holders store it.
    pub bodies: BTreeMap<ChunkId, Vec<u8>>,
    /// Good copies of each chunk on disks that exist (crashed nodes' disks included).
    pub copies: BTreeMap<ChunkId, u32>,
    /// When each (node, chunk) copy on a disk was put there, for invariant 12's excuse
    /// of garbage taken back in an inactive gap.
    pub copy_added_us: BTreeMap<(usize, ChunkId), u64>,
    /// Chunks whose good copies went from some to none, with the time.
    pub zeroed: Vec<(ChunkId, u64)>,
    /// Chunks whose last good copy went in a disk fault (lost, rotted, writes undone),
    /// not by an engine's deletion; and whether a disk fault is being applied now.
    pub last_copy_lost_to_fault: BTreeSet<ChunkId>,
    pub(crate) in_disk_fault: bool,
    /// Records (key, version) whose newest version went with the only disk that held
    /// it, before any other node had it (a snapshot taken the moment its node was wiped).
    pub records_lost_to_fault: BTreeSet<(RecordKey, u64)>,
    /// Destructive faults, as spans (from, until, site): a lost disk is an instant, a
    /// node serving wrong bytes a span.
    pub destructive: Vec<(u64, u64, usize)>,
    /// Invariants broken as things happened (quotas, forged records, corrupt copies
    /// served, the outsider heard), for the report.
    pub violations: Vec<String>,
    pub coverage: Coverage,
    /// Hashes of every record a site really signed, each version: what a node may accept.
    pub genuine: BTreeSet<[u8; 32]>,
    /// Superseded versions of records, for replays (bounded).
    pub superseded: Vec<Record>,
    /// When each site revoked each other: (by, of) -> time.
    pub revoked_at: BTreeMap<(usize, usize), u64>,
    /// Copies of a disk taken for old-disk faults, by fault index.
    pub disk_images: BTreeMap<usize, Disk>,
    /// Pushes of each chunk on the wire.
    pub pushes_in_flight: BTreeMap<ChunkId, u32>,
    pub outsider: Option<Outsider>,
    /// Nodes that claimed chunks they did not keep: what they claim, and when an audit
    /// last caught them.
    pub liars: BTreeMap<usize, Lies>,
    /// `CAIRN_SIM_TRACE_CHUNK=<hex prefix>`: print everything that happens to the chunks
    /// whose id starts so (a debugging aid; it changes nothing in the run).
    trace_chunk: Option<String>,
    /// `CAIRN_SIM_TRACE_PENALTIES=1`: print every strike, cut-off, failed audit and
    /// exclusion, with who did it to whom.
    trace_penalties: bool,
    /// `CAIRN_SIM_TRACE_TYPES=audit,audit-reply`: print every message of those types
    /// sent, dropped and delivered.
    trace_types: Vec<String>,
    /// When the last penalty an engine imposed during the faults ends (a cut-off or a
    /// placement exclusion): the liveness phase lasts at least until then.
    pub penalties_until_us: u64,
    /// The liveness phase has started: faults are over.
    pub healed: bool,
    pub heal_us: u64,
    /// When each site last changed what it grants each owner: writes in flight at that
    /// moment, and nodes of the site that have not heard yet, get `GRANT_PROPAGATION_US`.
    pub grant_changed_at: BTreeMap<(usize, SiteId), u64>,
    /// Bytes each site holds for each owner, across its nodes' disks.
    pub site_held: BTreeMap<(usize, SiteId), u64>,
    /// Chunks of kept, acknowledged snapshots, with how many such snapshots use each:
    /// what garbage collection must never take below R sites (invariant 11).
    pub acked_chunks: BTreeMap<ChunkId, u32>,
    /// Invariant 13: snapshots forgotten (their tombstone signed), by key.
    pub forgotten: BTreeSet<[u8; 32]>,
    /// Connections that never say hello (the outsider's silent strangers), open now:
    /// (node, connection) -> when and from where.
    pub strangers: BTreeMap<(usize, u64), Stranger>,
    /// The last connection id handed out (ids are unique across the run).
    pub conn_seq: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub messages: u64,
    pub message_bytes: u64,
    pub dropped: u64,
    pub engine_calls: u64,
    /// Messages and bytes sent, by message type.
    pub by_type: BTreeMap<&'static str, (u64, u64)>,
}

/// Keeps one copy of each violation text, and at most `VIOLATIONS_MAX` of them.
pub const VIOLATIONS_MAX: usize = 64;

impl World {
    pub fn new(scenario: Scenario, seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let config = engine_config(&scenario);
        let mut sites = Vec::new();
        let mut nodes = Vec::new();
        for spec in &scenario.sites {
            let mut secret = [0u8; 32];
            rng.fill(&mut secret);
            let key = SigningKey::from_bytes(&secret);
            let id = SiteId(key.verifying_key().to_bytes());
            let site_idx = sites.len();
            let mut site_nodes = Vec::new();
            for _ in 0..spec.nodes {
                let mut node_id = [0u8; 32];
                rng.fill(&mut node_id);
                site_nodes.push(nodes.len());
                nodes.push(SimNode::new(site_idx, NodeId(node_id)));
            }
            sites.push(SiteState {
                name: spec.name.clone(),
                key,
                id,
                uplink_bytes_per_sec: spec.uplink_mbit * 1e6 / 8.0,
                uplink_busy_until_us: 0,
                destroyed: false,
                nodes: site_nodes,
                node_capacity_bytes: (spec.node_capacity_gib * GIB) as u64,
                outsider: false,
            });
        }
        let n_sites = sites.len();
        let mut latency_us = vec![vec![LAN_LATENCY_US; n_sites]; n_sites];
        let [lo, hi] = scenario.network.latency_ms;
        let pairs: Vec<(usize, usize)> = (0..n_sites)
            .flat_map(|a| ((a + 1)..n_sites).map(move |b| (a, b)))
            .collect();
        for (a, b) in pairs {
            let ms = rng.range(lo.min(hi), hi.max(lo));
            latency_us[a][b] = ms * 1000;
            latency_us[b][a] = ms * 1000;
        }
        let node_index = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let mut world = World {
            blob_memo: std::sync::Arc::new(std::sync::Mutex::new(
                cairn_protocol::memo::VerifiedMemo::remembering(BLOB_MEMO_MAX),
            )),
            scenario,
            now_us: 0,
            rng,
            sites,
            nodes,
            node_index,
            truth: Catalog::default(),
            config,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            latency_us,
            blocked: BTreeSet::new(),
            trace: blake3::Hasher::new(),
            reported: Vec::new(),
            stats: Stats::default(),
            chunk_sizes: BTreeMap::new(),
            bodies: BTreeMap::new(),
            copies: BTreeMap::new(),
            copy_added_us: BTreeMap::new(),
            zeroed: Vec::new(),
            last_copy_lost_to_fault: BTreeSet::new(),
            records_lost_to_fault: BTreeSet::new(),
            in_disk_fault: false,
            destructive: Vec::new(),
            violations: Vec::new(),
            coverage: Coverage::default(),
            genuine: BTreeSet::new(),
            superseded: Vec::new(),
            revoked_at: BTreeMap::new(),
            disk_images: BTreeMap::new(),
            pushes_in_flight: BTreeMap::new(),
            outsider: None,
            liars: BTreeMap::new(),
            trace_chunk: std::env::var("CAIRN_SIM_TRACE_CHUNK").ok(),
            trace_penalties: std::env::var_os("CAIRN_SIM_TRACE_PENALTIES").is_some(),
            trace_types: std::env::var("CAIRN_SIM_TRACE_TYPES")
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            penalties_until_us: 0,
            healed: false,
            heal_us: 0,
            site_held: BTreeMap::new(),
            acked_chunks: BTreeMap::new(),
            forgotten: BTreeSet::new(),
            grant_changed_at: BTreeMap::new(),
            strangers: BTreeMap::new(),
            conn_seq: 0,
        };
        world.heal_us = hours_us(world.scenario.heal_hours());
        world.sign_initial_records();
        for node in 0..world.nodes.len() {
            world.start_node(node, true);
        }
        world.schedule_faults();
        world.schedule_hostile();
        for (idx, image) in world.scenario.images.clone().iter().enumerate() {
            world.schedule(
                (image.first_snapshot_hours * HOUR_US as f64) as u64,
                Ev::Snapshot(idx),
            );
        }
        world.schedule(HOUR_US, Ev::Check);
        if let Some(every) = world.scenario.drill_every_hours {
            world.schedule(hours_us(every), Ev::Drill);
        }
        if let Some(gc) = world.scenario.gc.clone() {
            for site in 0..world.sites.len() {
                world.schedule(hours_us(gc.prune_every_hours), Ev::Prune(site));
            }
            world.schedule(crate::run::GC_TICK_US, Ev::GcTick);
        }
        world
    }

    /// Remembers a record a site really signed: the newest version is the truth, every
    /// version is genuine, and superseded ones are material for replays.
    pub fn signed(&mut self, record: Record) {
        self.genuine.insert(record_hash(&record));
        if let Some(old) = self.truth.get(&RecordKey::of(&record)) {
            if self.superseded.len() < SUPERSEDED_MAX {
                self.superseded.push(old.clone());
            }
        }
        self.truth.insert(record);
    }

    pub fn site_of(&self, id: &SiteId) -> Option<usize> {
        self.sites.iter().position(|s| s.id == *id)
    }

    /// Prints `what` when `id` is the chunk being traced.
    pub fn trace(&self, id: &ChunkId, what: impl FnOnce() -> String) {
        if let Some(prefix) = &self.trace_chunk {
            if format!("{id:?}").contains(prefix.as_str()) {
                println!(
                    "{:>10.4} h {id:?}: {}",
                    self.now_us as f64 / HOUR_US as f64,
                    what()
                );
            }
        }
    }

    pub fn add_violation(&mut self, text: String) {
        if self.violations.len() < VIOLATIONS_MAX && !self.violations.contains(&text) {
            self.violations.push(text);
        }
    }

    /// Registers a chunk of a new snapshot: its size and its true blob, the stand-in
    /// sealed bytes signed by the owner site.
    pub fn register_chunk(&mut self, owner_site: usize, chunk: &ChunkRef) -> Vec<u8> {
        self.chunk_sizes.insert(chunk.id, chunk.size_bytes);
        let key = &self.sites[owner_site].key;
        self.bodies
            .entry(chunk.id)
            .or_insert_with(|| sign_blob(key, &chunk.id, &crate::run::stand_in(&chunk.id)))
            .clone()
    }

    /// Whether `blob` is the true blob of chunk `id` (unknown ids are junk: false).
    pub fn is_good(&self, id: &ChunkId, blob: &[u8]) -> bool {
        self.bodies.get(id).is_some_and(|b| b[..] == blob[..])
    }

    /// Whether `sealed` (a fetch's answer, signature removed) is chunk `id`'s true bytes.
    pub fn is_good_sealed(&self, id: &ChunkId, sealed: &[u8]) -> bool {
        self.bodies.contains_key(id) && crate::run::stand_in(id) == sealed
    }

    fn sign_initial_records(&mut self) {
        let quota = (self.scenario.quota_gib * GIB) as u64;
        let n_sites = self.sites.len();
        let pairs: Vec<(usize, usize)> = if self.scenario.partners.is_empty() {
            (0..n_sites)
                .flat_map(|a| (0..n_sites).filter(move |b| *b != a).map(move |b| (a, b)))
                .collect()
        } else {
            let mut pairs = Vec::new();
            for [a, b] in self.scenario.partners.clone() {
                let a = self.scenario.site_index(&a).expect("checked at parse");
                let b = self.scenario.site_index(&b).expect("checked at parse");
                pairs.push((a, b));
                pairs.push((b, a));
            }
            pairs
        };
        for (a, b) in pairs {
            self.sign_grant(a, b, quota, false);
        }
        for site in 0..n_sites {
            for node in self.sites[site].nodes.clone() {
                self.sign_node_cert(site, node);
            }
        }
    }

    pub fn sign_grant(&mut self, by: usize, of: usize, quota_bytes: u64, revoked: bool) -> Record {
        let grantee = self.sites[of].id;
        let key = RecordKey {
            author: self.sites[by].id,
            kind: RecordKind::TrustGrant,
            key: grantee.0,
        };
        let version = self.truth.get(&key).map_or(1, |r| r.version + 1);
        let body = TrustGrant {
            grantee,
            quota_bytes,
            revoked,
        }
        .encode();
        let record = Record::sign(
            &self.sites[by].key,
            RecordKind::TrustGrant,
            grantee.0,
            version,
            body,
        );
        self.signed(record.clone());
        record
    }

    pub fn sign_node_cert(&mut self, site: usize, node: usize) -> Record {
        let cert = NodeCert {
            node: self.nodes[node].id,
            site: self.sites[site].id,
            name: format!("{}-{node}", self.sites[site].name),
            addresses: Vec::new(),
            capacity_bytes: self.sites[site].node_capacity_bytes,
        };
        let record = Record::sign(
            &self.sites[site].key,
            RecordKind::NodeCert,
            cert.node.0,
            1,
            cert.encode(),
        );
        self.signed(record.clone());
        record
    }

    /// Starts (or restarts) a node's engine from its disk. A fresh node is seeded with
    /// every record (as if it had joined and synced before the run); a restarted one
    /// gets only what its disk kept, plus its site's records when the disk was empty
    /// (a reformatted machine joins its site again).
    pub fn start_node(&mut self, node: usize, fresh: bool) {
        let seed = self.rng.next_u64();
        let now_ms = self.now_us / 1000;
        let site = self.nodes[node].site;
        let mut engine = Engine::new(
            self.config.clone(),
            self.nodes[node].id,
            self.sites[site].id,
            seed,
            now_ms,
        );
        engine.share_blob_memo(self.blob_memo.clone());
        let disk = &mut self.nodes[node].disk;
        if fresh || disk.records.is_empty() {
            for record in self.truth.records() {
                disk.records.insert(RecordKey::of(record), record.clone());
            }
        }
        engine.load_records(disk.records.values().cloned());
        for (id, chunk) in &disk.chunks {
            engine.load_chunk(ChunkRef {
                owner: chunk.owner,
                id: *id,
                size_bytes: chunk.size_bytes,
            });
        }
        self.nodes[node].engine = Some(engine);
        self.nodes[node].timer_at_us = None;
        self.nodes[node].started_us = self.now_us;
        self.nodes[node].admission = Admission::new(AdmissionConfig::default());
        self.nodes[node].admission_timer_at_us = None;
        self.pump(node);
    }

    pub fn stop_node(&mut self, node: usize) {
        self.nodes[node].engine = None;
        self.nodes[node].incarnation += 1;
        self.nodes[node].timer_at_us = None;
        self.nodes[node].connected.clear();
        self.connections_gone(node);
    }

    pub fn wipe_disk(&mut self, node: usize) {
        let chunks = std::mem::take(&mut self.nodes[node].disk.chunks);
        self.in_disk_fault = true;
        for (id, chunk) in &chunks {
            self.lose_copy(node, id, chunk);
        }
        self.in_disk_fault = false;
        let records = std::mem::take(&mut self.nodes[node].disk.records);
        for (key, record) in records {
            let newest = self
                .truth
                .get(&key)
                .is_some_and(|t| t.version == record.version);
            let elsewhere = self.nodes.iter().enumerate().any(|(n, other)| {
                n != node
                    && (other
                        .disk
                        .records
                        .get(&key)
                        .is_some_and(|r| r.version >= record.version)
                        || other.engine.as_ref().is_some_and(|e| {
                            e.catalog()
                                .get(&key)
                                .is_some_and(|r| r.version >= record.version)
                        }))
            });
            if newest && !elsewhere {
                self.records_lost_to_fault.insert((key, record.version));
            }
        }
        self.liars.remove(&node);
    }

    /// Accounts for a copy that left a disk (already removed from it).
    fn lose_copy(&mut self, node: usize, id: &ChunkId, chunk: &DiskChunk) {
        self.trace(id, || {
            format!("node {node} copy gone (good: {})", chunk.good)
        });
        let held = self
            .site_held
            .entry((self.nodes[node].site, chunk.owner))
            .or_insert(0);
        *held = held.saturating_sub(chunk.size_bytes);
        if chunk.good {
            self.lose_good_copy(id);
        }
    }

    /// One good copy fewer (deleted, lost, or rotted in place).
    fn lose_good_copy(&mut self, id: &ChunkId) {
        let count = self.copies.entry(*id).or_insert(0);
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.copies.remove(id);
            self.zeroed.push((*id, self.now_us));
            if self.in_disk_fault {
                self.last_copy_lost_to_fault.insert(*id);
            } else {
                self.last_copy_lost_to_fault.remove(id);
            }
        }
    }

    /// Puts a chunk on a node's disk (a backup's write or a received push).
    pub fn add_copy(&mut self, node: usize, id: ChunkId, chunk: DiskChunk) {
        let key = (self.nodes[node].site, chunk.owner);
        let (size_bytes, good) = (chunk.size_bytes, chunk.good);
        if trace_chunk(&id) {
            eprintln!(
                "chunk add {id:?} node {node} at {:.4} h",
                self.now_us as f64 / HOUR_US as f64
            );
        }
        if self.nodes[node].disk.chunks.insert(id, chunk).is_none() {
            self.copy_added_us.insert((node, id), self.now_us);
            if good {
                *self.copies.entry(id).or_insert(0) += 1;
            }
            *self.site_held.entry(key).or_insert(0) += size_bytes;
            self.journal(node, Undo::ChunkAdded(id));
        }
    }

    /// Removes a chunk from a node's disk (a deletion, or a write undone).
    pub fn remove_copy(&mut self, node: usize, id: &ChunkId) -> Option<DiskChunk> {
        let chunk = self.nodes[node].disk.chunks.remove(id)?;
        self.copy_added_us.remove(&(node, *id));
        if trace_chunk(id) {
            eprintln!(
                "chunk remove {id:?} node {node} at {:.4} h",
                self.now_us as f64 / HOUR_US as f64
            );
        }
        if let Some(lies) = self.liars.get_mut(&node) {
            lies.outstanding.remove(id);
        }
        self.lose_copy(node, id, &chunk);
        Some(chunk)
    }

    pub fn schedule(&mut self, at_us: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((at_us, self.seq)));
    }

    /// Runs events until `until_us` (inclusive) or until the queue is empty.
    pub fn run_until(&mut self, until_us: u64, mut on_event: impl FnMut(&mut World, Ev)) {
        while let Some(Reverse((at_us, seq))) = self.queue.peek().copied() {
            if at_us > until_us {
                break;
            }
            self.queue.pop();
            let ev = self
                .events
                .remove(&seq)
                .expect("every queued seq has an event");
            self.now_us = at_us;
            self.stats.events += 1;
            match ev {
                Ev::Deliver {
                    to,
                    from,
                    incarnation,
                    message,
                } => self.deliver(to, from, incarnation, message),
                Ev::Timer { node, incarnation } => {
                    if self.nodes[node].incarnation == incarnation
                        && self.nodes[node].timer_at_us == Some(at_us)
                    {
                        self.nodes[node].timer_at_us = None;
                        if let Some(engine) = self.nodes[node].engine.as_mut() {
                            engine.handle_timeout(at_us / 1000);
                            self.stats.engine_calls += 1;
                        }
                        self.pump(node);
                    }
                }
                Ev::SaveImage(fault) => {
                    self.save_image(fault);
                }
                Ev::HostileTick(node) => self.hostile_tick(node),
                Ev::OutsiderTick => self.outsider_tick(),
                Ev::AdmissionTimer { node, incarnation } => {
                    if self.nodes[node].incarnation == incarnation
                        && self.nodes[node].admission_timer_at_us == Some(at_us)
                    {
                        self.nodes[node].admission_timer_at_us = None;
                        self.nodes[node].admission.handle_timeout(at_us / 1000);
                        self.apply_admission(node);
                    }
                }
                Ev::StrangerDue { node, conn } => self.check_stranger(node, conn),
                Ev::LoseWrites(node) => self.lose_writes(node),
                other => on_event(self, other),
            }
        }
        self.now_us = self.now_us.max(until_us);
    }

    fn deliver(&mut self, to: usize, from: usize, incarnation: u64, message: Message) {
        if let Message::Push { id, .. } = &message {
            if let Some(n) = self.pushes_in_flight.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.pushes_in_flight.remove(id);
                }
            }
        }
        if self.nodes[to].incarnation != incarnation || self.nodes[to].engine.is_none() {
            self.stats.dropped += 1;
            return;
        }
        if !self.trace_types.is_empty() {
            self.trace_type("delivered", from, to, &message);
        }
        self.capture(to, &message);
        let from_id = self.nodes[from].id;
        let knows_sender = self.nodes[to]
            .engine
            .as_ref()
            .is_some_and(|e| e.peer_state(&from_id).is_some());
        let from_incarnation = self.nodes[from].incarnation;
        let connected = self.nodes[to].connected.get(&from) == Some(&from_incarnation);
        if self.nodes[to]
            .admission
            .is_blocked(&from, self.now_us / 1000)
        {
            // The transport denies a blocked peer's connections.
            self.coverage.admission_blocked_messages += 1;
            self.stats.dropped += 1;
            return;
        }
        if (!knows_sender || !connected) && !self.handshake(to, from) {
            self.stats.dropped += 1;
            return;
        }
        let engine = self.nodes[to].engine.as_mut().expect("checked above");
        engine.handle_message(from_id, message, self.now_us / 1000);
        self.stats.engine_calls += 1;
        self.pump(to);
    }

    /// Carries out everything a node's engine asked for, feeding storage completions back
    /// in at once (the simulated disk answers immediately), until it asks for nothing more.
    pub fn pump(&mut self, node: usize) {
        loop {
            let (ops, events, sends) = {
                let Some(engine) = self.nodes[node].engine.as_mut() else {
                    return;
                };
                let ops: Vec<StorageOp> = std::iter::from_fn(|| engine.poll_storage()).collect();
                let events: Vec<Event> = std::iter::from_fn(|| engine.poll_event()).collect();
                let sends: Vec<(NodeId, Message)> =
                    std::iter::from_fn(|| engine.poll_transmit()).collect();
                (ops, events, sends)
            };
            let completions: Vec<Completion> = ops
                .into_iter()
                .filter_map(|op| self.apply_storage(node, op))
                .collect();
            for event in events {
                if self.trace_chunk.is_some() {
                    let id = match &event {
                        Event::ChunkStored { chunk, .. } => Some(chunk.id),
                        Event::ChunkLost { id }
                        | Event::Trimmed { id }
                        | Event::PushRefused { id, .. }
                        | Event::AuditFailed { id, .. }
                        | Event::Fetched { id, .. }
                        | Event::FetchFailed { id, .. } => Some(*id),
                        _ => None,
                    };
                    if let Some(id) = id {
                        self.trace(&id, || {
                            let engine = self.nodes[node].engine.as_ref().expect("live");
                            let view: Vec<String> = engine
                                .peers()
                                .filter_map(|(peer, _, state)| {
                                    let idx = self.node_index.get(&peer)?;
                                    let excluded = engine.is_excluded(&peer);
                                    let cut = engine.is_cut_off(&peer);
                                    (excluded
                                        || cut
                                        || state != cairn_protocol::engine::PeerState::Live)
                                        .then(|| {
                                            format!(
                                                "{idx}:{state:?}{}{}",
                                                if excluded { "+excluded" } else { "" },
                                                if cut { "+cut" } else { "" }
                                            )
                                        })
                                })
                                .collect();
                            let owner = self.nodes[node]
                                .disk
                                .chunks
                                .get(&id)
                                .map(|c| c.owner)
                                .or_else(|| {
                                    self.nodes
                                        .iter()
                                        .find_map(|n| n.disk.chunks.get(&id).map(|c| c.owner))
                                });
                            let targets: Vec<Option<usize>> = owner
                                .map(|o| engine.target_sites(&o, &id))
                                .unwrap_or_default()
                                .iter()
                                .map(|s| self.site_of(s))
                                .collect();
                            format!("node {node} event {event:?}; target sites {targets:?}; peers not live: {view:?}")
                        });
                    }
                }
                if self.trace_penalties {
                    self.trace_penalty(node, &event);
                }
                self.check_event(node, &event);
                let site = self.nodes[node].site;
                let partitioned = self.blocked.iter().any(|(a, b)| *a == site || *b == site);
                self.reported.push(Reported {
                    node,
                    event,
                    partitioned,
                });
            }
            for (to, message) in sends {
                if self.trace_chunk.is_some() {
                    self.trace_message(node, &to, &message);
                }
                self.check_outgoing(node, &to, &message);
                let message = self.rewrite_outgoing(node, message);
                self.send(node, to, message);
            }
            if completions.is_empty() {
                break;
            }
            let now_ms = self.now_us / 1000;
            let engine = self.nodes[node].engine.as_mut().expect("checked above");
            for completion in completions {
                match completion {
                    Completion::Write(op) => engine.handle_write_done(op, true, now_ms),
                    Completion::Read(op, body) => engine.handle_read_done(op, body, now_ms),
                }
                self.stats.engine_calls += 1;
            }
        }
        self.arm_timer(node);
    }

    /// The simulated disk: every operation completes at once.
    fn apply_storage(&mut self, node: usize, op: StorageOp) -> Option<Completion> {
        if self.trace_chunk.is_some() {
            match &op {
                StorageOp::Write { id, .. }
                | StorageOp::Read { id, .. }
                | StorageOp::Delete { id, .. } => {
                    let kind = format!("{op:?}");
                    let kind = kind.split([' ', '{']).next().unwrap_or("").to_string();
                    let held = self.nodes[node].disk.chunks.get(id).map(|c| c.good);
                    self.trace(id, || {
                        format!("node {node} storage {kind} (disk holds: {held:?})")
                    });
                }
                _ => {}
            }
        }
        match op {
            StorageOp::Write {
                op,
                owner,
                id,
                sealed,
            } => {
                let size_bytes = self
                    .chunk_sizes
                    .get(&id)
                    .copied()
                    .unwrap_or(sealed.len() as u64);
                self.wrote(node);
                let body = self.stored_body(node, owner, id, sealed);
                let good = self.is_good(&id, &body);
                self.check_write(node, &id, good);
                self.add_copy(
                    node,
                    id,
                    DiskChunk {
                        owner,
                        size_bytes,
                        body,
                        good,
                        bad_since_us: self.now_us,
                    },
                );
                Some(Completion::Write(op))
            }
            StorageOp::Read { op, id } => {
                let body = self.nodes[node]
                    .disk
                    .chunks
                    .get(&id)
                    .map(|c| c.body.clone());
                Some(Completion::Read(op, body))
            }
            StorageOp::Delete { id, .. } => {
                if self.pushes_in_flight.contains_key(&id) {
                    self.coverage.repair_raced_deletion += 1;
                }
                if let Some(chunk) = self.remove_copy(node, &id) {
                    self.journal(node, Undo::ChunkRemoved(id, chunk));
                }
                None
            }
            StorageOp::SaveRecord(record) => {
                self.check_saved_record(node, &record);
                let key = RecordKey::of(&record);
                let before = self.nodes[node].disk.records.insert(key, record);
                self.journal(node, Undo::Record(key, before));
                None
            }
            StorageOp::DropRecord(key) => {
                let before = self.nodes[node].disk.records.remove(&key);
                self.journal(node, Undo::Record(key, before));
                None
            }
        }
    }

    fn arm_timer(&mut self, node: usize) {
        let Some(engine) = self.nodes[node].engine.as_ref() else {
            return;
        };
        let at_us = (engine.poll_timeout() * 1000).max(self.now_us + 1);
        if self.nodes[node].timer_at_us.is_some_and(|t| t <= at_us) {
            return;
        }
        self.nodes[node].timer_at_us = Some(at_us);
        let incarnation = self.nodes[node].incarnation;
        self.schedule(at_us, Ev::Timer { node, incarnation });
    }

    /// What a message costs on the wire: its encoding, with stand-in chunk bodies
    /// counted at their real sizes.
    fn wire_bytes(&self, message: &Message, encoded: u64) -> u64 {
        match message {
            Message::Push {
                size_bytes, sealed, ..
            } => encoded - sealed.len() as u64 + size_bytes,
            Message::FetchReply {
                id,
                sealed: Some(sealed),
                ..
            } => encoded - sealed.len() as u64 + self.chunk_sizes.get(id).copied().unwrap_or(0),
            _ => encoded,
        }
    }

    /// Prints a message of a traced type at one step of its way.
    fn trace_type(&self, step: &str, from: usize, to: usize, message: &Message) {
        if self.trace_types.iter().any(|t| t == message_type(message)) {
            let text: String = format!("{message:?}").chars().take(120).collect();
            println!(
                "{:>10.4} h {step} {from} -> {to}: {text}",
                self.now_us as f64 / HOUR_US as f64
            );
        }
    }

    fn send(&mut self, from: usize, to_id: NodeId, message: Message) {
        let Some(&to) = self.node_index.get(&to_id) else {
            self.stats.dropped += 1;
            return;
        };
        if !self.trace_types.is_empty() {
            self.trace_type("sent", from, to, &message);
        }
        let encoded = message.encode();
        let bytes = self.wire_bytes(&message, encoded.len() as u64);
        let bulk = matches!(
            message,
            Message::Push { .. }
                | Message::FetchReply {
                    sealed: Some(_),
                    ..
                }
        );
        self.stats.messages += 1;
        self.stats.message_bytes += bytes;
        let by_type = self
            .stats
            .by_type
            .entry(message_type(&message))
            .or_insert((0, 0));
        by_type.0 += 1;
        by_type.1 += bytes;
        if self.hostile_now(to) == Some(crate::scenario::Behaviour::Flood)
            && self.nodes[from].hostile.is_none()
        {
            self.coverage.flood_answer_bytes += bytes;
        }
        let (site_from, site_to) = (self.nodes[from].site, self.nodes[to].site);
        if self.blocked.contains(&(site_from, site_to)) {
            self.stats.dropped += 1;
            return;
        }
        let mut at_us = self.now_us;
        if site_from != site_to {
            // Chunks queue for the uplink one after another; small control messages are
            // interleaved with them (QUIC streams share the link), so they pay only their
            // own transmission time.
            let site = &mut self.sites[site_from];
            let tx_us = (bytes as f64 / site.uplink_bytes_per_sec * 1e6) as u64;
            if bulk {
                let start = site.uplink_busy_until_us.max(self.now_us);
                site.uplink_busy_until_us = start + tx_us;
                at_us = start + tx_us;
            } else {
                site.uplink_busy_until_us = site.uplink_busy_until_us.max(self.now_us) + tx_us;
                at_us += tx_us;
            }
            if self.rng.chance(self.scenario.network.loss) {
                self.stats.dropped += 1;
                if !self.trace_types.is_empty() {
                    self.trace_type("lost", from, to, &message);
                }
                return;
            }
        }
        at_us += self.latency_us[site_from][site_to];
        if self.scenario.network.jitter_ms > 0 {
            at_us += self.rng.below(self.scenario.network.jitter_ms * 1000);
        }
        self.trace.update(&at_us.to_le_bytes());
        self.trace.update(&(from as u32).to_le_bytes());
        self.trace.update(&(to as u32).to_le_bytes());
        self.trace.update(&encoded);
        let incarnation = self.nodes[to].incarnation;
        if let Message::Push { id, .. } = &message {
            *self.pushes_in_flight.entry(*id).or_insert(0) += 1;
        }
        if site_from != site_to && self.rng.chance(self.scenario.network.duplicate) {
            if let Message::Push { id, .. } = &message {
                *self.pushes_in_flight.entry(*id).or_insert(0) += 1;
            }
            let later = at_us + self.rng.below(50_000);
            self.schedule(
                later,
                Ev::Deliver {
                    to,
                    from,
                    incarnation,
                    message: message.clone(),
                },
            );
        }
        self.schedule(
            at_us,
            Ev::Deliver {
                to,
                from,
                incarnation,
                message,
            },
        );
    }

    fn trace_penalty(&self, node: usize, event: &Event) {
        let (about, what) = match event {
            Event::MessageDropped { from, reason } => {
                (from, format!("dropped a message: {reason}"))
            }
            Event::PeerCutOff { node, .. } => (node, "cut off".to_string()),
            Event::AuditFailed { node, failure, .. } => {
                (node, format!("audit failed: {failure:?}"))
            }
            Event::HolderExcluded { node, .. } => (node, "excluded from placement".to_string()),
            _ => return,
        };
        let about = self.node_index.get(about).copied().unwrap_or(usize::MAX);
        let hostile = self
            .hostile_now(about)
            .map_or(String::new(), |b| format!(" ({})", b.name()));
        println!(
            "{:>10.4} h node {node} about node {about}{hostile}: {what}",
            self.now_us as f64 / HOUR_US as f64
        );
    }

    fn trace_message(&self, from: usize, to: &NodeId, message: &Message) {
        let to = self.node_index.get(to).copied().unwrap_or(usize::MAX);
        let ids: Vec<ChunkId> = match message {
            Message::Offer { ids, .. } | Message::SyncIds { ids, .. } => ids.clone(),
            Message::Need { need, have, .. } => need.iter().chain(have).copied().collect(),
            Message::Push { id, .. }
            | Message::PushAck { id, .. }
            | Message::Fetch { id, .. }
            | Message::FetchReply { id, .. }
            | Message::Audit { id, .. }
            | Message::AuditReply { id, .. } => vec![*id],
            _ => return,
        };
        for id in ids {
            self.trace(&id, || {
                let text = format!("{message:?}");
                let text: String = text.chars().take(100).collect();
                format!("node {from} -> {to}: {text}")
            });
        }
    }

    pub fn live_nodes_of(&self, site: usize) -> Vec<usize> {
        self.sites[site]
            .nodes
            .iter()
            .copied()
            .filter(|n| self.nodes[*n].engine.is_some())
            .collect()
    }
}

pub fn hours_us(hours: f64) -> u64 {
    (hours * HOUR_US as f64) as u64
}

fn engine_config(scenario: &Scenario) -> EngineConfig {
    let mut config = EngineConfig {
        replication_factor: scenario.replication_factor,
        ..EngineConfig::default()
    };
    let e = &scenario.engine;
    if let Some(v) = e.gossip_interval_ms {
        config.gossip_interval_ms = v;
    }
    if let Some(v) = e.suspect_after_ms {
        config.suspect_after_ms = v;
    }
    if let Some(v) = e.dead_after_ms {
        config.dead_after_ms = v;
    }
    if let Some(v) = e.sync_interval_ms {
        config.sync_interval_ms = v;
    }
    if let Some(v) = e.push_mbit {
        config.push_bytes_per_sec = (v * 1e6 / 8.0) as u64;
    }
    if let Some(v) = e.trim_grace_ms {
        config.trim_grace_ms = v;
    }
    if let Some(v) = e.audit_interval_ms {
        config.audit_interval_ms = v;
    }
    if let Some(v) = e.scrub_period_ms {
        config.scrub_period_ms = v;
    }
    if let Some(v) = e.gc_grace_min_ms {
        config.gc_grace_min_ms = v;
    }
    if let Some(v) = e.gc_window_ms {
        config.gc_window_ms = v;
    }
    if let Some(v) = e.gc_window_percent {
        config.gc_window_percent = v;
    }
    config
}

pub fn message_type(message: &Message) -> &'static str {
    match message {
        Message::Gossip { .. } => "gossip",
        Message::Entries { .. } => "entries",
        Message::Records { .. } => "records",
        Message::Want { .. } => "want",
        Message::Offer { .. } => "offer",
        Message::Need { .. } => "need",
        Message::Push { .. } => "push",
        Message::PushAck { .. } => "push-ack",
        Message::SyncDigest { .. } => "sync-digest",
        Message::SyncIds { .. } => "sync-ids",
        Message::Fetch { .. } => "fetch",
        Message::FetchReply { .. } => "fetch-reply",
        Message::Audit { .. } => "audit",
        Message::AuditReply { .. } => "audit-reply",
        Message::GcWant { .. } => "gc-want",
        Message::GcIds { .. } => "gc-ids",
    }
}

/// True when `CAIRN_SIM_TRACE_CHUNK` names a prefix of `id` (as `ChunkId(..)` prints it):
/// that chunk's copies and invariant 12's view of it are traced to stderr. Read once.
pub fn trace_chunk(id: &ChunkId) -> bool {
    static PREFIX: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PREFIX
        .get_or_init(|| std::env::var("CAIRN_SIM_TRACE_CHUNK").ok())
        .as_ref()
        .is_some_and(|p| format!("{id:?}").contains(p.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every engine of the mesh, restarted ones too, checks blobs through the one shared
    /// memo: a chunk's signature is checked once per run, not once per engine (it was
    /// 14% of a simulated day when a merge dropped the sharing).
    #[test]
    fn every_engine_shares_the_mesh_blob_memo() {
        let scenario = Scenario::parse(crate::DEFAULT_SCENARIO).expect("built-in scenario parses");
        let mut world = World::new(scenario, 1);
        let n_nodes = world.nodes.len();
        assert!(n_nodes > 1);
        assert_eq!(std::sync::Arc::strong_count(&world.blob_memo), n_nodes + 1);
        world.stop_node(0);
        world.start_node(0, false);
        assert_eq!(std::sync::Arc::strong_count(&world.blob_memo), n_nodes + 1);
    }
}
