//! An in-memory store that speaks the anti-entropy protocol: the stand-in for
//! a node's engine in the simulator, the protocol tests and the reconcile
//! benchmark. Keeps one version per id (last writer wins), the Merkle tree
//! over them, a hybrid logical clock (remote versions too far ahead are
//! deferred, as the engine does) and a purge ledger with the engine's rule:
//! a version that a purged delete beats is refused and the tombstone put
//! back. Time is whatever `now_ms` the owner sets.

use std::collections::BTreeMap;
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
    /// Hex SHA-256 of each id → id, so the ids under a tree path are a range.
    by_key: BTreeMap<String, String>,
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
            self.by_key.remove(&hex::encode(key_of(&e.id)));
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
        self.by_key
            .insert(hex::encode(key_of(&it.entry.id)), it.entry.id.clone());
        self.items.insert(it.entry.id.clone(), it);
        true
    }

    pub fn entries_under(&self, path: &str) -> Vec<Entry> {
        self.by_key
            .range(path.to_string()..)
            .take_while(|(k, _)| k.starts_with(path))
            .map(|(_, id)| self.items[id].entry.clone())
            .collect()
    }

    /// The responder side (the core's, over this store).
    pub fn answer(&mut self, req: Request) -> Response {
        let depth = self.tree.depth();
        let shared = Mutex::new(std::mem::replace(self, MemoryStore::new(depth)));
        let resp = crate::replica::run_ready(crate::replica::store::answer(&shared, req));
        *self = shared.into_inner().expect("store lock");
        resp
    }

    /// Runs a whole session from `self` against `peer`; `observe` sees every
    /// request and response (to count bytes).
    pub fn reconcile_with(&mut self, peer: &mut MemoryStore, mut observe: impl FnMut(&Request, &Response)) -> Progress {
        let mut s = Session::new(1, self.tree.depth());
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
