//! Garbage collection at holders (docs/retention.md, H1 to H4): one test per rule, each
//! failing without its rule.

use super::*;
use crate::gc::{BatchRef, GcStatement};
use crate::record::{Tombstone, TOMBSTONE_VERSION};

/// Holders wait at least 10 s; owners ask 5 s.
fn gc_config() -> EngineConfig {
    EngineConfig {
        gc_grace_min_ms: 10_000,
        ..test_config()
    }
}

const OWNER_GRACE_MS: u64 = 5_000;

impl Net {
    /// Node `i`'s site forgets snapshot `seed`: its tombstone, signed in at node `i`.
    fn forget(&mut self, i: usize, seed: u8) {
        let key = self.sites[self.site_of[i]].key.clone();
        let body = Tombstone {
            forgotten_unix_ms: self.now_ms,
        }
        .encode();
        let tombstone = Record::sign(
            &key,
            RecordKind::Snapshot,
            [seed; 32],
            TOMBSTONE_VERSION,
            body,
        );
        let now_ms = self.now_ms;
        self.nodes[i]
            .engine
            .handle_local_record(tombstone, now_ms)
            .expect("valid");
        self.pump(i);
    }

    /// Node `i` lists `ids` as its site's garbage in one batch, and signs a statement
    /// naming it at `version` on `basis` (None: its own snapshot digest now).
    fn list_garbage(&mut self, i: usize, ids: &[ChunkId], version: u64, basis: Option<u64>) {
        let site = self.sites[self.site_of[i]].id;
        let key = self.sites[self.site_of[i]].key.clone();
        let now_ms = self.now_ms;
        let batch = self.nodes[i].engine.handle_gc_batch(ids.to_vec(), now_ms);
        let batches = if ids.is_empty() {
            Vec::new()
        } else {
            vec![BatchRef {
                id: batch,
                n_ids: ids.len() as u32,
                bytes: 0,
                listed_unix_ms: now_ms,
            }]
        };
        let statement = GcStatement {
            basis: basis.unwrap_or_else(|| self.nodes[i].engine.catalog().snapshot_digest(&site)),
            grace_ms: OWNER_GRACE_MS,
            batches,
        };
        let record = Record::sign(
            &key,
            RecordKind::GcStatement,
            [0; 32],
            version,
            statement.encode(),
        );
        self.nodes[i]
            .engine
            .handle_local_record(record, now_ms)
            .expect("valid");
        self.pump(i);
    }

    /// Copies of `ids` on nodes other than `owner_node`.
    fn partner_copies(&self, owner_node: usize, ids: &[ChunkId]) -> usize {
        ids.iter()
            .map(|id| {
                self.holders(id)
                    .iter()
                    .filter(|n| **n != owner_node)
                    .count()
            })
            .sum()
    }

    fn collected(&self) -> usize {
        (0..self.nodes.len())
            .map(|i| count(self.events(i), |e| matches!(e, Event::Collected { .. })))
            .sum()
    }
}

fn ids_of(chunks: &[ChunkRef]) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    ids
}

/// Three sites, R = 2: node 0's snapshot `seed` of 8 chunks is acknowledged, so each
/// chunk has one partner copy.
fn replicated(config: EngineConfig, seed: u8) -> (Net, Vec<ChunkId>) {
    let mut net = Net::new(3, config);
    let chunks = net.backup(0, 8, seed);
    net.run_for(60_000);
    assert!(!net.nodes[0].engine.snapshot_pending(&[seed; 32]));
    let ids = ids_of(&chunks);
    assert_eq!(net.partner_copies(0, &ids), 8);
    (net, ids)
}

#[test]
fn listed_garbage_is_condemned_then_deleted_after_the_grace_and_the_owner_keeps_its_own() {
    let (mut net, ids) = replicated(gc_config(), 1);
    net.forget(0, 1);
    net.list_garbage(0, &ids, 1, None);
    // Within the holders' grace: condemned, nothing deleted.
    net.run_for(8_000);
    assert_eq!(net.partner_copies(0, &ids), 8, "deleted within the grace");
    let condemned: usize = (1..3)
        .map(|i| net.nodes[i].engine.gc_condemned(&net.sites[0].id).0)
        .sum();
    assert_eq!(condemned, 8);
    net.run_for(30_000);
    assert_eq!(net.partner_copies(0, &ids), 0, "garbage left at partners");
    assert_eq!(net.collected(), 8);
    assert!(
        ids.iter().all(|id| net.nodes[0].disk.contains_key(id)),
        "the owner's own copies go only by its prune's sweep"
    );
    // Nothing pushed them back: the owner's copies are frozen too.
    net.run_for(120_000);
    assert_eq!(net.partner_copies(0, &ids), 0);
}

