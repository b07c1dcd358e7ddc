//! The HTTP/JSON API of the real binary: register, read and remove instances, status patches,
//! heartbeats, healthy filtering and protection, listings, blocking queries, batch discovery
//! and lease expiry.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test]
async fn register_get_delete_and_post_with_default_id() {
    let server = Server::start();
    let api = server.api();

    let body = json!({
        "host": "10.0.0.1",
        "port": 8080,
        "protocol": "grpc",
        "version": "1.2.3",
        "location": {"region": "eu", "zone": "eu-1a", "idc": "dc1"},
        "cell": "cell-1",
        "lane": "canary",
        "metadata": {"team": "orders", "build/sha": "abc"},
    });
    let r1 = api.register("prod", "orders", "o-1", &body).await;
    assert!(r1 > 0);

    let resp = api.get(&service_path("prod", "orders")).await;
    assert_eq!(resp.revision_header(), r1);
    let svc = resp.ok();
    assert_eq!(svc["namespace"], "prod");
    assert_eq!(svc["service"], "orders");
    assert_eq!(svc["revision"], r1);
    assert_eq!(svc["protected"], false);
    assert_eq!(ids(&svc), ["o-1"]);
    let i = find(&svc, "o-1").unwrap();
    assert_eq!(i["host"], "10.0.0.1");
    assert_eq!(i["port"], 8080);
    assert_eq!(i["protocol"], "grpc");
    assert_eq!(i["version"], "1.2.3");
    assert_eq!(
        i["location"],
        json!({"region": "eu", "zone": "eu-1a", "idc": "dc1"})
    );
    assert_eq!(i["cell"], "cell-1");
    assert_eq!(i["lane"], "canary");
    assert_eq!(i["metadata"], json!({"team": "orders", "build/sha": "abc"}));
    assert_eq!(i["ttl_seconds"], 0);
    assert_eq!(i["spec_revision"], r1);
    assert_eq!(i["status_revision"], r1);
    assert_eq!(
        core_status(&i["status"]),
        json!({"health": "unknown", "enabled": true, "weight": 100})
    );

    // Re-registering the identical instance changes nothing.
    let again = api.register("prod", "orders", "o-1", &body).await;
    assert_eq!(again, r1);
    assert_eq!(api.service("prod", "orders").await["revision"], r1);

    // POST without an id: the id defaults to host:port; protocol defaults to http.
    let v = api
        .post(
            "/v1/namespaces/prod/services/orders/instances",
            &inst("10.0.0.2", 9090),
        )
        .await
        .ok();
    assert_eq!(v["id"], "10.0.0.2:9090");
    let r2 = v["revision"].as_u64().unwrap();
    assert!(r2 > r1);
    // POST with an explicit id in the body.
    let v = api
        .post(
            "/v1/namespaces/prod/services/orders/instances",
            &json!({"id": "explicit", "host": "orders.internal", "port": 1}),
        )
        .await
        .ok();
    assert_eq!(v["id"], "explicit");
    let r3 = v["revision"].as_u64().unwrap();
    assert!(r3 > r2);

    let svc = api.service("prod", "orders").await;
    assert_eq!(ids(&svc), ["10.0.0.2:9090", "explicit", "o-1"]);
    assert_eq!(svc["revision"], r3);
    assert_eq!(find(&svc, "10.0.0.2:9090").unwrap()["protocol"], "http");

    // Replacing the spec moves the spec revision.
    let r4 = api
        .register("prod", "orders", "o-1", &inst("10.0.0.9", 8080))
        .await;
    assert!(r4 > r3);
    let svc = api.service("prod", "orders").await;
    let i = find(&svc, "o-1").unwrap();
    assert_eq!(i["host"], "10.0.0.9");
    assert_eq!(i["spec_revision"], r4);
    assert_eq!(i["version"], "");

    let r5 = api.deregister("prod", "orders", "o-1").await;
    assert!(r5 > r4);
    let resp = api.get(&service_path("prod", "orders")).await;
    assert_eq!(resp.revision_header(), r5);
    let svc = resp.ok();
    assert_eq!(ids(&svc), ["10.0.0.2:9090", "explicit"]);
    assert_eq!(svc["revision"], r5);

    // Gone means gone.
    api.delete(&instance_path("prod", "orders", "o-1"))
        .await
        .assert_error(404, &["o-1"]);

    // An unknown service is empty at revision 0, not an error.
    let empty = api.service("prod", "nothing-here").await;
    assert_eq!(empty["revision"], 0);
    assert_eq!(ids(&empty), Vec::<String>::new());
}

