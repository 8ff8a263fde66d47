//! Membership, the I/O side (DESIGN §5.6): carries the protocol crate's
//! SWIM state machine over a libp2p request-response protocol of our own
//! (`/syncnode/members/1`, under the same Noise and PSK as everything else),
//! and keeps the table `/v1/members` shows.
//!
//! Each SWIM packet is one request: an `Envelope` (version byte, cluster id,
//! at most `MAX_FRAME` bytes) holding foca's bytes and the sender's wall
//! clock. The cluster id is checked by the swarm rather than the codec, so
//! a peer of another cluster — usually the first thing a misconfigured node
//! meets — can be named in the log (a failed read reaches nobody). The answer comes at once with the arrival and departure
//! times, which gives an NTP-style clock offset sample per exchange
//! (`clock_offset`). A packet whose SWIM sender is not the authenticated
//! peer that sent it is refused: nobody speaks for another member.

use futures::{AsyncRead, AsyncWrite};
use libp2p::{PeerId, StreamProtocol};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;
use syncnode_protocol::clock_offset::{ClockOffsets, Sample};
use syncnode_protocol::membership::{MAX_PACKET, MemberId, MemberState, MemberView};
use syncnode_protocol::wire::{Body, Envelope, MemberAck, MemberPacket};

use super::transport::{read_envelope, write_envelope};
use crate::locks::MutexUnpoisoned;

pub const MEMBERS_PROTOCOL: StreamProtocol = StreamProtocol::new("/syncnode/members/1");
/// Largest membership frame: a SWIM packet plus the envelope.
pub const MAX_FRAME: usize = MAX_PACKET + 256;

/// The request-response codec of membership packets.
#[derive(Debug, Clone)]
pub struct MemberCodec {
    pub cluster: String,
    /// Bytes of membership traffic, both ways.
    pub traffic: std::sync::Arc<super::transport::Traffic>,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// A membership request with the cluster id it came with.
#[derive(Debug, Clone)]
pub struct ClusterPacket {
    pub cluster: String,
    pub packet: MemberPacket,
}

impl MemberCodec {
    async fn read<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<(String, Body)> {
        let env = read_envelope(io, MAX_FRAME, None, &self.traffic).await?;
        Ok((env.cluster, env.body))
    }

    async fn write<T: AsyncWrite + Unpin + Send>(&self, io: &mut T, body: Body) -> io::Result<()> {
        let env = Envelope::new(self.cluster.clone(), body);
        write_envelope(io, env, MAX_FRAME, &self.traffic).await
    }
}

impl libp2p::request_response::Codec for MemberCodec {
    type Protocol = StreamProtocol;
    type Request = ClusterPacket;
    type Response = MemberAck;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ClusterPacket> {
        match self.read(io).await? {
            (cluster, Body::Member(packet)) => Ok(ClusterPacket { cluster, packet }),
            _ => Err(invalid("expected a membership packet")),
        }
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<MemberAck> {
        match self.read(io).await? {
            (cluster, Body::MemberAck(a)) if cluster == self.cluster => Ok(a),
            _ => Err(invalid("expected a membership answer of our cluster")),
        }
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ClusterPacket,
    ) -> io::Result<()> {
        self.write(io, Body::Member(req.packet)).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: MemberAck,
    ) -> io::Result<()> {
        self.write(io, Body::MemberAck(res)).await
    }
}

/// What the swarm learns from a SWIM packet before foca sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspected {
    /// The packet carries its sender's own goodbye (foca's leave: the
    /// sender's identity, declared down, among the updates).
    pub leaves: bool,
}

/// Checks a SWIM packet from `from` (the authenticated peer): its SWIM
/// sender must be `from` (nobody speaks for another member), and no
/// identity in it may claim a start time (`bump`) past `max_bump` (one
/// that would outrank every real restart of that member). foca encodes a
/// packet as its header, a big-endian count, then the member updates.
pub fn inspect(payload: &[u8], from: &PeerId, max_bump: u64) -> Result<Inspected, String> {
    let (header, rest) = postcard::take_from_bytes::<foca::Header<MemberId>>(payload)
        .map_err(|e| format!("undecodable membership packet: {e}"))?;
    if header.src.peer != from.to_string() {
        return Err(format!(
            "membership packet from {from} claims to come from {}",
            header.src.peer
        ));
    }
    if header.src.bump > max_bump {
        return Err(format!(
            "membership packet from {from} claims a start time in the future"
        ));
    }
    let mut leaves = false;
    if let Some((count, mut rest)) = rest.split_first_chunk::<2>() {
        for _ in 0..u16::from_be_bytes(*count) {
            let Ok((m, more)) = postcard::take_from_bytes::<foca::Member<MemberId>>(rest) else {
                break;
            };
            if m.id().bump > max_bump {
                return Err(format!(
                    "membership packet from {from} names {} with a start time in the future",
                    m.id().peer
                ));
            }
            leaves |= m.id().peer == header.src.peer && m.state() == MemberState::Down;
            rest = more;
        }
    }
    Ok(Inspected { leaves })
}

/// A member as `/v1/members` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberInfo {
    pub peer_id: String,
    /// alive, suspect, down or left.
    pub state: &'static str,
    pub region: String,
    pub addresses: Vec<String>,
    pub incarnation: u16,
    pub connected: bool,
    /// Their clock minus ours, ms (NTP-style, from membership traffic).
    pub clock_offset_ms: Option<i64>,
    /// The round trip of the sample the offset comes from, ms.
    pub clock_rtt_ms: Option<u64>,
}

