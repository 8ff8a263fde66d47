//! Running under systemd: the unit in `deploy/` passes `systemd-analyze
//! verify` and keeps a low exposure score, and a node speaks the sd_notify
//! protocol as `Type=notify` expects: `STATUS=` while it joins, `READY=1`
//! once it has caught up, `STOPPING=1` on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};
use syncnode::process::{NodeProcess as Proc, loopback_args};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

fn unit() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/syncnode.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    std::process::Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (package systemd; ./scripts/test installs it)")
}

#[test]
fn the_unit_verifies_and_is_hardened() {
    let unit = unit();
    for key in [
        "Type=notify",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == key), "the unit sets {key}");
    }
    // verify checks ExecStart's binary exists: point it at the built one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("syncnode.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/syncnode", bin().to_str().unwrap())).unwrap();
    let out = systemd_analyze(&["verify", path.to_str().unwrap()]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Exposure on systemd's 0–100 scale ("OK" is below 40 on its 0–10 one).
    let out = systemd_analyze(&["security", "--offline=true", "--threshold=25", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "exposure above 2.5: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Reads notifications until one contains `want`; returns all read.
fn wait_for(sock: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while start.elapsed() < within {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want:?} within {within:?}; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a_args = loopback_args("notify", &[]);
    a_args.extend(["--gossip-interval", "200ms"].map(String::from));
    let a = Proc::spawn(bin(), &tmp.path().join("a"), a_args).await.unwrap();
    for i in 0..300 {
        a.api
            .ok_json(a.api.put_item(&format!("x{i}"), "v".into(), false).await)
            .await
            .unwrap();
    }
    let path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut b_args = loopback_args("notify", &[&a]);
    b_args.extend(["--gossip-interval", "200ms"].map(String::from));
    let b = Proc::spawn_with(
        bin(),
        &tmp.path().join("b"),
        "run",
        b_args,
        vec![("NOTIFY_SOCKET".into(), path.to_str().unwrap().into())],
    )
    .await
    .unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        let seen = wait_for(&sock, "READY=1", Duration::from_secs(60));
        (sock, seen)
    })
    .await
    .unwrap();
    let (sock, seen) = seen;
    // READY=1 comes only once B holds A's items.
    let (_, count) = b.root().await.unwrap();
    assert_eq!(count, 300, "READY=1 before the node caught up: {seen:?}");
    assert!(
        seen.iter().any(|m| m.starts_with("STATUS=")),
        "a STATUS= line while joining: {seen:?}"
    );
    // SIGTERM: STOPPING=1.
    let pid = b.child.id().unwrap();
    assert!(
        std::process::Command::new("kill")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
    tokio::task::spawn_blocking(move || wait_for(&sock, "STOPPING=1", Duration::from_secs(30)))
        .await
        .unwrap();
    drop((a, b));
}
