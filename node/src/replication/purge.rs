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

use syncnode_protocol::hlc::from_physical;

use super::peers::{Peers, ReplicationStats};
use crate::engine::SyncEngine;

/// Most tombstones purged per pass (one L3 transaction).
const PER_PASS: usize = 10_000;

/// The version below which tombstones may be purged now, if any.
pub fn purge_bound(peers: &Peers, wall_ms: u64, grace: Duration) -> Option<u64> {
    let members = peers.purge_watermark()?;
    // HLC versions carry wall-clock ms in their high bits.
    let grace_bound = from_physical(wall_ms.saturating_sub(grace.as_millis() as u64));
    Some(members.min(grace_bound))
}

/// Runs the purge every `grace / 2` (between 1 s and 5 min).
pub fn spawn(engine: Arc<SyncEngine>, peers: Arc<Peers>, grace: Duration, ledger_retention: Duration) {
    let every = (grace / 2).clamp(Duration::from_secs(1), Duration::from_secs(300));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(bound) = purge_bound(&peers, crate::engine::item::now_ms().max(0) as u64, grace) else {
                continue;
            };
            match engine.purge_tombstones(bound, grace, PER_PASS).await {
                Ok(n) => ReplicationStats::add(&peers.stats.tombstones_purged, n),
                Err(e) => tracing::warn!(error = %e, "tombstone purge failed; retrying later"),
            }
            if let Err(e) = engine.prune_purge_ledger(ledger_retention).await {
                tracing::warn!(error = %e, "purge ledger pruning failed; retrying later");
            }
        }
    });
}