#[test]
fn a_statement_signed_without_a_snapshot_a_holder_knows_deletes_nothing() {
    let (mut net, first) = replicated(gc_config(), 1);
    net.forget(0, 1);
    // The signer's view before snapshot 2: its statement lists snapshot 2's chunks too.
    let site = net.sites[0].id;
    let basis_without_second = net.nodes[0].engine.catalog().snapshot_digest(&site);
    let second = ids_of(&net.backup(0, 8, 2));
    net.run_for(60_000);
    assert!(!net.nodes[0].engine.snapshot_pending(&[2; 32]));
    let mut all: Vec<ChunkId> = first.iter().chain(&second).copied().collect();
    all.sort_unstable();
    net.list_garbage(0, &all, 1, Some(basis_without_second));
    net.run_for(120_000);
    assert_eq!(net.collected(), 0, "an inactive statement deleted chunks");
    assert_eq!(net.partner_copies(0, &second), 8);
    for i in 1..3 {
        assert!(net.nodes[i].engine.gc_active(&site).is_none());
        assert_eq!(net.nodes[i].engine.gc_condemned(&site).0, 0);
    }
}

#[test]
fn a_condemned_chunk_is_refused_and_a_later_statement_revives_it() {
    let config = EngineConfig {
        gc_grace_min_ms: 600_000,
        ..gc_config()
    };
    let (mut net, ids) = replicated(config, 1);
    let site = net.sites[0].id;
    net.forget(0, 1);
    net.list_garbage(0, &ids, 1, None);
    net.run_for(5_000);
    let holder = (1..3)
        .find(|i| net.nodes[*i].engine.gc_condemned(&site).0 > 0)
        .expect("a holder condemned");
    let id = *ids
        .iter()
        .find(|id| net.nodes[holder].disk.contains_key(id))
        .expect("held");
    // Offered: neither confirmed nor pulled. Pushed: not stored.
    let answers = net.send(
        0,
        holder,
        Message::Offer {
            owner: site,
            ids: vec![id],
        },
    );
    assert!(
        !answers
            .iter()
            .any(|m| matches!(m, Message::Need { have, .. } if have.contains(&id))),
        "a condemned chunk was confirmed: {answers:?}"
    );
    let blob = net.nodes[holder].disk[&id].clone();
    let answers = net.send(
        0,
        holder,
        Message::Push {
            owner: site,
            id,
            size_bytes: blob.len() as u64,
            sealed: blob,
        },
    );
    assert!(matches!(
        answers[..],
        [Message::PushAck { stored: false, .. }]
    ));
    // The next statement lists nothing: everything is revived, nothing goes.
    net.list_garbage(0, &[], 2, None);
    net.run_for(5_000);
    assert_eq!(net.nodes[holder].engine.gc_condemned(&site).0, 0);
    assert!(net.nodes[holder].engine.counters().gc_revived > 0);
    net.run_for(1_200_000);
    assert_eq!(net.collected(), 0);
    assert_eq!(net.partner_copies(0, &ids), 8);
}

#[test]
fn silence_deletes_nothing_and_the_owners_return_resumes() {
    // The holders wait 2 h, longer than an agreement stays fresh.
    let config = EngineConfig {
        gc_grace_min_ms: 2 * 3_600_000,
        ..gc_config()
    };
    let (mut net, ids) = replicated(config, 1);
    let site = net.sites[0].id;
    net.forget(0, 1);
    net.list_garbage(0, &ids, 1, None);
    net.run_for(10_000);
    assert!(net.nodes[1..]
        .iter()
        .all(|n| n.engine.counters().gc_batches_fetched == 1));
    // The owner's site goes silent for good.
    net.hostile.insert(0, Hostile::Gone);
    net.run_for(3 * 3_600_000);
    assert_eq!(
        net.collected(),
        0,
        "deleted on the word of a site gone silent"
    );
    assert_eq!(net.partner_copies(0, &ids), 8);
    // It comes back: the next agreement lets the ripe garbage go.
    net.hostile.remove(&0);
    net.run_for(600_000);
    assert_eq!(net.partner_copies(0, &ids), 0);
    assert!(net.nodes[1..]
        .iter()
        .all(|n| n.engine.gc_condemned(&site).0 == 0));
}

