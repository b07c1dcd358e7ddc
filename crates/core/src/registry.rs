//! The registry: its in-memory snapshot, its single writer and its read paths.
//!
//! Writes go through one writer task, on a thread of its own. It drains whatever requests are
//! queued (group commit), applies them to copy-on-write copies of the touched services
//! (persistent maps, so a copy is O(1)), assigns each change the next revision, commits the
//! whole batch to the store, and only once that is durable publishes the new service states and
//! events and acknowledges the
//! callers. Readers never wait for the writer: they clone an `Arc` of a service's state.
//!
//! Publication happens under a brief write lock on the publish gate; anything that must see a
//! consistent cut across services (subscriptions, batch discovery) reads under its read side.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use sextant_model::{
    validate_instance_id, validate_registration, DeleteReason, Event, EventKind, Instance,
    InstanceStatus, Registration, Revision, ServiceConfig, ServiceKey, StatusPatch,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::codec;
use crate::delivery::SharedEvent;
use crate::lease::{LeaseKey, LeaseTable};
use crate::metrics::{CoreMetrics, EventLabels};
use crate::store::{Batch, Mutation, Store, StoreError};
use crate::{CoreConfig, CoreError, Subscription};

/// The state of one service at one revision. Immutable once published.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceState {
    pub revision: Revision,
    pub config: ServiceConfig,
    pub instances: imbl::OrdMap<Arc<str>, Instance>,
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
    fn new(key: ServiceKey, state: ServiceState) -> Self {
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
}

/// A service as discovery returns it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub service: ServiceKey,
    pub revision: Revision,
    pub config: ServiceConfig,
    /// Protection threshold tripped: every instance is returned even if `healthy_only`.
    pub protected: bool,
    pub instances: Vec<Instance>,
}

