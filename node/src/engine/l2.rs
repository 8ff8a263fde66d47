//! L2: Redis as a cache in front of L3.
//!
//! Layout (`{p}` = `redis_prefix`):
//! - `{p}item:{id}`: a hash per item: `v` version, `o` origin, `h` content hash,
//!   `s` state, `t` content type, `b` tombstone, `u` updated_at, `c` content,
//!   `p` trace parent, and `n` = 1 when the item is not part of the mirror
//!   (cache-only or expiring items);
//! - `{p}state:{state}`: the set of live ids in a state;
//! - `{p}merkle:node`: the Merkle mirror, a hash from node path (`r` + hex path)
//!   to the hex node hash of the tree of mirrored items as Redis holds them.
//!
//! Redis never decides anything: a failed Redis call fails no write and no read
//! that L3 can serve. The engine marks L2 stale instead and repairs it from L3
//! when Redis answers again (see `resync` in the engine).

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::error::StorageError;
use super::item::{ContentType, SyncItem, content_hash};
use super::l3::EntryMeta;
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

    /// Adds the commands that store `item` (or remove it, for `Skip`) to `pipe`.
    pub fn queue_put(&self, pipe: &mut redis::Pipeline, item: &SyncItem, route: L2Route, cache_only: bool) {
        let key = self.item_key(&item.object_id);
        pipe.del(&key).ignore();
        if route == L2Route::Skip && !cache_only {
            return;
        }
        let mut fields: Vec<(&str, Vec<u8>)> = vec![
            ("v", item.version.to_string().into_bytes()),
            ("o", item.origin.clone().into_bytes()),
            ("h", item.content_hash.clone().into_bytes()),
            ("s", item.state.clone().into_bytes()),
            ("t", item.content_type.code().to_string().into_bytes()),
            ("b", (if item.tombstone { "1" } else { "0" }).into()),
            ("u", item.updated_at.to_string().into_bytes()),
            ("c", item.content.to_vec()),
        ];
        if let Some(tp) = &item.trace_parent {
            fields.push(("p", tp.clone().into_bytes()));
        }
        if cache_only || route != L2Route::Mirror {
            fields.push(("n", b"1".to_vec()));
        }
        pipe.hset_multiple(&key, &fields).ignore();
        if let L2Route::Expiring(secs) = route {
            pipe.expire(&key, secs as i64).ignore();
        }
    }

    /// Adds the state-set changes for `id`.
    pub fn queue_state(&self, pipe: &mut redis::Pipeline, id: &str, mv: &StateMove) {
        if let Some(from) = &mv.from
            && mv.to.as_ref() != Some(from)
        {
            pipe.srem(self.state_key(from), id).ignore();
        }
        if let Some(to) = &mv.to {
            pipe.sadd(self.state_key(to), id).ignore();
        }
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

    /// The item under `id`, checked against its hash. `Ok(None)` when absent;
    /// `Corruption` when the stored content does not match or the key is not ours.
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StorageError> {
        let map: HashMap<String, Vec<u8>> = match self.conn().hgetall(self.item_key(id)).await {
            Ok(m) => m,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                return Err(StorageError::Corruption {
                    id: id.into(),
                    expected: "a hash".into(),
                    actual: "another type".into(),
                });
            }
            Err(e) => return Err(redis_err("get", e)),
        };
        if map.is_empty() {
            return Ok(None);
        }
        parse_item(id, &map).map(Some)
    }

    /// `Some(live)` when Redis holds the id (live or tombstone), `None` when not.
    pub async fn exists(&self, id: &str) -> Result<Option<bool>, StorageError> {
        let tomb: Option<String> = self
            .conn()
            .hget(self.item_key(id), "b")
            .await
            .map_err(|e| redis_err("exists", e))?;
        Ok(tomb.map(|t| t != "1"))
    }

    /// Every mirrored entry in Redis, by scanning item keys; keys that are not
    /// well-formed item hashes (or, with `verify_content`, whose content does
    /// not match their hash) are returned in the second list, to be deleted.
    pub async fn scan_entries(&self, verify_content: bool) -> Result<(Vec<EntryMeta>, Vec<String>), StorageError> {
        let mut conn = self.conn();
        let key_prefix = format!("{}item:", self.prefix);
        let pattern = format!("{}*", glob_escape(&key_prefix));
        let mut cursor: u64 = 0;
        let (mut entries, mut bad) = (Vec::new(), Vec::new());
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
                    let fields: &[&str] = &["v", "o", "b", "h", "s", "n", "c"];
                    pipe.cmd("HMGET")
                        .arg(k)
                        .arg(&fields[..if verify_content { 7 } else { 6 }]);
                }
                let rows: Vec<redis::RedisResult<Vec<Option<Vec<u8>>>>> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| redis_err("scan fields", e))?;
                for (k, row) in keys.iter().zip(rows) {
                    let id = k[key_prefix.len()..].to_string();
                    let parsed = row.ok().and_then(|mut f| {
                        let content = if verify_content { Some(f.pop()?) } else { None };
                        let text: Vec<Option<String>> = f
                            .into_iter()
                            .map(|v| v.and_then(|b| String::from_utf8(b).ok()))
                            .collect();
                        let meta = meta_from_fields(&id, &text)?;
                        match (&meta, content) {
                            (Some(m), Some(c)) if content_hash(c.as_deref().unwrap_or_default()) != m.content_hash => {
                                None
                            }
                            _ => Some(meta),
                        }
                    });
                    match parsed {
                        Some(Some(meta)) => entries.push(meta),
                        Some(None) => {}
                        None => bad.push(id),
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

/// `Some(Some(meta))` for a mirrored entry, `Some(None)` for a well-formed
/// non-mirrored one (cache-only, expiring), `None` when malformed.
fn meta_from_fields(id: &str, f: &[Option<String>]) -> Option<Option<EntryMeta>> {
    let [v, o, b, h, s, n] = f else { return None };
    let version = v.as_ref()?.parse().ok()?;
    let hash = h
        .as_ref()
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))?;
    let meta = EntryMeta {
        id: id.to_string(),
        version,
        origin: o.clone()?,
        tombstone: b.as_deref()? == "1",
        content_hash: hash.clone(),
        state: s.clone()?,
        l2: true,
    };
    Some((n.as_deref() != Some("1")).then_some(meta))
}

