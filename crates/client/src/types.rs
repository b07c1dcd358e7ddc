//! The SDK's public data types: service and instance names, what an instance registers
//! ([`Registration`]), what discovery returns ([`Service`], [`Instance`]) and what subscribers
//! receive ([`ServiceUpdate`]). All plain data, serializable (the cache file stores them).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

// The model's own types where the SDK's API needs nothing else: the server's serving rule and
// location come with them, and a user passes them between the SDK and the model unchanged.
pub use sextant_model::{Health, InstanceStatus, Location};

use crate::error::Error;

/// The server's own name rules (`sextant-model`), reported as this crate's error.
fn check_name(field: &'static str, value: &str) -> Result<(), Error> {
    let checked = match field {
        "id" => sextant_model::validate_instance_id(value),
        "service" => sextant_model::validate_service_name(value),
        _ => sextant_model::validate_name(field, value),
    };
    checked.map_err(|e| Error::InvalidArgument {
        field,
        reason: e.reason,
    })
}

/// A service's full name: namespace and service, written `namespace/service`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceName {
    namespace: String,
    service: String,
}

impl ServiceName {
    /// A validated name: each part 1-128 characters of `A-Z a-z 0-9 . _ -` (services may also
    /// hold `:` and `@`; the server's rule).
    pub fn new(namespace: impl Into<String>, service: impl Into<String>) -> Result<Self, Error> {
        let (namespace, service) = (namespace.into(), service.into());
        check_name("namespace", &namespace)?;
        check_name("service", &service)?;
        Ok(Self { namespace, service })
    }

    /// The namespace part.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service part.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether both parts pass validation (names read from a cache file are checked with it).
    pub(crate) fn is_valid(&self) -> bool {
        check_name("namespace", &self.namespace).is_ok()
            && check_name("service", &self.service).is_ok()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)
    }
}

impl FromStr for ServiceName {
    type Err = Error;

    /// Parses `namespace/service`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once('/') {
            Some((ns, svc)) => ServiceName::new(ns, svc),
            None => Err(Error::InvalidArgument {
                field: "service",
                reason: format!("{s:?} is not namespace/service"),
            }),
        }
    }
}

/// One instance of one service, as the client registered it: the key for
/// [`Client::deregister`](crate::Client::deregister).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceKey {
    /// The service the instance belongs to.
    pub service: ServiceName,
    /// The instance id within the service.
    pub id: String,
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.id)
    }
}

/// One instance as discovery returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique within the service (defaults to `host:port`).
    pub id: String,
    /// IP address or DNS name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// e.g. `http`, `grpc`.
    pub protocol: String,
    /// The instance's version, free text.
    pub version: String,
    /// Where it runs.
    pub location: Location,
    /// Cell (unit of isolation), free text.
    pub cell: String,
    /// Lane (traffic lane, e.g. a canary), free text.
    pub lane: String,
    /// Free key/value metadata.
    pub metadata: BTreeMap<String, String>,
    /// Health, switches and weight.
    pub status: InstanceStatus,
    /// Lease TTL; 0 = persistent.
    pub ttl_seconds: u32,
    /// Revision of the last change of the spec (everything but the status).
    pub spec_revision: u64,
    /// Revision of the last change of the status.
    pub status_revision: u64,
}

impl Instance {
    /// Whether discovery should send traffic to it (see [`InstanceStatus::is_serving`]).
    pub fn is_serving(&self) -> bool {
        self.status.is_serving()
    }

    /// `host:port` (IPv6 hosts in brackets).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The current state of one service, as the client's cache holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Which service.
    pub name: ServiceName,
    /// Revision of the service's last change known to this client (0 = never had instances).
    pub revision: u64,
    /// Protection threshold (0 = off); see [`Service::is_protected`].
    pub protect_threshold: f32,
    /// Every instance, sorted by id.
    pub instances: Vec<Instance>,
    /// Where this answer came from.
    #[serde(skip, default = "Source::file")]
    pub source: Source,
}

impl Service {
    #[cfg(test)]
    pub(crate) fn empty(name: ServiceName) -> Self {
        Self {
            name,
            revision: 0,
            protect_threshold: 0.0,
            instances: Vec::new(),
            source: Source::Server,
        }
    }

