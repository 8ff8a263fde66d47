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

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::error::StorageError;
use super::item::{ContentType, SyncItem};
use super::options::L2Route;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    MySql,
}

/// The columns of `sync_items`, in the order every query uses.
/// `hkey` is the first 32 bits of SHA-256(id): it places a row in the Merkle
/// tree, so the entries under any tree node are one index range.
/// `l2` is 1 when the row is mirrored in Redis (`L2Route::Mirror`).
/// `media_type` is the writer's media type (NULL: none given).
const COLUMNS: &str = "id, version, origin, updated_at, content_type, content, content_hash, state, tombstone, access_count, last_accessed, trace_parent, hkey, l2, media_type";
const N_COLUMNS: usize = 15;
/// The columns of an `EntryMeta`.
const META_COLUMNS: &str = "SELECT id, version, origin, tombstone, content_hash, state, l2";
/// Rows per multi-row statement (a power of two; see `pow2_chunks`).
const CHUNK_ROWS: usize = 256;
/// Bytes of content per multi-row statement (well under MySQL's packet limit).
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// What the Merkle tree and the LWW rule need of a stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub id: String,
    pub version: u64,
    pub origin: String,
    pub tombstone: bool,
    /// Lowercase hex.
    pub content_hash: String,
    pub state: String,
    /// Mirrored in Redis (`L2Route::Mirror`).
    pub l2: bool,
}

impl EntryMeta {
    pub fn of(item: &SyncItem) -> Self {
        Self {
            id: item.object_id.clone(),
            version: item.version,
            origin: item.origin.clone(),
            tombstone: item.tombstone,
            content_hash: item.content_hash.clone(),
            state: item.state.clone(),
            l2: item.route == L2Route::Mirror,
        }
    }

    pub fn stamp(&self) -> syncnode_protocol::Stamp<'_> {
        syncnode_protocol::Stamp::new(self.version, &self.origin, &self.content_hash)
    }

    pub fn digest(&self) -> syncnode_protocol::EntryDigest {
        let mut h = [0u8; 32];
        let _ = hex::decode_to_slice(&self.content_hash, &mut h);
        syncnode_protocol::EntryDigest::new(&self.id, self.version, &self.origin, self.tombstone, &h)
    }
}

/// The outcome of one batch.
#[derive(Debug)]
pub struct Applied {
    /// The generation the batch committed as.
    pub generation: u64,
    /// For each written item: its index in the batch and the entry it replaced.
    pub written: Vec<(usize, Option<EntryMeta>)>,
}

/// DDL of the items table, shared with the benchmark baseline so both write
/// the same rows into the same schema.
pub fn items_table_ddl(dialect: Dialect) -> &'static [&'static str] {
    match dialect {
        Dialect::Sqlite => &[
            "CREATE TABLE IF NOT EXISTS sync_items (
                id BLOB PRIMARY KEY NOT NULL, version INTEGER NOT NULL, origin BLOB NOT NULL,
                updated_at INTEGER NOT NULL, content_type INTEGER NOT NULL, content BLOB NOT NULL,
                content_hash BLOB NOT NULL, state BLOB NOT NULL, tombstone INTEGER NOT NULL,
                access_count INTEGER NOT NULL, last_accessed INTEGER NOT NULL, trace_parent BLOB,
                hkey INTEGER NOT NULL, l2 INTEGER NOT NULL, media_type BLOB)",
            "CREATE INDEX IF NOT EXISTS sync_items_state ON sync_items(state, tombstone)",
            "CREATE INDEX IF NOT EXISTS sync_items_hkey ON sync_items(hkey)",
            "CREATE TABLE IF NOT EXISTS sync_purged (
                id BLOB PRIMARY KEY NOT NULL, version INTEGER NOT NULL, origin BLOB NOT NULL,
                purged_at INTEGER NOT NULL)",
        ],
        Dialect::MySql => &[
            "CREATE TABLE IF NOT EXISTS sync_items (
                id VARBINARY(512) NOT NULL PRIMARY KEY, version BIGINT NOT NULL, origin VARBINARY(128) NOT NULL,
                updated_at BIGINT NOT NULL, content_type BIGINT NOT NULL, content LONGBLOB NOT NULL,
                content_hash BINARY(32) NOT NULL, state VARBINARY(64) NOT NULL, tombstone BIGINT NOT NULL,
                access_count BIGINT NOT NULL, last_accessed BIGINT NOT NULL, trace_parent VARBINARY(256) NULL,
                hkey BIGINT NOT NULL, l2 BIGINT NOT NULL, media_type VARBINARY(255) NULL, KEY sync_items_state (state, tombstone), KEY sync_items_hkey (hkey)) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS sync_purged (
                id VARBINARY(512) NOT NULL PRIMARY KEY, version BIGINT NOT NULL, origin VARBINARY(128) NOT NULL,
                purged_at BIGINT NOT NULL) ENGINE=InnoDB",
        ],
    }
}

fn meta_table_ddl(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => {
            "CREATE TABLE IF NOT EXISTS syncnode_meta (name BLOB PRIMARY KEY NOT NULL, ival INTEGER NOT NULL, bval BLOB)"
        }
        Dialect::MySql => {
            "CREATE TABLE IF NOT EXISTS syncnode_meta (name VARBINARY(64) NOT NULL PRIMARY KEY, ival BIGINT NOT NULL, bval LONGBLOB NULL) ENGINE=InnoDB"
        }
    }
}

