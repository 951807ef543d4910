//! Fills a `NodeStatus` from the mesh loop's picture and the vault: what each image's
//! chunks are, where the mesh knows them to be, and how fast they are getting to R.
//!
//! A snapshot made on another node of the site is followed by that node; this one shows
//! what that node signed when the snapshot reached R (a `SnapshotCopies` record, gossiped
//! only inside the site) for as long as it cannot tell more itself. Partners are named
//! as the site's grants name them, so every node of the site names them alike.
//!
//! The rate is measured here, from the bytes this node sent to peers between two looks
//! (`RATE_WINDOW_MS` apart at most); the node's loop looks periodically, so the first
//! `cairn status` after a start already has a figure once the loop ran a while.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use cairn_protocol::engine::PeerState;
use cairn_protocol::identity::SiteId;
use cairn_protocol::manifest::ManifestWalk;
use cairn_protocol::record::{
    Record, RecordKind, SiteCopyCount, SnapshotCopies, SNAPSHOT_COPIES_SITES_MAX,
};
use cairn_protocol::seal::Opener;
use cairn_protocol::{ChunkId, Extent, SnapshotRecord};

use super::{ImageStatus, NodeStatus, PartnerHeld, PeerStatus, SiteCopies, SnapshotSummary};
use crate::mesh::MeshStatus;
use crate::records;
use crate::store::StoreError;
use crate::units::now_unix_ms;
use crate::vault::{Vault, VaultError};

/// How far back the replication rate looks.
pub const RATE_WINDOW_MS: u64 = 60_000;
/// Samples kept for the rate; older ones past the window are dropped first.
const RATE_SAMPLES_MAX: usize = 64;

/// (time, bytes this node had sent to peers in all): one process runs one node.
static SENT_SAMPLES: Mutex<VecDeque<(u64, u64)>> = Mutex::new(VecDeque::new());

/// Notes how many bytes this node has sent to peers so far, and returns the rate over
/// the window, when two samples at least a second apart exist.
pub fn sample_sent(now_ms: u64, sent_bytes: u64) -> Option<u64> {
    let mut samples = SENT_SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    rate_from(&mut samples, now_ms, sent_bytes)
}

fn rate_from(samples: &mut VecDeque<(u64, u64)>, now_ms: u64, sent_bytes: u64) -> Option<u64> {
    // A restarted counter (fewer bytes than before) starts the window afresh.
    if samples
        .back()
        .is_some_and(|&(t, b)| b > sent_bytes || t > now_ms)
    {
        samples.clear();
    }
    samples.push_back((now_ms, sent_bytes));
    while samples.len() > RATE_SAMPLES_MAX
        || samples
            .front()
            .is_some_and(|&(t, _)| now_ms - t > RATE_WINDOW_MS && samples.len() > 2)
    {
        samples.pop_front();
    }
    let &(t0, b0) = samples.front()?;
    let elapsed_ms = now_ms - t0;
    (elapsed_ms >= 1_000).then(|| (sent_bytes - b0) * 1000 / elapsed_ms)
}

