//! The libp2p side of a node: TCP + Noise + Yamux, identify, ping, and the
//! anti-entropy request-response protocol. One task owns the swarm; the rest
//! of the node talks to it through a `NodeHandle`. Inbound requests are
//! answered by the engine on their own task, so a slow answer never stalls the
//! swarm; outbound sessions run on the caller's task, each request going
//! through the swarm and back.

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, identity, noise, ping, tcp, yamux};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use syncnode_protocol::session::{Progress, take_within_budget};

/// Largest content pushed by CDC; larger items travel by anti-entropy.
pub const CDC_INLINE_MAX: usize = 32 * 1024;
use syncnode_protocol::wire::{DEFAULT_MAX_FRAME, Request, Response};
use tokio::sync::{mpsc, oneshot};

use super::anti_entropy::SyncError;
use super::transport::{SYNC_PROTOCOL, SyncCodec, Traffic};
use crate::engine::SyncEngine;

#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    sync: request_response::Behaviour<SyncCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Peers(oneshot::Sender<Vec<PeerId>>),
    Block(PeerId, bool),
    Request(PeerId, Request, oneshot::Sender<Result<Response, String>>),
    Respond(ResponseChannel<Response>, Response),
}

/// How to start a node's network side.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub cluster: String,
    pub listen: Vec<Multiaddr>,
    pub keypair: identity::Keypair,
    pub request_timeout: Duration,
}

impl NetworkConfig {
    /// A fresh identity listening on a free loopback port.
    pub fn loopback(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            keypair: identity::Keypair::generate_ed25519(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The running network side of a node.
#[derive(Clone)]
pub struct NodeHandle {
    pub peer_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    commands: mpsc::Sender<Command>,
    pub traffic: Arc<Traffic>,
}

impl NodeHandle {
    /// Connects to a peer (the address ends in `/p2p/<peer id>` or not).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial(addr, tx))
            .await
            .map_err(|_| "node stopped".to_string())?;
        rx.await.map_err(|_| "node stopped".to_string())?
    }

    /// Sends one anti-entropy request and waits for its answer.
    pub async fn request(&self, peer: PeerId, req: Request) -> Result<Response, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Request(peer, req, tx))
            .await
            .map_err(|_| "node stopped".to_string())?;
        rx.await.map_err(|_| "node stopped".to_string())?
    }

    /// Cuts (`true`) or restores (`false`) the link to a peer: a blocked peer
    /// is disconnected and its connections are refused (partition tests and
    /// the demo).
    pub async fn block(&self, peer: PeerId, blocked: bool) {
        let _ = self.commands.send(Command::Block(peer, blocked)).await;
    }

    /// The peers connected now.
    pub async fn peers(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Peers(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Runs anti-entropy in the background: every `interval` (with jitter) it
    /// asks each connected peer for its root, and runs a session with a peer
    /// whose root differed twice in a row (the first difference may be writes
    /// still in flight). One session per peer at a time.
    pub fn spawn_anti_entropy(&self, engine: Arc<SyncEngine>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let handle = self.clone();
        tokio::spawn(async move {
            let mut differed: HashMap<PeerId, u32> = HashMap::new();
            let mut session = 0u64;
            loop {
                let jitter = Duration::from_millis(rand::random::<u64>() % (interval.as_millis() as u64 / 4 + 1));
                tokio::time::sleep(interval + jitter).await;
                if handle.commands.is_closed() {
                    return;
                }
                for peer in handle.peers().await {
                    let mine = engine.root_announcement();
                    let theirs = match handle.request(peer, Request::Root).await {
                        Ok(Response::Root(r)) => r,
                        Ok(other) => {
                            tracing::debug!(%peer, ?other, "peer did not give its root");
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "root request failed");
                            continue;
                        }
                    };
                    if theirs.depth != mine.depth || theirs.root == mine.root {
                        differed.remove(&peer);
                        continue;
                    }
                    let seen = differed.entry(peer).or_default();
                    *seen += 1;
                    if *seen < 2 {
                        continue;
                    }
                    differed.remove(&peer);
                    session += 1;
                    match handle.reconcile(&engine, peer, session).await {
                        Ok(p) => {
                            tracing::info!(%peer, pulled = p.pulled, pushed = p.pushed, rounds = p.round_trips, "anti-entropy session done")
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "anti-entropy session failed"),
                    }
                }
            }
        })
    }

    /// Pushes this node's committed writes to every connected peer as they
    /// happen (CDC). Items too large for one frame, and batches a slow push
    /// could not keep up with, are left to anti-entropy.
    pub fn spawn_cdc(&self, engine: Arc<SyncEngine>) -> tokio::task::JoinHandle<()> {
        let handle = self.clone();
        let mut commits = engine.subscribe_commits();
        tokio::spawn(async move {
            loop {
                let batch = match commits.recv().await {
                    Ok(b) => b,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(batches = n, "CDC fell behind; anti-entropy will catch up");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let items: Vec<_> = batch
                    .iter()
                    .filter(|i| i.content.len() <= CDC_INLINE_MAX)
                    .map(super::anti_entropy::wire_item)
                    .collect();
                let mut queue: std::collections::VecDeque<_> = items.into();
                let mut chunks = Vec::new();
                while !queue.is_empty() {
                    chunks.push(take_within_budget(&mut queue));
                }
                for peer in handle.peers().await {
                    for chunk in &chunks {
                        let (h, req) = (
                            handle.clone(),
                            Request::Push {
                                session: 0,
                                items: chunk.clone(),
                            },
                        );
                        tokio::spawn(async move {
                            if let Err(e) = h.request(peer, req).await {
                                tracing::debug!(%peer, error = %e, "CDC push failed; anti-entropy will catch up");
                            }
                        });
                    }
                }
            }
        })
    }

    /// Runs an anti-entropy session with `peer` for `engine`.
    pub async fn reconcile(&self, engine: &SyncEngine, peer: PeerId, session: u64) -> Result<Progress, SyncError> {
        engine.reconcile_with(session, |req| self.request(peer, req)).await
    }
}

/// Starts the swarm for `engine`; returns once it listens on every address.
pub async fn start(engine: Arc<SyncEngine>, config: NetworkConfig) -> anyhow::Result<NodeHandle> {
    // A frame must hold the largest item the engine accepts.
    let max_frame = DEFAULT_MAX_FRAME.max(engine.config().max_payload_bytes + 64 * 1024);
    let traffic = Arc::new(Traffic::default());
    let codec = SyncCodec {
        cluster: config.cluster.clone(),
        max_frame,
        traffic: traffic.clone(),
    };
    let timeout = config.request_timeout;
    let mut swarm: Swarm<NodeBehaviour> = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| NodeBehaviour {
            sync: request_response::Behaviour::with_codec(
                codec,
                [(SYNC_PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(timeout),
            ),
            identify: identify::Behaviour::new(identify::Config::new("/syncnode/1".into(), key.public())),
            ping: ping::Behaviour::default(),
        })?
        // Anti-entropy connections are long-lived; the 10 s default drops them between sessions.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for addr in &config.listen {
        swarm.listen_on(addr.clone())?;
    }
    let mut listen_addrs = Vec::new();
    while listen_addrs.len() < config.listen.len() {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            listen_addrs.push(address);
        }
    }
    let peer_id = *swarm.local_peer_id();
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(swarm, engine, rx, tx.clone()));
    Ok(NodeHandle {
        peer_id,
        listen_addrs,
        commands: tx,
        traffic,
    })
}

