//! The real binary on the etcd store (`--store etcd`, a throwaway etcd from
//! `sextant_testkit::Etcd`; fails, never skips, without etcd): instances registered over HTTP
//! are all there, with the revisions the server answered, after a `kill -9` and a restart on
//! the same etcd, and revisions go on above them (once the killed node's cluster lease
//! lapsed and the restarted node leads).

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};
use sextant_testkit::Etcd;

fn start(dir: &Path, etcd: &Etcd) -> Server {
    Server::start_with(
        dir,
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint,
            "--etcd-prefix",
            "/it/",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_on_etcd() {
    let etcd = Etcd::start();
    // The data dir stays empty: it proves nothing is kept there.
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &etcd);
    let api = server.api();

    // Concurrent registrations, so group commits hold several; one change of each other kind.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let api = server.api();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..25 {
                let svc = format!("svc-{}", n % 3);
                let id = format!("w{w}-n{n}");
                let body =
                    json!({"host": "10.0.0.1", "port": 1000 + n, "metadata": {"w": w.to_string()}});
                acked.push((
                    svc.clone(),
                    id.clone(),
                    api.register("etcd", &svc, &id, &body).await,
                ));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let (svc, gone, _) = acked.pop().unwrap();
    api.deregister("etcd", &svc, &gone).await;
    let (s2, id2, _) = acked[0].clone();
    let status_rev = api
        .set_status("etcd", &s2, &id2, &json!({"enabled": false}))
        .await;
    let before: Vec<Value> = futures::future::join_all((0..3).map(|i| {
        let api = api.clone();
        async move { api.service("etcd", &format!("svc-{i}")).await }
    }))
    .await;
    let highest = before
        .iter()
        .map(|s| s["revision"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        std::fs::read_dir(dir.path())
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "nothing on disk"
    );

    server.kill9();
    let server = start(dir.path(), &etcd);
    let api = server.api();
    for (i, was) in before.iter().enumerate() {
        let now = api.service("etcd", &format!("svc-{i}")).await;
        assert_eq!(now["revision"], was["revision"], "svc-{i}'s revision");
        assert_eq!(now["instances"], was["instances"], "svc-{i}'s instances");
    }
    for (svc, id, rev) in &acked {
        let s = api.service("etcd", svc).await;
        let inst = find(&s, id).unwrap_or_else(|| panic!("{svc}/{id} acknowledged, gone: {s}"));
        assert_eq!(inst["spec_revision"].as_u64(), Some(*rev), "{svc}/{id}");
    }
    let s = api.service("etcd", &svc).await;
    assert!(find(&s, &gone).is_none(), "deregistered {gone} is back");
    let s = api.service("etcd", &s2).await;
    assert_eq!(
        find(&s, &id2).unwrap()["status_revision"].as_u64(),
        Some(status_rev)
    );
    // The killed node still held the cluster's leadership: the restarted one (a new member)
    // follows until that lease lapses (3 s by default), then leads and takes writes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let next = loop {
        let resp = api
            .put(
                &instance_path("etcd", "svc-0", "after"),
                &json!({"host": "10.0.0.2", "port": 1}),
            )
            .await;
        if resp.status == 200 {
            break resp.body["revision"].as_u64().expect("revision");
        }
        assert_eq!(resp.status, 503, "{}", resp.text);
        assert!(
            std::time::Instant::now() < deadline,
            "writes did not resume: {}",
            resp.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        next > highest,
        "revision {next} after the restart, {highest} before"
    );
}

/// With etcd unreachable the node does not start: it exits non-zero, naming etcd and the
/// endpoints, within a bounded time.
#[test]
fn an_unreachable_etcd_stops_the_start_naming_the_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", sextant_testkit::free_port());
    let mut args = sextant_testkit::loopback_args(dir.path(), 0);
    args.extend(["--store", "etcd", "--etcd-endpoints", &endpoint].map(Into::into));
    let mut child = sextant_testkit::serve_command(env!("CARGO_BIN_EXE_sextant").as_ref(), &args)
        .spawn()
        .expect("spawn sextant");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("sextant kept running without etcd");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("etcd") && err.contains(&endpoint), "{err}");
}
