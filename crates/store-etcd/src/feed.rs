//! The etcd store's change feed: one Watch on the registry's keys (`{prefix}k/` through
//! `{prefix}meta/`), turned into the core's [`Change`]s.
//!
//! etcd gives every transaction one revision, and all its events carry it. A transaction that
//! writes `{prefix}meta/revision` ends a batch: its events, and those of the transactions of
//! the same split batch before it, are one change at the Sextant revision written there. When
//! the watch breaks (an etcd member goes, a timeout) it is opened again from the etcd revision
//! after the last whole change, so nothing is lost or repeated; a start that etcd compacted
//! away ends the feed with `Compacted`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use sextant_core::model::Revision;
use sextant_core::{Change, FeedError, Mutation, StoreError};
use tokio::sync::mpsc;

use crate::pb::etcdserverpb::{
    watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest,
};
use crate::pb::mvccpb::event::EventType;
use crate::{decode_revision, prefix_end, Inner, MAX_DECODE_BYTES};

/// Changes buffered between the watch and the node's writer.
pub(crate) const CHANNEL: usize = 1024;

/// Wait before opening a broken watch again.
const RETRY: Duration = Duration::from_millis(300);

/// How one watch ended.
enum End {
    /// The receiver or the store went away.
    Closed,
    Compacted(i64),
    /// Try again (from the last whole change).
    Broken(String),
}

/// Feeds `tx` with the changes after `revision`, which the registry was at in etcd revision
/// `at`, until the receiver or the store goes.
pub(crate) async fn run(
    inner: Arc<Inner>,
    revision: Revision,
    at: i64,
    tx: mpsc::Sender<Result<Change, FeedError>>,
) {
    let mut pos = Position {
        revision,
        next: at + 1,
    };
    let mut failures = 0u32;
    loop {
        match watch(&inner, &mut pos, &tx, failures).await {
            End::Closed => return,
            End::Compacted(c) => {
                tracing::warn!(
                    revision = pos.revision,
                    etcd_revision = pos.next,
                    compacted = c,
                    "etcd compacted the history this feed needs"
                );
                let _ = tx.send(Err(FeedError::Compacted(pos.revision))).await;
                return;
            }
            End::Broken(why) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %why, failures, "etcd watch broke; opening it again");
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Where the feed is: the last whole change delivered and the etcd revision after it.
struct Position {
    revision: Revision,
    next: i64,
}

async fn watch(
    inner: &Inner,
    pos: &mut Position,
    tx: &mpsc::Sender<Result<Change, FeedError>>,
    failures: u32,
) -> End {
    if tx.is_closed() || inner.closed.load(Ordering::SeqCst) {
        return End::Closed;
    }
    let n = inner.conn.raw.len();
    // After a failure, the next endpoint.
    let idx = (inner.conn.current.load(Ordering::Relaxed) + failures as usize) % n;
    let key = inner.keys.data.clone();
    let meta = [inner.config.prefix.as_bytes(), b"meta/"].concat();
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key,
                // `k/` sorts before `meta/`; nothing else of ours lies between them.
                range_end: prefix_end(&meta),
                start_revision: pos.next,
                ..Default::default()
            },
        )),
    };
    // The request stream stays open: closing it would end the watch.
    let requests = futures::stream::iter([create]).chain(futures::stream::pending());
    let mut client =
        WatchClient::new(inner.conn.raw[idx].clone()).max_decoding_message_size(MAX_DECODE_BYTES);
    let started = std::time::Instant::now();
    let opened = tokio::time::timeout(inner.config.request_timeout, client.watch(requests)).await;
    inner.metrics.observe("watch", started);
    let mut stream = match opened {
        Ok(Ok(s)) => s.into_inner(),
        Ok(Err(s)) => {
            return End::Broken(format!("{}: {}", inner.conn.endpoints[idx], s.message()))
        }
        Err(_) => return End::Broken(format!("{}: no answer", inner.conn.endpoints[idx])),
    };
    // The mutations of a split batch's earlier transactions, until the one with the revision,
    // and the revision its first transaction recorded in `meta/attempted`.
    let mut pending: Vec<Mutation> = Vec::new();
    let mut pending_attempted: Option<Revision> = None;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return End::Closed,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return End::Broken("the watch stream ended".into()),
            Err(s) => return End::Broken(s.message().to_string()),
        };
        if resp.compact_revision > 0 {
            return End::Compacted(resp.compact_revision);
        }
        if resp.canceled {
            return End::Broken(format!("watch canceled: {}", resp.cancel_reason));
        }
        // One transaction at a time: its events share a revision (etcd does not split a
        // revision's events over responses).
        let mut txn = Txn::default();
        let mut events = resp.events.into_iter().filter_map(|e| {
            let put = e.r#type == EventType::Put as i32;
            e.kv.map(|kv| (put, kv))
        });
        let mut next = events.next();
        while let Some((put, kv)) = next.take() {
            let at = kv.mod_revision;
            if let Err(e) = txn.add(inner, put, kv) {
                let _ = tx.send(Err(FeedError::Store(e))).await;
                return End::Closed;
            }
            next = events.next();
            if next.as_ref().is_some_and(|(_, kv)| kv.mod_revision == at) {
                continue;
            }
            // The transaction is whole.
            let t = std::mem::take(&mut txn);
            if let Some(a) = t.attempted {
                // The first part of a split batch: what was pending belongs to a batch whose
                // writer died before its last part (never acknowledged; see the crate docs).
                drop_abandoned(&mut pending, a);
                pending_attempted = Some(a);
            }
            let Some(revision) = t.revision else {
                pending.extend(t.mutations);
                continue;
            };
            if revision <= pos.revision && t.mutations.is_empty() {
                // Not after the start (the revision key's creation at 0, a repeated empty
                // batch): nothing to deliver, and a batch in progress stays pending.
                if pending.is_empty() {
                    pos.next = at + 1;
                }
                continue;
            }
            // Earlier parts belong to this batch only if they recorded (at least) its revision.
            if pending_attempted.is_none_or(|a| a < revision) {
                drop_abandoned(&mut pending, revision);
            }
            pending_attempted = None;
            pending.extend(t.mutations);
            inner.remember(revision, at);
            pos.next = at + 1;
            pos.revision = pos.revision.max(revision);
            let change = Change {
                revision,
                mutations: std::mem::take(&mut pending),
                journal: t.journal,
            };
            if tx.send(Ok(change)).await.is_err() {
                return End::Closed;
            }
        }
    }
}

