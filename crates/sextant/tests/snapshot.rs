//! `sextant snapshot save` / `restore` with the real binary: a snapshot of a running embedded
//! node restores into a fresh embedded store and into etcd (a throwaway member from
//! `sextant_testkit::Etcd`), and nodes started on either serve the same instances, statuses,
//! settings and revisions; a non-empty store and a damaged file are refused with a message.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::{json, Value};
use sextant_testkit::Etcd;

fn sextant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sextant"))
        .args(args)
        .env_remove("SEXTANT_SERVER")
        .env_remove("SEXTANT_STORE")
        .env_remove("SEXTANT_DATA_DIR")
        .env_remove("SEXTANT_CONFIG")
        .output()
        .expect("run the sextant CLI")
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the command failed: {text}");
    text
}

/// What a node serves of the test's services, for comparison.
async fn contents(server: &Server) -> Vec<Value> {
    let api = server.api();
    let mut out = Vec::new();
    for (ns, svc) in [("a", "web"), ("a", "api"), ("b", "web")] {
        let mut v = api.service(ns, svc).await;
        // Lease timers restart on a new node; everything else must be equal.
        for i in v["instances"].as_array_mut().into_iter().flatten() {
            if let Some(o) = i.as_object_mut() {
                o.remove("lease_expires_in_ms");
            }
        }
        out.push(v);
    }
    out
}

fn restore(file: &Path, target: &[&str]) -> Output {
    let mut args = vec!["snapshot", "restore", file.to_str().unwrap()];
    args.extend_from_slice(target);
    sextant(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_into_embedded_and_etcd_stores() {
    let source = Server::start();
    let api = source.api();
    for (ns, svc, id, port) in [
        ("a", "web", "w1", 8080),
        ("a", "web", "w2", 8081),
        ("a", "api", "x1", 9000),
        ("b", "web", "w1", 7000),
    ] {
        api.register(
            ns,
            svc,
            id,
            &json!({"host": "10.0.0.1", "port": port, "metadata": {"k": id}}),
        )
        .await;
    }
    api.register(
        "a",
        "web",
        "lease-1",
        &json!({"host": "10.0.0.2", "port": 1, "ttl_seconds": 300}),
    )
    .await;
    api.set_status("a", "web", "w2", &json!({"enabled": false, "weight": 7}))
        .await;
    api.put(
        "/v1/namespaces/a/services/api",
        &json!({"protect_threshold": 0.5, "check": {"kind": "tcp"}}),
    )
    .await
    .ok();
    let want = contents(&source).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.snap");
    let out = ok(&sextant(&[
        "--server",
        &source.base(),
        "snapshot",
        "save",
        file.to_str().unwrap(),
    ]));
    assert!(out.contains("3 services, 5 instances"), "{out}");

    // Into a fresh embedded store.
    let data = dir.path().join("restored");
    let out = ok(&restore(&file, &["--data-dir", data.to_str().unwrap()]));
    assert!(out.contains("restored revision"), "{out}");
    {
        let node = Server::start_in(&data);
        assert_eq!(contents(&node).await, want);
        // Writes go on above the restored revision.
        let before = want[0]["revision"].as_u64().unwrap();
        let rev = node
            .api()
            .register("a", "web", "w9", &json!({"host": "10.0.0.1", "port": 1}))
            .await;
        assert!(rev > before, "{rev} > {before}");
    }

    // Into etcd: the way from one node to a cluster's store.
    let etcd = Etcd::start();
    let etcd_args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        etcd.endpoint.as_str(),
        "--etcd-prefix",
        "/restored/",
    ];
    ok(&restore(&file, &etcd_args));
    let empty = tempfile::tempdir().unwrap();
    let node = Server::start_with(empty.path(), &etcd_args);
    assert_eq!(contents(&node).await, want);
    drop(node);

    // A store that is not empty is refused, and so is a damaged file.
    let out = restore(&file, &etcd_args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, bytes).unwrap();
    let other = dir.path().join("other");
    let out = restore(&bad, &["--data-dir", other.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
