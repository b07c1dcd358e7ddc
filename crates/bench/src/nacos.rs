//! Scenario `nacos`: any Nacos-speaking server (Sextant's Nacos adapter, rnacos, Nacos itself)
//! driven through the Nacos API only, as Nacos clients drive it. This module owns the phases
//! and their measurement; the 2.x gRPC client is [`crate::nacos_grpc`], starting servers and
//! the side-by-side report are [`crate::nacos_compare`].
//!
//! - `register`: C clients each `POST /nacos/v1/ns/instance` (1.x Open API, ephemeral) one
//!   distinct instance at a time, N in all over S services, after an untimed warm-up; then the
//!   same clients `DELETE` them (timed too), so the next phase starts from an empty registry
//!   instead of amid N lease expiries.
//! - `query`: S services × I instances registered (and kept alive with beats, as 1.x clients
//!   do), then C clients `GET /nacos/v1/ns/instance/list` round robin over the services for a
//!   fixed time; every answer must list I instances.
//! - `push`: one service of I instances (HTTP, kept alive with beats); W Nacos 2.x gRPC
//!   subscribers (one connection each: `ServerCheckRequest`, bi-stream with
//!   `ConnectionSetupRequest`, `SubscribeServiceRequest`); the tool changes one instance at a
//!   time at R/s (`PUT /nacos/v1/ns/instance` with metadata `benchSeq=k`) and, for every
//!   (subscriber, change), takes the arrival of the first `NotifySubscriberRequest` showing
//!   change k or a later one (servers may coalesce changes into one push).
//!
//! CPU of the server (its pid) and of the tool is read from `/proc` over each phase.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use hyper::Method;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::h1::{self, H1};
use crate::load;
use crate::nacos_grpc::{self, PushStats, Subscription, SEQ_KEY};
use crate::push::{self, Labels, Live, PushArgs, PushResult};
use crate::stats::{print_table, CpuMeter, Row};

/// A Nacos server under test.
#[derive(Debug, Clone)]
pub struct NacosTarget {
    /// How the report names it ("sextant", "rnacos", or "nacos" for one given by address).
    pub name: String,
    /// `http://127.0.0.1:PORT` of the 1.x HTTP API.
    pub http: String,
    /// `http://127.0.0.1:PORT` of the 2.x gRPC API (HTTP port + 1000 by Nacos' convention).
    pub grpc: String,
    pub pid: Option<u32>,
}

