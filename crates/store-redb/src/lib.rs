//! The embedded store: Sextant's default, durable, single-file backend on [redb].
//!
//! Every commit is one redb write transaction with immediate durability (fsync before it
//! returns). The core already groups many writes into one batch, so one fsync is shared by every
//! registration in the batch. redb holds an exclusive lock on the file, so two servers cannot
//! open the same data directory.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sextant_core::model::Revision;
use sextant_core::store::{Batch, Store, StoreError, Visit};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
const CACHE_BYTES: usize = 64 * 1024 * 1024;

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A redb database file under the data directory.
pub struct RedbStore {
    db: Mutex<Option<Arc<Database>>>,
    path: PathBuf,
}

impl RedbStore {
    /// Opens (creating if needed) `dir/registry.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Io(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("registry.redb");
        // The registry lives in memory; redb's page cache only serves writes (and the one scan
        // at start-up), so it need not be redb's 1 GiB default, which would count against RSS.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                "{} is in use by another process (is another sextant running on this data dir?)",
                path.display()
            )),
                e => StoreError::Io(format!("cannot open {}: {e}", path.display())),
            })?;
        let txn = db.begin_write().map_err(io)?;
        txn.open_table(KV).map_err(io)?;
        txn.open_table(META).map_err(io)?;
        txn.commit().map_err(io)?;
        Ok(Self {
            db: Mutex::new(Some(Arc::new(db))),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .lock()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let txn = db.begin_write().map_err(io)?;
            {
                let mut kv = txn.open_table(KV).map_err(io)?;
                for m in &batch.mutations {
                    match &m.value {
                        Some(v) => {
                            kv.insert(m.key.as_str(), v.as_slice()).map_err(io)?;
                        }
                        None => {
                            kv.remove(m.key.as_str()).map_err(io)?;
                        }
                    }
                }
                let mut meta = txn.open_table(META).map_err(io)?;
                meta.insert(REVISION, batch.revision).map_err(io)?;
            }
            txn.commit().map_err(io)
        })
        .await
        .map_err(|e| StoreError::Io(format!("commit task failed: {e}")))?
    }

    fn load(&self, visit: &mut Visit<'_>) -> Result<Revision, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(io)?;
        let kv = txn.open_table(KV).map_err(io)?;
        for item in kv.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            visit(k.value(), v.value())?;
        }
        let meta = txn.open_table(META).map_err(io)?;
        let rev = meta
            .get(REVISION)
            .map_err(io)?
            .map(|g| g.value())
            .unwrap_or(0);
        Ok(rev)
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Dropping the last handle flushes and releases the file lock.
        let db = self.db.lock().take();
        drop(db);
        tracing::info!(path = %self.path.display(), "store closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sextant_core::store::{conformance, Mutation};

    #[tokio::test]
    async fn conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance::basic(&RedbStore::open(dir.path()).unwrap()).await;
    }

    #[tokio::test]
    async fn survives_reopen_and_locks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        assert!(matches!(
            RedbStore::open(dir.path()),
            Err(StoreError::Unavailable(_))
        ));
        s.commit(Batch {
            revision: 9,
            mutations: vec![Mutation {
                key: "k".into(),
                value: Some(b"v".to_vec()),
            }],
        })
        .await
        .unwrap();
        s.close().await.unwrap();
        assert!(s.commit(Batch::default()).await.is_err());
        let s = RedbStore::open(dir.path()).unwrap();
        let mut n = 0;
        let rev = s
            .load(&mut |k, v| {
                assert_eq!((k, v), ("k", &b"v"[..]));
                n += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!((rev, n), (9, 1));
    }
}
