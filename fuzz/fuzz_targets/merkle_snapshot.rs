//! Any bytes as a Merkle snapshot: an error or a tree that snapshots back to
//! the same bytes, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use syncnode_protocol::MerkleTree;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = MerkleTree::from_snapshot(data) {
        assert_eq!(t.to_snapshot(), data);
    }
});
