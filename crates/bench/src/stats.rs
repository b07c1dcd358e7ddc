//! Measurement: latency histograms (microseconds, HdrHistogram), CPU and memory of a process
//! read from `/proc`, and the result table every scenario prints.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Latencies in microseconds, 1 µs to 1 h, 3 significant digits.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The value at quantile `q` in microseconds; `None` when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(q))
    }

    fn ms_at(&self, q: f64) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        ms(self.0.value_at_quantile(q))
    }

    fn ms_max(&self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        ms(self.0.max())
    }
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// Total CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: fields are counted
    // from after the last ')'. There, index 0 is field 3 (state); utime is field 14, stime 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected format of {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unexpected format of {path}"))
    };
    let ticks = tick(11)? + tick(12)?;
    Ok(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// A line of `/proc/<pid>/status` such as `VmRSS` or `VmHWM`, in bytes.
pub fn proc_status_bytes(pid: u32, key: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix(key).and_then(|v| v.strip_prefix(':')) {
            let kib: u64 = v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("unexpected {key} line in {path}: {line:?}"))?;
            return Ok(kib * 1024);
        }
    }
    anyhow::bail!("no {key} in {path}")
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// CPU used by the server (when its pid is known) and by this process over one phase.
pub struct CpuMeter {
    server: Option<(u32, f64)>,
    own: f64,
    started: Instant,
}

/// CPU seconds of each side over a phase, and the phase's wall time.
#[derive(Debug, Clone, Copy)]
pub struct CpuUsed {
    pub server: Option<f64>,
    pub bench: f64,
    pub wall: Duration,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> Self {
        let server = server_pid.and_then(|p| cpu_seconds(&p.to_string()).ok().map(|c| (p, c)));
        Self {
            server,
            own: cpu_seconds("self").unwrap_or(0.0),
            started: Instant::now(),
        }
    }

    pub fn stop(&self) -> CpuUsed {
        CpuUsed {
            server: self
                .server
                .and_then(|(p, c0)| cpu_seconds(&p.to_string()).ok().map(|c| c - c0)),
            bench: cpu_seconds("self").unwrap_or(0.0) - self.own,
            wall: self.started.elapsed(),
        }
    }
}

/// CPU of several named processes (e.g. etcd and each node of a cluster) and of this tool over
/// one phase: what [`CpuMeter`] does for one server, for a cluster whose processes share the
/// machine's cores.
pub struct ProcsMeter {
    procs: Vec<(String, u32, Option<f64>)>,
    own: f64,
    started: Instant,
}

/// CPU seconds of each named process over a phase (`None`: it was gone at the end), this
/// tool's, and the phase's wall time.
pub struct ProcsCpu {
    pub procs: Vec<(String, Option<f64>)>,
    pub bench: f64,
    pub wall: Duration,
}

impl ProcsMeter {
    pub fn start(procs: &[(String, u32)]) -> Self {
        Self {
            procs: procs
                .iter()
                .map(|(name, pid)| (name.clone(), *pid, cpu_seconds(&pid.to_string()).ok()))
                .collect(),
            own: cpu_seconds("self").unwrap_or(0.0),
            started: Instant::now(),
        }
    }

    pub fn stop(&self) -> ProcsCpu {
        ProcsCpu {
            procs: self
                .procs
                .iter()
                .map(|(name, pid, c0)| {
                    let used = c0.and_then(|c0| cpu_seconds(&pid.to_string()).ok().map(|c| c - c0));
                    (name.clone(), used)
                })
                .collect(),
            bench: cpu_seconds("self").unwrap_or(0.0) - self.own,
            wall: self.started.elapsed(),
        }
    }
}

impl ProcsCpu {
    /// One line: each process's CPU seconds and share of one core over the phase.
    pub fn describe(&self) -> String {
        let wall = self.wall.as_secs_f64().max(1e-9);
        let one = |name: &str, c: Option<f64>| match c {
            Some(c) => format!("{name} {c:.2} s ({:.0}%)", 100.0 * c / wall),
            None => format!("{name} ? (exited)"),
        };
        let mut parts: Vec<String> = self.procs.iter().map(|(n, c)| one(n, *c)).collect();
        parts.push(one("bench", Some(self.bench)));
        format!("CPU over {wall:.2} s (% of one core): {}", parts.join(", "))
    }
}

/// One line of a result table.
#[derive(Clone)]
pub struct Row {
    pub scenario: String,
    pub params: String,
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    /// Throughput unit, e.g. "inst/s"; empty: no throughput (printed as `-`).
    pub unit: &'static str,
    pub latency: Latency,
    /// `None`: not measured separately (printed as `-`).
    pub cpu: Option<CpuUsed>,
}

impl Row {
    pub fn throughput(&self) -> String {
        if self.secs <= 0.0 || self.unit.is_empty() {
            return "-".into();
        }
        format!("{:.0} {}", self.ops as f64 / self.secs, self.unit)
    }
}

/// Prints a Markdown table of `rows`, then `notes` as a list.
pub fn print_table(title: &str, rows: &[Row], notes: &[String]) {
    let header = [
        "scenario",
        "parameters",
        "ops",
        "errors",
        "seconds",
        "throughput",
        "p50",
        "p99",
        "p999",
        "max",
        "server CPU",
        "bench CPU",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let pct = |c: f64, wall: Duration| {
            format!(
                "{c:.2} s ({:.0}%)",
                100.0 * c / wall.as_secs_f64().max(1e-9)
            )
        };
        let (server_cpu, bench_cpu) = match r.cpu {
            Some(cpu) => (
                cpu.server
                    .map(|c| pct(c, cpu.wall))
                    .unwrap_or_else(|| "-".into()),
                pct(cpu.bench, cpu.wall),
            ),
            None => ("-".into(), "-".into()),
        };
        lines.push(vec![
            r.scenario.clone(),
            r.params.clone(),
            r.ops.to_string(),
            r.errors.to_string(),
            format!("{:.2}", r.secs),
            r.throughput(),
            r.latency.ms_at(0.5),
            r.latency.ms_at(0.99),
            r.latency.ms_at(0.999),
            r.latency.ms_max(),
            server_cpu,
            bench_cpu,
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!("\n## {title}\n\n");
    for (n, l) in lines.iter().enumerate() {
        out.push('|');
        for (cell, w) in l.iter().zip(&widths) {
            let _ = write!(out, " {cell:<w$} |");
        }
        out.push('\n');
        if n == 0 {
            out.push('|');
            for w in &widths {
                let _ = write!(out, "{}|", "-".repeat(w + 2));
            }
            out.push('\n');
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    println!("{out}");
}
