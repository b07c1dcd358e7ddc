//! Metrics of the xDS adapter, in the node's registry under `sextant_xds_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `sotw` (state of the world) or `delta`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub protocol: &'static str,
    /// `lds`, `rds`, `cds` or `eds`.
    pub r#type: &'static str,
}

#[derive(Clone)]
pub struct XdsMetrics {
    pub streams: Family<StreamLabels, Gauge>,
    pub responses: Family<TypeLabels, Counter>,
    pub nacks: Family<TypeLabels, Counter>,
    /// Requests whose nonce was not the last one sent for their type (ignored).
    pub stale: Counter,
    /// Services that some stream subscribes to (each has one feed and one encoded copy).
    pub slots: Gauge,
    /// From the registry publishing a change to an EDS response carrying it being handed to
    /// the stream (includes the debounce).
    pub push_latency: Histogram,
}

impl Default for XdsMetrics {
    /// Metrics registered nowhere (tests).
    fn default() -> Self {
        Self {
            streams: Family::default(),
            responses: Family::default(),
            nacks: Family::default(),
            stale: Counter::default(),
            slots: Gauge::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        }
    }
}

impl XdsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_xds");
        r.register("streams", "Open ADS streams", m.streams.clone());
        r.register(
            "responses",
            "ADS responses sent, by protocol and resource type",
            m.responses.clone(),
        );
        r.register(
            "nacks",
            "ADS responses a client rejected (NACK), by protocol and resource type",
            m.nacks.clone(),
        );
        r.register(
            "stale_requests",
            "ADS requests ignored because their nonce was not the latest",
            m.stale.clone(),
        );
        r.register(
            "services",
            "Services subscribed over xDS (one shared feed and encoding each)",
            m.slots.clone(),
        );
        r.register(
            "push_latency_seconds",
            "From a registry change to the EDS response carrying it",
            m.push_latency.clone(),
        );
        m
    }
}
