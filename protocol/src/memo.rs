//! What a node remembers having verified: a bounded set of 32-byte digests, the oldest
//! forgotten first. A signature check is a pure function of the bytes it covers, so a
//! digest over all of them stands for the check; verifiers keep the last few thousand
//! (blobs read again before each push, audit and scrub; records and certificates that
//! come back with every gossip round and reconnect).

use std::collections::{BTreeSet, VecDeque};

pub struct VerifiedMemo {
    digests: BTreeSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    max: usize,
}

impl VerifiedMemo {
    pub fn remembering(max: usize) -> VerifiedMemo {
        assert!(max > 0, "a memo remembers at least one digest");
        VerifiedMemo {
            digests: BTreeSet::new(),
            order: VecDeque::new(),
            max,
        }
    }

    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.digests.contains(digest)
    }

    /// Remembers `digest`, forgetting the oldest one when full.
    pub fn insert(&mut self, digest: [u8; 32]) {
        if self.digests.contains(&digest) {
            return;
        }
        if self.order.len() >= self.max {
            if let Some(oldest) = self.order.pop_front() {
                self.digests.remove(&oldest);
            }
        }
        self.digests.insert(digest);
        self.order.push_back(digest);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_first_and_never_grows_past_its_bound() {
        let mut memo = VerifiedMemo::remembering(3);
        for i in 0..5u8 {
            memo.insert([i; 32]);
            memo.insert([i; 32]);
        }
        assert_eq!(memo.len(), 3);
        assert!(!memo.contains(&[0; 32]) && !memo.contains(&[1; 32]));
        assert!((2..5u8).all(|i| memo.contains(&[i; 32])));
    }
}
