//! The L2 Redis tier against the real Redis of `scripts/test`, on both L3
//! backends: routing, TTLs, state sets, promotion, the Merkle mirror, and the
//! startup resync that repairs Redis after it was changed behind our back.

mod common;

use common::{BACKENDS, TestNode, redis_conn, redis_item, set_redis_item};
use redis::AsyncCommands;
use std::sync::atomic::Ordering;
use syncnode::{CacheTtl, ItemStatus, SubmitOptions, SyncEngine, SyncItem};

#[tokio::test]
async fn routing_ttl_state_sets_and_promotion() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "a").await;
        let p = node.redis_prefix();
        let mut r = redis_conn().await;
        let e = node.start().await;

        // Default: both tiers, no expiry, in the mirror.
        e.submit(SyncItem::new("both", &b"B"[..]).with_state("s1"))
            .await
            .unwrap();
        let (_, content) = redis_item(&mut r, &format!("{p}item:both")).await;
        assert_eq!(content, b"B", "{backend:?}");
        assert_eq!(r.ttl::<_, i64>(format!("{p}item:both")).await.unwrap(), -1);
        assert!(matches!(
            e.status("both").await.unwrap(),
            ItemStatus::Synced {
                in_l2: true,
                in_l3: true,
                ..
            }
        ));

        // Cache only: Redis with a TTL, not L3, not the tree.
        let before = e.merkle_summary().1;
        e.submit_with(
            SyncItem::new("cache", &b"C"[..]),
            SubmitOptions::cache(CacheTtl::Minute),
        )
        .await
        .unwrap();
        let ttl: i64 = r.ttl(format!("{p}item:cache")).await.unwrap();
        assert!((1..=60).contains(&ttl), "ttl {ttl}");
        assert_eq!(e.merkle_summary().1, before);
        assert_eq!(e.count_prefix("cache").await.unwrap(), 0);
        assert_eq!(&e.get("cache").await.unwrap().unwrap().content[..], b"C");
        assert!(matches!(
            e.status("cache").await.unwrap(),
            ItemStatus::Synced {
                in_l2: true,
                in_l3: false,
                ..
            }
        ));

        // Durable only: L3, never Redis (an older Redis copy is removed).
        e.submit(SyncItem::new("dur", &b"old"[..])).await.unwrap();
        e.submit_with(SyncItem::new("dur", &b"D"[..]), SubmitOptions::durable())
            .await
            .unwrap();
        assert!(!r.exists::<_, bool>(format!("{p}item:dur")).await.unwrap());
        assert_eq!(&e.get("dur").await.unwrap().unwrap().content[..], b"D");

        // A copy that expired loses its expiry when a version without one
        // replaces it (one SET, no EX), and the key is the string layout.
        let ttl_opts = SubmitOptions {
            redis_ttl: Some(CacheTtl::Minute),
            ..Default::default()
        };
        e.submit_with(SyncItem::new("ttl", &b"T1"[..]), ttl_opts).await.unwrap();
        let ttl: i64 = r.ttl(format!("{p}item:ttl")).await.unwrap();
        assert!((1..=60).contains(&ttl), "{backend:?}: ttl {ttl}");
        e.submit(SyncItem::new("ttl", &b"T2"[..])).await.unwrap();
        assert_eq!(
            r.ttl::<_, i64>(format!("{p}item:ttl")).await.unwrap(),
            -1,
            "{backend:?}"
        );
        let (_, c) = redis_item(&mut r, &format!("{p}item:ttl")).await;
        assert_eq!(c, b"T2");

        // State sets follow set_state and delete.
        let members: Vec<String> = r.smembers(format!("{p}state:s1")).await.unwrap();
        assert_eq!(members, vec!["both".to_string()]);
        assert!(e.set_state("both", "s2").await.unwrap());
        assert!(!r.sismember::<_, _, bool>(format!("{p}state:s1"), "both").await.unwrap());
        assert!(r.sismember::<_, _, bool>(format!("{p}state:s2"), "both").await.unwrap());
        e.delete("both").await.unwrap();
        assert!(!r.sismember::<_, _, bool>(format!("{p}state:s2"), "both").await.unwrap());
        assert_eq!(e.get("both").await.unwrap(), None);
        assert!(!e.contains("both").await.unwrap());

        // The mirror agrees with L3 (items written durable() are not in it).
        assert!(
            e.is_merkle_synced().await.unwrap(),
            "{backend:?}: {:?}",
            e.merkle_roots().await
        );
        let (l2_root, _) = e.merkle_roots().await;
        assert!(l2_root.is_some());
        e.submit(SyncItem::new("promo", &b"P"[..])).await.unwrap();
        e.shutdown().await;

        // A fresh engine (empty L1) serves from Redis and promotes to L1.
        let e = node.start().await;
        let l2_reads = e.metrics().reads_l2.load(Ordering::Relaxed);
        assert_eq!(&e.get("promo").await.unwrap().unwrap().content[..], b"P");
        assert_eq!(e.metrics().reads_l2.load(Ordering::Relaxed), l2_reads + 1);
        e.get("promo").await.unwrap();
        assert_eq!(
            e.metrics().reads_l2.load(Ordering::Relaxed),
            l2_reads + 1,
            "second read is an L1 hit"
        );
        let h = e.health_check().await;
        assert_eq!(h.redis_connected, Some(true));
        assert!(h.healthy);
        e.shutdown().await;
    }
}

