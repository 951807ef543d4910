//! Invariants checked as things happen, at the point where the simulator sees them:
//! - quotas and revocations, on every chunk stored (invariant 5);
//! - a corrupted copy is never served as good: an honest node never sends a chunk whose
//!   bytes are wrong, and never stores one it received (invariant 6);
//! - nothing from the outsider or a revoked site is accepted: no record it signed, no
//!   chunk it sent, no message sent back to it (invariant 8);
//! - every record a node saves was really signed by its author, and never replaces a
//!   newer version of itself (invariant 9: forged and replayed records are refused, and an
//!   old disk's catalog does not bring back older grants);
//! - every peer is attributed to the site that really certified it (invariant 10);
//! - admission holds: no connection that never said hello stays open past the hello
//!   deadline, and no node holds more of them than its bounds (per remote address, and
//!   pending in all) allow;
//! - the partner's partner (a site D trusted by one scenario site only) gets nothing from
//!   a site that does not trust it: no message, no record of such a site, no place in
//!   its peer table (part of invariant 8).

use cairn_protocol::catalog::RecordKey;
use cairn_protocol::engine::{AuditFailure, ChunkRef, Event, Message};
use cairn_protocol::identity::NodeId;
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{Record, RecordKind};

use super::{message_type, World, GRANT_PROPAGATION_US, HOUR_US};

/// How soon some honest node's audit must name a node that claims a chunk it does not
/// hold (invariant 7).
pub const LIE_CAUGHT_WITHIN_US: u64 = 24 * super::HOUR_US;

/// The hash under which a genuine record is remembered.
pub fn record_hash(record: &Record) -> [u8; 32] {
    *blake3::hash(&record.encode()).as_bytes()
}

impl World {
    /// Whether `node`'s site changed its grant to `owner` lately, or `node` itself has
    /// just restarted: either way it may act on the older grant for a while.
    fn within_grant_grace(&self, node: usize, owner_site: Option<usize>) -> bool {
        let site = self.nodes[node].site;
        let restarted = self.now_us < self.nodes[node].started_us + GRANT_PROPAGATION_US;
        let changed = owner_site.is_some_and(|owner| {
            self.grant_changed_at
                .get(&(site, self.sites[owner].id))
                .is_some_and(|at| self.now_us < at + GRANT_PROPAGATION_US)
        });
        restarted || changed
    }

    /// `by` revoked `of` more than the propagation grace ago.
    fn revoked_settled(&self, by: usize, of: usize) -> bool {
        self.revoked_at
            .get(&(by, of))
            .is_some_and(|at| self.now_us >= at + GRANT_PROPAGATION_US)
    }

    pub(super) fn check_event(&mut self, node: usize, event: &Event) {
        match event {
            Event::ChunkStored { chunk, from } => {
                self.check_quota(node, chunk);
                self.check_chunk_source(node, from);
            }
            Event::ChunkLost { id } => {
                self.coverage.chunks_lost_noticed += 1;
                if let Some(lies) = self.liars.get_mut(&node) {
                    lies.outstanding.remove(id);
                }
            }
            Event::AuditFailed {
                failure: AuditFailure::Unreachable,
                ..
            } => self.coverage.audits_unreachable += 1,
            Event::AuditFailed {
                node: held_by, id, ..
            } => {
                self.coverage.audits_failed += 1;
                if self.hostile_now(node).is_some() {
                    return; // a hostile auditor's verdicts prove nothing
                }
                let below_r = self
                    .copies
                    .get(id)
                    .is_none_or(|n| (*n as usize) < self.scenario.replication_factor);
                if below_r || self.pushes_in_flight.contains_key(id) {
                    self.coverage.audit_failed_mid_repair += 1;
                }
                let liar = self.node_index.get(held_by).copied();
                if let Some(lies) = liar.and_then(|n| self.liars.get_mut(&n)) {
                    let caught_us = lies.caught_us.unwrap_or(0);
                    if let Some(since) = lies.outstanding.values().filter(|s| **s > caught_us).min()
                    {
                        self.coverage.lies_caught += 1;
                        let delay_s = (self.now_us - since) / 1_000_000;
                        self.coverage.lie_caught_after_secs_max =
                            self.coverage.lie_caught_after_secs_max.max(delay_s);
                    }
                    lies.caught_us = Some(self.now_us);
                }
            }
            Event::PeerCutOff { until_ms, .. } => {
                self.coverage.peers_cut_off += 1;
                self.penalty_until(*until_ms);
            }
            Event::HolderExcluded { until_ms, .. } => {
                self.coverage.holders_excluded += 1;
                self.penalty_until(*until_ms);
            }
            Event::Collected { id, .. } => {
                self.coverage.gc_collected += 1;
                self.check_gc_deletion(node, id, "collected on its owner's word");
            }
            // Invariant 13: a forgotten snapshot is never acknowledged once the engine
            // holds its tombstone (a live record replacing the tombstone is invariant 9).
            Event::SnapshotReplicated { snapshot } => {
                let engine = self.nodes[node]
                    .engine
                    .as_ref()
                    .expect("an engine reported it");
                let key = RecordKey {
                    author: engine.site(),
                    kind: RecordKind::Snapshot,
                    key: *snapshot,
                };
                if engine.catalog().get(&key).is_some_and(Record::is_tombstone) {
                    self.add_violation(format!(
                        "invariant 13: node {node} acknowledged a snapshot its site forgot"
                    ));
                }
            }
            Event::MessageDropped { .. } => self.coverage.messages_dropped += 1,
            Event::RecordRejected { .. } => self.coverage.records_rejected += 1,
            Event::MessageRefused { from }
                if self
                    .node_index
                    .get(from)
                    .is_some_and(|n| self.is_outsider(*n)) =>
            {
                self.coverage.outsider_messages_refused += 1;
            }
            _ => {}
        }
    }

