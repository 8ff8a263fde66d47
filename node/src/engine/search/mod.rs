//! Search over the JSON content of items (DESIGN §3): an index names a key
//! prefix and typed fields read from `$.<field>`; a `Query` is answered by the
//! hot tier (RediSearch, from Debian's `redis-redisearch`) or the cold tier (SQL
//! over JSON in L3), with the same meaning in both:
//!
//! - text is split into tokens at ASCII punctuation and whitespace and
//!   ASCII-lowercased, with no stemming and no stopwords; `eq` on a text field
//!   is a phrase (consecutive tokens), `contains` wants every token anywhere,
//!   `prefix` a token starting with the value (at least 2 characters), `fuzzy`
//!   a token within one edit (values of at least 3 characters);
//! - numeric fields hold JSON numbers; `eq` and `range` (inclusive) apply;
//! - tag fields hold a string or an array of strings (or integers), compared
//!   lowercased and trimmed; elements containing `,` are not tags; `eq` and
//!   `tags` (any of) apply;
//! - a document lacking a field matches no condition on it, and matches `not`.
//!
//! The engine writes index documents itself: for every live JSON item under an
//! index's prefix, a hash `{p}doc:{index}:{id}` with the projected field values,
//! added with `FT.ADD` (RediSearch 1.x) or plain `HSET` for an index created
//! `ON HASH PREFIX` (RediSearch 2.x); the translator emits both forms. Values in
//! queries are tokenized or escaped, so they cannot change a query's structure.
//!
//! The parts: `query` (definitions, queries, their checks), `redisearch` and
//! `sql` (the two tiers' languages), `registry` (the indexes this node
//! knows and their documents in Redis), `cache` (answers until a write);
//! this file is the engine's search API.

mod cache;
mod query;
mod redisearch;
mod registry;
mod sql;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use crate::engine::l3::SqlArg;
pub use cache::SearchCacheStats;
pub use query::{
    FieldType, MAX_RESULTS, Query, QueryValue, SearchField, SearchIndex, SearchResult, SearchSource, SearchTier,
    project, tokens,
};
pub use redisearch::to_redisearch;
pub(crate) use registry::SearchRegistry;
pub use sql::to_sql;

use super::SyncEngine;
use super::error::StorageError;
use super::item::SyncItem;
use super::l2::RedisStore;
use redisearch::{doc_prefix, index_key};
use registry::{IndexState, META_PREFIX};

impl SyncEngine {
    /// Registers an index (kept in L3, so it survives restarts), creates it in
    /// RediSearch and fills it from the items already stored. Re-creating an
    /// index of the same name replaces it. The definition replicates: every
    /// node of the cluster gets the index (see `index_catalog`).
    pub async fn create_search_index(&self, index: SearchIndex) -> Result<(), StorageError> {
        index.validate()?;
        // In turn with definitions arriving from peers (see `index_catalog`).
        let _turn = self.core.catalog_lock.lock().await;
        self.install_index(index.clone()).await?;
        self.publish_index(&index).await
    }

    /// Drops an index (its documents too) on every node; the items stay.
    pub async fn drop_search_index(&self, name: &str) -> Result<(), StorageError> {
        let _turn = self.core.catalog_lock.lock().await;
        self.uninstall_index(name).await?;
        self.publish_index_drop(name).await
    }

