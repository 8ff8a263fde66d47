//! The purge ledger (DESIGN §6): tombstones old enough to purge, the purge
//! itself with a ledger row per purged delete, and the lookups that keep a
//! purged delete winning over the versions it beat.

use sqlx::AssertSqlSafe;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::items::{CHUNK_ROWS, META_COLUMNS, meta_from_row};
use super::{Dialect, L3Store, int, text};
use crate::engine::entry::EntryMeta;
use crate::engine::error::StorageError;

impl L3Store {
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
        let now = crate::engine::item::now_ms();
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

    pub(super) async fn purged_in<'e, E>(
        &self,
        exec: E,
        ids: &[&str],
    ) -> Result<HashMap<String, (u64, String)>, StorageError>
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
}
