//! Keeping L2 (Redis) in step with L3.
//!
//! After every L3 batch the applier writes the same versions to Redis in one
//! pipeline, together with the state sets and the Merkle mirror of the entries
//! Redis holds (`L2Route::Mirror` ones). The engine keeps that tree in memory;
//! when a pipeline fails, or Redis was unreachable, L2 is marked stale and the
//! next resync repairs it: scan what Redis really holds, compare its tree with
//! L3's mirrored view, and rewrite only the buckets that differ. Resync runs at
//! start (`EngineState::SyncingRedis`) and whenever Redis answers again after
//! an outage. Reads verify what Redis returns against its hash and fall back to
//! L3 (and repair the key) when it does not match.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use syncnode_protocol::MerkleTree;

use super::Core;
use super::entry::EntryMeta;
use super::error::StorageError;
use super::item::SyncItem;
use super::l2::{RedisStore, StateMove, StateSets, all_mirror_nodes, mirror_nodes};
use super::metrics::EngineMetrics;
use super::options::L2Route;
use super::search::SearchRegistry;
use crate::locks::{MutexUnpoisoned, RwLockUnpoisoned};

/// Reads from Redis give up after this, so a hung Redis cannot stall a read.
const L2_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// The L2 mirror: what the engine knows of Redis (up, stale, the tree of
/// what it holds), and the writes that keep it in step with L3.
pub(crate) struct L2Mirror {
    /// Redis answered the last call.
    pub up: AtomicBool,
    /// Redis may hold something else than the mirror tree says: resync needed.
    pub stale: AtomicBool,
    /// The tree of mirrored entries as Redis holds them.
    pub tree: Mutex<MerkleTree>,
    pub repaired: AtomicU64,
}

impl L2Mirror {
    pub fn new(depth: u8) -> Self {
        Self {
            up: AtomicBool::new(false),
            stale: AtomicBool::new(true),
            tree: Mutex::new(MerkleTree::without_sketch(depth).expect("depth checked")),
            repaired: AtomicU64::new(0),
        }
    }

    pub(crate) fn usable(&self) -> bool {
        self.up.load(Ordering::Relaxed) && !self.stale.load(Ordering::Relaxed)
    }

    pub(crate) fn failed(&self, e: &StorageError) {
        if matches!(e, StorageError::Connection(_)) {
            self.up.store(false, Ordering::Relaxed);
        }
        self.stale.store(true, Ordering::Relaxed);
    }
}

/// The outcome of a Redis read.
pub(crate) enum L2Read {
    Hit(Box<SyncItem>),
    Miss,
    /// Redis is down or the key is corrupt: read L3 (and repair, if corrupt).
    Unusable {
        repair: bool,
    },
}

/// The state-set change for writing `it` over `old`.
fn state_move(old: Option<&EntryMeta>, it: &SyncItem) -> StateMove {
    StateMove {
        from: old.filter(|o| !o.tombstone).map(|o| o.state.clone()),
        to: (!it.tombstone && it.route != L2Route::Skip).then(|| it.state.clone()),
    }
}

impl L2Mirror {
    /// Writes what an L3 batch wrote to Redis, with state sets, search
    /// documents and mirror nodes. Caller holds `apply_lock`.
    pub(crate) async fn mirror(
        &self,
        l2: &RedisStore,
        search: &SearchRegistry,
        items: &[SyncItem],
        written: &[(usize, Option<EntryMeta>)],
    ) {
        if !self.usable() {
            self.stale.store(true, Ordering::Relaxed);
            return;
        }
        let mut pipe = redis::pipe();
        let mut states = StateSets::default();
        let nodes = {
            let mut tree = self.tree.locked();
            let mut buckets = BTreeSet::new();
            for (i, old) in written {
                let it = &items[*i];
                l2.queue_put(&mut pipe, it, it.route, false);
                states.note(&it.object_id, &state_move(old.as_ref(), it));
                search.queue_docs(l2, &mut pipe, it);
                if let Some(o) = old.as_ref().filter(|o| o.l2) {
                    tree.remove(&o.digest());
                }
                if it.route == L2Route::Mirror {
                    tree.insert(&it.digest());
                }
                buckets.insert(tree.bucket_path(&it.object_id));
            }
            mirror_nodes(&tree, &buckets)
        };
        states.queue(l2, &mut pipe);
        l2.queue_mirror(&mut pipe, &nodes);
        if let Err(e) = l2.run(&pipe, "mirror batch").await {
            tracing::warn!(error = %e, "redis write failed; L2 will be resynced from L3");
            self.failed(&e);
        }
    }

