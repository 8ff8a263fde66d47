//! Gossip: roots announcements on `syncnode/{cluster}/roots/1` and CDC deltas
//! on `syncnode/{cluster}/cdc/1` (gossipsub, strict signing). Every message
//! is an `Envelope` naming the cluster and is validated before gossipsub may
//! forward it: size, version, cluster, a body that fits its topic, and an
//! inlined item that matches its entry.
//!
//! On receipt of a delta (DESIGN §5.3): `definitely_missing` → apply at once;
//! `is_current` → drop; otherwise apply only if newer (LWW); a delta without
//! its content (too large to inline) is fetched from its author.

use libp2p::gossipsub::{IdentTopic, TopicHash};
use syncnode_protocol::wire::{Body, CdcDelta, Envelope, RootsAnnouncement};

use super::anti_entropy::{from_wire, wire_item};
use crate::engine::{StorageError, SyncEngine, SyncItem};

/// Largest content inlined in a delta; larger items are fetched.
pub const CDC_INLINE_MAX: usize = 32 * 1024;
/// Largest gossip message.
pub const GOSSIP_MAX: usize = 64 * 1024;
/// Deltas are packed into messages of about this size (a single delta with
/// 32 KiB of content and the longest id and origin still fits `GOSSIP_MAX`).
const PACK_BYTES: usize = 24 * 1024;
/// Most deltas in one message.
pub const MAX_DELTAS: usize = 1024;

pub fn roots_topic(cluster: &str) -> IdentTopic {
    IdentTopic::new(format!("syncnode/{cluster}/roots/1"))
}

pub fn cdc_topic(cluster: &str) -> IdentTopic {
    IdentTopic::new(format!("syncnode/{cluster}/cdc/1"))
}

/// A validated gossip message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gossip {
    Roots(RootsAnnouncement),
    Cdc(Vec<CdcDelta>),
}

/// Decodes and validates one gossip message of `cluster` received on `topic`.
pub fn decode(cluster: &str, topic: &TopicHash, data: &[u8]) -> Result<Gossip, String> {
    let env = Envelope::decode_for(data, GOSSIP_MAX, cluster).map_err(|e| e.to_string())?;
    match env.body {
        Body::Roots(r) if *topic == roots_topic(cluster).hash() => Ok(Gossip::Roots(r)),
        Body::Cdc(ds) if *topic == cdc_topic(cluster).hash() => {
            if ds.is_empty() || ds.len() > MAX_DELTAS {
                return Err(format!("{} deltas in one message (1..={MAX_DELTAS})", ds.len()));
            }
            for d in &ds {
                crate::engine::item::validate_id(&d.entry.id).map_err(|e| e.to_string())?;
                if d.entry.origin.is_empty() || d.entry.origin.len() > crate::engine::item::MAX_ORIGIN_BYTES {
                    return Err("delta origin is empty or too long".into());
                }
                if let Some(item) = &d.item {
                    if item.entry != d.entry {
                        return Err("delta item does not match its entry".into());
                    }
                    if item.content.len() > CDC_INLINE_MAX {
                        return Err("delta content past the inline limit".into());
                    }
                }
            }
            Ok(Gossip::Cdc(ds))
        }
        _ => Err("message body does not belong on this topic".into()),
    }
}

/// The encoded roots announcement.
pub fn encode_roots(cluster: &str, roots: RootsAnnouncement) -> Vec<u8> {
    Envelope::new(cluster, Body::Roots(roots)).encode()
}

/// The encoded deltas of committed items (content inlined when small),
/// packed several to a message up to about `PACK_BYTES`.
pub fn encode_deltas(cluster: &str, items: &[SyncItem]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let (mut pack, mut bytes) = (Vec::new(), 0);
    for item in items {
        let w = wire_item(item);
        let inline = item.content.len() <= CDC_INLINE_MAX;
        let size = 128
            + 2 * w.entry.id.len()
            + 2 * w.entry.origin.len()
            + w.state.len()
            + if inline { w.content.len() } else { 0 };
        if !pack.is_empty() && (bytes + size > PACK_BYTES || pack.len() >= MAX_DELTAS) {
            out.push(Envelope::new(cluster, Body::Cdc(std::mem::take(&mut pack))).encode());
            bytes = 0;
        }
        bytes += size;
        pack.push(CdcDelta {
            entry: w.entry.clone(),
            item: inline.then_some(w),
        });
    }
    if !pack.is_empty() {
        out.push(Envelope::new(cluster, Body::Cdc(pack)).encode());
    }
    out
}

/// What became of a batch of received deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdcOutcome {
    pub applied: u64,
    /// Held already, older than ours, or refused (anti-entropy will offer
    /// again what was refused for a passing reason such as clock skew).
    pub dropped: u64,
    /// Newer than ours but without content: to fetch from the author.
    pub fetch: Vec<String>,
}

impl SyncEngine {
    /// Whether we hold this delta's version or a newer one (DESIGN §5.3:
    /// `definitely_missing` → no; `is_current` → yes; else by LWW).
    async fn held_already(&self, delta: &CdcDelta) -> Result<bool, StorageError> {
        let e = &delta.entry;
        if self.definitely_missing(&e.id) {
            return Ok(false);
        }
        let hash = hex::encode(e.content_hash);
        if !e.tombstone && self.is_current(&e.id, &hash).await? {
            return Ok(true);
        }
        // With content, LWW is decided in the batch apply; without, before fetching.
        Ok(delta.item.is_none()
            && self
                .current_entry(&e.id)
                .await?
                .is_some_and(|cur| !syncnode_protocol::Stamp::new(e.version, &e.origin, &hash).wins_over(&cur.stamp())))
    }

    /// Applies deltas received by gossip, the ones that carry content in one
    /// commit.
    pub async fn receive_cdc(&self, deltas: Vec<CdcDelta>) -> Result<CdcOutcome, StorageError> {
        let mut out = CdcOutcome::default();
        let mut items = Vec::new();
        for delta in deltas {
            // A lookup that fails drops this delta only.
            match self.held_already(&delta).await {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    out.dropped += 1;
                    continue;
                }
            }
            match delta.item {
                Some(item) => items.push(item),
                None => out.fetch.push(delta.entry.id),
            }
        }
        if !items.is_empty() {
            for r in self
                .apply_remote_many(items.into_iter().map(from_wire).collect())
                .await?
            {
                match r {
                    Ok(true) => out.applied += 1,
                    _ => out.dropped += 1,
                }
            }
        }
        Ok(out)
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
            for m in encode_deltas("c", &items) {
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
