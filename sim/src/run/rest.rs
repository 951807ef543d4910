//! The liveness phase and the checks at rest. After the heal the mesh has `settle_hours`
//! to converge: every pair of live nodes holds the same records of the authors both trust
//! and both may see (`Catalog::may_see_record`), every node holds the newest version of
//! every such record, and every chunk of every
//! snapshot has good copies at R distinct sites. It is checked hourly (to report how long
//! it took) and at the end (invariants 2 and 4). A chunk may stay below R only for a named
//! excuse: it was lost beyond the fault budget, or fewer than R of the sites that may hold
//! its owner's chunks are still standing.

use std::collections::{BTreeMap, BTreeSet};

use cairn_protocol::catalog::Catalog;
use cairn_protocol::identity::SiteId;
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{Record, TrustView};

use super::Run;
use crate::world::HOUR_US;

/// True when `site` may hold `record` at rest: its own site's, or one its author lets
/// `site` see (`Catalog::may_see_record`), judged on the true catalog.
fn visible(truth: &Catalog, record: &Record, site: SiteId) -> bool {
    record.author == site || truth.may_see_record(record, site)
}

/// What the mesh looks like now, against what it should be at rest.
#[derive(Default)]
pub(super) struct RestState {
    /// (node pair, author) catalogs that differ.
    diverged: u64,
    /// (node, record) where the node lacks the newest version of a trusted site's record.
    behind_truth: u64,
    /// Chunks with good copies at fewer sites than they should have, and one of them
    /// with its count.
    under: u64,
    under_example: Option<(ChunkId, usize)>,
    /// Chunks with more than R + slack copies that no placement exclusion explains,
    /// those that exclusions do explain, and chunks with more than R copies.
    over: u64,
    over_excluded: u64,
    above_r: u64,
    /// Copies on live disks whose bytes went bad longer than a scrub pass ago.
    bad_copies: u64,
    checked: usize,
    live: usize,
    /// (node, peer) pairs where the node excludes the peer from placement, or has it
    /// cut off.
    exclusions: u64,
    cut_offs: u64,
    excuses: BTreeMap<String, u64>,
}

impl RestState {
    fn at_rest(&self) -> bool {
        self.diverged == 0 && self.behind_truth == 0 && self.under == 0
    }
}

impl Run {
    /// Runs the liveness phase until `end_us`, noting when the mesh first converged.
    pub(super) fn liveness(&mut self, end_us: u64) {
        let started_us = self.world.now_us;
        // The last prune an hour before the end, so its statement has spread by then.
        self.gc_track.prunes_until_us = end_us.saturating_sub(HOUR_US);
        while self.world.now_us < end_us {
            let step_to = (self.world.now_us + HOUR_US).min(end_us);
            self.advance(step_to, 0);
            if self.report.converged_after_hours.is_none() && self.rest_state().at_rest() {
                self.report.converged_after_hours =
                    Some((self.world.now_us - started_us) as f64 / HOUR_US as f64);
            }
        }
    }

