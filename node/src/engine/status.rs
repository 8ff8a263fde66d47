//! Lifecycle state and the reports the engine gives about itself.

use serde::{Deserialize, Serialize};

use super::backpressure::BackpressureLevel;
use super::filter::FilterTrust;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    Created,
    Connecting,
    /// Draining the commit log into L3 before serving.
    DrainingWal,
    SyncingRedis,
    WarmingUp,
    Ready,
    Running,
    ShuttingDown,
}

impl EngineState {
    pub fn is_ready(self) -> bool {
        matches!(self, Self::Ready | Self::Running | Self::WarmingUp)
    }
}

/// Where an object is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    Synced {
        in_l1: bool,
        in_l2: bool,
        in_l3: bool,
    },
    /// Accepted, not yet in L3.
    Pending,
    /// Deleted: a tombstone is kept so the delete replicates.
    Deleted {
        #[serde(with = "super::item::version_json")]
        version: u64,
        origin: String,
    },
    Missing,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
}

impl BatchResult {
    pub fn is_success(&self) -> bool {
        self.failed == 0
    }
}

/// What a successful write produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteReceipt {
    pub id: String,
    /// A decimal string in JSON (see `item::version_json`).
    #[serde(with = "super::item::version_json")]
    pub version: u64,
    pub origin: String,
    pub content_hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub state: EngineState,
    pub ready: bool,
    pub memory_pressure: f64,
    pub backpressure_level: BackpressureLevel,
    pub accepting_writes: bool,
    pub l1_items: u64,
    pub l1_bytes: u64,
    pub pending_items: u64,
    pub pending_bytes: u64,
    pub filter_items: u64,
    pub filter_trust: FilterTrust,
    /// `None` when no Redis is configured.
    pub redis_connected: Option<bool>,
    pub redis_latency_ms: Option<u64>,
    pub sql_connected: Option<bool>,
    pub sql_latency_ms: Option<u64>,
    /// Writes in the commit log not yet confirmed by L3 (MySQL only).
    pub wal_pending_items: Option<u64>,
    pub merkle_items: u64,
    pub merkle_root: Option<String>,
    pub healthy: bool,
    /// The newest writes L3 refused for good and dropped (see `quarantine`).
    #[serde(default)]
    pub quarantined: Vec<super::quarantine::Quarantined>,
}
