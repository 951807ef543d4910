//! Swarm testing: every seed draws its own scenario, and every fault rate in it: message
//! loss, duplication and delay, partitions, crashes, disk faults (lost disks, rot, lost
//! writes, old disks, burnt offices), hostile nodes and the outsider. Destructive faults
//! stay inside the budget: they fall only on a set of fewer than R "doomed" sites chosen
//! first, so every acknowledged snapshot must survive. Then the liveness phase heals the
//! rest and the mesh must converge. `swarm` runs many seeds on every core and reports each
//! failure with the command that replays it, the slowest seed, and the coverage counters
//! summed over all seeds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cairn_protocol::rng::Rng;

use crate::run::{Report, Run};

mod ledger;
use crate::scenario::{
    Behaviour, EngineSpec, FaultKind, FaultSpec, HostileSpec, ImageSpec, NetworkSpec, OutsiderSpec,
    Scenario, SiteSpec,
};
pub use ledger::{read as read_ledger, Ledger, LedgerError, SeedLine, Summary};

const DAYS: f64 = 2.0;
const SETTLE_HOURS: f64 = 12.0;
/// Faults start before this hour, so the liveness phase starts by the end of the days.
const FAULTS_BEFORE_HOURS: u64 = 34;

/// The scenario of one swarm seed.
pub fn scenario_for_seed(seed: u64) -> Scenario {
    let mut rng = Rng::new(seed ^ 0x5eed_5a4d);
    let r = 3usize;
    let n_sites = rng.range(3, 5) as usize;
    let names: Vec<String> = (0..n_sites).map(|i| format!("site{i}")).collect();
    let sites: Vec<SiteSpec> = names
        .iter()
        .map(|name| SiteSpec {
            name: name.clone(),
            nodes: rng.range(1, 3) as usize,
            uplink_mbit: [10.0, 20.0, 50.0, 100.0][rng.below(4) as usize],
            node_capacity_gib: 2048.0,
        })
        .collect();
    let mut images = Vec::new();
    for (i, site) in names.iter().enumerate() {
        if rng.below(4) == 0 {
            continue;
        }
        images.push(ImageSpec {
            keep_last: None,
            forget_newest_every: None,
            backup_minutes: 0.0,
            site: site.clone(),
            name: format!("image{i}"),
            size_gib: [0.1, 0.25, 0.5][rng.below(3) as usize],
            change_per_snapshot: rng.range(1, 8) as f64 / 100.0,
            snapshot_every_hours: [6.0, 12.0, 24.0][rng.below(3) as usize],
            first_snapshot_hours: rng.range(0, 6) as f64,
        });
    }
    let network = NetworkSpec {
        latency_ms: [rng.range(1, 20), rng.range(20, 120)],
        jitter_ms: rng.range(0, 50),
        loss: rng.range(0, 5) as f64 / 100.0,
        duplicate: rng.range(0, 2) as f64 / 100.0,
    };
    let mut draw = Draw {
        rng,
        names,
        sites,
        has_image: (0..n_sites)
            .map(|i| images.iter().any(|im| im.site == format!("site{i}")))
            .collect(),
        faults: Vec::new(),
        hostile: Vec::new(),
    };
    draw.benign_faults();
    // Fewer than R sites may lose data; every destructive fault falls on one of them.
    let n_doomed = (draw.rng.range(0, r as u64 - 1) as usize).min(n_sites - 1);
    let mut doomed = Vec::new();
    while doomed.len() < n_doomed {
        let site = draw.rng.below(n_sites as u64) as usize;
        if !doomed.contains(&site) {
            doomed.push(site);
        }
    }
    for &site in &doomed {
        draw.destructive_faults(site);
    }
    if doomed.len() == 2 && draw.rng.below(4) == 0 {
        let (by, of) = (draw.names[doomed[0]].clone(), draw.names[doomed[1]].clone());
        let at_hours = draw.rng.range(4, FAULTS_BEFORE_HOURS) as f64;
        draw.faults.push(FaultSpec {
            at_hours,
            kind: FaultKind::Revoke { by, of },
        });
    }
    draw.hostile_gossipers();
    let outsider = (draw.rng.below(2) == 0).then(|| OutsiderSpec {
        from_hours: draw.rng.range(0, 12) as f64,
        until_hours: None,
        every_secs: [1.0, 5.0, 20.0][draw.rng.below(3) as usize],
        partners_partner_of: None,
    });
    let drill_every_hours = Some([3.0, 5.0, 8.0][draw.rng.below(3) as usize]);
    // The engine's scrub takes a week by default; a two-day run scrubs faster.
    let engine = EngineSpec {
        audit_interval_ms: Some([60_000, 300_000][draw.rng.below(2) as usize]),
        scrub_period_ms: Some([6, 12][draw.rng.below(2) as usize] * 3_600_000),
        ..EngineSpec::default()
    };
    Scenario {
        name: format!("swarm seed {seed}"),
        days: DAYS,
        replication_factor: r,
        sites: draw.sites,
        images,
        network,
        engine,
        faults: draw.faults,
        settle_hours: SETTLE_HOURS,
        repair_window_hours: 12.0,
        copies_slack: 1,
        partners: Vec::new(),
        quota_gib: 1024.0,
        hostile: draw.hostile,
        outsider,
        drill_every_hours,
        gc: None,
    }
}

