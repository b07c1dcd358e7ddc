//! The official Rust Nacos client (`nacos-sdk`, naming only, Nacos 2.x gRPC) against the real
//! binary's Nacos adapter: register with metadata, weight and cluster; query with and without
//! cluster and health filters; subscribe and receive pushes (checked both at the listener and in
//! the SDK's own log, so a push is not mistaken for the SDK's background polling); batch
//! register; deregister; a non-default group and a non-public namespace; interop with the
//! native HTTP API both ways; and an instance lapsing after its client's connection is cut
//! (the client runs in a child process that is killed: the SDK has no way to close its
//! connection in-process, and dropping a `NamingService` leaves its background tasks and
//! connection alive).
//!
//! Everything is on loopback; every wait is bounded. The SDK's disk cache goes to a temporary
//! directory, never `$HOME`. `NACOS_SDK_TEST_LOG=<filter>` (e.g. `nacos_sdk=debug`) also prints
//! the SDK's log to stderr; failures print the tail of it regardless.
//!
//! This file holds the scenarios; the harness (server, SDK clients, log capture, helpers) is
//! `nacos_rust_sdk/harness.rs`.

mod common;
#[path = "nacos_rust_sdk/harness.rs"]
mod harness;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use nacos_sdk::api::naming::NamingServiceBuilder;
use nacos_sdk::api::props::ClientProps;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_query_subscribe_batch_and_deregister() {
    init_sdk_log();
    let server = Sextant::start();
    let cache = tempfile::tempdir().unwrap();
    let owner = server.client("", cache.path()).await;
    let other = server.client("", cache.path()).await;
    // "public" is the same namespace as "".
    let watcher = server.client("public", cache.path()).await;
    let svc = "sdk-orders";
    let grouped = format!("DEFAULT_GROUP@@{svc}");

    let first = instance(9101, "c1", 2.5, &[("version", "v1"), ("zone", "z1")]);
    server
        .sdk(
            "register_instance",
            owner.register_instance(s(svc), None, first.clone()),
        )
        .await;

    let all = server
        .sdk(
            "get_all_instances",
            owner.get_all_instances(s(svc), None, vec![], false),
        )
        .await;
    assert_eq!(all.len(), 1, "{all:#?}");
    let got = &all[0];
    assert_eq!((got.ip.as_str(), got.port), ("127.0.0.1", 9101));
    assert_eq!(got.weight, 2.5);
    assert!(got.healthy && got.enabled && got.ephemeral, "{got:#?}");
    assert_eq!(got.cluster_name.as_deref(), Some("c1"));
    assert_eq!(got.metadata, meta(&[("version", "v1"), ("zone", "z1")]));
    assert_eq!(got.service_name.as_deref(), Some(grouped.as_str()));
    assert_eq!(
        got.instance_id.as_deref(),
        Some(format!("127.0.0.1#9101#c1#{grouped}").as_str())
    );

    // Cluster filters.
    for (clusters, want) in [
        (vec![s("c1")], vec![9101]),
        (vec![s("c1"), s("c2")], vec![9101]),
        (vec![s("DEFAULT")], vec![]),
        (vec![s("nope")], vec![]),
    ] {
        let got = server
            .sdk(
                "get_all_instances with clusters",
                owner.get_all_instances(s(svc), None, clusters.clone(), false),
            )
            .await;
        assert_eq!(ports(&got), want, "clusters {clusters:?}");
    }
    // Health filters.
    let healthy = server
        .sdk(
            "select_instances healthy",
            owner.select_instances(s(svc), None, vec![], false, true),
        )
        .await;
    assert_eq!(ports(&healthy), [9101]);
    let unhealthy = server
        .sdk(
            "select_instances unhealthy",
            owner.select_instances(s(svc), None, vec![], false, false),
        )
        .await;
    assert_eq!(ports(&unhealthy), Vec::<i32>::new());
    let one = server
        .sdk(
            "select_one_healthy_instance",
            owner.select_one_healthy_instance(s(svc), None, vec![], false),
        )
        .await;
    assert_eq!(one.port, 9101);

    // Natively: id ip:port:cluster, cluster as cell, weight × 100, leased (ephemeral).
    let native = server.native("public", svc).await;
    assert_eq!(native_ids(&native), ["127.0.0.1:9101:c1"]);
    let n = find_native(&native, "127.0.0.1:9101:c1");
    assert_eq!(
        (n["host"].as_str(), n["port"].as_u64()),
        (Some("127.0.0.1"), Some(9101))
    );
    assert_eq!(n["cell"], "c1");
    assert_eq!(n["status"]["weight"], 250);
    assert_eq!(n["metadata"], json!({"version": "v1", "zone": "z1"}));
    assert!(n["ttl_seconds"].as_u64().unwrap() > 0, "{n}");

    // A subscriber on a third connection.
    let (_listener, mut events, ev) = server
        .subscribe_settled("subscribe", &watcher, svc, None, &[9101])
        .await;
    assert_eq!(
        (ev.service_name.as_str(), ev.group_name.as_str()),
        (svc, "DEFAULT_GROUP")
    );

    // Another client registers a second instance: pushed.
    let mark = sdk_log_mark();
    server
        .sdk(
            "register a second instance",
            other.register_instance(s(svc), None, instance(9102, "DEFAULT", 1.0, &[])),
        )
        .await;
    let ev = server
        .event_where(&mut events, "the second instance is added", |h| {
            ports(h) == [9101, 9102]
        })
        .await;
    let second = ev
        .instances
        .as_ref()
        .unwrap()
        .iter()
        .find(|h| h.port == 9102)
        .unwrap();
    assert_eq!(second.cluster_name.as_deref(), Some("DEFAULT"));
    assert_eq!(second.weight, 1.0);
    server
        .push_where(
            mark,
            svc,
            "DEFAULT_GROUP",
            "push of the second instance",
            |l| l.contains("port: 9102,"),
        )
        .await;

    // A batch registration makes the batch that client's whole set of instances of the
    // service (Nacos 2.x keeps one publish record per client and service): 9102 goes.
    let mark = sdk_log_mark();
    server
        .sdk(
            "batch_register_instance",
            other.batch_register_instance(
                s(svc),
                None,
                vec![
                    instance(9103, "c2", 1.0, &[("batch", "1")]),
                    instance(9104, "c2", 0.5, &[("batch", "2")]),
                ],
            ),
        )
        .await;
    let ev = server
        .event_where(
            &mut events,
            "the batch replaces the client's instances",
            |h| ports(h) == [9101, 9103, 9104],
        )
        .await;
    let b = ev
        .instances
        .as_ref()
        .unwrap()
        .iter()
        .find(|h| h.port == 9104)
        .unwrap();
    assert_eq!((b.weight, b.cluster_name.as_deref()), (0.5, Some("c2")));
    assert_eq!(b.metadata, meta(&[("batch", "2")]));
    server
        .push_where(mark, svc, "DEFAULT_GROUP", "push of the batch", |l| {
            l.contains("port: 9103,") && l.contains("port: 9104,") && !l.contains("port: 9102,")
        })
        .await;
    let native = server.native("public", svc).await;
    assert_eq!(
        native_ids(&native),
        [
            "127.0.0.1:9101:c1",
            "127.0.0.1:9103:c2",
            "127.0.0.1:9104:c2"
        ]
    );

    // Deregistrations are pushed.
    let mark = sdk_log_mark();
    server
        .sdk(
            "deregister_instance (first)",
            owner.deregister_instance(s(svc), None, first.clone()),
        )
        .await;
    server
        .event_where(&mut events, "the first instance is removed", |h| {
            ports(h) == [9103, 9104]
        })
        .await;
    server
        .push_where(
            mark,
            svc,
            "DEFAULT_GROUP",
            "push of the deregistration",
            |l| !l.contains("port: 9101,") && l.contains("port: 9104,"),
        )
        .await;

    let mark = sdk_log_mark();
    server
        .sdk(
            "deregister_instance (one of the batch)",
            other.deregister_instance(s(svc), None, instance(9103, "c2", 1.0, &[])),
        )
        .await;
    server
        .event_where(&mut events, "9103 is removed", |h| ports(h) == [9104])
        .await;
    server
        .push_where(mark, svc, "DEFAULT_GROUP", "push of 9103's removal", |l| {
            !l.contains("port: 9103,") && l.contains("port: 9104,")
        })
        .await;
    let all = server
        .sdk(
            "get_all_instances after deregistering",
            owner.get_all_instances(s(svc), None, vec![], false),
        )
        .await;
    assert_eq!(ports(&all), [9104]);
    assert_eq!(
        native_ids(&server.native("public", svc).await),
        ["127.0.0.1:9104:c2"]
    );

    // The last one goes: an empty push.
    let mark = sdk_log_mark();
    server
        .sdk(
            "deregister_instance (last)",
            other.deregister_instance(s(svc), None, instance(9104, "c2", 0.5, &[])),
        )
        .await;
    server
        .event_where(&mut events, "the service is empty", |h| h.is_empty())
        .await;
    server
        .push_where(
            mark,
            svc,
            "DEFAULT_GROUP",
            "push of the empty service",
            |l| !l.contains("port: "),
        )
        .await;
    assert!(server.native("public", svc).await.is_empty());

    // Querying through a subscription (SubscribeServiceRequest's answer) on a fresh client.
    server
        .sdk(
            "register again",
            owner.register_instance(s(svc), None, first.clone()),
        )
        .await;
    let reader = server.client("", cache.path()).await;
    let got = server
        .sdk(
            "get_all_instances with subscribe",
            reader.get_all_instances(s(svc), None, vec![], true),
        )
        .await;
    assert_eq!(ports(&got), [9101]);
    assert_eq!(got[0].metadata, meta(&[("version", "v1"), ("zone", "z1")]));
}

