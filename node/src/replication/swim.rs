//! The membership driver (DESIGN §5.6): feeds SWIM — the protocol crate's
//! state machine — what the swarm hears, carries out what it asks, and acts
//! on what it learns:
//!
//! - every member joins the purge watermarks (`Peers::add_member`) and is
//!   dialed, up to `max_peers` (every region covered), redialed with
//!   backoff; idle surplus connections we dialed are closed;
//! - a connected peer SWIM does not list is asked to let us in (how a node
//!   joins through any seed);
//! - each packet is checked before SWIM sees it (its sender is the
//!   authenticated peer; no start time from the future) and answered with
//!   the times for a clock-offset sample;
//! - local writes are fenced while our clock runs ahead of most members.
//!
//! It reaches the network only through `Links`, which the swarm implements.

use libp2p::{Multiaddr, PeerId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncnode_protocol::clock_offset::Sample;
use syncnode_protocol::membership::{
    Link, MemberEvent, MemberId, Membership, MembershipConfig, connection_targets, surplus_connections,
};
use syncnode_protocol::wire::{MemberAck, MemberPacket};

use super::connections::ConnectionLog;
use super::membership::{ClusterPacket, MemberTable, inspect};
use super::peers::Peers;
use crate::engine::SyncEngine;

/// What the driver needs of the network.
pub(super) trait Links {
    fn local_peer(&self) -> PeerId;
    fn linked(&self, peer: &PeerId) -> bool;
    fn linked_peers(&self) -> Vec<PeerId>;
    /// Sends a SWIM packet, teaching the swarm `addrs` when not connected.
    fn send_packet(&mut self, peer: PeerId, addrs: &[String], packet: MemberPacket);
    /// Dials `peer` at `addrs` unless connected or being dialed.
    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>);
    fn drop_link(&mut self, peer: PeerId);
}

/// The swarm's blocks (partitions) and bans: nothing goes to or comes from them.
pub(super) struct Blocked<'a> {
    pub manual: &'a HashSet<PeerId>,
    pub bans: &'a HashSet<PeerId>,
}

impl Blocked<'_> {
    fn contains(&self, peer: &PeerId) -> bool {
        self.manual.contains(peer) || self.bans.contains(peer)
    }
}

/// Why a membership packet was not taken.
pub(super) enum PacketRefusal {
    /// Invalid: count it against the peer.
    Penalize(String),
    /// Not the peer's fault (blocked, or its clock): drop it.
    Drop,
}

/// A member we keep a connection to, redialed with backoff.
struct MemberDial {
    next: Instant,
    backoff: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Start times this far past our clock are refused (a day of clock error).
const FUTURE_BUMP_MS: u64 = 86_400_000;

/// Milliseconds on the wall clock (clock offsets; may jump).
pub(super) fn wall_ms() -> u64 {
    crate::engine::item::now_ms().max(0) as u64
}

pub(super) struct Swim {
    swim: Membership,
    table: Arc<MemberTable>,
    peers: Arc<Peers>,
    engine: Arc<SyncEngine>,
    cluster: String,
    dials: HashMap<PeerId, MemberDial>,
    /// When we last announced ourselves to a connected non-member.
    announced: HashMap<PeerId, Instant>,
    /// Peers with a connection they dialed (theirs to keep).
    inbound: HashSet<PeerId>,
    /// Last membership packet to or from each peer.
    contact: HashMap<PeerId, Instant>,
    max_peers: usize,
    /// Whether local writes are fenced because our clock runs ahead.
    clock_fenced: bool,
    /// The monotonic origin of SWIM's clock (wall clock jumps must not
    /// stall its timers).
    epoch: Instant,
}

impl Swim {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: MemberId,
        config: MembershipConfig,
        table: Arc<MemberTable>,
        peers: Arc<Peers>,
        engine: Arc<SyncEngine>,
        cluster: String,
        max_peers: usize,
    ) -> Self {
        Self {
            swim: Membership::new(me, config, rand::random()),
            table,
            peers,
            engine,
            cluster,
            dials: HashMap::new(),
            announced: HashMap::new(),
            inbound: HashSet::new(),
            contact: HashMap::new(),
            max_peers: max_peers.max(1),
            clock_fenced: false,
            epoch: Instant::now(),
        }
    }