async fn run(
    mut swarm: Swarm<NodeBehaviour>,
    engine: Arc<SyncEngine>,
    mut commands: mpsc::Receiver<Command>,
    own: mpsc::Sender<Command>,
) {
    let mut pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, String>>> = HashMap::new();
    let mut dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>> = HashMap::new();
    let mut blocked: std::collections::HashSet<PeerId> = std::collections::HashSet::new();
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::Dial(addr, done)) => {
                    let peer = addr.iter().find_map(|p| match p {
                        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                        _ => None,
                    });
                    match (swarm.dial(addr), peer) {
                        (Err(e), _) => drop(done.send(Err(e.to_string()))),
                        (Ok(()), Some(peer)) if swarm.is_connected(&peer) => drop(done.send(Ok(()))),
                        (Ok(()), Some(peer)) => dials.entry(peer).or_default().push(done),
                        (Ok(()), None) => drop(done.send(Ok(()))),
                    }
                }
                Some(Command::Block(peer, on)) => {
                    if on {
                        blocked.insert(peer);
                        let _ = swarm.disconnect_peer_id(peer);
                    } else {
                        blocked.remove(&peer);
                    }
                }
                Some(Command::Peers(done)) => {
                    let _ = done.send(swarm.connected_peers().copied().collect());
                }
                Some(Command::Request(peer, _, done)) if blocked.contains(&peer) => {
                    let _ = done.send(Err(format!("peer {peer} is blocked")));
                }
                Some(Command::Request(peer, req, done)) => {
                    let id = swarm.behaviour_mut().sync.send_request(&peer, req);
                    pending.insert(id, done);
                }
                Some(Command::Respond(channel, resp)) => {
                    if swarm.behaviour_mut().sync.send_response(channel, resp).is_err() {
                        tracing::debug!("peer went away before our answer");
                    }
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(NodeBehaviourEvent::Sync(e)) => match e {
                    request_response::Event::Message {
                        peer,
                        message: request_response::Message::Request { .. },
                        ..
                    } if blocked.contains(&peer) => {}
                    request_response::Event::Message { message, .. } => match message {
                        request_response::Message::Request { request, channel, .. } => {
                            let (engine, own) = (engine.clone(), own.clone());
                            tokio::spawn(async move {
                                let resp = engine.answer_sync_request(request).await;
                                let _ = own.send(Command::Respond(channel, resp)).await;
                            });
                        }
                        request_response::Message::Response { request_id, response } => {
                            if let Some(done) = pending.remove(&request_id) {
                                let _ = done.send(Ok(response));
                            }
                        }
                    },
                    request_response::Event::OutboundFailure { request_id, error, .. } => {
                        if let Some(done) = pending.remove(&request_id) {
                            let _ = done.send(Err(error.to_string()));
                        }
                    }
                    request_response::Event::InboundFailure { peer, error, .. } => {
                        tracing::debug!(%peer, %error, "inbound sync request failed");
                    }
                    request_response::Event::ResponseSent { .. } => {}
                },
                SwarmEvent::ConnectionEstablished { peer_id, .. } if blocked.contains(&peer_id) => {
                    let _ = swarm.disconnect_peer_id(peer_id);
                }
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    for done in dials.remove(&peer_id).unwrap_or_default() {
                        let _ = done.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                    for done in dials.remove(&peer).unwrap_or_default() {
                        let _ = done.send(Err(error.to_string()));
                    }
                }
                _ => {}
            },
        }
    }
}
