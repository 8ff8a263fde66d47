//! Tombstone purge, the engine's half (DESIGN §6): drops tombstones stamped
//! below a watermark the replication layer has proven every member is past,
//! in one L3 transaction that also raises L3's `purged_below`. From then on
//! L3 refuses an unknown id arriving with an older version — that is a
//! deleted item coming back from a node that missed the delete — so no
//! deleted item returns. The existence filter keeps purged ids (it cannot
//! remove them; a stale "might exist" only costs an L3 lookup).

use std::sync::atomic::Ordering;

use super::{StorageError, SyncEngine};

impl SyncEngine {
    /// Purges up to `limit` tombstones stamped below `below`; returns how
    /// many. Does nothing while the commit log holds writes not yet in L3
    /// (one of them could be an older version of a purged id).
    pub async fn purge_tombstones(&self, below: u64, limit: usize) -> Result<u64, StorageError> {
        let core = &self.core;
        let b = core.backends()?;
        let _guard = core.apply_lock.lock().await;
        if b.log.as_ref().is_some_and(|l| !l.is_empty()) || core.tree_unverified.load(Ordering::Acquire) {
            return Ok(0);
        }
        let victims = b.l3.tombstones_below(below, limit).await?;
        if victims.is_empty() {
            return Ok(0);
        }
        let (generation, gone) = match b.l3.purge_tombstones(&victims, below).await {
            Ok(r) => r,
            Err(e) => {
                if b.l3.take_commit_uncertain() {
                    core.filter.mark_untrusted();
                    core.tree_unverified.store(true, Ordering::Release);
                }
                return Err(e);
            }
        };
        {
            let mut tree = core.merkle.write().unwrap_or_else(|p| p.into_inner());
            for g in &gone {
                tree.tree.remove(&g.digest());
                if g.l2 {
                    tree.l2view.remove(&g.digest());
                }
            }
            tree.generation = generation;
        }
        for g in &gone {
            core.l1.invalidate(&g.id);
        }
        if b.l2.is_some() && gone.iter().any(|g| g.l2) {
            // The Redis copies and mirror go with the next resync.
            core.l2_state.stale.store(true, Ordering::Relaxed);
        }
        tracing::info!(purged = gone.len(), below, "tombstones purged");
        Ok(gone.len() as u64)
    }

    /// Tombstones below this version have been purged here.
    pub fn purged_below(&self) -> Result<u64, StorageError> {
        Ok(self.core.backends()?.l3.purged_below())
    }

    /// Versions refused because their delete was purged (see the module doc).
    pub fn resurrections_refused(&self) -> u64 {
        self.core
            .backends()
            .map(|b| b.l3.resurrections_refused.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Tombstones held now.
    pub async fn tombstone_count(&self) -> Result<u64, StorageError> {
        Ok(self
            .core
            .backends()?
            .l3
            .tombstones_below(u64::MAX >> 1, usize::MAX >> 2)
            .await?
            .len() as u64)
    }
}