    fn mono_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether SWIM knows no live member (a seed without a peer id is then
    /// still worth dialing).
    pub fn alone(&self) -> bool {
        self.swim.active().next().is_none()
    }

    /// Runs SWIM's timers that are due.
    pub fn tick(&mut self, links: &mut impl Links, blocked: &Blocked) {
        let now = self.mono_ms();
        if self.swim.next_deadline().is_some_and(|d| d <= now) {
            self.swim.tick(now);
            self.flush(links, blocked);
        }
    }

    /// Sends what SWIM wants sent, acts on its events, refreshes the table.
    fn flush(&mut self, links: &mut impl Links, blocked: &Blocked) {
        for (to, payload) in self.swim.take_outgoing() {
            let Ok(peer) = to.peer.parse::<PeerId>() else { continue };
            if blocked.contains(&peer) {
                continue;
            }
            self.contact.insert(peer, Instant::now());
            let packet = MemberPacket {
                sent_ms: wall_ms(),
                payload,
            };
            links.send_packet(peer, &to.addrs, packet);
        }
        for event in self.swim.take_events() {
            self.on_event(links, blocked, event);
        }
        let views = self
            .swim
            .members()
            .into_iter()
            .filter(|v| v.id.peer.parse().is_ok_and(|p| !self.peers.is_forgotten(p)))
            .collect();
        self.table
            .refresh(views, |p| p.parse().is_ok_and(|p: PeerId| links.linked(&p)));
    }

    fn on_event(&mut self, links: &mut impl Links, blocked: &Blocked, event: MemberEvent) {
        match event {
            MemberEvent::Up(m) => {
                tracing::info!(peer = %m.peer, region = %m.region, addrs = ?m.addrs, "member joined");
                if let Ok(p) = m.peer.parse::<PeerId>() {
                    self.peers.add_member(p, &m.addrs);
                    self.peers.set_region(p, Some(m.region.clone()));
                    self.table.mark_left(&m.peer, false);
                    self.dial(links, blocked, p, &m);
                }
            }
            MemberEvent::Down(m) => {
                tracing::info!(peer = %m.peer, "member down");
            }
            MemberEvent::Renamed { old, new } => {
                if old.addrs != new.addrs {
                    tracing::info!(peer = %new.peer, addrs = ?new.addrs, "member restarted with new addresses");
                }
                self.table.mark_left(&new.peer, false);
                if let Ok(p) = new.peer.parse::<PeerId>() {
                    self.peers.add_member(p, &new.addrs);
                    self.peers.set_region(p, Some(new.region.clone()));
                }
            }
            MemberEvent::Rejoined(me) => {
                tracing::info!(
                    bump = me.bump,
                    "the cluster had declared this node down (a partition?); rejoined"
                );
            }
        }
    }

    /// Dials a member at its advertised addresses (DNS names resolve anew).
    fn dial(&mut self, links: &mut impl Links, blocked: &Blocked, peer: PeerId, m: &MemberId) {
        if peer == links.local_peer() || blocked.contains(&peer) || links.linked(&peer) {
            return;
        }
        let addrs: Vec<Multiaddr> = m.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if !addrs.is_empty() {
            links.dial_peer(peer, addrs);
        }
    }

    /// Keeps connections to the members (up to `max_peers`, every region
    /// covered), announces us to connected peers that are not members yet,
    /// closes surplus connections, and fences local writes while our clock
    /// runs ahead of most members.
    pub fn maintain(&mut self, links: &mut impl Links, blocked: &Blocked, log: &mut ConnectionLog) {
        let now = Instant::now();
        let active: Vec<MemberId> = self.swim.active().cloned().collect();
        let me = links.local_peer().to_string();
        let want = connection_targets(&me, &active, self.max_peers);
        for m in &want {
            let Ok(peer) = m.peer.parse::<PeerId>() else { continue };
            if links.linked(&peer) {
                self.dials.remove(&peer);
                continue;
            }
            let d = self.dials.entry(peer).or_insert(MemberDial {
                next: now,
                backoff: Duration::from_millis(500),
            });
            if d.next > now {
                continue;
            }
            d.next = now + d.backoff;
            d.backoff = (d.backoff * 2).min(MAX_BACKOFF);
            self.dial(links, blocked, peer, m);
        }
        // Peers we are connected to that SWIM does not list yet (a seed, a
        // node that restarted): ask them to let us in.
        let members: HashSet<String> = active.iter().map(|m| m.peer.clone()).collect();
        let every = self.swim.config().probe_period * 4;
        for peer in links.linked_peers() {
            if members.contains(&peer.to_string()) || blocked.contains(&peer) {
                continue;
            }
            if self
                .announced
                .get(&peer)
                .is_some_and(|t| now.duration_since(*t) < every)
            {
                continue;
            }
            self.announced.insert(peer, now);
            let _ = self
                .swim
                .announce(self.mono_ms(), MemberId::placeholder(peer.to_string()));
        }
        self.announced.retain(|p, _| links.linked(p));
        if self.table.connected_active() > 0 {
            self.peers.mark_met_member();
        }
        self.dials.retain(|p, _| members.contains(&p.to_string()));
        self.close_surplus(links, &want, active.len());
        self.flush(links, blocked);
        self.check_clock(log);
    }

    /// Past `max_peers` members, closes the connections we dialed to members
    /// that are not targets once SWIM is done with them (idle three probe
    /// periods, no session or answer running).
    fn close_surplus(&mut self, links: &mut impl Links, targets: &[MemberId], active: usize) {
        if active <= self.max_peers {
            return;
        }
        let idle_ms = (self.swim.config().probe_period * 3).as_millis() as u64;
        let now = Instant::now();
        let peers: Vec<(PeerId, String)> = links.linked_peers().into_iter().map(|p| (p, p.to_string())).collect();
        let candidates: Vec<Link> = peers
            .iter()
            .map(|(p, name)| Link {
                peer: name,
                dialed_by_us: !self.inbound.contains(p),
                idle_ms: self
                    .contact
                    .get(p)
                    .map_or(u64::MAX, |t| now.duration_since(*t).as_millis() as u64),
                busy: self.peers.busy(*p),
            })
            .collect();
        for name in surplus_connections(targets, active, self.max_peers, &candidates, idle_ms) {
            if let Some((peer, _)) = peers.iter().find(|(_, n)| n == name) {
                tracing::debug!(%peer, "closing a connection past max_peers");
                links.drop_link(*peer);
            }
        }
    }

    /// DESIGN §2 with CockroachDB's rule: a node whose clock is ahead of
    /// most live members by more than `max_clock_skew` would stamp versions
    /// that win conflicts they should lose, so it takes no local writes
    /// until its clock is back. Peers past the bound are logged.
    fn check_clock(&mut self, log: &mut ConnectionLog) {
        let max = self.engine.config().max_clock_skew_ms;
        for peer in self.table.active() {
            if let Some(s) = self.table.offset(&peer)
                && s.offset_ms.unsigned_abs() > max
                && log.allow(&format!("skew {peer}"))
            {
                tracing::warn!(
                    %peer,
                    offset_ms = s.offset_ms,
                    rtt_ms = s.rtt_ms,
                    max_clock_skew_ms = max,
                    "a member's clock differs from ours by more than max_clock_skew"
                );
            }
        }
        let ahead = self.table.clock_ahead(max);
        if ahead != self.clock_fenced {
            self.clock_fenced = ahead;
            if ahead {
                let reason = format!(
                    "this node's clock is ahead of most members by more than max_clock_skew ({max} ms); fix its time (NTP)"
                );
                tracing::error!("{reason}: refusing local writes until it is back");
                self.engine.set_write_fence(Some(reason));
            } else {
                tracing::warn!("clock back within max_clock_skew of the members: taking writes again");
                self.engine.set_write_fence(None);
            }
        }
    }

    /// A membership packet from `peer`: checked, given to SWIM, and answered
    /// with the times for a clock-offset sample.
    pub fn on_packet(
        &mut self,
        links: &mut impl Links,
        blocked: &Blocked,
        log: &mut ConnectionLog,
        peer: PeerId,
        request: ClusterPacket,
    ) -> Result<MemberAck, PacketRefusal> {
        let received_ms = wall_ms();
        if blocked.contains(&peer) {
            return Err(PacketRefusal::Drop);
        }
        if request.cluster != self.cluster {
            let why = format!(
                "membership packet for cluster {:?}, we are {:?}",
                request.cluster, self.cluster
            );
            log.wrong_cluster(peer, &why);
            return Err(PacketRefusal::Penalize(why));
        }
        let request = request.packet;
        let seen = match inspect(&request.payload, &peer, received_ms.saturating_add(FUTURE_BUMP_MS)) {
            Ok(seen) => seen,
            // A clock a day off is a fault to fix, not an attack.
            Err(why) if why.contains("start time in the future") => {
                if log.allow(&format!("future {peer}")) {
                    tracing::warn!(%peer, "{why}; its packets are dropped (check its clock and ours)");
                }
                return Err(PacketRefusal::Drop);
            }
            Err(why) => return Err(PacketRefusal::Penalize(why)),
        };
        if seen.leaves {
            tracing::info!(%peer, "member leaves the cluster");
            self.table.mark_left(&peer.to_string(), true);
        }
        self.peers.touch_member(peer);
        self.contact.insert(peer, Instant::now());
        if let Err(e) = self.swim.handle_packet(self.mono_ms(), &request.payload) {
            tracing::debug!(%peer, error = %e, "membership packet not taken");
        }
        let ack = MemberAck {
            asked_ms: request.sent_ms,
            received_ms,
            answered_ms: wall_ms(),
        };
        self.flush(links, blocked);
        Ok(ack)
    }

    /// The answer to one of our packets: a clock-offset sample.
    pub fn on_ack(&mut self, peer: PeerId, ack: MemberAck) {
        if let Some(s) = Sample::of(ack.asked_ms, ack.received_ms, ack.answered_ms, wall_ms()) {
            self.table.record_offset(&peer.to_string(), s);
        }
        self.peers.touch_member(peer);
    }

    /// Leaves the cluster (SIGTERM): a few members hear it from us.
    pub fn leave(&mut self, links: &mut impl Links, blocked: &Blocked) {
        if let Err(e) = self.swim.leave(self.mono_ms()) {
            tracing::debug!(error = %e, "leave");
        }
        self.flush(links, blocked);
    }

    pub fn connected(&mut self, peer: PeerId, they_dialed: bool) {
        if they_dialed {
            self.inbound.insert(peer);
        }
    }

    pub fn disconnected(&mut self, peer: PeerId) {
        self.inbound.remove(&peer);
        self.contact.remove(&peer);
    }

    /// A peer unblocked: a member SWIM declared down meanwhile is reached
    /// now rather than at the next announce to down members.
    pub fn unblocked(&mut self, links: &mut impl Links, blocked: &Blocked, peer: PeerId) {
        let key = peer.to_string();
        if let Some(m) = self.swim.members().into_iter().find(|m| m.id.peer == key) {
            self.dials.remove(&peer);
            self.dial(links, blocked, peer, &m.id);
        }
    }
}
