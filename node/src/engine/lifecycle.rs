//! The engine's life: `new`, `start` (connect the stores, load or rebuild
//! the tree, resync Redis, start the writer and the maintenance loop),
//! `warm_up`, `tick`, `force_flush` and `shutdown`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use syncnode_protocol::{Hlc, MerkleTree};
use tokio::sync::{mpsc, oneshot, watch};

use super::commit_log::CommitLog;
use super::l1::L1;
use super::l2::RedisStore;
use super::l2_mirror::L2Mirror;
use super::l3::{L3Store, Rows, run_checkpointer};
use super::search::SearchRegistry;
use super::writer::{self, WriterCmd};
use super::{
    Backends, Core, EngineMetrics, EngineState, FilterManager, StorageError, SyncEngine, SyncEngineConfig, TreeState,
};

use crate::locks::{MutexUnpoisoned, RwLockUnpoisoned};

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
                l2view: MerkleTree::without_sketch(depth).expect("depth checked"),
                generation: 0,
            }),
            backends: OnceLock::new(),
            metrics: EngineMetrics::default(),
            l2_mirror: L2Mirror::new(depth),
            search: SearchRegistry::default(),
            stopping: AtomicBool::new(false),
            commits: tokio::sync::broadcast::channel(1024).0,
            tree_unverified: AtomicBool::new(false),
            apply_lock: tokio::sync::Mutex::new(()),
            payload_cap: std::sync::atomic::AtomicUsize::new(usize::MAX),
            snapshots: super::snapshot::Snapshots::default(),
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
        // The node id is every local write's origin, stored in Redis metadata
        // lines and sent to peers, which refuse a malformed one.
        super::item::validate_origin(&cfg.node_id).map_err(|e| StorageError::InvalidInput(format!("node_id: {e}")))?;
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
            writer: writer::Writer::new(tx),
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
            let mut c = core.config.write_locked();
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
            core.l2_mirror.watch(core, true).await;
        }
        let (_, max_version) = b.l3.generation().await?;
        *core.hlc.locked() = Hlc::new(floor.max(max_version));

        {
            let mut tasks = core.tasks.locked();
            tasks.push(tokio::spawn(writer::run_writer(core.clone(), rx)));
            if b.log.is_some() {
                tasks.push(tokio::spawn(writer::run_drainer(core.clone())));
            }
            let weak = Arc::downgrade(core);
            let stop = move || weak.upgrade().is_none_or(|c| c.stopping.load(Ordering::Relaxed));
            tasks.push(tokio::spawn(run_checkpointer(&b.l3, stop)));
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
            let mut rx = self.config_rx.locked();
            rx.has_changed()
                .unwrap_or(false)
                .then(|| rx.borrow_and_update().clone())
        };
        if let Some(new_cfg) = new_cfg {
            let mut cfg = self.core.config.write_locked();
            cfg.max_payload_bytes = new_cfg
                .max_payload_bytes
                .min(self.core.payload_cap.load(Ordering::Relaxed));
            cfg.max_clock_skew_ms = new_cfg.max_clock_skew_ms;
            cfg.l1_max_bytes = new_cfg.l1_max_bytes;
            cfg.snapshot_interval_secs = new_cfg.snapshot_interval_secs;
        }
        if let Ok(b) = self.core.backends() {
            b.writer.drain_kick.notify_one();
        }
        self.core.maintain().await;
    }

    /// Waits until everything submitted so far is committed (to L3, or to the
    /// commit log and then to L3 if it is reachable).
    pub async fn force_flush(&self) {
        let Ok(b) = self.core.backends() else { return };
        let (tx, rx) = oneshot::channel();
        if b.writer.tx.send(WriterCmd::Barrier(tx)).is_ok() {
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
            if b.writer.tx.send(WriterCmd::Stop(tx)).is_ok()
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
        for t in self.core.tasks.locked().drain(..) {
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
