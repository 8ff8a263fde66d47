//! Checkers, Jepsen/Maelstrom style, over what the simulator recorded:
//! every acknowledged write, when each node first held it (or something
//! newer), and the nodes' final stores.
//!
//! - lost write: an acknowledged write missing from a node after
//!   convergence and not superseded by a newer version of its key (a newer
//!   tombstone since purged counts as superseding);
//! - resurrected delete: an acknowledged delete, and a node that ends up
//!   holding an older live version of its key;
//! - divergence: running nodes whose roots differ at the end.

use serde::Serialize;
use std::collections::BTreeMap;

use syncnode_protocol::memory::MemoryStore;
use syncnode_protocol::wire::Entry;

/// One acknowledged write.
#[derive(Debug, Clone)]
struct Write {
    node: usize,
    entry: Entry,
    at_us: u64,
    /// When each node first held it or a newer version (µs after the ack).
    visible: Vec<Option<u64>>,
}

/// What the run recorded.
#[derive(Debug, Clone, Default)]
pub struct History {
    nodes: usize,
    writes: Vec<Write>,
    /// Writes of each key not yet seen by every node.
    open: BTreeMap<String, Vec<usize>>,
    /// Writes nobody could take (every node down) or a fenced node refused.
    pub unavailable: u64,
    pub fenced: u64,
    /// When the final settle began (µs): visibility is measured before it.
    pub settle_from: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Violation {
    pub kind: String,
    pub node: String,
    pub key: String,
    pub detail: String,
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
        Self {
            count: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: *v.last().expect("not empty"),
        }
    }
}

