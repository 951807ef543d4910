//! Hostile nodes and the outsider.
//!
//! A hostile node runs the real engine; the simulator wraps it, rewriting what it sends
//! and what its disk answers, and adds messages of its own on a timer:
//! - `wrong_bytes`: a byte of every chunk it sends flips on the way out;
//! - `false_claims`: partners' chunks it is asked to store become garbage on its disk,
//!   while its engine acknowledges them and answers for them as if they were there;
//! - `forge_records`: gossips records signed by the wrong key, altered after signing, or
//!   certifying another site's node as its own, and heartbeats for nodes that are down;
//! - `replay_records`: gossips superseded versions of genuine records, and record
//!   messages it received, to other peers;
//! - `flood`: sends its peers junk: fetches, offers and pushes of unknown chunks,
//!   oversized gossip, sync digests and wants.
//!
//! The outsider is a machine of a site no one trusts that knows every node's address. It
//! connects with its own certificate or one forged in a trusted site's name, gossips,
//! pushes chunks (its own, or real ones it replays), fetches real chunks, and offers.
//! It also opens connections that never say hello (one at a time, or a flood of
//! `STRANGER_FLOOD` from its one address to one node), which admission must close at
//! the hello deadline or refuse past its bounds. With `partners_partner_of` it brings a
//! partner's partner: a site D that one scenario site C alone trusts, whose node says
//! hello to every node; C's nodes may admit it, no other site's may, and no record of a
//! site that does not trust D may reach it. These choices come from the outsider's own
//! generator, so the rest of a run draws what it drew before they existed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cairn_protocol::catalog::RecordKey;
use cairn_protocol::engine::message::Beat;
use cairn_protocol::engine::Message;
use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{NodeCert, Record, RecordKind, TrustGrant};
use cairn_protocol::rng::Rng;
use ed25519_dalek::SigningKey;

use super::admit::STRANGER_FLOOD;
use super::checks::record_hash;
use super::{hours_us, Ev, SimNode, SiteState, World, GIB};
use crate::scenario::{Behaviour, OutsiderSpec};

/// How often a forger or a replayer gossips its records.
const HOSTILE_GOSSIP_EVERY_US: u64 = 10 * 1_000_000;
const FLOOD_EVERY_US: u64 = 1_000_000;
/// Items in one junk list (offers, digests, wants).
const JUNK_ITEMS: usize = 64;
/// Record messages a replayer keeps to replay.
const CAPTURED_MAX: usize = 16;
const OUTSIDER_LATENCY_US: u64 = 30_000;

/// What a false claimer claims: chunks it acknowledged but keeps as garbage, since when,
/// and when an audit last named it.
#[derive(Clone, Debug, Default)]
pub struct Lies {
    pub outstanding: BTreeMap<ChunkId, u64>,
    pub caught_us: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct HostileState {
    pub behaviour: Behaviour,
    pub from_us: u64,
    pub until_us: u64,
    pub flood_per_sec: u64,
    captured: Vec<Message>,
}

pub struct Outsider {
    pub node: usize,
    pub site: usize,
    key: SigningKey,
    /// Its own node certificate, signed by its own (untrusted) site.
    own_cert: Record,
    /// A certificate in a trusted site's name, signed with the outsider's key.
    forged_cert: Record,
    until_us: u64,
    every_us: u64,
    /// Its own choices (strangers, floods, the partner's partner's hellos).
    rng: Rng,
    ip: IpAddr,
    pub partners_partner: Option<PartnersPartner>,
}

/// A site D that one scenario site alone trusts, with one machine (no engine: it only
/// says hello).
pub struct PartnersPartner {
    pub node: usize,
    pub site: usize,
    /// The one scenario site that trusts D.
    pub partner: usize,
    cert: Record,
}

impl World {
    /// Arms the scenario's hostile nodes and the outsider.
    pub(super) fn schedule_hostile(&mut self) {
        for spec in self.scenario.hostile.clone() {
            let site = self
                .scenario
                .site_index(&spec.site)
                .expect("checked at parse");
            let node = self.sites[site].nodes[spec.node];
            let from_us = hours_us(spec.from_hours);
            let until_us = spec.until_hours.map_or(self.heal_us, hours_us);
            self.nodes[node].hostile = Some(HostileState {
                behaviour: spec.behaviour,
                from_us,
                until_us,
                flood_per_sec: spec.flood_per_sec,
                captured: Vec::new(),
            });
            if spec.behaviour.destroys_data() {
                self.destructive.push((from_us, until_us, site));
            }
            if matches!(
                spec.behaviour,
                Behaviour::ForgeRecords | Behaviour::ReplayRecords | Behaviour::Flood
            ) {
                self.schedule(from_us, Ev::HostileTick(node));
            }
        }
        if let Some(spec) = self.scenario.outsider.clone() {
            self.add_outsider(&spec);
        }
    }

