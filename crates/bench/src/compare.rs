//! Scenario `compare`: Sextant, ZooKeeper and etcd side by side, in one run on one machine,
//! one system after another, with the same shape of work, each through its own native
//! protocol. `register`: C clients creating N records (Sextant: HTTP PUT, gRPC Register, gRPC
//! BatchRegister; ZooKeeper: ephemeral znodes; etcd: puts with a lease), after an untimed
//! warm-up of the same kind. `push`: W subscribers of one service of I instances while one
//! record at a time changes at R/s; latency per (subscriber, change) and delivered/expected.
//! The peers are started here (fresh data dir, loopback) only for their own turn and stopped
//! after it; the tables give the ratios against the targets.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::peers::{Peer, PeerOptions, System};
use crate::push::{PushArgs, PushResult};
use crate::register::{self, Mode, RegisterArgs};
use crate::stats::{print_table, Latency, Row};
use crate::target::Target;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Register,
    Push,
}

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Systems to run, one after another in this order.
    #[arg(long, value_delimiter = ',', default_value = "sextant,zookeeper,etcd")]
    pub systems: Vec<System>,
    /// Scenarios to run on each system.
    #[arg(long, value_delimiter = ',', default_value = "register,push")]
    pub scenarios: Vec<Which>,
    /// register: concurrent clients, each with its own connection and one request in flight.
    #[arg(help_heading = "register", long, short = 'c', default_value_t = 32)]
    pub clients: usize,
    /// Before each system's turn: flush every dirty page to disk (`sync`), then wait this long,
    /// so that one system's writeback does not land on the next one's fsyncs.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// register: instances registered in each timed phase.
    #[arg(help_heading = "register", long, short = 'n', default_value_t = 20_000)]
    pub instances: u64,
    /// register: instances per Sextant BatchRegister call.
    #[arg(help_heading = "register", long, short = 'b', default_value_t = 100)]
    pub batch: u64,
    /// register: services (ZooKeeper parent znodes, etcd prefixes) the instances are spread over.
    #[arg(help_heading = "register", long, default_value_t = 100)]
    pub services: u64,
    /// register: instances registered, untimed, before each timed phase (same kind, same
    /// clients count) so that a JIT-compiled server is not measured cold (ZooKeeper reaches
    /// its steady rate after about 30,000 creates on a 2-core machine).
    #[arg(help_heading = "register", long, default_value_t = 30_000)]
    pub warmup: u64,
    /// register: also time etcd puts without a lease, as a reference row (not in the ratios).
    #[arg(help_heading = "register", long, default_value_t = true, action = clap::ArgAction::Set)]
    pub etcd_plain_puts: bool,
    /// register: longest a phase may run.
    #[arg(help_heading = "register", long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub register_deadline: Duration,
    /// push: subscribers (one connection / session each).
    #[arg(help_heading = "push", long, short = 'w', default_value_t = 1000)]
    pub watchers: usize,
    /// push: subscribers for the peers, if they cannot hold --watchers [default: --watchers].
    #[arg(help_heading = "push", long)]
    pub peer_watchers: Option<usize>,
    /// push: instances of the watched service.
    #[arg(help_heading = "push", long, short = 'i', default_value_t = 1000)]
    pub push_instances: u64,
    /// push: changes per second (one at a time, each acknowledged before the next).
    #[arg(help_heading = "push", long, short = 'r', default_value_t = 50.0)]
    pub rate: f64,
    /// push: changes in all.
    #[arg(help_heading = "push", long, short = 'k', default_value_t = 200)]
    pub changes: u64,
    /// push: subscribers connecting at the same time.
    #[arg(help_heading = "push", long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// push: longest wait for every subscriber's first snapshot.
    #[arg(help_heading = "push", long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// push: longest wait, after the last write, for every subscriber to receive it.
    #[arg(help_heading = "push", long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// push: longest the writes may take.
    #[arg(help_heading = "push", long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub push_deadline: Duration,
    #[command(flatten)]
    pub peers: PeerOptions,
}

impl CompareArgs {
    fn register_args(&self, instances: u64, modes: Vec<Mode>) -> RegisterArgs {
        RegisterArgs {
            clients: self.clients,
            instances,
            batch: self.batch,
            services: self.services,
            modes,
            deadline: self.register_deadline,
            ttl: 0,
        }
    }

