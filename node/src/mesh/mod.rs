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

pub mod net;
pub mod storage;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_protocol::engine::{ChunkRef, Engine, EngineConfig, Event, Message, PeerState};
use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{NodeCert, Record, RecordKind};
use cairn_protocol::token::InviteToken;
use cairn_protocol::SnapshotRecord;
use futures::StreamExt;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, mdns, ping, request_response, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::records;
use crate::schedule::{Limits, RateLimiter};
use crate::store::IndexBatch;
use crate::trust;
use crate::units::now_unix_ms;
use crate::vault::Vault;
use net::{Behaviour, BehaviourEvent, Frame, Kind, ANSWER_OK, ANSWER_REFUSED};
use storage::{Done, Storage};

/// Messages waiting for a peer's connection and hello, per peer.
const OUTBOX_MESSAGES_MAX: usize = 4096;
/// How long a peer refused at hello is kept from connecting again.
const REFUSED_BLOCK: Duration = Duration::from_secs(60);
/// How often bootstrap addresses and unfinished invites are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// A peer whose dial failed is not dialed again for this long.
const DIAL_BACKOFF_MS: u64 = 5_000;
/// What the rate limiters let through at once after a pause.
const BURST_BYTES: u64 = 4 << 20;
/// How often the weekly schedule is looked at.
const SCHEDULE_CHECK: Duration = Duration::from_secs(30);
/// Catalog key marking a snapshot confirmed at R sites.
const KEY_ACKED: &[u8] = b"acked/";

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
}

impl MeshHandle {
    pub fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| anyhow::anyhow!("the node is shutting down"))
    }

    /// Blocks for the node's status.
    pub fn status(&self) -> Result<MeshStatus> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Status(tx))?;
        rx.blocking_recv()
            .map_err(|_| anyhow::anyhow!("the node is shutting down"))
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
    dial_failed_ms: HashMap<PeerId, u64>,
    /// Dials made to an address whose peer is not known yet, and why.
    address_dials: HashMap<ConnectionId, AddressDial>,
    hellos: HashMap<request_response::OutboundRequestId, PeerId>,
    accepts: HashMap<request_response::OutboundRequestId, SiteId>,
    fetches: HashMap<ChunkId, Vec<FetchReply>>,
    bootstrap: Vec<Multiaddr>,
    /// The peer last reached at each bootstrap address.
    bootstrap_peers: HashMap<Multiaddr, PeerId>,
    relays: Vec<Multiaddr>,
    blocked_until: Vec<(PeerId, tokio::time::Instant)>,
    listen: Vec<Multiaddr>,
    messages_refused: u64,
    peers_refused: u64,
    /// Peers whose hello this node is answering or asking: no second hello meanwhile.
    hello_sent: HashSet<PeerId>,
    /// Peers being dialed.
    dialing: HashSet<PeerId>,
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

/// Starts the node's loop on a tokio runtime in the background and returns its handle.
/// The loop runs until the process exits.
pub fn start(
    vault: Arc<Vault>,
    options: NodeOptions,
    runtime: &tokio::runtime::Runtime,
) -> Result<MeshHandle> {
    let _enter = runtime.enter();
    let vault_site = vault.dir.site_id();
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let write_lock = Arc::new(Mutex::new(()));
    let storage = Storage::start(vault.clone(), write_lock.clone(), done_tx);
    let mut node = Node::new(vault, &options, storage)?;
    for addr in &options.listen {
        let addr = net::multiaddr(addr).with_context(|| format!("--listen {addr}"))?;
        node.swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
    }
    for relay in node.relays.clone() {
        let circuit = relay
            .clone()
            .with(libp2p::core::multiaddr::Protocol::P2pCircuit);
        if let Err(e) = node.swarm.listen_on(circuit) {
            warn!("cannot reserve a slot on relay {relay}: {e}");
        }
    }
    runtime.spawn(node.run(command_rx, done_rx));
    Ok(MeshHandle {
        site: vault_site,
        commands,
        write_lock,
    })
}

impl Node {
    fn new(vault: Arc<Vault>, options: &NodeOptions, storage: Storage) -> Result<Node> {
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
        let own_cert = own_node_cert(&vault, options)?;
        let swarm = net::swarm(&vault.dir.node_key, options.mdns)?;
        let parse = |list: &[String], what: &str| -> Result<Vec<Multiaddr>> {
            list.iter()
                .map(|a| net::multiaddr(a).with_context(|| format!("{what} {a}")))
                .collect()
        };
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
            dial_failed_ms: HashMap::new(),
            address_dials: HashMap::new(),
            hellos: HashMap::new(),
            accepts: HashMap::new(),
            fetches: HashMap::new(),
            blocked_until: Vec::new(),
            listen: Vec::new(),
            messages_refused: 0,
            peers_refused: 0,
            hello_sent: HashSet::new(),
            dialing: HashSet::new(),
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
        loop {
            let deadline = self.engine.poll_timeout();
            let sleep_ms = deadline.saturating_sub(now_ms()).min(60_000);
            let bulk_at = self
                .uploads
                .front()
                .map(|u| u.0)
                .into_iter()
                .chain(self.downloads.front().map(|d| d.0))
                .min();
            tokio::select! {
                _ = tokio::time::sleep_until(bulk_at.unwrap_or_else(tokio::time::Instant::now)),
                    if bulk_at.is_some() => self.release_bulk(),
                _ = schedule.tick() => {
                    let now = std::time::Instant::now();
                    let limits = self.limits.now();
                    self.upload.set_rate(limits.upload, now);
                    self.download.set_rate(limits.download, now);
                }
                event = self.swarm.select_next_some() => self.on_swarm(event),
                Some(done) = done.recv() => {
                    let now = now_ms();
                    match done {
                        Done::Write { op, ok } => self.engine.handle_write_done(op, ok, now),
                        Done::Read { op, blob } => self.engine.handle_read_done(op, blob, now),
                    }
                }
                Some(command) = commands.recv() => self.on_command(command),
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {
                    self.engine.handle_timeout(now_ms());
                }
                _ = retry.tick() => self.retry(),
            }
            self.drain(now_ms());
        }
    }

