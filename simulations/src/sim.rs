//! The discrete-event simulator: N copies of the replication core
//! (`syncnode_protocol::replica::Replica`), each over an in-memory store,
//! on a simulated network.
//!
//! Time is virtual (µs) and every random choice comes from one seeded
//! ChaCha RNG; events are ordered by (time, sequence number) and every map
//! is ordered, so a seed replays a run bit for bit — the SHA-256 over the
//! processed events (`trace_hash`) proves it. The network delivers each
//! message after a sampled latency (normal, per link class), behind the
//! link's bandwidth queue, and may lose, duplicate or hold it back. Links
//! are cut by partitions (both ways or one way) and flaps; a connection
//! over a cut link drops after `connection_timeout_ms`, a crashed node's at
//! once, and reachable peers redial. Everything the cores send is a
//! request or an answer on a connection, as in the node (CDC along the
//! core's relay tree, roots in one exchange per pair). A crash loses the core's memory and
//! keeps the store and the members file; each node's clock has its own
//! offset and drift.

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Mutex;

use syncnode_protocol::membership::MemberId;
use syncnode_protocol::memory::MemoryStore;
use syncnode_protocol::replica::{
    Input, MembersFile, Now, Output, Replica, ReplicaConfig, Store, Task, run_ready, run_task,
};
use syncnode_protocol::wire::{Body, Envelope, MemberAck, MemberPacket, Request, Response, WireItem};

use crate::check::History;
use crate::scenario::{FaultKind, Scenario};

/// Wall clock at the start of every run (ms), 2026.
pub const BASE_WALL_MS: u64 = 1_780_000_000_000;
/// Connection upkeep and sampling periods (µs).
const LINKS_EVERY_US: u64 = 250_000;
const SAMPLE_EVERY_US: u64 = 20_000;
/// After the roots agree, the run goes on this long to let the last
/// sessions finish before the checks (µs).
const QUIET_US: u64 = 2_000_000;

#[derive(Debug, Clone)]
enum Msg {
    Request { id: u64, req: Request },
    Response { id: u64, resp: Response },
    Member(MemberPacket),
    MemberAck(MemberAck),
}

impl Msg {
    /// Bytes on the wire (the real encoding).
    fn size(&self) -> usize {
        let body = match self {
            Msg::Request { req, .. } => Body::Request(req.clone()),
            Msg::Response { resp, .. } => Body::Response(resp.clone()),
            Msg::Member(p) => Body::Member(p.clone()),
            Msg::MemberAck(a) => Body::MemberAck(*a),
        };
        Envelope::new("sim", body).encode().len() + 4
    }

