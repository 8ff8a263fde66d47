//! `EntryMeta`: what the Merkle tree, the LWW rule and the L2 mirror need of
//! a stored version, without its content. Both stores produce it.

use super::item::SyncItem;
use super::options::L2Route;

/// What the Merkle tree and the LWW rule need of a stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub id: String,
    pub version: u64,
    pub origin: String,
    pub tombstone: bool,
    /// Lowercase hex.
    pub content_hash: String,
    pub state: String,
    /// Mirrored in Redis (`L2Route::Mirror`).
    pub l2: bool,
}

impl EntryMeta {
    pub fn of(item: &SyncItem) -> Self {
        Self {
            id: item.object_id.clone(),
            version: item.version,
            origin: item.origin.clone(),
            tombstone: item.tombstone,
            content_hash: item.content_hash.clone(),
            state: item.state.clone(),
            l2: item.route == L2Route::Mirror,
        }
    }

    pub fn stamp(&self) -> syncnode_protocol::Stamp<'_> {
        syncnode_protocol::Stamp::new(self.version, &self.origin, &self.content_hash)
    }

    pub fn digest(&self) -> syncnode_protocol::EntryDigest {
        let h = super::item::hash_bytes(&self.content_hash);
        syncnode_protocol::EntryDigest::new(&self.id, self.version, &self.origin, self.tombstone, &h)
    }
}
