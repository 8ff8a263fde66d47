//! The `syncnode` command (see `syncnode::cli`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match syncnode::cli::main().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line, never a Debug dump.
            eprintln!("syncnode: {e:#}");
            ExitCode::FAILURE
        }
    }
}
