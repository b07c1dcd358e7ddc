//! The ZooKeeper side of the comparison, over ZooKeeper's native protocol (the async
//! `zookeeper-client` crate): `register` is one EPHEMERAL znode created per instance under
//! `/services/<svc>/` by C sessions (one per client connection); `push` is W sessions, each
//! with a persistent recursive watch (`addWatch PERSISTENT_RECURSIVE`, ZooKeeper 3.6+) on
//! `/services/<svc>` and a `getChildren` of it, while the tool changes one instance at a time
//! with a `setData` of its znode.
//!
//! ZooKeeper before 3.9 sends no zxid with a watch event, only its type and path. The writes
//! are sequential and each instance's znode changes in a known order, so a subscriber numbers
//! the n-th `NodeDataChanged` of instance j as change `j + n * I` (ZooKeeper delivers a
//! session's events in order); the writer numbers its writes the same way.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use zookeeper_client as zkc;

use crate::load;
use crate::push::{self, Labels, Live, PushArgs, PushResult, Seen};
use crate::register::RegisterArgs;
use crate::stats::{CpuMeter, Row};

/// Session timeout asked of the server (its default maximum is 40 s): long enough that a busy
/// two-core machine does not expire sessions between pings.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// One session (one TCP connection).
pub async fn connect(addr: &str) -> anyhow::Result<zkc::Client> {
    zkc::Client::connector()
        .with_session_timeout(SESSION_TIMEOUT)
        .connect(addr)
        .await
        .with_context(|| format!("cannot open a ZooKeeper session at {addr}"))
}

fn persistent() -> zkc::CreateOptions<'static> {
    zkc::CreateMode::Persistent.with_acls(zkc::Acls::anyone_all())
}

fn ephemeral() -> zkc::CreateOptions<'static> {
    zkc::CreateMode::Ephemeral.with_acls(zkc::Acls::anyone_all())
}

/// The change number (1-based) of the `occurrence`-th change (0-based) of instance `j` among
/// `instances`: the writer's k-th write (0-based) changes instance `k % I`, so this is `k + 1`.
pub fn change_key(j: u64, occurrence: u64, instances: u64) -> u64 {
    j + occurrence * instances + 1
}

/// The instance number of a znode path `<dir>/i<j>`.
pub fn instance_of(path: &str, dir: &str) -> Option<u64> {
    path.strip_prefix(dir)?.strip_prefix("/i")?.parse().ok()
}

/// `a.instances` ephemeral creates from `a.clients` sessions over `a.services` parent znodes
/// (created first, persistent, outside the clock). Returns the sessions too: dropping them
/// would delete every znode they created, so the caller keeps them while the peer runs.
pub async fn register(
    addr: &str,
    a: &RegisterArgs,
    prefix: &str,
    run: &str,
    pid: Option<u32>,
) -> anyhow::Result<(Row, Vec<String>, Vec<zkc::Client>)> {
    let mut clients = Vec::with_capacity(a.clients);
    for _ in 0..a.clients.max(1) {
        clients.push(connect(addr).await?);
    }
    for s in 0..a.services {
        clients[0]
            .mkdir(&format!("/services/reg-zk-{run}-{s:04}"), &persistent())
            .await
            .context("creating the service znodes")?;
    }
    let shared = Arc::new(clients.clone());
    let services = a.services;
    let run = run.to_string();
    let meter = CpuMeter::start(pid);
    let out = load::drive(a.clients, a.instances, a.deadline, move |w, i| {
        let c = shared[w].clone();
        let path = format!("/services/reg-zk-{run}-{:04}/i{i}", i % services);
        let data = load::peer_record(i, 100);
        async move {
            c.create(&path, &data, &ephemeral()).await?;
            Ok(1)
        }
    })
    .await;
    let cpu = meter.stop();
    let name = format!("{prefix}register ZooKeeper create EPHEMERAL");
    let mut notes = out.notes(&name);
    notes.push(format!(
        "{name}: {} requests, one session per client; the {} parent znodes were created before the clock started",
        out.requests, a.services
    ));
    let row = out.row(
        name,
        format!("C={} N={} services={}", a.clients, a.instances, a.services),
        "inst/s",
        Some(cpu),
    );
    Ok((row, notes, clients))
}

