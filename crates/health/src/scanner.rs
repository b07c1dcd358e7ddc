//! The scanner's scheduler: one task that owns every target's probe counters and due time.
//!
//! Due probes sit in two min-heaps (healthy-or-unknown, unhealthy), each with its own share of
//! the concurrency (a semaphore). A probe runs as a short task holding a permit; nothing is held
//! per instance between probes, so 100,000 targets cost 100,000 small structs and heap entries.
//! Results come back over a channel; the scheduler applies rise/fall, decides status flips, holds
//! back flips that would turn most of a service unhealthy at once, writes the rest through the
//! registry, and schedules the next probe. Every second it reconciles its targets with the
//! registry, re-reading only services whose revision moved — in a cluster, only the services
//! this node's shard owns (`shard`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sextant_core::model::{Health, HealthCheck, Revision, ServiceKey, StatusPatch, XorShift};
use sextant_core::{Op, Registry};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;

use crate::metrics::{HealthMetrics, OutcomeLabels, ProbeLabels};
use crate::probe::{probe, Failure, Verdict};
use crate::shard::Shard;

/// Tunables of the scanner.
#[derive(Debug, Clone)]
pub struct ScannerConfig {
    /// Probes in flight at once, across all targets.
    pub concurrency: usize,
    /// Share of `concurrency` reserved for re-probing unhealthy instances, in percent.
    pub unhealthy_share_percent: u32,
    /// How often targets are reconciled with the registry.
    pub reconcile_interval: Duration,
    /// If flipping would leave more than this fraction of a service unhealthy, hold the flips
    /// back: it is more likely the scanner's network than the service.
    pub mass_failure_fraction: f32,
    /// Services smaller than this are never protected (one of two failing is plausible).
    pub mass_failure_min_instances: usize,
    /// Longest pause between probes of an instance that keeps failing.
    pub max_backoff: Duration,
    /// Suspect reports accepted per reporter per second, and the burst allowed.
    pub suspect_rate_per_second: f64,
    pub suspect_burst: f64,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        Self {
            concurrency: 2048,
            unhealthy_share_percent: 25,
            reconcile_interval: Duration::from_secs(1),
            mass_failure_fraction: 0.5,
            mass_failure_min_instances: 3,
            max_backoff: Duration::from_secs(60),
            suspect_rate_per_second: 10.0,
            suspect_burst: 50.0,
        }
    }
}

/// What became of a suspect report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspectOutcome {
    /// A probe is scheduled now.
    Scheduled,
    /// A probe of that instance is already scheduled or running.
    Duplicate,
    /// The reporter sent too many reports.
    RateLimited,
    /// The instance is not probed (unknown, or its service has no check).
    NotProbed,
}

impl SuspectOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspectOutcome::Scheduled => "scheduled",
            SuspectOutcome::Duplicate => "duplicate",
            SuspectOutcome::RateLimited => "rate_limited",
            SuspectOutcome::NotProbed => "not_probed",
        }
    }
}

enum Command {
    Suspect {
        key: TargetKey,
        reporter: String,
        reply: oneshot::Sender<SuspectOutcome>,
    },
}

/// Handle to a running scanner. It stops when the registry shuts down.
#[derive(Clone)]
pub struct Scanner {
    commands: mpsc::Sender<Command>,
}

impl Scanner {
    pub fn start(registry: Registry, config: ScannerConfig, metrics: HealthMetrics) -> Scanner {
        Self::start_sharded(registry, config, metrics, None)
    }

    /// A scanner of one cluster node: it probes only the services `shard` says this node owns
    /// (re-read at each reconcile, so a membership change moves services within
    /// `reconcile_interval`), and writes its flips whatever the node's role (a follower
    /// forwards them). `None`: every service, flips written only while this node leads.
    pub fn start_sharded(
        registry: Registry,
        config: ScannerConfig,
        metrics: HealthMetrics,
        shard: Option<watch::Receiver<Shard>>,
    ) -> Scanner {
        let (tx, rx) = mpsc::channel(1024);
        let mut sched = Sched::new(registry, config, metrics);
        sched.shard = shard;
        tokio::spawn(sched.run(rx));
        Scanner { commands: tx }
    }

