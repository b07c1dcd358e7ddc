//! The registry's API: opening it, the write operations callers send to the writer, and the
//! read paths.
//!
//! Writes go through one writer (`writer`), on a thread of its own; readers never wait for
//! it: they clone an `Arc` of a service's published state from the service table (`table`).
//! Publication happens under a brief write lock on the publish gate; anything that must see a
//! consistent cut across services (subscriptions, batch discovery) reads under its read side.
//! `load` rebuilds the states from the store at start-up; the background task here expires
//! leases and sweeps vacant services out of memory.
//!
//! **Roles** (cluster mode, a store with a feed): a node is the [`Role::Leader`], whose writer
//! commits, or a [`Role::Follower`], whose writer refuses writes ([`CoreError::NotLeader`])
//! and instead applies the store's feed through the same publish path, so its watchers,
//! blocking queries and adapters see every change at the leader's revisions. Who leads is
//! decided outside the core (an election in the store's adapter) and told to the registry
//! through [`Registry::follow`] and [`Registry::lead`].
//!
//! **Store outages** (the store cannot take writes: etcd down, or this node cut off from it).
//! Reads and watches go on from memory. No lease expires: the sweeper does not expire while
//! the store reports an outage (an expiry could not be written anyway), and when the outage
//! ends every lease gets a fresh TTL, so clients whose heartbeats could not be counted are not
//! removed in one sweep. A follower while the store is unreachable (a leader whose election
//! lease lapsed in the outage steps down: without its fence a write could interleave with a
//! new leader's) *holds*: it answers heartbeats from memory (nothing can expire anywhere while
//! no leader can write, and the next leader gives every ephemeral instance a fresh TTL when it
//! takes over) and, once it knows no leader, refuses writes as the store's outage, a 503
//! naming the store.
//! **Forwarding** (once [`Registry::forward_with`] installed a [`Forwarder`]): a follower
//! sends the writes it gets to the leader instead of refusing them — [`Registry::apply`] is
//! the one place every adapter's writes pass, so none of them has to know — and answers only
//! once it has applied the leader's revision itself (read your writes on the node that
//! acknowledged). Heartbeats stay synchronous and local: the follower answers from its own
//! state and sends the renewed keys to the leader in one call every `RENEWAL_FLUSH`.

mod load;
pub(crate) mod table;
mod writer;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use sextant_model::{
    validate_instance_id, validate_registration, Instance, Registration, Revision, ServiceConfig,
    ServiceKey, StatusPatch,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::acl::{Acl, AclOp, AclState, Actor, AuditLog};
use crate::forward::{ForwardRequest, Forwarder};
use crate::lease::{LeaseKey, LeaseTable};
use crate::metrics::CoreMetrics;
use crate::store::{Store, StoreError};
use crate::{CoreConfig, CoreError, Subscription};
use load::load;
use table::{ServiceEntry, ServiceState, ServiceTable};
use writer::Writer;

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

/// Whether this node's writer takes writes (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The only node on its store: takes writes.
    Single,
    /// Elected among the nodes on a shared store: takes writes.
    Leader,
    /// Applies the store's feed and refuses writes, naming the leader when one is known.
    Follower { leader: Option<String> },
}

impl Role {
    pub fn takes_writes(&self) -> bool {
        !matches!(self, Role::Follower { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader => "leader",
            Role::Follower { .. } => "follower",
        }
    }

    pub(crate) fn refusal(&self) -> CoreError {
        match self {
            Role::Follower { leader } => CoreError::NotLeader(leader.clone()),
            _ => CoreError::NotLeader(None),
        }
    }
}

/// What the node's election tells the writer.
pub(crate) enum Control {
    /// Stop taking writes; apply the store's feed from the applied revision.
    Follow,
    /// Catch up through the feed to `head` (the store's revision when this node was elected),
    /// then take writes above `floor`. Answers with the revision it leads from.
    Lead {
        head: Revision,
        floor: Revision,
        done: oneshot::Sender<Result<Revision, CoreError>>,
    },
}

/// One registry write.
// Registrations dominate and are moved once into the writer's queue; boxing them would add an
// allocation per write for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Gives the service `check` if it has none, decided against the latest state (a check
    /// set meanwhile, natively or by an operator, is never replaced); other settings stay.
    DefaultCheck {
        service: ServiceKey,
        check: sextant_model::HealthCheck,
    },
    /// Internal: remove an instance whose lease lapsed, if it is still lapsed.
    Expire {
        service: ServiceKey,
        id: Arc<str>,
    },
    /// A token or policy change (see `Registry::acl`).
    Acl(AclOp),
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
            Op::DefaultCheck { check, .. } => check.validate()?,
            Op::Expire { .. } => {}
            Op::Acl(a) => a.validate()?,
        }
        Ok(())
    }
}

