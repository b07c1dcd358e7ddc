//! The native gRPC API (`sextant.v1.Registry`) of the real binary: writes, reads, batch
//! registration, heartbeats, discovery, listings, blocking reads and error codes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sextant_proto::v1 as pb;
use tonic::Code;

fn ids(s: &pb::Service) -> Vec<String> {
    s.instances
        .iter()
        .map(|i| i.spec.as_ref().unwrap().id.clone())
        .collect()
}

fn get(ns: &str, svc: &str) -> pb::GetServiceRequest {
    pb::GetServiceRequest {
        service: Some(svc_ref(ns, svc)),
        ..Default::default()
    }
}

#[tokio::test]
async fn register_get_update_status_deregister() {
    let server = Server::start();
    let mut c = server.grpc_client().await;

    let mut req = grpc_reg("prod", "pay", "", "10.0.0.1", 7000);
    {
        let spec = req.spec.as_mut().unwrap();
        spec.version = "2.0".into();
        spec.location = Some(pb::Location {
            region: "eu".into(),
            zone: "eu-1".into(),
            idc: "".into(),
        });
        spec.metadata.insert("k".into(), "v".into());
    }
    let r1 = c.register(req).await.unwrap().into_inner().revision;
    assert!(r1 > 0);

    let s = c
        .get_service(get("prod", "pay"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.revision, r1);
    assert_eq!(s.service, Some(svc_ref("prod", "pay")));
    assert!(!s.protected);
    assert_eq!(ids(&s), ["10.0.0.1:7000"], "the id defaults to host:port");
    let i = &s.instances[0];
    let spec = i.spec.as_ref().unwrap();
    assert_eq!(spec.protocol, "http");
    assert_eq!(spec.version, "2.0");
    assert_eq!(spec.port, 7000);
    assert_eq!(spec.location.as_ref().unwrap().zone, "eu-1");
    assert_eq!(spec.metadata.get("k").map(String::as_str), Some("v"));
    assert_eq!(
        i.status,
        Some(pb::InstanceStatus {
            health: pb::Health::Unknown as i32,
            enabled: true,
            weight: 100,
            ..Default::default()
        })
    );
    assert_eq!((i.spec_revision, i.status_revision), (r1, r1));

    // The same instance is visible over HTTP.
    let http = server.api().service("prod", "pay").await;
    assert_eq!(http["revision"], r1);
    assert_eq!(http["instances"][0]["id"], "10.0.0.1:7000");

    let r2 = c
        .update_status(pb::UpdateStatusRequest {
            service: Some(svc_ref("prod", "pay")),
            id: "10.0.0.1:7000".into(),
            health: Some(pb::Health::Unhealthy as i32),
            enabled: None,
            weight: Some(3),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert!(r2 > r1);
    let s = c
        .get_service(get("prod", "pay"))
        .await
        .unwrap()
        .into_inner();
    let i = &s.instances[0];
    assert_eq!(
        i.spec_revision, r1,
        "status updates leave the spec revision"
    );
    assert_eq!(i.status_revision, r2);
    assert_eq!(
        i.status,
        Some(pb::InstanceStatus {
            health: pb::Health::Unhealthy as i32,
            enabled: true,
            weight: 3,
            ..Default::default()
        })
    );
    let healthy = c
        .get_service(pb::GetServiceRequest {
            healthy_only: true,
            ..get("prod", "pay")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(healthy.instances.is_empty());

    let r3 = c
        .deregister(pb::DeregisterRequest {
            service: Some(svc_ref("prod", "pay")),
            id: "10.0.0.1:7000".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert!(r3 > r2);
    let s = c
        .get_service(get("prod", "pay"))
        .await
        .unwrap()
        .into_inner();
    assert!(s.instances.is_empty());
    assert_eq!(s.revision, r3);
}

#[tokio::test]
async fn batch_register_one_hundred() {
    let server = Server::start();
    let mut c = server.grpc_client().await;
    let before = c
        .register(grpc_reg("batch", "svc", "first", "10.0.0.1", 1))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let instances: Vec<_> = (0..100u32)
        .map(|n| grpc_reg("batch", "svc", &format!("i-{n:03}"), "10.0.1.1", 1000 + n))
        .collect();
    let revs = c
        .batch_register(pb::BatchRegisterRequest { instances })
        .await
        .unwrap()
        .into_inner()
        .revisions;
    assert_eq!(revs.len(), 100);
    assert!(revs[0] > before);
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "revisions not strictly increasing: {revs:?}"
    );
    let s = c
        .get_service(get("batch", "svc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.instances.len(), 101);
    assert_eq!(s.revision, *revs.last().unwrap());
    for (n, rev) in revs.iter().enumerate() {
        let id = format!("i-{n:03}");
        let i = s
            .instances
            .iter()
            .find(|i| i.spec.as_ref().unwrap().id == id)
            .unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(i.spec_revision, *rev, "{id}");
        assert_eq!(i.spec.as_ref().unwrap().port, 1000 + n as u32);
    }

    // One bad registration refuses the whole batch and names it.
    let mut instances: Vec<_> = (0..5u32)
        .map(|n| grpc_reg("batch", "svc", &format!("j-{n}"), "10.0.2.1", 1 + n))
        .collect();
    instances[3].spec.as_mut().unwrap().port = 0;
    let e = c
        .batch_register(pb::BatchRegisterRequest { instances })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("instances[3]"), "{e:?}");
    assert!(e.message().contains("port"), "{e:?}");
    let s = c
        .get_service(get("batch", "svc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.instances.len(), 101, "a refused batch must write nothing");
}

#[tokio::test]
async fn heartbeat_reports_unknown() {
    let server = Server::start();
    let mut c = server.grpc_client().await;
    let mut eph = grpc_reg("hb", "svc", "eph", "10.0.0.1", 1);
    eph.ttl_seconds = 30;
    c.register(eph).await.unwrap();
    c.register(grpc_reg("hb", "svc", "per", "10.0.0.1", 2))
        .await
        .unwrap();
    let r = |svc: &str, id: &str| pb::InstanceRef {
        service: Some(svc_ref("hb", svc)),
        id: id.into(),
    };
    let resp = c
        .heartbeat(pb::HeartbeatRequest {
            instances: vec![
                r("svc", "eph"),
                r("svc", "per"),
                r("svc", "ghost"),
                r("x", "eph"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.renewed, 2);
    assert_eq!(resp.unknown, vec![r("svc", "ghost"), r("x", "eph")]);

    let e = c
        .heartbeat(pb::HeartbeatRequest {
            instances: vec![pb::InstanceRef {
                service: None,
                id: "x".into(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn discover_and_listings() {
    let server = Server::start();
    let mut c = server.grpc_client().await;
    c.register(grpc_reg("alpha", "a", "1", "10.0.0.1", 1))
        .await
        .unwrap();
    let ra = c
        .register(grpc_reg("alpha", "a", "2", "10.0.0.2", 1))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let mut sick = grpc_reg("alpha", "b", "1", "10.0.0.3", 1);
    sick.status = Some(pb::InstanceStatus {
        health: pb::Health::Unhealthy as i32,
        enabled: true,
        weight: 100,
        ..Default::default()
    });
    let rb = c.register(sick).await.unwrap().into_inner().revision;
    c.register(grpc_reg("beta", "c", "1", "10.0.0.4", 1))
        .await
        .unwrap();

    let d = c
        .discover(pb::DiscoverRequest {
            services: vec![
                svc_ref("alpha", "a"),
                svc_ref("alpha", "b"),
                svc_ref("beta", "c"),
                svc_ref("beta", "none"),
            ],
            healthy_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = d
        .services
        .iter()
        .map(|s| (s.service.clone().unwrap().service, s.instances.len()))
        .collect();
    assert_eq!(
        got,
        [
            ("a".to_string(), 2),
            ("b".to_string(), 1),
            ("c".to_string(), 1),
            ("none".to_string(), 0)
        ]
    );
    assert_eq!(d.services[0].revision, ra);
    assert_eq!(d.services[1].revision, rb);
    let d = c
        .discover(pb::DiscoverRequest {
            services: vec![svc_ref("alpha", "a"), svc_ref("alpha", "b")],
            healthy_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.services[0].instances.len(), 2);
    assert_eq!(d.services[1].instances.len(), 0);

    let ns = c
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ns.namespaces,
        vec![
            pb::NamespaceSummary {
                namespace: "alpha".into(),
                services: 2,
                instances: 3
            },
            pb::NamespaceSummary {
                namespace: "beta".into(),
                services: 1,
                instances: 1
            },
        ]
    );
    let svcs = c
        .list_services(pb::ListServicesRequest {
            namespace: "alpha".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        svcs.services,
        vec![
            pb::ServiceSummary {
                service: "a".into(),
                revision: ra,
                instances: 2,
                serving: 2
            },
            pb::ServiceSummary {
                service: "b".into(),
                revision: rb,
                instances: 1,
                serving: 0
            },
        ]
    );

    // Protection over gRPC: 0 of 1 serving trips a 0.5 threshold.
    let rc = c
        .configure_service(pb::ConfigureServiceRequest {
            service: Some(svc_ref("alpha", "b")),
            protect_threshold: Some(0.5),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert!(rc > rb);
    let s = c
        .get_service(pb::GetServiceRequest {
            healthy_only: true,
            ..get("alpha", "b")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.protected);
    assert_eq!(s.instances.len(), 1);
    assert_eq!(s.revision, rc);
}

#[tokio::test]
async fn invalid_arguments_and_not_found() {
    let server = Server::start();
    let mut c = server.grpc_client().await;

    let check =
        |r: Result<tonic::Response<pb::WriteResponse>, tonic::Status>, code: Code, needle: &str| {
            let e = r.expect_err("expected an error");
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().to_lowercase().contains(needle),
                "{e:?} does not mention {needle}"
            );
        };
    check(
        c.register(grpc_reg("bad ns", "svc", "i", "10.0.0.1", 1))
            .await,
        Code::InvalidArgument,
        "namespace",
    );
    check(
        c.register(grpc_reg("ns", "bad/svc", "i", "10.0.0.1", 1))
            .await,
        Code::InvalidArgument,
        "service",
    );
    check(
        c.register(grpc_reg("ns", "svc", "bad id", "10.0.0.1", 1))
            .await,
        Code::InvalidArgument,
        "id",
    );
    check(
        c.register(grpc_reg("ns", "svc", "i", "10.0.0.1", 0)).await,
        Code::InvalidArgument,
        "port",
    );
    check(
        c.register(grpc_reg("ns", "svc", "i", "10.0.0.1", 70000))
            .await,
        Code::InvalidArgument,
        "port",
    );
    check(
        c.register(grpc_reg("ns", "svc", "i", "not a host", 80))
            .await,
        Code::InvalidArgument,
        "host",
    );
    let mut no_service = grpc_reg("ns", "svc", "i", "10.0.0.1", 1);
    no_service.service = None;
    check(
        c.register(no_service).await,
        Code::InvalidArgument,
        "service",
    );
    let mut no_spec = grpc_reg("ns", "svc", "i", "10.0.0.1", 1);
    no_spec.spec = None;
    check(c.register(no_spec).await, Code::InvalidArgument, "spec");
    let mut heavy = grpc_reg("ns", "svc", "i", "10.0.0.1", 1);
    heavy.status = Some(pb::InstanceStatus {
        health: 0,
        enabled: true,
        weight: 10001,
        ..Default::default()
    });
    check(c.register(heavy).await, Code::InvalidArgument, "weight");
    let mut odd_health = grpc_reg("ns", "svc", "i", "10.0.0.1", 1);
    odd_health.status = Some(pb::InstanceStatus {
        health: 42,
        enabled: true,
        weight: 1,
        ..Default::default()
    });
    check(
        c.register(odd_health).await,
        Code::InvalidArgument,
        "health",
    );

    check(
        c.deregister(pb::DeregisterRequest {
            service: Some(svc_ref("ns", "svc")),
            id: "missing".into(),
        })
        .await,
        Code::NotFound,
        "missing",
    );
    check(
        c.deregister(pb::DeregisterRequest {
            service: None,
            id: "missing".into(),
        })
        .await,
        Code::InvalidArgument,
        "service",
    );
    check(
        c.update_status(pb::UpdateStatusRequest {
            service: Some(svc_ref("ns", "svc")),
            id: "missing".into(),
            health: Some(pb::Health::Healthy as i32),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "missing",
    );
    c.register(grpc_reg("ns", "svc", "present", "10.0.0.1", 1))
        .await
        .unwrap();
    check(
        c.update_status(pb::UpdateStatusRequest {
            service: Some(svc_ref("ns", "svc")),
            id: "present".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "status",
    );
    check(
        c.update_status(pb::UpdateStatusRequest {
            service: Some(svc_ref("ns", "svc")),
            id: "present".into(),
            weight: Some(10001),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "weight",
    );
    check(
        c.configure_service(pb::ConfigureServiceRequest {
            service: Some(svc_ref("ns", "svc")),
            protect_threshold: Some(2.0),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "protect_threshold",
    );

    let e = c
        .get_service(pb::GetServiceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_services(pb::ListServicesRequest {
            namespace: "bad ns".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .discover(pb::DiscoverRequest {
            services: vec![svc_ref("ns", "")],
            healthy_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .watch(pb::WatchRequest {
            services: vec![],
            since: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Only the one valid instance was written.
    let s = c.get_service(get("ns", "svc")).await.unwrap().into_inner();
    assert_eq!(ids(&s), ["present"]);

    // Metrics label each failed call with its class's status (the core's one table), not
    // 400 for every error: the unknown id's deregistration counts as 404.
    let metrics = server.api().get("/metrics").await.text;
    assert!(
        metrics.lines().any(|l| l.contains("api=\"grpc\"")
            && l.contains("route=\"Deregister\"")
            && l.contains("status=\"404\"")),
        "no gRPC Deregister counted as 404:\n{metrics}"
    );
}

#[tokio::test]
async fn blocking_get_service_wakes_on_change() {
    let server = Server::start();
    let mut c = server.grpc_client().await;
    let r1 = c
        .register(grpc_reg("bq", "svc", "a", "10.0.0.1", 1))
        .await
        .unwrap()
        .into_inner()
        .revision;

    let mut writer_client = c.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer_client
            .register(grpc_reg("bq", "svc", "b", "10.0.0.2", 1))
            .await
            .unwrap()
            .into_inner()
            .revision
    });
    let started = Instant::now();
    let s = c
        .get_service(pb::GetServiceRequest {
            wait_index: r1,
            wait_ms: 10_000,
            ..get("bq", "svc")
        })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    let r2 = bounded("the writer", Duration::from_secs(10), writer)
        .await
        .unwrap();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(took >= Duration::from_millis(200), "took {took:?}");
    assert_eq!(s.revision, r2);
    assert_eq!(ids(&s), ["a", "b"]);

    // No change: the answer comes after wait_ms.
    let started = Instant::now();
    let s = c
        .get_service(pb::GetServiceRequest {
            wait_index: r2,
            wait_ms: 1000,
            ..get("bq", "svc")
        })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    assert_eq!(s.revision, r2);
}
