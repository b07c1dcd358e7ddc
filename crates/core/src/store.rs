//! The storage port: what the core needs from a durable store ([`Store`], [`StoreError`]), an
//! in-memory store for tests ([`MemStore`]), and the conformance suite every backend runs
//! ([`conformance`]).
//!
//! The trait is shaped so that an etcd backend fits behind it unchanged: keys are ordered
//! strings, a commit is one atomic batch of puts and deletes tagged with the revision of its last
//! change, and loading is an ordered scan. The core is the only writer of a shard, so it assigns
//! revisions itself; a backend persists the batch's revision with the batch so that a restart
//! resumes the sequence where the last durable commit left it, and refuses a batch whose
//! revision is lower than the last committed one (a fence against a stale writer or a core bug
//! that would send revisions, and with them every watcher's resume point, backwards).
//!
//! **Change feed** (cluster mode): a shared store (etcd) tells every node what any writer
//! committed, through [`Store::watch_from`]: the batches after a revision, in order, each with
//! its revision, its mutations and its opaque journal, or [`FeedError::Compacted`] when that
//! history is gone (the node then reloads and its watchers get snapshots). A store only one
//! process uses (redb) has no feed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use sextant_model::Revision;

/// A store failure. The write it belonged to was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A failure known only by its message (a redb error that is not an OS error, a thread
    /// that could not start).
    #[error("store I/O failed: {0}")]
    Io(String),
    /// An operating-system I/O error, kept whole so that its kind (a full disk is
    /// `StorageFull`) reaches logs, metrics and error mapping.
    #[error("store I/O failed: {context}: {source}")]
    Disk {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stored data is corrupt at {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store is unavailable: {0}")]
    Unavailable(String),
    /// A load lost the snapshot it was reading (etcd compacted its revision mid-scan) after
    /// visiting some keys: the caller must start again with a fresh visitor.
    #[error("the store's load must start again: {0}")]
    Restart(String),
    /// A batch whose revision is below the last committed one; nothing was written.
    #[error("batch revision {revision} is below the store's last committed revision {last}")]
    Fenced { revision: Revision, last: Revision },
}

impl StoreError {
    /// An OS error with what the store was doing when it happened.
    pub fn disk(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Disk {
            context: context.into(),
            source,
        }
    }

    /// The kind of the underlying OS error, when there is one.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            StoreError::Disk { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
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
    /// Opaque bytes a store with a feed hands back with the batch ([`Change::journal`]): what
    /// the mutations alone do not say (the core's delete reasons and revisions). Stores
    /// without a feed ignore it; it is empty unless the store has one.
    pub journal: Vec<u8>,
}

/// One committed batch as a change feed delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: Revision,
    pub mutations: Vec<Mutation>,
    pub journal: Vec<u8>,
}

/// Why a change feed ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The store no longer has the history after this revision: reload everything.
    #[error("the store's history after revision {0} is compacted")]
    Compacted(Revision),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The batches committed after a revision, in revision order; ends after an error.
pub type Feed = tokio::sync::mpsc::Receiver<Result<Change, FeedError>>;

/// Where the registry's keys cluster, for a store whose range reads cost the whole rest of the
/// range (etcd 3.4 walks its index from the page's start to the range's end for every page, so
/// paging through one big range is quadratic). Every key under [`DIRECTORY_INDEX`] (a service's
/// record, `s/{ns}/{svc}`) names one directory of keys ([`directory_of`]: `i/{ns}/{svc}/`, the
/// service's instances); a store may read the keyspace as ranges split at those directories, in
/// parallel, and still visit every key in order. Only a hint: keys outside every directory lie
/// in some range too.
pub const DIRECTORY_INDEX: &str = "s/";

/// The directory a key under [`DIRECTORY_INDEX`] names (`None` for any other key).
pub fn directory_of(index_key: &str) -> Option<String> {
    let rest = index_key.strip_prefix(DIRECTORY_INDEX)?;
    let (ns, svc) = rest.split_once('/')?;
    (!ns.is_empty() && !svc.is_empty() && !svc.contains('/')).then(|| format!("i/{ns}/{svc}/"))
}

/// The visitor [`Store::load`] calls for each key and value, in key order.
pub type Visit<'a> = dyn FnMut(&str, &[u8]) -> Result<(), StoreError> + 'a;

/// A durable, ordered key-value store with atomic batches.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies the batch atomically and returns only once it is durable; a batch whose revision
    /// is below the last committed batch's is refused with [`StoreError::Fenced`] (an equal one
    /// is accepted). The registry calls it
    /// from its writer's own thread, one commit at a time, so an implementation may block that
    /// thread for its disk sync rather than hop to a blocking pool.
    async fn commit(&self, batch: Batch) -> Result<(), StoreError>;

    /// Visits every key in order and returns the revision of the last durable batch (0 when
    /// empty). Blocking: called once at start-up, off the async threads. A store that visits
    /// while it still reads may answer [`StoreError::Restart`]: what was visited is void, and
    /// a new load with a fresh visitor is the way on.
    fn load(&self, visit: &mut Visit<'_>) -> Result<Revision, StoreError>;

    /// Flushes and releases the store. Later commits fail.
    async fn close(&self) -> Result<(), StoreError>;

    /// Why the store cannot take writes right now (a full or failing disk, a backlog it cannot
    /// drain), or `None` when it can. Cheap; `/readyz` asks it on every probe.
    fn write_outage(&self) -> Option<String> {
        None
    }

    /// The revision of the last batch the store holds, read from the store itself, or `None`
    /// when only this process writes it (the registry knows). In a cluster the leader asks
    /// after a commit whose outcome it does not know (the store may have applied it and lost
    /// the answer); an error when the store cannot tell, or this writer may no longer write.
    async fn committed_revision(&self) -> Option<Result<Revision, StoreError>> {
        None
    }

    /// Every batch committed (by any writer sharing this store) after `revision`, in order, or
    /// `None` when the store has no feed (one process uses it). `revision` must be one this
    /// handle loaded, committed or delivered; any other answers [`FeedError::Compacted`].
    fn watch_from(&self, revision: Revision) -> Option<Feed> {
        let _ = revision;
        None
    }
}

