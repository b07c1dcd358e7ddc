//! Limits and overload protection against the real binary: a flood from one token is refused
//! with 429 + Retry-After on every adapter it uses while another token's requests pass; the
//! same per source address; writes shed with 503 + Retry-After under a deep writer queue while
//! heartbeats keep every instance alive; the caps on requests in flight and on connections;
//! and a counter for every refusal.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sextant_proto::v1 as pb;

fn api_with(server: &Server, secret: &str) -> Api {
    server.api().with_bearer(secret)
}

/// A token with read and write on namespace `lim`: (id, secret).
async fn token(admin: &Api, name: &str) -> (String, String) {
    admin
        .put(
            &format!("/v1/acl/policies/{name}"),
            &json!({"rules": [{"namespace": "lim", "rights": ["read", "write"]}]}),
        )
        .await
        .ok();
    let r = admin
        .post("/v1/acl/tokens", &json!({"policies": [name]}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["secret"].as_str().unwrap().to_string(),
    )
}

fn retry_after(headers: &HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After in {headers:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn refusals(api: &Api, reason: &str, protocol: &str) -> f64 {
    metric(
        api,
        &format!("sextant_refusals_total{{reason=\"{reason}\",protocol=\"{protocol}\"}}"),
    )
    .await
}

#[tokio::test]
async fn a_flood_from_one_token_is_limited_while_another_token_passes() {
    let server = Server::start_with_args(&[
        "--auth",
        "on",
        "--rate-per-token",
        "20",
        "--rate-per-source",
        "0",
    ]);
    let anon = server.api();
    let boot = anon.post("/v1/acl/bootstrap", &json!({})).await;
    assert_eq!(boot.status, 201, "{}", boot.text);
    let admin = api_with(&server, boot.body["secret"].as_str().unwrap());
    let (flood_id, flood_secret) = token(&admin, "flood").await;
    let (_, calm_secret) = token(&admin, "calm").await;
    let flood = api_with(&server, &flood_secret);
    let calm = api_with(&server, &calm_secret);

    // 60 reads in a burst: the bucket holds one second's worth (20), so most are refused.
    let path = service_path("lim", "svc");
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..60 {
        let r = flood.get(&path).await;
        match r.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                let msg = r.assert_error(429, &["too many requests", &flood_id]);
                assert!(msg.contains("20 per second"), "{msg}");
                let wait = retry_after(&r.headers);
                assert!((1..=2).contains(&wait), "Retry-After {wait}");
                assert_eq!(r.body["error"]["code"], "rate_limited");
            }
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert!((20..40).contains(&ok), "{ok} passed");
    assert!(limited >= 20, "only {limited} limited");

    // Meanwhile another token is not affected, also for writes.
    for i in 0..15 {
        let r = calm
            .put(
                &instance_path("lim", "svc", &format!("c{i}")),
                &inst("10.0.0.1", 80),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }

    // The same bucket on every protocol: flooded over gRPC and Consul, the token is refused
    // there too (each burst empties what the bucket refilled meanwhile).
    let mut grpc = server.grpc_client().await;
    let mut grpc_refusal = None;
    for _ in 0..60 {
        let mut req = tonic::Request::new(pb::GetServiceRequest {
            service: Some(svc_ref("lim", "svc")),
            healthy_only: false,
            ..Default::default()
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {flood_secret}").parse().unwrap(),
        );
        if let Err(e) = grpc.get_service(req).await {
            grpc_refusal = Some(e);
            break;
        }
    }
    let e = grpc_refusal.expect("gRPC never limited the flooding token");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.metadata().get("retry-after").is_some(), "{e:?}");
    let consul = format!("http://{}/v1/catalog/services", server.consul.unwrap());
    let mut consul_limited = false;
    for _ in 0..60 {
        let r = http_client()
            .get(&consul)
            .header("X-Consul-Token", &flood_secret)
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some());
            consul_limited = true;
            break;
        }
        // The catalog needs `read` on every namespace: refused as forbidden, unless limited
        // first (the limit is checked before the rights).
        assert_eq!(r.status(), 403);
    }
    assert!(consul_limited, "Consul never limited the flooding token");

    // Every refusal is counted, by reason and protocol.
    let counted = refusals(&admin, "rate_per_token", "http").await;
    assert!(counted >= limited as f64, "{counted} < {limited}");
    assert!(refusals(&admin, "rate_per_token", "grpc").await >= 1.0);
    assert!(refusals(&admin, "rate_per_token", "consul").await >= 1.0);

    // The bucket refills: a second later the token works again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(flood.get(&path).await.status, 200);
}

#[tokio::test]
async fn a_flood_from_one_address_is_limited_while_another_address_passes() {
    let server = Server::start_with_args(&["--rate-per-source", "20"]);
    let from = |ip: [u8; 4]| Api {
        base: server.base(),
        client: reqwest::Client::builder()
            .no_proxy()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap(),
    };
    let a = from([127, 0, 0, 1]);
    let b = from([127, 0, 0, 2]);
    let path = service_path("lim", "svc");
    let mut limited = 0;
    for _ in 0..60 {
        let r = a.get(&path).await;
        if r.status == 429 {
            limited += 1;
            r.assert_error(429, &["127.0.0.1", "20 per second"]);
            assert!(retry_after(&r.headers) >= 1);
        }
    }
    assert!(limited >= 20, "only {limited} limited");
    for _ in 0..15 {
        assert_eq!(b.get(&path).await.status, 200);
    }
    // Nacos 1.x refuses the flooding address too, with its own error body.
    let nacos = format!(
        "http://{}/nacos/v1/ns/instance/list?serviceName=svc",
        server.nacos.unwrap().0
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 1]))
        .build()
        .unwrap();
    let mut nacos_limited = false;
    for _ in 0..40 {
        let r = client.get(&nacos).send().await.unwrap();
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some());
            nacos_limited = true;
            break;
        }
    }
    assert!(nacos_limited, "Nacos did not limit the flooding address");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(refusals(&b, "rate_per_source", "http").await >= limited as f64);
    assert!(refusals(&b, "rate_per_source", "nacos-http").await >= 1.0);
}

