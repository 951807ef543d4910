//! Engine tests: a few engines on an instant in-memory network, one node per site unless
//! a test lays out more, with disks the tests can damage and peers the tests can make
//! hostile.

use std::collections::{BTreeMap, VecDeque};

use ed25519_dalek::SigningKey;

use super::message::{Message, MESSAGE_BYTES_MAX, PARTITIONS};
use super::*;
use crate::blob::{sign_blob, verify_blob};
use crate::record::{NodeCert, RecordKind, TrustGrant};

struct TestSite {
    key: SigningKey,
    id: SiteId,
}

struct TestNode {
    engine: Engine,
    /// Blobs by id, as the node stores them.
    disk: BTreeMap<ChunkId, Vec<u8>>,
    events: Vec<Event>,
}

/// What a hostile node does to the audit answers it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hostile {
    WrongProofs,
    /// Drops its audit answers, answers everything else.
    Silent,
    /// Answers nothing, as behind a one-way partition, but still sends its own gossip.
    Mute,
    /// Every other audit answer to each auditor is lost on the way, as over a lossy link.
    LosesEveryOtherAuditReply,
    /// Serves garbage batches with one id altered.
    WrongGcBatch,
    /// Sends nothing at all: a site burnt down or unreachable.
    Gone,
}

struct Net {
    sites: Vec<TestSite>,
    /// The site of each node, by index.
    site_of: Vec<usize>,
    nodes: Vec<TestNode>,
    records: Vec<Record>,
    now_ms: u64,
    queue: VecDeque<(usize, usize, Message)>,
    hostile: BTreeMap<usize, Hostile>,
    /// Every push delivered: (from, to, id, whether its blob verified).
    pushes: Vec<(usize, usize, ChunkId, bool)>,
    /// Audit answers sent by each node to each, for `Hostile::LosesEveryOtherAuditReply`.
    audit_replies_sent: BTreeMap<(usize, usize), u64>,
}

const QUOTA_BYTES: u64 = 1 << 40;

fn test_config() -> EngineConfig {
    EngineConfig {
        replication_factor: 2,
        audit_interval_ms: 1_000,
        request_timeout_ms: 5_000,
        // Scrub only where a test asks for it, so audits see the damage first.
        scrub_period_ms: u64::MAX / 4,
        ..EngineConfig::default()
    }
}

fn site_key(i: usize) -> SigningKey {
    SigningKey::from_bytes(&[i as u8 + 1; 32])
}

fn node_id(i: usize) -> NodeId {
    NodeId([0x80 + i as u8; 32])
}

fn grant(author: &SigningKey, grantee: SiteId, version: u64, revoked: bool) -> Record {
    let body = TrustGrant {
        grantee,
        quota_bytes: if revoked { 0 } else { QUOTA_BYTES },
        revoked,
    }
    .encode();
    Record::sign(author, RecordKind::TrustGrant, grantee.0, version, body)
}

fn node_cert(key: &SigningKey, node: NodeId) -> Record {
    let cert = NodeCert {
        node,
        site: SiteId(key.verifying_key().to_bytes()),
        name: "test node".into(),
        addresses: Vec::new(),
        capacity_bytes: 1 << 40,
    };
    Record::sign(key, RecordKind::NodeCert, node.0, 1, cert.encode())
}

impl Net {
    /// `n_sites` sites of one node each, every pair granting the other storage.
    fn new(n_sites: usize, config: EngineConfig) -> Net {
        Net::with_configs(n_sites, |_| config.clone())
    }

    fn with_configs(n_sites: usize, config: impl Fn(usize) -> EngineConfig) -> Net {
        let site_of: Vec<usize> = (0..n_sites).collect();
        Net::with_layout(&site_of, config)
    }

    /// Node `i` belongs to site `site_of[i]`; every pair of sites grants the other storage.
    fn with_layout(site_of: &[usize], config: impl Fn(usize) -> EngineConfig) -> Net {
        Net::with_grants(site_of, |_, _| true, config)
    }

    /// One node per site; only the listed pairs grant each other storage.
    fn with_partners(n_sites: usize, pairs: &[(usize, usize)]) -> Net {
        let site_of: Vec<usize> = (0..n_sites).collect();
        let partners = |a: usize, b: usize| pairs.contains(&(a, b)) || pairs.contains(&(b, a));
        Net::with_grants(&site_of, partners, |_| test_config())
    }

    /// Like `with_layout`, where site `a` grants site `b` storage when `grants(a, b)`.
    fn with_grants(
        site_of: &[usize],
        grants: impl Fn(usize, usize) -> bool,
        config: impl Fn(usize) -> EngineConfig,
    ) -> Net {
        let n_sites = site_of.iter().max().map_or(0, |m| m + 1);
        let sites: Vec<TestSite> = (0..n_sites)
            .map(|i| {
                let key = site_key(i);
                let id = SiteId(key.verifying_key().to_bytes());
                TestSite { key, id }
            })
            .collect();
        let mut records = Vec::new();
        for (s, a) in sites.iter().enumerate() {
            for (i, _) in site_of.iter().enumerate().filter(|(_, site)| **site == s) {
                records.push(node_cert(&a.key, node_id(i)));
            }
            for (t, b) in sites.iter().enumerate() {
                if a.id != b.id && grants(s, t) {
                    records.push(grant(&a.key, b.id, 1, false));
                }
            }
        }
        let nodes = site_of
            .iter()
            .enumerate()
            .map(|(i, site)| {
                let mut engine = Engine::new(config(i), node_id(i), sites[*site].id, i as u64, 0);
                engine.load_records(records.iter().cloned());
                TestNode {
                    engine,
                    disk: BTreeMap::new(),
                    events: Vec::new(),
                }
            })
            .collect();
        let mut net = Net {
            sites,
            site_of: site_of.to_vec(),
            nodes,
            records,
            now_ms: 0,
            queue: VecDeque::new(),
            hostile: BTreeMap::new(),
            pushes: Vec::new(),
            audit_replies_sent: BTreeMap::new(),
        };
        for i in 0..site_of.len() {
            net.pump(i);
        }
        net
    }

    /// Carries out what node `i` asked for; the disk answers at once.
    fn pump(&mut self, i: usize) {
        loop {
            let node = &mut self.nodes[i];
            let mut writes = Vec::new();
            let mut reads = Vec::new();
            while let Some(op) = node.engine.poll_storage() {
                match op {
                    StorageOp::Write { op, id, sealed, .. } => {
                        node.disk.insert(id, sealed);
                        writes.push(op);
                    }
                    StorageOp::Read { op, id } => reads.push((op, node.disk.get(&id).cloned())),
                    StorageOp::Delete { id, .. } => {
                        node.disk.remove(&id);
                    }
                    StorageOp::SaveRecord(_) | StorageOp::DropRecord(_) => {}
                }
            }
            while let Some(event) = node.engine.poll_event() {
                node.events.push(event);
            }
            while let Some((to, message)) = node.engine.poll_transmit() {
                let message = match (self.hostile.get(&i), message) {
                    (Some(Hostile::Gone), _) => continue,
                    (
                        Some(Hostile::WrongGcBatch),
                        Message::GcIds {
                            owner,
                            batch,
                            from_index,
                            mut ids,
                            last,
                        },
                    ) => {
                        if let Some(first) = ids.first_mut() {
                            first.0[31] ^= 1;
                        }
                        Message::GcIds {
                            owner,
                            batch,
                            from_index,
                            ids,
                            last,
                        }
                    }
                    (Some(Hostile::Silent), Message::AuditReply { .. }) => continue,
                    (Some(Hostile::Mute), message) if message.is_answer() => continue,
                    (
                        Some(Hostile::LosesEveryOtherAuditReply),
                        message @ Message::AuditReply { .. },
                    ) => {
                        let sent = self
                            .audit_replies_sent
                            .entry((i, to.0[0].into()))
                            .or_insert(0);
                        *sent += 1;
                        if *sent % 2 == 1 {
                            continue;
                        }
                        message
                    }
                    (
                        Some(Hostile::WrongProofs),
                        Message::AuditReply {
                            owner,
                            id,
                            nonce,
                            proof: Some(mut proof),
                        },
                    ) => {
                        proof[0] ^= 1;
                        Message::AuditReply {
                            owner,
                            id,
                            nonce,
                            proof: Some(proof),
                        }
                    }
                    (_, message) => message,
                };
                let to = usize::from(to.0[0] - 0x80);
                self.queue.push_back((i, to, message));
            }
            if writes.is_empty() && reads.is_empty() {
                return;
            }
            let now_ms = self.now_ms;
            let engine = &mut self.nodes[i].engine;
            for op in writes {
                engine.handle_write_done(op, true, now_ms);
            }
            for (op, blob) in reads {
                engine.handle_read_done(op, blob, now_ms);
            }
        }
    }

