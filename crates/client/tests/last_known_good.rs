//! The last-known-good cache file, against a real `sextant serve`: a client with a cache file
//! discovers a service and goes away; a new client with the same file and only a dead server
//! address starts anyway and answers `get` for that service from the file.

mod common;

use std::time::Duration;

use common::*;
use sextant_client::{Client, Error, ServiceName, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_answers_from_the_cache_file_when_no_server_is_reachable() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sextant-cache.json");
    let svc = ServiceName::new("prod", "orders").unwrap();
    {
        let server = Server::start();
        put(server.grpc, "prod", "orders", "o1", 8080).await;
        put(server.grpc, "prod", "orders", "o2", 8081).await;
        let client = Client::builder()
            .servers([server.url()])
            .cache_file(&file)
            .cache_write_interval(Duration::from_millis(100))
            .build()
            .unwrap();
        let s = client.get(&svc).await.unwrap();
        assert_eq!(s.instances.len(), 2);
        // A change pushed by the watch reaches the file too.
        remove(server.grpc, "prod", "orders", "o2").await;
        eventually("the removal is cached", Duration::from_secs(10), || async {
            (client.cached(&svc)?.instances.len() == 1).then_some(())
        })
        .await;
        drop(client);
        // Dropped without shutdown: the background writer still writes the last state.
        eventually(
            "the cache file is written",
            Duration::from_secs(10),
            || async {
                let text = std::fs::read_to_string(&file).ok()?;
                (text.contains("\"o1\"") && !text.contains("\"o2\"")).then_some(())
            },
        )
        .await;
    }

    let dead = format!("http://127.0.0.1:{}", free_port());
    let client = Client::builder()
        .servers([dead])
        .cache_file(&file)
        .connect_timeout(Duration::from_millis(500))
        .call_timeout(Duration::from_secs(1))
        .build()
        .expect("a client starts although no server is reachable");
    let s = bounded(
        "get from the file",
        Duration::from_secs(10),
        client.get(&svc),
    )
    .await
    .expect("answered from the cache file");
    assert_eq!(s.source, Source::CacheFile);
    let ids: Vec<_> = s.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["o1"]);
    assert_eq!(s.instances[0].port, 8080);
    // Again, now without waiting for the network.
    let s = bounded("second get", Duration::from_millis(500), client.get(&svc))
        .await
        .unwrap();
    assert_eq!(s.source, Source::CacheFile);
    // A service the file does not have is an error, not a hang.
    let other = ServiceName::new("prod", "unknown").unwrap();
    let err = bounded(
        "get of an unknown service",
        Duration::from_secs(10),
        client.get(&other),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    bounded("shutdown", Duration::from_secs(10), client.shutdown())
        .await
        .unwrap();
    // The file still holds the last-known-good state.
    assert!(std::fs::read_to_string(&file).unwrap().contains("\"o1\""));
}
