//! cairn-sim: runs the real replication Engine of cairn-protocol on a simulated network of
//! offices, with virtual time and one seed for every random choice, injects faults, and
//! checks the mesh's invariants (see `run`). `world` is the network, disks and event
//! loop; `scenario` the file format; `swarm` draws whole scenarios from seeds; `bench`
//! measures the engine and the mesh.

pub mod bench;
pub mod coverage;
pub mod run;
pub mod scenario;
pub mod swarm;
pub mod world;

pub use run::{Report, Run};
pub use scenario::Scenario;

/// The scenario `cairn-sim run` uses without `--scenario`: four offices, twelve nodes,
/// three days of daily backups with crashes, a lost disk, a partition and a lost site.
pub const DEFAULT_SCENARIO: &str = include_str!("../scenarios/four-offices.toml");
