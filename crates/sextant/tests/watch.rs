//! Watching over the real binary: the SSE stream (`GET /v1/watch`) and the gRPC `Watch` deliver
//! a snapshot, then every change of the watched services in revision order with the revisions
//! the writes returned; they resume exactly after a revision (`since`, `Last-Event-ID`); and a
//! server shutting down closes them with a reason.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sextant_proto::v1 as pb;
use sextant_proto::v1::watch_event::Kind;

const FRAME: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

/// What one change should look like on a stream: kind, service, instance id, revision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: String,
    service: String,
    id: String,
    revision: u64,
}

fn seen(kind: &str, service: &str, id: &str, revision: u64) -> Seen {
    Seen {
        kind: kind.into(),
        service: service.into(),
        id: id.into(),
        revision,
    }
}

/// A change frame of the SSE stream, checked for internal consistency.
fn sse_seen(f: &Frame) -> Seen {
    let id = f.data["revision"]
        .as_u64()
        .expect("change events carry their revision");
    // Only a delivery's last frame carries an SSE id, and it is a delivery boundary.
    if let Some(boundary) = f.id {
        assert!(
            boundary >= id,
            "id {boundary} before the event's revision in {f:?}"
        );
    }
    assert_eq!(f.data["namespace"], "w", "{f:?}");
    let instance = match f.event.as_str() {
        "upsert" => f.data["instance"]["id"].as_str(),
        "status" | "delete" => f.data["id"].as_str(),
        other => panic!("unexpected event {other:?}: {f:?}"),
    };
    seen(
        &f.event,
        f.data["service"].as_str().unwrap(),
        instance.expect("instance id"),
        id,
    )
}

/// Applies the same sequence of changes over HTTP to w/a, w/b (watched) and w/c (not watched),
/// returning what a watcher of w/a and w/b must see, in order.
async fn http_changes(api: &Api) -> Vec<Seen> {
    let mut want = Vec::new();
    let r = api.register("w", "a", "a1", &inst("10.0.0.1", 1)).await;
    want.push(seen("upsert", "a", "a1", r));
    api.register("w", "c", "c1", &inst("10.0.0.9", 1)).await;
    let r = api.register("w", "b", "b1", &inst("10.0.0.2", 1)).await;
    want.push(seen("upsert", "b", "b1", r));
    let r = api
        .set_status("w", "a", "a1", &json!({"health": "unhealthy"}))
        .await;
    want.push(seen("status", "a", "a1", r));
    // Settings move the revision but are not an instance event.
    api.put(&service_path("w", "a"), &json!({"protect_threshold": 0.5}))
        .await
        .ok();
    let r = api.register("w", "a", "pre", &inst("10.0.0.3", 2)).await;
    want.push(seen("upsert", "a", "pre", r));
    let r = api.deregister("w", "b", "b1").await;
    want.push(seen("delete", "b", "b1", r));
    api.deregister("w", "c", "c1").await;
    let r = api
        .set_status("w", "a", "pre", &json!({"enabled": false}))
        .await;
    want.push(seen("status", "a", "pre", r));
    let r = api.register("w", "b", "b2", &inst("10.0.0.4", 1)).await;
    want.push(seen("upsert", "b", "b2", r));
    let r = api.deregister("w", "a", "a1").await;
    want.push(seen("delete", "a", "a1", r));
    want
}

async fn read_sse(sse: &mut Sse, n: usize) -> Vec<Seen> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = sse.expect(FRAME).await;
        if f.event != "sync" {
            got.push(sse_seen(&f));
        }
    }
    got
}

fn assert_strictly_increasing(got: &[Seen]) {
    assert!(
        got.windows(2).all(|w| w[0].revision < w[1].revision),
        "revisions not strictly increasing: {got:#?}"
    );
}

