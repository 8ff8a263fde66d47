//! The libp2p side of a node: TCP (+ DNS, + pnet) + Noise + Yamux, identify,
//! ping, gossipsub (roots and CDC, strictly signed, validated before
//! forwarding), the anti-entropy and membership request-response protocols,
//! an optional peer allowlist, a block list (partitions, bans), redials of
//! bootstrap addresses with backoff, and connections kept to the members
//! SWIM knows (up to `max_peers`, covering every region). One task owns the swarm; the rest of the node talks to it through
//! a `NodeHandle`. Inbound requests are answered by the engine on their own
//! task, so a slow answer never stalls the swarm; outbound sessions run on
//! their own tasks, each request going through the swarm and back.

use crate::config::defaults;
use futures::{FutureExt, StreamExt};
use libp2p::allow_block_list::{self, AllowedPeers, BlockedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::pnet::PreSharedKey;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, identity, ping};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use syncnode_protocol::membership::{MAX_ADDRS, MemberId};
use syncnode_protocol::replica::{Input, Output, ReplicaConfig, Task, TaskResult, Verdict, run_task};
use syncnode_protocol::session::Progress;
use syncnode_protocol::wire::{Body, DEFAULT_MAX_FRAME, Envelope, MemberAck, MemberPacket, Request, Response};
use tokio::sync::{mpsc, oneshot};

