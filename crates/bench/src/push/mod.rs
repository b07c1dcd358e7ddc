//! Scenario `push`: W SSE subscribers watch one service of I instances while the tool changes
//! instance statuses at a fixed rate. For every (subscriber, change) pair it measures the time
//! from the write's acknowledgement to the event's arrival, and it accounts for every pair:
//! delivered as an event, covered by a resync snapshot, or missing.
//!
//! Every subscriber holds one TCP connection, so the tool and the server each need about W file
//! descriptors more than usual: the tool raises its soft `RLIMIT_NOFILE` to the hard limit at
//! start (a server it spawns inherits that); for a server started by hand, run `ulimit -n` first.
//!
//! The parts: [`sse`] is the Sextant subscriber (reads the SSE watch), [`accounting`] runs the
//! subscribers and the writes and accounts for every pair (shared with the etcd, ZooKeeper and
//! Nacos subscribers of `compare`), [`report`] is what a run yields for the tables.

mod accounting;
mod report;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::{watch, Semaphore};

use crate::load::{self, NAMESPACE};
use crate::stats::{print_table, CpuMeter};
use crate::target::Target;

pub(crate) use accounting::{connect_all, finish, peer_write, write_at_rate, Live, Seen};
pub(crate) use report::{Labels, PushResult};

#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    /// Subscribers: SSE streams (`GET /v1/watch`), one connection each.
    #[arg(long, short = 'w', default_value_t = 1000)]
    pub watchers: usize,
    /// Instances of the watched service, registered first with gRPC BatchRegister.
    #[arg(long, short = 'i', default_value_t = 1000)]
    pub instances: u64,
    /// Status changes per second (PATCH .../status, one at a time).
    #[arg(long, short = 'r', default_value_t = 50.0)]
    pub rate: f64,
    /// Status changes in all.
    #[arg(long, short = 'k', default_value_t = 200)]
    pub changes: u64,
    /// Subscribers connecting at the same time.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Longest wait for every subscriber's first snapshot.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Longest wait, after the last write, for every subscriber to receive it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Longest the writes may take (they stop after that).
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
}

impl PushArgs {
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.watchers > 0 && self.instances > 0 && self.changes > 0 && self.rate > 0.0,
            "sizes must be positive"
        );
        Ok(())
    }
}

pub async fn run(t: &Target, a: &PushArgs) -> anyhow::Result<()> {
    let r = measure(t, a, "").await?;
    print_table("push", &r.rows, &r.notes);
    Ok(())
}

/// The push scenario against Sextant: SSE subscribers, PATCH status writes.
pub(crate) async fn measure(t: &Target, a: &PushArgs, prefix: &str) -> anyhow::Result<PushResult> {
    measure_across(t, t, a, prefix).await
}

/// The push scenario with the writes (and the watched service's registration) on `leader` and
/// the subscribers on `watched`: the same node, or two nodes of a cluster (write on the leader,
/// watch on a follower). The CPU columns are `watched`'s.
pub(crate) async fn measure_across(
    leader: &Target,
    watched: &Target,
    a: &PushArgs,
    prefix: &str,
) -> anyhow::Result<PushResult> {
    let t = watched;
    a.validate()?;
    let service = format!("push-{}", load::run_id());
    let mut notes = Vec::new();

    // 1. The watched service.
    let meter = CpuMeter::start(leader.pid);
    let grpc = Arc::new(load::grpc_clients(&leader.grpc, 2).await?);
    let (svc, total) = (service.clone(), a.instances);
    let batch = 500u64;
    let out = load::drive(2, total.div_ceil(batch), a.deadline, move |w, n| {
        let instances: Vec<_> = (n * batch..((n + 1) * batch).min(total))
            .map(|i| load::grpc_request(&svc, format!("i{i}"), i))
            .collect();
        load::batch_register(grpc[w].clone(), instances)
    })
    .await;
    notes.extend(out.notes("push setup"));
    let setup = out.row(
        format!("{prefix}push setup: BatchRegister"),
        format!("I={} B={batch}", a.instances),
        "inst/s",
        Some(meter.stop()),
    );
    anyhow::ensure!(out.errors == 0, "could not register the watched service");

    // 2. Subscribers.
    let client = load::http_client(None)?;
    let live = Live::new(a.watchers);
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let url = format!("{}/v1/watch", t.http);
    let key = format!("{NAMESPACE}/{service}");
    let (subs, connected) = connect_all(a, t.pid, &live, &mut notes, |n| {
        tokio::spawn(sse::subscriber(
            n,
            client.clone(),
            url.clone(),
            key.clone(),
            slots.clone(),
            live.clone(),
            stop_rx.clone(),
        ))
    })
    .await;

    // 3. Writes at a fixed rate, one at a time, each acknowledged before the next.
    let writer = load::http_client(Some(Duration::from_secs(30)))?;
    let instances = a.instances;
    let writes = write_at_rate(a, t.pid, &mut notes, |k| {
        let (j, round) = (k % instances, k / instances);
        // Alternating per instance and flipping every round, so every change changes something.
        let weight = if (j + round) % 2 == 0 { 50 } else { 150 };
        let url = format!(
            "{}/v1/namespaces/{NAMESPACE}/services/{service}/instances/i{j}/status",
            leader.http
        );
        let req = writer
            .patch(url)
            .json(&serde_json::json!({ "weight": weight }));
        async move {
            let v = load::check_http(req.send().await?).await?;
            v["revision"].as_u64().context("no revision in the answer")
        }
    })
    .await;

    // 4. Drain, stop, account.
    let labels = Labels {
        prefix: prefix.to_string(),
        subscribe: "SSE GET /v1/watch (one HTTP/1.1 connection each)".into(),
        write: "PATCH status".into(),
        notes: vec!["the server publishes a change before it answers the write, so an event can arrive before the ack: the ack row counts those as 0; the `write sent` row measures from just before the PATCH was sent (it includes the write's own commit)".into()],
    };
    Ok(finish(
        a, t.pid, &live, stop_tx, subs, setup, connected, writes, labels, notes,
    )
    .await)
}
