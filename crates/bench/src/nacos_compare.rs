//! Scenario `nacos-compare`: the `nacos` phases on Sextant's Nacos adapter and on rnacos (a
//! Rust reimplementation of the Nacos server), one after the other in one run on one machine,
//! each started here on loopback with a fresh temporary data dir and stopped after its turn,
//! then a side-by-side table with the ratios the issue asks for (Sextant ≥ 2x rnacos in
//! registration and query throughput, lower push latency at p99).
//!
//! This module owns starting and stopping those servers (also for `nacos --spawn`), and the
//! side-by-side report; the phases themselves are [`crate::nacos`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::compare::{load_average, quantile_ms, ratio, settle, target_line};
use crate::nacos::{self, NacosArgs, NacosResult, NacosTarget, NacosWork};
use crate::peers::{free_port, keep_dir, spawn_logged, temp_dir};
use crate::stats::{print_table, Row};
use crate::target::Target;

/// A Nacos server the comparison can start.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NacosSystem {
    /// `sextant serve` with its Nacos adapter (`--nacos-http-addr`), embedded store.
    Sextant,
    /// rnacos (`cargo install rnacos`), configured by its `RNACOS_*` variables.
    Rnacos,
}

impl NacosSystem {
    pub fn name(self) -> &'static str {
        match self {
            NacosSystem::Sextant => "sextant",
            NacosSystem::Rnacos => "rnacos",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct NacosCompareArgs {
    /// Servers to run, one after another in this order.
    #[arg(long, value_delimiter = ',', default_value = "sextant,rnacos")]
    pub systems: Vec<NacosSystem>,
    /// The sextant binary [default: the global --spawn, else target/release/sextant].
    #[arg(long)]
    pub sextant: Option<PathBuf>,
    /// Sextant's store (`embedded`: write-ahead log + redb, fdatasync'd commits; `memory`).
    #[arg(long, default_value = "embedded")]
    pub sextant_store: String,
    /// The rnacos binary [default: `rnacos` on PATH, else ~/.cargo/bin/rnacos].
    #[arg(long)]
    pub rnacos: Option<PathBuf>,
    /// Before each server's turn: `sync`, then wait this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    #[command(flatten)]
    pub work: NacosWork,
}

/// How servers are started: the tool's global options.
#[derive(Debug, Clone)]
pub struct Launch {
    pub data_parent: Option<PathBuf>,
    pub keep_data: bool,
    /// Extra `sextant serve` arguments (`--server-arg`).
    pub sextant_args: Vec<String>,
    pub startup_timeout: Duration,
}

// One per system under test and run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Process {
    Sextant(Target),
    Rnacos {
        child: Option<Child>,
        pid: u32,
        _dir: Option<tempfile::TempDir>,
        log_path: PathBuf,
    },
}

/// A Nacos server this tool started.
pub struct Server {
    pub system: NacosSystem,
    pub target: NacosTarget,
    pub version: String,
    /// From spawn until both Nacos ports answered.
    pub until_serving: Duration,
    process: Process,
}

/// `rnacos` on PATH, else `~/.cargo/bin/rnacos`.
fn default_rnacos() -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("rnacos");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cargo/bin/rnacos")
}

