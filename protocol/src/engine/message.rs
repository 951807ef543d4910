//! The messages engines send each other, with one canonical encoding. Every list has a
//! named maximum that the decoder enforces, so a peer cannot make a node allocate more
//! than a message's worth.
//!
//! Message format, version 2: `u8 MESSAGE_VERSION | u8 type | fields`, fields in the
//! order of the enum below, lists as `u32 count | items`, byte strings as
//! `u32 length | bytes`.

use crate::blob::BLOB_BYTES_MAX;
use crate::catalog::Entry;
use crate::codec::{DecodeError, Reader, Writer};
use crate::gc::BatchId;
use crate::identity::{NodeId, SiteId};
use crate::ids::ChunkId;
use crate::record::{Record, RecordKind};

/// Version 2: confirmations (`Need`, `PushAck`, `SyncIds`) carry the sender's snapshot
/// digest for the owner (rule H5 of docs/retention.md).
pub const MESSAGE_VERSION: u8 = 2;
/// Chunk ids are grouped by their top bits into this many partitions per owner.
pub const PARTITIONS: usize = 64;
pub const BEATS_PER_MESSAGE_MAX: usize = 8;
pub const DIGESTS_PER_MESSAGE_MAX: usize = 1024;
pub const ENTRIES_PER_MESSAGE_MAX: usize = 8192;
pub const RECORDS_PER_MESSAGE_MAX: usize = 256;
pub const IDS_PER_MESSAGE_MAX: usize = 4096;
/// The largest chunk body a message carries: a blob (sealed bytes and the owner's
/// signature, see `crate::blob`).
pub const SEALED_BYTES_MAX: usize = BLOB_BYTES_MAX;
/// The largest encoded message a node accepts; anything longer is dropped unread and
/// counts against its sender. The largest honest message is a push of the largest blob
/// (a `Records` of 256 full records is about 4.3 MB).
pub const MESSAGE_BYTES_MAX: usize = BLOB_BYTES_MAX + 1024;

/// A node's heartbeat: the node's clock when it last said it was alive. The node is
/// named by the first bytes of its id, which is plenty to tell peers apart and keeps a
/// gossip round to a few hundred bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    pub node_prefix: [u8; 8],
    pub beat_ms: u64,
}

