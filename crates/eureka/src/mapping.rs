//! Every rule that maps Eureka's wire model onto Sextant's, and back. Pure: no I/O, no clock
//! (callers pass the time), so each rule is unit- and property-tested here.
//!
//! - **Names**: Eureka's app `ORDERS` is the Sextant service `orders` in the `public`
//!   namespace ([`app_to_service`] lower-cases); a service is shown to Eureka clients under its
//!   name in upper case ([`service_to_app`]), and only when that name has no upper-case letter
//!   (a service registered natively as `Orders` would collide with `orders`, so Eureka does not
//!   see it).
//! - **Instance**: `instanceId` (else the Amazon `instance-id`, else `hostName`) is the id,
//!   `ipAddr` the host; the port is `port.$` when `port.@enabled`, else `securePort.$` with
//!   protocol `https`. Every other top-level field the client sent is kept, as sent, in the
//!   instance's metadata under the reserved prefix `eureka/` (`eureka/field/<name>` for a
//!   string, `eureka/json/<name>` for any other JSON value), so a Eureka client reads back what
//!   it registered. The client's own `metadata` entries become plain Sextant metadata; those
//!   whose keys Sextant cannot hold (or that start with `eureka/`) are kept together as one
//!   JSON object under `eureka/metadata`.
//! - **Status**: the client's `UP` is Sextant health `healthy`, anything else `unhealthy`
//!   (not serving). A status override (`OUT_OF_SERVICE`, `DOWN`) is the operator switch
//!   `enabled = false` plus `eureka/override`; an `UP` override is `enabled = true`. The status
//!   shown is [`shown_status`]: Sextant's serving rule decides, so a native drain or weight 0
//!   shows as `DOWN` and a native `enabled = false` as `OUT_OF_SERVICE`.
//! - **Lease**: `leaseInfo.durationInSecs` (default 90 s) is the ephemeral instance's TTL.
//!
//! The XML form of an answer is built from its JSON form by [`crate::xml`], so both carry the
//! same data.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use sextant_core::model::{
    validate_host, validate_instance_id, validate_service_name, Health, Instance, InstanceSpec,
    InstanceStatus, Location, Metadata, Text,
};

/// The Sextant namespace Eureka clients live in.
pub const NAMESPACE: &str = "public";
/// Metadata keys starting with this belong to the adapter.
pub const RESERVED_PREFIX: &str = "eureka/";
/// A top-level string field as sent: `eureka/field/<name>`.
const FIELD_PREFIX: &str = "eureka/field/";
/// A top-level non-string field as sent, as compact JSON: `eureka/json/<name>`.
const JSON_PREFIX: &str = "eureka/json/";
/// The client's own `metadata` entries Sextant cannot hold as plain keys, as a JSON object.
const EXTRA_METADATA_KEY: &str = "eureka/metadata";
/// The status the client itself reported (`UP`, `DOWN`, `STARTING`, ...).
pub const STATUS_KEY: &str = "eureka/status";
/// A status override set through `PUT .../status`.
pub const OVERRIDE_KEY: &str = "eureka/override";
/// When the instance was last registered through Eureka (Unix milliseconds).
const UPDATED_KEY: &str = "eureka/updated";
/// Eureka's default lease (`leaseInfo.durationInSecs`).
pub const DEFAULT_LEASE_SECONDS: u32 = 90;
/// Longest lease Sextant accepts (its TTL limit).
pub const MAX_LEASE_SECONDS: u32 = 24 * 3600;
const DEFAULT_RENEWAL_SECONDS: u32 = 30;
const DEFAULT_DATA_CENTER_CLASS: &str = "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo";

/// Top-level fields that map onto Sextant's model or are computed on read, so are not kept raw.
const MAPPED_FIELDS: &[&str] = &[
    "instanceId",
    "app",
    "ipAddr",
    "status",
    "overriddenStatus",
    "overriddenstatus",
    "metadata",
    "actionType",
    "lastUpdatedTimestamp",
];

