//! Random fault schedules: from one seed, a 5-node cluster in three
//! regions with a write workload and 3–8 faults drawn at random
//! (partitions, one-way cuts, flaps, crashes and restarts, clock offsets
//! within `max_clock_skew`, late joins). The same seed gives the same
//! schedule, so `syncsim explore --seed S` replays a failure.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::scenario::{Fault, FaultKind, Region, ReplicaSettings, Scenario, Workload};

pub fn scenario(seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xe7_9101e);
    let n = 5;
    let duration_s = 40.0;
    let mut faults = Vec::new();
    for _ in 0..rng.random_range(3..=8) {
        let at_s = rng.random_range(2.0..duration_s - 2.0);
        let kind = match rng.random_range(0..7) {
            0 => {
                let mut side: Vec<usize> = (0..n).filter(|_| rng.random_bool(0.5)).collect();
                if side.is_empty() {
                    side.push(0);
                }
                let rest: Vec<usize> = (0..n).filter(|i| !side.contains(i)).collect();
                FaultKind::Partition {
                    groups: vec![side, rest],
                }
            }
            1 => FaultKind::OneWay {
                from: vec![rng.random_range(0..n)],
                to: vec![rng.random_range(0..n)],
            },
            2 => FaultKind::Heal,
            3 => {
                let a = rng.random_range(0..n);
                FaultKind::Flap {
                    a,
                    b: (a + 1 + rng.random_range(0..n - 1)) % n,
                    period_ms: rng.random_range(200..3_000),
                    until_s: at_s + rng.random_range(1.0..10.0),
                }
            }
            4 => FaultKind::Crash {
                node: rng.random_range(0..n),
            },
            5 => FaultKind::Restart {
                node: rng.random_range(0..n),
            },
            _ => FaultKind::Clock {
                node: rng.random_range(0..n),
                offset_ms: rng.random_range(-400..400),
                drift_ppm: rng.random_range(-200..200),
            },
        };
        faults.push(Fault { at_s, kind });
    }
    faults.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    Scenario {
        name: "explore".into(),
        description: format!("random fault schedule {seed}"),
        duration_s,
        settle_s: 60.0,
        regions: vec![
            Region {
                name: "eu".into(),
                nodes: 2,
            },
            Region {
                name: "us".into(),
                nodes: 2,
            },
            Region {
                name: "ap".into(),
                nodes: 1,
            },
        ],
        latency: Default::default(),
        link: crate::scenario::LinkFaults {
            loss: rng.random_range(0.0..0.02),
            duplicate: rng.random_range(0.0..0.01),
            reorder: rng.random_range(0.0..0.02),
            reorder_ms: 50.0,
            bandwidth_bytes_per_s: 0.0,
        },
        workload: Workload {
            writes_per_s: 30.0,
            overwrite: 0.4,
            delete: 0.2,
            key_distribution: "zipf".into(),
            value_bytes_max: 128,
            ..Default::default()
        },
        replica: ReplicaSettings {
            gossip_interval_ms: 250,
            anti_entropy_interval_ms: 500,
            request_timeout_ms: 5_000,
            // Purges run during the run, so deletes meet the ledger.
            tombstone_grace_ms: 5_000,
            probe_interval_ms: 250,
            connection_timeout_ms: 3_000,
            storage_ms: rng.random_range(0.0..30.0),
            ..Default::default()
        },
        faults,
        goals: Default::default(),
    }
}
