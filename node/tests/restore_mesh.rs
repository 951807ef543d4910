//! Restore from the mesh, against an in-memory fake of it: chunks missing or damaged in
//! the local store come from other nodes, many at once; answers that fail verification are
//! refused and asked for again from another node; an interrupted restore resumes from its
//! partial file and fetches only what is still missing; a partial file holding something
//! else is corrected, not trusted.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cairn_node::backup::{backup, BackupOptions};
use cairn_node::fetch::{
    FetchDone, FetchError, Fetched, RemoteChunks, RemoteError, REMOTE_FETCHES_MAX,
};
use cairn_node::restore::{partial_path, restore, RestoreError, RestoreOptions, RestoreSummary};
use cairn_node::source::Source;
use cairn_node::store::IndexBatch;
use cairn_node::Vault;
use cairn_protocol::chunk::ChunkerParams;
use cairn_protocol::identity::NodeId;
use cairn_protocol::seal::SealError;
use cairn_protocol::{ChunkId, Extent, ImageName, SnapshotRecord};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Small chunks, so a few MiB make hundreds of them and several manifest nodes.
const SMALL_CHUNKS: ChunkerParams = ChunkerParams {
    min_bytes: 4 * KIB as u32,
    avg_bytes: 16 * KIB as u32,
    max_bytes: 64 * KIB as u32,
};

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Random data with zero runs: every data chunk distinct, some zero extents.
fn image_bytes(seed: u64) -> Vec<u8> {
    let mut bytes = random_bytes(3 * MIB, seed);
    bytes.extend(vec![0u8; MIB]);
    bytes.extend(random_bytes(2 * MIB, seed + 1));
    bytes.extend(vec![0u8; 512 * KIB]);
    bytes.extend(random_bytes(MIB + 12345, seed + 2));
    bytes
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    vault: Vault,
    record: SnapshotRecord,
    source: Vec<u8>,
    /// Every sealed chunk of the store, as the mesh holds them.
    sealed: BTreeMap<ChunkId, Vec<u8>>,
    /// Data extents in image order: (offset, id, length).
    extents: Vec<(u64, ChunkId, u32)>,
}

impl Fixture {
    fn new(seed: u64) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let vault = Vault::init(&dir.join("data"), "Harbour Road").unwrap();
        let source = image_bytes(seed);
        let image_path = dir.join("disk.img");
        std::fs::write(&image_path, &source).unwrap();
        let options = BackupOptions {
            chunker: SMALL_CHUNKS,
            n_workers: 2,
            ..BackupOptions::default()
        };
        backup(
            &vault,
            &ImageName::new("fileserver").unwrap(),
            Source::open(image_path.to_str().unwrap()).unwrap(),
            options,
            &|_| {},
        )
        .unwrap();
        let record = vault.snapshots().unwrap().pop().unwrap();
        let mut sealed = BTreeMap::new();
        let mut reader = vault.store.reader();
        for (pack, _) in vault.store.index().packs().unwrap() {
            for (id, location) in vault.store.index().chunks_in_pack(pack).unwrap() {
                sealed.insert(id, reader.read_at(&location).unwrap());
            }
        }
        drop(reader);
        let mut extents = Vec::new();
        vault
            .walk_manifest(&record, |offset, extent| {
                if let Extent::Data { id, len_bytes } = extent {
                    extents.push((offset, id, len_bytes));
                }
                true
            })
            .unwrap();
        let distinct: BTreeSet<ChunkId> = extents.iter().map(|e| e.1).collect();
        assert_eq!(
            distinct.len(),
            extents.len(),
            "random data makes no duplicates"
        );
        assert!(extents.len() > 300, "{} chunks", extents.len());
        Fixture {
            _tmp: tmp,
            dir,
            vault,
            record,
            source,
            sealed,
            extents,
        }
    }

    fn manifest_ids(&self) -> Vec<ChunkId> {
        let data: BTreeSet<ChunkId> = self.extents.iter().map(|e| e.1).collect();
        self.sealed
            .keys()
            .filter(|id| !data.contains(id))
            .copied()
            .collect()
    }

    /// Forgets chunks in the local index, as if this node never held them.
    fn forget(&self, ids: &[ChunkId]) {
        self.vault
            .store
            .index()
            .commit(IndexBatch {
                removed_chunks: ids.to_vec(),
                ..IndexBatch::default()
            })
            .unwrap();
    }

    /// Flips a byte inside a chunk's sealed bytes in its pack.
    fn damage(&self, id: &ChunkId) {
        let location = self.vault.store.index().chunk(id).unwrap().unwrap();
        let pack = self
            .dir
            .join(format!("data/store/packs/{:08}.pack", location.pack.0));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pack)
            .unwrap();
        let at = location.offset + 30;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    }

    fn out(&self) -> std::path::PathBuf {
        self.dir.join("restored.img")
    }

    fn restore(&self, remote: Option<&dyn RemoteChunks>) -> Result<RestoreSummary, RestoreError> {
        let options = RestoreOptions {
            remote,
            ..RestoreOptions::local(2)
        };
        restore(&self.vault, &self.record, &self.out(), &options, &|_| {})
    }

    fn bytes_of(&self, ids: &BTreeSet<ChunkId>) -> u64 {
        self.extents
            .iter()
            .filter(|e| ids.contains(&e.1))
            .map(|e| u64::from(e.2))
            .sum()
    }

    /// Data extents whose bytes the file at `path` already holds.
    fn in_place(&self, path: &Path) -> BTreeSet<ChunkId> {
        let file = std::fs::File::open(path).unwrap();
        self.extents
            .iter()
            .filter(|(offset, id, len)| {
                let mut buf = vec![0u8; *len as usize];
                file.read_exact_at(&mut buf, *offset).is_ok()
                    && self.vault.keys.chunk_id(&buf) == *id
            })
            .map(|e| e.1)
            .collect()
    }
}

