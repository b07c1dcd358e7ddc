//! Running a push measurement for any system: the state subscribers share with the controller
//! ([`Live`]) and what each saw ([`Seen`]), connecting every subscriber (bounded), the writes
//! at a fixed rate, and [`finish`]: waiting for delivery, then accounting for every (subscriber,
//! change) pair as delivered, covered by a resync snapshot, or missing.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::stats::{CpuMeter, CpuUsed, Latency, Row};

use super::{Labels, PushArgs, PushResult};

/// The peers' k-th write: which instance it changes, in which round over the instances, and
/// the weight it writes (alternating per round, so every write changes the record).
pub(crate) fn peer_write(k: u64, instances: u64) -> (u64, u64, u32) {
    let (j, round) = (k % instances, k / instances);
    let weight = if (j + round).is_multiple_of(2) {
        50
    } else {
        150
    };
    (j, round, weight)
}

/// State a subscriber shares with the controller while it runs (for every system compared:
/// a "revision" is whatever key identifies one acknowledged change there).
pub(crate) struct Live {
    pub(crate) ready: AtomicUsize,
    /// Subscribers whose stream ended before their first snapshot.
    pub(crate) failed: AtomicUsize,
    /// Highest revision seen, per subscriber.
    pub(crate) max_rev: Vec<AtomicU64>,
    /// The stream ended (error, close or end of body), per subscriber.
    pub(crate) ended: Vec<AtomicBool>,
}