    /// Takes every output the engine has: the point of the sans-IO split.
    fn drain(&mut self, now: u64) {
        loop {
            let mut any = false;
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

    fn transmit(&mut self, to: NodeId, message: Message) {
        tracing::trace!("to {}: {}", short(&to), message_name(&message));
        if let Some(peer) = self.peer_of_node.get(&to).copied() {
            if self.links.get(&peer).is_some_and(|l| l.ready) {
                self.send_mesh(peer, &message);
                return;
            }
        }
        if !self.dial_node(to) {
            self.unreachable(to, message);
            return;
        }
        let outbox = self.outbox.entry(to).or_default();
        if outbox.len() >= OUTBOX_MESSAGES_MAX {
            // The engine retries what matters; a peer this far behind gets the newest.
            outbox.pop_front();
        }
        outbox.push_back(message);
    }

    /// A message that cannot reach its node. A fetch is answered for it at once with
    /// "not here", as a holder without the chunk would, so a restore moves on to the
    /// next holder instead of waiting out the request timeout.
    fn unreachable(&mut self, to: NodeId, message: Message) {
        if let Message::Fetch { owner, id } = message {
            let reply = Message::FetchReply {
                owner,
                id,
                sealed: None,
            };
            self.engine.handle_message(to, reply, now_ms());
        }
    }

    fn send_mesh(&mut self, peer: PeerId, message: &Message) {
        let bytes = message.encode();
        if is_bulk(message) {
            let wait = self
                .upload
                .take(bytes.len() as u64, std::time::Instant::now());
            if !wait.is_zero() || !self.uploads.is_empty() {
                let at = tokio::time::Instant::now() + wait;
                let at = self.uploads.back().map_or(at, |last| at.max(last.0));
                self.uploads.push_back((at, peer, bytes));
                return;
            }
        }
        self.send_bytes(peer, bytes);
    }

    /// Sends and handles the chunk messages whose time under the limits has come.
    fn release_bulk(&mut self) {
        let now = tokio::time::Instant::now();
        while self.uploads.front().is_some_and(|u| u.0 <= now) {
            let (_, peer, bytes) = self.uploads.pop_front().expect("checked");
            self.send_bytes(peer, bytes);
        }
        while self.downloads.front().is_some_and(|d| d.0 <= now) {
            let (_, node, message) = self.downloads.pop_front().expect("checked");
            self.engine.handle_message(node, message, now_ms());
        }
    }

    fn send_bytes(&mut self, peer: PeerId, bytes: Vec<u8>) {
        if let Some(link) = self.links.get_mut(&peer) {
            link.bytes_sent += bytes.len() as u64;
        }
        self.swarm
            .behaviour_mut()
            .cairn
            .send_request(&peer, Frame::new(Kind::Mesh, bytes));
    }

    /// Dials a node the engine wants to talk to, at the addresses its certificate,
    /// identify or mDNS gave. False when it cannot be reached for now.
    fn dial_node(&mut self, node: NodeId) -> bool {
        let Some(peer) = net::peer_id(&node) else {
            return false;
        };
        self.peer_of_node.insert(node, peer);
        if self.swarm.is_connected(&peer) {
            if !self.links.get(&peer).is_some_and(|l| l.ready) {
                self.send_hello(peer);
            }
            return true;
        }
        let now = now_ms();
        if let Some(at) = self.dial_failed_ms.get(&peer) {
            // A dial under way (marked when it started), or one that failed lately.
            return self.dialing.contains(&peer)
                || now >= at + DIAL_BACKOFF_MS && {
                    self.dial_failed_ms.remove(&peer);
                    self.dial_node(node)
                };
        }
        let mut addresses = self.addresses.get(&peer).cloned().unwrap_or_default();
        if let Some(cert) = self.node_cert(&node) {
            for text in cert.addresses {
                if let Ok(addr) = net::multiaddr(&text) {
                    if !addresses.contains(&addr) {
                        addresses.push(addr);
                    }
                }
            }
        }
        if addresses.is_empty() {
            return false;
        }
        self.dial_failed_ms.insert(peer, now);
        let opts = DialOpts::peer_id(peer).addresses(addresses).build();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dialing.insert(peer);
                true
            }
            Err(e) => {
                debug!("dial {node}: {e}");
                false
            }
        }
    }