/// What the swarm task knows of the membership, for the API and the other
/// loops: refreshed after every membership event.
#[derive(Default)]
pub struct MemberTable {
    inner: Mutex<TableState>,
}

#[derive(Default)]
struct TableState {
    members: BTreeMap<String, (MemberView, bool)>,
    /// Peers that announced their leave (SIGTERM): down, and known why.
    left: std::collections::BTreeSet<String>,
    offsets: ClockOffsets,
}

impl MemberTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, TableState> {
        self.inner.locked()
    }

    /// Replaces the view with the core's, noting which members are connected.
    pub fn refresh(&self, views: Vec<MemberView>, offsets: ClockOffsets, connected: impl Fn(&str) -> bool) {
        let mut t = self.lock();
        t.offsets = offsets;
        t.members = views
            .into_iter()
            .map(|v| {
                let c = connected(&v.id.peer);
                (v.id.peer.clone(), (v, c))
            })
            .collect();
        // What SWIM no longer knows goes from here too.
        let TableState { members, left, offsets } = &mut *t;
        left.retain(|p| members.contains_key(p));
        offsets.retain(|p| members.contains_key(p));
    }

    pub fn mark_left(&self, peer: &str, left: bool) {
        let mut t = self.lock();
        if left {
            t.left.insert(peer.to_string());
        } else {
            t.left.remove(peer);
        }
    }

    pub fn offset(&self, peer: &str) -> Option<Sample> {
        self.lock().offsets.estimate(peer)
    }

    pub fn forget(&self, peer: &str) {
        let mut t = self.lock();
        t.members.remove(peer);
        t.offsets.remove(peer);
    }

    /// Members alive or suspect that we are connected to.
    pub fn connected_active(&self) -> usize {
        self.lock()
            .members
            .values()
            .filter(|(v, c)| *c && v.state != MemberState::Down)
            .count()
    }

    /// Peer ids of members alive or suspect.
    pub fn active(&self) -> Vec<String> {
        self.lock()
            .members
            .values()
            .filter(|(v, _)| v.state != MemberState::Down)
            .map(|(v, _)| v.id.peer.clone())
            .collect()
    }

    pub fn state_of(&self, peer: &str) -> Option<MemberState> {
        self.lock().members.get(peer).map(|(v, _)| v.state)
    }

    pub fn view(&self) -> Vec<MemberInfo> {
        let t = self.lock();
        t.members
            .values()
            .map(|(v, connected)| {
                let off = t.offsets.estimate(&v.id.peer);
                MemberInfo {
                    peer_id: v.id.peer.clone(),
                    state: match v.state {
                        MemberState::Alive => "alive",
                        MemberState::Suspect => "suspect",
                        MemberState::Down if t.left.contains(&v.id.peer) => "left",
                        MemberState::Down => "down",
                    },
                    region: v.id.region.clone(),
                    addresses: v.id.addrs.clone(),
                    incarnation: v.incarnation,
                    connected: *connected,
                    clock_offset_ms: off.map(|s| s.offset_ms),
                    clock_rtt_ms: off.map(|s| s.rtt_ms),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The swarm's own looks into a packet never panic, whatever comes.
        #[test]
        fn header_checks_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = inspect(&bytes, &PeerId::random(), u64::MAX);
        }
    }

    #[test]
    fn a_packet_speaking_for_another_member_is_refused() {
        let (me, other) = (PeerId::random(), PeerId::random());
        let header = |src: &PeerId| {
            postcard::to_stdvec(&foca::Header {
                src: MemberId::placeholder(src.to_string()),
                src_incarnation: 0,
                dst: MemberId::placeholder("x"),
                message: foca::Message::<MemberId>::Announce,
            })
            .unwrap()
        };
        let leaves = |b: &[u8]| inspect(b, &me, u64::MAX).unwrap().leaves;
        assert!(inspect(&header(&me), &me, u64::MAX).is_ok());
        assert!(inspect(&header(&other), &me, u64::MAX).is_err());
        assert!(!leaves(&header(&me)));
        // foca's goodbye: the header, a big-endian update count, the sender down.
        let mut bye = header(&me);
        bye.extend(1u16.to_be_bytes());
        bye.extend(postcard::to_stdvec(&foca::Member::down(MemberId::placeholder(me.to_string()))).unwrap());
        assert!(leaves(&bye));
        let mut not_bye = header(&me);
        not_bye.extend(1u16.to_be_bytes());
        not_bye.extend(postcard::to_stdvec(&foca::Member::down(MemberId::placeholder(other.to_string()))).unwrap());
        assert!(!leaves(&not_bye));
        // An identity that would outrank every real restart is refused.
        let mut far = MemberId::placeholder(other.to_string());
        far.bump = 10_000;
        let mut evil = header(&me);
        evil.extend(1u16.to_be_bytes());
        evil.extend(postcard::to_stdvec(&foca::Member::alive(far)).unwrap());
        assert!(inspect(&evil, &me, 9_999).is_err());
        assert!(inspect(&evil, &me, 10_000).is_ok());
    }
}
