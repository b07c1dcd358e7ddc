//! The single writer: group commit, revisions, and publication after durability.
//!
//! It drains whatever requests are queued (up to `max_batch_ops`), applies each operation to a
//! copy-on-write copy of the touched services (one function per kind of operation), assigns
//! each change the next revision, commits the whole batch to the store, and only once that is
//! durable publishes the new states and events, wakes waiters and subscribers, applies lease
//! changes and acknowledges the callers. A failed commit publishes nothing and acknowledges
//! nobody.
//!
//! On a follower (cluster mode) it refuses writes and applies the store's feed instead: each
//! committed batch becomes new states and events at the leader's revisions, published the same
//! way (`apply_change`); a compacted feed is answered with a full reload whose services are
//! published with their logs compacted, so every subscriber gets a snapshot (`resync`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sextant_model::acl::AuditEntry;
use sextant_model::{
    CheckKind, DeleteReason, Event, EventKind, HealthCheck, Instance, InstanceStatus, Registration,
    Revision, ServiceConfig, ServiceKey, StatusPatch,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::table::{ServiceEntry, ServiceState};
use super::{Control, Op, OpResult, RegistryCore, Role, WriteRequest};
use crate::acl::{AclOp, AclState, Actor};
use crate::codec;
use crate::delivery::SharedEvent;
use crate::lease::LeaseKey;
use crate::metrics::EventLabels;
use crate::store::{Batch, Change, Feed, FeedError, Mutation, Store, StoreError};
use crate::CoreError;

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
    /// The batch's working copy of the ACL tables, once an ACL change is staged.
    acl: Option<AclState>,
    audit: Vec<AuditEntry>,
}

/// What one operation did.
enum Outcome {
    /// A change, pushed as this event at the operation's revision.
    Changed(Event),
    /// A change nobody is pushed (settings): the revision moves so blocking queries wake.
    Silent,
    /// Nothing changed; the caller gets this revision.
    Unchanged(Revision),
}

pub(super) struct Writer {
    pub core: Arc<RegistryCore>,
    pub store: Arc<dyn Store>,
    pub rx: mpsc::Receiver<WriteRequest>,
    pub control: mpsc::UnboundedReceiver<Control>,
    /// Last revision assigned and durable (on a follower: applied from the feed).
    pub revision: Revision,
    /// The store's feed while following.
    pub feed: Option<Feed>,
    /// A promotion waiting for the feed to reach the store's head.
    pub promoting: Option<Promotion>,
    /// A leader's commit failed and the store could not say whether it applied it: before the
    /// next commit, ask again (and reload if it did).
    pub uncertain: bool,
}

/// A promotion under way: the head to reach, the floor to write above, the caller.
pub(super) struct Promotion {
    head: Revision,
    floor: Revision,
    done: oneshot::Sender<Result<Revision, CoreError>>,
}

/// How long a follower waits before reopening a feed that failed.
const FEED_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

enum Wake {
    Control(Control),
    Feed(Option<Result<Change, FeedError>>),
    Retry,
    Write(WriteRequest),
    Stop,
}

async fn next_change(feed: &mut Option<Feed>) -> Option<Result<Change, FeedError>> {
    match feed {
        Some(f) => f.recv().await,
        None => std::future::pending().await,
    }
}

