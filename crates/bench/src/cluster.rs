//! Scenario `cluster` (issue 11): Sextant as a cluster on etcd, on this one machine. The tool
//! starts one etcd (as `compare` does, [`Peer`]) and `--nodes` release `sextant serve --store
//! etcd` nodes on one key prefix ([`Target`], with kill -9 and restart), finds the leader
//! through `GET /v1/cluster`, and measures, with the CPU of every process (etcd, each node,
//! this tool) over every phase:
//!
//! - `register`: HTTP single registrations of ephemeral instances (C clients) through the
//!   leader, then raw etcd puts with a lease by the same tool and the same concurrency on the
//!   same etcd member, with the ratio (target ≥ 2×);
//! - `push`: W SSE watchers on the leader, then W on a follower, while the tool writes on the
//!   leader: write-to-delivery latency of each, every (watcher, change) pair accounted for
//!   (the `push` scenario's machinery, target: cross-node p99 ≤ 2× same-node p99);
//! - `failover`: an SDK client (`sextant-client`, every node in its server list, the leader
//!   first: writes and heartbeats must reach the leader) holding N ephemeral instances and a
//!   watch on their service, while the tool changes another instance of it at R/s; kill -9 of
//!   the node the client uses, then the time until its watch stream is open on another node
//!   and until a heartbeat succeeds again, every acknowledged change accounted for in what the
//!   client saw, and none of its instances deleted (K rounds; the killed node restarts between);
//! - `join`: a registry of `--join-services` × `--join-instances` persistent instances loaded
//!   through the leader, then a new node joins: time until its applied revision reaches the
//!   store's head, and its RSS next to the other nodes' and to a single node (`--store memory`)
//!   loaded with the same instances.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::Value;
use sextant_client::{Change, Client, Registration, ServiceName};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::compare::{quantile_ms, ratio, target_line};
use crate::load::{self, NAMESPACE};
use crate::peers::{Peer, PeerOptions, System};
use crate::push::{PushArgs, PushResult};
use crate::register::{self, Mode, RegisterArgs};
use crate::scale::{self, ScaleArgs};
use crate::stats::{self, mib, print_table, Latency, ProcsCpu, ProcsMeter, Row};
use crate::target::Target;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Register,
    Push,
    Failover,
    Join,
}

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Sextant nodes on the etcd prefix (push and failover need at least 2).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Phases to run, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "register,push,failover,join"
    )]
    pub phases: Vec<Phase>,
    /// The nodes' `--cluster-lease-seconds` (a dead leader is replaced about this long after
    /// its last renewal).
    #[arg(long, default_value_t = 3)]
    pub lease_seconds: u64,
    /// register and push: how many times to run each side (alternating), for the spread.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// register: concurrent clients, one request in flight each.
    #[arg(help_heading = "register", long, short = 'c', default_value_t = 32)]
    pub clients: usize,
    /// register: instances registered in each timed phase.
    #[arg(help_heading = "register", long, short = 'n', default_value_t = 20_000)]
    pub instances: u64,
    /// register: services the instances are spread over.
    #[arg(help_heading = "register", long, default_value_t = 100)]
    pub services: u64,
    /// register: untimed registrations of the same kind before each timed phase.
    #[arg(help_heading = "register", long, default_value_t = 5_000)]
    pub warmup: u64,
    /// register: TTL of the ephemeral instances, seconds (etcd's leases: 3600 s); not renewed
    /// during the phase.
    #[arg(help_heading = "register", long, default_value_t = 3600)]
    pub ttl: u32,
    /// register: longest a phase may run.
    #[arg(help_heading = "register", long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub register_deadline: Duration,
    /// push: watchers on one node (SSE, one connection each).
    #[arg(help_heading = "push", long, short = 'w', default_value_t = 1000)]
    pub watchers: usize,
    /// push: instances of the watched service.
    #[arg(help_heading = "push", long, default_value_t = 1000)]
    pub push_instances: u64,
    /// push: changes per second (one at a time, each acknowledged before the next).
    #[arg(help_heading = "push", long, short = 'r', default_value_t = 50.0)]
    pub rate: f64,
    /// push: changes in all.
    #[arg(help_heading = "push", long, short = 'k', default_value_t = 200)]
    pub changes: u64,
    /// push: longest wait for every watcher's first snapshot.
    #[arg(help_heading = "push", long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// push: longest wait after the last write for every watcher to have it.
    #[arg(help_heading = "push", long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// failover: rounds (kill -9, measure, restart the killed node).
    #[arg(help_heading = "failover", long, default_value_t = 5)]
    pub rounds: usize,
    /// failover: ephemeral instances the SDK client registers.
    #[arg(help_heading = "failover", long, default_value_t = 100)]
    pub failover_instances: u64,
    /// failover: TTL of the client's instances (the SDK heartbeats every third of it).
    #[arg(help_heading = "failover", long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub failover_ttl: Duration,
    /// failover: changes per second the tool writes to the watched service (on the leader).
    #[arg(help_heading = "failover", long, default_value_t = 20.0)]
    pub failover_rate: f64,
    /// failover: longest wait, after a kill, for the client to resume.
    #[arg(help_heading = "failover", long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub failover_timeout: Duration,
    /// join: services of the registry the new node joins.
    #[arg(help_heading = "join", long, default_value_t = 10_000)]
    pub join_services: u64,
    /// join: instances per service.
    #[arg(help_heading = "join", long, default_value_t = 100)]
    pub join_instances: u64,
    /// join: instances per BatchRegister call of the load.
    #[arg(help_heading = "join", long, default_value_t = 1000)]
    pub join_batch: u64,
    /// join: BatchRegister calls in flight during the load.
    #[arg(help_heading = "join", long, default_value_t = 4)]
    pub join_concurrency: usize,
    /// join: longest the load may run (it stops issuing batches after that).
    #[arg(help_heading = "join", long, default_value = "900s", value_parser = humantime::parse_duration)]
    pub load_deadline: Duration,
    /// join: longest wait for the new node to catch up.
    #[arg(help_heading = "join", long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub join_timeout: Duration,
    /// join: skip the single node (`--store memory`) loaded with the same instances for its RSS.
    #[arg(help_heading = "join", long)]
    pub no_single: bool,
    #[command(flatten)]
    pub peers: PeerOptions,
}