/// SQLite settings for durable group commit: WAL, fsync on every commit.
pub const SQLITE_PRAGMAS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 5000",
];

/// A connection pool with the dialect's session settings (SQLite: WAL and
/// fsync on commit; MySQL: READ COMMITTED). Shared by L3 and the commit log.
pub(crate) async fn open_pool(
    url: &str,
    dialect: Dialect,
    max_connections: u32,
    timeout: Duration,
) -> Result<AnyPool, StorageError> {
    sqlx::any::install_default_drivers();
    let url = match dialect {
        Dialect::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
        _ => url.replacen("mariadb:", "mysql:", 1),
    };
    AnyPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(timeout)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                let setup: &[&str] = match dialect {
                    Dialect::Sqlite => SQLITE_PRAGMAS,
                    Dialect::MySql => &["SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"],
                };
                for s in setup {
                    sqlx::query(*s).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(|e| StorageError::sql(&format!("connect to {}", url.split('@').next_back().unwrap_or("")), e))
}

/// `(placeholders for n rows of k columns)`, e.g. `(?,?),(?,?)`.
pub fn placeholders(rows: usize, cols: usize) -> String {
    let row = format!("({})", vec!["?"; cols].join(","));
    vec![row; rows].join(",")
}

/// The upsert statement for `rows` rows.
pub fn upsert_sql(dialect: Dialect, rows: usize) -> String {
    let sets: Vec<String> = COLUMNS
        .split(", ")
        .skip(1)
        .map(|c| match dialect {
            Dialect::Sqlite => format!("{c}=excluded.{c}"),
            Dialect::MySql => format!("{c}=VALUES({c})"),
        })
        .collect();
    let conflict = match dialect {
        Dialect::Sqlite => "ON CONFLICT(id) DO UPDATE SET",
        Dialect::MySql => "ON DUPLICATE KEY UPDATE",
    };
    format!(
        "INSERT INTO sync_items ({COLUMNS}) VALUES {} {conflict} {}",
        placeholders(rows, N_COLUMNS),
        sets.join(", ")
    )
}

/// Binds one item's columns in `COLUMNS` order.
pub fn bind_item<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    it: &'q SyncItem,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    q.bind(it.object_id.as_bytes())
        .bind(it.version as i64)
        .bind(it.origin.as_bytes())
        .bind(it.updated_at)
        .bind(it.content_type.code())
        .bind(&it.content[..])
        .bind(hex_to_raw(&it.content_hash))
        .bind(it.state.as_bytes())
        .bind(it.tombstone as i64)
        .bind(it.access_count.min(i64::MAX as u64) as i64)
        .bind(it.last_accessed.min(i64::MAX as u64) as i64)
        .bind(it.trace_parent.as_deref().map(str::as_bytes))
        .bind(hkey(&it.object_id))
        .bind((it.route == L2Route::Mirror) as i64)
        .bind(it.media_type.as_deref().map(str::as_bytes))
}

/// The first 32 bits of SHA-256(id).
pub fn hkey(id: &str) -> i64 {
    let k = syncnode_protocol::merkle::key_of(id);
    u32::from_be_bytes([k[0], k[1], k[2], k[3]]) as i64
}

fn hex_to_raw(h: &str) -> Vec<u8> {
    hex::decode(h).unwrap_or_default()
}

fn text(row: &AnyRow, i: usize, what: &str) -> Result<String, StorageError> {
    let raw: Vec<u8> = row.try_get(i).map_err(|e| StorageError::backend(what, e))?;
    String::from_utf8(raw).map_err(|_| StorageError::Backend(format!("{what}: stored value is not UTF-8")))
}

fn int(row: &AnyRow, i: usize, what: &str) -> Result<i64, StorageError> {
    row.try_get::<i64, _>(i).map_err(|e| StorageError::backend(what, e))
}

fn item_from_row(row: &AnyRow) -> Result<SyncItem, StorageError> {
    let content: Vec<u8> = row.try_get(5).map_err(|e| StorageError::backend("content", e))?;
    let hash: Vec<u8> = row.try_get(6).map_err(|e| StorageError::backend("content_hash", e))?;
    let trace: Option<Vec<u8>> = row.try_get(11).map_err(|e| StorageError::backend("trace_parent", e))?;
    let media_type: Option<Vec<u8>> = row.try_get(14).map_err(|e| StorageError::backend("media_type", e))?;
    Ok(SyncItem {
        object_id: text(row, 0, "id")?,
        version: int(row, 1, "version")? as u64,
        origin: text(row, 2, "origin")?,
        updated_at: int(row, 3, "updated_at")?,
        content_type: ContentType::from_code(int(row, 4, "content_type")?),
        content: content.into(),
        content_hash: hex::encode(hash),
        state: text(row, 7, "state")?,
        tombstone: int(row, 8, "tombstone")? != 0,
        access_count: int(row, 9, "access_count")?.max(0) as u64,
        last_accessed: int(row, 10, "last_accessed")?.max(0) as u64,
        trace_parent: trace.map(|t| String::from_utf8_lossy(&t).into_owned()),
        media_type: media_type.map(|m| String::from_utf8_lossy(&m).into_owned()),
        route: if int(row, 13, "l2")? != 0 {
            L2Route::Mirror
        } else {
            L2Route::Skip
        },
    })
}

