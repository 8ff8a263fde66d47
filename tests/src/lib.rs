//! Process-level tests live in tests/tests.
