//! `SyncItem`, the unit of storage and replication, and the rules every item
//! must satisfy before the engine stores it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::StorageError;
use super::options::L2Route;

/// Longest object id, in bytes.
pub const MAX_ID_BYTES: usize = 512;
/// Longest state tag, in bytes.
pub const MAX_STATE_BYTES: usize = 64;
/// Longest origin (node id), in bytes.
pub const MAX_ORIGIN_BYTES: usize = 128;
/// Longest W3C trace parent we keep.
pub const MAX_TRACE_BYTES: usize = 256;
/// Versions are stored as SQL BIGINT, so they must stay below 2^63.
pub const MAX_VERSION: u64 = i64::MAX as u64;
pub const DEFAULT_STATE: &str = "default";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    Json,
    #[default]
    Binary,
}

impl ContentType {
    /// JSON when the content starts like a JSON object, array or string and parses.
    pub fn detect(content: &[u8]) -> Self {
        let first = content.iter().find(|b| !b.is_ascii_whitespace());
        match first {
            Some(b'{' | b'[' | b'"') if serde_json::from_slice::<serde::de::IgnoredAny>(content).is_ok() => Self::Json,
            _ => Self::Binary,
        }
    }

    pub(crate) fn code(self) -> i64 {
        match self {
            Self::Json => 1,
            Self::Binary => 0,
        }
    }

    pub(crate) fn from_code(c: i64) -> Self {
        if c == 1 { Self::Json } else { Self::Binary }
    }
}

/// One version of one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncItem {
    pub object_id: String,
    /// HLC stamp; set by the engine on local writes, kept on replicated ones.
    pub version: u64,
    /// Id of the node that made this version.
    pub origin: String,
    /// Wall-clock ms when this version was made.
    pub updated_at: i64,
    pub content_type: ContentType,
    pub content: Bytes,
    /// Lowercase hex SHA-256 of `content`.
    pub content_hash: String,
    pub state: String,
    /// A delete: empty content, kept so the delete replicates.
    pub tombstone: bool,
    pub access_count: u64,
    pub last_accessed: u64,
    pub trace_parent: Option<String>,
    /// The media type its writer gave (the HTTP `Content-Type`), returned
    /// with the content; `None`: the engine answers by `content_type`.
    /// Kept in L3 and L2 and replicated (in the wire envelope's trailer);
    /// postcard records carry it after the item, hence the serde skip.
    #[serde(skip)]
    pub media_type: Option<String>,
    /// How L2 holds this version (set by the engine from the submit options;
    /// travels with the item through the commit log, stored in L3).
    #[serde(skip)]
    pub(crate) route: L2Route,
}

/// Versions in JSON: 64-bit HLCs exceed 2^53, past which JavaScript and
/// other float-based parsers round, so they are written as decimal strings
/// (as etcd's gateway does); numbers are accepted on input too.
pub mod version_json {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(n),
            Either::Text(t) => t
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("version {t:?} is not a decimal u64"))),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Lowercase hex SHA-256.
pub fn content_hash(content: &[u8]) -> String {
    // `encode_to_slice` works byte by byte; `hex::encode` goes char by char
    // and showed in the cache-write profile.
    let mut hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(content), &mut hex).expect("64 hex digits for 32 bytes");
    String::from_utf8(hex.to_vec()).expect("hex digits are ASCII")
}

/// Batches from this size are hashed on two threads.
const TWO_THREAD_HASH_ITEMS: usize = 256;

/// `content_hash` of each content; a large batch on two threads, so a
/// 2-core machine hashes a cache write's batch in half the time.
pub fn content_hashes(contents: &[&[u8]]) -> Vec<String> {
    let hash_all = |part: &[&[u8]]| part.iter().map(|c| content_hash(c)).collect::<Vec<_>>();
    if contents.len() < TWO_THREAD_HASH_ITEMS {
        return hash_all(contents);
    }
    let (first, second) = contents.split_at(contents.len() / 2);
    std::thread::scope(|s| {
        // Without a thread (the OS may refuse one), everything is hashed here.
        let other = std::thread::Builder::new().spawn_scoped(s, || hash_all(second)).ok();
        let mut out = hash_all(first);
        match other.map(|t| t.join()) {
            Some(Ok(rest)) => out.extend(rest),
            _ => out.extend(hash_all(second)),
        }
        out
    })
}

/// The raw bytes of a content hash the engine holds. Every such hash was
/// checked where it came in: computed by `submit`, equal to the content's
/// for a replicated item (`validate_remote`), 32 bytes in an L3 row
/// (`l3::items`), 64 hex digits in Redis (`l2`). One that is not is a bug,
/// logged as an error (and read as zeros, which matches no content).
pub fn hash_bytes(hex_hash: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Err(e) = hex::decode_to_slice(hex_hash, &mut out) {
        tracing::error!(hash = hex_hash, error = %e, "a content hash inside the engine is not 64 hex digits");
        debug_assert!(false, "unchecked content hash {hex_hash:?}");
    }
    out
}

