//! The engine's public API, run on both L3 backends.

mod common;

use common::{BACKENDS, TestNode};
use std::collections::BTreeMap;
use syncnode::engine::item::content_hash;
use syncnode::{ItemStatus, StorageError, SubmitOptions, SyncEngine, SyncItem};

fn remote(id: &str, content: &str, version: u64, origin: &str) -> SyncItem {
    let mut it = SyncItem::new(id, content.as_bytes().to_vec());
    it.version = version;
    it.origin = origin.into();
    it
}

/// A version stamped "now" by the HLC rules (wall-clock ms in the top bits).
fn now_version(offset_ms: i64) -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    ((ms + offset_ms) as u64) << 16
}

#[tokio::test]
async fn writes_overwrites_and_deletes_survive_a_restart() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let e = node.start().await;
        let r1 = e.submit(SyncItem::new("user.1", &b"one"[..])).await.unwrap();
        let r2 = e.submit(SyncItem::new("user.1", &b"uno"[..])).await.unwrap();
        assert!(r2.version > r1.version, "{backend:?}: versions grow");
        assert_eq!(r2.origin, "n1");
        e.submit(SyncItem::from_json("user.2", serde_json::json!({"a": 1})))
            .await
            .unwrap();
        assert_eq!(&e.get("user.1").await.unwrap().unwrap().content[..], b"uno");
        assert!(e.delete("user.2").await.unwrap());
        assert!(
            !e.delete("user.2").await.unwrap(),
            "{backend:?}: second delete finds nothing"
        );
        assert!(!e.delete("never.was").await.unwrap());
        assert_eq!(e.get("user.2").await.unwrap(), None);
        assert!(!e.contains("user.2").await.unwrap());
        assert!(e.contains("user.1").await.unwrap());
        // The tombstone stays in the tree and in status; deleting an id never
        // seen here leaves a tombstone too (it wins over a version in flight).
        assert!(matches!(e.status("user.2").await.unwrap(), ItemStatus::Deleted { .. }));
        assert!(matches!(
            e.status("never.was").await.unwrap(),
            ItemStatus::Deleted { .. }
        ));
        assert_eq!(e.merkle_summary().1, 3);
        let root = e.get_merkle_root().await.unwrap();
        e.shutdown().await;

        let e = node.start().await;
        assert_eq!(
            e.get_merkle_root().await.unwrap(),
            root,
            "{backend:?}: root after restart"
        );
        assert_eq!(&e.get("user.1").await.unwrap().unwrap().content[..], b"uno");
        assert_eq!(e.get("user.2").await.unwrap(), None);
        assert!(matches!(
            e.status("user.1").await.unwrap(),
            ItemStatus::Synced { in_l3: true, .. }
        ));
        assert_eq!(e.status("nope").await.unwrap(), ItemStatus::Missing);
        // New writes after a restart still get greater versions.
        let r3 = e.submit(SyncItem::new("user.1", &b"eins"[..])).await.unwrap();
        assert!(r3.version > r2.version);
        e.shutdown().await;
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_typed_errors_and_stores_nothing() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let mut cfg = node.config.clone();
        cfg.max_payload_bytes = 1024;
        let e = SyncEngine::with_config(cfg);
        e.start().await.unwrap();
        let long = "x".repeat(513);
        for id in ["", long.as_str(), "a\0b", "tab\there", "nl\n"] {
            assert!(
                matches!(
                    e.submit(SyncItem::new(id, &b"v"[..])).await,
                    Err(StorageError::InvalidId(_))
                ),
                "{backend:?} {id:?}"
            );
            assert!(matches!(e.get(id).await, Err(StorageError::InvalidId(_))));
            assert!(matches!(e.delete(id).await, Err(StorageError::InvalidId(_))));
        }
        assert!(matches!(
            e.submit(SyncItem::new("big", vec![0u8; 1025])).await,
            Err(StorageError::PayloadTooLarge { size: 1025, max: 1024 })
        ));
        assert!(matches!(
            e.submit(SyncItem::new("s", &b"v"[..]).with_state("x".repeat(65))).await,
            Err(StorageError::InvalidInput(_))
        ));
        assert!(matches!(e.set_state("s", "").await, Err(StorageError::InvalidInput(_))));
        assert!(matches!(
            e.get_merkle_node("xyz").await,
            Err(StorageError::InvalidInput(_))
        ));
        assert!(matches!(
            e.get_merkle_children("0123456").await,
            Err(StorageError::InvalidInput(_))
        ));
        // A batch keeps the good items and counts the bad ones.
        let r = e
            .submit_many(vec![
                SyncItem::new("ok.1", &b"v"[..]),
                SyncItem::new("", &b"v"[..]),
                SyncItem::new("big", vec![1u8; 2000]),
            ])
            .await
            .unwrap();
        assert_eq!((r.total, r.succeeded, r.failed), (3, 1, 2));
        assert_eq!(e.merkle_summary().1, 1, "{backend:?}: only the valid item is stored");
        assert_eq!(e.count_prefix("").await.unwrap(), 1);
        assert!(e.get("big").await.unwrap().is_none());
        e.shutdown().await;
    }
}

