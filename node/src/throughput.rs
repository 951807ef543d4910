//! What each holder site really delivered: the bytes and seconds of this node's recent
//! chunk fetches from the mesh (restore, the export, `cairn vm`, a drill), per site that
//! sent them, kept in the index so a restart keeps them. `cairn report` estimates a
//! full restore's time from these figures, and the status page shows them.
//!
//! A fetch is timed as part of a burst: from the moment this node had a first fetch
//! outstanding until the moment it had none (or `BURST_MS_MAX` passed). Every site that
//! answered in the burst is credited its bytes over the burst's time, so sites that
//! answered in parallel each show their share, and their rates add up to what the
//! restore saw. One chunk alone is mostly a round trip: that is what it delivered.
//! A burst that ends within `SAMPLE_MERGE_GAP_MS` of the site's previous sample is added
//! to that sample, so a restore of many small waits is one sample, not dozens.
//!
//! Stored at `throughput/` + site id as JSON (`version` 1: new fields are added with
//! defaults, so an older entry still reads).

use std::collections::{BTreeMap, VecDeque};

use cairn_protocol::identity::SiteId;
use serde::{Deserialize, Serialize};

use crate::store::{MetaIndex, StoreError};

/// Catalog key prefix of the figures, one entry per holder site.
pub const KEY_THROUGHPUT: &[u8] = b"throughput/";
/// Samples kept per site: the oldest go first.
pub const SAMPLES_MAX: usize = 32;
/// A burst this long is closed (and a new one opened) even while fetches stay
/// outstanding, so a long restore is measured while it runs.
pub const BURST_MS_MAX: u64 = 10_000;
/// A sample ending this close to the site's previous one is added to it.
pub const SAMPLE_MERGE_GAP_MS: u64 = 10_000;
/// The version of the stored JSON.
pub const THROUGHPUT_VERSION: u32 = 1;

/// Bytes one site delivered over some time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub end_unix_ms: u64,
    pub bytes: u64,
    /// Never 0: a burst shorter than a millisecond counts as one.
    pub busy_ms: u64,
}

/// The recent samples of one holder site, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteThroughput {
    pub version: u32,
    pub samples: VecDeque<Sample>,
}

impl SiteThroughput {
    pub fn add(&mut self, sample: Sample) {
        assert!(sample.busy_ms > 0, "a sample takes time");
        self.version = THROUGHPUT_VERSION;
        match self.samples.back_mut() {
            Some(last)
                if sample.end_unix_ms >= last.end_unix_ms
                    && sample.end_unix_ms - last.end_unix_ms
                        <= SAMPLE_MERGE_GAP_MS + sample.busy_ms =>
            {
                last.end_unix_ms = sample.end_unix_ms;
                last.bytes += sample.bytes;
                last.busy_ms += sample.busy_ms;
            }
            _ => self.samples.push_back(sample),
        }
        while self.samples.len() > SAMPLES_MAX {
            self.samples.pop_front();
        }
    }

    pub fn bytes(&self) -> u64 {
        self.samples.iter().map(|s| s.bytes).sum()
    }

    pub fn busy_ms(&self) -> u64 {
        self.samples.iter().map(|s| s.busy_ms).sum()
    }

    /// Over every kept sample: their bytes over their time. `None` without samples.
    pub fn bytes_per_sec(&self) -> Option<u64> {
        let busy_ms = self.busy_ms();
        (busy_ms > 0).then(|| (u128::from(self.bytes()) * 1000 / u128::from(busy_ms)) as u64)
    }

    pub fn last_unix_ms(&self) -> Option<u64> {
        self.samples.back().map(|s| s.end_unix_ms)
    }
}

/// Every site's figures as stored.
pub fn load(index: &dyn MetaIndex) -> Result<BTreeMap<SiteId, SiteThroughput>, StoreError> {
    let mut out = BTreeMap::new();
    for (key, value) in index.catalog_scan(KEY_THROUGHPUT)? {
        let Some(site) = key
            .strip_prefix(KEY_THROUGHPUT)
            .and_then(|s| <[u8; 32]>::try_from(s).ok())
        else {
            continue;
        };
        // A damaged entry is a missing figure, not a failed report.
        if let Ok(figures) = serde_json::from_slice::<SiteThroughput>(&value) {
            out.insert(SiteId(site), figures);
        }
    }
    Ok(out)
}

/// The catalog entry that stores one site's figures.
pub fn entry(site: &SiteId, figures: &SiteThroughput) -> (Vec<u8>, Vec<u8>) {
    (
        [KEY_THROUGHPUT, &site.0].concat(),
        serde_json::to_vec(figures).expect("figures serialise"),
    )
}

/// Times the mesh's fetches in bursts; the node's loop drives it with the time.
#[derive(Debug, Default)]
pub struct FetchMeter {
    burst_start_ms: Option<u64>,
    /// Bytes each site delivered in the open burst.
    delivered: BTreeMap<SiteId, u64>,
    /// The figures as last stored, updated as bursts close.
    pub sites: BTreeMap<SiteId, SiteThroughput>,
}

impl FetchMeter {
    pub fn new(sites: BTreeMap<SiteId, SiteThroughput>) -> FetchMeter {
        FetchMeter {
            sites,
            ..FetchMeter::default()
        }
    }

