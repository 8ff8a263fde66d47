//! L2: Redis as a cache in front of L3.
//!
//! Layout (`{p}` = `redis_prefix`):
//! - `{p}item:{id}`: a string per item, the metadata packed in one
//!   line-separated string (see `Meta`), a NUL byte, then the content; so a
//!   write is one `SET` (with `EX` for an expiring copy) that replaces the
//!   whole item and its expiry, like a plain cache write. Releases before
//!   this one kept a hash with fields `m` and `c`; those keys are still read
//!   (`get`, `exists`, `scan_entries`) and are replaced by the next write;
//! - `{p}state:{state}`: the set of live ids in a state;
//! - `{p}merkle:node`: the Merkle mirror, a hash from node path (`r` + hex path)
//!   to the hex node hash of the tree of mirrored items as Redis holds them.
//!
//! Redis never decides anything: a failed Redis call fails no write and no read
//! that L3 can serve. The engine marks L2 stale instead and repairs it from L3
//! when Redis answers again (see `resync` in the engine).

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisWrite, ToRedisArgs, ToSingleRedisArg};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use super::entry::EntryMeta;
use super::error::StorageError;
use super::item::{ContentType, SyncItem, content_hash};
use super::options::L2Route;

fn redis_err(context: &str, e: redis::RedisError) -> StorageError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        StorageError::Connection(format!("redis {context}: {e}"))
    } else {
        StorageError::Backend(format!("redis {context}: {e}"))
    }
}

/// One state-set change: remove `id` from `from`, add it to `to`.
#[derive(Debug, Clone, Default)]
pub struct StateMove {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// The state-set changes of one pipeline, gathered so that each state costs
/// one `SREM` and one `SADD` whatever the number of ids.
#[derive(Debug, Default)]
pub struct StateSets {
    remove: BTreeMap<String, Vec<String>>,
    add: BTreeMap<String, Vec<String>>,
}

impl StateSets {
    pub fn note(&mut self, id: &str, mv: &StateMove) {
        if let Some(from) = &mv.from
            && mv.to.as_ref() != Some(from)
        {
            self.remove.entry(from.clone()).or_default().push(id.to_string());
        }
        if let Some(to) = &mv.to {
            self.add.entry(to.clone()).or_default().push(id.to_string());
        }
    }

    /// Adds the gathered changes to `pipe`.
    pub fn queue(self, l2: &RedisStore, pipe: &mut redis::Pipeline) {
        for (state, ids) in self.remove {
            pipe.srem(l2.state_key(&state), ids).ignore();
        }
        for (state, ids) in self.add {
            pipe.sadd(l2.state_key(&state), ids).ignore();
        }
    }
}

/// An item's Redis value: metadata, NUL, content, written straight into the
/// command buffer as one argument.
struct Packed<'a> {
    meta: String,
    content: &'a [u8],
}

impl ToRedisArgs for Packed<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        // Writes into a Vec cannot fail.
        let _ = w.write_all(self.meta.as_bytes());
        let _ = w.write_all(&[0]);
        let _ = w.write_all(self.content);
    }
}

impl ToSingleRedisArg for Packed<'_> {}

/// How much of a value a resync without the content check reads: more than
/// any metadata line set takes in practice, so the rest is read only for the
/// rare item with long tags.
const META_READ_BYTES: usize = 1024;

/// Splits a stored value into metadata and content.
fn unpack_value(v: &[u8]) -> Option<(Meta, &[u8])> {
    let nul = v.iter().position(|&b| b == 0)?;
    let meta = Meta::unpack(std::str::from_utf8(&v[..nul]).ok()?)?;
    Some((meta, &v[nul + 1..]))
}

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
}

