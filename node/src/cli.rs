//! The `syncnode` command line: `run`, `resync`, `keygen`, `psk`, `status`, `ready`,
//! `members`, `put`, `get`, `del`, `backup`, `restore`, `load` and `demo`. In the library so the test crate runs the very
//! same program as real processes.

use crate::client::ApiClient;
use crate::config::{NodeConfig, Settings};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "syncnode", version, about = "Peer-to-peer anti-entropy replication node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a client command finds the node.
#[derive(clap::Args)]
struct Target {
    /// Base URL of the node's HTTP API.
    #[arg(long, env = "SYNCNODE_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Bearer token of the API.
    #[arg(long, env = "SYNCNODE_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Target {
    fn client(&self) -> ApiClient {
        ApiClient::new(crate::client::base_url(&self.api), self.token.clone())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Runs a node: TOML config, then SYNCNODE_* environment, then flags.
    Run {
        /// TOML config file (keys as in the README).
        #[arg(long, env = "SYNCNODE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Rebuilds this node's copy from a peer and runs it: keeps the identity,
    /// drops the local data (items, purge ledger, members), then joins
    /// through `--from` like a new node. The way back for a node away longer
    /// than `ledger_retention`; takes the same settings as `run`.
    Resync {
        /// The member to bootstrap from (a `bootstrap` address).
        #[arg(long, value_name = "ADDR")]
        from: String,
        #[arg(long, env = "SYNCNODE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Lists the cluster's members, or forgets one (`members forget PEER`).
    Members {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        action: Option<MembersAction>,
    },
    /// Creates the node identity in a data dir (if absent) and prints its peer id.
    Keygen {
        #[arg(long, default_value = "./syncnode-data")]
        data_dir: PathBuf,
    },
    /// Makes a pre-shared cluster key: prints it, or writes it to --out (mode 0600).
    Psk {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Shows a node's health (`--watch` repeats every N seconds).
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
    },
    /// Saves a consistent copy of a running node's SQLite database
    /// (`GET /v1/backup`) to a new file.
    Backup {
        #[command(flatten)]
        target: Target,
        /// The file to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Puts a backup into a new, empty data dir; then `run` it with a
    /// `--bootstrap` to a live member to catch up what came after it.
    Restore {
        /// The data dir to create (must not hold a database yet).
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup file (`syncnode backup`).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
    /// Exits 0 when the node is ready (`/readyz` 200), else prints why and
    /// exits 1: a container HEALTHCHECK or a script's wait, with no curl.
    Ready {
        #[command(flatten)]
        target: Target,
    },
    /// Writes an item (the value, or --file; JSON when it parses as JSON).
    Put {
        #[command(flatten)]
        target: Target,
        id: String,
        value: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Prints an item's content.
    Get {
        #[command(flatten)]
        target: Target,
        id: String,
    },
    /// Deletes an item.
    Del {
        #[command(flatten)]
        target: Target,
        id: String,
    },
    /// Sends a bounded, open-loop load of puts (and deletes) to nodes'
    /// APIs and reports acknowledged operations, errors and latency.
    Load {
        #[command(flatten)]
        load: crate::load::LoadConfig,
        /// Prints the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Three nodes over loopback: writes, a partition, conflicting writes, the heal.
    Demo {
        /// Items to write.
        #[arg(long, default_value_t = 3_000)]
        items: usize,
        /// Walk through one engine instead (writes, overwrites, deletes, restart).
        #[arg(long)]
        engine: bool,
    },
}

#[derive(Subcommand)]
enum MembersAction {
    /// Removes a member that is gone for good (a wiped identity, a
    /// decommissioned host) from the purge watermarks at once; if it ever
    /// returns holding data it must resync.
    Forget { peer: String },
}

async fn members(client: &ApiClient) -> anyhow::Result<()> {
    let v = client.ok_json(client.get("/v1/members").await).await?;
    let me = &v["self"];
    println!(
        "self   {} region {} {}",
        me["peer_id"].as_str().unwrap_or("?"),
        me["region"].as_str().unwrap_or("?"),
        me["addresses"]
    );
    for m in v["members"].as_array().into_iter().flatten() {
        let offset = m["clock_offset_ms"]
            .as_i64()
            .map(|o| format!("{o:+} ms"))
            .unwrap_or_else(|| "?".into());
        println!(
            "{:<7}{} region {} connected {} clock {} watermark {} {}",
            m["state"].as_str().unwrap_or("?"),
            m["peer_id"].as_str().unwrap_or("?"),
            m["region"].as_str().unwrap_or("?"),
            m["connected"],
            offset,
            m["watermark"].as_str().unwrap_or("-"),
            m["addresses"]
        );
    }
    Ok(())
}

async fn status(client: &ApiClient) -> anyhow::Result<()> {
    let h = client.ok_json(client.get("/health").await).await?;
    let peers = client.ok_json(client.get("/v1/peers").await).await?;
    println!(
        "peer {} cluster {} region {} state {} healthy {}",
        h["peer_id"].as_str().unwrap_or("?"),
        h["cluster_id"].as_str().unwrap_or("?"),
        h["region"].as_str().unwrap_or("?"),
        h["state"].as_str().unwrap_or("?"),
        h["healthy"]
    );
    println!(
        "items {} root {} pending {} l1 {} items",
        h["merkle_items"], h["merkle_root"], h["pending_items"], h["l1_items"]
    );
    let ready = client.get("/readyz").await?;
    let r = ready.json().unwrap_or_default();
    println!(
        "ready {} {}",
        r["ready"],
        r["reasons"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; "))
            .unwrap_or_default()
    );
    for s in r["bootstrap"]["sessions"].as_array().into_iter().flatten() {
        println!(
            "  sync from {}: {} items pulled, {} to pull, {:.0}% of its {} items, {:.0} items/s, eta {} ; {} bytes received",
            s["peer"].as_str().unwrap_or("?"),
            s["pulled"],
            s["to_pull"],
            s["percent"].as_f64().unwrap_or(0.0),
            s["peer_items"],
            s["items_per_s"].as_f64().unwrap_or(0.0),
            s["eta_s"]
                .as_f64()
                .map(|e| format!("{e:.0} s"))
                .unwrap_or_else(|| "?".into()),
            r["bootstrap"]["sync_bytes_received"]
        );
    }
    let regions = client.ok_json(client.get("/v1/regions").await).await?;
    for r in regions["regions"].as_array().into_iter().flatten() {
        println!(
            "region {}{}: {} alive, {} connected, lag {}, sent {} B, received {} B",
            r["region"].as_str().unwrap_or("?"),
            if r["region"] == regions["region"] {
                " (ours)"
            } else {
                ""
            },
            r["members_alive"],
            r["connected"],
            r["lag_ms"]
                .as_u64()
                .map(|l| format!("{l} ms"))
                .unwrap_or_else(|| "?".into()),
            r["bytes_sent"],
            r["bytes_received"]
        );
    }
    println!("members {} (alive or suspect)", h["members"]);
    for p in peers.as_array().into_iter().flatten() {
        println!(
            "  peer {} connected {} region {} in_sync {} lag {} ms sessions {}",
            p["peer_id"].as_str().unwrap_or("?"),
            p["connected"],
            p["region"],
            p["in_sync"],
            p["lag_ms"],
            p["sessions"]
        );
    }
    Ok(())
}

/// The program: runs [`main`] and prints an error with its causes on one
/// line (never a Debug dump); exit code 1 on error.
pub async fn program() -> std::process::ExitCode {
    match main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncnode: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses the command line and runs the command.
pub async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,yamux=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run { config, settings } => {
            let file = match config {
                Some(path) => Settings::from_file(&path)?,
                None => Settings::default(),
            };
            crate::run::run(NodeConfig::resolve(file.overlay(*settings))?).await
        }
        Command::Resync { from, config, settings } => {
            let file = match config {
                Some(path) => Settings::from_file(&path)?,
                None => Settings::default(),
            };
            let mut s = file.overlay(*settings);
            s.bootstrap = Some(vec![from]);
            let cfg = NodeConfig::resolve(s)?;
            crate::run::wipe(&cfg).await?;
            crate::run::run(cfg).await
        }
        Command::Members { target, action } => {
            let client = target.client();
            match action {
                None => members(&client).await,
                Some(MembersAction::Forget { peer }) => {
                    let path = format!("/v1/members/{}", crate::client::encode_id(&peer));
                    println!(
                        "{}",
                        client
                            .ok_json(client.call(hyper::Method::DELETE, &path, None).await)
                            .await?
                    );
                    Ok(())
                }
            }
        }
        Command::Keygen { data_dir } => {
            let (key, created) = crate::identity::load_or_create(&data_dir)?;
            println!("{}", key.public().to_peer_id());
            if created {
                eprintln!("created {}", data_dir.join("identity.key").display());
            }
            Ok(())
        }
        Command::Psk { out: Some(path) } => {
            let k = crate::identity::write_psk(&path)?;
            eprintln!("wrote {} (fingerprint {})", path.display(), k.fingerprint());
            Ok(())
        }
        Command::Psk { out: None } => {
            print!("{}", crate::identity::new_psk());
            Ok(())
        }
        Command::Status { target, watch } => {
            let client = target.client();
            match watch {
                None => status(&client).await,
                Some(secs) => loop {
                    print!("\x1b[2J\x1b[H");
                    if let Err(e) = status(&client).await {
                        println!("{e}");
                    }
                    tokio::time::sleep(Duration::from_secs(secs.max(1))).await;
                },
            }
        }
        Command::Backup { target, out } => {
            // The node answers once its copy is made: minutes for a large database.
            let client = target.client().with_timeout(Duration::from_secs(6 * 3600));
            let n = client.download("/v1/backup", &out).await?;
            println!("wrote {} ({n} bytes)", out.display());
            Ok(())
        }
        Command::Restore { data_dir, from } => {
            let items = crate::run::restore(&data_dir, &from).await?;
            println!(
                "restored {items} entries into {}; start it with `syncnode run --data-dir {} --bootstrap <a live member>`",
                data_dir.display(),
                data_dir.display()
            );
            Ok(())
        }
        Command::Ready { target } => {
            let r = target.client().get("/readyz").await?;
            let v = r.json().unwrap_or_default();
            if r.status.is_success() {
                println!("ready");
                return Ok(());
            }
            let reasons = v["reasons"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; "))
                .unwrap_or_else(|| r.text());
            anyhow::bail!("not ready (HTTP {}): {reasons}", r.status)
        }
        Command::Put {
            target,
            id,
            value,
            file,
        } => {
            let bytes = match (value, file) {
                (Some(v), None) => Bytes::from(v),
                (None, Some(f)) => Bytes::from(std::fs::read(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?),
                _ => anyhow::bail!("give the value or --file, not both"),
            };
            let json = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok();
            let client = target.client();
            let r = client.ok_json(client.put_item(&id, bytes, json).await).await?;
            println!("{r}");
            Ok(())
        }
        Command::Get { target, id } => {
            let a = target.client().get_item(&id).await?;
            anyhow::ensure!(a.status.is_success(), "HTTP {}: {}", a.status, a.text());
            use std::io::Write;
            std::io::stdout().write_all(&a.body)?;
            Ok(())
        }
        Command::Del { target, id } => {
            let client = target.client();
            println!("{}", client.ok_json(client.delete_item(&id).await).await?);
            Ok(())
        }
        Command::Load { load, json } => {
            let report = crate::load::run(load).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.summary());
            }
            Ok(())
        }
        Command::Demo { items, engine: true } => crate::demo::run_engine(items).await,
        Command::Demo { items, engine: false } => crate::demo::run_cluster(items).await,
    }
}
