//! Items: put, get, delete, status, batches, multi-get, scans, and the
//! Merkle tree nodes.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

use super::Api;
use super::error::{ApiError, ApiResult};
use crate::engine::{CacheTtl, ContentType, SubmitOptions, SyncItem};

/// An item as JSON: the content as JSON when it is JSON, as text when it is
/// UTF-8, else hex.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ItemView {
    pub id: String,
    #[serde(with = "crate::engine::item::version_json")]
    pub version: u64,
    pub origin: String,
    pub state: String,
    pub content_hash: String,
    pub updated_at: i64,
    pub content: Value,
    pub encoding: String,
    /// The media type its writer gave, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
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
            media_type: it.media_type.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutParams {
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

/// `If-Match` / `If-None-Match` (RFC 9110 §13.1) against an item's ETag,
/// the quoted content hash; `*` stands for "any live item".
#[derive(Debug, Default)]
struct Preconditions {
    if_match: Option<Vec<String>>,
    if_none_match: Option<Vec<String>>,
}

impl Preconditions {
    fn of(headers: &HeaderMap) -> ApiResult<Self> {
        // If-Match compares strongly (a weak tag never matches); If-None-Match
        // weakly, by the opaque part (RFC 9110 §8.8.3.2).
        let list = |name: header::HeaderName, weak: bool| -> ApiResult<Option<Vec<String>>> {
            let values: Vec<&HeaderValue> = headers.get_all(&name).iter().collect();
            if values.is_empty() {
                return Ok(None);
            }
            let mut tags = Vec::new();
            for v in values {
                let v = v
                    .to_str()
                    .map_err(|_| ApiError::bad_request(format!("{name}: not ASCII")))?;
                tags.extend(
                    v.split(',')
                        .map(|t| t.trim())
                        .filter_map(|t| match t.strip_prefix("W/") {
                            Some(opaque) if weak => Some(opaque.to_string()),
                            Some(_) => None,
                            None => Some(t.to_string()),
                        }),
                );
            }
            Ok(Some(tags))
        };
        Ok(Self {
            if_match: list(header::IF_MATCH, false)?,
            if_none_match: list(header::IF_NONE_MATCH, true)?,
        })
    }

    fn any(&self) -> bool {
        self.if_match.is_some() || self.if_none_match.is_some()
    }

    /// Whether they hold for an item whose ETag is `current` (`None`: absent or deleted).
    fn hold(&self, current: Option<&str>) -> bool {
        let listed = |tags: &Vec<String>| match current {
            Some(c) => tags.iter().any(|t| t == "*" || t == c),
            None => false,
        };
        self.if_match.as_ref().is_none_or(listed) && self.if_none_match.as_ref().is_none_or(|t| !listed(t))
    }
}

/// What GET answers as `Content-Type` for an item without a media type.
fn default_media_type(t: ContentType) -> &'static str {
    match t {
        ContentType::Json => "application/json",
        ContentType::Binary => "application/octet-stream",
    }
}

fn etag(it: &SyncItem) -> String {
    format!("\"{}\"", it.content_hash)
}

/// Runs `write` if the request's preconditions hold for the item as it is
/// now; 412 otherwise. Conditional writes of one id on this node take
/// turns, so two of them cannot both see the same ETag. A write without
/// conditions, or one replicated from another node, may still land between
/// the check and the write: last writer wins.
async fn conditionally<T>(
    api: &Api,
    id: &str,
    headers: &HeaderMap,
    write: impl std::future::Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    let pre = Preconditions::of(headers)?;
    if !pre.any() {
        return write.await;
    }
    let _turn = api.conditional.lock(id).await;
    let current = api.engine.get(id).await?;
    if !pre.hold(current.as_ref().map(etag).as_deref()) {
        return Err(ApiError::new(
            axum::http::StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            match &current {
                Some(it) => format!("{id:?} is at ETag {}", etag(it)),
                None => format!("{id:?} is absent or deleted"),
            },
        ));
    }
    write.await
}

