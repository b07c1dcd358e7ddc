//! Unit tests of the 1.x HTTP handlers, called directly on an in-memory registry: lookups by
//! address, the TCP check of persistent instances, and property tests feeding arbitrary bytes
//! and parameter maps to the parameter parsing and every handler (no panic, never a 500).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::response::Response;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sextant_core::model::{CheckKind, HealthCheck, ServiceKey};
use sextant_core::ErrorKind;

use super::{instance, operator, service, Params};
use crate::{test_adapter, Adapter, NacosError};

fn params(pairs: &[(&str, &str)]) -> Params {
    Params::from_map(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

async fn call(
    a: &Arc<Adapter>,
    f: impl AsyncFnOnce(State<Arc<Adapter>>, Params) -> Result<Response, NacosError>,
    pairs: &[(&str, &str)],
) -> Result<Response, NacosError> {
    f(State(a.clone()), params(pairs)).await
}

/// The old Python SDK registers cluster `None` when given no cluster, then deregisters,
/// beats and modifies naming no cluster: Nacos 2.x finds the instance by ip:port whatever
/// its cluster, and so must Sextant.
#[tokio::test]
async fn instances_are_found_by_address_when_no_cluster_is_named() {
    let a = test_adapter().await;
    let key = ServiceKey::new("public", "py").unwrap();
    let base = [("serviceName", "py"), ("ip", "10.0.0.5"), ("port", "8080")];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        base.iter().chain(extra).copied().collect()
    };
    call(&a, instance::register, &with(&[("clusterName", "None")]))
        .await
        .unwrap();
    // Modify without a cluster.
    call(&a, instance::update, &with(&[("weight", "3")]))
        .await
        .unwrap();
    let i = a.registry.get(&key, false).instances[0].clone();
    assert_eq!(i.status.weight, 300);
    // A beat without a cluster renews it, and does not register a second instance.
    let beat = r#"{"serviceName":"py","ip":"10.0.0.5","port":8080,"weight":3}"#;
    call(&a, instance::beat, &with(&[("beat", beat)]))
        .await
        .unwrap();
    assert_eq!(a.registry.get(&key, false).instances.len(), 1);
    // Deregistration without a cluster removes it.
    call(&a, instance::deregister, &base).await.unwrap();
    assert!(a.registry.get(&key, false).instances.is_empty());
}

/// A named cluster is preferred when two instances share an address.
#[tokio::test]
async fn a_named_cluster_picks_among_instances_at_one_address() {
    let a = test_adapter().await;
    let key = ServiceKey::new("public", "two").unwrap();
    for c in ["c1", "c2"] {
        let p = [
            ("serviceName", "two"),
            ("ip", "10.0.0.6"),
            ("port", "80"),
            ("clusterName", c),
        ];
        call(&a, instance::register, &p).await.unwrap();
    }
    let p = [
        ("serviceName", "two"),
        ("ip", "10.0.0.6"),
        ("port", "80"),
        ("clusterName", "c2"),
    ];
    call(&a, instance::deregister, &p).await.unwrap();
    let left = a.registry.get(&key, false).instances;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].spec.cell, "c1");
}

/// A persistent Nacos registration gives a service without a check a TCP check, and leaves a
/// check set natively alone.
#[tokio::test]
async fn persistent_instances_add_a_tcp_check_only_where_there_is_none() {
    let a = test_adapter().await;
    let bare = ServiceKey::new("public", "bare").unwrap();
    let checked = ServiceKey::new("public", "checked").unwrap();
    let mut config = a.registry.service_config(&checked);
    config.check = HealthCheck {
        kind: CheckKind::Http,
        http_path: "/health".into(),
        ..HealthCheck::default()
    };
    a.registry.configure(checked.clone(), config).await.unwrap();
    for name in ["bare", "checked"] {
        let p = [
            ("serviceName", name),
            ("ip", "10.0.0.9"),
            ("port", "5432"),
            ("ephemeral", "false"),
        ];
        call(&a, instance::register, &p).await.unwrap();
    }
    assert_eq!(a.registry.service_config(&bare).check.kind, CheckKind::Tcp);
    let kept = a.registry.service_config(&checked).check;
    assert_eq!(kept.kind, CheckKind::Http);
    assert_eq!(kept.http_path, "/health");
}