pub(crate) type OpResult = Result<Revision, CoreError>;

pub(crate) struct WriteRequest {
    ops: Vec<Op>,
    actor: Option<Arc<Actor>>,
    reply: oneshot::Sender<Result<Vec<OpResult>, CoreError>>,
}

/// What every handle of one registry shares: its services, publication state, leases and the
/// writer's queue.
pub(crate) struct RegistryCore {
    pub config: CoreConfig,
    pub services: ServiceTable,
    pub publish_gate: RwLock<()>,
    pub published: AtomicU64,
    /// The published revision again, for readers that wait on any change at all (blocking
    /// queries over the whole catalog); sent after each batch's services are woken.
    pub published_tx: watch::Sender<Revision>,
    pub leases: LeaseTable,
    /// The store, asked (cheaply) whether it takes writes: see "Store outages" above.
    pub store: Arc<dyn Store>,
    pub metrics: CoreMetrics,
    /// `Some(reason)` once shutdown began.
    pub closing: watch::Sender<Option<String>>,
    pub next_subscriber: AtomicU64,
    pub role: watch::Sender<Role>,
    writes: mpsc::Sender<WriteRequest>,
    control: mpsc::UnboundedSender<Control>,
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
    /// Tokens and policies as published; swapped by the writer.
    pub acl: RwLock<Arc<AclState>>,
    /// The revision of the last ACL change.
    pub acl_changed: watch::Sender<Revision>,
    pub audit: Mutex<AuditLog>,
    /// Cluster mode: how a follower reaches the leader; `None` refuses writes on a follower.
    forwarder: RwLock<Option<Arc<dyn Forwarder>>>,
    /// Leases a follower renewed for its clients and has yet to send to the leader.
    renewals: Mutex<HashSet<LeaseKey>>,
    flusher: AtomicBool,
    pub admission: crate::admission::Admission,
}

impl RegistryCore {
    /// Holding through a store outage: a follower (with no leader known, or one it cannot
    /// reach through the store either) while the store is unreachable.
    pub(crate) fn holding(&self) -> bool {
        !self.role.borrow().takes_writes() && self.store.write_outage().is_some()
    }

    /// Why a write is refused in `role`: a follower names its leader; one holding through a
    /// store outage names the store (503 with its reason, like a leader's failed commit).
    pub(crate) fn refusal(&self, role: &Role) -> CoreError {
        if matches!(role, Role::Follower { leader: None }) {
            if let Some(why) = self.store.write_outage() {
                return CoreError::Store(StoreError::Unavailable(format!(
                    "no cluster leader while the store is unreachable; {why}"
                )));
            }
        }
        role.refusal()
    }
}

/// How often a follower sends the renewals it answered to the leader: far below any lease
/// (TTLs are whole seconds), so a lease on the leader is at most this much behind.
const RENEWAL_FLUSH: Duration = Duration::from_millis(200);
/// Renewals a follower keeps while the leader cannot be reached (beyond them new ones are
/// dropped: a new leader gives every ephemeral instance a fresh lease anyway).
const MAX_QUEUED_RENEWALS: usize = 1_000_000;
/// Most renewals in one call to the leader.
const RENEWALS_PER_CALL: usize = 20_000;
/// How long a follower waits, after the leader acknowledged a forwarded write, until it has
/// applied that revision itself (normally milliseconds: one feed event).
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(5);

