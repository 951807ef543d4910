//! Scenario files (`sim/scenarios/*.toml`): the offices, their nodes and links, the images
//! they back up and how those change, R, the faults to inject, the nodes that turn hostile
//! and the outsider. Everything random in a run (which bytes change, message loss, node
//! ids) comes from the seed, not the file.

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Simulated time before the final checks start.
    pub days: f64,
    #[serde(default = "default_r")]
    pub replication_factor: usize,
    pub sites: Vec<SiteSpec>,
    #[serde(default)]
    pub images: Vec<ImageSpec>,
    #[serde(default)]
    pub network: NetworkSpec,
    #[serde(default)]
    pub engine: EngineSpec,
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Time after the last fault within which the mesh must have converged and every
    /// chunk must be back at R sites (invariant 2).
    #[serde(default = "default_settle_hours")]
    pub settle_hours: f64,
    /// Destructive faults at R or more distinct sites within this window are beyond the
    /// fault budget: losses they cause are reported, not counted as violations.
    #[serde(default = "default_repair_window_hours")]
    pub repair_window_hours: f64,
    /// How many copies above R a chunk may have at rest (invariant 4).
    #[serde(default = "default_slack")]
    pub copies_slack: usize,
    /// Partnerships: pairs of site names that trust each other. Empty means every pair.
    #[serde(default)]
    pub partners: Vec<[String; 2]>,
    /// Quota each partner grants each other, GiB.
    #[serde(default = "default_quota_gib")]
    pub quota_gib: f64,
    /// Nodes that misbehave for a span of the run. Their engine is the real one; the
    /// simulator rewrites what it sends and what its disk answers.
    #[serde(default)]
    pub hostile: Vec<HostileSpec>,
    /// A machine that knows every node's address but belongs to no trusted site.
    #[serde(default)]
    pub outsider: Option<OutsiderSpec>,
    /// How often, while faults run, a live node of an image's site restores a sample of
    /// its newest acknowledged snapshot (a restore drill in the middle of the faults).
    #[serde(default)]
    pub drill_every_hours: Option<f64>,
    /// Garbage collection: forgotten snapshots' chunks listed by prunes and deleted at
    /// holders (docs/retention.md). Absent: nothing is pruned.
    #[serde(default)]
    pub gc: Option<GcSpec>,
}

/// How a scenario's sites prune.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcSpec {
    /// Each site prunes this often, on one live node of it (in turn).
    pub prune_every_hours: f64,
    /// The grace the owners ask holders to wait.
    #[serde(default = "default_gc_grace_hours")]
    pub grace_hours: f64,
    /// The chance that the node that commits a snapshot does not restate the statement
    /// at once (rule O3: it crashed between the commit and the restate), so holders that
    /// know the snapshot see a statement without it until the next prune (rule H2), or
    /// until the fallback re-sign.
    #[serde(default)]
    pub skip_restate_chance: f64,
    /// Whether a node of the site whose snapshot digest has differed from the
    /// statement's basis for `GC_RESTATE_AFTER_MS` re-signs it (docs/retention.md 3.3).
    /// Off only to measure what the fallback changes.
    #[serde(default = "default_true")]
    pub fallback_resign: bool,
}

fn default_true() -> bool {
    true
}

fn default_gc_grace_hours() -> f64 {
    1.0
}

fn default_r() -> usize {
    3
}
fn default_settle_hours() -> f64 {
    12.0
}
fn default_repair_window_hours() -> f64 {
    12.0
}
fn default_slack() -> usize {
    1
}
fn default_quota_gib() -> f64 {
    1024.0
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: String,
    pub nodes: usize,
    /// Upload bandwidth of the office link, Mbit/s.
    #[serde(default = "default_uplink")]
    pub uplink_mbit: f64,
    /// Capacity each node offers, GiB.
    #[serde(default = "default_capacity")]
    pub node_capacity_gib: f64,
}

fn default_uplink() -> f64 {
    20.0
}
fn default_capacity() -> f64 {
    2048.0
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub site: String,
    pub name: String,
    pub size_gib: f64,
    /// Fraction of chunks rewritten between snapshots.
    #[serde(default = "default_change")]
    pub change_per_snapshot: f64,
    #[serde(default = "default_every")]
    pub snapshot_every_hours: f64,
    #[serde(default)]
    pub first_snapshot_hours: f64,
    /// Retention: after each snapshot and each acknowledgement, the image's site forgets
    /// all but the newest `keep_last` snapshots (`cairn_protocol::retention`, which
    /// keeps snapshots not yet at R besides). Absent: nothing is forgotten.
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// Every this many acknowledged snapshots, the site forgets its newest acknowledged
    /// one by hand (`cairn forget IMAGE@SNAPSHOT`) while an older one is kept: the next
    /// backup then dedups against chunks the next prune lists as garbage.
    #[serde(default)]
    pub forget_newest_every: Option<u32>,
    /// How long a backup takes: it deduplicates against its node's disk at the start and
    /// commits (signs its record, hands its chunks to the engine) at the end.
    #[serde(default)]
    pub backup_minutes: f64,
}

