//! A Sextant control node: opens the store, loads the registry, serves the native HTTP/JSON and
//! gRPC APIs (and the Nacos adapter's listeners), and shuts down in order (stop accepting, commit what is queued, close streams with
//! a reason, close the store).
#![forbid(unsafe_code)]

mod cluster;
pub mod config;
mod error;
mod grpc;
mod http;
mod metrics;
mod peer;
mod stream;
pub mod tls;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sextant_consul::{Consul, ConsulConfig, ConsulMetrics};
/// A registry's snapshot, for the CLI's `snapshot save` / `restore`.
pub use sextant_core::Snapshot;
use sextant_core::{
    CoreConfig, CoreError, CoreMetrics, MemStore, Registry, SnapshotError, Store, StoreError,
};
use sextant_dns::{DnsConfig, DnsMetrics, DnsServer};
use sextant_eureka::{Eureka, EurekaMetrics};
use sextant_health::{HealthMetrics, Scanner, ScannerConfig};
use sextant_nacos::{NacosConfig, NacosMetrics, NacosServer};
use sextant_store_etcd::{EtcdConfig, EtcdMetrics, EtcdStore};
use sextant_store_redb::{RedbStore, StoreMetrics};
use sextant_xds::{XdsMetrics, XdsServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{ConfigError, ServerConfig, StoreKind};
pub use error::ApiError;
use http::HttpLimits;
pub use metrics::ApiMetrics;
/// The bootstrap file of proxyless gRPC clients, for the CLI.
pub use sextant_xds::bootstrap as xds_bootstrap;
pub use tls::{ConnInfo, PeerIdentity, Tls, TlsError, TlsFiles};

/// Concurrent HTTP/2 streams one gRPC connection may hold.
const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for Nacos clients on {addr} (move it with --nacos-http-addr / --nacos-grpc-addr, or turn it off with --no-nacos)")]
    NacosBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot listen for DNS on {addr} (move it with --dns-addr, or turn it off with --no-dns)"
    )]
    DnsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for Consul clients on {addr} (move it with --consul-http-addr, or turn it off with --no-consul)")]
    ConsulBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the audit log {path}")]
    AuditLog {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("node id {node_id:?} is held by a live member at {http}: give every node its own --node-id (a member that is gone frees it within {lease} s)")]
    NodeIdInUse {
        node_id: String,
        http: String,
        lease: u64,
    },
    #[error("cannot load the registry: {0}")]
    Core(#[from] CoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What the adapters share.
pub(crate) struct Node {
    pub registry: Registry,
    /// `None` when the scanner is turned off.
    pub scanner: Option<Scanner>,
    pub config: ServerConfig,
    pub api_metrics: ApiMetrics,
    pub prometheus: prometheus_client::registry::Registry,
    /// Asked by `/readyz` whether the disk takes writes.
    pub store: Arc<dyn Store>,
    /// `None` when xDS is turned off.
    pub xds: Option<XdsServer>,
    /// The Eureka REST API under `/eureka` on the native listener; `None` when turned off.
    pub eureka: Option<Eureka>,
    /// Cluster mode (`store = etcd`); `None` for a single node.
    pub cluster: Option<cluster::Cluster>,
    /// TLS of every TCP listener (`http::serve`, `tls::serve_grpc` take it); `None` when off.
    pub tls: Option<Tls>,
}

/// A running node.
pub struct Server {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    registry: Registry,
    stop: watch::Sender<bool>,
    http: JoinHandle<()>,
    grpc: JoinHandle<()>,
    nacos: Option<NacosServer>,
    dns: Option<DnsServer>,
    /// Where DNS answers (UDP and TCP), unless it is off.
    pub dns_addr: Option<SocketAddr>,
    /// Where Consul's HTTP API is served, unless it is off.
    pub consul_addr: Option<SocketAddr>,
    consul_http: Option<JoinHandle<()>>,
    grace: Duration,
}

impl Server {
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        config.check_exposure()?;
        if config.auth == config::AuthMode::Off && config.insecure_open {
            if let Some(open) = (ServerConfig {
                insecure_open: false,
                ..config.clone()
            })
            .open_listener()
            {
                tracing::warn!(listener = %open, "auth is off on a listener that is not on loopback (--insecure-open): anyone who reaches it can change the registry");
            }
        }
        let audit_sink = audit_sink(&config)?;
        let mut prometheus = prometheus_client::registry::Registry::default();
        let (store, etcd) = open_store(&config, Some(&mut prometheus)).await?;
        let core_metrics = CoreMetrics::register(&mut prometheus);
        let api_metrics = ApiMetrics::register(&mut prometheus);
        let health_metrics = HealthMetrics::register(&mut prometheus);
        let nacos_metrics = NacosMetrics::register(&mut prometheus);
        let xds_metrics = XdsMetrics::register(&mut prometheus);
        let dns_metrics = DnsMetrics::register(&mut prometheus);
        let eureka_metrics = EurekaMetrics::register(&mut prometheus);
        let consul_metrics = ConsulMetrics::register(&mut prometheus);
        // TLS loads before any listener opens: a bad file fails the start, naming it.
        let tls_metrics = tls::TlsMetrics::register(&mut prometheus);
        let tls = config
            .tls_files()
            .map(|f| Tls::load(f, tls_metrics))
            .transpose()?;
        let core_config = CoreConfig {
            event_log_per_service: config.event_log_per_service,
            vacant_retention: std::time::Duration::from_secs(config.vacant_retention_seconds),
            max_batch_ops: config.max_batch_ops,
            auth: config.auth == config::AuthMode::On,
            audit_retention: config.audit_retention,
            audit_sink,
            limits: sextant_core::Limits {
                rate_per_source: config.rate_per_source,
                rate_per_token: config.rate_per_token,
                max_requests: config.max_requests,
                max_connections: config.max_connections,
                shed_write_queue: config.shed_write_queue,
            },
            ..CoreConfig::default()
        };
        let registry = Registry::open(store.clone(), core_config, core_metrics).await?;

        let (http_listener, http_addr) = bind(config.http_addr).await?;
        let (grpc_listener, grpc_addr) = bind(config.grpc_addr).await?;
        let nacos_bind = |addr| async move {
            bind(addr).await.map_err(|e| match e {
                ServerError::Bind { addr, source } => ServerError::NacosBind { addr, source },
                other => other,
            })
        };
        let nacos_listeners = if config.nacos {
            let h = nacos_bind(config.nacos_http_addr).await?;
            let g = nacos_bind(config.nacos_grpc_addr()).await?;
            Some((h, g))
        } else {
            None
        };
        let consul_listener = if config.consul {
            let addr = config.consul_http_addr;
            Some(bind(addr).await.map_err(|e| match e {
                ServerError::Bind { addr, source } => ServerError::ConsulBind { addr, source },
                other => other,
            })?)
        } else {
            None
        };
        let dns_sockets = if config.dns {
            let addr = config.dns_addr;
            Some(
                sextant_dns::bind(addr)
                    .await
                    .map_err(|source| ServerError::DnsBind { addr, source })?,
            )
        } else {
            None
        };
        let dns_config = DnsConfig {
            ttl_seconds: config.dns_ttl_seconds,
            datacenter: config.dns_datacenter.clone(),
        };
        let nacos_config = NacosConfig {
            connection_grace: Duration::from_secs(config.nacos_connection_grace_seconds),
            max_body_bytes: config.max_body_bytes,
            health_checks: config.health_scanner,
            udp_push: config.nacos_udp_push.then_some(config.nacos_http_addr.ip()),
            ..NacosConfig::default()
        };
        let grace = Duration::from_secs(config.shutdown_grace_seconds);
        let xds = config.xds.then(|| {
            XdsServer::new(
                registry.clone(),
                Duration::from_millis(config.xds_debounce_ms),
                xds_metrics,
            )
        });
        let eureka = config
            .eureka
            .then(|| Eureka::new(registry.clone(), eureka_metrics));
        let consul = consul_listener.map(|(listener, addr)| {
            let consul = Consul::start(
                registry.clone(),
                ConsulConfig {
                    datacenter: config.dns_datacenter.clone(),
                    node_name: node_name(),
                    addr,
                    min_deregister_after: Duration::from_secs(config.consul_deregister_min_seconds),
                    ..ConsulConfig::default()
                },
                consul_metrics,
            );
            (listener, addr, consul)
        });
        // Cluster mode: a member of the cluster on the etcd prefix; its role is settled (or
        // the wait bounded) before it serves.
        let cluster = match etcd {
            Some(store) => {
                let host = cluster::advertised_host(&config.advertise_host, http_addr);
                let node_id = cluster::node_id(&config.node_id, &host, http_addr, grpc_addr);
                let addresses = cluster::member_addresses(
                    &host,
                    http_addr,
                    grpc_addr,
                    config.tls_files().is_some(),
                );
                // One node per id: another live node's record under it is refused (this
                // node's own previous life, at the same addresses, is taken over).
                if let Some(m) = store.member(&node_id).await? {
                    if m.http != addresses.0 {
                        return Err(ServerError::NodeIdInUse {
                            node_id,
                            http: m.http,
                            lease: config.cluster_lease_seconds,
                        });
                    }
                }
                let secret = store
                    .cluster_secret(sextant_core::forward::new_cluster_secret()?)
                    .await?;
                let forwarder = peer_forwarder(&config, &node_id, &secret)?;
                if let Some(f) = &forwarder {
                    registry.forward_with(f.clone());
                    reload_peer_tls(&config, f.clone(), registry.clone());
                }
                let c = cluster::Cluster {
                    store,
                    node_id,
                    secret,
                    forwarder,
                };
                let lease = Duration::from_secs(config.cluster_lease_seconds);
                cluster::join(&c, &registry, addresses, lease, lease * 2).await;
                Some(c)
            }
            None => None,
        };
        // In a cluster whose followers forward, each node probes the services it owns (the
        // shard follows the member list); otherwise every node probes every service and only
        // the leader's flips are written.
        let shard = cluster.as_ref().filter(|c| c.forwarder.is_some()).map(|c| {
            let period = Duration::from_secs(config.cluster_lease_seconds) / 3;
            cluster::shard(c, &registry, period)
        });
        let scanner = config.health_scanner.then(|| {
            let cfg = ScannerConfig {
                concurrency: config.health_concurrency,
                mass_failure_fraction: config.health_mass_failure_fraction,
                ..ScannerConfig::default()
            };
            Scanner::start_sharded(registry.clone(), cfg, health_metrics, shard)
        });
        let node = Arc::new(Node {
            registry: registry.clone(),
            scanner,
            config,
            api_metrics,
            prometheus,
            store,
            xds,
            eureka,
            cluster,
            tls,
        });
        let (stop, stopped) = watch::channel(false);

        let limits = HttpLimits {
            max_header_bytes: node.config.max_header_bytes,
            max_headers: node.config.max_headers,
            header_read_timeout: node.config.header_read_timeout(),
        };
        let app = http::router(node.clone());
        let mut s1 = stopped.clone();
        let http = tokio::spawn(http::serve(
            http_listener,
            registry.clone(),
            app,
            limits,
            node.tls.clone(),
            async move {
                let _ = s1.wait_for(|v| *v).await;
            },
            "http",
        ));
        let xds_service = node
            .xds
            .as_ref()
            .map(|x| x.service(node.config.max_body_bytes));
        let peer_service = node
            .cluster
            .as_ref()
            .map(|c| peer::service(node.registry.clone(), c.secret.clone()));
        let tls = node.tls.clone();
        let mut routes = tonic::service::Routes::new(grpc::service(node));
        if let Some(x) = xds_service {
            routes = routes.add_service(x);
        }
        if let Some(p) = peer_service {
            routes = routes.add_service(p);
        }
        let grpc = tokio::spawn(tls::serve_grpc(
            routes,
            grpc_listener,
            registry.clone(),
            tls.clone(),
            tls::GrpcOptions {
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: None,
                // Many watch streams share one connection (an SDK holds one per client, an
                // agent multiplexes its host's); bounded so one peer cannot open millions.
                max_concurrent_streams: Some(MAX_STREAMS_PER_CONNECTION),
            },
            stopped,
            "grpc",
        ));
        let tls_shown = match &tls {
            None => "off",
            Some(t) if t.mutual() => "mutual",
            Some(_) => "on",
        };
        if let Some(t) = &tls {
            t.spawn_reloader(stop.subscribe());
        }
        let (dns, dns_addr) = match dns_sockets {
            Some((udp, tcp, addr)) => (
                Some(DnsServer::start(
                    registry.clone(),
                    dns_config,
                    dns_metrics,
                    udp,
                    tcp,
                )),
                Some(addr),
            ),
            None => (None, None),
        };
        let dns_shown = dns_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
        let mut consul_addr = None;
        let mut consul_http = None;
        if let Some((listener, addr, consul)) = consul {
            let mut s4 = stop.subscribe();
            consul_http = Some(tokio::spawn(http::serve(
                listener,
                registry.clone(),
                consul.router(),
                limits,
                tls.clone(),
                async move {
                    let _ = s4.wait_for(|v| *v).await;
                },
                "consul-http",
            )));
            consul_addr = Some(addr);
        }
        let consul_shown = consul_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
        let mut nacos = None;
        if let Some(((h, nacos_http_addr), (g, nacos_grpc_addr))) = nacos_listeners {
            tracing::info!(%http_addr, %grpc_addr, %nacos_http_addr, %nacos_grpc_addr, dns_addr = %dns_shown, consul_http_addr = %consul_shown, tls = tls_shown, "sextant serving");
            let mut s3 = stop.subscribe();
            // The Nacos listeners are served like the native ones, with the same limits and TLS.
            let nacos_tls = tls.clone();
            let (r1, r2) = (registry.clone(), registry.clone());
            let serve_http = move |app| {
                tokio::spawn(http::serve(
                    h,
                    r1,
                    app,
                    limits,
                    nacos_tls,
                    async move {
                        let _ = s3.wait_for(|v| *v).await;
                    },
                    "nacos-http",
                ))
            };
            let s4 = stop.subscribe();
            let serve_grpc = move |routes| {
                tokio::spawn(tls::serve_grpc(
                    routes,
                    g,
                    r2,
                    tls,
                    tls::GrpcOptions {
                        keepalive_interval: sextant_nacos::GRPC_KEEPALIVE_INTERVAL,
                        keepalive_timeout: Some(sextant_nacos::GRPC_KEEPALIVE_TIMEOUT),
                        max_concurrent_streams: None,
                    },
                    s4,
                    "nacos-grpc",
                ))
            };
            nacos = Some(NacosServer::start(
                registry.clone(),
                nacos_config,
                nacos_metrics,
                serve_http,
                serve_grpc,
                stop.subscribe(),
            ));
        }
        if nacos.is_none() {
            tracing::info!(%http_addr, %grpc_addr, nacos = "off", dns_addr = %dns_shown, consul_http_addr = %consul_shown, tls = tls_shown, "sextant serving");
        }
        Ok(Server {
            http_addr,
            grpc_addr,
            registry,
            stop,
            http,
            grpc,
            nacos,
            dns,
            dns_addr,
            consul_addr,
            consul_http,
            grace,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Graceful shutdown: stop accepting, commit queued writes and close the store, end every
    /// watch stream with a reason, then wait (bounded) for connections to drain.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        let _ = self.stop.send(true);
        if let Some(d) = self.dns {
            d.shutdown().await;
        }
        self.registry.shutdown("server shutting down").await;
        let drain = async {
            let _ = self.http.await;
            let _ = self.grpc.await;
            if let Some(n) = self.nacos {
                n.stopped().await;
            }
            if let Some(c) = self.consul_http {
                let _ = c.await;
            }
        };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "connections still open after the grace period; closing");
        }
        tracing::info!("stopped");
    }
}

