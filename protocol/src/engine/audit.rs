//! Audits: co-holders prove they still hold what they claim to.
//!
//! Every `audit_interval_ms` a node picks one chunk it holds in place (walking its chunks
//! in order, a random few skipped each time) and one other
//! target of that chunk that claims to hold it (it confirmed the chunk, or its last sync
//! root for that owner equals ours, which covers every chunk we should both hold). It
//! reads its own copy, checks the owner's signature, computes
//! `blob::audit_proof(nonce, id, sealed)` with a fresh nonce from the seeded generator,
//! and sends `Audit`. The holder reads its copy (checking it the same way) and answers
//! with the proof, or `None` when it has no good copy.
//!
//! A wrong proof, a `None`, or no answer within `request_timeout_ms` of a second asking
//! (the same audit, sent again once the first went unanswered) is `Event::AuditFailed`. No answer counts against the holder only when it answered other
//! requests meanwhile (`Late`); a peer that answered nothing at all may sit behind a
//! one-way partition, which is the link's fault, not its disk's (`Unreachable`). The holder loses its confirmation; one that said it lacks the
//! chunk is offered it again. A failure adds `AUDIT_FAILURE_POINTS` to the holder's
//! score and a pass takes `AUDIT_PASS_POINTS` off, so a holder that fails more than one
//! audit in three climbs; at `AUDIT_POINTS_MAX` (three failures in a row) this node
//! leaves it out of placement for `AUDIT_EXCLUSION_MS` (`Event::HolderExcluded`), and
//! the chunks it held for this node's view are copied to the next-ranked nodes. The
//! exclusion is this node's own judgement: it is not gossiped.

use std::ops::Bound;

use super::fetch::READS_MAX;
use super::replication::{root_of, ReadPurpose};
use super::{AuditFailure, Engine, Event, PeerState, StorageOp};
use crate::blob::audit_proof;
use crate::identity::{NodeId, SiteId};
use crate::ids::ChunkId;
use crate::record::TrustView;

use super::message::Message;

/// Audits this node has in flight (at most one per co-holder).
pub const AUDITS_IN_FLIGHT_MAX: usize = 64;
/// Audits from one peer this node reads its copies for at once; an honest auditor has
/// one in flight, so more is a strike.
pub const AUDIT_ANSWERS_PER_PEER_MAX: u32 = 4;
/// What a failed audit adds to the holder's score.
pub const AUDIT_FAILURE_POINTS: u32 = 2;
/// What a passed audit takes off it.
pub const AUDIT_PASS_POINTS: u32 = 1;
/// The score at which a holder is no longer placed on.
pub const AUDIT_POINTS_MAX: u32 = 6;
/// How long a holder that reached `AUDIT_POINTS_MAX` stays out of placement.
pub const AUDIT_EXCLUSION_MS: u64 = 24 * 3_600_000;
/// Chunks tried per audit round before giving up until the next one.
const AUDIT_PICK_TRIES: usize = 8;
/// The most held chunks skipped between two picked for an audit.
const AUDIT_SKIP_MAX: u64 = 3;

#[derive(Clone, Debug)]
pub(super) struct PendingAudit {
    pub id: ChunkId,
    pub owner: SiteId,
    pub nonce: [u8; 32],
    /// The proof this node computed from its own copy; `None` while that read is pending
    /// (the audit is not sent yet).
    pub expected: Option<[u8; 32]>,
    pub deadline_ms: u64,
    /// When the audit went out.
    pub sent_at_ms: u64,
    /// Sent a second time after the first went unanswered.
    pub retried: bool,
}

