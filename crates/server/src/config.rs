//! Server configuration: one table of settings — [`ServerConfig`], whose fields carry both the
//! clap attributes (flag, `SEXTANT_*` variable, default, help) and the serde shape of the TOML
//! file — and the rule that combines them: flags and variables win over the file, the file
//! over the defaults. Unknown file keys are refused. Defaults work with no file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::{Deserialize, Serialize};

/// Where the registry is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Durable embedded store (redb) under `data_dir`. The default.
    Embedded,
    /// Nothing on disk; everything is lost on exit. For tests and demos.
    Memory,
    /// An etcd cluster at `etcd_endpoints`, keys under `etcd_prefix`.
    Etcd,
}

impl std::str::FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(StoreKind::Embedded),
            "memory" => Ok(StoreKind::Memory),
            "etcd" => Ok(StoreKind::Etcd),
            other => Err(format!(
                "unknown store {other:?}: use embedded, memory or etcd"
            )),
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Memory => "memory",
            StoreKind::Etcd => "etcd",
        })
    }
}

/// Every setting of a node. Each field is at once a TOML key (its name), a flag (`--` + the
/// name with `-` for `_`) and a variable (`SEXTANT_` + the name in capitals); a unit test
/// holds every field to that. The defaults are written once, in the clap attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the native HTTP/JSON API.
    #[arg(long, env = "SEXTANT_HTTP_ADDR", default_value = "127.0.0.1:8470")]
    pub http_addr: SocketAddr,
    /// Address of the native gRPC API.
    #[arg(long, env = "SEXTANT_GRPC_ADDR", default_value = "127.0.0.1:8471")]
    pub grpc_addr: SocketAddr,
    /// `embedded` (write-ahead log + redb under data_dir, durable), `memory` (nothing kept on
    /// exit) or `etcd` (an etcd cluster at etcd_endpoints).
    #[arg(long, env = "SEXTANT_STORE", default_value = "embedded")]
    pub store: StoreKind,
    /// Directory of the embedded store.
    #[arg(long, env = "SEXTANT_DATA_DIR", default_value = "./sextant-data")]
    pub data_dir: PathBuf,
    /// Client URLs of the etcd members, comma-separated (`http://` only), for `store = etcd`.
    #[arg(
        long,
        env = "SEXTANT_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    /// Prefix of every etcd key of this registry, for `store = etcd` (several registries can
    /// share one etcd under different prefixes).
    #[arg(long, env = "SEXTANT_ETCD_PREFIX", default_value = "/sextant/")]
    pub etcd_prefix: String,
    // Cluster mode (`store = etcd`): every node on one prefix is a member.
    /// This node's name among the cluster's members (`store = etcd`); empty: derived from the
    /// host and the HTTP and gRPC ports. Letters, digits and `.` `_` `-` `:`, at most 128.
    #[arg(long, env = "SEXTANT_NODE_ID", default_value = "")]
    pub node_id: String,
    /// The host other nodes and clients reach this node at (`store = etcd`): its member
    /// record (`/v1/cluster`, where followers forward) names `http://{host}:{http port}` and
    /// `{host}:{grpc port}`. Empty: the IP the HTTP API listens on, or the machine's name
    /// when it listens on every address. Set it when nodes run on several hosts behind
    /// addresses they do not bind (NAT, containers).
    #[arg(long, env = "SEXTANT_ADVERTISE_HOST", default_value = "")]
    pub advertise_host: String,
    /// The etcd lease of a node's membership and leadership, in seconds (`store = etcd`): a
    /// leader that dies is replaced about this long after its last renewal. 2 to 60.
    #[arg(long, env = "SEXTANT_CLUSTER_LEASE_SECONDS", default_value_t = 3)]
    pub cluster_lease_seconds: u64,
    /// PEM CA certificates a follower trusts for the leader's gRPC certificate when it
    /// forwards writes and heartbeats to it (`store = etcd` with TLS on); unset: tls_client_ca.
    /// With TLS on and neither set, followers do not forward: they refuse writes with a 503
    /// naming the leader.
    #[arg(long, env = "SEXTANT_CLUSTER_PEER_CA")]
    pub cluster_peer_ca: Option<PathBuf>,
    /// Events kept per service for watchers that resume.
    #[arg(long, env = "SEXTANT_EVENT_LOG_PER_SERVICE", default_value_t = 1024)]
    pub event_log_per_service: usize,
    /// How long a service that a write emptied (no instances, default settings) keeps its
    /// change log when nobody watches it, in seconds, so a watcher that reconnects meanwhile
    /// resumes with exact events; after that it leaves memory (names only read or watched,
    /// never written, leave at once).
    #[arg(long, env = "SEXTANT_VACANT_RETENTION_SECONDS", default_value_t = 60)]
    pub vacant_retention_seconds: u64,
    /// Most writes in one durable (group) commit.
    #[arg(long, env = "SEXTANT_MAX_BATCH_OPS", default_value_t = 4096)]
    pub max_batch_ops: usize,
    /// Longest blocking-query wait a client may ask for, in seconds.
    #[arg(long, env = "SEXTANT_MAX_WAIT_SECONDS", default_value_t = 300)]
    pub max_wait_seconds: u64,
    /// Largest request body, in bytes (native and Nacos HTTP).
    #[arg(long, env = "SEXTANT_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers), in bytes, on both HTTP listeners;
    /// larger is answered 431. At least 8192.
    #[arg(long, env = "SEXTANT_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Most headers in one HTTP/1 request, on both HTTP listeners; more is answered 431.
    #[arg(long, env = "SEXTANT_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// A client that has not sent a whole request head this long after connecting, or after
    /// its previous answer on a kept-alive HTTP/1 connection, is disconnected, in seconds, on
    /// both HTTP listeners; 0 turns the limit off. The default is longer than common
    /// clients keep an idle pooled connection (reqwest and Go: 90 s), so that the client, not
    /// the server, closes an idle one, and never races a request into a closing socket.
    #[arg(
        long,
        env = "SEXTANT_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 120
    )]
    pub header_read_timeout_seconds: u64,
    /// An SSE watcher that does not read for this long is disconnected, in seconds.
    #[arg(
        long,
        env = "SEXTANT_SLOW_SUBSCRIBER_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub slow_subscriber_timeout_seconds: u64,
    /// How long shutdown waits for connections to drain, in seconds.
    #[arg(long, env = "SEXTANT_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// Run the central health scanner (probes services that define a check).
    #[arg(long, env = "SEXTANT_HEALTH_SCANNER", default_value_t = true, action = clap::ArgAction::Set)]
    pub health_scanner: bool,
    /// Health probes in flight at once.
    #[arg(long, env = "SEXTANT_HEALTH_CONCURRENCY", default_value_t = 2048)]
    pub health_concurrency: usize,
    /// Hold back unhealthy flips that would leave more than this fraction of a service
    /// unhealthy at once.
    #[arg(
        long,
        env = "SEXTANT_HEALTH_MASS_FAILURE_FRACTION",
        default_value_t = 0.5
    )]
    pub health_mass_failure_fraction: f32,
    /// Serve the Nacos adapter (1.x HTTP Open API and 2.x gRPC).
    #[arg(long, env = "SEXTANT_NACOS", default_value_t = true, action = clap::ArgAction::Set)]
    pub nacos: bool,
    /// Address of the Nacos 1.x HTTP Open API, for unchanged Nacos clients.
    #[arg(
        long,
        env = "SEXTANT_NACOS_HTTP_ADDR",
        default_value = "127.0.0.1:8848"
    )]
    pub nacos_http_addr: SocketAddr,
    /// Address of the Nacos 2.x gRPC protocol [default: the Nacos HTTP port + 1000, where
    /// Nacos clients look for it].
    #[arg(long, env = "SEXTANT_NACOS_GRPC_ADDR")]
    pub nacos_grpc_addr: Option<SocketAddr>,
    /// How long a Nacos 2.x client's ephemeral instances outlive its connection, in seconds.
    #[arg(
        long,
        env = "SEXTANT_NACOS_CONNECTION_GRACE_SECONDS",
        default_value_t = 5
    )]
    pub nacos_connection_grace_seconds: u64,
    /// Push changes over UDP to Nacos 1.x clients that ask for it (`udpPort` in their list
    /// queries), as Nacos does; off, they learn changes by polling.
    #[arg(long, env = "SEXTANT_NACOS_UDP_PUSH", default_value_t = true, action = clap::ArgAction::Set)]
    pub nacos_udp_push: bool,
    /// Serve xDS (Envoy's aggregated discovery service) on the native gRPC listener, for
    /// proxyless gRPC clients (`xds:///{service}.{namespace}`) and Envoy.
    #[arg(long, env = "SEXTANT_XDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub xds: bool,
    /// How long xDS waits after a service changes before it pushes, in milliseconds, so a
    /// burst of changes becomes one push; 0 pushes every change at once.
    #[arg(long, env = "SEXTANT_XDS_DEBOUNCE_MS", default_value_t = 10)]
    pub xds_debounce_ms: u64,
    /// Serve Eureka's REST API on the native HTTP listener, under `/eureka/` and `/eureka/v2/`.
    #[arg(long, env = "SEXTANT_EUREKA", default_value_t = true, action = clap::ArgAction::Set)]
    pub eureka: bool,
    /// Serve DNS (Consul's `<svc>.service.consul` names and `<svc>.<namespace>.sextant`).
    #[arg(long, env = "SEXTANT_DNS", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns: bool,
    /// Address of the DNS server, UDP and TCP (Consul's default port).
    #[arg(long, env = "SEXTANT_DNS_ADDR", default_value = "127.0.0.1:8600")]
    pub dns_addr: SocketAddr,
    /// TTL of DNS answers, and how long resolvers may cache a negative answer, in seconds.
    #[arg(long, env = "SEXTANT_DNS_TTL_SECONDS", default_value_t = 5)]
    pub dns_ttl_seconds: u32,
    /// The datacenter Consul clients see: in DNS names (`web.service.<dc>.consul`), SRV
    /// targets and the Consul HTTP API (`/v1/agent/self`, `?dc=`).
    #[arg(long, env = "SEXTANT_DNS_DATACENTER", default_value = "dc1")]
    pub dns_datacenter: String,
    /// Serve Consul's HTTP API (agent, catalog, health, status) for unchanged Consul clients.
    #[arg(long, env = "SEXTANT_CONSUL", default_value_t = true, action = clap::ArgAction::Set)]
    pub consul: bool,
    /// Address of the Consul HTTP API (Consul's default port).
    #[arg(
        long,
        env = "SEXTANT_CONSUL_HTTP_ADDR",
        default_value = "127.0.0.1:8500"
    )]
    pub consul_http_addr: SocketAddr,
    /// The smallest `DeregisterCriticalServiceAfter` a Consul check may ask for, in seconds;
    /// smaller values are raised to it (Consul's rule: one minute).
    #[arg(
        long,
        env = "SEXTANT_CONSUL_DEREGISTER_MIN_SECONDS",
        default_value_t = 60
    )]
    pub consul_deregister_min_seconds: u64,
    /// PEM certificate chain (leaf first): with tls_key, every TCP listener (native HTTP and
    /// gRPC, Nacos HTTP and gRPC) speaks TLS only. Reloaded on SIGHUP and on change.
    #[arg(long, env = "SEXTANT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of tls_cert.
    #[arg(long, env = "SEXTANT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: with TLS on, every client must present a certificate they signed
    /// (mTLS); its identity is the caller's `PeerIdentity`.
    #[arg(long, env = "SEXTANT_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    // --- access control and audit ---
    /// `on`: every request (but health, readiness, metrics and ACL bootstrap) needs a token
    /// with the right for what it touches; `off`: anyone who can connect may do anything.
    #[arg(long, env = "SEXTANT_AUTH", default_value = "off")]
    pub auth: AuthMode,
    /// Start with auth off even when a listener is not on loopback (refused otherwise).
    #[arg(long, env = "SEXTANT_INSECURE_OPEN", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub insecure_open: bool,
    /// Audit entries kept in the store (the oldest go first); 0 records none.
    #[arg(long, env = "SEXTANT_AUDIT_RETENTION", default_value_t = 10000)]
    pub audit_retention: usize,
    /// Also append every audit entry to this file, as JSON lines.
    #[arg(long, env = "SEXTANT_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    // --- limits and overload protection (0 turns one off) ---
    /// Requests per second one source IP address may make, on every protocol but DNS (burst:
    /// one second's worth); more get 429 with Retry-After.
    #[arg(long, env = "SEXTANT_RATE_PER_SOURCE", default_value_t = 50000)]
    pub rate_per_source: u32,
    /// Requests per second one token may make (burst: one second's worth); more get 429 with
    /// Retry-After.
    #[arg(long, env = "SEXTANT_RATE_PER_TOKEN", default_value_t = 50000)]
    pub rate_per_token: u32,
    /// Requests handled at once, blocking queries included; more get 503 with Retry-After.
    #[arg(long, env = "SEXTANT_MAX_REQUESTS", default_value_t = 100000)]
    pub max_requests: usize,
    /// Open TCP connections over all listeners; more are closed as they arrive.
    #[arg(long, env = "SEXTANT_MAX_CONNECTIONS", default_value_t = 100000)]
    pub max_connections: usize,
    /// Writes waiting for the writer beyond which client writes get 503 with Retry-After
    /// (shed before latency grows with the queue); heartbeats and reads are still served.
    #[arg(long, env = "SEXTANT_SHED_WRITE_QUEUE", default_value_t = 2048)]
    pub shed_write_queue: usize,
}

