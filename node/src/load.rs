//! `syncnode load`: a bounded, open-loop load generator against nodes' HTTP
//! APIs, for soak tests and for sizing a deployment.
//!
//! Operations start on a fixed schedule (`rate` per second for `duration`),
//! whatever the answers do, and each latency is measured from the scheduled
//! start, so a stalled node shows as latency rather than as a slower
//! schedule (no coordinated omission). Targets are used round robin; a
//! target that is down costs errors, not the run. With `record`, every
//! acknowledged operation is written as one JSON line with its receipt
//! (`id`, `version`, `origin`, `value` or null for a delete), which is what
//! a checker needs to prove no acknowledged write was lost; operations
//! that failed in a way that may still have applied them (a timeout, a
//! connection lost mid-request, a 5xx) are recorded with
//! `"indeterminate": true` and no receipt.

use crate::client::ApiClient;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadConfig {
    /// Node APIs, used round robin (repeat the flag or separate with commas).
    #[arg(
        long = "api",
        env = "SYNCNODE_API",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub targets: Vec<String>,
    /// Bearer token of the API.
    #[arg(long, env = "SYNCNODE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Operations started per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// How long to send (`10s`, `2m`).
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Distinct ids written (`load.0` … `load.<keys-1>`).
    #[arg(long, default_value_t = 1_000)]
    pub keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Every Nth operation is a delete (0: none).
    #[arg(long, default_value_t = 0)]
    pub delete_every: u64,
    /// Operations waiting for an answer at most; the excess is skipped and counted.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Writes every acknowledged operation with its receipt, one JSON line each.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Give up on an answer after this long.
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

/// What a run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct LoadReport {
    pub scheduled: u64,
    pub acknowledged: u64,
    pub errors: u64,
    /// Not started: `max_in_flight` operations were already waiting.
    pub skipped: u64,
    pub elapsed_s: f64,
    pub throughput_per_s: f64,
    pub latency_ms: Latency,
    /// Errors by kind (HTTP status, or the client's message's first words).
    pub error_kinds: BTreeMap<String, u64>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
}

/// Runs the load; `Err` only for a bad configuration or an unwritable record.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!cfg.targets.is_empty(), "load: give at least one --api target");
    anyhow::ensure!(cfg.rate > 0, "load: --rate must be at least 1 per second");
    anyhow::ensure!(cfg.keys > 0, "load: --keys must be at least 1");
    let clients: Vec<ApiClient> = cfg
        .targets
        .iter()
        .map(|t| ApiClient::new(crate::client::base_url(t), cfg.token.clone()).with_timeout(cfg.timeout))
        .collect();
    let record = match &cfg.record {
        Some(path) => Some(Arc::new(Mutex::new(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| anyhow::anyhow!("load: --record {}: {e}", path.display()))?,
        )))),
        None => None,
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight.max(1)));
    let period = Duration::from_secs_f64(1.0 / f64::from(cfg.rate));
    let total = (cfg.duration.as_secs_f64() * f64::from(cfg.rate)).round() as u64;
    let start = Instant::now();
    let mut report = LoadReport::default();
    let mut tasks = tokio::task::JoinSet::new();
    for seq in 0..total {
        let due = start + period.mul_f64(seq as f64);
        tokio::time::sleep_until(due.into()).await;
        report.scheduled += 1;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            report.skipped += 1;
            continue;
        };
        let client = clients[(seq % clients.len() as u64) as usize].clone();
        // Keys drawn the same way on every run (splitmix64 of the sequence).
        let id = format!("load.{}", splitmix64(seq) % cfg.keys);
        let delete = cfg.delete_every > 0 && seq % cfg.delete_every == cfg.delete_every - 1;
        let value = (!delete).then(|| value_of(seq, cfg.value_bytes));
        let (tally, record) = (tally.clone(), record.clone());
        tasks.spawn(async move {
            let answer = match &value {
                Some(v) => client.put_item(&id, v.clone(), false).await,
                None => client.delete_item(&id).await,
            };
            let latency = due.elapsed();
            let outcome = match answer {
                Ok(a) if a.status.is_success() => a.json(),
                Ok(a) => Err(anyhow::anyhow!("HTTP {}", a.status.as_u16())),
                Err(e) => Err(e),
            };
            let mut t = tally.lock().unwrap();
            match outcome {
                Ok(receipt) => {
                    t.latencies_us.push(latency.as_micros() as u64);
                    if let Some(record) = &record {
                        let line = serde_json::json!({
                            "id": id,
                            "version": receipt["version"],
                            "origin": receipt["origin"],
                            "value": value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                        });
                        let mut w = record.lock().unwrap();
                        let _ = writeln!(w, "{line}");
                    }
                }
                Err(e) => {
                    t.errors += 1;
                    let kind = error_kind(&e);
                    // Refused connections and 4xx answers changed nothing;
                    // anything else may have been applied, and a checker
                    // must allow it to win.
                    let unknown = kind != "connection refused" && !kind.starts_with("http 4");
                    if unknown && let Some(record) = &record {
                        let line = serde_json::json!({
                            "id": id,
                            "indeterminate": true,
                            "value": value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                        });
                        let mut w = record.lock().unwrap();
                        let _ = writeln!(w, "{line}");
                    }
                    *t.error_kinds.entry(kind).or_default() += 1;
                }
            }
            drop(slot);
        });
    }
    while tasks.join_next().await.is_some() {}
    if let Some(record) = record {
        record
            .lock()
            .unwrap()
            .flush()
            .map_err(|e| anyhow::anyhow!("load: --record: {e}"))?;
    }
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    report.elapsed_s = start.elapsed().as_secs_f64();
    report.acknowledged = t.latencies_us.len() as u64;
    report.errors = t.errors;
    report.error_kinds = t.error_kinds;
    report.throughput_per_s = report.acknowledged as f64 / report.elapsed_s.max(1e-9);
    t.latencies_us.sort_unstable();
    let at = |q: f64| -> f64 {
        match t.latencies_us.len() {
            0 => 0.0,
            n => t.latencies_us[((n - 1) as f64 * q).round() as usize] as f64 / 1000.0,
        }
    };
    report.latency_ms = Latency {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    };
    Ok(report)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The value of operation `seq`: names the operation, padded to `bytes`.
fn value_of(seq: u64, bytes: usize) -> Bytes {
    let mut v = format!("load-{seq}-").into_bytes();
    v.resize(bytes.max(v.len()), b'.');
    Bytes::from(v)
}

fn error_kind(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    if let Some(code) = s.strip_prefix("HTTP ") {
        return format!("http {code}");
    }
    if s.contains("no answer within") {
        return "timeout".into();
    }
    if s.contains("Connection refused") || s.contains("connection refused") {
        return "connection refused".into();
    }
    "other".into()
}

impl LoadReport {
    /// The human summary `syncnode load` prints.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self.error_kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        format!(
            "{} acknowledged of {} scheduled in {:.1} s ({:.0}/s), {} errors{}, {} skipped\nlatency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            self.acknowledged,
            self.scheduled,
            self.elapsed_s,
            self.throughput_per_s,
            self.errors,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({})", kinds.join(", "))
            },
            self.skipped,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.max
        )
    }
}
