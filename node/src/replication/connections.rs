//! What connection failures tell an operator. libp2p reports them as swarm
//! events at DEBUG; the ones a person can act on — a bootstrap address
//! nobody answers at, a handshake that fails (usually another PSK), an
//! address answering with another peer id, a peer of another cluster — get
//! one WARN line each, naming the address or peer, at most once a minute
//! for the same thing.

use libp2p::swarm::{DialError, ListenError};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const QUIET_FOR: Duration = Duration::from_secs(60);

/// Remembers what was logged when, so a failing peer is not a log flood.
#[derive(Default)]
pub struct ConnectionLog {
    last: HashMap<String, Instant>,
}

impl ConnectionLog {
    /// Whether a line about `key` may be written now.
    pub fn allow(&mut self, key: &str) -> bool {
        let now = Instant::now();
        if self.last.len() > 4096 {
            self.last.retain(|_, t| now.duration_since(*t) < QUIET_FOR);
        }
        match self.last.get(key) {
            Some(t) if now.duration_since(*t) < QUIET_FOR => false,
            _ => {
                self.last.insert(key.to_string(), now);
                true
            }
        }
    }

    /// A dial that failed; `seed` when it was a bootstrap address.
    pub fn dial_failed(&mut self, peer: Option<PeerId>, error: &DialError, seed: bool) {
        match error {
            DialError::WrongPeerId { obtained, address } => {
                if self.allow(&format!("wrong-id {address}")) {
                    tracing::warn!(
                        %address,
                        expected = ?peer,
                        answered_as = %obtained,
                        "the address answers with another peer id: fix the /p2p/ part of the address (or the node there was re-keyed)"
                    );
                }
            }
            DialError::Transport(failures) => {
                for (address, e) in failures {
                    let text = error_chain(e);
                    let hint = hint_for(&text);
                    if (seed || hint.is_some()) && self.allow(&format!("dial {address}")) {
                        tracing::warn!(
                            %address,
                            peer = ?peer,
                            error = %text,
                            "{}",
                            hint.unwrap_or("cannot reach a bootstrap address; retrying with backoff")
                        );
                    }
                }
            }
            DialError::Denied { .. }
            | DialError::LocalPeerId { .. }
            | DialError::Aborted
            | DialError::DialPeerConditionFalse(_)
            | DialError::NoAddresses => {
                tracing::debug!(?peer, %error, "dial not made");
            }
        }
    }

    /// An incoming connection that failed. One that fails in its
    /// handshake (pnet, multistream, Noise) is almost always a node with
    /// another pre-shared key, or something that is not a syncnode node.
    pub fn incoming_failed(&mut self, from: &Multiaddr, error: &ListenError) {
        let text = error_chain(error);
        let ip = from.iter().next().map(|p| p.to_string()).unwrap_or_default();
        if matches!(error, ListenError::Transport(_)) && self.allow(&format!("incoming {ip}")) {
            tracing::warn!(
                %from,
                error = %text,
                "incoming connection failed in its handshake: the peer probably has another pre-shared key (psk_file), or none, or is not a syncnode node"
            );
        } else {
            tracing::debug!(%from, error = %text, "refused an incoming connection");
        }
    }

    /// A peer with no wire version in common: they cannot replicate.
    pub fn wrong_wire(&mut self, peer: PeerId, theirs: &[u8]) {
        if self.allow(&format!("wire {peer}")) {
            use syncnode_protocol::wire::{MIN_WIRE_VERSION, WIRE_VERSION};
            tracing::warn!(
                %peer,
                "peer speaks wire versions {theirs:?}, this node {MIN_WIRE_VERSION} to {WIRE_VERSION}: they cannot replicate; upgrade one version at a time"
            );
        }
    }

    /// A message of another cluster (the codec refused it).
    pub fn wrong_cluster(&mut self, peer: PeerId, error: &str) {
        if self.allow(&format!("cluster {peer}")) {
            tracing::warn!(%peer, %error, "peer belongs to another cluster (cluster_id differs); its messages are refused");
        }
    }
}

/// The error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(inner) = cur {
        let t = inner.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if !t.is_empty() && !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = inner.source();
    }
    let text = parts.join(": ");
    // DNS-wrapped dial errors hide the per-address reason from Display.
    let debug = format!("{e:?}");
    for (kind, says) in [
        ("ConnectionRefused", "connection refused"),
        ("TimedOut", "timed out"),
        ("HostUnreachable", "host unreachable"),
        ("NetworkUnreachable", "network unreachable"),
        ("NoRecordsFound", "DNS name not found"),
    ] {
        if debug.contains(kind) && !text.to_ascii_lowercase().contains(says) {
            return format!("{text} ({says})");
        }
    }
    text
}

/// What a failed dial most likely means, when it is something to fix: a
/// name that does not resolve; or a connection that was made and then
/// failed in its handshake (pnet, multistream, Noise), which is almost
/// always another pre-shared key. A refused or unreachable address is
/// `None` (only worth a line for a bootstrap address).
fn hint_for(text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    if t.contains("dns") || t.contains("resolve") || t.contains("no record") || t.contains("dns name not found") {
        Some("cannot resolve the address's DNS name")
    } else if ["connection refused", "unreachable", "timed out", "no route"]
        .iter()
        .any(|k| t.contains(k))
        && !t.contains("multistream")
        && !t.contains("noise")
    {
        None
    } else {
        Some("handshake failed: the peer probably has another pre-shared key (psk_file), or none")
    }
}
