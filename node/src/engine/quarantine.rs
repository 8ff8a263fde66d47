//! Items L3 refuses for good. A group commit or a commit-log drain that L3
//! refuses for the data (`StorageError::Rejected`: a constraint, a trigger,
//! a value too long) is tried again one item at a time, so one bad item
//! neither fails the writes committed with it nor blocks the queue behind
//! it. An item refused alone is quarantined: dropped from the pending
//! writes, its caller told (durable writes), and kept in a short list for
//! `/health` and a counter. Any other failure (the connection, a full disk,
//! a read-only server, a deadlock) is the server's state, not the item's:
//! nothing is quarantined for it, and the writes wait or fail as before.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use super::Core;
use super::error::StorageError;
use super::item::{SyncItem, now_ms};
use crate::locks::MutexUnpoisoned;

/// How many quarantined writes `/health` lists (the newest).
const KEPT: usize = 100;

/// A write L3 refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub id: String,
    #[serde(with = "super::item::version_json")]
    pub version: u64,
    pub origin: String,
    pub error: String,
    /// When it was dropped (Unix ms).
    pub at_ms: i64,
}

/// The newest quarantined writes.
#[derive(Debug, Default)]
pub(crate) struct QuarantineList(Mutex<VecDeque<Quarantined>>);

impl QuarantineList {
    pub(crate) fn list(&self) -> Vec<Quarantined> {
        self.0.locked().iter().cloned().collect()
    }

    /// Adds `q` unless that version is listed already (a peer offering a
    /// refused version again).
    fn push_new(&self, q: Quarantined) -> bool {
        let mut l = self.0.locked();
        if l.iter().any(|o| o.id == q.id && o.version == q.version) {
            return false;
        }
        if l.len() == KEPT {
            l.pop_front();
        }
        l.push_back(q);
        true
    }
}

/// Whether an error is not the item's own (see the module comment).
pub(crate) fn passing(e: &StorageError) -> bool {
    !e.is_item_fault()
}

impl Core {
    /// Drops `item` from the pending writes and records why.
    pub(crate) fn quarantine(&self, item: &SyncItem, error: &StorageError) {
        self.l1.forget_pending(item);
        let new = self.quarantined.push_new(Quarantined {
            id: item.object_id.clone(),
            version: item.version,
            origin: item.origin.clone(),
            error: error.to_string(),
            at_ms: now_ms(),
        });
        // A version a peer offers again is counted and logged once.
        if new {
            tracing::error!(
                id = %item.object_id,
                version = item.version,
                %error,
                "L3 refuses this write for good: quarantined (see /health), the others go on"
            );
            self.metrics.writes_quarantined.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Commits `items` one at a time with `commit` (a refused one is tried
    /// twice): one result per item. Stops at a passing error, which the
    /// rest share.
    pub(crate) async fn one_by_one<F, Fut>(&self, items: &[SyncItem], mut commit: F) -> Vec<Result<(), StorageError>>
    where
        F: FnMut(SyncItem) -> Fut,
        Fut: std::future::Future<Output = Result<(), StorageError>>,
    {
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            if let Some(Err(e)) = out.last()
                && passing(e)
            {
                out.push(Err(e.clone()));
                continue;
            }
            let mut r = commit(it.clone()).await;
            if matches!(&r, Err(e) if !passing(e)) {
                r = commit(it.clone()).await;
            }
            out.push(r);
        }
        out
    }
}
