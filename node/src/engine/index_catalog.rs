//! Search index definitions replicate as items. Each lives under the
//! reserved id `_syncnode/index/<name>` (state `_syncnode`, binary content:
//! the definition as JSON), so CDC and anti-entropy carry it like any write
//! and last-writer-wins settles two nodes defining one name at once; a drop
//! is its tombstone. Committing one, here or from a peer, installs or drops
//! the index on this node. Scans, counts and prefix deletes of user prefixes
//! leave the reserved ids out, and local writes to them are refused.

use super::error::StorageError;
pub use super::item::RESERVED;
use super::item::{ContentType, SyncItem};
use super::l3::Rows;
use super::search::SearchIndex;
use super::{L2Route, SubmitOptions, SyncEngine};

/// The reserved ids (`item::RESERVED`) of index definitions.
const INDEX_PREFIX: &str = "_syncnode/index/";
const CATALOG_STATE: &str = "_syncnode";

fn catalog_id(name: &str) -> String {
    format!("{INDEX_PREFIX}{name}")
}

/// The catalog item of `def`: binary content, so no search index (hot or
/// cold) ever projects it.
fn catalog_item(def: &SearchIndex) -> Result<SyncItem, StorageError> {
    let content = serde_json::to_vec(def).map_err(|e| StorageError::backend("encode index", e))?;
    let mut item = SyncItem::new(catalog_id(&def.name), content).with_state(CATALOG_STATE);
    item.content_type = ContentType::Binary;
    Ok(item)
}

impl SyncEngine {
    /// Publishes `def` to the cluster (after installing it here).
    pub(crate) async fn publish_index(&self, def: &SearchIndex) -> Result<(), StorageError> {
        self.submit_reserved(catalog_item(def)?).await
    }

    /// Publishes the drop of `name` (after dropping it here).
    pub(crate) async fn publish_index_drop(&self, name: &str) -> Result<(), StorageError> {
        self.submit_reserved(SyncItem::tombstone(catalog_id(name)).with_state(CATALOG_STATE))
            .await
    }

    async fn submit_reserved(&self, item: SyncItem) -> Result<(), StorageError> {
        let options = SubmitOptions::default();
        debug_assert_eq!(options.l2_route(), L2Route::Mirror);
        match self.submit_as(vec![item], &options, true).await?.pop() {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes this node's indexes follow the catalog items of `ids` as they
    /// are stored now (a newer definition may have committed meanwhile:
    /// the stored one is the truth, not the one that just arrived). Changes
    /// take turns, so two never cross.
    pub(crate) async fn follow_catalog(&self, ids: &[String]) {
        let _turn = self.core.catalog_lock.lock().await;
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let stored = match self.get_stored_many(&refs).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "search index definitions not read; they take effect at the next start");
                return;
            }
        };
        for it in stored.iter().filter(|i| i.object_id.starts_with(INDEX_PREFIX)) {
            let name = &it.object_id[INDEX_PREFIX.len()..];
            let done = if it.tombstone {
                match self.uninstall_index(name).await {
                    Err(StorageError::UnknownIndex(_)) => Ok(()),
                    other => other,
                }
            } else {
                match serde_json::from_slice::<SearchIndex>(&it.content) {
                    Ok(def) if def.name == name => {
                        if self.search_indexes().contains(&def) {
                            Ok(())
                        } else {
                            self.install_index(def).await
                        }
                    }
                    Ok(def) => Err(StorageError::InvalidInput(format!(
                        "index definition {:?} stored under {:?}",
                        def.name, it.object_id
                    ))),
                    Err(e) => Err(StorageError::InvalidInput(format!("index definition {name:?}: {e}"))),
                }
            };
            match done {
                Ok(()) => tracing::info!(
                    index = name,
                    dropped = it.tombstone,
                    "search index definition from the cluster"
                ),
                Err(e) => tracing::warn!(index = name, error = %e, "replicated search index definition not applied"),
            }
        }
    }

    /// At start: the catalog items win over the definitions kept locally
    /// (one may have committed just before a crash). A local index with no
    /// catalog item (made before indexes replicated) is published at
    /// version 1, so any definition or drop the cluster made beats it.
    pub(crate) async fn reconcile_catalog(&self) -> Result<(), StorageError> {
        let b = self.core.backends()?;
        let items =
            b.l3.scan_prefix(INDEX_PREFIX, None, usize::MAX >> 1, Rows::WithTombstones)
                .await?;
        let ids: Vec<String> = items.iter().map(|i| i.object_id.clone()).collect();
        self.follow_catalog(&ids).await;
        for def in self.search_indexes() {
            if !ids.contains(&catalog_id(&def.name)) {
                let mut item = catalog_item(&def)?;
                item.version = 1;
                item.origin = self.node_id();
                item.content_hash = super::item::content_hash(&item.content);
                for r in self.apply_remote_many(vec![item]).await? {
                    r?;
                }
            }
        }
        Ok(())
    }
}
