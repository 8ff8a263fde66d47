//! `syncnode demo`: three nodes in one process over loopback TCP on embedded
//! SQLite: writes, a partition, writes on both sides (conflicting keys and
//! deletes included), the heal, and convergence shown live.
//! `syncnode demo --engine` walks through one engine instead: writes,
//! overwrites, deletes and a restart.

use std::time::Instant;

use crate::engine::{SyncEngine, SyncEngineConfig, SyncItem};

fn short(root: Option<[u8; 32]>) -> String {
    root.map_or_else(|| "(empty)".into(), |r| hex::encode(&r[..8]))
}

pub async fn run_engine(items: usize) -> anyhow::Result<()> {
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

use crate::replication::swarm::{NetworkConfig, NodeHandle, start};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

struct Node {
    _dir: tempfile::TempDir,
    engine: Arc<SyncEngine>,
    net: NodeHandle,
    /// The loop that hands local commits to the core as CDC.
    cdc: tokio::task::JoinHandle<()>,
}

async fn roots(nodes: &[Node]) -> anyhow::Result<Vec<Option<[u8; 32]>>> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(n.engine.get_merkle_root().await?);
    }
    Ok(out)
}

async fn counts(nodes: &[Node]) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(n.engine.count_prefix("").await?);
    }
    Ok(out)
}

