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

pub mod backpressure;
pub mod backup;
pub mod commit_log;
pub mod config;
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
pub mod search_cache;
pub mod status;
pub mod writer;

pub use backpressure::BackpressureLevel;
pub use config::SyncEngineConfig;
pub use error::StorageError;
pub use filter::{FilterManager, FilterTrust};
pub use item::{ContentType, SyncItem, content_hash, validate_id};
pub use merkle::{MerkleDiff, MerkleNode};
pub use metrics::{EngineMetrics, Latency};
pub use options::{AckMode, CacheTtl, L2Route, SubmitOptions};
pub use search::{FieldType, Query, SearchIndex, SearchResult, SearchSource, SearchTier};
pub use search_cache::SearchCacheStats;
pub use status::{BatchResult, EngineState, HealthCheck, ItemStatus, WriteReceipt};

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use syncnode_protocol::{Hlc, MerkleTree};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use commit_log::CommitLog;
use item::{now_ms, validate_item, validate_remote, validate_state};
use l1::L1;
use l2::RedisStore;
use l2_mirror::{L2Read, L2State};
use l3::{EntryMeta, L3Store, Rows};
use search::SearchRegistry;
use writer::WriterCmd;

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
    pub writer: mpsc::UnboundedSender<WriterCmd>,
    pub drain_kick: Arc<Notify>,
    pub drain_lock: tokio::sync::Mutex<()>,
    pub sql_up: AtomicBool,
    /// An inline drain outran its wait: acks stand on the commit log alone
    /// until a drain empties it again (writer.rs).
    pub drain_late: AtomicBool,
}

