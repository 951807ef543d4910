//! This site's side of garbage collection (docs/retention.md, rules O2 and O3): the
//! statement that names the site's garbage, kept in the index like every other record of
//! the site, and the batches it names, under `gc-batch/`.
//!
//! The node signs a statement in two places, both through `records::sign_next`:
//! - `prune` (O2): the batches in force restated against its mark, plus new garbage;
//! - a commit or a forget (O3, `restate`): the statement in force on the new basis, minus
//!   any listed id the new snapshot uses, and only when the statement was signed on this
//!   node's own view just before. Otherwise the statement stays inactive wherever the new
//!   snapshot is known (rule H2), which is safe; the next prune restates it.
//!
//! The rules themselves are the pure functions of `cairn_protocol::gc`, which the
//! simulator runs too. Everything here reads the index, not the engine, so a stopped node
//! and a running one sign the same statement.

use std::collections::{BTreeMap, BTreeSet};

use cairn_protocol::catalog::Catalog;
use cairn_protocol::gc::{self, BatchId, GcStatement, KnownBatch, GC_GRACE_DEFAULT_MS};
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{Record, RecordKind};
use serde::{Deserialize, Serialize};

use crate::records;
use crate::store::{IndexBatch, MetaIndex, StoreError};
use crate::vault::Vault;

/// `gc-batch/` batch id -> its ids, 32 bytes each, sorted: the batches this node made or
/// restated, to hand its engine at start (the engine serves them to holders).
pub const KEY_GC_BATCH: &[u8] = b"gc-batch/";
/// `gc-pending/` snapshot key -> the snapshot's stored body: snapshots forgotten here
/// whose garbage no statement has listed yet (prune walks them, then drops the key).
pub const KEY_GC_PENDING: &[u8] = b"gc-pending/";

/// The statement's catalog key: one per site.
pub const STATEMENT_KEY: [u8; 32] = [0; 32];

/// Garbage collection's settings, `[gc]` in node.toml.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcSettings {
    /// How long this site asks holders to keep what its statements list (the owner's
    /// grace).
    pub grace_ms: u64,
    /// How long this node keeps what another site's statement lists, at least (the
    /// holder's grace, `gc_grace_min_ms` of the engine).
    pub grace_min_ms: u64,
    /// A pack is rewritten once this share of it (percent) is garbage.
    pub repack_unused_percent: u8,
}

impl Default for GcSettings {
    fn default() -> GcSettings {
        GcSettings {
            grace_ms: GC_GRACE_DEFAULT_MS,
            grace_min_ms: cairn_protocol::engine::EngineConfig::default().gc_grace_min_ms,
            repack_unused_percent: 10,
        }
    }
}

/// What node.toml says about retention and garbage collection: `[gc]`, and a policy per
/// image under `[retention.IMAGE]` (applied by `cairn forget IMAGE` given no --keep-*).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub gc: GcSettings,
    pub retention: BTreeMap<String, cairn_protocol::retention::Policy>,
}

/// A statement signed and stored here, with the batches it names that the engine may
/// not have yet.
#[derive(Clone, Debug)]
pub struct Signed {
    pub record: Record,
    pub batches: Vec<Vec<ChunkId>>,
}

/// This site's statement in force, as the index holds it.
pub fn statement(vault: &Vault) -> Result<Option<GcStatement>, StoreError> {
    let record = records::get(
        vault.store.index(),
        &vault.dir.site_id(),
        RecordKind::GcStatement,
        &STATEMENT_KEY,
    )?;
    Ok(record.and_then(|r| GcStatement::decode(&r.body).ok()))
}

fn batch_key(id: &BatchId) -> Vec<u8> {
    [KEY_GC_BATCH, &id.0].concat()
}

fn decode_ids(bytes: &[u8]) -> Vec<ChunkId> {
    bytes
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().expect("32 bytes")))
        .collect()
}

/// The ids of one of this site's batches, when this node made or restated it.
pub fn batch(index: &dyn MetaIndex, id: &BatchId) -> Result<Option<Vec<ChunkId>>, StoreError> {
    Ok(index.catalog_get(&batch_key(id))?.map(|b| decode_ids(&b)))
}