    /// Invariant 11: a chunk of a kept, acknowledged snapshot that garbage collection
    /// deleted (at a holder, or swept at an owner) must still have good copies at R
    /// distinct sites, on disks that exist.
    pub fn check_gc_deletion(&mut self, node: usize, id: &ChunkId, how: &str) {
        if !self.acked_chunks.contains_key(id) {
            return;
        }
        let sites: std::collections::BTreeSet<usize> = self
            .nodes
            .iter()
            .filter(|n| n.disk.chunks.get(id).is_some_and(|c| c.good))
            .map(|n| n.site)
            .collect();
        let r = self.scenario.replication_factor;
        if sites.len() < r {
            self.add_violation(format!(
                "invariant 11: node {node} deleted chunk {id:?} of a kept, acknowledged snapshot ({how}), leaving good copies at {} sites (R = {r}) at {:.2} h",
                sites.len(),
                self.now_us as f64 / HOUR_US as f64
            ));
        }
    }

    fn penalty_until(&mut self, until_ms: u64) {
        if !self.healed {
            self.penalties_until_us = self.penalties_until_us.max(until_ms * 1000);
        }
    }

    /// Invariant 5 as the writes happen: a site never holds more for an owner than it
    /// grants, and nothing for an owner it revoked.
    fn check_quota(&mut self, node: usize, chunk: &ChunkRef) {
        let site = self.nodes[node].site;
        let site_id = self.sites[site].id;
        if chunk.owner == site_id || self.within_grant_grace(node, self.site_of(&chunk.owner)) {
            return;
        }
        let grant = self.truth.grant(site_id, chunk.owner);
        let held = self
            .site_held
            .get(&(site, chunk.owner))
            .copied()
            .unwrap_or(0);
        let name = &self.sites[site].name;
        let violation = match grant {
            None => Some(format!(
                "invariant 5: site {name} stored a chunk for a site it never trusted"
            )),
            Some(g) if g.revoked => Some(format!(
                "invariant 5: site {name} stored a chunk for a site it revoked"
            )),
            Some(g) if held > g.quota_bytes => Some(format!(
                "invariant 5: site {name} holds {held} bytes for a partner, over its quota of {}",
                g.quota_bytes
            )),
            Some(_) => None,
        };
        if let Some(text) = violation {
            self.add_violation(text);
        }
    }

    /// Invariant 8: a chunk stored from the outsider, or from a site this one revoked.
    fn check_chunk_source(&mut self, node: usize, from: &NodeId) {
        let Some(&sender) = self.node_index.get(from) else {
            return;
        };
        let (site, from_site) = (self.nodes[node].site, self.nodes[sender].site);
        if self.is_outsider(sender) {
            self.add_violation(format!(
                "invariant 8: a node of site {} stored a chunk the outsider sent",
                self.sites[site].name
            ));
        } else if self.revoked_settled(site, from_site) && !self.within_grant_grace(node, None) {
            self.add_violation(format!(
                "invariant 8: site {} stored a chunk sent by site {}, which it revoked",
                self.sites[site].name, self.sites[from_site].name
            ));
        }
    }

