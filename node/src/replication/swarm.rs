//! The libp2p side of a node: TCP (+ pnet) + Noise + Yamux, identify, ping,
//! gossipsub (roots and CDC, strictly signed, validated before forwarding),
//! the anti-entropy request-response protocol, an optional peer allowlist, a
//! block list (partitions, bans), and redials of bootstrap peers with
//! backoff. One task owns the swarm; the rest of the node talks to it through
//! a `NodeHandle`. Inbound requests are answered by the engine on their own
//! task, so a slow answer never stalls the swarm; outbound sessions run on
//! their own tasks, each request going through the swarm and back.

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers, BlockedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::pnet::PreSharedKey;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, identity, ping};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use syncnode_protocol::session::{MAX_ITEMS, Progress};
use syncnode_protocol::wire::{CdcDelta, DEFAULT_MAX_FRAME, Request, Response};
use tokio::sync::{mpsc, oneshot};

use super::anti_entropy::SyncError;
use super::gossip::{self, GOSSIP_MAX, Gossip};
use super::peers::{PeerLimits, Peers, ReplicationStats};
use super::transport::{SYNC_PROTOCOL, SyncCodec, Traffic, tcp_transport};
use crate::engine::SyncEngine;

#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    limits: connection_limits::Behaviour,
    allowed: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    blocked: allow_block_list::Behaviour<BlockedPeers>,
    sync: request_response::Behaviour<SyncCodec>,
    gossip: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

#[derive(Debug, Clone, Copy)]
enum Topic {
    Roots,
    Cdc,
}

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Peers(oneshot::Sender<Vec<PeerId>>),
    Block(PeerId, bool),
    Request(PeerId, Request, oneshot::Sender<Result<Response, String>>),
    Respond(ResponseChannel<Response>, Response),
    Publish(Topic, Vec<Vec<u8>>),
}

/// How to start a node's network side.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub cluster: String,
    pub listen: Vec<Multiaddr>,
    /// Peers to connect to and to keep redialing (with backoff) while
    /// disconnected; each address ends in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    pub keypair: identity::Keypair,
    /// Pre-shared cluster key: nodes without it cannot connect.
    pub psk: Option<PreSharedKey>,
    /// When not empty, only these peers may connect.
    pub allow_peers: Vec<PeerId>,
    pub region: String,
    pub request_timeout: Duration,
    /// How often roots are announced.
    pub gossip_interval: Duration,
    pub limits: PeerLimits,
    /// Where member watermarks are kept (tombstone purge).
    pub members_file: Option<PathBuf>,
    /// Silence after which a member stops holding back purges.
    pub member_expiry: Duration,
}

impl NetworkConfig {
    /// A fresh identity listening on a free loopback port.
    pub fn loopback(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            bootstrap: Vec::new(),
            keypair: identity::Keypair::generate_ed25519(),
            psk: None,
            allow_peers: Vec::new(),
            region: "local".into(),
            request_timeout: Duration::from_secs(30),
            gossip_interval: Duration::from_millis(250),
            limits: PeerLimits::default(),
            members_file: None,
            member_expiry: Duration::from_secs(7 * 86_400),
        }
    }
}

/// The peer id an address ends with.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// The running network side of a node.
#[derive(Clone)]
pub struct NodeHandle {
    pub peer_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    commands: mpsc::Sender<Command>,
    pub traffic: Arc<Traffic>,
    /// Peer roots, lag, sessions, penalties, members, counters.
    pub peers: Arc<Peers>,
    sessions: Arc<AtomicU64>,
    cluster: String,
}

impl NodeHandle {
    /// This node's first listen address with its peer id: what another node
    /// dials (or lists in `bootstrap`).
    pub fn dial_addr(&self) -> Multiaddr {
        self.listen_addrs[0]
            .clone()
            .with(libp2p::multiaddr::Protocol::P2p(self.peer_id))
    }

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
    /// is disconnected and its connections are refused (partitions).
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

