//! What a run reports: the summary on stdout (with `bench=sim_…` lines), a
//! JSON report, and SVG plots (divergent nodes and bytes per second over
//! time, the visibility-latency CDF).

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

use crate::check::{Spread, Violation};
use crate::scenario::Scenario;
use crate::sim::Sim;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: usize,
    pub simulated_s: f64,
    /// Building the cluster (preloaded items) and checking it, seconds.
    pub setup_s: f64,
    /// Running the events, seconds.
    pub wall_s: f64,
    /// Simulated seconds per wall second of running.
    pub speed: f64,
    pub events: u64,
    pub trace_hash: String,
    pub converged: bool,
    pub violations: Vec<Violation>,
    pub acked_writes: usize,
    pub writes_unavailable: u64,
    pub writes_fenced: u64,
    /// Visibility latency of a write on the other nodes (ms).
    pub visibility_ms: Spread,
    pub visibility_unseen: u64,
    /// The slowest write to reach a node, and where.
    pub visibility_slowest: Option<String>,
    /// Per heal: time until each node held the root all agreed on (ms).
    pub heal_to_equal_ms: Spread,
    /// Messages of every kind sent while the workload ran, per write.
    pub messages_per_write: f64,
    /// The same over the whole run (joins and the final settle too).
    pub messages_per_write_run: f64,
    pub cdc_messages_per_write: f64,
    pub bytes_per_write: f64,
    /// Bytes that crossed region boundaries while writes ran, per byte of
    /// the writes' CDC deltas.
    pub wan_bytes_per_delta_byte: f64,
    /// The same in a run of the same seed with regions ignored (when the
    /// scenario has the goal).
    pub wan_bytes_per_delta_byte_baseline: Option<f64>,
    /// WAN bytes from each heal until the roots agreed, per byte of the
    /// deltas written while links were cut.
    pub recovery_wan_bytes_per_delta_byte: f64,
    pub traffic: crate::sim::Traffic,
    pub counters: BTreeMap<String, u64>,
    /// (seconds, divergent nodes, bytes in the 100 ms before).
    #[serde(skip)]
    pub series: Vec<(f64, usize, u64)>,
    #[serde(skip)]
    pub visibility_samples: Vec<f64>,
}

impl Report {
    pub fn failed(&self) -> bool {
        !self.violations.is_empty() || !self.converged
    }

    /// The summary, ending in one bench line per figure.
    pub fn summary(&self) -> String {
        let name = format!("sim_{}", self.scenario.replace('-', "_"));
        let mut s = format!(
            "scenario {} seed {}: {} nodes, {:.1} s simulated in {:.2} s ({:.0}x; setup and checks {:.2} s), {} events, trace {}\n",
            self.scenario,
            self.seed,
            self.nodes,
            self.simulated_s,
            self.wall_s,
            self.speed,
            self.setup_s,
            self.events,
            &self.trace_hash[..16]
        );
        if self.traffic.wan_bytes > 0 {
            let kinds: Vec<String> = self
                .traffic
                .wan_bytes_by_kind
                .iter()
                .map(|(k, b)| format!("{k} {b}"))
                .collect();
            s += &format!("  WAN bytes {} ({})\n", self.traffic.wan_bytes, kinds.join(", "));
        }
        s += &format!(
            "  writes acked {}, unavailable {}, fenced {}; converged {}; violations {}\n",
            self.acked_writes,
            self.writes_unavailable,
            self.writes_fenced,
            self.converged,
            self.violations.len()
        );
        for v in self.violations.iter().take(10) {
            s += &format!("  VIOLATION {} {} {}: {}\n", v.kind, v.node, v.key, v.detail);
        }
        let v = &self.visibility_ms;
        let h = &self.heal_to_equal_ms;
        let lines: Vec<(&str, f64, &str)> = vec![
            ("lost_writes", self.count("lost_write"), "writes"),
            ("resurrected_deletes", self.count("resurrected_delete"), "deletes"),
            ("divergent_at_end", self.count("divergence"), "runs"),
            ("visibility_p50", v.p50, "ms"),
            ("visibility_p99", v.p99, "ms"),
            ("visibility_max", v.max, "ms"),
            ("heal_to_equal_p50", h.p50, "ms"),
            ("heal_to_equal_p99", h.p99, "ms"),
            ("heal_to_equal_max", h.max, "ms"),
            ("messages_per_write", self.messages_per_write, "messages"),
            ("messages_per_write_run", self.messages_per_write_run, "messages"),
            ("cdc_messages_per_write", self.cdc_messages_per_write, "messages"),
            ("bytes_per_write", self.bytes_per_write, "bytes"),
            ("wan_bytes_per_delta_byte", self.wan_bytes_per_delta_byte, "x"),
            (
                "recovery_wan_bytes_per_delta_byte",
                self.recovery_wan_bytes_per_delta_byte,
                "x",
            ),
            ("speed", self.speed, "x_real_time"),
        ];
        for (metric, value, unit) in lines {
            s += &format!("bench={name} metric={metric} value={value:.3} unit={unit}\n");
        }
        if let Some(base) = self.wan_bytes_per_delta_byte_baseline {
            s += &format!(
                "bench={name} metric=wan_bytes_per_delta_byte_regions_ignored value={base:.3} unit=x\nbench={name} metric=wan_bytes_ratio_to_regions_ignored value={:.3} unit=x\n",
                self.wan_bytes_per_delta_byte / base.max(1e-9)
            );
        }
        s
    }