#[tokio::test]
async fn patch_status_changes_only_status() {
    let server = Server::start();
    let api = server.api();
    let r1 = api
        .register(
            "ns",
            "svc",
            "a",
            &json!({"host": "10.1.1.1", "port": 80, "version": "v1"}),
        )
        .await;

    let r2 = api
        .set_status("ns", "svc", "a", &json!({"health": "unhealthy"}))
        .await;
    assert!(r2 > r1);
    let svc = api.service("ns", "svc").await;
    assert_eq!(svc["revision"], r2);
    let i = find(&svc, "a").unwrap();
    assert_eq!(
        i["spec_revision"], r1,
        "a status change must not move the spec revision"
    );
    assert_eq!(i["status_revision"], r2);
    assert_eq!(
        core_status(&i["status"]),
        json!({"health": "unhealthy", "enabled": true, "weight": 100})
    );
    assert_eq!(i["host"], "10.1.1.1");
    assert_eq!(i["version"], "v1");

    let r3 = api
        .set_status("ns", "svc", "a", &json!({"enabled": false, "weight": 7}))
        .await;
    assert!(r3 > r2);
    let svc = api.service("ns", "svc").await;
    let i = find(&svc, "a").unwrap();
    assert_eq!(i["spec_revision"], r1);
    assert_eq!(i["status_revision"], r3);
    assert_eq!(
        core_status(&i["status"]),
        json!({"health": "unhealthy", "enabled": false, "weight": 7})
    );

    // Re-registering without a status keeps the current status.
    let r4 = api
        .register("ns", "svc", "a", &json!({"host": "10.1.1.2", "port": 80}))
        .await;
    assert!(r4 > r3);
    let svc = api.service("ns", "svc").await;
    let i = find(&svc, "a").unwrap();
    assert_eq!(i["spec_revision"], r4);
    assert_eq!(i["status_revision"], r3);
    assert_eq!(i["status"]["weight"], 7);

    // Patching a missing instance is a 404.
    api.patch(
        &format!("{}/status", instance_path("ns", "svc", "ghost")),
        &json!({"health": "healthy"}),
    )
    .await
    .assert_error(404, &["ghost"]);
}

#[tokio::test]
async fn heartbeats_answer_unknown_ids() {
    let server = Server::start();
    let api = server.api();
    api.register(
        "hb",
        "svc",
        "eph",
        &json!({"host": "127.0.0.1", "port": 1000, "ttl_seconds": 30}),
    )
    .await;
    api.register("hb", "svc", "per", &inst("127.0.0.1", 1001))
        .await;

    let v = api
        .post(
            "/v1/heartbeats",
            &json!([
                {"namespace": "hb", "service": "svc", "id": "eph"},
                {"namespace": "hb", "service": "svc", "id": "per"},
                {"namespace": "hb", "service": "svc", "id": "ghost"},
                {"namespace": "hb", "service": "other", "id": "eph"},
            ]),
        )
        .await
        .ok();
    assert_eq!(v["renewed"], 1, "{v}");
    assert_eq!(v["persistent"], 1, "{v}");
    assert_eq!(
        v["unknown"],
        json!([
            {"namespace": "hb", "service": "svc", "id": "ghost"},
            {"namespace": "hb", "service": "other", "id": "eph"},
        ])
    );

    // An empty batch is fine.
    let v = api.post("/v1/heartbeats", &json!([])).await.ok();
    assert_eq!(v["renewed"], 0);
    assert_eq!(v["unknown"], json!([]));
}

