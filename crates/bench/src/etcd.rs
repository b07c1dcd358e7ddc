//! The etcd side of the comparison, over etcd's native v3 gRPC API (the client `sextant-store-etcd`
//! generates from the vendored protos in `proto/etcd`): `register` is one `Put` per instance of `/services/<svc>/<id>`
//! with a lease attached (one lease per client, granted before the clock starts); `push` is W
//! watchers, each on its own connection with a `Watch` on the prefix `/services/<svc>/`
//! (after a `Range` of it, as a list-then-watch client does), while the tool `Put`s a changed
//! record of one key at a time. Events are matched to writes by revision: a put's response
//! header carries the revision its event's `mod_revision` has.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::load;
use crate::push::{self, Labels, Live, PushArgs, PushResult, Seen};
use crate::register::RegisterArgs;
use crate::stats::{CpuMeter, Row};

/// etcd's v3 API, as the etcd store generates it.
pub use sextant_store_etcd::pb::etcdserverpb as pb;
pub use sextant_store_etcd::prefix_end;

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// Lease TTL: longer than any run, so no keep-alive traffic is needed (none is measured).
const LEASE_TTL_SECS: i64 = 3600;

/// One connection to etcd (an HTTP/2 channel), as one independent client would hold.
async fn channel(url: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("invalid etcd URL {url}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {url}"))
}

fn kv(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch).max_decoding_message_size(64 << 20)
}

/// Answers when etcd serves reads.
pub async fn probe(url: &str) -> anyhow::Result<String> {
    let ch = channel(url).await?;
    tokio::time::timeout(
        Duration::from_secs(5),
        kv(ch).range(pb::RangeRequest {
            key: b"/sextant-bench-probe".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .context("no answer")??;
    Ok(String::new())
}

async fn grant(ch: Channel) -> anyhow::Result<i64> {
    let r = LeaseClient::new(ch)
        .lease_grant(pb::LeaseGrantRequest {
            ttl: LEASE_TTL_SECS,
            id: 0,
        })
        .await?
        .into_inner();
    anyhow::ensure!(r.error.is_empty(), "lease grant: {}", r.error);
    Ok(r.id)
}

fn put_revision(r: pb::PutResponse) -> anyhow::Result<u64> {
    let rev = r.header.context("no header in the put response")?.revision;
    u64::try_from(rev).context("negative revision")
}

/// `a.instances` puts from `a.clients` clients over `a.services` prefixes, each with its
/// client's lease attached (`with_lease`), or plain puts (a reference: what the lease costs).
pub async fn register(
    url: &str,
    a: &RegisterArgs,
    prefix: &str,
    run: &str,
    pid: Option<u32>,
    with_lease: bool,
) -> anyhow::Result<(Row, Vec<String>)> {
    let mut clients = Vec::with_capacity(a.clients);
    for _ in 0..a.clients.max(1) {
        let ch = channel(url).await?;
        let lease = if with_lease {
            grant(ch.clone()).await?
        } else {
            0
        };
        clients.push((kv(ch), lease));
    }
    let clients = Arc::new(clients);
    let services = a.services;
    let run = run.to_string();
    let meter = CpuMeter::start(pid);
    let out = load::drive(a.clients, a.instances, a.deadline, move |w, i| {
        let (mut c, lease) = clients[w].clone();
        let key = format!("/services/reg-etcd-{run}-{:04}/i{i}", i % services);
        // (lease 0 is no lease)
        let req = pb::PutRequest {
            key: key.into_bytes(),
            value: load::peer_record(i, 100),
            lease,
            ..Default::default()
        };
        async move {
            c.put(req).await?;
            Ok(1)
        }
    })
    .await;
    let cpu = meter.stop();
    let name = if with_lease {
        format!("{prefix}register etcd Put with lease")
    } else {
        format!("{prefix}register etcd Put, no lease (reference)")
    };
    let mut notes = out.notes(&name);
    if with_lease {
        notes.push(format!(
            "{name}: {} requests, one lease per client (TTL {LEASE_TTL_SECS} s) granted before the clock started",
            out.requests
        ));
    } else {
        notes.push(format!(
            "{name}: {} requests; not the shape compared (a registration that outlives its client is not a session-bound record), shown for what attaching a lease costs etcd",
            out.requests
        ));
    }
    let row = out.row(
        name,
        format!("C={} N={} services={}", a.clients, a.instances, a.services),
        "inst/s",
        Some(cpu),
    );
    Ok((row, notes))
}

/// One watcher: its own connection, a `Range` of the prefix, then a `Watch` from the next
/// revision; records the arrival of every event by its `mod_revision`.
async fn subscriber(
    n: usize,
    url: String,
    dir: String,
    connect_slots: Arc<Semaphore>,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let result: anyhow::Result<()> = async {
        let permit = connect_slots.acquire().await?;
        let t0 = Instant::now();
        let ch = channel(&url).await?;
        let (key, range_end) = (dir.clone().into_bytes(), prefix_end(dir.as_bytes()));
        let list = kv(ch.clone())
            .range(pb::RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                ..Default::default()
            })
            .await
            .context("range")?
            .into_inner();
        let rev = list.header.as_ref().map(|h| h.revision).unwrap_or(0);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key,
                    range_end,
                    start_revision: rev + 1,
                    ..Default::default()
                },
            )),
        };
        // The request stream stays open (pending) after the create request: closing it would
        // end the watch.
        let requests = futures::stream::iter([create]).chain(futures::stream::pending());
        let mut stream = WatchClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .watch(requests)
            .await
            .context("watch")?
            .into_inner();
        let mut permit = Some(permit);
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                m = stream.message() => m,
            };
            let Some(r) = msg.context("reading the watch stream")? else {
                anyhow::bail!("the watch stream ended");
            };
            let now = Instant::now();
            if r.canceled {
                anyhow::bail!(
                    "watch canceled: {} (compact revision {})",
                    r.cancel_reason,
                    r.compact_revision
                );
            }
            if r.created && seen.connect.is_none() {
                permit.take();
                live.snapshot_arrived(&mut seen, t0, rev as u64, list.kvs.len());
            }
            for e in &r.events {
                let rev = e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0) as u64;
                seen.events.push((rev, now));
                live.max_rev[n].fetch_max(rev, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    .await;
    live.subscriber_ended(n, &mut seen, result);
    seen
}

