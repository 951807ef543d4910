//! Restores: fetching a chunk from the mesh. The local copy first; otherwise one holder at
//! a time, with a timeout each, chosen when it is asked (`next_candidate`): peers that
//! have answered this node before, then peers merely believed alive, then suspected ones;
//! within a class the chunk's placement targets before other nodes of the owner's
//! partners; among those, the one expected to answer first given the fetches already
//! waiting on it and how fast it answered before. So a restore draws on every holder at
//! once, the fastest most, and a burnt office's nodes (not yet declared dead) are asked
//! only when nobody else has the chunk. The engine checks the owner's signature on every blob it gets
//! (a bad one is a strike, and the next holder is asked); the caller opens the sealed
//! bytes (only it has the vault key) and asks again, excluding a node whose bytes do not
//! open.

use super::message::Message;
use super::replication::ReadPurpose;
use super::{Engine, Event, PeerState, StorageOp};
use crate::identity::{NodeId, SiteId};
use crate::ids::ChunkId;

/// Fetches one engine runs at once.
pub const FETCHES_MAX: usize = 4096;
/// Chunk reads waiting for the disk (pushes, fetches, and chunks served to peers).
pub const READS_MAX: usize = 8192;

/// A fetch's guess of a holder's answer time before it has answered one.
const FETCH_MS_UNKNOWN: u64 = 1;

#[derive(Clone, Debug)]
pub(super) struct Fetch {
    pub owner: SiteId,
    /// Nodes not asked yet, and whether each is one of the chunk's placement targets.
    pub candidates: Vec<(NodeId, bool)>,
    pub asked: Option<NodeId>,
    pub asked_at_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("too many fetches at once (at most {FETCHES_MAX})")]
    TooMany,
}

impl Engine {
    /// Starts fetching a chunk of `owner`; the answer comes as `Event::Fetched` or
    /// `Event::FetchFailed`. Nodes in `exclude` (which sent bad bytes) are not asked.
    pub fn handle_fetch(
        &mut self,
        owner: SiteId,
        id: ChunkId,
        exclude: &[NodeId],
        now_ms: u64,
    ) -> Result<(), FetchError> {
        self.now_ms = self.now_ms.max(now_ms);
        if self.fetches.len() >= FETCHES_MAX && !self.fetches.contains_key(&id) {
            return Err(FetchError::TooMany);
        }
        self.place_owner(owner);
        let local = self.held.contains_key(&id) && !exclude.contains(&self.node);
        let targets = self
            .placement
            .targets(&owner, &id, self.config.replication_factor);
        let mut candidates: Vec<(NodeId, bool)> = targets.iter().map(|n| (*n, true)).collect();
        for node in self.placement.storer_nodes(&owner) {
            if !targets.contains(&node) {
                candidates.push((node, false));
            }
        }
        candidates.retain(|(n, _)| *n != self.node && !exclude.contains(n));
        self.unask(&id); // a fetch asked again (the caller excludes a node) starts over
        self.fetches.insert(
            id,
            Fetch {
                owner,
                candidates,
                asked: None,
                asked_at_ms: now_ms,
                deadline_ms: now_ms,
            },
        );
        if local {
            let op = self.next_op();
            self.reads.insert(op, (ReadPurpose::Fetch { owner }, id));
            self.fetches
                .get_mut(&id)
                .expect("inserted above")
                .deadline_ms = now_ms + self.config.request_timeout_ms;
            self.push_storage(StorageOp::Read { op, id });
        } else {
            self.fetch_remote(owner, id, now_ms);
        }
        self.after_input(now_ms);
        Ok(())
    }

    /// Asks the next candidate, or gives up.
    pub(super) fn fetch_remote(&mut self, owner: SiteId, id: ChunkId, now_ms: u64) {
        self.unask(&id);
        let Some(node) = self.next_candidate(&id, now_ms) else {
            if self.fetches.remove(&id).is_some() {
                self.push_event(Event::FetchFailed { owner, id });
            }
            return;
        };
        let fetch = self.fetches.get_mut(&id).expect("a candidate was found");
        fetch.asked = Some(node);
        fetch.asked_at_ms = now_ms;
        fetch.deadline_ms = now_ms + self.config.request_timeout_ms;
        *self.fetch_load.entry(node).or_insert(0) += 1;
        self.send(node, Message::Fetch { owner, id });
    }

