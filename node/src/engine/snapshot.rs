//! Snapshots of the Merkle tree and the existence filter (DESIGN §3): saved
//! to L3 tagged with the generation they describe, loaded at start when
//! that generation is still L3's, else rebuilt from one L3 scan; and the
//! periodic maintenance that saves them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use syncnode_protocol::MerkleTree;

use super::l3::L3Store;
use super::{Core, FilterManager, StorageError, SyncEngine, TreeState};

use crate::locks::{MutexUnpoisoned, RwLockUnpoisoned};

/// When the last snapshot was taken and of which generation (none yet:
/// `u64::MAX`, so the first one is always saved).
pub(crate) struct Snapshots {
    pub(super) generation: AtomicU64,
    pub(super) last: Mutex<Instant>,
}

impl Default for Snapshots {
    fn default() -> Self {
        Self {
            generation: AtomicU64::new(u64::MAX),
            last: Mutex::new(Instant::now()),
        }
    }
}

impl Snapshots {
    /// Saves the tree and filter when they changed since the last snapshot
    /// (or when `force`), tagged with the generation they describe.
    pub(super) async fn save(
        &self,
        l3: &L3Store,
        merkle: &RwLock<TreeState>,
        filter: &FilterManager,
        force: bool,
    ) -> Result<(), StorageError> {
        let (generation, tree, symbols, l2view, filter) = {
            let t = merkle.read_locked();
            if !force && t.generation == self.generation.load(Ordering::Relaxed) {
                return Ok(());
            }
            (
                t.generation,
                t.tree.to_snapshot(),
                t.tree.symbols_snapshot().unwrap_or_default(),
                t.l2view.to_snapshot(),
                filter.export()?,
            )
        };
        l3.save_blob("merkle_tree", generation, &tree).await?;
        l3.save_blob("merkle_symbols", generation, &symbols).await?;
        l3.save_blob("merkle_l2view", generation, &l2view).await?;
        l3.save_blob("existence_filter", generation, &filter).await?;
        self.generation.store(generation, Ordering::Relaxed);
        *self.last.locked() = Instant::now();
        Ok(())
    }

    /// Whether `interval` has passed since the last snapshot.
    pub(super) fn due(&self, interval: Duration) -> bool {
        self.last.locked().elapsed() >= interval
    }
}

/// Scans side by side in a rebuild (the machines have two cores).
const REBUILD_SCANS: usize = 2;

impl Core {
    /// Saves the snapshots (see `Snapshots::save`).
    pub(super) async fn save_snapshot(&self, force: bool) -> Result<(), StorageError> {
        let b = self.backends()?;
        self.snapshots.save(&b.l3, &self.merkle, &self.filter, force).await
    }

    /// Periodic upkeep: snapshots and gauges.
    pub(super) async fn maintain(&self) {
        self.l2_mirror.watch(self, false).await;
        let interval = Duration::from_secs(self.config().snapshot_interval_secs.max(1));
        if self.snapshots.due(interval)
            && let Err(e) = self.save_snapshot(false).await
        {
            tracing::warn!(error = %e, "snapshot failed");
        }
        self.update_gauges();
    }

    /// Rebuilds tree and filter from a full L3 scan. Caller holds `apply_lock`.
    pub(super) async fn rebuild_from_l3(&self) -> Result<(), StorageError> {
        let b = self.backends()?;
        let depth = self.config().merkle_depth;
        let (generation, _) = b.l3.generation().await?;
        let mut tree = MerkleTree::new(depth).map_err(|e| StorageError::InvalidInput(e.to_string()))?;
        let mut l2view = MerkleTree::without_sketch(depth).map_err(|e| StorageError::InvalidInput(e.to_string()))?;
        let mut ids = 0usize;
        let mut fresh = FilterManager::empty_filter(1024);
        // Runs of the id space are scanned side by side (the reads, the row
        // conversion and the digests of each on its own connection and
        // worker), while this task puts their pages into the tree and filter.
        let points = b.l3.id_split_points(REBUILD_SCANS).await?;
        let mut bounds: Vec<Option<String>> = vec![None];
        bounds.extend(points.into_iter().map(Some));
        let (tx, mut rx) = tokio::sync::mpsc::channel(2 * REBUILD_SCANS);
        let mut scans = tokio::task::JoinSet::new();
        for (i, start) in bounds.iter().enumerate() {
            let (l3, tx) = (b.l3.clone(), tx.clone());
            let (mut after, through) = (start.clone(), bounds.get(i + 1).cloned().flatten());
            scans.spawn(async move {
                loop {
                    let page = l3.scan_digests(after.as_deref(), through.as_deref(), 10_000).await;
                    let last = page.as_ref().ok().and_then(|p| p.last().map(|e| e.id.clone()));
                    if tx.send(page).await.is_err() || last.is_none() {
                        return;
                    }
                    after = last;
                }
            });
        }
        drop(tx);
        while let Some(page) = rx.recv().await {
            // An error drops `scans`, which stops the other scans.
            let page = page?;
            for e in &page {
                tree.insert(&e.digest);
                if e.l2 {
                    l2view.insert(&e.digest);
                }
                fresh.insert(e.id.as_str());
            }
            ids += page.len();
        }
        // The channel also closes when a scan dies without sending its
        // error: only a rebuild whose every scan finished is installed.
        while let Some(done) = scans.join_next().await {
            done.map_err(|e| StorageError::Backend(format!("rebuild scan: {e}")))?;
        }
        self.filter.replace(fresh);
        self.filter.mark_trusted();
        *self.merkle.write_locked() = TreeState {
            tree,
            l2view,
            generation,
        };
        self.metrics.merkle_rebuilds.fetch_add(1, Ordering::Relaxed);
        tracing::info!(ids, generation, "rebuilt merkle tree and existence filter from L3");
        Ok(())
    }

    /// Loads the snapshot if it describes L3's current generation, else rebuilds.
    pub(super) async fn load_tree(&self) -> Result<(), StorageError> {
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
        // The tree keeps its coded symbols (stored apart; a snapshot from
        // before them is rebuilt), the Redis view none.
        let symbols = snapshot("merkle_symbols").await?;
        let tree = tree_of(snapshot("merkle_tree").await?)
            .zip(symbols)
            .and_then(|(t, s)| t.with_symbols(&s).ok());
        let l2view = tree_of(snapshot("merkle_l2view").await?);
        let filter = snapshot("existence_filter")
            .await?
            .and_then(|bytes| FilterManager::import(&bytes).ok());
        let _guard = self.apply_lock.lock().await;
        match (tree, l2view, filter) {
            (Some(tree), Some(l2view), Some(filter)) => {
                self.filter.replace(filter);
                self.filter.mark_trusted();
                *self.merkle.write_locked() = TreeState {
                    tree,
                    l2view,
                    generation,
                };
                self.snapshots.generation.store(generation, Ordering::Relaxed);
                Ok(())
            }
            _ => self.rebuild_from_l3().await,
        }
    }
}

impl SyncEngine {
    /// Rebuilds the Merkle tree and filter from a full L3 scan; returns how long it took.
    pub async fn rebuild_merkle(&self) -> Result<Duration, StorageError> {
        let start = Instant::now();
        let _guard = self.core.apply_lock.lock().await;
        self.core.rebuild_from_l3().await?;
        Ok(start.elapsed())
    }
}
