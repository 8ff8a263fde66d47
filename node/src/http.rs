//! The HTTP API of DESIGN §7 (axum): items, batches, scans, Merkle nodes,
//! search indexes, peers and sessions, and the probes (`/livez`, `/readyz`,
//! `/health`, `/metrics`). Every rejection — a bad path, query, body or
//! token — is a JSON `{error, detail}` with its status, never a crash.
//! With `api_token` set, everything but `/livez` and `/readyz` needs
//! `Authorization: Bearer <token>`.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{
    CacheTtl, ContentType, Query as SearchQuery, SearchIndex, SearchTier, StorageError, SubmitOptions, SyncEngine,
    SyncItem,
};
use crate::replication::swarm::NodeHandle;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    pub engine: Arc<SyncEngine>,
    pub net: NodeHandle,
    pub api_token: Option<String>,
    pub cluster_id: String,
    pub region: String,
}

/// An error answer: `{error, detail}`.
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
            retry_after: None,
        }
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({"error": self.error, "detail": self.detail}))).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        let detail = e.to_string();
        let (status, error, retry) = match &e {
            StorageError::InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid_id", None),
            StorageError::InvalidInput(_) => (StatusCode::BAD_REQUEST, "invalid_input", None),
            StorageError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None),
            StorageError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            StorageError::UnknownIndex(_) => (StatusCode::NOT_FOUND, "unknown_index", None),
            StorageError::Backpressure { retry_after_secs, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "backpressure",
                Some((*retry_after_secs).max(1)),
            ),
            StorageError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready", Some(1)),
            StorageError::Connection(_) => (StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", Some(1)),
            StorageError::ClockSkew { .. } => (StatusCode::CONFLICT, "clock_skew", None),
            StorageError::Backend(_) => (StatusCode::INTERNAL_SERVER_ERROR, "backend_error", None),
            StorageError::Corruption { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "corruption", None),
        };
        Self {
            status,
            error,
            detail,
            retry_after: retry,
        }
    }
}

macro_rules! rejection {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(r: $t) -> Self {
                let status = r.status();
                let error = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" };
                Self::new(status, error, r.body_text())
            }
        }
    )*};
}
rejection!(BytesRejection, JsonRejection, PathRejection, QueryRejection);

type ApiResult<T> = Result<T, ApiError>;

/// An item as JSON: the content as JSON when it is JSON, as text when it is
/// UTF-8, else hex.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ItemView {
    pub id: String,
    pub version: u64,
    pub origin: String,
    pub state: String,
    pub content_hash: String,
    pub updated_at: i64,
    pub content: Value,
    pub encoding: String,
}

impl From<&SyncItem> for ItemView {
    fn from(it: &SyncItem) -> Self {
        let (content, encoding) = match (it.content_type, std::str::from_utf8(&it.content)) {
            (ContentType::Json, _) => match serde_json::from_slice(&it.content) {
                Ok(v) => (v, "json"),
                Err(_) => (Value::String(hex::encode(&it.content)), "hex"),
            },
            (_, Ok(s)) => (Value::String(s.to_string()), "utf8"),
            (_, Err(_)) => (Value::String(hex::encode(&it.content)), "hex"),
        };
        Self {
            id: it.object_id.clone(),
            version: it.version,
            origin: it.origin.clone(),
            state: it.state.clone(),
            content_hash: it.content_hash.clone(),
            updated_at: it.updated_at,
            content,
            encoding: encoding.into(),
        }
    }
}

