//! `/metrics`: the node's metrics, prefix `syncnode_`, in base units
//! (seconds, bytes), as OpenMetrics text or the Prometheus text format
//! (0.0.4) when the scraper asks for that.
//!
//! Counters live where they are counted (atomics in the engine and the
//! peer table); a scrape copies them into a fresh registry, so nothing is
//! counted twice. Histograms are shared handles registered at each scrape.
//! libp2p's families sit in a registry of their own (the swarm records
//! into it), appended to the same exposition.

use axum::http::HeaderMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::SyncEngine;
use crate::replication::swarm::NodeHandle;

/// The content type of OpenMetrics text, the default.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

/// One HTTP request's labels: the route as declared (`/v1/items/{id}`),
/// never the raw path, so ids do not become series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

type HttpFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// HTTP request durations by route (recorded by the API's middleware).
#[derive(Clone, Debug)]
pub struct HttpMetrics(HttpFamily);

impl Default for HttpMetrics {
    fn default() -> Self {
        Self(Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        }))
    }
}

impl HttpMetrics {
    pub fn observe(&self, labels: HttpLabels, seconds: f64) {
        self.0.get_or_create(&labels).observe(seconds);
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Whether the scraper asked for the Prometheus text format: it accepts
/// `text/plain` and not OpenMetrics. Anything else gets OpenMetrics.
pub fn wants_text_format(headers: &HeaderMap) -> bool {
    let accept = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    accept.contains("text/plain") && !accept.contains("application/openmetrics-text")
}

/// Renders every metric of the node as OpenMetrics text.
pub async fn render(
    engine: &SyncEngine,
    net: &NodeHandle,
    http: &HttpMetrics,
    connections: &crate::api::server::ConnectionStats,
) -> String {
    let mut root = Registry::default();
    register_process(&mut root);
    let r = root.sub_registry_with_prefix("syncnode");
    let health = engine.health_check().await;
    let m = engine.metrics();
    let stats = &net.peers.stats;
    r.register(
        "build",
        "The node's version and wire protocol versions",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("wire_version", syncnode_protocol::wire::WIRE_VERSION.to_string()),
            (
                "min_wire_version",
                syncnode_protocol::wire::MIN_WIRE_VERSION.to_string(),
            ),
        ]),
    );
    let counters: [(&str, &str, u64); 30] = [
        ("writes_accepted", "Writes accepted", load(&m.writes_accepted)),
        (
            "writes_refused",
            "Writes refused (backpressure)",
            load(&m.writes_refused),
        ),
        ("group_commits", "Group commits of the writer", load(&m.group_commits)),
        ("l3_errors", "Failed L3 calls", load(&m.l3_errors)),
        (
            "writes_quarantined",
            "Writes L3 refused for good and dropped (listed in /health)",
            load(&m.writes_quarantined),
        ),
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
        (
            "rateless_sessions",
            "Anti-entropy sessions that found the difference from coded symbols, without walking the tree",
            load(&stats.rateless_sessions),
        ),
        (
            "coded_symbols_received",
            "Coded symbols received by anti-entropy sessions",
            load(&stats.coded_symbols),
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
            "sync_sent_bytes",
            "Bytes sent by sync and gossip",
            load(&net.traffic.sent),
        ),
        (
            "sync_received_bytes",
            "Bytes received by sync and gossip",
            load(&net.traffic.received),
        ),
        (
            "membership_sent_bytes",
            "Bytes sent by SWIM membership",
            load(&net.member_traffic.sent),
        ),
        (
            "membership_received_bytes",
            "Bytes received by SWIM membership",
            load(&net.member_traffic.received),
        ),
    ];
    for (name, help, v) in counters {
        r.register(name, help, ConstCounter::new(v));
    }
    let reads = Family::<TierLabel, Counter>::default();
    for (tier, n) in [
        ("l1", &m.reads_l1),
        ("l2", &m.reads_l2),
        ("l3", &m.reads_l3),
        ("missing", &m.reads_missing),
    ] {
        reads.get_or_create(&TierLabel { tier }).inc_by(load(n));
    }
    r.register(
        "reads",
        "Reads by the tier that answered them (missing: the id is absent)",
        reads,
    );
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
    for (name, help, h) in [
        (
            "commit_duration_seconds",
            "Time of each group commit of the writer",
            &m.commit_seconds,
        ),
        (
            "session_duration_seconds",
            "Time of each anti-entropy session this node ran",
            &net.metrics.session_seconds,
        ),
        (
            "cdc_apply_duration_seconds",
            "Time to apply one batch of CDC deltas (one durable commit)",
            &net.metrics.cdc_apply_seconds,
        ),
    ] {
        r.register(name, help, h.0.clone());
    }
    r.register(
        "http_connections_open",
        "HTTP connections open now",
        ConstGauge::new(load(&connections.open) as i64),
    );
    r.register(
        "http_connections_accepted",
        "HTTP connections accepted",
        ConstCounter::new(load(&connections.accepted)),
    );
    r.register(
        "http_connections_idle_closed",
        "HTTP connections closed by the idle timeout",
        ConstCounter::new(load(&connections.idle_closed)),
    );
    r.register(
        "http_request_duration_seconds",
        "HTTP requests by method, route and status",
        http.0.clone(),
    );
    let lags = net.peers.lags();
    r.register("peers", "Connected peers", ConstGauge::new(lags.len() as i64));
    let lag = Family::<PeerLabel, Gauge<f64, AtomicU64>>::default();
    for (peer, ms) in lags {
        lag.get_or_create(&PeerLabel { peer }).set(ms as f64 / 1000.0);
    }
    r.register("peer_lag_seconds", "Time since the peer last held what we hold", lag);
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
    let mut p2p = String::new();
    let encoded = prometheus_client::encoding::text::encode_registry(&mut out, &root)
        .and_then(|()| prometheus_client::encoding::text::encode(&mut p2p, &net.metrics.p2p));
    if let Err(e) = encoded {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    // `encode` ends with `# EOF`: one exposition, ours then libp2p's.
    out + &p2p
}

/// The process's CPU time, memory and file descriptors, from `/proc`, under
/// the names every exporter uses (`process_*`).
fn register_process(r: &mut Registry) {
    let Some(p) = process_stats() else { return };
    r.register(
        "process_cpu_seconds",
        "User and system CPU time spent",
        ConstCounter::new(p.cpu_seconds),
    );
    for (name, help, v) in [
        ("process_resident_memory_bytes", "Resident memory size", p.rss_bytes),
        ("process_virtual_memory_bytes", "Virtual memory size", p.vm_bytes),
        ("process_open_fds", "Open file descriptors", p.open_fds),
        ("process_max_fds", "The open file descriptor limit", p.max_fds),
        (
            "process_start_time_seconds",
            "Start time, seconds since the Unix epoch",
            p.start_time,
        ),
    ] {
        r.register(name, help, ConstGauge::<f64>::new(v));
    }
}

/// The process's soft limit of open files (`/proc/self/limits`).
pub fn open_files_limit() -> Option<f64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
}

