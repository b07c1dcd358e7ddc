//! Unit and property tests of the mapping rules: a registration survives register → read, the
//! XML form (read back by a small independent parser) carries the same data as the JSON form,
//! the name mapping is one to one, and no input makes the parser panic.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use sextant_core::model::Instance;

use super::*;
use crate::xml;

/// The instance the registry would hold after `reg` was registered.
fn stored(reg: &EurekaRegistration) -> Instance {
    Instance {
        spec: Arc::new(reg.spec.clone()),
        status: reg.status,
        ttl_seconds: reg.ttl_seconds,
        spec_revision: 1,
        status_revision: 1,
    }
}

fn minimal() -> Value {
    json!({"instance": {
        "instanceId": "i-1",
        "hostName": "host-1",
        "app": "orders",
        "ipAddr": "10.0.0.1",
        "port": {"$": 8080, "@enabled": "true"},
        "dataCenterInfo": {"@class": DEFAULT_DATA_CENTER_CLASS, "name": "MyOwn"},
    }})
}

#[test]
fn minimal_registration_maps_and_defaults() {
    let r = parse_register(&minimal(), 5).unwrap();
    assert_eq!(r.service, "orders");
    assert_eq!(r.spec.id, "i-1");
    assert_eq!(r.spec.host, "10.0.0.1");
    assert_eq!(r.spec.port, 8080);
    assert_eq!(r.spec.protocol, "http");
    assert_eq!(r.ttl_seconds, DEFAULT_LEASE_SECONDS);
    assert_eq!(r.own_status, EurekaStatus::Up);
    assert!(r.status.is_serving());
    let out = render_instance("ORDERS", "orders", &stored(&r), false);
    assert_eq!(out["app"], "ORDERS");
    assert_eq!(out["status"], "UP");
    assert_eq!(out["overriddenStatus"], "UNKNOWN");
    assert_eq!(out["leaseInfo"]["durationInSecs"], 90);
    assert_eq!(out["port"], json!({"$": 8080, "@enabled": "true"}));
    assert_eq!(out["metadata"], json!({}));
}

#[test]
fn missing_fields_are_named() {
    for (field, want) in [
        ("ipAddr", "Missing ipAddr"),
        ("app", "Missing app"),
        ("dataCenterInfo", "Missing dataCenterInfo"),
    ] {
        let mut v = minimal();
        v["instance"].as_object_mut().unwrap().remove(field);
        let e = parse_register(&v, 0).unwrap_err();
        assert_eq!(e.to_string(), want);
    }
    // Without instanceId the id is the host name, as Eureka's InstanceInfo.getId() does.
    let mut v = minimal();
    v["instance"].as_object_mut().unwrap().remove("instanceId");
    assert_eq!(parse_register(&v, 0).unwrap().spec.id, "host-1");
    v["instance"].as_object_mut().unwrap().remove("hostName");
    assert_eq!(
        parse_register(&v, 0).unwrap_err().to_string(),
        "Missing instanceId"
    );
    let mut v = minimal();
    v["instance"].as_object_mut().unwrap().remove("hostName");
    assert_eq!(
        parse_register(&v, 0).unwrap_err().to_string(),
        "Missing hostName"
    );
    let mut v = minimal();
    v["instance"]["dataCenterInfo"] = json!({"@class": "x"});
    assert!(parse_register(&v, 0)
        .unwrap_err()
        .to_string()
        .contains("dataCenterInfo"));
    assert!(parse_register(&json!({"app": "x"}), 0)
        .unwrap_err()
        .to_string()
        .contains("instance"));
}

#[test]
fn amazon_instance_id_and_secure_port() {
    let mut v = minimal();
    let i = v["instance"].as_object_mut().unwrap();
    i.remove("instanceId");
    i.insert(
        "dataCenterInfo".into(),
        json!({"@class": "com.netflix.appinfo.AmazonInfo", "name": "Amazon",
               "metadata": {"instance-id": "i-0abc"}}),
    );
    i.insert("port".into(), json!({"$": 80, "@enabled": "false"}));
    i.insert("securePort".into(), json!({"$": "8443", "@enabled": true}));
    let r = parse_register(&v, 0).unwrap();
    assert_eq!(r.spec.id, "i-0abc");
    assert_eq!((r.spec.port, r.spec.protocol.as_str()), (8443, "https"));
    let out = render_instance("ORDERS", "orders", &stored(&r), false);
    assert_eq!(out["securePort"], json!({"$": "8443", "@enabled": true}));
    assert_eq!(out["dataCenterInfo"]["metadata"]["instance-id"], "i-0abc");
}

