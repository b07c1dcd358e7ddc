//! Registers this process as an ephemeral instance of a service and keeps it alive until
//! Ctrl-C, then deregisters it.
//!
//! ```sh
//! cargo run -p sextant -- serve &
//! cargo run -p sextant-client --example register_keepalive -- http://127.0.0.1:8471 prod/orders 10.0.0.7 8080
//! ```

use std::time::Duration;

use sextant_client::{Client, Registration, ServiceName};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let mut args = std::env::args().skip(1);
    let servers = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8471".into());
    let service: ServiceName = args
        .next()
        .unwrap_or_else(|| "prod/orders".into())
        .parse()?;
    let host = args.next().unwrap_or_else(|| "127.0.0.1".into());
    let port: u16 = args.next().unwrap_or_else(|| "8080".into()).parse()?;

    let client = Client::builder()
        // Several addresses, comma-separated: the client fails over between them.
        .servers(servers.split(',').map(str::to_string))
        .build()?;
    let key = client
        .register(
            Registration::new(service, host, port)
                .ttl(Duration::from_secs(10))
                .version(env!("CARGO_PKG_VERSION"))
                .metadata("example", "register_keepalive"),
        )
        .await?;
    println!("registered {key}; renewing its lease until Ctrl-C");

    let mut report = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = report.tick() => {
                let s = client.stats();
                println!("heartbeats sent {}, failed {}, re-registered {}", s.heartbeats_sent, s.heartbeats_failed, s.reregistrations);
            }
        }
    }
    client.shutdown().await?;
    println!("deregistered {key}");
    Ok(())
}
