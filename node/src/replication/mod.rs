//! Replication: the node side of the protocol crate's anti-entropy session,
//! driving the engine. The libp2p swarm (transport, gossip, request-response)
//! builds on this.

pub mod anti_entropy;
pub mod swarm;
pub mod transport;
