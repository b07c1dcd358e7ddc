//! Conversions between the `sextant.v1` messages and `sextant-model`'s types, written once for
//! both ends of the wire: the server's gRPC adapter and the client SDK. Values read from the
//! network are checked here; an out-of-range value is an [`InvalidField`], never a panic.
//! Only the model-to-message and message-to-model mappings live here: what each side builds
//! around them (the server's registration body, the SDK's own instance type) stays with it.

use sextant_model::{
    CheckKind, Health, HealthCheck, Instance, InstanceStatus, InvalidField, Location,
};

use crate::v1 as pb;

/// The reference to a service, as every request and answer names it.
pub fn service_ref(namespace: &str, service: &str) -> pb::ServiceRef {
    pb::ServiceRef {
        namespace: namespace.to_string(),
        service: service.to_string(),
    }
}

pub fn health_to_pb(h: Health) -> i32 {
    match h {
        Health::Unknown => pb::Health::Unknown as i32,
        Health::Healthy => pb::Health::Healthy as i32,
        Health::Unhealthy => pb::Health::Unhealthy as i32,
        Health::Warning => pb::Health::Warning as i32,
    }
}

/// `None` for a value this build does not know: a server refuses it, a client reading a newer
/// server's answer treats it as not checked.
pub fn health_from_pb(h: i32) -> Option<Health> {
    match pb::Health::try_from(h) {
        Ok(pb::Health::Unknown) => Some(Health::Unknown),
        Ok(pb::Health::Healthy) => Some(Health::Healthy),
        Ok(pb::Health::Unhealthy) => Some(Health::Unhealthy),
        Ok(pb::Health::Warning) => Some(Health::Warning),
        Err(_) => None,
    }
}

pub fn status_to_pb(s: InstanceStatus) -> pb::InstanceStatus {
    pb::InstanceStatus {
        health: health_to_pb(s.health),
        enabled: s.enabled,
        weight: s.weight,
        weight_override: s.weight_override,
        draining_since_ms: s.draining_since_ms,
    }
}

/// A status as a server reports it; a health value newer than this build reads as unknown.
pub fn status_from_pb(s: &pb::InstanceStatus) -> InstanceStatus {
    InstanceStatus {
        health: health_from_pb(s.health).unwrap_or(Health::Unknown),
        enabled: s.enabled,
        weight: s.weight,
        weight_override: s.weight_override,
        draining_since_ms: s.draining_since_ms,
    }
}

pub fn location_to_pb(l: &Location) -> pb::Location {
    pb::Location {
        region: l.region.to_string(),
        zone: l.zone.to_string(),
        idc: l.idc.to_string(),
    }
}

pub fn location_from_pb(l: pb::Location) -> Location {
    Location {
        region: l.region.into(),
        zone: l.zone.into(),
        idc: l.idc.into(),
    }
}

pub fn instance_to_pb(i: &Instance) -> pb::Instance {
    let s = &*i.spec;
    pb::Instance {
        spec: Some(pb::InstanceSpec {
            id: s.id.to_string(),
            host: s.host.to_string(),
            port: u32::from(s.port),
            protocol: s.protocol.to_string(),
            version: s.version.to_string(),
            location: Some(location_to_pb(&s.location)),
            cell: s.cell.to_string(),
            lane: s.lane.to_string(),
            metadata: s
                .metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }),
        status: Some(status_to_pb(i.status)),
        ttl_seconds: i.ttl_seconds,
        spec_revision: i.spec_revision,
        status_revision: i.status_revision,
    }
}

pub fn check_to_pb(c: &HealthCheck) -> pb::HealthCheck {
    pb::HealthCheck {
        kind: match c.kind {
            CheckKind::None => pb::CheckKind::CheckNone,
            CheckKind::Tcp => pb::CheckKind::CheckTcp,
            CheckKind::Http => pb::CheckKind::CheckHttp,
            CheckKind::Grpc => pb::CheckKind::CheckGrpc,
        } as i32,
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        rise: c.rise,
        fall: c.fall,
        jitter_percent: c.jitter_percent,
        port: u32::from(c.port),
        http_path: c.http_path.clone(),
        http_status_min: u32::from(c.http_status_min),
        http_status_max: u32::from(c.http_status_max),
        grpc_service: c.grpc_service.clone(),
    }
}

/// Zero fields take the defaults, so a client sets only what it cares about.
pub fn check_from_pb(c: pb::HealthCheck) -> Result<HealthCheck, InvalidField> {
    let d = HealthCheck::default();
    let kind = match pb::CheckKind::try_from(c.kind) {
        Ok(pb::CheckKind::CheckNone) => CheckKind::None,
        Ok(pb::CheckKind::CheckTcp) => CheckKind::Tcp,
        Ok(pb::CheckKind::CheckHttp) => CheckKind::Http,
        Ok(pb::CheckKind::CheckGrpc) => CheckKind::Grpc,
        Err(_) => {
            return Err(InvalidField::new(
                "check.kind",
                format!("{} is not a check kind", c.kind),
            ))
        }
    };
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let narrow = |field: &str, v: u32| {
        u16::try_from(v)
            .map_err(|_| InvalidField::new(format!("check.{field}"), format!("{v} is too large")))
    };
    Ok(HealthCheck {
        kind,
        interval_ms: or(c.interval_ms, d.interval_ms),
        timeout_ms: or(c.timeout_ms, d.timeout_ms),
        rise: or(c.rise, d.rise),
        fall: or(c.fall, d.fall),
        jitter_percent: c.jitter_percent,
        port: narrow("port", c.port)?,
        http_path: if c.http_path.is_empty() {
            d.http_path
        } else {
            c.http_path
        },
        http_status_min: narrow(
            "http_status_min",
            or(c.http_status_min, u32::from(d.http_status_min)),
        )?,
        http_status_max: narrow(
            "http_status_max",
            or(c.http_status_max, u32::from(d.http_status_max)),
        )?,
        grpc_service: c.grpc_service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_status_round_trip() {
        for h in [
            Health::Unknown,
            Health::Healthy,
            Health::Unhealthy,
            Health::Warning,
        ] {
            assert_eq!(health_from_pb(health_to_pb(h)), Some(h));
        }
        assert_eq!(health_from_pb(99), None);
        let s = InstanceStatus {
            health: Health::Unhealthy,
            enabled: false,
            weight: 7,
            weight_override: Some(0),
            draining_since_ms: Some(5),
        };
        assert_eq!(status_from_pb(&status_to_pb(s)), s);
    }

    #[test]
    fn check_round_trips_and_refuses_what_does_not_fit() {
        let c = HealthCheck::default();
        assert_eq!(check_from_pb(check_to_pb(&c)).unwrap(), c);
        let bad = pb::HealthCheck {
            port: 70_000,
            ..Default::default()
        };
        assert_eq!(check_from_pb(bad).unwrap_err().field, "check.port");
        let bad = pb::HealthCheck {
            kind: 99,
            ..Default::default()
        };
        assert!(check_from_pb(bad).is_err());
    }
}
