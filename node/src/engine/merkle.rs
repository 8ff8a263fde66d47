//! The engine's view of its Merkle tree (DESIGN §4): node lookups by path and
//! the comparison helpers anti-entropy uses. The tree itself lives in the
//! protocol crate; the applier (`writer`) keeps it in step with L3.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use syncnode_protocol::MerkleTree;

use super::SyncEngine;
use super::entry::EntryMeta;
use super::error::StorageError;
use crate::locks::RwLockUnpoisoned;

/// One tree node: its hash, its non-empty children and how many entries lie below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleNode {
    pub path: String,
    pub hash: [u8; 32],
    pub count: u64,
    pub children: BTreeMap<String, [u8; 32]>,
    /// A bucket: its entries are listed, not descended.
    pub is_leaf: bool,
}

/// The outcome of comparing remote node hashes with ours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleDiff {
    /// Both sides have entries here and the hashes differ.
    pub divergent_paths: Vec<String>,
    /// We have entries here and the remote has none.
    pub local_only: Vec<String>,
    /// The remote has entries here and we have none.
    pub remote_only: Vec<String>,
}

impl MerkleDiff {
    pub fn is_empty(&self) -> bool {
        self.divergent_paths.is_empty() && self.local_only.is_empty() && self.remote_only.is_empty()
    }
}

fn bad_path(e: syncnode_protocol::MerkleError) -> StorageError {
    StorageError::InvalidInput(e.to_string())
}

impl SyncEngine {
    pub(crate) fn with_tree<T>(&self, f: impl FnOnce(&MerkleTree) -> T) -> T {
        let t = self.core.merkle.read_locked();
        f(&t.tree)
    }

    /// The root hash; `None` while the tree is empty.
    pub async fn get_merkle_root(&self) -> Result<Option<[u8; 32]>, StorageError> {
        Ok(self.with_tree(|t| t.root_hash()))
    }

    /// `(root hash, entry count, depth)`.
    pub fn merkle_summary(&self) -> (Option<[u8; 32]>, u64, u8) {
        self.with_tree(|t| (t.root_hash(), t.count(), t.depth()))
    }

    /// The bucket (deepest node) an id falls in.
    pub fn merkle_bucket_of(&self, id: &str) -> String {
        self.with_tree(|t| t.bucket_path(id))
    }

    /// The hash of the node at `path`; `None` when nothing lies below it.
    pub async fn get_merkle_hash(&self, path: &str) -> Result<Option<[u8; 32]>, StorageError> {
        self.with_tree(|t| {
            t.node(path)
                .map(|n| (!n.is_empty()).then(|| n.hash()))
                .map_err(bad_path)
        })
    }

    pub async fn get_merkle_node(&self, path: &str) -> Result<Option<MerkleNode>, StorageError> {
        self.with_tree(|t| {
            let node = t.node(path).map_err(bad_path)?;
            if node.is_empty() {
                return Ok(None);
            }
            let children = t
                .children(path)
                .map_err(bad_path)?
                .into_iter()
                .map(|(p, n)| (p, n.hash()))
                .collect();
            Ok(Some(MerkleNode {
                path: path.to_string(),
                hash: node.hash(),
                count: node.count,
                children,
                is_leaf: path.len() == t.depth() as usize,
            }))
        })
    }

    /// Hashes of the non-empty children of `path`.
    pub async fn get_merkle_children(&self, path: &str) -> Result<BTreeMap<String, [u8; 32]>, StorageError> {
        self.with_tree(|t| {
            Ok(t.children(path)
                .map_err(bad_path)?
                .into_iter()
                .map(|(p, n)| (p, n.hash()))
                .collect())
        })
    }

