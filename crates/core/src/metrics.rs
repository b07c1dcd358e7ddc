//! The core's metrics, registered into a registry the caller owns (one per node, so several
//! nodes can live in one test process).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct CoreMetrics {
    pub instances: Gauge,
    pub services: Gauge,
    /// Services held in memory, including vacant ones someone waits on or watches.
    pub service_entries: Gauge,
    pub subscribers: Gauge,
    pub revision: Gauge,
    pub commit_seconds: Histogram,
    pub commit_batch_ops: Histogram,
    pub commit_failures: Counter,
    pub lease_expiries: Counter,
    pub events: Family<EventLabels, Counter>,
    /// Time from a change being published to its delivery to one subscriber.
    pub push_seconds: Histogram,
    pub resyncs: Counter,
    /// Cluster mode, on a follower: operations and lease renewals sent to the leader, the
    /// forwarding calls' latency, and calls that failed (no leader, unreachable, refused).
    pub forwarded_ops: Counter,
    pub forwarded_renewals: Counter,
    pub forward_seconds: Histogram,
    pub forward_failures: Counter,
    /// On the leader: operations and renewals followers forwarded.
    pub forward_received_ops: Counter,
    pub forward_received_renewals: Counter,
    /// Requests, connections and writes refused by admission (see `admission`).
    pub refusals: Family<RefusalLabels, Counter>,
    pub requests_in_flight: Gauge,
    pub connections_open: Gauge,
    /// Writes waiting for the writer.
    pub write_queue: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RefusalLabels {
    /// `rate_per_source`, `rate_per_token`, `max_requests`, `max_connections`, `shed_write`.
    pub reason: &'static str,
    /// The protocol of the request, or the listener of the connection.
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct EventLabels {
    pub kind: &'static str,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self {
            instances: Gauge::default(),
            services: Gauge::default(),
            service_entries: Gauge::default(),
            subscribers: Gauge::default(),
            revision: Gauge::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commit_batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commit_failures: Counter::default(),
            lease_expiries: Counter::default(),
            events: Family::default(),
            push_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            resyncs: Counter::default(),
            refusals: Family::default(),
            requests_in_flight: Gauge::default(),
            connections_open: Gauge::default(),
            write_queue: Gauge::default(),
            forwarded_ops: Counter::default(),
            forwarded_renewals: Counter::default(),
            forward_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            forward_failures: Counter::default(),
            forward_received_ops: Counter::default(),
            forward_received_renewals: Counter::default(),
        }
    }
}

impl CoreMetrics {
    /// Creates the metrics and registers them under `sextant_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant");
        r.register(
            "instances",
            "Instances in the registry",
            m.instances.clone(),
        );
        r.register(
            "services",
            "Services with at least one instance",
            m.services.clone(),
        );
        r.register(
            "service_entries",
            "Services held in memory, including vacant ones that are waited on or watched",
            m.service_entries.clone(),
        );
        r.register(
            "subscribers",
            "Open subscriptions (watch streams)",
            m.subscribers.clone(),
        );
        r.register("revision", "Latest durable revision", m.revision.clone());
        r.register(
            "store_commit_seconds",
            "Durable commit latency of one batch",
            m.commit_seconds.clone(),
        );
        r.register(
            "store_commit_batch_ops",
            "Operations per durable commit (group commit)",
            m.commit_batch_ops.clone(),
        );
        r.register(
            "store_commit_failures",
            "Commits the store refused; their writes were not acknowledged",
            m.commit_failures.clone(),
        );
        r.register(
            "lease_expiries",
            "Ephemeral instances removed because their lease lapsed",
            m.lease_expiries.clone(),
        );
        r.register(
            "events",
            "Registry events published, by kind",
            m.events.clone(),
        );
        r.register(
            "push_seconds",
            "Time from publication of a change to its hand-off to a subscriber's stream",
            m.push_seconds.clone(),
        );
        r.register(
            "subscriber_resyncs",
            "Snapshots sent to subscribers that fell behind the change log",
            m.resyncs.clone(),
        );
        r.register(
            "refusals",
            "Requests, connections and writes refused to protect the node, by reason \
             (rate_per_source, rate_per_token, max_requests, max_connections, shed_write) and \
             protocol or listener",
            m.refusals.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests being handled (blocking queries included), against max_requests",
            m.requests_in_flight.clone(),
        );
        r.register(
            "connections_open",
            "Open TCP connections over all listeners, against max_connections",
            m.connections_open.clone(),
        );
        r.register(
            "write_queue",
            "Writes waiting for the writer, against shed_write_queue",
            m.write_queue.clone(),
        );
        r.register(
            "forwarded_ops",
            "Writes a follower sent to the cluster's leader",
            m.forwarded_ops.clone(),
        );
        r.register(
            "forwarded_renewals",
            "Lease renewals a follower sent to the cluster's leader",
            m.forwarded_renewals.clone(),
        );
        r.register(
            "forward_seconds",
            "Latency of a follower's forwarding call to the leader (until the leader's answer)",
            m.forward_seconds.clone(),
        );
        r.register(
            "forward_failures",
            "Forwarding calls that failed: no leader known, unreachable, or refused",
            m.forward_failures.clone(),
        );
        r.register(
            "forward_received_ops",
            "Writes this node applied for followers (as the leader)",
            m.forward_received_ops.clone(),
        );
        r.register(
            "forward_received_renewals",
            "Lease renewals this node applied for followers (as the leader)",
            m.forward_received_renewals.clone(),
        );
        m
    }
}
