//! Wire messages and their codec.
//!
//! Every message is an `Envelope`: a version byte, the cluster id, and a body,
//! encoded with postcard. On a stream each message is a frame: a 4-byte
//! big-endian length, then the encoded envelope. Decoders never allocate more
//! than the configured limit, reject truncated, oversized and unknown input
//! with a typed error, and never panic (property and fuzz tested).
//!
//! Versions (DESIGN §5): wire version N and N+1 interoperate, so a cluster
//! upgrades one node at a time. A message is stamped with the oldest
//! version that has it, so a peer one version older reads every message it
//! can understand; messages new in N+1 go only to peers that speak N+1
//! (they list `/syncnode/sync/<N+1>`). Versions outside the range a node
//! speaks are refused by name (this release speaks 1 to 3: version 3 only
//! adds requests and their answers, so a version 1 peer is still served). Version 1: sessions, fetches and pushes over requests,
//! CDC and roots over gossipsub. Version 2 adds `Request::Cdc` and
//! `Request::Roots` (CDC along the relay tree, roots in one exchange).
//! Version 3 adds rateless sessions: `Request::Sketch`, `Request::Symbols`
//! and `Request::Resolve`, answered by `Response::Symbols` and
//! `Response::Resolved`.

use serde::{Deserialize, Serialize};

use crate::riblt::CodedSymbol;

/// The wire version this node speaks.
pub const WIRE_VERSION: u8 = 3;
/// The oldest wire version it still reads and writes: version 3 only adds
/// requests, which are not sent to a peer that does not speak it.
pub const MIN_WIRE_VERSION: u8 = 1;
/// Largest frame a node accepts by default (bytes, without the length prefix).
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;
/// Longest cluster id.
pub const MAX_CLUSTER_ID: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("truncated input")]
    Truncated,
    #[error(
        "wire version {0} is not spoken here (this node speaks {MIN_WIRE_VERSION} to {WIRE_VERSION}; upgrade one version at a time)"
    )]
    Version(u8),
    #[error("a wire version {needs} message stamped version {stamped}")]
    Stamp { needs: u8, stamped: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message for cluster {got:?}, expected {expected:?}")]
    WrongCluster { expected: String, got: String },
}

/// One stored version, as anti-entropy compares it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub version: u64,
    pub origin: String,
    pub tombstone: bool,
    pub content_hash: [u8; 32],
}

impl Entry {
    /// The LWW order of DESIGN §2: version, origin, content hash.
    pub fn newer_than(&self, other: &Entry) -> bool {
        (self.version, self.origin.as_bytes(), self.content_hash)
            > (other.version, other.origin.as_bytes(), other.content_hash)
    }

    pub fn digest(&self) -> crate::merkle::EntryDigest {
        crate::merkle::EntryDigest::new(&self.id, self.version, &self.origin, self.tombstone, &self.content_hash)
    }
}

/// An entry as anti-entropy lists it: the content hash cut to 8 bytes. The
/// order (version, origin) decides between versions; two versions with the
/// same version and origin come from one node's one write, so the short hash
/// only has to tell them apart from corruption.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntrySummary {
    pub id: String,
    pub version: u64,
    pub origin: String,
    pub tombstone: bool,
    pub hash: [u8; 8],
}

impl EntrySummary {
    /// The 8 bytes a summary carries for `e`'s content: the hash's first
    /// bytes, with the tombstone flag folded in.
    pub fn hash_of(e: &Entry) -> [u8; 8] {
        let mut hash = [0u8; 8];
        hash.copy_from_slice(&e.content_hash[..8]);
        hash[0] ^= e.tombstone as u8;
        hash
    }

    /// `of`, taking the entry's strings instead of copying them.
    pub fn from_entry(e: Entry) -> Self {
        let hash = Self::hash_of(&e);
        Self {
            id: e.id,
            version: e.version,
            origin: e.origin,
            tombstone: e.tombstone,
            hash,
        }
    }

    pub fn of(e: &Entry) -> Self {
        let hash = Self::hash_of(e);
        Self {
            id: e.id.clone(),
            version: e.version,
            origin: e.origin.clone(),
            tombstone: e.tombstone,
            hash,
        }
    }

    pub fn newer_than(&self, other: &EntrySummary) -> bool {
        (self.version, self.origin.as_bytes(), self.hash) > (other.version, other.origin.as_bytes(), other.hash)
    }
}