    /// Takes the best candidate not asked yet out of the fetch (see the module text);
    /// dead and cut-off peers are dropped.
    fn next_candidate(&mut self, id: &ChunkId, now_ms: u64) -> Option<NodeId> {
        let fetch = self.fetches.get_mut(id)?;
        let peers = &self.peers;
        fetch.candidates.retain(|(node, _)| {
            peers
                .get(node)
                .is_some_and(|p| p.state != PeerState::Dead && !p.is_cut_off(now_ms))
        });
        let load = &self.fetch_load;
        let (best, _) = fetch
            .candidates
            .iter()
            .enumerate()
            .min_by_key(|(_, (node, target))| {
                let peer = &peers[node];
                let class = match peer.state {
                    PeerState::Live if peer.answered_at_ms > 0 => 0,
                    PeerState::Live => 1,
                    _ => 2,
                };
                let waiting = u64::from(load.get(node).copied().unwrap_or(0));
                let answer_ms = peer.fetch_ms.max(FETCH_MS_UNKNOWN);
                (
                    class,
                    !target,
                    (waiting + 1).saturating_mul(answer_ms),
                    *node,
                )
            })?;
        Some(fetch.candidates.swap_remove(best).0)
    }

    /// Forgets whom a fetch asked (answered, timed out or given up).
    fn unask(&mut self, id: &ChunkId) {
        let Some(node) = self.fetches.get_mut(id).and_then(|f| f.asked.take()) else {
            return;
        };
        if let Some(load) = self.fetch_load.get_mut(&node) {
            *load -= 1;
            if *load == 0 {
                self.fetch_load.remove(&node);
            }
        }
    }

    /// Folds one answer time (or a timeout) into the peer's estimate, 1/8 at a time.
    fn time_fetch(&mut self, node: NodeId, took_ms: u64) {
        if let Some(peer) = self.peers.get_mut(&node) {
            let took_ms = took_ms.max(FETCH_MS_UNKNOWN);
            peer.fetch_ms = if peer.fetch_ms == 0 {
                took_ms
            } else {
                (peer.fetch_ms * 7 + took_ms) / 8
            };
        }
    }

    pub(super) fn on_fetch(&mut self, from: NodeId, owner: SiteId, id: ChunkId) {
        // A peer asking faster than the disk answers gets "not here" and asks elsewhere.
        if self.held.get(&id).is_some_and(|h| h.owner == owner) && self.reads.len() < READS_MAX {
            let op = self.next_op();
            self.reads
                .insert(op, (ReadPurpose::Serve { to: from, owner }, id));
            self.push_storage(StorageOp::Read { op, id });
        } else {
            self.send(
                from,
                Message::FetchReply {
                    owner,
                    id,
                    sealed: None,
                },
            );
        }
    }

    pub(super) fn on_fetch_reply(
        &mut self,
        from: NodeId,
        owner: SiteId,
        id: ChunkId,
        sealed: Option<Vec<u8>>,
        now_ms: u64,
    ) {
        let Some(fetch) = self.fetches.get(&id) else {
            return;
        };
        if fetch.asked != Some(from) || fetch.owner != owner {
            return; // a late answer from a node already given up on
        }
        let took_ms = now_ms.saturating_sub(fetch.asked_at_ms);
        let Some(mut blob) = sealed else {
            return self.fetch_remote(owner, id, now_ms);
        };
        match self.blobs.verify(&owner, &id, &blob).map(<[u8]>::len) {
            Some(sealed_len) => {
                // The sealed bytes are the blob's front: drop the signature in place
                // rather than copy a chunk per fetch.
                blob.truncate(sealed_len);
                let sealed = blob;
                self.time_fetch(from, took_ms);
                self.unask(&id);
                self.fetches.remove(&id);
                self.push_event(Event::Fetched {
                    owner,
                    id,
                    from,
                    sealed,
                });
            }
            None => {
                // Not the owner's chunk: never handed on; the next holder is asked.
                self.counters.bad_blobs_received += 1;
                self.strike(
                    from,
                    format!("fetch reply for chunk {id:?} with a bad signature"),
                );
                self.fetch_remote(owner, id, now_ms);
            }
        }
    }

    pub(super) fn expire_fetches(&mut self, now_ms: u64) {
        let expired: Vec<(ChunkId, SiteId, NodeId)> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.deadline_ms <= now_ms)
            .filter_map(|(id, f)| Some((*id, f.owner, f.asked?)))
            .collect();
        for (id, owner, asked) in expired {
            // A holder that let the request time out is expected to be that slow again.
            self.time_fetch(asked, self.config.request_timeout_ms);
            self.fetch_remote(owner, id, now_ms);
        }
    }
}