    /// Invariant 6, at the receiving end: an honest node stores only true bytes. (A node
    /// making false claims stores garbage on purpose.)
    pub(super) fn check_write(&mut self, node: usize, id: &ChunkId, good: bool) {
        if good || !self.bodies.contains_key(id) || self.lies_now(node) {
            return;
        }
        self.add_violation(format!(
            "invariant 6: node {node} of site {} stored a corrupted copy of chunk {id:?}",
            self.sites[self.nodes[node].site].name
        ));
    }

    /// Admission: a stranger's connection (one that never says hello) is closed by its
    /// hello deadline. Checked when the deadline has passed.
    pub fn check_stranger(&mut self, node: usize, conn: u64) {
        let Some(stranger) = self.strangers.get(&(node, conn)) else {
            return;
        };
        let deadline_us = self.nodes[node].admission.config().hello_deadline_ms * 1000;
        if self.now_us > stranger.opened_us + deadline_us {
            let open_s = (self.now_us - stranger.opened_us) as f64 / 1e6;
            self.add_violation(format!(
                "admission: node {node} of site {} kept a connection that never said hello open for {open_s:.1} s, past the hello deadline of {} s",
                self.sites[self.nodes[node].site].name,
                deadline_us / 1_000_000
            ));
        }
    }

    /// Admission: a node holds no more connections that never said hello than its
    /// bounds allow, from one address or in all.
    pub fn check_admission_bounds(&mut self, node: usize) {
        let config = self.nodes[node].admission.config().clone();
        let mut per_ip: std::collections::BTreeMap<std::net::IpAddr, usize> = Default::default();
        let mut n_open = 0;
        for ((at, _), stranger) in &self.strangers {
            if *at == node {
                *per_ip.entry(stranger.ip).or_default() += 1;
                n_open += 1;
            }
        }
        let name = self.sites[self.nodes[node].site].name.clone();
        if let Some((ip, n)) = per_ip
            .iter()
            .find(|(_, n)| **n > config.connections_per_address_max)
        {
            self.add_violation(format!(
                "admission: node {node} of site {name} holds {n} connections from {ip} that never said hello, over the bound of {}",
                config.connections_per_address_max
            ));
        }
        if n_open > config.pending_max {
            self.add_violation(format!(
                "admission: node {node} of site {name} holds {n_open} connections that never said hello, over the bound of {}",
                config.pending_max
            ));
        }
    }

    /// Whether `site` grants the partner's partner (D) trust now.
    fn trusts_partners_partner(&self, site: usize) -> bool {
        let Some(pp) = self
            .outsider
            .as_ref()
            .and_then(|o| o.partners_partner.as_ref())
        else {
            return true;
        };
        self.truth
            .grant(self.sites[site].id, self.sites[pp.site].id)
            .is_some_and(|g| !g.revoked)
    }

    /// Invariant 8 for the partner's partner: nothing goes to it from a site that does
    /// not trust it, and no record of such a site goes to it from anyone.
    fn check_to_partners_partner(&mut self, from: usize, message: &Message) {
        let from_site = self.nodes[from].site;
        let name = self.sites[from_site].name.clone();
        if !self.trusts_partners_partner(from_site) {
            self.add_violation(format!(
                "invariant 8: node {from} of site {name} sent a {} message to the partner's partner, a site it never trusted",
                message_type(message)
            ));
        }
        if let Message::Records { records } = message {
            let leaked: Vec<String> = records
                .iter()
                .filter_map(|r| self.site_of(&r.author))
                .filter(|author| !self.sites[*author].outsider)
                .filter(|author| !self.trusts_partners_partner(*author))
                .map(|author| self.sites[author].name.clone())
                .collect();
            for author in leaked {
                self.add_violation(format!(
                    "invariant 8: node {from} of site {name} sent a record of site {author} to the partner's partner, which {author} never trusted"
                ));
            }
        }
    }