    fn node_cert(&self, node: &NodeId) -> Option<NodeCert> {
        self.engine
            .catalog()
            .authors()
            .flat_map(|a| self.engine.catalog().by_author(a))
            .find(|r| r.kind == RecordKind::NodeCert && r.key == node.0)
            .and_then(|r| NodeCert::decode(&r.body).ok())
    }

    fn retry(&mut self) {
        let now = tokio::time::Instant::now();
        let unblock: Vec<PeerId> = self
            .blocked_until
            .iter()
            .filter(|(_, until)| *until <= now)
            .map(|(p, _)| *p)
            .collect();
        self.blocked_until.retain(|(_, until)| *until > now);
        for peer in unblock {
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
        // Bootstrap addresses are dialed whenever nothing is connected through them.
        for addr in self.bootstrap.clone() {
            let up = self
                .bootstrap_peers
                .get(&addr)
                .is_some_and(|p| self.swarm.is_connected(p));
            let dialing = self
                .address_dials
                .values()
                .any(|d| matches!(d, AddressDial::Bootstrap(a) if *a == addr));
            if !up && !dialing {
                self.dial_address(addr.clone(), AddressDial::Bootstrap(addr));
            }
        }
        // Invites this site accepted whose inviter has not signed its grant yet.
        match pending_invites(&self.vault, &self.engine) {
            Ok(pending) => {
                for (site, addresses) in pending {
                    for addr in addresses {
                        self.dial_address(addr, AddressDial::Accept(site));
                    }
                }
            }
            Err(e) => warn!("cannot read accepted invites: {e:#}"),
        }
        // Nodes with queued messages that are not connected.
        let waiting: Vec<NodeId> = self
            .outbox
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(n, _)| *n)
            .collect();
        for node in waiting {
            if !self.dial_node(node) {
                for message in self.outbox.remove(&node).unwrap_or_default() {
                    self.unreachable(node, message);
                }
            }
        }
    }