pub(super) async fn put_item(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<PutParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<impl IntoResponse> {
    let (Path(id), Query(params), body) = (id?, params?, body?);
    let options = submit_options(&params)?;
    let mut item = if is_json(&headers) {
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body is not JSON: {e}")))?;
        SyncItem::from_json(id.clone(), v)
    } else {
        SyncItem::new(id.clone(), body)
    };
    // Kept as given and returned by GET (the engine checks its form),
    // unless it is empty or what GET answers without it.
    if let Some(v) = headers.get(header::CONTENT_TYPE) {
        let v = v
            .to_str()
            .map_err(|_| ApiError::bad_request("Content-Type is not printable ASCII"))?
            .trim();
        if !v.is_empty() && !v.eq_ignore_ascii_case(default_media_type(item.content_type)) {
            item = item.with_media_type(v);
        }
    }
    let receipt = conditionally(&api, &id, &headers, async {
        Ok(api.engine.submit_with(item, options).await?)
    })
    .await?;
    Ok(Json(receipt))
}

pub(super) async fn get_item(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Path(id) = id?;
    let Some(it) = api.engine.get(&id).await? else {
        return Err(ApiError::not_found(format!("{id:?} is absent or deleted")));
    };
    let pre = Preconditions::of(&headers)?;
    // If-Match first (RFC 9110 §13.2.2): a failed one is 412, not 304.
    let only_match = Preconditions {
        if_match: pre.if_match.clone(),
        if_none_match: None,
    };
    if !only_match.hold(Some(&etag(&it))) {
        return Err(ApiError::new(
            axum::http::StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            format!("{id:?} is at ETag {}", etag(&it)),
        ));
    }
    if pre.if_none_match.is_some() && !pre.hold(Some(&etag(&it))) {
        let mut resp = axum::http::StatusCode::NOT_MODIFIED.into_response();
        if let Ok(v) = HeaderValue::from_str(&etag(&it)) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        return Ok(resp);
    }
    let ctype = it
        .media_type
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
        .unwrap_or(HeaderValue::from_static(default_media_type(it.content_type)));
    let mut resp = it.content.clone().into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, ctype);
    let etag = HeaderValue::from_str(&etag(&it));
    let origin = HeaderValue::from_str(&it.origin);
    if let (Ok(etag), Ok(origin)) = (etag, origin) {
        h.insert(header::ETAG, etag);
        h.insert("x-origin", origin);
    }
    h.insert("x-version", HeaderValue::from(it.version));
    Ok(resp)
}

pub(super) async fn delete_item(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let Path(id) = id?;
    let (deleted, receipt) =
        conditionally(&api, &id, &headers, async { Ok(api.engine.delete_receipt(&id).await?) }).await?;
    Ok(Json(
        json!({"deleted": deleted, "version": receipt.version.to_string(), "origin": receipt.origin}),
    ))
}

pub(super) async fn item_status(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    Ok(Json(api.engine.status(&id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchPut {
    id: String,
    /// Stored as JSON content.
    content: Value,
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    #[serde(default)]
    put: Vec<BatchPut>,
    #[serde(default)]
    delete: Vec<String>,
}

pub(super) async fn batch(
    State(api): State<Api>,
    body: Result<Json<BatchBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
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
pub(super) struct GetBody {
    ids: Vec<String>,
}

pub(super) async fn get_many(
    State(api): State<Api>,
    body: Result<Json<GetBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
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
pub(super) struct ScanParams {
    prefix: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// A page cursor: the last id of a page, hex-encoded (opaque to clients).
pub(super) fn cursor_of(last: Option<&str>) -> Option<String> {
    last.map(|id| hex::encode(id.as_bytes()))
}

/// The id a cursor stands for.
pub(super) fn cursor_id(cursor: Option<&str>) -> Result<Option<String>, ApiError> {
    cursor
        .map(|c| {
            hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::bad_request("after: not a cursor from a `next` of this API"))
        })
        .transpose()
}

pub(super) async fn scan(
    State(api): State<Api>,
    params: Result<Query<ScanParams>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(p) = params?;
    let limit = p.limit.unwrap_or(100).clamp(1, 10_000);
    let after = cursor_id(p.after.as_deref())?;
    let prefix = p.prefix.as_deref().unwrap_or("");
    let items = match &p.state {
        Some(state) => api.engine.page_by_state(state, prefix, after.as_deref(), limit).await?,
        None => api.engine.scan_page(prefix, after.as_deref(), limit).await?,
    };
    // A full page may have more after it; a short one is the last.
    let next = if items.len() == limit {
        cursor_of(items.last().map(|i| i.object_id.as_str()))
    } else {
        None
    };
    Ok(Json(json!({
        "items": items.iter().map(ItemView::from).collect::<Vec<_>>(),
        "next": next,
    })))
}

pub(super) async fn merkle_root(State(api): State<Api>) -> Json<Value> {
    let (root, count, depth) = api.engine.merkle_summary();
    Json(json!({"root": root.map(hex::encode), "count": count, "depth": depth}))
}

pub(super) async fn merkle_node(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
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
