//! The one storage interface of the replication core: the engine implements
//! it in production (L1/L2/L3), the in-memory store in simulation.
//!
//! The core never waits on storage. It asks for work as a `Task` (an
//! `Output::Run`); the driver runs it with `run_task` — the node on a tokio
//! task, the simulator at once — and hands the `TaskResult` back as an
//! `Input::Done`. Only the in-memory Merkle tree is read synchronously.

use std::future::Future;

use crate::merkle::MerkleTree;
use crate::session::{
    MAX_ROUND_BYTES, MAX_TRANSFER_BYTES, check_request, fetch_answer, plan_round, rateless, round_answer,
};
use crate::wire::{CdcDelta, Entry, EntrySummary, PurgedEntry, Request, Response, RootsAnnouncement, WireItem};

/// Purge records per `Ledger` answer (each under ~600 bytes).
pub const LEDGER_PAGE: usize = 2_000;

/// What replication needs of a node's storage.
pub trait Store: Sync {
    type Error: std::fmt::Display + Send;

    /// Reads the Merkle tree (kept in memory).
    fn with_tree<R>(&self, f: impl FnOnce(&MerkleTree) -> R) -> R;
    /// This node's root, entry count, clock and tree depth.
    fn root_announcement(&self) -> RootsAnnouncement;
    /// The existence filter says `id` was never stored here.
    fn definitely_missing(&self, id: &str) -> bool;
    /// Whether `id` is stored with this content hash.
    fn is_current(&self, id: &str, content_hash: &[u8; 32]) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// The stored version of `id`.
    fn current(&self, id: &str) -> impl Future<Output = Result<Option<Entry>, Self::Error>> + Send;
    /// The entries under each tree path.
    fn entries_under(
        &self,
        paths: &[String],
    ) -> impl Future<Output = Result<Vec<(String, Vec<Entry>)>, Self::Error>> + Send;
    /// The entries whose tree keys start with each of `keys` (8 bytes
    /// each): one list per key, in their order.
    fn entries_by_keys(&self, keys: &[[u8; 8]]) -> impl Future<Output = Result<Vec<Vec<Entry>>, Self::Error>> + Send;
    /// The stored items among `ids` that fit in `budget` bytes, and the ids
    /// left unread.
    fn items_within(
        &self,
        ids: &[String],
        budget: usize,
    ) -> impl Future<Output = Result<(Vec<WireItem>, Vec<String>), Self::Error>> + Send;
    /// Applies items from a peer (last writer wins, purge ledger checked);
    /// returns how many won.
    fn apply(&self, items: Vec<WireItem>) -> impl Future<Output = Result<u64, Self::Error>> + Send;
    /// A page of the purge ledger after `after`, and the next cursor.
    fn ledger_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<PurgedEntry>, Option<String>), Self::Error>> + Send;
    /// Takes in a peer's purge records; returns how many were new.
    fn import_ledger(&self, entries: Vec<PurgedEntry>) -> impl Future<Output = Result<u64, Self::Error>> + Send;
    /// Purges tombstones stamped below `below` and written here before
    /// `written_before_ms` (wall clock), at most `max`; returns how many.
    fn purge(
        &self,
        below: u64,
        written_before_ms: u64,
        max: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;
    /// Drops purge records older than `retention_ms`.
    fn prune_ledger(&self, retention_ms: u64) -> impl Future<Output = Result<u64, Self::Error>> + Send;
}

/// Storage work the core asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// Answer a peer's request.
    Answer(Request),
    /// Received CDC deltas: apply what is new, list what to fetch.
    Cdc(Vec<CdcDelta>),
    /// Apply items pulled from a peer.
    Apply(Vec<WireItem>),
    /// Entry lists under these paths (a session).
    Entries(Vec<String>),
    /// Entries under these 8-byte tree key prefixes (a rateless session).
    KeyedEntries(Vec<[u8; 8]>),
    /// Items to push (a session), within a transfer's budget.
    Items(Vec<String>),
    /// A page of a peer's purge ledger (joining).
    ImportLedger(Vec<PurgedEntry>),
    /// Tombstone purge below a version, then ledger pruning.
    Purge {
        below: u64,
        written_before_ms: u64,
        max: usize,
        retention_ms: u64,
    },
}

