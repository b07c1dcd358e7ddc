//! The storage port: what the core needs from a durable store, and an in-memory store for tests.
//!
//! The trait is shaped so that an etcd backend fits behind it unchanged: keys are ordered
//! strings, a commit is one atomic batch of puts and deletes tagged with the revision of its last
//! change, and loading is an ordered scan. The core is the only writer of a shard, so it assigns
//! revisions itself; a backend persists the batch's revision with the batch so that a restart
//! resumes the sequence where the last durable commit left it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use sextant_model::Revision;

/// A store failure. The write it belonged to was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt at {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store is unavailable: {0}")]
    Unavailable(String),
}

/// One key set (`Some`) or removed (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// An atomic group of mutations; `revision` is the revision of the last change in it.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub revision: Revision,
    pub mutations: Vec<Mutation>,
}

/// The visitor [`Store::load`] calls for each key and value, in key order.
pub type Visit<'a> = dyn FnMut(&str, &[u8]) -> Result<(), StoreError> + 'a;

/// A durable, ordered key-value store with atomic batches.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies the batch atomically and returns only once it is durable. The registry calls it
    /// from its writer's own thread, one commit at a time, so an implementation may block that
    /// thread for its disk sync rather than hop to a blocking pool.
    async fn commit(&self, batch: Batch) -> Result<(), StoreError>;

    /// Visits every key in order and returns the revision of the last durable batch (0 when
    /// empty). Blocking: called once at start-up, off the async threads.
    fn load(&self, visit: &mut Visit<'_>) -> Result<Revision, StoreError>;

    /// Flushes and releases the store. Later commits fail.
    async fn close(&self) -> Result<(), StoreError>;
}

/// A non-durable store for tests and `--store memory`. Can be told to fail, to test outages.
#[derive(Default)]
pub struct MemStore {
    data: Mutex<(Revision, BTreeMap<String, Vec<u8>>)>,
    failing: AtomicBool,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While `true`, every commit fails as if the disk were gone.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn len(&self) -> usize {
        self.data.lock().1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected failure".into()));
        }
        let mut guard = self.data.lock();
        let (rev, map) = &mut *guard;
        for m in batch.mutations {
            match m.value {
                Some(v) => {
                    map.insert(m.key, v);
                }
                None => {
                    map.remove(&m.key);
                }
            }
        }
        *rev = batch.revision;
        Ok(())
    }

    fn load(&self, visit: &mut Visit<'_>) -> Result<Revision, StoreError> {
        let guard = self.data.lock();
        for (k, v) in &guard.1 {
            visit(k, v)?;
        }
        Ok(guard.0)
    }

    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Behaviour every [`Store`] must show, run by each backend's own tests (one suite, every
/// backend).
pub mod conformance {
    use super::*;

    fn put(k: &str, v: &[u8]) -> Mutation {
        Mutation {
            key: k.into(),
            value: Some(v.to_vec()),
        }
    }

    fn dump(store: &dyn Store) -> (Revision, Vec<(String, Vec<u8>)>) {
        let mut out = Vec::new();
        let rev = store
            .load(&mut |k, v| {
                out.push((k.to_string(), v.to_vec()));
                Ok(())
            })
            .expect("load");
        (rev, out)
    }

    /// An empty store loads nothing at revision 0; committed batches load back in key order
    /// with their last revision; deletes remove; an empty batch still records its revision.
    pub async fn basic(store: &dyn Store) {
        assert_eq!(dump(store), (0, vec![]));
        store
            .commit(Batch {
                revision: 3,
                mutations: vec![put("b", b"2"), put("a", b"1"), put("c", b"3")],
            })
            .await
            .expect("commit");
        store
            .commit(Batch {
                revision: 5,
                mutations: vec![
                    Mutation {
                        key: "c".into(),
                        value: None,
                    },
                    put("a", b"one"),
                    Mutation {
                        key: "missing".into(),
                        value: None,
                    },
                ],
            })
            .await
            .expect("commit");
        let (rev, kv) = dump(store);
        assert_eq!(rev, 5);
        assert_eq!(
            kv,
            vec![("a".into(), b"one".to_vec()), ("b".into(), b"2".to_vec())]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_store_conforms() {
        conformance::basic(&MemStore::new()).await;
    }

    #[tokio::test]
    async fn mem_store_can_fail() {
        let s = MemStore::new();
        s.set_failing(true);
        assert!(s.commit(Batch::default()).await.is_err());
        s.set_failing(false);
        assert!(s.commit(Batch::default()).await.is_ok());
    }
}
