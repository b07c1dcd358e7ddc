//! Sextant's domain model: the words the rest of the system speaks.
//!
//! This crate owns names and their validation, the two halves of an instance (its cold
//! [`InstanceSpec`] and its hot [`InstanceStatus`]), revisions, the [`Event`]s the registry emits
//! and the rule that decides whether an instance is *serving*. It does no I/O and knows no
//! protocol: adapters translate their wire formats into these types and back.
#![forbid(unsafe_code)]

pub mod acl;
mod check;
mod text;
mod util;
mod validate;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use check::{CheckKind, HealthCheck};
pub use text::{Metadata, Text};
pub use util::{now_ms, XorShift};
pub use validate::{
    validate_host, validate_instance_id, validate_name, validate_registration,
    validate_service_name, MAX_METADATA_BYTES, MAX_METADATA_ENTRIES, MAX_METADATA_VALUE,
    MAX_WEIGHT,
};

/// A position in the registry's single, strictly increasing sequence of changes.
pub type Revision = u64;

/// Why a value from a user was refused. `field` names what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A service inside a namespace: the unit that is stored, versioned and subscribed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
}

impl ServiceKey {
    /// Builds a key after validating both names.
    pub fn new(namespace: &str, service: &str) -> Result<Self, InvalidField> {
        validate_name("namespace", namespace)?;
        validate_service_name(service)?;
        Ok(Self {
            namespace: namespace.into(),
            service: service.into(),
        })
    }

    /// Parses `namespace/service`, the form used by watch requests and the CLI.
    pub fn parse(s: &str) -> Result<Self, InvalidField> {
        match s.split_once('/') {
            Some((ns, svc)) => Self::new(ns, svc),
            None => Err(InvalidField::new(
                "service",
                format!("{s:?} is not of the form namespace/service"),
            )),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)
    }
}

/// Where an instance runs. All parts are optional (empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Location {
    pub region: Text,
    pub zone: Text,
    pub idc: Text,
}

/// The cold half of an instance: what it is and where to reach it. Rarely changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub id: Text,
    pub host: Text,
    pub port: u16,
    pub protocol: Text,
    pub version: Text,
    pub location: Location,
    /// SET / cell tag used for cell-based routing.
    pub cell: Text,
    /// Swimlane tag used for lane (e.g. canary, feature) routing.
    pub lane: Text,
    pub metadata: Metadata,
}

/// What a health check (or an operator, or a lease) last said about an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// No check has reported yet. Served, as users of every registry expect.
    #[default]
    Unknown,
    /// Alive but a check says something is off (Consul's `warning`: an HTTP check answered
    /// 429, or a TTL check was marked warn). Still served; only-passing readers (Consul's
    /// `?passing`) leave it out. Last, so records written before it decode unchanged.
    Warning,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unknown => "unknown",
            Health::Warning => "warning",
        }
    }

    pub fn parse(s: &str) -> Result<Self, InvalidField> {
        match s {
            "healthy" => Ok(Health::Healthy),
            "unhealthy" => Ok(Health::Unhealthy),
            "unknown" => Ok(Health::Unknown),
            "warning" => Ok(Health::Warning),
            other => Err(InvalidField::new(
                "health",
                format!("{other:?} is not one of healthy, unhealthy, unknown, warning"),
            )),
        }
    }
}

/// The hot half of an instance: changes often, is stored and pushed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub health: Health,
    pub enabled: bool,
    /// The weight the instance registered with, 0..=10000; 0 takes it out of rotation.
    pub weight: u32,
    /// An operator's weight (warm-up, canary) that wins over `weight` until cleared.
    pub weight_override: Option<u32>,
    /// When draining began (Unix milliseconds); a draining instance leaves discovery results
    /// but keeps its lease and health tracked.
    pub draining_since_ms: Option<u64>,
}

impl Default for InstanceStatus {
    fn default() -> Self {
        Self {
            health: Health::Unknown,
            enabled: true,
            weight: 100,
            weight_override: None,
            draining_since_ms: None,
        }
    }
}

