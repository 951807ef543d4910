//! Tests of sweep, repack and the recovery of a retired pack: each crash point leaves a
//! store that reopens with every live chunk byte-exact and nothing dropped brought back.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::Mutex;

use cairn_protocol::identity::SiteId;
use cairn_protocol::ChunkId;

use super::{CrashPoint, Repacked, Swept, KEY_RETIRED_PACK, SWEEP_BATCH_IDS_MAX};
use crate::store::{IndexBatch, Store, KEY_HELD_CHUNK};

const PARTNER: SiteId = SiteId([7; 32]);
/// Small packs, so a test store has several (about 8 chunks each).
const TEST_PACK_BYTES: u64 = 8 << 10;

fn id(n: u32) -> ChunkId {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&n.to_le_bytes());
    bytes[31] = 0xAA;
    ChunkId(bytes)
}

fn sealed(n: u32) -> Vec<u8> {
    (0..900 + n % 97).map(|i| (i ^ n) as u8).collect()
}

fn open(dir: &Path) -> Store {
    let mut store = Store::open(dir).expect("open");
    store.pack_bytes_target = TEST_PACK_BYTES;
    store
}

fn mark(store: &Store, ids: &[ChunkId]) {
    let marks = ids
        .iter()
        .map(|id| ([KEY_HELD_CHUNK, &id.0].concat(), PARTNER.0.to_vec()))
        .collect();
    store
        .index()
        .commit(IndexBatch {
            catalog: marks,
            ..IndexBatch::default()
        })
        .expect("marks");
}

/// What a test store holds: chunks that must survive, and chunks that must stay gone.
struct Fixture {
    own_live: Vec<ChunkId>,
    partner_live: Vec<ChunkId>,
    /// Own chunks swept, and a partner chunk the mesh deleted (entry and mark).
    dropped: Vec<ChunkId>,
}

/// 48 chunks over 6 packs, one in four a partner's; two of every three own chunks swept
/// from the first 40, and one partner chunk deleted as the mesh's storage thread does.
fn fixture(dir: &Path) -> Fixture {
    let store = open(dir);
    let ids: Vec<u32> = (0..48).collect();
    let partner: Vec<ChunkId> = ids.iter().filter(|n| *n % 4 == 3).map(|n| id(*n)).collect();
    // Marks first, as the storage thread writes them.
    mark(&store, &partner);
    let mut writer = store.writer();
    for n in &ids {
        writer.append(&id(*n), &sealed(*n)).expect("append");
    }
    writer.commit().expect("commit");
    assert!(store.pack_ids_on_disk().expect("packs").len() >= 5);
    let swept: Vec<ChunkId> = ids
        .iter()
        .filter(|n| *n % 4 != 3 && *n % 3 != 0 && **n < 40)
        .map(|n| id(*n))
        .collect();
    let result = store.sweep(&swept).expect("sweep");
    assert_eq!(result.n_chunks, swept.len() as u64);
    let deleted = id(7);
    store
        .index()
        .commit(IndexBatch {
            removed_chunks: vec![deleted],
            removed_catalog: vec![[KEY_HELD_CHUNK, &deleted.0].concat()],
            ..IndexBatch::default()
        })
        .expect("delete");
    let mut dropped = swept;
    dropped.push(deleted);
    let own_live = ids
        .iter()
        .map(|n| id(*n))
        .filter(|c| !dropped.contains(c) && !partner.contains(c))
        .collect();
    let partner_live = partner.into_iter().filter(|c| *c != deleted).collect();
    Fixture {
        own_live,
        partner_live,
        dropped,
    }
}

fn n_of(id: &ChunkId) -> u32 {
    u32::from_le_bytes(id.0[..4].try_into().expect("4 bytes"))
}

/// What a user would check after any crash and reopen: every live chunk byte-exact, the
/// index holds exactly the live chunks, partner chunks keep their owner, no retired pack
/// is left behind.
fn check(store: &Store, fixture: &Fixture) {
    let mut reader = store.reader();
    for id in fixture.own_live.iter().chain(&fixture.partner_live) {
        assert_eq!(reader.read(id).expect("live chunk"), sealed(n_of(id)));
    }
    let indexed: BTreeSet<ChunkId> = store
        .index()
        .chunks()
        .expect("chunks")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let live: BTreeSet<ChunkId> = fixture
        .own_live
        .iter()
        .chain(&fixture.partner_live)
        .copied()
        .collect();
    assert_eq!(
        indexed, live,
        "a dropped chunk came back, or a live one went"
    );
    for id in &fixture.partner_live {
        let owner = store
            .index()
            .catalog_get(&[KEY_HELD_CHUNK, &id.0].concat())
            .expect("get");
        assert_eq!(
            owner,
            Some(PARTNER.0.to_vec()),
            "partner chunk lost its owner"
        );
    }
    for id in &fixture.dropped {
        let mark = store
            .index()
            .catalog_get(&[KEY_HELD_CHUNK, &id.0].concat())
            .expect("get");
        assert_eq!(mark, None);
    }
}

