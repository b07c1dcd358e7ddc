//! The Rust client SDK of Sextant, over its native gRPC API (`sextant.v1.Registry`).
//!
//! It owns everything an application needs from the naming service:
//!
//! - **Connections**: one or more server addresses, used one at a time, with a timeout on every
//!   call, failover to the next address when the current one is unreachable, and jittered
//!   exponential backoff between reconnect attempts.
//! - **Registration**: [`Client::register`] / [`Client::register_many`] (one `BatchRegister`),
//!   [`Client::deregister`], and [`Client::shutdown`], which deregisters everything the client
//!   registered. Ephemeral instances are kept alive by one background task sending *one*
//!   batched `Heartbeat` per interval (a third of the shortest TTL) for all of them; an instance
//!   the server reports unknown is registered again.
//! - **Discovery**: [`Client::get`] answers from a local cache kept current by *one* `Watch`
//!   stream covering every service the client asked about. Adding a service, or reconnecting
//!   after a failure, re-opens that stream resuming from the last revision received, so the
//!   server sends only what changed, not a new snapshot of what the client already has.
//! - **Events**: [`Client::subscribe`] streams every change, each with the service's state after
//!   it, over a bounded channel.
//! - **Last-known-good**: with [`ClientBuilder::cache_file`] the cache is persisted (JSON,
//!   atomic replace, throttled) and, when no server is reachable, `get` answers from it: a
//!   client never fails to start because the registry is down.
//!
//! - **The HTTP watch's framing**: [`sse`] parses `text/event-stream` bodies for Rust readers
//!   of `GET /v1/watch` (the SDK itself watches over gRPC).
//!
//! No queue in the SDK is unbounded, no network or disk input can make it panic, and every
//! error is an [`Error`].
//!
//! ```no_run
//! use std::time::Duration;
//! use sextant_client::{Client, Registration, ServiceName};
//!
//! # async fn run() -> Result<(), sextant_client::Error> {
//! let client = Client::builder()
//!     .servers(["http://127.0.0.1:8471", "http://127.0.0.1:9471"])
//!     .cache_file("/var/cache/myapp/sextant.json")
//!     .build()?;
//! let orders = ServiceName::new("prod", "orders")?;
//! client
//!     .register(Registration::new(orders.clone(), "10.0.0.7", 8080).ttl(Duration::from_secs(10)))
//!     .await?;
//! let service = client.get(&orders).await?;
//! for instance in service.serving() {
//!     println!("{}", instance.address());
//! }
//! client.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cache;
mod client;
mod convert;
mod error;
mod file;
mod keepalive;
pub mod sse;
mod stats;
mod transport;
mod types;
mod watch;

pub use client::{Client, ClientBuilder, Updates};
pub use error::Error;
pub use stats::Stats;
pub use tonic::Code;
pub use types::{
    Change, DeleteReason, Health, Instance, InstanceKey, InstanceStatus, Location, Registration,
    Service, ServiceName, ServiceUpdate, Source,
};
