//! One registry behind every protocol: instances registered through the native API, the
//! Nacos 1.x API, the Eureka API and Consul's agent API, in the `public` namespace where the
//! adapters meet, are all seen through the native API, Nacos' instance list, Eureka's registry
//! (`ORDERS`), Consul's health API, DNS (Consul's names, with `dig`) and xDS (a gRPC client's
//! load assignment); a deregistration through one protocol leaves every other.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::Message;
use serde_json::Value;

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// `ip:port` of every endpoint xDS gives a client for `orders.public`.
async fn xds_endpoints(server: &Server) -> Vec<String> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .expect("connect to xDS");
    let req = DiscoveryRequest {
        type_url: EDS.into(),
        resource_names: vec!["orders.public".into()],
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(req).await.unwrap();
    let mut stream = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("an ADS stream")
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an EDS answer in time")
        .expect("no stream error")
        .expect("an EDS answer");
    let cla = ClusterLoadAssignment::decode(resp.resources[0].value.as_slice()).unwrap();
    let mut out = Vec::new();
    for l in &cla.endpoints {
        for e in &l.lb_endpoints {
            if let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier {
                if let Some(address::Address::SocketAddress(sa)) =
                    ep.address.as_ref().and_then(|a| a.address.as_ref())
                {
                    if let Some(PortSpecifier::PortValue(p)) = sa.port_specifier {
                        out.push(format!("{}:{p}", sa.address));
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// Addresses `dig` finds for `orders.service.consul`.
fn dns_addresses(server: &Server) -> Vec<String> {
    let dns = server.dns.expect("DNS is on");
    let out = Command::new("dig")
        .args([
            format!("@{}", dns.ip()),
            "-p".into(),
            dns.port().to_string(),
            "+short".into(),
            "orders.service.consul".into(),
            "A".into(),
        ])
        .output()
        .expect("dig runs (scripts/test.sh installs dnsutils)");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Registers (POST) or deregisters (DELETE) 10.7.0.2:8080 in `orders` through Nacos 1.x.
async fn nacos_instance(method: reqwest::Method, nacos: std::net::SocketAddr) {
    let url = format!(
        "http://{nacos}/nacos/v1/ns/instance?serviceName=orders&ip=10.7.0.2&port=8080&ephemeral=true"
    );
    let r = http_client().request(method, url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

async fn nacos_list(nacos: std::net::SocketAddr) -> Vec<String> {
    let v: Value = http_client()
        .get(format!(
            "http://{nacos}/nacos/v1/ns/instance/list?serviceName=orders"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out: Vec<String> = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{}:{}", h["ip"].as_str().unwrap(), h["port"]))
        .collect();
    out.sort();
    out
}

async fn eureka_list(server: &Server) -> Vec<String> {
    let v: Value = http_client()
        .get(format!("{}/eureka/apps/ORDERS", server.base()))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out: Vec<String> = v["application"]["instance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{}:{}", i["ipAddr"].as_str().unwrap(), i["port"]["$"]))
        .collect();
    out.sort();
    out
}

async fn consul_list(server: &Server) -> Vec<String> {
    let consul = server.consul.expect("the Consul API is on");
    let v: Value = http_client()
        .get(format!("http://{consul}/v1/health/service/orders?passing"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = &e["Service"];
            format!("{}:{}", s["Address"].as_str().unwrap(), s["Port"])
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn an_instance_registered_through_one_protocol_is_seen_through_every_other() {
    let server = Server::start();
    let api = server.api();
    let (nacos, _) = server.nacos.expect("the Nacos adapter is on");

    // Native: public/orders. Nacos 1.x: DEFAULT_GROUP's orders, the same service.
    api.register("public", "orders", "native-1", &inst("10.7.0.1", 8080))
        .await;
    nacos_instance(reqwest::Method::POST, nacos).await;

    // Eureka: app ORDERS is public/orders.
    let r = http_client()
        .post(format!("{}/eureka/apps/ORDERS", server.base()))
        .json(&serde_json::json!({"instance": {
            "instanceId": "eureka-3", "app": "ORDERS", "hostName": "orders-3",
            "ipAddr": "10.7.0.3", "status": "UP",
            "port": {"$": 8080, "@enabled": "true"},
            "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
            "leaseInfo": {"durationInSecs": 60}
        }}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap_or_default());

    // Consul: service orders, a passing TTL check.
    let consul = server.consul.expect("the Consul API is on");
    let r = http_client()
        .put(format!("http://{consul}/v1/agent/service/register"))
        .json(
            &serde_json::json!({"ID": "consul-4", "Name": "orders", "Address": "10.7.0.4",
            "Port": 8080, "Check": {"TTL": "60s", "Status": "passing"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());

    let both = [
        "10.7.0.1:8080",
        "10.7.0.2:8080",
        "10.7.0.3:8080",
        "10.7.0.4:8080",
    ];
    let native: Vec<String> = {
        let svc = api.service("public", "orders").await;
        let mut v: Vec<String> = svc["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| format!("{}:{}", i["host"].as_str().unwrap(), i["port"]))
            .collect();
        v.sort();
        v
    };
    assert_eq!(native, both);
    assert_eq!(nacos_list(nacos).await, both);
    assert_eq!(eureka_list(&server).await, both);
    assert_eq!(consul_list(&server).await, both);
    assert_eq!(
        dns_addresses(&server),
        ["10.7.0.1", "10.7.0.2", "10.7.0.3", "10.7.0.4"]
    );
    assert_eq!(xds_endpoints(&server).await, both);

    // Deregistered through Nacos: gone from every protocol.
    nacos_instance(reqwest::Method::DELETE, nacos).await;
    let rest = ["10.7.0.1:8080", "10.7.0.3:8080", "10.7.0.4:8080"];
    assert_eq!(nacos_list(nacos).await, rest);
    assert_eq!(eureka_list(&server).await, rest);
    assert_eq!(consul_list(&server).await, rest);
    assert_eq!(dns_addresses(&server), ["10.7.0.1", "10.7.0.3", "10.7.0.4"]);
    assert_eq!(xds_endpoints(&server).await, rest);
    assert_eq!(
        ids(&api.service("public", "orders").await),
        ["consul-4", "eureka-3", "native-1"]
    );

    // Deregistered through Consul: gone from every protocol.
    let r = http_client()
        .put(format!(
            "http://{consul}/v1/agent/service/deregister/consul-4"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rest = ["10.7.0.1:8080", "10.7.0.3:8080"];
    assert_eq!(nacos_list(nacos).await, rest);
    assert_eq!(eureka_list(&server).await, rest);
    assert_eq!(consul_list(&server).await, rest);
    assert_eq!(dns_addresses(&server), ["10.7.0.1", "10.7.0.3"]);
    assert_eq!(xds_endpoints(&server).await, rest);
}