fn node(n: u8) -> NodeId {
    NodeId([n; 32])
}

/// A mesh of three holders, answering from another thread in batches and out of order,
/// as a WAN would. Node 1 is everyone's first choice; for the chunks in `corrupt` it sends
/// a flipped byte. After `good_answers_max` good answers it answers only with errors.
struct FakeMesh {
    sealed: BTreeMap<ChunkId, Vec<u8>>,
    corrupt: BTreeSet<ChunkId>,
    good_answers_max: usize,
    state: Mutex<MeshState>,
    wake: Condvar,
}

#[derive(Default)]
struct MeshState {
    pending: Vec<(ChunkId, Vec<NodeId>, FetchDone)>,
    in_flight: usize,
    in_flight_peak: usize,
    requests: Vec<(ChunkId, Vec<NodeId>)>,
    refused: Vec<(ChunkId, NodeId)>,
    n_good: usize,
    closed: bool,
}

impl FakeMesh {
    fn start(
        sealed: BTreeMap<ChunkId, Vec<u8>>,
        corrupt: BTreeSet<ChunkId>,
        good_answers_max: usize,
    ) -> (Arc<FakeMesh>, std::thread::JoinHandle<()>) {
        let mesh = Arc::new(FakeMesh {
            sealed,
            corrupt,
            good_answers_max,
            state: Mutex::new(MeshState::default()),
            wake: Condvar::new(),
        });
        let responder = {
            let mesh = mesh.clone();
            std::thread::spawn(move || mesh.respond())
        };
        (mesh, responder)
    }

    /// Waits for a batch (up to 48 requests, or 5 ms), then answers it newest first.
    fn respond(&self) {
        loop {
            let batch = {
                let mut state = self.state.lock().unwrap();
                while state.pending.is_empty() && !state.closed {
                    state = self.wake.wait(state).unwrap();
                }
                if state.pending.is_empty() {
                    return;
                }
                let (guard, _) = self
                    .wake
                    .wait_timeout_while(state, Duration::from_millis(5), |s| s.pending.len() < 48)
                    .unwrap();
                state = guard;
                std::mem::take(&mut state.pending)
            };
            for (id, exclude, done) in batch.into_iter().rev() {
                let answer = self.answer(&id, &exclude);
                self.state.lock().unwrap().in_flight -= 1;
                done(answer);
            }
        }
    }

    fn answer(&self, id: &ChunkId, exclude: &[NodeId]) -> Result<Fetched, RemoteError> {
        let from = [node(1), node(2), node(3)]
            .into_iter()
            .find(|n| !exclude.contains(n))
            .ok_or_else(|| RemoteError("no other holder".into()))?;
        let mut state = self.state.lock().unwrap();
        if state.n_good >= self.good_answers_max {
            return Err(RemoteError(
                "the link to the partner office went down".into(),
            ));
        }
        let mut sealed = self.sealed[id].clone();
        if from == node(1) && self.corrupt.contains(id) {
            let at = sealed.len() / 2;
            sealed[at] ^= 0x01;
        } else {
            state.n_good += 1;
        }
        Ok(Fetched { sealed, from })
    }

