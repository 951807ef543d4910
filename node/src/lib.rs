//! cairn-node: everything in cairn that touches the world. Today that is the local vault
//! (data dir, keys, pack store, sled index), the ingest and restore pipelines, and the CLI;
//! the mesh daemon joins it in later issues. Formats and pure logic live in cairn-protocol.

pub mod backup;
pub mod cancel;
pub mod cli;
pub mod control;
pub mod convert;
pub mod datadir;
pub mod export;
pub mod fetch;
pub mod forget;
pub mod gc;
pub mod jobs;
pub mod join;
pub mod mesh;
pub mod prune;
pub mod records;
pub mod report;
pub mod restore;
pub mod schedule;
pub mod source;
pub mod status;
pub mod store;
pub mod throughput;
pub mod trust;
pub mod units;
pub mod vault;
pub mod verify;
pub mod vm;
pub mod web;

pub use vault::Vault;
