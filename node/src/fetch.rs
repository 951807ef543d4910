//! Chunks from elsewhere: the interface through which restore asks the mesh for sealed
//! chunks this node does not hold (or holds damaged), and the checks it applies to what
//! comes back. The daemon implements `RemoteChunks`; restore never trusts its bytes: every
//! answer is opened here (AEAD tag, then keyed id), and a bad one is asked for again from
//! another node.
//!
//! Why no single `ChunkSource` trait covers the local store too: the local path is fast
//! because the manifest walker looks each chunk up and starts the disk read ahead of the
//! workers (`PackReader::prefetch`), which a `fetch(id) -> bytes` call would hide; and the
//! remote path is asynchronous, so that one thread keeps dozens of WAN fetches in flight.
//! Restore reads the store itself and uses this trait for everything it cannot find there.

use cairn_protocol::identity::NodeId;
use cairn_protocol::keys::VaultKeys;
use cairn_protocol::seal::{Opener, SealError, SEAL_OVERHEAD_BYTES};
use cairn_protocol::ChunkId;
use thiserror::Error;

/// Remote data-chunk fetches one restore keeps in flight at once (the walker may wait on
/// one manifest node besides). High because a WAN fetch is mostly waiting.
pub const REMOTE_FETCHES_MAX: usize = 64;
/// Sealed bytes those fetches may hold at once: the memory bound of the remote path.
pub const REMOTE_FETCH_BYTES_MAX: u64 = 256 << 20;
/// Times one chunk is asked for before restore gives up on it. Each answer that fails
/// verification excludes its sender from the next request.
pub const REMOTE_TRIES_MAX: u32 = 4;

/// A sealed chunk from a remote holder (the mesh's own signature already stripped).
#[derive(Debug)]
pub struct Fetched {
    pub sealed: Vec<u8>,
    /// The node that sent it: excluded when the chunk is asked for again.
    pub from: NodeId,
}

/// Why a remote source could not deliver a chunk, in words for the user.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RemoteError(pub String);

/// Called exactly once with a request's outcome, from any thread, possibly before
/// `request` returns. It never blocks. Dropping it uncalled counts as a failure.
pub type FetchDone = Box<dyn FnOnce(Result<Fetched, RemoteError>) + Send>;

/// Where chunks missing from the local store come from: the mesh daemon. Only this site's
/// chunks are asked for.
pub trait RemoteChunks: Send + Sync {
    /// Starts fetching the sealed chunk `id` from any node that holds it except those in
    /// `exclude` (they sent bytes that failed verification), fastest first. Must not
    /// block on the network: restore calls it for many chunks at once, up to
    /// `REMOTE_FETCHES_MAX`. An `Err` to `done` means no eligible holder delivered it;
    /// restore does not ask again for that chunk in this run.
    fn request(&self, id: ChunkId, exclude: &[NodeId], done: FetchDone);

    /// Told when `from` sent bytes for `id` that did not open (`why`), so the daemon can
    /// count it against that node, audit it or repair the copy. The default does nothing.
    fn refused(&self, id: &ChunkId, from: &NodeId, why: &SealError) {
        let _ = (id, from, why);
    }
}

/// A chunk the mesh did not deliver.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{}", unavailable_text(why, *n_refused, last_refusal.as_ref()))]
    Unavailable {
        why: RemoteError,
        /// Answers refused before the source gave up.
        n_refused: u32,
        last_refusal: Option<SealError>,
    },
    #[error("{n_refused} answers failed verification (each from a node not asked again), the last: {last}")]
    Refused { n_refused: u32, last: SealError },
}

fn unavailable_text(why: &RemoteError, n_refused: u32, last: Option<&SealError>) -> String {
    match last {
        Some(last) => format!("{why} (after refusing {n_refused} bad answers, the last: {last})"),
        None => why.to_string(),
    }
}

/// The most sealed bytes a chunk of `len_bytes` plaintext can take: sealing keeps a chunk
/// raw when compression does not shrink it.
pub(crate) fn sealed_bytes_max(len_bytes: u32) -> u64 {
    u64::from(len_bytes) + SEAL_OVERHEAD_BYTES as u64
}

/// What to do with one answer for a chunk: the state of its tries so far.
#[derive(Debug, Default)]
pub(crate) struct Tries {
    /// Nodes whose answers failed verification.
    pub exclude: Vec<NodeId>,
    /// Answers refused so far (a source that ignores `exclude` still runs out of tries).
    pub n_refused: u32,
    pub last_refusal: Option<SealError>,
}

/// The outcome of checking one answer.
pub(crate) enum Checked {
    /// The chunk's plaintext, verified against its id.
    Plain(Vec<u8>),
    /// Refused; ask again, excluding `tries.exclude`.
    Retry,
    Failed(FetchError),
}

impl Tries {
    /// Opens an answer for `id`: its plaintext, or whether to ask again.
    pub(crate) fn check(
        &mut self,
        remote: &dyn RemoteChunks,
        keys: &VaultKeys,
        opener: &mut Opener,
        id: &ChunkId,
        answer: Result<Fetched, RemoteError>,
    ) -> Checked {
        let fetched = match answer {
            Ok(fetched) => fetched,
            Err(why) => {
                return Checked::Failed(FetchError::Unavailable {
                    why,
                    n_refused: self.n_refused,
                    last_refusal: self.last_refusal.take(),
                })
            }
        };
        match opener.open(keys, id, &fetched.sealed) {
            Ok(plain) => Checked::Plain(plain),
            Err(why) => {
                remote.refused(id, &fetched.from, &why);
                if !self.exclude.contains(&fetched.from) {
                    self.exclude.push(fetched.from);
                }
                self.n_refused += 1;
                if self.n_refused >= REMOTE_TRIES_MAX {
                    Checked::Failed(FetchError::Refused {
                        n_refused: self.n_refused,
                        last: why,
                    })
                } else {
                    self.last_refusal = Some(why);
                    Checked::Retry
                }
            }
        }
    }
}

