//! The indexes a node knows: their definitions (kept in L3 as blobs), the
//! count of writes under each prefix that invalidates cached answers, the
//! RediSearch version in use, the index documents written beside every
//! mirrored item, and `FT.CREATE` with the backfill from L3.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::cache::SearchCache;
use super::query::{SearchIndex, project};
use super::redisearch::{doc_prefix, index_key};
use crate::engine::Core;
use crate::engine::error::StorageError;
use crate::engine::item::{ContentType, SyncItem};
use crate::engine::l2::RedisStore;
use crate::engine::l3::L3Store;
use crate::locks::RwLockUnpoisoned;

pub(super) struct IndexState {
    pub(super) def: SearchIndex,
    /// Bumped by every write under the prefix; invalidates cached answers.
    pub(super) writes: AtomicU64,
}

/// The indexes this node knows (their definitions live in L3) and the cache.
#[derive(Default)]
pub(crate) struct SearchRegistry {
    indexes: RwLock<BTreeMap<String, IndexState>>,
    /// The RediSearch module is 2.x (`ON HASH PREFIX`), else 1.x (`FT.ADD`).
    pub(super) v2: AtomicBool,
    pub cache: SearchCache,
}

pub(super) const META_PREFIX: &str = "search_index:";

impl SearchRegistry {
    pub(super) fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, IndexState>> {
        self.indexes.read_locked()
    }

    pub(super) fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, IndexState>> {
        self.indexes.write_locked()
    }

    pub(super) fn get(&self, name: &str) -> Result<(SearchIndex, u64), StorageError> {
        self.read()
            .get(name)
            .map(|s| (s.def.clone(), s.writes.load(Ordering::Acquire)))
            .ok_or_else(|| StorageError::UnknownIndex(name.to_string()))
    }

    /// Loads the index definitions stored in L3.
    pub async fn load(&self, l3: &L3Store) -> Result<(), StorageError> {
        for (_, bytes) in l3.load_blobs_with_prefix(META_PREFIX).await? {
            match serde_json::from_slice::<SearchIndex>(&bytes) {
                Ok(def) => {
                    self.write().insert(
                        def.name.clone(),
                        IndexState {
                            def,
                            writes: AtomicU64::new(0),
                        },
                    );
                }
                Err(e) => tracing::warn!(error = %e, "unreadable search index definition skipped"),
            }
        }
        Ok(())
    }

