//! Bad input over HTTP: every refusal is a 4xx JSON error `{"error":{"code","message"}}` whose
//! message names what was wrong, never a 5xx, and the server keeps working afterwards.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;

const INST: &str = "/v1/namespaces/ns/services/svc/instances/i-1";

/// Asserts the server still answers and has counted no 5xx.
async fn assert_healthy(api: &Api) {
    let r = api.get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let metrics = api.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text.contains("status=\"4"),
        "the 4xx answers are not in the metrics:\n{}",
        metrics.text
    );
    for line in metrics.text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("status=\"5"),
            "a request was answered with 5xx: {line}"
        );
    }
}

#[tokio::test]
async fn bad_names_in_paths() {
    let server = Server::start();
    let api = server.api();
    let body = inst("10.0.0.1", 80);
    let long = "x".repeat(129);
    let cases: Vec<(String, &str)> = vec![
        (
            "/v1/namespaces/bad$ns/services/svc/instances/i".into(),
            "namespace",
        ),
        (
            "/v1/namespaces/bad%20ns/services/svc/instances/i".into(),
            "namespace",
        ),
        (
            format!("/v1/namespaces/{long}/services/svc/instances/i"),
            "namespace",
        ),
        (
            "/v1/namespaces/ns/services/sv$c/instances/i".into(),
            "service",
        ),
        (
            "/v1/namespaces/ns/services/s%2Fv/instances/i".into(),
            "service",
        ),
        (
            format!("/v1/namespaces/ns/services/{long}/instances/i"),
            "service",
        ),
        (
            "/v1/namespaces/ns/services/svc/instances/bad%20id".into(),
            "id",
        ),
        ("/v1/namespaces/ns/services/svc/instances/b*d".into(), "id"),
        (
            format!("/v1/namespaces/ns/services/svc/instances/{long}"),
            "id",
        ),
    ];
    for (path, field) in &cases {
        api.put(path, &body).await.assert_error(400, &[field]);
    }
    // Also on reads, deletes, status patches, listings and POST.
    api.get("/v1/namespaces/bad$ns/services/svc")
        .await
        .assert_error(400, &["namespace"]);
    api.get("/v1/namespaces/ns/services/bad$svc")
        .await
        .assert_error(400, &["service"]);
    api.get("/v1/namespaces/bad$ns/services")
        .await
        .assert_error(400, &["namespace"]);
    api.delete("/v1/namespaces/ns/services/svc/instances/bad$id")
        .await
        .assert_error(400, &["id"]);
    api.patch(
        "/v1/namespaces/ns/services/svc/instances/bad$id/status",
        &json!({"health": "healthy"}),
    )
    .await
    .assert_error(400, &["id"]);
    api.post("/v1/namespaces/ns/services/bad$svc/instances", &body)
        .await
        .assert_error(400, &["service"]);
    api.post(
        "/v1/namespaces/ns/services/svc/instances",
        &json!({"id": "bad id", "host": "10.0.0.1", "port": 80}),
    )
    .await
    .assert_error(400, &["id"]);
    api.post(
        "/v1/heartbeats",
        &json!([{"namespace": "bad$ns", "service": "svc", "id": "i"}]),
    )
    .await
    .assert_error(400, &["namespace"]);
    api.post(
        "/v1/discover",
        &json!({"services": [{"namespace": "ns", "service": "bad$svc"}]}),
    )
    .await
    .assert_error(400, &["service"]);
    // Nothing was registered by any of it.
    assert_eq!(
        api.get("/v1/namespaces").await.ok()["namespaces"],
        json!([])
    );
    assert_healthy(&api).await;
}

