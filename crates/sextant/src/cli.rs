//! Command-line surface: `serve` and the client commands, with `--help` for each.

use std::path::PathBuf;

use clap::{ArgMatches, Args, Parser, Subcommand};
use sextant_server::ServerConfig;

#[derive(Parser, Debug)]
#[command(
    name = "sextant",
    version,
    about = "Sextant: an availability-first naming service (registry and discovery).",
    long_about = "Sextant: an availability-first naming service (registry and discovery).\n\n\
        `sextant serve` runs a node with an embedded durable store (data under ./sextant-data).\n\
        The other commands talk to a running node over its HTTP API (`register` over gRPC)."
)]
pub struct Cli {
    /// Base URL of the node's HTTP API, for the client commands.
    #[arg(
        long,
        global = true,
        env = "SEXTANT_SERVER",
        default_value = "http://127.0.0.1:8470"
    )]
    pub server: String,
    /// Base URL of the node's gRPC API, for `register` (which uses the Rust SDK) and as the
    /// xDS server in the file `xds bootstrap` prints.
    #[arg(
        long,
        global = true,
        env = "SEXTANT_GRPC_SERVER",
        default_value = "http://127.0.0.1:8471"
    )]
    pub grpc_server: String,
    /// CA certificate (PEM) to trust for `https://` servers (`--server`, `--grpc-server`)
    /// instead of the system's roots.
    #[arg(long, global = true, env = "SEXTANT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (mTLS), with --tls-client-key.
    #[arg(
        long,
        global = true,
        env = "SEXTANT_TLS_CLIENT_CERT",
        value_name = "FILE",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// Key (PEM) of --tls-client-cert.
    #[arg(
        long,
        global = true,
        env = "SEXTANT_TLS_CLIENT_KEY",
        value_name = "FILE",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
    /// The secret of the token the client commands send (`Authorization: Bearer`), for a
    /// node with auth on.
    #[arg(long, global = true, env = "SEXTANT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a Sextant node (HTTP on 127.0.0.1:8470, gRPC on 127.0.0.1:8471 by default).
    Serve(Box<ServeArgs>),
    /// Register (create or replace) an instance.
    Register(RegisterArgs),
    /// Remove an instance.
    Deregister {
        /// namespace/service
        service: String,
        /// Instance id.
        id: String,
    },
    /// Change an instance's status (health, enabled, weight).
    Status(StatusArgs),
    /// Take an instance out of discovery for a release, keeping its lease and health tracked.
    /// A deploy script runs: drain, sleep, restart, undrain.
    Drain {
        /// namespace/service
        service: String,
        id: String,
    },
    /// Put a drained instance back into discovery.
    Undrain {
        /// namespace/service
        service: String,
        id: String,
    },
    /// Set or clear an operator's weight override (warm-up, canary) without redeploying.
    Weight {
        /// namespace/service
        service: String,
        id: String,
        /// 0-10000; omit with --clear.
        weight: Option<u32>,
        /// Remove the override: the registered weight applies again.
        #[arg(long, conflicts_with = "weight")]
        clear: bool,
    },
    /// Define how the health scanner probes a service's instances.
    Check(CheckArgs),
    /// Ask the health scanner to re-probe an instance now.
    Suspect {
        /// namespace/service
        service: String,
        id: String,
    },
    /// Show a service and its instances.
    Get {
        /// namespace/service
        service: String,
        /// Only serving instances (all of them when protection is active).
        #[arg(long)]
        healthy: bool,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// List namespaces, or the services of one namespace.
    List {
        /// A namespace; omit to list namespaces.
        namespace: Option<String>,
    },
    /// Print changes to services as they happen (a snapshot first).
    Watch {
        /// One or more namespace/service.
        #[arg(required = true)]
        services: Vec<String>,
        /// Resume after this revision instead of starting with a snapshot.
        #[arg(long)]
        since: Option<u64>,
    },
    /// xDS for proxyless gRPC clients and Envoy: their bootstrap file, and who is connected.
    #[command(subcommand)]
    Xds(XdsCommand),
    /// The cluster this node belongs to (store = etcd): members with their role, applied
    /// revision and lag, the leader, the store's health.
    Cluster {
        /// Print the JSON answer as is.
        #[arg(long)]
        json: bool,
    },
    /// Back up a registry, or move it to another store (embedded ↔ etcd).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Access control: the first admin token, tokens and policies.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Print the audit log: who changed what, from where, at which revision (admin right).
    Audit {
        /// Only changes of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only entries after this revision.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AclCommand {
    /// Create the first admin token (once per registry). Its secret is printed alone on the
    /// last line: keep it, it is never shown again.
    Bootstrap,
    /// Tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Policies: create (or replace), list, delete.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token with policies; its secret is printed alone on the last line.
    Create {
        /// A policy's name (repeat for several).
        #[arg(long = "policy", required = true)]
        policies: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// A client-certificate name (mTLS: subject CN, else first SAN) that authenticates as
        /// this token without its secret; repeatable.
        #[arg(long = "tls-identity", value_name = "NAME")]
        tls_identities: Vec<String>,
    },
    List,
    /// Revoke a token by id: its requests are refused and its watches end at once.
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Create or replace a policy of one rule (--namespace, --rights, ...) or of the rules
    /// given as JSON (--rules-json).
    Create {
        name: String,
        /// A namespace, or `*` for every namespace.
        #[arg(long, required_unless_present = "rules_json")]
        namespace: Option<String>,
        /// Comma-separated: read, write, operate, admin.
        #[arg(long, required_unless_present = "rules_json")]
        rights: Option<String>,
        /// Only services whose name starts with this.
        #[arg(long)]
        service_prefix: Option<String>,
        /// `write` only for instance ids matching this (`*` is a wildcard).
        #[arg(long)]
        instance_ids: Option<String>,
        /// The rules as a JSON array of {namespace, rights, service_prefix, instance_ids}.
        #[arg(long, conflicts_with_all = ["namespace", "rights", "service_prefix", "instance_ids"])]
        rules_json: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Saves a consistent snapshot of the running node's registry (every instance, status and
    /// setting at one revision) to FILE, over the HTTP API.
    Save {
        /// Where to write it (replaced atomically).
        file: PathBuf,
    },
    /// Restores FILE into an empty store, with no node running on it: start the node on that
    /// store afterwards. The store is chosen as `serve` chooses it (flags, variables or
    /// --config); a non-empty store is refused.
    Restore(RestoreArgs),
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot to restore (from `sextant snapshot save`).
    pub file: PathBuf,
    /// TOML configuration file of the node that will serve the store (its store settings are
    /// used).
    #[arg(long, env = "SEXTANT_CONFIG")]
    pub config: Option<PathBuf>,
    /// `embedded` or `etcd` [default: embedded, or the config file's].
    #[arg(long, env = "SEXTANT_STORE")]
    pub store: Option<sextant_server::StoreKind>,
    /// Directory of the embedded store [default: ./sextant-data, or the config file's].
    #[arg(long, env = "SEXTANT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// etcd endpoints, comma-separated, for `--store etcd`.
    #[arg(long, env = "SEXTANT_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// Prefix of the registry's etcd keys, for `--store etcd`.
    #[arg(long, env = "SEXTANT_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
}

impl RestoreArgs {
    /// The store settings: the config file (or the defaults), then the flags given.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = match &self.config {
            Some(f) => ServerConfig::from_file(f)?,
            None => ServerConfig::default(),
        };
        if let Some(s) = self.store {
            c.store = s;
        }
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(e) = &self.etcd_endpoints {
            c.etcd_endpoints = e.clone();
        }
        if let Some(p) = &self.etcd_prefix {
            c.etcd_prefix = p.clone();
        }
        Ok(c)
    }
}

