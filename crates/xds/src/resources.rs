//! The pure mapping from registry services to xDS resources: resource names, the four resource
//! types a proxyless gRPC client walks (Listener → RouteConfiguration → Cluster →
//! ClusterLoadAssignment), which instances become endpoints and how localities get their
//! priorities. No I/O and no state: the hub calls it once per (service, version) and shares
//! the encoded result.

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address, Address, AggregatedConfigSource,
    ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint,
    LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter::ConfigType, HttpConnectionManager,
    HttpFilter, Rds,
};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use sextant_core::model::{Health, Instance, ServiceKey};
use sextant_core::ServiceView;

/// The four resource types, in the order a response round should go out (Envoy warms clusters
/// until their endpoints arrive: CDS, EDS, then LDS, RDS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Cluster, Kind::Endpoint, Kind::Listener, Kind::Route];

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoint => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// The short name used in metrics, logs and `/v1/xds/clients` (`lds`, `rds`, `cds`, `eds`).
    pub fn label(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Route => "rds",
            Kind::Cluster => "cds",
            Kind::Endpoint => "eds",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether an empty subscription means "everything" (the legacy wildcard Envoy uses).
    pub fn allows_wildcard(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }
}

/// The resource name of a service: `{service}.{namespace}`, the target of `xds:///` URIs.
pub fn name(key: &ServiceKey) -> String {
    format!("{}.{}", key.service, key.namespace)
}

/// The service a resource name stands for: the namespace is after the last dot. `None` for a
/// name that is not `{service}.{namespace}` with valid parts (it never exists). A namespace
/// whose own name contains a dot cannot be addressed this way.
pub fn parse_name(name: &str) -> Option<ServiceKey> {
    let (service, namespace) = name.rsplit_once('.')?;
    ServiceKey::new(namespace, service).ok()
}

/// Where a client runs, from its bootstrap's `node.locality`; decides endpoint priorities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ClientLocality {
    pub region: String,
    pub zone: String,
}

/// One endpoint as it enters a load assignment: everything of an instance that xDS carries,
/// so two versions of a service with equal endpoint lists need no push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// The endpoints of a service: its serving instances (enabled, not draining, weight above 0,
/// not unhealthy), or, while the service's protection threshold has tripped, every instance
/// that is enabled, not draining and weighted, as discovery does. Hosts that are not IP
/// literals are left out (gRPC needs addresses), and so is a second instance at an address
/// already taken. Sorted by instance id, as the registry holds them.
pub fn endpoints(view: &ServiceView) -> Vec<Endpoint> {
    let mut seen = std::collections::HashSet::new();
    view.instances
        .iter()
        .filter(|i| included(i, view.protected))
        .filter_map(|i| {
            let ip: IpAddr = i.spec.host.parse().ok()?;
            seen.insert((ip, i.spec.port)).then(|| Endpoint {
                ip,
                port: i.spec.port,
                weight: i.status.effective_weight(),
                // A Consul-style warning still serves: gRPC clients are not all sure to route
                // to DEGRADED endpoints, so it is reported healthy.
                healthy: matches!(i.status.health, Health::Healthy | Health::Warning),
                region: i.spec.location.region.to_string(),
                zone: i.spec.location.zone.to_string(),
                sub_zone: i.spec.location.idc.to_string(),
            })
        })
        .collect()
}

fn included(i: &Instance, protected: bool) -> bool {
    if protected {
        i.status.enabled && !i.status.is_draining() && i.status.effective_weight() > 0
    } else {
        i.is_serving()
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// Packs a message as `Any` with its `type.googleapis.com/` URL.
pub fn any<M: prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The client-side listener gRPC resolves a target through: an `api_listener` holding an
/// HTTP connection manager that takes its routes over ADS, with the router filter (gRPC NACKs
/// a filter chain that does not end with it).
pub fn listener(name: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(ConfigType::TypedConfig(any(&Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&hcm)),
        }),
        ..Default::default()
    }
}

