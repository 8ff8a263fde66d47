//! Replication: the node side of the protocol crate's anti-entropy session
//! driving the engine (`anti_entropy`), gossip of roots and CDC deltas
//! (`gossip`) and applying received deltas (`cdc`), which addresses a node
//! advertises and its exclusive ports (`addressing`), SWIM membership and clock offsets (`membership`: codec and table;
//! `swim`: the driver that acts on it), what a node
//! knows of its peers (`peers`), the tombstone purge (`purge`), what
//! connection failures tell an operator (`connections`), and the libp2p
//! swarm that carries it all (`transport`, `swarm`).

pub mod addressing;
pub mod anti_entropy;
pub mod connections;
pub mod gossip;
pub mod membership;
pub mod metrics;
pub mod peers;
pub mod purge;
pub mod swarm;
mod swim;
pub mod transport;
