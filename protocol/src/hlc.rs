//! Hybrid logical clock.
//!
//! A version is a `u64`: the upper 48 bits are wall-clock milliseconds, the lower
//! 16 a logical counter. Local events take `max(last + 1, wall)`; a received
//! version moves the clock forward so that every later local version is greater
//! than anything this node has seen. A remote version too far ahead of our wall
//! clock is *deferred*: the caller neither applies nor drops it, and anti-entropy
//! offers it again once our clock has caught up.

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 16;

/// The wall-clock milliseconds inside a version.
pub fn physical_ms(version: u64) -> u64 {
    version >> LOGICAL_BITS
}

/// The smallest version stamped at `wall_ms`.
pub fn from_physical(wall_ms: u64) -> u64 {
    wall_ms << LOGICAL_BITS
}

/// A remote version is further ahead of the local wall clock than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("remote version is {ahead_ms} ms ahead of the local clock (max skew {max_skew_ms} ms)")]
pub struct ClockSkew {
    pub ahead_ms: u64,
    pub max_skew_ms: u64,
}

/// The clock state. Time is passed in, never read here.
#[derive(Debug, Clone, Default)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A clock that will never stamp a version at or below `floor`
    /// (e.g. the greatest version already stored).
    pub fn new(floor: u64) -> Self {
        Self { last: floor }
    }

    /// The last version stamped or observed.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Stamp a local event.
    pub fn now(&mut self, wall_ms: u64) -> u64 {
        self.last = (self.last + 1).max(from_physical(wall_ms));
        self.last
    }

    /// Take in a remote version. Errors (and leaves the clock as it was) when the
    /// version is more than `max_skew_ms` ahead of `wall_ms`.
    pub fn observe(&mut self, remote: u64, wall_ms: u64, max_skew_ms: u64) -> Result<(), ClockSkew> {
        let remote_ms = physical_ms(remote);
        if remote_ms > wall_ms.saturating_add(max_skew_ms) {
            return Err(ClockSkew {
                ahead_ms: remote_ms - wall_ms,
                max_skew_ms,
            });
        }
        self.last = self.last.max(remote);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn local_versions_are_strictly_increasing_even_when_the_wall_clock_stalls() {
        let mut c = Hlc::default();
        let a = c.now(1000);
        let b = c.now(1000);
        let d = c.now(999);
        assert!(a < b && b < d);
        assert_eq!(physical_ms(a), 1000);
    }

    #[test]
    fn observed_versions_push_later_local_versions_past_them() {
        let mut c = Hlc::default();
        let remote = from_physical(1200) + 7;
        c.observe(remote, 1000, 500).unwrap();
        assert!(c.now(1000) > remote);
    }

    #[test]
    fn versions_too_far_ahead_are_deferred_and_leave_the_clock_alone() {
        let mut c = Hlc::new(from_physical(1000));
        let err = c.observe(from_physical(1501), 1000, 500).unwrap_err();
        assert_eq!(err.ahead_ms, 501);
        assert_eq!(c.last(), from_physical(1000));
        assert!(c.observe(from_physical(1500), 1000, 500).is_ok());
    }

    proptest! {
        #[test]
        fn every_stamp_exceeds_everything_seen(events in proptest::collection::vec((any::<bool>(), 0u64..10_000, 0u64..10_000), 1..200)) {
            let mut c = Hlc::default();
            let mut seen = 0u64;
            for (local, wall, remote_ms) in events {
                if local {
                    let v = c.now(wall);
                    prop_assert!(v > seen);
                    seen = v;
                } else if c.observe(from_physical(remote_ms), wall, 500).is_ok() {
                    seen = seen.max(from_physical(remote_ms));
                }
            }
        }
    }
}