    /// Invariants 6 and 8 at the sending end, for what an engine asked to send.
    pub(super) fn check_outgoing(&mut self, from: usize, to: &NodeId, message: &Message) {
        if self
            .node_index
            .get(to)
            .is_some_and(|n| self.is_partners_partner(*n))
        {
            self.check_to_partners_partner(from, message);
        }
        if self
            .node_index
            .get(to)
            .is_some_and(|n| self.is_outsider(*n))
        {
            self.add_violation(format!(
                "invariant 8: node {from} of site {} sent a {} message to the outsider",
                self.sites[self.nodes[from].site].name,
                message_type(message)
            ));
        }
        let (id, body, what) = match message {
            Message::Push { id, sealed, .. } => (id, sealed, "pushed"),
            Message::FetchReply {
                id,
                sealed: Some(sealed),
                ..
            } => (id, sealed, "served"),
            _ => return,
        };
        if self.lies_now(from) || !self.bodies.contains_key(id) || self.is_good(id, body) {
            return;
        }
        self.add_violation(format!(
            "invariant 6: node {from} of site {} {what} a corrupted copy of chunk {id:?} as good",
            self.sites[self.nodes[from].site].name
        ));
    }

    /// Invariants 8 and 9 for a record a node is about to persist.
    pub(super) fn check_saved_record(&mut self, node: usize, record: &Record) {
        let site = self.nodes[node].site;
        let name = self.sites[site].name.clone();
        if !self.genuine.contains(&record_hash(record)) {
            self.add_violation(format!(
                "invariant 9: node {node} of site {name} accepted a forged {:?} record",
                record.kind
            ));
        }
        let author = self.site_of(&record.author);
        if let Some(outsider) = &self.outsider {
            let about_outsider =
                record.kind == RecordKind::NodeCert && record.key == self.nodes[outsider.node].id.0;
            if author == Some(outsider.site) || about_outsider {
                self.add_violation(format!(
                    "invariant 8: node {node} of site {name} accepted a record of the outsider"
                ));
            }
        }
        if let Some(author) = author {
            if self.revoked_settled(site, author) && !self.within_grant_grace(node, None) {
                self.add_violation(format!(
                    "invariant 8: node {node} of site {name} accepted a record of site {}, which it revoked",
                    self.sites[author].name
                ));
            }
        }
        let key = RecordKey::of(record);
        if let Some(held) = self.nodes[node].disk.records.get(&key) {
            if held.version > record.version {
                self.add_violation(format!(
                    "invariant 9: node {node} of site {name} replaced version {} of a {:?} record with the older version {}",
                    held.version, record.kind, record.version
                ));
            }
        }
    }

    /// Invariant 7 for false claimers: a node that claims a chunk it does not hold is
    /// named by a failed audit within `lie_caught_within_us` of the claim. Checked hourly
    /// and at the heal.
    pub fn check_lies(&mut self) {
        let bound_us = self.lie_caught_within_us();
        let mut late = Vec::new();
        for (node, lies) in &self.liars {
            let caught_us = lies.caught_us.unwrap_or(0);
            let oldest = lies
                .outstanding
                .values()
                .filter(|since| **since > caught_us)
                .min();
            if let Some(since) = oldest {
                if self.now_us > since + bound_us {
                    late.push((*node, *since));
                }
            }
        }
        for (node, since) in late {
            self.add_violation(format!(
                "invariant 7: node {node} of site {} has claimed a chunk it does not hold since {:.2} h, and no audit named it within {:.1} h",
                self.sites[self.nodes[node].site].name,
                since as f64 / super::HOUR_US as f64,
                bound_us as f64 / super::HOUR_US as f64
            ));
        }
    }

    /// The stated time within which audits catch a holder that lies. Every node audits
    /// one co-holder of one of its chunks per round, picking the chunk evenly among all
    /// it holds, so a liar that lies about a few recent chunks among many honest old
    /// ones is named only when a round lands on one of them: hours, not rounds (the
    /// swarm reports the longest it took as `lie_caught_after_secs_max`).
    pub fn lie_caught_within_us(&self) -> u64 {
        LIE_CAUGHT_WITHIN_US
    }

