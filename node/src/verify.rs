//! Verify: reads and opens every chunk that the chosen snapshots need, on every core, and
//! names each damaged image and byte offset. A chunk shared by many snapshots is read once.
//! A chunk this node does not hold because placement puts it on another node of the site
//! is counted as held elsewhere, not as damage. `verify_held` checks the chunks held for
//! partner sites against their owners' signatures (this node cannot open them).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::manifest::ManifestError;
use cairn_protocol::placement::{self, Candidate};
use cairn_protocol::record::{NodeCert, RecordKind};
use cairn_protocol::seal::Opener;
use cairn_protocol::{ChunkId, Extent, SnapshotRecord};
use crossbeam_channel::bounded;
use serde::Serialize;

use crate::records;
use crate::store::{StoreError, KEY_HELD_CHUNK};
use crate::units;
use crate::vault::{ChunkError, Vault};

const VERIFY_QUEUE_MAX: usize = 256;

/// One damaged stretch of one snapshot.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Damage {
    pub image: String,
    pub snapshot: String,
    pub offset: u64,
    pub len_bytes: u64,
    /// The damaged chunk; None when a manifest node is unreadable and everything from
    /// `offset` to the end of the image is unknown.
    pub chunk: Option<String>,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub n_snapshots: usize,
    /// Chunks read and opened here (good or damaged).
    pub n_chunks_checked: usize,
    pub bytes_checked: u64,
    /// Chunks not on this node because placement puts them on another node of this site:
    /// not checked here, and not damage.
    pub n_chunks_held_elsewhere: usize,
    pub bytes_held_elsewhere: u64,
    /// Snapshots whose manifest (or part of it) is on another node of this site: what it
    /// lists from there on was not checked here.
    pub snapshots_held_elsewhere: Vec<String>,
    pub damage: Vec<Damage>,
    pub seconds: f64,
}

/// What one chunk turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Good,
    HeldElsewhere,
    Damaged(String),
}

/// Which node of this site placement names for a chunk of the site's, from the site's
/// node certificates as the engine weighs them: a chunk placed on another node is held
/// there. Dead nodes are not known here; a chunk placed on one is still called held
/// elsewhere, as the site meant it to be.
pub struct SitePlacement {
    here: NodeId,
    nodes: Vec<Candidate<NodeId>>,
}

impl SitePlacement {
    pub fn of(vault: &Vault) -> SitePlacement {
        let (site, here) = (vault.dir.site_id(), vault.dir.node_id());
        let certs = records::all(vault.store.index()).unwrap_or_default();
        let mut nodes: Vec<Candidate<NodeId>> = certs
            .iter()
            .filter(|r| r.kind == RecordKind::NodeCert && r.author == site)
            .filter_map(|r| NodeCert::decode(&r.body).ok())
            .filter(|c| c.site == site)
            .map(|c| Candidate {
                id: c.node,
                key: c.node.0,
                weight: cairn_protocol::engine::capacity_weight(c.capacity_bytes),
            })
            .collect();
        if !nodes.iter().any(|c| c.id == here) {
            nodes.push(Candidate {
                id: here,
                key: here.0,
                weight: cairn_protocol::engine::capacity_weight(0),
            });
        }
        SitePlacement { here, nodes }
    }

    pub fn placed_elsewhere(&self, id: &ChunkId) -> bool {
        placement::best(id, &self.nodes).is_some_and(|node| node != self.here)
    }
}

fn is_missing(error: &ChunkError) -> bool {
    matches!(error, ChunkError::Store(StoreError::MissingChunk { .. }))
}