#[test]
fn a_batch_that_does_not_hash_to_its_id_is_a_strike_and_condemns_nothing() {
    let (mut net, ids) = replicated(gc_config(), 1);
    let site = net.sites[0].id;
    net.hostile.insert(0, Hostile::WrongGcBatch);
    net.forget(0, 1);
    net.list_garbage(0, &ids, 1, None);
    net.run_for(60_000);
    assert_eq!(net.collected(), 0);
    for i in 1..3 {
        assert_eq!(net.nodes[i].engine.gc_condemned(&site).0, 0);
        assert_eq!(net.nodes[i].engine.counters().gc_batches_fetched, 0);
        assert!(
            dropped(net.events(i)) > 0,
            "node {i} took an altered batch quietly"
        );
    }
    assert_eq!(net.partner_copies(0, &ids), 8);
    // Served honestly, the same batch goes through.
    net.hostile.remove(&0);
    net.run_for(CUT_OFF_MS + 120_000);
    assert_eq!(net.partner_copies(0, &ids), 0);
}

#[test]
fn a_window_deletes_at_most_its_share_of_what_a_holder_keeps_for_an_owner() {
    let config = EngineConfig {
        gc_window_percent: 25,
        gc_window_min_bytes: 1,
        gc_window_ms: 3_600_000,
        ..gc_config()
    };
    let (mut net, ids) = replicated(config, 1);
    net.forget(0, 1);
    net.list_garbage(0, &ids, 1, None);
    net.run_for(60_000);
    for i in 1..3 {
        let held = ids
            .iter()
            .filter(|id| net.nodes[i].disk.contains_key(id))
            .count();
        let gone = count(net.events(i), |e| matches!(e, Event::Collected { .. }));
        // Chunks are about the same size: a quarter of what it held, rounded down.
        assert!(
            gone <= (held + gone) / 4,
            "node {i}: {gone} of {}",
            held + gone
        );
        if held + gone >= 4 {
            assert!(net.nodes[i].engine.counters().gc_window_deferred > 0);
        }
    }
    assert!(net.partner_copies(0, &ids) > 0);
    // The next window lets more go.
    let before = net.collected();
    net.run_for(3_600_000);
    assert!(net.collected() > before);
}

/// Found by invariant 12 (`retention.toml` seeds 1 to 4): a holder deletes garbage, a
/// commit whose restate is lost makes the statement inactive (the owner's copies spread
/// back, as H2 allows), and a restate lists the same batch again. The copies taken back
/// keep their original condemned time (docs/retention.md 3.4): they go at the next tidy
/// walk, not after a second grace.
#[test]
fn garbage_taken_back_while_inactive_keeps_its_condemned_time() {
    let (mut net, ids) = replicated(gc_config(), 1);
    net.forget(0, 1);
    net.list_garbage(0, &ids, 1, None);
    net.run_for(30_000);
    assert_eq!(net.partner_copies(0, &ids), 0, "collected after the grace");
    net.backup(0, 8, 2); // its restate is lost
    net.run_for(60_000);
    assert!(!net.nodes[0].engine.snapshot_pending(&[2; 32]));
    assert!(
        net.partner_copies(0, &ids) > 0,
        "no copy came back while the statement was inactive"
    );
    net.list_garbage(0, &ids, 2, None); // the same batch, on the new basis
    net.run_for(5_000); // half of gc_grace_min_ms
    assert_eq!(
        net.partner_copies(0, &ids),
        0,
        "garbage taken back waited out a second grace"
    );
}

/// Found by invariant 12: a partner fetched a renamed batch while it held none of its
/// ids (all deleted here). A copy it takes back later, in an inactive gap, must still be
/// condemned once a statement listing that batch is active again: the partner keeps the
/// whole batch, not only the listed ids it held at fetch time.
#[test]
fn a_listed_chunk_taken_back_after_its_batch_was_fetched_is_condemned() {
    let (mut net, ids) = replicated(gc_config(), 1);
    net.forget(0, 1);
    net.list_garbage(0, &ids, 1, None);
    net.run_for(30_000);
    assert_eq!(net.partner_copies(0, &ids), 0, "collected after the grace");
    // A commit restated at once: ids[0] revived, the rest in a renamed batch, fetched
    // by partners that hold none of it.
    net.backup(0, 8, 2);
    net.list_garbage(0, &ids[1..], 2, None);
    net.run_for(30_000);
    assert_eq!(net.partner_copies(0, &ids[1..]), 0);
    // A commit whose restate is lost: the copies come back.
    net.backup(0, 8, 3);
    net.run_for(60_000);
    assert!(
        net.partner_copies(0, &ids[1..]) > 0,
        "no copy came back while the statement was inactive"
    );
    // The restate lists the same renamed batch again.
    net.list_garbage(0, &ids[1..], 3, None);
    net.run_for(30_000);
    assert_eq!(
        net.partner_copies(0, &ids[1..]),
        0,
        "a listed copy taken back after the batch was fetched is never condemned"
    );
    let site = net.sites[0].id;
    for i in 1..3 {
        assert!(net.nodes[i].engine.gc_active(&site).is_some());
    }
}
