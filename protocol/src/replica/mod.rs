//! The replication core (DESIGN §5.8): one sans-IO state machine per node.
//!
//! It takes inputs — the time, a connection up or down, a peer's request or
//! answer, gossip (roots and CDC deltas), a SWIM packet, a local commit, the
//! result of storage work — and returns outputs: messages to send, gossip
//! to publish, storage work to run (`Task`), members to dial, the members
//! file to persist, the write fence. It owns the replication decisions:
//! when to start an anti-entropy session and with whom, each session's
//! steps, what to do with a CDC delta, request admission (rate limits,
//! busy, must-resync), penalties, SWIM membership, member watermarks, the
//! purge bound, and learning the purge ledger before taking anything.
//!
//! Like quinn-proto it does no I/O and reads no clock: the driver passes
//! `Now` in and calls `poll_timeout` to know when to come back. All its
//! randomness comes from one seeded RNG and its maps are ordered, so the
//! simulator replays a run exactly.
//!
//! - `peers`: the peer table (roots, lag, sessions, budgets, penalties);
//! - `watermarks`: members' purge watermarks and the must-resync rule;
//! - `store`: the storage trait and the tasks run against it;
//! - `cdc`: packing and checking CDC deltas;
//! - `relay`: where a delta goes next (a tree per region, hubs between regions).

pub mod cdc;
pub mod peers;
mod regions;
pub mod relay;
pub mod store;
pub mod watermarks;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub use peers::{Now, PeerLimits, PeerTable, Refusal, RegionView, ReplicationStats};
pub use store::{CdcOutcome, Store, Task, TaskResult, run_ready, run_task};
pub use watermarks::{Member, MembersFile};

use crate::clock_offset::{ClockOffsets, Sample};
use crate::hlc::{from_physical, physical_ms};
use crate::membership::{MemberEvent, MemberId, MemberState, Membership, MembershipConfig};
use crate::session::{MAX_ITEMS, Progress, Session, SessionError, Step};
use crate::wire::{self, CdcDelta, MemberAck, MemberPacket, Request, Response, RootsAnnouncement, WireItem};

/// Inbound requests answered at once, over all peers.
pub const MAX_ANSWERING: u32 = 32;
/// Tombstones purged per pass (one storage transaction).
pub const PURGE_PER_PASS: usize = 10_000;
/// Received deltas waiting to be applied, at most (more are dropped and
/// left to anti-entropy), and how many one storage task applies.
const MAX_CDC_INBOX: usize = 16_384;
/// Versions remembered as passed on.
const MAX_PASSED: usize = 65_536;

/// A version passed on: id, version, origin.
type Passed = (String, u64, String);
const CDC_BATCH: usize = 4_096;
/// How often bans, announcements, timeouts and the members file are seen to.
const HOUSEKEEPING_MS: u64 = 500;

/// A validated gossip message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gossip {
    Roots(RootsAnnouncement),
    Cdc(Vec<CdcDelta>),
}

/// What gossip should do with a message it validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver and forward.
    Accept,
    /// Neither forward nor penalize.
    Ignore,
}

/// The settings the core's decisions follow.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This node as SWIM names it (`bump` is set by the core at start).
    pub me: MemberId,
    /// The cluster id (what every envelope carries; counted in byte totals).
    pub cluster: String,
    pub gossip_interval_ms: u64,
    pub anti_entropy_interval_ms: u64,
    pub request_timeout_ms: u64,
    pub tombstone_grace_ms: u64,
    pub member_expiry_ms: u64,
    pub ledger_retention_ms: u64,
    pub probe_interval_ms: u64,
    pub max_clock_skew_ms: u64,
    pub limits: PeerLimits,
    /// Whether the node has anyone to join through; if not, it is the
    /// first node and has no purge ledger to learn.
    pub seeded: bool,
    /// Local commits are held this long to pack more deltas per message
    /// (0: published with each commit).
    pub cdc_batch_ms: u64,
}

/// An input to the core.
#[derive(Debug, Clone)]
pub enum Input {
    /// Nothing new: timers run.
    Tick,
    Connected {
        peer: String,
    },
    Disconnected {
        peer: String,
    },
    /// A validated gossip message from `author`, forwarded by `from`.
    Gossip {
        from: String,
        author: String,
        msg: Gossip,
    },
    /// A peer's sync request; answer it with `Output::Respond` and this id.
    Request {
        peer: String,
        id: u64,
        req: Request,
    },
    /// The answer to our `Output::Send` with this id (or why there is none).
    Response {
        peer: String,
        id: u64,
        result: Result<Response, String>,
    },
    /// A SWIM packet (already checked by the driver).
    Member {
        peer: String,
        packet: MemberPacket,
    },
    MemberAck {
        peer: String,
        ack: MemberAck,
    },
    /// Items this node committed (local writes).
    Committed(Vec<WireItem>),
    /// The result of an `Output::Run`.
    Done {
        task: u64,
        result: TaskResult,
    },
    /// The operator forgot a member.
    Forget {
        peer: String,
    },
    /// Leave the cluster (shutdown).
    Leave,
}

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send {
        peer: String,
        id: u64,
        req: Request,
    },
    Respond {
        peer: String,
        id: u64,
        resp: Response,
    },
    SendMember {
        peer: String,
        addrs: Vec<String>,
        packet: MemberPacket,
    },
    AckMember {
        peer: String,
        ack: MemberAck,
    },
    /// Run storage work; hand back `Input::Done` with the same id.
    Run {
        task: u64,
        work: Task,
    },
    Dial {
        peer: String,
        addrs: Vec<String>,
    },
    Ban {
        peer: String,
    },
    Unban {
        peer: String,
    },
    /// Persist this (members.json).
    SaveMembers(MembersFile),
    /// Fence local writes with this reason, or lift the fence.
    Fence(Option<String>),
    /// Publish our roots on the wire version 1 gossip topic: a version 1
    /// peer is connected, and it hears roots nowhere else.
    GossipRoots(RootsAnnouncement),
    /// A session we ran ended (for whoever waits on it).
    SessionFinished {
        peer: String,
        result: Result<Progress, String>,
        /// How long it ran, and the sync bytes exchanged with the peer
        /// meanwhile (its CDC included).
        duration_ms: u64,
        bytes_sent: u64,
        bytes_received: u64,
    },
}