struct ProcessStats {
    cpu_seconds: f64,
    rss_bytes: f64,
    vm_bytes: f64,
    open_fds: f64,
    max_fds: f64,
    start_time: f64,
}

/// Linux's clock tick for `/proc` times: `USER_HZ`, 100 on every
/// architecture's ABI.
const USER_HZ: f64 = 100.0;

fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // man proc_pid_stat: utime (14), stime (15), starttime (22), numbered from 1;
    // `fields` starts at field 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|v| v * 1024.0)
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    let max_fds = open_files_limit().unwrap_or(f64::INFINITY);
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) / USER_HZ,
        rss_bytes: kb("VmRSS:")?,
        vm_bytes: kb("VmSize:")?,
        open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as f64,
        max_fds,
        start_time: boot + field(22)? / USER_HZ,
    })
}

/// OpenMetrics text turned into the Prometheus text format (0.0.4): no
/// `# EOF` or `# UNIT`, counters' HELP and TYPE under their `_total`
/// series, info metrics as gauges named `_info`.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind {
                "counter" => renamed.insert(name, (format!("{name}_total"), "counter")),
                "info" => renamed.insert(name, (format!("{name}_info"), "gauge")),
                "unknown" => renamed.insert(name, (name.to_string(), "untyped")),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                match renamed.get(name) {
                    Some((new, kind)) if prefix == "# TYPE " => out.push_str(&format!("# TYPE {new} {kind}")),
                    Some((new, _)) => out.push_str(&format!("{prefix}{new} {tail}")),
                    None => out.push_str(line),
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_and_infos_by_their_series() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total 3\n\
                  # HELP a_build Build.\n# TYPE a_build info\na_build_info{version=\"1\"} 1\n\
                  # HELP a_g G.\n# TYPE a_g gauge\n# UNIT a_g seconds\na_g 1.5\n# EOF\n";
        let text = to_text_format(om);
        assert_eq!(
            text,
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total 3\n\
             # HELP a_build_info Build.\n# TYPE a_build_info gauge\na_build_info{version=\"1\"} 1\n\
             # HELP a_g G.\n# TYPE a_g gauge\na_g 1.5\n"
        );
    }

    #[test]
    fn accept_header_picks_the_format() {
        let mut h = HeaderMap::new();
        assert!(!wants_text_format(&h));
        h.insert("accept", "text/plain;version=0.0.4".parse().unwrap());
        assert!(wants_text_format(&h));
        h.insert(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
                .parse()
                .unwrap(),
        );
        assert!(!wants_text_format(&h));
    }

    #[test]
    fn process_stats_read_from_proc() {
        let p = process_stats().expect("/proc is readable");
        assert!(p.rss_bytes > 0.0 && p.open_fds >= 3.0 && p.max_fds >= p.open_fds);
        assert!(p.start_time > 1.6e9);
    }
}
