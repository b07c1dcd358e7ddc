//! Admission: what a node lets in before any work is done for it — request rates per source
//! address and per token (token buckets), the number of requests in flight, the number of open
//! connections, and write shedding when the writer's queue is deep. Adapters do not call the
//! pieces: every request runs through [`crate::Registry::admitted`] (the same call that sets the
//! request's actor for the audit log), every accepted connection holds a
//! [`ConnectionPermit`], and the writer's queue is checked in `Registry::apply`, so an adapter
//! cannot forget a limit. Every refusal is counted in `sextant_refusals_total{reason,protocol}`.
//!
//! Heartbeats renew leases in memory without the writer, so shedding writes never stops them;
//! writes the node makes on its own (lease expiries, health-check flips) carry no actor and
//! are never shed.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::acl::Actor;
use crate::metrics::{CoreMetrics, RefusalLabels};
use crate::CoreError;

/// The limits, all per node. `0` turns a limit off. The defaults are far above what a normal
/// deployment sends (a heartbeat per instance every few seconds): they stop a runaway client,
/// not a busy one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Requests per second from one source IP address (burst: one second's worth).
    pub rate_per_source: u32,
    /// Requests per second made with one token (burst: one second's worth).
    pub rate_per_token: u32,
    /// Requests being handled at once, blocking queries included (a watch stream counts only
    /// while it is being set up).
    pub max_requests: usize,
    /// Open TCP connections over all listeners.
    pub max_connections: usize,
    /// Writes waiting for the writer beyond which new writes from clients are refused with
    /// 503 + `Retry-After` instead of queueing (latency would grow with the queue).
    pub shed_write_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate_per_source: 50_000,
            rate_per_token: 50_000,
            max_requests: 100_000,
            max_connections: 100_000,
            shed_write_queue: 2048,
        }
    }
}

/// What a refused client is told to wait before trying again when nothing more precise is
/// known (a full queue or too many requests at once).
pub const RETRY_AFTER_BUSY: Duration = Duration::from_secs(1);

/// Keeps a connection counted as open; dropped with the connection.
#[derive(Debug)]
pub struct ConnectionPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Keeps a request counted as in flight; dropped when the request is answered.
#[derive(Debug)]
pub(crate) struct RequestPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

pub(crate) struct Admission {
    limits: Limits,
    per_source: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_token: Option<DefaultKeyedRateLimiter<String>>,
    requests: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    metrics: CoreMetrics,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(per_second: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_second).map(|n| RateLimiter::keyed(Quota::per_second(n)))
}

/// A semaphore with `n` permits, or `None`-like behaviour (never empty) for `0`.
fn capacity(n: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(if n == 0 {
        Semaphore::MAX_PERMITS
    } else {
        n.min(Semaphore::MAX_PERMITS)
    }))
}