#[tokio::test]
async fn bad_instance_bodies() {
    let server = Server::start();
    let api = server.api();
    let cases = [
        (json!({"host": "10.0.0.1", "port": 0}), 400, "port"),
        (json!({"host": "10.0.0.1", "port": 70000}), 400, "port"),
        (json!({"host": "10.0.0.1", "port": -1}), 422, "port"),
        (json!({"host": "10.0.0.1", "port": "80"}), 422, "port"),
        (json!({"host": "10.0.0.1"}), 422, "port"),
        (json!({"port": 80}), 422, "host"),
        (json!({"host": "bad host", "port": 80}), 400, "host"),
        (json!({"host": "", "port": 80}), 400, "host"),
        (json!({"host": "-bad.example", "port": 80}), 400, "host"),
        (json!({"host": "a..b", "port": 80}), 400, "host"),
        (
            json!({"host": "10.0.0.1", "port": 80, "colour": "red"}),
            422,
            "colour",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "location": {"planet": "mars"}}),
            422,
            "planet",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "status": {"weight": 10001}}),
            400,
            "weight",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "status": {"health": "sick"}}),
            422,
            "health",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "protocol": "HTTP"}),
            400,
            "protocol",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "ttl_seconds": 100000}),
            400,
            "ttl_seconds",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "metadata": {"bad key": "v"}}),
            400,
            "metadata",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "lane": "no spaces"}),
            400,
            "lane",
        ),
        (
            json!({"host": "10.0.0.1", "port": 80, "id": "other"}),
            400,
            "id",
        ),
        (json!([1, 2]), 422, ""),
    ];
    for (body, status, field) in &cases {
        let r = api.put(INST, body).await;
        let msg = r.assert_error(*status, &[field]);
        if *status == 400 {
            assert_eq!(r.body["error"]["code"], "invalid_argument", "{msg}");
        }
    }
    // Status patches.
    let status_path = format!("{INST}/status");
    api.register("ns", "svc", "i-1", &inst("10.0.0.1", 80))
        .await;
    for (body, status, field) in [
        (json!({"weight": 10001}), 400, "weight"),
        (json!({"health": "sick"}), 422, "health"),
        (json!({"health": 1}), 400, "health"),
        (json!({"enabled": "yes"}), 422, "enabled"),
        (json!({}), 400, "status"),
        (json!({"weight": 5, "colour": "red"}), 422, "colour"),
    ] {
        api.patch(&status_path, &body)
            .await
            .assert_error(status, &[field]);
    }
    // Service settings.
    for (body, status, field) in [
        (json!({"protect_threshold": 1.5}), 400, "protect_threshold"),
        (json!({"protect_threshold": -0.1}), 400, "protect_threshold"),
        (json!({}), 400, "protect_threshold"),
        (
            json!({"check": {"kind": "tcp", "timeout_ms": 9000}}),
            400,
            "check.timeout_ms",
        ),
        (json!({"check": {"kind": "udp"}}), 422, "kind"),
        (
            json!({"protect_threshold": "high"}),
            422,
            "protect_threshold",
        ),
    ] {
        api.put("/v1/namespaces/ns/services/svc", &body)
            .await
            .assert_error(status, &[field]);
    }
    // Heartbeat and discovery bodies.
    api.post(
        "/v1/heartbeats",
        &json!([{"namespace": "ns", "service": "svc"}]),
    )
    .await
    .assert_error(422, &["id"]);
    api.post("/v1/discover", &json!({"services": [], "extra": 1}))
        .await
        .assert_error(422, &["extra"]);
    // Only the valid registration is there, unchanged.
    let svc = api.service("ns", "svc").await;
    assert_eq!(ids(&svc), ["i-1"]);
    assert_eq!(find(&svc, "i-1").unwrap()["status"]["weight"], 100);
    assert_healthy(&api).await;
}

