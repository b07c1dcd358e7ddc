//! Metrics of the Nacos adapter, in the node's registry under `sextant_nacos_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `http` (1.x) or `grpc` (2.x).
    pub protocol: &'static str,
    /// The endpoint or request type.
    pub request: String,
    /// `ok` or the error's class.
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct NacosMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub pushes: Counter,
    pub push_acks: Counter,
    /// From the core publishing a change to its push being handed to the connection.
    pub push_latency: Histogram,
    /// Answers that failed to encode (a bug; each was answered with a 500-class error).
    pub encode_failures: Counter,
    /// 1.x clients remembered for UDP push.
    pub udp_clients: Gauge,
    pub udp_pushes: Counter,
    pub udp_acks: Counter,
    pub udp_retries: Counter,
    /// Pushes given up on after every retry went unacknowledged.
    pub udp_unacked: Counter,
    /// Clients not taken because the client table was full (they poll).
    pub udp_refused: Counter,
    /// Services too large for one datagram (their clients poll).
    pub udp_too_large: Counter,
}

impl Default for NacosMetrics {
    /// Metrics registered nowhere (tests).
    fn default() -> Self {
        Self {
            requests: Family::default(),
            connections: Gauge::default(),
            subscriptions: Gauge::default(),
            pushes: Counter::default(),
            push_acks: Counter::default(),
            push_latency: Histogram::new(exponential_buckets(0.00005, 2.0, 18)),
            encode_failures: Counter::default(),
            udp_clients: Gauge::default(),
            udp_pushes: Counter::default(),
            udp_acks: Counter::default(),
            udp_retries: Counter::default(),
            udp_unacked: Counter::default(),
            udp_refused: Counter::default(),
            udp_too_large: Counter::default(),
        }
    }
}

impl NacosMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_nacos");
        r.register(
            "requests",
            "Nacos requests by protocol, request and outcome",
            m.requests.clone(),
        );
        for (name, help, c) in [
            ("udp_pushes", "Nacos 1.x UDP pushes sent", &m.udp_pushes),
            ("udp_acks", "Nacos 1.x UDP pushes acknowledged", &m.udp_acks),
            (
                "udp_retries",
                "Nacos 1.x UDP pushes sent again for want of an ack",
                &m.udp_retries,
            ),
            (
                "udp_unacked",
                "Nacos 1.x UDP pushes given up after every retry",
                &m.udp_unacked,
            ),
            (
                "udp_refused",
                "Nacos 1.x clients not taken for UDP push: the table was full",
                &m.udp_refused,
            ),
            (
                "udp_too_large",
                "Nacos 1.x UDP pushes not sent: larger than a datagram",
                &m.udp_too_large,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "udp_clients",
            "Nacos 1.x clients remembered for UDP push",
            m.udp_clients.clone(),
        );
        r.register(
            "connections",
            "Open Nacos 2.x gRPC connections",
            m.connections.clone(),
        );
        r.register(
            "subscriptions",
            "Services subscribed to over Nacos 2.x connections",
            m.subscriptions.clone(),
        );
        r.register(
            "pushes",
            "NotifySubscriberRequest pushes sent",
            m.pushes.clone(),
        );
        r.register(
            "push_acks",
            "NotifySubscriberResponse acks received",
            m.push_acks.clone(),
        );
        r.register(
            "push_seconds",
            "From a change being published to its push being queued on the connection",
            m.push_latency.clone(),
        );
        r.register(
            "encode_failures",
            "Nacos answers that failed to encode and were answered with a 500-class error",
            m.encode_failures.clone(),
        );
        m
    }

    /// Counts one request; `outcome` is `ok` or an [`sextant_core::ErrorKind`] label.
    pub fn request(&self, protocol: &'static str, request: &str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                protocol,
                request: request.to_string(),
                outcome,
            })
            .inc();
    }
}
