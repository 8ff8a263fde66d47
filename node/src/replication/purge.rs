//! Tombstone purge, the cluster's half (DESIGN §6): a tombstone may go only
//! when every member is known to hold it. The peer table keeps, per member,
//! the HLC below which the member was last proven to hold everything we hold
//! (roots equal); the purge runs below the minimum of those watermarks and
//! below `now - tombstone_grace`. What keeps deletes deleted is the purge
//! ledger (engine/purge.rs): a member that missed a delete and offers the
//! item later gets the original tombstone back. A member silent past
//! `member_expiry` stops counting; ledger records live `ledger_retention`,
//! so a member away for less heals through the ledger, and one away longer
//! must resync (`syncnode resync`; it is logged and flagged in `/v1/peers`).

use std::sync::Arc;
use std::time::Duration;

use syncnode_protocol::replica::{Now, PURGE_PER_PASS, purge_every};

use super::peers::{Peers, ReplicationStats};
use crate::engine::SyncEngine;

/// The version below which tombstones may be purged at `wall_ms`, if any
/// (the core's rule over this node's members).
pub fn purge_bound(peers: &Peers, wall_ms: u64, grace: Duration) -> Option<u64> {
    let now = Now { wall_ms, ..peers.now() };
    syncnode_protocol::replica::purge_bound(peers.purge_watermark(), now, grace.as_millis() as u64)
}

/// Runs the purge every `grace / 2` (between 1 s and 5 min), below the
/// core's bound.
pub fn spawn(engine: Arc<SyncEngine>, peers: Arc<Peers>, grace: Duration, ledger_retention: Duration) {
    let every = Duration::from_millis(purge_every(grace.as_millis() as u64));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(bound) = purge_bound(&peers, peers.now().wall_ms, grace) else {
                continue;
            };
            match engine.purge_tombstones(bound, grace, PURGE_PER_PASS).await {
                Ok(n) => ReplicationStats::add(&peers.stats.tombstones_purged, n),
                Err(e) => tracing::warn!(error = %e, "tombstone purge failed; retrying later"),
            }
            if let Err(e) = engine.prune_purge_ledger(ledger_retention).await {
                tracing::warn!(error = %e, "purge ledger pruning failed; retrying later");
            }
        }
    });
}
