//! What is bound to one Nacos 2.x connection, and the connection table.
//!
//! A connection is known by its peer address. It holds the ephemeral instances it registered
//! (their leases are renewed here while it lives, so they lapse a grace period after it drops),
//! its subscriptions' push tasks and the sender of its bi-stream. When the bi-stream ends the
//! connection closes: push tasks stop and lease renewal ends.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sextant_core::model::ServiceKey;
use sextant_core::HeartbeatResult;
use sextant_proto::nacos::Payload;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::wire::SetupRequest;
use crate::{now_ms, Adapter};

/// The sending half of a connection's bi-stream.
pub(super) type Outbound = mpsc::Sender<Result<Payload, Status>>;

/// One client connection.
pub(super) struct Conn {
    pub(super) id: String,
    pub(super) addr: SocketAddr,
    pub(super) created: Instant,
    /// The bi-stream's sender, once the client opened it.
    pub(super) outbound: watch::Sender<Option<Outbound>>,
    pub(super) state: Mutex<ConnState>,
}

#[derive(Default)]
pub(super) struct ConnState {
    /// Ephemeral instances registered over this connection.
    pub(super) instances: HashSet<(ServiceKey, String)>,
    /// (service, clusters) → its push task.
    pub(super) subscriptions: HashMap<SubscriptionKey, JoinHandle<()>>,
    pub(super) attached: bool,
    /// Bumped by each bi-stream the connection opens: only the latest one's end closes it.
    pub(super) stream: u64,
    pub(super) closed: bool,
    pub(super) client: String,
}

impl Conn {
    pub(super) fn close(&self, metrics: &crate::NacosMetrics) -> usize {
        let mut st = self.state.lock();
        if st.closed {
            return 0;
        }
        st.closed = true;
        for (_, task) in st.subscriptions.drain() {
            task.abort();
            metrics.subscriptions.dec();
        }
        self.outbound.send_replace(None);
        st.instances.len()
    }
}

pub(super) struct Connections {
    pub(super) adapter: Arc<Adapter>,
    pub(super) map: Mutex<HashMap<SocketAddr, Arc<Conn>>>,
    pub(super) next_push: AtomicU64,
    pub(super) stop: watch::Receiver<bool>,
}

/// A subscribed service and its cluster filter (`a,b`; empty for all).
pub(super) type SubscriptionKey = (ServiceKey, String);

impl Connections {
    pub(super) fn get(&self, addr: SocketAddr) -> Arc<Conn> {
        let mut map = self.map.lock();
        if let Some(c) = map.get(&addr) {
            if !c.state.lock().closed {
                return c.clone();
            }
        }
        let conn = Arc::new(Conn {
            id: format!("{}_{}_{}", now_ms(), addr.ip(), addr.port()),
            addr,
            created: Instant::now(),
            outbound: watch::Sender::new(None),
            state: Mutex::new(ConnState::default()),
        });
        map.insert(addr, conn.clone());
        conn
    }

    pub(super) fn remove(&self, conn: &Arc<Conn>) {
        let mut map = self.map.lock();
        if map.get(&conn.addr).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            map.remove(&conn.addr);
        }
    }
}

/// Renews the leases of every live connection's ephemeral instances, and forgets connections
/// that closed or never opened their bi-stream.
pub(super) async fn renew_leases(conns: Arc<Connections>) {
    let grace = conns.adapter.config.connection_grace;
    let every = (grace / 4).max(Duration::from_millis(250));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = conns.stop.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        let all: Vec<Arc<Conn>> = conns.map.lock().values().cloned().collect();
        for conn in all {
            let (live, items) = {
                let st = conn.state.lock();
                let live = !st.closed && (st.attached || conn.created.elapsed() < grace * 2);
                (live, st.instances.iter().cloned().collect::<Vec<_>>())
            };
            if !live {
                let n = conn.close(&conns.adapter.metrics);
                conns.remove(&conn);
                if n > 0 {
                    tracing::info!(connection = %conn.id, instances = n, "nacos connection never opened its stream; its instances lapse");
                }
                continue;
            }
            if items.is_empty() {
                continue;
            }
            let results = conns.adapter.registry.heartbeat(&items);
            let gone: Vec<_> = items
                .into_iter()
                .zip(results)
                .filter(|(_, r)| *r == HeartbeatResult::Unknown)
                .map(|(k, _)| k)
                .collect();
            if !gone.is_empty() {
                let mut st = conn.state.lock();
                for k in gone {
                    st.instances.remove(&k);
                }
            }
        }
    }
}

/// Reads what the client sends on its bi-stream (set-up, push acks) until the connection
/// ends, then lets go of everything bound to it.
pub(super) async fn read_stream(
    conns: Arc<Connections>,
    conn: Arc<Conn>,
    stream: u64,
    mut inbound: Streaming<Payload>,
) {
    let metrics = &conns.adapter.metrics;
    let mut stop = conns.stop.clone();
    let why = loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = stop.wait_for(|v| *v) => break "server stopping".to_string(),
        };
        match msg {
            Ok(Some(p)) => {
                let kind = p.kind();
                match kind {
                    "NotifySubscriberResponse" => {
                        metrics.push_acks.inc();
                    }
                    "ConnectionSetupRequest" => {
                        // Only read for the logs: a set-up we cannot read still connects.
                        let setup: SetupRequest = match serde_json::from_slice(p.body_bytes()) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::debug!(connection = %conn.id, error = %e, "unreadable ConnectionSetupRequest");
                                SetupRequest::default()
                            }
                        };
                        let client = setup.client_version.unwrap_or_default();
                        tracing::info!(connection = %conn.id, peer = %conn.addr, client = %client, "nacos connection set up");
                        conn.state.lock().client = client;
                    }
                    other => {
                        tracing::debug!(connection = %conn.id, kind = other, "nacos stream message ignored")
                    }
                }
            }
            Ok(None) => break "client closed the stream".to_string(),
            Err(e) => break format!("stream error: {}", e.message()),
        }
    };
    metrics.connections.dec();
    if conn.state.lock().stream != stream {
        // The client opened a newer stream on the same connection; that one carries on.
        tracing::debug!(connection = %conn.id, reason = %why, "superseded nacos stream ended");
        return;
    }
    let instances = conn.close(metrics);
    conns.remove(&conn);
    let client = conn.state.lock().client.clone();
    tracing::info!(
        connection = %conn.id,
        client = %client,
        reason = %why,
        instances,
        grace = ?conns.adapter.config.connection_grace,
        "nacos connection closed; its ephemeral instances lapse after the grace period"
    );
}
