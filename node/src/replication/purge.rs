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

use std::time::Duration;

use syncnode_protocol::replica::Now;

use super::peers::Peers;

/// The version below which tombstones may be purged at `wall_ms`, if any
/// (the core's rule over this node's members; the core also keeps to
/// tombstones written here before the members' proofs).
pub fn purge_bound(peers: &Peers, wall_ms: u64, grace: Duration) -> Option<u64> {
    let now = Now { wall_ms, ..peers.now() };
    syncnode_protocol::replica::purge_bound(peers.purge_watermark(), now, grace.as_millis() as u64).map(|b| b.0)
}
