//! L1: the in-memory tier.
//!
//! Two parts with different rules. `pending` holds every accepted write that is
//! not yet confirmed in L3 (in flight, or in the commit log while MySQL is
//! down); it is never evicted, and its bytes drive backpressure. `cache` is a
//! byte-bounded read cache (moka, TinyLFU eviction) that may drop anything.

use dashmap::DashMap;
use moka::sync::Cache;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::item::{SyncItem, now_ms};

struct CachedItem {
    item: SyncItem,
    hits: AtomicU64,
    last_accessed: AtomicU64,
}

pub struct L1 {
    cache: Cache<String, Arc<CachedItem>>,
    pending: DashMap<String, SyncItem>,
    pending_bytes: AtomicU64,
}

impl L1 {
    /// `cache_bytes` bounds the read cache only.
    pub fn new(cache_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(cache_bytes)
            .weigher(|k: &String, v: &Arc<CachedItem>| (k.len() + v.item.size_bytes()).min(u32::MAX as usize) as u32)
            .build();
        Self {
            cache,
            pending: DashMap::new(),
            pending_bytes: AtomicU64::new(0),
        }
    }

    /// The newest version this node holds in memory: pending first, then cache.
    pub fn get(&self, id: &str) -> Option<SyncItem> {
        if let Some(p) = self.pending.get(id) {
            return Some(p.clone());
        }
        let entry = self.cache.get(id)?;
        let hits = entry.hits.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms() as u64;
        entry.last_accessed.store(now, Ordering::Relaxed);
        let mut item = entry.item.clone();
        item.access_count = item.access_count.saturating_add(hits);
        item.last_accessed = now;
        Some(item)
    }

    pub fn get_pending(&self, id: &str) -> Option<SyncItem> {
        self.pending.get(id).map(|p| p.clone())
    }

    pub fn is_pending(&self, id: &str) -> bool {
        self.pending.contains_key(id)
    }

    pub fn in_cache(&self, id: &str) -> bool {
        self.cache.contains_key(id)
    }

    /// Records an accepted write unless a newer version is already pending.
    /// Returns whether it was recorded.
    pub fn add_pending(&self, item: SyncItem) -> bool {
        use dashmap::mapref::entry::Entry;
        let size = item.size_bytes() as u64;
        match self.pending.entry(item.object_id.clone()) {
            Entry::Occupied(mut o) => {
                if !item.stamp().wins_over(&o.get().stamp()) {
                    return false;
                }
                let old = o.get().size_bytes() as u64;
                o.insert(item);
                self.pending_bytes.fetch_add(size, Ordering::Relaxed);
                self.pending_bytes.fetch_sub(old, Ordering::Relaxed);
            }
            Entry::Vacant(v) => {
                v.insert(item);
                self.pending_bytes.fetch_add(size, Ordering::Relaxed);
            }
        }
        true
    }

    /// Called once `item` is confirmed in L3 (or lost to a newer version there):
    /// drops the pending copy if it is this version and caches the item.
    pub fn settle(&self, item: &SyncItem) {
        let removed = self.pending.remove_if(&item.object_id, |_, p| {
            p.version == item.version && p.origin == item.origin
        });
        if let Some((_, p)) = removed {
            self.pending_bytes.fetch_sub(p.size_bytes() as u64, Ordering::Relaxed);
        }
        self.cache_insert(item.clone());
    }

    /// Drops a pending write that was refused (e.g. its durable ack failed).
    pub fn forget_pending(&self, item: &SyncItem) {
        let removed = self.pending.remove_if(&item.object_id, |_, p| {
            p.version == item.version && p.origin == item.origin
        });
        if let Some((_, p)) = removed {
            self.pending_bytes.fetch_sub(p.size_bytes() as u64, Ordering::Relaxed);
        }
    }

    /// Puts an item read from a lower tier into the read cache.
    /// Never replaces a newer cached version, and skips ids with a pending
    /// write (a reader that fetched an older version before a commit must not
    /// shadow it).
    pub fn cache_insert(&self, item: SyncItem) {
        use moka::ops::compute::Op;
        if self.pending.contains_key(&item.object_id) {
            return;
        }
        self.cache
            .entry(item.object_id.clone())
            .and_compute_with(|current| match current {
                Some(c) if c.value().item.stamp().wins_over(&item.stamp()) => Op::Nop,
                _ => Op::Put(Arc::new(CachedItem {
                    hits: AtomicU64::new(0),
                    last_accessed: AtomicU64::new(item.last_accessed),
                    item,
                })),
            });
    }

    pub fn invalidate(&self, id: &str) {
        self.cache.invalidate(id);
    }

    /// Empties the read cache (pending writes stay).
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    /// Ids of pending writes starting with `prefix`.
    pub fn pending_ids_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.pending
            .iter()
            .filter(|e| e.key().starts_with(prefix))
            .map(|e| e.key().clone())
            .collect()
    }

    pub fn pending_items(&self) -> u64 {
        self.pending.len() as u64
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Relaxed)
    }

    pub fn cache_items(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn cache_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Lets moka finish its bookkeeping so the counts above are exact.
    pub fn sync_counts(&self) {
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, v: u64) -> SyncItem {
        let mut i = SyncItem::new(id, format!("v{v}").into_bytes());
        i.version = v;
        i.origin = "n".into();
        i
    }

    #[test]
    fn pending_keeps_the_newest_and_settles_only_its_own_version() {
        let l1 = L1::new(1 << 20);
        assert!(l1.add_pending(item("a", 2)));
        assert!(!l1.add_pending(item("a", 1)));
        assert_eq!(l1.get("a").unwrap().version, 2);
        l1.settle(&item("a", 1));
        assert!(l1.is_pending("a"));
        l1.settle(&item("a", 2));
        assert!(!l1.is_pending("a"));
        assert_eq!(l1.pending_bytes(), 0);
        assert_eq!(l1.get("a").unwrap().version, 2);
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_cached_one() {
        let l1 = L1::new(1 << 20);
        l1.cache_insert(item("c", 5));
        l1.cache_insert(item("c", 3));
        assert_eq!(l1.get("c").unwrap().version, 5);
        l1.cache_insert(item("c", 7));
        assert_eq!(l1.get("c").unwrap().version, 7);
    }

    #[test]
    fn cache_hits_count_accesses() {
        let l1 = L1::new(1 << 20);
        l1.cache_insert(item("b", 1));
        l1.get("b");
        assert_eq!(l1.get("b").unwrap().access_count, 2);
    }
}
