//! `syncnode run`: one node. Loads (or creates) the identity, starts the
//! engine, the swarm and the replication core it drives (membership,
//! gossip, anti-entropy, CDC, tombstone purge) and the HTTP API. On SIGHUP
//! it reads its config again and takes in the keys that can change at run
//! time (`config::RELOADABLE`). On SIGINT/SIGTERM it stops taking HTTP
//! requests and finishes those in flight, leaves the cluster, stops
//! replication (the members file written on the way out), then shuts the
//! engine down cleanly.

use std::sync::Arc;

use crate::api::Api;
use crate::config::NodeConfig;
use crate::engine::SyncEngine;
use crate::replication::peers::PeerLimits;
use crate::replication::swarm::{self, NetworkConfig};

/// Reads the config again (SIGHUP).
pub type Reload = Box<dyn Fn() -> anyhow::Result<NodeConfig> + Send + Sync>;

pub async fn run(cfg: NodeConfig, reload: Reload) -> anyhow::Result<()> {
    // First of all: a SIGHUP while starting (logrotate) must not kill the
    // node; it is taken in once the node runs.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let (keypair, created) = crate::identity::load_or_create(&cfg.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    if created {
        tracing::info!(%peer_id, "created a new node identity");
    }
    let psk = cfg.psk_file.as_deref().map(crate::identity::read_psk).transpose()?;
    // Bind the API before anything else, so a taken port fails fast.
    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .map_err(|e| anyhow::anyhow!("http {}: port {} is not available: {e}", cfg.http, cfg.http.port()))?;
    let limits = crate::api::server::Limits {
        header_timeout: cfg.http_header_timeout,
        idle_timeout: cfg.http_idle_timeout,
        max_connections: cfg.http_max_connections,
        ..Default::default()
    };
    // While the node starts (a tree rebuild, a slow L3), the port already
    // answers /livez, and /readyz with 503: a liveness probe must not take a
    // long start for a dead process. A second handle on the same socket
    // serves it until the API takes over.
    let std_listener = listener.into_std()?;
    let early_listener = tokio::net::TcpListener::from_std(std_listener.try_clone()?)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let (stop_early, early_stopped) = tokio::sync::oneshot::channel::<()>();
    let early = tokio::spawn(crate::api::serve_starting(early_listener, limits.clone(), async {
        let _ = early_stopped.await;
    }));
    let (config_tx, config_rx) = tokio::sync::watch::channel(cfg.engine_config(&peer_id));
    let engine = Arc::new(SyncEngine::new(cfg.engine_config(&peer_id), config_rx));
    engine
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("engine start (data dir {}): {e}", cfg.data_dir.display()))?;
    let net = swarm::start(
        engine.clone(),
        NetworkConfig {
            cluster: cfg.cluster_id.clone(),
            listen: cfg.listen.clone(),
            bootstrap: cfg.bootstrap.clone(),
            keypair,
            psk,
            allow_peers: cfg.allow_peers.clone(),
            region: cfg.region.clone(),
            request_timeout: crate::config::defaults::PEER_REQUEST_TIMEOUT,
            gossip_interval: cfg.gossip_interval,
            limits: PeerLimits::default(),
            members_file: Some(cfg.data_dir.join("members.json")),
            member_expiry: cfg.member_expiry,
            tombstone_grace: cfg.tombstone_grace,
            cdc_batch: crate::config::defaults::CDC_BATCH,
            ledger_retention: cfg.ledger_retention,
            advertise: cfg.advertise.clone(),
            max_peers: cfg.max_peers,
            probe_interval: cfg.probe_interval,
            join_timeout: cfg.join_timeout,
        },
    )
    .await;
    let net = match net {
        Ok(n) => n,
        Err(e) => {
            engine.shutdown().await;
            return Err(e);
        }
    };
    // L1 gets the first `warm_up_items` items meanwhile (the node serves).
    let warming = engine.clone();
    tokio::spawn(async move {
        if let Err(e) = warming.warm_up().await {
            tracing::warn!(error = %e, "warm-up of L1 failed; reads fill it as they come");
        }
    });
    net.spawn_anti_entropy(cfg.gossip_interval).await;
    let cdc = net.spawn_cdc(engine.clone());
    let addrs: Vec<String> = net.advertised.iter().map(|a| format!("{a}/p2p/{peer_id}")).collect();
    let engine_cfg = engine.config();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %peer_id,
        advertise = ?addrs,
        listen = ?net.listen_addrs,
        http = %cfg.http,
        cluster = %cfg.cluster_id,
        region = %cfg.region,
        l3 = %backend_name(&engine_cfg.effective_sql_url()),
        l2 = %engine_cfg.redis_url.as_deref().map_or_else(|| "none".to_string(), backend_name),
        psk = %psk.as_ref().map_or_else(|| "none".to_string(), |k| format!("fingerprint {}", k.fingerprint())),
        "node running"
    );
    warn_if_exposed(&cfg, psk.is_some());
    if let Some(limit) = crate::metrics::open_files_limit()
        && limit < (cfg.http_max_connections + 512) as f64
    {
        tracing::warn!(
            open_files_limit = limit,
            http_max_connections = cfg.http_max_connections,
            "the open-file limit is below http_max_connections plus what storage and peers need: raise it (LimitNOFILE, ulimit -n) or lower http_max_connections"
        );
    }
    let http_addr = listener.local_addr()?;
    let api = Api {
        engine: engine.clone(),
        net: net.clone(),
        api_token: cfg.api_token.clone(),
        cluster_id: cfg.cluster_id.clone(),
        region: cfg.region.clone(),
        http: Default::default(),
        connections: Default::default(),
        conditional: Default::default(),
    };
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(crate::api::serve(listener, api, limits, async {
        let _ = http_stopped.await;
    }));
    // The API takes the port over; then the node says it is there.
    let _ = stop_early.send(());
    let _ = early.await;
    // One line on stdout for scripts and tests: where to reach this node.
    println!("syncnode peer_id={peer_id} http={http_addr} listen={}", addrs.join(","));
    let ready = tokio::spawn(notify_when_ready(engine.clone(), net.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut current = cfg;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                current = reconfigure(current, &reload, &config_tx, &engine, &peer_id).await;
            }
            r = &mut server => {
                ready.abort();
                cdc.abort();
                net.shutdown().await;
                engine.shutdown().await;
                return Err(anyhow::anyhow!("http server stopped: {}", r.err().map_or_else(|| "no reason".into(), |e| e.to_string())));
            }
        }
    }
    tracing::info!("shutting down: finishing HTTP requests in flight");
    let _ = stop_http.send(());
    let _ = server.await;
    tracing::info!("shutting down: leaving the cluster");
    ready.abort();
    crate::service::notify("STOPPING=1");
    net.leave().await;
    // Replication stops (its storage work finished, the members file
    // written) before the engine does.
    cdc.abort();
    net.shutdown().await;
    engine.shutdown().await;
    Ok(())
}