#[tokio::test]
async fn malformed_bodies_content_type_and_size() {
    let server = Server::start();
    let api = server.api();
    let url = api.url(INST);

    // Malformed JSON.
    let r = Api::read(
        api.client
            .put(&url)
            .header("content-type", "application/json")
            .body("{\"host\": \"10.0.0.1\", \"port\": 80"),
        "truncated json",
    )
    .await;
    r.assert_error(400, &[]);
    let r = Api::read(
        api.client
            .put(&url)
            .header("content-type", "application/json")
            .body("not json at all"),
        "garbage",
    )
    .await;
    r.assert_error(400, &[]);
    // Empty body.
    let r = Api::read(
        api.client
            .put(&url)
            .header("content-type", "application/json"),
        "empty",
    )
    .await;
    assert!(r.status >= 400 && r.status < 500, "{}", r.text);
    r.assert_error(r.status, &[]);

    // An explicit type that is not JSON (a missing type or curl's default form type is
    // accepted as JSON: see http_api.rs).
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
    ] {
        let r = Api::read(
            api.client
                .put(&url)
                .header("content-type", ct)
                .body(r#"{"host":"10.0.0.1","port":80}"#),
            ct,
        )
        .await;
        let msg = r.assert_error(415, &["content-type", "application/json"]);
        assert_eq!(r.body["error"]["code"], "unsupported_media_type", "{msg}");
    }
    // A form-typed body that is not JSON is a 400 naming the expected JSON, not a 415.
    let r = Api::read(
        api.client
            .put(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("host=10.0.0.1&port=80"),
        "a real form body",
    )
    .await;
    r.assert_error(400, &["json"]);

    // A body over the 4 MiB default limit, with a length header and streamed (chunked). A raw
    // socket reads the answer while the body is still being written: the server answers
    // before reading it all and closes, which an ordinary client may report as a broken pipe.
    let big = format!(
        r#"{{"host":"10.0.0.1","port":80,"version":"{}"}}"#,
        "v".repeat(5 * 1024 * 1024)
    )
    .into_bytes();
    let big_again = big.clone();
    let items: Vec<_> = (0..90_000)
        .map(|i| json!({"namespace": "ns", "service": "svc", "id": format!("instance-{i:08}")}))
        .collect();
    let heartbeats = serde_json::to_vec(&items).unwrap();
    assert!(heartbeats.len() > 4 * 1024 * 1024);
    let addr = server.http;
    let answers = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for framing in [Framing::ContentLength, Framing::Chunked] {
            out.push(raw_http(
                addr,
                "PUT",
                INST,
                "application/json",
                &big,
                framing,
            ));
            out.push(raw_http(
                addr,
                "POST",
                "/v1/heartbeats",
                "application/json",
                &heartbeats,
                framing,
            ));
        }
        out
    })
    .await
    .unwrap();
    for r in answers {
        let msg = r.assert_error(413, &[]);
        assert_eq!(r.body["error"]["code"], "payload_too_large", "{msg}");
    }
    // An ordinary client writing the whole body before it reads gets the 413 too, every time:
    // the server drains an oversized body (bounded) before it answers.
    for attempt in 0..10 {
        let r = Api::read(
            api.client
                .put(&url)
                .header("content-type", "application/json")
                .body(big_again.clone()),
            "oversized body through reqwest",
        )
        .await;
        let msg = r.assert_error(413, &["max_body_bytes"]);
        assert_eq!(
            r.body["error"]["code"], "payload_too_large",
            "attempt {attempt}: {msg}"
        );
    }
    // Just under the limit is fine (and refused only for what it says).
    let near = format!(
        r#"{{"host":"10.0.0.1","port":80,"metadata":{{}},"version":"v","cell":"{}"}}"#,
        "c".repeat(3 * 1024 * 1024)
    );
    let r = Api::read(
        api.client
            .put(&url)
            .header("content-type", "application/json")
            .body(near),
        "3 MiB body",
    )
    .await;
    r.assert_error(400, &["cell"]);

    assert_eq!(
        api.get("/v1/namespaces").await.ok()["namespaces"],
        json!([])
    );
    assert_healthy(&api).await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods() {
    let server = Server::start();
    let api = server.api();
    for path in [
        "/",
        "/v2/namespaces",
        "/v1/namespaces/ns/services/svc/instances/i/extra",
        "/v1/nothing",
    ] {
        let r = api.get(path).await;
        let msg = r.assert_error(404, &[]);
        assert_eq!(r.body["error"]["code"], "not_found", "{path}: {msg}");
    }
    for (method, path) in [
        (Method::DELETE, "/v1/namespaces"),
        (Method::POST, "/v1/namespaces"),
        (Method::GET, "/v1/heartbeats"),
        (Method::GET, "/v1/discover"),
        (Method::POST, "/v1/watch"),
        (Method::PATCH, "/v1/namespaces/ns/services/svc"),
        (Method::DELETE, "/v1/namespaces/ns/services/svc"),
        (Method::GET, INST),
        (Method::GET, "/v1/namespaces/ns/services/svc/instances"),
        (Method::POST, INST),
        (Method::PUT, "/v1/namespaces/ns/services/svc/instances"),
        (Method::PUT, &format!("{INST}/status")),
    ] {
        let r = api.send(method.clone(), path, None).await;
        let msg = r.assert_error(405, &[]);
        assert_eq!(
            r.body["error"]["code"], "method_not_allowed",
            "{method} {path}: {msg}"
        );
    }
    assert_healthy(&api).await;
}

