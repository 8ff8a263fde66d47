//! Tombstone purge, the engine's half (DESIGN §6): drops tombstones stamped
//! below a bound the replication layer computes (every member proven past
//! it, and older than the grace), recording each in the purge ledger
//! (`sync_purged`: id, version, origin) in the same L3 transaction. A remote
//! version that the purged delete beats is refused, and the original
//! tombstone — same version, same origin, no new version — is put back, so
//! the node that missed the delete learns it and nothing deleted comes back
//! (see `apply_remote_many`). Ledger records live `member_expiry`: a member
//! silent longer must resync before it may send anything. The existence
//! filter keeps purged ids (it cannot remove them; a stale "might exist"
//! only costs an L3 lookup).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use syncnode_protocol::wire::PurgedEntry;

use super::{StorageError, SyncEngine, SyncItem};
use crate::locks::RwLockUnpoisoned;

impl SyncEngine {
    /// Purges up to `limit` tombstones stamped below `below`; returns how
    /// many. Does nothing while the commit log holds writes not yet in L3
    /// (one of them could be an older version of a purged id).
    /// A tombstone also waits `grace` after it was written here, so one put
    /// back for a member that missed the delete reaches it before going again.
    pub async fn purge_tombstones(
        &self,
        below: u64,
        grace: std::time::Duration,
        limit: usize,
    ) -> Result<u64, StorageError> {
        let written_before = super::item::now_ms() - grace.as_millis() as i64;
        self.purge_tombstones_written_before(below, written_before, limit).await
    }

    /// `purge_tombstones`, for tombstones written here before
    /// `written_before` (ms): the replication core passes the earliest time
    /// its members' watermarks were proven at.
    pub async fn purge_tombstones_written_before(
        &self,
        below: u64,
        written_before: i64,
        limit: usize,
    ) -> Result<u64, StorageError> {
        let core = &self.core;
        let b = core.backends()?;
        let _guard = core.apply_lock.lock().await;
        if b.log.as_ref().is_some_and(|l| !l.is_empty()) || core.tree_unverified.load(Ordering::Acquire) {
            return Ok(0);
        }
        let victims = b.l3.tombstones_below(below, written_before, limit).await?;
        if victims.is_empty() {
            return Ok(0);
        }
        let (generation, gone) = match b.l3.purge_tombstones(&victims).await {
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
            let mut tree = core.merkle.write_locked();
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
            core.l2_mirror.stale.store(true, Ordering::Relaxed);
        }
        tracing::info!(purged = gone.len(), below, "tombstones purged");
        Ok(gone.len() as u64)
    }

    /// Forgets purge records older than `age` (members silent that long
    /// must resync anyway); returns how many.
    pub async fn prune_purge_ledger(&self, age: std::time::Duration) -> Result<u64, StorageError> {
        let before = super::item::now_ms() - age.as_millis() as i64;
        self.core.backends()?.l3.prune_purged(before).await
    }

    /// A page of the purge ledger for a peer that joins: at most `limit`
    /// records after `after`, and where the next page starts.
    pub async fn purge_ledger_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<PurgedEntry>, Option<String>), StorageError> {
        let rows = self.core.backends()?.l3.purged_page(after, limit).await?;
        let next = (rows.len() == limit)
            .then(|| rows.last().map(|r| r.0.clone()))
            .flatten();
        let entries = rows
            .into_iter()
            .map(|(id, version, origin, purged_at_ms)| PurgedEntry {
                id,
                version,
                origin,
                purged_at_ms,
            })
            .collect();
        Ok((entries, next))
    }

    /// Adds a peer's purge records to ours (they keep their purge time, so
    /// they expire when the peer's do); returns how many were new.
    pub async fn import_purge_ledger(&self, entries: Vec<PurgedEntry>) -> Result<u64, StorageError> {
        let now = super::item::now_ms();
        for e in &entries {
            super::item::validate_id(&e.id)?;
            super::item::validate_origin(&e.origin)?;
            if e.version == 0 || e.version > super::item::MAX_VERSION {
                return Err(StorageError::InvalidInput(format!(
                    "purge record version {} out of range",
                    e.version
                )));
            }
        }
        // A purge time in the future would never expire.
        let rows: Vec<_> = entries
            .into_iter()
            .map(|e| (e.id, e.version, e.origin, e.purged_at_ms.min(now)))
            .collect();
        self.core.backends()?.l3.record_purged(&rows).await
    }

    /// Records in the purge ledger.
    pub async fn purge_ledger_len(&self) -> Result<u64, StorageError> {
        self.core.backends()?.l3.purged_count().await
    }

    /// The purged deletes that refuse these items: for an older version,
    /// the original tombstone to put back (`Some`); for the purged
    /// tombstone itself, offered by a peer that has not purged it yet,
    /// nothing (`None`: storing it again would only purge it again, and
    /// peers purging at different times would hand it back and forth).
    pub(crate) async fn purged_tombstones_beating(
        &self,
        items: &[&SyncItem],
    ) -> Result<HashMap<String, Option<SyncItem>>, StorageError> {
        let ids: Vec<&str> = items.iter().map(|i| i.object_id.as_str()).collect();
        let ledger = self.core.backends()?.l3.purged_of(&ids).await?;
        let mut out = HashMap::new();
        for it in items {
            if let Some((version, origin)) = ledger.get(&it.object_id) {
                let mut t = SyncItem::tombstone(it.object_id.clone());
                t.version = *version;
                t.origin = origin.clone();
                if t.stamp().wins_over(&it.stamp()) {
                    out.insert(it.object_id.clone(), Some(t));
                } else if it.tombstone && it.version == t.version && it.origin == t.origin {
                    out.insert(it.object_id.clone(), None);
                }
            }
        }
        Ok(out)
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
            .tombstones_below(u64::MAX >> 1, i64::MAX, usize::MAX >> 2)
            .await?
            .len() as u64)
    }
}
