//! A child process for the durability tests: opens an engine and writes a
//! known sequence, printing `ack <i>` only after each write was acknowledged.
//! The test kills it with SIGKILL at a random moment and checks every
//! acknowledged write survived. Usage: `ack_writer <data_dir> [sql_url]`.

use std::io::Write;
use syncnode::{SyncEngine, SyncEngineConfig, SyncItem};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data_dir = args.next().ok_or_else(|| anyhow::anyhow!("usage: ack_writer <data_dir> [sql_url]"))?;
    let mut config = SyncEngineConfig::for_dir(data_dir, "writer");
    config.sql_url = args.next();
    let engine = std::sync::Arc::new(SyncEngine::with_config(config));
    engine.start().await?;
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    println!("ready");
    // Four concurrent writers: single submits and batches, interleaved.
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let engine = engine.clone();
        let stdout = stdout.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            loop {
                if w == 0 {
                    let batch: Vec<SyncItem> = (0..20).map(|j| SyncItem::new(syncnode_tests::key(i + 4 * j), syncnode_tests::value(i + 4 * j))).collect();
                    engine.submit_many(batch).await.expect("batch");
                    let mut out = stdout.lock().unwrap();
                    for j in 0..20 {
                        writeln!(out, "ack {}", i + 4 * j).unwrap();
                    }
                    out.flush().unwrap();
                    i += 80;
                } else {
                    engine.submit(SyncItem::new(syncnode_tests::key(i), syncnode_tests::value(i))).await.expect("submit");
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "ack {i}").unwrap();
                    out.flush().unwrap();
                    i += 4;
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