impl Writer {
    pub async fn run(mut self, stopped: oneshot::Sender<()>) {
        let mut closing = self.core.closing.subscribe();
        let mut retry: Option<Instant> = None;
        loop {
            // The select only picks; the work happens after it, where none of its futures
            // (the closing watch's borrow among them) is alive across an await.
            let wake = tokio::select! {
                biased;
                Some(c) = self.control.recv() => Wake::Control(c),
                item = next_change(&mut self.feed) => Wake::Feed(item),
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => Wake::Retry,
                r = self.rx.recv() => match r {
                    Some(first) => Wake::Write(first),
                    None => Wake::Stop,
                },
                _ = closing.wait_for(|c| c.is_some()) => Wake::Stop,
            };
            match wake {
                Wake::Control(c) => self.on_control(c, &mut retry),
                Wake::Feed(item) => self.on_feed(item, &mut retry).await,
                Wake::Retry => {
                    retry = None;
                    self.open_feed(&mut retry);
                }
                Wake::Write(first) => {
                    let batch = self.drain(first);
                    self.commit(batch).await;
                }
                Wake::Stop => break,
            }
        }
        self.feed = None;
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

    fn following(&self) -> bool {
        !self.core.role.borrow().takes_writes()
    }

    fn on_control(&mut self, c: Control, retry: &mut Option<Instant>) {
        match c {
            Control::Follow => {
                if let Some(p) = self.promoting.take() {
                    let role = self.core.role.borrow().clone();
                    let _ = p.done.send(Err(self.core.refusal(&role)));
                }
                if self.feed.is_none() && retry.is_none() {
                    self.open_feed(retry);
                }
            }
            Control::Lead { head, floor, done } => {
                if let Some(old) = self.promoting.replace(Promotion { head, floor, done }) {
                    let _ = old.done.send(Err(CoreError::NotLeader(None)));
                }
                if self.feed.is_none() && retry.is_none() && self.revision < head {
                    self.open_feed(retry);
                }
                self.check_promotion();
            }
        }
    }

    /// Opens the feed from the applied revision (again after a failure).
    fn open_feed(&mut self, retry: &mut Option<Instant>) {
        if !self.following() && self.promoting.is_none() {
            return;
        }
        match self.store.watch_from(self.revision) {
            Some(feed) => {
                tracing::info!(
                    revision = self.revision,
                    "following the store's change feed"
                );
                self.feed = Some(feed);
            }
            None => {
                tracing::error!("this store has no change feed: a follower cannot catch up");
                if let Some(p) = self.promoting.take() {
                    let _ = p.done.send(Err(CoreError::Store(StoreError::Unavailable(
                        "the store has no change feed".into(),
                    ))));
                }
                *retry = None;
            }
        }
    }

    async fn on_feed(
        &mut self,
        item: Option<Result<Change, FeedError>>,
        retry: &mut Option<Instant>,
    ) {
        match item {
            Some(Ok(change)) => self.apply_change(change),
            Some(Err(FeedError::Compacted(r))) => {
                tracing::warn!(
                    applied = self.revision,
                    compacted = r,
                    "the store compacted history this node still needs; reloading everything"
                );
                self.feed = None;
                if self.resync().await {
                    self.open_feed(retry);
                } else {
                    *retry = Some(Instant::now() + FEED_RETRY);
                }
            }
            Some(Err(FeedError::Store(e))) => {
                tracing::warn!(error = %e, "the store's change feed failed; reopening");
                self.feed = None;
                *retry = Some(Instant::now() + FEED_RETRY);
            }
            None => {
                self.feed = None;
                *retry = Some(Instant::now() + FEED_RETRY);
            }
        }
        self.check_promotion();
    }

    /// Resolves an unknown commit outcome: `true` once the store says what it holds (reloading
    /// everything if it holds more than this node published).
    async fn settle(&mut self) -> bool {
        match self.store.committed_revision().await {
            Some(Ok(h)) if h > self.revision => {
                tracing::warn!(
                    store = h,
                    published = self.revision,
                    "the store applied a write whose answer was lost; reloading"
                );
                if !self.resync().await {
                    return false;
                }
            }
            Some(Ok(_)) | None => {}
            Some(Err(_)) => return false,
        }
        self.uncertain = false;
        true
    }

    /// Ends a promotion once everything up to the head is applied: the feed stops, every
    /// ephemeral instance gets a fresh lease (nobody renewed them here), writes are taken.
    fn check_promotion(&mut self) {
        let Some(p) = &self.promoting else {
            return;
        };
        if self.revision < p.head {
            return;
        }
        let Some(Promotion { floor, done, .. }) = self.promoting.take() else {
            return;
        };
        self.feed = None;
        // Revisions may skip; they must never repeat.
        self.revision = self.revision.max(floor);
        let now = Instant::now();
        self.core.leases.clear();
        for (key, entry) in self.core.services.read().iter() {
            for inst in entry.state().instances.values() {
                if inst.is_ephemeral() {
                    self.core.leases.grant(
                        crate::lease::LeaseKey {
                            service: key.clone(),
                            id: inst.spec.id.as_str().into(),
                        },
                        inst.ttl_seconds,
                        now,
                    );
                }
            }
        }
        self.core.role.send_replace(Role::Leader);
        tracing::info!(revision = self.revision, "leading: taking writes");
        let _ = done.send(Ok(self.revision));
    }

    /// Applies one batch some other node committed, at its revisions.
    fn apply_change(&mut self, change: Change) {
        if change.revision <= self.revision {
            return; // already applied (a feed reopened from an older point)
        }
        let now = Instant::now();
        let deletes = codec::decode_journal(&change.journal).unwrap_or_else(|e| {
            tracing::warn!(error = %e, revision = change.revision, "undecodable journal; deletes get the batch's revision");
            Vec::new()
        });
        let mut specs: BTreeMap<(ServiceKey, String), Option<codec::SpecRecord>> = BTreeMap::new();
        let mut statuses: BTreeMap<(ServiceKey, String), codec::StatusRecord> = BTreeMap::new();
        let mut records: Vec<(ServiceKey, Option<codec::ServiceRecord>)> = Vec::new();
        // Tokens and policies the leader changed: the follower's tables follow, so every node
        // on the store authenticates alike (and a revocation ends watches on every node).
        let mut acl: Option<AclState> = None;
        let mut audit: Vec<AuditEntry> = Vec::new();
        for m in &change.mutations {
            let parsed = codec::parse_key(&m.key).and_then(|k| match (k, &m.value) {
                (codec::Key::Token, v) => {
                    let a = acl.get_or_insert_with(|| (**self.core.acl.read()).clone());
                    match v {
                        Some(v) => {
                            let t: sextant_model::acl::Token = codec::decode_token(&m.key, v)?;
                            a.tokens.insert(t.id.clone(), t);
                        }
                        None => {
                            let id = m.key.trim_start_matches("acl/token/");
                            a.tokens.remove(id);
                        }
                    }
                    Ok(())
                }
                (codec::Key::Policy, v) => {
                    let a = acl.get_or_insert_with(|| (**self.core.acl.read()).clone());
                    match v {
                        Some(v) => {
                            let pol: sextant_model::acl::Policy = codec::decode_v1(&m.key, v)?;
                            a.policies.insert(pol.name.clone(), pol);
                        }
                        None => {
                            let name = m.key.trim_start_matches("acl/policy/");
                            a.policies.remove(name);
                        }
                    }
                    Ok(())
                }
                (codec::Key::Bootstrap, v) => {
                    let a = acl.get_or_insert_with(|| (**self.core.acl.read()).clone());
                    a.bootstrapped = v.is_some();
                    Ok(())
                }
                (codec::Key::Audit, Some(v)) => {
                    audit.push(codec::decode_v1(&m.key, v)?);
                    Ok(())
                }
                // The leader trimmed its retention; the follower trims its own tail below.
                (codec::Key::Audit, None) => Ok(()),
                (codec::Key::Spec(svc, id), Some(v)) => {
                    let rec = codec::decode_spec(&m.key, v)?;
                    specs.insert((svc, id.to_string()), Some(rec));
                    Ok(())
                }
                (codec::Key::Spec(svc, id), None) => {
                    specs.insert((svc, id.to_string()), None);
                    Ok(())
                }
                (codec::Key::Status(svc, id), Some(v)) => {
                    let rec = codec::decode_status(&m.key, v)?;
                    statuses.insert((svc, id.to_string()), rec);
                    Ok(())
                }
                // A status goes with its spec's delete.
                (codec::Key::Status(..), None) => Ok(()),
                (codec::Key::Service(svc), Some(v)) => {
                    records.push((svc, Some(codec::decode_service(&m.key, v)?)));
                    Ok(())
                }
                (codec::Key::Service(svc), None) => {
                    records.push((svc, None));
                    Ok(())
                }
            });
            if let Err(e) = parsed {
                tracing::error!(error = %e, revision = change.revision, "a change from the feed could not be applied; skipped");
            }
        }
        let mut p = Pending::default();
        for ((svc, id), spec) in specs {
            let old = self.state(&mut p, &svc).instances.get(id.as_str()).cloned();
            match spec {
                Some(rec) => {
                    let (status, status_revision) =
                        match (statuses.remove(&(svc.clone(), id.clone())), &old) {
                            (Some(s), _) => (s.status, s.status_revision),
                            (None, Some(o)) => (o.status, o.status_revision),
                            (None, None) => (InstanceStatus::default(), rec.spec_revision),
                        };
                    if old.is_none() {
                        p.instance_delta += 1;
                    }
                    let inst = Instance {
                        spec: Arc::new(rec.spec),
                        status,
                        ttl_seconds: rec.ttl_seconds,
                        spec_revision: rec.spec_revision,
                        status_revision,
                    };
                    p.events.push(Event {
                        revision: rec.spec_revision,
                        service: svc.clone(),
                        kind: EventKind::Upsert(inst.clone()),
                    });
                    // A status change after the spec in the same batch is an event of its own.
                    if status_revision > rec.spec_revision {
                        p.events.push(Event {
                            revision: status_revision,
                            service: svc.clone(),
                            kind: EventKind::Status {
                                id: id.clone(),
                                status,
                            },
                        });
                    }
                    let st = self.state(&mut p, &svc);
                    st.revision = st.revision.max(inst.revision());
                    st.instances.insert(id.as_str().into(), inst);
                }
                None => {
                    if old.is_none() {
                        continue;
                    }
                    p.instance_delta -= 1;
                    let st = self.state(&mut p, &svc);
                    st.instances.remove(id.as_str());
                    let (revision, reason) = deletes
                        .iter()
                        .find(|d| {
                            d.id == id
                                && *d.service == *svc.service
                                && *d.namespace == *svc.namespace
                        })
                        .map_or((change.revision, DeleteReason::Deregistered), |d| {
                            (d.revision, d.reason)
                        });
                    st.revision = st.revision.max(revision);
                    p.events.push(Event {
                        revision,
                        service: svc.clone(),
                        kind: EventKind::Delete { id, reason },
                    });
                }
            }
        }
        for ((svc, id), rec) in statuses {
            let st = self.state(&mut p, &svc);
            let Some(old) = st.instances.get(id.as_str()).cloned() else {
                continue;
            };
            st.revision = st.revision.max(rec.status_revision);
            st.instances.insert(
                id.as_str().into(),
                Instance {
                    status: rec.status,
                    status_revision: rec.status_revision,
                    ..old
                },
            );
            p.events.push(Event {
                revision: rec.status_revision,
                service: svc,
                kind: EventKind::Status {
                    id,
                    status: rec.status,
                },
            });
        }
        for (svc, rec) in records {
            let st = self.state(&mut p, &svc);
            match rec {
                Some(r) => {
                    st.config = r.config;
                    st.revision = st.revision.max(r.revision);
                }
                None => st.config = ServiceConfig::default(),
            }
        }
        p.events.sort_by_key(|e| e.revision);
        self.revision = change.revision;
        if let Some(mut a) = acl {
            a.reindex();
            p.acl = Some(a);
        }
        self.publish(&mut p, now);
        self.publish_acl(&mut p);
        // The leader's audit entries join this node's tail (for `GET /v1/audit` here), but
        // not its `audit_log` file: the node that made the write wrote that line.
        if !audit.is_empty() {
            let cap = self.core.config.audit_retention;
            let mut log = self.core.audit.lock();
            log.entries.extend(audit);
            while log.entries.len() > cap {
                log.entries.pop_front();
            }
        }
        self.release(std::mem::take(&mut p.states));
    }

    /// Reloads everything from the store and publishes it with every service's log compacted
    /// through the loaded revision, so each subscriber gets a snapshot. `false` if the load
    /// failed (tried again later).
    async fn resync(&mut self) -> bool {
        let store = self.store.clone();
        let loaded = tokio::task::spawn_blocking(move || super::load::load(&*store)).await;
        let super::load::Loaded {
            revision,
            mut states,
            acl,
            audit,
        } = match loaded {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reloading from the store failed; retrying");
                return false;
            }
            Err(e) => {
                tracing::error!(error = %e, "the reload panicked; retrying");
                return false;
            }
        };
        let keys: Vec<ServiceKey> = {
            let mut k: Vec<ServiceKey> = self.core.services.read().keys().cloned().collect();
            k.extend(states.keys().cloned());
            k.sort();
            k.dedup();
            k
        };
        let (mut instances, mut services) = (0i64, 0i64);
        let mut touched = Vec::with_capacity(keys.len());
        {
            let _gate = self.core.publish_gate.write();
            self.core.services.forget_through(revision);
            for key in keys {
                let entry = self.core.services.get_or_create(&key);
                let mut state = states.remove(&key).unwrap_or_default();
                if state.is_vacant() {
                    state.revision = revision;
                }
                instances += state.instances.len() as i64;
                services += i64::from(!state.instances.is_empty());
                let rev = state.revision;
                let mut inner = entry.inner.write();
                inner.state = Arc::new(state);
                inner.log.clear();
                inner.compacted_through = revision;
                drop(inner);
                touched.push((entry, rev));
            }
            self.revision = revision;
            self.core.published.store(revision, Ordering::Release);
        }
        *self.core.acl.write() = Arc::new(acl);
        self.core.acl_changed.send_replace(revision);
        self.core.audit.lock().entries = audit;
        for (entry, rev) in touched {
            // The service's own revision: a blocking query at it must keep waiting.
            entry.changed.send_replace(rev);
            for n in entry.subscribers.lock().values() {
                n.notify_one();
            }
            self.core.services.release(entry);
        }
        let m = &self.core.metrics;
        m.instances.set(instances);
        m.services.set(services);
        m.revision.set(revision as i64);
        tracing::info!(revision, "resynced from the store");
        true
    }