/// Opens the store `config` names (registering the embedded or etcd store's metrics when given
/// a metrics registry); for etcd, also the etcd store itself, which cluster mode needs.
async fn open_store(
    config: &ServerConfig,
    prometheus: Option<&mut prometheus_client::registry::Registry>,
) -> Result<(Arc<dyn Store>, Option<Arc<EtcdStore>>), ServerError> {
    Ok(match config.store {
        StoreKind::Embedded => {
            let metrics = match prometheus {
                Some(p) => StoreMetrics::register(p),
                None => StoreMetrics::default(),
            };
            let s = Arc::new(RedbStore::open_with_metrics(&config.data_dir, metrics)?);
            (s, None)
        }
        StoreKind::Memory => (Arc::new(MemStore::new()), None),
        // An etcd that does not answer fails the start (naming the endpoints): a
        // supervisor's restart policy retries, and a typo does not look like a slow etcd.
        StoreKind::Etcd => {
            let metrics = match prometheus {
                Some(p) => EtcdMetrics::register(p),
                None => EtcdMetrics::default(),
            };
            let s = Arc::new(
                EtcdStore::open_with_metrics(
                    EtcdConfig {
                        endpoints: config.etcd_endpoints(),
                        prefix: config.etcd_prefix.clone(),
                        ..EtcdConfig::default()
                    },
                    metrics,
                )
                .await?,
            );
            (s.clone(), Some(s))
        }
    })
}