    /// A site of one machine that no one trusts (yet), from its key's secret and its
    /// node id: the outsider's, or a partner's partner's.
    fn add_lone_site(
        &mut self,
        name: &str,
        secret: [u8; 32],
        node_id: [u8; 32],
    ) -> (usize, usize, SigningKey, SiteId, NodeId) {
        let key = SigningKey::from_bytes(&secret);
        let site_id = SiteId(key.verifying_key().to_bytes());
        let node_id = NodeId(node_id);
        let site = self.sites.len();
        let node = self.nodes.len();
        self.sites.push(SiteState {
            name: name.into(),
            key: key.clone(),
            id: site_id,
            uplink_bytes_per_sec: 100e6 / 8.0,
            uplink_busy_until_us: 0,
            destroyed: false,
            nodes: vec![node],
            node_capacity_bytes: 1 << 40,
            outsider: true,
        });
        for row in &mut self.latency_us {
            row.push(OUTSIDER_LATENCY_US);
        }
        self.latency_us.push(vec![OUTSIDER_LATENCY_US; site + 1]);
        self.nodes.push(SimNode::new(site, node_id));
        self.node_index.insert(node_id, node);
        (site, node, key, site_id, node_id)
    }

    fn add_outsider(&mut self, spec: &OutsiderSpec) {
        let from_us = hours_us(spec.from_hours);
        let until_us = spec.until_hours.map_or(self.heal_us, hours_us);
        let every_us = (spec.every_secs * 1e6) as u64;
        let mut secret = [0u8; 32];
        self.rng.fill(&mut secret);
        let mut node_id = [0u8; 32];
        self.rng.fill(&mut node_id);
        let (site, node, key, site_id, node_id) = self.add_lone_site("outsider", secret, node_id);
        let cert = |site: SiteId| NodeCert {
            node: node_id,
            site,
            name: "outsider".into(),
            addresses: Vec::new(),
            capacity_bytes: 1 << 40,
        };
        let own_cert = Record::sign(
            &key,
            RecordKind::NodeCert,
            node_id.0,
            1,
            cert(site_id).encode(),
        );
        let victim = self.sites[0].id;
        let mut forged_cert = Record::sign(
            &key,
            RecordKind::NodeCert,
            node_id.0,
            1,
            cert(victim).encode(),
        );
        forged_cert.author = victim;
        let own_seed = u64::from_le_bytes(node_id.0[..8].try_into().expect("8 bytes"));
        let ip = self.ip_of(node);
        let partners_partner = spec.partners_partner_of.as_ref().map(|partner| {
            let partner = self.scenario.site_index(partner).expect("checked at parse");
            self.add_partners_partner(partner, own_seed)
        });
        self.outsider = Some(Outsider {
            node,
            site,
            key,
            own_cert,
            forged_cert,
            until_us,
            every_us: every_us.max(100_000),
            rng: Rng::new(own_seed),
            ip,
            partners_partner,
        });
        self.schedule(from_us, Ev::OutsiderTick);
    }

    /// Site D, trusted by `partner` alone (its grant handed to the partner's nodes as
    /// `cairn trust` would), with one machine.
    fn add_partners_partner(&mut self, partner: usize, seed: u64) -> PartnersPartner {
        let mut rng = Rng::new(seed ^ 0x5050);
        let mut secret = [0u8; 32];
        rng.fill(&mut secret);
        let mut node_id = [0u8; 32];
        rng.fill(&mut node_id);
        let (site, node, key, site_id, node_id) =
            self.add_lone_site("partners-partner", secret, node_id);
        let body = NodeCert {
            node: node_id,
            site: site_id,
            name: "partners-partner".into(),
            addresses: Vec::new(),
            capacity_bytes: 1 << 40,
        }
        .encode();
        let cert = Record::sign(&key, RecordKind::NodeCert, node_id.0, 1, body);
        self.genuine.insert(record_hash(&cert));
        let quota = (self.scenario.quota_gib * GIB) as u64;
        let grant = self.sign_grant(partner, site, quota, false);
        self.hand_to_site(partner, grant);
        PartnersPartner {
            node,
            site,
            partner,
            cert,
        }
    }

