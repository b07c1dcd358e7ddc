//! Every rule between Consul's model and Sextant's, pure (no I/O, no clock) and
//! property-tested:
//!
//! - **Registrations.** A Consul agent service registration (`ID`, `Name`, `Tags`, `Address`,
//!   `Port`, `Meta`, `Weights`, `Check`/`Checks`) becomes one persistent Sextant instance of
//!   service `Name`, id `ID` (default `Name`). Keys are matched as Consul's own decoder does:
//!   case-insensitively, and `snake_case` aliases (`deregister_critical_service_after`) too.
//!   Tags are the instance's `tags` metadata (comma-separated; where the DNS adapter reads
//!   them), `Meta` its other metadata, `Weights.Passing` its weight, and the check definitions
//!   are kept, as compact JSON, in its `consul.checks` metadata (which also marks it as
//!   registered through the agent API, and survives a restart with the instance).
//! - **Checks.** A TTL check is kept by the adapter (`agent`); an HTTP, TCP or gRPC check
//!   becomes the *service's* health check, run by Sextant's central scanner at each instance's
//!   own address (a loopback host in the URL, as a Consul agent on the same machine would use,
//!   is probed at the instance's address; any other host is refused). Statuses map
//!   `passing` ↔ healthy (and unknown), `warning` ↔ warning, `critical` ↔ unhealthy.
//! - **Nodes.** Consul has agents on nodes; Sextant has none, so each distinct instance host is
//!   a synthetic node named by that host, with a stable UUID-shaped id and one always-passing
//!   `serfHealth` check.
//! - **Maintenance.** An instance out of rotation for a reason other than its health (disabled,
//!   draining, weight 0) carries the critical `_service_maintenance:<id>` check Consul clients
//!   look for.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sextant_core::model::{
    validate_instance_id, validate_service_name, CheckKind, Health, HealthCheck, Instance,
    InstanceSpec, Metadata,
};

/// Sextant namespace Consul requests use unless they name one (`?ns=`, `X-Consul-Namespace`).
pub const NAMESPACE: &str = "public";
/// The metadata key holding an instance's tags (shared with the DNS adapter).
pub const TAGS_KEY: &str = "tags";
/// The metadata key holding an agent-registered instance's check definitions.
pub const CHECKS_KEY: &str = "consul.checks";
/// Metadata keys of this prefix are the adapter's own, never shown as `Meta`.
const OWN_PREFIX: &str = "consul.";
/// The protocol Sextant records for Consul-registered instances (Consul has none; a
/// `Meta.protocol` is kept as metadata).
const PROTOCOL: &str = "tcp";
/// Consul's default timeout of an active check.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The check id and name of maintenance mode, which clients match on.
pub const MAINTENANCE_PREFIX: &str = "_service_maintenance:";
pub const MAINTENANCE_NAME: &str = "Service Maintenance Mode";
/// Consul's default weight of an instance whose checks warn.
const WARNING_WEIGHT: u32 = 1;
/// Sextant's weight for a registration that gives none.
const DEFAULT_WEIGHT: u32 = 100;

/// A request Sextant cannot map; the message names the field and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, MappingError> {
    Err(MappingError(msg.into()))
}

/// A Consul check status, in order of severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Result<Self, MappingError> {
        match s {
            "passing" => Ok(Status::Passing),
            "warning" => Ok(Status::Warning),
            "critical" => Ok(Status::Critical),
            other => bad(format!(
                "Status {other:?} is not one of passing, warning, critical"
            )),
        }
    }

    /// What a check says about an instance whose health is `h`.
    pub fn from_health(h: Health) -> Self {
        match h {
            Health::Healthy | Health::Unknown => Status::Passing,
            Health::Warning => Status::Warning,
            Health::Unhealthy => Status::Critical,
        }
    }

    pub fn to_health(self) -> Health {
        match self {
            Status::Passing => Health::Healthy,
            Status::Warning => Health::Warning,
            Status::Critical => Health::Unhealthy,
        }
    }
}

/// The worst of `statuses` (passing for none).
pub fn worst(statuses: impl IntoIterator<Item = Status>) -> Status {
    statuses.into_iter().max().unwrap_or(Status::Passing)
}

/// What a check runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// The client reports; critical when it has not for `ttl_ms`.
    Ttl {
        ttl_ms: u64,
    },
    Http {
        url: String,
    },
    Tcp {
        addr: String,
    },
    Grpc {
        target: String,
    },
}

impl Probe {
    /// Consul's `Type` of a check.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Ttl { .. } => "ttl",
            Probe::Http { .. } => "http",
            Probe::Tcp { .. } => "tcp",
            Probe::Grpc { .. } => "grpc",
        }
    }
}

/// One check of an agent-registered instance, as kept in its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDef {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
    pub probe: Probe,
    /// Remove the instance once this check has been critical this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister_after_ms: Option<u64>,
}