fn retired_keys(store: &Store) -> usize {
    store
        .index()
        .catalog_scan(KEY_RETIRED_PACK)
        .expect("scan")
        .len()
}

fn repack(store: &Store) -> Repacked {
    store.repack(0.10, None, &|_| {}).expect("repack")
}

#[test]
fn sweep_drops_entries_and_marks_counts_partner_bytes_and_is_idempotent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = open(tmp.path());
    mark(&store, &[id(2)]);
    store.add_held_for(&PARTNER, 5_000).expect("count");
    let mut writer = store.writer();
    for n in 1..=3 {
        writer.append(&id(n), &sealed(n)).expect("append");
    }
    writer.commit().expect("commit");
    let ids = [id(1), id(2), id(99)];
    let swept = store.sweep(&ids).expect("sweep");
    let expected = (sealed(1).len() + sealed(2).len()) as u64;
    assert_eq!(
        swept,
        Swept {
            n_chunks: 2,
            bytes: expected
        }
    );
    assert!(!store.contains(&id(1)).expect("index"));
    assert!(!store.contains(&id(2)).expect("index"));
    assert!(store.contains(&id(3)).expect("index"));
    let mark = [KEY_HELD_CHUNK, &id(2).0].concat();
    assert_eq!(store.index().catalog_get(&mark).expect("get"), None);
    assert_eq!(
        store.usage(&PARTNER).expect("usage").held_for_them_bytes,
        5_000 - sealed(2).len() as u64
    );
    assert_eq!(store.sweep(&ids).expect("again"), Swept::default());
}

#[test]
fn a_sweep_stopped_between_batches_finishes_on_a_rerun() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n_ids = SWEEP_BATCH_IDS_MAX as u32 + 100;
    let ids: Vec<ChunkId> = (0..n_ids).map(id).collect();
    {
        let store = open(tmp.path());
        let mut writer = store.writer();
        for id in &ids {
            writer.append(id, &id.0).expect("append");
        }
        writer.append(&id(u32::MAX), b"kept").expect("append");
        writer.commit().expect("commit");
        let stops = Cell::new(0);
        let swept = store
            .sweep_until(&ids, &|point| {
                assert_eq!(point, CrashPoint::SweepBatch);
                stops.set(stops.get() + 1);
                true
            })
            .expect("sweep");
        assert_eq!(stops.get(), 1);
        assert_eq!(swept.n_chunks, SWEEP_BATCH_IDS_MAX as u64);
    }
    let store = open(tmp.path());
    assert!(store.warnings.is_empty(), "{:?}", store.warnings);
    assert_eq!(store.sweep(&ids).expect("rerun").n_chunks, 100);
    assert_eq!(store.index().n_chunks(), 1);
    assert_eq!(store.reader().read(&id(u32::MAX)).expect("kept"), b"kept");
}

#[test]
fn pack_usage_counts_the_entries_the_index_points_at() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = open(tmp.path());
    let mut writer = store.writer();
    writer.append(&id(1), &[1; 100]).expect("append");
    writer.append(&id(2), &[2; 300]).expect("append");
    writer.commit().expect("commit");
    store.sweep(&[id(2)]).expect("sweep");
    let usage = store.pack_usage().expect("usage");
    assert_eq!(usage.len(), 1);
    let entry = |sealed: u64| 4 + 32 + 4 + sealed + 16;
    assert_eq!(usage[0].bytes, 16 + entry(100) + entry(300));
    assert_eq!(usage[0].live_bytes, entry(100));
    let unused = entry(300) as f64 / usage[0].bytes as f64;
    assert!((usage[0].unused_share() - unused).abs() < 1e-9);
}