    /// Whether `node` is the partner's partner's machine.
    pub fn is_partners_partner(&self, node: usize) -> bool {
        self.outsider
            .as_ref()
            .and_then(|o| o.partners_partner.as_ref())
            .is_some_and(|p| p.node == node)
    }

    pub fn is_outsider(&self, node: usize) -> bool {
        self.outsider.as_ref().is_some_and(|o| o.node == node)
    }

    /// The node's hostile behaviour, if it is misbehaving now.
    pub fn hostile_now(&self, node: usize) -> Option<Behaviour> {
        let state = self.nodes[node].hostile.as_ref()?;
        (state.from_us <= self.now_us && self.now_us < state.until_us && !self.healed)
            .then_some(state.behaviour)
    }

    /// The heal will retire the node: its behaviour destroyed data, so its disk is wiped
    /// and it never starts again (`World::heal`).
    pub fn retired_at_heal(&self, node: usize) -> bool {
        !self.healed
            && self.nodes[node]
                .hostile
                .as_ref()
                .is_some_and(|state| state.behaviour.destroys_data())
    }

    /// The node keeps garbage for partners' chunks now, and sends it as if it were good.
    pub(super) fn lies_now(&self, node: usize) -> bool {
        self.hostile_now(node) == Some(Behaviour::FalseClaims)
    }

    /// The certificate a connecting node presents in the transport's handshake.
    pub(super) fn presented_cert(&mut self, from: usize) -> Option<Record> {
        if let Some(pp) = self
            .outsider
            .as_ref()
            .and_then(|o| o.partners_partner.as_ref())
            .filter(|p| p.node == from)
        {
            return Some(pp.cert.clone());
        }
        if let Some(outsider) = self.outsider.as_ref().filter(|o| o.node == from) {
            let forged = self.rng.chance(0.5);
            return Some(if forged {
                outsider.forged_cert.clone()
            } else {
                outsider.own_cert.clone()
            });
        }
        let key = RecordKey {
            author: self.sites[self.nodes[from].site].id,
            kind: RecordKind::NodeCert,
            key: self.nodes[from].id.0,
        };
        self.truth.get(&key).cloned()
    }

    /// A replayer keeps record messages it receives, to send them on later. Only genuine
    /// ones: relaying a forger's records would make it a forger too.
    pub(super) fn capture(&mut self, to: usize, message: &Message) {
        let Message::Records { records } = message else {
            return;
        };
        if self.hostile_now(to) != Some(Behaviour::ReplayRecords)
            || !records
                .iter()
                .all(|r| self.genuine.contains(&record_hash(r)))
        {
            return;
        }
        let state = self.nodes[to].hostile.as_mut().expect("hostile now");
        if state.captured.len() < CAPTURED_MAX {
            state.captured.push(message.clone());
        }
    }

    /// What a write puts on the disk: the bytes, or garbage for a false claimer.
    pub(super) fn stored_body(
        &mut self,
        node: usize,
        owner: SiteId,
        id: ChunkId,
        sealed: Vec<u8>,
    ) -> Vec<u8> {
        let own = self.sites[self.nodes[node].site].id;
        if owner == own || !self.lies_now(node) {
            return sealed;
        }
        self.coverage.false_claims_made += 1;
        self.liars
            .entry(node)
            .or_default()
            .outstanding
            .insert(id, self.now_us);
        let mut garbage = vec![0u8; sealed.len().max(1)];
        self.rng.fill(&mut garbage);
        garbage
    }

    /// A wrong-bytes node's chunks leave with one byte flipped; a false claimer answers
    /// audits of chunks it does not have with a made-up proof.
    pub(super) fn rewrite_outgoing(&mut self, node: usize, message: Message) -> Message {
        match self.hostile_now(node) {
            Some(Behaviour::WrongBytes) => self.flip_chunk_bytes(message),
            Some(Behaviour::FalseClaims) => match message {
                Message::AuditReply {
                    owner,
                    id,
                    nonce,
                    proof: None,
                } => {
                    let mut proof = [0u8; 32];
                    self.rng.fill(&mut proof);
                    Message::AuditReply {
                        owner,
                        id,
                        nonce,
                        proof: Some(proof),
                    }
                }
                other => other,
            },
            _ => message,
        }
    }