/// A parsed agent service registration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRegistration {
    pub namespace: Option<String>,
    pub name: String,
    pub spec: InstanceSpec,
    pub weight: u32,
    pub checks: Vec<CheckDef>,
    /// Each check's status at registration (`Status`, else critical, as Consul starts them).
    pub initial: Vec<Status>,
    /// The service's health check for the scanner, from the one HTTP/TCP/gRPC check.
    pub service_check: Option<HealthCheck>,
}

impl AgentRegistration {
    /// The instance's health when first registered: the worst initial check status, or
    /// unknown (served) without checks.
    pub fn initial_health(&self) -> Health {
        if self.initial.is_empty() {
            Health::Unknown
        } else {
            worst(self.initial.iter().copied()).to_health()
        }
    }
}

/// A JSON object whose keys are matched as Consul's decoder matches them: ignoring case and
/// underscores.
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    /// Where this object is, for messages (`Check`, `Checks[1]`).
    at: &'a str,
}

fn normalized(k: &str) -> String {
    k.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

impl<'a> Fields<'a> {
    pub fn new(v: &'a Value, at: &'a str) -> Result<Self, MappingError> {
        match v {
            Value::Object(obj) => Ok(Self { obj, at }),
            _ => bad(format!("{} must be a JSON object", at_or(at, "the body"))),
        }
    }

    fn name(&self, field: &str) -> String {
        if self.at.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.at)
        }
    }

    /// The value of `field` (`null` counts as absent).
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        let want = normalized(field);
        self.obj
            .iter()
            .find(|(k, _)| normalized(k) == want)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    pub fn str(&self, field: &str) -> Result<Option<&'a str>, MappingError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => bad(format!("{} must be a string", self.name(field))),
        }
    }

    /// A non-empty string.
    fn text(&self, field: &str) -> Result<Option<&'a str>, MappingError> {
        Ok(self.str(field)?.filter(|s| !s.is_empty()))
    }

    fn uint(&self, field: &str) -> Result<Option<u64>, MappingError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => Ok(Some(v)),
                None => bad(format!(
                    "{} must be a whole number ≥ 0, got {n}",
                    self.name(field)
                )),
            },
            Some(_) => bad(format!("{} must be a number", self.name(field))),
        }
    }

    fn bool(&self, field: &str) -> Result<bool, MappingError> {
        match self.get(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => bad(format!("{} must be true or false", self.name(field))),
        }
    }

    /// A Go duration (`"10s"`, `"1m30s"`, `"500ms"`), or a number of nanoseconds.
    fn duration(&self, field: &str) -> Result<Option<Duration>, MappingError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => parse_duration(s)
                .map(Some)
                .map_err(|e| MappingError(format!("{}: {e}", self.name(field)))),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(ns) => Ok(Some(Duration::from_nanos(ns))),
                None => bad(format!("{} must be a duration", self.name(field))),
            },
            Some(_) => bad(format!(
                "{} must be a duration such as \"10s\"",
                self.name(field)
            )),
        }
    }
}

fn at_or<'a>(at: &'a str, default: &'a str) -> &'a str {
    if at.is_empty() {
        default
    } else {
        at
    }
}

/// A Go-style duration: `"10s"`, `"1m30s"`, `"250ms"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as \"10s\" or \"1m30s\" ({e})"))
}

