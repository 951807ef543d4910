//! `cairn-sim bench`: the numbers the engine and the mesh are judged by.
//!
//! - engine events per second, and wall time for one simulated day of the 12-node,
//!   4-site default mesh (target: under 10 s);
//! - gossip rounds until 99% of nodes hold a new record, for 50, 200 and 1000 nodes,
//!   beside log2(N) (target: within 2 log2(N) + 5);
//! - time to get every chunk back to R sites after a site is lost, beside the bandwidth
//!   bound: the bytes that must move over the surviving offices' upload bandwidth
//!   (target: within 1.3x).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use cairn_protocol::catalog::RecordKey;
use cairn_protocol::ids::ChunkId;
use cairn_protocol::record::{Record, RecordKind};

use crate::run::Run;
use crate::scenario::{FaultKind, Scenario};
use crate::world::{hours_us, World, HOUR_US};

pub struct DayResult {
    pub wall_secs: f64,
    pub events: u64,
    pub engine_calls: u64,
    pub messages: u64,
    /// Messages lost, cut by a partition, or sent to a stopped node.
    pub dropped: u64,
    pub by_type: BTreeMap<&'static str, (u64, u64)>,
}

/// One simulated day of the default scenario's mesh, faults off.
pub fn one_day(seed: u64) -> DayResult {
    let mut scenario = Scenario::parse(crate::DEFAULT_SCENARIO).expect("built-in scenario parses");
    scenario.faults.clear();
    let started = Instant::now();
    let mut run = Run::new(scenario, seed);
    run.advance(hours_us(24.0), hours_us(24.0));
    let wall_secs = started.elapsed().as_secs_f64();
    DayResult {
        wall_secs,
        events: run.world.stats.events,
        engine_calls: run.world.stats.engine_calls,
        messages: run.world.stats.messages,
        dropped: run.world.stats.dropped,
        by_type: run.world.stats.by_type.clone(),
    }
}

pub struct SpreadResult {
    pub nodes: usize,
    pub rounds: Option<u64>,
    pub idle_bytes_per_round: f64,
}

/// Gossip spread: `n_nodes` in sites of 25 nodes, all partners; a new record at one node;
/// rounds (gossip intervals) until 99% of nodes hold it.
pub fn spread(n_nodes: usize, seed: u64) -> SpreadResult {
    let nodes_per_site = 25.min(n_nodes);
    let n_sites = n_nodes.div_ceil(nodes_per_site);
    let mut text = format!("name = \"spread-{n_nodes}\"\ndays = 1\n");
    for site in 0..n_sites {
        let nodes = nodes_per_site.min(n_nodes - site * nodes_per_site);
        text += &format!("[[sites]]\nname = \"s{site}\"\nnodes = {nodes}\nuplink_mbit = 100\n");
    }
    text += "[engine]\nsuspect_after_ms = 600000\ndead_after_ms = 1200000\n";
    let scenario = Scenario::parse(&text).expect("generated scenario parses");
    let interval_us = 2_000_000;
    let mut world = World::new(scenario, seed);
    // Let the engines settle into their rounds, then measure idle traffic.
    world.run_until(20 * interval_us, |_, _| {});
    let bytes_before = world.stats.message_bytes;
    world.run_until(30 * interval_us, |_, _| {});
    let idle_bytes_per_round =
        (world.stats.message_bytes - bytes_before) as f64 / 10.0 / n_nodes as f64;
    let mut key = [0u8; 32];
    world.rng.fill(&mut key);
    let record = Record::sign(
        &world.sites[0].key,
        RecordKind::Snapshot,
        key,
        1,
        vec![7; 64],
    );
    let record_key = RecordKey::of(&record);
    world.hand_to_site(0, record);
    let start_us = world.now_us;
    let mut rounds = None;
    for round in 1..=200u64 {
        world.run_until(start_us + round * interval_us, |_, _| {});
        let holding = world
            .nodes
            .iter()
            .filter(|n| {
                n.engine
                    .as_ref()
                    .is_some_and(|e| e.catalog().get(&record_key).is_some())
            })
            .count();
        if holding * 100 >= n_nodes * 99 {
            rounds = Some(round);
            break;
        }
    }
    SpreadResult {
        nodes: n_nodes,
        rounds,
        idle_bytes_per_round,
    }
}

pub struct RepairResult {
    pub bytes_to_move: u64,
    pub bound_secs: f64,
    pub from_loss_secs: Option<f64>,
    pub from_dead_secs: Option<f64>,
    pub dead_after_secs: f64,
}

/// Four offices replicate; one burns down; how long until every chunk is at R sites again.
pub fn repair(seed: u64) -> RepairResult {
    let mut scenario = Scenario::parse(crate::DEFAULT_SCENARIO).expect("built-in scenario parses");
    scenario.faults.clear();
    for image in &mut scenario.images {
        image.snapshot_every_hours = 1000.0;
    }
    let lost_site = scenario.site_index("west").expect("default has west");
    scenario.faults.push(crate::scenario::FaultSpec {
        at_hours: 12.0,
        kind: FaultKind::DestroySite {
            site: "west".into(),
        },
    });
    let mut run = Run::new(scenario, seed);
    let loss_us = hours_us(12.0);
    run.advance(loss_us - 1, loss_us);
    // What the lost site held and the survivors lack at R: each such chunk needs one copy.
    let holders = holders_by_site(&run.world);
    let r = run.world.scenario.replication_factor;
    let n_survivors = run.world.sites.len() - 1;
    let want = r.min(n_survivors);
    let bytes_to_move: u64 = holders
        .iter()
        .filter(|(_, sites)| {
            sites.contains(&lost_site) && sites.iter().filter(|s| **s != lost_site).count() < want
        })
        .map(|(id, sites)| {
            let missing = want - sites.iter().filter(|s| **s != lost_site).count();
            run.world.chunk_sizes[id] * missing as u64
        })
        .sum();
    let survivors_uplink: f64 = run
        .world
        .sites
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lost_site)
        .map(|(_, s)| s.uplink_bytes_per_sec)
        .sum();
    let bound_secs = bytes_to_move as f64 / survivors_uplink;
    let dead_after_secs = run.world.config.dead_after_ms as f64 / 1000.0;
    let mut from_loss_secs = None;
    let step_us = 15_000_000;
    let mut t = loss_us;
    while t < loss_us + 48 * HOUR_US {
        t += step_us;
        run.advance(t, 0);
        let holders = holders_by_site(&run.world);
        let done = run.world.chunk_sizes.keys().all(|id| {
            holders
                .get(id)
                .is_some_and(|sites| sites.iter().filter(|s| **s != lost_site).count() >= want)
        });
        if done {
            from_loss_secs = Some((t - loss_us) as f64 / 1e6);
            break;
        }
    }
    RepairResult {
        bytes_to_move,
        bound_secs,
        from_loss_secs,
        from_dead_secs: from_loss_secs.map(|s| s - dead_after_secs),
        dead_after_secs,
    }
}

fn holders_by_site(world: &World) -> BTreeMap<ChunkId, BTreeSet<usize>> {
    let mut holders: BTreeMap<ChunkId, BTreeSet<usize>> = BTreeMap::new();
    for node in &world.nodes {
        if node.engine.is_none() {
            continue;
        }
        for id in node.disk.chunks.keys() {
            holders.entry(*id).or_default().insert(node.site);
        }
    }
    holders
}
