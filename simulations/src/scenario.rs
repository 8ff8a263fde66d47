//! Scenarios: a cluster's topology, its workload and a schedule of faults,
//! read from TOML (`simulations/scenarios/*.toml`). Every field has a
//! default, so a scenario names only what it is about.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Simulated seconds of workload and faults; then the network heals,
    /// every node runs, and the cluster gets `settle_s` to converge.
    pub duration_s: f64,
    #[serde(default = "default_settle")]
    pub settle_s: f64,
    pub regions: Vec<Region>,
    #[serde(default)]
    pub latency: Latency,
    #[serde(default)]
    pub link: LinkFaults,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub replica: ReplicaSettings,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Goals the run is checked against, beyond the invariants.
    #[serde(default)]
    pub goals: Goals,
}

fn default_settle() -> f64 {
    60.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    pub nodes: usize,
}

/// One-way latency, ms: a normal distribution cut at `min_ms`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    pub intra_ms: f64,
    pub intra_jitter_ms: f64,
    pub inter_ms: f64,
    pub inter_jitter_ms: f64,
    pub min_ms: f64,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            intra_ms: 0.5,
            intra_jitter_ms: 0.1,
            inter_ms: 100.0,
            inter_jitter_ms: 20.0,
            min_ms: 0.05,
        }
    }
}

/// Per-message faults of every link, and its bandwidth.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkFaults {
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a message arrives twice.
    pub duplicate: f64,
    /// Probability a message is held back (reordered behind later ones).
    pub reorder: f64,
    /// Extra delay of a held-back message, ms.
    pub reorder_ms: f64,
    /// Bytes per second each way (0: unlimited).
    pub bandwidth_bytes_per_s: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Writes per second over the whole cluster (Poisson arrivals).
    pub writes_per_s: f64,
    /// Of the writes: share that overwrite a key written before, and share
    /// that delete one; the rest create keys.
    pub overwrite: f64,
    pub delete: f64,
    /// Keys overwrites and deletes pick from: `uniform` or `zipf`.
    pub key_distribution: String,
    pub zipf_s: f64,
    pub value_bytes_min: usize,
    pub value_bytes_max: usize,
    /// Items every node holds before the run (the same on all).
    pub preload: usize,
    pub start_s: f64,
    /// When writes stop (default: `duration_s`).
    pub stop_s: Option<f64>,
    /// Only nodes of this region take writes (default: all).
    pub region: Option<String>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            writes_per_s: 20.0,
            overwrite: 0.3,
            delete: 0.1,
            key_distribution: "uniform".into(),
            zipf_s: 1.1,
            value_bytes_min: 16,
            value_bytes_max: 256,
            preload: 0,
            start_s: 1.0,
            stop_s: None,
            region: None,
        }
    }
}

/// The replication core's settings (DESIGN §7 names and defaults, scaled
/// where a scenario needs time to pass faster).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSettings {
    pub gossip_interval_ms: u64,
    pub anti_entropy_interval_ms: u64,
    pub request_timeout_ms: u64,
    pub tombstone_grace_ms: u64,
    pub member_expiry_ms: u64,
    pub ledger_retention_ms: u64,
    pub probe_interval_ms: u64,
    pub max_clock_skew_ms: u64,
    pub cdc_batch_ms: u64,
    pub depth: u8,
    /// How long a cut link takes to drop its connection (keepalive), ms.
    pub connection_timeout_ms: u64,
    /// How soon a node redials a reachable peer, ms.
    pub redial_ms: u64,
    /// Storage work takes up to this long (uniform), ms: results come back
    /// while the network moves on, as a disk's do (0: at once).
    pub storage_ms: f64,
    /// Nodes announce no region (all "default") while the network keeps
    /// its regions' latencies: the baseline of the WAN-bytes goal.
    pub ignore_regions: bool,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            gossip_interval_ms: 1_000,
            anti_entropy_interval_ms: 1_000,
            request_timeout_ms: 30_000,
            tombstone_grace_ms: 3_600_000,
            member_expiry_ms: 7 * 86_400_000,
            ledger_retention_ms: 30 * 86_400_000,
            probe_interval_ms: 1_000,
            max_clock_skew_ms: 500,
            cdc_batch_ms: 10,
            depth: 4,
            connection_timeout_ms: 10_000,
            redial_ms: 1_000,
            storage_ms: 2.0,
            ignore_regions: false,
        }
    }
}

/// A fault at `at_s`. Nodes are numbered from 0 in region order.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "toml::Table")]
pub struct Fault {
    pub at_s: f64,
    #[serde(flatten)]
    pub kind: FaultKind,
}

/// `at_s` and the fault's own fields side by side, each field checked
/// (serde's `flatten` cannot deny unknown fields).
impl TryFrom<toml::Table> for Fault {
    type Error = String;

