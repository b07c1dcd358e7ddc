//! Access control against the real binary with `--auth on`: bootstrap once, tokens and
//! policies, 401 / 403 / success on native HTTP, native gRPC and Eureka, the CLI and the SDK
//! with a token, a watch ended by revoking its token, audit entries naming the token, and
//! every route of the native router either public or refused without a token.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use sextant_proto::v1 as pb;
use tonic::Code;

fn api_with(server: &Server, secret: &str) -> Api {
    server.api().with_bearer(secret)
}

async fn bootstrap(api: &Api) -> (String, String) {
    let r = api.post("/v1/acl/bootstrap", &json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["secret"].as_str().unwrap().to_string(),
    )
}

/// A policy granting `rights` in `ns`, and a token holding it: (id, secret).
async fn token_for(admin: &Api, name: &str, ns: &str, rights: &[&str]) -> (String, String) {
    admin
        .put(
            &format!("/v1/acl/policies/{name}"),
            &json!({"rules": [{"namespace": ns, "rights": rights}]}),
        )
        .await
        .ok();
    let r = admin
        .post(
            "/v1/acl/tokens",
            &json!({"policies": [name], "description": name}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["secret"].as_str().unwrap().to_string(),
    )
}

fn with_token<T>(msg: T, secret: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    r
}

#[tokio::test]
async fn native_http_grpc_and_eureka_refuse_then_allow_by_scope() {
    let server = Server::start_with_args(&["--auth", "on"]);
    let anon = server.api();

    // No credential: 401 on every adapter of the HTTP listener.
    let r = anon.get("/v1/namespaces/prod/services/web").await;
    r.assert_error(401, &["token"]);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    anon.put(&instance_path("prod", "web", "a"), &inst("10.0.0.1", 80))
        .await
        .assert_error(401, &["token"]);
    let r = anon.get("/eureka/apps").await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    // Health, readiness and metrics stay public.
    assert_eq!(anon.get("/healthz").await.status, 200);
    assert_eq!(anon.get("/metrics").await.status, 200);
    // A bad token is a 401 too.
    api_with(&server, "nope")
        .get("/v1/namespaces")
        .await
        .assert_error(401, &["not valid"]);

    let (admin_id, admin_secret) = bootstrap(&anon).await;
    anon.post("/v1/acl/bootstrap", &json!({}))
        .await
        .assert_error(409, &["already"]);
    let admin = api_with(&server, &admin_secret);
    let (app_id, app_secret) = token_for(&admin, "prod-rw", "prod", &["read", "write"]).await;
    let app = api_with(&server, &app_secret);

    // Right scope works; another namespace is 403 naming the right and the namespace.
    app.register("prod", "web", "a", &inst("10.0.0.1", 80))
        .await;
    assert_eq!(ids(&app.service("prod", "web").await), ["a"]);
    app.put(&instance_path("dev", "web", "a"), &inst("10.0.0.1", 80))
        .await
        .assert_error(403, &["write", "dev"]);
    app.get("/v1/namespaces/dev/services/web")
        .await
        .assert_error(403, &["read", "dev"]);
    app.post(
        "/v1/discover",
        &json!({"services": [{"namespace": "prod", "service": "web"}, {"namespace": "dev", "service": "web"}]}),
    )
    .await
    .assert_error(403, &["read", "dev"]);
    // Operating (drain) needs `operate`; ACLs need `admin`.
    app.post(
        &format!("{}/drain", instance_path("prod", "web", "a")),
        &json!({}),
    )
    .await
    .assert_error(403, &["operate", "prod"]);
    app.get("/v1/acl/tokens")
        .await
        .assert_error(403, &["admin"]);
    admin
        .post(
            &format!("{}/drain", instance_path("prod", "web", "a")),
            &json!({}),
        )
        .await
        .ok();

    // Native gRPC: metadata `authorization: Bearer`.
    let mut g = server.grpc_client().await;
    let e = g
        .register(grpc_reg("prod", "api", "g1", "10.0.0.2", 81))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = g
        .register(with_token(
            grpc_reg("dev", "api", "g1", "10.0.0.2", 81),
            &app_secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("dev"), "{e:?}");
    g.register(with_token(
        grpc_reg("prod", "api", "g1", "10.0.0.2", 81),
        &app_secret,
    ))
    .await
    .unwrap();
    let e = g
        .get_service(with_token(
            pb::GetServiceRequest {
                service: Some(svc_ref("dev", "api")),
                ..Default::default()
            },
            &app_secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Eureka: basic auth, user `token` or the token's id; its namespace is `public`.
    let eureka = |user: &str, secret: &str| {
        anon.client
            .get(anon.url("/eureka/apps"))
            .header("accept", "application/json")
            .basic_auth(user, Some(secret))
    };
    let r = Api::read(eureka("token", &admin_secret), "eureka admin").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = Api::read(eureka(&admin_id, &admin_secret), "eureka admin id").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = Api::read(eureka("someone-else", &admin_secret), "eureka wrong user").await;
    assert_eq!(r.status, 401, "{}", r.text);
    let r = Api::read(eureka("token", &app_secret), "eureka app").await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("public"), "{}", r.text);

    // The audit log names the token of each write, never a secret.
    let r = admin.get("/v1/audit?namespace=prod").await.ok();
    let entries = r["entries"].as_array().unwrap();
    let by_app: Vec<&Value> = entries
        .iter()
        .filter(|e| e["token_id"] == app_id.as_str())
        .collect();
    assert!(
        by_app.iter().any(|e| e["protocol"] == "http"
            && e["change"]
                .as_str()
                .unwrap()
                .contains("register prod/web/a")),
        "{entries:#?}"
    );
    assert!(
        by_app
            .iter()
            .any(|e| e["protocol"] == "grpc"
                && e["change"].as_str().unwrap().contains("prod/api/g1")),
        "{entries:#?}"
    );
    assert!(entries.iter().any(|e| e["token_id"] == admin_id.as_str()
        && e["change"].as_str().unwrap().starts_with("status")));
    let all = admin.get("/v1/audit").await.text;
    assert!(all.contains("acl token create"), "{all}");
    assert!(!all.contains(&app_secret) && !all.contains(&admin_secret));
    app.get("/v1/audit?namespace=prod")
        .await
        .assert_error(403, &["admin"]);
    assert!(!server.log().contains(&app_secret));
}

#[tokio::test]
async fn revoking_a_token_ends_its_watches() {
    let server = Server::start_with_args(&["--auth", "on"]);
    let (_, admin_secret) = bootstrap(&server.api()).await;
    let admin = api_with(&server, &admin_secret);
    let (app_id, app_secret) = token_for(&admin, "prod-r", "prod", &["read"]).await;
    let app = api_with(&server, &app_secret);

    // Refused at subscribe time outside the token's scope.
    let r = app.get("/v1/watch?service=dev/web").await;
    r.assert_error(403, &["read", "dev"]);

    let mut sse = Sse::open(&app, "service=prod/web", None).await;
    let first = sse.expect(Duration::from_secs(5)).await;
    assert_eq!(first.event, "snapshot", "{:?}", first.raw);
    let mut g = server.grpc_client().await;
    let mut stream = g
        .watch(with_token(
            pb::WatchRequest {
                services: vec![svc_ref("prod", "web")],
                since: None,
            },
            &app_secret,
        ))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();

    admin.delete(&format!("/v1/acl/tokens/{app_id}")).await.ok();
    // The SSE stream closes with a reason; the gRPC one ends with UNAUTHENTICATED.
    let mut closed = None;
    for _ in 0..20 {
        match sse.next(Duration::from_secs(5)).await {
            Next::Frame(f) if f.event == "close" => {
                closed = Some(f.raw);
                break;
            }
            Next::Frame(_) => continue,
            Next::End => break,
            Next::Timeout => panic!("the watch went on after its token was revoked"),
        }
    }
    assert!(
        closed.as_deref().is_some_and(|r| r.contains("revoked")),
        "{closed:?}"
    );
    let end = bounded("gRPC watch end", Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    let e = end.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    // And the token is refused from now on.
    app.get("/v1/namespaces/prod/services/web")
        .await
        .assert_error(401, &["not valid"]);
}

/// Every route the native router declares (read from its source, so a new route is covered
/// without editing this test), with every method and made-up path values, is refused with 401
/// without a token unless it is one of the public routes; so are paths no route matches.
#[tokio::test]
async fn every_native_route_is_public_or_needs_a_token() {
    let server = Server::start_with_args(&["--auth", "on"]);
    let api = server.api();
    let sources = [
        include_str!("../../server/src/http/mod.rs"),
        include_str!("../../server/src/http/acl.rs"),
        include_str!("../../eureka/src/http.rs"),
    ];
    let instance = "/v1/namespaces/{ns}/services/{svc}/instances/{id}";
    let mut routes: Vec<String> = Vec::new();
    for src in sources {
        for (i, _) in src.match_indices("\"/") {
            let rest = &src[i + 1..];
            let end = rest.find('"').unwrap();
            let lit = &rest[..end];
            if lit.contains(' ') || lit.len() < 2 {
                continue;
            }
            routes.push(lit.to_string());
        }
        for (i, _) in src.match_indices("\"{instance}/") {
            let rest = &src[i + 1..];
            let end = rest.find('"').unwrap();
            routes.push(rest[..end].replace("{instance}", instance));
        }
        for (i, _) in src.match_indices("\"{p}/") {
            let rest = &src[i + 1..];
            let end = rest.find('"').unwrap();
            for p in ["/eureka", "/eureka/v2"] {
                routes.push(
                    rest[..end]
                        .replace("{p}", p)
                        .replace("{{", "{")
                        .replace("}}", "}"),
                );
            }
        }
    }
    routes.push(instance.into());
    routes.push("/no/such/route".into());
    routes.sort();
    routes.dedup();
    assert!(routes.len() > 25, "{routes:?}");
    let public = [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/v1/acl/bootstrap"),
    ];
    let mut rng = Jitter::new(7);
    let mut checked = 0;
    for route in &routes {
        for method in ["GET", "PUT", "POST", "PATCH", "DELETE"] {
            // Fill each `{param}` (and `{*rest}`) with a made-up value.
            let mut path = String::new();
            for seg in route.split('/').skip(1) {
                path.push('/');
                if seg.starts_with('{') {
                    path.push_str(&format!("x{}", rng.next_u64() % 1000));
                } else {
                    path.push_str(seg);
                }
            }
            if public.contains(&(method, route.as_str())) {
                continue;
            }
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let r = api.send(m, &path, Some(&json!({}))).await;
            assert_eq!(r.status, 401, "{method} {path} (route {route}): {}", r.text);
            checked += 1;
        }
    }
    assert!(checked > 100, "{checked}");
}

#[tokio::test]
async fn cli_and_sdk_use_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--auth", "on"]);
    let bin = env!("CARGO_BIN_EXE_sextant");
    let cli = |args: &[&str], token: Option<&str>| {
        let mut c = std::process::Command::new(bin);
        c.args(["--server", &server.base()])
            .args(["--grpc-server", &format!("http://{}", server.grpc)])
            .args(args)
            .env_remove("SEXTANT_TOKEN");
        if let Some(t) = token {
            c.env("SEXTANT_TOKEN", t);
        }
        c.output().expect("run the CLI")
    };
    let out = cli(&["acl", "bootstrap"], None);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let secret = stdout.lines().last().unwrap().trim().to_string();
    assert_eq!(secret.len(), 64, "{stdout}");
    let again = cli(&["acl", "bootstrap"], None);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already"));

    let out = cli(
        &[
            "acl",
            "policy",
            "create",
            "p1",
            "--namespace",
            "prod",
            "--rights",
            "read,write",
        ],
        Some(&secret),
    );
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["acl", "token", "create", "--policy", "p1"], Some(&secret));
    assert!(out.status.success(), "{out:?}");
    let app = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let out = cli(&["acl", "token", "list"], Some(&secret));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("p1"),
        "{out:?}"
    );

    // The CLI's register goes through the SDK over gRPC with the token.
    let out = cli(
        &["register", "prod/web", "--host", "10.0.0.9", "--port", "80"],
        Some(&app),
    );
    assert!(out.status.success(), "{out:?}");
    let out = cli(
        &["register", "dev/web", "--host", "10.0.0.9", "--port", "80"],
        Some(&app),
    );
    assert!(!out.status.success(), "{out:?}");
    let out = cli(&["get", "prod/web"], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    let out = cli(&["get", "prod/web"], Some(&app));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.0.0.9"),
        "{out:?}"
    );
    let out = cli(&["audit", "--namespace", "prod"], Some(&secret));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("register prod/web/10.0.0.9:80"),
        "{out:?}"
    );

    // Tokens and the bootstrap survive a restart (they live in the registry's store).
    drop(server);
    let server = Server::start_with(tmp.path(), &["--auth", "on"]);
    let admin = api_with(&server, &secret);
    admin.get("/v1/acl/tokens").await.ok();
    server
        .api()
        .post("/v1/acl/bootstrap", &json!({}))
        .await
        .assert_error(409, &["already"]);
}