/// Whether requests need a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Off,
    On,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(AuthMode::Off),
            "on" => Ok(AuthMode::On),
            other => Err(format!("unknown auth mode {other:?}: use on or off")),
        }
    }
}

impl std::fmt::Display for AuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMode::Off => "off",
            AuthMode::On => "on",
        })
    }
}

impl Default for ServerConfig {
    /// The defaults of the clap attributes, read with every variable ignored.
    fn default() -> Self {
        let cmd = Self::augment_args(clap::Command::new("defaults").no_binary_name(true))
            .mut_args(|a| a.env(None));
        let parsed = cmd
            .try_get_matches_from(std::iter::empty::<&str>())
            .map_err(|e| e.to_string())
            .and_then(|m| Self::from_arg_matches(&m).map_err(|e| e.to_string()));
        match parsed {
            Ok(c) => c,
            // Only a broken attribute gets here, and the unit tests parse the defaults.
            Err(e) => panic!("the defaults of ServerConfig do not parse: {e}"),
        }
    }
}

/// The smallest `max_header_bytes`: hyper's HTTP/1 read buffer cannot be smaller.
pub const MIN_HEADER_BYTES: usize = 8192;

/// The longest `header_read_timeout_seconds` (a day): hyper adds it to the current instant,
/// which must not overflow.
pub const MAX_HEADER_READ_TIMEOUT_SECONDS: u64 = 24 * 60 * 60;

