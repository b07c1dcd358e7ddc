//! Sextant's Nacos adapter: existing Nacos clients register, discover and subscribe against
//! Sextant with only an address change.
//!
//! It speaks the Nacos 1.x HTTP Open API for naming ([`http`]) and the Nacos 2.x gRPC protocol
//! ([`grpc`]: `Request` / `BiRequestStream` with JSON bodies in a `Payload` envelope) and
//! translates both to the registry core ([`mapping`] holds every rule). It owns no registry
//! state of its own, only what is bound to a live gRPC connection: which ephemeral instances the
//! connection registered (their leases are renewed while it lives, so they lapse a short grace
//! after it drops) and which services it subscribed to (pushed through the core's own fan-out).
#![forbid(unsafe_code)]

pub mod grpc;
pub mod http;
pub mod mapping;
mod metrics;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use sextant_core::model::{Revision, ServiceKey};

use sextant_core::{CoreError, Registry};
use tokio::net::TcpListener;
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
}

impl Default for NacosConfig {
    fn default() -> Self {
        Self {
            connection_grace: Duration::from_secs(5),
            http_beat_timeout: Duration::from_secs(15),
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// A Nacos request that cannot be served. Each maps to one HTTP status (1.x) and one error
/// code in a gRPC response (2.x).
#[derive(Debug, thiserror::Error)]
pub enum NacosError {
    #[error("Param '{0}' is required")]
    Missing(&'static str),
    #[error("Param '{field}' is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Core(#[from] CoreError),
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

    /// The HTTP status of the 1.x API; also the `errorCode` of a 2.x response.
    pub fn status(&self) -> u16 {
        match self {
            NacosError::Missing(_) | NacosError::Invalid { .. } | NacosError::Conflict(_) => 400,
            NacosError::NotFound(_) => 404,
            NacosError::Unsupported(_) => 501,
            NacosError::Core(e) => match e {
                CoreError::Invalid(_) => 400,
                CoreError::NotFound(_) => 404,
                CoreError::Store(_) | CoreError::ShuttingDown => 503,
            },
        }
    }

    /// Outcome label for metrics.
    pub fn label(&self) -> &'static str {
        match self.status() {
            400 => "invalid",
            404 => "not_found",
            501 => "unsupported",
            _ => "unavailable",
        }
    }
}

/// The listening adapter.
pub struct NacosServer {
    http: JoinHandle<()>,
    grpc: JoinHandle<()>,
}

impl NacosServer {
    /// Serves the 2.x gRPC protocol on `grpc` until `stop` turns true, and hands the 1.x HTTP
    /// API's router to `serve_http`, which serves it (with the node's HTTP limits) until then.
    pub fn start(
        registry: Registry,
        config: NacosConfig,
        metrics: NacosMetrics,
        serve_http: impl FnOnce(axum::Router) -> JoinHandle<()>,
        grpc: TcpListener,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let shared = Arc::new(Shared {
            registry,
            config,
            metrics,
            infos: InfoCache::default(),
        });
        let http = serve_http(http::router(shared.clone()));
        let grpc = tokio::spawn(grpc::serve(shared, grpc, stop));
        Self { http, grpc }
    }

    /// Waits for both listeners to finish after `stop`.
    pub async fn stopped(self) {
        let _ = self.http.await;
        let _ = self.grpc.await;
    }
}

/// What both protocol halves share.
pub(crate) struct Shared {
    pub registry: Registry,
    pub config: NacosConfig,
    pub metrics: NacosMetrics,
    pub infos: InfoCache,
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
    pub fn get(&self, registry: &Registry, key: &ServiceKey, opts: &mapping::InfoOptions) -> Bytes {
        let variant = opts.variant();
        let rev = registry.service_revision(key);
        let cache_key = (key.clone(), variant);
        if let Some((r, bytes)) = self.map.lock().get(&cache_key) {
            if *r == rev {
                return bytes.clone();
            }
        }
        let view = registry.get(key, false);
        let opts = mapping::InfoOptions {
            now_ms: now_ms(),
            ..opts.clone()
        };
        let bytes = Bytes::from(
            serde_json::to_vec(&mapping::service_info(&view, &opts)).unwrap_or_default(),
        );
        let mut map = self.map.lock();
        if map.len() >= INFO_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(cache_key, (view.revision, bytes.clone()));
        bytes
    }
}

/// Nacos health-checks persistent instances on the server (TCP by default). When a Nacos client
/// registers one into a service that has no check yet, Sextant's scanner gets a TCP check for
/// the service; a check set natively or by an operator is left alone.
pub(crate) async fn ensure_checked(
    registry: &Registry,
    key: &sextant_core::model::ServiceKey,
) -> Result<(), NacosError> {
    use sextant_core::model::{CheckKind, HealthCheck};
    let mut config = registry.service_config(key);
    if config.check.kind != CheckKind::None {
        return Ok(());
    }
    config.check = HealthCheck {
        kind: CheckKind::Tcp,
        ..HealthCheck::default()
    };
    registry.configure(key.clone(), config).await?;
    tracing::info!(service = %key, "persistent Nacos instance registered: service gets a TCP health check");
    Ok(())
}

/// Applies `ops` in one commit; removing what is already gone is not an error in Nacos.
pub(crate) async fn apply(
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

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Seconds of a lease, at least one.
pub(crate) fn lease_seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)
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
        let a = cache.get(&registry, &key, &opts);
        let b = cache.get(&registry, &key, &opts);
        // Same allocation: the second answer was not encoded again.
        assert_eq!(a.as_ptr(), b.as_ptr());
        let other = mapping::InfoOptions {
            healthy_only: true,
            ..opts.clone()
        };
        assert_ne!(cache.get(&registry, &key, &other).as_ptr(), a.as_ptr());
        registry.register(reg(&key, 81)).await.unwrap();
        let c = cache.get(&registry, &key, &opts);
        let v: serde_json::Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(v["hosts"].as_array().unwrap().len(), 2);
        assert_eq!(v["name"], "DEFAULT_GROUP@@orders");
    }
}