/// The environment of a standalone rnacos on loopback (its configuration is environment only):
/// HTTP on `port`, gRPC on `port + 1000`, the console on `console`, data under `data`.
pub fn rnacos_env(port: u16, console: u16, data: &Path) -> Vec<(String, String)> {
    let grpc = port.saturating_add(1000);
    [
        ("RNACOS_HTTP_PORT", port.to_string()),
        ("RNACOS_GRPC_PORT", grpc.to_string()),
        ("RNACOS_HTTP_CONSOLE_PORT", console.to_string()),
        ("RNACOS_SDK_HOST", "127.0.0.1".to_string()),
        ("RNACOS_CONSOLE_HOST", "127.0.0.1".to_string()),
        ("RNACOS_RAFT_NODE_ADDR", format!("127.0.0.1:{grpc}")),
        ("RNACOS_DATA_DIR", data.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn version_of(bin: &Path) -> String {
    match Command::new(bin).arg("--version").output().await {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("?")
            .trim()
            .to_string(),
        Err(e) => format!("? ({e})"),
    }
}

impl Server {
    pub async fn start(
        system: NacosSystem,
        bin: &Path,
        store: &str,
        l: &Launch,
    ) -> anyhow::Result<Server> {
        let spawned_at = Instant::now();
        let port = sextant_testkit::try_free_nacos_port()
            .context("cannot find a free loopback port pair")?;
        let (process, pid) = match system {
            NacosSystem::Sextant => {
                let mut args = vec![
                    "--store".to_string(),
                    store.to_string(),
                    "--nacos-http-addr".to_string(),
                    format!("127.0.0.1:{port}"),
                ];
                args.extend(l.sextant_args.iter().cloned());
                let (t, _) = Target::spawn(
                    bin,
                    l.data_parent.as_deref(),
                    l.keep_data,
                    args,
                    l.startup_timeout,
                    // The Nacos scenarios drive plain Nacos ports.
                    false,
                )
                .await?;
                let pid = t.pid;
                (Process::Sextant(t), pid)
            }
            NacosSystem::Rnacos => {
                let dir = temp_dir(l.data_parent.as_deref(), "sextant-bench-rnacos-")?;
                let log_path = dir.path().join("server.log");
                let log = std::fs::File::create(&log_path)?;
                // An explicit, empty env file: rnacos otherwise reads a `.env` of its cwd or above.
                let env_file = dir.path().join("rnacos.env");
                std::fs::write(&env_file, "")?;
                let mut cmd = Command::new(bin);
                for (k, _) in std::env::vars_os() {
                    if k.to_string_lossy().starts_with("RNACOS_") {
                        cmd.env_remove(k);
                    }
                }
                cmd.arg("--env-file")
                    .arg(&env_file)
                    .envs(rnacos_env(port, free_port()?, &dir.path().join("data")))
                    .env_remove("RUST_LOG")
                    .current_dir(dir.path());
                let (child, pid) = spawn_logged(&mut cmd, log, "rnacos")?;
                let kept = keep_dir(dir, l.keep_data, "rnacos");
                (
                    Process::Rnacos {
                        child: Some(child),
                        pid,
                        _dir: kept,
                        log_path,
                    },
                    Some(pid),
                )
            }
        };
        let target = NacosTarget::at(system.name(), &format!("127.0.0.1:{port}"), None, pid)?;
        let mut s = Server {
            system,
            target,
            version: version_of(bin).await,
            until_serving: Duration::ZERO,
            process,
        };
        if let Err(e) = s.wait_serving(spawned_at + l.startup_timeout).await {
            let tail = s.log_tail();
            s.stop().await;
            bail!(
                "{} did not serve the Nacos API: {e:#}; its log: {tail}",
                system.name()
            );
        }
        s.until_serving = spawned_at.elapsed();
        Ok(s)
    }

    /// Waits until the HTTP port answers a list query and the gRPC port a `ServerCheckRequest`.
    async fn wait_serving(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let client = crate::load::http_client(Some(Duration::from_secs(5)))?;
        let url = format!(
            "{}/nacos/v1/ns/instance/list?serviceName=bench-probe&namespaceId=public",
            self.target.http
        );
        let mut last: String;
        loop {
            if let Process::Rnacos { child: Some(c), .. } = &mut self.process {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("exited ({status})");
                }
            }
            let http = client.get(&url).send().await;
            let grpc = crate::nacos_grpc::connect(&self.target.grpc).await;
            match (http, grpc) {
                (Ok(_), Ok(_)) => return Ok(()),
                (Err(e), _) => last = format!("HTTP: {e}"),
                (_, Err(e)) => last = format!("gRPC: {e:#}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "not answering at {} / {}: {last}",
                    self.target.http,
                    self.target.grpc
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let path = match &self.process {
            Process::Sextant(t) => t.log_path().map(Path::to_path_buf),
            Process::Rnacos { log_path, .. } => Some(log_path.clone()),
        };
        let text = path
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join(" | ")
    }

    /// Warnings and errors the server logged.
    pub fn log_summary(&self) -> Option<String> {
        match &self.process {
            Process::Sextant(t) => t
                .log()
                .and_then(|l| l.summary())
                .map(|s| format!("{}: {s}", self.system.name())),
            Process::Rnacos { log_path, .. } => {
                let text = std::fs::read_to_string(log_path).ok()?;
                let (mut w, mut e) = (0, 0);
                let mut first = Vec::new();
                for l in text.lines() {
                    let warn = l.contains(" WARN ");
                    let err = l.contains(" ERROR ");
                    w += usize::from(warn);
                    e += usize::from(err);
                    if (warn || err) && first.len() < 3 {
                        first.push(l.chars().take(200).collect::<String>());
                    }
                }
                (w + e > 0).then(|| {
                    format!(
                        "rnacos logged {w} WARN and {e} ERROR lines; first: {}",
                        first.join(" | ")
                    )
                })
            }
        }
    }

    /// Stops the server: Sextant with SIGTERM (killed after 30 s), rnacos with SIGTERM to its
    /// process group (SIGKILL after 30 s).
    pub async fn stop(&mut self) {
        match &mut self.process {
            Process::Sextant(t) => {
                if let Err(e) = t.stop(Duration::from_secs(30)).await {
                    eprintln!("warning: stopping sextant: {e:#}");
                }
            }
            Process::Rnacos { child, pid, .. } => {
                let Some(mut c) = child.take() else { return };
                let Some(pg) = rustix::process::Pid::from_raw(*pid as i32) else {
                    let _ = c.kill().await;
                    return;
                };
                let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::TERM);
                if tokio::time::timeout(Duration::from_secs(30), c.wait())
                    .await
                    .is_err()
                {
                    eprintln!("warning: rnacos did not exit within 30 s of SIGTERM; killing it");
                    let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
                    let _ = c.wait().await;
                }
            }
        }
    }
}

fn header(what: &str, t: &NacosTarget, how: &str) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# sextant-bench {what}: {} at {} (gRPC {}), server pid {} ({how}); {cores} cores, load average {} at start",
        t.name,
        t.http,
        t.grpc,
        t.pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into()),
        load_average(),
    );
}

/// Scenario `nacos`: against the server at `--nacos-addr`, or a Sextant started here (`spawn`).
pub async fn run_one(
    a: &NacosArgs,
    spawn: Option<&Path>,
    server_pid: Option<u32>,
    l: &Launch,
) -> anyhow::Result<()> {
    a.work.validate()?;
    match spawn {
        Some(bin) => {
            let mut s = Server::start(NacosSystem::Sextant, bin, "embedded", l).await?;
            header(
                "nacos",
                &s.target,
                &format!(
                    "{}, spawned, serving after {:.0} ms",
                    s.version,
                    s.until_serving.as_secs_f64() * 1000.0
                ),
            );
            let r = nacos::run(&s.target, a, &[]).await;
            s.stop().await;
            if let Some(sum) = s.log_summary() {
                println!("{sum}");
            }
            r
        }
        None => {
            let t = NacosTarget::at(
                "nacos",
                &a.nacos_addr,
                a.nacos_grpc_addr.as_deref(),
                server_pid,
            )?;
            header("nacos", &t, "attached");
            nacos::run(&t, a, &[]).await
        }
    }
}

/// Scenario `nacos-compare`.
pub async fn run_compare(
    a: &NacosCompareArgs,
    spawn: Option<&Path>,
    l: &Launch,
) -> anyhow::Result<()> {
    a.work.validate()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# sextant-bench nacos-compare: {}; {cores} cores, load average {} at start",
        a.systems
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", then "),
        load_average()
    );
    let mut results: Vec<(NacosSystem, NacosTarget, NacosResult)> = Vec::new();
    let mut about = Vec::new();
    let mut failures = Vec::new();
    for &system in &a.systems {
        let bin = match system {
            NacosSystem::Sextant => a
                .sextant
                .clone()
                .or_else(|| spawn.map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("target/release/sextant")),
            NacosSystem::Rnacos => a.rnacos.clone().unwrap_or_else(default_rnacos),
        };
        settle(a.settle).await;
        let before = load_average();
        eprintln!(
            "nacos-compare: {} ({}; load average {before})",
            system.name(),
            bin.display()
        );
        let mut server = match Server::start(system, &bin, &a.sextant_store, l).await {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{}: {e:#}", system.name());
                eprintln!("nacos-compare: {msg}");
                failures.push(msg);
                continue;
            }
        };
        about.push(format!(
            "{}: {} ({}), Nacos HTTP {} and gRPC {}, pid {}, answering {:.0} ms after spawn{}",
            system.name(),
            server.version,
            bin.display(),
            server.target.http,
            server.target.grpc,
            server.target.pid.map(|p| p.to_string()).unwrap_or_default(),
            server.until_serving.as_secs_f64() * 1000.0,
            if system == NacosSystem::Sextant {
                format!(", --store {}", a.sextant_store)
            } else {
                String::new()
            }
        ));
        let steal0 = steal_seconds();
        let r = nacos::measure(&server.target, &a.work).await;
        let steal = steal_seconds().zip(steal0).map(|(b, a)| b - a);
        server.stop().await;
        about.push(format!(
            "{}: load average {before} before its turn, {} after; CPU steal during its turn {}",
            system.name(),
            load_average(),
            steal
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "unknown".into())
        ));
        if let Some(s) = server.log_summary() {
            about.push(s);
        }
        failures.extend(r.failures.iter().cloned());
        results.push((system, server.target.clone(), r));
    }
    for (_, t, r) in &results {
        nacos::print_result(t, r, &[]);
    }
    report(a, &results, &about);
    if !failures.is_empty() {
        println!("failures: {}", failures.join("; "));
    }
    anyhow::ensure!(failures.is_empty(), "{} failures", failures.len());
    Ok(())
}