use futures::StreamExt as _;

/// The push scenario against etcd.
pub async fn push(
    url: &str,
    a: &PushArgs,
    prefix: &str,
    pid: Option<u32>,
) -> anyhow::Result<PushResult> {
    a.validate()?;
    let dir = format!("/services/push-etcd-{}/", load::run_id());
    let mut notes = Vec::new();

    // 1. The watched service: I keys with the writer's lease.
    let ch = channel(url).await?;
    let lease = grant(ch.clone()).await?;
    let writer = kv(ch);
    let meter = CpuMeter::start(pid);
    let (c, d) = (writer.clone(), dir.clone());
    let out = load::drive(8, a.instances, a.deadline, move |_, j| {
        let mut c = c.clone();
        let req = pb::PutRequest {
            key: format!("{d}i{j}").into_bytes(),
            value: load::peer_record(j, 100),
            lease,
            ..Default::default()
        };
        async move {
            c.put(req).await?;
            Ok(1)
        }
    })
    .await;
    notes.extend(out.notes("push setup"));
    let setup = out.row(
        format!("{prefix}push setup: Put with lease"),
        format!("I={} (8 in flight)", a.instances),
        "inst/s",
        Some(meter.stop()),
    );
    anyhow::ensure!(out.errors == 0, "could not create the watched keys");

    // 2. Watchers.
    let live = Live::new(a.watchers);
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let (subs, connected) = push::connect_all(a, pid, &live, &mut notes, |n| {
        tokio::spawn(subscriber(
            n,
            url.to_string(),
            dir.clone(),
            slots.clone(),
            live.clone(),
            stop_rx.clone(),
        ))
    })
    .await;

    // 3. Writes: a changed record of one key at a time.
    let instances = a.instances;
    let writes = push::write_at_rate(a, pid, &mut notes, |k| {
        let (j, _, weight) = push::peer_write(k, instances);
        let mut c = writer.clone();
        let req = pb::PutRequest {
            key: format!("{dir}i{j}").into_bytes(),
            value: load::peer_record(j, weight),
            lease,
            ..Default::default()
        };
        async move { put_revision(c.put(req).await?.into_inner()) }
    })
    .await;

    let labels = Labels {
        prefix: prefix.to_string(),
        subscribe: "etcd Range + Watch on the prefix (one HTTP/2 connection each)".into(),
        write: "etcd Put with lease".into(),
        notes: vec![format!(
            "{prefix}events are matched to writes by revision (Put response header = event mod_revision); the snapshot is the Range of the prefix"
        )],
    };
    Ok(push::finish(
        a, pid, &live, stop_tx, subs, setup, connected, writes, labels, notes,
    )
    .await)
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/services/a/"), b"/services/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