impl Engine {
    /// Picks a chunk and a co-holder to audit, and reads this node's copy to know the
    /// answer; the audit goes out when the read completes (`audit_read`).
    pub(super) fn start_audit(&mut self, now_ms: u64) {
        if self.audits.len() >= AUDITS_IN_FLIGHT_MAX
            || self.reads.len() >= READS_MAX
            || self.held.is_empty()
        {
            return;
        }
        if self.placement_stale {
            self.rebuild_placement();
        }
        for _ in 0..AUDIT_PICK_TRIES {
            // Walk the held chunks in order, skipping a random few each time: every chunk
            // is as likely to be picked as any other (a random probe into the id space
            // would favour chunks after wide gaps), and no holder can tell which is next.
            let skip = self.rng.below(AUDIT_SKIP_MAX + 1) as usize;
            let Some((id, held)) = self
                .audit_cursor
                .and_then(|cursor| {
                    self.held
                        .range((Bound::Excluded(cursor), Bound::Unbounded))
                        .nth(skip)
                })
                .or_else(|| self.held.iter().next())
            else {
                return;
            };
            self.audit_cursor = Some(*id);
            // A condemned chunk's co-holders may have deleted it, as they should.
            if held.excess_since_ms.is_some()
                || !self.trust.is_trusted(&held.owner)
                || self.gc_frozen(id)
            {
                continue;
            }
            let (id, owner) = (*id, held.owner);
            let candidates: Vec<NodeId> = held
                .targets
                .iter()
                .copied()
                .filter(|t| self.auditable(*t, owner, held.confirmed.contains_key(t)))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let to = candidates[self.rng.below(candidates.len() as u64) as usize];
            let mut nonce = [0u8; 32];
            self.rng.fill(&mut nonce);
            self.audits.insert(
                to,
                PendingAudit {
                    id,
                    owner,
                    nonce,
                    expected: None,
                    deadline_ms: now_ms + self.config.request_timeout_ms,
                    sent_at_ms: now_ms,
                    retried: false,
                },
            );
            let op = self.next_op();
            self.reads.insert(op, (ReadPurpose::Audit { to }, id));
            self.push_storage(StorageOp::Read { op, id });
            return;
        }
    }

    /// True when `node` may be audited for a chunk of `owner`: another live peer, not
    /// already being audited, that claims to hold the chunk.
    fn auditable(&self, node: NodeId, owner: SiteId, confirmed: bool) -> bool {
        let Some(peer) = self.peers.get(&node) else {
            return false;
        };
        if node == self.node
            || peer.state != PeerState::Live
            || peer.is_cut_off(self.now_ms)
            || peer.is_excluded(self.now_ms)
            || self.audits.contains_key(&node)
        {
            return false;
        }
        let claimed_all = self.their_roots.get(&(node, owner)).is_some_and(|theirs| {
            self.pair_digests
                .get(&(node, owner))
                .is_some_and(|ours| *theirs == root_of(ours))
        });
        confirmed || claimed_all
    }

    /// This node read and checked its own copy for an audit of `to`: send the audit.
    pub(super) fn audit_read(&mut self, to: NodeId, id: ChunkId, sealed: &[u8]) {
        let now_ms = self.now_ms;
        let deadline_ms = now_ms + self.config.request_timeout_ms;
        let Some(pending) = self
            .audits
            .get_mut(&to)
            .filter(|a| a.id == id && a.expected.is_none())
        else {
            return;
        };
        pending.expected = Some(audit_proof(&pending.nonce, &id, sealed));
        pending.deadline_ms = deadline_ms;
        pending.sent_at_ms = now_ms;
        let (owner, nonce) = (pending.owner, pending.nonce);
        self.counters.audits_sent += 1;
        self.send(to, Message::Audit { owner, id, nonce });
    }

    /// This node's own copy turned out bad while preparing an audit of `to`: no audit.
    pub(super) fn audit_read_failed(&mut self, to: NodeId, id: ChunkId) {
        if self.audits.get(&to).is_some_and(|a| a.id == id) {
            self.audits.remove(&to);
        }
    }

