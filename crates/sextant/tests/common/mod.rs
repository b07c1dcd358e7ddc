//! Shared helpers of the integration tests: start the real `sextant serve` binary on loopback
//! with ephemeral ports (parsed from its start-up log line), kill it on drop, a small JSON HTTP
//! client, a server-sent-events reader and a gRPC client constructor. Every wait is bounded.
#![allow(dead_code, unused_imports)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};
use sextant_client::sse::SseParser;
use sextant_proto::v1 as pb;
use sextant_proto::v1::registry_client::RegistryClient;

/// How long the server may take to print its start-up line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound of one ordinary HTTP or gRPC call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `sextant serve` child process. Killed (SIGKILL) and reaped on drop.
pub struct Server {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The Nacos adapter's HTTP and gRPC addresses, unless started with `--no-nacos`.
    pub nacos: Option<(SocketAddr, SocketAddr)>,
    /// The DNS adapter's address (UDP and TCP), unless started with `--no-dns`.
    pub dns: Option<SocketAddr>,
    /// Consul's HTTP API address, unless started with `--no-consul`.
    pub consul: Option<SocketAddr>,
    pub data_dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    /// Keeps a private data directory alive for as long as the server runs.
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh temporary data directory.
    pub fn start() -> Server {
        let tmp = tempfile::tempdir().expect("create a temp dir");
        let mut s = Server::start_in(tmp.path());
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on a fresh temporary data directory with extra `serve` flags.
    pub fn start_with_args(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("create a temp dir");
        let mut s = Server::start_with(tmp.path(), extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `dir` (which the caller keeps alive), e.g. to restart on the same data.
    pub fn start_in(dir: &Path) -> Server {
        Server::start_with(dir, &[])
    }

    /// Starts a server on `dir` with extra `serve` flags.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Server {
        let mut args = sextant_testkit::loopback_args(dir, 0);
        args.extend(["--log".into(), "info".into()]);
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let sextant_testkit::Spawned {
            child,
            http,
            grpc,
            nacos,
            dns,
            consul,
            log,
        } = sextant_testkit::spawn_serve(
            std::ffi::OsStr::new(env!("CARGO_BIN_EXE_sextant")),
            args,
            STARTUP_TIMEOUT,
        );
        Server {
            child,
            http,
            grpc,
            nacos,
            dns,
            consul,
            data_dir: dir.to_owned(),
            log,
            _tmp: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT`
    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn api(&self) -> Api {
        Api::new(self.http)
    }

    pub async fn grpc_client(&self) -> RegistryClient<tonic::transport::Channel> {
        grpc_client(self.grpc).await
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// Sends SIGTERM with the `kill` utility.
    pub fn terminate(&self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM failed: {st}");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A clock-seeded pseudo-random generator, for jitter only.
pub use sextant_model::XorShift as Jitter;

/// An HTTP answer: status, headers and the body as JSON (`Null` if it was not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// The `X-Sextant-Revision` header.
    pub fn revision_header(&self) -> u64 {
        self.headers
            .get("x-sextant-revision")
            .unwrap_or_else(|| panic!("no x-sextant-revision header in {self:?}"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn ok(self) -> Value {
        assert_eq!(
            self.status, 200,
            "expected 200, got {}: {}",
            self.status, self.text
        );
        self.body
    }

    /// Asserts a JSON error `{"error":{"code","message"}}` with `status` whose message contains
    /// every one of `needles` (case-insensitive). Returns the message.
    pub fn assert_error(&self, status: u16, needles: &[&str]) -> String {
        assert_eq!(
            self.status, status,
            "expected HTTP {status}, got {}: {}",
            self.status, self.text
        );
        let ct = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("application/json"), "content type {ct:?}");
        let code = self.body["error"]["code"].as_str();
        let message = self.body["error"]["message"].as_str();
        let (Some(code), Some(message)) = (code, message) else {
            panic!("not a JSON error body: {}", self.text);
        };
        assert!(!code.is_empty() && !message.is_empty(), "{}", self.text);
        let lower = message.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "error message {message:?} does not mention {n:?}"
            );
        }
        message.to_string()
    }
}

/// A JSON client of one server's HTTP API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("build the HTTP client")
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        Api {
            base: format!("http://{addr}"),
            client: http_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request with an optional JSON body and reads the whole answer.
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Resp {
        let mut req = self
            .client
            .request(method.clone(), self.url(path))
            .timeout(CALL_TIMEOUT);
        if let Some(b) = body {
            req = req.json(b);
        }
        Self::read(req, &format!("{method} {path}")).await
    }

    /// Sends a prepared request and reads the whole answer; panics on transport errors.
    pub async fn read(req: reqwest::RequestBuilder, what: &str) -> Resp {
        let resp = req.send().await.unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body: {e:?}"));
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// The same API, sending `secret` as a bearer token on every request.
    #[allow(dead_code)]
    pub fn with_bearer(&self, secret: &str) -> Api {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {secret}")).unwrap(),
        );
        Api {
            base: self.base.clone(),
            client: reqwest::Client::builder()
                .no_proxy()
                .default_headers(h)
                .build()
                .unwrap(),
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Resp {
        self.send(Method::PUT, path, Some(body)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Resp {
        self.send(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(Method::DELETE, path, None).await
    }

    /// PUTs an instance, asserts 200, returns its revision.
    pub async fn register(&self, ns: &str, svc: &str, id: &str, body: &Value) -> u64 {
        let v = self.put(&instance_path(ns, svc, id), body).await.ok();
        v["revision"].as_u64().expect("revision in the answer")
    }

    pub async fn deregister(&self, ns: &str, svc: &str, id: &str) -> u64 {
        let v = self.delete(&instance_path(ns, svc, id)).await.ok();
        v["revision"].as_u64().expect("revision in the answer")
    }

    pub async fn set_status(&self, ns: &str, svc: &str, id: &str, patch: &Value) -> u64 {
        let path = format!("{}/status", instance_path(ns, svc, id));
        let v = self.patch(&path, patch).await.ok();
        v["revision"].as_u64().expect("revision in the answer")
    }

    /// GETs a service, asserts 200.
    pub async fn service(&self, ns: &str, svc: &str) -> Value {
        self.get(&service_path(ns, svc)).await.ok()
    }
}

/// One sample from `/metrics` (0 when absent).
#[allow(dead_code)]
pub async fn metric(api: &Api, name: &str) -> f64 {
    let text = api.get("/metrics").await.text;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub fn service_path(ns: &str, svc: &str) -> String {
    format!("/v1/namespaces/{ns}/services/{svc}")
}

pub fn instance_path(ns: &str, svc: &str, id: &str) -> String {
    format!("/v1/namespaces/{ns}/services/{svc}/instances/{id}")
}

/// A minimal registration body.
pub fn inst(host: &str, port: u16) -> Value {
    json!({ "host": host, "port": port })
}

/// The ids of a service answer's instances, in answer order.
pub fn ids(service: &Value) -> Vec<String> {
    service["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("no instances in {service}"))
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

/// One instance of a service answer, by id.
pub fn find<'a>(service: &'a Value, id: &str) -> Option<&'a Value> {
    service["instances"]
        .as_array()?
        .iter()
        .find(|i| i["id"] == id)
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Frame {
    pub event: String,
    pub id: Option<u64>,
    /// The raw `data:` text.
    pub raw: String,
    pub data: Value,
}

/// What reading the next event gave.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    Timeout,
    End,
}

/// Reads `text/event-stream` frames from a streaming response, with the SDK's parser.
pub struct Sse {
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    parser: SseParser,
    /// Frames parsed and not yet returned, oldest first.
    ready: VecDeque<Frame>,
    pub frames_seen: usize,
}

impl Sse {
    /// `GET /v1/watch?{query}`, optionally with `Last-Event-ID`; asserts 200 and the type.
    pub async fn open(api: &Api, query: &str, last_event_id: Option<u64>) -> Sse {
        let mut req = api.client.get(api.url(&format!("/v1/watch?{query}")));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = tokio::time::timeout(CALL_TIMEOUT, req.send())
            .await
            .expect("watch request timed out")
            .expect("watch request failed");
        assert_eq!(resp.status().as_u16(), 200, "watch refused");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content type {ct:?}");
        Sse {
            stream: Box::pin(resp.bytes_stream()),
            parser: SseParser::new(),
            ready: VecDeque::new(),
            frames_seen: 0,
        }
    }

    /// Parses `chunk` strictly: the watch sends only `event`, `id` (a revision) and `data`.
    fn feed(&mut self, chunk: &[u8]) {
        let mut frames = Vec::new();
        self.parser.push(chunk, &mut frames);
        for f in frames {
            assert!(
                f.unknown_fields.is_empty(),
                "unexpected SSE fields {:?} in {f:?}",
                f.unknown_fields
            );
            let id =
                f.id.as_ref()
                    .map(|_| f.revision_id().expect("numeric event id"));
            let data = serde_json::from_str(&f.data).unwrap_or(Value::Null);
            self.ready.push_back(Frame {
                event: f.event,
                id,
                raw: f.data,
                data,
            });
        }
    }

    /// The next event (comments skipped), waiting at most `within`.
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(f) = self.ready.pop_front() {
                self.frames_seen += 1;
                return Next::Frame(f);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Next::Timeout,
                Ok(None) => return Next::End,
                Ok(Some(Err(e))) => panic!("event stream failed: {e:?}"),
                Ok(Some(Ok(chunk))) => self.feed(&chunk),
            }
        }
    }

    /// The next event; panics if none comes within `within`.
    pub async fn expect(&mut self, within: Duration) -> Frame {
        match self.next(within).await {
            Next::Frame(f) => f,
            other => panic!(
                "expected an event within {within:?} (after {} frames), got {other:?}",
                self.frames_seen
            ),
        }
    }

    /// Asserts that no change arrives within `within` (`sync` bookmarks, which only say the
    /// stream is caught up, are allowed).
    pub async fn expect_quiet(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Timeout => return,
                Next::Frame(f) if f.event == "sync" => continue,
                other => panic!("expected no event, got {other:?}"),
            }
        }
    }
}

/// A gRPC client of the server at `addr`, connected within the call timeout.
pub async fn grpc_client(addr: SocketAddr) -> RegistryClient<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT);
    let channel = tokio::time::timeout(CALL_TIMEOUT, endpoint.connect())
        .await
        .expect("gRPC connect timed out")
        .expect("gRPC connect failed");
    RegistryClient::new(channel)
}

pub fn svc_ref(ns: &str, svc: &str) -> pb::ServiceRef {
    pb::ServiceRef {
        namespace: ns.into(),
        service: svc.into(),
    }
}

/// A gRPC registration of `host:port` with the given id (empty = default).
pub fn grpc_reg(ns: &str, svc: &str, id: &str, host: &str, port: u32) -> pb::RegisterRequest {
    pb::RegisterRequest {
        service: Some(svc_ref(ns, svc)),
        spec: Some(pb::InstanceSpec {
            id: id.into(),
            host: host.into(),
            port,
            ..Default::default()
        }),
        status: None,
        ttl_seconds: 0,
    }
}

/// Runs `f` with a timeout, panicking with `what` if it takes longer.
pub async fn bounded<F: std::future::Future>(what: &str, within: Duration, f: F) -> F::Output {
    tokio::time::timeout(within, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {within:?}"))
}

/// How `raw_http` sends a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    ContentLength,
    Chunked,
}

/// Sends one HTTP/1.1 request over a plain socket, writing the body while a second thread
/// reads the answer, so that an early answer (e.g. 413 before the body is consumed) is seen
/// even if the server then closes the connection. Blocking; every read is bounded.
pub fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    framing: Framing,
) -> Resp {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect("connect to the server");
    sock.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(CALL_TIMEOUT)).unwrap();
    let mut rd = sock.try_clone().expect("clone the socket");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match rd.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if out.is_empty() => panic!("no answer from the server: {e}"),
                Err(_) => break,
            }
        }
        out
    });
    let length = match framing {
        Framing::ContentLength => format!("content-length: {}\r\n", body.len()),
        Framing::Chunked => "transfer-encoding: chunked\r\n".to_string(),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {content_type}\r\n{length}connection: close\r\n\r\n"
    );
    // Write errors are expected once the server has answered and closed.
    let _ = (|| -> std::io::Result<()> {
        sock.write_all(head.as_bytes())?;
        match framing {
            Framing::ContentLength => sock.write_all(body)?,
            Framing::Chunked => {
                for c in body.chunks(64 * 1024) {
                    sock.write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                    sock.write_all(c)?;
                    sock.write_all(b"\r\n")?;
                }
                sock.write_all(b"0\r\n\r\n")?;
            }
        }
        Ok(())
    })();
    let out = reader.join().expect("reader thread");
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let mut headers = HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                reqwest::header::HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    Resp {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
        text: body.to_string(),
    }
}

/// Cluster tests: waits (bounded) until exactly one of `nodes` says it leads and the others
/// name it; returns its index.
#[allow(dead_code)]
pub async fn leader_of(nodes: &[&Server], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let mut views = Vec::new();
        for n in nodes {
            views.push(n.api().get("/v1/cluster").await.body);
        }
        let leaders: Vec<usize> = (0..nodes.len())
            .filter(|&i| views[i]["role"] == "leader")
            .collect();
        if let [l] = leaders.as_slice() {
            let addr = format!("http://{}", nodes[*l].http);
            let named = views
                .iter()
                .enumerate()
                .all(|(i, v)| i == *l || v["leader"].as_str().is_some_and(|s| s.contains(&addr)));
            if named {
                return *l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no single leader within {within:?}: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