/// The ids of each batch `statement` names that this node stores.
pub fn known_batches(
    index: &dyn MetaIndex,
    statement: &GcStatement,
) -> Result<BTreeMap<BatchId, Vec<ChunkId>>, StoreError> {
    let mut known = BTreeMap::new();
    for b in &statement.batches {
        if let Some(ids) = batch(index, &b.id)? {
            known.insert(b.id, ids);
        }
    }
    Ok(known)
}

/// Every batch stored here, for the engine at the node's start.
pub fn stored_batches(index: &dyn MetaIndex) -> Result<Vec<Vec<ChunkId>>, StoreError> {
    Ok(index
        .catalog_scan(KEY_GC_BATCH)?
        .iter()
        .map(|(_, bytes)| decode_ids(bytes))
        .collect())
}

/// This node's snapshot digest for its own site, from the index: the basis a statement
/// signed now carries (the engine computes the same from the same records).
pub fn snapshot_digest(vault: &Vault) -> Result<u64, StoreError> {
    let site = vault.dir.site_id();
    let mut catalog = Catalog::default();
    for record in records::scan(vault.store.index(), &site, RecordKind::Snapshot)? {
        catalog.insert(record);
    }
    Ok(catalog.snapshot_digest(&site))
}

/// The sealed size of a chunk this node stores, 0 for one it does not (a statement's
/// byte counts are for display).
pub fn stored_size(index: &dyn MetaIndex, id: &ChunkId) -> u64 {
    index
        .chunk(id)
        .ok()
        .flatten()
        .map_or(0, |l| u64::from(l.len_bytes))
}

/// Signs the site's next statement naming `batches` on `basis`, and fills `batch` with
/// it and every batch not stored yet. The caller commits `batch`.
pub fn sign(
    vault: &Vault,
    batches: Vec<KnownBatch>,
    basis: u64,
    grace_ms: u64,
    batch: &mut IndexBatch,
) -> Result<Signed, StoreError> {
    let index = vault.store.index();
    let statement = GcStatement {
        basis,
        grace_ms,
        batches: batches.iter().map(|(b, _)| *b).collect(),
    };
    let record = records::sign_next(
        vault,
        RecordKind::GcStatement,
        STATEMENT_KEY,
        statement.encode(),
    )?;
    let mut new = Vec::new();
    for (b, ids) in batches {
        // A batch carried over without its ids (a forget's restate of one this node never
        // read) is the engine's to fetch, not this node's to store.
        if ids.is_empty() || index.catalog_get(&batch_key(&b.id))?.is_some() {
            continue;
        }
        batch
            .catalog
            .push((batch_key(&b.id), ids.iter().flat_map(|i| i.0).collect()));
        new.push(ids);
    }
    batch.catalog.push(records::entry(&record));
    Ok(Signed {
        record,
        batches: new,
    })
}

/// Rule O3: after this node committed a snapshot that uses `used` (or forgot snapshots:
/// `used` empty), restates the statement in force on the node's new basis, when
/// `basis_before` (its snapshot digest just before) was the statement's basis. Stored
/// before it returns; None when there is nothing to restate or the rule says wait.
pub fn restate(
    vault: &Vault,
    basis_before: u64,
    used: &BTreeSet<ChunkId>,
) -> Result<Option<Signed>, StoreError> {
    let Some(statement) = statement(vault)? else {
        return Ok(None);
    };
    let index = vault.store.index();
    let known = known_batches(index, &statement)?;
    let restated = gc::restate(
        &statement,
        basis_before,
        |id| known.get(id).cloned(),
        used,
        |id| stored_size(index, id),
    );
    let Ok(batches) = restated else {
        return Ok(None);
    };
    let basis = snapshot_digest(vault)?;
    if basis == statement.basis {
        return Ok(None);
    }
    let mut batch = IndexBatch::default();
    let signed = sign(vault, batches, basis, statement.grace_ms, &mut batch)?;
    index.commit(batch)?;
    Ok(Some(signed))
}