/// Fetches one chunk and waits for it: for manifest nodes, which the walk needs before it
/// can go on. Returns the verified plaintext.
pub(crate) fn fetch_blocking(
    remote: &dyn RemoteChunks,
    keys: &VaultKeys,
    opener: &mut Opener,
    id: &ChunkId,
) -> Result<Vec<u8>, FetchError> {
    let mut tries = Tries::default();
    loop {
        let (tx, rx) = crossbeam_channel::bounded(1);
        remote.request(
            *id,
            &tries.exclude,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        );
        let answer = rx
            .recv()
            .unwrap_or_else(|_| Err(RemoteError(DROPPED.into())));
        match tries.check(remote, keys, opener, id, answer) {
            Checked::Plain(plain) => return Ok(plain),
            Checked::Retry => continue,
            Checked::Failed(e) => return Err(e),
        }
    }
}

/// What a request dropped without an answer reports.
pub(crate) const DROPPED: &str = "the mesh dropped the request without an answer";

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_protocol::keys::VaultKey;
    use cairn_protocol::seal::Sealer;
    use std::sync::Mutex;

    /// Answers from a list, one per request, recording each request's exclusions.
    struct Scripted {
        answers: Mutex<Vec<Result<Fetched, RemoteError>>>,
        requests: Mutex<Vec<Vec<NodeId>>>,
        refused: Mutex<Vec<NodeId>>,
    }

    impl RemoteChunks for Scripted {
        fn request(&self, _id: ChunkId, exclude: &[NodeId], done: FetchDone) {
            self.requests.lock().unwrap().push(exclude.to_vec());
            let mut answers = self.answers.lock().unwrap();
            if answers.is_empty() {
                drop(answers);
                drop(done); // never answered: must count as a failure
            } else {
                let answer = answers.remove(0);
                drop(answers);
                done(answer);
            }
        }
        fn refused(&self, _id: &ChunkId, from: &NodeId, _why: &SealError) {
            self.refused.lock().unwrap().push(*from);
        }
    }

    fn scripted(answers: Vec<Result<Fetched, RemoteError>>) -> Scripted {
        Scripted {
            answers: Mutex::new(answers),
            requests: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
        }
    }

    fn sealed(keys: &VaultKeys, plain: &[u8]) -> (ChunkId, Vec<u8>) {
        let id = keys.chunk_id(plain);
        let sealed = Sealer::new(2)
            .unwrap()
            .seal(keys, &id, plain, [7; 24])
            .unwrap();
        (id, sealed)
    }

    fn from(n: u8, sealed: Vec<u8>) -> Result<Fetched, RemoteError> {
        Ok(Fetched {
            sealed,
            from: NodeId([n; 32]),
        })
    }

    #[test]
    fn a_bad_answer_is_refused_and_its_sender_excluded() {
        let keys = VaultKey::from_bytes([3; 32]).derive();
        let (id, good) = sealed(&keys, b"the accounting database");
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        let remote = scripted(vec![from(1, bad.clone()), from(2, bad), from(3, good)]);
        let plain = fetch_blocking(&remote, &keys, &mut Opener::new(), &id).unwrap();
        assert_eq!(plain, b"the accounting database");
        let requests = remote.requests.lock().unwrap();
        assert_eq!(
            *requests,
            vec![
                vec![],
                vec![NodeId([1; 32])],
                vec![NodeId([1; 32]), NodeId([2; 32])]
            ]
        );
        assert_eq!(
            *remote.refused.lock().unwrap(),
            vec![NodeId([1; 32]), NodeId([2; 32])]
        );
    }

    #[test]
    fn bytes_sealed_for_another_id_are_refused() {
        let keys = VaultKey::from_bytes([3; 32]).derive();
        let (id, _) = sealed(&keys, b"wanted");
        let (_, other) = sealed(&keys, b"something else");
        let remote = scripted(
            (0..REMOTE_TRIES_MAX)
                .map(|n| from(n as u8, other.clone()))
                .collect(),
        );
        let e = fetch_blocking(&remote, &keys, &mut Opener::new(), &id).unwrap_err();
        assert!(
            matches!(e, FetchError::Refused { n_refused, last: SealError::Authentication } if n_refused == REMOTE_TRIES_MAX),
            "{e}"
        );
        assert_eq!(
            remote.requests.lock().unwrap().len(),
            REMOTE_TRIES_MAX as usize
        );
    }

    #[test]
    fn a_dropped_or_failed_request_is_an_error_not_a_hang() {
        let keys = VaultKey::from_bytes([3; 32]).derive();
        let (id, _) = sealed(&keys, b"wanted");
        let e = fetch_blocking(&scripted(vec![]), &keys, &mut Opener::new(), &id).unwrap_err();
        assert_eq!(e.to_string(), DROPPED);
        let remote = scripted(vec![
            from(1, vec![1; 50]),
            Err(RemoteError("no node holding it answered".into())),
        ]);
        let e = fetch_blocking(&remote, &keys, &mut Opener::new(), &id).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("no node holding it answered (after refusing 1"),
            "{e}"
        );
    }
}
