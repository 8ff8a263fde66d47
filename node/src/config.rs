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
use crate::replication::swarm::peer_of;

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
            max_clock_skew, l1_max_bytes, max_payload_bytes)
    }

    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

/// A checked node configuration with every default applied.
#[derive(Debug, Clone)]
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
    pub sql_url: Option<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: Option<String>,
    pub cluster_id: String,
    pub region: String,
    pub psk_file: Option<PathBuf>,
    pub allow_peers: Vec<PeerId>,
    pub api_token: Option<String>,
    pub gossip_interval: Duration,
    pub merkle_depth: u8,
    pub tombstone_grace: Duration,
    pub member_expiry: Duration,
    pub ledger_retention: Duration,
    pub max_clock_skew: Duration,
    pub l1_max_bytes: usize,
    pub max_payload_bytes: usize,
}

/// Parses `250ms`, `1s`, `5m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 1s, 500ms, 5m, 1h, 7d"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?} has no unit (ms, s, m, h, d)")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
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
        let listen = addrs("listen", s.listen, &["/ip4/0.0.0.0/tcp/7070"])?;
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
        let duration =
            |name: &str, v: Option<String>, default: &str| key(name, parse_duration(v.as_deref().unwrap_or(default)));
        let probe_interval = duration("probe_interval", s.probe_interval, "1s")?;
        anyhow::ensure!(
            probe_interval >= Duration::from_millis(50),
            "probe_interval: at least 50ms"
        );
        let max_peers = s.max_peers.unwrap_or(32);
        anyhow::ensure!(
            (1..=1024).contains(&max_peers),
            "max_peers: {max_peers} is out of range 1..=1024"
        );
        let member_expiry = duration("member_expiry", s.member_expiry, "7d")?;
        let ledger_retention = duration("ledger_retention", s.ledger_retention, "30d")?;
        anyhow::ensure!(
            ledger_retention >= member_expiry,
            "ledger_retention: {ledger_retention:?} is shorter than member_expiry ({member_expiry:?}): a member expired from the purge watermarks must still find the purge records when it returns"
        );
        let max_clock_skew = duration("max_clock_skew", s.max_clock_skew, "500ms")?;
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
        let region = s.region.unwrap_or_else(|| "default".into());
        anyhow::ensure!(
            !region.is_empty() && region.len() <= syncnode_protocol::membership::MAX_REGION,
            "region: {region:?} must be 1-{} bytes",
            syncnode_protocol::membership::MAX_REGION
        );
        let cluster_id = s.cluster_id.unwrap_or_else(|| "default".into());
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
        let gossip_interval = key(
            "gossip_interval",
            parse_duration(s.gossip_interval.as_deref().unwrap_or("1s")),
        )?;
        anyhow::ensure!(
            gossip_interval >= Duration::from_millis(50),
            "gossip_interval: at least 50ms"
        );
        let defaults = SyncEngineConfig::default();
        if let Some(t) = &s.api_token {
            anyhow::ensure!(!t.is_empty(), "api_token: empty (leave it unset for no token)");
        }
        Ok(NodeConfig {
            data_dir: s.data_dir.unwrap_or_else(|| PathBuf::from("./syncnode-data")),
            node_id: s.node_id,
            listen,
            bootstrap,
            advertise,
            max_peers,
            probe_interval,
            join_timeout: duration("join_timeout", s.join_timeout, "30s")?,
            http: key(
                "http",
                s.http.as_deref().unwrap_or("127.0.0.1:8080").parse::<SocketAddr>(),
            )?,
            sql_url: s.sql_url,
            redis_url: s.redis_url,
            redis_prefix: s.redis_prefix,
            region,
            psk_file: s.psk_file,
            allow_peers,
            api_token: s.api_token,
            gossip_interval,
            merkle_depth,
            tombstone_grace: key(
                "tombstone_grace",
                parse_duration(s.tombstone_grace.as_deref().unwrap_or("1h")),
            )?,
            member_expiry,
            ledger_retention,
            max_clock_skew,
            l1_max_bytes: s.l1_max_bytes.unwrap_or(defaults.l1_max_bytes),
            max_payload_bytes: s.max_payload_bytes.unwrap_or(defaults.max_payload_bytes),
            cluster_id,
        })
    }

    /// The engine's config for this node (`node_id` is the peer id unless set).
    pub fn engine_config(&self, peer_id: &PeerId) -> SyncEngineConfig {
        SyncEngineConfig {
            data_dir: self.data_dir.clone(),
            node_id: self.node_id.clone().unwrap_or_else(|| peer_id.to_string()),
            sql_url: self.sql_url.clone(),
            redis_url: self.redis_url.clone(),
            redis_prefix: Some(
                self.redis_prefix
                    .clone()
                    .unwrap_or_else(|| format!("{}:", self.cluster_id)),
            ),
            l1_max_bytes: self.l1_max_bytes,
            max_payload_bytes: self.max_payload_bytes,
            merkle_depth: self.merkle_depth,
            max_clock_skew_ms: self.max_clock_skew.as_millis() as u64,
            ..SyncEngineConfig::default()
        }
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
            (c.cluster_id.as_str(), c.region.as_str(), c.merkle_depth),
            ("a", "us", 3)
        );
        assert_eq!(c.listen, vec!["/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().unwrap()]);
        assert_eq!(c.http, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.tombstone_grace, Duration::from_secs(3600));
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
        assert!(parse_duration("1y").is_err() && parse_duration("").is_err());
    }
}
