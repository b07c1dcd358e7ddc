//! Property tests of what the native HTTP API reads from the network: arbitrary bytes and
//! arbitrary JSON values fed to the body parsers, arbitrary query strings to the query parsers,
//! and arbitrary requests (paths, queries, content types, bodies) to the whole router on an
//! in-memory registry. None may panic, and every refusal is a 4xx — never a 5xx.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Method, Request, StatusCode};
use proptest::prelude::*;
use sextant_core::model::validate_registration;
use sextant_core::{CoreConfig, CoreMetrics, MemStore, Registry};
use tower_service::Service;

use super::*;
use crate::{ApiMetrics, Node, ServerConfig};

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of the API's bodies (so that values reach the checks behind the names) and
/// anything else.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "id",
            "host",
            "port",
            "protocol",
            "version",
            "location",
            "region",
            "zone",
            "idc",
            "cell",
            "lane",
            "metadata",
            "status",
            "health",
            "enabled",
            "weight",
            "weight_override",
            "ttl_seconds",
            "namespace",
            "service",
            "services",
            "healthy_only",
            "protect_threshold",
            "check",
            "kind",
            "interval_ms",
            "timeout_ms",
            "rise",
            "fall",
            "jitter_percent",
            "http_path",
            "http_status_min",
            "http_status_max",
            "grpc_service",
            "reporter",
            "instances",
        ])
        .prop_map(String::from),
        ".{0,12}",
    ]
}

/// A body: arbitrary bytes, or the encoding of an arbitrary JSON value.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
    ]
}

fn content_type() -> impl Strategy<Value = Option<HeaderValue>> {
    prop_oneof![
        Just(None),
        prop::sample::select(vec![
            "application/json",
            "application/json; charset=utf-8",
            "application/x-www-form-urlencoded",
            "application/merge-patch+json",
            "text/plain",
            "",
        ])
        .prop_map(|s| Some(HeaderValue::from_static(s))),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| HeaderValue::from_bytes(&b).ok()),
    ]
}

fn assert_4xx(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert!(
        e.status.is_client_error(),
        "{} {}: {}",
        e.status,
        e.code,
        e.message
    );
    Ok(())
}

/// Parses `bytes` as a `T` body; an error must be a 4xx.
fn parse<T: DeserializeOwned>(
    ct: Option<&HeaderValue>,
    bytes: &[u8],
) -> Result<Option<T>, TestCaseError> {
    match parse_json_body::<T>(ct, bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => assert_4xx(&e).map(|_| None),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn bodies_parse_or_get_a_4xx(
        ct in content_type(),
        bytes in body(),
        ns in ".{0,20}",
        svc in ".{0,20}",
        id in ".{0,20}",
    ) {
        let ct = ct.as_ref();
        if let Some(b) = parse::<RegisterBody>(ct, &bytes)? {
            // What the handler does next: name checks, then the registration's own checks.
            match service_key(&ns, &svc) {
                Ok(key) => match b.into_registration(key, Some(id)) {
                    Ok(reg) => {
                        if let Err(e) = validate_registration(&reg) {
                            assert_4xx(&e.into())?;
                        }
                    }
                    Err(e) => assert_4xx(&e.into())?,
                },
                Err(e) => assert_4xx(&e)?,
            }
        }
        if let Some(b) = parse::<StatusBody>(ct, &bytes)? {
            let _ = StatusPatch::from(b);
        }
        if let Some(b) = parse::<ServiceSettingsBody>(ct, &bytes)? {
            if let Some(check) = b.check {
                if let Err(e) = check.validate() {
                    assert_4xx(&e.into())?;
                }
            }
        }
        parse::<Vec<InstanceRefBody>>(ct, &bytes)?;
        parse::<DiscoverBody>(ct, &bytes)?;
        parse::<SuspectBody>(ct, &bytes)?;
    }

    #[test]
    fn queries_parse_or_get_a_4xx(
        query in prop_oneof![
            ".{0,80}",
            prop::collection::vec(
                (prop::sample::select(vec!["service", "since", "healthy", "index", "wait", "x"]), ".{0,24}"),
                0..5,
            )
            .prop_map(|pairs| {
                let mut s = form_urlencoded::Serializer::new(String::new());
                for (k, v) in pairs {
                    s.append_pair(k, &v);
                }
                s.finish()
            }),
        ],
        last_event_id in prop::collection::vec(any::<u8>(), 0..24),
        wait in ".{0,24}",
        max_wait in 0u64..1000,
    ) {
        let leid = HeaderValue::from_bytes(&last_event_id).ok();
        if let Err(e) = parse_watch_query(Some(&query), leid.as_ref()) {
            assert_4xx(&e)?;
        }
        if let Err(e) = parse_wait(Some(&wait), std::time::Duration::from_secs(max_wait)) {
            assert_4xx(&e)?;
        }
        if let Ok(uri) = format!("/v1/namespaces/ns/services/svc?{query}").parse::<axum::http::Uri>() {
            // What `ApiQuery` does: any refusal is a 400.
            if let Ok(q) = axum::extract::Query::<GetQuery>::try_from_uri(&uri) {
                if let Err(e) = parse_wait(q.wait.as_deref(), std::time::Duration::from_secs(max_wait)) {
                    assert_4xx(&e)?;
                }
            }
        }
    }
}

/// A path segment: anything, percent-encoded, or a raw printable string.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,20}".prop_map(|s| {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        }),
        "[ -~]{0,20}",
        "[a-z0-9]{1,8}",
    ]
}

