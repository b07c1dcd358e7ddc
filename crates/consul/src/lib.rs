//! Sextant's Consul adapter: Consul clients (py-consul, the Go `api` package behind
//! consul-template, Traefik and fabio, Spring Cloud Consul, Prometheus' `consul_sd_configs`)
//! register, check and discover against Sextant with only an address change.
//!
//! It serves Consul's agent, catalog, health and status HTTP API on a listener of its own
//! (`sextant-server` binds it, default `127.0.0.1:8500`): [`http`] holds the routes and
//! handlers (and blocking queries), [`mapping`] every rule from Consul's model to Sextant's
//! and back (pure and property-tested), [`agent`] what a Consul agent keeps that the registry
//! does not (TTL check states, maintenance reasons, critical-since clocks). Every write is a
//! call on the core's [`Registry`]; the background task here expires TTL checks, writes the
//! health they decide, and removes instances critical for longer than their
//! `DeregisterCriticalServiceAfter`.
//!
//! This file owns the error type, the settings and the adapter handle.
#![forbid(unsafe_code)]

pub mod agent;
mod answers;
pub mod http;
pub mod mapping;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use sextant_core::model::{Health, StatusPatch};
use sextant_core::{CoreError, ErrorKind, Op, Registry};
use tokio::time::Instant;

pub use metrics::ConsulMetrics;

use crate::agent::Agent;

/// Everything a Consul request can fail with. Answered as Consul answers errors: a status and
/// a plain-text message.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error(transparent)]
    Mapping(#[from] mapping::MappingError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A part of Consul's API Sextant does not serve (the message names it).
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Core(#[from] CoreError),
    /// No or a bad token (401), or a right the token lacks (403).
    #[error(transparent)]
    Auth(#[from] sextant_core::AuthError),
}

impl ConsulError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConsulError::Mapping(_) | ConsulError::BadRequest(_) => ErrorKind::Invalid,
            ConsulError::NotFound(_) => ErrorKind::NotFound,
            ConsulError::Unsupported(_) => ErrorKind::Unsupported,
            ConsulError::Core(e) => e.kind(),
            ConsulError::Auth(e) => e.kind(),
        }
    }
}

impl IntoResponse for ConsulError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let wait = match &self {
            ConsulError::Core(e) => e.retry_after(),
            _ => None,
        };
        let wait = wait.or_else(|| {
            matches!(
                self.kind(),
                ErrorKind::Unavailable | ErrorKind::ShuttingDown
            )
            .then_some(sextant_core::RETRY_AFTER_BUSY)
        });
        let mut resp = (status, self.to_string()).into_response();
        if let Some(wait) = wait {
            if let Ok(v) =
                axum::http::HeaderValue::from_str(&sextant_core::retry_after_header(wait))
            {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// The adapter's settings.
#[derive(Debug, Clone)]
pub struct ConsulConfig {
    /// The datacenter clients see (`/v1/agent/self`, `Datacenter` fields); others are refused.
    pub datacenter: String,
    /// The agent's node name in `/v1/agent/self`.
    pub node_name: String,
    /// The listener's address, answered by `/v1/status/leader`.
    pub addr: SocketAddr,
    /// The smallest `DeregisterCriticalServiceAfter` (Consul's: one minute).
    pub min_deregister_after: Duration,
    /// How often TTL deadlines and critical-too-long instances are checked.
    pub tick: Duration,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        Self {
            datacenter: "dc1".into(),
            node_name: "sextant".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 8500)),
            min_deregister_after: Duration::from_secs(60),
            tick: Duration::from_millis(500),
        }
    }
}

/// The adapter: the registry it serves, the agent's state and its metrics.
#[derive(Clone)]
pub struct Consul {
    pub(crate) registry: Registry,
    pub(crate) config: Arc<ConsulConfig>,
    pub(crate) agent: Arc<Agent>,
    pub(crate) metrics: ConsulMetrics,
    pub(crate) answers: Arc<answers::Answers>,
}

impl Consul {
    /// Takes the agent-registered instances already in the registry and starts the background
    /// task (it stops when the registry shuts down).
    pub fn start(registry: Registry, config: ConsulConfig, metrics: ConsulMetrics) -> Self {
        let agent = Arc::new(Agent::default());
        let now = Instant::now();
        let mut adopted = 0;
        for ns in registry.namespaces() {
            for s in registry.services(&ns.namespace) {
                for inst in registry.get(&s.service, false).instances {
                    if mapping::checks_of(&inst).is_some() {
                        agent.adopt(&s.service, &inst, None, now);
                        adopted += 1;
                    }
                }
            }
        }
        if adopted > 0 {
            tracing::info!(
                instances = adopted,
                "consul: took back the agent's services"
            );
        }
        let c = Self {
            registry,
            config: Arc::new(config),
            agent,
            metrics,
            answers: Arc::default(),
        };
        tokio::spawn(c.clone().background());
        c
    }

    /// Consul's HTTP API, to serve on its own listener.
    pub fn router(&self) -> Router {
        http::routes(self.clone())
    }

    async fn background(self) {
        let closed = self.registry.clone();
        let closed = closed.closed();
        tokio::pin!(closed);
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sweep(Instant::now()).await,
                _ = &mut closed => return,
            }
        }
    }

    /// Expires TTL checks, writes the health they decide where the registry differs, and
    /// removes instances critical for too long.
    async fn sweep(&self, now: Instant) {
        // In a cluster only the leader writes; a follower's TTL checks get their reports
        // through the leader (a follower refuses them with 503 naming it).
        if self.registry.writable().is_err() {
            return;
        }
        let expired = self.agent.expire(now);
        if expired > 0 {
            self.metrics.ttl_expired.inc_by(expired as u64);
        }
        let mut ops = Vec::new();
        for w in self.agent.ttl_healths() {
            let current = self
                .registry
                .instance(&w.key, &w.id)
                .map(|i| i.status.health);
            if current.is_some_and(|h| h != w.health) {
                ops.push(health_op(w.key, w.id, w.health));
            }
        }
        let reap = self.agent.reap(now, |key, id| {
            self.registry.instance(key, id).map(|i| i.status.health)
        });
        for (key, id) in reap {
            tracing::info!(service = %key, id, "consul: deregistering an instance critical for longer than its DeregisterCriticalServiceAfter");
            self.metrics.reaped.inc();
            ops.push(Op::Deregister { service: key, id });
        }
        self.metrics.ttl_checks.set(self.agent.ttl_checks() as i64);
        if !ops.is_empty() {
            // Each op has its own result: one instance gone meanwhile fails only its own.
            if let Err(e) = self.registry.apply(ops).await {
                tracing::warn!(error = %e, "consul: could not write check results; retrying on the next sweep");
            }
        }
    }
}

pub(crate) fn health_op(
    service: sextant_core::model::ServiceKey,
    id: String,
    health: Health,
) -> Op {
    Op::Status {
        service,
        id,
        patch: StatusPatch {
            health: Some(health),
            ..StatusPatch::default()
        },
    }
}
