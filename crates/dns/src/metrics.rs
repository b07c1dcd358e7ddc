//! Metrics of the DNS adapter, in the node's registry under `sextant_dns_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    /// `A`, `AAAA`, `SRV`, ... (`other` for the rest).
    pub r#type: &'static str,
    /// `answer`, `nodata`, `nxdomain`, `refused`, `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Default)]
pub struct DnsMetrics {
    pub queries: Family<QueryLabels, Counter>,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_dns");
        r.register(
            "queries",
            "DNS queries by transport, record type and outcome",
            m.queries.clone(),
        );
        m
    }
}
