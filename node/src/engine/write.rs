//! The local write path: the refusal rule (backpressure, the commit log's
//! room, the fence), validation, stamping with the HLC, and submission to
//! the writer; deletes as versioned tombstones; state changes that keep an
//! item's routing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::oneshot;

use super::item::{self, content_hashes, now_ms, validate_item, validate_prefix, validate_state};
use super::writer::WriterCmd;
use super::{
    AckMode, BackpressureLevel, BatchResult, CacheTtl, ItemStatus, L2Route, StorageError, SubmitOptions, SyncEngine,
    SyncItem, WriteReceipt, content_hash, validate_id,
};

use crate::locks::{MutexUnpoisoned, RwLockUnpoisoned};

impl SyncEngine {
    /// `(pending bytes + L1 cache bytes) / l1_max_bytes`.
    pub fn memory_pressure(&self) -> f64 {
        self.core.memory_pressure()
    }

    pub fn pressure(&self) -> BackpressureLevel {
        BackpressureLevel::from_pressure(self.memory_pressure())
    }

    pub fn should_accept_writes(&self) -> bool {
        self.write_refusal().is_none()
    }

    /// Refuses local writes (`Some(reason)`) until lifted (`None`): the
    /// node fences them while its clock is ahead of the cluster's, so its
    /// versions cannot win conflicts they should lose. Replication goes on.
    pub fn set_write_fence(&self, reason: Option<String>) {
        *self.fence.locked() = reason;
    }

    /// Why local writes are fenced, if they are.
    pub fn write_fence(&self) -> Option<String> {
        self.fence.locked().clone()
    }

    /// Why a write would be refused now, if it would.
    pub(super) fn write_refusal(&self) -> Option<StorageError> {
        let state = self.state();
        if self.core.stopping.load(Ordering::Relaxed) || !state.is_ready() {
            return Some(StorageError::NotReady(format!("{state:?}").to_lowercase()));
        }
        if let Some(reason) = self.write_fence() {
            return Some(StorageError::Fenced(reason));
        }
        let level = self.pressure();
        if !level.should_accept_writes() {
            return Some(StorageError::Backpressure {
                level,
                reason: "memory pressure".into(),
                retry_after_secs: level.retry_after_secs(),
            });
        }
        let cfg = self.core.config.read_locked();
        if let Ok(Some(log)) = self.core.backends().map(|b| b.log.as_ref())
            && (log.len() >= cfg.commit_log_max_items || log.bytes() >= cfg.commit_log_max_bytes)
        {
            return Some(StorageError::Backpressure {
                level: BackpressureLevel::Critical,
                reason: format!(
                    "commit log full ({} items, {} bytes) while L3 is unreachable",
                    log.len(),
                    log.bytes()
                ),
                retry_after_secs: 5,
            });
        }
        None
    }