    fn dial_address(&mut self, addr: Multiaddr, why: AddressDial) {
        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.address_dials.insert(id, why);
            }
            Err(e) => debug!("dial {addr}: {e}"),
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
                let ready: Vec<PeerId> = self
                    .links
                    .iter()
                    .filter(|(_, l)| l.ready)
                    .map(|(p, _)| *p)
                    .collect();
                let message = Message::Records {
                    records: vec![record.clone()],
                };
                for peer in ready {
                    self.send_mesh(peer, &message);
                }
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
                Ok(()) => self.fetches.entry(id).or_default().push(reply),
                Err(e) => reply(Err(e.to_string())),
            },
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn local_records(&mut self, records: Vec<Record>) {
        let now = now_ms();
        for record in records {
            if let Err(e) = self.engine.handle_local_record(record, now) {
                warn!("a record of this site was refused: {e}");
            }
        }
    }

    /// Hands the engine every snapshot of this site not yet confirmed at R sites (again
    /// after a restart: the engine tracks them in memory only).
    fn publish_snapshots(&mut self) -> Result<()> {
        let now = now_ms();
        for (record, chunks) in snapshots_to_publish(&self.vault, true)? {
            self.snapshot_chunks
                .insert(record.key, chunks.iter().map(|c| c.id).collect());
            if let Err(e) = self.engine.handle_new_snapshot(record, &chunks, now) {
                warn!("a snapshot of this site was refused: {e}");
            }
        }
        Ok(())
    }

    /// Snapshots confirmed at R before this start, for `cairn status`.
    fn remember_acked(&mut self) -> Result<()> {
        for snapshot in self.vault.snapshots()? {
            let key = snapshot_key(&snapshot.id.0);
            let index = self.vault.store.index();
            if index.catalog_get(&[KEY_ACKED, &key].concat())?.is_none() {
                continue;
            }
            if let Ok(chunks) = snapshot_chunks(&self.vault, &snapshot) {
                self.snapshot_chunks
                    .insert(key, chunks.iter().map(|c| c.id).collect());
                self.acked.insert(key);
            }
        }
        Ok(())
    }

    fn on_event(&mut self, event: Event, now: u64) {
        match event {
            Event::SnapshotReplicated { snapshot } => {
                self.acked.insert(snapshot);
                info!(
                    "snapshot {} is at {} sites",
                    hex8(&snapshot),
                    self.engine.config().replication_factor
                );
                let _ = self.vault.store.index().commit(IndexBatch {
                    catalog: vec![([KEY_ACKED, &snapshot].concat(), now.to_le_bytes().to_vec())],
                    ..IndexBatch::default()
                });
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
                let answer: Result<(Vec<u8>, NodeId), String> = Ok((sealed, from));
                for reply in self.fetches.remove(&id).unwrap_or_default() {
                    reply(answer.clone());
                }
            }
            Event::FetchFailed { id, .. } => {
                for reply in self.fetches.remove(&id).unwrap_or_default() {
                    reply(Err(format!(
                        "no reachable node holds chunk {}",
                        hex8(&id.0)
                    )));
                }
            }
            Event::PeerDead(node) => info!("node {} is declared dead", short(&node)),
            Event::PeerSuspected(node) => debug!("node {} is silent", short(&node)),
            Event::PeerLive(node) => debug!("node {} is live", short(&node)),
            Event::ChunkLost { id } => warn!("chunk {} here could not be read back", hex8(&id.0)),
            Event::RecordRejected { from, error } => {
                warn!("record from {} refused: {error}", short(&from));
            }
            Event::MessageRefused { from } => {
                self.messages_refused += 1;
                debug!("message from {} refused: not a trusted peer", short(&from));
            }
            other => debug!("{other:?}"),
        }
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!("listening on {address}");
                self.listen.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.dial_failed_ms.remove(&peer_id);
                self.dialing.remove(&peer_id);
                let link = self.links.entry(peer_id).or_default();
                link.connections += 1;
                let addr = endpoint.get_remote_address().clone();
                if endpoint.is_dialer() {
                    let known = self.addresses.entry(peer_id).or_default();
                    if !known.contains(&addr) {
                        known.push(addr);
                    }
                }
                match self.address_dials.remove(&connection_id) {
                    Some(AddressDial::Accept(site)) => self.send_accept(peer_id, site),
                    Some(AddressDial::Bootstrap(addr)) => {
                        self.bootstrap_peers.insert(addr, peer_id);
                        self.send_hello(peer_id);
                    }
                    _ if endpoint.is_dialer() => self.send_hello(peer_id),
                    _ => {}
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    if let Some(link) = self.links.get_mut(&peer_id) {
                        link.ready = false;
                        link.connections = 0;
                    }
                    self.hello_sent.remove(&peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
                ..
            } => {
                self.address_dials.remove(&connection_id);
                if let Some(peer) = peer_id {
                    debug!("cannot reach {peer}: {error}");
                    self.dial_failed_ms.insert(peer, now_ms());
                    self.dialing.remove(&peer);
                    // What waited for it is dropped (the engine retries what matters);
                    // fetches learn at once that this holder cannot answer.
                    let node = self
                        .peer_of_node
                        .iter()
                        .find(|(_, p)| **p == peer)
                        .map(|(n, _)| *n);
                    if let Some(node) = node {
                        for message in self.outbox.remove(&node).unwrap_or_default() {
                            self.unreachable(node, message);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Cairn(event)) => self.on_cairn(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let known = self.addresses.entry(peer_id).or_default();
                for addr in info.listen_addrs {
                    if !known.contains(&addr) {
                        known.push(addr);
                    }
                }
                known.truncate(16);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    let known = self.addresses.entry(peer).or_default();
                    if !known.contains(&addr) {
                        known.push(addr.clone());
                    }
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.links.entry(peer).or_default().rtt = Some(rtt);
            }
            other => debug!("{other:?}"),
        }
    }

    // ---- the hello --------------------------------------------------------------------

    /// This node's certificate and every grant it holds to or from its site: all a
    /// partner needs to check it, and all a recovered node needs to trust its partners
    /// again.
    /// In an answer, `peer_site`'s own records come too: a node recovered on a fresh
    /// machine learns its site's snapshots and grants from its first partner at once.
    fn hello_payload(&self, peer_site: Option<SiteId>) -> Vec<u8> {
        let own = self.vault.dir.site_id();
        let mut records = vec![self.own_cert.clone()];
        for author in self.engine.catalog().authors() {
            for record in self.engine.catalog().by_author(author) {
                if record.kind == RecordKind::TrustGrant && (author == own || record.key == own.0) {
                    records.push(record.clone());
                }
            }
        }
        if let Some(site) = peer_site.filter(|s| *s != own) {
            records.extend(self.engine.catalog().by_author(site).cloned());
        }
        records.truncate(cairn_protocol::engine::message::RECORDS_PER_MESSAGE_MAX);
        Message::Records { records }.encode()
    }

    fn send_hello(&mut self, peer: PeerId) {
        if !self.hello_sent.insert(peer) {
            return;
        }
        let payload = self.hello_payload(None);
        let id = self
            .swarm
            .behaviour_mut()
            .cairn
            .send_request(&peer, Frame::new(Kind::Hello, payload));
        self.hellos.insert(id, peer);
    }

    /// Checks a peer's hello (its own or its answer to ours). Ok: the peer may talk.
    fn check_hello(&mut self, peer: PeerId, payload: &[u8]) -> Result<NodeId, String> {
        let now = now_ms();
        let Ok(Message::Records { mut records }) = Message::decode(payload) else {
            return Err("malformed hello".into());
        };
        if records.is_empty() {
            return Err("a hello without a node certificate".into());
        }
        let cert = records.remove(0);
        let node = NodeId(cert.key);
        if net::peer_id(&node) != Some(peer) {
            return Err("the certificate is for another node key".into());
        }
        let own = self.vault.dir.site_id();
        let (ours, theirs): (Vec<Record>, Vec<Record>) =
            records.into_iter().partition(|r| r.author == own);
        for record in ours {
            // Signed by this site's key: a recovered node relearns its grants this way.
            let _ = self.engine.handle_local_record(record, now);
        }
        self.engine
            .handle_connect(node, cert, now)
            .map_err(|e| e.to_string())?;
        if !theirs.is_empty() {
            self.engine
                .handle_message(node, Message::Records { records: theirs }, now);
        }
        let link = self.links.entry(peer).or_default();
        link.node = Some(node);
        link.ready = true;
        link.last_seen_unix_ms = Some(now);
        self.peer_of_node.insert(node, peer);
        info!("node {} is a peer", short(&node));
        if let Some(queued) = self.outbox.remove(&node) {
            for message in queued {
                self.send_mesh(peer, &message);
            }
        }
        Ok(node)
    }

    /// Keeps `cairn trust list`'s "last seen" current: at most once a minute per site.
    fn note_seen(&mut self, node: NodeId, now: u64) {
        let Some((_, site, _)) = self.engine.peers().find(|(n, _, _)| *n == node) else {
            return;
        };
        let last = self.seen_noted_ms.entry(site).or_insert(0);
        if now >= *last + 60_000 {
            *last = now;
            let _ = self.vault.store.note_seen(&site, now);
        }
    }

    fn refuse(&mut self, peer: PeerId, why: &str) {
        warn!("refused {peer}: {why}");
        self.peers_refused += 1;
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        self.blocked_until
            .push((peer, tokio::time::Instant::now() + REFUSED_BLOCK));
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_cairn(&mut self, event: request_response::Event<Frame, Frame>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                let answer = self.on_request(peer, request);
                let refused = answer.kind == ANSWER_REFUSED;
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .cairn
                    .send_response(channel, answer);
                if refused {
                    // After the answer is queued, so the peer learns why.
                    let swarm_peer = peer;
                    if !self.links.get(&swarm_peer).is_some_and(|l| l.ready) {
                        self.peers_refused += 1;
                    }
                }
            }
            E::Message {
                peer,
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(peer) = self.hellos.remove(&request_id) {
                    if response.kind != ANSWER_OK {
                        warn!(
                            "{peer} refused this node: {}",
                            String::from_utf8_lossy(&response.payload)
                        );
                        let _ = self.swarm.disconnect_peer_id(peer);
                    } else if let Err(why) = self.check_hello(peer, &response.payload) {
                        self.refuse(peer, &why);
                    }
                } else if let Some(site) = self.accepts.remove(&request_id) {
                    self.on_accept_answer(peer, site, response);
                }
            }
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.hellos.remove(&request_id);
                self.accepts.remove(&request_id);
                debug!("request to {peer} failed: {error}");
            }
            other => debug!("{other:?}"),
        }
    }

    fn on_request(&mut self, peer: PeerId, request: Frame) -> Frame {
        let now = now_ms();
        let refused = |why: &str| Frame {
            kind: ANSWER_REFUSED,
            payload: why.as_bytes().to_vec(),
        };
        match Kind::from_u8(request.kind) {
            Some(Kind::Hello) => match self.check_hello(peer, &request.payload) {
                Ok(node) => {
                    let site = self
                        .engine
                        .peers()
                        .find(|(n, _, _)| *n == node)
                        .map(|(_, s, _)| s);
                    Frame {
                        kind: ANSWER_OK,
                        payload: self.hello_payload(site),
                    }
                }
                Err(why) => {
                    self.refuse(peer, &why);
                    refused(&why)
                }
            },
            Some(Kind::Mesh) => {
                let Some(node) = self
                    .links
                    .get(&peer)
                    .filter(|l| l.ready)
                    .and_then(|l| l.node)
                else {
                    self.messages_refused += 1;
                    return refused("say hello first");
                };
                let link = self.links.get_mut(&peer).expect("checked above");
                link.bytes_received += request.payload.len() as u64;
                link.last_seen_unix_ms = Some(now);
                self.note_seen(node, now);
                match Message::decode(&request.payload) {
                    Ok(message) => {
                        tracing::trace!("from {}: {}", short(&node), message_name(&message));
                        let wait = if is_bulk(&message) {
                            self.download
                                .take(request.payload.len() as u64, std::time::Instant::now())
                        } else {
                            Duration::ZERO
                        };
                        if wait.is_zero() && self.downloads.is_empty() || !is_bulk(&message) {
                            self.engine.handle_message(node, message, now);
                        } else {
                            let at = tokio::time::Instant::now() + wait;
                            let at = self.downloads.back().map_or(at, |last| at.max(last.0));
                            self.downloads.push_back((at, node, message));
                        }
                        Frame {
                            kind: ANSWER_OK,
                            payload: Vec::new(),
                        }
                    }
                    Err(e) => {
                        // The engine counts it against the peer and cuts off a peer
                        // that keeps sending them.
                        self.messages_refused += 1;
                        debug!("malformed message from {}: {e}", short(&node));
                        self.engine
                            .handle_message_bytes(node, &request.payload, now);
                        refused("malformed message")
                    }
                }
            }
            Some(Kind::WrappedKeys) => {
                let Ok(site) = <[u8; 32]>::try_from(&request.payload[..]) else {
                    return refused("a site id is 32 bytes");
                };
                let site = SiteId(site);
                match self
                    .engine
                    .catalog()
                    .by_author(site)
                    .find(|r| r.kind == RecordKind::WrappedKeys)
                {
                    Some(record) => Frame {
                        kind: ANSWER_OK,
                        payload: record.encode(),
                    },
                    None => refused("this node holds no wrapped keys for that site"),
                }
            }
            Some(Kind::Accept) => match self.on_accept(&request.payload) {
                Ok(payload) => Frame {
                    kind: ANSWER_OK,
                    payload,
                },
                Err(why) => {
                    warn!("an invite completion was refused: {why}");
                    refused(&why)
                }
            },
            None => refused("unknown request kind"),
        }
    }

    // ---- invites ----------------------------------------------------------------------

    fn send_accept(&mut self, peer: PeerId, inviter: SiteId) {
        let payload = match accept_payload(&self.vault, &self.own_cert, &inviter) {
            Ok(payload) => payload,
            Err(e) => {
                warn!("cannot complete the invite of {inviter}: {e:#}");
                return;
            }
        };
        let id = self
            .swarm
            .behaviour_mut()
            .cairn
            .send_request(&peer, Frame::new(Kind::Accept, payload));
        self.accepts.insert(id, inviter);
    }

    /// The inviter's side: checks the invite is one this site sent and still open,
    /// signs this site's grant to the acceptor, and answers with it.
    fn on_accept(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let now = now_ms();
        let request: AcceptRequest =
            serde_json::from_slice(payload).map_err(|_| "malformed invite completion")?;
        let token = InviteToken::from_text(&request.invite, now).map_err(|e| e.to_string())?;
        let grant = Record::decode(&request.grant).map_err(|e| e.to_string())?;
        let ours = trust::complete_invite(&self.vault, &token, &grant, &request.site_name)
            .map_err(|e| e.to_string())?;
        self.local_records(vec![ours.clone(), grant]);
        if let Ok(cert) = Record::decode(&request.cert) {
            let _ = self.engine.handle_local_record(cert, now);
        }
        info!(
            "{} accepted this site's invite: it is now a partner",
            request.site_name
        );
        Ok(Message::Records {
            records: vec![ours, self.own_cert.clone()],
        }
        .encode())
    }

    fn on_accept_answer(&mut self, peer: PeerId, inviter: SiteId, answer: Frame) {
        if answer.kind != ANSWER_OK {
            warn!(
                "the inviter {inviter} refused to complete its invite: {}",
                String::from_utf8_lossy(&answer.payload)
            );
            return;
        }
        let Ok(Message::Records { records }) = Message::decode(&answer.payload) else {
            warn!("a malformed invite completion from {inviter}");
            return;
        };
        let now = now_ms();
        for record in records {
            if record.author == inviter {
                if let Err(e) = self.engine.handle_local_record(record, now) {
                    warn!("the inviter's record was refused: {e}");
                }
            }
        }
        info!("the invite of {inviter} is complete: it is now a partner");
        self.send_hello(peer);
    }

    // ---- status -----------------------------------------------------------------------

    fn status(&self) -> MeshStatus {
        let own = self.vault.dir.site_id();
        let mut site_names = HashMap::new();
        site_names.insert(own, self.vault.dir.site_name.clone());
        if let Ok(partners) = trust::partners(&self.vault) {
            for p in partners {
                if let Ok(site) = p.site_id.parse::<SiteId>() {
                    site_names.insert(site, p.name);
                }
            }
        }
        let peers = self
            .engine
            .peers()
            .map(|(node, site, state)| {
                let link = self.peer_of_node.get(&node).and_then(|p| self.links.get(p));
                PeerStatus {
                    node,
                    site,
                    name: self
                        .node_cert(&node)
                        .map(|c| c.name)
                        .unwrap_or_else(|| short(&node)),
                    state,
                    connected: link.is_some_and(|l| l.ready && l.connections > 0),
                    last_seen_unix_ms: link.and_then(|l| l.last_seen_unix_ms),
                    rtt: link.and_then(|l| l.rtt),
                    bytes_sent: link.map_or(0, |l| l.bytes_sent),
                    bytes_received: link.map_or(0, |l| l.bytes_received),
                }
            })
            .collect();
        let held: Vec<ChunkRef> = self.engine.held().collect();
        let mut copies = HashMap::new();
        for (snapshot, chunks) in &self.snapshot_chunks {
            for id in chunks {
                let sites = match self.engine.chunk_below_r(snapshot, id) {
                    Some(sites) => sites,
                    None if self.engine.snapshot_pending(snapshot) => {
                        self.engine.target_sites(&own, id)
                    }
                    None if self.acked.contains(snapshot) => self.engine.target_sites(&own, id),
                    None => vec![own],
                };
                copies.insert(*id, sites);
            }
        }
        MeshStatus {
            node: Some(self.vault.dir.node_id()),
            listen: self.listen.iter().map(|a| a.to_string()).collect(),
            peers,
            pending_snapshots: self.engine.pending_snapshots(),
            pushes_pending: self.engine.pushes_pending(),
            held,
            copies,
            site_names,
            messages_refused: self.messages_refused,
            peers_refused: self.peers_refused,
            uptime_ms: now_ms().saturating_sub(self.started_ms),
            replication_factor: self.engine.config().replication_factor,
            upload_limit: self.upload.limit().bytes_per_sec(),
            download_limit: self.download.limit().bytes_per_sec(),
        }
    }
}

