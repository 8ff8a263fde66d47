//! The settings of `syncnode run`: a TOML file (`--config`), then
//! `SYNCNODE_*` environment variables, then flags, each later source winning
//! key by key. One `Settings` struct is both the TOML table and the clap
//! arguments, so a key is spelled the same everywhere (`data_dir`,
//! `SYNCNODE_DATA_DIR`, `--data-dir`). `NodeConfig::resolve` applies the
//! defaults and checks every value, naming the key of a bad one.

use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::SyncEngineConfig;
use crate::replication::addressing::peer_of;

/// Every key, as one source gives it (unset = not given by that source).
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Node files: identity, embedded SQLite, commit log, members. [default: ./syncnode-data]
    #[arg(long, env = "SYNCNODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Origin of this node's writes. [default: the peer id]
    #[arg(long, env = "SYNCNODE_NODE_ID")]
    pub node_id: Option<String>,
    /// libp2p listen multiaddr (repeatable). [default: /ip4/0.0.0.0/tcp/7070]
    #[arg(long, env = "SYNCNODE_LISTEN", value_delimiter = ',')]
    pub listen: Option<Vec<String>>,
    /// A member to join through (repeatable): `/ip4/…/tcp/…/p2p/<peer id>`,
    /// or `/dns4/<name>/tcp/…` (the `/p2p/` part may be left out: then any
    /// node answering there with the cluster's key is taken). Only a seed:
    /// the node learns every member from any one. [default: none]
    #[arg(long, env = "SYNCNODE_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Option<Vec<String>>,
    /// Address other nodes dial, a multiaddr; may be `/dns4/…` (repeatable).
    /// [default: the listen addresses, 0.0.0.0 and :: expanded to every interface's address]
    #[arg(long, env = "SYNCNODE_ADVERTISE", value_delimiter = ',')]
    pub advertise: Option<Vec<String>>,
    /// Members to keep connections to; past that, a subset covering every region. [default: 32]
    #[arg(long, env = "SYNCNODE_MAX_PEERS")]
    pub max_peers: Option<usize>,
    /// SWIM probe period; failure detection and membership timings follow it. [default: 1s]
    #[arg(long, env = "SYNCNODE_PROBE_INTERVAL")]
    pub probe_interval: Option<String>,
    /// How long a joining node waits for a member before it takes itself to be the first. [default: 30s]
    #[arg(long, env = "SYNCNODE_JOIN_TIMEOUT")]
    pub join_timeout: Option<String>,
    /// HTTP API address. [default: 127.0.0.1:8080]
    #[arg(long, env = "SYNCNODE_HTTP")]
    pub http: Option<String>,
    /// L3 URL, `sqlite://…` or `mysql://…`. [default: SQLite in data_dir]
    #[arg(long, env = "SYNCNODE_SQL_URL")]
    pub sql_url: Option<String>,
    /// L2 Redis URL. [default: none]
    #[arg(long, env = "SYNCNODE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Key prefix in Redis. [default: `<cluster_id>:`]
    #[arg(long, env = "SYNCNODE_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Cluster id, carried by every message. [default: default]
    #[arg(long, env = "SYNCNODE_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Region label shown to peers. [default: default]
    #[arg(long, env = "SYNCNODE_REGION")]
    pub region: Option<String>,
    /// Pre-shared cluster key file (from `syncnode psk`). [default: none]
    #[arg(long, env = "SYNCNODE_PSK_FILE")]
    pub psk_file: Option<PathBuf>,
    /// Peer id allowed to connect (repeatable). [default: any]
    #[arg(long, env = "SYNCNODE_ALLOW_PEERS", value_delimiter = ',')]
    pub allow_peers: Option<Vec<String>>,
    /// Bearer token required by the HTTP API. [default: none]
    #[arg(long, env = "SYNCNODE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Interval of roots gossip and session checks, e.g. `1s`, `500ms`. [default: 1s]
    #[arg(long, env = "SYNCNODE_GOSSIP_INTERVAL")]
    pub gossip_interval: Option<String>,
    /// Merkle tree depth, 1..=5, equal on every node. [default: 4]
    #[arg(long, env = "SYNCNODE_MERKLE_DEPTH")]
    pub merkle_depth: Option<u8>,
    /// Age below which a tombstone is never purged. [default: 1h]
    #[arg(long, env = "SYNCNODE_TOMBSTONE_GRACE")]
    pub tombstone_grace: Option<String>,
    /// Silence after which a member stops holding back tombstone purge. [default: 7d]
    #[arg(long, env = "SYNCNODE_MEMBER_EXPIRY")]
    pub member_expiry: Option<String>,
    /// How long purge records are kept: a member away longer must resync. [default: 30d]
    #[arg(long, env = "SYNCNODE_LEDGER_RETENTION")]
    pub ledger_retention: Option<String>,
    /// Largest clock difference tolerated: versions further ahead wait, and a
    /// node this far ahead of most members refuses writes. [default: 500ms]
    #[arg(long, env = "SYNCNODE_MAX_CLOCK_SKEW")]
    pub max_clock_skew: Option<String>,
    /// L1 memory budget, bytes. [default: 268435456]
    #[arg(long, env = "SYNCNODE_L1_MAX_BYTES")]
    pub l1_max_bytes: Option<usize>,
    /// Largest item content, bytes. [default: 16777216]
    #[arg(long, env = "SYNCNODE_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Most items in one group commit. [default: 1000]
    #[arg(long, env = "SYNCNODE_BATCH_FLUSH_COUNT")]
    pub batch_flush_count: Option<usize>,
    /// Most bytes in one group commit. [default: 4194304]
    #[arg(long, env = "SYNCNODE_BATCH_FLUSH_BYTES")]
    pub batch_flush_bytes: Option<usize>,
    /// Commit-log bound in items (MySQL L3): beyond it writes are refused. [default: 1000000]
    #[arg(long, env = "SYNCNODE_COMMIT_LOG_MAX_ITEMS")]
    pub commit_log_max_items: Option<u64>,
    /// Commit-log bound in bytes (MySQL L3). [default: 1073741824]
    #[arg(long, env = "SYNCNODE_COMMIT_LOG_MAX_BYTES")]
    pub commit_log_max_bytes: Option<u64>,
    /// Items per commit-log drain batch. [default: 500]
    #[arg(long, env = "SYNCNODE_COMMIT_LOG_DRAIN_BATCH")]
    pub commit_log_drain_batch: Option<usize>,
    /// `max_clock_skew` in milliseconds (the engine's key); set one of the two. [default: 500]
    #[arg(long, env = "SYNCNODE_MAX_CLOCK_SKEW_MS")]
    pub max_clock_skew_ms: Option<u64>,
    /// How often the Merkle tree and filter snapshots are saved when changed, seconds. [default: 30]
    #[arg(long, env = "SYNCNODE_SNAPSHOT_INTERVAL_SECS")]
    pub snapshot_interval_secs: Option<u64>,
    /// Timeout of one L3 call, milliseconds. [default: 5000]
    #[arg(long, env = "SYNCNODE_SQL_TIMEOUT_MS")]
    pub sql_timeout_ms: Option<u64>,
    /// Connections in the L3 pool. [default: 8]
    #[arg(long, env = "SYNCNODE_SQL_MAX_CONNECTIONS")]
    pub sql_max_connections: Option<u32>,
    /// Items loaded into L1 at start. [default: 10000]
    #[arg(long, env = "SYNCNODE_WARM_UP_ITEMS")]
    pub warm_up_items: Option<usize>,
    /// Time a client has to send a request's header before the connection is closed. [default: 10s]
    #[arg(long, env = "SYNCNODE_HTTP_HEADER_TIMEOUT")]
    pub http_header_timeout: Option<String>,
    /// Time an idle keep-alive connection is kept open. [default: 60s]
    #[arg(long, env = "SYNCNODE_HTTP_IDLE_TIMEOUT")]
    pub http_idle_timeout: Option<String>,
    /// Most HTTP connections open at once; more wait to be accepted. [default: 4096]
    #[arg(long, env = "SYNCNODE_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Log level or tracing directives (the config file's key; `--log-level` wins). [default: info]
    #[arg(skip)]
    pub log_level: Option<String>,
    /// Log format, `text` or `json` (the config file's key; `--log-format` wins). [default: text]
    #[arg(skip)]
    pub log_format: Option<crate::logging::LogFormat>,
}