    /// What a request is for (an answer is counted with its request).
    fn kind(&self) -> MsgKind {
        match self {
            Msg::Request {
                req: Request::Cdc { .. },
                ..
            } => MsgKind::Cdc,
            Msg::Request {
                req: Request::Roots(_), ..
            } => MsgKind::Roots,
            Msg::Request { .. } | Msg::Response { .. } => MsgKind::Sync,
            Msg::Member(_) | Msg::MemberAck(_) => MsgKind::Member,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MsgKind {
    Cdc,
    Roots,
    Sync,
    Member,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        from: usize,
        to: usize,
        to_epoch: u64,
        size: u64,
        msg: Msg,
    },
    Tick {
        node: usize,
    },
    Write,
    Fault(usize),
    Flap {
        a: usize,
        b: usize,
        period_us: u64,
        until_us: u64,
    },
    Links,
    Connect {
        a: usize,
        b: usize,
        epochs: (u64, u64),
    },
    /// Storage work of a node's incarnation finishes.
    Task {
        node: usize,
        epoch: u64,
        task: u64,
        work: Task,
    },
    Sample,
    End,
}

/// A node's clock: its offset (wall only) and drift (both clocks).
#[derive(Debug, Clone, Copy, Default)]
struct Clock {
    offset_ms: i64,
    drift_ppm: i64,
}

impl Clock {
    fn mono_ms(&self, t_us: u64) -> u64 {
        ((t_us as i128 * (1_000_000 + self.drift_ppm as i128) / 1_000_000) / 1000) as u64
    }

    fn now(&self, t_us: u64) -> Now {
        let mono = self.mono_ms(t_us);
        Now {
            mono_ms: mono,
            wall_ms: (BASE_WALL_MS as i64 + mono as i64 + self.offset_ms) as u64,
        }
    }

    /// The simulated time (µs) at which this clock reads `mono_ms`.
    fn at(&self, mono_ms: u64) -> u64 {
        (mono_ms as i128 * 1000 * 1_000_000 / (1_000_000 + self.drift_ppm as i128)) as u64
    }
}

struct SimNode {
    name: String,
    region: String,
    store: Mutex<MemoryStore>,
    replica: Option<Replica>,
    /// What survives a crash besides the store.
    members_file: MembersFile,
    /// Incarnation: messages to an earlier one are dropped (its
    /// connections closed with it).
    epoch: u64,
    clock: Clock,
    fenced: bool,
    started: bool,
    removed: bool,
    tick_at: Option<u64>,
}

/// Counters of what crossed the network.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Traffic {
    pub messages: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
    /// Bytes between nodes of different regions, and per message kind.
    pub wan_bytes: u64,
    pub wan_bytes_by_kind: BTreeMap<String, u64>,
    pub lost: u64,
    pub duplicated: u64,
    pub dropped_unconnected: u64,
}

pub struct Sim {
    pub sc: Scenario,
    pub seed: u64,
    rng: ChaCha8Rng,
    pub now_us: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    nodes: Vec<SimNode>,
    by_name: BTreeMap<String, usize>,
    /// Directed cuts a → b.
    cut: BTreeSet<(usize, usize)>,
    /// Since when a connected pair's link has been cut (µs).
    cut_since: BTreeMap<(usize, usize), u64>,
    connected: BTreeSet<(usize, usize)>,
    connecting: BTreeSet<(usize, usize)>,
    /// When each directed link is free to send again (bandwidth).
    busy_until: BTreeMap<(usize, usize), u64>,
    flapping: bool,
    /// What each request in flight is for: its answer counts the same.
    req_kinds: BTreeMap<(usize, usize, u64), MsgKind>,
    trace: Sha256,
    pub events_processed: u64,
    pub traffic: Traffic,
    /// Messages sent when the workload began and ended: what the writes
    /// cost is measured between the two.
    pub messages_at_first_write: Option<u64>,
    /// WAN bytes when the first and the last write were made.
    pub wan_at_first_write: Option<u64>,
    pub wan_at_last_write: Option<u64>,
    /// Bytes of the CDC deltas of the writes made (content inlined), and
    /// of those made while some link was cut (what a heal must carry).
    pub delta_bytes: u64,
    pub delta_bytes_during_cuts: u64,
    /// WAN bytes at the last heal, and those spent from each heal until the
    /// roots agreed.
    wan_at_heal: u64,
    /// A cut was healed and the roots have not agreed since.
    recovering: bool,
    pub recovery_wan_bytes: u64,
    pub messages_at_last_write: Option<u64>,
    pub history: History,
    /// Per 100 ms: divergent nodes, bytes sent.
    pub series: Vec<(f64, usize, u64)>,
    bytes_this_slot: u64,
    keys_written: Vec<String>,
    next_key: u64,
    heal_at: Option<u64>,
    /// Per node: its root and since when it has held it.
    root_since: Vec<(Option<[u8; 32]>, u64)>,
    pub heal_to_equal_ms: Vec<Vec<f64>>,
    ending: bool,
    converged_at: Option<u64>,
    pub end_us: u64,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    pub fn new(sc: Scenario, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let regions = sc.node_regions();
        let joins_late: BTreeSet<usize> = sc
            .faults
            .iter()
            .filter_map(|f| match f.kind {
                FaultKind::Join { node } => Some(node),
                _ => None,
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, region) in regions.iter().enumerate() {
            let mut store = MemoryStore::new(sc.replica.depth);
            store.node = format!("n{i}");
            store.max_skew_ms = sc.replica.max_clock_skew_ms;
            store.journal = Some(Vec::new());
            nodes.push(SimNode {
                name: format!("n{i}"),
                region: region.clone(),
                store: Mutex::new(store),
                replica: None,
                members_file: MembersFile::default(),
                epoch: 0,
                clock: Clock::default(),
                fenced: false,
                started: false,
                removed: false,
                tick_at: None,
            });
        }
        // The preloaded items: the same versions on every node (one store
        // built, then copied).
        if sc.workload.preload > 0 {
            let mut base = MemoryStore::new(sc.replica.depth);
            for i in 0..sc.workload.preload {
                let content = format!("preload-{i}").into_bytes();
                base.put(WireItem {
                    entry: syncnode_protocol::wire::Entry {
                        id: format!("p{i}"),
                        version: syncnode_protocol::hlc::from_physical(BASE_WALL_MS - 86_400_000) + i as u64,
                        origin: "preload".into(),
                        tombstone: false,
                        content_hash: Sha256::digest(&content).into(),
                    },
                    updated_at: 0,
                    state: "default".into(),
                    json: false,
                    content,
                    media_type: None,
                });
            }
            for n in &nodes {
                let mut s = n.store.lock().expect("store");
                let mut copy = base.clone();
                copy.node = s.node.clone();
                copy.max_skew_ms = s.max_skew_ms;
                copy.journal = Some(Vec::new());
                *s = copy;
            }
        }
        let by_name = nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();
        let n = nodes.len();
        let mut sim = Self {
            history: History::new(n),
            root_since: vec![(None, 0); n],
            seed,
            rng: {
                let _ = rng.next_u64();
                rng
            },
            sc,
            now_us: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            by_name,
            cut: BTreeSet::new(),
            cut_since: BTreeMap::new(),
            connected: BTreeSet::new(),
            connecting: BTreeSet::new(),
            busy_until: BTreeMap::new(),
            flapping: false,
            req_kinds: BTreeMap::new(),
            trace: Sha256::new(),
            events_processed: 0,
            traffic: Traffic::default(),
            messages_at_first_write: None,
            wan_at_first_write: None,
            wan_at_last_write: None,
            delta_bytes: 0,
            delta_bytes_during_cuts: 0,
            wan_at_heal: 0,
            recovering: false,
            recovery_wan_bytes: 0,
            messages_at_last_write: None,
            series: Vec::new(),
            bytes_this_slot: 0,
            keys_written: Vec::new(),
            next_key: 0,
            heal_at: None,
            heal_to_equal_ms: Vec::new(),
            ending: false,
            converged_at: None,
            end_us: 0,
        };
        for i in 0..n {
            if !joins_late.contains(&i) {
                sim.start_node(i);
            }
        }
        for (i, f) in sim.sc.faults.clone().iter().enumerate() {
            sim.at(secs(f.at_s), Ev::Fault(i));
        }
        let w = &sim.sc.workload;
        if w.writes_per_s > 0.0 {
            sim.at(secs(w.start_s), Ev::Write);
        }
        sim.at(LINKS_EVERY_US, Ev::Links);
        sim.at(SAMPLE_EVERY_US, Ev::Sample);
        sim.at(secs(sim.sc.duration_s), Ev::End);
        sim
    }

    fn at(&mut self, t_us: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t_us.max(self.now_us), self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// SHA-256 over every event processed so far.
    pub fn trace_hash(&self) -> String {
        hex::encode(self.trace.clone().finalize())
    }

    fn config(&self, i: usize) -> ReplicaConfig {
        let r = &self.sc.replica;
        ReplicaConfig {
            me: MemberId {
                peer: self.nodes[i].name.clone(),
                addrs: vec![format!("/sim/{}", self.nodes[i].name)],
                region: if r.ignore_regions {
                    "default".into()
                } else {
                    self.nodes[i].region.clone()
                },
                bump: 0,
            },
            cluster: self.sc.name.clone(),
            gossip_interval_ms: r.gossip_interval_ms,
            anti_entropy_interval_ms: r.anti_entropy_interval_ms,
            request_timeout_ms: r.request_timeout_ms,
            tombstone_grace_ms: r.tombstone_grace_ms,
            member_expiry_ms: r.member_expiry_ms,
            ledger_retention_ms: r.ledger_retention_ms,
            probe_interval_ms: r.probe_interval_ms,
            max_clock_skew_ms: r.max_clock_skew_ms,
            limits: Default::default(),
            seeded: self.seed_of(i).is_some() || !self.nodes[i].members_file.members.is_empty(),
            cdc_batch_ms: r.cdc_batch_ms,
        }
    }

    /// The node a starting node joins through: the lowest-numbered other
    /// node that has started.
    fn seed_of(&self, i: usize) -> Option<usize> {
        (0..self.nodes.len()).find(|&j| j != i && self.nodes[j].started)
    }

    fn start_node(&mut self, i: usize) {
        let cfg = self.config(i);
        let seed = self.rng.next_u64();
        let now = self.nodes[i].clock.now(self.now_us);
        let file = self.nodes[i].members_file.clone();
        // It joins as the node does: through whoever it connects to (the
        // network model connects reachable nodes), asking to be let in.
        let replica = Replica::new(cfg, file, now, seed);
        let node = &mut self.nodes[i];
        node.replica = Some(replica);
        node.epoch += 1;
        node.started = true;
        node.tick_at = None;
        node.fenced = false;
        self.drain(i, VecDeque::new());
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].replica.take().is_none() {
            return;
        }
        let peers: Vec<usize> = self
            .connected
            .iter()
            .filter(|(a, b)| *a == i || *b == i)
            .map(|&(a, b)| if a == i { b } else { a })
            .collect();
        for p in peers {
            self.disconnect(i, p);
        }
    }

    fn up(&self, i: usize) -> bool {
        self.nodes[i].replica.is_some()
    }

    /// Feeds `input` (and what it leads to) to node `i`.
    fn feed(&mut self, i: usize, input: Input) {
        self.drain(i, VecDeque::from([input]));
    }

    fn drain(&mut self, i: usize, mut inputs: VecDeque<Input>) {
        let now = self.nodes[i].clock.now(self.now_us);
        SIM_TIME_US.store(self.now_us, std::sync::atomic::Ordering::Relaxed);
        let _span = tracing::info_span!("node", n = i).entered();
        loop {
            let outputs = {
                let node = &mut self.nodes[i];
                let Some(replica) = node.replica.as_mut() else { return };
                node.store.lock().expect("store").now_ms = now.wall_ms;
                if let Some(input) = inputs.pop_front() {
                    replica.handle(now, input, &node.store);
                } else {
                    replica.handle(now, Input::Tick, &node.store);
                }
                let mut outs = Vec::new();
                while let Some(o) = replica.poll_output() {
                    outs.push(o);
                }
                outs
            };
            for o in outputs {
                self.act(i, o, &mut inputs);
            }
            self.journal(i);
            if inputs.is_empty() {
                break;
            }
        }
        self.schedule_tick(i);
    }

    fn schedule_tick(&mut self, i: usize) {
        let Some(r) = self.nodes[i].replica.as_ref() else {
            return;
        };
        let t = self.nodes[i].clock.at(r.poll_timeout()).max(self.now_us + 1);
        if self.nodes[i].tick_at.is_none_or(|s| t < s) {
            self.nodes[i].tick_at = Some(t);
            self.at(t, Ev::Tick { node: i });
        }
    }

    fn act(&mut self, i: usize, out: Output, inputs: &mut VecDeque<Input>) {
        match out {
            Output::Send { peer, id, req } => {
                if let Some(&p) = self.by_name.get(&peer) {
                    if self.connected.contains(&pair(i, p)) {
                        self.send(i, p, Msg::Request { id, req });
                    } else {
                        inputs.push_back(Input::Response {
                            peer,
                            id,
                            result: Err("not connected".into()),
                        });
                    }
                }
            }
            Output::Respond { peer, id, resp } => {
                if let Some(&p) = self.by_name.get(&peer) {
                    self.send(i, p, Msg::Response { id, resp });
                }
            }
            Output::SendMember { peer, packet, .. } => {
                if let Some(&p) = self.by_name.get(&peer) {
                    // Dialed if need be: only a cut link stops it.
                    self.send(i, p, Msg::Member(packet));
                }
            }
            Output::AckMember { peer, ack } => {
                if let Some(&p) = self.by_name.get(&peer) {
                    self.send(i, p, Msg::MemberAck(ack));
                }
            }
            Output::Run { task, work } => {
                let max = self.sc.replica.storage_ms;
                if max <= 0.0 {
                    let result = run_ready(run_task(&self.nodes[i].store, work));
                    inputs.push_back(Input::Done { task, result });
                } else {
                    let delay = (self.rng.random_range(0.0..max) * 1000.0) as u64;
                    let epoch = self.nodes[i].epoch;
                    self.at(
                        self.now_us + delay,
                        Ev::Task {
                            node: i,
                            epoch,
                            task,
                            work,
                        },
                    );
                }
            }
            // Reachable peers are connected by the network model.
            Output::Dial { .. } => {}
            Output::Ban { .. } | Output::Unban { .. } => {}
            Output::SaveMembers(file) => self.nodes[i].members_file = file,
            Output::Fence(reason) => self.nodes[i].fenced = reason.is_some(),
            // Every simulated node speaks the current wire version.
            Output::SessionFinished { .. } | Output::GossipRoots(_) => {}
        }
    }

    /// Versions node `i` stored since last asked: visibility of writes.
    fn journal(&mut self, i: usize) {
        let entries = {
            let mut s = self.nodes[i].store.lock().expect("store");
            std::mem::take(s.journal.get_or_insert_with(Vec::new))
        };
        for e in entries {
            self.history.stored(i, &e, self.now_us);
        }
    }

    fn latency_us(&mut self, a: usize, b: usize) -> u64 {
        let l = &self.sc.latency;
        let (mean, jitter) = if self.nodes[a].region == self.nodes[b].region {
            (l.intra_ms, l.intra_jitter_ms)
        } else {
            (l.inter_ms, l.inter_jitter_ms)
        };
        // Box–Muller from two uniform draws.
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random_range(0.0..1.0);
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        ((mean + jitter * z).max(l.min_ms) * 1000.0) as u64
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if from == to || !self.up(to) {
            return;
        }
        let kind = match &msg {
            Msg::Request { id, .. } => {
                let k = msg.kind();
                self.req_kinds.insert((from, to, *id), k);
                k
            }
            Msg::Response { id, .. } => self.req_kinds.remove(&(to, from, *id)).unwrap_or(MsgKind::Sync),
            _ => msg.kind(),
        };
        let kind = format!("{kind:?}").to_lowercase();
        let size = msg.size() as u64;
        *self.traffic.messages.entry(kind.clone()).or_default() += 1;
        if self.cut.contains(&(from, to)) {
            // Never left the host: counted as lost, not as traffic.
            self.traffic.lost += 1;
            return;
        }
        if self.nodes[from].region != self.nodes[to].region {
            self.traffic.wan_bytes += size;
            *self.traffic.wan_bytes_by_kind.entry(kind.clone()).or_default() += size;
        }
        *self.traffic.bytes.entry(kind).or_default() += size;
        self.bytes_this_slot += size;
        let link = self.sc.link.clone();
        if link.loss > 0.0 && self.rng.random_bool(link.loss) {
            self.traffic.lost += 1;
            return;
        }
        let mut start = self.now_us;
        if link.bandwidth_bytes_per_s > 0.0 {
            let free = self.busy_until.get(&(from, to)).copied().unwrap_or(0);
            start = start.max(free);
            let tx = (size as f64 / link.bandwidth_bytes_per_s * 1e6) as u64;
            self.busy_until.insert((from, to), start + tx);
            start += tx;
        }
        let mut arrive = start + self.latency_us(from, to);
        if link.reorder > 0.0 && self.rng.random_bool(link.reorder) {
            arrive += (link.reorder_ms * 1000.0) as u64;
        }
        let to_epoch = self.nodes[to].epoch;
        if link.duplicate > 0.0 && self.rng.random_bool(link.duplicate) {
            self.traffic.duplicated += 1;
            let again = arrive + self.latency_us(from, to);
            self.at(
                again,
                Ev::Deliver {
                    from,
                    to,
                    to_epoch,
                    size,
                    msg: msg.clone(),
                },
            );
        }
        self.at(
            arrive,
            Ev::Deliver {
                from,
                to,
                to_epoch,
                size,
                msg,
            },
        );
    }

    fn deliver(&mut self, from: usize, to: usize, to_epoch: u64, msg: Msg) {
        if !self.up(to) || self.nodes[to].epoch != to_epoch {
            return;
        }
        let connection = matches!(msg, Msg::Request { .. } | Msg::Response { .. });
        if connection && !self.connected.contains(&pair(from, to)) {
            self.traffic.dropped_unconnected += 1;
            return;
        }
        let peer = self.nodes[from].name.clone();
        match msg {
            Msg::Request { id, req } => self.feed(to, Input::Request { peer, id, req }),
            Msg::Response { id, resp } => self.feed(
                to,
                Input::Response {
                    peer,
                    id,
                    result: Ok(resp),
                },
            ),
            Msg::Member(packet) => self.feed(to, Input::Member { peer, packet }),
            Msg::MemberAck(ack) => self.feed(to, Input::MemberAck { peer, ack }),
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        !self.cut.contains(&(a, b)) && !self.cut.contains(&(b, a))
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        if !self.connected.remove(&pair(a, b)) {
            return;
        }
        self.cut_since.remove(&pair(a, b));
        for (x, y) in [(a, b), (b, a)] {
            if self.up(x) {
                let peer = self.nodes[y].name.clone();
                self.feed(x, Input::Disconnected { peer });
            }
        }
    }

    /// Connection upkeep: cut links time out, reachable peers redial.
    fn links(&mut self) {
        let n = self.nodes.len();
        let timeout = self.sc.replica.connection_timeout_ms * 1000;
        for a in 0..n {
            for b in a + 1..n {
                let p = (a, b);
                let reachable = self.reachable(a, b);
                if self.connected.contains(&p) {
                    if reachable {
                        self.cut_since.remove(&p);
                    } else {
                        let since = *self.cut_since.entry(p).or_insert(self.now_us);
                        if self.now_us - since >= timeout {
                            self.disconnect(a, b);
                        }
                    }
                } else if reachable && self.up(a) && self.up(b) && !self.connecting.contains(&p) {
                    self.connecting.insert(p);
                    let redial = self.sc.replica.redial_ms * 1000;
                    let delay = self.rng.random_range(0..=redial) + 2 * self.latency_us(a, b);
                    let epochs = (self.nodes[a].epoch, self.nodes[b].epoch);
                    self.at(self.now_us + delay, Ev::Connect { a, b, epochs });
                }
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize, epochs: (u64, u64)) {
        self.connecting.remove(&(a, b));
        let same = (self.nodes[a].epoch, self.nodes[b].epoch) == epochs;
        if !same || !self.up(a) || !self.up(b) || !self.reachable(a, b) || self.connected.contains(&(a, b)) {
            return;
        }
        self.connected.insert((a, b));
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.nodes[y].name.clone();
            self.feed(x, Input::Connected { peer: peer.clone() });
            // What identify tells a node: every simulated node speaks this release's wire.
            let now = self.nodes[x].clock.now(self.now_us);
            if let Some(r) = self.nodes[x].replica.as_mut() {
                r.peers.set_wire(&peer, syncnode_protocol::wire::WIRE_VERSION, now);
            }
        }
    }

    fn write(&mut self) {
        let w = self.sc.workload.clone();
        let stop = secs(w.stop_s.unwrap_or(self.sc.duration_s));
        let gap = (-self.rng.random_range(f64::EPSILON..1.0f64).ln() / w.writes_per_s * 1e6) as u64;
        let sent: u64 = self.traffic.messages.values().sum();
        self.messages_at_first_write.get_or_insert(sent);
        self.wan_at_first_write.get_or_insert(self.traffic.wan_bytes);
        if self.now_us + gap < stop && !self.ending {
            self.at(self.now_us + gap.max(1), Ev::Write);
        } else {
            self.messages_at_last_write = Some(sent);
            self.wan_at_last_write = Some(self.traffic.wan_bytes);
        }
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.up(i) && w.region.as_ref().is_none_or(|r| *r == self.nodes[i].region))
            .collect();
        if candidates.is_empty() {
            self.history.unavailable += 1;
            return;
        }
        let i = candidates[self.rng.random_range(0..candidates.len())];
        if self.nodes[i].fenced {
            self.history.fenced += 1;
            return;
        }
        let r: f64 = self.rng.random_range(0.0..1.0);
        let (key, delete) = if !self.keys_written.is_empty() && r < w.delete + w.overwrite {
            (self.pick_key(&w), r < w.delete)
        } else {
            self.next_key += 1;
            let k = format!("k{}", self.next_key);
            self.keys_written.push(k.clone());
            (k, false)
        };
        let content = (!delete).then(|| {
            let len = self.rng.random_range(w.value_bytes_min..=w.value_bytes_max);
            let mut v = vec![0u8; len];
            self.rng.fill_bytes(&mut v);
            v
        });
        let now = self.nodes[i].clock.now(self.now_us);
        let item = {
            let mut s = self.nodes[i].store.lock().expect("store");
            s.now_ms = now.wall_ms;
            s.write(&key, content)
        };
        self.history.acked(i, &item.entry, self.now_us);
        let inline = (item.content.len() <= syncnode_protocol::replica::cdc::CDC_INLINE_MAX).then(|| item.clone());
        let delta = syncnode_protocol::wire::encoded_len(&syncnode_protocol::wire::CdcDelta {
            entry: item.entry.clone(),
            item: inline,
        }) as u64;
        self.delta_bytes += delta;
        if !self.cut.is_empty() {
            self.delta_bytes_during_cuts += delta;
        }
        self.journal(i);
        self.feed(i, Input::Committed(vec![item]));
    }

    fn pick_key(&mut self, w: &crate::scenario::Workload) -> String {
        let n = self.keys_written.len();
        let idx = if w.key_distribution == "zipf" {
            // Inverse-CDF of a continuous power law over ranks 1..=n.
            let u: f64 = self.rng.random_range(0.0..1.0);
            let s = w.zipf_s;
            let rank = if (s - 1.0).abs() < 1e-9 {
                (n as f64).powf(u)
            } else {
                ((u * ((n as f64).powf(1.0 - s) - 1.0)) + 1.0).powf(1.0 / (1.0 - s))
            };
            (rank as usize).clamp(1, n) - 1
        } else {
            self.rng.random_range(0..n)
        };
        // The most recent keys are the hottest.
        self.keys_written[n - 1 - idx].clone()
    }

    fn fault(&mut self, k: usize) {
        let f = self.sc.faults[k].kind.clone();
        let n = self.nodes.len();
        match f {
            FaultKind::Partition { groups } => {
                for (gi, g) in groups.iter().enumerate() {
                    for (hi, h) in groups.iter().enumerate() {
                        if gi != hi {
                            for &a in g {
                                for &b in h {
                                    self.cut.insert((a, b));
                                }
                            }
                        }
                    }
                }
            }
            FaultKind::OneWay { from, to } => {
                for &a in &from {
                    for &b in &to {
                        self.cut.insert((a, b));
                    }
                }
            }
            FaultKind::RegionOutage { region } => {
                for a in 0..n {
                    for b in 0..n {
                        if (self.nodes[a].region == region) != (self.nodes[b].region == region) {
                            self.cut.insert((a, b));
                        }
                    }
                }
            }
            FaultKind::Heal => self.heal(),
            FaultKind::Flap {
                a,
                b,
                period_ms,
                until_s,
            } => {
                self.flapping = true;
                self.at(
                    self.now_us,
                    Ev::Flap {
                        a,
                        b,
                        period_us: period_ms * 1000,
                        until_us: secs(until_s),
                    },
                );
            }
            FaultKind::Crash { node } => self.crash(node),
            FaultKind::Restart { node } => {
                if !self.up(node) && !self.nodes[node].removed {
                    self.start_node(node);
                }
            }
            FaultKind::Clock {
                node,
                offset_ms,
                drift_ppm,
            } => {
                // Drift changes the rate from now on without a jump.
                let c = &mut self.nodes[node].clock;
                let before = c.now(self.now_us);
                c.drift_ppm = drift_ppm;
                let mono_now = c.mono_ms(self.now_us) as i64;
                c.offset_ms = offset_ms + (before.mono_ms as i64 - mono_now);
                if let Some(r) = self.nodes[node].replica.as_ref() {
                    let _ = r;
                }
            }
            FaultKind::Join { node } => {
                if !self.nodes[node].started {
                    self.start_node(node);
                }
            }
            FaultKind::Remove { node } => {
                self.crash(node);
                self.nodes[node].removed = true;
            }
        }
    }

    fn heal(&mut self) {
        if !self.cut.is_empty() || self.flapping {
            self.heal_at = Some(self.now_us);
            self.wan_at_heal = self.traffic.wan_bytes;
            self.recovering = true;
            self.root_since.iter_mut().for_each(|r| r.1 = self.now_us);
        }
        self.cut.clear();
        self.flapping = false;
    }

    /// Records divergence and traffic; after a heal, times convergence.
    fn sample(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.up(i)).collect();
        let roots: Vec<Option<[u8; 32]>> = live
            .iter()
            .map(|&i| self.nodes[i].store.lock().expect("store").tree.root_hash())
            .collect();
        for (k, &i) in live.iter().enumerate() {
            if self.root_since[i].0 != roots[k] {
                self.root_since[i] = (roots[k], self.now_us);
            }
        }
        // The most common root; nodes holding another diverge.
        let mut counts: BTreeMap<Option<[u8; 32]>, usize> = BTreeMap::new();
        for r in &roots {
            *counts.entry(*r).or_default() += 1;
        }
        let top = counts.values().copied().max().unwrap_or(0);
        let divergent = roots.len() - top;
        if self.now_us % 100_000 < SAMPLE_EVERY_US {
            self.series.push((
                self.now_us as f64 / 1e6,
                divergent,
                std::mem::take(&mut self.bytes_this_slot),
            ));
        }
        let equal = divergent == 0 && !live.is_empty();
        if equal && let Some(heal) = self.heal_at.take() {
            let per_node: Vec<f64> = live
                .iter()
                .map(|&i| self.root_since[i].1.saturating_sub(heal) as f64 / 1000.0)
                .collect();
            self.heal_to_equal_ms.push(per_node);
            if std::mem::take(&mut self.recovering) {
                self.recovery_wan_bytes += self.traffic.wan_bytes - self.wan_at_heal;
            }
        }
        if self.ending {
            let idle = live.iter().all(|&i| {
                self.nodes[i]
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.sessions().next().is_none())
            });
            if equal && idle && self.cut.is_empty() {
                let at = *self.converged_at.get_or_insert(self.now_us);
                if self.now_us - at >= QUIET_US {
                    self.end_us = self.now_us;
                }
            } else {
                self.converged_at = None;
            }
        }
    }

