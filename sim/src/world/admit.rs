//! Admission in the simulator: every node owns the real `cairn_protocol::admission`
//! policy and is fed what the node's transport feeds it (`node/src/mesh/admit.rs` and
//! `hello.rs`): a connection opened with the remote's IP, its hello passed or refused,
//! connections closed, timeouts with `now`. Its actions are carried out here: a closed
//! connection is gone (the next message between the two processes opens a new one and
//! presents its certificate again), a blocked peer's messages are dropped as the
//! transport would deny its connections.
//!
//! The simulator does not model dialing or invites: a connection opens with the first
//! message between two processes, so admission's `Dial` (trust granted after a refusal)
//! is only counted, and no invite completion is ever asked.
//!
//! Strangers are the outsider's connections that never say hello; they are the only
//! ones that should meet the hello deadline, and `checks` holds admission to it.

use std::net::{IpAddr, Ipv6Addr};

use cairn_protocol::admission::{Action, CloseReason};
use cairn_protocol::record::NodeCert;

use super::{Ev, World, PEERS_CONNECTED_MAX};

/// Silent connections one flood opens to one node, from one address: more than
/// admission lets one address hold, so its bound is what stops them.
pub const STRANGER_FLOOD: usize = 24;
/// Stranger peer ids start here, far above any node index.
const STRANGER_PEER_BASE: usize = 1 << 40;

/// A connection that never says hello.
#[derive(Clone, Debug)]
pub struct Stranger {
    pub peer: usize,
    pub ip: IpAddr,
    pub opened_us: u64,
}

impl World {
    /// The address a node's connections come from: one per machine (a documentation
    /// prefix: nothing is sent anywhere, it only names the machine to admission).
    pub fn ip_of(&self, node: usize) -> IpAddr {
        let site = self.nodes[node].site as u16;
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0x0db8,
            site,
            0,
            0,
            0,
            (node >> 16) as u16,
            node as u16,
        ))
    }

    fn next_conn(&mut self) -> u64 {
        self.conn_seq += 1;
        self.conn_seq
    }

    /// A new connection from `from`'s process to `to`'s, with its hello: the sender's
    /// certificate through `Engine::handle_connect`, as the node's hello does. True if
    /// the message that opened it may go on to the engine.
    pub(super) fn handshake(&mut self, to: usize, from: usize) -> bool {
        let now_ms = self.now_us / 1000;
        // A connection of the peer's previous process (or a refused one) is gone.
        if let Some(old) = self.nodes[to].conns.remove(&from) {
            self.nodes[to].connected.remove(&from);
            self.nodes[to].admission.connection_closed(old);
        }
        let conn = self.next_conn();
        let ip = self.ip_of(from);
        if self.nodes[to].connected.len() < PEERS_CONNECTED_MAX {
            let from_incarnation = self.nodes[from].incarnation;
            self.nodes[to].connected.insert(from, from_incarnation);
            self.nodes[to].conns.insert(from, conn);
        }
        self.nodes[to]
            .admission
            .connection_opened(now_ms, conn, from, ip);
        self.apply_admission(to);
        if self.nodes[to].conns.get(&from) != Some(&conn) {
            self.coverage.connections_closed_at_open += 1;
            return false;
        }
        let Some(cert) = self.presented_cert(from) else {
            return true; // no certificate: the engine refuses what it sends
        };
        let from_id = self.nodes[from].id;
        let site = cert.author;
        let genuine = cert.verify_signature().is_ok()
            && NodeCert::decode(&cert.body).is_ok_and(|c| c.node == from_id && c.site == site);
        self.nodes[to]
            .admission
            .hello_presented(from, genuine.then_some(site));
        let engine = self.nodes[to].engine.as_mut().expect("delivering to it");
        let accepted = engine.handle_connect(from_id, cert, now_ms).is_ok();
        self.stats.engine_calls += 1;
        if self.is_outsider(from) {
            self.coverage.outsider_connects_refused += u64::from(!accepted);
        }
        if accepted {
            self.nodes[to].admission.hello_passed(now_ms, from, site);
        } else {
            self.coverage.hellos_refused += 1;
            self.nodes[to].admission.hello_refused(now_ms, from);
        }
        self.apply_admission(to);
        accepted
    }

    /// Carries out what a node's admission asked for.
    pub(super) fn apply_admission(&mut self, node: usize) {
        while let Some(action) = self.nodes[node].admission.poll_action() {
            match action {
                Action::Close { conn, reason } => self.close_connection(node, conn, reason),
                Action::Block { peer, .. } => {
                    self.coverage.peers_blocked += 1;
                    if let Some(conn) = self.nodes[node].conns.get(&peer).copied() {
                        self.close_connection(node, conn, CloseReason::Refused);
                    }
                }
                // No dials are modelled: the next message opens the connection.
                Action::Dial { .. } => self.coverage.trust_granted_dials += 1,
                Action::Unblock { .. } => {}
                // No invites are modelled: nothing asks for these.
                Action::SendAccept { .. }
                | Action::DialInviter { .. }
                | Action::PersistRefused { .. } => {}
            }
        }
        self.arm_admission_timer(node);
    }

    fn close_connection(&mut self, node: usize, conn: u64, reason: CloseReason) {
        let peer = self.nodes[node]
            .conns
            .iter()
            .find(|(_, c)| **c == conn)
            .map(|(p, _)| *p);
        if let Some(peer) = peer {
            self.nodes[node].conns.remove(&peer);
            self.nodes[node].connected.remove(&peer);
        }
        if self.strangers.remove(&(node, conn)).is_some() {
            match reason {
                CloseReason::HelloDeadline => self.coverage.strangers_closed_at_deadline += 1,
                CloseReason::AddressFull | CloseReason::PendingFull => {
                    self.coverage.strangers_refused_over_bound += 1
                }
                CloseReason::Refused => {}
            }
        }
        self.nodes[node].admission.connection_closed(conn);
    }

    fn arm_admission_timer(&mut self, node: usize) {
        if self.nodes[node].engine.is_none() {
            return;
        }
        let Some(at_ms) = self.nodes[node].admission.poll_timeout() else {
            return;
        };
        let at_us = (at_ms * 1000).max(self.now_us + 1);
        if self.nodes[node]
            .admission_timer_at_us
            .is_some_and(|t| t <= at_us)
        {
            return;
        }
        self.nodes[node].admission_timer_at_us = Some(at_us);
        let incarnation = self.nodes[node].incarnation;
        self.schedule(at_us, Ev::AdmissionTimer { node, incarnation });
    }

    /// A node's process stopped: its connections are gone at both ends.
    pub(super) fn connections_gone(&mut self, node: usize) {
        self.nodes[node].conns.clear();
        self.nodes[node].admission_timer_at_us = None;
        for other in 0..self.nodes.len() {
            if let Some(conn) = self.nodes[other].conns.remove(&node) {
                self.nodes[other].connected.remove(&node);
                self.nodes[other].admission.connection_closed(conn);
            }
        }
        self.strangers.retain(|(at, _), _| *at != node);
    }

    /// The outsider opens a connection to `to` and never says hello (a fresh peer id
    /// each time, from the outsider's one address).
    pub(super) fn open_stranger(&mut self, to: usize, from_ip: IpAddr) {
        let conn = self.next_conn();
        let peer = STRANGER_PEER_BASE + conn as usize;
        self.coverage.strangers_connected += 1;
        self.strangers.insert(
            (to, conn),
            Stranger {
                peer,
                ip: from_ip,
                opened_us: self.now_us,
            },
        );
        self.nodes[to]
            .admission
            .connection_opened(self.now_us / 1000, conn, peer, from_ip);
        self.apply_admission(to);
        if self.strangers.contains_key(&(to, conn)) {
            let deadline_us = self.nodes[to].admission.config().hello_deadline_ms * 1000;
            self.schedule(
                self.now_us + deadline_us + 1_000,
                Ev::StrangerDue { node: to, conn },
            );
        }
        self.check_admission_bounds(to);
    }
}

