//! Scenario `health`: the central scanner probing E endpoints (default 100,000) every interval
//! (default 5 s). The tool runs the endpoints itself — a few fast TCP responders on several
//! loopback addresses that accept and close — registers E instances spread over them and over S
//! services, gives every service a `tcp` check, lets one cycle pass, then measures over a window:
//! probes per second against the E/interval a full cycle needs, how late probes ran against their
//! schedule (cycle lag, from the server's histogram), connections the responders saw, and the
//! CPU the server and this tool used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sextant_proto::v1 as pb;
use tokio::time::Instant;

use crate::load::{self, NAMESPACE};
use crate::stats::{print_table, CpuMeter, Latency, Row};
use crate::target::Target;

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Endpoints (instances) to probe.
    #[arg(long, short = 'e', default_value_t = 100_000)]
    pub endpoints: u64,
    /// Services they are spread over.
    #[arg(long, short = 's', default_value_t = 1_000)]
    pub services: u64,
    /// Probe interval of every check.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Probe timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// TCP responders, each on its own loopback address (127.0.0.2, 127.0.0.3, ...).
    #[arg(long, default_value_t = 8)]
    pub responders: u32,
    /// Measurement window, after the first full cycle.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Longest wait for the scanner to pick up every endpoint.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub warmup_deadline: Duration,
}

/// Prometheus text → (series with labels → value). Enough for counters, gauges and buckets.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

