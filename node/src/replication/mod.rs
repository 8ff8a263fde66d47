//! Replication: the node side of the protocol crate's anti-entropy session
//! driving the engine (`anti_entropy`), gossip of roots and CDC deltas
//! (`gossip`), what a node knows of its peers (`peers`), the tombstone purge
//! (`purge`), and the libp2p swarm that carries it all (`transport`, `swarm`).

pub mod anti_entropy;
pub mod gossip;
pub mod peers;
pub mod purge;
pub mod swarm;
pub mod transport;
