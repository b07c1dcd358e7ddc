//! The closed-loop driver every write phase uses (N concurrent workers taking request numbers
//! from a shared counter, bounded in count and time), the clients, and the instances the tool
//! registers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sextant_proto::v1 as pb;
use sextant_proto::v1::registry_client::RegistryClient;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::stats::{CpuUsed, Latency, Row};

/// The namespace every instance of this tool goes into.
pub const NAMESPACE: &str = "bench";

/// Stops a phase early once this many requests have failed: the rest would only fail too.
const MAX_ERRORS: u64 = 1000;

/// What a phase did.
pub struct Outcome {
    pub latency: Latency,
    /// Units of work done by the successful requests (instances, changes, ...).
    pub ops: u64,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// The phase hit its deadline (or the error limit) before issuing every request.
    pub cut_short: Option<String>,
}

impl Outcome {
    /// The phase's row of a report table: its throughput in `unit` and its latency.
    pub fn row(
        &self,
        scenario: String,
        params: String,
        unit: &'static str,
        cpu: Option<CpuUsed>,
    ) -> Row {
        Row {
            scenario,
            params,
            ops: self.ops,
            errors: self.errors,
            secs: self.elapsed.as_secs_f64(),
            unit,
            latency: self.latency.clone(),
            cpu,
        }
    }

    /// Notes for the report: the first error and why the phase stopped early, if it did.
    pub fn notes(&self, phase: &str) -> Vec<String> {
        let mut n = Vec::new();
        if let Some(e) = &self.first_error {
            n.push(format!(
                "{phase}: {} failed requests; first: {e}",
                self.errors
            ));
        }
        if let Some(c) = &self.cut_short {
            n.push(format!("{phase}: stopped early: {c}"));
        }
        n
    }
}

/// Runs `requests` requests numbered 0.. on `workers` concurrent workers, each waiting for its
/// answer before taking the next number, until all are done or `deadline` has passed.
/// `make(worker, n)` performs request `n` and returns the units of work it did.
pub async fn drive<F, Fut>(workers: usize, requests: u64, deadline: Duration, make: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cut_short: Arc<Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let handles: Vec<_> = (0..workers.max(1))
        .map(|w| {
            let make = make.clone();
            let next = next.clone();
            let failed = failed.clone();
            let cut_short = cut_short.clone();
            tokio::spawn(async move {
                let mut latency = Latency::new();
                let (mut ops, mut done, mut errors) = (0u64, 0u64, 0u64);
                let mut first_error = None;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        break;
                    }
                    let stop = if started.elapsed() > deadline {
                        Some(format!(
                            "deadline of {deadline:?} reached after {n} of {requests} requests"
                        ))
                    } else if failed.load(Ordering::Relaxed) >= MAX_ERRORS {
                        Some(format!("{MAX_ERRORS} requests failed"))
                    } else {
                        None
                    };
                    if let Some(why) = stop {
                        if let Ok(mut c) = cut_short.lock() {
                            c.get_or_insert(why);
                        }
                        break;
                    }
                    let t = Instant::now();
                    let r = make(w, n).await;
                    latency.record(t.elapsed());
                    done += 1;
                    match r {
                        Ok(units) => ops += units,
                        Err(e) => {
                            errors += 1;
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (latency, ops, done, errors, first_error)
            })
        })
        .collect();
    let mut out = Outcome {
        latency: Latency::new(),
        ops: 0,
        requests: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        cut_short: None,
    };
    for h in handles {
        match h.await {
            Ok((latency, ops, done, errors, first_error)) => {
                out.latency.merge(&latency);
                out.ops += ops;
                out.requests += done;
                out.errors += errors;
                if out.first_error.is_none() {
                    out.first_error = first_error;
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("worker panicked: {e}"));
            }
        }
    }
    out.elapsed = started.elapsed();
    out.cut_short = cut_short.lock().ok().and_then(|c| c.clone());
    out
}

/// The CA (PEM) `https://` targets are trusted with (`--tls-ca`, or the one `--spawn-tls`
/// made); set once at start-up, before any client is built.
static TLS_CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Trusts `pem` for every `https://` target of this run.
pub fn trust_ca(pem: Vec<u8>) -> anyhow::Result<()> {
    TLS_CA
        .set(pem)
        .map_err(|_| anyhow::anyhow!("the TLS CA is set twice"))
}

/// The CA for `https://` targets, if one was given.
pub fn tls_ca() -> Option<&'static [u8]> {
    TLS_CA.get().map(Vec::as_slice)
}

/// A gRPC endpoint for `url`, with TLS (trusting the run's CA, else the system's roots) when
/// it is `https://`.
pub fn endpoint(url: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    let ep = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid gRPC URL {url}"))?;
    if !url.starts_with("https://") {
        return Ok(ep);
    }
    let tls = match tls_ca() {
        Some(pem) => tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        None => tonic::transport::ClientTlsConfig::new().with_native_roots(),
    };
    ep.tls_config(tls)
        .context("TLS settings of the gRPC client")
}

