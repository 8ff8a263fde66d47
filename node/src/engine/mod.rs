//! The three-tier storage engine (DESIGN §3): `SyncEngine` and its parts, one
//! file per part.
//!
//! - `item`, `options`, `config`, `status`, `error`: the public types;
//! - `l1`: pending writes and the read cache; `l3`: the SQL store;
//! - `commit_log`: the durable buffer in front of a remote L3;
//! - `writer`: group commit and the single L3 applier;
//! - `filter`: the existence filter; `merkle`: the tree API;
//! - `backpressure`: the one rule for refusing writes.
//!
//! Reads go pending → L1 cache → filter → L3. Writes are validated, stamped
//! with the HLC, made pending in L1 and queued for the writer, which commits
//! them in batches (see `writer`).
//!
//! The engine handle itself is spread by mechanism: `core` (the shared
//! state), `lifecycle` (start, shutdown), `snapshot` (tree and filter
//! snapshots, rebuild, maintenance), `write` (validation, refusal,
//! stamping, submit, deletes), `apply` (remote apply), `read` and `health`;
//! `entry` holds `EntryMeta`, what both stores report of a version.

pub mod backpressure;
pub mod backup;
pub mod commit_log;
pub mod config;
pub mod entry;
pub mod error;
pub mod filter;
pub mod index_catalog;
pub mod item;
pub mod l1;
pub mod l2;
pub mod l2_mirror;
pub mod l3;
pub mod merkle;
pub mod metrics;
pub mod options;
pub mod purge;
pub mod quarantine;
pub mod resync;
pub mod search;
pub mod status;
pub mod writer;

pub use backpressure::BackpressureLevel;
pub use config::SyncEngineConfig;
pub use entry::EntryMeta;
pub use error::StorageError;
pub use filter::{FilterManager, FilterTrust};
pub use item::{ContentType, SyncItem, content_hash, validate_id};
pub use merkle::{MerkleDiff, MerkleNode};
pub use metrics::{EngineMetrics, Latency};
pub use options::{AckMode, CacheTtl, L2Route, SubmitOptions};
pub use search::SearchCacheStats;
pub use search::{FieldType, Query, SearchIndex, SearchResult, SearchSource, SearchTier};
pub use status::{BatchResult, EngineState, HealthCheck, ItemStatus, WriteReceipt};

mod apply;
mod core;
mod health;
mod lifecycle;
mod read;
mod snapshot;
mod write;

use crate::locks::MutexUnpoisoned;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub(crate) use self::core::{Backends, Core, TreeState};

/// The engine handle. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct SyncEngine {
    core: Arc<Core>,
    config_rx: Mutex<watch::Receiver<SyncEngineConfig>>,
    /// Set by the node while local writes must wait (its clock is ahead of
    /// the cluster's): the reason, answered to every local write.
    fence: Mutex<Option<String>>,
}

impl SyncEngine {
    pub fn state(&self) -> EngineState {
        *self.core.state.borrow()
    }

    pub fn state_receiver(&self) -> watch::Receiver<EngineState> {
        self.core.state.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        self.state().is_ready()
    }

    /// Committed writes made on this node, batch by batch (for CDC push). A
    /// receiver that falls behind loses batches; anti-entropy repairs them.
    pub fn subscribe_commits(&self) -> tokio::sync::broadcast::Receiver<Arc<Vec<SyncItem>>> {
        self.core.commits.subscribe()
    }

    /// The last version this node's clock stamped or observed.
    pub fn clock(&self) -> u64 {
        self.core.hlc.locked().last()
    }

    pub fn node_id(&self) -> String {
        self.core.config().node_id
    }

    pub fn config(&self) -> SyncEngineConfig {
        self.core.config()
    }

    /// The largest content a write may carry now (`max_payload_bytes`).
    pub fn max_payload_bytes(&self) -> usize {
        self.core.max_payload()
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.core.metrics
    }
}
