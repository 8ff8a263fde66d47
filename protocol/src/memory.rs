//! An in-memory store that speaks the anti-entropy protocol: the stand-in for
//! a node's engine in the simulator, the protocol tests and the reconcile
//! benchmark. Keeps one version per id (last writer wins) and the Merkle tree
//! over them.

use std::collections::BTreeMap;

use crate::merkle::{MerkleTree, key_of};
use crate::session::{
    Progress, Session, Step, check_request, fetch_answer, plan_round, root_announcement, round_answer,
};
use crate::wire::{Entry, EntrySummary, Request, Response, WireItem};

#[derive(Debug, Clone)]
pub struct MemoryStore {
    pub items: BTreeMap<String, WireItem>,
    /// Hex SHA-256 of each id → id, so the ids under a tree path are a range.
    by_key: BTreeMap<String, String>,
    pub tree: MerkleTree,
}

/// An item for tests and benchmarks; its hash is derived from its version.
pub fn sample_item(id: &str, version: u64, origin: &str, tombstone: bool) -> WireItem {
    let content = if tombstone {
        vec![]
    } else {
        format!("{id}@{version}").into_bytes()
    };
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&version.to_be_bytes());
    h[8] = tombstone as u8;
    WireItem {
        entry: Entry {
            id: id.into(),
            version,
            origin: origin.into(),
            tombstone,
            content_hash: h,
        },
        updated_at: 0,
        state: "default".into(),
        json: false,
        content,
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
        }
    }

    /// Stores `it` if it wins over the stored version; returns whether it did.
    pub fn put(&mut self, it: WireItem) -> bool {
        if let Some(old) = self.items.get(&it.entry.id) {
            if !it.entry.newer_than(&old.entry) {
                return false;
            }
            self.tree.remove(&old.entry.digest());
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

    /// The responder side.
    pub fn answer(&mut self, req: Request) -> Response {
        if let Err(reason) = check_request(&req, &self.tree) {
            return Response::Refused { reason };
        }
        match req {
            Request::Round { descend, list, .. } => {
                let (nodes, listed) = plan_round(&self.tree, &descend, &list);
                let lists = listed
                    .into_iter()
                    .map(|p| {
                        let e = self.entries_under(&p).iter().map(EntrySummary::of).collect();
                        (p, e)
                    })
                    .collect();
                round_answer(&self.tree, nodes, lists)
            }
            Request::Fetch { ids, .. } => {
                fetch_answer(ids.iter().filter_map(|id| self.items.get(id).cloned()).collect())
            }
            Request::Push { items, .. } => Response::Pushed {
                applied: items.into_iter().map(|i| self.put(i) as u64).sum(),
            },
            Request::Root => Response::Root(root_announcement(&self.tree, "memory", 0)),
            // This store never purges.
            Request::Ledger { .. } => Response::Ledger {
                entries: Vec::new(),
                next: None,
            },
        }
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
