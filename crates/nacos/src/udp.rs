//! Nacos 1.x UDP push. A 1.x client (the Node.js SDK, old Java clients) sends `udpPort` and
//! `clientIP` with `/instance/list`; Nacos then pushes each change of that service to the
//! client as a datagram `{"type":"dom","data":"<ServiceInfo JSON>","lastRefTime":N}` and the
//! client acknowledges with `{"type":"push-ack","lastRefTime":N}`.
//!
//! Here: one core subscription per service that has UDP clients, fanning each change out to
//! them through the same encoded `ServiceInfo` the list answer uses (`InfoCache`, encoded once
//! per variant). A client is remembered for [`CLIENT_TTL`] after its last list query (clients
//! keep polling, every `cacheMillis`); there are at most [`MAX_CLIENTS`] of them. An unacked
//! push is sent again up to [`RETRIES`] times, [`ACK_TIMEOUT`] apart; pending pushes are
//! bounded by [`MAX_PENDING`]. Nothing per client grows with the rate of changes: a newer push
//! supersedes an older unacked one, which is never resent and leaves within one timeout.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use sextant_core::model::ServiceKey;
use tokio::net::UdpSocket;

use crate::mapping::InfoOptions;
use crate::metrics::NacosMetrics;
use crate::Adapter;

/// A client that has not queried its list for this long stops getting pushes.
pub const CLIENT_TTL: Duration = Duration::from_secs(30);
/// Most UDP clients remembered at once (further ones are served by polling only).
pub const MAX_CLIENTS: usize = 50_000;
/// How long a push waits for its ack before it is sent again.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(1000);
/// Resends of an unacked push.
pub const RETRIES: u32 = 2;
/// Most unacked pushes kept.
pub const MAX_PENDING: usize = 100_000;
/// A datagram must fit in one UDP packet; a larger `ServiceInfo` is left to polling.
const MAX_DATAGRAM: usize = 65_000;

struct Client {
    options: InfoOptions,
    seen: Instant,
}

/// Per service, its clients by address, and how many there are in all (kept, not summed on
/// every list query).
#[derive(Default)]
struct Clients {
    by_service: HashMap<ServiceKey, HashMap<SocketAddr, Client>>,
    total: usize,
}

struct Pending {
    to: SocketAddr,
    packet: Bytes,
    sent: Instant,
    tries: u32,
    /// A newer push to the same client went out: this one is never sent again (it would
    /// undo the newer state), but its ack still counts until it times out.
    superseded: bool,
}

/// The UDP push of one adapter.
pub(crate) struct UdpPush {
    socket: Arc<UdpSocket>,
    services: Mutex<Clients>,
    /// By `lastRefTime`.
    pending: Mutex<HashMap<u64, Pending>>,
    /// The latest push per client, so a newer one replaces an unacked older one.
    latest: Mutex<HashMap<SocketAddr, u64>>,
    next_ref: AtomicU64,
}

impl UdpPush {
    /// Binds the sending socket on `ip` (the Nacos listener's), port 0. Needs a runtime.
    pub fn bind(ip: IpAddr) -> std::io::Result<Self> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        Ok(Self {
            socket: Arc::new(socket),
            services: Mutex::new(Clients::default()),
            pending: Mutex::new(HashMap::new()),
            latest: Mutex::new(HashMap::new()),
            // Unique per push and rising. Microseconds, not nanoseconds: clients parse it as a
            // JavaScript number and echo it back, exact only below 2^53.
            next_ref: AtomicU64::new(sextant_core::model::now_ms().saturating_mul(1_000)),
        })
    }

    /// Starts the ack reader and the resender.
    pub fn start(adapter: &Arc<Adapter>) {
        let Some(udp) = adapter.udp.as_ref() else {
            return;
        };
        tokio::spawn(read_acks(Arc::downgrade(adapter), udp.socket.clone()));
        tokio::spawn(resend(Arc::downgrade(adapter)));
    }

    /// Remembers (or refreshes) a client of `key` at `addr` that lists with `options`;
    /// returns whether it will be pushed to.
    pub fn refresh(
        adapter: &Arc<Adapter>,
        key: &ServiceKey,
        addr: SocketAddr,
        options: InfoOptions,
    ) -> bool {
        let Some(udp) = adapter.udp.as_ref() else {
            return false;
        };
        let mut services = udp.services.lock();
        let Clients { by_service, total } = &mut *services;
        let clients = by_service.entry(key.clone()).or_default();
        let new_service = clients.is_empty();
        if !clients.contains_key(&addr) && *total >= MAX_CLIENTS {
            adapter.metrics.udp_refused.inc();
            if new_service {
                by_service.remove(key);
            }
            return false;
        }
        let client = Client {
            options,
            seen: Instant::now(),
        };
        if clients.insert(addr, client).is_none() {
            *total += 1;
            adapter.metrics.udp_clients.set(*total as i64);
        }
        if new_service {
            tokio::spawn(follow(Arc::downgrade(adapter), key.clone()));
        }
        true
    }

    fn send(&self, adapter: &Adapter, to: SocketAddr, data: &[u8]) {
        let last_ref = self.next_ref.fetch_add(1, Ordering::Relaxed);
        let Ok(data) = std::str::from_utf8(data) else {
            return;
        };
        let packet = serde_json::json!({"type": "dom", "data": data, "lastRefTime": last_ref});
        let Ok(packet) = serde_json::to_vec(&packet) else {
            return;
        };
        if packet.len() > MAX_DATAGRAM {
            adapter.metrics.udp_too_large.inc();
            return;
        }
        let packet = Bytes::from(packet);
        if let Err(e) = self.socket.try_send_to(&packet, to) {
            tracing::debug!(%to, error = %e, "nacos udp push not sent");
        }
        adapter.metrics.udp_pushes.inc();
        let mut pending = self.pending.lock();
        if let Some(old) = self.latest.lock().insert(to, last_ref) {
            if let Some(p) = pending.get_mut(&old) {
                p.superseded = true;
            }
        }
        if pending.len() < MAX_PENDING {
            pending.insert(
                last_ref,
                Pending {
                    to,
                    packet,
                    sent: Instant::now(),
                    tries: 0,
                    superseded: false,
                },
            );
        }
    }

    fn acked(&self, last_ref: u64) -> bool {
        let p = self.pending.lock().remove(&last_ref);
        if let Some(p) = &p {
            let mut latest = self.latest.lock();
            if latest.get(&p.to) == Some(&last_ref) {
                latest.remove(&p.to);
            }
        }
        p.is_some()
    }

    /// The clients of `key` still alive (the others are forgotten).
    fn live_clients(
        &self,
        key: &ServiceKey,
        metrics: &NacosMetrics,
    ) -> Vec<(SocketAddr, InfoOptions)> {
        let mut services = self.services.lock();
        let Clients { by_service, total } = &mut *services;
        let Some(clients) = by_service.get_mut(key) else {
            return Vec::new();
        };
        let before = clients.len();
        clients.retain(|_, c| c.seen.elapsed() < CLIENT_TTL);
        *total -= before - clients.len();
        metrics.udp_clients.set(*total as i64);
        let out: Vec<_> = clients
            .iter()
            .map(|(a, c)| (*a, c.options.clone()))
            .collect();
        if out.is_empty() {
            by_service.remove(key);
        }
        out
    }
}