    fn deliver_all(&mut self) {
        let mut n = 0;
        while let Some((from, to, message)) = self.queue.pop_front() {
            n += 1;
            assert!(n < 1_000_000, "the test network never quiets down");
            if let Message::Push {
                owner, id, sealed, ..
            } = &message
            {
                let good = verify_blob(owner, id, sealed).is_some();
                self.pushes.push((from, to, *id, good));
            }
            let now_ms = self.now_ms;
            self.nodes[to]
                .engine
                .handle_message(node_id(from), message, now_ms);
            self.pump(to);
        }
    }

    /// Runs every timer due up to `until_ms`, delivering messages at once.
    fn run_until(&mut self, until_ms: u64) {
        loop {
            self.deliver_all();
            let next = self
                .nodes
                .iter()
                .map(|n| n.engine.poll_timeout())
                .min()
                .expect("nodes");
            if next > until_ms {
                break;
            }
            self.now_ms = self.now_ms.max(next);
            for i in 0..self.nodes.len() {
                if self.nodes[i].engine.poll_timeout() <= self.now_ms {
                    let now_ms = self.now_ms;
                    self.nodes[i].engine.handle_timeout(now_ms);
                    self.pump(i);
                }
            }
        }
        self.now_ms = until_ms;
    }

    fn run_for(&mut self, ms: u64) {
        let until_ms = self.now_ms + ms;
        self.run_until(until_ms);
    }

    /// A backup on node `i`: `n` chunks written to its disk as blobs signed by its site,
    /// then handed to its engine as a snapshot.
    fn backup(&mut self, i: usize, n: usize, seed: u8) -> Vec<ChunkRef> {
        let key = self.sites[self.site_of[i]].key.clone();
        let owner = self.sites[self.site_of[i]].id;
        let mut chunks = Vec::new();
        for c in 0..n {
            let mut id = [0u8; 32];
            id[0] = (c * 256 / n.max(1)) as u8;
            id[1] = seed;
            id[2] = i as u8;
            id[3] = c as u8;
            let id = ChunkId(*blake3::hash(&id).as_bytes());
            let sealed = format!("sealed bytes of chunk {c} of site {i}, seed {seed}").into_bytes();
            let blob = sign_blob(&key, &id, &sealed);
            chunks.push(ChunkRef {
                owner,
                id,
                size_bytes: blob.len() as u64,
            });
            self.nodes[i].disk.insert(id, blob);
        }
        let record = Record::sign(&key, RecordKind::Snapshot, [seed; 32], 1, vec![seed; 48]);
        let now_ms = self.now_ms;
        self.nodes[i]
            .engine
            .handle_new_snapshot(record, &chunks, now_ms)
            .expect("the site's own snapshot record is valid");
        self.pump(i);
        chunks
    }

    /// Site `by` revokes site `of`: every node of `by` signs it in; returns the record
    /// for the test to pass on.
    fn revoke(&mut self, by: usize, of: usize) -> Record {
        let revoke = grant(&self.sites[by].key, self.sites[of].id, 2, true);
        let now_ms = self.now_ms;
        for i in 0..self.nodes.len() {
            if self.site_of[i] == by {
                self.nodes[i]
                    .engine
                    .handle_local_record(revoke.clone(), now_ms)
                    .expect("valid");
                self.pump(i);
            }
        }
        revoke
    }

    /// Node `from` pushes its copy of `chunk` to node `to`, which must store it.
    fn push_copy(&mut self, from: usize, to: usize, chunk: &ChunkRef) {
        let blob = self.nodes[from].disk[&chunk.id].clone();
        self.send(
            from,
            to,
            Message::Push {
                owner: chunk.owner,
                id: chunk.id,
                size_bytes: chunk.size_bytes,
                sealed: blob,
            },
        );
        assert!(
            self.holders(&chunk.id).contains(&to),
            "node {to} took the copy"
        );
    }

    fn holders(&self, id: &ChunkId) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].disk.contains_key(id))
            .collect()
    }

    fn events(&self, i: usize) -> &[Event] {
        &self.nodes[i].events
    }

    fn counters(&self, i: usize) -> EngineCounters {
        self.nodes[i].engine.counters()
    }

    /// Node `to` gets raw bytes from node `from`, as off the wire.
    fn send_bytes(&mut self, from: usize, to: usize, bytes: &[u8]) {
        let now_ms = self.now_ms;
        self.nodes[to]
            .engine
            .handle_message_bytes(node_id(from), bytes, now_ms);
        self.pump(to);
    }

    /// Node `to` gets a message from node `from`; returns what `to` sent back at once.
    fn send(&mut self, from: usize, to: usize, message: Message) -> Vec<Message> {
        let now_ms = self.now_ms;
        self.nodes[to]
            .engine
            .handle_message(node_id(from), message, now_ms);
        self.pump(to);
        let mut answers = Vec::new();
        self.queue.retain(|(sender, receiver, message)| {
            if *sender == to && *receiver == from {
                answers.push(message.clone());
                false
            } else {
                true
            }
        });
        answers
    }
}

mod gc;

fn count(events: &[Event], matches: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| matches(e)).count()
}

fn dropped(events: &[Event]) -> usize {
    count(events, |e| matches!(e, Event::MessageDropped { .. }))
}

// ---- chunks are blobs -----------------------------------------------------------

#[test]
fn replication_pushes_only_good_blobs_and_honest_audits_pass() {
    let mut net = Net::new(3, test_config());
    let chunks = net.backup(0, 24, 1);
    net.run_for(120_000);
    for chunk in &chunks {
        let holders = net.holders(&chunk.id);
        assert_eq!(
            holders.len(),
            2,
            "R = 2 copies of {:?}: {holders:?}",
            chunk.id
        );
        for i in holders {
            let blob = &net.nodes[i].disk[&chunk.id];
            assert!(verify_blob(&chunk.owner, &chunk.id, blob).is_some());
        }
    }
    assert!(!net.pushes.is_empty());
    assert!(
        net.pushes.iter().all(|(.., good)| *good),
        "a bad blob was pushed"
    );
    let (mut sent, mut passed, mut failed) = (0, 0, 0);
    for i in 0..3 {
        let c = net.counters(i);
        sent += c.audits_sent;
        passed += c.audits_passed;
        failed += c.audits_failed;
        assert_eq!(dropped(net.events(i)), 0, "node {i}: {:?}", net.events(i));
    }
    assert!(passed >= 50, "{sent} audits sent, {passed} passed");
    assert_eq!(failed, 0);
    assert!(net
        .events(0)
        .iter()
        .any(|e| matches!(e, Event::SnapshotReplicated { .. })));
}

