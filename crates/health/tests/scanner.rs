//! The scanner against real listeners on loopback: TCP servers that accept, refuse or never
//! answer, HTTP servers answering 200/500/slowly, a real gRPC health server (tonic-health).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sextant_core::model::*;
use sextant_core::{CoreConfig, CoreMetrics, MemStore, Registry};
use sextant_health::{HealthMetrics, Scanner, ScannerConfig, SuspectOutcome};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

async fn registry() -> Registry {
    Registry::open(
        Arc::new(MemStore::new()),
        CoreConfig::default(),
        CoreMetrics::default(),
    )
    .await
    .unwrap()
}

fn svc(name: &str) -> ServiceKey {
    ServiceKey::new("ns", name).unwrap()
}

fn check(kind: CheckKind) -> HealthCheck {
    HealthCheck {
        kind,
        interval_ms: 200,
        timeout_ms: 150,
        rise: 1,
        fall: 1,
        jitter_percent: 0,
        ..Default::default()
    }
}

async fn add(r: &Registry, service: &str, id: &str, addr: SocketAddr) {
    r.register(Registration {
        service: svc(service),
        spec: InstanceSpec {
            id: id.into(),
            host: addr.ip().to_string().into(),
            port: addr.port(),
            protocol: "tcp".into(),
            version: Default::default(),
            location: Location::default(),
            cell: Default::default(),
            lane: Default::default(),
            metadata: Default::default(),
        },
        status: None,
        ttl_seconds: 0,
    })
    .await
    .unwrap();
}

async fn set_check(r: &Registry, service: &str, check: HealthCheck) {
    r.configure(
        svc(service),
        ServiceConfig {
            check,
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

fn health(r: &Registry, service: &str, id: &str) -> Health {
    r.get(&svc(service), false)
        .instances
        .iter()
        .find(|i| i.spec.id == id)
        .map(|i| i.status.health)
        .unwrap_or(Health::Unknown)
}

async fn eventually(r: &Registry, service: &str, id: &str, want: Health, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let h = health(r, service, id);
        if h == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service}/{id} is {h:?}, expected {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start(r: &Registry) -> (Scanner, HealthMetrics) {
    let m = HealthMetrics::default();
    let s = Scanner::start(
        r.clone(),
        ScannerConfig {
            reconcile_interval: Duration::from_millis(100),
            ..Default::default()
        },
        m.clone(),
    );
    (s, m)
}

/// A TCP listener that accepts and closes every connection.
async fn accepting() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    addr
}

/// A port nothing listens on (refuses).
async fn refusing() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A listener whose accept queue is full and never drained: further connects get no answer
/// (Linux drops the SYN), so a probe really times out.
async fn blackhole() -> (SocketAddr, Vec<TcpStream>, tokio::net::TcpListener) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fill.push(s),
            _ => break,
        }
    }
    (addr, fill, l)
}

#[tokio::test]
async fn tcp_accept_refuse_and_blackhole() {
    let r = registry().await;
    let (ok, bad) = (accepting().await, refusing().await);
    let (hole, _fill, _l) = blackhole().await;
    // Confirm the blackhole really does not answer.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(hole))
            .await
            .is_err(),
        "the blackhole answered"
    );
    add(&r, "a", "ok", ok).await;
    add(&r, "a", "bad", bad).await;
    add(&r, "a", "hole", hole).await;
    add(&r, "a", "ok2", accepting().await).await;
    add(&r, "a", "ok3", accepting().await).await;
    set_check(&r, "a", check(CheckKind::Tcp)).await;
    let (_s, m) = start(&r);
    eventually(&r, "a", "ok", Health::Healthy, Duration::from_secs(3)).await;
    eventually(&r, "a", "bad", Health::Unhealthy, Duration::from_secs(3)).await;
    eventually(&r, "a", "hole", Health::Unhealthy, Duration::from_secs(3)).await;
    let timeouts = m
        .probes
        .get_or_create(&sextant_health_labels("tcp", "timeout"))
        .get();
    assert!(timeouts > 0, "the blackhole must time out, not refuse");
}

fn sextant_health_labels(kind: &'static str, result: &'static str) -> sextant_health::ProbeLabels {
    sextant_health::ProbeLabels { kind, result }
}

/// An HTTP server whose `/health` answers with the status in `code` (0 = answer after 2 s).
async fn http_server(code: Arc<AtomicU16>) -> SocketAddr {
    use axum::http::StatusCode;
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let code = code.clone();
            async move {
                let c = code.load(Ordering::SeqCst);
                if c == 0 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return (StatusCode::OK, "late".to_string());
                }
                (StatusCode::from_u16(c).unwrap(), "x".repeat(10_000))
            }
        }),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

