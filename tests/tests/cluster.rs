//! Real `syncnode run` processes on loopback, each with its own data dir,
//! driven through their HTTP API: convergence to the last-writer-wins
//! winners, partitions with conflicting writes and deletes, SIGKILL and
//! restart, an empty node joining, outsiders (wrong PSK, wrong cluster, not
//! allowed) kept out, and garbage on every port.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use syncnode::client::{Answer, ApiClient};
use syncnode::process::NodeProcess as Proc;
use tokio::io::AsyncWriteExt;

const CLUSTER: &str = "proc-test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

async fn spawn_proc(dir: &Path, args: Vec<String>) -> Proc {
    Proc::spawn(bin(), dir, args).await.unwrap()
}

/// A loopback node with a short gossip interval and a 64 KiB item limit.
fn base_args(cluster: &str, extra: &[String]) -> Vec<String> {
    let mut a = syncnode::process::loopback_args(cluster, &[]);
    a.extend(["--gossip-interval", "200ms", "--max-payload-bytes", "65536"].map(String::from));
    a.extend(extra.iter().cloned());
    a
}

fn bootstrap(of: &[&Proc]) -> Vec<String> {
    of.iter()
        .flat_map(|p| ["--bootstrap".to_string(), p.addr.clone()])
        .collect()
}

/// What one acknowledged write said.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Receipt {
    version: u64,
    origin: String,
    hash: String,
}

async fn put(p: &Proc, id: &str, value: &str) -> anyhow::Result<Receipt> {
    let r = p
        .api
        .ok_json(p.api.put_item(id, Bytes::from(value.to_string()), false).await)
        .await?;
    Ok(Receipt {
        version: syncnode::client::version(&r["version"]).unwrap(),
        origin: r["origin"].as_str().unwrap().to_string(),
        hash: r["content_hash"].as_str().unwrap().to_string(),
    })
}

async fn del(p: &Proc, id: &str) {
    let r = p.api.ok_json(p.api.delete_item(id).await).await.unwrap();
    assert!(
        syncnode::client::version(&r["version"]).is_some() && r["origin"].is_string(),
        "delete of {id} gave {r}"
    );
}

async fn root(p: &Proc) -> (Option<String>, u64) {
    p.root().await.unwrap()
}

/// Waits until every node shows the same Merkle root.
async fn converge(nodes: &[&Proc], what: &str) {
    if let Err(e) = syncnode::process::converge(nodes, Duration::from_secs(120)).await {
        panic!("{what}: {e}");
    }
}

/// Every key on every node is its LWW winner among the receipts.
async fn check_winners(nodes: &[&Proc], acked: &BTreeMap<String, Vec<Receipt>>) {
    for (id, receipts) in acked {
        let winner = receipts.iter().max().unwrap();
        for n in nodes {
            let a = n.api.get_item(id).await.unwrap();
            assert_eq!(a.status, 200, "{id} on {}: {}", n.peer_id, a.text());
            let h = |k: &str| a.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            assert_eq!(h("x-version"), winner.version.to_string(), "{id} on {}", n.peer_id);
            assert_eq!(h("x-origin"), winner.origin, "{id} on {}", n.peer_id);
            assert_eq!(h("etag"), format!("\"{}\"", winner.hash), "{id} on {}", n.peer_id);
        }
    }
}

async fn block(a: &Proc, b: &Proc, on: bool) {
    a.block(b, on).await.unwrap();
}

/// How many sessions `p` ran with `other`, and whether the last one decoded
/// coded symbols (finished, without walking the tree), from `/v1/peers`.
async fn sessions_with(p: &Proc, other: &Proc) -> (u64, bool) {
    let v = p.api.ok_json(p.api.get("/v1/peers").await).await.unwrap();
    let Some(e) = v
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["peer_id"] == other.peer_id.as_str())
    else {
        return (0, false);
    };
    let last = &e["last_session"];
    let rateless = last["walked"] == false && last["error"].is_null() && last["symbols"].as_u64().unwrap_or(0) > 0;
    (e["sessions"].as_u64().unwrap_or(0), rateless)
}

/// `syncnode_rateless_sessions_total`, summed over `nodes`.
async fn rateless_sessions(nodes: &[&Proc]) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        let text = n.api.get("/metrics").await.unwrap().text();
        sum += text
            .lines()
            .find_map(|l| l.strip_prefix("syncnode_rateless_sessions_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no syncnode_rateless_sessions_total:\n{text}"));
    }
    sum
}