#[test]
fn a_push_with_a_bad_blob_is_never_stored_and_counts_against_the_sender() {
    let mut net = Net::new(3, test_config());
    let owner = net.sites[0].id;
    let id = ChunkId([7; 32]);
    let mut blob = sign_blob(&net.sites[0].key, &id, b"the real sealed bytes");
    let good = blob.clone();
    blob[3] ^= 0x10;
    let forged = sign_blob(&net.sites[1].key, &id, b"the real sealed bytes");
    for bad in [blob, forged] {
        let answers = net.send(
            2,
            1,
            Message::Push {
                owner,
                id,
                size_bytes: bad.len() as u64,
                sealed: bad,
            },
        );
        assert_eq!(
            answers,
            vec![Message::PushAck {
                owner,
                id,
                stored: false,
                basis: net.nodes[1].engine.catalog().snapshot_digest(&owner),
            }]
        );
    }
    assert!(net.nodes[1].disk.is_empty(), "nothing stored");
    assert!(!net.nodes[1].engine.holds(&id));
    assert_eq!(net.counters(1).bad_blobs_received, 2);
    assert_eq!(dropped(net.events(1)), 2);
    // The same chunk with its real signature is stored.
    let answers = net.send(
        2,
        1,
        Message::Push {
            owner,
            id,
            size_bytes: good.len() as u64,
            sealed: good.clone(),
        },
    );
    assert_eq!(
        answers[0],
        Message::PushAck {
            owner,
            id,
            stored: true,
            basis: net.nodes[1].engine.catalog().snapshot_digest(&owner),
        }
    );
    assert_eq!(net.nodes[1].disk.get(&id), Some(&good));
}

#[test]
fn a_chunk_held_for_one_owner_is_not_acknowledged_to_another() {
    let mut net = Net::new(3, test_config());
    let (first, second) = (net.sites[0].id, net.sites[2].id);
    let id = ChunkId([9; 32]);
    let push = |owner, key: &SigningKey| {
        let sealed = sign_blob(key, &id, b"sealed bytes");
        Message::Push {
            owner,
            id,
            size_bytes: sealed.len() as u64,
            sealed,
        }
    };
    let message = push(first, &net.sites[0].key.clone());
    let answers = net.send(0, 1, message);
    assert!(matches!(
        answers[..],
        [Message::PushAck { stored: true, .. }]
    ));
    // The same id pushed for another owner: held, but not for that owner.
    let message = push(second, &net.sites[2].key.clone());
    let answers = net.send(2, 1, message);
    assert_eq!(
        answers,
        vec![Message::PushAck {
            owner: second,
            id,
            stored: false,
            basis: net.nodes[1].engine.catalog().snapshot_digest(&second),
        }]
    );
    assert_eq!(net.nodes[1].disk.len(), 1, "the first owner's copy is kept");
}

/// A fresh machine restoring (node 0 excluding itself): a peer believed alive that has
/// never answered (a burnt office's node, not yet declared dead; here one that answers
/// nothing) is not asked while a holder that answers has the chunk, and the fetches are
/// spread over the holders that answer.
#[test]
fn a_restore_asks_holders_that_answer_and_spreads_over_them() {
    let mut config = test_config();
    config.replication_factor = 3;
    let mut net = Net::new(4, config);
    net.hostile.insert(3, Hostile::Mute);
    let chunks = net.backup(0, 24, 8);
    net.run_for(60_000);
    let now_ms = net.now_ms;
    for chunk in &chunks {
        net.nodes[0]
            .engine
            .handle_fetch(chunk.owner, chunk.id, &[node_id(0)], now_ms)
            .expect("room for fetches");
    }
    net.pump(0);
    let asked: Vec<(usize, ChunkId)> = net
        .queue
        .iter()
        .filter_map(|(from, to, m)| match m {
            Message::Fetch { id, .. } if *from == 0 => Some((*to, *id)),
            _ => None,
        })
        .collect();
    assert_eq!(asked.len(), chunks.len(), "one ask per chunk at first");
    let mute_targets = chunks
        .iter()
        .filter(|c| {
            net.nodes[0]
                .engine
                .target_sites(&c.owner, &c.id)
                .contains(&net.sites[3].id)
        })
        .count();
    assert!(
        mute_targets > 0,
        "the silent node is a target of some chunks"
    );
    for (to, id) in &asked {
        assert_ne!(*to, 3, "{id:?} asked of the node that never answered");
        assert!(
            net.nodes[*to].disk.contains_key(id),
            "{id:?} asked of a non-holder"
        );
    }
    let per_node = |n| asked.iter().filter(|(to, _)| *to == n).count();
    assert!(
        per_node(1) >= chunks.len() / 3 && per_node(2) >= chunks.len() / 3,
        "spread over both holders: {} and {}",
        per_node(1),
        per_node(2)
    );
    net.deliver_all();
    let fetched = count(net.events(0), |e| matches!(e, Event::Fetched { .. }));
    assert_eq!(fetched, chunks.len());
}

#[test]
fn a_fetch_reply_with_a_bad_blob_is_refused_and_the_next_holder_asked() {
    let mut config = test_config();
    config.replication_factor = 3;
    let mut net = Net::new(3, config);
    let chunks = net.backup(0, 4, 2);
    net.run_for(60_000);
    let chunk = chunks[0];
    assert_eq!(net.holders(&chunk.id).len(), 3);
    // A fresh machine of site 0 would fetch; node 0 excludes itself to fetch remotely.
    let now_ms = net.now_ms;
    net.nodes[0]
        .engine
        .handle_fetch(chunk.owner, chunk.id, &[node_id(0)], now_ms)
        .expect("room for a fetch");
    net.pump(0);
    let at = net
        .queue
        .iter()
        .position(|(from, _, m)| *from == 0 && matches!(m, Message::Fetch { .. }))
        .expect("a fetch went out");
    let (_, to, _) = net.queue.remove(at).expect("found above");
    let mut bad = net.nodes[to].disk[&chunk.id].clone();
    bad[0] ^= 1;
    net.send(
        to,
        0,
        Message::FetchReply {
            owner: chunk.owner,
            id: chunk.id,
            sealed: Some(bad),
        },
    );
    assert_eq!(net.counters(0).bad_blobs_received, 1);
    assert!(!net
        .events(0)
        .iter()
        .any(|e| matches!(e, Event::Fetched { .. })));
    // The other holder is asked and its good copy arrives, the signature removed.
    net.deliver_all();
    let fetched: Vec<&Event> = net
        .events(0)
        .iter()
        .filter(|e| matches!(e, Event::Fetched { .. }))
        .collect();
    assert_eq!(fetched.len(), 1);
    let Event::Fetched { from, sealed, .. } = fetched[0] else {
        unreachable!()
    };
    assert_ne!(*from, node_id(to));
    assert_eq!(
        Some(&sealed[..]),
        verify_blob(&chunk.owner, &chunk.id, &net.nodes[0].disk[&chunk.id])
    );
}

