//! Scenario `consul`: Sextant's Consul face, in two phases.
//!
//! 1. Blocking wakeups. A service of I instances is registered through Consul's agent API;
//!    W watchers, each on its own HTTP/1.1 connection, long-poll
//!    `GET /v1/health/service/<name>?index=<last X-Consul-Index>&wait=60s` as Consul clients
//!    do; a writer then toggles one instance's maintenance mode K times at R/s and keeps, per
//!    change, its acknowledgement time and the `X-Consul-Index` of the PUT's answer. Accounting
//!    per (watcher, change): *delivered* when an answer with an index at or past the change's
//!    arrives (latency: that arrival minus the ack, clamped at 0), *coalesced* when that
//!    answer already covers the next change too (a blocking query answers the newest state,
//!    not a queue), *missing* when no answer covered it. Also: server RSS per watcher and CPU
//!    per answer, and this tool's CPU.
//! 2. DNS queries/s. C UDP clients, each with one query in flight, ask `A <svc>.service.consul`
//!    (I instances) for D seconds: queries/s, latency, errors and timeouts, CPU of each side.
//!    With `--dnsmasq PATH` the same load runs against dnsmasq (started by this tool on a free
//!    loopback port, the same I addresses as `--host-record`s), and the ratios are printed.
//!
//! No real Consul can be had on the machines this was written on (no Debian package; its
//! downloads are out of reach), so the peer is dnsmasq for DNS and none for blocking queries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::h1;
use crate::load;
use crate::stats::{self, mib, print_table, CpuMeter, CpuUsed, Latency, Row};
use crate::target::Target;

/// Instance addresses are 10.77.0.1.. : one octet, and ten A records fit a UDP answer.
const MAX_INSTANCES: u32 = 250;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// Blocking-query wakeups, then DNS.
    Both,
    /// Blocking-query wakeups only.
    Watch,
    /// DNS queries/s only.
    Dns,
}

#[derive(Args, Debug, Clone)]
pub struct ConsulArgs {
    /// Consul HTTP API of a running node [default: the spawned server's, else 127.0.0.1:8500].
    #[arg(long)]
    pub consul: Option<SocketAddr>,
    /// DNS listener of a running node [default: the spawned server's, else 127.0.0.1:8600].
    #[arg(long)]
    pub dns: Option<SocketAddr>,
    /// Which phases run.
    #[arg(long, value_enum, default_value_t = Phase::Both)]
    pub phase: Phase,
    /// Watchers, each a long-poll loop on its own HTTP/1.1 connection.
    #[arg(long, short = 'w', default_value_t = 1000)]
    pub watchers: usize,
    /// Instances of each service (at most 250).
    #[arg(long, short = 'i', default_value_t = 10)]
    pub instances: u32,
    /// Changes in all (maintenance on, off, on, ... of the first instance).
    #[arg(long, short = 'k', default_value_t = 50)]
    pub changes: u32,
    /// Changes per second, one at a time.
    #[arg(long, short = 'r', default_value_t = 5.0)]
    pub rate: f64,
    /// The blocking queries' `?wait=` (whole seconds).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Watchers opening at the same time (each until its first answer).
    #[arg(long, default_value_t = 200)]
    pub open_concurrency: usize,
    /// Longest wait for every watcher's first answer.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Longest wait, after the last change, for every watcher to see it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Concurrent DNS clients (UDP, one query in flight each).
    #[arg(long, short = 'c', default_value_t = 64)]
    pub dns_clients: usize,
    /// How long each DNS load runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub dns_duration: Duration,
    /// A DNS query not answered within this counts as a timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub dns_timeout: Duration,
    /// The dnsmasq binary, to run the DNS load against it too (skipped with a note if absent).
    #[arg(long, default_value = "/usr/sbin/dnsmasq")]
    pub dnsmasq: PathBuf,
}