macro_rules! overlay {
    ($base:ident, $top:ident; $($f:ident),*) => {
        Settings { $($f: $top.$f.or($base.$f)),* }
    };
}

impl Settings {
    /// `self` with every key `top` sets replaced.
    pub fn overlay(self, top: Settings) -> Settings {
        let base = self;
        overlay!(base, top; data_dir, node_id, listen, bootstrap, advertise, max_peers, probe_interval,
            join_timeout, http, sql_url, redis_url, redis_prefix, cluster_id, region, psk_file, allow_peers,
            api_token, gossip_interval, merkle_depth, tombstone_grace, member_expiry, ledger_retention,
            max_clock_skew, l1_max_bytes, max_payload_bytes, batch_flush_count, batch_flush_bytes,
            commit_log_max_items, commit_log_max_bytes, commit_log_drain_batch, max_clock_skew_ms,
            snapshot_interval_secs, sql_timeout_ms, sql_max_connections, warm_up_items,
            http_header_timeout, http_idle_timeout, http_max_connections, log_level, log_format)
    }

    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

/// A checked node configuration with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub node_id: Option<String>,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub advertise: Vec<Multiaddr>,
    pub max_peers: usize,
    pub probe_interval: Duration,
    pub join_timeout: Duration,
    pub http: SocketAddr,
    pub cluster_id: String,
    pub region: String,
    pub psk_file: Option<PathBuf>,
    pub allow_peers: Vec<PeerId>,
    pub api_token: Option<String>,
    pub gossip_interval: Duration,
    pub tombstone_grace: Duration,
    pub member_expiry: Duration,
    pub ledger_retention: Duration,
    pub max_clock_skew: Duration,
    pub http_header_timeout: Duration,
    pub http_idle_timeout: Duration,
    pub http_max_connections: usize,
    pub log_level: Option<String>,
    pub log_format: Option<crate::logging::LogFormat>,
    /// The engine's keys (its `node_id` is set by `engine_config`).
    pub engine: SyncEngineConfig,
}

