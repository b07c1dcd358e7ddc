//! The watch stream resumes instead of starting over, against a real `sextant serve`: one
//! stream covers every service the client asked about, growing it re-opens with `since`, and
//! after a dropped connection (a proxy cut while the server stays up) or a `kill -9` and restart
//! on the same data the client receives exactly what changed meanwhile, with no snapshot of the
//! services it already had. The cache keeps answering throughout.

mod common;

use std::time::Duration;

use common::*;
use sextant_client::{Change, Client, ServiceName, Source};

/// Gets `prod/a` and `prod/b`, waits until the client's one stream covers both, and returns
/// the client's counters at that point.
async fn watch_a_and_b(client: &Client) -> sextant_client::Stats {
    client.get(&name("a")).await.unwrap();
    client.get(&name("b")).await.unwrap();
    eventually("both services live", Duration::from_secs(10), || async {
        let st = client.stats();
        (st.watch_streams_resumed >= 1 || st.snapshots_received >= 2).then_some(())
    })
    .await;
    // And settled: a stream that grew to cover `b` may still read it once (its direct read
    // was older than the resumed stream's start); counting from before that read made the
    // tests that compare with these stats flaky under load.
    eventually("the client settles", Duration::from_secs(10), || async {
        let seen = |s: sextant_client::Stats| {
            (
                s.services_fetched,
                s.snapshots_received,
                s.watch_streams_resumed,
            )
        };
        let a = seen(client.stats());
        tokio::time::sleep(Duration::from_millis(300)).await;
        (a == seen(client.stats())).then_some(())
    })
    .await;
    client.stats()
}

fn name(s: &str) -> ServiceName {
    ServiceName::new("prod", s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_covers_every_service_and_growing_it_resumes() {
    init_logs();
    let server = Server::start();
    for s in ["a", "b", "c"] {
        put(server.grpc, "prod", s, "i1", 80).await;
    }
    // A short call timeout: it bounds opening the stream, not the stream's life.
    let client = Client::builder()
        .servers([server.url()])
        .call_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    client.get(&name("a")).await.unwrap();
    eventually(
        "the first stream's snapshot",
        Duration::from_secs(10),
        || async { (client.stats().snapshots_received == 1).then_some(()) },
    )
    .await;
    for s in ["b", "c"] {
        let svc = client.get(&name(s)).await.unwrap();
        assert_eq!(svc.instances.len(), 1);
        // Wait for the re-opened stream, so each addition is its own re-open.
        eventually("the re-opened stream", Duration::from_secs(10), || async {
            (client.stats().watch_streams_resumed >= if s == "b" { 1 } else { 2 }).then_some(())
        })
        .await;
    }
    eventually(
        "one subscription on the server",
        Duration::from_secs(10),
        || async { (server.metric("sextant_subscribers") == Some(1.0)).then_some(()) },
    )
    .await;
    let opened = client.stats().watch_streams_opened;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Every service is live on that one stream, which outlived the call timeout.
    let mut updates = client.subscribe();
    for s in ["a", "b", "c"] {
        put(server.grpc, "prod", s, "i2", 81).await;
    }
    for s in ["a", "b", "c"] {
        eventually("the change arrives", Duration::from_secs(10), || async {
            client
                .cached(&name(s))
                .filter(|svc| svc.instance("i2").is_some())
                .map(|_| ())
        })
        .await;
    }
    let u = bounded("an update", Duration::from_secs(5), updates.recv())
        .await
        .expect("an update");
    assert_eq!(u.change, Change::Upsert { id: "i2".into() });
    let st = client.stats();
    assert_eq!(st.watch_streams_opened, opened, "the stream broke: {st:?}");
    // Adding b and c re-opened the stream with `since`: no snapshot beyond a's first one.
    assert_eq!(st.snapshots_received, 1, "{st:?}");
    assert!(st.events_received >= 3, "{st:?}");
    assert_eq!(server.metric("sextant_subscriber_resyncs_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_without_a_resync() {
    init_logs();
    let server = Server::start();
    put(server.grpc, "prod", "a", "a1", 80).await;
    put(server.grpc, "prod", "b", "b1", 80).await;
    put(server.grpc, "prod", "b", "b2", 81).await;
    let proxy = Proxy::start(server.grpc).await;
    let client = quick_client(proxy.url());
    let before = watch_a_and_b(&client).await;

    proxy.cut();
    // While the connection is down, changes happen on the server...
    put(server.grpc, "prod", "a", "a2", 81).await;
    remove(server.grpc, "prod", "b", "b1").await;
    put(server.grpc, "prod", "b", "b3", 82).await;
    // ...and the cache keeps answering, at once, with what it had.
    for _ in 0..5 {
        let a = bounded(
            "get during the outage",
            Duration::from_millis(500),
            client.get(&name("a")),
        )
        .await
        .unwrap();
        assert_eq!(a.instances.len(), 1);
        assert_eq!(a.source, Source::Server);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.resume();

    eventually(
        "the changes made meanwhile arrive",
        Duration::from_secs(15),
        || async {
            let a = client.cached(&name("a"))?;
            let b = client.cached(&name("b"))?;
            let a_ids: Vec<_> = a.instances.iter().map(|i| i.id.as_str()).collect();
            let b_ids: Vec<_> = b.instances.iter().map(|i| i.id.as_str()).collect();
            (a_ids == ["a1", "a2"] && b_ids == ["b2", "b3"]).then_some(())
        },
    )
    .await;
    let after = client.stats();
    assert_eq!(
        after.snapshots_received, before.snapshots_received,
        "a reconnect must not re-send snapshots: {before:?} -> {after:?}"
    );
    assert!(
        after.watch_streams_resumed > before.watch_streams_resumed,
        "the stream was re-opened with since: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.services_fetched, before.services_fetched,
        "nor re-read services directly: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.events_received - before.events_received,
        3,
        "{after:?}"
    );
    assert_eq!(server.metric("sextant_subscriber_resyncs_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resumes_the_stream_from_its_history() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Server::start_in(dir.path(), Some(port));
    put(server.grpc, "prod", "a", "a1", 80).await;
    put(server.grpc, "prod", "b", "b1", 80).await;
    let client = quick_client(server.url());
    let before = watch_a_and_b(&client).await;

    server.kill9();
    for _ in 0..5 {
        let b = bounded(
            "get during the outage",
            Duration::from_millis(500),
            client.get(&name("b")),
        )
        .await
        .unwrap();
        assert_eq!(b.instances.len(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = Server::start_in(dir.path(), Some(port));
    put(server.grpc, "prod", "a", "a2", 81).await;

    eventually(
        "the change after the restart arrives",
        Duration::from_secs(15),
        || async {
            client
                .cached(&name("a"))
                .filter(|a| a.instance("a2").is_some())
                .map(|_| ())
        },
    )
    .await;
    let after = client.stats();
    // The client had everything up to the kill, so the restarted server (whose service records
    // carry their revisions) can resume it: no snapshot, no direct re-read.
    assert_eq!(
        after.snapshots_received, before.snapshots_received,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        after.services_fetched, before.services_fetched,
        "{before:?} -> {after:?}"
    );
    assert!(
        after.watch_streams_resumed > before.watch_streams_resumed,
        "{after:?}"
    );
    assert_eq!(client.cached(&name("b")).unwrap().instances.len(), 1);
}
