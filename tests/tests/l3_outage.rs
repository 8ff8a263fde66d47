//! L3 outage with MariaDB: stopping the server mid-load fails no write. Writes
//! go to the commit log and drain, in order, when the server returns. While it
//! is down, `health_check` says so, items in L1 or the log are readable, and
//! other reads fail with a typed error instead of hanging.
//!
//! Stops and restarts the throwaway MariaDB of `scripts/test` (the only test in
//! this binary, so nothing else uses the server meanwhile).

mod common;

use common::{Backend, TestNode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use syncnode::{StorageError, SyncEngine, SyncItem};
use syncnode_tests::services::{start_mysql, stop_mysql};

async fn wait_until(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn item(prefix: &str, i: usize) -> SyncItem {
    SyncItem::new(format!("{prefix}.{i:06}"), format!("{prefix}-{i}").into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_outage_fails_no_write_and_drains_in_order() {
    let node = TestNode::new(Backend::MariaDb, "n1").await;
    let mut config = node.config.clone();
    config.sql_timeout_ms = 2000;
    config.commit_log_max_items = 2000;

    // Items that will be in L3 only (a fresh engine has an empty L1).
    let seed = SyncEngine::with_config(config.clone());
    seed.start().await.unwrap();
    seed.submit_many((0..100).map(|i| item("old", i)).collect())
        .await
        .unwrap();
    seed.shutdown().await;

    let engine = Arc::new(SyncEngine::with_config(config.clone()));
    engine.start().await.unwrap();

    // A steady load from a second task, before, during and after the outage.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = engine.submit(item("load", i)).await;
                assert!(r.is_ok(), "write {i} failed during the outage: {r:?}");
                // A hot key rewritten over and over: the drain must leave the last value.
                engine
                    .submit(SyncItem::new("hot", format!("{i}").into_bytes()))
                    .await
                    .expect("hot write");
                acked.push(i);
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(stop_mysql).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let h = engine.health_check().await;
    assert_eq!(h.sql_connected, Some(false), "health shows L3 down: {h:?}");
    assert!(!h.healthy);
    assert!(
        h.wal_pending_items.unwrap() > 0,
        "writes are buffered in the commit log"
    );

    // Readable: what is in L1/the log. Typed error, not a hang: what is only in L3.
    let latest = engine.get("hot").await.expect("hot key is in L1");
    assert!(latest.is_some());
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), engine.get("old.000007"))
        .await
        .expect("no hang");
    assert!(
        matches!(r, Err(StorageError::Connection(_) | StorageError::Backend(_))),
        "got {r:?}"
    );
    eprintln!("L3-only read failed after {:?}: {r:?}", t.elapsed());
    // A delete is a write: it goes to the log even when L3 cannot say what
    // it replaces.
    let (existed, receipt) = engine
        .delete_receipt("old.000008")
        .await
        .expect("a delete while L3 is down");
    assert_eq!(existed, None, "L3 could not tell whether it existed");
    assert!(receipt.version > 0);

    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();

    // The log is bounded: past it, writes are refused with backpressure.
    let mut refused = None;
    for i in 0..5000 {
        if let Err(e) = engine.submit(item("fill", i)).await {
            refused = Some(e);
            break;
        }
    }
    assert!(
        matches!(refused, Some(StorageError::Backpressure { .. })),
        "a full commit log refuses writes: {refused:?}"
    );

    tokio::task::spawn_blocking(start_mysql).await.unwrap();
    wait_until("the commit log to drain", 60, async || {
        engine.tick().await;
        engine.health_check().await.wal_pending_items == Some(0)
    })
    .await;
    let h = engine.health_check().await;
    assert!(h.healthy && h.sql_connected == Some(true), "{h:?}");

    // Every acknowledged write is in L3, and the hot key holds its last value.
    assert_eq!(engine.count_prefix("load.").await.unwrap(), acked.len() as u64);
    let last = acked.last().copied().unwrap();
    engine.shutdown().await;
    let fresh = SyncEngine::with_config(config);
    fresh.start().await.unwrap();
    assert_eq!(
        &fresh.get("hot").await.unwrap().unwrap().content[..],
        format!("{last}").as_bytes()
    );
    for i in [0, acked.len() / 2, acked.len() - 1] {
        let it = fresh
            .get(&format!("load.{i:06}"))
            .await
            .unwrap()
            .expect("acked write in L3");
        assert_eq!(&it.content[..], format!("load-{i}").as_bytes());
    }
    assert!(fresh.get("old.000007").await.unwrap().is_some());
    assert!(
        fresh.get("old.000008").await.unwrap().is_none(),
        "the delete made while L3 was down holds"
    );
    eprintln!("{} writes acknowledged across the outage, all in L3", acked.len());
    fresh.shutdown().await;
}
