//! The search result cache. An entry remembers the write count of its index
//! when it was computed; any write under the index's prefix bumps that count,
//! so a cached answer is never served after the data under it changed (it is
//! counted as stale and recomputed).

use crate::locks::MutexUnpoisoned;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries kept; the oldest is dropped first.
const CAPACITY: usize = 1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub entry_count: u64,
    pub hit_rate: f64,
}

struct Entry {
    writes_seen: u64,
    ids: Vec<String>,
}

#[derive(Default)]
pub struct SearchCache {
    entries: Mutex<(HashMap<String, Entry>, VecDeque<String>)>,
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

impl SearchCache {
    /// The cached ids for `key` if computed at write count `writes`.
    pub fn get(&self, key: &str, writes: u64) -> Option<Vec<String>> {
        let mut g = self.entries.locked();
        match g.0.get(key) {
            Some(e) if e.writes_seen == writes => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.ids.clone())
            }
            Some(_) => {
                g.0.remove(key);
                self.stale.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn put(&self, key: String, writes: u64, ids: Vec<String>) {
        let mut g = self.entries.locked();
        let (map, order) = &mut *g;
        if map
            .insert(
                key.clone(),
                Entry {
                    writes_seen: writes,
                    ids,
                },
            )
            .is_none()
        {
            order.push_back(key);
        }
        while map.len() > CAPACITY {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
        order.retain(|k| map.contains_key(k));
    }

    /// Drops every entry of one index (on drop or re-create).
    pub fn forget_prefix(&self, key_prefix: &str) {
        let mut g = self.entries.locked();
        g.0.retain(|k, _| !k.starts_with(key_prefix));
        let (map, order) = &mut *g;
        order.retain(|k| map.contains_key(k));
    }

    pub fn stats(&self) -> SearchCacheStats {
        let (hits, misses) = (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed));
        let entry_count = self.entries.locked().0.len() as u64;
        SearchCacheStats {
            hits,
            misses,
            stale: self.stale.load(Ordering::Relaxed),
            entry_count,
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_misses_stale_and_capacity() {
        let c = SearchCache::default();
        assert!(c.get("a", 0).is_none());
        c.put("a".into(), 0, vec!["x".into()]);
        assert_eq!(c.get("a", 0), Some(vec!["x".to_string()]));
        assert!(c.get("a", 1).is_none(), "a write since makes it stale");
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.stale, s.entry_count), (1, 2, 1, 0));
        for i in 0..CAPACITY + 10 {
            c.put(format!("k{i}"), 0, vec![]);
        }
        assert_eq!(c.stats().entry_count as usize, CAPACITY);
        assert!(c.get("k0", 0).is_none());
        c.forget_prefix("k1");
        assert!(c.get("k1000", 0).is_none());
    }
}
