//! The `syncnode` command (see `syncnode::cli`).

/// mimalloc, not glibc's malloc: rows are built on sqlx's SQLite threads and
/// dropped on tokio's, and glibc's per-thread arenas made those frees (and
/// their consolidation) the largest cost of a rebuild after a crash.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    syncnode::cli::program().await
}