/// Parses an agent service registration body. `peer_ip` is the address used when the
/// registration gives none (a Consul agent would use its node's); `min_deregister_after` is
/// the smallest `DeregisterCriticalServiceAfter` (Consul's is one minute; smaller values are
/// raised to it, as Consul does).
pub fn parse_registration(
    body: &Value,
    peer_ip: &str,
    min_deregister_after: Duration,
) -> Result<AgentRegistration, MappingError> {
    let f = Fields::new(body, "")?;
    let name = f
        .text("Name")?
        .ok_or_else(|| MappingError("Name is required: the service's name".into()))?;
    validate_service_name(name).map_err(|e| MappingError(format!("Name: {}", e.reason)))?;
    let id = f.text("ID")?.unwrap_or(name);
    validate_instance_id(id).map_err(|e| MappingError(format!("ID: {}", e.reason)))?;
    if let Some(kind) = f.text("Kind")? {
        return bad(format!(
            "Kind {kind:?} is not served: Sextant registers typical services only (no Connect proxies or gateways)"
        ));
    }
    for unsupported in ["Proxy", "Connect", "SocketPath"] {
        if f.get(unsupported)
            .is_some_and(|v| v != &json!({}) && v != "")
        {
            return bad(format!(
                "{unsupported} is not served: Sextant has no Consul Connect service mesh (its mesh is xDS)"
            ));
        }
    }
    let port = match f.uint("Port")? {
        Some(p @ 1..=65535) => p as u16,
        Some(p) => return bad(format!("Port must be 1-65535, got {p}")),
        None => return bad("Port is required: every Sextant instance has a port"),
    };
    let host = f.text("Address")?.unwrap_or(peer_ip);
    let mut metadata = Metadata::new();
    if let Some(tags) = f.get("Tags") {
        let Value::Array(items) = tags else {
            return bad("Tags must be a list of strings");
        };
        let mut tags = Vec::with_capacity(items.len());
        for t in items {
            let Value::String(t) = t else {
                return bad("Tags must be a list of strings");
            };
            if t.is_empty() || t.contains(',') {
                return bad(format!(
                    "tag {t:?}: Sextant keeps tags comma-separated, so a tag must be non-empty and contain no comma"
                ));
            }
            if !tags.contains(&t.as_str()) {
                tags.push(t.as_str());
            }
        }
        if !tags.is_empty() {
            metadata.insert(TAGS_KEY, tags.join(","));
        }
    }
    if let Some(meta) = f.get("Meta") {
        let Value::Object(meta) = meta else {
            return bad("Meta must be an object of string values");
        };
        for (k, v) in meta {
            let Value::String(v) = v else {
                return bad(format!("Meta.{k} must be a string"));
            };
            if k == TAGS_KEY || k.starts_with(OWN_PREFIX) {
                return bad(format!(
                    "Meta key {k:?} is reserved: Sextant keeps tags and check definitions there"
                ));
            }
            metadata.insert(k.as_str(), v.as_str());
        }
    }
    let weight = match f.get("Weights") {
        None => DEFAULT_WEIGHT,
        Some(w) => {
            let w = Fields::new(w, "Weights")?;
            match w.uint("Passing")? {
                None => DEFAULT_WEIGHT,
                Some(p @ 1..=10_000) => p as u32,
                Some(p) => return bad(format!("Weights.Passing must be 1-10000, got {p}")),
            }
        }
    };

    let mut raw: Vec<(String, &Value)> = Vec::new();
    if let Some(c) = f.get("Check") {
        raw.push(("Check".into(), c));
    }
    if let Some(cs) = f.get("Checks") {
        let Value::Array(items) = cs else {
            return bad("Checks must be a list of checks");
        };
        for (i, c) in items.iter().enumerate() {
            raw.push((format!("Checks[{i}]"), c));
        }
    }
    let spec = InstanceSpec {
        id: id.into(),
        host: host.into(),
        port,
        protocol: PROTOCOL.into(),
        version: Default::default(),
        location: Default::default(),
        cell: Default::default(),
        lane: Default::default(),
        metadata,
    };
    let mut reg = AgentRegistration {
        namespace: f.text("Namespace")?.map(str::to_string),
        name: name.to_string(),
        spec,
        weight,
        checks: Vec::with_capacity(raw.len()),
        initial: Vec::with_capacity(raw.len()),
        service_check: None,
    };
    let several = raw.len() > 1;
    for (i, (at, c)) in raw.iter().enumerate() {
        let c = Fields::new(c, at)?;
        let default_id = if several {
            format!("service:{id}:{}", i + 1)
        } else {
            format!("service:{id}")
        };
        let (def, status, active) =
            parse_check(&c, &default_id, name, &reg.spec, min_deregister_after)?;
        if reg.checks.iter().any(|d| d.id == def.id) {
            return bad(format!("{at}: check id {:?} is given twice", def.id));
        }
        if let Some(active) = active {
            if reg.service_check.is_some() {
                return bad(format!(
                    "{at}: Sextant runs one HTTP, TCP or gRPC check per service instance; this registration has two"
                ));
            }
            reg.service_check = Some(active);
        }
        reg.checks.push(def);
        reg.initial.push(status);
    }
    let ttl = reg
        .checks
        .iter()
        .any(|c| matches!(c.probe, Probe::Ttl { .. }));
    if ttl && reg.service_check.is_some() {
        return bad(
            "Sextant cannot combine a TTL check with an HTTP, TCP or gRPC check on one instance: register either kind",
        );
    }
    // Kept even when empty: it marks the instance as registered through the agent API.
    let encoded = encode_checks(&reg.checks);
    if encoded.len() > sextant_core::model::MAX_METADATA_VALUE {
        return bad(format!(
            "the checks take {} bytes of definition; Sextant keeps at most {}: register fewer checks or shorter names",
            encoded.len(),
            sextant_core::model::MAX_METADATA_VALUE
        ));
    }
    reg.spec.metadata.insert(CHECKS_KEY, encoded);
    Ok(reg)
}