/// The draws of one seed's faults.
struct Draw {
    rng: Rng,
    names: Vec<String>,
    sites: Vec<SiteSpec>,
    has_image: Vec<bool>,
    faults: Vec<FaultSpec>,
    hostile: Vec<HostileSpec>,
}

impl Draw {
    fn at_hours(&mut self) -> f64 {
        self.rng.range(1, FAULTS_BEFORE_HOURS) as f64
    }

    fn node_of(&mut self, site: usize) -> usize {
        self.rng.below(self.sites[site].nodes as u64) as usize
    }

    /// Faults that lose nothing, anywhere: crashes, partitions, a raised quota.
    fn benign_faults(&mut self) {
        let n_sites = self.names.len();
        for _ in 0..self.rng.range(0, 4) {
            let site = self.rng.below(n_sites as u64) as usize;
            let (at_hours, node) = (self.at_hours(), self.node_of(site));
            self.faults.push(FaultSpec {
                at_hours,
                kind: FaultKind::Crash {
                    site: self.names[site].clone(),
                    node,
                    for_hours: self.rng.range(1, 8) as f64,
                },
            });
        }
        for _ in 0..self.rng.range(0, 3) {
            let a = self.rng.below(n_sites as u64) as usize;
            let b = (a + 1 + self.rng.below(n_sites as u64 - 1) as usize) % n_sites;
            let at_hours = self.at_hours();
            self.faults.push(FaultSpec {
                at_hours,
                kind: FaultKind::Partition {
                    from: self.names[a].clone(),
                    to: self.names[b].clone(),
                    one_way: self.rng.below(2) == 0,
                    for_hours: self.rng.range(1, 8) as f64,
                },
            });
        }
        if self.rng.below(4) == 0 {
            let a = self.rng.below(n_sites as u64) as usize;
            let b = (a + 1 + self.rng.below(n_sites as u64 - 1) as usize) % n_sites;
            let at_hours = self.at_hours();
            self.faults.push(FaultSpec {
                at_hours,
                kind: FaultKind::Quota {
                    by: self.names[a].clone(),
                    of: self.names[b].clone(),
                    gib: 2048.0,
                },
            });
        }
    }

    /// One to three faults that lose data at one doomed site.
    fn destructive_faults(&mut self, site: usize) {
        let name = self.names[site].clone();
        let mut destroyed = false;
        let mut hostile = false;
        for _ in 0..self.rng.range(1, 3) {
            let (at_hours, node) = (self.at_hours(), self.node_of(site));
            let for_hours = self.rng.range(1, 6) as f64;
            let kind = match self.rng.below(7) {
                0 => FaultKind::DiskLoss {
                    site: name.clone(),
                    node,
                    for_hours,
                },
                1 => FaultKind::Corrupt {
                    site: name.clone(),
                    node,
                    count: self.rng.range(1, 20) as usize,
                },
                2 => FaultKind::LostWrites {
                    site: name.clone(),
                    node,
                    window_secs: self.rng.range(1, 10) as f64,
                    for_hours,
                },
                3 => FaultKind::OldDisk {
                    site: name.clone(),
                    node,
                    age_hours: self.rng.range(6, 24) as f64,
                    for_hours,
                },
                4 if !destroyed => {
                    destroyed = true;
                    self.faults.push(FaultSpec {
                        at_hours: at_hours + for_hours,
                        kind: FaultKind::RecoverSite { site: name.clone() },
                    });
                    FaultKind::DestroySite { site: name.clone() }
                }
                5 | 6 if !hostile => {
                    hostile = true;
                    // A one-machine office that backs up cannot send its own chunks
                    // wrong, or nothing of it would ever be acknowledged.
                    let alone = self.sites[site].nodes == 1 && self.has_image[site];
                    let behaviour = if alone || self.rng.below(2) == 0 {
                        Behaviour::FalseClaims
                    } else {
                        Behaviour::WrongBytes
                    };
                    let from_hours = self.rng.range(0, 20) as f64;
                    let until_hours =
                        (self.rng.below(2) == 0).then(|| from_hours + self.rng.range(2, 12) as f64);
                    self.hostile.push(HostileSpec {
                        site: name.clone(),
                        node,
                        behaviour,
                        from_hours,
                        until_hours,
                        flood_per_sec: 0,
                    });
                    continue;
                }
                _ => continue,
            };
            self.faults.push(FaultSpec { at_hours, kind });
        }
    }