impl ServiceView {
    pub(crate) fn build(service: ServiceKey, state: &ServiceState, healthy_only: bool) -> Self {
        let total = state.instances.len();
        let serving = state.instances.values().filter(|i| i.is_serving()).count();
        let protected = state.config.protection_active(serving, total);
        let instances = state
            .instances
            .values()
            .filter(|i| !healthy_only || protected || i.is_serving())
            .cloned()
            .collect();
        Self {
            service,
            revision: state.revision,
            config: state.config.clone(),
            protected,
            instances,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    pub service: ServiceKey,
    pub revision: Revision,
    pub instances: usize,
    pub serving: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSummary {
    pub namespace: Arc<str>,
    pub services: usize,
    pub instances: usize,
}

/// Outcome of renewing one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatResult {
    Renewed,
    /// The instance exists and is persistent: nothing to renew.
    Persistent,
    /// No such instance: the client should register it again.
    Unknown,
}

/// One registry write.
// Registrations dominate and are moved once into the writer's queue; boxing them would add an
// allocation per write for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Op {
    Register(Registration),
    Deregister {
        service: ServiceKey,
        id: String,
    },
    Status {
        service: ServiceKey,
        id: String,
        patch: StatusPatch,
    },
    Configure {
        service: ServiceKey,
        config: ServiceConfig,
    },
    /// Internal: remove an instance whose lease lapsed, if it is still lapsed.
    Expire {
        service: ServiceKey,
        id: Arc<str>,
    },
}

impl Op {
    fn validate(&self) -> Result<(), CoreError> {
        match self {
            Op::Register(r) => validate_registration(r)?,
            Op::Deregister { id, .. } => validate_instance_id(id)?,
            Op::Status { id, patch, .. } => {
                validate_instance_id(id)?;
                patch.validate()?;
            }
            Op::Configure { config, .. } => config.validate()?,
            Op::Expire { .. } => {}
        }
        Ok(())
    }
}

type OpResult = Result<Revision, CoreError>;

struct WriteRequest {
    ops: Vec<Op>,
    reply: oneshot::Sender<Result<Vec<OpResult>, CoreError>>,
}

pub(crate) struct Shared {
    pub config: CoreConfig,
    pub services: RwLock<BTreeMap<ServiceKey, Arc<ServiceEntry>>>,
    pub publish_gate: RwLock<()>,
    pub published: AtomicU64,
    pub leases: LeaseTable,
    pub metrics: CoreMetrics,
    /// `Some(reason)` once shutdown began.
    pub closing: watch::Sender<Option<String>>,
    pub next_subscriber: AtomicU64,
    writes: mpsc::Sender<WriteRequest>,
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Shared {
    pub fn entry(&self, key: &ServiceKey) -> Option<Arc<ServiceEntry>> {
        self.services.read().get(key).cloned()
    }

    /// The entry for `key`, created empty if the service does not exist yet (subscribing to or
    /// waiting on a service before its first instance registers is normal).
    pub fn entry_or_create(&self, key: &ServiceKey) -> Arc<ServiceEntry> {
        if let Some(e) = self.entry(key) {
            return e;
        }
        self.services
            .write()
            .entry(key.clone())
            .or_insert_with(|| Arc::new(ServiceEntry::new(key.clone(), ServiceState::default())))
            .clone()
    }
}

/// Handle to the registry. Cheap to clone; all clones share one registry.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl Registry {
    /// Loads everything in `store` into memory and starts the writer and the lease sweeper.
    pub async fn open(
        store: Arc<dyn Store>,
        config: CoreConfig,
        metrics: CoreMetrics,
    ) -> Result<Registry, CoreError> {
        let started = std::time::Instant::now();
        let loader = store.clone();
        let (revision, states) = tokio::task::spawn_blocking(move || load(&*loader))
            .await
            .map_err(|e| StoreError::Io(format!("loader panicked: {e}")))??;

        let now = Instant::now();
        let leases = LeaseTable::default();
        let mut services = BTreeMap::new();
        let (mut n_instances, mut n_services) = (0usize, 0usize);
        for (key, state) in states {
            for inst in state.instances.values() {
                if inst.is_ephemeral() {
                    // Fresh grace period: one TTL from start-up.
                    leases.grant(
                        LeaseKey {
                            service: key.clone(),
                            id: inst.spec.id.as_str().into(),
                        },
                        inst.ttl_seconds,
                        now,
                    );
                }
            }
            n_instances += state.instances.len();
            n_services += usize::from(!state.instances.is_empty());
            services.insert(key.clone(), Arc::new(ServiceEntry::new(key, state)));
        }
        metrics.instances.set(n_instances as i64);
        metrics.services.set(n_services as i64);
        metrics.revision.set(revision as i64);
        tracing::info!(
            instances = n_instances,
            services = n_services,
            leases = leases.len(),
            revision,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "registry loaded from store"
        );

        let (tx, rx) = mpsc::channel(config.write_queue.max(1));
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            config,
            services: RwLock::new(services),
            publish_gate: RwLock::new(()),
            published: AtomicU64::new(revision),
            leases,
            metrics,
            closing: watch::Sender::new(None),
            next_subscriber: AtomicU64::new(1),
            writes: tx,
            stopped: Mutex::new(Some(stopped_rx)),
        });
        let writer = Writer {
            shared: shared.clone(),
            store,
            rx,
            revision,
        };
        // The writer gets a thread and a runtime of its own: on the shared runtime its wake-up
        // after each commit queued behind request handlers, which stretched every group-commit
        // cycle; here it runs as soon as its disk sync returns, and may block on it.
        if shared.config.writer_thread {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Io(format!("cannot start the writer's runtime: {e}")))?;
            std::thread::Builder::new()
                .name("sextant-writer".into())
                .spawn(move || runtime.block_on(writer.run(stopped_tx)))
                .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))?;
        } else {
            tokio::spawn(writer.run(stopped_tx));
        }
        // The guard is an argument, not a local of the task: a task dropped before its first
        // poll drops its arguments too.
        tokio::spawn(sweep_leases(
            Registry {
                shared: shared.clone(),
            },
            CloseOnDrop(shared.clone()),
        ));
        Ok(Registry { shared })
    }

    /// Applies `ops` in order; each gets its own result. Returns once they are durable.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, CoreError> {
        for op in &ops {
            op.validate()?;
        }
        if self.shared.closing.borrow().is_some() {
            return Err(CoreError::ShuttingDown);
        }
        let (reply, rx) = oneshot::channel();
        self.shared
            .writes
            .send(WriteRequest { ops, reply })
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)?
    }

    async fn apply_one(&self, op: Op) -> Result<Revision, CoreError> {
        self.apply(vec![op])
            .await?
            .pop()
            .unwrap_or(Err(CoreError::ShuttingDown))
    }

    pub async fn register(&self, r: Registration) -> Result<Revision, CoreError> {
        self.apply_one(Op::Register(r)).await
    }

    pub async fn deregister(&self, service: ServiceKey, id: String) -> Result<Revision, CoreError> {
        self.apply_one(Op::Deregister { service, id }).await
    }

    pub async fn update_status(
        &self,
        service: ServiceKey,
        id: String,
        patch: StatusPatch,
    ) -> Result<Revision, CoreError> {
        self.apply_one(Op::Status { service, id, patch }).await
    }

    pub async fn configure(
        &self,
        service: ServiceKey,
        config: ServiceConfig,
    ) -> Result<Revision, CoreError> {
        self.apply_one(Op::Configure { service, config }).await
    }

    /// Renews leases. In memory only: a heartbeat costs no disk write.
    pub fn heartbeat(&self, items: &[(ServiceKey, String)]) -> Vec<HeartbeatResult> {
        let now = Instant::now();
        items
            .iter()
            .map(|(service, id)| {
                let key = LeaseKey {
                    service: service.clone(),
                    id: id.as_str().into(),
                };
                if self.shared.leases.renew(&key, now) {
                    HeartbeatResult::Renewed
                } else if self
                    .shared
                    .entry(service)
                    .is_some_and(|e| e.state().instances.contains_key(id.as_str()))
                {
                    HeartbeatResult::Persistent
                } else {
                    HeartbeatResult::Unknown
                }
            })
            .collect()
    }

    /// The current state of a service; an unknown service is empty at revision 0.
    pub fn get(&self, service: &ServiceKey, healthy_only: bool) -> ServiceView {
        match self.shared.entry(service) {
            Some(e) => ServiceView::build(service.clone(), &e.state(), healthy_only),
            None => ServiceView::build(service.clone(), &ServiceState::default(), healthy_only),
        }
    }

    /// A service's settings (the defaults for an unknown service), without copying its instances.
    pub fn service_config(&self, service: &ServiceKey) -> ServiceConfig {
        self.shared
            .entry(service)
            .map(|e| e.state().config.clone())
            .unwrap_or_default()
    }

    /// The revision of a service's last change (0 for an unknown service).
    pub fn service_revision(&self, service: &ServiceKey) -> Revision {
        self.shared
            .entry(service)
            .map(|e| e.state().revision)
            .unwrap_or(0)
    }

    /// One instance by id, without copying the service.
    pub fn instance(&self, service: &ServiceKey, id: &str) -> Option<Instance> {
        self.shared
            .entry(service)
            .and_then(|e| e.state().instances.get(id).cloned())
    }

    /// The first instance of a service (in id order) that `pred` accepts, without copying the
    /// service.
    pub fn find_instance(
        &self,
        service: &ServiceKey,
        pred: impl Fn(&Instance) -> bool,
    ) -> Option<Instance> {
        self.shared
            .entry(service)
            .and_then(|e| e.state().instances.values().find(|i| pred(i)).cloned())
    }

    /// Waits until the service's revision exceeds `index` or `wait` passes, then returns it.
    pub async fn get_when_changed(
        &self,
        service: &ServiceKey,
        index: Revision,
        wait: Duration,
        healthy_only: bool,
    ) -> ServiceView {
        let entry = self.shared.entry_or_create(service);
        let mut rx = entry.changed.subscribe();
        let mut closing = self.shared.closing.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|r| *r > index)) => {}
            _ = closing.wait_for(|c| c.is_some()) => {}
        }
        ServiceView::build(service.clone(), &entry.state(), healthy_only)
    }

    /// Several services in one consistent cut, with the revision of that cut (everything up to
    /// it is reflected, so it is a safe index for a following blocking query).
    pub fn discover(
        &self,
        services: &[ServiceKey],
        healthy_only: bool,
    ) -> (Revision, Vec<ServiceView>) {
        let _cut = self.shared.publish_gate.read();
        let revision = self.shared.published.load(Ordering::Acquire);
        let views = services.iter().map(|s| self.get(s, healthy_only)).collect();
        (revision, views)
    }

    pub fn namespaces(&self) -> Vec<NamespaceSummary> {
        let mut out: Vec<NamespaceSummary> = Vec::new();
        for (key, entry) in self.shared.services.read().iter() {
            let n = entry.state().instances.len();
            if n == 0 {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.namespace == key.namespace => {
                    last.services += 1;
                    last.instances += n;
                }
                _ => out.push(NamespaceSummary {
                    namespace: key.namespace.clone(),
                    services: 1,
                    instances: n,
                }),
            }
        }
        out
    }

    /// Services of a namespace that have instances or settings, in name order.
    pub fn services(&self, namespace: &str) -> Vec<ServiceSummary> {
        let services = self.shared.services.read();
        services
            .iter()
            .filter(|(k, _)| &*k.namespace == namespace)
            .filter_map(|(k, e)| {
                let st = e.state();
                if st.instances.is_empty() && st.config == ServiceConfig::default() {
                    return None;
                }
                Some(ServiceSummary {
                    service: k.clone(),
                    revision: st.revision,
                    instances: st.instances.len(),
                    serving: st.instances.values().filter(|i| i.is_serving()).count(),
                })
            })
            .collect()
    }

    /// Services with an active health check, with their current revision and check: what
    /// the health scanner reconciles against.
    pub fn checked_services(&self) -> Vec<(ServiceKey, Revision, sextant_model::HealthCheck)> {
        self.shared
            .services
            .read()
            .iter()
            .filter_map(|(k, e)| {
                let st = e.state();
                st.config
                    .check
                    .is_active()
                    .then(|| (k.clone(), st.revision, st.config.check.clone()))
            })
            .collect()
    }

    /// The latest published revision.
    pub fn revision(&self) -> Revision {
        self.shared.published.load(Ordering::Acquire)
    }

    pub fn metrics(&self) -> &CoreMetrics {
        &self.shared.metrics
    }

    /// Subscribes to `services`. The first delivery is a snapshot, or, with `since`, exactly
    /// the events after `since` (a snapshot of any service whose history was compacted).
    pub fn subscribe(&self, services: Vec<ServiceKey>, since: Option<Revision>) -> Subscription {
        Subscription::new(self.shared.clone(), services, since)
    }

    /// Resolves once shutdown has begun; background tasks stop on it.
    pub async fn closed(&self) {
        let mut rx = self.shared.closing.subscribe();
        let _ = rx.wait_for(|c| c.is_some()).await;
    }

    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.shared.closing.borrow().is_some()
    }

    /// Stops accepting writes, commits what is queued, closes the store and ends every
    /// subscription with `reason`.
    pub async fn shutdown(&self, reason: &str) {
        self.shared.closing.send_replace(Some(reason.to_string()));
        let stopped = self.shared.stopped.lock().take();
        if let Some(rx) = stopped {
            let _ = rx.await;
        }
    }
}