impl Beat {
    pub fn prefix_of(node: &NodeId) -> [u8; 8] {
        node.0[..8].try_into().expect("8 bytes")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A gossip round: heartbeats, and one digest per author the sender holds records of.
    /// `reply` is set on the answer, which carries heartbeats only.
    Gossip {
        beats: Vec<Beat>,
        digests: Vec<(SiteId, u64)>,
        reply: bool,
    },
    /// The sender's entries for one author whose digest differed.
    Entries {
        author: SiteId,
        entries: Vec<Entry>,
    },
    /// Records the receiver lacks or holds older versions of.
    Records {
        records: Vec<Record>,
    },
    /// Records the sender lacks, by key.
    Want {
        author: SiteId,
        keys: Vec<(RecordKind, [u8; 32])>,
    },
    /// "I can send you these chunks of `owner`": the receiver answers with `Need`.
    Offer {
        owner: SiteId,
        ids: Vec<ChunkId>,
    },
    Need {
        owner: SiteId,
        need: Vec<ChunkId>,
        have: Vec<ChunkId>,
        /// The sender's snapshot digest for `owner` (`Catalog::snapshot_digest`): `have`
        /// counts as confirmation only at a node whose digest is the same (rule H5), so a
        /// holder that confirms a chunk for a snapshot knew that snapshot.
        basis: u64,
    },
    /// A chunk for the receiver to store, as a blob (`crate::blob`): the receiver checks
    /// the owner's signature before storing it. `size_bytes` is the blob's size the
    /// receiver charges to the owner's quota; the body may not be longer (the simulator
    /// sends short stand-in bodies for chunks of real sizes).
    Push {
        owner: SiteId,
        id: ChunkId,
        size_bytes: u64,
        sealed: Vec<u8>,
    },
    PushAck {
        owner: SiteId,
        id: ChunkId,
        stored: bool,
        /// As `Need::basis`.
        basis: u64,
    },
    /// Digests of the chunks of `owner` that both sender and receiver should hold and
    /// the sender holds: either one root, or one per partition.
    SyncDigest {
        owner: SiteId,
        digests: Vec<u64>,
    },
    /// The sender's chunks of one partition of that shared set.
    SyncIds {
        owner: SiteId,
        partition: u16,
        ids: Vec<ChunkId>,
        reply: bool,
        /// As `Need::basis`.
        basis: u64,
    },
    Fetch {
        owner: SiteId,
        id: ChunkId,
    },
    /// The chunk's blob, or `None` when the sender does not have it.
    FetchReply {
        owner: SiteId,
        id: ChunkId,
        sealed: Option<Vec<u8>>,
    },
    /// "Prove you hold chunk `id` of `owner`": the receiver answers with
    /// `crate::blob::audit_proof` over this fresh nonce and its sealed bytes.
    Audit {
        owner: SiteId,
        id: ChunkId,
        nonce: [u8; 32],
    },
    /// The answer to an `Audit`; `proof` is `None` when the receiver does not hold the
    /// chunk (or found its copy damaged).
    AuditReply {
        owner: SiteId,
        id: ChunkId,
        nonce: [u8; 32],
        proof: Option<[u8; 32]>,
    },
    /// "Send me batch `batch` of `owner`'s garbage from id number `from_index` on":
    /// asked only of a node of the owner's site (rule H1).
    GcWant {
        owner: SiteId,
        batch: BatchId,
        from_index: u32,
    },
    /// A piece of a batch: its ids from `from_index` on; `last` on the final piece. A node
    /// that does not have the batch answers with no ids and `last` at index 0.
    GcIds {
        owner: SiteId,
        batch: BatchId,
        from_index: u32,
        ids: Vec<ChunkId>,
        last: bool,
    },
}

impl Message {
    /// True for a message only sent in answer to one from the receiver: its arrival shows
    /// that the link from the receiver to the sender works.
    pub fn is_answer(&self) -> bool {
        match self {
            Message::Gossip { reply, .. } | Message::SyncIds { reply, .. } => *reply,
            Message::SyncDigest { digests, .. } => digests.len() == PARTITIONS,
            Message::Entries { .. }
            | Message::Need { .. }
            | Message::PushAck { .. }
            | Message::FetchReply { .. }
            | Message::AuditReply { .. }
            | Message::GcIds { .. } => true,
            Message::Records { .. }
            | Message::Want { .. }
            | Message::Offer { .. }
            | Message::Push { .. }
            | Message::Fetch { .. }
            | Message::Audit { .. }
            | Message::GcWant { .. } => false,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.u8(MESSAGE_VERSION);
        match self {
            Message::Gossip {
                beats,
                digests,
                reply,
            } => {
                w.u8(1);
                put_list(&mut w, beats, BEATS_PER_MESSAGE_MAX, |w, b| {
                    w.array(&b.node_prefix);
                    w.u64(b.beat_ms);
                });
                put_list(&mut w, digests, DIGESTS_PER_MESSAGE_MAX, |w, (site, d)| {
                    w.array(&site.0);
                    w.u64(*d);
                });
                w.u8(u8::from(*reply));
            }
            Message::Entries { author, entries } => {
                w.u8(2);
                w.array(&author.0);
                put_list(&mut w, entries, ENTRIES_PER_MESSAGE_MAX, |w, e| {
                    w.u8(e.kind as u8);
                    w.array(&e.key);
                    w.u64(e.version);
                    w.u64(e.tag);
                });
            }
            Message::Records { records } => {
                w.u8(3);
                put_list(&mut w, records, RECORDS_PER_MESSAGE_MAX, |w, r| {
                    put_bytes(w, &r.encode());
                });
            }
            Message::Want { author, keys } => {
                w.u8(4);
                w.array(&author.0);
                put_list(&mut w, keys, ENTRIES_PER_MESSAGE_MAX, |w, (kind, key)| {
                    w.u8(*kind as u8);
                    w.array(key);
                });
            }
            Message::Offer { owner, ids } => {
                w.u8(5);
                w.array(&owner.0);
                put_ids(&mut w, ids);
            }
            Message::Need {
                owner,
                need,
                have,
                basis,
            } => {
                w.u8(6);
                w.array(&owner.0);
                put_ids(&mut w, need);
                put_ids(&mut w, have);
                w.u64(*basis);
            }
            Message::Push {
                owner,
                id,
                size_bytes,
                sealed,
            } => {
                w.u8(7);
                w.array(&owner.0);
                w.array(&id.0);
                w.u64(*size_bytes);
                put_bytes(&mut w, sealed);
            }
            Message::PushAck {
                owner,
                id,
                stored,
                basis,
            } => {
                w.u8(8);
                w.array(&owner.0);
                w.array(&id.0);
                w.u8(u8::from(*stored));
                w.u64(*basis);
            }
            Message::SyncDigest { owner, digests } => {
                w.u8(9);
                w.array(&owner.0);
                put_list(&mut w, digests, PARTITIONS, |w, d| w.u64(*d));
            }
            Message::SyncIds {
                owner,
                partition,
                ids,
                reply,
                basis,
            } => {
                w.u8(10);
                w.array(&owner.0);
                w.u16(*partition);
                put_ids(&mut w, ids);
                w.u8(u8::from(*reply));
                w.u64(*basis);
            }
            Message::Fetch { owner, id } => {
                w.u8(11);
                w.array(&owner.0);
                w.array(&id.0);
            }
            Message::FetchReply { owner, id, sealed } => {
                w.u8(12);
                w.array(&owner.0);
                w.array(&id.0);
                match sealed {
                    None => w.u8(0),
                    Some(bytes) => {
                        w.u8(1);
                        put_bytes(&mut w, bytes);
                    }
                }
            }
            Message::Audit { owner, id, nonce } => {
                w.u8(13);
                w.array(&owner.0);
                w.array(&id.0);
                w.array(nonce);
            }
            Message::AuditReply {
                owner,
                id,
                nonce,
                proof,
            } => {
                w.u8(14);
                w.array(&owner.0);
                w.array(&id.0);
                w.array(nonce);
                match proof {
                    None => w.u8(0),
                    Some(proof) => {
                        w.u8(1);
                        w.array(proof);
                    }
                }
            }
            Message::GcWant {
                owner,
                batch,
                from_index,
            } => {
                w.u8(15);
                w.array(&owner.0);
                w.array(&batch.0);
                w.u32(*from_index);
            }
            Message::GcIds {
                owner,
                batch,
                from_index,
                ids,
                last,
            } => {
                w.u8(16);
                w.array(&owner.0);
                w.array(&batch.0);
                w.u32(*from_index);
                put_ids(&mut w, ids);
                w.u8(u8::from(*last));
            }
        }
        let bytes = w.finish();
        assert!(
            bytes.len() <= MESSAGE_BYTES_MAX,
            "callers bound what a message carries"
        );
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        if bytes.len() > MESSAGE_BYTES_MAX {
            return Err(DecodeError::TooMany {
                what: "message bytes",
                count: bytes.len() as u64,
                max: MESSAGE_BYTES_MAX as u64,
            });
        }
        let mut r = Reader::new(bytes);
        r.version("message", MESSAGE_VERSION)?;
        let message = match r.u8()? {
            1 => Message::Gossip {
                beats: get_list(&mut r, "beats", BEATS_PER_MESSAGE_MAX, |r| {
                    Ok(Beat {
                        node_prefix: r.array()?,
                        beat_ms: r.u64()?,
                    })
                })?,
                digests: get_list(&mut r, "digests", DIGESTS_PER_MESSAGE_MAX, |r| {
                    Ok((SiteId(r.array()?), r.u64()?))
                })?,
                reply: get_bool(&mut r)?,
            },
            2 => Message::Entries {
                author: SiteId(r.array()?),
                entries: get_list(&mut r, "entries", ENTRIES_PER_MESSAGE_MAX, |r| {
                    Ok(Entry {
                        kind: get_kind(r)?,
                        key: r.array()?,
                        version: r.u64()?,
                        tag: r.u64()?,
                    })
                })?,
            },
            3 => Message::Records {
                records: get_list(&mut r, "records", RECORDS_PER_MESSAGE_MAX, |r| {
                    Record::decode(get_bytes(
                        r,
                        crate::record::RECORD_BODY_BYTES_MAX as usize + 512,
                    )?)
                })?,
            },
            4 => Message::Want {
                author: SiteId(r.array()?),
                keys: get_list(&mut r, "wanted keys", ENTRIES_PER_MESSAGE_MAX, |r| {
                    Ok((get_kind(r)?, r.array()?))
                })?,
            },
            5 => Message::Offer {
                owner: SiteId(r.array()?),
                ids: get_ids(&mut r)?,
            },
            6 => Message::Need {
                owner: SiteId(r.array()?),
                need: get_ids(&mut r)?,
                have: get_ids(&mut r)?,
                basis: r.u64()?,
            },
            7 => Message::Push {
                owner: SiteId(r.array()?),
                id: ChunkId(r.array()?),
                size_bytes: r.u64()?,
                sealed: get_bytes(&mut r, SEALED_BYTES_MAX)?.to_vec(),
            },
            8 => Message::PushAck {
                owner: SiteId(r.array()?),
                id: ChunkId(r.array()?),
                stored: get_bool(&mut r)?,
                basis: r.u64()?,
            },
            9 => Message::SyncDigest {
                owner: SiteId(r.array()?),
                digests: get_list(&mut r, "partition digests", PARTITIONS, |r| r.u64())?,
            },
            10 => Message::SyncIds {
                owner: SiteId(r.array()?),
                partition: r.u16()?,
                ids: get_ids(&mut r)?,
                reply: get_bool(&mut r)?,
                basis: r.u64()?,
            },
            11 => Message::Fetch {
                owner: SiteId(r.array()?),
                id: ChunkId(r.array()?),
            },
            12 => Message::FetchReply {
                owner: SiteId(r.array()?),
                id: ChunkId(r.array()?),
                sealed: match r.u8()? {
                    0 => None,
                    1 => Some(get_bytes(&mut r, SEALED_BYTES_MAX)?.to_vec()),
                    other => return Err(invalid("fetch reply", format!("flag {other}"))),
                },
            },
            13 => Message::Audit {
                owner: SiteId(r.array()?),
                id: ChunkId(r.array()?),
                nonce: r.array()?,
            },
            14 => Message::AuditReply {
                owner: SiteId(r.array()?),
                id: ChunkId(r.array()?),
                nonce: r.array()?,
                proof: match r.u8()? {
                    0 => None,
                    1 => Some(r.array()?),
                    other => return Err(invalid("audit reply", format!("flag {other}"))),
                },
            },
            15 => Message::GcWant {
                owner: SiteId(r.array()?),
                batch: BatchId(r.array()?),
                from_index: r.u32()?,
            },
            16 => Message::GcIds {
                owner: SiteId(r.array()?),
                batch: BatchId(r.array()?),
                from_index: r.u32()?,
                ids: get_ids(&mut r)?,
                last: get_bool(&mut r)?,
            },
            other => return Err(invalid("message type", format!("unknown type {other}"))),
        };
        r.finish()?;
        Ok(message)
    }
}

fn invalid(what: &'static str, why: String) -> DecodeError {
    DecodeError::Invalid { what, why }
}

fn put_list<T>(w: &mut Writer, items: &[T], max: usize, mut put: impl FnMut(&mut Writer, &T)) {
    assert!(items.len() <= max, "callers bound message lists");
    w.u32(items.len() as u32);
    for item in items {
        put(w, item);
    }
}

fn get_list<T>(
    r: &mut Reader<'_>,
    what: &'static str,
    max: usize,
    mut get: impl FnMut(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let count = r.u32()? as usize;
    if count > max {
        return Err(DecodeError::TooMany {
            what,
            count: count as u64,
            max: max as u64,
        });
    }
    // Every item takes at least one byte, so a short message cannot claim a huge list.
    if count > r.remaining() {
        return Err(DecodeError::Truncated {
            needed: count - r.remaining(),
        });
    }
    (0..count).map(|_| get(r)).collect()
}

fn put_ids(w: &mut Writer, ids: &[ChunkId]) {
    put_list(w, ids, IDS_PER_MESSAGE_MAX, |w, id| w.array(&id.0));
}

fn get_ids(r: &mut Reader<'_>) -> Result<Vec<ChunkId>, DecodeError> {
    get_list(r, "chunk ids", IDS_PER_MESSAGE_MAX, |r| {
        Ok(ChunkId(r.array()?))
    })
}

fn put_bytes(w: &mut Writer, bytes: &[u8]) {
    w.u32(bytes.len() as u32);
    w.array(bytes);
}

fn get_bytes<'a>(r: &mut Reader<'a>, max: usize) -> Result<&'a [u8], DecodeError> {
    let n = r.u32()? as usize;
    if n > max {
        return Err(DecodeError::TooMany {
            what: "bytes",
            count: n as u64,
            max: max as u64,
        });
    }
    r.take(n)
}

fn get_bool(r: &mut Reader<'_>) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(invalid("flag", format!("{other}"))),
    }
}