    /// Hostile behaviours that destroy no data, on any site: forgers, replayers, floods.
    fn hostile_gossipers(&mut self) {
        let n_sites = self.names.len() as u64;
        for behaviour in [
            Behaviour::ForgeRecords,
            Behaviour::ReplayRecords,
            Behaviour::Flood,
        ] {
            if self.rng.below(3) != 0 {
                continue;
            }
            let site = self.rng.below(n_sites) as usize;
            let node = self.node_of(site);
            let name = &self.names[site];
            if self
                .hostile
                .iter()
                .any(|h| h.site == *name && h.node == node)
            {
                continue; // one behaviour per node
            }
            let from_hours = self.rng.range(0, 24) as f64;
            let (until_hours, flood_per_sec) = if behaviour == Behaviour::Flood {
                (
                    Some(from_hours + self.rng.range(1, 4) as f64 / 2.0),
                    self.rng.range(5, 30),
                )
            } else {
                (
                    (self.rng.below(2) == 0).then(|| from_hours + self.rng.range(2, 12) as f64),
                    0,
                )
            };
            self.hostile.push(HostileSpec {
                site: self.names[site].clone(),
                node,
                behaviour,
                from_hours,
                until_hours,
                flood_per_sec,
            });
        }
    }
}

pub struct SeedResult {
    pub seed: u64,
    pub report: Report,
    pub wall_secs: f64,
}

/// The scenario of one swarm seed with every image cut to at most `image_gib_max`, for
/// quick runs (the fixed seeds of `cargo test`, a first look at a failure).
pub fn scenario_for_seed_capped(seed: u64, image_gib_max: Option<f64>) -> Scenario {
    let mut scenario = scenario_for_seed(seed);
    if let Some(cap) = image_gib_max {
        for image in &mut scenario.images {
            image.size_gib = image.size_gib.min(cap);
        }
    }
    scenario
}

/// Runs seeds `first..first + count` on `jobs` threads; results in seed order.
pub fn run_seeds(
    first: u64,
    count: u64,
    jobs: usize,
    image_gib_max: Option<f64>,
    progress: bool,
) -> Vec<SeedResult> {
    let results = Mutex::new(Vec::new());
    run_each(
        first,
        count,
        jobs,
        image_gib_max,
        progress,
        |_| false,
        |result| {
            results
                .lock()
                .expect("no thread panics while holding the lock")
                .push(result);
        },
    );
    let mut results = results.into_inner().expect("threads joined");
    results.sort_by_key(|r| r.seed);
    results
}

/// Runs the seeds of `first..first + count` that `ledger` does not hold yet on `jobs`
/// threads, appending each one's line as it finishes; returns the ledger's lines for the
/// whole range, this run's and earlier ones', in seed order.
pub fn run_into(
    ledger: &mut Ledger,
    first: u64,
    count: u64,
    jobs: usize,
    image_gib_max: Option<f64>,
    progress: bool,
) -> Result<Vec<SeedLine>, LedgerError> {
    let held: std::collections::BTreeSet<u64> = ledger.lines.iter().map(|l| l.seed).collect();
    let shared = Mutex::new((&mut *ledger, None::<LedgerError>));
    run_each(
        first,
        count,
        jobs,
        image_gib_max,
        progress,
        |seed| held.contains(&seed),
        |result| {
            let mut guard = shared
                .lock()
                .expect("no thread panics while holding the lock");
            let (ledger, error) = &mut *guard;
            if error.is_none() {
                if let Err(e) = ledger.append(SeedLine::of(&result, image_gib_max)) {
                    *error = Some(e);
                }
            }
        },
    );
    let (_, error) = shared.into_inner().expect("threads joined");
    if let Some(error) = error {
        return Err(error);
    }
    let mut lines: Vec<SeedLine> = ledger
        .lines
        .iter()
        .filter(|l| (first..first + count).contains(&l.seed))
        .cloned()
        .collect();
    lines.sort_by_key(|l| l.seed);
    Ok(lines)
}

/// Runs every seed of the range that `skip` does not name, handing each result to
/// `done` as it finishes.
fn run_each(
    first: u64,
    count: u64,
    jobs: usize,
    image_gib_max: Option<f64>,
    progress: bool,
    skip: impl Fn(u64) -> bool + Sync,
    done: impl Fn(SeedResult) + Sync,
) {
    let next = AtomicU64::new(first);
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count {
                    break;
                }
                if skip(seed) {
                    continue;
                }
                let started = Instant::now();
                let scenario = scenario_for_seed_capped(seed, image_gib_max);
                let report = Run::new(scenario, seed).execute();
                let wall_secs = started.elapsed().as_secs_f64();
                if progress {
                    let verdict = if report.violations.is_empty() {
                        "ok"
                    } else {
                        "FAILED"
                    };
                    let rare: Vec<&str> = report
                        .coverage
                        .rows()
                        .into_iter()
                        .filter(|(_, n, rare)| *rare && *n > 0)
                        .map(|(name, ..)| name)
                        .collect();
                    eprintln!(
                        "seed {seed}: {verdict} ({wall_secs:.1} s) rare paths: {}",
                        rare.join(" ")
                    );
                }
                done(SeedResult {
                    seed,
                    report,
                    wall_secs,
                });
            });
        }
    });
}