pub fn verify(
    vault: &Vault,
    records: &[SnapshotRecord],
    n_workers: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> VerifyReport {
    let started = Instant::now();
    let site = SitePlacement::of(vault);
    let mut snapshots_held_elsewhere = Vec::new();
    // chunk id -> what it is, with its plaintext length. Filled by the workers.
    let checked: Mutex<HashMap<ChunkId, (Outcome, u32)>> = Mutex::new(HashMap::new());
    let bytes_checked = Mutex::new(0u64);
    let mut damage = Vec::new();
    let (tx, rx) = bounded::<(ChunkId, u32)>(VERIFY_QUEUE_MAX);
    std::thread::scope(|scope| {
        for _ in 0..n_workers.max(1) {
            let (rx, checked, bytes_checked, site) = (rx.clone(), &checked, &bytes_checked, &site);
            scope.spawn(move || {
                let mut reader = vault.store.reader();
                let mut opener = Opener::new();
                for (id, len_bytes) in rx {
                    let outcome = match vault.load_chunk(&mut reader, &mut opener, &id) {
                        Ok(plain) if plain.len() == len_bytes as usize => Outcome::Good,
                        Ok(plain) => Outcome::Damaged(format!(
                            "opens to {} bytes, manifest says {len_bytes}",
                            plain.len()
                        )),
                        Err(e) if is_missing(&e) && site.placed_elsewhere(&id) => {
                            Outcome::HeldElsewhere
                        }
                        Err(e) => Outcome::Damaged(units::chain(&e)),
                    };
                    let total = {
                        let mut bytes_checked = bytes_checked.lock().expect("not poisoned");
                        *bytes_checked += u64::from(len_bytes);
                        *bytes_checked
                    };
                    progress(total);
                    checked
                        .lock()
                        .expect("not poisoned")
                        .insert(id, (outcome, len_bytes));
                }
            });
        }
        drop(rx);
        let mut queued: HashSet<ChunkId> = HashSet::new();
        for record in records {
            let walked = vault.walk_manifest(record, |_, extent| match extent {
                Extent::Data { id, len_bytes } if queued.insert(id) => {
                    tx.send((id, len_bytes)).is_ok()
                }
                _ => true,
            });
            if let Err((offset, e)) = walked {
                if let ManifestError::Load { id, source } = &e {
                    if is_missing(source) && site.placed_elsewhere(id) {
                        snapshots_held_elsewhere.push(format!(
                            "{}@{}",
                            record.image,
                            record.id.short()
                        ));
                        continue;
                    }
                }
                damage.push(Damage {
                    image: record.image.to_string(),
                    snapshot: record.id.short(),
                    offset,
                    len_bytes: record.size_bytes.saturating_sub(offset),
                    chunk: None,
                    why: format!(
                        "manifest unreadable, the rest of the image cannot be checked: {}",
                        units::chain(&e)
                    ),
                });
            }
        }
        drop(tx);
    });
    let checked = checked.into_inner().expect("not poisoned");
    if checked
        .values()
        .any(|(o, _)| matches!(o, Outcome::Damaged(_)))
    {
        // Second pass, only when something is damaged: name every place that uses it.
        for record in records {
            let _ = vault.walk_manifest(record, |offset, extent| {
                if let Extent::Data { id, len_bytes } = extent {
                    if let Some((Outcome::Damaged(why), _)) = checked.get(&id) {
                        damage.push(Damage {
                            image: record.image.to_string(),
                            snapshot: record.id.short(),
                            offset,
                            len_bytes: u64::from(len_bytes),
                            chunk: Some(id.to_string()),
                            why: why.clone(),
                        });
                    }
                }
                true
            });
        }
    }
    damage
        .sort_by(|a, b| (&a.image, &a.snapshot, a.offset).cmp(&(&b.image, &b.snapshot, b.offset)));
    let elsewhere = checked
        .values()
        .filter(|(o, _)| *o == Outcome::HeldElsewhere);
    let n_chunks_held_elsewhere = elsewhere.clone().count();
    let bytes_held_elsewhere: u64 = elsewhere.map(|(_, len)| u64::from(*len)).sum();
    VerifyReport {
        n_snapshots: records.len(),
        n_chunks_checked: checked.len() - n_chunks_held_elsewhere,
        bytes_checked: bytes_checked
            .into_inner()
            .expect("not poisoned")
            .saturating_sub(bytes_held_elsewhere),
        n_chunks_held_elsewhere,
        bytes_held_elsewhere,
        snapshots_held_elsewhere,
        damage,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// The chunks this node holds for partner sites, checked against their owners'
/// signatures: this node has no key to open them, but a blob whose signature holds is the
/// owner's sealed chunk, bit for bit.
#[derive(Debug, Default, Serialize)]
pub struct HeldReport {
    pub n_chunks_checked: usize,
    pub bytes_checked: u64,
    /// Noted as held here but gone from the store (a lost pack): the mesh fetches them
    /// again from their other holders. Not damage.
    pub n_chunks_lost_here: usize,
    pub damage: Vec<HeldDamage>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HeldDamage {
    pub owner: String,
    pub chunk: String,
    pub why: String,
}

pub fn verify_held(vault: &Vault, progress: &(dyn Fn(u64) + Sync)) -> HeldReport {
    let mut report = HeldReport::default();
    let own = vault.dir.site_id();
    let marks = vault
        .store
        .index()
        .catalog_scan(KEY_HELD_CHUNK)
        .unwrap_or_default();
    let mut reader = vault.store.reader();
    for (key, value) in marks {
        let (Ok(id), Ok(owner)) = (
            <[u8; 32]>::try_from(&key[KEY_HELD_CHUNK.len()..]),
            <[u8; 32]>::try_from(&value[..]),
        ) else {
            continue;
        };
        let (id, owner) = (ChunkId(id), SiteId(owner));
        if owner == own {
            continue; // an older build's mark, migrated when the node starts
        }
        let why = match reader.read(&id) {
            Err(StoreError::MissingChunk { .. }) => {
                report.n_chunks_lost_here += 1;
                continue;
            }
            Err(e) => units::chain(&e),
            Ok(blob) => {
                report.n_chunks_checked += 1;
                report.bytes_checked += blob.len() as u64;
                progress(report.bytes_checked);
                if cairn_protocol::blob::verify_blob(&owner, &id, &blob).is_some() {
                    continue;
                }
                "its bytes do not carry its owner's signature: altered or damaged".into()
            }
        };
        report.damage.push(HeldDamage {
            owner: owner.to_string(),
            chunk: id.to_string(),
            why,
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IndexBatch;
    use ed25519_dalek::SigningKey;

    /// Stores `blob` as a chunk held for `owner`, as the mesh's storage thread does.
    fn hold(vault: &Vault, id: &ChunkId, owner: &SiteId, blob: &[u8]) {
        let mut writer = vault.store.writer();
        writer.append(id, blob).expect("append");
        writer.commit().expect("commit");
        crate::mesh::storage::tests::mark_owner(vault, id, owner);
    }

    #[test]
    fn chunks_held_for_partners_are_checked_against_their_owners_signatures() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let vault = Vault::init(&tmp.path().join("data"), "Partner").expect("init");
        let partner_key = SigningKey::from_bytes(&[5; 32]);
        let partner = SiteId(partner_key.verifying_key().to_bytes());
        let (good, bad, lost) = (ChunkId([1; 32]), ChunkId([2; 32]), ChunkId([3; 32]));
        let good_blob = cairn_protocol::blob::sign_blob(&partner_key, &good, &[7; 1000]);
        hold(&vault, &good, &partner, &good_blob);
        let mut bad_blob = cairn_protocol::blob::sign_blob(&partner_key, &bad, &[8; 500]);
        bad_blob[10] ^= 1;
        hold(&vault, &bad, &partner, &bad_blob);
        // A mark whose chunk a lost pack took: the mesh's to fetch again, not damage.
        vault
            .store
            .index()
            .commit(IndexBatch {
                catalog: vec![([KEY_HELD_CHUNK, &lost.0].concat(), partner.0.to_vec())],
                ..IndexBatch::default()
            })
            .expect("mark");

        let report = verify_held(&vault, &|_| {});
        assert_eq!(report.n_chunks_checked, 2);
        assert_eq!(
            report.bytes_checked,
            (good_blob.len() + bad_blob.len()) as u64
        );
        assert_eq!(report.n_chunks_lost_here, 1);
        assert_eq!(
            report.damage,
            vec![HeldDamage {
                owner: partner.to_string(),
                chunk: bad.to_string(),
                why: "its bytes do not carry its owner's signature: altered or damaged".into(),
            }]
        );
    }
}