/// Why a Eureka request could not be mapped; always the client's fault (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// A required field is absent or empty (Eureka's own wording: "Missing instanceId").
    #[error("Missing {0}")]
    Missing(&'static str),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> MappingError {
    MappingError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Eureka's instance statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EurekaStatus {
    Up,
    Down,
    Starting,
    OutOfService,
    Unknown,
}

impl EurekaStatus {
    pub const ALL: [EurekaStatus; 5] = [
        EurekaStatus::Up,
        EurekaStatus::Down,
        EurekaStatus::Starting,
        EurekaStatus::OutOfService,
        EurekaStatus::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EurekaStatus::Up => "UP",
            EurekaStatus::Down => "DOWN",
            EurekaStatus::Starting => "STARTING",
            EurekaStatus::OutOfService => "OUT_OF_SERVICE",
            EurekaStatus::Unknown => "UNKNOWN",
        }
    }

    /// Like Eureka's `InstanceStatus.toEnum`: case-insensitive, anything else is `UNKNOWN`.
    pub fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
            .unwrap_or(EurekaStatus::Unknown)
    }
}

/// The Sextant service of a Eureka app name: the name in lower case.
pub fn app_to_service(app: &str) -> Result<String, MappingError> {
    let service = app.trim().to_ascii_lowercase();
    if service.is_empty() {
        return Err(MappingError::Missing("app"));
    }
    validate_service_name(&service).map_err(|e| invalid("app", e.reason))?;
    Ok(service)
}

/// The Eureka app name of a Sextant service, when Eureka clients can see it: the name in upper
/// case, for names without upper-case letters (so the mapping is one to one).
pub fn service_to_app(service: &str) -> Option<String> {
    if service.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Some(service.to_ascii_uppercase())
}

/// A registration request mapped onto Sextant's model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EurekaRegistration {
    /// The Sextant service (see [`app_to_service`]).
    pub service: String,
    pub spec: InstanceSpec,
    /// The status the client reported, before any override.
    pub own_status: EurekaStatus,
    /// Health from `own_status`; enabled, weight 100 (the caller keeps an override).
    pub status: InstanceStatus,
    pub ttl_seconds: u32,
    /// The client's `lastDirtyTimestamp`, when it sent one.
    pub last_dirty: Option<u64>,
}

fn str_field<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    o.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A number Eureka may send as a JSON number or a string (`"8080"`, `"1700000000000"`).
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `true`, `"true"` (any case): how Eureka writes `@enabled`.
fn truthy(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => Some(s.trim().eq_ignore_ascii_case("true")),
        _ => None,
    }
}

/// `{"$": 8080, "@enabled": "true"}` (or a bare number) → (port, enabled).
fn port_of(v: Option<&Value>) -> Option<(u64, Option<bool>)> {
    match v? {
        Value::Object(o) => Some((o.get("$").and_then(number)?, truthy(o.get("@enabled")))),
        other => Some((number(other)?, None)),
    }
}

/// A metadata key Sextant can hold as is (and that is not the adapter's).
fn plain_metadata_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 128
        && !k.starts_with(RESERVED_PREFIX)
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