/// One virtual host whose domain is the target, routing everything to the service's cluster.
pub fn route(name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec![name.to_string()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(name.to_string())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An EDS cluster over ADS, balanced round robin.
pub fn cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_string(),
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        connect_timeout: Some(Duration {
            seconds: 5,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// How close an endpoint's locality is to the client: 0 = its zone, 1 = its region, 2 = the
/// rest. A client that states no locality sees everything as one.
fn proximity(client: &ClientLocality, region: &str, zone: &str) -> u32 {
    if !client.zone.is_empty() && client.zone == zone && client.region == region {
        0
    } else if !client.region.is_empty() && client.region == region {
        1
    } else {
        2
    }
}

/// The load assignment for one client locality: one `LocalityLbEndpoints` per
/// (region, zone, sub-zone), weighted by the sum of its endpoints' weights (at least 1: gRPC
/// skips a locality without a weight), with priorities by proximity renumbered without gaps
/// (the client's zone first, then its region, then the rest).
pub fn load_assignment(
    name: &str,
    endpoints: &[Endpoint],
    client: &ClientLocality,
) -> ClusterLoadAssignment {
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&Endpoint>> = BTreeMap::new();
    for e in endpoints {
        groups
            .entry((&e.region, &e.zone, &e.sub_zone))
            .or_default()
            .push(e);
    }
    let mut levels: Vec<u32> = groups
        .keys()
        .map(|(r, z, _)| proximity(client, r, z))
        .collect();
    levels.sort_unstable();
    levels.dedup();
    let priority = |p: u32| levels.iter().position(|l| *l == p).unwrap_or(0) as u32;
    let localities = groups
        .into_iter()
        .map(|((region, zone, sub_zone), eps)| {
            let weight: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
            LocalityLbEndpoints {
                locality: Some(Locality {
                    region: region.to_string(),
                    zone: zone.to_string(),
                    sub_zone: sub_zone.to_string(),
                }),
                lb_endpoints: eps.into_iter().map(lb_endpoint).collect(),
                load_balancing_weight: Some(UInt32Value {
                    value: weight.clamp(1, u64::from(u32::MAX)) as u32,
                }),
                priority: priority(proximity(client, region, zone)),
                ..Default::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: localities,
        ..Default::default()
    }
}

fn lb_endpoint(e: &Endpoint) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: e.ip.to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                        e.port,
                    ))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: if e.healthy {
            HealthStatus::Healthy as i32
        } else {
            HealthStatus::Unknown as i32
        },
        load_balancing_weight: Some(UInt32Value {
            value: e.weight.max(1),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    use proptest::prelude::*;
    use sextant_core::model::{InstanceSpec, InstanceStatus, Location, ServiceConfig};
    use std::sync::Arc;

    fn instance(
        id: &str,
        host: &str,
        region: &str,
        zone: &str,
        status: InstanceStatus,
    ) -> Instance {
        Instance {
            spec: Arc::new(InstanceSpec {
                id: id.into(),
                host: host.into(),
                port: 8080,
                protocol: "grpc".into(),
                version: "".into(),
                location: Location {
                    region: region.into(),
                    zone: zone.into(),
                    idc: "".into(),
                },
                cell: "".into(),
                lane: "".into(),
                metadata: Default::default(),
            }),
            status,
            ttl_seconds: 0,
            spec_revision: 1,
            status_revision: 1,
        }
    }

    fn view(instances: Vec<Instance>, protect: f32) -> ServiceView {
        let total = instances.len();
        let serving = instances.iter().filter(|i| i.is_serving()).count();
        let config = ServiceConfig {
            protect_threshold: protect,
            ..Default::default()
        };
        ServiceView {
            service: ServiceKey::new("prod", "orders").unwrap(),
            revision: 7,
            protected: config.protection_active(serving, total),
            config,
            instances,
        }
    }

    fn ok() -> InstanceStatus {
        InstanceStatus::default()
    }

    #[test]
    fn names_round_trip_and_refuse_what_is_not_service_dot_namespace() {
        let k = ServiceKey::new("prod", "orders.v2").unwrap();
        assert_eq!(name(&k), "orders.v2.prod");
        assert_eq!(parse_name("orders.v2.prod"), Some(k));
        assert_eq!(parse_name("orders"), None);
        assert_eq!(parse_name("orders."), None);
        assert_eq!(parse_name(".prod"), None);
        assert_eq!(parse_name("bad name.prod"), None);
        assert_eq!(
            parse_name("DEFAULT_GROUP@@orders.public"),
            Some(ServiceKey::new("public", "DEFAULT_GROUP@@orders").unwrap())
        );
    }

    #[test]
    fn only_serving_instances_with_ip_hosts_become_endpoints() {
        let drained = InstanceStatus {
            draining_since_ms: Some(1),
            ..ok()
        };
        let disabled = InstanceStatus {
            enabled: false,
            ..ok()
        };
        let zero = InstanceStatus { weight: 0, ..ok() };
        let sick = InstanceStatus {
            health: Health::Unhealthy,
            ..ok()
        };
        let v = view(
            vec![
                instance("a", "10.0.0.1", "", "", ok()),
                instance("b", "10.0.0.2", "", "", drained),
                instance("c", "10.0.0.3", "", "", disabled),
                instance("d", "10.0.0.4", "", "", zero),
                instance("e", "10.0.0.5", "", "", sick),
                instance("f", "host.example", "", "", ok()),
                instance("g", "10.0.0.1", "", "", ok()),
                instance("h", "::1", "", "", ok()),
            ],
            0.0,
        );
        let ips: Vec<String> = endpoints(&v).iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1", "::1"]);
    }

    #[test]
    fn protection_keeps_unhealthy_instances_but_never_drained_ones() {
        let sick = InstanceStatus {
            health: Health::Unhealthy,
            ..ok()
        };
        let drained = InstanceStatus {
            draining_since_ms: Some(1),
            ..ok()
        };
        let v = view(
            vec![
                instance("a", "10.0.0.1", "", "", sick),
                instance("b", "10.0.0.2", "", "", sick),
                instance("c", "10.0.0.3", "", "", drained),
            ],
            0.5,
        );
        assert!(v.protected);
        assert_eq!(endpoints(&v).len(), 2);
    }

    #[test]
    fn priorities_follow_proximity_without_gaps() {
        let v = view(
            vec![
                instance("a", "10.0.0.1", "eu", "eu-1", ok()),
                instance("b", "10.0.0.2", "eu", "eu-2", ok()),
                instance("c", "10.0.0.3", "us", "us-1", ok()),
            ],
            0.0,
        );
        let eps = endpoints(&v);
        let prio = |client: ClientLocality| -> Vec<(String, u32)> {
            load_assignment("orders.prod", &eps, &client)
                .endpoints
                .iter()
                .map(|l| (l.locality.clone().unwrap().zone, l.priority))
                .collect()
        };
        let c = |r: &str, z: &str| ClientLocality {
            region: r.into(),
            zone: z.into(),
        };
        assert_eq!(
            prio(c("eu", "eu-1")),
            [("eu-1".into(), 0), ("eu-2".into(), 1), ("us-1".into(), 2)]
        );
        // No endpoint in the client's zone: its region comes first, with no gap.
        assert_eq!(
            prio(c("eu", "eu-3")),
            [("eu-1".into(), 0), ("eu-2".into(), 0), ("us-1".into(), 1)]
        );
        assert_eq!(
            prio(ClientLocality::default()),
            [("eu-1".into(), 0), ("eu-2".into(), 0), ("us-1".into(), 0)]
        );
    }

    fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
        (
            0u8..8,
            1u16..4,
            0u32..10_001,
            proptest::bool::ANY,
            0usize..3,
            0usize..3,
        )
            .prop_map(|(ip, port, weight, healthy, r, z)| Endpoint {
                ip: IpAddr::from([10, 0, 0, ip]),
                port,
                weight,
                healthy,
                region: ["", "eu", "us"][r].into(),
                zone: ["", "z1", "z2"][z].into(),
                sub_zone: String::new(),
            })
    }

    proptest! {
        /// Every endpoint appears exactly once; every locality has a weight ≥ 1; priorities
        /// start at 0 and have no gaps; a locality in the client's zone is never behind one
        /// that is farther away.
        #[test]
        fn load_assignments_are_what_grpc_accepts(
            eps in proptest::collection::vec(arb_endpoint(), 0..20),
            r in 0usize..3,
            z in 0usize..3,
        ) {
            let client = ClientLocality {
                region: ["", "eu", "us"][r].into(),
                zone: ["", "z1", "z2"][z].into(),
            };
            let cla = load_assignment("s.ns", &eps, &client);
            let mut addrs = Vec::new();
            let mut prios: Vec<u32> = Vec::new();
            for l in &cla.endpoints {
                prop_assert!(l.load_balancing_weight.as_ref().unwrap().value >= 1);
                prios.push(l.priority);
                let loc = l.locality.as_ref().unwrap();
                for e in &l.lb_endpoints {
                    prop_assert!(e.load_balancing_weight.as_ref().unwrap().value >= 1);
                    let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                        panic!("no endpoint");
                    };
                    let Some(address::Address::SocketAddress(sa)) =
                        ep.address.as_ref().unwrap().address.as_ref() else { panic!("no address") };
                    addrs.push((sa.address.clone(), sa.port_specifier.clone(), loc.zone.clone()));
                }
                let near = proximity(&client, &loc.region, &loc.zone);
                for other in &cla.endpoints {
                    let o = other.locality.as_ref().unwrap();
                    if proximity(&client, &o.region, &o.zone) > near {
                        prop_assert!(other.priority > l.priority);
                    }
                }
            }
            prop_assert_eq!(addrs.len(), eps.len());
            prios.sort_unstable();
            prios.dedup();
            prop_assert_eq!(prios.clone(), (0..prios.len() as u32).collect::<Vec<_>>());
        }

        #[test]
        fn names_round_trip(service in "[a-z0-9][a-z0-9.@:_-]{0,20}", namespace in "[a-z0-9_-]{1,12}") {
            let key = ServiceKey::new(&namespace, &service).unwrap();
            prop_assert_eq!(parse_name(&name(&key)), Some(key));
        }
    }
}