/// Escapes glob characters for `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisStore {
    /// Connects lazily: the engine starts even while Redis is down.
    pub fn connect(url: &str, prefix: &str) -> Result<Self, StorageError> {
        let client = redis::Client::open(url).map_err(|e| StorageError::InvalidInput(format!("redis_url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            // Large pipelines (resync, backfill) need more than the 500 ms default.
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_millis(1000)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| redis_err("connect", e))?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn item_key(&self, id: &str) -> String {
        format!("{}item:{id}", self.prefix)
    }

    pub fn state_key(&self, state: &str) -> String {
        format!("{}state:{state}", self.prefix)
    }

    fn mirror_key(&self) -> String {
        format!("{}merkle:node", self.prefix)
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn ping(&self) -> Result<Duration, StorageError> {
        let start = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(|e| redis_err("ping", e))?;
        Ok(start.elapsed())
    }

    /// Adds the command that stores `item` (or removes it, for `Skip`) to
    /// `pipe`: one `SET`, which also drops any expiry an earlier version had
    /// unless this one has its own.
    pub fn queue_put(&self, pipe: &mut redis::Pipeline, item: &SyncItem, route: L2Route, cache_only: bool) {
        let key = self.item_key(&item.object_id);
        if route == L2Route::Skip && !cache_only {
            pipe.del(&key).ignore();
            return;
        }
        let mirrored = !cache_only && route == L2Route::Mirror;
        let value = Packed {
            meta: Meta::pack(item, mirrored),
            content: &item.content[..],
        };
        match route {
            L2Route::Expiring(secs) => pipe.set_ex(&key, value, secs).ignore(),
            _ => pipe.set(&key, value).ignore(),
        };
    }

    /// Adds mirror node updates (`path`, hash or `None` for an empty node).
    pub fn queue_mirror(&self, pipe: &mut redis::Pipeline, nodes: &[(String, Option<[u8; 32]>)]) {
        let key = self.mirror_key();
        let (set, del): (Vec<_>, Vec<_>) = nodes.iter().partition(|(_, h)| h.is_some());
        if !set.is_empty() {
            let pairs: Vec<(String, String)> = set
                .iter()
                .map(|(p, h)| (format!("r{p}"), hex::encode(h.expect("partitioned"))))
                .collect();
            pipe.hset_multiple(&key, &pairs).ignore();
        }
        if !del.is_empty() {
            let fields: Vec<String> = del.iter().map(|(p, _)| format!("r{p}")).collect();
            pipe.hdel(&key, fields).ignore();
        }
    }

    /// Replaces the whole mirror.
    pub fn queue_mirror_reset(&self, pipe: &mut redis::Pipeline) {
        pipe.del(self.mirror_key()).ignore();
    }

    pub async fn run(&self, pipe: &redis::Pipeline, context: &str) -> Result<(), StorageError> {
        // Redis answers an empty pipeline with an error ("empty command").
        if pipe.is_empty() {
            return Ok(());
        }
        pipe.exec_async(&mut self.conn())
            .await
            .map_err(|e| redis_err(context, e))
    }

    /// The mirror's root hash (hex), if any.
    pub async fn mirror_root(&self) -> Result<Option<String>, StorageError> {
        self.conn()
            .hget(self.mirror_key(), "r")
            .await
            .map_err(|e| redis_err("mirror root", e))
    }

    /// The stored metadata and content under `key`, in either layout. The
    /// inner `Err` says what the key should have held when it holds something
    /// else.
    async fn read_item(&self, key: &str) -> Result<Option<Result<(Meta, Vec<u8>), &'static str>>, StorageError> {
        // Twice at most: a hash key may be rewritten as a string between the
        // GET and the HMGET.
        for _ in 0..2 {
            match self.conn().get::<_, Option<Vec<u8>>>(key).await {
                Ok(None) => return Ok(None),
                Ok(Some(v)) => {
                    return Ok(Some(
                        unpack_value(&v)
                            .map(|(m, c)| (m, c.to_vec()))
                            .ok_or("metadata, NUL, content"),
                    ));
                }
                Err(e) if e.code() == Some("WRONGTYPE") => match self.read_hash_item(key).await? {
                    Some(Err("a string or a hash")) => continue,
                    found => return Ok(found),
                },
                Err(e) => return Err(redis_err("get", e)),
            }
        }
        Ok(Some(Err("a string or a hash")))
    }

    /// `read_item` for a key in the hash layout of earlier releases.
    async fn read_hash_item(&self, key: &str) -> Result<Option<Result<(Meta, Vec<u8>), &'static str>>, StorageError> {
        let fields: Vec<Option<Vec<u8>>> = match redis::cmd("HMGET")
            .arg(key)
            .arg("m")
            .arg("c")
            .query_async(&mut self.conn())
            .await
        {
            Ok(f) => f,
            Err(e) if e.code() == Some("WRONGTYPE") => return Ok(Some(Err("a string or a hash"))),
            Err(e) => return Err(redis_err("get", e)),
        };
        Ok(match <[Option<Vec<u8>>; 2]>::try_from(fields) {
            Ok([Some(m), Some(c)]) => Some(
                std::str::from_utf8(&m)
                    .ok()
                    .and_then(Meta::unpack)
                    .map(|m| (m, c))
                    .ok_or("well-formed metadata"),
            ),
            // Neither field: a hash that is not ours, or a key that expired
            // since the GET (absent, not corrupt).
            Ok([None, None]) => {
                let exists: bool = self.conn().exists(key).await.map_err(|e| redis_err("get", e))?;
                exists.then_some(Err("fields m and c"))
            }
            _ => Some(Err("fields m and c")),
        })
    }

    /// The item under `id`, checked against its hash. `Ok(None)` when absent;
    /// `Corruption` when the stored content does not match or the key is not ours.
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        let (meta, content) = match self.read_item(&self.item_key(id)).await? {
            None => return Ok(None),
            Some(Ok(found)) => found,
            Some(Err(what)) => {
                return Err(StorageError::Corruption {
                    id: id.into(),
                    expected: what.into(),
                    actual: "something else".into(),
                });
            }
        };
        let actual = content_hash(&content);
        if actual != meta.hash {
            return Err(StorageError::Corruption {
                id: id.into(),
                expected: meta.hash,
                actual,
            });
        }
        Ok(Some(meta.into_item(id, content)))
    }

    /// `Some(live)` when Redis holds the id (live or tombstone), `None` when not.
    pub async fn exists(&self, id: &str) -> Result<Option<bool>, StorageError> {
        Ok(self
            .read_item(&self.item_key(id))
            .await?
            .and_then(Result::ok)
            .map(|(m, _)| !m.tombstone))
    }

    /// Seconds the item's Redis copy has left; `None` without an expiry or copy.
    pub async fn ttl_secs(&self, id: &str) -> Result<Option<u64>, StorageError> {
        let ms: i64 = self
            .conn()
            .pttl(self.item_key(id))
            .await
            .map_err(|e| redis_err("ttl", e))?;
        Ok((ms > 0).then(|| (ms as u64).div_ceil(1000)))
    }

    /// Every mirrored entry in Redis, by scanning item keys; keys that do not
    /// hold a well-formed item (or, with `verify_content`, whose content does
    /// not match their hash) are returned in the second list, to be deleted.
    pub async fn scan_entries(&self, verify_content: bool) -> Result<(Vec<EntryMeta>, Vec<String>), StorageError> {
        let mut conn = self.conn();
        let key_prefix = format!("{}item:", self.prefix);
        let pattern = format!("{}*", glob_escape(&key_prefix));
        let mut cursor: u64 = 0;
        let (mut entries, mut bad) = (Vec::new(), Vec::new());
        let mut take = |id: String, found: Option<(Meta, &[u8])>| match found {
            Some((meta, content)) if !verify_content || content_hash(content) == meta.hash => {
                if meta.mirrored {
                    entries.push(EntryMeta {
                        id,
                        version: meta.version,
                        origin: meta.origin,
                        tombstone: meta.tombstone,
                        content_hash: meta.hash,
                        state: meta.state,
                        l2: true,
                    });
                }
            }
            _ => bad.push(id),
        };
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_err("scan", e))?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for k in &keys {
                    // Without the content check the metadata is enough.
                    match verify_content {
                        true => pipe.get(k),
                        false => pipe.getrange(k, 0, META_READ_BYTES as isize - 1),
                    };
                }
                let rows: Vec<redis::RedisResult<Option<Vec<u8>>>> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| redis_err("scan values", e))?;
                for (k, row) in keys.iter().zip(rows) {
                    let id = k[key_prefix.len()..].to_string();
                    match row {
                        Ok(Some(v)) if !v.is_empty() && (verify_content || v.contains(&0)) => {
                            take(id, unpack_value(&v))
                        }
                        // Expired since the SCAN (GETRANGE answers "" for a missing key).
                        Ok(None) => {}
                        Ok(Some(v)) if v.is_empty() => {}
                        // Metadata longer than the range read, or a key changed
                        // since the SCAN: read it whole, in whichever layout.
                        _ => match self.read_item(k).await? {
                            Some(Ok((meta, content))) => take(id, Some((meta, &content))),
                            Some(Err(_)) => take(id, None),
                            None => {}
                        },
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok((entries, bad));
            }
        }
    }
}