async fn connected_peers(p: &Proc) -> Vec<String> {
    let v = p.api.ok_json(p.api.get("/v1/peers").await).await.unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|x| x["connected"] == true)
        .map(|x| x["peer_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_converges_heals_partitions_and_survives_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let n1 = spawn_proc(&tmp.path().join("n1"), base_args(CLUSTER, &[])).await;
    let n2 = spawn_proc(&tmp.path().join("n2"), base_args(CLUSTER, &bootstrap(&[&n1]))).await;
    let n3 = spawn_proc(&tmp.path().join("n3"), base_args(CLUSTER, &bootstrap(&[&n1, &n2]))).await;
    let nodes = [&n1, &n2, &n3];
    let mut acked: BTreeMap<String, Vec<Receipt>> = BTreeMap::new();

    // Writes spread over all nodes, half the keys overwritten from another node.
    for k in 0..150usize {
        let id = format!("k{k}");
        let r = put(nodes[k % 3], &id, &format!("first {k}")).await.unwrap();
        acked.entry(id).or_default().push(r);
    }
    for k in (0..150usize).step_by(2) {
        let id = format!("k{k}");
        let r = put(nodes[(k + 1) % 3], &id, &format!("second {k}")).await.unwrap();
        acked.entry(id).or_default().push(r);
    }
    converge(&nodes, "initial writes").await;
    check_winners(&nodes, &acked).await;

    // Partition {n1, n2} | {n3}: conflicting writes, deletes, new items on both sides.
    block(&n1, &n3, true).await;
    block(&n2, &n3, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for k in 0..40usize {
        let id = format!("c{k}");
        for (side, n) in [("A", &n1), ("B", &n3)] {
            let r = put(n, &id, &format!("{side} {k}")).await.unwrap();
            acked.entry(id.clone()).or_default().push(r);
        }
        let id = format!("new{k}");
        let r = put(if k % 2 == 0 { &n2 } else { &n3 }, &id, "new").await.unwrap();
        acked.entry(id).or_default().push(r);
    }
    let mut deleted = Vec::new();
    for k in 100..130usize {
        let id = format!("k{k}");
        del(if k < 120 { &n1 } else { &n3 }, &id).await;
        acked.remove(&id);
        deleted.push(id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(root(&n1).await, root(&n3).await, "the partition held");

    let pairs = [(&n1, &n3), (&n3, &n1), (&n2, &n3), (&n3, &n2)];
    let mut before = Vec::new();
    for (a, b) in pairs {
        before.push(sessions_with(a, b).await.0);
    }
    let rateless_before = rateless_sessions(&nodes).await;
    block(&n1, &n3, false).await;
    block(&n2, &n3, false).await;
    converge(&nodes, "after the heal").await;
    check_winners(&nodes, &acked).await;
    // A session across the healed cut decoded coded symbols (all three
    // speak wire 3; the initiator records its session one answer after the
    // roots agree), and the metric counted it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut healed_rateless = false;
        for ((a, b), n) in pairs.iter().zip(&before) {
            let (sessions, rateless) = sessions_with(a, b).await;
            healed_rateless |= sessions > *n && rateless;
        }
        if healed_rateless && rateless_sessions(&nodes).await > rateless_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no session across the healed cut was rateless"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &deleted {
        for n in nodes {
            assert_eq!(
                n.api.get_item(id).await.unwrap().status,
                404,
                "{id} came back on {}",
                n.peer_id
            );
        }
    }

    // Garbage on the libp2p ports.
    for n in nodes {
        for round in 0..20u8 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", n.p2p_port)).await {
                let mut junk: Vec<u8> = (0..4096u32)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(round))
                    .collect();
                if round % 2 == 0 {
                    junk.splice(0..0, b"\x13/multistream/1.0.0\n".iter().copied());
                }
                let _ = s.write_all(&junk).await;
                let _ = s.shutdown().await;
            }
        }
    }
    // Malformed HTTP, raw and through the client.
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /v1/items/%ZZ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /v1/items/a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nabc",
        b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x00\x01\x02\x03\xff\xfe",
    ] {
        for n in nodes {
            if let Ok(mut s) = tokio::net::TcpStream::connect(&n.http).await {
                let _ = s.write_all(raw).await;
                let _ = s.shutdown().await;
            }
        }
    }
    // Answered before its body is in: the connection closes (the unread
    // rest would sit in front of the next request).
    {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(&n1.http).await.unwrap();
        s.write_all(b"PUT /no/such/thing HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 99999999\r\n\r\nabc")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection after its answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 404"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }
    type BadCall<'a> = (hyper::Method, &'a str, Option<(&'a str, &'a [u8])>, u16);
    let bad: Vec<BadCall> = vec![
        (
            hyper::Method::PUT,
            "/v1/items/bad",
            Some(("application/json", b"{not json")),
            400,
        ),
        (hyper::Method::PUT, "/v1/items/%01ctl", Some(("text/plain", b"x")), 400),
        (
            hyper::Method::PUT,
            "/v1/items/big",
            Some(("text/plain", &[b'x'; 200_000])),
            413,
        ),
        (
            hyper::Method::PUT,
            "/v1/items/t?tier=nope",
            Some(("text/plain", b"x")),
            400,
        ),
        (hyper::Method::GET, "/v1/items?limit=abc", None, 400),
        (hyper::Method::POST, "/v1/batch", Some(("application/json", b"{")), 400),
        (
            hyper::Method::POST,
            "/v1/get",
            Some(("application/json", b"{\"ids\": 5}")),
            422,
        ),
        (hyper::Method::GET, "/v1/merkle/zz", None, 400),
        (
            hyper::Method::POST,
            "/v1/indexes/none/search",
            Some((
                "application/json",
                b"{\"query\":{\"eq\":{\"field\":\"a\",\"value\":1}}}",
            )),
            404,
        ),
        (hyper::Method::PUT, "/v1/peers/not-a-peer/block", None, 400),
        (hyper::Method::GET, "/no/such/thing", None, 404),
        (hyper::Method::GET, "/readyz?max_lag_ms=x", None, 400),
    ];
    for (method, path, body, want) in bad {
        let a: Answer = n1
            .api
            .call(method.clone(), path, body.map(|(c, b)| (c, Bytes::copy_from_slice(b))))
            .await
            .unwrap();
        assert_eq!(a.status.as_u16(), want, "{method} {path}: {}", a.text());
        assert!(a.json().unwrap()["error"].is_string(), "{method} {path}: {}", a.text());
    }
    // Every node still serves and still replicates.
    for n in nodes {
        assert_eq!(n.api.get("/livez").await.unwrap().status, 200);
        let ready = n.api.get("/readyz?max_lag_ms=60000").await.unwrap();
        assert_eq!(ready.status, 200, "{}", ready.text());
    }
    let r = put(&n3, "after.garbage", "still here").await.unwrap();
    acked.insert("after.garbage".into(), vec![r]);
    converge(&nodes, "after garbage").await;
    check_winners(&nodes, &acked).await;
    let metrics = n1.api.get("/metrics").await.unwrap().text();
    for m in [
        "syncnode_items ",
        "syncnode_cdc_applied_total",
        "syncnode_peers ",
        "syncnode_peer_lag_seconds{",
    ] {
        assert!(metrics.contains(m), "metrics lack {m}:\n{metrics}");
    }
    let health = n1.api.ok_json(n1.api.get("/health").await).await.unwrap();
    assert_eq!(health["peer_id"], n1.peer_id.as_str());
    assert!(health["listen_addrs"].as_array().is_some_and(|a| !a.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_loses_no_acked_write_and_a_new_node_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let n1 = spawn_proc(&tmp.path().join("n1"), base_args(CLUSTER, &[])).await;
    let mut n2 = spawn_proc(&tmp.path().join("n2"), base_args(CLUSTER, &bootstrap(&[&n1]))).await;
    let n3 = spawn_proc(&tmp.path().join("n3"), base_args(CLUSTER, &bootstrap(&[&n1, &n2]))).await;

    // Load on n2 from 8 writers; SIGKILL it mid-load.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, Receipt>::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (api, acked) = (n2.api.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("w{w}.{i}");
                let Ok(a) = api.put_item(&id, Bytes::from(format!("value {w} {i}")), false).await else {
                    return;
                };
                if !a.status.is_success() {
                    return;
                }
                let r = a.json().unwrap();
                acked.lock().unwrap().insert(
                    id,
                    Receipt {
                        version: syncnode::client::version(&r["version"]).unwrap(),
                        origin: r["origin"].as_str().unwrap().into(),
                        hash: r["content_hash"].as_str().unwrap().into(),
                    },
                );
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    n2.child.start_kill().unwrap();
    n2.child.wait().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "only {} writes acked before the kill", acked.len());

    // Restart n2 on the same data dir and ports.
    let n2 = n2.restart(bin()).await.unwrap();
    let nodes = [&n1, &n2, &n3];
    converge(&nodes, "after restart").await;
    let acked: BTreeMap<String, Vec<Receipt>> = acked.into_iter().map(|(k, v)| (k, vec![v])).collect();
    check_winners(&nodes, &acked).await;

    // An empty node joins and catches up.
    let n4 = spawn_proc(&tmp.path().join("n4"), base_args(CLUSTER, &bootstrap(&[&n3]))).await;
    converge(&[&n1, &n2, &n3, &n4], "joining node").await;
    check_winners(&[&n4], &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_cannot_connect_or_inject() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("cluster.psk");
    let other_key = tmp.path().join("other.psk");
    syncnode::identity::write_psk(&key).unwrap();
    syncnode::identity::write_psk(&other_key).unwrap();
    let id_of = |name: &str| {
        syncnode::identity::load_or_create(&tmp.path().join(name))
            .unwrap()
            .0
            .public()
            .to_peer_id()
            .to_string()
    };
    let (p1, p2, px2) = (id_of("n1"), id_of("n2"), id_of("x2"));
    let psk = |k: &PathBuf| vec!["--psk-file".to_string(), k.display().to_string()];
    let allow = |ids: &[&String]| {
        ids.iter()
            .flat_map(|i| ["--allow-peers".to_string(), (*i).clone()])
            .collect::<Vec<_>>()
    };
    let token = vec!["--api-token".to_string(), "s3cret".to_string()];
    let n1 = spawn_proc(
        &tmp.path().join("n1"),
        base_args(CLUSTER, &[psk(&key), allow(&[&p2, &px2]), token.clone()].concat()),
    )
    .await;
    let n2 = spawn_proc(
        &tmp.path().join("n2"),
        base_args(CLUSTER, &[psk(&key), allow(&[&p1, &px2]), bootstrap(&[&n1])].concat()),
    )
    .await;
    // x1: wrong key; x2: right key, allowed, other cluster; x3: right key and cluster, not allowed; x4: no key.
    let x1 = spawn_proc(
        &tmp.path().join("x1"),
        base_args(CLUSTER, &[psk(&other_key), bootstrap(&[&n1, &n2])].concat()),
    )
    .await;
    let x2 = spawn_proc(
        &tmp.path().join("x2"),
        base_args("elsewhere", &[psk(&key), bootstrap(&[&n1, &n2])].concat()),
    )
    .await;
    let x3 = spawn_proc(
        &tmp.path().join("x3"),
        base_args(CLUSTER, &[psk(&key), bootstrap(&[&n1, &n2])].concat()),
    )
    .await;
    let x4 = spawn_proc(&tmp.path().join("x4"), base_args(CLUSTER, &bootstrap(&[&n1, &n2]))).await;
    let outsiders = [&x1, &x2, &x3, &x4];
    for (i, x) in outsiders.iter().enumerate() {
        put(x, &format!("intruder.{i}"), "bad").await.unwrap();
    }
    // The token guards n1's API.
    let anon = ApiClient::new(format!("http://{}", n1.http), None);
    assert_eq!(anon.get("/v1/merkle").await.unwrap().status, 401);
    assert_eq!(anon.get("/livez").await.unwrap().status, 200);
    let legit = put(&n1, "legit", "from n1").await.unwrap();
    converge(&[&n1, &n2], "members").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for m in [&n1, &n2] {
        let peers = connected_peers(m).await;
        for x in [&x1, &x3, &x4] {
            assert!(
                !peers.contains(&x.peer_id),
                "{} got connected to {}",
                x.peer_id,
                m.peer_id
            );
        }
        for i in 0..outsiders.len() {
            assert_eq!(m.api.get_item(&format!("intruder.{i}")).await.unwrap().status, 404);
        }
    }
    // Without the key the handshake cannot finish at all. (x3 completes it
    // and is then refused, so it may see a connection for a moment.)
    for x in [&x1, &x4] {
        assert!(connected_peers(x).await.is_empty(), "{} has connections", x.peer_id);
    }
    for x in [&x1, &x3, &x4] {
        assert_eq!(x.api.get_item("legit").await.unwrap().status, 404);
    }
    assert_eq!(
        x2.api.get_item("legit").await.unwrap().status,
        404,
        "another cluster got our data"
    );
    check_winners(&[&n2], &BTreeMap::from([("legit".to_string(), vec![legit])])).await;
}
