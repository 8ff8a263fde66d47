//! `syncnode demo`: the engine on embedded SQLite in a temporary directory.
//! Writes, overwrites and deletes, then a restart, showing that the data, the
//! tombstones and the Merkle root come back as they were.

use std::time::Instant;

use crate::engine::{SyncEngine, SyncEngineConfig, SyncItem};

fn short(root: Option<[u8; 32]>) -> String {
    root.map_or_else(|| "(empty)".into(), |r| hex::encode(&r[..8]))
}

pub async fn run(items: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = SyncEngineConfig::for_dir(dir.path(), "demo-node");
    println!("syncnode demo: engine on embedded SQLite in {}", dir.path().display());

    let engine = SyncEngine::with_config(config.clone());
    engine.start().await?;

    let t = Instant::now();
    let batch: Vec<SyncItem> = (0..items)
        .map(|i| {
            SyncItem::from_json(
                format!("user.{i}"),
                serde_json::json!({"name": format!("user {i}"), "age": i % 90}),
            )
        })
        .collect();
    let r = engine.submit_many(batch).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "wrote    {} items durably in {:.2} s ({:.0} items/s)  root {}",
        r.succeeded,
        secs,
        r.succeeded as f64 / secs,
        short(engine.get_merkle_root().await?)
    );

    let over = items / 10;
    for i in 0..over {
        engine
            .submit(SyncItem::from_json(
                format!("user.{i}"),
                serde_json::json!({"name": "renamed", "age": 1}),
            ))
            .await?;
    }
    println!(
        "overwrote {over} items                               root {}",
        short(engine.get_merkle_root().await?)
    );

    let del: Vec<String> = (over..over * 2).map(|i| format!("user.{i}")).collect();
    let refs: Vec<&str> = del.iter().map(String::as_str).collect();
    let d = engine.delete_many(&refs).await?;
    let root_before = engine.get_merkle_root().await?;
    println!(
        "deleted  {} items (tombstones kept)                 root {}",
        d.succeeded,
        short(root_before)
    );
    let (_, count, depth) = engine.merkle_summary();
    println!(
        "live items {}, tree entries {count} (depth {depth}), tree memory {} KiB",
        engine.count_prefix("user.").await?,
        engine.merkle_memory_bytes() / 1024
    );
    engine.shutdown().await;

    let t = Instant::now();
    let engine = SyncEngine::with_config(config);
    engine.start().await?;
    let root_after = engine.get_merkle_root().await?;
    println!(
        "restarted in {:.0} ms                                root {} ({})",
        t.elapsed().as_secs_f64() * 1000.0,
        short(root_after),
        if root_after == root_before { "same" } else { "DIFFERENT" }
    );
    let renamed = engine.get("user.0").await?.and_then(|i| i.content_as_json());
    let deleted = engine.get(&format!("user.{over}")).await?;
    println!(
        "user.0 = {}, user.{over} = {:?}, status {:?}",
        renamed.unwrap_or_default(),
        deleted,
        engine.status(&format!("user.{over}")).await?
    );
    let h = engine.health_check().await;
    println!(
        "health: state {:?}, healthy {}, filter {:?} ({} ids)",
        h.state, h.healthy, h.filter_trust, h.filter_items
    );
    engine.shutdown().await;
    anyhow::ensure!(root_after == root_before, "the Merkle root changed across a restart");
    Ok(())
}
