//! The replication layer's histograms and libp2p's own metrics (its
//! `metrics` feature: connections, dial errors, gossipsub, identify, ping).
//! libp2p registers its families once, in a registry of their own that
//! `/metrics` appends to the node's.

use libp2p::metrics::{Metrics, Recorder};
use prometheus_client::registry::Registry;
use std::sync::Arc;

use crate::engine::Latency;

/// Shared between the swarm task (which records) and `/metrics` (which reads).
#[derive(Clone, Debug)]
pub struct NetMetrics {
    /// libp2p's families, named `syncnode_libp2p_*`.
    pub p2p: Arc<Registry>,
    /// How long the anti-entropy sessions this node ran took.
    pub session_seconds: Latency,
    /// How long a CDC batch took to apply (one durable commit).
    pub cdc_apply_seconds: Latency,
}

/// The swarm task's side: what it records libp2p events into.
pub struct P2pRecorder(Metrics);

impl P2pRecorder {
    pub fn record<E>(&self, event: &E)
    where
        Metrics: Recorder<E>,
    {
        self.0.record(event)
    }
}

/// The metrics of a new swarm and their recorder.
pub fn new() -> (NetMetrics, P2pRecorder) {
    let mut registry = Registry::with_prefix("syncnode");
    let recorder = Metrics::new(&mut registry);
    (
        NetMetrics {
            p2p: Arc::new(registry),
            // Sessions run from milliseconds (nothing to move) to many
            // minutes (a bootstrap): 10 ms to about 45 min.
            session_seconds: Latency::buckets(0.01, 19),
            cdc_apply_seconds: Latency::default(),
        },
        P2pRecorder(recorder),
    )
}