impl History {
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            ..Default::default()
        }
    }

    pub fn acked(&mut self, node: usize, entry: &Entry, at_us: u64) {
        let mut visible = vec![None; self.nodes];
        visible[node] = Some(0);
        self.open.entry(entry.id.clone()).or_default().push(self.writes.len());
        self.writes.push(Write {
            node,
            entry: entry.clone(),
            at_us,
            visible,
        });
    }

    /// Node `node` stored `e` at `now_us`: every write of that key it
    /// supersedes or equals is now visible there.
    pub fn stored(&mut self, node: usize, e: &Entry, now_us: u64) {
        let Some(open) = self.open.get_mut(&e.id) else { return };
        let writes = &mut self.writes;
        open.retain(|&w| {
            let wr = &mut writes[w];
            if wr.visible[node].is_none() && (e == &wr.entry || e.newer_than(&wr.entry)) {
                wr.visible[node] = Some(now_us.saturating_sub(wr.at_us));
            }
            wr.visible.iter().any(Option::is_none)
        });
    }

    pub fn acked_writes(&self) -> usize {
        self.writes.len()
    }

    /// Visibility latency (ms) of writes acknowledged before the settle, on
    /// every node but their own; and how many (write, node) pairs never saw
    /// them before the settle.
    pub fn visibility(&self) -> (Spread, u64) {
        let seen = self.visibility_samples();
        let pairs: usize = self
            .writes
            .iter()
            .filter(|w| w.at_us < self.settle_from)
            .map(|_| self.nodes.saturating_sub(1))
            .sum();
        let unseen = (pairs - seen.len()) as u64;
        (Spread::of(seen), unseen)
    }

    /// Every visibility latency (ms) the spread is made of (for the CDF).
    pub fn visibility_samples(&self) -> Vec<f64> {
        let mut v = Vec::new();
        for w in self.writes.iter().filter(|w| w.at_us < self.settle_from) {
            for (n, seen) in w.visible.iter().enumerate() {
                if let Some(us) = seen
                    && n != w.node
                    && w.at_us + us <= self.settle_from
                {
                    v.push(*us as f64 / 1000.0);
                }
            }
        }
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    /// The slowest (write, node) pair seen before the settle, for the report.
    pub fn slowest(&self) -> Option<String> {
        let mut worst: Option<(u64, &Write, usize)> = None;
        for w in self.writes.iter().filter(|w| w.at_us < self.settle_from) {
            for (n, seen) in w.visible.iter().enumerate() {
                if let Some(us) = seen
                    && n != w.node
                    && w.at_us + us <= self.settle_from
                    && worst.is_none_or(|(u, _, _)| *us > u)
                {
                    worst = Some((*us, w, n));
                }
            }
        }
        worst.map(|(us, w, n)| {
            format!(
                "{} v{} written on n{} at {:.3} s reached n{n} after {:.1} ms",
                w.entry.id,
                w.entry.version,
                w.node,
                w.at_us as f64 / 1e6,
                us as f64 / 1000.0
            )
        })
    }

    /// Checks the final stores against every acknowledged write.
    pub fn check<S: std::ops::Deref<Target = MemoryStore>>(&self, finals: &[(usize, S)]) -> Vec<Violation> {
        let mut out = Vec::new();
        // A delete purged on some node: whoever holds nothing of its key
        // has it (deleted, then purged before this node saw the tombstone).
        let purged_beats = |w: &Write, store: &MemoryStore| {
            store
                .purged
                .get(&w.entry.id)
                .is_some_and(|p| (p.version, p.origin.as_bytes()) >= (w.entry.version, w.entry.origin.as_bytes()))
        };
        for (n, store) in finals {
            for w in &self.writes {
                let held = store.items.get(&w.entry.id).map(|i| &i.entry);
                let superseded = held.is_some_and(|h| h == &w.entry || h.newer_than(&w.entry))
                    || purged_beats(w, store)
                    || (held.is_none() && finals.iter().any(|(_, other)| purged_beats(w, other)));
                if superseded {
                    continue;
                }
                let kind = if w.entry.tombstone && held.is_some_and(|h| !h.tombstone) {
                    "resurrected_delete"
                } else {
                    "lost_write"
                };
                out.push(Violation {
                    kind: kind.into(),
                    node: format!("n{n}"),
                    key: w.entry.id.clone(),
                    detail: format!(
                        "acked v{} by n{} at {:.3} s; holds {}",
                        w.entry.version,
                        w.node,
                        w.at_us as f64 / 1e6,
                        held.map_or("nothing".to_string(), |h| format!(
                            "v{} by {}{}",
                            h.version,
                            h.origin,
                            if h.tombstone { " (deleted)" } else { "" }
                        ))
                    ),
                });
            }
        }
        let roots: BTreeMap<Option<[u8; 32]>, Vec<usize>> = finals.iter().fold(BTreeMap::new(), |mut m, (n, s)| {
            m.entry(s.tree.root_hash()).or_insert_with(Vec::new).push(*n);
            m
        });
        if roots.len() > 1 {
            // What the first two groups disagree on, for the report.
            let firsts: Vec<&MemoryStore> = roots
                .values()
                .take(2)
                .filter_map(|g| finals.iter().find(|(n, _)| *n == g[0]).map(|(_, s)| &**s))
                .collect();
            let show = |e: Option<&Entry>| {
                e.map_or("nothing".to_string(), |e| {
                    format!(
                        "v{} by {}{}",
                        e.version,
                        e.origin,
                        if e.tombstone { " (deleted)" } else { "" }
                    )
                })
            };
            let mut differing = Vec::new();
            if let [a, b] = firsts[..] {
                let keys: std::collections::BTreeSet<&String> = a.items.keys().chain(b.items.keys()).collect();
                for k in keys {
                    let (x, y) = (a.items.get(k).map(|i| &i.entry), b.items.get(k).map(|i| &i.entry));
                    if x != y && differing.len() < 5 {
                        differing.push(format!("{k}: {} vs {}", show(x), show(y)));
                    }
                }
            }
            out.push(Violation {
                kind: "divergence".into(),
                node: String::new(),
                key: String::new(),
                detail: format!(
                    "{} different roots at the end: {:?}; first differences: {}",
                    roots.len(),
                    roots.values().collect::<Vec<_>>(),
                    differing.join("; ")
                ),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncnode_protocol::memory::sample_item;

    #[test]
    fn a_missing_write_and_an_undone_delete_are_caught() {
        let mut h = History::new(2);
        let w = sample_item("a", 5, "n0", false);
        let d = sample_item("b", 9, "n0", true);
        h.acked(0, &w.entry, 10);
        h.acked(0, &d.entry, 20);
        let mut s0 = MemoryStore::new(2);
        s0.put(w.clone());
        s0.put(d.clone());
        let mut s1 = MemoryStore::new(2);
        s1.put(sample_item("b", 3, "n1", false));
        let v = h.check(&[(0, &s0), (1, &s1)]);
        let kinds: Vec<&str> = v.iter().map(|v| v.kind.as_str()).collect();
        assert_eq!(kinds, vec!["lost_write", "resurrected_delete", "divergence"]);
        // A newer version supersedes; nothing is reported for n0.
        assert!(h.check(&[(0, &s0)]).is_empty());
    }

    #[test]
    fn visibility_counts_newer_versions() {
        let mut h = History::new(2);
        let old = sample_item("a", 5, "n0", false);
        h.acked(0, &old.entry, 1_000);
        h.settle_from = u64::MAX;
        h.stored(1, &sample_item("a", 7, "n1", false).entry, 3_000);
        let (s, unseen) = h.visibility();
        assert_eq!((s.count, s.max, unseen), (1, 2.0, 0));
    }
}