fn find_native<'a>(instances: &'a [Value], id: &str) -> &'a Value {
    instances
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no instance {id} in {instances:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_namespaces_are_separate() {
    init_sdk_log();
    let server = Sextant::start();
    let cache = tempfile::tempdir().unwrap();
    let dev = server.client("sdk-dev", cache.path()).await;
    let dev_watcher = server.client("sdk-dev", cache.path()).await;
    let dev_other = server.client("sdk-dev", cache.path()).await;
    let public = server.client("", cache.path()).await;
    let (svc, group) = ("ledger", "PAYMENTS");
    let g = || Some(s(group));

    server
        .sdk(
            "register in sdk-dev/PAYMENTS",
            dev.register_instance(
                s(svc),
                g(),
                instance(9401, "DEFAULT", 1.0, &[("ns", "dev")]),
            ),
        )
        .await;

    let got = server
        .sdk(
            "get_all_instances in the group",
            dev.get_all_instances(s(svc), g(), vec![], false),
        )
        .await;
    assert_eq!(ports(&got), [9401]);
    assert_eq!(got[0].service_name.as_deref(), Some("PAYMENTS@@ledger"));
    assert_eq!(
        got[0].instance_id.as_deref(),
        Some("127.0.0.1#9401#DEFAULT#PAYMENTS@@ledger")
    );
    let default_group = server
        .sdk(
            "get_all_instances in DEFAULT_GROUP",
            dev.get_all_instances(s(svc), None, vec![], false),
        )
        .await;
    assert!(default_group.is_empty(), "{default_group:#?}");
    let other_ns = server
        .sdk(
            "get_all_instances in public",
            public.get_all_instances(s(svc), g(), vec![], false),
        )
        .await;
    assert!(other_ns.is_empty(), "{other_ns:#?}");

    // Natively: the namespace as-is, the service G@@name.
    let native = server.native("sdk-dev", "PAYMENTS@@ledger").await;
    assert_eq!(native_ids(&native), ["127.0.0.1:9401"]);
    assert_eq!(native[0]["metadata"], json!({"ns": "dev"}));
    assert!(server.native("public", "PAYMENTS@@ledger").await.is_empty());
    assert!(server.native("sdk-dev", "ledger").await.is_empty());

    // Service lists are per namespace and group.
    let (names, count) = server
        .sdk("get_service_list", dev.get_service_list(1, 10, g()))
        .await;
    assert_eq!((names, count), (vec![s(svc)], 1));
    let (names, count) = server
        .sdk(
            "get_service_list in public",
            public.get_service_list(1, 10, g()),
        )
        .await;
    assert_eq!((names, count), (vec![], 0));

    // A subscriber in sdk-dev/PAYMENTS.
    let (_listener, mut events, ev) = server
        .subscribe_settled("subscribe in the group", &dev_watcher, svc, g(), &[9401])
        .await;
    assert_eq!(
        (ev.service_name.as_str(), ev.group_name.as_str()),
        (svc, group)
    );

    // The same names in another namespace or group reach it not.
    server
        .sdk(
            "register in public/PAYMENTS",
            public.register_instance(s(svc), g(), instance(9402, "DEFAULT", 1.0, &[])),
        )
        .await;
    server
        .sdk(
            "register in sdk-dev/DEFAULT_GROUP",
            dev_other.register_instance(s(svc), None, instance(9403, "DEFAULT", 1.0, &[])),
        )
        .await;
    server
        .no_push(svc, group, "changes in other namespaces and groups")
        .await;
    assert!(
        events.try_recv().is_err(),
        "an event for another namespace or group"
    );
    assert_eq!(
        native_ids(&server.native("public", "PAYMENTS@@ledger").await),
        ["127.0.0.1:9402"]
    );
    assert_eq!(
        native_ids(&server.native("sdk-dev", "ledger").await),
        ["127.0.0.1:9403"]
    );

    // Its own namespace and group do.
    let mark = sdk_log_mark();
    server
        .sdk(
            "register in sdk-dev/PAYMENTS from another client",
            dev_other.register_instance(s(svc), g(), instance(9404, "DEFAULT", 1.0, &[])),
        )
        .await;
    server
        .event_where(&mut events, "9404 is added", |h| ports(h) == [9401, 9404])
        .await;
    server
        .push_where(mark, svc, group, "push in the group", |l| {
            l.contains("port: 9404,")
        })
        .await;

    let mark = sdk_log_mark();
    server
        .sdk(
            "deregister in the group",
            dev.deregister_instance(s(svc), g(), instance(9401, "DEFAULT", 1.0, &[])),
        )
        .await;
    server
        .event_where(&mut events, "9401 is removed", |h| ports(h) == [9404])
        .await;
    server
        .push_where(mark, svc, group, "push of the removal in the group", |l| {
            !l.contains("port: 9401,")
        })
        .await;
    assert_eq!(
        native_ids(&server.native("sdk-dev", "PAYMENTS@@ledger").await),
        ["127.0.0.1:9404"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_nacos_registrations_see_each_other() {
    init_sdk_log();
    let server = Sextant::start();
    let api = server.api();
    let cache = tempfile::tempdir().unwrap();
    let client = server.client("", cache.path()).await;
    let watcher = server.client("", cache.path()).await;
    let svc = "interop";

    // Native → Nacos: cell is the cluster, weight / 100, metadata as-is; persistent (no TTL).
    api.register(
        "public",
        svc,
        "native-1",
        &json!({"host": "127.0.0.1", "port": 9201, "cell": "c9",
                "metadata": {"k": "v", "team": "pay"}, "status": {"weight": 300}}),
    )
    .await;
    let got = server
        .sdk(
            "get_all_instances of a native service",
            client.get_all_instances(s(svc), None, vec![], false),
        )
        .await;
    assert_eq!(ports(&got), [9201]);
    let n = &got[0];
    assert_eq!(n.ip, "127.0.0.1");
    assert_eq!(n.weight, 3.0);
    assert_eq!(n.cluster_name.as_deref(), Some("c9"));
    assert_eq!(n.metadata, meta(&[("k", "v"), ("team", "pay")]));
    assert!(n.healthy && n.enabled && !n.ephemeral, "{n:#?}");
    let c9 = server
        .sdk(
            "get_all_instances of cluster c9",
            client.get_all_instances(s(svc), None, vec![s("c9")], false),
        )
        .await;
    assert_eq!(ports(&c9), [9201]);

    let (listener, mut events, _) = server
        .subscribe_settled(
            "subscribe to a native service",
            &watcher,
            svc,
            None,
            &[9201],
        )
        .await;

    // Native changes are pushed to the Nacos subscriber.
    let mark = sdk_log_mark();
    api.register(
        "public",
        svc,
        "native-2",
        &json!({"host": "127.0.0.1", "port": 9202}),
    )
    .await;
    server
        .event_where(&mut events, "native-2 is added", |h| {
            ports(h) == [9201, 9202]
        })
        .await;
    server
        .push_where(mark, svc, "DEFAULT_GROUP", "push of native-2", |l| {
            l.contains("port: 9202,")
        })
        .await;

    let mark = sdk_log_mark();
    api.set_status("public", svc, "native-2", &json!({"enabled": false}))
        .await;
    // Nacos answers and pushes enabled instances only: a disabled one leaves the push.
    server
        .event_where(&mut events, "native-2 is disabled", |h| ports(h) == [9201])
        .await;
    server
        .push_where(
            mark,
            svc,
            "DEFAULT_GROUP",
            "push of the status change",
            |l| l.contains("port: 9201,") && !l.contains("port: 9202,"),
        )
        .await;
    let serving = server
        .sdk(
            "select_instances healthy",
            client.select_instances(s(svc), None, vec![], false, true),
        )
        .await;
    assert_eq!(
        ports(&serving),
        [9201],
        "a disabled instance is not selected"
    );
    api.set_status("public", svc, "native-2", &json!({"enabled": true}))
        .await;
    server
        .event_where(&mut events, "native-2 is enabled again", |h| {
            ports(h) == [9201, 9202]
        })
        .await;

    let mark = sdk_log_mark();
    api.deregister("public", svc, "native-1").await;
    server
        .event_where(&mut events, "native-1 is removed", |h| ports(h) == [9202])
        .await;
    server
        .push_where(
            mark,
            svc,
            "DEFAULT_GROUP",
            "push of native-1's removal",
            |l| !l.contains("port: 9201,"),
        )
        .await;

    // Nacos → native.
    let mark = sdk_log_mark();
    server
        .sdk(
            "register through Nacos",
            client.register_instance(
                s(svc),
                None,
                instance(9203, "DEFAULT", 0.5, &[("from", "sdk")]),
            ),
        )
        .await;
    let native = server.native("public", svc).await;
    assert_eq!(native_ids(&native), ["127.0.0.1:9203", "native-2"]);
    let n = find_native(&native, "127.0.0.1:9203");
    assert_eq!(
        (n["host"].as_str(), n["port"].as_u64()),
        (Some("127.0.0.1"), Some(9203))
    );
    assert_eq!(n["cell"], "");
    assert_eq!(n["status"]["weight"], 50);
    assert_eq!(n["metadata"], json!({"from": "sdk"}));
    assert!(n["ttl_seconds"].as_u64().unwrap() > 0, "{n}");
    server
        .event_where(&mut events, "the Nacos instance is added", |h| {
            ports(h) == [9202, 9203]
        })
        .await;
    server
        .push_where(
            mark,
            svc,
            "DEFAULT_GROUP",
            "push of the Nacos instance",
            |l| l.contains("port: 9203,"),
        )
        .await;

    server
        .sdk(
            "deregister through Nacos",
            client.deregister_instance(s(svc), None, instance(9203, "DEFAULT", 0.5, &[])),
        )
        .await;
    assert_eq!(
        native_ids(&server.native("public", svc).await),
        ["native-2"]
    );
    server
        .event_where(&mut events, "the Nacos instance is removed", |h| {
            ports(h) == [9202]
        })
        .await;

    // After unsubscribing nothing more is pushed.
    server
        .sdk(
            "unsubscribe",
            watcher.unsubscribe(s(svc), None, vec![], listener.clone()),
        )
        .await;
    api.register(
        "public",
        svc,
        "native-3",
        &json!({"host": "127.0.0.1", "port": 9204}),
    )
    .await;
    server
        .no_push(svc, "DEFAULT_GROUP", "after unsubscribing")
        .await;
    let got = server
        .sdk(
            "get_all_instances after unsubscribing",
            watcher.get_all_instances(s(svc), None, vec![], false),
        )
        .await;
    assert_eq!(ports(&got), [9202, 9204]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_cut_connection_lapse() {
    init_sdk_log();
    let server = Sextant::start();
    let cache = tempfile::tempdir().unwrap();
    let stayer = server.client("", cache.path()).await;
    let watcher = server.client("", cache.path()).await;
    let svc = "lapse";

    server
        .sdk(
            "register the staying instance",
            stayer.register_instance(s(svc), None, instance(9501, "DEFAULT", 1.0, &[])),
        )
        .await;
    let (_listener, mut events, _) = server
        .subscribe_settled("subscribe", &watcher, svc, None, &[9501])
        .await;

    // A client in another process registers, then is killed: its connection is cut without a
    // deregistration.
    let child_log = cache.path().join("child.log");
    let out = std::fs::File::create(&child_log).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sdk_child_process", "--ignored", "--nocapture"])
        .env(
            CHILD_ENV,
            format!(
                "{} {svc} 9502 {}",
                server.nacos_http,
                cache.path().join("child-cache").display()
            ),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start the child client");
    let mut child = ChildGuard(child);
    let child_out = || std::fs::read_to_string(&child_log).unwrap_or_default();

    let deadline = Instant::now() + CALL;
    while native_ids(&server.native("public", svc).await) != ["127.0.0.1:9501", "127.0.0.1:9502"] {
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!(
                "the child client exited ({st}):\n{}{}",
                child_out(),
                server.diag()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the child's instance did not appear within {CALL:?}; child:\n{}{}",
            child_out(),
            server.diag()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server
        .event_where(&mut events, "the child's instance is added", |h| {
            ports(h) == [9501, 9502]
        })
        .await;

    let mark = sdk_log_mark();
    child.0.kill().expect("SIGKILL the child client");
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "the child ended by itself: {status}");
    let cut = Instant::now();
    server
        .native_where(
            "public",
            svc,
            LAPSE,
            "the cut connection's instance lapses",
            |i| native_ids(i) == ["127.0.0.1:9501"],
        )
        .await;
    let took = cut.elapsed();
    eprintln!("the killed client's instance was gone {took:?} after the kill");
    server
        .event_where(&mut events, "the lapse is pushed", |h| ports(h) == [9501])
        .await;
    server
        .push_where(mark, svc, "DEFAULT_GROUP", "push of the lapse", |l| {
            !l.contains("port: 9502,") && l.contains("port: 9501,")
        })
        .await;

    // The live connection's instance stays (checked a few seconds past the lapse).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = server
        .sdk(
            "get_all_instances after the lapse",
            watcher.get_all_instances(s(svc), None, vec![], false),
        )
        .await;
    assert_eq!(ports(&got), [9501]);
}

/// Not a test of its own: the client process that `instances_of_a_cut_connection_lapse`
/// starts (and kills). Registers one instance and then waits, at most a minute.
#[test]
#[ignore = "run by instances_of_a_cut_connection_lapse as a child process"]
fn sdk_child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let [addr, svc, port, cache] = parts[..] else {
        panic!("{CHILD_ENV}={spec:?}: want `addr service port cache-dir`");
    };
    let port: i32 = port.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let props = ClientProps::new()
            .server_addr(addr)
            .namespace("")
            .cache_dir(cache)
            .env_first(false);
        let naming = tokio::time::timeout(CALL, NamingServiceBuilder::new(props).build())
            .await
            .expect("build within the bound")
            .expect("build the NamingService");
        tokio::time::timeout(
            CALL,
            naming.register_instance(s(svc), None, instance(port, "DEFAULT", 1.0, &[])),
        )
        .await
        .expect("register within the bound")
        .expect("register");
        println!("registered {svc} {port}");
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

/// kill -9 of the server and a restart on the same address with an empty registry: the SDK
/// reconnects by itself and registers its instance and its subscription again (Nacos' redo),
/// and the subscriber is pushed the instance again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_registers_again_after_a_server_restart() {
    init_sdk_log();
    let mut server = Sextant::start();
    let port = server.nacos_http.port();
    let cache = tempfile::tempdir().unwrap();
    let svc = "sdk-restart";
    let client = server.client("", cache.path()).await;
    server
        .sdk(
            "register",
            client.register_instance(s(svc), None, instance(9301, "", 1.0, &[])),
        )
        .await;
    let (listener, mut events) = recorder();
    server
        .sdk(
            "subscribe",
            client.subscribe(s(svc), None, vec![], listener),
        )
        .await;
    server
        .native_where("public", svc, Duration::from_secs(10), "registered", |i| {
            i.len() == 1
        })
        .await;

    let _ = server.child.kill();
    let _ = server.child.wait();
    drop(server);
    let server = Sextant::start_on(port);
    assert!(
        server.native("public", svc).await.is_empty(),
        "memory store starts empty"
    );
    server
        .native_where(
            "public",
            svc,
            Duration::from_secs(40),
            "the SDK registered again after the restart",
            |i| native_ids(i) == ["127.0.0.1:9301"],
        )
        .await;
    server
        .event_where(&mut events, "the instance is pushed again", |h| {
            ports(h) == [9301]
        })
        .await;
}