#[test]
fn repack_gives_bytes_back_and_every_live_chunk_reads_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixture = fixture(tmp.path());
    let store = open(tmp.path());
    let newest = *store
        .pack_ids_on_disk()
        .expect("packs")
        .last()
        .expect("a pack");
    let lock = Mutex::new(());
    let steps = Cell::new(Vec::new());
    let repacked = store
        .repack(0.10, Some(&lock), &|progress| {
            let mut seen = steps.take();
            seen.push(progress);
            steps.set(seen);
        })
        .expect("repack");
    assert!(repacked.packs_rewritten >= 4, "{repacked:?}");
    assert!(repacked.bytes_after < repacked.bytes_before, "{repacked:?}");
    assert_eq!(repacked.bytes_after, store.packs_bytes().expect("bytes"));
    assert_eq!(repacked.packs_damaged, 0);
    let steps = steps.take();
    assert_eq!(steps.len() as u64, repacked.packs_rewritten);
    assert!(
        store.pack_ids_on_disk().expect("packs").contains(&newest),
        "the newest pack is never retired"
    );
    check(&store, &fixture);
    assert_eq!(retired_keys(&store), 0);
    drop(store);
    let store = open(tmp.path());
    assert!(store.warnings.is_empty(), "{:?}", store.warnings);
    check(&store, &fixture);
    let again = repack(&store);
    assert_eq!(again.packs_rewritten + again.packs_deleted, 0, "{again:?}");
}

/// Stops the first pack's retirement at `point` as a crash would, reopens, checks, and
/// reruns the repack to the end.
fn crash_at(point: CrashPoint) {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixture = fixture(tmp.path());
    let (before, first_pack) = {
        let store = open(tmp.path());
        let before = store.packs_bytes().expect("bytes");
        let first_pack = store.pack_ids_on_disk().expect("packs")[0];
        let stopped = Cell::new(false);
        store
            .repack_until(0.10, None, &|_| {}, &|at| {
                stopped.set(at == point);
                at == point
            })
            .expect("repack");
        assert!(stopped.get(), "never reached {point:?}");
        match point {
            CrashPoint::RepackCopied => assert_eq!(retired_keys(&store), 0),
            _ => assert_eq!(retired_keys(&store), 1),
        }
        (before, first_pack)
    };
    let store = open(tmp.path());
    assert!(store.warnings.is_empty(), "{:?}", store.warnings);
    check(&store, &fixture);
    assert_eq!(retired_keys(&store), 0, "recover finishes a retirement");
    if point != CrashPoint::RepackCopied {
        assert!(!store.pack_path(first_pack).exists());
    }
    let rerun = repack(&store);
    check(&store, &fixture);
    assert!(rerun.bytes_after < before, "{rerun:?}");
    drop(store);
    let store = open(tmp.path());
    assert!(store.warnings.is_empty(), "{:?}", store.warnings);
    check(&store, &fixture);
    let again = repack(&store);
    assert_eq!(again.packs_rewritten + again.packs_deleted, 0, "{again:?}");
}

#[test]
fn a_crash_after_the_copies_are_written_before_they_are_indexed_is_safe() {
    crash_at(CrashPoint::RepackCopied);
}

#[test]
fn a_crash_after_the_index_batch_before_the_unlink_is_safe() {
    crash_at(CrashPoint::RepackCommitted);
}

#[test]
fn a_crash_after_the_unlink_before_the_key_is_dropped_is_safe() {
    crash_at(CrashPoint::RepackUnlinked);
}

#[test]
fn a_chunk_dropped_while_its_pack_is_copied_stays_dropped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut fixture = fixture(tmp.path());
    let store = open(tmp.path());
    let first_pack = store.pack_ids_on_disk().expect("packs")[0];
    let victim = *fixture
        .partner_live
        .iter()
        .find(|id| store.index().chunk(id).expect("index").map(|l| l.pack) == Some(first_pack))
        .expect("a partner chunk in the first pack");
    let dropped_once = Cell::new(false);
    store
        .repack_until(0.10, None, &|_| {}, &|point| {
            if point == CrashPoint::RepackCopied && !dropped_once.replace(true) {
                // What the mesh's storage thread does to a partner chunk on the owner's
                // word, arriving after the copy and before the index batch.
                store
                    .index()
                    .commit(IndexBatch {
                        removed_chunks: vec![victim],
                        removed_catalog: vec![[KEY_HELD_CHUNK, &victim.0].concat()],
                        ..IndexBatch::default()
                    })
                    .expect("delete");
            }
            false
        })
        .expect("repack");
    fixture.partner_live.retain(|id| *id != victim);
    fixture.dropped.push(victim);
    check(&store, &fixture);
}

