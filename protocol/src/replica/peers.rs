//! What a node knows about its peers (DESIGN §5.2, §6): the roots they
//! announce (a session starts when a root differed twice in a row), how far
//! behind they are, the sessions running with them, their request and
//! gossip budgets and penalty scores, and — through `Watermarks` — the
//! members' purge watermarks and the must-resync rule.
//!
//! Every decision takes the time as an argument, so the node (wall and
//! monotonic clocks) and the simulator (virtual, skewed clocks) run the
//! same rules. Peers are named by their id's text and kept in ordered maps,
//! so nothing here depends on hash order.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::watermarks::{Member, MembersFile, Watermarks};
use crate::session::Progress;
use crate::wire::RootsAnnouncement;

/// The two clocks a decision may need: monotonic (rates, bans, lag, SWIM
/// timers) and wall (watermarks and last-seen times, which are persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// Requests of one peer answered at once.
pub const MAX_ANSWERING_PER_PEER: u32 = 8;
/// How long a peer just connected is not synced with while identify has not
/// said which wire versions it speaks (a session started before would walk
/// the trees where it could have been rateless).
pub const IDENTIFY_GRACE_MS: u64 = 2_000;

/// Per-peer limits and penalties.
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// Sync requests a peer may send per second (sustained; the burst is 4×).
    pub requests_per_sec: f64,
    /// Gossip messages accepted per second from one forwarder (burst 4×).
    pub gossip_per_sec: f64,
    /// Invalid messages after which a peer is banned.
    pub ban_after: u32,
    pub ban_for_ms: u64,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            requests_per_sec: 200.0,
            gossip_per_sec: 5_000.0,
            ban_after: 10,
            ban_for_ms: 300_000,
        }
    }
}

/// A token bucket on the monotonic clock.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn take(&mut self, rate: f64, now_ms: u64) -> bool {
        let burst = rate * 4.0;
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at_ms = self.at_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why an inbound sync request is refused (sent as its text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Answering too many requests (of this peer, or of all): ask again later.
    Busy,
    /// Past the peer's request budget.
    RateLimited,
    /// The peer was away past ledger_retention: nothing is taken from it.
    MustResync,
    /// We have not learned the purge ledger yet, so we take no pushes.
    LedgerNotLearned,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::RateLimited => "rate limited",
            Refusal::MustResync => "resync required: away past ledger_retention; run `syncnode resync` on it",
            Refusal::LedgerNotLearned => "busy: purge ledger not learned yet",
        }
    }

    /// Whether a refusal's text says to ask again later.
    pub fn is_retryable(reason: &str) -> bool {
        reason.starts_with("busy") || reason == "rate limited"
    }
}

#[derive(Debug, Clone, Default)]
struct PeerState {
    connected: bool,
    region: Option<String>,
    /// The wire version this peer and we have in common, once it said
    /// (identify); unknown is taken as ours.
    wire: Option<u8>,
    root: Option<RootsAnnouncement>,
    /// Announcements in a row whose root differed from ours.
    differed: u32,
    /// When its last roots arrived (mono ms).
    roots_at: u64,
    /// When this peer was last known to hold what we hold (mono ms).
    equal_since: Option<u64>,
    first_seen: u64,
    /// When the connection last came up or went down (mono ms).
    link_changed: u64,
    requests: Option<Bucket>,
    gossip: Option<Bucket>,
    penalty: u32,
    banned_until: Option<u64>,
    session: Option<SessionInfo>,
    sessions_done: u64,
    last_session: Option<SessionInfo>,
    /// A member back after more than `ledger_retention` (or forgotten): it
    /// may hold items whose deletes were purged and forgotten since; nothing
    /// is taken from it until it rejoins empty or holds exactly what we hold.
    must_resync: bool,
    /// Inbound requests of this peer being answered.
    answering: u32,
    /// Sessions in a row that found nothing to move (the difference was
    /// CDC in flight): the next one waits longer.
    quiet_sessions: u32,
    /// When the last session ended (mono ms).
    last_session_end: u64,
    /// Sync frames sent to and received from it (bytes, as encoded).
    bytes_sent: u64,
    bytes_received: u64,
}