/// State shared by the engine handle and its background tasks.
pub(crate) struct Core {
    config: RwLock<SyncEngineConfig>,
    state: watch::Sender<EngineState>,
    hlc: Mutex<Hlc>,
    pub(crate) l1: L1,
    pub(crate) filter: Arc<FilterManager>,
    pub(crate) merkle: RwLock<TreeState>,
    backends: OnceLock<Backends>,
    pub(crate) metrics: EngineMetrics,
    pub(crate) l2_state: L2State,
    pub(crate) search: SearchRegistry,
    pub(crate) stopping: AtomicBool,
    /// Committed writes made on this node, for CDC push to peers.
    commits: tokio::sync::broadcast::Sender<Arc<Vec<SyncItem>>>,
    /// A commit's outcome is unknown: the tree and filter are rebuilt before
    /// the next write.
    pub(crate) tree_unverified: AtomicBool,
    /// Held while L3 is written or the tree rebuilt, so the two never interleave.
    pub(crate) apply_lock: tokio::sync::Mutex<()>,
    /// The largest max_payload_bytes the L3 server takes (MySQL's packet
    /// limit); a config reload cannot raise the limit past it.
    payload_cap: std::sync::atomic::AtomicUsize,
    snapshot_generation: AtomicU64,
    last_snapshot: Mutex<Instant>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
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
        let node = self.config.read().unwrap_or_else(|p| p.into_inner()).node_id.clone();
        let local: Vec<SyncItem> = items.iter().filter(|i| i.origin == node).cloned().collect();
        if !local.is_empty() {
            let _ = self.commits.send(Arc::new(local));
        }
    }

    pub(crate) fn config(&self) -> SyncEngineConfig {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn max_payload(&self) -> usize {
        self.config.read().unwrap_or_else(|p| p.into_inner()).max_payload_bytes
    }

    pub(crate) fn backends(&self) -> Result<&Backends, StorageError> {
        self.backends
            .get()
            .ok_or_else(|| StorageError::NotReady("not started".into()))
    }

    fn set_state(&self, s: EngineState) {
        self.state.send_replace(s);
    }

    fn l1_max_bytes(&self) -> usize {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .l1_max_bytes
            .max(1)
    }

    fn memory_pressure(&self) -> f64 {
        (self.l1.pending_bytes() + self.l1.cache_bytes()) as f64 / self.l1_max_bytes() as f64
    }

    /// Saves the tree and filter when they changed (or when `force`), tagged with
    /// the generation they describe.
    async fn save_snapshot(&self, force: bool) -> Result<(), StorageError> {
        let b = self.backends()?;
        let (generation, tree, l2view, filter) = {
            let t = self.merkle.read().unwrap_or_else(|p| p.into_inner());
            if !force && t.generation == self.snapshot_generation.load(Ordering::Relaxed) {
                return Ok(());
            }
            (
                t.generation,
                t.tree.to_snapshot(),
                t.l2view.to_snapshot(),
                self.filter.export()?,
            )
        };
        b.l3.save_blob("merkle_tree", generation, &tree).await?;
        b.l3.save_blob("merkle_l2view", generation, &l2view).await?;
        b.l3.save_blob("existence_filter", generation, &filter).await?;
        self.snapshot_generation.store(generation, Ordering::Relaxed);
        *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Periodic upkeep: snapshots and gauges.
    async fn maintain(&self) {
        self.watch_l2(false).await;
        let interval = Duration::from_secs(self.config().snapshot_interval_secs.max(1));
        let due = self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= interval;
        if due && let Err(e) = self.save_snapshot(false).await {
            tracing::warn!(error = %e, "snapshot failed");
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.l1.sync_counts();
        let m = &self.metrics;
        m.l1_items.store(self.l1.cache_items(), Ordering::Relaxed);
        m.l1_bytes.store(self.l1.cache_bytes(), Ordering::Relaxed);
        m.pending_items.store(self.l1.pending_items(), Ordering::Relaxed);
        m.pending_bytes.store(self.l1.pending_bytes(), Ordering::Relaxed);
    }

    /// Rebuilds tree and filter from a full L3 scan. Caller holds `apply_lock`.
    async fn rebuild_from_l3(&self) -> Result<(), StorageError> {
        let b = self.backends()?;
        let depth = self.config().merkle_depth;
        let (generation, _) = b.l3.generation().await?;
        let mut tree = MerkleTree::new(depth).map_err(|e| StorageError::InvalidInput(e.to_string()))?;
        let mut l2view = tree.clone();
        let mut ids = 0usize;
        let mut fresh = FilterManager::empty_filter(1024);
        let mut after: Option<String> = None;
        loop {
            let page = b.l3.scan_entries(after.as_deref(), 10_000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for e in &page {
                let d = e.digest();
                tree.insert(&d);
                if e.l2 {
                    l2view.insert(&d);
                }
                fresh.insert(e.id.as_str());
            }
            ids += page.len();
        }
        self.filter.replace(fresh);
        self.filter.mark_trusted();
        *self.merkle.write().unwrap_or_else(|p| p.into_inner()) = TreeState {
            tree,
            l2view,
            generation,
        };
        self.metrics.merkle_rebuilds.fetch_add(1, Ordering::Relaxed);
        tracing::info!(ids, generation, "rebuilt merkle tree and existence filter from L3");
        Ok(())
    }

    /// Loads the snapshot if it describes L3's current generation, else rebuilds.
    async fn load_tree(&self) -> Result<(), StorageError> {
        let b = self.backends()?;
        let depth = self.config().merkle_depth;
        let (generation, _) = b.l3.generation().await?;
        // A snapshot counts only if it was taken at L3's current generation.
        let snapshot = async |name: &str| -> Result<Option<Vec<u8>>, StorageError> {
            Ok(b.l3
                .load_blob(name)
                .await?
                .filter(|(tag, _)| *tag == generation)
                .map(|(_, bytes)| bytes))
        };
        let tree_of = |bytes: Option<Vec<u8>>| {
            bytes
                .and_then(|b| MerkleTree::from_snapshot(&b).ok())
                .filter(|t| t.depth() == depth)
        };
        let tree = tree_of(snapshot("merkle_tree").await?);
        let l2view = tree_of(snapshot("merkle_l2view").await?);
        let filter = snapshot("existence_filter")
            .await?
            .and_then(|bytes| FilterManager::import(&bytes).ok());
        let _guard = self.apply_lock.lock().await;
        match (tree, l2view, filter) {
            (Some(tree), Some(l2view), Some(filter)) => {
                self.filter.replace(filter);
                self.filter.mark_trusted();
                *self.merkle.write().unwrap_or_else(|p| p.into_inner()) = TreeState {
                    tree,
                    l2view,
                    generation,
                };
                self.snapshot_generation.store(generation, Ordering::Relaxed);
                Ok(())
            }
            _ => self.rebuild_from_l3().await,
        }
    }
}

/// The engine handle. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct SyncEngine {
    core: Arc<Core>,
    config_rx: Mutex<watch::Receiver<SyncEngineConfig>>,
    /// Set by the node while local writes must wait (its clock is ahead of
    /// the cluster's): the reason, answered to every local write.
    fence: Mutex<Option<String>>,
}

impl SyncEngine {
    /// Creates an engine in state `Created`; nothing is opened until `start`.
    /// New configs sent on `config_rx` are taken in by `tick` (payload limit,
    /// clock skew, memory budget, snapshot interval).
    pub fn new(config: SyncEngineConfig, config_rx: watch::Receiver<SyncEngineConfig>) -> Self {
        let depth = if (1..=syncnode_protocol::merkle::MAX_DEPTH).contains(&config.merkle_depth) {
            config.merkle_depth
        } else {
            syncnode_protocol::merkle::DEFAULT_DEPTH
        };
        let (state, _) = watch::channel(EngineState::Created);
        let core = Core {
            l1: L1::new((config.l1_max_bytes / 2) as u64),
            config: RwLock::new(config),
            state,
            hlc: Mutex::new(Hlc::default()),
            filter: Arc::new(FilterManager::new(100_000)),
            merkle: RwLock::new(TreeState {
                tree: MerkleTree::new(depth).expect("depth checked"),
                l2view: MerkleTree::new(depth).expect("depth checked"),
                generation: 0,
            }),
            backends: OnceLock::new(),
            metrics: EngineMetrics::default(),
            l2_state: L2State::new(depth),
            search: SearchRegistry::default(),
            stopping: AtomicBool::new(false),
            commits: tokio::sync::broadcast::channel(1024).0,
            tree_unverified: AtomicBool::new(false),
            apply_lock: tokio::sync::Mutex::new(()),
            payload_cap: std::sync::atomic::AtomicUsize::new(usize::MAX),
            snapshot_generation: AtomicU64::new(u64::MAX),
            last_snapshot: Mutex::new(Instant::now()),
            tasks: Mutex::new(Vec::new()),
            quarantined: Default::default(),
            catalog_lock: tokio::sync::Mutex::new(()),
        };
        Self {
            fence: Mutex::new(None),
            core: Arc::new(core),
            config_rx: Mutex::new(config_rx),
        }
    }

    /// An engine whose config never changes.
    pub fn with_config(config: SyncEngineConfig) -> Self {
        let (_tx, rx) = watch::channel(config.clone());
        Self::new(config, rx)
    }

    /// Opens the commit log and L3, drains the log, loads or rebuilds the Merkle
    /// tree and filter, starts the writer, and moves to `Ready`.
    pub async fn start(&self) -> Result<(), StorageError> {
        if self.state() != EngineState::Created {
            return Err(StorageError::NotReady(format!("already started ({:?})", self.state())));
        }
        let core = &self.core;
        let cfg = core.config();
        if !(1..=syncnode_protocol::merkle::MAX_DEPTH).contains(&cfg.merkle_depth) {
            return Err(StorageError::InvalidInput(format!(
                "merkle_depth {} out of range 1..=5",
                cfg.merkle_depth
            )));
        }
        core.set_state(EngineState::Connecting);
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| StorageError::backend(&format!("create data dir {}", cfg.data_dir.display()), e))?;

        // The commit log first: it may hold acknowledged writes L3 has not seen.
        let mut floor = 0u64;
        let log = if cfg.uses_mysql() {
            let log = CommitLog::open(&cfg.data_dir.join("commit_log.sqlite")).await?;
            for e in log.read(usize::MAX >> 1).await? {
                floor = floor.max(e.item.version);
                core.l1.add_pending(e.item);
            }
            Some(Arc::new(log))
        } else {
            None
        };
        let l3 = connect_l3(&cfg).await?;
        let l2 = match &cfg.redis_url {
            Some(url) => Some(Arc::new(RedisStore::connect(
                url,
                cfg.redis_prefix.as_deref().unwrap_or(""),
            )?)),
            None => None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let backends = Backends {
            l3: Arc::new(l3),
            l2,
            log,
            writer: tx,
            drain_kick: Arc::new(Notify::new()),
            drain_lock: tokio::sync::Mutex::new(()),
            sql_up: AtomicBool::new(true),
            drain_late: AtomicBool::new(false),
        };
        if core.backends.set(backends).is_err() {
            return Err(StorageError::NotReady("already started".into()));
        }
        let b = core.backends()?;
        if let Some(packet) = b.l3.max_statement_bytes().await? {
            // An item the server cannot take would fail its whole batch again
            // and again: refuse it at submit instead.
            let fits = packet.saturating_sub(1024 * 1024) as usize;
            core.payload_cap.store(fits, Ordering::Relaxed);
            let mut c = core.config.write().unwrap_or_else(|p| p.into_inner());
            if c.max_payload_bytes > fits {
                tracing::warn!(
                    max_payload_bytes = c.max_payload_bytes,
                    max_allowed_packet = packet,
                    "max_payload_bytes lowered to fit the MySQL server's max_allowed_packet"
                );
                c.max_payload_bytes = fits;
            }
        }
        if b.log.as_ref().is_some_and(|l| !l.is_empty()) {
            core.set_state(EngineState::DrainingWal);
            // Trees are loaded after the drain, so the drain need not update them.
            let n = writer::drain_log(core).await?;
            tracing::info!(entries = n, "drained commit log into L3");
        }
        core.load_tree().await?;
        core.search.load(&b.l3).await?;
        if b.l2.is_some() {
            // Redis is a cache: if it is down, start anyway and resync when it returns.
            core.set_state(EngineState::SyncingRedis);
            core.watch_l2(true).await;
        }
        let (_, max_version) = b.l3.generation().await?;
        *core.hlc.lock().unwrap_or_else(|p| p.into_inner()) = Hlc::new(floor.max(max_version));

        {
            let mut tasks = core.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.push(tokio::spawn(writer::run_writer(core.clone(), rx)));
            if b.log.is_some() {
                tasks.push(tokio::spawn(writer::run_drainer(core.clone())));
            }
            let weak = Arc::downgrade(core);
            tasks.push(tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    let Some(core) = weak.upgrade() else { return };
                    if core.stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    core.maintain().await;
                }
            }));
        }
        core.set_state(EngineState::Ready);
        if let Err(e) = self.reconcile_catalog().await {
            tracing::warn!(error = %e, "search index definitions not reconciled with the cluster's at start");
        }
        Ok(())
    }

    /// Warms L1 with up to `warm_up_items` items from L3 and makes sure the
    /// filter is trusted.
    pub async fn warm_up(&self) -> Result<(), StorageError> {
        let b = self.core.backends()?;
        self.core.set_state(EngineState::WarmingUp);
        let result = async {
            if !self.core.filter.is_trusted() {
                let _guard = self.core.apply_lock.lock().await;
                self.core.rebuild_from_l3().await?;
            }
            for item in
                b.l3.scan_prefix("", None, self.core.config().warm_up_items, Rows::WithTombstones)
                    .await?
            {
                if !self.core.l1.is_pending(&item.object_id) {
                    self.core.l1.cache_insert(item);
                }
            }
            Ok(())
        }
        .await;
        // A shutdown that began meanwhile keeps its state.
        if !self.core.stopping.load(Ordering::Relaxed) {
            self.core.set_state(EngineState::Ready);
        }
        result
    }

    /// Runs maintenance until `shutdown` (the background task does the same;
    /// this is for callers that drive the engine themselves).
    pub async fn run(&self) {
        self.core.set_state(EngineState::Running);
        while !self.core.stopping.load(Ordering::Relaxed) {
            self.tick().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One round of maintenance: take in a new config, snapshot if due, kick the
    /// commit-log drainer, refresh gauges.
    pub async fn tick(&self) {
        let new_cfg = {
            let mut rx = self.config_rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.has_changed()
                .unwrap_or(false)
                .then(|| rx.borrow_and_update().clone())
        };
        if let Some(new_cfg) = new_cfg {
            let mut cfg = self.core.config.write().unwrap_or_else(|p| p.into_inner());
            cfg.max_payload_bytes = new_cfg
                .max_payload_bytes
                .min(self.core.payload_cap.load(Ordering::Relaxed));
            cfg.max_clock_skew_ms = new_cfg.max_clock_skew_ms;
            cfg.l1_max_bytes = new_cfg.l1_max_bytes;
            cfg.snapshot_interval_secs = new_cfg.snapshot_interval_secs;
        }
        if let Ok(b) = self.core.backends() {
            b.drain_kick.notify_one();
        }
        self.core.maintain().await;
    }

    /// Waits until everything submitted so far is committed (to L3, or to the
    /// commit log and then to L3 if it is reachable).
    pub async fn force_flush(&self) {
        let Ok(b) = self.core.backends() else { return };
        let (tx, rx) = oneshot::channel();
        if b.writer.send(WriterCmd::Barrier(tx)).is_ok() {
            let _ = rx.await;
        }
        if b.log.is_some()
            && let Err(e) = writer::drain_log(&self.core).await
        {
            tracing::debug!(error = %e, "flush could not drain the commit log yet");
        }
    }

    /// Stops accepting writes, commits what is queued, saves the snapshot and
    /// closes the backends.
    pub async fn shutdown(&self) {
        if self.core.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.core.set_state(EngineState::ShuttingDown);
        if let Ok(b) = self.core.backends() {
            // The writer commits what is queued and retries what it carries, then stops.
            let (tx, rx) = oneshot::channel();
            if b.writer.send(WriterCmd::Stop(tx)).is_ok()
                && tokio::time::timeout(Duration::from_secs(30), rx).await.is_err()
            {
                tracing::warn!("the writer did not stop within 30 s");
            }
            if b.log.is_some()
                && let Err(e) = writer::drain_log(&self.core).await
            {
                tracing::warn!(error = %e, "commit log not drained at shutdown; it drains on the next start");
            }
        }
        if let Err(e) = self.core.save_snapshot(true).await {
            tracing::warn!(error = %e, "final snapshot failed; the tree will be rebuilt on start");
        }
        for t in self.core.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        if let Ok(b) = self.core.backends() {
            if let Some(log) = &b.log {
                log.close().await;
            }
            b.l3.close().await;
        }
    }

    // ----- state -----

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
        self.core.hlc.lock().unwrap_or_else(|p| p.into_inner()).last()
    }

    pub fn node_id(&self) -> String {
        self.core.config().node_id
    }

    pub fn config(&self) -> SyncEngineConfig {
        self.core.config()
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.core.metrics
    }

    /// `(pending bytes + L1 cache bytes) / l1_max_bytes`.
    pub fn memory_pressure(&self) -> f64 {
        self.core.memory_pressure()
    }

    pub fn pressure(&self) -> BackpressureLevel {
        BackpressureLevel::from_pressure(self.memory_pressure())
    }

    pub fn should_accept_writes(&self) -> bool {
        self.write_refusal().is_none()
    }

    /// Refuses local writes (`Some(reason)`) until lifted (`None`): the
    /// node fences them while its clock is ahead of the cluster's, so its
    /// versions cannot win conflicts they should lose. Replication goes on.
    pub fn set_write_fence(&self, reason: Option<String>) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Why local writes are fenced, if they are.
    pub fn write_fence(&self) -> Option<String> {
        self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Why a write would be refused now, if it would.
    fn write_refusal(&self) -> Option<StorageError> {
        let state = self.state();
        if self.core.stopping.load(Ordering::Relaxed) || !state.is_ready() {
            return Some(StorageError::NotReady(format!("{state:?}").to_lowercase()));
        }
        if let Some(reason) = self.write_fence() {
            return Some(StorageError::Fenced(reason));
        }
        let level = self.pressure();
        if !level.should_accept_writes() {
            return Some(StorageError::Backpressure {
                level,
                reason: "memory pressure".into(),
                retry_after_secs: level.retry_after_secs(),
            });
        }
        let cfg = self.core.config.read().unwrap_or_else(|p| p.into_inner());
        if let Ok(Some(log)) = self.core.backends().map(|b| b.log.as_ref())
            && (log.len() >= cfg.commit_log_max_items || log.bytes() >= cfg.commit_log_max_bytes)
        {
            return Some(StorageError::Backpressure {
                level: BackpressureLevel::Critical,
                reason: format!(
                    "commit log full ({} items, {} bytes) while L3 is unreachable",
                    log.len(),
                    log.bytes()
                ),
                retry_after_secs: 5,
            });
        }
        None
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        match self.write_refusal() {
            Some(e) => {
                self.core.metrics.writes_refused.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            None => Ok(()),
        }
    }

    // ----- writes -----

    /// Stores `item` with default options (durable acknowledgement).
    pub async fn submit(&self, item: SyncItem) -> Result<WriteReceipt, StorageError> {
        self.submit_with(item, SubmitOptions::default()).await
    }

    /// Stores `item` as a new local version.
    pub async fn submit_with(&self, item: SyncItem, options: SubmitOptions) -> Result<WriteReceipt, StorageError> {
        let mut receipts = self.submit_batch(vec![item], &options).await?;
        receipts.pop().expect("one receipt per item")
    }

    /// Stores many items as one batch (one transaction when they fit one).
    /// Invalid items are counted as failed and stored nowhere.
    pub async fn submit_many(&self, items: Vec<SyncItem>) -> Result<BatchResult, StorageError> {
        self.submit_many_with(items, SubmitOptions::default()).await
    }

    /// `submit_many` with routing options for the whole batch.
    pub async fn submit_many_with(
        &self,
        items: Vec<SyncItem>,
        options: SubmitOptions,
    ) -> Result<BatchResult, StorageError> {
        let total = items.len();
        let receipts = self.submit_batch(items, &options).await?;
        let succeeded = receipts.iter().filter(|r| r.is_ok()).count();
        Ok(BatchResult {
            total,
            succeeded,
            failed: total - succeeded,
        })
    }

    /// Validates, stamps and commits; one result per item.
    async fn submit_batch(
        &self,
        items: Vec<SyncItem>,
        options: &SubmitOptions,
    ) -> Result<Vec<Result<WriteReceipt, StorageError>>, StorageError> {
        self.submit_as(items, options, false).await
    }

    /// `submit_batch`; `engine` also lets the engine's reserved ids through.
    pub(crate) async fn submit_as(
        &self,
        items: Vec<SyncItem>,
        options: &SubmitOptions,
        engine: bool,
    ) -> Result<Vec<Result<WriteReceipt, StorageError>>, StorageError> {
        self.check_writable()?;
        let cache_only =
            match (options.sql, options.redis) {
                (true, _) => None,
                (false, true) => Some(self.core.backends()?.l2.clone().ok_or_else(|| {
                    StorageError::InvalidInput("cache-only writes (sql = false) need redis_url".into())
                })?),
                (false, false) => return Err(StorageError::InvalidInput("options store the item nowhere".into())),
            };
        if let Some(s) = &options.state {
            validate_state(s)?;
        }
        let max_payload = self.core.max_payload();
        let node = self.node_id();
        let now = now_ms();
        let mut results = Vec::with_capacity(items.len());
        let mut stamped = Vec::with_capacity(items.len());
        {
            let mut hlc = self.core.hlc.lock().unwrap_or_else(|p| p.into_inner());
            for mut item in items {
                if let Some(s) = &options.state {
                    item.state = s.clone();
                }
                let checked = validate_item(&item, max_payload).and_then(|()| match engine {
                    true => Ok(()),
                    false => index_catalog::check_not_reserved(&item.object_id),
                });
                if let Err(e) = checked {
                    results.push(Err(e));
                    continue;
                }
                item.content_hash = content_hash(&item.content);
                item.version = hlc.now(now as u64);
                item.origin = node.clone();
                item.updated_at = now;
                item.route = match (cache_only.is_some(), options.l2_route()) {
                    (true, L2Route::Expiring(s)) => L2Route::Expiring(s),
                    (true, _) => L2Route::Skip,
                    (false, r) => r,
                };
                results.push(Ok(WriteReceipt {
                    id: item.object_id.clone(),
                    version: item.version,
                    origin: item.origin.clone(),
                    content_hash: item.content_hash.clone(),
                }));
                stamped.push(item);
            }
        }
        if stamped.is_empty() {
            return Ok(results);
        }
        if let Some(l2) = cache_only {
            if let Err(e) = self.core.put_cache_only(&l2, &stamped).await {
                return Ok(results.into_iter().map(|r| r.and(Err(e.clone()))).collect());
            }
            for it in &stamped {
                self.core.search.note_write(&it.object_id);
                // L1 may hold an older version; the next read promotes this one.
                self.core.l1.invalidate(&it.object_id);
            }
            return Ok(results);
        }
        match self.commit_stamped(stamped, options.ack).await {
            // Each stamped item's own outcome (one refused item fails alone).
            Ok(committed) => {
                let mut committed = committed.into_iter();
                Ok(results
                    .into_iter()
                    .map(|r| r.and_then(|receipt| committed.next().unwrap_or(Ok(())).map(|()| receipt)))
                    .collect())
            }
            Err(e) => Ok(results.into_iter().map(|r| r.and(Err(e.clone()))).collect()),
        }
    }

    /// Makes stamped items pending and hands them to the writer; with a
    /// durable ack, the outcome of each item once committed.
    async fn commit_stamped(
        &self,
        items: Vec<SyncItem>,
        ack: AckMode,
    ) -> Result<Vec<Result<(), StorageError>>, StorageError> {
        let b = self.core.backends()?;
        let n = items.len() as u64;
        for it in &items {
            self.core.l1.add_pending(it.clone());
        }
        let (tx, rx) = oneshot::channel();
        let ack_tx = (ack == AckMode::Durable).then_some(tx);
        if b.writer.send(WriterCmd::Write { items, ack: ack_tx }).is_err() {
            return Err(StorageError::NotReady("writer stopped".into()));
        }
        let results = if ack == AckMode::Durable {
            rx.await.map_err(|_| StorageError::NotReady("writer stopped".into()))?
        } else {
            vec![Ok(()); n as usize]
        };
        let accepted = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.core.metrics.writes_accepted.fetch_add(accepted, Ordering::Relaxed);
        Ok(results)
    }

    /// Applies a version made elsewhere, keeping its version and origin. Applies
    /// only if it wins over what we hold (LWW); returns whether it did. A
    /// version too far ahead of our clock is deferred (`ClockSkew`).
    pub async fn apply_remote(&self, item: SyncItem) -> Result<bool, StorageError> {
        self.apply_remote_many(vec![item]).await?.pop().unwrap_or(Ok(false))
    }

    /// `apply_remote` for many items in one durable commit (anti-entropy
    /// chunks, CDC bursts): one answer per item, in order — whether it won,
    /// or why it was refused (bad input, hash mismatch, clock skew). The
    /// outer error is a failure of the commit itself.
    pub async fn apply_remote_many(
        &self,
        items: Vec<SyncItem>,
    ) -> Result<Vec<Result<bool, StorageError>>, StorageError> {
        self.check_writable()?;
        let max = self.core.max_payload();
        let skew = self.core.config().max_clock_skew_ms;
        let mut out: Vec<Result<bool, StorageError>> = Vec::with_capacity(items.len());
        // The best candidate per id: its index in `items`.
        let mut best: HashMap<String, usize> = HashMap::new();
        for (i, it) in items.iter().enumerate() {
            let checked = validate_remote(it, max).and_then(|()| {
                let mut hlc = self.core.hlc.lock().unwrap_or_else(|p| p.into_inner());
                hlc.observe(it.version, now_ms() as u64, skew).map_err(|e| {
                    self.core.metrics.clock_deferrals.fetch_add(1, Ordering::Relaxed);
                    StorageError::from(e)
                })
            });
            out.push(checked.map(|()| false));
            if out[i].is_ok() {
                match best.get(&it.object_id) {
                    Some(&j) if !it.stamp().wins_over(&items[j].stamp()) => {}
                    _ => {
                        best.insert(it.object_id.clone(), i);
                    }
                }
            }
        }
        let ids: Vec<&str> = best.keys().map(String::as_str).collect();
        let current = self.current_entries(&ids).await?;
        // Ids we hold nothing of may have been deleted and purged here.
        let unknown: Vec<&SyncItem> = best
            .iter()
            .filter(|(id, _)| !current.contains_key(*id))
            .map(|(_, &i)| &items[i])
            .collect();
        let purged = if unknown.is_empty() {
            HashMap::new()
        } else {
            self.purged_tombstones_beating(&unknown).await?
        };
        let (mut winners, mut won) = (Vec::new(), Vec::new());
        for (id, &i) in &best {
            let it = &items[i];
            if let Some(cur) = current.get(id)
                && !it.stamp().wins_over(&cur.stamp())
            {
                self.core.metrics.remote_stale.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(None) = purged.get(id) {
                // The tombstone we purged, from a peer yet to purge it.
                self.core.metrics.remote_stale.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(Some(tombstone)) = purged.get(id) {
                // A deleted item coming back from a node that missed the
                // delete (whose tombstone was purged here): refuse it and put
                // the original tombstone back, so that node learns the delete.
                self.core
                    .backends()?
                    .l3
                    .resurrections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%id, version = it.version, "refused a version its purged delete beats; restoring the tombstone");
                winners.push(tombstone.clone());
                won.push(None);
                continue;
            }
            let mut w = it.clone();
            w.access_count = 0;
            w.last_accessed = 0;
            winners.push(w);
            won.push(Some(i));
        }
        if !winners.is_empty() {
            let catalog: Vec<String> = winners
                .iter()
                .map(|w| w.object_id.clone())
                .filter(|id| id.starts_with(index_catalog::RESERVED))
                .collect();
            let results = self.commit_stamped(winners, AckMode::Durable).await?;
            let n = results.iter().filter(|r| r.is_ok()).count() as u64;
            self.core.metrics.remote_applied.fetch_add(n, Ordering::Relaxed);
            // Index definitions from the cluster take effect here.
            if !catalog.is_empty() {
                self.follow_catalog(&catalog).await;
            }
            for (i, r) in won.into_iter().zip(results) {
                if let Some(i) = i {
                    out[i] = r.map(|()| true);
                }
            }
        }
        Ok(out)
    }

    /// What L1 holds of `ids`.
    fn l1_entries(&self, ids: &[&str]) -> HashMap<String, EntryMeta> {
        ids.iter()
            .filter_map(|id| Some((id.to_string(), EntryMeta::of(&self.core.l1.get(id)?))))
            .collect()
    }

    /// The versions we hold of `ids` (tombstones included): L1 first, then
    /// one L3 lookup for the ids the filter does not rule out.
    async fn current_entries(&self, ids: &[&str]) -> Result<HashMap<String, EntryMeta>, StorageError> {
        let mut out = HashMap::with_capacity(ids.len());
        let mut ask = Vec::new();
        for id in ids {
            if let Some(it) = self.core.l1.get(id) {
                out.insert(id.to_string(), EntryMeta::of(&it));
            } else if self.core.filter.might_exist(id) != Some(false) {
                ask.push(*id);
            }
        }
        if !ask.is_empty() {
            out.extend(self.core.backends()?.l3.meta_of(&ask).await?);
        }
        Ok(out)
    }

    /// The version we hold of `id` (tombstones included), without its content
    /// when it comes from L3.
    pub async fn current_entry(&self, id: &str) -> Result<Option<EntryMeta>, StorageError> {
        validate_id(id)?;
        if let Some(it) = self.core.l1.get(id) {
            return Ok(Some(EntryMeta::of(&it)));
        }
        if self.core.filter.might_exist(id) == Some(false) {
            return Ok(None);
        }
        Ok(self.core.backends()?.l3.meta_of(&[id]).await?.remove(id))
    }

    /// Deletes `id` by writing a tombstone. Returns whether a live item
    /// existed (`false` also when L3 was unreachable to tell).
    pub async fn delete(&self, id: &str) -> Result<bool, StorageError> {
        Ok(self.delete_receipt(id).await?.0 == Some(true))
    }

    /// Deletes `id`; returns whether a live item existed (`None`: L3 was
    /// unreachable to tell, the tombstone is written all the same) and the
    /// receipt of the tombstone (its version and origin, what LWW compares).
    pub async fn delete_receipt(&self, id: &str) -> Result<(Option<bool>, WriteReceipt), StorageError> {
        let (found, mut receipts) = self.write_tombstones(&[id]).await?;
        let receipt = receipts.pop().expect("one tombstone per id")?;
        Ok((found.map(|n| n == 1), receipt))
    }

    /// Deletes many ids in one batch; `succeeded` counts those known to have
    /// existed.
    pub async fn delete_many(&self, ids: &[&str]) -> Result<BatchResult, StorageError> {
        let (found, results) = self.write_tombstones(ids).await?;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        Ok(BatchResult {
            total: ids.len(),
            succeeded: found.unwrap_or(0),
            failed: 0,
        })
    }

    /// Writes a fresh tombstone per id, in order; returns how many ids were
    /// live (`None` when L3 could not tell) and each tombstone's result.
    async fn write_tombstones(
        &self,
        ids: &[&str],
    ) -> Result<(Option<usize>, Vec<Result<WriteReceipt, StorageError>>), StorageError> {
        self.check_writable()?;
        for id in ids {
            validate_id(id)?;
            index_catalog::check_not_reserved(id)?;
        }
        // A delete is a write: while a MySQL L3 is down it goes to the commit
        // log like any other, without waiting to learn what it replaces.
        let mut l3_up = self.core.backends()?.sql_up.load(Ordering::Relaxed);
        // A tombstone also for ids not here (yet): the delete must win over
        // a version still on its way from a peer.
        let mut tombstones = Vec::new();
        let mut found = 0;
        for chunk in ids.chunks(500) {
            let current = if l3_up {
                match self.current_entries(chunk).await {
                    Ok(c) => c,
                    Err(StorageError::Connection(_)) => {
                        l3_up = false;
                        self.l1_entries(chunk)
                    }
                    Err(e) => return Err(e),
                }
            } else {
                self.l1_entries(chunk)
            };
            // Ids L3 does not hold may be cache-only items, which live in Redis alone.
            let cache_only = if l3_up {
                self.cache_only_items(chunk).await?
            } else {
                Vec::new()
            };
            if !cache_only.is_empty() {
                let l2 = self.core.backends()?.l2.clone();
                if let Some(l2) = l2 {
                    self.core.remove_cache_only(&l2, &cache_only).await?;
                }
            }
            let mut cached: HashMap<String, String> = HashMap::new();
            for it in cache_only {
                found += 1;
                cached.insert(it.object_id, it.state);
            }
            for id in chunk {
                if let Some(state) = cached.remove(*id) {
                    tombstones.push(SyncItem::tombstone(id.to_string()).with_state(state));
                    continue;
                }
                // Always a fresh tombstone, even over an old one: this delete
                // must beat any version made before it, wherever it is.
                match current.get(*id) {
                    Some(c) => {
                        found += usize::from(!c.tombstone);
                        tombstones.push(SyncItem::tombstone(id.to_string()).with_state(c.state.clone()));
                    }
                    None => tombstones.push(SyncItem::tombstone(id.to_string())),
                }
            }
        }
        let results = self.submit_batch(tombstones, &SubmitOptions::default()).await?;
        Ok((l3_up.then_some(found), results))
    }

    /// The live cache-only items among `ids` that `held` (what L3 and L1
    /// hold) lacks: they are in Redis only.
    async fn cache_only_items(&self, ids: &[&str]) -> Result<Vec<SyncItem>, StorageError> {
        let b = self.core.backends()?;
        let Some(l2) = b.l2.clone() else {
            return Ok(Vec::new());
        };
        // What L3 holds (L1's cache may hold a cache-only item too).
        let in_l3 = b.l3.meta_of(ids).await?;
        let absent: Vec<&str> = ids.iter().copied().filter(|id| !in_l3.contains_key(*id)).collect();
        let reads = self.l2_reads(&l2, &absent).await;
        Ok(reads
            .into_iter()
            .filter_map(|r| match r {
                // A mirrored item is L3's (a stale mirror), never cache-only.
                L2Read::Hit(it) if !it.tombstone && it.route != L2Route::Mirror => Some(*it),
                _ => None,
            })
            .collect())
    }

    /// Redis reads of `ids`, in order, at most 64 in flight.
    async fn l2_reads(&self, l2: &RedisStore, ids: &[&str]) -> Vec<L2Read> {
        use futures::StreamExt;
        let mut reads = Vec::with_capacity(ids.len());
        for id in ids {
            reads.push(self.core.l2_get(l2, id));
        }
        futures::stream::iter(reads).buffered(64).collect().await
    }

    /// Deletes every live item whose id starts with `prefix`. Returns how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        validate_prefix(prefix)?;
        let b = self.core.backends()?;
        let mut ids = b.l3.ids_with_prefix(prefix, usize::MAX >> 1).await?;
        ids.extend(
            self.core
                .l1
                .pending_ids_with_prefix(prefix)
                .into_iter()
                .filter(|id| !(index_catalog::hides_reserved(prefix) && id.starts_with(index_catalog::RESERVED))),
        );
        ids.sort();
        ids.dedup();
        self.delete_listed(&ids).await
    }

    /// Deletes ids L3 just listed as live; returns how many (all of them
    /// when L3 goes away before it can tell).
    async fn delete_listed(&self, ids: &[String]) -> Result<u64, StorageError> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (found, results) = self.write_tombstones(&refs).await?;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        Ok(found.unwrap_or(refs.len()) as u64)
    }

    /// Deletes every live item in `state`. Returns how many.
    pub async fn delete_by_state(&self, state: &str) -> Result<u64, StorageError> {
        validate_state(state)?;
        let ids = self.core.backends()?.l3.state_ids(state, usize::MAX >> 1).await?;
        self.delete_listed(&ids).await
    }

    /// Moves a live item to `new_state` (a new version, so it replicates).
    /// Returns whether the item existed.
    pub async fn set_state(&self, id: &str, new_state: &str) -> Result<bool, StorageError> {
        validate_state(new_state)?;
        let Some(item) = self.get(id).await? else {
            return Ok(false);
        };
        let options = self.options_of(&item).await?.with_state(new_state.to_string());
        let (cache_only, old_state) = (!options.sql, item.state.clone());
        self.submit_with(item, options).await?;
        // A cache-only write does not know the state it replaces: leave its set here.
        if cache_only
            && old_state != new_state
            && let Some(l2) = self.core.backends()?.l2.clone()
        {
            self.core.leave_state_set(&l2, id, &old_state).await?;
        }
        Ok(true)
    }

    /// The options `item` was written with, so a rewrite keeps its routing:
    /// cache-only stays cache-only, a Redis copy keeps its expiry, a durable
    /// item stays out of Redis.
    async fn options_of(&self, item: &SyncItem) -> Result<SubmitOptions, StorageError> {
        let l2 = self.core.backends()?.l2.clone();
        let ttl = match (&l2, item.route) {
            (_, L2Route::Expiring(s)) => Some(s),
            (Some(l2), L2Route::Skip) => l2.ttl_secs(&item.object_id).await?,
            _ => None,
        }
        .map(|s| CacheTtl::from(Duration::from_secs(s)));
        let cache_only = matches!(
            self.status(&item.object_id).await?,
            ItemStatus::Synced { in_l3: false, .. }
        );
        Ok(match (cache_only, item.route, ttl) {
            (true, _, ttl) => SubmitOptions {
                redis: true,
                sql: false,
                redis_ttl: ttl,
                ..SubmitOptions::default()
            },
            (false, _, Some(ttl)) => SubmitOptions {
                redis_ttl: Some(ttl),
                ..SubmitOptions::default()
            },
            (false, L2Route::Mirror, None) => SubmitOptions::default(),
            (false, _, None) => SubmitOptions::durable(),
        })
    }

    // ----- reads -----

    /// The live item, from L1, else L3 (promoted to L1). `None` when absent or deleted.
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        Ok(self.lookup(id).await?.filter(|it| !it.tombstone))
    }

    /// The stored version including tombstones.
    async fn lookup(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        validate_id(id)?;
        let m = &self.core.metrics;
        if let Some(it) = self.core.l1.get(id) {
            m.reads_l1.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(it));
        }
        let b = self.core.backends()?;
        let mut repair = false;
        if let Some(l2) = &b.l2 {
            match self.core.l2_get(l2, id).await {
                L2Read::Hit(it) => {
                    m.reads_l2.fetch_add(1, Ordering::Relaxed);
                    self.core.l1.cache_insert((*it).clone());
                    return Ok(Some(*it));
                }
                L2Read::Miss => repair = true,
                L2Read::Unusable { repair: r } => repair = r,
            }
        }
        if self.core.filter.might_exist(id) == Some(false) {
            m.filter_negatives.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let found = b.l3.get(id).await?;
        match &found {
            Some(it) => {
                m.reads_l3.fetch_add(1, Ordering::Relaxed);
                self.core.l1.cache_insert(it.clone());
                if repair && let Some(l2) = &b.l2 {
                    self.core.l2_write_back(l2, it).await;
                }
            }
            None => {
                m.reads_missing.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(found)
    }

    /// Stored versions of `ids` including tombstones, in no particular order
    /// (for replication).
    pub async fn get_stored_many(&self, ids: &[&str]) -> Result<Vec<SyncItem>, StorageError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut rest = Vec::new();
        for id in ids {
            validate_id(id)?;
            match self.core.l1.get(id) {
                Some(it) => out.push(it),
                None => rest.push(*id),
            }
        }
        if !rest.is_empty() {
            out.extend(self.core.backends()?.l3.get_many(&rest).await?);
        }
        Ok(out)
    }

    /// The stored versions of the first of `ids` whose contents fit `budget`
    /// bytes (at least one), and the ids left unread — so a transfer of large
    /// items never reads more than it can send.
    pub async fn get_stored_within(
        &self,
        ids: &[&str],
        budget: usize,
    ) -> Result<(Vec<SyncItem>, Vec<String>), StorageError> {
        let sizes = self.core.backends()?.l3.content_sizes(ids).await?;
        let mut bytes = 0;
        let mut take = 0;
        for id in ids {
            let size = sizes.get(*id).copied().unwrap_or(0) + id.len() + 64;
            if take > 0 && bytes + size > budget {
                break;
            }
            bytes += size;
            take += 1;
        }
        let items = self.get_stored_many(&ids[..take]).await?;
        Ok((items, ids[take..].iter().map(|s| s.to_string()).collect()))
    }

    /// Like `get`, but reads L3 (not the cache) and checks the content against
    /// its hash: `Corruption` if they differ.
    pub async fn get_verified(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        validate_id(id)?;
        let item = match self.core.l1.get_pending(id) {
            Some(p) => Some(p),
            None => self.core.backends()?.l3.get(id).await?,
        };
        let Some(item) = item else { return Ok(None) };
        let actual = content_hash(&item.content);
        if actual != item.content_hash {
            self.core.metrics.corruption_detected.fetch_add(1, Ordering::Relaxed);
            self.core.l1.invalidate(id);
            return Err(StorageError::Corruption {
                id: id.to_string(),
                expected: item.content_hash,
                actual,
            });
        }
        Ok((!item.tombstone).then_some(item))
    }

    /// Many items in input order (`None` where absent or deleted): L1 first,
    /// then one L3 query for the rest.
    pub async fn get_many(&self, ids: &[&str]) -> Result<Vec<Option<SyncItem>>, StorageError> {
        let mut out: Vec<Option<SyncItem>> = Vec::with_capacity(ids.len());
        let mut misses = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            // An invalid id reads as absent (as in the seed crate) and fails nothing else.
            if validate_id(id).is_err() {
                out.push(None);
                continue;
            }
            match self.core.l1.get(id) {
                Some(it) => out.push(Some(it)),
                None => {
                    misses.push(i);
                    out.push(None);
                }
            }
        }
        // Redis next (it also holds the cache-only items L3 never sees), all
        // at once over the multiplexed connection.
        let b = self.core.backends()?;
        if let Some(l2) = &b.l2
            && !misses.is_empty()
        {
            let want: Vec<&str> = misses.iter().map(|&i| ids[i]).collect();
            let reads = self.l2_reads(l2, &want).await;
            let mut left = Vec::with_capacity(misses.len());
            for (i, read) in misses.into_iter().zip(reads) {
                match read {
                    L2Read::Hit(it) => {
                        self.core.metrics.reads_l2.fetch_add(1, Ordering::Relaxed);
                        self.core.l1.cache_insert((*it).clone());
                        out[i] = Some(*it);
                    }
                    _ => left.push(i),
                }
            }
            misses = left;
        }
        misses.retain(|&i| self.core.filter.might_exist(ids[i]) != Some(false));
        if !misses.is_empty() {
            let want: Vec<&str> = misses.iter().map(|&i| ids[i]).collect();
            let found = self.core.backends()?.l3.get_many(&want).await?;
            let mut by_id: std::collections::HashMap<String, SyncItem> =
                found.into_iter().map(|it| (it.object_id.clone(), it)).collect();
            for i in misses {
                if let Some(it) = by_id.remove(ids[i]) {
                    self.core.l1.cache_insert(it.clone());
                    out[i] = Some(it);
                }
            }
        }
        Ok(out.into_iter().map(|o| o.filter(|it| !it.tombstone)).collect())
    }

    /// Returns the item, or stores and returns what `factory` makes.
    pub async fn get_or_insert_with<F, Fut>(&self, id: &str, factory: F) -> Result<SyncItem, StorageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = SyncItem>,
    {
        if let Some(it) = self.get(id).await? {
            return Ok(it);
        }
        let mut item = factory().await;
        if item.object_id != id {
            return Err(StorageError::InvalidInput(format!(
                "factory made an item for {:?}, not {id:?}",
                item.object_id
            )));
        }
        let r = self.submit(item.clone()).await?;
        item.version = r.version;
        item.origin = r.origin;
        item.content_hash = r.content_hash;
        Ok(item)
    }

    /// Whether a live item exists (authoritative; reads L3 when needed).
    pub async fn contains(&self, id: &str) -> Result<bool, StorageError> {
        Ok(self.lookup(id).await?.is_some_and(|it| !it.tombstone))
    }

    /// True unless the id is surely absent (L1 or filter; no I/O).
    pub fn might_exist(&self, id: &str) -> bool {
        !self.definitely_missing(id)
    }

    /// True only when the id is in neither L1 nor L3 (trusted filter; no I/O).
    pub fn definitely_missing(&self, id: &str) -> bool {
        self.core.l1.get_pending(id).is_none()
            && !self.core.l1.in_cache(id)
            && self.core.filter.might_exist(id) == Some(false)
    }

    /// Whether we hold `id` (live or tombstone) with exactly this content hash.
    pub async fn is_current(&self, id: &str, content_hash: &str) -> Result<bool, StorageError> {
        Ok(self
            .current_entry(id)
            .await?
            .is_some_and(|e| e.content_hash == content_hash))
    }

    /// Where `id` is: pending, synced (and in which tiers), deleted, or missing.
    pub async fn status(&self, id: &str) -> Result<ItemStatus, StorageError> {
        validate_id(id)?;
        if self.core.l1.is_pending(id) {
            return Ok(ItemStatus::Pending);
        }
        let in_l1 = self.core.l1.in_cache(id);
        let b = self.core.backends()?;
        let in_l2 = match &b.l2 {
            Some(l2) if self.core.l2_state.up.load(Ordering::Relaxed) => {
                l2.exists(id).await.ok().flatten().unwrap_or(false)
            }
            _ => false,
        };
        let stored = if self.core.filter.might_exist(id) == Some(false) {
            None
        } else {
            b.l3.meta_of(&[id]).await?.remove(id)
        };
        Ok(match stored {
            Some(e) if e.tombstone => ItemStatus::Deleted {
                version: e.version,
                origin: e.origin,
            },
            Some(_) => ItemStatus::Synced {
                in_l1,
                in_l2,
                in_l3: true,
            },
            None if in_l2 => ItemStatus::Synced {
                in_l1,
                in_l2,
                in_l3: false,
            },
            None => ItemStatus::Missing,
        })
    }

    pub async fn get_by_state(&self, state: &str, limit: usize) -> Result<Vec<SyncItem>, StorageError> {
        validate_state(state)?;
        self.core.backends()?.l3.by_state(state, limit).await
    }

    /// Live items in `state` whose id starts with `prefix`, in id order.
    pub async fn get_by_state_with_prefix(
        &self,
        state: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        self.page_by_state(state, prefix, None, limit).await
    }

    /// A page of `get_by_state_with_prefix`: the ids after `after`.
    pub async fn page_by_state(
        &self,
        state: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        validate_state(state)?;
        validate_prefix(prefix)?;
        self.core
            .backends()?
            .l3
            .by_state_with_prefix(state, prefix, after, limit)
            .await
    }

    pub async fn count_by_state(&self, state: &str) -> Result<u64, StorageError> {
        validate_state(state)?;
        self.core.backends()?.l3.count_by_state(state).await
    }

    pub async fn list_state_ids(&self, state: &str, limit: usize) -> Result<Vec<String>, StorageError> {
        validate_state(state)?;
        self.core.backends()?.l3.state_ids(state, limit).await
    }

    /// Live items under `prefix`, in id order, from L3.
    pub async fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<SyncItem>, StorageError> {
        self.scan_page(prefix, None, limit).await
    }

    /// A page of `scan_prefix`: the live ids after `after`, in id order.
    pub async fn scan_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        validate_prefix(prefix)?;
        self.core
            .backends()?
            .l3
            .scan_prefix(prefix, after, limit, Rows::Live)
            .await
    }

    pub async fn count_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        validate_prefix(prefix)?;
        self.core.backends()?.l3.count_prefix(prefix, Rows::Live).await
    }

    // ----- health -----

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
                        core.l2_state.up.store(false, Ordering::Relaxed);
                        (Some(false), None)
                    }
                }
            }
            None => (None, None),
        };
        let (sql_connected, sql_latency_ms, wal) = match core.backends() {
            Ok(b) => {
                let probe = b.l3.ping().await;
                b.sql_up.store(probe.is_ok(), Ordering::Relaxed);
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
            let t = core.merkle.read().unwrap_or_else(|p| p.into_inner());
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
            peer_lag_ms: BTreeMap::new(),
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

    /// Rebuilds the Merkle tree and filter from a full L3 scan; returns how long it took.
    pub async fn rebuild_merkle(&self) -> Result<Duration, StorageError> {
        let start = Instant::now();
        let _guard = self.core.apply_lock.lock().await;
        self.core.rebuild_from_l3().await?;
        Ok(start.elapsed())
    }

    /// Bytes the Merkle tree takes in memory.
    pub fn merkle_memory_bytes(&self) -> usize {
        self.core
            .merkle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tree
            .memory_bytes()
    }

    pub fn update_gauge_metrics(&self) {
        self.core.update_gauges();
    }
}

fn validate_prefix(prefix: &str) -> Result<(), StorageError> {
    if prefix.len() > item::MAX_ID_BYTES || prefix.bytes().any(|b| b.is_ascii_control()) {
        return Err(StorageError::InvalidId(format!(
            "prefix {:?} is not a valid id prefix",
            prefix.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// Connects to L3, retrying for a while: a MySQL server may still be starting.
async fn connect_l3(cfg: &SyncEngineConfig) -> Result<L3Store, StorageError> {
    let url = cfg.effective_sql_url();
    let timeout = Duration::from_millis(cfg.sql_timeout_ms.max(100));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut wait = Duration::from_millis(100);
    loop {
        match L3Store::connect(&url, cfg.sql_max_connections, timeout).await {
            Ok(s) => return Ok(s),
            Err(e @ StorageError::Connection(_)) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "L3 not reachable yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}