/// A node to descend, with the asker's own children of it, so the peer answers
/// only for the children that differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descend {
    pub path: String,
    pub children: Vec<ChildSummary>,
}

/// A child of a `Descend` node, named by its nibble (path = parent + nibble).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSummary {
    pub nibble: u8,
    pub count: u64,
    pub hash: [u8; 16],
}

/// An entry with its content, for transfers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireItem {
    pub entry: Entry,
    pub updated_at: i64,
    pub state: String,
    /// `true`: JSON, `false`: binary.
    pub json: bool,
    pub content: Vec<u8>,
    /// The media type its writer gave (HTTP `Content-Type`). Not in the
    /// postcard struct: it travels in the envelope's trailer (`Trailer`),
    /// which nodes older than it skip.
    #[serde(skip)]
    pub media_type: Option<String>,
}

/// Longest media type an item keeps (bytes).
pub const MAX_MEDIA_TYPE: usize = 255;

/// The media types of a message's items, after the postcard envelope:
/// (index among the items the body carries, media type), only for items
/// that have one. Postcard reads only the bytes a value needs, so a node
/// that predates the trailer decodes the envelope and ignores it: adding it
/// needed no new wire version, and an upgraded node reads both forms. This
/// node refuses bytes after the trailer, so the next extension needs a new
/// wire version. Media types are not in the entry's digest: a copy that
/// passed through an older node has none and anti-entropy does not see it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Trailer {
    media_types: Vec<(u32, String)>,
}

/// Messages that carry items (with content), in a fixed order.
pub trait CarriesItems {
    fn items(&self) -> Vec<&WireItem>;
    fn items_mut(&mut self) -> Vec<&mut WireItem>;
}

fn delta_items(deltas: &[CdcDelta]) -> impl Iterator<Item = &WireItem> {
    deltas.iter().filter_map(|d| d.item.as_ref())
}

fn delta_items_mut(deltas: &mut [CdcDelta]) -> impl Iterator<Item = &mut WireItem> {
    deltas.iter_mut().filter_map(|d| d.item.as_mut())
}

impl CarriesItems for Request {
    fn items(&self) -> Vec<&WireItem> {
        match self {
            Request::Push { items, .. } => items.iter().collect(),
            Request::Cdc { deltas } => delta_items(deltas).collect(),
            _ => Vec::new(),
        }
    }
    fn items_mut(&mut self) -> Vec<&mut WireItem> {
        match self {
            Request::Push { items, .. } => items.iter_mut().collect(),
            Request::Cdc { deltas } => delta_items_mut(deltas).collect(),
            _ => Vec::new(),
        }
    }
}

impl CarriesItems for Response {
    fn items(&self) -> Vec<&WireItem> {
        match self {
            Response::Fetch { items, .. } => items.iter().collect(),
            _ => Vec::new(),
        }
    }
    fn items_mut(&mut self) -> Vec<&mut WireItem> {
        match self {
            Response::Fetch { items, .. } => items.iter_mut().collect(),
            _ => Vec::new(),
        }
    }
}

impl CarriesItems for Body {
    fn items(&self) -> Vec<&WireItem> {
        match self {
            Body::Cdc(deltas) => delta_items(deltas).collect(),
            Body::Request(r) => r.items(),
            Body::Response(r) => r.items(),
            _ => Vec::new(),
        }
    }
    fn items_mut(&mut self) -> Vec<&mut WireItem> {
        match self {
            Body::Cdc(deltas) => delta_items_mut(deltas).collect(),
            Body::Request(r) => r.items_mut(),
            Body::Response(r) => r.items_mut(),
            _ => Vec::new(),
        }
    }
}

/// A `Trailer` as it is sent, borrowing the media types (the same postcard
/// encoding), so counting or encoding one copies no string.
#[derive(Serialize)]
struct TrailerOut<'a> {
    media_types: Vec<(u32, &'a str)>,
}

