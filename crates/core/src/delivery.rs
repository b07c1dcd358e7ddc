//! Subscriptions: lossless, ordered, bounded delivery of changes to watchers.
//!
//! A subscription holds no queue. It holds, per subscribed service, a cursor: the revision up to
//! which it has delivered everything. When the writer publishes, it wakes the subscriptions of
//! the touched services; each one then reads, under the publish gate, every event after its
//! cursors from the services' shared logs and hands them over as one delivery. So one change is
//! stored once and shared by every subscriber, a slow subscriber gets everything it missed in one
//! coalesced delivery when it comes back, and a subscriber that fell further behind than the log
//! keeps gets a snapshot of that service instead. Memory per subscriber is constant.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use sextant_model::{Event, Revision, ServiceKey};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::registry::table::ServiceEntry;
use crate::registry::{RegistryCore, ServiceView};

/// An event as published: shared by every subscriber, encoded at most once per wire format.
#[derive(Debug)]
pub struct SharedEvent {
    pub event: Event,
    /// When it was published, to measure push latency.
    pub published_at: Instant,
    wire: OnceLock<Bytes>,
}

impl SharedEvent {
    pub(crate) fn new(event: Event, published_at: Instant) -> Self {
        Self {
            event,
            published_at,
            wire: OnceLock::new(),
        }
    }

    /// The event's encoding for the streaming adapter: computed by the first subscriber that
    /// needs it, reused by all the others.
    pub fn encoded(&self, encode: impl FnOnce(&Event) -> Bytes) -> Bytes {
        self.wire.get_or_init(|| encode(&self.event)).clone()
    }
}

/// The full current state of one service, sent instead of events when starting or resyncing.
#[derive(Debug, Clone)]
pub struct ServiceSnapshot {
    pub view: ServiceView,
    /// Whether this snapshot replaces history the subscriber missed (it fell behind), rather
    /// than starting a fresh subscription.
    pub resync: bool,
}

/// What a subscriber receives in one go.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Everything up to this revision has been delivered for every subscribed service: the
    /// revision to resume from.
    pub revision: Revision,
    /// Services whose state is sent whole (start or resync); never a service that also has
    /// events in this delivery. Adapters send them after the events and mark the end of the
    /// delivery with `revision`, the only safe resume point.
    pub snapshots: Vec<ServiceSnapshot>,
    /// Events in strictly increasing revision order.
    pub events: Vec<Arc<SharedEvent>>,
}

/// The subscription ended; the reason is meant for the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("subscription closed: {reason}")]
pub struct SubscriptionClosed {
    pub reason: String,
}

/// Longest wait of a follower's subscription for the node to reach its resume point. Long
/// enough for a node that just restarted to catch up under load (2 s was seen to be too short
/// on a loaded 2-core machine: the watcher then got a snapshot of an older state, a step back
/// in time); a cursor still ahead after it comes from another history.
pub(crate) const RESUME_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Cursor {
    entry: Arc<ServiceEntry>,
    /// Every event of this service at or below this revision has been delivered.
    revision: Revision,
}

/// A live subscription to a set of services. Dropping it unsubscribes.
pub struct Subscription {
    shared: Arc<RegistryCore>,
    id: u64,
    wake: Arc<Notify>,
    closing: watch::Receiver<Option<String>>,
    cursors: Vec<Cursor>,
    /// `None` until the first delivery; the resume point asked for.
    start: Option<Option<Revision>>,
}

impl Subscription {
    pub(crate) fn new(
        shared: Arc<RegistryCore>,
        mut services: Vec<ServiceKey>,
        since: Option<Revision>,
    ) -> Self {
        services.sort();
        services.dedup();
        let id = shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let cursors = services
            .iter()
            .map(|key| {
                let entry = shared.services.get_or_create(key);
                entry.subscribers.lock().insert(id, wake.clone());
                Cursor {
                    entry,
                    revision: since.unwrap_or(0),
                }
            })
            .collect();
        shared.metrics.subscribers.inc();
        let closing = shared.closing.subscribe();
        Self {
            shared,
            id,
            wake,
            closing,
            cursors,
            start: Some(since),
        }
    }

    /// The services this subscription covers.
    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.cursors.iter().map(|c| &c.entry.key)
    }

    /// Waits for and returns the next delivery. The first call returns at once (on a follower
    /// asked to resume from a revision it has not applied yet, once it has, or after
    /// `RESUME_WAIT`).
    pub async fn next(&mut self) -> Result<Delivery, SubscriptionClosed> {
        if let Some(Some(since)) = self.start {
            self.catch_up_to(since).await;
        }
        loop {
            if let Some(reason) = self.closing.borrow().clone() {
                return Err(SubscriptionClosed { reason });
            }
            if let Some(d) = self.collect() {
                return Ok(d);
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = self.closing.changed() => {}
            }
        }
    }

    /// A client that moves from a node ahead of this one (a follower applies the leader's
    /// batches a little later than another may) resumes from a revision this node has not
    /// reached: answering at once could only be a snapshot of an older state, taking the
    /// client back in time and repeating events. So a follower first waits, bounded, to apply
    /// up to it; a cursor still ahead after that comes from another history and gets a
    /// snapshot.
    ///
    /// The leader waits too: a follower can apply a batch from the store's feed a moment
    /// before the leader that committed it has published it. Only a single node (nobody can
    /// be ahead of it) answers at once.
    async fn catch_up_to(&mut self, since: Revision) {
        if matches!(*self.shared.role.borrow(), crate::Role::Single)
            || since <= self.shared.published.load(Ordering::Acquire)
        {
            return;
        }
        let mut rx = self.shared.published_tx.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(RESUME_WAIT, rx.wait_for(|r| *r >= since)) => {}
            _ = self.closing.changed() => {}
        }
    }

    fn collect(&mut self) -> Option<Delivery> {
        let start = self.start.take();
        let _cut = self.shared.publish_gate.read();
        let horizon = self.shared.published.load(Ordering::Acquire);
        let mut snapshots = Vec::new();
        let mut events = Vec::new();
        for c in &mut self.cursors {
            let inner = c.entry.inner.read();
            let fresh = matches!(start, Some(None));
            // A cursor ahead of the registry comes from another history (a wiped data dir):
            // the only safe answer is a snapshot.
            let lost = c.revision < inner.compacted_through || c.revision > horizon;
            if fresh || lost {
                if !fresh {
                    self.shared.metrics.resyncs.inc();
                }
                snapshots.push(ServiceSnapshot {
                    view: ServiceView::build(c.entry.key.clone(), &inner.state, false),
                    resync: !fresh,
                });
            } else {
                let first = inner
                    .log
                    .partition_point(|e| e.event.revision <= c.revision);
                events.extend(inner.log.range(first..).cloned());
            }
            c.revision = horizon;
        }
        if start.is_none() && snapshots.is_empty() && events.is_empty() {
            return None;
        }
        events.sort_by_key(|e| e.event.revision);
        Some(Delivery {
            revision: horizon,
            snapshots,
            events,
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for c in self.cursors.drain(..) {
            c.entry.subscribers.lock().remove(&self.id);
            // A watched name nobody registered leaves memory with its last watcher.
            self.shared.services.release(c.entry);
        }
        self.shared.metrics.subscribers.dec();
    }
}
