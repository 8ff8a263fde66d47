//! Logs on stderr: a level or tracing directives (`--log-level`,
//! `log_level`, or `RUST_LOG`, which wins), as text or JSON lines
//! (`--log-format`). Colours only on a terminal. The filter can be changed
//! at run time (SIGHUP reloads `log_level`).

use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The level of a node's logs (`run`, `resync`) unless told otherwise.
pub const NODE_LEVEL: &str = "info";

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (tracing-subscriber's json).
    Json,
}

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Chatty dependencies kept quiet whatever the level.
const QUIET: &str = "yamux=error,libp2p_gossipsub=warn,libp2p_swarm=warn,libp2p_tcp=warn,libp2p_noise=warn";

/// The filter for `level`: a bare level also quiets chatty dependencies;
/// directives (`info,syncnode::replication=debug`) are taken as they are.
fn filter(level: &str) -> anyhow::Result<EnvFilter> {
    let level = level.trim();
    let bare = ["error", "warn", "info", "debug", "trace", "off"].contains(&level.to_ascii_lowercase().as_str());
    let directives = if bare {
        format!("{level},{QUIET}")
    } else {
        level.to_string()
    };
    EnvFilter::try_new(&directives).map_err(|e| {
        anyhow::anyhow!(
            "log_level: {level:?} is not a level (error, warn, info, debug, trace) or tracing directives: {e}"
        )
    })
}

/// Checks a `log_level` value.
pub fn check_level(level: &str) -> anyhow::Result<()> {
    filter(level).map(|_| ())
}

/// Installs the subscriber. `RUST_LOG`, when set, decides the filter.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => filter(&v)?,
        _ => filter(level)?,
    };
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .boxed(),
    };
    // A second init (tests running several programs in one process) keeps the first.
    if tracing_subscriber::registry().with(filter).with(fmt).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
    Ok(())
}

/// Changes the filter of the running subscriber (`RUST_LOG` set: no change).
pub fn set_level(level: &str) -> anyhow::Result<()> {
    let f = filter(level)?;
    if std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty()) {
        anyhow::bail!("RUST_LOG is set: it decides the log filter");
    }
    let handle = FILTER
        .get()
        .ok_or_else(|| anyhow::anyhow!("logging is not initialised"))?;
    handle
        .modify(|cur| *cur = f)
        .map_err(|e| anyhow::anyhow!("log filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_parse_and_garbage_does_not() {
        assert!(filter("info").is_ok());
        assert!(filter("DEBUG").is_ok());
        assert!(filter("warn,syncnode::replication=debug").is_ok());
        let e = filter("x=verbose").unwrap_err().to_string();
        assert!(e.starts_with("log_level:"), "{e}");
    }
}
