//! The HTTP server under the router: one hyper HTTP/1 connection per
//! accepted socket, with the limits axum's `serve` lacks.
//!
//! - A client must send a request's header within `header_timeout` (this
//!   also bounds a keep-alive connection waiting for its next request):
//!   half-sent headers cannot hold a socket for ever.
//! - A connection where no byte moved for `idle_timeout` is closed: a
//!   stalled request body, a client that stopped reading its answer. Only a
//!   handler at work on a fully received request is not idle (a backup
//!   being made sends nothing for minutes).
//! - At most `max_connections` are open; more wait in the listen backlog.
//! - On shutdown the listener closes, connections finish the request in
//!   flight (up to `drain_timeout`), then the rest are cut.
//! - A response sent before its request's body was read to the end (a 413,
//!   a 401) says `Connection: close`: the unread rest is in the way of the
//!   next request, and a client that reused the connection saw it cut off.

use axum::Router;
use axum::body::Body;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};

/// The server's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Connection counts for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed by the idle timeout.
    pub idle_closed: AtomicU64,
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<ConnectionStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let open = Open::new(stats.clone());
        let (router, limits, stop, stats) = (router.clone(), limits.clone(), stop_rx.clone(), stats.clone());
        connections.spawn(async move {
            connection(stream, router, limits, stop, &stats).await;
            drop((open, permit));
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = stats.open.load(Ordering::Relaxed),
            "http connections still busy after the drain timeout; closing them"
        );
        connections.shutdown().await;
    }
}

/// Serves one connection until it ends, idles out or the server stops.
async fn connection(
    stream: tokio::net::TcpStream,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    stats: &ConnectionStats,
) {
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched {
        io: stream,
        last: last.clone(),
        started,
    });
    // Requests received in full whose handler is still at work.
    let working = Arc::new(AtomicU64::new(0));
    let inner = TowerToHyperService::new(router);
    let counter = working.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let received = Received::new(counter.clone());
        let req = req.map(|b| {
            if b.is_end_stream() {
                received.set();
            }
            Body::new(Watch {
                inner: b,
                received: received.clone(),
            })
        });
        let fut = inner.call(req);
        async move {
            let mut r = fut.await;
            // Answered before its body was read to the end (413, 401, …):
            // the rest is left unread, so the connection closes, and a
            // client does not send its next request behind those bytes.
            if !received.0.done.load(Ordering::Relaxed)
                && let Ok(resp) = r.as_mut()
            {
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            drop(received);
            r
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let mut check = tokio::time::interval(Duration::from_secs(1).min(limits.idle_timeout));
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended");
                }
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick() => {
                let moved = Duration::from_millis(last.load(Ordering::Relaxed));
                let idle = started.elapsed().saturating_sub(moved);
                if working.load(Ordering::Relaxed) == 0 && idle >= limits.idle_timeout {
                    tracing::debug!(idle_ms = idle.as_millis() as u64, "http connection idle: closed");
                    stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Counts an open connection until dropped.
struct Open(Arc<ConnectionStats>);

impl Open {
    fn new(stats: Arc<ConnectionStats>) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request of a connection: once its body is in, it counts as "handler
/// at work" until the handler is done with it (dropped).
#[derive(Clone)]
struct Received(Arc<ReceivedState>);

struct ReceivedState {
    done: AtomicBool,
    working: Arc<AtomicU64>,
}

impl Received {
    fn new(working: Arc<AtomicU64>) -> Self {
        Self(Arc::new(ReceivedState {
            done: AtomicBool::new(false),
            working,
        }))
    }

    /// The body is in: the request counts as work from now on.
    fn set(&self) {
        if !self.0.done.swap(true, Ordering::Relaxed) {
            self.0.working.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ReceivedState {
    fn drop(&mut self) {
        if *self.done.get_mut() {
            self.working.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A request body that says when it has been read to its end.
struct Watch {
    inner: hyper::body::Incoming,
    received: Received,
}

impl hyper::body::Body for Watch {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.received.set();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that notes when a byte last moved (ms since `started`).
struct Watched {
    io: tokio::net::TcpStream,
    last: Arc<AtomicU64>,
    started: Instant,
}

impl Watched {
    fn touch(&self) {
        self.last
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
