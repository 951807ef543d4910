//! cairn-protocol: the formats and pure logic of cairn, with no IO, no clock and no OS
//! randomness. Everything that touches the world lives in cairn-node; the simulator in
//! cairn-sim drives this same code.
//!
//! The modules follow the data path of a backup: `chunk` cuts an image into pieces and names
//! them, `seal` compresses and encrypts each piece, `manifest` records the ordered list of
//! pieces as a tree of sealed nodes, and `snapshot` is the small record that points at a
//! manifest root. `blob` is a sealed chunk as the mesh carries it: signed by its owner
//! site, so holders without the vault key can check it.
//!
//! Identity and trust: `identity` names sites and nodes (and prints their ids so people can
//! read them aloud, via `humanid`), `record` is the signed, versioned fact the catalog will
//! carry (node certificates, trust grants), `wrap` seals a site's keys under its recovery
//! key, and `token` is the signed, expiring invite one partner sends another. `join` is the
//! token that makes a new machine a node of its site, with the site's keys sealed to it.
//!
//! The mesh: `catalog` merges signed records as a CRDT and reads trust from them,
//! `placement` picks the sites and nodes for each chunk by weighted rendezvous hashing,
//! and `engine` is the sans-IO state machine that gossips, detects failures, replicates,
//! repairs and trims; `rng` is the seeded generator it and the simulator draw from, and
//! `memo` what it remembers having verified. `retention` decides which snapshots a keep
//! policy keeps (restic's `forget` rules), and `gc` holds the formats and pure steps of
//! garbage collection: batches of dead chunk ids and the statement that names them.
//! `nbd` is the Network Block Device protocol a snapshot is exported with, so a VM boots
//! from it.

pub mod admission;
pub mod blob;
pub mod catalog;
pub mod chunk;
pub mod codec;
pub mod dialer;
pub mod engine;
pub mod gc;
pub mod humanid;
pub mod identity;
pub mod ids;
pub mod join;
pub mod keys;
pub mod manifest;
pub mod memo;
pub mod nbd;
pub mod placement;
pub mod record;
pub mod retention;
pub mod rng;
pub mod seal;
pub mod snapshot;
pub mod token;
pub mod wrap;

pub use chunk::{ChunkerParams, CHUNKER_DEFAULT};
pub use ids::{ChunkId, SnapshotId};
pub use keys::VaultKey;
pub use manifest::Extent;
pub use snapshot::{ImageName, SnapshotRecord};
