//! CDC, the receiving side (DESIGN §5.3): deltas that gossip validated are
//! applied in batches — `definitely_missing` → apply, `is_current` → drop,
//! otherwise last-writer-wins, inside `SyncEngine::receive_cdc` — and the
//! content of deltas that did not inline it is fetched from their author,
//! in request-sized chunks. Whatever fails here is left to anti-entropy.

use libp2p::PeerId;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use syncnode_protocol::session::MAX_ITEMS;
use syncnode_protocol::wire::{CdcDelta, Request, Response};
use tokio::sync::mpsc;

use super::peers::{Refusal, ReplicationStats};
use super::swarm::NodeHandle;
use crate::engine::SyncEngine;

/// Applies received deltas in batches (whatever has arrived, up to 4096, in
/// one commit; LWW makes their order irrelevant), fetching content that was
/// not inlined from the delta's author.
pub(super) async fn apply_cdc(engine: Arc<SyncEngine>, handle: NodeHandle, mut rx: mpsc::Receiver<(PeerId, CdcDelta)>) {
    let stats = &handle.peers.stats;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 4096
            && let Ok(next) = rx.try_recv()
        {
            batch.push(next);
        }
        let mut fetch_from: HashMap<String, PeerId> = HashMap::new();
        for (author, d) in &batch {
            fetch_from.insert(d.entry.id.clone(), *author);
        }
        let outcome = match engine.receive_cdc(batch.into_iter().map(|(_, d)| d).collect()).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "CDC batch not applied; anti-entropy will catch up");
                continue;
            }
        };
        ReplicationStats::add(&stats.cdc_applied, outcome.applied);
        ReplicationStats::add(&stats.cdc_dropped, outcome.dropped);
        let mut by_author: HashMap<PeerId, Vec<String>> = HashMap::new();
        for id in outcome.fetch {
            if let Some(author) = fetch_from.get(&id) {
                by_author.entry(*author).or_default().push(id);
            }
        }
        // Fetches run on their own, so a slow author stalls nobody else.
        for (author, ids) in by_author {
            let (engine, handle) = (engine.clone(), handle.clone());
            tokio::spawn(async move {
                let stats = &handle.peers.stats;
                match fetch_and_apply(&engine, &handle, author, ids).await {
                    Ok(n) => {
                        ReplicationStats::add(&stats.cdc_fetched, 1);
                        ReplicationStats::add(&stats.cdc_applied, n);
                    }
                    Err(e) => tracing::debug!(error = %e, "CDC fetch failed; anti-entropy will catch up"),
                }
            });
        }
    }
}

/// Fetches `ids` from `peer` in request-sized chunks, asking again for what
/// an answer defers (only ids we asked for, a bounded number of times), and
/// applies them; returns how many won.
async fn fetch_and_apply(
    engine: &SyncEngine,
    handle: &NodeHandle,
    peer: PeerId,
    ids: Vec<String>,
) -> Result<u64, String> {
    let asked: HashSet<String> = ids.iter().cloned().collect();
    let mut queue = ids;
    let mut applied = 0;
    let mut rounds = 0;
    while !queue.is_empty() {
        rounds += 1;
        if rounds > asked.len() + 8 {
            return Err("peer keeps deferring".into());
        }
        let rest = queue.split_off(queue.len().min(MAX_ITEMS));
        let chunk = std::mem::replace(&mut queue, rest);
        let mut tries = 0;
        let answer = loop {
            match handle
                .request(
                    peer,
                    Request::Fetch {
                        session: 0,
                        ids: chunk.clone(),
                    },
                )
                .await?
            {
                Response::Refused { reason } if Refusal::is_retryable(&reason) && tries < 5 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
                other => break other,
            }
        };
        match answer {
            Response::Fetch { items, deferred } => {
                applied += engine.apply_from_peer(items).await.map_err(|e| e.to_string())?;
                queue.extend(deferred.into_iter().filter(|id| asked.contains(id)));
            }
            other => return Err(format!("fetch answered with {other:?}")),
        }
    }
    Ok(applied)
}