/// A session with a peer, running or finished.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub id: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    #[serde(flatten)]
    pub progress: Progress,
    pub error: Option<String>,
    /// The watermark a successful end proves (see `session_started`).
    #[serde(skip)]
    pub proves: u64,
}

/// A peer as `/v1/peers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub peer_id: String,
    pub connected: bool,
    pub region: Option<String>,
    pub root: Option<String>,
    pub count: Option<u64>,
    pub in_sync: bool,
    pub lag_ms: u64,
    pub penalty: u32,
    pub banned: bool,
    pub sessions: u64,
    pub session: Option<SessionInfo>,
    pub last_session: Option<SessionInfo>,
    pub must_resync: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A region as this node sees it (`/v1/regions`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionView {
    pub region: String,
    /// Members SWIM holds alive in it (this node included in its own).
    pub members_alive: usize,
    /// Of those, the ones this node is connected to.
    pub connected: usize,
    /// Time since a peer of the region last held what we hold (its digest
    /// equalled ours); `None` before any peer there was known.
    pub lag_ms: Option<u64>,
    /// Sync bytes to and from its members (WAN bytes for another region).
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Counters of the replication layer (exported by `/metrics`).
#[derive(Debug, Default)]
pub struct ReplicationStats {
    pub sessions: AtomicU64,
    pub session_failures: AtomicU64,
    pub divergent_paths: AtomicU64,
    /// Sessions that found the difference from coded symbols (no tree walk).
    pub rateless_sessions: AtomicU64,
    pub coded_symbols: AtomicU64,
    pub items_pulled: AtomicU64,
    pub items_pushed: AtomicU64,
    pub cdc_published: AtomicU64,
    pub cdc_applied: AtomicU64,
    pub cdc_dropped: AtomicU64,
    pub cdc_fetched: AtomicU64,
    pub roots_received: AtomicU64,
    pub invalid_messages: AtomicU64,
    pub rate_limited: AtomicU64,
    pub bans: AtomicU64,
    pub tombstones_purged: AtomicU64,
}

impl ReplicationStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The peer table.
#[derive(Debug)]
pub struct PeerTable {
    limits: PeerLimits,
    peers: BTreeMap<String, PeerState>,
    marks: Watermarks,
    /// Set once this node has caught up with a member (a session finished,
    /// or roots equal): readiness waits for it.
    joined: bool,
    /// Whether any member was connected since the start.
    met_member: bool,
    /// A peer whose roots are older than this is not in sync, whatever
    /// they said (a link that went quiet).
    roots_stale_ms: u64,
    /// Sync bytes sent to and received from each region's peers, kept
    /// apart from the peers: a forgotten peer, or one that changed region,
    /// takes nothing back (these are counters).
    region_bytes: BTreeMap<String, (u64, u64)>,
    pub stats: Arc<ReplicationStats>,
}

impl PeerTable {
    pub fn new(
        limits: PeerLimits,
        file: MembersFile,
        now: Now,
        member_expiry_ms: u64,
        ledger_retention_ms: u64,
    ) -> Self {
        Self {
            limits,
            peers: BTreeMap::new(),
            marks: Watermarks::load(file, now.wall_ms, member_expiry_ms, ledger_retention_ms),
            joined: false,
            met_member: false,
            roots_stale_ms: 3_000,
            region_bytes: BTreeMap::new(),
            stats: Arc::default(),
        }
    }

    /// Roots come every `gossip_interval_ms`: three missed, a peer's last
    /// word no longer counts as in sync.
    pub fn set_gossip_interval(&mut self, gossip_interval_ms: u64) {
        self.roots_stale_ms = gossip_interval_ms.saturating_mul(3).max(1);
    }

    pub fn watermarks(&mut self) -> &mut Watermarks {
        &mut self.marks
    }

    fn with<R>(&mut self, peer: &str, now: Now, f: impl FnOnce(&mut PeerState) -> R) -> R {
        let st = self.peers.entry(peer.to_string()).or_insert_with(|| PeerState {
            first_seen: now.mono_ms,
            ..Default::default()
        });
        f(st)
    }

    /// A connection to `peer` came up (`on`) or went down.
    ///
    /// A member back after ledger_retention (our purge records of deletes
    /// it missed are gone) must resync — unless every other member went
    /// silent too: then it is us who were away, and all our members count
    /// as fresh again. A forgotten member follows the same rule from when
    /// it was last seen; back sooner, it heals through the purge ledger like
    /// any member and counts again.
    pub fn connected(&mut self, peer: &str, on: bool, now: Now) {
        let forgotten = on && self.marks.is_forgotten(peer);
        let mut expired = on && self.marks.expired(peer, now.wall_ms);
        if forgotten && !expired {
            tracing::warn!(%peer, "a forgotten member is back: the purge ledger keeps its stale copies out; it counts as a member again");
            self.marks.unforget(peer, now.wall_ms);
        }
        if expired && !self.must_resync(peer) && self.marks.isolated_from_all_but(peer, now.wall_ms) {
            tracing::warn!(
                "every member was silent past ledger_retention: this node was away; trusting its members again"
            );
            self.marks.touch_all(now.wall_ms);
            expired = false;
        }
        self.with(peer, now, |s| {
            s.connected = on;
            s.link_changed = now.mono_ms;
            if !on {
                // It may come back upgraded: identify says again.
                s.wire = None;
            }
            // Nothing of ours is in flight to a peer just (re)connected: its
            // first differing root is enough to start a session.
            s.differed = u32::from(on);
            s.quiet_sessions = 0;
            if expired && !s.must_resync {
                s.must_resync = true;
                tracing::error!(%peer, forgotten, "member away past ledger_retention is back: nothing is taken from it until it rejoins empty (`syncnode resync --from PEER` on it)");
            }
        });
    }

    /// How long the connection to `peer` has been up (`None`: it is not).
    pub fn connected_for(&self, peer: &str, now: Now) -> Option<u64> {
        let s = self.peers.get(peer).filter(|s| s.connected)?;
        Some(now.mono_ms.saturating_sub(s.link_changed))
    }

    pub fn is_connected(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|s| s.connected)
    }

    /// A SWIM member joined (see `Watermarks::add`).
    pub fn add_member(&mut self, peer: &str, addrs: &[String], now: Now) {
        self.marks.add(peer, addrs, now.wall_ms);
    }

    /// Forgets a member: it stops holding back purges at once; if it
    /// returns with data it must resync. Returns whether it was a member.
    pub fn forget(&mut self, peer: &str, now: Now) -> bool {
        let was = self.marks.forget(peer, now.wall_ms);
        // Gone from `/v1/peers` too, unless connected or flagged.
        if self.peers.get(peer).is_some_and(|s| !s.connected && !s.must_resync) {
            self.peers.remove(peer);
        }
        was
    }

    pub fn is_forgotten(&self, peer: &str) -> bool {
        self.marks.is_forgotten(peer)
    }

    pub fn joined(&self) -> bool {
        self.joined
    }

    /// Marks this node caught up (`by`: with whom, or why).
    pub fn mark_joined(&mut self, by: &str, how: &str) {
        if !self.joined {
            self.joined = true;
            tracing::info!(by, how, "caught up with the cluster: ready");
        }
    }

    pub fn mark_met_member(&mut self) {
        self.met_member = true;
    }

    pub fn met_member(&self) -> bool {
        self.met_member
    }

    pub fn ledger_learned(&self) -> bool {
        self.marks.ledger_learned()
    }

    pub fn set_ledger_learned(&mut self) {
        self.marks.set_ledger_learned();
    }

    pub fn next_bump(&mut self, wall_ms: u64) -> u64 {
        self.marks.next_bump(wall_ms)
    }

    /// Whether every connected peer announced an empty store (a new, empty
    /// cluster: there is nothing to catch up with).
    pub fn all_connected_empty(&self) -> bool {
        let mut any = false;
        for s in self.peers.values().filter(|s| s.connected) {
            any = true;
            if s.root.as_ref().is_none_or(|r| r.count > 0) {
                return false;
            }
        }
        any
    }

    /// Whether nothing may be taken from `peer` (DESIGN §6). Cleared once
    /// it announces an empty store or exactly ours.
    pub fn must_resync(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|s| s.must_resync)
    }

    pub fn set_region(&mut self, peer: &str, region: Option<String>, now: Now) {
        let before = self.with(peer, now, |s| {
            let before = (s.region.clone(), s.bytes_sent, s.bytes_received);
            s.region = region.clone();
            before
        });
        // The bytes exchanged before its region was known count for it.
        if let (None, sent, received, Some(r)) = (before.0, before.1, before.2, region) {
            let b = self.region_bytes.entry(r).or_default();
            b.0 += sent;
            b.1 += received;
        }
    }

    /// The newest wire version `peer` and we both speak.
    pub fn set_wire(&mut self, peer: &str, version: u8, now: Now) {
        self.with(peer, now, |s| s.wire = Some(version));
    }

    /// Whether a connected peer is known to speak exactly wire version `version`.
    pub fn any_connected_on(&self, version: u8) -> bool {
        self.peers.values().any(|s| s.connected && s.wire == Some(version))
    }

    /// Whether `peer` reads wire version `version` messages (unknown: yes;
    /// a request it cannot read fails like a lost one).
    pub fn speaks(&self, peer: &str, version: u8) -> bool {
        self.peers.get(peer).and_then(|s| s.wire).is_none_or(|w| w >= version)
    }

    /// Whether `peer` is known to read wire version `version` messages
    /// (identify said so since it connected).
    pub fn known_to_speak(&self, peer: &str, version: u8) -> bool {
        self.peers.get(peer).and_then(|s| s.wire).is_some_and(|w| w >= version)
    }

    /// Records a peer's roots announcement against our own root.
    pub fn on_roots(&mut self, peer: &str, theirs: RootsAnnouncement, mine: &RootsAnnouncement, now: Now) {
        ReplicationStats::add(&self.stats.roots_received, 1);
        let equal = theirs.root == mine.root && theirs.depth == mine.depth;
        let expired = self.marks.expired(peer, now.wall_ms);
        let mut resynced = false;
        let count = theirs.count;
        let their_hlc = theirs.hlc;
        self.with(peer, now, |s| {
            // Empty, or holding exactly what we hold (it bootstrapped from
            // us again): nothing stale can come from it any more.
            if s.must_resync && (theirs.count == 0 || equal) {
                s.must_resync = false;
                resynced = true;
            }
            s.root = Some(theirs);
            s.roots_at = now.mono_ms;
            if equal {
                s.differed = 0;
                s.equal_since = Some(now.mono_ms);
            } else {
                s.differed += 1;
            }
        });
        // A member that resynced, or one away past ledger_retention that
        // comes back empty: it starts over, seen now, nothing proven yet.
        if resynced || (expired && count == 0) {
            tracing::info!(%peer, "member resynced: it counts again");
            self.marks.restart(peer, now.wall_ms);
        }
        if !expired {
            self.touch_member(peer, now);
        }
        if equal && count > 0 && !self.must_resync(peer) {
            self.mark_joined(peer, "roots equal");
        }
        if equal && !self.must_resync(peer) {
            // Both hold the same set: everything either will write later is
            // stamped above both clocks, so all up to the lower one is shared.
            self.marks.prove(
                peer,
                their_hlc.min(mine.hlc).saturating_add(1),
                now.wall_ms,
                now.wall_ms,
            );
        }
    }

    /// Connected peers whose root differed twice in a row, with no session
    /// running, not banned and not flagged, whose wire version identify has
    /// told (or `IDENTIFY_GRACE_MS` after connecting without it). After sessions that moved
    /// nothing but recent writes — under a steady write load roots differ
    /// by the CDC in flight — the next waits `interval_ms` × 1, 3, 7, 15
    /// longer; a session that moves an older version, or a new
    /// connection, resets it.
    pub fn due_for_session(&self, now: Now, interval_ms: u64) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, s)| {
                // A version 1 peer gets no CDC from us: sessions are all it
                // has, so they never back off.
                let backoff = if s.wire == Some(1) { 0 } else { s.quiet_sessions.min(4) };
                let wait = interval_ms.saturating_mul((1u64 << backoff) - 1);
                s.connected
                    && s.differed >= 2
                    && (s.wire.is_some() || now.mono_ms >= s.link_changed.saturating_add(IDENTIFY_GRACE_MS))
                    && s.session.is_none()
                    && s.banned_until.is_none()
                    && !s.must_resync
                    && now.mono_ms >= s.last_session_end.saturating_add(wait)
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Connected members that may be synced with (not banned, not
    /// flagged, no session running).
    pub fn connected_members(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(p, s)| {
                s.connected
                    && s.session.is_none()
                    && s.banned_until.is_none()
                    && !s.must_resync
                    && self.marks.members().contains_key(*p)
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Deltas to or from `peer` were lost: the next session with it need
    /// not wait out a backoff.
    pub fn cdc_lost(&mut self, peer: &str) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.quiet_sessions = 0;
        }
    }

    /// Whether a session with any peer is running.
    pub fn any_session(&self) -> bool {
        self.peers.values().any(|s| s.session.is_some())
    }

    /// Records that `peer` holds everything we hold stamped below `watermark`.
    pub fn prove_member(&mut self, peer: &str, watermark: u64, now: Now) {
        self.marks.prove(peer, watermark, now.wall_ms, now.wall_ms);
    }

    /// A member was heard from (roots, or SWIM traffic). One flagged or
    /// silent past ledger_retention stays as it is.
    pub fn touch_member(&mut self, peer: &str, now: Now) {
        if self.must_resync(peer) || self.marks.expired(peer, now.wall_ms) {
            return;
        }
        self.marks.touch(peer, now.wall_ms);
    }

    pub fn purge_watermark(&self, now: Now) -> Option<super::watermarks::Proven> {
        self.marks.purge_watermark(now.wall_ms)
    }

    pub fn members(&self) -> BTreeMap<String, Member> {
        self.marks.members().clone()
    }

    /// Whether `peer`'s purge watermark was last proven longer than
    /// `max_age_ms` ago, counting from `since_ms` at the earliest (this
    /// node's start: one never proven is not stale at once).
    pub fn watermark_older_than(&self, peer: &str, max_age_ms: u64, since_ms: u64, now: Now) -> bool {
        let proven = self.marks.members().get(peer).map_or(0, |m| m.proven_at_ms);
        now.wall_ms.saturating_sub(proven.max(since_ms)) > max_age_ms
    }

    /// Takes a request token from `peer`'s budget.
    pub fn allow_request(&mut self, peer: &str, now: Now) -> bool {
        let rate = self.limits.requests_per_sec;
        self.take_token(peer, rate, now, |s| &mut s.requests)
    }

    /// Takes a gossip token from the budget of the connected peer that
    /// forwarded a message (authors can be made up; connections cannot).
    pub fn allow_gossip(&mut self, source: &str, now: Now) -> bool {
        let rate = self.limits.gossip_per_sec;
        self.take_token(source, rate, now, |s| &mut s.gossip)
    }

    fn take_token(
        &mut self,
        peer: &str,
        rate: f64,
        now: Now,
        bucket: impl FnOnce(&mut PeerState) -> &mut Option<Bucket>,
    ) -> bool {
        let ok = self.with(peer, now, |s| {
            bucket(s)
                .get_or_insert(Bucket {
                    tokens: rate * 4.0,
                    at_ms: now.mono_ms,
                })
                .take(rate, now.mono_ms)
        });
        if !ok {
            ReplicationStats::add(&self.stats.rate_limited, 1);
        }
        ok
    }

    /// The policy for an inbound sync request: `push` says whether it
    /// carries items. On `Ok` an answer slot is taken; release it with
    /// `end_answer`.
    pub fn admit_request(&mut self, peer: &str, push: bool, now: Now) -> Result<(), Refusal> {
        if push && self.must_resync(peer) {
            return Err(Refusal::MustResync);
        }
        if push && !self.ledger_learned() {
            // Until we know which versions purged deletes beat, we take
            // nothing pushed (our own session pulls).
            return Err(Refusal::LedgerNotLearned);
        }
        if !self.allow_request(peer, now) {
            return Err(Refusal::RateLimited);
        }
        if !self.begin_answer(peer, now) {
            return Err(Refusal::Busy);
        }
        Ok(())
    }

    /// Starts answering a request of `peer` unless it already has
    /// `MAX_ANSWERING_PER_PEER` answers in progress.
    pub fn begin_answer(&mut self, peer: &str, now: Now) -> bool {
        self.with(peer, now, |s| {
            if s.answering >= MAX_ANSWERING_PER_PEER {
                return false;
            }
            s.answering += 1;
            true
        })
    }

    pub fn end_answer(&mut self, peer: &str) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.answering = s.answering.saturating_sub(1);
        }
    }

    /// Whether a session with `peer`, or an answer to it, is running.
    pub fn busy(&self, peer: &str) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|s| s.session.is_some() || s.answering > 0)
    }

    /// Counts an invalid message against `peer`; returns true when the peer
    /// has now earned a ban.
    pub fn penalize(&mut self, peer: &str, why: &str, now: Now) -> bool {
        ReplicationStats::add(&self.stats.invalid_messages, 1);
        let (limit, ban_for) = (self.limits.ban_after, self.limits.ban_for_ms);
        let banned = self.with(peer, now, |s| {
            s.penalty += 1;
            if s.penalty >= limit && s.banned_until.is_none() {
                s.banned_until = Some(now.mono_ms + ban_for);
                true
            } else {
                false
            }
        });
        tracing::warn!(%peer, reason = why, banned, "invalid message from peer");
        if banned {
            ReplicationStats::add(&self.stats.bans, 1);
        }
        banned
    }

    pub fn banned(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|s| s.banned_until.is_some())
    }

    /// Peers whose ban has run out (their penalty is reset).
    pub fn expired_bans(&mut self, now: Now) -> Vec<String> {
        let mut out = Vec::new();
        for (peer, s) in self.peers.iter_mut() {
            if s.banned_until.is_some_and(|t| t <= now.mono_ms) {
                s.banned_until = None;
                s.penalty = 0;
                out.push(peer.clone());
            }
        }
        out
    }

    /// Marks the start of a session with `peer`; false if one is running.
    ///
    /// A session that ends well has sent the peer everything we held when
    /// it started (what the peer refused, it holds newer or has purged), so
    /// it proves the peer's watermark up to the lower of the two clocks then
    /// (`our_hlc` and the peer's last announced one), as equal roots do.
    /// Without it, nodes that purge a tombstone at different times would
    /// wait on each other's roots forever.
    pub fn session_started(&mut self, peer: &str, id: u64, now: Now, our_hlc: u64) -> bool {
        self.with(peer, now, |s| {
            if s.session.is_some() {
                return false;
            }
            let theirs = s.root.as_ref().map_or(0, |r| r.hlc);
            s.session = Some(SessionInfo {
                id,
                started_ms: now.wall_ms,
                finished_ms: None,
                progress: Progress::default(),
                error: None,
                proves: our_hlc.min(theirs).saturating_add(1),
            });
            true
        })
    }

    pub fn session_progress(&mut self, peer: &str, p: &Progress) {
        if let Some(info) = self.peers.get_mut(peer).and_then(|s| s.session.as_mut()) {
            info.progress = p.clone();
        }
    }

    /// A session with `peer` ended. `settled`: it moved nothing older than
    /// the CDC in flight (see `due_for_session`).
    pub fn session_finished(&mut self, peer: &str, result: Result<&Progress, String>, now: Now, settled: bool) {
        let ok = result.is_ok();
        let stats = &self.stats;
        ReplicationStats::add(&stats.sessions, 1);
        match result {
            Ok(p) => {
                ReplicationStats::add(&stats.items_pulled, p.pulled);
                ReplicationStats::add(&stats.items_pushed, p.pushed);
                ReplicationStats::add(&stats.divergent_paths, p.nodes_compared);
                ReplicationStats::add(&stats.rateless_sessions, u64::from(!p.walked));
                ReplicationStats::add(&stats.coded_symbols, p.symbols);
            }
            Err(_) => ReplicationStats::add(&stats.session_failures, 1),
        }
        let proves = self.with(peer, now, |s| {
            let mut info = s.session.take()?;
            info.finished_ms = Some(now.wall_ms);
            match result {
                Ok(p) => {
                    s.quiet_sessions = if settled { s.quiet_sessions.saturating_add(1) } else { 0 };
                    info.progress = p.clone()
                }
                Err(e) => info.error = Some(e),
            }
            s.last_session_end = now.mono_ms;
            s.sessions_done += 1;
            s.differed = 0;
            let proves = (info.proves, info.started_ms);
            s.last_session = Some(info);
            Some(proves)
        });
        if ok && !self.must_resync(peer) {
            self.mark_joined(peer, "session finished");
            if let Some((w, at)) = proves.filter(|(w, _)| *w > 1) {
                self.marks.prove(peer, w, at, now.wall_ms);
            }
        }
    }

    /// How far behind `peer` is, ms: 0 while its root equals ours, else the
    /// time since it last did (or since we first saw it).
    fn lag_of(&self, s: &PeerState, now_mono: u64) -> u64 {
        if self.in_sync(s, now_mono) {
            return 0;
        }
        now_mono.saturating_sub(s.equal_since.unwrap_or(s.first_seen))
    }

    /// In sync: connected, and its last root, recent, equalled ours. A
    /// peer gone or gone quiet is never in sync: nothing says what it
    /// holds now.
    fn in_sync(&self, s: &PeerState, now_mono: u64) -> bool {
        s.connected
            && s.differed == 0
            && s.equal_since.is_some()
            && now_mono.saturating_sub(s.roots_at) <= self.roots_stale_ms
    }

    /// Counts sync bytes sent to (`sent`) and received from `peer`.
    pub fn add_bytes(&mut self, peer: &str, sent: u64, received: u64, now: Now) {
        let region = self.with(peer, now, |s| {
            s.bytes_sent += sent;
            s.bytes_received += received;
            s.region.clone()
        });
        if let Some(r) = region {
            let b = self.region_bytes.entry(r).or_default();
            b.0 += sent;
            b.1 += received;
        }
    }

    /// Sync bytes sent to and received from `peer` so far.
    pub fn bytes(&self, peer: &str) -> (u64, u64) {
        self.peers
            .get(peer)
            .map_or((0, 0), |s| (s.bytes_sent, s.bytes_received))
    }

    /// Per region (by the region each peer announced): connected peers,
    /// the freshest lag among them, and bytes; members come from SWIM.
    pub fn regions(&self, now: Now) -> BTreeMap<String, RegionView> {
        let mut out: BTreeMap<String, RegionView> = BTreeMap::new();
        for s in self.peers.values() {
            let Some(region) = &s.region else { continue };
            let r = out.entry(region.clone()).or_insert_with(|| RegionView {
                region: region.clone(),
                ..Default::default()
            });
            if s.connected {
                r.connected += 1;
            }
            // Connected or not: a region cut off keeps a lag, and it grows.
            let lag = self.lag_of(s, now.mono_ms);
            r.lag_ms = Some(r.lag_ms.map_or(lag, |l| l.min(lag)));
        }
        for (region, (sent, received)) in &self.region_bytes {
            let r = out.entry(region.clone()).or_insert_with(|| RegionView {
                region: region.clone(),
                ..Default::default()
            });
            r.bytes_sent = *sent;
            r.bytes_received = *received;
        }
        out
    }

    /// Lag per connected peer.
    pub fn lags(&self, now: Now) -> BTreeMap<String, u64> {
        self.peers
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(p, s)| (p.clone(), self.lag_of(s, now.mono_ms)))
            .collect()
    }

    pub fn view(&self, now: Now) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(p, s)| PeerView {
                peer_id: p.clone(),
                connected: s.connected,
                region: s.region.clone(),
                root: s.root.as_ref().map(|r| r.root.map(hex::encode).unwrap_or_default()),
                count: s.root.as_ref().map(|r| r.count),
                in_sync: self.in_sync(s, now.mono_ms),
                lag_ms: self.lag_of(s, now.mono_ms),
                penalty: s.penalty,
                banned: s.banned_until.is_some(),
                sessions: s.sessions_done,
                session: s.session.clone(),
                last_session: s.last_session.clone(),
                must_resync: s.must_resync,
                bytes_sent: s.bytes_sent,
                bytes_received: s.bytes_received,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            wall_ms: ms,
        }
    }

    #[test]
    fn region_byte_counters_never_go_back() {
        let mut peers = PeerTable::new(PeerLimits::default(), MembersFile::default(), at(0), 50, 50);
        peers.add_bytes("a", 10, 1, at(0));
        peers.set_region("a", Some("eu".into()), at(0));
        peers.add_bytes("a", 5, 2, at(1));
        let eu = |p: &PeerTable| {
            let r = &p.regions(at(2))["eu"];
            (r.bytes_sent, r.bytes_received)
        };
        assert_eq!(eu(&peers), (15, 3), "bytes before the region was known count too");
        peers.forget("a", at(2));
        assert_eq!(eu(&peers), (15, 3), "forgetting a peer takes nothing back");
        peers.set_region("a", Some("us".into()), at(3));
        peers.add_bytes("a", 1, 1, at(3));
        assert_eq!(eu(&peers), (15, 3), "a peer that moved takes nothing back");
        assert_eq!(peers.regions(at(3))["us"].bytes_sent, 1);
    }

    fn roots(count: u64, root: Option<[u8; 16]>) -> RootsAnnouncement {
        RootsAnnouncement {
            node: "m".into(),
            root,
            count,
            hlc: 1,
            depth: 4,
        }
    }

    #[test]
    fn a_member_back_after_expiry_must_resync_unless_we_were_away() {
        let mut peers = PeerTable::new(PeerLimits::default(), MembersFile::default(), at(0), 50, 50);
        peers.prove_member("m", 10, at(0));
        // Every other member silent too (there is none): we were the ones away.
        peers.connected("m", true, at(80));
        assert!(!peers.must_resync("m"));
        peers.connected("m", false, at(80));
        // Now m is silent past the expiry while another member is fresh.
        peers.prove_member("other", 10, at(160));
        peers.connected("m", true, at(160));
        assert!(peers.must_resync("m"));
        let full = roots(5, Some([1; 16]));
        for _ in 0..3 {
            peers.on_roots("m", full.clone(), &roots(0, None), at(160));
        }
        assert!(
            !peers.due_for_session(at(160), 1).contains(&"m".to_string()),
            "no session takes from it"
        );
        assert_eq!(peers.admit_request("m", true, at(160)), Err(Refusal::MustResync));
        // It comes back empty: allowed again.
        peers.on_roots("m", roots(0, None), &roots(0, None), at(160));
        assert!(!peers.must_resync("m"));
    }

    #[test]
    fn sessions_start_after_two_differing_roots_and_prove_watermarks_on_equal() {
        let mut peers = PeerTable::new(PeerLimits::default(), MembersFile::default(), at(0), 1_000, 1_000);
        peers.connected("p", true, at(0));
        let mine = roots(3, Some([2; 16]));
        // A fresh connection: one differing root is enough, once identify
        // said which wire versions it speaks (or after a grace without).
        peers.on_roots("p", roots(2, Some([1; 16])), &mine, at(1));
        assert!(peers.due_for_session(at(1), 1_000).is_empty(), "identify first");
        assert_eq!(
            peers.due_for_session(at(IDENTIFY_GRACE_MS), 1_000),
            vec!["p".to_string()]
        );
        peers.set_wire("p", 3, at(1));
        assert_eq!(peers.due_for_session(at(1), 1_000), vec!["p".to_string()]);
        assert!(peers.session_started("p", 1, at(2), 5));
        assert!(!peers.session_started("p", 2, at(2), 5), "one session per peer");
        assert!(peers.due_for_session(at(2), 1_000).is_empty());
        peers.session_finished("p", Ok(&Progress::default()), at(3), true);
        assert!(peers.joined());
        peers.on_roots("p", mine.clone(), &mine, at(4));
        assert_eq!(peers.members()["p"].watermark, 2);
        assert_eq!(peers.lags(at(10))["p"], 0);
    }

    #[test]
    fn rate_limits_refill_with_time_and_bans_expire() {
        let limits = PeerLimits {
            requests_per_sec: 1.0,
            ban_after: 2,
            ban_for_ms: 100,
            ..PeerLimits::default()
        };
        let mut peers = PeerTable::new(limits, MembersFile::default(), at(0), 1, 1);
        peers.set_ledger_learned();
        for _ in 0..4 {
            assert!(peers.allow_request("p", at(0)));
        }
        assert_eq!(peers.admit_request("p", false, at(0)), Err(Refusal::RateLimited));
        assert!(peers.allow_request("p", at(1_000)), "a token a second");
        assert!(!peers.penalize("p", "x", at(0)));
        assert!(peers.penalize("p", "x", at(0)));
        assert!(peers.banned("p"));
        assert!(peers.expired_bans(at(50)).is_empty());
        assert_eq!(peers.expired_bans(at(100)), vec!["p".to_string()]);
    }
}
