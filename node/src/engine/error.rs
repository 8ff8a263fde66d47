//! Every way an engine call can fail, typed so callers (and the HTTP API) can
//! tell bad input from backpressure from a backend outage.

use super::backpressure::BackpressureLevel;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StorageError {
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
    /// L3 refuses this item's data (a constraint, a trigger, a value too
    /// long): retrying it will not help, the other items are not at fault.
    #[error("refused by L3: {0}")]
    Rejected(String),
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

    /// Maps a sqlx error: lost or refused connections become `Connection`,
    /// the server refusing the data itself `Rejected`, the rest `Backend`.
    pub(crate) fn sql(context: &str, e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                StorageError::Connection(format!("{context}: {e}"))
            }
            // A constraint sqlx recognises (MySQL's CHECK is HY000 with its
            // own number), or a code that says the data was refused.
            sqlx::Error::Database(db)
                if db.kind() != sqlx::error::ErrorKind::Other || refuses_the_data(db.code().as_deref()) =>
            {
                StorageError::Rejected(format!("{context}: {db}"))
            }
            other => StorageError::Backend(format!("{context}: {other}")),
        }
    }

    /// The item's own fault: L3 refuses its data. Retrying will not help;
    /// other items written with it are not at fault.
    pub fn is_item_fault(&self) -> bool {
        matches!(self, StorageError::Rejected(_))
    }
}

/// Whether a database error code says the data was refused, not the
/// server's state: SQLSTATE classes 22 (data exception), 23 (integrity
/// constraint) and 45000 (a trigger's SIGNAL) on MySQL; on SQLite (its
/// extended result codes) the constraint family (19, RAISE in a trigger
/// included), TOOBIG (18) and MISMATCH (20), whose primary code is the
/// low byte. A full disk, a read-only server, a deadlock or a lock timeout
/// are not: they pass, and every item would fail with them.
fn refuses_the_data(code: Option<&str>) -> bool {
    let Some(code) = code else { return false };
    // SQLSTATEs have five characters and may hold letters; SQLite's codes
    // are numbers below 10,000.
    if code.len() == 5 {
        return code.starts_with("22") || code.starts_with("23") || code == "45000";
    }
    code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 18..=20))
}

impl From<syncnode_protocol::ClockSkew> for StorageError {
    fn from(e: syncnode_protocol::ClockSkew) -> Self {
        StorageError::ClockSkew {
            ahead_ms: e.ahead_ms,
            max_skew_ms: e.max_skew_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::refuses_the_data;

    #[test]
    fn data_refusals_are_told_from_server_trouble() {
        for refused in ["23000", "22001", "45000", "19", "1811", "2067", "2835", "18", "20"] {
            assert!(refuses_the_data(Some(refused)), "{refused}");
        }
        for passing in ["HY000", "40001", "42S02", "08S01", "13", "5", "517", "1", "8", "266"] {
            assert!(!refuses_the_data(Some(passing)), "{passing}");
        }
        assert!(!refuses_the_data(None));
    }
}