/// A top-level field name that fits a metadata key after its prefix.
fn keepable_field(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 100
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Maps the body of `POST /apps/{APP}` (`{"instance": {...}}`). `now_ms` stamps the
/// registration (`lastUpdatedTimestamp`).
pub fn parse_register(body: &Value, now_ms: u64) -> Result<EurekaRegistration, MappingError> {
    let inst = body
        .get("instance")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("instance", "the body must be {\"instance\": {...}}"))?;
    let host_name = str_field(inst, "hostName");
    let dci = inst.get("dataCenterInfo").and_then(Value::as_object);
    let amazon_id = dci
        .filter(|d| str_field(d, "name").is_some_and(|n| n.eq_ignore_ascii_case("amazon")))
        .and_then(|d| d.get("metadata"))
        .and_then(Value::as_object)
        .and_then(|m| str_field(m, "instance-id"));
    // Eureka's InstanceInfo.getId(): instanceId, else the Amazon instance id, else hostName.
    let id = str_field(inst, "instanceId")
        .or(amazon_id)
        .or(host_name)
        .ok_or(MappingError::Missing("instanceId"))?;
    if host_name.is_none() {
        return Err(MappingError::Missing("hostName"));
    }
    let ip = str_field(inst, "ipAddr").ok_or(MappingError::Missing("ipAddr"))?;
    let app = str_field(inst, "app").ok_or(MappingError::Missing("app"))?;
    let dci = dci.ok_or(MappingError::Missing("dataCenterInfo"))?;
    if str_field(dci, "name").is_none() {
        return Err(MappingError::Missing("dataCenterInfo Name"));
    }
    let service = app_to_service(app)?;
    validate_instance_id(id).map_err(|e| invalid("instanceId", e.reason))?;
    validate_host(ip).map_err(|e| invalid("ipAddr", e.reason))?;

    let (port, protocol) = {
        let plain = port_of(inst.get("port"));
        let secure = port_of(inst.get("securePort"));
        let plain_on = plain.is_some_and(|(_, e)| e != Some(false));
        let secure_on = secure.is_some_and(|(_, e)| e == Some(true));
        match (plain, secure) {
            (Some((p, _)), _) if plain_on => (p, "http"),
            (_, Some((p, _))) if secure_on => (p, "https"),
            (Some((p, _)), _) => (p, "http"),
            // Eureka's InstanceInfo default port.
            (None, _) => (7001, "http"),
        }
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid("port", format!("must be 1-65535, got {port}")))?;

    let ttl_seconds = match inst.get("leaseInfo").and_then(|l| l.get("durationInSecs")) {
        None | Some(Value::Null) => DEFAULT_LEASE_SECONDS,
        Some(v) => match number(v) {
            Some(0) => DEFAULT_LEASE_SECONDS,
            Some(n) if n <= u64::from(MAX_LEASE_SECONDS) => n as u32,
            _ => {
                return Err(invalid(
                    "leaseInfo.durationInSecs",
                    format!("must be a number of seconds, 1-{MAX_LEASE_SECONDS}, got {v}"),
                ))
            }
        },
    };
    let own_status = inst
        .get("status")
        .and_then(Value::as_str)
        .map_or(EurekaStatus::Up, EurekaStatus::parse);
    let last_dirty = inst.get("lastDirtyTimestamp").and_then(number);

    let mut meta: Vec<(String, String)> = Vec::new();
    let mut extra = Map::new();
    if let Some(m) = inst.get("metadata").and_then(Value::as_object) {
        for (k, v) in m {
            if plain_metadata_key(k) {
                meta.push((k.clone(), scalar_text(v)));
            } else {
                extra.insert(k.clone(), v.clone());
            }
        }
    }
    if !extra.is_empty() {
        meta.push((EXTRA_METADATA_KEY.into(), Value::Object(extra).to_string()));
    }
    for (k, v) in inst {
        if MAPPED_FIELDS.contains(&k.as_str()) || !keepable_field(k) {
            continue;
        }
        match v {
            Value::String(s) => meta.push((format!("{FIELD_PREFIX}{k}"), s.clone())),
            Value::Null => {}
            other => meta.push((format!("{JSON_PREFIX}{k}"), other.to_string())),
        }
    }
    meta.push((STATUS_KEY.into(), own_status.as_str().into()));
    meta.push((UPDATED_KEY.into(), now_ms.to_string()));

    let spec = InstanceSpec {
        id: id.into(),
        host: ip.into(),
        port,
        protocol: protocol.into(),
        version: Text::default(),
        location: Location::default(),
        cell: Text::default(),
        lane: Text::default(),
        metadata: meta.into_iter().collect(),
    };
    let status = InstanceStatus {
        health: if own_status == EurekaStatus::Up {
            Health::Healthy
        } else {
            Health::Unhealthy
        },
        ..InstanceStatus::default()
    };
    Ok(EurekaRegistration {
        service,
        spec,
        own_status,
        status,
        ttl_seconds,
        last_dirty,
    })
}

