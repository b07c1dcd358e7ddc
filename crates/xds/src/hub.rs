//! The fan-out: one *slot* per service that at least one stream subscribes to, fed by one
//! blocking read of the registry (debounced), holding that service's resources encoded once
//! per version and shared by every stream; and the *catalog* of all services, kept only while
//! a wildcard (Envoy) stream wants it. Streams hold cursors (versions sent), never queues: a
//! slot change only wakes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use envoy_types::pb::google::protobuf::Any;
use parking_lot::{Mutex, RwLock};
use sextant_core::model::{Revision, ServiceKey};
use sextant_core::Registry;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::metrics::XdsMetrics;
use crate::resources::{self, ClientLocality, Endpoint, Kind};
use crate::status::ClientTable;

/// Longest single blocking read of a slot's feed; it simply starts another.
const FEED_WAIT: Duration = Duration::from_secs(300);
/// How often the catalog looks for new or vanished services while a wildcard stream wants it.
const CATALOG_PERIOD: Duration = Duration::from_millis(100);

/// Streams to wake, by stream id.
type Wakers = Mutex<HashMap<u64, Arc<Notify>>>;

/// One version of a service's content as xDS sees it.
pub(crate) struct Content {
    /// The service revision at which this content appeared: the EDS resource version.
    pub version: Revision,
    /// Whether the service has any instance: its listener and cluster exist only then.
    pub exists: bool,
    pub endpoints: Vec<Endpoint>,
    /// When the feed saw the change (before the debounce): push latency is measured from here.
    pub changed_at: Instant,
    /// The load assignment encoded once per client locality.
    encoded: Mutex<HashMap<ClientLocality, Any>>,
}

impl Content {
    fn new(version: Revision, exists: bool, endpoints: Vec<Endpoint>, at: Instant) -> Self {
        Self {
            version,
            exists,
            endpoints,
            changed_at: at,
            encoded: Mutex::new(HashMap::new()),
        }
    }

    /// The version of the resource of `kind` in this content; `None` when it does not exist
    /// (a listener or cluster of a service without instances). Listener, route and cluster
    /// never change for a name, so they are version 1 while they exist.
    fn version_of(&self, kind: Kind) -> Option<Revision> {
        match kind {
            Kind::Listener | Kind::Cluster => self.exists.then_some(1),
            Kind::Route => Some(1),
            Kind::Endpoint => Some(self.version),
        }
    }

    fn load_assignment(&self, name: &str, locality: &ClientLocality) -> Any {
        self.encoded
            .lock()
            .entry(locality.clone())
            .or_insert_with(|| {
                resources::any(&resources::load_assignment(name, &self.endpoints, locality))
            })
            .clone()
    }
}

/// A service some stream subscribes to.
pub(crate) struct Slot {
    pub key: ServiceKey,
    pub name: String,
    /// Listener, route and cluster never change for a name: encoded once.
    listener: Any,
    route: Any,
    cluster: Any,
    content: RwLock<Arc<Content>>,
    wakers: Wakers,
    feed: Mutex<Option<AbortHandle>>,
    slots: Weak<Mutex<HashMap<ServiceKey, Weak<Slot>>>>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Slot {
    pub fn content(&self) -> Arc<Content> {
        self.content.read().clone()
    }

    /// The resource of `kind` as a stream in `locality` should see it now, with its version;
    /// `None` when it does not exist (a listener or cluster of a service without instances).
    pub fn resource(&self, kind: Kind, locality: &ClientLocality) -> Option<(Revision, Any)> {
        let c = self.content();
        let version = c.version_of(kind)?;
        let any = match kind {
            Kind::Listener => self.listener.clone(),
            Kind::Cluster => self.cluster.clone(),
            Kind::Route => self.route.clone(),
            Kind::Endpoint => c.load_assignment(&self.name, locality),
        };
        Some((version, any))
    }

    /// The version `resource` would carry, without encoding anything.
    pub fn version(&self, kind: Kind) -> Option<Revision> {
        self.content.read().version_of(kind)
    }

    pub fn watch(&self, stream: u64, wake: Arc<Notify>) {
        self.wakers.lock().insert(stream, wake);
    }

    pub fn unwatch(&self, stream: u64) {
        self.wakers.lock().remove(&stream);
    }

    /// Installs a new version if what xDS carries changed, and wakes every stream.
    fn update(&self, revision: Revision, exists: bool, endpoints: Vec<Endpoint>, at: Instant) {
        {
            let mut cur = self.content.write();
            if cur.exists == exists && cur.endpoints == endpoints {
                return;
            }
            *cur = Arc::new(Content::new(revision, exists, endpoints, at));
        }
        for w in self.wakers.lock().values() {
            w.notify_one();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(h) = self.feed.lock().take() {
            h.abort();
        }
        if let Some(slots) = self.slots.upgrade() {
            let mut slots = slots.lock();
            if slots.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                slots.remove(&self.key);
            }
            self.gauge.set(slots.len() as i64);
        }
    }
}

/// The services that exist (have instances), by resource name, for wildcard subscriptions.
pub(crate) struct Catalog {
    registry: Registry,
    names: RwLock<Arc<BTreeMap<String, ServiceKey>>>,
    wakers: Wakers,
}

impl Catalog {
    pub fn names(&self) -> Arc<BTreeMap<String, ServiceKey>> {
        self.names.read().clone()
    }

