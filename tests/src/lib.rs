//! Shared pieces of the process-level tests (the tests live in `tests/tests`).

/// Id of the `i`-th item the durability writer writes (writer 0 uses ids
/// `i + 4j`, so all four writers stay on disjoint ids).
pub fn key(i: u64) -> String {
    format!("dur.{i:08}")
}

/// Its content: distinct per item and long enough to span pages.
pub fn value(i: u64) -> Vec<u8> {
    format!("value-{i}-").repeat(40).into_bytes()
}

pub mod history;
pub mod lan;
pub mod services;