/// How this node forwards to the leader while it follows. With TLS on it must verify the
/// leader's certificate: with `cluster_peer_ca` (else `tls_client_ca`), presenting its own
/// certificate when clients must (mTLS); with neither, it does not forward (`None`, logged):
/// followers answer writes and heartbeats with a 503 naming the leader. The files are read
/// again when they change ([`reload_peer_tls`]), as the listeners' are.
fn peer_forwarder(
    config: &ServerConfig,
    node_id: &str,
    secret: &str,
) -> Result<Option<Arc<peer::PeerForwarder>>, ServerError> {
    let tls = match peer_tls_files(config) {
        PeerTlsFiles::Plain => None,
        PeerTlsFiles::Unverifiable => {
            tracing::warn!("TLS is on and neither cluster_peer_ca nor tls_client_ca is set: followers cannot verify the leader, so they do not forward writes and heartbeats (they answer 503 naming the leader)");
            return Ok(None);
        }
        PeerTlsFiles::Files { ca, identity } => {
            let t = read_peer_tls(&ca, identity.as_ref())?;
            if let Some((cert, _)) = &t.identity {
                if tls::allows_client_auth(cert) == Some(false) {
                    tracing::warn!(cert = %identity.as_ref().map(|i| i.0.display().to_string()).unwrap_or_default(), "under mTLS a follower presents this node's certificate to the leader, and it lacks the clientAuth extended key usage: the leader will refuse it, so followers cannot forward writes and heartbeats (they answer 503 naming the leader); issue node certificates for both serverAuth and clientAuth");
                }
            }
            Some(t)
        }
    };
    let f = peer::PeerForwarder::new(node_id.to_string(), secret, tls)
        .map_err(|e| ServerError::Tls(TlsError::Setup(e)))?;
    Ok(Some(Arc::new(f)))
}

