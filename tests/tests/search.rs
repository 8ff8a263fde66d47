//! Search: the hot tier (RediSearch) and the cold tier (SQL over JSON) give the
//! same ids for every query shape, over 10k generated users, on SQLite and on
//! MariaDB, for an index created before the data and one created after it.
//! Plus the result cache, escaping of hostile values, and typed errors.

mod common;

use common::{BACKENDS, TestNode};
use rand::{RngExt, SeedableRng};
use syncnode::{Query, SearchIndex, SearchSource, SearchTier, StorageError, SyncEngine, SyncItem};

const FIRST: &[&str] = &[
    "ann", "anna", "bob", "carla", "dan", "eve", "frank", "gina", "hugo", "ida", "john", "joan", "jon", "kim", "lena",
];
const LAST: &[&str] = &[
    "smith",
    "smyth",
    "brown",
    "o'brien-smith",
    "jones",
    "müller",
    "lee",
    "garcia",
    "nguyen",
    "ivanova",
];
const ROLES: &[&str] = &["admin", "dev", "ops", "sales", "support", "data science"];

fn users(n: usize) -> Vec<SyncItem> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n)
        .map(|i| {
            let first = FIRST[rng.random_range(0..FIRST.len())];
            let last = LAST[rng.random_range(0..LAST.len())];
            let mut doc = serde_json::json!({
                "name": format!("{} {last}", if i % 7 == 0 { first.to_uppercase() } else { first.to_string() }),
                "age": rng.random_range(18..90),
            });
            let roles: Vec<&str> = ROLES.iter().copied().filter(|_| rng.random_range(0..3) == 0).collect();
            match i % 11 {
                0 => {} // no roles
                1 => doc["roles"] = serde_json::json!(roles.first().copied().unwrap_or("ops")),
                _ => doc["roles"] = serde_json::json!(roles),
            }
            match i % 13 {
                0 => {
                    doc.as_object_mut().unwrap().remove("age");
                }
                1 => doc["age"] = serde_json::json!("old"),
                2 => doc["age"] = serde_json::json!(40.5),
                _ => {}
            }
            SyncItem::from_json(format!("user.{i:05}"), doc)
        })
        .collect()
}

fn index(name: &str) -> SearchIndex {
    SearchIndex::new(name, "user.")
        .text_sortable("name")
        .numeric_sortable("age")
        .tag("roles")
}

fn queries() -> Vec<Query> {
    vec![
        Query::All,
        Query::field_eq("name", "ann"),
        Query::field_eq("name", "Ann Smith"),
        Query::field_eq("name", "brien smith"),
        Query::field_eq("age", 30i64),
        Query::field_eq("age", 40.5),
        Query::numeric_range("age", Some(20.0), Some(30.0)),
        Query::numeric_range("age", None, Some(25.0)),
        Query::numeric_range("age", Some(85.0), None),
        Query::tags("roles", vec!["admin".into(), "dev".into()]),
        Query::tags("roles", vec!["Data Science".into()]),
        Query::field_eq("roles", "ops"),
        Query::text_search("name", "smith"),
        Query::text_search("name", "smith ann"),
        Query::text_search("name", "müller"),
        Query::prefix("name", "jo"),
        Query::prefix("name", "iva"),
        Query::fuzzy("name", "smith"),
        Query::fuzzy("name", "jonn"),
        Query::field_eq("name", "ann").and(Query::numeric_range("age", Some(30.0), Some(60.0))),
        Query::tags("roles", vec!["sales".into()]).or(Query::prefix("name", "ev")),
        Query::tags("roles", vec!["admin".into()]).negate(),
        Query::numeric_range("age", Some(18.0), Some(50.0)).negate(),
        Query::text_search("name", "smith")
            .and(Query::tags("roles", vec!["dev".into()]).negate())
            .and(Query::numeric_range("age", Some(30.0), None).or(Query::field_eq("name", "kim"))),
    ]
}