/// An HTTP client for short requests (bounded by `timeout`); connections are pooled.
pub fn http_client(timeout: Option<Duration>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    if let Some(pem) = tls_ca() {
        b = b.tls_certs_only([reqwest::Certificate::from_pem(pem).context("the TLS CA")?]);
    }
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    // A node with auth on: its HTTP calls send this token (gRPC ones: `BenchToken`).
    if let Ok(token) = std::env::var("SEXTANT_BENCH_TOKEN") {
        let mut headers = reqwest::header::HeaderMap::new();
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("SEXTANT_BENCH_TOKEN holds characters a header cannot")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
        b = b.default_headers(headers);
    }
    b.build().context("cannot build the HTTP client")
}

/// The bench's gRPC client: with auth on, every call carries `SEXTANT_BENCH_TOKEN`.
pub type Grpc = RegistryClient<InterceptedService<Channel, BenchToken>>;

/// Adds `authorization: Bearer $SEXTANT_BENCH_TOKEN` to every gRPC call, when set.
#[derive(Clone)]
pub struct BenchToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BenchToken {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A gRPC client on `ch` that sends the bench's token.
pub fn grpc_client(ch: Channel) -> anyhow::Result<Grpc> {
    let token = match std::env::var("SEXTANT_BENCH_TOKEN") {
        Ok(t) => {
            let mut v: tonic::metadata::MetadataValue<_> = format!("Bearer {t}")
                .parse()
                .context("SEXTANT_BENCH_TOKEN holds characters metadata cannot")?;
            v.set_sensitive(true);
            Some(v)
        }
        Err(_) => None,
    };
    Ok(RegistryClient::with_interceptor(ch, BenchToken(token)))
}

/// Registers `service` with `n` instances (`i0`, `i1`, ...) in one `BatchRegister`: the watched
/// service of the streaming scenarios.
pub async fn register_service(c: Grpc, service: &str, n: u64) -> anyhow::Result<()> {
    let instances = (0..n)
        .map(|i| grpc_request(service, format!("i{i}"), i))
        .collect();
    batch_register(c, instances)
        .await
        .with_context(|| format!("registering the watched service {service}"))?;
    Ok(())
}

/// One `BatchRegister`, checked to answer one revision per instance; returns how many.
pub async fn batch_register(
    mut c: Grpc,
    instances: Vec<pb::RegisterRequest>,
) -> anyhow::Result<u64> {
    let len = instances.len() as u64;
    let r = c
        .batch_register(pb::BatchRegisterRequest { instances })
        .await?
        .into_inner();
    anyhow::ensure!(
        r.revisions.len() as u64 == len,
        "{} revisions for {len} instances",
        r.revisions.len()
    );
    Ok(len)
}

/// `n` gRPC clients, each on its own connection (as `n` independent clients would be).
pub async fn grpc_clients(url: &str, n: usize) -> anyhow::Result<Vec<Grpc>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = endpoint(url)?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to gRPC at {url}"))?;
        out.push(
            grpc_client(ch)?
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        );
    }
    Ok(out)
}

/// A short id for this run, so that names do not collide with earlier runs on the same server.
pub fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs:x}")
}

/// The address of instance number `i`: 10.x.y.z, unique for the first 16M.
pub fn host(i: u64) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// The registration body of instance `i` for the HTTP API: a typical instance with a version,
/// a location and two metadata entries.
pub fn http_body(i: u64) -> serde_json::Value {
    serde_json::json!({
        "host": host(i),
        "port": 8080,
        "protocol": "grpc",
        "version": "1.4.2",
        "location": {"region": "r1", "zone": format!("z{}", i % 3), "idc": "dc1"},
        "metadata": {"team": "bench", "build": "a1b2c3d"},
    })
}

/// The same instance as [`http_body`], as a gRPC register request.
pub fn grpc_request(service: &str, id: String, i: u64) -> pb::RegisterRequest {
    pb::RegisterRequest {
        service: Some(pb::ServiceRef {
            namespace: NAMESPACE.into(),
            service: service.into(),
        }),
        spec: Some(pb::InstanceSpec {
            id,
            host: host(i),
            port: 8080,
            protocol: "grpc".into(),
            version: "1.4.2".into(),
            location: Some(pb::Location {
                region: "r1".into(),
                zone: format!("z{}", i % 3),
                idc: "dc1".into(),
            }),
            cell: String::new(),
            lane: String::new(),
            metadata: HashMap::from([
                ("team".to_string(), "bench".to_string()),
                ("build".to_string(), "a1b2c3d".to_string()),
            ]),
        }),
        status: None,
        ttl_seconds: 0,
    }
}

/// Reads the JSON answer of a write, failing with the server's message on a non-2xx status.
pub async fn check_http(resp: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = resp.status();
    let body = resp.bytes().await.context("reading the response")?;
    if !status.is_success() {
        anyhow::bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).context("the response is not JSON")
}

/// The record a peer (ZooKeeper, etcd) stores for instance `i`: the same instance as
/// [`http_body`], as JSON bytes, with the `weight` its status changes alter.
pub fn peer_record(i: u64, weight: u32) -> Vec<u8> {
    let mut v = http_body(i);
    v["weight"] = serde_json::json!(weight);
    serde_json::to_vec(&v).unwrap_or_default()
}