/// The `lastDirtyTimestamp` an instance was registered with, if any.
pub fn last_dirty(spec: &InstanceSpec) -> Option<u64> {
    let m = &spec.metadata;
    m.get("eureka/field/lastDirtyTimestamp")
        .or_else(|| m.get("eureka/json/lastDirtyTimestamp"))
        .and_then(|s| s.trim().trim_matches('"').parse().ok())
}

/// The override recorded on an instance, if any.
pub fn override_of(spec: &InstanceSpec) -> Option<EurekaStatus> {
    spec.metadata.get(OVERRIDE_KEY).map(EurekaStatus::parse)
}

/// `spec` with the status override set (`Some`) or removed (`None`).
pub fn with_override(spec: &InstanceSpec, status: Option<EurekaStatus>) -> InstanceSpec {
    with_meta(spec, OVERRIDE_KEY, status.map(EurekaStatus::as_str))
}

/// `spec` with its own status (the one the client reported) replaced.
pub fn with_own_status(spec: &InstanceSpec, status: EurekaStatus) -> InstanceSpec {
    with_meta(spec, STATUS_KEY, Some(status.as_str()))
}

/// `spec` with metadata `key` set to `value`, or removed when `None`.
fn with_meta(spec: &InstanceSpec, key: &str, value: Option<&str>) -> InstanceSpec {
    let mut out = spec.clone();
    out.metadata = spec
        .metadata
        .iter()
        .filter(|(k, _)| *k != key)
        .map(|(k, v)| (Text::from(k), Text::from(v)))
        .chain(value.map(|v| (Text::from(key), Text::from(v))))
        .collect::<Metadata>();
    out
}

/// Whether an override takes the instance out of service (Sextant's `enabled = false`).
pub fn override_disables(status: EurekaStatus) -> bool {
    matches!(status, EurekaStatus::OutOfService | EurekaStatus::Down)
}

/// The status a Eureka client sees. Sextant's serving rule decides: a serving instance is
/// `UP` (unless overridden); one that is not serving shows its override, else the status it
/// reported when that is not `UP`, else `OUT_OF_SERVICE` when disabled, else `DOWN`. While the
/// service's protection threshold has tripped (`protected`), an instance kept out only by its
/// health counts as serving, as in Sextant's healthy-only discovery.
pub fn shown_status(inst: &Instance, protected: bool) -> EurekaStatus {
    let overridden = override_of(&inst.spec);
    let own = inst.spec.metadata.get(STATUS_KEY).map(EurekaStatus::parse);
    let mut st = inst.status;
    if protected {
        st.health = Health::Unknown;
    }
    if st.is_serving() {
        return match overridden {
            Some(o) if o != EurekaStatus::Up => o,
            _ => EurekaStatus::Up,
        };
    }
    if let Some(o) = overridden.filter(|o| *o != EurekaStatus::Up) {
        return o;
    }
    match own {
        Some(s) if s != EurekaStatus::Up && inst.status.health == Health::Unhealthy => s,
        _ if !inst.status.enabled => EurekaStatus::OutOfService,
        _ => EurekaStatus::Down,
    }
}

