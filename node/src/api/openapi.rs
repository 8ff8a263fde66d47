//! The API's routes and their description in one table: the router is
//! built from it and `GET /v1/openapi.json` (OpenAPI 3.1) is generated from
//! it, so no endpoint is served undescribed or described unserved.

use axum::routing::MethodRouter;
use serde_json::{Map, Value, json};

use super::Api;

/// One operation: its method and handler, and what a client must know.
pub(super) struct Op {
    pub verb: &'static str,
    pub handler: MethodRouter<Api>,
    pub summary: &'static str,
    /// Query parameters, `name: description`.
    pub query: &'static [(&'static str, &'static str)],
    /// The request body's schema (a component name) and media type, if any.
    pub body: Option<(&'static str, &'static str)>,
    /// The success status.
    pub status: &'static str,
    /// The answer's schema (a component name) and media type.
    pub answer: (&'static str, &'static str),
}

/// One path and its operations; `open` paths need no token.
pub(super) struct Route {
    pub path: &'static str,
    pub open: bool,
    pub ops: Vec<Op>,
}

const JSON: &str = "application/json";

/// The OpenAPI document of `routes`.
pub(super) fn document(routes: &[Route]) -> Value {
    let mut paths = Map::new();
    for r in routes {
        let mut item = Map::new();
        for op in &r.ops {
            let mut params: Vec<Value> = path_params(r.path)
                .into_iter()
                .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
                .collect();
            params.extend(op.query.iter().map(|(name, description)| {
                json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": "string"}})
            }));
            let mut o = json!({
                "summary": op.summary,
                "parameters": params,
                "responses": {
                    op.status: {"description": "success", "content": {op.answer.1: {"schema": schema_ref(op.answer.0)}}},
                    "default": {"description": "an error", "content": {JSON: {"schema": schema_ref("Error")}}},
                },
            });
            if let Some((schema, media)) = op.body {
                o["requestBody"] = json!({"required": true, "content": {media: {"schema": schema_ref(schema)}}});
            }
            if !r.open {
                o["security"] = json!([{"bearer": []}]);
            }
            item.insert(op.verb.to_string(), o);
        }
        paths.insert(r.path.to_string(), Value::Object(item));
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "syncnode", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    })
}

fn schema_ref(name: &str) -> Value {
    match name {
        "Bytes" => json!({"type": "string", "format": "binary"}),
        "Text" => json!({"type": "string"}),
        _ => json!({"$ref": format!("#/components/schemas/{name}")}),
    }
}

/// The `{name}` parts of a path.
fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// The bodies' shapes (JSON Schema 2020-12, as OpenAPI 3.1 uses).
fn schemas() -> Value {
    let version = json!({"type": "string", "pattern": "^[0-9]+$", "description": "a 64-bit HLC as a decimal string"});
    json!({
        "Error": {"type": "object", "required": ["error", "detail"], "properties": {
            "error": {"type": "string"}, "detail": {"type": "string"}}},
        "WriteReceipt": {"type": "object", "properties": {
            "id": {"type": "string"}, "version": version, "origin": {"type": "string"}, "content_hash": {"type": "string"}}},
        "DeleteReceipt": {"type": "object", "properties": {
            "deleted": {"type": ["boolean", "null"]}, "version": version, "origin": {"type": "string"}}},
        "Item": {"type": "object", "properties": {
            "id": {"type": "string"}, "version": version, "origin": {"type": "string"}, "state": {"type": "string"},
            "content_hash": {"type": "string"}, "updated_at": {"type": "integer"},
            "content": {"description": "JSON when the item is JSON, else text (utf8) or hex"},
            "encoding": {"enum": ["json", "utf8", "hex"]},
            "media_type": {"type": "string", "description": "the Content-Type its writer gave (absent when none was)"}}},
        "Page": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
            "next": {"type": ["string", "null"], "description": "the cursor of the next page (pass as `after`)"}}},
        "Items": {"type": "array", "items": {"oneOf": [{"$ref": "#/components/schemas/Item"}, {"type": "null"}]}},
        "Ids": {"type": "object", "required": ["ids"], "properties": {"ids": {"type": "array", "items": {"type": "string"}}}},
        "Batch": {"type": "object", "properties": {
            "put": {"type": "array", "items": {"type": "object", "required": ["id", "content"], "properties": {
                "id": {"type": "string"}, "content": {}, "state": {"type": "string"}}}},
            "delete": {"type": "array", "items": {"type": "string"}}}},
        "BatchResult": {"type": "object", "properties": {
            "total": {"type": "integer"}, "succeeded": {"type": "integer"}, "failed": {"type": "integer"}}},
        "Index": {"type": "object", "required": ["name", "prefix", "fields"], "properties": {
            "name": {"type": "string"}, "prefix": {"type": "string"},
            "fields": {"type": "array", "items": {"type": "object", "required": ["name", "type"], "properties": {
                "name": {"type": "string"}, "type": {"enum": ["text", "numeric", "tag"]}, "sortable": {"type": "boolean"}}}}}},
        "Indexes": {"type": "object", "properties": {"indexes": {"type": "array", "items": {"$ref": "#/components/schemas/Index"}}}},
        "Search": {"type": "object", "required": ["query"], "properties": {
            "query": {"description": "a query: eq, range, tags, contains, prefix, fuzzy, and, or, not, all (see the README)"},
            "tier": {"enum": ["redis", "sql", "redis-then-sql", "redis_only", "sql_only", "redis_with_sql_fallback"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10000},
            "after": {"type": "string"}}},
        "SearchAnswer": {"type": "object", "properties": {
            "ids": {"type": "array", "items": {"type": "string"}},
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
            "source": {"enum": ["hot", "cold", "cache", "empty"]},
            "next": {"type": ["string", "null"]}}},
        "Object": {"type": "object", "description": "see the README's HTTP API section"},
        "List": {"type": "array", "items": {"type": "object"}, "description": "see the README's HTTP API section"},
    })
}