/// What an acceptor sends its inviter to complete an invite.
#[derive(serde::Serialize, serde::Deserialize)]
struct AcceptRequest {
    invite: String,
    site_name: String,
    /// The acceptor's grant to the inviter, encoded.
    grant: Vec<u8>,
    /// The acceptor node's certificate, encoded.
    cert: Vec<u8>,
}

fn accept_payload(vault: &Vault, cert: &Record, inviter: &SiteId) -> Result<Vec<u8>> {
    let invite = trust::accepted_invite(vault, inviter)?
        .ok_or_else(|| anyhow::anyhow!("no accepted invite from {inviter}"))?;
    let grant = records::get(
        vault.store.index(),
        &vault.dir.site_id(),
        RecordKind::TrustGrant,
        &inviter.0,
    )?
    .ok_or_else(|| anyhow::anyhow!("no grant to {inviter}"))?;
    Ok(serde_json::to_vec(&AcceptRequest {
        invite,
        site_name: vault.dir.site_name.clone(),
        grant: grant.encode(),
        cert: cert.encode(),
    })?)
}

/// Partners whose invite this site accepted but whose grant back has not arrived, with
/// the addresses their invite gave.
fn pending_invites(vault: &Vault, engine: &Engine) -> Result<Vec<(SiteId, Vec<Multiaddr>)>> {
    let own = vault.dir.site_id();
    let mut out = Vec::new();
    for partner in trust::partners(vault)? {
        let Ok(site) = partner.site_id.parse::<SiteId>() else {
            continue;
        };
        if partner.revoked || partner.addresses.is_empty() {
            continue;
        }
        let key = cairn_protocol::catalog::RecordKey {
            author: site,
            kind: RecordKind::TrustGrant,
            key: own.0,
        };
        if engine.catalog().get(&key).is_some() {
            continue;
        }
        if trust::accepted_invite(vault, &site)?.is_none() {
            continue; // a partner this site invited: it completes the invite, not us
        }
        let addresses = partner
            .addresses
            .iter()
            .filter_map(|a| net::multiaddr(a).ok())
            .collect();
        out.push((site, addresses));
    }
    Ok(out)
}