    /// Asks for an immediate re-probe of an instance someone saw failing.
    pub async fn suspect(&self, service: ServiceKey, id: &str, reporter: &str) -> SuspectOutcome {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Suspect {
            key: (service, id.into()),
            reporter: reporter.to_string(),
            reply,
        };
        if self.commands.send(cmd).await.is_err() {
            return SuspectOutcome::NotProbed;
        }
        rx.await.unwrap_or(SuspectOutcome::NotProbed)
    }
}

type TargetKey = (ServiceKey, Arc<str>);

struct Target {
    host: Arc<str>,
    port: u16,
    check: Arc<HealthCheck>,
    /// Health as last read from (or written to) the registry.
    health: Health,
    successes: u32,
    failures: u32,
    backoff: u32,
    /// Bumped whenever the target is rescheduled; older heap entries are stale.
    generation: u64,
    in_flight: bool,
    suspect: bool,
}

struct ProbeResult {
    key: TargetKey,
    kind: &'static str,
    result: Result<Verdict, Failure>,
    elapsed: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Healthy = 0,
    Unhealthy = 1,
}

type Due = Reverse<(Instant, u64, u64, TargetKey)>;

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Sched {
    registry: Registry,
    config: ScannerConfig,
    metrics: HealthMetrics,
    targets: HashMap<TargetKey, Target>,
    services: HashMap<ServiceKey, (Revision, HashSet<Arc<str>>)>,
    queues: [BinaryHeap<Due>; 2],
    permits: [Arc<Semaphore>; 2],
    results_tx: mpsc::Sender<ProbeResult>,
    results_rx: Option<mpsc::Receiver<ProbeResult>>,
    pending_flips: Vec<(TargetKey, Health)>,
    protected: HashSet<ServiceKey>,
    buckets: HashMap<String, Bucket>,
    seq: u64,
    rng: XorShift,
    lag_max: Duration,
    lag_window: Instant,
    /// Cluster mode: which services this node probes.
    shard: Option<watch::Receiver<Shard>>,
}