/// Parses one check of a registration (or of `/v1/agent/check/register`): its definition,
/// its initial status and, for an HTTP/TCP/gRPC check, the service health check the scanner
/// runs.
pub fn parse_check(
    c: &Fields<'_>,
    default_id: &str,
    service_name: &str,
    spec: &InstanceSpec,
    min_deregister_after: Duration,
) -> Result<(CheckDef, Status, Option<HealthCheck>), MappingError> {
    for (field, what) in [
        ("Args", "script"),
        ("ScriptArgs", "script"),
        ("Script", "script"),
        ("DockerContainerID", "Docker"),
        ("Shell", "Docker"),
        ("H2PING", "HTTP/2 ping"),
        ("UDP", "UDP"),
        ("AliasService", "alias"),
        ("AliasNode", "alias"),
        ("OSService", "OS service"),
    ] {
        if c.get(field).is_some_and(|v| v != "" && v != &json!([])) {
            return bad(format!(
                "{}: {what} checks are not served; Sextant runs TTL, HTTP, TCP and gRPC checks",
                c.name(field)
            ));
        }
    }
    let id = c
        .text("CheckID")?
        .or(c.text("ID")?)
        .unwrap_or(default_id)
        .to_string();
    let name = c
        .text("Name")?
        .map_or_else(|| format!("Service '{service_name}' check"), str::to_string);
    let notes = c.str("Notes")?.unwrap_or_default().to_string();
    let status = match c.text("Status")? {
        Some(s) => {
            Status::parse(s).map_err(|e| MappingError(format!("{}: {e}", c.name("Status"))))?
        }
        None => Status::Critical,
    };
    let deregister_after_ms = c
        .duration("DeregisterCriticalServiceAfter")?
        .filter(|d| !d.is_zero())
        .map(|d| d.max(min_deregister_after).as_millis() as u64);
    let ttl = c.duration("TTL")?;
    let http = c.text("HTTP")?;
    let tcp = c.text("TCP")?;
    let grpc = c.text("GRPC")?;
    let given = [ttl.is_some(), http.is_some(), tcp.is_some(), grpc.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given == 0 {
        return bad(format!(
            "{}: a check needs one of TTL, HTTP, TCP or GRPC",
            at_or(c.at, "the check")
        ));
    }
    if given > 1 {
        return bad(format!(
            "{}: give only one of TTL, HTTP, TCP or GRPC",
            at_or(c.at, "the check")
        ));
    }
    if let Some(ttl) = ttl {
        if ttl.is_zero() {
            return bad(format!("{}: must be longer than 0", c.name("TTL")));
        }
        let def = CheckDef {
            id,
            name,
            notes,
            probe: Probe::Ttl {
                ttl_ms: ttl.as_millis().max(1) as u64,
            },
            deregister_after_ms,
        };
        return Ok((def, status, None));
    }
    let interval = c.duration("Interval")?.ok_or_else(|| {
        MappingError(format!(
            "{}: is required for an HTTP, TCP or gRPC check",
            c.name("Interval")
        ))
    })?;
    if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
        return bad(format!(
            "{}: must be 100ms to 1h, got {interval:?}",
            c.name("Interval")
        ));
    }
    let timeout = c
        .duration("Timeout")?
        .unwrap_or(DEFAULT_TIMEOUT)
        .clamp(Duration::from_millis(10), interval);
    let mut check = HealthCheck {
        interval_ms: interval.as_millis() as u32,
        timeout_ms: timeout.as_millis() as u32,
        // Consul flips on the first result unless told otherwise.
        rise: c.uint("SuccessBeforePassing")?.unwrap_or(0).clamp(1, 100) as u32,
        fall: c.uint("FailuresBeforeCritical")?.unwrap_or(0).clamp(1, 100) as u32,
        http_status_min: 200,
        http_status_max: 299,
        ..HealthCheck::default()
    };
    let probe = if let Some(url) = http {
        if let Some(m) = c.text("Method")? {
            if !m.eq_ignore_ascii_case("GET") {
                return bad(format!(
                    "{}: Sextant's HTTP checks send GET, not {m}",
                    c.name("Method")
                ));
            }
        }
        if c.get("Header").is_some_and(|h| h != &json!({})) || c.text("Body")?.is_some() {
            return bad(format!(
                "{}: Sextant's HTTP checks send no custom headers or body",
                at_or(c.at, "the check")
            ));
        }
        let (host, port, path) =
            parse_http_url(url).map_err(|e| MappingError(format!("{}: {e}", c.name("HTTP"))))?;
        check_host(&host, spec, &c.name("HTTP"))?;
        check.kind = CheckKind::Http;
        check.port = own_port(port, spec);
        check.http_path = path;
        Probe::Http {
            url: url.to_string(),
        }
    } else if let Some(addr) = tcp {
        let (host, port) =
            split_host_port(addr).map_err(|e| MappingError(format!("{}: {e}", c.name("TCP"))))?;
        check_host(&host, spec, &c.name("TCP"))?;
        check.kind = CheckKind::Tcp;
        check.port = own_port(port, spec);
        Probe::Tcp {
            addr: addr.to_string(),
        }
    } else if let Some(target) = grpc {
        if c.bool("GRPCUseTLS")? {
            return bad(format!(
                "{}: Sextant's gRPC checks speak plaintext",
                c.name("GRPCUseTLS")
            ));
        }
        let (addr, service) = target.split_once('/').unwrap_or((target, ""));
        let (host, port) =
            split_host_port(addr).map_err(|e| MappingError(format!("{}: {e}", c.name("GRPC"))))?;
        check_host(&host, spec, &c.name("GRPC"))?;
        check.kind = CheckKind::Grpc;
        check.port = own_port(port, spec);
        check.grpc_service = service.to_string();
        Probe::Grpc {
            target: target.to_string(),
        }
    } else {
        return bad("a check needs one of TTL, HTTP, TCP or GRPC");
    };
    check
        .validate()
        .map_err(|e| MappingError(format!("{}: {e}", at_or(c.at, "the check"))))?;
    let def = CheckDef {
        id,
        name,
        notes,
        probe,
        deregister_after_ms,
    };
    Ok((def, status, Some(check)))
}

