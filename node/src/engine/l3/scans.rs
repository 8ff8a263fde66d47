//! Scans: items by id prefix and by state, entry metadata in id order and
//! under a Merkle path (hash range), and the SQL search tier's query.
//! Prefixes become index ranges (`prefix_upper_bound`), never `LIKE`.

use sqlx::AssertSqlSafe;

use super::items::{CHUNK_ROWS, COLUMNS, META_COLUMNS, item_from_row, meta_from_row, stored_hash};
use super::{L3Store, int, text};
use crate::engine::entry::EntryMeta;
use crate::engine::error::StorageError;
use crate::engine::item::SyncItem;

/// An entry as a rebuild needs it (see `scan_digests`).
pub struct DigestRow {
    pub id: String,
    pub digest: syncnode_protocol::EntryDigest,
    /// Mirrored in Redis (`L2Route::Mirror`).
    pub l2: bool,
}

/// A bound SQL argument (the search tier's conditions use them).
#[derive(Debug, Clone, PartialEq)]
pub enum SqlArg {
    Text(String),
    Num(f64),
}

/// Which rows a query over items returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    Live,
    WithTombstones,
}

impl Rows {
    pub(super) fn clause(self) -> &'static str {
        match self {
            Rows::Live => " AND tombstone = 0",
            Rows::WithTombstones => "",
        }
    }
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
    let hide = crate::engine::item::hides_reserved(prefix);
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
        let reserved = crate::engine::item::RESERVED.as_bytes();
        q = q
            .bind(reserved)
            .bind(prefix_upper_bound(reserved).expect("the reserved prefix has an upper bound"));
    }
    q
}

impl L3Store {
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

    /// Ids that cut the table into `parts` runs of about equal length, in
    /// order (fewer when the table is small), for scans side by side.
    pub async fn id_split_points(&self, parts: usize) -> Result<Vec<String>, StorageError> {
        let count = self
            .timed(
                "count items",
                sqlx::query("SELECT COUNT(*) FROM sync_items").fetch_one(&self.pool),
            )
            .await?;
        let count = int(&count, 0, "count")? as usize;
        let mut points = Vec::new();
        for k in 1..parts {
            let offset = count * k / parts;
            if offset == 0 {
                continue;
            }
            let row = self
                .timed(
                    "split point",
                    sqlx::query("SELECT id FROM sync_items ORDER BY id LIMIT 1 OFFSET ?")
                        .bind(offset as i64)
                        .fetch_optional(&self.pool),
                )
                .await?;
            if let Some(row) = row {
                points.push(text(&row, 0, "id")?);
            }
        }
        points.dedup();
        Ok(points)
    }

    /// Every entry's digest in id order after `after` and up to `through`
    /// (at most `limit`), for a rebuild of the tree and filter: only the
    /// columns the digest needs, hashed from the stored bytes (no hex, no state).
    pub async fn scan_digests(
        &self,
        after: Option<&str>,
        through: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DigestRow>, StorageError> {
        let sql = format!(
            "SELECT id, version, origin, tombstone, content_hash, l2 FROM sync_items WHERE {} AND {} \
             ORDER BY id LIMIT ?",
            if after.is_some() { "id > ?" } else { "1 = 1" },
            if through.is_some() { "id <= ?" } else { "1 = 1" },
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for bound in [after, through].into_iter().flatten() {
            q = q.bind(bound.as_bytes());
        }
        let rows = self
            .timed("scan digests", q.bind(limit as i64).fetch_all(&self.pool))
            .await?;
        rows.iter()
            .map(|row| {
                let id = text(row, 0, "id")?;
                let origin = text(row, 2, "origin")?;
                let hash: [u8; 32] = stored_hash(row, 4)?.try_into().expect("stored_hash checks 32 bytes");
                let digest = syncnode_protocol::EntryDigest::new(
                    &id,
                    int(row, 1, "version")? as u64,
                    &origin,
                    int(row, 3, "tombstone")? != 0,
                    &hash,
                );
                Ok(DigestRow {
                    id,
                    digest,
                    l2: int(row, 5, "l2")? != 0,
                })
            })
            .collect()
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

    /// Entry versions whose tree keys start with each of `keys` (8 bytes
    /// each), one list per key: found by the indexed first 4 (`hkey`), then
    /// checked whole.
    pub async fn entries_with_keys(&self, keys: &[[u8; 8]]) -> Result<Vec<Vec<EntryMeta>>, StorageError> {
        let mut slots: std::collections::HashMap<[u8; 8], Vec<usize>> = std::collections::HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            slots.entry(*k).or_default().push(i);
        }
        let hkeys: std::collections::BTreeSet<i64> = keys
            .iter()
            .map(|k| u32::from_be_bytes(k[..4].try_into().expect("4 bytes")) as i64)
            .collect();
        let hkeys: Vec<i64> = hkeys.into_iter().collect();
        let mut out = vec![Vec::new(); keys.len()];
        for chunk in hkeys.chunks(CHUNK_ROWS) {
            let sql = format!(
                "{META_COLUMNS} FROM sync_items WHERE hkey IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let q = chunk.iter().fold(sqlx::query(AssertSqlSafe(sql)), |q, h| q.bind(*h));
            let rows = self.timed("entries by tree key", q.fetch_all(&self.pool)).await?;
            for r in &rows {
                let meta = meta_from_row(r)?;
                let key = syncnode_protocol::merkle::key_of(&meta.id);
                let key8: [u8; 8] = key[..8].try_into().expect("8 bytes");
                for &i in slots.get(&key8).into_iter().flatten() {
                    out[i].push(meta.clone());
                }
            }
        }
        Ok(out)
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
        args: &[SqlArg],
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let tail = format!(" AND tombstone = 0 AND content_type = 1 AND ({cond}) ORDER BY id LIMIT ?");
        let mut q = page_query("SELECT id", prefix, after, &tail);
        for a in args {
            q = match a {
                SqlArg::Text(t) => q.bind(t.clone()),
                SqlArg::Num(n) => q.bind(*n),
            };
        }
        let rows = self.timed("search", q.bind(limit as i64).fetch_all(&self.pool)).await?;
        rows.iter().map(|r| text(r, 0, "id")).collect()
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
}
