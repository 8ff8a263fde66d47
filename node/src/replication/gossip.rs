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
/// Largest gossip message (a delta with inlined content and a long id).
pub const GOSSIP_MAX: usize = 64 * 1024;

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
    Cdc(CdcDelta),
}

/// Decodes and validates one gossip message of `cluster` received on `topic`.
pub fn decode(cluster: &str, topic: &TopicHash, data: &[u8]) -> Result<Gossip, String> {
    let env = Envelope::decode_for(data, GOSSIP_MAX, cluster).map_err(|e| e.to_string())?;
    match env.body {
        Body::Roots(r) if *topic == roots_topic(cluster).hash() => Ok(Gossip::Roots(r)),
        Body::Cdc(d) if *topic == cdc_topic(cluster).hash() => {
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
            Ok(Gossip::Cdc(d))
        }
        _ => Err("message body does not belong on this topic".into()),
    }
}

/// The encoded roots announcement.
pub fn encode_roots(cluster: &str, roots: RootsAnnouncement) -> Vec<u8> {
    Envelope::new(cluster, Body::Roots(roots)).encode()
}

/// The encoded delta of one committed item (content inlined when small).
pub fn encode_delta(cluster: &str, item: &SyncItem) -> Vec<u8> {
    let w = wire_item(item);
    let delta = CdcDelta {
        entry: w.entry.clone(),
        item: (item.content.len() <= CDC_INLINE_MAX).then_some(w),
    };
    Envelope::new(cluster, Body::Cdc(delta)).encode()
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

    #[test]
    fn gossip_is_checked_against_topic_cluster_and_entry() {
        let cdc = cdc_topic("c").hash();
        let roots = roots_topic("c").hash();
        let ok = Envelope::new("c", Body::Cdc(delta(vec![1, 2], true))).encode();
        assert!(matches!(decode("c", &cdc, &ok), Ok(Gossip::Cdc(_))));
        assert!(decode("c", &roots, &ok).is_err(), "a delta on the roots topic");
        assert!(decode("other", &cdc, &ok).is_err(), "another cluster");
        let bad = Envelope::new("c", Body::Cdc(delta(vec![1], false))).encode();
        assert!(decode("c", &cdc, &bad).is_err(), "item and entry disagree");
        let big = Envelope::new("c", Body::Cdc(delta(vec![0; CDC_INLINE_MAX + 1], true))).encode();
        assert!(decode("c", &cdc, &big).is_err(), "content past the inline limit");
        assert!(decode("c", &cdc, &[1, 2, 3]).is_err(), "garbage");
        assert!(decode("c", &cdc, &vec![0; GOSSIP_MAX + 1]).is_err(), "oversized");
    }
}