#[test]
fn a_damaged_local_copy_is_never_pushed_or_served() {
    let mut net = Net::new(3, test_config());
    let chunks = net.backup(0, 8, 3);
    // Rot on the owner's disk before anything was replicated.
    let rotten = chunks[5].id;
    net.nodes[0].disk.get_mut(&rotten).expect("written")[2] ^= 4;
    net.run_for(60_000);
    assert!(net.pushes.iter().all(|(.., good)| *good));
    assert!(net.pushes.iter().all(|(_, _, id, _)| *id != rotten));
    assert!(
        net.holders(&rotten).is_empty(),
        "the damaged copy is deleted"
    );
    assert!(net.events(0).contains(&Event::ChunkLost { id: rotten }));
    assert_eq!(net.counters(0).corrupt_chunks_found, 1);
    // Rot at a holder: asked to serve the chunk, it says it has none.
    let chunk = chunks[2];
    let holder = *net
        .holders(&chunk.id)
        .iter()
        .find(|i| **i != 0)
        .expect("replicated");
    net.nodes[holder].disk.get_mut(&chunk.id).expect("held")[0] ^= 1;
    let answers = net.send(
        0,
        holder,
        Message::Fetch {
            owner: chunk.owner,
            id: chunk.id,
        },
    );
    assert_eq!(
        answers,
        vec![Message::FetchReply {
            owner: chunk.owner,
            id: chunk.id,
            sealed: None
        }]
    );
    assert!(net
        .events(holder)
        .contains(&Event::ChunkLost { id: chunk.id }));
    assert!(!net.nodes[holder].disk.contains_key(&chunk.id));
}

// ---- scrub ----------------------------------------------------------------------

#[test]
fn scrub_finds_a_damaged_copy_and_repair_brings_it_back() {
    let mut config = test_config();
    config.scrub_period_ms = 60_000;
    config.audit_interval_ms = u64::MAX / 4;
    let mut net = Net::new(3, config);
    let chunks = net.backup(0, 16, 4);
    net.run_for(30_000);
    let chunk = chunks[3];
    let holder = *net
        .holders(&chunk.id)
        .iter()
        .find(|i| **i != 0)
        .expect("replicated");
    let good = net.nodes[holder].disk[&chunk.id].clone();
    let last = good.len() - 1;
    net.nodes[holder].disk.get_mut(&chunk.id).expect("held")[last] ^= 0x80;
    net.run_for(10 * 60_000);
    assert!(net
        .events(holder)
        .contains(&Event::ChunkLost { id: chunk.id }));
    assert_eq!(net.counters(holder).corrupt_chunks_found, 1);
    assert!(net.counters(holder).scrub_reads >= 16);
    assert_eq!(
        net.nodes[holder].disk.get(&chunk.id),
        Some(&good),
        "repair brought the good copy back"
    );
}

// ---- audits ---------------------------------------------------------------------

#[test]
fn a_holder_that_lost_a_chunk_fails_its_audit_and_gets_the_chunk_back() {
    // Only node 0 audits, so node 1 learns of its loss from node 0's audit.
    let mut net = Net::with_configs(2, |i| EngineConfig {
        audit_interval_ms: if i == 0 { 1_000 } else { u64::MAX / 4 },
        ..test_config()
    });
    let chunks = net.backup(0, 8, 5);
    net.run_for(30_000);
    // Two copies vanish from node 1's disk; its engine does not know.
    let lost = [chunks[1].id, chunks[6].id];
    for id in &lost {
        net.nodes[1].disk.remove(id).expect("replicated");
    }
    net.run_for(10 * 60_000);
    for id in &lost {
        assert!(net.events(0).contains(&Event::AuditFailed {
            node: node_id(1),
            id: *id,
            failure: AuditFailure::Missing,
        }));
        assert!(net.events(1).contains(&Event::ChunkLost { id: *id }));
        assert!(
            net.nodes[1].disk.contains_key(id),
            "repair brought {id:?} back"
        );
    }
    let counters = net.counters(0);
    assert_eq!(counters.audits_failed, 2);
    assert!(counters.audits_passed > 100);
    assert!(!net.nodes[0].engine.is_excluded(&node_id(1)));
}

#[test]
fn a_holder_whose_sync_lacks_a_chunk_no_longer_counts_as_holding_it() {
    // Audits off: only the sync can tell node 0 that node 1 lost something.
    let mut net = Net::with_configs(2, |_| EngineConfig {
        audit_interval_ms: u64::MAX / 4,
        ..test_config()
    });
    let chunks = net.backup(0, 8, 5);
    net.run_for(30_000);
    let (site0, site1) = (net.sites[0].id, net.sites[1].id);
    for chunk in &chunks {
        let copies = net.nodes[0].engine.held_copies(&chunk.id).unwrap();
        assert_eq!(
            copies.sites,
            vec![site0, site1],
            "confirmed by its push ack"
        );
        assert_eq!(copies.targets_unknown, 0);
    }
    // Node 1 lost one chunk (a pack gone in a restart) and lists its partition without it.
    let lost = chunks[3].id;
    let partition = partition_of(&lost);
    let still_held: Vec<ChunkId> = chunks
        .iter()
        .map(|c| c.id)
        .filter(|id| partition_of(id) == partition && *id != lost)
        .collect();
    net.send(
        1,
        0,
        Message::SyncIds {
            owner: site0,
            partition: partition as u16,
            ids: still_held.clone(),
            reply: false,
            basis: net.nodes[1].engine.catalog().snapshot_digest(&site0),
        },
    );
    let copies = net.nodes[0].engine.held_copies(&lost).unwrap();
    assert_eq!(copies.sites, vec![site0], "site 1 said it lacks it");
    for id in &still_held {
        let copies = net.nodes[0].engine.held_copies(id).unwrap();
        assert_eq!(copies.sites, vec![site0, site1]);
    }
    // Once its sync lists the chunk again (repaired), site 1 counts again.
    let mut repaired = still_held;
    repaired.push(lost);
    net.send(
        1,
        0,
        Message::SyncIds {
            owner: site0,
            partition: partition as u16,
            ids: repaired,
            reply: false,
            basis: net.nodes[1].engine.catalog().snapshot_digest(&site0),
        },
    );
    let copies = net.nodes[0].engine.held_copies(&lost).unwrap();
    assert_eq!(copies.sites, vec![site0, site1]);
    assert!(net.nodes[0].engine.held_copies(&ChunkId([7; 32])).is_none());
}

/// Every site backs up, so every pair of sites shares chunks and audits each other.
fn three_sites_backing_up(hostile: Hostile) -> (Net, Vec<ChunkRef>) {
    let mut net = Net::new(3, test_config());
    let mut chunks = Vec::new();
    for i in 0..3 {
        chunks.extend(net.backup(i, 24, 6));
    }
    net.run_for(60_000);
    for chunk in &chunks {
        assert_eq!(net.holders(&chunk.id).len(), 2);
    }
    net.hostile.insert(1, hostile);
    (net, chunks)
}

fn assert_moved_off_the_excluded_holder(net: &mut Net, chunks: &[ChunkRef]) {
    for i in [0, 2] {
        assert!(
            net.nodes[i].engine.is_excluded(&node_id(1)),
            "node {i} still places on node 1: {:?}",
            net.events(i)
        );
        assert_eq!(
            count(net.events(i), |e| matches!(
                e,
                Event::HolderExcluded { node, .. } if *node == node_id(1)
            )),
            1
        );
    }
    // With node 1 left out, the chunks of sites 0 and 2 are copied to each other.
    net.run_for(10 * 60_000);
    for chunk in chunks {
        if chunk.owner != net.sites[1].id {
            assert_eq!(
                {
                    let mut h = net.holders(&chunk.id);
                    h.retain(|i| *i != 1);
                    h
                },
                vec![0, 2],
                "{:?} at two honest sites",
                chunk.id
            );
        }
    }
}