#[tokio::test]
async fn payload_limit_fits_the_mysql_packet_limit() {
    let node = TestNode::new(common::Backend::MariaDb, "n1").await;
    let mut cfg = node.config.clone();
    cfg.max_payload_bytes = 1 << 30;
    let e = SyncEngine::with_config(cfg);
    e.start().await.unwrap();
    // scripts/test starts MariaDB with max_allowed_packet = 64 MiB.
    let limit = e.config().max_payload_bytes;
    assert!(limit < 64 << 20 && limit > 32 << 20, "{limit}");
    assert!(matches!(
        e.submit(SyncItem::new("big", vec![0u8; limit + 1])).await,
        Err(StorageError::PayloadTooLarge { .. })
    ));
    e.shutdown().await;
}

#[tokio::test]
async fn get_verified_reports_a_corrupted_row() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let e = node.start().await;
        e.submit(SyncItem::new("c.1", &b"original"[..])).await.unwrap();
        assert!(e.get_verified("c.1").await.unwrap().is_some());
        node.l3_exec("UPDATE sync_items SET content = ?", b"bit rot").await;
        match e.get_verified("c.1").await {
            Err(StorageError::Corruption { id, expected, actual }) => {
                assert_eq!(id, "c.1");
                assert_eq!(expected, content_hash(b"original"));
                assert_eq!(actual, content_hash(b"bit rot"));
            }
            other => panic!("{backend:?}: expected corruption, got {other:?}"),
        }
        assert_eq!(
            e.metrics()
                .corruption_detected
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        e.shutdown().await;
    }
}

#[tokio::test]
async fn state_and_prefix_queries() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let e = node.start().await;
        for i in 0..10 {
            let state = if i % 2 == 0 { "even" } else { "odd" };
            e.submit_with(
                SyncItem::new(format!("delta:obj:{i}"), vec![i as u8]),
                SubmitOptions::default().with_state(state),
            )
            .await
            .unwrap();
        }
        e.submit(SyncItem::new("delta:obj", &b"not under the colon prefix"[..]))
            .await
            .unwrap();
        e.submit(SyncItem::new("delta:obk:1", &b"neighbour"[..])).await.unwrap();
        assert_eq!(e.count_by_state("even").await.unwrap(), 5);
        assert_eq!(e.list_state_ids("odd", 100).await.unwrap().len(), 5);
        assert_eq!(e.get_by_state("odd", 2).await.unwrap().len(), 2);
        assert_eq!(e.count_prefix("delta:obj:").await.unwrap(), 10);
        let scanned = e.scan_prefix("delta:obj:", 100).await.unwrap();
        assert_eq!(scanned.len(), 10);
        assert!(scanned.windows(2).all(|w| w[0].object_id < w[1].object_id), "id order");
        assert!(e.set_state("delta:obj:0", "odd").await.unwrap());
        assert!(!e.set_state("missing", "odd").await.unwrap());
        assert_eq!(e.count_by_state("odd").await.unwrap(), 6);
        assert_eq!(e.delete_by_state("odd").await.unwrap(), 6);
        assert_eq!(e.count_by_state("odd").await.unwrap(), 0);
        assert_eq!(e.delete_prefix("delta:obj:").await.unwrap(), 4);
        assert_eq!(e.count_prefix("delta:obj:").await.unwrap(), 0);
        assert_eq!(
            e.count_prefix("delta:").await.unwrap(),
            2,
            "{backend:?}: neighbours untouched"
        );
        // Case and bytes matter: ids differing only by case or trailing space are distinct.
        e.submit(SyncItem::new("Key", &b"upper"[..])).await.unwrap();
        e.submit(SyncItem::new("key", &b"lower"[..])).await.unwrap();
        e.submit(SyncItem::new("key ", &b"space"[..])).await.unwrap();
        assert_eq!(&e.get("Key").await.unwrap().unwrap().content[..], b"upper");
        assert_eq!(&e.get("key ").await.unwrap().unwrap().content[..], b"space");
        e.shutdown().await;
        let fresh = node.start().await;
        assert_eq!(
            &fresh.get("key").await.unwrap().unwrap().content[..],
            b"lower",
            "{backend:?}: from L3"
        );
        assert_eq!(&fresh.get("Key").await.unwrap().unwrap().content[..], b"upper");
        fresh.shutdown().await;
    }
}