/// Batches a [`MemStore`] keeps for its feed.
const MEM_FEED_HISTORY: usize = 1024;

/// A non-durable store for tests and `--store memory`. Can be told to fail, to test outages.
/// Its feed (the last [`MEM_FEED_HISTORY`] batches) lets several registries share one in
/// tests of cluster behaviour.
#[derive(Default)]
pub struct MemStore {
    data: Mutex<(Revision, BTreeMap<String, Vec<u8>>)>,
    failing: AtomicBool,
    closed: AtomicBool,
    feed: Mutex<MemFeed>,
}

#[derive(Default)]
struct MemFeed {
    history: std::collections::VecDeque<Change>,
    /// History at or below this revision is gone.
    compacted: Revision,
    watchers: Vec<tokio::sync::mpsc::Sender<Result<Change, FeedError>>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While `true`, every commit fails as if the disk were gone.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Opens it again after `close`, over the same data: what a restart of the process would
    /// find if memory survived it (tests of restarts use it).
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::SeqCst);
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
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::disk(
                "injected failure",
                std::io::Error::from(std::io::ErrorKind::StorageFull),
            ));
        }
        let watchers = {
            let mut guard = self.data.lock();
            let (rev, map) = &mut *guard;
            if batch.revision < *rev {
                return Err(StoreError::Fenced {
                    revision: batch.revision,
                    last: *rev,
                });
            }
            for m in &batch.mutations {
                match &m.value {
                    Some(v) => {
                        map.insert(m.key.clone(), v.clone());
                    }
                    None => {
                        map.remove(&m.key);
                    }
                }
            }
            *rev = batch.revision;
            // Under the data lock, so the history is in commit order.
            let change = Change {
                revision: batch.revision,
                mutations: batch.mutations,
                journal: batch.journal,
            };
            let mut feed = self.feed.lock();
            if feed.history.len() >= MEM_FEED_HISTORY {
                if let Some(old) = feed.history.pop_front() {
                    feed.compacted = old.revision;
                }
            }
            feed.history.push_back(change.clone());
            feed.watchers.retain(|w| !w.is_closed());
            feed.watchers
                .iter()
                .map(|w| (w.clone(), change.clone()))
                .collect::<Vec<_>>()
        };
        for (w, change) in watchers {
            // A watcher too slow for the channel is cut off with `Compacted` when it drains.
            if w.try_send(Ok(change)).is_err() {
                let _ = w.try_send(Err(FeedError::Compacted(0)));
            }
        }
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
        self.closed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn write_outage(&self) -> Option<String> {
        self.failing
            .load(Ordering::SeqCst)
            .then(|| "injected failure".to_string())
    }

    async fn committed_revision(&self) -> Option<Result<Revision, StoreError>> {
        Some(Ok(self.data.lock().0))
    }

    fn watch_from(&self, revision: Revision) -> Option<Feed> {
        let (tx, rx) = tokio::sync::mpsc::channel(MEM_FEED_HISTORY * 2);
        // The data lock orders this against commits: nothing is missed or sent twice.
        let _data = self.data.lock();
        let mut feed = self.feed.lock();
        if revision < feed.compacted {
            let _ = tx.try_send(Err(FeedError::Compacted(revision)));
            return Some(rx);
        }
        for c in feed.history.iter().filter(|c| c.revision > revision) {
            let _ = tx.try_send(Ok(c.clone()));
        }
        feed.watchers.push(tx);
        Some(rx)
    }
}

/// Behaviour every [`Store`] must show, run by each backend's own tests (one suite, every
/// backend): `conformance::run(|| MyHarness::new()).await`.
pub mod conformance;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// MemStore's data lives in the process: "reopening" it hands back the same store.
    struct MemHarness(Arc<MemStore>);

    #[async_trait::async_trait]
    impl conformance::Harness for MemHarness {
        async fn open(&mut self) -> Arc<dyn Store> {
            self.0.reopen();
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn mem_store_conforms() {
        conformance::run(|| MemHarness(Arc::new(MemStore::new()))).await;
    }

    /// The load hint must name exactly the prefix of the service's instance keys.
    #[test]
    fn a_service_record_names_its_instances_directory() {
        let svc = crate::model::ServiceKey::new("prod", "orders").unwrap();
        let dir = directory_of(&crate::codec::service_key(&svc)).unwrap();
        assert!(crate::codec::spec_key(&svc, "10.0.0.1:80").starts_with(&dir));
        assert!(crate::codec::status_key(&svc, "a").starts_with(&dir));
        assert_eq!(dir, "i/prod/orders/");
        assert!(!crate::codec::spec_key(
            &crate::model::ServiceKey::new("prod", "orders-2").unwrap(),
            "a"
        )
        .starts_with(&dir));
        assert_eq!(directory_of("i/prod/orders/x/spec"), None);
        assert_eq!(directory_of("s/prod"), None);
    }

    #[tokio::test]
    async fn mem_store_can_fail() {
        let s = MemStore::new();
        s.set_failing(true);
        assert!(s.commit(Batch::default()).await.is_err());
        assert!(s.write_outage().is_some());
        s.set_failing(false);
        assert!(s.commit(Batch::default()).await.is_ok());
        assert!(s.write_outage().is_none());
    }
}
