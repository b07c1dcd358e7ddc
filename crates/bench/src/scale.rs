//! Scenario `scale`: loads S services × I instances with gRPC BatchRegister, reports load
//! throughput, the server's memory and reads of whole services; then, when this tool spawned
//! the server, stops it with SIGTERM, starts it again on the same data and reports how long
//! until it answers `/readyz` and serves a service's instances, and its memory after restart.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sextant_model::XorShift;
use tokio::time::Instant;

use crate::load::{self, NAMESPACE};
use crate::stats::{self, mib, print_table, CpuMeter, CpuUsed, Latency, Row};
use crate::target::{dir_size, Target};

#[derive(Args, Debug, Clone)]
pub struct ScaleArgs {
    /// Services.
    #[arg(long, short = 's', default_value_t = 10_000)]
    pub services: u64,
    /// Instances per service.
    #[arg(long, short = 'i', default_value_t = 100)]
    pub instances: u64,
    /// Instances per BatchRegister call.
    #[arg(long, short = 'b', default_value_t = 1000)]
    pub batch: u64,
    /// BatchRegister calls in flight.
    #[arg(long, short = 'c', default_value_t = 4)]
    pub concurrency: usize,
    /// Services read back (GET, checked to hold every instance) before the restart.
    #[arg(long, default_value_t = 200)]
    pub reads: u64,
    /// Longest the load may run; it stops issuing batches after that.
    #[arg(long, default_value = "900s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Skip the stop/restart part even when the server was spawned by this tool.
    #[arg(long)]
    pub no_restart: bool,
}

fn service_name(run: &str, s: u64) -> String {
    format!("scale-{run}-{s:05}")
}

/// GETs one service over HTTP; the number of instances it holds.
async fn count_instances(
    client: &reqwest::Client,
    http: &str,
    service: &str,
) -> anyhow::Result<u64> {
    let url = format!("{http}/v1/namespaces/{NAMESPACE}/services/{service}");
    let v = load::check_http(client.get(url).send().await?).await?;
    let n = v["instances"]
        .as_array()
        .context("no instances in the answer")?
        .len();
    Ok(n as u64)
}

/// Registers `a.services` × `a.instances` persistent instances (services named after `run`)
/// with BatchRegister calls of `a.batch`, `a.concurrency` in flight, bounded by `a.deadline`:
/// the load of `scale`, and of a cluster a node then joins (`cluster`).
pub(crate) async fn load_services(
    grpc: &str,
    run: &str,
    a: &ScaleArgs,
) -> anyhow::Result<load::Outcome> {
    let total = a.services * a.instances;
    let clients = Arc::new(load::grpc_clients(grpc, a.concurrency).await?);
    let (per, batch) = (a.instances, a.batch);
    let run = run.to_string();
    let requests = total.div_ceil(batch);
    Ok(
        load::drive(a.concurrency, requests, a.deadline, move |w, n| {
            let c = clients[w].clone();
            let instances: Vec<_> = (n * batch..((n + 1) * batch).min(total))
                .map(|g| {
                    load::grpc_request(&service_name(&run, g / per), format!("i{}", g % per), g)
                })
                .collect();
            load::batch_register(c, instances)
        })
        .await,
    )
}