/// Reads the store into per-service states. Runs on a blocking thread.
fn load(store: &dyn Store) -> Result<(Revision, BTreeMap<ServiceKey, ServiceState>), StoreError> {
    let mut states: BTreeMap<ServiceKey, ServiceState> = BTreeMap::new();
    let mut pending: Option<(ServiceKey, codec::SpecRecord)> = None;
    fn put(states: &mut BTreeMap<ServiceKey, ServiceState>, key: ServiceKey, inst: Instance) {
        let st = states.entry(key).or_default();
        st.revision = st.revision.max(inst.revision());
        st.instances.insert(inst.spec.id.as_str().into(), inst);
    }
    fn flush(
        states: &mut BTreeMap<ServiceKey, ServiceState>,
        pending: &mut Option<(ServiceKey, codec::SpecRecord)>,
        status: Option<codec::StatusRecord>,
    ) {
        if let Some((key, rec)) = pending.take() {
            let (status, status_revision) = match status {
                Some(s) => (s.status, s.status_revision),
                None => (Default::default(), rec.spec_revision),
            };
            let inst = Instance {
                spec: Arc::new(rec.spec),
                status,
                ttl_seconds: rec.ttl_seconds,
                spec_revision: rec.spec_revision,
                status_revision,
            };
            put(states, key, inst);
        }
    }
    let revision = store.load(&mut |key, value| {
        match codec::parse_key(key)? {
            codec::Key::Spec(svc, id) => {
                flush(&mut states, &mut pending, None);
                let rec = codec::decode_spec(key, value)?;
                if rec.spec.id != id {
                    return Err(StoreError::Corrupt {
                        key: key.to_string(),
                        reason: format!("holds instance {:?}", rec.spec.id),
                    });
                }
                pending = Some((svc, rec));
            }
            codec::Key::Status(svc, id) => {
                let matches = pending
                    .as_ref()
                    .is_some_and(|(k, r)| *k == svc && r.spec.id == id);
                if matches {
                    let rec = codec::decode_status(key, value)?;
                    flush(&mut states, &mut pending, Some(rec));
                } else {
                    tracing::warn!(key, "status without a spec in the store; ignored");
                }
            }
            codec::Key::Service(svc) => {
                let rec = codec::decode_service(key, value)?;
                let st = states.entry(svc).or_default();
                st.config = rec.config;
                st.revision = st.revision.max(rec.revision);
            }
        }
        Ok(())
    })?;
    flush(&mut states, &mut pending, None);
    Ok((revision, states))
}

