//! What the swarm reports: connections, identify and mDNS addresses, ping times.

use cairn_protocol::identity::SiteId;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping};
use tracing::{debug, info};

use super::net::BehaviourEvent;
use super::{now_ms, AddressDial, Node};

impl Node {
    pub(super) fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
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
                self.dialer.connected(now_ms(), peer_id);
                let link = self.links.entry(peer_id).or_default();
                link.connections += 1;
                let addr = endpoint.get_remote_address().clone();
                self.connection_opened(connection_id, peer_id, &addr);
                if endpoint.is_dialer() {
                    let known = self.addresses.entry(peer_id).or_default();
                    if !known.contains(&addr) {
                        known.push(addr);
                    }
                }
                match self.address_dials.remove(&connection_id) {
                    Some(AddressDial::Accept(site)) => {
                        self.admission
                            .inviter_reached(now_ms(), site, connection_id);
                    }
                    Some(AddressDial::Bootstrap(addr)) => {
                        self.bootstrap_peers.insert(addr, peer_id);
                        // A bootstrap address may be the inviter's node: invites waiting
                        // are asked there first (its answer sends the hello), since our
                        // hello cannot pass before it has completed.
                        let waiting: Vec<SiteId> =
                            self.admission.invites_pending().copied().collect();
                        for site in &waiting {
                            self.admission
                                .inviter_reached(now_ms(), *site, connection_id);
                        }
                        if waiting.is_empty() {
                            self.send_hello(peer_id);
                        }
                    }
                    _ if endpoint.is_dialer() => self.send_hello(peer_id),
                    _ => {}
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.connection_peers.remove(&connection_id);
                self.admission.connection_closed(connection_id);
                if num_established == 0 {
                    if let Some(link) = self.links.get_mut(&peer_id) {
                        link.ready = false;
                        link.connections = 0;
                    }
                    self.hello_sent.remove(&peer_id);
                    self.dialer.disconnected(now_ms(), peer_id);
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
                    debug!("cannot reach {}: {error}", self.name_peer(&peer));
                    self.dialer.dial_failed(now_ms(), peer);
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
            other => debug!("swarm event {}", event_name(&other)),
        }
    }
}

/// A swarm event's kind, e.g. `Dialing` or `Behaviour/Identify`: its Debug text would
/// print libp2p PeerIds, which the log never shows (`peer_name.rs`).
fn event_name(event: &SwarmEvent<BehaviourEvent>) -> String {
    let SwarmEvent::Behaviour(behaviour) = event else {
        let text = format!("{event:?}");
        return text
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_owned();
    };
    let name = match behaviour {
        BehaviourEvent::Limits(_) => "Limits",
        BehaviourEvent::Blocked(_) => "Blocked",
        BehaviourEvent::Cairn(_) => "Cairn",
        BehaviourEvent::Identify(_) => "Identify",
        BehaviourEvent::Ping(_) => "Ping",
        BehaviourEvent::Mdns(_) => "Mdns",
        BehaviourEvent::Relay(_) => "Relay",
        BehaviourEvent::Dcutr(_) => "Dcutr",
    };
    format!("Behaviour/{name}")
}

#[cfg(test)]
mod tests {
    use libp2p::ping;
    use libp2p::swarm::SwarmEvent;

    use super::{event_name, BehaviourEvent};

    #[test]
    fn a_swarm_event_is_named_without_its_peer_id() {
        let peer = libp2p::PeerId::random();
        let event: SwarmEvent<BehaviourEvent> = SwarmEvent::Dialing {
            peer_id: Some(peer),
            connection_id: libp2p::swarm::ConnectionId::new_unchecked(1),
        };
        assert_eq!(event_name(&event), "Dialing");
        let event: SwarmEvent<BehaviourEvent> =
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection: libp2p::swarm::ConnectionId::new_unchecked(1),
                result: Err(ping::Failure::Timeout),
            }));
        let name = event_name(&event);
        assert_eq!(name, "Behaviour/Ping");
        assert!(!name.contains(&peer.to_string()));
    }
}