fn parse_item(id: &str, map: &HashMap<String, Vec<u8>>) -> Result<SyncItem, StorageError> {
    let bad = |what: &str| StorageError::Corruption {
        id: id.into(),
        expected: format!("field {what}"),
        actual: "missing or malformed".into(),
    };
    let text = |k: &str| {
        map.get(k)
            .and_then(|v| String::from_utf8(v.clone()).ok())
            .ok_or_else(|| bad(k))
    };
    let content = map.get("c").cloned().ok_or_else(|| bad("c"))?;
    let expected = text("h")?;
    let actual = content_hash(&content);
    if actual != expected {
        return Err(StorageError::Corruption {
            id: id.into(),
            expected,
            actual,
        });
    }
    let route = if map.get("n").is_some_and(|n| n == b"1") {
        L2Route::Skip
    } else {
        L2Route::Mirror
    };
    Ok(SyncItem {
        object_id: id.to_string(),
        version: text("v")?.parse().map_err(|_| bad("v"))?,
        origin: text("o")?,
        updated_at: text("u")?.parse().map_err(|_| bad("u"))?,
        content_type: ContentType::from_code(text("t")?.parse().map_err(|_| bad("t"))?),
        content: content.into(),
        content_hash: expected,
        state: text("s")?,
        tombstone: text("b")? == "1",
        access_count: 0,
        last_accessed: 0,
        trace_parent: map.get("p").map(|p| String::from_utf8_lossy(p).into_owned()),
        route,
    })
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
