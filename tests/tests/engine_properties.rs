//! Property tests through the whole engine: random ids, bytes and JSON either
//! come back exactly or are refused with a typed error; nothing panics, and the
//! Merkle tree always counts exactly the stored ids.

mod common;

use common::{BACKENDS, TestNode};
use proptest::prelude::*;
use syncnode::{StorageError, SyncItem};

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,16}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(".{0,8}", inner, 0..5)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Write {
    Bytes(String, Vec<u8>),
    Json(String, serde_json::Value),
    Delete(String),
}

fn write() -> impl Strategy<Value = Write> {
    // Ids: mostly from a small pool (so overwrites and deletes hit), sometimes arbitrary.
    let id = prop_oneof![3 => "[a-c]{1,2}", 1 => any::<String>(), 1 => proptest::collection::vec(any::<char>(), 500..520).prop_map(|c| c.into_iter().collect())];
    prop_oneof![
        (id.clone(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(i, b)| Write::Bytes(i, b)),
        (id.clone(), json()).prop_map(|(i, j)| Write::Json(i, j)),
        id.prop_map(Write::Delete),
    ]
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 512 && !id.bytes().any(|b| b.is_ascii_control())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn random_writes_round_trip_or_fail_typed(writes in proptest::collection::vec(write(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for backend in BACKENDS { rt.block_on(async {
            let node = TestNode::new(backend, "p").await;
            let mut cfg = node.config.clone();
            cfg.max_payload_bytes = 200;
            let e = syncnode::SyncEngine::with_config(cfg);
            e.start().await.unwrap();
            let mut model: std::collections::BTreeMap<String, Option<Vec<u8>>> = Default::default();
            for w in writes.clone() {
                match w {
                    Write::Bytes(id, bytes) => {
                        let r = e.submit(SyncItem::new(id.clone(), bytes.clone())).await;
                        match (valid_id(&id), bytes.len() <= 200) {
                            (true, true) => { r.unwrap(); model.insert(id, Some(bytes)); }
                            (false, _) => assert!(matches!(r, Err(StorageError::InvalidId(_)))),
                            (true, false) => assert!(matches!(r, Err(StorageError::PayloadTooLarge { .. }))),
                        }
                    }
                    Write::Json(id, v) => {
                        let item = SyncItem::from_json(id.clone(), v.clone());
                        let bytes = item.content.to_vec();
                        let r = e.submit(item).await;
                        if valid_id(&id) && bytes.len() <= 200 {
                            r.unwrap();
                            // Bytes come back exactly (serde_json's own float printing is not
                            // always a round trip, so compare bytes, then parse).
                            let got = e.get(&id).await.unwrap().unwrap();
                            assert_eq!(&got.content[..], &bytes[..]);
                            assert_eq!(got.content_type, syncnode::ContentType::Json);
                            assert!(got.content_as_json().is_some(), "{v}");
                            model.insert(id.clone(), Some(bytes));
                        } else {
                            assert!(r.is_err());
                        }
                    }
                    Write::Delete(id) => {
                        let r = e.delete(&id).await;
                        if valid_id(&id) {
                            let existed = model.get(&id).is_some_and(|v| v.is_some());
                            assert_eq!(r.unwrap(), existed);
                            // A delete always leaves a tombstone (it must beat a version in flight).
                            model.insert(id, None);
                        } else {
                            assert!(matches!(r, Err(StorageError::InvalidId(_))));
                        }
                    }
                }
            }
            e.shutdown().await;
            // After a restart, every id reads back as the model says.
            let e = node.start().await;
            for (id, v) in &model {
                let got = e.get(id).await.unwrap().map(|i| i.content.to_vec());
                assert_eq!(&got, v, "id {id:?}");
            }
            assert_eq!(e.merkle_summary().1, model.len() as u64, "{backend:?}");
            e.shutdown().await;
        }); }
    }
}
