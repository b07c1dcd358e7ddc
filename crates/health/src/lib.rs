//! Sextant's central health scanner.
//!
//! Owns the probing of instances of services that define a health check: one probe per instance
//! per interval (O(N), not the O(N²) of peer-to-peer checking), with bounded concurrency, jitter,
//! rise/fall thresholds, separate scheduling of healthy and unhealthy instances (an unhealthy one
//! is re-probed on a backoff, from its own share of the concurrency, so a mass outage cannot
//! starve the healthy), immediate re-probes on suspect reports, and a protection that refuses to
//! flip most of a service to unhealthy at once (more likely the scanner's own network than the
//! service). It holds no registry state of its own beyond probe counters: it reads services from
//! the [`Registry`] and writes only the `health` status, through the same write path as any
//! other change.
//!
//! In a cluster every node runs a scanner, and each probes only the services it owns
//! (`shard`: rendezvous hashing over the live members); a follower's flips reach the leader
//! through the registry's forwarding.
#![forbid(unsafe_code)]

mod metrics;
mod probe;
mod scanner;
mod shard;

pub use metrics::{HealthMetrics, OutcomeLabels, ProbeLabels};
pub use probe::{probe, Failure, Verdict};
pub use scanner::{Scanner, ScannerConfig, SuspectOutcome};
pub use shard::Shard;
