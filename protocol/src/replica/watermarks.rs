//! Member watermarks (DESIGN §6): per cluster member, the HLC below which it
//! was last proven to hold everything we hold, and when it was last heard
//! from. Tombstones are purged below the minimum over the members still
//! counted; a member silent past `member_expiry` drops out of it; one
//! silent past `ledger_retention` (our purge records of the deletes it
//! missed are gone) must resync when it returns — unless every member went
//! silent at once, in which case it was us who were away.
//!
//! This is the durable half of what a node knows of its peers: the driver
//! persists `MembersFile` (the node: `members.json`, fsynced; the simulator:
//! its crash-surviving state) whenever `take_dirty` hands it a copy.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One member's purge watermark and where it was last reachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub watermark: u64,
    pub last_seen_ms: u64,
    #[serde(default)]
    pub addrs: Vec<String>,
    /// When (our wall clock, ms) the watermark was proven: it covers what
    /// we held then, not tombstones that reach us later with older stamps.
    #[serde(default)]
    pub proven_at_ms: u64,
}

/// What survives a restart: the members, the peers an operator forgot,
/// whether the purge ledger was learned, the last start's SWIM bump, and
/// when the file was last saved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersFile {
    pub members: BTreeMap<String, Member>,
    /// Forgotten peers, with when they were last seen (ms).
    #[serde(default)]
    pub forgotten: BTreeMap<String, u64>,
    /// Whether this node has copied a member's purge ledger (it joined).
    #[serde(default)]
    pub ledger_learned: bool,
    /// The last SWIM `bump` this node started with: the next is greater,
    /// whatever the wall clock says.
    #[serde(default)]
    pub bump: u64,
    /// When this node last saved the file (ms): a start much later means it
    /// was the one away, not its members.
    #[serde(default)]
    pub alive_ms: u64,
}

/// What the members are proven to hold: every version stamped below
/// `below` that we held at `held_at_ms` (our wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proven {
    pub below: u64,
    pub held_at_ms: u64,
}

/// Saved at least this often (ms), so `alive_ms` tells how long we were away.
const SAVE_EVERY_MS: u64 = 60_000;
/// A stored start time this far past the clock is distrusted.
const FUTURE_BUMP_MS: u64 = 86_400_000;

/// The watermark table and its rules, with time passed in.
#[derive(Debug, Clone)]
pub struct Watermarks {
    file: MembersFile,
    dirty: bool,
    member_expiry_ms: u64,
    ledger_retention_ms: u64,
}

impl Watermarks {
    /// Takes over a loaded file at `now` (wall ms). A node stopped longer
    /// than `ledger_retention` counts its members as seen now: their silence
    /// was its own absence.
    pub fn load(mut file: MembersFile, now: u64, member_expiry_ms: u64, ledger_retention_ms: u64) -> Self {
        if file.alive_ms > 0 && now.saturating_sub(file.alive_ms) > ledger_retention_ms {
            tracing::warn!(
                away_ms = now - file.alive_ms,
                "this node was stopped longer than ledger_retention; its members count as seen now"
            );
            for m in file.members.values_mut() {
                m.last_seen_ms = m.last_seen_ms.max(now);
            }
        }
        Self {
            file,
            dirty: false,
            member_expiry_ms,
            ledger_retention_ms,
        }
    }

    /// A copy to persist, when something changed or a minute passed
    /// (stamped with `alive_ms = now`). Hand it back with `save_failed` if
    /// it could not be written.
    pub fn take_dirty(&mut self, now: u64) -> Option<MembersFile> {
        if !self.dirty && now.saturating_sub(self.file.alive_ms) <= SAVE_EVERY_MS {
            return None;
        }
        self.dirty = false;
        self.file.alive_ms = now;
        Some(self.file.clone())
    }

    /// The file to persist now, whatever changed (shutdown).
    pub fn snapshot(&mut self, now: u64) -> MembersFile {
        self.dirty = false;
        self.file.alive_ms = now;
        self.file.clone()
    }

    pub fn save_failed(&mut self) {
        self.dirty = true;
    }

