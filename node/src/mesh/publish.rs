//! This site's records and snapshots handed to the engine, and the node's own certificate.

use cairn_protocol::engine::{ChunkRef, Message};
use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{NodeCert, Record, RecordKind, TrustGrant};
use cairn_protocol::SnapshotRecord;
use tracing::{debug, warn};

use super::{hex8, now_ms, storage, Node, NodeOptions};
use crate::forget::KEY_ACKED;
use crate::store::StoreError;
use crate::vault::{ChunkError, Vault, VaultError};
use crate::{gc, records};

/// Why this site's records or snapshots cannot be read for the engine.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read the store")]
    Store(#[from] StoreError),
    #[error("cannot read this site's snapshots")]
    Vault(#[from] VaultError),
    #[error("snapshot {snapshot}")]
    Manifest {
        snapshot: String,
        #[source]
        source: cairn_protocol::manifest::ManifestError<ChunkError>,
    },
    #[error("chunk {0} is missing")]
    ChunkMissing(String),
}

impl Node {
    pub(super) fn local_records(&mut self, records: Vec<Record>) {
        let now = now_ms();
        // New wrapped keys (a changed recovery key) go to every peer at once, as at hello.
        let wrapped: Vec<Record> = records
            .iter()
            .filter(|r| r.kind == RecordKind::WrappedKeys)
            .cloned()
            .collect();
        if !wrapped.is_empty() {
            self.send_to_peers(&Message::Records { records: wrapped });
        }
        // A revocation goes to the revoked site's nodes before the engine stops talking
        // to them, so they learn it now and hand back what they hold, even where no third
        // partner relays it.
        let own = self.vault.dir.site_id();
        for record in &records {
            let revoked = (record.kind == RecordKind::TrustGrant && record.author == own)
                .then(|| TrustGrant::decode(&record.body).ok())
                .flatten()
                .filter(|g| g.revoked);
            let Some(grant) = revoked else { continue };
            let nodes: Vec<NodeId> = self
                .engine
                .peers()
                .filter(|(_, site, _)| *site == grant.grantee)
                .map(|(node, _, _)| node)
                .collect();
            let message = Message::Records {
                records: vec![record.clone()],
            };
            for node in nodes {
                if let Some(peer) = self.peer_of_node.get(&node).copied() {
                    self.send_mesh(peer, &message);
                }
            }
        }
        // A grant to a site (an invite accepted or completed): its nodes refused before
        // are let in and dialed now, not when a block runs out.
        let granted: Vec<SiteId> = records
            .iter()
            .filter(|r| r.kind == RecordKind::TrustGrant && r.author == own)
            .filter_map(|r| TrustGrant::decode(&r.body).ok())
            .filter(|g| !g.revoked)
            .map(|g| g.grantee)
            .collect();
        for record in records {
            if let Err(e) = self.engine.handle_local_record(record, now) {
                warn!("a record of this site was refused: {e}");
            }
        }
        for site in granted {
            self.admission.trust_granted(now, site);
        }
    }

    /// Hands the engine every snapshot of this site not yet confirmed at R sites (again
    /// after a restart: the engine tracks them in memory only).
    pub(super) fn publish_snapshots(&mut self) -> Result<(), PublishError> {
        let now = now_ms();
        let published = snapshots_to_publish(&self.vault, true)?;
        for (record, chunks) in published.snapshots {
            self.snapshot_chunks
                .insert(record.key, chunks.iter().map(|c| c.id).collect());
            if let Err(e) = self.engine.handle_new_snapshot(record, &chunks, now) {
                warn!("a snapshot of this site was refused: {e}");
            }
        }
        // After the snapshots, so the engine takes the statement on their basis.
        if !published.statements.is_empty() {
            self.local_records(published.statements);
        }
        Ok(())
    }

    /// Snapshots confirmed at R before this start, for `cairn status`.
    pub(super) fn remember_acked(&mut self) -> Result<(), PublishError> {
        for snapshot in self.vault.snapshots()? {
            let key = records::snapshot_key(&snapshot.id);
            let index = self.vault.store.index();
            if index.catalog_get(&[KEY_ACKED, &key].concat())?.is_none() {
                continue;
            }
            if let Ok(chunks) = snapshot_chunks(&self.vault, &snapshot) {
                self.snapshot_chunks
                    .insert(key, chunks.iter().map(|c| c.id).collect());
                self.acked.insert(key);
            }
        }
        Ok(())
    }
}

/// This node's certificate, signed anew when its name, addresses or capacity changed.
pub(super) fn own_node_cert(vault: &Vault, options: &NodeOptions) -> Result<Record, StoreError> {
    let node = vault.dir.node_id();
    let site = vault.dir.site_id();
    let existing = records::get(vault.store.index(), &site, RecordKind::NodeCert, &node.0)?
        .and_then(|r| NodeCert::decode(&r.body).ok().map(|c| (r, c)));
    let name = options
        .name
        .clone()
        .or_else(|| existing.as_ref().map(|(_, c)| c.name.clone()))
        .unwrap_or_else(|| format!("node {}", &node.to_string()[..7]));
    let mut addresses: Vec<String> = options
        .listen
        .iter()
        .filter(|a| !a.ends_with(":0") && !a.starts_with("0.0.0.0") && !a.starts_with("[::]"))
        .cloned()
        .collect();
    if addresses.is_empty() {
        if let Some((_, cert)) = &existing {
            addresses = cert.addresses.clone();
        }
    }
    let capacity_bytes = if options.capacity_bytes > 0 {
        options.capacity_bytes
    } else {
        existing.as_ref().map_or(0, |(_, c)| c.capacity_bytes)
    };
    let cert = NodeCert {
        node,
        site,
        name,
        addresses,
        capacity_bytes,
    };
    if let Some((record, old)) = existing {
        if old == cert {
            return Ok(record);
        }
    }
    let record = records::sign_next(vault, RecordKind::NodeCert, node.0, cert.encode())?;
    records::save(vault.store.index(), &record)?;
    Ok(record)
}

/// Every record this site signed, as stored.
pub fn own_records(vault: &Vault) -> Result<Vec<Record>, StoreError> {
    let site = vault.dir.site_id();
    Ok(records::all(vault.store.index())?
        .into_iter()
        .filter(|r| r.author == site)
        .collect())
}

/// Snapshots of this site for the engine, with their chunks, and the statements their
/// commits restated (rule O3), which the engine needs too.
#[derive(Default)]
pub struct ToPublish {
    pub snapshots: Vec<(Record, Vec<ChunkRef>)>,
    pub statements: Vec<Record>,
}

/// Snapshots of this site for the engine: those without a catalog record yet (made by a
/// backup: the record is signed and stored now, and the garbage statement restated on
/// the new basis), and with `unacked` also those not yet confirmed at R sites.
pub fn snapshots_to_publish(vault: &Vault, unacked: bool) -> Result<ToPublish, PublishError> {
    let site = vault.dir.site_id();
    let index = vault.store.index();
    let snapshots = vault.snapshots()?;
    let mut out = ToPublish::default();
    for (id, body) in index.snapshots()? {
        let key = records::snapshot_key(&id);
        let (record, basis_before) = match records::get(index, &site, RecordKind::Snapshot, &key)? {
            Some(_) if !unacked => continue,
            Some(record) => {
                if index.catalog_get(&[KEY_ACKED, &key].concat())?.is_some() {
                    continue;
                }
                (record, None)
            }
            None => {
                let basis_before = gc::snapshot_digest(vault)?;
                let record = records::sign_next(vault, RecordKind::Snapshot, key, body)?;
                records::save(index, &record)?;
                (record, Some(basis_before))
            }
        };
        let Some(snapshot) = snapshots.iter().find(|s| s.id == id) else {
            continue;
        };
        match snapshot_chunks(vault, snapshot) {
            Ok(chunks) => {
                if let Some(basis_before) = basis_before {
                    let used = chunks.iter().map(|c| c.id).collect();
                    if let Some(signed) = gc::restate(vault, basis_before, &used)? {
                        out.statements.push(signed.record);
                    }
                }
                out.snapshots.push((record, chunks));
            }
            // A recovered node knows the snapshot but holds none of its chunks yet.
            Err(e) => debug!(
                "snapshot {} is not published from here: {}",
                id.short(),
                crate::units::chain(&e)
            ),
        }
    }
    Ok(out)
}

/// Every chunk a snapshot references, its manifest's included, as the engine knows
/// chunks.
pub fn snapshot_chunks(
    vault: &Vault,
    snapshot: &SnapshotRecord,
) -> Result<Vec<ChunkRef>, PublishError> {
    let site = vault.dir.site_id();
    let mut ids: Vec<ChunkId> = Vec::new();
    let mut reader = vault.store.reader();
    let mut opener = cairn_protocol::seal::Opener::new();
    let mut walk = cairn_protocol::manifest::ManifestWalk::new(snapshot.manifest_root());
    let mut load = |id: &ChunkId| {
        ids.push(*id);
        vault.load_chunk(&mut reader, &mut opener, id)
    };
    let mut data = Vec::new();
    while let Some((_, extent)) = walk
        .next(&mut load)
        .map_err(|source| PublishError::Manifest {
            snapshot: snapshot.id.short(),
            source,
        })?
    {
        if let cairn_protocol::Extent::Data { id, .. } = extent {
            data.push(id);
        }
    }
    ids.extend(data);
    ids.sort();
    ids.dedup();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let location = vault
            .store
            .index()
            .chunk(&id)?
            .ok_or_else(|| PublishError::ChunkMissing(hex8(&id.0)))?;
        out.push(ChunkRef {
            owner: site,
            id,
            size_bytes: u64::from(location.len_bytes) + storage::BLOB_EXTRA_BYTES,
        });
    }
    Ok(out)
}
