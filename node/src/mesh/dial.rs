//! Reaching nodes: dials with backoff, bootstrap and invite addresses retried, blocks lifted.

use super::invite::pending_invites;
use super::*;

impl Node {
    /// Dials a node the engine wants to talk to, at the addresses its certificate,
    /// identify or mDNS gave. False when it cannot be reached for now.
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