    /// Compares remote `(path, hash)` pairs with our nodes. A path we have no
    /// entries under is `remote_only`; a differing hash is divergent. When the
    /// remote lists children of a parent, our non-empty children of that parent
    /// it did not list are `local_only`.
    pub async fn find_divergent_paths(&self, remote_nodes: &[(String, [u8; 32])]) -> Result<MerkleDiff, StorageError> {
        self.with_tree(|t| {
            let mut diff = MerkleDiff::default();
            let listed: BTreeSet<&str> = remote_nodes.iter().map(|(p, _)| p.as_str()).collect();
            let mut parents = BTreeSet::new();
            for (path, hash) in remote_nodes {
                let node = t.node(path).map_err(bad_path)?;
                if node.is_empty() {
                    diff.remote_only.push(path.clone());
                } else if node.hash() != *hash {
                    diff.divergent_paths.push(path.clone());
                }
                if let Some(parent) = path.get(..path.len().saturating_sub(1)).filter(|_| !path.is_empty()) {
                    parents.insert(parent.to_string());
                }
            }
            for parent in parents {
                for (child, _) in t.children(&parent).map_err(bad_path)? {
                    if !listed.contains(child.as_str()) {
                        diff.local_only.push(child);
                    }
                }
            }
            Ok(diff)
        })
    }

    /// Descends from `start_path` through every child whose hash differs from
    /// the remote's (`remote_children(path)` gives the remote's children) and
    /// returns the differing buckets.
    pub async fn drill_down_divergence<F, Fut>(
        &self,
        start_path: &str,
        remote_children: F,
    ) -> Result<Vec<String>, StorageError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<BTreeMap<String, [u8; 32]>, StorageError>>,
    {
        let depth = self.with_tree(|t| t.depth()) as usize;
        self.with_tree(|t| t.node(start_path).map(|_| ()).map_err(bad_path))?;
        let mut frontier = vec![start_path.to_string()];
        let mut leaves = Vec::new();
        while let Some(path) = frontier.pop() {
            if path.len() == depth {
                leaves.push(path);
                continue;
            }
            let ours = self.get_merkle_children(&path).await?;
            let theirs = remote_children(path.clone()).await?;
            let keys: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
            for k in keys {
                if ours.get(k) != theirs.get(k) {
                    frontier.push(k.clone());
                }
            }
        }
        leaves.sort();
        Ok(leaves)
    }

    /// Entry versions whose tree keys start with each of `keys`, one list
    /// per key (from L3).
    pub async fn merkle_entries_by_keys(&self, keys: &[[u8; 8]]) -> Result<Vec<Vec<EntryMeta>>, StorageError> {
        self.core.backends()?.l3.entries_with_keys(keys).await
    }

    /// Entry versions stored under the node `path` (from L3).
    pub async fn merkle_entries(&self, path: &str, limit: usize) -> Result<Vec<EntryMeta>, StorageError> {
        self.with_tree(|t| t.parse_path(path).map(|_| ()).map_err(bad_path))?;
        self.core.backends()?.l3.entries_under(path, limit).await
    }

    /// Whether the Redis Merkle mirror equals L3's mirrored view (always true
    /// without Redis).
    pub async fn is_merkle_synced(&self) -> Result<bool, StorageError> {
        if self.core.backends()?.l2.is_none() {
            return Ok(true);
        }
        let (l2, l3) = self.merkle_roots().await;
        Ok(l2 == l3)
    }

    /// `(L2 root, L3 root)` as hex: the Redis mirror's root, and the root of the
    /// L3 entries Redis should mirror (items written `durable()` or with a TTL
    /// are in L3's full tree but not in Redis). L2 is `None` without Redis.
    pub async fn merkle_roots(&self) -> (Option<String>, Option<String>) {
        self.core.l2_mirror.roots(&self.core).await
    }

    /// Repairs Redis from L3 now, checking every stored content against its
    /// hash (the engine also does this on start, and without the content check
    /// when Redis returns); returns how many keys were rewritten or removed.
    pub async fn resync_redis(&self) -> Result<u64, StorageError> {
        self.core.l2_mirror.resync(&self.core, true).await
    }
}
