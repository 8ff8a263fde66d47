//! Membership as an operator meets it, with real `syncnode run` processes:
//! a cluster that joins through one seed and outlives it, DNS bootstrap,
//! advertised addresses, exclusive ports, readiness of a joining node,
//! forgetting a member, and the log lines that name what is misconfigured.

use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use syncnode::process::{NodeProcess as Proc, eventually};

const CLUSTER: &str = "members-test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

/// A loopback node with short gossip and probe intervals.
fn args(extra: &[String]) -> Vec<String> {
    let mut a = syncnode::process::loopback_args(CLUSTER, &[]);
    a.extend(["--gossip-interval", "200ms", "--probe-interval", "200ms"].map(String::from));
    a.extend(extra.iter().cloned());
    a
}

/// `args` with the listen address replaced.
fn listening_on(mut a: Vec<String>, listen: &str) -> Vec<String> {
    let i = a
        .iter()
        .position(|x| x == "--listen")
        .expect("loopback args have --listen");
    a[i + 1] = listen.to_string();
    a
}

fn boot(p: &Proc) -> Vec<String> {
    vec!["--bootstrap".into(), p.addr.clone()]
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

async fn spawn(dir: &Path, args: Vec<String>) -> Proc {
    Proc::spawn(bin(), dir, args).await.unwrap()
}

async fn alive(p: &Proc) -> BTreeSet<String> {
    p.members()
        .await
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "alive")
        .map(|m| m["peer_id"].as_str().unwrap().to_string())
        .collect()
}

async fn status_of(p: &Proc, id: &str) -> u16 {
    p.api.get_item(id).await.unwrap().status.as_u16()
}

async fn put(p: &Proc, id: &str, v: &str) {
    p.api
        .ok_json(p.api.put_item(id, Bytes::from(v.to_string()), false).await)
        .await
        .unwrap();
}

fn others(all: &[&Proc], me: &Proc) -> BTreeSet<String> {
    all.iter()
        .filter(|p| p.peer_id != me.peer_id)
        .map(|p| p.peer_id.clone())
        .collect()
}

/// Waits until every node lists every other one alive.
async fn all_see_each_other(all: &[&Proc], timeout: Duration) {
    for p in all {
        let want = others(all, p);
        eventually("every node lists the others alive", timeout, || async {
            let got = alive(p).await;
            if got == want {
                Ok(())
            } else {
                Err(format!("{} sees {got:?}", p.peer_id))
            }
        })
        .await;
    }
}