pub async fn run(t: &Target, a: &ConsulArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.watchers > 0
            && a.instances > 0
            && a.changes > 0
            && a.rate > 0.0
            && a.open_concurrency > 0
            && a.dns_clients > 0,
        "sizes must be positive"
    );
    anyhow::ensure!(
        a.instances <= MAX_INSTANCES,
        "at most {MAX_INSTANCES} instances"
    );
    anyhow::ensure!(a.wait >= Duration::from_secs(1), "--wait: at least 1s");
    let consul = a
        .consul
        .or(t.consul)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8500)));
    let dns = a
        .dns
        .or(t.dns)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8600)));
    println!("consul http {consul}, dns {dns}");
    let no_consul = "no real Consul binary can be had on this machine (no Debian package; \
                     GitHub and the Go module proxy are unreachable): there is no Consul column"
        .to_string();
    if a.phase != Phase::Dns {
        let (rows, mut notes) = watch_phase(t, consul, a).await?;
        notes.push(no_consul.clone());
        print_table("consul: blocking-query wakeups", &rows, &notes);
    }
    if a.phase != Phase::Watch {
        let (rows, mut notes) = dns_phase(t, consul, dns, a).await?;
        notes.push(no_consul);
        print_table("consul: DNS queries/s", &rows, &notes);
    }
    Ok(())
}

// ---- HTTP -------------------------------------------------------------------------------

/// One keep-alive HTTP/1.1 connection, reopened after a failure.
struct Conn {
    addr: SocketAddr,
    host: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// An answer: status, its `X-Consul-Index`, and the body.
struct Answer {
    status: hyper::StatusCode,
    index: Option<u64>,
    body: Bytes,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            sender: None,
        }
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> anyhow::Result<Answer> {
        let r = tokio::time::timeout(timeout, async {
            let sender = match self.sender.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => self.sender.insert(h1::connect(self.addr).await?),
            };
            sender.ready().await.context("connection not ready")?;
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, self.host.as_str())
                .body(Full::new(body.unwrap_or_default()))
                .context("building the request")?;
            let resp = sender.send_request(req).await.context("sending")?;
            let status = resp.status();
            let index = resp
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = resp
                .into_body()
                .collect()
                .await
                .context("reading the body")?
                .to_bytes();
            anyhow::Ok(Answer {
                status,
                index,
                body,
            })
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {timeout:?}")));
        if r.is_err() {
            // A failed exchange may leave the connection mid-message.
            self.sender = None;
        }
        r
    }

    /// A PUT that must answer 200; its `X-Consul-Index`.
    async fn put(&mut self, path: &str, body: Option<Bytes>) -> anyhow::Result<u64> {
        let a = self
            .call(Method::PUT, path, body, Duration::from_secs(30))
            .await?;
        if a.status != hyper::StatusCode::OK {
            bail!(
                "PUT {path}: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        a.index
            .with_context(|| format!("PUT {path}: no X-Consul-Index"))
    }
}

fn address(i: u32) -> String {
    format!("10.77.0.{}", i + 1)
}

fn instance_id(service: &str, i: u32) -> String {
    format!("{service}-{i}")
}

/// Registers `instances` instances of `service` through Consul's agent API.
async fn register(c: &mut Conn, service: &str, instances: u32) -> anyhow::Result<()> {
    for i in 0..instances {
        let body = serde_json::json!({
            "ID": instance_id(service, i),
            "Name": service,
            "Address": address(i),
            "Port": 8080,
            "Tags": ["bench"],
            "Meta": {"version": "1.0.0"},
        });
        c.put("/v1/agent/service/register", Some(body.to_string().into()))
            .await
            .with_context(|| format!("registering {} through Consul", instance_id(service, i)))?;
    }
    Ok(())
}

// ---- phase 1: blocking wakeups ----------------------------------------------------------

/// A write, as the writer saw it.
#[derive(Clone, Copy, Debug)]
struct Change {
    /// `X-Consul-Index` of the write's answer: an answer at or past it reflects the write.
    index: u64,
    sent: Instant,
    acked: Instant,
}

/// What one watcher saw: each answer's index and arrival, in arrival order.
#[derive(Default)]
struct WatchLog {
    answers: Vec<(u64, Instant)>,
    /// Answers that were not a 200 with an index and a JSON array.
    bad: u64,
    errors: u64,
    error: Option<String>,
}

/// Counters every watcher shares with the driver.
struct Shared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    answers: AtomicU64,
    /// Per watcher, the newest index it has seen (0: none yet).
    seen: Vec<AtomicU64>,
}

/// Per (watcher, change) results over all watchers.
struct Tally {
    delivered: u64,
    coalesced: u64,
    missing: u64,
    /// Pairs whose answer arrived before the writer had its ack (latency clamped to 0).
    clamped: u64,
    latency: Latency,
    /// From the moment the write was sent: the server answers watchers before the writer.
    from_sent: Latency,
    /// Per change, the latency to the last watcher that got it.
    to_last: Vec<Duration>,
}

impl Tally {
    fn new(changes: usize) -> Self {
        Self {
            delivered: 0,
            coalesced: 0,
            missing: 0,
            clamped: 0,
            latency: Latency::new(),
            from_sent: Latency::new(),
            to_last: vec![Duration::ZERO; changes],
        }
    }

