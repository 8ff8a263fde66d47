//! The libp2p side of a node: TCP (+ DNS, + pnet) + Noise + Yamux, identify,
//! ping, gossipsub (roots and CDC, strictly signed, validated before
//! forwarding), the anti-entropy and membership request-response protocols,
//! an optional peer allowlist, a block list (partitions, bans), redials of
//! bootstrap addresses with backoff, and connections kept to the members
//! SWIM knows (up to `max_peers`, covering every region). One task owns the swarm; the rest of the node talks to it through
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
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, identity, ping};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use syncnode_protocol::membership::{MAX_ADDRS, MemberId, MembershipConfig};
use syncnode_protocol::session::Progress;
use syncnode_protocol::wire::{CdcDelta, DEFAULT_MAX_FRAME, Request, Response};
use syncnode_protocol::wire::{MemberAck, MemberPacket};
use tokio::sync::{mpsc, oneshot};

pub use super::addressing::peer_of;
use super::addressing::{advertised, check_port_free};
use super::anti_entropy::SyncError;
use super::connections::ConnectionLog;
use super::gossip::{self, GOSSIP_MAX, Gossip};
use super::membership::{ClusterPacket, MEMBERS_PROTOCOL, MemberCodec, MemberTable};
use super::peers::{PeerLimits, Peers, Refusal, ReplicationStats};
use super::swim::{Blocked, Links, PacketRefusal, Swim, wall_ms};
use super::transport::{SYNC_PROTOCOL, SyncCodec, Traffic, tcp_transport};
use crate::engine::SyncEngine;

#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    limits: connection_limits::Behaviour,
    allowed: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    blocked: allow_block_list::Behaviour<BlockedPeers>,
    sync: request_response::Behaviour<SyncCodec>,
    members: request_response::Behaviour<MemberCodec>,
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
    /// Leave the cluster (SIGTERM): tell a few members we go.
    Leave(oneshot::Sender<()>),
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
    /// How long purge records are kept (a member away longer must resync).
    pub ledger_retention: Duration,
    /// Addresses other nodes dial; empty: the listen addresses, with
    /// `0.0.0.0` / `::` expanded to the interfaces' addresses.
    pub advertise: Vec<Multiaddr>,
    /// Members to keep connections to (past that, a subset covering every region).
    pub max_peers: usize,
    /// SWIM's probe period; every membership timing follows from it.
    pub probe_interval: Duration,
    /// How long a joining node waits for a member before it takes itself
    /// to be the first node (readiness).
    pub join_timeout: Duration,
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
            ledger_retention: Duration::from_secs(30 * 86_400),
            advertise: Vec::new(),
            max_peers: 32,
            probe_interval: Duration::from_millis(250),
            join_timeout: Duration::from_secs(30),
        }
    }
}

/// The running network side of a node.
#[derive(Clone)]
pub struct NodeHandle {
    pub peer_id: PeerId,
    /// Every address listened on (wildcards expanded).
    pub listen_addrs: Vec<Multiaddr>,
    /// What other nodes are told to dial (`advertise`).
    pub advertised: Vec<Multiaddr>,
    /// SWIM's view of the cluster, clock offsets.
    pub members: Arc<MemberTable>,
    /// When the node started and how long it waits for a member
    /// (readiness), and whether it has anyone to join through.
    pub started: Instant,
    pub join_timeout: Duration,
    pub seeded: bool,
    pub probe_interval: Duration,
    commands: mpsc::Sender<Command>,
    pub traffic: Arc<Traffic>,
    /// Bytes of SWIM traffic (the membership protocol).
    pub member_traffic: Arc<Traffic>,
    /// Peer roots, lag, sessions, penalties, members, counters.
    pub peers: Arc<Peers>,
    sessions: Arc<AtomicU64>,
    cluster: String,
}

impl NodeHandle {
    /// This node's first listen address with its peer id: what another node
    /// dials (or lists in `bootstrap`).
    pub fn dial_addr(&self) -> Multiaddr {
        self.advertised[0]
            .clone()
            .with(libp2p::multiaddr::Protocol::P2p(self.peer_id))
    }

