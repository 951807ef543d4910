//! Restores: fetching a chunk from the mesh. The local copy first; otherwise the chunk's
//! placement targets, then every other node that may hold the owner's chunks, one at a
//! time with a timeout each. The engine checks the owner's signature on every blob it gets
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

#[derive(Clone, Debug)]
pub(super) struct Fetch {
    pub owner: SiteId,
    pub candidates: Vec<NodeId>,
    pub next: usize,
    pub asked: Option<NodeId>,
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
        let mut candidates = self
            .placement
            .targets(&owner, &id, self.config.replication_factor);
        for node in self.placement.storer_nodes(&owner) {
            if !candidates.contains(&node) {
                candidates.push(node);
            }
        }
        candidates.retain(|n| *n != self.node && !exclude.contains(n));
        self.fetches.insert(
            id,
            Fetch {
                owner,
                candidates,
                next: 0,
                asked: None,
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
        let timeout_ms = self.config.request_timeout_ms;
        loop {
            let Some(fetch) = self.fetches.get_mut(&id) else {
                return;
            };
            let Some(node) = fetch.candidates.get(fetch.next).copied() else {
                self.fetches.remove(&id);
                self.push_event(Event::FetchFailed { owner, id });
                return;
            };
            fetch.next += 1;
            if self
                .peers
                .get(&node)
                .is_none_or(|p| p.state == PeerState::Dead || p.is_cut_off(now_ms))
            {
                continue;
            }
            fetch.asked = Some(node);
            fetch.deadline_ms = now_ms + timeout_ms;
            self.send(node, Message::Fetch { owner, id });
            return;
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
        let Some(blob) = sealed else {
            return self.fetch_remote(owner, id, now_ms);
        };
        match self.blobs.verify(&owner, &id, &blob) {
            Some(sealed) => {
                let sealed = sealed.to_vec();
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
        let expired: Vec<(ChunkId, SiteId)> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.deadline_ms <= now_ms && f.asked.is_some())
            .map(|(id, f)| (*id, f.owner))
            .collect();
        for (id, owner) in expired {
            self.fetch_remote(owner, id, now_ms);
        }
    }
}
