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
        // VACUUM INTO does not sync what it wrote.
        let size = std::fs::File::open(path)
            .and_then(|f| f.sync_all().and_then(|()| f.metadata()))
            .map_err(|e| StorageError::Backend(format!("backup {}: {e}", path.display())))?
            .len();
        tracing::info!(path = %path.display(), bytes = size, "backup written");
        Ok(size)
    }

    /// A backup as an open, already unlinked file in `data_dir` (same
    /// filesystem as the database, gone once closed), for streaming out.
    /// One at a time: each holds a read connection and a full copy on disk.
    pub async fn backup_file(&self) -> Result<(std::fs::File, u64), StorageError> {
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let Ok(_one) = ONE_AT_A_TIME.try_lock() else {
            return Err(StorageError::NotReady("a backup is already running".into()));
        };
        let b = self.core.backends()?;
        if b.l3.dialect() != Dialect::Sqlite {
            return Err(StorageError::InvalidInput(
                "L3 is MySQL/MariaDB: back it up with mariadb-dump --single-transaction (docs/operations.md)".into(),
            ));
        }
        let dir = self.config().data_dir;
        // Copies a killed node left behind (none can be running: see above).
        for stale in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = stale.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("backup-") && name.ends_with(".sqlite.tmp") {
                let _ = std::fs::remove_file(stale.path());
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = dir.join(format!("backup-{nanos}.sqlite.tmp"));
        self.force_flush().await;
        // The copy runs in a task of its own that removes the file once the
        // statement is over: a dropped request cannot leave it behind.
        let l3 = b.l3.clone();
        let task = tokio::spawn(async move {
            let made = l3.vacuum_into(&path).await;
            let opened = made.and_then(|()| {
                let file = std::fs::File::open(&path)
                    .map_err(|e| StorageError::Backend(format!("backup {}: {e}", path.display())))?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                Ok((file, size))
            });
            let _ = std::fs::remove_file(&path);
            opened
        });
        let (file, size) = task
            .await
            .map_err(|e| StorageError::Backend(format!("backup task: {e}")))??;
        tracing::info!(bytes = size, "backup copy made");
        Ok((file, size))
    }
}
