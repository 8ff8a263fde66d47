//! The request-response codec for anti-entropy over libp2p: each request and
//! response is one frame (4-byte big-endian length, then an `Envelope`) on its
//! own stream. Frames past the size limit and messages of another cluster are
//! refused before any work is done.
//!
//! Also the TCP stack under it: DNS names (`/dns4`, `/dns6`, `/dns`)
//! resolved at each dial, so a container back with a new IP is found again;
//! an optional pre-shared cluster key (pnet) wraps the raw socket, so a node without the key cannot even finish the
//! Noise handshake; then Noise (peer ids) and Yamux.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{PeerId, StreamProtocol, Transport, dns, identity, noise, tcp, yamux};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use syncnode_protocol::wire::{Body, Envelope, Request, Response};

/// The anti-entropy protocol name.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/syncnode/sync/1");

#[derive(Debug, Clone)]
pub struct SyncCodec {
    pub cluster: String,
    pub max_frame: usize,
    /// Bytes read and written by this node's sync streams.
    pub traffic: Arc<Traffic>,
}

/// Byte counters of the sync protocol.
#[derive(Debug, Default)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads one frame of at most `max` bytes and decodes its envelope,
/// checking its cluster id when `cluster` is given; counts the bytes. An
/// oversized frame is `InvalidInput` (a peer may allow larger items than we
/// do), anything undecodable `InvalidData`.
pub async fn read_envelope<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
    cluster: Option<&str>,
    traffic: &Traffic,
) -> io::Result<Envelope> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {len} bytes exceeds {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    traffic.received.fetch_add(4 + len as u64, Ordering::Relaxed);
    match cluster {
        Some(c) => Envelope::decode_for(&buf, max, c),
        None => Envelope::decode(&buf, max),
    }
    .map_err(invalid)
}

/// Writes one envelope as a frame of at most `max` bytes, counts it, and
/// closes the stream.
pub async fn write_envelope<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    env: Envelope,
    max: usize,
    traffic: &Traffic,
) -> io::Result<()> {
    let frame = env.to_frame();
    if frame.len() - 4 > max {
        // Our own message: not the peer's fault, so not InvalidData.
        return Err(io::Error::other("message exceeds the frame limit"));
    }
    io.write_all(&frame).await?;
    traffic.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
    io.close().await
}

impl SyncCodec {
    async fn read_body<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Body> {
        Ok(read_envelope(io, self.max_frame, Some(&self.cluster), &self.traffic)
            .await?
            .body)
    }

    async fn write_body<T: AsyncWrite + Unpin + Send>(&self, io: &mut T, body: Body) -> io::Result<()> {
        let env = Envelope::new(self.cluster.clone(), body);
        write_envelope(io, env, self.max_frame, &self.traffic).await
    }
}

impl libp2p::request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request> {
        match self.read_body(io).await? {
            Body::Request(r) => Ok(r),
            _ => Err(invalid("expected a request")),
        }
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response> {
        match self.read_body(io).await? {
            Body::Response(r) => Ok(r),
            _ => Err(invalid("expected a response")),
        }
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()> {
        self.write_body(io, Body::Request(req)).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()> {
        self.write_body(io, Body::Response(res)).await
    }
}

/// TCP (+ DNS, + pnet with `psk`) + Noise + Yamux.
pub fn tcp_transport(
    key: &identity::Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(key)?;
    let plain = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    // The system resolver (resolv.conf, hosts); a fallback where it has none.
    let tcp = match dns::tokio::Transport::system(plain) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "no system DNS configuration; using the default resolver");
            dns::tokio::Transport::custom(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)),
                dns::ResolverConfig::default(),
                dns::ResolverOpts::default(),
            )
        }
    };
    Ok(match psk {
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(std::time::Duration::from_secs(20))
            .boxed(),
        None => tcp
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(std::time::Duration::from_secs(20))
            .boxed(),
    })
}
