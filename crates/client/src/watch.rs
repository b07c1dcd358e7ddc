//! The client's one watch stream: covers every service the client has asked about, re-opens
//! with the full set when a service is added and after any failure, always resuming from the
//! last revision received (`since`) on the same server so that nothing is lost and nothing
//! already known is re-sent. Services the resumed stream cannot bring up to date (new ones,
//! ones read from the cache file) are read once, directly, right after it opens.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sextant_proto::v1 as pb;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::{Cache, StreamCtx};
use crate::convert::{service_from, service_ref};
use crate::error::Error;
use crate::stats::Counters;
use crate::transport::{is_failover, Backoff, Conn, Transport};
use crate::types::ServiceName;

/// How long to wait for more services to be asked for before re-opening the stream, so that a
/// burst of first `get`s costs one re-open.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// A stream that lived this long resets the reconnect backoff.
const HEALTHY_STREAM: Duration = Duration::from_secs(3);

pub(crate) struct Watcher {
    pub cache: Arc<Cache>,
    pub transport: Arc<Transport>,
    pub stats: Arc<Counters>,
    pub backoff: Backoff,
    pub closed: watch::Receiver<bool>,
}

/// Why a stream stopped.
enum End {
    /// More services are wanted: re-open at once.
    Grow,
    /// It failed: back off, then reconnect.
    Failed,
    /// The client is closing.
    Closed,
}

impl Watcher {
    pub async fn run(mut self) {
        loop {
            if *self.closed.borrow() {
                return;
            }
            let set = self.cache.state.lock().wanted.clone();
            if set.is_empty() {
                tokio::select! {
                    _ = self.cache.wanted_changed.notified() => continue,
                    _ = self.closed.changed() => return,
                }
            }
            let started = Instant::now();
            match self.stream(&set).await {
                End::Closed => return,
                End::Grow => {}
                End::Failed => {
                    if started.elapsed() >= HEALTHY_STREAM {
                        self.backoff.reset();
                    }
                    let delay = self.backoff.next_delay();
                    tracing::debug!(?delay, "watch stream down; reconnecting after a pause");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.closed.changed() => return,
                    }
                }
            }
        }
    }

    /// Opens one stream over `set` and applies its frames until it ends.
    async fn stream(&mut self, set: &BTreeSet<ServiceName>) -> End {
        let conn = tokio::select! {
            c = self.transport.connect() => c,
            _ = self.closed.changed() => return End::Closed,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "watch: no server reachable");
                return End::Failed;
            }
        };
        let resume = self.cache.state.lock().resume;
        // A revision is only meaningful to the server whose history it came from. It is
        // always a delivery boundary (the server marks the last frame of each delivery with
        // `resume_revision`), so a stream cut mid-delivery resumes without losing anything.
        let since = resume.filter(|(i, _)| *i == conn.index).map(|(_, r)| r);
        let req = pb::WatchRequest {
            services: set.iter().map(service_ref).collect(),
            since,
        };
        let mut client = conn.client();
        // Only opening is bounded: the stream itself lives as long as the connection (no
        // gRPC deadline on it).
        let opened = tokio::time::timeout(self.transport.call_timeout, client.watch(req));
        let opened = tokio::select! {
            r = opened => r,
            _ = self.closed.changed() => return End::Closed,
        };
        let mut stream = match opened {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => {
                tracing::warn!(server = %self.transport.address(conn.index), %status, "watch refused");
                if is_failover(&status) {
                    self.transport.failed(conn.index);
                }
                return End::Failed;
            }
            Err(_) => {
                tracing::warn!(server = %self.transport.address(conn.index), "watch did not open in time");
                self.transport.failed(conn.index);
                return End::Failed;
            }
        };
        Counters::inc(&self.stats.watch_streams_opened);
        let mut ctx = StreamCtx {
            index: conn.index,
            since,
            foreign: false,
        };
        if let Some(since) = since {
            Counters::inc(&self.stats.watch_streams_resumed);
            // The stream is registered on the server now: a read made from here on, merged by
            // revision with what the stream sends, loses nothing.
            let missing = self.cache.needs_fetch(set, conn.index, since);
            if !missing.is_empty() {
                if let Err(e) = self.fetch(&conn, &ctx, &missing).await {
                    tracing::warn!(error = %e, "watch: could not read services to start from");
                    return End::Failed;
                }
            }
        }
        tracing::debug!(server = %self.transport.address(conn.index), services = set.len(), ?since, "watch stream open");
        loop {
            tokio::select! {
                biased;
                _ = self.closed.changed() => return End::Closed,
                _ = self.cache.wanted_changed.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    if self.cache.state.lock().wanted != *set {
                        return End::Grow;
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(ev)) => match self.cache.apply_frame(&mut ctx, ev) {
                        Ok(false) => {}
                        // Re-open at once: the resumed stream re-reads what went stale.
                        Ok(true) => return End::Grow,
                        Err(e) => {
                            tracing::warn!(error = %e, "watch: bad frame; re-opening");
                            return End::Failed;
                        }
                    },
                    Ok(None) => {
                        tracing::info!(server = %self.transport.address(conn.index), "watch stream ended");
                        return End::Failed;
                    }
                    Err(status) => {
                        tracing::info!(server = %self.transport.address(conn.index), %status, "watch stream broke");
                        if is_failover(&status) {
                            self.transport.failed(conn.index);
                        }
                        return End::Failed;
                    }
                }
            }
        }
    }

    /// Reads `names` in one consistent cut on the stream's own server.
    async fn fetch(
        &self,
        conn: &Conn,
        ctx: &StreamCtx,
        names: &[ServiceName],
    ) -> Result<(), Error> {
        let req = pb::DiscoverRequest {
            services: names.iter().map(service_ref).collect(),
            healthy_only: false,
        };
        let mut client = conn.client();
        let resp = tokio::time::timeout(
            self.transport.call_timeout,
            client.discover(self.transport.request(req)),
        )
        .await
        .map_err(|_| Error::Unavailable {
            operation: "Discover",
            last_error: "timed out".into(),
        })?
        .map_err(|s| Error::Unavailable {
            operation: "Discover",
            last_error: s.to_string(),
        })?
        .into_inner();
        let services = resp
            .services
            .into_iter()
            .map(service_from)
            .collect::<Result<Vec<_>, _>>()?;
        self.cache.apply_fetch(ctx, resp.revision, services);
        Ok(())
    }
}
