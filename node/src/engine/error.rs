//! Every way an engine call can fail, typed so callers (and the HTTP API) can
//! tell bad input from backpressure from a backend outage.

use super::backpressure::BackpressureLevel;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("no search index named {0:?}")]
    UnknownIndex(String),
    /// The object id breaks the rules of DESIGN §2.
    #[error("invalid object id: {0}")]
    InvalidId(String),
    /// Any other argument that cannot be accepted (state, origin, options, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("payload of {size} bytes exceeds max_payload_bytes ({max})")]
    PayloadTooLarge { size: usize, max: usize },
    /// The engine refuses writes for now; retry after `retry_after_secs`.
    #[error("write refused: {reason} (backpressure {level:?}); retry after {retry_after_secs} s")]
    Backpressure {
        level: BackpressureLevel,
        reason: String,
        retry_after_secs: u64,
    },
    /// A replicated version is too far ahead of our clock; offer it again later.
    #[error("version deferred: {ahead_ms} ms ahead of the local clock (max skew {max_skew_ms} ms)")]
    ClockSkew { ahead_ms: u64, max_skew_ms: u64 },
    #[error("engine is {0}")]
    NotReady(String),
    /// Local writes wait until the node may make versions again (its clock
    /// is ahead of most members'); retry later.
    #[error("writes refused: {0}")]
    Fenced(String),
    #[error("backend error: {0}")]
    Backend(String),
    #[error("connection error: {0}")]
    Connection(String),
    #[error("corruption in {id}: expected content hash {expected}, found {actual}")]
    Corruption {
        id: String,
        expected: String,
        actual: String,
    },
}

impl StorageError {
    /// Wraps a backend error with what we were doing.
    pub(crate) fn backend(context: &str, e: impl std::fmt::Display) -> Self {
        StorageError::Backend(format!("{context}: {e}"))
    }

    /// Maps a sqlx error: lost or refused connections become `Connection`.
    pub(crate) fn sql(context: &str, e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                StorageError::Connection(format!("{context}: {e}"))
            }
            other => StorageError::Backend(format!("{context}: {other}")),
        }
    }

    /// True for failures of a backend that may pass (worth a retry).
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Connection(_) | StorageError::Backend(_))
    }
}

impl From<syncnode_protocol::ClockSkew> for StorageError {
    fn from(e: syncnode_protocol::ClockSkew) -> Self {
        StorageError::ClockSkew {
            ahead_ms: e.ahead_ms,
            max_skew_ms: e.max_skew_ms,
        }
    }
}