    fn flip_chunk_bytes(&mut self, message: Message) -> Message {
        match message {
            Message::Push {
                owner,
                id,
                size_bytes,
                mut sealed,
            } => {
                self.flip_byte(&mut sealed);
                Message::Push {
                    owner,
                    id,
                    size_bytes,
                    sealed,
                }
            }
            Message::FetchReply {
                owner,
                id,
                sealed: Some(mut sealed),
            } => {
                self.flip_byte(&mut sealed);
                Message::FetchReply {
                    owner,
                    id,
                    sealed: Some(sealed),
                }
            }
            other => other,
        }
    }

    fn flip_byte(&mut self, bytes: &mut [u8]) {
        if bytes.is_empty() {
            return;
        }
        let at = self.rng.below(bytes.len() as u64) as usize;
        bytes[at] ^= 1 << self.rng.below(8);
        self.coverage.wrong_bytes_sent += 1;
    }

    /// A random live node of a trusted site other than `not`.
    fn random_honest_node(&mut self, not: usize) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|n| *n != not && self.nodes[*n].engine.is_some() && !self.is_outsider(*n))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[self.rng.below(candidates.len() as u64) as usize])
    }

    fn random_site_id(&mut self) -> SiteId {
        let n = self.scenario.sites.len() as u64;
        self.sites[self.rng.below(n) as usize].id
    }

    fn random_chunk_id(&mut self) -> ChunkId {
        let mut id = [0u8; 32];
        self.rng.fill(&mut id);
        ChunkId(id)
    }

    /// A chunk that really exists, with its true bytes (what a sniffer could replay).
    fn random_real_chunk(&mut self) -> Option<(ChunkId, Vec<u8>)> {
        if self.bodies.is_empty() {
            return None;
        }
        let at = self.rng.below(self.bodies.len() as u64) as usize;
        self.bodies.iter().nth(at).map(|(id, b)| (*id, b.clone()))
    }

    pub(super) fn hostile_tick(&mut self, node: usize) {
        let Some(state) = self.nodes[node].hostile.clone() else {
            return;
        };
        if self.healed || self.now_us >= state.until_us {
            return;
        }
        let every_us = if state.behaviour == Behaviour::Flood {
            FLOOD_EVERY_US
        } else {
            HOSTILE_GOSSIP_EVERY_US
        };
        self.schedule(self.now_us + every_us, Ev::HostileTick(node));
        if self.nodes[node].engine.is_none() {
            return; // down: a crashed hostile node sends nothing either
        }
        match state.behaviour {
            Behaviour::ForgeRecords => self.send_forgery(node),
            Behaviour::ReplayRecords => self.send_replay(node, &state),
            Behaviour::Flood => {
                for _ in 0..state.flood_per_sec {
                    self.send_junk(node);
                }
            }
            Behaviour::WrongBytes | Behaviour::FalseClaims => {}
        }
    }

    fn send_forgery(&mut self, node: usize) {
        let Some(to) = self.random_honest_node(node) else {
            return;
        };
        let own_site = self.nodes[node].site;
        let key = self.sites[own_site].key.clone();
        let victim_site =
            (own_site + 1 + self.rng.below(self.scenario.sites.len() as u64 - 1) as usize)
                % self.scenario.sites.len();
        let victim = self.sites[victim_site].id;
        self.coverage.forgeries_sent += 1;
        let message = match self.rng.below(5) {
            // A grant in the victim's name, altered after signing.
            0 => {
                let Some(mut record) = self
                    .truth
                    .by_author(victim)
                    .find(|r| r.kind == RecordKind::TrustGrant)
                    .cloned()
                else {
                    return;
                };
                if let Ok(mut grant) = TrustGrant::decode(&record.body) {
                    grant.revoked = !grant.revoked;
                    record.body = grant.encode();
                }
                record.version += 1;
                Message::Records {
                    records: vec![record],
                }
            }
            // The victim granting this site a petabyte, signed with this site's key.
            1 => {
                let own = self.sites[own_site].id;
                let body = TrustGrant {
                    grantee: own,
                    quota_bytes: 1 << 50,
                    revoked: false,
                }
                .encode();
                let mut record = Record::sign(&key, RecordKind::TrustGrant, own.0, 1 << 40, body);
                record.author = victim;
                Message::Records {
                    records: vec![record],
                }
            }
            // One of the victim's nodes certified as this site's own: a genuine signature,
            // a false claim.
            2 => {
                let victim_node = self.sites[victim_site].nodes[0];
                let cert = NodeCert {
                    node: self.nodes[victim_node].id,
                    site: self.sites[own_site].id,
                    name: "stolen".into(),
                    addresses: Vec::new(),
                    capacity_bytes: 1 << 40,
                };
                let record = Record::sign(
                    &key,
                    RecordKind::NodeCert,
                    cert.node.0,
                    1 << 40,
                    cert.encode(),
                );
                self.genuine.insert(record_hash(&record));
                Message::Records {
                    records: vec![record],
                }
            }
            // Heartbeats for nodes that are down, so they look alive.
            3 => {
                let now_ms = self.now_us / 1000;
                let beats: Vec<Beat> = self
                    .nodes
                    .iter()
                    .filter(|n| n.engine.is_none())
                    .take(8)
                    .map(|n| Beat {
                        node_prefix: Beat::prefix_of(&n.id),
                        beat_ms: now_ms,
                    })
                    .collect();
                Message::Gossip {
                    beats,
                    digests: Vec::new(),
                    reply: false,
                }
            }
            // A genuine record of the victim's under a huge version.
            _ => {
                let Some(mut record) = self.truth.by_author(victim).next().cloned() else {
                    return;
                };
                record.version = u64::MAX;
                Message::Records {
                    records: vec![record],
                }
            }
        };
        self.send(node, self.nodes[to].id, message);
    }

    fn send_replay(&mut self, node: usize, state: &HostileState) {
        let Some(to) = self.random_honest_node(node) else {
            return;
        };
        self.coverage.replays_sent += 1;
        let message = match self.rng.below(3) {
            0 if !self.superseded.is_empty() => {
                let at = self.rng.below(self.superseded.len() as u64) as usize;
                Message::Records {
                    records: vec![self.superseded[at].clone()],
                }
            }
            1 if !state.captured.is_empty() => {
                let at = self.rng.below(state.captured.len() as u64) as usize;
                state.captured[at].clone()
            }
            _ => {
                let n = self.truth.len() as u64;
                if n == 0 {
                    return;
                }
                let at = self.rng.below(n) as usize;
                let Some(record) = self.truth.records().nth(at).cloned() else {
                    return;
                };
                Message::Records {
                    records: vec![record],
                }
            }
        };
        self.send(node, self.nodes[to].id, message);
    }

    fn send_junk(&mut self, node: usize) {
        let Some(to) = self.random_honest_node(node) else {
            return;
        };
        let own = self.sites[self.nodes[node].site].id;
        let message = match self.rng.below(6) {
            0 => Message::Fetch {
                owner: self.random_site_id(),
                id: self.random_chunk_id(),
            },
            1 => Message::Offer {
                owner: own,
                ids: (0..JUNK_ITEMS).map(|_| self.random_chunk_id()).collect(),
            },
            2 => {
                let mut sealed = vec![0u8; 80];
                self.rng.fill(&mut sealed);
                Message::Push {
                    owner: own,
                    id: self.random_chunk_id(),
                    size_bytes: 256 << 10,
                    sealed,
                }
            }
            3 => Message::Gossip {
                beats: (0..8)
                    .map(|_| Beat {
                        node_prefix: self.random_chunk_id().0[..8].try_into().expect("8 bytes"),
                        beat_ms: self.rng.next_u64() >> 20,
                    })
                    .collect(),
                digests: (0..JUNK_ITEMS)
                    .map(|_| (self.random_site_id(), self.rng.next_u64()))
                    .collect(),
                reply: false,
            },
            4 => Message::SyncDigest {
                owner: self.random_site_id(),
                digests: (0..64).map(|_| self.rng.next_u64()).collect(),
            },
            _ => Message::Want {
                author: self.random_site_id(),
                keys: (0..JUNK_ITEMS)
                    .map(|_| (RecordKind::NodeCert, self.random_chunk_id().0))
                    .collect(),
            },
        };
        self.coverage.flood_messages += 1;
        self.send(node, self.nodes[to].id, message);
    }

    pub(super) fn outsider_tick(&mut self) {
        let Some(outsider) = self.outsider.as_ref() else {
            return;
        };
        let (node, until_us, every_us) = (outsider.node, outsider.until_us, outsider.every_us);
        if self.healed || self.now_us >= until_us {
            return;
        }
        self.schedule(self.now_us + every_us, Ev::OutsiderTick);
        let Some(to) = self.random_honest_node(node) else {
            return;
        };
        self.outsider_connections();
        let own_site = self.outsider.as_ref().expect("checked").site;
        let own = self.sites[own_site].id;
        let victim = self.random_site_id();
        self.coverage.outsider_attempts += 1;
        let message = match self.rng.below(6) {
            0 => Message::Gossip {
                beats: vec![Beat {
                    node_prefix: Beat::prefix_of(&self.nodes[node].id),
                    beat_ms: self.now_us / 1000,
                }],
                digests: vec![(own, 1), (victim, self.rng.next_u64())],
                reply: false,
            },
            1 => {
                let outsider = self.outsider.as_ref().expect("checked");
                let key = outsider.key.clone();
                let grant = |grantee: SiteId| {
                    TrustGrant {
                        grantee,
                        quota_bytes: 1 << 40,
                        revoked: false,
                    }
                    .encode()
                };
                let own_grant =
                    Record::sign(&key, RecordKind::TrustGrant, victim.0, 1, grant(victim));
                let mut forged_grant =
                    Record::sign(&key, RecordKind::TrustGrant, own.0, 1, grant(own));
                forged_grant.author = victim;
                Message::Records {
                    records: vec![outsider.own_cert.clone(), own_grant, forged_grant],
                }
            }
            2 => {
                let Some((id, sealed)) = self.random_real_chunk() else {
                    return;
                };
                let size_bytes = self.chunk_sizes.get(&id).copied().unwrap_or(1 << 18);
                Message::Push {
                    owner: victim,
                    id,
                    size_bytes,
                    sealed,
                }
            }
            3 => {
                let mut sealed = vec![0u8; 80];
                self.rng.fill(&mut sealed);
                Message::Push {
                    owner: own,
                    id: self.random_chunk_id(),
                    size_bytes: 256 << 10,
                    sealed,
                }
            }
            4 => {
                let Some((id, _)) = self.random_real_chunk() else {
                    return;
                };
                Message::Fetch { owner: victim, id }
            }
            _ => {
                let Some((id, _)) = self.random_real_chunk() else {
                    return;
                };
                Message::Offer {
                    owner: victim,
                    ids: vec![id],
                }
            }
        };
        self.send(node, self.nodes[to].id, message);
    }

    /// The outsider's connections that prove nothing: a silent stranger now and then, a
    /// flood of them from its one address, and the partner's partner's hello.
    fn outsider_connections(&mut self) {
        let targets: Vec<usize> = (0..self.nodes.len())
            .filter(|n| {
                self.nodes[*n].engine.is_some()
                    && !self.is_outsider(*n)
                    && !self.is_partners_partner(*n)
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        let outsider = self.outsider.as_mut().expect("ticking");
        let kind = outsider.rng.below(8);
        let to = targets[outsider.rng.below(targets.len() as u64) as usize];
        let hello_to = targets[outsider.rng.below(targets.len() as u64) as usize];
        let ip = outsider.ip;
        let pp = outsider.partners_partner.as_ref().map(|p| p.node);
        match kind {
            0 | 1 => self.open_stranger(to, ip),
            2 => {
                for _ in 0..STRANGER_FLOOD {
                    self.open_stranger(to, ip);
                }
            }
            _ => {}
        }
        if let Some(pp) = pp {
            self.partners_partner_hello(hello_to, pp);
        }
    }

    /// The partner's partner says hello to `to` (a new connection, unless it holds one).
    fn partners_partner_hello(&mut self, to: usize, pp: usize) {
        if self.nodes[to].connected.contains_key(&pp)
            || self.nodes[to].admission.is_blocked(&pp, self.now_us / 1000)
        {
            return;
        }
        if self.handshake(to, pp) {
            self.coverage.partners_partner_admitted += 1;
        } else {
            self.coverage.partners_partner_refused += 1;
        }
    }
}
