//! The records of an answer (pure): which instances, in what order, as which record types, and
//! whether the answer is NXDOMAIN (no such name), NODATA (the name exists, not with that
//! type) or records.
//!
//! - A service name exists while it has a serving instance (with the tag, if one was asked);
//!   otherwise it is NXDOMAIN, as in Consul. While the service's protection threshold has
//!   tripped, every instance is served, as in discovery.
//! - A / AAAA: the instances whose host is an address of that family; when no host at all is
//!   an address, one CNAME to a (random) host name (a name may not hold a CNAME beside other
//!   records); else NODATA.
//! - SRV: one record per instance (weight = its effective weight), the target
//!   `<hexip>.addr.<dc>.consul.` with its A/AAAA record in the additional section, or the host
//!   itself when it is a DNS name.
//! - Order is random per answer, so resolvers that take the first record spread load.
//! - A tag is an entry of the instance's `tags` metadata (comma-separated), where the Consul
//!   adapter keeps Consul's tags.

use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use sextant_core::model::{Instance, XorShift};

use crate::names::{ip_hex, Zone};

/// The metadata key holding an instance's tags.
pub const TAGS_KEY: &str = "tags";

/// What to send.
#[derive(Debug, Default)]
pub struct Answer {
    pub nxdomain: bool,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    pub fn nxdomain() -> Self {
        Self {
            nxdomain: true,
            ..Default::default()
        }
    }

    /// No answer records: the zone's SOA goes in the authority section (negative caching).
    pub fn is_negative(&self) -> bool {
        self.answers.is_empty()
    }
}

/// Whether `i` carries `tag` in its `tags` metadata.
pub fn has_tag(i: &Instance, tag: &str) -> bool {
    i.spec
        .metadata
        .get(TAGS_KEY)
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag))
}

/// The answer for a service's `instances` (already the ones discovery serves).
pub fn service(
    qname: &Name,
    qtype: RecordType,
    instances: &[Instance],
    tag: Option<&str>,
    ttl: u32,
    dc: &str,
    rng: &mut XorShift,
) -> Answer {
    let mut chosen: Vec<&Instance> = instances
        .iter()
        .filter(|i| tag.is_none_or(|t| has_tag(i, t)))
        .collect();
    if chosen.is_empty() {
        return Answer::nxdomain();
    }
    shuffle(&mut chosen, rng);
    let mut out = Answer::default();
    match qtype {
        RecordType::A | RecordType::AAAA | RecordType::ANY => {
            for i in &chosen {
                if let Some(r) = address_record(qname, qtype, &i.spec.host, ttl) {
                    out.answers.push(r);
                }
            }
            // A CNAME only when no host is an address: a name holding a CNAME holds nothing
            // else, for any type.
            let any_ip = chosen.iter().any(|i| i.spec.host.parse::<IpAddr>().is_ok());
            if !any_ip && qtype != RecordType::ANY {
                if let Some(i) = chosen.first() {
                    if let Ok(target) = fqdn(&i.spec.host) {
                        out.answers.push(Record::from_rdata(
                            qname.clone(),
                            ttl,
                            RData::CNAME(CNAME(target)),
                        ));
                    }
                }
            }
        }
        RecordType::SRV => {
            for i in &chosen {
                let weight = i.status.effective_weight().clamp(1, u32::from(u16::MAX)) as u16;
                let (target, extra) = match i.spec.host.parse::<IpAddr>() {
                    Ok(ip) => {
                        let Ok(t) = Name::from_ascii(format!("{}.addr.{dc}.consul.", ip_hex(ip)))
                        else {
                            continue;
                        };
                        let rec = address_record(&t, RecordType::ANY, &i.spec.host, ttl);
                        (t, rec)
                    }
                    Err(_) => match fqdn(&i.spec.host) {
                        Ok(t) => (t, None),
                        Err(_) => continue,
                    },
                };
                out.answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::SRV(SRV::new(1, weight, i.spec.port, target)),
                ));
                out.additionals.extend(extra);
            }
        }
        _ => {} // NODATA: the name exists, not with this type.
    }
    out
}

/// The answer for `<hexip>.addr.<dc>.consul`.
pub fn addr(qname: &Name, qtype: RecordType, ip: IpAddr, ttl: u32) -> Answer {
    let mut out = Answer::default();
    let want = matches!(
        (qtype, ip),
        (RecordType::A | RecordType::ANY, IpAddr::V4(_))
            | (RecordType::AAAA | RecordType::ANY, IpAddr::V6(_))
    );
    if want {
        out.answers.push(ip_record(qname, ip, ttl));
    }
    out
}