fn get_kind(r: &mut Reader<'_>) -> Result<RecordKind, DecodeError> {
    let byte = r.u8()?;
    RecordKind::from_u8(byte).ok_or_else(|| invalid("record kind", format!("unknown kind {byte}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_id() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>()
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let ids = || prop::collection::vec(any::<[u8; 32]>().prop_map(ChunkId), 0..5);
        prop_oneof![
            (
                prop::collection::vec((arb_id(), any::<u64>()), 0..4),
                any::<bool>()
            )
                .prop_map(|(beats, reply)| Message::Gossip {
                    beats: beats
                        .iter()
                        .map(|(n, b)| Beat {
                            node_prefix: n[..8].try_into().expect("8 bytes"),
                            beat_ms: *b
                        })
                        .collect(),
                    digests: beats.iter().map(|(n, b)| (SiteId(*n), *b)).collect(),
                    reply,
                }),
            (arb_id(), ids(), ids(), any::<u64>()).prop_map(|(o, need, have, basis)| {
                Message::Need {
                    owner: SiteId(o),
                    need,
                    have,
                    basis,
                }
            }),
            (arb_id(), arb_id(), any::<bool>(), any::<u64>()).prop_map(|(o, id, stored, basis)| {
                Message::PushAck {
                    owner: SiteId(o),
                    id: ChunkId(id),
                    stored,
                    basis,
                }
            }),
            (
                arb_id(),
                arb_id(),
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(o, id, size_bytes, sealed)| Message::Push {
                    owner: SiteId(o),
                    id: ChunkId(id),
                    size_bytes,
                    sealed
                }),
            (arb_id(), any::<u16>(), ids(), any::<bool>(), any::<u64>()).prop_map(
                |(o, p, ids, reply, basis)| Message::SyncIds {
                    owner: SiteId(o),
                    partition: p,
                    ids,
                    reply,
                    basis,
                }
            ),
            (
                arb_id(),
                arb_id(),
                prop::option::of(prop::collection::vec(any::<u8>(), 0..16))
            )
                .prop_map(|(o, id, sealed)| Message::FetchReply {
                    owner: SiteId(o),
                    id: ChunkId(id),
                    sealed
                }),
            (arb_id(), arb_id(), arb_id()).prop_map(|(o, id, nonce)| Message::Audit {
                owner: SiteId(o),
                id: ChunkId(id),
                nonce
            }),
            (arb_id(), arb_id(), arb_id(), prop::option::of(arb_id())).prop_map(
                |(o, id, nonce, proof)| Message::AuditReply {
                    owner: SiteId(o),
                    id: ChunkId(id),
                    nonce,
                    proof
                }
            ),
            (arb_id(), arb_id(), any::<u32>()).prop_map(|(o, b, from_index)| Message::GcWant {
                owner: SiteId(o),
                batch: BatchId(b),
                from_index,
            }),
            (arb_id(), arb_id(), any::<u32>(), ids(), any::<bool>()).prop_map(
                |(o, b, from_index, ids, last)| Message::GcIds {
                    owner: SiteId(o),
                    batch: BatchId(b),
                    from_index,
                    ids,
                    last,
                }
            ),
            (arb_id(), 1u8..=5, arb_id(), any::<u64>(), any::<u64>()).prop_map(
                |(a, k, key, version, tag)| Message::Entries {
                    author: SiteId(a),
                    entries: vec![Entry {
                        kind: RecordKind::from_u8(k).expect("1..=5 are kinds"),
                        key,
                        version,
                        tag
                    }],
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(message in arb_message()) {
            prop_assert_eq!(Message::decode(&message.encode()), Ok(message));
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn truncation_is_an_error(message in arb_message(), cut in any::<prop::sample::Index>()) {
            let bytes = message.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(Message::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn an_oversized_message_or_chunk_body_is_refused() {
        let too_long = vec![0u8; MESSAGE_BYTES_MAX + 1];
        assert!(matches!(
            Message::decode(&too_long),
            Err(DecodeError::TooMany { .. })
        ));
        // A push claiming a body one byte over the largest blob.
        let mut w = Writer::default();
        w.u8(MESSAGE_VERSION);
        w.u8(7);
        w.array(&[0; 32]);
        w.array(&[0; 32]);
        w.u64(0);
        w.u32(BLOB_BYTES_MAX as u32 + 1);
        assert!(matches!(
            Message::decode(&w.finish()),
            Err(DecodeError::TooMany { .. })
        ));
        // An audit reply with a flag that is neither 0 nor 1.
        let mut w = Writer::default();
        w.u8(MESSAGE_VERSION);
        w.u8(14);
        w.array(&[0; 96]);
        w.u8(2);
        assert!(Message::decode(&w.finish()).is_err());
    }

    #[test]
    fn a_huge_claimed_list_is_refused_before_allocating() {
        let mut w = Writer::default();
        w.u8(MESSAGE_VERSION);
        w.u8(5);
        w.array(&[0; 32]);
        w.u32(u32::MAX);
        assert!(matches!(
            Message::decode(&w.finish()),
            Err(DecodeError::TooMany { .. })
        ));
    }
}
