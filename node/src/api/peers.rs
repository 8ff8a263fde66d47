//! Peers, partitions (block / unblock) and anti-entropy sessions.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::Api;
use super::error::{ApiError, ApiResult};

pub(super) async fn peers(State(api): State<Api>) -> Json<Value> {
    Json(json!(api.net.peers.view()))
}

/// Per region: members alive, connected peers, lag (time since a peer of
/// the region last held what we hold) and sync bytes (WAN bytes for the
/// other regions).
pub(super) async fn regions(State(api): State<Api>) -> Json<Value> {
    Json(json!({"region": api.region, "regions": api.net.peers.regions()}))
}

pub(super) fn peer_param(peer: Result<Path<String>, PathRejection>) -> ApiResult<libp2p::PeerId> {
    let Path(peer) = peer?;
    peer.parse()
        .map_err(|e| ApiError::bad_request(format!("{peer:?} is not a peer id: {e}")))
}

/// Cuts the link to a peer (partition drills).
pub(super) async fn block_peer(
    State(api): State<Api>,
    peer: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let peer = peer_param(peer)?;
    api.net.block(peer, true).await;
    Ok(Json(json!({"peer": peer.to_string(), "blocked": true})))
}

pub(super) async fn unblock_peer(
    State(api): State<Api>,
    peer: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let peer = peer_param(peer)?;
    api.net.block(peer, false).await;
    Ok(Json(json!({"peer": peer.to_string(), "blocked": false})))
}

pub(super) async fn sync(State(api): State<Api>) -> Json<Value> {
    let sessions: Vec<Value> = api
        .net
        .peers
        .view()
        .into_iter()
        .map(|p| json!({"peer": p.peer_id, "running": p.session, "last": p.last_session, "sessions": p.sessions}))
        .collect();
    Json(json!({
        "sessions": sessions,
        "members": api.net.peers.members(),
    }))
}