/// 0 (the instance's own port, so every instance of a service shares one check) when the
/// check probes the port the instance registered.
fn own_port(port: u16, spec: &InstanceSpec) -> u16 {
    if port == spec.port {
        0
    } else {
        port
    }
}

/// The central scanner probes each instance at its own address: a check aimed at another
/// host cannot be run. A loopback host is what an agent on the instance's machine would
/// probe, so it means the instance's address.
fn check_host(host: &str, spec: &InstanceSpec, field: &str) -> Result<(), MappingError> {
    let loopback = host == "localhost"
        || host == "0.0.0.0"
        || host == "::"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback || host.eq_ignore_ascii_case(spec.host.as_str()) {
        Ok(())
    } else {
        bad(format!(
            "{field}: Sextant probes each instance at its own address ({}), not at {host}",
            spec.host
        ))
    }
}

/// `http://host[:port]/path?query` → (host, port, path with query).
pub fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(format!(
            "{url:?}: Sextant's HTTP checks speak plain HTTP, not HTTPS"
        ));
    } else {
        return Err(format!("{url:?} is not an http:// URL"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not served"));
    }
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        (authority.trim_matches(['[', ']']).to_string(), 80)
    } else {
        split_host_port(authority)?
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((host, port, path))
}

/// `host:port` or `[v6]:port`.
pub fn split_host_port(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{addr:?}: the port must be 1-65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{addr:?} has no host"));
    }
    Ok((host.to_string(), port))
}

/// The compact form kept in `consul.checks`.
pub fn encode_checks(checks: &[CheckDef]) -> String {
    serde_json::to_string(checks).unwrap_or_else(|_| "[]".into())
}

/// The check definitions of an agent-registered instance; `None` for an instance registered
/// otherwise (or whose definitions do not decode, which the adapter never writes).
pub fn checks_of(inst: &Instance) -> Option<Vec<CheckDef>> {
    let raw = inst.spec.metadata.get(CHECKS_KEY)?;
    serde_json::from_str(raw).ok()
}

/// An instance's tags (the `tags` metadata), in order, without empties.
pub fn tags_of(inst: &Instance) -> Vec<String> {
    inst.spec
        .metadata
        .get(TAGS_KEY)
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the instance carries every tag in `wanted` (Consul's repeated `?tag=` is AND).
pub fn has_tags(tags: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| tags.iter().any(|t| t == w))
}

/// An instance's `Meta`: its metadata minus the tags and the adapter's own keys.
pub fn meta_of(inst: &Instance) -> Map<String, Value> {
    inst.spec
        .metadata
        .iter()
        .filter(|(k, _)| *k != TAGS_KEY && !k.starts_with(OWN_PREFIX))
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect()
}

/// A synthetic node: one per instance host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub id: String,
    pub address: String,
}

/// The node of a host: named by it, with a stable UUID-shaped id (Traefik and others key on
/// `Node.ID`).
pub fn node_of(host: &str) -> Node {
    Node {
        name: host.to_string(),
        id: uuid_of(host),
        address: host.to_string(),
    }
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A UUID-shaped (8-4-4-4-12 hex) id derived from `s`.
pub fn uuid_of(s: &str) -> String {
    let a = fnv1a(0xcbf2_9ce4_8422_2325, s.as_bytes());
    let b = fnv1a(0x6c62_272e_07bb_0142, s.as_bytes());
    let h = format!("{a:016x}{b:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn node_json(node: &Node, datacenter: &str) -> Value {
    json!({
        "ID": node.id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": datacenter,
        "TaggedAddresses": {"lan": node.address, "wan": node.address},
        "Meta": {},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    })
}

/// One check as Consul reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckView {
    pub id: String,
    pub name: String,
    pub status: Status,
    pub notes: String,
    pub output: String,
    /// Consul's `Type` (`ttl`, `http`, ..., or empty).
    pub kind: &'static str,
    /// `false` for the node's `serfHealth` check.
    pub of_service: bool,
}

/// The node-level check every synthetic node has.
pub fn serf_check() -> CheckView {
    CheckView {
        id: "serfHealth".into(),
        name: "Serf Health Status".into(),
        status: Status::Passing,
        notes: String::new(),
        output: "Agent alive and reachable".into(),
        kind: "",
        of_service: false,
    }
}

/// Why an instance is out of rotation for a reason other than its health, if it is.
pub fn out_of_rotation(inst: &Instance) -> Option<&'static str> {
    let s = &inst.status;
    if !s.enabled {
        Some("Maintenance mode is enabled for this service")
    } else if s.is_draining() {
        Some("The instance is draining (Sextant): it is leaving rotation")
    } else if s.effective_weight() == 0 {
        Some("The instance's weight is 0 (Sextant): it is out of rotation")
    } else {
        None
    }
}