/// The longest xDS debounce: a push held back longer than this is a misconfiguration.
pub const MAX_XDS_DEBOUNCE_MS: u64 = 10_000;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("cannot combine the flags and variables with the config file: {0}")]
    Combine(String),
}

impl ServerConfig {
    /// Reads a TOML file; missing keys keep their defaults, unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The configuration of a node: the file (or the defaults), then every setting given as a
    /// flag or a variable in `matches` (whose values `flags` holds) on top.
    pub fn layered(
        file: Option<&Path>,
        flags: &ServerConfig,
        matches: &ArgMatches,
    ) -> Result<Self, ConfigError> {
        let base = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        // Each layer is checked on its own first: JSON, the merge's medium, cannot hold a
        // non-finite float, so `nan` would otherwise surface as a baffling merge error
        // instead of the field's own message.
        base.validate()?;
        flags.validate()?;
        let combine = |e: serde_json::Error| ConfigError::Combine(e.to_string());
        // Through serde's map of the keys, so that a new setting needs no line here.
        let mut merged = serde_json::to_value(&base).map_err(combine)?;
        let given = serde_json::to_value(flags).map_err(combine)?;
        if let (Some(merged), Some(given)) = (merged.as_object_mut(), given.as_object()) {
            for (key, value) in given {
                let explicit = matches!(
                    matches.value_source(key),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                );
                if explicit {
                    merged.insert(key.clone(), value.clone());
                }
            }
        }
        serde_json::from_value(merged).map_err(combine)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field, v: u64| {
            if v == 0 {
                Err(ConfigError::Invalid {
                    field,
                    message: "must be greater than 0".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("event_log_per_service", self.event_log_per_service as u64)?;
        positive("max_batch_ops", self.max_batch_ops as u64)?;
        positive("max_body_bytes", self.max_body_bytes as u64)?;
        positive("max_headers", self.max_headers as u64)?;
        // hyper refuses (panics on) a read buffer under 8 KiB; 4 GiB is HTTP/2's field size.
        if !(MIN_HEADER_BYTES..=u32::MAX as usize).contains(&self.max_header_bytes) {
            return Err(ConfigError::Invalid {
                field: "max_header_bytes",
                message: format!("must be between {MIN_HEADER_BYTES} and {}", u32::MAX),
            });
        }
        if self.header_read_timeout_seconds > MAX_HEADER_READ_TIMEOUT_SECONDS {
            return Err(ConfigError::Invalid {
                field: "header_read_timeout_seconds",
                message: format!(
                    "must be at most {MAX_HEADER_READ_TIMEOUT_SECONDS} (0 turns the limit off)"
                ),
            });
        }
        positive(
            "slow_subscriber_timeout_seconds",
            self.slow_subscriber_timeout_seconds,
        )?;
        positive("health_concurrency", self.health_concurrency as u64)?;
        positive(
            "nacos_connection_grace_seconds",
            self.nacos_connection_grace_seconds,
        )?;
        if self.nacos && self.nacos_grpc_addr.is_none() && self.nacos_http_addr.port() > 64535 {
            return Err(ConfigError::Invalid {
                field: "nacos_http_addr",
                message:
                    "its port + 1000 (the Nacos gRPC port) is above 65535; set nacos_grpc_addr"
                        .into(),
            });
        }
        if self.dns_datacenter.is_empty()
            || self.dns_datacenter.len() > 63
            || !self
                .dns_datacenter
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ConfigError::Invalid {
                field: "dns_datacenter",
                message: "must be one DNS label: 1-63 of A-Z a-z 0-9 -".into(),
            });
        }
        if !(1..=86_400).contains(&self.consul_deregister_min_seconds) {
            return Err(ConfigError::Invalid {
                field: "consul_deregister_min_seconds",
                message: "must be 1-86400".into(),
            });
        }
        if self.xds_debounce_ms > MAX_XDS_DEBOUNCE_MS {
            return Err(ConfigError::Invalid {
                field: "xds_debounce_ms",
                message: format!("must be at most {MAX_XDS_DEBOUNCE_MS}"),
            });
        }
        if self.store == StoreKind::Etcd {
            let endpoints = self.etcd_endpoints();
            if endpoints.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "etcd_endpoints",
                    message: "no endpoint given (e.g. http://127.0.0.1:2379)".into(),
                });
            }
            if let Some(bad) = endpoints.iter().find(|e| {
                e.strip_prefix("http://")
                    .is_none_or(|rest| rest.is_empty() || rest.contains(['/', ' ']))
            }) {
                return Err(ConfigError::Invalid {
                    field: "etcd_endpoints",
                    message: format!("{bad:?} is not an http://host:port URL (no TLS yet)"),
                });
            }
            if self.etcd_prefix.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "etcd_prefix",
                    message: "must not be empty".into(),
                });
            }
            if self.node_id.len() > 128
                || !self
                    .node_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
            {
                return Err(ConfigError::Invalid {
                    field: "node_id",
                    message: "at most 128 of A-Z a-z 0-9 . _ - :".into(),
                });
            }
            let host_ok = |h: &str| {
                h.len() <= 253
                    && !h.is_empty()
                    && (h.parse::<std::net::IpAddr>().is_ok()
                        || h.split('.').all(|l| {
                            !l.is_empty()
                                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        }))
            };
            if !self.advertise_host.is_empty() && !host_ok(&self.advertise_host) {
                return Err(ConfigError::Invalid {
                    field: "advertise_host",
                    message: format!(
                        "{:?} is not a host name or IP address (no scheme, port or path)",
                        self.advertise_host
                    ),
                });
            }
            if !(2..=60).contains(&self.cluster_lease_seconds) {
                return Err(ConfigError::Invalid {
                    field: "cluster_lease_seconds",
                    message: "must be between 2 and 60".into(),
                });
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    field: "tls_key",
                    message: "tls_cert is set; give its key too".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    field: "tls_cert",
                    message: "tls_key is set; give its certificate too".into(),
                })
            }
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(ConfigError::Invalid {
                    field: "tls_client_ca",
                    message: "client certificates need TLS: set tls_cert and tls_key".into(),
                })
            }
            _ => {}
        }
        if !(0.0..=1.0).contains(&self.health_mass_failure_fraction) {
            return Err(ConfigError::Invalid {
                field: "health_mass_failure_fraction",
                message: "must be a fraction between 0.0 and 1.0".into(),
            });
        }
        Ok(())
    }

    /// Refuses auth off with a listener off loopback unless `insecure_open`: checked on the
    /// combined configuration (a file's address and a flag's `--auth on` go together).
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        if let Some(open) = self.open_listener() {
            return Err(ConfigError::Invalid {
                field: "auth",
                message: format!(
                    "auth is off and {open} is not on loopback: anyone who reaches it could \
                     change the registry. Turn auth on (--auth on, after `sextant acl \
                     bootstrap`), or give --insecure-open to run open anyway"
                ),
            });
        }
        Ok(())
    }

    /// With auth off and no `insecure_open`: a listener that is not on loopback, if any. DNS
    /// is left out: it is read-only and answered without auth either way.
    pub fn open_listener(&self) -> Option<String> {
        if self.auth == AuthMode::On || self.insecure_open {
            return None;
        }
        let mut listeners = vec![("http_addr", self.http_addr), ("grpc_addr", self.grpc_addr)];
        if self.nacos {
            listeners.push(("nacos_http_addr", self.nacos_http_addr));
            listeners.push(("nacos_grpc_addr", self.nacos_grpc_addr()));
        }
        if self.consul {
            listeners.push(("consul_http_addr", self.consul_http_addr));
        }
        listeners
            .into_iter()
            .find(|(_, a)| !a.ip().is_loopback())
            .map(|(k, a)| format!("{k} ({a})"))
    }

    /// Where Nacos 2.x gRPC listens: as set, or the HTTP port + 1000 (port 0 stays 0).
    pub fn nacos_grpc_addr(&self) -> SocketAddr {
        self.nacos_grpc_addr.unwrap_or_else(|| {
            let mut a = self.nacos_http_addr;
            if a.port() != 0 {
                a.set_port(a.port().saturating_add(1000));
            }
            a
        })
    }

    /// `etcd_endpoints` split at commas, blanks dropped.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(self.max_wait_seconds)
    }

    pub fn slow_subscriber_timeout(&self) -> Duration {
        Duration::from_secs(self.slow_subscriber_timeout_seconds)
    }

    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// How long a client may take to send a request head; `None` when the limit is off.
    pub fn header_read_timeout(&self) -> Option<Duration> {
        match self.header_read_timeout_seconds {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn command() -> clap::Command {
        ServerConfig::augment_args(clap::Command::new("serve").no_binary_name(true))
    }

    #[test]
    fn defaults_and_file_overrides() {
        let d = ServerConfig::default();
        assert_eq!(d.http_addr, SocketAddr::from(([127, 0, 0, 1], 8470)));
        assert_eq!(d.max_header_bytes, 64 * 1024);
        assert!(d.nacos && d.health_scanner && d.nacos_grpc_addr.is_none());
        d.validate().unwrap();
        let c =
            ServerConfig::from_toml("http_addr = \"127.0.0.1:9000\"\nstore = \"memory\"").unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.store, StoreKind::Memory);
        assert_eq!(c.grpc_addr.port(), 8471);
        let e = ServerConfig::from_toml("htp_addr = \"x\"").unwrap_err();
        assert!(e.contains("htp_addr"), "{e}");
    }

    /// The limits' defaults are written twice (here for `--help`, in the core for embedders);
    /// they must agree.
    #[test]
    fn limit_defaults_match_the_core() {
        let d = ServerConfig::default();
        let core = sextant_core::Limits::default();
        assert_eq!(
            sextant_core::Limits {
                rate_per_source: d.rate_per_source,
                rate_per_token: d.rate_per_token,
                max_requests: d.max_requests,
                max_connections: d.max_connections,
                shed_write_queue: d.shed_write_queue,
            },
            core
        );
    }

    /// The table is complete: every file key has its flag and its variable, named by the rule
    /// README states, with help text; and every flag is a file key.
    #[test]
    fn every_key_has_a_flag_and_a_variable() {
        command().debug_assert();
        let keys: Vec<String> = match serde_json::to_value(ServerConfig::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            other => panic!("not a map: {other:?}"),
        };
        let cmd = command();
        let args: Vec<_> = cmd.get_arguments().collect();
        assert_eq!(keys.len(), args.len(), "keys {keys:?}");
        for key in &keys {
            let arg = args
                .iter()
                .find(|a| a.get_id().as_str() == key)
                .unwrap_or_else(|| panic!("file key {key} has no flag"));
            assert_eq!(
                arg.get_long(),
                Some(key.replace('_', "-").as_str()),
                "{key}"
            );
            let env = arg.get_env().and_then(|e| e.to_str());
            let want = format!("SEXTANT_{}", key.to_uppercase());
            assert_eq!(env, Some(want.as_str()), "{key}");
            assert!(arg.get_help().is_some(), "{key} has no help");
        }
    }

    #[test]
    fn tls_needs_both_files_and_client_ca_needs_tls() {
        let with = |cert: Option<&str>, key: Option<&str>, ca: Option<&str>| ServerConfig {
            tls_cert: cert.map(PathBuf::from),
            tls_key: key.map(PathBuf::from),
            tls_client_ca: ca.map(PathBuf::from),
            ..ServerConfig::default()
        };
        for (c, field) in [
            (with(Some("c"), None, None), "tls_key"),
            (with(None, Some("k"), None), "tls_cert"),
            (with(None, None, Some("ca")), "tls_client_ca"),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
            assert!(c.tls_files().is_none());
        }
        let on = with(Some("c"), Some("k"), Some("ca"));
        on.validate().unwrap();
        assert_eq!(
            on.tls_files().map(|f| f.client_ca),
            Some(Some(PathBuf::from("ca")))
        );
    }

    /// README's configuration table has a row per key with its flag, its variable and its
    /// default, and no row for a key that does not exist.
    #[test]
    fn readme_lists_every_key() {
        let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
        let text = std::fs::read_to_string(readme).unwrap();
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("| `") && l.matches(" | ").count() >= 4)
            .collect();
        let defaults = match serde_json::to_value(ServerConfig::default()) {
            Ok(serde_json::Value::Object(m)) => m,
            other => panic!("not a map: {other:?}"),
        };
        for (key, default) in &defaults {
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| `{key}` |")))
                .unwrap_or_else(|| panic!("README has no row for {key}"));
            let flag = format!("`--{}`", key.replace('_', "-"));
            let var = format!("`SEXTANT_{}`", key.to_uppercase());
            assert!(row.contains(&flag) && row.contains(&var), "{row}");
            let shown = match default {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            assert!(
                row.contains(&format!("`{shown}`")),
                "{row}: default {shown}"
            );
        }
        let table_keys = rows.iter().filter(|r| r.contains("`SEXTANT_")).count();
        assert_eq!(table_keys, defaults.len(), "rows {rows:#?}");
    }

    /// Auth off with a listener off loopback is refused unless `insecure_open`; auth on, or
    /// only loopback listeners, is fine. (Checked on the config: tests never bind 0.0.0.0.)
    #[test]
    fn auth_off_off_loopback_needs_insecure_open() {
        let mut c = ServerConfig::default();
        c.check_exposure().unwrap();
        c.nacos_http_addr = "0.0.0.0:8848".parse().unwrap();
        let e = c.check_exposure().unwrap_err().to_string();
        assert!(
            e.contains("insecure-open") && e.contains("nacos_http_addr"),
            "{e}"
        );
        c.insecure_open = true;
        c.check_exposure().unwrap();
        c.insecure_open = false;
        c.auth = AuthMode::On;
        c.check_exposure().unwrap();
        c.auth = AuthMode::Off;
        c.nacos = false;
        c.check_exposure().unwrap();
        c.consul_http_addr = "0.0.0.0:8500".parse().unwrap();
        let e = c.check_exposure().unwrap_err().to_string();
        assert!(e.contains("consul_http_addr"), "{e}");
        c.consul = false;
        c.check_exposure().unwrap();
    }

    /// Flags beat the file beats the defaults. (Variables, which clap reads like flags, are
    /// tested against the real binary in `sextant/tests/http_errors.rs`: tests here do not
    /// touch the process environment.)
    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("sextant-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sextant.toml");
        std::fs::write(
            &file,
            "max_wait_seconds = 9\nmax_body_bytes = 1000\nnacos = false\n",
        )
        .unwrap();
        let matches = command()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(["--max-body-bytes", "1234"])
            .unwrap();
        let flags = ServerConfig::from_arg_matches(&matches).unwrap();
        let c = ServerConfig::layered(Some(&file), &flags, &matches).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(c.max_body_bytes, 1234, "the flag beats the file");
        assert_eq!(c.max_wait_seconds, 9, "the file beats the default");
        assert!(!c.nacos, "the file beats the default");
        assert_eq!(c.max_batch_ops, 4096, "the default stays");
        // No file: the defaults under the flags.
        let c = ServerConfig::layered(None, &flags, &matches).unwrap();
        assert_eq!(c.max_body_bytes, 1234);
        assert_eq!(c.max_wait_seconds, 300);
        assert!(c.nacos);
    }

    /// `nan` is refused with the field's own message, from a file or a flag (the merge goes
    /// through JSON, which has no NaN, and used to fail with "cannot combine ...").
    #[test]
    fn a_non_finite_fraction_names_its_field() {
        let dir = std::env::temp_dir().join(format!("sextant-config-nan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sextant.toml");
        std::fs::write(&file, "health_mass_failure_fraction = nan\n").unwrap();
        let no_flags = command()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(Vec::<&str>::new())
            .unwrap();
        let defaults = ServerConfig::from_arg_matches(&no_flags).unwrap();
        let from_file = ServerConfig::layered(Some(&file), &defaults, &no_flags);
        let _ = std::fs::remove_dir_all(&dir);
        let flag = command()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(["--health-mass-failure-fraction", "NaN"])
            .unwrap();
        let from_flag =
            ServerConfig::layered(None, &ServerConfig::from_arg_matches(&flag).unwrap(), &flag);
        for r in [from_file, from_flag] {
            match r {
                Err(ConfigError::Invalid { field, .. }) => {
                    assert_eq!(field, "health_mass_failure_fraction")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn etcd_settings() {
        let c = ServerConfig::from_toml(
            "store = \"etcd\"\netcd_endpoints = \"http://10.0.0.1:2379, http://10.0.0.2:2379\"\netcd_prefix = \"/a/\"",
        )
        .unwrap();
        assert_eq!(c.store, StoreKind::Etcd);
        assert_eq!(
            c.etcd_endpoints(),
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        c.validate().unwrap();
        for (endpoints, prefix, field) in [
            ("", "/s/", "etcd_endpoints"),
            ("https://x:2379", "/s/", "etcd_endpoints"),
            ("127.0.0.1:2379", "/s/", "etcd_endpoints"),
            ("http://x:2379", "", "etcd_prefix"),
        ] {
            let c = ServerConfig {
                store: StoreKind::Etcd,
                etcd_endpoints: endpoints.into(),
                etcd_prefix: prefix.into(),
                ..ServerConfig::default()
            };
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{endpoints}"),
                other => panic!("{endpoints:?} {prefix:?}: {other:?}"),
            }
        }
        for (node_id, lease, field) in [
            ("a b", 3, "node_id"),
            ("n/1", 3, "node_id"),
            ("n1", 1, "cluster_lease_seconds"),
            ("n1", 61, "cluster_lease_seconds"),
        ] {
            let c = ServerConfig {
                store: StoreKind::Etcd,
                node_id: node_id.into(),
                cluster_lease_seconds: lease,
                ..ServerConfig::default()
            };
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{node_id:?} {lease}: {other:?}"),
            }
        }
        for bad in ["http://h", "h:80", "a b", "h/x", "-."] {
            let c = ServerConfig {
                store: StoreKind::Etcd,
                advertise_host: bad.into(),
                ..ServerConfig::default()
            };
            match c.validate() {
                Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "advertise_host"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        for good in ["10.0.0.7", "::1", "sextant-1.prod.example"] {
            let c = ServerConfig {
                store: StoreKind::Etcd,
                advertise_host: good.into(),
                ..ServerConfig::default()
            };
            assert!(c.validate().is_ok(), "{good}");
        }
        // Not checked unless the etcd store is chosen.
        let c = ServerConfig {
            etcd_endpoints: String::new(),
            ..ServerConfig::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn header_limits_are_validated() {
        let c = ServerConfig {
            max_header_bytes: 4096,
            ..ServerConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_header_bytes"), "{e}");
        let c = ServerConfig {
            max_headers: 0,
            ..ServerConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn header_read_timeout_is_bounded_and_0_is_off() {
        let d = ServerConfig::default();
        assert_eq!(d.header_read_timeout(), Some(Duration::from_secs(120)));
        let off = ServerConfig {
            header_read_timeout_seconds: 0,
            ..ServerConfig::default()
        };
        off.validate().unwrap();
        assert_eq!(off.header_read_timeout(), None);
        let huge = ServerConfig {
            header_read_timeout_seconds: u64::MAX,
            ..ServerConfig::default()
        };
        let e = huge.validate().unwrap_err().to_string();
        assert!(e.contains("header_read_timeout_seconds"), "{e}");
    }

    /// A TOML value of any type (or not quite TOML).
    fn toml_value() -> BoxedStrategy<String> {
        prop_oneof![
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            // Small numbers reach the limits the checks enforce (e.g. 8 KiB of head).
            4 => (0u32..20_000).prop_map(|n| n.to_string()),
            1 => any::<f64>().prop_map(|f| format!("{f:?}")),
            1 => prop::sample::select(vec!["nan", "inf", "-inf", "true", "false", "[]", "{}"])
                .prop_map(String::from),
            1 => ".{0,30}".prop_map(|s| format!("{s:?}")),
            1 => "[0-9.:a-f\\[\\]]{0,30}".prop_map(|s| format!("\"{s}\"")),
            1 => ".{0,30}".prop_map(String::from),
        ]
        .boxed()
    }

    /// Arbitrary text, or lines `key = value` with real keys and others.
    fn file_text() -> BoxedStrategy<String> {
        let keys: Vec<String> = match serde_json::to_value(ServerConfig::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let key = prop_oneof![
            4 => prop::sample::select(keys),
            1 => "[a-z_]{1,12}".prop_map(String::from)
        ];
        let lines = prop::collection::vec((key, toml_value()), 0..8).prop_map(|kv| {
            kv.iter()
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect::<String>()
        });
        prop_oneof![1 => ".{0,200}".prop_map(String::from), 3 => lines].boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text is a configuration or a typed error, never a panic; and what validates
        /// can be served (hyper panics on a read buffer under 8 KiB).
        #[test]
        fn any_file_text_parses_or_is_refused(text in file_text()) {
            if let Ok(c) = ServerConfig::from_toml(&text) {
                if c.validate().is_ok() {
                    // What validates can be served: hyper asserts a head buffer of at least
                    // 8 KiB when it is set, and the timeout is added to the clock.
                    let mut b = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    b.http1().max_buf_size(c.max_header_bytes).max_headers(c.max_headers);
                    if let Some(t) = c.header_read_timeout() {
                        let _ = std::time::Instant::now() + t;
                    }
                    let _ = c.nacos_grpc_addr();
                }
            }
        }

        /// Bytes that are not a configuration are an error naming the file.
        #[test]
        fn any_file_bytes_are_read_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let dir = std::env::temp_dir().join(format!("sextant-config-bytes-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let name = bytes.iter().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)));
            let file = dir.join(format!("{name:x}.toml"));
            std::fs::write(&file, &bytes).unwrap();
            let r = ServerConfig::from_file(&file);
            let _ = std::fs::remove_file(&file);
            match r {
                Ok(c) => {
                    let _ = c.validate();
                }
                Err(e @ (ConfigError::Read { .. } | ConfigError::Parse { .. })) => {
                    prop_assert!(e.to_string().contains(".toml"), "{e}");
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
