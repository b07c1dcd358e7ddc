//! How Nacos names and instances map onto Sextant's, both ways. Pure functions, no I/O.
//!
//! - namespace: Nacos' empty or `public` namespace is Sextant's `public`; others map as-is.
//! - group + service: `DEFAULT_GROUP` + `svc` is Sextant's `svc`; group `G` + `svc` is
//!   `G@@svc`. A Sextant service named `G@@svc` is group `G` to Nacos, any other name is in
//!   `DEFAULT_GROUP`, so natively registered services are visible to Nacos clients unchanged.
//! - cluster: the instance's `cell`; the empty cell is Nacos' `DEFAULT` cluster.
//! - weight: Nacos' float weight 0-100 is Sextant's integer weight × 100 (1.0 is 100).
//! - healthy: anything but `unhealthy`; enabled: enabled and not draining.

use std::collections::BTreeMap;

use serde::Serialize;
use sextant_core::model::{
    Health, Instance, InstanceSpec, InstanceStatus, Location, Metadata, ServiceKey, Text,
};
use sextant_core::{Registry, ServiceView};

use crate::NacosError;

pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
pub const DEFAULT_CLUSTER: &str = "DEFAULT";
pub const PUBLIC: &str = "public";
const SEPARATOR: &str = "@@";
/// Nacos' largest weight that maps onto Sextant's 0-10000 (× 100).
pub const MAX_NACOS_WEIGHT: f64 = 100.0;
/// How often 1.x clients should beat, in ms (Nacos' default).
pub const BEAT_INTERVAL_MILLIS: u64 = 5000;
/// The protocol Sextant records for Nacos-registered instances (Nacos has none).
const NACOS_PROTOCOL: &str = "tcp";

/// Nacos' namespace id → Sextant namespace.
pub fn namespace(ns: Option<&str>) -> &str {
    match ns.map(str::trim) {
        None | Some("") => PUBLIC,
        Some(ns) => ns,
    }
}

/// A service as Nacos names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NacosService {
    pub group: String,
    pub name: String,
}

impl NacosService {
    /// From a `serviceName` that may already be grouped (`G@@svc`) and an optional group.
    pub fn parse(service: &str, group: Option<&str>) -> Result<Self, NacosError> {
        let service = service.trim();
        if service.is_empty() {
            return Err(NacosError::missing("serviceName"));
        }
        if let Some((g, s)) = service.split_once(SEPARATOR) {
            if g.is_empty() || s.is_empty() {
                return Err(NacosError::invalid(
                    "serviceName",
                    format!("{service:?} is not of the form group@@service"),
                ));
            }
            return Ok(Self {
                group: g.to_string(),
                name: s.to_string(),
            });
        }
        let group = match group.map(str::trim) {
            None | Some("") => DEFAULT_GROUP,
            Some(g) => g,
        };
        Ok(Self {
            group: group.to_string(),
            name: service.to_string(),
        })
    }

    /// The Nacos view of a Sextant service name.
    pub fn from_sextant(service: &str) -> Self {
        match service.split_once(SEPARATOR) {
            Some((g, s)) if !g.is_empty() && !s.is_empty() => Self {
                group: g.to_string(),
                name: s.to_string(),
            },
            _ => Self {
                group: DEFAULT_GROUP.to_string(),
                name: service.to_string(),
            },
        }
    }

    /// Sextant's name for this service.
    pub fn sextant_name(&self) -> String {
        if self.group == DEFAULT_GROUP {
            self.name.clone()
        } else {
            format!("{}{SEPARATOR}{}", self.group, self.name)
        }
    }

    /// `group@@service`, the form Nacos servers put in `serviceName` fields.
    pub fn grouped(&self) -> String {
        format!("{}{SEPARATOR}{}", self.group, self.name)
    }

    pub fn key(&self, ns: &str) -> Result<ServiceKey, NacosError> {
        ServiceKey::new(ns, &self.sextant_name()).map_err(|e| {
            let field = if e.field == "namespace" {
                "namespaceId"
            } else {
                "serviceName"
            };
            NacosError::invalid(field, e.reason)
        })
    }
}

/// A cluster name as given by a client; empty means `DEFAULT`.
pub fn cluster(c: Option<&str>) -> &str {
    match c.map(str::trim) {
        None | Some("") => DEFAULT_CLUSTER,
        Some(c) => c,
    }
}

/// The cell that stores a Nacos cluster.
pub fn cell_of(cluster: &str) -> Text {
    if cluster == DEFAULT_CLUSTER {
        Text::default()
    } else {
        cluster.into()
    }
}