    /// Leaves the cluster: a few members hear it from us, so we show as
    /// left at once rather than failed after the suspicion timeout.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = rx.await;
            // Let the goodbye reach the wire before the process ends.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Why this node is not ready to serve reads yet, if it is not: a node
    /// that has peers to join through waits until it has caught up with one
    /// (a session finished or equal roots), or until `join_timeout` passed
    /// with no member connected (it is the first node).
    /// `our_items`: entries this node holds.
    pub fn not_ready(&self, our_items: u64) -> Option<String> {
        if !self.seeded || self.peers.joined() {
            return None;
        }
        let waited = self.started.elapsed();
        // Members only: a connected outsider (another cluster) is nobody to join.
        let connected = self.members.connected_active();
        if connected == 0 && !self.peers.met_member() && waited >= self.join_timeout {
            // Latched: a member that shows up later is joined like any other.
            self.peers
                .mark_joined("nobody", "no member answered within join_timeout: first node");
            return None;
        }
        if connected > 0
            && connected == self.members.active().len()
            && self.peers.all_connected_empty()
            && our_items == 0
        {
            self.peers.mark_joined("everyone", "the cluster is empty");
            return None;
        }
        Some(if connected == 0 {
            format!(
                "joining: no member reached yet ({} s of join_timeout {} s)",
                waited.as_secs(),
                self.join_timeout.as_secs()
            )
        } else {
            "joining: first anti-entropy session with a member not finished yet".to_string()
        })
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
                    if !handle.peers.session_started(peer, id, engine.clock()) {
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
        if bootstrap || !self.peers.ledger_learned() {
            self.learn_ledger(engine, peer).await?;
            self.peers.set_ledger_learned();
        }
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

    /// Copies `peer`'s purge ledger into ours (DESIGN §6): a node that joins
    /// after a purge must refuse the versions those deletes beat, or it
    /// would be the way back for them.
    async fn learn_ledger(&self, engine: &SyncEngine, peer: PeerId) -> Result<(), SyncError> {
        let mut after: Option<String> = None;
        let mut learned = 0;
        loop {
            match self
                .request(peer, Request::Ledger { after: after.clone() })
                .await
                .map_err(SyncError::Transport)?
            {
                Response::Ledger { entries, next } => {
                    learned += engine.import_purge_ledger(entries).await?;
                    // The cursor must move forward, or the peer is stalling us.
                    match next {
                        Some(n) if after.as_ref().is_none_or(|a| n > *a) => after = Some(n),
                        Some(_) => return Err(SyncError::Transport("ledger cursor did not advance".into())),
                        None => break,
                    }
                }
                other => return Err(SyncError::Transport(format!("ledger answered with {other:?}"))),
            }
        }
        if learned > 0 {
            tracing::info!(%peer, learned, "purge ledger learned from the bootstrap peer");
        }
        Ok(())
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
    for addr in &config.listen {
        check_port_free(addr)?;
    }
    let member_traffic = Arc::new(Traffic::default());
    let member_codec = MemberCodec {
        cluster: config.cluster.clone(),
        traffic: member_traffic.clone(),
    };
    let mut swarm: Swarm<NodeBehaviour> = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| tcp_transport(key, psk))
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
                members: request_response::Behaviour::with_codec(
                    member_codec,
                    [(MEMBERS_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(5))
                        .with_max_concurrent_streams(32),
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
    let mut listeners = HashSet::new();
    for addr in &config.listen {
        listeners.insert(
            swarm
                .listen_on(addr.clone())
                .map_err(|e| anyhow::anyhow!("listen {addr}: {e}"))?,
        );
    }
    // A wildcard listener reports one address per interface, in a burst:
    // wait for every listener's first, then take what follows shortly.
    let mut listen_addrs = Vec::new();
    let mut heard = HashSet::new();
    let mut settle = None;
    // Other events meanwhile (a member reconnecting to a restarted node)
    // are handed to the swarm task, not lost.
    let mut early = Vec::new();
    loop {
        let event = match settle {
            None => Some(swarm.select_next_some().await),
            Some(until) => tokio::time::timeout_at(until, swarm.select_next_some()).await.ok(),
        };
        match event {
            None => break,
            Some(SwarmEvent::NewListenAddr { listener_id, address }) => {
                heard.insert(listener_id);
                listen_addrs.push(address);
                if heard.len() == listeners.len() && settle.is_none() {
                    settle = Some(tokio::time::Instant::now() + Duration::from_millis(150));
                }
            }
            Some(SwarmEvent::ListenerError { error, .. }) => anyhow::bail!("listen: {error}"),
            Some(SwarmEvent::ListenerClosed { addresses, reason, .. }) => {
                anyhow::bail!("listen {addresses:?}: closed: {reason:?}")
            }
            Some(other) => early.push(other),
        }
    }
    let advertise = advertised(&config.advertise, &listen_addrs);
    let peer_id = *swarm.local_peer_id();
    let (tx, rx) = mpsc::channel(1024);
    let (cdc_tx, cdc_rx) = mpsc::channel(8192);
    let peers = Arc::new(Peers::new(
        config.limits.clone(),
        config.members_file.clone(),
        config.member_expiry,
        config.ledger_retention,
    ));
    // Seeds: the bootstrap list, and the members known before a restart
    // (at their last addresses), so a node finds the cluster again even
    // when its bootstrap peers are gone.
    let mut seeds: Vec<(Multiaddr, bool)> = config.bootstrap.iter().map(|a| (a.clone(), true)).collect();
    for (peer, m) in peers.members() {
        let Ok(id) = peer.parse::<PeerId>() else { continue };
        for a in m.addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
            seeds.push((a.with(libp2p::multiaddr::Protocol::P2p(id)), false));
        }
    }
    let seeded = !seeds.is_empty();
    if !seeded {
        // The first node: there is no ledger to learn.
        peers.set_ledger_learned();
    }
    let mut advertise = advertise;
    if advertise.len() > MAX_ADDRS {
        tracing::warn!(
            addresses = advertise.len(),
            kept = MAX_ADDRS,
            "more addresses than a member may advertise; set `advertise` to the ones other nodes can reach"
        );
        advertise.truncate(MAX_ADDRS);
    }
    let me = MemberId {
        peer: peer_id.to_string(),
        addrs: advertise.iter().map(|a| a.to_string()).collect(),
        region: config.region.clone(),
        // A restart takes over the entry of the run before it.
        bump: peers.next_bump(wall_ms()),
    };
    let members = Arc::new(MemberTable::default());
    let swim = Swim::new(
        me,
        MembershipConfig {
            probe_period: config.probe_interval,
        },
        members.clone(),
        peers.clone(),
        engine.clone(),
        config.cluster.clone(),
        config.max_peers,
    );
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
        advertised: advertise,
        members: members.clone(),
        started: Instant::now(),
        join_timeout: config.join_timeout,
        seeded,
        probe_interval: config.probe_interval,
        commands: tx.clone(),
        traffic,
        member_traffic,
        peers: peers.clone(),
        sessions: Arc::new(AtomicU64::new(0)),
        cluster: config.cluster.clone(),
    };
    tokio::spawn(super::cdc::apply_cdc(engine.clone(), handle.clone(), cdc_rx));
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
        swim,
        log: ConnectionLog::default(),
        redial: seeds
            .into_iter()
            .map(|(addr, configured)| Redial {
                configured,
                peer: peer_of(&addr),
                addr,
                next: Instant::now(),
                backoff: Duration::from_secs(1),
            })
            .collect(),
    };
    tokio::spawn(node.run(swarm, rx, config.gossip_interval, early));
    Ok(handle)
}

/// The network as the membership driver sees it.
impl Links for Swarm<NodeBehaviour> {
    fn local_peer(&self) -> PeerId {
        *self.local_peer_id()
    }