    pub(super) fn rest_state(&self) -> RestState {
        let world = &self.world;
        let mut state = RestState::default();
        let live: Vec<usize> = (0..world.nodes.len())
            .filter(|n| world.nodes[*n].engine.is_some())
            .collect();
        state.live = live.len();
        // How many live engines leave each node out of placement.
        let mut excluded_by: BTreeMap<usize, usize> = BTreeMap::new();
        for &node in &live {
            let engine = world.nodes[node].engine.as_ref().expect("live");
            for (peer, _, _) in engine.peers() {
                state.exclusions += u64::from(engine.is_excluded(&peer));
                state.cut_offs += u64::from(engine.is_cut_off(&peer));
                if engine.is_excluded(&peer) {
                    if let Some(&idx) = world.node_index.get(&peer) {
                        *excluded_by.entry(idx).or_insert(0) += 1;
                    }
                }
            }
        }
        for pair in live.windows(2) {
            let a = world.nodes[pair[0]].engine.as_ref().expect("live");
            let b = world.nodes[pair[1]].engine.as_ref().expect("live");
            let (site_a, site_b) = (a.site(), b.site());
            // Both must hold the same records of an author they both trust, among those
            // the author lets both sites see (by the true catalog, not either node's).
            let both_see =
                |r: &Record| visible(&world.truth, r, site_a) && visible(&world.truth, r, site_b);
            for author in a.catalog().authors() {
                if a.trust().is_trusted(&author)
                    && b.trust().is_trusted(&author)
                    && a.catalog().digest_of(author, both_see)
                        != b.catalog().digest_of(author, both_see)
                {
                    state.diverged += 1;
                }
            }
        }
        // A record whose newest version went with the only disk that held it is excused
        // only while no live node has it: once one does, gossip must spread it.
        let records_lost: BTreeSet<_> = world
            .records_lost_to_fault
            .iter()
            .filter(|(key, version)| {
                !live.iter().any(|&node| {
                    let engine = world.nodes[node].engine.as_ref().expect("live");
                    engine
                        .catalog()
                        .get(key)
                        .is_some_and(|held| held.version >= *version)
                })
            })
            .collect();
        for &node in &live {
            let engine = world.nodes[node].engine.as_ref().expect("live");
            for record in world.truth.records() {
                if !engine.trust().is_trusted(&record.author)
                    || !visible(&world.truth, record, engine.site())
                {
                    continue;
                }
                let key = cairn_protocol::catalog::RecordKey::of(record);
                if records_lost.contains(&(key, record.version)) {
                    *state
                        .excuses
                        .entry("records: lost with the only disk that held them".into())
                        .or_insert(0) += 1;
                    continue;
                }
                if engine
                    .catalog()
                    .get(&key)
                    .is_none_or(|held| held.version < record.version)
                {
                    state.behind_truth += 1;
                }
            }
        }
        let r = world.scenario.replication_factor;
        let slack = world.scenario.copies_slack;
        // Per chunk: the sites holding a good copy, the number of copies, and the
        // extra copies placement exclusions explain: an engine that leaves a holder out
        // places the chunk on the next-ranked node instead, one more copy than the
        // others' placement wants, until the exclusion ends (`AUDIT_EXCLUSION_MS`).
        let mut holders: BTreeMap<ChunkId, (BTreeSet<usize>, usize, usize)> = BTreeMap::new();
        let scrubbed_before_us = world
            .now_us
            .saturating_sub(world.config.scrub_period_ms * 1000 + HOUR_US);
        for &node in &live {
            for (id, chunk) in &world.nodes[node].disk.chunks {
                let entry = holders.entry(*id).or_default();
                if chunk.good {
                    entry.0.insert(world.nodes[node].site);
                } else if world.bodies.contains_key(id) && chunk.bad_since_us < scrubbed_before_us {
                    state.bad_copies += 1;
                }
                entry.1 += 1;
                entry.2 += excluded_by.get(&node).copied().unwrap_or(0);
            }
        }
        let mut checked = BTreeSet::new();
        for image in &self.images {
            let owner = world.sites[image.site].id;
            let (want, excuse) = self.sites_wanted(owner);
            // A forgotten snapshot's chunks may go; those a kept one uses are checked
            // through it.
            for snapshot in image.snapshots.iter().filter(|s| s.forgotten_us.is_none()) {
                for chunk in &snapshot.chunks {
                    if !checked.insert(chunk.id) {
                        continue;
                    }
                    if self.lost_beyond_budget.contains(&chunk.id) {
                        *state
                            .excuses
                            .entry("lost beyond the fault budget".into())
                            .or_insert(0) += 1;
                        continue;
                    }
                    // A snapshot is acknowledged only once its chunks are at R sites;
                    // before that its chunks may sit on one disk, and a disk fault there
                    // (within the budget) takes them. Only a disk fault: a last copy an
                    // engine deleted is no excuse.
                    if !self.world.acked_chunks.contains_key(&chunk.id)
                        && !world.copies.contains_key(&chunk.id)
                        && world.last_copy_lost_to_fault.contains(&chunk.id)
                    {
                        *state
                            .excuses
                            .entry(
                                "never acknowledged, and lost with the only disks that held it"
                                    .into(),
                            )
                            .or_insert(0) += 1;
                        continue;
                    }
                    if let Some(excuse) = &excuse {
                        *state.excuses.entry(excuse.clone()).or_insert(0) += 1;
                    }
                    let (sites, copies, explained) =
                        holders.get(&chunk.id).cloned().unwrap_or_default();
                    if sites.len() < want {
                        state.under += 1;
                        state.under_example.get_or_insert((chunk.id, sites.len()));
                    }
                    if copies > r + slack + explained {
                        state.over += 1;
                    } else if copies > r + slack {
                        state.over_excluded += 1;
                    }
                    if copies > r {
                        state.above_r += 1;
                    }
                }
            }
        }
        state.checked = checked.len();
        state
    }

