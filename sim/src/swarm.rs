//! Swarm testing: every seed draws its own scenario (sizes, link quality, and a mix of
//! faults), keeping destructive faults inside the budget: at most R - 1 distinct sites
//! lose data, so every acknowledged snapshot must survive. `swarm` runs many seeds on
//! every core and reports each failure with the command that replays it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cairn_protocol::rng::Rng;

use crate::run::{Report, Run};
use crate::scenario::{FaultKind, FaultSpec, ImageSpec, NetworkSpec, Scenario, SiteSpec};

/// The scenario of one swarm seed.
pub fn scenario_for_seed(seed: u64) -> Scenario {
    let mut rng = Rng::new(seed ^ 0x5eed_5a4d);
    let n_sites = rng.range(3, 5) as usize;
    let names: Vec<String> = (0..n_sites).map(|i| format!("site{i}")).collect();
    let sites = names
        .iter()
        .map(|name| SiteSpec {
            name: name.clone(),
            nodes: rng.range(1, 3) as usize,
            uplink_mbit: [10.0, 20.0, 50.0, 100.0][rng.below(4) as usize],
            node_capacity_gib: 2048.0,
        })
        .collect::<Vec<_>>();
    let mut images = Vec::new();
    for (i, site) in names.iter().enumerate() {
        if rng.below(4) == 0 {
            continue;
        }
        images.push(ImageSpec {
            site: site.clone(),
            name: format!("image{i}"),
            size_gib: [0.25, 0.5, 1.0][rng.below(3) as usize],
            change_per_snapshot: rng.range(1, 8) as f64 / 100.0,
            snapshot_every_hours: [6.0, 12.0, 24.0][rng.below(3) as usize],
            first_snapshot_hours: rng.range(0, 6) as f64,
        });
    }
    let days = 2.0;
    let horizon_h = days * 24.0 - 12.0;
    let mut faults = Vec::new();
    let mut destructive_sites = Vec::new();
    let r = 3usize;
    for _ in 0..rng.range(0, 8) {
        let at_hours = rng.range(1, horizon_h as u64) as f64;
        let site_idx = rng.below(n_sites as u64) as usize;
        let site = names[site_idx].clone();
        let node = rng.below(sites[site_idx].nodes as u64) as usize;
        let for_hours = rng.range(1, 8) as f64;
        let kind = match rng.below(10) {
            0..=3 => FaultKind::Crash {
                site,
                node,
                for_hours,
            },
            4..=6 => {
                let other = names
                    [(site_idx + 1 + rng.below(n_sites as u64 - 1) as usize) % n_sites]
                    .clone();
                FaultKind::Partition {
                    from: site,
                    to: other,
                    one_way: rng.below(2) == 0,
                    for_hours,
                }
            }
            7 | 8 => {
                if destructive_sites.len() + 1 >= r || destructive_sites.contains(&site_idx) {
                    continue;
                }
                destructive_sites.push(site_idx);
                FaultKind::DiskLoss {
                    site,
                    node,
                    for_hours,
                }
            }
            _ => {
                if destructive_sites.len() + 1 >= r || destructive_sites.contains(&site_idx) {
                    continue;
                }
                destructive_sites.push(site_idx);
                faults.push(FaultSpec {
                    at_hours: at_hours + for_hours,
                    kind: FaultKind::RecoverSite { site: site.clone() },
                });
                FaultKind::DestroySite { site }
            }
        };
        faults.push(FaultSpec { at_hours, kind });
    }
    Scenario {
        name: format!("swarm seed {seed}"),
        days,
        replication_factor: r,
        sites,
        images,
        network: NetworkSpec {
            latency_ms: [rng.range(1, 20), rng.range(20, 120)],
            jitter_ms: rng.range(0, 50),
            loss: rng.range(0, 5) as f64 / 100.0,
            duplicate: rng.range(0, 2) as f64 / 100.0,
        },
        engine: Default::default(),
        faults,
        settle_hours: 12.0,
        repair_window_hours: 12.0,
        copies_slack: 1,
        partners: Vec::new(),
        quota_gib: 1024.0,
    }
}

pub struct SeedResult {
    pub seed: u64,
    pub report: Report,
    pub wall_secs: f64,
}

/// Runs seeds `first..first + count` on `jobs` threads; results in seed order.
pub fn run_seeds(first: u64, count: u64, jobs: usize, progress: bool) -> Vec<SeedResult> {
    let next = AtomicU64::new(first);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count {
                    break;
                }
                let started = Instant::now();
                let report = Run::new(scenario_for_seed(seed), seed).execute();
                let wall_secs = started.elapsed().as_secs_f64();
                if progress {
                    let verdict = if report.violations.is_empty() {
                        "ok"
                    } else {
                        "FAILED"
                    };
                    eprintln!("seed {seed}: {verdict} ({wall_secs:.1} s)");
                }
                results
                    .lock()
                    .expect("no thread panics while holding the lock")
                    .push(SeedResult {
                        seed,
                        report,
                        wall_secs,
                    });
            });
        }
    });
    let mut results = results.into_inner().expect("threads joined");
    results.sort_by_key(|r| r.seed);
    results
}
