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
    let h = api.engine.health_check().await;
    let lags = api.net.peers.lags();
    let mut v = json!(h);
    if let Value::Object(m) = &mut v {
        m.insert("peer_id".into(), json!(api.net.peer_id.to_string()));
        m.insert(
            "listen_addrs".into(),
            json!(api.net.listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
        );
        m.insert(
            "advertise".into(),
            json!(api.net.advertised.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
        );
        m.insert("members".into(), json!(api.net.members.active().len()));
        m.insert("writes_fenced".into(), json!(api.engine.write_fence()));
        m.insert("cluster_id".into(), json!(api.cluster_id));
        m.insert("region".into(), json!(api.region));
        m.insert("node_id".into(), json!(api.engine.node_id()));
        m.insert("peers".into(), json!(lags.len()));
        m.insert("peer_lag_ms".into(), json!(lags));
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
    /// 503 when a region lags more than this.
    max_region_lag_ms: Option<u64>,
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
    if let Some(why) = api.net.not_ready(api.engine.merkle_summary().1) {
        reasons.push(why);
    }
    if let Some(why) = api.engine.write_fence() {
        reasons.push(why);
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
    if let Some(max) = p.max_region_lag_ms {
        for r in api.net.peers.regions() {
            if let Some(lag) = r.lag_ms.filter(|l| *l > max) {
                reasons.push(format!("region {} lags {lag} ms (max {max})", r.region));
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
        Json(json!({
            "ready": reasons.is_empty(),
            "reasons": reasons,
            "peer_lag_ms": lags,
            "bootstrap": join_progress(&api),
        })),
    )
        .into_response())
}

/// How far the sessions running now got: items pulled and left, the
/// peer's count against ours, the rate and what is left to wait. A joining
/// node shows its bootstrap here.
fn join_progress(api: &Api) -> Value {
    let (_, ours, _) = api.engine.merkle_summary();
    let now = crate::engine::item::now_ms().max(0) as u64;
    let sessions: Vec<Value> = api
        .net
        .peers
        .view()
        .into_iter()
        .filter_map(|p| {
            let s = p.session?;
            let secs = (now.saturating_sub(s.started_ms) as f64 / 1000.0).max(0.001);
            let rate = s.progress.pulled as f64 / secs;
            let theirs = p.count.unwrap_or(0);
            Some(json!({
                "peer": p.peer_id,
                "pulled": s.progress.pulled,
                "to_pull": s.progress.to_pull,
                "peer_items": theirs,
                "percent": if theirs == 0 { 100.0 } else { (ours as f64 * 100.0 / theirs as f64).min(100.0) },
                "items_per_s": rate,
                "eta_s": if rate > 0.0 { Some(s.progress.to_pull as f64 / rate) } else { None },
            }))
        })
        .collect();
    json!({
        "joined": api.net.peers.joined(),
        "items": ours,
        "sync_bytes_received": api.net.traffic.received.load(std::sync::atomic::Ordering::Relaxed),
        "sessions": sessions,
    })
}

/// OpenMetrics, or the Prometheus text format when the scraper asks only for it.
pub(super) async fn metrics(State(api): State<Api>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let body = crate::metrics::render(&api.engine, &api.net, &api.http, &api.connections).await;
    if crate::metrics::wants_text_format(&headers) {
        (
            [(header::CONTENT_TYPE, crate::metrics::PROMETHEUS_TEXT)],
            crate::metrics::to_text_format(&body),
        )
    } else {
        ([(header::CONTENT_TYPE, crate::metrics::OPENMETRICS)], body)
    }
}
