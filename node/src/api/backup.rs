//! `GET /v1/backup`: a consistent copy of the node's SQLite L3, streamed
//! (engine/backup.rs makes it; `syncnode backup` saves it, `syncnode
//! restore` puts it into a new data dir).

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncReadExt;

use super::Api;
use super::error::ApiResult;

pub(super) async fn backup(State(api): State<Api>) -> ApiResult<Response> {
    let (file, size) = api.engine.backup_file().await?;
    let file = tokio::fs::File::from_std(file);
    let chunks = futures::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/vnd.sqlite3".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"syncnode-backup.sqlite\"".to_string(),
            ),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}