    /// Makes the index exist on this node.
    pub(crate) async fn install_index(&self, index: SearchIndex) -> Result<(), StorageError> {
        index.validate()?;
        let core = &self.core;
        let b = core.backends()?;
        let def_bytes = serde_json::to_vec(&index).map_err(|e| StorageError::backend("encode index", e))?;
        let _guard = core.apply_lock.lock().await;
        b.l3.save_blob(&format!("{META_PREFIX}{}", index.name), 0, &def_bytes)
            .await?;
        core.search.write().insert(
            index.name.clone(),
            IndexState {
                def: index.clone(),
                writes: AtomicU64::new(0),
            },
        );
        core.search.cache.forget_prefix(&format!("{}\u{0}", index.name));
        if let Some(l2) = &b.l2
            && core.l2_mirror.up.load(Ordering::Relaxed)
        {
            let created = async {
                core.search.detect_version(l2).await?;
                core.search.create_in_redis(core, l2, &index).await
            }
            .await;
            if let Err(e) = created {
                // The definition is stored; the next resync creates it in Redis.
                tracing::warn!(error = %e, index = %index.name, "could not create the index in Redis yet");
                core.l2_mirror.stale.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Drops the index on this node.
    pub(crate) async fn uninstall_index(&self, name: &str) -> Result<(), StorageError> {
        let core = &self.core;
        let b = core.backends()?;
        let _guard = core.apply_lock.lock().await;
        if core.search.write().remove(name).is_none() {
            return Err(StorageError::UnknownIndex(name.to_string()));
        }
        b.l3.delete_blob(&format!("{META_PREFIX}{name}")).await?;
        core.search.cache.forget_prefix(&format!("{name}\u{0}"));
        if let Some(l2) = &b.l2 {
            let key = index_key(l2.prefix(), name);
            let cmd = if core.search.v2.load(Ordering::Relaxed) {
                vec!["FT.DROPINDEX", &key, "DD"]
            } else {
                vec!["FT.DROP", &key]
            };
            let mut c = redis::cmd(cmd[0]);
            for a in &cmd[1..] {
                c.arg(*a);
            }
            let r: redis::RedisResult<redis::Value> = c.query_async(&mut l2.conn()).await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "FT.DROP failed; documents may remain in Redis");
            }
        }
        Ok(())
    }

    /// The indexes this node has.
    pub fn search_indexes(&self) -> Vec<SearchIndex> {
        self.core.search.read().values().map(|s| s.def.clone()).collect()
    }

    /// Searches with the default tier (RediSearch, SQL when Redis cannot answer)
    /// and limit 100.
    pub async fn search(&self, index_name: &str, query: &Query) -> Result<SearchResult, StorageError> {
        self.search_with_options(index_name, query, SearchTier::RedisWithSqlFallback, 100)
            .await
    }

    /// Searches `index_name`; ids come back in id order, at most `limit`
    /// (≤ 10,000). Results are cached until a write under the index's prefix.
    pub async fn search_with_options(
        &self,
        index_name: &str,
        query: &Query,
        tier: SearchTier,
        limit: usize,
    ) -> Result<SearchResult, StorageError> {
        self.search_page(index_name, query, tier, limit, None).await
    }

    /// A page of `search_with_options`: the matching ids after `after`, in
    /// id order. The hot tier pages exactly while a query matches at most
    /// `MAX_RESULTS` documents; past that the SQL tier answers (or, with
    /// `RedisOnly`, the page is refused).
    pub async fn search_page(
        &self,
        index_name: &str,
        query: &Query,
        tier: SearchTier,
        limit: usize,
        after: Option<&str>,
    ) -> Result<SearchResult, StorageError> {
        let (def, writes) = self.core.search.get(index_name)?;
        let limit = limit.clamp(1, MAX_RESULTS);
        let hot = to_redisearch(query, &def)?;
        let key = format!(
            "{index_name}\u{0}{tier:?}\u{0}{limit}\u{0}{}\u{0}{}",
            after.unwrap_or(""),
            serde_json::to_string(query).map_err(|e| StorageError::backend("encode query", e))?
        );
        if let Some(ids) = self.core.search.cache.get(&key, writes) {
            return self.search_result(ids, SearchSource::Cache, true).await;
        }
        let b = self.core.backends()?;
        let l2 = b.l2.as_ref().filter(|_| self.core.l2_mirror.usable());
        let (ids, source) = match (tier, l2) {
            (SearchTier::SqlOnly, _) => (self.cold_ids(&def, query, after, limit).await?, SearchSource::Cold),
            (SearchTier::RedisOnly, None) => {
                return Err(StorageError::Connection(
                    "Redis is unavailable or resyncing; the hot tier cannot answer".into(),
                ));
            }
            (SearchTier::RedisOnly, Some(l2)) => (self.hot_ids(l2, &def, &hot, after, limit).await?, SearchSource::Hot),
            (SearchTier::RedisWithSqlFallback, Some(l2)) => match self.hot_ids(l2, &def, &hot, after, limit).await {
                Ok(ids) => (ids, SearchSource::Hot),
                Err(e) => {
                    tracing::debug!(error = %e, "hot tier failed; answering from SQL");
                    (self.cold_ids(&def, query, after, limit).await?, SearchSource::Cold)
                }
            },
            (SearchTier::RedisWithSqlFallback, None) => {
                (self.cold_ids(&def, query, after, limit).await?, SearchSource::Cold)
            }
        };
        self.core.search.cache.put(key, writes, ids.clone());
        let source = if ids.is_empty() { SearchSource::Empty } else { source };
        self.search_result(ids, source, false).await
    }

    async fn search_result(
        &self,
        ids: Vec<String>,
        source: SearchSource,
        cached: bool,
    ) -> Result<SearchResult, StorageError> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let items = self.get_many(&refs).await?.into_iter().flatten().collect();
        Ok(SearchResult {
            ids,
            items,
            source,
            cached,
        })
    }