    /// Removes deleted cache-only items from Redis: the key, its state-set
    /// entry and its search documents (L3 never held them).
    pub(crate) async fn remove_cache_only(
        &self,
        l2: &RedisStore,
        search: &SearchRegistry,
        items: &[SyncItem],
    ) -> Result<(), StorageError> {
        let mut pipe = redis::pipe();
        let mut states = StateSets::default();
        for it in items {
            pipe.del(l2.item_key(&it.object_id)).ignore();
            states.note(
                &it.object_id,
                &StateMove {
                    from: Some(it.state.clone()),
                    to: None,
                },
            );
            search.queue_docs(l2, &mut pipe, &SyncItem::tombstone(it.object_id.clone()));
        }
        states.queue(l2, &mut pipe);
        l2.run(&pipe, "cache-only delete").await.inspect_err(|e| self.failed(e))
    }

    /// Takes `id` out of `state`'s Redis set (a cache-only item that moved).
    pub(crate) async fn leave_state_set(&self, l2: &RedisStore, id: &str, state: &str) -> Result<(), StorageError> {
        let mut pipe = redis::pipe();
        let mut states = StateSets::default();
        states.note(
            id,
            &StateMove {
                from: Some(state.to_string()),
                to: None,
            },
        );
        states.queue(l2, &mut pipe);
        l2.run(&pipe, "cache-only state move")
            .await
            .inspect_err(|e| self.failed(e))
    }

    /// Stores a cache-only item (not in L3) in Redis.
    pub(crate) async fn put_cache_only(
        &self,
        l2: &RedisStore,
        search: &SearchRegistry,
        items: &[SyncItem],
    ) -> Result<(), StorageError> {
        let mut pipe = redis::pipe();
        let mut states = StateSets::default();
        for it in items {
            l2.queue_put(&mut pipe, it, it.route, true);
            states.note(
                &it.object_id,
                &StateMove {
                    from: None,
                    to: Some(it.state.clone()),
                },
            );
            search.queue_docs(l2, &mut pipe, it);
        }
        states.queue(l2, &mut pipe);
        l2.run(&pipe, "cache-only write").await.inspect_err(|e| self.failed(e))
    }

    /// Reads `id` from Redis when it is usable.
    pub(crate) async fn get(&self, l2: &RedisStore, id: &str, metrics: &EngineMetrics) -> L2Read {
        // A stale Redis may hold versions from before an outage: do not read it.
        if !self.usable() {
            return L2Read::Unusable { repair: false };
        }
        match tokio::time::timeout(L2_READ_TIMEOUT, l2.get(id)).await {
            Ok(Ok(Some(it))) => L2Read::Hit(Box::new(it)),
            Ok(Ok(None)) => L2Read::Miss,
            Ok(Err(StorageError::Corruption { id, expected, actual })) => {
                tracing::warn!(%id, %expected, %actual, "corrupt redis entry; reading L3 and repairing");
                metrics.corruption_detected.fetch_add(1, Ordering::Relaxed);
                L2Read::Unusable { repair: true }
            }
            Ok(Err(e)) => {
                self.failed(&e);
                L2Read::Unusable { repair: false }
            }
            Err(_) => {
                self.failed(&StorageError::Connection("redis read timed out".into()));
                L2Read::Unusable { repair: false }
            }
        }
    }

    /// Puts an L3 version back into Redis (after a miss or a corrupt entry).
    pub(crate) async fn write_back(&self, l2: &RedisStore, item: &SyncItem) {
        if item.route != L2Route::Mirror || !self.usable() {
            return;
        }
        let mut pipe = redis::pipe();
        l2.queue_put(&mut pipe, item, item.route, false);
        let mut states = StateSets::default();
        states.note(&item.object_id, &state_move(None, item));
        states.queue(l2, &mut pipe);
        if let Err(e) = l2.run(&pipe, "write back").await {
            self.failed(&e);
        }
    }

