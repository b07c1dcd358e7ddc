//! Server configuration: one explicit struct, read from a TOML file (unknown keys refused),
//! overridden by flags and `SEXTANT_*` variables in the binary. Defaults work with no file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the registry is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Durable embedded store (redb) under `data_dir`. The default.
    Embedded,
    /// Nothing on disk; everything is lost on exit. For tests and demos.
    Memory,
}

impl std::str::FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(StoreKind::Embedded),
            "memory" => Ok(StoreKind::Memory),
            other => Err(format!("unknown store {other:?}: use embedded or memory")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Native HTTP/JSON API.
    pub http_addr: SocketAddr,
    /// Native gRPC API.
    pub grpc_addr: SocketAddr,
    pub store: StoreKind,
    pub data_dir: PathBuf,
    /// Events kept per service for subscribers that resume.
    pub event_log_per_service: usize,
    /// Most operations in one durable commit.
    pub max_batch_ops: usize,
    /// Longest blocking query wait a client may ask for, in seconds.
    pub max_wait_seconds: u64,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// A subscriber that does not read for this long is disconnected, in seconds.
    pub slow_subscriber_timeout_seconds: u64,
    /// How long shutdown waits for connections to drain, in seconds.
    pub shutdown_grace_seconds: u64,
    /// Run the central health scanner (probes services that define a check).
    pub health_scanner: bool,
    /// Health probes in flight at once.
    pub health_concurrency: usize,
    /// Hold back unhealthy flips that would leave more than this fraction of a service
    /// unhealthy at once.
    pub health_mass_failure_fraction: f32,
    /// Serve the Nacos adapter (1.x HTTP Open API and 2.x gRPC).
    pub nacos: bool,
    /// Nacos 1.x HTTP Open API (Nacos' default port is 8848).
    pub nacos_http_addr: SocketAddr,
    /// Nacos 2.x gRPC; unset means the HTTP address with port + 1000, where Nacos clients
    /// look for it.
    pub nacos_grpc_addr: Option<SocketAddr>,
    /// How long a Nacos 2.x client's ephemeral instances outlive its connection, in seconds.
    pub nacos_connection_grace_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8470)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 8471)),
            store: StoreKind::Embedded,
            data_dir: PathBuf::from("./sextant-data"),
            event_log_per_service: 1024,
            max_batch_ops: 4096,
            max_wait_seconds: 300,
            max_body_bytes: 4 * 1024 * 1024,
            slow_subscriber_timeout_seconds: 30,
            shutdown_grace_seconds: 10,
            health_scanner: true,
            health_concurrency: 2048,
            health_mass_failure_fraction: 0.5,
            nacos: true,
            nacos_http_addr: SocketAddr::from(([127, 0, 0, 1], 8848)),
            nacos_grpc_addr: None,
            nacos_connection_grace_seconds: 5,
        }
    }
}

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
        if !(0.0..=1.0).contains(&self.health_mass_failure_fraction) {
            return Err(ConfigError::Invalid {
                field: "health_mass_failure_fraction",
                message: "must be a fraction between 0.0 and 1.0".into(),
            });
        }
        Ok(())
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

    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(self.max_wait_seconds)
    }

    pub fn slow_subscriber_timeout(&self) -> Duration {
        Duration::from_secs(self.slow_subscriber_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_file_overrides() {
        let c =
            ServerConfig::from_toml("http_addr = \"127.0.0.1:9000\"\nstore = \"memory\"").unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.store, StoreKind::Memory);
        assert_eq!(c.grpc_addr.port(), 8471);
        let e = ServerConfig::from_toml("htp_addr = \"x\"").unwrap_err();
        assert!(e.contains("htp_addr"), "{e}");
    }
}
