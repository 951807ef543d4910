//! Reaching nodes: the dialer's dials (when, and the backoff, are
//! `cairn_protocol::dialer`'s), bootstrap and invite addresses retried.

use cairn_protocol::dialer::{DialAction, Reach};
use cairn_protocol::identity::NodeId;
use cairn_protocol::record::{NodeCert, RecordKind};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId};
use tracing::{debug, warn};

use super::invite::pending_invites;
use super::{net, now_ms, AddressDial, Node, HELD_BY_INTERVAL};

impl Node {
    /// Dials a node the engine wants to talk to, at the addresses its certificate,
    /// identify or mDNS gave, when the dialer's backoff lets it. False when it cannot be
    /// reached for now (no address, or waiting after failed dials).
    pub(super) fn dial_node(&mut self, node: NodeId) -> bool {
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
        if self.peer_addresses(peer).is_empty() {
            return false;
        }
        let now = now_ms();
        if self.dialer.want(now, peer) == Reach::Connected {
            // The swarm has no connection left, whatever the dialer last heard.
            self.dialer.disconnected(now, peer);
            self.dialer.want(now, peer);
        }
        self.apply_dials();
        if self.dialer.is_dialing(&peer) {
            return true;
        }
        // Waiting after failed dials: what waits for it is dropped, as before the wait.
        self.dialer.unwant(&peer);
        false
    }

    /// Carries out the dialer's dials.
    pub(super) fn apply_dials(&mut self) {
        while let Some(DialAction::Dial { peer }) = self.dialer.poll_action() {
            let addresses = self.peer_addresses(peer);
            if addresses.is_empty() {
                self.dialer.dial_failed(now_ms(), peer);
                continue;
            }
            let opts = DialOpts::peer_id(peer).addresses(addresses).build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!("dial {}: {e}", self.name_peer(&peer));
                self.dialer.dial_failed(now_ms(), peer);
            }
        }
    }

    /// Every address known for a peer: identify, mDNS, and its node's certificate.
    fn peer_addresses(&self, peer: PeerId) -> Vec<Multiaddr> {
        let mut addresses = self.addresses.get(&peer).cloned().unwrap_or_default();
        let nodes = self
            .peer_of_node
            .iter()
            .filter(|(_, p)| **p == peer)
            .map(|(n, _)| *n);
        for node in nodes {
            for text in self
                .node_cert(&node)
                .map(|c| c.addresses)
                .unwrap_or_default()
            {
                if let Ok(addr) = net::multiaddr(&text) {
                    if !addresses.contains(&addr) {
                        addresses.push(addr);
                    }
                }
            }
        }
        addresses
    }

    pub(super) fn node_cert(&self, node: &NodeId) -> Option<NodeCert> {
        self.engine
            .catalog()
            .authors()
            .flat_map(|a| self.engine.catalog().by_author(a))
            .find(|r| r.kind == RecordKind::NodeCert && r.key == node.0)
            .and_then(|r| NodeCert::decode(&r.body).ok())
    }

    pub(super) fn retry(&mut self) {
        let now = tokio::time::Instant::now();
        if now >= self.held_by_noted_at + HELD_BY_INTERVAL {
            self.held_by_noted_at = now;
            self.note_held_by();
        }
        let overdue: Vec<PeerId> = self
            .refusing
            .iter()
            .filter(|(_, until)| *until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in overdue {
            self.refusal_sent(peer);
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
        // Admission asks them on any connection to the inviting site, or dials them.
        match pending_invites(&self.vault, &self.engine) {
            Ok(pending) => {
                let now = now_ms();
                for (site, _) in pending {
                    self.admission.invite_accepted(now, site);
                }
            }
            Err(e) => warn!("cannot read accepted invites: {e}"),
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

    pub(super) fn dial_address(&mut self, addr: Multiaddr, why: AddressDial) {
        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.address_dials.insert(id, why);
            }
            Err(e) => debug!("dial {addr}: {e}"),
        }
    }
}