    /// The end of the faults: the network heals, crashed nodes come back,
    /// writes stop, and the cluster gets `settle_s` to converge.
    fn end(&mut self) {
        self.ending = true;
        if self.messages_at_last_write.is_none() {
            self.messages_at_last_write = Some(self.traffic.messages.values().sum());
        }
        self.heal();
        for i in 0..self.nodes.len() {
            if self.nodes[i].started && !self.up(i) && !self.nodes[i].removed {
                self.start_node(i);
            }
        }
        if self.heal_at.is_none() {
            self.heal_at = Some(self.now_us);
        }
        self.history.settle_from = self.now_us;
    }

    /// Runs to the end; returns whether the cluster converged.
    pub fn run(&mut self, mut progress: impl FnMut(f64)) -> bool {
        let deadline = secs(self.sc.duration_s + self.sc.settle_s);
        let mut last_report = 0;
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            if t > deadline || self.end_us > 0 {
                break;
            }
            let ev = self.events.remove(&seq).expect("queued event");
            self.now_us = t;
            self.events_processed += 1;
            self.trace.update(t.to_be_bytes());
            if t - last_report > 1_000_000 {
                last_report = t;
                progress(t as f64 / deadline as f64);
            }
            match ev {
                Ev::Deliver {
                    from,
                    to,
                    to_epoch,
                    size,
                    msg,
                } => {
                    self.trace.update([0]);
                    self.trace.update((from as u32).to_be_bytes());
                    self.trace.update((to as u32).to_be_bytes());
                    self.trace.update(size.to_be_bytes());
                    self.deliver(from, to, to_epoch, msg);
                }
                Ev::Tick { node } => {
                    self.trace.update([1]);
                    self.trace.update((node as u32).to_be_bytes());
                    if self.nodes[node].tick_at == Some(t) {
                        self.nodes[node].tick_at = None;
                        self.feed(node, Input::Tick);
                    }
                }
                Ev::Write => self.write(),
                Ev::Fault(k) => {
                    if !self.ending {
                        self.fault(k)
                    }
                }
                Ev::Flap {
                    a,
                    b,
                    period_us,
                    until_us,
                } => {
                    if self.flapping && t < until_us && !self.ending {
                        if !self.cut.remove(&(a, b)) {
                            self.cut.insert((a, b));
                            self.cut.insert((b, a));
                        } else {
                            self.cut.remove(&(b, a));
                        }
                        self.at(
                            t + period_us,
                            Ev::Flap {
                                a,
                                b,
                                period_us,
                                until_us,
                            },
                        );
                    } else if self.flapping && t >= until_us {
                        self.cut.remove(&(a, b));
                        self.cut.remove(&(b, a));
                        self.heal_at = Some(t);
                        self.wan_at_heal = self.traffic.wan_bytes;
                        self.recovering = true;
                        self.flapping = false;
                    }
                }
                Ev::Links => {
                    self.links();
                    self.at(t + LINKS_EVERY_US, Ev::Links);
                }
                Ev::Connect { a, b, epochs } => self.connect(a, b, epochs),
                Ev::Task {
                    node,
                    epoch,
                    task,
                    work,
                } => {
                    self.trace.update([2]);
                    self.trace.update((node as u32).to_be_bytes());
                    // A crash loses the work in flight with the memory.
                    if self.up(node) && self.nodes[node].epoch == epoch {
                        let now = self.nodes[node].clock.now(t);
                        self.nodes[node].store.lock().expect("store").now_ms = now.wall_ms;
                        let result = run_ready(run_task(&self.nodes[node].store, work));
                        self.journal(node);
                        self.feed(node, Input::Done { task, result });
                    }
                }
                Ev::Sample => {
                    self.sample();
                    self.at(t + SAMPLE_EVERY_US, Ev::Sample);
                }
                Ev::End => self.end(),
            }
        }
        if self.end_us == 0 {
            self.end_us = self.now_us;
        }
        progress(1.0);
        self.end_us > 0 && self.converged_at.is_some()
    }

