//! Which holder to ask for each chunk this node lacks. Holders offer; this node asks each
//! holder for at most `PULLS_PER_SOURCE_MAX` chunks at a time and asks again as chunks
//! arrive, so a fast office ends up sending more than a slow one and no chunk is sent
//! twice. A request not answered in time goes back to the pool for any holder.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::identity::{NodeId, SiteId};
use crate::ids::ChunkId;

/// Chunks asked of one holder at once.
pub const PULLS_PER_SOURCE_MAX: usize = 16;
/// Chunks this node knows it lacks and may ask for.
pub const WANTED_MAX: usize = 1 << 20;
/// Holders remembered per wanted chunk.
pub const SOURCES_PER_CHUNK_MAX: usize = 8;

#[derive(Debug)]
struct Want {
    owner: SiteId,
    sources: Vec<NodeId>,
    asked: Option<(NodeId, u64)>,
    /// The holder whose request for it last went unanswered: not asked again while
    /// another holder may be.
    timed_out: Option<NodeId>,
}

#[derive(Debug, Default)]
pub(super) struct Pulls {
    wanted: BTreeMap<ChunkId, Want>,
    /// Per holder, chunks it offered, oldest first; stale entries are skipped lazily.
    by_source: BTreeMap<NodeId, VecDeque<ChunkId>>,
    outstanding: BTreeMap<NodeId, usize>,
    /// Every asked chunk by the time its request expires, so an expiry looks only at
    /// the requests that are due, not at every wanted chunk (at most `WANTED_MAX`).
    deadlines: BTreeSet<(u64, ChunkId)>,
}