    /// Runs anti-entropy in the background: every `interval` it starts a
    /// session with each connected peer whose announced root differed from
    /// ours twice in a row (the first difference may be writes still in
    /// flight). One session per peer at a time; sessions with different
    /// peers run side by side.
    pub fn spawn_anti_entropy(&self, engine: Arc<SyncEngine>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let handle = self.clone();
        tokio::spawn(async move {
            loop {
                let jitter = Duration::from_millis(rand::random::<u64>() % (interval.as_millis() as u64 / 4 + 1));
                tokio::time::sleep(interval + jitter).await;
                if handle.commands.is_closed() {
                    return;
                }
                for peer in handle.peers.due_for_session() {
                    let id = handle.sessions.fetch_add(1, Ordering::Relaxed) + 1;
                    if !handle.peers.session_started(peer, id) {
                        continue;
                    }
                    let (h, e) = (handle.clone(), engine.clone());
                    tokio::spawn(async move {
                        let bootstrap = e.merkle_summary().1 == 0;
                        let result = h.reconcile(&e, peer, id).await;
                        match &result {
                            Ok(p) => tracing::info!(
                                %peer, bootstrap, pulled = p.pulled, pushed = p.pushed, rounds = p.round_trips,
                                "anti-entropy session done"
                            ),
                            Err(err) => tracing::warn!(%peer, error = %err, "anti-entropy session failed"),
                        }
                        h.peers
                            .session_finished(peer, result.as_ref().map_err(|e| e.to_string()));
                    });
                }
            }
        })
    }

    /// Publishes this node's committed writes as CDC deltas. Batches the
    /// swarm could not keep up with are left to anti-entropy.
    pub fn spawn_cdc(&self, engine: Arc<SyncEngine>) -> tokio::task::JoinHandle<()> {
        let handle = self.clone();
        let cluster = self.cluster.clone();
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
                let msgs = gossip::encode_deltas(&cluster, &batch);
                if handle.commands.send(Command::Publish(Topic::Cdc, msgs)).await.is_err() {
                    return;
                }
            }
        })
    }

    /// Runs an anti-entropy session with `peer` for `engine`, reporting its
    /// progress in the peer table as it goes.
    /// An empty node's first session (a bootstrap) logs its progress.
    pub async fn reconcile(&self, engine: &SyncEngine, peer: PeerId, session: u64) -> Result<Progress, SyncError> {
        let peers = self.peers.clone();
        let bootstrap = engine.merkle_summary().1 == 0;
        let mut logged = 0;
        engine
            .reconcile_observed(
                session,
                |req| self.request(peer, req),
                |p| {
                    peers.session_progress(peer, p);
                    if bootstrap && p.pulled >= logged + 10_000 {
                        logged = p.pulled;
                        tracing::info!(%peer, pulled = p.pulled, to_pull = p.to_pull, "bootstrap progress");
                    }
                },
            )
            .await
    }
}