    /// The instance with this id.
    pub fn instance(&self, id: &str) -> Option<&Instance> {
        self.instances
            .binary_search_by(|i| i.id.as_str().cmp(id))
            .ok()
            .map(|n| &self.instances[n])
    }

    /// Whether the protection threshold is tripped: fewer than `protect_threshold × total`
    /// instances are serving, so [`Service::serving`] returns every instance rather than
    /// collapsing to a few (the server's rule for `healthy_only` queries).
    pub fn is_protected(&self) -> bool {
        let serving = self.instances.iter().filter(|i| i.is_serving()).count();
        sextant_model::protection_active(self.protect_threshold, serving, self.instances.len())
    }

    /// The instances to send traffic to: the serving ones, or all of them when protection is
    /// tripped.
    pub fn serving(&self) -> Vec<&Instance> {
        let protected = self.is_protected();
        self.instances
            .iter()
            .filter(|i| protected || i.is_serving())
            .collect()
    }

    pub(crate) fn position(&self, id: &str) -> Result<usize, usize> {
        self.instances.binary_search_by(|i| i.id.as_str().cmp(id))
    }
}

/// Where a [`Service`] answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Source {
    /// From a server (directly or through the watch stream).
    #[default]
    Server,
    /// From the last-known-good cache file: no server has confirmed it since start-up.
    CacheFile,
}

impl Source {
    fn file() -> Self {
        Source::CacheFile
    }
}

/// Why an instance was removed. Not the model's `DeleteReason`: the wire carries a name, and an
/// SDK must still read a reason a newer server adds ([`DeleteReason::Other`]), which the
/// server's closed set does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeleteReason {
    /// Deregistered by a client or an operator.
    Deregistered,
    /// Its lease lapsed (no heartbeat within its TTL).
    LeaseExpired,
    /// A reason this SDK does not know.
    Other,
}

/// What changed in a [`ServiceUpdate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The whole service arrived: the start of a stream, or `resync` when it replaces history
    /// the client missed (the server no longer had it).
    Snapshot {
        /// Replaces missed history rather than starting the stream.
        resync: bool,
    },
    /// The whole service was read directly (first `get`, or a refresh after reconnecting).
    Fetched,
    /// An instance was added or its spec changed.
    Upsert {
        /// Its id.
        id: String,
    },
    /// Only an instance's status changed.
    Status {
        /// Its id.
        id: String,
    },
    /// An instance was removed.
    Delete {
        /// Its id.
        id: String,
        /// Why.
        reason: DeleteReason,
    },
}

/// One change to a service the client watches, with the service's state after it.
#[derive(Debug, Clone)]
pub struct ServiceUpdate {
    /// The revision of the change (for snapshots and fetches, the revision they are complete
    /// to).
    pub revision: u64,
    /// What changed.
    pub change: Change,
    /// The service after the change.
    pub service: Arc<Service>,
}

/// An instance to register: built with [`Registration::new`] and the setters.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub(crate) service: ServiceName,
    pub(crate) id: Option<String>,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) protocol: String,
    pub(crate) version: String,
    pub(crate) location: Location,
    pub(crate) cell: String,
    pub(crate) lane: String,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) status: Option<InstanceStatus>,
    pub(crate) ttl_seconds: u32,
}

impl Registration {
    /// An instance of `service` at `host:port`: persistent (no TTL), id `host:port`, protocol
    /// `http`, default status (unknown health, enabled, weight 100).
    pub fn new(service: ServiceName, host: impl Into<String>, port: u16) -> Self {
        Self {
            service,
            id: None,
            host: host.into(),
            port,
            protocol: String::new(),
            version: String::new(),
            location: Location::default(),
            cell: String::new(),
            lane: String::new(),
            metadata: BTreeMap::new(),
            status: None,
            ttl_seconds: 0,
        }
    }