    pub fn watch(&self, stream: u64, wake: Arc<Notify>) {
        let first = {
            let mut w = self.wakers.lock();
            w.insert(stream, wake);
            w.len() == 1
        };
        if first {
            // The refresh task idles while nobody watches: bring the list up to date now
            // rather than answer the first wildcard stream from an old one.
            self.refresh();
        }
    }

    pub fn unwatch(&self, stream: u64) {
        self.wakers.lock().remove(&stream);
    }

    /// Lists the services that have instances; wakes the watchers if that changed.
    fn refresh(&self) {
        let mut names = BTreeMap::new();
        for ns in self.registry.namespaces() {
            if ns.namespace.contains('.') {
                continue; // not addressable as {service}.{namespace}
            }
            for s in self.registry.services(&ns.namespace) {
                if s.instances > 0 {
                    names.insert(resources::name(&s.service), s.service);
                }
            }
        }
        if *self.names.read().as_ref() != names {
            *self.names.write() = Arc::new(names);
            for w in self.wakers.lock().values() {
                w.notify_one();
            }
        }
    }
}

/// What every ADS stream of a node shares.
pub(crate) struct Hub {
    pub registry: Registry,
    pub debounce: Duration,
    pub metrics: XdsMetrics,
    pub clients: ClientTable,
    pub catalog: Arc<Catalog>,
    slots: Arc<Mutex<HashMap<ServiceKey, Weak<Slot>>>>,
    next_stream: AtomicU64,
}

impl Hub {
    pub fn new(registry: Registry, debounce: Duration, metrics: XdsMetrics) -> Arc<Self> {
        let catalog = Arc::new(Catalog {
            registry: registry.clone(),
            names: RwLock::new(Arc::new(BTreeMap::new())),
            wakers: Mutex::new(HashMap::new()),
        });
        tokio::spawn(refresh_catalog(Arc::downgrade(&catalog)));
        Arc::new(Self {
            registry,
            debounce,
            metrics,
            clients: ClientTable::default(),
            catalog,
            slots: Arc::new(Mutex::new(HashMap::new())),
            next_stream: AtomicU64::new(1),
        })
    }

    pub fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// The slot of a service, created (with its current content and a feed) if no stream
    /// holds it yet.
    pub fn slot(&self, key: &ServiceKey) -> Arc<Slot> {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(key).and_then(Weak::upgrade) {
            return s;
        }
        let name = resources::name(key);
        let view = self.registry.get(key, false);
        let slot = Arc::new(Slot {
            key: key.clone(),
            listener: resources::any(&resources::listener(&name)),
            route: resources::any(&resources::route(&name)),
            cluster: resources::any(&resources::cluster(&name)),
            name,
            content: RwLock::new(Arc::new(Content::new(
                view.revision,
                !view.instances.is_empty(),
                resources::endpoints(&view),
                Instant::now(),
            ))),
            wakers: Mutex::new(HashMap::new()),
            feed: Mutex::new(None),
            slots: Arc::downgrade(&self.slots),
            gauge: self.metrics.slots.clone(),
        });
        let task = tokio::spawn(feed(
            self.registry.clone(),
            Arc::downgrade(&slot),
            key.clone(),
            view.revision,
            self.debounce,
        ));
        *slot.feed.lock() = Some(task.abort_handle());
        slots.insert(key.clone(), Arc::downgrade(&slot));
        self.metrics.slots.set(slots.len() as i64);
        slot
    }
}

/// Keeps one slot current: a blocking read per change, then the debounce (changes that come
/// in a burst become one push), then a fresh read.
async fn feed(
    registry: Registry,
    slot: Weak<Slot>,
    key: ServiceKey,
    mut seen: Revision,
    debounce: Duration,
) {
    loop {
        let view = registry
            .get_when_changed(&key, seen, FEED_WAIT, false)
            .await;
        if registry.is_closing() {
            return;
        }
        if view.revision == seen {
            continue;
        }
        let at = Instant::now();
        if !debounce.is_zero() {
            tokio::time::sleep(debounce).await;
        }
        let view = registry.get(&key, false);
        seen = view.revision;
        let Some(slot) = slot.upgrade() else { return };
        slot.update(
            view.revision,
            !view.instances.is_empty(),
            resources::endpoints(&view),
            at,
        );
    }
}

/// Refreshes the catalog whenever the registry's revision moved, while some wildcard stream
/// watches it.
async fn refresh_catalog(catalog: Weak<Catalog>) {
    let mut seen = None;
    loop {
        tokio::time::sleep(CATALOG_PERIOD).await;
        let Some(catalog) = catalog.upgrade() else {
            return;
        };
        if catalog.registry.is_closing() {
            return;
        }
        if catalog.wakers.lock().is_empty() {
            seen = None;
            continue;
        }
        let now = catalog.registry.revision();
        if seen != Some(now) {
            seen = Some(now);
            catalog.refresh();
        }
    }
}