#[derive(Subcommand, Debug)]
pub enum XdsCommand {
    /// Print a GRPC_XDS_BOOTSTRAP file that points a gRPC client at this node's xDS server
    /// (the --grpc-server address). Save it, set GRPC_XDS_BOOTSTRAP=FILE and dial
    /// `xds:///{service}.{namespace}`. An https:// server gets TLS channel credentials with
    /// the --tls-ca (and --tls-client-cert / --tls-client-key) files.
    Bootstrap {
        /// The client's node id (shown by `sextant xds clients`).
        #[arg(long)]
        node_id: String,
        /// The client's node cluster (informational).
        #[arg(long, default_value = "")]
        cluster: String,
        /// The client's region: endpoints in it are preferred over others.
        #[arg(long, default_value = "")]
        region: String,
        /// The client's zone: endpoints in it are preferred over the rest of the region.
        #[arg(long, default_value = "")]
        zone: String,
        /// The client's sub-zone (Sextant's idc), reported to the server.
        #[arg(long, default_value = "")]
        sub_zone: String,
    },
    /// List the connected xDS clients: node, locality, subscriptions, versions sent and
    /// acknowledged, NACKs.
    Clients {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Settings of `serve`: every setting of the node (`ServerConfig`: each a flag, a
/// `SEXTANT_*` variable and a key of the TOML file given by `--config`; flags and variables win
/// over the file, the file over the defaults), plus the binary's own `--log`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration file; its keys are the flags' names with `_` for `-`
    /// (http_addr, data_dir, ...). Unknown keys are refused.
    #[arg(long, env = "SEXTANT_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: ServerConfig,
    /// Do not serve the Nacos adapter (the same as --nacos false).
    #[arg(long, env = "SEXTANT_NO_NACOS")]
    pub no_nacos: bool,
    /// Do not serve DNS (the same as --dns false).
    #[arg(long, env = "SEXTANT_NO_DNS")]
    pub no_dns: bool,
    /// Do not serve Consul's HTTP API (the same as --consul false).
    #[arg(long, env = "SEXTANT_NO_CONSUL")]
    pub no_consul: bool,
    /// Log filter (tracing syntax); SEXTANT_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log: String,
}

impl ServeArgs {
    /// The node's configuration; `matches` are the `serve` subcommand's, which tell a setting
    /// given as a flag or a variable from one left at its default.
    pub fn into_config(self, matches: &ArgMatches) -> anyhow::Result<ServerConfig> {
        let mut c = ServerConfig::layered(self.config.as_deref(), &self.settings, matches)?;
        if self.no_nacos {
            c.nacos = false;
        }
        if self.no_dns {
            c.dns = false;
        }
        if self.no_consul {
            c.consul = false;
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// namespace/service
    pub service: String,
    #[arg(long)]
    pub host: String,
    #[arg(long)]
    pub port: u32,
    /// Instance id [default: host:port].
    #[arg(long)]
    pub id: Option<String>,
    /// http, grpc, thrift, tcp, ... [default: http]
    #[arg(long)]
    pub protocol: Option<String>,
    #[arg(long, default_value = "")]
    pub version: String,
    #[arg(long, default_value = "")]
    pub region: String,
    #[arg(long, default_value = "")]
    pub zone: String,
    #[arg(long, default_value = "")]
    pub idc: String,
    /// SET / cell tag.
    #[arg(long, default_value = "")]
    pub cell: String,
    /// Swimlane tag.
    #[arg(long, default_value = "")]
    pub lane: String,
    /// Metadata entry, repeatable: --meta key=value
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Lease TTL in seconds; 0 = persistent.
    #[arg(long, default_value_t = 0)]
    pub ttl: u32,
    /// With --ttl: stay in the foreground renewing the lease, deregister on Ctrl-C.
    #[arg(long, requires = "ttl")]
    pub keepalive: bool,
    #[arg(long)]
    pub weight: Option<u32>,
    /// healthy, unhealthy or unknown.
    #[arg(long)]
    pub health: Option<String>,
    /// Register disabled (out of discovery until enabled).
    #[arg(long)]
    pub disabled: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// namespace/service
    pub service: String,
    /// Instance id.
    pub id: String,
    /// healthy, unhealthy or unknown.
    #[arg(long)]
    pub health: Option<String>,
    /// true or false.
    #[arg(long)]
    pub enabled: Option<bool>,
    /// 0-10000.
    #[arg(long)]
    pub weight: Option<u32>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// namespace/service
    pub service: String,
    /// tcp, http, grpc, or none (turns probing off).
    #[arg(long)]
    pub kind: String,
    /// Probe interval, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
    /// Probe timeout, e.g. 1s.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Consecutive successes before healthy.
    #[arg(long, default_value_t = 2)]
    pub rise: u32,
    /// Consecutive failures before unhealthy.
    #[arg(long, default_value_t = 3)]
    pub fall: u32,
    /// Port to probe instead of the instance's.
    #[arg(long)]
    pub port: Option<u16>,
    /// For http: the path to GET.
    #[arg(long, default_value = "/health")]
    pub path: String,
    /// For http: healthy status range, e.g. 200-399.
    #[arg(long, default_value = "200-399")]
    pub status: String,
    /// For grpc: the service name to ask about ("" = the whole server).
    #[arg(long, default_value = "")]
    pub grpc_service: String,
}