#[tokio::test]
async fn http_status_ranges_slow_bodies_and_flapping() {
    let r = registry().await;
    let code = Arc::new(AtomicU16::new(200));
    let addr = http_server(code.clone()).await;
    add(&r, "h", "x", addr).await;
    set_check(
        &r,
        "h",
        HealthCheck {
            rise: 2,
            fall: 2,
            ..check(CheckKind::Http)
        },
    )
    .await;
    let (_s, _m) = start(&r);
    eventually(&r, "h", "x", Health::Healthy, Duration::from_secs(3)).await;
    code.store(500, Ordering::SeqCst);
    eventually(&r, "h", "x", Health::Unhealthy, Duration::from_secs(3)).await;
    code.store(204, Ordering::SeqCst);
    eventually(&r, "h", "x", Health::Healthy, Duration::from_secs(3)).await;
    // 429 Too Many Requests: alive but overloaded, a warning that still serves (Consul's rule).
    code.store(429, Ordering::SeqCst);
    eventually(&r, "h", "x", Health::Warning, Duration::from_secs(3)).await;
    assert!(r.instance(&svc("h"), "x").unwrap().is_serving());
    code.store(200, Ordering::SeqCst);
    eventually(&r, "h", "x", Health::Healthy, Duration::from_secs(3)).await;
    // Slow: answers after the timeout.
    code.store(0, Ordering::SeqCst);
    eventually(&r, "h", "x", Health::Unhealthy, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn one_failure_does_not_flip_with_fall_three() {
    let r = registry().await;
    let code = Arc::new(AtomicU16::new(200));
    let addr = http_server(code.clone()).await;
    add(&r, "f", "x", addr).await;
    set_check(
        &r,
        "f",
        HealthCheck {
            rise: 1,
            fall: 3,
            ..check(CheckKind::Http)
        },
    )
    .await;
    let (_s, m) = start(&r);
    eventually(&r, "f", "x", Health::Healthy, Duration::from_secs(3)).await;
    // Flap: fail for about one probe, then recover.
    code.store(503, Ordering::SeqCst);
    let before = m
        .probes
        .get_or_create(&sextant_health_labels("http", "unhealthy"))
        .get();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while m
        .probes
        .get_or_create(&sextant_health_labels("http", "unhealthy"))
        .get()
        == before
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    code.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        health(&r, "f", "x"),
        Health::Healthy,
        "one failure must not flip with fall=3"
    );
}

#[tokio::test]
async fn grpc_health_server() {
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
    });
    let r = registry().await;
    add(&r, "g", "x", addr).await;
    set_check(
        &r,
        "g",
        HealthCheck {
            grpc_service: "orders".into(),
            ..check(CheckKind::Grpc)
        },
    )
    .await;
    let (_s, _m) = start(&r);
    eventually(&r, "g", "x", Health::Healthy, Duration::from_secs(3)).await;
    reporter
        .set_service_status("orders", ServingStatus::NotServing)
        .await;
    eventually(&r, "g", "x", Health::Unhealthy, Duration::from_secs(3)).await;
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    eventually(&r, "g", "x", Health::Healthy, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn suspect_report_probes_within_a_second() {
    let r = registry().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    add(&r, "s", "x", addr).await;
    // Probed once a minute: only a suspect report can make it notice quickly.
    set_check(
        &r,
        "s",
        HealthCheck {
            interval_ms: 60_000,
            timeout_ms: 200,
            ..check(CheckKind::Tcp)
        },
    )
    .await;
    let (scanner, _m) = start(&r);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    // Wait until the scanner knows the target (reconciles every 100 ms here).
    loop {
        let o = scanner.suspect(svc("s"), "x", "probe-test").await;
        if o != SuspectOutcome::NotProbed {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(&r, "s", "x", Health::Healthy, Duration::from_secs(1)).await;
    // The listener goes away; a report gets it marked unhealthy within a second.
    accept.abort();
    let _ = accept.await;
    // Wait until connecting is refused, not for a guessed while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reported = tokio::time::Instant::now();
    assert_eq!(
        scanner.suspect(svc("s"), "x", "probe-test").await,
        SuspectOutcome::Scheduled
    );
    eventually(&r, "s", "x", Health::Unhealthy, Duration::from_secs(1)).await;
    assert!(reported.elapsed() < Duration::from_secs(1));
    // Unknown instances are not probed; floods are rate limited.
    assert_eq!(
        scanner.suspect(svc("s"), "nope", "probe-test").await,
        SuspectOutcome::NotProbed
    );
    let mut limited = false;
    for _ in 0..200 {
        if scanner.suspect(svc("s"), "x", "flood").await == SuspectOutcome::RateLimited {
            limited = true;
            break;
        }
    }
    assert!(limited, "a flooding reporter must be rate limited");
}

#[tokio::test]
async fn mass_failure_keeps_last_statuses() {
    let r = registry().await;
    let mut listeners = Vec::new();
    for i in 0..6 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        add(&r, "m", &format!("i{i}"), l.local_addr().unwrap()).await;
        listeners.push(tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        }));
    }
    set_check(&r, "m", check(CheckKind::Tcp)).await;
    let (_s, m) = start(&r);
    for i in 0..6 {
        eventually(
            &r,
            "m",
            &format!("i{i}"),
            Health::Healthy,
            Duration::from_secs(3),
        )
        .await;
    }
    // One of six fails: that is believable, it flips.
    listeners[0].abort();
    eventually(&r, "m", "i0", Health::Unhealthy, Duration::from_secs(3)).await;
    // Then the rest fail at once: the scanner's network, probably. Statuses are kept.
    for l in &listeners[1..] {
        l.abort();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while m.protection_trips.get() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "protection never tripped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Flips stop at the configured fraction (0.5): never the whole service.
    let healthy = (0..6)
        .filter(|i| health(&r, "m", &format!("i{i}")) == Health::Healthy)
        .count();
    assert!(healthy >= 3, "only {healthy} of 6 left healthy");
    assert_eq!(m.protected_services.get(), 1);
}