    fn stop(&self) {
        self.state.lock().unwrap().closed = true;
        self.wake.notify_all();
    }

    fn requested(&self) -> BTreeSet<ChunkId> {
        let state = self.state.lock().unwrap();
        state.requests.iter().map(|r| r.0).collect()
    }
}

impl RemoteChunks for FakeMesh {
    fn request(&self, id: ChunkId, exclude: &[NodeId], done: FetchDone) {
        let mut state = self.state.lock().unwrap();
        state.requests.push((id, exclude.to_vec()));
        state.pending.push((id, exclude.to_vec(), done));
        state.in_flight += 1;
        state.in_flight_peak = state.in_flight_peak.max(state.in_flight);
        self.wake.notify_all();
    }

    fn refused(&self, id: &ChunkId, from: &NodeId, why: &SealError) {
        assert_eq!(*why, SealError::Authentication);
        self.state.lock().unwrap().refused.push((*id, *from));
    }
}

#[test]
fn missing_and_damaged_chunks_come_from_the_mesh_and_bad_answers_are_refused() {
    let fixture = Fixture::new(1);
    let ids: Vec<ChunkId> = fixture.extents.iter().map(|e| e.1).collect();
    // Every third data chunk and the manifest's root are not held here; one more data
    // chunk is held damaged.
    let mut missing: Vec<ChunkId> = ids.iter().step_by(3).copied().collect();
    missing.push(fixture.record.manifest_root().id);
    fixture.forget(&missing);
    let damaged = ids[1];
    fixture.damage(&damaged);
    // Node 1 sends bad bytes for every other missing data chunk, and for the damaged one.
    let mut corrupt: BTreeSet<ChunkId> = ids.iter().step_by(6).copied().collect();
    corrupt.insert(damaged);

    let (mesh, responder) = FakeMesh::start(fixture.sealed.clone(), corrupt.clone(), usize::MAX);
    let summary = fixture.restore(Some(&*mesh)).unwrap();
    mesh.stop();
    responder.join().unwrap();
    assert_eq!(std::fs::read(fixture.out()).unwrap(), fixture.source);

    let mut from_mesh: BTreeSet<ChunkId> = ids.iter().step_by(3).copied().collect();
    from_mesh.insert(damaged);
    let data_bytes: u64 = fixture.extents.iter().map(|e| u64::from(e.2)).sum();
    assert_eq!(summary.remote_bytes, fixture.bytes_of(&from_mesh));
    assert_eq!(summary.local_bytes, data_bytes - summary.remote_bytes);
    assert_eq!((summary.resumed_bytes, summary.data_bytes), (0, data_bytes));
    assert_eq!(summary.n_refused, corrupt.len() as u64);

    let state = mesh.state.lock().unwrap();
    // Asked for exactly what is not usable here, never for chunks held intact.
    let mut expected: BTreeSet<ChunkId> = from_mesh.clone();
    expected.insert(fixture.record.manifest_root().id);
    assert_eq!(mesh_requested(&state), expected);
    // Each bad answer was refused and asked again once, from another node.
    let refused: BTreeSet<(ChunkId, NodeId)> = state.refused.iter().copied().collect();
    let expected_refused: BTreeSet<(ChunkId, NodeId)> =
        corrupt.iter().map(|id| (*id, node(1))).collect();
    assert_eq!(refused, expected_refused);
    for (id, exclude) in &state.requests {
        let n_asked = state.requests.iter().filter(|r| r.0 == *id).count();
        if corrupt.contains(id) {
            assert_eq!(n_asked, 2, "chunk {id} asked {n_asked} times");
            assert!(exclude.is_empty() || *exclude == [node(1)], "{exclude:?}");
        } else {
            assert_eq!((n_asked, exclude.len()), (1, 0));
        }
    }
    // Many fetches were in flight at once, but never more than the limit (plus the one
    // manifest node the walk may wait on).
    assert!(
        state.in_flight_peak >= 16 && state.in_flight_peak <= REMOTE_FETCHES_MAX + 1,
        "peak of {} fetches in flight",
        state.in_flight_peak
    );
    assert!(!partial_path(&fixture.out()).exists());
}