impl Trailer {
    fn of<M: CarriesItems + ?Sized>(message: &M) -> Option<TrailerOut<'_>> {
        let media_types: Vec<(u32, &str)> = message
            .items()
            .into_iter()
            .enumerate()
            .filter_map(|(i, it)| Some((i as u32, it.media_type.as_deref()?)))
            .collect();
        (!media_types.is_empty()).then_some(TrailerOut { media_types })
    }

    /// Puts the media types on the body's items; an index past them, a
    /// repeated or unordered index, or a media type out of bounds is malformed.
    fn apply(self, body: &mut Body) -> Result<(), WireError> {
        let mut items = body.items_mut();
        let mut next = 0usize;
        for (i, media_type) in self.media_types {
            let i = i as usize;
            if i < next || i >= items.len() {
                return Err(WireError::Malformed(format!(
                    "trailer names item {i} of {} (out of order or missing)",
                    items.len()
                )));
            }
            if !valid_media_type(&media_type) {
                return Err(WireError::Malformed(format!("media type {media_type:?} is not valid")));
            }
            items[i].media_type = Some(media_type);
            next = i + 1;
        }
        Ok(())
    }
}

/// A media type as a header carries it: `type/subtype` and optional
/// parameters, printable ASCII, at most `MAX_MEDIA_TYPE` bytes.
pub fn valid_media_type(m: &str) -> bool {
    let is_token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let essence = m.split(';').next().unwrap_or_default().trim();
    m.len() <= MAX_MEDIA_TYPE
        && m.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        && essence.split_once('/').is_some_and(|(t, s)| is_token(t) && is_token(s))
}

/// A Merkle node as a peer describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub path: String,
    pub count: u64,
    /// The first 16 bytes of the node hash.
    pub hash: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootsAnnouncement {
    pub node: String,
    pub root: Option<[u8; 16]>,
    pub count: u64,
    pub hlc: u64,
    pub depth: u8,
}

/// A change published after a local commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdcDelta {
    pub entry: Entry,
    /// The item with its content when it is small enough to inline.
    pub item: Option<WireItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One anti-entropy round: the differing children of each `descend` node
    /// (listed when small), and the entries under each `list` path.
    Round {
        session: u64,
        descend: Vec<Descend>,
        list: Vec<String>,
    },
    /// The peer's current root (to decide whether a session is needed).
    Root,
    /// Items (with content) by id.
    Fetch { session: u64, ids: Vec<String> },
    /// Items the requester has newer.
    Push { session: u64, items: Vec<WireItem> },
    /// The purge ledger (DESIGN §6), in id order after `after`: a joining
    /// node learns which versions purged deletes beat before it takes items.
    Ledger { after: Option<String> },
    /// CDC deltas passed along the dissemination tree (DESIGN §5.3, §5.7);
    /// acknowledged with `Response::Pushed`.
    Cdc { deltas: Vec<CdcDelta> },
    /// The asker's roots, for the peer to compare; answered with the
    /// peer's (`Response::Root`): one exchange serves both sides.
    Roots(RootsAnnouncement),
    /// Opens a rateless session (`session::rateless`): the counts of the
    /// asker's first coded symbols (each modulo 2^16), from which the peer
    /// estimates the difference and answers with as many of its own
    /// symbols as should decode it (`Response::Symbols`).
    Sketch { session: u64, counts: Vec<[u8; 2]> },
    /// More of the peer's coded symbols: `count` from index `from`.
    Symbols { session: u64, from: u32, count: u32 },
    /// The peer's entries whose tree keys start with these 8 bytes
    /// (elements a rateless decode found only on the peer's side).
    Resolve { session: u64, keys: Vec<[u8; 8]> },
}

/// A purged delete as the purge ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgedEntry {
    pub id: String,
    pub version: u64,
    pub origin: String,
    /// When it was purged (ms): the ledger keeps it `ledger_retention`.
    pub purged_at_ms: i64,
}

/// One SWIM packet (foca's bytes) with the sender's wall clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPacket {
    pub sent_ms: u64,
    pub payload: Vec<u8>,
}