/// A session we run, in its phase.
enum Phase {
    /// Learning the peer's purge ledger first (joining), page by page.
    Ledger {
        after: Option<String>,
    },
    Running(Box<Session>),
}

struct Outgoing {
    id: u64,
    phase: Phase,
    /// We held nothing when it started: its progress is logged.
    bootstrap: bool,
    logged: u64,
    /// The oldest version (wall ms in it) pulled or pushed so far.
    oldest_moved_ms: Option<u64>,
    started_mono_ms: u64,
    /// The peer's byte counters when it started.
    bytes_at_start: (u64, u64),
}

/// What an outstanding request of ours is for.
#[derive(Debug, Clone)]
enum Pending {
    Session,
    Fetch {
        ids: Vec<String>,
        tries: u32,
    },
    /// Deltas passed on (what becomes of them is the peer's business).
    Cdc,
    /// Our roots, answered with theirs.
    Roots,
}

/// Who waits for a task.
#[derive(Debug, Clone)]
enum Waiter {
    Answer {
        peer: String,
        id: u64,
    },
    Cdc,
    /// A step of session `session` with `peer` (a result for an earlier
    /// session with the same peer is dropped).
    SessionStep {
        peer: String,
        session: u64,
    },
    Ledger {
        peer: String,
        session: u64,
        next: Option<String>,
    },
    Fetched,
    Purge,
}

pub struct Replica {
    cfg: ReplicaConfig,
    pub peers: PeerTable,
    swim: Membership,
    offsets: ClockOffsets,
    rng: ChaCha8Rng,
    next_id: u64,
    sessions: BTreeMap<String, Outgoing>,
    /// Our requests: id → (peer, sent at mono ms, purpose).
    pending: BTreeMap<u64, (String, u64, Pending)>,
    tasks: BTreeMap<u64, Waiter>,
    answering: u32,
    /// When each peer's last `Round` was admitted here (mono ms): a hub
    /// being synced by its peer hub does not start a session of its own.
    rounds_served: BTreeMap<String, u64>,
    /// Periodic rounds in a row a higher hub left a session to the lower peer
    /// hub (see `may_sync_with`); past `MAX_DEFERRED_ROUNDS` it starts its
    /// own, so a lower hub whose sessions keep failing cannot stall repair.
    deferred_rounds: BTreeMap<String, u32>,
    /// Received deltas waiting for the CDC task in flight, with their authors.
    cdc_inbox: Vec<(String, CdcDelta)>,
    cdc_running: Option<BTreeMap<String, String>>,
    /// When the deltas waiting in `cdc_pending` go.
    cdc_due: Option<u64>,
    /// Deltas to pass on, per next hop, until the batch goes.
    cdc_pending: BTreeMap<String, Vec<CdcDelta>>,
    /// Versions passed on lately (oldest first): never twice, whatever
    /// views of the membership the nodes hold for a moment.
    passed: VecDeque<Passed>,
    passed_set: BTreeSet<Passed>,
    /// Fetches refused as busy, to send again.
    retries: Vec<(u64, String, Pending)>,
    announced: BTreeMap<String, u64>,
    next_gossip: u64,
    /// When sessions are next started (`None`: only on request).
    next_session_round: Option<u64>,
    next_purge: u64,
    next_housekeeping: u64,
    purging: bool,
    fenced: bool,
    out: VecDeque<Output>,
    /// When this node started (wall ms).
    started_wall_ms: u64,
    /// The time of the last input (byte counters of outputs use it).
    last_now: Now,
}

