//! Query names → what they ask for (pure). Two zones are served:
//!
//! - Consul's: `[tag.]<svc>.service[.<dc>].consul`, RFC 2782
//!   `_<svc>._<tag|tcp>[.service][.<dc>].consul`, and `<hexip>.addr[.<dc>].consul` (the SRV
//!   targets this server hands out). Services are in the `public` namespace, where every
//!   adapter meets.
//! - Sextant's own: `<svc>.<namespace>.sextant` (the namespace is the label before
//!   `sextant`; the service is everything before it, dots included).
//!
//! Labels keep the case they were asked in: service names are case-sensitive in Sextant.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sextant_core::model::ServiceKey;

/// The namespace Consul's names resolve in (where the Nacos, Consul and Eureka adapters meet).
pub const CONSUL_NAMESPACE: &str = "public";

/// The zones served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    Consul,
    Sextant,
}

impl Zone {
    pub fn origin(self) -> &'static str {
        match self {
            Zone::Consul => "consul.",
            Zone::Sextant => "sextant.",
        }
    }
}

/// What a query name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A service's instances, optionally only those with a tag.
    Service {
        key: ServiceKey,
        tag: Option<String>,
    },
    /// One address, from an SRV target `<hexip>.addr.<dc>.consul`.
    Addr(IpAddr),
}

/// How a name was understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Found(Zone, Asked),
    /// In a served zone, but no name of that form exists (NXDOMAIN).
    NoSuchName(Zone),
    /// Not in a served zone (REFUSED: this server is not a recursive resolver).
    NotServed,
}

/// Parses `labels` (left to right, without the root) for datacenter `dc`.
pub fn parse(labels: &[String], dc: &str) -> Parsed {
    let Some((last, rest)) = labels.split_last() else {
        return Parsed::NotServed;
    };
    if last.eq_ignore_ascii_case("sextant") {
        return native(rest);
    }
    if !last.eq_ignore_ascii_case("consul") {
        return Parsed::NotServed;
    }
    match consul(rest, dc) {
        Some(asked) => Parsed::Found(Zone::Consul, asked),
        None => Parsed::NoSuchName(Zone::Consul),
    }
}

fn native(rest: &[String]) -> Parsed {
    let Some((ns, svc)) = rest.split_last() else {
        return Parsed::NoSuchName(Zone::Sextant);
    };
    match ServiceKey::new(ns, &svc.join(".")) {
        Ok(key) if !svc.is_empty() => {
            Parsed::Found(Zone::Sextant, Asked::Service { key, tag: None })
        }
        _ => Parsed::NoSuchName(Zone::Sextant),
    }
}

fn consul(rest: &[String], dc: &str) -> Option<Asked> {
    // An optional datacenter label before `consul`: it must be ours.
    let (body, kind) = find_kind(rest, dc)?;
    match kind {
        Kind::Addr => {
            let [hex] = body else { return None };
            hex_ip(hex).map(Asked::Addr)
        }
        Kind::Service => service(body),
        Kind::Rfc2782 => rfc2782(body),
    }
}

enum Kind {
    Service,
    Addr,
    /// `_svc._tag[.dc].consul` with no `.service` label.
    Rfc2782,
}

/// Splits off `service` / `addr` and an optional datacenter.
fn find_kind<'a>(rest: &'a [String], dc: &str) -> Option<(&'a [String], Kind)> {
    let kind_of = |l: &str| {
        if l.eq_ignore_ascii_case("service") {
            Some(Kind::Service)
        } else if l.eq_ignore_ascii_case("addr") {
            Some(Kind::Addr)
        } else {
            None
        }
    };
    let (last, before) = rest.split_last()?;
    if let Some(k) = kind_of(last) {
        return Some((before, k));
    }
    // `last` may be the datacenter.
    if let Some((kind_label, body)) = before.split_last() {
        if let Some(k) = kind_of(kind_label) {
            return last.eq_ignore_ascii_case(dc).then_some((body, k));
        }
    }
    // RFC 2782 without `.service`: `_svc._tag.consul` or `_svc._tag.dc.consul`.
    if rest.len() == 2 && rest[0].starts_with('_') {
        return Some((rest, Kind::Rfc2782));
    }
    if rest.len() == 3 && rest[0].starts_with('_') && last.eq_ignore_ascii_case(dc) {
        return Some((before, Kind::Rfc2782));
    }
    None
}

/// `svc`, `tag.svc`, or the RFC 2782 form `_svc._tag` before `.service`.
fn service(body: &[String]) -> Option<Asked> {
    match body {
        [a, b] if a.starts_with('_') && b.starts_with('_') => rfc2782(body),
        [svc] => key(svc, None),
        [tag, svc @ ..] if !svc.is_empty() => key(&svc.join("."), Some(tag.clone())),
        _ => None,
    }
}

