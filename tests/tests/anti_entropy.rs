//! Two engines reconcile through the protocol's anti-entropy session (the
//! transport here is a direct call; the libp2p swarm carries the same
//! requests): missing, newer and deleted items on both sides end identical,
//! and deleted items stay deleted, whether the session walks the trees or
//! decodes coded symbols. On both L3 backends.

mod common;

use common::{BACKENDS, TestNode};
use syncnode::{SyncEngine, SyncItem};
use syncnode_protocol::wire::{Descend, Request, Response};

async fn call(peer: &SyncEngine, req: Request) -> Result<Response, String> {
    Ok(peer.answer_sync_request(req).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverged_engines_converge_and_deletes_stay_deleted() {
    for backend in BACKENDS {
        let (na, nb) = (TestNode::new(backend, "a").await, TestNode::new(backend, "b").await);
        let (a, b) = (na.start().await, nb.start().await);
        // A shared past.
        let shared: Vec<SyncItem> = (0..2000)
            .map(|i| SyncItem::new(format!("s.{i:05}"), format!("v{i}").into_bytes()))
            .collect();
        a.submit_many(shared).await.unwrap();
        let progress = a.reconcile_with(1, |req| call(&b, req)).await.unwrap();
        assert_eq!(
            progress.pushed, 2000,
            "{backend:?}: b was empty and catches up through the session"
        );
        assert_eq!(a.get_merkle_root().await.unwrap(), b.get_merkle_root().await.unwrap());

        // A partition: each side writes, overwrites and deletes.
        for i in 0..50 {
            a.submit(SyncItem::new(format!("s.{i:05}"), &b"a wrote"[..]))
                .await
                .unwrap();
            b.submit(SyncItem::new(format!("s.{:05}", 100 + i), &b"b wrote"[..]))
                .await
                .unwrap();
            a.submit(SyncItem::new(format!("only-a.{i}"), &b"a"[..])).await.unwrap();
            b.submit(SyncItem::new(format!("only-b.{i}"), &b"b"[..])).await.unwrap();
        }
        for i in 200..220 {
            assert!(a.delete(&format!("s.{i:05}")).await.unwrap());
            assert!(b.delete(&format!("s.{:05}", i + 100)).await.unwrap());
        }
        // The same key on both sides: the later write wins everywhere.
        a.submit(SyncItem::new("conflict", &b"first"[..])).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        b.submit(SyncItem::new("conflict", &b"second"[..])).await.unwrap();
        assert_ne!(a.get_merkle_root().await.unwrap(), b.get_merkle_root().await.unwrap());

        // The rateless mode: coded symbols, keys resolved through L3's index.
        let p = a.reconcile_rateless(2, |req| call(&b, req)).await.unwrap();
        assert!(p.pulled > 0 && p.pushed > 0, "{backend:?}: {p:?}");
        assert!(
            !p.walked && p.symbols > 0,
            "{backend:?}: decoded without the tree walk: {p:?}"
        );
        assert_eq!(
            a.get_merkle_root().await.unwrap(),
            b.get_merkle_root().await.unwrap(),
            "{backend:?}"
        );
        for e in [&a, &b] {
            assert_eq!(&e.get("s.00000").await.unwrap().unwrap().content[..], b"a wrote");
            assert_eq!(&e.get("s.00100").await.unwrap().unwrap().content[..], b"b wrote");
            assert!(e.get("s.00200").await.unwrap().is_none(), "deleted on a stays deleted");
            assert!(e.get("s.00300").await.unwrap().is_none(), "deleted on b stays deleted");
            assert_eq!(&e.get("conflict").await.unwrap().unwrap().content[..], b"second");
            assert_eq!(e.count_prefix("only-").await.unwrap(), 100);
        }
        // Nothing left to do.
        let again = a.reconcile_with(3, |req| call(&b, req)).await.unwrap();
        assert_eq!((again.pulled, again.pushed), (0, 0));
        assert_eq!(again.round_trips, 1, "equal trees: one round shows nothing differs");
        a.shutdown().await;
        b.shutdown().await;
    }
}

#[tokio::test]
async fn bad_requests_and_forged_items_are_refused() {
    let node = TestNode::new(common::Backend::Sqlite, "a").await;
    let e = node.start().await;
    let too_many: Vec<Descend> = (0..=syncnode_protocol::session::MAX_PATHS)
        .map(|i| Descend {
            path: format!("{:x}", i % 16),
            children: vec![],
        })
        .collect();
    assert!(matches!(
        e.answer_sync_request(Request::Round {
            session: 1,
            descend: too_many,
            list: vec![]
        })
        .await,
        Response::Refused { .. }
    ));
    assert!(matches!(
        e.answer_sync_request(Request::Round {
            session: 1,
            descend: vec![Descend {
                path: "xyz!".into(),
                children: vec![]
            }],
            list: vec![]
        })
        .await,
        Response::Refused { .. }
    ));
    // A pushed item whose content does not match its hash is not stored.
    let mut forged = syncnode::replication::anti_entropy::wire_item(&SyncItem::new("f", &b"real"[..]));
    forged.entry.version = 1 << 40;
    forged.entry.origin = "evil".into();
    forged.content = b"fake".to_vec();
    let r = e
        .answer_sync_request(Request::Push {
            session: 1,
            items: vec![forged],
        })
        .await;
    assert_eq!(r, Response::Pushed { applied: 0 });
    assert!(e.get("f").await.unwrap().is_none());
    e.shutdown().await;
}

/// A Fetch of 4096 long ids behind a large item: the answer reads only what
/// it sends (within the 2 MiB transfer budget), defers the rest, and the
/// whole frame stays within the smallest frame a node accepts plus the room
/// kept for deferred ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_answer_fits_its_frame() {
    use syncnode_protocol::wire::{Body, DEFAULT_MAX_FRAME, Envelope};
    let node = TestNode::new(common::Backend::Sqlite, "a").await;
    let e = node.start().await;
    e.submit(SyncItem::new("big", vec![1u8; 1_000_000])).await.unwrap();
    let ids: Vec<String> = (0..4095).map(|i| format!("{i:0>500}")).collect();
    e.submit_many(
        ids.iter()
            .map(|id| SyncItem::new(id.clone(), vec![2u8; 1000]))
            .collect(),
    )
    .await
    .unwrap();
    let mut ask = vec!["big".to_string()];
    ask.extend(ids);
    let resp = e.answer_sync_request(Request::Fetch { session: 1, ids: ask }).await;
    let frame = Envelope::new("c", Body::Response(resp.clone())).encode();
    assert!(frame.len() <= DEFAULT_MAX_FRAME, "{} bytes", frame.len());
    match resp {
        Response::Fetch { items, deferred } => {
            assert_eq!(items[0].entry.id, "big");
            assert_eq!(items.len() + deferred.len(), 4096);
            let bytes: usize = items.iter().map(|i| i.content.len()).sum();
            assert!(bytes <= 2 * 1024 * 1024, "{bytes} content bytes in one answer");
        }
        other => panic!("{other:?}"),
    }
    e.shutdown().await;
}