/// The service checks of an instance. `ttl` gives a TTL check's current status and output
/// (kept by the adapter); `maintenance` the reason an operator gave for maintenance mode.
pub fn service_checks(
    inst: &Instance,
    ttl: &dyn Fn(&str) -> Option<(Status, String)>,
    maintenance: Option<&str>,
) -> Vec<CheckView> {
    let id = inst.spec.id.as_str();
    let from_health = Status::from_health(inst.status.health);
    let mut out = Vec::new();
    match checks_of(inst) {
        Some(defs) => {
            for d in defs {
                let (status, output) = match d.probe {
                    Probe::Ttl { .. } => ttl(&d.id).unwrap_or((from_health, String::new())),
                    _ => (from_health, String::new()),
                };
                out.push(CheckView {
                    kind: d.probe.kind(),
                    id: d.id,
                    name: d.name,
                    status,
                    notes: d.notes,
                    output,
                    of_service: true,
                });
            }
        }
        // Registered through another protocol: one check standing for whatever Sextant knows
        // of its health (none while nothing has reported).
        None if inst.status.health != Health::Unknown => out.push(CheckView {
            id: format!("service:{id}"),
            name: "Sextant health".into(),
            status: from_health,
            notes: String::new(),
            output: format!(
                "Sextant reports the instance {}",
                inst.status.health.as_str()
            ),
            kind: "",
            of_service: true,
        }),
        None => {}
    }
    if let Some(why) = out_of_rotation(inst) {
        let notes = match (maintenance, inst.status.enabled) {
            (Some(r), false) if !r.is_empty() => r.to_string(),
            _ => why.to_string(),
        };
        out.push(CheckView {
            id: format!("{MAINTENANCE_PREFIX}{id}"),
            name: MAINTENANCE_NAME.into(),
            status: Status::Critical,
            notes,
            output: why.to_string(),
            kind: "maintenance",
            of_service: true,
        });
    }
    out
}

/// A check as JSON (`/v1/health/...` and `/v1/agent/checks`).
pub fn check_json(
    c: &CheckView,
    node: &str,
    service: &str,
    inst: &Instance,
    tags: &[String],
) -> Value {
    let (sid, sname, stags) = if c.of_service {
        (inst.spec.id.as_str(), service, tags.to_vec())
    } else {
        ("", "", Vec::new())
    };
    json!({
        "Node": node,
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status.as_str(),
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": sid,
        "ServiceName": sname,
        "ServiceTags": stags,
        "Type": c.kind,
        "Definition": {},
        "CreateIndex": inst.spec_revision.max(1),
        "ModifyIndex": inst.revision().max(1),
    })
}

fn weights_json(inst: &Instance) -> Value {
    json!({"Passing": inst.status.weight.max(1), "Warning": WARNING_WEIGHT})
}

/// The `Service` object of a health entry, and `/v1/agent/services`' values.
pub fn service_json(service: &str, inst: &Instance, tags: &[String], datacenter: &str) -> Value {
    json!({
        "ID": inst.spec.id.as_str(),
        "Service": service,
        "Tags": tags,
        "Address": inst.spec.host.as_str(),
        "Port": inst.spec.port,
        "Meta": meta_of(inst),
        "Weights": weights_json(inst),
        "EnableTagOverride": false,
        "TaggedAddresses": {},
        "Datacenter": datacenter,
        "Kind": "",
        "CreateIndex": inst.spec_revision.max(1),
        "ModifyIndex": inst.revision().max(1),
    })
}

/// One `/v1/catalog/service/:name` entry: the node and the service flattened together.
pub fn catalog_entry(service: &str, inst: &Instance, tags: &[String], datacenter: &str) -> Value {
    let node = node_of(inst.spec.host.as_str());
    json!({
        "ID": node.id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": datacenter,
        "TaggedAddresses": {"lan": node.address, "wan": node.address},
        "NodeMeta": {},
        "ServiceKind": "",
        "ServiceID": inst.spec.id.as_str(),
        "ServiceName": service,
        "ServiceTags": tags,
        "ServiceAddress": inst.spec.host.as_str(),
        "ServicePort": inst.spec.port,
        "ServiceMeta": meta_of(inst),
        "ServiceWeights": weights_json(inst),
        "ServiceEnableTagOverride": false,
        "ServiceTaggedAddresses": {},
        "CreateIndex": inst.spec_revision.max(1),
        "ModifyIndex": inst.revision().max(1),
    })
}

/// A query flag given bare (`?passing`) or as a boolean (`?passing=true`, `=1`).
pub fn query_flag(name: &str, value: &str) -> Result<bool, MappingError> {
    match value.to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "t" => Ok(true),
        "0" | "false" | "f" => Ok(false),
        other => bad(format!("?{name}={other}: give true or false")),
    }
}

