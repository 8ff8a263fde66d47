//! The state the engine handle and its background tasks share (`Core`),
//! and what `start` opens (`Backends`). Each mechanism keeps its own part
//! here (the L2 mirror's `L2Mirror`, the search registry, the snapshots'
//! `Snapshots`) and extends `Core` in its own file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use syncnode_protocol::{Hlc, MerkleTree};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::commit_log::CommitLog;
use super::l1::L1;
use super::l2::RedisStore;
use super::l2_mirror::L2Mirror;
use super::l3::L3Store;
use super::search::SearchRegistry;
use super::writer::Writer;

use super::{EngineMetrics, EngineState, FilterManager, StorageError, SyncEngineConfig, SyncItem, quarantine};
use crate::locks::RwLockUnpoisoned;

/// The tree and the L3 generation it describes, changed together.
pub(crate) struct TreeState {
    /// Every L3 entry.
    pub tree: MerkleTree,
    /// The L3 entries that Redis mirrors (`L2Route::Mirror`): what the Redis
    /// Merkle mirror must equal when L2 is in sync.
    pub l2view: MerkleTree,
    pub generation: u64,
}

/// What `start` opens.
pub(crate) struct Backends {
    pub l3: Arc<L3Store>,
    /// Redis, when `redis_url` is set.
    pub l2: Option<Arc<RedisStore>>,
    pub log: Option<Arc<CommitLog>>,
    /// The writer task's handle and the state it shares with the drainer.
    pub writer: Writer,
}

/// State shared by the engine handle and its background tasks.
pub(crate) struct Core {
    pub(super) config: RwLock<SyncEngineConfig>,
    pub(super) state: watch::Sender<EngineState>,
    pub(super) hlc: Mutex<Hlc>,
    pub(crate) l1: L1,
    pub(crate) filter: Arc<FilterManager>,
    pub(crate) merkle: RwLock<TreeState>,
    pub(super) backends: OnceLock<Backends>,
    pub(crate) metrics: EngineMetrics,
    pub(crate) l2_mirror: L2Mirror,
    pub(crate) search: SearchRegistry,
    pub(crate) stopping: AtomicBool,
    /// Committed writes made on this node, for CDC push to peers.
    pub(super) commits: tokio::sync::broadcast::Sender<Arc<Vec<SyncItem>>>,
    /// A commit's outcome is unknown: the tree and filter are rebuilt before
    /// the next write.
    pub(crate) tree_unverified: AtomicBool,
    /// Held while L3 is written or the tree rebuilt, so the two never interleave.
    pub(crate) apply_lock: tokio::sync::Mutex<()>,
    /// The largest max_payload_bytes the L3 server takes (MySQL's packet
    /// limit); a config reload cannot raise the limit past it.
    pub(super) payload_cap: std::sync::atomic::AtomicUsize,
    pub(super) snapshots: super::snapshot::Snapshots,
    pub(super) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Writes L3 refused for good (see `quarantine`).
    pub(crate) quarantined: quarantine::QuarantineList,
    /// Index definitions from the catalog take effect one at a time.
    pub(crate) catalog_lock: tokio::sync::Mutex<()>,
}

impl Core {
    /// Announces committed writes that originated here (replicated ones are
    /// not announced again, so there are no echo loops).
    pub(crate) fn publish_local(&self, items: &[SyncItem]) {
        if self.commits.receiver_count() == 0 {
            return;
        }
        let node = self.config.read_locked().node_id.clone();
        let local: Vec<SyncItem> = items.iter().filter(|i| i.origin == node).cloned().collect();
        if !local.is_empty() {
            let _ = self.commits.send(Arc::new(local));
        }
    }

    pub(crate) fn config(&self) -> SyncEngineConfig {
        self.config.read_locked().clone()
    }

    pub(super) fn max_payload(&self) -> usize {
        self.config.read_locked().max_payload_bytes
    }

    pub(crate) fn backends(&self) -> Result<&Backends, StorageError> {
        self.backends
            .get()
            .ok_or_else(|| StorageError::NotReady("not started".into()))
    }

    pub(super) fn set_state(&self, s: EngineState) {
        self.state.send_replace(s);
    }

    pub(super) fn l1_max_bytes(&self) -> usize {
        self.config.read_locked().l1_max_bytes.max(1)
    }

    pub(super) fn memory_pressure(&self) -> f64 {
        (self.l1.pending_bytes() + self.l1.cache_bytes()) as f64 / self.l1_max_bytes() as f64
    }

    pub(super) fn update_gauges(&self) {
        self.l1.sync_counts();
        let m = &self.metrics;
        m.l1_items.store(self.l1.cache_items(), Ordering::Relaxed);
        m.l1_bytes.store(self.l1.cache_bytes(), Ordering::Relaxed);
        m.pending_items.store(self.l1.pending_items(), Ordering::Relaxed);
        m.pending_bytes.store(self.l1.pending_bytes(), Ordering::Relaxed);
    }
}
