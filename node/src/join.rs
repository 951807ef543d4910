//! Adding a machine to a site by copying text, since there is no network yet. The new
//! machine makes a node key and shows its id (`begin`); a node of the site certifies that
//! id and prints a join token with the site's keys sealed to it (`add_node`); the new
//! machine checks and opens the token without changing anything (`check`), and once the
//! user has confirmed, becomes a node of the site (`finish`).

use std::path::Path;

use cairn_protocol::identity::NodeId;
use cairn_protocol::join::{node_key, JoinToken, JoinTokenError, SiteKeys};
use cairn_protocol::record::{
    check_addresses, is_valid_name, NodeCert, Record, RecordError, RecordKind, NAME_BYTES_MAX,
};
use thiserror::Error;

use crate::datadir::{random_bytes, DataDirError, JoiningDir};
use crate::records;
use crate::store::StoreError;
use crate::units;
use crate::vault::{Vault, VaultError};

pub const JOIN_EXPIRES_DEFAULT_MS: u64 = 3_600_000;

#[derive(Debug, Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] JoinTokenError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("{0} is this machine's own node id: run `cairn join` on the new machine and add the node id it prints")]
    OwnNode(NodeId),
    #[error("invalid node name {0:?}: use 1 to {NAME_BYTES_MAX} printable bytes")]
    BadName(String),
}

/// The machine to add, as `cairn site add-node` was told.
#[derive(Debug)]
pub struct NewNode {
    pub node: NodeId,
    /// [default: "node " and the first group of its id]
    pub name: Option<String>,
    pub addresses: Vec<String>,
    /// What it offers to store; 0 when not stated.
    pub capacity_bytes: u64,
}

/// Makes `root` a data dir waiting to join (or opens the one there) and returns the node
/// id to give a node of the site.
pub fn begin(root: &Path) -> Result<NodeId, JoinError> {
    Ok(JoiningDir::begin(root)?.node_id())
}

/// On a node of the site: checks what `cairn site add-node` was told and returns the
/// certificate to sign, before anything is asked or changed.
pub fn check_new_node(vault: &Vault, new: NewNode) -> Result<NodeCert, JoinError> {
    if new.node == vault.dir.node_id() {
        return Err(JoinError::OwnNode(new.node));
    }
    node_key(&new.node)?;
    let name = new
        .name
        .unwrap_or_else(|| format!("node {}", &new.node.to_string()[..7]));
    if !is_valid_name(&name) {
        return Err(JoinError::BadName(name));
    }
    check_addresses(&new.addresses)?;
    Ok(NodeCert {
        node: new.node,
        site: vault.dir.site_id(),
        name,
        addresses: new.addresses,
        capacity_bytes: new.capacity_bytes,
    })
}

/// Signs `cert` (from `check_new_node`), stores it in this site's catalog, and returns a
/// token that gives the node the site's keys, sealed to its node key.
pub fn add_node(
    vault: &Vault,
    cert: NodeCert,
    expires_ms: u64,
    now_unix_ms: u64,
) -> Result<JoinToken, JoinError> {
    let record = records::sign_next(vault, RecordKind::NodeCert, cert.node.0, cert.encode())?;
    let token = JoinToken::issue(
        &vault.dir.site_key,
        &vault.dir.vault_key,
        &vault.dir.site_name,
        record,
        wrapped_keys(vault)?,
        now_unix_ms.saturating_add(expires_ms),
        random_bytes(),
        random_bytes(),
    )?;
    records::save(vault.store.index(), &token.node_record)?;
    Ok(token)
}

/// The site's wrapped-keys record, when this data dir has one (those made before recovery
/// keys existed do not).
fn wrapped_keys(vault: &Vault) -> Result<Option<Record>, JoinError> {
    let path = vault.dir.wrapped_keys_path();
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(DataDirError::Io { path, source }.into()),
    };
    let record = Record::decode(&bytes).map_err(|e| DataDirError::Damaged {
        path,
        why: format!("wrapped-keys.rec: {}", units::chain(&e)),
    })?;
    Ok(Some(record))
}

/// A join token checked and opened by the node it was made for; nothing written yet.
pub struct CheckedJoin {
    dir: JoiningDir,
    pub token: JoinToken,
    keys: SiteKeys,
}

impl CheckedJoin {
    pub fn node_id(&self) -> NodeId {
        self.dir.node_id()
    }
}

/// On the new machine: checks the token (signature, records, expiry), that it is sealed to
/// this data dir's node key, and that the keys it holds are the site's.
pub fn check(root: &Path, text: &str, now_unix_ms: u64) -> Result<CheckedJoin, JoinError> {
    let dir = JoiningDir::open(root)?;
    let token = JoinToken::from_text(text, now_unix_ms)?;
    let keys = token.open(&dir.node_key)?;
    Ok(CheckedJoin { dir, token, keys })
}

/// Writes the site's keys and files, stores this node's certificate, and only then ends
/// the joining state.
pub fn finish(checked: CheckedJoin) -> Result<Vault, JoinError> {
    let CheckedJoin { dir, token, keys } = checked;
    let wrapped = token.wrapped_keys.as_ref().map(Record::encode);
    let dir = dir.write_site(
        &token.site_name,
        keys.site_key,
        keys.vault_key,
        wrapped.as_deref(),
    )?;
    let vault = Vault::from_dir(dir)?;
    records::save(vault.store.index(), &token.node_record)?;
    vault.dir.finish_join()?;
    Ok(vault)
}

/// The nodes this site has certified, as far as this node knows, in node id order.
pub fn site_nodes(vault: &Vault) -> Result<Vec<NodeCert>, JoinError> {
    let own = vault.dir.site_id();
    records::scan(vault.store.index(), &own, RecordKind::NodeCert)?
        .iter()
        .map(|record| {
            NodeCert::decode(&record.body).map_err(|e| {
                StoreError::Index(format!(
                    "a stored node certificate is damaged: {}",
                    units::chain(&e)
                ))
                .into()
            })
        })
        .collect()
}
