//! Cluster membership (DESIGN §5.6): SWIM failure detection and
//! dissemination by `foca`, kept sans-IO like the rest of this crate. The
//! node passes in the wall clock, the packets it receives and the peers it
//! reaches; it takes out packets to send and membership changes, and calls
//! `tick` when `next_deadline` comes. Nothing here reads a clock or a socket,
//! so the simulator drives the very same code.
//!
//! A member is `{peer id, advertised addresses, region, bump}`: foca's
//! identity, whose address is the peer id. `bump` grows on every start (the
//! start time) and on every renewal, so a node that restarts, or that the
//! cluster declared down, takes over its old entry at once (foca's
//! `renew` / `win_addr_conflict`).

use foca::{Config, Foca, Notification, PostcardCodec, Runtime, Timer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

pub use foca::State as MemberState;

/// Longest peer id, region and address, and most addresses per member.
pub const MAX_PEER_ID: usize = 128;
pub const MAX_REGION: usize = 64;
pub const MAX_ADDR: usize = 256;
pub const MAX_ADDRS: usize = 16;
/// Largest membership packet (foca's own limit; the frame adds a little).
pub const MAX_PACKET: usize = 16 * 1024;

/// A member's identity as SWIM knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawMemberId")]
pub struct MemberId {
    /// The libp2p peer id (base58).
    pub peer: String,
    /// Multiaddrs other nodes dial.
    pub addrs: Vec<String>,
    pub region: String,
    /// Grows with every start and renewal: the newest identity of a peer wins.
    pub bump: u64,
}

/// What arrives on the wire, checked before it becomes a `MemberId`.
#[derive(Deserialize)]
struct RawMemberId {
    peer: String,
    addrs: Vec<String>,
    region: String,
    bump: u64,
}

impl TryFrom<RawMemberId> for MemberId {
    type Error = String;

    fn try_from(r: RawMemberId) -> Result<Self, String> {
        if r.peer.is_empty() || r.peer.len() > MAX_PEER_ID || !r.peer.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err("bad member peer id".into());
        }
        if r.region.len() > MAX_REGION {
            return Err("member region too long".into());
        }
        if r.addrs.len() > MAX_ADDRS || r.addrs.iter().any(|a| a.len() > MAX_ADDR) {
            return Err("too many or too long member addresses".into());
        }
        Ok(MemberId {
            peer: r.peer,
            addrs: r.addrs,
            region: r.region,
            bump: r.bump,
        })
    }
}

impl foca::Identity for MemberId {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(MemberId {
            bump: self.bump.checked_add(1)?,
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.peer.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

impl MemberId {
    /// A stand-in for a peer we know only by its id (a bootstrap address):
    /// enough to announce ourselves to it, since foca accepts an announce
    /// addressed to any identity with its peer id.
    pub fn placeholder(peer: impl Into<String>) -> Self {
        MemberId {
            peer: peer.into(),
            addrs: Vec::new(),
            region: String::new(),
            bump: 0,
        }
    }
}

/// SWIM timings, all derived from one probe period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipConfig {
    /// How often a random member is probed.
    pub probe_period: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
        }
    }
}

