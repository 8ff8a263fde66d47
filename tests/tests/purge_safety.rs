//! Tombstone purge across joins and long partitions (DESIGN §6), with real
//! `syncnode run` processes and short `member_expiry` / `ledger_retention`:
//! a node that joins after a purge learns the purge ledger and is no way
//! back for a delete; a partition longer than `member_expiry` with deletes,
//! overwrites and purges on both sides heals with no manual step; past
//! `ledger_retention` both sides refuse each other until one side runs
//! `syncnode resync`.

use bytes::Bytes;
use std::path::Path;
use std::time::Duration;
use syncnode::process::{NodeProcess as Proc, eventually};

const CLUSTER: &str = "purge-test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

/// Short intervals; a tombstone may go 1 s after it is written and a member
/// silent for 2 s stops holding purges back.
fn args(extra: &[String]) -> Vec<String> {
    let mut a = syncnode::process::loopback_args(CLUSTER, &[]);
    a.extend(
        [
            "--gossip-interval",
            "200ms",
            "--probe-interval",
            "200ms",
            "--tombstone-grace",
            "1s",
            "--member-expiry",
            "2s",
        ]
        .map(String::from),
    );
    a.extend(extra.iter().cloned());
    a
}

fn boot(p: &Proc) -> Vec<String> {
    vec!["--bootstrap".into(), p.addr.clone()]
}

async fn spawn(dir: &Path, args: Vec<String>) -> Proc {
    Proc::spawn(bin(), dir, args).await.unwrap()
}

async fn put(p: &Proc, id: &str, v: &str) {
    p.api
        .ok_json(p.api.put_item(id, Bytes::from(v.to_string()), false).await)
        .await
        .unwrap();
}

async fn del(p: &Proc, id: &str) {
    p.api.ok_json(p.api.delete_item(id).await).await.unwrap();
}

/// The item's content, or `None` when it answers 404.
async fn content(p: &Proc, id: &str) -> Option<String> {
    let a = p.api.get_item(id).await.unwrap();
    match a.status.as_u16() {
        200 => Some(a.text()),
        404 => None,
        s => panic!("{id} on {}: {s} {}", p.peer_id, a.text()),
    }
}

/// None of `ids` is readable on any of `nodes`.
async fn all_gone(nodes: &[&Proc], ids: &[String], when: &str) {
    for n in nodes {
        for id in ids {
            assert_eq!(content(n, id).await, None, "{when}: {id} came back on {}", n.peer_id);
        }
    }
}