/// One instance in Eureka's JSON form (`InstanceInfo`), for `app` (upper case) of `service`.
pub fn render_instance(app: &str, service: &str, inst: &Instance, protected: bool) -> Value {
    let spec = &inst.spec;
    let https = spec.protocol == "https";
    let status = shown_status(inst, protected);
    let updated = spec.metadata.get(UPDATED_KEY).unwrap_or("0").to_string();
    let lease = if inst.ttl_seconds > 0 {
        inst.ttl_seconds
    } else {
        DEFAULT_LEASE_SECONDS
    };
    let mut user_meta = Map::new();
    for (k, v) in spec.metadata.iter() {
        if !k.starts_with(RESERVED_PREFIX) {
            user_meta.insert(k.into(), Value::String(v.into()));
        }
    }
    if let Some(Ok(Value::Object(extra))) = spec
        .metadata
        .get(EXTRA_METADATA_KEY)
        .map(serde_json::from_str::<Value>)
    {
        user_meta.extend(extra);
    }
    let mut o = Map::new();
    o.insert("instanceId".into(), json!(spec.id.as_str()));
    o.insert("hostName".into(), json!(spec.host.as_str()));
    o.insert("app".into(), json!(app));
    o.insert("ipAddr".into(), json!(spec.host.as_str()));
    o.insert("status".into(), json!(status.as_str()));
    o.insert(
        "overriddenStatus".into(),
        json!(override_of(spec).unwrap_or(EurekaStatus::Unknown).as_str()),
    );
    o.insert(
        "port".into(),
        json!({"$": if https { 80 } else { spec.port }, "@enabled": (!https).to_string()}),
    );
    o.insert(
        "securePort".into(),
        json!({"$": if https { spec.port } else { 443 }, "@enabled": https.to_string()}),
    );
    o.insert("countryId".into(), json!(1));
    o.insert(
        "dataCenterInfo".into(),
        json!({"@class": DEFAULT_DATA_CENTER_CLASS, "name": "MyOwn"}),
    );
    o.insert(
        "leaseInfo".into(),
        json!({
            "renewalIntervalInSecs": DEFAULT_RENEWAL_SECONDS.min(lease),
            "durationInSecs": lease,
            "registrationTimestamp": 0,
            "lastRenewalTimestamp": 0,
            "evictionTimestamp": 0,
            "serviceUpTimestamp": 0,
        }),
    );
    o.insert("vipAddress".into(), json!(service));
    o.insert("secureVipAddress".into(), json!(service));
    o.insert("isCoordinatingDiscoveryServer".into(), json!("false"));
    o.insert("lastDirtyTimestamp".into(), json!(updated.clone()));
    // What the client sent wins over the defaults above.
    for (k, v) in spec.metadata.iter() {
        if let Some(f) = k.strip_prefix(FIELD_PREFIX) {
            o.insert(f.into(), Value::String(v.into()));
        } else if let Some(f) = k.strip_prefix(JSON_PREFIX) {
            if let Ok(v) = serde_json::from_str::<Value>(v) {
                // An object the client sent completes the default one (`leaseInfo` keeps its
                // timestamps, `dataCenterInfo` its `@class`), its own keys winning.
                match (o.get_mut(f), v) {
                    (Some(Value::Object(default)), Value::Object(sent)) => default.extend(sent),
                    (_, v) => {
                        o.insert(f.into(), v);
                    }
                }
            }
        }
    }
    o.insert("metadata".into(), Value::Object(user_meta));
    o.insert("lastUpdatedTimestamp".into(), json!(updated));
    o.insert("actionType".into(), json!("ADDED"));
    Value::Object(o)
}

/// An application: `{"name": APP, "instance": [...]}` (`instance` always an array).
pub fn render_application(
    app: &str,
    service: &str,
    instances: &[Instance],
    protected: bool,
) -> Value {
    let list: Vec<Value> = instances
        .iter()
        .map(|i| render_instance(app, service, i, protected))
        .collect();
    json!({"name": app, "instance": list})
}

/// Eureka's `apps__hashcode`: `STATUS_count_` for each status, in status-name order
/// (`DOWN_1_UP_3_`).
pub fn apps_hashcode<'a>(statuses: impl IntoIterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in statuses {
        *counts.entry(s).or_default() += 1;
    }
    counts.iter().map(|(s, n)| format!("{s}_{n}_")).collect()
}

/// The whole registry: `{"applications": {versions__delta, apps__hashcode, application: [...]}}`.
pub fn render_applications(version: u64, applications: Vec<Value>) -> Value {
    let hash = apps_hashcode(
        applications
            .iter()
            .filter_map(|a| a.get("instance").and_then(Value::as_array))
            .flatten()
            .filter_map(|i| i.get("status").and_then(Value::as_str)),
    );
    json!({"applications": {
        "versions__delta": version.to_string(),
        "apps__hashcode": hash,
        "application": applications,
    }})
}

#[cfg(test)]
mod tests;
