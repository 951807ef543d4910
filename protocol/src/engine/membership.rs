//! Membership and failure detection. The peers are the nodes certified by trusted sites.
//! Every gossip message carries the sender's heartbeat (its clock) and a rotating sample
//! of the freshest heartbeats it has heard, so news of a node spreads epidemically. A
//! peer whose heartbeat has not advanced for `suspect_after_ms` (measured on this node's
//! clock, so clock skew between offices does not matter) is suspected, after
//! `dead_after_ms` dead; any newer heartbeat makes it live again. Only dead peers change
//! placement, so a slow link causes suspicion, not data movement.

use std::collections::BTreeMap;

use super::message::{Beat, BEATS_PER_MESSAGE_MAX};
use super::{Engine, Event, PEERS_MAX};
use crate::identity::{NodeId, SiteId};
use crate::record::TrustView;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerState {
    Live,
    Suspected,
    Dead,
}

#[derive(Clone, Debug)]
pub(super) struct Peer {
    pub site: SiteId,
    pub capacity_bytes: u64,
    /// The newest heartbeat heard for this peer, on the peer's clock.
    pub beat_ms: u64,
    /// When that heartbeat arrived, on this node's clock.
    pub heard_at_ms: u64,
    pub state: PeerState,
    /// Messages that failed a check recently (`guard`), and when the last one came.
    pub strikes: u32,
    pub last_strike_ms: u64,
    /// Until then every message from the peer is refused unread (0: not cut off).
    pub cut_off_until_ms: u64,
    /// Audit failures weigh more than passes earn back (`audit`); at
    /// `AUDIT_POINTS_MAX` the peer is no longer placed on until `excluded_until_ms`.
    pub audit_points: u32,
    pub excluded_until_ms: u64,
    /// The peer's audits this node is reading its copy to answer.
    pub audits_answering: u32,
    /// When the peer last answered something this node sent (a gossip reply, an
    /// acknowledgement, a fetch or audit reply...): proof that the link works both ways.
    pub answered_at_ms: u64,
    /// How long the peer takes to answer a fetch, smoothed (0: it has not answered one).
    pub fetch_ms: u64,
}

impl Peer {
    pub fn is_cut_off(&self, now_ms: u64) -> bool {
        now_ms < self.cut_off_until_ms
    }

    pub fn is_excluded(&self, now_ms: u64) -> bool {
        now_ms < self.excluded_until_ms
    }
}

impl Engine {
    /// Brings the peer table in line with the node certificates of trusted sites. New
    /// peers start live, with the grace of a full timeout before they can be suspected.
    pub(super) fn refresh_peers(&mut self) {
        let mut certified: Vec<(NodeId, SiteId, u64)> = Vec::new();
        let mut index: BTreeMap<NodeId, usize> = BTreeMap::new();
        for cert in self
            .catalog
            .node_certs()
            .filter(|c| c.node != self.node && self.trust.is_trusted(&c.site))
        {
            // A node id certified by two trusted sites: one of them claims a node that
            // is not its own (the signature cannot tell). The site of the certificate
            // the node presented itself when it connected wins, then the site it is
            // already taken for, then the first: a later false claim does not move a
            // known peer, and one that came first is undone at the peer's next connect.
            let entry = (cert.node, cert.site, cert.capacity_bytes);
            let Some(&at) = index.get(&cert.node) else {
                index.insert(cert.node, certified.len());
                certified.push(entry);
                continue;
            };
            let rank = |site: &SiteId| {
                if self.presented.get(&cert.node) == Some(site) {
                    0
                } else if self.peers.get(&cert.node).is_some_and(|p| p.site == *site) {
                    1
                } else {
                    2
                }
            };
            if rank(&cert.site) < rank(&certified[at].1) {
                certified[at] = entry;
            }
        }
        // A node that presented another site's certificate is not one of these sites'.
        certified.retain(|(node, site, _)| self.presented.get(node).is_none_or(|p| p == site));
        certified.truncate(PEERS_MAX);
        let now_ms = self.now_ms;
        self.peers
            .retain(|id, _| certified.iter().any(|(n, ..)| n == id));
        for (node, site, capacity_bytes) in certified {
            let peer = self.peers.entry(node).or_insert(Peer {
                site,
                capacity_bytes,
                beat_ms: 0,
                heard_at_ms: now_ms,
                state: PeerState::Live,
                strikes: 0,
                last_strike_ms: 0,
                cut_off_until_ms: 0,
                audit_points: 0,
                excluded_until_ms: 0,
                audits_answering: 0,
                answered_at_ms: 0,
                fetch_ms: 0,
            });
            peer.site = site;
            peer.capacity_bytes = capacity_bytes;
        }
    }