#[test]
fn a_reader_follows_a_chunk_whose_pack_was_retired_after_its_lookup() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixture = fixture(tmp.path());
    let store = open(tmp.path());
    let first_pack = store.pack_ids_on_disk().expect("packs")[0];
    let mut reader = store.reader();
    // A restore looks chunks up ahead of reading them.
    let located: Vec<_> = fixture
        .own_live
        .iter()
        .map(|id| (*id, reader.prefetch(id).expect("prefetch")))
        .collect();
    assert!(located.iter().any(|(_, l)| l.pack == first_pack));
    let repacked = repack(&store);
    assert!(repacked.packs_rewritten > 0);
    assert!(!store.pack_path(first_pack).exists());
    for (id, location) in &located {
        assert_eq!(
            reader.read_located(id, location).expect("read"),
            sealed(n_of(id))
        );
    }
    assert!(
        !reader.files.contains_key(&first_pack),
        "a retired pack's file is let go"
    );
}

#[test]
fn a_pack_with_an_uncommitted_tail_is_left_alone_and_a_retired_newest_pack_id_is_never_reused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixture = fixture(tmp.path());
    let store = open(tmp.path());
    let packs = store.pack_ids_on_disk().expect("packs");
    let (first, newest) = (packs[0], *packs.last().expect("a pack"));
    // Everything in the newest pack becomes garbage: it is retired like any other.
    let in_newest: Vec<ChunkId> = store
        .index()
        .chunks_in_pack(newest)
        .expect("chunks")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    store.sweep(&in_newest).expect("sweep");
    let tail = fs::OpenOptions::new()
        .append(true)
        .open(store.pack_path(first))
        .expect("open");
    std::io::Write::write_all(&mut &tail, b"an uncommitted tail").expect("write");
    let first_len = fs::metadata(store.pack_path(first)).expect("meta").len();
    let repacked = repack(&store);
    assert!(repacked.packs_rewritten > 0, "{repacked:?}");
    assert_eq!(
        fs::metadata(store.pack_path(first)).expect("first").len(),
        first_len
    );
    assert!(!store.pack_path(newest).exists());
    let mut fixture = fixture;
    fixture.own_live.retain(|id| !in_newest.contains(id));
    fixture.partner_live.retain(|id| !in_newest.contains(id));
    check(&store, &fixture);
    // The next pack is past the retired one's id: a reader holding that file open never
    // reads another pack's entries under its name.
    let mut writer = store.writer();
    let location = writer
        .append(&ChunkId([0xee; 32]), b"after")
        .expect("append");
    writer.commit().expect("commit");
    assert!(
        location.pack > newest,
        "{location:?} reuses an id up to {newest:?}"
    );
}

#[test]
fn a_damaged_entry_keeps_its_pack_and_leaves_no_uncommitted_tail() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixture = fixture(tmp.path());
    let store = open(tmp.path());
    let first_pack = store.pack_ids_on_disk().expect("packs")[0];
    let mut in_first = store.index().chunks_in_pack(first_pack).expect("chunks");
    in_first.sort_by_key(|(_, location)| location.offset);
    assert!(in_first.len() >= 2);
    let (damaged, location) = *in_first.last().expect("a live entry");
    let file = fs::OpenOptions::new()
        .write(true)
        .open(store.pack_path(first_pack))
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&file, b"rot", location.offset + 5).expect("rot");
    let repacked = repack(&store);
    assert_eq!(repacked.packs_damaged, 1, "{repacked:?}");
    assert!(store.pack_path(first_pack).exists());
    assert_eq!(
        store.index().chunk(&damaged).expect("index"),
        Some(location),
        "the damaged chunk stays where verify finds it"
    );
    for (id, len) in store.index().packs().expect("packs") {
        let on_disk = fs::metadata(store.pack_path(id)).expect("meta").len();
        assert_eq!(on_disk, len, "pack {id:?} has an uncommitted tail");
    }
    let mut reader = store.reader();
    for id in fixture.own_live.iter().chain(&fixture.partner_live) {
        if *id != damaged {
            assert_eq!(reader.read(id).expect("live chunk"), sealed(n_of(id)));
        }
    }
}
