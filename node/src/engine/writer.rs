//! The write path behind `submit`: group commit and the L3 applier.
//!
//! All writes funnel through one writer task. It takes whatever is queued (up to
//! `batch_flush_count` items / `batch_flush_bytes`) as one batch, so concurrent
//! callers share one fsync. With SQLite as L3 the batch's L3 transaction is the
//! commit; with MySQL the batch is appended to the commit log (fsynced) and then
//! moved to MySQL in log order before the ack (waiting at most a second);
//! while MySQL is down or slow the ack stands on the log alone and the
//! drainer task moves the backlog once MySQL is back. Either way one function,
//! [`Core::apply_to_l3`], writes to L3 and then updates the existence filter,
//! the Merkle tree and L1, in that order, so an item is never absent from all of
//! pending, filter and L3 at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

use super::Core;
use super::error::StorageError;
use super::item::SyncItem;
use super::options::L2Route;
use super::quarantine::passing;
use crate::locks::RwLockUnpoisoned;

/// The outcome of each item of one caller's batch.
pub(crate) type Ack = oneshot::Sender<Vec<Result<(), StorageError>>>;

pub(crate) enum WriterCmd {
    /// Items to commit; `ack` answers once they are durable (Durable mode).
    Write { items: Vec<SyncItem>, ack: Option<Ack> },
    /// Answers once everything queued before it is committed.
    Barrier(oneshot::Sender<()>),
    /// Commits what is queued (and retries what is carried once more), then stops.
    Stop(oneshot::Sender<()>),
}

/// The writer as the rest of the engine holds it: the queue into the
/// writer task, and what the writer and the commit-log drainer share.
pub(crate) struct Writer {
    pub tx: mpsc::UnboundedSender<WriterCmd>,
    /// Wakes the drainer (MySQL L3: the commit log has entries to move).
    pub drain_kick: Arc<Notify>,
    /// One drain at a time (the drainer, an inline drain, a flush).
    pub drain_lock: tokio::sync::Mutex<()>,
    /// L3 answered the last write.
    pub sql_up: AtomicBool,
    /// An inline drain outran its wait: acks stand on the commit log alone
    /// until a drain empties it again.
    pub drain_late: AtomicBool,
}

impl Writer {
    pub(crate) fn new(tx: mpsc::UnboundedSender<WriterCmd>) -> Self {
        Self {
            tx,
            drain_kick: Arc::new(Notify::new()),
            drain_lock: tokio::sync::Mutex::new(()),
            sql_up: AtomicBool::new(true),
            drain_late: AtomicBool::new(false),
        }
    }
}

/// Keeps one version per id: the one that wins under LWW.
pub(crate) fn dedup_winners(items: Vec<SyncItem>) -> Vec<SyncItem> {
    let mut pos: HashMap<String, usize> = HashMap::with_capacity(items.len());
    let mut out: Vec<SyncItem> = Vec::with_capacity(items.len());
    for it in items {
        match pos.get(&it.object_id) {
            Some(&i) => {
                if it.stamp().wins_over(&out[i].stamp()) {
                    out[i] = it;
                }
            }
            None => {
                pos.insert(it.object_id.clone(), out.len());
                out.push(it);
            }
        }
    }
    out
}

