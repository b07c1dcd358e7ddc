//! The operator endpoints of the 1.x API: `/operator/metrics` (counts, and the host's cpu,
//! load and memory where the platform tells them — left out otherwise), `/operator/switches`
//! (what this server really does), `/operator/servers` and `/console/namespaces`.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{AppState, LIST_CACHE_MILLIS};
use crate::mapping::{self, BEAT_INTERVAL_MILLIS};

pub(super) async fn metrics(State(s): AppState) -> Response {
    let summaries = s.registry.namespaces();
    let services: usize = summaries.iter().map(|n| n.services).sum();
    let instances: usize = summaries.iter().map(|n| n.instances).sum();
    let mut body = json!({
        "status": "UP",
        "serviceCount": services,
        "instanceCount": instances,
        "responsibleServiceCount": services,
        "responsibleInstanceCount": instances,
        "subscribeCount": s.metrics.subscriptions.get(),
        "clientCount": s.metrics.connections.get(),
        "connectionBasedClientCount": s.metrics.connections.get(),
    });
    // Nacos' figures are the host's: cpu in use (0-1), 1-minute load average, memory in use
    // (0-1). Where the platform does not tell them they are left out, not reported as 0.
    if let Some(m) = body.as_object_mut() {
        if let Some(cpu) = s.cpu.busy() {
            m.insert("cpu".into(), json!(cpu));
        }
        if let Some(load) = host::load_average() {
            m.insert("load".into(), json!(load));
        }
        if let Some(mem) = host::memory_used() {
            m.insert("mem".into(), json!(mem));
        }
    }
    Json(body).into_response()
}

/// What this server really does, in Nacos' switch names.
pub(super) async fn switches(State(s): AppState) -> Response {
    Json(json!({
        "name": "00-00---000-NACOS_SWITCH_DOMAIN-000---00-00",
        "defaultPushCacheMillis": crate::grpc::PUSH_CACHE_MILLIS,
        "clientBeatInterval": BEAT_INTERVAL_MILLIS,
        "defaultCacheMillis": LIST_CACHE_MILLIS,
        "distroEnabled": false,
        "healthCheckEnabled": s.config.health_checks,
        "lightBeatEnabled": true,
        // Nacos' UDP push to 1.x HTTP clients (which give a udpPort): on unless the adapter
        // has no UDP socket; 2.x gRPC subscribers are always pushed to.
        "pushEnabled": s.udp.is_some(),
    }))
    .into_response()
}

/// The host's figures, read from Linux' `/proc`; `None` elsewhere or when unreadable.
pub(crate) mod host {
    use parking_lot::Mutex;

    /// The 1-minute load average.
    pub fn load_average() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/loadavg").ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// The fraction of memory in use (not available to new work).
    pub fn memory_used() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<f64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            line[name.len()..].split_whitespace().next()?.parse().ok()
        };
        let total = field("MemTotal:")?;
        let available = field("MemAvailable:")?;
        (total > 0.0).then(|| (1.0 - available / total).clamp(0.0, 1.0))
    }

    /// (busy, total) jiffies of all CPUs since boot.
    fn cpu_times() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let total: u64 = v.iter().sum();
        // idle + iowait
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((total.saturating_sub(idle), total))
    }

    /// The fraction of CPU time busy between two readings, without sleeping in a request:
    /// each call measures since the previous one (the first since the meter was made, which
    /// starts from the figure since boot). A figure since boot alone would hide what is
    /// happening now.
    pub struct CpuMeter(Mutex<CpuReading>);

    #[derive(Clone, Copy)]
    struct CpuReading {
        busy: u64,
        total: u64,
        fraction: Option<f64>,
    }

    impl CpuMeter {
        pub fn new() -> Self {
            let (busy, total) = cpu_times().unwrap_or((0, 0));
            let fraction = (total > 0).then(|| busy as f64 / total as f64);
            Self(Mutex::new(CpuReading {
                busy,
                total,
                fraction,
            }))
        }

        pub fn busy(&self) -> Option<f64> {
            let (busy, total) = cpu_times()?;
            let mut last = self.0.lock();
            // Within one clock tick of the last reading: nothing new to measure.
            if let Some(dt) = total.checked_sub(last.total).filter(|d| *d > 0) {
                let f = busy.saturating_sub(last.busy) as f64 / dt as f64;
                *last = CpuReading {
                    busy,
                    total,
                    fraction: Some(f.clamp(0.0, 1.0)),
                };
            }
            last.fraction
        }
    }
}

/// The one server of this "cluster", as Nacos' `/operator/servers` lists its members.
pub(super) async fn servers(headers: axum::http::HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:8848")
        .to_string();
    let (ip, port) = host.rsplit_once(':').unwrap_or((host.as_str(), "8848"));
    Json(json!({
        "servers": [{
            "ip": ip,
            "port": port.parse::<u16>().unwrap_or(8848),
            "state": "UP",
            "address": host,
            "extendInfo": {"version": env!("CARGO_PKG_VERSION"), "server": "sextant"},
        }]
    }))
    .into_response()
}

pub(super) async fn namespaces(State(s): AppState) -> Response {
    let mut data = vec![json!({
        "namespace": "",
        "namespaceShowName": "public",
        "namespaceDesc": "Public Namespace",
        "quota": 200,
        "configCount": 0,
        "type": 0,
    })];
    for n in s.registry.namespaces() {
        if &*n.namespace == mapping::PUBLIC {
            continue;
        }
        data.push(json!({
            "namespace": &*n.namespace,
            "namespaceShowName": &*n.namespace,
            "namespaceDesc": "",
            "quota": 200,
            "configCount": 0,
            "type": 2,
        }));
    }
    Json(json!({"code": 200, "message": null, "data": data})).into_response()
}