#[tokio::test]
async fn get_many_and_get_or_insert_with() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let e = node.start().await;
        e.submit(SyncItem::new("a", &b"A"[..])).await.unwrap();
        e.submit(SyncItem::new("b", &b"B"[..])).await.unwrap();
        e.delete("b").await.unwrap();
        let got = e.get_many(&["a", "b", "c"]).await.unwrap();
        assert_eq!(
            got.iter().map(|g| g.is_some()).collect::<Vec<_>>(),
            vec![true, false, false]
        );
        let made = e
            .get_or_insert_with("c", || async { SyncItem::new("c", &b"made"[..]) })
            .await
            .unwrap();
        assert_eq!(made.origin, "n1");
        let again = e
            .get_or_insert_with("c", || async { panic!("factory must not run twice") })
            .await
            .unwrap();
        assert_eq!(&again.content[..], b"made");
        assert!(matches!(
            e.get_or_insert_with("d", || async { SyncItem::new("e", &b"x"[..]) })
                .await,
            Err(StorageError::InvalidInput(_))
        ));
        e.shutdown().await;
    }
}

#[tokio::test]
async fn replicated_items_follow_last_writer_wins_and_keep_their_stamp() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let e = node.start().await;
        let v = now_version(0);
        assert!(e.apply_remote(remote("r.1", "from n2", v, "n2")).await.unwrap());
        let got = e.get("r.1").await.unwrap().unwrap();
        assert_eq!((got.version, got.origin.as_str()), (v, "n2"), "{backend:?}: stamp kept");
        // Older, equal, and same-version-smaller-origin versions lose.
        assert!(!e.apply_remote(remote("r.1", "older", v - 1, "n9")).await.unwrap());
        assert!(!e.apply_remote(remote("r.1", "from n2", v, "n2")).await.unwrap());
        assert!(!e.apply_remote(remote("r.1", "tie", v, "n1")).await.unwrap());
        assert!(e.apply_remote(remote("r.1", "tie wins", v, "n3")).await.unwrap());
        assert_eq!(&e.get("r.1").await.unwrap().unwrap().content[..], b"tie wins");
        // A local write after seeing v is newer than v.
        let local = e.submit(SyncItem::new("r.1", &b"local"[..])).await.unwrap();
        assert!(local.version > v);
        // A remote tombstone deletes.
        let mut t = SyncItem::tombstone("r.1");
        t.version = local.version + 1;
        t.origin = "n2".into();
        assert!(e.apply_remote(t).await.unwrap());
        assert_eq!(e.get("r.1").await.unwrap(), None);
        // Too far in the future: deferred, not applied, counted.
        let far = remote("r.2", "future", now_version(60_000), "n2");
        assert!(matches!(e.apply_remote(far).await, Err(StorageError::ClockSkew { .. })));
        assert!(e.get("r.2").await.unwrap().is_none());
        assert_eq!(
            e.metrics().clock_deferrals.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // A hash that does not match the content is corruption.
        let mut bad = remote("r.3", "x", now_version(0), "n2");
        bad.content_hash = content_hash(b"y");
        assert!(matches!(
            e.apply_remote(bad).await,
            Err(StorageError::Corruption { .. })
        ));
        assert!(matches!(
            e.apply_remote(remote("r.4", "v", 0, "n2")).await,
            Err(StorageError::InvalidInput(_))
        ));
        e.shutdown().await;
    }
}

#[tokio::test]
async fn is_current_and_definitely_missing() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let e = node.start().await;
        e.submit(SyncItem::new("x", &b"hello"[..])).await.unwrap();
        assert!(e.is_current("x", &content_hash(b"hello")).await.unwrap());
        assert!(!e.is_current("x", &content_hash(b"bye")).await.unwrap());
        assert!(!e.is_current("y", &content_hash(b"hello")).await.unwrap());
        assert!(e.definitely_missing("y"));
        assert!(!e.definitely_missing("x"));
        assert!(e.might_exist("x"));
        e.shutdown().await;
        // After a restart (empty L1) the trusted filter still knows "x".
        let e = node.start().await;
        assert!(
            !e.definitely_missing("x"),
            "{backend:?}: no false negative after restart"
        );
        assert!(e.definitely_missing("y"));
        assert_eq!(e.l3_filter_stats().2, syncnode::FilterTrust::Trusted);
        e.shutdown().await;
    }
}

