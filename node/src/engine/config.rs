//! Engine configuration. Every field has a default so a config can be read
//! from a partial TOML table.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncEngineConfig {
    /// Directory for the embedded SQLite L3 (when `sql_url` is unset), the
    /// commit log and other node-local files.
    pub data_dir: PathBuf,
    /// Id of this node; the `origin` of its writes.
    pub node_id: String,
    /// `sqlite://path` or `mysql://user:pass@host:port/db`; SQLite in `data_dir` when unset.
    pub sql_url: Option<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: Option<String>,
    /// Memory budget of L1 (read cache plus pending writes), bytes.
    pub l1_max_bytes: usize,
    /// Largest accepted content, bytes.
    pub max_payload_bytes: usize,
    /// Most items in one L3 batch.
    pub batch_flush_count: usize,
    /// Most bytes in one L3 batch.
    pub batch_flush_bytes: usize,
    /// Commit-log bounds (MySQL L3): beyond them writes are refused.
    pub commit_log_max_items: u64,
    pub commit_log_max_bytes: u64,
    /// Items per commit-log drain batch.
    pub commit_log_drain_batch: usize,
    /// Merkle tree depth (cluster-wide): 1..=5.
    pub merkle_depth: u8,
    /// Remote versions further ahead of our clock than this are deferred.
    pub max_clock_skew_ms: u64,
    /// How often the Merkle tree and filter snapshots are saved when changed.
    pub snapshot_interval_secs: u64,
    /// Timeout of one L3 call, so an outage gives an error and not a hang.
    pub sql_timeout_ms: u64,
    /// Connections in the L3 pool.
    pub sql_max_connections: u32,
    /// Items `warm_up` loads into L1.
    pub warm_up_items: usize,
}

impl Default for SyncEngineConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./syncnode-data"),
            node_id: "node".to_string(),
            sql_url: None,
            redis_url: None,
            redis_prefix: None,
            l1_max_bytes: 256 * 1024 * 1024,
            max_payload_bytes: 16 * 1024 * 1024,
            batch_flush_count: 1000,
            batch_flush_bytes: 4 * 1024 * 1024,
            commit_log_max_items: 1_000_000,
            commit_log_max_bytes: 1024 * 1024 * 1024,
            commit_log_drain_batch: 500,
            merkle_depth: syncnode_protocol::merkle::DEFAULT_DEPTH,
            max_clock_skew_ms: 500,
            snapshot_interval_secs: 30,
            sql_timeout_ms: 5000,
            sql_max_connections: 8,
            warm_up_items: 10_000,
        }
    }
}

impl SyncEngineConfig {
    /// A config for a node with its files in `data_dir`.
    pub fn for_dir(data_dir: impl Into<PathBuf>, node_id: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_id: node_id.into(),
            ..Self::default()
        }
    }

    /// The L3 URL actually used.
    pub fn effective_sql_url(&self) -> String {
        self.sql_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("l3.sqlite").display()))
    }

    pub fn uses_mysql(&self) -> bool {
        self.effective_sql_url().starts_with("mysql:")
    }
}