/// How the nodes are started (from the global options).
pub struct Launch {
    pub bin: std::path::PathBuf,
    pub data_parent: Option<std::path::PathBuf>,
    pub keep_data: bool,
    pub server_args: Vec<String>,
    pub startup_timeout: Duration,
}

/// Longest wait for one leader that every live node names.
const LEADER_WAIT: Duration = Duration::from_secs(60);

/// etcd and the nodes on one prefix.
struct Cluster {
    etcd: Peer,
    nodes: Vec<Target>,
    node_args: Vec<String>,
    launch: Launch,
    http: reqwest::Client,
}

/// A node's `/v1/cluster` answer, `Null` when it does not answer.
async fn view(http: &reqwest::Client, node: &str) -> Value {
    match http.get(format!("{node}/v1/cluster")).send().await {
        Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

impl Cluster {
    async fn start(n: usize, a: &ClusterArgs, launch: Launch) -> anyhow::Result<Cluster> {
        anyhow::ensure!(n >= 1, "--nodes must be at least 1");
        let etcd = Peer::start(System::Etcd, &a.peers).await?;
        let mut node_args: Vec<String> = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint,
            "--etcd-prefix",
            &format!("/sextant-bench-{}/", load::run_id()),
            "--cluster-lease-seconds",
            &a.lease_seconds.to_string(),
            "--no-nacos",
            "--no-dns",
            "--no-consul",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        node_args.extend(launch.server_args.iter().cloned());
        let mut c = Cluster {
            etcd,
            nodes: Vec::new(),
            node_args,
            launch,
            http: load::http_client(Some(Duration::from_secs(2)))?,
        };
        for _ in 0..n {
            c.add_node().await?;
        }
        Ok(c)
    }

    /// Starts one more node; its index and how long until it logged `sextant serving`.
    async fn add_node(&mut self) -> anyhow::Result<(usize, Duration)> {
        let (t, started) = Target::spawn(
            &self.launch.bin,
            self.launch.data_parent.as_deref(),
            self.launch.keep_data,
            self.node_args.clone(),
            self.launch.startup_timeout,
            false,
        )
        .await?;
        self.nodes.push(t);
        Ok((self.nodes.len() - 1, started.until_serving))
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].pid.is_some())
            .collect()
    }

    /// Waits (bounded) until exactly one live node leads and every other live node names it.
    async fn leader(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let live = self.alive();
            let mut views = Vec::new();
            for &i in &live {
                views.push((i, view(&self.http, &self.nodes[i].http).await));
            }
            let leaders: Vec<usize> = views
                .iter()
                .filter(|(_, v)| v["role"] == "leader")
                .map(|(i, _)| *i)
                .collect();
            if let [l] = leaders.as_slice() {
                let addr = &self.nodes[*l].http;
                if views.iter().all(|(i, v)| {
                    i == l
                        || v["leader"]
                            .as_str()
                            .is_some_and(|s| s.contains(addr.as_str()))
                }) {
                    return Ok(*l);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no single leader within {within:?}: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// (name, pid) of etcd and of every live node, for [`ProcsMeter`].
    fn procs(&self, leader: Option<usize>) -> Vec<(String, u32)> {
        let mut v = vec![("etcd".to_string(), self.etcd.pid)];
        for (i, t) in self.nodes.iter().enumerate() {
            if let Some(pid) = t.pid {
                let role = if Some(i) == leader { " (leader)" } else { "" };
                v.push((format!("node {i}{role}"), pid));
            }
        }
        v
    }

    async fn stop(mut self) {
        for t in self.nodes.drain(..) {
            t.finish().await;
        }
        self.etcd.stop().await;
    }
}

fn load_average() -> String {
    crate::compare::load_average()
}

pub async fn run(a: &ClusterArgs, launch: Launch) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# sextant-bench cluster: 1 etcd + {} nodes, lease {} s; {cores} cores, load average {} at start",
        a.nodes,
        a.lease_seconds,
        load_average()
    );
    let bin = launch.bin.clone();
    let single = (
        launch.data_parent.clone(),
        launch.keep_data,
        launch.startup_timeout,
    );
    let mut c = Cluster::start(a.nodes, a, launch).await?;
    println!(
        "etcd {} (pid {}) at {}; nodes: {}",
        c.etcd.version,
        c.etcd.pid,
        c.etcd.endpoint,
        c.nodes
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{i}: {} pid {:?}", t.http, t.pid))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut failures = Vec::new();
    for &phase in &a.phases {
        eprintln!("cluster: {phase:?} (load average {})", load_average());
        let r = match phase {
            Phase::Register => phase_register(&c, a).await,
            Phase::Push => phase_push(&c, a).await,
            Phase::Failover => phase_failover(&mut c, a).await,
            Phase::Join => phase_join(&mut c, a, &bin, &single).await,
        };
        if let Err(e) = r {
            eprintln!("cluster: {phase:?} failed: {e:#}");
            failures.push(format!("{phase:?}: {e:#}"));
        }
    }
    let logs: Vec<String> = c
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            t.log()
                .and_then(|l| l.summary())
                .map(|s| format!("node {i}: {s}"))
        })
        .collect();
    let etcd_log = c.etcd.log_summary();
    c.stop().await;
    for l in logs.iter().chain(etcd_log.iter()) {
        println!("- {l}");
    }
    println!("load average at the end: {}", load_average());
    anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}