    /// Direct contact: the peer is alive now.
    pub(super) fn heard_from(&mut self, node: NodeId, now_ms: u64) {
        if let Some(peer) = self.peers.get_mut(&node) {
            peer.heard_at_ms = now_ms;
        }
        self.mark_live(node);
    }

    pub(super) fn merge_beats(&mut self, beats: &[Beat], now_ms: u64) {
        for beat in beats.iter().take(BEATS_PER_MESSAGE_MAX) {
            let mut lo = [0u8; 32];
            lo[..8].copy_from_slice(&beat.node_prefix);
            let mut hi = [0xffu8; 32];
            hi[..8].copy_from_slice(&beat.node_prefix);
            let mut matches = self.peers.range_mut(NodeId(lo)..=NodeId(hi));
            let (Some((node, peer)), None) = (matches.next(), matches.next()) else {
                continue; // unknown, or (never in practice) ambiguous
            };
            let node = *node;
            if beat.beat_ms > peer.beat_ms {
                peer.beat_ms = beat.beat_ms;
                peer.heard_at_ms = now_ms;
                self.mark_live(node);
            }
        }
    }

    fn mark_live(&mut self, node: NodeId) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let was = peer.state;
        if was != PeerState::Live {
            peer.state = PeerState::Live;
            self.push_event(Event::PeerLive(node));
            if was == PeerState::Dead {
                self.placement_stale = true;
            }
        }
    }

    /// Our heartbeat and a rotating sample of others, for the next gossip message.
    pub(super) fn beats_to_send(&mut self, now_ms: u64) -> Vec<Beat> {
        let mut beats = vec![Beat {
            node_prefix: Beat::prefix_of(&self.node),
            beat_ms: now_ms,
        }];
        let known: Vec<Beat> = self
            .peers
            .iter()
            .filter(|(_, p)| p.beat_ms > 0 && p.state != PeerState::Dead)
            .map(|(node, p)| Beat {
                node_prefix: Beat::prefix_of(node),
                beat_ms: p.beat_ms,
            })
            .collect();
        if !known.is_empty() {
            let n = known.len().min(BEATS_PER_MESSAGE_MAX - 1);
            for i in 0..n {
                beats.push(known[(self.beat_cursor + i) % known.len()]);
            }
            self.beat_cursor = (self.beat_cursor + n) % known.len();
        }
        beats
    }

    pub(super) fn check_liveness(&mut self, now_ms: u64) {
        let mut changes = Vec::new();
        for (node, peer) in &mut self.peers {
            let silent_ms = now_ms.saturating_sub(peer.heard_at_ms);
            let state = if silent_ms >= self.config.dead_after_ms {
                PeerState::Dead
            } else if silent_ms >= self.config.suspect_after_ms {
                PeerState::Suspected
            } else {
                PeerState::Live
            };
            // Only silence moves a peer down here; news moves it up (`mark_live`).
            if state > peer.state {
                peer.state = state;
                changes.push((*node, state));
            }
        }
        for (node, state) in changes {
            match state {
                PeerState::Suspected => self.push_event(Event::PeerSuspected(node)),
                PeerState::Dead => {
                    self.placement_stale = true;
                    self.push_event(Event::PeerDead(node));
                }
                PeerState::Live => {}
            }
        }
    }

    /// A random peer to gossip with: usually a live one, sometimes a dead one, so two
    /// halves of a healed partition find each other again.
    pub(super) fn gossip_target(&mut self) -> Option<NodeId> {
        let now_ms = self.now_ms;
        let (alive, dead): (Vec<(&NodeId, &super::Peer)>, Vec<_>) = self
            .peers
            .iter()
            .filter(|(_, p)| !p.is_cut_off(now_ms))
            .partition(|(_, p)| p.state != PeerState::Dead);
        let pool: Vec<NodeId> = if !dead.is_empty() && (alive.is_empty() || self.rng.below(8) == 0)
        {
            dead.into_iter().map(|(n, _)| *n).collect()
        } else {
            alive.into_iter().map(|(n, _)| *n).collect()
        };
        if pool.is_empty() {
            return None;
        }
        Some(pool[self.rng.below(pool.len() as u64) as usize])
    }
}