    /// Invariant 10: every live engine attributes each peer that has connected to it to
    /// the site that really certified it. Checked hourly and at the end.
    pub fn check_peer_sites(&mut self) {
        let mut wrong = Vec::new();
        for (idx, node) in self.nodes.iter().enumerate() {
            let Some(engine) = node.engine.as_ref() else {
                continue;
            };
            for (peer, site, _) in engine.peers() {
                let Some(&peer_idx) = self.node_index.get(&peer) else {
                    continue;
                };
                let real = self.sites[self.nodes[peer_idx].site].id;
                // Before a peer connects to this process the engine knows it only from
                // the catalog, where another trusted site may certify the same node id
                // as its own (a genuine signature on a false claim); the certificate the
                // peer presents at its connection settles it.
                let connected =
                    node.connected.get(&peer_idx) == Some(&self.nodes[peer_idx].incarnation);
                let untrusted_pp =
                    self.is_partners_partner(peer_idx) && !self.trusts_partners_partner(node.site);
                if (real != site && connected) || self.is_outsider(peer_idx) || untrusted_pp {
                    wrong.push((idx, peer_idx, site));
                }
            }
        }
        for (idx, peer_idx, site) in wrong {
            if self.is_outsider(peer_idx) {
                self.add_violation(format!(
                    "invariant 8: node {idx} has the outsider in its peer table"
                ));
                continue;
            }
            if self.is_partners_partner(peer_idx) {
                self.add_violation(format!(
                    "invariant 8: node {idx} has the partner's partner in its peer table, a site its own never trusted"
                ));
                continue;
            }
            let claimed = self
                .site_of(&site)
                .map_or("an unknown site".to_string(), |s| {
                    self.sites[s].name.clone()
                });
            self.add_violation(format!(
                "invariant 10: node {idx} takes node {peer_idx} of site {} for a node of {claimed}",
                self.sites[self.nodes[peer_idx].site].name
            ));
        }
    }
}

/// Each check fires on the act it forbids. The runs themselves never do these things
/// (the engine refuses them), so the acts are fed to the checkers directly.
#[cfg(test)]
mod tests {
    use cairn_protocol::engine::Message;
    use cairn_protocol::record::{Record, RecordKind};

    use super::super::{World, HOUR_US};
    use super::LIE_CAUGHT_WITHIN_US;
    use crate::scenario::{OutsiderSpec, Scenario};
    use crate::world::hostile::Lies;

    /// Four offices with an outsider, run for two hours so chunks are stored.
    fn world() -> crate::run::Run {
        let mut scenario = Scenario::parse(crate::DEFAULT_SCENARIO).expect("built-in parses");
        scenario.faults.clear();
        for image in &mut scenario.images {
            image.size_gib = 0.02;
        }
        scenario.outsider = Some(OutsiderSpec {
            from_hours: 100.0,
            until_hours: None,
            every_secs: 60.0,
            partners_partner_of: Some("south".into()),
        });
        let mut run = crate::run::Run::new(scenario, 3);
        run.advance(2 * HOUR_US, 2 * HOUR_US);
        run
    }

    /// A node holding a good copy of some chunk, and that chunk.
    fn holder(world: &World) -> (usize, cairn_protocol::ids::ChunkId) {
        world
            .nodes
            .iter()
            .enumerate()
            .find_map(|(n, node)| {
                node.disk
                    .chunks
                    .iter()
                    .find(|(_, c)| c.good)
                    .map(|(id, _)| (n, *id))
            })
            .expect("chunks stored after two hours")
    }

    fn violations(world: &World, invariant: &str) -> usize {
        world
            .violations
            .iter()
            .filter(|v| v.starts_with(invariant))
            .count()
    }

    #[test]
    fn invariant_6_fires_on_a_corrupted_copy_sent_or_stored_as_good() {
        let mut run = world();
        let world = &mut run.world;
        assert_eq!(violations(world, "invariant 6"), 0);
        let (node, id) = holder(world);
        let owner = world.nodes[node].disk.chunks[&id].owner;
        let mut sealed = world.bodies[&id].clone();
        // A correct send is fine.
        let to = world.nodes[(node + 1) % world.nodes.len()].id;
        let push = |sealed: Vec<u8>| Message::Push {
            owner,
            id,
            size_bytes: 1,
            sealed,
        };
        world.check_outgoing(node, &to, &push(sealed.clone()));
        assert_eq!(violations(world, "invariant 6"), 0);
        sealed[0] ^= 1;
        world.check_outgoing(node, &to, &push(sealed));
        assert_eq!(
            violations(world, "invariant 6"),
            1,
            "{:?}",
            world.violations
        );
        world.check_write(node, &id, false);
        assert_eq!(
            violations(world, "invariant 6"),
            2,
            "{:?}",
            world.violations
        );
    }