fn request() -> impl Strategy<Value = (Method, String, Option<HeaderValue>, Vec<u8>)> {
    let method = prop::sample::select(vec![
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::PATCH,
        Method::DELETE,
    ]);
    let path = prop_oneof![
        (
            segment(),
            segment(),
            segment(),
            prop::sample::select(vec!["", "/status", "/drain", "/undrain", "/x"])
        )
            .prop_map(|(a, b, c, tail)| format!(
                "/v1/namespaces/{a}/services/{b}/instances/{c}{tail}"
            )),
        (segment(), segment()).prop_map(|(a, b)| format!("/v1/namespaces/{a}/services/{b}")),
        (segment(), segment())
            .prop_map(|(a, b)| format!("/v1/namespaces/{a}/services/{b}/instances")),
        segment().prop_map(|a| format!("/v1/namespaces/{a}/services")),
        prop::sample::select(vec![
            "/v1/namespaces",
            "/v1/heartbeats",
            "/v1/discover",
            "/v1/suspects",
            "/v1/watch"
        ])
        .prop_map(String::from),
        "/[ -~]{0,40}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        "[ -~]{0,40}".prop_map(|q| format!("?{q}"))
    ];
    (
        method,
        (path, query).prop_map(|(p, q)| format!("{p}{q}")),
        content_type(),
        body(),
    )
}

/// A drawn request as the server would receive it from `peer`; a method/URI pair no client
/// could send is rejected (another case is drawn instead of counting this one as passed).
fn build_request(
    method: &Method,
    uri: &str,
    ct: Option<HeaderValue>,
    body: Vec<u8>,
    peer: SocketAddr,
) -> Result<Request<Body>, TestCaseError> {
    let mut req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Body::from(body))
        .map_err(|_| TestCaseError::reject("not a valid request"))?;
    if let Some(ct) = ct {
        req.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    req.extensions_mut().insert(ConnectInfo(peer));
    Ok(req)
}

/// The router of a node on an in-memory store, without a health scanner, whose blocking reads
/// return at once.
fn test_router(rt: &tokio::runtime::Runtime) -> Router {
    test_node(rt, CoreConfig::default()).0
}

/// [`test_router`] with `core` settings, and the node's registry.
fn test_node(rt: &tokio::runtime::Runtime, core: CoreConfig) -> (Router, Registry) {
    rt.block_on(async {
        let mut prometheus = prometheus_client::registry::Registry::default();
        let core_metrics = CoreMetrics::register(&mut prometheus);
        let api_metrics = ApiMetrics::register(&mut prometheus);
        let store: Arc<dyn sextant_core::Store> = Arc::new(MemStore::new());
        let registry = Registry::open(store.clone(), core, core_metrics)
            .await
            .expect("open a registry on a MemStore");
        let config = ServerConfig {
            max_wait_seconds: 0,
            ..ServerConfig::default()
        };
        let app = router(Arc::new(Node {
            registry: registry.clone(),
            scanner: None,
            config,
            api_metrics,
            prometheus,
            store,
            xds: None,
            eureka: None,
            cluster: None,
            tls: None,
        }));
        (app, registry)
    })
}

/// With auth on, no request without a valid credential — any method, path, query and body,
/// no `Authorization` header or a wrong one — gets past the gate: every answer is a 401 but
/// on the public routes, and the registry never changes (no revision, no audit entry).
#[test]
fn with_auth_on_nothing_reaches_the_registry_without_a_valid_token() {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let (app, registry) = test_node(
        &rt,
        CoreConfig {
            auth: true,
            audit_retention: 100,
            ..CoreConfig::default()
        },
    );
    // One real token exists, so a wrong secret is a near miss, not an empty table.
    rt.block_on(registry.acl().bootstrap())
        .expect("bootstrap the first token");
    let revision = registry.revision();
    let peer = SocketAddr::from(([127, 0, 0, 1], 4000));
    let credential = prop_oneof![
        Just(None),
        "[ -~]{0,80}".prop_map(Some),
        "[0-9a-f]{64}".prop_map(|s| Some(format!("Bearer {s}"))),
        "[ -~]{0,40}".prop_map(|s| Some(format!("Basic {s}"))),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(
            &(request(), credential),
            |((method, uri, ct, body), cred)| {
                let mut req = build_request(&method, &uri, ct, body, peer)?;
                if let Some(v) = cred.and_then(|c| HeaderValue::from_str(&c).ok()) {
                    req.headers_mut().insert(header::AUTHORIZATION, v);
                }
                let path = req.uri().path().to_string();
                let resp = rt
                    .block_on(app.clone().call(req))
                    .unwrap_or_else(|e| match e {});
                let public = auth::PUBLIC
                    .iter()
                    .any(|(m, p)| *m == method.as_str() && *p == path);
                if !public {
                    prop_assert_eq!(
                        resp.status(),
                        StatusCode::UNAUTHORIZED,
                        "{} {}",
                        method,
                        uri
                    );
                }
                prop_assert_eq!(
                    registry.revision(),
                    revision,
                    "{} {} changed the registry",
                    method,
                    uri
                );
                Ok(())
            },
        )
        .unwrap();
    assert!(
        registry.acl().audit(None, 0, 1000).len() <= 1,
        "only the bootstrap is audited"
    );
}

#[test]
fn arbitrary_requests_get_no_5xx() {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let app = test_router(&rt);
    let peer = SocketAddr::from(([127, 0, 0, 1], 4000));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(&request(), |(method, uri, ct, body)| {
            let req = build_request(&method, &uri, ct, body, peer)?;
            let resp = rt
                .block_on(app.clone().call(req))
                .unwrap_or_else(|e| match e {});
            let status = resp.status();
            // The one 503 a valid request gets here: the scanner is off in this node.
            let scanner_off =
                status == StatusCode::SERVICE_UNAVAILABLE && uri.starts_with("/v1/suspects");
            prop_assert!(
                status.is_success() || status.is_client_error() || scanner_off,
                "{method} {uri}: {status}"
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