#[test]
fn bad_values_are_400s_naming_the_field() {
    for (field, value, needle) in [
        ("ipAddr", json!("not an ip!"), "ipAddr"),
        ("app", json!("bad app/"), "app"),
        ("instanceId", json!("a b"), "instanceId"),
        ("port", json!({"$": 70000}), "port"),
        ("leaseInfo", json!({"durationInSecs": -1}), "durationInSecs"),
    ] {
        let mut v = minimal();
        v["instance"][field] = value;
        let e = parse_register(&v, 0).unwrap_err().to_string();
        assert!(e.contains(needle), "{field}: {e}");
    }
}

#[test]
fn statuses_and_overrides() {
    let mut v = minimal();
    v["instance"]["status"] = json!("STARTING");
    let r = parse_register(&v, 0).unwrap();
    assert!(!r.status.is_serving());
    let mut inst = stored(&r);
    assert_eq!(shown_status(&inst, false), EurekaStatus::Starting);
    // An override shows and disables; removing it brings back the instance's own status.
    let up = parse_register(&minimal(), 0).unwrap();
    inst = stored(&up);
    inst.spec = Arc::new(with_override(&inst.spec, Some(EurekaStatus::OutOfService)));
    inst.status.enabled = false;
    assert_eq!(shown_status(&inst, false), EurekaStatus::OutOfService);
    let out = render_instance("ORDERS", "orders", &inst, false);
    assert_eq!(out["overriddenStatus"], "OUT_OF_SERVICE");
    inst.spec = Arc::new(with_override(&inst.spec, None));
    inst.status.enabled = true;
    assert_eq!(shown_status(&inst, false), EurekaStatus::Up);
    // Native changes: a drain shows DOWN, a disabled instance OUT_OF_SERVICE.
    inst.status.draining_since_ms = Some(1);
    assert_eq!(shown_status(&inst, false), EurekaStatus::Down);
    inst.status.draining_since_ms = None;
    inst.status.enabled = false;
    assert_eq!(shown_status(&inst, false), EurekaStatus::OutOfService);
    // Protection keeps an unhealthy (but enabled) instance UP.
    inst.status.enabled = true;
    inst.status.health = Health::Unhealthy;
    assert_eq!(shown_status(&inst, false), EurekaStatus::Down);
    assert_eq!(shown_status(&inst, true), EurekaStatus::Up);
    assert_eq!(
        EurekaStatus::parse("out_of_service"),
        EurekaStatus::OutOfService
    );
    assert_eq!(EurekaStatus::parse("weird"), EurekaStatus::Unknown);
}

#[test]
fn native_instance_renders_as_eureka() {
    let spec = InstanceSpec {
        id: "10.0.0.7:8080".into(),
        host: "10.0.0.7".into(),
        port: 8080,
        protocol: "http".into(),
        version: Text::default(),
        location: Location::default(),
        cell: Text::default(),
        lane: Text::default(),
        metadata: [("team", "pay")].into_iter().collect(),
    };
    let inst = Instance {
        spec: Arc::new(spec),
        status: InstanceStatus::default(),
        ttl_seconds: 0,
        spec_revision: 1,
        status_revision: 1,
    };
    let out = render_instance("ORDERS", "orders", &inst, false);
    assert_eq!(out["instanceId"], "10.0.0.7:8080");
    assert_eq!(out["hostName"], "10.0.0.7");
    assert_eq!(out["status"], "UP");
    assert_eq!(out["vipAddress"], "orders");
    assert_eq!(out["port"], json!({"$": 8080, "@enabled": "true"}));
    assert_eq!(out["metadata"], json!({"team": "pay"}));
    assert_eq!(out["dataCenterInfo"]["@class"], DEFAULT_DATA_CENTER_CLASS);
}

#[test]
fn names_and_hashcode() {
    assert_eq!(app_to_service("ORDERS").unwrap(), "orders");
    assert_eq!(service_to_app("orders").as_deref(), Some("ORDERS"));
    assert_eq!(service_to_app("g@@orders").as_deref(), Some("G@@ORDERS"));
    assert_eq!(service_to_app("Orders"), None);
    assert_eq!(apps_hashcode(["UP", "DOWN", "UP", "UP"]), "DOWN_1_UP_3_");
    assert_eq!(apps_hashcode([]), "");
    let all = render_applications(
        7,
        vec![json!({"name": "A", "instance": [{"status": "UP"}]})],
    );
    assert_eq!(all["applications"]["apps__hashcode"], "UP_1_");
    assert_eq!(all["applications"]["versions__delta"], "7");
    assert!(all["applications"]["application"].is_array());
}

// --- XML read back by a small parser of its own ----------------------------------------------