// Two worker threads: the heartbeat loop must not queue behind the test's own 64 writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_shed_under_a_deep_queue_while_heartbeats_keep_instances_alive() {
    // A queue of 2 is "deep" for this test: 64 writers at once keep more than that waiting
    // behind every group commit.
    let server = Server::start_with_args(&["--shed-write-queue", "2"]);
    let api = server.api();
    let kept: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    for id in &kept {
        let body = json!({"host": "10.0.0.1", "port": 80, "ttl_seconds": 2});
        // Registered before the flood, one at a time: never shed.
        api.register("lim", "kept", id, &body).await;
    }
    let mut sse = Sse::open(&api, "service=lim/kept", None).await;
    assert_eq!(sse.expect(Duration::from_secs(5)).await.event, "snapshot");
    let beat: Vec<Value> = kept
        .iter()
        .map(|id| json!({"namespace": "lim", "service": "kept", "id": id}))
        .collect();
    let hb = api.post("/v1/heartbeats", &json!(beat)).await;
    assert_eq!(hb.body["renewed"], 20, "before the flood: {}", hb.text);

    let (shed, done, other) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let until = Instant::now() + Duration::from_secs(5);
    // One client (building one reads the system's CA roots, ~40 ms): its pool opens a
    // connection per concurrent writer.
    let flood = Arc::new(server.api());
    let mut writers = Vec::new();
    for w in 0..64 {
        let (api, shed, done, other) = (flood.clone(), shed.clone(), done.clone(), other.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u32;
            // Bounded in time and count.
            while Instant::now() < until && n < 2_000 {
                n += 1;
                let path = instance_path("lim", "flood", &format!("w{w}-{n}"));
                let r = api.put(&path, &inst("10.0.0.2", 80)).await;
                match r.status {
                    200 => done.fetch_add(1, Ordering::Relaxed),
                    503 => {
                        let msg = r.assert_error(503, &["shed_write_queue", "heartbeats"]);
                        assert!(retry_after(&r.headers) >= 1, "{msg}");
                        shed.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Heartbeats through the flood: every one renews all 20, well within their 2 s TTL.
    let (mut beats, mut slowest) = (0, Duration::ZERO);
    while Instant::now() < until + Duration::from_secs(1) {
        let sent = Instant::now();
        let hb = api.post("/v1/heartbeats", &json!(beat)).await;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(
            hb.status, 200,
            "heartbeat refused during the flood: {}",
            hb.text
        );
        if hb.body["renewed"] != 20 {
            let svc = api.service("lim", "kept").await;
            let log: String = server
                .log()
                .lines()
                .filter(|l| !l.contains("request failed"))
                .collect::<Vec<_>>()
                .join("\n");
            let f = sse.expect(Duration::from_secs(1)).await;
            eprintln!("first event: {f:?}");
            panic!(
                "after {beats} heartbeats (slowest {slowest:?}): {}\nservice: {svc}\nlog: {}",
                hb.text,
                &log[log.len().saturating_sub(3000)..]
            );
        }
        beats += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    let (shed, done, other) = (
        shed.load(Ordering::Relaxed),
        done.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    eprintln!(
        "flood: {done} written, {shed} shed, {other} other; {beats} heartbeats, slowest {slowest:?}"
    );
    assert_eq!(other, 0);
    assert!(shed > 0, "no write was shed ({done} written)");
    assert!(done > 0, "every write was shed");
    // No instance expired: the watch saw no change at all, and all 20 are there.
    sse.expect_quiet(Duration::from_millis(300)).await;
    let svc = api.service("lim", "kept").await;
    assert_eq!(ids(&svc).len(), 20, "{svc}");
    assert_eq!(
        refusals(&api, "shed_write", "http").await,
        shed as f64,
        "every shed write counted"
    );
}

#[tokio::test]
async fn requests_in_flight_and_connections_are_capped() {
    let server = Server::start_with_args(&["--max-requests", "2"]);
    let api = server.api();
    let r = api.get(&service_path("lim", "svc")).await;
    let rev = r.revision_header();
    // Two blocking queries hold both places.
    let wait = format!("{}?index={rev}&wait=2s", service_path("lim", "svc"));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let api = server.api();
            let wait = wait.clone();
            tokio::spawn(async move { api.get(&wait).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = api.get(&service_path("lim", "other")).await;
    r.assert_error(503, &["max_requests"]);
    assert_eq!(retry_after(&r.headers), 1);
    // The blocking queries time out; their places come back.
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(api.get(&service_path("lim", "other")).await.status, 200);
    assert!(refusals(&api, "max_requests", "http").await >= 1.0);

    // Connections: at the cap, a new one is closed at once; one closing frees a place.
    let server = Server::start_with_args(&["--max-connections", "3"]);
    let addr: SocketAddr = server.http;
    let open: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(closed_at_once(addr), "a 4th connection was kept");
    drop(open);
    std::thread::sleep(Duration::from_millis(300));
    let api = server.api();
    assert_eq!(api.get("/healthz").await.status, 200);
    assert!(refusals(&api, "max_connections", "http").await >= 1.0);
}

/// Connects, sends a request and tells whether the server closed the connection without an
/// answer.
fn closed_at_once(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}
