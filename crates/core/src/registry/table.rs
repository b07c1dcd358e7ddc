//! The service table: every service the registry holds in memory, and when an entry may go.
//!
//! An entry exists while its service has instances or settings, or while someone holds it: a
//! subscription, a blocking query, the writer in the middle of a batch. A *vacant* entry (no
//! instances, default settings) that nobody holds is removed — after `vacant_retention` if a
//! write emptied it, so a watcher that reconnects soon after still resumes from its log — so asking for made-up names
//! cannot grow memory. Holders give their reference back through [`ServiceTable::release`],
//! which removes the entry at once when it was the last; a periodic [`ServiceTable::sweep`]
//! catches the rest (a reader's short-lived clone can make a release miss its moment).
//!
//! Removing an entry forgets its change log and revision. A service the table does not hold
//! reads as vacant at the highest revision any removed entry carried (`forgotten`; after a
//! restart, the store's revision), and a later entry of that name starts there, its log
//! compacted through it: a subscriber resuming from before gets a snapshot rather than
//! silently missing the delete that emptied the service, and a blocking query's index taken
//! from the removed entry never goes backwards.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use sextant_model::{Instance, Revision, ServiceConfig, ServiceKey};
use tokio::sync::{watch, Notify};

use crate::delivery::SharedEvent;

/// The state of one service at one revision. Immutable once published.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceState {
    pub revision: Revision,
    pub config: ServiceConfig,
    pub instances: imbl::OrdMap<Arc<str>, Instance>,
}

impl ServiceState {
    /// No instances and default settings: nothing worth keeping once nobody looks at it.
    pub fn is_vacant(&self) -> bool {
        self.instances.is_empty() && self.config == ServiceConfig::default()
    }
}

pub(crate) struct ServiceInner {
    pub state: Arc<ServiceState>,
    /// Recent events of this service, oldest first, bounded by the configured size.
    pub log: VecDeque<Arc<SharedEvent>>,
    /// Events at or below this revision may be missing from `log`: a cursor below it cannot
    /// resume from the log and gets a snapshot instead.
    pub compacted_through: Revision,
}

/// One service: its published state, change log, subscribers and change signal.
pub(crate) struct ServiceEntry {
    pub key: ServiceKey,
    pub inner: RwLock<ServiceInner>,
    pub subscribers: Mutex<HashMap<u64, Arc<Notify>>>,
    pub changed: watch::Sender<Revision>,
}

impl ServiceEntry {
    /// An entry whose history is complete after its state's revision.
    pub fn new(key: ServiceKey, state: ServiceState) -> Self {
        let rev = state.revision;
        Self {
            key,
            inner: RwLock::new(ServiceInner {
                state: Arc::new(state),
                log: VecDeque::new(),
                compacted_through: rev,
            }),
            subscribers: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(rev),
        }
    }

    pub fn state(&self) -> Arc<ServiceState> {
        self.inner.read().state.clone()
    }

    /// Vacant, and no change of it is recent enough that a watcher may still resume across it
    /// (one that emptied the service a moment ago is kept `retention` long).
    fn is_removable(&self, retention: Duration) -> bool {
        let inner = self.inner.read();
        inner.state.is_vacant()
            && inner
                .log
                .back()
                .is_none_or(|e| e.published_at.elapsed() >= retention)
    }
}

pub(crate) struct ServiceTable {
    map: RwLock<BTreeMap<ServiceKey, Arc<ServiceEntry>>>,
    /// How long a service emptied by a write keeps its log for watchers that resume.
    retention: Duration,
    /// Highest revision a removed entry (or, after a restart, any entry) may have had history
    /// up to; new entries start compacted through it.
    forgotten: AtomicU64,
}

impl ServiceTable {
    /// A table of loaded services; `forgotten` is the store's revision, since history before a
    /// restart is gone for names that were not loaded as well.
    pub fn new(
        map: BTreeMap<ServiceKey, Arc<ServiceEntry>>,
        forgotten: Revision,
        retention: Duration,
    ) -> Self {
        Self {
            map: RwLock::new(map),
            retention,
            forgotten: AtomicU64::new(forgotten),
        }
    }

    pub fn get(&self, key: &ServiceKey) -> Option<Arc<ServiceEntry>> {
        self.map.read().get(key).cloned()
    }

    /// The entry for `key`, created empty if the service does not exist yet (subscribing to or
    /// waiting on a service before its first instance registers is normal). The caller gives
    /// it back with [`ServiceTable::release`] (or holds it in a [`Held`]).
    pub fn get_or_create(&self, key: &ServiceKey) -> Arc<ServiceEntry> {
        if let Some(e) = self.get(key) {
            return e;
        }
        let mut map = self.map.write();
        map.entry(key.clone())
            .or_insert_with(|| Arc::new(ServiceEntry::new(key.clone(), self.unknown())))
            .clone()
    }

