//! WAL checkpoints off the commit path (SQLite).
//!
//! In WAL mode SQLite copies the log back into the database (a checkpoint)
//! inside the commit that pushes the log past 1000 pages, so one writer's
//! commit in a few pays for it, fsync included. The applier tells this part
//! how much it committed instead; past `CHECKPOINT_BYTES` a task of its own
//! runs a PASSIVE checkpoint on a reader connection, which never blocks the
//! writer, so the copy runs beside the next commits. The log then restarts
//! before it reaches the size where SQLite would checkpoint in the commit
//! (that automatic checkpoint stays on as the fallback).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;

use super::{Dialect, L3Store};
use crate::engine::error::StorageError;

/// Bytes committed between two checkpoints (a quarter of SQLite's automatic
/// threshold of 1000 pages of 4 KiB).
const CHECKPOINT_BYTES: u64 = 1 << 20;

#[derive(Default)]
pub(super) struct Checkpoints {
    kick: Arc<Notify>,
    since_last: AtomicU64,
}

impl L3Store {
    /// Counts bytes just committed; wakes the checkpointer past the threshold.
    pub(super) fn note_committed(&self, bytes: u64) {
        if self.dialect != Dialect::Sqlite {
            return;
        }
        let before = self.checkpoints.since_last.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes >= CHECKPOINT_BYTES {
            self.checkpoints.since_last.store(0, Ordering::Relaxed);
            self.checkpoints.kick.notify_one();
        }
    }

    /// Wakes the checkpointer (to see that it should stop).
    pub(super) fn checkpoints_wake(&self) {
        self.checkpoints.kick.notify_one();
    }

    /// A PASSIVE checkpoint: copies what it can without waiting for anyone.
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        if self.dialect != Dialect::Sqlite {
            return Ok(());
        }
        self.timed(
            "wal checkpoint",
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&self.pool),
        )
        .await?;
        Ok(())
    }
}

/// The checkpointer task: one checkpoint per wake-up, until `stop` says so
/// or the store is gone (it holds the store weakly, so an engine dropped
/// without a shutdown still closes its pools).
pub(crate) fn run_checkpointer(
    l3: &Arc<L3Store>,
    stop: impl Fn() -> bool + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let kick = l3.checkpoints.kick.clone();
    let l3: Weak<L3Store> = Arc::downgrade(l3);
    async move {
        loop {
            kick.notified().await;
            let Some(l3) = l3.upgrade().filter(|_| !stop()) else {
                return;
            };
            if let Err(e) = l3.checkpoint().await {
                // SQLite's own checkpoint in the commit takes over meanwhile.
                tracing::debug!(error = %e, "wal checkpoint failed");
            }
        }
    }
}
