//! Metrics of the Consul adapter, in the node's registry under `sextant_consul_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The endpoint (`register`, `health_service`, `check_update`, ...).
    pub endpoint: &'static str,
    /// `ok` or the error's class.
    pub outcome: &'static str,
}

#[derive(Clone, Default)]
pub struct ConsulMetrics {
    pub requests: Family<RequestLabels, Counter>,
    /// Blocking queries parked now.
    pub blocking: Gauge,
    /// TTL checks the agent tracks.
    pub ttl_checks: Gauge,
    /// TTL checks that went critical because no report came in time.
    pub ttl_expired: Counter,
    /// Instances removed by `DeregisterCriticalServiceAfter`.
    pub reaped: Counter,
}

impl ConsulMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_consul");
        r.register(
            "requests",
            "Consul HTTP requests by endpoint and outcome",
            m.requests.clone(),
        );
        r.register(
            "blocking_queries",
            "Consul blocking queries waiting now",
            m.blocking.clone(),
        );
        r.register("ttl_checks", "TTL checks tracked", m.ttl_checks.clone());
        r.register(
            "ttl_expired",
            "TTL checks that went critical for want of a report",
            m.ttl_expired.clone(),
        );
        r.register(
            "deregistered_critical",
            "Instances removed for staying critical longer than DeregisterCriticalServiceAfter",
            m.reaped.clone(),
        );
        m
    }

    pub(crate) fn observe(&self, endpoint: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
    }
}
