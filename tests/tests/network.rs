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
    let addr = hb.listen_addrs[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(hb.peer_id));
    ha.dial(addr).await.unwrap();
    let p = ha.reconcile(&a, hb.peer_id, 1).await.unwrap();
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
    let addr = hb.listen_addrs[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(hb.peer_id));
    ha.dial(addr).await.unwrap();
    assert!(
        ha.reconcile(&a, hb.peer_id, 1).await.is_err(),
        "requests of another cluster are refused"
    );
    assert!(a.get("secret").await.unwrap().is_none());
    a.shutdown().await;
    b.shutdown().await;
}