/// Two nodes with the same data have the same root; the tree comparison
/// finds exactly the bucket of an id that differs, and lists that id.
#[tokio::test]
async fn merkle_trees_agree_and_locate_differences() {
    for backend in BACKENDS {
        let a_node = TestNode::new(backend, "a").await;
        let b_node = TestNode::new(backend, "b").await;
        let (a, b) = (a_node.start().await, b_node.start().await);
        let items: Vec<SyncItem> = (0..300)
            .map(|i| SyncItem::new(format!("m.{i}"), vec![i as u8; 10]))
            .collect();
        a.submit_many(items).await.unwrap();
        // Copy a's items to b, in reverse order, as replication would.
        let all = a.scan_prefix("m.", 1000).await.unwrap();
        for it in all.into_iter().rev() {
            assert!(b.apply_remote(it).await.unwrap());
        }
        assert_eq!(
            a.get_merkle_root().await.unwrap(),
            b.get_merkle_root().await.unwrap(),
            "{backend:?}"
        );
        assert!(
            a.find_divergent_paths(&[(String::new(), b.get_merkle_root().await.unwrap().unwrap())])
                .await
                .unwrap()
                .is_empty()
        );

        b.submit(SyncItem::new("m.7", &b"changed on b"[..])).await.unwrap();
        let bucket = a.merkle_bucket_of("m.7");
        let b_children = |path: String| {
            let b = &b;
            async move { b.get_merkle_children(&path).await }
        };
        let leaves = a.drill_down_divergence("", b_children).await.unwrap();
        assert_eq!(leaves, vec![bucket.clone()]);
        let remote_top: Vec<(String, [u8; 32])> = b.get_merkle_children("").await.unwrap().into_iter().collect();
        let diff = a.find_divergent_paths(&remote_top).await.unwrap();
        assert_eq!(diff.divergent_paths, vec![bucket[..1].to_string()]);
        assert!(diff.local_only.is_empty() && diff.remote_only.is_empty());
        let listed: BTreeMap<String, u64> = a
            .merkle_entries(&bucket, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.version))
            .collect();
        assert!(listed.contains_key("m.7"));
        let node = a.get_merkle_node(&bucket).await.unwrap().unwrap();
        assert!(node.is_leaf && node.count as usize == listed.len());
        a.shutdown().await;
        b.shutdown().await;
    }
}

#[tokio::test]
async fn writes_past_the_backpressure_limit_are_refused_and_not_stored() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "n1").await;
        let mut cfg = node.config.clone();
        cfg.l1_max_bytes = 64 * 1024;
        let e = SyncEngine::with_config(cfg);
        e.start().await.unwrap();
        // On this single-threaded runtime the writer cannot run between buffered
        // submits, so pending bytes grow until the engine refuses.
        let mut refused = None;
        for i in 0..1000 {
            match e
                .submit_with(
                    SyncItem::new(format!("p.{i}"), vec![7u8; 1024]),
                    SubmitOptions::default().buffered(),
                )
                .await
            {
                Ok(_) => {}
                Err(err) => {
                    refused = Some((i, err));
                    break;
                }
            }
        }
        let (i, err) = refused.expect("writes are refused before 1000 KiB pend on a 64 KiB budget");
        assert!(
            matches!(
                err,
                StorageError::Backpressure {
                    retry_after_secs: 5..,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!e.should_accept_writes());
        // One rule: a level that refuses writes is also unhealthy.
        let h = e.health_check().await;
        assert!(
            !h.healthy || h.backpressure_level.should_accept_writes(),
            "{backend:?}: healthy at {:?}",
            h.backpressure_level
        );
        e.force_flush().await;
        assert!(e.should_accept_writes(), "pressure falls once the writer commits");
        assert!(
            e.get(&format!("p.{i}")).await.unwrap().is_none(),
            "the refused write is not stored"
        );
        assert_eq!(
            e.count_prefix("p.").await.unwrap(),
            i as u64,
            "every accepted buffered write is stored"
        );
        e.shutdown().await;
    }
}