/// SIGHUP: reads the config again, takes in the keys that can change at
/// run time, and says which changed keys need a restart. A config that
/// does not check keeps the running one.
async fn reconfigure(
    current: NodeConfig,
    reload: &Reload,
    config_tx: &tokio::sync::watch::Sender<crate::engine::SyncEngineConfig>,
    engine: &SyncEngine,
    peer_id: &libp2p::PeerId,
) -> NodeConfig {
    let new = match reload() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("config reload failed, keeping the running config: {e:#}");
            return current;
        }
    };
    let changed = current.changed_keys(&new);
    if changed.is_empty() {
        tracing::info!("config reloaded: nothing changed");
        return current;
    }
    let (now, later): (Vec<&str>, Vec<&str>) = changed.iter().partition(|k| crate::config::RELOADABLE.contains(k));
    let mut applied = current.clone();
    if now.contains(&"log_level") {
        match crate::logging::set_level(new.log_level.as_deref().unwrap_or("info")) {
            Ok(()) => applied.log_level = new.log_level.clone(),
            Err(e) => tracing::warn!("log_level not changed: {e:#}"),
        }
    }
    applied.engine.max_payload_bytes = new.engine.max_payload_bytes;
    applied.engine.snapshot_interval_secs = new.engine.snapshot_interval_secs;
    config_tx.send_replace(applied.engine_config(peer_id));
    engine.tick().await;
    if !now.is_empty() {
        tracing::info!(changed = ?now, "config reloaded");
    }
    if !later.is_empty() {
        tracing::warn!(keys = ?later, "config reloaded: these changed keys take effect at the next restart");
    }
    applied
}

/// A backend URL without its credentials: `mysql://db:3306/x`, `sqlite://…`.
fn backend_name(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{host}")
        }
        None => url.to_string(),
    }
}

/// WARNs when the API or p2p listens beyond loopback unprotected.
fn warn_if_exposed(cfg: &NodeConfig, psk: bool) {
    if !cfg.http.ip().is_loopback() && cfg.api_token.is_none() {
        tracing::warn!(
            http = %cfg.http,
            "the HTTP API listens beyond loopback without api_token: anyone who reaches it can read and write"
        );
    }
    let beyond_loopback = cfg.listen.iter().any(|a| match a.iter().next() {
        Some(libp2p::multiaddr::Protocol::Ip4(ip)) => !ip.is_loopback(),
        Some(libp2p::multiaddr::Protocol::Ip6(ip)) => !ip.is_loopback(),
        _ => true,
    });
    if beyond_loopback && !psk {
        tracing::warn!(
            listen = ?cfg.listen,
            "p2p listens beyond loopback without psk_file: any node that reaches it can join the cluster"
        );
    }
}

