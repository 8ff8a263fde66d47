//! The existence filter over L3 ids (tombstones included).
//!
//! A scalable cuckoo filter: it grows instead of failing when full. The engine
//! inserts an id exactly once, when it first reaches L3, and never removes one:
//! `scalable_cuckoo_filter` 0.5's `remove` can take another id's fingerprint
//! from an older, smaller sub-filter once the filter has grown, which is a false
//! negative (found by the test below when it removed ids). A purged row leaves
//! its id behind as a false positive until the next rebuild from L3. While
//! `Untrusted` (after a crash, before a rebuild) the filter answers nothing.

use scalable_cuckoo_filter::{ScalableCuckooFilter, ScalableCuckooFilterBuilder};
use serde::{Deserialize, Serialize};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::error::StorageError;
use crate::locks::RwLockUnpoisoned;

/// The filter's kick RNG. The crate's default (`ThreadRng`) is not `Send`; the
/// choice of which entry to kick needs no quality, so a splitmix64 does.
#[derive(Debug, Clone, Default)]
pub struct KickRng(u64);

impl rand_core_09::RngCore for KickRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The filter type: ids hashed with the crate's fixed-key SipHash, so a
/// serialized filter means the same after a restart.
pub type IdFilter = ScalableCuckooFilter<str, scalable_cuckoo_filter::DefaultHasher, KickRng>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterTrust {
    Untrusted,
    Trusted,
}

const FALSE_POSITIVE_RATE: f64 = 0.001;

pub struct FilterManager {
    filter: RwLock<IdFilter>,
    trusted: AtomicBool,
}

impl std::fmt::Debug for FilterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterManager")
            .field("len", &self.len())
            .field("trust", &self.trust_state())
            .finish()
    }
}

impl FilterManager {
    pub fn new(initial_capacity: usize) -> Self {
        Self {
            filter: RwLock::new(Self::empty_filter(initial_capacity)),
            trusted: AtomicBool::new(false),
        }
    }

    pub fn trust_state(&self) -> FilterTrust {
        if self.trusted.load(Ordering::Acquire) {
            FilterTrust::Trusted
        } else {
            FilterTrust::Untrusted
        }
    }

    pub fn is_trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
    }

    pub fn mark_trusted(&self) {
        self.trusted.store(true, Ordering::Release);
    }

    pub fn mark_untrusted(&self) {
        self.trusted.store(false, Ordering::Release);
    }

    /// `Some(false)` only when trusted and the id is surely absent; `None` while untrusted.
    pub fn might_exist(&self, id: &str) -> Option<bool> {
        if !self.is_trusted() {
            return None;
        }
        Some(self.read().contains(id))
    }

    /// Adds an id that just reached L3 for the first time.
    pub fn insert(&self, id: &str) {
        self.write().insert(id);
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(entries, capacity, trust)`.
    pub fn stats(&self) -> (usize, usize, FilterTrust) {
        let f = self.read();
        (f.len(), f.capacity(), self.trust_state())
    }

    pub fn memory_usage_bytes(&self) -> usize {
        (self.read().bits() / 8) as usize
    }

    /// Replaces the contents (after a rebuild or snapshot load); trust is set by the caller.
    pub fn replace(&self, filter: IdFilter) {
        *self.write() = filter;
    }

    /// A fresh, empty filter sized for `capacity` ids.
    pub fn empty_filter(capacity: usize) -> IdFilter {
        ScalableCuckooFilterBuilder::new()
            .initial_capacity(capacity.max(1024))
            .false_positive_probability(FALSE_POSITIVE_RATE)
            .rng(KickRng::default())
            .finish()
    }

    pub fn export(&self) -> Result<Vec<u8>, StorageError> {
        postcard::to_stdvec(&*self.read()).map_err(|e| StorageError::backend("filter export", e))
    }

    pub fn import(bytes: &[u8]) -> Result<IdFilter, StorageError> {
        postcard::from_bytes(bytes).map_err(|e| StorageError::backend("filter import", e))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, IdFilter> {
        self.filter.read_locked()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, IdFilter> {
        self.filter.write_locked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_says_nothing_and_trusted_has_no_false_negatives() {
        let f = FilterManager::new(16);
        f.insert("a");
        assert_eq!(f.might_exist("a"), None);
        f.mark_trusted();
        // Well past the initial capacity, so the filter grows several times.
        for i in 0..200_000 {
            f.insert(&format!("id-{i}"));
        }
        for i in 0..200_000 {
            assert_eq!(
                f.might_exist(&format!("id-{i}")),
                Some(true),
                "false negative for id-{i}"
            );
        }
        let false_positives = (0..100_000)
            .filter(|i| f.might_exist(&format!("other-{i}")) == Some(true))
            .count();
        assert!(false_positives < 1000, "{false_positives} false positives in 100k");
    }

    #[test]
    fn snapshots_round_trip() {
        let f = FilterManager::new(16);
        for i in 0..5000 {
            f.insert(&format!("k{i}"));
        }
        let g = FilterManager::new(16);
        g.replace(FilterManager::import(&f.export().unwrap()).unwrap());
        g.mark_trusted();
        for i in 0..5000 {
            assert_eq!(g.might_exist(&format!("k{i}")), Some(true));
        }
        assert!(FilterManager::import(b"garbage").is_err());
    }
}