/// `_svc._tag`; `_tcp` (or `_udp`) as the tag means any tag.
fn rfc2782(body: &[String]) -> Option<Asked> {
    let [svc, tag] = body else { return None };
    let svc = svc.strip_prefix('_')?;
    let tag = tag.strip_prefix('_')?;
    let tag = (!(tag.eq_ignore_ascii_case("tcp") || tag.eq_ignore_ascii_case("udp")))
        .then(|| tag.to_string());
    key(svc, tag)
}

fn key(svc: &str, tag: Option<String>) -> Option<Asked> {
    let key = ServiceKey::new(CONSUL_NAMESPACE, svc).ok()?;
    Some(Asked::Service { key, tag })
}

/// `0a000001` → 10.0.0.1; 32 hex digits → an IPv6 address.
pub fn hex_ip(hex: &str) -> Option<IpAddr> {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    match bytes?.as_slice() {
        b if b.len() == 4 && hex.len() == 8 => Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()),
        b if b.len() == 16 && hex.len() == 32 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Some(Ipv6Addr::from(a).into())
        }
        _ => None,
    }
}

/// The inverse of [`hex_ip`].
pub fn ip_hex(ip: IpAddr) -> String {
    let bytes = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(s: &str) -> Vec<String> {
        s.trim_end_matches('.')
            .split('.')
            .map(String::from)
            .collect()
    }

    fn svc(name: &str, tag: Option<&str>) -> Parsed {
        Parsed::Found(
            Zone::Consul,
            Asked::Service {
                key: ServiceKey::new("public", name).unwrap(),
                tag: tag.map(String::from),
            },
        )
    }

    #[test]
    fn consul_forms() {
        let p = |s: &str| parse(&labels(s), "dc1");
        assert_eq!(p("web.service.consul."), svc("web", None));
        assert_eq!(p("web.service.dc1.consul."), svc("web", None));
        assert_eq!(p("v1.web.service.consul."), svc("web", Some("v1")));
        assert_eq!(p("_web._tcp.service.consul."), svc("web", None));
        assert_eq!(p("_web._v1.service.dc1.consul."), svc("web", Some("v1")));
        assert_eq!(p("_web._tcp.consul."), svc("web", None));
        assert_eq!(p("_web._v1.dc1.consul."), svc("web", Some("v1")));
        assert_eq!(
            p("0a000001.addr.dc1.consul."),
            Parsed::Found(Zone::Consul, Asked::Addr("10.0.0.1".parse().unwrap()))
        );
        // Another datacenter, nodes, malformed names: in the zone, but no such name.
        assert_eq!(
            p("web.service.dc2.consul."),
            Parsed::NoSuchName(Zone::Consul)
        );
        assert_eq!(p("n1.node.consul."), Parsed::NoSuchName(Zone::Consul));
        assert_eq!(p("service.consul."), Parsed::NoSuchName(Zone::Consul));
        assert_eq!(p("zz.addr.consul."), Parsed::NoSuchName(Zone::Consul));
        assert_eq!(p("consul."), Parsed::NoSuchName(Zone::Consul));
        assert_eq!(p("example.com."), Parsed::NotServed);
    }

    #[test]
    fn native_forms() {
        let p = |s: &str| parse(&labels(s), "dc1");
        assert_eq!(
            p("orders.v2.prod.sextant."),
            Parsed::Found(
                Zone::Sextant,
                Asked::Service {
                    key: ServiceKey::new("prod", "orders.v2").unwrap(),
                    tag: None
                }
            )
        );
        assert_eq!(p("prod.sextant."), Parsed::NoSuchName(Zone::Sextant));
        assert_eq!(p("sextant."), Parsed::NoSuchName(Zone::Sextant));
    }

    proptest! {
        #[test]
        fn hex_addresses_round_trip(v4 in any::<u32>(), v6 in any::<u128>()) {
            let a = IpAddr::from(Ipv4Addr::from(v4));
            prop_assert_eq!(hex_ip(&ip_hex(a)), Some(a));
            let b = IpAddr::from(Ipv6Addr::from(v6));
            prop_assert_eq!(hex_ip(&ip_hex(b)), Some(b));
        }

        /// Any label sequence parses to some answer without panicking, and a native name
        /// always names the namespace before `sextant`.
        #[test]
        fn any_name_is_classified(ls in proptest::collection::vec("[a-zA-Z0-9_-]{1,8}", 0..6)) {
            let _ = parse(&ls, "dc1");
            let mut n = ls.clone();
            n.push("prod".into());
            n.push("sextant".into());
            if let Parsed::Found(Zone::Sextant, Asked::Service { key, .. }) = parse(&n, "dc1") {
                prop_assert_eq!(&*key.namespace, "prod");
                prop_assert_eq!(key.service.to_string(), ls.join("."));
            }
        }
    }
}
