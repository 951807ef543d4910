//! The signed records this node keeps in its store's index, one per (author, kind, key),
//! the newest version, under the catalog key `rec/` author kind key. This is the node's
//! copy of the catalog; the mesh will gossip it.

use cairn_protocol::identity::SiteId;
use cairn_protocol::record::{
    validate, Record, RecordKind, Tombstone, TrustView, TOMBSTONE_VERSION,
};
use cairn_protocol::SnapshotId;

use crate::store::{IndexBatch, MetaIndex, StoreError};
use crate::vault::Vault;

const KEY_RECORD: &[u8] = b"rec/";

fn prefix(author: &SiteId, kind: RecordKind) -> Vec<u8> {
    [KEY_RECORD, &author.0, &[kind as u8]].concat()
}

/// The catalog key of the record (author, kind, key).
pub fn key_of(author: &SiteId, kind: RecordKind, key: &[u8; 32]) -> Vec<u8> {
    [prefix(author, kind), key.to_vec()].concat()
}

/// The catalog entry that stores `record`.
pub fn entry(record: &Record) -> (Vec<u8>, Vec<u8>) {
    (
        key_of(&record.author, record.kind, &record.key),
        record.encode(),
    )
}

/// Stores one record, replacing any older one under its key, in its own index batch.
pub fn save(index: &dyn MetaIndex, record: &Record) -> Result<(), StoreError> {
    index.commit(IndexBatch {
        catalog: vec![entry(record)],
        ..IndexBatch::default()
    })
}

/// Every stored record, of every author and kind.
pub fn all(index: &dyn MetaIndex) -> Result<Vec<Record>, StoreError> {
    index
        .catalog_scan(KEY_RECORD)?
        .iter()
        .map(|(key, bytes)| decode(key, bytes))
        .collect()
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Record, StoreError> {
    let record = Record::decode(bytes).map_err(|e| {
        StoreError::Index(format!(
            "a stored record is damaged: {}",
            crate::units::chain(&e)
        ))
    })?;
    if entry(&record).0 != key {
        return Err(StoreError::Index(
            "a stored record sits under another record's key".into(),
        ));
    }
    Ok(record)
}

/// The stored record for (author, kind, key), if any.
pub fn get(
    index: &dyn MetaIndex,
    author: &SiteId,
    kind: RecordKind,
    key: &[u8; 32],
) -> Result<Option<Record>, StoreError> {
    let catalog_key = key_of(author, kind, key);
    index
        .catalog_get(&catalog_key)?
        .map(|bytes| decode(&catalog_key, &bytes))
        .transpose()
}

/// Every stored record of `author` of `kind`, in key order.
pub fn scan(
    index: &dyn MetaIndex,
    author: &SiteId,
    kind: RecordKind,
) -> Result<Vec<Record>, StoreError> {
    index
        .catalog_scan(&prefix(author, kind))?
        .iter()
        .map(|(key, bytes)| decode(key, bytes))
        .collect()
}

/// Trusts only this site: enough to check what it signs itself.
struct OwnSite(SiteId);

impl TrustView for OwnSite {
    fn is_trusted(&self, site: &SiteId) -> bool {
        *site == self.0
    }
}

/// Signs the next version of this site's record (kind, key), checked as any receiver
/// will check it. The caller stores it (see `entry`).
pub fn sign_next(
    vault: &Vault,
    kind: RecordKind,
    key: [u8; 32],
    body: Vec<u8>,
) -> Result<Record, StoreError> {
    let site = vault.dir.site_id();
    let version = match get(vault.store.index(), &site, kind, &key)? {
        None => 1,
        Some(r) if r.is_tombstone() => {
            return Err(StoreError::Forgotten {
                id: snapshot_id_of_key(&key),
            })
        }
        // Below TOMBSTONE_VERSION: only a tombstone holds that version (validate).
        Some(r) => r.version + 1,
    };
    Ok(sign(vault, kind, key, version, body))
}

/// Signs the tombstone of this site's snapshot `id`: the record that forgets it, final
/// (nothing supersedes it), through the same path as every other record of the site.
pub fn sign_tombstone(vault: &Vault, id: &SnapshotId, forgotten_unix_ms: u64) -> Record {
    let body = Tombstone { forgotten_unix_ms }.encode();
    sign(
        vault,
        RecordKind::Snapshot,
        snapshot_key(id),
        TOMBSTONE_VERSION,
        body,
    )
}

/// The one place this node signs with the site key, so moving the site key off ordinary
/// nodes changes this function alone.
fn sign(vault: &Vault, kind: RecordKind, key: [u8; 32], version: u64, body: Vec<u8>) -> Record {
    let site = vault.dir.site_id();
    let record = Record::sign(&vault.dir.site_key, kind, key, version, body);
    validate(&record, &OwnSite(site)).expect("records this site signs are valid");
    record
}

/// The catalog key of snapshot `id`'s record: the id, zero-padded.
pub fn snapshot_key(id: &SnapshotId) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&id.0);
    key
}

/// The snapshot a Snapshot record's key names (its first 16 bytes).
pub fn snapshot_id_of_key(key: &[u8; 32]) -> SnapshotId {
    SnapshotId(key[..16].try_into().expect("16 of 32 bytes"))
}
