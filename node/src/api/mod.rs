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
mod openapi;
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
use axum::routing::{delete, get, post, put};
use openapi::{Op, Route};
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

/// Every endpoint, with its description (see `openapi`).
fn routes() -> Vec<Route> {
    let op = |verb, handler, summary| Op {
        verb,
        handler,
        summary,
        query: &[],
        body: None,
        status: "200",
        answer: ("Object", "application/json"),
    };
    let route = |path, ops| Route { path, open: false, ops };
    vec![
        Route {
            path: "/livez",
            open: true,
            ops: vec![Op {
                answer: ("Text", "text/plain"),
                ..op("get", get(|| async { "ok" }), "200 while the process serves")
            }],
        },
        Route {
            path: "/readyz",
            open: true,
            ops: vec![Op {
                query: &[
                    ("max_lag_ms", "most lag behind any peer"),
                    ("min_peers", "fewest connected peers"),
                    ("max_region_lag_ms", "most lag behind any region"),
                ],
                ..op(
                    "get",
                    get(probes::readyz),
                    "200 when ready to serve, else 503 with the reasons",
                )
            }],
        },
        route("/v1/openapi.json", vec![op("get", get(openapi_json), "this document")]),
        route(
            "/v1/items",
            vec![Op {
                query: &[
                    ("prefix", "ids starting with this"),
                    ("state", "items in this state"),
                    ("limit", "items per page, 1..=10000 (default 100)"),
                    ("after", "the `next` of the previous page"),
                ],
                answer: ("Page", "application/json"),
                ..op("get", get(items::scan), "live items in id order, a page")
            }],
        ),
        route(
            "/v1/items/{id}",
            vec![
                Op {
                    query: &[
                        ("state", "the item's state"),
                        ("ttl", "seconds the Redis copy lives"),
                        ("tier", "both (default), cache or durable"),
                    ],
                    // Any media type: the request's Content-Type is kept and
                    // returned by GET.
                    body: Some(("Bytes", "*/*")),
                    answer: ("WriteReceipt", "application/json"),
                    ..op(
                        "put",
                        put(items::put_item),
                        "write an item (If-Match / If-None-Match: 412 when they do not hold)",
                    )
                },
                Op {
                    answer: ("Bytes", "*/*"),
                    ..op(
                        "get",
                        get(items::get_item),
                        "an item's content as its writer's Content-Type (else JSON or octet-stream), with ETag, X-Version, X-Origin (If-None-Match: 304)",
                    )
                },
                Op {
                    answer: ("DeleteReceipt", "application/json"),
                    ..op(
                        "delete",
                        delete(items::delete_item),
                        "delete an item: its tombstone's receipt",
                    )
                },
            ],
        ),
        route(
            "/v1/items/{id}/status",
            vec![op(
                "get",
                get(items::item_status),
                "where the item is: synced, pending, deleted or missing",
            )],
        ),
        route(
            "/v1/batch",
            vec![Op {
                body: Some(("Batch", "application/json")),
                answer: ("BatchResult", "application/json"),
                ..op("post", post(items::batch), "puts and deletes in one call")
            }],
        ),
        route(
            "/v1/get",
            vec![Op {
                body: Some(("Ids", "application/json")),
                answer: ("Items", "application/json"),
                ..op("post", post(items::get_many), "many items by id (null where absent)")
            }],
        ),
        route(
            "/v1/merkle",
            vec![op("get", get(items::merkle_root), "the tree's root, count and depth")],
        ),
        route(
            "/v1/merkle/{path}",
            vec![op(
                "get",
                get(items::merkle_node),
                "a tree node (`root` or hex nibbles)",
            )],
        ),
        route(
            "/v1/indexes",
            vec![
                Op {
                    body: Some(("Index", "application/json")),
                    status: "201",
                    ..op(
                        "post",
                        post(search::create_index),
                        "create (or replace) an index on every node",
                    )
                },
                Op {
                    answer: ("Indexes", "application/json"),
                    ..op("get", get(search::list_indexes), "the indexes")
                },
            ],
        ),
        route(
            "/v1/indexes/{name}",
            vec![op("delete", delete(search::drop_index), "drop an index on every node")],
        ),
        route(
            "/v1/indexes/{name}/search",
            vec![Op {
                body: Some(("Search", "application/json")),
                answer: ("SearchAnswer", "application/json"),
                ..op("post", post(search::search), "search an index, a page")
            }],
        ),
        route(
            "/v1/peers",
            vec![Op {
                answer: ("List", "application/json"),
                ..op(
                    "get",
                    get(peers::peers),
                    "the peers: connection, region, roots, lag, sessions, bytes",
                )
            }],
        ),
        route(
            "/v1/regions",
            vec![op(
                "get",
                get(peers::regions),
                "per region: members alive, lag, WAN bytes",
            )],
        ),
        route(
            "/v1/peers/{peer}/block",
            vec![
                op("put", put(peers::block_peer), "cut the link to a peer (drills)"),
                op("delete", delete(peers::unblock_peer), "restore the link to a peer"),
            ],
        ),
        route(
            "/v1/sync",
            vec![op("get", get(peers::sync), "sessions per peer; member watermarks")],
        ),
        route(
            "/v1/members",
            vec![op("get", get(members::members), "this node and the members SWIM knows")],
        ),
        route(
            "/v1/members/{peer}",
            vec![op(
                "delete",
                delete(members::forget_member),
                "forget a member that is gone for good",
            )],
        ),
        route(
            "/v1/backup",
            vec![Op {
                answer: ("Bytes", "application/octet-stream"),
                ..op("get", get(backup::backup), "a consistent copy of the SQLite database")
            }],
        ),
        route(
            "/health",
            vec![op(
                "get",
                get(probes::health),
                "the engine's health check and the node's state",
            )],
        ),
        route(
            "/metrics",
            vec![Op {
                answer: ("Text", "application/openmetrics-text"),
                ..op(
                    "get",
                    get(probes::metrics),
                    "metrics: OpenMetrics, or the Prometheus text format when asked",
                )
            }],
        ),
    ]
}

/// The router, built from the route table (`routes`), with the body limit
/// of the largest accepted item.
pub fn router(api: Api) -> Router {
    let (mut open, mut protected) = (Router::new(), Router::new());
    for r in routes() {
        let methods = r
            .ops
            .into_iter()
            .fold(axum::routing::MethodRouter::new(), |m, op| m.merge(op.handler));
        if r.open {
            open = open.route(r.path, methods);
        } else {
            protected = protected.route(r.path, methods);
        }
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    open.merge(protected)
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
/// envelope; a longer body is refused with 413 as it is read (and the
/// connection closes: `server` closes any whose body was left unread).
async fn limit_body(State(api): State<Api>, req: Request, next: Next) -> Response {
    let max = api.engine.max_payload_bytes() + 64 * 1024;
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

/// `GET /v1/openapi.json`.
async fn openapi_json() -> axum::Json<serde_json::Value> {
    axum::Json(openapi::document(&routes()))
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