    /// Invalidates cached answers of the indexes covering `id`.
    pub fn note_write(&self, id: &str) {
        for s in self.read().values() {
            if id.starts_with(&s.def.prefix) {
                s.writes.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn doc_commands(&self, l2: &RedisStore, def: &SearchIndex, item: &SyncItem, pipe: &mut redis::Pipeline) {
        let doc = format!("{}{}", doc_prefix(l2.prefix(), &def.name), item.object_id);
        let fields = (!item.tombstone && item.content_type == ContentType::Json)
            .then(|| project(def, &item.content))
            .flatten();
        let v2 = self.v2.load(Ordering::Relaxed);
        match (fields, v2) {
            (Some(fields), false) => {
                let mut c = redis::cmd("FT.ADD");
                c.arg(index_key(l2.prefix(), &def.name))
                    .arg(&doc)
                    .arg(1.0)
                    .arg("REPLACE")
                    .arg("FIELDS");
                for (k, v) in &fields {
                    c.arg(k).arg(v);
                }
                pipe.add_command(c).ignore();
            }
            (Some(fields), true) => {
                pipe.del(&doc).ignore();
                pipe.hset_multiple(&doc, &fields).ignore();
            }
            (None, false) => {
                pipe.cmd("FT.DEL")
                    .arg(index_key(l2.prefix(), &def.name))
                    .arg(&doc)
                    .arg("DD")
                    .ignore();
            }
            (None, true) => {
                pipe.del(&doc).ignore();
            }
        }
    }

    /// Adds the document writes for `item` to `pipe` (every index covering it).
    pub fn queue_docs(&self, l2: &RedisStore, pipe: &mut redis::Pipeline, item: &SyncItem) {
        for s in self.read().values() {
            if item.object_id.starts_with(&s.def.prefix) {
                self.doc_commands(l2, &s.def, item, pipe);
            }
        }
    }

    /// Creates missing RediSearch indexes and fills them from L3. Caller holds
    /// the engine's `apply_lock`, so no write races the backfill.
    pub async fn ensure_indexes(&self, core: &Core, l2: &RedisStore) -> Result<(), StorageError> {
        self.detect_version(l2).await?;
        let defs: Vec<SearchIndex> = self.read().values().map(|s| s.def.clone()).collect();
        for def in defs {
            let exists: redis::RedisResult<redis::Value> = redis::cmd("FT.INFO")
                .arg(index_key(l2.prefix(), &def.name))
                .query_async(&mut l2.conn())
                .await;
            if exists.is_err() {
                self.create_in_redis(core, l2, &def).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn detect_version(&self, l2: &RedisStore) -> Result<(), StorageError> {
        let modules: redis::Value = redis::cmd("MODULE")
            .arg("LIST")
            .query_async(&mut l2.conn())
            .await
            .map_err(|e| StorageError::Connection(format!("redis MODULE LIST: {e}")))?;
        let version = search_module_version(&modules)
            .ok_or_else(|| StorageError::Backend("the RediSearch module is not loaded in Redis".into()))?;
        self.v2.store(version >= 20000, Ordering::Relaxed);
        Ok(())
    }

    /// FT.CREATE (after dropping any old index of that name) and a backfill of
    /// every live JSON item under the prefix.
    pub(super) async fn create_in_redis(
        &self,
        core: &Core,
        l2: &RedisStore,
        def: &SearchIndex,
    ) -> Result<(), StorageError> {
        let mut conn = l2.conn();
        let _: redis::RedisResult<redis::Value> = redis::cmd("FT.DROP")
            .arg(index_key(l2.prefix(), &def.name))
            .query_async(&mut conn)
            .await;
        let mut create = redis::cmd("FT.CREATE");
        for a in def.ft_create_args(l2.prefix(), self.v2.load(Ordering::Relaxed)) {
            create.arg(a);
        }
        let _: () = create
            .query_async(&mut conn)
            .await
            .map_err(|e| StorageError::Backend(format!("FT.CREATE {}: {e}", def.name)))?;
        let b = core.backends()?;
        let mut after = def.prefix.clone();
        let mut first = true;
        loop {
            let page = b.l3.scan_from(&def.prefix, &after, !first, 1000).await?;
            first = false;
            let Some(last) = page.last() else { break };
            after = last.object_id.clone();
            let mut pipe = redis::pipe();
            for it in &page {
                self.doc_commands(l2, def, it, &mut pipe);
            }
            l2.run(&pipe, "search backfill").await?;
        }
        Ok(())
    }
}

/// The RediSearch version in a `MODULE LIST` reply (10200 = 1.2.0).
fn search_module_version(reply: &redis::Value) -> Option<i64> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let redis::Value::Array(modules) = reply else {
        return None;
    };
    modules.iter().find_map(|m| {
        let fields: Vec<(Option<String>, &redis::Value)> = match m {
            redis::Value::Array(kv) => kv
                .chunks(2)
                .filter(|c| c.len() == 2)
                .map(|c| (text(&c[0]), &c[1]))
                .collect(),
            redis::Value::Map(kv) => kv.iter().map(|(k, v)| (text(k), v)).collect(),
            _ => return None,
        };
        let name = fields
            .iter()
            .find(|(k, _)| k.as_deref() == Some("name"))
            .and_then(|(_, v)| text(v))?;
        if name != "ft" && name != "search" {
            return None;
        }
        fields
            .iter()
            .find(|(k, _)| k.as_deref() == Some("ver"))
            .and_then(|(_, v)| match v {
                redis::Value::Int(i) => Some(*i),
                other => text(other).and_then(|t| t.parse().ok()),
            })
    })
}
