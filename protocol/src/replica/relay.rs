//! Where a CDC delta goes next (DESIGN §5.3, §5.7): along a tree over the
//! members of each region, and from each region's hub to the other
//! regions' hubs, so a write crosses each region boundary once and every
//! node receives it once.
//!
//! Inside a region the members, sorted by peer id, form a tree of fanout
//! `FANOUT` rooted at the first (the region's hub); a node passes a delta
//! to its tree neighbours but the one it came from. Up to `FANOUT + 1`
//! members the tree is a star: two hops between any two members. The hub
//! also passes what came from inside its region to every other region's
//! hub, which spreads it in its own tree. Nodes batch what they pass on
//! (`cdc_batch_ms`), so one message carries the deltas of many writers —
//! what keeps messages per write low. Views of the membership that differ
//! for a moment can lose a delta or send it twice: a delta already held is
//! not passed on, and anti-entropy brings what is lost.

use std::collections::BTreeMap;

use crate::membership::MemberId;

/// Children per node of a region's tree.
pub const FANOUT: usize = 32;

/// The peers `me` passes a delta to: it came from `from` (`None`: written
/// here). `members`: the live members besides `me`.
pub fn next_hops(me: &MemberId, members: &[MemberId], from: Option<&str>) -> Vec<String> {
    let mut regions: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    regions.entry(&me.region).or_default().push(&me.peer);
    for m in members.iter().filter(|m| m.peer != me.peer) {
        regions.entry(&m.region).or_default().push(&m.peer);
    }
    for list in regions.values_mut() {
        list.sort_unstable();
        list.dedup();
    }
    let local = &regions[me.region.as_str()];
    let i = local.iter().position(|p| *p == me.peer).unwrap_or(0);
    let mut out: Vec<&str> = Vec::new();
    if i > 0 {
        out.push(local[(i - 1) / FANOUT]);
    }
    out.extend(local.iter().skip(i * FANOUT + 1).take(FANOUT));
    let from_inside = from.is_none_or(|f| local.contains(&f));
    if i == 0 && from_inside {
        for (region, list) in &regions {
            if *region != me.region {
                out.push(list[0]);
            }
        }
    }
    out.into_iter()
        .filter(|p| Some(*p) != from && *p != me.peer)
        .map(str::to_string)
        .collect()
}

/// Each region's hub (its first member by peer id), `me` included: the
/// relays between regions, and the only members that run anti-entropy
/// sessions across a region boundary as a rule.
pub fn hubs(me: &MemberId, members: &[MemberId]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for m in std::iter::once(me).chain(members) {
        let hub = out.entry(m.region.clone()).or_insert_with(|| m.peer.clone());
        if m.peer < *hub {
            *hub = m.peer.clone();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, VecDeque};

    fn member(peer: &str, region: &str) -> MemberId {
        MemberId {
            peer: peer.into(),
            addrs: vec![],
            region: region.into(),
            bump: 0,
        }
    }

    /// Spreads a write from `origin` hop by hop; returns (nodes reached,
    /// messages, messages that crossed a region boundary).
    fn spread(all: &[MemberId], origin: usize) -> (usize, usize, usize) {
        let mut got = BTreeSet::from([all[origin].peer.clone()]);
        let mut queue = VecDeque::from([(origin, None::<String>)]);
        let (mut msgs, mut wan) = (0, 0);
        while let Some((i, from)) = queue.pop_front() {
            let others: Vec<MemberId> = all.iter().filter(|m| m.peer != all[i].peer).cloned().collect();
            for hop in next_hops(&all[i], &others, from.as_deref()) {
                msgs += 1;
                let j = all.iter().position(|m| m.peer == hop).unwrap();
                wan += (all[j].region != all[i].region) as usize;
                if got.insert(hop) {
                    queue.push_back((j, Some(all[i].peer.clone())));
                }
            }
        }
        (got.len(), msgs, wan)
    }

    #[test]
    fn every_member_gets_a_write_once_and_each_region_boundary_is_crossed_once() {
        let mut all = Vec::new();
        for (r, n) in [("eu", 5), ("us", 5), ("ap", 5)] {
            for k in 0..n {
                all.push(member(&format!("{r}{k:02}"), r));
            }
        }
        for origin in 0..all.len() {
            let (reached, msgs, wan) = spread(&all, origin);
            assert_eq!(reached, all.len(), "from {origin}");
            assert_eq!(msgs, all.len() - 1, "a tree: one message per node reached");
            assert_eq!(wan, 2, "one per remote region");
        }
    }

    #[test]
    fn a_large_region_is_a_tree_and_every_node_is_reached() {
        let all: Vec<MemberId> = (0..200).map(|k| member(&format!("n{k:03}"), "eu")).collect();
        for origin in [0, 1, 57, 199] {
            let (reached, msgs, _) = spread(&all, origin);
            assert_eq!((reached, msgs), (200, 199));
        }
    }
}
