//! Regions as this node sees them (DESIGN §5.7): the per-region view
//! `/v1/regions` shows (members alive, lag, bytes), and which members a
//! session may cross a region boundary to (hub to hub, so writes cross the
//! WAN about once per region).

use super::{Now, RegionView, Replica, relay};
use crate::membership::{MemberId, MemberState};

/// Periodic rounds a higher hub leaves a session to the lower one that keeps
/// syncing it before it starts one itself.
const MAX_DEFERRED_ROUNDS: u32 = 4;

impl Replica {
    /// Per region: members alive (SWIM), connected peers, lag and bytes.
    pub fn regions(&self, now: Now) -> Vec<RegionView> {
        let mut regions = self.peers.regions(now);
        let me = self.swim.me();
        regions.entry(me.region.clone()).or_insert_with(|| RegionView {
            region: me.region.clone(),
            ..Default::default()
        });
        let alive = self
            .swim
            .members()
            .into_iter()
            .filter(|v| v.state == MemberState::Alive)
            .map(|v| v.id.region)
            .chain(std::iter::once(me.region.clone()));
        for region in alive {
            regions
                .entry(region.clone())
                .or_insert_with(|| RegionView {
                    region,
                    ..Default::default()
                })
                .members_alive += 1;
        }
        regions.into_values().collect()
    }

    /// Sessions across a region boundary (DESIGN §5.7) run between the
    /// regions' hubs, at most one per remote region: CDC crosses once per
    /// region through them, and a session between any other pair would
    /// carry the same writes over the WAN again. A member of another region
    /// is also synced with when its purge watermark has gone unproven for
    /// half of `tombstone_grace` (so purges go on under a steady load).
    ///
    /// Of two hubs, the lower peer id starts at once (`immediate`: roots just
    /// differed): a session moves writes both ways, so two at the same time
    /// would carry them over the WAN twice. The higher one starts only at
    /// its second periodic round in a row with roots still differing, and
    /// only when the lower one has not been running a session toward it (no
    /// session request served to it in two intervals).
    ///
    /// A hub starts no cross-region session while it takes part in another
    /// (one it started, or one it served a round of in the last interval):
    /// after a region rejoins, what the first session brings in no longer
    /// differs when the next one runs, so a write crosses into a region
    /// about once, not once per remote region. Two remote hubs may still
    /// open sessions toward the same hub at the same time.
    pub(super) fn may_sync_with(&mut self, now: Now, peer: &str, immediate: bool) -> bool {
        let me = self.swim.me();
        // Members SWIM holds alive, or that we are connected to (after a
        // heal SWIM may still hold the other side down for a while).
        let reachable: Vec<MemberId> = self
            .swim
            .members()
            .into_iter()
            .filter(|v| {
                (v.state == MemberState::Alive || self.peers.is_connected(&v.id.peer))
                    && !self.peers.must_resync(&v.id.peer)
            })
            .map(|v| v.id)
            .collect();
        let Some(theirs) = reachable.iter().find(|m| m.peer == peer).map(|m| m.region.clone()) else {
            return true;
        };
        if theirs == me.region {
            return true;
        }
        // Our hub from every member we know is there. Theirs is their first
        // member by peer id, whatever SWIM holds of it now; while our links
        // into that region are young (right after a heal they come up one by
        // one, and SWIM holds the others down a while) we wait for that one,
        // since a session with another member there would carry the same
        // writes over the WAN as the hub's own. Later the first member there
        // we are connected to stands in (a hub alive but cut off from us is
        // no hub to us).
        let hubs = relay::hubs(me, &reachable);
        let usable = |p: &str| self.peers.is_connected(p) && !self.peers.banned(p);
        let first_there = self
            .swim
            .members()
            .into_iter()
            .filter(|v| {
                v.id.region == theirs && !self.peers.must_resync(&v.id.peer) && !self.peers.is_forgotten(&v.id.peer)
            })
            .map(|v| v.id.peer)
            .min();
        let links_age = reachable
            .iter()
            .filter(|m| m.region == theirs)
            .filter_map(|m| self.peers.connected_for(&m.peer, now))
            .max()
            .unwrap_or(0);
        let their_hub = match first_there.as_deref() {
            Some(h) if usable(h) => Some(h.to_string()),
            Some(_) if links_age < 3 * self.cfg.anti_entropy_interval_ms => None,
            _ => reachable
                .iter()
                .filter(|m| m.region == theirs && usable(&m.peer))
                .map(|m| m.peer.clone())
                .min(),
        };
        let their_hub = their_hub.as_deref();
        let served_lately = self
            .rounds_served
            .get(peer)
            .is_some_and(|at| now.mono_ms.saturating_sub(*at) < 2 * self.cfg.anti_entropy_interval_ms);
        let hub_pair = hubs.get(&me.region) == Some(&me.peer) && their_hub == Some(peer);
        let across = |p: &str| p != peer && reachable.iter().any(|m| m.peer == p && m.region != me.region);
        let busy_across = self.sessions.keys().any(|p| across(p))
            || self
                .rounds_served
                .iter()
                .any(|(p, at)| across(p) && now.mono_ms.saturating_sub(*at) < self.cfg.anti_entropy_interval_ms);
        // A higher hub leaves the first periodic round to the lower one (its
        // session may be on the way: a WAN round trip), then starts its own
        // when the lower one has served it no round lately. Rounds served
        // say the lower hub is at it, not that it succeeds: past
        // `MAX_DEFERRED_ROUNDS` periodic rounds it starts one in any case.
        let higher_starts = !immediate && {
            let n = self.deferred_rounds.entry(peer.to_string()).or_insert(0);
            *n += u32::from(hub_pair && me.peer.as_str() > peer);
            (*n >= 2 && !served_lately) || *n > MAX_DEFERRED_ROUNDS
        };
        let first = me.peer.as_str() < peer || higher_starts;
        let hub_to_hub = hub_pair && first && !busy_across;
        hub_to_hub
            || self
                .peers
                .watermark_older_than(peer, self.cfg.tombstone_grace_ms / 2, self.started_wall_ms, now)
    }
}