/// This node's certificate, signed anew when its name, addresses or capacity changed.
fn own_node_cert(vault: &Vault, options: &NodeOptions) -> Result<Record> {
    let node = vault.dir.node_id();
    let site = vault.dir.site_id();
    let existing = records::get(vault.store.index(), &site, RecordKind::NodeCert, &node.0)?
        .and_then(|r| NodeCert::decode(&r.body).ok().map(|c| (r, c)));
    let name = options
        .name
        .clone()
        .or_else(|| existing.as_ref().map(|(_, c)| c.name.clone()))
        .unwrap_or_else(|| format!("node {}", &node.to_string()[..7]));
    let mut addresses: Vec<String> = options
        .listen
        .iter()
        .filter(|a| !a.ends_with(":0") && !a.starts_with("0.0.0.0") && !a.starts_with("[::]"))
        .cloned()
        .collect();
    if addresses.is_empty() {
        if let Some((_, cert)) = &existing {
            addresses = cert.addresses.clone();
        }
    }
    let capacity_bytes = if options.capacity_bytes > 0 {
        options.capacity_bytes
    } else {
        existing.as_ref().map_or(0, |(_, c)| c.capacity_bytes)
    };
    let cert = NodeCert {
        node,
        site,
        name,
        addresses,
        capacity_bytes,
    };
    if let Some((record, old)) = existing {
        if old == cert {
            return Ok(record);
        }
    }
    let record = records::sign_next(vault, RecordKind::NodeCert, node.0, cert.encode())?;
    vault.store.index().commit(IndexBatch {
        catalog: vec![records::entry(&record)],
        ..IndexBatch::default()
    })?;
    Ok(record)
}

