//! An in-memory store that speaks the anti-entropy protocol: the stand-in for
//! a node's engine in the simulator, the protocol tests and the reconcile
//! benchmark. Keeps one version per id (last writer wins), the Merkle tree
//! over them, a hybrid logical clock (remote versions too far ahead are
//! deferred, as the engine does) and a purge ledger with the engine's rule:
//! a version that a purged delete beats is refused and the tombstone put
//! back. Time is whatever `now_ms` the owner sets.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::hlc::Hlc;
use crate::merkle::{MerkleTree, key_of};
use crate::replica::Store;
use crate::session::{Progress, Session, Step, root_announcement, take_within_budget};
use crate::wire::{Entry, PurgedEntry, Request, Response, RootsAnnouncement, WireItem};

#[derive(Debug, Clone)]
pub struct MemoryStore {
    pub items: BTreeMap<String, WireItem>,
    /// Each entry by the SHA-256 of its id (its tree key), so the entries
    /// under a tree path are one range.
    by_key: BTreeMap<[u8; 32], Entry>,
    pub tree: MerkleTree,
    /// Purged deletes by id.
    pub purged: BTreeMap<String, PurgedEntry>,
    /// When each tombstone was written here (ms): purge waits a grace after.
    tombstone_written: BTreeMap<String, u64>,
    pub hlc: Hlc,
    /// This store's wall clock (ms), set by its owner.
    pub now_ms: u64,
    pub max_skew_ms: u64,
    /// The origin of local writes.
    pub node: String,
    /// Remote versions deferred for being too far ahead of our clock.
    pub deferred: u64,
    /// Versions refused because their delete was purged.
    pub resurrections_refused: u64,
    /// When set, every version stored is noted here (the simulator's
    /// visibility checker drains it).
    pub journal: Option<Vec<Entry>>,
}

/// The keys under the tree path `path` (hex nibbles): from the path padded
/// with zeros to the next path of the same length (`None` past the last).
fn key_range(path: &str) -> Option<([u8; 32], Option<[u8; 32]>)> {
    if path.len() > 64 {
        return None;
    }
    let mut low = [0u8; 32];
    for (i, c) in path.chars().enumerate() {
        let nibble = c.to_digit(16)? as u8;
        low[i / 2] |= if i % 2 == 0 { nibble << 4 } else { nibble };
    }
    // Add one at the path's last nibble, carrying leftwards.
    let mut high = low;
    for i in (0..path.len()).rev() {
        let shift = if i % 2 == 0 { 4 } else { 0 };
        let nibble = (high[i / 2] >> shift) & 0xf;
        high[i / 2] &= !(0xf << shift);
        if nibble < 0xf {
            high[i / 2] |= (nibble + 1) << shift;
            return Some((low, Some(high)));
        }
    }
    Some((low, None))
}

/// The content hash of a tombstone (no content).
pub fn tombstone_hash() -> [u8; 32] {
    Sha256::digest([]).into()
}

/// An item for tests and benchmarks (its content names its id and version).
pub fn sample_item(id: &str, version: u64, origin: &str, tombstone: bool) -> WireItem {
    let content = if tombstone {
        vec![]
    } else {
        format!("{id}@{version}").into_bytes()
    };
    let content_hash = if tombstone {
        tombstone_hash()
    } else {
        Sha256::digest(&content).into()
    };
    WireItem {
        entry: Entry {
            id: id.into(),
            version,
            origin: origin.into(),
            tombstone,
            content_hash,
        },
        updated_at: 0,
        state: "default".into(),
        json: false,
        content,
        media_type: None,
    }
}

impl MemoryStore {
    /// Two stores sharing `shared` items (`id{i}`), then each `(kind, i)` of
    /// `diffs` makes one difference: newer on a / on b (kinds 0, 1), deleted on
    /// a / on b (2, 3), new on a / on b (4, 5), so both sides have missing,
    /// newer and deleted items.
    pub fn diverged_pair(depth: u8, shared: usize, diffs: &[(u8, usize)]) -> (MemoryStore, MemoryStore) {
        let mut a = MemoryStore::new(depth);
        for i in 0..shared {
            a.put(sample_item(&format!("id{i}"), 10, "n0", false));
        }
        let mut b = a.clone();
        for &(kind, i) in diffs {
            let id = format!("id{}", i % (shared + 50));
            match kind % 6 {
                0 => drop(a.put(sample_item(&id, 20, "na", false))),
                1 => drop(b.put(sample_item(&id, 20, "nb", false))),
                2 => drop(a.put(sample_item(&id, 30, "na", true))),
                3 => drop(b.put(sample_item(&id, 30, "nb", true))),
                4 => drop(a.put(sample_item(&format!("new-a{i}"), 5, "na", false))),
                _ => drop(b.put(sample_item(&format!("new-b{i}"), 5, "nb", false))),
            }
        }
        (a, b)
    }

