//! Scenario `register`: durable registration throughput and latency, over HTTP `PUT`, gRPC
//! `Register` and gRPC `BatchRegister`, each phase on new services of its own.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::load::{self, NAMESPACE};
use crate::stats::{print_table, CpuMeter, Row};
use crate::target::Target;

#[derive(Args, Debug, Clone)]
pub struct RegisterArgs {
    /// Concurrent clients, each with its own connection and one request in flight.
    #[arg(long, short = 'c', default_value_t = 32)]
    pub clients: usize,
    /// Instances registered in each phase.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    pub instances: u64,
    /// Instances per BatchRegister call.
    #[arg(long, short = 'b', default_value_t = 100)]
    pub batch: u64,
    /// Services the instances of a phase are spread over (round robin).
    #[arg(long, default_value_t = 100)]
    pub services: u64,
    /// Phases to run.
    #[arg(long, value_delimiter = ',', default_value = "http,grpc,grpc-batch")]
    pub modes: Vec<Mode>,
    /// Longest a phase may run; it stops issuing requests after that.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// TTL of the registered instances in seconds: ephemeral instances with a lease, not
    /// renewed during the run (0: persistent).
    #[arg(long, default_value_t = 0)]
    pub ttl: u32,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `PUT /v1/namespaces/{ns}/services/{svc}/instances/{id}`, one instance per request.
    Http,
    /// gRPC `Register`, one instance per call.
    Grpc,
    /// gRPC `BatchRegister`, `--batch` instances per call.
    GrpcBatch,
}

pub async fn run(t: &Target, a: &RegisterArgs) -> anyhow::Result<()> {
    let (rows, notes) = measure(t, a, "", &load::run_id()).await?;
    let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
    print_table("register", &rows, &notes);
    Ok(())
}

/// Runs every phase of `a.modes` against Sextant; one row per phase (names after `prefix`).
/// `run` goes into the service names, so that runs on one server do not collide.
pub(crate) async fn measure(
    t: &Target,
    a: &RegisterArgs,
    prefix: &str,
    run: &str,
) -> anyhow::Result<(Vec<(Mode, Row)>, Vec<String>)> {
    anyhow::ensure!(
        a.clients > 0 && a.instances > 0 && a.batch > 0 && a.services > 0,
        "sizes must be positive"
    );
    let run = run.to_string();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &mode in &a.modes {
        let mut params = format!("C={} N={} services={}", a.clients, a.instances, a.services);
        if a.ttl > 0 {
            params.push_str(&format!(" ttl={}s", a.ttl));
        }
        let ttl = a.ttl;
        let meter = CpuMeter::start(t.pid);
        let (name, params, out) = match mode {
            Mode::Http => {
                // The lean keep-alive client: a general one costs the tool more CPU per request
                // than the server spends on it, on the cores they share.
                let h1 = Arc::new(crate::h1::H1::new(
                    &t.http,
                    a.clients,
                    Duration::from_secs(60),
                )?);
                let services = a.services;
                let run = run.clone();
                let out = load::drive(a.clients, a.instances, a.deadline, move |w, i| {
                    let svc = format!("reg-http-{run}-{:04}", i % services);
                    let path = format!("/v1/namespaces/{NAMESPACE}/services/{svc}/instances/i{i}");
                    let mut body = load::http_body(i);
                    if ttl > 0 {
                        body["ttl_seconds"] = ttl.into();
                    }
                    let body = serde_json::to_vec(&body).map(bytes::Bytes::from);
                    let h1 = h1.clone();
                    async move {
                        let (status, answer) =
                            h1.send(w, hyper::Method::PUT, &path, Some(body?)).await?;
                        anyhow::ensure!(
                            status.is_success(),
                            "PUT {path}: {status}: {}",
                            String::from_utf8_lossy(&answer)
                        );
                        Ok(1)
                    }
                })
                .await;
                ("register http PUT", params, out)
            }
            Mode::Grpc => {
                let clients = Arc::new(load::grpc_clients(&t.grpc, a.clients).await?);
                let services = a.services;
                let run = run.clone();
                let out = load::drive(a.clients, a.instances, a.deadline, move |w, i| {
                    let mut c = clients[w].clone();
                    let svc = format!("reg-grpc-{run}-{:04}", i % services);
                    let mut req = load::grpc_request(&svc, format!("i{i}"), i);
                    req.ttl_seconds = ttl;
                    async move {
                        c.register(req).await?;
                        Ok(1)
                    }
                })
                .await;
                ("register gRPC Register", params, out)
            }
            Mode::GrpcBatch => {
                let clients = Arc::new(load::grpc_clients(&t.grpc, a.clients).await?);
                let (services, batch, total) = (a.services, a.batch, a.instances);
                let run = run.clone();
                let requests = total.div_ceil(batch);
                let out = load::drive(a.clients, requests, a.deadline, move |w, n| {
                    let c = clients[w].clone();
                    let instances: Vec<_> = (n * batch..((n + 1) * batch).min(total))
                        .map(|i| {
                            let svc = format!("reg-batch-{run}-{:04}", i % services);
                            let mut req = load::grpc_request(&svc, format!("i{i}"), i);
                            req.ttl_seconds = ttl;
                            req
                        })
                        .collect();
                    load::batch_register(c, instances)
                })
                .await;
                (
                    "register gRPC BatchRegister",
                    format!("{params} B={} (latency per batch)", a.batch),
                    out,
                )
            }
        };
        let cpu = meter.stop();
        notes.extend(out.notes(name));
        notes.push(format!(
            "{name}: {} requests, {:.0} requests/s",
            out.requests,
            out.requests as f64 / out.elapsed.as_secs_f64().max(1e-9)
        ));
        rows.push((
            mode,
            out.row(format!("{prefix}{name}"), params, "inst/s", Some(cpu)),
        ));
    }
    Ok((rows, notes))
}
