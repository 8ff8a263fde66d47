//! The node's handle on the replication core's peer table
//! (`syncnode_protocol::replica::PeerTable`): the rules — roots compared,
//! sessions due, request budgets, penalties, member watermarks, must-resync
//! — live there, with time passed in, so the simulator runs them too. This
//! file adds what only a real node has: the clocks, a lock shared by the
//! swarm task, the session tasks and the API, and `members.json`, written
//! atomically and fsynced (losing a member would let a purge run that it
//! has not seen).

use libp2p::PeerId;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use syncnode_protocol::clock_offset::ClockOffsets;
use syncnode_protocol::membership::{MemberId, MemberView};
use syncnode_protocol::replica::watermarks::reset;
use syncnode_protocol::replica::{
    Gossip, Input, Member, MembersFile, Now, Output, PeerTable, RegionView, Replica, ReplicaConfig, Verdict,
};
use syncnode_protocol::wire::RootsAnnouncement;

use crate::engine::SyncEngine;
use crate::locks::MutexUnpoisoned;

pub use syncnode_protocol::replica::peers::{PeerView, Refusal, SessionInfo};
pub use syncnode_protocol::replica::{PeerLimits, ReplicationStats};

/// The file as it was written, now or by an older version (a bare map).
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyMembersFile {
    Now(MembersFile),
    Old(BTreeMap<String, Member>),
}

fn read_members_file(path: &Path) -> Option<MembersFile> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<AnyMembersFile>(&bytes) {
        Ok(AnyMembersFile::Now(m)) => Some(m),
        Ok(AnyMembersFile::Old(members)) => Some(MembersFile {
            members,
            ..Default::default()
        }),
        Err(e) => {
            tracing::warn!(error = %e, "members file unreadable; no purge until members are proven again");
            None
        }
    }
}

/// The members a members file lists (none when it is missing or unreadable).
pub fn known_members(path: &Path) -> BTreeMap<String, Member> {
    read_members_file(path).map(|f| f.members).unwrap_or_default()
}

