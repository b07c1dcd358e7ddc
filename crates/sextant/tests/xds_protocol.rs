//! The xDS (ADS) server of the real binary, driven by a scripted ADS client for the protocol's
//! edge cases: the LDS → RDS → CDS → EDS chain gRPC walks, ACK (no push) and NACK (counted,
//! never answered with the same resources in a loop), stale nonces, a name that does not
//! exist yet answered when its service appears, every subscribed listener in each LDS answer,
//! a reconnect with a previous version, delta subscribe / unsubscribe / wildcard / removal,
//! and many resources on one stream. The real gRPC clients are in `xds_clients.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// How long "nothing is sent" is waited for.
const QUIET: Duration = Duration::from_millis(400);
/// Bound of waiting for a response that must come.
const WITHIN: Duration = Duration::from_secs(5);

async fn client(addr: SocketAddr) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the xDS server")
}

/// A state-of-the-world ADS stream.
struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(addr: SocketAddr) -> Sotw {
        let (tx, out) = mpsc::channel(16);
        let rx = client(addr)
            .await
            .stream_aggregated_resources(ReceiverStream::new(out))
            .await
            .expect("open an ADS stream")
            .into_inner();
        Sotw { tx, rx }
    }

    async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.expect("send a request");
    }

    /// The first request of a type, with the node (gRPC sends it on each first request).
    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            node: Some(node("test-node", "r1", "z1")),
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            version_info: r.version_info.clone(),
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self, within: Duration) -> Option<DiscoveryResponse> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(r))) => Some(r),
            Ok(other) => panic!("ADS stream ended: {other:?}"),
            Err(_) => None,
        }
    }

    async fn expect(&mut self, type_url: &str) -> DiscoveryResponse {
        let r = self
            .next(WITHIN)
            .await
            .unwrap_or_else(|| panic!("no {type_url} response within {WITHIN:?}"));
        assert_eq!(r.type_url, type_url, "response of another type: {r:?}");
        r
    }

    async fn expect_quiet(&mut self) {
        if let Some(r) = self.next(QUIET).await {
            panic!("expected no response, got {} {r:?}", r.type_url);
        }
    }
}

fn node(id: &str, region: &str, zone: &str) -> Node {
    Node {
        id: id.into(),
        locality: Some(Locality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    }
}

fn decode<M: Message + Default>(r: &DiscoveryResponse) -> Vec<M> {
    r.resources
        .iter()
        .map(|a| M::decode(a.value.as_slice()).expect("decode a resource"))
        .collect()
}

/// `host:port` of every endpoint of a load assignment, with its locality's priority.
fn endpoints(cla: &ClusterLoadAssignment) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for l in &cla.endpoints {
        for e in &l.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("no endpoint in {e:?}")
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                panic!("no socket address in {ep:?}")
            };
            let Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                    port,
                ),
            ) = sa.port_specifier
            else {
                panic!("no port")
            };
            out.push((format!("{}:{port}", sa.address), l.priority));
        }
    }
    out.sort();
    out
}

fn located(host: &str, port: u16, zone: &str) -> serde_json::Value {
    json!({"host": host, "port": port, "location": {"region": "r1", "zone": zone}})
}

