//! Search indexes: create, drop, search (bodies as in DESIGN §7).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::error::ApiResult;
use super::items::ItemView;
use crate::engine::{Query as SearchQuery, SearchIndex, SearchTier};

pub(super) async fn create_index(
    State(api): State<Api>,
    body: Result<Json<SearchIndex>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(index) = body?;
    let name = index.name.clone();
    api.engine.create_search_index(index).await?;
    Ok((StatusCode::CREATED, Json(json!({"created": name}))))
}

pub(super) async fn list_indexes(State(api): State<Api>) -> Json<Value> {
    let mut indexes = api.engine.search_indexes();
    indexes.sort_by(|a, b| a.name.cmp(&b.name));
    Json(json!({ "indexes": indexes }))
}

pub(super) async fn drop_index(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = name?;
    api.engine.drop_search_index(&name).await?;
    Ok(Json(json!({"dropped": name})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchBody {
    query: SearchQuery,
    #[serde(default)]
    tier: SearchTier,
    limit: Option<usize>,
    /// The `next` of the previous page.
    after: Option<String>,
}

pub(super) async fn search(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<SearchBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let (Path(name), Json(b)) = (name?, body?);
    let limit = b.limit.unwrap_or(100).clamp(1, 10_000);
    let after = super::items::cursor_id(b.after.as_deref())?;
    let r = api
        .engine
        .search_page(&name, &b.query, b.tier, limit, after.as_deref())
        .await?;
    // A full page may have more after it.
    let next = if r.ids.len() == limit {
        super::items::cursor_of(r.ids.last().map(String::as_str))
    } else {
        None
    };
    Ok(Json(json!({
        "ids": r.ids,
        "items": r.items.iter().map(ItemView::from).collect::<Vec<_>>(),
        "source": if r.cached { json!("cache") } else { json!(r.source) },
        "next": next,
    })))
}
