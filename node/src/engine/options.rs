//! Per-write routing and acknowledgement options.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a cache-tier (Redis) copy lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CacheTtl {
    Minute,
    Short,
    Medium,
    Hour,
    Day,
    Week,
    Custom(u64),
}

impl CacheTtl {
    pub fn as_secs(self) -> u64 {
        match self {
            Self::Minute => 60,
            Self::Short => 5 * 60,
            Self::Medium => 15 * 60,
            Self::Hour => 3600,
            Self::Day => 86_400,
            Self::Week => 7 * 86_400,
            Self::Custom(s) => s,
        }
    }

    pub fn to_duration(self) -> Duration {
        Duration::from_secs(self.as_secs())
    }

    pub fn custom_secs(secs: u64) -> Self {
        Self::Custom(secs)
    }
}

impl From<Duration> for CacheTtl {
    /// Snaps to the nearest named variant; long durations stay exact.
    fn from(d: Duration) -> Self {
        match d.as_secs() {
            0..=90 => Self::Minute,
            91..=450 => Self::Short,
            451..=2700 => Self::Medium,
            2701..=5400 => Self::Hour,
            5401..=129_600 => Self::Day,
            129_601..=864_000 => Self::Week,
            s => Self::Custom(s),
        }
    }
}

/// What a committed (L3) item means for L2, derived from its `SubmitOptions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum L2Route {
    /// Kept in Redis with no expiry; part of the Redis Merkle mirror.
    #[default]
    Mirror,
    /// Kept in Redis until it expires (seconds); not in the mirror.
    Expiring(u64),
    /// SQL only: any Redis copy is removed.
    Skip,
}

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After the write is fsynced to the commit log (or the SQLite L3
    /// transaction that serves as it). Survives `kill -9`.
    #[default]
    Durable,
    /// After the write is in L1 and queued; lost if the process dies first.
    Buffered,
}

/// Where a write goes and when it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SubmitOptions {
    /// Write to L2 Redis.
    pub redis: bool,
    /// Expiry of the Redis copy.
    pub redis_ttl: Option<CacheTtl>,
    /// Write to L3 SQL (durable, in the Merkle tree, replicated by anti-entropy).
    pub sql: bool,
    /// Overrides the item's state.
    pub state: Option<String>,
    pub ack: AckMode,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            redis: true,
            redis_ttl: None,
            sql: true,
            state: None,
            ack: AckMode::Durable,
        }
    }
}

impl SubmitOptions {
    /// Redis only, with a TTL: not durable, not in the Merkle tree.
    pub fn cache(ttl: CacheTtl) -> Self {
        Self {
            redis: true,
            redis_ttl: Some(ttl),
            sql: false,
            ..Self::default()
        }
    }

    /// SQL only.
    pub fn durable() -> Self {
        Self {
            redis: false,
            sql: true,
            ..Self::default()
        }
    }

    pub fn with_state(mut self, state: impl Into<String>) -> Self {
        self.state = Some(state.into());
        self
    }

    pub fn buffered(mut self) -> Self {
        self.ack = AckMode::Buffered;
        self
    }

    /// The L2 treatment of an item that also goes to L3.
    pub fn l2_route(&self) -> L2Route {
        match (self.redis, self.redis_ttl) {
            (false, _) => L2Route::Skip,
            (true, None) => L2Route::Mirror,
            (true, Some(ttl)) => L2Route::Expiring(ttl.as_secs().max(1)),
        }
    }

    pub fn stores_anywhere(&self) -> bool {
        self.redis || self.sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_snap_to_variants() {
        assert_eq!(CacheTtl::from(Duration::from_secs(30)), CacheTtl::Minute);
        assert_eq!(CacheTtl::from(Duration::from_secs(3600)), CacheTtl::Hour);
        assert_eq!(
            CacheTtl::from(Duration::from_secs(2_000_000)),
            CacheTtl::Custom(2_000_000)
        );
        assert_eq!(CacheTtl::Week.as_secs(), 604_800);
    }

    #[test]
    fn routing_constructors() {
        let c = SubmitOptions::cache(CacheTtl::Short);
        assert!(c.redis && !c.sql && c.redis_ttl.is_some());
        let d = SubmitOptions::durable();
        assert!(!d.redis && d.sql && d.ack == AckMode::Durable);
    }
}
