//! syncsim: a deterministic discrete-event simulator for syncnode clusters.
//! It runs N copies of the replication core the node runs
//! (`syncnode_protocol::replica`) over in-memory stores, on a simulated
//! network with latency, loss, duplication, reordering, bandwidth,
//! partitions, crashes and skewed clocks, and checks what it did.
//!
//! - `scenario`: the TOML scenario format;
//! - `sim`: the event loop, network and nodes;
//! - `check`: the checkers (lost writes, resurrected deletes, divergence,
//!   visibility);
//! - `report`: the summary, bench lines, JSON;
//! - `plot`: SVG plots;
//! - `explore`: random fault schedules.

pub mod check;
pub mod explore;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod sim;