    #[test]
    fn invariant_7_fires_when_no_audit_names_a_liar_in_time() {
        let mut run = world();
        let world = &mut run.world;
        let (node, id) = holder(world);
        let mut lies = Lies::default();
        lies.outstanding.insert(id, world.now_us);
        world.liars.insert(node, lies);
        world.check_lies();
        assert_eq!(violations(world, "invariant 7"), 0, "not late yet");
        world.now_us += LIE_CAUGHT_WITHIN_US + 1;
        world.check_lies();
        assert_eq!(
            violations(world, "invariant 7"),
            1,
            "{:?}",
            world.violations
        );
        // Named by an audit since the lie: no longer late.
        world.violations.clear();
        world.liars.get_mut(&node).expect("inserted").caught_us = Some(world.now_us);
        world.check_lies();
        assert_eq!(violations(world, "invariant 7"), 0);
    }

    #[test]
    fn invariant_8_fires_on_anything_accepted_from_the_outsider() {
        let mut run = world();
        let world = &mut run.world;
        let outsider = world.outsider.as_ref().expect("scenario has one").node;
        let (node, _) = holder(world);
        let outsider_id = world.nodes[outsider].id;
        world.check_chunk_source(node, &outsider_id);
        assert_eq!(
            violations(world, "invariant 8"),
            1,
            "{:?}",
            world.violations
        );
        world.check_outgoing(
            node,
            &outsider_id,
            &Message::Want {
                author: world.sites[0].id,
                keys: Vec::new(),
            },
        );
        assert_eq!(
            violations(world, "invariant 8"),
            2,
            "{:?}",
            world.violations
        );
        let key = world.sites[world.nodes[outsider].site].key.clone();
        let record = Record::sign(&key, RecordKind::TrustGrant, [1; 32], 1, Vec::new());
        world.check_saved_record(node, &record);
        assert_eq!(
            violations(world, "invariant 8"),
            3,
            "{:?}",
            world.violations
        );
    }

    #[test]
    fn admission_check_fires_on_a_stranger_kept_past_the_deadline_or_over_the_bound() {
        use crate::world::Stranger;
        let mut run = world();
        let world = &mut run.world;
        let (node, _) = holder(world);
        let ip = std::net::IpAddr::from([192, 0, 2, 1]);
        let now = world.now_us;
        world.strangers.insert(
            (node, 1 << 50),
            Stranger {
                peer: usize::MAX,
                ip,
                opened_us: now - 5_000_000,
            },
        );
        world.check_stranger(node, 1 << 50);
        assert_eq!(
            violations(world, "admission"),
            0,
            "at the deadline, not past it"
        );
        world.now_us += 1;
        world.check_stranger(node, 1 << 50);
        assert_eq!(violations(world, "admission"), 1, "{:?}", world.violations);
        // Sixteen from one address are allowed; the seventeenth is over the bound.
        world.violations.clear();
        for k in 1..16 {
            world.strangers.insert(
                (node, (1 << 50) + k),
                Stranger {
                    peer: usize::MAX,
                    ip,
                    opened_us: now,
                },
            );
        }
        world.check_admission_bounds(node);
        assert_eq!(violations(world, "admission"), 0, "{:?}", world.violations);
        world.strangers.insert(
            (node, (1 << 50) + 16),
            Stranger {
                peer: usize::MAX,
                ip,
                opened_us: now,
            },
        );
        world.check_admission_bounds(node);
        assert_eq!(violations(world, "admission"), 1, "{:?}", world.violations);
    }