    /// Like [`ServiceTable::get_or_create`], released when the guard drops (also when the
    /// future holding it is cancelled).
    pub fn hold(&self, key: &ServiceKey) -> Held<'_> {
        Held {
            table: self,
            entry: Some(self.get_or_create(key)),
        }
    }

    /// Gives back a reference taken with `get_or_create`; removes the entry if it is vacant
    /// and this was the last reference outside the table.
    pub fn release(&self, entry: Arc<ServiceEntry>) {
        if !entry.is_removable(self.retention) {
            return;
        }
        let mut map = self.map.write();
        // Under the write lock nobody can take a new reference from the table, and every
        // release drops its reference inside it, so the count is exact: the table's and ours.
        let ours = map.get(&entry.key).is_some_and(|e| Arc::ptr_eq(e, &entry));
        if ours && Arc::strong_count(&entry) == 2 && entry.is_removable(self.retention) {
            map.remove(&entry.key);
            self.forget(&entry);
        }
        drop(entry);
    }

    /// Removes every vacant entry nobody holds; returns how many went.
    pub fn sweep(&self) -> usize {
        let unused =
            |e: &Arc<ServiceEntry>| Arc::strong_count(e) == 1 && e.is_removable(self.retention);
        let candidates: Vec<ServiceKey> = self
            .map
            .read()
            .iter()
            .filter(|(_, e)| unused(e))
            .map(|(k, _)| k.clone())
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        let mut map = self.map.write();
        let mut removed = 0;
        for key in candidates {
            if map.get(&key).is_some_and(unused) {
                if let Some(e) = map.remove(&key) {
                    self.forget(&e);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The state of a service the table does not hold: vacant, at the highest revision a
    /// removed entry had. Nothing changed in it after that revision, so an index or cursor
    /// taken from a removed entry never goes backwards, and one from before it is answered
    /// with a snapshot.
    pub fn unknown(&self) -> ServiceState {
        ServiceState {
            revision: self.forgotten.load(Ordering::Acquire),
            ..Default::default()
        }
    }

    fn forget(&self, entry: &ServiceEntry) {
        self.forgotten
            .fetch_max(entry.state().revision, Ordering::AcqRel);
    }

    /// History at or below `revision` is gone for every name (a resync from the store).
    pub fn forget_through(&self, revision: Revision) {
        self.forgotten.fetch_max(revision, Ordering::AcqRel);
    }

    /// Entries in memory, vacant ones included.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Read access in key order, for listings.
    pub fn read(&self) -> RwLockReadGuard<'_, BTreeMap<ServiceKey, Arc<ServiceEntry>>> {
        self.map.read()
    }
}

/// A reference to an entry that is released when dropped.
pub(crate) struct Held<'a> {
    table: &'a ServiceTable,
    entry: Option<Arc<ServiceEntry>>,
}

impl std::ops::Deref for Held<'_> {
    type Target = ServiceEntry;
    fn deref(&self) -> &ServiceEntry {
        // Present from construction until drop.
        self.entry.as_deref().expect("held entry")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.entry.take() {
            self.table.release(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("ns", name).unwrap()
    }

    #[test]
    fn a_vacant_entry_goes_with_its_last_holder() {
        let t = ServiceTable::new(BTreeMap::new(), 0, Duration::ZERO);
        let a = t.get_or_create(&key("a"));
        let b = t.get_or_create(&key("a"));
        assert_eq!(t.len(), 1);
        t.release(a);
        assert_eq!(t.len(), 1, "still held by b");
        t.release(b);
        assert_eq!(t.len(), 0);
        {
            let _held = t.hold(&key("c"));
            assert_eq!(t.len(), 1);
        }
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn sweep_removes_only_unheld_vacant_entries_and_remembers_their_revision() {
        let t = ServiceTable::new(BTreeMap::new(), 0, Duration::ZERO);
        let held = t.get_or_create(&key("held"));
        // A reference dropped without release (a reader's clone) leaves the entry behind.
        drop(t.get_or_create(&key("dropped")));
        let full = t.get_or_create(&key("full"));
        full.inner.write().state = Arc::new(ServiceState {
            revision: 7,
            config: ServiceConfig {
                protect_threshold: 0.5,
                ..Default::default()
            },
            ..Default::default()
        });
        drop(full);
        let emptied = t.get_or_create(&key("emptied"));
        emptied.inner.write().state = Arc::new(ServiceState {
            revision: 9,
            ..Default::default()
        });
        drop(emptied);
        assert_eq!(t.len(), 4);
        assert_eq!(t.sweep(), 2);
        assert!(t.get(&key("held")).is_some());
        assert!(t.get(&key("full")).is_some());
        // A new entry of a removed name cannot serve history from before the removal.
        let again = t.get_or_create(&key("emptied"));
        assert_eq!(again.inner.read().compacted_through, 9);
        assert_eq!(again.state().revision, 9);
        assert_eq!(t.unknown().revision, 9);
        t.release(held);
    }
}