    fn linked(&self, peer: &PeerId) -> bool {
        self.is_connected(peer)
    }

    fn linked_peers(&self) -> Vec<PeerId> {
        self.connected_peers().copied().collect()
    }

    fn send_packet(&mut self, peer: PeerId, addrs: &[String], packet: MemberPacket) {
        if !self.is_connected(&peer) {
            for a in addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
                self.add_peer_address(peer, a);
            }
        }
        let packet = ClusterPacket {
            cluster: String::new(),
            packet,
        };
        self.behaviour_mut().members.send_request(&peer, packet);
    }

    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.dial(opts) {
            tracing::debug!(%peer, error = %e, "member dial failed");
        }
    }

    fn drop_link(&mut self, peer: PeerId) {
        let _ = self.disconnect_peer_id(peer);
    }
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
    /// From `bootstrap` (its failures are worth a WARN), not a remembered member.
    configured: bool,
    addr: Multiaddr,
    peer: Option<PeerId>,
    next: Instant,
    backoff: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Inbound sync requests answered at once (each may hold a frame of items).
const MAX_ANSWERING: usize = 32;

struct SwarmTask {
    /// Membership: SWIM and what follows from it.
    swim: Swim,
    log: ConnectionLog,
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
        early: Vec<SwarmEvent<NodeBehaviourEvent>>,
    ) {
        for event in early {
            self.on_event(&mut swarm, event);
        }
        let mut announce = tokio::time::interval(gossip_every);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        let mut swim = tokio::time::interval(Duration::from_millis(20));
        swim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = swim.tick() => {
                    let blocked = Blocked { manual: &self.manual_blocks, bans: &self.bans };
                    self.swim.tick(&mut swarm, &blocked);
                }
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

    fn maintain_members(&mut self, swarm: &mut Swarm<NodeBehaviour>) {
        let blocked = Blocked {
            manual: &self.manual_blocks,
            bans: &self.bans,
        };
        self.swim.maintain(swarm, &blocked, &mut self.log);
    }

    /// Keeps the member connections, redials bootstrap peers that are due,
    /// lifts expired bans.
    fn housekeeping(&mut self, swarm: &mut Swarm<NodeBehaviour>) {
        self.maintain_members(swarm);
        let now = Instant::now();
        // A seed without a peer id is only needed while we know nobody.
        let alone = self.swim.alone();
        for r in &mut self.redial {
            let connected = match r.peer {
                Some(p) => swarm.is_connected(&p),
                None => !alone,
            };
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
                    // Connected, or being dialed already (a member we keep).
                    (Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)), Some(peer)) => {
                        if swarm.is_connected(&peer) {
                            let _ = done.send(Ok(()));
                        } else {
                            self.dials.entry(peer).or_default().push(done);
                        }
                    }
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
                    let blocked = Blocked {
                        manual: &self.manual_blocks,
                        bans: &self.bans,
                    };
                    self.swim.unblocked(swarm, &blocked, peer);
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
            Command::Leave(done) => {
                let blocked = Blocked {
                    manual: &self.manual_blocks,
                    bans: &self.bans,
                };
                self.swim.leave(swarm, &blocked);
                let _ = done.send(());
            }
        }
    }

    fn on_members(
        &mut self,
        swarm: &mut Swarm<NodeBehaviour>,
        event: request_response::Event<ClusterPacket, MemberAck>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let blocked = Blocked {
                        manual: &self.manual_blocks,
                        bans: &self.bans,
                    };
                    match self.swim.on_packet(swarm, &blocked, &mut self.log, peer, request) {
                        Ok(ack) => {
                            let _ = swarm.behaviour_mut().members.send_response(channel, ack);
                        }
                        Err(PacketRefusal::Penalize(why)) => self.penalize(swarm, peer, &why),
                        Err(PacketRefusal::Drop) => {}
                    }
                }
                request_response::Message::Response { response, .. } => self.swim.on_ack(peer, response),
            },
            request_response::Event::InboundFailure { peer, error, .. } => {
                self.on_protocol_failure(swarm, peer, &error)
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::trace!(%peer, %error, "membership packet not delivered");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// An inbound request we could not read: garbage is penalized, and a
    /// peer of another cluster is named in the log.
    fn on_protocol_failure(
        &mut self,
        swarm: &mut Swarm<NodeBehaviour>,
        peer: PeerId,
        error: &request_response::InboundFailure,
    ) {
        if let request_response::InboundFailure::Io(e) = error
            && e.kind() == std::io::ErrorKind::InvalidData
        {
            let text = e.to_string();
            if text.contains("message for cluster") {
                self.log.wrong_cluster(peer, &text);
            }
            self.penalize(swarm, peer, &text);
        } else {
            tracing::debug!(%peer, %error, "inbound request failed");
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
            Ok(Gossip::Cdc(_)) if self.peers.must_resync(author) || !self.peers.ledger_learned() => {
                MessageAcceptance::Ignore
            }
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
                    let push = matches!(request, Request::Push { .. });
                    let admitted = self.peers.admit_request(peer, push);
                    let permit = match (admitted, self.answering.clone().try_acquire_owned()) {
                        (Ok(()), Ok(p)) => p,
                        (admitted, _) => {
                            let refusal = match admitted {
                                Ok(()) => {
                                    self.peers.end_answer(peer);
                                    Refusal::Busy
                                }
                                Err(r) => r,
                            };
                            let reason = refusal.reason().into();
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
                self.on_protocol_failure(swarm, peer, &error)
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_event(&mut self, swarm: &mut Swarm<NodeBehaviour>, event: SwarmEvent<NodeBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Sync(e)) => self.on_sync(swarm, e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Gossip(e)) => self.on_gossip(swarm, e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Members(e)) => self.on_members(swarm, e),
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
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                tracing::info!(peer = %peer_id, "peer connected");
                self.swim.connected(peer_id, endpoint.is_listener());
                self.peers.connected(peer_id, true);
                for r in self.redial.iter_mut().filter(|r| r.peer == Some(peer_id)) {
                    r.backoff = Duration::from_secs(1);
                }
                for done in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = done.send(Ok(()));
                }
                self.maintain_members(swarm);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.peers.connected(peer_id, false);
                self.swim.disconnected(peer_id);
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, ?error, "could not connect");
                let seed = self
                    .redial
                    .iter()
                    .any(|r| r.configured && (r.peer == peer_id || r.peer.is_none()));
                self.log.dial_failed(peer_id, &error, seed);
                if let Some(peer) = peer_id {
                    for done in self.dials.remove(&peer).unwrap_or_default() {
                        let _ = done.send(Err(error.to_string()));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                error, send_back_addr, ..
            } => self.log.incoming_failed(&send_back_addr, &error),
            _ => {}
        }
    }
}
