//! Scenario `xds`: N ADS streams (default 10,000; state of the world, delta, or both one after
//! the other) subscribed to ONE service's EDS resource (`ClusterLoadAssignment` named
//! `{service}.{namespace}`), multiplexed over HTTP/2 connections, while the tool changes that
//! service at a fixed rate through gRPC `UpdateStatus`.
//!
//! Every change is encoded in what the load assignment shows: change number `k` (1-based) sets
//! the *marker* instance's weight to `k + 1` (weight 1 is the state before the first change),
//! so each response a stream receives names the newest change it reflects. Every response is
//! ACKed (SotW: `version_info` + `response_nonce`; delta: `response_nonce`).
//!
//! Accounting, per (stream, change k): *delivered* when the stream received a response
//! reflecting change k or a later one; its latency is that response's arrival minus the write's
//! acknowledgement (and minus the moment it was sent). The server debounces and keeps a cursor,
//! not a queue, per stream, so intermediate states may be coalesced: a pair whose first
//! response covering k already shows a later change is delivered *coalesced* (the stream got
//! the newer state instead), and reported as such; a pair no response covered is *missing*.
//! Every stream must end with the final state.
//!
//! Besides latency it reports the server's RSS per stream (RSS with the streams open minus RSS
//! before, over N), server CPU seconds per stream-push during the change phase, and the CPU of
//! this tool, which shares the machine's cores with the server.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sextant_proto::v1 as pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::load::{self, NAMESPACE};
use crate::stats::{self, mib, print_table, CpuMeter, Latency, Row};
use crate::target::Target;

const CLA_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Instance 0 of the service is the marker: its weight carries the change number.
const MARKER: u64 = 0;
/// The largest weight the registry accepts bounds the number of changes.
const MAX_WEIGHT: u32 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// `StreamAggregatedResources` (state of the world; what gRPC clients speak).
    Sotw,
    /// `DeltaAggregatedResources` (incremental; what Envoy can speak).
    Delta,
    /// SotW, then delta, each on a service of its own on the same server.
    Both,
}

#[derive(Args, Debug, Clone)]
pub struct XdsArgs {
    /// ADS streams in all, each subscribed to the one service's EDS resource.
    #[arg(long, short = 'c', default_value_t = 10_000)]
    pub streams: usize,
    /// Which ADS variant the streams speak.
    #[arg(long, value_enum, default_value_t = Protocol::Both)]
    pub protocol: Protocol,
    /// Streams multiplexed on one HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    pub per_connection: usize,
    /// Streams opening at the same time (each until its first response).
    #[arg(long, default_value_t = 1000)]
    pub open_concurrency: usize,
    /// Instances of the watched service (over zones z0..z2 of region r1).
    #[arg(long, short = 'i', default_value_t = 10)]
    pub instances: u64,
    /// Changes per second (UpdateStatus of the marker's weight, one at a time).
    #[arg(long, short = 'r', default_value_t = 5.0)]
    pub rate: f64,
    /// Changes in all (at most 9,999: the weight carries the change number).
    #[arg(long, short = 'k', default_value_t = 50)]
    pub changes: u32,
    /// The zone the streams' node says it is in (region r1): decides endpoint priorities.
    #[arg(long, default_value = "z0")]
    pub zone: String,
    /// Longest wait for every stream's first response.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Longest wait, after the last write, for every stream to show the final state.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Longest the writes may take (they stop after that).
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
}

/// What one stream saw: the change number each response showed, with its arrival.
#[derive(Default)]
struct StreamLog {
    responses: Vec<(u32, Instant)>,
    /// Responses that could not be read (undecodable, no marker endpoint, wrong resource).
    bad: u64,
    error: Option<String>,
}

/// Counters every stream shares with the driver.
struct Shared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    responses: AtomicU64,
    /// Per stream, the newest change number it has seen (`u32::MAX`: none yet).
    seen: Vec<AtomicU32>,
}

