//! Reads: pending writes, then the L1 cache, Redis, the existence filter and
//! L3, in that order; multi-gets, scans by prefix and state, and where an
//! item is (`status`).

use std::future::Future;
use std::sync::atomic::Ordering;

use super::item::{validate_prefix, validate_state};
use super::l2::RedisStore;
use super::l2_mirror::L2Read;
use super::l3::Rows;
use super::{ItemStatus, L2Route, StorageError, SyncEngine, SyncItem, content_hash, validate_id};

impl SyncEngine {
    /// The live item, from L1, else L3 (promoted to L1). `None` when absent or deleted.
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        Ok(self.lookup(id).await?.filter(|it| !it.tombstone))
    }

    /// The stored version including tombstones.
    pub(super) async fn lookup(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        validate_id(id)?;
        let m = &self.core.metrics;
        if let Some(it) = self.core.l1.get(id) {
            m.reads_l1.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(it));
        }
        let b = self.core.backends()?;
        let mut repair = false;
        if let Some(l2) = &b.l2 {
            match self.core.l2_mirror.get(l2, id, &self.core.metrics).await {
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
                    self.core.l2_mirror.write_back(l2, it).await;
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
            Some(l2) if self.core.l2_mirror.up.load(Ordering::Relaxed) => {
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

    /// The live cache-only items among `ids` that `held` (what L3 and L1
    /// hold) lacks: they are in Redis only.
    pub(super) async fn cache_only_items(&self, ids: &[&str]) -> Result<Vec<SyncItem>, StorageError> {
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
    pub(super) async fn l2_reads(&self, l2: &RedisStore, ids: &[&str]) -> Vec<L2Read> {
        use futures::StreamExt;
        let mut reads = Vec::with_capacity(ids.len());
        for id in ids {
            reads.push(self.core.l2_mirror.get(l2, id, &self.core.metrics));
        }
        futures::stream::iter(reads).buffered(64).collect().await
    }
}
