//! Membership across hosts: a second host is a network namespace joined to
//! this one by a veth link, with its own addresses and its own loopback.
//! Node A listens on 0.0.0.0 here; B and D run on the other host, D joining
//! through B's loopback only. D can reach A only if A advertised its
//! interface addresses (its loopback is D's own there). Needs root for
//! `ip netns` (`scripts/test` runs as root in CI).

use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use syncnode::process::NodeProcess as Proc;

const CLUSTER: &str = "netns-test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

fn ip(args: &[&str]) {
    syncnode_tests::lan::sh("ip", args);
}

/// A namespace linked to this one by a veth pair (`10.77.N.1` here,
/// `10.77.N.2` there); removed on drop.
struct Host {
    ns: String,
    link: String,
    here: String,
    there: String,
}

impl Host {
    fn new() -> Host {
        syncnode_tests::lan::require_root("network namespaces");
        let n = std::process::id() % 250 + 1;
        let (ns, link, peer) = (format!("sn{n}"), format!("sna{n}"), format!("snb{n}"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &link, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        let (here, there) = (format!("10.77.{n}.1"), format!("10.77.{n}.2"));
        ip(&["addr", "add", &format!("{here}/24"), "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{there}/24"), "dev", &peer]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Host { ns, link, here, there }
    }

    /// A script that runs the node binary inside the namespace.
    fn wrapper(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("in-{}.sh", self.ns));
        std::fs::write(
            &path,
            format!("#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n", self.ns, bin().display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.link]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn args(listen: &str, http: &str, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--listen",
        listen,
        "--http",
        http,
        "--cluster-id",
        CLUSTER,
        "--gossip-interval",
        "200ms",
        "--probe-interval",
        "200ms",
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().cloned());
    a
}

async fn member_state(p: &Proc, peer: &str) -> Option<(String, bool)> {
    let v = p.api.ok_json(p.api.get("/v1/members").await).await.ok()?;
    v["members"].as_array()?.iter().find(|m| m["peer_id"] == peer).map(|m| {
        (
            m["state"].as_str().unwrap_or_default().to_string(),
            m["connected"] == true,
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_listener_is_reached_from_another_host_through_its_advertised_addresses() {
    let host = Host::new();
    let tmp = tempfile::tempdir().unwrap();
    let other = host.wrapper(tmp.path());
    let a = Proc::spawn(
        bin(),
        &tmp.path().join("a"),
        args("/ip4/0.0.0.0/tcp/0", "127.0.0.1:0", &[]),
    )
    .await
    .unwrap();
    let health = a.api.ok_json(a.api.get("/health").await).await.unwrap();
    let advertised: Vec<String> = serde_json::from_value(health["advertise"].clone()).unwrap();
    assert!(
        advertised
            .iter()
            .any(|x| x.starts_with(&format!("/ip4/{}/", host.here))),
        "A advertises its veth address: {advertised:?}"
    );
    assert!(
        advertised
            .iter()
            .all(|x| !x.contains("127.0.0.1") && !x.contains("0.0.0.0")),
        "{advertised:?}"
    );
    let a_there = format!("/ip4/{}/tcp/{}/p2p/{}", host.here, a.p2p_port, a.peer_id);
    let b = Proc::spawn(
        &other,
        &tmp.path().join("b"),
        args(
            "/ip4/0.0.0.0/tcp/0",
            &format!("{}:0", host.there),
            &["--bootstrap".into(), a_there],
        ),
    )
    .await
    .unwrap();
    // D knows only B, by B's loopback on their host.
    let d = Proc::spawn(
        &other,
        &tmp.path().join("d"),
        args(
            "/ip4/0.0.0.0/tcp/0",
            &format!("{}:0", host.there),
            &[
                "--bootstrap".into(),
                format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", b.p2p_port, b.peer_id),
            ],
        ),
    )
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let d_sees_a = member_state(&d, &a.peer_id).await;
        let a_sees_d = member_state(&a, &d.peer_id).await;
        let want = Some(("alive".to_string(), true));
        if d_sees_a == want && a_sees_d == want {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "D and A never connected across hosts: D sees A {d_sees_a:?}, A sees D {a_sees_d:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And data flows between the hosts.
    d.api
        .ok_json(d.api.put_item("cross.host", Bytes::from_static(b"from d"), false).await)
        .await
        .unwrap();
    let start = Instant::now();
    while a.api.get_item("cross.host").await.unwrap().status != 200 {
        assert!(start.elapsed() < Duration::from_secs(30), "D's write never reached A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b, d));
}
