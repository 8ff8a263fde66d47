//! Membership: the members SWIM knows (state, region, addresses, purge
//! watermark, clock offset) and forgetting one.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::Api;
use super::error::{ApiError, ApiResult};
use super::peers::peer_param;

pub(super) async fn members(State(api): State<Api>) -> Json<Value> {
    let watermarks = api.net.peers.members();
    let list: Vec<Value> = api
        .net
        .members
        .view()
        .into_iter()
        .map(|m| {
            let w = watermarks.get(&m.peer_id);
            let mut v = json!(m);
            if let Value::Object(o) = &mut v {
                // Versions travel as decimal strings (they exceed 2^53).
                o.insert("watermark".into(), json!(w.map(|w| w.watermark.to_string())));
                o.insert("last_seen_ms".into(), json!(w.map(|w| w.last_seen_ms)));
            }
            v
        })
        .collect();
    Json(json!({
        "self": {
            "peer_id": api.net.peer_id.to_string(),
            "region": api.region,
            "addresses": api.net.advertised.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        },
        "members": list,
    }))
}

/// Forgets a member: it stops holding back tombstone purge at once, and if
/// it ever returns holding data it must resync. A member SWIM sees alive is
/// not forgotten (stop it first).
pub(super) async fn forget_member(
    State(api): State<Api>,
    peer: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let peer = peer_param(peer)?;
    let key = peer.to_string();
    let alive = api
        .net
        .members
        .view()
        .into_iter()
        .any(|m| m.peer_id == key && matches!(m.state, "alive" | "suspect"));
    if alive {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "member_alive",
            format!("{key} is alive; stop it (or wait until it is down) before forgetting it"),
        ));
    }
    let known = api.net.peers.members().contains_key(&key) || api.net.members.state_of(&key).is_some();
    if !known {
        return Err(ApiError::not_found(format!("{key} is not a member")));
    }
    api.net.peers.forget(peer);
    api.net.members.forget(&key);
    tracing::warn!(peer = %key, "member forgotten by the operator: it no longer holds back tombstone purge");
    Ok(Json(json!({"peer_id": key, "forgotten": true})))
}
