//! `syncnode run`: one node. Loads (or creates) the identity, starts the
//! engine, the swarm (gossip, anti-entropy, CDC), the tombstone purge and
//! the HTTP API, and shuts the engine down cleanly on SIGINT/SIGTERM.

use std::sync::Arc;

use crate::api::Api;
use crate::config::NodeConfig;
use crate::engine::SyncEngine;
use crate::replication::peers::PeerLimits;
use crate::replication::swarm::{self, NetworkConfig};

pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let (keypair, created) = crate::identity::load_or_create(&cfg.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    if created {
        tracing::info!(%peer_id, "created a new node identity");
    }
    let psk = cfg.psk_file.as_deref().map(crate::identity::read_psk).transpose()?;
    let engine = Arc::new(SyncEngine::with_config(cfg.engine_config(&peer_id)));
    engine.start().await.map_err(|e| anyhow::anyhow!("engine start: {e}"))?;
    // Bind the API before joining the cluster, so a taken port fails fast.
    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .map_err(|e| anyhow::anyhow!("http {}: {e}", cfg.http))?;
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
            request_timeout: std::time::Duration::from_secs(30),
            gossip_interval: cfg.gossip_interval,
            limits: PeerLimits::default(),
            members_file: Some(cfg.data_dir.join("members.json")),
            member_expiry: cfg.member_expiry,
        },
    )
    .await?;
    net.spawn_anti_entropy(engine.clone(), cfg.gossip_interval);
    net.spawn_cdc(engine.clone());
    crate::replication::purge::spawn(
        engine.clone(),
        net.peers.clone(),
        cfg.tombstone_grace,
        cfg.member_expiry,
    );
    let addrs: Vec<String> = net.listen_addrs.iter().map(|a| format!("{a}/p2p/{peer_id}")).collect();
    tracing::info!(%peer_id, listen = ?addrs, http = %cfg.http, cluster = %cfg.cluster_id, "node running");
    // One line on stdout for scripts and tests: where to reach this node.
    println!(
        "syncnode peer_id={peer_id} http={} listen={}",
        listener.local_addr()?,
        addrs.join(",")
    );
    let api = Api {
        engine: engine.clone(),
        net,
        api_token: cfg.api_token.clone(),
        cluster_id: cfg.cluster_id.clone(),
        region: cfg.region.clone(),
    };
    let server = tokio::spawn(crate::api::serve(listener, api));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = server => {
            engine.shutdown().await;
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::anyhow!("http server: {e}")),
                Err(e) => Err(anyhow::anyhow!("http server: {e}")),
            };
        }
    }
    tracing::info!("shutting down");
    engine.shutdown().await;
    Ok(())
}