/// A free TCP port on loopback (for an address that must be known before
/// the node starts).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_joins_through_one_seed_and_outlives_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut n1 = spawn(&tmp.path().join("n1"), args(&[])).await;
    let mut rest = Vec::new();
    // n5 advertises a DNS name (and the port it will listen on).
    let n5_port = free_port();
    for i in 2..=5 {
        let mut a = args(&boot(&n1));
        if i == 5 {
            a = listening_on(a, &format!("/ip4/127.0.0.1/tcp/{n5_port}"));
            a.extend(["--advertise".to_string(), format!("/dns4/localhost/tcp/{n5_port}")]);
        }
        rest.push(spawn(&tmp.path().join(format!("n{i}")), a).await);
    }
    let all: Vec<&Proc> = std::iter::once(&n1).chain(rest.iter()).collect();
    all_see_each_other(&all, Duration::from_secs(20)).await;
    // Others reach n5 by the name it advertises.
    let seen = rest[0].members().await.unwrap();
    let m5 = seen.iter().find(|m| m["peer_id"] == rest[3].peer_id.as_str()).unwrap();
    assert_eq!(m5["addresses"], json!([format!("/dns4/localhost/tcp/{n5_port}")]));
    let h5 = rest[3].api.ok_json(rest[3].api.get("/health").await).await.unwrap();
    assert_eq!(h5["advertise"], json!([format!("/dns4/localhost/tcp/{n5_port}")]));

    // The seed dies: writes still flow between the others.
    n1.kill().await.unwrap();
    put(&rest[0], "after.seed", "n2 wrote this").await;
    eventually(
        "n2's write reaches n5 without the seed",
        Duration::from_secs(20),
        || async {
            match status_of(&rest[3], "after.seed").await {
                200 => Ok(()),
                s => Err(format!("n5 answers {s}")),
            }
        },
    )
    .await;
    eventually("n1 is marked down", Duration::from_secs(20), || async {
        let m = rest[1].members().await.unwrap();
        let st = m
            .iter()
            .find(|m| m["peer_id"] == n1.peer_id.as_str())
            .map(|m| m["state"].clone());
        if st == Some(json!("down")) {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    // A peer that is gone is not shown in sync.
    let peers = rest[2].api.ok_json(rest[2].api.get("/v1/peers").await).await.unwrap();
    let p1 = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == n1.peer_id.as_str())
        .unwrap();
    assert_eq!(
        (p1["connected"].clone(), p1["in_sync"].clone()),
        (json!(false), json!(false)),
        "{p1}"
    );
    // n1 comes back (no bootstrap of its own: it remembers its members) and catches up.
    let n1 = n1.restart(bin()).await.unwrap();
    eventually("n1 catches up", Duration::from_secs(30), || async {
        match status_of(&n1, "after.seed").await {
            200 => Ok(()),
            s => Err(format!("n1 answers {s}")),
        }
    })
    .await;

    // A 6th node joins through n4 only, by a DNS name, listening on every
    // interface: it learns every member, and they learn its real addresses.
    let n4 = &rest[2];
    let a6 = listening_on(
        args(&[
            "--bootstrap".into(),
            format!("/dns4/localhost/tcp/{}/p2p/{}", n4.p2p_port, n4.peer_id),
        ]),
        "/ip4/0.0.0.0/tcp/0",
    );
    let n6 = spawn(&tmp.path().join("n6"), a6).await;
    let all: Vec<&Proc> = [&n1].into_iter().chain(rest.iter()).chain([&n6]).collect();
    let want = others(&all, &n6);
    eventually("n6 lists every member", Duration::from_secs(20), || async {
        let got = alive(&n6).await;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
    let h6 = n6.api.ok_json(n6.api.get("/health").await).await.unwrap();
    let adv: Vec<String> = serde_json::from_value(h6["advertise"].clone()).unwrap();
    assert!(!adv.is_empty(), "{h6}");
    for a in &adv {
        assert!(!a.contains("0.0.0.0"), "the wildcard is expanded: {adv:?}");
    }
    let listen: Vec<String> = serde_json::from_value(h6["listen_addrs"].clone()).unwrap();
    assert!(listen.len() >= adv.len(), "{listen:?} vs {adv:?}");
    eventually(
        "n2 shows n6's advertised addresses",
        Duration::from_secs(10),
        || async {
            let m = rest[0].members().await.unwrap();
            let got = m
                .iter()
                .find(|m| m["peer_id"] == n6.peer_id.as_str())
                .map(|m| m["addresses"].clone());
            if got == Some(json!(adv)) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    // `syncnode members` lists them for an operator.
    let out = tokio::process::Command::new(bin())
        .args(["members", "--api", &format!("http://{}", n6.http)])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for p in &all {
        assert!(text.contains(&p.peer_id), "{} missing from:\n{text}", p.peer_id);
    }
}

/// A second node on a taken port stops with the port in its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_are_exclusive() {
    let tmp = tempfile::tempdir().unwrap();
    let n1 = spawn(&tmp.path().join("n1"), args(&[])).await;
    let http_port = n1.http.rsplit(':').next().unwrap().to_string();
    for (what, listen, http, port) in [
        (
            "p2p",
            format!("/ip4/127.0.0.1/tcp/{}", n1.p2p_port),
            "127.0.0.1:0".to_string(),
            n1.p2p_port.to_string(),
        ),
        (
            "http",
            "/ip4/127.0.0.1/tcp/0".into(),
            n1.http.clone(),
            http_port.clone(),
        ),
    ] {
        let out = tokio::process::Command::new(bin())
            .arg("run")
            .arg("--data-dir")
            .arg(tmp.path().join(format!("second-{what}")))
            .args(["--listen", &listen, "--http", &http, "--cluster-id", CLUSTER])
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: a second node started on the same port");
        assert!(err.contains(&port), "{what}: the message names the port {port}: {err}");
    }
    assert_eq!(n1.api.get("/livez").await.unwrap().status, 200);
}

/// A joining node answers /readyz 503 until its first session with a
/// member has completed, and never 404s an existing id once ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_ready_only_once_it_holds_the_data() {
    const N: usize = 50_000;
    let tmp = tempfile::tempdir().unwrap();
    let n1 = spawn(&tmp.path().join("n1"), args(&[])).await;
    for chunk in (0..N).collect::<Vec<_>>().chunks(2_000) {
        let puts: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"id": format!("item.{i}"), "content": {"n": i, "pad": "x".repeat(40)}}))
            .collect();
        let r = n1
            .api
            .ok_json(n1.api.post_json("/v1/batch", &json!({"put": puts})).await)
            .await
            .unwrap();
        assert_eq!(r["succeeded"], chunk.len(), "{r}");
    }
    assert_eq!(n1.root().await.unwrap().1, N as u64);
    let n2 = spawn(&tmp.path().join("n2"), args(&boot(&n1))).await;
    let mut saw_503 = false;
    let start = Instant::now();
    loop {
        let r = n2.api.get("/readyz").await.unwrap();
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        let body = r.json().unwrap();
        assert!(
            body["reasons"].to_string().contains("joining"),
            "the reason says the node is joining: {body}"
        );
        saw_503 = true;
        assert!(start.elapsed() < Duration::from_secs(240), "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_503, "a node joining a 50k-item cluster was ready at once");
    // Ready: every id is there.
    assert_eq!(n2.root().await.unwrap().1, N as u64, "ready before holding the data");
    for chunk in (0..N).collect::<Vec<_>>().chunks(5_000) {
        let ids: Vec<String> = chunk.iter().map(|i| format!("item.{i}")).collect();
        let r = n2
            .api
            .ok_json(n2.api.post_json("/v1/get", &json!({"ids": ids})).await)
            .await
            .unwrap();
        let missing = r.as_array().unwrap().iter().filter(|v| v.is_null()).count();
        assert_eq!(missing, 0, "ids missing on a ready node");
    }
    for i in (0..N).step_by(997) {
        assert_eq!(status_of(&n2, &format!("item.{i}")).await, 200);
    }
}

/// `members forget` of a dead member lets the purge run; the member coming
/// back with stale copies is refused and converges without bringing any
/// delete back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_dead_member_lets_the_purge_run() {
    let tmp = tempfile::tempdir().unwrap();
    let fast = s(&["--tombstone-grace", "1s"]);
    let a = spawn(&tmp.path().join("a"), args(&fast)).await;
    let b = spawn(&tmp.path().join("b"), args(&[fast.clone(), boot(&a)].concat())).await;
    let mut c = spawn(&tmp.path().join("c"), args(&[fast.clone(), boot(&a)].concat())).await;
    for i in 0..10 {
        put(&a, &format!("x{i}"), "v1").await;
    }
    syncnode::process::converge(&[&a, &b, &c], Duration::from_secs(60))
        .await
        .unwrap();
    c.kill().await.unwrap();
    for i in 0..5 {
        a.api.ok_json(a.api.delete_item(&format!("x{i}")).await).await.unwrap();
    }
    syncnode::process::converge(&[&a, &b], Duration::from_secs(60))
        .await
        .unwrap();
    // c is a member (down, not expired): nothing may be purged.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        a.metric("syncnode_tombstones_purged_total").await.unwrap(),
        0.0,
        "purged while member c ({}) was down; members: {}\n{}",
        c.peer_id,
        a.api.get("/v1/members").await.unwrap().text(),
        std::fs::read_to_string(a.dir.join("stderr.log")).unwrap_or_default()
    );
    // Forgetting an alive member is refused; a dead one goes.
    let alive_one = a
        .api
        .call(hyper::Method::DELETE, &format!("/v1/members/{}", b.peer_id), None)
        .await
        .unwrap();
    assert_eq!(alive_one.status, 409, "{}", alive_one.text());
    for n in [&a, &b] {
        let out = tokio::process::Command::new(bin())
            .args(["members", "--api", &format!("http://{}", n.http), "forget", &c.peer_id])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            !n.members()
                .await
                .unwrap()
                .iter()
                .any(|m| m["peer_id"] == c.peer_id.as_str())
        );
    }
    for n in [&a, &b] {
        eventually(
            "the purge runs once c is forgotten",
            Duration::from_secs(30),
            || async {
                let purged = n.metric("syncnode_tombstones_purged_total").await.unwrap();
                if purged >= 5.0 {
                    Ok(())
                } else {
                    Err(format!("{purged} purged"))
                }
            },
        )
        .await;
    }
    // c comes back with its stale copies of x0..x4.
    let c = c.restart(bin()).await.unwrap();
    syncnode::process::converge(&[&a, &b, &c], Duration::from_secs(90))
        .await
        .unwrap();
    for n in [&a, &b, &c] {
        for i in 0..5 {
            assert_eq!(
                status_of(n, &format!("x{i}")).await,
                404,
                "x{i} came back on {}",
                n.peer_id
            );
        }
        for i in 5..10 {
            assert_eq!(status_of(n, &format!("x{i}")).await, 200);
        }
    }
    let refused = a.metric("syncnode_resurrections_refused_total").await.unwrap()
        + b.metric("syncnode_resurrections_refused_total").await.unwrap();
    assert!(refused > 0.0, "c's stale copies were never offered and refused");
}

