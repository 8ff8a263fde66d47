//! The `syncnode` program, built inside the test crate so process-level
//! tests can start it (`CARGO_BIN_EXE_node`): same code as the `syncnode`
//! binary, `syncnode::cli::program`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    syncnode::cli::program().await
}
