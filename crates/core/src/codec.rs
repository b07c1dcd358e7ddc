//! How registry records map to store keys and bytes.
//!
//! Keys: `i/{ns}/{svc}/{id}/spec`, `i/{ns}/{svc}/{id}/status` (adjacent in key order, so a scan
//! meets an instance's two halves together), `s/{ns}/{svc}` for service settings;
//! `acl/token/{id}`, `acl/policy/{name}`, `acl/bootstrap` for access control and
//! `audit/{revision, 20 digits}` for the audit log. Names never
//! contain `/`, so keys are unambiguous. Values are a format-version byte followed by postcard;
//! a future format adds a version and a migration, never reinterprets old bytes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sextant_model::{InstanceSpec, InstanceStatus, Revision, ServiceConfig, ServiceKey};

use crate::store::StoreError;

const FORMAT_V1: u8 = 1;
/// V2 (status and service records): status gained weight override and drain; service settings
/// gained the health check. V1 records still decode.
const FORMAT_V2: u8 = 2;

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

#[derive(Deserialize)]
struct StatusV1 {
    health: sextant_model::Health,
    enabled: bool,
    weight: u32,
}

#[derive(Deserialize)]
struct StatusRecordV1 {
    status: StatusV1,
    status_revision: Revision,
}

#[derive(Deserialize)]
struct ServiceRecordV1 {
    protect_threshold: f32,
}

/// A service's own record: its settings and the revision of its last change. Written with
/// every batch that touches the service, so a restart knows when each service last changed,
/// even if that change was a delete.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ServiceRecord {
    pub revision: Revision,
    pub config: ServiceConfig,
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

fn encode<T: Serialize>(version: u8, v: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Serialising plain structs into a Vec cannot fail.
    out.extend(postcard::to_stdvec(v).unwrap_or_default());
    out
}

fn corrupt(key: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason,
    }
}

fn split<'a>(key: &str, bytes: &'a [u8]) -> Result<(u8, &'a [u8]), StoreError> {
    match bytes.split_first() {
        Some((v, rest)) => Ok((*v, rest)),
        None => Err(corrupt(key, "empty value".into())),
    }
}

fn body<'a, T: Deserialize<'a>>(key: &str, rest: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(rest).map_err(|e| corrupt(key, e.to_string()))
}

fn unknown(key: &str, v: u8) -> StoreError {
    corrupt(key, format!("unknown format version {v}"))
}

pub(crate) fn encode_spec(
    spec: &Arc<InstanceSpec>,
    ttl_seconds: u32,
    spec_revision: Revision,
) -> Vec<u8> {
    encode(
        FORMAT_V1,
        &SpecRecordRef {
            spec,
            ttl_seconds,
            spec_revision,
        },
    )
}

pub(crate) fn encode_status(status: InstanceStatus, status_revision: Revision) -> Vec<u8> {
    encode(
        FORMAT_V2,
        &StatusRecord {
            status,
            status_revision,
        },
    )
}

pub(crate) fn encode_service(rec: &ServiceRecord) -> Vec<u8> {
    encode(FORMAT_V2, rec)
}

/// One delete of a batch, as its journal records it: the store's deletes carry neither the
/// revision nor the reason, and a node that applies the batch from a feed needs both to send
/// the same event as the writer did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JournalDelete {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub revision: Revision,
    pub reason: sextant_model::DeleteReason,
}

pub(crate) fn encode_journal(deletes: &[JournalDelete]) -> Vec<u8> {
    encode(FORMAT_V1, &deletes)
}

pub(crate) fn decode_journal(bytes: &[u8]) -> Result<Vec<JournalDelete>, StoreError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    match split("journal", bytes)? {
        (FORMAT_V1, rest) => body("journal", rest),
        (v, _) => Err(unknown("journal", v)),
    }
}

pub(crate) fn token_key(id: &str) -> String {
    format!("acl/token/{id}")
}

pub(crate) fn policy_key(name: &str) -> String {
    format!("acl/policy/{name}")
}

pub(crate) const BOOTSTRAP_KEY: &str = "acl/bootstrap";

pub(crate) fn audit_key(revision: Revision) -> String {
    format!("audit/{revision:020}")
}

