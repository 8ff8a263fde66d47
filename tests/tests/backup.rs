//! Backup and restore of a node, as docs/operations.md tells operators to
//! do it: a backup taken while the cluster writes, restored into a fresh
//! node, which then catches up by anti-entropy and holds exactly what
//! clients were told, including writes and deletes made after the backup.
//! SQLite through `syncnode backup` / `syncnode restore`; MariaDB through
//! `mariadb-dump --single-transaction` into a new database.

mod common;

use std::path::Path;
use std::time::Duration;
use syncnode::process::{NodeProcess as Proc, converge, loopback_args};
use syncnode_tests::history::History;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

fn args(bootstrap: &[&Proc], extra: &[String]) -> Vec<String> {
    let mut a = loopback_args("backup", bootstrap);
    a.extend(["--gossip-interval", "200ms", "--probe-interval", "200ms"].map(String::from));
    a.extend(extra.iter().cloned());
    a
}

/// Runs the `syncnode` binary with `args`; returns stdout, failing with stderr.
fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "syncnode {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes before the backup, then more writes and deletes after it.
async fn before(h: &History, a: &Proc, b: &Proc) {
    for k in 0..200 {
        let node = if k % 2 == 0 { a } else { b };
        h.put(node, &format!("item.{k}"), &format!("v{k}")).await.unwrap();
    }
    converge(&[a, b], Duration::from_secs(60)).await.unwrap();
}

async fn after(h: &History, a: &Proc, b: &Proc) {
    for k in 0..50 {
        h.put(b, &format!("later.{k}"), "after the backup").await.unwrap();
        h.put(a, &format!("item.{k}"), "overwritten after the backup")
            .await
            .unwrap();
    }
    for k in 150..170 {
        h.del(a, &format!("item.{k}")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_backup_restored_into_a_fresh_node_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Proc::spawn(bin(), &tmp.path().join("a"), args(&[], &[])).await.unwrap();
    let b = Proc::spawn(bin(), &tmp.path().join("b"), args(&[&a], &[]))
        .await
        .unwrap();
    let h = History::default();
    before(&h, &a, &b).await;

    let file = tmp.path().join("a.backup");
    let api = format!("http://{}", a.http);
    cli(&["backup", "--api", &api, "--out", file.to_str().unwrap()]);
    // A second backup never overwrites the first.
    let again = std::process::Command::new(bin())
        .args(["backup", "--api", &api, "--out", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success(), "a backup overwrote an existing file");
    after(&h, &a, &b).await;

    let c_dir = tmp.path().join("c");
    let said = cli(&[
        "restore",
        "--data-dir",
        c_dir.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
    ]);
    assert!(said.starts_with("restored 200 entries"), "restore said {said:?}");
    let again = std::process::Command::new(bin())
        .args([
            "restore",
            "--data-dir",
            c_dir.to_str().unwrap(),
            "--from",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success(), "restore into a used data dir");

    let c = Proc::spawn(bin(), &c_dir, args(&[&a], &[])).await.unwrap();
    converge(&[&a, &b, &c], Duration::from_secs(60)).await.unwrap();
    h.assert_held(&[&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_dump_restored_into_a_fresh_node_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let source = common::fresh_mysql_db().await;
    let a = Proc::spawn(
        bin(),
        &tmp.path().join("a"),
        args(&[], &["--sql-url".into(), source.clone()]),
    )
    .await
    .unwrap();
    let b = Proc::spawn(bin(), &tmp.path().join("b"), args(&[&a], &[]))
        .await
        .unwrap();
    let h = History::default();
    before(&h, &a, &b).await;

    // `syncnode backup` is for SQLite; a MariaDB node says what to use.
    let refused = std::process::Command::new(bin())
        .args(["backup", "--api", &format!("http://{}", a.http), "--out"])
        .arg(tmp.path().join("no.backup"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("mariadb-dump"), "{said}");
    assert!(!tmp.path().join("no.backup").exists());

    // mariadb-dump of the live database, loaded into a new one.
    let target = common::fresh_mysql_db().await;
    let conn = |url: &str| -> (Vec<String>, String) {
        // mysql://user:pass@host:port/db
        let rest = url.split("://").nth(1).unwrap();
        let (creds, hostdb) = rest.split_once('@').unwrap();
        let (user, pass) = creds.split_once(':').unwrap();
        let (hostport, db) = hostdb.split_once('/').unwrap();
        let (host, port) = hostport.split_once(':').unwrap();
        (
            vec![
                format!("--host={host}"),
                format!("--port={port}"),
                format!("--user={user}"),
                format!("--password={pass}"),
            ],
            db.to_string(),
        )
    };
    let (opts, src_db) = conn(&source);
    let dump = std::process::Command::new("mariadb-dump")
        .args(&opts)
        .args(["--single-transaction", &src_db])
        .output()
        .expect("mariadb-dump (installed with mariadb-server by ./scripts/test)");
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let (opts, dst_db) = conn(&target);
    let mut load = std::process::Command::new("mariadb")
        .args(&opts)
        .arg(&dst_db)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    load.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
    let loaded = load.wait_with_output().unwrap();
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    after(&h, &a, &b).await;

    let c = Proc::spawn(bin(), &tmp.path().join("c"), args(&[&a], &["--sql-url".into(), target]))
        .await
        .unwrap();
    converge(&[&a, &b, &c], Duration::from_secs(60)).await.unwrap();
    h.assert_held(&[&a, &b, &c]).await;
}