impl Core {
    /// Writes a batch to L3 (LWW against what is stored), then updates filter,
    /// Merkle tree and L1. The only code that changes L3 items.
    pub(crate) async fn apply_to_l3(&self, items: Vec<SyncItem>) -> Result<(), StorageError> {
        let items = dedup_winners(items);
        let b = self.backends()?;
        let _guard = self.apply_lock.lock().await;
        if self.tree_unverified.load(Ordering::Acquire) {
            // A commit may have landed without the tree, filter and generation
            // hearing of it: rebuild them from L3 before writing more.
            b.l3.reload_generation().await?;
            self.rebuild_from_l3().await?;
            self.l2_mirror.stale.store(true, Ordering::Relaxed);
            self.tree_unverified.store(false, Ordering::Release);
        }
        // Under `apply_lock` the filter hears of every row L3 gains.
        let surely_absent = |id: &str| self.filter.might_exist(id) == Some(false);
        let applied = match b.l3.apply_batch(&items, surely_absent).await {
            Ok(a) => {
                b.writer.sql_up.store(true, Ordering::Relaxed);
                a
            }
            Err(e) => {
                if matches!(e, StorageError::Connection(_)) {
                    b.writer.sql_up.store(false, Ordering::Relaxed);
                }
                if b.l3.take_commit_uncertain() {
                    self.filter.mark_untrusted();
                    self.tree_unverified.store(true, Ordering::Release);
                }
                self.metrics.l3_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let mut written = vec![false; items.len()];
        {
            let mut tree = self.merkle.write_locked();
            for (i, old) in &applied.written {
                let it = &items[*i];
                if old.is_none() {
                    self.filter.insert(&it.object_id);
                }
                let old_digest = old.as_ref().map(|o| o.digest());
                let new_digest = it.digest();
                tree.tree.replace(old_digest.as_ref(), &new_digest);
                if let Some(d) = old_digest.as_ref().filter(|_| old.as_ref().is_some_and(|o| o.l2)) {
                    tree.l2view.remove(d);
                }
                if it.route == L2Route::Mirror {
                    tree.l2view.insert(&new_digest);
                }
                written[*i] = true;
            }
            tree.generation = applied.generation;
        }
        for (it, w) in items.iter().zip(written) {
            if w {
                self.l1.settle(it);
            } else {
                // A newer version is already stored: drop ours, and let reads go to L3.
                self.l1.forget_pending(it);
                self.l1.invalidate(&it.object_id);
            }
        }
        for (i, _) in &applied.written {
            self.search.note_write(&items[*i].object_id);
        }
        if let Some(l2) = &b.l2 {
            self.l2_mirror.mirror(l2, &self.search, &items, &applied.written).await;
        }
        self.metrics
            .l3_items_written
            .fetch_add(applied.written.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// How many times an open batch yields to callers that are still queueing.
const MAX_OPEN_YIELDS: u32 = 16;

/// The group-commit loop.
pub(crate) async fn run_writer(core: Arc<Core>, mut rx: mpsc::UnboundedReceiver<WriterCmd>) {
    let (max_items, max_bytes) = {
        let c = core.config();
        (c.batch_flush_count.max(1), c.batch_flush_bytes.max(1))
    };
    // Buffered writes whose commit failed, retried first next time.
    let mut carry: Vec<SyncItem> = Vec::new();
    loop {
        let first = if carry.is_empty() {
            match rx.recv().await {
                Some(c) => Some(c),
                None => break,
            }
        } else {
            // Wait a little before retrying, but take new commands meanwhile.
            tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .unwrap_or(None)
        };
        let mut items = std::mem::take(&mut carry);
        // Each durable caller's ack and the range of `items` it covers.
        let mut acks: Vec<(Ack, std::ops::Range<usize>)> = Vec::new();
        let mut barriers = Vec::new();
        let mut stop: Option<oneshot::Sender<()>> = None;
        let mut bytes: usize = items.iter().map(|i| i.content.len()).sum();
        let mut next = first;
        // The batch stays open while callers woken by the previous commit keep
        // queueing their next writes, so they join this commit instead of each
        // paying for one: it closes once a yield to them brings nothing new.
        let (mut yields, mut arrived) = (0, true);
        loop {
            arrived |= next.is_some();
            match next.take() {
                Some(WriterCmd::Write { items: batch, ack }) => {
                    bytes += batch.iter().map(|i| i.content.len()).sum::<usize>();
                    if let Some(a) = ack {
                        acks.push((a, items.len()..items.len() + batch.len()));
                    }
                    items.extend(batch);
                }
                Some(WriterCmd::Barrier(tx)) => barriers.push(tx),
                Some(WriterCmd::Stop(tx)) => stop = Some(tx),
                None => {}
            }
            if stop.is_some() || items.len() >= max_items || bytes >= max_bytes {
                break;
            }
            match rx.try_recv() {
                Ok(c) => next = Some(c),
                Err(_) if arrived && yields < MAX_OPEN_YIELDS => {
                    (yields, arrived) = (yields + 1, false);
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
        if !items.is_empty() {
            let started = std::time::Instant::now();
            let result = commit(&core, items.clone()).await;
            core.metrics.commit_seconds.since(started);
            core.metrics.group_commits.fetch_add(1, Ordering::Relaxed);
            // One result per item: a failure that is not the connection's may
            // be one item's, so the items are tried again one by one.
            let per_item = match &result {
                Ok(()) => vec![Ok(()); items.len()],
                Err(e) if passing(e) => vec![Err(e.clone()); items.len()],
                Err(e) => {
                    tracing::warn!(error = %e, items = items.len(), "group commit failed; committing its items one by one");
                    core.one_by_one(&items, |it| commit(&core, vec![it])).await
                }
            };
            if let Some(Err(e)) = per_item.iter().find(|r| matches!(r, Err(e) if passing(e))) {
                tracing::warn!(error = %e, items = items.len(), "commit failed");
            }
            let mut durable = vec![false; items.len()];
            for (_, range) in &acks {
                durable[range.clone()].iter_mut().for_each(|d| *d = true);
            }
            let mut committed = Vec::with_capacity(items.len());
            for ((it, r), durable) in items.into_iter().zip(&per_item).zip(durable) {
                match r {
                    Ok(()) => committed.push(it),
                    // Durable callers hear the error and their writes are withdrawn;
                    // buffered writes were already acknowledged, so keep retrying them.
                    Err(e) if passing(e) => {
                        if durable {
                            core.l1.forget_pending(&it);
                        } else {
                            carry.push(it);
                        }
                    }
                    Err(e) => core.quarantine(&it, e),
                }
            }
            core.publish_local(&committed);
            for (a, range) in acks {
                let _ = a.send(per_item[range].to_vec());
            }
        }
        for b in barriers {
            let _ = b.send(());
        }
        if let Some(done) = stop {
            finish(&core, std::mem::take(&mut carry)).await;
            let _ = done.send(());
            return;
        }
    }
    finish(&core, carry).await;
}

/// Last attempt for buffered writes that could not be committed yet.
async fn finish(core: &Arc<Core>, carry: Vec<SyncItem>) {
    if carry.is_empty() {
        return;
    }
    let n = carry.len();
    if let Err(e) = commit(core, carry).await {
        tracing::error!(error = %e, items = n, "buffered writes could not be committed before stopping");
    }
}

/// How long an acknowledgement waits for its batch to reach a MySQL L3 once
/// it is in the commit log (a healthy server takes milliseconds).
const INLINE_DRAIN_WAIT: Duration = Duration::from_secs(1);

/// Makes a batch durable: into the commit log (MySQL) or straight into L3 (SQLite).
async fn commit(core: &Arc<Core>, items: Vec<SyncItem>) -> Result<(), StorageError> {
    let b = core.backends()?;
    match &b.log {
        Some(log) => {
            log.append(&items).await?;
            // While L3 is up, move the batch on at once, so an acknowledged write
            // is in L3 (read-your-writes); when it is down the ack stands on the
            // log alone and the drainer catches up later.
            // The drain runs as a task of its own and the ack waits for it
            // at most INLINE_DRAIN_WAIT: a server that just went away costs
            // the pool's whole acquire timeout to notice, and those waiting
            // must not pay it. The drain is never cancelled midway (L3 could
            // end up ahead of the tree); it finishes or fails on its own.
            if b.writer.sql_up.load(Ordering::Relaxed) && !b.writer.drain_late.load(Ordering::Relaxed) {
                let task = core.clone();
                let drain = tokio::spawn(async move {
                    if let Err(e) = drain_log(&task).await {
                        tracing::warn!(error = %e, "L3 unreachable; writes stay in the commit log");
                        if let Ok(b) = task.backends() {
                            b.writer.drain_kick.notify_one();
                        }
                    }
                });
                if tokio::time::timeout(INLINE_DRAIN_WAIT, drain).await.is_err() {
                    tracing::debug!("L3 slow to answer; acks stand on the commit log until it is drained");
                    b.writer.drain_late.store(true, Ordering::Relaxed);
                    // The drain may have ended (and cleared the flag) just
                    // before: the drainer's next pass clears it again.
                    b.writer.drain_kick.notify_one();
                }
            }
            Ok(())
        }
        None => core.apply_to_l3(items).await,
    }
}

/// Moves the commit log into L3, oldest first. Returns entries drained.
pub(crate) async fn drain_log(core: &Core) -> Result<u64, StorageError> {
    let b = core.backends()?;
    let Some(log) = &b.log else { return Ok(0) };
    let _guard = b.writer.drain_lock.lock().await;
    let batch = core.config().commit_log_drain_batch.max(1);
    let mut drained = 0;
    loop {
        let entries = log.read(batch).await?;
        let Some(last) = entries.last().map(|e| e.seq) else {
            b.writer.drain_late.store(false, Ordering::Relaxed);
            return Ok(drained);
        };
        let n = entries.len() as u64;
        let items: Vec<SyncItem> = entries.iter().map(|e| e.item.clone()).collect();
        match core.apply_to_l3(items.clone()).await {
            Ok(()) => log.truncate_through(last).await?,
            Err(e) if passing(&e) => return Err(e),
            // One refused item must not hold the log back: in log order, each
            // is applied or quarantined, then let go.
            Err(e) => {
                tracing::warn!(error = %e, entries = n, "commit-log drain failed; draining one by one");
                let results = core.one_by_one(&items, |it| core.apply_to_l3(vec![it])).await;
                for ((entry, it), r) in entries.iter().zip(&items).zip(results) {
                    match r {
                        Ok(()) => {}
                        Err(e) if passing(&e) => return Err(e),
                        Err(e) => core.quarantine(it, &e),
                    }
                    log.truncate_through(entry.seq).await?;
                }
            }
        }
        drained += n;
        core.metrics.log_drained.fetch_add(n, Ordering::Relaxed);
    }
}

/// Drains whenever kicked, and retries with backoff while L3 is down.
pub(crate) async fn run_drainer(core: Arc<Core>) {
    let Ok(b) = core.backends() else { return };
    let kick = b.writer.drain_kick.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = kick.notified() => {}
            _ = tokio::time::sleep(backoff) => {}
        }
        if core.stopping.load(Ordering::Relaxed) && b.log.as_ref().is_none_or(|l| l.is_empty()) {
            return;
        }
        match drain_log(&core).await {
            Ok(_) => backoff = Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(error = %e, pending = b.log.as_ref().map_or(0, |l| l.len()), "commit log drain failed; will retry");
                backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_the_lww_winner_per_id() {
        let mk = |id: &str, v: u64, o: &str| {
            let mut i = SyncItem::new(id, &b"x"[..]);
            i.version = v;
            i.origin = o.into();
            i
        };
        let out = dedup_winners(vec![mk("a", 1, "n"), mk("b", 1, "n"), mk("a", 3, "n"), mk("a", 2, "z")]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].version, 3);
    }
}
