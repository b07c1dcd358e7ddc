//! Health checking and instance lifecycle over the real binary: a check defined through the
//! API probes real listeners; drain takes an instance out of results and out of an active
//! watch at once and undrain (or a new registration) brings it back; an operator's weight
//! override wins until cleared; suspect reports are accepted, deduplicated and answered; the
//! CLI's drain / undrain / weight / check commands do the same.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const FRAME: Duration = Duration::from_secs(5);

async fn wait_health(api: &Api, id: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let svc = api.service("p", "web").await;
        let h = find(&svc, id).map(|i| i["status"]["health"].clone());
        if h == Some(json!(want)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} is {h:?}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sextant"))
        .arg("--server")
        .arg(server.base())
        .args(args)
        .output()
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "sextant {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn checks_drain_weight_override_and_suspects() {
    let server = Server::start();
    let api = server.api();
    // A real listener that accepts, and a port nobody listens on.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = up.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = up.accept().await {
            drop(s);
        }
    });
    let down_port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    api.register("p", "web", "up", &inst("127.0.0.1", up_port))
        .await;
    api.register("p", "web", "down", &inst("127.0.0.1", down_port))
        .await;
    let check = json!({"check": {"kind": "tcp", "interval_ms": 200, "timeout_ms": 150, "rise": 1, "fall": 1}});
    api.put("/v1/namespaces/p/services/web", &check).await.ok();
    assert_eq!(api.service("p", "web").await["check"]["kind"], "tcp");
    wait_health(&api, "up", "healthy").await;
    wait_health(&api, "down", "unhealthy").await;

    // Drain: out of results and out of an active watch at once.
    let mut sse = Sse::open(&api, "service=p/web", None).await;
    assert_eq!(sse.expect(FRAME).await.event, "snapshot");
    let r = api
        .post(
            &format!("{}/drain", instance_path("p", "web", "up")),
            &json!({}),
        )
        .await
        .ok()["revision"]
        .as_u64()
        .unwrap();
    let f = loop {
        let f = sse.expect(FRAME).await;
        if f.data["revision"].as_u64() == Some(r) {
            break f;
        }
    };
    assert_eq!(f.event, "status");
    assert!(f.data["status"]["draining_since_ms"].is_u64(), "{f:?}");
    assert_eq!(f.data["status"]["serving"], false);
    let healthy = api
        .get("/v1/namespaces/p/services/web?healthy=true")
        .await
        .ok();
    assert!(ids(&healthy).is_empty(), "{healthy}");
    let all = api.service("p", "web").await;
    let up_view = find(&all, "up").unwrap();
    assert!(up_view["status"]["draining_for_ms"].is_u64());
    assert_eq!(
        up_view["status"]["health"], "healthy",
        "health keeps being tracked"
    );

    // Undrain brings it back; so does a new registration after a drain.
    api.post(
        &format!("{}/undrain", instance_path("p", "web", "up")),
        &json!({}),
    )
    .await
    .ok();
    let healthy = api
        .get("/v1/namespaces/p/services/web?healthy=true")
        .await
        .ok();
    assert_eq!(ids(&healthy), vec!["up"]);
    cli(&server, &["drain", "p/web", "up"]);
    assert!(ids(&api
        .get("/v1/namespaces/p/services/web?healthy=true")
        .await
        .ok())
    .is_empty());
    api.register("p", "web", "up", &inst("127.0.0.1", up_port))
        .await;
    assert_eq!(
        ids(&api
            .get("/v1/namespaces/p/services/web?healthy=true")
            .await
            .ok()),
        vec!["up"]
    );

    // Weight override: wins over the registered weight until cleared; 0 takes it out.
    cli(&server, &["weight", "p/web", "up", "0"]);
    let v = api.service("p", "web").await;
    assert_eq!(find(&v, "up").unwrap()["status"]["effective_weight"], 0);
    assert_eq!(find(&v, "up").unwrap()["status"]["weight"], 100);
    assert!(ids(&api
        .get("/v1/namespaces/p/services/web?healthy=true")
        .await
        .ok())
    .is_empty());
    cli(&server, &["weight", "p/web", "up", "--clear"]);
    let v = api.service("p", "web").await;
    assert_eq!(find(&v, "up").unwrap()["status"]["effective_weight"], 100);
    api.patch(
        &format!("{}/status", instance_path("p", "web", "up")),
        &json!({"weight_override": 20000}),
    )
    .await
    .assert_error(400, &["weight_override"]);

    // Suspect reports.
    let body = json!({"reporter": "agent-1", "instances": [
        {"namespace": "p", "service": "web", "id": "up"},
        {"namespace": "p", "service": "web", "id": "nope"},
    ]});
    let r = api.post("/v1/suspects", &body).await.ok();
    let outcomes: Vec<_> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["outcome"].as_str().unwrap().to_string())
        .collect();
    assert!(
        outcomes[0] == "scheduled" || outcomes[0] == "duplicate",
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], "not_probed");
    api.post("/v1/suspects", &json!({"instances": [{"namespace": "p"}]}))
        .await
        .assert_error(422, &["service"]);

    // Turning the check off stops probing; the CLI can set it again.
    cli(&server, &["check", "p/web", "--kind", "none"]);
    assert_eq!(api.service("p", "web").await["check"]["kind"], "none");
    let out = cli(
        &server,
        &[
            "check",
            "p/web",
            "--kind",
            "http",
            "--path",
            "/ready",
            "--interval",
            "2s",
        ],
    );
    assert!(out.contains("check of p/web set"), "{out}");
    let v = api.service("p", "web").await;
    assert_eq!(v["check"]["http_path"], "/ready");
    assert_eq!(v["check"]["interval_ms"], 2000);
    let metrics = api.get("/metrics").await;
    assert!(
        metrics
            .text
            .contains("sextant_health_probes_total{kind=\"tcp\",result=\"ok\"}"),
        "no probe metrics"
    );
}

