//! The hash-prefix Merkle tree (DESIGN §4).
//!
//! Each entry is keyed by `k = SHA-256(object_id)`, so the tree's shape does not
//! depend on how ids are spelled. The tree has fanout 16 and a fixed depth `D`; a
//! node is named by the first `i` hex nibbles of `k` (`""` is the root). Every
//! node holds `(sum, count)` where `sum` is the sum modulo 2^256 of the entry
//! hashes below it. Sums are homomorphic: a write changes exactly `D + 1` nodes by
//! a delta, with no reads of siblings, and two trees over the same set of entries
//! are equal whatever order the entries arrived in.

use sha2::{Digest, Sha256};
use std::fmt;

use crate::riblt::{CodedSymbol, Element, SYMBOL_BYTES, Sketch};

/// Children per node.
pub const FANOUT: usize = 16;
/// Depth used when a cluster does not choose one (65,536 buckets).
pub const DEFAULT_DEPTH: u8 = 4;
/// Deepest tree we accept (16^6 buckets ≈ 670 MB would be too much; 5 is ~42 MB).
pub const MAX_DEPTH: u8 = 5;
/// Most coded symbols a tree keeps: as many as its buckets, up to 2^16
/// (about 39,000 differences at the 1.65 symbols per difference a
/// responder sends; 2 MB). Each write touches about 21 of them.
pub const MAX_SYMBOLS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("merkle depth {0} is out of range 1..={MAX_DEPTH}")]
    Depth(u8),
    #[error("merkle path {path:?} is not a hex prefix of at most {depth} nibbles")]
    Path { path: String, depth: u8 },
    #[error("merkle snapshot is malformed: {0}")]
    Snapshot(&'static str),
}

/// A 256-bit unsigned integer with wrapping arithmetic (four little-endian limbs).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct U256([u64; 4]);

impl U256 {
    /// Reads a big-endian 32-byte value.
    pub fn from_be_bytes(b: &[u8; 32]) -> Self {
        let mut l = [0u64; 4];
        for (i, limb) in l.iter_mut().enumerate() {
            let start = 32 - 8 * (i + 1);
            *limb = u64::from_be_bytes(b[start..start + 8].try_into().expect("8 bytes"));
        }
        Self(l)
    }

    pub fn to_be_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, limb) in self.0.iter().enumerate() {
            let start = 32 - 8 * (i + 1);
            b[start..start + 8].copy_from_slice(&limb.to_be_bytes());
        }
        b
    }

    pub fn wrapping_add(self, o: Self) -> Self {
        let mut r = [0u64; 4];
        let mut carry = false;
        for (i, out) in r.iter_mut().enumerate() {
            let (s1, c1) = self.0[i].overflowing_add(o.0[i]);
            let (s2, c2) = s1.overflowing_add(carry as u64);
            *out = s2;
            carry = c1 || c2;
        }
        Self(r)
    }

    pub fn wrapping_sub(self, o: Self) -> Self {
        let mut r = [0u64; 4];
        let mut borrow = false;
        for (i, out) in r.iter_mut().enumerate() {
            let (d1, b1) = self.0[i].overflowing_sub(o.0[i]);
            let (d2, b2) = d1.overflowing_sub(borrow as u64);
            *out = d2;
            borrow = b1 || b2;
        }
        Self(r)
    }
}

impl fmt::Debug for U256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.to_be_bytes()))
    }
}

/// One node's fingerprint: the sum of its entries' hashes and how many there are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NodeSum {
    pub sum: U256,
    pub count: u64,
}

impl NodeSum {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// `SHA-256(0x01 ‖ sum ‖ count)`.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([0x01]);
        h.update(self.sum.to_be_bytes());
        h.update(self.count.to_be_bytes());
        h.finalize().into()
    }

    fn add(&mut self, e: &EntryDigest) {
        self.sum = self.sum.wrapping_add(U256::from_be_bytes(&e.hash));
        self.count = self.count.wrapping_add(1);
    }

    fn sub(&mut self, e: &EntryDigest) {
        self.sum = self.sum.wrapping_sub(U256::from_be_bytes(&e.hash));
        self.count = self.count.wrapping_sub(1);
    }
}

/// What the tree knows of one stored version of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryDigest {
    /// `SHA-256(object_id)`: where the entry sits in the tree.
    pub key: [u8; 32],
    /// `SHA-256(0x00 ‖ key ‖ version ‖ origin ‖ tombstone ‖ content_hash)`.
    pub hash: [u8; 32],
}