#[test]
fn a_holder_that_answers_audits_wrongly_is_no_longer_placed_on() {
    let (mut net, chunks) = three_sites_backing_up(Hostile::WrongProofs);
    net.run_for(10 * 60_000);
    let wrong = count(net.events(0), |e| {
        matches!(
            e,
            Event::AuditFailed {
                failure: AuditFailure::Wrong,
                node,
                ..
            } if *node == node_id(1)
        )
    });
    assert!(wrong >= 3, "{wrong} wrong answers seen");
    assert!(
        count(
            net.events(0),
            |e| matches!(e, Event::AuditFailed { node, .. } if *node == node_id(2))
        ) == 0
    );
    assert_moved_off_the_excluded_holder(&mut net, &chunks);
}

#[test]
fn a_holder_that_never_answers_times_out_and_is_no_longer_placed_on() {
    let (mut net, chunks) = three_sites_backing_up(Hostile::Silent);
    net.run_for(10 * 60_000);
    let late = count(net.events(2), |e| {
        matches!(
            e,
            Event::AuditFailed {
                failure: AuditFailure::Late,
                ..
            }
        )
    });
    assert!(late >= 3, "{late} late answers seen");
    assert_moved_off_the_excluded_holder(&mut net, &chunks);
    // The exclusion ends after its period, and node 1 is placed on again.
    let later_ms = net.now_ms + AUDIT_EXCLUSION_MS;
    net.nodes[0].engine.handle_timeout(later_ms);
    assert!(!net.nodes[0].engine.is_excluded(&node_id(1)));
}

#[test]
fn an_audit_answer_lost_on_the_way_is_asked_again_and_not_held_against_the_holder() {
    // Half of node 1's audit answers are lost: without a second asking every audit of
    // it would fail late, and it would be excluded within three.
    let (mut net, _) = three_sites_backing_up(Hostile::LosesEveryOtherAuditReply);
    net.run_for(10 * 60_000);
    for i in [0, 2] {
        let counters = net.counters(i);
        let failed_on_1 = count(
            net.events(i),
            |e| matches!(e, Event::AuditFailed { node, .. } if *node == node_id(1)),
        );
        assert_eq!(failed_on_1, 0, "node {i}: audits of node 1 failed");
        assert!(counters.audits_retried >= 3, "node {i}: {counters:?}");
        assert!(counters.audits_passed >= 3, "node {i}: {counters:?}");
        assert!(!net.nodes[i].engine.is_excluded(&node_id(1)));
    }
}

#[test]
fn a_holder_that_answers_nothing_at_all_is_not_blamed_for_it() {
    // A one-way partition looks like this: the peer's own gossip arrives, none of its
    // answers do. That is the link's fault, not the holder's disk's.
    let (mut net, _) = three_sites_backing_up(Hostile::Mute);
    net.run_for(10 * 60_000);
    for i in [0, 2] {
        let unreachable = count(net.events(i), |e| {
            matches!(
                e,
                Event::AuditFailed {
                    failure: AuditFailure::Unreachable,
                    node,
                    ..
                } if *node == node_id(1)
            )
        });
        assert!(
            unreachable >= 3,
            "node {i}: {unreachable} unanswered audits"
        );
        assert_eq!(net.counters(i).audits_unreachable, unreachable as u64);
        assert!(!net.nodes[i].engine.is_excluded(&node_id(1)));
    }
}

#[test]
fn a_stray_or_replayed_audit_reply_changes_nothing() {
    let mut net = Net::new(2, test_config());
    let chunks = net.backup(0, 4, 7);
    net.run_for(30_000);
    let before = net.counters(0);
    net.send(
        1,
        0,
        Message::AuditReply {
            owner: chunks[0].owner,
            id: chunks[0].id,
            nonce: [9; 32],
            proof: None,
        },
    );
    let after = net.counters(0);
    assert_eq!(before.audits_failed, after.audits_failed);
    assert_eq!(before.audits_passed, after.audits_passed);
}

// ---- hostile messages -----------------------------------------------------------

#[test]
fn malformed_messages_are_dropped_and_cut_the_peer_off_for_a_while() {
    let mut net = Net::new(2, test_config());
    net.run_for(5_000);
    let gossip = Message::Gossip {
        beats: Vec::new(),
        digests: Vec::new(),
        reply: false,
    };
    assert!(!net.send(1, 0, gossip.clone()).is_empty(), "answered");
    for n in 1..=STRIKES_MAX {
        net.send_bytes(1, 0, &[MESSAGE_VERSION_FOR_TESTS, 0xee, 1, 2, 3]);
        assert_eq!(dropped(net.events(0)), n as usize);
        assert_eq!(
            net.nodes[0].engine.is_cut_off(&node_id(1)),
            n == STRIKES_MAX
        );
    }
    assert_eq!(net.counters(0).peers_cut_off, 1);
    assert!(net
        .events(0)
        .iter()
        .any(|e| matches!(e, Event::PeerCutOff { node, .. } if *node == node_id(1))));
    // While cut off, even a good message is refused unread.
    let refused = net.counters(0).messages_refused;
    assert!(net.send(1, 0, gossip.clone()).is_empty());
    assert_eq!(net.counters(0).messages_refused, refused + 1);
    // After the period it is heard again.
    net.hostile.clear();
    net.queue.clear();
    let until_ms = net.now_ms + CUT_OFF_MS;
    net.now_ms = until_ms;
    net.nodes[0].engine.handle_timeout(until_ms);
    net.pump(0);
    net.queue.clear();
    assert!(!net.nodes[0].engine.is_cut_off(&node_id(1)));
    assert!(!net.send(1, 0, gossip).is_empty(), "answered again");
}

const MESSAGE_VERSION_FOR_TESTS: u8 = super::message::MESSAGE_VERSION;

#[test]
fn an_oversized_message_is_dropped_unread() {
    let mut net = Net::new(2, test_config());
    net.send_bytes(1, 0, &vec![0u8; MESSAGE_BYTES_MAX + 1]);
    assert_eq!(net.counters(0).messages_dropped, 1);
    assert!(net.events(0).iter().any(
        |e| matches!(e, Event::MessageDropped { reason, .. } if reason.contains("over the limit"))
    ));
}

#[test]
fn strikes_far_apart_never_add_up_to_a_cut_off() {
    let mut net = Net::new(2, test_config());
    for _ in 0..3 * STRIKES_MAX {
        net.send_bytes(1, 0, &[0xff]);
        net.now_ms += STRIKE_MEMORY_MS + 1;
    }
    assert_eq!(net.counters(0).messages_dropped, 3 * u64::from(STRIKES_MAX));
    assert_eq!(net.counters(0).peers_cut_off, 0);
}