fn default_change() -> f64 {
    0.02
}
fn default_every() -> f64 {
    24.0
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// One-way latency between offices, ms, drawn per link from this range.
    #[serde(default = "default_latency")]
    pub latency_ms: [u64; 2],
    /// Extra random delay per message, ms (reorders messages).
    #[serde(default)]
    pub jitter_ms: u64,
    #[serde(default)]
    pub loss: f64,
    #[serde(default)]
    pub duplicate: f64,
}

fn default_latency() -> [u64; 2] {
    [5, 40]
}

impl Default for NetworkSpec {
    fn default() -> NetworkSpec {
        NetworkSpec {
            latency_ms: default_latency(),
            jitter_ms: 0,
            loss: 0.0,
            duplicate: 0.0,
        }
    }
}

/// Engine timing; defaults are the engine's own.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSpec {
    pub gossip_interval_ms: Option<u64>,
    pub suspect_after_ms: Option<u64>,
    pub dead_after_ms: Option<u64>,
    pub sync_interval_ms: Option<u64>,
    pub push_mbit: Option<f64>,
    pub trim_grace_ms: Option<u64>,
    pub audit_interval_ms: Option<u64>,
    /// How long one scrub pass over a node's chunks takes (the engine's default is a
    /// week, longer than most runs).
    pub scrub_period_ms: Option<u64>,
    /// Garbage collection at holders: the least grace, and the deletion window.
    pub gc_grace_min_ms: Option<u64>,
    pub gc_window_ms: Option<u64>,
    pub gc_window_percent: Option<u64>,
}

/// How long a lost-writes fault waits for the node's next write before crashing it anyway.
pub const LOST_WRITES_WAIT_HOURS_MAX: f64 = 6.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Every chunk it sends (pushes, restore answers) has a byte flipped; its disk is fine.
    WrongBytes,
    /// Acknowledges partners' chunks but keeps none of them: its disk holds garbage
    /// under their ids, which it sends and audits with as if it were the chunk.
    FalseClaims,
    /// Gossips records that are forged: signed by the wrong key, altered after signing,
    /// or certifying another site's node as its own.
    ForgeRecords,
    /// Gossips superseded versions of genuine records (a grant before it was revoked, an
    /// older quota) and replays record messages it received.
    ReplayRecords,
    /// Sends its peers a stream of junk: fetches and offers of unknown chunks, unasked
    /// pushes, oversized gossip.
    Flood,
}

impl Behaviour {
    /// Behaviours that make the node's copies worthless: its site counts against the
    /// fault budget like one that lost a disk.
    pub fn destroys_data(self) -> bool {
        matches!(self, Behaviour::WrongBytes | Behaviour::FalseClaims)
    }