impl Admission {
    pub fn new(limits: Limits, metrics: CoreMetrics) -> Self {
        Self {
            per_source: limiter(limits.rate_per_source),
            per_token: limiter(limits.rate_per_token),
            requests: capacity(limits.max_requests),
            connections: capacity(limits.max_connections),
            limits,
            metrics,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn refused(&self, reason: &'static str, protocol: &str) {
        self.metrics
            .refusals
            .get_or_create(&RefusalLabels {
                reason,
                protocol: protocol.to_string(),
            })
            .inc();
    }

    /// The rate limits for one request: its source address first (a flood of bad tokens from
    /// one address is still that address's flood), then its token.
    pub fn check_rates(&self, actor: &Actor) -> Result<(), CoreError> {
        if let (Some(l), Some(ip)) = (&self.per_source, source_ip(&actor.source)) {
            if let Err(not_until) = l.check_key(&ip) {
                self.refused("rate_per_source", &actor.protocol);
                return Err(CoreError::RateLimited {
                    what: format!(
                        "requests from {ip} (limit {} per second)",
                        self.limits.rate_per_source
                    ),
                    retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                });
            }
        }
        if let (Some(l), Some(token)) = (&self.per_token, &actor.token_id) {
            if let Err(not_until) = l.check_key(token) {
                self.refused("rate_per_token", &actor.protocol);
                return Err(CoreError::RateLimited {
                    what: format!(
                        "requests with token {token} (limit {} per second)",
                        self.limits.rate_per_token
                    ),
                    retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                });
            }
        }
        Ok(())
    }

    /// A place among the requests in flight, or a 503 when there is none.
    pub fn request(&self, protocol: &str) -> Result<RequestPermit, CoreError> {
        if self.limits.max_requests == 0 {
            return Ok(RequestPermit { _permit: None });
        }
        match self.requests.clone().try_acquire_owned() {
            Ok(p) => Ok(RequestPermit { _permit: Some(p) }),
            Err(_) => {
                self.refused("max_requests", protocol);
                Err(CoreError::Overloaded(format!(
                    "{} requests are in flight on this node (max_requests); retry shortly",
                    self.limits.max_requests
                )))
            }
        }
    }

    /// A place among the open connections, or `None` (the caller closes the connection).
    pub fn connection(&self, listener: &'static str) -> Option<ConnectionPermit> {
        if self.limits.max_connections == 0 {
            return Some(ConnectionPermit { _permit: None });
        }
        match self.connections.clone().try_acquire_owned() {
            Ok(p) => Some(ConnectionPermit { _permit: Some(p) }),
            Err(_) => {
                self.refused("max_connections", listener);
                None
            }
        }
    }

    /// Requests in flight and connections open, for the gauges.
    pub fn in_use(&self) -> (usize, usize) {
        let used = |s: &Semaphore, max: usize| {
            if max == 0 {
                Semaphore::MAX_PERMITS - s.available_permits()
            } else {
                max.min(Semaphore::MAX_PERMITS) - s.available_permits()
            }
        };
        (
            used(&self.requests, self.limits.max_requests),
            used(&self.connections, self.limits.max_connections),
        )
    }

    /// Whether a client write must be shed, given how many writes wait for the writer.
    pub fn shed(&self, queued: usize, protocol: &str) -> Result<(), CoreError> {
        let max = self.limits.shed_write_queue;
        if max != 0 && queued >= max {
            self.refused("shed_write", protocol);
            return Err(CoreError::Overloaded(format!(
                "the writer has {queued} writes queued (shed_write_queue = {max}); retry shortly \
                 — heartbeats and reads are still served"
            )));
        }
        Ok(())
    }

    /// Forgets buckets that are full again, so one-off sources and tokens do not stay in
    /// memory (called from the registry's periodic sweep).
    pub fn forget_idle(&self) {
        if let Some(l) = &self.per_source {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_token {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// The IP address of an actor's source (`ip:port`, `[v6]:port` or a bare address); `None` for
/// a source that is not an address (an internal caller), which no per-source limit applies to.
fn source_ip(source: &str) -> Option<IpAddr> {
    if let Ok(sa) = source.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    source.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(source: &str, token: Option<&str>) -> Actor {
        Actor {
            token_id: token.map(Into::into),
            source: source.into(),
            protocol: "test".into(),
        }
    }

    fn admission(limits: Limits) -> Admission {
        Admission::new(limits, CoreMetrics::default())
    }

    #[test]
    fn source_addresses_parse() {
        assert_eq!(source_ip("10.0.0.1:80"), "10.0.0.1".parse().ok());
        assert_eq!(source_ip("[::1]:80"), "::1".parse().ok());
        assert_eq!(source_ip("10.0.0.2"), "10.0.0.2".parse().ok());
        assert_eq!(source_ip(""), None);
        assert_eq!(source_ip("health"), None);
    }

    #[test]
    fn one_token_is_limited_while_another_passes() {
        let a = admission(Limits {
            rate_per_token: 5,
            rate_per_source: 0,
            ..Limits::default()
        });
        let flood = actor("127.0.0.1:1", Some("t1"));
        let passed = (0..20).filter(|_| a.check_rates(&flood).is_ok()).count();
        assert_eq!(passed, 5, "the burst is one second's worth");
        match a.check_rates(&flood) {
            Err(e @ CoreError::RateLimited { .. }) => {
                assert_eq!(e.kind(), crate::ErrorKind::RateLimited);
                let wait = e.retry_after().unwrap_or_default();
                assert!(
                    wait > Duration::ZERO && wait <= Duration::from_secs(1),
                    "{wait:?}"
                );
                assert!(e.to_string().contains("token t1"), "{e}");
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        // Same source, another token: unaffected; no token at all: no per-token limit.
        assert!(a.check_rates(&actor("127.0.0.1:1", Some("t2"))).is_ok());
        assert!(a.check_rates(&actor("127.0.0.1:1", None)).is_ok());
    }

    #[test]
    fn one_source_is_limited_while_another_passes() {
        let a = admission(Limits {
            rate_per_source: 3,
            ..Limits::default()
        });
        // The port does not matter: one address, one bucket.
        let passed = (0..10)
            .filter(|i| {
                a.check_rates(&actor(&format!("10.0.0.1:{i}"), None))
                    .is_ok()
            })
            .count();
        assert_eq!(passed, 3);
        assert!(a.check_rates(&actor("10.0.0.2:1", None)).is_ok());
        // Internal callers have no address and no limit.
        assert!((0..10).all(|_| a.check_rates(&actor("", None)).is_ok()));
    }

    #[test]
    fn requests_and_connections_are_capped_and_given_back() {
        let a = admission(Limits {
            max_requests: 2,
            max_connections: 1,
            ..Limits::default()
        });
        let r1 = a.request("test").expect("first");
        let _r2 = a.request("test").expect("second");
        assert!(matches!(a.request("test"), Err(CoreError::Overloaded(_))));
        drop(r1);
        assert!(a.request("test").is_ok());
        let c = a.connection("http").expect("first connection");
        assert!(a.connection("http").is_none());
        assert_eq!(a.in_use().1, 1);
        drop(c);
        assert!(a.connection("http").is_some());
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let a = admission(Limits {
            rate_per_source: 0,
            rate_per_token: 0,
            max_requests: 0,
            max_connections: 0,
            shed_write_queue: 0,
        });
        let who = actor("10.0.0.1:1", Some("t"));
        assert!((0..1000).all(|_| a.check_rates(&who).is_ok()));
        let held: Vec<_> = (0..1000).filter_map(|_| a.request("t").ok()).collect();
        assert_eq!(held.len(), 1000);
        assert!(a.shed(1_000_000, "t").is_ok());
    }

    #[test]
    fn writes_are_shed_at_the_queue_depth() {
        let a = admission(Limits {
            shed_write_queue: 4,
            ..Limits::default()
        });
        assert!(a.shed(3, "http").is_ok());
        let e = a.shed(4, "http").expect_err("shed");
        assert_eq!(e.kind(), crate::ErrorKind::Unavailable);
        assert_eq!(e.retry_after(), Some(RETRY_AFTER_BUSY));
    }
}