#[test]
fn messages_that_break_the_rules_are_strikes() {
    let mut net = Net::new(3, test_config());
    let owner = net.sites[0].id;
    let bad = [
        Message::SyncDigest {
            owner,
            digests: vec![0; 3],
        },
        Message::SyncIds {
            owner,
            partition: PARTITIONS as u16,
            ids: Vec::new(),
            reply: false,
            basis: 0,
        },
        Message::SyncIds {
            owner,
            partition: 0,
            ids: vec![ChunkId([0xff; 32])],
            reply: false,
            basis: 0,
        },
        Message::Push {
            owner,
            id: ChunkId([1; 32]),
            size_bytes: 10,
            sealed: vec![0; 100],
        },
        // Node 2 (site 2) asking for site 0's chunk: only site 0 restores it.
        Message::Fetch {
            owner,
            id: ChunkId([1; 32]),
        },
    ];
    for message in bad.iter().cloned() {
        let answers = net.send(2, 1, message);
        assert!(answers.is_empty());
    }
    assert_eq!(dropped(net.events(1)), bad.len());
    assert!(net.nodes[1].engine.is_cut_off(&node_id(2)));
}

#[test]
fn strangers_are_refused_and_not_counted_against_anyone() {
    let mut net = Net::new(2, test_config());
    let stranger = NodeId([0x11; 32]);
    let now_ms = net.now_ms;
    net.nodes[0]
        .engine
        .handle_message_bytes(stranger, &[0xff], now_ms);
    net.pump(0);
    assert_eq!(net.counters(0).messages_refused, 1);
    assert_eq!(net.counters(0).messages_dropped, 0);
    assert!(net
        .events(0)
        .contains(&Event::MessageRefused { from: stranger }));
}

// ---- records --------------------------------------------------------------------

#[test]
fn a_partners_partner_is_refused_and_never_sees_this_sites_records() {
    // Sites 0-1, 0-2 and 2-3 are partners; site 3 is trusted by site 2 alone.
    let (a, c, d) = (0, 2, 3);
    let mut net = Net::with_partners(4, &[(0, 1), (0, 2), (2, 3)]);
    let site_a = net.sites[a].id;
    assert!(
        !net.nodes[a].engine.trust().is_trusted(&net.sites[d].id),
        "site 0 never trusted site 3"
    );
    // Site 3's node connects to site 0's: refused, and never a peer.
    let now_ms = net.now_ms;
    let cert_d = node_cert(&net.sites[d].key, node_id(d));
    assert!(net.nodes[a]
        .engine
        .handle_connect(node_id(d), cert_d, now_ms)
        .is_err());
    net.pump(a);
    net.run_for(60_000);
    assert!(net.nodes[a].engine.peers().all(|(n, _, _)| n != node_id(d)));
    assert!(net.nodes[d].engine.peers().all(|(n, _, _)| n != node_id(a)));
    // Site 3 holds nothing of site 0's: no node certificate, grant, wrapped keys or
    // snapshot, though site 2 (which trusts both) holds them all.
    assert!(net.nodes[c].engine.catalog().by_author(site_a).count() > 0);
    assert_eq!(net.nodes[d].engine.catalog().by_author(site_a).count(), 0);
    // Asked outright, site 2's node relays none of site 0's records to site 3.
    let gossip = Message::Gossip {
        beats: Vec::new(),
        digests: vec![(site_a, 0)],
        reply: false,
    };
    let answers = net.send(d, c, gossip);
    assert!(
        answers
            .iter()
            .all(|m| !matches!(m, Message::Entries { author, .. } if *author == site_a)),
        "no entries of site 0 for site 3: {answers:?}"
    );
    let want = Message::Want {
        author: site_a,
        keys: vec![(RecordKind::NodeCert, node_id(a).0)],
    };
    let answers = net.send(d, c, want);
    assert!(
        answers.iter().all(|m| match m {
            Message::Records { records } => records.iter().all(|r| r.author != site_a),
            _ => true,
        }),
        "no records of site 0 for site 3: {answers:?}"
    );
    // Site 2's partners still get site 0's records from it (site 0 lets them).
    let gossip = Message::Gossip {
        beats: Vec::new(),
        digests: vec![(site_a, 0)],
        reply: false,
    };
    assert!(net
        .send(a, c, gossip)
        .iter()
        .any(|m| matches!(m, Message::Entries { author, .. } if *author == site_a)));
}

#[test]
fn records_of_a_revoked_site_are_never_stored_or_relayed() {
    let mut net = Net::new(3, test_config());
    // Site 0 revokes site 2; sites 1 and 2 still trust each other.
    let revoke = grant(&net.sites[0].key, net.sites[2].id, 2, true);
    let now_ms = net.now_ms;
    net.nodes[0]
        .engine
        .handle_local_record(revoke, now_ms)
        .expect("valid");
    net.pump(0);
    assert!(!net.nodes[0].engine.trust().is_trusted(&net.sites[2].id));
    assert_eq!(
        net.nodes[0]
            .engine
            .catalog()
            .by_author(net.sites[2].id)
            .count(),
        0
    );
    // Node 1 relays a new record of site 2 (a new node certificate).
    let cert = node_cert(&net.sites[2].key, NodeId([0x33; 32]));
    net.send(
        1,
        0,
        Message::Records {
            records: vec![cert],
        },
    );
    assert_eq!(
        net.nodes[0]
            .engine
            .catalog()
            .by_author(net.sites[2].id)
            .count(),
        0
    );
    assert!(net
        .events(0)
        .iter()
        .any(|e| matches!(e, Event::RecordRejected { .. })));
    assert_eq!(dropped(net.events(0)), 0, "an honest relay is not a forger");
    // Node 0 relays nothing of site 2: asked for its records, it sends none.
    let answers = net.send(
        1,
        0,
        Message::Want {
            author: net.sites[2].id,
            keys: vec![(RecordKind::NodeCert, node_id(2).0)],
        },
    );
    assert!(answers.is_empty(), "{answers:?}");
    // Node 2 itself is no longer a peer: its messages are refused, its pushes unstored.
    let id = ChunkId([5; 32]);
    let blob = sign_blob(&net.sites[2].key, &id, b"site 2's data");
    let answers = net.send(
        2,
        0,
        Message::Push {
            owner: net.sites[2].id,
            id,
            size_bytes: blob.len() as u64,
            sealed: blob.clone(),
        },
    );
    assert!(answers.is_empty());
    assert!(net.nodes[0].disk.is_empty());
    // Relayed by a trusted peer, site 2's chunk is refused too.
    let answers = net.send(
        1,
        0,
        Message::Push {
            owner: net.sites[2].id,
            id,
            size_bytes: blob.len() as u64,
            sealed: blob,
        },
    );
    assert!(matches!(
        answers[..],
        [Message::PushAck { stored: false, .. }]
    ));
    assert!(net.nodes[0].disk.is_empty());
}

#[test]
fn a_replayed_older_grant_never_undoes_a_revocation() {
    let mut net = Net::new(3, test_config());
    let old_grant = net
        .records
        .iter()
        .find(|r| {
            r.kind == RecordKind::TrustGrant
                && r.author == net.sites[0].id
                && r.key == net.sites[2].id.0
        })
        .cloned()
        .expect("site 0's grant to site 2");
    let revoke = grant(&net.sites[0].key, net.sites[2].id, 2, true);
    let now_ms = net.now_ms;
    net.nodes[0]
        .engine
        .handle_local_record(revoke.clone(), now_ms)
        .expect("valid");
    net.pump(0);
    net.run_for(30_000);
    assert!(!net.nodes[1]
        .engine
        .catalog()
        .trust(net.sites[0].id)
        .partners
        .contains(&net.sites[2].id));
    // Node 1 replays the old grant to node 0 and hears it from node 0's gossip too.
    for to in [0, 1] {
        net.send(
            if to == 0 { 1 } else { 0 },
            to,
            Message::Records {
                records: vec![old_grant.clone()],
            },
        );
        let key = crate::catalog::RecordKey::of(&revoke);
        assert_eq!(
            net.nodes[to].engine.catalog().get(&key),
            Some(&revoke),
            "node {to} keeps the revocation"
        );
    }
    assert!(!net.nodes[0].engine.trust().is_trusted(&net.sites[2].id));
}