    pub fn name(self) -> &'static str {
        match self {
            Behaviour::WrongBytes => "wrong_bytes",
            Behaviour::FalseClaims => "false_claims",
            Behaviour::ForgeRecords => "forge_records",
            Behaviour::ReplayRecords => "replay_records",
            Behaviour::Flood => "flood",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostileSpec {
    pub site: String,
    pub node: usize,
    pub behaviour: Behaviour,
    #[serde(default)]
    pub from_hours: f64,
    /// When it stops; the start of the liveness phase if absent. A node whose behaviour
    /// destroys data is then retired (its site gets a fresh machine if it has no other);
    /// the others turn honest.
    #[serde(default)]
    pub until_hours: Option<f64>,
    /// Flood only: junk messages per second.
    #[serde(default = "default_flood_per_sec")]
    pub flood_per_sec: u64,
}

fn default_flood_per_sec() -> u64 {
    20
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutsiderSpec {
    #[serde(default)]
    pub from_hours: f64,
    #[serde(default)]
    pub until_hours: Option<f64>,
    /// Seconds between its attempts (a connection, a push, gossip, a fetch).
    #[serde(default = "default_outsider_every_secs")]
    pub every_secs: f64,
    /// A partner's partner comes with it: a site that this scenario site alone trusts.
    /// Its node says hello to every site's nodes; only that site's may admit it, and no
    /// other site's records may reach it.
    #[serde(default)]
    pub partners_partner_of: Option<String>,
}

fn default_outsider_every_secs() -> f64 {
    5.0
}

// No deny_unknown_fields here: serde cannot combine it with the flattened, tagged kind.
#[derive(Clone, Debug, Deserialize)]
pub struct FaultSpec {
    pub at_hours: f64,
    #[serde(flatten)]
    pub kind: FaultKind,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// The node stops; its disk survives; it restarts after `for_hours`.
    Crash {
        site: String,
        node: usize,
        for_hours: f64,
    },
    /// The node's disk is lost; it comes back empty after `for_hours`.
    DiskLoss {
        site: String,
        node: usize,
        for_hours: f64,
    },
    /// `count` chunks on the node's disk rot: one byte of each flips. The node is not told.
    Corrupt {
        site: String,
        node: usize,
        count: usize,
    },
    /// The node crashes during its next write (within `LOST_WRITES_WAIT_HOURS_MAX`), and
    /// the storage operations of its last `window_secs` (acknowledged writes, deletions,
    /// saved records) never reached the disk. It restarts after `for_hours`.
    LostWrites {
        site: String,
        node: usize,
        window_secs: f64,
        for_hours: f64,
    },
    /// The node crashes and comes back after `for_hours` with its disk as it was
    /// `age_hours` before the crash: old records, chunks deleted since, none written since.
    OldDisk {
        site: String,
        node: usize,
        age_hours: f64,
        for_hours: f64,
    },
    /// Every node and disk of the site is gone for good.
    DestroySite { site: String },
    /// A fresh machine resumes a destroyed site from its keys.
    RecoverSite { site: String },
    /// Messages from `from` to `to` are dropped (both ways unless `one_way`).
    Partition {
        from: String,
        to: String,
        #[serde(default)]
        one_way: bool,
        for_hours: f64,
    },
    /// `by` revokes its trust in `of`.
    Revoke { by: String, of: String },
    /// `by` sets the quota it grants `of`.
    Quota { by: String, of: String, gib: f64 },
}

impl Scenario {
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.check()?;
        Ok(scenario)
    }

    pub fn site_index(&self, name: &str) -> anyhow::Result<usize> {
        self.sites
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| anyhow::anyhow!("scenario names unknown site {name:?}"))
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.sites.is_empty(), "a scenario needs at least one site");
        anyhow::ensure!(
            self.replication_factor >= 1,
            "replication_factor must be at least 1"
        );
        anyhow::ensure!(self.days > 0.0, "days must be positive");
        for site in &self.sites {
            anyhow::ensure!(
                site.nodes >= 1,
                "site {} needs at least one node",
                site.name
            );
            anyhow::ensure!(site.uplink_mbit > 0.0, "site {} needs an uplink", site.name);
        }
        for image in &self.images {
            self.site_index(&image.site)?;
            anyhow::ensure!(image.size_gib > 0.0, "image {} needs a size", image.name);
            anyhow::ensure!(
                image.snapshot_every_hours > 0.0,
                "image {} needs a period",
                image.name
            );
        }
        for pair in &self.partners {
            self.site_index(&pair[0])?;
            self.site_index(&pair[1])?;
        }
        for fault in &self.faults {
            match &fault.kind {
                FaultKind::Crash { site, node, .. }
                | FaultKind::DiskLoss { site, node, .. }
                | FaultKind::Corrupt { site, node, .. }
                | FaultKind::LostWrites { site, node, .. }
                | FaultKind::OldDisk { site, node, .. } => {
                    let idx = self.site_index(site)?;
                    anyhow::ensure!(
                        *node < self.sites[idx].nodes,
                        "site {site} has no node {node}"
                    );
                }
                FaultKind::DestroySite { site } | FaultKind::RecoverSite { site } => {
                    self.site_index(site)?;
                }
                FaultKind::Partition { from, to, .. }
                | FaultKind::Revoke { by: from, of: to }
                | FaultKind::Quota {
                    by: from, of: to, ..
                } => {
                    self.site_index(from)?;
                    self.site_index(to)?;
                }
            }
        }
        for hostile in &self.hostile {
            let idx = self.site_index(&hostile.site)?;
            anyhow::ensure!(
                hostile.node < self.sites[idx].nodes,
                "site {} has no node {}",
                hostile.site,
                hostile.node
            );
        }
        if let Some(outsider) = &self.outsider {
            anyhow::ensure!(
                outsider.every_secs >= 0.1,
                "the outsider tries at most ten times a second"
            );
            if let Some(site) = &outsider.partners_partner_of {
                self.site_index(site)?;
            }
        }
        Ok(())
    }

    /// When faults stop: the last fault's start plus its duration, and the last explicit
    /// end of a hostile node or the outsider.
    pub fn faults_end_hours(&self) -> f64 {
        let faults = self.faults.iter().map(|f| {
            f.at_hours
                + match &f.kind {
                    FaultKind::Crash { for_hours, .. }
                    | FaultKind::DiskLoss { for_hours, .. }
                    | FaultKind::OldDisk { for_hours, .. }
                    | FaultKind::Partition { for_hours, .. } => *for_hours,
                    FaultKind::LostWrites { for_hours, .. } => {
                        LOST_WRITES_WAIT_HOURS_MAX + for_hours
                    }
                    _ => 0.0,
                }
        });
        let hostile = self.hostile.iter().filter_map(|h| h.until_hours);
        let outsider = self.outsider.iter().filter_map(|o| o.until_hours);
        faults.chain(hostile).chain(outsider).fold(0.0, f64::max)
    }

    /// When the liveness phase starts: faults are over, partitions heal, stopped nodes
    /// restart, hostile nodes stop misbehaving, and the mesh has `settle_hours` to
    /// converge and get every chunk back to R sites.
    pub fn heal_hours(&self) -> f64 {
        self.faults_end_hours()
            .max(self.days * 24.0 - self.settle_hours)
    }
}
