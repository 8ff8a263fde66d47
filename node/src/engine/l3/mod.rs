//! L3: the SQL ground truth, on SQLite (embedded) or MySQL/MariaDB.
//!
//! One store over sqlx's `Any` driver; the two backends differ only in DDL,
//! upsert syntax and connection settings (`Dialect`), so every query is written
//! once. Ids, origins, states and hashes are stored as bytes (`BLOB` /
//! `VARBINARY`), which makes ordering and equality byte-exact on both backends
//! (MySQL's `_bin` collations pad trailing spaces). `u64` versions are stored as
//! `BIGINT`; they stay below 2^63 (checked on input).
//!
//! Every batch bumps a `generation` counter in the same transaction; the
//! Merkle/filter snapshot records the generation it was taken at, which is how
//! the engine knows on start whether the snapshot still describes the table.
//!
//! The parts: `schema` (dialects, pools and the migrations that make and
//! change the tables), `items` (rows, the batch upsert, reads by id),
//! `scans` (prefix, state and hash-range scans; the SQL search tier),
//! `ledger` (the purge ledger of DESIGN §6) and `blobs` (named snapshots:
//! the Merkle tree, the filter, index definitions).

mod blobs;
mod checkpoint;
mod items;
mod ledger;
mod scans;
mod schema;

use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) use checkpoint::run_checkpointer;
pub use items::{Applied, bind_item, hkey, placeholders, upsert_sql};
pub use scans::{DigestRow, Rows, SqlArg, prefix_upper_bound};
pub(crate) use schema::open_pool;
pub use schema::{Dialect, SQLITE_PRAGMAS, migrator};

use super::error::StorageError;

pub struct L3Store {
    /// Reads.
    pool: AnyPool,
    /// The single writer's own connection: one transaction at a time, and its
    /// prepared statements stay warm.
    write_pool: AnyPool,
    /// L3's generation as of the last commit (read at connect).
    generation: AtomicU64,
    /// A commit failed in a way that may have committed after all.
    commit_uncertain: AtomicBool,
    /// Remote versions refused because their delete was purged (see
    /// engine/purge.rs).
    pub resurrections_refused: AtomicU64,
    /// Rows in the purge ledger, so an empty one costs no lookups (an
    /// overestimate is harmless).
    ledger_rows: AtomicU64,
    dialect: Dialect,
    timeout: Duration,
    checkpoints: checkpoint::Checkpoints,
}

impl L3Store {
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> Result<Self, StorageError> {
        let dialect = if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            Dialect::MySql
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(StorageError::InvalidInput(format!(
                "sql_url must start with sqlite: or mysql:, got {url:?}"
            )));
        };
        let pool = open_pool(url, dialect, max_connections, timeout).await?;
        let write_pool = open_pool(url, dialect, 1, timeout).await?;
        let store = Self {
            pool,
            write_pool,
            generation: AtomicU64::new(0),
            commit_uncertain: AtomicBool::new(false),
            resurrections_refused: AtomicU64::new(0),
            ledger_rows: AtomicU64::new(0),
            dialect,
            timeout,
            checkpoints: Default::default(),
        };
        store.init_schema().await?;
        let (generation, _) = store.generation().await?;
        store.generation.store(generation, Ordering::Release);
        let ledger = store.purged_count().await?;
        store.ledger_rows.store(ledger, Ordering::Release);
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Runs an L3 call under the timeout, so an outage is an error, not a hang.
    pub(super) async fn timed<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| StorageError::sql(what, e)),
            Err(_) => Err(StorageError::Connection(format!(
                "{what}: timed out after {:?}",
                self.timeout
            ))),
        }
    }

    /// `SELECT 1`; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, StorageError> {
        let start = Instant::now();
        self.timed("ping", sqlx::query("SELECT 1").execute(&self.pool)).await?;
        Ok(start.elapsed())
    }

    /// Whether a failed commit may have committed; clears the flag.
    pub fn take_commit_uncertain(&self) -> bool {
        self.commit_uncertain.swap(false, Ordering::AcqRel)
    }

    /// Re-reads the generation from L3 (after an uncertain commit).
    pub async fn reload_generation(&self) -> Result<u64, StorageError> {
        let (generation, _) = self.generation().await?;
        self.generation.store(generation, Ordering::Release);
        Ok(generation)
    }

    /// `(generation, greatest version stored)`.
    pub async fn generation(&self) -> Result<(u64, u64), StorageError> {
        let rows = self
            .timed(
                "read generation",
                sqlx::query("SELECT name, ival FROM syncnode_meta WHERE name IN (?, ?)")
                    .bind(&b"generation"[..])
                    .bind(&b"max_version"[..])
                    .fetch_all(&self.pool),
            )
            .await?;
        let (mut generation, mut max_version) = (0, 0);
        for r in &rows {
            let v = int(r, 1, "ival")? as u64;
            match text(r, 0, "name")?.as_str() {
                "generation" => generation = v,
                _ => max_version = v,
            }
        }
        Ok((generation, max_version))
    }

    pub async fn close(&self) {
        // Wakes the checkpointer so it sees the engine stopping.
        self.checkpoints_wake();
        self.pool.close().await;
        self.write_pool.close().await;
    }
}

pub(super) fn text(row: &AnyRow, i: usize, what: &str) -> Result<String, StorageError> {
    let raw: Vec<u8> = row.try_get(i).map_err(|e| StorageError::backend(what, e))?;
    String::from_utf8(raw).map_err(|_| StorageError::Backend(format!("{what}: stored value is not UTF-8")))
}

pub(super) fn int(row: &AnyRow, i: usize, what: &str) -> Result<i64, StorageError> {
    row.try_get::<i64, _>(i).map_err(|e| StorageError::backend(what, e))
}
