//! The request-response codec for anti-entropy over libp2p: each request and
//! response is one frame (4-byte big-endian length, then an `Envelope`) on its
//! own stream. Frames past the size limit and messages of another cluster are
//! refused before any work is done. One protocol name per wire version
//! spoken (`/syncnode/sync/3`, `/2`, `/1`); a request newer than
//! the negotiated version is neither sent nor taken.
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
use syncnode_protocol::wire::{Body, Envelope, MIN_WIRE_VERSION, Request, Response, WIRE_VERSION, frame_length};

/// The sync protocol, once per wire version spoken, newest first: dialing a
/// peer negotiates the newest both speak, and identify tells each side which
/// versions the other has (`wire::WIRE_VERSION`, `MIN_WIRE_VERSION`).
pub const SYNC_PROTOCOLS: [StreamProtocol; 3] = [
    StreamProtocol::new("/syncnode/sync/3"),
    StreamProtocol::new("/syncnode/sync/2"),
    StreamProtocol::new("/syncnode/sync/1"),
];
const SYNC_PREFIX: &str = "/syncnode/sync/";

/// The wire version of a sync protocol name (`/syncnode/sync/<N>`).
pub fn wire_of(protocol: &str) -> Option<u8> {
    protocol.strip_prefix(SYNC_PREFIX)?.parse().ok()
}

/// The newest wire version both speak, given the protocols a peer lists;
/// `Err` with the versions it speaks when there is none.
pub fn common_wire<'a>(theirs: impl IntoIterator<Item = &'a str>) -> Result<u8, Vec<u8>> {
    let versions: Vec<u8> = theirs.into_iter().filter_map(wire_of).collect();
    versions
        .iter()
        .copied()
        .filter(|v| (MIN_WIRE_VERSION..=WIRE_VERSION).contains(v))
        .max()
        .ok_or(versions)
}

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
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = frame_length(prefix, max).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
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
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request> {
        match self.read_body(io).await? {
            b @ Body::Request(_) if b.since() > stream_wire(protocol) => {
                Err(invalid(format!("a wire version {} request on {protocol}", b.since())))
            }
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
        protocol: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()> {
        let body = Body::Request(req);
        if body.since() > stream_wire(protocol) {
            // Our own message: the peer speaks an older version, no fault of its.
            return Err(io::Error::other(format!(
                "the peer speaks {protocol}; this request needs wire version {}",
                body.since()
            )));
        }
        self.write_body(io, body).await
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

/// The wire version a negotiated stream carries.
fn stream_wire(protocol: &StreamProtocol) -> u8 {
    wire_of(protocol.as_ref()).unwrap_or(MIN_WIRE_VERSION)
}

/// TCP (+ DNS, + pnet with `psk`) + Noise + Yamux.
pub fn tcp_transport(
    key: &identity::Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(key)?;
    let plain = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    // The system resolver (resolv.conf, hosts). Without one there is no
    // server to ask (a public resolver would not know the cluster's private
    // names, and would learn them): /dns addresses then fail, and say why.
    let (cfg, mut opts) = match hickory_resolver::system_conf::read_system_conf() {
        Ok(conf) => conf,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "no system DNS configuration (/etc/resolv.conf): /dns4 and /dns6 addresses (bootstrap, advertise) cannot be resolved; use IP addresses or fix the resolver"
            );
            (dns::ResolverConfig::default(), dns::ResolverOpts::default())
        }
    };
    // Resolved at every dial, whatever the TTL (Docker's DNS says 600 s): a
    // container back with a new address is found at once, not in minutes.
    opts.positive_max_ttl = Some(std::time::Duration::from_secs(1));
    opts.negative_max_ttl = Some(std::time::Duration::from_secs(1));
    let tcp = dns::tokio::Transport::custom(plain, cfg, opts);
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
