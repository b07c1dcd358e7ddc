//! `sextant-bench`: the load tool for Sextant. It owns the benchmark scenarios — `register`
//! (durable registration throughput and latency over HTTP, gRPC and gRPC batches), `push`
//! (watch push latency and completeness over SSE, every event accounted for) and `scale`
//! (a million instances: load throughput, memory, restart time), `health` (the scanner probing
//! many endpoints: probes/s, cycle lag), `xds` (ADS streams subscribed to one service's EDS:
//! push latency, delivery, memory and CPU per push), `compare` (register and push side by side against
//! ZooKeeper and etcd, which it starts itself), `consul` (blocking-query wakeups of many Consul
//! watchers, DNS queries/s side by side with dnsmasq), `cluster` (etcd and several nodes it
//! starts itself: registrations via the leader vs raw etcd, cross-node push, SDK failover after
//! kill -9, a node joining) — and their measurement:
//! latency percentiles, and the CPU seconds the server and this tool each used, read from
//! `/proc`, because both usually share one small machine.
//!
//! It drives a node that is already running (`--http`, `--grpc`, and `--server-pid` for its
//! CPU and memory), or starts one itself (`--spawn path/to/sextant`) on loopback ports chosen
//! by the kernel with a temporary data dir, and stops it at the end. Every loop is bounded in
//! count and in time; only loopback addresses are meant as targets.
//!
//! File descriptors: `push` holds one connection per subscriber, so each side needs about
//! `--watchers` descriptors more than usual. The tool raises its soft `RLIMIT_NOFILE` to the
//! hard limit when it starts, and a server it spawns inherits that; for a server started by
//! hand, raise the limit in its shell (`ulimit -n 65536`) first.
#![forbid(unsafe_code)]

mod cluster;
mod compare;
mod connections;
mod consul;
mod etcd;
mod h1;
mod health;
mod load;
mod nacos;
mod nacos_compare;
mod nacos_grpc;
mod peers;
mod push;
mod register;
mod scale;
mod stats;
mod target;
mod xds;
mod zk;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::target::Target;