/// The immediate answer to a `MemberPacket`: the four NTP timestamps for a
/// clock offset sample (`clock_offset`), less the last one the asker reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAck {
    /// The packet's `sent_ms`, echoed.
    pub asked_ms: u64,
    pub received_ms: u64,
    pub answered_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// `nodes`: differing children to descend further (count 0: the peer has
    /// nothing there); `entries`: entry lists of differing small children and
    /// of the `list` paths.
    Round {
        nodes: Vec<NodeSummary>,
        entries: Vec<(String, Vec<EntrySummary>)>,
    },
    /// Items found, and ids left out to keep the answer under the byte
    /// budget (ask again for those).
    Fetch {
        items: Vec<WireItem>,
        deferred: Vec<String>,
    },
    Pushed {
        applied: u64,
    },
    Root(RootsAnnouncement),
    Refused {
        reason: String,
    },
    /// A page of the purge ledger; `next` continues it.
    Ledger {
        entries: Vec<PurgedEntry>,
        next: Option<String>,
    },
    /// Coded symbols `from..from + symbols.len()` of the answerer's set;
    /// `zero` is its symbol 0 now (every entry is in it: when it changed
    /// between two answers, the set did, and earlier symbols are stale);
    /// `estimate`, answering a `Sketch`, is the difference it estimated (no
    /// symbols when that is past what its symbols can decode).
    Symbols {
        from: u32,
        zero: CodedSymbol,
        estimate: u64,
        symbols: Vec<CodedSymbol>,
    },
    /// Entries for a `Resolve`; keys left out to keep the answer within its
    /// budget are `deferred` (ask again).
    Resolved {
        entries: Vec<EntrySummary>,
        deferred: Vec<[u8; 8]>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Roots(RootsAnnouncement),
    /// Deltas of one or more committed writes (several small ones share a
    /// gossip message).
    Cdc(Vec<CdcDelta>),
    Request(Request),
    Response(Response),
    /// Membership (new variants go last: older nodes keep decoding the rest).
    Member(MemberPacket),
    MemberAck(MemberAck),
}

/// Bytes a request or response takes as a frame on a sync stream (length
/// prefix, version byte, envelope with `cluster`), counted without
/// building it: what per-peer and per-region byte counters add up.
pub fn frame_len<T: Serialize + CarriesItems>(cluster: &str, message: &T) -> usize {
    // 4-byte length, version byte, cluster id (varint length + bytes), body
    // tag, and the trailer when an item has a media type.
    4 + 1
        + varint_len(cluster.len())
        + cluster.len()
        + 1
        + encoded_len(message)
        + Trailer::of(message).map_or(0, |t| encoded_len(&t))
}

/// Bytes `value` takes in postcard, counted without building it.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = postcard::to_io(value, &mut n);
    n.0
}

fn varint_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

impl Body {
    /// The oldest wire version that has this message.
    pub fn since(&self) -> u8 {
        match self {
            Body::Request(Request::Sketch { .. } | Request::Symbols { .. } | Request::Resolve { .. })
            | Body::Response(Response::Symbols { .. } | Response::Resolved { .. }) => 3,
            Body::Request(Request::Cdc { .. } | Request::Roots(_)) => 2,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub cluster: String,
    pub body: Body,
}

impl Envelope {
    pub fn new(cluster: impl Into<String>, body: Body) -> Self {
        Self {
            cluster: cluster.into(),
            body,
        }
    }

    /// Version byte (the oldest version that has this body), the postcard
    /// encoding, and the `Trailer` when an item has a media type.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.body.since()];
        out.extend(postcard::to_stdvec(self).expect("envelopes always encode"));
        if let Some(t) = Trailer::of(&self.body) {
            out.extend(postcard::to_stdvec(&t).expect("trailers always encode"));
        }
        out
    }

    /// Decodes one message of at most `max` bytes.
    pub fn decode(bytes: &[u8], max: usize) -> Result<Self, WireError> {
        if bytes.len() > max {
            return Err(WireError::TooLarge { size: bytes.len(), max });
        }
        let (&version, rest) = bytes.split_first().ok_or(WireError::Truncated)?;
        if !(MIN_WIRE_VERSION..=WIRE_VERSION).contains(&version) {
            return Err(WireError::Version(version));
        }
        let malformed = |e| match e {
            postcard::Error::DeserializeUnexpectedEnd => WireError::Truncated,
            other => WireError::Malformed(other.to_string()),
        };
        let (mut env, trailer): (Envelope, _) = postcard::take_from_bytes(rest).map_err(malformed)?;
        if !trailer.is_empty() {
            let (t, extra) = postcard::take_from_bytes::<Trailer>(trailer).map_err(malformed)?;
            if !extra.is_empty() {
                return Err(WireError::Malformed(format!("{} bytes after the trailer", extra.len())));
            }
            t.apply(&mut env.body)?;
        }
        if env.body.since() > version {
            return Err(WireError::Stamp {
                needs: env.body.since(),
                stamped: version,
            });
        }
        if env.cluster.len() > MAX_CLUSTER_ID {
            return Err(WireError::Malformed("cluster id too long".into()));
        }
        Ok(env)
    }

    /// Decodes and checks the cluster id.
    pub fn decode_for(bytes: &[u8], max: usize, cluster: &str) -> Result<Self, WireError> {
        let env = Self::decode(bytes, max)?;
        if env.cluster != cluster {
            return Err(WireError::WrongCluster {
                expected: cluster.into(),
                got: env.cluster,
            });
        }
        Ok(env)
    }

    /// A length-prefixed frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let body = self.encode();
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend(body);
        out
    }
}