/// An item's metadata as stored in the `m` field: version, origin, tombstone,
/// content type, updated_at, state, content hash, trace parent, whether the
/// item is in the Merkle mirror and its media type, one per line (a field
/// written before media types has nine lines). None of them can hold a line
/// break: the engine refuses control characters in origins, states, traces
/// and media types.
struct Meta {
    version: u64,
    origin: String,
    tombstone: bool,
    content_type: ContentType,
    updated_at: i64,
    state: String,
    hash: String,
    trace_parent: Option<String>,
    mirrored: bool,
    media_type: Option<String>,
}

impl Meta {
    fn pack(it: &SyncItem, mirrored: bool) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            it.version,
            it.origin,
            u8::from(it.tombstone),
            it.content_type.code(),
            it.updated_at,
            it.state,
            it.content_hash,
            it.trace_parent.as_deref().unwrap_or(""),
            u8::from(mirrored),
            it.media_type.as_deref().unwrap_or("")
        )
    }

    fn unpack(s: &str) -> Option<Self> {
        let f: Vec<&str> = s.split('\n').collect();
        let (v, o, b, t, u, st, h, p, m, media) = match f.as_slice() {
            [v, o, b, t, u, st, h, p, m] => (v, o, b, t, u, st, h, p, m, &""),
            [v, o, b, t, u, st, h, p, m, media] => (v, o, b, t, u, st, h, p, m, media),
            _ => return None,
        };
        let flag = |x: &str| match x {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        (h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit())).then_some(())?;
        Some(Self {
            version: v.parse().ok()?,
            origin: o.to_string(),
            tombstone: flag(b)?,
            content_type: ContentType::from_code(t.parse().ok()?),
            updated_at: u.parse().ok()?,
            state: st.to_string(),
            hash: h.to_string(),
            trace_parent: (!p.is_empty()).then(|| p.to_string()),
            mirrored: flag(m)?,
            media_type: (!media.is_empty()).then(|| media.to_string()),
        })
    }

    fn into_item(self, id: &str, content: Vec<u8>) -> SyncItem {
        SyncItem {
            object_id: id.to_string(),
            version: self.version,
            origin: self.origin,
            updated_at: self.updated_at,
            content_type: self.content_type,
            content: content.into(),
            content_hash: self.hash,
            state: self.state,
            tombstone: self.tombstone,
            access_count: 0,
            last_accessed: 0,
            trace_parent: self.trace_parent,
            media_type: self.media_type,
            route: if self.mirrored { L2Route::Mirror } else { L2Route::Skip },
        }
    }
}

