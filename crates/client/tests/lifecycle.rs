//! Registration lifecycle against a real `sextant serve`: ephemeral instances outlive their TTL
//! because one batched heartbeat per interval renews all of them, `deregister` removes one for
//! good (the keepalive does not bring it back), `shutdown` deregisters the rest, and
//! subscribers see every change with the service's state after it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sextant_client::{Change, Client, DeleteReason, Error, Registration, ServiceName};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_deregister_and_shutdown() {
    init_logs();
    let server = Server::start();
    let client = Client::builder().servers([server.url()]).build().unwrap();
    let svc = ServiceName::new("prod", "pay").unwrap();
    let ttl = Duration::from_secs(2);
    let started = Instant::now();
    let keys = client
        .register_many((1..=3).map(|n| {
            Registration::new(svc.clone(), format!("10.0.0.{n}"), 80)
                .ttl(ttl)
                .version("1.0")
        }))
        .await
        .unwrap();
    let persistent = client
        .register(Registration::new(svc.clone(), "10.0.1.1", 80).weight(5))
        .await
        .unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(client.registered().len(), 4);

    // Two TTLs later every ephemeral instance is still there.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(server_ids(server.grpc, "prod", "pay").await.len(), 4);
    let st = client.stats();
    let elapsed = started.elapsed();
    // One call per interval (ttl/3) for all three instances, not one per instance.
    let per_interval = (elapsed.as_secs_f64() / (ttl.as_secs_f64() / 3.0) * 1.2).ceil() as u64 + 1;
    assert!(st.heartbeats_sent >= 3, "{st:?}");
    assert!(
        st.heartbeats_sent <= per_interval,
        "{} heartbeats in {elapsed:?}: more than one per interval",
        st.heartbeats_sent
    );
    assert_eq!(st.reregistrations, 0, "{st:?}");

    let s = client.get(&svc).await.unwrap();
    assert_eq!(s.instances.len(), 4);
    assert_eq!(s.instance("10.0.1.1:80").unwrap().status.weight, 5);
    assert_eq!(s.serving().len(), 4);
    let mut updates = client.subscribe();

    client.deregister(&keys[0]).await.unwrap();
    // Deregistering again (already gone) is fine.
    client.deregister(&keys[0]).await.unwrap();
    // (A snapshot from the stream that started with the first `get` may come first.)
    let u = bounded("the delete update", Duration::from_secs(10), async {
        loop {
            let u = updates.recv().await.expect("an update");
            if matches!(u.change, Change::Delete { .. }) {
                return u;
            }
        }
    })
    .await;
    assert_eq!(
        u.change,
        Change::Delete {
            id: keys[0].id.clone(),
            reason: DeleteReason::Deregistered
        }
    );
    assert_eq!(u.service.instances.len(), 3);
    // It stays gone: the keepalive (every ttl/3) no longer renews or re-registers it.
    tokio::time::sleep(ttl).await;
    assert_eq!(server_ids(server.grpc, "prod", "pay").await.len(), 3);
    assert_eq!(client.get(&svc).await.unwrap().instances.len(), 3);

    bounded("shutdown", Duration::from_secs(20), client.shutdown())
        .await
        .unwrap();
    assert!(server_ids(server.grpc, "prod", "pay").await.is_empty());
    assert!(client.registered().is_empty());
    let err = client
        .register(Registration::new(svc.clone(), "10.0.0.9", 80))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed), "{err}");
    let _ = persistent;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_typed_errors() {
    init_logs();
    let server = Server::start();
    let client = Client::builder().servers([server.url()]).build().unwrap();
    let svc = ServiceName::new("prod", "pay").unwrap();
    let err = client
        .register(Registration::new(svc.clone(), "", 80))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { field: "host", .. }),
        "{err}"
    );
    // The server's own validation comes back as Rejected with its message.
    let err = client
        .register(Registration::new(svc.clone(), "not a host!", 80).id("bad-host"))
        .await
        .unwrap_err();
    match err {
        Error::Rejected { code, message, .. } => {
            assert_eq!(code, sextant_client::Code::InvalidArgument);
            assert!(message.contains("host"), "{message}");
        }
        other => panic!("expected Rejected, got {other}"),
    }
    assert!(Client::builder().build().is_err());
}
