//! Every failure as a JSON `{error, detail}` with its HTTP status: engine
//! errors by kind, and axum's rejections of a bad path, query or body.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::StorageError;

/// An error answer: `{error, detail}`.
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
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
            StorageError::UnknownIndex(_) => (StatusCode::NOT_FOUND, "unknown_index", None),
            StorageError::Backpressure { retry_after_secs, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "backpressure",
                Some((*retry_after_secs).max(1)),
            ),
            StorageError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready", Some(1)),
            StorageError::Fenced(_) => (StatusCode::SERVICE_UNAVAILABLE, "writes_fenced", Some(1)),
            StorageError::Connection(_) => (StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", Some(1)),
            StorageError::ClockSkew { .. } => (StatusCode::CONFLICT, "clock_skew", None),
            StorageError::Backend(_) => (StatusCode::INTERNAL_SERVER_ERROR, "backend_error", None),
            StorageError::Rejected(_) => (StatusCode::UNPROCESSABLE_ENTITY, "rejected", None),
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
                let error = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
                    StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    _ => "bad_request",
                };
                Self::new(status, error, r.body_text())
            }
        }
    )*};
}
rejection!(BytesRejection, JsonRejection, PathRejection, QueryRejection);

pub type ApiResult<T> = Result<T, ApiError>;
