//! Engine benchmarks (`cargo bench -p syncnode --bench engine`). Prints one
//! `bench=engine metric=<m> value=<v> unit=<u>` line per figure; durable write
//! throughput also prints a same-run baseline (plain sqlx batched INSERTs of the
//! same rows into the same table with the same pragmas) and the ratio, and
//! HTTP PUTs through a `syncnode` process (`wrk`, 64 connections) are set
//! against the engine's own figure.
//!
//! `BENCH_ITEMS` (default 100000) sets the write sizes, `BENCH_MERKLE_ITEMS`
//! (default 1000000) the size of the Merkle rebuild.

mod support;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;
use syncnode::engine::l3::{Dialect, SQLITE_PRAGMAS, migrator, upsert_sql};
use syncnode::{SyncEngine, SyncEngineConfig, SyncItem};

const PAYLOAD: usize = 1024;

fn line(metric: &str, value: f64, unit: &str) {
    println!("bench=engine metric={metric} value={value:.1} unit={unit}");
}

fn items(prefix: &str, n: usize) -> Vec<SyncItem> {
    (0..n)
        .map(|i| {
            let mut content = vec![0u8; PAYLOAD];
            content[..8].copy_from_slice(&(i as u64).to_le_bytes());
            SyncItem::new(format!("{prefix}.{i:09}"), content)
        })
        .collect()
}

fn engine_in(dir: &std::path::Path) -> SyncEngine {
    let mut cfg = SyncEngineConfig::for_dir(dir, "bench");
    cfg.l1_max_bytes = 1 << 30;
    SyncEngine::with_config(cfg)
}

/// Plain sqlx: the same rows, the same table and pragmas, batches of 1000 rows
/// per transaction, 500 rows per INSERT.
async fn baseline(dir: &std::path::Path, name: &str, rows: &[SyncItem], per_txn: usize) -> f64 {
    let mut opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", dir.join(name).display()))
        .unwrap()
        .create_if_missing(true);
    for p in SQLITE_PRAGMAS {
        let (k, v) = p.trim_start_matches("PRAGMA ").split_once(" = ").unwrap();
        opts = opts.pragma(k.to_string(), v.to_string());
    }
    let opts = opts.disable_statement_logging();
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .unwrap();
    migrator(Dialect::Sqlite).run(&pool).await.unwrap();
    let start = Instant::now();
    for batch in rows.chunks(per_txn) {
        let mut tx = pool.begin().await.unwrap();
        for chunk in batch.chunks(500) {
            let mut q = sqlx::query(AssertSqlSafe(upsert_sql(Dialect::Sqlite, chunk.len())));
            for it in chunk {
                q = q
                    .bind(it.object_id.as_bytes())
                    .bind(1i64)
                    .bind(&b"bench"[..])
                    .bind(it.updated_at)
                    .bind(0i64)
                    .bind(&it.content[..])
                    .bind(hex::decode(&it.content_hash).unwrap())
                    .bind(it.state.as_bytes())
                    .bind(0i64)
                    .bind(0i64)
                    .bind(0i64)
                    .bind(None::<Vec<u8>>)
                    .bind(syncnode::engine::l3::hkey(&it.object_id))
                    .bind(1i64) // l2: mirrored in Redis (the engine's default route)
                    .bind(None::<Vec<u8>>); // media_type
            }
            q.execute(&mut *tx).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let rate = rows.len() as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    rate
}

/// HTTP PUTs of the same 1 KiB items from 64 keep-alive connections, driven
/// by `wrk`, against one `syncnode` process with a SQLite L3; every PUT is
/// acknowledged once durable, like `submit`. The baseline is the engine's own
/// figure for 64 callers from this run.
fn http_puts(engine_rate: f64) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    /// Stops the node however the bench ends.
    struct Node(std::process::Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let _ = self.0.wait();
        }
    }
    let _node = Node(
        Command::new(env!("CARGO_BIN_EXE_syncnode"))
            .args(["run", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--http",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start syncnode"),
    );
    let url = format!("http://127.0.0.1:{port}");
    let ready = (0..300).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &format!("{url}/readyz")])
            .status()
            .expect("curl is needed: install it or run ./scripts/test once")
            .success()
    });
    assert!(
        ready,
        "syncnode not ready; see {}",
        dir.path().join("node.log").display()
    );
    let script = dir.path().join("put.lua");
    std::fs::write(
        &script,
        format!(
            "local n = 0\nlocal body = string.rep(\"x\", {PAYLOAD})\n\
             request = function()\n  n = n + 1\n  return wrk.format(\"PUT\", \"/v1/items/h.\" .. n, \
             {{[\"Content-Type\"] = \"application/octet-stream\"}}, body)\nend\n"
        ),
    )
    .unwrap();
    // One wrk thread: the machine has two cores, and the node needs them.
    let out = Command::new("wrk")
        .args(["-t1", "-c64", "-d10s", "-s"])
        .arg(&script)
        .arg(&url)
        .output()
        .expect("wrk is needed: apt-get install wrk, or run ./scripts/test once");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    assert!(!text.contains("Non-2xx"), "some PUTs failed: {text}");
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output: {text}"));
    println!(
        "bench=engine metric=http_put_64_connections_durable value={rps:.0} unit=items/s baseline={engine_rate:.0} ratio={:.2}",
        rps / engine_rate
    );
}