impl EntryDigest {
    /// `content_hash` is the raw 32-byte SHA-256 of the content.
    pub fn new(object_id: &str, version: u64, origin: &str, tombstone: bool, content_hash: &[u8; 32]) -> Self {
        let key: [u8; 32] = Sha256::digest(object_id.as_bytes()).into();
        Self::with_key(key, version, origin, tombstone, content_hash)
    }

    pub fn with_key(key: [u8; 32], version: u64, origin: &str, tombstone: bool, content_hash: &[u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update([0x00]);
        h.update(key);
        h.update(version.to_be_bytes());
        // Length prefix keeps (origin, tombstone) unambiguous.
        h.update((origin.len() as u32).to_be_bytes());
        h.update(origin.as_bytes());
        h.update([tombstone as u8]);
        h.update(content_hash);
        Self {
            key,
            hash: h.finalize().into(),
        }
    }
}

impl EntryDigest {
    /// The entry as an element of rateless reconciliation (`riblt`): the
    /// key's first 8 bytes find the object again, the hash's first 8 tell
    /// its versions apart.
    pub fn element(&self) -> Element {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.key[..8]);
        b[8..].copy_from_slice(&self.hash[..8]);
        Element::from_be_bytes(b)
    }
}

/// The hash of the object id, i.e. its position in the tree.
pub fn key_of(object_id: &str) -> [u8; 32] {
    Sha256::digest(object_id.as_bytes()).into()
}

/// The first `level` nibbles of `key` as an index at that level.
fn prefix_index(key: &[u8; 32], level: u8) -> usize {
    let mut idx = 0usize;
    for i in 0..level as usize {
        let byte = key[i / 2];
        let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        idx = (idx << 4) | nibble as usize;
    }
    idx
}

fn path_of(level: u8, index: usize) -> String {
    let mut s = String::with_capacity(level as usize);
    for i in (0..level as usize).rev() {
        let nib = (index >> (4 * i)) & 0xf;
        s.push(char::from_digit(nib as u32, 16).expect("nibble"));
    }
    s
}

/// The Merkle tree: every level held as a flat array of node sums.
#[derive(Clone, PartialEq, Eq)]
pub struct MerkleTree {
    depth: u8,
    /// `levels[i]` has `16^i` nodes.
    levels: Vec<Vec<NodeSum>>,
    /// The first coded symbols of the entries (`riblt`), for rateless
    /// sessions; absent in trees that only compare (the Redis mirror's).
    sketch: Option<Sketch>,
}

impl fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MerkleTree")
            .field("depth", &self.depth)
            .field("count", &self.count())
            .field("root", &self.root_hash().map(hex::encode))
            .finish()
    }
}

impl MerkleTree {
    /// A tree that keeps coded symbols for rateless sessions.
    pub fn new(depth: u8) -> Result<Self, MerkleError> {
        let mut t = Self::without_sketch(depth)?;
        t.sketch = Some(Sketch::new(t.buckets().min(MAX_SYMBOLS)));
        Ok(t)
    }

    /// A tree without coded symbols: it compares, but cannot answer a
    /// rateless session.
    pub fn without_sketch(depth: u8) -> Result<Self, MerkleError> {
        if depth == 0 || depth > MAX_DEPTH {
            return Err(MerkleError::Depth(depth));
        }
        let levels = (0..=depth)
            .map(|l| vec![NodeSum::default(); FANOUT.pow(l as u32)])
            .collect();
        Ok(Self {
            depth,
            levels,
            sketch: None,
        })
    }

    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// Entries in the tree.
    pub fn count(&self) -> u64 {
        self.levels[0][0].count
    }

    /// Bytes the node arrays take in memory.
    pub fn memory_bytes(&self) -> usize {
        let sketch = self.sketch.as_ref().map_or(0, |s| s.capacity()) * std::mem::size_of::<CodedSymbol>();
        self.levels
            .iter()
            .map(|l| l.len() * std::mem::size_of::<NodeSum>())
            .sum::<usize>()
            + sketch
    }

    /// The coded symbols of the entries, when this tree keeps them.
    pub fn sketch(&self) -> Option<&Sketch> {
        self.sketch.as_ref()
    }

    /// Number of buckets (leaf nodes).
    pub fn buckets(&self) -> usize {
        self.levels[self.depth as usize].len()
    }

    /// The root's hash; `None` for an empty tree.
    pub fn root_hash(&self) -> Option<[u8; 32]> {
        let root = self.levels[0][0];
        (!root.is_empty()).then(|| root.hash())
    }