/// Starts the swarm for `engine`; returns once it listens on every address.
/// Received CDC deltas are applied; roots are announced every
/// `gossip_interval`.
pub async fn start(engine: Arc<SyncEngine>, config: NetworkConfig) -> anyhow::Result<NodeHandle> {
    // A frame must hold the largest item the engine accepts.
    // Plus room for a Fetch answer's deferred ids (4096 × 512 B) and metadata.
    let max_frame = DEFAULT_MAX_FRAME.max(engine.config().max_payload_bytes + 4 * 1024 * 1024);
    let traffic = Arc::new(Traffic::default());
    let codec = SyncCodec {
        cluster: config.cluster.clone(),
        max_frame,
        traffic: traffic.clone(),
    };
    let timeout = config.request_timeout;
    let allow = config.allow_peers.clone();
    let agent = format!("syncnode/{} region={}", env!("CARGO_PKG_VERSION"), config.region);
    let psk = config.psk;
    let mut swarm: Swarm<NodeBehaviour> = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| {
            tcp_transport(key, psk).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| anyhow::anyhow!("transport: {e}"))?
        .with_behaviour(|key| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(GOSSIP_MAX + 1024)
                .heartbeat_interval(Duration::from_secs(1))
                .build()?;
            let gossip = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_config)?;
            let allowed = (!allow.is_empty()).then(|| {
                let mut b = allow_block_list::Behaviour::<AllowedPeers>::default();
                for p in &allow {
                    b.allow_peer(*p);
                }
                b
            });
            // Each connection may hold up to 64 streams of one frame each:
            // bound the connections so a flood of them cannot exhaust memory.
            let limits = ConnectionLimits::default()
                .with_max_established_per_peer(Some(2))
                .with_max_established_incoming(Some(256))
                .with_max_pending_incoming(Some(64));
            Ok(NodeBehaviour {
                limits: connection_limits::Behaviour::new(limits),
                allowed: allowed.into(),
                blocked: allow_block_list::Behaviour::default(),
                sync: request_response::Behaviour::with_codec(
                    codec,
                    [(SYNC_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(timeout)
                        .with_max_concurrent_streams(64),
                ),
                gossip,
                identify: identify::Behaviour::new(
                    identify::Config::new("/syncnode/1".into(), key.public()).with_agent_version(agent),
                ),
                ping: ping::Behaviour::default(),
            })
        })
        .map_err(|e| anyhow::anyhow!("network behaviour: {e}"))?
        // Anti-entropy connections are long-lived; the 10 s default drops them between sessions.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for topic in [gossip::roots_topic(&config.cluster), gossip::cdc_topic(&config.cluster)] {
        swarm
            .behaviour_mut()
            .gossip
            .subscribe(&topic)
            .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
    }
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
    let (tx, rx) = mpsc::channel(1024);
    let (cdc_tx, cdc_rx) = mpsc::channel(8192);
    let peers = Arc::new(Peers::new(
        config.limits.clone(),
        config.members_file.clone(),
        config.member_expiry,
    ));
    {
        // Member watermarks reach the disk every few seconds, off the swarm task.
        let peers = peers.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let p = peers.clone();
                let _ = tokio::task::spawn_blocking(move || p.save_members()).await;
            }
        });
    }
    let handle = NodeHandle {
        peer_id,
        listen_addrs,
        commands: tx.clone(),
        traffic,
        peers: peers.clone(),
        sessions: Arc::new(AtomicU64::new(0)),
        cluster: config.cluster.clone(),
    };
    tokio::spawn(apply_cdc(engine.clone(), handle.clone(), cdc_rx));
    let node = SwarmTask {
        engine,
        peers,
        own: tx,
        cdc: cdc_tx,
        cluster: config.cluster.clone(),
        traffic: handle.traffic.clone(),
        topics: [gossip::roots_topic(&config.cluster), gossip::cdc_topic(&config.cluster)],
        pending: HashMap::new(),
        dials: HashMap::new(),
        manual_blocks: HashSet::new(),
        bans: HashSet::new(),
        allow: config.allow_peers.iter().copied().collect(),
        answering: Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERING)),
        redial: config
            .bootstrap
            .iter()
            .map(|a| Redial {
                addr: a.clone(),
                peer: peer_of(a),
                next: Instant::now(),
                backoff: Duration::from_secs(1),
            })
            .collect(),
    };
    tokio::spawn(node.run(swarm, rx, config.gossip_interval));
    Ok(handle)
}

/// Applies received deltas in batches (whatever has arrived, up to 4096, in
/// one commit; LWW makes their order irrelevant), fetching content that was
/// not inlined from the delta's author.
async fn apply_cdc(engine: Arc<SyncEngine>, handle: NodeHandle, mut rx: mpsc::Receiver<(PeerId, CdcDelta)>) {
    let stats = &handle.peers.stats;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 4096
            && let Ok(next) = rx.try_recv()
        {
            batch.push(next);
        }
        let mut fetch_from: HashMap<String, PeerId> = HashMap::new();
        for (author, d) in &batch {
            fetch_from.insert(d.entry.id.clone(), *author);
        }
        let outcome = match engine.receive_cdc(batch.into_iter().map(|(_, d)| d).collect()).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "CDC batch not applied; anti-entropy will catch up");
                continue;
            }
        };
        ReplicationStats::add(&stats.cdc_applied, outcome.applied);
        ReplicationStats::add(&stats.cdc_dropped, outcome.dropped);
        let mut by_author: HashMap<PeerId, Vec<String>> = HashMap::new();
        for id in outcome.fetch {
            if let Some(author) = fetch_from.get(&id) {
                by_author.entry(*author).or_default().push(id);
            }
        }
        // Fetches run on their own, so a slow author stalls nobody else.
        for (author, ids) in by_author {
            let (engine, handle) = (engine.clone(), handle.clone());
            tokio::spawn(async move {
                let stats = &handle.peers.stats;
                match fetch_and_apply(&engine, &handle, author, ids).await {
                    Ok(n) => {
                        ReplicationStats::add(&stats.cdc_fetched, 1);
                        ReplicationStats::add(&stats.cdc_applied, n);
                    }
                    Err(e) => tracing::debug!(error = %e, "CDC fetch failed; anti-entropy will catch up"),
                }
            });
        }
    }
}