    /// Makes Redis hold exactly L3's mirrored entries: scans Redis, compares
    /// trees, rewrites the differing buckets from L3, rewrites the mirror.
    /// Returns how many keys were rewritten or removed.
    /// `verify_content` also hashes every stored content (done at start).
    pub(crate) async fn resync(&self, core: &Core, verify_content: bool) -> Result<u64, StorageError> {
        let b = core.backends()?;
        let Some(l2) = &b.l2 else { return Ok(0) };
        let _guard = core.apply_lock.lock().await;
        let result = self.resync_locked(core, l2, verify_content).await;
        match &result {
            Ok(n) => {
                self.up.store(true, Ordering::Relaxed);
                self.stale.store(false, Ordering::Relaxed);
                self.repaired.fetch_add(*n, Ordering::Relaxed);
                if *n > 0 {
                    tracing::info!(repaired = n, "redis resynced from L3");
                }
            }
            Err(e) => self.failed(e),
        }
        result
    }

    async fn resync_locked(&self, core: &Core, l2: &RedisStore, verify_content: bool) -> Result<u64, StorageError> {
        let b = core.backends()?;
        core.search.ensure_indexes(core, l2).await?;
        let view = core.merkle.read_locked().l2view.clone();
        let (entries, bad) = l2.scan_entries(verify_content).await?;
        let mut actual = MerkleTree::without_sketch(view.depth()).expect("same depth");
        let mut held: HashMap<String, HashMap<String, EntryMeta>> = HashMap::new();
        for e in entries {
            actual.insert(&e.digest());
            held.entry(actual.bucket_path(&e.id))
                .or_default()
                .insert(e.id.clone(), e);
        }
        let mut repaired = bad.len() as u64;
        let mut pipe = redis::pipe();
        for id in &bad {
            pipe.del(l2.item_key(id)).ignore();
        }
        for bucket in view.diff(&actual) {
            let expected: Vec<EntryMeta> =
                b.l3.entries_under(&bucket, usize::MAX >> 1)
                    .await?
                    .into_iter()
                    .filter(|m| m.l2)
                    .collect();
            let have = held.remove(&bucket).unwrap_or_default();
            let wanted: HashSet<&str> = expected.iter().map(|m| m.id.as_str()).collect();
            for (id, h) in &have {
                if !wanted.contains(id.as_str()) {
                    pipe.del(l2.item_key(id)).ignore();
                    if !h.tombstone {
                        pipe.srem(l2.state_key(&h.state), id).ignore();
                    }
                    repaired += 1;
                }
            }
            let stale: Vec<&str> = expected
                .iter()
                .filter(|m| have.get(&m.id) != Some(*m))
                .map(|m| m.id.as_str())
                .collect();
            for chunk in stale.chunks(500) {
                let mut states = StateSets::default();
                for it in b.l3.get_many(chunk).await? {
                    l2.queue_put(&mut pipe, &it, L2Route::Mirror, false);
                    let from = have
                        .get(&it.object_id)
                        .filter(|h| !h.tombstone)
                        .map(|h| h.state.clone());
                    states.note(
                        &it.object_id,
                        &StateMove {
                            from,
                            to: (!it.tombstone).then(|| it.state.clone()),
                        },
                    );
                    core.search.queue_docs(l2, &mut pipe, &it);
                    repaired += 1;
                }
                states.queue(l2, &mut pipe);
                l2.run(&pipe, "resync").await?;
                pipe = redis::pipe();
            }
        }
        l2.queue_mirror_reset(&mut pipe);
        for chunk in all_mirror_nodes(&view).chunks(4096) {
            l2.queue_mirror(&mut pipe, chunk);
        }
        l2.run(&pipe, "resync mirror").await?;
        *self.tree.locked() = view;
        Ok(repaired)
    }

    /// Called every second (and at start, with `verify_content`): when Redis
    /// is down or stale and answers, resync it.
    pub(crate) async fn watch(&self, core: &Core, verify_content: bool) {
        let Ok(b) = core.backends() else { return };
        let Some(l2) = &b.l2 else { return };
        if self.usable() {
            return;
        }
        if l2.ping().await.is_err() {
            self.up.store(false, Ordering::Relaxed);
            return;
        }
        self.up.store(true, Ordering::Relaxed);
        if let Err(e) = self.resync(core, verify_content).await {
            tracing::warn!(error = %e, "redis resync failed; will retry");
        }
    }

    /// `(mirror root in Redis, root of L3's mirrored view)` as hex.
    pub(crate) async fn roots(&self, core: &Core) -> (Option<String>, Option<String>) {
        let view = core.merkle.read_locked().l2view.root_hash().map(hex::encode);
        let redis = match core.backends().ok().and_then(|b| b.l2.clone()) {
            Some(l2) => tokio::time::timeout(L2_READ_TIMEOUT, l2.mirror_root())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
            None => None,
        };
        (redis, view)
    }
}