/// xDS streams open only with a token that may read every namespace.
#[tokio::test]
async fn xds_streams_need_a_token_that_reads_everything() {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    let server = Server::start_with_args(&["--auth", "on"]);
    let (_, admin_secret) = bootstrap(&server.api()).await;
    let admin = api_with(&server, &admin_secret);
    let (_, app_secret) = token_for(&admin, "prod-r", "prod", &["read"]).await;
    let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let open = |secret: Option<&str>| {
        let first = DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
            resource_names: vec!["web.prod".into()],
            ..Default::default()
        };
        let mut r = tonic::Request::new(tokio_stream::iter(vec![first]));
        if let Some(s) = secret {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {s}").parse().unwrap());
        }
        r
    };
    let e = c.stream_aggregated_resources(open(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .stream_aggregated_resources(open(Some(&app_secret)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    c.stream_aggregated_resources(open(Some(&admin_secret)))
        .await
        .unwrap();
}

/// Consul's HTTP API passes the same check: no token (or a bad one) is a 401 — also for
/// endpoints that read nothing of the registry —, a token of another namespace a 403, the
/// right one works through `X-Consul-Token` or `?token=`, and its writes are audited as
/// `consul` with the token's id.
#[tokio::test]
async fn consul_api_refuses_then_allows_by_scope() {
    let server = Server::start_with_args(&["--auth", "on"]);
    let consul = format!("http://{}", server.consul.expect("Consul is on"));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (_, admin_secret) = bootstrap(&server.api()).await;
    let admin = api_with(&server, &admin_secret);
    let (app_id, app_secret) = token_for(&admin, "pub-rw", "public", &["read", "write"]).await;
    let reg = json!({"ID": "web-1", "Name": "web", "Address": "10.0.0.1", "Port": 80});

    let r = http
        .put(format!("{consul}/v1/agent/service/register"))
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("x-consul-index"));
    for path in ["/v1/agent/self", "/v1/health/service/web", "/v1/kv/x"] {
        let r = http.get(format!("{consul}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = http
        .get(format!("{consul}/v1/catalog/services"))
        .header("x-consul-token", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The right scope, by header and by query.
    let r = http
        .put(format!("{consul}/v1/agent/service/register"))
        .header("x-consul-token", &app_secret)
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let r = http
        .get(format!("{consul}/v1/health/service/web?token={app_secret}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v[0]["Service"]["ID"], "web-1");

    // Another namespace: 403 naming the right and the namespace.
    let r = http
        .get(format!("{consul}/v1/health/service/web?ns=prod"))
        .header("x-consul-token", &app_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(text.contains("read") && text.contains("prod"), "{text}");
    // The agent's listing spans namespaces: it needs `read` on all of them.
    let r = http
        .get(format!("{consul}/v1/agent/services"))
        .header("x-consul-token", &app_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Audited as a Consul write by the app's token.
    let audit = admin.get("/v1/audit?namespace=public").await.ok();
    let entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["change"].as_str().unwrap_or("").contains("web-1"))
        .cloned()
        .unwrap_or_else(|| panic!("no audit entry for web-1: {audit}"));
    assert_eq!(entry["token_id"], app_id.as_str(), "{entry}");
    assert_eq!(entry["protocol"], "consul", "{entry}");
}
