//! The simulator's own guarantees: a seed replays a run bit for bit, every
//! shipped scenario parses, and the seeds that once found bugs in the core
//! stay fixed.

use std::path::Path;

use syncnode_sim::explore;
use syncnode_sim::report::run;
use syncnode_sim::scenario::Scenario;

fn shipped(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"));
    Scenario::parse(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
    let sc = shipped("split-brain");
    let a = run(&sc, 7, |_| {});
    let b = run(&sc, 7, |_| {});
    let c = run(&sc, 8, |_| {});
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(
        (a.events, a.acked_writes, a.messages_per_write, a.visibility_ms.p99),
        (b.events, b.acked_writes, b.messages_per_write, b.visibility_ms.p99)
    );
    assert_ne!(a.trace_hash, c.trace_hash);
    assert!(a.acked_writes > 100, "the workload ran: {}", a.acked_writes);
}

#[test]
fn every_shipped_scenario_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".toml") {
            let sc = shipped(stem);
            assert_eq!(sc.name, stem, "a scenario is named after its file");
            n += 1;
        }
    }
    assert!(n >= 10, "{n} scenarios");
}

/// Tombstones purged at different times on different nodes: each node
/// stored the others' purged tombstone again and waited on roots that could
/// never agree (a livelock). Fixed in the core: a purged tombstone is not
/// stored again, and a finished session proves the peer's watermark.
#[test]
fn regression_member_away_seed_1() {
    let r = run(&shipped("member-away"), 1, |_| {});
    assert!(r.converged && r.violations.is_empty(), "{}", r.summary());
    assert!(r.counters["tombstones_purged"] > 0, "purges ran");
    assert!(r.counters["resurrections_refused"] > 0, "stale copies met the ledger");
}

/// A session proved a watermark equal to the last version both held, so
/// that version's tombstone stayed below nobody's bound and never purged.
#[test]
fn regression_explore_seed_38() {
    let r = run(&explore::scenario(38), 38, |_| {});
    assert!(r.converged && r.violations.is_empty(), "{}", r.summary());
}

/// A node that joined an empty cluster ignored every CDC delta until its
/// first anti-entropy session, which waited for roots to differ (seed 1);
/// two writers stamped one key with the same version, and a relay that
/// remembered versions without their origin passed on only the first, the
/// loser (seed 3).
#[test]
fn regression_deltas_reach_everyone_within_the_latency_bound() {
    for seed in [1, 3] {
        let r = run(&shipped("dissemination-25"), seed, |_| {});
        assert!(r.violations.is_empty(), "{}", r.summary());
        assert!(
            r.visibility_ms.max < 600.0,
            "{}: {:?}",
            r.summary(),
            r.visibility_slowest
        );
    }
}
