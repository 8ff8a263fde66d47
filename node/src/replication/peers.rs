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
use syncnode_protocol::replica::watermarks::reset;
use syncnode_protocol::replica::{Member, MembersFile, Now, PeerTable};
use syncnode_protocol::session::Progress;
use syncnode_protocol::wire::RootsAnnouncement;

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

/// The peer table shared by the swarm task, the anti-entropy loop and the API.
pub struct Peers {
    table: Mutex<PeerTable>,
    members_file: Option<PathBuf>,
    /// The monotonic clock's origin.
    epoch: Instant,
    pub stats: Arc<ReplicationStats>,
}

impl Peers {
    /// `members_file` keeps the member watermarks across restarts.
    pub fn new(
        limits: PeerLimits,
        members_file: Option<PathBuf>,
        member_expiry: std::time::Duration,
        ledger_retention: std::time::Duration,
    ) -> Self {
        let file = members_file.as_deref().and_then(read_members_file).unwrap_or_default();
        let epoch = Instant::now();
        let table = PeerTable::new(
            limits,
            file,
            Self::clock(epoch),
            member_expiry.as_millis() as u64,
            ledger_retention.as_millis() as u64,
        );
        Self {
            stats: table.stats.clone(),
            table: Mutex::new(table),
            members_file,
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

    fn table(&self) -> MutexGuard<'_, PeerTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the table with the time (for what has no wrapper here).
    pub fn with<R>(&self, f: impl FnOnce(&mut PeerTable, Now) -> R) -> R {
        let now = self.now();
        f(&mut self.table(), now)
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
        self.table().is_forgotten(&peer.to_string())
    }

    pub fn joined(&self) -> bool {
        self.table().joined()
    }

    pub fn mark_joined(&self, by: &str, how: &str) {
        self.table().mark_joined(by, how);
    }

    pub fn mark_met_member(&self) {
        self.table().mark_met_member();
    }

    pub fn met_member(&self) -> bool {
        self.table().met_member()
    }

    pub fn ledger_learned(&self) -> bool {
        self.table().ledger_learned()
    }

    pub fn set_ledger_learned(&self) {
        self.table().set_ledger_learned();
    }

    pub fn next_bump(&self, wall_ms: u64) -> u64 {
        self.table().next_bump(wall_ms)
    }

    pub fn all_connected_empty(&self) -> bool {
        self.table().all_connected_empty()
    }

    pub fn must_resync(&self, peer: PeerId) -> bool {
        self.table().must_resync(&peer.to_string())
    }

    pub fn set_region(&self, peer: PeerId, region: Option<String>) {
        self.with(|t, now| t.set_region(&peer.to_string(), region, now));
    }

    pub fn on_roots(&self, peer: PeerId, theirs: RootsAnnouncement, mine: &RootsAnnouncement) {
        self.with(|t, now| t.on_roots(&peer.to_string(), theirs, mine, now));
    }

    /// Peers to start a session with now: those whose root differed twice
    /// in a row; and while the purge ledger is not learned (CDC is ignored
    /// until it is), one connected member even if roots agree.
    pub fn due_for_session(&self) -> Vec<PeerId> {
        let t = self.table();
        let mut due = t.due_for_session();
        if !t.ledger_learned() && due.is_empty() && !t.any_session() {
            due.extend(t.connected_members().into_iter().take(1));
        }
        due.iter().filter_map(|p| p.parse().ok()).collect()
    }

    pub fn prove_member(&self, peer: PeerId, watermark: u64) {
        self.with(|t, now| t.prove_member(&peer.to_string(), watermark, now));
    }

    pub fn touch_member(&self, peer: PeerId) {
        self.with(|t, now| t.touch_member(&peer.to_string(), now));
    }

    /// Writes the members file if it changed (or a minute passed).
    /// Blocking: call it off the async threads.
    pub fn save_members(&self) {
        let Some(path) = &self.members_file else { return };
        let wall = self.now().wall_ms;
        let Some(file) = self.table().watermarks().take_dirty(wall) else {
            return;
        };
        let saved = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomically(path, &b));
        if let Err(e) = saved {
            self.table().watermarks().save_failed();
            tracing::warn!(error = %e, path = %path.display(), "could not save the members file");
        }
    }

    pub fn purge_watermark(&self) -> Option<u64> {
        self.with(|t, now| t.purge_watermark(now))
    }

    pub fn members(&self) -> BTreeMap<String, Member> {
        self.table().members()
    }

    pub fn allow_gossip(&self, source: PeerId) -> bool {
        self.with(|t, now| t.allow_gossip(&source.to_string(), now))
    }

    /// The core's admission rule for an inbound sync request; on `Ok` an
    /// answer slot is held until `end_answer`.
    pub fn admit_request(&self, peer: PeerId, push: bool) -> Result<(), Refusal> {
        self.with(|t, now| t.admit_request(&peer.to_string(), push, now))
    }

    pub fn busy(&self, peer: PeerId) -> bool {
        self.table().busy(&peer.to_string())
    }

    pub fn end_answer(&self, peer: PeerId) {
        self.table().end_answer(&peer.to_string());
    }

    pub fn penalize(&self, peer: PeerId, why: &str) -> bool {
        self.with(|t, now| t.penalize(&peer.to_string(), why, now))
    }

    pub fn expired_bans(&self) -> Vec<PeerId> {
        self.with(|t, now| t.expired_bans(now))
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Marks the start of a session with `peer` (`our_hlc`: our clock now);
    /// false if one is running.
    pub fn session_started(&self, peer: PeerId, id: u64, our_hlc: u64) -> bool {
        self.with(|t, now| t.session_started(&peer.to_string(), id, now, our_hlc))
    }

    pub fn session_progress(&self, peer: PeerId, p: &Progress) {
        self.table().session_progress(&peer.to_string(), p);
    }

    pub fn session_finished(&self, peer: PeerId, result: Result<&Progress, String>) {
        self.with(|t, now| t.session_finished(&peer.to_string(), result, now));
    }

    pub fn lags(&self) -> BTreeMap<String, u64> {
        self.with(|t, now| t.lags(now))
    }

    pub fn view(&self) -> Vec<PeerView> {
        self.with(|t, now| t.view(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    #[test]
    fn an_old_members_file_is_read_and_a_reset_keeps_the_bump() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("members.json");
        std::fs::write(&file, r#"{"12D3KooWx": {"watermark": 5, "last_seen_ms": 1}}"#).unwrap();
        let peers = Peers::new(PeerLimits::default(), Some(file.clone()), Duration::MAX, Duration::MAX);
        assert_eq!(peers.members()["12D3KooWx"].watermark, 5);
        let bump = peers.next_bump(1_000);
        peers.save_members();
        reset_members_file(&file).unwrap();
        let peers = Peers::new(PeerLimits::default(), Some(file), Duration::MAX, Duration::MAX);
        assert!(peers.members().is_empty());
        assert!(peers.next_bump(0) > bump);
    }
}