/// Stops new sessions and waits (up to 2 s) for the running ones to end.
async fn quiesce(nodes: &[Node]) {
    for n in nodes {
        n.net.stop_anti_entropy().await;
    }
    for _ in 0..100 {
        if nodes
            .iter()
            .all(|n| n.net.peers.view().iter().all(|p| p.session.is_none()))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect(from: &Node, to: &Node) -> anyhow::Result<()> {
    let addr = to.net.dial_addr();
    from.net.dial(addr).await.map_err(|e| anyhow::anyhow!(e))
}

/// Per node, how many entries it lacks of `winners` (the newest version of
/// every id across the nodes when the wait began).
async fn lacking(nodes: &[Node], winners: &HashMap<String, u64>) -> anyhow::Result<u64> {
    let mut n = 0;
    for node in nodes {
        let held: HashMap<String, u64> = node
            .engine
            .merkle_entries("", usize::MAX >> 1)
            .await?
            .into_iter()
            .map(|e| (e.id, e.version))
            .collect();
        n += winners.iter().filter(|(id, v)| held.get(*id) < Some(*v)).count() as u64;
    }
    Ok(n)
}

/// Waits until every root is equal; returns the time taken. The bar counts
/// entries reconciled out of those the nodes lacked when it began, so it
/// only moves forward (drawn on a terminal only).
async fn converge(nodes: &[Node], label: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut winners: HashMap<String, u64> = HashMap::new();
    for node in nodes {
        for e in node.engine.merkle_entries("", usize::MAX >> 1).await? {
            let v = winners.entry(e.id).or_insert(e.version);
            *v = (*v).max(e.version);
        }
    }
    let to_reconcile = lacking(nodes, &winners).await?;
    let bar = indicatif::ProgressBar::with_draw_target(Some(to_reconcile), indicatif::ProgressDrawTarget::stdout());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} entries reconciled")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_string());
    loop {
        let left = lacking(nodes, &winners).await?;
        bar.set_position(bar.position().max(to_reconcile.saturating_sub(left)));
        let r = roots(nodes).await?;
        if r.windows(2).all(|w| w[0] == w[1]) {
            bar.finish_and_clear();
            println!(
                "{label}: {to_reconcile} entries reconciled; live items per node {:?}",
                counts(nodes).await?
            );
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "no convergence within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run_cluster(items: usize) -> anyhow::Result<()> {
    println!("syncnode demo: 3 nodes in one process, loopback TCP, embedded SQLite");
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let dir = tempfile::tempdir()?;
        let engine = Arc::new(SyncEngine::with_config(SyncEngineConfig::for_dir(
            dir.path(),
            format!("n{i}"),
        )));
        engine.start().await?;
        let net = start(engine.clone(), NetworkConfig::loopback("demo")).await?;
        net.spawn_anti_entropy(Duration::from_millis(300)).await;
        let cdc = net.spawn_cdc(engine.clone());
        println!("  n{i}: peer {} on {}", net.peer_id, net.listen_addrs[0]);
        nodes.push(Node {
            _dir: dir,
            engine,
            net,
            cdc,
        });
    }
    connect(&nodes[0], &nodes[1]).await?;
    connect(&nodes[1], &nodes[2]).await?;
    connect(&nodes[0], &nodes[2]).await?;

    for (i, n) in nodes.iter().enumerate() {
        // `items` in all: the remainder goes to the first nodes.
        let per = items / 3 + usize::from(i < items % 3);
        let batch: Vec<SyncItem> = (0..per)
            .map(|k| {
                SyncItem::from_json(
                    format!("n{}.item.{k}", i + 1),
                    serde_json::json!({"from": i + 1, "k": k}),
                )
            })
            .collect();
        n.engine.submit_many(batch).await?;
    }
    let t = converge(&nodes, "replicating").await?;
    println!(
        "{items} items written across 3 nodes, all nodes equal after {:.0} ms",
        t.as_secs_f64() * 1000.0
    );

    // Partition: n3 alone. Sessions are let finish first, so none is cut
    // off midway (which a node reports as a failed session).
    quiesce(&nodes).await;
    for (a, b) in [(0, 2), (1, 2)] {
        nodes[a].net.block(nodes[b].net.peer_id, true).await;
        nodes[b].net.block(nodes[a].net.peer_id, true).await;
    }
    for n in &nodes {
        n.net.spawn_anti_entropy(Duration::from_millis(300)).await;
    }
    println!("partition: {{n1, n2}} | {{n3}}");
    for k in 0..100 {
        nodes[0]
            .engine
            .submit(SyncItem::new(
                format!("conflict.{k}"),
                format!("n1 says {k}").into_bytes(),
            ))
            .await?;
    }
    for k in 0..100 {
        nodes[2]
            .engine
            .submit(SyncItem::new(
                format!("conflict.{k}"),
                format!("n3 says {k}").into_bytes(),
            ))
            .await?;
    }
    let side_a: Vec<String> = (0..50).map(|k| format!("n1.item.{k}")).collect();
    let side_b: Vec<String> = (0..50).map(|k| format!("n3.item.{k}")).collect();
    nodes[1]
        .engine
        .delete_many(&side_a.iter().map(String::as_str).collect::<Vec<_>>())
        .await?;
    nodes[2]
        .engine
        .delete_many(&side_b.iter().map(String::as_str).collect::<Vec<_>>())
        .await?;
    nodes[0]
        .engine
        .submit_many(
            (0..500)
                .map(|k| SyncItem::new(format!("left.{k}"), &b"L"[..]))
                .collect(),
        )
        .await?;
    nodes[2]
        .engine
        .submit_many(
            (0..500)
                .map(|k| SyncItem::new(format!("right.{k}"), &b"R"[..]))
                .collect(),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let c = counts(&nodes).await?;
    println!(
        "during the partition: live items per node {c:?}, roots equal: {}",
        roots(&nodes).await?.windows(2).all(|w| w[0] == w[1])
    );

    // Heal.
    let before: u64 = nodes
        .iter()
        .map(|n| n.net.traffic.sent.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    for (a, b) in [(0, 2), (1, 2)] {
        nodes[a].net.block(nodes[b].net.peer_id, false).await;
        nodes[b].net.block(nodes[a].net.peer_id, false).await;
    }
    connect(&nodes[0], &nodes[2]).await?;
    connect(&nodes[1], &nodes[2]).await?;
    println!("heal");
    let t = converge(&nodes, "converging").await?;
    let after: u64 = nodes
        .iter()
        .map(|n| n.net.traffic.sent.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    println!(
        "converged {:.0} ms after the heal, {} KiB exchanged",
        t.as_secs_f64() * 1000.0,
        (after - before) / 1024
    );

    // Every node agrees on the winners, and deletes stayed deleted.
    for n in &nodes {
        let c = n
            .engine
            .get("conflict.7")
            .await?
            .map(|i| String::from_utf8_lossy(&i.content).into_owned());
        anyhow::ensure!(
            c.as_deref() == Some("n3 says 7"),
            "conflict.7 should be n3's later write, got {c:?}"
        );
        anyhow::ensure!(
            n.engine.get("n1.item.3").await?.is_none() && n.engine.get("n3.item.3").await?.is_none(),
            "a deleted item came back"
        );
    }
    println!("conflict.7 = \"n3 says 7\" on every node (the later write wins); deleted items stay deleted");
    // No new sessions anywhere, the running ones finish, then replication
    // stops (its storage work done) before the engines do.
    for n in &nodes {
        n.cdc.abort();
    }
    quiesce(&nodes).await;
    // Each node lets the others go first, so none redials one that is
    // closing (a half-done handshake reads like a wrong key).
    for n in &nodes {
        for m in &nodes {
            if m.net.peer_id != n.net.peer_id {
                n.net.block(m.net.peer_id, true).await;
            }
        }
    }
    for n in &nodes {
        n.net.shutdown().await;
    }
    for n in &nodes {
        n.engine.shutdown().await;
    }
    Ok(())
}