/// CPU time the hypervisor gave other guests (`steal` of `/proc/stat`), in seconds over all
/// cores: the machine is a VM, and a busy neighbour would show here.
fn steal_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let steal: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(steal as f64 / rustix::param::clock_ticks_per_second() as f64)
}

fn rate(row: &Row) -> Option<f64> {
    (row.secs > 0.0).then(|| row.ops as f64 / row.secs)
}

/// Picks one phase's row out of a server's results.
type Pick = fn(&NacosResult) -> Option<&Row>;

/// The side-by-side table and the ratios against the targets.
fn report(
    a: &NacosCompareArgs,
    results: &[(NacosSystem, NacosTarget, NacosResult)],
    about: &[String],
) {
    let get = |s: NacosSystem| results.iter().find(|(x, _, _)| *x == s).map(|(_, _, r)| r);
    let (sx, rn) = (get(NacosSystem::Sextant), get(NacosSystem::Rnacos));
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let phases: [(&str, Pick); 3] = [
        ("register", |r| r.register.as_ref()),
        ("deregister", |r| r.deregister.as_ref()),
        ("query", |r| r.query.as_ref()),
    ];
    for (what, pick) in phases {
        for (system, _, r) in results {
            if let Some(row) = pick(r) {
                let mut row = row.clone();
                row.scenario = format!("{}: {what}", system.name());
                rows.push(row);
            }
        }
    }
    let w = &a.work;
    for (what, pick) in [
        ("push, ack -> push", 0usize),
        ("push, write sent -> push", 1),
        ("push, ack -> last subscriber", 2),
    ] {
        for (system, _, r) in results {
            let Some(p) = &r.push else { continue };
            rows.push(p.latency_row(
                format!("{}: {what}", system.name()),
                format!(
                    "W={} I={} R={}/s K={}",
                    p.watchers, w.push_instances, w.rate, w.changes
                ),
                pick,
                "deliveries/s",
            ));
        }
    }
    let thr =
        |r: Option<&NacosResult>, f: fn(&NacosResult) -> Option<&Row>| r.and_then(f).and_then(rate);
    notes.push(target_line(
        "registration throughput, sextant / rnacos",
        thr(sx, |r| r.register.as_ref()),
        thr(rn, |r| r.register.as_ref()),
        Some(2.0),
    ));
    notes.push(target_line(
        "instance-list query throughput, sextant / rnacos",
        thr(sx, |r| r.query.as_ref()),
        thr(rn, |r| r.query.as_ref()),
        Some(2.0),
    ));
    notes.push(target_line(
        "deregistration throughput, sextant / rnacos",
        thr(sx, |r| r.deregister.as_ref()),
        thr(rn, |r| r.deregister.as_ref()),
        None,
    ));
    if let (Some(s), Some(r)) = (
        sx.and_then(|x| x.push.as_ref()),
        rn.and_then(|x| x.push.as_ref()),
    ) {
        for (what, sl, rl) in [
            ("write sent -> push", &s.sent, &r.sent),
            ("ack -> push", &s.ack, &r.ack),
        ] {
            let parts: Vec<String> = [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]
                .iter()
                .map(|&(name, q)| {
                    format!("{name} {}", ratio(quantile_ms(rl, q), quantile_ms(sl, q)))
                })
                .collect();
            notes.push(format!(
                "push latency, {what}, rnacos / sextant: {} (above 1x: Sextant is faster)",
                parts.join(", ")
            ));
        }
        let (s99, r99) = (quantile_ms(&s.sent, 0.99), quantile_ms(&r.sent, 0.99));
        if let (Some(s99), Some(r99)) = (s99, r99) {
            notes.push(format!(
                "push p99 (write sent -> push): sextant {s99:.2} ms, rnacos {r99:.2} ms (target: Sextant lower: {})",
                if s99 < r99 { "met" } else { "MISSED" }
            ));
        }
        for (name, p) in [("sextant", s), ("rnacos", r)] {
            notes.push(format!(
                "{name}: push delivered/expected {}/{} ({:.3}%), missing {}",
                p.delivered,
                p.expected,
                100.0 * p.delivered as f64 / p.expected.max(1) as f64,
                p.missing
            ));
        }
    }
    for row in rows
        .iter()
        .filter(|r| r.cpu.is_some() && r.unit != "deliveries/s")
    {
        if let Some(cpu) = row.cpu {
            let k = row.ops.max(1) as f64 / 1000.0;
            notes.push(format!(
                "{}: server CPU {} ms and bench CPU {:.1} ms per 1000 operations",
                row.scenario,
                cpu.server
                    .map(|s| format!("{:.1}", 1000.0 * s / k))
                    .unwrap_or_else(|| "?".into()),
                1000.0 * cpu.bench / k
            ));
        }
    }
    notes.push(format!(
        "each server's turn began with `sync` and a {:?} pause; both were driven through the Nacos API only (1.x HTTP for writes and queries, 2.x gRPC for subscriptions), by the same code, on the same two cores as the tool",
        a.settle
    ));
    notes.extend(about.iter().cloned());
    print_table("nacos-compare: side by side", &rows, &notes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rnacos_is_configured_for_loopback_and_its_own_data_dir() {
        let env = rnacos_env(18848, 20000, Path::new("/tmp/r/data"));
        let get = |k: &str| env.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RNACOS_HTTP_PORT"), Some("18848"));
        assert_eq!(get("RNACOS_GRPC_PORT"), Some("19848"));
        assert_eq!(get("RNACOS_HTTP_CONSOLE_PORT"), Some("20000"));
        assert_eq!(get("RNACOS_SDK_HOST"), Some("127.0.0.1"));
        assert_eq!(get("RNACOS_CONSOLE_HOST"), Some("127.0.0.1"));
        assert_eq!(get("RNACOS_DATA_DIR"), Some("/tmp/r/data"));
    }
}
