//! Conversions between the generated `sextant.v1` messages and the SDK's own types (its names,
//! instances and registrations); the field mappings the server shares (health, status, location)
//! are `sextant_proto::convert`'s. Answers from the network are checked here: a missing or
//! out-of-range field is an [`Error::Protocol`], never a panic.

use sextant_proto::convert;
use sextant_proto::v1 as pb;

use crate::error::Error;
use crate::types::{
    DeleteReason, Instance, InstanceStatus, Registration, Service, ServiceName, Source,
};

pub(crate) fn service_ref(name: &ServiceName) -> pb::ServiceRef {
    convert::service_ref(name.namespace(), name.service())
}

pub(crate) fn service_name(r: Option<&pb::ServiceRef>) -> Result<ServiceName, Error> {
    let r = r.ok_or_else(|| Error::Protocol("service missing".into()))?;
    ServiceName::new(&r.namespace, &r.service)
        .map_err(|e| Error::Protocol(format!("bad service name from the server: {e}")))
}

pub(crate) fn status_from(s: Option<pb::InstanceStatus>) -> Result<InstanceStatus, Error> {
    let s = s.ok_or_else(|| Error::Protocol("instance status missing".into()))?;
    Ok(convert::status_from_pb(&s))
}

pub(crate) fn instance_from(i: pb::Instance) -> Result<Instance, Error> {
    let spec = i
        .spec
        .ok_or_else(|| Error::Protocol("instance spec missing".into()))?;
    let port = u16::try_from(spec.port)
        .map_err(|_| Error::Protocol(format!("port {} out of range", spec.port)))?;
    Ok(Instance {
        id: spec.id,
        host: spec.host,
        port,
        protocol: spec.protocol,
        version: spec.version,
        location: convert::location_from_pb(spec.location.unwrap_or_default()),
        cell: spec.cell,
        lane: spec.lane,
        metadata: spec.metadata.into_iter().collect(),
        status: status_from(i.status)?,
        ttl_seconds: i.ttl_seconds,
        spec_revision: i.spec_revision,
        status_revision: i.status_revision,
    })
}

pub(crate) fn service_from(s: pb::Service) -> Result<Service, Error> {
    let name = service_name(s.service.as_ref())?;
    let mut instances = s
        .instances
        .into_iter()
        .map(instance_from)
        .collect::<Result<Vec<_>, _>>()?;
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    instances.dedup_by(|a, b| a.id == b.id);
    Ok(Service {
        name,
        revision: s.revision,
        protect_threshold: s.protect_threshold,
        instances,
        source: Source::Server,
    })
}

pub(crate) fn delete_reason(r: &str) -> DeleteReason {
    match sextant_model::DeleteReason::parse(r) {
        Some(sextant_model::DeleteReason::Deregistered) => DeleteReason::Deregistered,
        Some(sextant_model::DeleteReason::LeaseExpired) => DeleteReason::LeaseExpired,
        None => DeleteReason::Other,
    }
}

pub(crate) fn register_request(r: &Registration) -> pb::RegisterRequest {
    pb::RegisterRequest {
        service: Some(service_ref(&r.service)),
        spec: Some(pb::InstanceSpec {
            id: r.effective_id(),
            host: r.host.clone(),
            port: u32::from(r.port),
            protocol: r.protocol.clone(),
            version: r.version.clone(),
            location: Some(convert::location_to_pb(&r.location)),
            cell: r.cell.clone(),
            lane: r.lane.clone(),
            metadata: r
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }),
        status: r.status.map(|s| pb::InstanceStatus {
            health: convert::health_to_pb(s.health),
            enabled: s.enabled,
            weight: s.weight,
            weight_override: None,
            draining_since_ms: None,
        }),
        ttl_seconds: r.ttl_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        assert!(instance_from(pb::Instance::default()).is_err());
        let bad_port = pb::Instance {
            spec: Some(pb::InstanceSpec {
                port: 70_000,
                ..Default::default()
            }),
            status: Some(pb::InstanceStatus::default()),
            ..Default::default()
        };
        assert!(instance_from(bad_port).is_err());
        assert!(service_from(pb::Service::default()).is_err());
        let newer_health = pb::InstanceStatus {
            health: 99,
            ..Default::default()
        };
        assert_eq!(
            status_from(Some(newer_health)).unwrap().health,
            crate::Health::Unknown
        );
        assert_eq!(delete_reason("evicted"), DeleteReason::Other);
    }

    #[test]
    fn registration_fills_the_id() {
        let r = Registration::new(ServiceName::new("p", "s").unwrap(), "10.0.0.1", 80);
        let req = register_request(&r);
        assert_eq!(req.spec.unwrap().id, "10.0.0.1:80");
        assert!(req.status.is_none());
        let req = register_request(&r.weight(5));
        assert_eq!(req.status.map(|s| (s.weight, s.enabled)), Some((5, true)));
    }
}
