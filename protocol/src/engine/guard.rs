//! Hostile peers: every message is checked before it changes anything.
//!
//! - A message from a node that is not a peer of a trusted site is refused unread
//!   (`Event::MessageRefused`), as is every message from a peer that is cut off.
//! - A message that breaks a rule an honest engine never breaks (oversized, malformed,
//!   lists of the wrong shape, a chunk body shorter than a signature, a fetch of another
//!   site's chunk, a forged record or blob) is dropped (`Event::MessageDropped`) and is a
//!   strike against its sender. Things honest peers do send, because views of trust and
//!   placement differ for a while (a record of a site this node does not trust, a push it
//!   has no quota for), are refused without a strike.
//! - `STRIKES_MAX` strikes, each within `STRIKE_MEMORY_MS` of the one before, cut the
//!   peer off for `CUT_OFF_MS`. Its heartbeats are ignored too, so after `dead_after_ms`
//!   its chunks are placed elsewhere; when the period ends it is heard again like any
//!   returning node.

use super::message::{Message, PARTITIONS};
use super::{partition_of, Engine, Event};
use crate::blob::{BLOB_BYTES_MAX, BLOB_SIGNATURE_BYTES};
use crate::identity::NodeId;
use crate::record::TrustView;

/// Strikes that cut a peer off.
pub const STRIKES_MAX: u32 = 5;
/// A strike this long after the previous one starts the count again, so a rare glitch
/// never adds up to a cut-off.
pub const STRIKE_MEMORY_MS: u64 = 10 * 60_000;
/// How long a peer that reached `STRIKES_MAX` stays cut off.
pub const CUT_OFF_MS: u64 = 15 * 60_000;

impl Engine {
    /// True when a message from `from` may be read at all: it is a peer of a trusted site
    /// and not cut off. Counts (and for strangers reports) the refusal otherwise.
    pub(super) fn admits(&mut self, from: NodeId) -> bool {
        let now_ms = self.now_ms;
        let (stranger, cut_off) = match self.peers.get(&from) {
            None => (true, false),
            Some(peer) => (!self.trust.is_trusted(&peer.site), peer.is_cut_off(now_ms)),
        };
        if stranger || cut_off {
            self.counters.messages_refused += 1;
            if stranger {
                self.push_event(Event::MessageRefused { from });
            }
            return false;
        }
        true
    }

    /// The rules a message must keep whatever this node's state: an honest engine never
    /// sends one that breaks them. Blobs and records are checked where they are used.
    pub(super) fn check_message(&self, from: NodeId, message: &Message) -> Result<(), String> {
        let from_site = self.peers.get(&from).map(|p| p.site);
        match message {
            Message::SyncDigest { digests, .. }
                if digests.len() != 1 && digests.len() != PARTITIONS =>
            {
                Err(format!("sync digest with {} partitions", digests.len()))
            }
            Message::SyncIds { partition, ids, .. } => {
                let partition = usize::from(*partition);
                if partition >= PARTITIONS {
                    Err(format!("sync ids for partition {partition}"))
                } else if ids.iter().any(|id| partition_of(id) != partition) {
                    Err(format!("sync ids outside partition {partition}"))
                } else {
                    Ok(())
                }
            }
            Message::Push {
                size_bytes, sealed, ..
            } => {
                if sealed.len() < BLOB_SIGNATURE_BYTES {
                    Err(format!(
                        "push of {} bytes, shorter than a signature",
                        sealed.len()
                    ))
                } else if sealed.len() as u64 > *size_bytes || *size_bytes > BLOB_BYTES_MAX as u64 {
                    Err(format!(
                        "push of {} bytes claiming {size_bytes}",
                        sealed.len()
                    ))
                } else {
                    Ok(())
                }
            }
            Message::FetchReply {
                sealed: Some(blob), ..
            } if blob.len() < BLOB_SIGNATURE_BYTES => Err(format!(
                "fetch reply of {} bytes, shorter than a signature",
                blob.len()
            )),
            // Restores are for the owner's own nodes; no one else can open the bytes.
            Message::Fetch { owner, .. } if from_site != Some(*owner) => {
                Err("fetch of another site's chunk".into())
            }
            Message::Gossip {
                reply: true,
                digests,
                ..
            } if !digests.is_empty() => Err("gossip reply carrying digests".into()),
            _ => Ok(()),
        }
    }

    /// A message from `from` failed a check: drop it, count it, and cut the peer off when
    /// it keeps doing so.
    pub(super) fn strike(&mut self, from: NodeId, reason: String) {
        self.counters.messages_dropped += 1;
        self.push_event(Event::MessageDropped { from, reason });
        let now_ms = self.now_ms;
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        if peer.strikes > 0 && now_ms.saturating_sub(peer.last_strike_ms) > STRIKE_MEMORY_MS {
            peer.strikes = 0;
        }
        peer.strikes += 1;
        peer.last_strike_ms = now_ms;
        if peer.strikes >= STRIKES_MAX {
            peer.strikes = 0;
            peer.cut_off_until_ms = now_ms + CUT_OFF_MS;
            self.next_penalty_end_ms = self.next_penalty_end_ms.min(now_ms + CUT_OFF_MS);
            self.counters.peers_cut_off += 1;
            self.push_event(Event::PeerCutOff {
                node: from,
                until_ms: now_ms + CUT_OFF_MS,
            });
        }
    }

    /// Ends cut-offs and placement exclusions whose time is up.
    pub(super) fn end_penalties(&mut self, now_ms: u64) {
        if now_ms < self.next_penalty_end_ms {
            return;
        }
        let mut next = u64::MAX;
        for peer in self.peers.values_mut() {
            if peer.cut_off_until_ms != 0 && !peer.is_cut_off(now_ms) {
                peer.cut_off_until_ms = 0;
            }
            if peer.excluded_until_ms != 0 && !peer.is_excluded(now_ms) {
                peer.excluded_until_ms = 0;
                self.placement_stale = true;
            }
            for until_ms in [peer.cut_off_until_ms, peer.excluded_until_ms] {
                if until_ms != 0 {
                    next = next.min(until_ms);
                }
            }
        }
        self.next_penalty_end_ms = next;
    }
}