    pub(super) fn on_audit(&mut self, from: NodeId, owner: SiteId, id: ChunkId, nonce: [u8; 32]) {
        let Some(from_site) = self.peers.get(&from).map(|p| p.site) else {
            return;
        };
        // Only a site that may hold the owner's chunks (or the owner) has a copy to check
        // an answer against; others learn nothing from one and get none.
        let may_hold = from_site == owner
            || self
                .catalog
                .storers_for(owner)
                .iter()
                .any(|(site, _)| *site == from_site);
        if !may_hold {
            self.counters.messages_refused += 1;
            return;
        }
        if self.held.get(&id).is_none_or(|h| h.owner != owner) {
            self.send(
                from,
                Message::AuditReply {
                    owner,
                    id,
                    nonce,
                    proof: None,
                },
            );
            return;
        }
        let answering = self.peers.get(&from).map_or(0, |p| p.audits_answering);
        if answering >= AUDIT_ANSWERS_PER_PEER_MAX {
            self.strike(from, "too many audits at once".into());
            return;
        }
        if self.reads.len() >= READS_MAX {
            return; // busy: the auditor counts it late, and it is rare
        }
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.audits_answering += 1;
        }
        let op = self.next_op();
        self.reads.insert(
            op,
            (
                ReadPurpose::AuditAnswer {
                    to: from,
                    owner,
                    nonce,
                },
                id,
            ),
        );
        self.push_storage(StorageOp::Read { op, id });
    }

    /// The read for an audit of this node finished; `sealed` is `None` when there was no
    /// good copy.
    pub(super) fn answer_audit(
        &mut self,
        to: NodeId,
        owner: SiteId,
        id: ChunkId,
        nonce: [u8; 32],
        sealed: Option<&[u8]>,
    ) {
        if let Some(peer) = self.peers.get_mut(&to) {
            peer.audits_answering = peer.audits_answering.saturating_sub(1);
        }
        let proof = sealed.map(|sealed| audit_proof(&nonce, &id, sealed));
        if proof.is_some() {
            self.counters.audits_answered += 1;
        }
        self.send(
            to,
            Message::AuditReply {
                owner,
                id,
                nonce,
                proof,
            },
        );
    }

    pub(super) fn on_audit_reply(
        &mut self,
        from: NodeId,
        owner: SiteId,
        id: ChunkId,
        nonce: [u8; 32],
        proof: Option<[u8; 32]>,
    ) {
        let Some(expected) = self
            .audits
            .get(&from)
            .filter(|a| a.id == id && a.owner == owner && a.nonce == nonce)
            .and_then(|a| a.expected)
        else {
            return; // an answer to an audit already counted late, or to none
        };
        self.audits.remove(&from);
        match proof {
            Some(proof) if proof == expected => self.audit_passed(from),
            Some(_) => self.audit_failed(from, owner, id, AuditFailure::Wrong),
            None => self.audit_failed(from, owner, id, AuditFailure::Missing),
        }
    }

    pub(super) fn expire_audits(&mut self, now_ms: u64) {
        let expired: Vec<(NodeId, super::audit::PendingAudit)> = self
            .audits
            .iter()
            .filter(|(_, a)| a.deadline_ms <= now_ms)
            .map(|(node, a)| (*node, a.clone()))
            .collect();
        for (node, audit) in expired {
            if audit.expected.is_some() && !audit.retried {
                // One lost message, the audit or its answer, is the link's doing, and an
                // honest holder behind a lossy link would otherwise climb to an exclusion
                // now and then, moving its chunks for a day. Ask once more, with the same
                // nonce, so a late first answer still counts.
                let deadline_ms = now_ms + self.config.request_timeout_ms;
                if let Some(pending) = self.audits.get_mut(&node) {
                    pending.retried = true;
                    pending.deadline_ms = deadline_ms;
                }
                self.counters.audits_retried += 1;
                let (owner, id, nonce) = (audit.owner, audit.id, audit.nonce);
                self.send(node, Message::Audit { owner, id, nonce });
                continue;
            }
            self.audits.remove(&node);
            if audit.expected.is_none() {
                continue; // never sent
            }
            let answered_since = self
                .peers
                .get(&node)
                .is_some_and(|p| p.answered_at_ms > audit.sent_at_ms);
            if answered_since {
                self.audit_failed(node, audit.owner, audit.id, AuditFailure::Late);
            } else {
                self.counters.audits_unreachable += 1;
                self.push_event(Event::AuditFailed {
                    node,
                    id: audit.id,
                    failure: AuditFailure::Unreachable,
                });
            }
        }
    }

    /// A proof shows the copy is there, not which snapshots the holder knows, so it is
    /// not a confirmation (rule H5): those come with a snapshot digest.
    fn audit_passed(&mut self, node: NodeId) {
        self.counters.audits_passed += 1;
        if let Some(peer) = self.peers.get_mut(&node) {
            peer.audit_points = peer.audit_points.saturating_sub(AUDIT_PASS_POINTS);
        }
    }

    fn audit_failed(&mut self, node: NodeId, owner: SiteId, id: ChunkId, failure: AuditFailure) {
        self.counters.audits_failed += 1;
        self.push_event(Event::AuditFailed { node, id, failure });
        if let Some(held) = self.held.get_mut(&id) {
            held.confirmed.remove(&node);
        }
        if failure == AuditFailure::Missing {
            // It says it lost its copy: offer it back; it pulls it like any repair.
            self.offer(node, owner, id);
        }
        let now_ms = self.now_ms;
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        peer.audit_points += AUDIT_FAILURE_POINTS;
        if peer.audit_points >= AUDIT_POINTS_MAX {
            peer.audit_points = 0;
            let until_ms = now_ms + AUDIT_EXCLUSION_MS;
            peer.excluded_until_ms = until_ms;
            self.next_penalty_end_ms = self.next_penalty_end_ms.min(until_ms);
            self.placement_stale = true;
            self.counters.holders_excluded += 1;
            self.push_event(Event::HolderExcluded { node, until_ms });
        }
    }
}