async fn register_mixed(api: &Api) {
    api.register("hf", "svc", "plain", &inst("10.0.0.1", 1))
        .await;
    for (id, status) in [
        ("healthy", json!({"health": "healthy"})),
        ("unhealthy", json!({"health": "unhealthy"})),
        ("disabled", json!({"enabled": false})),
        ("weight0", json!({"weight": 0})),
    ] {
        api.register(
            "hf",
            "svc",
            id,
            &json!({"host": "10.0.0.1", "port": 2, "status": status}),
        )
        .await;
    }
}

#[tokio::test]
async fn healthy_filter_and_protection_threshold() {
    let server = Server::start();
    let api = server.api();
    register_mixed(&api).await;

    let all = api.service("hf", "svc").await;
    assert_eq!(
        ids(&all),
        ["disabled", "healthy", "plain", "unhealthy", "weight0"]
    );
    let disabled = find(&all, "disabled").unwrap();
    assert_eq!(
        core_status(&disabled["status"]),
        json!({"health": "unknown", "enabled": false, "weight": 100})
    );

    let healthy = api
        .get(&format!("{}?healthy=true", service_path("hf", "svc")))
        .await
        .ok();
    assert_eq!(ids(&healthy), ["healthy", "plain"]);
    assert_eq!(healthy["protected"], false);
    let explicit_false = api
        .get(&format!("{}?healthy=false", service_path("hf", "svc")))
        .await
        .ok();
    assert_eq!(ids(&explicit_false).len(), 5);

    let list = api.get("/v1/namespaces/hf/services").await.ok();
    assert_eq!(list["services"][0]["instances"], 5);
    assert_eq!(list["services"][0]["serving"], 2);

    // 2 of 5 serving = 0.4 < 0.6: protection trips and every instance is returned.
    let before = all["revision"].as_u64().unwrap();
    let rc = api
        .put(
            &service_path("hf", "svc"),
            &json!({"protect_threshold": 0.6}),
        )
        .await
        .ok()["revision"]
        .as_u64()
        .unwrap();
    assert!(rc > before, "configuring must move the service revision");
    let protected = api
        .get(&format!("{}?healthy=true", service_path("hf", "svc")))
        .await
        .ok();
    assert_eq!(protected["protected"], true, "{protected}");
    assert_eq!(protected["revision"], rc);
    assert!((protected["protect_threshold"].as_f64().unwrap() - 0.6).abs() < 1e-6);
    assert_eq!(ids(&protected).len(), 5);

    // 0.4 >= 0.3: no protection.
    api.put(
        &service_path("hf", "svc"),
        &json!({"protect_threshold": 0.3}),
    )
    .await
    .ok();
    let filtered = api
        .get(&format!("{}?healthy=true", service_path("hf", "svc")))
        .await
        .ok();
    assert_eq!(filtered["protected"], false);
    assert_eq!(ids(&filtered), ["healthy", "plain"]);

    // Making two more instances serving keeps it unprotected at 0.6 too: 4/5 = 0.8.
    api.set_status("hf", "svc", "unhealthy", &json!({"health": "healthy"}))
        .await;
    api.set_status("hf", "svc", "weight0", &json!({"weight": 50}))
        .await;
    api.put(
        &service_path("hf", "svc"),
        &json!({"protect_threshold": 0.6}),
    )
    .await
    .ok();
    let filtered = api
        .get(&format!("{}?healthy=true", service_path("hf", "svc")))
        .await
        .ok();
    assert_eq!(filtered["protected"], false);
    assert_eq!(ids(&filtered), ["healthy", "plain", "unhealthy", "weight0"]);
}