/// Pushes every change of `key` to its UDP clients until none is left.
async fn follow(adapter: Weak<Adapter>, key: ServiceKey) {
    let mut sub = {
        let Some(a) = adapter.upgrade() else { return };
        let since = a.registry.service_revision(&key);
        a.registry.subscribe(vec![key.clone()], Some(since))
    };
    loop {
        // Wake at least every CLIENT_TTL, so a service whose clients all left is let go.
        let next = tokio::time::timeout(CLIENT_TTL, sub.next()).await;
        let Some(a) = adapter.upgrade() else { return };
        let Some(udp) = a.udp.as_ref() else { return };
        let clients = udp.live_clients(&key, &a.metrics);
        if clients.is_empty() {
            return;
        }
        match next {
            Ok(Ok(_delivery)) => {
                for (to, opts) in clients {
                    match a.infos.get(&a.registry, &a.metrics, &key, &opts) {
                        Ok(body) => udp.send(&a, to, &body),
                        Err(e) => tracing::debug!(error = %e, "nacos udp push not built"),
                    }
                }
            }
            Ok(Err(_closed)) => return,
            Err(_idle) => {}
        }
    }
}

/// Reads acks until the adapter goes.
async fn read_acks(adapter: Weak<Adapter>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let registry = match adapter.upgrade() {
            Some(a) => a.registry.clone(),
            None => return,
        };
        let got = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = registry.closed() => return,
        };
        let Ok((n, _from)) = got else { continue };
        let Some(a) = adapter.upgrade() else { return };
        let Some(udp) = a.udp.as_ref() else { return };
        let ack: Option<u64> = serde_json::from_slice::<serde_json::Value>(&buf[..n])
            .ok()
            .and_then(|v| {
                let r = &v["lastRefTime"];
                r.as_u64().or_else(|| r.as_str()?.parse().ok())
            });
        if let Some(r) = ack {
            if udp.acked(r) {
                a.metrics.udp_acks.inc();
            }
        }
    }
}

/// Sends unacked pushes again, and gives up on them after [`RETRIES`].
async fn resend(adapter: Weak<Adapter>) {
    loop {
        tokio::time::sleep(ACK_TIMEOUT / 2).await;
        let Some(a) = adapter.upgrade() else { return };
        if a.registry.is_closing() {
            return;
        }
        let Some(udp) = a.udp.as_ref() else { return };
        let mut again = Vec::new();
        {
            let mut pending = udp.pending.lock();
            let mut latest = udp.latest.lock();
            pending.retain(|r, p| {
                if p.sent.elapsed() < ACK_TIMEOUT {
                    return true;
                }
                if p.superseded {
                    return false;
                }
                if p.tries >= RETRIES {
                    a.metrics.udp_unacked.inc();
                    if latest.get(&p.to) == Some(r) {
                        latest.remove(&p.to);
                    }
                    return false;
                }
                p.tries += 1;
                p.sent = Instant::now();
                again.push((p.to, p.packet.clone()));
                true
            });
        }
        for (to, packet) in again {
            let _ = udp.socket.try_send_to(&packet, to);
            a.metrics.udp_retries.inc();
        }
    }
}