/// The Nacos cluster of an instance.
pub fn cluster_of(spec: &InstanceSpec) -> &str {
    if spec.cell.is_empty() {
        DEFAULT_CLUSTER
    } else {
        spec.cell.as_str()
    }
}

/// `clusters=a,b` → the set to keep; empty keeps all.
pub fn cluster_filter(clusters: Option<&str>) -> Vec<String> {
    clusters
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

pub fn weight_to_sextant(w: f64) -> Result<u32, NacosError> {
    if !w.is_finite() || !(0.0..=MAX_NACOS_WEIGHT).contains(&w) {
        return Err(NacosError::invalid(
            "weight",
            format!("must be 0-{MAX_NACOS_WEIGHT} (Sextant keeps weight × 100), got {w}"),
        ));
    }
    // In range by the check above, so the cast cannot truncate.
    Ok((w * 100.0).round() as u32)
}

pub fn weight_to_nacos(w: u32) -> f64 {
    f64::from(w) / 100.0
}

/// The Sextant id of the instance a Nacos client names by ip, port and cluster.
pub fn instance_id(ip: &str, port: u16, cluster: &str) -> String {
    if cluster == DEFAULT_CLUSTER {
        format!("{ip}:{port}")
    } else {
        format!("{ip}:{port}:{cluster}")
    }
}

/// Finds the instance a Nacos client means by ip, port and cluster: Nacos identifies
/// instances by address, natively registered ones may carry any id.
pub fn find_instance(
    registry: &Registry,
    key: &ServiceKey,
    ip: &str,
    port: u16,
    cluster: &str,
) -> Option<Instance> {
    registry
        .instance(key, &instance_id(ip, port, cluster))
        .or_else(|| {
            registry.find_instance(key, |i| {
                i.spec.port == port && i.spec.host == ip && cluster_of(&i.spec) == cluster
            })
        })
}

/// Finds the instance an HTTP (1.x API) client means by its address. Nacos 2.x servers know an
/// HTTP client's instance by ip:port within the service, whatever its cluster: the old Python
/// SDK registers cluster `None` when given none and then deregisters, beats and modifies
/// without a cluster. So the named cluster is preferred when given, and otherwise (or when
/// nothing matches it) the instance at ip:port in any cluster is the one.
pub fn find_by_address(
    registry: &Registry,
    key: &ServiceKey,
    ip: &str,
    port: u16,
    cluster: Option<&str>,
) -> Option<Instance> {
    let named = cluster.map(str::trim).filter(|c| !c.is_empty());
    named
        .and_then(|c| find_instance(registry, key, ip, port, c))
        .or_else(|| find_instance(registry, key, ip, port, DEFAULT_CLUSTER))
        .or_else(|| registry.find_instance(key, |i| i.spec.port == port && i.spec.host == ip))
}

/// What a Nacos client registers.
#[derive(Debug, Clone)]
pub struct NacosRegistration {
    pub ip: String,
    pub port: u16,
    pub cluster: String,
    pub weight: f64,
    pub healthy: bool,
    pub enabled: bool,
    pub metadata: BTreeMap<String, String>,
}

impl NacosRegistration {
    /// The spec and status Sextant stores; `id` is the existing instance's id when the client
    /// re-registers an instance that was registered natively.
    pub fn to_sextant(
        &self,
        id: Option<&str>,
    ) -> Result<(InstanceSpec, InstanceStatus), NacosError> {
        if self.ip.trim().is_empty() {
            return Err(NacosError::missing("ip"));
        }
        if self.port == 0 {
            return Err(NacosError::invalid("port", "must be 1-65535, got 0"));
        }
        let id = id
            .map(str::to_string)
            .unwrap_or_else(|| instance_id(&self.ip, self.port, &self.cluster));
        let spec = InstanceSpec {
            id: id.into(),
            host: self.ip.as_str().into(),
            port: self.port,
            protocol: NACOS_PROTOCOL.into(),
            version: Text::default(),
            location: Location::default(),
            cell: cell_of(&self.cluster),
            lane: Text::default(),
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Metadata>(),
        };
        let status = InstanceStatus {
            health: if self.healthy {
                Health::Healthy
            } else {
                Health::Unhealthy
            },
            enabled: self.enabled,
            weight: weight_to_sextant(self.weight)?,
            ..InstanceStatus::default()
        };
        Ok((spec, status))
    }
}

/// An instance as Nacos clients read it (`com.alibaba.nacos.api.naming.pojo.Instance`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NacosInstance {
    pub instance_id: String,
    pub ip: String,
    pub port: u16,
    pub weight: f64,
    pub healthy: bool,
    pub enabled: bool,
    pub ephemeral: bool,
    pub cluster_name: String,
    pub service_name: String,
    pub metadata: BTreeMap<String, String>,
    pub instance_heart_beat_interval: u64,
    pub instance_heart_beat_time_out: u64,
    pub ip_delete_timeout: u64,
    pub instance_id_generator: &'static str,
}