#[tokio::test]
async fn list_namespaces_and_services_with_counts() {
    let server = Server::start();
    let api = server.api();
    assert_eq!(
        api.get("/v1/namespaces").await.ok(),
        json!({"namespaces": []})
    );
    let a1 = api.register("alpha", "a", "1", &inst("10.0.0.1", 1)).await;
    let a2 = api.register("alpha", "a", "2", &inst("10.0.0.2", 1)).await;
    let b1 = api
        .register(
            "alpha",
            "b",
            "1",
            &json!({"host": "10.0.0.3", "port": 1, "status": {"health": "unhealthy"}}),
        )
        .await;
    api.register("beta", "c", "1", &inst("10.0.0.4", 1)).await;
    assert!(a1 < a2 && a2 < b1);

    let ns = api.get("/v1/namespaces").await.ok();
    assert_eq!(
        ns,
        json!({"namespaces": [
            {"namespace": "alpha", "services": 2, "instances": 3},
            {"namespace": "beta", "services": 1, "instances": 1},
        ]})
    );
    let svcs = api.get("/v1/namespaces/alpha/services").await.ok();
    assert_eq!(
        svcs,
        json!({"namespace": "alpha", "services": [
            {"service": "a", "revision": a2, "instances": 2, "serving": 2},
            {"service": "b", "revision": b1, "instances": 1, "serving": 0},
        ]})
    );
    let none = api.get("/v1/namespaces/gamma/services").await.ok();
    assert_eq!(none, json!({"namespace": "gamma", "services": []}));

    // Emptying a service drops it from both listings.
    api.deregister("alpha", "b", "1").await;
    let ns = api.get("/v1/namespaces").await.ok();
    assert_eq!(ns["namespaces"][0]["services"], 1);
    assert_eq!(ns["namespaces"][0]["instances"], 2);
    let svcs = api.get("/v1/namespaces/alpha/services").await.ok();
    assert_eq!(svcs["services"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn blocking_query_wakes_on_change_and_times_out() {
    let server = Server::start();
    let api = server.api();
    let r1 = api.register("bq", "svc", "a", &inst("10.0.0.1", 1)).await;

    // A change 300 ms into a 10 s wait ends the wait at once.
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            api.register("bq", "svc", "b", &inst("10.0.0.2", 1)).await
        })
    };
    let started = Instant::now();
    let resp = api
        .get(&format!(
            "{}?index={r1}&wait=10s",
            service_path("bq", "svc")
        ))
        .await;
    let took = started.elapsed();
    let r2 = bounded("the writer", Duration::from_secs(10), writer)
        .await
        .unwrap();
    assert!(r2 > r1);
    assert!(
        took < Duration::from_secs(3),
        "blocking query took {took:?} after a change"
    );
    assert!(
        took >= Duration::from_millis(200),
        "returned before the change: {took:?}"
    );
    assert_eq!(resp.revision_header(), r2);
    let body = resp.ok();
    assert_eq!(body["revision"], r2);
    assert_eq!(ids(&body), ["a", "b"]);

    // An index below the current revision answers at once.
    let started = Instant::now();
    let resp = api
        .get(&format!(
            "{}?index={r1}&wait=10s",
            service_path("bq", "svc")
        ))
        .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(resp.revision_header(), r2);

    // Nothing changes: the answer comes after the wait, unchanged.
    let started = Instant::now();
    let resp = api
        .get(&format!("{}?index={r2}&wait=1s", service_path("bq", "svc")))
        .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "wait=1s took {took:?}"
    );
    assert_eq!(resp.revision_header(), r2);
    assert_eq!(resp.ok()["revision"], r2);

    // Waiting on a service that does not exist yet wakes when its first instance registers.
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            api.register("bq", "later", "x", &inst("10.0.0.3", 1)).await
        })
    };
    let started = Instant::now();
    let resp = api
        .get(&format!(
            "{}?index=0&wait=10s&healthy=true",
            service_path("bq", "later")
        ))
        .await;
    let r3 = bounded("the writer", Duration::from_secs(10), writer)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(resp.revision_header(), r3);
    assert_eq!(ids(&resp.ok()), ["x"]);
}