async fn wait_purged(nodes: &[&Proc], at_least: f64) {
    for n in nodes {
        eventually("tombstones purged", Duration::from_secs(40), || async {
            let purged = n.metric("syncnode_tombstones_purged_total").await.unwrap();
            if purged >= at_least {
                Ok(())
            } else {
                let log = std::fs::read_to_string(n.dir.join("stderr.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let mut members = String::new();
                for m in nodes {
                    let text = m.api.get("/v1/members").await.map(|r| r.text()).unwrap_or_default();
                    members += &format!("\n  {} sees {text}", m.peer_id);
                }
                Err(format!(
                    "{} purged {purged}; members {members}; log tail (newest first):\n{}",
                    n.peer_id,
                    tail.join("\n")
                ))
            }
        })
        .await;
    }
}

async fn partition(side_a: &[&Proc], side_b: &[&Proc], on: bool) {
    for x in side_a {
        for y in side_b {
            x.block(y, on).await.unwrap();
        }
    }
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// Four nodes holding k0..k29, split {a,b} | {c,d}; then k0..k4 are
/// deleted on a's side and k5..k9 on the other.
async fn split_with_deletes(dir: &Path, extra: &[String]) -> [Proc; 4] {
    let a = spawn(&dir.join("a"), args(extra)).await;
    let others = args(&[extra.to_vec(), boot(&a)].concat());
    let b = spawn(&dir.join("b"), others.clone()).await;
    let c = spawn(&dir.join("c"), others.clone()).await;
    let d = spawn(&dir.join("d"), others).await;
    for id in ids("k", 0..30) {
        put(&a, &id, "v1").await;
    }
    syncnode::process::converge(&[&a, &b, &c, &d], Duration::from_secs(60))
        .await
        .unwrap();
    partition(&[&a, &b], &[&c, &d], true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in ids("k", 0..5) {
        del(&a, &id).await;
    }
    for id in ids("k", 5..10) {
        del(&d, &id).await;
    }
    [a, b, c, d]
}

/// 3 nodes; c holds copies of items deleted while it was away past
/// member_expiry; a and b purge; d joins empty; c comes back and talks only
/// to d: nothing deleted comes back anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_after_a_purge_is_no_way_back_for_deletes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = spawn(&tmp.path().join("a"), args(&[])).await;
    let b = spawn(&tmp.path().join("b"), args(&boot(&a))).await;
    let mut c = spawn(&tmp.path().join("c"), args(&boot(&a))).await;
    for id in ids("x", 0..10) {
        put(&a, &id, "v1").await;
    }
    syncnode::process::converge(&[&a, &b, &c], Duration::from_secs(60))
        .await
        .unwrap();
    c.kill().await.unwrap();
    let deleted = ids("x", 0..5);
    for id in &deleted {
        del(&a, id).await;
    }
    wait_purged(&[&a, &b], 5.0).await;
    assert!(a.metric("syncnode_purge_ledger_records").await.unwrap() >= 5.0);

    // d joins empty through a and learns the purge ledger on the way.
    let d = spawn(&tmp.path().join("d"), args(&boot(&a))).await;
    eventually("d is ready", Duration::from_secs(30), || async {
        let r = d.api.get("/readyz").await.unwrap();
        if r.status == 200 { Ok(()) } else { Err(r.text()) }
    })
    .await;
    assert!(
        d.metric("syncnode_purge_ledger_records").await.unwrap() >= 5.0,
        "d did not learn the purge ledger"
    );

    // c comes back with its stale copies and may talk to d only.
    let mut c_args = args(&[
        "--bootstrap".into(),
        d.addr.clone(),
        "--allow-peers".into(),
        d.peer_id.clone(),
    ]);
    let i = c_args.iter().position(|x| x == "--listen").unwrap();
    c_args[i + 1] = format!("/ip4/127.0.0.1/tcp/{}", c.p2p_port);
    let c_dir = c.dir.clone();
    drop(c);
    let c = spawn(&c_dir, c_args).await;
    eventually("c learns the deletes through d", Duration::from_secs(60), || async {
        for id in &deleted {
            if content(&c, id).await.is_some() {
                return Err(format!("{id} still on c"));
            }
        }
        Ok(())
    })
    .await;
    assert!(d.metric("syncnode_resurrections_refused_total").await.unwrap() > 0.0);
    all_gone(&[&a, &b, &c, &d], &deleted, "after c's return").await;
    for n in [&a, &b, &c, &d] {
        for id in ids("x", 5..10) {
            assert_eq!(content(n, &id).await.as_deref(), Some("v1"), "{id} on {}", n.peer_id);
        }
    }
}

/// {a,b} | {c,d} for longer than member_expiry, with deletes, overwrites and
/// purges on both sides: the heal needs no manual step and brings no
/// deleted item back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_longer_than_member_expiry_heals_through_the_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c, d] = split_with_deletes(tmp.path(), &[]).await;
    let all = [&a, &b, &c, &d];
    for id in ids("k", 10..15) {
        put(&b, &id, "side A").await;
    }
    for id in ids("k", 15..20) {
        put(&c, &id, "side B").await;
    }
    wait_purged(&all, 5.0).await;
    all_gone(&[&a, &b], &ids("k", 0..5), "side A").await;
    all_gone(&[&c, &d], &ids("k", 5..10), "side B").await;

    partition(&[&a, &b], &[&c, &d], false).await;
    syncnode::process::converge(&all, Duration::from_secs(120))
        .await
        .unwrap();
    all_gone(&all, &ids("k", 0..10), "after the heal").await;
    for n in all {
        for id in ids("k", 10..15) {
            assert_eq!(
                content(n, &id).await.as_deref(),
                Some("side A"),
                "{id} on {}",
                n.peer_id
            );
        }
        for id in ids("k", 15..20) {
            assert_eq!(
                content(n, &id).await.as_deref(),
                Some("side B"),
                "{id} on {}",
                n.peer_id
            );
        }
        for id in ids("k", 20..30) {
            assert_eq!(content(n, &id).await.as_deref(), Some("v1"), "{id} on {}", n.peer_id);
        }
        let peers = n.api.ok_json(n.api.get("/v1/peers").await).await.unwrap();
        assert!(
            peers.as_array().unwrap().iter().all(|p| p["must_resync"] == false),
            "no manual step: {peers}"
        );
    }
}

/// Past ledger_retention the two sides refuse each other (nothing deleted
/// comes back), and `syncnode resync --from PEER` on one side — each of its
/// nodes stopped first — rebuilds it from the other, keeping identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_ledger_retention_one_side_resyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = ["--ledger-retention".to_string(), "4s".to_string()];
    let [a, b, mut c, mut d] = split_with_deletes(tmp.path(), &keep).await;
    put(&d, "b.only", "written on side B").await;
    wait_purged(&[&a, &b, &c, &d], 5.0).await;
    for n in [&a, &b, &c, &d] {
        eventually("purge records expire", Duration::from_secs(30), || async {
            let left = n.metric("syncnode_purge_ledger_records").await.unwrap();
            if left == 0.0 {
                Ok(())
            } else {
                Err(format!("{left} left"))
            }
        })
        .await;
    }

    partition(&[&a, &b], &[&c, &d], false).await;
    for (x, y) in [(&a, &c), (&c, &a)] {
        eventually("each side flags the other", Duration::from_secs(30), || async {
            let peers = x.api.ok_json(x.api.get("/v1/peers").await).await.unwrap();
            let flagged = peers
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["peer_id"] == y.peer_id.as_str() && p["must_resync"] == true);
            if flagged { Ok(()) } else { Err(peers.to_string()) }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    all_gone(&[&a, &b], &ids("k", 0..5), "refusing side B").await;
    all_gone(&[&c, &d], &ids("k", 5..10), "refusing side A").await;

    // Side B is rebuilt from side A.
    let (c_id, d_id) = (c.peer_id.clone(), d.peer_id.clone());
    c.kill().await.unwrap();
    d.kill().await.unwrap();
    let mut resynced = Vec::new();
    for p in [c, d] {
        let mut a_args = p.args.clone();
        a_args.extend(["--from".to_string(), a.addr.clone()]);
        let i = a_args.iter().position(|x| x == "--listen").unwrap();
        a_args[i + 1] = format!("/ip4/127.0.0.1/tcp/{}", p.p2p_port);
        let dir = p.dir.clone();
        drop(p);
        resynced.push(
            Proc::spawn_with(bin(), &dir, "resync", a_args, Vec::new())
                .await
                .unwrap(),
        );
    }
    let (c, d) = (&resynced[0], &resynced[1]);
    assert_eq!(
        (c.peer_id.as_str(), d.peer_id.as_str()),
        (c_id.as_str(), d_id.as_str()),
        "identities kept"
    );
    if let Err(e) = syncnode::process::converge(&[&a, &b, c, d], Duration::from_secs(120)).await {
        let tail = |p: &Proc| {
            let log = std::fs::read_to_string(p.dir.join("stderr.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        panic!(
            "after the resync: {e}\n--- c {}:\n{}\n--- d {}:\n{}\n--- a {}:\n{}",
            c.peer_id,
            tail(c),
            d.peer_id,
            tail(d),
            a.peer_id,
            tail(&a)
        );
    }
    all_gone(&[&a, &b, c, d], &ids("k", 0..5), "after the resync").await;
    for n in [&a, &b, c, d] {
        // Side B's own changes were dropped with its copy.
        for id in ids("k", 5..20) {
            assert_eq!(content(n, &id).await.as_deref(), Some("v1"), "{id} on {}", n.peer_id);
        }
        assert_eq!(content(n, "b.only").await, None);
    }
    eventually("nobody is flagged any more", Duration::from_secs(30), || async {
        for n in [&a, &b, c, d] {
            let peers = n.api.ok_json(n.api.get("/v1/peers").await).await.unwrap();
            if peers.as_array().unwrap().iter().any(|p| p["must_resync"] == true) {
                return Err(format!("{}: {peers}", n.peer_id));
            }
        }
        Ok(())
    })
    .await;
}