    pub(super) fn check_writable(&self) -> Result<(), StorageError> {
        match self.write_refusal() {
            Some(e) => {
                self.core.metrics.writes_refused.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            None => Ok(()),
        }
    }

    // ----- writes -----

    /// Stores `item` with default options (durable acknowledgement).
    pub async fn submit(&self, item: SyncItem) -> Result<WriteReceipt, StorageError> {
        self.submit_with(item, SubmitOptions::default()).await
    }

    /// Stores `item` as a new local version.
    pub async fn submit_with(&self, item: SyncItem, options: SubmitOptions) -> Result<WriteReceipt, StorageError> {
        let mut receipts = self.submit_batch(vec![item], &options).await?;
        receipts.pop().expect("one receipt per item")
    }

    /// Stores many items as one batch (one transaction when they fit one).
    /// Invalid items are counted as failed and stored nowhere.
    pub async fn submit_many(&self, items: Vec<SyncItem>) -> Result<BatchResult, StorageError> {
        self.submit_many_with(items, SubmitOptions::default()).await
    }

    /// `submit_many` with routing options for the whole batch.
    pub async fn submit_many_with(
        &self,
        items: Vec<SyncItem>,
        options: SubmitOptions,
    ) -> Result<BatchResult, StorageError> {
        let total = items.len();
        let receipts = self.submit_batch(items, &options).await?;
        let succeeded = receipts.iter().filter(|r| r.is_ok()).count();
        Ok(BatchResult {
            total,
            succeeded,
            failed: total - succeeded,
        })
    }

    /// Validates, stamps and commits; one result per item.
    pub(super) async fn submit_batch(
        &self,
        items: Vec<SyncItem>,
        options: &SubmitOptions,
    ) -> Result<Vec<Result<WriteReceipt, StorageError>>, StorageError> {
        self.submit_as(items, options, false).await
    }

    /// `submit_batch`; `engine` also lets the engine's reserved ids through.
    pub(crate) async fn submit_as(
        &self,
        items: Vec<SyncItem>,
        options: &SubmitOptions,
        engine: bool,
    ) -> Result<Vec<Result<WriteReceipt, StorageError>>, StorageError> {
        self.check_writable()?;
        let cache_only =
            match (options.sql, options.redis) {
                (true, _) => None,
                (false, true) => Some(self.core.backends()?.l2.clone().ok_or_else(|| {
                    StorageError::InvalidInput("cache-only writes (sql = false) need redis_url".into())
                })?),
                (false, false) => return Err(StorageError::InvalidInput("options store the item nowhere".into())),
            };
        if let Some(s) = &options.state {
            validate_state(s)?;
        }
        let max_payload = self.core.max_payload();
        let node = self.node_id();
        let now = now_ms();
        let mut results = Vec::with_capacity(items.len());
        let mut stamped = Vec::with_capacity(items.len());
        let mut items = items;
        if let Some(s) = &options.state {
            items.iter_mut().for_each(|item| item.state = s.clone());
        }
        let checks: Vec<Result<(), StorageError>> = items
            .iter()
            .map(|item| {
                validate_item(item, max_payload).and_then(|()| match engine {
                    true => Ok(()),
                    false => item::check_not_reserved(&item.object_id),
                })
            })
            .collect();
        let contents: Vec<&[u8]> = items
            .iter()
            .zip(&checks)
            .filter(|(_, c)| c.is_ok())
            .map(|(item, _)| &item.content[..])
            .collect();
        let mut hashes = content_hashes(&contents).into_iter();
        {
            let mut hlc = self.core.hlc.locked();
            for (mut item, checked) in items.into_iter().zip(checks) {
                if let Err(e) = checked {
                    results.push(Err(e));
                    continue;
                }
                // One hash per item that passed; the fallback never runs.
                item.content_hash = hashes.next().unwrap_or_else(|| content_hash(&item.content));
                item.version = hlc.now(now as u64);
                item.origin = node.clone();
                item.updated_at = now;
                item.route = match (cache_only.is_some(), options.l2_route()) {
                    (true, L2Route::Expiring(s)) => L2Route::Expiring(s),
                    (true, _) => L2Route::Skip,
                    (false, r) => r,
                };
                results.push(Ok(WriteReceipt {
                    id: item.object_id.clone(),
                    version: item.version,
                    origin: item.origin.clone(),
                    content_hash: item.content_hash.clone(),
                }));
                stamped.push(item);
            }
        }
        if stamped.is_empty() {
            return Ok(results);
        }
        if let Some(l2) = cache_only {
            if let Err(e) = self
                .core
                .l2_mirror
                .put_cache_only(&l2, &self.core.search, &stamped)
                .await
            {
                return Ok(results.into_iter().map(|r| r.and(Err(e.clone()))).collect());
            }
            for it in &stamped {
                self.core.search.note_write(&it.object_id);
                // L1 may hold an older version; the next read promotes this one.
                self.core.l1.invalidate(&it.object_id);
            }
            return Ok(results);
        }
        match self.commit_stamped(stamped, options.ack).await {
            // Each stamped item's own outcome (one refused item fails alone).
            Ok(committed) => {
                let mut committed = committed.into_iter();
                Ok(results
                    .into_iter()
                    .map(|r| r.and_then(|receipt| committed.next().unwrap_or(Ok(())).map(|()| receipt)))
                    .collect())
            }
            Err(e) => Ok(results.into_iter().map(|r| r.and(Err(e.clone()))).collect()),
        }
    }

    /// Makes stamped items pending and hands them to the writer; with a
    /// durable ack, the outcome of each item once committed.
    pub(super) async fn commit_stamped(
        &self,
        items: Vec<SyncItem>,
        ack: AckMode,
    ) -> Result<Vec<Result<(), StorageError>>, StorageError> {
        let b = self.core.backends()?;
        let n = items.len() as u64;
        for it in &items {
            self.core.l1.add_pending(it.clone());
        }
        let (tx, rx) = oneshot::channel();
        let ack_tx = (ack == AckMode::Durable).then_some(tx);
        if b.writer.tx.send(WriterCmd::Write { items, ack: ack_tx }).is_err() {
            return Err(StorageError::NotReady("writer stopped".into()));
        }
        let results = if ack == AckMode::Durable {
            rx.await.map_err(|_| StorageError::NotReady("writer stopped".into()))?
        } else {
            vec![Ok(()); n as usize]
        };
        let accepted = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.core.metrics.writes_accepted.fetch_add(accepted, Ordering::Relaxed);
        Ok(results)
    }

    /// Deletes `id` by writing a tombstone. Returns whether a live item
    /// existed (`false` also when L3 was unreachable to tell).
    pub async fn delete(&self, id: &str) -> Result<bool, StorageError> {
        Ok(self.delete_receipt(id).await?.0 == Some(true))
    }

    /// Deletes `id`; returns whether a live item existed (`None`: L3 was
    /// unreachable to tell, the tombstone is written all the same) and the
    /// receipt of the tombstone (its version and origin, what LWW compares).
    pub async fn delete_receipt(&self, id: &str) -> Result<(Option<bool>, WriteReceipt), StorageError> {
        let (found, mut receipts) = self.write_tombstones(&[id]).await?;
        let receipt = receipts.pop().expect("one tombstone per id")?;
        Ok((found.map(|n| n == 1), receipt))
    }

    /// Deletes many ids in one batch; `succeeded` counts those known to have
    /// existed.
    pub async fn delete_many(&self, ids: &[&str]) -> Result<BatchResult, StorageError> {
        let (found, results) = self.write_tombstones(ids).await?;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        Ok(BatchResult {
            total: ids.len(),
            succeeded: found.unwrap_or(0),
            failed: 0,
        })
    }

    /// Writes a fresh tombstone per id, in order; returns how many ids were
    /// live (`None` when L3 could not tell) and each tombstone's result.
    pub(super) async fn write_tombstones(
        &self,
        ids: &[&str],
    ) -> Result<(Option<usize>, Vec<Result<WriteReceipt, StorageError>>), StorageError> {
        self.check_writable()?;
        for id in ids {
            validate_id(id)?;
            item::check_not_reserved(id)?;
        }
        // A delete is a write: while a MySQL L3 is down it goes to the commit
        // log like any other, without waiting to learn what it replaces.
        let mut l3_up = self.core.backends()?.writer.sql_up.load(Ordering::Relaxed);
        // A tombstone also for ids not here (yet): the delete must win over
        // a version still on its way from a peer.
        let mut tombstones = Vec::new();
        let mut found = 0;
        for chunk in ids.chunks(500) {
            let current = if l3_up {
                match self.current_entries(chunk).await {
                    Ok(c) => c,
                    Err(StorageError::Connection(_)) => {
                        l3_up = false;
                        self.l1_entries(chunk)
                    }
                    Err(e) => return Err(e),
                }
            } else {
                self.l1_entries(chunk)
            };
            // Ids L3 does not hold may be cache-only items, which live in Redis alone.
            let cache_only = if l3_up {
                self.cache_only_items(chunk).await?
            } else {
                Vec::new()
            };
            if !cache_only.is_empty() {
                let l2 = self.core.backends()?.l2.clone();
                if let Some(l2) = l2 {
                    self.core
                        .l2_mirror
                        .remove_cache_only(&l2, &self.core.search, &cache_only)
                        .await?;
                }
            }
            let mut cached: HashMap<String, String> = HashMap::new();
            for it in cache_only {
                found += 1;
                cached.insert(it.object_id, it.state);
            }
            for id in chunk {
                if let Some(state) = cached.remove(*id) {
                    tombstones.push(SyncItem::tombstone(id.to_string()).with_state(state));
                    continue;
                }
                // Always a fresh tombstone, even over an old one: this delete
                // must beat any version made before it, wherever it is.
                match current.get(*id) {
                    Some(c) => {
                        found += usize::from(!c.tombstone);
                        tombstones.push(SyncItem::tombstone(id.to_string()).with_state(c.state.clone()));
                    }
                    None => tombstones.push(SyncItem::tombstone(id.to_string())),
                }
            }
        }
        let results = self.submit_batch(tombstones, &SubmitOptions::default()).await?;
        Ok((l3_up.then_some(found), results))
    }

    /// Deletes every live item whose id starts with `prefix`. Returns how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        validate_prefix(prefix)?;
        let b = self.core.backends()?;
        let mut ids = b.l3.ids_with_prefix(prefix, usize::MAX >> 1).await?;
        ids.extend(
            self.core
                .l1
                .pending_ids_with_prefix(prefix)
                .into_iter()
                .filter(|id| !(item::hides_reserved(prefix) && id.starts_with(item::RESERVED))),
        );
        ids.sort();
        ids.dedup();
        self.delete_listed(&ids).await
    }