async fn ids(e: &SyncEngine, idx: &str, q: &Query, tier: SearchTier) -> Vec<String> {
    e.search_with_options(idx, q, tier, 10_000)
        .await
        .unwrap_or_else(|err| panic!("{q:?} on {tier:?}: {err}"))
        .ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_and_cold_tiers_agree_on_every_query_shape() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "s").await;
        let e = node.start().await;
        e.create_search_index(index("before")).await.unwrap();
        for chunk in users(10_000).chunks(1000) {
            e.submit_many(chunk.to_vec()).await.unwrap();
        }
        // Things that must not be indexed: non-JSON content, a deleted user,
        // an item outside the prefix.
        e.submit(SyncItem::new("user.binary", &b"\x00\x01 ann smith"[..]))
            .await
            .unwrap();
        e.delete("user.00003").await.unwrap();
        e.submit(SyncItem::from_json("other.1", serde_json::json!({"name": "ann"})))
            .await
            .unwrap();
        e.create_search_index(index("after")).await.unwrap();

        let mut nonempty = 0;
        for q in queries() {
            let hot = ids(&e, "before", &q, SearchTier::RedisOnly).await;
            let cold = ids(&e, "before", &q, SearchTier::SqlOnly).await;
            assert_eq!(hot, cold, "{backend:?}: {q:?}");
            let backfilled = ids(&e, "after", &q, SearchTier::RedisOnly).await;
            assert_eq!(backfilled, hot, "{backend:?}: index created after the data: {q:?}");
            assert!(!hot.contains(&"user.00003".to_string()) && !hot.contains(&"user.binary".to_string()));
            nonempty += usize::from(!hot.is_empty());
        }
        assert!(
            nonempty >= queries().len() - 1,
            "the queries exercise real matches ({nonempty})"
        );
        // A figure checked by hand: the numeric range equals a count over the data.
        let expected = users(10_000)
            .iter()
            .filter(|u| u.object_id != "user.00003")
            .filter(|u| {
                u.content_as_json().unwrap()["age"]
                    .as_f64()
                    .is_some_and(|a| (20.0..=30.0).contains(&a))
            })
            .count();
        assert_eq!(
            ids(
                &e,
                "before",
                &Query::numeric_range("age", Some(20.0), Some(30.0)),
                SearchTier::RedisOnly
            )
            .await
            .len(),
            expected
        );
        let all = ids(&e, "before", &Query::All, SearchTier::SqlOnly).await;
        assert_eq!(all.len(), 9_999);
        e.shutdown().await;
    }
}

#[tokio::test]
async fn results_are_cached_until_a_write_under_the_prefix() {
    let node = TestNode::with_redis(common::Backend::Sqlite, "c").await;
    let e = node.start().await;
    e.create_search_index(index("users")).await.unwrap();
    e.submit_many(users(200)).await.unwrap();
    let q = Query::prefix("name", "jo");
    let first = e.search("users", &q).await.unwrap();
    assert_eq!(first.source, SearchSource::Hot);
    let second = e.search("users", &q).await.unwrap();
    assert_eq!((second.source, second.cached), (SearchSource::Cache, true));
    assert_eq!(second.ids, first.ids);
    // A write outside the prefix keeps the entry; one under it invalidates it.
    e.submit(SyncItem::from_json("zzz", serde_json::json!({"name": "jo"})))
        .await
        .unwrap();
    assert_eq!(e.search("users", &q).await.unwrap().source, SearchSource::Cache);
    e.submit(SyncItem::from_json("user.new", serde_json::json!({"name": "Joe New"})))
        .await
        .unwrap();
    let third = e.search("users", &q).await.unwrap();
    assert!(!third.cached);
    assert!(third.ids.contains(&"user.new".to_string()));
    let stats = e.search_cache_stats();
    assert_eq!((stats.hits, stats.stale), (2, 1), "{stats:?}");
    assert!(stats.hit_rate > 0.0);
    // Items come back with the ids.
    assert_eq!(third.items.len(), third.ids.len());
    e.shutdown().await;
}