impl Replica {
    /// A node starting at `now` with what it persisted (`file`); `seed`
    /// makes every random choice.
    pub fn new(mut cfg: ReplicaConfig, file: MembersFile, now: Now, seed: u64) -> Self {
        let mut peers = PeerTable::new(
            cfg.limits.clone(),
            file,
            now,
            cfg.member_expiry_ms,
            cfg.ledger_retention_ms,
        );
        if !cfg.seeded {
            // The first node: there is no ledger to learn.
            peers.set_ledger_learned();
        }
        peers.set_gossip_interval(cfg.gossip_interval_ms);
        cfg.me.bump = peers.next_bump(now.wall_ms);
        let swim = Membership::new(
            cfg.me.clone(),
            MembershipConfig {
                probe_period: std::time::Duration::from_millis(cfg.probe_interval_ms),
            },
            seed,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let first_round =
            now.mono_ms + cfg.anti_entropy_interval_ms + rng.random_range(0..=cfg.anti_entropy_interval_ms / 4);
        Self {
            next_gossip: now.mono_ms + cfg.gossip_interval_ms,
            next_session_round: Some(first_round),
            next_purge: now.mono_ms + purge_every(cfg.tombstone_grace_ms),
            next_housekeeping: now.mono_ms,
            cfg,
            peers,
            swim,
            offsets: ClockOffsets::default(),
            rng,
            next_id: 0,
            sessions: BTreeMap::new(),
            pending: BTreeMap::new(),
            tasks: BTreeMap::new(),
            answering: 0,
            rounds_served: BTreeMap::new(),
            deferred_rounds: BTreeMap::new(),
            cdc_inbox: Vec::new(),
            cdc_running: None,
            cdc_due: None,
            cdc_pending: BTreeMap::new(),
            passed: VecDeque::new(),
            passed_set: BTreeSet::new(),
            retries: Vec::new(),
            announced: BTreeMap::new(),
            purging: false,
            fenced: false,
            out: VecDeque::new(),
            started_wall_ms: now.wall_ms,
            last_now: now,
        }
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    pub fn me(&self) -> &MemberId {
        self.swim.me()
    }

    pub fn membership(&self) -> &Membership {
        &self.swim
    }

    pub fn offsets(&self) -> &ClockOffsets {
        &self.offsets
    }

    /// Whether local writes are fenced (our clock runs ahead).
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// Sessions running now, by peer.
    pub fn sessions(&self) -> impl Iterator<Item = &String> {
        self.sessions.keys()
    }

    /// Starts sessions on their own every `every_ms` (jittered), or only
    /// when asked (`None`).
    pub fn set_session_interval(&mut self, now: Now, every_ms: Option<u64>) {
        match every_ms {
            Some(ms) => {
                self.cfg.anti_entropy_interval_ms = ms.max(1);
                self.next_session_round = Some(now.mono_ms + ms);
            }
            None => self.next_session_round = None,
        }
    }

    /// Starts a session with `peer` now, unless one is running; its end
    /// comes as `Output::SessionFinished`.
    pub fn reconcile_now(&mut self, now: Now, peer: &str, store: &impl Store) -> bool {
        if self.sessions.contains_key(peer) || self.peers.must_resync(peer) || self.peers.banned(peer) {
            return false;
        }
        self.start_session(now, peer, store);
        self.sessions.contains_key(peer)
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.out.pop_front()?;
        let sent = match &out {
            Output::Send { peer, req, .. } => Some((peer, wire::frame_len(&self.cfg.cluster, req))),
            Output::Respond { peer, resp, .. } => Some((peer, wire::frame_len(&self.cfg.cluster, resp))),
            _ => None,
        };
        if let Some((peer, n)) = sent {
            self.peers.add_bytes(peer, n as u64, 0, self.last_now);
        }
        Some(out)
    }

    /// When the core next needs a `Tick` (mono ms).
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self.next_gossip.min(self.next_purge).min(self.next_housekeeping);
        if let Some(r) = self.next_session_round {
            t = t.min(r);
        }
        if let Some(d) = self.swim.next_deadline() {
            t = t.min(d);
        }
        if let Some(d) = self.cdc_due {
            t = t.min(d);
        }
        t
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn run(&mut self, work: Task, waiter: Waiter) {
        let task = self.id();
        self.tasks.insert(task, waiter);
        self.out.push_back(Output::Run { task, work });
    }

    fn send(&mut self, now: Now, peer: &str, req: Request, purpose: Pending) {
        let id = self.id();
        self.pending.insert(id, (peer.to_string(), now.mono_ms, purpose));
        self.out.push_back(Output::Send {
            peer: peer.to_string(),
            id,
            req,
        });
    }

    /// Handles one input.
    pub fn handle(&mut self, now: Now, input: Input, store: &impl Store) {
        self.last_now = now;
        let received = match &input {
            Input::Request { peer, req, .. } => Some((peer, wire::frame_len(&self.cfg.cluster, req))),
            Input::Response {
                peer, result: Ok(resp), ..
            } => Some((peer, wire::frame_len(&self.cfg.cluster, resp))),
            _ => None,
        };
        if let Some((peer, n)) = received {
            self.peers.add_bytes(peer, 0, n as u64, now);
        }
        match input {
            Input::Tick => {}
            Input::Connected { peer } => {
                self.peers.connected(&peer, true, now);
                // A peer SWIM does not list yet is asked to let us in at
                // once, and roots are compared at once (a heal).
                self.next_housekeeping = now.mono_ms;
                self.next_gossip = now.mono_ms;
            }
            Input::Disconnected { peer } => {
                self.peers.connected(&peer, false, now);
                self.lost_peer(now, &peer, "peer disconnected");
            }
            Input::Gossip { from, author, msg } => {
                self.on_gossip(now, &from, &author, msg, store);
            }
            Input::Request { peer, id, req } => self.on_request(now, peer, id, req, store),
            Input::Response { peer, id, result } => self.on_response(now, id, &peer, result, store),
            Input::Member { peer, packet } => {
                let received_ms = now.wall_ms;
                self.peers.touch_member(&peer, now);
                if let Err(e) = self.swim.handle_packet(now.mono_ms, &packet.payload) {
                    tracing::debug!(%peer, error = %e, "membership packet not taken");
                }
                self.out.push_back(Output::AckMember {
                    peer,
                    ack: MemberAck {
                        asked_ms: packet.sent_ms,
                        received_ms,
                        answered_ms: now.wall_ms,
                    },
                });
                self.flush_swim(now);
            }
            Input::MemberAck { peer, ack } => {
                if let Some(s) = Sample::of(ack.asked_ms, ack.received_ms, ack.answered_ms, now.wall_ms) {
                    self.offsets.record(&peer, s);
                }
                self.peers.touch_member(&peer, now);
            }
            Input::Committed(items) => {
                let deltas: Vec<CdcDelta> = cdc::pack(items).into_iter().flatten().collect();
                self.pass_on(now, deltas.into_iter().map(|d| (None, d)));
            }
            Input::Done { task, result } => self.on_done(now, task, result, store),
            Input::Forget { peer } => {
                self.peers.forget(&peer, now);
            }
            Input::Leave => {
                if let Err(e) = self.swim.leave(now.mono_ms) {
                    tracing::debug!(error = %e, "leave");
                }
                self.flush_swim(now);
            }
        }
        self.timers(now, store);
    }

    /// Gossip from `author` via `from`: what to do with it.
    pub fn on_gossip(&mut self, now: Now, from: &str, author: &str, msg: Gossip, store: &impl Store) -> Verdict {
        if !self.peers.allow_gossip(from, now) {
            return Verdict::Ignore;
        }
        match msg {
            Gossip::Roots(theirs) => {
                if self.peers.is_connected(author) {
                    self.peers.on_roots(author, theirs, &store.root_announcement(), now);
                }
                Verdict::Accept
            }
            Gossip::Cdc(_) if self.peers.must_resync(author) || !self.peers.ledger_learned() => Verdict::Ignore,
            Gossip::Cdc(deltas) => {
                self.queue_deltas(author, deltas);
                Verdict::Accept
            }
        }
    }

    /// Applies what arrived, in one task, unless one is running.
    fn start_cdc(&mut self) {
        if self.cdc_running.is_some() || self.cdc_inbox.is_empty() {
            return;
        }
        let rest = self.cdc_inbox.split_off(self.cdc_inbox.len().min(CDC_BATCH));
        let batch = std::mem::replace(&mut self.cdc_inbox, rest);
        let mut authors = BTreeMap::new();
        let mut deltas = Vec::with_capacity(batch.len());
        for (author, d) in batch {
            authors.insert(d.entry.id.clone(), author);
            deltas.push(d);
        }
        self.cdc_running = Some(authors);
        self.run(Task::Cdc(deltas), Waiter::Cdc);
    }

    /// Queues deltas for their next hops (`from`: who sent each, `None`
    /// for our own writes); the batch goes after `cdc_batch_ms`.
    fn pass_on(&mut self, now: Now, deltas: impl IntoIterator<Item = (Option<String>, CdcDelta)>) {
        let me = self.swim.me().clone();
        let members = self.relay_members();
        for (from, d) in deltas {
            // Two writers can stamp the same version: the origin tells them apart.
            let key = (d.entry.id.clone(), d.entry.version, d.entry.origin.clone());
            if !self.passed_set.insert(key.clone()) {
                continue;
            }
            self.passed.push_back(key);
            if self.passed.len() > MAX_PASSED
                && let Some(old) = self.passed.pop_front()
            {
                self.passed_set.remove(&old);
            }
            let hops = relay::next_hops(&me, &members, from.as_deref());
            if hops.is_empty() && !members.is_empty() {
                ReplicationStats::add(&self.peers.stats.cdc_dropped, 1);
            }
            for hop in hops {
                self.cdc_pending.entry(hop).or_default().push(d.clone());
            }
        }
        if !self.cdc_pending.is_empty() && self.cdc_due.is_none() {
            self.cdc_due = Some(now.mono_ms + self.cfg.cdc_batch_ms);
        }
    }

    /// The members deltas are relayed through: alive (a suspect hub would
    /// swallow a region's deltas until declared down), and not flagged to
    /// resync (its relaying is refused).
    fn relay_members(&self) -> Vec<MemberId> {
        self.swim
            .members()
            .into_iter()
            // Version 1 peers read no `Request::Cdc`: not part of the tree.
            .filter(|v| {
                v.state == MemberState::Alive && !self.peers.must_resync(&v.id.peer) && self.peers.speaks(&v.id.peer, 2)
            })
            .map(|v| v.id)
            .collect()
    }

    /// The peers this node passes deltas to and gets them from: kept
    /// connected whatever `max_peers` says.
    pub fn relay_neighbours(&self) -> Vec<String> {
        relay::next_hops(self.swim.me(), &self.relay_members(), None)
    }

    /// Sends each next hop its batch of deltas, packed into messages.
    fn flush_cdc(&mut self, now: Now) {
        self.cdc_due = None;
        for (peer, deltas) in std::mem::take(&mut self.cdc_pending) {
            if !self.peers.is_connected(&peer) {
                // Not reachable now: anti-entropy brings these, soon.
                ReplicationStats::add(&self.peers.stats.cdc_dropped, deltas.len() as u64);
                self.peers.cdc_lost(&peer);
                continue;
            }
            for group in cdc::pack_deltas(deltas) {
                ReplicationStats::add(&self.peers.stats.cdc_published, 1);
                self.send(now, &peer, Request::Cdc { deltas: group }, Pending::Cdc);
            }
        }
    }

    /// Deltas a peer passed to us: taken in (once the purge ledger is
    /// learned, and not from a member that must resync), acknowledged at
    /// once, applied in turn.
    fn take_deltas(&mut self, now: Now, from: &str, deltas: Vec<CdcDelta>) -> Result<(), Refusal> {
        if self.peers.must_resync(from) {
            return Err(Refusal::MustResync);
        }
        if !self.peers.ledger_learned() {
            return Err(Refusal::LedgerNotLearned);
        }
        // Deltas and roots have the gossip budget, apart from sessions'.
        if !self.peers.allow_gossip(from, now) {
            return Err(Refusal::RateLimited);
        }
        self.queue_deltas(from, deltas);
        Ok(())
    }

    fn queue_deltas(&mut self, from: &str, deltas: Vec<CdcDelta>) {
        let room = MAX_CDC_INBOX.saturating_sub(self.cdc_inbox.len());
        let n = deltas.len();
        self.cdc_inbox
            .extend(deltas.into_iter().take(room).map(|d| (from.to_string(), d)));
        if n > room {
            // The applier is behind: anti-entropy will bring these.
            ReplicationStats::add(&self.peers.stats.cdc_dropped, (n - room) as u64);
        }
        self.start_cdc();
    }

    fn on_request(&mut self, now: Now, peer: String, id: u64, req: Request, store: &impl Store) {
        let req = match req {
            Request::Cdc { deltas } => {
                let resp = match self.take_deltas(now, &peer, deltas) {
                    Ok(()) => Response::Pushed { applied: 0 },
                    Err(r) => Response::Refused {
                        reason: r.reason().into(),
                    },
                };
                return self.out.push_back(Output::Respond { peer, id, resp });
            }
            Request::Roots(theirs) => {
                let mine = store.root_announcement();
                let resp = if self.peers.allow_gossip(&peer, now) {
                    if self.peers.is_connected(&peer) {
                        self.peers.on_roots(&peer, theirs, &mine, now);
                        self.session_if_due(now, &peer, store);
                    }
                    Response::Root(mine)
                } else {
                    Response::Refused {
                        reason: Refusal::RateLimited.reason().into(),
                    }
                };
                return self.out.push_back(Output::Respond { peer, id, resp });
            }
            other => other,
        };
        let push = matches!(req, Request::Push { .. });
        let admitted = self.peers.admit_request(&peer, push, now).and_then(|()| {
            if self.answering >= MAX_ANSWERING {
                self.peers.end_answer(&peer);
                Err(Refusal::Busy)
            } else {
                Ok(())
            }
        });
        match admitted {
            Err(refusal) => self.out.push_back(Output::Respond {
                peer,
                id,
                resp: Response::Refused {
                    reason: refusal.reason().into(),
                },
            }),
            Ok(()) => {
                self.answering += 1;
                // Every request of a session (session 0: a CDC fetch) says
                // the peer is running one toward us, its transfer included.
                let of_session = match &req {
                    Request::Round { .. }
                    | Request::Sketch { .. }
                    | Request::Symbols { .. }
                    | Request::Resolve { .. } => true,
                    Request::Fetch { session, .. } | Request::Push { session, .. } => *session != 0,
                    _ => false,
                };
                if of_session {
                    self.rounds_served.insert(peer.clone(), now.mono_ms);
                }
                self.run(Task::Answer(req), Waiter::Answer { peer, id });
            }
        }
    }

    fn on_response(&mut self, now: Now, id: u64, peer: &str, result: Result<Response, String>, store: &impl Store) {
        match self.pending.get(&id) {
            None => return, // timed out already, or not ours
            Some((to, _, _)) if to != peer => {
                self.peers
                    .penalize(peer, "answer to a request sent to another peer", now);
                return;
            }
            Some(_) => {}
        }
        let Some((_, _, purpose)) = self.pending.remove(&id) else {
            return;
        };
        match purpose {
            Pending::Session => match result {
                Err(e) => self.finish(now, peer, Err(format!("transport: {e}"))),
                Ok(resp) => self.session_answer(now, peer, resp, store),
            },
            Pending::Cdc => {
                if !matches!(result, Ok(Response::Pushed { .. })) {
                    // Lost on the way: anti-entropy with that peer, soon.
                    ReplicationStats::add(&self.peers.stats.cdc_dropped, 1);
                    self.peers.cdc_lost(peer);
                }
            }
            Pending::Roots => {
                if let Ok(Response::Root(theirs)) = result
                    && self.peers.is_connected(peer)
                {
                    self.peers.on_roots(peer, theirs, &store.root_announcement(), now);
                    self.session_if_due(now, peer, store);
                }
            }
            Pending::Fetch { ids, tries } => match result {
                Ok(Response::Fetch { items, deferred }) => {
                    ReplicationStats::add(&self.peers.stats.cdc_fetched, 1);
                    if !items.is_empty() {
                        self.run(Task::Apply(items), Waiter::Fetched);
                    }
                    // Ask again only for ids we asked for, a bounded number of times.
                    let asked: BTreeSet<&String> = ids.iter().collect();
                    let again: Vec<String> = deferred.into_iter().filter(|d| asked.contains(d)).collect();
                    if !again.is_empty() && tries < 8 {
                        self.send(
                            now,
                            peer,
                            Request::Fetch {
                                session: 0,
                                ids: again.clone(),
                            },
                            Pending::Fetch {
                                ids: again,
                                tries: tries + 1,
                            },
                        );
                    }
                }
                Ok(Response::Refused { reason }) if Refusal::is_retryable(&reason) && tries < 5 => {
                    let due = now.mono_ms + (100 << (tries + 1));
                    self.retries
                        .push((due, peer.to_string(), Pending::Fetch { ids, tries: tries + 1 }));
                }
                // Left to anti-entropy.
                other => {
                    tracing::debug!(%peer, answer = ?other.map(|_| ()), "CDC fetch failed; anti-entropy will catch up")
                }
            },
        }
    }

    fn on_done(&mut self, now: Now, task: u64, result: TaskResult, store: &impl Store) {
        let Some(waiter) = self.tasks.remove(&task) else { return };
        match (waiter, result) {
            (Waiter::Answer { peer, id }, result) => {
                self.answering = self.answering.saturating_sub(1);
                self.peers.end_answer(&peer);
                let resp = match result {
                    TaskResult::Answer(r) => r,
                    TaskResult::Failed(reason) => Response::Refused { reason },
                    other => Response::Refused {
                        reason: format!("internal: {other:?}"),
                    },
                };
                self.out.push_back(Output::Respond { peer, id, resp });
            }
            (Waiter::Cdc, result) => {
                let authors = self.cdc_running.take().unwrap_or_default();
                match result {
                    TaskResult::Cdc(outcome) => {
                        ReplicationStats::add(&self.peers.stats.cdc_applied, outcome.applied);
                        ReplicationStats::add(&self.peers.stats.cdc_dropped, outcome.dropped);
                        // Content not inlined comes from the writer when we
                        // reach it, else from whoever passed the delta on.
                        let origins: BTreeMap<&str, &str> = outcome
                            .fresh
                            .iter()
                            .map(|d| (d.entry.id.as_str(), d.entry.origin.as_str()))
                            .collect();
                        let mut by_author: BTreeMap<String, Vec<String>> = BTreeMap::new();
                        for id in outcome.fetch {
                            let origin = origins.get(id.as_str()).copied().filter(|o| self.peers.is_connected(o));
                            if let Some(a) = origin.map(str::to_string).or_else(|| authors.get(&id).cloned()) {
                                by_author.entry(a).or_default().push(id);
                            }
                        }
                        let fresh: Vec<(Option<String>, CdcDelta)> = outcome
                            .fresh
                            .into_iter()
                            .map(|d| (authors.get(&d.entry.id).cloned(), d))
                            .collect();
                        self.pass_on(now, fresh);
                        for (author, ids) in by_author {
                            for chunk in ids.chunks(MAX_ITEMS) {
                                let ids = chunk.to_vec();
                                self.send(
                                    now,
                                    &author,
                                    Request::Fetch {
                                        session: 0,
                                        ids: ids.clone(),
                                    },
                                    Pending::Fetch { ids, tries: 0 },
                                );
                            }
                        }
                    }
                    other => tracing::debug!(?other, "CDC batch not applied; anti-entropy will catch up"),
                }
                self.start_cdc();
            }
            (Waiter::Fetched, TaskResult::Applied(n)) => ReplicationStats::add(&self.peers.stats.cdc_applied, n),
            (Waiter::Fetched, other) => tracing::debug!(?other, "fetched items not applied"),
            (Waiter::Purge, result) => {
                self.purging = false;
                match result {
                    TaskResult::Purged(n) => ReplicationStats::add(&self.peers.stats.tombstones_purged, n),
                    other => tracing::warn!(?other, "tombstone purge failed; retrying later"),
                }
            }
            (Waiter::Ledger { peer, session, .. } | Waiter::SessionStep { peer, session }, _)
                if self.sessions.get(&peer).map(|o| o.id) != Some(session) => {}
            (Waiter::Ledger { peer, next, .. }, TaskResult::Imported(n)) => {
                if n > 0 {
                    tracing::info!(%peer, learned = n, "purge ledger learned from a peer");
                }
                match next {
                    Some(after) => self.send(now, &peer, Request::Ledger { after: Some(after) }, Pending::Session),
                    None => {
                        self.peers.set_ledger_learned();
                        self.begin_running(now, &peer, store);
                    }
                }
            }
            (Waiter::SessionStep { peer, .. }, result) => {
                let Some(Outgoing {
                    phase: Phase::Running(s),
                    ..
                }) = self.sessions.get_mut(&peer)
                else {
                    return;
                };
                match result {
                    TaskResult::Entries(local) => s.on_local_entries(local),
                    TaskResult::KeyedEntries(local) => s.on_local_keyed(local),
                    TaskResult::Items { items, unread } => {
                        s.on_local_items(items);
                        s.return_push(unread);
                    }
                    TaskResult::Applied(_) => {}
                    TaskResult::Failed(e) => return self.finish(now, &peer, Err(format!("storage: {e}"))),
                    other => return self.finish(now, &peer, Err(format!("internal: {other:?}"))),
                }
                self.drive(now, &peer, store);
            }
            (Waiter::Ledger { peer, .. }, other) => self.finish(now, &peer, Err(format!("ledger: {other:?}"))),
        }
    }

    /// Starts a session with `peer` as soon as a roots comparison makes it
    /// due (when sessions run on their own): a heal is repaired without
    /// waiting for the next round.
    fn session_if_due(&mut self, now: Now, peer: &str, store: &impl Store) {
        if self.next_session_round.is_none() || self.sessions.contains_key(peer) {
            return;
        }
        let every = self.cfg.anti_entropy_interval_ms;
        if self.peers.due_for_session(now, every).iter().any(|p| p == peer) && self.may_sync_with(now, peer, true) {
            self.start_session(now, peer, store);
        }
    }

    /// Starts a session with `peer`: first the purge ledger when this node
    /// has not learned one yet or holds nothing (a bootstrap), then the
    /// tree walk.
    fn start_session(&mut self, now: Now, peer: &str, store: &impl Store) {
        let id = self.id();
        let ours = store.root_announcement();
        if !self.peers.session_started(peer, id, now, ours.hlc) {
            return;
        }
        self.sessions.insert(
            peer.to_string(),
            Outgoing {
                id,
                phase: Phase::Ledger { after: None },
                bootstrap: ours.count == 0,
                logged: 0,
                oldest_moved_ms: None,
                started_mono_ms: now.mono_ms,
                bytes_at_start: self.peers.bytes(peer),
            },
        );
        if ours.count == 0 || !self.peers.ledger_learned() {
            self.send(now, peer, Request::Ledger { after: None }, Pending::Session);
        } else {
            self.begin_running(now, peer, store);
        }
    }

    /// Starts the session proper: rateless when the peer is known to speak
    /// wire version 3 and we keep coded symbols, unless we hold nothing
    /// (then the difference is everything, which the tree walk lists whole).
    /// A peer whose version is not known yet gets the walk, which every
    /// version speaks.
    fn begin_running(&mut self, now: Now, peer: &str, store: &impl Store) {
        let (depth, symbols) = store.with_tree(|t| (t.depth(), t.sketch().is_some() && t.count() > 0));
        let rateless = symbols && self.peers.known_to_speak(peer, 3);
        if let Some(o) = self.sessions.get_mut(peer) {
            let session = match rateless {
                true => Session::rateless(o.id, depth),
                false => Session::new(o.id, depth),
            };
            o.phase = Phase::Running(Box::new(session));
            self.drive(now, peer, store);
        }
    }

    /// Runs the session with `peer` until it needs an answer or storage.
    fn drive(&mut self, now: Now, peer: &str, store: &impl Store) {
        let step = match self.sessions.get_mut(peer) {
            Some(Outgoing {
                phase: Phase::Running(s),
                bootstrap,
                logged,
                ..
            }) => {
                let step = store.with_tree(|t| s.next_step(t));
                let p = s.progress();
                if *bootstrap && p.pulled >= *logged + 10_000 {
                    *logged = p.pulled;
                    tracing::info!(%peer, pulled = p.pulled, to_pull = p.to_pull, "bootstrap progress");
                }
                self.peers.session_progress(peer, &p);
                step
            }
            _ => return,
        };
        match step {
            Step::Send(req) => {
                if let Request::Push { items, .. } = &req {
                    self.moved(peer, items);
                }
                self.send(now, peer, req, Pending::Session)
            }
            Step::NeedLocalEntries(paths) => self.run(Task::Entries(paths), self.step_waiter(peer)),
            Step::NeedLocalKeys(keys) => self.run(Task::KeyedEntries(keys), self.step_waiter(peer)),
            Step::NeedLocalItems(ids) => self.run(Task::Items(ids), self.step_waiter(peer)),
            Step::Waiting => {}
            Step::Done => {
                let progress = match self.sessions.get(peer) {
                    Some(Outgoing {
                        phase: Phase::Running(s),
                        ..
                    }) => s.progress(),
                    _ => Progress::default(),
                };
                self.finish(now, peer, Ok(progress));
            }
        }
    }

    fn session_answer(&mut self, now: Now, peer: &str, resp: Response, store: &impl Store) {
        let Some(o) = self.sessions.get_mut(peer) else { return };
        match &mut o.phase {
            Phase::Ledger { after } => match resp {
                Response::Ledger { entries, next } => {
                    // The cursor must move forward, or the peer is stalling us.
                    if let Some(n) = &next {
                        if after.as_ref().is_some_and(|a| n <= a) {
                            return self.finish(now, peer, Err("ledger cursor did not advance".into()));
                        }
                        *after = Some(n.clone());
                    }
                    let session = o.id;
                    self.run(
                        Task::ImportLedger(entries),
                        Waiter::Ledger {
                            peer: peer.to_string(),
                            session,
                            next,
                        },
                    );
                }
                other => self.finish(now, peer, Err(format!("ledger answered with {other:?}"))),
            },
            Phase::Running(s) => match store.with_tree(|t| s.on_response(resp, t)) {
                Ok(Some(items)) => {
                    self.moved(peer, &items);
                    let waiter = self.step_waiter(peer);
                    self.run(Task::Apply(items), waiter)
                }
                Ok(None) => self.drive(now, peer, store),
                Err(e @ SessionError::Refused(_)) | Err(e @ SessionError::Protocol(_)) => {
                    self.finish(now, peer, Err(format!("session: {e}")))
                }
            },
        }
    }

    /// Notes the versions a session moves (see `finish`).
    fn moved(&mut self, peer: &str, items: &[WireItem]) {
        if let Some(o) = self.sessions.get_mut(peer)
            && let Some(oldest) = items.iter().map(|i| physical_ms(i.entry.version)).min()
        {
            o.oldest_moved_ms = Some(o.oldest_moved_ms.map_or(oldest, |m| m.min(oldest)));
        }
    }

    fn step_waiter(&self, peer: &str) -> Waiter {
        Waiter::SessionStep {
            peer: peer.to_string(),
            session: self.sessions.get(peer).map_or(0, |o| o.id),
        }
    }

    fn finish(&mut self, now: Now, peer: &str, result: Result<Progress, String>) {
        let Some(o) = self.sessions.remove(peer) else { return };
        // Moving only versions younger than a few intervals is CDC in
        // flight, not divergence: the next session may wait.
        let recent = now
            .wall_ms
            .saturating_sub(self.cfg.anti_entropy_interval_ms.max(self.cfg.gossip_interval_ms) * 3);
        let settled = o.oldest_moved_ms.is_none_or(|t| t >= recent);
        let duration_ms = now.mono_ms.saturating_sub(o.started_mono_ms);
        let (sent, received) = self.peers.bytes(peer);
        let (bytes_sent, bytes_received) = (
            sent.saturating_sub(o.bytes_at_start.0),
            received.saturating_sub(o.bytes_at_start.1),
        );
        // One line per session at DEBUG; the node sums them up every minute.
        match &result {
            Ok(p) => tracing::debug!(
                %peer, bootstrap = o.bootstrap, pulled = p.pulled, pushed = p.pushed, rounds = p.round_trips,
                duration_ms, bytes_sent, bytes_received, "anti-entropy session done"
            ),
            Err(e) => tracing::warn!(%peer, error = %e, duration_ms, "anti-entropy session failed"),
        }
        self.peers
            .session_finished(peer, result.as_ref().map_err(|e| e.clone()), now, settled);
        self.out.push_back(Output::SessionFinished {
            peer: peer.to_string(),
            result: result.clone(),
            duration_ms,
            bytes_sent,
            bytes_received,
        });
        // Its outstanding request, if any, is no longer waited for.
        self.pending
            .retain(|_, (to, _, p)| !(to == peer && matches!(p, Pending::Session)));
    }

    fn lost_peer(&mut self, now: Now, peer: &str, why: &str) {
        self.finish(now, peer, Err(why.to_string()));
        self.pending.retain(|_, (to, _, _)| to != peer);
        self.retries.retain(|(_, to, _)| to != peer);
    }

    fn flush_swim(&mut self, now: Now) {
        for (to, payload) in self.swim.take_outgoing() {
            self.out.push_back(Output::SendMember {
                peer: to.peer.clone(),
                addrs: to.addrs.clone(),
                packet: MemberPacket {
                    sent_ms: now.wall_ms,
                    payload,
                },
            });
        }
        for event in self.swim.take_events() {
            match event {
                MemberEvent::Up(m) => {
                    tracing::info!(peer = %m.peer, region = %m.region, "member joined");
                    self.peers.add_member(&m.peer, &m.addrs, now);
                    self.peers.set_region(&m.peer, Some(m.region.clone()), now);
                    if !self.peers.is_connected(&m.peer) {
                        self.out.push_back(Output::Dial {
                            peer: m.peer.clone(),
                            addrs: m.addrs.clone(),
                        });
                    }
                }
                MemberEvent::Renamed { new, .. } => {
                    self.peers.add_member(&new.peer, &new.addrs, now);
                    self.peers.set_region(&new.peer, Some(new.region.clone()), now);
                }
                MemberEvent::Down(m) => tracing::info!(peer = %m.peer, "member down"),
                MemberEvent::Rejoined(me) => tracing::info!(bump = me.bump, "declared down by the cluster; rejoined"),
            }
        }
    }

    fn timers(&mut self, now: Now, store: &impl Store) {
        let mono = now.mono_ms;
        if self.swim.next_deadline().is_some_and(|d| d <= mono) {
            self.swim.tick(mono);
            self.flush_swim(now);
        }
        if self.cdc_due.is_some_and(|d| d <= mono) {
            self.flush_cdc(now);
        }
        if self.next_gossip <= mono {
            self.next_gossip = mono + self.cfg.gossip_interval_ms;
            self.exchange_roots(now, store);
        }
        if self.next_session_round.is_some_and(|t| t <= mono) {
            let every = self.cfg.anti_entropy_interval_ms;
            self.next_session_round = Some(mono + every + self.rng.random_range(0..=every / 4));
            // One at a time: `may_sync_with` sees the sessions started
            // before it (one cross-region session at a time).
            let mut started = 0;
            let due = self.peers.due_for_session(now, every);
            // A peer no longer due starts its count of deferred rounds afresh.
            self.deferred_rounds.retain(|p, _| due.contains(p));
            for p in due {
                if self.may_sync_with(now, &p, false) {
                    self.deferred_rounds.remove(&p);
                    self.start_session(now, &p, store);
                    started += 1;
                }
            }
            // Forget rounds served long ago (peers come and go).
            let horizon = mono.saturating_sub(10 * every);
            self.rounds_served.retain(|_, at| *at >= horizon);
            if !self.peers.ledger_learned() && self.sessions.is_empty() && started == 0 {
                // Deltas are ignored until the purge ledger is learned, so
                // a node that has not learned it syncs with a member now,
                // even when their roots agree.
                for peer in self.peers.connected_members().into_iter().take(1) {
                    self.start_session(now, &peer, store);
                }
            }
        }
        if self.next_purge <= mono {
            self.next_purge = mono + purge_every(self.cfg.tombstone_grace_ms);
            if !self.purging
                && let Some((below, written_before_ms)) =
                    purge_bound(self.peers.purge_watermark(now), now, self.cfg.tombstone_grace_ms)
            {
                tracing::debug!(below, written_before_ms, "purge pass");
                self.purging = true;
                self.run(
                    Task::Purge {
                        below,
                        written_before_ms,
                        max: PURGE_PER_PASS,
                        retention_ms: self.cfg.ledger_retention_ms,
                    },
                    Waiter::Purge,
                );
            }
        }
        if self.next_housekeeping <= mono {
            self.next_housekeeping = mono + HOUSEKEEPING_MS;
            self.housekeeping(now, store);
        }
    }

    /// Roots go to every connected peer each `gossip_interval`, in one
    /// exchange per pair (the lower peer id asks, the answer carries the
    /// other side's), so each side compares and may start a session.
    ///
    /// A version 1 peer reads no `Request::Roots`: it gossips its roots
    /// (which start our sessions with it, the way our writes reach it), and
    /// while one is connected we publish ours on that topic too (its own
    /// sessions and its readiness start from there).
    fn exchange_roots(&mut self, now: Now, store: &impl Store) {
        let mine = store.root_announcement();
        let me = self.swim.me().peer.clone();
        if self.peers.any_connected_on(1) {
            self.out.push_back(Output::GossipRoots(mine.clone()));
        }
        for peer in self.peers.lags(now).into_keys() {
            if peer > me && self.peers.speaks(&peer, 2) {
                self.send(now, &peer, Request::Roots(mine.clone()), Pending::Roots);
            }
        }
    }

    fn housekeeping(&mut self, now: Now, store: &impl Store) {
        for peer in self.peers.expired_bans(now) {
            self.out.push_back(Output::Unban { peer });
        }
        // Requests unanswered past the timeout fail (a lost message).
        let timeout = self.cfg.request_timeout_ms;
        let late: Vec<(u64, String)> = self
            .pending
            .iter()
            .filter(|(_, (_, at, _))| now.mono_ms.saturating_sub(*at) >= timeout)
            .map(|(id, (p, _, _))| (*id, p.clone()))
            .collect();
        for (id, peer) in late {
            self.on_response(now, id, &peer, Err("request timed out".into()), store);
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _, _)| *at <= now.mono_ms);
        self.retries = later;
        for (_, peer, purpose) in due {
            if let Pending::Fetch { ids, .. } = &purpose {
                let req = Request::Fetch {
                    session: 0,
                    ids: ids.clone(),
                };
                self.send(now, &peer, req, purpose);
            }
        }
        // Connected peers SWIM does not list yet (a seed, a node that
        // restarted): ask them to let us in.
        let members: BTreeSet<String> = self.swim.active().map(|m| m.peer.clone()).collect();
        let every = self.cfg.probe_interval_ms * 4;
        let connected: Vec<String> = self
            .peers
            .lags(now)
            .into_keys()
            .filter(|p| !members.contains(p))
            .collect();
        for peer in connected {
            if self
                .announced
                .get(&peer)
                .is_some_and(|t| now.mono_ms.saturating_sub(*t) < every)
            {
                continue;
            }
            self.announced.insert(peer.clone(), now.mono_ms);
            let _ = self.swim.announce(now.mono_ms, MemberId::placeholder(peer));
        }
        if members.iter().any(|m| self.peers.is_connected(m)) {
            self.peers.mark_met_member();
        }
        self.flush_swim(now);
        self.check_clock();
        if let Some(file) = self.peers.watermarks().take_dirty(now.wall_ms) {
            self.out.push_back(Output::SaveMembers(file));
        }
    }

    /// DESIGN §2 with CockroachDB's rule: a node whose clock is ahead of
    /// most live members by more than `max_clock_skew` takes no local
    /// writes until its clock is back.
    fn check_clock(&mut self) {
        let live: Vec<String> = self.swim.active().map(|m| m.peer.clone()).collect();
        let ahead = self
            .offsets
            .ahead_of_majority(live.iter().map(String::as_str), self.cfg.max_clock_skew_ms);
        if ahead != self.fenced {
            self.fenced = ahead;
            self.out.push_back(Output::Fence(ahead.then(|| {
                format!(
                    "this node's clock is ahead of most members by more than max_clock_skew ({} ms); fix its time (NTP)",
                    self.cfg.max_clock_skew_ms
                )
            })));
        }
    }
}

/// Purge passes run every `grace / 2`, between 1 s and 5 min.
pub fn purge_every(grace_ms: u64) -> u64 {
    (grace_ms / 2).clamp(1_000, 300_000)
}

/// Which tombstones may be purged (DESIGN §6): those stamped below every
/// counted member's watermark and below `now - grace`, and written here
/// before every member's proof and before `now - grace`; none while there
/// is no member. Returns (version bound, written-before bound in wall ms).
pub fn purge_bound(members: Option<watermarks::Proven>, now: Now, grace_ms: u64) -> Option<(u64, u64)> {
    let p = members?;
    let cutoff = now.wall_ms.saturating_sub(grace_ms);
    // HLC versions carry wall-clock ms in their high bits.
    Some((p.below.min(from_physical(cutoff)), p.held_at_ms.min(cutoff)))
}