/// Fetches `ids` from `peer` in request-sized chunks, asking again for what
/// an answer defers (only ids we asked for, a bounded number of times), and
/// applies them; returns how many won.
async fn fetch_and_apply(
    engine: &SyncEngine,
    handle: &NodeHandle,
    peer: PeerId,
    ids: Vec<String>,
) -> Result<u64, String> {
    let asked: HashSet<String> = ids.iter().cloned().collect();
    let mut queue = ids;
    let mut applied = 0;
    let mut rounds = 0;
    while !queue.is_empty() {
        rounds += 1;
        if rounds > asked.len() + 8 {
            return Err("peer keeps deferring".into());
        }
        let rest = queue.split_off(queue.len().min(MAX_ITEMS));
        let chunk = std::mem::replace(&mut queue, rest);
        let mut tries = 0;
        let answer = loop {
            match handle
                .request(
                    peer,
                    Request::Fetch {
                        session: 0,
                        ids: chunk.clone(),
                    },
                )
                .await?
            {
                Response::Refused { reason } if reason == "busy" && tries < 5 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
                other => break other,
            }
        };
        match answer {
            Response::Fetch { items, deferred } => {
                applied += engine.apply_from_peer(items).await.map_err(|e| e.to_string())?;
                queue.extend(deferred.into_iter().filter(|id| asked.contains(id)));
            }
            other => return Err(format!("fetch answered with {other:?}")),
        }
    }
    Ok(applied)
}

/// An answer in progress: its global permit and its place in the peer's cap.
struct AnswerSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    peers: Arc<Peers>,
    peer: PeerId,
}

impl Drop for AnswerSlot {
    fn drop(&mut self) {
        self.peers.end_answer(self.peer);
    }
}