/// The router, with a body limit sized to the largest accepted item.
pub fn router(api: Api) -> Router {
    let max_body = api.engine.config().max_payload_bytes + 64 * 1024;
    let protected = Router::new()
        .route("/v1/items", get(scan))
        .route("/v1/items/{id}", put(put_item).get(get_item).delete(delete_item))
        .route("/v1/items/{id}/status", get(item_status))
        .route("/v1/batch", post(batch))
        .route("/v1/get", post(get_many))
        .route("/v1/merkle", get(merkle_root))
        .route("/v1/merkle/{path}", get(merkle_node))
        .route("/v1/indexes", post(create_index))
        .route("/v1/indexes/{name}", axum::routing::delete(drop_index))
        .route("/v1/indexes/{name}/search", post(search))
        .route("/v1/peers", get(peers))
        .route("/v1/peers/{peer}/block", put(block_peer).delete(unblock_peer))
        .route("/v1/sync", get(sync))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(api)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, api: Api) -> std::io::Result<()> {
    axum::serve(listener, router(api)).await
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
            .and_then(|v| v.strip_prefix("Bearer "));
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutParams {
    state: Option<String>,
    /// Seconds the Redis copy lives.
    ttl: Option<u64>,
    tier: Option<String>,
}

fn submit_options(p: &PutParams) -> ApiResult<SubmitOptions> {
    let ttl = p.ttl.map(|s| CacheTtl::from(Duration::from_secs(s)));
    let mut o = match p.tier.as_deref().unwrap_or("both") {
        "both" => SubmitOptions {
            redis_ttl: ttl,
            ..SubmitOptions::default()
        },
        "cache" => SubmitOptions::cache(ttl.unwrap_or(CacheTtl::Hour)),
        "durable" if ttl.is_some() => {
            return Err(ApiError::bad_request(
                "ttl applies to the Redis copy; tier=durable has none",
            ));
        }
        "durable" => SubmitOptions::durable(),
        other => {
            return Err(ApiError::bad_request(format!(
                "tier {other:?}: expected both, cache or durable"
            )));
        }
    };
    if let Some(s) = &p.state {
        o = o.with_state(s.clone());
    }
    Ok(o)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        })
}

