//! Real network faults between `syncnode` processes on separate hosts
//! (network namespaces on a switch, `syncnode_tests::lan`): partitions are
//! cut links, not the block API. Each test checks the cluster converges and
//! holds exactly what clients were told (`syncnode_tests::history`): no lost
//! acknowledged write, no resurrected delete. Needs root (`scripts/test`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use syncnode::process::{NodeProcess as Proc, converge};
use syncnode_tests::history::History;
use syncnode_tests::lan::Lan;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

/// One node per host; host 0 is the first node, the others join through it.
async fn cluster(lan: &Lan, dir: &Path, extra: &[&str]) -> Vec<Proc> {
    lan.start_nodes(bin(), dir, "faults", |_| {
        ["--gossip-interval", "200ms", "--probe-interval", "200ms"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    })
    .await
}

fn refs(nodes: &[Proc]) -> Vec<&Proc> {
    nodes.iter().collect()
}

async fn settle(nodes: &[Proc], what: &str, timeout: Duration) {
    if let Err(e) = converge(&refs(nodes), timeout).await {
        let mut logs = String::new();
        for n in nodes {
            let log = std::fs::read_to_string(n.dir.join("stderr.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            logs += &format!("\n--- {} ({}), newest first:\n{}", n.http, n.peer_id, tail.join("\n"));
        }
        panic!("{what}: {e:#}{logs}");
    }
}

async fn absent(node: &Proc, id: &str) -> bool {
    node.api.get_item(id).await.unwrap().status == 404
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_one_split_with_conflicting_writes_and_deletes_heals_to_the_last_writes() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let n = cluster(&lan, tmp.path(), &[]).await;
    let h = History::default();
    for k in 0..30 {
        h.put(&n[0], &format!("k{k}"), &format!("base-{k}")).await.unwrap();
    }
    settle(&n, "before the split", Duration::from_secs(60)).await;

    // Host 2 is cut off and its connections reset, as a real outage would.
    assert!(lan.reachable(0, 2, 7070));
    lan.unplug(2, true);
    assert!(
        !lan.reachable(0, 2, 7070) && !lan.reachable(2, 1, 7070),
        "the cut is not a cut"
    );
    // Interleaved so either side wins some conflicts: per key, the later
    // acknowledged operation (higher version) must win after the heal.
    for k in 0..10 {
        h.put(&n[0], &format!("k{k}"), &format!("a-{k}")).await.unwrap();
        h.del(&n[1], &format!("k{}", 10 + k)).await.unwrap();
        if k < 5 {
            h.del(&n[2], &format!("k{k}")).await.unwrap();
        } else {
            h.put(&n[2], &format!("k{k}"), &format!("b-{k}")).await.unwrap();
        }
        h.put(&n[2], &format!("k{}", 10 + k), &format!("b-{}", 10 + k))
            .await
            .unwrap();
        h.del(&n[2], &format!("k{}", 20 + k)).await.unwrap();
        h.put(&n[1], &format!("a.new{k}"), "a").await.unwrap();
        h.put(&n[2], &format!("b.new{k}"), "b").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Side A overwrites some of B's deletes last.
    for k in 20..25 {
        h.put(&n[1], &format!("k{k}"), &format!("a-late-{k}")).await.unwrap();
    }
    // The cut is real: nothing crossed it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(absent(&n[2], "a.new0").await, "a write crossed the cut to host 2");
    assert!(absent(&n[0], "b.new0").await, "a write crossed the cut from host 2");

    lan.plug(2);
    settle(&n, "after the heal", Duration::from_secs(60)).await;
    h.assert_held(&refs(&n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_is_bridged_by_the_third_node_and_heals() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let n = cluster(&lan, tmp.path(), &[]).await;
    let h = History::default();
    h.put(&n[0], "first", "x").await.unwrap();
    settle(&n, "before the cut", Duration::from_secs(60)).await;

    // Host 2 drops everything host 0 sends; host 0 still hears host 2.
    lan.drop_from(2, 0, true);
    assert!(!lan.reachable(0, 2, 7070) && lan.reachable(1, 2, 7070) && lan.reachable(0, 1, 7070));
    for k in 0..20u32 {
        h.put(&n[0], &format!("from0.{k}"), "0").await.unwrap();
        h.put(&n[2], &format!("from2.{k}"), "2").await.unwrap();
        if k.is_multiple_of(4) {
            h.del(&n[2], &format!("from0.{}", k / 2)).await.unwrap();
        }
    }
    // Host 1 reaches both: everything gets through while the cut holds.
    settle(&n, "through host 1 during the one-way cut", Duration::from_secs(60)).await;
    h.assert_held(&refs(&n)).await;

    lan.drop_from(2, 0, false);
    for k in 0..10 {
        h.put(&n[2], &format!("after.{k}"), "2").await.unwrap();
        h.del(&n[0], &format!("from2.{k}")).await.unwrap();
    }
    settle(&n, "after the cut is lifted", Duration::from_secs(60)).await;
    h.assert_held(&refs(&n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_loses_nothing_while_every_node_writes() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let n = Arc::new(cluster(&lan, tmp.path(), &[]).await);
    let h = Arc::new(History::default());
    h.put(&n[0], "first", "x").await.unwrap();
    settle(&n, "before the flapping", Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (n, h, stop, errors) = (n.clone(), h.clone(), stop.clone(), errors.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Own keys and keys all three fight over.
                let id = if i.is_multiple_of(3) {
                    format!("shared.{}", i % 7)
                } else {
                    format!("w{w}.{}", i % 40)
                };
                let r = if i % 5 == 4 {
                    h.del(&n[w], &id).await
                } else {
                    h.put(&n[w], &id, &format!("w{w}-{i}")).await
                };
                if let Err(e) = r {
                    eprintln!("writer {w}: {e:#}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }
    // Host 2's link goes down and up; every other time its connections are
    // reset, otherwise TCP may resume across the gap.
    for flap in 0..12 {
        lan.unplug(2, flap % 2 == 0);
        tokio::time::sleep(Duration::from_millis(400 + 150 * (flap % 4))).await;
        lan.plug(2);
        tokio::time::sleep(Duration::from_millis(300 + 200 * (flap % 3))).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "writes failed while the link flapped"
    );
    assert!(h.len() > 300, "the writers wrote only {} operations", h.len());
    settle(&n, "after the flapping", Duration::from_secs(60)).await;
    h.assert_held(&refs(&n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_past_tombstone_grace_while_the_others_purge_brings_back_no_delete() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    // A tombstone may go after 1 s; a member silent 2 s stops holding it.
    let n = cluster(&lan, tmp.path(), &["--tombstone-grace", "1s", "--member-expiry", "2s"]).await;
    let h = History::default();
    for k in 0..20 {
        h.put(&n[0], &format!("d{k}"), &format!("v{k}")).await.unwrap();
    }
    settle(&n, "before the cut", Duration::from_secs(60)).await;

    assert!(lan.reachable(2, 0, 7070));
    lan.unplug(2, true);
    assert!(!lan.reachable(2, 0, 7070), "the cut is not a cut");
    for k in 0..10 {
        h.del(&n[0], &format!("d{k}")).await.unwrap();
    }
    // Host 2, cut off, still holds d0..d9; it overwrites one after the
    // delete (that write must win) and deletes one of its own.
    h.put(&n[2], "d5", "written after the delete").await.unwrap();
    h.del(&n[2], "d15").await.unwrap();
    // Hosts 0 and 1 purge the ten tombstones, host 2 away past member_expiry.
    for node in &n[..2] {
        let start = std::time::Instant::now();
        while node.metric("syncnode_tombstones_purged_total").await.unwrap() < 10.0 {
            assert!(
                start.elapsed() < Duration::from_secs(40),
                "{} never purged the tombstones while host 2 was away",
                node.http
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(!absent(&n[2], "d0").await, "host 2 saw the delete across the cut");

    lan.plug(2);
    settle(&n, "after host 2 is back", Duration::from_secs(60)).await;
    h.assert_held(&refs(&n)).await;
}

/// Whether `node` holds a connection to `peer` (`/v1/peers`).
async fn connected_to(node: &Proc, peer: &str) -> bool {
    let peers = node.api.ok_json(node.api.get("/v1/peers").await).await.unwrap();
    peers
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["peer_id"] == peer && p["connected"] == true)
}

/// A link cut without a FIN or RST (a pulled cable, a firewall dropping
/// packets) leaves TCP connections "established" for many minutes. The
/// nodes' pings close them, so neither side holds a dead connection (which
/// would take the peer's connection slots and refuse its new ones), and
/// after the heal the nodes reconnect and replicate at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_cut_is_detected_by_ping_and_heals_at_once() {
    let lan = Lan::new(2);
    let tmp = tempfile::tempdir().unwrap();
    let n = cluster(&lan, tmp.path(), &[]).await;
    let h = History::default();
    h.put(&n[0], "before", "0").await.unwrap();
    settle(&n, "before the cut", Duration::from_secs(60)).await;
    assert!(connected_to(&n[0], &n[1].peer_id).await);

    lan.unplug(1, false);
    let cut = std::time::Instant::now();
    // Pings every 5 s, 20 s to answer: both sides let go within ~25 s.
    syncnode::process::eventually(
        "both sides to drop the dead connection",
        Duration::from_secs(50),
        || async {
            let (a, b) = (
                connected_to(&n[0], &n[1].peer_id).await,
                connected_to(&n[1], &n[0].peer_id).await,
            );
            if !a && !b {
                Ok(())
            } else {
                Err(format!("n0 connected: {a}, n1 connected: {b}"))
            }
        },
    )
    .await;
    eprintln!(
        "dead connections closed {:.1} s after the silent cut",
        cut.elapsed().as_secs_f64()
    );
    h.put(&n[1], "during", "1").await.unwrap();

    lan.plug(1);
    h.put(&n[1], "after", "1").await.unwrap();
    settle(&n, "after the heal", Duration::from_secs(30)).await;
    h.assert_held(&refs(&n)).await;
}
