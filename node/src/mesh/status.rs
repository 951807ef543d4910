//! What `cairn status`, metrics and `trust list` are told about the mesh.

use std::collections::HashMap;

use cairn_protocol::engine::ChunkRef;
use cairn_protocol::identity::SiteId;
use cairn_protocol::ids::ChunkId;

use super::{hex8, lag, now_ms, storage, MeshStatus, Node, PeerStatus};
use crate::trust;
use tracing::warn;

impl Node {
    /// Where each chunk of this site's tracked snapshots is, as the engine knows it: the
    /// sites confirmed so far while a snapshot waits for R; once a chunk reached R, the
    /// sites that hold it now as far as this node can tell (`Engine::held_copies`: a
    /// partner that lost it is not counted), or nothing ("checking") while a target has
    /// not been heard from since a start; for a chunk this node no longer holds (its
    /// site's other node does), the placement targets it was confirmed at.
    pub(super) fn copies(&self) -> HashMap<ChunkId, Vec<SiteId>> {
        let own = self.vault.dir.site_id();
        let r = self.engine.config().replication_factor;
        let mut copies = HashMap::new();
        for (snapshot, chunks) in &self.snapshot_chunks {
            let reached = self.engine.snapshot_pending(snapshot) || self.acked.contains(snapshot);
            for id in chunks {
                let sites = match self.engine.chunk_below_r(snapshot, id) {
                    Some(sites) => sites,
                    None if !reached => vec![own],
                    None => match self.engine.held_copies(id) {
                        Some(held) if held.targets_unknown == 0 || held.sites.len() >= r => {
                            held.sites
                        }
                        Some(_) => continue,
                        None => self.engine.target_sites(&own, id),
                    },
                };
                copies.insert(*id, sites);
            }
        }
        copies
    }

    /// Signs where a snapshot made here is now that every chunk reached R (a
    /// `SnapshotCopies` record) and hands it to the engine, which gossips it to this site's
    /// other nodes only: their `cairn status` shows it for a snapshot they cannot follow.
    pub(super) fn publish_copies(&mut self, snapshot: [u8; 32], now: u64) {
        let Some(ids) = self.snapshot_chunks.get(&snapshot) else {
            return;
        };
        let own = self.vault.dir.site_id();
        let sizes: HashMap<ChunkId, u64> = self
            .engine
            .held()
            .map(|chunk| (chunk.id, chunk.size_bytes))
            .collect();
        let chunks: Vec<(u64, Vec<SiteId>)> = ids
            .iter()
            .map(|id| {
                let size = sizes.get(id).copied().unwrap_or(0);
                (size, self.engine.target_sites(&own, id))
            })
            .collect();
        let r = self.engine.config().replication_factor as u32;
        match crate::status::copies_record(&self.vault, snapshot, r, &chunks, now) {
            Ok(record) => self.local_records(vec![record]),
            Err(e) => warn!("cannot record where snapshot {} is: {e}", hex8(&snapshot)),
        }
    }

    /// Keeps `cairn trust list`'s "they hold for us" current: this site's bytes at each
    /// partner, counted over the chunks this node holds.
    pub(super) fn note_held_by(&mut self) {
        // A sample for `cairn status`'s replication rate, so it has one at its first look.
        let sent = self.links.values().map(|l| l.bytes_sent).sum();
        crate::status::sample_sent(now_ms(), sent);
        let own = self.vault.dir.site_id();
        let copies = self.copies();
        let mut by_site: HashMap<SiteId, u64> = HashMap::new();
        for chunk in self.engine.held().filter(|c| c.owner == own) {
            for site in copies.get(&chunk.id).into_iter().flatten() {
                *by_site.entry(*site).or_default() += chunk.size_bytes;
            }
        }
        let Ok(partners) = trust::partners(&self.vault) else {
            return;
        };
        let held = partners
            .iter()
            .filter_map(|partner| partner.site_id.parse::<SiteId>().ok())
            .map(|site| (site, by_site.get(&site).copied().unwrap_or(0)))
            .collect();
        self.storage.note(storage::Note::HeldBy(held));
    }

    pub(super) fn status(&self) -> MeshStatus {
        let own = self.vault.dir.site_id();
        let mut site_names = HashMap::new();
        site_names.insert(own, self.vault.dir.site_name.clone());
        if let Ok(partners) = trust::partners(&self.vault) {
            for p in partners {
                if let Ok(site) = p.site_id.parse::<SiteId>() {
                    site_names.insert(site, p.name);
                }
            }
        }
        let peers = self
            .engine
            .peers()
            .map(|(node, site, state)| {
                let link = self.peer_of_node.get(&node).and_then(|p| self.links.get(p));
                PeerStatus {
                    node,
                    site,
                    name: self
                        .node_cert(&node)
                        .map(|c| c.name)
                        .unwrap_or_else(|| crate::status::short_node_id(&node)),
                    state,
                    connected: link.is_some_and(|l| l.ready && l.connections > 0),
                    last_seen_unix_ms: link.and_then(|l| l.last_seen_unix_ms),
                    rtt: link.and_then(|l| l.rtt),
                    bytes_sent: link.map_or(0, |l| l.bytes_sent),
                    bytes_received: link.map_or(0, |l| l.bytes_received),
                }
            })
            .collect();
        let held: Vec<ChunkRef> = self.engine.held().collect();
        let copies = self.copies();
        MeshStatus {
            node: Some(self.vault.dir.node_id()),
            listen: self.listen.iter().map(|a| a.to_string()).collect(),
            peers,
            pending_snapshots: self.engine.pending_snapshots(),
            pushes_pending: self.engine.pushes_pending(),
            held,
            copies,
            site_names,
            messages_refused: self.messages_refused,
            peers_refused: self.peers_refused,
            uptime_ms: now_ms().saturating_sub(self.started_ms),
            replication_factor: self.engine.config().replication_factor,
            upload_limit: self.upload.limit().bytes_per_sec(),
            download_limit: self.download.limit().bytes_per_sec(),
            storers: self
                .engine
                .catalog()
                .storers_for(own)
                .into_iter()
                .map(|(site, _)| site)
                .collect(),
            lag: self.lag.clone(),
            disk_waits_on_loop: lag::disk_waits_on_loop(),
            throughput: self.fetch_meter.sites.clone(),
        }
    }
}
