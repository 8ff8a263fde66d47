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
    /// Exercise the engine on embedded SQLite in a temporary directory.
    Demo {
        /// Items to write.
        #[arg(long, default_value_t = 20_000)]
        items: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo { items } => syncnode::demo::run(items).await,
    }
}