/// What one etcd transaction of the registry's keys wrote.
#[derive(Default)]
struct Txn {
    revision: Option<Revision>,
    attempted: Option<Revision>,
    journal: Vec<u8>,
    mutations: Vec<Mutation>,
}

impl Txn {
    fn add(
        &mut self,
        inner: &Inner,
        put: bool,
        kv: crate::pb::mvccpb::KeyValue,
    ) -> Result<(), StoreError> {
        if kv.key == inner.keys.revision {
            if put {
                self.revision = Some(decode_revision(&kv.key, &kv.value)?);
            }
        } else if kv.key == inner.keys.attempted {
            if put {
                self.attempted = Some(decode_revision(&kv.key, &kv.value)?);
            }
        } else if kv.key == inner.keys.journal {
            if put {
                self.journal = kv.value;
            }
        } else if let Some(k) = kv.key.strip_prefix(inner.keys.data.as_slice()) {
            let key = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                reason: "the key is not UTF-8".into(),
            })?;
            self.mutations.push(Mutation {
                key,
                value: put.then_some(kv.value),
            });
        }
        Ok(())
    }
}

/// Drops the parts of a batch that was never finished (its writer died between parts).
fn drop_abandoned(pending: &mut Vec<Mutation>, before: Revision) {
    if !pending.is_empty() {
        tracing::warn!(
            mutations = pending.len(),
            next = before,
            "dropping the written part of a split batch that was never finished"
        );
        pending.clear();
    }
}
