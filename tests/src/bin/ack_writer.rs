//! A child process for the durability tests: opens an engine and writes a
//! known sequence, printing `ack <i>` only after each write was acknowledged.
//! The test kills it with SIGKILL at a random moment and checks every
//! acknowledged write survived. Usage: `ack_writer <data_dir> [sql_url]`.

use std::io::Write;
use syncnode::{SyncEngine, SyncEngineConfig, SyncItem};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data_dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: ack_writer <data_dir> [sql_url]"))?;
    let mut config = SyncEngineConfig::for_dir(data_dir, "writer");
    config.sql_url = args.next();
    let engine = std::sync::Arc::new(SyncEngine::with_config(config));
    engine.start().await?;
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    println!("ready");
    // Four concurrent writers: single submits and batches, interleaved.
    for w in 0..4u64 {
        let engine = engine.clone();
        let stdout = stdout.clone();
        tokio::spawn(async move {
            let mut i = w;
            loop {
                if w == 0 {
                    let batch: Vec<SyncItem> = (0..20)
                        .map(|j| SyncItem::new(syncnode_tests::key(i + 4 * j), syncnode_tests::value(i + 4 * j)))
                        .collect();
                    let r = engine.submit_many(batch).await.unwrap_or_else(|e| fail(e));
                    if r.failed > 0 {
                        fail(format!("{r:?}"));
                    }
                    let mut out = stdout.lock().unwrap();
                    for j in 0..20 {
                        writeln!(out, "ack {}", i + 4 * j).unwrap();
                    }
                    out.flush().unwrap();
                    i += 80;
                } else {
                    engine
                        .submit(SyncItem::new(syncnode_tests::key(i), syncnode_tests::value(i)))
                        .await
                        .expect("submit");
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "ack {i}").unwrap();
                    out.flush().unwrap();
                    i += 4;
                }
            }
        });
    }
    // Runs until the test kills it.
    std::future::pending::<()>().await;
    Ok(())
}

/// A failed write ends the process with an error the test will see.
fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("ack_writer: write failed: {e}");
    std::process::exit(2)
}