/// The zone's SOA, for negative answers: its minimum is the negative-caching TTL.
pub fn soa(zone: Zone, ttl: u32) -> Record {
    let origin = Name::from_ascii(zone.origin()).unwrap_or_else(|_| Name::root());
    let ns = Name::from_ascii(format!("ns.{}", zone.origin())).unwrap_or_else(|_| Name::root());
    let mail =
        Name::from_ascii(format!("hostmaster.{}", zone.origin())).unwrap_or_else(|_| Name::root());
    Record::from_rdata(
        origin,
        ttl,
        RData::SOA(SOA::new(ns, mail, 1, 3600, 600, 86400, ttl)),
    )
}

fn address_record(name: &Name, qtype: RecordType, host: &str, ttl: u32) -> Option<Record> {
    let ip: IpAddr = host.parse().ok()?;
    let fits = match ip {
        IpAddr::V4(_) => matches!(qtype, RecordType::A | RecordType::ANY),
        IpAddr::V6(_) => matches!(qtype, RecordType::AAAA | RecordType::ANY),
    };
    fits.then(|| ip_record(name, ip, ttl))
}

fn ip_record(name: &Name, ip: IpAddr, ttl: u32) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, rdata)
}

fn fqdn(host: &str) -> Result<Name, hickory_proto::ProtoError> {
    let mut n = Name::from_ascii(host)?;
    n.set_fqdn(true);
    Ok(n)
}

fn shuffle<T>(v: &mut [T], rng: &mut XorShift) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sextant_core::model::{InstanceSpec, InstanceStatus, Location, Metadata};
    use std::sync::Arc;

    fn inst(id: &str, host: &str, tags: &str) -> Instance {
        let metadata = if tags.is_empty() {
            Metadata::new()
        } else {
            Metadata::from_iter([(TAGS_KEY.to_string(), tags.to_string())])
        };
        Instance {
            spec: Arc::new(InstanceSpec {
                id: id.into(),
                host: host.into(),
                port: 8080,
                protocol: "http".into(),
                version: "".into(),
                location: Location::default(),
                cell: "".into(),
                lane: "".into(),
                metadata,
            }),
            status: InstanceStatus::default(),
            ttl_seconds: 0,
            spec_revision: 1,
            status_revision: 1,
        }
    }

    fn q() -> Name {
        Name::from_ascii("web.service.consul.").unwrap()
    }

    #[test]
    fn a_records_cname_nodata_and_nxdomain() {
        let mut rng = XorShift::new(7);
        let all = [
            inst("a", "10.0.0.1", "v1,blue"),
            inst("b", "10.0.0.2", "v2"),
            inst("c", "::1", ""),
        ];
        let a = service(&q(), RecordType::A, &all, None, 5, "dc1", &mut rng);
        assert_eq!(a.answers.len(), 2);
        let tagged = service(&q(), RecordType::A, &all, Some("blue"), 5, "dc1", &mut rng);
        assert_eq!(tagged.answers.len(), 1);
        let aaaa = service(&q(), RecordType::AAAA, &all, None, 5, "dc1", &mut rng);
        assert_eq!(aaaa.answers.len(), 1);
        // The name exists but has no TXT: NODATA, not NXDOMAIN.
        let txt = service(&q(), RecordType::TXT, &all, None, 5, "dc1", &mut rng);
        assert!(!txt.nxdomain && txt.answers.is_empty());
        // No instance with the tag: NXDOMAIN.
        assert!(service(&q(), RecordType::A, &all, Some("red"), 5, "dc1", &mut rng).nxdomain);
        // Only a DNS-named host: a CNAME to it.
        let named = [inst("d", "db.example.com", "")];
        let c = service(&q(), RecordType::A, &named, None, 5, "dc1", &mut rng);
        assert_eq!(c.answers[0].record_type(), RecordType::CNAME);
    }

    #[test]
    fn srv_targets_and_additionals() {
        let mut rng = XorShift::new(7);
        let all = [inst("a", "10.0.0.1", ""), inst("d", "db.example.com", "")];
        let s = service(&q(), RecordType::SRV, &all, None, 5, "dc1", &mut rng);
        assert_eq!(s.answers.len(), 2);
        assert_eq!(s.additionals.len(), 1);
        let targets: Vec<String> = s
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(srv) => srv.target.to_ascii(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(targets.contains(&"0a000001.addr.dc1.consul.".to_string()));
        assert!(targets.contains(&"db.example.com.".to_string()));
        assert_eq!(
            s.additionals[0].name.to_ascii(),
            "0a000001.addr.dc1.consul."
        );
    }

    #[test]
    fn order_is_shuffled() {
        let mut rng = XorShift::new(11);
        let all: Vec<Instance> = (0..8)
            .map(|i| inst(&i.to_string(), &format!("10.0.0.{i}"), ""))
            .collect();
        let firsts: std::collections::HashSet<String> = (0..40)
            .map(|_| {
                let a = service(&q(), RecordType::A, &all, None, 5, "dc1", &mut rng);
                a.answers[0].data.to_string()
            })
            .collect();
        assert!(firsts.len() > 3, "{firsts:?}");
    }
}