#[tokio::test]
async fn bad_queries_and_missing_things() {
    let server = Server::start();
    let api = server.api();
    let svc = service_path("ns", "svc");

    // Watch.
    api.get("/v1/watch").await.assert_error(400, &["service"]);
    api.get("/v1/watch?since=3")
        .await
        .assert_error(400, &["service"]);
    api.get("/v1/watch?service=noslash")
        .await
        .assert_error(400, &["service", "namespace/service"]);
    api.get("/v1/watch?service=ns/bad$svc")
        .await
        .assert_error(400, &["service"]);
    api.get("/v1/watch?service=ns/a&since=abc")
        .await
        .assert_error(400, &["since"]);
    api.get("/v1/watch?service=ns/a&since=-1")
        .await
        .assert_error(400, &["since"]);
    api.get("/v1/watch?service=ns/a&colour=red")
        .await
        .assert_error(400, &["colour"]);

    // Blocking query parameters.
    api.get(&format!("{svc}?wait=5s"))
        .await
        .assert_error(400, &["wait", "index"]);
    api.get(&format!("{svc}?index=1&wait=forever"))
        .await
        .assert_error(400, &["wait"]);
    api.get(&format!("{svc}?index=1&wait=-5s"))
        .await
        .assert_error(400, &["wait"]);
    api.get(&format!("{svc}?index=abc"))
        .await
        .assert_error(400, &["index"]);
    api.get(&format!("{svc}?healthy=maybe"))
        .await
        .assert_error(400, &["healthy"]);
    api.get(&format!("{svc}?colour=red"))
        .await
        .assert_error(400, &["colour"]);

    // Missing instances.
    api.delete(INST).await.assert_error(404, &["i-1"]);
    api.patch(&format!("{INST}/status"), &json!({"weight": 1}))
        .await
        .assert_error(404, &["i-1"]);
    api.register("ns", "svc", "i-1", &inst("10.0.0.1", 80))
        .await;
    api.deregister("ns", "svc", "i-1").await;
    api.delete(INST).await.assert_error(404, &["i-1"]);
    assert_healthy(&api).await;
}

