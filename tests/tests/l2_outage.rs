//! Redis outage: stopping the Redis server mid-load fails no write and no read
//! that L3 can serve; `health_check` shows `redis_connected = false`; when Redis
//! returns (empty: the throwaway server keeps nothing), the node reconnects and
//! brings it up to date from L3. Only test in this binary: it stops the shared
//! Redis of `scripts/test`.

mod common;

use common::{Backend, TestNode, redis_conn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use syncnode::{Query, SearchIndex, SearchTier, SyncEngine, SyncItem};
use syncnode_tests::services::{start_redis, stop_redis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_nothing_and_heals() {
    let node = TestNode::with_redis(Backend::Sqlite, "a").await;
    let p = node.redis_prefix();
    // Items the serving engine will have only in Redis and L3, not in L1.
    let seed = SyncEngine::with_config(node.config.clone());
    seed.start().await.unwrap();
    seed.create_search_index(SearchIndex::new("docs", "load.").numeric("n"))
        .await
        .unwrap();
    let old: Vec<SyncItem> = (0..50)
        .map(|i| SyncItem::new(format!("old.{i}"), format!("o{i}").into_bytes()))
        .collect();
    seed.submit_many(old).await.unwrap();
    seed.shutdown().await;
    let engine = Arc::new(SyncEngine::with_config(node.config.clone()));
    engine.start().await.unwrap();
    let l3_reads = engine.metrics().reads_l3.load(Ordering::Relaxed);

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let item = SyncItem::from_json(format!("load.{n:05}"), serde_json::json!({"n": n}));
                engine
                    .submit(item)
                    .await
                    .unwrap_or_else(|e| panic!("write {n} failed during the Redis outage: {e}"));
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(stop_redis).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;

    let h = engine.health_check().await;
    assert_eq!(h.redis_connected, Some(false), "{h:?}");
    assert!(!h.healthy);
    // Reads L3 can serve still succeed, from L3.
    for i in 0..50 {
        let got = engine.get(&format!("old.{i}")).await.unwrap().unwrap();
        assert_eq!(&got.content[..], format!("o{i}").as_bytes());
    }
    assert_eq!(engine.metrics().reads_l3.load(Ordering::Relaxed), l3_reads + 50);
    // Search falls back to SQL.
    let r = engine
        .search_with_options(
            "docs",
            &Query::numeric_range("n", Some(0.0), Some(5.0)),
            SearchTier::RedisWithSqlFallback,
            100,
        )
        .await
        .unwrap();
    assert_eq!(r.ids.len(), 6);

    tokio::task::spawn_blocking(start_redis).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = load.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while !(engine.is_merkle_synced().await.unwrap() && engine.health_check().await.redis_connected == Some(true)) {
        assert!(
            Instant::now() < deadline,
            "Redis was not brought up to date: {:?}",
            engine.merkle_roots().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give the reconnect resync a moment to finish if it raced the check above.
    engine.force_flush().await;
    let mut r = redis_conn().await;
    for n in [0, written / 2, written - 1] {
        let (_, c) = common::redis_item(&mut r, &format!("{p}item:load.{n:05}")).await;
        assert_eq!(
            c,
            serde_json::to_vec(&serde_json::json!({"n": n})).unwrap(),
            "load.{n:05} back in Redis"
        );
    }
    let (_, c) = common::redis_item(&mut r, &format!("{p}item:old.7")).await;
    assert_eq!(c, b"o7");
    // The index was re-created and refilled: the hot tier answers again.
    let hot = engine
        .search_with_options(
            "docs",
            &Query::numeric_range("n", Some(0.0), Some(5.0)),
            SearchTier::RedisOnly,
            100,
        )
        .await
        .unwrap();
    assert_eq!(hot.ids.len(), 6);
    assert!(engine.health_check().await.healthy);
    eprintln!("{written} writes during a Redis outage, none failed; Redis resynced");
    engine.shutdown().await;
}