pub async fn run(t: &Target, a: &XdsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.streams > 0
            && a.per_connection > 0
            && a.open_concurrency > 0
            && a.instances > 0
            && a.rate > 0.0
            && a.changes > 0,
        "sizes must be positive"
    );
    anyhow::ensure!(
        a.changes < MAX_WEIGHT,
        "at most {} changes: the weight carries the change number",
        MAX_WEIGHT - 1
    );
    let protocols: &[Protocol] = match a.protocol {
        Protocol::Both => &[Protocol::Sotw, Protocol::Delta],
        Protocol::Sotw => &[Protocol::Sotw],
        Protocol::Delta => &[Protocol::Delta],
    };
    for (n, p) in protocols.iter().enumerate() {
        let (rows, mut notes) = measure(t, a, *p).await?;
        if n > 0 {
            notes.push(
                "this server already held the previous variant's streams (closed now): RSS per \
                 stream may be understated by memory the allocator kept"
                    .into(),
            );
        }
        print_table(&format!("xds ({})", label(*p)), &rows, &notes);
    }
    Ok(())
}

fn label(p: Protocol) -> &'static str {
    match p {
        Protocol::Sotw => "sotw",
        Protocol::Delta => "delta",
        Protocol::Both => "both",
    }
}

async fn measure(t: &Target, a: &XdsArgs, p: Protocol) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let service = format!("xds-{}-{}", load::run_id(), label(p));
    let resource = format!("{service}.{NAMESPACE}");
    let mut notes = Vec::new();
    let mut rows = Vec::new();

    // 1. The watched service, its marker at weight 1 (change 0).
    let mut c = load::grpc_clients(&t.grpc, 1).await?.remove(0);
    load::register_service(c.clone(), &service, a.instances).await?;
    set_marker(&mut c, &service, 1)
        .await
        .context("setting the marker's first weight")?;
    let rss_before = t
        .pid
        .and_then(|p| stats::proc_status_bytes(p, "VmRSS").ok());

    // 2. Open the streams, `per_connection` on each HTTP/2 connection.
    let meter = CpuMeter::start(t.pid);
    let opened = Instant::now();
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        responses: AtomicU64::new(0),
        seen: (0..a.streams).map(|_| AtomicU32::new(u32::MAX)).collect(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let opening = Arc::new(tokio::sync::Semaphore::new(a.open_concurrency));
    let connections = a.streams.div_ceil(a.per_connection);
    let max_responses = u64::from(a.changes) * 2 + 16;
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
        let first = conn * a.per_connection;
        for s in first..(first + a.per_connection).min(a.streams) {
            let client = AggregatedDiscoveryServiceClient::new(channel.clone())
                .max_decoding_message_size(64 << 20);
            let stream = Stream {
                index: s,
                node: Node {
                    id: format!("bench-{s}"),
                    cluster: "sextant-bench".into(),
                    locality: Some(Locality {
                        region: "r1".into(),
                        zone: a.zone.clone(),
                        ..Default::default()
                    }),
                    user_agent_name: "sextant-bench".into(),
                    ..Default::default()
                },
                resource: resource.clone(),
                marker: load::host(MARKER),
                shared: shared.clone(),
                stop: stop_rx.clone(),
                max_responses,
            };
            let permit = opening.clone().acquire_owned().await?;
            handles.push(tokio::spawn(async move {
                match p {
                    Protocol::Delta => stream.delta(client, permit).await,
                    _ => stream.sotw(client, permit).await,
                }
            }));
        }
    }
    let deadline = Instant::now() + a.ready_timeout;
    while shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < a.streams {
        if Instant::now() >= deadline {
            let _ = stop_tx.send(true);
            anyhow::bail!(
                "only {} of {} streams got their first response within {:?} ({} failed)",
                shared.ready.load(Ordering::Relaxed),
                a.streams,
                a.ready_timeout,
                shared.failed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_cpu = meter.stop();
    let live = shared.ready.load(Ordering::Relaxed);
    rows.push(Row {
        scenario: format!(
            "xds {}: open streams to 1st EDS response (latency: HTTP/2 connects)",
            label(p)
        ),
        params: format!(
            "N={} on {connections} HTTP/2 connections, I={}",
            a.streams, a.instances
        ),
        ops: live as u64,
        errors: shared.failed.load(Ordering::Relaxed) as u64,
        secs: opened.elapsed().as_secs_f64(),
        unit: "streams/s",
        latency: connect_latency,
        cpu: Some(open_cpu),
    });
    // Let the last ACKs land before reading memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let (Some(pid), Some(before)) = (t.pid, rss_before) {
        let after = stats::proc_status_bytes(pid, "VmRSS")?;
        notes.push(format!(
            "server RSS {} before the streams, {} with {live} open: {:.1} KiB per stream",
            mib(before),
            mib(after),
            after.saturating_sub(before) as f64 / 1024.0 / live.max(1) as f64
        ));
    }

    // 3. Changes at a fixed rate, one at a time: change k sets the marker's weight to k + 1.
    let responses_before = shared.responses.load(Ordering::Relaxed);
    let meter = CpuMeter::start(t.pid);
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / a.rate);
    let mut writes: Vec<(u32, Instant, Instant)> = Vec::with_capacity(a.changes as usize);
    let mut write_latency = Latency::new();
    let mut write_errors = 0u64;
    let mut first_write_error = None;
    for k in 1..=a.changes {
        if started.elapsed() > a.deadline {
            notes.push(format!(
                "writes stopped at the deadline of {:?} after {} of {}",
                a.deadline,
                k - 1,
                a.changes
            ));
            break;
        }
        tokio::time::sleep_until(started + every.mul_f64(f64::from(k - 1))).await;
        let sent = Instant::now();
        let r = set_marker(&mut c, &service, k + 1).await;
        let acked = Instant::now();
        write_latency.record(acked - sent);
        match r {
            Ok(()) => writes.push((k, sent, acked)),
            Err(e) => {
                write_errors += 1;
                first_write_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    if let Some(e) = first_write_error {
        notes.push(format!("{write_errors} writes failed; first: {e}"));
    }
    let last = writes.last().map(|w| w.0).unwrap_or(0);
    let drain = Instant::now() + a.drain_timeout;
    let caught_up = |shared: &Shared| {
        shared
            .seen
            .iter()
            .filter(|s| {
                let v = s.load(Ordering::Relaxed);
                v != u32::MAX && v >= last
            })
            .count()
    };
    while caught_up(&shared) < live && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let push_cpu = meter.stop();
    let pushes = shared.responses.load(Ordering::Relaxed) - responses_before;
    let with_final = caught_up(&shared);
    rows.push(Row {
        scenario: format!("xds {}: writes (UpdateStatus weight)", label(p)),
        params: format!("K={} R={}/s", a.changes, a.rate),
        ops: writes.len() as u64,
        errors: write_errors,
        secs: started.elapsed().as_secs_f64(),
        unit: "writes/s",
        latency: write_latency,
        cpu: Some(push_cpu),
    });

    // 4. Stop the streams and account for every (stream, change) pair.
    let _ = stop_tx.send(true);
    let mut from_ack = Latency::new();
    let mut from_sent = Latency::new();
    let mut to_last = vec![Duration::ZERO; writes.len()];
    let (mut delivered, mut coalesced, mut missing) = (0u64, 0u64, 0u64);
    let (mut bad, mut backwards, mut repeated) = (0u64, 0u64, 0u64);
    let mut stream_errors = 0u64;
    let mut first_stream_error = None;
    let mut example_missing = None;
    for (s, h) in handles.into_iter().enumerate() {
        let log = match tokio::time::timeout(Duration::from_secs(30), h).await {
            Ok(Ok(log)) => log,
            Ok(Err(e)) => StreamLog {
                error: Some(format!("stream task failed: {e}")),
                ..Default::default()
            },
            Err(_) => StreamLog {
                error: Some("stream task did not stop within 30 s".into()),
                ..Default::default()
            },
        };
        bad += log.bad;
        if let Some(e) = log.error {
            stream_errors += 1;
            first_stream_error.get_or_insert(e);
        }
        for w in log.responses.windows(2) {
            match w[1].0.cmp(&w[0].0) {
                std::cmp::Ordering::Less => backwards += 1,
                std::cmp::Ordering::Equal => repeated += 1,
                std::cmp::Ordering::Greater => {}
            }
        }
        let mut j = 0;
        for (n, (k, sent, acked)) in writes.iter().enumerate() {
            while j < log.responses.len() && log.responses[j].0 < *k {
                j += 1;
            }
            let Some((shown, at)) = log.responses.get(j) else {
                missing += 1;
                example_missing.get_or_insert((s, *k));
                continue;
            };
            delivered += 1;
            if shown > k {
                coalesced += 1;
            }
            let d = at.saturating_duration_since(*acked);
            from_ack.record(d);
            from_sent.record(at.saturating_duration_since(*sent));
            to_last[n] = to_last[n].max(d);
        }
    }
    let mut last_latency = Latency::new();
    for d in &to_last {
        last_latency.record(*d);
    }
    let expected = writes.len() as u64 * live as u64;
    let phase = push_cpu.wall.as_secs_f64();
    let pairs = format!("{live} streams x {} changes", writes.len());
    for (name, latency) in [
        ("push latency (write ack -> EDS response)", from_ack),
        ("push latency (write sent -> EDS response)", from_sent),
    ] {
        rows.push(Row {
            scenario: format!("xds {}: {name}", label(p)),
            params: pairs.clone(),
            ops: latency.count(),
            errors: missing,
            secs: phase,
            unit: "pairs/s",
            latency,
            cpu: None,
        });
    }
    rows.push(Row {
        scenario: format!(
            "xds {}: write ack -> last stream has it (per change)",
            label(p)
        ),
        params: format!("{} changes", writes.len()),
        ops: last_latency.count(),
        errors: 0,
        secs: phase,
        unit: "",
        latency: last_latency,
        cpu: None,
    });
    notes.push(format!(
        "delivered/expected (stream, change) pairs: {delivered}/{expected} ({:.3}%), of which \
         {coalesced} coalesced (first seen as a later change); missing {missing}{}; streams \
         showing the final change {last}: {with_final}/{live}",
        100.0 * delivered as f64 / expected.max(1) as f64,
        example_missing
            .map(|(s, k)| format!(" (e.g. stream {s}, change {k})"))
            .unwrap_or_default()
    ));
    notes.push(format!(
        "EDS responses in the change phase: {pushes} ({:.2} per stream per change); \
         repeated {repeated}, out of order {backwards}, unreadable {bad}",
        pushes as f64 / expected.max(1) as f64
    ));
    if let Some(server) = push_cpu.server {
        notes.push(format!(
            "server CPU in the change phase {server:.2} s over {phase:.1} s ({:.0}% of a core) = \
             {:.1} µs per stream-push; bench CPU {:.2} s ({:.0}%) = {:.1} µs per push received",
            100.0 * server / phase.max(1e-9),
            1e6 * server / pushes.max(1) as f64,
            push_cpu.bench,
            100.0 * push_cpu.bench / phase.max(1e-9),
            1e6 * push_cpu.bench / pushes.max(1) as f64,
        ));
    }
    if let Some(e) = first_stream_error {
        notes.push(format!(
            "{stream_errors} streams ended with an error; first: {e}"
        ));
    }
    Ok((rows, notes))
}

/// Sets the marker instance's weight (the change number + 1).
async fn set_marker(c: &mut crate::load::Grpc, service: &str, weight: u32) -> anyhow::Result<()> {
    c.update_status(pb::UpdateStatusRequest {
        service: Some(pb::ServiceRef {
            namespace: NAMESPACE.into(),
            service: service.into(),
        }),
        id: format!("i{MARKER}"),
        weight: Some(weight),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// One ADS stream of the bench.
struct Stream {
    index: usize,
    node: Node,
    resource: String,
    /// The marker instance's IP address as the load assignment shows it.
    marker: String,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    max_responses: u64,
}

impl Stream {
    /// The change number a load assignment shows: the marker's endpoint weight - 1.
    fn change_shown(&self, any: Option<&Any>) -> Option<u32> {
        let any = any?;
        if any.type_url != CLA_TYPE {
            return None;
        }
        let cla = ClusterLoadAssignment::decode(any.value.as_slice()).ok()?;
        if cla.cluster_name != self.resource {
            return None;
        }
        cla.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .find_map(|e| {
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    return None;
                };
                let Some(address::Address::SocketAddress(sa)) =
                    ep.address.as_ref()?.address.as_ref()
                else {
                    return None;
                };
                let port_ok = matches!(
                    sa.port_specifier,
                    Some(socket_address::PortSpecifier::PortValue(8080))
                );
                (sa.address == self.marker && port_ok)
                    .then(|| e.load_balancing_weight.as_ref().map(|w| w.value))
                    .flatten()
            })?
            .checked_sub(1)
    }

    /// Records one response; returns false when the stream should end (count bound).
    fn record(&self, log: &mut StreamLog, shown: Option<u32>, at: Instant) -> bool {
        match shown {
            Some(k) => {
                if log.responses.is_empty() {
                    self.shared.ready.fetch_add(1, Ordering::Relaxed);
                }
                log.responses.push((k, at));
                self.shared.responses.fetch_add(1, Ordering::Relaxed);
                let seen = &self.shared.seen[self.index];
                let prev = seen.load(Ordering::Relaxed);
                if prev == u32::MAX || k > prev {
                    seen.store(k, Ordering::Relaxed);
                }
            }
            None => log.bad += 1,
        }
        (log.responses.len() as u64 + log.bad) < self.max_responses
    }

    fn failed(&self, log: &mut StreamLog, e: String) {
        if log.responses.is_empty() {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        log.error = Some(e);
    }

    async fn sotw(
        mut self,
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> StreamLog {
        let mut permit = Some(permit);
        let mut log = StreamLog::default();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let resource = self.resource.clone();
        let request =
            |version_info: String, response_nonce: String, node: Option<Node>| DiscoveryRequest {
                version_info,
                node,
                resource_names: vec![resource.clone()],
                type_url: CLA_TYPE.into(),
                response_nonce,
                ..Default::default()
            };
        if tx
            .unbounded_send(request(
                String::new(),
                String::new(),
                Some(self.node.clone()),
            ))
            .is_err()
        {
            self.failed(&mut log, "request channel closed".into());
            return log;
        }
        let mut inbound = match client.stream_aggregated_resources(rx).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                self.failed(&mut log, format!("opening the stream: {e}"));
                return log;
            }
        };
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = self.stop.changed() => return log,
            };
            match next {
                Ok(Some(resp)) => {
                    let at = Instant::now();
                    let shown = if resp.resources.len() == 1 {
                        self.change_shown(resp.resources.first())
                    } else {
                        None
                    };
                    permit.take();
                    let more = self.record(&mut log, shown, at);
                    let ack = request(resp.version_info, resp.nonce, None);
                    if tx.unbounded_send(ack).is_err() || !more {
                        return log;
                    }
                }
                Ok(None) => {
                    self.failed(&mut log, "the server ended the stream".into());
                    return log;
                }
                Err(e) => {
                    self.failed(&mut log, format!("stream error: {e}"));
                    return log;
                }
            }
        }
    }

    async fn delta(
        mut self,
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> StreamLog {
        let mut permit = Some(permit);
        let mut log = StreamLog::default();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let first = DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: CLA_TYPE.into(),
            resource_names_subscribe: vec![self.resource.clone()],
            ..Default::default()
        };
        if tx.unbounded_send(first).is_err() {
            self.failed(&mut log, "request channel closed".into());
            return log;
        }
        let mut inbound = match client.delta_aggregated_resources(rx).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                self.failed(&mut log, format!("opening the stream: {e}"));
                return log;
            }
        };
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = self.stop.changed() => return log,
            };
            match next {
                Ok(Some(resp)) => {
                    let at = Instant::now();
                    let shown = match resp.resources.as_slice() {
                        [r] if r.name == self.resource => self.change_shown(r.resource.as_ref()),
                        _ => None,
                    };
                    permit.take();
                    let more = self.record(&mut log, shown, at);
                    let ack = DeltaDiscoveryRequest {
                        type_url: CLA_TYPE.into(),
                        response_nonce: resp.nonce,
                        ..Default::default()
                    };
                    if tx.unbounded_send(ack).is_err() || !more {
                        return log;
                    }
                }
                Ok(None) => {
                    self.failed(&mut log, "the server ended the stream".into());
                    return log;
                }
                Err(e) => {
                    self.failed(&mut log, format!("stream error: {e}"));
                    return log;
                }
            }
        }
    }
}