    fn push_args(&self, watchers: usize) -> PushArgs {
        PushArgs {
            watchers,
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

/// What one system produced.
#[derive(Default)]
struct Results {
    /// (what, row) of every timed register phase.
    register: Vec<(Kind, Row)>,
    register_notes: Vec<String>,
    push: Vec<(System, PushResult)>,
    /// Per system: version, start time, load averages, log summary.
    about: Vec<String>,
    failures: Vec<String>,
}

/// The register phases compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    SextantHttp,
    SextantGrpc,
    SextantBatch,
    Zookeeper,
    Etcd,
    EtcdPlain,
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub async fn run(t: &Target, a: &CompareArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.clients > 0 && a.instances > 0 && a.batch > 0 && a.services > 0,
        "sizes must be positive"
    );
    let mut r = Results::default();
    for &system in &a.systems {
        settle(a.settle).await;
        let load_before = load_average();
        eprintln!("compare: {} (load average {load_before})", system.name());
        let outcome = match system {
            System::Sextant => run_sextant(t, a, &mut r).await,
            peer => run_peer(peer, a, &mut r).await,
        };
        r.about.push(format!(
            "{}: load average {load_before} before its turn, {} after",
            system.name(),
            load_average()
        ));
        if let Err(e) = outcome {
            eprintln!("compare: {} failed: {e:#}", system.name());
            r.failures.push(format!("{}: {e:#}", system.name()));
        }
    }
    report(a, &r);
    anyhow::ensure!(
        r.failures.is_empty(),
        "{} of the systems failed: {}",
        r.failures.len(),
        r.failures.join("; ")
    );
    Ok(())
}

/// Flushes dirty pages (`sync`) and waits `pause`.
pub(crate) async fn settle(pause: Duration) {
    match tokio::process::Command::new("sync").status().await {
        Ok(s) if s.success() => {}
        other => eprintln!("warning: sync failed: {other:?}"),
    }
    tokio::time::sleep(pause).await;
}

async fn run_sextant(t: &Target, a: &CompareArgs, r: &mut Results) -> anyhow::Result<()> {
    r.about.push(format!(
        "sextant: {} at {} / {}, server pid {}",
        env!("CARGO_PKG_VERSION"),
        t.http,
        t.grpc,
        t.pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into())
    ));
    if a.scenarios.contains(&Which::Register) {
        let modes = vec![Mode::Http, Mode::Grpc, Mode::GrpcBatch];
        for mode in modes {
            let run = crate::load::run_id();
            if a.warmup > 0 {
                register::measure(
                    t,
                    &a.register_args(a.warmup, vec![mode]),
                    "",
                    &format!("{run}w"),
                )
                .await?;
            }
            let (rows, notes) = register::measure(
                t,
                &a.register_args(a.instances, vec![mode]),
                "sextant: ",
                &run,
            )
            .await?;
            r.register_notes.extend(notes);
            for (m, row) in rows {
                let kind = match m {
                    Mode::Http => Kind::SextantHttp,
                    Mode::Grpc => Kind::SextantGrpc,
                    Mode::GrpcBatch => Kind::SextantBatch,
                };
                r.register.push((kind, row));
            }
        }
    }
    if a.scenarios.contains(&Which::Push) {
        let p = crate::push::measure(t, &a.push_args(a.watchers), "sextant: ").await?;
        r.push.push((System::Sextant, p));
    }
    Ok(())
}

async fn run_peer(system: System, a: &CompareArgs, r: &mut Results) -> anyhow::Result<()> {
    let mut peer = Peer::start(system, &a.peers).await?;
    r.about.push(format!(
        "{}: version {}, standalone at {}, pid {}, answering {:.0} ms after spawn",
        system.name(),
        peer.version,
        peer.endpoint,
        peer.pid,
        peer.until_serving.as_secs_f64() * 1000.0
    ));
    let outcome = peer_scenarios(&peer, a, r).await;
    peer.stop().await;
    if let Some(s) = peer.log_summary() {
        r.about.push(s);
    }
    outcome
}

async fn peer_scenarios(peer: &Peer, a: &CompareArgs, r: &mut Results) -> anyhow::Result<()> {
    let (system, pid, ep) = (peer.system, Some(peer.pid), peer.endpoint.as_str());
    let prefix = format!("{}: ", system.name());
    // ZooKeeper sessions whose ephemeral znodes must outlive the register phase.
    let mut sessions = Vec::new();
    if a.scenarios.contains(&Which::Register) {
        let run = crate::load::run_id();
        let warm = a.register_args(a.warmup, vec![]);
        let timed = a.register_args(a.instances, vec![]);
        match system {
            System::Zookeeper => {
                if a.warmup > 0 {
                    let (_, _, s) =
                        crate::zk::register(ep, &warm, "", &format!("{run}w"), pid).await?;
                    sessions.extend(s);
                }
                let (row, notes, s) = crate::zk::register(ep, &timed, &prefix, &run, pid).await?;
                sessions.extend(s);
                r.register_notes.extend(notes);
                r.register.push((Kind::Zookeeper, row));
            }
            System::Etcd => {
                if a.warmup > 0 {
                    crate::etcd::register(ep, &warm, "", &format!("{run}w"), pid, true).await?;
                }
                let (row, notes) =
                    crate::etcd::register(ep, &timed, &prefix, &run, pid, true).await?;
                r.register_notes.extend(notes);
                r.register.push((Kind::Etcd, row));
                if a.etcd_plain_puts {
                    let (row, notes) =
                        crate::etcd::register(ep, &timed, &prefix, &format!("{run}p"), pid, false)
                            .await?;
                    r.register_notes.extend(notes);
                    r.register.push((Kind::EtcdPlain, row));
                }
            }
            System::Sextant => unreachable!("not a peer"),
        }
    }
    if a.scenarios.contains(&Which::Push) {
        let pa = a.push_args(a.peer_watchers.unwrap_or(a.watchers));
        let p = match system {
            System::Zookeeper => crate::zk::push(ep, &pa, &prefix, pid).await?,
            System::Etcd => crate::etcd::push(ep, &pa, &prefix, pid).await?,
            System::Sextant => unreachable!("not a peer"),
        };
        r.push.push((system, p));
    }
    drop(sessions);
    Ok(())
}

fn rate(row: &Row) -> f64 {
    if row.secs <= 0.0 {
        return 0.0;
    }
    row.ops as f64 / row.secs
}

/// `x / y` as "3.21x", or "-" when either side is missing.
pub(crate) fn ratio(x: Option<f64>, y: Option<f64>) -> String {
    match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
        _ => "-".into(),
    }
}