impl MembershipConfig {
    /// foca's LAN settings (memberlist's) scaled to `probe_period`, for a
    /// cluster of about `size` members.
    fn foca(&self, size: usize) -> Config {
        let size = NonZeroU32::new(size.clamp(1, u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        let mut c = Config::new_lan(size);
        let scale = self.probe_period.as_secs_f64() / c.probe_period.as_secs_f64();
        let scaled = |d: Duration| d.mul_f64(scale);
        c.probe_rtt = scaled(c.probe_rtt);
        c.suspect_to_down_after = scaled(c.suspect_to_down_after);
        c.probe_period = self.probe_period;
        for p in [
            &mut c.periodic_announce,
            &mut c.periodic_announce_to_down_members,
            &mut c.periodic_gossip,
        ]
        .into_iter()
        .flatten()
        {
            p.frequency = scaled(p.frequency);
        }
        // Down members are remembered for a day: a peer id seen down stays
        // known, so the purge watermarks still count it (§6).
        c.remove_down_after = Some(Duration::from_secs(86_400));
        c.max_packet_size = NonZeroUsize::new(MAX_PACKET).unwrap_or(NonZeroUsize::MIN);
        c
    }

    /// How long SWIM takes, at most in the usual case, to declare a killed
    /// member down everywhere in a cluster of `size`: the expected wait
    /// until some member probes it (e/(e-1) periods), the indirect probes,
    /// the suspicion timeout, and the spread of the verdict by gossip.
    pub fn failure_detection_bound(&self, size: usize) -> Duration {
        let c = self.foca(size);
        let e = std::f64::consts::E;
        let first_probe = self.probe_period.mul_f64(e / (e - 1.0));
        let spread = c
            .periodic_gossip
            .map(|g| g.frequency.mul_f64(((size.max(2)) as f64).log2().ceil()))
            .unwrap_or(self.probe_period);
        first_probe + self.probe_period + c.suspect_to_down_after + spread
    }
}

/// The members to keep connections to: all of them up to `max`; past
/// that, one of every region first, then the rest, in an order that is
/// random-looking but fixed for a given pair of peers (so not every node
/// picks the same ones, and a node keeps its picks).
pub fn connection_targets(me: &str, active: &[MemberId], max: usize) -> Vec<MemberId> {
    if active.len() <= max {
        return active.to_vec();
    }
    use sha2::{Digest, Sha256};
    let rank = |m: &MemberId| -> [u8; 32] { Sha256::new().chain_update(me).chain_update(&m.peer).finalize().into() };
    let mut order: Vec<&MemberId> = active.iter().collect();
    order.sort_by_key(|m| rank(m));
    let mut out: Vec<MemberId> = Vec::with_capacity(max);
    let mut regions = std::collections::BTreeSet::new();
    for m in &order {
        if out.len() < max && regions.insert(m.region.clone()) {
            out.push((*m).clone());
        }
    }
    for m in order {
        if out.len() >= max {
            break;
        }
        if !out.iter().any(|o| o.peer == m.peer) {
            out.push(m.clone());
        }
    }
    out
}

/// A connection as `surplus_connections` weighs it.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    pub peer: &'a str,
    /// Only we dialed it (the other side did not ask for it).
    pub dialed_by_us: bool,
    /// Since the last membership packet or session over it.
    pub idle_ms: u64,
    /// A session or an answer is running over it.
    pub busy: bool,
}

/// The connections to close so that a node keeps about `max` members
/// connected when there are more: ones we dialed to members that are not
/// targets (SWIM's probes reach any member), idle for `idle_ms`, with
/// nothing running. A connection the other side dialed is theirs to keep:
/// closing it would have them dial again.
pub fn surplus_connections<'a>(
    targets: &[MemberId],
    active: usize,
    max: usize,
    links: &[Link<'a>],
    idle_ms: u64,
) -> Vec<&'a str> {
    if active <= max {
        return Vec::new();
    }
    links
        .iter()
        .filter(|l| l.dialed_by_us && !l.busy && l.idle_ms >= idle_ms && !targets.iter().any(|t| t.peer == l.peer))
        .map(|l| l.peer)
        .collect()
}

/// A membership change, for the node to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    Up(MemberId),
    Down(MemberId),
    /// A newer identity of the same peer (restart, new addresses).
    Renamed {
        old: MemberId,
        new: MemberId,
    },
    /// We were declared down and rejoined under a renewed identity.
    Rejoined(MemberId),
}

/// A member as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: MemberId,
    pub state: MemberState,
    pub incarnation: u16,
}

/// What foca asked for during one call, collected for the node.
#[derive(Default)]
struct Collect {
    now_ms: u64,
    sends: Vec<(MemberId, Vec<u8>)>,
    timers: Vec<(u64, Timer<MemberId>)>,
    events: Vec<MemberEvent>,
}

impl Runtime<MemberId> for Collect {
    fn notify(&mut self, n: Notification<'_, MemberId>) {
        match n {
            Notification::MemberUp(m) => self.events.push(MemberEvent::Up(m.clone())),
            Notification::MemberDown(m) => self.events.push(MemberEvent::Down(m.clone())),
            Notification::Rename(a, b) => self.events.push(MemberEvent::Renamed {
                old: a.clone(),
                new: b.clone(),
            }),
            Notification::Rejoin(m) => self.events.push(MemberEvent::Rejoined(m.clone())),
            _ => {}
        }
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<MemberId>, after: Duration) {
        let at = self.now_ms.saturating_add(after.as_millis() as u64);
        self.timers.push((at, event));
    }
}

/// Errors of the membership layer (a bad packet never panics).
#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

/// One node's membership: foca plus its pending timers.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, ChaCha8Rng, foca::NoCustomBroadcast>,
    config: MembershipConfig,
    /// Timers by deadline (ms), in arming order within one deadline.
    timers: BTreeMap<(u64, u64), Timer<MemberId>>,
    timer_seq: u64,
    sized_for: usize,
    out: Vec<(MemberId, Vec<u8>)>,
    events: Vec<MemberEvent>,
}