/// What became of a `Task`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskResult {
    Answer(Response),
    Cdc(CdcOutcome),
    Applied(u64),
    Entries(Vec<(String, Vec<Entry>)>),
    KeyedEntries(Vec<Entry>),
    Items { items: Vec<WireItem>, unread: Vec<String> },
    Imported(u64),
    Purged(u64),
    Failed(String),
}

/// What became of a batch of received deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdcOutcome {
    pub applied: u64,
    /// Held already, older than ours, or refused (anti-entropy offers again
    /// what was refused for a passing reason such as clock skew).
    pub dropped: u64,
    /// Newer than ours but without content: to fetch from the author.
    pub fetch: Vec<String>,
    /// The deltas whose version is the one stored here now (or to fetch):
    /// the ones to pass on (the core passes each version on once). One
    /// held already counts too: a session may have brought it first.
    pub fresh: Vec<CdcDelta>,
}

/// Runs one task against `store`.
pub async fn run_task<S: Store>(store: &S, task: Task) -> TaskResult {
    let failed = |e: S::Error| TaskResult::Failed(e.to_string());
    match task {
        Task::Answer(req) => TaskResult::Answer(answer(store, req).await),
        Task::Cdc(deltas) => receive_cdc(store, deltas).await.map_or_else(failed, TaskResult::Cdc),
        Task::Apply(items) => store.apply(items).await.map_or_else(failed, TaskResult::Applied),
        Task::Entries(paths) => store
            .entries_under(&paths)
            .await
            .map_or_else(failed, TaskResult::Entries),
        Task::KeyedEntries(keys) => store
            .entries_by_keys(&keys)
            .await
            .map_or_else(failed, |lists| TaskResult::KeyedEntries(lists.concat())),
        Task::Items(ids) => match store.items_within(&ids, MAX_TRANSFER_BYTES).await {
            Ok((items, unread)) => TaskResult::Items { items, unread },
            Err(e) => failed(e),
        },
        Task::ImportLedger(entries) => store
            .import_ledger(entries)
            .await
            .map_or_else(failed, TaskResult::Imported),
        Task::Purge {
            below,
            written_before_ms,
            max,
            retention_ms,
        } => {
            let purged = match store.purge(below, written_before_ms, max).await {
                Ok(n) => n,
                Err(e) => return failed(e),
            };
            match store.prune_ledger(retention_ms).await {
                Ok(_) => TaskResult::Purged(purged),
                Err(e) => failed(e),
            }
        }
    }
}

/// The responder side of anti-entropy.
pub async fn answer<S: Store>(store: &S, req: Request) -> Response {
    if let Err(reason) = store.with_tree(|t| check_request(&req, t)) {
        return Response::Refused { reason };
    }
    let result = async {
        Ok::<_, S::Error>(match req {
            Request::Round { descend, list, .. } => {
                let (nodes, listed) = store.with_tree(|t| plan_round(t, &descend, &list));
                let lists = store
                    .entries_under(&listed)
                    .await?
                    .into_iter()
                    .map(|(p, e)| (p, e.into_iter().map(EntrySummary::from_entry).collect()))
                    .collect();
                store.with_tree(|t| round_answer(t, nodes, lists))
            }
            Request::Fetch { ids, .. } => {
                // Read only what one answer can carry; defer the rest unread.
                let (items, unread) = store.items_within(&ids, MAX_TRANSFER_BYTES).await?;
                match fetch_answer(items) {
                    Response::Fetch { items, mut deferred } => {
                        deferred.extend(unread);
                        Response::Fetch { items, deferred }
                    }
                    other => other,
                }
            }
            Request::Push { items, .. } => Response::Pushed {
                applied: store.apply(items).await?,
            },
            Request::Root => Response::Root(store.root_announcement()),
            Request::Ledger { after } => {
                let (entries, next) = store.ledger_page(after.as_deref(), LEDGER_PAGE).await?;
                Response::Ledger { entries, next }
            }
            // Outside the core (which forwards them), deltas are just applied.
            Request::Cdc { deltas } => Response::Pushed {
                applied: receive_cdc(store, deltas).await?.applied,
            },
            Request::Roots(_) => Response::Root(store.root_announcement()),
            Request::Sketch { .. } | Request::Symbols { .. } => {
                match store.with_tree(|t| rateless::symbols_answer(t, &req)) {
                    Ok(r) => r,
                    Err(reason) => Response::Refused { reason },
                }
            }
            Request::Resolve { keys, .. } => resolve_answer(&keys, store.entries_by_keys(&keys).await?),
        })
    }
    .await;
    result.unwrap_or_else(|e| Response::Refused { reason: e.to_string() })
}