/// The length a frame's 4-byte big-endian prefix announces, refused past
/// `max` before anything is allocated for it.
pub fn frame_length(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLarge { size: len, max });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = Entry> {
        (".{1,20}", any::<u64>(), "[a-z]{1,8}", any::<bool>(), any::<[u8; 32]>()).prop_map(
            |(id, version, origin, tombstone, content_hash)| Entry {
                id,
                version,
                origin,
                tombstone,
                content_hash,
            },
        )
    }

    fn item() -> impl Strategy<Value = WireItem> {
        (
            entry(),
            any::<i64>(),
            "[a-z]{1,8}",
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::option::of("(text|application)/[a-z+.-]{1,12}(; charset=utf-8)?"),
        )
            .prop_map(|(entry, updated_at, state, json, content, media_type)| WireItem {
                entry,
                updated_at,
                state,
                json,
                content,
                media_type,
            })
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (
                "[a-z]{1,8}",
                any::<Option<[u8; 16]>>(),
                any::<u64>(),
                any::<u64>(),
                1u8..6
            )
                .prop_map(|(node, root, count, hlc, depth)| Body::Roots(RootsAnnouncement {
                    node,
                    root,
                    count,
                    hlc,
                    depth
                })),
            proptest::collection::vec((entry(), proptest::option::of(item())), 0..4)
                .prop_map(|ds| Body::Cdc(ds.into_iter().map(|(entry, item)| CdcDelta { entry, item }).collect())),
            (
                any::<u64>(),
                proptest::collection::vec("[0-9a-f]{0,4}", 0..8),
                proptest::collection::vec("[0-9a-f]{0,4}", 0..8)
            )
                .prop_map(|(session, descend, list)| Body::Request(Request::Round {
                    session,
                    descend: descend
                        .into_iter()
                        .map(|path| Descend { path, children: vec![] })
                        .collect(),
                    list
                })),
            proptest::collection::vec(item(), 0..4)
                .prop_map(|items| Body::Request(Request::Push { session: 1, items })),
            Just(Body::Request(Request::Root)),
            proptest::option::of("[a-z]{0,8}").prop_map(|after| Body::Request(Request::Ledger { after })),
            (any::<u64>(), any::<bool>()).prop_map(|(version, tombstone)| Body::Request(Request::Cdc {
                deltas: vec![CdcDelta {
                    entry: Entry {
                        id: "x".into(),
                        version,
                        origin: "n".into(),
                        tombstone,
                        content_hash: [7; 32],
                    },
                    item: None,
                }],
            })),
            (any::<u64>(), any::<u64>()).prop_map(|(count, hlc)| Body::Request(Request::Roots(RootsAnnouncement {
                node: "n".into(),
                root: Some([3; 16]),
                count,
                hlc,
                depth: 4,
            }))),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(sent_ms, payload)| Body::Member(MemberPacket { sent_ms, payload })),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(asked_ms, received_ms, answered_ms)| {
                Body::MemberAck(MemberAck {
                    asked_ms,
                    received_ms,
                    answered_ms,
                })
            }),
            proptest::collection::vec(
                (entry(), any::<i64>()).prop_map(|(e, purged_at_ms)| PurgedEntry {
                    id: e.id,
                    version: e.version,
                    origin: e.origin,
                    purged_at_ms
                }),
                0..4
            )
            .prop_map(|entries| Body::Response(Response::Ledger { entries, next: None })),
            proptest::collection::vec(
                (
                    "[0-9a-f]{0,4}",
                    proptest::collection::vec(entry().prop_map(|e| EntrySummary::of(&e)), 0..4)
                ),
                0..4
            )
            .prop_map(|entries| Body::Response(Response::Round { nodes: vec![], entries })),
            ".{0,20}".prop_map(|reason| Body::Response(Response::Refused { reason })),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(b in body(), cluster in "[a-z0-9-]{0,16}") {
            let env = Envelope::new(cluster.clone(), b);
            let bytes = env.encode();
            prop_assert_eq!(Envelope::decode(&bytes, DEFAULT_MAX_FRAME).unwrap(), env.clone());
            prop_assert_eq!(Envelope::decode_for(&bytes, DEFAULT_MAX_FRAME, &cluster).unwrap(), env.clone());
            let wrong = Envelope::decode_for(&bytes, DEFAULT_MAX_FRAME, "other-cluster-x");
            let refused = matches!(wrong, Err(WireError::WrongCluster { .. }));
            prop_assert!(refused);
            // Every truncation is an error, never a panic; but for the one
            // that drops the whole media type trailer, which reads as a
            // message from a node without media types (frames and gossip
            // messages carry their length, so it cannot happen in transit).
            let envelope_end = 1 + postcard::to_stdvec(&env).unwrap().len();
            for cut in 0..bytes.len() {
                let got = Envelope::decode(&bytes[..cut], DEFAULT_MAX_FRAME);
                if cut == envelope_end {
                    prop_assert!(got.unwrap().body.items().iter().all(|it| it.media_type.is_none()));
                } else {
                    prop_assert!(got.is_err(), "cut at {}: {:?}", cut, got);
                }
            }
            let small = Envelope::decode(&bytes, bytes.len() - 1);
            let refused = matches!(small, Err(WireError::TooLarge { .. }));
            prop_assert!(refused);
        }

        #[test]
        fn garbage_is_rejected_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Envelope::decode(&bytes, 1024);
            if let Some(prefix) = bytes.get(..4) {
                let _ = frame_length(prefix.try_into().unwrap(), 64);
            }
        }

        #[test]
        fn a_stream_of_frames_reads_back(bs in proptest::collection::vec(body(), 1..5)) {
            let envs: Vec<Envelope> = bs.into_iter().map(|b| Envelope::new("c", b)).collect();
            let stream: Vec<u8> = envs.iter().flat_map(|e| e.to_frame()).collect();
            // As a stream reader reads it: the prefix, then that many bytes.
            let (mut rest, mut got) = (&stream[..], Vec::new());
            while let Some((prefix, tail)) = rest.split_first_chunk::<4>() {
                let len = frame_length(*prefix, DEFAULT_MAX_FRAME).unwrap();
                got.push(Envelope::decode(&tail[..len], DEFAULT_MAX_FRAME).unwrap());
                rest = &tail[len..];
            }
            prop_assert_eq!(got, envs);
        }
    }

    #[test]
    fn oversized_frames_and_versions_are_refused() {
        assert_eq!(
            frame_length([0, 0, 0, 11], 10),
            Err(WireError::TooLarge { size: 11, max: 10 })
        );
        assert_eq!(frame_length([0, 0, 0, 10], 10), Ok(10));
        assert_eq!(
            frame_length([0xff; 4], DEFAULT_MAX_FRAME),
            Err(WireError::TooLarge {
                size: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME
            })
        );
        let mut bytes = Envelope::new("c", Body::Response(Response::Pushed { applied: 1 })).encode();
        bytes[0] = 9;
        assert_eq!(Envelope::decode(&bytes, 100), Err(WireError::Version(9)));
        let long = Envelope::new("x".repeat(65), Body::Response(Response::Pushed { applied: 1 })).encode();
        assert!(matches!(Envelope::decode(&long, 1000), Err(WireError::Malformed(_))));
    }

    #[test]
    fn frame_len_is_the_length_of_the_frame() {
        let cluster = "a-cluster";
        for req in [
            Request::Root,
            Request::Ledger {
                after: Some("x".repeat(300)),
            },
            Request::Cdc { deltas: vec![] },
        ] {
            let frame = Envelope::new(cluster, Body::Request(req.clone())).to_frame();
            assert_eq!(frame_len(cluster, &req), frame.len(), "{req:?}");
        }
        let resp = Response::Pushed { applied: 7 };
        let frame = Envelope::new(cluster, Body::Response(resp.clone())).to_frame();
        assert_eq!(frame_len(cluster, &resp), frame.len());
    }

    #[test]
    fn messages_carry_the_oldest_version_that_has_them() {
        let old = Envelope::new("c", Body::Request(Request::Root));
        assert_eq!(old.encode()[0], 1, "a version 1 peer reads it");
        let new = Envelope::new("c", Body::Request(Request::Cdc { deltas: vec![] }));
        let mut bytes = new.encode();
        assert_eq!(bytes[0], 2);
        assert_eq!(Envelope::decode(&bytes, 100), Ok(new));
        // A version 2 message stamped 1 is refused, not misread.
        bytes[0] = 1;
        assert_eq!(
            Envelope::decode(&bytes, 100),
            Err(WireError::Stamp { needs: 2, stamped: 1 })
        );
        // Two versions apart: refused by name.
        let mut far = old.encode();
        far[0] = WIRE_VERSION + 1;
        let err = Envelope::decode(&far, 100).unwrap_err();
        assert_eq!(err, WireError::Version(WIRE_VERSION + 1));
        assert!(err.to_string().contains("one version at a time"), "{err}");
        far[0] = 0;
        assert_eq!(Envelope::decode(&far, 100), Err(WireError::Version(0)));
    }

    fn typed_item(id: &str, media_type: Option<&str>) -> WireItem {
        WireItem {
            entry: Entry {
                id: id.into(),
                version: 7,
                origin: "n1".into(),
                tombstone: false,
                content_hash: [3; 32],
            },
            updated_at: 1,
            state: "default".into(),
            json: false,
            content: b"# title".to_vec(),
            media_type: media_type.map(str::to_string),
        }
    }

    #[test]
    fn media_types_travel_in_a_trailer_that_older_nodes_skip() {
        let items = vec![
            typed_item("a", None),
            typed_item("b", Some("text/markdown; charset=utf-8")),
            typed_item("c", Some("image/png")),
        ];
        let env = Envelope::new(
            "c",
            Body::Response(Response::Fetch {
                items: items.clone(),
                deferred: vec![],
            }),
        );
        let bytes = env.encode();
        assert_eq!(Envelope::decode(&bytes, 1 << 20), Ok(env.clone()));
        // A node from before the trailer decodes the envelope alone and
        // sees the same items without their media types.
        let old: Envelope = postcard::from_bytes(&bytes[1..]).unwrap();
        let Body::Response(Response::Fetch { items: got, .. }) = old.body else {
            panic!("{old:?}")
        };
        assert!(got.iter().all(|it| it.media_type.is_none()));
        assert_eq!(got.len(), 3);
        // And this node reads what an older one sends.
        let plain: Vec<WireItem> = items.iter().map(|it| typed_item(&it.entry.id, None)).collect();
        let older = Envelope::new(
            "c",
            Body::Request(Request::Push {
                session: 1,
                items: plain,
            }),
        );
        let mut old_bytes = vec![1u8];
        old_bytes.extend(postcard::to_stdvec(&older).unwrap());
        assert_eq!(old_bytes, older.encode(), "no trailer without media types");
        assert_eq!(Envelope::decode(&old_bytes, 1 << 20), Ok(older));
        // frame_len counts the trailer.
        let Body::Response(resp) = env.body else { unreachable!() };
        assert_eq!(
            frame_len("c", &resp),
            Envelope::new("c", Body::Response(resp.clone())).to_frame().len()
        );
    }

    #[test]
    fn malformed_trailers_are_refused() {
        let env = Envelope::new(
            "c",
            Body::Cdc(vec![CdcDelta {
                entry: typed_item("a", None).entry,
                item: Some(typed_item("a", None)),
            }]),
        );
        let base = env.encode();
        let with = |t: Trailer| {
            let mut b = base.clone();
            b.extend(postcard::to_stdvec(&t).unwrap());
            Envelope::decode(&b, 1 << 20)
        };
        for bad in [
            vec![(1, "text/plain".to_string())],
            vec![(0, "text/plain".into()), (0, "text/html".into())],
            vec![(0, "no-slash".into())],
            vec![(0, "text/pl ain".into())],
            vec![(0, "text/plain\n".into())],
            vec![(0, format!("text/{}", "x".repeat(MAX_MEDIA_TYPE)))],
        ] {
            assert!(
                matches!(
                    with(Trailer {
                        media_types: bad.clone()
                    }),
                    Err(WireError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        let ok = with(Trailer {
            media_types: vec![(0, "text/plain".into())],
        })
        .unwrap();
        assert_eq!(ok.body.items()[0].media_type.as_deref(), Some("text/plain"));
        let mut extra = base.clone();
        extra.extend(postcard::to_stdvec(&Trailer::default()).unwrap());
        extra.push(0);
        assert!(matches!(
            Envelope::decode(&extra, 1 << 20),
            Err(WireError::Malformed(_))
        ));
        let mut cut = base;
        cut.push(5);
        assert_eq!(Envelope::decode(&cut, 1 << 20), Err(WireError::Truncated));
    }
}