    fn try_from(mut t: toml::Table) -> Result<Self, String> {
        let at_s = match t.remove("at_s") {
            Some(toml::Value::Float(f)) => f,
            Some(toml::Value::Integer(i)) => i as f64,
            Some(other) => return Err(format!("fault at_s must be a number, not {other:?}")),
            None => return Err("a fault needs at_s".into()),
        };
        if !(at_s >= 0.0 && at_s.is_finite()) {
            return Err(format!("fault at_s {at_s} must be >= 0"));
        }
        let kind = FaultKind::deserialize(toml::Value::Table(t)).map_err(|e| e.to_string())?;
        Ok(Self { at_s, kind })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultKind {
    /// Cuts every link between the groups (both ways).
    Partition {
        groups: Vec<Vec<usize>>,
    },
    /// Cuts the links from `from` to `to` only.
    OneWay {
        from: Vec<usize>,
        to: Vec<usize>,
    },
    /// Cuts a region off from the others.
    RegionOutage {
        region: String,
    },
    /// Restores every link.
    Heal,
    /// Cuts and restores the link between `a` and `b` every `period_ms`
    /// until `until_s`.
    Flap {
        a: usize,
        b: usize,
        period_ms: u64,
        until_s: f64,
    },
    /// Kills a node: its memory is lost; its store and members file stay.
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    /// Sets a node's clock offset (ms) and drift (parts per million).
    Clock {
        node: usize,
        offset_ms: i64,
        drift_ppm: i64,
    },
    /// Starts a node that was not running (a node joining late).
    Join {
        node: usize,
    },
    /// Stops a node for good, as an operator removes it.
    Remove {
        node: usize,
    },
}

/// Goals checked at the end (on top of the invariants).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Goals {
    pub heal_to_equal_p99_ms: Option<f64>,
    pub visibility_p50_ms: Option<f64>,
    pub visibility_max_ms: Option<f64>,
    pub messages_per_write: Option<f64>,
    /// Bytes crossing region boundaries while writes run, per byte of the
    /// writes' CDC deltas; checked against a same-seed run with regions
    /// ignored, reported beside it.
    pub wan_bytes_per_delta_byte: Option<f64>,
    /// WAN bytes from each heal until the roots agree, per byte of the
    /// deltas written while links were cut.
    pub recovery_wan_bytes_per_delta_byte: Option<f64>,
    pub visibility_p99_ms: Option<f64>,
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Self, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.check()?;
        Ok(s)
    }

    pub fn nodes(&self) -> usize {
        self.regions.iter().map(|r| r.nodes).sum()
    }

    /// Region of each node, in node order.
    pub fn node_regions(&self) -> Vec<String> {
        self.regions
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.name.clone(), r.nodes))
            .collect()
    }

    fn check(&self) -> Result<(), String> {
        let n = self.nodes();
        if n == 0 {
            return Err("a scenario needs at least one node".into());
        }
        if n > 1000 {
            return Err(format!("{n} nodes: at most 1000"));
        }
        if !(self.duration_s > 0.0 && self.duration_s <= 86_400.0 * 60.0) {
            return Err("duration_s must be in (0, 60 days]".into());
        }
        let w = &self.workload;
        if w.overwrite < 0.0 || w.delete < 0.0 || w.overwrite + w.delete > 1.0 {
            return Err("workload.overwrite + workload.delete must be within [0, 1]".into());
        }
        if w.value_bytes_min > w.value_bytes_max {
            return Err("workload.value_bytes_min > value_bytes_max".into());
        }
        if !["uniform", "zipf"].contains(&w.key_distribution.as_str()) {
            return Err(format!("unknown key_distribution {:?}", w.key_distribution));
        }
        for p in [self.link.loss, self.link.duplicate, self.link.reorder] {
            if !(0.0..1.0).contains(&p) {
                return Err("link probabilities must be in [0, 1)".into());
            }
        }
        let node = |i: usize| {
            if i < n {
                Ok(())
            } else {
                Err(format!("fault names node {i}, the cluster has {n}"))
            }
        };
        let regions = self.node_regions();
        for f in &self.faults {
            match &f.kind {
                FaultKind::Partition { groups } => groups.iter().flatten().try_for_each(|i| node(*i))?,
                FaultKind::OneWay { from, to } => from.iter().chain(to).try_for_each(|i| node(*i))?,
                FaultKind::RegionOutage { region } if !regions.contains(region) => {
                    return Err(format!("no region {region:?}"));
                }
                FaultKind::Flap { a, b, period_ms, .. } => {
                    node(*a)?;
                    node(*b)?;
                    if *period_ms == 0 {
                        return Err("flap period_ms must be > 0".into());
                    }
                }
                FaultKind::Crash { node: i }
                | FaultKind::Restart { node: i }
                | FaultKind::Join { node: i }
                | FaultKind::Remove { node: i }
                | FaultKind::Clock { node: i, .. } => node(*i)?,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_names_only_what_it_is_about() {
        let s = Scenario::parse(
            r#"
            name = "t"
            duration_s = 10
            regions = [{ name = "a", nodes = 2 }, { name = "b", nodes = 1 }]
            [[faults]]
            at_s = 2
            kind = "partition"
            groups = [[0, 1], [2]]
            [[faults]]
            at_s = 5
            kind = "heal"
            "#,
        )
        .unwrap();
        assert_eq!(s.nodes(), 3);
        assert_eq!(s.node_regions(), vec!["a", "a", "b"]);
        assert!(matches!(s.faults[0].kind, FaultKind::Partition { .. }));
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        let bad = |extra: &str| {
            Scenario::parse(&format!(
                "name = \"t\"\nduration_s = 10\nregions = [{{ name = \"a\", nodes = 2 }}]\n{extra}"
            ))
            .unwrap_err()
        };
        assert!(bad("[[faults]]\nat_s = 1\nkind = \"crash\"\nnode = 7").contains("node 7"));
        assert!(bad("[workload]\noverwrite = 0.9\ndelete = 0.5").contains("overwrite"));
        assert!(bad("typo = 1").contains("typo"));
        assert!(bad("[[faults]]\nat_s = 1\nkind = \"region_outage\"\nregion = \"x\"").contains("no region"));
    }
}
