//! The single writer: group commit, revisions, and publication after durability.
//!
//! It drains whatever requests are queued (up to `max_batch_ops`), applies each operation to a
//! copy-on-write copy of the touched services (one function per kind of operation), assigns
//! each change the next revision, commits the whole batch to the store, and only once that is
//! durable publishes the new states and events, wakes waiters and subscribers, applies lease
//! changes and acknowledges the callers. A failed commit publishes nothing and acknowledges
//! nobody.

use std::collections::HashMap;
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
use super::{Op, OpResult, RegistryCore, WriteRequest};
use crate::acl::{AclOp, AclState, Actor};
use crate::codec;
use crate::delivery::SharedEvent;
use crate::lease::LeaseKey;
use crate::metrics::EventLabels;
use crate::store::{Batch, Mutation, Store, StoreError};
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
    /// Last revision assigned and durable.
    pub revision: Revision,
}

impl Writer {
    pub async fn run(mut self, stopped: oneshot::Sender<()>) {
        let mut closing = self.core.closing.subscribe();
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
            let batch = Batch {
                revision: last,
                mutations: std::mem::take(&mut p.mutations),
            };
            if let Err(e) = self.store.commit(batch).await {
                tracing::error!(error = %e, ops = n_ops, "store commit failed; writes not acknowledged");
                self.core.metrics.commit_failures.inc();
                self.release(p.states);
                for req in requests {
                    let _ = req.reply.send(Err(CoreError::Store(copy_of(&e))));
                }
                return;
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
                    value: Some(codec::encode_v1(t)),
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
        protocol: actor.map_or("internal", |a| a.protocol).into(),
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
        StoreError::Fenced { revision, last } => StoreError::Fenced {
            revision: *revision,
            last: *last,
        },
    }
}
