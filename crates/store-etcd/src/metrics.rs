//! The etcd store's metrics: the latency of its etcd requests by operation, and the node's
//! replication lag as its cluster renewals measure it. Registered into the node's registry by
//! the server ([`EtcdMetrics::register`]); a store opened without it keeps unregistered ones.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Which kind of etcd request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `commit` (a fenced transaction of a batch), `range` (reads: loads, the revision, the
    /// leader key, members), `watch` (opening the change feed's watch), `lease` (grant,
    /// renewal, revoke), `campaign` (the member record, the election's transaction and the
    /// cluster secret's creation).
    pub op: &'static str,
}

fn request_histogram() -> Histogram {
    // 100 µs .. ~6.5 s: a local etcd answers in a millisecond, a timeout takes seconds.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

#[derive(Clone)]
pub struct EtcdMetrics {
    /// Latency of each etcd request (failed ones included: a timeout shows as its length).
    pub requests: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// The store's head revision minus this node's applied revision, both read at the node's
    /// last cluster renewal (the number its member record and `/v1/cluster` show).
    pub lag: Gauge,
    /// The store's head revision at the last renewal.
    pub head: Gauge,
}

impl Default for EtcdMetrics {
    fn default() -> Self {
        Self {
            requests: Family::new_with_constructor(request_histogram),
            lag: Gauge::default(),
            head: Gauge::default(),
        }
    }
}

impl EtcdMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_etcd");
        r.register(
            "request_seconds",
            "Latency of the etcd store's requests to etcd, by operation (commit, range, watch, lease, campaign)",
            m.requests.clone(),
        );
        let c = registry.sub_registry_with_prefix("sextant_cluster");
        c.register(
            "replication_lag_revisions",
            "Revisions this node had not applied yet behind the store's head, at its last cluster renewal",
            m.lag.clone(),
        );
        c.register(
            "store_head_revision",
            "The store's head revision at this node's last cluster renewal",
            m.head.clone(),
        );
        m
    }

    pub(crate) fn observe(&self, op: &'static str, started: std::time::Instant) {
        self.requests
            .get_or_create(&OpLabels { op })
            .observe(started.elapsed().as_secs_f64());
    }
}
