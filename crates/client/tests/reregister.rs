//! Re-registration after the server lost an instance, against a real `sextant serve`: the
//! server is killed with SIGKILL and restarted on the same address with an empty data dir; the
//! client's next batched heartbeat learns its ephemeral instances are unknown and registers
//! them again within a few seconds.

mod common;

use std::time::Duration;

use common::*;
use sextant_client::{Registration, ServiceName};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_a_restarted_server_lost_are_registered_again() {
    init_logs();
    let port = free_port();
    let first_dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(first_dir.path(), Some(port));
    let client = quick_client(server.url());
    let svc = ServiceName::new("prod", "orders").unwrap();
    let keys = client
        .register_many([
            Registration::new(svc.clone(), "10.0.0.1", 80)
                .id("e1")
                .ttl(Duration::from_secs(3))
                .metadata("zone", "a"),
            Registration::new(svc.clone(), "10.0.0.2", 80)
                .id("e2")
                .ttl(Duration::from_secs(3)),
        ])
        .await
        .unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(
        server_ids(server.grpc, "prod", "orders").await,
        ["e1", "e2"]
    );

    server.kill9();
    let empty_dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(empty_dir.path(), Some(port));
    assert!(server_ids(server.grpc, "prod", "orders").await.is_empty());

    eventually(
        "re-registered on the restarted server",
        Duration::from_secs(10),
        || async {
            (server_ids(server.grpc, "prod", "orders").await == ["e1", "e2"]).then_some(())
        },
    )
    .await;
    // (Counted once the server's answer is back, a moment after the server shows it.)
    eventually(
        "the re-registrations are counted",
        Duration::from_secs(5),
        || async { (client.stats().reregistrations >= 2).then_some(()) },
    )
    .await;
    // Re-registered exactly as first registered.
    let mut direct = direct(server.grpc).await;
    let s = direct
        .get_service(sextant_proto::v1::GetServiceRequest {
            service: Some(sref("prod", "orders")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e1 = s
        .instances
        .iter()
        .find(|i| i.spec.as_ref().is_some_and(|s| s.id == "e1"))
        .expect("e1");
    assert_eq!(e1.ttl_seconds, 3);
    assert_eq!(
        e1.spec
            .as_ref()
            .and_then(|s| s.metadata.get("zone"))
            .map(String::as_str),
        Some("a")
    );
    bounded("shutdown", Duration::from_secs(20), client.shutdown())
        .await
        .unwrap();
    assert!(server_ids(server.grpc, "prod", "orders").await.is_empty());
}
