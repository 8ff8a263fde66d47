//! The engine's counters and latency histograms. They live where they are
//! counted; the node's `/metrics` reads them at each scrape.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// A latency histogram in seconds, 0.1 ms to about 3 s in doubling buckets.
/// Clones share the counts, so `/metrics` registers a clone at each scrape.
#[derive(Debug, Clone)]
pub struct Latency(pub Histogram);

impl Default for Latency {
    fn default() -> Self {
        Self(Histogram::new(exponential_buckets(0.0001, 2.0, 16)))
    }
}

impl Latency {
    /// Doubling buckets from `first` seconds, `count` of them.
    pub fn buckets(first: f64, count: u16) -> Self {
        Self(Histogram::new(exponential_buckets(first, 2.0, count)))
    }

    /// Records the time since `start`.
    pub fn since(&self, start: Instant) {
        self.0.observe(start.elapsed().as_secs_f64());
    }
}

/// Counters and gauges of the engine; exported by the node's `/metrics`.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Time of each group commit of the writer (L3 transaction and commit log).
    pub commit_seconds: Latency,
    pub writes_accepted: AtomicU64,
    /// Group commits made by the writer (items per commit = accepted / this).
    pub group_commits: AtomicU64,
    pub writes_refused: AtomicU64,
    pub l3_items_written: AtomicU64,
    pub l3_errors: AtomicU64,
    /// Writes L3 refused for good and dropped (see `quarantine`).
    pub writes_quarantined: AtomicU64,
    pub reads_l1: AtomicU64,
    pub reads_l2: AtomicU64,
    pub reads_l3: AtomicU64,
    pub reads_missing: AtomicU64,
    pub filter_negatives: AtomicU64,
    pub remote_applied: AtomicU64,
    pub remote_stale: AtomicU64,
    pub clock_deferrals: AtomicU64,
    pub corruption_detected: AtomicU64,
    pub log_drained: AtomicU64,
    pub merkle_rebuilds: AtomicU64,
    pub l1_items: AtomicU64,
    pub l1_bytes: AtomicU64,
    pub pending_items: AtomicU64,
    pub pending_bytes: AtomicU64,
}