#[derive(Parser, Debug)]
#[command(
    name = "sextant-bench",
    version,
    about = "Load tool for Sextant: registration throughput, watch push latency, scale and restart.",
    long_about = "Load tool for Sextant: registration throughput, watch push latency, scale and restart.\n\n\
        Drives a running node (--http, --grpc, --server-pid) or starts one itself (--spawn PATH \
        to the sextant binary, with a temporary data dir and kernel-chosen loopback ports). \
        Each scenario prints a Markdown table: operations, seconds, throughput, latency \
        p50/p99/p999/max and the CPU seconds the server and this tool used."
)]
struct Cli {
    /// Start this `sextant` binary (`serve` on 127.0.0.1:0) with a temporary data dir, and stop
    /// it at the end. It starts with every `SEXTANT_*` variable cleared, so the shell cannot
    /// change the server under test; configure it with --server-arg.
    #[arg(help_heading = "Server under test", long, global = true, conflicts_with_all = ["http", "grpc", "server_pid"])]
    spawn: Option<PathBuf>,
    /// Base URL of a running node's HTTP API.
    #[arg(
        help_heading = "Server under test",
        long,
        global = true,
        default_value = "http://127.0.0.1:8470"
    )]
    http: String,
    /// URL of a running node's gRPC API.
    #[arg(
        help_heading = "Server under test",
        long,
        global = true,
        default_value = "http://127.0.0.1:8471"
    )]
    grpc: String,
    /// CA certificate (PEM) to trust for `https://` targets (--http, --grpc).
    #[arg(
        help_heading = "Server under test",
        long,
        global = true,
        value_name = "FILE"
    )]
    tls_ca: Option<PathBuf>,
    /// With --spawn: serve TLS on every listener, with a certificate from a CA made for this
    /// run (the tool's clients trust it), to compare with a run without.
    #[arg(
        help_heading = "Server under test",
        long,
        global = true,
        requires = "spawn"
    )]
    spawn_tls: bool,
    /// Pid of the running node, for its CPU time and memory (from /proc).
    #[arg(help_heading = "Server under test", long, global = true)]
    server_pid: Option<u32>,
    /// With --spawn: where to create the temporary directory [default: the system's].
    #[arg(help_heading = "Server under test", long, global = true)]
    data_parent: Option<PathBuf>,
    /// With --spawn: keep the data dir and the server's log after the run.
    #[arg(help_heading = "Server under test", long, global = true)]
    keep_data: bool,
    /// With --spawn: one more argument for `sextant serve` (repeatable), e.g.
    /// --server-arg=--event-log-per-service=4096
    #[arg(
        long = "server-arg",
        global = true,
        allow_hyphen_values = true,
        value_name = "ARG"
    )]
    server_args: Vec<String>,
    /// With --spawn: longest wait for the server's `sextant serving` line.
    #[arg(help_heading = "Server under test", long, global = true, default_value = "300s", value_parser = humantime::parse_duration)]
    startup_timeout: Duration,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// C clients register N durable instances: HTTP PUT, gRPC Register, gRPC BatchRegister.
    Register(register::RegisterArgs),
    /// W SSE subscribers watch a service of I instances while its statuses change at R/s;
    /// push latency (ack -> arrival) and delivered/expected over every (subscriber, event).
    Push(push::PushArgs),
    /// Load S services × I instances with BatchRegister; memory; SIGTERM, restart, time to ready.
    Scale(scale::ScaleArgs),
    /// The health scanner probing many endpoints: probes/s against a full cycle, cycle lag, CPU.
    Health(health::HealthArgs),
    /// C concurrent gRPC watch streams on one node: server RSS per stream, push latency at that count.
    Connections(connections::ConnectionsArgs),
    /// N ADS streams (SotW and/or delta) subscribed to one service's EDS while it changes at
    /// R/s: push latency from the write, delivery of every change, RSS per stream, CPU per push.
    Xds(xds::XdsArgs),
    /// Sextant, ZooKeeper and etcd one after another in this run, same work, native protocols:
    /// register throughput and push latency side by side, with ratios. Starts the peers itself.
    Compare(Box<compare::CompareArgs>),
    /// Any Nacos server through the Nacos API (--nacos-addr, gRPC at its port + 1000; or a
    /// Sextant started with --spawn): HTTP registration and instance-list throughput, and push
    /// latency to W Nacos 2.x gRPC subscribers while one instance changes at R/s.
    Nacos(Box<nacos::NacosArgs>),
    /// The `nacos` phases on Sextant's Nacos adapter and on rnacos, one after the other, each
    /// started by the tool on fresh data, with ratios Sextant/rnacos.
    NacosCompare(Box<nacos_compare::NacosCompareArgs>),
    /// A cluster on etcd (needs --spawn: the sextant binary): 1 etcd and --nodes nodes started
    /// here; registrations/s via the leader vs raw etcd puts with a lease, push leader ->
    /// follower vs same node, SDK failover after kill -9, a node joining a large registry.
    Cluster(Box<cluster::ClusterArgs>),
    /// Consul's API: W blocking-query watchers woken by K changes at R/s (latency from the
    /// write's ack, delivery of every change), then DNS queries/s from C UDP clients,
    /// side by side with dnsmasq (--dnsmasq PATH) when it is installed.
    Consul(Box<consul::ConsulArgs>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit of open files to the hard limit; returns the limit now in force.
fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
    getrlimit(Resource::Nofile).current
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fds = raise_fd_limit();
    if let Some(ca) = &cli.tls_ca {
        let pem = anyhow::Context::with_context(std::fs::read(ca), || {
            format!("cannot read {}", ca.display())
        })?;
        load::trust_ca(pem)?;
    }
    let watchers = match &cli.scenario {
        Scenario::Push(p) => Some(p.watchers),
        Scenario::Compare(c) => Some(c.watchers.max(c.peer_watchers.unwrap_or(0))),
        Scenario::Nacos(n) => Some(n.work.watchers),
        Scenario::NacosCompare(n) => Some(n.work.watchers),
        Scenario::Consul(c) => Some(c.watchers),
        Scenario::Cluster(c) => Some(c.watchers),
        _ => None,
    };
    if let (Some(watchers), Some(limit)) = (watchers, fds) {
        if (watchers as u64) + 256 > limit {
            eprintln!(
                "warning: {watchers} watchers need more open files than RLIMIT_NOFILE {limit} allows"
            );
        }
    }
    // The Nacos scenarios drive Nacos ports and start their servers themselves.
    let launch = nacos_compare::Launch {
        data_parent: cli.data_parent.clone(),
        keep_data: cli.keep_data,
        sextant_args: cli.server_args.clone(),
        startup_timeout: cli.startup_timeout,
    };
    match &cli.scenario {
        Scenario::Nacos(a) => {
            let r = nacos_compare::run_one(a, cli.spawn.as_deref(), cli.server_pid, &launch).await;
            println!("load average at the end: {}", load_average());
            return r;
        }
        Scenario::NacosCompare(a) => {
            let r = nacos_compare::run_compare(a, cli.spawn.as_deref(), &launch).await;
            println!("load average at the end: {}", load_average());
            return r;
        }
        Scenario::Cluster(a) => {
            let bin = cli.spawn.clone().ok_or_else(|| {
                anyhow::anyhow!("cluster starts its nodes itself: give --spawn PATH to sextant")
            })?;
            let launch = cluster::Launch {
                bin,
                data_parent: cli.data_parent.clone(),
                keep_data: cli.keep_data,
                server_args: cli.server_args.clone(),
                startup_timeout: cli.startup_timeout,
            };
            return cluster::run(a, launch).await;
        }
        _ => {}
    }
    let (mut target, serving) = match &cli.spawn {
        Some(bin) => {
            let (t, s) = Target::spawn(
                bin,
                cli.data_parent.as_deref(),
                cli.keep_data,
                cli.server_args.clone(),
                cli.startup_timeout,
                cli.spawn_tls,
            )
            .await?;
            (t, Some(s.until_serving))
        }
        None => (
            Target::attach(cli.http.clone(), cli.grpc.clone(), cli.server_pid),
            None,
        ),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# sextant-bench {}: http {} grpc {} server pid {} ({}); {cores} cores, load average {} at start, RLIMIT_NOFILE {}",
        match cli.scenario {
            Scenario::Register(_) => "register",
            Scenario::Push(_) => "push",
            Scenario::Scale(_) => "scale",
            Scenario::Health(_) => "health",
            Scenario::Connections(_) => "connections",
            Scenario::Xds(_) => "xds",
            Scenario::Compare(_) => "compare",
            Scenario::Consul(_) => "consul",
            Scenario::Nacos(_) | Scenario::NacosCompare(_) | Scenario::Cluster(_) => {
                unreachable!("handled above")
            }
        },
        target.http,
        target.grpc,
        target.pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into()),
        match serving {
            Some(d) => format!("spawned, serving after {:.0} ms", d.as_secs_f64() * 1000.0),
            None => "attached".into(),
        },
        load_average(),
        fds.map(|f| f.to_string()).unwrap_or_else(|| "unlimited".into()),
    );
    let result = match &cli.scenario {
        Scenario::Register(a) => register::run(&target, a).await,
        Scenario::Push(a) => push::run(&target, a).await,
        Scenario::Scale(a) => scale::run(&mut target, a).await,
        Scenario::Health(a) => health::run(&mut target, a).await,
        Scenario::Connections(a) => connections::run(&target, a).await,
        Scenario::Xds(a) => xds::run(&target, a).await,
        Scenario::Compare(a) => compare::run(&target, a).await,
        Scenario::Consul(a) => consul::run(&target, a).await,
        Scenario::Nacos(_) | Scenario::NacosCompare(_) | Scenario::Cluster(_) => {
            unreachable!("handled above")
        }
    };
    println!("load average at the end: {}", load_average());
    let log = target.log();
    let log_path = target.log_path().map(|p| p.display().to_string());
    target.finish().await;
    if let Some(summary) = log.and_then(|l| l.summary()) {
        println!("{summary}");
        if let (Some(p), true) = (log_path, cli.keep_data) {
            println!("server log: {p}");
        }
    }
    result
}
