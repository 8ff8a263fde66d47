//! The HTTP API of DESIGN §7 (axum), one file per group of endpoints:
//! `items` (items, batches, scans, Merkle nodes), `search` (indexes),
//! `peers` (peers, partitions, sessions), `members` (membership), `backup` and `probes` (`/livez`, `/readyz`,
//! `/health`, `/metrics`); `error` turns every failure into a JSON
//! `{error, detail}` with its status, never a crash. With `api_token` set,
//! everything but `/livez` and `/readyz` needs `Authorization: Bearer <token>`.

mod backup;
mod error;
mod items;
mod members;
mod peers;
mod probes;
mod search;
pub mod server;

pub use error::ApiError;
pub use items::ItemView;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use std::sync::Arc;

use crate::engine::SyncEngine;
use crate::replication::swarm::NodeHandle;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    pub engine: Arc<SyncEngine>,
    pub net: NodeHandle,
    pub api_token: Option<String>,
    pub cluster_id: String,
    pub region: String,
    /// Request durations by route (`/metrics`).
    pub http: crate::metrics::HttpMetrics,
    /// Open and accepted HTTP connections (`/metrics`).
    pub connections: Arc<server::ConnectionStats>,
    /// Conditional writes (`If-Match`, `If-None-Match`) of one id take turns.
    pub conditional: Arc<IdLocks>,
}

/// The router, with a body limit sized to the largest accepted item.
pub fn router(api: Api) -> Router {
    let protected = Router::new()
        .route("/v1/items", get(items::scan))
        .route(
            "/v1/items/{id}",
            put(items::put_item).get(items::get_item).delete(items::delete_item),
        )
        .route("/v1/items/{id}/status", get(items::item_status))
        .route("/v1/batch", post(items::batch))
        .route("/v1/get", post(items::get_many))
        .route("/v1/merkle", get(items::merkle_root))
        .route("/v1/merkle/{path}", get(items::merkle_node))
        .route("/v1/indexes", post(search::create_index).get(search::list_indexes))
        .route("/v1/indexes/{name}", axum::routing::delete(search::drop_index))
        .route("/v1/indexes/{name}/search", post(search::search))
        .route("/v1/peers", get(peers::peers))
        .route("/v1/regions", get(peers::regions))
        .route(
            "/v1/peers/{peer}/block",
            put(peers::block_peer).delete(peers::unblock_peer),
        )
        .route("/v1/sync", get(peers::sync))
        .route("/v1/members", get(members::members))
        .route("/v1/members/{peer}", axum::routing::delete(members::forget_member))
        .route("/v1/backup", get(backup::backup))
        .route("/health", get(probes::health))
        .route("/metrics", get(probes::metrics))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(probes::readyz))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        // The body limit follows max_payload_bytes as it is now (SIGHUP may change it).
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(api.clone(), limit_body))
        .layer(middleware::from_fn_with_state(api.clone(), timed))
        .with_state(api)
}

/// What the port answers while the node starts: `/livez` 200, `/readyz`
/// 503 with the reason, anything else 503 `not_ready`.
pub async fn serve_starting(
    listener: tokio::net::TcpListener,
    limits: server::Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let starting = || async { ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the node is starting") };
    let router = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({"ready": false, "reasons": ["the node is starting"]})),
                )
            }),
        )
        .fallback(starting);
    server::serve(listener, router, limits, Default::default(), shutdown).await
}

/// Serves the API on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish (see `server`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Api,
    limits: server::Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let stats = api.connections.clone();
    server::serve(listener, router(api), limits, stats, shutdown).await
}

/// Caps a request body at the largest accepted item plus room for a JSON
/// envelope; a longer body is refused with 413 as it is read.
async fn limit_body(State(api): State<Api>, req: Request, next: Next) -> Response {
    let max = api.engine.config().max_payload_bytes + 64 * 1024;
    next.run(req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, max))))
        .await
}

/// Methods are a label: any other token is `other`, so a client cannot
/// make series at will.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Striped locks by id: writes of one id take turns, others do not wait
/// on each other (beyond a shared stripe).
pub struct IdLocks(Vec<tokio::sync::Mutex<()>>);

impl Default for IdLocks {
    fn default() -> Self {
        Self((0..256).map(|_| tokio::sync::Mutex::new(())).collect())
    }
}

impl IdLocks {
    pub async fn lock(&self, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id);
        self.0[(h % self.0.len() as u64) as usize].lock().await
    }
}

/// Records each request's duration under its declared route.
async fn timed(State(api): State<Api>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = method_label(req.method()).to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    let labels = crate::metrics::HttpLabels {
        method,
        route,
        status: resp.status().as_u16(),
    };
    api.http.observe(labels, started.elapsed().as_secs_f64());
    resp
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(api): State<Api>, req: Request, next: Next) -> Response {
    if let Some(token) = &api.api_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            )
            .into_response();
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    next.run(req).await
}
