//! `cairn node run`: the mesh daemon. It runs the replication engine from cairn-protocol
//! unchanged and only translates: engine transmits become `/cairn/1` requests over
//! libp2p, storage ops go to the storage thread, and everything that happens (a
//! message, a completed write, a timer, a command from the CLI) is fed back with the
//! time. One task owns the engine and the swarm; the disk and CLI commands run on their
//! own threads and talk to it over channels.
//!
//! Who may talk: a peer is served nothing until it has presented a node certificate
//! that chains to a site this node trusts (the hello). QUIC's handshake proves the peer
//! holds the certificate's key, because the node key is the libp2p identity. The only
//! things an unknown node may ask for are a site's wrapped-keys record (ciphertext
//! under a 256-bit recovery key; what `cairn recover` needs) and the completion of an
//! invite it holds.

mod admit;
mod dial;
mod events;
mod hello;
mod invite;
pub mod lag;
pub mod net;
mod peer_name;
mod publish;
mod recover;
mod requests;
mod status;
pub mod storage;
mod transmit;

use publish::own_node_cert;
pub use publish::{own_records, snapshot_chunks, snapshots_to_publish};
pub use recover::fetch_wrapped_keys;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_protocol::admission::{Admission, AdmissionConfig};
use cairn_protocol::dialer::{Dialer, DialerConfig};
use cairn_protocol::engine::{ChunkRef, Engine, EngineConfig, Event, Message, PeerState};
use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::Record;
use futures::StreamExt;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{request_response, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::records;
use crate::schedule::{Limits, RateLimiter};
use crate::trust;
use crate::units::now_unix_ms;
use crate::vault::Vault;
use net::{Behaviour, BehaviourEvent};
use storage::{Done, Storage};

/// Messages waiting for a peer's connection and hello, per peer.
const OUTBOX_MESSAGES_MAX: usize = 4096;
/// How long a refused peer's connection is kept for its refusal answer to go out.
const REFUSAL_SEND_MAX: Duration = Duration::from_secs(5);
/// How often what partners hold for this site is counted again for `cairn trust list`.
const HELD_BY_INTERVAL: Duration = Duration::from_secs(30);
/// Refusal answers on their way at once; past it, refused peers are cut off unanswered.
const REFUSING_MAX: usize = 1024;
/// How often bootstrap addresses and unfinished invites are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// What the rate limiters let through at once after a pause.
const BURST_BYTES: u64 = 4 << 20;
/// How often the weekly schedule is looked at.
const SCHEDULE_CHECK: Duration = Duration::from_secs(30);
use crate::forget::KEY_ACKED;

/// Why the mesh cannot do something.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("no accepted invite from {0}")]
    NoAcceptedInvite(SiteId),
    #[error("no grant to {0}")]
    NoGrant(SiteId),
    #[error("cannot read the store")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot read the partners")]
    Trust(#[from] trust::TrustError),
    #[error("the node is shutting down")]
    ShuttingDown,
    /// An address given on the command line (`--listen`, `--bootstrap`, `--relay`).
    #[error("{flag}")]
    Address {
        flag: &'static str,
        #[source]
        source: net::AddressError,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: Multiaddr,
        #[source]
        source: libp2p::TransportError<std::io::Error>,
    },
    #[error("cannot start the node's network")]
    Net(#[from] net::NetError),
    #[error("cannot rewrite this site's chunks stored in the mesh's format")]
    Migrate(#[source] crate::store::StoreError),
    #[error("cannot hand this site's records and snapshots to the engine")]
    Publish(#[from] publish::PublishError),
}

/// How `cairn node run` was asked to run.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Addresses to listen on (`host:port` or multiaddrs).
    pub listen: Vec<String>,
    /// Partner or site nodes to dial at start and whenever not connected.
    pub bootstrap: Vec<String>,
    pub mdns: bool,
    /// Relays to take a reservation on (multiaddrs ending in /p2p/ID), for offices
    /// behind NAT; DCUtR then tries to upgrade relayed connections to direct ones.
    pub relays: Vec<String>,
    /// The name in this node's certificate.
    pub name: Option<String>,
    /// Disk this node offers the mesh (0: not stated).
    pub capacity_bytes: u64,
    /// Upload and download limits, with their weekly schedule.
    pub limits: Limits,
    pub engine: EngineConfig,
    /// Retention and garbage collection (node.toml), for the commands run inside.
    pub settings: crate::gc::Settings,
}

/// What other threads ask of the node's loop.
pub enum Command {
    /// Records this site signed (a grant, a node certificate) since the engine last saw
    /// the store: they are merged, persisted and gossiped.
    LocalRecords(Vec<Record>),
    /// A backup finished: its record and every chunk it references.
    NewSnapshot {
        record: Record,
        chunks: Vec<ChunkRef>,
    },
    /// Fetch a chunk from the mesh for a restore. The answer is the blob and who sent
    /// it, or why no holder could.
    Fetch {
        owner: SiteId,
        id: ChunkId,
        exclude: Vec<NodeId>,
        reply: FetchReply,
    },
    /// A picture of the node for `cairn status` and the metrics endpoint.
    Status(oneshot::Sender<MeshStatus>),
    /// A prune made these garbage batches (before the statement naming them arrives as
    /// a local record), or swept these chunks of this site off the store.
    Gc {
        batches: Vec<Vec<ChunkId>>,
        swept: Vec<ChunkId>,
    },
}

/// Called once with a fetched chunk's sealed bytes and sender, or why none came; runs on
/// the node's loop, so it must not block.
pub type FetchReply = Box<dyn FnOnce(Result<(Vec<u8>, NodeId), String>) + Send>;

/// What the node's loop knows of the mesh right now.
#[derive(Clone, Debug, Default)]
pub struct MeshStatus {
    pub node: Option<NodeId>,
    pub listen: Vec<String>,
    pub peers: Vec<PeerStatus>,
    /// Snapshots of this site waiting to reach R sites.
    pub pending_snapshots: usize,
    pub pushes_pending: usize,
    pub held: Vec<ChunkRef>,
    /// Per chunk of this site's snapshots: the sites holding it (this site included):
    /// the placement targets once the chunk is confirmed at R, else those confirmed so
    /// far.
    pub copies: HashMap<ChunkId, Vec<SiteId>>,
    pub site_names: HashMap<SiteId, String>,
    pub messages_refused: u64,
    pub peers_refused: u64,
    pub uptime_ms: u64,
    pub replication_factor: usize,
    /// In force now; None is unlimited.
    pub upload_limit: Option<u64>,
    pub download_limit: Option<u64>,
    /// The sites that may store this site's chunks (itself included), from the grants.
    pub storers: Vec<SiteId>,
    /// The worst the node's loop did since start (`lag.rs`).
    pub lag: lag::Lag,
    pub disk_waits_on_loop: u64,
    /// What each holder site delivered to this node's fetches, as stored.
    pub throughput: std::collections::BTreeMap<SiteId, crate::throughput::SiteThroughput>,
}

#[derive(Clone, Debug)]
pub struct PeerStatus {
    pub node: NodeId,
    pub site: SiteId,
    pub name: String,
    pub state: PeerState,
    pub connected: bool,
    pub last_seen_unix_ms: Option<u64>,
    pub rtt: Option<Duration>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Per peer what the transport knows.
#[derive(Default)]
struct Link {
    node: Option<NodeId>,
    /// The hello went through both ways: engine messages may flow.
    ready: bool,
    connections: usize,
    rtt: Option<Duration>,
    bytes_sent: u64,
    bytes_received: u64,
    last_seen_unix_ms: Option<u64>,
}

/// A handle other threads use to reach the node's loop.
#[derive(Clone)]
pub struct MeshHandle {
    site: SiteId,
    commands: mpsc::UnboundedSender<Command>,
    /// Held while packs are written: backups and the storage thread take turns.
    pub write_lock: Arc<Mutex<()>>,
    pub settings: Arc<crate::gc::Settings>,
}

impl MeshHandle {
    pub fn send(&self, command: Command) -> Result<(), MeshError> {
        self.commands
            .send(command)
            .map_err(|_| MeshError::ShuttingDown)
    }

    /// Blocks for the node's status.
    pub fn status(&self) -> Result<MeshStatus, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Status(tx))?;
        rx.blocking_recv().map_err(|_| MeshError::ShuttingDown)
    }
}

/// Restores inside the node fetch what the store lacks through the engine: this site's
/// chunks, from the holders placement names first.
impl crate::fetch::RemoteChunks for MeshHandle {
    fn request(&self, id: ChunkId, exclude: &[NodeId], done: crate::fetch::FetchDone) {
        let reply: FetchReply = Box::new(move |answer| {
            done(
                answer
                    .map(|(sealed, from)| crate::fetch::Fetched { sealed, from })
                    .map_err(crate::fetch::RemoteError),
            )
        });
        let command = Command::Fetch {
            owner: self.site,
            id,
            exclude: exclude.to_vec(),
            reply,
        };
        if let Err(mpsc::error::SendError(Command::Fetch { reply, .. })) =
            self.commands.send(command)
        {
            reply(Err("the node is shutting down".into()));
        }
    }
}

struct Node {
    vault: Arc<Vault>,
    engine: Engine,
    swarm: Swarm<Behaviour>,
    storage: Storage,
    own_cert: Record,
    links: HashMap<PeerId, Link>,
    peer_of_node: HashMap<NodeId, PeerId>,
    /// Addresses learnt for each peer: certificates, identify, mDNS.
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    outbox: HashMap<NodeId, VecDeque<Message>>,
    /// When to dial which peer: backoff after failures (cairn-protocol's sans-IO
    /// policy; `dial.rs` carries out its dials).
    dialer: Dialer<PeerId>,
    /// Dials made to an address whose peer is not known yet, and why.
    address_dials: HashMap<ConnectionId, AddressDial>,
    hellos: HashMap<request_response::OutboundRequestId, PeerId>,
    accepts: HashMap<request_response::OutboundRequestId, SiteId>,
    fetches: HashMap<ChunkId, Vec<FetchReply>>,
    bootstrap: Vec<Multiaddr>,
    /// The peer last reached at each bootstrap address.
    bootstrap_peers: HashMap<Multiaddr, PeerId>,
    relays: Vec<Multiaddr>,
    /// Who may stay connected: the hello deadline, connection bounds, blocks, invite
    /// completions (cairn-protocol's sans-IO policy; `admit.rs` carries out its actions).
    admission: Admission<ConnectionId, PeerId>,
    /// The peer at the other end of each open connection.
    connection_peers: HashMap<ConnectionId, PeerId>,
    /// Peers refused at hello whose refusal answer is on its way (`refuse_after_answer`).
    refusing: Vec<(PeerId, tokio::time::Instant)>,
    /// When `note_held_by` last ran.
    held_by_noted_at: tokio::time::Instant,
    listen: Vec<Multiaddr>,
    messages_refused: u64,
    peers_refused: u64,
    /// Peers whose hello this node is answering or asking: no second hello meanwhile.
    hello_sent: HashSet<PeerId>,
    started_ms: u64,
    /// The chunks of each snapshot handed to the engine, and those confirmed at R.
    snapshot_chunks: HashMap<[u8; 32], Vec<ChunkId>>,
    acked: HashSet<[u8; 32]>,
    seen_noted_ms: HashMap<SiteId, u64>,
    limits: Limits,
    upload: RateLimiter,
    download: RateLimiter,
    /// Chunk messages waiting for the upload limit: when each may go, to whom.
    uploads: VecDeque<(tokio::time::Instant, PeerId, Vec<u8>)>,
    /// Chunk messages received, waiting for the download limit before the engine sees
    /// them (so their acknowledgements, and the sender's window, wait too).
    downloads: VecDeque<(tokio::time::Instant, NodeId, Message)>,
    lag: lag::Lag,
    /// What each holder site delivered to this node's fetches (`throughput.rs`).
    fetch_meter: crate::throughput::FetchMeter,
}

/// What woke the node's loop: taken out of `select!` so the handler can be timed.
/// One lives on the stack for one turn of the loop; boxing the swarm event would cost an
/// allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Bulk,
    Schedule,
    Swarm(SwarmEvent<BehaviourEvent>),
    Done(Done),
    Command(Command),
    EngineTimeout,
    Retry,
    AdmissionTimeout,
    LagTick(tokio::time::Instant),
}

/// Chunk-carrying messages: what the upload and download limits apply to.
fn is_bulk(message: &Message) -> bool {
    matches!(message, Message::Push { .. } | Message::FetchReply { .. })
}

#[derive(Clone, Debug)]
enum AddressDial {
    Bootstrap(Multiaddr),
    /// Completing an invite this site accepted.
    Accept(SiteId),
}

fn now_ms() -> u64 {
    now_unix_ms()
}

/// An address given after `flag` on the command line, as a multiaddr.
fn parse_address(flag: &'static str, text: &str) -> Result<Multiaddr, MeshError> {
    net::multiaddr(text).map_err(|source| MeshError::Address { flag, source })
}

/// Starts the node's loop on a tokio runtime in the background and returns its handle.
/// The loop runs until the process exits.
pub fn start(
    vault: Arc<Vault>,
    options: NodeOptions,
    runtime: &tokio::runtime::Runtime,
) -> Result<MeshHandle, MeshError> {
    let _enter = runtime.enter();
    let vault_site = vault.dir.site_id();
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let write_lock = Arc::new(Mutex::new(()));
    {
        let _guard = write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let n_rewritten = storage::migrate_own_blobs(&vault).map_err(MeshError::Migrate)?;
        if n_rewritten > 0 {
            info!("{n_rewritten} chunks of this site's, stored as the mesh carries them by an older build, rewritten as the vault's");
        }
    }
    let storage = Storage::start(vault.clone(), write_lock.clone(), done_tx);
    let mut node = Node::new(vault, &options, storage)?;
    for text in &options.listen {
        let addr = parse_address("--listen", text)?;
        node.swarm
            .listen_on(addr.clone())
            .map_err(|source| MeshError::Listen { addr, source })?;
    }
    for relay in node.relays.clone() {
        let circuit = relay
            .clone()
            .with(libp2p::core::multiaddr::Protocol::P2pCircuit);
        if let Err(e) = node.swarm.listen_on(circuit) {
            warn!("cannot reserve a slot on relay {relay}: {e}");
        }
    }
    let settings = Arc::new(options.settings.clone());
    runtime.spawn(node.run(command_rx, done_rx));
    Ok(MeshHandle {
        site: vault_site,
        commands,
        write_lock,
        settings,
    })
}

impl Node {
    fn new(vault: Arc<Vault>, options: &NodeOptions, storage: Storage) -> Result<Node, MeshError> {
        let now = now_ms();
        let seed = u64::from_le_bytes(crate::datadir::random_bytes());
        let mut engine = Engine::new(
            options.engine.clone(),
            vault.dir.node_id(),
            vault.dir.site_id(),
            seed,
            now,
        );
        engine.load_records(records::all(vault.store.index())?);
        for chunk in storage::held_chunks(&vault)? {
            engine.load_chunk(chunk);
        }
        // The batches this node's statements name: the engine serves them to holders.
        for ids in crate::gc::stored_batches(vault.store.index())? {
            engine.handle_gc_batch(ids, now);
        }
        let own_cert = own_node_cert(&vault, options)?;
        let swarm = net::swarm(&vault.dir.node_key, options.mdns)?;
        let parse = |list: &[String], flag: &'static str| -> Result<Vec<Multiaddr>, MeshError> {
            list.iter().map(|text| parse_address(flag, text)).collect()
        };
        let fetch_meter =
            crate::throughput::FetchMeter::new(crate::throughput::load(vault.store.index())?);
        let mut node = Node {
            bootstrap: parse(&options.bootstrap, "--bootstrap")?,
            relays: parse(&options.relays, "--relay")?,
            bootstrap_peers: HashMap::new(),
            vault,
            engine,
            swarm,
            storage,
            own_cert: own_cert.clone(),
            links: HashMap::new(),
            peer_of_node: HashMap::new(),
            addresses: HashMap::new(),
            outbox: HashMap::new(),
            dialer: Dialer::new(DialerConfig::default()),
            address_dials: HashMap::new(),
            hellos: HashMap::new(),
            accepts: HashMap::new(),
            fetches: HashMap::new(),
            admission: Admission::new(AdmissionConfig::default()),
            connection_peers: HashMap::new(),
            refusing: Vec::new(),
            held_by_noted_at: tokio::time::Instant::now(),
            listen: Vec::new(),
            messages_refused: 0,
            peers_refused: 0,
            hello_sent: HashSet::new(),
            started_ms: now,
            snapshot_chunks: HashMap::new(),
            acked: HashSet::new(),
            seen_noted_ms: HashMap::new(),
            upload: RateLimiter::new(
                options.limits.now().upload,
                BURST_BYTES,
                std::time::Instant::now(),
            ),
            download: RateLimiter::new(
                options.limits.now().download,
                BURST_BYTES,
                std::time::Instant::now(),
            ),
            limits: options.limits.clone(),
            uploads: VecDeque::new(),
            downloads: VecDeque::new(),
            lag: lag::Lag::default(),
            fetch_meter,
        };
        // This node's certificate, the wrapped keys (what `cairn recover` fetches from
        // partners) and any record signed while the node was stopped.
        let mut local = vec![own_cert];
        if let Ok(bytes) = std::fs::read(node.vault.dir.wrapped_keys_path()) {
            if let Ok(record) = Record::decode(&bytes) {
                local.push(record);
            }
        }
        local.extend(own_records(&node.vault)?);
        node.local_records(local);
        node.publish_snapshots()?;
        node.remember_acked()?;
        node.drain(now);
        Ok(node)
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut done: mpsc::UnboundedReceiver<Done>,
    ) {
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        let mut schedule = tokio::time::interval(SCHEDULE_CHECK);
        let mut lag_tick = tokio::time::interval(lag::TICK_INTERVAL);
        loop {
            let deadline = self.engine.poll_timeout();
            let sleep_ms = deadline.saturating_sub(now_ms()).min(60_000);
            let admit_at = [self.admission.poll_timeout(), self.dialer.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let admit_ms = admit_at.map_or(0, |at| at.saturating_sub(now_ms()));
            let bulk_at = self
                .uploads
                .front()
                .map(|u| u.0)
                .into_iter()
                .chain(self.downloads.front().map(|d| d.0))
                .min();
            let wake = tokio::select! {
                _ = tokio::time::sleep_until(bulk_at.unwrap_or_else(tokio::time::Instant::now)),
                    if bulk_at.is_some() => Wake::Bulk,
                _ = schedule.tick() => Wake::Schedule,
                event = self.swarm.select_next_some() => Wake::Swarm(event),
                Some(done) = done.recv() => Wake::Done(done),
                Some(command) = commands.recv() => Wake::Command(command),
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => Wake::EngineTimeout,
                _ = retry.tick() => Wake::Retry,
                _ = tokio::time::sleep(Duration::from_millis(admit_ms)), if admit_at.is_some() => {
                    Wake::AdmissionTimeout
                }
                due = lag_tick.tick() => Wake::LagTick(due),
            };
            let busy = lag::Busy::start();
            let what = self.on_wake(wake);
            self.drain(now_ms());
            self.lag.end(busy, what);
        }
    }

    /// Handles what woke the loop; returns its name for `lag`.
    fn on_wake(&mut self, wake: Wake) -> &'static str {
        match wake {
            Wake::Bulk => {
                self.release_bulk();
                "releasing rate-limited chunks"
            }
            Wake::Schedule => {
                let now = std::time::Instant::now();
                let limits = self.limits.now();
                self.upload.set_rate(limits.upload, now);
                self.download.set_rate(limits.download, now);
                "the limits' schedule"
            }
            Wake::Swarm(event) => {
                self.on_swarm(event);
                "a swarm event"
            }
            Wake::Done(done) => {
                let now = now_ms();
                match done {
                    Done::Write { op, ok } => self.engine.handle_write_done(op, ok, now),
                    Done::Read { op, blob } => self.engine.handle_read_done(op, blob, now),
                }
                "a storage completion"
            }
            Wake::Command(command) => {
                self.on_command(command);
                "a command"
            }
            Wake::EngineTimeout => {
                self.engine.handle_timeout(now_ms());
                "the engine's timer"
            }
            Wake::Retry => {
                self.retry();
                "retries and counts"
            }
            Wake::AdmissionTimeout => {
                self.admission.handle_timeout(now_ms());
                self.dialer.handle_timeout(now_ms());
                self.apply_dials();
                "admission's and the dialer's timer"
            }
            Wake::LagTick(due) => {
                self.lag.tick(due);
                "the lag tick"
            }
        }
    }

    /// Takes every output the engine has: the point of the sans-IO split.
    fn drain(&mut self, now: u64) {
        loop {
            let mut any = self.apply_admission();
            while let Some(op) = self.engine.poll_storage() {
                any = true;
                self.storage.submit(op);
            }
            while let Some((to, message)) = self.engine.poll_transmit() {
                any = true;
                self.transmit(to, message);
            }
            while let Some(event) = self.engine.poll_event() {
                any = true;
                self.on_event(event, now);
            }
            if !any {
                break;
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        let now = now_ms();
        match command {
            Command::LocalRecords(records) => self.local_records(records),
            Command::NewSnapshot { record, chunks } => {
                self.snapshot_chunks
                    .insert(record.key, chunks.iter().map(|c| c.id).collect());
                // Gossip would carry the record in a few rounds; it goes to every
                // connected peer now, so it is at other sites well before its chunks
                // are, and an office lost right after the acknowledgement loses nothing.
                self.send_to_peers(&Message::Records {
                    records: vec![record.clone()],
                });
                if let Err(e) = self.engine.handle_new_snapshot(record, &chunks, now) {
                    warn!("the engine refused a new snapshot: {e}");
                }
            }
            Command::Fetch {
                owner,
                id,
                exclude,
                reply,
            } => match self.engine.handle_fetch(owner, id, &exclude, now) {
                Ok(()) => {
                    self.fetch_meter.started(now);
                    self.fetches.entry(id).or_default().push(reply);
                }
                Err(e) => reply(Err(e.to_string())),
            },
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Gc { batches, swept } => {
                for ids in batches {
                    self.engine.handle_gc_batch(ids, now);
                }
                if !swept.is_empty() {
                    self.engine.handle_swept(&swept, now);
                }
            }
        }
    }

    fn on_event(&mut self, event: Event, now: u64) {
        match event {
            Event::SnapshotReplicated { snapshot } => {
                self.acked.insert(snapshot);
                let sites = self.engine.config().replication_factor;
                info!(
                    operation = "replication",
                    snapshot = %hex8(&snapshot),
                    sites,
                    result = "ok",
                    "snapshot {} is at {sites} sites",
                    hex8(&snapshot)
                );
                // For `cairn status` after a restart; lost in a crash, the snapshot is
                // handed to the engine again and confirmed again.
                self.storage.note(storage::Note::Catalog(vec![(
                    [KEY_ACKED, &snapshot].concat(),
                    now.to_le_bytes().to_vec(),
                )]));
                self.publish_copies(snapshot, now);
            }
            Event::Fetched {
                owner,
                id,
                from,
                sealed,
            } => {
                // The engine checked the owner's signature and removed it; restore
                // checks the sealed bytes against the id with the vault key.
                let _ = owner;
                let n_bytes = sealed.len() as u64;
                let answer: Result<(Vec<u8>, NodeId), String> = Ok((sealed, from));
                let replies = self.fetches.remove(&id).unwrap_or_default();
                if !replies.is_empty() {
                    self.note_delivered(now, &from, n_bytes);
                }
                for reply in replies {
                    reply(answer.clone());
                }
            }
            Event::FetchFailed { id, .. } => {
                let replies = self.fetches.remove(&id).unwrap_or_default();
                if !replies.is_empty() {
                    let changed = self.fetch_meter.failed(now, self.fetches.len());
                    self.store_throughput(&changed);
                }
                for reply in replies {
                    reply(Err(format!(
                        "no reachable node holds chunk {}",
                        hex8(&id.0)
                    )));
                }
            }
            Event::PeerDead(node) => info!("{} is declared dead", self.name_node(&node)),
            Event::PeerSuspected(node) => debug!("{} is silent", self.name_node(&node)),
            Event::PeerLive(node) => debug!("{} is live", self.name_node(&node)),
            Event::ChunkLost { id } => warn!("chunk {} here could not be read back", hex8(&id.0)),
            Event::RecordRejected { from, error } => {
                warn!("record from {} refused: {error}", self.name_node(&from));
            }
            Event::MessageRefused { from } => {
                self.messages_refused += 1;
                debug!(
                    "message from {} refused: not a trusted peer",
                    self.name_node(&from)
                );
            }
            Event::ChunkStored { chunk, from } => debug!(
                "chunk {} of {} stored, from {}",
                hex8(&chunk.id.0),
                chunk.owner.fingerprint(),
                self.name_node(&from)
            ),
            Event::PushRefused { to, id } => {
                debug!("{} refused chunk {}", self.name_node(&to), hex8(&id.0));
            }
            Event::MessageDropped { from, reason } => {
                debug!("message from {} dropped: {reason}", self.name_node(&from));
            }
            Event::PeerCutOff { node, until_ms } => info!(
                "{} is cut off for {} s",
                self.name_node(&node),
                until_ms.saturating_sub(now) / 1000
            ),
            Event::AuditFailed { node, id, failure } => warn!(
                "{} failed the audit of chunk {}: {failure:?}",
                self.name_node(&node),
                hex8(&id.0)
            ),
            Event::HolderExcluded { node, until_ms } => info!(
                "{} holds no new chunks for {} s",
                self.name_node(&node),
                until_ms.saturating_sub(now) / 1000
            ),
            // What is left (a trimmed chunk) names no peer.
            event @ Event::Trimmed { .. } => debug!("{event:?}"),
            // Nothing in the node signs garbage statements yet, so no owner's word
            // reaches this engine to act on; when one does, the delete is a StorageOp.
            Event::Collected { owner, id } => {
                info!("deleted {id:?} of site {owner:?} on its owner's word (garbage collection)")
            }
        }
    }
}

impl Node {
    /// Credits the site of `from` with a fetch's bytes; stores figures a closed burst
    /// changed.
    fn note_delivered(&mut self, now: u64, from: &NodeId, n_bytes: u64) {
        let Some(site) = self
            .engine
            .peers()
            .find(|(node, _, _)| node == from)
            .map(|(_, site, _)| site)
        else {
            return;
        };
        let changed = self
            .fetch_meter
            .delivered(now, site, n_bytes, self.fetches.len());
        self.store_throughput(&changed);
    }

    fn store_throughput(&mut self, changed: &[SiteId]) {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = changed
            .iter()
            .filter_map(|site| {
                let figures = self.fetch_meter.sites.get(site)?;
                Some(crate::throughput::entry(site, figures))
            })
            .collect();
        if !entries.is_empty() {
            self.storage.note(storage::Note::Catalog(entries));
        }
    }
}

/// A message's variant, for traces.
fn message_name(message: &Message) -> String {
    let text = format!("{message:?}");
    text.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn hex8(bytes: &[u8]) -> String {
    bytes[..4].iter().map(|b| format!("{b:02x}")).collect()
}