#[tokio::test]
async fn startup_resync_repairs_redis_changed_behind_our_back() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "a").await;
        let p = node.redis_prefix();
        let mut r = redis_conn().await;
        let e = node.start().await;
        let items: Vec<SyncItem> = (0..300)
            .map(|i| SyncItem::new(format!("k.{i:03}"), format!("v{i}").into_bytes()))
            .collect();
        e.submit_many(items).await.unwrap();
        e.delete("k.299").await.unwrap();
        assert!(e.is_merkle_synced().await.unwrap());
        e.shutdown().await;

        // Behind the node's back: deleted keys, corrupted content, stale
        // versions, wrong types, a stray key, and a damaged mirror.
        for i in 0..10 {
            let _: () = r.del(format!("{p}item:k.{i:03}")).await.unwrap();
        }
        for i in 10..15 {
            let key = format!("{p}item:k.{i:03}");
            let (m, _) = redis_item(&mut r, &key).await;
            set_redis_item(&mut r, &key, &m, b"garbage").await;
        }
        for i in 15..18 {
            // A stale version: the metadata line holding the version rewritten.
            let key = format!("{p}item:k.{i:03}");
            let (m, c) = redis_item(&mut r, &key).await;
            let mut lines: Vec<&str> = m.split('\n').collect();
            lines[0] = "1";
            set_redis_item(&mut r, &key, &lines.join("\n"), &c).await;
        }
        // Wrong types: a string without the NUL, a list.
        let _: () = r.set(format!("{p}item:k.018"), "no separator").await.unwrap();
        let _: () = r.del(format!("{p}item:k.019")).await.unwrap();
        let _: () = r.rpush(format!("{p}item:k.019"), "x").await.unwrap();
        let _: () = r.del(format!("{p}item:k.299")).await.unwrap();
        let _: () = r
            .hset_multiple(
                format!("{p}item:stray"),
                &[("v", "5"), ("o", "x"), ("b", "0"), ("h", "00"), ("s", "default")],
            )
            .await
            .unwrap();
        let _: () = r.del(format!("{p}merkle:node")).await.unwrap();

        let e = node.start().await;
        assert!(
            e.is_merkle_synced().await.unwrap(),
            "{backend:?}: mirror repaired: {:?}",
            e.merkle_roots().await
        );
        for i in 0..299 {
            let (m, c) = redis_item(&mut r, &format!("{p}item:k.{i:03}")).await;
            assert_eq!(c, format!("v{i}").into_bytes(), "{backend:?}: k.{i:03} repaired");
            assert_ne!(
                m.split('\n').next(),
                Some("1"),
                "{backend:?}: k.{i:03} has its version back"
            );
        }
        let (m, _) = redis_item(&mut r, &format!("{p}item:k.299")).await;
        assert_eq!(m.split('\n').nth(2), Some("1"), "the tombstone is back in Redis");
        assert!(
            !r.exists::<_, bool>(format!("{p}item:stray")).await.unwrap(),
            "malformed stray key removed"
        );
        e.shutdown().await;
    }
}

#[tokio::test]
async fn a_corrupt_redis_entry_is_read_from_l3_and_repaired() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "a").await;
        let p = node.redis_prefix();
        let mut r = redis_conn().await;
        e_scenario(&node, &p, &mut r, backend).await;
    }
}

