//! Input validation: every rule a name, host, port or metadata map must satisfy, with messages
//! that say which field was wrong and what is allowed.

use std::net::IpAddr;

use crate::{InstanceSpec, InvalidField, Registration};

pub const MAX_NAME_LEN: usize = 128;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY: usize = 128;
pub const MAX_METADATA_VALUE: usize = 1024;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
const MAX_PROTOCOL_LEN: usize = 32;
const MAX_VERSION_LEN: usize = 64;
const MAX_TTL_SECONDS: u32 = 24 * 3600;

fn check_name(field: &str, value: &str, extra: &[u8]) -> Result<(), InvalidField> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(InvalidField::new(
            field,
            format!("must be 1-{MAX_NAME_LEN} characters, got {}", value.len()),
        ));
    }
    let ok = value.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') || extra.contains(&b)
    });
    if !ok {
        let mut allowed = String::from("A-Z a-z 0-9 . _ -");
        for b in extra {
            allowed.push(' ');
            allowed.push(char::from(*b));
        }
        return Err(InvalidField::new(
            field,
            format!("{value:?} may only contain {allowed}"),
        ));
    }
    Ok(())
}

/// Namespaces: 1-128 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(field: &str, value: &str) -> Result<(), InvalidField> {
    check_name(field, value, &[])
}

/// Services: like namespaces, and `:` and `@` are allowed too, so names other registries use
/// (`GROUP@@service` of Nacos, `providers:com.example.Api::` of Dubbo) map one to one.
pub fn validate_service_name(value: &str) -> Result<(), InvalidField> {
    check_name("service", value, b":@")
}

/// Instance ids: like names, and `:` is allowed too (the default id is `host:port`).
pub fn validate_instance_id(value: &str) -> Result<(), InvalidField> {
    check_name("id", value, b":")
}

