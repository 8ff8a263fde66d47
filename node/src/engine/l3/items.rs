//! Items as rows: the columns, the batch upsert that applies
//! last-writer-wins inside the transaction (with the purge ledger as
//! backstop and a generation bump), and reads by id.

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::{Dialect, L3Store, int, text};
use crate::engine::entry::EntryMeta;
use crate::engine::error::StorageError;
use crate::engine::item::{ContentType, SyncItem};
use crate::engine::options::L2Route;

/// The columns of `sync_items`, in the order every query uses.
/// `hkey` is the first 32 bits of SHA-256(id): it places a row in the Merkle
/// tree, so the entries under any tree node are one index range.
/// `l2` is 1 when the row is mirrored in Redis (`L2Route::Mirror`).
/// `media_type` is the writer's media type (NULL: none given).
pub(super) const COLUMNS: &str = "id, version, origin, updated_at, content_type, content, content_hash, state, tombstone, access_count, last_accessed, trace_parent, hkey, l2, media_type";

pub(super) const N_COLUMNS: usize = 15;

/// The columns of an `EntryMeta`.
pub(super) const META_COLUMNS: &str = "SELECT id, version, origin, tombstone, content_hash, state, l2";

/// Rows per multi-row statement (a power of two; see `pow2_chunks`).
pub(super) const CHUNK_ROWS: usize = 256;

/// Bytes of content per multi-row statement (well under MySQL's packet limit).
pub(super) const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// The outcome of one batch.
#[derive(Debug)]
pub struct Applied {
    /// The generation the batch committed as.
    pub generation: u64,
    /// For each written item: its index in the batch and the entry it replaced.
    pub written: Vec<(usize, Option<EntryMeta>)>,
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
        .bind(crate::engine::item::hash_bytes(&it.content_hash).to_vec())
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

/// The content hash of a row: 32 bytes, else the row is corrupt.
pub(super) fn stored_hash(row: &AnyRow, i: usize) -> Result<Vec<u8>, StorageError> {
    let hash: Vec<u8> = row.try_get(i).map_err(|e| StorageError::backend("content_hash", e))?;
    if hash.len() != 32 {
        return Err(StorageError::Corruption {
            id: text(row, 0, "id")?,
            expected: "a 32-byte content hash".into(),
            actual: format!("{} bytes", hash.len()),
        });
    }
    Ok(hash)
}

pub(super) fn item_from_row(row: &AnyRow) -> Result<SyncItem, StorageError> {
    let content: Vec<u8> = row.try_get(5).map_err(|e| StorageError::backend("content", e))?;
    let hash = stored_hash(row, 6)?;
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

pub(super) fn meta_from_row(row: &AnyRow) -> Result<EntryMeta, StorageError> {
    let hash = stored_hash(row, 4)?;
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

/// `{select} FROM sync_items WHERE id IN (<ids>)`, with the ids bound.
pub(super) fn ids_query<'q>(
    select: &str,
    ids: &[&'q str],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
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
pub(super) fn padded_chunks<T>(items: &[T]) -> Vec<(&[T], usize)> {
    items
        .chunks(CHUNK_ROWS)
        .map(|c| (c, c.len().next_power_of_two()))
        .collect()
}

/// Splits items into statements under `CHUNK_BYTES` of content each.
pub(super) fn chunks<'a>(items: &'a [&'a SyncItem]) -> Vec<(&'a [&'a SyncItem], usize)> {
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
pub(super) fn padded<T>(chunk: &[T], size: usize) -> impl Iterator<Item = &T> {
    let last = chunk.last();
    chunk
        .iter()
        .chain(std::iter::repeat_n(last, size - chunk.len()).flatten())
}

impl L3Store {
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

    pub(super) async fn meta_in<'e, E>(&self, exec: E, ids: &[&str]) -> Result<HashMap<String, EntryMeta>, StorageError>
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
    /// `surely_absent(id)` says an id has no row (the trusted existence filter),
    /// so its stored version need not be read.
    pub async fn apply_batch(
        &self,
        items: &[SyncItem],
        surely_absent: impl Fn(&str) -> bool,
    ) -> Result<Applied, StorageError> {
        let mut tx = self.timed("begin", self.write_pool.begin()).await?;
        let mut existing = HashMap::new();
        let ids: Vec<&str> = items.iter().map(|i| i.object_id.as_str()).collect();
        let stored: Vec<&str> = ids.iter().copied().filter(|id| !surely_absent(id)).collect();
        for chunk in stored.chunks(CHUNK_ROWS) {
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
        let empty_hash = crate::engine::item::content_hash(&[]);
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
        self.note_committed(rows.iter().map(|r| r.content.len() as u64 + 128).sum());
        Ok(Applied {
            generation,
            written: applied,
        })
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