impl Live {
    /// Records a subscriber's first snapshot — how long it took since `t0`, the revision and
    /// size it had — and counts the subscriber as ready.
    pub(crate) fn snapshot_arrived(
        &self,
        seen: &mut Seen,
        t0: Instant,
        rev: u64,
        instances: usize,
    ) {
        seen.connect = Some(t0.elapsed());
        seen.snapshot_rev = rev;
        seen.snapshot_instances = instances;
        self.ready.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that subscriber `n` stopped, and why if it failed (every system's subscriber
    /// ends through here, so they are all accounted the same way).
    pub(crate) fn subscriber_ended(&self, n: usize, seen: &mut Seen, result: anyhow::Result<()>) {
        if let Err(e) = result {
            seen.ended = Some(format!("{e:#}"));
            if seen.connect.is_none() {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ended[n].store(true, Ordering::Relaxed);
    }

    pub(crate) fn new(watchers: usize) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            max_rev: (0..watchers).map(|_| AtomicU64::new(0)).collect(),
            ended: (0..watchers).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Waits until every subscriber has its first snapshot or has failed, or until `deadline`.
    async fn wait_ready(&self, deadline: Instant) {
        let watchers = self.max_rev.len();
        loop {
            let ready = self.ready.load(Ordering::Relaxed);
            let failed = self.failed.load(Ordering::Relaxed);
            if ready + failed >= watchers || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// What one subscriber saw.
#[derive(Default)]
pub(crate) struct Seen {
    /// From the request until the first snapshot was read.
    pub(crate) connect: Option<Duration>,
    pub(crate) snapshot_rev: u64,
    pub(crate) snapshot_instances: usize,
    /// (revision, arrival) of every event frame, in arrival order.
    pub(crate) events: Vec<(u64, Instant)>,
    /// Snapshots after the first (resync: the server replaced missed history).
    pub(crate) resyncs: u32,
    /// Every revision up to this one is covered by a resync snapshot.
    pub(crate) resync_through: u64,
    /// Why the stream ended before it was stopped, if it did.
    pub(crate) ended: Option<String>,
}

/// The subscribers' connect phase: how many had their first snapshot, and when.
pub(crate) struct Connected {
    pub(crate) ready: usize,
    pub(crate) secs: f64,
    pub(crate) cpu: CpuUsed,
}

/// Starts the subscribers (`spawn(n)` returns subscriber `n`'s task) and waits, bounded by
/// `--ready-timeout`, until each has its first snapshot or has failed.
pub(crate) async fn connect_all<F>(
    a: &PushArgs,
    server_pid: Option<u32>,
    live: &Live,
    notes: &mut Vec<String>,
    mut spawn: F,
) -> (Vec<JoinHandle<Seen>>, Connected)
where
    F: FnMut(usize) -> JoinHandle<Seen>,
{
    let meter = CpuMeter::start(server_pid);
    let started = Instant::now();
    let subs: Vec<_> = (0..a.watchers).map(&mut spawn).collect();
    live.wait_ready(started + a.ready_timeout).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = meter.stop();
    let ready = live.ready.load(Ordering::Relaxed);
    if ready < a.watchers {
        notes.push(format!(
            "push connect: only {ready} of {} subscribers had their snapshot after {secs:.1} s",
            a.watchers
        ));
    }
    (subs, Connected { ready, secs, cpu })
}

/// The writes of one run: K changes at R/s, one at a time, each acknowledged before the next.
pub(crate) struct Writes {
    /// (revision, sent, acknowledged) of every acknowledged write.
    pub(crate) acks: Vec<(u64, Instant, Instant)>,
    pub(crate) latency: Latency,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) secs: f64,
    pub(crate) cpu: CpuUsed,
}

/// Makes the `--changes` writes at `--rate`: `write(k)` performs change `k` and returns the
/// revision (or other key) the subscribers' events will carry for it.
pub(crate) async fn write_at_rate<F, Fut>(
    a: &PushArgs,
    server_pid: Option<u32>,
    notes: &mut Vec<String>,
    mut write: F,
) -> Writes
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<u64>>,
{
    let meter = CpuMeter::start(server_pid);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut w = Writes {
        acks: Vec::with_capacity(a.changes as usize),
        latency: Latency::new(),
        errors: 0,
        first_error: None,
        secs: 0.0,
        cpu: CpuUsed {
            server: None,
            bench: 0.0,
            wall: Duration::ZERO,
        },
    };
    let started = Instant::now();
    for k in 0..a.changes {
        tick.tick().await;
        if started.elapsed() > a.deadline {
            notes.push(format!(
                "push: writes stopped at the deadline after {k} changes"
            ));
            break;
        }
        let fut = write(k);
        let sent = Instant::now();
        let r = fut.await;
        let acked = Instant::now();
        w.latency.record(acked - sent);
        match r {
            Ok(rev) => w.acks.push((rev, sent, acked)),
            Err(e) => {
                w.errors += 1;
                w.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    w.secs = started.elapsed().as_secs_f64();
    w.cpu = meter.stop();
    w
}

/// Waits (bounded) until every live subscriber has the last acknowledged revision, stops them,
/// and accounts for every (subscriber, change) pair.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn finish(
    a: &PushArgs,
    server_pid: Option<u32>,
    live: &Live,
    stop_tx: watch::Sender<bool>,
    subs: Vec<JoinHandle<Seen>>,
    setup: Row,
    connected: Connected,
    writes: Writes,
    labels: Labels,
    mut notes: Vec<String>,
) -> PushResult {
    // Wait (bounded) until every live subscriber has the last revision.
    let meter = CpuMeter::start(server_pid);
    let acks = &writes.acks;
    let last = acks.iter().map(|a| a.0).max().unwrap_or(0);
    let drain_started = Instant::now();
    loop {
        let pending = (0..a.watchers)
            .filter(|&n| {
                !live.ended[n].load(Ordering::Relaxed)
                    && live.max_rev[n].load(Ordering::Relaxed) < last
            })
            .count();
        if pending == 0 || drain_started.elapsed() > a.drain_timeout {
            if pending > 0 {
                notes.push(format!(
                    "push: {pending} subscribers still lacked revision {last} {:?} after the last write",
                    a.drain_timeout
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain = drain_started.elapsed();
    let _ = stop_tx.send(true);
    let mut seen = Vec::with_capacity(a.watchers);
    for h in subs {
        match tokio::time::timeout(Duration::from_secs(30), h).await {
            Ok(Ok(s)) => seen.push(s),
            Ok(Err(e)) => seen.push(Seen {
                ended: Some(format!("task failed: {e}")),
                ..Seen::default()
            }),
            Err(_) => seen.push(Seen {
                ended: Some("did not stop within 30 s".into()),
                ..Seen::default()
            }),
        }
    }
    let drain_cpu = meter.stop();

    // Account for every (subscriber, change) pair.
    let ack_at: HashMap<u64, Instant> = acks.iter().map(|a| (a.0, a.2)).collect();
    let mut push = Latency::new();
    let mut from_send = Latency::new();
    let mut fanout: HashMap<u64, Instant> = HashMap::new();
    let mut connect = Latency::new();
    let (mut delivered, mut resynced, mut missing) = (0u64, 0u64, 0u64);
    let (mut early, mut duplicates, mut unordered, mut unexpected, mut resyncs) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut incomplete: Vec<String> = Vec::new();
    let mut ended_early: HashMap<String, usize> = HashMap::new();
    let mut bad_snapshots = 0usize;
    for (n, s) in seen.iter().enumerate() {
        if let Some(c) = s.connect {
            connect.record(c);
            if s.snapshot_instances as u64 != a.instances {
                bad_snapshots += 1;
            }
        }
        resyncs += u64::from(s.resyncs);
        let mut got: HashMap<u64, Instant> = HashMap::with_capacity(s.events.len());
        let mut prev = 0;
        for &(rev, at) in &s.events {
            if rev <= prev {
                unordered += 1;
            }
            prev = prev.max(rev);
            if !ack_at.contains_key(&rev) {
                unexpected += 1;
            }
            if got.insert(rev, at).is_some() {
                duplicates += 1;
            }
        }
        let mut lacking = Vec::new();
        for &(rev, sent, acked) in acks {
            if let Some(&at) = got.get(&rev) {
                delivered += 1;
                if at < acked {
                    early += 1;
                }
                push.record(at.saturating_duration_since(acked));
                from_send.record(at.saturating_duration_since(sent));
                let last = fanout.entry(rev).or_insert(at);
                *last = (*last).max(at);
            } else if rev <= s.resync_through {
                resynced += 1;
            } else {
                missing += 1;
                lacking.push(rev);
            }
        }
        if let Some(e) = &s.ended {
            *ended_early.entry(e.clone()).or_default() += 1;
        }
        if !lacking.is_empty() && incomplete.len() < 5 {
            incomplete.push(format!(
                "subscriber {n}: {} missing (first rev {}, last rev {}), snapshot rev {}, got {} events, ended: {}",
                lacking.len(),
                lacking[0],
                lacking[lacking.len() - 1],
                s.snapshot_rev,
                s.events.len(),
                s.ended.as_deref().unwrap_or("no")
            ));
        }
    }
    let mut fanout_latency = Latency::new();
    for (rev, last) in &fanout {
        fanout_latency.record(last.saturating_duration_since(ack_at[rev]));
    }
    let expected = acks.len() as u64 * a.watchers as u64;

    let params = format!(
        "W={} I={} R={}/s K={}",
        a.watchers, a.instances, a.rate, a.changes
    );
    let p = &labels.prefix;
    let watch_secs = writes.secs + drain.as_secs_f64();
    let watch_cpu = CpuUsed {
        server: writes.cpu.server.zip(drain_cpu.server).map(|(a, b)| a + b),
        bench: writes.cpu.bench + drain_cpu.bench,
        wall: writes.cpu.wall + drain_cpu.wall,
    };
    let mut rows = vec![setup];
    rows.push(Row {
        scenario: format!("{p}push connect (to 1st snapshot)"),
        params: format!(
            "W={} I={} concurrency={}",
            a.watchers, a.instances, a.connect_concurrency
        ),
        ops: connected.ready as u64,
        errors: (a.watchers - connected.ready) as u64,
        secs: connected.secs,
        unit: "subs/s",
        latency: connect,
        cpu: Some(connected.cpu),
    });
    rows.push(Row {
        scenario: format!("{p}push writes: {}", labels.write),
        params: params.clone(),
        ops: acks.len() as u64,
        errors: writes.errors,
        secs: writes.secs,
        unit: "writes/s",
        latency: writes.latency.clone(),
        cpu: Some(writes.cpu),
    });
    rows.push(Row {
        scenario: format!("{p}push latency (ack -> event), all pairs"),
        params: params.clone(),
        ops: delivered,
        errors: missing,
        secs: watch_secs,
        unit: "events/s",
        latency: push.clone(),
        cpu: Some(watch_cpu),
    });
    rows.push(Row {
        scenario: format!("{p}push latency (write sent -> event)"),
        params: params.clone(),
        ops: delivered,
        errors: missing,
        secs: watch_secs,
        unit: "events/s",
        latency: from_send.clone(),
        cpu: None,
    });
    rows.push(Row {
        scenario: format!("{p}push fan-out (ack -> last subscriber)"),
        params,
        ops: fanout_latency.count(),
        errors: acks.len() as u64 - fanout_latency.count(),
        secs: watch_secs,
        unit: "changes/s",
        latency: fanout_latency.clone(),
        cpu: None,
    });

    let achieved = acks.len() as f64 / writes.secs.max(1e-9);
    if achieved < 0.95 * a.rate {
        notes.push(format!(
            "target rate {}/s not reached: {achieved:.1} writes/s (writes are sequential, each waits for its ack; mean write {:.1} ms)",
            a.rate,
            1000.0 * writes.secs / acks.len().max(1) as f64
        ));
    }
    let pct = |x: u64| 100.0 * x as f64 / (expected.max(1)) as f64;
    notes.push(format!(
        "{p}delivered/expected: {delivered}/{expected} ({:.3}%) as events; covered by resync snapshots: {resynced} ({:.3}%); missing: {missing} ({:.3}%)",
        pct(delivered),
        pct(resynced),
        pct(missing)
    ));
    notes.push(format!(
        "{p}subscribers: {} via {}; writes acknowledged: {} of {} ({} failed{}); last revision {last}; all delivered {:.1} ms after the last ack",
        a.watchers,
        labels.subscribe,
        acks.len(),
        a.changes,
        writes.errors,
        writes
            .first_error
            .as_ref()
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default(),
        drain.as_secs_f64() * 1000.0
    ));
    notes.push(format!(
        "{p}events that arrived before their write's ack (latency counted as 0): {early}; duplicates: {duplicates}; out of order: {unordered}; unexpected revisions: {unexpected}; resync snapshots: {resyncs}; snapshots without {} instances: {bad_snapshots}",
        a.instances
    ));
    for (why, count) in &ended_early {
        notes.push(format!(
            "{p}{count} subscribers' streams ended before the stop: {why}"
        ));
    }
    notes.extend(incomplete);
    notes.extend(labels.notes);
    notes.push("fan-out row: per change, the time from its ack until the last subscriber had it; the last two rows cover the same period (and CPU) as the ack row".into());
    PushResult {
        rows,
        notes,
        ack: push,
        sent: from_send,
        fanout: fanout_latency,
        delivered,
        expected,
        resynced,
        missing,
        watchers: a.watchers,
        writes: acks.len(),
        cpu: watch_cpu,
        secs: watch_secs,
    }
}