/// One watcher: its own session, a persistent recursive watch on `dir`, then `getChildren`.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    n: usize,
    addr: String,
    dir: String,
    instances: u64,
    connect_slots: Arc<Semaphore>,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let result: anyhow::Result<()> = async {
        let permit = connect_slots.acquire().await?;
        let t0 = Instant::now();
        let client = connect(&addr).await?;
        let mut watcher = client
            .watch(&dir, zkc::AddWatchMode::PersistentRecursive)
            .await
            .context("addWatch")?;
        let children = client.list_children(&dir).await.context("getChildren")?;
        drop(permit);
        live.snapshot_arrived(&mut seen, t0, 0, children.len());
        let mut occurrences = vec![0u64; instances as usize];
        loop {
            let event = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                e = watcher.changed() => e,
            };
            let now = Instant::now();
            match event.event_type {
                zkc::EventType::Session => {
                    if event.session_state.is_terminated() {
                        // The watcher panics if polled after a terminal session event.
                        anyhow::bail!("session {:?}", event.session_state);
                    }
                    if event.session_state == zkc::SessionState::Disconnected {
                        seen.resyncs += 1;
                    }
                }
                zkc::EventType::NodeDataChanged => {
                    let Some(j) = instance_of(&event.path, &dir) else {
                        continue;
                    };
                    let Some(o) = occurrences.get_mut(j as usize) else {
                        continue;
                    };
                    let key = change_key(j, *o, instances);
                    *o += 1;
                    seen.events.push((key, now));
                    live.max_rev[n].fetch_max(key, std::sync::atomic::Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
    .await;
    live.subscriber_ended(n, &mut seen, result);
    seen
}

/// The push scenario against ZooKeeper.
pub async fn push(
    addr: &str,
    a: &PushArgs,
    prefix: &str,
    pid: Option<u32>,
) -> anyhow::Result<PushResult> {
    a.validate()?;
    let dir = format!("/services/push-zk-{}", load::run_id());
    let mut notes = Vec::new();

    // 1. The watched service: I ephemeral znodes of the writer's session.
    let writer = connect(addr).await?;
    writer
        .mkdir(&dir, &persistent())
        .await
        .context("creating the service znode")?;
    let meter = CpuMeter::start(pid);
    let (c, d) = (writer.clone(), dir.clone());
    let out = load::drive(8, a.instances, a.deadline, move |_, j| {
        let c = c.clone();
        let path = format!("{d}/i{j}");
        let data = load::peer_record(j, 100);
        async move {
            c.create(&path, &data, &ephemeral()).await?;
            Ok(1)
        }
    })
    .await;
    notes.extend(out.notes("push setup"));
    let setup = out.row(
        format!("{prefix}push setup: create EPHEMERAL"),
        format!("I={} (8 in flight, one session)", a.instances),
        "inst/s",
        Some(meter.stop()),
    );
    anyhow::ensure!(out.errors == 0, "could not create the watched znodes");

    // 2. Watchers.
    let live = Live::new(a.watchers);
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let (subs, connected) = push::connect_all(a, pid, &live, &mut notes, |n| {
        tokio::spawn(subscriber(
            n,
            addr.to_string(),
            dir.clone(),
            a.instances,
            slots.clone(),
            live.clone(),
            stop_rx.clone(),
        ))
    })
    .await;

    // 3. Writes: setData of one instance's znode at a time.
    let instances = a.instances;
    let writes = push::write_at_rate(a, pid, &mut notes, |k| {
        let (j, round, weight) = push::peer_write(k, instances);
        let c = writer.clone();
        let path = format!("{dir}/i{j}");
        let data = load::peer_record(j, weight);
        async move {
            c.set_data(&path, &data, None).await?;
            Ok(change_key(j, round, instances))
        }
    })
    .await;

    let labels = Labels {
        prefix: prefix.to_string(),
        subscribe: "ZooKeeper session + addWatch PERSISTENT_RECURSIVE + getChildren (one TCP connection each)".into(),
        write: "ZooKeeper setData".into(),
        notes: vec![format!(
            "{prefix}ZooKeeper 3.8 events carry no zxid: a subscriber numbers instance j's n-th NodeDataChanged as change j + n*I; its snapshot is getChildren (names only, no data); `resync snapshots` counts session disconnections (events during one can be lost, ZOOKEEPER-4698)"
        )],
    };
    let result = push::finish(
        a, pid, &live, stop_tx, subs, setup, connected, writes, labels, notes,
    )
    .await;
    drop(writer);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_changes_like_the_writer() {
        let (dir, instances) = ("/services/push-zk-1", 1000);
        // The writer's k-th write changes instance k % I for the (k / I)-th time.
        for k in [0u64, 1, 999, 1000, 1999, 2500] {
            let j = instance_of(&format!("{dir}/i{}", k % instances), dir).unwrap();
            assert_eq!(change_key(j, k / instances, instances), k + 1);
        }
        assert_eq!(instance_of("/services/push-zk-1/x3", dir), None);
        assert_eq!(instance_of("/services/other/i3", dir), None);
    }
}