/// How long a blocking query waits: `wait` (default five minutes, at most ten), plus up to
/// 1/16 of it (`jitter` in 0..1) so that many watchers do not all return at once.
pub fn blocking_wait(wait: Option<&str>, jitter: f64) -> Result<Duration, MappingError> {
    const DEFAULT: Duration = Duration::from_secs(300);
    const MAX: Duration = Duration::from_secs(600);
    let base = match wait {
        None | Some("") => DEFAULT,
        Some(w) => parse_duration(w)
            .map_err(|e| MappingError(format!("?wait: {e}")))?
            .min(MAX),
    };
    Ok(base + base.div_f64(16.0).mul_f64(jitter.clamp(0.0, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sextant_core::model::InstanceStatus;
    use std::sync::Arc;

    const MIN: Duration = Duration::from_secs(60);

    fn parse(v: Value) -> Result<AgentRegistration, MappingError> {
        parse_registration(&v, "10.1.1.1", MIN)
    }

    fn instance(reg: &AgentRegistration, health: Health) -> Instance {
        Instance {
            spec: Arc::new(reg.spec.clone()),
            status: InstanceStatus {
                health,
                weight: reg.weight,
                ..InstanceStatus::default()
            },
            ttl_seconds: 0,
            spec_revision: 3,
            status_revision: 5,
        }
    }

    #[test]
    fn registration_as_py_consul_sends_it() {
        let r = parse(json!({
            "name": "web", "service_id": "web-1", "address": "10.0.0.5", "port": 8080,
            "tags": ["v1", "primary"], "meta": {"team": "a"},
            "check": {"ttl": "10s", "DeregisterCriticalServiceAfter": "30s"}
        }))
        .unwrap();
        // `service_id` is not Consul's field name (py-consul sends `id`): default id.
        assert_eq!(r.spec.id.as_str(), "web");
        assert_eq!(r.spec.host.as_str(), "10.0.0.5");
        assert_eq!(r.spec.metadata.get(TAGS_KEY), Some("v1,primary"));
        assert_eq!(r.spec.metadata.get("team"), Some("a"));
        assert_eq!(r.checks.len(), 1);
        assert_eq!(r.checks[0].id, "service:web");
        assert_eq!(r.checks[0].probe, Probe::Ttl { ttl_ms: 10_000 });
        // Raised to the minimum, as Consul does.
        assert_eq!(r.checks[0].deregister_after_ms, Some(60_000));
        assert_eq!(r.initial, vec![Status::Critical]);
        assert_eq!(r.initial_health(), Health::Unhealthy);
        assert!(r.service_check.is_none());
    }

    #[test]
    fn pascal_case_http_check_becomes_the_service_check() {
        let r = parse(json!({
            "ID": "api-1", "Name": "api", "Address": "10.0.0.7", "Port": 9000,
            "Check": {"HTTP": "http://localhost:9000/health?full=1", "Interval": "5s",
                      "Timeout": "1s", "Status": "passing"}
        }))
        .unwrap();
        let c = r.service_check.clone().unwrap();
        assert_eq!(c.kind, CheckKind::Http);
        assert_eq!(c.port, 0, "the instance's own port");
        assert_eq!(c.http_path, "/health?full=1");
        assert_eq!(
            (c.interval_ms, c.timeout_ms, c.rise, c.fall),
            (5000, 1000, 1, 1)
        );
        assert_eq!((c.http_status_min, c.http_status_max), (200, 299));
        assert_eq!(r.initial_health(), Health::Healthy);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (json!({"Port": 1}), "Name is required"),
            (json!({"Name": "a"}), "Port is required"),
            (json!({"Name": "a", "Port": 70000}), "Port must be 1-65535"),
            (json!({"Name": "a", "Port": 1, "Tags": ["x,y"]}), "no comma"),
            (
                json!({"Name": "a", "Port": 1, "Kind": "connect-proxy"}),
                "Kind",
            ),
            (
                json!({"Name": "a", "Port": 1, "Check": {"Args": ["/bin/true"], "Interval": "1s"}}),
                "script checks",
            ),
            (
                json!({"Name": "a", "Port": 1, "Check": {"HTTP": "http://10.9.9.9/h", "Interval": "1s"}}),
                "not at 10.9.9.9",
            ),
            (
                json!({"Name": "a", "Port": 1, "Check": {"HTTP": "https://x/h", "Interval": "1s"}}),
                "HTTPS",
            ),
            (
                json!({"Name": "a", "Port": 1, "Check": {"HTTP": "http://localhost/h"}}),
                "Interval",
            ),
            (
                json!({"Name": "a", "Port": 1, "Check": {"TTL": "soon"}}),
                "Check.TTL",
            ),
            (
                json!({"Name": "a", "Port": 1, "Check": {"TTL": "5s", "Status": "ok"}}),
                "Status",
            ),
            (
                json!({"Name": "a", "Port": 1, "Checks": [{"TTL": "5s"}, {"TCP": "localhost:1", "Interval": "1s"}]}),
                "cannot combine",
            ),
            (
                json!({"Name": "a", "Port": 1, "Weights": {"Passing": 0}}),
                "Weights.Passing",
            ),
            (
                json!({"Name": "a", "Port": 1, "Meta": {"consul.checks": "x"}}),
                "reserved",
            ),
            (json!(["x"]), "JSON object"),
        ];
        for (body, want) in cases {
            let err = parse(body.clone()).expect_err(&body.to_string());
            assert!(err.0.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn several_checks_get_numbered_ids_and_the_worst_status() {
        let r = parse(
            json!({"Name": "a", "ID": "a1", "Address": "h", "Port": 1, "Checks": [
            {"TTL": "5s", "Status": "passing"}, {"TTL": "5s", "Status": "warning"}]}),
        )
        .unwrap();
        let ids: Vec<_> = r.checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["service:a1:1", "service:a1:2"]);
        assert_eq!(r.initial_health(), Health::Warning);
    }

    #[test]
    fn an_instance_of_another_protocol_has_checks_only_once_something_reported() {
        let mut reg = parse(json!({"Name": "a", "Port": 1})).unwrap();
        reg.spec.metadata = Metadata::new();
        let none = |_: &str| None;
        assert!(service_checks(&instance(&reg, Health::Unknown), &none, None).is_empty());
        let c = service_checks(&instance(&reg, Health::Unhealthy), &none, None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].status, Status::Critical);
        let mut i = instance(&reg, Health::Healthy);
        i.status.enabled = false;
        let c = service_checks(&i, &none, Some("upgrade"));
        assert_eq!(c.last().unwrap().id, "_service_maintenance:a");
        assert_eq!(c.last().unwrap().notes, "upgrade");
        assert_eq!(c.last().unwrap().status, Status::Critical);
    }

    #[test]
    fn meta_hides_the_adapters_keys_and_tags_round_trip() {
        let r = parse(
            json!({"Name": "a", "Port": 1, "Tags": ["x", "y", "x"], "Meta": {"k": "v"},
            "Check": {"TTL": "1s"}}),
        )
        .unwrap();
        let i = instance(&r, Health::Healthy);
        assert_eq!(tags_of(&i), ["x", "y"]);
        let meta = meta_of(&i);
        assert_eq!(meta.len(), 1);
        assert_eq!(meta["k"], "v");
        assert_eq!(checks_of(&i).unwrap(), r.checks);
    }

    #[test]
    fn blocking_wait_defaults_caps_and_jitters() {
        assert_eq!(blocking_wait(None, 0.0).unwrap(), Duration::from_secs(300));
        assert_eq!(
            blocking_wait(Some("1h"), 0.0).unwrap(),
            Duration::from_secs(600)
        );
        assert_eq!(
            blocking_wait(Some("16s"), 1.0).unwrap(),
            Duration::from_secs(17)
        );
        assert_eq!(
            blocking_wait(Some("1m30s"), 0.0).unwrap(),
            Duration::from_secs(90)
        );
        assert!(blocking_wait(Some("x"), 0.0).is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://[::1]:80/x").unwrap(),
            ("::1".into(), 80, "/x".into())
        );
        assert_eq!(
            parse_http_url("http://h?a=1").unwrap(),
            ("h".into(), 80, "/?a=1".into())
        );
        assert!(parse_http_url("ftp://h").is_err());
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1".into(), 9));
    }

    proptest! {
        /// Whatever the order of statuses, the worst wins, and health maps back to it.
        #[test]
        fn worst_is_the_max_and_health_round_trips(v in proptest::collection::vec(0u8..3, 0..6)) {
            let s: Vec<Status> = v.iter().map(|x| [Status::Passing, Status::Warning, Status::Critical][*x as usize]).collect();
            let w = worst(s.iter().copied());
            prop_assert!(s.iter().all(|x| *x <= w));
            prop_assert_eq!(Status::from_health(w.to_health()), w);
        }

        /// Any name/port/tags registration maps, keeps its tags and passes Sextant's rules.
        #[test]
        fn registrations_map(name in "[a-z][a-z0-9-]{0,20}", port in 1u16.., tags in proptest::collection::vec("[a-z0-9]{1,8}", 0..5)) {
            let r = parse(json!({"Name": name, "Port": port, "Tags": tags})).unwrap();
            prop_assert_eq!(r.spec.id.as_str(), name.as_str());
            let i = instance(&r, Health::Unknown);
            let mut want: Vec<String> = Vec::new();
            for t in &tags { if !want.contains(t) { want.push(t.clone()); } }
            prop_assert_eq!(tags_of(&i), want);
            prop_assert!(checks_of(&i).unwrap().is_empty());
        }

        /// Keys match whatever their case or underscores, as Consul's decoder matches them.
        #[test]
        fn keys_match_in_any_case(upper in proptest::bool::ANY) {
            let k = if upper { "DEREGISTER_CRITICAL_SERVICE_AFTER" } else { "deregistercriticalserviceafter" };
            let r = parse(json!({"Name": "a", "Port": 1, "Check": {"TTL": "2s", k: "2m"}})).unwrap();
            prop_assert_eq!(r.checks[0].deregister_after_ms, Some(120_000));
        }
    }
}