async fn scrape(client: &reqwest::Client, http: &str) -> anyhow::Result<HashMap<String, f64>> {
    let text = client
        .get(format!("{http}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(parse_metrics(&text))
}

fn sum_prefix(m: &HashMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// The `q` quantile (seconds) of a histogram's increase between two scrapes, from its buckets.
fn bucket_quantile(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    name: &str,
    q: f64,
) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn service_name(run: &str, s: u64) -> String {
    format!("health-{run}-{s:04}")
}

pub async fn run(t: &mut Target, a: &HealthArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.endpoints > 0 && a.services > 0 && a.responders > 0 && a.responders < 250,
        "sizes must be positive, responders below 250"
    );
    let run = load::run_id();
    let mut notes = Vec::new();

    // 1. Responders: accept and close at once.
    let accepted = Arc::new(AtomicU64::new(0));
    let mut addrs = Vec::new();
    for k in 0..a.responders {
        let ip = format!("127.0.0.{}", k + 2);
        let l = tokio::net::TcpListener::bind((ip.as_str(), 0))
            .await
            .with_context(|| format!("cannot listen on {ip}"))?;
        addrs.push(l.local_addr()?);
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
        });
    }

    // 2. Register the endpoints, 1000 per batch.
    let per_service = a.endpoints.div_ceil(a.services);
    let clients = load::grpc_clients(&t.grpc, 4).await?;
    let started = Instant::now();
    let mut c = clients[0].clone();
    let mut i = 0;
    while i < a.endpoints {
        let end = (i + 1000).min(a.endpoints);
        let instances = (i..end)
            .map(|g| {
                let addr = addrs[(g % addrs.len() as u64) as usize];
                let mut r =
                    load::grpc_request(&service_name(&run, g / per_service), format!("e{g}"), g);
                if let Some(spec) = r.spec.as_mut() {
                    spec.host = addr.ip().to_string();
                    spec.port = u32::from(addr.port());
                    spec.protocol = "tcp".into();
                }
                r
            })
            .collect();
        c.batch_register(pb::BatchRegisterRequest { instances })
            .await
            .context("registering the endpoints")?;
        i = end;
    }
    notes.push(format!(
        "registered {} endpoints in {} services in {:.1} s",
        a.endpoints,
        a.services,
        started.elapsed().as_secs_f64()
    ));

    // 3. A tcp check on every service.
    let check = pb::HealthCheck {
        kind: pb::CheckKind::CheckTcp as i32,
        interval_ms: a.interval.as_millis() as u32,
        timeout_ms: a.timeout.as_millis() as u32,
        rise: 1,
        fall: 3,
        jitter_percent: 10,
        ..Default::default()
    };
    for s in 0..a.services.min(a.endpoints.div_ceil(per_service)) {
        c.configure_service(pb::ConfigureServiceRequest {
            service: Some(pb::ServiceRef {
                namespace: NAMESPACE.into(),
                service: service_name(&run, s),
            }),
            protect_threshold: None,
            check: Some(check.clone()),
        })
        .await
        .context("setting the check")?;
    }

    // 4. Warm-up: every endpoint known to the scanner, then one whole interval.
    let http = load::http_client(Some(Duration::from_secs(30)))?;
    let deadline = Instant::now() + a.warmup_deadline;
    loop {
        let m = scrape(&http, &t.http).await?;
        let targets = m.get("sextant_health_targets").copied().unwrap_or(0.0);
        if targets as u64 >= a.endpoints {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the scanner knows {targets} of {} endpoints after {:?}",
            a.endpoints,
            a.warmup_deadline
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(a.interval + Duration::from_secs(1)).await;

    // 5. The window.
    let before = scrape(&http, &t.http).await?;
    let accepted0 = accepted.load(Ordering::Relaxed);
    let meter = CpuMeter::start(t.pid);
    let window_start = Instant::now();
    let mut lag_max_ms = 0f64;
    while window_start.elapsed() < a.window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = scrape(&http, &t.http).await?;
        lag_max_ms = lag_max_ms.max(
            m.get("sextant_health_cycle_lag_max_ms")
                .copied()
                .unwrap_or(0.0),
        );
    }
    let cpu = meter.stop();
    let after = scrape(&http, &t.http).await?;
    let secs = window_start.elapsed().as_secs_f64();
    let probes = sum_prefix(&after, "sextant_health_probes_total")
        - sum_prefix(&before, "sextant_health_probes_total");
    let failed = probes
        - (after
            .get("sextant_health_probes_total{kind=\"tcp\",result=\"ok\"}")
            .copied()
            .unwrap_or(0.0)
            - before
                .get("sextant_health_probes_total{kind=\"tcp\",result=\"ok\"}")
                .copied()
                .unwrap_or(0.0));
    let accepted_in_window = accepted.load(Ordering::Relaxed) - accepted0;
    let needed = a.endpoints as f64 / a.interval.as_secs_f64();
    let lag_p50 = bucket_quantile(&before, &after, "sextant_health_cycle_lag_seconds", 0.5);
    let lag_p99 = bucket_quantile(&before, &after, "sextant_health_cycle_lag_seconds", 0.99);
    let lag_n = after
        .get("sextant_health_cycle_lag_seconds_count")
        .copied()
        .unwrap_or(0.0)
        - before
            .get("sextant_health_cycle_lag_seconds_count")
            .copied()
            .unwrap_or(0.0);
    let lag_sum = after
        .get("sextant_health_cycle_lag_seconds_sum")
        .copied()
        .unwrap_or(0.0)
        - before
            .get("sextant_health_cycle_lag_seconds_sum")
            .copied()
            .unwrap_or(0.0);
    let fmt = |s: Option<f64>| match s {
        Some(v) if v.is_finite() => format!("<= {:.1} ms", v * 1000.0),
        Some(_) => "> largest bucket".into(),
        None => "-".into(),
    };
    notes.push(format!(
        "probes/s {:.0} against {:.0} needed for {} endpoints every {:?}: {:.1}% of a full cycle",
        probes / secs,
        needed,
        a.endpoints,
        a.interval,
        100.0 * probes / secs / needed
    ));
    notes.push(format!(
        "cycle lag: mean {:.1} ms, p50 {}, p99 {} (bucket bounds), max over 1 s windows {:.0} ms; one interval is {} ms",
        if lag_n > 0.0 { 1000.0 * lag_sum / lag_n } else { 0.0 },
        fmt(lag_p50),
        fmt(lag_p99),
        lag_max_ms,
        a.interval.as_millis()
    ));
    notes.push(format!(
        "failed probes in the window: {failed:.0}; connections the responders accepted: {accepted_in_window} ({} responders)",
        a.responders
    ));
    let rows = vec![Row {
        scenario: "health: tcp probes by the scanner".into(),
        params: format!(
            "E={} S={} interval={:?} timeout={:?} window={:?}",
            a.endpoints, a.services, a.interval, a.timeout, a.window
        ),
        ops: probes as u64,
        errors: failed.max(0.0) as u64,
        secs,
        unit: "probes/s",
        latency: Latency::new(),
        cpu: Some(cpu),
    }];
    print_table("health", &rows, &notes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_bucket_increases() {
        let before = parse_metrics(
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 10\nh_bucket{le=\"+Inf\"} 10\n",
        );
        let after = parse_metrics(
            "h_bucket{le=\"0.001\"} 60\nh_bucket{le=\"0.01\"} 109\nh_bucket{le=\"+Inf\"} 110\n",
        );
        assert_eq!(bucket_quantile(&before, &after, "h", 0.5), Some(0.001));
        assert_eq!(bucket_quantile(&before, &after, "h", 0.99), Some(0.01));
        assert_eq!(
            bucket_quantile(&before, &after, "h", 1.0),
            Some(f64::INFINITY)
        );
    }
}