pub use super::addressing::peer_of;
use super::addressing::{advertised, check_port_free};
use super::anti_entropy::wire_item;
use super::connections::ConnectionLog;
use super::gossip::{self, GOSSIP_MAX};
use super::membership::{ClusterPacket, MEMBERS_PROTOCOL, MemberCodec, MemberTable};
use super::metrics::{NetMetrics, P2pRecorder};
use super::peers::{PeerLimits, Peers, known_members};
use super::swim::{Blocked, Links, PacketRefusal, Swim};
use super::transport::{SYNC_PROTOCOLS, SyncCodec, Traffic, common_wire, tcp_transport};
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

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Peers(oneshot::Sender<Vec<PeerId>>),
    /// Blocks or unblocks a peer; answers once it is in effect.
    Block(PeerId, bool, oneshot::Sender<()>),
    /// Local commits, for the core to publish as CDC.
    Committed(Vec<crate::engine::SyncItem>),
    /// Storage work the core asked for is done.
    Done(u64, TaskResult),
    /// Start sessions on their own every so often (`None`: only on request).
    Sessions(Option<Duration>),
    /// Run a session with this peer now and tell how it ended.
    Reconcile(PeerId, oneshot::Sender<Result<Progress, String>>),
    /// Leave the cluster (SIGTERM): tell a few members we go.
    Leave(oneshot::Sender<()>),
    /// Stop: the swarm task ends, its storage work is waited for, the
    /// members file is written.
    Shutdown(oneshot::Sender<()>),
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
    /// How old a tombstone must be before it may be purged.
    pub tombstone_grace: Duration,
    /// CDC deltas to pass on are batched this long (one message carries
    /// many writes).
    pub cdc_batch: Duration,
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
            request_timeout: defaults::PEER_REQUEST_TIMEOUT,
            // Faster than a node's defaults, so test clusters settle quickly.
            gossip_interval: Duration::from_millis(250),
            limits: PeerLimits::default(),
            members_file: None,
            member_expiry: defaults::MEMBER_EXPIRY,
            tombstone_grace: defaults::TOMBSTONE_GRACE,
            cdc_batch: defaults::CDC_BATCH,
            ledger_retention: defaults::LEDGER_RETENTION,
            advertise: Vec::new(),
            max_peers: defaults::MAX_PEERS,
            probe_interval: Duration::from_millis(250),
            join_timeout: defaults::JOIN_TIMEOUT,
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
    /// Session and CDC latencies, libp2p's metrics.
    pub metrics: NetMetrics,
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

    /// Cuts (`true`) or restores (`false`) the link to a peer: a blocked peer
    /// is disconnected and its connections are refused (partitions).
    pub async fn block(&self, peer: PeerId, blocked: bool) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Block(peer, blocked, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The peers connected now.
    pub async fn peers(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Peers(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Runs anti-entropy on its own: every `interval` (jittered) the core
    /// starts a session with each connected peer whose announced root
    /// differed from ours twice in a row (the first difference may be
    /// writes still in flight). One session per peer at a time.
    pub async fn spawn_anti_entropy(&self, interval: Duration) {
        let _ = self.commands.send(Command::Sessions(Some(interval))).await;
    }

    /// Stops starting sessions on their own (running ones finish).
    pub async fn stop_anti_entropy(&self) {
        let _ = self.commands.send(Command::Sessions(None)).await;
    }

    /// Publishes this node's committed writes as CDC deltas (the core packs
    /// them). Batches the swarm could not keep up with are left to
    /// anti-entropy.
    pub fn spawn_cdc(&self, engine: Arc<SyncEngine>) -> tokio::task::JoinHandle<()> {
        let commands = self.commands.clone();
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
                if commands.send(Command::Committed(batch.to_vec())).await.is_err() {
                    return;
                }
            }
        })
    }

    /// Runs one anti-entropy session with `peer` now (after learning its
    /// purge ledger when this node has not yet) and waits for its end.
    pub async fn reconcile(&self, peer: PeerId) -> Result<Progress, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Reconcile(peer, tx))
            .await
            .map_err(|_| "node stopped".to_string())?;
        rx.await.map_err(|_| "node stopped".to_string())?
    }

    /// Stops the network side: the swarm task ends once the storage work
    /// it started is done, and the members file is written. Call it before
    /// the engine's shutdown.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
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
                    SYNC_PROTOCOLS.map(|p| (p, ProtocolSupport::Full)),
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
                // Peers learn the advertised addresses (set as external
                // addresses below), never every listen address: a loopback or
                // container-internal one would make them dial themselves.
                identify: identify::Behaviour::new(
                    identify::Config::new("/syncnode/1".into(), key.public())
                        .with_agent_version(agent)
                        .with_hide_listen_addrs(true),
                ),
                // A ping that fails closes its connection (see `on_event`):
                // a link cut without a FIN or RST would otherwise stay
                // "established" for minutes, and hold the peer's connection
                // slots (max 2 per peer) while new connections are refused.
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY).with_timeout(PING_TIMEOUT)),
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
    let mut advertise = advertised(&config.advertise, &listen_addrs);
    if advertise.len() > MAX_ADDRS {
        tracing::warn!(
            addresses = advertise.len(),
            kept = MAX_ADDRS,
            "more addresses than a member may advertise; set `advertise` to the ones other nodes can reach"
        );
        advertise.truncate(MAX_ADDRS);
    }
    for a in &advertise {
        swarm.add_external_address(a.clone());
    }
    let peer_id = *swarm.local_peer_id();
    // Seeds: the bootstrap list, and the members known before a restart
    // (at their last addresses), so a node finds the cluster again even
    // when its bootstrap peers are gone.
    let members_file = config.members_file.clone();
    let known = members_file.as_deref().map(known_members).unwrap_or_default();
    let mut seeds: Vec<(Multiaddr, bool)> = config.bootstrap.iter().map(|a| (a.clone(), true)).collect();
    for (peer, m) in &known {
        let Ok(id) = peer.parse::<PeerId>() else { continue };
        for a in m.addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
            seeds.push((a.with(libp2p::multiaddr::Protocol::P2p(id)), false));
        }
    }
    let seeded = !seeds.is_empty();
    let ms = |d: Duration| d.as_millis() as u64;
    let core = ReplicaConfig {
        cluster: config.cluster.clone(),
        me: MemberId {
            peer: peer_id.to_string(),
            addrs: advertise.iter().map(|a| a.to_string()).collect(),
            region: config.region.clone(),
            // Set by the core: a restart takes over the entry of the run before it.
            bump: 0,
        },
        gossip_interval_ms: ms(config.gossip_interval),
        anti_entropy_interval_ms: ms(config.gossip_interval),
        request_timeout_ms: ms(config.request_timeout),
        tombstone_grace_ms: ms(config.tombstone_grace),
        member_expiry_ms: ms(config.member_expiry),
        ledger_retention_ms: ms(config.ledger_retention),
        probe_interval_ms: ms(config.probe_interval),
        max_clock_skew_ms: engine.config().max_clock_skew_ms,
        limits: config.limits.clone(),
        seeded,
        cdc_batch_ms: ms(config.cdc_batch),
    };
    let peers = Arc::new(Peers::new(core, members_file));
    // Sessions start on their own once `spawn_anti_entropy` says how often.
    peers.core(|r, now| r.set_session_interval(now, None));
    let (tx, rx) = mpsc::channel(4096);
    let members = Arc::new(MemberTable::default());
    let swim = Swim::new(
        members.clone(),
        peers.clone(),
        config.cluster.clone(),
        config.max_peers,
        config.probe_interval,
        engine.config().max_clock_skew_ms,
    );
    let (net_metrics, p2p) = super::metrics::new();
    let handle = NodeHandle {
        metrics: net_metrics.clone(),
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
    };
    let node = SwarmTask {
        summary: (Instant::now(), [0; 7]),
        p2p,
        metrics: net_metrics,
        engine,
        peers,
        own: tx,
        cluster: config.cluster.clone(),
        traffic: handle.traffic.clone(),
        outbound: HashMap::new(),
        inbound: HashMap::new(),
        next_inbound: 0,
        member_channel: None,
        waiters: HashMap::new(),
        queue: VecDeque::new(),
        work: tokio::task::JoinSet::new(),
        last_save: Instant::now(),
        unsaved: None,
        dials: HashMap::new(),
        manual_blocks: HashSet::new(),
        bans: HashSet::new(),
        allow: config.allow_peers.iter().copied().collect(),
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
    tokio::spawn(node.run(swarm, rx, early));
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
/// The members file reaches the disk at most this often (and at shutdown).
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Liveness of each connection: a ping every `PING_EVERY`; one unanswered
/// for `PING_TIMEOUT` closes the connection (long enough for a ping queued
/// behind a large transfer on a slow link).
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How often replication is summed up at INFO (sessions at DEBUG).
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// How long shutdown waits for storage work in flight.
const DRAIN_FOR: Duration = Duration::from_secs(10);

/// The swarm task: the I/O driver of the replication core. It turns swarm
/// events and commands into core inputs and the core's outputs into swarm
/// calls, storage tasks and files.
struct SwarmTask {
    /// When replication was last summed up in the log, and the counters then.
    summary: (Instant, [u64; 7]),
    p2p: P2pRecorder,
    metrics: NetMetrics,
    /// Membership's I/O side: packet checks, member connections.
    swim: Swim,
    log: ConnectionLog,
    engine: Arc<SyncEngine>,
    peers: Arc<Peers>,
    own: mpsc::Sender<Command>,
    cluster: String,
    traffic: Arc<Traffic>,
    /// Our requests in flight: the core's id for each.
    outbound: HashMap<OutboundRequestId, (PeerId, u64)>,
    /// Peers' requests being answered, by the id the core knows them by.
    inbound: HashMap<u64, ResponseChannel<Response>>,
    next_inbound: u64,
    /// The membership packet being handled: where its ack goes.
    member_channel: Option<ResponseChannel<MemberAck>>,
    /// Who waits for the end of a session with a peer.
    waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<Progress, String>>>>,
    /// Inputs the core's outputs led to, fed in turn.
    queue: VecDeque<Input>,
    /// Storage work in flight (waited for at shutdown).
    work: tokio::task::JoinSet<()>,
    last_save: Instant,
    unsaved: Option<syncnode_protocol::replica::MembersFile>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    manual_blocks: HashSet<PeerId>,
    bans: HashSet<PeerId>,
    redial: Vec<Redial>,
    allow: HashSet<PeerId>,
}

impl SwarmTask {
    async fn run(
        mut self,
        mut swarm: Swarm<NodeBehaviour>,
        mut commands: mpsc::Receiver<Command>,
        early: Vec<SwarmEvent<NodeBehaviourEvent>>,
    ) {
        for event in early {
            self.on_event(&mut swarm, event);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        let done = loop {
            tokio::select! {
                _ = tick.tick() => self.feed(&mut swarm, Input::Tick),
                cmd = commands.recv() => match cmd {
                    None => break None,
                    Some(Command::Shutdown(done)) => break Some(done),
                    Some(cmd) => self.on_command(&mut swarm, cmd),
                },
                _ = housekeeping.tick() => self.housekeeping(&mut swarm),
                event = swarm.select_next_some() => self.on_event(&mut swarm, event),
                Some(_) = self.work.join_next(), if !self.work.is_empty() => {}
            }
        };
        // Storage work in flight finishes (or is cut off), then the members
        // file is written: nothing the core learned is lost.
        let drained = tokio::time::timeout(DRAIN_FOR, async { while self.work.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("storage work still running at shutdown; stopped");
            self.work.abort_all();
        }
        let peers = self.peers.clone();
        let _ = tokio::task::spawn_blocking(move || peers.save_members()).await;
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    /// Feeds `input` to the core, carries out what it asks, and feeds in
    /// turn whatever that leads to.
    fn feed(&mut self, swarm: &mut Swarm<NodeBehaviour>, input: Input) {
        self.queue.push_back(input);
        while let Some(input) = self.queue.pop_front() {
            for out in self.peers.handle(input, &self.engine) {
                self.act(swarm, out);
            }
        }
    }

    fn act_all(&mut self, swarm: &mut Swarm<NodeBehaviour>, outs: Vec<Output>) {
        for out in outs {
            self.act(swarm, out);
        }
        while let Some(input) = self.queue.pop_front() {
            for out in self.peers.handle(input, &self.engine) {
                self.act(swarm, out);
            }
        }
    }

    fn act(&mut self, swarm: &mut Swarm<NodeBehaviour>, out: Output) {
        match out {
            Output::Send { peer, id, req } => match peer.parse::<PeerId>() {
                Ok(p) if swarm.is_connected(&p) => {
                    let rid = swarm.behaviour_mut().sync.send_request(&p, req);
                    self.outbound.insert(rid, (p, id));
                }
                _ => self.queue.push_back(Input::Response {
                    peer: peer.clone(),
                    id,
                    result: Err(format!("peer {peer} is not connected")),
                }),
            },
            Output::Respond { id, resp, .. } => {
                if let Some(channel) = self.inbound.remove(&id)
                    && swarm.behaviour_mut().sync.send_response(channel, resp).is_err()
                {
                    tracing::debug!("peer went away before our answer");
                }
            }
            Output::SendMember { peer, addrs, packet } => {
                if let Ok(p) = peer.parse::<PeerId>() {
                    let blocked = Blocked {
                        manual: &self.manual_blocks,
                        bans: &self.bans,
                    };
                    self.swim.send(swarm, &blocked, p, &addrs, packet);
                }
            }
            Output::AckMember { ack, .. } => {
                if let Some(channel) = self.member_channel.take() {
                    let _ = swarm.behaviour_mut().members.send_response(channel, ack);
                }
            }
            Output::Run { task, work } => {
                let (engine, own) = (self.engine.clone(), self.own.clone());
                let cdc_latency = matches!(work, Task::Cdc(_)).then(|| self.metrics.cdc_apply_seconds.clone());
                self.work.spawn(async move {
                    let started = Instant::now();
                    // A panic still answers the core, or the session, the
                    // answer slot or the CDC intake waiting on it would stay
                    // taken for good.
                    let result = std::panic::AssertUnwindSafe(run_task(&*engine, work))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            tracing::error!("a storage task panicked");
                            TaskResult::Failed("storage task panicked".into())
                        });
                    if let Some(h) = cdc_latency {
                        h.since(started);
                    }
                    let _ = own.send(Command::Done(task, result)).await;
                });
            }
            Output::Dial { peer, addrs } => {
                if let Ok(p) = peer.parse::<PeerId>() {
                    let blocked = Blocked {
                        manual: &self.manual_blocks,
                        bans: &self.bans,
                    };
                    self.swim.dial(swarm, &blocked, p, &addrs);
                }
            }
            Output::Ban { peer } => {
                if let Ok(p) = peer.parse::<PeerId>() {
                    self.bans.insert(p);
                    swarm.behaviour_mut().blocked.block_peer(p);
                }
            }
            Output::Unban { peer } => {
                if let Ok(p) = peer.parse::<PeerId>() {
                    self.bans.remove(&p);
                    if !self.manual_blocks.contains(&p) {
                        swarm.behaviour_mut().blocked.unblock_peer(p);
                        tracing::info!(peer = %p, "ban lifted");
                    }
                }
            }
            Output::SaveMembers(file) => self.unsaved = Some(file),
            Output::GossipRoots(roots) => {
                let msg = Envelope::new(self.cluster.clone(), Body::Roots(roots)).encode();
                let topic = gossip::roots_topic(&self.cluster);
                if let Err(e) = swarm.behaviour_mut().gossip.publish(topic, msg) {
                    tracing::debug!(error = %e, "roots for version 1 peers not published");
                }
            }
            Output::Fence(reason) => {
                match &reason {
                    Some(r) => tracing::error!("{r}: refusing local writes until it is back"),
                    None => tracing::warn!("clock back within max_clock_skew of the members: taking writes again"),
                }
                self.engine.set_write_fence(reason);
            }
            Output::SessionFinished {
                peer,
                result,
                duration_ms,
                ..
            } => {
                self.metrics.session_seconds.0.observe(duration_ms as f64 / 1000.0);
                if let Ok(p) = peer.parse::<PeerId>() {
                    for w in self.waiters.remove(&p).unwrap_or_default() {
                        let _ = w.send(result.clone());
                    }
                }
            }
        }
    }

    /// One INFO line for the last minute's replication, when it did anything.
    fn summarize(&mut self, now: Instant) {
        let s = &self.peers.stats;
        let counters = [
            s.sessions.load(Ordering::Relaxed),
            s.session_failures.load(Ordering::Relaxed),
            s.items_pulled.load(Ordering::Relaxed),
            s.items_pushed.load(Ordering::Relaxed),
            s.cdc_applied.load(Ordering::Relaxed),
            self.traffic.sent.load(Ordering::Relaxed),
            self.traffic.received.load(Ordering::Relaxed),
        ];
        let (since, before) = std::mem::replace(&mut self.summary, (now, counters));
        let d: Vec<u64> = counters.iter().zip(before).map(|(a, b)| a.saturating_sub(b)).collect();
        if d.iter().any(|&x| x > 0) {
            tracing::info!(
                period_s = now.duration_since(since).as_secs(),
                sessions = d[0],
                failed = d[1],
                pulled = d[2],
                pushed = d[3],
                cdc_applied = d[4],
                bytes_sent = d[5],
                bytes_received = d[6],
                "replication summary"
            );
        }
    }

    /// Keeps the member connections, redials bootstrap peers that are due,
    /// writes the members file when the core changed it.
    fn housekeeping(&mut self, swarm: &mut Swarm<NodeBehaviour>) {
        let blocked = Blocked {
            manual: &self.manual_blocks,
            bans: &self.bans,
        };
        self.swim.maintain(swarm, &blocked, &mut self.log);
        let now = Instant::now();
        if now.duration_since(self.summary.0) >= SUMMARY_EVERY {
            self.summarize(now);
        }
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
        if self.unsaved.is_some() && self.last_save.elapsed() >= SAVE_EVERY {
            self.last_save = Instant::now();
            let (peers, file) = (self.peers.clone(), self.unsaved.take().expect("checked"));
            self.work
                .spawn(async move { drop(tokio::task::spawn_blocking(move || peers.write_members(&file)).await) });
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
            Command::Block(peer, on, done) => {
                if on {
                    self.manual_blocks.insert(peer);
                    swarm.behaviour_mut().blocked.block_peer(peer);
                    // Closing now, so the answer comes with the link cut.
                    let _ = swarm.disconnect_peer_id(peer);
                } else {
                    self.manual_blocks.remove(&peer);
                    if !self.bans.contains(&peer) {
                        swarm.behaviour_mut().blocked.unblock_peer(peer);
                    }
                    for r in self.redial.iter_mut().filter(|r| r.peer == Some(peer)) {
                        r.next = Instant::now() + super::swim::UNBLOCK_DIAL_AFTER;
                        r.backoff = Duration::from_secs(1);
                    }
                    self.swim.unblocked(peer);
                }
                let _ = done.send(());
            }
            Command::Peers(done) => {
                let _ = done.send(swarm.connected_peers().copied().collect());
            }
            Command::Committed(items) => {
                let items = items.iter().map(wire_item).collect();
                self.feed(swarm, Input::Committed(items));
            }
            Command::Done(task, result) => self.feed(swarm, Input::Done { task, result }),
            Command::Sessions(every) => {
                let ms = every.map(|d| d.as_millis() as u64);
                self.peers.core(|r, now| r.set_session_interval(now, ms));
            }
            Command::Reconcile(peer, done) => {
                if !swarm.is_connected(&peer) {
                    let _ = done.send(Err(format!("peer {peer} is not connected")));
                    return;
                }
                self.waiters.entry(peer).or_default().push(done);
                let (_, outs) = self.peers.reconcile_now(peer, &self.engine);
                self.act_all(swarm, outs);
            }
            Command::Leave(done) => {
                self.feed(swarm, Input::Leave);
                let _ = done.send(());
            }
            Command::Shutdown(done) => drop(done.send(())),
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
                    let checked = self.swim.check_packet(&blocked, &mut self.log, peer, request);
                    match checked {
                        Ok(packet) => {
                            self.member_channel = Some(channel);
                            self.feed(
                                swarm,
                                Input::Member {
                                    peer: peer.to_string(),
                                    packet,
                                },
                            );
                            self.member_channel = None;
                            self.swim.refresh(swarm);
                        }
                        Err(PacketRefusal::Penalize(why)) => self.penalize(swarm, peer, &why),
                        Err(PacketRefusal::Drop) => {}
                    }
                }
                request_response::Message::Response { response, .. } => self.feed(
                    swarm,
                    Input::MemberAck {
                        peer: peer.to_string(),
                        ack: response,
                    },
                ),
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
            // With an allowlist, only members may author anything.
            Ok(_) if !self.allow.is_empty() && !self.allow.contains(&author) && author != *swarm.local_peer_id() => {
                MessageAcceptance::Ignore
            }
            Ok(msg) => {
                let (verdict, outs) = self.peers.on_gossip(propagation_source, author, msg, &self.engine);
                self.act_all(swarm, outs);
                match verdict {
                    Verdict::Accept => MessageAcceptance::Accept,
                    Verdict::Ignore => MessageAcceptance::Ignore,
                }
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
                    if let Request::Cdc { deltas } = &request
                        && let Err(why) = gossip::check_deltas(deltas)
                    {
                        self.penalize(swarm, peer, &why);
                        let _ = swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, Response::Refused { reason: why });
                        return;
                    }
                    self.next_inbound += 1;
                    let id = self.next_inbound;
                    self.inbound.insert(id, channel);
                    self.feed(
                        swarm,
                        Input::Request {
                            peer: peer.to_string(),
                            id,
                            req: request,
                        },
                    );
                }
                request_response::Message::Response { request_id, response } => {
                    self.answered(swarm, request_id, Ok(response))
                }
            },
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                self.answered(swarm, request_id, Err(error.to_string()))
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                self.on_protocol_failure(swarm, peer, &error)
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// The answer to one of our requests (or why there is none), for the core.
    fn answered(
        &mut self,
        swarm: &mut Swarm<NodeBehaviour>,
        request: OutboundRequestId,
        result: Result<Response, String>,
    ) {
        if let Some((p, id)) = self.outbound.remove(&request) {
            let peer = p.to_string();
            self.feed(swarm, Input::Response { peer, id, result });
        }
    }

    fn on_event(&mut self, swarm: &mut Swarm<NodeBehaviour>, event: SwarmEvent<NodeBehaviourEvent>) {
        self.p2p.record(&event);
        match &event {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Gossip(e)) => self.p2p.record(e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Identify(e)) => self.p2p.record(e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Ping(e)) => {
                self.p2p.record(e);
                // Unanswered (not "unsupported"): the link is dead or stalled.
                if let Err(failure @ (ping::Failure::Timeout | ping::Failure::Other { .. })) = &e.result {
                    tracing::info!(peer = %e.peer, %failure, "ping failed: closing the connection");
                    swarm.close_connection(e.connection);
                }
            }
            _ => {}
        }
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
                match common_wire(info.protocols.iter().map(|p| p.as_ref())) {
                    Ok(v) => self.peers.set_wire(peer_id, v),
                    // No sync protocol at all: not a syncnode peer; nothing to say.
                    Err(theirs) if theirs.is_empty() => {}
                    Err(theirs) => self.log.wrong_wire(peer_id, &theirs),
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::info!(peer = %peer_id, "peer connected");
                self.swim.connected(peer_id, endpoint.is_listener());
                if num_established.get() == 1 {
                    self.feed(
                        swarm,
                        Input::Connected {
                            peer: peer_id.to_string(),
                        },
                    );
                }
                for r in self.redial.iter_mut().filter(|r| r.peer == Some(peer_id)) {
                    r.backoff = Duration::from_secs(1);
                }
                for done in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = done.send(Ok(()));
                }
                let blocked = Blocked {
                    manual: &self.manual_blocks,
                    bans: &self.bans,
                };
                self.swim.maintain(swarm, &blocked, &mut self.log);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                endpoint,
                ..
            } => {
                let cause = cause.map_or_else(|| "closed by this node".to_string(), |c| c.to_string());
                tracing::info!(peer = %peer_id, %cause, dialed = !endpoint.is_listener(), "peer disconnected");
                self.feed(
                    swarm,
                    Input::Disconnected {
                        peer: peer_id.to_string(),
                    },
                );
                self.swim.disconnected(peer_id);
                for w in self.waiters.remove(&peer_id).unwrap_or_default() {
                    let _ = w.send(Err("peer disconnected".into()));
                }
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