/// At the default level, what an operator can fix gets one WARN line that
/// names the address or peer: a dead bootstrap address, another PSK, a
/// wrong peer id, another cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigurations_are_named_in_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (k1, k2) = (tmp.path().join("k1"), tmp.path().join("k2"));
    syncnode::identity::write_psk(&k1).unwrap();
    syncnode::identity::write_psk(&k2).unwrap();
    let psk = |k: &Path| vec!["--psk-file".to_string(), k.display().to_string()];
    let n1 = spawn(&tmp.path().join("n1"), args(&psk(&k1))).await;
    let dead = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let other_id = syncnode::identity::load_or_create(&tmp.path().join("nobody"))
        .unwrap()
        .0
        .public()
        .to_peer_id();
    let wrong_id = format!("/ip4/127.0.0.1/tcp/{}/p2p/{other_id}", n1.p2p_port);
    let x_dead = spawn(
        &tmp.path().join("dead"),
        args(&[psk(&k1), vec!["--bootstrap".into(), dead.clone()]].concat()),
    )
    .await;
    let x_psk = spawn(&tmp.path().join("psk"), args(&[psk(&k2), boot(&n1)].concat())).await;
    let x_id = spawn(
        &tmp.path().join("id"),
        args(&[psk(&k1), vec!["--bootstrap".into(), wrong_id]].concat()),
    )
    .await;
    let mut other = syncnode::process::loopback_args("another-cluster", &[]);
    other.extend([psk(&k1), boot(&n1)].concat());
    let x_cluster = spawn(&tmp.path().join("cluster"), other).await;
    let log = |p: &Proc| std::fs::read_to_string(p.dir.join("stderr.log")).unwrap();
    let warns = |p: &Proc, needle: &str| -> Vec<String> {
        log(p)
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(needle))
            .map(str::to_string)
            .collect()
    };
    // A failed handshake may take until the transport's 20 s timeout.
    let limit = Duration::from_secs(40);
    let n1_host = n1.addr.split("/p2p").next().unwrap().to_string();
    let checks: Vec<(&Proc, &str, Vec<String>)> = vec![
        (
            &x_dead,
            "cannot reach a bootstrap address",
            vec![dead.clone(), "refused".into()],
        ),
        (&x_psk, "pre-shared key", vec![n1_host]),
        (&n1, "pre-shared key", vec![]),
        (&x_id, "another peer id", vec![other_id.to_string(), n1.peer_id.clone()]),
        (&n1, "another cluster", vec![x_cluster.peer_id.clone()]),
    ];
    for (p, needle, names) in &checks {
        eventually(&format!("a WARN about {needle:?}"), limit, || async {
            let w = warns(p, needle);
            match w.first() {
                Some(line) if names.iter().all(|n| line.contains(n.as_str())) => Ok(()),
                _ => Err(format!("{w:?}\n{}", log(p))),
            }
        })
        .await;
    }
    // Rate-limited: one line each, though the dials go on.
    assert_eq!(warns(&x_dead, "cannot reach a bootstrap address").len(), 1);
    assert_eq!(warns(&n1, "another cluster").len(), 1);
}