#[test]
fn a_forged_record_is_a_strike() {
    let mut net = Net::new(2, test_config());
    let mut forged = grant(&net.sites[0].key, SiteId([0x44; 32]), 9, false);
    forged.version = 10; // the signature no longer covers it
    net.send(
        1,
        0,
        Message::Records {
            records: vec![forged],
        },
    );
    assert_eq!(dropped(net.events(0)), 1);
    assert_eq!(net.counters(0).records_rejected, 1);
    assert!(net.nodes[0]
        .engine
        .catalog()
        .get(&crate::catalog::RecordKey {
            author: net.sites[0].id,
            kind: RecordKind::TrustGrant,
            key: [0x44; 32],
        })
        .is_none());
}

/// A trusted site may sign a certificate claiming another site's node as its own: the
/// signature is genuine, the claim false. A known peer keeps its site whichever way the
/// two certificates sort, and a node that starts with both on its disk takes the peer for
/// the site of the certificate the peer presents when it connects.
#[test]
fn a_node_claimed_by_a_second_site_keeps_its_own_site() {
    let mut net = Net::new(3, test_config());
    let claim = |net: &Net, forger: usize, victim: usize| {
        let cert = NodeCert {
            node: node_id(victim),
            site: net.sites[forger].id,
            name: "stolen".into(),
            addresses: Vec::new(),
            capacity_bytes: 1,
        };
        Record::sign(
            &net.sites[forger].key,
            RecordKind::NodeCert,
            node_id(victim).0,
            1,
            cert.encode(),
        )
    };
    let site_seen = |engine: &Engine, victim: usize| {
        engine
            .peers()
            .find(|(node, ..)| *node == node_id(victim))
            .map(|(_, site, _)| site)
    };
    let mut claims = Vec::new();
    for (forger, victim) in [(1, 2), (2, 1)] {
        let record = claim(&net, forger, victim);
        claims.push(record.clone());
        net.send(
            forger,
            0,
            Message::Records {
                records: vec![record],
            },
        );
        assert_eq!(
            site_seen(&net.nodes[0].engine, victim),
            Some(net.sites[victim].id),
            "node {victim} taken for site {forger}'s"
        );
    }
    // A restarted node 0 loads both claims from its disk, then each victim connects.
    for victim in [1, 2] {
        let mut engine = Engine::new(test_config(), node_id(0), net.sites[0].id, 9, 0);
        engine.load_records(net.records.iter().cloned().chain(claims.iter().cloned()));
        engine
            .handle_connect(node_id(victim), net.records[victim * 3].clone(), 1)
            .expect("the victim's own certificate is valid");
        assert_eq!(
            site_seen(&engine, victim),
            Some(net.sites[victim].id),
            "node {victim} taken for another site's after it connected"
        );
    }
    // A node of a site no one trusts, claimed by trusted site 1: once it presents its own
    // site's certificate it is refused, and no longer taken for site 1's.
    let stranger_key = site_key(7);
    let stranger = NodeId([0x42; 32]);
    let claim = NodeCert {
        node: stranger,
        site: net.sites[1].id,
        name: "stolen".into(),
        addresses: Vec::new(),
        capacity_bytes: 1,
    };
    let claim = Record::sign(
        &net.sites[1].key,
        RecordKind::NodeCert,
        stranger.0,
        1,
        claim.encode(),
    );
    net.send(
        1,
        0,
        Message::Records {
            records: vec![claim],
        },
    );
    assert!(net.nodes[0]
        .engine
        .peers()
        .any(|(node, ..)| node == stranger));
    let own = node_cert(&stranger_key, stranger);
    assert!(net.nodes[0]
        .engine
        .handle_connect(stranger, own, 2)
        .is_err());
    assert!(
        !net.nodes[0]
            .engine
            .peers()
            .any(|(node, ..)| node == stranger),
        "a node that says it is an untrusted site's is no trusted site's peer"
    );
}

/// An owner that revokes a holder's site no longer places on it and refuses its nodes,
/// so the holder can never see every target confirm: it must drop the owner's chunks
/// after the trim grace anyway (swarm seed 23 kept them to the end).
#[test]
fn a_holder_the_owner_revoked_drops_the_owners_chunks() {
    let mut net = Net::new(3, test_config());
    let chunks = net.backup(0, 16, 1);
    net.run_for(60_000);
    let held_at_2: Vec<ChunkId> = chunks
        .iter()
        .map(|c| c.id)
        .filter(|id| net.holders(id).contains(&2))
        .collect();
    assert!(
        !held_at_2.is_empty(),
        "site 2 holds some of site 0's chunks"
    );
    let revoke = net.revoke(0, 2);
    net.send(
        1,
        2,
        Message::Records {
            records: vec![revoke],
        },
    );
    net.run_for(test_config().trim_grace_ms + 120_000);
    for chunk in &chunks {
        let holders = net.holders(&chunk.id);
        assert!(!holders.contains(&2), "site 2 still holds {:?}", chunk.id);
        assert_eq!(
            holders,
            vec![0, 1],
            "{:?} back at R without site 2",
            chunk.id
        );
    }
}

/// A site that revoked a third site no longer sees that site's grants, so it places
/// another owner's chunks without it, and offers them to a site the owner never places
/// them on. A node pulls another owner's chunk only when its own placement names it (or
/// the owner's site offers it), so no copy is made that every view but the offerer's
/// calls extra (swarm seed 56 kept dozens of them at rest).
#[test]
fn a_holder_with_a_narrower_view_of_placement_adds_no_copies() {
    let config = EngineConfig {
        replication_factor: 3,
        ..test_config()
    };
    let mut net = Net::new(4, config.clone());
    let chunks = net.backup(1, 64, 1);
    net.run_for(60_000);
    // Site 0 revokes site 2 while site 1, the owner, still trusts it.
    net.revoke(0, 2);
    let pushes_before = net.pushes.len();
    net.run_for(config.trim_grace_ms + 120_000);
    let owner = net.sites[1].id;
    let (site0, site2, site3) = (net.sites[0].id, net.sites[2].id, net.sites[3].id);
    let mut placed_apart = 0;
    for chunk in &chunks {
        let owners_view = net.nodes[1].engine.target_sites(&owner, &chunk.id);
        let site0_view = net.nodes[0].engine.target_sites(&owner, &chunk.id);
        let mut want: Vec<usize> = owners_view
            .iter()
            .map(|s| net.sites.iter().position(|t| t.id == *s).expect("known"))
            .collect();
        want.sort_unstable();
        assert_eq!(
            net.holders(&chunk.id),
            want,
            "{:?} at its owner's targets",
            chunk.id
        );
        if owners_view.contains(&site0)
            && owners_view.contains(&site2)
            && site0_view.contains(&site3)
        {
            placed_apart += 1;
            assert!(
                !net.pushes[pushes_before..]
                    .iter()
                    .any(|(from, to, id, _)| (*from, *to, *id) == (0, 3, chunk.id)),
                "site 0 copied {:?} to site 3, which its owner does not place it on",
                chunk.id
            );
        }
    }
    assert!(
        placed_apart > 0,
        "some chunks that both site 0 and site 2 hold are placed on site 3 in site 0's view"
    );
}