/// Every record this site signed, as stored.
pub fn own_records(vault: &Vault) -> Result<Vec<Record>> {
    let site = vault.dir.site_id();
    Ok(records::all(vault.store.index())?
        .into_iter()
        .filter(|r| r.author == site)
        .collect())
}

/// Snapshots of this site for the engine, with their chunks: those without a catalog
/// record yet (made by a backup: the record is signed and stored now), and with
/// `unacked` also those not yet confirmed at R sites.
pub fn snapshots_to_publish(vault: &Vault, unacked: bool) -> Result<Vec<(Record, Vec<ChunkRef>)>> {
    let site = vault.dir.site_id();
    let index = vault.store.index();
    let snapshots = vault.snapshots()?;
    let mut out = Vec::new();
    for (id, body) in index.snapshots()? {
        let key = snapshot_key(&id.0);
        let record = match records::get(index, &site, RecordKind::Snapshot, &key)? {
            Some(_) if !unacked => continue,
            Some(record) => {
                if index.catalog_get(&[KEY_ACKED, &key].concat())?.is_some() {
                    continue;
                }
                record
            }
            None => {
                let record = records::sign_next(vault, RecordKind::Snapshot, key, body)?;
                index.commit(IndexBatch {
                    catalog: vec![records::entry(&record)],
                    ..IndexBatch::default()
                })?;
                record
            }
        };
        let Some(snapshot) = snapshots.iter().find(|s| s.id == id) else {
            continue;
        };
        match snapshot_chunks(vault, snapshot) {
            Ok(chunks) => out.push((record, chunks)),
            // A recovered node knows the snapshot but holds none of its chunks yet.
            Err(e) => debug!("snapshot {} is not published from here: {e:#}", id.short()),
        }
    }
    Ok(out)
}

