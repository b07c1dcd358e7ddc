//! Scenario `connections`: C concurrent gRPC Watch streams (default 50,000) on one node, many
//! streams multiplexed per HTTP/2 connection (so the file-descriptor limit bounds connections,
//! not streams). It reports the server's memory per open stream, then changes instance statuses
//! at a fixed rate and measures push latency at that count and delivered/expected over every
//! (stream, change) pair.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sextant_proto::v1 as pb;
use tokio::time::Instant;

use crate::load::{self, NAMESPACE};
use crate::stats::{self, mib, print_table, CpuMeter, Latency, Row};
use crate::target::Target;

#[derive(Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Watch streams in all.
    #[arg(long, short = 'c', default_value_t = 50_000)]
    pub streams: usize,
    /// Streams multiplexed on one HTTP/2 connection.
    #[arg(long, default_value_t = 500)]
    pub per_connection: usize,
    /// Instances of the watched service.
    #[arg(long, short = 'i', default_value_t = 100)]
    pub instances: u64,
    /// Status changes per second.
    #[arg(long, short = 'r', default_value_t = 5.0)]
    pub rate: f64,
    /// Status changes in all.
    #[arg(long, short = 'k', default_value_t = 50)]
    pub changes: u64,
    /// Longest wait for every stream's first snapshot.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Longest wait, after the last write, for every stream to receive it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

/// What one stream saw: (revision, arrival) of every event after its snapshot.
type Arrivals = Vec<(u64, Instant)>;