/// Instances report the configured beat timeout (their lease), not a fixed 15 s: an
/// ephemeral one its lease, a persistent one the configured HTTP beat timeout.
#[tokio::test]
async fn instances_report_the_configured_beat_timeout() {
    let mut a = test_adapter().await;
    Arc::get_mut(&mut a)
        .expect("not shared yet")
        .config
        .http_beat_timeout = std::time::Duration::from_secs(7);
    for (ip, ephemeral) in [("10.0.0.1", "true"), ("10.0.0.2", "false")] {
        let p = [
            ("serviceName", "t"),
            ("ip", ip),
            ("port", "1"),
            ("ephemeral", ephemeral),
        ];
        call(&a, instance::register, &p).await.unwrap();
    }
    let r = call(&a, instance::list, &[("serviceName", "t")])
        .await
        .unwrap();
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{v}");
    for h in hosts {
        assert_eq!(h["instanceHeartBeatTimeOut"], 7000, "{h}");
        assert_eq!(h["ipDeleteTimeout"], 7000, "{h}");
    }
}

/// The operator figures are the host's where it tells them, never a made-up 0.
#[tokio::test]
async fn operator_metrics_report_real_figures_or_none() {
    use axum::response::IntoResponse;
    let a = test_adapter().await;
    let r = operator::metrics(State(a.clone())).await.into_response();
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for field in ["cpu", "load", "mem"] {
        if cfg!(target_os = "linux") {
            let x = v[field]
                .as_f64()
                .unwrap_or_else(|| panic!("no {field} in {v}"));
            assert!(x >= 0.0, "{field} {x}");
        } else {
            assert!(v.get(field).is_none(), "{v}");
        }
    }
    // Memory is in use on any running host.
    if cfg!(target_os = "linux") {
        assert!(v["mem"].as_f64().unwrap() > 0.0, "{v}");
    }
    let r = operator::switches(State(a)).await.into_response();
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["pushEnabled"], false,
        "this adapter has no UDP socket: {v}"
    );
}

// --- property tests ------------------------------------------------------------------------

const CASES: u32 = 300;

/// Parameter names the handlers read, plus noise.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "serviceName",
            "groupName",
            "namespaceId",
            "ip",
            "port",
            "clusterName",
            "cluster",
            "clusters",
            "weight",
            "healthy",
            "enabled",
            "enable",
            "ephemeral",
            "metadata",
            "beat",
            "healthyOnly",
            "protectThreshold",
            "selector",
            "pageNo",
            "pageSize",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z]{1,8}",
    ]
}

/// Values that reach every parsing branch: plausible ones, edge numbers, JSON, junk.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9._:@-]{1,12}",
        prop::sample::select(vec![
            "true",
            "True",
            "false",
            "yes",
            "0",
            "1",
            "-1",
            "65535",
            "65536",
            "1e308",
            "NaN",
            "inf",
            "100.5",
            "0.5",
            "None",
            "DEFAULT",
            "G@@s",
            "@@",
            "a@@",
            "{",
            "{}",
            "[]",
            r#"{"a":"b"}"#,
            r#"{"a":{"b":[1,2]}}"#,
            "k=v,x",
            "=v",
            r#"{"type":"label"}"#,
            r#"{"serviceName":"s","ip":"1.2.3.4","port":80,"metadata":{"a":1}}"#,
            r#"{"ip":1,"port":"x","cluster":[]}"#,
        ])
        .prop_map(str::to_string),
        any::<String>(),
        ".{0,300}",
    ]
}