/// A bootstrap address redialed with exponential backoff while its peer is
/// not connected.
struct Redial {
    addr: Multiaddr,
    peer: Option<PeerId>,
    next: Instant,
    backoff: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Inbound sync requests answered at once (each may hold a frame of items).
const MAX_ANSWERING: usize = 32;

struct SwarmTask {
    engine: Arc<SyncEngine>,
    peers: Arc<Peers>,
    own: mpsc::Sender<Command>,
    cdc: mpsc::Sender<(PeerId, CdcDelta)>,
    cluster: String,
    traffic: Arc<Traffic>,
    topics: [IdentTopic; 2],
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, String>>>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    manual_blocks: HashSet<PeerId>,
    bans: HashSet<PeerId>,
    redial: Vec<Redial>,
    allow: HashSet<PeerId>,
    /// Inbound requests being answered; more are refused as busy.
    answering: Arc<tokio::sync::Semaphore>,
}

impl SwarmTask {
    async fn run(
        mut self,
        mut swarm: Swarm<NodeBehaviour>,
        mut commands: mpsc::Receiver<Command>,
        gossip_every: Duration,
    ) {
        let mut announce = tokio::time::interval(gossip_every);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(cmd) => self.on_command(&mut swarm, cmd),
                },
                _ = announce.tick() => {
                    if self.engine.is_ready() {
                        let msg = gossip::encode_roots(&self.cluster, self.engine.root_announcement());
                        self.publish(&mut swarm, Topic::Roots, vec![msg]);
                    }
                }
                _ = housekeeping.tick() => self.housekeeping(&mut swarm),
                event = swarm.select_next_some() => self.on_event(&mut swarm, event),
            }
        }
    }

    fn publish(&self, swarm: &mut Swarm<NodeBehaviour>, topic: Topic, msgs: Vec<Vec<u8>>) {
        let t = match topic {
            Topic::Roots => &self.topics[0],
            Topic::Cdc => &self.topics[1],
        };
        for m in msgs {
            self.traffic.sent.fetch_add(m.len() as u64, Ordering::Relaxed);
            match swarm.behaviour_mut().gossip.publish(t.clone(), m) {
                Ok(_) => {
                    if matches!(topic, Topic::Cdc) {
                        ReplicationStats::add(&self.peers.stats.cdc_published, 1);
                    }
                }
                // No subscribed peer yet (alone, or just started): anti-entropy covers it.
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                Err(e) => tracing::debug!(error = %e, "gossip publish failed"),
            }
        }
    }

    /// Redials bootstrap peers that are due, lifts expired bans.
    fn housekeeping(&mut self, swarm: &mut Swarm<NodeBehaviour>) {
        let now = Instant::now();
        for r in &mut self.redial {
            let connected = r.peer.is_some_and(|p| swarm.is_connected(&p));
            if connected || r.next > now || r.peer.is_some_and(|p| self.manual_blocks.contains(&p)) {
                continue;
            }
            if let Err(e) = swarm.dial(r.addr.clone()) {
                tracing::debug!(addr = %r.addr, error = %e, "bootstrap dial failed");
            }
            r.next = now + r.backoff;
            r.backoff = (r.backoff * 2).min(MAX_BACKOFF);
        }
        for peer in self.peers.expired_bans() {
            self.bans.remove(&peer);
            if !self.manual_blocks.contains(&peer) {
                swarm.behaviour_mut().blocked.unblock_peer(peer);
                tracing::info!(%peer, "ban lifted");
            }
        }
    }

    fn on_command(&mut self, swarm: &mut Swarm<NodeBehaviour>, cmd: Command) {
        match cmd {
            Command::Dial(addr, done) => {
                let peer = peer_of(&addr);
                match (swarm.dial(addr), peer) {
                    (Err(e), _) => drop(done.send(Err(e.to_string()))),
                    (Ok(()), Some(peer)) if swarm.is_connected(&peer) => drop(done.send(Ok(()))),
                    (Ok(()), Some(peer)) => self.dials.entry(peer).or_default().push(done),
                    (Ok(()), None) => drop(done.send(Ok(()))),
                }
            }
            Command::Block(peer, on) => {
                if on {
                    self.manual_blocks.insert(peer);
                    swarm.behaviour_mut().blocked.block_peer(peer);
                } else {
                    self.manual_blocks.remove(&peer);
                    if !self.bans.contains(&peer) {
                        swarm.behaviour_mut().blocked.unblock_peer(peer);
                    }
                    for r in self.redial.iter_mut().filter(|r| r.peer == Some(peer)) {
                        r.next = Instant::now();
                        r.backoff = Duration::from_secs(1);
                    }
                }
            }
            Command::Peers(done) => {
                let _ = done.send(swarm.connected_peers().copied().collect());
            }
            Command::Request(peer, _, done) if !swarm.is_connected(&peer) => {
                let _ = done.send(Err(format!("peer {peer} is not connected")));
            }
            Command::Request(peer, req, done) => {
                let id = swarm.behaviour_mut().sync.send_request(&peer, req);
                self.pending.insert(id, done);
            }
            Command::Respond(channel, resp) => {
                if swarm.behaviour_mut().sync.send_response(channel, resp).is_err() {
                    tracing::debug!("peer went away before our answer");
                }
            }
            Command::Publish(topic, msgs) => self.publish(swarm, topic, msgs),
        }
    }

    fn penalize(&mut self, swarm: &mut Swarm<NodeBehaviour>, peer: PeerId, why: &str) {
        if self.peers.penalize(peer, why) {
            self.bans.insert(peer);
            swarm.behaviour_mut().blocked.block_peer(peer);
        }
    }

    fn on_gossip(&mut self, swarm: &mut Swarm<NodeBehaviour>, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        // Strict signing: every accepted message names its author.
        let Some(author) = message.source else {
            self.penalize(swarm, propagation_source, "unsigned gossip");
            return;
        };
        self.traffic
            .received
            .fetch_add(message.data.len() as u64, Ordering::Relaxed);
        let verdict = match gossip::decode(&self.cluster, &message.topic, &message.data) {
            Err(why) => {
                self.penalize(swarm, propagation_source, &why);
                MessageAcceptance::Reject
            }
            Ok(_) if !self.peers.allow_gossip(propagation_source) => MessageAcceptance::Ignore,
            // With an allowlist, only members may author anything.
            Ok(_) if !self.allow.is_empty() && !self.allow.contains(&author) && author != *swarm.local_peer_id() => {
                MessageAcceptance::Ignore
            }
            Ok(Gossip::Roots(theirs)) => {
                if swarm.is_connected(&author) {
                    self.peers.on_roots(author, theirs, &self.engine.root_announcement());
                }
                MessageAcceptance::Accept
            }
            Ok(Gossip::Cdc(_)) if self.peers.must_resync(author) => MessageAcceptance::Ignore,
            Ok(Gossip::Cdc(deltas)) => {
                for delta in deltas {
                    if self.cdc.try_send((author, delta)).is_err() {
                        // The applier is behind: anti-entropy will bring it.
                        ReplicationStats::add(&self.peers.stats.cdc_dropped, 1);
                    }
                }
                MessageAcceptance::Accept
            }
        };
        swarm
            .behaviour_mut()
            .gossip
            .report_message_validation_result(&message_id, &propagation_source, verdict);
    }

    fn on_sync(&mut self, swarm: &mut Swarm<NodeBehaviour>, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let refusal = if matches!(request, Request::Push { .. }) && self.peers.must_resync(peer) {
                        Some("resync required: silent past member_expiry, rejoin with an empty data dir")
                    } else if !self.peers.allow_request(peer) {
                        Some("rate limited")
                    } else if !self.peers.begin_answer(peer) {
                        Some("busy")
                    } else {
                        None
                    };
                    let permit = match (refusal, self.answering.clone().try_acquire_owned()) {
                        (None, Ok(p)) => p,
                        (refusal, _) => {
                            if refusal.is_none() {
                                self.peers.end_answer(peer);
                            }
                            let reason = refusal.unwrap_or("busy").into();
                            let _ = swarm
                                .behaviour_mut()
                                .sync
                                .send_response(channel, Response::Refused { reason });
                            return;
                        }
                    };
                    let (engine, own) = (self.engine.clone(), self.own.clone());
                    // Released however the answer ends (even by a panic).
                    let slot = AnswerSlot {
                        _permit: permit,
                        peers: self.peers.clone(),
                        peer,
                    };
                    tokio::spawn(async move {
                        let resp = engine.answer_sync_request(request).await;
                        drop(slot);
                        let _ = own.send(Command::Respond(channel, resp)).await;
                    });
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(done) = self.pending.remove(&request_id) {
                        let _ = done.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if let Some(done) = self.pending.remove(&request_id) {
                    let _ = done.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                if let request_response::InboundFailure::Io(e) = &error
                    && e.kind() == std::io::ErrorKind::InvalidData
                {
                    self.penalize(swarm, peer, &e.to_string());
                } else {
                    tracing::debug!(%peer, %error, "inbound sync request failed");
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_event(&mut self, swarm: &mut Swarm<NodeBehaviour>, event: SwarmEvent<NodeBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Sync(e)) => self.on_sync(swarm, e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Gossip(e)) => self.on_gossip(swarm, e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Identify(identify::Event::Received {
                peer_id, info, ..
            })) => {
                let region = info
                    .agent_version
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("region="))
                    .map(str::to_string);
                self.peers.set_region(peer_id, region);
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                tracing::info!(peer = %peer_id, "peer connected");
                self.peers.connected(peer_id, true);
                for r in self.redial.iter_mut().filter(|r| r.peer == Some(peer_id)) {
                    r.backoff = Duration::from_secs(1);
                }
                for done in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = done.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.peers.connected(peer_id, false);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "could not connect");
                for done in self.dials.remove(&peer).unwrap_or_default() {
                    let _ = done.send(Err(error.to_string()));
                }
            }
            SwarmEvent::IncomingConnectionError {
                error, send_back_addr, ..
            } => {
                tracing::debug!(from = %send_back_addr, %error, "refused an incoming connection");
            }
            _ => {}
        }
    }
}
