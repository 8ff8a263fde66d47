//! The commit log: a local SQLite file that holds every write until a remote
//! L3 (MySQL/MariaDB) confirms it.
//!
//! A write is acknowledged once its batch is fsynced here (group commit), so an
//! acknowledged write survives `kill -9` and MySQL outages alike. The drainer
//! moves entries to MySQL in log order and deletes them once MySQL has
//! committed them. The log is bounded by items and bytes; past the bound the
//! engine refuses writes with a backpressure error rather than grow without end.
//! With SQLite as L3 there is no separate log: the L3 transaction is the commit.

use sqlx::{AnyPool, AssertSqlSafe, Row};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::error::StorageError;
use super::item::SyncItem;
use super::l3::{Dialect, open_pool, placeholders};
use super::options::L2Route;

pub struct CommitLog {
    pool: AnyPool,
    items: AtomicU64,
    bytes: AtomicU64,
}

/// One logged write.
pub struct LogEntry {
    pub seq: i64,
    pub item: SyncItem,
}

/// A log record: the item and its L2 route (which `SyncItem`'s serde
/// skips), then its media type when it has one. Records written before
/// media types end after the route, and read the same.
fn encode(item: &SyncItem) -> Result<Vec<u8>, StorageError> {
    let mut out =
        postcard::to_stdvec(&(item, item.route)).map_err(|e| StorageError::backend("encode commit log entry", e))?;
    if let Some(m) = &item.media_type {
        out = postcard::to_extend(m, out).map_err(|e| StorageError::backend("encode commit log entry", e))?;
    }
    Ok(out)
}

fn decode(seq: i64, raw: &[u8]) -> Result<SyncItem, StorageError> {
    let unreadable = |e: postcard::Error| StorageError::Backend(format!("commit log entry {seq} is unreadable: {e}"));
    let ((mut item, route), rest): ((SyncItem, L2Route), _) = postcard::take_from_bytes(raw).map_err(unreadable)?;
    item.route = route;
    if !rest.is_empty() {
        let (media_type, extra): (String, _) = postcard::take_from_bytes(rest).map_err(unreadable)?;
        if !extra.is_empty() {
            return Err(StorageError::Backend(format!(
                "commit log entry {seq} is unreadable: {} bytes after the record",
                extra.len()
            )));
        }
        item.media_type = Some(media_type);
    }
    Ok(item)
}

/// `(entries, bytes)` of the log up to and including `seq`.
async fn size_through(pool: &AnyPool, seq: i64) -> Result<(u64, u64), StorageError> {
    let row = sqlx::query("SELECT COUNT(*), COALESCE(SUM(LENGTH(item)), 0) FROM commit_log WHERE seq <= ?")
        .bind(seq)
        .fetch_one(pool)
        .await
        .map_err(|e| StorageError::sql("size commit log", e))?;
    let n: i64 = row
        .try_get(0)
        .map_err(|e| StorageError::backend("commit log count", e))?;
    let b: i64 = row
        .try_get(1)
        .map_err(|e| StorageError::backend("commit log bytes", e))?;
    Ok((n as u64, b as u64))
}

impl CommitLog {
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        let url = format!("sqlite://{}", path.display());
        let pool = open_pool(&url, Dialect::Sqlite, 2, Duration::from_secs(30)).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS commit_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, item BLOB NOT NULL)",
        )
        .execute(&pool)
        .await
        .map_err(|e| StorageError::sql("create commit log", e))?;
        let (items, bytes) = size_through(&pool, i64::MAX).await?;
        Ok(Self {
            pool,
            items: AtomicU64::new(items),
            bytes: AtomicU64::new(bytes),
        })
    }

    pub fn len(&self) -> u64 {
        self.items.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Appends a batch in one fsynced transaction.
    pub async fn append(&self, items: &[SyncItem]) -> Result<(), StorageError> {
        let encoded: Vec<Vec<u8>> = items.iter().map(encode).collect::<Result<_, _>>()?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| StorageError::sql("commit log begin", e))?;
        for chunk in encoded.chunks(500) {
            let sql = format!("INSERT INTO commit_log (item) VALUES {}", placeholders(chunk.len(), 1));
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for e in chunk {
                q = q.bind(&e[..]);
            }
            q.execute(&mut *tx)
                .await
                .map_err(|e| StorageError::sql("commit log append", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| StorageError::sql("commit log fsync", e))?;
        self.items.fetch_add(items.len() as u64, Ordering::Relaxed);
        self.bytes
            .fetch_add(encoded.iter().map(|e| e.len() as u64).sum(), Ordering::Relaxed);
        Ok(())
    }

    /// The oldest `limit` entries, in log order.
    pub async fn read(&self, limit: usize) -> Result<Vec<LogEntry>, StorageError> {
        let rows = sqlx::query("SELECT seq, item FROM commit_log ORDER BY seq LIMIT ?")
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StorageError::sql("commit log read", e))?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get(0).map_err(|e| StorageError::backend("commit log seq", e))?;
                let raw: Vec<u8> = r.try_get(1).map_err(|e| StorageError::backend("commit log item", e))?;
                Ok(LogEntry {
                    seq,
                    item: decode(seq, &raw)?,
                })
            })
            .collect()
    }

    /// Forgets entries up to and including `seq` (L3 has them).
    pub async fn truncate_through(&self, seq: i64) -> Result<(), StorageError> {
        let (n, b) = size_through(&self.pool, seq).await?;
        sqlx::query("DELETE FROM commit_log WHERE seq <= ?")
            .bind(seq)
            .execute(&self.pool)
            .await
            .map_err(|e| StorageError::sql("commit log truncate", e))?;
        self.items.fetch_sub(n, Ordering::Relaxed);
        self.bytes.fetch_sub(b, Ordering::Relaxed);
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_old_records_still_read() {
        let plain = SyncItem::new("a", &b"x"[..]);
        let typed = SyncItem::new("b", &b"# t"[..]).with_media_type("text/markdown");
        for it in [&plain, &typed] {
            assert_eq!(&decode(1, &encode(it).unwrap()).unwrap(), it);
        }
        // A record from before media types: the item and the route only.
        let old = postcard::to_stdvec(&(&plain, plain.route)).unwrap();
        assert_eq!(old, encode(&plain).unwrap());
        let mut bad = encode(&typed).unwrap();
        bad.push(0);
        let err = decode(9, &bad).unwrap_err().to_string();
        assert!(err.contains("entry 9"), "{err}");
    }
}
