//! Soak with faults: `syncnode load` sends puts and deletes to three nodes
//! while a random node is SIGKILLed and restarted, the MariaDB-backed node's
//! Redis and then its MariaDB are stopped and started, and another random
//! node is killed near the end. At the end the roots are equal and every
//! acknowledged operation the load recorded holds on every node (no lost
//! write, no resurrected delete). Prints bench lines: throughput, latency,
//! errors and the time to converge after the last fault.
//!
//! The only test in this binary: it stops the shared Redis and MariaDB of
//! `scripts/test`.

mod common;

use rand::{RngExt, SeedableRng};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use syncnode::process::{NodeProcess as Proc, converge};
use syncnode_tests::history::History;
use syncnode_tests::services::{start_mysql, start_redis, stop_mysql, stop_redis};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

/// A bench line, written past the test harness's capture so CI logs keep it.
fn bench(metric: &str, value: f64, unit: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "bench=soak_3_nodes_with_faults metric={metric} value={value:.1} unit={unit}"
    );
}

const LOAD_SECS: u64 = 36;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_load_lose_nothing_through_kills_and_backend_outages() {
    let seed: u64 = rand::random();
    eprintln!("soak seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let sql = common::fresh_mysql_db().await;
    let prefix = format!("soak{}:", std::process::id());
    let common_args = |bootstrap: Option<&Proc>| {
        let mut a = syncnode::process::loopback_args("soak", &bootstrap.into_iter().collect::<Vec<_>>());
        a.extend(["--gossip-interval", "200ms", "--probe-interval", "200ms"].map(String::from));
        a
    };
    let mut a0 = common_args(None);
    a0.extend([
        "--sql-url".into(),
        sql,
        "--redis-url".into(),
        common::redis_url(),
        "--redis-prefix".into(),
        prefix,
    ]);
    let n0 = Proc::spawn(bin(), &tmp.path().join("n0"), a0).await.unwrap();
    let n1 = Proc::spawn(bin(), &tmp.path().join("n1"), common_args(Some(&n0)))
        .await
        .unwrap();
    let n2 = Proc::spawn(bin(), &tmp.path().join("n2"), common_args(Some(&n0)))
        .await
        .unwrap();
    let mut nodes = vec![Some(n0), Some(n1), Some(n2)];
    let apis: Vec<String> = nodes.iter().flatten().map(|n| n.http.clone()).collect();
    let record = tmp.path().join("acknowledged.jsonl");
    let load = tokio::process::Command::new(bin())
        .args(["load", "--api", &apis.join(","), "--rate", "150", "--duration"])
        .arg(format!("{LOAD_SECS}s"))
        .args([
            "--keys",
            "3000",
            "--delete-every",
            "7",
            "--timeout",
            "3s",
            "--json",
            "--record",
        ])
        .arg(&record)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start syncnode load");
    let start = Instant::now();
    let at = |secs: u64| tokio::time::sleep_until((start + Duration::from_secs(secs)).into());

    // The faults, on a timeline inside the load.
    let first = rng.random_range(0..3);
    at(4).await;
    kill(&mut nodes, first).await;
    at(7).await;
    restart(&mut nodes, first).await;
    at(11).await;
    tokio::task::spawn_blocking(stop_redis).await.unwrap();
    at(15).await;
    tokio::task::spawn_blocking(start_redis).await.unwrap();
    at(19).await;
    tokio::task::spawn_blocking(stop_mysql).await.unwrap();
    at(24).await;
    tokio::task::spawn_blocking(start_mysql).await.unwrap();
    let last = rng.random_range(0..3);
    at(30).await;
    kill(&mut nodes, last).await;
    at(33).await;
    restart(&mut nodes, last).await;
    let last_fault = Instant::now();

    let out = load.wait_with_output().await.expect("syncnode load");
    let load_end = Instant::now();
    assert!(out.status.success(), "syncnode load failed: {out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("load report JSON");
    eprintln!("load: {report}");
    let nodes: Vec<Proc> = nodes.into_iter().map(|n| n.expect("every node is back")).collect();
    let refs: Vec<&Proc> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("no convergence after the soak (seed {seed}): {e:#}"));
    let (after_fault, after_load) = (last_fault.elapsed(), load_end.elapsed());

    let h = History::default();
    let text = std::fs::read_to_string(&record).unwrap();
    for line in text.lines() {
        let op: serde_json::Value = serde_json::from_str(line).unwrap();
        let value = op["value"].as_str().map(|v| bytes::Bytes::from(v.to_string()));
        if op["indeterminate"] == true {
            h.record_indeterminate(op["id"].as_str().unwrap(), value);
        } else {
            h.record(op["id"].as_str().unwrap(), &op, value).unwrap();
        }
    }
    let acked = report["acknowledged"].as_u64().unwrap();
    assert_eq!(h.len() as u64, acked, "the record holds every acknowledged operation");
    eprintln!(
        "{} operations with an unknown outcome",
        text.lines().count() as u64 - acked
    );
    // Kills and outages cost some errors; most operations must still land.
    let scheduled = report["scheduled"].as_u64().unwrap();
    assert!(
        acked * 10 >= scheduled * 7,
        "only {acked} of {scheduled} operations acknowledged: {report}"
    );
    h.assert_held(&refs).await;

    bench("throughput", report["throughput_per_s"].as_f64().unwrap(), "ops/s");
    bench("acknowledged", acked as f64, "ops");
    bench("errors", report["errors"].as_f64().unwrap(), "ops");
    bench("latency_p50", report["latency_ms"]["p50"].as_f64().unwrap(), "ms");
    bench("latency_p99", report["latency_ms"]["p99"].as_f64().unwrap(), "ms");
    // The last fault ends while the load still runs; from the load's end
    // is the part that is replication alone.
    bench("converge_after_last_fault", after_fault.as_millis() as f64, "ms");
    bench("converge_after_load", after_load.as_millis() as f64, "ms");
}

async fn kill(nodes: &mut [Option<Proc>], i: usize) {
    eprintln!("soak: SIGKILL node {i}");
    nodes[i].as_mut().unwrap().kill().await.unwrap();
}

async fn restart(nodes: &mut [Option<Proc>], i: usize) {
    eprintln!("soak: restart node {i}");
    let n = nodes[i].take().unwrap();
    nodes[i] = Some(
        n.restart(bin())
            .await
            .unwrap_or_else(|e| panic!("restart node {i}: {e:#}")),
    );
}