enum LeaseAction {
    Grant(LeaseKey, u32),
    Revoke(LeaseKey),
}

/// Work of one group commit, built before anything is published.
#[derive(Default)]
struct Pending {
    states: HashMap<ServiceKey, (Arc<ServiceEntry>, ServiceState)>,
    mutations: Vec<Mutation>,
    events: Vec<Event>,
    leases: Vec<LeaseAction>,
    instance_delta: i64,
}

struct Writer {
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    rx: mpsc::Receiver<WriteRequest>,
    /// Last revision assigned and durable.
    revision: Revision,
}

impl Writer {
    async fn run(mut self, stopped: oneshot::Sender<()>) {
        let mut closing = self.shared.closing.subscribe();
        loop {
            let first = tokio::select! {
                biased;
                r = self.rx.recv() => r,
                _ = closing.wait_for(|c| c.is_some()) => None,
            };
            let Some(first) = first else { break };
            let batch = self.drain(first);
            self.commit(batch).await;
        }
        // Commit what was accepted before shutdown, then close the store.
        self.rx.close();
        while let Ok(first) = self.rx.try_recv() {
            let batch = self.drain(first);
            self.commit(batch).await;
        }
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "closing the store failed");
        }
        tracing::info!(revision = self.revision, "registry writer stopped");
        let _ = stopped.send(());
    }

    fn drain(&mut self, first: WriteRequest) -> Vec<WriteRequest> {
        let mut n = first.ops.len();
        let mut batch = vec![first];
        while n < self.shared.config.max_batch_ops {
            match self.rx.try_recv() {
                Ok(r) => {
                    n += r.ops.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        batch
    }

    async fn commit(&mut self, requests: Vec<WriteRequest>) {
        let mut p = Pending::default();
        let mut next = self.revision + 1;
        let now = Instant::now();
        let mut results = Vec::with_capacity(requests.len());
        for req in &requests {
            let r: Vec<OpResult> = req
                .ops
                .iter()
                .map(|op| self.apply(op, &mut p, &mut next, now))
                .collect();
            results.push(r);
        }
        let last = next - 1;
        let n_ops: usize = requests.iter().map(|r| r.ops.len()).sum();
        // Every service that changed gets its record rewritten with its new revision.
        for (key, (entry, st)) in &p.states {
            if st.revision > entry.state().revision {
                let rec = codec::ServiceRecord {
                    revision: st.revision,
                    config: st.config.clone(),
                };
                p.mutations.push(Mutation {
                    key: codec::service_key(key),
                    value: Some(codec::encode_service(&rec)),
                });
            }
        }

        if !p.mutations.is_empty() {
            let started = std::time::Instant::now();
            let batch = Batch {
                revision: last,
                mutations: std::mem::take(&mut p.mutations),
            };
            if let Err(e) = self.store.commit(batch).await {
                tracing::error!(error = %e, ops = n_ops, "store commit failed; writes not acknowledged");
                self.shared.metrics.commit_failures.inc();
                let msg = e.to_string();
                for req in requests {
                    let _ = req
                        .reply
                        .send(Err(CoreError::Store(StoreError::Unavailable(msg.clone()))));
                }
                return;
            }
            let m = &self.shared.metrics;
            m.commit_seconds.observe(started.elapsed().as_secs_f64());
            m.commit_batch_ops.observe(n_ops as f64);
            self.revision = last;
            self.publish(&mut p, now);
        }
        // Lease changes apply even when nothing was written: an identical re-registration
        // renews its lease, and an expiry that found no instance drops the stale lease.
        for a in p.leases {
            match a {
                LeaseAction::Grant(k, ttl) => self.shared.leases.grant(k, ttl, now),
                LeaseAction::Revoke(k) => self.shared.leases.revoke(&k),
            }
        }
        for (req, r) in requests.into_iter().zip(results) {
            let _ = req.reply.send(Ok(r));
        }
    }

    fn publish(&self, p: &mut Pending, now: Instant) {
        let mut by_service: HashMap<ServiceKey, Vec<Arc<SharedEvent>>> = HashMap::new();
        let m = &self.shared.metrics;
        for ev in std::mem::take(&mut p.events) {
            m.events
                .get_or_create(&EventLabels {
                    kind: ev.kind.name(),
                })
                .inc();
            by_service
                .entry(ev.service.clone())
                .or_default()
                .push(Arc::new(SharedEvent::new(ev, now)));
        }
        let cap = self.shared.config.event_log_per_service.max(1);
        let mut touched = Vec::with_capacity(p.states.len());
        let mut services_delta = 0i64;
        {
            let _gate = self.shared.publish_gate.write();
            for (key, (entry, state)) in std::mem::take(&mut p.states) {
                let mut inner = entry.inner.write();
                let was_empty = inner.state.instances.is_empty();
                services_delta += i64::from(was_empty) - i64::from(state.instances.is_empty());
                let rev = state.revision;
                inner.state = Arc::new(state);
                for ev in by_service.remove(&key).unwrap_or_default() {
                    if inner.log.len() >= cap {
                        if let Some(old) = inner.log.pop_front() {
                            inner.compacted_through = old.event.revision;
                        }
                    }
                    inner.log.push_back(ev);
                }
                drop(inner);
                touched.push((entry, rev));
            }
            self.shared
                .published
                .store(self.revision, Ordering::Release);
        }
        for (entry, rev) in touched {
            entry.changed.send_replace(rev);
            for n in entry.subscribers.lock().values() {
                n.notify_one();
            }
        }
        m.instances.inc_by(p.instance_delta);
        m.services.inc_by(services_delta);
        m.revision.set(self.revision as i64);
    }

    fn state<'a>(&self, p: &'a mut Pending, key: &ServiceKey) -> &'a mut ServiceState {
        let (_, st) = p.states.entry(key.clone()).or_insert_with(|| {
            let entry = self.shared.entry_or_create(key);
            let st = (*entry.state()).clone();
            (entry, st)
        });
        st
    }

    fn apply(&self, op: &Op, p: &mut Pending, next: &mut Revision, now: Instant) -> OpResult {
        let rev = *next;
        let event = match op {
            Op::Register(r) => {
                let st = self.state(p, &r.service);
                let id: Arc<str> = r.spec.id.as_str().into();
                let lease_key = LeaseKey {
                    service: r.service.clone(),
                    id: id.clone(),
                };
                let lease = if r.ttl_seconds > 0 {
                    LeaseAction::Grant(lease_key, r.ttl_seconds)
                } else {
                    LeaseAction::Revoke(lease_key)
                };
                let old = st.instances.get(&id).cloned();
                // A registration sets what the instance reports about itself and ends a
                // drain (the instance came back); the operator's weight override stays.
                let status = match (&r.status, &old) {
                    (Some(given), Some(o)) => InstanceStatus {
                        weight_override: o.status.weight_override,
                        draining_since_ms: None,
                        ..*given
                    },
                    (Some(given), None) => *given,
                    (None, Some(o)) => InstanceStatus {
                        draining_since_ms: None,
                        ..o.status
                    },
                    (None, None) => InstanceStatus::default(),
                };
                let (kind, inst) = match old {
                    Some(old) if *old.spec == r.spec && old.ttl_seconds == r.ttl_seconds => {
                        if old.status == status {
                            // Re-registration of an identical instance: renews, changes nothing.
                            p.leases.push(lease);
                            return Ok(old.revision());
                        }
                        let inst = Instance {
                            status,
                            status_revision: rev,
                            ..old
                        };
                        p.mutations.push(Mutation {
                            key: codec::status_key(&r.service, &id),
                            value: Some(codec::encode_status(status, rev)),
                        });
                        let kind = EventKind::Status {
                            id: r.spec.id.to_string(),
                            status,
                        };
                        (kind, inst)
                    }
                    old => {
                        let status_changed = old.as_ref().is_none_or(|o| o.status != status);
                        if old.is_none() {
                            p.instance_delta += 1;
                        }
                        let inst = Instance {
                            spec: Arc::new(r.spec.clone()),
                            status,
                            ttl_seconds: r.ttl_seconds,
                            spec_revision: rev,
                            status_revision: match &old {
                                Some(o) if !status_changed => o.status_revision,
                                _ => rev,
                            },
                        };
                        p.mutations.push(Mutation {
                            key: codec::spec_key(&r.service, &id),
                            value: Some(codec::encode_spec(&inst.spec, r.ttl_seconds, rev)),
                        });
                        if status_changed {
                            p.mutations.push(Mutation {
                                key: codec::status_key(&r.service, &id),
                                value: Some(codec::encode_status(status, rev)),
                            });
                        }
                        (EventKind::Upsert(inst.clone()), inst)
                    }
                };
                let st = self.state(p, &r.service);
                st.instances.insert(id, inst);
                st.revision = rev;
                p.leases.push(lease);
                Event {
                    revision: rev,
                    service: r.service.clone(),
                    kind,
                }
            }
            Op::Deregister { service, id } => {
                self.remove(p, service, id, rev, DeleteReason::Deregistered)?
            }
            Op::Expire { service, id } => {
                let key = LeaseKey {
                    service: service.clone(),
                    id: id.clone(),
                };
                if !self.shared.leases.is_expired(&key, now) {
                    return Ok(0); // renewed meanwhile
                }
                match self.remove(p, service, id, rev, DeleteReason::LeaseExpired) {
                    Ok(ev) => {
                        self.shared.metrics.lease_expiries.inc();
                        tracing::info!(service = %service, id = &**id, "lease expired; instance removed");
                        ev
                    }
                    Err(_) => {
                        p.leases.push(LeaseAction::Revoke(key));
                        return Ok(0);
                    }
                }
            }
            Op::Status { service, id, patch } => {
                let st = self.state(p, service);
                let Some(old) = st.instances.get(id.as_str()).cloned() else {
                    return Err(CoreError::NotFound(format!("instance {service}/{id}")));
                };
                let status = old.status.patched(patch, now_ms());
                if status == old.status {
                    return Ok(old.revision());
                }
                st.instances.insert(
                    id.as_str().into(),
                    Instance {
                        status,
                        status_revision: rev,
                        ..old
                    },
                );
                st.revision = rev;
                p.mutations.push(Mutation {
                    key: codec::status_key(service, id),
                    value: Some(codec::encode_status(status, rev)),
                });
                Event {
                    revision: rev,
                    service: service.clone(),
                    kind: EventKind::Status {
                        id: id.clone(),
                        status,
                    },
                }
            }
            Op::Configure { service, config } => {
                let st = self.state(p, service);
                if st.config == *config {
                    return Ok(st.revision);
                }
                st.config = config.clone();
                st.revision = rev;
                // Settings change discovery answers (protection, checks) but no instance: no
                // event, yet the revision moves so blocking queries wake.
                *next += 1;
                return Ok(rev);
            }
        };
        p.events.push(event);
        *next += 1;
        Ok(rev)
    }

    fn remove(
        &self,
        p: &mut Pending,
        service: &ServiceKey,
        id: &str,
        rev: Revision,
        reason: DeleteReason,
    ) -> Result<Event, CoreError> {
        let st = self.state(p, service);
        if st.instances.remove(id).is_none() {
            return Err(CoreError::NotFound(format!("instance {service}/{id}")));
        }
        st.revision = rev;
        p.instance_delta -= 1;
        p.mutations.push(Mutation {
            key: codec::spec_key(service, id),
            value: None,
        });
        p.mutations.push(Mutation {
            key: codec::status_key(service, id),
            value: None,
        });
        p.leases.push(LeaseAction::Revoke(LeaseKey {
            service: service.clone(),
            id: id.into(),
        }));
        Ok(Event {
            revision: rev,
            service: service.clone(),
            kind: EventKind::Delete {
                id: id.to_string(),
                reason,
            },
        })
    }
}

/// Wall-clock time for drain stamps (leases use tokio's monotonic clock instead).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Closes the registry when dropped without a shutdown — when the runtime that runs the sweeper
/// goes away — so the writer thread commits what is queued, closes the store and ends, as its
/// task would have ended with that runtime.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.closing.send_if_modified(|c| {
            if c.is_some() {
                return false;
            }
            *c = Some("the registry's runtime stopped".into());
            true
        });
    }
}

async fn sweep_leases(registry: Registry, _close: CloseOnDrop) {
    let shared = registry.shared.clone();
    let mut closing = shared.closing.subscribe();
    let mut tick = tokio::time::interval(shared.config.lease_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = closing.wait_for(|c| c.is_some()) => return,
        }
        let expired = shared.leases.expired(Instant::now());
        for chunk in expired.chunks(shared.config.max_batch_ops.max(1)) {
            let ops = chunk
                .iter()
                .map(|k| Op::Expire {
                    service: k.service.clone(),
                    id: k.id.clone(),
                })
                .collect();
            if let Err(e) = registry.apply(ops).await {
                tracing::warn!(error = %e, "could not remove expired instances; will retry");
                break;
            }
        }
    }
}
