//! The instances this client registered, and the background task that keeps the ephemeral ones
//! alive: one batched `Heartbeat` per interval (a third of the shortest TTL, jittered) for all of
//! them, re-registering in one `BatchRegister` whatever the server reports unknown (it restarted
//! without them, their lease lapsed, or the client failed over to a server that never had them).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sextant_proto::v1 as pb;
use tokio::sync::{watch, Notify, RwLock};
use tokio::time::Instant;

use crate::convert::service_ref;
use crate::error::Error;
use crate::stats::Counters;
use sextant_model::XorShift;

use crate::transport::{Backoff, Transport};
use crate::types::InstanceKey;

/// Shortest heartbeat interval, whatever the TTLs.
const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Most instances re-registered in one `BatchRegister`.
const REREGISTER_BATCH: usize = 500;

pub(crate) struct Registrations {
    /// What was registered, exactly as sent, to send again when the server lost it.
    pub entries: Mutex<HashMap<InstanceKey, pb::RegisterRequest>>,
    /// Signalled when `entries` changed.
    pub changed: Notify,
    /// Registers and deregisters take it shared; re-registration takes it exclusively, so it
    /// never resurrects an instance being deregistered nor overwrites a newer registration.
    pub order: RwLock<()>,
}

impl Registrations {
    pub fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            order: RwLock::new(()),
        }
    }

    pub fn insert(&self, key: InstanceKey, req: pb::RegisterRequest) {
        self.entries.lock().insert(key, req);
        self.changed.notify_one();
    }

    pub fn remove(&self, key: &InstanceKey) -> bool {
        let removed = self.entries.lock().remove(key).is_some();
        self.changed.notify_one();
        removed
    }

    /// The ephemeral instances and the shortest TTL among them.
    fn ephemeral(&self) -> (Vec<InstanceKey>, Option<u32>) {
        let entries = self.entries.lock();
        let mut keys = Vec::new();
        let mut min_ttl: Option<u32> = None;
        for (k, r) in entries.iter() {
            if r.ttl_seconds > 0 {
                keys.push(k.clone());
                min_ttl = Some(min_ttl.map_or(r.ttl_seconds, |m| m.min(r.ttl_seconds)));
            }
        }
        (keys, min_ttl)
    }
}

pub(crate) struct Keepalive {
    pub regs: Arc<Registrations>,
    pub transport: Arc<Transport>,
    pub stats: Arc<Counters>,
    /// Fixed interval instead of a third of the shortest TTL.
    pub interval: Option<Duration>,
    pub backoff: Backoff,
    pub closed: watch::Receiver<bool>,
}

impl Keepalive {
    fn interval_for(&self, min_ttl: u32) -> Duration {
        self.interval
            .unwrap_or_else(|| Duration::from_secs(u64::from(min_ttl)) / 3)
            .max(MIN_INTERVAL)
    }

    pub async fn run(mut self) {
        let mut rng = XorShift::from_clock();
        let mut due: Option<Instant> = None;
        loop {
            if *self.closed.borrow() {
                return;
            }
            let (_, min_ttl) = self.regs.ephemeral();
            let Some(min_ttl) = min_ttl else {
                due = None;
                tokio::select! {
                    _ = self.regs.changed.notified() => continue,
                    _ = self.closed.changed() => return,
                }
            };
            let interval = self.interval_for(min_ttl);
            // A new, shorter TTL may bring the next beat forward; it never pushes it back, so
            // a client that keeps registering still renews on time.
            let next = Instant::now() + rng.jitter(interval, 0.1);
            let at = due.map_or(next, |d| d.min(next));
            due = Some(at);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.regs.changed.notified() => continue,
                _ = self.closed.changed() => return,
            }
            due = None;
            // Whatever is registered now, not what was when the wait began.
            let (keys, _) = self.regs.ephemeral();
            if keys.is_empty() {
                continue;
            }
            match self.beat(&keys).await {
                Ok(unknown) => {
                    self.backoff.reset();
                    if !unknown.is_empty() {
                        if let Err(e) = self.reregister(&unknown).await {
                            tracing::warn!(error = %e, count = unknown.len(), "re-registration failed; will retry");
                            due = Some(Instant::now() + self.backoff.next_delay().min(interval));
                        }
                    }
                }
                Err(e) => {
                    Counters::inc(&self.stats.heartbeats_failed);
                    let retry = self.backoff.next_delay().min(interval);
                    tracing::warn!(error = %e, ?retry, "heartbeat failed");
                    due = Some(Instant::now() + retry);
                }
            }
        }
    }

    /// One batched heartbeat for `keys`; returns the ones the server does not know.
    async fn beat(&self, keys: &[InstanceKey]) -> Result<Vec<InstanceKey>, Error> {
        let req = pb::HeartbeatRequest {
            instances: keys
                .iter()
                .map(|k| pb::InstanceRef {
                    service: Some(service_ref(&k.service)),
                    id: k.id.clone(),
                })
                .collect(),
        };
        let t = &self.transport;
        let resp = t
            .call("Heartbeat", |mut c| {
                let r = t.request(req.clone());
                async move { c.heartbeat(r).await }
            })
            .await?;
        Counters::inc(&self.stats.heartbeats_sent);
        let unknown = resp
            .unknown
            .into_iter()
            .filter_map(|r| {
                let service = crate::convert::service_name(r.service.as_ref()).ok()?;
                Some(InstanceKey { service, id: r.id })
            })
            .collect();
        Ok(unknown)
    }

    /// Registers `keys` again, exactly as first registered, in one batch; skips any that were
    /// deregistered meanwhile.
    async fn reregister(&self, keys: &[InstanceKey]) -> Result<(), Error> {
        let _exclusive = self.regs.order.write().await;
        let reqs: Vec<pb::RegisterRequest> = {
            let entries = self.regs.entries.lock();
            keys.iter()
                .filter_map(|k| entries.get(k).cloned())
                .collect()
        };
        if reqs.is_empty() {
            return Ok(());
        }
        let t = &self.transport;
        // In slices, so that a client with very many instances stays under the server's
        // message size limit.
        for chunk in reqs.chunks(REREGISTER_BATCH) {
            let batch = pb::BatchRegisterRequest {
                instances: chunk.to_vec(),
            };
            t.call("BatchRegister", |mut c| {
                let r = t.request(batch.clone());
                async move { c.batch_register(r).await }
            })
            .await?;
            let n = chunk.len() as u64;
            self.stats
                .reregistrations
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(count = n, "re-registered instances the server did not know");
        }
        Ok(())
    }
}