/// Empties a members file (`syncnode resync`): members, watermarks, the
/// forgotten and the learned ledger go; the last start time stays, so the
/// node's next identity still outranks its old one.
pub fn reset_members_file(path: &Path) -> anyhow::Result<()> {
    let old = match std::fs::read(path) {
        Ok(b) => match serde_json::from_slice::<AnyMembersFile>(&b) {
            Ok(AnyMembersFile::Now(m)) => m,
            _ => MembersFile::default(),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    write_atomically(path, &serde_json::to_vec_pretty(&reset(&old))?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file, fsynced, renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The replication core of this node, behind a lock: the swarm task feeds
/// it and carries out what it asks; the API and readiness read its tables.
pub struct Peers {
    replica: Mutex<Replica>,
    members_file: Option<PathBuf>,
    /// One members-file write at a time (they share a temporary file).
    writing: Mutex<()>,
    /// The monotonic clock's origin.
    epoch: Instant,
    pub stats: Arc<ReplicationStats>,
}

impl Peers {
    /// Starts the core with what `members_file` kept across restarts.
    pub fn new(config: ReplicaConfig, members_file: Option<PathBuf>) -> Self {
        let file = members_file.as_deref().and_then(read_members_file).unwrap_or_default();
        let epoch = Instant::now();
        let replica = Replica::new(config, file, Self::clock(epoch), rand::random());
        Self {
            stats: replica.peers.stats.clone(),
            replica: Mutex::new(replica),
            members_file,
            writing: Mutex::new(()),
            epoch,
        }
    }

    fn clock(epoch: Instant) -> Now {
        Now {
            mono_ms: epoch.elapsed().as_millis() as u64,
            wall_ms: crate::engine::item::now_ms().max(0) as u64,
        }
    }

    /// The time as the core's decisions take it.
    pub fn now(&self) -> Now {
        Self::clock(self.epoch)
    }

    fn lock(&self) -> MutexGuard<'_, Replica> {
        self.replica.locked()
    }

    /// Runs `f` on the core with the time.
    pub fn core<R>(&self, f: impl FnOnce(&mut Replica, Now) -> R) -> R {
        let now = self.now();
        f(&mut self.lock(), now)
    }

    fn with<R>(&self, f: impl FnOnce(&mut PeerTable, Now) -> R) -> R {
        self.core(|r, now| f(&mut r.peers, now))
    }

    /// Feeds one input to the core; returns what it asks for.
    pub fn handle(&self, input: Input, store: &SyncEngine) -> Vec<Output> {
        self.core(|r, now| {
            r.handle(now, input, store);
            std::iter::from_fn(|| r.poll_output()).collect()
        })
    }

    /// Validated gossip for the core: what gossipsub should do with it, and
    /// what the core asks for.
    pub fn on_gossip(&self, from: PeerId, author: PeerId, msg: Gossip, store: &SyncEngine) -> (Verdict, Vec<Output>) {
        self.core(|r, now| {
            let v = r.on_gossip(now, &from.to_string(), &author.to_string(), msg, store);
            (v, std::iter::from_fn(|| r.poll_output()).collect())
        })
    }

    /// Starts a session with `peer` now; false if one is running.
    pub fn reconcile_now(&self, peer: PeerId, store: &SyncEngine) -> (bool, Vec<Output>) {
        self.core(|r, now| {
            let started = r.reconcile_now(now, &peer.to_string(), store);
            (started, std::iter::from_fn(|| r.poll_output()).collect())
        })
    }

    /// SWIM's members and the clock offsets measured.
    pub fn membership(&self) -> (Vec<MemberView>, ClockOffsets) {
        let r = self.lock();
        (r.membership().members(), r.offsets().clone())
    }

    /// Members alive or suspect.
    pub fn active_members(&self) -> Vec<MemberId> {
        self.lock().membership().active().cloned().collect()
    }

    pub fn connected(&self, peer: PeerId, on: bool) {
        self.with(|t, now| t.connected(&peer.to_string(), on, now));
    }

    pub fn add_member(&self, peer: PeerId, addrs: &[String]) {
        self.with(|t, now| t.add_member(&peer.to_string(), addrs, now));
    }

    pub fn forget(&self, peer: PeerId) -> bool {
        self.with(|t, now| t.forget(&peer.to_string(), now))
    }

    pub fn is_forgotten(&self, peer: PeerId) -> bool {
        self.with(|t, _| t.is_forgotten(&peer.to_string()))
    }

    pub fn joined(&self) -> bool {
        self.with(|t, _| t.joined())
    }

    pub fn mark_joined(&self, by: &str, how: &str) {
        self.with(|t, _| t.mark_joined(by, how));
    }

    pub fn mark_met_member(&self) {
        self.with(|t, _| t.mark_met_member());
    }

    pub fn met_member(&self) -> bool {
        self.with(|t, _| t.met_member())
    }

    pub fn ledger_learned(&self) -> bool {
        self.with(|t, _| t.ledger_learned())
    }

    pub fn all_connected_empty(&self) -> bool {
        self.with(|t, _| t.all_connected_empty())
    }

    pub fn must_resync(&self, peer: PeerId) -> bool {
        self.with(|t, _| t.must_resync(&peer.to_string()))
    }

    pub fn set_region(&self, peer: PeerId, region: Option<String>) {
        self.with(|t, now| t.set_region(&peer.to_string(), region, now));
    }

    /// The newest wire version `peer` and we both speak.
    pub fn set_wire(&self, peer: PeerId, version: u8) {
        self.with(|t, now| t.set_wire(&peer.to_string(), version, now));
    }

    pub fn on_roots(&self, peer: PeerId, theirs: RootsAnnouncement, mine: &RootsAnnouncement) {
        self.with(|t, now| t.on_roots(&peer.to_string(), theirs, mine, now));
    }

    pub fn prove_member(&self, peer: PeerId, watermark: u64) {
        self.with(|t, now| t.prove_member(&peer.to_string(), watermark, now));
    }

    pub fn touch_member(&self, peer: PeerId) {
        self.with(|t, now| t.touch_member(&peer.to_string(), now));
    }

    /// Writes the members file now (shutdown, or a test). Blocking: call it
    /// off the async threads.
    pub fn save_members(&self) {
        let wall = self.now().wall_ms;
        let file = self.with(|t, _| t.watermarks().snapshot(wall));
        self.write_members(&file);
    }

    /// Writes `file` (what the core asked to persist). Blocking.
    pub fn write_members(&self, file: &MembersFile) {
        let Some(path) = &self.members_file else { return };
        let _one = self.writing.locked();
        let saved = serde_json::to_vec_pretty(file)
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomically(path, &b));
        if let Err(e) = saved {
            self.with(|t, _| t.watermarks().save_failed());
            tracing::warn!(error = %e, path = %path.display(), "could not save the members file");
        }
    }

    pub fn purge_watermark(&self) -> Option<syncnode_protocol::replica::watermarks::Proven> {
        self.with(|t, now| t.purge_watermark(now))
    }

    pub fn members(&self) -> BTreeMap<String, Member> {
        self.with(|t, _| t.members())
    }

    pub fn busy(&self, peer: PeerId) -> bool {
        self.with(|t, _| t.busy(&peer.to_string()))
    }

    pub fn penalize(&self, peer: PeerId, why: &str) -> bool {
        self.with(|t, now| t.penalize(&peer.to_string(), why, now))
    }

    pub fn lags(&self) -> BTreeMap<String, u64> {
        self.with(|t, now| t.lags(now))
    }

    pub fn view(&self) -> Vec<PeerView> {
        self.with(|t, now| t.view(now))
    }

    /// Per region: members alive, connected peers, lag and bytes.
    pub fn regions(&self) -> Vec<RegionView> {
        self.core(|r, now| r.regions(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(expiry: Duration) -> ReplicaConfig {
        ReplicaConfig {
            me: MemberId::placeholder("me"),
            cluster: "test".into(),
            gossip_interval_ms: 1_000,
            anti_entropy_interval_ms: 1_000,
            request_timeout_ms: 1_000,
            tombstone_grace_ms: 1_000,
            member_expiry_ms: expiry.as_millis() as u64,
            ledger_retention_ms: expiry.as_millis() as u64,
            probe_interval_ms: 1_000,
            max_clock_skew_ms: 500,
            limits: PeerLimits::default(),
            seeded: true,
            cdc_batch_ms: 0,
        }
    }

    #[test]
    fn a_flag_survives_swim_traffic_and_our_restart_but_not_our_own_absence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("members.json");
        let short = Duration::from_millis(50);
        let open = || Peers::new(config(short), Some(file.clone()));
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

    #[test]
    fn an_old_members_file_is_read_and_a_reset_keeps_the_bump() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("members.json");
        std::fs::write(&file, r#"{"12D3KooWx": {"watermark": 5, "last_seen_ms": 1}}"#).unwrap();
        let long = Duration::from_secs(86_400);
        let peers = Peers::new(config(long), Some(file.clone()));
        assert_eq!(peers.members()["12D3KooWx"].watermark, 5);
        let bump = peers.core(|r, _| r.me().bump);
        peers.save_members();
        reset_members_file(&file).unwrap();
        let peers = Peers::new(config(long), Some(file));
        assert!(peers.members().is_empty());
        assert!(
            peers.core(|r, _| r.me().bump) > bump,
            "a restart outranks the last start"
        );
    }
}
