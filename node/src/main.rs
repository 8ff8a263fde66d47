//! The `syncnode` command (see `syncnode::cli`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syncnode::cli::main().await
}
