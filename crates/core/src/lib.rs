//! Sextant's registry core.
//!
//! Owns the in-memory structured snapshot of the registry (namespace → service → instances),
//! the single writer that assigns revisions and group-commits changes through the [`Store`]
//! port, leases of ephemeral instances, the bounded per-service change log, and the fan-out of
//! changes to subscriptions. It knows no wire protocol and does no I/O of its own beyond the
//! store it is handed: adapters call [`Registry`] and render what it returns.
#![forbid(unsafe_code)]

mod codec;
mod delivery;
mod lease;
pub mod metrics;
mod registry;
pub mod store;

use std::time::Duration;

pub use delivery::{Delivery, ServiceSnapshot, SharedEvent, Subscription, SubscriptionClosed};
pub use metrics::CoreMetrics;
pub use registry::{HeartbeatResult, NamespaceSummary, Op, Registry, ServiceSummary, ServiceView};
pub use sextant_model as model;
pub use store::{Batch, MemStore, Mutation, Store, StoreError};

/// Tunables of the core. Passed in explicitly; no global state.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Events kept per service for subscribers that resume. A subscriber further behind than
    /// this gets a snapshot of that service instead.
    pub event_log_per_service: usize,
    /// Most operations committed in one store batch.
    pub max_batch_ops: usize,
    /// Bound of the queue of writes waiting for the writer; beyond it callers wait.
    pub write_queue: usize,
    /// How often leases are checked for expiry.
    pub lease_check_interval: Duration,
    /// Run the writer on a thread and runtime of its own (the default). `false` runs it as a
    /// task of the caller's runtime, for tests that pause that runtime's clock: time there
    /// only stands still while every task that can make progress is on it.
    pub writer_thread: bool,
    /// How long a service that a write left vacant (no instances, default settings) and that
    /// nobody watches stays in memory, so that a watcher reconnecting meanwhile resumes with
    /// exact events instead of a snapshot. Vacant services nobody ever wrote go at once.
    pub vacant_retention: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            event_log_per_service: 1024,
            max_batch_ops: 4096,
            write_queue: 8192,
            lease_check_interval: Duration::from_millis(250),
            writer_thread: true,
            vacant_retention: Duration::from_secs(60),
        }
    }
}

/// Everything that can go wrong in a registry operation. Adapters map each variant to one
/// HTTP status and one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Invalid(#[from] model::InvalidField),
    #[error("{0} not found")]
    NotFound(String),
    #[error("write not durable: {0}")]
    Store(#[from] StoreError),
    #[error("registry is shutting down")]
    ShuttingDown,
}

#[cfg(test)]
mod tests;