async fn e_scenario(node: &TestNode, p: &str, r: &mut redis::aio::MultiplexedConnection, backend: common::Backend) {
    let e = node.start().await;
    e.submit(SyncItem::new("x", &b"good"[..])).await.unwrap();
    e.shutdown().await;
    // A fresh engine (empty L1); the key goes bad while it runs.
    let e = SyncEngine::with_config(node.config.clone());
    e.start().await.unwrap();
    let (m, _) = redis_item(r, &format!("{p}item:x")).await;
    set_redis_item(r, &format!("{p}item:x"), &m, b"evil").await;
    let got = e.get("x").await.unwrap().unwrap();
    assert_eq!(&got.content[..], b"good", "{backend:?}");
    assert_eq!(e.metrics().corruption_detected.load(Ordering::Relaxed), 1);
    let (_, c) = redis_item(r, &format!("{p}item:x")).await;
    assert_eq!(c, b"good", "{backend:?}: repaired in Redis");
    e.shutdown().await;
}

/// Issue 12's engine defects: `set_state` keeps an item's routing, `get_many`
/// reads Redis (cache-only items) and takes a bad id as absent, and a delete
/// takes a cache-only item out of Redis (key, state set).
#[tokio::test]
async fn set_state_get_many_and_delete_respect_cache_only_items() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "cs").await;
        let p = node.redis_prefix();
        let mut r = redis_conn().await;
        let e = node.start().await;
        e.submit_with(
            SyncItem::new("co", &b"C"[..]).with_state("s1"),
            SubmitOptions::cache(CacheTtl::Minute),
        )
        .await
        .unwrap();
        e.submit_with(SyncItem::new("du", &b"D"[..]), SubmitOptions::durable())
            .await
            .unwrap();
        e.submit(SyncItem::new("mi", &b"M"[..])).await.unwrap();
        // A read puts the cache-only item in L1 too.
        assert!(e.get("co").await.unwrap().is_some());

        // set_state keeps the routing of each.
        assert!(e.set_state("co", "s2").await.unwrap());
        assert!(
            matches!(e.status("co").await.unwrap(), ItemStatus::Synced { in_l3: false, .. }),
            "{backend:?}: a cache-only item went to L3"
        );
        let ttl: i64 = r.ttl(format!("{p}item:co")).await.unwrap();
        assert!((1..=60).contains(&ttl), "{backend:?}: ttl {ttl}");
        let s1: Vec<String> = r.smembers(format!("{p}state:s1")).await.unwrap();
        let s2: Vec<String> = r.smembers(format!("{p}state:s2")).await.unwrap();
        assert!(
            !s1.contains(&"co".to_string()) && s2.contains(&"co".to_string()),
            "{s1:?} {s2:?}"
        );
        assert!(e.set_state("du", "s2").await.unwrap());
        assert!(
            !r.exists::<_, bool>(format!("{p}item:du")).await.unwrap(),
            "{backend:?}: durable item in Redis"
        );
        assert!(e.set_state("mi", "s2").await.unwrap());
        assert_eq!(r.ttl::<_, i64>(format!("{p}item:mi")).await.unwrap(), -1);

        // get_many: Redis-only items are found; a bad id is None, not an error.
        // The engine again, on the same stores: nothing in its L1.
        e.shutdown().await;
        let e2 = node.start().await;
        let got = e2.get_many(&["co", "du", "", "nope"]).await.unwrap();
        assert_eq!(got[0].as_ref().map(|i| &i.content[..]), Some(&b"C"[..]), "{backend:?}");
        assert_eq!(got[1].as_ref().map(|i| &i.content[..]), Some(&b"D"[..]));
        assert!(got[2].is_none() && got[3].is_none());

        // A delete of a cache-only item removes it from Redis.
        assert!(e2.get("co").await.unwrap().is_some());
        let (deleted, _) = e2.delete_receipt("co").await.unwrap();
        assert_eq!(deleted, Some(true), "{backend:?}");
        assert!(e2.get("co").await.unwrap().is_none());
        let s2: Vec<String> = r.smembers(format!("{p}state:s2")).await.unwrap();
        assert!(!s2.contains(&"co".to_string()), "{backend:?}: {s2:?}");
        e2.shutdown().await;
    }
}