    /// Deletes ids L3 just listed as live; returns how many (all of them
    /// when L3 goes away before it can tell).
    pub(super) async fn delete_listed(&self, ids: &[String]) -> Result<u64, StorageError> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (found, results) = self.write_tombstones(&refs).await?;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        Ok(found.unwrap_or(refs.len()) as u64)
    }

    /// Deletes every live item in `state`. Returns how many.
    pub async fn delete_by_state(&self, state: &str) -> Result<u64, StorageError> {
        validate_state(state)?;
        let ids = self.core.backends()?.l3.state_ids(state, usize::MAX >> 1).await?;
        self.delete_listed(&ids).await
    }

    /// Moves a live item to `new_state` (a new version, so it replicates).
    /// Returns whether the item existed.
    pub async fn set_state(&self, id: &str, new_state: &str) -> Result<bool, StorageError> {
        validate_state(new_state)?;
        let Some(item) = self.get(id).await? else {
            return Ok(false);
        };
        let options = self.options_of(&item).await?.with_state(new_state.to_string());
        let (cache_only, old_state) = (!options.sql, item.state.clone());
        self.submit_with(item, options).await?;
        // A cache-only write does not know the state it replaces: leave its set here.
        if cache_only
            && old_state != new_state
            && let Some(l2) = self.core.backends()?.l2.clone()
        {
            self.core.l2_mirror.leave_state_set(&l2, id, &old_state).await?;
        }
        Ok(true)
    }

    /// The options `item` was written with, so a rewrite keeps its routing:
    /// cache-only stays cache-only, a Redis copy keeps its expiry, a durable
    /// item stays out of Redis.
    pub(super) async fn options_of(&self, item: &SyncItem) -> Result<SubmitOptions, StorageError> {
        let l2 = self.core.backends()?.l2.clone();
        let ttl = match (&l2, item.route) {
            (_, L2Route::Expiring(s)) => Some(s),
            (Some(l2), L2Route::Skip) => l2.ttl_secs(&item.object_id).await?,
            _ => None,
        }
        .map(|s| CacheTtl::from(Duration::from_secs(s)));
        let cache_only = matches!(
            self.status(&item.object_id).await?,
            ItemStatus::Synced { in_l3: false, .. }
        );
        Ok(match (cache_only, item.route, ttl) {
            (true, _, ttl) => SubmitOptions {
                redis: true,
                sql: false,
                redis_ttl: ttl,
                ..SubmitOptions::default()
            },
            (false, _, Some(ttl)) => SubmitOptions {
                redis_ttl: Some(ttl),
                ..SubmitOptions::default()
            },
            (false, L2Route::Mirror, None) => SubmitOptions::default(),
            (false, _, None) => SubmitOptions::durable(),
        })
    }

    // ----- reads -----
}
