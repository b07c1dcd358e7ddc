//! Failover between server addresses, against real `sextant serve` processes: a dead first
//! address is skipped, and when the server in use is killed the client moves to the next one,
//! where registration and discovery keep working and its ephemeral instances are registered
//! again (the other server never had them).

mod common;

use std::time::Duration;

use common::*;
use sextant_client::{Client, Registration, ServiceName};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_address_is_skipped() {
    init_logs();
    let live = Server::start();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let client = Client::builder()
        .servers([dead, live.url()])
        .call_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let svc = ServiceName::new("prod", "orders").unwrap();
    let key = bounded(
        "register",
        Duration::from_secs(20),
        client
            .register(Registration::new(svc.clone(), "10.0.0.7", 8080).ttl(Duration::from_secs(3))),
    )
    .await
    .expect("register through the live server");
    assert_eq!(key.id, "10.0.0.7:8080");
    assert_eq!(
        server_ids(live.grpc, "prod", "orders").await,
        vec!["10.0.0.7:8080"]
    );
    let s = bounded("get", Duration::from_secs(20), client.get(&svc))
        .await
        .expect("get through the live server");
    assert_eq!(s.instances.len(), 1);
    assert!(client.stats().failovers >= 1, "{:?}", client.stats());
    // The watch stream reached the live server too: a change made elsewhere arrives.
    put(live.grpc, "prod", "orders", "other", 9000).await;
    eventually(
        "the watch delivers a change",
        Duration::from_secs(10),
        || async {
            client
                .cached(&svc)
                .filter(|s| s.instance("other").is_some())
                .map(|_| ())
        },
    )
    .await;
    bounded("shutdown", Duration::from_secs(20), client.shutdown())
        .await
        .unwrap();
    assert_eq!(server_ids(live.grpc, "prod", "orders").await, vec!["other"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_server_in_use_dies_the_next_one_takes_over() {
    init_logs();
    let mut a = Server::start();
    let b = Server::start();
    let client = Client::builder()
        .servers([a.url(), b.url()])
        .call_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let svc = ServiceName::new("prod", "orders").unwrap();
    let ttl = Duration::from_secs(2);
    client
        .register(
            Registration::new(svc.clone(), "10.0.0.1", 80)
                .id("x")
                .ttl(ttl),
        )
        .await
        .unwrap();
    assert_eq!(server_ids(a.grpc, "prod", "orders").await, vec!["x"]);
    assert!(server_ids(b.grpc, "prod", "orders").await.is_empty());
    let s = client.get(&svc).await.unwrap();
    assert_eq!(s.instances.len(), 1);

    a.kill9();
    // The cache keeps answering while the client finds the other server.
    let s = bounded(
        "get from the cache",
        Duration::from_secs(1),
        client.get(&svc),
    )
    .await
    .unwrap();
    assert_eq!(s.instances.len(), 1);

    // A new registration fails over at once.
    bounded(
        "register after the kill",
        Duration::from_secs(20),
        client.register(
            Registration::new(svc.clone(), "10.0.0.2", 80)
                .id("y")
                .ttl(ttl),
        ),
    )
    .await
    .expect("register fails over to the second server");

    // The heartbeat finds `x` unknown on the second server and registers it there.
    eventually("x re-registered on b", Duration::from_secs(15), || async {
        (server_ids(b.grpc, "prod", "orders").await == ["x", "y"]).then_some(())
    })
    .await;
    // And discovery, now watching b, sees both.
    eventually("the cache follows b", Duration::from_secs(15), || async {
        let s = client.get(&svc).await.ok()?;
        (s.instance("x").is_some() && s.instance("y").is_some()).then_some(())
    })
    .await;
    // (Counted once the server's answer is back, a moment after the server shows it.)
    eventually(
        "the re-registration is counted",
        Duration::from_secs(5),
        || async { (client.stats().reregistrations >= 1).then_some(()) },
    )
    .await;
    let st = client.stats();
    assert!(st.failovers >= 1, "{st:?}");

    bounded("shutdown", Duration::from_secs(20), client.shutdown())
        .await
        .unwrap();
    assert!(server_ids(b.grpc, "prod", "orders").await.is_empty());
}
