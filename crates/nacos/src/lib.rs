//! Sextant's Nacos adapter: existing Nacos clients register, discover and subscribe against
//! Sextant with only an address change.
//!
//! It speaks the Nacos 1.x HTTP Open API for naming ([`http`]) and the Nacos 2.x gRPC protocol
//! ([`grpc`]: `Request` / `BiRequestStream` with JSON bodies in a `Payload` envelope) and
//! translates both to the registry core ([`mapping`] holds every rule). It owns no registry
//! state of its own, only what is bound to a live gRPC connection: which ephemeral instances the
//! connection registered (their leases are renewed while it lives, so they lapse a short grace
//! after it drops) and which services it subscribed to (pushed through the core's own fan-out),
//! and the 1.x clients that asked for UDP push (`udp`, remembered while they keep polling).
//!
//! This file owns what both protocol halves share: the settings, the error type and its class
//! (through the core's [`ErrorKind`] table), the [`Adapter`] state handed to every handler, the
//! cache of encoded answers and the one JSON encoder that counts its failures.
#![forbid(unsafe_code)]

pub mod grpc;
pub mod http;
pub mod mapping;
mod metrics;
mod udp;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use sextant_core::model::{Revision, ServiceKey};

use sextant_core::{CoreError, ErrorKind, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use metrics::NacosMetrics;

/// Settings of the adapter.
#[derive(Debug, Clone)]
pub struct NacosConfig {
    /// How long a gRPC client's ephemeral instances outlive its connection; also their lease.
    pub connection_grace: Duration,
    /// Lease of ephemeral instances registered over HTTP, renewed by beats (Nacos' 15 s
    /// heart-beat timeout).
    pub http_beat_timeout: Duration,
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// Whether the health scanner runs (what `/operator/switches` reports as
    /// `healthCheckEnabled`).
    pub health_checks: bool,
    /// Push changes to 1.x clients over UDP from a socket on this address (the Nacos
    /// listener's); `None` leaves them to polling.
    pub udp_push: Option<std::net::IpAddr>,
}

impl Default for NacosConfig {
    fn default() -> Self {
        Self {
            connection_grace: Duration::from_secs(5),
            http_beat_timeout: Duration::from_secs(15),
            max_body_bytes: 4 * 1024 * 1024,
            health_checks: true,
            udp_push: None,
        }
    }
}

/// A Nacos request that cannot be served. Its class ([`NacosError::kind`], the core's table)
/// gives the HTTP status (1.x) and the `errorCode` of a gRPC response (2.x).
#[derive(Debug, thiserror::Error)]
pub enum NacosError {
    #[error("Param '{0}' is required")]
    Missing(&'static str),
    #[error("Param '{field}' is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    /// Nacos answers "already exists" / "not empty" with 400, not 409.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Core(#[from] CoreError),
    /// No or a bad `accessToken` (401), or one without the right (403).
    #[error(transparent)]
    Auth(#[from] sextant_core::AuthError),
    /// An answer that could not be encoded: a bug, answered 500 rather than an empty body.
    #[error("could not encode the answer: {0}")]
    Encode(#[source] serde_json::Error),
}

impl NacosError {
    pub fn missing(field: &'static str) -> Self {
        NacosError::Missing(field)
    }

    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        NacosError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The class of the error, which fixes its status, Nacos code and metrics label.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NacosError::Missing(_) | NacosError::Invalid { .. } | NacosError::Conflict(_) => {
                ErrorKind::Invalid
            }
            NacosError::NotFound(_) => ErrorKind::NotFound,
            NacosError::Unsupported(_) => ErrorKind::Unsupported,
            NacosError::Core(e) => e.kind(),
            NacosError::Auth(e) => e.kind(),
            NacosError::Encode(_) => ErrorKind::Internal,
        }
    }
}

/// HTTP/2 keepalive the node's Nacos gRPC listener uses: dead peers (a killed client's host, a
/// partition) are found without waiting on TCP, and their ephemeral instances go.
pub const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The listening adapter.
pub struct NacosServer {
    http: JoinHandle<()>,
    grpc: JoinHandle<()>,
}

impl NacosServer {
    /// Hands the 2.x gRPC services to `serve_grpc` and the 1.x HTTP API's router to
    /// `serve_http`, which serve them (on the node's listeners, with its limits and TLS) until
    /// `stop` turns true.
    pub fn start(
        registry: Registry,
        config: NacosConfig,
        metrics: NacosMetrics,
        serve_http: impl FnOnce(axum::Router) -> JoinHandle<()>,
        serve_grpc: impl FnOnce(tonic::service::Routes) -> JoinHandle<()>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let udp = config.udp_push.and_then(|ip| match udp::UdpPush::bind(ip) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(%ip, error = %e, "no UDP socket for Nacos 1.x push; 1.x clients will poll");
                None
            }
        });
        let adapter = Arc::new(Adapter {
            registry,
            config,
            metrics,
            infos: InfoCache::default(),
            cpu: http::operator::host::CpuMeter::new(),
            udp,
        });
        udp::UdpPush::start(&adapter);
        let http = serve_http(http::router(adapter.clone()));
        let grpc = serve_grpc(grpc::routes(adapter, stop));
        Self { http, grpc }
    }

    /// Waits for both listeners to finish after `stop`.
    pub async fn stopped(self) {
        let _ = self.http.await;
        let _ = self.grpc.await;
    }
}

