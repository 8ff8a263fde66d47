//! Items L3 refuses for good. A group commit or a commit-log drain that
//! fails for a reason other than the connection is tried again one item at
//! a time, so one bad item neither fails the writes committed with it nor
//! blocks the queue behind it. An item that fails alone, twice, is
//! quarantined: dropped from the pending writes, its caller told (durable
//! writes), and kept in a short list for `/health` and a counter.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use super::Core;
use super::error::StorageError;
use super::item::{SyncItem, now_ms};

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
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn push(&self, q: Quarantined) {
        let mut l = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == KEPT {
            l.pop_front();
        }
        l.push_back(q);
    }
}

/// Whether an error can pass (the connection, the engine's state) rather
/// than belong to the item.
pub(crate) fn passing(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::Connection(_) | StorageError::NotReady(_) | StorageError::Backpressure { .. }
    )
}

impl Core {
    /// Drops `item` from the pending writes and records why.
    pub(crate) fn quarantine(&self, item: &SyncItem, error: &StorageError) {
        tracing::error!(
            id = %item.object_id,
            version = item.version,
            %error,
            "L3 refuses this write for good: quarantined (see /health), the others go on"
        );
        self.l1.forget_pending(item);
        self.metrics.writes_quarantined.fetch_add(1, Ordering::Relaxed);
        self.quarantined.push(Quarantined {
            id: item.object_id.clone(),
            version: item.version,
            origin: item.origin.clone(),
            error: error.to_string(),
            at_ms: now_ms(),
        });
    }

    /// Commits `items` one at a time with `commit` (each tried twice): one
    /// result per item. Stops at a passing error, which the rest share.
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