/// Tokens, policies and audit entries: version 1 + postcard.
pub(crate) fn encode_v1<T: Serialize>(v: &T) -> Vec<u8> {
    encode(FORMAT_V1, v)
}

pub(crate) fn decode_v1<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    match split(key, bytes)? {
        (FORMAT_V1, rest) => body(key, rest),
        (v, _) => Err(unknown(key, v)),
    }
}

/// Tokens: version 2 + postcard (v2 added the bound client-certificate names); version 1
/// records still decode, with none.
pub(crate) fn encode_token(t: &sextant_model::acl::Token) -> Vec<u8> {
    encode(FORMAT_V2, t)
}

pub(crate) fn decode_token(
    key: &str,
    bytes: &[u8],
) -> Result<sextant_model::acl::Token, StoreError> {
    match split(key, bytes)? {
        (FORMAT_V1, rest) => Ok(body::<sextant_model::acl::TokenV1>(key, rest)?.into()),
        (FORMAT_V2, rest) => body(key, rest),
        (v, _) => Err(unknown(key, v)),
    }
}

/// A decoded key.
pub(crate) enum Key<'a> {
    Spec(ServiceKey, &'a str),
    Status(ServiceKey, &'a str),
    Service(ServiceKey),
    Token,
    Policy,
    Bootstrap,
    Audit,
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
        ["acl", "token", id] if !id.is_empty() => Ok(Key::Token),
        ["acl", "policy", name] if !name.is_empty() => Ok(Key::Policy),
        ["acl", "bootstrap"] => Ok(Key::Bootstrap),
        ["audit", rev] if rev.len() == 20 && rev.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Key::Audit)
        }
        _ => Err(corrupt()),
    }
}

pub(crate) fn decode_spec(key: &str, bytes: &[u8]) -> Result<SpecRecord, StoreError> {
    match split(key, bytes)? {
        (FORMAT_V1, rest) => body(key, rest),
        (v, _) => Err(unknown(key, v)),
    }
}

pub(crate) fn decode_status(key: &str, bytes: &[u8]) -> Result<StatusRecord, StoreError> {
    match split(key, bytes)? {
        (FORMAT_V1, rest) => {
            let old: StatusRecordV1 = body(key, rest)?;
            Ok(StatusRecord {
                status: InstanceStatus {
                    health: old.status.health,
                    enabled: old.status.enabled,
                    weight: old.status.weight,
                    ..Default::default()
                },
                status_revision: old.status_revision,
            })
        }
        (FORMAT_V2, rest) => body(key, rest),
        (v, _) => Err(unknown(key, v)),
    }
}

