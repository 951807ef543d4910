//! Carrying out admission's actions on the swarm: closing connections, blocking peers.
//! The policy itself is `cairn_protocol::admission`.

use std::net::{IpAddr, Ipv6Addr};

use cairn_protocol::admission::Action;
use libp2p::core::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tracing::debug;

use super::{now_ms, Node};

impl Node {
    pub(super) fn connection_opened(&mut self, conn: ConnectionId, peer: PeerId, addr: &Multiaddr) {
        self.connection_peers.insert(conn, peer);
        self.admission
            .connection_opened(now_ms(), conn, peer, remote_ip(addr));
    }

    /// Carries out what admission asked for. True if it asked anything.
    pub(super) fn apply_admission(&mut self) -> bool {
        let mut any = false;
        while let Some(action) = self.admission.poll_action() {
            any = true;
            match action {
                Action::Close { conn, reason } => {
                    match self.connection_peers.get(&conn).copied() {
                        Some(peer) => {
                            debug!(
                                "closing a connection of {}: {reason}",
                                self.name_peer(&peer)
                            )
                        }
                        None => debug!("closing a connection: {reason}"),
                    }
                    self.swarm.close_connection(conn);
                }
                Action::Block { peer, .. } => {
                    self.swarm.behaviour_mut().blocked.block_peer(peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                Action::Unblock { peer } => {
                    self.swarm.behaviour_mut().blocked.unblock_peer(peer);
                }
                Action::Dial { peer } => {
                    self.dialer.want(now_ms(), peer);
                    self.apply_dials();
                }
                Action::SendAccept { conn, inviter } => {
                    if let Some(peer) = self.connection_peers.get(&conn).copied() {
                        self.send_accept(peer, inviter);
                    }
                }
                Action::DialInviter { inviter } => self.dial_inviter(inviter),
                Action::PersistRefused { inviter, why } => self.invite_refused(inviter, &why),
            }
        }
        any
    }
}

/// The IP a connection comes from; relayed ones count under the unspecified address.
fn remote_ip(addr: &Multiaddr) -> IpAddr {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    }
    addr.iter()
        .find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        })
        .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
}
