//! The last-writer-wins order. Every node compares versions of one object the
//! same way, so concurrent writes resolve to the same winner everywhere:
//! greatest `version` (HLC) first, then greatest `origin`, then greatest content
//! hash, a total order with no ties between different writes.

use std::cmp::Ordering;

/// What decides which of two versions of one object wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub version: u64,
    pub origin: &'a str,
    /// Lowercase hex SHA-256 of the content (hex order equals byte order).
    pub content_hash: &'a str,
}

impl Ord for Stamp<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.version, self.origin.as_bytes(), self.content_hash.as_bytes()).cmp(&(
            other.version,
            other.origin.as_bytes(),
            other.content_hash.as_bytes(),
        ))
    }
}

impl PartialOrd for Stamp<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<'a> Stamp<'a> {
    pub fn new(version: u64, origin: &'a str, content_hash: &'a str) -> Self {
        Self {
            version,
            origin,
            content_hash,
        }
    }

    /// True when `self` should replace `current`.
    pub fn wins_over(&self, current: &Stamp<'_>) -> bool {
        self.cmp(current) == Ordering::Greater
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn version_then_origin_then_hash() {
        assert!(Stamp::new(2, "a", "00").wins_over(&Stamp::new(1, "z", "ff")));
        assert!(Stamp::new(1, "b", "00").wins_over(&Stamp::new(1, "a", "ff")));
        assert!(Stamp::new(1, "a", "01").wins_over(&Stamp::new(1, "a", "00")));
        assert!(!Stamp::new(1, "a", "00").wins_over(&Stamp::new(1, "a", "00")));
    }

    fn winner<'a>(order: impl Iterator<Item = &'a Stamp<'a>>) -> Option<Stamp<'a>> {
        let mut cur: Option<Stamp> = None;
        for s in order {
            if cur.is_none_or(|c| s.wins_over(&c)) {
                cur = Some(*s);
            }
        }
        cur
    }

    proptest! {
        #[test]
        fn the_winner_does_not_depend_on_arrival_order(
            writes in proptest::collection::vec((0u64..5, "[a-c]", "[0-9a-f]{2}"), 1..20)
        ) {
            let stamps: Vec<Stamp> = writes.iter().map(|(v, o, h)| Stamp::new(*v, o, h)).collect();
            prop_assert_eq!(winner(stamps.iter()), winner(stamps.iter().rev()));
        }
    }
}