/// An element: attributes, text and child elements in order.
#[derive(Debug, Clone, PartialEq, Default)]
struct Node {
    name: String,
    attrs: BTreeMap<String, String>,
    text: String,
    children: Vec<Node>,
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Parses one element at `s[*pos..]` (no comments, CDATA or processing instructions besides a
/// leading prolog, which is all `xml::to_xml` writes).
fn parse_element(s: &str, pos: &mut usize) -> Node {
    assert_eq!(&s[*pos..*pos + 1], "<", "at {}", &s[*pos..]);
    *pos += 1;
    let end_name = s[*pos..]
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap()
        + *pos;
    let mut node = Node {
        name: s[*pos..end_name].to_string(),
        ..Node::default()
    };
    *pos = end_name;
    loop {
        let rest = &s[*pos..];
        let trimmed = rest.trim_start();
        *pos += rest.len() - trimmed.len();
        if trimmed.starts_with("/>") {
            *pos += 2;
            return node;
        }
        if trimmed.starts_with('>') {
            *pos += 1;
            break;
        }
        let eq = trimmed.find('=').unwrap();
        let name = trimmed[..eq].to_string();
        let q = trimmed[eq + 2..].find('"').unwrap();
        let value = unescape(&trimmed[eq + 2..eq + 2 + q]);
        node.attrs.insert(name, value);
        *pos += eq + 2 + q + 1;
    }
    loop {
        let rest = &s[*pos..];
        if rest.starts_with("</") {
            let close = rest.find('>').unwrap();
            assert_eq!(&rest[2..close], node.name);
            *pos += close + 1;
            return node;
        }
        if rest.starts_with('<') {
            node.children.push(parse_element(s, pos));
        } else {
            let lt = rest.find('<').unwrap();
            node.text.push_str(&unescape(&rest[..lt]));
            *pos += lt;
        }
    }
}

fn parse_xml(doc: &str) -> Node {
    let start = doc.find("?>").map_or(0, |i| i + 2);
    let mut pos = start;
    let n = parse_element(doc, &mut pos);
    assert_eq!(pos, doc.len(), "trailing data");
    n
}

/// What the XML should hold for `value` under `name`, by the convention, built independently
/// of `xml.rs`.
fn expected_nodes(name: &str, value: &Value) -> Vec<Node> {
    if !xml::is_xml_name(name) {
        return Vec::new();
    }
    match value {
        Value::Array(items) => items.iter().flat_map(|v| expected_nodes(name, v)).collect(),
        Value::Object(o) => {
            let mut n = Node {
                name: name.into(),
                ..Node::default()
            };
            for (k, v) in o {
                if let Some(a) = k.strip_prefix('@') {
                    if xml::is_xml_name(a) {
                        n.attrs.insert(a.into(), xml::scalar(v));
                    }
                } else if k == "$" {
                    n.text = xml::scalar(v);
                } else {
                    n.children.extend(expected_nodes(k, v));
                }
            }
            vec![n]
        }
        other => vec![Node {
            name: name.into(),
            text: xml::scalar(other),
            ..Node::default()
        }],
    }
}

#[test]
fn xml_leaves_out_keys_that_are_not_names() {
    let v = json!({"metadata": {"a/b": "1", "ok": "2"}});
    let doc = xml::to_xml("instance", &v);
    assert!(!doc.contains("a/b"), "{doc}");
    assert!(doc.contains("<ok>2</ok>"), "{doc}");
}

// --- property tests --------------------------------------------------------------------------

fn status_strategy() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["UP", "DOWN", "STARTING", "OUT_OF_SERVICE"])
}