    /// Sets the instance id (default `host:port`).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Makes the instance ephemeral with this lease TTL (whole seconds, rounded up, at least
    /// 1): the client renews it in the background and the server removes it when renewals stop.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        self.ttl_seconds = u32::try_from(secs.max(1)).unwrap_or(u32::MAX);
        self
    }

    /// Sets the protocol (default `http`).
    pub fn protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocol = protocol.into();
        self
    }

    /// Sets the version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the location.
    pub fn location(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// Sets the cell.
    pub fn cell(mut self, cell: impl Into<String>) -> Self {
        self.cell = cell.into();
        self
    }

    /// Sets the lane.
    pub fn lane(mut self, lane: impl Into<String>) -> Self {
        self.lane = lane.into();
        self
    }

    /// Adds one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the registered weight (0-10000; default 100).
    pub fn weight(mut self, weight: u32) -> Self {
        self.status
            .get_or_insert_with(InstanceStatus::default)
            .weight = weight;
        self
    }

    /// Sets the initial health (default unknown).
    pub fn health(mut self, health: Health) -> Self {
        self.status
            .get_or_insert_with(InstanceStatus::default)
            .health = health;
        self
    }

    /// Sets the enabled switch (default on).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.status
            .get_or_insert_with(InstanceStatus::default)
            .enabled = enabled;
        self
    }

    /// The key the instance will have: its service and id.
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            service: self.service.clone(),
            id: self.effective_id(),
        }
    }

    /// The id, or the server's default `host:port`.
    pub(crate) fn effective_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", self.host, self.port))
    }

    /// Client-side checks of what the server would refuse anyway, so that a bad registration
    /// fails before any network call.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.host.is_empty() {
            return Err(Error::InvalidArgument {
                field: "host",
                reason: "must not be empty".into(),
            });
        }
        if self.port == 0 {
            return Err(Error::InvalidArgument {
                field: "port",
                reason: "must be 1-65535".into(),
            });
        }
        check_name("id", &self.effective_id())?;
        if let Some(s) = &self.status {
            if s.weight > sextant_model::MAX_WEIGHT {
                return Err(Error::InvalidArgument {
                    field: "weight",
                    reason: format!("must be 0-{}, got {}", sextant_model::MAX_WEIGHT, s.weight),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_and_parsed() {
        let n: ServiceName = "prod/orders".parse().unwrap();
        assert_eq!(n.namespace(), "prod");
        assert_eq!(n.service(), "orders");
        assert_eq!(n.to_string(), "prod/orders");
        assert!("prod".parse::<ServiceName>().is_err());
        assert!(ServiceName::new("prod", "a b").is_err());
        assert!(ServiceName::new("", "x").is_err());
        assert!(ServiceName::new("p", "x".repeat(129)).is_err());
    }

    #[test]
    fn registration_defaults_and_validation() {
        let svc = ServiceName::new("prod", "orders").unwrap();
        let r = Registration::new(svc.clone(), "10.0.0.7", 8080);
        assert_eq!(r.key().id, "10.0.0.7:8080");
        assert!(r.validate().is_ok());
        assert_eq!(r.clone().ttl(Duration::from_millis(1500)).ttl_seconds, 2);
        assert_eq!(r.clone().ttl(Duration::ZERO).ttl_seconds, 1);
        assert!(Registration::new(svc.clone(), "h", 0).validate().is_err());
        assert!(r.clone().weight(10_001).validate().is_err());
        assert!(r.id("bad id").validate().is_err());
    }

    #[test]
    fn protection_mirrors_the_server_rule() {
        let name = ServiceName::new("p", "s").unwrap();
        let inst = |id: &str, health| Instance {
            id: id.into(),
            host: "h".into(),
            port: 1,
            protocol: "http".into(),
            version: String::new(),
            location: Location::default(),
            cell: String::new(),
            lane: String::new(),
            metadata: BTreeMap::new(),
            status: InstanceStatus {
                health,
                ..InstanceStatus::default()
            },
            ttl_seconds: 0,
            spec_revision: 1,
            status_revision: 1,
        };
        let mut s = Service::empty(name);
        s.instances = vec![
            inst("a", Health::Unhealthy),
            inst("b", Health::Unhealthy),
            inst("c", Health::Healthy),
        ];
        assert_eq!(s.serving().len(), 1);
        s.protect_threshold = 0.5;
        assert!(s.is_protected());
        assert_eq!(s.serving().len(), 3);
        assert_eq!(s.instance("b").map(|i| i.id.as_str()), Some("b"));
        assert!(s.instance("z").is_none());
    }
}
