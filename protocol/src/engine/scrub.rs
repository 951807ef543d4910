//! Scrub: this node re-reads its own copies, one at a time, so rot is found while other
//! sites still hold good copies. The reads are spread over `scrub_period_ms` (one pass
//! over every held chunk per period), never closer than `SCRUB_READ_INTERVAL_MIN_MS`.
//! A copy that cannot be read or no longer carries its owner's signature goes the way of
//! every bad read (`Engine::read_done`): it is deleted, `Event::ChunkLost` is reported,
//! and sync brings the chunk back from another holder.

use std::ops::Bound;

use super::fetch::READS_MAX;
use super::replication::ReadPurpose;
use super::{Engine, StorageOp};

/// The shortest time between two scrub reads, however many chunks a node holds.
pub const SCRUB_READ_INTERVAL_MIN_MS: u64 = 100;
/// The longest: a node holding few chunks still checks them often.
pub const SCRUB_READ_INTERVAL_MAX_MS: u64 = 600_000;
/// How soon a node holding nothing looks again (rarely: an idle engine should not wake
/// more often than it gossips).
const SCRUB_IDLE_MS: u64 = 60_000;

impl Engine {
    pub(super) fn scrub_read_interval_ms(&self) -> u64 {
        if self.held.is_empty() {
            return SCRUB_IDLE_MS;
        }
        (self.config.scrub_period_ms / self.held.len() as u64)
            .clamp(SCRUB_READ_INTERVAL_MIN_MS, SCRUB_READ_INTERVAL_MAX_MS)
    }

    /// Reads the held chunk after the last one scrubbed (wrapping around).
    pub(super) fn scrub_next(&mut self) {
        if self.reads.len() >= READS_MAX {
            return;
        }
        let after = self
            .scrub_cursor
            .and_then(|cursor| {
                self.held
                    .range((Bound::Excluded(cursor), Bound::Unbounded))
                    .next()
            })
            .or_else(|| self.held.iter().next())
            .map(|(id, _)| *id);
        let Some(id) = after else {
            return;
        };
        self.scrub_cursor = Some(id);
        self.counters.scrub_reads += 1;
        let op = self.next_op();
        self.reads.insert(op, (ReadPurpose::Scrub, id));
        self.push_storage(StorageOp::Read { op, id });
    }
}
