//! Connections to the configured servers: one HTTP/2 channel at a time to the current server,
//! failover to the next address when a call finds it unreachable (connection failure,
//! `Unavailable`, timeout), a timeout on every call, and the jittered exponential backoff the
//! background loops use between reconnect attempts.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sextant_model::XorShift;
use sextant_proto::v1::registry_client::RegistryClient;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::Error;
use crate::stats::Counters;

/// Largest message the client accepts (a snapshot of a very large service).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long after a round in which no server could be reached the cache-file fallback answers
/// without trying the network again.
const UNREACHABLE_MEMORY: Duration = Duration::from_secs(3);

/// Adds `authorization: Bearer <secret>` to every call when the client has a token.
#[derive(Clone, Default)]
pub(crate) struct Token(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The generated client with the token interceptor.
pub(crate) type Api = RegistryClient<InterceptedService<Channel, Token>>;

/// A channel to one server, and which one (an index into the configured addresses).
#[derive(Clone)]
pub(crate) struct Conn {
    pub index: usize,
    pub channel: Channel,
    pub token: Token,
}

impl Conn {
    pub fn client(&self) -> Api {
        RegistryClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

struct Current {
    index: usize,
    channel: Option<Channel>,
    /// When the last round over every address failed to connect.
    unreachable_at: Option<Instant>,
    /// The server of the last successful connection.
    last_connected: Option<usize>,
}

pub(crate) struct Transport {
    endpoints: Vec<(String, Endpoint)>,
    connect_timeout: Duration,
    pub call_timeout: Duration,
    current: Mutex<Current>,
    /// One connect round at a time; others wait for its result.
    connecting: tokio::sync::Mutex<()>,
    stats: Arc<Counters>,
    token: Token,
}

/// Whether a failed call says "this server cannot serve you now; try another" rather than
/// "your request is wrong". Every SDK call is idempotent, so retrying elsewhere is safe.
pub(crate) fn is_failover(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
    )
}

impl Transport {
    /// `tls` applies to the `https://` addresses.
    pub fn new(
        addresses: &[String],
        tls: &tonic::transport::ClientTlsConfig,
        connect_timeout: Duration,
        call_timeout: Duration,
        stats: Arc<Counters>,
    ) -> Result<Self, Error> {
        if addresses.is_empty() {
            return Err(Error::NoServers);
        }
        let endpoints = addresses
            .iter()
            .map(|a| {
                let ep = Endpoint::from_shared(a.clone())
                    .map_err(|e| Error::InvalidAddress {
                        address: a.clone(),
                        reason: e.to_string(),
                    })?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    // A server that vanished without closing the connection (a partition, a
                    // frozen host) is noticed within interval + timeout.
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .keep_alive_while_idle(true);
                let ep = if ep.uri().scheme_str() == Some("https") {
                    ep.tls_config(tls.clone())
                        .map_err(|e| Error::InvalidAddress {
                            address: a.clone(),
                            reason: format!("TLS: {e}"),
                        })?
                } else {
                    ep
                };
                Ok((a.clone(), ep))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            endpoints,
            connect_timeout,
            call_timeout,
            current: Mutex::new(Current {
                index: 0,
                channel: None,
                unreachable_at: None,
                last_connected: None,
            }),
            connecting: tokio::sync::Mutex::new(()),
            stats,
            token: Token::default(),
        })
    }

    /// Sends `secret` as `authorization: Bearer` on every call.
    pub fn with_token(mut self, secret: Option<&str>) -> Result<Self, Error> {
        if let Some(s) = secret {
            let v = format!("Bearer {s}")
                .parse()
                .map_err(|_| Error::InvalidToken)?;
            self.token = Token(Some(v));
        }
        Ok(self)
    }

    pub fn address(&self, index: usize) -> &str {
        self.endpoints
            .get(index)
            .map(|e| e.0.as_str())
            .unwrap_or("?")
    }

    fn cached(&self) -> Option<Conn> {
        let c = self.current.lock();
        c.channel.clone().map(|channel| Conn {
            index: c.index,
            channel,
            token: self.token.clone(),
        })
    }

    /// Whether the last attempt to reach any server failed, recently.
    pub fn recently_unreachable(&self) -> bool {
        self.current
            .lock()
            .unreachable_at
            .is_some_and(|t| t.elapsed() < UNREACHABLE_MEMORY)
    }

    /// The channel to the current server, connecting first if needed: the current address,
    /// then each other one in order, each bounded by the connect timeout.
    pub async fn connect(&self) -> Result<Conn, Error> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let start = self.current.lock().index;
        let n = self.endpoints.len();
        let mut last_error = String::new();
        for k in 0..n {
            let index = (start + k) % n;
            let (address, ep) = &self.endpoints[index];
            // `connect_timeout` bounds the TCP connect; this bounds the HTTP/2 handshake too.
            let bound = self.connect_timeout + Duration::from_millis(500);
            match tokio::time::timeout(bound, ep.connect()).await {
                Ok(Ok(channel)) => {
                    let mut c = self.current.lock();
                    if c.last_connected.is_some_and(|l| l != index)
                        || (c.last_connected.is_none() && index != 0)
                    {
                        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(server = %address, "failed over to another server");
                    }
                    c.last_connected = Some(index);
                    c.index = index;
                    c.channel = Some(channel.clone());
                    c.unreachable_at = None;
                    return Ok(Conn {
                        index,
                        channel,
                        token: self.token.clone(),
                    });
                }
                Ok(Err(e)) => {
                    tracing::debug!(server = %address, error = %e, "cannot connect");
                    last_error = format!("{address}: {e}");
                }
                Err(_) => {
                    tracing::debug!(server = %address, "connect timed out");
                    last_error = format!("{address}: connect timed out after {bound:?}");
                }
            }
        }
        self.current.lock().unreachable_at = Some(Instant::now());
        Err(Error::Unavailable {
            operation: "connect",
            last_error,
        })
    }

    /// Drops the channel to server `index` after a failure, so the next call tries the next
    /// address. A no-op if another caller already moved on.
    pub fn failed(&self, index: usize) {
        let mut c = self.current.lock();
        if c.index == index {
            c.channel = None;
            c.index = (index + 1) % self.endpoints.len();
        }
    }

    /// A unary call with failover: on the current server, and on each other one in turn while
    /// they fail as unreachable. Each attempt is bounded by the call timeout.
    pub async fn call<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, Error>
    where
        F: FnMut(Api) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_indexed(operation, f).await.map(|(_, t)| t)
    }

    /// [`Transport::call`], also telling which server answered.
    pub async fn call_indexed<T, F, Fut>(
        &self,
        operation: &'static str,
        mut f: F,
    ) -> Result<(usize, T), Error>
    where
        F: FnMut(Api) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last_error = String::new();
        for _ in 0..self.endpoints.len() {
            let conn = match self.connect().await {
                Ok(c) => c,
                Err(Error::Unavailable { last_error, .. }) => {
                    return Err(Error::Unavailable {
                        operation,
                        last_error,
                    })
                }
                Err(e) => return Err(e),
            };
            match tokio::time::timeout(self.call_timeout, f(conn.client())).await {
                Ok(Ok(resp)) => return Ok((conn.index, resp.into_inner())),
                Ok(Err(status)) if is_failover(&status) => {
                    tracing::debug!(server = %self.address(conn.index), operation, %status, "call failed; trying the next server");
                    last_error = format!("{}: {status}", self.address(conn.index));
                    self.failed(conn.index);
                }
                Ok(Err(status)) => {
                    return Err(Error::Rejected {
                        operation,
                        code: status.code(),
                        message: status.message().to_string(),
                    })
                }
                Err(_) => {
                    tracing::debug!(server = %self.address(conn.index), operation, "call timed out; trying the next server");
                    last_error = format!(
                        "{}: timed out after {:?}",
                        self.address(conn.index),
                        self.call_timeout
                    );
                    self.failed(conn.index);
                }
            }
        }
        Err(Error::Unavailable {
            operation,
            last_error,
        })
    }

    /// A request carrying the call timeout as its gRPC deadline, so the server gives up too.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.call_timeout);
        r
    }
}

/// Exponential backoff with jitter: each delay is drawn from [cap/2, cap), cap doubling from
/// `min` up to `max`, so many clients that lost the same server do not return in lock-step.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
    rng: XorShift,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            cap: min,
            rng: XorShift::from_clock(),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = (self.cap * 2).min(self.max);
        let half = cap / 2;
        half + self.rng.duration_below(cap - half)
    }

    pub fn reset(&mut self) {
        self.cap = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let d: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] < Duration::from_millis(100));
        assert!(d[1] >= Duration::from_millis(100) && d[1] < Duration::from_millis(200));
        for x in &d[3..] {
            assert!(*x >= Duration::from_millis(400) && *x < Duration::from_millis(800));
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
    }

    #[test]
    fn no_servers_and_bad_addresses_are_refused() {
        let stats = Arc::new(Counters::default());
        let t = Duration::from_secs(1);
        assert!(matches!(
            Transport::new(&[], &Default::default(), t, t, stats.clone()),
            Err(Error::NoServers)
        ));
        assert!(matches!(
            Transport::new(&["not a uri\n".into()], &Default::default(), t, t, stats),
            Err(Error::InvalidAddress { .. })
        ));
    }
}