    pub fn new(depth: u8) -> Self {
        Self {
            items: BTreeMap::new(),
            by_key: BTreeMap::new(),
            tree: MerkleTree::new(depth).expect("valid depth"),
            purged: BTreeMap::new(),
            tombstone_written: BTreeMap::new(),
            hlc: Hlc::default(),
            now_ms: 0,
            max_skew_ms: 500,
            node: "memory".into(),
            deferred: 0,
            resurrections_refused: 0,
            journal: None,
        }
    }

    /// A local write (`None`: a delete), stamped by our clock; the stored item.
    pub fn write(&mut self, id: &str, content: Option<Vec<u8>>) -> WireItem {
        let version = self.hlc.now(self.now_ms);
        let (tombstone, content_hash, content) = match content {
            Some(c) => (false, Sha256::digest(&c).into(), c),
            None => (true, tombstone_hash(), Vec::new()),
        };
        let item = WireItem {
            entry: Entry {
                id: id.into(),
                version,
                origin: self.node.clone(),
                tombstone,
                content_hash,
            },
            updated_at: self.now_ms as i64,
            state: "default".into(),
            json: false,
            content,
            media_type: None,
        };
        self.put(item.clone());
        item
    }

    /// Applies an item from a peer: its hash checked, deferred when its
    /// version is too far ahead of our clock, refused (and the tombstone put
    /// back) when a purged delete beats it. Returns whether it was stored.
    pub fn apply_remote(&mut self, it: WireItem) -> bool {
        let hash: [u8; 32] = if it.entry.tombstone {
            tombstone_hash()
        } else {
            Sha256::digest(&it.content).into()
        };
        if hash != it.entry.content_hash {
            return false;
        }
        if self
            .hlc
            .observe(it.entry.version, self.now_ms, self.max_skew_ms)
            .is_err()
        {
            self.deferred += 1;
            return false;
        }
        if let Some(p) = self.purged.get(&it.entry.id) {
            let dead = Entry {
                id: p.id.clone(),
                version: p.version,
                origin: p.origin.clone(),
                tombstone: true,
                content_hash: tombstone_hash(),
            };
            // The purged tombstone itself, from a peer yet to purge it: not
            // stored again (it would only be purged again) — unless we hold
            // an older version, which it beats like any newer write.
            if dead == it.entry {
                let older_held = self.items.get(&dead.id).is_some_and(|c| dead.newer_than(&c.entry));
                return older_held && self.put(it);
            }
            if dead.newer_than(&it.entry) {
                self.resurrections_refused += 1;
                let current = self.items.get(&dead.id).map(|i| i.entry.clone());
                if current.is_none_or(|c| dead.newer_than(&c)) {
                    self.put(WireItem {
                        entry: dead,
                        updated_at: self.now_ms as i64,
                        state: "default".into(),
                        json: false,
                        content: Vec::new(),
                        media_type: None,
                    });
                }
                return false;
            }
        }
        self.put(it)
    }

    /// Purges up to `max` tombstones stamped below `below` and written here
    /// before `written_before` (ms), recording each in the purge ledger.
    pub fn purge(&mut self, below: u64, written_before: u64, max: usize) -> u64 {
        let victims: Vec<Entry> = self
            .items
            .values()
            .filter(|i| i.entry.tombstone && i.entry.version < below)
            .filter(|i| {
                self.tombstone_written
                    .get(&i.entry.id)
                    .is_none_or(|t| *t < written_before)
            })
            .take(max)
            .map(|i| i.entry.clone())
            .collect();
        for e in &victims {
            self.tree.remove(&e.digest());
            self.items.remove(&e.id);
            self.by_key.remove(&key_of(&e.id));
            self.tombstone_written.remove(&e.id);
            self.purged.insert(
                e.id.clone(),
                PurgedEntry {
                    id: e.id.clone(),
                    version: e.version,
                    origin: e.origin.clone(),
                    purged_at_ms: self.now_ms as i64,
                },
            );
        }
        victims.len() as u64
    }

    /// Takes in a peer's purge records (the newer one per id wins).
    pub fn import_ledger(&mut self, entries: Vec<PurgedEntry>) -> u64 {
        let mut new = 0;
        for e in entries {
            let keep = self
                .purged
                .get(&e.id)
                .is_none_or(|old| (e.version, e.origin.as_bytes()) > (old.version, old.origin.as_bytes()));
            if keep {
                new += 1;
                let purged_at_ms = e.purged_at_ms.min(self.now_ms as i64);
                self.purged.insert(e.id.clone(), PurgedEntry { purged_at_ms, ..e });
            }
        }
        new
    }

