//! The anti-entropy session as a sans-IO state machine (DESIGN §5.2).
//!
//! The initiator walks the two Merkle trees level by level. Each `Round`
//! carries, for every differing node of a level at once (chunked to
//! `MAX_PATHS`), the initiator's own children of it; the peer answers only for
//! the children that differ: small ones (≤ `LIST_BELOW` entries on either side,
//! and every bucket) with their entry lists, larger ones with their summary, to
//! be descended next round. Comparing entry lists gives the ids the peer has
//! newer (pulled with `Fetch`) and those we have newer (sent with `Push`), in
//! chunks. The caller does all I/O: it sends what `next_step` says and feeds
//! back answers and local data. An isolated difference costs one round per
//! tree level below the root, then the transfer.
//!
//! A session with a peer that speaks wire version 3 starts in the rateless
//! mode instead (`rateless`): two or three round trips whatever the
//! difference, and the tree walk only when the difference is too large for
//! the coded symbols kept.
//!
//! A broken session is not resumed from a saved position: a new session starts
//! from the roots, and whatever the last one already transferred no longer
//! differs, so it picks up where the trees still disagree.

pub mod rateless;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::merkle::{FANOUT, MerkleTree};
use crate::wire::{
    ChildSummary, Descend, Entry, EntrySummary, NodeSummary, Request, Response, RootsAnnouncement, WireItem,
};

/// Nodes with at most this many entries (on either side) are listed, not descended.
pub const LIST_BELOW: u64 = 8;
/// A node we hold nothing under is listed whole when the peer has at most this many.
pub const LIST_WHOLE_BELOW: u64 = 4096;
/// Most nodes to descend in one `Round` (each carries up to 16 child summaries).
pub const MAX_PATHS: usize = 4096;
/// Most paths to list in one `Round`.
pub const MAX_LIST: usize = 8192;
/// Most entries a responder lists in one answer; children past it are answered
/// with their summary and listed in a later round.
pub const MAX_LISTED: usize = 100_000;
/// Estimated bytes of entry lists in one `Round` answer.
pub const MAX_ROUND_BYTES: usize = 3 * 1024 * 1024 + 512 * 1024;
/// Most ids or items in one `Fetch` or `Push` (4096 ids of at most 512
/// bytes stay under half the 4 MiB frame). Small items travel thousands to a
/// round trip, so a bulk transfer is a few round trips, not hundreds.
pub const MAX_ITEMS: usize = 4096;
/// Bytes (content and metadata) one `Fetch` answer or `Push` carries at most
/// (an item larger than this goes alone).
pub const MAX_TRANSFER_BYTES: usize = 2 * 1024 * 1024;

/// Wire bytes of an item, near enough for budgeting.
fn wire_size(it: &WireItem) -> usize {
    it.content.len()
        + it.entry.id.len()
        + it.entry.origin.len()
        + it.state.len()
        + it.media_type.as_ref().map_or(0, String::len)
        + 64
}

/// Splits `items` at the byte budget: the first part always holds at least one item.
pub fn take_within_budget(items: &mut VecDeque<WireItem>) -> Vec<WireItem> {
    let mut out = Vec::new();
    let mut bytes = 0;
    while let Some(next) = items.front() {
        let size = wire_size(next);
        if !out.is_empty() && (bytes + size > MAX_TRANSFER_BYTES || out.len() >= MAX_ITEMS) {
            break;
        }
        bytes += size;
        out.push(items.pop_front().expect("front exists"));
    }
    out
}

/// A responder's `Fetch` answer: the found items within the byte budget, the
/// rest deferred.
pub fn fetch_answer(found: Vec<WireItem>) -> Response {
    let mut queue: VecDeque<WireItem> = found.into();
    let items = take_within_budget(&mut queue);
    Response::Fetch {
        items,
        deferred: queue.into_iter().map(|i| i.entry.id).collect(),
    }
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this request to the peer; pass its answer to `on_response`.
    Send(Request),
    /// Look up the local entries under these paths; pass them to `on_local_entries`.
    NeedLocalEntries(Vec<String>),
    /// Look up these local items (with content); pass them to `on_local_items`.
    NeedLocalItems(Vec<String>),
    /// Look up the local entries whose tree keys start with these 8 bytes;
    /// pass them to `on_local_keyed`.
    NeedLocalKeys(Vec<[u8; 8]>),
    /// The previous step has not been answered yet.
    Waiting,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("unexpected answer from the peer: {0}")]
    Protocol(String),
}

