//! Discovers services and prints every change pushed to them, with a last-known-good cache
//! file so that it still answers when no server is reachable.
//!
//! ```sh
//! cargo run -p sextant-client --example discover_watch -- http://127.0.0.1:8471 prod/orders prod/users
//! ```

use sextant_client::{Change, Client, ServiceName};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let mut args = std::env::args().skip(1);
    let servers = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8471".into());
    let mut services = args
        .map(|a| a.parse::<ServiceName>())
        .collect::<Result<Vec<_>, _>>()?;
    if services.is_empty() {
        services.push("prod/orders".parse()?);
    }

    let client = Client::builder()
        .servers(servers.split(',').map(str::to_string))
        .cache_file(std::env::temp_dir().join("sextant-discover-watch.json"))
        .build()?;
    // Subscribe first so that nothing after the first answers is missed.
    let mut updates = client.subscribe();
    for name in &services {
        match client.get(name).await {
            Ok(s) => {
                println!("{name} (revision {}, from {:?}):", s.revision, s.source);
                for i in s.serving() {
                    println!(
                        "  {} {} weight {}",
                        i.id,
                        i.address(),
                        i.status.effective_weight()
                    );
                }
            }
            Err(e) => eprintln!("{name}: {e}"),
        }
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            u = updates.recv() => {
                let Some(u) = u else { break };
                let what = match &u.change {
                    Change::Snapshot { resync } => format!("snapshot (resync: {resync})"),
                    Change::Fetched => "read".to_string(),
                    Change::Upsert { id } => format!("upsert {id}"),
                    Change::Status { id } => format!("status {id}"),
                    Change::Delete { id, reason } => format!("delete {id} ({reason:?})"),
                    other => format!("{other:?}"),
                };
                println!(
                    "{} @{}: {what}; {} serving of {}",
                    u.service.name,
                    u.revision,
                    u.service.serving().len(),
                    u.service.instances.len()
                );
            }
        }
    }
    client.shutdown().await?;
    Ok(())
}
