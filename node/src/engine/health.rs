//! Health: the engine's `HealthCheck` (tiers, pressure, the write-refusal
//! rule), the filter's and tree's figures, and the gauges.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{FilterManager, FilterTrust, HealthCheck, SyncEngine};
use crate::locks::RwLockUnpoisoned;

impl SyncEngine {
    /// Live probes plus cached figures.
    pub async fn health_check(&self) -> HealthCheck {
        let core = &self.core;
        core.update_gauges();
        let (redis_connected, redis_latency_ms) = match core.backends().ok().and_then(|b| b.l2.clone()) {
            Some(l2) => {
                let probe = tokio::time::timeout(Duration::from_secs(1), l2.ping()).await;
                match probe {
                    Ok(Ok(d)) => (Some(true), Some(d.as_millis() as u64)),
                    _ => {
                        core.l2_mirror.up.store(false, Ordering::Relaxed);
                        (Some(false), None)
                    }
                }
            }
            None => (None, None),
        };
        let (sql_connected, sql_latency_ms, wal) = match core.backends() {
            Ok(b) => {
                let probe = b.l3.ping().await;
                b.writer.sql_up.store(probe.is_ok(), Ordering::Relaxed);
                (
                    Some(probe.is_ok()),
                    probe.ok().map(|d| d.as_millis() as u64),
                    b.log.as_ref().map(|l| l.len()),
                )
            }
            Err(_) => (None, None, None),
        };
        let state = self.state();
        let level = self.pressure();
        let (filter_items, _, filter_trust) = core.filter.stats();
        let (merkle_items, merkle_root) = {
            let t = core.merkle.read_locked();
            (t.tree.count(), t.tree.root_hash().map(hex::encode))
        };
        HealthCheck {
            state,
            ready: state.is_ready(),
            memory_pressure: self.memory_pressure(),
            backpressure_level: level,
            accepting_writes: self.should_accept_writes(),
            l1_items: core.l1.cache_items(),
            l1_bytes: core.l1.cache_bytes(),
            pending_items: core.l1.pending_items(),
            pending_bytes: core.l1.pending_bytes(),
            filter_items: filter_items as u64,
            filter_trust,
            redis_connected,
            redis_latency_ms,
            sql_connected,
            sql_latency_ms,
            wal_pending_items: wal,
            merkle_items,
            merkle_root,
            quarantined: self.core.quarantined.list(),
            healthy: state.is_ready()
                && sql_connected == Some(true)
                && redis_connected != Some(false)
                // The rule that refuses writes (from Critical) also says unhealthy.
                && level.should_accept_writes(),
        }
    }

    /// `(entries, capacity, trust)` of the existence filter.
    pub fn l3_filter_stats(&self) -> (usize, usize, FilterTrust) {
        self.core.filter.stats()
    }

    pub fn l3_filter(&self) -> &Arc<FilterManager> {
        &self.core.filter
    }

    /// Makes sure the filter is trusted, rebuilding it from L3 if it is not.
    pub async fn verify_filter(&self) -> bool {
        if self.core.filter.is_trusted() {
            return true;
        }
        let _guard = self.core.apply_lock.lock().await;
        self.core.rebuild_from_l3().await.is_ok()
    }

    /// Bytes the Merkle tree takes in memory.
    pub fn merkle_memory_bytes(&self) -> usize {
        self.core.merkle.read_locked().tree.memory_bytes()
    }

    pub fn update_gauge_metrics(&self) {
        self.core.update_gauges();
    }
}