/// Counters of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    pub round_trips: u64,
    pub nodes_compared: u64,
    pub entries_compared: u64,
    pub pulled: u64,
    pub pushed: u64,
    /// Ids still to pull and to push.
    pub to_pull: u64,
    pub to_push: u64,
    /// Coded symbols received (a rateless session).
    pub symbols: u64,
    /// The session walked the trees (not rateless, or it fell back).
    pub walked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Wait {
    None,
    Round(Vec<String>, Vec<String>),
    /// The ids asked for.
    Fetch(BTreeSet<String>),
    Push,
    LocalEntries,
    LocalItems,
    Rateless,
    LocalKeys(Vec<[u8; 8]>),
}

#[derive(Debug)]
pub struct Session {
    id: u64,
    depth: u8,
    descend: VecDeque<String>,
    list: VecDeque<String>,
    /// Entry lists the peer sent, by path, awaiting ours.
    remote: BTreeMap<String, Vec<EntrySummary>>,
    pull: VecDeque<String>,
    push: VecDeque<String>,
    /// Local items looked up for pushing, sent in byte-bounded chunks.
    outbox: VecDeque<WireItem>,
    wait: Wait,
    progress: Progress,
    /// The rateless mode, while it runs.
    rateless: Option<Box<rateless::Rateless>>,
}

