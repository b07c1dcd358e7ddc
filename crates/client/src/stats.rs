//! Counters of what the client did (streams opened, snapshots and events received, heartbeats,
//! re-registrations, failovers, cache writes), for observability and for tests that must tell
//! a resumed stream from a full resync.

use std::sync::atomic::{AtomicU64, Ordering};

/// A point-in-time copy of the client's counters (see [`Client::stats`](crate::Client::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Watch streams opened (the first one, each reconnect, each re-open for a new service).
    pub watch_streams_opened: u64,
    /// Watch streams opened with `since` (resuming rather than starting over).
    pub watch_streams_resumed: u64,
    /// Snapshot frames received on the watch stream (start or resync).
    pub snapshots_received: u64,
    /// Of those, snapshots the server marked as replacing missed history.
    pub resync_snapshots_received: u64,
    /// Upsert, status and delete frames received.
    pub events_received: u64,
    /// Events skipped because the cache already reflected them.
    pub events_skipped: u64,
    /// Services read directly (first `get`, or after reconnecting when the stream could not
    /// cover them).
    pub services_fetched: u64,
    /// Batched heartbeat calls that succeeded.
    pub heartbeats_sent: u64,
    /// Heartbeat calls that failed (no server reachable).
    pub heartbeats_failed: u64,
    /// Instances re-registered because a server reported them unknown.
    pub reregistrations: u64,
    /// Times the client moved to another server address.
    pub failovers: u64,
    /// Successful writes of the cache file.
    pub cache_file_writes: u64,
    /// The watch stream's resume point: the revision of the last frame received.
    pub last_revision: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub watch_streams_opened: AtomicU64,
    pub watch_streams_resumed: AtomicU64,
    pub snapshots_received: AtomicU64,
    pub resync_snapshots_received: AtomicU64,
    pub events_received: AtomicU64,
    pub events_skipped: AtomicU64,
    pub services_fetched: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    pub reregistrations: AtomicU64,
    pub failovers: AtomicU64,
    pub cache_file_writes: AtomicU64,
    pub last_revision: AtomicU64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            watch_streams_opened: g(&self.watch_streams_opened),
            watch_streams_resumed: g(&self.watch_streams_resumed),
            snapshots_received: g(&self.snapshots_received),
            resync_snapshots_received: g(&self.resync_snapshots_received),
            events_received: g(&self.events_received),
            events_skipped: g(&self.events_skipped),
            services_fetched: g(&self.services_fetched),
            heartbeats_sent: g(&self.heartbeats_sent),
            heartbeats_failed: g(&self.heartbeats_failed),
            reregistrations: g(&self.reregistrations),
            failovers: g(&self.failovers),
            cache_file_writes: g(&self.cache_file_writes),
            last_revision: g(&self.last_revision),
        }
    }
}