/// The adapter's state, handed to every handler of both protocol halves.
pub(crate) struct Adapter {
    pub registry: Registry,
    pub config: NacosConfig,
    pub metrics: NacosMetrics,
    pub infos: InfoCache,
    /// The host's CPU use for `/operator/metrics`, measured between its calls.
    pub cpu: http::operator::host::CpuMeter,
    /// Nacos 1.x UDP push, when on.
    pub udp: Option<udp::UdpPush>,
}

impl Adapter {
    /// The beat timeout persistent instances report, in ms (the configured HTTP one).
    pub(crate) fn beat_timeout_ms(&self) -> u64 {
        u64::try_from(self.config.http_beat_timeout.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Most encodings kept; past it the cache starts over (entries are rebuilt on demand).
const INFO_CACHE_ENTRIES: usize = 16_384;

/// Encoded `ServiceInfo` answers, per service and way of building them, at the revision they
/// show: a list query or a push is encoded once per change, however many clients ask (Nacos
/// caches its push data the same way). `lastRefTime` is the time of encoding.
#[derive(Default)]
pub(crate) struct InfoCache {
    map: Mutex<HashMap<(ServiceKey, mapping::InfoVariant), (Revision, Bytes)>>,
}

impl InfoCache {
    /// The encoded `ServiceInfo` of `key` built as `opts` says, from the cache while the
    /// service has not changed.
    pub fn get(
        &self,
        registry: &Registry,
        metrics: &NacosMetrics,
        key: &ServiceKey,
        opts: &mapping::InfoOptions,
    ) -> Result<Bytes, NacosError> {
        let variant = opts.variant();
        let rev = registry.service_revision(key);
        let cache_key = (key.clone(), variant);
        if let Some((r, bytes)) = self.map.lock().get(&cache_key) {
            if *r == rev {
                return Ok(bytes.clone());
            }
        }
        let view = registry.get(key, false);
        let opts = mapping::InfoOptions {
            now_ms: now_ms(),
            ..opts.clone()
        };
        let bytes = Bytes::from(encode_json(
            metrics,
            "ServiceInfo",
            &mapping::service_info(&view, &opts),
        )?);
        let mut map = self.map.lock();
        if map.len() >= INFO_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(cache_key, (view.revision, bytes.clone()));
        Ok(bytes)
    }
}

/// Encodes an answer. A failure is a bug (every answer is built from strings and numbers), so
/// it is logged and counted (`sextant_nacos_encode_failures`) and answered as a 500-class
/// error — never sent as an empty body.
pub(crate) fn encode_json<T: serde::Serialize + ?Sized>(
    metrics: &NacosMetrics,
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, NacosError> {
    serde_json::to_vec(value).map_err(|e| {
        metrics.encode_failures.inc();
        tracing::error!(what, error = %e, "could not encode a Nacos answer");
        NacosError::Encode(e)
    })
}

/// Nacos health-checks persistent instances on the server (TCP by default). When a Nacos client
/// registers one into a service that has no check yet, Sextant's scanner gets a TCP check for
/// the service (logged); a check set natively or by an operator is left alone, whatever its
/// kind. README and ARCHITECTURE (Nacos sections) say so.
pub(crate) async fn ensure_checked(
    registry: &Registry,
    key: &sextant_core::model::ServiceKey,
) -> Result<(), NacosError> {
    use sextant_core::model::{CheckKind, HealthCheck};
    // Cheap read first: nearly always the service has its check already.
    if registry.service_config(key).check.kind != CheckKind::None {
        return Ok(());
    }
    // Decided by the writer against the latest state, so a check set in between (natively or
    // by an operator) is kept, and so are the service's other settings.
    let tcp = HealthCheck {
        kind: CheckKind::Tcp,
        ..HealthCheck::default()
    };
    if registry.default_check(key.clone(), tcp).await? > 0 {
        tracing::info!(service = %key, "persistent Nacos instance registered: service gets a TCP health check");
    }
    Ok(())
}

/// Commits `ops` in one batch; removing what is already gone is not an error in Nacos.
pub(crate) async fn commit_ignoring_missing(
    registry: &Registry,
    ops: Vec<sextant_core::Op>,
) -> Result<(), NacosError> {
    for r in registry.apply(ops).await? {
        match r {
            Ok(_) | Err(CoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(crate) use sextant_core::model::now_ms;

/// Seconds of a lease, at least one.
pub(crate) fn lease_seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)
}

/// An adapter on an in-memory registry, for unit tests of the handlers.
#[cfg(test)]
pub(crate) async fn test_adapter() -> Arc<Adapter> {
    let registry = Registry::open(
        Arc::new(sextant_core::MemStore::new()),
        sextant_core::CoreConfig::default(),
        sextant_core::CoreMetrics::default(),
    )
    .await
    .expect("an in-memory registry opens");
    Arc::new(Adapter {
        registry,
        config: NacosConfig::default(),
        metrics: NacosMetrics::default(),
        infos: InfoCache::default(),
        cpu: http::operator::host::CpuMeter::new(),
        udp: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sextant_core::model::{InstanceSpec, Location, Registration};
    use sextant_core::{CoreConfig, CoreMetrics, MemStore};

    fn reg(key: &ServiceKey, port: u16) -> Registration {
        Registration {
            service: key.clone(),
            spec: InstanceSpec {
                id: format!("10.0.0.1:{port}").into(),
                host: "10.0.0.1".into(),
                port,
                protocol: "tcp".into(),
                version: Default::default(),
                location: Location::default(),
                cell: Default::default(),
                lane: Default::default(),
                metadata: Default::default(),
            },
            status: None,
            ttl_seconds: 0,
        }
    }

    #[tokio::test]
    async fn info_cache_reencodes_only_after_a_change() {
        let registry = Registry::open(
            Arc::new(MemStore::new()),
            CoreConfig::default(),
            CoreMetrics::default(),
        )
        .await
        .unwrap();
        let key = ServiceKey::new("public", "orders").unwrap();
        let cache = InfoCache::default();
        let opts = mapping::InfoOptions {
            grouped_name: true,
            ..Default::default()
        };
        registry.register(reg(&key, 80)).await.unwrap();
        let m = NacosMetrics::default();
        let a = cache.get(&registry, &m, &key, &opts).unwrap();
        let b = cache.get(&registry, &m, &key, &opts).unwrap();
        // Same allocation: the second answer was not encoded again.
        assert_eq!(a.as_ptr(), b.as_ptr());
        let other = mapping::InfoOptions {
            healthy_only: true,
            ..opts.clone()
        };
        assert_ne!(
            cache.get(&registry, &m, &key, &other).unwrap().as_ptr(),
            a.as_ptr()
        );
        registry.register(reg(&key, 81)).await.unwrap();
        let c = cache.get(&registry, &m, &key, &opts).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(v["hosts"].as_array().unwrap().len(), 2);
        assert_eq!(v["name"], "DEFAULT_GROUP@@orders");
    }

    /// An answer that fails to encode is an error of class `Internal` (a 500, Nacos code 500),
    /// counted, never an empty body.
    #[test]
    fn encode_failures_are_errors_and_counted() {
        struct Unencodable;
        impl serde::Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("refused"))
            }
        }
        let m = NacosMetrics::default();
        let e = encode_json(&m, "test", &Unencodable).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(e.kind().http_status(), 500);
        assert_eq!(m.encode_failures.get(), 1);
        use axum::response::IntoResponse;
        assert_eq!(e.into_response().status().as_u16(), 500);
        let ok = encode_json(&m, "test", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(ok, br#"{"a":1}"#);
    }
}
