//! Test backends: every engine test runs on embedded SQLite and on the
//! MariaDB that `scripts/test` starts (`MYSQL_URL`).

#![allow(dead_code)]

use sqlx::Connection;
use std::sync::atomic::{AtomicU32, Ordering};
use syncnode::{SyncEngine, SyncEngineConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MariaDb,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::MariaDb];

pub fn mysql_url() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| {
        panic!("MYSQL_URL is not set: run the tests through ./scripts/test, which starts MariaDB and exports it")
    })
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| {
        panic!("REDIS_URL is not set: run the tests through ./scripts/test, which starts Redis with RediSearch and exports it")
    })
}

/// A raw Redis connection for looking behind the engine's back.
pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("cannot reach Redis at REDIS_URL ({e}); run ./scripts/test"))
}

/// An item's Redis value as the engine stores it: (packed metadata, content).
pub async fn redis_item(r: &mut redis::aio::MultiplexedConnection, key: &str) -> (String, Vec<u8>) {
    let v: Vec<u8> = redis::AsyncCommands::get(r, key).await.unwrap();
    let nul = v
        .iter()
        .position(|&b| b == 0)
        .unwrap_or_else(|| panic!("{key}: no NUL in {v:?}"));
    (String::from_utf8(v[..nul].to_vec()).unwrap(), v[nul + 1..].to_vec())
}

/// Writes an item's Redis value in the engine's layout (keeping its expiry).
pub async fn set_redis_item(r: &mut redis::aio::MultiplexedConnection, key: &str, meta: &str, content: &[u8]) {
    let mut v = meta.as_bytes().to_vec();
    v.push(0);
    v.extend_from_slice(content);
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(v)
        .arg("KEEPTTL")
        .query_async(r)
        .await
        .unwrap();
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty MariaDB database; returns its URL.
pub async fn fresh_mysql_db() -> String {
    let base = mysql_url();
    let name = format!("t_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let mut conn = sqlx::mysql::MySqlConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot reach MariaDB at MYSQL_URL ({e}); run ./scripts/test"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"
    )))
    .execute(&mut conn)
    .await
    .expect("create database");
    let (prefix, _) = base.rsplit_once('/').expect("MYSQL_URL ends in /database");
    format!("{prefix}/{name}")
}

/// A test node: its data dir and config on the chosen backend.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub config: SyncEngineConfig,
}

impl TestNode {
    /// A node with Redis as L2, under a key prefix of its own.
    pub async fn with_redis(backend: Backend, node_id: &str) -> Self {
        let mut n = Self::new(backend, node_id).await;
        n.config.redis_url = Some(redis_url());
        n.config.redis_prefix = Some(format!(
            "t{}_{}_{}:",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed),
            node_id
        ));
        n
    }

    pub fn redis_prefix(&self) -> String {
        self.config.redis_prefix.clone().unwrap_or_default()
    }

    pub async fn new(backend: Backend, node_id: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = SyncEngineConfig::for_dir(dir.path(), node_id);
        config.sql_timeout_ms = 3000;
        if backend == Backend::MariaDb {
            config.sql_url = Some(fresh_mysql_db().await);
        }
        Self { dir, config }
    }

    pub async fn start(&self) -> SyncEngine {
        let e = SyncEngine::with_config(self.config.clone());
        e.start().await.expect("engine starts");
        e
    }

    /// Runs a statement directly against this node's L3 (to corrupt rows etc.).
    pub async fn l3_exec(&self, sql: &str, arg: &[u8]) {
        let url = self.config.effective_sql_url();
        if url.starts_with("mysql:") {
            let mut c = sqlx::mysql::MySqlConnection::connect(&url).await.expect("connect");
            sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .bind(arg)
                .execute(&mut c)
                .await
                .expect("exec");
        } else {
            let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.expect("connect");
            sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .bind(arg)
                .execute(&mut c)
                .await
                .expect("exec");
        }
    }
}

impl TestNode {
    /// Runs DDL (a trigger, …) on this node's L3, over the text protocol.
    pub async fn l3_ddl(&self, sql: &str) {
        let url = self.config.effective_sql_url();
        if url.starts_with("mysql:") {
            let mut c = sqlx::mysql::MySqlConnection::connect(&url).await.expect("connect");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&mut c)
                .await
                .expect("ddl");
        } else {
            let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.expect("connect");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&mut c)
                .await
                .expect("ddl");
        }
    }
}