/// The catalog key of a snapshot record: its id, zero-padded.
pub fn snapshot_key(id: &[u8; 16]) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(id);
    key
}

/// Every chunk a snapshot references, its manifest's included, as the engine knows
/// chunks.
pub fn snapshot_chunks(vault: &Vault, snapshot: &SnapshotRecord) -> Result<Vec<ChunkRef>> {
    let site = vault.dir.site_id();
    let mut ids: Vec<ChunkId> = Vec::new();
    let mut reader = vault.store.reader();
    let mut opener = cairn_protocol::seal::Opener::new();
    let mut walk = cairn_protocol::manifest::ManifestWalk::new(snapshot.manifest_root());
    let mut load = |id: &ChunkId| {
        ids.push(*id);
        vault.load_chunk(&mut reader, &mut opener, id)
    };
    let mut data = Vec::new();
    while let Some((_, extent)) = walk
        .next(&mut load)
        .map_err(|e| anyhow::anyhow!("snapshot {}: {e}", snapshot.id.short()))?
    {
        if let cairn_protocol::Extent::Data { id, .. } = extent {
            data.push(id);
        }
    }
    ids.extend(data);
    ids.sort();
    ids.dedup();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let location = vault
            .store
            .index()
            .chunk(&id)?
            .ok_or_else(|| anyhow::anyhow!("chunk {} is missing", hex8(&id.0)))?;
        out.push(ChunkRef {
            owner: site,
            id,
            size_bytes: u64::from(location.len_bytes) + storage::BLOB_EXTRA_BYTES,
        });
    }
    Ok(out)
}

/// How long `cairn recover --bootstrap` waits for the nodes it was given.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks partner nodes for a site's wrapped-keys record, for `cairn recover` on a fresh
/// machine. Uses a throwaway identity: the machine has no node certificate yet, and the
/// record is all a node serves to a stranger.
pub fn fetch_wrapped_keys(site: &SiteId, addresses: &[String]) -> Result<Vec<u8>> {
    let addresses: Vec<Multiaddr> = addresses
        .iter()
        .map(|a| net::multiaddr(a).with_context(|| format!("--bootstrap {a}")))
        .collect::<Result<_>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let key = ed25519_dalek::SigningKey::from_bytes(&crate::datadir::random_bytes());
        let mut swarm = net::swarm(&key, false)?;
        for addr in &addresses {
            let _ = swarm.dial(addr.clone());
        }
        let mut refusals = Vec::new();
        let mut failures = 0;
        let deadline = tokio::time::sleep(RECOVER_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            let event = tokio::select! {
                event = swarm.select_next_some() => event,
                _ = &mut deadline => break,
            };
            match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    swarm
                        .behaviour_mut()
                        .cairn
                        .send_request(&peer_id, Frame::new(Kind::WrappedKeys, site.0.to_vec()));
                }
                SwarmEvent::Behaviour(BehaviourEvent::Cairn(
                    request_response::Event::Message {
                        peer,
                        message: request_response::Message::Response { response, .. },
                        ..
                    },
                )) => {
                    if response.kind == ANSWER_OK {
                        return Ok(response.payload);
                    }
                    refusals.push(format!(
                        "{peer}: {}",
                        String::from_utf8_lossy(&response.payload)
                    ));
                }
                SwarmEvent::OutgoingConnectionError { .. }
                | SwarmEvent::Behaviour(BehaviourEvent::Cairn(
                    request_response::Event::OutboundFailure { .. },
                )) => failures += 1,
                _ => {}
            }
            if refusals.len() + failures >= addresses.len() {
                break;
            }
        }
        if refusals.is_empty() {
            anyhow::bail!(
                "no node answered at {} within {}s",
                addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                RECOVER_TIMEOUT.as_secs()
            );
        }
        anyhow::bail!(
            "no node there holds this site's wrapped keys ({})",
            refusals.join("; ")
        )
    })
}

/// A message's variant, for traces.
fn message_name(message: &Message) -> String {
    let text = format!("{message:?}");
    text.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn short(node: &NodeId) -> String {
    node.to_string()[..8].to_string()
}

fn hex8(bytes: &[u8]) -> String {
    bytes[..4].iter().map(|b| format!("{b:02x}")).collect()
}