impl Sched {
    fn new(registry: Registry, config: ScannerConfig, metrics: HealthMetrics) -> Self {
        let total = config.concurrency.max(2);
        let unhealthy = (total * config.unhealthy_share_percent.min(90) as usize / 100).max(1);
        let (results_tx, results_rx) = mpsc::channel(total + 16);
        Self {
            registry,
            config,
            metrics,
            targets: HashMap::new(),
            services: HashMap::new(),
            queues: [BinaryHeap::new(), BinaryHeap::new()],
            permits: [
                Arc::new(Semaphore::new(total - unhealthy)),
                Arc::new(Semaphore::new(unhealthy)),
            ],
            results_tx,
            results_rx: Some(results_rx),
            pending_flips: Vec::new(),
            protected: HashSet::new(),
            buckets: HashMap::new(),
            seq: 0,
            rng: XorShift::from_clock(),
            lag_max: Duration::ZERO,
            lag_window: Instant::now(),
            shard: None,
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let Some(mut results) = self.results_rx.take() else {
            return;
        };
        let registry = self.registry.clone();
        let closed = registry.closed();
        tokio::pin!(closed);
        let mut next_reconcile = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_reconcile {
                self.reconcile(now);
                next_reconcile = now + self.config.reconcile_interval;
            }
            self.dispatch(now);
            let wake = self
                .queues
                .iter()
                .filter_map(|q| q.peek().map(|d| d.0 .0))
                .fold(next_reconcile, Instant::min);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                Some(r) = results.recv() => {
                    self.on_result(r);
                    while let Ok(r) = results.try_recv() {
                        self.on_result(r);
                    }
                    self.flush_flips();
                }
                Some(c) = commands.recv() => self.on_command(c),
                _ = &mut closed => {
                    tracing::info!("health scanner stopped");
                    return;
                }
            }
        }
    }

    fn schedule(&mut self, key: TargetKey, delay: Duration, now: Instant) {
        let Some(t) = self.targets.get_mut(&key) else {
            return;
        };
        t.generation += 1;
        let class = if t.health == Health::Unhealthy {
            Class::Unhealthy
        } else {
            Class::Healthy
        };
        let generation = t.generation;
        self.seq += 1;
        self.queues[class as usize].push(Reverse((now + delay, self.seq, generation, key)));
    }

    /// The check's interval, moved by up to ± its jitter.
    fn jittered(&mut self, base: Duration, jitter_percent: u32) -> Duration {
        let spread = base.as_millis() as u64 * u64::from(jitter_percent) / 100;
        if spread == 0 {
            return base;
        }
        let offset = self.rng.below(2 * spread + 1);
        (base + Duration::from_millis(offset)).saturating_sub(Duration::from_millis(spread))
    }

    fn reconcile(&mut self, now: Instant) {
        let mut checked = self.registry.checked_services();
        // Another node's services are as good as unchecked here: their targets go below.
        if let Some(rx) = self.shard.as_mut() {
            let shard = rx.borrow_and_update().clone();
            checked.retain(|(service, _, _)| shard.owns(service));
        }
        let mut seen = HashSet::with_capacity(checked.len());
        for (service, revision, check) in checked {
            seen.insert(service.clone());
            if self.services.get(&service).map(|s| s.0) == Some(revision) {
                continue;
            }
            let check = Arc::new(check);
            let view = self.registry.get(&service, false);
            let mut ids = HashSet::with_capacity(view.instances.len());
            for inst in &view.instances {
                let id: Arc<str> = inst.spec.id.as_str().into();
                let key = (service.clone(), id.clone());
                ids.insert(id);
                let port = if check.port != 0 {
                    check.port
                } else {
                    inst.spec.port
                };
                match self.targets.get_mut(&key) {
                    Some(t) => {
                        if &*t.host != inst.spec.host.as_str() || t.port != port {
                            t.host = inst.spec.host.as_str().into();
                            t.port = port;
                        }
                        t.check = check.clone();
                        t.health = inst.status.health;
                    }
                    None => {
                        self.targets.insert(
                            key.clone(),
                            Target {
                                host: inst.spec.host.as_str().into(),
                                port,
                                check: check.clone(),
                                health: inst.status.health,
                                successes: 0,
                                failures: 0,
                                backoff: 0,
                                generation: 0,
                                in_flight: false,
                                suspect: false,
                            },
                        );
                        // First probes spread over one interval.
                        let first = self.rng.below(u64::from(check.interval_ms) + 1);
                        self.schedule(key, Duration::from_millis(first), now);
                    }
                }
            }
            if let Some((_, old)) = self.services.insert(service.clone(), (revision, ids)) {
                let current = &self.services[&service].1;
                for gone in old.difference(current) {
                    self.targets.remove(&(service.clone(), gone.clone()));
                }
            }
        }
        let dropped: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for service in dropped {
            if let Some((_, ids)) = self.services.remove(&service) {
                for id in ids {
                    self.targets.remove(&(service.clone(), id));
                }
            }
            self.protected.remove(&service);
        }
        // Stale heap entries of removed targets are skipped at dispatch; drop them if the
        // heaps grew far past the targets (e.g. after a large service was removed).
        for q in &mut self.queues {
            if q.len() > 2 * self.targets.len() + 1024 {
                let targets = &self.targets;
                q.retain(|Reverse((_, _, generation, key))| {
                    targets
                        .get(key)
                        .is_some_and(|t| t.generation == *generation)
                });
            }
        }
        self.metrics.targets.set(self.targets.len() as i64);
        let unhealthy = self
            .targets
            .values()
            .filter(|t| t.health == Health::Unhealthy)
            .count();
        self.metrics.unhealthy_targets.set(unhealthy as i64);
        self.metrics
            .protected_services
            .set(self.protected.len() as i64);
    }

    fn dispatch(&mut self, now: Instant) {
        for class in [Class::Healthy, Class::Unhealthy] {
            let c = class as usize;
            while let Some(Reverse((due, _, generation, key))) = self.queues[c].peek() {
                if *due > now {
                    break;
                }
                let live = self
                    .targets
                    .get(key)
                    .is_some_and(|t| t.generation == *generation && !t.in_flight);
                if !live {
                    self.queues[c].pop();
                    continue;
                }
                let Ok(permit) = self.permits[c].clone().try_acquire_owned() else {
                    // At the concurrency limit: the next result frees a permit and wakes us.
                    break;
                };
                let Some(Reverse((due, _, _, key))) = self.queues[c].pop() else {
                    break;
                };
                let lag = now.saturating_duration_since(due);
                self.metrics.cycle_lag_seconds.observe(lag.as_secs_f64());
                self.lag_max = self.lag_max.max(lag);
                let Some(t) = self.targets.get_mut(&key) else {
                    continue;
                };
                t.in_flight = true;
                let (check, host, port) = (t.check.clone(), t.host.clone(), t.port);
                let tx = self.results_tx.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let result = probe(&check, &host, port).await;
                    drop(permit);
                    let _ = tx
                        .send(ProbeResult {
                            key,
                            kind: check.kind.as_str(),
                            result,
                            elapsed: started.elapsed(),
                        })
                        .await;
                });
            }
        }
        if now.saturating_duration_since(self.lag_window) >= Duration::from_secs(1) {
            self.metrics
                .cycle_lag_max_ms
                .set(self.lag_max.as_millis() as i64);
            self.lag_max = Duration::ZERO;
            self.lag_window = now;
        }
    }

    fn on_result(&mut self, r: ProbeResult) {
        let now = Instant::now();
        self.metrics
            .probes
            .get_or_create(&ProbeLabels {
                kind: r.kind,
                result: match r.result {
                    Ok(Verdict::Passing) => "ok",
                    Ok(Verdict::Warning) => "warning",
                    Err(f) => f.as_str(),
                },
            })
            .inc();
        self.metrics.probe_seconds.observe(r.elapsed.as_secs_f64());
        let Some(t) = self.targets.get_mut(&r.key) else {
            return;
        };
        t.in_flight = false;
        t.suspect = false;
        let interval = Duration::from_millis(u64::from(t.check.interval_ms));
        let jitter = t.check.jitter_percent;
        let delay = match r.result {
            Ok(verdict) => {
                t.successes += 1;
                t.failures = 0;
                t.backoff = 0;
                let health = match verdict {
                    Verdict::Passing => Health::Healthy,
                    Verdict::Warning => Health::Warning,
                };
                if t.health != health && t.successes >= t.check.rise {
                    self.pending_flips.push((r.key.clone(), health));
                }
                interval
            }
            Err(_) => {
                t.failures += 1;
                t.successes = 0;
                if t.health == Health::Unhealthy {
                    // Already known bad: back off, up to the cap.
                    t.backoff = (t.backoff + 1).min(16);
                    interval
                        .saturating_mul(1 << t.backoff.min(6))
                        .min(self.config.max_backoff.max(interval))
                } else {
                    if t.failures >= t.check.fall {
                        self.pending_flips.push((r.key.clone(), Health::Unhealthy));
                    }
                    interval
                }
            }
        };
        let delay = self.jittered(delay, jitter);
        self.schedule(r.key, delay, now);
    }

    /// Writes the decided flips, except unhealthy flips that would turn too much of a service
    /// unhealthy at once.
    fn flush_flips(&mut self) {
        if self.pending_flips.is_empty() {
            return;
        }
        let flips = std::mem::take(&mut self.pending_flips);
        // Unsharded, every node probes every service: only the leader's flips are written (a
        // follower's would race them). Sharded, each service has one prober, whatever its role.
        if self.shard.is_none() && self.registry.writable().is_err() {
            return;
        }
        let mut down: HashMap<ServiceKey, usize> = HashMap::new();
        for (key, h) in &flips {
            if *h == Health::Unhealthy {
                *down.entry(key.0.clone()).or_default() += 1;
            }
        }
        let mut held = HashSet::new();
        for (service, newly) in down {
            let Some((_, ids)) = self.services.get(&service) else {
                continue;
            };
            let total = ids.len();
            let already = ids
                .iter()
                .filter(|id| {
                    self.targets
                        .get(&(service.clone(), (*id).clone()))
                        .is_some_and(|t| t.health == Health::Unhealthy)
                })
                .count();
            let fraction = (already + newly) as f32 / total.max(1) as f32;
            if total >= self.config.mass_failure_min_instances
                && fraction > self.config.mass_failure_fraction
            {
                self.metrics.protection_trips.inc();
                if self.protected.insert(service.clone()) {
                    tracing::warn!(
                        service = %service,
                        failing = already + newly,
                        total,
                        "most of the service failed at once: probably the scanner's network; keeping last statuses"
                    );
                }
                held.insert(service);
            } else if self.protected.remove(&service) {
                tracing::info!(service = %service, "mass-failure protection lifted");
            }
        }
        self.metrics
            .protected_services
            .set(self.protected.len() as i64);
        let mut ops = Vec::new();
        for (key, health) in flips {
            if held.contains(&key.0) {
                continue;
            }
            if let Some(t) = self.targets.get_mut(&key) {
                t.health = health;
            }
            self.metrics
                .flips
                .get_or_create(&OutcomeLabels {
                    outcome: health.as_str(),
                })
                .inc();
            tracing::info!(service = %key.0, id = &*key.1, health = health.as_str(), "health changed");
            ops.push(Op::Status {
                service: key.0,
                id: key.1.to_string(),
                patch: StatusPatch {
                    health: Some(health),
                    ..Default::default()
                },
            });
        }
        if ops.is_empty() {
            return;
        }
        let registry = self.registry.clone();
        tokio::spawn(async move {
            if let Err(e) = registry.apply(ops).await {
                tracing::warn!(error = %e, "could not write health changes; the next probes retry");
            }
        });
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Suspect {
                key,
                reporter,
                reply,
            } => {
                let outcome = self.suspect(key, &reporter);
                self.metrics
                    .suspects
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome.as_str(),
                    })
                    .inc();
                let _ = reply.send(outcome);
            }
        }
    }

    fn suspect(&mut self, key: TargetKey, reporter: &str) -> SuspectOutcome {
        let now = Instant::now();
        if !self.targets.contains_key(&key) {
            return SuspectOutcome::NotProbed;
        }
        if !self.take_token(reporter, now) {
            return SuspectOutcome::RateLimited;
        }
        let Some(t) = self.targets.get_mut(&key) else {
            return SuspectOutcome::NotProbed;
        };
        if t.suspect || t.in_flight {
            return SuspectOutcome::Duplicate;
        }
        t.suspect = true;
        self.schedule(key, Duration::ZERO, now);
        SuspectOutcome::Scheduled
    }

    /// Token bucket per reporter; the table is bounded by forgetting idle reporters.
    fn take_token(&mut self, reporter: &str, now: Instant) -> bool {
        if self.buckets.len() > 10_000 {
            self.buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(60));
        }
        let (rate, burst) = (
            self.config.suspect_rate_per_second,
            self.config.suspect_burst.max(1.0),
        );
        let b = self.buckets.entry(reporter.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * rate;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