/// A host is an IP address or a DNS name (RFC 1123 labels).
pub fn validate_host(value: &str) -> Result<(), InvalidField> {
    if value.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let bad = || {
        InvalidField::new(
            "host",
            format!("{value:?} is neither an IP address nor a DNS name"),
        )
    };
    let name = value.strip_suffix('.').unwrap_or(value);
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

pub(crate) fn validate_weight(w: u32) -> Result<(), InvalidField> {
    if w > MAX_WEIGHT {
        return Err(InvalidField::new(
            "weight",
            format!("must be 0-{MAX_WEIGHT}, got {w}"),
        ));
    }
    Ok(())
}

fn validate_tag(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(field, value, &[])
}

fn validate_spec(spec: &InstanceSpec) -> Result<(), InvalidField> {
    validate_instance_id(&spec.id)?;
    validate_host(&spec.host)?;
    if spec.port == 0 {
        return Err(InvalidField::new("port", "must be 1-65535, got 0"));
    }
    let p = &spec.protocol;
    if p.is_empty()
        || p.len() > MAX_PROTOCOL_LEN
        || !p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'+')
        })
    {
        return Err(InvalidField::new(
            "protocol",
            format!(
                "{p:?} must be a lowercase token of 1-{MAX_PROTOCOL_LEN} characters (http, grpc, thrift, tcp, ...)"
            ),
        ));
    }
    if spec.version.len() > MAX_VERSION_LEN || spec.version.chars().any(|c| c.is_control()) {
        return Err(InvalidField::new(
            "version",
            format!("must be at most {MAX_VERSION_LEN} printable characters"),
        ));
    }
    validate_tag("location.region", &spec.location.region)?;
    validate_tag("location.zone", &spec.location.zone)?;
    validate_tag("location.idc", &spec.location.idc)?;
    validate_tag("cell", &spec.cell)?;
    validate_tag("lane", &spec.lane)?;
    if spec.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(InvalidField::new(
            "metadata",
            format!(
                "at most {MAX_METADATA_ENTRIES} entries, got {}",
                spec.metadata.len()
            ),
        ));
    }
    let mut total = 0;
    for (k, v) in spec.metadata.iter() {
        if k.is_empty()
            || k.len() > MAX_METADATA_KEY
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        {
            return Err(InvalidField::new(
                "metadata",
                format!("key {k:?} must be 1-{MAX_METADATA_KEY} characters of A-Z a-z 0-9 . _ - /"),
            ));
        }
        if v.len() > MAX_METADATA_VALUE {
            return Err(InvalidField::new(
                "metadata",
                format!(
                    "value of {k:?} is {} bytes, at most {MAX_METADATA_VALUE}",
                    v.len()
                ),
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(InvalidField::new(
            "metadata",
            format!("{total} bytes in all, at most {MAX_METADATA_BYTES}"),
        ));
    }
    Ok(())
}

/// Validates everything a registration carries.
pub fn validate_registration(r: &Registration) -> Result<(), InvalidField> {
    validate_spec(&r.spec)?;
    if let Some(s) = &r.status {
        validate_weight(s.weight)?;
    }
    if r.ttl_seconds > MAX_TTL_SECONDS {
        return Err(InvalidField::new(
            "ttl_seconds",
            format!(
                "must be 0 (persistent) to {MAX_TTL_SECONDS}, got {}",
                r.ttl_seconds
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Location, ServiceKey};
    use proptest::prelude::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: "10.0.0.1:8080".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            protocol: "http".into(),
            version: "1.2.3".into(),
            location: Location::default(),
            cell: Default::default(),
            lane: Default::default(),
            metadata: Default::default(),
        }
    }

    fn reg(spec: InstanceSpec) -> Registration {
        Registration {
            service: ServiceKey::new("ns", "svc").unwrap(),
            spec,
            status: None,
            ttl_seconds: 0,
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("service", "orders-v2.prod_1").is_ok());
        assert!(validate_name("service", "").is_err());
        assert!(validate_name("service", &"a".repeat(129)).is_err());
        assert!(validate_name("service", "a/b").is_err());
        assert!(validate_name("service", "a:b").is_err());
        assert!(validate_instance_id("a:b").is_ok());
        assert!(validate_service_name("GROUP@@orders").is_ok());
        assert!(validate_service_name("providers:com.example.Api::").is_ok());
        assert!(validate_service_name("a/b").is_err());
        assert!(validate_name("namespace", "a@b").is_err());
        assert!(validate_instance_id("a@b").is_err());
        let e = validate_name("namespace", "bad name").unwrap_err();
        assert_eq!(e.field, "namespace");
    }

    #[test]
    fn hosts() {
        for ok in [
            "10.0.0.1",
            "::1",
            "fe80::1",
            "svc.example.com",
            "localhost",
            "a-b.c",
        ] {
            assert!(validate_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a.com", "a..b", "a b", "a/b", "http://x"] {
            assert!(validate_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn specs() {
        assert!(validate_registration(&reg(spec())).is_ok());
        let mut s = spec();
        s.port = 0;
        assert_eq!(validate_registration(&reg(s)).unwrap_err().field, "port");
        let mut s = spec();
        s.protocol = "HTTP".into();
        assert_eq!(
            validate_registration(&reg(s)).unwrap_err().field,
            "protocol"
        );
        let mut s = spec();
        s.metadata.insert("k", "v".repeat(2000));
        assert_eq!(
            validate_registration(&reg(s)).unwrap_err().field,
            "metadata"
        );
        let mut r = reg(spec());
        r.status = Some(crate::InstanceStatus {
            weight: 10_001,
            ..Default::default()
        });
        assert_eq!(validate_registration(&r).unwrap_err().field, "weight");
    }

    proptest! {
        #[test]
        fn valid_names_accepted(s in "[A-Za-z0-9._-]{1,128}") {
            prop_assert!(validate_name("service", &s).is_ok());
        }

        #[test]
        fn names_with_other_chars_refused(a in "[A-Za-z0-9]{0,10}", c in "[^A-Za-z0-9._-]", b in "[A-Za-z0-9]{0,10}") {
            let s = format!("{a}{c}{b}");
            prop_assert!(validate_name("service", &s).is_err());
        }
    }
}
