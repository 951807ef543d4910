//! Garbage collection, the holder's side (docs/retention.md, rules H1 to H4; H5 is in
//! `replication::confirm`). An owner's node publishes a statement (`crate::gc`) naming
//! batches of chunk ids no kept snapshot uses; every node that holds the owner's chunks:
//!
//! - **H1** fetches the batches, a piece at a time, only from nodes of the owner's site,
//!   and keeps a batch only if its ids hash to the batch's id. Every node keeps whole
//!   batches (at most `GC_BATCH_IDS_MAX` ids each): a node of the owner's site to serve
//!   them, a partner so that a listed chunk it takes later (back, while the statement was
//!   inactive) is condemned too. Only the owner's site serves them.
//! - **H2** acts on a statement only while its basis equals its own snapshot digest for
//!   the owner (`active`): a statement signed without some snapshot this node knows does
//!   nothing here.
//! - **H3** condemns the held chunks an active statement lists: from then on they are out
//!   of sync digests, never confirmed, pulled, offered or pushed, and their condemned time
//!   is set on this node's clock. A chunk the next active statement no longer lists is
//!   revived. While the statement is inactive, nothing is frozen. A chunk deleted here
//!   and taken back while the statement was inactive keeps its original condemned time
//!   when a statement listing it is active again, so it goes at the next tidy walk.
//! - **H4** deletes a condemned chunk of another site only when it has been condemned for
//!   max(owner's grace, `gc_grace_min_ms`), the active statement still lists it, this
//!   node's catalog agreed with a node of the owner's site within
//!   `GC_AGREEMENT_FRESH_MS` (since this engine started: agreements are not persisted),
//!   and the owner's deletion budget for the window allows it. Silence deletes nothing.
//!   The owner's own nodes never delete by H4: their copies go only by prune's sweep.
//!
//! Nothing here is persisted yet: after a restart, batches are fetched again and grace
//! starts again, which only makes a holder wait longer.

use std::collections::{BTreeMap, BTreeSet};

use super::message::{Message, IDS_PER_MESSAGE_MAX};
use super::{Engine, Event, PeerState, StorageOp};
use crate::catalog::RecordKey;
use crate::gc::{BatchHasher, BatchId, GcStatement, GC_BATCH_IDS_MAX};
use crate::identity::{NodeId, SiteId};
use crate::ids::ChunkId;
use crate::record::RecordKind;

/// Batches one node fetches at once.
pub const GC_BATCH_FETCHES_MAX: usize = 4;
/// How recent an agreement with the owner's site must be for a holder to delete on its
/// word (H4).
pub const GC_AGREEMENT_FRESH_MS: u64 = 3_600_000;

#[derive(Clone, Debug, Default)]
pub(super) struct GcState {
    owners: BTreeMap<SiteId, OwnerGc>,
    condemned: BTreeMap<ChunkId, Condemned>,
    fetches: BTreeMap<(SiteId, BatchId), BatchFetch>,
    /// Owners a chunk was newly held for since the last tidy walk: the walk condemns
    /// what of it an active statement lists.
    held_since_walk: BTreeSet<SiteId>,
}

#[derive(Clone, Debug, Default)]
struct OwnerGc {
    /// Batches of the current statement as known here, every id of each.
    batches: BTreeMap<BatchId, Vec<ChunkId>>,
    /// Sources a batch fetch failed with since the batch was listed.
    tried: BTreeMap<BatchId, BTreeSet<NodeId>>,
    agreed_at_ms: Option<u64>,
    window: Option<Window>,
}

