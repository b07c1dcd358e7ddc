//! Metrics of the Eureka adapter, in the node's registry under `sextant_eureka_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The endpoint (`register`, `renew`, `cancel`, `apps`, `app`, `instance`, ...).
    pub endpoint: &'static str,
    /// `ok` or the error's class.
    pub outcome: &'static str,
}

#[derive(Clone, Default)]
pub struct EurekaMetrics {
    pub requests: Family<RequestLabels, Counter>,
}

impl EurekaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_eureka");
        r.register(
            "requests",
            "Eureka REST requests by endpoint and outcome",
            m.requests.clone(),
        );
        m
    }

    pub(crate) fn observe(&self, endpoint: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
    }
}