    /// The final state of every running node, for the checkers.
    pub fn final_states(&self) -> Vec<(usize, std::sync::MutexGuard<'_, MemoryStore>)> {
        (0..self.nodes.len())
            .filter(|&i| self.up(i))
            .map(|i| (i, self.nodes[i].store.lock().expect("store")))
            .collect()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Sessions run and other counters, summed over the running nodes.
    pub fn replication_counters(&self) -> BTreeMap<&'static str, u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = BTreeMap::new();
        for n in self.nodes.iter().filter_map(|n| n.replica.as_ref()) {
            let s = &n.peers.stats;
            for (k, v) in [
                ("sessions", s.sessions.load(Relaxed)),
                ("session_failures", s.session_failures.load(Relaxed)),
                ("items_pulled", s.items_pulled.load(Relaxed)),
                ("items_pushed", s.items_pushed.load(Relaxed)),
                ("cdc_applied", s.cdc_applied.load(Relaxed)),
                ("cdc_fetched", s.cdc_fetched.load(Relaxed)),
                ("tombstones_purged", s.tombstones_purged.load(Relaxed)),
            ] {
                *out.entry(k).or_default() += v;
            }
        }
        out
    }

    /// Whether any store refused a purged delete's older version, deferred
    /// a version for clock skew: counters for the report.
    pub fn store_counters(&self) -> (u64, u64) {
        self.nodes.iter().fold((0, 0), |(r, d), n| {
            let s = n.store.lock().expect("store");
            (r + s.resurrections_refused, d + s.deferred)
        })
    }

    pub fn root_of(&self, i: usize) -> Option<[u8; 32]> {
        self.nodes[i].store.with_tree(|t| t.root_hash())
    }
}

/// The simulated time, for log lines (`syncsim --log`).
pub static SIM_TIME_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Log lines stamped with the simulated time.
pub struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let us = SIM_TIME_US.load(std::sync::atomic::Ordering::Relaxed);
        write!(w, "{:>10.3}s", us as f64 / 1e6)
    }
}

fn secs(s: f64) -> u64 {
    (s * 1e6) as u64
}