fn meta_from_row(row: &AnyRow) -> Result<EntryMeta, StorageError> {
    let hash: Vec<u8> = row.try_get(4).map_err(|e| StorageError::backend("content_hash", e))?;
    Ok(EntryMeta {
        id: text(row, 0, "id")?,
        version: int(row, 1, "version")? as u64,
        origin: text(row, 2, "origin")?,
        tombstone: int(row, 3, "tombstone")? != 0,
        content_hash: hex::encode(hash),
        state: text(row, 5, "state")?,
        l2: int(row, 6, "l2")? != 0,
    })
}

/// The smallest byte string greater than every string starting with `prefix`
/// (`None` when there is none), for index range scans instead of `LIKE`.
pub fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut up = prefix.to_vec();
    while let Some(last) = up.pop() {
        if last < 0xff {
            up.push(last + 1);
            return Some(up);
        }
    }
    None
}

/// `{select} FROM sync_items WHERE <id in the prefix's byte range>{tail}`, with
/// the range bound; an index range scan instead of `LIKE` (no escaping, exact bytes).
fn prefix_query<'q>(
    select: &str,
    prefix: &'q str,
    tail: &str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    page_query(select, prefix, None, tail)
}

/// `prefix_query` from the id after `after` on (a page of a scan).
fn page_query<'q>(
    select: &str,
    prefix: &'q str,
    after: Option<&'q str>,
    tail: &str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let upper = prefix_upper_bound(prefix.as_bytes());
    // The engine's own ids (index definitions) stay out of user scans.
    let hide = super::index_catalog::hides_reserved(prefix);
    let sql = format!(
        "{select} FROM sync_items WHERE id >= ?{}{}{}{tail}",
        if after.is_some() { " AND id > ?" } else { "" },
        if upper.is_some() { " AND id < ?" } else { "" },
        if hide { " AND NOT (id >= ? AND id < ?)" } else { "" }
    );
    let mut q = sqlx::query(AssertSqlSafe(sql)).bind(prefix.as_bytes());
    if let Some(a) = after {
        q = q.bind(a.as_bytes());
    }
    if let Some(u) = upper {
        q = q.bind(u);
    }
    if hide {
        let reserved = super::index_catalog::RESERVED.as_bytes();
        q = q
            .bind(reserved)
            .bind(prefix_upper_bound(reserved).expect("the reserved prefix has an upper bound"));
    }
    q
}

/// `{select} FROM sync_items WHERE id IN (<ids>)`, with the ids bound.
fn ids_query<'q>(select: &str, ids: &[&'q str]) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let sql = format!(
        "{select} FROM sync_items WHERE id IN ({})",
        vec!["?"; ids.len()].join(",")
    );
    ids.iter()
        .fold(sqlx::query(AssertSqlSafe(sql)), |q, id| q.bind(id.as_bytes()))
}

/// Splits a slice into statements of at most `CHUNK_ROWS` rows, each paired
/// with its statement size: the row count rounded up to a power of two, the gap
/// filled by repeating the last row (a repeated id in an `IN` list or a repeated
/// upsert of the same row changes nothing). So the writer runs a handful of
/// statement shapes that stay prepared, with one statement per chunk.
fn padded_chunks<T>(items: &[T]) -> Vec<(&[T], usize)> {
    items
        .chunks(CHUNK_ROWS)
        .map(|c| (c, c.len().next_power_of_two()))
        .collect()
}

/// Splits items into statements under `CHUNK_BYTES` of content each.
fn chunks<'a>(items: &'a [&'a SyncItem]) -> Vec<(&'a [&'a SyncItem], usize)> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, it) in items.iter().enumerate() {
        if i > start && bytes + it.content.len() > CHUNK_BYTES {
            out.extend(padded_chunks(&items[start..i]));
            start = i;
            bytes = 0;
        }
        bytes += it.content.len();
    }
    out.extend(padded_chunks(&items[start..]));
    out
}

/// The chunk followed by copies of its last element up to `size`.
fn padded<T>(chunk: &[T], size: usize) -> impl Iterator<Item = &T> {
    let last = chunk.last();
    chunk
        .iter()
        .chain(std::iter::repeat_n(last, size - chunk.len()).flatten())
}

/// Which rows a query over items returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    Live,
    WithTombstones,
}