#[tokio::test]
async fn sse_snapshot_then_every_change_in_order_then_resume() {
    let server = Server::start();
    let api = server.api();
    let r0 = api.register("w", "a", "pre", &inst("10.0.0.3", 1)).await;

    let mut sse = Sse::open(&api, "service=w/a&service=w/b", None).await;
    // A snapshot of each service, complete to the current revision.
    let s1 = sse.expect(FRAME).await;
    let s2 = sse.expect(FRAME).await;
    // Only the delivery's last frame carries the SSE id (the resume point).
    assert_eq!(s1.id, None, "{s1:?}");
    assert_eq!(s2.id, Some(r0), "{s2:?}");
    for s in [&s1, &s2] {
        assert_eq!(s.event, "snapshot", "{s:?}");
        assert_eq!(s.data["resume_revision"], r0, "{s:?}");
        assert_eq!(s.data["resync"], false, "{s:?}");
        assert_eq!(s.data["namespace"], "w");
    }
    let mut snaps = [&s1, &s2];
    snaps.sort_by_key(|s| s.data["service"].as_str().unwrap().to_string());
    assert_eq!(snaps[0].data["service"], "a");
    assert_eq!(ids(&snaps[0].data), ["pre"]);
    assert_eq!(snaps[1].data["service"], "b");
    assert_eq!(ids(&snaps[1].data), Vec::<String>::new());

    let want = http_changes(&api).await;
    let got = read_sse(&mut sse, want.len()).await;
    assert_eq!(got, want);
    assert_strictly_increasing(&got);
    sse.expect_quiet(QUIET).await;

    // An upsert carries the whole instance, a status event only the status, a delete why.
    let mut want = want;
    let r = api
        .register(
            "w",
            "b",
            "b3",
            &json!({"host": "10.0.0.5", "port": 5, "version": "v9", "ttl_seconds": 60}),
        )
        .await;
    want.push(seen("upsert", "b", "b3", r));
    let f = sse.expect(FRAME).await;
    assert_eq!(sse_seen(&f), want[want.len() - 1]);
    let i = &f.data["instance"];
    assert_eq!(
        (&i["host"], &i["port"], &i["version"], &i["ttl_seconds"]),
        (&json!("10.0.0.5"), &json!(5), &json!("v9"), &json!(60))
    );
    assert_eq!(i["spec_revision"], r);
    let r = api.set_status("w", "b", "b3", &json!({"weight": 9})).await;
    want.push(seen("status", "b", "b3", r));
    let f = sse.expect(FRAME).await;
    assert_eq!(sse_seen(&f), want[want.len() - 1]);
    let st = &f.data["status"];
    assert_eq!(
        json!({"health": st["health"], "enabled": st["enabled"], "weight": st["weight"]}),
        json!({"health": "unknown", "enabled": true, "weight": 9})
    );
    assert!(f.data.get("instance").is_none(), "{f:?}");
    let r = api.deregister("w", "b", "b3").await;
    want.push(seen("delete", "b", "b3", r));
    let f = sse.expect(FRAME).await;
    assert_eq!(sse_seen(&f), want[want.len() - 1]);
    assert_eq!(f.data["reason"], "deregistered");
    drop(sse);

    // Resuming after any revision gives exactly the events after it, and nothing else.
    for cut in [0, 2, 4, want.len() - 2] {
        let since = want[cut].revision;
        let mut sse = Sse::open(
            &api,
            &format!("service=w/a&service=w/b&since={since}"),
            None,
        )
        .await;
        let got = read_sse(&mut sse, want.len() - 1 - cut).await;
        assert_eq!(got, want[cut + 1..], "since={since}");
        sse.expect_quiet(QUIET).await;
    }
    // The same with Last-Event-ID, as an EventSource sends on reconnect.
    let since = want[3].revision;
    let mut sse = Sse::open(&api, "service=w/a,w/b", Some(since)).await;
    let got = read_sse(&mut sse, want.len() - 4).await;
    assert_eq!(got, want[4..]);
    sse.expect_quiet(QUIET).await;
    // since wins over Last-Event-ID.
    let mut sse = Sse::open(
        &api,
        &format!("service=w/a&service=w/b&since={}", want[5].revision),
        Some(want[1].revision),
    )
    .await;
    let got = read_sse(&mut sse, want.len() - 6).await;
    assert_eq!(got, want[6..]);
    sse.expect_quiet(QUIET).await;

    // Resuming at the head: only a bookmark saying so, then the next change.
    let head = api.service("w", "b").await["revision"].as_u64().unwrap();
    let mut sse = Sse::open(&api, &format!("service=w/a&service=w/b&since={head}"), None).await;
    let f = sse.expect(FRAME).await;
    assert_eq!((f.event.as_str(), f.id), ("sync", Some(head)), "{f:?}");
    sse.expect_quiet(QUIET).await;
    let r = api.register("w", "a", "late", &inst("10.0.0.6", 1)).await;
    assert_eq!(
        read_sse(&mut sse, 1).await,
        [seen("upsert", "a", "late", r)]
    );
}