    /// Stores `it` if it wins over the stored version; returns whether it did.
    pub fn put(&mut self, it: WireItem) -> bool {
        if let Some(old) = self.items.get(&it.entry.id) {
            if !it.entry.newer_than(&old.entry) {
                return false;
            }
            self.tree.remove(&old.entry.digest());
        }
        if it.entry.tombstone {
            self.tombstone_written.insert(it.entry.id.clone(), self.now_ms);
        } else {
            self.tombstone_written.remove(&it.entry.id);
        }
        self.hlc = Hlc::new(self.hlc.last().max(it.entry.version));
        if let Some(j) = self.journal.as_mut() {
            j.push(it.entry.clone());
        }
        self.tree.insert(&it.entry.digest());
        self.by_key.insert(key_of(&it.entry.id), it.entry.clone());
        self.items.insert(it.entry.id.clone(), it);
        true
    }

    /// The entries whose tree key starts with the hex nibbles of `path`
    /// (none for a path that is not hex).
    pub fn entries_under(&self, path: &str) -> Vec<Entry> {
        let Some((low, high)) = key_range(path) else {
            return Vec::new();
        };
        let high = high.map_or(Bound::Unbounded, Bound::Excluded);
        self.by_key
            .range((Bound::Included(low), high))
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The entries whose tree keys start with each of `keys`.
    pub fn entries_by_keys(&self, keys: &[[u8; 8]]) -> Vec<Vec<Entry>> {
        keys.iter()
            .map(|k| {
                let mut low = [0u8; 32];
                low[..8].copy_from_slice(k);
                self.by_key
                    .range(low..)
                    .take_while(|(key, _)| key[..8] == k[..])
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .collect()
    }

    /// The responder side (the core's, over this store).
    pub fn answer(&mut self, req: Request) -> Response {
        // The store moves into the lock for the call; what stands in for it
        // meanwhile has the smallest tree (a full-depth one costs megabytes).
        let shared = Mutex::new(std::mem::replace(self, MemoryStore::new(1)));
        let resp = crate::replica::run_ready(crate::replica::store::answer(&shared, req));
        *self = shared.into_inner().expect("store lock");
        resp
    }

    /// Runs a whole session that walks the trees from `self` against
    /// `peer`; `observe` sees every request and response (to count bytes).
    pub fn reconcile_with(&mut self, peer: &mut MemoryStore, observe: impl FnMut(&Request, &Response)) -> Progress {
        self.run_session(Session::new(1, self.tree.depth()), peer, observe)
    }

    /// `reconcile_with`, in the rateless mode.
    pub fn reconcile_rateless(&mut self, peer: &mut MemoryStore, observe: impl FnMut(&Request, &Response)) -> Progress {
        self.run_session(Session::rateless(1, self.tree.depth()), peer, observe)
    }

    /// Runs `s` (already under way) to its end against `peer`.
    pub fn run_session_from(&mut self, s: Session, peer: &mut MemoryStore) -> Progress {
        self.run_session(s, peer, |_, _| {})
    }

    fn run_session(
        &mut self,
        mut s: Session,
        peer: &mut MemoryStore,
        mut observe: impl FnMut(&Request, &Response),
    ) -> Progress {
        loop {
            match s.next_step(&self.tree) {
                Step::NeedLocalItems(ids) => {
                    let items = ids.iter().filter_map(|id| self.items.get(id).cloned()).collect();
                    s.on_local_items(items);
                }
                Step::Send(req) => {
                    let resp = peer.answer(req.clone());
                    observe(&req, &resp);
                    match s.on_response(resp, &self.tree) {
                        Ok(Some(items)) => {
                            for it in items {
                                self.put(it);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => panic!("in-memory peers never disagree on the protocol: {e}"),
                    }
                }
                Step::NeedLocalEntries(paths) => {
                    let local = paths.iter().map(|p| (p.clone(), self.entries_under(p))).collect();
                    s.on_local_entries(local);
                }
                Step::NeedLocalKeys(keys) => s.on_local_keyed(self.entries_by_keys(&keys).concat()),
                Step::Waiting => unreachable!("each step is answered in turn"),
                Step::Done => return s.progress(),
            }
        }
    }
}

/// The simulator's store: the in-memory store behind a lock, its futures
/// ready at once.
impl Store for Mutex<MemoryStore> {
    type Error = String;

    fn with_tree<R>(&self, f: impl FnOnce(&MerkleTree) -> R) -> R {
        f(&self.lock().expect("store lock").tree)
    }

    fn root_announcement(&self) -> RootsAnnouncement {
        let s = self.lock().expect("store lock");
        root_announcement(&s.tree, &s.node, s.hlc.last())
    }

    fn definitely_missing(&self, id: &str) -> bool {
        let s = self.lock().expect("store lock");
        !s.items.contains_key(id) && !s.purged.contains_key(id)
    }

    fn is_current(
        &self,
        id: &str,
        content_hash: &[u8; 32],
    ) -> impl std::future::Future<Output = Result<bool, String>> + Send {
        let s = self.lock().expect("store lock");
        std::future::ready(Ok(s
            .items
            .get(id)
            .is_some_and(|i| i.entry.content_hash == *content_hash)))
    }

    fn current(&self, id: &str) -> impl std::future::Future<Output = Result<Option<Entry>, String>> + Send {
        let s = self.lock().expect("store lock");
        std::future::ready(Ok(s.items.get(id).map(|i| i.entry.clone())))
    }

    fn entries_under(
        &self,
        paths: &[String],
    ) -> impl std::future::Future<Output = Result<Vec<(String, Vec<Entry>)>, String>> + Send {
        let s = self.lock().expect("store lock");
        std::future::ready(Ok(paths.iter().map(|p| (p.clone(), s.entries_under(p))).collect()))
    }

    fn entries_by_keys(
        &self,
        keys: &[[u8; 8]],
    ) -> impl std::future::Future<Output = Result<Vec<Vec<Entry>>, String>> + Send {
        std::future::ready(Ok(self.lock().expect("store lock").entries_by_keys(keys)))
    }

    fn items_within(
        &self,
        ids: &[String],
        _budget: usize,
    ) -> impl std::future::Future<Output = Result<(Vec<WireItem>, Vec<String>), String>> + Send {
        let s = self.lock().expect("store lock");
        let mut found: std::collections::VecDeque<WireItem> =
            ids.iter().filter_map(|id| s.items.get(id).cloned()).collect();
        let items = take_within_budget(&mut found);
        std::future::ready(Ok((items, found.into_iter().map(|i| i.entry.id).collect())))
    }

    fn apply(&self, items: Vec<WireItem>) -> impl std::future::Future<Output = Result<u64, String>> + Send {
        let mut s = self.lock().expect("store lock");
        let applied = items.into_iter().map(|i| s.apply_remote(i) as u64).sum();
        std::future::ready(Ok(applied))
    }

    fn ledger_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<(Vec<PurgedEntry>, Option<String>), String>> + Send {
        let s = self.lock().expect("store lock");
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        let page: Vec<PurgedEntry> = s
            .purged
            .range((start, std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect();
        let next = (page.len() == limit)
            .then(|| page.last().map(|e| e.id.clone()))
            .flatten();
        std::future::ready(Ok((page, next)))
    }

    fn import_ledger(
        &self,
        entries: Vec<PurgedEntry>,
    ) -> impl std::future::Future<Output = Result<u64, String>> + Send {
        let n = self.lock().expect("store lock").import_ledger(entries);
        std::future::ready(Ok(n))
    }

    fn purge(
        &self,
        below: u64,
        written_before_ms: u64,
        max: usize,
    ) -> impl std::future::Future<Output = Result<u64, String>> + Send {
        let n = self.lock().expect("store lock").purge(below, written_before_ms, max);
        std::future::ready(Ok(n))
    }

    fn prune_ledger(&self, retention_ms: u64) -> impl std::future::Future<Output = Result<u64, String>> + Send {
        let mut s = self.lock().expect("store lock");
        let before = s.now_ms.saturating_sub(retention_ms) as i64;
        let n = s.purged.len();
        s.purged.retain(|_, e| e.purged_at_ms >= before);
        std::future::ready(Ok((n - s.purged.len()) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_ranges_cover_a_path_and_stop_at_the_next() {
        assert_eq!(key_range(""), Some(([0; 32], None)));
        assert_eq!(key_range("xy"), None);
        let (low, high) = key_range("1ff").unwrap();
        assert_eq!((low[0], low[1]), (0x1f, 0xf0));
        assert_eq!(high.map(|h| (h[0], h[1])), Some((0x20, 0x00)));
        assert_eq!(key_range("ff").unwrap().1, None);
    }

    proptest! {
        #[test]
        fn entries_under_a_path_are_those_whose_hex_key_starts_with_it(
            ids in proptest::collection::btree_set("[a-z]{1,6}", 0..200),
            path in "[0-9a-f]{0,3}",
        ) {
            let mut store = MemoryStore::new(4);
            for id in &ids {
                store.put(sample_item(id, 1, "n", false));
            }
            let mut got: Vec<String> = store.entries_under(&path).into_iter().map(|e| e.id).collect();
            got.sort();
            let want: Vec<String> = ids
                .iter()
                .filter(|id| hex::encode(key_of(id)).starts_with(&path))
                .cloned()
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