    pub fn root(&self) -> NodeSum {
        self.levels[0][0]
    }

    /// Adds an entry; touches exactly `depth + 1` nodes. Returns how many.
    pub fn insert(&mut self, e: &EntryDigest) -> usize {
        for level in 0..=self.depth {
            self.levels[level as usize][prefix_index(&e.key, level)].add(e);
        }
        if let Some(s) = self.sketch.as_mut() {
            s.add(e.element());
        }
        self.depth as usize + 1
    }

    /// Removes an entry that was inserted before; touches `depth + 1` nodes.
    pub fn remove(&mut self, e: &EntryDigest) -> usize {
        for level in 0..=self.depth {
            self.levels[level as usize][prefix_index(&e.key, level)].sub(e);
        }
        if let Some(s) = self.sketch.as_mut() {
            s.remove(e.element());
        }
        self.depth as usize + 1
    }

    /// Replaces the entry of one object (`old` is `None` for a new object).
    pub fn replace(&mut self, old: Option<&EntryDigest>, new: &EntryDigest) {
        if let Some(old) = old {
            self.remove(old);
        }
        self.insert(new);
    }

    /// Parses a node path into `(level, index)`.
    pub fn parse_path(&self, path: &str) -> Result<(u8, usize), MerkleError> {
        let bad = || MerkleError::Path {
            path: path.chars().take(64).collect(),
            depth: self.depth,
        };
        if path.len() > self.depth as usize {
            return Err(bad());
        }
        let mut idx = 0usize;
        for c in path.chars() {
            let d = c.to_digit(16).filter(|_| !c.is_ascii_uppercase()).ok_or_else(bad)?;
            idx = (idx << 4) | d as usize;
        }
        Ok((path.len() as u8, idx))
    }

    /// The node at `path`.
    pub fn node(&self, path: &str) -> Result<NodeSum, MerkleError> {
        let (level, idx) = self.parse_path(path)?;
        Ok(self.levels[level as usize][idx])
    }

    /// The `FANOUT` child sums of the node at `path`, by nibble (empty for a
    /// bucket): the children without a path string each.
    pub fn child_sums(&self, path: &str) -> Result<&[NodeSum], MerkleError> {
        let (level, idx) = self.parse_path(path)?;
        if level == self.depth {
            return Ok(&[]);
        }
        Ok(&self.levels[level as usize + 1][idx * FANOUT..(idx + 1) * FANOUT])
    }

    /// Non-empty children of the node at `path`, as `(path, sum)`; empty for a bucket.
    pub fn children(&self, path: &str) -> Result<Vec<(String, NodeSum)>, MerkleError> {
        let (level, idx) = self.parse_path(path)?;
        if level == self.depth {
            return Ok(Vec::new());
        }
        let next = &self.levels[level as usize + 1];
        Ok((0..FANOUT)
            .map(|c| idx * FANOUT + c)
            .filter(|&ci| !next[ci].is_empty())
            .map(|ci| (path_of(level + 1, ci), next[ci]))
            .collect())
    }

    /// The bucket path of an object id.
    pub fn bucket_path(&self, object_id: &str) -> String {
        let key = key_of(object_id);
        path_of(self.depth, prefix_index(&key, self.depth))
    }

    /// Whether `key` lies under the node at `path` (a valid path).
    pub fn key_in_path(key: &[u8; 32], path: &str) -> bool {
        let h = hex::encode(&key[..path.len().div_ceil(2)]);
        h.starts_with(path)
    }

    /// Paths of the buckets whose sums differ, found by descending only into
    /// differing nodes. Both trees must have the same depth.
    pub fn diff(&self, other: &MerkleTree) -> Vec<String> {
        assert_eq!(self.depth, other.depth, "trees of different depth");
        let mut frontier = vec![0usize];
        for level in 0..self.depth {
            if frontier.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for idx in frontier {
                if self.levels[level as usize][idx] == other.levels[level as usize][idx] {
                    continue;
                }
                for c in 0..FANOUT {
                    let ci = idx * FANOUT + c;
                    if self.levels[level as usize + 1][ci] != other.levels[level as usize + 1][ci] {
                        next.push(ci);
                    }
                }
            }
            frontier = next;
        }
        frontier.into_iter().map(|i| path_of(self.depth, i)).collect()
    }

