//! The scanner's metrics: probes by kind and result, probe latency, cycle lag, targets,
//! protection trips, suspect reports and status flips.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub kind: &'static str,
    /// `ok`, or the failure: `refused`, `timeout`, `unhealthy`, `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct HealthMetrics {
    pub probes: Family<ProbeLabels, Counter>,
    pub probe_seconds: Histogram,
    /// How late probes start against their schedule.
    pub cycle_lag_seconds: Histogram,
    /// The largest lag seen in the last second.
    pub cycle_lag_max_ms: Gauge,
    pub targets: Gauge,
    pub unhealthy_targets: Gauge,
    pub protection_trips: Counter,
    pub protected_services: Gauge,
    pub suspects: Family<OutcomeLabels, Counter>,
    pub flips: Family<OutcomeLabels, Counter>,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        Self {
            probes: Family::default(),
            probe_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 18)),
            cycle_lag_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            cycle_lag_max_ms: Gauge::default(),
            targets: Gauge::default(),
            unhealthy_targets: Gauge::default(),
            protection_trips: Counter::default(),
            protected_services: Gauge::default(),
            suspects: Family::default(),
            flips: Family::default(),
        }
    }
}

impl HealthMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_health");
        r.register(
            "probes",
            "Probes by check kind and result",
            m.probes.clone(),
        );
        r.register("probe_seconds", "Probe latency", m.probe_seconds.clone());
        r.register(
            "cycle_lag_seconds",
            "How late probes start against their schedule",
            m.cycle_lag_seconds.clone(),
        );
        r.register(
            "cycle_lag_max_ms",
            "Largest probe lag in the last second, in milliseconds",
            m.cycle_lag_max_ms.clone(),
        );
        r.register("targets", "Instances being probed", m.targets.clone());
        r.register(
            "unhealthy_targets",
            "Probed instances currently unhealthy",
            m.unhealthy_targets.clone(),
        );
        r.register(
            "protection_trips",
            "Times mass-failure protection held back unhealthy flips",
            m.protection_trips.clone(),
        );
        r.register(
            "protected_services",
            "Services whose unhealthy flips are being held back now",
            m.protected_services.clone(),
        );
        r.register("suspects", "Suspect reports by outcome", m.suspects.clone());
        r.register(
            "flips",
            "Health changes written, by new health",
            m.flips.clone(),
        );
        m
    }
}