/// An extra copy on a second node of a site goes once that site's target holds the
/// chunk, even when some other target never confirms it: here the site revoked a third
/// site and so places the owner's chunks on fewer than R sites (swarm seed 101 kept such
/// copies to the end, with fewer than R sites standing).
#[test]
fn an_extra_copy_goes_once_a_target_of_its_site_holds_the_chunk() {
    let config = EngineConfig {
        replication_factor: 3,
        ..test_config()
    };
    // Node 3 is site 0's second node.
    let mut net = Net::with_layout(&[0, 1, 2, 0], |_| config.clone());
    let chunks = net.backup(1, 32, 1);
    net.run_for(60_000);
    // Site 0 revokes site 2 while site 1, the owner, still trusts it.
    net.revoke(0, 2);
    net.run_for(10_000);
    for chunk in &chunks {
        let holders = net.holders(&chunk.id);
        assert_eq!(holders.len(), 3, "{:?} at R before the test", chunk.id);
        let spare = if holders.contains(&0) { 3 } else { 0 };
        net.push_copy(1, spare, chunk);
    }
    net.run_for(config.trim_grace_ms + 120_000);
    for chunk in &chunks {
        let holders = net.holders(&chunk.id);
        let at_site_0 = holders.iter().filter(|n| net.site_of[**n] == 0).count();
        assert_eq!(
            at_site_0, 1,
            "{:?}: one copy at site 0 ({holders:?})",
            chunk.id
        );
        assert!(
            holders.contains(&1) && holders.contains(&2),
            "{:?}: the copies at sites 1 and 2 stay ({holders:?})",
            chunk.id
        );
    }
}

/// A target whose site revoked the holder's refuses the holder's nodes, so it never
/// confirms the holder's extra copy: the copy goes once the other targets confirmed it
/// (swarm seed 98 kept such copies to the end).
#[test]
fn an_extra_copy_does_not_wait_for_a_target_whose_site_revoked_its_own() {
    let config = EngineConfig {
        replication_factor: 3,
        ..test_config()
    };
    let mut net = Net::new(4, config.clone());
    let owner = net.sites[1].id;
    let chunks = net.backup(1, 32, 1);
    net.run_for(60_000);
    // Site 2 revokes site 3; site 3 hears of it from site 1.
    let revoke = net.revoke(2, 3);
    net.send(
        1,
        3,
        Message::Records {
            records: vec![revoke],
        },
    );
    net.run_for(10_000);
    let site2 = net.sites[2].id;
    let mut extra = Vec::new();
    for chunk in &chunks {
        let targets = net.nodes[1].engine.target_sites(&owner, &chunk.id);
        if !targets.contains(&site2) || net.holders(&chunk.id).contains(&3) {
            continue;
        }
        net.push_copy(1, 3, chunk);
        extra.push(chunk.id);
    }
    assert!(!extra.is_empty(), "some chunks are placed on site 2");
    net.run_for(config.trim_grace_ms + 120_000);
    for id in &extra {
        let holders = net.holders(id);
        assert!(
            !holders.contains(&3),
            "{id:?}: site 3 still holds it ({holders:?})"
        );
        assert!(
            holders.contains(&2),
            "{id:?}: site 2 keeps its copy ({holders:?})"
        );
    }
}

#[test]
fn a_forgotten_snapshot_is_never_acknowledged_and_no_replay_brings_it_back() {
    use crate::record::{Tombstone, TOMBSTONE_VERSION};
    let mut net = Net::new(3, test_config());
    let now_ms = net.now_ms;
    let chunks = net.backup(0, 8, 5);
    let key = net.sites[net.site_of[0]].key.clone();
    let live = Record::sign(&key, RecordKind::Snapshot, [5; 32], 1, vec![5; 48]);
    let body = Tombstone {
        forgotten_unix_ms: now_ms,
    }
    .encode();
    let tombstone = Record::sign(&key, RecordKind::Snapshot, [5; 32], TOMBSTONE_VERSION, body);
    assert!(net.nodes[0].engine.snapshot_pending(&[5; 32]));
    net.nodes[0]
        .engine
        .handle_local_record(tombstone.clone(), now_ms)
        .unwrap();
    assert!(!net.nodes[0].engine.snapshot_pending(&[5; 32]));
    net.pump(0);
    net.run_for(120_000);
    let acknowledged = |net: &Net| {
        count(
            net.events(0),
            |e| matches!(e, Event::SnapshotReplicated { snapshot } if *snapshot == [5; 32]),
        )
    };
    assert_eq!(
        acknowledged(&net),
        0,
        "a forgotten snapshot was acknowledged"
    );
    // Its chunks still replicated: forgetting takes liveness away, it deletes nothing.
    assert!(chunks.iter().all(|c| net.holders(&c.id).len() >= 2));
    // Every node that trusts the site holds the tombstone, and the live record handed
    // in again (a replay, an old disk) is stale everywhere.
    for i in 0..net.nodes.len() {
        let held = net.nodes[i]
            .engine
            .catalog
            .get(&RecordKey::of(&live))
            .cloned();
        assert_eq!(held.as_ref(), Some(&tombstone), "node {i}");
        let now_ms = net.now_ms;
        net.nodes[i]
            .engine
            .handle_local_record(live.clone(), now_ms)
            .ok();
        let after = net.nodes[i]
            .engine
            .catalog
            .get(&RecordKey::of(&live))
            .cloned();
        assert_eq!(after.as_ref(), Some(&tombstone), "node {i} after a replay");
    }
    // A backup handing the engine the forgotten snapshot again does not track it, so
    // it is not acknowledged either (its chunks are at R, so tracking would acknowledge
    // it at once).
    let now_ms = net.now_ms;
    net.nodes[0]
        .engine
        .handle_new_snapshot(live, &chunks, now_ms)
        .unwrap();
    net.pump(0);
    assert!(!net.nodes[0].engine.snapshot_pending(&[5; 32]));
    assert_eq!(
        acknowledged(&net),
        0,
        "a replayed forgotten snapshot was acknowledged"
    );
}

#[test]
fn a_confirmation_made_without_the_snapshots_record_does_not_acknowledge_it() {
    // Rule H5 (docs/retention.md): a holder that confirms a chunk for a snapshot must
    // have known the snapshot, or a garbage statement that lacks it could be active there.
    let mut net = Net::new(3, test_config());
    let owner = net.sites[net.site_of[0]].id;
    let chunks = net.backup(0, 4, 3);
    // Nothing delivered: no other node has heard of the snapshot yet.
    net.queue.clear();
    let have: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    let theirs = net.nodes[1].engine.catalog().snapshot_digest(&owner);
    let ours = net.nodes[0].engine.catalog().snapshot_digest(&owner);
    assert_ne!(theirs, ours, "the new record moved the owner's digest");
    let need = |basis| Message::Need {
        owner,
        need: Vec::new(),
        have: have.clone(),
        basis,
    };
    net.send(1, 0, need(theirs));
    assert!(
        net.nodes[0].engine.snapshot_pending(&[3; 32]),
        "acknowledged on confirmations from a holder that did not know the snapshot"
    );
    assert_eq!(net.counters(0).confirmations_on_other_basis, 4);
    // The same confirmations from a holder that knows it count (R = 2: this site and one
    // other).
    net.send(1, 0, need(ours));
    assert!(!net.nodes[0].engine.snapshot_pending(&[3; 32]));
    assert_eq!(
        count(
            net.events(0),
            |e| matches!(e, Event::SnapshotReplicated { snapshot } if *snapshot == [3; 32])
        ),
        1
    );
}