/// Handle to the registry. Cheap to clone; all clones share one registry. A handle made by
/// [`Registry::acting`] records who its writes are for in the audit log.
#[derive(Clone)]
pub struct Registry {
    pub(crate) core: Arc<RegistryCore>,
    actor: Option<Arc<Actor>>,
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
        let loaded = tokio::task::spawn_blocking(move || load(&*loader))
            .await
            .map_err(|e| StoreError::Io(format!("loader panicked: {e}")))??;
        let (revision, states) = (loaded.revision, loaded.states);

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
            // A vacant service (an old store's record of a service that emptied) is not kept.
            if !state.is_vacant() {
                services.insert(key.clone(), Arc::new(ServiceEntry::new(key, state)));
            }
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
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped_rx) = oneshot::channel();
        // History before this start is gone for every name, loaded or not.
        let services = ServiceTable::new(services, revision, config.vacant_retention);
        let admission = crate::admission::Admission::new(config.limits.clone(), metrics.clone());
        let core = Arc::new(RegistryCore {
            config,
            services,
            publish_gate: RwLock::new(()),
            published: AtomicU64::new(revision),
            published_tx: watch::Sender::new(revision),
            leases,
            store: store.clone(),
            metrics,
            closing: watch::Sender::new(None),
            next_subscriber: AtomicU64::new(1),
            role: watch::Sender::new(Role::Single),
            writes: tx,
            control: control_tx,
            stopped: Mutex::new(Some(stopped_rx)),
            acl: RwLock::new(Arc::new(loaded.acl)),
            acl_changed: watch::Sender::new(revision),
            audit: Mutex::new(AuditLog {
                entries: loaded.audit,
            }),
            admission,
            forwarder: RwLock::new(None),
            renewals: Mutex::new(HashSet::new()),
            flusher: AtomicBool::new(false),
        });
        let writer = Writer {
            core: core.clone(),
            store,
            rx,
            control: control_rx,
            revision,
            feed: None,
            promoting: None,
            uncertain: false,
        };
        // The writer gets a thread and a runtime of its own: on the shared runtime its wake-up
        // after each commit queued behind request handlers, which stretched every group-commit
        // cycle; here it runs as soon as its disk sync returns, and may block on it.
        if core.config.writer_thread {
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
        tokio::spawn(background(
            Registry {
                core: core.clone(),
                actor: None,
            },
            CloseOnDrop(core.clone()),
        ));
        Ok(Registry { core, actor: None })
    }

    /// A handle whose writes are audited as made by `actor`.
    pub fn acting(&self, actor: Actor) -> Registry {
        Registry {
            core: self.core.clone(),
            actor: Some(Arc::new(actor)),
        }
    }

    /// Access control: the check adapters call, and tokens, policies and the audit log.
    pub fn acl(&self) -> Acl<'_> {
        Acl { registry: self }
    }

    /// This node's role (see the module docs).
    pub fn role(&self) -> Role {
        self.core.role.borrow().clone()
    }

    /// Resolves when the role changes.
    pub fn role_changes(&self) -> watch::Receiver<Role> {
        self.core.role.subscribe()
    }

    /// `Ok` when this node's own writer takes writes (it leads); on a follower, the error
    /// naming the leader — even when it forwards: for state only the leader keeps (Consul's
    /// TTL checks).
    pub fn writable(&self) -> Result<(), CoreError> {
        let role = self.core.role.borrow().clone();
        if role.takes_writes() {
            Ok(())
        } else {
            Err(self.core.refusal(&role))
        }
    }

    /// `Ok` when heartbeats sent here renew leases: this node leads, or it is a follower that
    /// forwards renewals to the leader, or it holds through a store outage (see the module
    /// docs); otherwise [`Registry::writable`]'s error.
    pub fn renews_leases(&self) -> Result<(), CoreError> {
        if self.core.forwarder.read().is_some() || self.core.holding() {
            return Ok(());
        }
        self.writable()
    }

    /// Installs how this node, while it follows, reaches the leader: from now on a follower
    /// forwards writes and renewals instead of refusing them.
    pub fn forward_with(&self, forwarder: Arc<dyn Forwarder>) {
        *self.core.forwarder.write() = Some(forwarder);
        if !self.core.flusher.swap(true, Ordering::AcqRel) {
            tokio::spawn(flush_renewals(self.clone()));
        }
    }

    /// The forwarder, when this node follows and has one.
    fn forwarding(&self) -> Option<Arc<dyn Forwarder>> {
        if self.core.role.borrow().takes_writes() {
            return None;
        }
        self.core.forwarder.read().clone()
    }

    /// Makes this node a follower (`leader`: the leader's address, for refusals): writes are
    /// refused from now on, and the writer applies the store's feed from its revision.
    pub fn follow(&self, leader: Option<String>) {
        self.core.role.send_replace(Role::Follower { leader });
        // The writer ignores it when it already follows.
        let _ = self.core.control.send(Control::Follow);
    }

    /// Makes this node the leader once it has applied everything up to `head` (the store's
    /// revision read after winning the election). Until then writes are still refused. Its
    /// first write gets a revision above `floor` too (the highest revision an unfinished batch
    /// of a dead leader may have written part of), so no revision is used twice. Returns the
    /// revision it leads from.
    pub async fn lead(&self, head: Revision, floor: Revision) -> Result<Revision, CoreError> {
        let (done, rx) = oneshot::channel();
        self.core
            .control
            .send(Control::Lead { head, floor, done })
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)?
    }

    /// Applies `ops` in order; each gets its own result. Returns once they are durable. On a
    /// follower that forwards, the leader applies them, and this returns once this node has
    /// applied them too (bounded by `READ_YOUR_WRITES_WAIT`).
    ///
    /// A write made for a client (one with an actor) is shed with a 503 when the writer's
    /// queue is deep (`Limits::shed_write_queue`); the node's own writes are never shed.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, CoreError> {
        for op in &ops {
            op.validate()?;
        }
        if self.core.closing.borrow().is_some() {
            return Err(CoreError::ShuttingDown);
        }
        let actor = self.actor.clone().or_else(crate::acl::current_actor);
        if let Some(a) = &actor {
            self.core
                .admission
                .shed(self.write_queue_depth(), &a.protocol)?;
        }
        if let Some(f) = self.forwarding() {
            return self.forward(f, ops, actor).await;
        }
        self.submit(ops, actor).await
    }

    /// Applies writes a follower forwarded (the leader's side of [`Registry::apply`]), audited
    /// as made by `actor`. Never forwarded again: a node that no longer leads refuses them
    /// (`NotLeader`), and the follower answers its client with that 503.
    pub async fn apply_forwarded(
        &self,
        ops: Vec<Op>,
        actor: Option<Actor>,
    ) -> Result<Vec<OpResult>, CoreError> {
        for op in &ops {
            op.validate()?;
        }
        if self.core.closing.borrow().is_some() {
            return Err(CoreError::ShuttingDown);
        }
        // Made for a client on the follower: shed like one made here.
        if let Some(a) = &actor {
            self.core
                .admission
                .shed(self.write_queue_depth(), &a.protocol)?;
        }
        self.core
            .metrics
            .forward_received_ops
            .inc_by(ops.len() as u64);
        self.submit(ops, actor.map(Arc::new)).await
    }

    /// Renews leases that a follower's clients renewed there (the leader's side of
    /// [`Registry::heartbeat`] on a follower): in memory, like every heartbeat. Refused on a
    /// node that does not lead, so the follower keeps the keys for the next flush. Returns how
    /// many leases existed.
    pub fn renew_forwarded(&self, keys: Vec<(ServiceKey, Arc<str>)>) -> Result<usize, CoreError> {
        self.writable()?;
        let now = Instant::now();
        let renewed = keys
            .into_iter()
            .filter(|(service, id)| {
                self.core.leases.renew(
                    &LeaseKey {
                        service: service.clone(),
                        id: id.clone(),
                    },
                    now,
                )
            })
            .count();
        self.core
            .metrics
            .forward_received_renewals
            .inc_by(renewed as u64);
        Ok(renewed)
    }

    async fn submit(
        &self,
        ops: Vec<Op>,
        actor: Option<Arc<Actor>>,
    ) -> Result<Vec<OpResult>, CoreError> {
        let (reply, rx) = oneshot::channel();
        self.core
            .writes
            .send(WriteRequest { ops, reply, actor })
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)?
    }

    /// Writes waiting for the writer.
    pub fn write_queue_depth(&self) -> usize {
        let w = &self.core.writes;
        w.max_capacity() - w.capacity()
    }

    /// Admits one request made by `actor` and runs it: the rate limits of its source address
    /// and token, then a place among the requests in flight (held until `f` completes), with
    /// every registry write `f` makes audited as made by `actor`. Every adapter runs each
    /// request through here (see `admission`); a refusal is a 429 or 503 with `Retry-After`.
    pub async fn admitted<F: std::future::Future>(
        &self,
        actor: Actor,
        f: F,
    ) -> Result<F::Output, CoreError> {
        let admission = &self.core.admission;
        admission.check_rates(&actor)?;
        let _in_flight = admission.request(&actor.protocol)?;
        Ok(crate::acl::with_actor(actor, f).await)
    }

    /// The rate limits alone, for a request that opens a long-lived stream (a watch, an xDS
    /// stream): it is admitted once, and does not hold a place among the requests in flight.
    pub fn admit(&self, actor: &Actor) -> Result<(), CoreError> {
        self.core.admission.check_rates(actor)
    }

    /// A place among the node's open connections, held by the connection; `None` when the
    /// node is at `Limits::max_connections` (the caller closes the connection).
    pub fn admit_connection(&self, listener: &'static str) -> Option<crate::ConnectionPermit> {
        self.core.admission.connection(listener)
    }

    /// The limits this node runs with.
    pub fn limits(&self) -> &crate::Limits {
        self.core.admission.limits()
    }

    /// A follower's write: the leader applies it; this node answers once it has applied the
    /// leader's revision itself, so a read here right after sees the write.
    async fn forward(
        &self,
        forwarder: Arc<dyn Forwarder>,
        ops: Vec<Op>,
        actor: Option<Arc<Actor>>,
    ) -> Result<Vec<OpResult>, CoreError> {
        let m = &self.core.metrics;
        let n = ops.len() as u64;
        let started = std::time::Instant::now();
        let request = ForwardRequest {
            ops,
            actor: actor.map(|a| (*a).clone()),
        };
        let results = match forwarder.forward(request).await {
            Ok(r) => r,
            Err(e) => {
                m.forward_failures.inc();
                // No leader to forward to because the store is unreachable: say so (the
                // store's outage, naming it), as a follower that does not forward would.
                if let CoreError::NotLeader(None) = e {
                    let role = self.core.role.borrow().clone();
                    return Err(self.core.refusal(&role));
                }
                return Err(e);
            }
        };
        m.forward_seconds.observe(started.elapsed().as_secs_f64());
        m.forwarded_ops.inc_by(n);
        let newest = results.iter().filter_map(|r| r.as_ref().ok()).max();
        if let Some(&r) = newest {
            if self.revision() < r {
                let applied = self.wait_for_revision(r - 1, READ_YOUR_WRITES_WAIT).await;
                if applied < r {
                    // Durable and acknowledged by the leader all the same; only a read here
                    // right after may not see it yet.
                    tracing::warn!(
                        revision = r,
                        applied,
                        "a forwarded write is not applied here yet; answering anyway"
                    );
                }
            }
        }
        Ok(results)
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

    /// Gives `service` the health check `check` unless it already has one (see
    /// [`Op::DefaultCheck`]). Returns the revision of the change, or 0 when a check was there.
    pub async fn default_check(
        &self,
        service: ServiceKey,
        check: sextant_model::HealthCheck,
    ) -> Result<Revision, CoreError> {
        self.apply_one(Op::DefaultCheck { service, check }).await
    }

    /// Renews leases. In memory only: a heartbeat costs no disk write. On a follower that
    /// forwards, see `heartbeat_here`; on one that does not, nothing is renewed (the leader
    /// keeps the leases) and every instance is `Unknown`, so a client registers again, which
    /// the follower refuses naming the leader.
    pub fn heartbeat(&self, items: &[(ServiceKey, String)]) -> Vec<HeartbeatResult> {
        if !self.core.role.borrow().takes_writes() {
            if self.core.forwarder.read().is_some() {
                return self.heartbeat_here(items);
            }
            if self.core.holding() {
                return self.heartbeat_from_memory(items);
            }
            return vec![HeartbeatResult::Unknown; items.len()];
        }
        let now = Instant::now();
        items
            .iter()
            .map(|(service, id)| {
                let key = LeaseKey {
                    service: service.clone(),
                    id: id.as_str().into(),
                };
                if self.core.leases.renew(&key, now) {
                    HeartbeatResult::Renewed
                } else if self
                    .core
                    .services
                    .get(service)
                    .is_some_and(|e| e.state().instances.contains_key(id.as_str()))
                {
                    HeartbeatResult::Persistent
                } else {
                    HeartbeatResult::Unknown
                }
            })
            .collect()
    }

    /// Heartbeats while holding through a store outage: an instance this node has is renewed
    /// (its lease here too, if it has one); the next leader grants every one a fresh TTL.
    fn heartbeat_from_memory(&self, items: &[(ServiceKey, String)]) -> Vec<HeartbeatResult> {
        let now = Instant::now();
        items
            .iter()
            .map(|(service, id)| {
                let inst = self.instance(service, id);
                match inst {
                    Some(i) if i.is_ephemeral() => {
                        self.core.leases.renew(
                            &LeaseKey {
                                service: service.clone(),
                                id: id.as_str().into(),
                            },
                            now,
                        );
                        HeartbeatResult::Renewed
                    }
                    Some(_) => HeartbeatResult::Persistent,
                    None => HeartbeatResult::Unknown,
                }
            })
            .collect()
    }

    /// A follower's heartbeat: answered from its own copy of the registry (ephemeral →
    /// `Renewed`, persistent → `Persistent`, absent → `Unknown`) and the renewed keys queued
    /// for the leader (sent within `RENEWAL_FLUSH`). The answer can be wrong for one window:
    /// an instance the leader just expired (or deleted) reads as `Renewed` here until its
    /// delete arrives through the feed — milliseconds — and the client's next heartbeat gets
    /// `Unknown` and registers again, as it would on the leader.
    fn heartbeat_here(&self, items: &[(ServiceKey, String)]) -> Vec<HeartbeatResult> {
        let mut queue = Vec::new();
        let results = items
            .iter()
            .map(|(service, id)| {
                let found = self
                    .core
                    .services
                    .get(service)
                    .and_then(|e| e.state().instances.get(id.as_str()).map(|i| i.ttl_seconds));
                match found {
                    Some(ttl) if ttl > 0 => {
                        queue.push(LeaseKey {
                            service: service.clone(),
                            id: id.as_str().into(),
                        });
                        HeartbeatResult::Renewed
                    }
                    Some(_) => HeartbeatResult::Persistent,
                    None => HeartbeatResult::Unknown,
                }
            })
            .collect();
        if !queue.is_empty() {
            let mut q = self.core.renewals.lock();
            for k in queue {
                if q.len() < MAX_QUEUED_RENEWALS {
                    q.insert(k);
                }
            }
        }
        results
    }

    /// The current state of a service; an unknown service is empty, at a revision no index
    /// taken from it before can be ahead of (see `table`).
    pub fn get(&self, service: &ServiceKey, healthy_only: bool) -> ServiceView {
        match self.core.services.get(service) {
            Some(e) => ServiceView::build(service.clone(), &e.state(), healthy_only),
            None => {
                ServiceView::build(service.clone(), &self.core.services.unknown(), healthy_only)
            }
        }
    }

    /// A service's settings (the defaults for an unknown service), without copying its instances.
    pub fn service_config(&self, service: &ServiceKey) -> ServiceConfig {
        self.core
            .services
            .get(service)
            .map(|e| e.state().config.clone())
            .unwrap_or_default()
    }

    /// The revision of a service's last change (for an unknown service, see [`Registry::get`]).
    pub fn service_revision(&self, service: &ServiceKey) -> Revision {
        match self.core.services.get(service) {
            Some(e) => e.state().revision,
            None => self.core.services.unknown().revision,
        }
    }

    /// One instance by id, without copying the service.
    pub fn instance(&self, service: &ServiceKey, id: &str) -> Option<Instance> {
        self.core
            .services
            .get(service)
            .and_then(|e| e.state().instances.get(id).cloned())
    }

    /// The first instance of a service (in id order) that `pred` accepts, without copying the
    /// service.
    pub fn find_instance(
        &self,
        service: &ServiceKey,
        pred: impl Fn(&Instance) -> bool,
    ) -> Option<Instance> {
        self.core
            .services
            .get(service)
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
        // Held, not just cloned: a vacant entry created for the wait leaves memory with it.
        let entry = self.core.services.hold(service);
        let mut rx = entry.changed.subscribe();
        let mut closing = self.core.closing.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|r| *r > index)) => {}
            _ = closing.wait_for(|c| c.is_some()) => {}
        }
        ServiceView::build(service.clone(), &entry.state(), healthy_only)
    }

    /// Waits until the registry-wide revision exceeds `index` or `wait` passes (or shutdown
    /// begins), then returns the latest revision: blocking queries over many services.
    pub async fn wait_for_revision(&self, index: Revision, wait: Duration) -> Revision {
        let mut rx = self.core.published_tx.subscribe();
        let mut closing = self.core.closing.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|r| *r > index)) => {}
            _ = closing.wait_for(|c| c.is_some()) => {}
        }
        self.revision()
    }

    /// Every record of the registry at one revision (a consistent cut: taken under the
    /// publish gate, so no batch is half in it), encoded as the store holds it: for backups
    /// and for moving to another store (`snapshot::restore`).
    pub fn snapshot(&self) -> crate::Snapshot {
        // Only the cheap part under the gate (an Arc per service), so writers wait for a
        // moment, not for the encoding.
        let (revision, states, acl, audit) = {
            let _cut = self.core.publish_gate.read();
            let revision = self.core.published.load(Ordering::Acquire);
            let states: Vec<(ServiceKey, Arc<ServiceState>)> = self
                .core
                .services
                .read()
                .iter()
                .map(|(k, e)| (k.clone(), e.state()))
                .collect();
            let acl = self.core.acl.read().clone();
            let audit: Vec<sextant_model::acl::AuditEntry> =
                self.core.audit.lock().entries.iter().cloned().collect();
            (revision, states, acl, audit)
        };
        let mut records = BTreeMap::new();
        // Tokens (hashed), policies and the audit tail go with the registry: a restored node
        // answers the same credentials.
        for t in acl.tokens.values() {
            records.insert(
                crate::codec::token_key(&t.id),
                crate::codec::encode_token(t),
            );
        }
        for p in acl.policies.values() {
            records.insert(
                crate::codec::policy_key(&p.name),
                crate::codec::encode_v1(p),
            );
        }
        if acl.bootstrapped {
            records.insert(
                crate::codec::BOOTSTRAP_KEY.to_string(),
                crate::codec::encode_v1(&0u64),
            );
        }
        for e in audit.iter().filter(|e| e.revision <= revision) {
            records.insert(
                crate::codec::audit_key(e.revision),
                crate::codec::encode_v1(e),
            );
        }
        for (key, st) in states {
            if st.is_vacant() {
                continue;
            }
            records.insert(
                crate::codec::service_key(&key),
                crate::codec::encode_service(&crate::codec::ServiceRecord {
                    revision: st.revision,
                    config: st.config.clone(),
                }),
            );
            for (id, inst) in st.instances.iter() {
                records.insert(
                    crate::codec::spec_key(&key, id),
                    crate::codec::encode_spec(&inst.spec, inst.ttl_seconds, inst.spec_revision),
                );
                records.insert(
                    crate::codec::status_key(&key, id),
                    crate::codec::encode_status(inst.status, inst.status_revision),
                );
            }
        }
        crate::Snapshot { revision, records }
    }

    /// Several services in one consistent cut, with the revision of that cut (everything up to
    /// it is reflected, so it is a safe index for a following blocking query).
    pub fn discover(
        &self,
        services: &[ServiceKey],
        healthy_only: bool,
    ) -> (Revision, Vec<ServiceView>) {
        let _cut = self.core.publish_gate.read();
        let revision = self.core.published.load(Ordering::Acquire);
        let views = services.iter().map(|s| self.get(s, healthy_only)).collect();
        (revision, views)
    }

    pub fn namespaces(&self) -> Vec<NamespaceSummary> {
        let mut out: Vec<NamespaceSummary> = Vec::new();
        for (key, entry) in self.core.services.read().iter() {
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
        let services = self.core.services.read();
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
        self.core
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
        self.core.published.load(Ordering::Acquire)
    }

    /// Blocking queries waiting on a service now (tests wait for one to be parked).
    #[cfg(test)]
    pub(crate) fn waiting_on(&self, service: &ServiceKey) -> usize {
        self.core
            .services
            .get(service)
            .map_or(0, |e| e.changed.receiver_count())
    }

    /// Services held in memory, vacant ones (waited on or watched, not registered) included.
    pub fn service_entries(&self) -> usize {
        self.core.services.len()
    }

    pub fn metrics(&self) -> &CoreMetrics {
        &self.core.metrics
    }

    /// Subscribes to `services`. The first delivery is a snapshot, or, with `since`, exactly
    /// the events after `since` (a snapshot of any service whose history was compacted).
    pub fn subscribe(&self, services: Vec<ServiceKey>, since: Option<Revision>) -> Subscription {
        Subscription::new(self.core.clone(), services, since)
    }

    /// Resolves once shutdown has begun; background tasks stop on it.
    pub async fn closed(&self) {
        let mut rx = self.core.closing.subscribe();
        let _ = rx.wait_for(|c| c.is_some()).await;
    }

    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.core.closing.borrow().is_some()
    }

    /// Stops accepting writes, commits what is queued, closes the store and ends every
    /// subscription with `reason`.
    pub async fn shutdown(&self, reason: &str) {
        self.core.closing.send_replace(Some(reason.to_string()));
        let stopped = self.core.stopped.lock().take();
        if let Some(rx) = stopped {
            let _ = rx.await;
        }
    }
}

