//! The `syncnode` command (see `syncnode::cli`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    syncnode::cli::program().await
}
