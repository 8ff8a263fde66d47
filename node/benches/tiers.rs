//! L2 and search benchmarks (`cargo bench -p syncnode --bench tiers`), against
//! the Redis at `REDIS_URL`, or a throwaway `redis-server` with the RediSearch
//! module started here when it is unset. Prints `bench=tiers ...` lines:
//! - L2 pipelined writes (cache-only batches of 1000) against a same-run
//!   baseline of raw Redis pipelines of SETs of the same items;
//! - L2 get hits (fresh engine, so L1 is empty) and the startup resync;
//! - search latency p50/p99 on the hot and the cold tier over 100k users.

mod support;

use redis::AsyncCommands;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use syncnode::engine::search::to_redisearch;
use syncnode::{CacheTtl, Query, SearchIndex, SubmitOptions, SyncEngine, SyncEngineConfig, SyncItem};

const PAYLOAD: usize = 1024;

struct Redis {
    url: String,
    child: Option<Child>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn redis() -> Redis {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Redis { url, child: None };
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--loadmodule", "/usr/lib/redis/modules/redisearch.so"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (with redis-redisearch) is needed: install them or run ./scripts/test once");
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..100 {
        if redis::Client::open(url.as_str()).unwrap().get_connection().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Redis {
        url,
        child: Some(child),
    }
}

fn items(prefix: &str, n: usize) -> Vec<SyncItem> {
    (0..n)
        .map(|i| {
            let mut content = vec![b'x'; PAYLOAD];
            content[..8].copy_from_slice(&(i as u64).to_le_bytes());
            SyncItem::new(format!("{prefix}.{i:09}"), content)
        })
        .collect()
}

fn engine(dir: &std::path::Path, url: &str, prefix: &str) -> SyncEngine {
    let mut cfg = SyncEngineConfig::for_dir(dir, "bench");
    cfg.redis_url = Some(url.to_string());
    cfg.redis_prefix = Some(prefix.to_string());
    cfg.l1_max_bytes = 1 << 30;
    SyncEngine::with_config(cfg)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn l2(url: &str, n: usize) {
    let all = items("w", n);
    // Baseline: raw pipelines of SETs of the same items.
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let start = Instant::now();
    for batch in all.chunks(1000) {
        let mut pipe = redis::pipe();
        for it in batch {
            pipe.set(format!("raw:{}", it.object_id), &it.content[..]).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    let base = n as f64 / start.elapsed().as_secs_f64();
    let _: () = redis::cmd("FLUSHDB").arg("ASYNC").query_async(&mut conn).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), url, "bw:");
    e.start().await.unwrap();
    let start = Instant::now();
    for batch in all.chunks(1000) {
        let r = e
            .submit_many_with(batch.to_vec(), SubmitOptions::cache(CacheTtl::Hour))
            .await
            .unwrap();
        assert_eq!(r.failed, 0);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "bench=tiers metric=l2_pipelined_write value={rate:.0} unit=items/s baseline={base:.0} ratio={:.2}",
        rate / base
    );

    // Durable writes go to L3 and Redis; a fresh engine then reads from Redis.
    let durable = items("d", n);
    for batch in durable.chunks(1000) {
        e.submit_many(batch.to_vec()).await.unwrap();
    }
    e.shutdown().await;
    let e = engine(dir.path(), url, "bw:");
    let start = Instant::now();
    e.start().await.unwrap();
    println!(
        "bench=tiers metric=start_with_redis_resync_{n} value={:.2} unit=s",
        start.elapsed().as_secs_f64()
    );
    // 16 concurrent readers, each id read once (so every read misses L1).
    let e = std::sync::Arc::new(e);
    let ids: Vec<String> = durable.iter().map(|i| i.object_id.clone()).collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for part in ids.chunks(n.div_ceil(16)) {
        let (e, part) = (e.clone(), part.to_vec());
        tasks.push(tokio::spawn(async move {
            for id in part {
                std::hint::black_box(e.get(&id).await.unwrap().unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let l2_reads = e.metrics().reads_l2.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(l2_reads as usize, n, "every read was an L2 hit");
    println!(
        "bench=tiers metric=l2_get_hits_16_readers value={:.0} unit=ops/s",
        n as f64 / secs
    );
    e.shutdown().await;
    let _: () = redis::cmd("FLUSHDB").arg("ASYNC").query_async(&mut conn).await.unwrap();
}

async fn search(url: &str, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), url, "bs:");
    e.start().await.unwrap();
    let index = SearchIndex::new("users", "user.")
        .text_sortable("name")
        .numeric_sortable("age")
        .tag("roles");
    e.create_search_index(index.clone()).await.unwrap();
    let first = [
        "ann", "bob", "carla", "dan", "eve", "john", "joan", "kim", "lena", "hugo",
    ];
    let last = ["smith", "smyth", "brown", "jones", "lee", "garcia", "nguyen", "ivanova"];
    let roles = ["admin", "dev", "ops", "sales", "support"];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let start = Instant::now();
    for base in (0..n).step_by(1000) {
        let batch: Vec<SyncItem> = (base..(base + 1000).min(n))
            .map(|i| {
                let r: Vec<&str> = roles.iter().copied().filter(|_| next() % 3 == 0).collect();
                SyncItem::from_json(
                    format!("user.{i:07}"),
                    serde_json::json!({
                        "name": format!("{} {}", first[next() as usize % first.len()], last[next() as usize % last.len()]),
                        "age": 18 + next() % 70,
                        "roles": r,
                    }),
                )
            })
            .collect();
        e.submit_many(batch).await.unwrap();
    }
    println!(
        "bench=tiers metric=load_indexed_users value={:.0} unit=items/s",
        n as f64 / start.elapsed().as_secs_f64()
    );
    let queries = [
        Query::field_eq("name", "ann smith"),
        Query::numeric_range("age", Some(30.0), Some(31.0)),
        Query::tags("roles", vec!["admin".into()]).and(Query::field_eq("age", 40i64)),
        Query::prefix("name", "jo").and(Query::numeric_range("age", Some(80.0), None)),
        Query::fuzzy("name", "smith")
            .and(Query::tags("roles", vec!["ops".into()]))
            .and(Query::field_eq("age", 20i64)),
        Query::text_search("name", "kim").and(Query::tags("roles", vec!["sales".into()]).negate()),
    ];
    let (mut hot, mut cold) = (Vec::new(), Vec::new());
    for round in 0..20 {
        for q in &queries {
            let raw = to_redisearch(q, &index).unwrap();
            let t = Instant::now();
            let h = e.search_raw("users", &raw, 100).await.unwrap();
            hot.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let c = e.search_sql("users", q, 100).await.unwrap();
            cold.push(t.elapsed().as_secs_f64() * 1000.0);
            if round == 0 {
                assert_eq!(h.len(), c.len(), "{q:?}");
            }
        }
    }
    hot.sort_by(f64::total_cmp);
    cold.sort_by(f64::total_cmp);
    for (tier, v) in [("hot", &hot), ("cold", &cold)] {
        println!(
            "bench=tiers metric=search_{tier}_p50_{n} value={:.2} unit=ms",
            percentile(v, 0.5)
        );
        println!(
            "bench=tiers metric=search_{tier}_p99_{n} value={:.2} unit=ms",
            percentile(v, 0.99)
        );
    }
    e.shutdown().await;
}

fn main() {
    let r = redis();
    let rt = support::runtime();
    rt.block_on(async {
        let mut c = redis::Client::open(r.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = c.set("bench:probe", 1).await.unwrap();
        l2(&r.url, support::env_usize("BENCH_ITEMS", 100_000)).await;
        search(&r.url, support::env_usize("BENCH_SEARCH_ITEMS", 100_000)).await;
    });
}