/// Sends `GET path` with `headers` extra headers through an ordinary client.
async fn get_with_headers(base: &str, path: &str, headers: &[(String, String)]) -> u16 {
    let mut req = http_client().get(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    match tokio::time::timeout(CALL_TIMEOUT, req.send()).await {
        Ok(Ok(r)) => r.status().as_u16(),
        Ok(Err(e)) => panic!("GET {path} with {} headers failed: {e:?}", headers.len()),
        Err(_) => panic!("GET {path} timed out"),
    }
}

/// A request head over the limit (64 KiB in all, 100 headers by default) gets 431 — an answer
/// the client reads, not a reset connection — on the native and the Nacos HTTP listener,
/// while ordinary requests are served.
#[tokio::test]
async fn oversized_request_headers_get_431() {
    let server = Server::start();
    let (nacos, _) = server.nacos.expect("the Nacos adapter is on");
    let targets = [
        (server.base(), "/healthz"),
        (
            format!("http://{nacos}"),
            "/nacos/v1/ns/instance/list?serviceName=svc",
        ),
    ];
    let big = vec![("x-big".to_string(), "a".repeat(200 * 1024))];
    let many: Vec<_> = (0..200)
        .map(|i| (format!("x-h-{i}"), "v".to_string()))
        .collect();
    let ordinary: Vec<_> = (0..50)
        .map(|i| (format!("x-h-{i}"), "v".repeat(200)))
        .collect();
    for (base, path) in &targets {
        for attempt in 0..5 {
            let s = get_with_headers(base, path, &big).await;
            assert_eq!(s, 431, "{base}{path}: a 200 KiB header, attempt {attempt}");
            let s = get_with_headers(base, path, &many).await;
            assert_eq!(s, 431, "{base}{path}: 200 headers, attempt {attempt}");
        }
        let s = get_with_headers(base, path, &ordinary).await;
        assert_eq!(s, 200, "{base}{path}: 50 headers of 200 bytes");
    }
    // hyper answers 431 before the router sees the request, so it is not in the metrics.
    assert_eq!(server.api().get("/healthz").await.status, 200);
}

/// The limits are settings: a smaller header budget refuses what the default accepts.
#[tokio::test]
async fn header_limits_are_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        &["--max-header-bytes", "16384", "--max-headers", "20"],
    );
    let base = server.base();
    let h = |n: usize, len: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("x-h-{i}"), "v".repeat(len)))
            .collect()
    };
    assert_eq!(get_with_headers(&base, "/healthz", &h(10, 100)).await, 200);
    assert_eq!(
        get_with_headers(&base, "/healthz", &h(1, 20_000)).await,
        431
    );
    assert_eq!(get_with_headers(&base, "/healthz", &h(30, 10)).await, 431);
}