    fn count(&self, kind: &str) -> f64 {
        self.violations.iter().filter(|v| v.kind == kind).count() as f64
    }
}

/// Runs `sc` with `seed`; `progress` sees the fraction done.
pub fn run(sc: &Scenario, seed: u64, progress: impl FnMut(f64)) -> Report {
    let started = Instant::now();
    let mut sim = Sim::new(sc.clone(), seed);
    let running = Instant::now();
    let converged = sim.run(progress);
    let wall_s = running.elapsed().as_secs_f64();
    let violations = {
        let finals = sim.final_states();
        sim.history.check(&finals)
    };
    let (visibility_ms, visibility_unseen) = sim.history.visibility();
    let setup_s = started.elapsed().as_secs_f64() - wall_s;
    let acked = sim.history.acked_writes();
    let per_write = |n: u64| if acked == 0 { 0.0 } else { n as f64 / acked as f64 };
    let messages: u64 = sim.traffic.messages.values().sum();
    let bytes: u64 = sim.traffic.bytes.values().sum();
    let cdc = sim.traffic.messages.get("cdc").copied().unwrap_or(0);
    let simulated_s = sim.end_us as f64 / 1e6;
    let mut counters: BTreeMap<String, u64> = sim
        .replication_counters()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let (refused, deferred) = sim.store_counters();
    counters.insert("resurrections_refused".into(), refused);
    counters.insert("versions_deferred_for_skew".into(), deferred);
    Report {
        scenario: sc.name.clone(),
        seed,
        nodes: sim.node_count(),
        simulated_s,
        setup_s,
        wall_s,
        speed: simulated_s / wall_s.max(1e-9),
        events: sim.events_processed,
        trace_hash: sim.trace_hash(),
        converged,
        violations,
        acked_writes: acked,
        writes_unavailable: sim.history.unavailable,
        writes_fenced: sim.history.fenced,
        visibility_samples: sim.history.visibility_samples(),
        visibility_ms,
        visibility_unseen,
        visibility_slowest: sim.history.slowest(),
        heal_to_equal_ms: Spread::of(sim.heal_to_equal_ms.iter().flatten().copied().collect()),
        messages_per_write: per_write(
            sim.messages_at_last_write
                .unwrap_or(messages)
                .saturating_sub(sim.messages_at_first_write.unwrap_or(0)),
        ),
        messages_per_write_run: per_write(messages),
        cdc_messages_per_write: per_write(cdc),
        bytes_per_write: per_write(bytes),
        wan_bytes_per_delta_byte: sim
            .wan_at_last_write
            .unwrap_or(sim.traffic.wan_bytes)
            .saturating_sub(sim.wan_at_first_write.unwrap_or(0)) as f64
            / sim.delta_bytes.max(1) as f64,
        recovery_wan_bytes_per_delta_byte: match sim.delta_bytes_during_cuts {
            0 => 0.0,
            cut => sim.recovery_wan_bytes as f64 / cut as f64,
        },
        wan_bytes_per_delta_byte_baseline: sc.goals.wan_bytes_per_delta_byte.is_some().then(|| {
            let mut base = sc.clone();
            base.replica.ignore_regions = true;
            base.goals.wan_bytes_per_delta_byte = None;
            // A fn pointer, so the nested run is the same instantiation.
            run(&base, seed, (|_| {}) as fn(f64)).wan_bytes_per_delta_byte
        }),
        traffic: sim.traffic.clone(),
        counters,
        series: sim.series.clone(),
    }
}
