//! The membership driver (DESIGN §5.6), the I/O side of the core's SWIM:
//!
//! - each packet is checked before the core sees it (right cluster; its
//!   SWIM sender is the authenticated peer; no start time from the future;
//!   a goodbye marks its sender left);
//! - every member is dialed, up to `max_peers` (every region covered),
//!   redialed with backoff; idle surplus connections we dialed are closed;
//! - members whose clocks differ from ours past `max_clock_skew` are
//!   logged (the write fence itself is the core's);
//! - the table `/v1/members` shows is refreshed from the core.
//!
//! It reaches the network only through `Links`, which the swarm implements.

use libp2p::{Multiaddr, PeerId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncnode_protocol::membership::{Link, MemberId, connection_targets, surplus_connections};
use syncnode_protocol::wire::MemberPacket;

use super::connections::ConnectionLog;
use super::membership::{ClusterPacket, MemberTable, inspect};
use super::peers::Peers;

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
    pub fn contains(&self, peer: &PeerId) -> bool {
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
/// How long after an unblock the peer is dialed.
pub(super) const UNBLOCK_DIAL_AFTER: Duration = Duration::from_millis(300);
/// Start times this far past our clock are refused (a day of clock error).
const FUTURE_BUMP_MS: u64 = 86_400_000;

/// Milliseconds on the wall clock (clock offsets; may jump).
pub(super) fn wall_ms() -> u64 {
    crate::engine::item::now_ms().max(0) as u64
}

pub(super) struct Swim {
    table: Arc<MemberTable>,
    peers: Arc<Peers>,
    cluster: String,
    dials: HashMap<PeerId, MemberDial>,
    /// Peers with a connection they dialed (theirs to keep).
    inbound: HashSet<PeerId>,
    /// Last membership packet to or from each peer.
    contact: HashMap<PeerId, Instant>,
    /// Peers unblocked here, dialed shortly after (see `unblocked`).
    unblocked: HashMap<PeerId, Instant>,
    max_peers: usize,
    probe_period: Duration,
    max_clock_skew_ms: u64,
}

impl Swim {
    pub fn new(
        table: Arc<MemberTable>,
        peers: Arc<Peers>,
        cluster: String,
        max_peers: usize,
        probe_period: Duration,
        max_clock_skew_ms: u64,
    ) -> Self {
        Self {
            table,
            peers,
            cluster,
            dials: HashMap::new(),
            inbound: HashSet::new(),
            contact: HashMap::new(),
            unblocked: HashMap::new(),
            max_peers: max_peers.max(1),
            probe_period,
            max_clock_skew_ms,
        }
    }

    /// Whether the core knows no live member (a seed without a peer id is
    /// then still worth dialing).
    pub fn alone(&self) -> bool {
        self.peers.active_members().is_empty()
    }

    /// Sends a packet the core asked to send.
    pub fn send(&mut self, links: &mut impl Links, blocked: &Blocked, peer: PeerId, addrs: &[String], p: MemberPacket) {
        if blocked.contains(&peer) {
            return;
        }
        self.contact.insert(peer, Instant::now());
        links.send_packet(peer, addrs, p);
    }

    /// Shows the core's view in the members table.
    pub fn refresh(&self, links: &impl Links) {
        let (views, offsets) = self.peers.membership();
        let views = views
            .into_iter()
            .filter(|v| v.id.peer.parse().is_ok_and(|p| !self.peers.is_forgotten(p)))
            .collect();
        self.table
            .refresh(views, offsets, |p| p.parse().is_ok_and(|p: PeerId| links.linked(&p)));
    }

    /// Dials a member at its advertised addresses (DNS names resolve anew).
    pub fn dial(&mut self, links: &mut impl Links, blocked: &Blocked, peer: PeerId, addrs: &[String]) {
        if peer == links.local_peer() || blocked.contains(&peer) || links.linked(&peer) {
            return;
        }
        let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if !addrs.is_empty() {
            links.dial_peer(peer, addrs);
        }
    }

    /// Keeps connections to the members (up to `max_peers`, every region
    /// covered), closes surplus ones, and warns about skewed clocks.
    pub fn maintain(&mut self, links: &mut impl Links, blocked: &Blocked, log: &mut ConnectionLog) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .unblocked
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            self.unblocked.remove(&peer);
            let (views, _) = self.peers.membership();
            if let Some(m) = views.into_iter().find(|m| m.id.peer == peer.to_string()) {
                self.dials.remove(&peer);
                self.dial(links, blocked, peer, &m.id.addrs);
            }
        }
        let active = self.peers.active_members();
        let me = links.local_peer().to_string();
        let mut want = connection_targets(&me, &active, self.max_peers);
        // The relay tree's edges carry CDC: they are kept whatever max_peers says.
        for hop in self.peers.core(|r, _| r.relay_neighbours()) {
            if !want.iter().any(|m| m.peer == hop)
                && let Some(m) = active.iter().find(|m| m.peer == hop)
            {
                want.push(m.clone());
            }
        }
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
            self.dial(links, blocked, peer, &m.addrs);
        }
        let members: HashSet<String> = active.iter().map(|m| m.peer.clone()).collect();
        self.dials.retain(|p, _| members.contains(&p.to_string()));
        self.close_surplus(links, &want, active.len());
        self.refresh(links);
        self.warn_skew(log);
    }

    /// Past `max_peers` members, closes the connections we dialed to members
    /// that are not targets once SWIM is done with them (idle three probe
    /// periods, no session or answer running).
    fn close_surplus(&mut self, links: &mut impl Links, targets: &[MemberId], active: usize) {
        if active <= self.max_peers {
            return;
        }
        let idle_ms = (self.probe_period * 3).as_millis() as u64;
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

    /// Members whose clocks differ from ours by more than max_clock_skew
    /// are named in the log (rate-limited).
    fn warn_skew(&self, log: &mut ConnectionLog) {
        let max = self.max_clock_skew_ms;
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
    }

    /// Checks a membership packet from `peer` before the core sees it.
    pub fn check_packet(
        &mut self,
        blocked: &Blocked,
        log: &mut ConnectionLog,
        peer: PeerId,
        request: ClusterPacket,
    ) -> Result<MemberPacket, PacketRefusal> {
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
        let packet = request.packet;
        let seen = match inspect(&packet.payload, &peer, wall_ms().saturating_add(FUTURE_BUMP_MS)) {
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
        } else {
            self.table.mark_left(&peer.to_string(), false);
        }
        self.contact.insert(peer, Instant::now());
        Ok(packet)
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
    /// soon rather than at the next announce to down members. Not at once:
    /// the far side of a drill is often unblocked a moment later, and a dial
    /// it refuses reads like a wrong pre-shared key.
    pub fn unblocked(&mut self, peer: PeerId) {
        self.unblocked.insert(peer, Instant::now() + UNBLOCK_DIAL_AFTER);
    }
}