async fn durable_writes(n: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path(), "baseline.sqlite", &items("b", n), 1000).await;

    let e = engine_in(dir.path());
    e.start().await.unwrap();
    let all = items("m", n);
    let start = Instant::now();
    for batch in all.chunks(1000) {
        let r = e.submit_many(batch.to_vec()).await.unwrap();
        assert_eq!(r.failed, 0);
    }
    let many = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "bench=engine metric=submit_many_durable value={many:.0} unit=items/s baseline={base:.0} ratio={:.2}",
        many / base
    );

    let e = Arc::new(e);
    let callers = 64;
    let per = n / callers;
    let work: Vec<Vec<SyncItem>> = (0..callers).map(|c| items(&format!("c{c}"), per)).collect();
    // The baselines for the callers take the same rows in the order a group
    // commit sees them (one from each caller in turn): 64 callers write into
    // 64 places of the id index, which costs SQLite more pages per commit than
    // the sequential ids of `base`.
    let arrival: Vec<SyncItem> = (0..per).flat_map(|i| work.iter().map(move |w| w[i].clone())).collect();
    let base_same = baseline(dir.path(), "baseline_callers.sqlite", &arrival, 1000).await;
    let base_small = baseline(dir.path(), "baseline_callers_small.sqlite", &arrival, 64).await;
    let commits_before = e.metrics().group_commits.load(std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mine in work {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            for it in mine {
                e.submit(it).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let conc = (per * callers) as f64 / start.elapsed().as_secs_f64();
    println!(
        "bench=engine metric=submit_64_callers_durable value={conc:.0} unit=items/s baseline={base_same:.0} ratio={:.2}",
        conc / base_same
    );
    // Against the sequential rows of `base` (the baseline before the same rows were used).
    println!(
        "bench=engine metric=submit_64_callers_vs_sequential_ids value={conc:.0} unit=items/s baseline={base:.0} ratio={:.2}",
        conc / base
    );
    // The same rows with 64 rows per transaction: what 64 waiting callers can
    // give a group commit at best.
    println!(
        "bench=engine metric=submit_64_callers_vs_64_row_txns value={conc:.0} unit=items/s baseline={base_small:.0} ratio={:.2}",
        conc / base_small
    );
    let commits = e.metrics().group_commits.load(std::sync::atomic::Ordering::Relaxed) - commits_before;
    line(
        "submit_64_callers_items_per_commit",
        (per * callers) as f64 / commits.max(1) as f64,
        "items",
    );

    // L1 hits: 2 tasks on 2 worker threads over ids already in L1.
    let ids: Arc<Vec<String>> = Arc::new(all.iter().take(10_000).map(|i| i.object_id.clone()).collect());
    for id in ids.iter() {
        e.get(id).await.unwrap().unwrap();
    }
    let rounds = 1_000_000;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..2 {
        let (e, ids) = (e.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for k in 0..rounds {
                let id = &ids[(k * 7 + t) % ids.len()];
                std::hint::black_box(e.get(id).await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    line(
        "l1_get_hits_2_threads",
        (2 * rounds) as f64 / start.elapsed().as_secs_f64(),
        "ops/s",
    );
    e.shutdown().await;

    // Cold gets: a fresh engine (empty L1), random ids, 2 tasks.
    let e = Arc::new(engine_in(dir.path()));
    e.start().await.unwrap();
    let cold = 20_000;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..2u64 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
            for _ in 0..cold / 2 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = format!("m.{:09}", x % n as u64);
                std::hint::black_box(e.get(&id).await.unwrap().expect("stored"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    line("l3_cold_get", cold as f64 / start.elapsed().as_secs_f64(), "ops/s");
    e.shutdown().await;
    conc
}

async fn merkle_rebuild(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_in(dir.path());
    e.start().await.unwrap();
    let start = Instant::now();
    for base in (0..n).step_by(10_000) {
        let batch: Vec<SyncItem> = (base..(base + 10_000).min(n))
            .map(|i| {
                let mut content = vec![0u8; PAYLOAD];
                content[..8].copy_from_slice(&(i as u64).to_le_bytes());
                SyncItem::new(format!("r.{i:09}"), content)
            })
            .collect();
        e.submit_many(batch).await.unwrap();
    }
    let load = start.elapsed().as_secs_f64();
    line("load_for_rebuild", n as f64 / load, "items/s");
    let root = e.get_merkle_root().await.unwrap();
    let took = e.rebuild_merkle().await.unwrap();
    assert_eq!(
        e.get_merkle_root().await.unwrap(),
        root,
        "rebuild gives the incremental root"
    );
    println!(
        "bench=engine metric=merkle_rebuild_{n} value={:.2} unit=s",
        took.as_secs_f64()
    );
    line("merkle_tree_memory", e.merkle_memory_bytes() as f64 / 1024.0, "KiB");
    let (entries, _, _) = e.l3_filter_stats();
    line(
        "filter_memory",
        e.l3_filter().memory_usage_bytes() as f64 / 1024.0,
        "KiB",
    );
    line("filter_entries", entries as f64, "ids");
    e.shutdown().await;
}

fn main() {
    let rt = support::runtime();
    rt.block_on(async {
        let engine_rate = durable_writes(support::env_usize("BENCH_ITEMS", 100_000)).await;
        tokio::task::block_in_place(|| http_puts(engine_rate));
        merkle_rebuild(support::env_usize("BENCH_MERKLE_ITEMS", 1_000_000)).await;
    });
}