/// Starts `sextant serve --config FILE` (memory store, no Nacos, ephemeral ports) with `vars`
/// set in its environment and `flags` added; returns the child (killed by the caller) and its
/// HTTP address.
fn serve_with_vars(
    file: &std::path::Path,
    vars: &[(&str, &str)],
    flags: &[&str],
) -> (std::process::Child, std::net::SocketAddr) {
    let mut args = vec![
        "--config".to_string(),
        file.display().to_string(),
        "--store".into(),
        "memory".into(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--grpc-addr".into(),
        "127.0.0.1:0".into(),
        "--no-nacos".into(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    let mut cmd = sextant_testkit::serve_command(env!("CARGO_BIN_EXE_sextant").as_ref(), &args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let s = sextant_testkit::spawn(cmd, STARTUP_TIMEOUT);
    (s.child, s.http)
}

/// A `SEXTANT_*` variable overrides the config file, and a flag overrides the variable.
#[tokio::test]
async fn variables_override_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sextant.toml");
    std::fs::write(&file, "max_header_bytes = 8192\nmax_headers = 100\n").unwrap();
    let header = |len: usize| vec![("x-big".to_string(), "a".repeat(len))];
    let many: Vec<_> = (0..30)
        .map(|i| (format!("x-h-{i}"), "v".to_string()))
        .collect();

    // The file alone: 8 KiB of head.
    let (mut child, http) = serve_with_vars(&file, &[], &[]);
    let base = format!("http://{http}");
    assert_eq!(
        get_with_headers(&base, "/healthz", &header(20_000)).await,
        431
    );
    let _ = child.kill();
    let _ = child.wait();

    // The variable beats the file; the flag beats the variable.
    let (mut child, http) = serve_with_vars(
        &file,
        &[
            ("SEXTANT_MAX_HEADER_BYTES", "65536"),
            ("SEXTANT_MAX_HEADERS", "100"),
        ],
        &["--max-headers", "20"],
    );
    let base = format!("http://{http}");
    let ok = get_with_headers(&base, "/healthz", &header(20_000)).await;
    let too_many = get_with_headers(&base, "/healthz", &many).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        ok, 200,
        "SEXTANT_MAX_HEADER_BYTES did not override the file"
    );
    assert_eq!(
        too_many, 431,
        "--max-headers did not override SEXTANT_MAX_HEADERS"
    );
}

/// Reads from `tcp` until the server closes it (a reset counts as closed) and asserts that
/// this took between 0.5 s and 3 s — the 1 s timeout of these tests, not an immediate refusal
/// — and that nothing was written back. `what` names the case in failures.
async fn assert_cut_off_quietly(tcp: &mut tokio::net::TcpStream, what: &str) {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let deadline = tokio::time::Instant::from_std(start + std::time::Duration::from_secs(3));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after 3 s"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let after = start.elapsed();
    assert!(
        after >= std::time::Duration::from_millis(500),
        "{what}: closed after only {after:?}"
    );
    assert!(
        got.is_empty(),
        "{what}: answered {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Sends `GET path` on `tcp` and reads the answer (which has a content-length); returns its
/// status.
async fn get_over(tcp: &mut tokio::net::TcpStream, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send a request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .unwrap_or_else(|| panic!("no content-length in {head}"))
                    .trim()
                    .parse()
                    .unwrap();
                if got.len() >= end + 4 + len {
                    return head[9..12].parse::<u16>().unwrap();
                }
            }
            let n = tcp.read(&mut buf).await.expect("read the answer");
            assert!(n > 0, "closed before the answer: {text:?}");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, read)
        .await
        .expect("the answer in time")
}

/// Slowloris: with `--header-read-timeout-seconds 1`, a client that sends part of a request
/// head and then nothing — on the native and the Nacos HTTP listener, as its first request or
/// after a first answer on a kept-alive connection — or that sends nothing at all, is
/// disconnected after about a second, while ordinary requests are served.
#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--header-read-timeout-seconds", "1"]);
    let (nacos, _) = server.nacos.expect("the Nacos adapter is on");
    let partial = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
    let mut slow = Vec::new();
    let targets = [
        (server.http, "/healthz"),
        (nacos, "/nacos/v1/ns/instance/list?serviceName=svc"),
    ];
    for (addr, path) in targets {
        // Part of a first request head.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(partial).await.unwrap();
        slow.push((format!("{addr}: a partial first head"), tcp));
        // Nothing at all.
        let tcp = TcpStream::connect(addr).await.unwrap();
        slow.push((format!("{addr}: a silent connection"), tcp));
        // One whole request, then part of the next on the same connection.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_over(&mut tcp, path).await, 200);
        tcp.write_all(partial).await.unwrap();
        slow.push((format!("{addr}: a partial second head"), tcp));
    }
    // Ordinary requests are served meanwhile.
    let api = server.api();
    assert_eq!(api.get("/healthz").await.status, 200);
    let cut = slow
        .into_iter()
        .map(|(what, mut tcp)| async move { assert_cut_off_quietly(&mut tcp, &what).await });
    futures::future::join_all(cut).await;
    assert_eq!(api.get("/healthz").await.status, 200);
}

/// hyper starts the header-read timer as soon as it has written an answer on a kept-alive
/// HTTP/1 connection, so the timeout is also the idle limit of keep-alive: a connection idle
/// for less than it serves the next request, one idle for longer is closed (without an answer).
#[tokio::test]
async fn idle_keep_alive_lasts_the_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        &["--header-read-timeout-seconds", "1", "--no-nacos"],
    );
    let mut tcp = tokio::net::TcpStream::connect(server.http).await.unwrap();
    assert_eq!(get_over(&mut tcp, "/healthz").await, 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(get_over(&mut tcp, "/healthz").await, 200, "idle for 0.3 s");
    // Idle for 2 s: closed at about 1 s, nothing written.
    assert_cut_off_quietly(&mut tcp, "an idle keep-alive connection").await;

    // With the limit off, a connection idle for 2 s still serves the next request.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        &["--header-read-timeout-seconds", "0", "--no-nacos"],
    );
    let mut tcp = tokio::net::TcpStream::connect(server.http).await.unwrap();
    assert_eq!(get_over(&mut tcp, "/healthz").await, 200);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        get_over(&mut tcp, "/healthz").await,
        200,
        "idle for 2 s with no limit"
    );
}