async fn phase_register(c: &Cluster, a: &ClusterArgs) -> anyhow::Result<()> {
    let l = c.leader(LEADER_WAIT).await?;
    let leader = &c.nodes[l];
    let args = |instances| RegisterArgs {
        clients: a.clients,
        instances,
        batch: 1,
        services: a.services,
        modes: vec![Mode::Http],
        deadline: a.register_deadline,
        ttl: a.ttl,
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for rep in 0..a.repeat {
        let run = format!("{}r{rep}", load::run_id());
        if a.warmup > 0 {
            register::measure(leader, &args(a.warmup), "", &format!("{run}w")).await?;
        }
        let m = ProcsMeter::start(&c.procs(Some(l)));
        let (r, n) = register::measure(
            leader,
            &args(a.instances),
            &format!("{} nodes, via the leader: ", c.alive().len()),
            &run,
        )
        .await?;
        let cpu = m.stop();
        let row = r.into_iter().next().map(|(_, row)| row).context("no row")?;
        notes.extend(n);
        notes.push(format!("sextant round {rep}: {}", cpu.describe()));

        let ep = &c.etcd.endpoint;
        if a.warmup > 0 {
            let w = args(a.warmup);
            crate::etcd::register(ep, &w, "", &format!("{run}ew"), Some(c.etcd.pid), true).await?;
        }
        let m = ProcsMeter::start(&c.procs(Some(l)));
        let (erow, n) = crate::etcd::register(
            ep,
            &args(a.instances),
            "raw etcd (same member): ",
            &format!("{run}e"),
            Some(c.etcd.pid),
            true,
        )
        .await?;
        let ecpu = m.stop();
        notes.extend(n);
        notes.push(format!("etcd round {rep}: {}", ecpu.describe()));
        let rate = |r: &Row| r.ops as f64 / r.secs.max(1e-9);
        notes.push(target_line(
            &format!("round {rep}: sextant HTTP PUT via the leader / etcd Put with lease"),
            Some(rate(&row)),
            Some(rate(&erow)),
            Some(2.0),
        ));
        per_k_cpu(&mut notes, &row, &cpu);
        per_k_cpu(&mut notes, &erow, &ecpu);
        rows.push(row);
        rows.push(erow);
    }
    notes.push(format!(
        "every timed phase followed an untimed warm-up of {} of the same kind; the Sextant instances are ephemeral (ttl {} s, not renewed during the phase), etcd's keys carry a lease (one per client, TTL 3600 s); both durable in the same etcd member before acknowledged",
        a.warmup, a.ttl
    ));
    print_table(
        &format!("cluster register: 1 etcd + {} nodes", c.alive().len()),
        &rows,
        &notes,
    );
    Ok(())
}

/// CPU per 1000 instances of each process over a register phase.
fn per_k_cpu(notes: &mut Vec<String>, row: &Row, cpu: &ProcsCpu) {
    let k = row.ops.max(1) as f64 / 1000.0;
    let mut parts: Vec<String> = cpu
        .procs
        .iter()
        .filter_map(|(n, c)| c.map(|c| format!("{n} {:.1} ms", 1000.0 * c / k)))
        .collect();
    parts.push(format!("bench {:.1} ms", 1000.0 * cpu.bench / k));
    notes.push(format!(
        "{}: CPU per 1000 instances: {}",
        row.scenario,
        parts.join(", ")
    ));
}

async fn phase_push(c: &Cluster, a: &ClusterArgs) -> anyhow::Result<()> {
    let l = c.leader(LEADER_WAIT).await?;
    let Some(f) = c.alive().into_iter().find(|&i| i != l) else {
        println!("\n(cluster push: skipped, it needs a follower: --nodes 2 or more)");
        return Ok(());
    };
    let pa = PushArgs {
        watchers: a.watchers,
        instances: a.push_instances,
        rate: a.rate,
        changes: a.changes,
        connect_concurrency: 64,
        ready_timeout: a.ready_timeout,
        drain_timeout: a.drain_timeout,
        deadline: Duration::from_secs(600),
    };
    let mut results: Vec<(bool, PushResult, ProcsCpu)> = Vec::new();
    for rep in 0..a.repeat {
        for cross in [false, true] {
            let (watched, label) = if cross {
                (
                    &c.nodes[f],
                    format!("cross-node {rep} (write on leader {l}, watch on follower {f}): "),
                )
            } else {
                (
                    &c.nodes[l],
                    format!("same-node {rep} (write and watch on leader {l}): "),
                )
            };
            let m = ProcsMeter::start(&c.procs(Some(l)));
            let mut r = crate::push::measure_across(&c.nodes[l], watched, &pa, &label).await?;
            let cpu = m.stop();
            r.notes.push(format!("{label}{}", cpu.describe()));
            print_table(&format!("cluster push: {label}"), &r.rows, &r.notes);
            results.push((cross, r, cpu));
        }
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (cross, r, _) in &results {
        let side = if *cross { "cross-node" } else { "same-node" };
        let params = format!(
            "W={} I={} R={}/s K={}",
            r.watchers, a.push_instances, a.rate, a.changes
        );
        rows.push(r.latency_row(
            format!("{side}: write sent -> event"),
            params.clone(),
            1,
            "events/s",
        ));
        rows.push(r.latency_row(format!("{side}: ack -> event"), params, 0, "events/s"));
        notes.push(format!(
            "{side}: delivered/expected {}/{} ({:.3}%), covered by resync {}, missing {}",
            r.delivered,
            r.expected,
            100.0 * r.delivered as f64 / r.expected.max(1) as f64,
            r.resynced,
            r.missing
        ));
    }
    for pair in results.chunks(2) {
        if let [(false, same, _), (true, cross, _)] = pair {
            for (what, s, x) in [
                ("write sent -> event", &same.sent, &cross.sent),
                ("ack -> event", &same.ack, &cross.ack),
            ] {
                let p99 = ratio(quantile_ms(x, 0.99), quantile_ms(s, 0.99));
                let met = match (quantile_ms(x, 0.99), quantile_ms(s, 0.99)) {
                    (Some(x), Some(s)) if s > 0.0 => {
                        if x / s <= 2.0 {
                            "met"
                        } else {
                            "MISSED"
                        }
                    }
                    _ => "-",
                };
                notes.push(format!(
                    "cross-node / same-node, {what}: p50 {}, p99 {p99} (target p99 <= 2x: {met})",
                    ratio(quantile_ms(x, 0.5), quantile_ms(s, 0.5))
                ));
            }
        }
    }
    notes.push("the leader publishes a change before it answers the write, so same-node events mostly beat the ack (counted 0 in the ack row); a follower applies the change from etcd's watch after the commit, so `write sent -> event` is the comparable row".into());
    print_table("cluster push: side by side", &rows, &notes);
    Ok(())
}

/// What the SDK client's update stream delivered: (revision, is an event of the changed
/// instance / else a snapshot or direct read, deletes of the client's own instances, arrival).
#[derive(Default)]
struct SdkSeen {
    events: Vec<(u64, Instant)>,
    /// Snapshots and direct reads: revision they are complete to, arrival.
    whole: Vec<(u64, Instant)>,
    client_deletes: Vec<String>,
}

/// Accounts for every acknowledged revision in what the client saw: (as an event of that
/// revision, covered by a snapshot or read complete to that revision or later, missing).
fn account(acked: &[u64], seen: &SdkSeen) -> (usize, usize, usize) {
    let events: std::collections::HashSet<u64> = seen.events.iter().map(|e| e.0).collect();
    let whole_max = seen.whole.iter().map(|w| w.0).max().unwrap_or(0);
    let (mut as_events, mut by_snapshot, mut missing) = (0, 0, 0);
    for rev in acked {
        if events.contains(rev) {
            as_events += 1;
        } else if *rev <= whole_max {
            by_snapshot += 1;
        } else {
            missing += 1;
        }
    }
    (as_events, by_snapshot, missing)
}

/// One failover round's timings (from the kill) and accounting.
struct Round {
    elected: Option<Duration>,
    watch: Option<Duration>,
    renewed: Option<Duration>,
    first_update: Option<Duration>,
    acked: usize,
    as_events: usize,
    by_snapshot: usize,
    missing: usize,
    note: String,
}

/// Writes `weight`s to instance `w0` of `svc` at `rate` on whichever of `nodes` (HTTP base
/// URLs, the leader first) leads, retrying a change until acknowledged or stopped, and asking
/// the nodes who leads after a failure (503 from a follower, or the node gone); (revision,
/// weight, attempts) of each.
async fn leader_writer(
    http: reqwest::Client,
    nodes: Vec<String>,
    svc: String,
    rate: f64,
    mut stop: watch::Receiver<bool>,
) -> Vec<(u64, u32, u32)> {
    let mut acked = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader = nodes.first().cloned().unwrap_or_default();
    for k in 0u32..1_000_000 {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return acked,
        }
        let weight = 1 + k % 1000;
        let mut attempts = 1u32;
        loop {
            if *stop.borrow() {
                return acked;
            }
            let url =
                format!("{leader}/v1/namespaces/{NAMESPACE}/services/{svc}/instances/w0/status");
            let r = http
                .patch(url)
                .json(&serde_json::json!({ "weight": weight }))
                .send()
                .await;
            let rev = match r {
                Ok(r) => load::check_http(r)
                    .await
                    .ok()
                    .and_then(|v| v["revision"].as_u64()),
                Err(_) => None,
            };
            if let Some(rev) = rev {
                acked.push((rev, weight, attempts));
                break;
            }
            attempts += 1;
            // Not the leader (503), or gone: ask the live nodes who leads now.
            tokio::time::sleep(Duration::from_millis(10)).await;
            for n in &nodes {
                if view(&http, n).await["role"] == "leader" {
                    leader = n.clone();
                    break;
                }
            }
        }
    }
    acked
}

async fn phase_failover(c: &mut Cluster, a: &ClusterArgs) -> anyhow::Result<()> {
    if c.alive().len() < 2 {
        println!("\n(cluster failover: skipped, it needs 2 nodes or more)");
        return Ok(());
    }
    let mut rounds = Vec::new();
    for round in 0..a.rounds {
        let r = failover_round(c, a, round).await;
        match r {
            Ok(r) => {
                eprintln!("failover round {round}: {}", r.note);
                rounds.push(r);
            }
            Err(e) => {
                eprintln!("failover round {round} failed: {e:#}");
                rounds.push(Round {
                    elected: None,
                    watch: None,
                    renewed: None,
                    first_update: None,
                    acked: 0,
                    as_events: 0,
                    by_snapshot: 0,
                    missing: 0,
                    note: format!("round {round} failed: {e:#}"),
                });
            }
        }
    }
    let lat = |f: &dyn Fn(&Round) -> Option<Duration>| {
        let mut l = Latency::new();
        let mut missing = 0;
        for r in &rounds {
            match f(r) {
                Some(d) => l.record(d),
                None => missing += 1,
            }
        }
        (l, missing)
    };
    let row = |name: &str, (l, missing): (Latency, u64)| Row {
        scenario: name.to_string(),
        params: format!(
            "K={} N={} ttl={:?} lease={}s",
            a.rounds, a.failover_instances, a.failover_ttl, a.lease_seconds
        ),
        ops: l.count(),
        errors: missing,
        secs: 0.0,
        unit: "",
        latency: l,
        cpu: None,
    };
    let rows = vec![
        row("kill -9 -> another node leads", lat(&|r| r.elected)),
        row(
            "kill -9 -> SDK watch open on another node",
            lat(&|r| r.watch),
        ),
        row(
            "kill -9 -> SDK heartbeat succeeds again",
            lat(&|r| r.renewed),
        ),
        row(
            "kill -9 -> both (watch resumed and renewed)",
            lat(&|r| r.watch.zip(r.renewed).map(|(w, h)| w.max(h))),
        ),
        row(
            "kill -9 -> first update after the kill",
            lat(&|r| r.first_update),
        ),
    ];
    let mut notes: Vec<String> = rounds.iter().map(|r| r.note.clone()).collect();
    let (acked, ev, snap, miss) = rounds.iter().fold((0, 0, 0, 0), |s, r| {
        (
            s.0 + r.acked,
            s.1 + r.as_events,
            s.2 + r.by_snapshot,
            s.3 + r.missing,
        )
    });
    notes.push(format!(
        "all rounds: {acked} acknowledged changes; the client saw {ev} as events, {snap} only through a snapshot or read of the service at a later revision, {miss} missing"
    ));
    notes.push(format!(
        "the SDK's server list is every node's gRPC address, the leader first, so the node it uses and kill -9s is the leader; it fails over to a follower, which takes its heartbeats at once (forwarding them to the leader once one is elected), while writes wait for the leader's etcd lease ({} s, renewed every third) to lapse and another node to lead; latency columns are over the K rounds (p99 of {} rounds is their maximum)",
        a.lease_seconds, a.rounds
    ));
    print_table(
        "cluster failover: kill -9 of the SDK client's node",
        &rows,
        &notes,
    );
    Ok(())
}

async fn failover_round(c: &mut Cluster, a: &ClusterArgs, round: usize) -> anyhow::Result<Round> {
    let l = c.leader(LEADER_WAIT).await?;
    let mut order = vec![l];
    order.extend(c.alive().into_iter().filter(|&i| i != l));
    let servers: Vec<String> = order.iter().map(|&i| c.nodes[i].grpc.clone()).collect();
    let https: Vec<String> = order.iter().map(|&i| c.nodes[i].http.clone()).collect();
    let svc_name = format!("failover-{}-{round}", load::run_id());
    let svc = ServiceName::new(NAMESPACE, &svc_name)?;

    // The changed instance, persistent, written by the tool.
    let w0 = load::http_body(0);
    load::check_http(
        c.http
            .put(format!(
                "{}/v1/namespaces/{NAMESPACE}/services/{svc_name}/instances/w0",
                c.nodes[l].http
            ))
            .json(&w0)
            .send()
            .await?,
    )
    .await
    .context("registering the changed instance")?;

    let client = Client::builder().servers(servers).build()?;
    let regs: Vec<Registration> = (0..a.failover_instances)
        .map(|i| {
            Registration::new(svc.clone(), load::host(i + 1), 8080)
                .id(format!("c{i}"))
                .ttl(a.failover_ttl)
        })
        .collect();
    client.register_many(regs).await?;
    client.get(&svc).await?;
    let mut updates = client.subscribe();
    let (stop_tx, stop_rx) = watch::channel(false);
    let own: std::collections::HashSet<String> =
        (0..a.failover_instances).map(|i| format!("c{i}")).collect();
    // The collector outlives the writer: it stops only once the client has the last change.
    let (seen_tx, mut stop_seen) = watch::channel(false);
    let collector = tokio::spawn(async move {
        let mut seen = SdkSeen::default();
        loop {
            let u = tokio::select! {
                u = updates.recv() => u,
                _ = stop_seen.changed() => break,
            };
            let Some(u) = u else { break };
            let at = Instant::now();
            match &u.change {
                Change::Status { id } | Change::Upsert { id } if id == "w0" => {
                    seen.events.push((u.revision, at))
                }
                Change::Snapshot { .. } | Change::Fetched => seen.whole.push((u.revision, at)),
                Change::Delete { id, reason } if own.contains(id) => {
                    seen.client_deletes.push(format!("{id} ({reason:?})"))
                }
                _ => {}
            }
        }
        seen
    });
    let writer = tokio::spawn(leader_writer(
        c.http.clone(),
        https.clone(),
        svc_name.clone(),
        a.failover_rate,
        stop_rx.clone(),
    ));
    // Steady state: the stream is open and heartbeats flow.
    let settle = Instant::now() + Duration::from_secs(10);
    while client.stats().watch_streams_opened == 0 || client.stats().heartbeats_sent < 2 {
        anyhow::ensure!(
            Instant::now() < settle,
            "the SDK client did not settle: {:?}",
            client.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failovers_before = client.stats().failovers;

    // Kill -9 the node the client uses (the leader, first in its list).
    let procs = c.procs(Some(l));
    let m = ProcsMeter::start(&procs);
    let killed_at = Instant::now();
    c.nodes[l].kill().await?;
    let s0 = client.stats();
    let (mut elected, mut watch_at, mut renewed, mut first_update) = (None, None, None, None);
    let survivors: Vec<String> = c.alive().iter().map(|&i| c.nodes[i].http.clone()).collect();
    let http = c.http.clone();
    let elect = tokio::spawn(async move {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            for n in &survivors {
                if view(&http, n).await["role"] == "leader" {
                    return Some(killed_at.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    });
    let last_before = s0.last_revision;
    while killed_at.elapsed() < a.failover_timeout {
        let s = client.stats();
        if watch_at.is_none() && s.watch_streams_opened > s0.watch_streams_opened {
            watch_at = Some(killed_at.elapsed());
        }
        if renewed.is_none() && s.heartbeats_sent > s0.heartbeats_sent {
            renewed = Some(killed_at.elapsed());
        }
        if first_update.is_none() && s.last_revision > last_before {
            first_update = Some(killed_at.elapsed());
        }
        if watch_at.is_some() && renewed.is_some() && first_update.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if let Ok(e) = elect.await {
        elected = e;
    }
    // A little more traffic after the resume, then stop and let the client catch up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let acked = writer.await.context("the writer task")?;
    let cpu = m.stop();
    let last = acked.iter().map(|x| x.0).max().unwrap_or(0);
    let caught_up = Instant::now() + Duration::from_secs(10);
    while client.cached(&svc).map(|s| s.revision).unwrap_or(0) < last && Instant::now() < caught_up
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Updates published with the cache's last change reach the collector a moment later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = seen_tx.send(true);
    let seen = collector.await.context("the collector task")?;
    let cached = client.cached(&svc);

    let revs: Vec<u64> = acked.iter().map(|x| x.0).collect();
    let (as_events, by_snapshot, missing) = account(&revs, &seen);
    // What surrounds a missing change, to tell why.
    let events: std::collections::HashSet<u64> = seen.events.iter().map(|e| e.0).collect();
    let whole_max = seen.whole.iter().map(|w| w.0).max().unwrap_or(0);
    let lacking: Vec<String> = acked
        .iter()
        .filter(|(r, _, _)| !events.contains(r) && *r > whole_max)
        .take(3)
        .map(|(r, w, n)| {
            let before = seen.events.iter().map(|e| e.0).filter(|e| e < r).max();
            let after = seen.events.iter().map(|e| e.0).filter(|e| e > r).min();
            format!("rev {r} (weight {w}, {n} attempts; events around it {before:?} / {after:?}; snapshots/reads at {:?})", seen.whole.iter().map(|w| w.0).collect::<Vec<_>>())
        })
        .collect();
    let final_weight = cached
        .as_ref()
        .and_then(|s| s.instance("w0").map(|i| i.status.weight));
    let last_weight = acked.last().map(|x| x.1);
    let own_present = cached
        .as_ref()
        .map(|s| s.instances.iter().filter(|i| i.id.starts_with('c')).count())
        .unwrap_or(0);
    // And what the new leader holds.
    let nl = c.leader(LEADER_WAIT).await?;
    let on_leader = load::check_http(
        c.http
            .get(format!(
                "{}/v1/namespaces/{NAMESPACE}/services/{svc_name}",
                c.nodes[nl].http
            ))
            .send()
            .await?,
    )
    .await?;
    let on_leader_n = on_leader["instances"]
        .as_array()
        .map(|v| v.len())
        .unwrap_or(0);
    let st = client.stats();
    let note = format!(
        "round {round}: killed leader node {l}; node {nl} leads after; elected {}, watch {}, renewed {}, first update {} after the kill; {} changes acknowledged (revisions up to {last}): {as_events} seen as events, {by_snapshot} via snapshot/read, {missing} missing{}; final weight of w0 in the client {final_weight:?} (last acknowledged {last_weight:?}); the client's own instances: {own_present}/{} in its cache, {} instances on the new leader (want {}), deletes of them seen {}{}; SDK: {} failovers (before the kill {failovers_before}), {} streams opened ({} resumed with since), {} snapshots, {} re-registrations, {} heartbeats failed; {}",
        fmt_opt(elected),
        fmt_opt(watch_at),
        fmt_opt(renewed),
        fmt_opt(first_update),
        acked.len(),
        if lacking.is_empty() { String::new() } else { format!(" ({})", lacking.join("; ")) },
        a.failover_instances,
        on_leader_n,
        a.failover_instances + 1,
        seen.client_deletes.len(),
        if seen.client_deletes.is_empty() { String::new() } else { format!(" ({})", seen.client_deletes.iter().take(3).cloned().collect::<Vec<_>>().join(", ")) },
        st.failovers,
        st.watch_streams_opened,
        st.watch_streams_resumed,
        st.snapshots_received,
        st.reregistrations,
        st.heartbeats_failed,
        cpu.describe(),
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), client.shutdown()).await;
    // Bring the killed node back (new ports) for the next round.
    c.nodes[l].start().await?;
    c.leader(LEADER_WAIT).await?;
    Ok(Round {
        elected,
        watch: watch_at,
        renewed,
        first_update,
        acked: acked.len(),
        as_events,
        by_snapshot,
        missing,
        note,
    })
}

fn fmt_opt(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "never".into())
}

fn rss(pid: Option<u32>) -> String {
    match pid {
        Some(p) => match (
            stats::proc_status_bytes(p, "VmRSS"),
            stats::proc_status_bytes(p, "VmHWM"),
        ) {
            (Ok(r), Ok(h)) => format!("VmRSS {} (peak {})", mib(r), mib(h)),
            _ => "?".into(),
        },
        None => "gone".into(),
    }
}

async fn phase_join(
    c: &mut Cluster,
    a: &ClusterArgs,
    bin: &std::path::Path,
    single: &(Option<std::path::PathBuf>, bool, Duration),
) -> anyhow::Result<()> {
    let l = c.leader(LEADER_WAIT).await?;
    let sa = ScaleArgs {
        services: a.join_services,
        instances: a.join_instances,
        batch: a.join_batch,
        concurrency: a.join_concurrency,
        reads: 0,
        deadline: a.load_deadline,
        no_restart: true,
    };
    let total = a.join_services * a.join_instances;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let run = load::run_id();

    // 1. Load through the leader.
    let m = ProcsMeter::start(&c.procs(Some(l)));
    let out = scale::load_services(&c.nodes[l].grpc, &run, &sa).await?;
    let cpu = m.stop();
    let load_ended = Instant::now();
    notes.extend(out.notes("join load"));
    notes.push(format!("load: {}", cpu.describe()));
    rows.push(out.row(
        "load through the leader: BatchRegister".into(),
        format!(
            "S={} I={} ({total} inst) B={} concurrency={} (latency per batch)",
            a.join_services, a.join_instances, a.join_batch, a.join_concurrency
        ),
        "inst/s",
        None,
    ));
    let loaded = out.ops;

    // 2. Every node caught up to the head.
    let head_of = |v: &Value| v["store"]["head"].as_u64();
    let v = view(&c.http, &c.nodes[l].http).await;
    let head = head_of(&v).context("no store head in /v1/cluster")?;
    let until = Instant::now() + a.join_timeout;
    for i in c.alive() {
        loop {
            let v = view(&c.http, &c.nodes[i].http).await;
            if v["revision"].as_u64().unwrap_or(0) >= head {
                break;
            }
            anyhow::ensure!(
                Instant::now() < until,
                "node {i} did not reach revision {head}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in c.alive() {
        notes.push(format!(
            "node {i}{} after the load: {}",
            if i == l { " (leader)" } else { "" },
            rss(c.nodes[i].pid)
        ));
    }
    notes.push(format!("etcd after the load: {}", rss(Some(c.etcd.pid))));
    // etcd may still be busy with the load (its own snapshots): join a settled cluster.
    let l = c.leader(LEADER_WAIT).await?;
    notes.push(format!(
        "node {l} leads when the new node starts; {:.1} s after the load ended",
        load_ended.elapsed().as_secs_f64()
    ));

    // 3. A new node joins.
    let m = ProcsMeter::start(&c.procs(Some(l)));
    let spawned = Instant::now();
    let (j, until_serving) = match c.add_node().await {
        Ok(x) => x,
        Err(e) => {
            // What was measured up to here is still worth printing.
            notes.push(format!(
                "join FAILED {:.1} s after spawn: {e:#}",
                spawned.elapsed().as_secs_f64()
            ));
            print_table("cluster join (failed)", &rows, &notes);
            return Err(e);
        }
    };
    let mut ready_at = None;
    let caught_up = loop {
        let t = &c.nodes[j];
        let v = view(&c.http, &t.http).await;
        if ready_at.is_none() {
            let ok = c
                .http
                .get(format!("{}/readyz", t.http))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                ready_at = Some(spawned.elapsed());
            }
        }
        if v["revision"].as_u64().unwrap_or(0) >= head {
            break spawned.elapsed();
        }
        anyhow::ensure!(
            spawned.elapsed() < a.join_timeout,
            "the new node did not reach revision {head} within {:?}: {v}",
            a.join_timeout
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut cpu = m.stop();
    // The new process's whole life is the join.
    let jpid = c.nodes[j].pid;
    cpu.procs.push((
        format!("node {j} (joining)"),
        jpid.and_then(|p| stats::cpu_seconds(&p.to_string()).ok()),
    ));
    rows.push(Row {
        scenario: format!("node {j} joins: spawn -> applied revision = head"),
        params: format!("{loaded} instances, head revision {head}"),
        ops: 1,
        errors: 0,
        secs: caught_up.as_secs_f64(),
        unit: "",
        latency: Latency::new(),
        cpu: None,
    });
    notes.push(format!(
        "join: spawn -> `sextant serving` {:.3} s, -> /readyz 200 {}, -> applied revision {head} (= the store's head) {:.3} s (target < 10 s: {})",
        until_serving.as_secs_f64(),
        fmt_opt(ready_at),
        caught_up.as_secs_f64(),
        if caught_up < Duration::from_secs(10) { "met" } else { "MISSED" }
    ));
    notes.push(format!("join: {}", cpu.describe()));
    let joiner_rss = jpid.and_then(|p| stats::proc_status_bytes(p, "VmRSS").ok());
    notes.push(format!("node {j} (joined) when caught up: {}", rss(jpid)));

    // 4. A single node holding the same instances.
    if !a.no_single {
        let (parent, keep, startup) = single;
        let (mut s, _) = Target::spawn(
            bin,
            parent.as_deref(),
            *keep,
            ["--store", "memory", "--no-nacos", "--no-dns", "--no-consul"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            *startup,
            false,
        )
        .await?;
        let m = ProcsMeter::start(&[("single node".to_string(), s.pid.unwrap_or(0))]);
        // The services the cluster holds in full (a load cut short holds fewer than asked).
        let same = ScaleArgs {
            services: (loaded / a.join_instances).max(1),
            ..sa.clone()
        };
        let out = scale::load_services(&s.grpc, &run, &same).await?;
        let scpu = m.stop();
        let srss = s
            .pid
            .and_then(|p| stats::proc_status_bytes(p, "VmRSS").ok());
        notes.push(format!(
            "single node (--store memory) loaded with the same {} instances: {} ({:.0} inst/s; {})",
            out.ops,
            rss(s.pid),
            out.ops as f64 / out.elapsed.as_secs_f64().max(1e-9),
            scpu.describe()
        ));
        if let (Some(j), Some(s)) = (joiner_rss, srss) {
            notes.push(format!(
                "joined node RSS / single node RSS = {:.2}",
                j as f64 / s.max(1) as f64
            ));
        }
        let _ = s.stop(Duration::from_secs(30)).await;
    }
    print_table(
        &format!(
            "cluster join: a node joins 1 etcd + {} nodes",
            c.alive().len() - 1
        ),
        &rows,
        &notes,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_acknowledged_change_is_an_event_covered_or_missing() {
        let now = Instant::now();
        let seen = SdkSeen {
            events: vec![(3, now), (4, now), (9, now)],
            whole: vec![(1, now), (7, now)],
            client_deletes: Vec::new(),
        };
        // 3, 4, 9 as events; 5 and 6 only through the snapshot at 7; 10 never.
        assert_eq!(account(&[3, 4, 5, 6, 9, 10], &seen), (3, 2, 1));
        assert_eq!(account(&[], &seen), (0, 0, 0));
    }

    #[test]
    fn cpu_of_every_process_is_described_and_a_gone_one_said_so() {
        let cpu = ProcsCpu {
            procs: vec![("etcd".into(), Some(0.5)), ("node 1".into(), None)],
            bench: 0.25,
            wall: Duration::from_secs(1),
        };
        assert_eq!(
            cpu.describe(),
            "CPU over 1.00 s (% of one core): etcd 0.50 s (50%), node 1 ? (exited), bench 0.25 s (25%)"
        );
    }
}