    #[test]
    fn invariant_8_fires_on_anything_sent_to_the_partners_partner_by_a_site_that_never_trusted_it()
    {
        let mut run = world();
        let world = &mut run.world;
        let pp = world
            .outsider
            .as_ref()
            .and_then(|o| o.partners_partner.as_ref())
            .map(|p| (p.node, p.partner))
            .expect("the scenario has one");
        let (pp_node, partner) = pp;
        let pp_id = world.nodes[pp_node].id;
        let partner_node = world.sites[partner].nodes[0];
        let stranger_site = (partner + 1) % 4;
        let stranger_node = world.sites[stranger_site].nodes[0];
        let records_of = |world: &World, site: usize| Message::Records {
            records: world
                .truth
                .by_author(world.sites[site].id)
                .take(1)
                .cloned()
                .collect(),
        };
        // D's one partner may send it its own records.
        let message = records_of(world, partner);
        world.check_outgoing(partner_node, &pp_id, &message);
        assert_eq!(
            violations(world, "invariant 8"),
            0,
            "{:?}",
            world.violations
        );
        // A site that never trusted D: anything it sends, and its records from anyone.
        let message = records_of(world, stranger_site);
        world.check_outgoing(partner_node, &pp_id, &message);
        assert_eq!(
            violations(world, "invariant 8"),
            1,
            "{:?}",
            world.violations
        );
        world.check_outgoing(stranger_node, &pp_id, &message);
        assert_eq!(
            violations(world, "invariant 8"),
            3,
            "{:?}",
            world.violations
        );
    }

    #[test]
    fn invariant_11_fires_when_a_deletion_leaves_a_kept_acknowledged_chunk_below_r() {
        let mut run = world();
        let world = &mut run.world;
        let r = world.scenario.replication_factor;
        let sites_of = |world: &World, id: &cairn_protocol::ids::ChunkId| -> Vec<usize> {
            let mut sites: Vec<usize> = world
                .nodes
                .iter()
                .filter(|n| n.disk.chunks.get(id).is_some_and(|c| c.good))
                .map(|n| n.site)
                .collect();
            sites.sort_unstable();
            sites.dedup();
            sites
        };
        let id = world
            .acked_chunks
            .keys()
            .copied()
            .find(|id| sites_of(world, id).len() == r)
            .expect("an acknowledged chunk at R sites after two hours");
        // A deletion that leaves R sites is fine (an extra copy, say).
        world.check_gc_deletion(0, &id, "a test");
        assert_eq!(violations(world, "invariant 11"), 0);
        // Every copy at one site goes: below R.
        let site = sites_of(world, &id)[0];
        let nodes: Vec<usize> = world.sites[site].nodes.clone();
        for node in nodes {
            world.remove_copy(node, &id);
        }
        world.check_gc_deletion(world.sites[site].nodes[0], &id, "a test");
        assert_eq!(
            violations(world, "invariant 11"),
            1,
            "{:?}",
            world.violations
        );
        // A chunk no kept, acknowledged snapshot uses may go.
        world.acked_chunks.remove(&id);
        world.check_gc_deletion(0, &id, "a test");
        assert_eq!(violations(world, "invariant 11"), 1);
    }

    #[test]
    fn invariant_13_fires_on_a_forgotten_snapshot_acknowledged_or_brought_back() {
        use cairn_protocol::catalog::RecordKey;
        use cairn_protocol::engine::Event;
        use cairn_protocol::record::{Tombstone, TOMBSTONE_VERSION};
        let mut run = world();
        let world = &mut run.world;
        let node = world.sites[0].nodes[0];
        let key = world.sites[0].key.clone();
        let snapshot = [0x5a; 32];
        let live = Record::sign(&key, RecordKind::Snapshot, snapshot, 1, vec![1; 8]);
        let body = Tombstone {
            forgotten_unix_ms: 1,
        }
        .encode();
        let tombstone = Record::sign(
            &key,
            RecordKind::Snapshot,
            snapshot,
            TOMBSTONE_VERSION,
            body,
        );
        world.signed(live.clone());
        world.signed(tombstone.clone());
        // Before the tombstone, an acknowledgement is fine.
        world.check_event(node, &Event::SnapshotReplicated { snapshot });
        assert_eq!(violations(world, "invariant 13"), 0);
        let now_ms = world.now_us / 1000;
        let engine = world.nodes[node].engine.as_mut().expect("live");
        engine
            .handle_local_record(tombstone.clone(), now_ms)
            .expect("valid");
        world.pump(node);
        world.check_event(node, &Event::SnapshotReplicated { snapshot });
        assert_eq!(
            violations(world, "invariant 13"),
            1,
            "{:?}",
            world.violations
        );
        // The live record saved over the tombstone, bypassing the catalog: an older
        // version replacing a newer one, which invariant 9 names.
        assert_eq!(
            world.nodes[node].disk.records.get(&RecordKey::of(&live)),
            Some(&tombstone)
        );
        world.check_saved_record(node, &live);
        assert_eq!(
            violations(world, "invariant 9"),
            1,
            "{:?}",
            world.violations
        );
    }
}