impl SyncItem {
    /// A new item; the content type is detected and the hash computed.
    pub fn new(object_id: impl Into<String>, content: impl Into<Bytes>) -> Self {
        let content = content.into();
        Self {
            object_id: object_id.into(),
            version: 0,
            origin: String::new(),
            updated_at: now_ms(),
            content_type: ContentType::detect(&content),
            content_hash: content_hash(&content),
            content,
            state: DEFAULT_STATE.to_string(),
            tombstone: false,
            access_count: 0,
            last_accessed: 0,
            trace_parent: None,
            media_type: None,
            route: L2Route::Mirror,
        }
    }

    /// An item holding serialized JSON.
    pub fn from_json(object_id: impl Into<String>, value: serde_json::Value) -> Self {
        let mut item = Self::new(
            object_id,
            serde_json::to_vec(&value).expect("a Value always serializes"),
        );
        item.content_type = ContentType::Json;
        item
    }

    /// A delete marker for `object_id`.
    pub fn tombstone(object_id: impl Into<String>) -> Self {
        let mut item = Self::new(object_id, Bytes::new());
        item.tombstone = true;
        item
    }

    /// How L2 holds this version.
    pub fn l2_route(&self) -> L2Route {
        self.route
    }

    pub fn with_state(mut self, state: impl Into<String>) -> Self {
        self.state = state.into();
        self
    }

    /// The media type to keep and return with the content (`type/subtype`
    /// and parameters, at most 255 bytes; checked when it is written).
    pub fn with_media_type(mut self, media_type: impl Into<String>) -> Self {
        self.media_type = Some(media_type.into());
        self
    }

    pub fn content_as_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.content).ok()
    }

    /// Raw 32-byte content hash (see `hash_bytes`).
    pub fn content_hash_bytes(&self) -> [u8; 32] {
        hash_bytes(&self.content_hash)
    }

    /// Approximate bytes this item takes in memory.
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.object_id.len()
            + self.content.len()
            + self.origin.len()
            + self.content_hash.len()
            + self.state.len()
            + self.trace_parent.as_ref().map_or(0, |t| t.len())
            + self.media_type.as_ref().map_or(0, |t| t.len())
    }

    pub fn stamp(&self) -> syncnode_protocol::Stamp<'_> {
        syncnode_protocol::Stamp::new(self.version, &self.origin, &self.content_hash)
    }

    pub fn digest(&self) -> syncnode_protocol::EntryDigest {
        syncnode_protocol::EntryDigest::new(
            &self.object_id,
            self.version,
            &self.origin,
            self.tombstone,
            &self.content_hash_bytes(),
        )
    }
}

/// Checks an object id against DESIGN §2: UTF-8 (guaranteed by `&str`),
/// 1..=512 bytes, no ASCII control characters.
pub fn validate_id(id: &str) -> Result<(), StorageError> {
    if id.is_empty() {
        return Err(StorageError::InvalidId("empty".into()));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(StorageError::InvalidId(format!(
            "{} bytes, max {MAX_ID_BYTES}",
            id.len()
        )));
    }
    if let Some(pos) = id.bytes().position(|b| b.is_ascii_control()) {
        return Err(StorageError::InvalidId(format!("control character at byte {pos}")));
    }
    Ok(())
}

fn validate_tag(what: &str, value: &str, max: usize, allow_empty: bool) -> Result<(), StorageError> {
    if value.is_empty() && !allow_empty {
        return Err(StorageError::InvalidInput(format!("{what} is empty")));
    }
    if value.len() > max {
        return Err(StorageError::InvalidInput(format!(
            "{what} is {} bytes, max {max}",
            value.len()
        )));
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err(StorageError::InvalidInput(format!(
            "{what} contains a control character"
        )));
    }
    Ok(())
}

pub fn validate_state(state: &str) -> Result<(), StorageError> {
    validate_tag("state", state, MAX_STATE_BYTES, false)
}