/// An item L3 refuses for good (a trigger here) fails alone: the writes
/// committed with it land, its durable caller hears why, a buffered one is
/// quarantined instead of retried for ever, and writes behind it go on.
#[tokio::test]
async fn an_item_l3_refuses_is_quarantined_and_blocks_nothing() {
    for backend in BACKENDS {
        let node = TestNode::new(backend, "q").await;
        let e = node.start().await;
        let trigger = match backend {
            common::Backend::Sqlite => "CREATE TRIGGER poison BEFORE INSERT ON sync_items \
                 WHEN CAST(NEW.id AS TEXT) LIKE 'bad%' BEGIN SELECT RAISE(ABORT, 'poison item'); END"
                .to_string(),
            common::Backend::MariaDb => "CREATE TRIGGER poison BEFORE INSERT ON sync_items FOR EACH ROW \
                 BEGIN IF NEW.id LIKE 'bad%' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poison item'; END IF; END"
                .to_string(),
        };
        node.l3_ddl(&trigger).await;

        // Durable: the batch's good items commit; the bad one fails alone.
        // (With MySQL the ack stands on the commit log: the refusal comes
        // when the log is drained, and the item is quarantined then.)
        let r = e
            .submit_many(vec![
                SyncItem::new("good.1", &b"1"[..]),
                SyncItem::new("bad.1", &b"x"[..]),
                SyncItem::new("good.2", &b"2"[..]),
            ])
            .await
            .unwrap();
        let expected = if backend == common::Backend::Sqlite {
            (2, 1)
        } else {
            (3, 0)
        };
        assert_eq!((r.succeeded, r.failed), expected, "{backend:?}: {r:?}");
        e.force_flush().await;
        assert!(e.get("good.1").await.unwrap().is_some() && e.get("good.2").await.unwrap().is_some());
        assert!(
            e.get("bad.1").await.unwrap().is_none(),
            "{backend:?}: a refused write reads as written"
        );
        if backend == common::Backend::Sqlite {
            let err = e.submit(SyncItem::new("bad.2", &b"x"[..])).await.unwrap_err();
            assert!(err.to_string().contains("poison item"), "{backend:?}: {err}");
        }

        // Buffered: acknowledged at once; the bad one is quarantined, not retried for ever.
        e.submit_with(SyncItem::new("bad.3", &b"x"[..]), SubmitOptions::default().buffered())
            .await
            .unwrap();
        e.submit_with(SyncItem::new("good.3", &b"3"[..]), SubmitOptions::default().buffered())
            .await
            .unwrap();
        e.force_flush().await;
        e.submit(SyncItem::new("good.4", &b"4"[..])).await.unwrap();
        assert!(e.get("good.3").await.unwrap().is_some() && e.get("good.4").await.unwrap().is_some());
        let h = e.health_check().await;
        let ids: Vec<&str> = h.quarantined.iter().map(|q| q.id.as_str()).collect();
        assert!(ids.contains(&"bad.3"), "{backend:?}: {ids:?}");
        if backend == common::Backend::MariaDb {
            assert!(ids.contains(&"bad.1"), "{backend:?}: {ids:?}");
            assert_eq!(h.wal_pending_items, Some(0), "{backend:?}: the log is held back");
        }
        assert!(
            e.metrics()
                .writes_quarantined
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        assert_eq!(h.pending_items, 0, "{backend:?}: a refused write stays pending");

        // A failure that is not the data's (here: an error that names no
        // constraint) quarantines nothing: the write waits, then lands.
        let broken = match backend {
            common::Backend::Sqlite => "CREATE TRIGGER broken BEFORE INSERT ON sync_items \
                 WHEN CAST(NEW.id AS TEXT) LIKE 'sys%' BEGIN SELECT no_such_function(); END"
                .to_string(),
            common::Backend::MariaDb => "CREATE TRIGGER broken BEFORE INSERT ON sync_items FOR EACH ROW \
                 BEGIN IF NEW.id LIKE 'sys%' THEN CALL no_such_procedure(); END IF; END"
                .to_string(),
        };
        node.l3_ddl(&broken).await;
        let quarantined = e
            .metrics()
            .writes_quarantined
            .load(std::sync::atomic::Ordering::Relaxed);
        e.submit_with(SyncItem::new("sys.1", &b"s"[..]), SubmitOptions::default().buffered())
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(
            e.metrics()
                .writes_quarantined
                .load(std::sync::atomic::Ordering::Relaxed),
            quarantined,
            "{backend:?}: a server-side failure quarantined a write"
        );
        node.l3_ddl("DROP TRIGGER broken").await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while e.health_check().await.pending_items > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{backend:?}: the write never landed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(
            e.get("sys.1").await.unwrap().is_some(),
            "{backend:?}: the write was lost"
        );
        assert!(!e.health_check().await.quarantined.iter().any(|q| q.id == "sys.1"));
        e.shutdown().await;
    }
}