impl NacosInstance {
    /// `default_timeout_ms` is what a persistent instance (no lease) reports as its beat
    /// timeout; an ephemeral one reports its own lease, which is when Sextant removes it.
    pub fn from_sextant(
        i: &Instance,
        svc: &NacosService,
        force_healthy: bool,
        default_timeout_ms: u64,
    ) -> Self {
        let cluster = cluster_of(&i.spec).to_string();
        let grouped = svc.grouped();
        let timeout_ms = if i.ttl_seconds > 0 {
            u64::from(i.ttl_seconds) * 1000
        } else {
            default_timeout_ms
        };
        Self {
            instance_id: format!("{}#{}#{}#{}", i.spec.host, i.spec.port, cluster, grouped),
            ip: i.spec.host.to_string(),
            port: i.spec.port,
            weight: weight_to_nacos(i.status.effective_weight()),
            healthy: force_healthy || i.status.health != Health::Unhealthy,
            enabled: i.status.enabled && !i.status.is_draining(),
            ephemeral: i.ttl_seconds > 0,
            cluster_name: cluster,
            service_name: grouped,
            metadata: i
                .spec
                .metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            instance_heart_beat_interval: BEAT_INTERVAL_MILLIS,
            instance_heart_beat_time_out: timeout_ms,
            // Sextant removes an ephemeral instance when its lease lapses, not later.
            ip_delete_timeout: timeout_ms,
            instance_id_generator: "simple",
        }
    }
}

/// `com.alibaba.nacos.api.naming.pojo.ServiceInfo`, what queries answer and pushes carry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInfo {
    pub name: String,
    pub group_name: String,
    pub clusters: String,
    pub cache_millis: u64,
    pub hosts: Vec<NacosInstance>,
    pub last_ref_time: u64,
    pub checksum: String,
    #[serde(rename = "allIPs")]
    pub all_ips: bool,
    pub reach_protection_threshold: bool,
    pub valid: bool,
}

/// How a query wants its `ServiceInfo` built.
#[derive(Debug, Clone, Default)]
pub struct InfoOptions {
    /// Put `group@@service` in `name` (the 1.x HTTP API does; 2.x gRPC sends the bare name).
    pub grouped_name: bool,
    pub clusters: Vec<String>,
    pub healthy_only: bool,
    pub cache_millis: u64,
    pub now_ms: u64,
    /// The beat timeout persistent instances report (the configured HTTP beat timeout).
    pub beat_timeout_ms: u64,
}

/// The parts of [`InfoOptions`] that change the encoding (all but the time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InfoVariant {
    grouped_name: bool,
    clusters: Vec<String>,
    healthy_only: bool,
    cache_millis: u64,
    beat_timeout_ms: u64,
}

impl InfoOptions {
    pub fn variant(&self) -> InfoVariant {
        InfoVariant {
            grouped_name: self.grouped_name,
            clusters: self.clusters.clone(),
            healthy_only: self.healthy_only,
            cache_millis: self.cache_millis,
            beat_timeout_ms: self.beat_timeout_ms,
        }
    }
}