    /// The bucket level as bytes: `depth` then `(sum, count)` per bucket.
    /// Interior nodes are derived, so this is the whole tree but its coded
    /// symbols (`symbols_snapshot`, stored apart: together they pass 4 MiB
    /// at depth 4, a common database packet limit).
    pub fn to_snapshot(&self) -> Vec<u8> {
        let buckets = &self.levels[self.depth as usize];
        let mut out = Vec::with_capacity(1 + buckets.len() * 40);
        out.push(self.depth);
        for b in buckets {
            out.extend_from_slice(&b.sum.to_be_bytes());
            out.extend_from_slice(&b.count.to_be_bytes());
        }
        out
    }

    /// The coded symbols as bytes, when the tree keeps them.
    pub fn symbols_snapshot(&self) -> Option<Vec<u8>> {
        let symbols = self.sketch.as_ref()?.symbols();
        Some(symbols.iter().flat_map(|s| s.to_bytes()).collect())
    }

    /// Puts back the coded symbols `symbols_snapshot` took of this tree.
    pub fn with_symbols(mut self, bytes: &[u8]) -> Result<Self, MerkleError> {
        let capacity = self.buckets().min(MAX_SYMBOLS);
        if bytes.len() != capacity * SYMBOL_BYTES {
            return Err(MerkleError::Snapshot("coded symbols of the wrong length"));
        }
        let symbols = bytes
            .chunks_exact(SYMBOL_BYTES)
            .map(|c| CodedSymbol::from_bytes(c.try_into().expect("symbol bytes")))
            .collect();
        self.sketch = Some(Sketch::from_symbols(symbols));
        Ok(self)
    }

    /// A tree from `to_snapshot`'s bytes, without coded symbols.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, MerkleError> {
        let (&depth, rest) = bytes.split_first().ok_or(MerkleError::Snapshot("empty"))?;
        let mut tree = Self::without_sketch(depth)?;
        if rest.len() != tree.buckets() * 40 {
            return Err(MerkleError::Snapshot("wrong length"));
        }
        let d = depth as usize;
        for (i, chunk) in rest.chunks_exact(40).enumerate() {
            let sum = U256::from_be_bytes(chunk[..32].try_into().expect("32 bytes"));
            let count = u64::from_be_bytes(chunk[32..].try_into().expect("8 bytes"));
            tree.levels[d][i] = NodeSum { sum, count };
        }
        for level in (0..d).rev() {
            for i in 0..tree.levels[level].len() {
                let mut acc = NodeSum::default();
                for c in 0..FANOUT {
                    let ch = tree.levels[level + 1][i * FANOUT + c];
                    acc.sum = acc.sum.wrapping_add(ch.sum);
                    acc.count = acc.count.wrapping_add(ch.count);
                }
                tree.levels[level][i] = acc;
            }
        }
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// One stored version per id, as a store would hold it.
    type Store = BTreeMap<String, (u64, String, bool, [u8; 32])>;

    fn digest(id: &str, v: &(u64, String, bool, [u8; 32])) -> EntryDigest {
        EntryDigest::new(id, v.0, &v.1, v.2, &v.3)
    }