/// Which files a follower's TLS to the leader is made of.
enum PeerTlsFiles {
    /// TLS is off.
    Plain,
    /// TLS is on, with no CA to verify the leader.
    Unverifiable,
    /// The CA to trust, and (mTLS) this node's certificate and key.
    Files {
        ca: std::path::PathBuf,
        identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    },
}

fn peer_tls_files(config: &ServerConfig) -> PeerTlsFiles {
    let Some(files) = config.tls_files() else {
        return PeerTlsFiles::Plain;
    };
    let Some(ca) = config.cluster_peer_ca.as_ref().or(files.client_ca.as_ref()) else {
        return PeerTlsFiles::Unverifiable;
    };
    PeerTlsFiles::Files {
        ca: ca.clone(),
        identity: files.client_ca.as_ref().map(|_| (files.cert, files.key)),
    }
}

fn read_peer_tls(
    ca: &std::path::Path,
    identity: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<peer::PeerTls, TlsError> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|error| TlsError::Read {
            what,
            path: path.to_path_buf(),
            error,
        })
    };
    let identity = match identity {
        Some((cert, key)) => Some((read("certificate", cert)?, read("key", key)?)),
        None => None,
    };
    Ok(peer::PeerTls {
        ca: read("cluster peer CA", ca)?,
        identity,
    })
}

