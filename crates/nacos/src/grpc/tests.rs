//! Property tests of the Nacos 2.x request path, called directly on an in-memory registry:
//! arbitrary bytes and arbitrary JSON values as the body of every request type get a response
//! or an `ErrorResponse` with a 4xx-class (or Nacos "no handler") code — no panic, never a 5xx.

use std::net::SocketAddr;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};
use sextant_proto::nacos::Payload;
use tokio::sync::watch;

use super::wire::{response_type, NO_HANDLER};
use super::Api;
use crate::test_adapter;

const CASES: u32 = 300;

const KINDS: [&str; 9] = [
    "ServerCheckRequest",
    "HealthCheckRequest",
    "InstanceRequest",
    "PersistentInstanceRequest",
    "BatchInstanceRequest",
    "ServiceQueryRequest",
    "ServiceListRequest",
    "SubscribeServiceRequest",
    "ConfigQueryRequest",
];

fn kind() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KINDS.to_vec()).prop_map(str::to_string),
        1 => ".{0,80}",
    ]
}

/// Field names the requests read, plus noise.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "requestId",
            "namespace",
            "serviceName",
            "groupName",
            "type",
            "instance",
            "instances",
            "cluster",
            "clusters",
            "healthyOnly",
            "subscribe",
            "pageNo",
            "pageSize",
            "ip",
            "port",
            "weight",
            "healthy",
            "enabled",
            "clusterName",
            "metadata",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z]{1,6}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![0i64, 1, 80, 65535, 65536, -1]).prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(vec![
            "registerInstance",
            "deregisterInstance",
            "batchRegisterInstance",
            "batchDeregisterInstance",
            "orders",
            "G@@orders",
            "@@",
            "public",
            "10.0.0.1",
            "",
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ]
}

/// JSON values of any shape, with the requests' field names likely.
fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((field(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A handled request answers its response type or an `ErrorResponse` whose code is 4xx or
/// "no handler"; anything else (a 5xx, an empty body, another type) fails.
fn assert_answer(kind: &str, answer: &Payload) {
    let body: Value = serde_json::from_slice(answer.body_bytes())
        .unwrap_or_else(|e| panic!("{kind}: the answer is not JSON ({e})"));
    if answer.kind() == "ErrorResponse" {
        let code = body["errorCode"].as_u64().unwrap_or(0);
        assert!(
            (400..500).contains(&code) || code == u64::from(NO_HANDLER),
            "{kind}: errorCode {code}: {body}"
        );
    } else {
        assert_eq!(Some(answer.kind()), response_type(kind), "{body}");
        assert_eq!(body["resultCode"], 200, "{body}");
    }
}

fn run(strategy: impl Strategy<Value = (String, Vec<u8>)>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_stop_tx, stop) = watch::channel(false);
    let api = rt.block_on(async { Api::new(test_adapter().await, stop) });
    let addr = SocketAddr::from(([127, 0, 0, 1], 40000));
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |(kind, body)| {
            let answer = rt.block_on(api.handle(addr, &kind, &body, None, None));
            assert_answer(&kind, &answer);
            Ok(())
        })
        .unwrap();
}

#[test]
fn arbitrary_bytes_get_a_client_error() {
    run((kind(), prop::collection::vec(any::<u8>(), 0..300)));
}

#[test]
fn arbitrary_json_gets_an_answer_or_a_client_error() {
    run((kind(), json_value()).prop_map(|(k, v)| (k, serde_json::to_vec(&v).unwrap())));
}

/// Requests shaped like real ones with arbitrary values in their fields reach deep into the
/// handlers (registration, batch, subscription).
#[test]
fn arbitrary_fields_in_real_shapes_get_an_answer_or_a_client_error() {
    let shaped = (
        prop::sample::select(KINDS.to_vec()),
        json_value(),
        json_value(),
        scalar(),
    )
        .prop_map(|(k, inst, meta, port)| {
            let mut instance = json!({"ip": "10.0.0.1", "port": port, "metadata": meta});
            if let (Value::Object(i), Value::Object(extra)) = (&mut instance, inst) {
                i.extend(extra);
            }
            let body = json!({
                "requestId": "1",
                "serviceName": "orders",
                "type": if k == "BatchInstanceRequest" { "batchRegisterInstance" } else { "registerInstance" },
                "instance": instance.clone(),
                "instances": [instance],
                "subscribe": true,
            });
            (k.to_string(), serde_json::to_vec(&body).unwrap())
        });
    run(shaped);
}

/// A request type the adapter does not know is counted as `unsupported`, whatever its body:
/// a client's free text never becomes a metrics label (the label set would grow without
/// bound).
#[test]
fn unknown_request_types_do_not_become_metric_labels() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = crate::NacosMetrics::register(&mut registry);
    let (_stop_tx, stop) = watch::channel(false);
    let api = rt.block_on(async {
        let mut adapter = test_adapter().await;
        Arc::get_mut(&mut adapter).expect("not shared yet").metrics = metrics;
        Api::new(adapter, stop)
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], 40001));
    for body in [&b"{not json"[..], b"{}"] {
        let answer = rt.block_on(api.handle(addr, "Made-Up-Type-12345", body, None, None));
        assert_eq!(answer.kind(), "ErrorResponse");
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(!text.contains("Made-Up-Type-12345"), "{text}");
    assert!(text.contains("request=\"unsupported\""), "{text}");
}

/// A batch of an unknown type is refused even when it names no instance (an empty batch
/// used to skip the check and answer success).
#[tokio::test]
async fn an_empty_batch_of_an_unknown_type_is_refused() {
    let (_stop_tx, stop) = watch::channel(false);
    let api = Api::new(test_adapter().await, stop);
    let body = json!({
        "requestId": "1",
        "namespace": "public",
        "serviceName": "svc",
        "groupName": "DEFAULT_GROUP",
        "type": "batchFrobnicate",
        "instances": [],
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], 40000));
    let answer = api
        .handle(
            addr,
            "BatchInstanceRequest",
            &serde_json::to_vec(&body).unwrap(),
            None,
            None,
        )
        .await;
    assert_eq!(answer.kind(), "ErrorResponse");
    let v: Value = serde_json::from_slice(answer.body_bytes()).unwrap();
    assert_eq!(v["errorCode"], 400, "{v}");
}
