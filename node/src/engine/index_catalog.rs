//! Search index definitions replicate as items. Each lives under the
//! reserved id `_syncnode/index/<name>` (state `_syncnode`, binary content:
//! the definition as JSON), so CDC and anti-entropy carry it like any write
//! and last-writer-wins settles two nodes defining one name at once; a drop
//! is its tombstone. Committing one, here or from a peer, installs or drops
//! the index on this node. Scans, counts and prefix deletes of user prefixes
//! leave the reserved ids out, and local writes to them are refused.

use super::error::StorageError;
use super::item::SyncItem;
use super::search::SearchIndex;
use super::{L2Route, SubmitOptions, SyncEngine};

/// Ids under this prefix belong to the engine.
pub const RESERVED: &str = "_syncnode/";
const INDEX_PREFIX: &str = "_syncnode/index/";
const CATALOG_STATE: &str = "_syncnode";

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

fn catalog_id(name: &str) -> String {
    format!("{INDEX_PREFIX}{name}")
}

impl SyncEngine {
    /// Publishes `def` to the cluster (after installing it here).
    pub(crate) async fn publish_index(&self, def: &SearchIndex) -> Result<(), StorageError> {
        let content = serde_json::to_vec(def).map_err(|e| StorageError::backend("encode index", e))?;
        let item = SyncItem::new(catalog_id(&def.name), content).with_state(CATALOG_STATE);
        self.submit_reserved(item).await
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

    /// Installs or drops the indexes that committed catalog items define
    /// (replicated ones; local changes are installed before they are published).
    pub(crate) async fn apply_catalog(&self, items: &[SyncItem]) {
        for it in items.iter().filter(|i| i.object_id.starts_with(INDEX_PREFIX)) {
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
    /// (one may have committed just before a crash), and a local index with
    /// no catalog item (made before indexes replicated) is published.
    pub(crate) async fn reconcile_catalog(&self) -> Result<(), StorageError> {
        let b = self.core.backends()?;
        let items =
            b.l3.scan_prefix(INDEX_PREFIX, None, usize::MAX >> 1, super::Rows::WithTombstones)
                .await?;
        self.apply_catalog(&items).await;
        for def in self.search_indexes() {
            if !items.iter().any(|i| i.object_id == catalog_id(&def.name)) {
                self.publish_index(&def).await?;
            }
        }
        Ok(())
    }
}
