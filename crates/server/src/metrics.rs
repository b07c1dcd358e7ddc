//! Metrics of the API adapters, in the node's own registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub api: &'static str,
    pub method: String,
    pub route: String,
    pub status: u16,
}

fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 18))
}

#[derive(Clone)]
pub struct ApiMetrics {
    pub requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub slow_disconnects: Counter,
}

impl ApiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::new_with_constructor(request_histogram),
            slow_disconnects: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("sextant");
        r.register(
            "request_seconds",
            "Request latency by API, method, route and status",
            m.requests.clone(),
        );
        r.register(
            "slow_subscriber_disconnects",
            "Watch streams closed because the client stopped reading",
            m.slow_disconnects.clone(),
        );
        m
    }

    pub fn observe(&self, api: &'static str, method: &str, route: &str, status: u16, secs: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                api,
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .observe(secs);
    }
}