/// A release usually removes a vacant entry at once; the sweep only catches the ones a
/// concurrent reader's clone kept alive, so it can be rare.
const VACANT_SWEEP_TICKS: u64 = 20;

/// Closes the registry when dropped without a shutdown — when the runtime that runs the sweeper
/// goes away — so the writer thread commits what is queued, closes the store and ends, as its
/// task would have ended with that runtime.
struct CloseOnDrop(Arc<RegistryCore>);

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

/// A follower's renewals, sent to the leader every `RENEWAL_FLUSH` in one call (deduplicated:
/// a client that renewed twice meanwhile is one key). Keys the leader could not take wait for
/// the next flush; a node that leads drops them (its leases are its own).
async fn flush_renewals(registry: Registry) {
    let core = registry.core.clone();
    let mut closing = core.closing.subscribe();
    let mut tick = tokio::time::interval(RENEWAL_FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = closing.wait_for(|c| c.is_some()) => return,
        }
        let Some(forwarder) = registry.forwarding() else {
            core.renewals.lock().clear();
            continue;
        };
        let keys: Vec<LeaseKey> = std::mem::take(&mut *core.renewals.lock())
            .into_iter()
            .collect();
        if keys.is_empty() {
            continue;
        }
        // In calls of a bounded size (a million instances would be one huge message).
        let mut sent = 0;
        for chunk in keys.chunks(RENEWALS_PER_CALL) {
            let wire = chunk
                .iter()
                .map(|k| (k.service.clone(), k.id.clone()))
                .collect();
            match forwarder.renew(wire).await {
                Ok(()) => {
                    core.metrics.forwarded_renewals.inc_by(chunk.len() as u64);
                    sent += chunk.len();
                }
                Err(e) => {
                    core.metrics.forward_failures.inc();
                    tracing::debug!(error = %e, keys = chunk.len(), "renewals not taken by the leader; kept for the next flush");
                    let mut q = core.renewals.lock();
                    for k in &keys[sent..] {
                        if q.len() < MAX_QUEUED_RENEWALS {
                            q.insert(k.clone());
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// Expires lapsed leases (every `lease_check_interval`) and sweeps vacant services nobody
/// holds out of memory (every `VACANT_SWEEP_TICKS` of those).
async fn background(registry: Registry, _close: CloseOnDrop) {
    let core = registry.core.clone();
    let mut closing = core.closing.subscribe();
    let mut tick = tokio::time::interval(core.config.lease_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    // An outage was seen since the last sweep that could write: leases get a fresh TTL first.
    let mut outage_seen = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = closing.wait_for(|c| c.is_some()) => return,
        }
        ticks += 1;
        core.metrics.service_entries.set(core.services.len() as i64);
        let (requests, connections) = core.admission.in_use();
        core.metrics.requests_in_flight.set(requests as i64);
        core.metrics.connections_open.set(connections as i64);
        core.metrics
            .write_queue
            .set(registry.write_queue_depth() as i64);
        if ticks.is_multiple_of(VACANT_SWEEP_TICKS) {
            core.admission.forget_idle();
            let removed = core.services.sweep();
            if removed > 0 {
                tracing::debug!(removed, "vacant services swept out of memory");
            }
        }
        // No expiry while the store cannot take writes (see the module docs); a fresh TTL
        // for every lease once it can, instead of expiring every lease that lapsed meanwhile.
        if let Some(why) = core.store.write_outage() {
            if !outage_seen {
                tracing::warn!(reason = %why, "the store takes no writes: lease expiry suspended");
            }
            outage_seen = true;
            continue;
        }
        if std::mem::take(&mut outage_seen) {
            let n = core.leases.refresh(Instant::now());
            tracing::info!(
                leases = n,
                "the store takes writes again: every lease gets a fresh TTL"
            );
        }
        // Expiries are the leader's to decide: a follower's leases are renewed by nobody.
        if !core.role.borrow().takes_writes() {
            continue;
        }
        let expired = core.leases.expired(Instant::now());
        for chunk in expired.chunks(core.config.max_batch_ops.max(1)) {
            let ops = chunk
                .iter()
                .map(|k| Op::Expire {
                    service: k.service.clone(),
                    id: k.id.clone(),
                })
                .collect();
            if let Err(e) = registry.apply(ops).await {
                tracing::warn!(error = %e, "could not remove expired instances; will retry");
                // A brief outage may end before the next tick looks: count it all the same.
                outage_seen |= matches!(e, CoreError::Store(StoreError::Unavailable(_)));
                break;
            }
        }
    }
}