/// A snapshot's chunks as far as this node can list them: its manifest nodes, then its
/// data chunks, each with its sealed size (from the index, or the plaintext length when
/// the chunk is not here). `false` when part of the manifest is not on this node.
fn known_chunks(vault: &Vault, snapshot: &SnapshotRecord) -> (Vec<(ChunkId, u64)>, bool) {
    let mut reader = vault.store.reader();
    let mut opener = Opener::new();
    let mut manifest_ids = Vec::new();
    let mut data: Vec<(ChunkId, u64)> = Vec::new();
    let mut walk = ManifestWalk::new(snapshot.manifest_root());
    let mut load = |id: &ChunkId| {
        manifest_ids.push(*id);
        vault.load_chunk(&mut reader, &mut opener, id)
    };
    let complete = loop {
        match walk.next(&mut load) {
            Ok(Some((_, Extent::Data { id, len_bytes }))) => data.push((id, u64::from(len_bytes))),
            Ok(Some(_)) => {}
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    let mut out: BTreeMap<ChunkId, u64> = BTreeMap::new();
    let manifest = manifest_ids.into_iter().map(|id| (id, 0));
    for (id, plain_len) in manifest.chain(data) {
        let sealed = vault
            .store
            .index()
            .chunk(&id)
            .ok()
            .flatten()
            .map(|l| u64::from(l.len_bytes) + crate::mesh::storage::BLOB_EXTRA_BYTES);
        out.insert(id, sealed.unwrap_or(plain_len));
    }
    (out.into_iter().collect(), complete)
}

/// Why replication below R is not moving, when this node can tell.
fn waiting_for(m: &MeshStatus, r: usize, name_of: &dyn Fn(&SiteId) -> String) -> Option<String> {
    if m.storers.len() < r {
        return Some(format!(
            "only {} of the {r} sites needed store for this site: add a partner or lower R",
            m.storers.len()
        ));
    }
    let node_site = m.storers.first().copied();
    let unreachable: Vec<String> = m
        .storers
        .iter()
        .filter(|site| Some(**site) != node_site)
        .filter(|site| {
            !m.peers
                .iter()
                .any(|p| p.site == **site && p.state == PeerState::Live && p.connected)
        })
        .map(name_of)
        .collect();
    (!unreachable.is_empty()).then(|| format!("waiting for {}", unreachable.join(", ")))
}

/// One image's row: its latest snapshot's chunks and where the mesh knows them to be.
fn image_status(
    vault: &Vault,
    m: &MeshStatus,
    snapshot: &SnapshotRecord,
    name_of: &dyn Fn(&SiteId) -> String,
) -> ImageStatus {
    let r = m.replication_factor;
    let (chunks, complete) = known_chunks(vault, snapshot);
    let mut image = ImageStatus {
        image: snapshot.image.clone(),
        latest_snapshot: Some(SnapshotSummary {
            id: snapshot.id,
            time_unix_ms: snapshot.time_unix_ms,
            size_bytes: snapshot.size_bytes,
        }),
        replication_target: r as u32,
        chunks: 0,
        chunks_at_target: 0,
        under_replicated_bytes: 0,
        copies: Vec::new(),
        chunk_list_complete: complete,
        chunks_checking: 0,
        copy_bytes_target: 0,
        copy_bytes_done: 0,
        rate_bytes_per_sec: None,
        eta_ms: None,
        waiting_for: None,
        copies_acknowledged_unix_ms: None,
        below_target_since_unix_ms: None,
    };
    let mut per_site: BTreeMap<SiteId, (u64, u64)> = BTreeMap::new();
    for (id, size_bytes) in &chunks {
        image.chunks += 1;
        image.copy_bytes_target += size_bytes * r as u64;
        let Some(sites) = m.copies.get(id) else {
            image.chunks_checking += 1;
            image.under_replicated_bytes += size_bytes;
            continue;
        };
        image.copy_bytes_done += size_bytes * sites.len().min(r) as u64;
        if sites.len() >= r {
            image.chunks_at_target += 1;
        } else {
            image.under_replicated_bytes += size_bytes;
        }
        for site in sites {
            let e = per_site.entry(*site).or_default();
            e.0 += 1;
            e.1 += size_bytes;
        }
    }
    image.copies = per_site
        .into_iter()
        .map(|(site, (chunks, bytes))| SiteCopies {
            site_id: site,
            site_name: name_of(&site),
            chunks,
            bytes,
        })
        .collect();
    image
}

/// Signs and stores where a snapshot's chunks are as it reaches R: for each chunk its
/// sealed size and the sites holding it. The caller hands the record to the engine.
pub fn copies_record(
    vault: &Vault,
    snapshot_key: [u8; 32],
    replication_target: u32,
    chunks: &[(u64, Vec<SiteId>)],
    now_unix_ms: u64,
) -> Result<Record, StoreError> {
    let mut per_site: BTreeMap<SiteId, (u64, u64)> = BTreeMap::new();
    for (size_bytes, sites) in chunks {
        for site in sites {
            let entry = per_site.entry(*site).or_default();
            entry.0 += 1;
            entry.1 += size_bytes;
        }
    }
    let body = SnapshotCopies {
        acknowledged_unix_ms: now_unix_ms,
        replication_target,
        chunks: chunks.len() as u64,
        sites: per_site
            .into_iter()
            .take(SNAPSHOT_COPIES_SITES_MAX)
            .map(|(site, (chunks, bytes))| SiteCopyCount {
                site,
                chunks,
                bytes,
            })
            .collect(),
    };
    // Stored by the engine's `SaveRecord`, on the storage thread: the mesh's loop
    // never waits for the disk.
    records::sign_next(
        vault,
        RecordKind::SnapshotCopies,
        snapshot_key,
        body.encode(),
    )
}

/// An image whose copies this node cannot tell (made on the site's other node) from
/// what that node signed when it reached R, if it did.
fn from_copies_record(
    vault: &Vault,
    image: &mut ImageStatus,
    snapshot: &SnapshotRecord,
    name_of: &dyn Fn(&SiteId) -> String,
) {
    let key = records::snapshot_key(&snapshot.id);
    let own = vault.dir.site_id();
    let Ok(Some(record)) =
        records::get(vault.store.index(), &own, RecordKind::SnapshotCopies, &key)
    else {
        return;
    };
    let Ok(copies) = SnapshotCopies::decode(&record.body) else {
        return;
    };
    let r = u64::from(copies.replication_target);
    let bytes_at = |site: &SiteCopyCount| site.bytes;
    // Each chunk's bytes once: the most any site holds of them (the owner's site holds
    // them all).
    let bytes = copies.sites.iter().map(bytes_at).max().unwrap_or(0);
    image.replication_target = copies.replication_target;
    image.chunks = copies.chunks;
    image.chunks_at_target = copies.chunks;
    image.chunks_checking = 0;
    image.under_replicated_bytes = 0;
    image.copy_bytes_target = bytes * r;
    image.copy_bytes_done = bytes * r;
    image.copies = copies
        .sites
        .iter()
        .map(|site| SiteCopies {
            site_id: site.site,
            site_name: name_of(&site.site),
            chunks: site.chunks,
            bytes: site.bytes,
        })
        .collect();
    image.copies_acknowledged_unix_ms = Some(copies.acknowledged_unix_ms);
}

/// Per image, when this process first saw it below R (an acknowledged snapshot that
/// lost copies): the least state `status --check` needs, kept in memory, so after a
/// start the hour counts from the first look.
static BELOW_TARGET_SEEN: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Since when the image's latest snapshot is below R: its own time while it never was
/// at R (`acked/`), else since this process first saw it fall below.
fn below_target_since(
    vault: &Vault,
    image: &ImageStatus,
    snapshot: &SnapshotRecord,
    now: u64,
) -> Option<u64> {
    let mut seen = BELOW_TARGET_SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let name = image.image.as_str();
    // Chunks not known yet ("checking") are not known to be below.
    let known_below = image.chunks_at_target + image.chunks_checking < image.chunks;
    let below = image.chunks_at_target < image.chunks;
    if !below {
        seen.remove(name);
        return None;
    }
    let key = records::snapshot_key(&snapshot.id);
    let acked = vault
        .store
        .index()
        .catalog_get(&[crate::forget::KEY_ACKED, &key].concat())
        .ok()
        .flatten()
        .is_some();
    if !acked {
        return Some(snapshot.time_unix_ms);
    }
    if !known_below {
        return None;
    }
    Some(*seen.entry(name.to_owned()).or_insert(now))
}

/// Per image, the time of its newest snapshot confirmed at R sites. A site without
/// partners has no R to reach: every snapshot counts, as `cairn forget` counts them.
pub fn newest_at_r(vault: &Vault) -> Result<BTreeMap<String, u64>, VaultError> {
    let mesh = crate::forget::has_partners(vault)?;
    let index = vault.store.index();
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    for snapshot in vault.snapshots()? {
        let key = records::snapshot_key(&snapshot.id);
        let at_r = !mesh
            || index
                .catalog_get(&[crate::forget::KEY_ACKED, &key].concat())?
                .is_some();
        if at_r {
            let t = newest
                .entry(snapshot.image.as_str().to_owned())
                .or_default();
            *t = (*t).max(snapshot.time_unix_ms);
        }
    }
    Ok(newest)
}

/// Each partner site this site grants storage to, last seen as the store counts it
/// (kept over restarts) or as the mesh saw one of its nodes, whichever is later.
fn partners_seen(
    vault: &Vault,
    m: &MeshStatus,
    name_of: &dyn Fn(&SiteId) -> String,
) -> Vec<super::PartnerSeen> {
    let own = vault.dir.site_id();
    let grants =
        records::scan(vault.store.index(), &own, RecordKind::TrustGrant).unwrap_or_default();
    let mut partners: BTreeMap<SiteId, Option<u64>> = BTreeMap::new();
    for record in grants {
        let Ok(grant) = cairn_protocol::record::TrustGrant::decode(&record.body) else {
            continue;
        };
        if grant.revoked || grant.grantee == own {
            continue;
        }
        let stored = vault
            .store
            .usage(&grant.grantee)
            .ok()
            .and_then(|u| u.last_seen_unix_ms);
        let live = m
            .peers
            .iter()
            .filter(|p| p.site == grant.grantee)
            .filter_map(|p| p.last_seen_unix_ms)
            .max();
        partners.insert(grant.grantee, stored.max(live));
    }
    partners
        .into_iter()
        .map(|(site, last_seen_unix_ms)| super::PartnerSeen {
            site_id: site,
            site_name: name_of(&site),
            last_seen_unix_ms,
        })
        .collect()
}

/// The node's status: the mesh loop's picture plus the vault's images.
pub fn build(vault: &Vault, m: &MeshStatus) -> Result<NodeStatus, VaultError> {
    let own = vault.dir.site_id();
    // Names this node learnt itself first, then those the site's grants carry.
    let granted = crate::trust::partner_names(vault).unwrap_or_default();
    let name_of = |site: &SiteId| {
        m.site_names
            .get(site)
            .or_else(|| granted.get(site))
            .cloned()
            .unwrap_or_else(|| format!("site {}", site.fingerprint()))
    };
    let now = now_unix_ms();
    let mut status = NodeStatus::empty(vault, now);
    status.listen_addresses = m.listen.clone();
    status.uptime_ms = m.uptime_ms;
    status.loop_busy_max_ms = m.lag.busy_max.as_millis() as u64;
    status.loop_busy_max_in = (!m.lag.busy_max_in.is_empty()).then(|| m.lag.busy_max_in.into());
    status.loop_late_max_ms = m.lag.late_max.as_millis() as u64;
    status.loop_disk_waits = m.disk_waits_on_loop;
    status.upload_limit_bytes_per_sec = m.upload_limit;
    status.download_limit_bytes_per_sec = m.download_limit;
    let mut partners: BTreeMap<SiteId, (u64, u64)> = BTreeMap::new();
    for chunk in &m.held {
        if chunk.owner == own {
            status.chunks_own += 1;
        } else {
            status.chunks_for_partners += 1;
            let e = partners.entry(chunk.owner).or_default();
            e.0 += 1;
            e.1 += chunk.size_bytes;
        }
    }
    status.held_for_partners = partners
        .into_iter()
        .map(|(site, (chunks, bytes))| PartnerHeld {
            site_id: site,
            site_name: name_of(&site),
            chunks,
            bytes,
        })
        .collect();
    let mut latest: BTreeMap<String, SnapshotRecord> = BTreeMap::new();
    for snapshot in vault.snapshots()? {
        let newer = latest
            .get(snapshot.image.as_str())
            .is_none_or(|l| l.time_unix_ms <= snapshot.time_unix_ms);
        if newer {
            latest.insert(snapshot.image.as_str().to_owned(), snapshot);
        }
    }
    let sent: u64 = m.peers.iter().map(|p| p.bytes_sent).sum();
    let rate = sample_sent(now, sent);
    let waiting = waiting_for(m, m.replication_factor, &name_of);
    for snapshot in latest.into_values() {
        let mut image = image_status(vault, m, &snapshot, &name_of);
        if image.chunks_checking > 0 || !image.chunk_list_complete {
            from_copies_record(vault, &mut image, &snapshot, &name_of);
        }
        if image.copy_bytes_done < image.copy_bytes_target {
            image.rate_bytes_per_sec = rate;
            image.eta_ms = rate.filter(|r| *r > 0).map(|r| {
                (image.copy_bytes_target - image.copy_bytes_done).saturating_mul(1000) / r
            });
            if image.chunks_checking == 0 && rate.is_none_or(|r| r == 0) {
                image.waiting_for = waiting.clone();
            }
        }
        image.below_target_since_unix_ms = below_target_since(vault, &image, &snapshot, now);
        status.images.push(image);
    }
    status.partners = partners_seen(vault, m, &name_of);
    status.fetch_rates = m
        .throughput
        .iter()
        .filter_map(|(site, figures)| {
            Some(super::FetchRate {
                site_id: *site,
                site_name: name_of(site),
                bytes: figures.bytes(),
                busy_ms: figures.busy_ms(),
                samples: figures.samples.len() as u32,
                bytes_per_sec: figures.bytes_per_sec()?,
                last_unix_ms: figures.last_unix_ms()?,
            })
        })
        .collect();
    status.peers = m
        .peers
        .iter()
        .map(|p| PeerStatus {
            node_id: p.node,
            site_id: p.site,
            site_name: name_of(&p.site),
            state: match p.state {
                PeerState::Live => super::PeerState::Live,
                PeerState::Suspected => super::PeerState::Suspect,
                PeerState::Dead => super::PeerState::Dead,
            },
            last_seen_unix_ms: p.last_seen_unix_ms,
            rtt_us: p.rtt.map(|d| d.as_micros() as u64),
            sent_bytes: p.bytes_sent,
            received_bytes: p.bytes_received,
        })
        .collect();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_made_on_the_sites_other_node_shows_the_copies_it_signed_at_r() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::init(&tmp.path().join("d"), "Jones").unwrap();
        let own = vault.dir.site_id();
        let partner = SiteId([7; 32]);
        let snapshot = SnapshotRecord {
            id: cairn_protocol::SnapshotId([5; 16]),
            time_unix_ms: 1_000,
            size_bytes: 8 << 20,
            root: ChunkId([1; 32]),
            image: cairn_protocol::ImageName::new("fs").unwrap(),
        };
        let name_of = |site: &SiteId| format!("{site:?}");
        let checking = |vault: &Vault| {
            let mut image = image_status(vault, &MeshStatus::default(), &snapshot, &name_of);
            from_copies_record(vault, &mut image, &snapshot, &name_of);
            image
        };
        // Before: nothing of the snapshot is here and nothing says where it is.
        let image = checking(&vault);
        assert!(!image.chunk_list_complete);
        assert_eq!(image.chunks_checking, image.chunks, "only the root, unread");
        assert_eq!(
            (image.chunks_at_target, image.copies_acknowledged_unix_ms),
            (0, None)
        );
        // The other node saw its 3 chunks at R = 2: each at this site and the partner's.
        let key = records::snapshot_key(&snapshot.id);
        let chunks = [
            (100, vec![own, partner]),
            (200, vec![own, partner]),
            (50, vec![own, partner]),
        ];
        let commit = |record: Record| records::save(vault.store.index(), &record).unwrap();
        commit(copies_record(&vault, key, 2, &chunks, 9_000).unwrap());
        let image = checking(&vault);
        assert_eq!(image.chunks, 3);
        assert_eq!(image.chunks_at_target, 3);
        assert_eq!(image.chunks_checking, 0);
        assert_eq!(image.copies_acknowledged_unix_ms, Some(9_000));
        assert_eq!(image.copy_bytes_target, 700);
        assert_eq!(image.copy_bytes_done, 700);
        let copies: Vec<(SiteId, u64, u64)> = image
            .copies
            .iter()
            .map(|c| (c.site_id, c.chunks, c.bytes))
            .collect();
        let mut expected = vec![(own, 3, 350), (partner, 3, 350)];
        expected.sort();
        assert_eq!(copies, expected);
        // Signed again later (a new version), it still reads.
        commit(copies_record(&vault, key, 2, &chunks[..2], 10_000).unwrap());
        assert_eq!(checking(&vault).chunks, 2);
    }

    #[test]
    fn the_rate_is_bytes_over_the_window_and_restarts_with_the_counter() {
        let mut samples = VecDeque::new();
        assert_eq!(
            rate_from(&mut samples, 10_000, 0),
            None,
            "one sample: no rate"
        );
        assert_eq!(
            rate_from(&mut samples, 10_500, 1_000),
            None,
            "under a second"
        );
        assert_eq!(rate_from(&mut samples, 12_000, 4_000), Some(2_000));
        // Past the window the oldest samples go: the rate is that of the last minute.
        assert_eq!(rate_from(&mut samples, 80_000, 4_000), Some(0));
        assert!(samples.len() <= 3, "{samples:?}");
        assert_eq!(
            rate_from(&mut samples, 81_000, 10),
            None,
            "a restarted counter"
        );
    }
}
