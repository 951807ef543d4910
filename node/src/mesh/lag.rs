//! How long the node's loop is kept from its events. One task owns the swarm, so while a
//! handler runs no ping is answered, no request read and no timer served: a handler that
//! waits for the disk stalls every peer at once (issue 14 saw pings take 11 s on
//! loopback). Each wake-up's handler is timed, a tick measures how late the loop gets
//! to a timer that is due, and the store reports every wait for the disk made while a
//! handler runs, so `cairn status --json` shows the worst of each since start and the
//! log names the handler.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

/// A handler that holds the loop this long is logged with its name.
pub const BUSY_WARN: Duration = Duration::from_millis(500);
/// How often the lag tick is due; how late it fires is the loop's lag.
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

thread_local! {
    /// Set while a handler of the node's loop runs on this thread.
    static ON_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// Waits for the disk made on the node's loop since the process started.
static DISK_WAITS_ON_LOOP: AtomicU64 = AtomicU64::new(0);

/// Called by the store before it waits for the disk (an index flush). Counted, and
/// logged the first time and at every power of two, when the caller is the node's loop:
/// that work belongs on the storage thread.
pub fn note_disk_wait(what: &str) {
    if !ON_LOOP.with(Cell::get) {
        return;
    }
    let n_waits = DISK_WAITS_ON_LOOP.fetch_add(1, Ordering::Relaxed) + 1;
    if n_waits.is_power_of_two() {
        warn!("the node's loop waited for the disk ({what}), {n_waits} times since start: peers wait meanwhile");
    }
}

/// How many times the node's loop waited for the disk since start.
pub fn disk_waits_on_loop() -> u64 {
    DISK_WAITS_ON_LOOP.load(Ordering::Relaxed)
}

/// A handler under way: marks the thread as the loop's until `Lag::end`.
pub struct Busy {
    started: Instant,
}

impl Busy {
    pub fn start() -> Busy {
        ON_LOOP.with(|on| on.set(true));
        Busy {
            started: Instant::now(),
        }
    }
}

/// The worst the loop did since start.
#[derive(Clone, Debug, Default)]
pub struct Lag {
    pub busy_max: Duration,
    /// The handler that took `busy_max`.
    pub busy_max_in: &'static str,
    /// How late the lag tick fired at worst.
    pub late_max: Duration,
}

impl Lag {
    /// A handler named `what` is done.
    pub fn end(&mut self, busy: Busy, what: &'static str) {
        ON_LOOP.with(|on| on.set(false));
        let took = busy.started.elapsed();
        if took > self.busy_max {
            self.busy_max = took;
            self.busy_max_in = what;
        }
        if took >= BUSY_WARN {
            warn!(
                "the node's loop was busy {} ms in {what}: no peer was answered meanwhile",
                took.as_millis()
            );
        }
    }

    /// The lag tick due at `due` fired now.
    pub fn tick(&mut self, due: tokio::time::Instant) {
        let late = tokio::time::Instant::now().saturating_duration_since(due);
        self.late_max = self.late_max.max(late);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{disk_waits_on_loop, note_disk_wait, Busy, Lag};

    #[test]
    fn a_disk_wait_counts_only_inside_a_handler() {
        let before = disk_waits_on_loop();
        note_disk_wait("outside");
        assert_eq!(disk_waits_on_loop(), before, "not on the loop");
        let mut lag = Lag::default();
        let busy = Busy::start();
        note_disk_wait("inside");
        std::thread::sleep(Duration::from_millis(2));
        lag.end(busy, "a test handler");
        assert!(disk_waits_on_loop() > before);
        assert_eq!(lag.busy_max_in, "a test handler");
        assert!(lag.busy_max >= Duration::from_millis(2));
        let after = disk_waits_on_loop();
        note_disk_wait("outside again");
        assert_eq!(disk_waits_on_loop(), after);
    }
}
