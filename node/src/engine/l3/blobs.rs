//! Named blobs in `syncnode_meta`: the Merkle tree and filter snapshots
//! (tagged with the generation they describe) and index definitions.

use super::{Dialect, L3Store, int, prefix_upper_bound, text};
use crate::engine::error::StorageError;
use sqlx::Row;

impl L3Store {
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
}
