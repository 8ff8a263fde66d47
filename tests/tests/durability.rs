//! Acknowledged writes survive `kill -9`: a child process writes a known
//! sequence and prints each acknowledgement; we SIGKILL it at a random moment,
//! reopen the engine on the same data dir (and database), and check that every
//! acknowledged item is there with its content. On SQLite and MariaDB.

mod common;

use common::{BACKENDS, Backend, fresh_mysql_db};
use rand::RngExt;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use syncnode::{SyncEngine, SyncEngineConfig};

/// Runs the writer, kills it after `kill_after`, returns the acknowledged indices.
fn run_and_kill(data_dir: &std::path::Path, sql_url: Option<&str>, kill_after: Duration) -> Vec<u64> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ack_writer"));
    cmd.arg(data_dir).stdout(Stdio::piped()).stderr(Stdio::inherit());
    if let Some(u) = sql_url {
        cmd.arg(u);
    }
    let mut child = cmd.spawn().expect("spawn ack_writer");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.strip_prefix("ack ") {
                acks.push(i.parse::<u64>().expect("ack index"));
            }
        }
        acks
    });
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL the writer"); // Child::kill sends SIGKILL on Unix.
    let status = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "the writer ran until SIGKILL (it exits 2 if a write fails): {status:?}"
    );
    reader.join().expect("reader thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let mut rng = rand::rng();
    for backend in BACKENDS {
        for round in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let sql_url = match backend {
                Backend::MariaDb => Some(fresh_mysql_db().await),
                Backend::Sqlite => None,
            };
            let kill_after = Duration::from_millis(rng.random_range(700..2000));
            let dir_path = dir.path().to_path_buf();
            let url = sql_url.clone();
            let acks = tokio::task::spawn_blocking(move || run_and_kill(&dir_path, url.as_deref(), kill_after))
                .await
                .unwrap();
            assert!(
                acks.len() > 20,
                "{backend:?} round {round}: the writer acknowledged only {} writes",
                acks.len()
            );

            let mut config = SyncEngineConfig::for_dir(dir.path(), "writer");
            config.sql_url = sql_url;
            let engine = SyncEngine::with_config(config);
            engine.start().await.expect("reopen after kill -9");
            let ids: Vec<String> = acks.iter().map(|&i| syncnode_tests::key(i)).collect();
            for chunk in ids.chunks(400) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let got = engine.get_many(&refs).await.unwrap();
                for (id, item) in refs.iter().zip(got) {
                    let i: u64 = id.trim_start_matches("dur.").parse().unwrap();
                    let item = item.unwrap_or_else(|| panic!("{backend:?} round {round}: acknowledged {id} lost"));
                    assert_eq!(
                        &item.content[..],
                        &syncnode_tests::value(i)[..],
                        "{backend:?}: content of {id}"
                    );
                }
            }
            // The tree after the unclean stop describes exactly what is stored.
            let stored = engine.count_prefix("dur.").await.unwrap();
            assert!(stored >= acks.len() as u64);
            assert_eq!(
                engine.merkle_summary().1,
                stored,
                "{backend:?}: tree rebuilt to match L3"
            );
            eprintln!(
                "{backend:?} round {round}: killed after {kill_after:?}, {} acks, {stored} stored",
                acks.len()
            );
            engine.shutdown().await;
        }
    }
}
