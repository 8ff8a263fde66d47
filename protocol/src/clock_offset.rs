//! Clock offsets between members, measured from membership traffic the way
//! NTP does: every membership packet is answered at once with the time it
//! arrived and the time the answer left, so the sender has four timestamps
//! (t1 sent, t2 arrived there, t3 left there, t4 back here) and
//!
//! ```text
//! offset = ((t2 - t1) + (t3 - t4)) / 2      (their clock minus ours)
//! rtt    = (t4 - t1) - (t3 - t2)            (the error is at most rtt / 2)
//! ```
//!
//! Of the last few samples per peer the one with the smallest round trip
//! is kept (NTP's clock filter): queueing only ever adds delay, so the
//! fastest exchange is the most symmetric one.

use std::collections::{BTreeMap, VecDeque};

/// Samples kept per peer.
const WINDOW: usize = 8;

/// One exchange: `(offset_ms, rtt_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Their clock minus ours, ms.
    pub offset_ms: i64,
    pub rtt_ms: u64,
}

impl Sample {
    /// The sample of one exchange, or `None` when the timestamps are
    /// impossible (an answer that left before the question arrived).
    pub fn of(t1: u64, t2: u64, t3: u64, t4: u64) -> Option<Sample> {
        let (t1, t2, t3, t4) = (t1 as i128, t2 as i128, t3 as i128, t4 as i128);
        let rtt = (t4 - t1) - (t3 - t2);
        if t3 < t2 || t4 < t1 || rtt < 0 {
            return None;
        }
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        Some(Sample {
            offset_ms: offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            rtt_ms: rtt as u64,
        })
    }
}

/// Offsets of every peer measured so far.
#[derive(Debug, Default, Clone)]
pub struct ClockOffsets {
    samples: BTreeMap<String, VecDeque<Sample>>,
}

impl ClockOffsets {
    pub fn record(&mut self, peer: &str, s: Sample) {
        let q = self.samples.entry(peer.to_string()).or_default();
        if q.len() == WINDOW {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// The best estimate for `peer`: the sample with the smallest round trip.
    pub fn estimate(&self, peer: &str) -> Option<Sample> {
        self.samples.get(peer)?.iter().min_by_key(|s| s.rtt_ms).copied()
    }

    pub fn remove(&mut self, peer: &str) {
        self.samples.remove(peer);
    }

    /// Keeps only the peers `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.samples.retain(|p, _| keep(p));
    }

    /// Whether our clock is ahead of a majority of the live members (`live`
    /// and ourselves) by more than `max_skew_ms` (their offset below
    /// `-max_skew_ms`): then our writes would win conflicts they should
    /// lose. We count in the whole, so in a pair neither side is fenced (who
    /// is right cannot be told). Peers not measured yet count as not
    /// behind, so a node alone or just started never refuses.
    pub fn ahead_of_majority<'a>(&self, live: impl IntoIterator<Item = &'a str>, max_skew_ms: u64) -> bool {
        let (mut n, mut behind) = (1usize, 0usize);
        for p in live {
            n += 1;
            if self.estimate(p).is_some_and(|s| s.offset_ms < -(max_skew_ms as i64)) {
                behind += 1;
            }
        }
        behind * 2 > n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_exchange_finds_the_offset() {
        // Their clock is 5000 ms ahead; 10 ms each way; 2 ms to answer.
        let s = Sample::of(1_000, 6_010, 6_012, 1_022).unwrap();
        assert_eq!(
            s,
            Sample {
                offset_ms: 5_000,
                rtt_ms: 20
            }
        );
        assert!(Sample::of(1_000, 6_010, 6_000, 1_022).is_none());
    }

    #[test]
    fn the_fastest_sample_wins_and_majority_decides() {
        let mut c = ClockOffsets::default();
        c.record(
            "a",
            Sample {
                offset_ms: -5_200,
                rtt_ms: 40,
            },
        );
        c.record(
            "a",
            Sample {
                offset_ms: -5_010,
                rtt_ms: 2,
            },
        );
        c.record(
            "b",
            Sample {
                offset_ms: -5_000,
                rtt_ms: 3,
            },
        );
        c.record(
            "c",
            Sample {
                offset_ms: 10,
                rtt_ms: 3,
            },
        );
        assert_eq!(c.estimate("a").unwrap().offset_ms, -5_010);
        // Of us, a and b, two are behind: we are ahead of the majority.
        assert!(c.ahead_of_majority(["a", "b"], 500));
        // Of us, a, b and c, two are behind: half is not a majority.
        assert!(!c.ahead_of_majority(["a", "b", "c"], 500));
        assert!(!c.ahead_of_majority(["a", "c", "d"], 500));
        assert!(!c.ahead_of_majority(["a"], 500), "a pair cannot tell who is right");
        assert!(!c.ahead_of_majority([], 500));
    }
}