pub(crate) fn decode_service(key: &str, bytes: &[u8]) -> Result<ServiceRecord, StoreError> {
    match split(key, bytes)? {
        (FORMAT_V1, rest) => {
            let old: ServiceRecordV1 = body(key, rest)?;
            Ok(ServiceRecord {
                revision: 0,
                config: ServiceConfig {
                    protect_threshold: old.protect_threshold,
                    ..Default::default()
                },
            })
        }
        (FORMAT_V2, rest) => body(key, rest),
        (v, _) => Err(unknown(key, v)),
    }
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

    #[test]
    fn v1_records_still_decode() {
        // Bytes as the first release wrote them: status {unhealthy, enabled, weight 5} at 9.
        #[derive(Serialize)]
        struct V1 {
            health: sextant_model::Health,
            enabled: bool,
            weight: u32,
        }
        let mut old = vec![FORMAT_V1];
        old.extend(
            postcard::to_stdvec(&(
                V1 {
                    health: sextant_model::Health::Unhealthy,
                    enabled: true,
                    weight: 5,
                },
                9u64,
            ))
            .unwrap(),
        );
        let rec = decode_status("k", &old).unwrap();
        assert_eq!(rec.status.weight, 5);
        assert_eq!(rec.status.health, sextant_model::Health::Unhealthy);
        assert_eq!(rec.status.draining_since_ms, None);
        assert_eq!(rec.status_revision, 9);
        let mut old = vec![FORMAT_V1];
        old.extend(postcard::to_stdvec(&0.25f32).unwrap());
        assert_eq!(
            decode_service("k", &old).unwrap().config.protect_threshold,
            0.25
        );
        let cfg = ServiceConfig {
            protect_threshold: 0.5,
            check: sextant_model::HealthCheck {
                kind: sextant_model::CheckKind::Http,
                ..Default::default()
            },
        };
        let rec = ServiceRecord {
            revision: 12,
            config: cfg,
        };
        assert_eq!(decode_service("k", &encode_service(&rec)).unwrap(), rec);
    }

    mod fuzz {
        //! Arbitrary bytes and keys, as a damaged disk or a stray tool could leave them, fed to
        //! every decoder the loader runs: a typed `Corrupt` error or a value, never a panic.

        use proptest::prelude::*;

        use super::*;

        fn is_corrupt(e: &StoreError) -> bool {
            matches!(e, StoreError::Corrupt { .. })
        }

        /// Bytes that start like a record (a known format byte) more often than chance would.
        fn value_bytes() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                (1u8..=2, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(v, mut b)| {
                    b.insert(0, v);
                    b
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

            #[test]
            fn decoders_answer_arbitrary_bytes_with_corrupt_or_a_value(bytes in value_bytes()) {
                if let Err(e) = decode_spec("k", &bytes) {
                    prop_assert!(is_corrupt(&e), "{e}");
                }
                if let Err(e) = decode_status("k", &bytes) {
                    prop_assert!(is_corrupt(&e), "{e}");
                }
                match decode_service("k", &bytes) {
                    Err(e) => prop_assert!(is_corrupt(&e), "{e}"),
                    // A value that decodes is one the encoder can write back, stably.
                    Ok(rec) => {
                        let again = encode_service(&rec);
                        let back = decode_service("k", &again);
                        prop_assert!(back.is_ok());
                        prop_assert_eq!(encode_service(&back.unwrap()), again);
                    }
                }
            }

            /// Every cut of a valid record is an error or a value, never a panic.
            #[test]
            fn truncated_records_do_not_panic(cut in 0usize..200, threshold in 0.0f32..1.0) {
                let rec = ServiceRecord {
                    revision: 42,
                    config: ServiceConfig { protect_threshold: threshold, ..Default::default() },
                };
                let bytes = encode_service(&rec);
                let cut = cut.min(bytes.len());
                match decode_service("k", &bytes[..cut]) {
                    Err(e) => prop_assert!(is_corrupt(&e)),
                    Ok(got) => prop_assert_eq!(cut, bytes.len(), "a cut record decoded: {:?}", got),
                }
                let status = encode_status(InstanceStatus::default(), 7);
                let cut = cut.min(status.len());
                if let Err(e) = decode_status("k", &status[..cut]) {
                    prop_assert!(is_corrupt(&e));
                }
            }

            /// A key parses only if it is exactly what the encoder writes for what it parsed to.
            #[test]
            fn keys_parse_only_to_what_writes_them_back(
                key in prop_oneof![
                    any::<String>(),
                    "[is]/[a-z0-9./-]{0,6}/[a-z0-9./-]{0,6}(/[a-z0-9:./-]{0,6}(/(spec|status|x))?)?",
                ]
            ) {
                match parse_key(&key) {
                    Err(e) => prop_assert!(is_corrupt(&e)),
                    Ok(Key::Spec(svc, id)) => prop_assert_eq!(spec_key(&svc, id), key.clone()),
                    Ok(Key::Status(svc, id)) => prop_assert_eq!(status_key(&svc, id), key.clone()),
                    Ok(Key::Service(svc)) => prop_assert_eq!(service_key(&svc), key.clone()),
                    Ok(_) => prop_assert!(key.starts_with("acl/") || key.starts_with("audit/")),
                }
            }
        }
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;
    use sextant_model::acl::{Token, TokenV1};

    /// Tokens stored before they could be bound to client certificates still load, with
    /// none bound; new ones keep their names.
    #[test]
    fn version_1_tokens_still_decode() {
        let old = TokenV1 {
            id: "t1".into(),
            secret_hash: [7; 32],
            description: "old".into(),
            policies: vec!["p".into()],
            created_ms: 5,
        };
        let t = decode_token("acl/token/t1", &encode_v1(&old)).unwrap();
        assert_eq!((t.id.as_str(), t.tls_identities.len()), ("t1", 0));
        let new = Token {
            tls_identities: vec!["orders".into()],
            ..t
        };
        assert_eq!(
            decode_token("acl/token/t1", &encode_token(&new)).unwrap(),
            new
        );
    }
}
