//! The `syncnode` command.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "syncnode", version, about = "Peer-to-peer anti-entropy replication node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo { items, engine: true } => syncnode::demo::run_engine(items).await,
        Command::Demo { items, engine: false } => syncnode::demo::run_cluster(items).await,
    }
}