/// Reads the follower's TLS files again whenever one changes (modification time or size,
/// checked every 2 s, as the listeners' files are), so a rotated CA or node certificate is
/// used for the next connection to the leader; a set that does not load is logged and the
/// current one kept. Ends when the registry closes.
fn reload_peer_tls(config: &ServerConfig, forwarder: Arc<peer::PeerForwarder>, registry: Registry) {
    let PeerTlsFiles::Files { ca, identity } = peer_tls_files(config) else {
        return;
    };
    let stamp = move |ca: &std::path::Path,
                      id: Option<&(std::path::PathBuf, std::path::PathBuf)>| {
        let one = |p: &std::path::Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        (one(ca), id.map(|(c, k)| (one(c), one(k))))
    };
    tokio::spawn(async move {
        let mut seen = stamp(&ca, identity.as_ref());
        let closed = registry.closed();
        tokio::pin!(closed);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut closed => return,
                _ = tick.tick() => {}
            }
            let now = stamp(&ca, identity.as_ref());
            if now == seen {
                continue;
            }
            seen = now;
            match read_peer_tls(&ca, identity.as_ref()) {
                Ok(t) => match forwarder.set_tls(t) {
                    Ok(()) => {
                        tracing::info!(ca = %ca.display(), "peer TLS reloaded: the next connection to the leader uses the new files")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "peer TLS not reloaded; keeping the current files")
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "peer TLS not reloaded; keeping the current files")
                }
            }
        }
    });
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Open(#[from] ServerError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Restores `snapshot` into the (empty) store `config` names, with no node running on it:
/// `sextant snapshot restore`. Returns once the records are durable and the store is closed.
pub async fn restore_snapshot(
    config: &ServerConfig,
    snapshot: Snapshot,
) -> Result<(), RestoreError> {
    config.validate().map_err(ServerError::from)?;
    let (store, _) = open_store(config, None).await?;
    let r = sextant_core::snapshot::restore(store.clone(), snapshot).await;
    let closed = store.close().await;
    r?;
    closed.map_err(SnapshotError::from)?;
    Ok(())
}

/// This machine's host name (the Consul agent's node name), or `sextant`.
fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sextant".into())
}

/// The `audit_log` file's writer: one JSON line per audit entry, appended.
fn audit_sink(config: &ServerConfig) -> Result<Option<sextant_core::AuditSink>, ServerError> {
    use std::io::Write;
    let Some(path) = &config.audit_log else {
        return Ok(None);
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ServerError::AuditLog {
            path: path.clone(),
            source,
        })?;
    let file = parking_lot::Mutex::new(file);
    Ok(Some(sextant_core::AuditSink(Arc::new(move |e| {
        let mut line = serde_json::to_vec(e).unwrap_or_default();
        line.push(b'\n');
        if let Err(err) = file.lock().write_all(&line) {
            tracing::warn!(error = %err, "cannot append to the audit log file");
        }
    }))))
}

/// Binds a listener and reports the address it got (port 0 picks one).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    Ok((l, local))
}
