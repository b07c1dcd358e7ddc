//! How registry records map to store keys and bytes.
//!
//! Keys: `i/{ns}/{svc}/{id}/spec`, `i/{ns}/{svc}/{id}/status` (adjacent in key order, so a scan
//! meets an instance's two halves together), `s/{ns}/{svc}` for service settings. Names never
//! contain `/`, so keys are unambiguous. Values are a format-version byte followed by postcard;
//! a future format adds a version and a migration, never reinterprets old bytes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sextant_model::{InstanceSpec, InstanceStatus, Revision, ServiceConfig, ServiceKey};

use crate::store::StoreError;

const FORMAT_V1: u8 = 1;

#[derive(Serialize, Deserialize)]
pub(crate) struct SpecRecord {
    pub spec: InstanceSpec,
    pub ttl_seconds: u32,
    pub spec_revision: Revision,
}

#[derive(Serialize)]
struct SpecRecordRef<'a> {
    spec: &'a InstanceSpec,
    ttl_seconds: u32,
    spec_revision: Revision,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct StatusRecord {
    pub status: InstanceStatus,
    pub status_revision: Revision,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ServiceRecord {
    pub protect_threshold: f32,
}

pub(crate) fn instance_prefix(svc: &ServiceKey, id: &str) -> String {
    format!("i/{}/{}/{}/", svc.namespace, svc.service, id)
}

pub(crate) fn spec_key(svc: &ServiceKey, id: &str) -> String {
    instance_prefix(svc, id) + "spec"
}

pub(crate) fn status_key(svc: &ServiceKey, id: &str) -> String {
    instance_prefix(svc, id) + "status"
}

pub(crate) fn service_key(svc: &ServiceKey) -> String {
    format!("s/{}/{}", svc.namespace, svc.service)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_V1];
    // Serialising plain structs into a Vec cannot fail.
    out.extend(postcard::to_stdvec(v).unwrap_or_default());
    out
}

fn decode<'a, T: Deserialize<'a>>(key: &str, bytes: &'a [u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_string(),
        reason,
    };
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string())),
        Some((v, _)) => Err(corrupt(format!("unknown format version {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

pub(crate) fn encode_spec(
    spec: &Arc<InstanceSpec>,
    ttl_seconds: u32,
    spec_revision: Revision,
) -> Vec<u8> {
    encode(&SpecRecordRef {
        spec,
        ttl_seconds,
        spec_revision,
    })
}

pub(crate) fn encode_status(status: InstanceStatus, status_revision: Revision) -> Vec<u8> {
    encode(&StatusRecord {
        status,
        status_revision,
    })
}

pub(crate) fn encode_service(cfg: &ServiceConfig) -> Vec<u8> {
    encode(&ServiceRecord {
        protect_threshold: cfg.protect_threshold,
    })
}

/// A decoded key.
pub(crate) enum Key<'a> {
    Spec(ServiceKey, &'a str),
    Status(ServiceKey, &'a str),
    Service(ServiceKey),
}

pub(crate) fn parse_key(key: &str) -> Result<Key<'_>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: key.to_string(),
        reason: "unrecognised key".into(),
    };
    let svc = |ns: &str, s: &str| ServiceKey::new(ns, s).map_err(|_| corrupt());
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        ["i", ns, s, id, "spec"] => Ok(Key::Spec(svc(ns, s)?, id)),
        ["i", ns, s, id, "status"] => Ok(Key::Status(svc(ns, s)?, id)),
        ["s", ns, s] => Ok(Key::Service(svc(ns, s)?)),
        _ => Err(corrupt()),
    }
}

pub(crate) fn decode_spec(key: &str, bytes: &[u8]) -> Result<SpecRecord, StoreError> {
    decode(key, bytes)
}

pub(crate) fn decode_status(key: &str, bytes: &[u8]) -> Result<StatusRecord, StoreError> {
    decode(key, bytes)
}

pub(crate) fn decode_service(key: &str, bytes: &[u8]) -> Result<ServiceRecord, StoreError> {
    decode(key, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_pair_up() {
        let svc = ServiceKey::new("prod", "orders").unwrap();
        let a = spec_key(&svc, "10.0.0.1:80");
        let b = status_key(&svc, "10.0.0.1:80");
        assert!(a < b);
        assert!(matches!(parse_key(&a), Ok(Key::Spec(_, "10.0.0.1:80"))));
        assert!(matches!(parse_key(&b), Ok(Key::Status(_, "10.0.0.1:80"))));
        assert!(matches!(parse_key(&service_key(&svc)), Ok(Key::Service(_))));
        assert!(parse_key("x/y").is_err());
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        assert!(decode_status("k", &[]).is_err());
        assert!(decode_status("k", &[9, 1, 2]).is_err());
        assert!(decode_status("k", &[FORMAT_V1, 200]).is_err());
        let ok = encode_status(InstanceStatus::default(), 7);
        assert_eq!(decode_status("k", &ok).unwrap().status_revision, 7);
    }
}