#[tokio::test]
async fn sse_and_grpc_streams_close_with_a_reason_on_sigterm() {
    let mut server = Server::start();
    let api = server.api();
    api.register("w", "a", "x", &inst("10.0.0.1", 1)).await;
    let mut sse = Sse::open(&api, "service=w/a", None).await;
    assert_eq!(sse.expect(FRAME).await.event, "snapshot");
    let mut c = server.grpc_client().await;
    let mut stream = c
        .watch(pb::WatchRequest {
            services: vec![svc_ref("w", "a")],
            since: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = bounded("the gRPC snapshot", FRAME, stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");

    server.terminate();

    let f = sse.expect(Duration::from_secs(10)).await;
    assert_eq!(f.event, "close", "{f:?}");
    let reason = f.data["reason"].as_str().unwrap_or("");
    assert!(!reason.is_empty(), "close without a reason: {f:?}");
    assert!(reason.contains("shutting down"), "{reason}");
    assert!(
        matches!(sse.next(Duration::from_secs(10)).await, Next::End),
        "the stream should end after close"
    );
    let e = bounded("the gRPC close", Duration::from_secs(10), stream.message())
        .await
        .expect_err("the gRPC watch should end with a status");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");

    let status = server
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("server did not exit after SIGTERM; log:\n{}", server.log()));
    assert!(status.success(), "exit {status}; log:\n{}", server.log());
    let log = server.log();
    assert!(log.contains("SIGTERM received"), "{log}");
}

/// A gRPC watch event as `Seen`; snapshots are refused here.
fn grpc_seen(e: &pb::WatchEvent) -> Seen {
    let svc = e.service.as_ref().expect("service").clone();
    assert_eq!(svc.namespace, "w");
    assert!(!e.resync);
    let (kind, id) = match e.kind.as_ref().expect("kind") {
        Kind::Upsert(i) => ("upsert", i.spec.as_ref().unwrap().id.clone()),
        Kind::Status(s) => ("status", s.id.clone()),
        Kind::Delete(d) => {
            assert_eq!(d.reason, "deregistered");
            ("delete", d.id.clone())
        }
        Kind::Snapshot(_) => panic!("unexpected snapshot {e:?}"),
    };
    seen(kind, &svc.service, &id, e.revision)
}

async fn grpc_read(stream: &mut tonic::Streaming<pb::WatchEvent>, n: usize) -> Vec<Seen> {
    let mut got = Vec::new();
    while got.len() < n {
        let e = bounded("a gRPC watch event", FRAME, stream.message())
            .await
            .expect("watch stream failed")
            .expect("watch stream ended");
        if e.kind.is_some() {
            got.push(grpc_seen(&e));
        }
    }
    got
}

/// Nothing but bookmarks (frames that only say the stream is caught up) within QUIET.
async fn grpc_quiet(stream: &mut tonic::Streaming<pb::WatchEvent>) {
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(m) = tokio::time::timeout_at(deadline, stream.message()).await {
        match m {
            Ok(Some(e)) if e.kind.is_none() && e.resume_revision > 0 => continue,
            m => panic!("expected nothing on the watch, got {m:?}"),
        }
    }
}

#[tokio::test]
async fn grpc_watch_snapshot_then_every_change_then_resume() {
    let server = Server::start();
    let mut c = server.grpc_client().await;
    let r0 = c
        .register(grpc_reg("w", "a", "pre", "10.0.0.3", 1))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let watch = |since| pb::WatchRequest {
        services: vec![svc_ref("w", "b"), svc_ref("w", "a")],
        since,
    };
    let mut stream = c.watch(watch(None)).await.unwrap().into_inner();
    let mut snaps = Vec::new();
    for _ in 0..2 {
        let e = bounded("a snapshot", FRAME, stream.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.revision, r0);
        assert!(!e.resync);
        let Some(Kind::Snapshot(s)) = e.kind else {
            panic!("expected a snapshot first, got {e:?}");
        };
        snaps.push(s);
    }
    snaps.sort_by_key(|s| s.service.as_ref().unwrap().service.clone());
    assert_eq!(snaps[0].service, Some(svc_ref("w", "a")));
    assert_eq!(snaps[0].instances.len(), 1);
    assert_eq!(snaps[1].service, Some(svc_ref("w", "b")));
    assert!(snaps[1].instances.is_empty());

    let mut want = Vec::new();
    let rev = |r: tonic::Response<pb::WriteResponse>| r.into_inner().revision;
    let r = rev(c
        .register(grpc_reg("w", "a", "a1", "10.0.0.1", 1))
        .await
        .unwrap());
    want.push(seen("upsert", "a", "a1", r));
    c.register(grpc_reg("w", "c", "c1", "10.0.0.9", 1))
        .await
        .unwrap();
    let revs = c
        .batch_register(pb::BatchRegisterRequest {
            instances: vec![
                grpc_reg("w", "b", "b1", "10.0.0.2", 1),
                grpc_reg("w", "c", "c2", "10.0.0.9", 2),
                grpc_reg("w", "a", "a2", "10.0.0.2", 2),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .revisions;
    want.push(seen("upsert", "b", "b1", revs[0]));
    want.push(seen("upsert", "a", "a2", revs[2]));
    let status = |id: &str, svc: &str| pb::UpdateStatusRequest {
        service: Some(svc_ref("w", svc)),
        id: id.into(),
        health: Some(pb::Health::Healthy as i32),
        enabled: None,
        weight: Some(42),
        ..Default::default()
    };
    let r = rev(c.update_status(status("a1", "a")).await.unwrap());
    want.push(seen("status", "a", "a1", r));
    let r = rev(c.update_status(status("b1", "b")).await.unwrap());
    want.push(seen("status", "b", "b1", r));
    let dereg = |id: &str, svc: &str| pb::DeregisterRequest {
        service: Some(svc_ref("w", svc)),
        id: id.into(),
    };
    let r = rev(c.deregister(dereg("b1", "b")).await.unwrap());
    want.push(seen("delete", "b", "b1", r));
    c.deregister(dereg("c1", "c")).await.unwrap();
    let r = rev(c.deregister(dereg("pre", "a")).await.unwrap());
    want.push(seen("delete", "a", "pre", r));

    let got = grpc_read(&mut stream, want.len()).await;
    assert_eq!(got, want);
    assert_strictly_increasing(&got);
    grpc_quiet(&mut stream).await;

    // The status event carries the new status.
    let r = rev(c.update_status(status("a2", "a")).await.unwrap());
    let e = bounded("a status event", FRAME, stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.revision, r);
    let Some(Kind::Status(s)) = e.kind else {
        panic!("{e:?}")
    };
    assert_eq!(
        s.status,
        Some(pb::InstanceStatus {
            health: pb::Health::Healthy as i32,
            enabled: true,
            weight: 42,
            ..Default::default()
        })
    );
    want.push(seen("status", "a", "a2", r));
    drop(stream);

    for cut in [0, 3, want.len() - 2, want.len() - 1] {
        let since = want[cut].revision;
        let mut stream = c.watch(watch(Some(since))).await.unwrap().into_inner();
        let got = grpc_read(&mut stream, want.len() - 1 - cut).await;
        assert_eq!(got, want[cut + 1..], "since={since}");
        grpc_quiet(&mut stream).await;
    }
}

/// A watcher that saw revisions up to R and reconnects after a restart must learn about every
/// change after R, including deletions made before the restart.
#[tokio::test]
async fn resume_across_restart_does_not_miss_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (seen_a, seen_b);
    {
        let mut server = Server::start_in(dir.path());
        let api = server.api();
        api.register("w", "a", "x", &inst("10.0.0.1", 1)).await;
        seen_a = api.register("w", "a", "y", &inst("10.0.0.2", 1)).await;
        api.deregister("w", "a", "y").await; // a watcher at seen_a missed this
        seen_b = api.register("w", "b", "z", &inst("10.0.0.3", 1)).await;
        api.deregister("w", "b", "z").await; // and a watcher at seen_b missed this
        server.kill9();
    }
    let server = Server::start_in(dir.path());
    let api = server.api();
    assert_eq!(ids(&api.service("w", "a").await), ["x"]);
    let mut problems = Vec::new();
    for (svc, since, gone) in [("a", seen_a, "y"), ("b", seen_b, "z")] {
        let mut sse = Sse::open(&api, &format!("service=w/{svc}&since={since}"), None).await;
        let f = match sse.next(Duration::from_secs(2)).await {
            Next::Frame(f) => f,
            other => {
                problems.push(format!(
                    "resuming w/{svc} at {since} after a restart delivered nothing ({other:?}): \
                     the deletion of {gone} before the restart is lost to this watcher"
                ));
                continue;
            }
        };
        match f.event.as_str() {
            "delete" => assert_eq!(f.data["id"], gone, "{f:?}"),
            "snapshot" => {
                assert_eq!(f.data["resync"], true, "{f:?}");
                assert!(!ids(&f.data).contains(&gone.to_string()), "{f:?}");
            }
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The data of an SSE snapshot frame is a JSON object with unique keys.
#[tokio::test]
async fn sse_snapshot_data_has_unique_keys() {
    let server = Server::start();
    let api = server.api();
    let r1 = api.register("w", "a", "x", &inst("10.0.0.1", 1)).await;
    api.register("w", "other", "y", &inst("10.0.0.2", 1)).await;
    let mut sse = Sse::open(&api, "service=w/a", None).await;
    let f = sse.expect(FRAME).await;
    assert_eq!(f.event, "snapshot");
    let count = f.raw.matches("\"revision\":").count();
    assert_eq!(count, 1, "duplicate \"revision\" keys in {}", f.raw);
    // Whichever value a parser keeps, the service is at r1 and the delivery is later.
    assert!(f.id.unwrap() > r1);
}

#[tokio::test]
async fn resume_behind_the_event_log_or_ahead_of_the_registry_gets_a_resync_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--event-log-per-service", "3"]);
    let api = server.api();
    let mut revs = Vec::new();
    for n in 0..6 {
        revs.push(
            api.register("w", "a", &format!("i{n}"), &inst("10.0.0.1", 1 + n))
                .await,
        );
    }
    // The log keeps the last 3 events: resuming right before them replays them...
    let mut sse = Sse::open(&api, &format!("service=w/a&since={}", revs[2]), None).await;
    let got = read_sse(&mut sse, 3).await;
    let want: Vec<_> = (3..6)
        .map(|n| seen("upsert", "a", &format!("i{n}"), revs[n]))
        .collect();
    assert_eq!(got, want);
    sse.expect_quiet(QUIET).await;

    // ... anything older gets the whole service, flagged as a resync, then live events.
    for since in [revs[0], revs[1], 0, revs[5] + 1000] {
        let mut sse = Sse::open(&api, &format!("service=w/a&since={since}"), None).await;
        let f = sse.expect(FRAME).await;
        assert_eq!(f.event, "snapshot", "since={since}: {f:?}");
        assert_eq!(f.data["resync"], true, "since={since}: {f:?}");
        assert_eq!(f.id, Some(revs[5]));
        assert_eq!(ids(&f.data), ["i0", "i1", "i2", "i3", "i4", "i5"]);
        sse.expect_quiet(QUIET).await;
        let r = api.deregister("w", "a", "i0").await;
        assert_eq!(read_sse(&mut sse, 1).await, [seen("delete", "a", "i0", r)]);
        api.register("w", "a", "i0", &inst("10.0.0.1", 1)).await;
        revs[5] = api.service("w", "a").await["revision"].as_u64().unwrap();
    }
}