    pub fn file(&self) -> &MembersFile {
        &self.file
    }

    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.file.members
    }

    /// A SWIM member joined: it holds back purges from now on (watermark 0
    /// until a session proves more). A forgotten peer is not taken back
    /// until it has resynced. A known member keeps its last-seen time: SWIM
    /// gossip about it is no proof that it holds anything.
    pub fn add(&mut self, peer: &str, addrs: &[String], now: u64) {
        if self.file.forgotten.contains_key(peer) {
            return;
        }
        let e = self.file.members.entry(peer.to_string()).or_insert(Member {
            watermark: 0,
            last_seen_ms: now,
            addrs: Vec::new(),
            proven_at_ms: 0,
        });
        if !addrs.is_empty() {
            e.addrs = addrs.to_vec();
        }
        self.dirty = true;
    }

    /// Forgets a member (operator's decision); returns whether it was one.
    pub fn forget(&mut self, peer: &str, now: u64) -> bool {
        let seen = self.file.members.remove(peer);
        self.file
            .forgotten
            .insert(peer.to_string(), seen.as_ref().map_or(now, |s| s.last_seen_ms));
        self.dirty = true;
        seen.is_some()
    }

    pub fn is_forgotten(&self, peer: &str) -> bool {
        self.file.forgotten.contains_key(peer)
    }

    /// A forgotten member back within ledger_retention: it counts again.
    pub fn unforget(&mut self, peer: &str, now: u64) {
        self.file.forgotten.remove(peer);
        self.add(peer, &[], now);
    }

    /// A member that resynced starts over: seen now, nothing proven yet.
    pub fn restart(&mut self, peer: &str, now: u64) {
        self.file.forgotten.remove(peer);
        let addrs = self.file.members.remove(peer).map(|r| r.addrs).unwrap_or_default();
        self.add(peer, &addrs, now);
    }

    /// Whether `peer` (a member, or a forgotten one) was silent longer than
    /// ledger_retention.
    pub fn expired(&self, peer: &str, now: u64) -> bool {
        let seen = self
            .file
            .members
            .get(peer)
            .map(|m| m.last_seen_ms)
            .or(self.file.forgotten.get(peer).copied());
        seen.is_some_and(|t| now.saturating_sub(t) > self.ledger_retention_ms)
    }

    /// Whether every member other than `peer` is silent past
    /// ledger_retention (or there is none).
    pub fn isolated_from_all_but(&self, peer: &str, now: u64) -> bool {
        !self
            .file
            .members
            .iter()
            .any(|(p, m)| p != peer && now.saturating_sub(m.last_seen_ms) <= self.ledger_retention_ms)
    }

    /// Records that `peer` held, at `at` (wall ms), everything we held
    /// then stamped below `watermark`. A proof below the one kept is
    /// ignored (it would weaken the pair).
    pub fn prove(&mut self, peer: &str, watermark: u64, at: u64, now: u64) {
        if self.file.forgotten.contains_key(peer) {
            return;
        }
        let e = self.file.members.entry(peer.to_string()).or_insert(Member {
            watermark,
            last_seen_ms: 0,
            addrs: Vec::new(),
            proven_at_ms: at,
        });
        if watermark >= e.watermark {
            e.watermark = watermark;
            e.proven_at_ms = e.proven_at_ms.max(at);
        }
        e.last_seen_ms = now;
        self.dirty = true;
    }

    pub fn touch_all(&mut self, now: u64) {
        for e in self.file.members.values_mut() {
            e.last_seen_ms = now;
        }
        self.dirty = true;
    }

    /// A member was heard from. The caller leaves out one that must resync
    /// or is expired, so the flag comes back after a restart.
    pub fn touch(&mut self, peer: &str, now: u64) {
        if let Some(e) = self.file.members.get_mut(peer) {
            e.last_seen_ms = now;
            self.dirty = true;
        }
    }

    /// What every member still counted is proven to hold: everything we
    /// held at the earliest proof time (wall ms) stamped below the lowest
    /// watermark; `None` when there is no member yet. Members silent longer
    /// than `member_expiry` drop out, with a warning.
    pub fn purge_watermark(&self, now: u64) -> Option<Proven> {
        let mut min = None::<Proven>;
        for (peer, m) in &self.file.members {
            if now.saturating_sub(m.last_seen_ms) > self.member_expiry_ms {
                tracing::warn!(%peer, "member silent past member_expiry: no longer holds back tombstone purge");
                continue;
            }
            let p = Proven {
                below: m.watermark,
                held_at_ms: m.proven_at_ms,
            };
            min = Some(min.map_or(p, |q| Proven {
                below: q.below.min(p.below),
                held_at_ms: q.held_at_ms.min(p.held_at_ms),
            }));
        }
        min
    }

    pub fn ledger_learned(&self) -> bool {
        self.file.ledger_learned
    }

    pub fn set_ledger_learned(&mut self) {
        if !self.file.ledger_learned {
            self.file.ledger_learned = true;
            self.dirty = true;
        }
    }

    /// The SWIM `bump` for this start: the wall clock, but always above the
    /// last start's (a clock stepped back must not lose to our old self).
    pub fn next_bump(&mut self, wall_ms: u64) -> u64 {
        if self.file.bump > wall_ms.saturating_add(FUTURE_BUMP_MS) {
            tracing::warn!(
                stored = self.file.bump,
                wall_ms,
                "the last start time is far in the future; starting from the clock"
            );
            self.file.bump = 0;
        }
        self.file.bump = wall_ms.max(self.file.bump.saturating_add(1));
        self.dirty = true;
        self.file.bump
    }
}

