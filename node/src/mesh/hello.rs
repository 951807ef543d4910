//! Admission: the hello each peer must pass before it is served, and refusals.

use cairn_protocol::engine::Message;
use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::record::{Record, RecordKind};
use libp2p::PeerId;
use tracing::{info, warn};

use super::net::{self, Frame, Kind};
use super::{now_ms, storage, Node, REFUSAL_SEND_MAX, REFUSING_MAX};

impl Node {
    /// This node's certificate, and what `peer_site` may see of the grants to or from
    /// this site and of its wrapped keys: all a partner needs to check it, and all a
    /// recovered node needs to trust its partners again. Every record but the certificate
    /// passes `Engine::relays_to`, as gossip does: a site this site never trusted (a
    /// partner's partner) gets nothing, and a hello to a peer whose site is not known yet
    /// carries the certificate alone.
    /// In an answer, `peer_site`'s own records come too: a node recovered on a fresh
    /// machine learns its site's snapshots and grants from its first partner at once.
    pub(super) fn hello_payload(&self, peer_site: Option<SiteId>) -> Vec<u8> {
        let own = self.vault.dir.site_id();
        let mut records = vec![self.own_cert.clone()];
        let Some(peer_site) = peer_site else {
            return Message::Records { records }.encode();
        };
        for author in self.engine.catalog().authors() {
            for record in self.engine.catalog().by_author(author) {
                // The grants between the two sites, and this site's wrapped keys: a peer
                // holds them from the first contact, so an office lost before gossip ran
                // can still be recovered through any partner.
                let grant =
                    record.kind == RecordKind::TrustGrant && (author == own || record.key == own.0);
                let wanted = grant || (record.kind == RecordKind::WrappedKeys && author == own);
                if wanted && self.engine.relays_to(record, peer_site) {
                    records.push(record.clone());
                }
            }
        }
        if peer_site != own {
            records.extend(
                self.engine
                    .catalog()
                    .by_author(peer_site)
                    .filter(|record| self.engine.relays_to(record, peer_site))
                    .cloned(),
            );
        }
        records.truncate(cairn_protocol::engine::message::RECORDS_PER_MESSAGE_MAX);
        Message::Records { records }.encode()
    }

    /// The site of the node behind `peer`, when this node already knows its certificate.
    fn site_of_peer(&self, peer: PeerId) -> Option<SiteId> {
        self.engine
            .peers()
            .find(|(node, _, _)| net::peer_id(node) == Some(peer))
            .map(|(_, site, _)| site)
    }

    pub(super) fn send_hello(&mut self, peer: PeerId) {
        if !self.hello_sent.insert(peer) {
            return;
        }
        let payload = self.hello_payload(self.site_of_peer(peer));
        let id = self
            .swarm
            .behaviour_mut()
            .cairn
            .send_request(&peer, Frame::new(Kind::Hello, payload));
        self.hellos.insert(id, peer);
    }

    /// Checks a peer's hello (its own or its answer to ours). Ok: the peer may talk.
    pub(super) fn check_hello(&mut self, peer: PeerId, payload: &[u8]) -> Result<NodeId, String> {
        let now = now_ms();
        let Ok(Message::Records { mut records }) = Message::decode(payload) else {
            return Err("malformed hello".into());
        };
        if records.is_empty() {
            return Err("a hello without a node certificate".into());
        }
        let cert = records.remove(0);
        let node = NodeId(cert.key);
        let site = cert.author;
        if net::peer_id(&node) != Some(peer) {
            return Err("the certificate is for another node key".into());
        }
        self.admission
            .hello_presented(peer, cert.verify_signature().is_ok().then_some(site));
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
        info!("{} is a peer", self.name_node(&node));
        self.admission.hello_passed(now, peer, site);
        if let Some(queued) = self.outbox.remove(&node) {
            for message in queued {
                self.send_mesh(peer, &message);
            }
        }
        Ok(node)
    }

    /// Keeps `cairn trust list`'s "last seen" current: at most once a minute per site.
    pub(super) fn note_seen(&mut self, node: NodeId, now: u64) {
        let Some((_, site, _)) = self.engine.peers().find(|(n, _, _)| *n == node) else {
            return;
        };
        let last = self.seen_noted_ms.entry(site).or_insert(0);
        if now >= *last + 60_000 {
            *last = now;
            self.storage.note(storage::Note::Seen {
                site,
                now_unix_ms: now,
            });
        }
    }

    /// Refuses a peer whose hello this node asked for. That peer has usually sent its
    /// own hello too, and blocking it now would close the connection before the answer
    /// that tells it why goes out (seen as a flaky `an_outsider_is_refused`), so it is cut
    /// off as `refuse_after_answer` does: once the answer is sent, or after
    /// `REFUSAL_SEND_MAX`. It is served nothing meanwhile: it never passed the hello.
    pub(super) fn refuse(&mut self, peer: PeerId, why: &str) {
        self.refuse_after_answer(peer, why);
    }

    /// Refuses a peer whose hello this node is answering: it is cut off once the refusal
    /// (which says why) is sent, or after `REFUSAL_SEND_MAX` if it never is.
    pub(super) fn refuse_after_answer(&mut self, peer: PeerId, why: &str) {
        let name = self.name_peer(&peer);
        warn!(operation = "refusal", peer = %name, reason = why, result = "refused", "refused {name}: {why}");
        self.peers_refused += 1;
        if self.refusing.len() >= REFUSING_MAX {
            self.block(peer);
        } else if !self.refusing.iter().any(|(p, _)| *p == peer) {
            self.refusing
                .push((peer, tokio::time::Instant::now() + REFUSAL_SEND_MAX));
        }
    }

    /// A refusal answer went out (or failed to): the peer is cut off now.
    pub(super) fn refusal_sent(&mut self, peer: PeerId) {
        let before = self.refusing.len();
        self.refusing.retain(|(p, _)| *p != peer);
        if self.refusing.len() < before {
            self.block(peer);
        }
    }

    /// Drops a refused peer's connections and keeps it out for a while (admission's
    /// block).
    pub(super) fn block(&mut self, peer: PeerId) {
        self.admission.hello_refused(now_ms(), peer);
    }
}