/// A handler's answer must be a success or a deliberate 4xx (or 501 for what is not
/// implemented), never a server error.
fn assert_client_error(what: &str, r: &Result<Response, NacosError>) {
    match r {
        Ok(resp) => assert!(resp.status().is_success(), "{what}: {}", resp.status()),
        Err(e) => {
            let kind = e.kind();
            assert!(
                matches!(
                    kind,
                    ErrorKind::Invalid | ErrorKind::NotFound | ErrorKind::Unsupported
                ),
                "{what}: {e} is {kind:?} ({})",
                kind.http_status()
            );
        }
    }
}

/// A runtime, an adapter on an in-memory registry and a runner of `CASES` cases.
fn prop_harness() -> (tokio::runtime::Runtime, Arc<Adapter>, TestRunner) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = rt.block_on(test_adapter());
    let runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    (rt, a, runner)
}

/// Arbitrary parameter maps against every 1.x handler that takes parameters.
#[test]
fn arbitrary_parameters_never_get_a_server_error() {
    let (rt, a, mut runner) = prop_harness();
    let strategy = (prop::collection::hash_map(key(), value(), 0..8), 0usize..12);
    runner
        .run(&strategy, |(map, which)| {
            let p = Params::from_map(map.clone());
            let st = State(a.clone());
            let r = rt.block_on(async {
                match which {
                    0 => instance::register(st, p).await,
                    1 => instance::deregister(st, p).await,
                    2 => instance::update(st, p).await,
                    3 => instance::set_health(st, p).await,
                    4 => instance::get_instance(st, p).await,
                    5 => instance::list(st, p).await,
                    6 => instance::beat(st, p).await,
                    7 => service::create_service(st, p).await,
                    8 => service::update_service(st, p).await,
                    9 => service::delete_service(st, p).await,
                    10 => service::get_service(st, p).await,
                    _ => service::list_services(st, p).await,
                }
            });
            assert_client_error(&format!("handler {which} with {map:?}"), &r);
            Ok(())
        })
        .unwrap();
}

/// Arbitrary query strings, bodies and content types through the parameter extractor, then
/// the registration handler: no panic, no server error.
#[test]
fn arbitrary_bytes_never_get_a_server_error() {
    let (rt, a, mut runner) = prop_harness();
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec(any::<u8>(), 0..400),
        prop::sample::select(vec![
            None,
            Some("application/x-www-form-urlencoded"),
            Some("application/x-www-form-urlencoded;charset=UTF-8"),
            Some("application/json"),
            Some("text/plain"),
        ]),
    );
    runner
        .run(&strategy, |(query, body, content_type)| {
            // The query as a client could send it: every byte percent-encoded or kept.
            let query: String = form_urlencoded::byte_serialize(&query).collect();
            let mut req = Request::builder()
                .method("POST")
                .uri(format!("/nacos/v1/ns/instance?{query}&x=1"));
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let req = req.body(axum::body::Body::from(body)).unwrap();
            let r = rt.block_on(async {
                match Params::from_request(req, &()).await {
                    Ok(p) => instance::register(State(a.clone()), p).await,
                    Err(resp) => {
                        assert!(resp.status().is_client_error(), "{}", resp.status());
                        Ok(super::ok())
                    }
                }
            });
            assert_client_error("register from raw bytes", &r);
            Ok(())
        })
        .unwrap();
}

/// Parameters as an axum request would carry them survive the extractor unchanged.
#[tokio::test]
async fn the_extractor_merges_query_and_form() {
    let req = Request::builder()
        .method("POST")
        .uri("/x?serviceName=a&ip=1.2.3.4")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(axum::body::Body::from("port=80&clusterName=c"))
        .unwrap();
    let p = Params::from_request(req, &()).await.unwrap();
    let got: HashMap<&str, Option<&str>> = ["serviceName", "ip", "port", "clusterName"]
        .into_iter()
        .map(|k| (k, p.get(k)))
        .collect();
    assert_eq!(got["serviceName"], Some("a"));
    assert_eq!(got["port"], Some("80"));
    assert_eq!(p.given_cluster(), Some("c"));
}