/// The node's defaults, each written once: `NodeConfig::resolve` takes them,
/// `NetworkConfig::loopback` shares those a test cluster keeps, and a test
/// checks that `--help` and the README say the same (the engine's keys have
/// theirs in `SyncEngineConfig::default`).
pub mod defaults {
    use std::time::Duration;

    pub const DATA_DIR: &str = "./syncnode-data";
    pub const LISTEN: &str = "/ip4/0.0.0.0/tcp/7070";
    pub const MAX_PEERS: usize = 32;
    pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
    pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const HTTP: &str = "127.0.0.1:8080";
    pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const HTTP_MAX_CONNECTIONS: usize = 4096;
    pub const CLUSTER_ID: &str = "default";
    pub const REGION: &str = "default";
    pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(1);
    pub const TOMBSTONE_GRACE: Duration = Duration::from_secs(3_600);
    pub const MEMBER_EXPIRY: Duration = Duration::from_secs(7 * 86_400);
    pub const LEDGER_RETENTION: Duration = Duration::from_secs(30 * 86_400);
    /// How long one request to a peer may take (not configurable).
    pub const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// How long CDC deltas to pass on are batched (not configurable).
    pub const CDC_BATCH: Duration = Duration::from_millis(10);
}

/// Keys a running node takes in on SIGHUP; the others need a restart.
pub const RELOADABLE: &[&str] = &["max_payload_bytes", "snapshot_interval_secs", "log_level"];

/// Parses a duration: `250ms`, `1.5s`, `1m30s`, `1h`, `7d` (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("{s:?} has no unit (ms, s, m, h, d), e.g. 500ms, 1.5s, 1m30s"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 500ms, 1.5s, 1m30s, 1h, 7d ({e})"))
}

/// A TCP address another node can dial: `/ip4|/ip6|/dns|/dns4|/dns6/…/tcp/<port>`,
/// then optionally `/p2p/<peer id>`.
fn check_dialable(name: &str, a: &Multiaddr) -> anyhow::Result<()> {
    use libp2p::multiaddr::Protocol;
    let mut it = a.iter();
    let host = matches!(
        it.next(),
        Some(Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_))
    );
    let port = matches!(it.next(), Some(Protocol::Tcp(p)) if p != 0);
    let rest: Vec<Protocol> = it.collect();
    anyhow::ensure!(
        host && port && (rest.is_empty() || matches!(rest.as_slice(), [Protocol::P2p(_)])),
        "{name}: {a} is not /ip4|/ip6|/dns|/dns4|/dns6/<host>/tcp/<port>[/p2p/<peer id>]"
    );
    Ok(())
}

fn is_unspecified(a: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    match a.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => ip.is_unspecified(),
        _ => false,
    }
}