fn mesh_requested(state: &MeshState) -> BTreeSet<ChunkId> {
    state.requests.iter().map(|r| r.0).collect()
}

#[test]
fn an_interrupted_restore_resumes_and_fetches_only_what_is_missing() {
    let fixture = Fixture::new(2);
    let ids: Vec<ChunkId> = fixture.extents.iter().map(|e| e.1).collect();
    // Two of every three data chunks, and every manifest node, live only in the mesh.
    let missing: BTreeSet<ChunkId> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, id)| *id)
        .collect();
    let mut forgotten: Vec<ChunkId> = missing.iter().copied().collect();
    forgotten.extend(fixture.manifest_ids());
    fixture.forget(&forgotten);

    // The link fails after 60 good answers.
    let (mesh, responder) = FakeMesh::start(fixture.sealed.clone(), BTreeSet::new(), 60);
    let error = fixture.restore(Some(&*mesh)).unwrap_err();
    mesh.stop();
    responder.join().unwrap();
    let text = error.to_string();
    // The failure hits a data chunk, or a manifest node the walk waits for.
    assert!(
        text.contains("the link to the partner office went down")
            && text.contains("run the same restore again to resume"),
        "{text}"
    );
    let RestoreError::Interrupted {
        kept_bytes,
        partial,
        ..
    } = &error
    else {
        panic!("the partial file is kept: {error:?}");
    };
    let cause_ok = match error.cause() {
        RestoreError::Unavailable { remote, .. } => {
            matches!(**remote, FetchError::Unavailable { .. })
        }
        RestoreError::Manifest { .. } => true,
        _ => false,
    };
    assert!(cause_ok, "{error:?}");
    assert_eq!(*partial, partial_path(&fixture.out()));
    assert!(!fixture.out().exists());
    let in_place = fixture.in_place(partial);
    assert_eq!(fixture.bytes_of(&in_place), *kept_bytes);
    let fetched_before: BTreeSet<ChunkId> = in_place.intersection(&missing).copied().collect();
    assert!(
        !fetched_before.is_empty() && fetched_before.len() < missing.len(),
        "{} of {} fetched before the failure",
        fetched_before.len(),
        missing.len()
    );

    // The rerun skips what is in place and fetches only the rest (and the manifest).
    let (mesh, responder) = FakeMesh::start(fixture.sealed.clone(), BTreeSet::new(), usize::MAX);
    let summary = fixture.restore(Some(&*mesh)).unwrap();
    mesh.stop();
    responder.join().unwrap();
    assert_eq!(std::fs::read(fixture.out()).unwrap(), fixture.source);
    let data_ids: BTreeSet<ChunkId> = ids.iter().copied().collect();
    let requested_data: BTreeSet<ChunkId> =
        mesh.requested().intersection(&data_ids).copied().collect();
    let still_missing: BTreeSet<ChunkId> = missing.difference(&in_place).copied().collect();
    assert_eq!(requested_data, still_missing);
    assert_eq!(summary.resumed_bytes, *kept_bytes);
    assert_eq!(summary.remote_bytes, fixture.bytes_of(&still_missing));
    let local: BTreeSet<ChunkId> = data_ids
        .difference(&missing)
        .filter(|id| !in_place.contains(id))
        .copied()
        .collect();
    assert_eq!(summary.local_bytes, fixture.bytes_of(&local));
    assert!(!partial_path(&fixture.out()).exists());
}