impl InstanceStatus {
    /// The weight discovery uses: the operator's override if set, else the registered weight.
    pub fn effective_weight(&self) -> u32 {
        self.weight_override.unwrap_or(self.weight)
    }

    pub fn is_draining(&self) -> bool {
        self.draining_since_ms.is_some()
    }

    /// Serving = enabled, not draining, effective weight > 0 and not known to be unhealthy.
    pub fn is_serving(&self) -> bool {
        self.enabled
            && !self.is_draining()
            && self.effective_weight() > 0
            && self.health != Health::Unhealthy
    }

    /// Returns the status with the patch applied; `now_ms` stamps the start of a drain.
    pub fn patched(mut self, patch: &StatusPatch, now_ms: u64) -> Self {
        if let Some(h) = patch.health {
            self.health = h;
        }
        if let Some(e) = patch.enabled {
            self.enabled = e;
        }
        if let Some(w) = patch.weight {
            self.weight = w;
        }
        if let Some(o) = patch.weight_override {
            self.weight_override = o;
        }
        match patch.draining {
            Some(true) if self.draining_since_ms.is_none() => self.draining_since_ms = Some(now_ms),
            Some(false) => self.draining_since_ms = None,
            _ => {}
        }
        self
    }
}

/// A partial status update; absent fields are left as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPatch {
    pub health: Option<Health>,
    pub enabled: Option<bool>,
    pub weight: Option<u32>,
    /// `Some(Some(w))` sets the operator override, `Some(None)` clears it.
    pub weight_override: Option<Option<u32>>,
    /// `Some(true)` starts draining (keeps the original start if already draining).
    pub draining: Option<bool>,
}

impl StatusPatch {
    pub fn validate(&self) -> Result<(), InvalidField> {
        if let Some(w) = self.weight {
            validate::validate_weight(w)?;
        }
        if let Some(Some(w)) = self.weight_override {
            validate::validate_weight(w)
                .map_err(|e| InvalidField::new("weight_override", e.reason))?;
        }
        if *self == StatusPatch::default() {
            return Err(InvalidField::new(
                "status",
                "give at least one of health, enabled, weight, weight_override",
            ));
        }
        Ok(())
    }
}

/// An instance as the registry holds it: both halves plus their revisions and lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub spec: Arc<InstanceSpec>,
    pub status: InstanceStatus,
    /// 0 = persistent; otherwise the lease TTL renewed by heartbeats.
    pub ttl_seconds: u32,
    /// Revision at which the spec last changed.
    pub spec_revision: Revision,
    /// Revision at which the status last changed.
    pub status_revision: Revision,
}

impl Instance {
    pub fn is_ephemeral(&self) -> bool {
        self.ttl_seconds > 0
    }

    pub fn is_serving(&self) -> bool {
        self.status.is_serving()
    }

    /// The later of the two revisions: when this instance last changed at all.
    pub fn revision(&self) -> Revision {
        self.spec_revision.max(self.status_revision)
    }
}

/// A request to create or replace an instance. (Serde: a follower forwards it to the
/// cluster's leader.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub service: ServiceKey,
    pub spec: InstanceSpec,
    /// Initial status; `None` keeps the current status of an existing instance, or the default.
    pub status: Option<InstanceStatus>,
    pub ttl_seconds: u32,
}

/// Per-service settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// 0.0 = off. When fewer than this fraction of instances are serving, discovery returns
    /// every instance and flags the answer as protected.
    pub protect_threshold: f32,
    /// How the health scanner probes this service's instances.
    pub check: HealthCheck,
}

impl ServiceConfig {
    pub fn validate(&self) -> Result<(), InvalidField> {
        if !(0.0..=1.0).contains(&self.protect_threshold) || self.protect_threshold.is_nan() {
            return Err(InvalidField::new(
                "protect_threshold",
                "must be a fraction between 0.0 and 1.0",
            ));
        }
        self.check.validate()
    }