#[tokio::test]
async fn hostile_values_are_escaped_and_bad_requests_are_typed_errors() {
    for backend in BACKENDS {
        let node = TestNode::with_redis(backend, "h").await;
        let e = node.start().await;
        e.create_search_index(index("users")).await.unwrap();
        e.submit_many(users(300)).await.unwrap();
        e.submit(SyncItem::from_json(
            "user.x1",
            serde_json::json!({"name": "Zoë \"Q\" {x}|y", "roles": ["a b", "c|d}", "@x", "-y*", "é"]}),
        ))
        .await
        .unwrap();
        let hostile = [
            "\"",
            "'",
            "@name:ann",
            "}|{",
            "a-b",
            "*",
            "x y",
            "ünï",
            "zoë",
            "%ann%",
            "\\",
            "(ann|bob)",
            "a b",
            "c|d}",
            "@x",
            "-y*",
        ];
        for v in hostile {
            let qs = [
                Query::text_search("name", v),
                Query::field_eq("name", v),
                Query::tags("roles", vec![v.to_string()]),
                Query::prefix("name", v),
                Query::fuzzy("name", v),
            ];
            for q in qs {
                let hot = e.search_with_options("users", &q, SearchTier::RedisOnly, 1000).await;
                let cold = e.search_with_options("users", &q, SearchTier::SqlOnly, 1000).await;
                match (hot, cold) {
                    (Ok(h), Ok(c)) => assert_eq!(h.ids, c.ids, "{backend:?}: {q:?}"),
                    (Err(StorageError::InvalidInput(_)), Err(StorageError::InvalidInput(_))) => {}
                    other => panic!("{backend:?}: {q:?} gave {other:?}"),
                }
            }
        }
        let tagged = e
            .search_with_options(
                "users",
                &Query::tags("roles", vec!["c|d}".into()]),
                SearchTier::RedisOnly,
                10,
            )
            .await
            .unwrap();
        assert_eq!(
            tagged.ids,
            vec!["user.x1".to_string()],
            "{backend:?}: a tag with | and }} matches exactly"
        );
        let zoe = e
            .search_with_options("users", &Query::field_eq("name", "zoë q"), SearchTier::RedisOnly, 10)
            .await
            .unwrap();
        assert_eq!(zoe.ids, vec!["user.x1".to_string()]);

        // Typed errors.
        assert!(matches!(
            e.search("nope", &Query::All).await,
            Err(StorageError::UnknownIndex(_))
        ));
        assert!(matches!(
            e.search("users", &Query::field_eq("name", 3i64)).await,
            Err(StorageError::InvalidInput(_))
        ));
        assert!(matches!(
            e.search("users", &Query::text_search("age", "x")).await,
            Err(StorageError::InvalidInput(_))
        ));
        assert!(matches!(
            e.search("users", &Query::field_eq("missing", "x")).await,
            Err(StorageError::InvalidInput(_))
        ));
        for bad in [
            SearchIndex::new("bad name", "p").text("a"),
            SearchIndex::new("i", "p").text("a\"b"),
            SearchIndex::new("i", "p").tag("@x"),
        ] {
            assert!(matches!(
                e.create_search_index(bad).await,
                Err(StorageError::InvalidInput(_))
            ));
        }
        assert!(matches!(
            e.search_raw("users", "@name:(", 10).await,
            Err(StorageError::Backend(_))
        ));
        assert!(!e.search_raw("users", "@roles:{admin}", 10).await.unwrap().is_empty());
        assert!(
            !e.search_sql("users", &Query::tags("roles", vec!["admin".into()]), 10)
                .await
                .unwrap()
                .is_empty()
        );
        e.drop_search_index("users").await.unwrap();
        assert!(matches!(
            e.search("users", &Query::All).await,
            Err(StorageError::UnknownIndex(_))
        ));
        assert!(matches!(
            e.drop_search_index("users").await,
            Err(StorageError::UnknownIndex(_))
        ));
        e.shutdown().await;
    }
}

#[tokio::test]
async fn indexes_survive_a_restart() {
    let node = TestNode::with_redis(common::Backend::Sqlite, "r").await;
    let e = node.start().await;
    e.create_search_index(index("users")).await.unwrap();
    e.submit_many(users(100)).await.unwrap();
    let before = ids(&e, "users", &Query::prefix("name", "jo"), SearchTier::RedisOnly).await;
    e.shutdown().await;
    let e = node.start().await;
    assert_eq!(e.search_indexes().len(), 1);
    assert_eq!(
        ids(&e, "users", &Query::prefix("name", "jo"), SearchTier::RedisOnly).await,
        before
    );
    e.shutdown().await;
}

/// Pages of a search, from `after` on: both tiers give the same ids in the
/// same pages, and all of them once.
#[tokio::test]
async fn searches_page_with_a_cursor_on_both_tiers() {
    let node = TestNode::with_redis(common::Backend::Sqlite, "pg").await;
    let e = node.start().await;
    e.create_search_index(index("users")).await.unwrap();
    e.submit_many(users(300)).await.unwrap();
    let q = Query::prefix("name", "jo");
    let all = ids(&e, "users", &q, SearchTier::SqlOnly).await;
    assert!(all.len() > 20, "{}", all.len());
    for tier in [SearchTier::RedisOnly, SearchTier::SqlOnly] {
        let (mut seen, mut after) = (Vec::new(), None::<String>);
        for pages in 0.. {
            assert!(pages < 1000, "{tier:?}: the cursor does not move");
            let page = e.search_page("users", &q, tier, 7, after.as_deref()).await.unwrap().ids;
            seen.extend(page.iter().cloned());
            if page.len() < 7 {
                break;
            }
            after = page.last().cloned();
        }
        assert_eq!(seen, all, "{tier:?}");
    }
    e.shutdown().await;
}