#[tokio::test]
async fn discover_returns_many_services_at_once() {
    let server = Server::start();
    let api = server.api();
    api.register("d", "a", "1", &inst("10.0.0.1", 1)).await;
    api.register("d", "a", "2", &inst("10.0.0.2", 1)).await;
    api.register(
        "d",
        "b",
        "1",
        &json!({"host": "10.0.0.3", "port": 1, "status": {"health": "unhealthy"}}),
    )
    .await;
    let last = api.register("e", "c", "1", &inst("10.0.0.4", 1)).await;

    let v = api
        .post(
            "/v1/discover",
            &json!({"services": [
                {"namespace": "d", "service": "a"},
                {"namespace": "d", "service": "b"},
                {"namespace": "e", "service": "c"},
                {"namespace": "d", "service": "missing"},
            ]}),
        )
        .await
        .ok();
    assert!(v["revision"].as_u64().unwrap() >= last);
    let services = v["services"].as_array().unwrap();
    let names: Vec<(&str, &str)> = services
        .iter()
        .map(|s| {
            (
                s["namespace"].as_str().unwrap(),
                s["service"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("d", "a"), ("d", "b"), ("e", "c"), ("d", "missing")]
    );
    assert_eq!(ids(&services[0]), ["1", "2"]);
    assert_eq!(ids(&services[1]), ["1"]);
    assert_eq!(ids(&services[2]), ["1"]);
    assert_eq!(services[2]["revision"], last);
    assert_eq!(ids(&services[3]), Vec::<String>::new());
    assert_eq!(services[3]["revision"], 0);

    let v = api
        .post(
            "/v1/discover",
            &json!({"services": [
                {"namespace": "d", "service": "a"},
                {"namespace": "d", "service": "b"},
            ], "healthy_only": true}),
        )
        .await
        .ok();
    assert_eq!(ids(&v["services"][0]), ["1", "2"]);
    assert_eq!(ids(&v["services"][1]), Vec::<String>::new());
}

#[tokio::test]
async fn ephemeral_instances_expire_without_heartbeats() {
    let server = Server::start();
    let api = server.api();
    let eph = |port: u16| json!({"host": "10.0.0.1", "port": port, "ttl_seconds": 1});
    api.register("lease", "svc", "dead", &eph(1)).await;
    api.register("lease", "svc", "alive", &eph(2)).await;
    let reput_rev = api.register("lease", "svc", "reput", &eph(3)).await;
    api.register("lease", "svc", "converted", &eph(4)).await;
    api.register("lease", "svc", "persistent", &inst("10.0.0.1", 5))
        .await;
    // Re-registered without a TTL: persistent from now on.
    api.register("lease", "svc", "converted", &inst("10.0.0.1", 4))
        .await;
    let svc = api.service("lease", "svc").await;
    let everyone = ["alive", "converted", "dead", "persistent", "reput"];
    assert_eq!(ids(&svc), everyone);
    assert_eq!(find(&svc, "dead").unwrap()["ttl_seconds"], 1);
    assert_eq!(find(&svc, "converted").unwrap()["ttl_seconds"], 0);

    let mut sse = Sse::open(&api, "service=lease/svc", None).await;
    let snap = sse.expect(Duration::from_secs(5)).await;
    assert_eq!(snap.event, "snapshot");
    assert_eq!(ids(&snap.data), everyone);

    let started = Instant::now();
    let mut dead_gone_after = None;
    let beat = json!([{"namespace": "lease", "service": "svc", "id": "alive"}]);
    while started.elapsed() < Duration::from_millis(3500) {
        let hb = api.post("/v1/heartbeats", &beat).await.ok();
        assert_eq!(hb["renewed"], 1, "the kept-alive instance vanished: {hb}");
        // An identical re-registration renews the lease too, and changes nothing.
        let r = api.register("lease", "svc", "reput", &eph(3)).await;
        assert_eq!(r, reput_rev);
        let svc = api.service("lease", "svc").await;
        let now = ids(&svc);
        for keep in ["alive", "converted", "persistent", "reput"] {
            assert!(now.contains(&keep.to_string()), "{keep} vanished: {svc}");
        }
        if dead_gone_after.is_none() && !now.contains(&"dead".to_string()) {
            dead_gone_after = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone = dead_gone_after.expect("the instance without heartbeats never expired");
    assert!(
        gone <= Duration::from_secs(3),
        "expired only after {gone:?}"
    );
    assert!(
        gone >= Duration::from_millis(500),
        "expired too early: {gone:?}"
    );
    let svc = api.service("lease", "svc").await;
    assert_eq!(ids(&svc), ["alive", "converted", "persistent", "reput"]);

    // Watchers saw exactly one change: the expiry, with its reason.
    let f = sse.expect(Duration::from_secs(5)).await;
    assert_eq!(f.event, "delete", "{f:?}");
    assert_eq!(f.data["id"], "dead");
    assert_eq!(f.data["reason"], "lease_expired");
    assert_eq!(f.id, svc["revision"].as_u64());
    sse.expect_quiet(Duration::from_millis(300)).await;

    // The expired one is unknown to heartbeats now.
    let hb = api
        .post(
            "/v1/heartbeats",
            &json!([{"namespace": "lease", "service": "svc", "id": "dead"}]),
        )
        .await
        .ok();
    assert_eq!(hb["unknown"].as_array().unwrap().len(), 1);
}

/// The registered status fields (the view adds derived ones: effective_weight, serving, ...).
fn core_status(v: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "health": v["health"],
        "enabled": v["enabled"],
        "weight": v["weight"],
    })
}

/// `curl -X PUT -d '{...}'` sends no JSON content type (curl's default is
/// `application/x-www-form-urlencoded`); like Consul and etcd, a JSON body is accepted when the
/// request declares no type or that one.
#[tokio::test]
async fn json_bodies_without_a_json_content_type() {
    let server = Server::start();
    let api = server.api();
    let body = r#"{"host":"10.0.0.1","port":80}"#;
    for (id, ct) in [
        ("none", None),
        ("form", Some("application/x-www-form-urlencoded")),
        ("json", Some("application/json; charset=utf-8")),
    ] {
        let mut req = api
            .client
            .put(api.url(&instance_path("ns", "svc", id)))
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = Api::read(req, id).await.ok();
        assert!(r["revision"].as_u64().unwrap() > 0, "{r}");
    }
    // Also the other JSON endpoints, e.g. a status patch and heartbeats.
    let r = Api::read(
        api.client
            .patch(api.url(&format!("{}/status", instance_path("ns", "svc", "none"))))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(r#"{"weight": 5}"#),
        "patch",
    )
    .await
    .ok();
    assert!(r["revision"].as_u64().unwrap() > 0, "{r}");
    let r = Api::read(
        api.client
            .post(api.url("/v1/heartbeats"))
            .body(r#"[{"namespace":"ns","service":"svc","id":"form"}]"#),
        "heartbeats",
    )
    .await
    .ok();
    assert_eq!(r["persistent"], 1, "{r}");
    let svc = api.service("ns", "svc").await;
    assert_eq!(ids(&svc), ["form", "json", "none"]);
    assert_eq!(find(&svc, "none").unwrap()["status"]["weight"], 5);
}

/// Blocking reads of names nobody registered leave nothing behind, and a service a write
/// emptied leaves memory after `--vacant-retention-seconds` (0 here) when nobody watches it.
#[tokio::test]
async fn unknown_names_and_emptied_services_leave_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--vacant-retention-seconds", "0"]);
    let api = server.api();
    // 2,000 made-up names, 100 blocking reads in flight at a time, each waiting 50 ms.
    for chunk in 0..20 {
        let reads: Vec<_> = (0..100)
            .map(|i| {
                let api = api.clone();
                let path = format!(
                    "{}?index=1&wait=50ms",
                    service_path("ghosts", &format!("g{chunk}-{i}"))
                );
                tokio::spawn(async move { api.get(&path).await.ok() })
            })
            .collect();
        for r in reads {
            assert_eq!(ids(&r.await.unwrap()), Vec::<String>::new());
        }
    }
    api.register("prod", "orders", "o-1", &inst("10.0.0.1", 80))
        .await;
    api.deregister("prod", "orders", "o-1").await;
    // The gauge is refreshed every lease tick (250 ms); wait for it to show nothing held.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entries = metric(&api, "sextant_service_entries").await;
        if entries == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{entries} service entries still held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Listing never showed the ghosts, and the emptied service is gone from it too.
    let list = api.get("/v1/namespaces/ghosts/services").await.ok();
    assert_eq!(list["services"].as_array().map(Vec::len), Some(0), "{list}");
}