    /// Whether protection is active for a service with `serving` of `total` instances serving.
    pub fn protection_active(&self, serving: usize, total: usize) -> bool {
        protection_active(self.protect_threshold, serving, total)
    }
}

/// The protection rule: with a threshold above 0, fewer than `threshold × total` serving
/// instances means discovery returns them all (flagged) instead of collapsing to a few.
pub fn protection_active(threshold: f32, serving: usize, total: usize) -> bool {
    threshold > 0.0 && total > 0 && (serving as f64) < f64::from(threshold) * (total as f64)
}

/// Why an instance was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteReason {
    Deregistered,
    LeaseExpired,
}

impl DeleteReason {
    /// The name every API sends (and the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::Deregistered => "deregistered",
            DeleteReason::LeaseExpired => "lease_expired",
        }
    }

    /// `None` for a name this build does not know (a newer server's reason).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "deregistered" => Some(DeleteReason::Deregistered),
            "lease_expired" => Some(DeleteReason::LeaseExpired),
            _ => None,
        }
    }
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A new instance, or a changed spec; carries the whole instance.
    Upsert(Instance),
    /// Only the status changed; carries the small status, never the spec.
    Status {
        id: String,
        status: InstanceStatus,
    },
    Delete {
        id: String,
        reason: DeleteReason,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Upsert(_) => "upsert",
            EventKind::Status { .. } => "status",
            EventKind::Delete { .. } => "delete",
        }
    }

    pub fn instance_id(&self) -> &str {
        match self {
            EventKind::Upsert(i) => &i.spec.id,
            EventKind::Status { id, .. } | EventKind::Delete { id, .. } => id,
        }
    }
}

/// One change to one service, at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: Revision,
    pub service: ServiceKey,
    pub kind: EventKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_rule() {
        let mut s = InstanceStatus::default();
        assert!(s.is_serving(), "unknown health is served");
        s.health = Health::Unhealthy;
        assert!(!s.is_serving());
        s.health = Health::Healthy;
        s.weight = 0;
        assert!(!s.is_serving());
        s.weight = 1;
        s.enabled = false;
        assert!(!s.is_serving());
        s.enabled = true;
        s.weight_override = Some(0);
        assert!(!s.is_serving(), "an operator's weight 0 wins");
        s.weight_override = None;
        assert!(s.is_serving());
    }

    #[test]
    fn drain_and_undrain() {
        let drain = StatusPatch {
            draining: Some(true),
            ..Default::default()
        };
        let s = InstanceStatus::default().patched(&drain, 1000);
        assert!(!s.is_serving());
        assert_eq!(s.draining_since_ms, Some(1000));
        // Draining again keeps the original start.
        assert_eq!(s.patched(&drain, 5000).draining_since_ms, Some(1000));
        let undrain = StatusPatch {
            draining: Some(false),
            ..Default::default()
        };
        assert!(s.patched(&undrain, 6000).is_serving());
    }

    #[test]
    fn protection_threshold() {
        let off = ServiceConfig::default();
        assert!(!off.protection_active(0, 10));
        let half = ServiceConfig {
            protect_threshold: 0.5,
            ..Default::default()
        };
        assert!(half.protection_active(4, 10));
        assert!(!half.protection_active(5, 10));
        assert!(
            !half.protection_active(0, 0),
            "an empty service is not protected"
        );
        assert!(ServiceConfig {
            protect_threshold: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn service_key_parse() {
        let k = ServiceKey::parse("prod/orders").unwrap();
        assert_eq!(&*k.namespace, "prod");
        assert_eq!(k.to_string(), "prod/orders");
        assert!(ServiceKey::parse("noslash").is_err());
        assert!(ServiceKey::parse("a/b/c").is_err());
    }

    #[test]
    fn patch_applies_only_given_fields() {
        let s = InstanceStatus::default().patched(
            &StatusPatch {
                weight: Some(7),
                ..Default::default()
            },
            0,
        );
        assert_eq!(s.weight, 7);
        assert!(s.enabled);
        assert!(StatusPatch::default().validate().is_err());
    }
}