pub async fn run(t: &Target, a: &ConnectionsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.streams > 0 && a.per_connection > 0 && a.instances > 0 && a.rate > 0.0,
        "sizes must be positive"
    );
    let run = load::run_id();
    let service = format!("conn-{run}");
    let mut notes = Vec::new();
    let mut rows = Vec::new();

    // 1. The watched service.
    let mut c = load::grpc_clients(&t.grpc, 1).await?.remove(0);
    load::register_service(c.clone(), &service, a.instances).await?;
    let rss_before = t
        .pid
        .and_then(|p| stats::proc_status_bytes(p, "VmRSS").ok());

    // 2. Open the streams: each connection carries `per_connection` of them.
    let meter = CpuMeter::start(t.pid);
    let opened = Instant::now();
    let ready = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let connections = a.streams.div_ceil(a.per_connection);
    let mut handles = Vec::with_capacity(a.streams);
    let mut connect_latency = Latency::new();
    for conn in 0..connections {
        let t0 = Instant::now();
        let channel = crate::load::endpoint(&t.grpc)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| format!("connection {conn}"))?;
        connect_latency.record(t0.elapsed());
        let n = a.per_connection.min(a.streams - conn * a.per_connection);
        for _ in 0..n {
            let mut client =
                crate::load::grpc_client(channel.clone())?.max_decoding_message_size(64 << 20);
            let svc = service.clone();
            let (ready, failed, events) = (ready.clone(), failed.clone(), events.clone());
            let mut stop = stop_rx.clone();
            handles.push(tokio::spawn(async move {
                let req = pb::WatchRequest {
                    services: vec![pb::ServiceRef {
                        namespace: NAMESPACE.into(),
                        service: svc,
                    }],
                    since: None,
                };
                let mut arrivals: Arrivals = Vec::new();
                let mut stream = match client.watch(req).await {
                    Ok(s) => s.into_inner(),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return arrivals;
                    }
                };
                let mut snapshot = false;
                loop {
                    let next = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.changed() => return arrivals,
                    };
                    match next {
                        Ok(Some(ev)) => {
                            let now = Instant::now();
                            match ev.kind {
                                Some(pb::watch_event::Kind::Snapshot(_)) if !snapshot => {
                                    snapshot = true;
                                    ready.fetch_add(1, Ordering::Relaxed);
                                }
                                Some(pb::watch_event::Kind::Snapshot(_)) => {}
                                Some(_) => {
                                    arrivals.push((ev.revision, now));
                                    events.fetch_add(1, Ordering::Relaxed);
                                }
                                None => {}
                            }
                        }
                        _ => {
                            if !snapshot {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            return arrivals;
                        }
                    }
                }
            }));
        }
    }
    let deadline = Instant::now() + a.ready_timeout;
    while ready.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < a.streams {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} streams got their snapshot within {:?} ({} failed)",
            ready.load(Ordering::Relaxed),
            a.streams,
            a.ready_timeout,
            failed.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open_cpu = meter.stop();
    let live = ready.load(Ordering::Relaxed);
    rows.push(Row {
        scenario: "connections: open streams (to 1st snapshot)".into(),
        params: format!(
            "C={} on {connections} HTTP/2 connections, I={}",
            a.streams, a.instances
        ),
        ops: live as u64,
        errors: failed.load(Ordering::Relaxed) as u64,
        secs: opened.elapsed().as_secs_f64(),
        unit: "streams/s",
        latency: connect_latency,
        cpu: Some(open_cpu),
    });
    if let (Some(pid), Some(before)) = (t.pid, rss_before) {
        let after = stats::proc_status_bytes(pid, "VmRSS")?;
        notes.push(format!(
            "server RSS {} before the streams, {} with {live} open: {:.1} KiB per stream",
            mib(before),
            mib(after),
            after.saturating_sub(before) as f64 / 1024.0 / live.max(1) as f64
        ));
    }

    // 3. Changes at a fixed rate, one at a time.
    let meter = CpuMeter::start(t.pid);
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / a.rate);
    let mut writes = Vec::with_capacity(a.changes as usize); // (revision, sent, acked)
    let mut write_latency = Latency::new();
    let mut write_errors = 0;
    for k in 0..a.changes {
        tokio::time::sleep_until(started + every * k as u32).await;
        let sent = Instant::now();
        let r = c
            .update_status(pb::UpdateStatusRequest {
                service: Some(pb::ServiceRef {
                    namespace: NAMESPACE.into(),
                    service: service.clone(),
                }),
                id: format!("i{}", k % a.instances),
                // Each round over the instances uses a range the previous round did not, so
                // every write changes something (an unchanged status emits no event).
                weight: Some(
                    if (k / a.instances).is_multiple_of(2) {
                        1
                    } else {
                        51
                    } + (k % 50) as u32,
                ),
                ..Default::default()
            })
            .await;
        let acked = Instant::now();
        write_latency.record(acked - sent);
        match r {
            Ok(r) => writes.push((r.into_inner().revision, sent, acked)),
            Err(_) => write_errors += 1,
        }
    }
    let expected = writes.len() as u64 * live as u64;
    let drain = Instant::now() + a.drain_timeout;
    while events.load(Ordering::Relaxed) < expected && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let push_cpu = meter.stop();
    rows.push(Row {
        scenario: "connections: writes (UpdateStatus)".into(),
        params: format!("K={} R={}/s", a.changes, a.rate),
        ops: writes.len() as u64,
        errors: write_errors,
        secs: started.elapsed().as_secs_f64(),
        unit: "writes/s",
        latency: write_latency,
        cpu: Some(push_cpu),
    });

    // 4. Stop the readers and account for every pair.
    let _ = stop_tx.send(true);
    let by_rev: std::collections::HashMap<u64, (Instant, Instant)> =
        writes.iter().map(|(r, s, a)| (*r, (*s, *a))).collect();
    let mut from_ack = Latency::new();
    let mut from_sent = Latency::new();
    let mut delivered = 0u64;
    for h in handles {
        if let Ok(arrivals) = h.await {
            for (rev, at) in arrivals {
                if let Some((sent, acked)) = by_rev.get(&rev) {
                    delivered += 1;
                    from_ack.record(at.saturating_duration_since(*acked));
                    from_sent.record(at.saturating_duration_since(*sent));
                }
            }
        }
    }
    let counted = delivered;
    rows.push(Row {
        scenario: "connections: push latency (ack -> event)".into(),
        params: format!("{live} streams x {} changes", writes.len()),
        ops: from_ack.count(),
        errors: 0,
        secs: push_cpu.wall.as_secs_f64(),
        unit: "events/s",
        latency: from_ack,
        cpu: None,
    });
    rows.push(Row {
        scenario: "connections: push latency (write sent -> event)".into(),
        params: format!("{live} streams x {} changes", writes.len()),
        ops: from_sent.count(),
        errors: 0,
        secs: push_cpu.wall.as_secs_f64(),
        unit: "events/s",
        latency: from_sent,
        cpu: None,
    });
    notes.push(format!(
        "delivered/expected: {counted}/{expected} ({:.3}%); latency computed over {delivered} pairs",
        100.0 * counted as f64 / expected.max(1) as f64
    ));
    print_table("connections", &rows, &notes);
    Ok(())
}