    /// A fetch was asked for; `outstanding` fetches (this one included) are open now.
    pub fn started(&mut self, now_ms: u64) {
        self.burst_start_ms.get_or_insert(now_ms);
    }

    /// `site` delivered `bytes`; `outstanding` are still open after it. Returns the
    /// sites whose figures changed (to be stored).
    pub fn delivered(
        &mut self,
        now_ms: u64,
        site: SiteId,
        bytes: u64,
        outstanding: usize,
    ) -> Vec<SiteId> {
        self.burst_start_ms.get_or_insert(now_ms);
        *self.delivered.entry(site).or_default() += bytes;
        self.maybe_close(now_ms, outstanding)
    }

    /// A fetch ended without bytes; `outstanding` are still open.
    pub fn failed(&mut self, now_ms: u64, outstanding: usize) -> Vec<SiteId> {
        self.maybe_close(now_ms, outstanding)
    }

    fn maybe_close(&mut self, now_ms: u64, outstanding: usize) -> Vec<SiteId> {
        let Some(start) = self.burst_start_ms else {
            return Vec::new();
        };
        let elapsed_ms = now_ms.saturating_sub(start);
        if outstanding > 0 && elapsed_ms < BURST_MS_MAX {
            return Vec::new();
        }
        self.burst_start_ms = (outstanding > 0).then_some(now_ms);
        let busy_ms = elapsed_ms.max(1);
        let mut changed = Vec::new();
        for (site, bytes) in std::mem::take(&mut self.delivered) {
            self.sites.entry(site).or_default().add(Sample {
                end_unix_ms: now_ms,
                bytes,
                busy_ms,
            });
            changed.push(site);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(n: u8) -> SiteId {
        SiteId([n; 32])
    }

    #[test]
    fn parallel_sites_each_get_their_share_over_the_burst() {
        let mut meter = FetchMeter::default();
        meter.started(1_000);
        meter.started(1_000);
        assert!(meter.delivered(1_500, site(1), 3_000, 1).is_empty());
        let changed = meter.delivered(2_000, site(2), 1_000, 0);
        assert_eq!(changed, vec![site(1), site(2)]);
        assert_eq!(meter.sites[&site(1)].bytes_per_sec(), Some(3_000));
        assert_eq!(meter.sites[&site(2)].bytes_per_sec(), Some(1_000));
        // A failure alone closes nothing and credits no one.
        meter.started(5_000);
        assert!(meter.failed(6_000, 0).is_empty());
        assert_eq!(meter.sites[&site(2)].bytes(), 1_000);
    }

    #[test]
    fn a_long_burst_is_measured_while_it_runs() {
        let mut meter = FetchMeter::default();
        meter.started(0);
        assert!(meter.delivered(5_000, site(1), 50, 3).is_empty());
        let changed = meter.delivered(BURST_MS_MAX, site(1), 50, 3);
        assert_eq!(changed, vec![site(1)]);
        assert_eq!(meter.sites[&site(1)].busy_ms(), BURST_MS_MAX);
        // The next burst starts where the last closed.
        meter.delivered(BURST_MS_MAX + 1_000, site(1), 100, 0);
        let figures = &meter.sites[&site(1)];
        assert_eq!(figures.samples.len(), 1, "merged: {figures:?}");
        assert_eq!(figures.busy_ms(), BURST_MS_MAX + 1_000);
        assert_eq!(figures.bytes(), 200);
    }

    #[test]
    fn samples_are_bounded_and_a_zero_length_burst_counts_a_millisecond() {
        let mut figures = SiteThroughput::default();
        for n in 0..(SAMPLES_MAX as u64 + 5) {
            figures.add(Sample {
                end_unix_ms: n * 100_000,
                bytes: 10,
                busy_ms: 1,
            });
        }
        assert_eq!(figures.samples.len(), SAMPLES_MAX);
        assert_eq!(figures.samples[0].end_unix_ms, 5 * 100_000);
        let mut meter = FetchMeter::default();
        meter.started(7);
        meter.delivered(7, site(3), 64, 0);
        assert_eq!(meter.sites[&site(3)].busy_ms(), 1);
    }

    #[test]
    fn figures_survive_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let index = crate::store::index::SledIndex::open(&dir.path().join("index")).unwrap();
        let mut figures = SiteThroughput::default();
        figures.add(Sample {
            end_unix_ms: 9,
            bytes: 4096,
            busy_ms: 2,
        });
        let mut batch = crate::store::IndexBatch::default();
        batch.catalog.push(entry(&site(4), &figures));
        batch
            .catalog
            .push(([KEY_THROUGHPUT, b"short"].concat(), b"{}".to_vec()));
        index.commit(batch).unwrap();
        drop(index);
        let index = crate::store::index::SledIndex::open(&dir.path().join("index")).unwrap();
        let loaded = load(&index).unwrap();
        assert_eq!(loaded.len(), 1, "a key that is no site id is skipped");
        assert_eq!(loaded[&site(4)], figures);
        assert_eq!(loaded[&site(4)].bytes_per_sec(), Some(2_048_000));
    }
}