    fn tree_of(store: &Store) -> MerkleTree {
        let mut t = MerkleTree::new(3).unwrap();
        for (id, v) in store {
            t.insert(&digest(id, v));
        }
        t
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u64, bool),
        Delete(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), 1u64..1000, any::<bool>()).prop_map(|(i, v, t)| Op::Put(i, v, t)),
            any::<u8>().prop_map(Op::Delete),
        ]
    }

    /// Applies ops to a store and, incrementally, to a tree.
    fn apply(ops: &[Op]) -> (Store, MerkleTree) {
        let mut store = Store::new();
        let mut tree = MerkleTree::new(3).unwrap();
        for op in ops {
            match *op {
                Op::Put(i, v, tomb) => {
                    let id = format!("obj-{i}");
                    let val = (v, format!("node{}", v % 3), tomb, [i ^ (v as u8); 32]);
                    let old = store.insert(id.clone(), val.clone()).map(|o| digest(&id, &o));
                    tree.replace(old.as_ref(), &digest(&id, &val));
                }
                Op::Delete(i) => {
                    let id = format!("obj-{i}");
                    if let Some(old) = store.remove(&id) {
                        tree.remove(&digest(&id, &old));
                    }
                }
            }
        }
        (store, tree)
    }

    proptest! {
        #[test]
        fn same_set_same_root_whatever_the_history(ops in proptest::collection::vec(op(), 0..300)) {
            let (store, incremental) = apply(&ops);
            let rebuilt = tree_of(&store);
            prop_assert_eq!(&incremental, &rebuilt);
            // And inserting in reverse order gives the same tree.
            let mut rev = MerkleTree::new(3).unwrap();
            for (id, v) in store.iter().rev() {
                rev.insert(&digest(id, v));
            }
            prop_assert_eq!(rev.root_hash(), rebuilt.root_hash());
            prop_assert_eq!(rebuilt.root_hash().is_none(), store.is_empty());
        }

        #[test]
        fn diff_finds_exactly_the_differing_ids(a_ops in proptest::collection::vec(op(), 0..200), b_ops in proptest::collection::vec(op(), 0..200)) {
            let (a, ta) = apply(&a_ops);
            let (b, tb) = apply(&b_ops);
            let buckets = ta.diff(&tb);
            // The ids whose entries differ, found by listing the differing buckets only.
            let mut found = std::collections::BTreeSet::new();
            for path in &buckets {
                for (id, v) in a.iter().chain(b.iter()) {
                    if MerkleTree::key_in_path(&key_of(id), path) && a.get(id) != b.get(id) {
                        let _ = v;
                        found.insert(id.clone());
                    }
                }
            }
            let expected: std::collections::BTreeSet<String> = a.keys().chain(b.keys())
                .filter(|id| a.get(*id) != b.get(*id)).cloned().collect();
            prop_assert_eq!(&found, &expected);
            // No bucket is reported without a differing id in it.
            for path in &buckets {
                prop_assert!(expected.iter().any(|id| MerkleTree::key_in_path(&key_of(id), path)));
            }
            prop_assert_eq!(ta.root_hash() == tb.root_hash(), expected.is_empty());
        }

        #[test]
        fn an_update_changes_exactly_depth_plus_one_nodes(ops in proptest::collection::vec(op(), 1..100), id in "[a-z]{1,8}") {
            let (_, before) = apply(&ops);
            let mut after = before.clone();
            let touched = after.insert(&EntryDigest::new(&id, 42, "n", false, &[7; 32]));
            prop_assert_eq!(touched, 4);
            let changed: usize = before.levels.iter().zip(&after.levels)
                .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count()).sum();
            prop_assert_eq!(changed, before.depth() as usize + 1);
        }

        #[test]
        fn snapshots_round_trip(ops in proptest::collection::vec(op(), 0..200)) {
            let (_, t) = apply(&ops);
            let loaded = MerkleTree::from_snapshot(&t.to_snapshot()).unwrap();
            prop_assert!(loaded.sketch().is_none());
            let whole = loaded.clone().with_symbols(&t.symbols_snapshot().unwrap()).unwrap();
            prop_assert_eq!(&whole, &t);
            prop_assert!(loaded.with_symbols(&[0; 26]).is_err());
        }

        #[test]
        fn the_coded_symbols_depend_on_the_entries_not_their_order(ops in proptest::collection::vec(op(), 0..200)) {
            let (store, t) = apply(&ops);
            let mut fresh = MerkleTree::new(3).unwrap();
            for (id, v) in store.iter().rev() {
                fresh.insert(&digest(id, v));
            }
            prop_assert_eq!(fresh.sketch(), t.sketch());
        }

        #[test]
        fn garbage_snapshots_and_paths_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), path in ".{0,8}") {
            let _ = MerkleTree::from_snapshot(&bytes);
            let t = MerkleTree::new(4).unwrap();
            let _ = t.node(&path);
            let _ = t.children(&path);
        }
    }

    #[test]
    fn paths_name_nibble_prefixes() {
        let mut t = MerkleTree::new(2).unwrap();
        let e = EntryDigest::new("x", 1, "n", false, &[0; 32]);
        t.insert(&e);
        let p = t.bucket_path("x");
        assert_eq!(p, hex::encode(&e.key[..1]));
        assert_eq!(t.node(&p).unwrap().count, 1);
        assert_eq!(t.children("").unwrap().len(), 1);
        assert_eq!(t.children(&p[..1]).unwrap()[0].0, p);
        assert!(t.node("abc").is_err());
        assert!(t.node("G").is_err());
        assert!(t.node("A").is_err());
        assert!(MerkleTree::new(0).is_err() && MerkleTree::new(6).is_err());
    }

    #[test]
    fn u256_add_and_sub_wrap_and_invert() {
        let max = U256::from_be_bytes(&[0xff; 32]);
        let one = U256::from_be_bytes(&{
            let mut b = [0; 32];
            b[31] = 1;
            b
        });
        assert_eq!(max.wrapping_add(one), U256::default());
        assert_eq!(U256::default().wrapping_sub(one), max);
        assert_eq!(max.wrapping_add(max).wrapping_sub(max), max);
    }
}