#[tokio::test]
async fn media_types_are_kept_in_every_tier_and_old_tables_gain_the_column() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "mt").await;
        let p = node.redis_prefix();
        let mut r = redis_conn().await;
        // A database from a release before migrations and media types: the
        // migrations take it as it is and add the column.
        node.start().await.shutdown().await;
        node.l3_ddl("ALTER TABLE sync_items DROP COLUMN media_type").await;
        node.l3_ddl("DROP TABLE _sqlx_migrations").await;
        let e = node.start().await;
        let md = "text/markdown; charset=utf-8";
        e.submit(SyncItem::new("doc", &b"# t"[..]).with_media_type(md))
            .await
            .unwrap();
        e.submit(SyncItem::new("plain", &b"x"[..])).await.unwrap();
        let bad = e
            .submit(SyncItem::new("bad", &b"x"[..]).with_media_type("text/\nplain"))
            .await;
        assert!(bad.is_err(), "{backend:?}: {bad:?}");
        let (meta, _) = redis_item(&mut r, &format!("{p}item:doc")).await;
        assert_eq!(meta.lines().last(), Some(md), "{backend:?}: {meta:?}");
        e.shutdown().await;

        // From Redis (L1 is empty in a new engine), not from L3.
        let e = node.start().await;
        let l2_reads = e.metrics().reads_l2.load(Ordering::Relaxed);
        let got = e.get_many(&["doc", "plain"]).await.unwrap();
        assert_eq!(
            e.metrics().reads_l2.load(Ordering::Relaxed),
            l2_reads + 2,
            "{backend:?}"
        );
        assert_eq!(got[0].as_ref().unwrap().media_type.as_deref(), Some(md), "{backend:?}");
        assert_eq!(got[1].as_ref().unwrap().media_type, None);
        e.shutdown().await;
        // From L3, with the Redis copy gone.
        let _: () = r.del(format!("{p}item:doc")).await.unwrap();
        let e = node.start().await;
        assert_eq!(
            e.get("doc").await.unwrap().unwrap().media_type.as_deref(),
            Some(md),
            "{backend:?}"
        );
        // A state change keeps it.
        assert!(e.set_state("doc", "s2").await.unwrap());
        e.shutdown().await;
        let e = node.start().await;
        let doc = e.get("doc").await.unwrap().unwrap();
        assert_eq!(
            (doc.media_type.as_deref(), doc.state.as_str()),
            (Some(md), "s2"),
            "{backend:?}"
        );
        e.shutdown().await;
    }
}

/// Keys in the hash layout of releases before the string layout (fields `m`
/// and `c`) are still read: by `get`, by `status` and by the start's resync,
/// which keeps them (a mirrored one counts in the mirror, a cache-only one
/// stays). The next write replaces such a key with a string.
#[tokio::test]
async fn keys_in_the_old_hash_layout_are_still_read() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "a").await;
        let p = node.redis_prefix();
        let mut r = redis_conn().await;
        let e = node.start().await;
        e.submit(SyncItem::new("mirrored", &b"M"[..])).await.unwrap();
        e.submit_with(SyncItem::new("cached", &b"C"[..]), SubmitOptions::cache(CacheTtl::Hour))
            .await
            .unwrap();
        e.shutdown().await;
        for id in ["mirrored", "cached"] {
            let key = format!("{p}item:{id}");
            let ttl: i64 = r.ttl(&key).await.unwrap();
            let (m, c) = redis_item(&mut r, &key).await;
            let _: () = r.del(&key).await.unwrap();
            let _: () = r
                .hset_multiple(&key, &[("m", m.as_bytes()), ("c", &c[..])])
                .await
                .unwrap();
            if ttl > 0 {
                let _: () = r.expire(&key, ttl).await.unwrap();
            }
        }

        let e = node.start().await;
        assert!(
            e.is_merkle_synced().await.unwrap(),
            "{backend:?}: the old key counts in the mirror: {:?}",
            e.merkle_roots().await
        );
        let l2_reads = e.metrics().reads_l2.load(Ordering::Relaxed);
        assert_eq!(&e.get("mirrored").await.unwrap().unwrap().content[..], b"M");
        assert_eq!(&e.get("cached").await.unwrap().unwrap().content[..], b"C");
        assert_eq!(
            e.metrics().reads_l2.load(Ordering::Relaxed),
            l2_reads + 2,
            "{backend:?}: both read from Redis"
        );
        assert!(matches!(
            e.status("cached").await.unwrap(),
            ItemStatus::Synced {
                in_l2: true,
                in_l3: false,
                ..
            }
        ));
        let kind: String = redis::cmd("TYPE")
            .arg(format!("{p}item:cached"))
            .query_async(&mut r)
            .await
            .unwrap();
        assert_eq!(kind, "hash", "{backend:?}: kept by the resync");
        let kind: String = redis::cmd("TYPE")
            .arg(format!("{p}item:mirrored"))
            .query_async(&mut r)
            .await
            .unwrap();
        assert_eq!(kind, "hash", "{backend:?}: kept by the resync, not rewritten");
        e.submit_with(
            SyncItem::new("cached", &b"C2"[..]),
            SubmitOptions::cache(CacheTtl::Hour),
        )
        .await
        .unwrap();
        let (_, c) = redis_item(&mut r, &format!("{p}item:cached")).await;
        assert_eq!(c, b"C2", "{backend:?}: rewritten as a string");
        e.shutdown().await;
    }
}
