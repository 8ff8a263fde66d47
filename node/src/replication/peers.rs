//! What a node knows about its peers: the roots they announce (to start a
//! session when a root differs twice in a row), how far behind they are, the
//! sessions running with them, their request budget and penalty score, and
//! the cluster members' sync watermarks that bound tombstone purge (§6).
//!
//! Members and watermarks outlive the process (`members.json` in the data
//! dir): losing a member would let a purge run that it has not seen. Every
//! SWIM member counts (from the moment it joins, with watermark 0 until a
//! session proves it), not only the bootstrap peers; an operator may forget
//! a member (a wiped identity, a decommissioned host), and if it ever
//! returns holding data it must resync.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use syncnode_protocol::session::Progress;
use syncnode_protocol::wire::RootsAnnouncement;

/// Wall clock, ms.
fn now_ms() -> u64 {
    crate::engine::item::now_ms().max(0) as u64
}

/// Requests of one peer answered at once.
pub const MAX_ANSWERING_PER_PEER: u32 = 8;

/// Per-peer limits and penalties.
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// Sync requests a peer may send per second (sustained; the burst is 4×).
    pub requests_per_sec: f64,
    /// Gossip messages accepted per second from one author (burst 4×).
    pub gossip_per_sec: f64,
    /// Invalid messages after which a peer is banned.
    pub ban_after: u32,
    pub ban_for: Duration,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            requests_per_sec: 200.0,
            gossip_per_sec: 5_000.0,
            ban_after: 10,
            ban_for: Duration::from_secs(300),
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        let burst = rate * 4.0;
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone, Default)]
struct PeerState {
    connected: bool,
    region: Option<String>,
    root: Option<RootsAnnouncement>,
    /// Announcements in a row whose root differed from ours.
    differed: u32,
    /// When this peer was last known to hold what we hold (ms).
    equal_since: Option<u64>,
    first_seen: u64,
    requests: Option<Bucket>,
    gossip: Option<Bucket>,
    penalty: u32,
    banned_until: Option<Instant>,
    session: Option<SessionInfo>,
    sessions_done: u64,
    last_session: Option<SessionInfo>,
    /// A member back after more than `ledger_retention` (or forgotten): it may hold items
    /// whose deletes were purged and forgotten since; nothing is taken from
    /// it until it rejoins empty or holds exactly what we hold (logged,
    /// shown in `/v1/peers`).
    must_resync: bool,
    /// Inbound requests of this peer being answered.
    answering: u32,
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
}

/// A cluster member's purge watermark: the HLC below which it is proven to
/// hold everything we hold; and where it was last reachable, so a node that
/// restarts finds its members again even when its seeds are gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub watermark: u64,
    pub last_seen_ms: u64,
    #[serde(default)]
    pub addrs: Vec<String>,
}

/// `members.json`: the members and the peers an operator forgot.
#[derive(Debug, Default, Serialize, Deserialize)]
struct MembersFile {
    members: BTreeMap<String, Member>,
    /// Forgotten peers, with when they were last seen (ms).
    #[serde(default)]
    forgotten: BTreeMap<String, u64>,
    /// Whether this node has copied a member's purge ledger (it joined).
    #[serde(default)]
    ledger_learned: bool,
    /// The last SWIM `bump` this node started with: the next is greater,
    /// whatever the wall clock says.
    #[serde(default)]
    bump: u64,
    /// When this node last saved the file (ms): a start much later means it
    /// was the one away, not its members.
    #[serde(default)]
    alive_ms: u64,
}

/// The file as it was written, now or by an older version (a bare map).
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyMembersFile {
    Now(MembersFile),
    Old(BTreeMap<String, Member>),
}