    fn drain(&mut self, first: WriteRequest) -> Vec<WriteRequest> {
        let mut n = first.ops.len();
        let mut batch = vec![first];
        while n < self.core.config.max_batch_ops {
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
        let role = self.core.role.borrow().clone();
        if !role.takes_writes() || self.promoting.is_some() {
            for req in requests {
                let _ = req.reply.send(Err(self.core.refusal(&role)));
            }
            return;
        }
        if self.uncertain && !self.settle().await {
            // Name the store's outage when it knows one (an operator's first question).
            let why = self
                .store
                .write_outage()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default();
            let e = StoreError::Unavailable(format!(
                "the outcome of an earlier write is not known yet; retry{why}"
            ));
            for req in requests {
                let _ = req.reply.send(Err(CoreError::Store(copy_of(&e))));
            }
            return;
        }
        let mut p = Pending::default();
        let mut next = self.revision + 1;
        let now = Instant::now();
        let mut results = Vec::with_capacity(requests.len());
        let audit_on = self.core.config.audit_retention > 0;
        let time_ms = sextant_model::now_ms();
        for req in &requests {
            let r: Vec<OpResult> = req
                .ops
                .iter()
                .map(|op| {
                    let before = next;
                    let r = self.stage(op, &mut p, &mut next, now);
                    let changed = next > before;
                    let acl = matches!(op, Op::Acl(_));
                    if audit_on && changed && (req.actor.is_some() || acl) {
                        p.audit
                            .push(audit_entry(op, before, time_ms, req.actor.as_deref()));
                    }
                    r
                })
                .collect();
            results.push(r);
        }
        self.stage_audit(&mut p);
        let last = next - 1;
        let n_ops: usize = requests.iter().map(|r| r.ops.len()).sum();
        // Every service that changed gets its record rewritten with its new revision; a
        // service left vacant loses its record, as it leaves memory (see `table`).
        for (key, (entry, st)) in &p.states {
            if st.revision > entry.state().revision {
                let value = (!st.is_vacant()).then(|| {
                    codec::encode_service(&codec::ServiceRecord {
                        revision: st.revision,
                        config: st.config.clone(),
                    })
                });
                p.mutations.push(Mutation {
                    key: codec::service_key(key),
                    value,
                });
            }
        }

        if !p.mutations.is_empty() {
            let started = std::time::Instant::now();
            // Followers need each delete's revision and reason, which the mutations lack.
            let journal = if role == Role::Leader {
                let deletes: Vec<codec::JournalDelete> = p
                    .events
                    .iter()
                    .filter_map(|e| match &e.kind {
                        EventKind::Delete { id, reason } => Some(codec::JournalDelete {
                            namespace: e.service.namespace.to_string(),
                            service: e.service.service.to_string(),
                            id: id.clone(),
                            revision: e.revision,
                            reason: *reason,
                        }),
                        _ => None,
                    })
                    .collect();
                codec::encode_journal(&deletes)
            } else {
                Vec::new()
            };
            let batch = Batch {
                revision: last,
                mutations: std::mem::take(&mut p.mutations),
                journal,
            };
            if let Err(e) = self.store.commit(batch).await {
                // A shared store may have applied it and lost the answer; followers would
                // then have it and this node not. Ask the store (while still leading).
                let landed = match self.store.committed_revision().await {
                    Some(Ok(h)) if role == Role::Leader => h >= last,
                    Some(Err(_)) if role == Role::Leader => {
                        self.uncertain = true;
                        false
                    }
                    _ => false,
                };
                if !landed {
                    tracing::error!(error = %e, ops = n_ops, "store commit failed; writes not acknowledged");
                    self.core.metrics.commit_failures.inc();
                    self.release(p.states);
                    for req in requests {
                        let _ = req.reply.send(Err(CoreError::Store(copy_of(&e))));
                    }
                    return;
                }
                tracing::warn!(error = %e, revision = last, "the store applied a batch whose answer was lost; acknowledging it");
            }
            let m = &self.core.metrics;
            m.commit_seconds.observe(started.elapsed().as_secs_f64());
            m.commit_batch_ops.observe(n_ops as f64);
            self.revision = last;
            self.publish(&mut p, now);
            self.publish_acl(&mut p);
        }
        self.release(std::mem::take(&mut p.states));
        // Lease changes apply even when nothing was written: an identical re-registration
        // renews its lease, and an expiry that found no instance drops the stale lease.
        for a in p.leases {
            match a {
                LeaseAction::Grant(k, ttl) => self.core.leases.grant(k, ttl, now),
                LeaseAction::Revoke(k) => self.core.leases.revoke(&k),
            }
        }
        for (req, r) in requests.into_iter().zip(results) {
            let _ = req.reply.send(Ok(r));
        }
    }

    /// Writes the batch's audit entries and deletes the oldest beyond the retention.
    fn stage_audit(&self, p: &mut Pending) {
        if p.audit.is_empty() {
            return;
        }
        let cap = self.core.config.audit_retention;
        if p.audit.len() > cap {
            p.audit.drain(..p.audit.len() - cap);
        }
        let kept = self.core.audit.lock();
        let excess = (kept.entries.len() + p.audit.len()).saturating_sub(cap);
        for old in kept.entries.iter().take(excess) {
            p.mutations.push(Mutation {
                key: codec::audit_key(old.revision),
                value: None,
            });
        }
        drop(kept);
        for e in &p.audit {
            p.mutations.push(Mutation {
                key: codec::audit_key(e.revision),
                value: Some(codec::encode_v1(e)),
            });
        }
    }

    /// After a durable commit: the new ACL tables and audit entries become visible.
    fn publish_acl(&self, p: &mut Pending) {
        if let Some(acl) = p.acl.take() {
            *self.core.acl.write() = Arc::new(acl);
            self.core.acl_changed.send_replace(self.revision);
        }
        if !p.audit.is_empty() {
            let cap = self.core.config.audit_retention;
            let mut log = self.core.audit.lock();
            for e in p.audit.drain(..) {
                if let Some(line) = &self.core.config.audit_sink {
                    line(&e);
                }
                log.entries.push_back(e);
            }
            while log.entries.len() > cap {
                log.entries.pop_front();
            }
        }
    }

    /// Stages an ACL change against the batch's working copy of the tables.
    fn acl(&self, op: &AclOp, p: &mut Pending) -> Result<Outcome, CoreError> {
        let acl = p
            .acl
            .get_or_insert_with(|| (**self.core.acl.read()).clone());
        let mut next = acl.clone();
        next.apply(op)?;
        *acl = next;
        match op {
            AclOp::Bootstrap(t) | AclOp::CreateToken(t) => {
                p.mutations.push(Mutation {
                    key: codec::token_key(&t.id),
                    value: Some(codec::encode_token(t)),
                });
                if matches!(op, AclOp::Bootstrap(_)) {
                    let admin = sextant_model::acl::Policy::global_admin();
                    p.mutations.push(Mutation {
                        key: codec::policy_key(&admin.name),
                        value: Some(codec::encode_v1(&admin)),
                    });
                    p.mutations.push(Mutation {
                        key: codec::BOOTSTRAP_KEY.into(),
                        value: Some(codec::encode_v1(&t.created_ms)),
                    });
                }
            }
            AclOp::RevokeToken(id) => p.mutations.push(Mutation {
                key: codec::token_key(id),
                value: None,
            }),
            AclOp::PutPolicy(pol) => p.mutations.push(Mutation {
                key: codec::policy_key(&pol.name),
                value: Some(codec::encode_v1(pol)),
            }),
            AclOp::DeletePolicy(name) => p.mutations.push(Mutation {
                key: codec::policy_key(name),
                value: None,
            }),
        }
        Ok(Outcome::Silent)
    }

    /// Gives back the entries a batch held, so vacant ones can leave memory.
    fn release(&self, states: HashMap<ServiceKey, (Arc<ServiceEntry>, ServiceState)>) {
        for (_, (entry, _)) in states {
            self.core.services.release(entry);
        }
    }

    fn publish(&self, p: &mut Pending, now: Instant) {
        let mut by_service: HashMap<ServiceKey, Vec<Arc<SharedEvent>>> = HashMap::new();
        let m = &self.core.metrics;
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
        let cap = self.core.config.event_log_per_service.max(1);
        let mut touched = Vec::with_capacity(p.states.len());
        let mut services_delta = 0i64;
        {
            let _gate = self.core.publish_gate.write();
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
            self.core.published.store(self.revision, Ordering::Release);
        }
        for (entry, rev) in touched {
            entry.changed.send_replace(rev);
            for n in entry.subscribers.lock().values() {
                n.notify_one();
            }
            self.core.services.release(entry);
        }
        self.core.published_tx.send_replace(self.revision);
        m.instances.inc_by(p.instance_delta);
        m.services.inc_by(services_delta);
        m.revision.set(self.revision as i64);
    }

    /// The batch's working copy of a service, taken from the published state on first use.
    fn state<'a>(&self, p: &'a mut Pending, key: &ServiceKey) -> &'a mut ServiceState {
        let (_, st) = p.states.entry(key.clone()).or_insert_with(|| {
            let entry = self.core.services.get_or_create(key);
            let st = (*entry.state()).clone();
            (entry, st)
        });
        st
    }

    /// Stages one operation into the batch: edits the working copies, records the store
    /// mutations and the event, and takes the next revision if it changed something.
    fn stage(&self, op: &Op, p: &mut Pending, next: &mut Revision, now: Instant) -> OpResult {
        let rev = *next;
        let outcome = match op {
            Op::Register(r) => self.register(r, p, rev),
            Op::Deregister { service, id } => self
                .remove(p, service, id, rev, DeleteReason::Deregistered)
                .map(Outcome::Changed),
            Op::Expire { service, id } => Ok(self.expire(service, id, p, rev, now)),
            Op::Status { service, id, patch } => self.status(service, id, patch, p, rev),
            Op::Configure { service, config } => Ok(self.configure(service, config, p, rev)),
            Op::DefaultCheck { service, check } => Ok(self.default_check(service, check, p, rev)),
            Op::Acl(a) => self.acl(a, p),
        }?;
        match outcome {
            Outcome::Changed(event) => {
                p.events.push(event);
                *next += 1;
                Ok(rev)
            }
            Outcome::Silent => {
                *next += 1;
                Ok(rev)
            }
            Outcome::Unchanged(r) => Ok(r),
        }
    }

    fn register(
        &self,
        r: &Registration,
        p: &mut Pending,
        rev: Revision,
    ) -> Result<Outcome, CoreError> {
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
        let old = self.state(p, &r.service).instances.get(&id).cloned();
        // A registration sets what the instance reports about itself and ends a drain (the
        // instance came back); the operator's weight override stays.
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
                    return Ok(Outcome::Unchanged(old.revision()));
                }
                p.mutations.push(Mutation {
                    key: codec::status_key(&r.service, &id),
                    value: Some(codec::encode_status(status, rev)),
                });
                let kind = EventKind::Status {
                    id: r.spec.id.to_string(),
                    status,
                };
                let inst = Instance {
                    status,
                    status_revision: rev,
                    ..old
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
        Ok(Outcome::Changed(Event {
            revision: rev,
            service: r.service.clone(),
            kind,
        }))
    }

    /// Removes an instance whose lease lapsed, if it is still lapsed (a heartbeat may have
    /// raced the sweeper).
    fn expire(
        &self,
        service: &ServiceKey,
        id: &Arc<str>,
        p: &mut Pending,
        rev: Revision,
        now: Instant,
    ) -> Outcome {
        let key = LeaseKey {
            service: service.clone(),
            id: id.clone(),
        };
        if !self.core.leases.is_expired(&key, now) {
            return Outcome::Unchanged(0); // renewed meanwhile
        }
        match self.remove(p, service, id, rev, DeleteReason::LeaseExpired) {
            Ok(ev) => {
                self.core.metrics.lease_expiries.inc();
                tracing::info!(service = %service, id = &**id, "lease expired; instance removed");
                Outcome::Changed(ev)
            }
            Err(_) => {
                p.leases.push(LeaseAction::Revoke(key));
                Outcome::Unchanged(0)
            }
        }
    }

    fn status(
        &self,
        service: &ServiceKey,
        id: &str,
        patch: &StatusPatch,
        p: &mut Pending,
        rev: Revision,
    ) -> Result<Outcome, CoreError> {
        let st = self.state(p, service);
        let Some(old) = st.instances.get(id).cloned() else {
            return Err(CoreError::NotFound(format!("instance {service}/{id}")));
        };
        let status = old.status.patched(patch, sextant_model::now_ms());
        if status == old.status {
            return Ok(Outcome::Unchanged(old.revision()));
        }
        st.instances.insert(
            id.into(),
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
        Ok(Outcome::Changed(Event {
            revision: rev,
            service: service.clone(),
            kind: EventKind::Status {
                id: id.to_string(),
                status,
            },
        }))
    }

    /// Settings change discovery answers (protection, checks) but no instance: no event.
    fn configure(
        &self,
        service: &ServiceKey,
        config: &ServiceConfig,
        p: &mut Pending,
        rev: Revision,
    ) -> Outcome {
        let st = self.state(p, service);
        if st.config == *config {
            return Outcome::Unchanged(st.revision);
        }
        st.config = config.clone();
        st.revision = rev;
        Outcome::Silent
    }

    /// A check for a service that has none; 0 (nothing done) when it has one.
    fn default_check(
        &self,
        service: &ServiceKey,
        check: &HealthCheck,
        p: &mut Pending,
        rev: Revision,
    ) -> Outcome {
        let current = &self.state(p, service).config;
        if current.check.kind != CheckKind::None {
            return Outcome::Unchanged(0);
        }
        let config = ServiceConfig {
            check: check.clone(),
            ..current.clone()
        };
        self.configure(service, &config, p, rev)
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

/// The audit log's record of one change made at `revision`.
fn audit_entry(op: &Op, revision: Revision, time_ms: u64, actor: Option<&Actor>) -> AuditEntry {
    let (namespace, change) = match op {
        Op::Register(r) => (
            Some(&r.service),
            format!("register {}/{}", r.service, r.spec.id),
        ),
        Op::Deregister { service, id } => (Some(service), format!("deregister {service}/{id}")),
        Op::Status { service, id, patch } => {
            (Some(service), format!("status {service}/{id} {patch:?}"))
        }
        Op::Configure { service, .. } => (Some(service), format!("configure {service}")),
        Op::DefaultCheck { service, .. } => (Some(service), format!("default check {service}")),
        Op::Expire { service, id } => (Some(service), format!("expire {service}/{id}")),
        Op::Acl(a) => (None, a.describe()),
    };
    AuditEntry {
        revision,
        time_ms,
        token_id: actor.and_then(|a| a.token_id.clone()),
        source: actor.map_or_else(|| "internal".into(), |a| a.source.clone()),
        protocol: actor.map_or_else(|| "internal".to_string(), |a| a.protocol.to_string()),
        namespace: namespace.map(|s| s.namespace.to_string()),
        change,
    }
}

/// A copy of a commit's error for each caller it fails, keeping the I/O error's kind (a full
/// disk stays `StorageFull` all the way to the adapters).
fn copy_of(e: &StoreError) -> StoreError {
    match e {
        StoreError::Disk { context, source } => StoreError::disk(
            context.clone(),
            std::io::Error::new(source.kind(), source.to_string()),
        ),
        StoreError::Io(m) => StoreError::Io(m.clone()),
        StoreError::Corrupt { key, reason } => StoreError::Corrupt {
            key: key.clone(),
            reason: reason.clone(),
        },
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Restart(m) => StoreError::Restart(m.clone()),
        StoreError::Fenced { revision, last } => StoreError::Fenced {
            revision: *revision,
            last: *last,
        },
    }
}