async fn put_item(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<PutParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<impl IntoResponse> {
    let (Path(id), Query(params), body) = (id?, params?, body?);
    let options = submit_options(&params)?;
    let item = if is_json(&headers) {
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body is not JSON: {e}")))?;
        SyncItem::from_json(id, v)
    } else {
        SyncItem::new(id, body)
    };
    Ok(Json(api.engine.submit_with(item, options).await?))
}

async fn get_item(State(api): State<Api>, id: Result<Path<String>, PathRejection>) -> ApiResult<Response> {
    let Path(id) = id?;
    let Some(it) = api.engine.get(&id).await? else {
        return Err(ApiError::not_found(format!("{id:?} is absent or deleted")));
    };
    let ctype = match it.content_type {
        ContentType::Json => "application/json",
        _ => "application/octet-stream",
    };
    let mut resp = it.content.clone().into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    let etag = HeaderValue::from_str(&format!("\"{}\"", it.content_hash));
    let origin = HeaderValue::from_str(&it.origin);
    if let (Ok(etag), Ok(origin)) = (etag, origin) {
        h.insert(header::ETAG, etag);
        h.insert("x-origin", origin);
    }
    h.insert("x-version", HeaderValue::from(it.version));
    Ok(resp)
}

async fn delete_item(State(api): State<Api>, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let Path(id) = id?;
    let deleted = api.engine.delete(&id).await?;
    let version = api.engine.current_entry(&id).await?.map(|e| e.version);
    Ok(Json(json!({"deleted": deleted, "version": version})))
}

async fn item_status(State(api): State<Api>, id: Result<Path<String>, PathRejection>) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    Ok(Json(api.engine.status(&id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchPut {
    id: String,
    /// Stored as JSON content.
    content: Value,
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    #[serde(default)]
    put: Vec<BatchPut>,
    #[serde(default)]
    delete: Vec<String>,
}

async fn batch(State(api): State<Api>, body: Result<Json<BatchBody>, JsonRejection>) -> ApiResult<impl IntoResponse> {
    let Json(b) = body?;
    let items: Vec<SyncItem> = b
        .put
        .into_iter()
        .map(|p| {
            let it = SyncItem::from_json(p.id, p.content);
            match p.state {
                Some(s) => it.with_state(s),
                None => it,
            }
        })
        .collect();
    let mut result = crate::engine::BatchResult::default();
    if !items.is_empty() {
        result = api.engine.submit_many(items).await?;
    }
    if !b.delete.is_empty() {
        let ids: Vec<&str> = b.delete.iter().map(String::as_str).collect();
        let d = api.engine.delete_many(&ids).await?;
        // A delete of an absent id is done, not failed.
        result.total += d.total;
        result.succeeded += d.total;
    }
    Ok(Json(result))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBody {
    ids: Vec<String>,
}

async fn get_many(State(api): State<Api>, body: Result<Json<GetBody>, JsonRejection>) -> ApiResult<impl IntoResponse> {
    let Json(b) = body?;
    if b.ids.len() > 10_000 {
        return Err(ApiError::bad_request("at most 10000 ids per call"));
    }
    let ids: Vec<&str> = b.ids.iter().map(String::as_str).collect();
    let items = api.engine.get_many(&ids).await?;
    Ok(Json(
        items.iter().map(|i| i.as_ref().map(ItemView::from)).collect::<Vec<_>>(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanParams {
    prefix: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

async fn scan(
    State(api): State<Api>,
    params: Result<Query<ScanParams>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(p) = params?;
    let limit = p.limit.unwrap_or(100).min(10_000);
    let items = match (&p.prefix, &p.state) {
        (prefix, Some(state)) => {
            let mut v = api.engine.get_by_state(state, usize::MAX >> 1).await?;
            v.retain(|i| prefix.as_deref().is_none_or(|p| i.object_id.starts_with(p)));
            v.sort_by(|a, b| a.object_id.cmp(&b.object_id));
            v.truncate(limit);
            v
        }
        (prefix, None) => api.engine.scan_prefix(prefix.as_deref().unwrap_or(""), limit).await?,
    };
    Ok(Json(items.iter().map(ItemView::from).collect::<Vec<_>>()))
}

async fn merkle_root(State(api): State<Api>) -> Json<Value> {
    let (root, count, depth) = api.engine.merkle_summary();
    Json(json!({"root": root.map(hex::encode), "count": count, "depth": depth}))
}

async fn merkle_node(State(api): State<Api>, path: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let Path(path) = path?;
    let path = if path == "root" { String::new() } else { path };
    if !path.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request("a tree path is hex nibbles (or `root`)"));
    }
    let node = api
        .engine
        .get_merkle_node(&path.to_ascii_lowercase())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no tree node at {path:?}")))?;
    Ok(Json(json!({
        "path": node.path,
        "hash": hex::encode(node.hash),
        "count": node.count,
        "is_leaf": node.is_leaf,
        "children": node.children.iter().map(|(k, v)| (k.clone(), hex::encode(v))).collect::<std::collections::BTreeMap<_, _>>(),
    })))
}

async fn create_index(
    State(api): State<Api>,
    body: Result<Json<SearchIndex>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(index) = body?;
    let name = index.name.clone();
    api.engine.create_search_index(index).await?;
    Ok((StatusCode::CREATED, Json(json!({"created": name}))))
}

async fn drop_index(State(api): State<Api>, name: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let Path(name) = name?;
    api.engine.drop_search_index(&name).await?;
    Ok(Json(json!({"dropped": name})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    query: SearchQuery,
    #[serde(default)]
    tier: SearchTier,
    limit: Option<usize>,
}

async fn search(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<SearchBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let (Path(name), Json(b)) = (name?, body?);
    let limit = b.limit.unwrap_or(100).min(10_000);
    let r = api.engine.search_with_options(&name, &b.query, b.tier, limit).await?;
    Ok(Json(json!({
        "ids": r.ids,
        "items": r.items.iter().map(ItemView::from).collect::<Vec<_>>(),
        "source": if r.cached { json!("cache") } else { json!(r.source) },
    })))
}

async fn peers(State(api): State<Api>) -> Json<Value> {
    Json(json!(api.net.peers.view()))
}

fn peer_param(peer: Result<Path<String>, PathRejection>) -> ApiResult<libp2p::PeerId> {
    let Path(peer) = peer?;
    peer.parse()
        .map_err(|e| ApiError::bad_request(format!("{peer:?} is not a peer id: {e}")))
}

/// Cuts the link to a peer (partition drills).
async fn block_peer(State(api): State<Api>, peer: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let peer = peer_param(peer)?;
    api.net.block(peer, true).await;
    Ok(Json(json!({"peer": peer.to_string(), "blocked": true})))
}

async fn unblock_peer(State(api): State<Api>, peer: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let peer = peer_param(peer)?;
    api.net.block(peer, false).await;
    Ok(Json(json!({"peer": peer.to_string(), "blocked": false})))
}

async fn sync(State(api): State<Api>) -> Json<Value> {
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

async fn health(State(api): State<Api>) -> Json<Value> {
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
struct ReadyParams {
    /// 503 when a connected peer lags more than this.
    max_lag_ms: Option<u64>,
    /// 503 with fewer connected peers.
    min_peers: Option<usize>,
}

async fn readyz(State(api): State<Api>, params: Result<Query<ReadyParams>, QueryRejection>) -> ApiResult<Response> {
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

async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::metrics::render(&api.engine, &api.net).await,
    )
}