pub async fn run(t: &mut Target, a: &ScaleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.services > 0 && a.instances > 0 && a.batch > 0 && a.concurrency > 0,
        "sizes must be positive"
    );
    let run = load::run_id();
    let total = a.services * a.instances;
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // 1. Load.
    let meter = CpuMeter::start(t.pid);
    let out = load_services(&t.grpc, &run, a).await?;
    let load_cpu = meter.stop();
    notes.extend(out.notes("scale load"));
    let loaded = out.ops;
    rows.push(Row {
        scenario: "scale load: BatchRegister".into(),
        params: format!(
            "S={} I={} ({} inst) B={} concurrency={} (latency per batch)",
            a.services, a.instances, total, a.batch, a.concurrency
        ),
        ops: loaded,
        errors: out.errors,
        secs: out.elapsed.as_secs_f64(),
        unit: "inst/s",
        latency: out.latency,
        cpu: Some(load_cpu),
    });
    // Services every batch of which was issued (and, without errors, committed).
    let full_services = ((out.requests * a.batch).min(total) / a.instances).max(1);

    // 2. Memory and disk.
    if let Some(pid) = t.pid {
        let rss = stats::proc_status_bytes(pid, "VmRSS")?;
        let hwm = stats::proc_status_bytes(pid, "VmHWM")?;
        notes.push(format!(
            "server memory after the load: VmRSS {} ({:.0} bytes per instance), peak VmHWM {}",
            mib(rss),
            rss as f64 / loaded.max(1) as f64,
            mib(hwm)
        ));
    } else {
        notes.push("server memory: unknown (give --server-pid)".into());
    }
    if let Some(dir) = t.data_dir() {
        notes.push(format!("data dir after the load: {}", mib(dir_size(dir))));
    }

    // 3. Reads of whole services.
    let meter = CpuMeter::start(t.pid);
    let http = load::http_client(Some(Duration::from_secs(60)))?;
    let mut read_latency = Latency::new();
    let (mut ok, mut bad) = (0u64, 0u64);
    let mut first_bad = None;
    // A fixed sequence, so every run reads the same services.
    let mut pick = XorShift::new(0x9E37_79B9_7F4A_7C15);
    let reads_started = Instant::now();
    for _ in 0..a.reads {
        let s = pick.below(full_services);
        let t0 = Instant::now();
        let r = count_instances(&http, &t.http, &service_name(&run, s)).await;
        read_latency.record(t0.elapsed());
        match r {
            Ok(n) if n == a.instances => ok += 1,
            Ok(n) => {
                bad += 1;
                first_bad.get_or_insert_with(|| {
                    format!("service {s} has {n} instances, not {}", a.instances)
                });
            }
            Err(e) => {
                bad += 1;
                first_bad.get_or_insert_with(|| format!("service {s}: {e:#}"));
            }
        }
    }
    rows.push(Row {
        scenario: "scale read: GET one service (HTTP)".into(),
        params: format!(
            "{} random services of {} instances, sequential",
            a.reads, a.instances
        ),
        ops: ok,
        errors: bad,
        secs: reads_started.elapsed().as_secs_f64(),
        unit: "reads/s",
        latency: read_latency,
        cpu: Some(meter.stop()),
    });
    if let Some(b) = first_bad {
        notes.push(format!("scale read: {bad} reads wrong; first: {b}"));
    }

    // 4. Stop and restart on the same data.
    if !t.is_spawned() {
        notes.push("restart: skipped (the server was not spawned by this tool)".into());
    } else if a.no_restart {
        notes.push("restart: skipped (--no-restart)".into());
    } else {
        restart(t, a, &run, full_services, loaded, &mut rows, &mut notes).await?;
    }
    print_table("scale", &rows, &notes);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn restart(
    t: &mut Target,
    a: &ScaleArgs,
    run: &str,
    full_services: u64,
    loaded: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let old_pid = t.pid;
    let server_cpu_before = old_pid.and_then(|p| stats::cpu_seconds(&p.to_string()).ok());
    let (took, status) = t.stop(Duration::from_secs(120)).await?;
    notes.push(format!(
        "SIGTERM -> exit: {:.1} ms ({status}); the server used {} CPU in all before it",
        took.as_secs_f64() * 1000.0,
        server_cpu_before
            .map(|c| format!("{c:.2} s"))
            .unwrap_or_else(|| "?".into())
    ));

    let meter = CpuMeter::start(None);
    let started = t.start().await?;
    let http = load::http_client(Some(Duration::from_secs(60)))?;
    let limit = Duration::from_secs(600);
    // /readyz answers 200.
    let ready_at = loop {
        anyhow::ensure!(
            started.spawned_at.elapsed() < limit,
            "not ready within {limit:?} of the restart"
        );
        let ok = http
            .get(format!("{}/readyz", t.http))
            .send()
            .await
            .map(|r| r.status() == reqwest::StatusCode::OK)
            .unwrap_or(false);
        if ok {
            break started.spawned_at.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // One service (the last one loaded) answers with all its instances.
    let probe = service_name(run, full_services - 1);
    let mut get = Latency::new();
    let verified_at = loop {
        anyhow::ensure!(
            started.spawned_at.elapsed() < limit,
            "{probe} did not return its {} instances within {limit:?} of the restart",
            a.instances
        );
        let t0 = Instant::now();
        let n = count_instances(&http, &t.http, &probe).await.unwrap_or(0);
        get.record(t0.elapsed());
        if n == a.instances {
            break started.spawned_at.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut cpu = meter.stop();
    // The new process's whole life so far is the restart.
    cpu.server = t.pid.and_then(|p| stats::cpu_seconds(&p.to_string()).ok());
    rows.push(Row {
        scenario: "scale restart: spawn -> /readyz 200 + GET ok".into(),
        params: format!("{loaded} instances on disk, probe {NAMESPACE}/{probe}"),
        ops: 1,
        errors: 0,
        secs: verified_at.as_secs_f64(),
        unit: "",
        latency: get,
        cpu: Some(CpuUsed {
            wall: verified_at,
            ..cpu
        }),
    });
    notes.push(format!(
        "restart: spawn -> `sextant serving` log line {:.3} s, -> /readyz 200 {:.3} s, -> GET {NAMESPACE}/{probe} with {} instances {:.3} s (latency columns of the restart row: the GET(s) of the probe)",
        started.until_serving.as_secs_f64(),
        ready_at.as_secs_f64(),
        a.instances,
        verified_at.as_secs_f64()
    ));
    if let Some(pid) = t.pid {
        let rss = stats::proc_status_bytes(pid, "VmRSS")?;
        let hwm = stats::proc_status_bytes(pid, "VmHWM")?;
        notes.push(format!(
            "server memory after the restart: VmRSS {} ({:.0} bytes per instance), peak VmHWM {}",
            mib(rss),
            rss as f64 / loaded.max(1) as f64,
            mib(hwm)
        ));
    }
    Ok(())
}