/// Registrations as clients send them: required fields, a port (plain or secure), a lease,
/// user metadata (some keys Sextant cannot hold), and extra fields of every JSON kind.
fn registration_strategy() -> impl Strategy<Value = Value> {
    (
        "[a-z][a-z0-9-]{0,15}",
        "[A-Za-z0-9][A-Za-z0-9._:-]{0,30}",
        "[a-z][a-z0-9.-]{0,20}",
        (1u8..=254, 0u8..=255),
        (1u16..=65535, any::<bool>()),
        prop::option::of(1u32..=3600),
        status_strategy(),
        prop::collection::btree_map("[a-zA-Z][a-zA-Z0-9._-]{0,10}", "[ -~]{0,20}", 0..5),
        prop::collection::btree_map("@[a-z]{1,5}", "[a-z.$]{0,10}", 0..2),
        prop::collection::btree_map(
            "x[A-Za-z0-9]{1,8}",
            prop_oneof![
                "[ -~]{0,20}".prop_map(Value::from),
                any::<u32>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                ("[a-z]{1,5}", "[a-z]{0,5}").prop_map(|(k, v)| json!({ k: v })),
            ],
            0..4,
        ),
    )
        .prop_map(
            |(app, id, host, (a, b), (port, secure), lease, status, meta, odd, extra)| {
                let mut i = Map::new();
                i.insert("instanceId".into(), json!(id));
                i.insert("hostName".into(), json!(host));
                i.insert("app".into(), json!(app.to_ascii_uppercase()));
                i.insert("ipAddr".into(), json!(format!("10.{a}.{b}.1")));
                if secure {
                    i.insert("port".into(), json!({"$": 80, "@enabled": "false"}));
                    i.insert("securePort".into(), json!({"$": port, "@enabled": "true"}));
                } else {
                    i.insert("port".into(), json!({"$": port, "@enabled": "true"}));
                }
                i.insert("status".into(), json!(status));
                i.insert(
                    "dataCenterInfo".into(),
                    json!({"@class": DEFAULT_DATA_CENTER_CLASS, "name": "MyOwn"}),
                );
                if let Some(l) = lease {
                    i.insert(
                        "leaseInfo".into(),
                        json!({"durationInSecs": l, "renewalIntervalInSecs": 30}),
                    );
                }
                let mut m: Map<String, Value> =
                    meta.into_iter().map(|(k, v)| (k, json!(v))).collect();
                m.extend(odd.into_iter().map(|(k, v)| (k, json!(v))));
                i.insert("metadata".into(), Value::Object(m));
                i.extend(extra);
                json!({ "instance": i })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// What a client registers is what a Eureka client reads back.
    #[test]
    fn register_then_read_round_trips(body in registration_strategy()) {
        let reg = parse_register(&body, 42).unwrap();
        let sent = &body["instance"];
        let app = sent["app"].as_str().unwrap();
        let shown = service_to_app(&reg.service);
        prop_assert_eq!(shown.as_deref(), Some(app));
        let out = render_instance(app, &reg.service, &stored(&reg), false);
        for (k, v) in sent.as_object().unwrap() {
            match k.as_str() {
                // Sent and shown may differ only in what Sextant's status rule decides.
                "status" => prop_assert_eq!(&out["status"], v),
                "leaseInfo" | "dataCenterInfo" => {
                    for (lk, lv) in v.as_object().unwrap() {
                        prop_assert_eq!(&out[k][lk], lv, "{}.{}", k, lk);
                    }
                }
                _ => prop_assert_eq!(&out[k], v, "field {}", k),
            }
        }
        let lease = sent["leaseInfo"]["durationInSecs"].as_u64().unwrap_or(90);
        prop_assert_eq!(u64::from(reg.ttl_seconds), lease);
        prop_assert_eq!(reg.status.is_serving(), sent["status"] == "UP");
    }

    /// The XML and the JSON form of an instance carry the same data.
    #[test]
    fn xml_and_json_agree(body in registration_strategy(), protected in any::<bool>()) {
        let reg = parse_register(&body, 42).unwrap();
        let app = service_to_app(&reg.service).unwrap();
        let out = render_instance(&app, &reg.service, &stored(&reg), protected);
        let doc = xml::to_xml("instance", &out);
        let parsed = parse_xml(&doc);
        // Attribute-named metadata keys (`@class`) are attributes of <metadata> in XML too.
        let want = expected_nodes("instance", &out);
        prop_assert_eq!(vec![parsed], want, "{}", doc);
    }

    /// A service name meets itself through Eureka and back.
    #[test]
    fn names_map_one_to_one(svc in "[a-z0-9][a-z0-9._@:-]{0,40}") {
        let app = service_to_app(&svc).unwrap();
        prop_assert_eq!(app_to_service(&app).unwrap(), svc);
    }

    /// No body makes the parser panic: it maps or names what is wrong.
    #[test]
    fn any_json_is_mapped_or_refused(v in arbitrary_json(3)) {
        let _ = parse_register(&json!({"instance": v.clone()}), 0);
        let _ = parse_register(&v, 0);
    }
}

fn arbitrary_json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        prop::sample::select(vec!["app", "UP", "10.0.0.1", "x", "8080"]).prop_map(Value::from),
    ];
    leaf.prop_recursive(depth, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "instanceId",
                    "hostName",
                    "app",
                    "ipAddr",
                    "dataCenterInfo",
                    "name",
                    "port",
                    "$",
                    "@enabled",
                    "securePort",
                    "leaseInfo",
                    "durationInSecs",
                    "metadata",
                    "status",
                    "instance",
                    "lastDirtyTimestamp",
                ])
                .prop_map(String::from),
                inner,
                0..8,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
