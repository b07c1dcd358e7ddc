//! A Nacos 2.x subscription's push task: one per (connection, service, clusters). It turns the
//! core's deliveries into `NotifySubscriberRequest`s carrying the service's whole current
//! state (what Nacos clients expect), sent on the connection's bi-stream. While the stream's
//! queue is full the task waits and the core coalesces, so a slow client costs a cursor.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::json;
use sextant_core::model::{Revision, ServiceKey};
use sextant_proto::nacos::Payload;

use super::conn::{Conn, Connections};
use crate::encode_json;
use crate::mapping::{InfoOptions, NacosService};

/// Pushes a subscribed service's whole state to the connection once at once, then after every
/// change the core delivers past `since` (the state the subscribe response carried).
pub(super) async fn push_changes(
    conns: Arc<Connections>,
    conn: Arc<Conn>,
    key: ServiceKey,
    opts: InfoOptions,
    since: Revision,
    revoked: impl std::future::Future<Output = String>,
) {
    tokio::pin!(revoked);
    let adapter = &conns.adapter;
    let metrics = &adapter.metrics;
    let mut sub = adapter.registry.subscribe(vec![key.clone()], Some(since));
    let mut outbound = conn.outbound.subscribe();
    let svc = NacosService::from_sextant(&key.service);
    // Everything of the push body but `serviceInfo`, which is spliced in as encoded bytes.
    let head = |id: &str| {
        let mut v = encode_json(
            metrics,
            "NotifySubscriberRequest",
            &json!({
                "requestId": id,
                "module": "naming",
                "headers": {},
                "namespace": &*key.namespace,
                "serviceName": svc.name,
                "groupName": svc.group,
            }),
        )?;
        v.pop(); // the closing brace
        Ok::<_, crate::NacosError>(v)
    };
    // Like Nacos, push the current state once right after subscribing: a client that redoes
    // its registration before its subscription after a reconnect (the Rust SDK may) otherwise
    // never hears of it, as that change precedes the subscription.
    let mut initial = true;
    loop {
        let published = if std::mem::take(&mut initial) {
            None
        } else {
            let next = tokio::select! {
                d = sub.next() => d,
                why = &mut revoked => {
                    // Nacos has no message that ends one subscription: pushes stop, and the
                    // client's next subscribe with that token is refused.
                    tracing::info!(connection = %conn.id, service = %key, reason = %why, "nacos subscription ended");
                    forget(&conns, &conn, &key);
                    return;
                }
            };
            let Ok(delivery) = next else {
                return;
            };
            if delivery.events.is_empty() && delivery.snapshots.is_empty() {
                continue;
            }
            delivery.events.first().map(|e| e.published_at)
        };
        let tx = match outbound.wait_for(Option::is_some).await {
            Ok(tx) => tx.clone(),
            Err(_) => return,
        };
        let Some(tx) = tx else { return };
        let id = conns.next_push.fetch_add(1, Ordering::Relaxed).to_string();
        // A push that cannot be encoded is not sent (it was logged and counted); the next
        // change tries again. An empty or partial push would corrupt the client's cache.
        let (Ok(info), Ok(mut body)) = (
            adapter.infos.get(&adapter.registry, metrics, &key, &opts),
            head(&id),
        ) else {
            continue;
        };
        body.extend_from_slice(b",\"serviceInfo\":");
        body.extend_from_slice(&info);
        body.push(b'}');
        if tx
            .send(Ok(Payload::envelope("NotifySubscriberRequest", body)))
            .await
            .is_err()
        {
            return;
        }
        metrics.pushes.inc();
        if let Some(at) = published {
            metrics.push_latency.observe(at.elapsed().as_secs_f64());
        }
    }
}

/// Drops the connection's subscriptions of `key` (whatever their clusters: one connection is
/// one client with one token) and ends their push tasks, this one included, so a later
/// subscribe starts afresh.
fn forget(conns: &Connections, conn: &Conn, key: &ServiceKey) {
    let mut st = conn.state.lock();
    let ended: Vec<_> = st
        .subscriptions
        .extract_if(|(k, _), _| k == key)
        .map(|(_, task)| task)
        .collect();
    drop(st);
    for task in ended {
        task.abort();
        conns.adapter.metrics.subscriptions.dec();
    }
}