impl Membership {
    /// `seed` makes the random choices (probe order, gossip targets)
    /// reproducible in the simulator; a node passes fresh entropy.
    pub fn new(me: MemberId, config: MembershipConfig, seed: u64) -> Self {
        let foca = Foca::new(me, config.foca(1), ChaCha8Rng::seed_from_u64(seed), PostcardCodec);
        Self {
            foca,
            config,
            timers: BTreeMap::new(),
            timer_seq: 0,
            sized_for: 1,
            out: Vec::new(),
            events: Vec::new(),
        }
    }

    pub fn me(&self) -> &MemberId {
        self.foca.identity()
    }

    fn run(
        &mut self,
        now_ms: u64,
        f: impl FnOnce(
            &mut Foca<MemberId, PostcardCodec, ChaCha8Rng, foca::NoCustomBroadcast>,
            &mut Collect,
        ) -> Result<(), foca::Error>,
    ) -> Result<(), MembershipError> {
        let mut rt = Collect {
            now_ms,
            ..Default::default()
        };
        let r = f(&mut self.foca, &mut rt);
        for (at, t) in rt.timers {
            self.timer_seq += 1;
            self.timers.insert((at, self.timer_seq), t);
        }
        self.out.extend(rt.sends);
        self.events.extend(rt.events);
        self.resize();
        r.map_err(|e| MembershipError(e.to_string()))
    }

    /// Timeouts and fan-outs follow the cluster's size (as memberlist does).
    fn resize(&mut self) {
        let n = self.foca.num_members() + 1;
        if n != self.sized_for && (n >= self.sized_for * 2 || n * 2 <= self.sized_for || n.abs_diff(self.sized_for) > 2)
        {
            self.sized_for = n;
            let _ = self.foca.set_config(self.config.foca(n));
        }
    }

    /// Asks `peer` (known by id only, or fully) to let us in.
    pub fn announce(&mut self, now_ms: u64, to: MemberId) -> Result<(), MembershipError> {
        self.run(now_ms, |f, rt| f.announce(to, rt))
    }

    /// A packet from the network.
    pub fn handle_packet(&mut self, now_ms: u64, data: &[u8]) -> Result<(), MembershipError> {
        if data.len() > MAX_PACKET {
            return Err(MembershipError(format!("packet of {} bytes", data.len())));
        }
        self.run(now_ms, |f, rt| f.handle_data(data, rt))
    }

