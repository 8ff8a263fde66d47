//! Anti-entropy between two engines: the initiator drives a
//! `syncnode_protocol::session::Session` against a peer through any request
//! transport (`call`), and the responder answers with `answer_sync_request`.
//! Pulled items go through `apply_remote` (LWW, clock-skew deferral); pushed
//! items are applied the same way by the peer. Content hashes are checked on
//! both sides, so a peer cannot store bytes under a false hash.

use std::future::Future;
use syncnode_protocol::merkle::MerkleTree;
use syncnode_protocol::replica::Store;
use syncnode_protocol::session::{MAX_TRANSFER_BYTES, Progress, Session, Step, root_announcement};
use syncnode_protocol::wire::{Entry, PurgedEntry, Request, Response, RootsAnnouncement, WireItem};

use crate::engine::entry::EntryMeta;
use crate::engine::item::{hash_bytes, now_ms};
use crate::engine::{ContentType, StorageError, SyncEngine, SyncItem};

pub use syncnode_protocol::replica::store::LEDGER_PAGE;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("session: {0}")]
    Session(#[from] syncnode_protocol::session::SessionError),
    #[error("transport: {0}")]
    Transport(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

fn entry_of(m: EntryMeta) -> Entry {
    Entry {
        content_hash: hash_bytes(&m.content_hash),
        id: m.id,
        version: m.version,
        origin: m.origin,
        tombstone: m.tombstone,
    }
}

/// An item for the wire.
pub fn wire_item(it: &SyncItem) -> WireItem {
    WireItem {
        entry: Entry {
            id: it.object_id.clone(),
            version: it.version,
            origin: it.origin.clone(),
            tombstone: it.tombstone,
            content_hash: hash_bytes(&it.content_hash),
        },
        updated_at: it.updated_at,
        state: it.state.clone(),
        json: it.content_type == ContentType::Json,
        content: it.content.to_vec(),
        media_type: it.media_type.clone(),
    }
}

/// An item from the wire (its hash is checked when it is applied).
pub fn from_wire(w: WireItem) -> SyncItem {
    let mut it = if w.entry.tombstone {
        SyncItem::tombstone(w.entry.id)
    } else {
        SyncItem::new(w.entry.id, w.content)
    };
    it.version = w.entry.version;
    it.origin = w.entry.origin;
    it.content_hash = hex::encode(w.entry.content_hash);
    it.updated_at = if w.updated_at > 0 { w.updated_at } else { now_ms() };
    it.state = w.state;
    it.content_type = if w.json { ContentType::Json } else { ContentType::Binary };
    // A tombstone has no media type; one from a peer is dropped, not refused,
    // so the delete still replicates.
    it.media_type = w.media_type.filter(|_| !w.entry.tombstone);
    it
}

impl SyncEngine {
    /// This node's root, entry count, clock and tree depth.
    pub fn root_announcement(&self) -> RootsAnnouncement {
        let hlc = self.clock();
        let node = self.node_id();
        self.with_tree(|t| root_announcement(t, &node, hlc))
    }

    /// Entry lists under each path (from L3).
    async fn entries_under_paths(&self, paths: &[String]) -> Result<Vec<(String, Vec<Entry>)>, StorageError> {
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let entries = self
                .merkle_entries(p, usize::MAX >> 1)
                .await?
                .into_iter()
                .map(entry_of)
                .collect();
            out.push((p.clone(), entries));
        }
        Ok(out)
    }

    /// Applies items from a peer in one commit; returns how many won.
    /// Deferred (clock skew) and stale items are skipped: anti-entropy offers
    /// them again; invalid ones are logged and skipped.
    pub(crate) async fn apply_from_peer(&self, items: Vec<WireItem>) -> Result<u64, StorageError> {
        let mut applied = 0;
        for r in self
            .apply_remote_many(items.into_iter().map(from_wire).collect())
            .await?
        {
            match r {
                Ok(true) => applied += 1,
                Ok(false) | Err(StorageError::ClockSkew { .. }) => {}
                // The item's own fault (L3 refuses it: it is quarantined) is
                // no reason to stop replicating the rest.
                Err(
                    e @ (StorageError::Corruption { .. }
                    | StorageError::InvalidId(_)
                    | StorageError::InvalidInput(_)
                    | StorageError::PayloadTooLarge { .. }
                    | StorageError::Rejected(_)),
                ) => {
                    tracing::warn!(error = %e, "refused an item from a peer");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(applied)
    }

    /// The responder side of anti-entropy (the core's, over this engine).
    pub async fn answer_sync_request(&self, req: Request) -> Response {
        syncnode_protocol::replica::store::answer(self, req).await
    }

    /// Runs one anti-entropy session against a peer reached through `call`.
    pub async fn reconcile_with<F, Fut, E>(&self, session: u64, call: F) -> Result<Progress, SyncError>
    where
        F: FnMut(Request) -> Fut,
        Fut: Future<Output = Result<Response, E>>,
        E: std::fmt::Display,
    {
        self.reconcile_observed(session, call, |_| {}).await
    }

    /// `reconcile_with` in the rateless mode (the peer must speak wire
    /// version 3): the tree is walked only when the difference is past the
    /// coded symbols kept.
    pub async fn reconcile_rateless<F, Fut, E>(&self, session: u64, call: F) -> Result<Progress, SyncError>
    where
        F: FnMut(Request) -> Fut,
        Fut: Future<Output = Result<Response, E>>,
        E: std::fmt::Display,
    {
        let depth = self.merkle_summary().2;
        self.run_session(Session::rateless(session, depth), call, |_| {}).await
    }

    /// `reconcile_with`, calling `observe` with the progress after each step
    /// (a bootstrap shows how far it got).
    pub async fn reconcile_observed<F, Fut, E>(
        &self,
        session: u64,
        call: F,
        observe: impl FnMut(&Progress),
    ) -> Result<Progress, SyncError>
    where
        F: FnMut(Request) -> Fut,
        Fut: Future<Output = Result<Response, E>>,
        E: std::fmt::Display,
    {
        let depth = self.merkle_summary().2;
        self.run_session(Session::new(session, depth), call, observe).await
    }

    async fn run_session<F, Fut, E>(
        &self,
        mut s: Session,
        mut call: F,
        mut observe: impl FnMut(&Progress),
    ) -> Result<Progress, SyncError>
    where
        F: FnMut(Request) -> Fut,
        Fut: Future<Output = Result<Response, E>>,
        E: std::fmt::Display,
    {
        loop {
            match self.with_tree(|t| s.next_step(t)) {
                Step::NeedLocalItems(ids) => {
                    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                    let (items, unread) = self.get_stored_within(&refs, MAX_TRANSFER_BYTES).await?;
                    s.on_local_items(items.iter().map(wire_item).collect());
                    s.return_push(unread);
                }
                Step::Send(req) => {
                    observe(&s.progress());
                    let resp = call(req).await.map_err(|e| SyncError::Transport(e.to_string()))?;
                    let pulled = self.with_tree(|t| s.on_response(resp, t))?;
                    if let Some(items) = pulled {
                        self.apply_from_peer(items).await?;
                    }
                }
                Step::NeedLocalEntries(paths) => s.on_local_entries(self.entries_under_paths(&paths).await?),
                Step::NeedLocalKeys(keys) => s.on_local_keyed(self.entries_by_keys(&keys).await?.concat()),
                Step::Waiting => return Err(SyncError::Transport("session out of order".into())),
                Step::Done => return Ok(s.progress()),
            }
        }
    }
}

/// The engine as the replication core's storage: the same calls the
/// simulator makes on its in-memory stores.
impl Store for SyncEngine {
    type Error = StorageError;

    fn with_tree<R>(&self, f: impl FnOnce(&MerkleTree) -> R) -> R {
        SyncEngine::with_tree(self, f)
    }

    fn root_announcement(&self) -> RootsAnnouncement {
        SyncEngine::root_announcement(self)
    }

    fn definitely_missing(&self, id: &str) -> bool {
        SyncEngine::definitely_missing(self, id)
    }

    async fn is_current(&self, id: &str, content_hash: &[u8; 32]) -> Result<bool, StorageError> {
        SyncEngine::is_current(self, id, &hex::encode(content_hash)).await
    }

    async fn current(&self, id: &str) -> Result<Option<Entry>, StorageError> {
        Ok(self.current_entry(id).await?.map(entry_of))
    }

    async fn entries_under(&self, paths: &[String]) -> Result<Vec<(String, Vec<Entry>)>, StorageError> {
        self.entries_under_paths(paths).await
    }

    async fn entries_by_keys(&self, keys: &[[u8; 8]]) -> Result<Vec<Vec<Entry>>, StorageError> {
        Ok(self
            .merkle_entries_by_keys(keys)
            .await?
            .into_iter()
            .map(|list| list.into_iter().map(entry_of).collect())
            .collect())
    }

    async fn items_within(&self, ids: &[String], budget: usize) -> Result<(Vec<WireItem>, Vec<String>), StorageError> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (items, unread) = self.get_stored_within(&refs, budget).await?;
        Ok((items.iter().map(wire_item).collect(), unread))
    }

    async fn apply(&self, items: Vec<WireItem>) -> Result<u64, StorageError> {
        self.apply_from_peer(items).await
    }

    async fn ledger_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<PurgedEntry>, Option<String>), StorageError> {
        self.purge_ledger_page(after, limit).await
    }

    async fn import_ledger(&self, entries: Vec<PurgedEntry>) -> Result<u64, StorageError> {
        self.import_purge_ledger(entries).await
    }

    async fn purge(&self, below: u64, written_before_ms: u64, max: usize) -> Result<u64, StorageError> {
        self.purge_tombstones_written_before(below, written_before_ms as i64, max)
            .await
    }

    async fn prune_ledger(&self, retention_ms: u64) -> Result<u64, StorageError> {
        self.prune_purge_ledger(std::time::Duration::from_millis(retention_ms))
            .await
    }
}