/// A throughput ratio against a target, e.g. "sextant HTTP / zookeeper = 3.4x (target >= 3x: met)".
pub(crate) fn target_line(
    what: &str,
    x: Option<f64>,
    y: Option<f64>,
    target: Option<f64>,
) -> String {
    let mut s = format!("{what} = {}", ratio(x, y));
    if let (Some(x), Some(y), Some(t)) = (x, y, target) {
        if y > 0.0 {
            let _ = write!(
                s,
                " (target >= {t}x: {})",
                if x / y >= t { "met" } else { "MISSED" }
            );
        }
    }
    s
}

pub(crate) fn quantile_ms(l: &Latency, q: f64) -> Option<f64> {
    l.quantile_us(q).map(|us| us as f64 / 1000.0)
}

fn report(a: &CompareArgs, r: &Results) {
    let cpu_per_k = |row: &Row| -> String {
        let Some(cpu) = row.cpu else {
            return String::new();
        };
        let k = row.ops.max(1) as f64 / 1000.0;
        format!(
            "{}: server CPU {} ms and bench CPU {:.1} ms per 1000 instances",
            row.scenario,
            cpu.server
                .map(|s| format!("{:.1}", 1000.0 * s / k))
                .unwrap_or_else(|| "?".into()),
            1000.0 * cpu.bench / k
        )
    };
    if !r.register.is_empty() {
        let get = |k: Kind| {
            r.register
                .iter()
                .find(|(x, _)| *x == k)
                .map(|(_, row)| rate(row))
        };
        let (http, grpc, batch) = (
            get(Kind::SextantHttp),
            get(Kind::SextantGrpc),
            get(Kind::SextantBatch),
        );
        let (zk, etcd) = (get(Kind::Zookeeper), get(Kind::Etcd));
        let mut notes = vec![
            target_line("sextant HTTP PUT / zookeeper create", http, zk, Some(3.0)),
            target_line("sextant HTTP PUT / etcd put", http, etcd, Some(5.0)),
            target_line(
                "sextant gRPC BatchRegister (instances/s) / zookeeper create",
                batch,
                zk,
                Some(10.0),
            ),
            target_line("sextant gRPC Register / zookeeper create", grpc, zk, None),
            target_line("sextant gRPC Register / etcd put", grpc, etcd, None),
            target_line("sextant gRPC BatchRegister / etcd put", batch, etcd, None),
            target_line(
                "reference: sextant HTTP PUT / etcd put without lease",
                http,
                get(Kind::EtcdPlain),
                None,
            ),
        ];
        notes.extend(r.register.iter().map(|(_, row)| cpu_per_k(row)));
        notes.push(format!(
            "each system's turn began with `sync` and a {:?} pause; every timed phase followed an untimed warm-up of {} instances of the same kind from the same number of clients; every write is durable (Sextant: fdatasync'd write-ahead-log append; ZooKeeper: forceSync=yes txn log; etcd: fsync'd WAL) and acknowledged before the client sends its next",
            a.settle, a.warmup
        ));
        notes.extend(r.register_notes.iter().cloned());
        notes.extend(r.about.iter().cloned());
        let rows: Vec<Row> = r.register.iter().map(|(_, row)| row.clone()).collect();
        print_table("compare register", &rows, &notes);
    }
    if !r.push.is_empty() {
        for (system, p) in &r.push {
            print_table(
                &format!("compare push: {}", system.name()),
                &p.rows,
                &p.notes,
            );
        }
        let mut rows = Vec::new();
        for (what, pick) in [
            ("ack -> event", 0usize),
            ("write sent -> event", 1),
            ("ack -> last subscriber", 2),
        ] {
            for (system, p) in &r.push {
                rows.push(p.latency_row(
                    format!("{}: {what}", system.name()),
                    format!(
                        "W={} I={} R={}/s K={}",
                        p.watchers, a.push_instances, a.rate, a.changes
                    ),
                    pick,
                    "events/s",
                ));
            }
        }
        let mut notes = Vec::new();
        for (system, p) in &r.push {
            let pct = 100.0 * p.delivered as f64 / p.expected.max(1) as f64;
            notes.push(format!(
                "{}: delivered/expected {}/{} ({pct:.3}%), covered by resync {}, missing {}; {} subscribers, {} writes",
                system.name(),
                p.delivered,
                p.expected,
                p.resynced,
                p.missing,
                p.watchers,
                p.writes
            ));
        }
        if let Some((_, s)) = r.push.iter().find(|(x, _)| *x == System::Sextant) {
            for (system, p) in r.push.iter().filter(|(x, _)| *x != System::Sextant) {
                for (what, sl, pl) in [
                    ("ack -> event", &s.ack, &p.ack),
                    ("write sent -> event", &s.sent, &p.sent),
                ] {
                    let parts: Vec<String> = [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]
                        .iter()
                        .map(|&(name, q)| {
                            format!("{name} {}", ratio(quantile_ms(pl, q), quantile_ms(sl, q)))
                        })
                        .collect();
                    notes.push(format!(
                        "{} / sextant latency, {what}: {} (above 1x: Sextant is faster)",
                        system.name(),
                        parts.join(", ")
                    ));
                }
            }
        }
        notes.push(
            "CPU in the ack rows covers the writes and the drain; the other rows share that period"
                .into(),
        );
        notes.push("Sextant and etcd send a change to a subscriber as a stream message with the record; ZooKeeper sends a NodeDataChanged notification with the path only (a client that needs the data must read it, which is not done or timed here)".into());
        notes.extend(r.about.iter().cloned());
        print_table("compare push: side by side", &rows, &notes);
    }
    if !r.failures.is_empty() {
        println!("failures: {}", r.failures.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_targets() {
        assert_eq!(ratio(Some(30.0), Some(10.0)), "3.00x");
        assert_eq!(ratio(None, Some(10.0)), "-");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "-");
        assert_eq!(
            target_line("a / b", Some(31.0), Some(10.0), Some(3.0)),
            "a / b = 3.10x (target >= 3x: met)"
        );
        assert_eq!(
            target_line("a / b", Some(29.0), Some(10.0), Some(3.0)),
            "a / b = 2.90x (target >= 3x: MISSED)"
        );
        assert_eq!(
            target_line("a / b", Some(29.0), None, Some(3.0)),
            "a / b = -"
        );
    }
}