/// Empties a members file for `syncnode resync`: members, watermarks, the
/// forgotten and the learned ledger go; the last start time stays, so the
/// node's next identity still outranks its old one.
pub fn reset(file: &MembersFile) -> MembersFile {
    MembersFile {
        bump: file.bump,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_watermark_is_the_minimum_over_fresh_members() {
        let mut w = Watermarks::load(MembersFile::default(), 0, 1_000, 2_000);
        let below = |w: &Watermarks, now| w.purge_watermark(now).map(|p| p.below);
        assert_eq!(below(&w, 0), None);
        w.prove("a", 50, 0, 0);
        w.prove("b", 30, 500, 500);
        assert_eq!(
            w.purge_watermark(900),
            Some(Proven {
                below: 30,
                held_at_ms: 0
            })
        );
        // a's silence passes member_expiry: only b counts.
        assert_eq!(
            w.purge_watermark(1_200),
            Some(Proven {
                below: 30,
                held_at_ms: 500
            })
        );
        assert_eq!(below(&w, 1_600), None);
        // A new member holds purges back at watermark 0.
        w.add("c", &[], 1_600);
        assert_eq!(below(&w, 1_600), Some(0));
        // A weaker proof does not replace a stronger one.
        w.prove("c", 40, 1_700, 1_700);
        w.prove("c", 35, 1_800, 1_800);
        assert_eq!(w.members()["c"].watermark, 40);
        assert_eq!(w.members()["c"].proven_at_ms, 1_700);
    }

    #[test]
    fn a_bump_always_grows_and_distrusts_the_far_future() {
        let mut w = Watermarks::load(MembersFile::default(), 0, 1, 1);
        assert_eq!(w.next_bump(100), 100);
        assert_eq!(w.next_bump(50), 101, "a clock stepped back");
        let mut far = Watermarks::load(
            MembersFile {
                bump: 10 * FUTURE_BUMP_MS,
                ..Default::default()
            },
            0,
            1,
            1,
        );
        assert_eq!(far.next_bump(5), 5);
    }

    #[test]
    fn a_long_stop_of_our_own_refreshes_every_member() {
        let mut file = MembersFile::default();
        file.members.insert(
            "a".into(),
            Member {
                watermark: 1,
                last_seen_ms: 10,
                addrs: vec![],
                proven_at_ms: 10,
            },
        );
        file.alive_ms = 10;
        let w = Watermarks::load(file, 10_000, 100, 100);
        assert!(!w.expired("a", 10_000));
    }
}