#[tokio::test]
async fn scanner_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = std::fs::File::create(dir.path().join("c.toml")).unwrap();
    std::io::Write::write_all(&mut cfg, b"health_scanner = false\n").unwrap();
    let cfg_path = dir.path().join("c.toml");
    let server = Server::start_with(dir.path(), &["--config", cfg_path.to_str().unwrap()]);
    let api = server.api();
    api.post(
        "/v1/suspects",
        &json!({"instances": [{"namespace": "p", "service": "web", "id": "x"}]}),
    )
    .await
    .assert_error(503, &["scanner"]);
}

#[tokio::test]
async fn lifecycle_over_grpc() {
    use sextant_proto::v1 as pb;
    let server = Server::start();
    let mut c = server.grpc_client().await;
    let svc = || {
        Some(pb::ServiceRef {
            namespace: "g".into(),
            service: "web".into(),
        })
    };
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = up.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = up.accept().await {
            drop(s);
        }
    });
    c.register(pb::RegisterRequest {
        service: svc(),
        spec: Some(pb::InstanceSpec {
            host: "127.0.0.1".into(),
            port: u32::from(port),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = format!("127.0.0.1:{port}");
    // A check with only the kind and interval set: the rest take defaults.
    c.configure_service(pb::ConfigureServiceRequest {
        service: svc(),
        protect_threshold: None,
        check: Some(pb::HealthCheck {
            kind: pb::CheckKind::CheckTcp as i32,
            interval_ms: 200,
            timeout_ms: 100,
            rise: 1,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let get = |c: &mut sextant_proto::v1::registry_client::RegistryClient<_>| {
        let mut c = c.clone();
        async move {
            c.get_service(pb::GetServiceRequest {
                service: svc(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let s = get(&mut c).await;
    let check = s.check.unwrap();
    assert_eq!(check.kind, pb::CheckKind::CheckTcp as i32);
    assert_eq!((check.fall, check.http_path.as_str()), (3, "/health"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = get(&mut c).await;
        if s.instances[0].status.unwrap().health == pb::Health::Healthy as i32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never probed healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Drain and a weight override through UpdateStatus.
    c.update_status(pb::UpdateStatusRequest {
        service: svc(),
        id: id.clone(),
        draining: Some(true),
        weight_override: Some(7),
        ..Default::default()
    })
    .await
    .unwrap();
    let st = get(&mut c).await.instances[0].status.unwrap();
    assert!(st.draining_since_ms.is_some());
    assert_eq!(st.weight_override, Some(7));
    let healthy = c
        .get_service(pb::GetServiceRequest {
            service: svc(),
            healthy_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(healthy.instances.is_empty());
    c.update_status(pb::UpdateStatusRequest {
        service: svc(),
        id: id.clone(),
        draining: Some(false),
        clear_weight_override: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let st = get(&mut c).await.instances[0].status.unwrap();
    assert_eq!((st.draining_since_ms, st.weight_override), (None, None));
    // Suspects.
    let r = c
        .report_suspects(pb::SuspectRequest {
            reporter: "agent".into(),
            instances: vec![
                pb::InstanceRef {
                    service: svc(),
                    id: id.clone(),
                },
                pb::InstanceRef {
                    service: svc(),
                    id: "nope".into(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcomes.len(), 2);
    assert_eq!(r.outcomes[1], "not_probed");
    // Bad check settings are InvalidArgument naming the field.
    let err = c
        .configure_service(pb::ConfigureServiceRequest {
            service: svc(),
            protect_threshold: None,
            check: Some(pb::HealthCheck {
                kind: pb::CheckKind::CheckHttp as i32,
                http_path: "no-slash".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("check.http_path"),
        "{}",
        err.message()
    );
}