/// Empties a members file (`syncnode resync`): members, watermarks, the
/// forgotten and the learned ledger go; the last start time stays, so the
/// node's next identity still outranks its old one.
pub fn reset_members_file(path: &std::path::Path) -> anyhow::Result<()> {
    let bump = match std::fs::read(path) {
        Ok(b) => match serde_json::from_slice::<AnyMembersFile>(&b) {
            Ok(AnyMembersFile::Now(m)) => m.bump,
            _ => 0,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    let fresh = MembersFile {
        bump,
        ..Default::default()
    };
    std::fs::write(path, serde_json::to_vec_pretty(&fresh)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Counters of the replication layer (exported by `/metrics`).
#[derive(Debug, Default)]
pub struct ReplicationStats {
    pub sessions: AtomicU64,
    pub session_failures: AtomicU64,
    pub divergent_paths: AtomicU64,
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

/// The peer table shared by the swarm task, the anti-entropy loop and the API.
pub struct Peers {
    limits: PeerLimits,
    inner: Mutex<HashMap<PeerId, PeerState>>,
    members: Mutex<MembersFile>,
    members_file: Option<PathBuf>,
    members_dirty: std::sync::atomic::AtomicBool,
    member_expiry: Duration,
    /// How long purge records are kept: a member away longer must resync.
    ledger_retention: Duration,
    /// Set once this node has caught up with a member (a session finished,
    /// or roots equal): readiness waits for it.
    joined: std::sync::atomic::AtomicBool,
    /// Whether any member was connected since the start.
    met_member: std::sync::atomic::AtomicBool,
    pub stats: ReplicationStats,
}

impl Peers {
    /// `members_file` keeps the member watermarks across restarts.
    pub fn new(
        limits: PeerLimits,
        members_file: Option<PathBuf>,
        member_expiry: Duration,
        ledger_retention: Duration,
    ) -> Self {
        let members = members_file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| match serde_json::from_slice::<AnyMembersFile>(&b) {
                Ok(AnyMembersFile::Now(m)) => Some(m),
                Ok(AnyMembersFile::Old(members)) => Some(MembersFile {
                    members,
                    ..Default::default()
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "members file unreadable; no purge until members are proven again");
                    None
                }
            })
            .unwrap_or_default();
        let mut members: MembersFile = members;
        let now = now_ms();
        if members.alive_ms > 0 && now.saturating_sub(members.alive_ms) > ledger_retention.as_millis() as u64 {
            // We were the one away: our members' silence is ours.
            tracing::warn!(
                away_ms = now - members.alive_ms,
                "this node was stopped longer than ledger_retention; its members count as seen now"
            );
            for m in members.members.values_mut() {
                m.last_seen_ms = m.last_seen_ms.max(now);
            }
        }
        Self {
            limits,
            inner: Mutex::new(HashMap::new()),
            members: Mutex::new(members),
            members_file,
            members_dirty: std::sync::atomic::AtomicBool::new(false),
            member_expiry,
            ledger_retention,
            joined: std::sync::atomic::AtomicBool::new(false),
            met_member: std::sync::atomic::AtomicBool::new(false),
            stats: ReplicationStats::default(),
        }
    }

    fn with<R>(&self, peer: PeerId, f: impl FnOnce(&mut PeerState) -> R) -> R {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let st = inner.entry(peer).or_insert_with(|| PeerState {
            first_seen: now_ms(),
            ..Default::default()
        });
        f(st)
    }

    pub fn connected(&self, peer: PeerId, on: bool) {
        // A member back after ledger_retention (our purge records of deletes
        // it missed are gone) must resync — unless every other member went
        // silent too: then it is us who were away, and all our members count
        // as fresh again (whichever reconnects first). A forgotten member
        // follows the same rule from when it was last seen; back sooner, it
        // heals through the purge ledger like any member and counts again.
        let forgotten = on && self.is_forgotten(peer);
        let mut expired = on && self.member_expired(peer);
        if forgotten && !expired {
            tracing::warn!(%peer, "a forgotten member is back: the purge ledger keeps its stale copies out; it counts as a member again");
            self.lock_members().forgotten.remove(&peer.to_string());
            self.add_member(peer, &[]);
        }
        if expired && !self.must_resync(peer) && self.isolated_from_all_but(peer) {
            tracing::warn!(
                "every member was silent past ledger_retention: this node was away; trusting its members again"
            );
            self.touch_all_members();
            expired = false;
        }
        self.with(peer, |s| {
            s.connected = on;
            // Nothing of ours is in flight to a peer just (re)connected: its
            // first differing root is enough to start a session.
            s.differed = u32::from(on);
            if expired && !s.must_resync {
                s.must_resync = true;
                tracing::error!(%peer, forgotten, "member away past ledger_retention is back: nothing is taken from it until it rejoins empty (`syncnode resync --from PEER` on it)");
            }
        });
    }

    /// Whether every member other than `peer` is silent past
    /// ledger_retention (or there is none).
    fn isolated_from_all_but(&self, peer: PeerId) -> bool {
        let m = self.lock_members();
        let me = peer.to_string();
        let now = now_ms();
        !m.members
            .iter()
            .any(|(p, mm)| *p != me && now.saturating_sub(mm.last_seen_ms) <= self.ledger_retention.as_millis() as u64)
    }

    fn lock_members(&self) -> std::sync::MutexGuard<'_, MembersFile> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A SWIM member joined: it holds back purges from now on (watermark 0
    /// until a session proves more). A forgotten peer is not taken back
    /// until it has resynced.
    pub fn add_member(&self, peer: PeerId, addrs: &[String]) {
        let mut m = self.lock_members();
        let key = peer.to_string();
        if m.forgotten.contains_key(&key) {
            return;
        }
        // A new member is seen now; a known one keeps its last-seen time
        // (SWIM gossip about it is no proof it holds anything: a member back
        // after ledger_retention must still be found expired).
        let e = m.members.entry(key).or_insert(Member {
            watermark: 0,
            last_seen_ms: now_ms(),
            addrs: Vec::new(),
        });
        if !addrs.is_empty() {
            e.addrs = addrs.to_vec();
        }
        self.members_dirty.store(true, Ordering::Relaxed);
    }

    /// Forgets a member (operator's decision): it stops holding back purges
    /// at once; if it returns with data it must resync. Returns whether it
    /// was a member.
    pub fn forget(&self, peer: PeerId) -> bool {
        let key = peer.to_string();
        let was = {
            let mut m = self.lock_members();
            let seen = m.members.remove(&key);
            m.forgotten
                .insert(key, seen.as_ref().map_or_else(now_ms, |s| s.last_seen_ms));
            seen.is_some()
        };
        self.members_dirty.store(true, Ordering::Relaxed);
        // Gone from `/v1/peers` too, unless it is connected or flagged (a
        // flagged peer stays refused).
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.get(&peer).is_some_and(|s| !s.connected && !s.must_resync) {
            inner.remove(&peer);
        }
        was
    }

    pub fn is_forgotten(&self, peer: PeerId) -> bool {
        self.lock_members().forgotten.contains_key(&peer.to_string())
    }

    /// Whether this node has caught up with a member since it started.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    /// Marks this node caught up (`by`: with whom, or why).
    pub fn mark_joined(&self, by: &str, how: &str) {
        if !self.joined.swap(true, Ordering::AcqRel) {
            tracing::info!(by, how, "caught up with the cluster: ready");
        }
    }

    /// Notes that a member was connected at some point since the start.
    pub fn mark_met_member(&self) {
        self.met_member.store(true, Ordering::Release);
    }

    pub fn met_member(&self) -> bool {
        self.met_member.load(Ordering::Acquire)
    }

    /// Whether this node has copied a member's purge ledger (or never had
    /// anyone to copy it from).
    pub fn ledger_learned(&self) -> bool {
        self.lock_members().ledger_learned
    }

    pub fn set_ledger_learned(&self) {
        self.lock_members().ledger_learned = true;
        self.members_dirty.store(true, Ordering::Relaxed);
    }

    /// The SWIM `bump` for this start: the wall clock, but always above the
    /// last start's (a clock stepped back must not lose to our old self).
    pub fn next_bump(&self, wall_ms: u64) -> u64 {
        let mut m = self.lock_members();
        // One stored while the clock ran a day ahead would lock us out.
        if m.bump > wall_ms.saturating_add(86_400_000) {
            tracing::warn!(
                stored = m.bump,
                wall_ms,
                "the last start time is far in the future; starting from the clock"
            );
            m.bump = 0;
        }
        m.bump = wall_ms.max(m.bump.saturating_add(1));
        self.members_dirty.store(true, Ordering::Relaxed);
        m.bump
    }

    /// Whether every connected peer announced an empty store (a new,
    /// empty cluster: there is nothing to catch up with).
    pub fn all_connected_empty(&self) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut any = false;
        for s in inner.values().filter(|s| s.connected) {
            any = true;
            if s.root.as_ref().is_none_or(|r| r.count > 0) {
                return false;
            }
        }
        any
    }

    /// Whether nothing may be taken from `peer`: a member back after
    /// ledger_retention may hold deletes purged and forgotten since (DESIGN §6:
    /// it must resync). Cleared once it announces an empty store.
    pub fn must_resync(&self, peer: PeerId) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.get(&peer).is_some_and(|s| s.must_resync)
    }

    /// Whether `peer` (a member, or a forgotten one) was silent longer than
    /// ledger_retention.
    fn member_expired(&self, peer: PeerId) -> bool {
        let m = self.lock_members();
        let key = peer.to_string();
        let seen = m
            .members
            .get(&key)
            .map(|m| m.last_seen_ms)
            .or(m.forgotten.get(&key).copied());
        seen.is_some_and(|t| now_ms().saturating_sub(t) > self.ledger_retention.as_millis() as u64)
    }

    pub fn set_region(&self, peer: PeerId, region: Option<String>) {
        self.with(peer, |s| s.region = region);
    }

    /// Records a peer's roots announcement against our own root.
    pub fn on_roots(&self, peer: PeerId, theirs: RootsAnnouncement, mine: &RootsAnnouncement) {
        ReplicationStats::add(&self.stats.roots_received, 1);
        let equal = theirs.root == mine.root && theirs.depth == mine.depth;
        let now = now_ms();
        let expired = self.member_expired(peer);
        let mut resynced = false;
        self.with(peer, |s| {
            // Empty, or holding exactly what we hold (it bootstrapped from
            // us again): nothing stale can come from it any more.
            if s.must_resync && (theirs.count == 0 || equal) {
                s.must_resync = false;
                resynced = true;
            }
            s.root = Some(theirs.clone());
            if equal {
                s.differed = 0;
                s.equal_since = Some(now);
            } else {
                s.differed += 1;
            }
        });
        // A member that resynced (its flag just cleared), or one away past
        // ledger_retention that comes back empty: it starts over, seen now,
        // nothing proven yet.
        if resynced || (expired && theirs.count == 0) {
            tracing::info!(%peer, "member resynced: it counts again");
            let addrs = {
                let mut m = self.lock_members();
                m.forgotten.remove(&peer.to_string());
                m.members.remove(&peer.to_string()).map(|r| r.addrs).unwrap_or_default()
            };
            self.add_member(peer, &addrs);
        }
        if !expired {
            self.touch_member(peer);
        }
        if equal && theirs.count > 0 && !self.must_resync(peer) {
            self.mark_joined(&peer.to_string(), "roots equal");
        }
        if equal && !self.must_resync(peer) {
            // Both hold the same set: everything either will write later is
            // stamped above both clocks, so all up to the lower one is shared.
            self.prove_member(peer, theirs.hlc.min(mine.hlc).saturating_add(1));
        }
    }

    /// Connected peers whose root differed twice in a row and with no
    /// session running.
    pub fn due_for_session(&self) -> Vec<PeerId> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .iter()
            .filter(|(_, s)| {
                s.connected && s.differed >= 2 && s.session.is_none() && s.banned_until.is_none() && !s.must_resync
            })
            .map(|(p, _)| *p)
            .collect()
    }

    /// Records that `peer` holds everything we hold stamped below `watermark`.
    pub fn prove_member(&self, peer: PeerId, watermark: u64) {
        let mut m = self.lock_members();
        if m.forgotten.contains_key(&peer.to_string()) {
            return;
        }
        let e = m.members.entry(peer.to_string()).or_insert(Member {
            watermark,
            last_seen_ms: 0,
            addrs: Vec::new(),
        });
        e.watermark = e.watermark.max(watermark);
        e.last_seen_ms = now_ms();
        self.members_dirty.store(true, Ordering::Relaxed);
    }

    fn touch_all_members(&self) {
        let mut m = self.lock_members();
        let now = now_ms();
        for e in m.members.values_mut() {
            e.last_seen_ms = now;
        }
        self.members_dirty.store(true, Ordering::Relaxed);
    }

    /// A member was heard from (roots, or SWIM traffic). One flagged
    /// `must_resync` or silent past ledger_retention stays as it is, so the
    /// flag comes back after a restart until the member has resynced.
    pub fn touch_member(&self, peer: PeerId) {
        if self.must_resync(peer) || self.member_expired(peer) {
            return;
        }
        let mut m = self.lock_members();
        if let Some(e) = m.members.get_mut(&peer.to_string()) {
            e.last_seen_ms = now_ms();
            self.members_dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Writes the members file if it changed (atomically, fsynced). Blocking:
    /// call it off the async threads.
    pub fn save_members(&self) {
        let Some(f) = &self.members_file else { return };
        // Saved when it changed, and once a minute anyway (`alive_ms`).
        let stale = now_ms().saturating_sub(self.lock_members().alive_ms) > 60_000;
        if !self.members_dirty.swap(false, Ordering::Relaxed) && !stale {
            return;
        }
        let bytes = {
            let mut m = self.lock_members();
            m.alive_ms = now_ms();
            serde_json::to_vec_pretty(&*m)
        };
        let tmp = f.with_extension("json.tmp");
        let saved = bytes.map_err(std::io::Error::other).and_then(|b| {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&b)?;
            file.sync_all()?;
            std::fs::rename(&tmp, f)?;
            if let Some(dir) = f.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        });
        if let Err(e) = saved {
            self.members_dirty.store(true, Ordering::Relaxed);
            tracing::warn!(error = %e, "could not save the members file");
        }
    }

    /// The HLC below which every member still counted holds everything we
    /// hold, or `None` when there is no member yet. Members silent longer
    /// than `member_expiry` drop out, with a warning.
    pub fn purge_watermark(&self) -> Option<u64> {
        let member_expiry = self.member_expiry;
        let m = self.lock_members();
        let now = now_ms();
        let mut min = None::<u64>;
        for (peer, member) in m.members.iter() {
            if now.saturating_sub(member.last_seen_ms) > member_expiry.as_millis() as u64 {
                tracing::warn!(%peer, "member silent past member_expiry: no longer holds back tombstone purge");
                continue;
            }
            min = Some(min.map_or(member.watermark, |w: u64| w.min(member.watermark)));
        }
        min
    }

    pub fn members(&self) -> BTreeMap<String, Member> {
        self.lock_members().members.clone()
    }

    /// Takes a request token from `peer`'s budget.
    pub fn allow_request(&self, peer: PeerId) -> bool {
        self.take_token(peer, self.limits.requests_per_sec, |s| &mut s.requests)
    }

    /// Takes a gossip token from the budget of the connected peer that
    /// forwarded a message (authors can be made up; connections cannot).
    pub fn allow_gossip(&self, source: PeerId) -> bool {
        self.take_token(source, self.limits.gossip_per_sec, |s| &mut s.gossip)
    }

    fn take_token(&self, peer: PeerId, rate: f64, bucket: impl FnOnce(&mut PeerState) -> &mut Option<Bucket>) -> bool {
        let ok = self.with(peer, |s| {
            bucket(s)
                .get_or_insert(Bucket {
                    tokens: rate * 4.0,
                    at: Instant::now(),
                })
                .take(rate)
        });
        if !ok {
            ReplicationStats::add(&self.stats.rate_limited, 1);
        }
        ok
    }

    /// Starts answering a request of `peer` unless it already has
    /// `MAX_ANSWERING_PER_PEER` answers in progress (one peer cannot take
    /// every answering slot).
    pub fn begin_answer(&self, peer: PeerId) -> bool {
        self.with(peer, |s| {
            if s.answering >= MAX_ANSWERING_PER_PEER {
                return false;
            }
            s.answering += 1;
            true
        })
    }

    /// Whether a session with `peer`, or an answer to it, is running.
    pub fn busy(&self, peer: PeerId) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.get(&peer).is_some_and(|s| s.session.is_some() || s.answering > 0)
    }

    pub fn end_answer(&self, peer: PeerId) {
        self.with(peer, |s| s.answering = s.answering.saturating_sub(1));
    }

    /// Counts an invalid message against `peer`; returns true when the peer
    /// has now earned a ban.
    pub fn penalize(&self, peer: PeerId, why: &str) -> bool {
        ReplicationStats::add(&self.stats.invalid_messages, 1);
        let (limit, ban_for) = (self.limits.ban_after, self.limits.ban_for);
        let banned = self.with(peer, |s| {
            s.penalty += 1;
            if s.penalty >= limit && s.banned_until.is_none() {
                s.banned_until = Some(Instant::now() + ban_for);
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

    /// Peers whose ban has run out (their penalty is reset).
    pub fn expired_bans(&self) -> Vec<PeerId> {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (peer, s) in inner.iter_mut() {
            if s.banned_until.is_some_and(|t| t <= now) {
                s.banned_until = None;
                s.penalty = 0;
                out.push(*peer);
            }
        }
        out
    }

    /// Marks the start of a session with `peer`; false if one is running.
    pub fn session_started(&self, peer: PeerId, id: u64) -> bool {
        self.with(peer, |s| {
            if s.session.is_some() {
                return false;
            }
            s.session = Some(SessionInfo {
                id,
                started_ms: now_ms(),
                finished_ms: None,
                progress: Progress::default(),
                error: None,
            });
            true
        })
    }

    pub fn session_progress(&self, peer: PeerId, p: &Progress) {
        self.with(peer, |s| {
            if let Some(info) = s.session.as_mut() {
                info.progress = p.clone();
            }
        });
    }

    pub fn session_finished(&self, peer: PeerId, result: Result<&Progress, String>) {
        let ok = result.is_ok();
        let stats = &self.stats;
        ReplicationStats::add(&stats.sessions, 1);
        match result {
            Ok(p) => {
                ReplicationStats::add(&stats.items_pulled, p.pulled);
                ReplicationStats::add(&stats.items_pushed, p.pushed);
                ReplicationStats::add(&stats.divergent_paths, p.nodes_compared);
            }
            Err(_) => ReplicationStats::add(&stats.session_failures, 1),
        }
        self.with(peer, |s| {
            if let Some(mut info) = s.session.take() {
                info.finished_ms = Some(now_ms());
                match result {
                    Ok(p) => info.progress = p.clone(),
                    Err(e) => info.error = Some(e),
                }
                s.sessions_done += 1;
                s.differed = 0;
                s.last_session = Some(info);
            }
        });
        if ok && !self.must_resync(peer) {
            self.mark_joined(&peer.to_string(), "session finished");
        }
    }

    /// How far behind `peer` is, ms: 0 while its root equals ours, else the
    /// time since it last did (or since we first saw it).
    fn lag_of(s: &PeerState, now: u64) -> u64 {
        if Self::in_sync(s) {
            return 0;
        }
        now.saturating_sub(s.equal_since.unwrap_or(s.first_seen))
    }

    /// In sync: connected, and its last root equalled ours. A peer gone
    /// is never in sync: nothing says what it holds now.
    fn in_sync(s: &PeerState) -> bool {
        s.connected && s.differed == 0 && s.equal_since.is_some()
    }

    /// Lag per connected peer.
    pub fn lags(&self) -> BTreeMap<String, u64> {
        let now = now_ms();
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(p, s)| (p.to_string(), Self::lag_of(s, now)))
            .collect()
    }

    pub fn view(&self) -> Vec<PeerView> {
        let now = now_ms();
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PeerView> = inner
            .iter()
            .map(|(p, s)| PeerView {
                peer_id: p.to_string(),
                connected: s.connected,
                region: s.region.clone(),
                root: s.root.as_ref().map(|r| r.root.map(hex::encode).unwrap_or_default()),
                count: s.root.as_ref().map(|r| r.count),
                in_sync: Self::in_sync(s),
                lag_ms: Self::lag_of(s, now),
                penalty: s.penalty,
                banned: s.banned_until.is_some(),
                sessions: s.sessions_done,
                session: s.session.clone(),
                last_session: s.last_session.clone(),
                must_resync: s.must_resync,
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_back_after_expiry_must_resync_unless_we_were_away() {
        let peers = Peers::new(
            PeerLimits::default(),
            None,
            Duration::from_millis(50),
            Duration::from_millis(50),
        );
        let (m, other) = (PeerId::random(), PeerId::random());
        peers.prove_member(m, 10);
        std::thread::sleep(Duration::from_millis(80));
        // Every other member silent too (there is none): we were the ones away.
        peers.connected(m, true);
        assert!(!peers.must_resync(m));
        peers.connected(m, false);
        // Now m is silent past the expiry while another member is fresh.
        std::thread::sleep(Duration::from_millis(80));
        peers.prove_member(other, 10);
        peers.connected(m, true);
        assert!(peers.must_resync(m));
        let full = RootsAnnouncement {
            node: "m".into(),
            root: Some([1; 16]),
            count: 5,
            hlc: 1,
            depth: 4,
        };
        for _ in 0..3 {
            peers.on_roots(
                m,
                full.clone(),
                &RootsAnnouncement {
                    root: None,
                    count: 0,
                    ..full.clone()
                },
            );
        }
        assert!(!peers.due_for_session().contains(&m), "no session takes from it");
        // It comes back empty: allowed again.
        let empty = RootsAnnouncement {
            root: None,
            count: 0,
            ..full
        };
        peers.on_roots(m, empty.clone(), &empty);
        assert!(!peers.must_resync(m));
    }

    #[test]
    fn a_flag_survives_swim_traffic_and_our_restart_but_not_our_own_absence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("members.json");
        let short = Duration::from_millis(50);
        let open = || Peers::new(PeerLimits::default(), Some(file.clone()), short, short);
        let (m, other) = (PeerId::random(), PeerId::random());
        let peers = open();
        peers.prove_member(m, 10);
        std::thread::sleep(Duration::from_millis(80));
        peers.prove_member(other, 10);
        peers.connected(m, true);
        assert!(peers.must_resync(m));
        // SWIM gossip and packets about it prove nothing.
        peers.add_member(m, &["/ip4/10.0.0.9/tcp/1".to_string()]);
        peers.touch_member(m);
        peers.save_members();
        drop(peers);
        let peers = open();
        peers.prove_member(other, 10);
        peers.connected(m, true);
        assert!(peers.must_resync(m), "flagged again after our restart");
        // Its empty store clears the flag and starts it over.
        let empty = RootsAnnouncement {
            node: "m".into(),
            root: None,
            count: 0,
            hlc: 1,
            depth: 4,
        };
        let ours = RootsAnnouncement {
            root: Some([1; 16]),
            count: 3,
            ..empty.clone()
        };
        peers.on_roots(m, empty, &ours);
        assert!(!peers.must_resync(m));
        assert_eq!(peers.members()[&m.to_string()].watermark, 0);
        peers.save_members();
        drop(peers);
        // Now we are the ones stopped for longer than ledger_retention.
        std::thread::sleep(Duration::from_millis(80));
        let peers = open();
        peers.connected(m, true);
        assert!(!peers.must_resync(m), "our absence is not theirs");
    }
}