    /// Accounts one watcher's answers against every change (both in time order).
    fn add(&mut self, changes: &[Change], answers: &[(u64, Instant)]) {
        let mut j = 0;
        for (n, c) in changes.iter().enumerate() {
            while j < answers.len() && answers[j].0 < c.index {
                j += 1;
            }
            let Some(&(index, at)) = answers.get(j) else {
                self.missing += 1;
                continue;
            };
            self.delivered += 1;
            if changes.get(n + 1).is_some_and(|next| index >= next.index) {
                self.coalesced += 1;
            }
            if at < c.acked {
                self.clamped += 1;
            }
            let d = at.saturating_duration_since(c.acked);
            self.latency.record(d);
            self.from_sent.record(at.saturating_duration_since(c.sent));
            self.to_last[n] = self.to_last[n].max(d);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn watcher(
    w: usize,
    addr: SocketAddr,
    path: Arc<str>,
    wait_secs: u64,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
    max_answers: usize,
) -> WatchLog {
    let mut log = WatchLog::default();
    let mut conn = Conn::new(addr);
    // Consul answers within wait + wait/16; the rest is slack for a loaded machine.
    let timeout = Duration::from_secs(wait_secs + wait_secs / 16 + 30);
    let mut permit = Some(permit);
    let mut index = 0u64;
    let mut failures = 0u32;
    while log.answers.len() < max_answers && failures < 5 && !*stop.borrow() {
        let url = if index == 0 {
            path.to_string()
        } else {
            format!("{path}?index={index}&wait={wait_secs}s")
        };
        let r = tokio::select! {
            r = conn.call(Method::GET, &url, None, timeout) => r,
            _ = stop.changed() => break,
        };
        let at = Instant::now();
        match r {
            Ok(a) => {
                let good = a.status == hyper::StatusCode::OK && a.body.first() == Some(&b'[');
                match a.index.filter(|_| good) {
                    Some(i) => {
                        index = i;
                        log.answers.push((i, at));
                        shared.answers.fetch_add(1, Ordering::Relaxed);
                        shared.seen[w].fetch_max(i, Ordering::Relaxed);
                        if permit.take().is_some() {
                            shared.ready.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => {
                        log.bad += 1;
                        failures += 1;
                    }
                }
            }
            Err(e) => {
                log.errors += 1;
                failures += 1;
                log.error.get_or_insert_with(|| format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if permit.is_some() {
        shared.failed.fetch_add(1, Ordering::Relaxed);
    }
    log
}

async fn watch_phase(
    t: &Target,
    consul: SocketAddr,
    a: &ConsulArgs,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let service = format!("consul-watch-{}", load::run_id());
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut writer = Conn::new(consul);
    register(&mut writer, &service, a.instances).await?;
    let rss_before = t
        .pid
        .and_then(|p| stats::proc_status_bytes(p, "VmRSS").ok());

    // Open the watchers: each takes its first answer (no index), then long-polls.
    let meter = CpuMeter::start(t.pid);
    let opened = Instant::now();
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        answers: AtomicU64::new(0),
        seen: (0..a.watchers).map(|_| AtomicU64::new(0)).collect(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let opening = Arc::new(tokio::sync::Semaphore::new(a.open_concurrency));
    let path: Arc<str> = format!("/v1/health/service/{service}").into();
    let wait_secs = a.wait.as_secs().max(1);
    // Two answers per change at most (plus wait expiries): bounds each loop.
    let max_answers = a.changes as usize * 2 + 16;
    let mut handles = Vec::with_capacity(a.watchers);
    for w in 0..a.watchers {
        let permit = opening.clone().acquire_owned().await?;
        handles.push(tokio::spawn(watcher(
            w,
            consul,
            path.clone(),
            wait_secs,
            shared.clone(),
            stop_rx.clone(),
            permit,
            max_answers,
        )));
    }
    let deadline = Instant::now() + a.ready_timeout;
    while shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < a.watchers
    {
        if Instant::now() >= deadline {
            let _ = stop_tx.send(true);
            bail!(
                "only {} of {} watchers got their first answer within {:?} ({} failed)",
                shared.ready.load(Ordering::Relaxed),
                a.watchers,
                a.ready_timeout,
                shared.failed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_cpu = meter.stop();
    let live = shared.ready.load(Ordering::Relaxed);
    rows.push(Row {
        scenario: "consul watch: open watchers to 1st answer".into(),
        params: format!("W={} I={}", a.watchers, a.instances),
        ops: live as u64,
        errors: shared.failed.load(Ordering::Relaxed) as u64,
        secs: opened.elapsed().as_secs_f64(),
        unit: "watchers/s",
        latency: Latency::new(),
        cpu: Some(open_cpu),
    });
    // Let the watchers park their next query before reading memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_open = t
        .pid
        .and_then(|p| stats::proc_status_bytes(p, "VmRSS").ok());
    if let (Some(before), Some(after)) = (rss_before, rss_open) {
        notes.push(format!(
            "server RSS {} before the watchers, {} with {live} parked: {:.1} KiB per watcher",
            mib(before),
            mib(after),
            after.saturating_sub(before) as f64 / 1024.0 / live.max(1) as f64
        ));
    }

    // The changes, at a fixed rate: maintenance of the first instance on, off, on, ...
    let answers_before = shared.answers.load(Ordering::Relaxed);
    let meter = CpuMeter::start(t.pid);
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / a.rate);
    let id = instance_id(&service, 0);
    let mut changes: Vec<Change> = Vec::with_capacity(a.changes as usize);
    let mut write_latency = Latency::new();
    let mut write_errors = 0u64;
    let mut first_write_error = None;
    for k in 1..=a.changes {
        tokio::time::sleep_until(started + every.mul_f64(f64::from(k - 1))).await;
        let sent = Instant::now();
        let path = format!(
            "/v1/agent/service/maintenance/{id}?enable={}&reason=bench",
            k % 2 == 1
        );
        let r = writer.put(&path, None).await;
        let acked = Instant::now();
        write_latency.record(acked - sent);
        match r {
            Ok(index) => changes.push(Change { index, sent, acked }),
            Err(e) => {
                write_errors += 1;
                first_write_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    if let Some(e) = first_write_error {
        notes.push(format!("{write_errors} writes failed; first: {e}"));
    }
    let increasing = changes.windows(2).all(|w| w[1].index > w[0].index);
    let last = changes.last().map(|c| c.index).unwrap_or(0);
    let drain = Instant::now() + a.drain_timeout;
    let caught_up = |s: &Shared| {
        s.seen
            .iter()
            .filter(|v| v.load(Ordering::Relaxed) >= last)
            .count()
    };
    while caught_up(&shared) < live && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let push_cpu = meter.stop();
    let answers = shared.answers.load(Ordering::Relaxed) - answers_before;
    let with_final = caught_up(&shared);
    rows.push(Row {
        scenario: "consul watch: writes (PUT maintenance)".into(),
        params: format!("K={} R={}/s", a.changes, a.rate),
        ops: changes.len() as u64,
        errors: write_errors,
        secs: started.elapsed().as_secs_f64(),
        unit: "writes/s",
        latency: write_latency,
        cpu: Some(push_cpu),
    });
    let rss_end = t
        .pid
        .and_then(|p| stats::proc_status_bytes(p, "VmRSS").ok());

    // Stop the watchers and account for every (watcher, change) pair.
    let _ = stop_tx.send(true);
    let mut tally = Tally::new(changes.len());
    let (mut bad, mut errors) = (0u64, 0u64);
    let mut first_error = None;
    for h in handles {
        let log = match tokio::time::timeout(Duration::from_secs(30), h).await {
            Ok(Ok(log)) => log,
            Ok(Err(e)) => WatchLog {
                error: Some(format!("watcher task failed: {e}")),
                errors: 1,
                ..Default::default()
            },
            Err(_) => WatchLog {
                error: Some("watcher did not stop within 30 s".into()),
                errors: 1,
                ..Default::default()
            },
        };
        bad += log.bad;
        errors += log.errors;
        if let Some(e) = log.error {
            first_error.get_or_insert(e);
        }
        if !log.answers.is_empty() {
            tally.add(&changes, &log.answers);
        }
    }
    let pairs = format!("{live} watchers x {} changes", changes.len());
    rows.push(Row {
        scenario: "consul watch: wakeup latency (ack -> answer)".into(),
        params: pairs.clone(),
        ops: tally.delivered,
        errors: tally.missing,
        secs: push_cpu.wall.as_secs_f64(),
        unit: "",
        latency: tally.latency.clone(),
        cpu: Some(push_cpu),
    });
    rows.push(Row {
        scenario: "consul watch: wakeup latency (write sent -> answer)".into(),
        params: pairs.clone(),
        ops: tally.delivered,
        errors: tally.missing,
        secs: push_cpu.wall.as_secs_f64(),
        unit: "",
        latency: tally.from_sent.clone(),
        cpu: None,
    });
    let mut last_latency = Latency::new();
    for d in &tally.to_last {
        last_latency.record(*d);
    }
    rows.push(Row {
        scenario: "consul watch: per change, to the last watcher".into(),
        params: pairs,
        ops: changes.len() as u64,
        errors: 0,
        secs: push_cpu.wall.as_secs_f64(),
        unit: "",
        latency: last_latency,
        cpu: None,
    });
    let expected = changes.len() as u64 * live as u64;
    notes.push(format!(
        "delivered {}/{expected} (watcher, change) pairs, {} missing; {} coalesced (the answer \
         already covered the next change too: a blocking query answers the newest state); {} \
         answered before the writer's ack (latency 0)",
        tally.delivered, tally.missing, tally.coalesced, tally.clamped
    ));
    notes.push(format!(
        "{with_final}/{live} watchers saw the last change's index {last}; change indexes \
         strictly increasing: {}",
        if increasing { "yes" } else { "NO" }
    ));
    if let Some(server) = push_cpu.server {
        notes.push(format!(
            "{answers} blocking answers during the changes: server {:.1} µs CPU per answer, \
             this tool {:.1} µs",
            server * 1e6 / answers.max(1) as f64,
            push_cpu.bench * 1e6 / answers.max(1) as f64
        ));
    }
    if let Some(end) = rss_end {
        notes.push(format!("server RSS {} at the end of the changes", mib(end)));
    }
    if bad + errors > 0 {
        notes.push(format!(
            "{bad} bad answers, {errors} request errors; first: {}",
            first_error.unwrap_or_default()
        ));
    }
    // Leave the server as it was for the DNS phase: nothing else watches this service.
    let _ = writer
        .call(
            Method::PUT,
            &format!("/v1/agent/service/maintenance/{id}?enable=false"),
            None,
            Duration::from_secs(30),
        )
        .await;
    Ok((rows, notes))
}

// ---- phase 2: DNS ------------------------------------------------------------------------

/// One DNS load's result.
struct DnsRun {
    ok: u64,
    errors: u64,
    timeouts: u64,
    latency: Latency,
    cpu: CpuUsed,
    /// A records in the answers (the last answer's count, and whether all agreed).
    records: usize,
    records_vary: bool,
    first_error: Option<String>,
}

impl DnsRun {
    fn qps(&self) -> f64 {
        self.ok as f64 / self.cpu.wall.as_secs_f64().max(1e-9)
    }
}

/// An A query for `name`, as bytes; the id (the first two bytes) is set per send.
fn query_bytes(name: &str) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new(0, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let name = Name::from_ascii(name).with_context(|| format!("not a DNS name: {name}"))?;
    m.add_query(Query::query(name, RecordType::A));
    m.to_vec().context("encoding the DNS query")
}

/// What one answer says: A records in it, or why it is not a good answer.
fn read_answer(buf: &[u8]) -> Result<usize, String> {
    let m = Message::from_vec(buf).map_err(|e| format!("undecodable answer: {e}"))?;
    if m.metadata.response_code != ResponseCode::NoError {
        return Err(format!("rcode {}", m.metadata.response_code));
    }
    if m.metadata.truncation {
        return Err("truncated".into());
    }
    let a = m
        .answers
        .iter()
        .filter(|r| r.record_type() == RecordType::A)
        .count();
    if a == 0 {
        return Err("no A record".into());
    }
    Ok(a)
}

/// Asks once (bounded retries) until the server answers with `want` A records.
async fn until_answering(server: SocketAddr, name: &str, want: usize) -> anyhow::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(server).await?;
    let mut q = query_bytes(name)?;
    let mut last = String::from("no answer");
    let mut buf = vec![0u8; 4096];
    for attempt in 0..50u16 {
        q[..2].copy_from_slice(&attempt.to_be_bytes());
        sock.send(&q).await?;
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await
        {
            match read_answer(&buf[..n]) {
                Ok(a) if a == want => return Ok(()),
                Ok(a) => last = format!("{a} A records, {want} expected"),
                Err(e) => last = e,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{server} does not answer A {name} as expected: {last}")
}

/// C clients, one query in flight each, for `duration`.
async fn dns_load(
    server: SocketAddr,
    pid: Option<u32>,
    name: &str,
    a: &ConsulArgs,
) -> anyhow::Result<DnsRun> {
    let query = Arc::new(query_bytes(name)?);
    let mut socks = Vec::with_capacity(a.dns_clients);
    for _ in 0..a.dns_clients {
        let s = UdpSocket::bind("127.0.0.1:0").await?;
        s.connect(server).await?;
        socks.push(s);
    }
    let meter = CpuMeter::start(pid);
    let end = Instant::now() + a.dns_duration;
    let timeout = a.dns_timeout;
    let mut handles = Vec::with_capacity(socks.len());
    for (c, sock) in socks.into_iter().enumerate() {
        let query = query.clone();
        handles.push(tokio::spawn(async move {
            let mut q = query.to_vec();
            let mut buf = vec![0u8; 4096];
            let mut r = DnsRun {
                ok: 0,
                errors: 0,
                timeouts: 0,
                latency: Latency::new(),
                cpu: CpuUsed {
                    server: None,
                    bench: 0.0,
                    wall: Duration::ZERO,
                },
                records: 0,
                records_vary: false,
                first_error: None,
            };
            // Ids differ per client so a late answer to another query is never taken.
            let mut id = (c as u16).wrapping_mul(1021);
            while Instant::now() < end {
                id = id.wrapping_add(1);
                q[..2].copy_from_slice(&id.to_be_bytes());
                let sent = Instant::now();
                if let Err(e) = sock.send(&q).await {
                    r.errors += 1;
                    r.first_error.get_or_insert_with(|| format!("send: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                // Answers to earlier (timed-out) queries are skipped by id.
                let answer = loop {
                    match tokio::time::timeout_at(sent + timeout, sock.recv(&mut buf)).await {
                        Err(_) => break None,
                        Ok(Err(e)) => break Some(Err(format!("recv: {e}"))),
                        Ok(Ok(n)) if n >= 2 && buf[..2] == id.to_be_bytes() => {
                            break Some(read_answer(&buf[..n]))
                        }
                        Ok(Ok(_)) => continue,
                    }
                };
                match answer {
                    None => r.timeouts += 1,
                    Some(Ok(records)) => {
                        r.latency.record(sent.elapsed());
                        r.ok += 1;
                        if r.records != 0 && r.records != records {
                            r.records_vary = true;
                        }
                        r.records = records;
                    }
                    Some(Err(e)) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(e);
                    }
                }
            }
            r
        }));
    }
    let mut total = DnsRun {
        ok: 0,
        errors: 0,
        timeouts: 0,
        latency: Latency::new(),
        cpu: CpuUsed {
            server: None,
            bench: 0.0,
            wall: Duration::ZERO,
        },
        records: 0,
        records_vary: false,
        first_error: None,
    };
    for h in handles {
        let r = tokio::time::timeout(a.dns_duration + timeout + Duration::from_secs(10), h)
            .await
            .context("a DNS client did not stop")?
            .context("a DNS client failed")?;
        total.ok += r.ok;
        total.errors += r.errors;
        total.timeouts += r.timeouts;
        total.latency.merge(&r.latency);
        if total.records != 0 && r.records != 0 && total.records != r.records {
            total.records_vary = true;
        }
        total.records_vary |= r.records_vary;
        if r.records != 0 {
            total.records = r.records;
        }
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.cpu = meter.stop();
    Ok(total)
}

fn dns_row(side: &str, r: &DnsRun, a: &ConsulArgs) -> Row {
    Row {
        scenario: format!("dns {side}: A <svc>.service.consul"),
        params: format!("C={} I={}", a.dns_clients, a.instances),
        ops: r.ok,
        errors: r.errors + r.timeouts,
        secs: r.cpu.wall.as_secs_f64(),
        unit: "q/s",
        latency: r.latency.clone(),
        cpu: Some(r.cpu),
    }
}

fn dns_notes(side: &str, r: &DnsRun, notes: &mut Vec<String>) {
    let mut s = format!(
        "{side}: {} answers with {} A records{}, {} errors, {} timeouts",
        r.ok,
        r.records,
        if r.records_vary {
            " (count varied)"
        } else {
            ""
        },
        r.errors,
        r.timeouts
    );
    if let Some(server) = r.cpu.server {
        s.push_str(&format!(
            "; server {:.1} µs CPU per answer, this tool {:.1} µs",
            server * 1e6 / r.ok.max(1) as f64,
            r.cpu.bench * 1e6 / r.ok.max(1) as f64
        ));
    }
    if let Some(e) = &r.first_error {
        s.push_str(&format!("; first error: {e}"));
    }
    notes.push(s);
}

async fn dns_phase(
    t: &Target,
    consul: SocketAddr,
    dns: SocketAddr,
    a: &ConsulArgs,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let service = format!("consul-dns-{}", load::run_id());
    let name = format!("{service}.service.consul");
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut c = Conn::new(consul);
    register(&mut c, &service, a.instances).await?;
    until_answering(dns, &name, a.instances as usize)
        .await
        .context("Sextant's DNS")?;
    let sextant = dns_load(dns, t.pid, &name, a).await?;
    rows.push(dns_row("sextant", &sextant, a));
    dns_notes("sextant", &sextant, &mut notes);

    if !a.dnsmasq.exists() {
        notes.push(format!(
            "dnsmasq skipped: {} does not exist (Debian: apt-get install dnsmasq-base)",
            a.dnsmasq.display()
        ));
        return Ok((rows, notes));
    }
    let peer = match Dnsmasq::start(&a.dnsmasq, &name, a.instances).await {
        Ok(p) => p,
        Err(e) => {
            notes.push(format!("dnsmasq skipped: {e:#}"));
            return Ok((rows, notes));
        }
    };
    let r = async {
        until_answering(peer.addr, &name, a.instances as usize)
            .await
            .context("dnsmasq")?;
        dns_load(peer.addr, peer.pid, &name, a).await
    }
    .await;
    let version = peer.version.clone();
    peer.stop().await;
    let dnsmasq = r?;
    rows.push(dns_row("dnsmasq", &dnsmasq, a));
    dns_notes("dnsmasq", &dnsmasq, &mut notes);
    notes.push(format!("dnsmasq: {version}"));
    let ratio = |x: f64, y: f64| {
        if y > 0.0 {
            format!("{:.2}", x / y)
        } else {
            "-".into()
        }
    };
    let q = |r: &DnsRun, p: f64| r.latency.quantile_us(p).unwrap_or(0) as f64;
    let per_answer = |r: &DnsRun| r.cpu.server.unwrap_or(0.0) / r.ok.max(1) as f64;
    notes.push(format!(
        "Sextant/dnsmasq: q/s {}, p50 {}, p99 {}, server CPU per answer {}",
        ratio(sextant.qps(), dnsmasq.qps()),
        ratio(q(&sextant, 0.5), q(&dnsmasq, 0.5)),
        ratio(q(&sextant, 0.99), q(&dnsmasq, 0.99)),
        ratio(per_answer(&sextant), per_answer(&dnsmasq)),
    ));
    Ok((rows, notes))
}

/// dnsmasq serving the same names from `--host-record`s, on a free loopback port.
struct Dnsmasq {
    child: tokio::process::Child,
    addr: SocketAddr,
    pid: Option<u32>,
    version: String,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    async fn start(bin: &Path, name: &str, instances: u32) -> anyhow::Result<Self> {
        let version = tokio::process::Command::new(bin)
            .arg("--version")
            .output()
            .await
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "(version unknown)".into());
        let dir = tempfile::Builder::new()
            .prefix("sextant-bench-dnsmasq-")
            .tempdir()?;
        let port = free_udp_tcp_port()?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args([
            "--no-resolv",
            "--no-hosts",
            "--keep-in-foreground",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--conf-file=/dev/null",
        ])
        .arg(format!("--port={port}"))
        .arg(format!(
            "--pid-file={}",
            dir.path().join("dnsmasq.pid").display()
        ));
        for i in 0..instances {
            cmd.arg(format!("--host-record={name},{}", address(i)));
        }
        let log = std::fs::File::create(dir.path().join("dnsmasq.log"))?;
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        // A bad option or a taken port ends it at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.path().join("dnsmasq.log")).unwrap_or_default();
            bail!("dnsmasq exited at once ({status}): {}", log.trim());
        }
        let pid = child.id();
        Ok(Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            pid,
            version,
            _dir: dir,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A loopback port free for both UDP and TCP a moment ago (dnsmasq binds both).
fn free_udp_tcp_port() -> anyhow::Result<u16> {
    for _ in 0..20 {
        let u = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no loopback port free for both UDP and TCP")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn accounts_every_watcher_change_pair() {
        let t0 = Instant::now();
        let changes = [
            Change {
                index: 10,
                sent: t0 + ms(80),
                acked: t0 + ms(100),
            },
            Change {
                index: 12,
                sent: t0 + ms(190),
                acked: t0 + ms(200),
            },
            Change {
                index: 15,
                sent: t0 + ms(290),
                acked: t0 + ms(300),
            },
        ];
        // Watcher 1 sees every change; the first answer arrives before the ack (clamped).
        let mut t = Tally::new(changes.len());
        t.add(
            &changes,
            &[
                (5, t0),
                (10, t0 + ms(90)),
                (12, t0 + ms(203)),
                (15, t0 + ms(310)),
            ],
        );
        assert_eq!(
            (t.delivered, t.coalesced, t.missing, t.clamped),
            (3, 0, 0, 1)
        );
        assert_eq!(t.to_last, vec![ms(0), ms(3), ms(10)]);
        // Watcher 2's one answer, at exactly the second change's index, covers the first two
        // changes; the third never comes.
        t.add(&changes, &[(5, t0), (12, t0 + ms(250))]);
        assert_eq!(
            (t.delivered, t.coalesced, t.missing, t.clamped),
            (5, 1, 1, 1)
        );
        assert_eq!(t.to_last, vec![ms(150), ms(50), ms(10)]);
        assert_eq!(t.latency.count(), 5);
        assert_eq!(t.from_sent.count(), 5);
        // From the send, watcher 1's first answer took 10 ms (not clamped).
        assert_eq!(t.from_sent.quantile_us(0.0), Some(10_000));
        // Watcher 3 got no answer past the start: all missing.
        t.add(&changes, &[(5, t0)]);
        assert_eq!((t.delivered, t.missing), (5, 4));
    }

    #[test]
    fn builds_and_reads_dns_messages() {
        let q = query_bytes("web.service.consul").unwrap();
        let m = Message::from_vec(&q).unwrap();
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].query_type(), RecordType::A);
        // A query carries no answer: not a good answer.
        assert_eq!(read_answer(&q), Err("no A record".to_string()));
        assert!(read_answer(&[1, 2, 3]).is_err());
    }
}