/// libfaketime, which `scripts/test` installs (Debian `faketime`).
fn libfaketime() -> String {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    assert!(
        Path::new(lib).exists(),
        "{lib} is missing: run the tests through ./scripts/test, which installs Debian's faketime"
    );
    lib.to_string()
}

/// A node whose clock runs 5 s ahead: the others measure its offset (within
/// 10 %), it refuses writes with the reason while its clock is off (and is
/// not ready), and takes them again once its clock is set back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_runs_ahead_refuses_writes_until_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let n1 = spawn(&tmp.path().join("n1"), args(&[])).await;
    let n2 = spawn(&tmp.path().join("n2"), args(&boot(&n1))).await;
    let skew = tmp.path().join("skew");
    std::fs::write(&skew, "+5s\n").unwrap();
    let env = vec![
        ("LD_PRELOAD".to_string(), libfaketime()),
        ("FAKETIME_TIMESTAMP_FILE".to_string(), skew.display().to_string()),
        ("FAKETIME_NO_CACHE".to_string(), "1".to_string()),
        // Timers run on the monotonic clock; only the wall clock is off.
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string()),
    ];
    let fast = Proc::spawn_with(bin(), &tmp.path().join("fast"), "run", args(&boot(&n1)), env)
        .await
        .unwrap();
    for n in [&n1, &n2] {
        eventually("the others measure the offset", Duration::from_secs(20), || async {
            let m = n.members().await.unwrap();
            let off = m
                .iter()
                .find(|m| m["peer_id"] == fast.peer_id.as_str())
                .and_then(|m| m["clock_offset_ms"].as_i64());
            match off {
                Some(o) if (4_500..=5_500).contains(&o) => Ok(()),
                other => Err(format!("{} measures {other:?}", n.peer_id)),
            }
        })
        .await;
        let text = n.api.get("/metrics").await.unwrap().text();
        let line = text
            .lines()
            .find(|l| l.starts_with("syncnode_peer_clock_offset_seconds{") && l.contains(&fast.peer_id))
            .unwrap_or_else(|| panic!("no offset metric for the fast node:\n{text}"));
        let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((4.5..=5.5).contains(&secs), "{line}");
    }
    eventually("the fast node refuses writes", Duration::from_secs(20), || async {
        let a = fast.api.put_item("t", Bytes::from_static(b"x"), false).await.unwrap();
        if a.status != 503 {
            return Err(format!("{} {}", a.status, a.text()));
        }
        let body = a.json().unwrap();
        if body["detail"].as_str().is_some_and(|d| d.contains("clock")) {
            Ok(())
        } else {
            Err(body.to_string())
        }
    })
    .await;
    let r = fast.api.get("/readyz").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("clock"), "{}", r.text());
    // The healthy nodes take writes all along.
    put(&n1, "healthy", "yes").await;
    eventually(
        "the others warn about the fast node",
        Duration::from_secs(10),
        || async {
            let log = std::fs::read_to_string(n1.dir.join("stderr.log")).unwrap();
            if log
                .lines()
                .any(|l| l.contains("WARN") && l.contains("max_clock_skew") && l.contains(&fast.peer_id))
            {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;

    std::fs::write(&skew, "+0s\n").unwrap();
    eventually(
        "the fast node serves again once its clock is back",
        Duration::from_secs(30),
        || async {
            let a = fast.api.put_item("t", Bytes::from_static(b"x"), false).await.unwrap();
            if a.status == 200 {
                Ok(())
            } else {
                Err(format!("{} {}", a.status, a.text()))
            }
        },
    )
    .await;
    eventually("and is ready", Duration::from_secs(10), || async {
        let r = fast.api.get("/readyz").await.unwrap();
        if r.status == 200 { Ok(()) } else { Err(r.text()) }
    })
    .await;
}

/// With more members than `max_peers`, a node keeps fewer connections, and
/// membership and replication still reach everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_larger_than_max_peers_still_reaches_everyone() {
    let tmp = tempfile::tempdir().unwrap();
    let cap = ["--max-peers".to_string(), "1".to_string()];
    let n1 = spawn(&tmp.path().join("n1"), args(&cap)).await;
    let mut rest = Vec::new();
    for i in 2..=5 {
        rest.push(
            spawn(
                &tmp.path().join(format!("n{i}")),
                args(&[cap.to_vec(), boot(&n1)].concat()),
            )
            .await,
        );
    }
    let all: Vec<&Proc> = std::iter::once(&n1).chain(rest.iter()).collect();
    all_see_each_other(&all, Duration::from_secs(30)).await;
    put(&rest[3], "capped", "from n5").await;
    for p in &all {
        eventually("the write reaches every node", Duration::from_secs(30), || async {
            match status_of(p, "capped").await {
                200 => Ok(()),
                s => Err(format!("{} answers {s}", p.peer_id)),
            }
        })
        .await;
    }
    syncnode::process::converge(&all, Duration::from_secs(60))
        .await
        .unwrap();
}
