//! Dropping the local copy, for `syncnode resync`: a node away longer than
//! `ledger_retention` may hold items whose deletes were purged and whose
//! purge records are gone, so nothing may be taken from it; it keeps its
//! identity, forgets every item, tombstone and purge record, and joins
//! again like a new node. Redis follows at its next resync (its mirror is
//! told to expect nothing).

use std::sync::atomic::Ordering;

use syncnode_protocol::MerkleTree;

use super::{StorageError, SyncEngine};
use crate::locks::RwLockUnpoisoned;

impl SyncEngine {
    /// Erases every item in every tier; returns how many entries went.
    /// Runs on a started engine (the commit log is drained into L3 first),
    /// before the node joins the cluster.
    pub async fn erase_local_copy(&self) -> Result<u64, StorageError> {
        self.force_flush().await;
        let core = &self.core;
        let b = core.backends()?;
        if b.log.as_ref().is_some_and(|l| !l.is_empty()) {
            return Err(StorageError::NotReady(
                "the commit log still holds writes L3 has not taken (is L3 reachable?)".into(),
            ));
        }
        let _guard = core.apply_lock.lock().await;
        let had = self.merkle_summary().1;
        let generation = b.l3.erase_all().await?;
        {
            let mut t = core.merkle.write_locked();
            let depth = t.tree.depth();
            t.tree = MerkleTree::new(depth).expect("depth of an existing tree");
            // Redis should hold nothing now: its resync deletes what it has.
            t.l2view = MerkleTree::without_sketch(depth).expect("depth of an existing tree");
            t.generation = generation;
        }
        core.l1.invalidate_all();
        if b.l2.is_some() {
            core.l2_mirror.stale.store(true, Ordering::Relaxed);
        }
        tracing::warn!(entries = had, "local copy erased");
        Ok(had)
    }
}