#[tokio::test]
async fn sotw_chain_ack_nack_and_changes() {
    let server = Server::start();
    let api = server.api();
    api.register("prod", "orders", "a", &located("10.0.0.1", 80, "z1"))
        .await;
    api.register("prod", "orders", "b", &located("10.0.0.2", 80, "z2"))
        .await;
    let mut s = Sotw::open(server.grpc).await;

    // LDS: a client listener whose HTTP connection manager takes its routes over ADS and
    // ends with the router filter.
    s.subscribe(LDS, &["orders.prod"]).await;
    let lds = s.expect(LDS).await;
    let listeners: Vec<Listener> = decode(&lds);
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].name, "orders.prod");
    let hcm = HttpConnectionManager::decode(
        listeners[0]
            .api_listener
            .as_ref()
            .and_then(|a| a.api_listener.as_ref())
            .expect("api_listener")
            .value
            .as_slice(),
    )
    .expect("an HttpConnectionManager");
    let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
        panic!("routes are not over RDS: {hcm:?}")
    };
    assert_eq!(rds.route_config_name, "orders.prod");
    assert_eq!(
        hcm.http_filters.last().map(|f| f.name.as_str()),
        Some("envoy.filters.http.router")
    );
    // An ACK is not answered.
    s.ack(&lds, &["orders.prod"]).await;
    s.expect_quiet().await;

    s.subscribe(RDS, &["orders.prod"]).await;
    let rds = s.expect(RDS).await;
    let routes: Vec<RouteConfiguration> = decode(&rds);
    assert_eq!(routes[0].virtual_hosts[0].domains, ["orders.prod"]);
    s.ack(&rds, &["orders.prod"]).await;

    s.subscribe(CDS, &["orders.prod"]).await;
    let cds = s.expect(CDS).await;
    let clusters: Vec<Cluster> = decode(&cds);
    assert_eq!(clusters[0].name, "orders.prod");
    s.ack(&cds, &["orders.prod"]).await;

    s.subscribe(EDS, &["orders.prod"]).await;
    let eds = s.expect(EDS).await;
    let cla: Vec<ClusterLoadAssignment> = decode(&eds);
    // The client is in zone z1: its zone's endpoint first.
    assert_eq!(
        endpoints(&cla[0]),
        [("10.0.0.1:80".into(), 0), ("10.0.0.2:80".into(), 1)]
    );
    s.ack(&eds, &["orders.prod"]).await;
    s.expect_quiet().await;

    // A drain is pushed as a new EDS version with a fresh nonce.
    api.post(
        &format!("{}/drain", instance_path("prod", "orders", "a")),
        &json!({}),
    )
    .await
    .ok();
    let eds2 = s.expect(EDS).await;
    assert_ne!(eds2.version_info, eds.version_info);
    assert_ne!(eds2.nonce, eds.nonce);
    assert_eq!(
        endpoints(&decode::<ClusterLoadAssignment>(&eds2)[0]),
        [("10.0.0.2:80".into(), 0)]
    );

    // A NACK is counted and shown, and the same resources are not sent again.
    s.send(DiscoveryRequest {
        version_info: eds.version_info.clone(),
        type_url: EDS.into(),
        response_nonce: eds2.nonce.clone(),
        resource_names: vec!["orders.prod".into()],
        error_detail: Some(RpcStatus {
            code: 3,
            message: "test rejects this".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    s.expect_quiet().await;
    let clients = api.get("/v1/xds/clients").await.ok();
    let c = &clients["clients"][0];
    assert_eq!(c["node_id"], "test-node");
    assert_eq!(c["zone"], "z1");
    assert_eq!(c["types"]["eds"]["nacks"], 1);
    assert_eq!(c["types"]["eds"]["last_nack"], "test rejects this");
    assert_eq!(
        c["types"]["lds"]["acked_version"],
        lds.version_info.as_str()
    );
    assert_eq!(
        metric(
            &api,
            "sextant_xds_nacks_total{protocol=\"sotw\",type=\"eds\"}"
        )
        .await,
        1.0
    );

    // A request with a stale nonce is ignored, even though it names a new resource.
    s.send(DiscoveryRequest {
        type_url: EDS.into(),
        response_nonce: eds.nonce.clone(),
        resource_names: vec!["orders.prod".into(), "users.prod".into()],
        ..Default::default()
    })
    .await;
    s.expect_quiet().await;

    // The next change is pushed again after the NACK.
    api.register("prod", "orders", "c", &located("10.0.0.3", 80, "z1"))
        .await;
    let eds3 = s.expect(EDS).await;
    assert_eq!(
        endpoints(&decode::<ClusterLoadAssignment>(&eds3)[0]),
        [("10.0.0.2:80".into(), 1), ("10.0.0.3:80".into(), 0)]
    );
    assert!(metric(&api, "sextant_xds_push_latency_seconds_count").await >= 2.0);
}

#[tokio::test]
async fn names_that_do_not_exist_yet_are_answered_when_they_appear() {
    let server = Server::start();
    let api = server.api();
    api.register("prod", "orders", "a", &inst("10.0.0.1", 80))
        .await;
    let mut s = Sotw::open(server.grpc).await;

    // Nothing asked for exists: the server stays silent instead of saying "does not exist".
    s.subscribe(LDS, &["later.prod"]).await;
    s.expect_quiet().await;
    api.register("prod", "later", "x", &inst("10.0.0.9", 80))
        .await;
    let lds = s.expect(LDS).await;
    let names: Vec<String> = decode::<Listener>(&lds)
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["later.prod"]);
    s.ack(&lds, &["later.prod"]).await;

    // Adding a name is answered with every subscribed listener that exists; one that does not
    // exist yet joins the answer when its service appears (leaving a listener out of an LDS
    // answer would delete it).
    let all = ["later.prod", "orders.prod", "soon.prod"];
    s.ack(&lds, &all).await;
    let lds2 = s.expect(LDS).await;
    let names: Vec<String> = decode::<Listener>(&lds2)
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["later.prod", "orders.prod"]);
    s.ack(&lds2, &all).await;
    s.expect_quiet().await;
    api.register("prod", "soon", "y", &inst("10.0.0.8", 80))
        .await;
    let lds3 = s.expect(LDS).await;
    let names: Vec<String> = decode::<Listener>(&lds3)
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, all);

    // Names that are not {service}.{namespace} never exist; the stream goes on.
    let odd = ["no-namespace", "bad name.prod", "orders.prod"];
    s.ack(&lds3, &odd).await;
    let lds4 = s.expect(LDS).await;
    let names: Vec<String> = decode::<Listener>(&lds4)
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["orders.prod"]);
    s.ack(&lds4, &odd).await;
    s.expect_quiet().await;
}