/// Builds what a Nacos client expects from a service's current state: its enabled instances
/// (in the asked clusters). With the protection threshold tripped every one is returned and
/// marked healthy, as Nacos does.
pub fn service_info(view: &ServiceView, opts: &InfoOptions) -> ServiceInfo {
    let svc = NacosService::from_sextant(&view.service.service);
    // Nacos answers and pushes enabled instances only; a drained instance counts as disabled.
    let in_clusters: Vec<&Instance> = view
        .instances
        .iter()
        .filter(|i| i.status.enabled && !i.status.is_draining())
        .filter(|i| {
            opts.clusters.is_empty() || opts.clusters.iter().any(|c| c == cluster_of(&i.spec))
        })
        .collect();
    let serving = in_clusters.iter().filter(|i| i.is_serving()).count();
    let protected = view.config.protection_active(serving, in_clusters.len());
    // `healthyOnly` keeps what the model's serving rule serves; with protection tripped every
    // instance is reported healthy, so the rule is applied with health set aside.
    let hosts = in_clusters
        .into_iter()
        .filter(|i| {
            !opts.healthy_only
                || if protected {
                    InstanceStatus {
                        health: Health::Healthy,
                        ..i.status
                    }
                    .is_serving()
                } else {
                    i.is_serving()
                }
        })
        .map(|i| NacosInstance::from_sextant(i, &svc, protected, opts.beat_timeout_ms))
        .collect();
    ServiceInfo {
        name: if opts.grouped_name {
            svc.grouped()
        } else {
            svc.name.clone()
        },
        group_name: svc.group,
        clusters: opts.clusters.join(","),
        cache_millis: opts.cache_millis,
        hosts,
        last_ref_time: opts.now_ms,
        checksum: String::new(),
        all_ips: false,
        reach_protection_threshold: protected,
        valid: true,
    }
}

/// Parses Nacos' metadata: a JSON object of strings (non-string values are kept as their JSON
/// text), or the legacy `k1=v1,k2=v2` form.
pub fn parse_metadata(raw: &str) -> Result<BTreeMap<String, String>, NacosError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(BTreeMap::new());
    }
    if raw.starts_with('{') {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw)
            .map_err(|e| NacosError::invalid("metadata", format!("not a JSON object: {e}")))?;
        return Ok(v.into_iter().map(|(k, v)| (k, json_text(v))).collect());
    }
    raw.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(NacosError::invalid(
                "metadata",
                format!("{kv:?} is neither JSON nor key=value"),
            )),
        })
        .collect()
}

/// A JSON value as a metadata string.
pub fn json_text(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_group_maps_to_the_bare_name() {
        let s = NacosService::parse("orders", None).unwrap();
        assert_eq!(s.sextant_name(), "orders");
        assert_eq!(s.grouped(), "DEFAULT_GROUP@@orders");
        let g = NacosService::parse("orders", Some("payments")).unwrap();
        assert_eq!(g.sextant_name(), "payments@@orders");
        let already = NacosService::parse("payments@@orders", Some("ignored")).unwrap();
        assert_eq!(already, g);
        assert_eq!(NacosService::from_sextant("payments@@orders"), g);
        assert_eq!(NacosService::from_sextant("orders"), s);
        assert!(NacosService::parse("", None).is_err());
        assert!(NacosService::parse("@@x", None).is_err());
    }

    #[test]
    fn namespaces_and_clusters_default() {
        assert_eq!(namespace(None), "public");
        assert_eq!(namespace(Some("")), "public");
        assert_eq!(namespace(Some("dev")), "dev");
        assert_eq!(cluster(Some("")), "DEFAULT");
        assert_eq!(cell_of("DEFAULT"), "");
        assert_eq!(cluster_filter(Some("a, b,,")), vec!["a", "b"]);
    }

    #[test]
    fn weights_scale_by_one_hundred() {
        assert_eq!(weight_to_sextant(1.0).unwrap(), 100);
        assert_eq!(weight_to_sextant(0.5).unwrap(), 50);
        assert_eq!(weight_to_nacos(250), 2.5);
        assert!(weight_to_sextant(100.5).is_err());
        assert!(weight_to_sextant(-1.0).is_err());
        assert!(weight_to_sextant(f64::NAN).is_err());
    }

    #[test]
    fn metadata_forms() {
        let m = parse_metadata(r#"{"a":"1","b":2}"#).unwrap();
        assert_eq!(m["a"], "1");
        assert_eq!(m["b"], "2");
        let m = parse_metadata("k=v, x=y").unwrap();
        assert_eq!(m["x"], "y");
        assert!(parse_metadata("{not json").is_err());
        assert!(parse_metadata("novalue").is_err());
    }

    proptest! {
        /// Every valid (group, service) pair survives the trip through a Sextant name.
        #[test]
        fn names_round_trip(group in "[A-Za-z0-9_.-]{1,20}", name in "[A-Za-z0-9_.:-]{1,40}") {
            let s = NacosService::parse(&name, Some(&group)).unwrap();
            let back = NacosService::from_sextant(&s.sextant_name());
            prop_assert_eq!(back, s.clone());
            prop_assert!(s.key("public").is_ok());
        }

        #[test]
        fn weights_round_trip(w in 0u32..=10_000) {
            prop_assert_eq!(weight_to_sextant(weight_to_nacos(w)).unwrap(), w);
        }
    }
}