    /// How many sites should hold good copies of `owner`'s chunks: R, or every site that
    /// may hold them and still has a live node when fewer are standing (with that excuse).
    pub(super) fn sites_wanted(&self, owner: SiteId) -> (usize, Option<String>) {
        let world = &self.world;
        let r = world.scenario.replication_factor;
        let standing: Vec<usize> = world
            .truth
            .storers_for(owner)
            .into_iter()
            .filter_map(|(site, _)| world.site_of(&site))
            .filter(|site| !world.live_nodes_of(*site).is_empty())
            .collect();
        if standing.len() >= r {
            return (r, None);
        }
        let name = world
            .site_of(&owner)
            .map_or("?", |s| world.sites[s].name.as_str());
        (
            standing.len(),
            Some(format!(
                "only {} of the sites that may hold {name}'s chunks have a live node (R = {r})",
                standing.len()
            )),
        )
    }

    /// Invariants 2, 4 and 7 at the end of the liveness phase, and 5 at rest.
    pub(super) fn check_at_rest(&mut self) {
        let state = self.rest_state();
        if state.diverged > 0 {
            self.report.violations.push(format!(
                "invariant 2: {} (node pair, author) catalogs still differ at the end of the liveness phase",
                state.diverged
            ));
        }
        if state.behind_truth > 0 {
            self.report.violations.push(format!(
                "invariant 2: {} (node, record) pairs where a node lacks the newest version of a trusted site's record at the end of the liveness phase",
                state.behind_truth
            ));
        }
        if let Some((id, n)) = state.under_example {
            self.report.violations.push(format!(
                "invariant 2: {} chunks below R sites at the end of the liveness phase (e.g. {id:?} at {n})",
                state.under
            ));
        }
        if state.over_excluded > 0 {
            // Each engine excludes holders that failed its audits on its own judgement,
            // for `AUDIT_EXCLUSION_MS`; until that ends their placements differ, and a
            // copy one engine sees as extra another sees as a target.
            self.report.excuses.insert(
                format!(
                    "above R + {} copies, by at most one per engine excluding a holder ({} exclusions in effect)",
                    self.world.scenario.copies_slack, state.exclusions
                ),
                state.over_excluded,
            );
        }
        if state.over > 0 {
            self.report.violations.push(format!(
                "invariant 4: {} chunks with more than R + {} copies at rest",
                state.over, self.world.scenario.copies_slack
            ));
        }
        if state.bad_copies > 0 {
            self.report.violations.push(format!(
                "invariant 7: {} rotted or false copies still on live disks more than a scrub pass ({:.0} h) after they went bad",
                state.bad_copies,
                self.world.config.scrub_period_ms as f64 / 3_600_000.0
            ));
        }
        self.check_quotas_at_rest();
        self.report.notes.push(format!(
            "at rest: {} distinct chunks checked, {} with more than R copies, {} live nodes; {} placement exclusions and {} cut-offs in effect",
            state.checked, state.above_r, state.live, state.exclusions, state.cut_offs
        ));
        self.report.excuses.extend(state.excuses);
    }

    /// Invariant 5 at rest: no site holds more for a partner than it grants now, or
    /// anything for a partner either side revoked.
    fn check_quotas_at_rest(&mut self) {
        let world = &self.world;
        for ((site, owner), held) in &world.site_held {
            let site_id = world.sites[*site].id;
            if *owner == site_id || *held == 0 {
                continue;
            }
            let quota = world.truth.grant(site_id, *owner).map_or(0, |g| {
                if g.revoked {
                    0
                } else {
                    g.quota_bytes
                }
            });
            if *held > quota {
                self.report.violations.push(format!(
                    "invariant 5: site {} holds {held} bytes for a partner at rest, over its quota of {quota}",
                    world.sites[*site].name
                ));
            }
        }
        for node in 0..world.nodes.len() {
            if world.nodes[node].engine.is_none() {
                continue;
            }
            let site = world.nodes[node].site;
            let site_id = world.sites[site].id;
            for chunk in world.nodes[node].disk.chunks.values() {
                if chunk.owner == site_id {
                    continue;
                }
                let revoked =
                    |a: SiteId, b: SiteId| world.truth.grant(a, b).is_none_or(|g| g.revoked);
                if revoked(site_id, chunk.owner) || revoked(chunk.owner, site_id) {
                    self.report.violations.push(format!(
                        "invariant 5: site {} still holds chunks of a partner whose trust was revoked",
                        world.sites[site].name
                    ));
                    break;
                }
            }
        }
    }
}