impl Rows {
    fn clause(self) -> &'static str {
        match self {
            Rows::Live => " AND tombstone = 0",
            Rows::WithTombstones => "",
        }
    }
}

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
    async fn timed<T>(&self, what: &str, f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, StorageError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| StorageError::sql(what, e)),
            Err(_) => Err(StorageError::Connection(format!(
                "{what}: timed out after {:?}",
                self.timeout
            ))),
        }
    }

    async fn init_schema(&self) -> Result<(), StorageError> {
        for ddl in items_table_ddl(self.dialect)
            .iter()
            .copied()
            .chain([meta_table_ddl(self.dialect)])
        {
            self.timed("create schema", sqlx::query(ddl).execute(&self.pool))
                .await?;
        }
        self.add_media_type_column().await?;
        let seed = match self.dialect {
            Dialect::Sqlite => "INSERT OR IGNORE INTO syncnode_meta (name, ival) VALUES (?, 0)",
            Dialect::MySql => "INSERT IGNORE INTO syncnode_meta (name, ival) VALUES (?, 0)",
        };
        for name in ["generation", "max_version"] {
            self.timed("seed meta", sqlx::query(seed).bind(name.as_bytes()).execute(&self.pool))
                .await?;
        }
        Ok(())
    }

    /// Adds `media_type` to an items table made before it existed (NULL:
    /// no media type, which is what those rows had).
    async fn add_media_type_column(&self) -> Result<(), StorageError> {
        let (probe, alter) = match self.dialect {
            Dialect::Sqlite => (
                "SELECT COUNT(*) FROM pragma_table_info('sync_items') WHERE name = 'media_type'",
                "ALTER TABLE sync_items ADD COLUMN media_type BLOB",
            ),
            Dialect::MySql => (
                "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() \
                 AND table_name = 'sync_items' AND column_name = 'media_type'",
                "ALTER TABLE sync_items ADD COLUMN media_type VARBINARY(255) NULL",
            ),
        };
        let row = self
            .timed(
                "look for the media_type column",
                sqlx::query(probe).fetch_one(&self.pool),
            )
            .await?;
        if int(&row, 0, "media_type column count")? == 0 {
            tracing::info!("adding the media_type column to sync_items (schema of an older release)");
            self.timed("add the media_type column", sqlx::query(alter).execute(&self.pool))
                .await?;
        }
        Ok(())
    }

    /// The largest statement the server takes (MySQL's `max_allowed_packet`);
    /// `None` for SQLite, which has no such limit below our own.
    pub async fn max_statement_bytes(&self) -> Result<Option<u64>, StorageError> {
        if self.dialect != Dialect::MySql {
            return Ok(None);
        }
        let row = self
            .timed(
                "read max_allowed_packet",
                sqlx::query("SELECT CAST(@@max_allowed_packet AS SIGNED)").fetch_one(&self.pool),
            )
            .await?;
        Ok(Some(int(&row, 0, "max_allowed_packet")?.max(0) as u64))
    }

    /// SQLite only: a consistent copy of the whole database at `path`.
    pub async fn vacuum_into(&self, path: &std::path::Path) -> Result<(), StorageError> {
        let target = path
            .to_str()
            .ok_or_else(|| StorageError::InvalidInput(format!("backup path {path:?} is not UTF-8")))?;
        // A copy of any size: no statement timeout.
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(&self.pool)
            .await
            .map_err(|e| StorageError::sql("backup (VACUUM INTO)", e))?;
        Ok(())
    }

    /// `SELECT 1`; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, StorageError> {
        let start = Instant::now();
        self.timed("ping", sqlx::query("SELECT 1").execute(&self.pool)).await?;
        Ok(start.elapsed())
    }

    /// The stored version of `id`, tombstones included.
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        let sql = format!("SELECT {COLUMNS} FROM sync_items WHERE id = ?");
        let row = self
            .timed(
                "get",
                sqlx::query(AssertSqlSafe(sql))
                    .bind(id.as_bytes())
                    .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref().map(item_from_row).transpose()
    }

    /// Content sizes of the stored `ids` (absent ids are left out).
    pub async fn content_sizes(&self, ids: &[&str]) -> Result<HashMap<String, usize>, StorageError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK_ROWS) {
            let q = ids_query("SELECT id, LENGTH(content)", chunk);
            for r in self.timed("read content sizes", q.fetch_all(&self.pool)).await? {
                out.insert(text(&r, 0, "id")?, int(&r, 1, "length")?.max(0) as usize);
            }
        }
        Ok(out)
    }

    /// Stored versions of `ids` (tombstones included), in no particular order.
    pub async fn get_many(&self, ids: &[&str]) -> Result<Vec<SyncItem>, StorageError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK_ROWS) {
            let q = ids_query(&format!("SELECT {COLUMNS}"), chunk);
            let rows = self.timed("get_many", q.fetch_all(&self.pool)).await?;
            for r in &rows {
                out.push(item_from_row(r)?);
            }
        }
        Ok(out)
    }

    async fn meta_in<'e, E>(&self, exec: E, ids: &[&str]) -> Result<HashMap<String, EntryMeta>, StorageError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let q = ids_query(META_COLUMNS, ids);
        let rows = self.timed("read entry versions", q.fetch_all(exec)).await?;
        rows.iter()
            .map(|r| meta_from_row(r).map(|m| (m.id.clone(), m)))
            .collect()
    }

    /// Versions of `ids` as stored.
    pub async fn meta_of(&self, ids: &[&str]) -> Result<HashMap<String, EntryMeta>, StorageError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(CHUNK_ROWS) {
            out.extend(self.meta_in(&self.pool, chunk).await?);
        }
        Ok(out)
    }

    /// Writes the items that win over what is stored (last-writer-wins), in one
    /// transaction with a generation bump. `items` hold at most one version per id.
    pub async fn apply_batch(&self, items: &[SyncItem]) -> Result<Applied, StorageError> {
        let mut tx = self.timed("begin", self.write_pool.begin()).await?;
        let mut existing = HashMap::new();
        let ids: Vec<&str> = items.iter().map(|i| i.object_id.as_str()).collect();
        for chunk in ids.chunks(CHUNK_ROWS) {
            existing.extend(self.meta_in(&mut *tx, chunk).await?);
        }
        // New ids whose delete was purged: the purge ledger decides (the
        // engine checks it before; this is the backstop inside the txn).
        let mut purged = HashMap::new();
        if self.ledger_rows.load(Ordering::Acquire) > 0 {
            let new_ids: Vec<&str> = ids.iter().copied().filter(|id| !existing.contains_key(*id)).collect();
            for chunk in new_ids.chunks(CHUNK_ROWS) {
                purged.extend(self.purged_in(&mut *tx, chunk).await?);
            }
        }
        let empty_hash = super::item::content_hash(&[]);
        let mut applied = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let old = existing.remove(&it.object_id);
            if old.is_none()
                && let Some((version, origin)) = purged.get(&it.object_id)
                && syncnode_protocol::Stamp::new(*version, origin, &empty_hash).wins_over(&it.stamp())
            {
                self.resurrections_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if old.as_ref().is_none_or(|o| it.stamp().wins_over(&o.stamp())) {
                applied.push((i, old));
            }
        }
        let rows: Vec<&SyncItem> = applied.iter().map(|(i, _)| &items[*i]).collect();
        for (chunk, size) in chunks(&rows) {
            let sql = upsert_sql(self.dialect, size);
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for it in padded(chunk, size) {
                q = bind_item(q, it);
            }
            self.timed("upsert items", q.execute(&mut *tx)).await?;
        }
        let max_version = rows.iter().map(|r| r.version).max().unwrap_or(0) as i64;
        // The applier is L3's only writer, so it knows the next generation.
        let generation = self.generation.load(Ordering::Acquire) + 1;
        self.timed(
            "bump generation",
            sqlx::query(
                "UPDATE syncnode_meta SET ival = CASE WHEN name = ? THEN ? WHEN ival < ? THEN ? ELSE ival END \
                 WHERE name IN (?, ?)",
            )
            .bind(&b"generation"[..])
            .bind(generation as i64)
            .bind(max_version)
            .bind(max_version)
            .bind(&b"generation"[..])
            .bind(&b"max_version"[..])
            .execute(&mut *tx),
        )
        .await?;
        if let Err(e) = self.timed("commit", tx.commit()).await {
            // The server may have committed before the error reached us.
            self.commit_uncertain.store(true, Ordering::Release);
            return Err(e);
        }
        self.generation.store(generation, Ordering::Release);
        Ok(Applied {
            generation,
            written: applied,
        })
    }

    /// Items under `prefix` in id order, from the id after `after` on.
    pub async fn scan_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        rows: Rows,
    ) -> Result<Vec<SyncItem>, StorageError> {
        let q = page_query(
            &format!("SELECT {COLUMNS}"),
            prefix,
            after,
            &format!("{} ORDER BY id LIMIT ?", rows.clause()),
        );
        let rows = self
            .timed(
                "scan_prefix",
                q.bind(limit.min(i64::MAX as usize) as i64).fetch_all(&self.pool),
            )
            .await?;
        rows.iter().map(item_from_row).collect()
    }

    pub async fn count_prefix(&self, prefix: &str, rows: Rows) -> Result<u64, StorageError> {
        let q = prefix_query("SELECT COUNT(*)", prefix, rows.clause());
        let row = self.timed("count_prefix", q.fetch_one(&self.pool)).await?;
        Ok(int(&row, 0, "count")? as u64)
    }

    /// Live ids under `prefix` (for prefix deletes).
    pub async fn ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StorageError> {
        let q = prefix_query("SELECT id", prefix, " AND tombstone = 0 ORDER BY id LIMIT ?");
        let rows = self
            .timed(
                "ids_with_prefix",
                q.bind(limit.min(i64::MAX as usize) as i64).fetch_all(&self.pool),
            )
            .await?;
        rows.iter().map(|r| text(r, 0, "id")).collect()
    }

    /// Live items in `state` whose id starts with `prefix`, in id order.
    pub async fn by_state_with_prefix(
        &self,
        state: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        let q = page_query(
            &format!("SELECT {COLUMNS}"),
            prefix,
            after,
            " AND state = ? AND tombstone = 0 ORDER BY id LIMIT ?",
        )
        .bind(state.as_bytes())
        .bind(limit.min(i64::MAX as usize) as i64);
        let rows = self.timed("get_by_state", q.fetch_all(&self.pool)).await?;
        rows.iter().map(item_from_row).collect()
    }

    pub async fn by_state(&self, state: &str, limit: usize) -> Result<Vec<SyncItem>, StorageError> {
        let sql = format!("SELECT {COLUMNS} FROM sync_items WHERE state = ? AND tombstone = 0 ORDER BY id LIMIT ?");
        let q = sqlx::query(AssertSqlSafe(sql))
            .bind(state.as_bytes())
            .bind(limit as i64);
        let rows = self.timed("get_by_state", q.fetch_all(&self.pool)).await?;
        rows.iter().map(item_from_row).collect()
    }

    pub async fn count_by_state(&self, state: &str) -> Result<u64, StorageError> {
        let q = sqlx::query("SELECT COUNT(*) FROM sync_items WHERE state = ? AND tombstone = 0").bind(state.as_bytes());
        let row = self.timed("count_by_state", q.fetch_one(&self.pool)).await?;
        Ok(int(&row, 0, "count")? as u64)
    }

    pub async fn state_ids(&self, state: &str, limit: usize) -> Result<Vec<String>, StorageError> {
        let q = sqlx::query("SELECT id FROM sync_items WHERE state = ? AND tombstone = 0 ORDER BY id LIMIT ?")
            .bind(state.as_bytes())
            .bind(limit as i64);
        let rows = self.timed("list_state_ids", q.fetch_all(&self.pool)).await?;
        rows.iter().map(|r| text(r, 0, "id")).collect()
    }

    /// One page of entry versions in id order, after `after` (for rebuilds).
    pub async fn scan_entries(&self, after: Option<&str>, limit: usize) -> Result<Vec<EntryMeta>, StorageError> {
        let sql = format!(
            "{META_COLUMNS} FROM sync_items{} ORDER BY id LIMIT ?",
            if after.is_some() { " WHERE id > ?" } else { "" }
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(a) = after {
            q = q.bind(a.as_bytes());
        }
        let rows = self
            .timed("scan entries", q.bind(limit as i64).fetch_all(&self.pool))
            .await?;
        rows.iter().map(meta_from_row).collect()
    }

    /// Entry versions under the Merkle node `path` (a valid hex path of at most 8 nibbles).
    pub async fn entries_under(&self, path: &str, limit: usize) -> Result<Vec<EntryMeta>, StorageError> {
        let bits = 4 * path.len() as u32;
        let prefix = if path.is_empty() {
            0
        } else {
            u64::from_str_radix(path, 16)
                .map_err(|_| StorageError::InvalidInput(format!("bad merkle path {path:?}")))?
        };
        let lo = (prefix << (32 - bits)) as i64;
        let hi = ((prefix + 1) << (32 - bits)) as i64;
        let q = sqlx::query(AssertSqlSafe(format!(
            "{META_COLUMNS} FROM sync_items WHERE hkey >= ? AND hkey < ? ORDER BY id LIMIT ?"
        )))
        .bind(lo)
        .bind(hi)
        .bind(limit as i64);
        let rows = self.timed("entries under path", q.fetch_all(&self.pool)).await?;
        rows.iter().map(meta_from_row).collect()
    }

    /// Up to `limit` tombstones stamped below `version` and written here
    /// before `written_before_ms`.
    pub async fn tombstones_below(
        &self,
        version: u64,
        written_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<EntryMeta>, StorageError> {
        let q = sqlx::query(AssertSqlSafe(format!(
            "{META_COLUMNS} FROM sync_items WHERE tombstone = 1 AND version < ? AND updated_at < ? LIMIT ?"
        )))
        .bind(version as i64)
        .bind(written_before_ms)
        .bind(limit as i64);
        let rows = self.timed("find old tombstones", q.fetch_all(&self.pool)).await?;
        rows.iter().map(meta_from_row).collect()
    }

    /// Deletes these tombstones (each only if still that exact version) and
    /// records each in the purge ledger (`sync_purged`: id, version, origin),
    /// bumping the generation, in one transaction. Returns the generation and
    /// the entries actually deleted.
    pub async fn purge_tombstones(&self, victims: &[EntryMeta]) -> Result<(u64, Vec<EntryMeta>), StorageError> {
        let mut tx = self.timed("begin", self.write_pool.begin()).await?;
        let mut gone = Vec::new();
        let record = match self.dialect {
            Dialect::Sqlite => {
                "INSERT INTO sync_purged (id, version, origin, purged_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT(id) DO UPDATE SET version = excluded.version, origin = excluded.origin, purged_at = excluded.purged_at"
            }
            Dialect::MySql => {
                "INSERT INTO sync_purged (id, version, origin, purged_at) VALUES (?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE version = VALUES(version), origin = VALUES(origin), purged_at = VALUES(purged_at)"
            }
        };
        let now = super::item::now_ms();
        for v in victims {
            let q = sqlx::query("DELETE FROM sync_items WHERE id = ? AND version = ? AND tombstone = 1")
                .bind(v.id.as_bytes())
                .bind(v.version as i64);
            if self
                .timed("purge tombstone", q.execute(&mut *tx))
                .await?
                .rows_affected()
                == 1
            {
                let q = sqlx::query(record)
                    .bind(v.id.as_bytes())
                    .bind(v.version as i64)
                    .bind(v.origin.as_bytes())
                    .bind(now);
                self.timed("record purge", q.execute(&mut *tx)).await?;
                gone.push(v.clone());
            }
        }
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let q = sqlx::query("UPDATE syncnode_meta SET ival = ? WHERE name = ?")
            .bind(generation as i64)
            .bind(&b"generation"[..]);
        self.timed("bump generation", q.execute(&mut *tx)).await?;
        if let Err(e) = self.timed("commit", tx.commit()).await {
            self.commit_uncertain.store(true, Ordering::Release);
            return Err(e);
        }
        self.generation.store(generation, Ordering::Release);
        self.ledger_rows.fetch_add(gone.len() as u64, Ordering::Release);
        Ok((generation, gone))
    }

    /// The purged tombstones of these ids: id → (version, origin).
    pub async fn purged_of(&self, ids: &[&str]) -> Result<HashMap<String, (u64, String)>, StorageError> {
        let mut out = HashMap::new();
        if self.ledger_rows.load(Ordering::Acquire) == 0 {
            return Ok(out);
        }
        for chunk in ids.chunks(CHUNK_ROWS) {
            out.extend(self.purged_in(&self.pool, chunk).await?);
        }
        Ok(out)
    }

    async fn purged_in<'e, E>(&self, exec: E, ids: &[&str]) -> Result<HashMap<String, (u64, String)>, StorageError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let sql = format!(
            "SELECT id, version, origin FROM sync_purged WHERE id IN ({})",
            vec!["?"; ids.len()].join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in ids {
            q = q.bind(id.as_bytes());
        }
        let mut out = HashMap::new();
        for r in self.timed("read purge ledger", q.fetch_all(exec)).await? {
            out.insert(
                text(&r, 0, "id")?,
                (int(&r, 1, "version")? as u64, text(&r, 2, "origin")?),
            );
        }
        Ok(out)
    }

    /// A page of the purge ledger in id order, after `after`:
    /// `(id, version, origin, purged_at)`.
    pub async fn purged_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64, String, i64)>, StorageError> {
        let q = sqlx::query("SELECT id, version, origin, purged_at FROM sync_purged WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after.unwrap_or("").as_bytes())
            .bind(limit as i64);
        let rows = self.timed("page purge ledger", q.fetch_all(&self.pool)).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    text(r, 0, "id")?,
                    int(r, 1, "version")? as u64,
                    text(r, 2, "origin")?,
                    int(r, 3, "purged_at")?,
                ))
            })
            .collect()
    }

    /// Adds records learned from a peer (a joining node learns the ledger);
    /// of two records for one id the greater version stays. Returns how
    /// many rows changed.
    pub async fn record_purged(&self, records: &[(String, u64, String, i64)]) -> Result<u64, StorageError> {
        let sql = match self.dialect {
            Dialect::Sqlite => {
                "INSERT INTO sync_purged (id, version, origin, purged_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT(id) DO UPDATE SET version = excluded.version, origin = excluded.origin, \
                 purged_at = excluded.purged_at WHERE excluded.version > sync_purged.version"
            }
            // Assignments run left to right: `version` goes last so the
            // others still compare against the old one.
            Dialect::MySql => {
                "INSERT INTO sync_purged (id, version, origin, purged_at) VALUES (?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE origin = IF(VALUES(version) > version, VALUES(origin), origin), \
                 purged_at = IF(VALUES(version) > version, VALUES(purged_at), purged_at), \
                 version = IF(VALUES(version) > version, VALUES(version), version)"
            }
        };
        let mut tx = self.timed("begin", self.write_pool.begin()).await?;
        let mut changed = 0;
        for (id, version, origin, purged_at) in records {
            let q = sqlx::query(sql)
                .bind(id.as_bytes())
                .bind(*version as i64)
                .bind(origin.as_bytes())
                .bind(*purged_at);
            changed += self
                .timed("record purge", q.execute(&mut *tx))
                .await?
                .rows_affected()
                .min(1);
        }
        self.timed("commit", tx.commit()).await?;
        let rows = self.purged_count().await?;
        self.ledger_rows.store(rows, Ordering::Release);
        Ok(changed)
    }

    /// Deletes every item and purge record and bumps the generation, in one
    /// transaction (`syncnode resync`). Returns the new generation.
    pub async fn erase_all(&self) -> Result<u64, StorageError> {
        let mut tx = self.timed("begin", self.write_pool.begin()).await?;
        self.timed("erase items", sqlx::query("DELETE FROM sync_items").execute(&mut *tx))
            .await?;
        self.timed(
            "erase purge ledger",
            sqlx::query("DELETE FROM sync_purged").execute(&mut *tx),
        )
        .await?;
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let q = sqlx::query("UPDATE syncnode_meta SET ival = ? WHERE name = ?")
            .bind(generation as i64)
            .bind(&b"generation"[..]);
        self.timed("bump generation", q.execute(&mut *tx)).await?;
        self.timed("commit", tx.commit()).await?;
        self.generation.store(generation, Ordering::Release);
        self.ledger_rows.store(0, Ordering::Release);
        Ok(generation)
    }

    /// Drops purge records older than `before_ms`; returns how many.
    pub async fn prune_purged(&self, before_ms: i64) -> Result<u64, StorageError> {
        let q = sqlx::query("DELETE FROM sync_purged WHERE purged_at < ?").bind(before_ms);
        let n = self
            .timed("prune purge ledger", q.execute(&self.write_pool))
            .await?
            .rows_affected();
        if n > 0 {
            // Re-read rather than subtract: a purge may have re-recorded an id.
            let left = self.purged_count().await?;
            self.ledger_rows.store(left, Ordering::Release);
        }
        Ok(n)
    }

    /// Records in the purge ledger.
    pub async fn purged_count(&self) -> Result<u64, StorageError> {
        let q = sqlx::query("SELECT COUNT(*) FROM sync_purged");
        let r = self.timed("count purge ledger", q.fetch_one(&self.pool)).await?;
        Ok(int(&r, 0, "count")? as u64)
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

    /// A named blob with its integer tag (snapshots).
    pub async fn load_blob(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let row = self
            .timed(
                "load snapshot",
                sqlx::query("SELECT ival, bval FROM syncnode_meta WHERE name = ?")
                    .bind(name.as_bytes())
                    .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let blob: Option<Vec<u8>> = row.try_get(1).map_err(|e| StorageError::backend("snapshot", e))?;
        Ok(blob.map(|b| (int(&row, 0, "ival").unwrap_or(0) as u64, b)))
    }

    pub async fn save_blob(&self, name: &str, tag: u64, bytes: &[u8]) -> Result<(), StorageError> {
        let sql = match self.dialect {
            Dialect::Sqlite => {
                "INSERT INTO syncnode_meta (name, ival, bval) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET ival = excluded.ival, bval = excluded.bval"
            }
            Dialect::MySql => {
                "INSERT INTO syncnode_meta (name, ival, bval) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE ival = VALUES(ival), bval = VALUES(bval)"
            }
        };
        let q = sqlx::query(sql).bind(name.as_bytes()).bind(tag as i64).bind(bytes);
        self.timed("save snapshot", q.execute(&self.write_pool)).await?;
        Ok(())
    }

    /// Named blobs whose name starts with `prefix`.
    pub async fn load_blobs_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let upper = prefix_upper_bound(prefix.as_bytes()).unwrap_or_else(|| vec![0xff; 65]);
        let q = sqlx::query("SELECT name, bval FROM syncnode_meta WHERE name >= ? AND name < ? AND bval IS NOT NULL")
            .bind(prefix.as_bytes())
            .bind(upper);
        let rows = self.timed("load blobs", q.fetch_all(&self.pool)).await?;
        rows.iter()
            .map(|r| {
                let b: Vec<u8> = r.try_get(1).map_err(|e| StorageError::backend("blob", e))?;
                Ok((text(r, 0, "name")?, b))
            })
            .collect()
    }

    pub async fn delete_blob(&self, name: &str) -> Result<(), StorageError> {
        let q = sqlx::query("DELETE FROM syncnode_meta WHERE name = ?").bind(name.as_bytes());
        self.timed("delete blob", q.execute(&self.write_pool)).await?;
        Ok(())
    }

    /// Live items under `prefix` after `after` (inclusive when `!exclusive`), in id order.
    pub async fn scan_from(
        &self,
        prefix: &str,
        after: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        let upper = prefix_upper_bound(prefix.as_bytes());
        let sql = format!(
            "SELECT {COLUMNS} FROM sync_items WHERE id {} ?{} AND tombstone = 0 ORDER BY id LIMIT ?",
            if exclusive { ">" } else { ">=" },
            if upper.is_some() { " AND id < ?" } else { "" }
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(after.as_bytes());
        if let Some(u) = upper {
            q = q.bind(u);
        }
        let rows = self.timed("scan", q.bind(limit as i64).fetch_all(&self.pool)).await?;
        rows.iter().map(item_from_row).collect()
    }

    /// Ids of live JSON items under `prefix` matching the search condition, in id order.
    pub async fn search_ids(
        &self,
        prefix: &str,
        after: Option<&str>,
        cond: &str,
        args: &[super::search::SqlArg],
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let tail = format!(" AND tombstone = 0 AND content_type = 1 AND ({cond}) ORDER BY id LIMIT ?");
        let mut q = page_query("SELECT id", prefix, after, &tail);
        for a in args {
            q = match a {
                super::search::SqlArg::Text(t) => q.bind(t.clone()),
                super::search::SqlArg::Num(n) => q.bind(*n),
            };
        }
        let rows = self.timed("search", q.bind(limit as i64).fetch_all(&self.pool)).await?;
        rows.iter().map(|r| text(r, 0, "id")).collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
        self.write_pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_bounds() {
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff\xff"), None);
        assert_eq!(prefix_upper_bound(b""), None);
    }

    #[test]
    fn statements_are_chunked_by_rows_and_bytes() {
        let small: Vec<SyncItem> = (0..1200)
            .map(|i| SyncItem::new(format!("{i}"), vec![0u8; 10]))
            .collect();
        let refs: Vec<&SyncItem> = small.iter().collect();
        let shapes: Vec<(usize, usize)> = chunks(&refs).iter().map(|(c, s)| (c.len(), *s)).collect();
        assert_eq!(shapes, vec![(256, 256), (256, 256), (256, 256), (256, 256), (176, 256)]);
        let padded_ids: Vec<&u8> = padded(&[1u8, 2, 3], 4).collect();
        assert_eq!(padded_ids, vec![&1, &2, &3, &3]);
        assert!(padded_chunks::<u8>(&[]).is_empty());
        let big: Vec<SyncItem> = (0..3)
            .map(|i| SyncItem::new(format!("{i}"), vec![0u8; 3 << 20]))
            .collect();
        let refs: Vec<&SyncItem> = big.iter().collect();
        assert_eq!(chunks(&refs).len(), 3);
    }
}
