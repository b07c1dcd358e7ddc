//! Tests of the handlers through the router, on an in-memory registry, without a network:
//! answers and status codes clients rely on, errors that name what is wrong, and no 500 for
//! any path or body.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use proptest::prelude::*;
use serde_json::{json, Value};
use sextant_core::model::ServiceKey;
use sextant_core::{CoreConfig, CoreMetrics, MemStore, Registry};
use tower::ServiceExt;

use crate::{Eureka, EurekaMetrics};

async fn router() -> (Router, Registry) {
    let registry = Registry::open(
        std::sync::Arc::new(MemStore::new()),
        CoreConfig::default(),
        CoreMetrics::default(),
    )
    .await
    .expect("an in-memory registry opens");
    let e = Eureka::new(registry.clone(), EurekaMetrics::default());
    (e.router(), registry)
}

async fn call(
    r: &Router,
    method: Method,
    uri: &str,
    json_accept: bool,
    body: Option<Value>,
) -> (StatusCode, String) {
    let mut b = Request::builder().method(method).uri(uri);
    if json_accept {
        b = b.header("accept", "application/json");
    }
    let req = match body {
        Some(v) => b
            .header("content-type", "application/json")
            .body(Body::from(v.to_string())),
        None => b.body(Body::empty()),
    }
    .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn body(id: &str, port: u16) -> Value {
    json!({"instance": {
        "instanceId": id, "hostName": format!("{id}.local"), "app": "ORDERS",
        "ipAddr": "10.0.0.1", "port": {"$": port, "@enabled": "true"},
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
        "leaseInfo": {"durationInSecs": 30},
        "lastDirtyTimestamp": "1000",
    }})
}

#[tokio::test]
async fn register_renew_read_override_cancel() {
    let (r, registry) = router().await;
    for p in ["/eureka/apps", "/eureka/v2/apps"] {
        let (s, b) = call(
            &r,
            Method::POST,
            &format!("{p}/ORDERS"),
            false,
            Some(body("o1", 8080)),
        )
        .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    }
    let key = ServiceKey::new("public", "orders").unwrap();
    assert_eq!(registry.instance(&key, "o1").unwrap().ttl_seconds, 30);

    let (s, _) = call(&r, Method::PUT, "/eureka/apps/ORDERS/o1", false, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &r,
        Method::PUT,
        "/eureka/apps/ORDERS/o1?lastDirtyTimestamp=999",
        false,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "an older client timestamp renews");
    let (s, _) = call(
        &r,
        Method::PUT,
        "/eureka/apps/ORDERS/o1?lastDirtyTimestamp=2000",
        false,
        None,
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a newer client timestamp asks for a registration"
    );
    let (s, b) = call(&r, Method::PUT, "/eureka/apps/ORDERS/nope", false, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b.contains("nope"), "{b}");

    let (s, b) = call(&r, Method::GET, "/eureka/apps/", true, None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["applications"]["application"][0]["name"], "ORDERS");
    assert_eq!(
        v["applications"]["application"][0]["instance"][0]["instanceId"],
        "o1"
    );
    assert_eq!(v["applications"]["apps__hashcode"], "UP_1_");
    let (s, b) = call(&r, Method::GET, "/eureka/apps", false, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        b.contains("<applications>") && b.contains("<port enabled=\"true\">8080</port>"),
        "{b}"
    );
    let (s, b) = call(&r, Method::GET, "/eureka/v2/apps/orders", true, None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b.contains("\"application\""), "{b}");
    let (s, b) = call(&r, Method::GET, "/eureka/v2/instances/o1", true, None).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // The override survives a re-registration and is removed by DELETE.
    let (s, _) = call(
        &r,
        Method::PUT,
        "/eureka/apps/ORDERS/o1/status?value=OUT_OF_SERVICE",
        false,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &r,
        Method::POST,
        "/eureka/apps/ORDERS",
        false,
        Some(body("o1", 8080)),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let i = registry.instance(&key, "o1").unwrap();
    assert!(!i.status.enabled, "override lost on re-registration");
    let (_, b) = call(&r, Method::GET, "/eureka/apps/ORDERS/o1", true, None).await;
    assert!(b.contains("\"status\":\"OUT_OF_SERVICE\""), "{b}");
    let (s, _) = call(
        &r,
        Method::PUT,
        "/eureka/apps/ORDERS/o1/status?value=BOGUS",
        false,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(
        &r,
        Method::DELETE,
        "/eureka/apps/ORDERS/o1/status",
        false,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(registry.instance(&key, "o1").unwrap().status.enabled);

    let (s, _) = call(&r, Method::DELETE, "/eureka/apps/ORDERS/o1", false, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&r, Method::DELETE, "/eureka/apps/ORDERS/o1", false, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&r, Method::GET, "/eureka/apps/ORDERS", true, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn errors_name_what_is_wrong() {
    let (r, _) = router().await;
    let mut b = body("o1", 8080);
    b["instance"].as_object_mut().unwrap().remove("ipAddr");
    let (s, m) = call(&r, Method::POST, "/eureka/apps/ORDERS", false, Some(b)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(m.contains("Missing ipAddr"), "{m}");
    let req = Request::post("/eureka/apps/ORDERS")
        .header("content-type", "application/xml")
        .body(Body::from("<instance/>"))
        .unwrap();
    assert_eq!(
        r.clone().oneshot(req).await.unwrap().status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let (s, m) = call(&r, Method::GET, "/eureka/nothing/here", false, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(m.contains("/eureka/nothing/here"), "{m}");
    let (s, _) = call(&r, Method::GET, "/eureka/apps/delta", true, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, m) = call(&r, Method::GET, "/eureka/v2/vips/orders", true, None).await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED);
    assert!(m.contains("/eureka/v2/vips/orders"), "{m}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// No path or body under /eureka is answered with a 5xx other than 501.
    #[test]
    fn never_a_server_error(
        path in "/eureka(/v2)?/(apps|instances|vips)(/[A-Za-z0-9%._~-]{0,8}){0,3}(\\?[a-zA-Z=&]{0,12})?",
        method in prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]),
        body in "[ -~]{0,60}",
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let status = rt.block_on(async {
            let (r, _) = router().await;
            let req = Request::builder().method(method).uri(&path).body(Body::from(body)).unwrap();
            r.oneshot(req).await.unwrap().status()
        });
        prop_assert!(!status.is_server_error() || status == StatusCode::NOT_IMPLEMENTED, "{} {}", path, status);
    }
}
