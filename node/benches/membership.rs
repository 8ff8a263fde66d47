//! Membership (`cargo bench -p syncnode --bench membership`): ten
//! `syncnode run` processes on loopback (embedded SQLite), SWIM's probe
//! period `BENCH_PROBE_MS` (default 1000, the shipped default).
//!
//! - `join_visible_all_n10`: a 10th node joins through one seed; seconds
//!   until all nine others list it alive (goal: within 3 probe periods;
//!   memberlist/Serf converge 10 LAN nodes in under a second).
//! - `failure_detected_n10`: one node SIGKILLed; seconds until all the
//!   others mark it down, beside SWIM's bound for this period and size.
//! - `membership_bytes_per_node_per_s`: SWIM bytes sent per node and second
//!   in a steady 10-node cluster.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use syncnode::process::{NodeProcess, loopback_args};
use syncnode_protocol::membership::MembershipConfig;

fn main() {
    let probe = Duration::from_millis(support::env_usize("BENCH_PROBE_MS", 1000) as u64);
    support::runtime().block_on(run(probe)).expect("membership bench");
}

async fn states(n: &NodeProcess) -> anyhow::Result<Vec<(String, String)>> {
    Ok(n.members()
        .await?
        .iter()
        .map(|m| {
            (
                m["peer_id"].as_str().unwrap_or_default().to_string(),
                m["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Waits until every node in `nodes` shows `peer` in `state`.
async fn until_all(nodes: &[&NodeProcess], peer: &str, state: &str, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut done = BTreeSet::new();
    while done.len() < nodes.len() {
        anyhow::ensure!(
            start.elapsed() < limit,
            "{peer} not {state} everywhere within {limit:?}"
        );
        for (i, n) in nodes.iter().enumerate() {
            if !done.contains(&i) && states(n).await?.iter().any(|(p, s)| p == peer && s == state) {
                done.insert(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

async fn membership_bytes(n: &NodeProcess) -> anyhow::Result<u64> {
    Ok(n.metric("syncnode_membership_sent_bytes_total").await? as u64)
}

async fn run(probe: Duration) -> anyhow::Result<()> {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_syncnode"));
    let tmp = tempfile::tempdir()?;
    let period = format!("{}ms", probe.as_millis());
    let args = |boot: &[&NodeProcess]| {
        let mut a = loopback_args("bench-members", boot);
        a.extend(["--probe-interval".to_string(), period.clone()]);
        a
    };
    let seed = NodeProcess::spawn(bin, &tmp.path().join("n1"), args(&[])).await?;
    let mut nodes = vec![seed];
    for i in 2..=9 {
        let n = NodeProcess::spawn(bin, &tmp.path().join(format!("n{i}")), args(&[&nodes[0]])).await?;
        nodes.push(n);
    }
    // Let the nine settle: each seen alive by the eight others.
    for n in &nodes {
        let others: Vec<&NodeProcess> = nodes.iter().filter(|o| o.peer_id != n.peer_id).collect();
        until_all(&others, &n.peer_id, "alive", Duration::from_secs(60)).await?;
    }
    let tenth = NodeProcess::spawn(bin, &tmp.path().join("n10"), args(&[&nodes[0]])).await?;
    let refs: Vec<&NodeProcess> = nodes.iter().collect();
    let joined = until_all(&refs, &tenth.peer_id, "alive", Duration::from_secs(60)).await?;
    println!(
        "bench=membership metric=join_visible_all_n10 value={:.3} unit=s periods={:.2} goal_periods=3",
        joined.as_secs_f64(),
        joined.as_secs_f64() / probe.as_secs_f64()
    );
    nodes.push(tenth);

    // Steady state: SWIM bytes per node and second.
    tokio::time::sleep(probe * 5).await;
    let window = Duration::from_secs(10);
    let mut before = 0;
    for n in &nodes {
        before += membership_bytes(n).await?;
    }
    tokio::time::sleep(window).await;
    let mut after = 0;
    for n in &nodes {
        after += membership_bytes(n).await?;
    }
    println!(
        "bench=membership metric=membership_bytes_per_node_per_s value={:.0} unit=B/s",
        (after - before) as f64 / nodes.len() as f64 / window.as_secs_f64()
    );

    // Failure detection: SIGKILL one, time until all nine others say down.
    let mut victim = nodes.remove(4);
    let killed_at = Instant::now();
    victim.kill().await?;
    let refs: Vec<&NodeProcess> = nodes.iter().collect();
    until_all(&refs, &victim.peer_id, "down", Duration::from_secs(120)).await?;
    let detected = killed_at.elapsed();
    let bound = MembershipConfig { probe_period: probe }.failure_detection_bound(10);
    println!(
        "bench=membership metric=failure_detected_n10 value={:.3} unit=s bound={:.3} ratio={:.2}",
        detected.as_secs_f64(),
        bound.as_secs_f64(),
        detected.as_secs_f64() / bound.as_secs_f64()
    );
    Ok(())
}
