//! `/metrics`: the engine's and the replication layer's counters in
//! Prometheus text, prefix `syncnode_`. The counters live where they are
//! counted (atomics in the engine and the peer table); a scrape copies them
//! into a fresh registry, so nothing is counted twice.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::SyncEngine;
use crate::replication::swarm::NodeHandle;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionLabel {
    region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Renders every metric of the node.
pub async fn render(engine: &SyncEngine, net: &NodeHandle) -> String {
    let health = engine.health_check().await;
    let m = engine.metrics();
    let stats = &net.peers.stats;
    let mut r = Registry::with_prefix("syncnode");
    let counters: [(&str, &str, u64); 31] = [
        ("writes_accepted", "Writes accepted", load(&m.writes_accepted)),
        (
            "writes_refused",
            "Writes refused (backpressure)",
            load(&m.writes_refused),
        ),
        ("group_commits", "Group commits of the writer", load(&m.group_commits)),
        ("l3_errors", "Failed L3 calls", load(&m.l3_errors)),
        ("reads_l1", "Reads answered by L1", load(&m.reads_l1)),
        ("reads_l2", "Reads answered by L2 Redis", load(&m.reads_l2)),
        ("reads_l3", "Reads answered by L3", load(&m.reads_l3)),
        ("reads_missing", "Reads of absent ids", load(&m.reads_missing)),
        (
            "clock_deferrals",
            "Remote versions deferred for clock skew",
            load(&m.clock_deferrals),
        ),
        (
            "corruption_detected",
            "Content hash mismatches found",
            load(&m.corruption_detected),
        ),
        ("remote_applied", "Remote versions applied", load(&m.remote_applied)),
        ("remote_stale", "Remote versions older than ours", load(&m.remote_stale)),
        ("sessions", "Anti-entropy sessions run", load(&stats.sessions)),
        (
            "session_failures",
            "Anti-entropy sessions that failed",
            load(&stats.session_failures),
        ),
        (
            "divergent_paths",
            "Tree nodes compared in sessions",
            load(&stats.divergent_paths),
        ),
        ("items_pulled", "Items pulled by sessions", load(&stats.items_pulled)),
        ("items_pushed", "Items pushed by sessions", load(&stats.items_pushed)),
        (
            "cdc_published",
            "CDC messages published (each carries one or more deltas)",
            load(&stats.cdc_published),
        ),
        ("cdc_applied", "CDC deltas applied", load(&stats.cdc_applied)),
        (
            "cdc_dropped",
            "CDC deltas dropped (held already, older, or applier behind)",
            load(&stats.cdc_dropped),
        ),
        (
            "cdc_fetched",
            "CDC contents fetched from their author",
            load(&stats.cdc_fetched),
        ),
        (
            "roots_received",
            "Roots announcements received",
            load(&stats.roots_received),
        ),
        (
            "invalid_messages",
            "Invalid messages from peers",
            load(&stats.invalid_messages),
        ),
        (
            "rate_limited",
            "Requests and gossip refused by rate limits",
            load(&stats.rate_limited),
        ),
        ("peer_bans", "Peers banned for invalid messages", load(&stats.bans)),
        ("tombstones_purged", "Tombstones purged", load(&stats.tombstones_purged)),
        (
            "resurrections_refused",
            "Items refused because their delete was purged",
            engine.resurrections_refused(),
        ),
        (
            "sync_bytes_sent",
            "Bytes sent by sync and gossip",
            load(&net.traffic.sent),
        ),
        (
            "sync_bytes_received",
            "Bytes received by sync and gossip",
            load(&net.traffic.received),
        ),
        (
            "membership_bytes_sent",
            "Bytes sent by SWIM membership",
            load(&net.member_traffic.sent),
        ),
        (
            "membership_bytes_received",
            "Bytes received by SWIM membership",
            load(&net.member_traffic.received),
        ),
    ];
    for (name, help, v) in counters {
        r.register(name, help, ConstCounter::new(v));
    }
    let gauges: [(&str, &str, i64); 7] = [
        (
            "items",
            "Entries in the Merkle tree (live and tombstones)",
            health.merkle_items as i64,
        ),
        ("l1_items", "Items in L1", health.l1_items as i64),
        ("l1_bytes", "Bytes in L1", health.l1_bytes as i64),
        (
            "pending_items",
            "Writes accepted, not yet in L3",
            health.pending_items as i64,
        ),
        (
            "pending_bytes",
            "Bytes accepted, not yet in L3",
            health.pending_bytes as i64,
        ),
        ("ready", "1 when the engine serves", health.ready as i64),
        ("healthy", "1 when every configured tier answers", health.healthy as i64),
    ];
    for (name, help, v) in gauges {
        r.register(name, help, ConstGauge::new(v));
    }
    let lags = net.peers.lags();
    r.register("peers", "Connected peers", ConstGauge::new(lags.len() as i64));
    let lag = Family::<PeerLabel, Gauge>::default();
    for (peer, ms) in lags {
        lag.get_or_create(&PeerLabel { peer }).set(ms as i64);
    }
    r.register("peer_lag_ms", "Time since the peer last held what we hold", lag);
    let offset = Family::<PeerLabel, Gauge<f64, AtomicU64>>::default();
    let mut states: std::collections::BTreeMap<&str, i64> = ["alive", "suspect", "down", "left"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for m in net.members.view() {
        *states.entry(m.state).or_default() += 1;
        if let Some(ms) = m.clock_offset_ms {
            offset
                .get_or_create(&PeerLabel { peer: m.peer_id })
                .set(ms as f64 / 1000.0);
        }
    }
    r.register(
        "peer_clock_offset_seconds",
        "The member's clock minus ours (NTP-style estimate from membership traffic)",
        offset,
    );
    let members = Family::<StateLabel, Gauge>::default();
    for (state, n) in states {
        members.get_or_create(&StateLabel { state: state.into() }).set(n);
    }
    r.register(
        "members",
        "Cluster members by SWIM state (not counting this node)",
        members,
    );
    r.register(
        "purge_ledger_records",
        "Purged deletes remembered (kept ledger_retention)",
        ConstGauge::new(engine.purge_ledger_len().await.unwrap_or(0) as i64),
    );
    r.register(
        "writes_fenced",
        "1 while local writes are refused because this node's clock is ahead of most members",
        ConstGauge::new(engine.write_fence().is_some() as i64),
    );
    let alive = Family::<RegionLabel, Gauge>::default();
    let region_lag = Family::<RegionLabel, Gauge<f64, AtomicU64>>::default();
    let sent = Family::<RegionLabel, Counter>::default();
    let received = Family::<RegionLabel, Counter>::default();
    for v in net.peers.regions() {
        let label = RegionLabel { region: v.region };
        alive.get_or_create(&label).set(v.members_alive as i64);
        if let Some(ms) = v.lag_ms {
            region_lag.get_or_create(&label).set(ms as f64 / 1000.0);
        }
        sent.get_or_create(&label).inc_by(v.bytes_sent);
        received.get_or_create(&label).inc_by(v.bytes_received);
    }
    r.register("region_members_alive", "Members SWIM holds alive, per region", alive);
    r.register(
        "region_lag_seconds",
        "Per region: time since a connected peer there last held what we hold",
        region_lag,
    );
    r.register(
        "region_sent_bytes",
        "Sync bytes sent to the region's members (WAN bytes for other regions)",
        sent,
    );
    r.register(
        "region_received_bytes",
        "Sync bytes received from the region's members",
        received,
    );
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    out
}