/// A prefix of ids: at most an id long, no control characters.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), StorageError> {
    if prefix.len() > MAX_ID_BYTES || prefix.bytes().any(|b| b.is_ascii_control()) {
        return Err(StorageError::InvalidId(format!(
            "prefix {:?} is not a valid id prefix",
            prefix.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// Ids under this prefix belong to the engine (index definitions: see
/// `index_catalog`).
pub const RESERVED: &str = "_syncnode/";

/// Refuses a local write to a reserved id.
pub(crate) fn check_not_reserved(id: &str) -> Result<(), StorageError> {
    if id.starts_with(RESERVED) {
        return Err(StorageError::InvalidId(format!(
            "{id:?}: ids starting with {RESERVED:?} are the engine's"
        )));
    }
    Ok(())
}

/// Whether a scan of `prefix` leaves the reserved ids out: it does unless
/// the prefix asks for them by name.
pub(crate) fn hides_reserved(prefix: &str) -> bool {
    RESERVED.starts_with(prefix) && !prefix.starts_with(RESERVED)
}

/// Everything but the version/origin stamp, which depends on where the item came from.
pub(crate) fn validate_item(item: &SyncItem, max_payload_bytes: usize) -> Result<(), StorageError> {
    validate_id(&item.object_id)?;
    if item.content.len() > max_payload_bytes {
        return Err(StorageError::PayloadTooLarge {
            size: item.content.len(),
            max: max_payload_bytes,
        });
    }
    validate_state(&item.state)?;
    if let Some(t) = &item.trace_parent {
        validate_tag("trace_parent", t, MAX_TRACE_BYTES, true)?;
    }
    if item.tombstone && !item.content.is_empty() {
        return Err(StorageError::InvalidInput("a tombstone carries no content".into()));
    }
    if let Some(m) = &item.media_type {
        if item.tombstone {
            return Err(StorageError::InvalidInput("a tombstone carries no media type".into()));
        }
        if !syncnode_protocol::wire::valid_media_type(m) {
            return Err(StorageError::InvalidInput(format!(
                "media type {m:?}: expected type/subtype with optional parameters, printable ASCII, at most {} bytes",
                syncnode_protocol::wire::MAX_MEDIA_TYPE
            )));
        }
    }
    Ok(())
}

/// Checks a replicated item: its stamp must be well formed and its hash must
/// match its content (a peer cannot make us store bytes under a false hash).
/// An origin (node id) from a peer.
pub(crate) fn validate_origin(origin: &str) -> Result<(), StorageError> {
    validate_tag("origin", origin, MAX_ORIGIN_BYTES, false)
}

pub(crate) fn validate_remote(item: &SyncItem, max_payload_bytes: usize) -> Result<(), StorageError> {
    validate_item(item, max_payload_bytes)?;
    validate_origin(&item.origin)?;
    if item.version == 0 || item.version > MAX_VERSION {
        return Err(StorageError::InvalidInput(format!(
            "version {} out of range",
            item.version
        )));
    }
    let actual = content_hash(&item.content);
    if actual != item.content_hash {
        return Err(StorageError::Corruption {
            id: item.object_id.clone(),
            expected: item.content_hash.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn batch_hashes_keep_their_order_on_two_threads() {
        let contents: Vec<Vec<u8>> = (0..TWO_THREAD_HASH_ITEMS as u32 * 2 + 3)
            .map(|i| i.to_le_bytes().to_vec())
            .collect();
        let refs: Vec<&[u8]> = contents.iter().map(|c| &c[..]).collect();
        let one_by_one: Vec<String> = refs.iter().map(|c| content_hash(c)).collect();
        assert_eq!(content_hashes(&refs), one_by_one);
        assert_eq!(content_hashes(&refs[..3]), one_by_one[..3]);
        assert_eq!(content_hash(b""), hex::encode(Sha256::digest(b"")));
    }

    #[test]
    fn content_type_detection() {
        assert_eq!(ContentType::detect(br#" {"a":1}"#), ContentType::Json);
        assert_eq!(ContentType::detect(b"[1,2"), ContentType::Binary);
        assert_eq!(ContentType::detect(b"42"), ContentType::Binary);
        assert_eq!(ContentType::detect(b"\x00\x01"), ContentType::Binary);
        let j = SyncItem::from_json("a", serde_json::json!({"x": [1, 2]}));
        assert_eq!(j.content_type, ContentType::Json);
        assert_eq!(j.content_as_json().unwrap()["x"][1], 2);
    }

    #[test]
    fn id_rules() {
        assert!(validate_id("user.1").is_ok());
        assert!(validate_id("ünï:cødé/…").is_ok());
        assert!(validate_id(&"x".repeat(512)).is_ok());
        assert!(matches!(validate_id(""), Err(StorageError::InvalidId(_))));
        assert!(matches!(validate_id(&"x".repeat(513)), Err(StorageError::InvalidId(_))));
        assert!(matches!(validate_id("a\nb"), Err(StorageError::InvalidId(_))));
        assert!(matches!(validate_id("a\x7fb"), Err(StorageError::InvalidId(_))));
    }

    #[test]
    fn remote_items_must_carry_their_true_hash() {
        let mut it = SyncItem::new("a", &b"hello"[..]);
        it.version = 5;
        it.origin = "n1".into();
        assert!(validate_remote(&it, 1024).is_ok());
        it.content = Bytes::from_static(b"tampered");
        assert!(matches!(
            validate_remote(&it, 1024),
            Err(StorageError::Corruption { .. })
        ));
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_accepts_exactly_the_rules(id in any::<String>(), content in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ok = !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.bytes().any(|b| b.is_ascii_control());
            prop_assert_eq!(validate_id(&id).is_ok(), ok);
            let item = SyncItem::new(id, content.clone());
            prop_assert_eq!(item.content_hash.len(), 64);
            let _ = item.content_as_json();
            prop_assert_eq!(validate_item(&item, 32).is_ok(), ok && content.len() <= 32);
        }

        #[test]
        fn json_round_trips(v in proptest_json()) {
            let item = SyncItem::from_json("j", v.clone());
            prop_assert_eq!(item.content_as_json(), Some(v));
        }
    }

    fn proptest_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