#[test]
fn a_partial_file_holding_other_bytes_is_corrected_not_trusted() {
    let fixture = Fixture::new(3);
    let partial = partial_path(&fixture.out());
    // Left by "another restore": the right bytes, but garbage in some chunks, over a zero
    // run, and past the end.
    let mut left = fixture.source.clone();
    let garbled: BTreeSet<ChunkId> = fixture.extents.iter().step_by(7).map(|e| e.1).collect();
    for (offset, id, _) in &fixture.extents {
        if garbled.contains(id) {
            left[*offset as usize + 100] ^= 0xff;
        }
    }
    left[3 * MIB + 256 * KIB..3 * MIB + 260 * KIB].fill(0xaa);
    left.extend(random_bytes(MIB, 9));
    std::fs::write(&partial, &left).unwrap();

    // Another restore writing it: refused, and the file is left alone.
    let held = std::fs::File::open(&partial).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&held);
    assert_eq!(unsafe { libc::flock(fd, libc::LOCK_EX) }, 0);
    let error = fixture.restore(None).unwrap_err();
    assert!(matches!(error, RestoreError::Busy(_)), "{error}");
    assert_eq!(std::fs::read(&partial).unwrap(), left);
    drop(held);

    let summary = fixture.restore(None).unwrap();
    assert_eq!(std::fs::read(fixture.out()).unwrap(), fixture.source);
    assert_eq!(summary.local_bytes, fixture.bytes_of(&garbled));
    assert_eq!(
        summary.resumed_bytes,
        summary.data_bytes - fixture.bytes_of(&garbled)
    );

    // --fresh ignores what is there.
    std::fs::write(&partial, &left).unwrap();
    std::fs::remove_file(fixture.out()).unwrap();
    let options = RestoreOptions {
        fresh: true,
        ..RestoreOptions::local(2)
    };
    let summary = restore(
        &fixture.vault,
        &fixture.record,
        &fixture.out(),
        &options,
        &|_| {},
    )
    .unwrap();
    assert_eq!(std::fs::read(fixture.out()).unwrap(), fixture.source);
    assert_eq!(
        (summary.resumed_bytes, summary.local_bytes),
        (0, summary.data_bytes)
    );
}

#[test]
fn without_a_mesh_a_missing_chunk_fails_and_keeps_what_was_written() {
    let fixture = Fixture::new(4);
    let last = fixture.extents.last().unwrap().1;
    fixture.forget(&[last]);
    let error = fixture.restore(None).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains(&format!("chunk {last}")) && text.contains("is not in the store"),
        "{text}"
    );
    let RestoreError::Interrupted { kept_bytes, .. } = error else {
        panic!("{error:?}");
    };
    assert!(kept_bytes > 0);
    // The rerun resumes, and asks the mesh for that one chunk alone.
    let (mesh, responder) = FakeMesh::start(fixture.sealed.clone(), BTreeSet::new(), usize::MAX);
    let summary = fixture.restore(Some(&*mesh)).unwrap();
    mesh.stop();
    responder.join().unwrap();
    assert_eq!(std::fs::read(fixture.out()).unwrap(), fixture.source);
    assert_eq!(summary.resumed_bytes, kept_bytes);
    assert_eq!(mesh.requested(), BTreeSet::from([last]));
}

#[test]
fn a_fresh_machine_restores_from_the_catalog_and_the_mesh() {
    let fixture = Fixture::new(5);
    // What the mesh carries: the site's snapshot record, gossiped as a catalog record.
    let record = fixture
        .vault
        .snapshot_catalog_record(&fixture.record.id)
        .unwrap();

    // The office burned: a new machine, recovered from the recovery key, holds nothing.
    let dir = &fixture.vault.dir;
    let wrapped = std::fs::read(dir.wrapped_keys_path()).unwrap();
    let recovery_key = dir.recovery_key.clone().unwrap();
    let fresh_root = fixture.dir.join("fresh");
    let recovered = cairn_node::datadir::DataDir::recover(
        &fresh_root,
        &dir.site_id(),
        &recovery_key,
        &wrapped,
        Some("Harbour Road"),
    )
    .unwrap();
    let fresh = Vault::from_dir(recovered).unwrap();
    assert!(fresh.resolve("fileserver").is_err());
    fresh
        .store
        .index()
        .commit(IndexBatch {
            catalog: vec![cairn_node::records::entry(&record)],
            ..IndexBatch::default()
        })
        .unwrap();
    let found = fresh.resolve("fileserver").unwrap();
    assert_eq!(found.id, fixture.record.id);

    let (mesh, responder) = FakeMesh::start(fixture.sealed.clone(), BTreeSet::new(), usize::MAX);
    let out = fixture.dir.join("rebuilt.img");
    let options = RestoreOptions {
        remote: Some(&*mesh),
        ..RestoreOptions::local(2)
    };
    let summary = restore(&fresh, &found, &out, &options, &|_| {}).unwrap();
    mesh.stop();
    responder.join().unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), fixture.source);
    assert_eq!(summary.remote_bytes, summary.data_bytes);
    assert_eq!(summary.local_bytes + summary.resumed_bytes, 0);
    // Every chunk, manifest nodes included, came from the mesh, each asked for once.
    let state = mesh.state.lock().unwrap();
    assert_eq!(state.requests.len(), fixture.sealed.len());
    assert_eq!(mesh_requested(&state).len(), fixture.sealed.len());
}