fn key<T>(name: &str, r: Result<T, impl std::fmt::Display>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

impl NodeConfig {
    pub fn resolve(s: Settings) -> anyhow::Result<NodeConfig> {
        let addrs = |name: &str, v: Option<Vec<String>>, default: &[&str]| -> anyhow::Result<Vec<Multiaddr>> {
            let v = v.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
            v.iter()
                .filter(|a| !a.trim().is_empty())
                .map(|a| key(name, a.trim().parse::<Multiaddr>().map_err(|e| format!("{a:?}: {e}"))))
                .collect()
        };
        let listen = addrs("listen", s.listen, &[defaults::LISTEN])?;
        anyhow::ensure!(!listen.is_empty(), "listen: at least one address is needed");
        let bootstrap = addrs("bootstrap", s.bootstrap, &[])?;
        for b in &bootstrap {
            check_dialable("bootstrap", b)?;
        }
        let advertise = addrs("advertise", s.advertise, &[])?;
        for a in &advertise {
            check_dialable("advertise", a)?;
            anyhow::ensure!(
                peer_of(a).is_none(),
                "advertise: {a}: leave out /p2p/ (the node adds its own)"
            );
            anyhow::ensure!(!is_unspecified(a), "advertise: {a}: 0.0.0.0 and :: cannot be dialed");
        }
        let duration = |name: &str, v: Option<String>, default: Duration| match v {
            Some(v) => key(name, parse_duration(&v)),
            None => Ok(default),
        };
        let probe_interval = duration("probe_interval", s.probe_interval, defaults::PROBE_INTERVAL)?;
        anyhow::ensure!(
            probe_interval >= Duration::from_millis(50),
            "probe_interval: at least 50ms"
        );
        let max_peers = s.max_peers.unwrap_or(defaults::MAX_PEERS);
        anyhow::ensure!(
            (1..=1024).contains(&max_peers),
            "max_peers: {max_peers} is out of range 1..=1024"
        );
        let member_expiry = duration("member_expiry", s.member_expiry, defaults::MEMBER_EXPIRY)?;
        let ledger_retention = duration("ledger_retention", s.ledger_retention, defaults::LEDGER_RETENTION)?;
        anyhow::ensure!(
            ledger_retention >= member_expiry,
            "ledger_retention: {ledger_retention:?} is shorter than member_expiry ({member_expiry:?}): a member expired from the purge watermarks must still find the purge records when it returns"
        );
        let max_clock_skew = match (s.max_clock_skew, s.max_clock_skew_ms) {
            (Some(_), Some(_)) => anyhow::bail!("max_clock_skew_ms: set max_clock_skew or max_clock_skew_ms, not both"),
            (None, Some(ms)) => Duration::from_millis(ms),
            (d, None) => duration(
                "max_clock_skew",
                d,
                Duration::from_millis(SyncEngineConfig::default().max_clock_skew_ms),
            )?,
        };
        anyhow::ensure!(
            max_clock_skew >= Duration::from_millis(1),
            "max_clock_skew: at least 1ms"
        );
        let allow_peers = s
            .allow_peers
            .unwrap_or_default()
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                key(
                    "allow_peers",
                    p.trim().parse::<PeerId>().map_err(|e| format!("{p:?}: {e}")),
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let region = s.region.unwrap_or_else(|| defaults::REGION.into());
        anyhow::ensure!(
            !region.is_empty() && region.len() <= syncnode_protocol::membership::MAX_REGION,
            "region: {region:?} must be 1-{} bytes",
            syncnode_protocol::membership::MAX_REGION
        );
        let cluster_id = s.cluster_id.unwrap_or_else(|| defaults::CLUSTER_ID.into());
        anyhow::ensure!(
            !cluster_id.is_empty()
                && cluster_id.len() <= 64
                && cluster_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "cluster_id: {cluster_id:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."
        );
        let merkle_depth = s.merkle_depth.unwrap_or(syncnode_protocol::merkle::DEFAULT_DEPTH);
        anyhow::ensure!(
            (1..=syncnode_protocol::merkle::MAX_DEPTH).contains(&merkle_depth),
            "merkle_depth: {merkle_depth} is out of range 1..={}",
            syncnode_protocol::merkle::MAX_DEPTH
        );
        let gossip_interval = duration("gossip_interval", s.gossip_interval, defaults::GOSSIP_INTERVAL)?;
        anyhow::ensure!(
            gossip_interval >= Duration::from_millis(50),
            "gossip_interval: at least 50ms"
        );
        let defaults = SyncEngineConfig::default();
        let at_least_1 = |name: &str, v: Option<u64>, default: u64| -> anyhow::Result<u64> {
            let v = v.unwrap_or(default);
            anyhow::ensure!(v >= 1, "{name}: must be at least 1");
            Ok(v)
        };
        let data_dir = s.data_dir.unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR));
        let engine = SyncEngineConfig {
            data_dir: data_dir.clone(),
            node_id: String::new(),
            sql_url: s.sql_url,
            redis_url: s.redis_url,
            redis_prefix: Some(s.redis_prefix.unwrap_or_else(|| format!("{cluster_id}:"))),
            l1_max_bytes: at_least_1(
                "l1_max_bytes",
                s.l1_max_bytes.map(|v| v as u64),
                defaults.l1_max_bytes as u64,
            )? as usize,
            max_payload_bytes: at_least_1(
                "max_payload_bytes",
                s.max_payload_bytes.map(|v| v as u64),
                defaults.max_payload_bytes as u64,
            )? as usize,
            batch_flush_count: at_least_1(
                "batch_flush_count",
                s.batch_flush_count.map(|v| v as u64),
                defaults.batch_flush_count as u64,
            )? as usize,
            batch_flush_bytes: at_least_1(
                "batch_flush_bytes",
                s.batch_flush_bytes.map(|v| v as u64),
                defaults.batch_flush_bytes as u64,
            )? as usize,
            commit_log_max_items: at_least_1(
                "commit_log_max_items",
                s.commit_log_max_items,
                defaults.commit_log_max_items,
            )?,
            commit_log_max_bytes: at_least_1(
                "commit_log_max_bytes",
                s.commit_log_max_bytes,
                defaults.commit_log_max_bytes,
            )?,
            commit_log_drain_batch: at_least_1(
                "commit_log_drain_batch",
                s.commit_log_drain_batch.map(|v| v as u64),
                defaults.commit_log_drain_batch as u64,
            )? as usize,
            merkle_depth,
            max_clock_skew_ms: max_clock_skew.as_millis() as u64,
            snapshot_interval_secs: at_least_1(
                "snapshot_interval_secs",
                s.snapshot_interval_secs,
                defaults.snapshot_interval_secs,
            )?,
            sql_timeout_ms: at_least_1("sql_timeout_ms", s.sql_timeout_ms, defaults.sql_timeout_ms)?,
            sql_max_connections: at_least_1(
                "sql_max_connections",
                s.sql_max_connections.map(u64::from),
                u64::from(defaults.sql_max_connections),
            )?
            .try_into()
            .map_err(|_| anyhow::anyhow!("sql_max_connections: too large"))?,
            warm_up_items: s.warm_up_items.unwrap_or(defaults.warm_up_items),
        };
        let http_max_connections = s.http_max_connections.unwrap_or(defaults::HTTP_MAX_CONNECTIONS);
        anyhow::ensure!(
            (1..=1_000_000).contains(&http_max_connections),
            "http_max_connections: {http_max_connections} is out of range 1..=1000000"
        );
        let at_least_100ms = |name: &str, v: Option<String>, default: Duration| -> anyhow::Result<Duration> {
            let d = duration(name, v, default)?;
            anyhow::ensure!(d >= Duration::from_millis(100), "{name}: at least 100ms");
            Ok(d)
        };
        let http_header_timeout = at_least_100ms(
            "http_header_timeout",
            s.http_header_timeout,
            defaults::HTTP_HEADER_TIMEOUT,
        )?;
        let http_idle_timeout = at_least_100ms("http_idle_timeout", s.http_idle_timeout, defaults::HTTP_IDLE_TIMEOUT)?;
        if let Some(level) = &s.log_level {
            crate::logging::check_level(level)?;
        }
        if let Some(t) = &s.api_token {
            anyhow::ensure!(!t.is_empty(), "api_token: empty (leave it unset for no token)");
        }
        Ok(NodeConfig {
            data_dir,
            node_id: s.node_id,
            listen,
            bootstrap,
            advertise,
            max_peers,
            probe_interval,
            join_timeout: duration("join_timeout", s.join_timeout, defaults::JOIN_TIMEOUT)?,
            http: key(
                "http",
                s.http.as_deref().unwrap_or(defaults::HTTP).parse::<SocketAddr>(),
            )?,
            region,
            psk_file: s.psk_file,
            allow_peers,
            api_token: s.api_token,
            gossip_interval,
            tombstone_grace: duration("tombstone_grace", s.tombstone_grace, defaults::TOMBSTONE_GRACE)?,
            member_expiry,
            ledger_retention,
            max_clock_skew,
            http_header_timeout,
            http_idle_timeout,
            http_max_connections,
            log_level: s.log_level,
            log_format: s.log_format,
            cluster_id,
            engine,
        })
    }

    /// The engine's config for this node (`node_id` is the peer id unless set).
    pub fn engine_config(&self, peer_id: &PeerId) -> SyncEngineConfig {
        SyncEngineConfig {
            node_id: self.node_id.clone().unwrap_or_else(|| peer_id.to_string()),
            ..self.engine.clone()
        }
    }

    /// The keys whose values differ from `other`'s, by name.
    pub fn changed_keys(&self, other: &NodeConfig) -> Vec<&'static str> {
        macro_rules! diff {
            ($a:ident, $b:ident; $($($f:ident).+ => $name:literal),* $(,)?) => {{
                let mut out = Vec::new();
                $(if $a.$($f).+ != $b.$($f).+ { out.push($name); })*
                out
            }};
        }
        let (a, b) = (self, other);
        diff!(a, b;
            data_dir => "data_dir", node_id => "node_id", listen => "listen", bootstrap => "bootstrap",
            advertise => "advertise", max_peers => "max_peers", probe_interval => "probe_interval",
            join_timeout => "join_timeout", http => "http", cluster_id => "cluster_id", region => "region",
            psk_file => "psk_file", allow_peers => "allow_peers", api_token => "api_token",
            gossip_interval => "gossip_interval", tombstone_grace => "tombstone_grace",
            member_expiry => "member_expiry", ledger_retention => "ledger_retention",
            max_clock_skew => "max_clock_skew", http_header_timeout => "http_header_timeout",
            http_idle_timeout => "http_idle_timeout", http_max_connections => "http_max_connections",
            log_level => "log_level", log_format => "log_format",
            engine.sql_url => "sql_url", engine.redis_url => "redis_url", engine.redis_prefix => "redis_prefix",
            engine.l1_max_bytes => "l1_max_bytes", engine.max_payload_bytes => "max_payload_bytes",
            engine.batch_flush_count => "batch_flush_count", engine.batch_flush_bytes => "batch_flush_bytes",
            engine.commit_log_max_items => "commit_log_max_items",
            engine.commit_log_max_bytes => "commit_log_max_bytes",
            engine.commit_log_drain_batch => "commit_log_drain_batch", engine.merkle_depth => "merkle_depth",
            engine.snapshot_interval_secs => "snapshot_interval_secs", engine.sql_timeout_ms => "sql_timeout_ms",
            engine.sql_max_connections => "sql_max_connections", engine.warm_up_items => "warm_up_items",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_sources_win_key_by_key() {
        let file: Settings = toml::from_str(
            "cluster_id = \"a\"\nregion = \"eu\"\nmerkle_depth = 3\nlisten = [\"/ip4/127.0.0.1/tcp/1\"]",
        )
        .unwrap();
        let flags = Settings {
            region: Some("us".into()),
            ..Settings::default()
        };
        let c = NodeConfig::resolve(file.overlay(flags)).unwrap();
        assert_eq!(
            (c.cluster_id.as_str(), c.region.as_str(), c.engine.merkle_depth),
            ("a", "us", 3)
        );
        assert_eq!(c.listen, vec!["/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().unwrap()]);
        assert_eq!(c.http, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.tombstone_grace, Duration::from_secs(3600));
    }

    #[test]
    fn every_engine_key_of_the_readme_is_accepted() {
        let file: Settings = toml::from_str(
            "sql_timeout_ms = 700\ncommit_log_max_items = 9\ncommit_log_max_bytes = 99\n\
             batch_flush_count = 7\nbatch_flush_bytes = 77\ncommit_log_drain_batch = 5\n\
             snapshot_interval_secs = 3\nsql_max_connections = 2\nwarm_up_items = 1\n\
             max_clock_skew_ms = 250\nl1_max_bytes = 1048576\nmax_payload_bytes = 4096\n\
             log_level = \"debug\"\nlog_format = \"json\"",
        )
        .unwrap();
        let c = NodeConfig::resolve(file).unwrap();
        let e = c.engine_config(&PeerId::random());
        assert_eq!(
            (
                e.sql_timeout_ms,
                e.commit_log_max_items,
                e.commit_log_max_bytes,
                e.batch_flush_count
            ),
            (700, 9, 99, 7)
        );
        assert_eq!(
            (e.batch_flush_bytes, e.commit_log_drain_batch, e.snapshot_interval_secs),
            (77, 5, 3)
        );
        assert_eq!(
            (e.sql_max_connections, e.warm_up_items, e.max_clock_skew_ms),
            (2, 1, 250)
        );
        assert_eq!((e.l1_max_bytes, e.max_payload_bytes), (1048576, 4096));
        assert_eq!(c.log_format, Some(crate::logging::LogFormat::Json));
        let both = Settings {
            max_clock_skew: Some("1s".into()),
            max_clock_skew_ms: Some(5),
            ..Default::default()
        };
        assert!(
            NodeConfig::resolve(both)
                .unwrap_err()
                .to_string()
                .starts_with("max_clock_skew_ms:")
        );
        let zero = Settings {
            batch_flush_count: Some(0),
            ..Default::default()
        };
        assert!(
            NodeConfig::resolve(zero)
                .unwrap_err()
                .to_string()
                .starts_with("batch_flush_count:")
        );
    }

    #[test]
    fn changed_keys_are_named() {
        let a = NodeConfig::resolve(Settings::default()).unwrap();
        let b = NodeConfig::resolve(Settings {
            max_payload_bytes: Some(1000),
            region: Some("eu".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(a.changed_keys(&b), vec!["region", "max_payload_bytes"]);
        assert!(a.changed_keys(&a.clone()).is_empty());
    }

    #[test]
    fn durations_take_fractions_and_compounds() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(toml::from_str::<Settings>("no_such_key = 1").is_err());
        let bad = |s: Settings| NodeConfig::resolve(s).unwrap_err().to_string();
        assert!(
            bad(Settings {
                listen: Some(vec!["nonsense".into()]),
                ..Default::default()
            })
            .starts_with("listen:")
        );
        assert!(
            bad(Settings {
                bootstrap: Some(vec!["/ip4/127.0.0.1/udp/1".into()]),
                ..Default::default()
            })
            .starts_with("bootstrap:")
        );
        assert!(
            bad(Settings {
                advertise: Some(vec!["/ip4/0.0.0.0/tcp/7070".into()]),
                ..Default::default()
            })
            .starts_with("advertise:")
        );
        assert!(
            bad(Settings {
                member_expiry: Some("40d".into()),
                ..Default::default()
            })
            .starts_with("ledger_retention:")
        );
        let dns = NodeConfig::resolve(Settings {
            bootstrap: Some(vec!["/dns4/node-1/tcp/7070".into()]),
            advertise: Some(vec!["/dns4/node-2/tcp/7070".into()]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(dns.bootstrap.len(), 1);
        assert!(
            bad(Settings {
                gossip_interval: Some("5".into()),
                ..Default::default()
            })
            .starts_with("gossip_interval:")
        );
        assert!(
            bad(Settings {
                merkle_depth: Some(9),
                ..Default::default()
            })
            .starts_with("merkle_depth:")
        );
        assert!(
            bad(Settings {
                cluster_id: Some("a/b".into()),
                ..Default::default()
            })
            .starts_with("cluster_id:")
        );
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("1 fortnight").is_err() && parse_duration("").is_err());
    }

    /// A default as a doc writes it: a number (`1,000,000`, `256 MiB`), a
    /// duration (`1s`, `7d`) or text (backticks dropped).
    #[derive(Debug, PartialEq)]
    enum Doc {
        Num(u64),
        Dur(Duration),
        Text(String),
    }

    fn doc_value(raw: &str) -> Doc {
        let v = raw.trim().trim_matches('`').replace(',', "");
        let units = [("KiB", 1u64 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)];
        for (unit, size) in units {
            if let Some(n) = v.strip_suffix(unit).and_then(|n| n.trim().parse::<u64>().ok()) {
                return Doc::Num(n * size);
            }
        }
        if let Ok(n) = v.parse() {
            return Doc::Num(n);
        }
        match parse_duration(&v) {
            Ok(d) => Doc::Dur(d),
            Err(_) => Doc::Text(v),
        }
    }

    /// `key → default` from the README table (`| key | default | meaning |`)
    /// that follows `heading`; `a` / `b` rows give each key its value.
    fn readme_table(heading: &str) -> std::collections::BTreeMap<String, String> {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let section = readme
            .split_once(&format!("\n{heading}\n"))
            .unwrap_or_else(|| panic!("the README has no {heading:?}"))
            .1;
        let table = section
            .split_once("| key | default | meaning |")
            .expect("a config table under the heading")
            .1;
        let mut out = std::collections::BTreeMap::new();
        for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.split(" | ").collect();
            let keys: Vec<&str> = cells[0].trim_start_matches("| ").split(" / ").collect();
            let values: Vec<&str> = cells[1].split(" / ").collect();
            for (i, k) in keys.iter().enumerate() {
                let value = values.get(i).or(values.first()).unwrap();
                out.insert(k.trim_matches('`').to_string(), value.to_string());
            }
        }
        out
    }

    /// Every key's default, as the code has it (`None`: a default the docs
    /// describe in words, e.g. "the peer id").
    fn code_defaults() -> Vec<(&'static str, Option<Doc>)> {
        let c = NodeConfig::resolve(Settings::default()).unwrap();
        let e = &c.engine;
        let num = |n: u64| Some(Doc::Num(n));
        let dur = |d: Duration| Some(Doc::Dur(d));
        let text = |t: &str| Some(Doc::Text(t.to_string()));
        vec![
            ("data_dir", text(&c.data_dir.display().to_string())),
            ("node_id", None),
            (
                "listen",
                text(&c.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")),
            ),
            ("bootstrap", None),
            ("advertise", None),
            ("max_peers", num(c.max_peers as u64)),
            ("probe_interval", dur(c.probe_interval)),
            ("join_timeout", dur(c.join_timeout)),
            ("http", text(&c.http.to_string())),
            ("http_header_timeout", dur(c.http_header_timeout)),
            ("http_idle_timeout", dur(c.http_idle_timeout)),
            ("http_max_connections", num(c.http_max_connections as u64)),
            ("sql_url", None),
            ("redis_url", None),
            ("redis_prefix", None),
            ("cluster_id", text(&c.cluster_id)),
            ("region", text(&c.region)),
            ("psk_file", None),
            ("allow_peers", None),
            ("api_token", None),
            ("gossip_interval", dur(c.gossip_interval)),
            ("merkle_depth", num(u64::from(e.merkle_depth))),
            ("tombstone_grace", dur(c.tombstone_grace)),
            ("member_expiry", dur(c.member_expiry)),
            ("ledger_retention", dur(c.ledger_retention)),
            ("max_clock_skew", dur(c.max_clock_skew)),
            ("max_clock_skew_ms", None), // the README says "—": it is max_clock_skew in ms
            ("l1_max_bytes", num(e.l1_max_bytes as u64)),
            ("max_payload_bytes", num(e.max_payload_bytes as u64)),
            ("batch_flush_count", num(e.batch_flush_count as u64)),
            ("batch_flush_bytes", num(e.batch_flush_bytes as u64)),
            ("commit_log_max_items", num(e.commit_log_max_items)),
            ("commit_log_max_bytes", num(e.commit_log_max_bytes)),
            ("commit_log_drain_batch", num(e.commit_log_drain_batch as u64)),
            ("snapshot_interval_secs", num(e.snapshot_interval_secs)),
            ("sql_timeout_ms", num(e.sql_timeout_ms)),
            ("sql_max_connections", num(u64::from(e.sql_max_connections))),
            ("warm_up_items", num(e.warm_up_items as u64)),
            ("log_level", text(crate::logging::NODE_LEVEL)),
            ("log_format", text("text")),
        ]
    }

    #[test]
    fn every_default_reads_the_same_in_help_the_readme_and_the_code() {
        use clap::Args;
        let cmd = Settings::augment_args(clap::Command::new("run"));
        let help: std::collections::BTreeMap<String, String> = cmd
            .get_arguments()
            .filter_map(|a| {
                let h = a.get_help()?.to_string();
                let d = h.split("[default: ").nth(1)?.split(']').next()?.to_string();
                Some((a.get_id().to_string(), d))
            })
            .collect();
        let readme = readme_table("### Configuration");
        let code = code_defaults();
        // Every key is covered: the flags' and the two the config file alone has.
        let mut keys: Vec<String> = cmd.get_arguments().map(|a| a.get_id().to_string()).collect();
        keys.extend(["log_level".to_string(), "log_format".to_string()]);
        keys.sort();
        let mut covered: Vec<String> = code.iter().map(|(k, _)| k.to_string()).collect();
        covered.sort();
        assert_eq!(covered, keys, "code_defaults must list every key");
        assert!(matches!(
            crate::logging::LogFormat::default(),
            crate::logging::LogFormat::Text
        ));
        for (key, value) in &code {
            let in_readme = readme
                .get(*key)
                .unwrap_or_else(|| panic!("the README's table lacks {key}"));
            let Some(value) = value else { continue };
            assert_eq!(&doc_value(in_readme), value, "{key}: README says {in_readme}");
            // log_level and log_format have no flag of their own in `Settings`.
            if let Some(h) = help.get(*key) {
                let h = h.replace(" (repeatable)", "");
                assert_eq!(&doc_value(&h), value, "{key}: --help says [default: {h}]");
            } else {
                assert!(key.starts_with("log_"), "--help gives no default for {key}");
            }
        }
        // The engine's table, against SyncEngineConfig::default().
        let e = SyncEngineConfig::default();
        let engine = readme_table("### Configuration (`SyncEngineConfig`)");
        // --help gives max_clock_skew_ms's default, the engine's.
        assert_eq!(
            help.get("max_clock_skew_ms").map(|h| doc_value(h)),
            Some(Doc::Num(e.max_clock_skew_ms))
        );
        // Every engine key is in its table.
        let fields = serde_json::to_value(&e).unwrap();
        for key in fields.as_object().unwrap().keys() {
            assert!(engine.contains_key(key), "the engine table lacks {key}");
        }
        for (key, value) in [
            ("data_dir", Doc::Text(e.data_dir.display().to_string())),
            ("node_id", Doc::Text(e.node_id.clone())),
            ("l1_max_bytes", Doc::Num(e.l1_max_bytes as u64)),
            ("max_payload_bytes", Doc::Num(e.max_payload_bytes as u64)),
            ("batch_flush_count", Doc::Num(e.batch_flush_count as u64)),
            ("batch_flush_bytes", Doc::Num(e.batch_flush_bytes as u64)),
            ("commit_log_max_items", Doc::Num(e.commit_log_max_items)),
            ("commit_log_max_bytes", Doc::Num(e.commit_log_max_bytes)),
            ("commit_log_drain_batch", Doc::Num(e.commit_log_drain_batch as u64)),
            ("merkle_depth", Doc::Num(u64::from(e.merkle_depth))),
            ("max_clock_skew_ms", Doc::Num(e.max_clock_skew_ms)),
            ("snapshot_interval_secs", Doc::Num(e.snapshot_interval_secs)),
            ("sql_timeout_ms", Doc::Num(e.sql_timeout_ms)),
            ("sql_max_connections", Doc::Num(u64::from(e.sql_max_connections))),
            ("warm_up_items", Doc::Num(e.warm_up_items as u64)),
        ] {
            let doc = engine
                .get(key)
                .unwrap_or_else(|| panic!("the engine table lacks {key}"));
            assert_eq!(doc_value(doc), value, "engine {key}: README says {doc}");
        }
    }
}
