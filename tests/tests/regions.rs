//! Three regions × two nodes on separate hosts (network namespaces): each
//! write crosses to each remote region about once (the relay tree's hubs),
//! as the per-region byte counters of `/v1/regions` show; every region's
//! lag is visible there, in `/metrics` and through
//! `/readyz?max_region_lag_ms=`. There is no WAN latency here; the
//! simulator measures latency (`syncsim`, regions scenarios).

use bytes::Bytes;
use std::path::Path;
use std::time::Duration;
use syncnode::process::{NodeProcess as Proc, converge};
use syncnode_tests::lan::Lan;

const REGIONS: [&str; 6] = ["eu", "eu", "us", "us", "ap", "ap"];

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

/// Sync bytes this node sent to other regions.
async fn wan_sent(p: &Proc, own: &str) -> u64 {
    let v = p.api.ok_json(p.api.get("/v1/regions").await).await.unwrap();
    v["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["region"] != own)
        .map(|r| r["bytes_sent"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_crosses_to_each_remote_region_about_once() {
    let lan = Lan::new(REGIONS.len());
    let tmp = tempfile::tempdir().unwrap();
    let nodes = lan
        .start_nodes(bin(), tmp.path(), "regions", |i| {
            [
                "--region",
                REGIONS[i],
                "--gossip-interval",
                "500ms",
                "--probe-interval",
                "500ms",
            ]
            .map(String::from)
            .to_vec()
        })
        .await;
    let refs: Vec<&Proc> = nodes.iter().collect();
    // Everyone knows everyone, and every region is seen.
    syncnode::process::eventually("six members in three regions", Duration::from_secs(60), || async {
        for n in &nodes {
            let v = n
                .api
                .ok_json(n.api.get("/v1/regions").await)
                .await
                .map_err(|e| e.to_string())?;
            let alive: Vec<u64> = v["regions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["members_alive"].as_u64().unwrap())
                .collect();
            if alive != [2, 2, 2] {
                return Err(format!("{}: {v}", n.http));
            }
        }
        Ok(())
    })
    .await;
    nodes[1]
        .api
        .ok_json(nodes[1].api.put_item("warm", Bytes::from_static(b"up"), false).await)
        .await
        .unwrap();
    converge(&refs, Duration::from_secs(60)).await.unwrap();

    // Writes at a node that is not its region's hub: 200 × 4 KiB.
    let before: Vec<u64> = futures_sum(&nodes).await;
    let value = Bytes::from(vec![b'x'; 4096]);
    let writer = &nodes[1];
    for i in 0..200 {
        writer
            .api
            .ok_json(writer.api.put_item(&format!("w{i}"), value.clone(), false).await)
            .await
            .unwrap();
    }
    converge(&refs, Duration::from_secs(60)).await.unwrap();
    let after: Vec<u64> = futures_sum(&nodes).await;
    let wan: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    let payload = 200 * 4096u64;
    let per_write = wan as f64 / payload as f64;
    let _ = writeln_bench(per_write);
    // Two remote regions: about 2 × the payload, within the 1.25 ×.
    assert!(
        per_write <= 1.25 * 2.0,
        "WAN bytes {wan} for {payload} bytes written: {per_write:.2} × the payload (goal ≤ 2.5)"
    );
    assert!(
        per_write >= 1.9,
        "the writes did not cross: {per_write:.2} × the payload"
    );

    // Lag is visible per region, in /metrics too, and readiness can use it.
    let v = nodes[0]
        .api
        .ok_json(nodes[0].api.get("/v1/regions").await)
        .await
        .unwrap();
    for r in v["regions"].as_array().unwrap() {
        assert!(r["lag_ms"].as_u64().is_some(), "{v}");
    }
    let metrics = nodes[0].api.get("/metrics").await.unwrap().text();
    for name in [
        "syncnode_region_lag_seconds{region=\"us\"}",
        "syncnode_region_members_alive{region=\"ap\"}",
        "syncnode_region_sent_bytes_total{region=\"us\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let ok = nodes[0].api.get("/readyz?max_region_lag_ms=60000").await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    // A region cut off: its lag grows past a small bound.
    lan.unplug(4, true);
    lan.unplug(5, true);
    nodes[1]
        .api
        .ok_json(
            nodes[1]
                .api
                .put_item("after.cut", Bytes::from_static(b"x"), false)
                .await,
        )
        .await
        .unwrap();
    syncnode::process::eventually("ap lagging in readyz", Duration::from_secs(30), || async {
        let r = nodes[0]
            .api
            .get("/readyz?max_region_lag_ms=1500")
            .await
            .map_err(|e| e.to_string())?;
        if r.status == 503 && r.text().contains("region ap lags") {
            Ok(())
        } else {
            Err(r.text())
        }
    })
    .await;
}

/// WAN bytes sent by each node so far.
async fn futures_sum(nodes: &[Proc]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        out.push(wan_sent(n, REGIONS[i]).await);
    }
    out
}

/// The bench line, past the harness's capture.
fn writeln_bench(per_write: f64) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(
        std::io::stderr(),
        "bench=regions_3x2_processes metric=wan_bytes_per_write_payload value={per_write:.3} unit=x"
    )
}
