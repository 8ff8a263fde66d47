//! A small client of a node's HTTP API, used by `syncnode status`, `put`,
//! `get` and `del`, and by the process-level tests.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use std::time::Duration;

/// One answer: status, headers, body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| anyhow::anyhow!("answer is not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

/// An id made safe for a URL path segment.
pub fn encode_id(id: &str) -> String {
    utf8_percent_encode(id, NON_ALPHANUMERIC).to_string()
}

/// A node's API base URL from what an operator types: `http://host:port`,
/// or `host:port` with the scheme left out.
pub fn base_url(api: &str) -> String {
    if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

impl ApiClient {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            token,
            http: Client::builder(TokioExecutor::new()).build_http(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Gives up on an answer after `timeout` (30 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<(&str, Bytes)>) -> anyhow::Result<Answer> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some((ctype, b)) => {
                req = req.header(hyper::header::CONTENT_TYPE, ctype);
                Full::new(b)
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body)?;
        let resp = tokio::time::timeout(self.timeout, self.http.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("{method} {}{path}: no answer within {:?}", self.base, self.timeout))?
            .map_err(|e| anyhow::Error::new(e).context(format!("{method} {}{path}", self.base)))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer { status, headers, body })
    }

    /// GETs `path` into the file `out` as it arrives (no size limit, no
    /// timeout on the body); returns the bytes written. The body goes to
    /// `out.partial` first and becomes `out` only complete (its length
    /// checked against `Content-Length`) and fsynced; `out` must not exist.
    pub async fn download(&self, path: &str, out: &std::path::Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt;
        anyhow::ensure!(!out.exists(), "{} exists", out.display());
        let mut partial = out.as_os_str().to_owned();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        let mut req = Request::builder().uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = tokio::time::timeout(self.timeout, self.http.request(req.body(Full::new(Bytes::new()))?))
            .await
            .map_err(|_| anyhow::anyhow!("GET {}{path}: no answer within {:?}", self.base, self.timeout))?
            .map_err(|e| anyhow::Error::new(e).context(format!("GET {}{path}", self.base)))?;
        let status = resp.status();
        let expected: Option<u64> = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let mut body = resp.into_body();
        if !status.is_success() {
            let text = body.collect().await?.to_bytes();
            anyhow::bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
        }
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", partial.display()))?;
        let copied = async {
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    file.write_all(&data).await?;
                    n += data.len() as u64;
                }
            }
            if let Some(len) = expected {
                anyhow::ensure!(n == len, "the answer ended after {n} of {len} bytes");
            }
            file.sync_all().await?;
            tokio::fs::rename(&partial, out).await?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::File::open(dir).await?.sync_all().await?;
            }
            anyhow::Ok(n)
        }
        .await;
        if copied.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        copied.map_err(|e| e.context(format!("download to {}", out.display())))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post_json(&self, path: &str, v: &serde_json::Value) -> anyhow::Result<Answer> {
        self.call(
            Method::POST,
            path,
            Some(("application/json", Bytes::from(v.to_string()))),
        )
        .await
    }

    pub async fn put_item(&self, id: &str, content: Bytes, json: bool) -> anyhow::Result<Answer> {
        let ctype = if json {
            "application/json"
        } else {
            "application/octet-stream"
        };
        self.put_typed(id, content, ctype).await
    }

    /// A PUT with this `Content-Type`, which the node keeps and returns.
    pub async fn put_typed(&self, id: &str, content: Bytes, content_type: &str) -> anyhow::Result<Answer> {
        self.call(
            Method::PUT,
            &format!("/v1/items/{}", encode_id(id)),
            Some((content_type, content)),
        )
        .await
    }

    pub async fn get_item(&self, id: &str) -> anyhow::Result<Answer> {
        self.get(&format!("/v1/items/{}", encode_id(id))).await
    }

    pub async fn delete_item(&self, id: &str) -> anyhow::Result<Answer> {
        self.call(Method::DELETE, &format!("/v1/items/{}", encode_id(id)), None)
            .await
    }

    /// A call that must succeed, as JSON.
    pub async fn ok_json(&self, a: anyhow::Result<Answer>) -> anyhow::Result<serde_json::Value> {
        let a = a?;
        if !a.status.is_success() {
            return Err(HttpError {
                status: a.status,
                body: a.text(),
            }
            .into());
        }
        a.json()
    }
}

/// An error answer of the node.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub body: String,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.body)
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    /// The node refused the input itself (400, 422), not failed at it.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self.status.as_u16(), 400 | 422)
    }
}

/// A version from JSON: a decimal string (how the API writes them, since
/// they exceed 2^53) or a number.
pub fn version(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// `k=v&…`, each part percent-encoded.
pub fn query_string(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode_id(k), encode_id(v)))
        .collect::<Vec<_>>()
        .join("&")
}
