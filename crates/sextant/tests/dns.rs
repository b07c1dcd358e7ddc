//! The DNS adapter of the real binary, queried with `dig` (Debian's dnsutils, installed by
//! scripts/test.sh): Consul's names (A, SRV with the targets' addresses in the additional
//! section, RFC 2782, tags, a datacenter), Sextant's own names, serving instances only,
//! NXDOMAIN vs NODATA with the SOA, REFUSED outside the zones, a CNAME for a host that is a
//! name, and truncation over UDP with the whole answer over TCP.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use serde_json::json;

/// What `dig` printed for one query, split into the parts the tests look at.
struct Dig {
    status: String,
    flags: String,
    answers: Vec<String>,
    authority: Vec<String>,
    additional: Vec<String>,
}

fn dig(server: SocketAddr, name: &str, qtype: &str, extra: &[&str]) -> Dig {
    let out = Command::new("dig")
        .args([
            format!("@{}", server.ip()),
            "-p".into(),
            server.port().to_string(),
            name.into(),
            qtype.into(),
            "+time=3".into(),
            "+tries=1".into(),
            "+nocookie".into(),
        ])
        .args(extra)
        .output()
        .expect("dig runs (scripts/test.sh installs dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dig failed: {text}");
    let mut d = Dig {
        status: String::new(),
        flags: String::new(),
        answers: vec![],
        authority: vec![],
        additional: vec![],
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(i) = line.find("status: ") {
            d.status = line[i + 8..].split(',').next().unwrap_or("").to_string();
        }
        if let Some(f) = line.strip_prefix(";; flags: ") {
            d.flags = f.split(';').next().unwrap_or("").to_string();
        }
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.is_empty() || line.starts_with(';') {
            if line.is_empty() {
                section = "";
            }
        } else {
            let rec = line.split_whitespace().collect::<Vec<_>>().join(" ");
            match section {
                "answer" => d.answers.push(rec),
                "authority" => d.authority.push(rec),
                "additional" => d.additional.push(rec),
                _ => {}
            }
        }
    }
    d
}

/// The last field of each record (the address, or an SRV's target).
fn data(records: &[String]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| r.rsplit(' ').next().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn consul_and_native_names_with_dig() {
    let server = Server::start();
    let dns = server.dns.expect("DNS is on by default");
    let api = server.api();
    for (id, ip, tags) in [("w1", "10.0.0.1", "v1,blue"), ("w2", "10.0.0.2", "v2")] {
        let body = json!({"host": ip, "port": 8080, "metadata": {"tags": tags}});
        api.register("public", "web", id, &body).await;
    }
    let drained = json!({"host": "10.0.0.3", "port": 8080});
    api.register("public", "web", "w3", &drained).await;
    api.post(
        &format!("{}/drain", instance_path("public", "web", "w3")),
        &json!({}),
    )
    .await
    .ok();

    // A: serving instances only, authoritative, with the configured TTL.
    let a = dig(dns, "web.service.consul", "A", &[]);
    assert_eq!(a.status, "NOERROR");
    assert!(a.flags.contains("aa"), "{}", a.flags);
    assert_eq!(data(&a.answers), ["10.0.0.1", "10.0.0.2"]);
    assert!(a.answers[0].contains(" 5 IN A "), "{:?}", a.answers);
    // A tag, and a datacenter.
    let tagged = dig(dns, "blue.web.service.dc1.consul", "A", &[]);
    assert_eq!(data(&tagged.answers), ["10.0.0.1"]);
    assert_eq!(
        dig(dns, "web.service.dc9.consul", "A", &[]).status,
        "NXDOMAIN"
    );

    // SRV: one per instance, targets resolvable from the additional section.
    let srv = dig(dns, "web.service.consul", "SRV", &[]);
    assert_eq!(
        data(&srv.answers),
        ["0a000001.addr.dc1.consul.", "0a000002.addr.dc1.consul."]
    );
    assert!(srv.answers.iter().all(|r| r.contains(" SRV 1 100 8080 ")));
    assert_eq!(data(&srv.additional), ["10.0.0.1", "10.0.0.2"]);
    let target = dig(dns, "0a000002.addr.dc1.consul", "A", &[]);
    assert_eq!(data(&target.answers), ["10.0.0.2"]);
    // RFC 2782, with and without a tag.
    let rfc = dig(dns, "_web._tcp.service.consul", "SRV", &[]);
    assert_eq!(rfc.answers.len(), 2);
    let rfc_tag = dig(dns, "_web._v2.service.consul", "SRV", &[]);
    assert_eq!(data(&rfc_tag.answers), ["0a000002.addr.dc1.consul."]);

    // No such service, or no serving instance with the tag: NXDOMAIN with the SOA. The name
    // exists but not with this type: NODATA (NOERROR, empty, SOA).
    let nx = dig(dns, "nope.service.consul", "A", &[]);
    assert_eq!(nx.status, "NXDOMAIN");
    assert!(nx.authority[0].contains(" SOA "), "{:?}", nx.authority);
    assert_eq!(
        dig(dns, "red.web.service.consul", "A", &[]).status,
        "NXDOMAIN"
    );
    let nodata = dig(dns, "web.service.consul", "AAAA", &[]);
    assert_eq!(nodata.status, "NOERROR");
    assert!(nodata.answers.is_empty());
    assert!(nodata.authority[0].contains(" SOA "));
    // Not our zone: refused, not a silent empty answer.
    assert_eq!(dig(dns, "example.com", "A", &[]).status, "REFUSED");

    // Sextant's own names, in any namespace; a host that is a name is a CNAME.
    let db = json!({"host": "db.example.com", "port": 5432});
    api.register("prod", "db", "d1", &db).await;
    let cname = dig(dns, "db.prod.sextant", "A", &[]);
    assert_eq!(cname.status, "NOERROR");
    assert!(
        cname.answers[0].contains(" CNAME db.example.com."),
        "{:?}",
        cname.answers
    );
    let native = dig(dns, "web.public.sextant", "A", &["+tcp"]);
    assert_eq!(data(&native.answers), ["10.0.0.1", "10.0.0.2"]);

    // A change is visible at once (answers are read from the registry, not a cache).
    api.deregister("public", "web", "w1").await;
    assert_eq!(
        data(&dig(dns, "web.service.consul", "A", &[]).answers),
        ["10.0.0.2"]
    );
    assert!(
        metric(
            &api,
            "sextant_dns_queries_total{protocol=\"udp\",type=\"A\",outcome=\"answer\"}"
        )
        .await
            >= 3.0
    );
}

#[tokio::test]
async fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let server = Server::start();
    let dns = server.dns.expect("DNS is on");
    let api = server.api();
    let n = 60;
    for i in 0..n {
        let body = json!({"host": format!("10.2.0.{i}"), "port": 80});
        api.register("public", "big", &format!("b{i}"), &body).await;
    }
    // A plain 512-byte UDP answer cannot hold 60 SRV records and their addresses.
    let udp = dig(dns, "big.service.consul", "SRV", &["+noedns", "+ignore"]);
    assert!(udp.flags.contains("tc"), "flags {:?}", udp.flags);
    assert!(udp.answers.len() < n);
    let tcp = dig(dns, "big.service.consul", "SRV", &["+tcp"]);
    assert!(!tcp.flags.contains("tc"));
    assert_eq!(tcp.answers.len(), n);
    assert_eq!(tcp.additional.len(), n);
}

#[tokio::test]
async fn dns_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--no-dns"]);
    assert_eq!(server.dns, None);
    assert!(server.log().contains("dns_addr=off"));
}