impl OwnerGc {
    /// The ids `statement` lists, as far as this node knows its batches.
    fn listed(&self, statement: &GcStatement) -> BTreeSet<ChunkId> {
        statement
            .batches
            .iter()
            .filter_map(|b| self.batches.get(&b.id))
            .flatten()
            .copied()
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Window {
    started_ms: u64,
    budget_bytes: u64,
    spent_bytes: u64,
    /// A ripe deletion waited for the next window: the budget is spent.
    deferred: bool,
}

#[derive(Clone, Debug)]
pub(super) struct Condemned {
    owner: SiteId,
    since_ms: u64,
    /// Set while the statement that lists it is active: out of the sync digests (while
    /// held), and no copy of it is taken here.
    frozen: bool,
    /// Deleted here; kept while its batch is in force so no sync pulls it back.
    deleted: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Revive,
    Relist,
    Freeze,
}

#[derive(Clone, Debug)]
struct BatchFetch {
    from: NodeId,
    n_ids: u32,
    hasher: BatchHasher,
    kept: Vec<ChunkId>,
    deadline_ms: u64,
}

impl Engine {
    /// A batch of this site's garbage made here (by prune): kept whole, to serve to
    /// holders once a statement names it. Returns its id.
    pub fn handle_gc_batch(&mut self, mut ids: Vec<ChunkId>, now_ms: u64) -> BatchId {
        self.now_ms = self.now_ms.max(now_ms);
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(GC_BATCH_IDS_MAX);
        let id = BatchId::of(&ids);
        let site = self.site;
        self.gc
            .owners
            .entry(site)
            .or_default()
            .batches
            .insert(id, ids);
        self.gc_refresh(site, now_ms);
        self.after_input(now_ms);
        id
    }

    /// This node's prune swept these chunks of its own site off its disk (they are in no
    /// kept snapshot it knows of): they are no longer held here.
    pub fn handle_swept(&mut self, ids: &[ChunkId], now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        for id in ids {
            if self.held.get(id).is_some_and(|h| h.owner == self.site) {
                self.unhold(id);
                if let Some(c) = self.gc.condemned.get_mut(id) {
                    c.deleted = true;
                }
            }
        }
        self.after_input(now_ms);
    }

    /// The ids of one of `owner`'s batches, once made or fetched here.
    pub fn gc_batch(&self, owner: &SiteId, batch: &BatchId) -> Option<&[ChunkId]> {
        self.gc
            .owners
            .get(owner)
            .and_then(|o| o.batches.get(batch))
            .map(Vec::as_slice)
    }

    /// Chunks of `owner` condemned here and not yet deleted, and their bytes.
    pub fn gc_condemned(&self, owner: &SiteId) -> (usize, u64) {
        self.gc
            .condemned
            .iter()
            .filter(|(_, c)| c.owner == *owner && !c.deleted)
            .fold((0, 0), |(n, bytes), (id, _)| {
                (n + 1, bytes + self.held.get(id).map_or(0, |h| h.size_bytes))
            })
    }

    /// True while the deletion budget of `owner`'s current window is spent here and a
    /// ripe deletion waits for the next window (H4; docs/retention.md 3.5).
    pub fn gc_window_deferred(&self, owner: &SiteId, now_ms: u64) -> bool {
        self.gc
            .owners
            .get(owner)
            .and_then(|o| o.window)
            .is_some_and(|w| {
                w.deferred && now_ms.saturating_sub(w.started_ms) < self.config.gc_window_ms
            })
    }

    /// `owner`'s statement, if it has one here.
    pub fn gc_statement(&self, owner: &SiteId) -> Option<GcStatement> {
        let record = self.catalog.get(&RecordKey {
            author: *owner,
            kind: RecordKind::GcStatement,
            key: [0; 32],
        })?;
        GcStatement::decode(&record.body).ok()
    }

    /// The statement of `owner` this node acts on: its basis is this node's snapshot
    /// digest for the owner (H2).
    pub fn gc_active(&self, owner: &SiteId) -> Option<GcStatement> {
        self.gc_statement(owner)
            .filter(|s| s.basis == self.catalog.snapshot_digest(owner))
    }

    /// True while `id` is condemned under an active statement: out of digests, never
    /// confirmed, offered or pushed (H3).
    pub(super) fn gc_frozen(&self, id: &ChunkId) -> bool {
        self.gc.condemned.get(id).is_some_and(|c| c.frozen)
    }

    /// True when a copy of `id` of `owner` must not come here: it is condemned, or was
    /// deleted, under the statement active now.
    pub(super) fn gc_refuses(&self, owner: &SiteId, id: &ChunkId) -> bool {
        self.gc
            .condemned
            .get(id)
            .is_some_and(|c| c.owner == *owner && c.frozen)
    }

    /// A gossip round from a node of `site` carried this digest for `site`'s records:
    /// equal to ours, it is an agreement (H4).
    pub(super) fn gc_heard_digest(&mut self, site: SiteId, author: SiteId, equal: bool) {
        if site == author && equal {
            self.gc.owners.entry(author).or_default().agreed_at_ms = Some(self.now_ms);
        }
    }

    /// An owner's statement or snapshot records changed here: condemn, revive, freeze.
    pub(super) fn gc_refresh(&mut self, owner: SiteId, now_ms: u64) {
        let statement = self.gc_statement(&owner);
        if statement.is_none() && !self.gc.owners.contains_key(&owner) {
            return; // never collected here: nothing to condemn or thaw
        }
        let active = statement
            .as_ref()
            .filter(|s| s.basis == self.catalog.snapshot_digest(&owner));
        let state = self.gc.owners.entry(owner).or_default();
        // Batches no statement names any more are dropped, with the deleted ids they
        // kept out.
        let named: BTreeSet<BatchId> = statement
            .iter()
            .flat_map(|s| s.batches.iter().map(|b| b.id))
            .collect();
        state
            .batches
            .retain(|id, _| named.contains(id) || owner == self.site);
        state.tried.retain(|id, _| named.contains(id));
        let Some(active) = active else {
            // Inactive: nothing is frozen, the condemned times are kept for when a
            // statement on this node's basis arrives.
            let thawed: Vec<ChunkId> = self
                .gc
                .condemned
                .iter()
                .filter(|(_, c)| c.owner == owner && c.frozen)
                .map(|(id, _)| *id)
                .collect();
            for id in thawed {
                self.gc_set_frozen(&id, false);
            }
            return;
        };
        let known_all = active
            .batches
            .iter()
            .all(|b| state.batches.contains_key(&b.id));
        let listed = state.listed(active);
        let mut changes = Vec::new();
        for (id, c) in &self.gc.condemned {
            if c.owner != owner {
                continue;
            }
            if !listed.contains(id) {
                // Revived, once every batch is known (a renamed batch not yet fetched
                // may still list it, with its old time). A deleted id whose batch left
                // the statement may come back like any chunk.
                if known_all {
                    changes.push((*id, Change::Revive));
                }
            } else if c.deleted && self.held.contains_key(id) {
                // Held again since it was deleted here (taken back while the statement
                // was inactive, e.g. a commit whose restate was lost): still listed, so
                // it keeps its original condemned time (docs/retention.md 3.4) and goes
                // at the next tidy walk instead of waiting out a second grace.
                changes.push((*id, Change::Relist));
            } else if !c.frozen {
                changes.push((*id, Change::Freeze));
            }
        }
        for (id, change) in changes {
            match change {
                Change::Revive => {
                    self.gc_set_frozen(&id, false);
                    let revived = self.gc.condemned.remove(&id).is_some_and(|c| !c.deleted);
                    if revived {
                        self.counters.gc_revived += 1;
                    }
                }
                Change::Relist => {
                    if let Some(c) = self.gc.condemned.get_mut(&id) {
                        c.deleted = false;
                    }
                    self.gc_set_frozen(&id, true);
                }
                Change::Freeze => self.gc_set_frozen(&id, true),
            }
        }
        for id in listed {
            let held_here = self.held.get(&id).is_some_and(|h| h.owner == owner);
            if held_here && !self.gc.condemned.contains_key(&id) {
                self.gc.condemned.insert(
                    id,
                    Condemned {
                        owner,
                        since_ms: now_ms,
                        frozen: false,
                        deleted: false,
                    },
                );
                self.gc_set_frozen(&id, true);
            }
        }
    }

    /// An owner no longer trusted: its condemned chunks go back to normal (`trim` drops
    /// them under its own rules).
    pub(super) fn gc_forget_owner(&mut self, owner: &SiteId) {
        let ids: Vec<ChunkId> = self
            .gc
            .condemned
            .iter()
            .filter(|(_, c)| c.owner == *owner)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.gc_set_frozen(&id, false);
            self.gc.condemned.remove(&id);
        }
        self.gc.owners.remove(owner);
        self.gc.fetches.retain(|(o, _), _| o != owner);
    }

    /// A chunk of `owner` is held here now: if a statement lists it, the next tidy walk
    /// condemns it (a copy taken while the statement was inactive, or before its batch
    /// was fetched here).
    pub(super) fn gc_note_held(&mut self, owner: SiteId) {
        if self.gc.owners.contains_key(&owner) {
            self.gc.held_since_walk.insert(owner);
        }
    }

    /// Takes a held chunk out of (or back into) the sync digests it is counted in.
    fn gc_set_frozen(&mut self, id: &ChunkId, frozen: bool) {
        let Some(c) = self.gc.condemned.get_mut(id) else {
            return;
        };
        if c.frozen == frozen {
            return;
        }
        c.frozen = frozen;
        if let Some(held) = self.held.get(id) {
            if held.excess_since_ms.is_none() {
                let (owner, targets) = (held.owner, held.targets.clone());
                self.xor_pair_digests(id, &owner, &targets);
            }
        }
    }

    /// The tidy walk's share: fetch what the statements name, then delete what H4 allows.
    pub(super) fn gc_tick(&mut self, now_ms: u64) {
        self.expire_gc_fetches(now_ms);
        for owner in std::mem::take(&mut self.gc.held_since_walk) {
            self.gc_refresh(owner, now_ms);
        }
        let owners: Vec<SiteId> = self
            .catalog
            .authors()
            .filter(|a| self.gc_statement(a).is_some())
            .collect();
        for owner in &owners {
            self.start_gc_fetches(*owner, now_ms);
        }
        for owner in owners {
            if owner != self.site {
                self.collect(owner, now_ms);
            }
        }
    }

    fn start_gc_fetches(&mut self, owner: SiteId, now_ms: u64) {
        let Some(statement) = self.gc_statement(&owner) else {
            return;
        };
        let sources: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.site == owner && p.state == PeerState::Live && !p.is_cut_off(now_ms))
            .map(|(id, _)| *id)
            .collect();
        for batch in statement.batches {
            if self.gc.fetches.len() >= GC_BATCH_FETCHES_MAX {
                return;
            }
            let state = self.gc.owners.entry(owner).or_default();
            if state.batches.contains_key(&batch.id)
                || self.gc.fetches.contains_key(&(owner, batch.id))
            {
                continue;
            }
            let tried = state.tried.entry(batch.id).or_default();
            let Some(from) = sources.iter().find(|s| !tried.contains(*s)).copied() else {
                // Every source failed once: start over at the next walk.
                tried.clear();
                continue;
            };
            self.gc.fetches.insert(
                (owner, batch.id),
                BatchFetch {
                    from,
                    n_ids: batch.n_ids,
                    hasher: BatchHasher::default(),
                    kept: Vec::new(),
                    deadline_ms: now_ms + self.config.request_timeout_ms,
                },
            );
            self.send(
                from,
                Message::GcWant {
                    owner,
                    batch: batch.id,
                    from_index: 0,
                },
            );
        }
    }

