//! syncnode: a peer-to-peer anti-entropy replication node.
//!
//! [`engine`] is the three-tier storage engine (L1 memory, L3 SQL ground truth
//! with a durable commit log, a Merkle tree and an existence filter) that every
//! node runs and that applications can embed as a library.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod engine;
pub mod identity;
pub mod load;
mod locks;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod replication;
pub mod run;
pub mod service;

pub use engine::{
    AckMode, BackpressureLevel, BatchResult, CacheTtl, ContentType, EngineState, FilterTrust, HealthCheck, ItemStatus,
    L2Route, MerkleDiff, MerkleNode, Query, SearchCacheStats, SearchIndex, SearchResult, SearchSource, SearchTier,
    StorageError, SubmitOptions, SyncEngine, SyncEngineConfig, SyncItem, WriteReceipt,
};
