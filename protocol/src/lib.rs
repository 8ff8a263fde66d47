//! The parts of syncnode that every node must agree on bit for bit, kept free of
//! I/O so the node, the simulator and the tests all drive the same code:
//!
//! - [`hlc`]: the hybrid logical clock that stamps versions;
//! - [`version`]: the last-writer-wins order over `(version, origin, content_hash)`;
//! - [`merkle`]: the hash-prefix Merkle tree with homomorphic node sums;
//! - [`wire`]: versioned messages and the length-prefixed, size-limited codec;
//! - [`session`]: the anti-entropy session as a state machine;
//! - [`riblt`]: rateless set reconciliation (coded symbols of entry digests);
//! - [`memory`]: an in-memory store speaking that protocol (simulator, tests);
//! - [`membership`]: SWIM membership (foca) with time passed in;
//! - [`clock_offset`]: members' clock offsets, NTP-style, from membership traffic;
//! - [`replica`]: the replication core, one state machine per node, that the
//!   node's libp2p driver and the simulator both run.

pub mod clock_offset;
pub mod hlc;
pub mod membership;
pub mod memory;
pub mod merkle;
pub mod replica;
pub mod riblt;
pub mod session;
pub mod version;
pub mod wire;

pub use hlc::{ClockSkew, Hlc};
pub use merkle::{EntryDigest, MerkleError, MerkleTree, NodeSum};
pub use version::Stamp;