    fn expire_gc_fetches(&mut self, now_ms: u64) {
        let expired: Vec<(SiteId, BatchId)> = self
            .gc
            .fetches
            .iter()
            .filter(|(_, f)| f.deadline_ms <= now_ms)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            self.gc_fetch_failed(key);
        }
    }

    fn gc_fetch_failed(&mut self, key: (SiteId, BatchId)) {
        if let Some(fetch) = self.gc.fetches.remove(&key) {
            let state = self.gc.owners.entry(key.0).or_default();
            state.tried.entry(key.1).or_default().insert(fetch.from);
        }
    }

    /// H1, serving: only this site's batches, only to nodes of sites that store for it.
    pub(super) fn on_gc_want(
        &mut self,
        from: NodeId,
        owner: SiteId,
        batch: BatchId,
        from_index: u32,
    ) {
        let from_site = self.peers.get(&from).map(|p| p.site);
        let may_get = owner == self.site
            && from_site.is_some_and(|s| {
                s == self.site || self.catalog.storers_for(owner).iter().any(|(x, _)| *x == s)
            });
        let ids = if may_get {
            self.gc
                .owners
                .get(&owner)
                .and_then(|o| o.batches.get(&batch))
        } else {
            None
        };
        // Without the batch (or the right to it), the answer is "none" at index 0: a
        // fetcher that has pieces already takes it for a late answer and asks elsewhere
        // at its timeout, with no strike against an honest node that lost the batch.
        let (from_index, ids, last) = match ids {
            Some(ids) => {
                let start = (from_index as usize).min(ids.len());
                let end = (start + IDS_PER_MESSAGE_MAX).min(ids.len());
                (from_index, ids[start..end].to_vec(), end == ids.len())
            }
            None => (0, Vec::new(), true),
        };
        self.send(
            from,
            Message::GcIds {
                owner,
                batch,
                from_index,
                ids,
                last,
            },
        );
    }

    /// H1, fetching: the pieces must come in order from the node asked, and the whole
    /// must hash to the batch's id; a wrong batch is a strike.
    pub(super) fn on_gc_ids(
        &mut self,
        from: NodeId,
        owner: SiteId,
        batch: BatchId,
        from_index: u32,
        ids: Vec<ChunkId>,
        last: bool,
    ) {
        let now_ms = self.now_ms;
        let key = (owner, batch);
        let Some(fetch) = self.gc.fetches.get_mut(&key) else {
            return; // not asked for, or given up on
        };
        if fetch.from != from || from_index as usize != fetch.hasher.count() {
            return; // a late answer to an earlier ask
        }
        if ids.is_empty() && last && from_index == 0 && fetch.n_ids > 0 {
            self.gc_fetch_failed(key); // it does not have the batch
            return;
        }
        let mut bad = None;
        for id in &ids {
            if !fetch.hasher.update(id) {
                bad = Some("batch ids out of order");
                break;
            }
            fetch.kept.push(*id);
        }
        if fetch.hasher.count() > fetch.n_ids as usize {
            bad = Some("batch longer than its statement says");
        }
        if bad.is_none() && last && fetch.hasher.finish() != batch {
            bad = Some("batch ids do not hash to the batch's id");
        }
        if let Some(reason) = bad {
            self.gc_fetch_failed(key);
            self.strike(
                from,
                format!("gc batch {}: {reason}", crate::ids::hex(&batch.0[..4])),
            );
            return;
        }
        if !last {
            fetch.deadline_ms = now_ms + self.config.request_timeout_ms;
            let from_index = fetch.hasher.count() as u32;
            self.send(
                from,
                Message::GcWant {
                    owner,
                    batch,
                    from_index,
                },
            );
            return;
        }
        let fetch = self.gc.fetches.remove(&key).expect("looked up above");
        self.counters.gc_batches_fetched += 1;
        let state = self.gc.owners.entry(owner).or_default();
        state.batches.insert(batch, fetch.kept);
        state.tried.remove(&batch);
        self.gc_refresh(owner, now_ms);
    }

    /// H4: deletes what has waited out its grace under the active statement, within the
    /// window's budget, while this node agrees with the owner's site.
    fn collect(&mut self, owner: SiteId, now_ms: u64) {
        let Some(statement) = self.gc_active(&owner) else {
            return;
        };
        let state = self.gc.owners.entry(owner).or_default();
        let agreed = state
            .agreed_at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) <= GC_AGREEMENT_FRESH_MS);
        if !agreed {
            return;
        }
        let listed = state.listed(&statement);
        let wait_ms = statement.grace_ms.max(self.config.gc_grace_min_ms);
        let ripe: Vec<ChunkId> = self
            .gc
            .condemned
            .iter()
            .filter(|(id, c)| {
                c.owner == owner
                    && c.frozen
                    && !c.deleted
                    && now_ms.saturating_sub(c.since_ms) >= wait_ms
                    && listed.contains(id)
            })
            .map(|(id, _)| *id)
            .collect();
        if ripe.is_empty() {
            return;
        }
        let held_bytes = self.used_by_owner.get(&owner).copied().unwrap_or(0);
        let config = &self.config;
        let state = self.gc.owners.get_mut(&owner).expect("made above");
        let window = match state.window {
            Some(w) if now_ms.saturating_sub(w.started_ms) < config.gc_window_ms => w,
            _ => Window {
                started_ms: now_ms,
                budget_bytes: (u128::from(held_bytes) * u128::from(config.gc_window_percent) / 100)
                    .max(u128::from(config.gc_window_min_bytes))
                    as u64,
                spent_bytes: 0,
                deferred: false,
            },
        };
        let mut window = window;
        for id in ripe {
            let size_bytes = self.held.get(&id).map_or(0, |h| h.size_bytes);
            if window.spent_bytes + size_bytes > window.budget_bytes {
                self.counters.gc_window_deferred += 1;
                window.deferred = true;
                break;
            }
            window.spent_bytes += size_bytes;
            // Out of the digests already (frozen); `unhold` must not count it again.
            if let Some(c) = self.gc.condemned.get_mut(&id) {
                c.deleted = true;
            }
            self.unhold(&id);
            self.push_storage(StorageOp::Delete { owner, id });
            self.counters.gc_collected += 1;
            self.counters.gc_collected_bytes += size_bytes;
            self.push_event(Event::Collected { owner, id });
        }
        if let Some(state) = self.gc.owners.get_mut(&owner) {
            state.window = Some(window);
        }
    }
}
impl Engine {
    /// A one-line account of why `id` of `owner` is (not) collected here, for the
    /// simulator's traces (CAIRN_SIM_TRACE_GC).
    pub fn gc_explain(&self, owner: &SiteId, id: &ChunkId, now_ms: u64) -> String {
        let statement = self.gc_statement(owner);
        let digest = self.catalog.snapshot_digest(owner);
        let state = self.gc.owners.get(owner);
        let listed_known = match (&statement, state) {
            (Some(s), Some(o)) => o.listed(s).contains(id),
            _ => false,
        };
        let in_unfetched: Vec<String> = match (&statement, state) {
            (Some(s), Some(o)) => s
                .batches
                .iter()
                .filter(|b| !o.batches.contains_key(&b.id))
                .map(|b| crate::ids::hex(&b.id.0[..4]))
                .collect(),
            (Some(s), None) => s
                .batches
                .iter()
                .map(|b| crate::ids::hex(&b.id.0[..4]))
                .collect(),
            _ => Vec::new(),
        };
        let fetching: Vec<String> = self
            .gc
            .fetches
            .keys()
            .filter(|(o, _)| o == owner)
            .map(|(_, b)| crate::ids::hex(&b.0[..4]))
            .collect();
        format!(
            "held {} condemned {:?} statement v? basis==digest {} batches {:?} unfetched {:?} fetching {:?} listed(known) {} agreed_ago_ms {:?} window {:?}",
            self.held.contains_key(id),
            self.gc.condemned.get(id).map(|c| (now_ms.saturating_sub(c.since_ms), c.frozen, c.deleted)),
            statement.as_ref().is_some_and(|s| s.basis == digest),
            statement.as_ref().map(|s| s.batches.iter().map(|b| (crate::ids::hex(&b.id.0[..4]), b.n_ids)).collect::<Vec<_>>()),
            in_unfetched,
            fetching,
            listed_known,
            state.and_then(|o| o.agreed_at_ms).map(|a| now_ms.saturating_sub(a)),
            state.and_then(|o| o.window),
        )
    }
}