#[tokio::test]
async fn a_reconnect_with_a_previous_version_gets_the_current_resources() {
    let server = Server::start();
    let api = server.api();
    api.register("prod", "orders", "a", &inst("10.0.0.1", 80))
        .await;
    let mut s = Sotw::open(server.grpc).await;
    s.subscribe(EDS, &["orders.prod"]).await;
    let first = s.expect(EDS).await;
    drop(s);

    api.register("prod", "orders", "b", &inst("10.0.0.2", 80))
        .await;
    let mut s = Sotw::open(server.grpc).await;
    s.send(DiscoveryRequest {
        node: Some(node("again", "", "")),
        version_info: first.version_info.clone(),
        type_url: EDS.into(),
        resource_names: vec!["orders.prod".into()],
        ..Default::default()
    })
    .await;
    let r = s.expect(EDS).await;
    assert_eq!(
        endpoints(&decode::<ClusterLoadAssignment>(&r)[0]),
        [("10.0.0.1:80".into(), 0), ("10.0.0.2:80".into(), 0)]
    );
}

#[tokio::test]
async fn many_resources_on_one_stream() {
    let server = Server::start();
    let api = server.api();
    let n = 200;
    let mut names = Vec::new();
    for i in 0..n {
        api.register(
            "bulk",
            &format!("s{i}"),
            "a",
            &inst("10.1.0.1", 80 + i as u16),
        )
        .await;
        names.push(format!("s{i}.bulk"));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut s = Sotw::open(server.grpc).await;
    s.subscribe(EDS, &refs).await;
    let r = s.expect(EDS).await;
    assert_eq!(r.resources.len(), n);
    s.ack(&r, &refs).await;
    // A change to one is a state-of-the-world answer: all of them again, one changed.
    api.register("bulk", "s7", "b", &inst("10.1.0.2", 80)).await;
    let r2 = s.expect(EDS).await;
    assert_eq!(r2.resources.len(), n);
    let changed: Vec<ClusterLoadAssignment> = decode::<ClusterLoadAssignment>(&r2)
        .into_iter()
        .filter(|c| c.cluster_name == "s7.bulk")
        .collect();
    assert_eq!(endpoints(&changed[0]).len(), 2);
    assert_eq!(
        metric(&api, "sextant_xds_services").await,
        n as f64,
        "one shared feed per service"
    );
}

/// An incremental (delta) ADS stream.
struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(addr: SocketAddr) -> Delta {
        let (tx, out) = mpsc::channel(16);
        let rx = client(addr)
            .await
            .delta_aggregated_resources(ReceiverStream::new(out))
            .await
            .expect("open a delta ADS stream")
            .into_inner();
        Delta { tx, rx }
    }

    async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.expect("send a request");
    }

    async fn change(&self, type_url: &str, subscribe: &[&str], unsubscribe: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self, within: Duration) -> Option<DeltaDiscoveryResponse> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(r))) => Some(r),
            Ok(other) => panic!("delta stream ended: {other:?}"),
            Err(_) => None,
        }
    }

    async fn expect(&mut self) -> DeltaDiscoveryResponse {
        self.next(WITHIN).await.expect("a delta response")
    }

    async fn expect_quiet(&mut self) {
        if let Some(r) = self.next(QUIET).await {
            panic!("expected no response, got {r:?}");
        }
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn delta_sends_only_what_changed() {
    let server = Server::start();
    let api = server.api();
    api.register("prod", "orders", "a", &inst("10.0.0.1", 80))
        .await;
    api.register("prod", "users", "a", &inst("10.0.0.5", 80))
        .await;
    let mut d = Delta::open(server.grpc).await;
    d.send(DeltaDiscoveryRequest {
        node: Some(node("envoy-1", "", "")),
        type_url: EDS.into(),
        resource_names_subscribe: vec!["orders.prod".into(), "users.prod".into()],
        ..Default::default()
    })
    .await;
    let r = d.expect().await;
    assert_eq!(names(&r), ["orders.prod", "users.prod"]);
    d.ack(&r).await;
    d.expect_quiet().await;

    // One service changes: only it is sent.
    api.register("prod", "orders", "b", &inst("10.0.0.2", 80))
        .await;
    let r = d.expect().await;
    assert_eq!(names(&r), ["orders.prod"]);
    d.ack(&r).await;

    // Unsubscribed: its changes are no longer sent.
    d.change(EDS, &[], &["orders.prod"]).await;
    d.expect_quiet().await;
    api.register("prod", "orders", "c", &inst("10.0.0.3", 80))
        .await;
    d.expect_quiet().await;
    // Subscribed again: sent again.
    d.change(EDS, &["orders.prod"], &[]).await;
    let r = d.expect().await;
    assert_eq!(names(&r), ["orders.prod"]);
    let cla =
        ClusterLoadAssignment::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice())
            .unwrap();
    assert_eq!(endpoints(&cla).len(), 3);
    d.ack(&r).await;

    // A reconnect that already holds the current versions gets nothing for them.
    let versions = [("orders.prod", r.resources[0].version.clone())];
    drop(d);
    let mut d = Delta::open(server.grpc).await;
    d.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: vec!["orders.prod".into()],
        initial_resource_versions: versions
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect(),
        ..Default::default()
    })
    .await;
    d.expect_quiet().await;
}

