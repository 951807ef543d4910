//! The signed records this node keeps in its store's index, one per (author, kind, key),
//! the newest version, under the catalog key `rec/` author kind key. This is the node's
//! copy of the catalog; the mesh will gossip it.

use cairn_protocol::identity::SiteId;
use cairn_protocol::record::{validate, Record, RecordKind, TrustView};

use crate::store::{MetaIndex, StoreError};
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
    let version = get(vault.store.index(), &site, kind, &key)?.map_or(1, |r| r.version + 1);
    let record = Record::sign(&vault.dir.site_key, kind, key, version, body);
    validate(&record, &OwnSite(site)).expect("records this site signs are valid");
    Ok(record)
}
