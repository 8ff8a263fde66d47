//! A rolling upgrade from wire version 1 to 2, with real binaries: the
//! version 1 node is `syncnode` built from the last version 1 commit
//! (`scripts/test` builds it and exports `SYNCNODE_TEST_V1_BIN`). A mixed
//! cluster replicates both ways (version 2 nodes talk to the version 1 node
//! in version 1 terms: sessions instead of `Request::Cdc`, roots on its
//! gossip topic instead of `Request::Roots`), nobody is penalized for the
//! other's messages, the old node restarted among new ones still joins, and
//! it then restarts on the new binary with its data.

use std::path::{Path, PathBuf};
use std::time::Duration;
use syncnode::process::{NodeProcess as Proc, converge, loopback_args};
use syncnode_tests::history::History;

fn v2() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

fn v1() -> PathBuf {
    let path = std::env::var("SYNCNODE_TEST_V1_BIN").unwrap_or_else(|_| {
        panic!("SYNCNODE_TEST_V1_BIN is not set: run the tests through ./scripts/test, which builds the version 1 node")
    });
    assert!(Path::new(&path).exists(), "{path} is missing: ./scripts/test builds it");
    PathBuf::from(path)
}

fn args(bootstrap: &[&Proc]) -> Vec<String> {
    let mut a = loopback_args("upgrade", bootstrap);
    a.extend(["--gossip-interval", "200ms", "--probe-interval", "200ms"].map(String::from));
    a
}

fn log(p: &Proc) -> String {
    std::fs::read_to_string(p.dir.join("stderr.log")).unwrap_or_default()
}

/// Lines of `p`'s log that say a peer sent something it could not read or
/// was punished for it.
fn wire_trouble(p: &Proc) -> Vec<String> {
    log(p)
        .lines()
        .filter(|l| {
            l.contains("wire version") || l.contains("malformed") || l.contains("penal") || l.contains("banned")
        })
        .map(str::to_string)
        .collect()
}

/// Puts round robin over `nodes`, deletes through `deleters` (a version 1
/// node's DELETE answer has no origin to check it by).
async fn writes(h: &History, nodes: &[&Proc], deleters: &[&Proc], tag: &str) {
    for k in 0..60 {
        let node = nodes[k % nodes.len()];
        h.put(node, &format!("{tag}.{k}"), &format!("{tag}-{k}")).await.unwrap();
        if k % 6 == 5 {
            h.del(deleters[k % deleters.len()], &format!("{tag}.{}", k - 3))
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_node_and_version_2_nodes_replicate_and_the_old_one_upgrades_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let old = Proc::spawn(&v1(), &tmp.path().join("old"), args(&[])).await.unwrap();
    let b = Proc::spawn(v2(), &tmp.path().join("b"), args(&[&old])).await.unwrap();
    let c = Proc::spawn(v2(), &tmp.path().join("c"), args(&[&old])).await.unwrap();
    let h = History::default();
    writes(&h, &[&old, &b, &c], &[&b, &c], "mixed").await;
    converge(&[&old, &b, &c], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("mixed cluster: {e:#}\nold node's log:\n{}", log(&old)));
    h.assert_held(&[&old, &b, &c]).await;
    // A write on a version 2 node reaches the old node, and back.
    h.put(&b, "late.from.v2", "x").await.unwrap();
    h.put(&old, "late.from.v1", "y").await.unwrap();
    // An item with a media type: its trailer is skipped by the old node,
    // which still takes the item; the new nodes keep the media type.
    let typed = b
        .api
        .put_typed("typed.from.v2", bytes::Bytes::from_static(b"# t"), "text/markdown")
        .await
        .unwrap();
    assert_eq!(typed.status, 200, "{}", typed.text());
    converge(&[&old, &b, &c], Duration::from_secs(60)).await.unwrap();
    h.assert_held(&[&old, &b, &c]).await;
    assert_eq!(old.api.get("/v1/items/typed.from.v2").await.unwrap().text(), "# t");
    let on_c = c
        .api
        .ok_json(
            c.api
                .post_json("/v1/get", &serde_json::json!({"ids": ["typed.from.v2"]}))
                .await,
        )
        .await
        .unwrap();
    assert_eq!(on_c[0]["media_type"], "text/markdown", "{on_c}");
    for n in [&old, &b, &c] {
        let trouble = wire_trouble(n);
        assert!(trouble.is_empty(), "{}: {trouble:#?}", n.http);
        // Nobody was penalized for the other version's messages.
        let peers = n.api.ok_json(n.api.get("/v1/peers").await).await.unwrap();
        for p in peers.as_array().unwrap() {
            assert_eq!(p["penalty"], 0, "{} penalized {}: {p}", n.http, p["peer_id"]);
        }
    }

    // The old node restarts on version 1 among version 2 peers only: it
    // must still join (roots reach it on its gossip topic) and replicate.
    let old = stop(old).await;
    writes(&h, &[&b, &c], &[&b, &c], "while.old.restarts").await;
    let old = old.restart(&v1()).await.unwrap();
    syncnode::process::eventually(
        "the restarted version 1 node ready",
        Duration::from_secs(60),
        || async {
            let r = old.api.get("/readyz").await.map_err(|e| e.to_string())?;
            if r.status == 200 { Ok(()) } else { Err(r.text()) }
        },
    )
    .await;
    writes(&h, &[&old, &b, &c], &[&b, &c], "again.mixed").await;
    converge(&[&old, &b, &c], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("after the version 1 restart: {e:#}\nold node's log:\n{}", log(&old)));
    h.assert_held(&[&old, &b, &c]).await;

    // The rolling upgrade: the old node stops (SIGTERM), comes back on the
    // new binary with its data dir, and the cluster goes on.
    let old = stop(old).await;
    writes(&h, &[&b, &c], &[&b, &c], "during").await;
    let upgraded = old.restart(v2()).await.unwrap();
    writes(&h, &[&upgraded, &b, &c], &[&upgraded, &b, &c], "after").await;
    converge(&[&upgraded, &b, &c], Duration::from_secs(60)).await.unwrap();
    h.assert_held(&[&upgraded, &b, &c]).await;
}

/// SIGTERM, and wait until it is gone.
async fn stop(mut p: Proc) -> Proc {
    let pid = p.child.id().unwrap();
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await;
    p
}
