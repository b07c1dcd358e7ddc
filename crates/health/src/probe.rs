//! One probe of one instance: TCP connect, HTTP GET, or gRPC health check, each bounded by the
//! check's timeout so a slow or blackholed target costs at most that.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use sextant_core::model::{CheckKind, HealthCheck};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Bytes of an HTTP check's body read at most (then the connection is dropped).
const MAX_BODY: usize = 4096;

/// What a probe that did not fail said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passing,
    /// Alive but asking for less load: an HTTP check answered 429 Too Many Requests (Consul's
    /// rule). The instance stays served, marked `warning`.
    Warning,
}

/// Why a probe failed; the label of the failures metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// Nothing listens (connection refused / reset).
    Refused,
    /// No answer within the timeout.
    Timeout,
    /// Answered, but not healthy (HTTP status out of range, gRPC not SERVING).
    Unhealthy,
    /// Anything else (DNS, protocol error).
    Error,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Unhealthy => "unhealthy",
            Failure::Error => "error",
        }
    }
}

fn io_failure(e: &std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => {
            Failure::Refused
        }
        std::io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Error,
    }
}

/// Probes `host:port` as `check` says.
pub async fn probe(check: &HealthCheck, host: &str, port: u16) -> Result<Verdict, Failure> {
    let t = Duration::from_millis(u64::from(check.timeout_ms));
    match timeout(t, probe_inner(check, host, port, t)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout),
    }
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, Failure> {
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| io_failure(&e))?;
    // Close with RST, not FIN: a scanner making thousands of connections a second must not
    // leave them in TIME_WAIT and run out of ephemeral ports.
    let _ = stream.set_zero_linger();
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn probe_inner(
    check: &HealthCheck,
    host: &str,
    port: u16,
    t: Duration,
) -> Result<Verdict, Failure> {
    match check.kind {
        CheckKind::None => Ok(Verdict::Passing),
        CheckKind::Tcp => connect(host, port).await.map(|_| Verdict::Passing),
        CheckKind::Http => http(check, host, port).await,
        CheckKind::Grpc => grpc(check, host, port, t).await,
    }
}

async fn http(check: &HealthCheck, host: &str, port: u16) -> Result<Verdict, Failure> {
    let stream = connect(host, port).await?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|_| Failure::Error)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let req = hyper::Request::get(check.http_path.as_str())
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "sextant-health")
        .body(Empty::new())
        .map_err(|_| Failure::Error)?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| {
            if e.is_closed() || e.is_incomplete_message() {
                Failure::Refused
            } else {
                Failure::Error
            }
        })?;
        let status = resp.status().as_u16();
        // Read a little of the body so a server that answers normally is not reset mid-write;
        // never more than MAX_BODY.
        let mut body = resp.into_body();
        let mut read = 0;
        while read < MAX_BODY {
            match body.frame().await {
                Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
        if (check.http_status_min..=check.http_status_max).contains(&status) {
            Ok(Verdict::Passing)
        } else if status == 429 {
            Ok(Verdict::Warning)
        } else {
            Err(Failure::Unhealthy)
        }
    }
    .await;
    driver.abort();
    result
}

async fn grpc(check: &HealthCheck, host: &str, port: u16, t: Duration) -> Result<Verdict, Failure> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let authority = if host.contains(':') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    };
    let channel = tonic::transport::Endpoint::from_shared(authority)
        .map_err(|_| Failure::Error)?
        .connect_timeout(t)
        .timeout(t)
        .tcp_nodelay(true)
        .connect()
        .await
        // Transport errors at connect are refusals or resets (the timeout is handled above).
        .map_err(|_| Failure::Refused)?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: check.grpc_service.clone(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => Failure::Unhealthy,
            tonic::Code::DeadlineExceeded => Failure::Timeout,
            tonic::Code::Unavailable => Failure::Refused,
            _ => Failure::Error,
        })?;
    if resp.into_inner().status == ServingStatus::Serving as i32 {
        Ok(Verdict::Passing)
    } else {
        Err(Failure::Unhealthy)
    }
}
