//! Probes: `/health`, `/readyz` (thresholds as query parameters) and
//! `/metrics` (`/livez` is in the router).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::error::ApiResult;

pub(super) async fn health(State(api): State<Api>) -> Json<Value> {
    let mut h = api.engine.health_check().await;
    h.peer_lag_ms = api.net.peers.lags();
    let mut v = json!(h);
    if let Value::Object(m) = &mut v {
        m.insert("peer_id".into(), json!(api.net.peer_id.to_string()));
        m.insert(
            "listen_addrs".into(),
            json!(api.net.listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
        );
        m.insert("cluster_id".into(), json!(api.cluster_id));
        m.insert("region".into(), json!(api.region));
        m.insert("node_id".into(), json!(api.engine.node_id()));
        m.insert("peers".into(), json!(h.peer_lag_ms.len()));
        m.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    }
    Json(v)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadyParams {
    /// 503 when a connected peer lags more than this.
    max_lag_ms: Option<u64>,
    /// 503 with fewer connected peers.
    min_peers: Option<usize>,
}

pub(super) async fn readyz(
    State(api): State<Api>,
    params: Result<Query<ReadyParams>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(p) = params?;
    let mut reasons = Vec::new();
    if !api.engine.is_ready() {
        reasons.push(format!("engine is {:?}", api.engine.state()));
    }
    let lags = api.net.peers.lags();
    if let Some(min) = p.min_peers
        && lags.len() < min
    {
        reasons.push(format!("{} peers connected, want {min}", lags.len()));
    }
    if let Some(max) = p.max_lag_ms {
        for (peer, lag) in &lags {
            if *lag > max {
                reasons.push(format!("peer {peer} lags {lag} ms (max {max})"));
            }
        }
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((
        status,
        Json(json!({"ready": reasons.is_empty(), "reasons": reasons, "peer_lag_ms": lags})),
    )
        .into_response())
}

pub(super) async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::metrics::render(&api.engine, &api.net).await,
    )
}
