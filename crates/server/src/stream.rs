//! Moves deliveries from a core [`Subscription`] onto one client's stream through a small
//! bounded channel, with keepalives; used by the SSE watch (`http/mod.rs`). A client that stops
//! reading blocks only its own pump, the core keeps nothing for it but a cursor, and after the
//! configured timeout it is disconnected. (The other streaming adapter polls its subscription
//! itself, held back by HTTP/2 flow control; see ARCHITECTURE.md, "A push".)

use std::time::Duration;

use sextant_core::{CoreMetrics, Delivery, Subscription};
use tokio::sync::mpsc;

use crate::metrics::ApiMetrics;

pub(crate) struct Pump<T> {
    pub tx: mpsc::Sender<T>,
    pub slow_timeout: Duration,
    pub keepalive: Option<(Duration, T)>,
    pub core: CoreMetrics,
    pub api: ApiMetrics,
    pub peer: String,
    /// Resolves, with the reason, when the watcher's token is revoked: the stream ends then.
    pub revoked: Revoked,
}

pub(crate) type Revoked = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;

/// Resolves once `principal`'s token no longer exists (never for a caller without a token).
pub(crate) fn revoked(
    registry: sextant_core::Registry,
    principal: sextant_core::Principal,
) -> Revoked {
    Box::pin(registry.acl().revoked(principal))
}

impl<T: Clone + Send + 'static> Pump<T> {
    pub async fn run(
        mut self,
        mut sub: Subscription,
        render: impl Fn(&Delivery) -> Vec<T> + Send,
        on_close: impl Fn(&str) -> T + Send,
    ) {
        let keep_every = self
            .keepalive
            .as_ref()
            .map(|k| k.0)
            .unwrap_or(Duration::from_secs(3600));
        let mut keepalive = tokio::time::interval(keep_every);
        keepalive.reset();
        loop {
            // `Subscription::next` always re-reads before waiting, so abandoning it for a
            // keepalive loses nothing.
            let next = tokio::select! {
                d = sub.next() => d,
                _ = keepalive.tick(), if self.keepalive.is_some() => {
                    if let Some((_, k)) = &self.keepalive {
                        if self.tx.send_timeout(k.clone(), self.slow_timeout).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                _ = self.tx.closed() => return,
                reason = &mut self.revoked => {
                    let close = self.tx.send(on_close(&reason));
                    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                    return;
                }
            };
            let d = match next {
                Ok(d) => d,
                Err(closed) => {
                    // Bounded: a client that does not read does not hold up shutdown.
                    let close = self.tx.send(on_close(&closed.reason));
                    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                    return;
                }
            };
            let events: Vec<_> = d.events.iter().map(|e| e.published_at).collect();
            for item in render(&d) {
                match self.tx.send_timeout(item, self.slow_timeout).await {
                    Ok(()) => {}
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                        tracing::warn!(peer = %self.peer, timeout = ?self.slow_timeout, "subscriber did not read; disconnected");
                        self.api.slow_disconnects.inc();
                        return;
                    }
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
                }
            }
            for at in events {
                self.core.push_seconds.observe(at.elapsed().as_secs_f64());
            }
        }
    }
}