#[cfg(test)]
mod tests {
    use crate::scenario::{OutsiderSpec, Scenario};
    use crate::world::HOUR_US;

    /// Four offices and an outsider trying every second from the start.
    fn run_with_outsider(hours: u64) -> crate::run::Run {
        let mut scenario = Scenario::parse(crate::DEFAULT_SCENARIO).expect("built-in parses");
        scenario.faults.clear();
        for image in &mut scenario.images {
            image.size_gib = 0.02;
        }
        scenario.outsider = Some(OutsiderSpec {
            from_hours: 0.0,
            until_hours: None,
            every_secs: 1.0,
            partners_partner_of: Some("south".into()),
        });
        let mut run = crate::run::Run::new(scenario, 5);
        run.advance(hours * HOUR_US, hours * HOUR_US);
        run
    }

    #[test]
    fn the_outsider_runs_into_the_real_admission() {
        let run = run_with_outsider(1);
        let world = &run.world;
        let c = &world.coverage;
        assert!(c.strangers_connected > 100, "{c:?}");
        // Silent strangers are closed at the deadline by admission, floods at the bound.
        assert!(c.strangers_closed_at_deadline > 50, "{c:?}");
        assert!(c.strangers_refused_over_bound > 10, "{c:?}");
        // Its forged certificates get it blocked, its own are refused.
        assert!(c.peers_blocked > 0, "{c:?}");
        assert!(c.hellos_refused > 0, "{c:?}");
        let admission: Vec<&String> = world
            .violations
            .iter()
            .filter(|v| v.starts_with("admission"))
            .collect();
        assert!(admission.is_empty(), "{admission:?}");
        // Nothing stays open past the deadline at the end either.
        let deadline_us = 5_000_000;
        assert!(world
            .strangers
            .values()
            .all(|s| world.now_us <= s.opened_us + deadline_us + 1_000));
        // The partner's partner: admitted by south's nodes, refused by the others', and
        // nothing of a site that never trusted it reached it (invariant 8).
        assert!(c.partners_partner_admitted > 0, "{c:?}");
        assert!(c.partners_partner_refused > 0, "{c:?}");
        let leaks: Vec<&String> = world
            .violations
            .iter()
            .filter(|v| v.starts_with("invariant 8"))
            .collect();
        assert!(leaks.is_empty(), "{leaks:?}");
        // The bounds held.
        for node in &world.nodes {
            if node.engine.is_some() {
                let (_, pending) = node.admission.n_connections();
                assert!(pending <= 16, "pending {pending}");
            }
        }
    }
}