    /// Runs every timer due at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let timer = entry.remove();
            if let Err(e) = self.run(now_ms, |f, rt| f.handle_timer(timer, rt)) {
                // A timer for a member that is gone: nothing to do.
                let _ = e;
            }
        }
    }

    /// When `tick` should run next.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.keys().next().map(|k| k.0)
    }

    /// Leaves the cluster (declares ourselves down to a few members).
    pub fn leave(&mut self, now_ms: u64) -> Result<(), MembershipError> {
        self.run(now_ms, |f, rt| f.leave_cluster(rt))
    }

    /// Packets to send.
    pub fn take_outgoing(&mut self) -> Vec<(MemberId, Vec<u8>)> {
        std::mem::take(&mut self.out)
    }

    /// Membership changes since the last call.
    pub fn take_events(&mut self) -> Vec<MemberEvent> {
        std::mem::take(&mut self.events)
    }

    /// Every member known, down ones included (not ourselves).
    pub fn members(&self) -> Vec<MemberView> {
        self.foca
            .iter_membership_state()
            .map(|m| MemberView {
                id: m.id().clone(),
                state: m.state(),
                incarnation: m.incarnation(),
            })
            .collect()
    }

    /// Members alive or suspect.
    pub fn active(&self) -> impl Iterator<Item = &MemberId> {
        self.foca.iter_members().map(|m| m.id())
    }

    pub fn config(&self) -> MembershipConfig {
        self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MemberId {
        MemberId {
            peer: format!("peer{n}"),
            addrs: vec![format!("/ip4/10.0.0.{n}/tcp/7070")],
            region: "r".into(),
            bump: 1,
        }
    }

    /// Delivers every packet at once until nothing moves; `down` drops all
    /// traffic to and from those peers.
    fn settle(nodes: &mut [Membership], now: &mut u64, until: u64, down: &[String]) {
        while *now < until {
            for _ in 0..8 {
                let mut moved = false;
                let mut packets = Vec::new();
                for n in nodes.iter_mut() {
                    let from = n.me().peer.clone();
                    for (to, p) in n.take_outgoing() {
                        packets.push((from.clone(), to, p));
                    }
                }
                for (from, to, p) in packets {
                    if down.contains(&to.peer) || down.contains(&from) {
                        continue;
                    }
                    if let Some(n) = nodes.iter_mut().find(|n| n.me().peer == to.peer) {
                        let _ = n.handle_packet(*now, &p);
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
            *now += 10;
            for n in nodes.iter_mut() {
                n.tick(*now);
            }
        }
    }

    #[test]
    fn members_learn_each_other_through_one_seed_and_detect_a_failure() {
        let cfg = MembershipConfig {
            probe_period: Duration::from_millis(200),
        };
        let mut nodes: Vec<Membership> = (1..=5).map(|i| Membership::new(id(i), cfg, i as u64)).collect();
        let mut now = 0;
        for n in nodes.iter_mut().skip(1) {
            n.announce(now, MemberId::placeholder("peer1")).unwrap();
        }
        settle(&mut nodes, &mut now, 3_000, &[]);
        for n in &nodes {
            assert_eq!(n.active().count(), 4, "{} knows {:?}", n.me().peer, n.members());
        }
        let bound = cfg.failure_detection_bound(5).as_millis() as u64;
        let start = now;
        settle(&mut nodes, &mut now, start + bound, &["peer3".to_string()]);
        for n in nodes.iter().filter(|n| n.me().peer != "peer3") {
            let m = n.members().into_iter().find(|m| m.id.peer == "peer3").unwrap();
            assert_eq!(m.state, MemberState::Down, "{} within {bound} ms", n.me().peer);
        }
    }

    #[test]
    fn connection_targets_cover_every_region_within_the_cap() {
        let members: Vec<MemberId> = (0..40)
            .map(|i| MemberId {
                region: if i == 39 { "far".into() } else { "near".into() },
                ..id(i)
            })
            .collect();
        let t = connection_targets("me", &members, 8);
        assert_eq!(t.len(), 8);
        assert!(t.iter().any(|m| m.region == "far"));
        assert_eq!(t, connection_targets("me", &members, 8), "stable picks");
        assert_eq!(connection_targets("me", &members[..5], 8).len(), 5);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let mut m = Membership::new(id(1), MembershipConfig::default(), 1);
            let _ = m.handle_packet(0, &bytes);
            m.tick(60_000);
            for v in m.members() {
                proptest::prop_assert!(v.id.addrs.len() <= MAX_ADDRS && v.id.region.len() <= MAX_REGION);
            }
        }

        #[test]
        fn packets_with_a_valid_header_and_garbage_after_never_panic(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let mut bytes = postcard::to_stdvec(&foca::Header {
                src: id(2),
                src_incarnation: 0,
                dst: id(1),
                message: foca::Message::<MemberId>::Gossip,
            })
            .unwrap();
            bytes.extend(tail);
            let mut m = Membership::new(id(1), MembershipConfig::default(), 1);
            let _ = m.handle_packet(0, &bytes);
            m.tick(60_000);
        }
    }

    #[test]
    fn only_idle_links_we_dialed_to_non_targets_are_surplus() {
        let members: Vec<MemberId> = (0..6).map(id).collect();
        let targets = connection_targets("me", &members, 2);
        let other: Vec<String> = members
            .iter()
            .filter(|m| !targets.contains(m))
            .map(|m| m.peer.clone())
            .collect();
        let link = |peer, dialed_by_us, idle_ms, busy| Link {
            peer,
            dialed_by_us,
            idle_ms,
            busy,
        };
        let links = [
            link(other[0].as_str(), true, 5_000, false),
            link(other[1].as_str(), false, 5_000, false),
            link(other[2].as_str(), true, 10, false),
            link(other[3].as_str(), true, 5_000, true),
            link(targets[0].peer.as_str(), true, 5_000, false),
        ];
        assert_eq!(
            surplus_connections(&targets, 6, 2, &links, 1_000),
            vec![other[0].as_str()]
        );
        assert!(
            surplus_connections(&targets, 2, 2, &links, 1_000).is_empty(),
            "within max: keep all"
        );
    }

    #[test]
    fn bad_identities_are_refused_at_decode() {
        let mut m = Membership::new(id(1), MembershipConfig::default(), 1);
        // A header whose source has an oversized region.
        let evil = MemberId {
            region: "x".repeat(MAX_REGION + 1),
            ..id(2)
        };
        let bytes = postcard::to_stdvec(&foca::Header {
            src: evil,
            src_incarnation: 0,
            dst: id(1),
            message: foca::Message::<MemberId>::Announce,
        })
        .unwrap();
        assert!(m.handle_packet(0, &bytes).is_err());
        assert!(m.handle_packet(0, &[0xff; 40]).is_err());
        assert!(m.handle_packet(0, &vec![0; MAX_PACKET + 1]).is_err());
        assert!(m.members().is_empty());
    }
}