/// Sorts `list` by id; of an id listed twice (by a broken or hostile peer)
/// the last copy stays, as it did when these lists were read into maps.
fn sort_by_id_keep_last<T>(list: &mut Vec<T>, id: impl Fn(&T) -> &str) {
    list.sort_by(|a, b| id(a).cmp(id(b)));
    list.dedup_by(|later, kept| {
        let same = id(later) == id(kept);
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
}

/// What `EntrySummary::of(e)` compares by (`EntrySummary::newer_than`),
/// without copying the entry's strings.
fn summary_stamp(e: &Entry) -> (u64, &[u8], [u8; 8]) {
    (e.version, e.origin.as_bytes(), EntrySummary::hash_of(e))
}

fn short(hash: [u8; 32]) -> [u8; 16] {
    hash[..16].try_into().expect("16 bytes")
}

/// Non-empty children of `path` in `tree`, as a `Descend` carries them.
pub fn children_summaries(tree: &MerkleTree, path: &str) -> Vec<ChildSummary> {
    tree.child_sums(path)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty())
        .map(|(nibble, n)| ChildSummary {
            nibble: nibble as u8,
            count: n.count,
            hash: short(n.hash()),
        })
        .collect()
}

fn summary(tree: &MerkleTree, path: &str) -> NodeSummary {
    let n = tree.node(path).unwrap_or_default();
    NodeSummary {
        path: path.to_string(),
        count: n.count,
        hash: if n.is_empty() { [0; 16] } else { short(n.hash()) },
    }
}

/// What a responder answers to a `Round`: the differing children to report
/// as summaries, and the paths whose entries to list (the `list` paths and the
/// small differing children). The caller looks the entries up and builds
/// `Response::Round`. `entries_under` counts are taken from the tree.
pub fn plan_round(tree: &MerkleTree, descend: &[Descend], list: &[String]) -> (Vec<NodeSummary>, Vec<String>) {
    let depth = tree.depth() as usize;
    let mut nodes = Vec::new();
    let mut listed: Vec<String> = Vec::new();
    let mut budget: u64 = 0;
    // Asked-for lists first; past the budget they come back as summaries, to
    // be listed in a later round (the first one always fits, so rounds progress).
    for p in list {
        let n = summary(tree, p);
        if listed.is_empty() || budget + n.count <= MAX_LISTED as u64 {
            budget += n.count;
            listed.push(p.clone());
        } else {
            nodes.push(n);
        }
    }
    for d in descend {
        // Both sides' children by nibble (a nibble the peer repeats: its last).
        let mut theirs = [(0u64, [0u8; 16]); FANOUT];
        for c in d.children.iter().filter(|c| (c.nibble as usize) < FANOUT) {
            theirs[c.nibble as usize] = (c.count, c.hash);
        }
        let mine_children = tree.child_sums(&d.path).unwrap_or_default();
        for (nibble, their) in theirs.into_iter().enumerate() {
            let n = mine_children.get(nibble).copied().unwrap_or_default();
            if n.count == 0 && their.0 == 0 {
                continue;
            }
            let hash = if n.is_empty() { [0; 16] } else { short(n.hash()) };
            if (n.count, hash) == their {
                continue;
            }
            let c = format!("{}{nibble:x}", d.path);
            let mine = NodeSummary {
                path: c.clone(),
                count: n.count,
                hash,
            };
            let small = c.len() >= depth || mine.count.max(their.0) <= LIST_BELOW;
            if small && budget + mine.count <= MAX_LISTED as u64 {
                budget += mine.count;
                listed.push(c);
            } else {
                nodes.push(mine);
            }
        }
    }
    (nodes, listed)
}

/// Builds a `Round` answer from the planned summaries and the entry lists,
/// keeping the listed entries under `MAX_ROUND_BYTES` (estimated): lists past it
/// are answered as summaries instead and listed in a later round. The first
/// list is always kept, so rounds progress.
pub fn round_answer(
    tree: &MerkleTree,
    mut nodes: Vec<NodeSummary>,
    lists: Vec<(String, Vec<EntrySummary>)>,
) -> Response {
    let mut entries = Vec::with_capacity(lists.len());
    // Node summaries go in any case: they count against the budget first
    // (and each deferred list adds one).
    let node_bytes = |path: &str| path.len() + 32;
    let mut bytes: usize = nodes.iter().map(|n| node_bytes(&n.path)).sum();
    for (path, list) in lists {
        let size: usize = list.iter().map(|e| e.id.len() + e.origin.len() + 24).sum::<usize>() + path.len() + 4;
        if entries.is_empty() || bytes + size <= MAX_ROUND_BYTES {
            bytes += size;
            entries.push((path, list));
        } else {
            bytes += node_bytes(&path);
            nodes.push(summary(tree, &path));
        }
    }
    Response::Round { nodes, entries }
}

/// What a node announces about its tree (answer to `Request::Root`, and the
/// roots gossip).
pub fn root_announcement(tree: &MerkleTree, node: &str, hlc: u64) -> RootsAnnouncement {
    RootsAnnouncement {
        node: node.to_string(),
        root: tree.root_hash().map(short),
        count: tree.count(),
        hlc,
        depth: tree.depth(),
    }
}

/// Checks a request against the limits before a responder does any work.
pub fn check_request(req: &Request, tree: &MerkleTree) -> Result<(), String> {
    let depth = tree.depth() as usize;
    let valid = |p: &str| tree.parse_path(p).is_ok();
    match req {
        Request::Round { descend, list, .. } => {
            let descend_ok = descend.len() <= MAX_PATHS
                && descend.iter().all(|d| {
                    valid(&d.path)
                        && d.path.len() < depth
                        && d.children.len() <= FANOUT
                        && d.children.iter().all(|c| (c.nibble as usize) < FANOUT)
                });
            if descend_ok && list.len() <= MAX_LIST && list.iter().all(|p| valid(p)) {
                Ok(())
            } else {
                Err(format!(
                    "a round takes at most {MAX_PATHS} nodes to descend and {MAX_LIST} paths to list, all valid"
                ))
            }
        }
        Request::Root => Ok(()),
        Request::Ledger { after } if after.as_ref().is_none_or(|a| a.len() <= 512) => Ok(()),
        Request::Ledger { .. } => Err("ledger cursor too long".into()),
        Request::Fetch { ids, .. } if ids.len() <= MAX_ITEMS => Ok(()),
        Request::Push { items, .. } if items.len() <= MAX_ITEMS => Ok(()),
        Request::Cdc { deltas } if !deltas.is_empty() && deltas.len() <= crate::replica::cdc::MAX_DELTAS => Ok(()),
        Request::Cdc { .. } => Err(format!("1 to {} deltas per message", crate::replica::cdc::MAX_DELTAS)),
        Request::Roots(_) => Ok(()),
        Request::Sketch { .. } | Request::Symbols { .. } | Request::Resolve { .. } => rateless::check(req),
        _ => Err(format!("at most {MAX_ITEMS} items per request")),
    }
}

impl Session {
    /// A session that starts at the roots.
    pub fn new(id: u64, depth: u8) -> Self {
        Self {
            id,
            depth,
            descend: VecDeque::from([String::new()]),
            list: VecDeque::new(),
            remote: BTreeMap::new(),
            pull: VecDeque::new(),
            push: VecDeque::new(),
            outbox: VecDeque::new(),
            wait: Wait::None,
            progress: Progress {
                walked: true,
                ..Progress::default()
            },
            rateless: None,
        }
    }

    /// A session that starts in the rateless mode (the peer speaks wire
    /// version 3), and walks the trees only if that cannot decode.
    pub fn rateless(id: u64, depth: u8) -> Self {
        let mut s = Self::new(id, depth);
        s.descend.clear();
        s.progress.walked = false;
        s.rateless = Some(Box::new(rateless::Rateless::new(id)));
        s
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn progress(&self) -> Progress {
        Progress {
            to_pull: self.pull.len() as u64,
            to_push: self.push.len() as u64,
            symbols: self.progress.symbols + self.rateless.as_ref().map_or(0, |r| r.received),
            ..self.progress.clone()
        }
    }

    /// Ends the rateless mode; `walk`: the trees are walked instead.
    fn end_rateless(&mut self, walk: bool) {
        if let Some(r) = self.rateless.take() {
            self.progress.symbols += r.received;
        }
        if walk {
            self.progress.walked = true;
            self.descend.push_back(String::new());
        }
    }

    /// The next thing to do. Call again after each answer or local lookup.
    pub fn next_step(&mut self, local: &MerkleTree) -> Step {
        if self.wait != Wait::None {
            return match &self.wait {
                Wait::LocalEntries => Step::NeedLocalEntries(self.remote.keys().cloned().collect()),
                Wait::LocalKeys(keys) => Step::NeedLocalKeys(keys.clone()),
                _ => Step::Waiting,
            };
        }
        if let Some(r) = self.rateless.as_mut() {
            match r.next(local) {
                rateless::Next::Send(req) => {
                    self.wait = Wait::Rateless;
                    return Step::Send(req);
                }
                rateless::Next::LocalKeys(keys) => {
                    self.wait = Wait::LocalKeys(keys.clone());
                    return Step::NeedLocalKeys(keys);
                }
                rateless::Next::Compare(found) => {
                    self.compare(Vec::new(), found);
                    self.end_rateless(false);
                }
                rateless::Next::Fallback => self.end_rateless(true),
                rateless::Next::Waiting => return Step::Waiting,
            }
        }
        if !self.descend.is_empty() || !self.list.is_empty() {
            let n = self.descend.len().min(MAX_PATHS);
            let paths: Vec<String> = self.descend.drain(..n).collect();
            let descend = paths
                .iter()
                .map(|p| Descend {
                    path: p.clone(),
                    children: children_summaries(local, p),
                })
                .collect();
            let n = self.list.len().min(MAX_LIST);
            let list: Vec<String> = self.list.drain(..n).collect();
            self.wait = Wait::Round(paths, list.clone());
            return Step::Send(Request::Round {
                session: self.id,
                descend,
                list,
            });
        }
        if !self.pull.is_empty() {
            let n = self.pull.len().min(MAX_ITEMS);
            let ids: Vec<String> = self.pull.drain(..n).collect();
            self.wait = Wait::Fetch(ids.iter().cloned().collect());
            return Step::Send(Request::Fetch { session: self.id, ids });
        }
        if !self.outbox.is_empty() {
            self.wait = Wait::Push;
            return Step::Send(Request::Push {
                session: self.id,
                items: take_within_budget(&mut self.outbox),
            });
        }
        if !self.push.is_empty() {
            let n = self.push.len().min(MAX_ITEMS);
            self.wait = Wait::LocalItems;
            return Step::NeedLocalItems(self.push.drain(..n).collect());
        }
        Step::Done
    }

    /// Puts ids back at the front of the push queue: the caller loaded only
    /// a transfer's worth of the ids `NeedLocalItems` asked for.
    pub fn return_push(&mut self, ids: Vec<String>) {
        for id in ids.into_iter().rev() {
            self.push.push_front(id);
        }
    }

    /// Takes the peer's answer to the last `Send`. `Some(items)`: items pulled
    /// from the peer, for the caller to apply (last writer wins).
    pub fn on_response(&mut self, resp: Response, local: &MerkleTree) -> Result<Option<Vec<WireItem>>, SessionError> {
        self.progress.round_trips += 1;
        let wait = std::mem::replace(&mut self.wait, Wait::None);
        match (wait, resp) {
            // A peer that keeps no coded symbols still walks the trees with
            // us; a busy one is asked again later, as in a walk.
            (Wait::Rateless, Response::Refused { reason })
                if reason == rateless::NO_SYMBOLS && self.rateless.as_ref().is_some_and(|r| r.opening()) =>
            {
                self.end_rateless(true);
                Ok(None)
            }
            (_, Response::Refused { reason }) => Err(SessionError::Refused(reason)),
            (Wait::Rateless, resp) => match self.rateless.as_mut() {
                Some(r) => r.on_response(resp, local).map(|()| None),
                None => Err(SessionError::Protocol("a rateless answer after the mode ended".into())),
            },
            (Wait::Round(descended, listed), Response::Round { nodes, entries }) => {
                let asked: BTreeSet<&str> = descended.iter().map(String::as_str).collect();
                for n in &nodes {
                    let parent = n.path.get(..n.path.len().saturating_sub(1)).unwrap_or("");
                    let deferred_list = listed.contains(&n.path);
                    let child = !n.path.is_empty() && n.path.len() <= self.depth as usize && asked.contains(parent);
                    if !deferred_list && !child {
                        return Err(SessionError::Protocol(format!("node {:?} was not asked for", n.path)));
                    }
                }
                for (path, _) in &entries {
                    let parent = path.get(..path.len().saturating_sub(1)).unwrap_or("");
                    let child_of_asked = !path.is_empty() && asked.contains(parent);
                    if !listed.contains(path) && !child_of_asked {
                        return Err(SessionError::Protocol(format!(
                            "entries for {path:?} were not asked for"
                        )));
                    }
                }
                for n in nodes {
                    self.progress.nodes_compared += 1;
                    let mine = local.node(&n.path).unwrap_or_default().count;
                    if n.count == 0 {
                        // The peer has nothing here: everything we hold under it goes.
                        self.remote.insert(n.path, Vec::new());
                    } else if listed.contains(&n.path) {
                        // A list the peer deferred: ask again.
                        self.list.push_back(n.path);
                    } else if n.path.len() >= self.depth as usize
                        || n.count.max(mine) <= LIST_BELOW
                        || (mine == 0 && n.count <= LIST_WHOLE_BELOW)
                    {
                        self.list.push_back(n.path);
                    } else {
                        self.descend.push_back(n.path);
                    }
                }
                for (path, list) in entries {
                    self.remote.insert(path, list);
                }
                if !self.remote.is_empty() {
                    self.wait = Wait::LocalEntries;
                }
                Ok(None)
            }
            (Wait::Fetch(asked), Response::Fetch { items, mut deferred }) => {
                // Deferred ids were asked for, each once, and fewer than
                // asked: the queue shrinks every round, whatever the peer answers.
                deferred.sort_unstable();
                deferred.dedup();
                if deferred.iter().any(|id| !asked.contains(id)) {
                    return Err(SessionError::Protocol("the peer deferred ids not asked for".into()));
                }
                if deferred.len() >= asked.len() {
                    return Err(SessionError::Protocol("the peer deferred every item of a fetch".into()));
                }
                self.progress.pulled += items.len() as u64;
                for id in deferred.into_iter().rev() {
                    self.pull.push_front(id);
                }
                Ok(Some(items))
            }
            (Wait::Push, Response::Pushed { applied }) => {
                self.progress.pushed += applied;
                Ok(None)
            }
            (Wait::Fetch(asked), r) => Err(SessionError::Protocol(format!(
                "{r:?} while waiting for a fetch of {} ids",
                asked.len()
            ))),
            (w, r) => Err(SessionError::Protocol(format!("{r:?} while waiting for {w:?}"))),
        }
    }

    /// Our entries under the paths of the last `NeedLocalEntries`: compares
    /// them with the peer's and queues what to pull and to push.
    pub fn on_local_entries(&mut self, local: Vec<(String, Vec<Entry>)>) {
        let mut mine: BTreeMap<String, Vec<Entry>> = local.into_iter().collect();
        for (path, theirs) in std::mem::take(&mut self.remote) {
            let ours = mine.remove(&path).unwrap_or_default();
            self.compare(ours, theirs);
        }
        self.wait = Wait::None;
    }

    /// Our entries for the keys of the last `NeedLocalKeys` (a rateless
    /// session): compares them with the peer's it resolved.
    pub fn on_local_keyed(&mut self, ours: Vec<Entry>) {
        if let Some(r) = self.rateless.as_mut() {
            let found = r.take_found();
            self.compare(ours, found);
            self.end_rateless(false);
        }
        self.wait = Wait::None;
    }

    /// Compares our entries with the peer's (any order) and queues the ids
    /// to pull and to push.
    fn compare(&mut self, mut ours: Vec<Entry>, mut theirs: Vec<EntrySummary>) {
        // Both lists by id, then one merge: no map, no id copied but those queued.
        sort_by_id_keep_last(&mut ours, |e| &e.id);
        sort_by_id_keep_last(&mut theirs, |e| &e.id);
        let (mut ours, mut theirs) = (ours.iter().peekable(), theirs.iter().peekable());
        loop {
            let (o, t) = (ours.peek(), theirs.peek());
            let order = match (o, t) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(o), Some(t)) => o.id.cmp(&t.id),
            };
            self.progress.entries_compared += 1;
            match order {
                std::cmp::Ordering::Less => self.push.push_back(ours.next().expect("peeked").id.clone()),
                std::cmp::Ordering::Greater => self.pull.push_back(theirs.next().expect("peeked").id.clone()),
                std::cmp::Ordering::Equal => {
                    let (o, t) = (ours.next().expect("peeked"), theirs.next().expect("peeked"));
                    let (mine, peer) = (summary_stamp(o), (t.version, t.origin.as_bytes(), t.hash));
                    if peer > mine {
                        self.pull.push_back(t.id.clone());
                    } else if mine > peer {
                        self.push.push_back(o.id.clone());
                    }
                }
            }
        }
    }

    /// Our items for the last `NeedLocalItems`; `next_step` sends them.
    pub fn on_local_items(&mut self, items: Vec<WireItem>) {
        self.outbox.extend(items);
        self.wait = Wait::None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore as Store;
    use crate::merkle::MerkleTree;
    use proptest::prelude::*;

    fn reconcile(a: &mut Store, b: &mut Store) -> Progress {
        a.reconcile_with(b, |_, _| {})
    }

    fn pair(shared: usize, diffs: &[(u8, usize)]) -> (Store, Store) {
        Store::diverged_pair(4, shared, diffs)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_stores_reconcile_to_identical_trees(shared in 0usize..3000, diffs in proptest::collection::vec((any::<u8>(), any::<usize>()), 0..400)) {
            let (mut a, mut b) = pair(shared, &diffs);
            reconcile(&mut a, &mut b);
            prop_assert_eq!(a.tree.root_hash(), b.tree.root_hash());
            prop_assert_eq!(a.items, b.items);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_stores_reconcile_to_identical_trees_rateless(shared in 0usize..3000, diffs in proptest::collection::vec((any::<u8>(), any::<usize>()), 0..400)) {
            let (mut a, mut b) = pair(shared, &diffs);
            a.reconcile_rateless(&mut b, |_, _| {});
            prop_assert_eq!(a.tree.root_hash(), b.tree.root_hash());
            prop_assert_eq!(a.items, b.items);
        }
    }

    /// Round trips before the transfer.
    fn reconciling_round_trips(a: &mut Store, b: &mut Store) -> (u64, Progress) {
        let mut rounds = 0;
        let p = a.reconcile_rateless(b, |req, _| {
            rounds += !matches!(req, Request::Fetch { .. } | Request::Push { .. }) as u64;
        });
        (rounds, p)
    }

    #[test]
    fn rateless_sessions_take_at_most_three_round_trips_before_the_transfer() {
        for d in [1usize, 10, 100, 3000] {
            let diffs: Vec<(u8, usize)> = (0..d).map(|k| ((k % 6) as u8, (k * 7919) % 50_000)).collect();
            let (mut a, mut b) = pair(50_000, &diffs);
            let (rounds, p) = reconciling_round_trips(&mut a, &mut b);
            assert_eq!(a.tree.root_hash(), b.tree.root_hash(), "d={d}");
            assert!(!p.walked && p.symbols > 0, "d={d}: {p:?}");
            assert!(rounds <= 3, "d={d}: {rounds} round trips");
        }
    }

    #[test]
    fn a_difference_past_the_symbols_kept_walks_the_trees() {
        // Depth 2 keeps 256 symbols: 2000 new ids are too many.
        let (mut a, mut b) = (Store::new(2), Store::new(2));
        for i in 0..2000 {
            a.put(crate::memory::sample_item(&format!("a{i}"), 5, "n", false));
        }
        b.put(crate::memory::sample_item("b", 5, "n", false));
        let (_, p) = reconciling_round_trips(&mut a, &mut b);
        assert!(p.walked, "{p:?}");
        assert_eq!(a.tree.root_hash(), b.tree.root_hash());
    }

    #[test]
    fn a_peer_whose_set_changes_between_answers_is_asked_again_from_the_start() {
        let diffs: Vec<(u8, usize)> = (0..2000).map(|k| ((k % 6) as u8, k * 13)).collect();
        let (mut a, mut b) = pair(30_000, &diffs);
        let t = a.tree.clone();
        let mut s = Session::rateless(1, 4);
        let Step::Send(sketch) = s.next_step(&t) else { panic!() };
        // The peer answers the sketch with too few symbols for the difference.
        let Response::Symbols { zero, symbols, .. } = b.answer(sketch) else {
            panic!()
        };
        let short = symbols[..64].to_vec();
        s.on_response(
            Response::Symbols {
                from: 0,
                zero,
                estimate: 0,
                symbols: short,
            },
            &t,
        )
        .unwrap();
        let Step::Send(Request::Symbols { from, count, .. }) = s.next_step(&t) else {
            panic!()
        };
        assert_eq!(from, 64);
        // Then it changes: its symbol 0 with it.
        b.put(crate::memory::sample_item("late", 9, "n", false));
        let more = b.answer(Request::Symbols {
            session: 1,
            from,
            count,
        });
        s.on_response(more, &t).unwrap();
        let Step::Send(again @ Request::Symbols { from: 0, .. }) = s.next_step(&t) else {
            panic!("stale symbols are dropped and asked for again from 0")
        };
        s.on_response(b.answer(again), &a.tree).unwrap();
        // And the session still converges from there.
        let p = a.run_session_from(s, &mut b);
        assert!(!p.walked);
        assert_eq!(a.tree.root_hash(), b.tree.root_hash());
    }

    #[test]
    fn rateless_answers_that_were_not_asked_for_are_refused() {
        let (a, b) = pair(1000, &[(0, 1), (1, 2), (4, 3)]);
        let mut s = Session::rateless(1, 4);
        let Step::Send(_) = s.next_step(&a.tree) else { panic!() };
        let wrong = Response::Symbols {
            from: 5,
            zero: Default::default(),
            estimate: 0,
            symbols: vec![Default::default()],
        };
        assert!(matches!(s.on_response(wrong, &a.tree), Err(SessionError::Protocol(_))));
        // A resolve answer that defers a key nobody asked for.
        let mut s = Session::rateless(1, 4);
        let mut b = b;
        loop {
            match s.next_step(&a.tree) {
                Step::Send(Request::Resolve { .. }) => break,
                Step::Send(req) => {
                    s.on_response(b.answer(req), &a.tree).unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
        let resp = Response::Resolved {
            entries: vec![],
            deferred: vec![[9; 8]],
        };
        assert!(matches!(s.on_response(resp, &a.tree), Err(SessionError::Protocol(_))));
    }

    #[test]
    fn rateless_requests_past_the_limits_are_refused() {
        let t = MerkleTree::new(4).unwrap();
        let counts = vec![[0u8; 2]; rateless::MAX_SKETCH_COUNTS + 1];
        assert!(check_request(&Request::Sketch { session: 1, counts }, &t).is_err());
        let count = crate::merkle::MAX_SYMBOLS as u32 + 1;
        assert!(
            check_request(
                &Request::Symbols {
                    session: 1,
                    from: 0,
                    count
                },
                &t
            )
            .is_err()
        );
        let keys = vec![[0u8; 8]; rateless::MAX_RESOLVE + 1];
        assert!(check_request(&Request::Resolve { session: 1, keys }, &t).is_err());
        // A node without symbols refuses, and the asker walks the trees.
        let plain = MerkleTree::without_sketch(4).unwrap();
        let refusal = rateless::symbols_answer(
            &plain,
            &Request::Sketch {
                session: 1,
                counts: vec![],
            },
        )
        .unwrap_err();
        let mut s = Session::rateless(1, 4);
        let Step::Send(Request::Sketch { .. }) = s.next_step(&t) else {
            panic!()
        };
        assert_eq!(s.on_response(Response::Refused { reason: refusal }, &t), Ok(None));
        assert!(matches!(s.next_step(&t), Step::Send(Request::Round { .. })));
        assert!(s.progress().walked);
        // A busy one fails the session (asked again later), as in a walk.
        let mut s = Session::rateless(1, 4);
        s.next_step(&t);
        let busy = Response::Refused { reason: "busy".into() };
        assert!(matches!(s.on_response(busy, &t), Err(SessionError::Refused(_))));
    }

    #[test]
    fn an_id_the_peer_lists_twice_is_compared_once_by_its_last_copy() {
        let entry = |version: u64| Entry {
            id: "a".into(),
            version,
            origin: "n".into(),
            tombstone: false,
            content_hash: [1; 32],
        };
        let mut s = Session::new(1, 4);
        s.remote.insert(
            "0".into(),
            vec![EntrySummary::of(&entry(9)), EntrySummary::of(&entry(1))],
        );
        s.on_local_entries(vec![("0".into(), vec![entry(5)])]);
        // The last copy (version 1) is older than ours (5): ours goes to the peer.
        assert_eq!(s.push, ["a"]);
        assert!(s.pull.is_empty());
        assert_eq!(s.progress.entries_compared, 1);
    }

    #[test]
    fn a_hundred_thousand_items_with_differences_on_both_sides() {
        let diffs: Vec<(u8, usize)> = (0..3000).map(|i| ((i % 6) as u8, i * 31)).collect();
        let (mut a, mut b) = pair(100_000, &diffs);
        assert_ne!(a.tree.root_hash(), b.tree.root_hash());
        let p = reconcile(&mut a, &mut b);
        assert_eq!(a.tree.root_hash(), b.tree.root_hash());
        assert_eq!(a.items.len(), b.items.len());
        assert!(p.pulled > 0 && p.pushed > 0, "{p:?}");
    }

    #[test]
    fn an_isolated_difference_costs_about_depth_plus_two_round_trips() {
        let (mut a, mut b) = pair(100_000, &[(1, 777)]);
        let p = reconcile(&mut a, &mut b);
        assert_eq!(a.tree.root_hash(), b.tree.root_hash());
        assert_eq!(p.pulled, 1);
        assert!(p.round_trips <= 4 + 2, "{p:?}");
        // An empty node joining a populated one goes through the same session.
        let (mut empty, mut full) = (Store::new(4), pair(5_000, &[]).0);
        let p = reconcile(&mut empty, &mut full);
        assert_eq!(p.pulled, 5_000);
        assert_eq!(empty.tree.root_hash(), full.tree.root_hash());
    }

    #[test]
    fn long_ids_make_the_peer_defer_lists_and_still_converge() {
        use crate::wire::{Body, Envelope};
        let long = "x".repeat(400);
        let (mut empty, mut full) = (Store::new(4), Store::new(4));
        for i in 0..12_000 {
            full.put(crate::memory::sample_item(&format!("{long}{i}"), 5, "n", false));
        }
        let mut largest = 0;
        empty.reconcile_with(&mut full, |_, resp| {
            largest = largest.max(Envelope::new("c", Body::Response(resp.clone())).encode().len());
        });
        assert_eq!(empty.tree.root_hash(), full.tree.root_hash());
        assert!(
            largest <= 2 * MAX_ROUND_BYTES,
            "round answers stay near the budget: {largest}"
        );
    }

    #[test]
    fn large_items_travel_in_byte_bounded_chunks() {
        use crate::wire::{DEFAULT_MAX_FRAME, Envelope};
        let big = |id: &str, v: u64| {
            let mut it = crate::memory::sample_item(id, v, "n", false);
            it.content = vec![7u8; 900 * 1024];
            it.entry.content_hash = <sha2::Sha256 as sha2::Digest>::digest(&it.content).into();
            it
        };
        let (mut a, mut b) = (Store::new(4), Store::new(4));
        for i in 0..12 {
            a.put(big(&format!("a{i}"), 5));
            b.put(big(&format!("b{i}"), 5));
        }
        let mut largest = 0;
        let p = a.reconcile_with(&mut b, |req, resp| {
            let size = |b: crate::wire::Body| Envelope::new("c", b).encode().len();
            largest = largest
                .max(size(crate::wire::Body::Request(req.clone())))
                .max(size(crate::wire::Body::Response(resp.clone())));
        });
        assert_eq!(a.tree.root_hash(), b.tree.root_hash());
        assert_eq!((p.pulled, p.pushed), (12, 12));
        assert!(largest <= DEFAULT_MAX_FRAME, "{largest}");
        assert!(
            p.round_trips >= 4 + 6,
            "12 × 0.9 MiB each way takes several transfers: {p:?}"
        );
    }

    #[test]
    fn requests_past_the_limits_and_foreign_answers_are_refused() {
        let t = MerkleTree::new(4).unwrap();
        let many: Vec<Descend> = (0..MAX_PATHS + 1)
            .map(|i| Descend {
                path: format!("{:x}", i % 16),
                children: vec![],
            })
            .collect();
        assert!(
            check_request(
                &Request::Round {
                    session: 1,
                    descend: many,
                    list: vec![]
                },
                &t
            )
            .is_err()
        );
        assert!(
            check_request(
                &Request::Round {
                    session: 1,
                    descend: vec![Descend {
                        path: "zz".into(),
                        children: vec![]
                    }],
                    list: vec![]
                },
                &t
            )
            .is_err()
        );
        let mut s = Session::new(1, 4);
        let Step::Send(_) = s.next_step(&t) else { panic!() };
        let bogus = Response::Round {
            nodes: vec![NodeSummary {
                path: "ab".into(),
                count: 1,
                hash: [0; 16],
            }],
            entries: vec![],
        };
        assert!(matches!(s.on_response(bogus, &t), Err(SessionError::Protocol(_))));
        let mut s = Session::new(1, 4);
        s.next_step(&t);
        assert!(matches!(
            s.on_response(Response::Refused { reason: "no".into() }, &t),
            Err(SessionError::Refused(_))
        ));
    }
}