impl NacosTarget {
    /// The server at `addr` (`127.0.0.1:PORT`); gRPC at `grpc` or PORT + 1000. Loopback only.
    pub fn at(
        name: &str,
        addr: &str,
        grpc: Option<&str>,
        pid: Option<u32>,
    ) -> anyhow::Result<Self> {
        let http: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("--nacos-addr {addr:?} is not IP:PORT"))?;
        let grpc: std::net::SocketAddr = match grpc {
            Some(g) => g
                .parse()
                .with_context(|| format!("--nacos-grpc-addr {g:?} is not IP:PORT"))?,
            None => {
                let port = http
                    .port()
                    .checked_add(1000)
                    .context("the HTTP port + 1000 is not a port")?;
                std::net::SocketAddr::new(http.ip(), port)
            }
        };
        anyhow::ensure!(
            http.ip().is_loopback() && grpc.ip().is_loopback(),
            "only loopback targets are driven (got {http} and {grpc})"
        );
        Ok(Self {
            name: name.to_string(),
            http: format!("http://{http}"),
            grpc: format!("http://{grpc}"),
            pid,
        })
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Register,
    Query,
    Push,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeMethod {
    /// `PUT /nacos/v1/ns/instance` (update an instance).
    Put,
    /// `POST /nacos/v1/ns/instance` (register it again).
    Post,
}

/// The work of the Nacos scenarios (the same for every server compared).
#[derive(Args, Debug, Clone)]
pub struct NacosWork {
    /// Phases to run, in this order.
    #[arg(long, value_delimiter = ',', default_value = "register,query,push")]
    pub phases: Vec<Phase>,
    /// Nacos namespace (`namespaceId` / `namespace`).
    #[arg(long, default_value = "public")]
    pub namespace: String,
    /// Nacos group of every service.
    #[arg(long, default_value = "DEFAULT_GROUP")]
    pub group: String,
    /// register: concurrent clients, each with its own connection and one request in flight.
    #[arg(help_heading = "register", long, short = 'c', default_value_t = 32)]
    pub clients: usize,
    /// register: distinct instances registered in the timed phase (then deregistered).
    #[arg(help_heading = "register", long, short = 'n', default_value_t = 20_000)]
    pub instances: u64,
    /// register: services the instances are spread over.
    #[arg(help_heading = "register", long, default_value_t = 100)]
    pub services: u64,
    /// register: instances registered (and deregistered), untimed, before the timed phase.
    #[arg(help_heading = "register", long, default_value_t = 5_000)]
    pub warmup: u64,
    /// register: longest a register or deregister phase may run.
    #[arg(help_heading = "register", long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub register_deadline: Duration,
    /// query: services in the queried registry.
    #[arg(help_heading = "query", long, default_value_t = 100)]
    pub query_services: u64,
    /// query: instances of each queried service.
    #[arg(help_heading = "query", long, default_value_t = 10)]
    pub query_instances: u64,
    /// query: concurrent clients, one query in flight each.
    #[arg(help_heading = "query", long, default_value_t = 32)]
    pub query_clients: usize,
    /// query: how long the queries run.
    #[arg(help_heading = "query", long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub query_duration: Duration,
    /// query: most queries in all (the phase ends at this count or after --query-duration).
    #[arg(help_heading = "query", long, default_value_t = 2_000_000)]
    pub max_queries: u64,
    /// push: gRPC subscribers, one connection each.
    #[arg(help_heading = "push", long, short = 'w', default_value_t = 200)]
    pub watchers: usize,
    /// push: instances of the watched service (every push carries all of them).
    #[arg(help_heading = "push", long, default_value_t = 50)]
    pub push_instances: u64,
    /// push: changes per second (one at a time, each acknowledged before the next).
    #[arg(help_heading = "push", long, short = 'r', default_value_t = 20.0)]
    pub rate: f64,
    /// push: changes in all.
    #[arg(help_heading = "push", long, short = 'k', default_value_t = 200)]
    pub changes: u64,
    /// push: how a change is written.
    #[arg(help_heading = "push", long, default_value = "put")]
    pub change_method: ChangeMethod,
    /// push: subscribers connecting at the same time.
    #[arg(help_heading = "push", long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// push: longest wait for every subscriber's subscription.
    #[arg(help_heading = "push", long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// push: longest wait, after the last write, for every subscriber to receive it.
    #[arg(help_heading = "push", long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// push: longest the writes may take.
    #[arg(help_heading = "push", long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub push_deadline: Duration,
    /// Interval of the beats that keep the query and push phases' ephemeral instances alive
    /// (Nacos 1.x clients beat every 5 s; servers expire an instance after 15 s without one).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub beat_interval: Duration,
}

impl NacosWork {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.clients > 0
                && self.instances > 0
                && self.services > 0
                && self.query_services > 0
                && self.query_instances > 0
                && self.query_clients > 0
                && self.watchers > 0
                && self.push_instances > 0
                && self.changes > 0
                && self.rate > 0.0
                && !self.beat_interval.is_zero(),
            "sizes, rates and intervals must be positive"
        );
        Ok(())
    }

    fn push_args(&self) -> PushArgs {
        PushArgs {
            watchers: self.watchers,
            instances: self.push_instances,
            rate: self.rate,
            changes: self.changes,
            connect_concurrency: self.connect_concurrency,
            ready_timeout: self.ready_timeout,
            drain_timeout: self.drain_timeout,
            deadline: self.push_deadline,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct NacosArgs {
    /// The Nacos server's HTTP address (IP:PORT, loopback); its gRPC port is PORT + 1000.
    /// Ignored with --spawn (a Sextant started on free ports).
    #[arg(long, default_value = "127.0.0.1:8848")]
    pub nacos_addr: String,
    /// The gRPC address, when it is not the HTTP port + 1000.
    #[arg(long)]
    pub nacos_grpc_addr: Option<String>,
    #[command(flatten)]
    pub work: NacosWork,
}

/// One instance as the 1.x API names it.
#[derive(Debug, Clone)]
struct Inst {
    service: String,
    ip: String,
    port: u16,
}

/// The 1.x HTTP Open API of one server, over `conns` keep-alive connections (callers pick one
/// by index: a load worker its own).
#[derive(Clone)]
struct Api {
    h1: Arc<H1>,
    namespace: String,
    group: String,
}

/// The metadata of the instances: a typical instance's two entries, and the change sequence.
fn metadata(seq: Option<u64>) -> String {
    match seq {
        Some(s) => format!(r#"{{"team":"bench","build":"a1b2c3d","{SEQ_KEY}":"{s}"}}"#),
        None => r#"{"team":"bench","build":"a1b2c3d"}"#.to_string(),
    }
}

const INSTANCE: &str = "/nacos/v1/ns/instance";

impl Api {
    fn new(base: &str, w: &NacosWork, conns: usize) -> anyhow::Result<Self> {
        Ok(Self {
            h1: Arc::new(H1::new(base, conns, Duration::from_secs(30))?),
            namespace: w.namespace.clone(),
            group: w.group.clone(),
        })
    }

    /// `path?namespaceId=..&groupName=..&serviceName=..&ip=..&port=..&ephemeral=true&extra..`
    fn instance_path(&self, path: &str, i: &Inst, extra: &[(&str, &str)]) -> String {
        let port = i.port.to_string();
        let mut q = vec![
            ("namespaceId", self.namespace.as_str()),
            ("groupName", self.group.as_str()),
            ("serviceName", i.service.as_str()),
            ("ip", i.ip.as_str()),
            ("port", port.as_str()),
            ("ephemeral", "true"),
        ];
        q.extend_from_slice(extra);
        h1::path_query(path, &q)
    }

    /// A write of the 1.x API, which answers `ok`.
    async fn write(
        &self,
        slot: usize,
        method: Method,
        i: &Inst,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let pq = self.instance_path(INSTANCE, i, extra);
        let (status, body) = self.h1.call(slot, method.clone(), &pq).await?;
        anyhow::ensure!(
            status.is_success() && body.trim_ascii() == b"ok",
            "{method} {pq}: HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        Ok(())
    }

    async fn register(&self, slot: usize, i: &Inst, meta: &str) -> anyhow::Result<()> {
        self.write(
            slot,
            Method::POST,
            i,
            &[
                ("weight", "1.0"),
                ("enabled", "true"),
                ("healthy", "true"),
                ("metadata", meta),
            ],
        )
        .await
    }

    async fn update(
        &self,
        slot: usize,
        how: ChangeMethod,
        i: &Inst,
        meta: &str,
    ) -> anyhow::Result<()> {
        match how {
            ChangeMethod::Put => {
                self.write(slot, Method::PUT, i, &[("metadata", meta)])
                    .await
            }
            ChangeMethod::Post => self.register(slot, i, meta).await,
        }
    }

    async fn deregister(&self, slot: usize, i: &Inst) -> anyhow::Result<()> {
        self.write(slot, Method::DELETE, i, &[]).await
    }

    /// A light beat (`PUT /nacos/v1/ns/instance/beat` without a beat body, as 1.x clients send
    /// once the server allows light beats).
    async fn beat(&self, slot: usize, i: &Inst) -> anyhow::Result<()> {
        let pq = self.instance_path("/nacos/v1/ns/instance/beat", i, &[]);
        let (status, body) = self.h1.call(slot, Method::PUT, &pq).await?;
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
        anyhow::ensure!(
            status.is_success() && !text.contains("20404"),
            "PUT {pq}: HTTP {status}: {text}"
        );
        Ok(())
    }

    /// The path and query of `GET /nacos/v1/ns/instance/list` for `service` (built once per
    /// service, not per query).
    fn list_path(&self, service: &str) -> String {
        h1::path_query(
            "/nacos/v1/ns/instance/list",
            &[
                ("namespaceId", self.namespace.as_str()),
                ("groupName", self.group.as_str()),
                ("serviceName", service),
                ("healthyOnly", "false"),
            ],
        )
    }

    /// `GET` of a list path; the number of instances listed, counted by scanning the answer
    /// (see [`nacos_grpc::count_hosts`]) so the tool spends little CPU per query.
    async fn list(&self, slot: usize, pq: &str) -> anyhow::Result<usize> {
        let (status, body) = self.h1.call(slot, Method::GET, pq).await?;
        let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
        anyhow::ensure!(status.is_success(), "GET {pq}: HTTP {status}: {}", text());
        nacos_grpc::count_hosts(&body)
            .with_context(|| format!("GET {pq}: not a service's instance list: {}", text()))
    }
}

/// Beats in flight at once (each on its own connection).
const BEAT_CONNS: usize = 8;

/// Beats for a set of instances every interval until stopped (bounded: at most one round per
/// interval, each round bounded by the instance count, and never past `limit`).
struct Beats {
    stop: watch::Sender<bool>,
    task: JoinHandle<(u64, u64, Option<String>)>,
}

impl Beats {
    fn start(api: Api, instances: Arc<Vec<Inst>>, interval: Duration, limit: Duration) -> Self {
        let (stop, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let (mut sent, mut failed, mut first) = (0u64, 0u64, None);
            let started = Instant::now();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; registration just happened
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    _ = tick.tick() => {}
                }
                if started.elapsed() > limit {
                    break;
                }
                let mut results = futures::stream::iter(0..instances.len())
                    .map(|n| {
                        let (api, i) = (api.clone(), instances[n].clone());
                        async move { api.beat(n, &i).await }
                    })
                    .buffer_unordered(BEAT_CONNS);
                while let Some(r) = results.next().await {
                    sent += 1;
                    if let Err(e) = r {
                        failed += 1;
                        first.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (sent, failed, first)
        });
        Self { stop, task }
    }

    async fn finish(self, phase: &str) -> String {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(60), self.task).await {
            Ok(Ok((sent, failed, first))) => format!(
                "{phase}: {sent} beats sent to keep the instances alive, {failed} failed{}",
                first.map(|e| format!(" (first: {e})")).unwrap_or_default()
            ),
            _ => format!("{phase}: the beat task did not stop"),
        }
    }
}

/// What one server produced.
#[derive(Default)]
pub(crate) struct NacosResult {
    pub(crate) rows: Vec<Row>,
    pub(crate) notes: Vec<String>,
    pub(crate) register: Option<Row>,
    pub(crate) deregister: Option<Row>,
    pub(crate) query: Option<Row>,
    pub(crate) push: Option<PushResult>,
    pub(crate) failures: Vec<String>,
}

/// Registers `count` instances (`inst(n)`) from `clients` clients; the phase's outcome.
async fn register_all(
    api: &Api,
    clients: usize,
    count: u64,
    deadline: Duration,
    inst: impl Fn(u64) -> Inst + Send + Sync + 'static,
    meta: String,
) -> load::Outcome {
    let api = api.clone();
    load::drive(clients, count, deadline, move |w, n| {
        let (api, i, meta) = (api.clone(), inst(n), meta.clone());
        async move {
            api.register(w, &i, &meta).await?;
            Ok(1)
        }
    })
    .await
}

async fn deregister_all(
    api: &Api,
    clients: usize,
    count: u64,
    deadline: Duration,
    inst: impl Fn(u64) -> Inst + Send + Sync + 'static,
) -> load::Outcome {
    let api = api.clone();
    load::drive(clients, count, deadline, move |w, n| {
        let (api, i) = (api.clone(), inst(n));
        async move {
            api.deregister(w, &i).await?;
            Ok(1)
        }
    })
    .await
}

/// Runs every phase of `w` against `t`; a failed phase is recorded and the next one runs.
pub(crate) async fn measure(t: &NacosTarget, w: &NacosWork) -> NacosResult {
    let mut r = NacosResult::default();
    let run = load::run_id();
    for &phase in &w.phases {
        let outcome = match phase {
            Phase::Register => register_phase(t, w, &run, &mut r).await,
            Phase::Query => query_phase(t, w, &run, &mut r).await,
            Phase::Push => push_phase(t, w, &run, &mut r).await,
        };
        if let Err(e) = outcome {
            let msg = format!("{}: {phase:?} phase failed: {e:#}", t.name);
            eprintln!("{msg}");
            r.failures.push(msg);
        }
    }
    r
}

async fn register_phase(
    t: &NacosTarget,
    w: &NacosWork,
    run: &str,
    r: &mut NacosResult,
) -> anyhow::Result<()> {
    let api = Api::new(&t.http, w, w.clients)?;
    let p = format!("{}: ", t.name);
    let services = w.services;
    let name = |kind: &'static str, run: String| {
        move |i: u64| Inst {
            service: format!("nreg{kind}-{run}-{:04}", i % services),
            ip: load::host(i),
            port: 8080,
        }
    };
    if w.warmup > 0 {
        let out = register_all(
            &api,
            w.clients,
            w.warmup,
            w.register_deadline,
            name("w", run.to_string()),
            metadata(None),
        )
        .await;
        r.notes.extend(out.notes(&format!("{p}register warm-up")));
    }
    let params = format!("C={} N={} services={}", w.clients, w.instances, w.services);
    let meter = CpuMeter::start(t.pid);
    let out = register_all(
        &api,
        w.clients,
        w.instances,
        w.register_deadline,
        name("", run.to_string()),
        metadata(None),
    )
    .await;
    let reg = out.row(
        format!("{p}register: POST /nacos/v1/ns/instance"),
        params.clone(),
        "inst/s",
        Some(meter.stop()),
    );
    r.notes.extend(out.notes(&format!("{p}register")));
    r.rows.push(reg.clone());
    r.register = Some(reg);

    let meter = CpuMeter::start(t.pid);
    let out = deregister_all(
        &api,
        w.clients,
        w.instances,
        w.register_deadline,
        name("", run.to_string()),
    )
    .await;
    let dereg = out.row(
        format!("{p}deregister: DELETE /nacos/v1/ns/instance"),
        params,
        "inst/s",
        Some(meter.stop()),
    );
    r.notes.extend(out.notes(&format!("{p}deregister")));
    r.rows.push(dereg.clone());
    r.deregister = Some(dereg);
    if w.warmup > 0 {
        let out = deregister_all(
            &api,
            w.clients,
            w.warmup,
            w.register_deadline,
            name("w", run.to_string()),
        )
        .await;
        r.notes
            .extend(out.notes(&format!("{p}deregister of the warm-up")));
    }
    r.notes.push(format!(
        "{p}register: every instance ephemeral, distinct ip (10.x.y.z) on port 8080, weight 1.0, two metadata entries; after an untimed warm-up of {} instances from the same {} clients (deregistered after the timed phases)",
        w.warmup, w.clients
    ));
    Ok(())
}

async fn query_phase(
    t: &NacosTarget,
    w: &NacosWork,
    run: &str,
    r: &mut NacosResult,
) -> anyhow::Result<()> {
    let api = Api::new(&t.http, w, w.query_clients)?;
    let p = format!("{}: ", t.name);
    let (services, per) = (w.query_services, w.query_instances);
    let total = services * per;
    let run = run.to_string();
    let inst = move |i: u64| Inst {
        service: format!("nq-{run}-{:04}", i % services),
        ip: load::host(i),
        port: 8080,
    };
    let meter = CpuMeter::start(t.pid);
    let out = register_all(
        &api,
        w.query_clients,
        total,
        w.register_deadline,
        inst.clone(),
        metadata(None),
    )
    .await;
    r.rows.push(out.row(
        format!("{p}query setup: POST /nacos/v1/ns/instance"),
        format!("S={services} I={per} C={}", w.query_clients),
        "inst/s",
        Some(meter.stop()),
    ));
    r.notes.extend(out.notes(&format!("{p}query setup")));
    anyhow::ensure!(out.errors == 0, "could not register the queried registry");
    let all: Arc<Vec<Inst>> = Arc::new((0..total).map(&inst).collect());
    let beats = Beats::start(
        Api::new(&t.http, w, BEAT_CONNS)?,
        all,
        w.beat_interval,
        w.query_duration + Duration::from_secs(600),
    );

    let paths: Arc<Vec<String>> = Arc::new(
        (0..services)
            .map(|n| api.list_path(&inst(n).service))
            .collect(),
    );
    let meter = CpuMeter::start(t.pid);
    let q = api.clone();
    let out = load::drive(
        w.query_clients,
        w.max_queries,
        w.query_duration,
        move |w, n| {
            let (q, paths) = (q.clone(), paths.clone());
            async move {
                let pq = &paths[(n % services) as usize];
                let got = q.list(w, pq).await?;
                anyhow::ensure!(
                    got as u64 == per,
                    "GET {pq}: {got} instances, {per} expected"
                );
                Ok(1)
            }
        },
    )
    .await;
    let query = out.row(
        format!("{p}query: GET /nacos/v1/ns/instance/list"),
        format!(
            "S={services} I={per} C={} for {:?}",
            w.query_clients, w.query_duration
        ),
        "queries/s",
        Some(meter.stop()),
    );
    if let Some(e) = &out.first_error {
        r.notes.push(format!(
            "{p}query: {} failed or wrong answers; first: {e}",
            out.errors
        ));
    }
    r.rows.push(query.clone());
    r.query = Some(query);
    r.notes.push(beats.finish(&format!("{p}query")).await);
    let out = deregister_all(&api, w.query_clients, total, w.register_deadline, inst).await;
    r.notes.extend(out.notes(&format!("{p}query cleanup")));
    r.notes.push(format!(
        "{p}query: each answer must list all {per} instances (healthyOnly=false); the queried registry was registered first over HTTP and kept alive with beats every {:?} during the queries",
        w.beat_interval
    ));
    Ok(())
}

async fn push_phase(
    t: &NacosTarget,
    w: &NacosWork,
    run: &str,
    r: &mut NacosResult,
) -> anyhow::Result<()> {
    let a = w.push_args();
    a.validate()?;
    let api = Api::new(&t.http, w, 8)?;
    let prefix = format!("{}: ", t.name);
    let service = format!("npush-{run}");
    let mut notes = Vec::new();

    // 1. The watched service: I instances, change sequence 0.
    let svc = service.clone();
    let inst = move |j: u64| Inst {
        service: svc.clone(),
        ip: load::host(j),
        port: 8080,
    };
    let meter = CpuMeter::start(t.pid);
    let out = register_all(
        &api,
        8,
        a.instances,
        a.deadline,
        inst.clone(),
        metadata(Some(0)),
    )
    .await;
    notes.extend(out.notes("push setup"));
    let setup = out.row(
        format!("{prefix}push setup: POST /nacos/v1/ns/instance"),
        format!("I={} (8 in flight)", a.instances),
        "inst/s",
        Some(meter.stop()),
    );
    anyhow::ensure!(out.errors == 0, "could not register the watched service");
    let all: Arc<Vec<Inst>> = Arc::new((0..a.instances).map(&inst).collect());
    let beats = Beats::start(
        Api::new(&t.http, w, BEAT_CONNS)?,
        all,
        w.beat_interval,
        a.ready_timeout + a.deadline + a.drain_timeout + Duration::from_secs(60),
    );

    // 2. Subscribers.
    let live = Live::new(a.watchers);
    let stats = Arc::new(PushStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let sub = Subscription {
        url: t.grpc.clone(),
        namespace: w.namespace.clone(),
        group: w.group.clone(),
        service: service.clone(),
        instances: a.instances,
    };
    let ready_deadline = Instant::now() + a.ready_timeout;
    let (subs, connected) = push::connect_all(&a, t.pid, &live, &mut notes, |n| {
        tokio::spawn(nacos_grpc::subscriber(
            n,
            sub.clone(),
            ready_deadline,
            slots.clone(),
            live.clone(),
            stats.clone(),
            stop_rx.clone(),
        ))
    })
    .await;
    if connected.ready == 0 {
        let _ = stop_tx.send(true);
        let mut why = String::new();
        for h in subs {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(10), h).await {
                if let Some(e) = s.ended {
                    why = e;
                    break;
                }
            }
        }
        beats.finish("push").await;
        anyhow::bail!("no subscriber could subscribe: {why}");
    }

    // 3. Changes: instance k mod I gets metadata benchSeq = k + 1.
    let how = w.change_method;
    let writes = push::write_at_rate(&a, t.pid, &mut notes, |k| {
        let seq = k + 1;
        let (api, i) = (api.clone(), inst(k % a.instances));
        async move {
            api.update(0, how, &i, &metadata(Some(seq))).await?;
            Ok(seq)
        }
    })
    .await;

    // 4. Drain, stop, account.
    let method = match how {
        ChangeMethod::Put => "PUT",
        ChangeMethod::Post => "POST",
    };
    let labels = Labels {
        prefix: prefix.clone(),
        subscribe: "Nacos 2.x gRPC: ServerCheckRequest, bi-stream with ConnectionSetupRequest, SubscribeServiceRequest; NotifySubscriberRequest pushes answered with NotifySubscriberResponse (one HTTP/2 connection each)".into(),
        write: format!("{method} /nacos/v1/ns/instance (metadata {SEQ_KEY}=k)"),
        notes: vec![
            format!("{prefix}a push carries the whole service; change k counts as delivered to a subscriber by the first push showing {SEQ_KEY} >= k (a server may coalesce changes into one push); the connect row ends at the SubscribeServiceResponse, whose serviceInfo is the first snapshot"),
        ],
    };
    let mut result = push::finish(
        &a, t.pid, &live, stop_tx, subs, setup, connected, writes, labels, notes,
    )
    .await;
    // Counted after `finish`, which stopped the subscribers.
    result
        .notes
        .push(format!("{prefix}{}", stats.summary(a.instances)));
    result
        .notes
        .push(beats.finish(&format!("{prefix}push")).await);
    let out = deregister_all(&api, 8, a.instances, a.deadline, inst).await;
    result
        .notes
        .extend(out.notes(&format!("{prefix}push cleanup")));
    r.rows.extend(result.rows.iter().cloned());
    r.push = Some(result);
    Ok(())
}

/// Prints one server's tables.
pub(crate) fn print_result(t: &NacosTarget, r: &NacosResult, about: &[String]) {
    let mut notes = r.notes.clone();
    notes.extend(about.iter().cloned());
    let rows: Vec<Row> = r
        .rows
        .iter()
        .filter(|row| !row.scenario.contains(": push "))
        .cloned()
        .collect();
    if !rows.is_empty() {
        print_table(
            &format!("nacos: {} register and query", t.name),
            &rows,
            &notes,
        );
    }
    if let Some(p) = &r.push {
        print_table(&format!("nacos: {} push", t.name), &p.rows, &p.notes);
    }
    if !r.failures.is_empty() {
        println!("failures: {}", r.failures.join("; "));
    }
}

/// Scenario `nacos` against one server given by address.
pub async fn run(t: &NacosTarget, a: &NacosArgs, about: &[String]) -> anyhow::Result<()> {
    a.work.validate()?;
    let r = measure(t, &a.work).await;
    print_result(t, &r, about);
    anyhow::ensure!(r.failures.is_empty(), "{} phases failed", r.failures.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_loopback_and_grpc_is_port_plus_1000() {
        let t = NacosTarget::at("x", "127.0.0.1:8848", None, None).expect("valid");
        assert_eq!(t.http, "http://127.0.0.1:8848");
        assert_eq!(t.grpc, "http://127.0.0.1:9848");
        assert!(NacosTarget::at("x", "10.0.0.1:8848", None, None).is_err());
        assert!(NacosTarget::at("x", "127.0.0.1:65000", None, None).is_err());
        let t = NacosTarget::at("x", "127.0.0.1:1", Some("127.0.0.1:2"), None).expect("valid");
        assert_eq!(t.grpc, "http://127.0.0.1:2");
    }

    #[test]
    fn metadata_is_json_with_the_sequence() {
        let v: serde_json::Value = serde_json::from_str(&metadata(Some(17))).expect("json");
        assert_eq!(v[SEQ_KEY], "17");
        let v: serde_json::Value = serde_json::from_str(&metadata(None)).expect("json");
        assert!(v.get(SEQ_KEY).is_none());
    }
}
