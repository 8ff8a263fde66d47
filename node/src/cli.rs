//! The `syncnode` command line: `run`, `resync`, `keygen`, `psk`, `status`, `ready`,
//! `members`, `peers`, `put`, `get`, `del`, `scan`, `search`, `backup`, `restore`,
//! `load` and `demo`. In the library so the test crate runs the very same
//! program as real processes.
//!
//! Exit codes: 0 done; 1 the operation failed (node unreachable, an error
//! answer, not ready); 2 usage error (unknown flag, missing argument);
//! 3 invalid configuration or input (a bad config key or value, a value the
//! node refused with 400 or 422).

use crate::client::ApiClient;
use crate::config::{NodeConfig, Settings};
use crate::logging::LogFormat;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// Exit code of an operation that failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a usage error (clap's).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of invalid configuration or input.
pub const EXIT_INVALID: u8 = 3;

/// An error in what the user gave (config, arguments, a refused value):
/// exit code 3.
#[derive(Debug)]
pub struct Invalid(pub anyhow::Error);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Invalid {}

fn invalid(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Invalid(e))
}

#[derive(Parser)]
#[command(
    name = "syncnode",
    version,
    about = "Peer-to-peer anti-entropy replication node",
    after_help = "Exit codes: 0 done, 1 failed, 2 usage error, 3 invalid configuration or input."
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or tracing directives;
    /// RUST_LOG wins when set. [default: info for run and resync, warn otherwise]
    #[arg(long, global = true, env = "SYNCNODE_LOG_LEVEL", value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log lines on stderr as text or JSON. [default: text]
    #[arg(long, global = true, env = "SYNCNODE_LOG_FORMAT", value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Output of the read commands (status, members, peers, get, scan, search): text or json.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How read commands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
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
        /// TOML config file (keys as in the README).
        #[arg(long, env = "SYNCNODE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Lists the peers this node knows: connection, region, roots, lag, sessions, bytes.
    Peers {
        #[command(flatten)]
        target: Target,
    },
    /// Lists live items in id order, page by page (`--all` follows every page).
    Scan {
        #[command(flatten)]
        target: Target,
        /// Only ids starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only items in this state.
        #[arg(long)]
        state: Option<String>,
        /// Items per page, 1..=10000.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Starts after this cursor (the `next` of a previous page).
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// Follows every page to the end.
        #[arg(long)]
        all: bool,
    },
    /// Searches an index with a query in JSON (see the README's search bodies),
    /// e.g. `search users '{"eq":{"field":"city","value":"Oslo"}}'`.
    Search {
        #[command(flatten)]
        target: Target,
        /// The index's name.
        index: String,
        /// The query, JSON.
        query: String,
        /// Which tier answers: redis, sql, or redis-then-sql.
        #[arg(long)]
        tier: Option<String>,
        /// Most ids, 1..=10000.
        #[arg(long)]
        limit: Option<usize>,
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
        /// The node's data dir (where `identity.key` is kept).
        #[arg(long, default_value = "./syncnode-data")]
        data_dir: PathBuf,
    },
    /// Makes a pre-shared cluster key: prints it, or writes it to --out (mode 0600).
    Psk {
        /// The file to write (mode 0600); printed to stdout when left out.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Shows a node's health, readiness, regions and peers.
    Status {
        #[command(flatten)]
        target: Target,
        /// Repeats every interval (e.g. `2s`); the screen is redrawn only on a terminal.
        #[arg(long, value_name = "INTERVAL", value_parser = crate::config::parse_duration)]
        watch: Option<Duration>,
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
    /// Writes an item: the value, `-` for stdin, or --file; stored as JSON
    /// when it parses as JSON.
    Put {
        #[command(flatten)]
        target: Target,
        /// The item's id.
        id: String,
        /// The content; `-` reads it from stdin.
        value: Option<String>,
        /// Reads the content from this file.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The media type to keep with it (GET returns it as Content-Type);
        /// by default JSON content is application/json, other content
        /// application/octet-stream.
        #[arg(long, value_name = "TYPE")]
        content_type: Option<String>,
    },
    /// Prints an item's content (`-o json`: the item with its version and origin).
    Get {
        #[command(flatten)]
        target: Target,
        /// The item's id.
        id: String,
    },
    /// Deletes an item; prints the tombstone's receipt.
    Del {
        #[command(flatten)]
        target: Target,
        /// The item's id.
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
        /// Items to write in all.
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
    Forget {
        /// The member's peer id.
        peer: String,
    },
}

/// Prints a JSON answer, pretty.
fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

async fn members(client: &ApiClient, output: Output) -> anyhow::Result<()> {
    let v = client.ok_json(client.get("/v1/members").await).await?;
    if output == Output::Json {
        print_json(&v);
        return Ok(());
    }
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

async fn peers(client: &ApiClient, output: Output) -> anyhow::Result<()> {
    let v = client.ok_json(client.get("/v1/peers").await).await?;
    if output == Output::Json {
        print_json(&v);
        return Ok(());
    }
    for p in v.as_array().into_iter().flatten() {
        println!(
            "{} connected {} region {} in_sync {} lag {} ms sessions {} sent {} B received {} B",
            p["peer_id"].as_str().unwrap_or("?"),
            p["connected"],
            p["region"].as_str().unwrap_or("?"),
            p["in_sync"],
            p["lag_ms"],
            p["sessions"],
            p["bytes_sent"],
            p["bytes_received"]
        );
    }
    Ok(())
}

/// One page of a scan, or every page with `all`.
async fn scan(
    client: &ApiClient,
    output: Output,
    query: &[(&str, String)],
    mut after: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let mut items = Vec::new();
    let next = loop {
        let mut q: Vec<(&str, String)> = query.to_vec();
        if let Some(a) = &after {
            q.push(("after", a.clone()));
        }
        let path = format!("/v1/items?{}", crate::client::query_string(&q));
        let page = client.ok_json(client.get(&path).await).await?;
        let next = page["next"].as_str().map(str::to_string);
        for it in page["items"].as_array().into_iter().flatten() {
            if output == Output::Json {
                items.push(it.clone());
            } else {
                println!(
                    "{}\t{}\t{}",
                    it["id"].as_str().unwrap_or("?"),
                    it["version"].as_str().unwrap_or("?"),
                    it["content"]
                );
            }
        }
        match next {
            Some(n) if all => after = Some(n),
            other => break other,
        }
    };
    if output == Output::Json {
        print_json(&serde_json::json!({"items": items, "next": next}));
    } else if let Some(n) = next {
        eprintln!("more: --after {n}");
    }
    Ok(())
}

/// The node's health, readiness, regions and peers in one JSON object.
async fn status_json(client: &ApiClient) -> anyhow::Result<serde_json::Value> {
    let ready = client.get("/readyz").await?;
    Ok(serde_json::json!({
        "health": client.ok_json(client.get("/health").await).await?,
        "ready": ready.json().unwrap_or_default(),
        "regions": client.ok_json(client.get("/v1/regions").await).await?,
        "peers": client.ok_json(client.get("/v1/peers").await).await?,
    }))
}

async fn status(client: &ApiClient, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        print_json(&status_json(client).await?);
        return Ok(());
    }
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
/// line (never a Debug dump); the exit code says what kind of error.
pub async fn program() -> std::process::ExitCode {
    match main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncnode: {e:#}");
            let refused = e
                .downcast_ref::<crate::client::HttpError>()
                .is_some_and(|h| h.is_invalid_input());
            let code = if refused || e.downcast_ref::<Invalid>().is_some() {
                EXIT_INVALID
            } else {
                EXIT_FAILED
            };
            std::process::ExitCode::from(code)
        }
    }
}

/// Reads the settings of `run`: the config file, then the environment and flags.
fn settings(config: Option<&std::path::Path>, flags: Settings) -> anyhow::Result<Settings> {
    let file = match config {
        Some(path) => Settings::from_file(path).map_err(invalid)?,
        None => Settings::default(),
    };
    Ok(file.overlay(flags))
}

/// Parses the command line and runs the command.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let output = cli.output;
    let format = cli.log_format;
    let log = |level: Option<&str>, format: Option<LogFormat>, default: &str| {
        crate::logging::init(level.unwrap_or(default), format.unwrap_or_default()).map_err(invalid)
    };
    // A node's logs: the flag, else the config file's key, else INFO.
    let node_log = |cfg: &NodeConfig| {
        log(
            cli.log_level.as_deref().or(cfg.log_level.as_deref()),
            format.or(cfg.log_format),
            crate::logging::NODE_LEVEL,
        )
    };
    match cli.command {
        Command::Run {
            config,
            settings: flags,
        } => {
            let s = settings(config.as_deref(), *flags.clone())?;
            let cfg = NodeConfig::resolve(s).map_err(invalid)?;
            node_log(&cfg)?;
            let level_flag = cli.log_level.clone();
            // SIGHUP: the config file and environment read again, the flags kept.
            let reload = move || {
                let s = settings(config.as_deref(), *flags.clone())?;
                let mut cfg = NodeConfig::resolve(s)?;
                if level_flag.is_some() {
                    cfg.log_level = level_flag.clone();
                }
                Ok(cfg)
            };
            crate::run::run(cfg, Box::new(reload)).await
        }
        Command::Resync {
            from,
            config,
            settings: flags,
        } => {
            let mut s = settings(config.as_deref(), *flags)?;
            s.bootstrap = Some(vec![from]);
            let cfg = NodeConfig::resolve(s).map_err(invalid)?;
            node_log(&cfg)?;
            crate::run::wipe(&cfg).await?;
            let fixed = cfg.clone();
            crate::run::run(cfg, Box::new(move || Ok(fixed.clone()))).await
        }
        command => {
            log(cli.log_level.as_deref(), format, "warn")?;
            client_command(command, output).await
        }
    }
}

/// The commands other than `run` and `resync`.
async fn client_command(command: Command, output: Output) -> anyhow::Result<()> {
    match command {
        Command::Run { .. } | Command::Resync { .. } => unreachable!("handled by main"),
        Command::Peers { target } => peers(&target.client(), output).await,
        Command::Scan {
            target,
            prefix,
            state,
            limit,
            after,
            all,
        } => {
            let mut q = vec![("prefix", prefix), ("limit", limit.to_string())];
            if let Some(st) = state {
                q.push(("state", st));
            }
            scan(&target.client(), output, &q, after, all).await
        }
        Command::Search {
            target,
            index,
            query,
            tier,
            limit,
        } => {
            let query: serde_json::Value =
                serde_json::from_str(&query).map_err(|e| invalid(anyhow::anyhow!("the query is not JSON: {e}")))?;
            let mut body = serde_json::json!({ "query": query });
            if let Some(t) = tier {
                body["tier"] = t.into();
            }
            if let Some(l) = limit {
                body["limit"] = l.into();
            }
            let client = target.client();
            let path = format!("/v1/indexes/{}/search", crate::client::encode_id(&index));
            let v = client.ok_json(client.post_json(&path, &body).await).await?;
            if output == Output::Json {
                print_json(&v);
            } else {
                for it in v["items"].as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}",
                        it["id"].as_str().unwrap_or("?"),
                        it["version"].as_str().unwrap_or("?"),
                        it["content"]
                    );
                }
            }
            Ok(())
        }
        Command::Members { target, action } => {
            let client = target.client();
            match action {
                None => members(&client, output).await,
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
                None => status(&client, output).await,
                Some(every) => {
                    // Screen codes only for a terminal; a pipe gets one report after another.
                    let terminal = std::io::stdout().is_terminal();
                    loop {
                        if terminal {
                            print!("\x1b[2J\x1b[H");
                        }
                        if let Err(e) = status(&client, output).await {
                            println!("{e:#}");
                        }
                        if !terminal {
                            println!();
                        }
                        tokio::time::sleep(every.max(Duration::from_millis(100))).await;
                    }
                }
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
            content_type,
        } => {
            let bytes = match (value, file) {
                (Some(v), None) if v == "-" => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                        .map_err(|e| anyhow::anyhow!("stdin: {e}"))?;
                    Bytes::from(buf)
                }
                (Some(v), None) => Bytes::from(v),
                (None, Some(f)) => Bytes::from(std::fs::read(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?),
                (None, None) => {
                    return Err(invalid(anyhow::anyhow!(
                        "put {id}: no value: give it after the id, `-` to read stdin, or --file"
                    )));
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(anyhow::anyhow!("put {id}: give the value or --file, not both")));
                }
            };
            let client = target.client();
            let answer = match content_type {
                Some(t) => client.put_typed(&id, bytes, &t).await,
                None => {
                    let json = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok();
                    client.put_item(&id, bytes, json).await
                }
            };
            let r = client.ok_json(answer).await?;
            println!("{r}");
            Ok(())
        }
        Command::Get { target, id } => {
            let client = target.client();
            if output == Output::Json {
                let v = client
                    .ok_json(client.post_json("/v1/get", &serde_json::json!({ "ids": [id] })).await)
                    .await?;
                let item = v.get(0).cloned().unwrap_or_default();
                anyhow::ensure!(!item.is_null(), "{id}: not found");
                print_json(&item);
                return Ok(());
            }
            let a = client.get_item(&id).await?;
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