impl Pulls {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.wanted.len()
    }

    /// `from` offered chunk `id`; false when the table is full.
    pub fn offered(&mut self, from: NodeId, owner: SiteId, id: ChunkId) -> bool {
        if !self.wanted.contains_key(&id) && self.wanted.len() >= WANTED_MAX {
            return false;
        }
        let want = self.wanted.entry(id).or_insert(Want {
            owner,
            sources: Vec::new(),
            asked: None,
            timed_out: None,
        });
        if !want.sources.contains(&from) && want.sources.len() < SOURCES_PER_CHUNK_MAX {
            want.sources.push(from);
            self.by_source.entry(from).or_default().push_back(id);
        }
        true
    }

    /// Chunks to ask `source` for now, each marked asked until `until_ms`.
    pub fn next_for(&mut self, source: NodeId, until_ms: u64) -> Vec<(SiteId, ChunkId)> {
        let mut out = Vec::new();
        let outstanding = self.outstanding.get(&source).copied().unwrap_or(0);
        let Some(queue) = self.by_source.get_mut(&source) else {
            return out;
        };
        while outstanding + out.len() < PULLS_PER_SOURCE_MAX {
            let Some(id) = queue.pop_front() else {
                break;
            };
            let Some(want) = self.wanted.get_mut(&id) else {
                continue;
            };
            // The holder that just failed to answer is skipped when there is another:
            // the engine asks the holders an expiry touched in id order, so without this
            // one that sorts first (a holder that is down, or that claims chunks it
            // dropped) would be asked for the chunk again and again.
            let skip_slow = want.timed_out == Some(source) && want.sources.len() > 1;
            if want.asked.is_some() || !want.sources.contains(&source) || skip_slow {
                continue;
            }
            want.asked = Some((source, until_ms));
            self.deadlines.insert((until_ms, id));
            out.push((want.owner, id));
        }
        if queue.is_empty() {
            self.by_source.remove(&source);
        }
        *self.outstanding.entry(source).or_insert(0) += out.len();
        out
    }

    /// A wanted chunk arrived (or will not): returns the holder it was asked of.
    pub fn arrived(&mut self, id: &ChunkId) -> Option<NodeId> {
        let want = self.wanted.remove(id)?;
        let (source, until_ms) = want.asked?;
        self.deadlines.remove(&(until_ms, *id));
        self.release(source);
        Some(source)
    }

    fn release(&mut self, source: NodeId) {
        if let Some(n) = self.outstanding.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.outstanding.remove(&source);
            }
        }
    }

    /// Requests past their time go back to every holder's queue; returns the holders
    /// that may be asked again.
    pub fn expire(&mut self, now_ms: u64) -> Vec<NodeId> {
        let mut released = Vec::new();
        let mut touched = Vec::new();
        // In chunk id order, as a walk over every wanted chunk would meet them: the
        // holders' queues get the chunks in that order.
        let due: BTreeSet<ChunkId> = self
            .deadlines
            .range(..=(now_ms, ChunkId([0xff; 32])))
            .map(|(_, id)| *id)
            .collect();
        self.deadlines = self
            .deadlines
            .split_off(&(now_ms.saturating_add(1), ChunkId([0; 32])));
        for id in due {
            let want = self
                .wanted
                .get_mut(&id)
                .expect("a deadline is kept only for a wanted chunk");
            let (source, until_ms) = want.asked.expect("a deadline is kept only while asked");
            debug_assert!(until_ms <= now_ms);
            want.asked = None;
            want.timed_out = Some(source);
            released.push(source);
            // The slow holder goes last, so another is tried first.
            want.sources.retain(|s| *s != source);
            want.sources.push(source);
            for s in &want.sources {
                self.by_source.entry(*s).or_default().push_back(id);
                touched.push(*s);
            }
        }
        for source in released {
            self.release(source);
        }
        touched.sort_unstable();
        touched.dedup();
        touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    fn chunk(i: u32) -> ChunkId {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        ChunkId(id)
    }

    #[test]
    fn each_chunk_is_asked_of_one_holder_and_holders_are_bounded() {
        let owner = SiteId([9; 32]);
        let mut pulls = Pulls::default();
        for i in 0..40 {
            pulls.offered(node(1), owner, chunk(i));
            pulls.offered(node(2), owner, chunk(i));
        }
        let a = pulls.next_for(node(1), 100);
        let b = pulls.next_for(node(2), 100);
        assert_eq!(a.len(), PULLS_PER_SOURCE_MAX);
        assert_eq!(b.len(), PULLS_PER_SOURCE_MAX);
        assert!(a.iter().all(|x| !b.contains(x)), "no chunk asked twice");
        assert!(
            pulls.next_for(node(1), 100).is_empty(),
            "holder 1 is at its limit"
        );
        // One arrives from holder 1: it may be asked for one more.
        assert_eq!(pulls.arrived(&a[0].1), Some(node(1)));
        assert_eq!(pulls.next_for(node(1), 100).len(), 1);
        assert_eq!(pulls.len(), 39);
    }

    #[test]
    fn an_unanswered_request_goes_to_another_holder() {
        let owner = SiteId([9; 32]);
        let mut pulls = Pulls::default();
        pulls.offered(node(1), owner, chunk(7));
        pulls.offered(node(2), owner, chunk(7));
        assert_eq!(pulls.next_for(node(1), 100), vec![(owner, chunk(7))]);
        assert!(pulls.next_for(node(2), 100).is_empty());
        assert!(pulls.expire(99).is_empty(), "not yet due");
        let touched = pulls.expire(100);
        assert_eq!(touched, vec![node(1), node(2)]);
        assert_eq!(pulls.next_for(node(2), 200), vec![(owner, chunk(7))]);
        assert_eq!(pulls.arrived(&chunk(7)), Some(node(2)));
        assert_eq!(pulls.len(), 0);
    }

    #[test]
    fn a_holder_that_did_not_answer_is_not_asked_again_first() {
        let owner = SiteId([9; 32]);
        let mut pulls = Pulls::default();
        pulls.offered(node(1), owner, chunk(7));
        pulls.offered(node(2), owner, chunk(7));
        assert_eq!(pulls.next_for(node(1), 100), vec![(owner, chunk(7))]);
        // The engine asks every holder the expiry touched, in the order returned.
        let asked: Vec<(NodeId, Vec<(SiteId, ChunkId)>)> = pulls
            .expire(100)
            .into_iter()
            .map(|source| (source, pulls.next_for(source, 200)))
            .collect();
        assert_eq!(
            asked,
            vec![(node(1), vec![]), (node(2), vec![(owner, chunk(7))])],
            "holder 1 did not answer: holder 2 is asked"
        );
        // Holder 2 does not answer either: holder 1 is tried again.
        let asked: Vec<(NodeId, Vec<(SiteId, ChunkId)>)> = pulls
            .expire(200)
            .into_iter()
            .map(|source| (source, pulls.next_for(source, 300)))
            .collect();
        assert_eq!(asked[0], (node(1), vec![(owner, chunk(7))]));
    }
}
