//! The two SQL dialects and what differs between them: connection settings,
//! and the migrations that make and change the tables (`migrations/sqlite`,
//! `migrations/mysql`), applied at connect and recorded in sqlx's
//! `_sqlx_migrations` table, so the next schema change has a path.

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use std::borrow::Cow;
use std::time::Duration;

use super::{L3Store, int};
use crate::engine::error::StorageError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    MySql,
}

/// The schema's migrations for `dialect`, oldest first. Written out here
/// (not with `sqlx::migrate!`, which needs sqlx's proc macros) from the same
/// files the macro would read.
pub fn migrator(dialect: Dialect) -> Migrator {
    let files: &[(i64, &'static str, &'static str)] = match dialect {
        Dialect::Sqlite => &[
            (1, "items", include_str!("../../../migrations/sqlite/0001_items.sql")),
            (
                2,
                "media type",
                include_str!("../../../migrations/sqlite/0002_media_type.sql"),
            ),
        ],
        Dialect::MySql => &[
            (1, "items", include_str!("../../../migrations/mysql/0001_items.sql")),
            (
                2,
                "media type",
                include_str!("../../../migrations/mysql/0002_media_type.sql"),
            ),
        ],
    };
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sqlx::SqlStr::from_static(sql),
                    false,
                )
            })
            .collect(),
    )
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

impl L3Store {
    /// Applies the migrations this database lacks, then seeds the meta rows.
    /// A database from before migrations (sqlx's `_sqlx_migrations` is
    /// absent) goes through them like a new one: 0001 only creates what is
    /// missing.
    pub(super) async fn init_schema(&self) -> Result<(), StorageError> {
        let migrator = migrator(self.dialect);
        let migrate = async { migrator.run(&self.pool).await.map_err(migrate_error) };
        // Generous: DDL on a big MySQL table takes a while. A cancelled
        // MySQL migration can leave it dirty (see `migrate_error`).
        let limit = (self.timeout * 12).max(std::time::Duration::from_secs(60));
        match tokio::time::timeout(limit, migrate).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(StorageError::Connection(format!(
                    "migrate the L3 schema: timed out after {limit:?}"
                )));
            }
        }
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
}

/// A migration error, with what an operator can do about it.
fn migrate_error(e: sqlx::migrate::MigrateError) -> StorageError {
    use sqlx::migrate::MigrateError;
    StorageError::Backend(match e {
        MigrateError::Dirty(v) => format!(
            "L3 schema migration {v} stopped partway (MySQL cannot roll DDL back): finish or undo it by hand \
             (node/migrations/), then delete the row with version {v} from _sqlx_migrations"
        ),
        MigrateError::VersionMissing(v) => {
            format!("the L3 database was migrated by a newer release (migration {v}); run that release or a newer one")
        }
        MigrateError::VersionMismatch(v) => {
            format!("L3 schema migration {v} differs from the one this database recorded (was a migration edited?)")
        }
        other => format!("migrate the L3 schema: {other}"),
    })
}