/// `syncnode resync`: erases this node's copy (items, tombstones, purge
/// ledger, members file) and keeps its identity; `run` then joins again
/// through the given peer like a new node.
pub async fn wipe(cfg: &NodeConfig) -> anyhow::Result<()> {
    let (keypair, _) = crate::identity::load_or_create(&cfg.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let engine = SyncEngine::with_config(cfg.engine_config(&peer_id));
    engine.start().await.map_err(|e| anyhow::anyhow!("engine start: {e}"))?;
    let erased = engine.erase_local_copy().await;
    engine.shutdown().await;
    let erased = erased.map_err(|e| anyhow::anyhow!("erase the local copy: {e}"))?;
    crate::replication::peers::reset_members_file(&cfg.data_dir.join("members.json"))?;
    tracing::warn!(%peer_id, erased, "local copy erased; joining again through the given peer");
    Ok(())
}

/// Tells systemd (`Type=notify`) the node is ready once it has caught up,
/// with the reason it waits as the unit's status until then; while the
/// catch-up makes progress it extends the start timeout, so a large copy is
/// not killed halfway (a stalled one still is).
async fn notify_when_ready(engine: Arc<SyncEngine>, net: swarm::NodeHandle) {
    let mut last = String::new();
    let mut progress = (std::time::Instant::now(), engine.merkle_summary().1);
    loop {
        let why = if !engine.is_ready() {
            Some(format!("engine is {:?}", engine.state()))
        } else {
            net.not_ready(engine.merkle_summary().1)
        };
        match why {
            None => {
                crate::service::notify("READY=1\nSTATUS=serving");
                return;
            }
            Some(why) if why != last => {
                crate::service::notify(&format!("STATUS={why}"));
                last = why;
            }
            Some(_) => {}
        }
        let items = engine.merkle_summary().1;
        if progress.0.elapsed() >= std::time::Duration::from_secs(10) {
            if items != progress.1 {
                crate::service::notify("EXTEND_TIMEOUT_USEC=120000000");
            }
            progress = (std::time::Instant::now(), items);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// `syncnode restore`: copies a backup into a new data dir as its SQLite L3
/// and opens it once, to check it is one (and to count what it holds). The
/// node gets a new identity at its first `run`.
pub async fn restore(data_dir: &std::path::Path, backup: &std::path::Path) -> anyhow::Result<u64> {
    let mut header = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(backup).map_err(|e| anyhow::anyhow!("backup {}: {e}", backup.display()))?,
            16,
        ),
        &mut header,
    )
    .map_err(|e| anyhow::anyhow!("backup {}: {e}", backup.display()))?;
    anyhow::ensure!(
        header == b"SQLite format 3\0",
        "{} is not a SQLite database (a `syncnode backup` file)",
        backup.display()
    );
    let db = data_dir.join("l3.sqlite");
    // A used data dir would keep its old identity and members file.
    let used = std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some());
    anyhow::ensure!(
        !used,
        "{} is not empty: restore into a new data dir",
        data_dir.display()
    );
    std::fs::create_dir_all(data_dir).map_err(|e| anyhow::anyhow!("data dir {}: {e}", data_dir.display()))?;
    let restored = async {
        std::fs::copy(backup, &db)
            .map_err(|e| anyhow::anyhow!("copy {} to {}: {e}", backup.display(), db.display()))?;
        std::fs::File::open(&db)?.sync_all()?;
        // A truncated or damaged copy is refused here, not found out later.
        check_sqlite(&db)
            .await
            .map_err(|e| anyhow::anyhow!("{} is damaged: {e:#}", backup.display()))?;
        let engine = SyncEngine::with_config(crate::engine::SyncEngineConfig::for_dir(data_dir, "restore"));
        let opened = engine.start().await;
        let items = engine.merkle_summary().1;
        engine.shutdown().await;
        opened.map_err(|e| anyhow::anyhow!("{} is not a usable backup: {e}", backup.display()))?;
        anyhow::Ok(items)
    }
    .await;
    if restored.is_err() {
        // Leave the data dir as empty as it was, so the restore can be retried.
        for entry in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    restored
}

/// `PRAGMA quick_check` on a SQLite file, read-only.
async fn check_sqlite(db: &std::path::Path) -> anyhow::Result<()> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&format!("sqlite://{}?mode=ro", db.display())).await?;
    let (verdict,): (String,) = sqlx::query_as("PRAGMA quick_check").fetch_one(&mut conn).await?;
    conn.close().await?;
    anyhow::ensure!(verdict == "ok", "{verdict}");
    Ok(())
}
