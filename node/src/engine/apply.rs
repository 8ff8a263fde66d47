//! Remote apply: versions from peers keep their stamp; last-writer-wins
//! against what is pending or stored, clock-skew deferral, the purge
//! ledger's veto, and the HLC's receive rule.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::entry::EntryMeta;
use super::item::{self, now_ms, validate_remote};
use super::{AckMode, StorageError, SyncEngine, SyncItem, validate_id};

use crate::locks::MutexUnpoisoned;

impl SyncEngine {
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
                let mut hlc = self.core.hlc.locked();
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
                .filter(|id| id.starts_with(item::RESERVED))
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
    pub(super) fn l1_entries(&self, ids: &[&str]) -> HashMap<String, EntryMeta> {
        ids.iter()
            .filter_map(|id| Some((id.to_string(), EntryMeta::of(&self.core.l1.get(id)?))))
            .collect()
    }

    /// The versions we hold of `ids` (tombstones included): L1 first, then
    /// one L3 lookup for the ids the filter does not rule out.
    pub(super) async fn current_entries(&self, ids: &[&str]) -> Result<HashMap<String, EntryMeta>, StorageError> {
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
}
