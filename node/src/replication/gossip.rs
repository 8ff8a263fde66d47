//! Received deltas and the gossipsub topics. Deltas reach a node along the
//! core's relay tree (`Request::Cdc`) or, from a node of the previous
//! release, on the gossipsub topics `syncnode/{cluster}/roots/1` and
//! `syncnode/{cluster}/cdc/1` (still subscribed, strict signing, no longer
//! published to). Either way they are checked here before the core sees
//! them: a count within bounds, valid ids and origins, inlined items that
//! match their entries; gossip also by size, version, cluster and topic.
//!
//! On receipt of a delta (DESIGN §5.3): `definitely_missing` → apply at once;
//! `is_current` → drop; otherwise apply only if newer (LWW); a delta without
//! its content (too large to inline) is fetched from its writer.

use libp2p::gossipsub::{IdentTopic, TopicHash};
use syncnode_protocol::replica::cdc;
use syncnode_protocol::wire::{Body, CdcDelta, Envelope};

pub use syncnode_protocol::replica::cdc::{CDC_INLINE_MAX, GOSSIP_MAX, MAX_DELTAS};
pub use syncnode_protocol::replica::{CdcOutcome, Gossip};

use crate::engine::{StorageError, SyncEngine};

pub fn roots_topic(cluster: &str) -> IdentTopic {
    IdentTopic::new(format!("syncnode/{cluster}/roots/1"))
}

pub fn cdc_topic(cluster: &str) -> IdentTopic {
    IdentTopic::new(format!("syncnode/{cluster}/cdc/1"))
}

/// Decodes and validates one gossip message of `cluster` received on `topic`.
pub fn decode(cluster: &str, topic: &TopicHash, data: &[u8]) -> Result<Gossip, String> {
    let env = Envelope::decode_for(data, GOSSIP_MAX, cluster).map_err(|e| e.to_string())?;
    match env.body {
        Body::Roots(r) if *topic == roots_topic(cluster).hash() => Ok(Gossip::Roots(r)),
        Body::Cdc(ds) if *topic == cdc_topic(cluster).hash() => {
            check_deltas(&ds)?;
            Ok(Gossip::Cdc(ds))
        }
        _ => Err("message body does not belong on this topic".into()),
    }
}

/// Checks deltas a peer sent (gossip, or passed along the relay tree):
/// a count within bounds, valid ids and origins, inlined items that match
/// their entries.
pub fn check_deltas(ds: &[CdcDelta]) -> Result<(), String> {
    cdc::check(
        ds,
        |id| crate::engine::item::validate_id(id).map_err(|e| e.to_string()),
        |origin| {
            if origin.is_empty() || origin.len() > crate::engine::item::MAX_ORIGIN_BYTES {
                Err("delta origin is empty or too long".into())
            } else {
                Ok(())
            }
        },
    )
}

impl SyncEngine {
    /// Applies deltas received by gossip (the core's rule: the ones that
    /// carry content in one commit; the others listed to fetch).
    pub async fn receive_cdc(&self, deltas: Vec<CdcDelta>) -> Result<CdcOutcome, StorageError> {
        syncnode_protocol::replica::store::receive_cdc(self, deltas).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SyncItem;
    use syncnode_protocol::wire::{Entry, WireItem};

    fn delta(content: Vec<u8>, matching: bool) -> CdcDelta {
        let entry = Entry {
            id: "a".into(),
            version: 5,
            origin: "n".into(),
            tombstone: false,
            content_hash: [1; 32],
        };
        let mut item_entry = entry.clone();
        if !matching {
            item_entry.version = 6;
        }
        CdcDelta {
            entry,
            item: Some(WireItem {
                entry: item_entry,
                updated_at: 1,
                state: "default".into(),
                json: false,
                content,
                media_type: None,
            }),
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            let _ = decode("c", &cdc_topic("c").hash(), &data);
            let _ = decode("c", &roots_topic("c").hash(), &data);
        }

        #[test]
        fn packed_deltas_fit_and_decode_back(sizes in proptest::collection::vec(0usize..40_000, 1..40)) {
            let items: Vec<SyncItem> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let mut it = SyncItem::new(format!("id.{i}"), vec![7u8; *n]);
                    it.version = 1 + i as u64;
                    it.origin = "origin".into();
                    it
                })
                .collect();
            let mut seen = 0;
            let wire: Vec<_> = items.iter().map(crate::replication::anti_entropy::wire_item).collect();
            for group in cdc::pack(wire) {
                let m = Envelope::new("c", Body::Cdc(group)).encode();
                proptest::prop_assert!(m.len() <= GOSSIP_MAX, "{} bytes", m.len());
                match decode("c", &cdc_topic("c").hash(), &m) {
                    Ok(Gossip::Cdc(ds)) => {
                        for d in ds {
                            proptest::prop_assert_eq!(&d.entry.id, &items[seen].object_id);
                            proptest::prop_assert_eq!(d.item.is_some(), sizes[seen] <= CDC_INLINE_MAX);
                            seen += 1;
                        }
                    }
                    other => proptest::prop_assert!(false, "{:?}", other.map(|_| ())),
                }
            }
            proptest::prop_assert_eq!(seen, items.len());
        }
    }

    #[test]
    fn gossip_is_checked_against_topic_cluster_and_entry() {
        let cdc = cdc_topic("c").hash();
        let roots = roots_topic("c").hash();
        let ok = Envelope::new("c", Body::Cdc(vec![delta(vec![1, 2], true)])).encode();
        assert!(matches!(decode("c", &cdc, &ok), Ok(Gossip::Cdc(_))));
        assert!(decode("c", &roots, &ok).is_err(), "a delta on the roots topic");
        assert!(decode("other", &cdc, &ok).is_err(), "another cluster");
        let bad = Envelope::new("c", Body::Cdc(vec![delta(vec![1, 2], true), delta(vec![1], false)])).encode();
        assert!(decode("c", &cdc, &bad).is_err(), "item and entry disagree");
        let big = Envelope::new("c", Body::Cdc(vec![delta(vec![0; CDC_INLINE_MAX + 1], true)])).encode();
        let none = Envelope::new("c", Body::Cdc(vec![])).encode();
        assert!(decode("c", &cdc, &none).is_err(), "no deltas");
        assert!(decode("c", &cdc, &big).is_err(), "content past the inline limit");
        assert!(decode("c", &cdc, &[1, 2, 3]).is_err(), "garbage");
        assert!(decode("c", &cdc, &vec![0; GOSSIP_MAX + 1]).is_err(), "oversized");
    }
}