/// The answer to a `Resolve`: our entries under the keys asked for (one
/// list per key), within the round budget; keys past it are deferred.
fn resolve_answer(keys: &[[u8; 8]], lists: Vec<Vec<Entry>>) -> Response {
    let (mut out, mut deferred, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    for (k, list) in keys.iter().zip(lists) {
        let size: usize = list.iter().map(|e| e.id.len() + e.origin.len() + 24).sum();
        if !out.is_empty() && bytes + size > MAX_ROUND_BYTES {
            deferred.push(*k);
            continue;
        }
        bytes += size;
        out.extend(list.into_iter().map(EntrySummary::from_entry));
    }
    Response::Resolved { entries: out, deferred }
}

/// Whether we hold this delta's version or a newer one (DESIGN §5.3:
/// `definitely_missing` → no; `is_current` → yes; else by LWW).
async fn held_already<S: Store>(store: &S, delta: &CdcDelta) -> Result<bool, S::Error> {
    let e = &delta.entry;
    if store.definitely_missing(&e.id) {
        return Ok(false);
    }
    if !e.tombstone && store.is_current(&e.id, &e.content_hash).await? {
        return Ok(true);
    }
    // With content, LWW is decided when applying; without, before fetching.
    Ok(delta.item.is_none() && store.current(&e.id).await?.is_some_and(|cur| !e.newer_than(&cur)))
}

/// Applies received deltas, the ones that carry content in one batch, and
/// lists the ones to fetch.
pub async fn receive_cdc<S: Store>(store: &S, deltas: Vec<CdcDelta>) -> Result<CdcOutcome, S::Error> {
    let mut out = CdcOutcome::default();
    let mut items = Vec::new();
    let mut offered = Vec::new();
    for delta in deltas {
        // A lookup that fails drops this delta only.
        match held_already(store, &delta).await {
            Ok(false) => {}
            Ok(true) => {
                out.dropped += 1;
                if store.current(&delta.entry.id).await.ok().flatten().as_ref() == Some(&delta.entry) {
                    out.fresh.push(delta);
                }
                continue;
            }
            Err(_) => {
                out.dropped += 1;
                continue;
            }
        }
        match &delta.item {
            Some(item) => {
                items.push(item.clone());
                offered.push(delta);
            }
            None => {
                out.fetch.push(delta.entry.id.clone());
                out.fresh.push(delta);
            }
        }
    }
    if !items.is_empty() {
        let n = items.len() as u64;
        let applied = store.apply(items).await?;
        out.applied += applied;
        out.dropped += n - applied.min(n);
        // News is what is stored now: a version that lost, or was
        // deferred or refused, goes no further.
        for delta in offered {
            if store.current(&delta.entry.id).await.ok().flatten().as_ref() == Some(&delta.entry) {
                out.fresh.push(delta);
            }
        }
    }
    Ok(out)
}

/// Runs a future that never waits (the in-memory store's): the simulator's
/// way to run a task without an executor.
pub fn run_ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("an in-memory store task waited"),
    }
}
