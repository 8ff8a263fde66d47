//! Anti-entropy over real libp2p swarms (TCP + Noise + Yamux on loopback):
//! two engines that diverged converge, and a node of another cluster gets
//! nothing.

mod common;

use common::{Backend, TestNode};
use std::sync::Arc;
use syncnode::SyncItem;
use syncnode::replication::swarm::{NetworkConfig, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge_over_tcp() {
    let (na, nb) = (
        TestNode::new(Backend::Sqlite, "a").await,
        TestNode::new(Backend::Sqlite, "b").await,
    );
    let (a, b) = (Arc::new(na.start().await), Arc::new(nb.start().await));
    a.submit_many(
        (0..500)
            .map(|i| SyncItem::new(format!("x.{i}"), format!("a{i}").into_bytes()))
            .collect(),
    )
    .await
    .unwrap();
    b.submit_many(
        (250..800)
            .map(|i| SyncItem::new(format!("x.{i}"), format!("b{i}").into_bytes()))
            .collect(),
    )
    .await
    .unwrap();
    b.submit(SyncItem::new("x.0", &b"b wins x.0"[..])).await.unwrap();
    assert!(a.delete("x.499").await.unwrap());

    let ha = start(a.clone(), NetworkConfig::loopback("test-cluster")).await.unwrap();
    let hb = start(b.clone(), NetworkConfig::loopback("test-cluster")).await.unwrap();
    let addr = hb.dial_addr();
    ha.dial(addr).await.unwrap();
    let p = ha.reconcile(hb.peer_id).await.unwrap();
    assert!(p.pulled > 0 && p.pushed > 0, "{p:?}");
    assert_eq!(a.get_merkle_root().await.unwrap(), b.get_merkle_root().await.unwrap());
    for e in [&a, &b] {
        assert_eq!(e.count_prefix("x.").await.unwrap(), 799);
        assert_eq!(&e.get("x.0").await.unwrap().unwrap().content[..], b"b wins x.0");
        assert!(e.get("x.499").await.unwrap().is_none());
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_gets_nothing() {
    let (na, nb) = (
        TestNode::new(Backend::Sqlite, "a").await,
        TestNode::new(Backend::Sqlite, "b").await,
    );
    let (a, b) = (Arc::new(na.start().await), Arc::new(nb.start().await));
    b.submit(SyncItem::new("secret", &b"s"[..])).await.unwrap();
    let ha = start(a.clone(), NetworkConfig::loopback("intruders")).await.unwrap();
    let hb = start(b.clone(), NetworkConfig::loopback("test-cluster")).await.unwrap();
    let addr = hb.dial_addr();
    ha.dial(addr).await.unwrap();
    assert!(
        ha.reconcile(hb.peer_id).await.is_err(),
        "requests of another cluster are refused"
    );
    assert!(a.get("secret").await.unwrap().is_none());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_of_three_nodes_converges_on_its_own() {
    let mut engines = Vec::new();
    let mut handles = Vec::new();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let n = TestNode::new(Backend::Sqlite, name).await;
        let e = Arc::new(n.start().await);
        let h = start(e.clone(), NetworkConfig::loopback("line")).await.unwrap();
        h.spawn_anti_entropy(std::time::Duration::from_millis(200)).await;
        nodes.push(n);
        engines.push(e);
        handles.push(h);
    }
    // a — b — c: a and c never talk directly.
    for (from, to) in [(0, 1), (1, 2)] {
        let addr = handles[to].dial_addr();
        handles[from].dial(addr).await.unwrap();
    }
    engines[0]
        .submit_many(
            (0..200)
                .map(|i| SyncItem::new(format!("a.{i}"), &b"from a"[..]))
                .collect(),
        )
        .await
        .unwrap();
    engines[2]
        .submit_many(
            (0..200)
                .map(|i| SyncItem::new(format!("c.{i}"), &b"from c"[..]))
                .collect(),
        )
        .await
        .unwrap();
    engines[2]
        .submit(SyncItem::new("a.7", &b"c overwrote"[..]))
        .await
        .unwrap();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let roots: Vec<_> = futures_roots(&engines).await;
        if roots.windows(2).all(|w| w[0] == w[1]) && engines[0].count_prefix("").await.unwrap() == 400 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no convergence: {roots:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for e in &engines {
        assert_eq!(&e.get("a.7").await.unwrap().unwrap().content[..], b"c overwrote");
        assert_eq!(e.count_prefix("c.").await.unwrap(), 200);
    }
    for e in engines {
        e.shutdown().await;
    }
}

async fn futures_roots(engines: &[Arc<syncnode::SyncEngine>]) -> Vec<Option<[u8; 32]>> {
    let mut out = Vec::new();
    for e in engines {
        out.push(e.get_merkle_root().await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_pushed_to_peers_as_they_commit() {
    let (na, nb) = (
        TestNode::new(Backend::Sqlite, "a").await,
        TestNode::new(Backend::Sqlite, "b").await,
    );
    let (a, b) = (Arc::new(na.start().await), Arc::new(nb.start().await));
    let ha = start(a.clone(), NetworkConfig::loopback("cdc")).await.unwrap();
    let hb = start(b.clone(), NetworkConfig::loopback("cdc")).await.unwrap();
    ha.spawn_cdc(a.clone());
    hb.spawn_cdc(b.clone());
    let addr = hb.dial_addr();
    ha.dial(addr).await.unwrap();
    // Let the nodes list each other as members (CDC goes to members).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // No anti-entropy runs here: only CDC can carry these.
    a.submit(SyncItem::new("pushed", &b"hello"[..])).await.unwrap();
    b.submit(SyncItem::new("back", &b"hi"[..])).await.unwrap();
    // Too large to inline: the deltas go without content, b fetches them
    // from a (more than one fetch answer holds: some are deferred).
    a.submit_many(
        (0..70)
            .map(|i| SyncItem::new(format!("large.{i}"), vec![i as u8; 40 * 1024]))
            .collect(),
    )
    .await
    .unwrap();
    a.delete("pushed").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let converged = a.get_merkle_root().await.unwrap() == b.get_merkle_root().await.unwrap()
            && matches!(b.status("pushed").await.unwrap(), syncnode::ItemStatus::Deleted { .. })
            && a.get("back").await.unwrap().is_some()
            && b.count_prefix("large.").await.unwrap() == 70;
        if converged {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "CDC did not deliver");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(b.get("pushed").await.unwrap().is_none());
    a.shutdown().await;
    b.shutdown().await;
}

async fn wait_equal(engines: &[&syncnode::SyncEngine], what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut roots = Vec::new();
        for e in engines {
            roots.push(e.get_merkle_root().await.unwrap());
        }
        if roots.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: no convergence");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// DESIGN §6: tombstones go once every member holds them; a member that
/// missed the delete and comes back after expiring cannot bring the items
/// back, and no tombstone is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_tombstones_never_let_a_delete_come_back() {
    use std::time::Duration;
    use syncnode::replication::purge::purge_bound;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(TestNode::new(Backend::Sqlite, name).await);
    }
    let mut engines = Vec::new();
    let mut handles = Vec::new();
    for n in &nodes {
        let e = Arc::new(n.start().await);
        let h = start(
            e.clone(),
            NetworkConfig {
                member_expiry: Duration::from_secs(1),
                ..NetworkConfig::loopback("purge")
            },
        )
        .await
        .unwrap();
        h.spawn_anti_entropy(Duration::from_millis(200)).await;
        h.spawn_cdc(e.clone());
        engines.push(e);
        handles.push(h);
    }
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        let addr = handles[j].dial_addr();
        handles[i].dial(addr).await.unwrap();
    }
    let (a, b, c) = (&engines[0], &engines[1], &engines[2]);
    a.submit_many(
        (0..20)
            .map(|i| SyncItem::new(format!("x{i}"), vec![i as u8; 10]))
            .collect(),
    )
    .await
    .unwrap();
    wait_equal(&[a, b, c], "initial").await;

    // c is cut off and misses the deletes.
    for (i, j) in [(0, 2), (1, 2)] {
        handles[i].block(handles[j].peer_id, true).await;
        handles[j].block(handles[i].peer_id, true).await;
    }
    for i in 0..10 {
        assert!(a.delete(&format!("x{i}")).await.unwrap());
    }
    wait_equal(&[a, b], "deletes").await;
    // Let b prove it holds them, and c's membership expire (1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = syncnode::engine::item::now_ms() as u64;
    for (e, h) in [(a, &handles[0]), (b, &handles[1])] {
        let bound = purge_bound(&h.peers, now, Duration::ZERO).expect("b and a are members");
        assert_eq!(e.purge_tombstones(bound, Duration::ZERO, 10_000).await.unwrap(), 10);
        assert_eq!(e.tombstone_count().await.unwrap(), 0);
    }
    wait_equal(&[a, b], "after purge").await;

    // c comes back still holding the deleted items.
    for (i, j) in [(0, 2), (1, 2)] {
        handles[i].block(handles[j].peer_id, false).await;
        handles[j].block(handles[i].peer_id, false).await;
        // The first dial may meet the far side still blocking (each side's
        // own unblock dials at once): try again until the link is up.
        let addr = handles[j].dial_addr();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while let Err(e) = handles[i].dial(addr.clone()).await {
            assert!(std::time::Instant::now() < deadline, "no link after unblocking: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while a.resurrections_refused() + b.resurrections_refused() == 0 {
        assert!(std::time::Instant::now() < deadline, "c never offered its stale items");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The tombstones are put back, so c learns of the deletes. A node that
    // purged them does not store them again (it would purge them again, and
    // nodes purging at different times would hand them back and forth).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut live = 0;
        for i in 0..10 {
            live += c.get(&format!("x{i}")).await.unwrap().is_some() as usize;
        }
        if live == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "c still holds {live} deleted items"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The tombstones put back go by the same rule once every member holds
    // them: then all converge, with no tombstone and nothing deleted left.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = syncnode::engine::item::now_ms() as u64;
        let mut tombstones = 0;
        for (e, h) in [(a, &handles[0]), (b, &handles[1]), (c, &handles[2])] {
            if let Some(bound) = purge_bound(&h.peers, now, Duration::ZERO) {
                e.purge_tombstones(bound, Duration::ZERO, 10_000).await.unwrap();
            }
            tombstones += e.tombstone_count().await.unwrap();
        }
        let roots = futures_roots(&engines).await;
        if tombstones == 0 && roots.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after c's return: {tombstones} tombstones, roots {roots:?}"
        );
    }
    for e in [a, b, c] {
        for i in 0..10 {
            assert!(e.get(&format!("x{i}")).await.unwrap().is_none(), "x{i} came back");
        }
        assert_eq!(e.count_prefix("x").await.unwrap(), 10);
    }
    for e in &engines {
        e.shutdown().await;
    }
}
