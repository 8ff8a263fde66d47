//! Online backup of an embedded SQLite L3, for `GET /v1/backup` and
//! `syncnode backup`: `VACUUM INTO` copies the database as one read
//! transaction sees it, so the copy is consistent while writes go on, and
//! every write acknowledged before the call is in it (with SQLite the
//! commit is the L3 transaction; queued writes are flushed first). A MySQL
//! L3 is backed up with the server's own tools (`mariadb-dump`).

use std::path::Path;

use super::l3::Dialect;
use super::{StorageError, SyncEngine};

impl SyncEngine {
    /// Writes a consistent copy of the SQLite L3 to `path` (which must not
    /// exist); returns its size in bytes.
    pub async fn backup_to(&self, path: &Path) -> Result<u64, StorageError> {
        let b = self.core.backends()?;
        if b.l3.dialect() != Dialect::Sqlite {
            return Err(StorageError::InvalidInput(
                "L3 is MySQL/MariaDB: back it up with mariadb-dump --single-transaction (docs/operations.md)".into(),
            ));
        }
        if path.exists() {
            return Err(StorageError::InvalidInput(format!(
                "backup target {} exists",
                path.display()
            )));
        }
        self.force_flush().await;
        b.l3.vacuum_into(path).await?;
        let size = std::fs::metadata(path)
            .map_err(|e| StorageError::Backend(format!("backup {}: {e}", path.display())))?
            .len();
        tracing::info!(path = %path.display(), bytes = size, "backup written");
        Ok(size)
    }

    /// A backup as an open, already unlinked file in `data_dir` (same
    /// filesystem as the database, gone once closed), for streaming out.
    pub async fn backup_file(&self) -> Result<(std::fs::File, u64), StorageError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = self.config().data_dir.join(format!("backup-{nanos}.sqlite.tmp"));
        // Removed however this ends, a dropped request included.
        struct Remove<'a>(&'a Path);
        impl Drop for Remove<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        let _remove = Remove(&path);
        let size = self.backup_to(&path).await?;
        let file =
            std::fs::File::open(&path).map_err(|e| StorageError::Backend(format!("backup {}: {e}", path.display())))?;
        Ok((file, size))
    }
}