/// The `(path, hash)` pairs to write for the mirror after changes to `buckets`.
pub fn mirror_nodes(
    tree: &syncnode_protocol::MerkleTree,
    buckets: &std::collections::BTreeSet<String>,
) -> Vec<(String, Option<[u8; 32]>)> {
    let mut paths = std::collections::BTreeSet::new();
    for b in buckets {
        for i in 0..=b.len() {
            paths.insert(b[..i].to_string());
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let n = tree.node(&p).unwrap_or_default();
            let h = (!n.is_empty()).then(|| n.hash());
            (p, h)
        })
        .collect()
}

/// Every non-empty node of `tree` (for a full mirror rewrite).
pub fn all_mirror_nodes(tree: &syncnode_protocol::MerkleTree) -> Vec<(String, Option<[u8; 32]>)> {
    let mut out = Vec::new();
    let mut frontier = vec![String::new()];
    while let Some(p) = frontier.pop() {
        let n = tree.node(&p).unwrap_or_default();
        if n.is_empty() {
            continue;
        }
        out.push((p.clone(), Some(n.hash())));
        for (c, _) in tree.children(&p).unwrap_or_default() {
            frontier.push(c);
        }
    }
    out
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.prefix).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_keeps_the_media_type_and_reads_fields_from_before_it() {
        let mut it = SyncItem::new("a", &b"# t"[..]).with_media_type("text/markdown; charset=utf-8");
        it.version = 5;
        it.origin = "n1".into();
        let packed = Meta::pack(&it, true);
        let back = Meta::unpack(&packed).unwrap().into_item("a", it.content.to_vec());
        assert_eq!(back.media_type, it.media_type);
        assert_eq!((back.version, back.origin.as_str()), (5, "n1"));
        // Nine lines: a field written before media types.
        let old = packed.rsplit_once('\n').unwrap().0;
        let back = Meta::unpack(old).unwrap().into_item("a", it.content.to_vec());
        assert_eq!(back.media_type, None);
        assert_eq!(back.content_hash, it.content_hash);
        assert!(Meta::unpack(&format!("{packed}\nx")).is_none());
    }
}