#[tokio::test]
async fn delta_wildcard_clusters_follow_the_catalog() {
    let server = Server::start();
    let api = server.api();
    api.register("prod", "orders", "a", &inst("10.0.0.1", 80))
        .await;
    let mut d = Delta::open(server.grpc).await;
    // Envoy's first CDS request names nothing: a wildcard.
    d.send(DeltaDiscoveryRequest {
        node: Some(node("envoy-1", "", "")),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await;
    let r = d.expect().await;
    assert_eq!(names(&r), ["orders.prod"]);
    d.ack(&r).await;

    api.register("prod", "users", "a", &inst("10.0.0.5", 80))
        .await;
    let r = d.expect().await;
    assert_eq!(names(&r), ["users.prod"]);
    d.ack(&r).await;

    // A service that loses its last instance is removed.
    api.deregister("prod", "orders", "a").await;
    let r = d.expect().await;
    assert!(r.resources.is_empty(), "{r:?}");
    assert_eq!(r.removed_resources, ["orders.prod"]);
    let clients = api.get("/v1/xds/clients").await.ok();
    assert_eq!(clients["clients"][0]["protocol"], "delta");
    assert_eq!(
        clients["clients"][0]["types"]["cds"]["subscribed"],
        json!(["*"])
    );
}

#[tokio::test]
async fn xds_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--xds", "false"]);
    let api = server.api();
    api.register("prod", "orders", "a", &inst("10.0.0.1", 80))
        .await;
    let (_tx, out) = mpsc::channel::<DiscoveryRequest>(1);
    let err = client(server.grpc)
        .await
        .stream_aggregated_resources(ReceiverStream::new(out))
        .await
        .expect_err("no ADS service");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    api.get("/v1/xds/clients")
        .await
        .assert_error(404, &["xDS is turned off"]);
}