    /// Matching ids from RediSearch, in id order, after `after`. RediSearch
    /// 1.2 cannot sort by id: every match is fetched and sorted here, which
    /// is exact only up to `MAX_RESULTS` matches (more is an error, which
    /// sends the fallback tier to SQL).
    async fn hot_ids(
        &self,
        l2: &RedisStore,
        def: &SearchIndex,
        query: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let prefix = doc_prefix(l2.prefix(), &def.name);
        let reply: redis::Value = tokio::time::timeout(
            Duration::from_secs(5),
            redis::cmd("FT.SEARCH")
                .arg(index_key(l2.prefix(), &def.name))
                .arg(query)
                .arg("NOCONTENT")
                .arg("VERBATIM")
                .arg("LIMIT")
                .arg(0)
                .arg(MAX_RESULTS)
                .query_async(&mut l2.conn()),
        )
        .await
        .map_err(|_| StorageError::Connection("FT.SEARCH timed out".into()))?
        .map_err(|e| StorageError::Backend(format!("FT.SEARCH: {e}")))?;
        let redis::Value::Array(parts) = reply else {
            return Err(StorageError::Backend("FT.SEARCH gave an unexpected reply".into()));
        };
        let total = match parts.first() {
            Some(redis::Value::Int(n)) => *n as usize,
            _ => 0,
        };
        if total > MAX_RESULTS {
            return Err(StorageError::Backend(format!(
                "the query matches {total} documents, more than the hot tier can order ({MAX_RESULTS})"
            )));
        }
        let mut ids: Vec<String> = parts
            .iter()
            .skip(1)
            .filter_map(|v| match v {
                redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                redis::Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            })
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .filter(|id| after.is_none_or(|a| id.as_str() > a))
            .collect();
        ids.sort();
        ids.truncate(limit);
        Ok(ids)
    }

    async fn cold_ids(
        &self,
        def: &SearchIndex,
        query: &Query,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let b = self.core.backends()?;
        let (cond, args) = to_sql(query, def, b.l3.dialect())?;
        b.l3.search_ids(&def.prefix, after, &cond, &args, limit).await
    }

    /// A raw RediSearch query string against the index (hot tier only, not
    /// cached). The string goes to FT.SEARCH as given.
    pub async fn search_raw(
        &self,
        index_name: &str,
        query_str: &str,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        let (def, _) = self.core.search.get(index_name)?;
        let b = self.core.backends()?;
        let l2 =
            b.l2.as_ref()
                .ok_or_else(|| StorageError::InvalidInput("search_raw needs redis_url".into()))?;
        let ids = self
            .hot_ids(l2, &def, query_str, None, limit.clamp(1, MAX_RESULTS))
            .await?;
        Ok(self.search_result(ids, SearchSource::Hot, false).await?.items)
    }

    /// The cold tier directly (SQL over L3), not cached.
    pub async fn search_sql(
        &self,
        index_name: &str,
        query: &Query,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        let (def, _) = self.core.search.get(index_name)?;
        let ids = self.cold_ids(&def, query, None, limit.clamp(1, MAX_RESULTS)).await?;
        Ok(self.search_result(ids, SearchSource::Cold, false).await?.items)
    }

    /// Hits, misses and stale answers of the search cache.
    pub fn search_cache_stats(&self) -> SearchCacheStats {
        self.core.search.cache.stats()
    }
}
