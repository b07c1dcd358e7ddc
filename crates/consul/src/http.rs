//! The routes and handlers of Consul's HTTP API:
//!
//! | request | answer |
//! |---|---|
//! | `PUT /v1/agent/service/register` | register or replace (upsert) → 200 |
//! | `PUT /v1/agent/service/deregister/:id` | → 200; 404 unknown |
//! | `PUT /v1/agent/service/maintenance/:id?enable=&reason=` | disable / enable the instance → 200 |
//! | `PUT /v1/agent/check/{pass,warn,fail}/:id?note=`, `PUT /v1/agent/check/update/:id` | TTL report → 200; 404 unknown check |
//! | `GET /v1/agent/services`, `/service/:id`, `/checks`, `/self`, `/members` | the agent's view |
//! | `GET /v1/catalog/services`, `/service/:name`, `/nodes`, `/datacenters` | the catalog |
//! | `GET /v1/health/service/:name`, `/checks/:name`, `/state/:state` | health entries and checks |
//! | `GET /v1/status/leader`, `/peers` | this listener's address |
//! | KV, sessions, transactions, events, ACLs, Connect, prepared queries, ... | 501 naming it |
//! | anything else | 404 naming the path |
//!
//! Every answer carries `X-Consul-Index` (≥ 1), `X-Consul-KnownLeader: true` and
//! `X-Consul-LastContact: 0`, errors included. Reads are blocking queries: with `?index=N` they
//! wait (`?wait`, default 5 min, at most 10, plus up to 1/16 jitter) until the answer's index
//! passes N. A service's index is its revision; catalog-wide answers use the registry's.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Extension, OriginalUri, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use axum::Router;
use serde_json::{json, Map, Value};
use sextant_core::model::acl::{Resource, Right};
use sextant_core::model::{
    InstanceStatus, Registration, Revision, ServiceKey, StatusPatch, XorShift,
};
use sextant_core::{CoreError, Op, Principal, ServiceView};
use tokio::time::Instant;

use crate::agent::TtlError;
use crate::answers::Question;
use crate::mapping::{self, Fields, Status, NAMESPACE};
use crate::{health_op, Consul, ConsulError};

const INDEX: HeaderName = HeaderName::from_static("x-consul-index");
const KNOWN_LEADER: HeaderName = HeaderName::from_static("x-consul-knownleader");
const LAST_CONTACT: HeaderName = HeaderName::from_static("x-consul-lastcontact");

/// Parts of Consul's API that are out of scope, answered 501 with what they are.
const UNSERVED: &[(&str, &str)] = &[
    (
        "kv",
        "the KV store (/v1/kv): Sextant is a naming service; keep configuration elsewhere",
    ),
    ("session", "sessions and locks (/v1/session)"),
    ("txn", "transactions (/v1/txn)"),
    ("event", "user events (/v1/event)"),
    ("acl", "Consul ACLs (/v1/acl)"),
    (
        "connect",
        "Consul Connect (/v1/connect): Sextant's mesh is xDS",
    ),
    ("config", "config entries (/v1/config)"),
    ("query", "prepared queries (/v1/query)"),
    ("snapshot", "Consul snapshots (/v1/snapshot)"),
    ("operator", "the operator API (/v1/operator)"),
    ("coordinate", "network coordinates (/v1/coordinate)"),
    ("discovery-chain", "discovery chains (/v1/discovery-chain)"),
    ("peering", "cluster peering (/v1/peering)"),
    (
        "namespace",
        "namespace management (/v1/namespace): Sextant's namespaces are its own",
    ),
    ("partition", "admin partitions (/v1/partition)"),
];

pub(crate) fn routes(consul: Consul) -> Router {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/service/maintenance/{id}", put(maintenance))
        .route("/v1/agent/service/{id}", get(agent_service))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/checks", get(agent_checks))
        .route("/v1/agent/check/{verb}/{id}", put(check_report))
        .route("/v1/agent/check/register", any(check_register))
        .route("/v1/agent/check/deregister/{id}", any(check_register))
        .route("/v1/agent/maintenance", any(node_maintenance))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/members", get(agent_members))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/status/peers", get(status_peers))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/catalog/datacenters", get(catalog_datacenters))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/health/checks/{name}", get(health_checks))
        .route("/v1/health/state/{state}", get(health_state))
        .fallback(unknown)
        .layer(axum::middleware::from_fn_with_state(consul.clone(), gate))
        .layer(axum::middleware::from_fn_with_state(
            consul.clone(),
            consul_headers,
        ))
        .with_state(consul)
}

/// The caller as the gate authenticated it; handlers authorize what they touch with it.
#[derive(Clone)]
struct Caller(Principal);

impl Caller {
    fn allow(&self, right: Right, resource: &Resource<'_>) -> Result<(), ConsulError> {
        Ok(self.0.authorize(right, resource)?)
    }
}

/// The token a Consul client sends: `X-Consul-Token`, `Authorization: Bearer`, or `?token=`.
fn token_of(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(t) = headers.get("x-consul-token").and_then(|v| v.to_str().ok()) {
        return Some(t.to_string());
    }
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
    {
        return Some(t.trim().to_string());
    }
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// Every request passes here first: with auth on, no or a bad token is a 401 before any
/// handler runs (so a handler cannot forget it); the request runs as its token's actor, so
/// its writes are audited with the token's id and the caller's address.
async fn gate(State(c): State<Consul>, mut req: Request, next: Next) -> Response {
    let token = token_of(req.headers(), req.uri().query());
    let tls = req.extensions().get::<sextant_core::TlsPeer>().cloned();
    match c
        .registry
        .acl()
        .authenticate_peer(token.as_deref(), tls.as_ref())
    {
        Err(e) => answer(&c, "auth", Err(e.into())),
        Ok(p) => {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(a)| a.to_string())
                .unwrap_or_default();
            let actor = p.actor(peer, "consul");
            req.extensions_mut().insert(Caller(p));
            match c.registry.admitted(actor, next.run(req)).await {
                Ok(resp) => resp,
                Err(e) => answer(&c, "admission", Err(e.into())),
            }
        }
    }
}

/// Adds the headers Consul clients require on every answer (the Go client fails without
/// `X-Consul-LastContact`; py-consul without `X-Consul-Index` on reads).
async fn consul_headers(State(c): State<Consul>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if !h.contains_key(&INDEX) {
        h.insert(INDEX, HeaderValue::from(c.registry.revision().max(1)));
    }
    h.insert(KNOWN_LEADER, HeaderValue::from_static("true"));
    h.insert(LAST_CONTACT, HeaderValue::from_static("0"));
    resp
}

/// Counts the request under `endpoint` and turns an error into its answer.
fn answer(c: &Consul, endpoint: &'static str, r: Result<Response, ConsulError>) -> Response {
    match r {
        Ok(resp) => {
            c.metrics.observe(endpoint, "ok");
            resp
        }
        Err(err) => {
            let kind = err.kind();
            c.metrics.observe(endpoint, kind.label());
            if kind.http_status() >= 500 && kind != sextant_core::ErrorKind::Unsupported {
                tracing::warn!(endpoint, error = %err, "consul request failed");
            }
            err.into_response()
        }
    }
}

/// A JSON answer with its index.
fn json_at(index: Revision, body: Value) -> Response {
    let mut resp = (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    resp.headers_mut()
        .insert(INDEX, HeaderValue::from(index.max(1)));
    resp
}

/// A JSON answer already encoded, with its index.
fn bytes_at(index: Revision, body: Bytes) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    resp.headers_mut()
        .insert(INDEX, HeaderValue::from(index.max(1)));
    resp
}

/// What Consul's `PUT` endpoints answer: 200 with an empty body.
fn ok_empty() -> Response {
    ().into_response()
}

/// The query string's pairs.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &Option<String>) -> Self {
        Query(
            raw.as_deref()
                .map(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// The options every read shares.
struct Opts {
    namespace: String,
    index: Option<Revision>,
    wait: Duration,
    passing: bool,
    tags: Vec<String>,
}

impl Opts {
    fn parse(c: &Consul, headers: &HeaderMap, q: &Query) -> Result<Self, ConsulError> {
        if let Some(dc) = q.get("dc").filter(|d| !d.is_empty()) {
            if dc != c.config.datacenter {
                return Err(ConsulError::BadRequest(format!(
                    "no path to datacenter {dc:?}: this Sextant serves {:?}",
                    c.config.datacenter
                )));
            }
        }
        for (param, what) in [
            ("filter", "filter expressions"),
            (
                "node-meta",
                "node metadata filters (Sextant's nodes are synthetic)",
            ),
            ("peer", "cluster peering"),
        ] {
            if q.get(param).is_some_and(|v| !v.is_empty()) {
                return Err(ConsulError::Unsupported(format!(
                    "?{param}: {what} are not served by Sextant"
                )));
            }
        }
        let namespace = q
            .get("ns")
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .or_else(|| {
                headers
                    .get("x-consul-namespace")
                    .and_then(|v| v.to_str().ok())
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| NAMESPACE.to_string());
        let index = match q.get("index") {
            None | Some("") => None,
            Some(i) => Some(i.parse::<Revision>().map_err(|_| {
                ConsulError::BadRequest(format!("?index={i}: give a whole number"))
            })?),
        };
        let jitter = XorShift::from_clock().below(1 << 20) as f64 / f64::from(1 << 20);
        let wait = mapping::blocking_wait(q.get("wait"), jitter)?;
        let passing = match q.get("passing") {
            None => false,
            Some(v) => mapping::query_flag("passing", v)?,
        };
        Ok(Self {
            namespace,
            index: index.filter(|i| *i > 0),
            wait,
            passing,
            tags: q.all("tag").into_iter().filter(|t| !t.is_empty()).collect(),
        })
    }

    fn key(&self, service: &str) -> Result<ServiceKey, ConsulError> {
        ServiceKey::new(&self.namespace, service)
            .map_err(|e| ConsulError::BadRequest(format!("{}: {}", e.field, e.reason)))
    }
}

impl Consul {
    /// A service, once its revision passes the query's index (at once without one).
    async fn service_view(&self, key: &ServiceKey, o: &Opts) -> ServiceView {
        match o.index {
            Some(index) => {
                self.metrics.blocking.inc();
                let v = self
                    .registry
                    .get_when_changed(key, index, o.wait, false)
                    .await;
                self.metrics.blocking.dec();
                v
            }
            None => self.registry.get(key, false),
        }
    }

    /// Waits, for a catalog-wide read, until the registry's revision passes the index.
    async fn catalog_wait(&self, o: &Opts) -> Revision {
        match o.index {
            Some(index) => {
                self.metrics.blocking.inc();
                let r = self.registry.wait_for_revision(index, o.wait).await;
                self.metrics.blocking.dec();
                r
            }
            None => self.registry.revision(),
        }
    }

    fn ttl_of(&self) -> impl Fn(&str) -> Option<(Status, String)> + '_ {
        |check_id| self.agent.ttl_status(check_id)
    }

    fn checks_of(&self, inst: &sextant_core::model::Instance) -> Vec<mapping::CheckView> {
        let maint = self.agent.maintenance_reason(inst.spec.id.as_str());
        mapping::service_checks(inst, &self.ttl_of(), maint.as_deref())
    }

    /// The agent-registered instance `id`, with its service.
    fn agent_instance(&self, id: &str) -> Option<(ServiceKey, sextant_core::model::Instance)> {
        let key = self.agent.service_of(id)?;
        let inst = self.registry.instance(&key, id)?;
        Some((key, inst))
    }
}

/// The start of every read of one service: its name, the options, the `read` right, then the
/// service once its revision passes the query's index.
async fn read_service(
    c: &Consul,
    caller: &Caller,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: &HeaderMap,
    q: &Option<String>,
) -> Result<(ServiceKey, Opts, ServiceView), ConsulError> {
    let name = path_id(name)?;
    let o = Opts::parse(c, headers, &Query::parse(q))?;
    let key = o.key(&name)?;
    caller.allow(
        Right::Read,
        &Resource::Service(&key.namespace, &key.service),
    )?;
    let view = c.service_view(&key, &o).await;
    Ok((key, o, view))
}

/// The start of every catalog-wide read: the options, `read` on the namespace, then the
/// registry's revision once it passes the query's index.
async fn read_catalog(
    c: &Consul,
    caller: &Caller,
    headers: &HeaderMap,
    q: &Option<String>,
) -> Result<(Opts, Revision), ConsulError> {
    let o = Opts::parse(c, headers, &Query::parse(q))?;
    caller.allow(Right::Read, &Resource::Namespace(&o.namespace))?;
    let index = c.catalog_wait(&o).await;
    Ok((o, index))
}

fn path_id(
    p: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<String, ConsulError> {
    p.map(|Path(v)| v)
        .map_err(|r| ConsulError::BadRequest(r.body_text()))
}

// ---- agent: services --------------------------------------------------------------------

async fn register(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let r = async {
        let q = Query::parse(&q);
        let body: Value = serde_json::from_slice(&body).map_err(|e| {
            ConsulError::BadRequest(format!("the body is not a JSON service definition: {e}"))
        })?;
        let reg = mapping::parse_registration(
            &body,
            &peer.ip().to_canonical().to_string(),
            c.config.min_deregister_after,
        )?;
        let mut o = Opts::parse(&c, &headers, &q)?;
        if let Some(ns) = &reg.namespace {
            o.namespace = ns.clone();
        }
        let key = o.key(&reg.name)?;
        caller.allow(Right::Write, &Resource::Service(&key.namespace, &key.service))?;
        let id = reg.spec.id.to_string();
        let has_ttl = reg.service_check.is_none() && !reg.checks.is_empty();
        let config = c.registry.service_config(&key);
        if has_ttl && config.check.is_active() {
            return Err(ConsulError::BadRequest(format!(
                "service {:?} is probed by Sextant's scanner ({} check): its instances cannot also take TTL checks",
                reg.name,
                config.check.kind.as_str()
            )));
        }
        if reg.service_check.is_some() && c.agent.has_ttl_checks(&key) {
            return Err(ConsulError::BadRequest(format!(
                "service {:?} has instances with TTL checks: Sextant cannot also probe it with an HTTP, TCP or gRPC check",
                reg.name
            )));
        }
        let mut ops = Vec::new();
        // Consul ids are unique per agent: the same id under another name moves.
        if let Some(old) = c.agent.service_of(&id).filter(|old| old != &key) {
            ops.push(Op::Deregister {
                service: old,
                id: id.clone(),
            });
        }
        if let Some(check) = reg.service_check.clone() {
            ops.push(Op::DefaultCheck {
                service: key.clone(),
                check,
            });
        }
        // A re-registration keeps what checks and operators decided (as Consul keeps an
        // existing check's status); it changes the weight it gives.
        let status = match c.registry.instance(&key, &id) {
            Some(existing) => InstanceStatus {
                weight: reg.weight,
                ..existing.status
            },
            None => InstanceStatus {
                health: reg.initial_health(),
                weight: reg.weight,
                ..InstanceStatus::default()
            },
        };
        ops.push(Op::Register(Registration {
            service: key.clone(),
            spec: reg.spec.clone(),
            status: Some(status),
            ttl_seconds: 0,
        }));
        let mut results = c.registry.apply(ops).await?;
        if let Some(Err(e)) = results.pop() {
            return Err(e.into());
        }
        if let Some(inst) = c.registry.instance(&key, &id) {
            c.agent.adopt(&key, &inst, Some(&reg.initial), Instant::now());
        }
        tracing::info!(service = %key, id, checks = reg.checks.len(), "consul: registered");
        Ok(ok_empty())
    }
    .await;
    answer(&c, "register", r)
}

async fn deregister(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let id = path_id(id)?;
        let o = Opts::parse(&c, &headers, &Query::parse(&q))?;
        // Consul deregisters the agent's own services; Sextant also takes an instance
        // registered otherwise, found by id in the request's namespace.
        let key = match c.agent.service_of(&id) {
            Some(k) => k,
            None => find_by_id(&c, &o.namespace, &id).ok_or_else(|| unknown_service(&id))?,
        };
        caller.allow(
            Right::Write,
            &Resource::Service(&key.namespace, &key.service),
        )?;
        match c.registry.deregister(key.clone(), id.clone()).await {
            Ok(_) | Err(CoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        c.agent.forget(&id);
        tracing::info!(service = %key, id, "consul: deregistered");
        Ok(ok_empty())
    }
    .await;
    answer(&c, "deregister", r)
}

fn find_by_id(c: &Consul, namespace: &str, id: &str) -> Option<ServiceKey> {
    c.registry
        .services(namespace)
        .into_iter()
        .map(|s| s.service)
        .find(|k| c.registry.instance(k, id).is_some())
}

fn unknown_service(id: &str) -> ConsulError {
    ConsulError::NotFound(format!(
        "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
    ))
}

async fn maintenance(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let id = path_id(id)?;
        let q = Query::parse(&q);
        let enable = match q.get("enable") {
            Some(v) if !v.is_empty() => mapping::query_flag("enable", v)?,
            _ => {
                return Err(ConsulError::BadRequest(
                    "?enable= is required: true or false".into(),
                ))
            }
        };
        let (key, _) = c.agent_instance(&id).ok_or_else(|| unknown_service(&id))?;
        caller.allow(
            Right::Write,
            &Resource::Service(&key.namespace, &key.service),
        )?;
        let reason = q.get("reason").unwrap_or_default().to_string();
        // The reason is recorded before the write: a blocking query that the write wakes
        // renders the maintenance check at once, and must see this reason, not the default.
        let before = c
            .agent
            .set_maintenance(&id, enable.then_some(reason.clone()));
        let written = c
            .registry
            .update_status(
                key.clone(),
                id.clone(),
                StatusPatch {
                    enabled: Some(!enable),
                    ..StatusPatch::default()
                },
            )
            .await;
        if let Err(e) = written {
            c.agent.set_maintenance(&id, before);
            return Err(e.into());
        }
        tracing::info!(service = %key, id, enable, reason, "consul: maintenance mode");
        Ok(ok_empty())
    }
    .await;
    answer(&c, "maintenance", r)
}

async fn agent_services(State(c): State<Consul>, Extension(caller): Extension<Caller>) -> Response {
    // The agent's services span namespaces: reading them all needs `read` on every one.
    if let Err(e) = caller.allow(Right::Read, &Resource::Global) {
        return answer(&c, "agent_services", Err(e));
    }
    let mut out = Map::new();
    let dc = &c.config.datacenter;
    let mut services = c.agent.services();
    services.sort();
    for (id, key) in services {
        if let Some(inst) = c.registry.instance(&key, &id) {
            let tags = mapping::tags_of(&inst);
            out.insert(id, mapping::service_json(&key.service, &inst, &tags, dc));
        }
    }
    answer(
        &c,
        "agent_services",
        Ok(json_at(c.registry.revision(), Value::Object(out))),
    )
}

async fn agent_service(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let r = async {
        let id = path_id(id)?;
        let (key, inst) = c.agent_instance(&id).ok_or_else(|| unknown_service(&id))?;
        caller.allow(
            Right::Read,
            &Resource::Service(&key.namespace, &key.service),
        )?;
        let tags = mapping::tags_of(&inst);
        Ok(json_at(
            inst.revision(),
            mapping::service_json(&key.service, &inst, &tags, &c.config.datacenter),
        ))
    }
    .await;
    answer(&c, "agent_service", r)
}

async fn agent_checks(State(c): State<Consul>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(e) = caller.allow(Right::Read, &Resource::Global) {
        return answer(&c, "agent_checks", Err(e));
    }
    let mut out = Map::new();
    for (id, key) in c.agent.services() {
        if let Some(inst) = c.registry.instance(&key, &id) {
            let tags = mapping::tags_of(&inst);
            let node = inst.spec.host.to_string();
            for check in c.checks_of(&inst) {
                out.insert(
                    check.id.clone(),
                    mapping::check_json(&check, &node, &key.service, &inst, &tags),
                );
            }
        }
    }
    answer(
        &c,
        "agent_checks",
        Ok(json_at(c.registry.revision(), Value::Object(out))),
    )
}

// ---- agent: TTL checks ------------------------------------------------------------------

async fn ttl_report(
    c: &Consul,
    caller: &Caller,
    check_id: String,
    status: Status,
    output: String,
) -> Result<Response, ConsulError> {
    // A follower refuses before it records anything: the client retries on the leader.
    c.registry.writable()?;
    if let Some((key, _)) = c.agent.check_owner(&check_id) {
        caller.allow(
            Right::Write,
            &Resource::Service(&key.namespace, &key.service),
        )?;
    }
    let w = c
        .agent
        .ttl_update(&check_id, status, output, Instant::now())
        .map_err(|e| match e {
            // 404: Spring Cloud Consul re-registers on it.
            TtlError::Unknown => ConsulError::NotFound(format!(
                "Unknown check ID {check_id:?}. Ensure that the check ID is passed, not the check name."
            )),
            TtlError::NotTtl => ConsulError::BadRequest(format!(
                "check {check_id:?} is not a TTL check: Sextant's scanner sets its status"
            )),
        })?;
    let current = c.registry.instance(&w.key, &w.id).map(|i| i.status.health);
    if current.is_some_and(|h| h != w.health) {
        let mut r = c
            .registry
            .apply(vec![health_op(w.key, w.id, w.health)])
            .await?;
        if let Some(Err(e)) = r.pop() {
            if !matches!(e, CoreError::NotFound(_)) {
                return Err(e.into());
            }
        }
    }
    Ok(ok_empty())
}

/// `PUT /v1/agent/check/{pass,warn,fail}/:id?note=` and `/v1/agent/check/update/:id`
/// (`{"Status", "Output"}`): one TTL report.
async fn check_report(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    p: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let (verb, id) = match p {
        Ok(Path(v)) => v,
        Err(r) => {
            return answer(
                &c,
                "check_report",
                Err(ConsulError::BadRequest(r.body_text())),
            )
        }
    };
    let note = || Query::parse(&q).get("note").unwrap_or_default().to_string();
    let (endpoint, report) = match verb.as_str() {
        "pass" => ("check_pass", Ok((Status::Passing, note()))),
        "warn" => ("check_warn", Ok((Status::Warning, note()))),
        "fail" => ("check_fail", Ok((Status::Critical, note()))),
        "update" => ("check_update", update_body(&body)),
        _ => ("unknown", Err(ConsulError::NotFound(format!(
            "/v1/agent/check/{verb}/ is not a Consul endpoint Sextant serves (pass, warn, fail, update)"
        )))),
    };
    let r = match report {
        Ok((status, output)) => ttl_report(&c, &caller, id, status, output).await,
        Err(e) => Err(e),
    };
    answer(&c, endpoint, r)
}

/// The body of `/v1/agent/check/update/:id`.
fn update_body(body: &[u8]) -> Result<(Status, String), ConsulError> {
    let body: Value = serde_json::from_slice(body).map_err(|e| {
        ConsulError::BadRequest(format!(
            "the body is not JSON {{\"Status\", \"Output\"}}: {e}"
        ))
    })?;
    let f = Fields::new(&body, "")?;
    let status = Status::parse(f.str("Status")?.unwrap_or_default())?;
    Ok((status, f.str("Output")?.unwrap_or_default().to_string()))
}

async fn check_register(State(c): State<Consul>) -> Response {
    answer(
        &c,
        "check_register",
        Err(ConsulError::Unsupported(
            "checks are registered with their service (Check / Checks in PUT /v1/agent/service/register); separate check registration is not served by Sextant".into(),
        )),
    )
}

async fn node_maintenance(State(c): State<Consul>) -> Response {
    answer(
        &c,
        "node_maintenance",
        Err(ConsulError::Unsupported(
            "node maintenance is not served: Sextant's nodes are synthetic; use PUT /v1/agent/service/maintenance/:id per service".into(),
        )),
    )
}

// ---- agent: self, status -----------------------------------------------------------------

async fn agent_self(State(c): State<Consul>) -> Response {
    let cfg = &c.config;
    // Every top-level value is an object: the Go client decodes map[string]map[string]any.
    let body = json!({
        "Config": {
            "Datacenter": cfg.datacenter,
            "PrimaryDatacenter": cfg.datacenter,
            "NodeName": cfg.node_name,
            "NodeID": mapping::uuid_of(&cfg.node_name),
            "Server": true,
            "Revision": "sextant",
            "Version": "1.17.0",
            "Product": "sextant",
        },
        "Member": member(&c),
        "Meta": {},
        "Stats": {},
        "DebugConfig": {},
        "xDS": {},
    });
    answer(&c, "agent_self", Ok(json_at(c.registry.revision(), body)))
}

fn member(c: &Consul) -> Value {
    json!({
        "Name": c.config.node_name,
        "Addr": c.config.addr.ip().to_string(),
        "Port": c.config.addr.port(),
        "Tags": {"dc": c.config.datacenter, "role": "consul", "build": "sextant"},
        "Status": 1,
    })
}

async fn agent_members(State(c): State<Consul>) -> Response {
    answer(
        &c,
        "agent_members",
        Ok(json_at(c.registry.revision(), json!([member(&c)]))),
    )
}

async fn status_leader(State(c): State<Consul>) -> Response {
    let body = Value::String(c.config.addr.to_string());
    answer(
        &c,
        "status_leader",
        Ok(json_at(c.registry.revision(), body)),
    )
}

async fn status_peers(State(c): State<Consul>) -> Response {
    let body = json!([c.config.addr.to_string()]);
    answer(&c, "status_peers", Ok(json_at(c.registry.revision(), body)))
}

// ---- catalog -----------------------------------------------------------------------------

async fn catalog_services(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let (o, index) = read_catalog(&c, &caller, &headers, &q).await?;
        // Every change anywhere wakes these watchers (Prometheus' service discovery): one
        // answer per revision, shared.
        let question = Question {
            endpoint: "catalog_services",
            scope: o.namespace.clone(),
            passing: false,
            tags: Vec::new(),
        };
        let bytes = c.answers.get(question, (index, 0), || {
            catalog_services_body(&c, &o.namespace)
        });
        Ok(bytes_at(index, bytes))
    }
    .await;
    answer(&c, "catalog_services", r)
}

/// `/v1/catalog/services`' answer: each service of the namespace with instances, and the union
/// of their tags, sorted.
fn catalog_services_body(c: &Consul, namespace: &str) -> Bytes {
    let mut out = Map::new();
    for s in c.registry.services(namespace) {
        if s.instances == 0 {
            continue;
        }
        let tags: std::collections::BTreeSet<String> = c
            .registry
            .get(&s.service, false)
            .instances
            .iter()
            .flat_map(mapping::tags_of)
            .collect();
        out.insert(s.service.service.to_string(), json!(tags));
    }
    Bytes::from(Value::Object(out).to_string())
}

async fn catalog_service(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let (key, o, view) = read_service(&c, &caller, name, &headers, &q).await?;
        let dc = &c.config.datacenter;
        let out: Vec<Value> = view
            .instances
            .iter()
            .filter_map(|inst| {
                let tags = mapping::tags_of(inst);
                mapping::has_tags(&tags, &o.tags)
                    .then(|| mapping::catalog_entry(&key.service, inst, &tags, dc))
            })
            .collect();
        Ok(json_at(view.revision, Value::Array(out)))
    }
    .await;
    answer(&c, "catalog_service", r)
}

async fn catalog_nodes(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let (o, index) = read_catalog(&c, &caller, &headers, &q).await?;
        let mut hosts: Vec<String> = Vec::new();
        for s in c.registry.services(&o.namespace) {
            for inst in c.registry.get(&s.service, false).instances {
                hosts.push(inst.spec.host.to_string());
            }
        }
        hosts.sort();
        hosts.dedup();
        let out: Vec<Value> = hosts
            .iter()
            .map(|h| mapping::node_json(&mapping::node_of(h), &c.config.datacenter))
            .collect();
        Ok(json_at(index, Value::Array(out)))
    }
    .await;
    answer(&c, "catalog_nodes", r)
}

async fn catalog_datacenters(State(c): State<Consul>) -> Response {
    let body = json!([c.config.datacenter]);
    answer(
        &c,
        "catalog_datacenters",
        Ok(json_at(c.registry.revision(), body)),
    )
}

// ---- health ------------------------------------------------------------------------------

async fn health_service(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let (key, o, view) = read_service(&c, &caller, name, &headers, &q).await?;
        let mut tags = o.tags.clone();
        tags.sort();
        let question = Question {
            endpoint: "health_service",
            scope: key.to_string(),
            passing: o.passing,
            tags,
        };
        // Read before building: a TTL report meanwhile makes the next reader build again.
        let version = (view.revision, c.agent.generation());
        let bytes = c
            .answers
            .get(question, version, || health_entries(&c, &key, &view, &o));
        Ok(bytes_at(view.revision, bytes))
    }
    .await;
    answer(&c, "health_service", r)
}

/// `/v1/health/service/:name`'s answer, as JSON bytes.
fn health_entries(c: &Consul, key: &ServiceKey, view: &ServiceView, o: &Opts) -> Bytes {
    let dc = &c.config.datacenter;
    let serf = mapping::serf_check();
    let mut out = Vec::with_capacity(view.instances.len());
    for inst in &view.instances {
        let tags = mapping::tags_of(inst);
        if !mapping::has_tags(&tags, &o.tags) {
            continue;
        }
        let checks = c.checks_of(inst);
        // Sextant's protection (an opt-in per service) wins over `?passing`: with too
        // few instances serving, every instance is returned, as native discovery does.
        if o.passing && !view.protected && checks.iter().any(|ch| ch.status != Status::Passing) {
            continue;
        }
        let node = mapping::node_of(inst.spec.host.as_str());
        let mut cj = vec![mapping::check_json(
            &serf,
            &node.name,
            &key.service,
            inst,
            &tags,
        )];
        cj.extend(
            checks
                .iter()
                .map(|ch| mapping::check_json(ch, &node.name, &key.service, inst, &tags)),
        );
        out.push(json!({
            "Node": mapping::node_json(&node, dc),
            "Service": mapping::service_json(&key.service, inst, &tags, dc),
            "Checks": cj,
        }));
    }
    Bytes::from(Value::Array(out).to_string())
}

async fn health_checks(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let (key, _, view) = read_service(&c, &caller, name, &headers, &q).await?;
        let mut out = Vec::new();
        for inst in &view.instances {
            let tags = mapping::tags_of(inst);
            for ch in c.checks_of(inst) {
                out.push(mapping::check_json(
                    &ch,
                    inst.spec.host.as_str(),
                    &key.service,
                    inst,
                    &tags,
                ));
            }
        }
        Ok(json_at(view.revision, Value::Array(out)))
    }
    .await;
    answer(&c, "health_checks", r)
}

async fn health_state(
    State(c): State<Consul>,
    Extension(caller): Extension<Caller>,
    state: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let state = path_id(state)?;
        let want = match state.as_str() {
            "any" => None,
            s => Some(Status::parse(s).map_err(|_| {
                ConsulError::BadRequest(format!(
                    "state {s:?} is not one of any, passing, warning, critical"
                ))
            })?),
        };
        let (o, index) = read_catalog(&c, &caller, &headers, &q).await?;
        let serf = mapping::serf_check();
        let mut out = Vec::new();
        let mut nodes: Vec<String> = Vec::new();
        for s in c.registry.services(&o.namespace) {
            for inst in c.registry.get(&s.service, false).instances {
                let tags = mapping::tags_of(&inst);
                let host = inst.spec.host.to_string();
                if !nodes.contains(&host) {
                    if want.is_none_or(|w| w == Status::Passing) {
                        out.push(mapping::check_json(&serf, &host, "", &inst, &[]));
                    }
                    nodes.push(host.clone());
                }
                for ch in c.checks_of(&inst) {
                    if want.is_none_or(|w| w == ch.status) {
                        out.push(mapping::check_json(
                            &ch,
                            &host,
                            &s.service.service,
                            &inst,
                            &tags,
                        ));
                    }
                }
            }
        }
        Ok(json_at(index, Value::Array(out)))
    }
    .await;
    answer(&c, "health_state", r)
}

// ---- everything else ---------------------------------------------------------------------

async fn unknown(State(c): State<Consul>, OriginalUri(uri): OriginalUri) -> Response {
    let path = uri.path();
    let section = path
        .strip_prefix("/v1/")
        .and_then(|p| p.split('/').next())
        .unwrap_or_default();
    let err = match UNSERVED.iter().find(|(s, _)| *s == section) {
        Some((_, what)) => ConsulError::Unsupported(format!("Sextant does not serve {what}")),
        None => ConsulError::NotFound(format!(
            "{path} is not a Consul endpoint Sextant serves (agent services and checks, catalog, health, status)"
        )),
    };
    answer(&c, "unknown", Err(err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConsulConfig, ConsulMetrics};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use http_body_util::BodyExt;
    use sextant_core::{CoreConfig, CoreMetrics, MemStore, Registry};
    use std::sync::Arc;
    use tower::ServiceExt;

    async fn consul() -> Consul {
        let registry = Registry::open(
            Arc::new(MemStore::new()),
            CoreConfig::default(),
            CoreMetrics::default(),
        )
        .await
        .unwrap();
        Consul::start(registry, ConsulConfig::default(), ConsulMetrics::default())
    }

    async fn call(
        c: &Consul,
        method: Method,
        uri: &str,
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 9], 5555))));
        let resp = c.router().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn register_check_discover_and_every_answer_has_the_headers() {
        let c = consul().await;
        let (s, h, body) = call(
            &c,
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"web","ID":"w1","Port":80,"Tags":["a"],"Check":{"TTL":"30s"}}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(h.contains_key("x-consul-lastcontact"));
        // A new TTL check starts critical: ?passing leaves it out.
        let (_, h, body) = call(&c, Method::GET, "/v1/health/service/web?passing", "").await;
        assert_eq!(body, "[]");
        let index: u64 = h["x-consul-index"].to_str().unwrap().parse().unwrap();
        assert!(index >= 1);
        let (s, _, _) = call(&c, Method::PUT, "/v1/agent/check/pass/service:w1", "").await;
        assert_eq!(s, StatusCode::OK);
        let (_, h2, body) = call(
            &c,
            Method::GET,
            "/v1/health/service/web?passing=true&tag=a",
            "",
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v[0]["Service"]["ID"], "w1");
        assert_eq!(v[0]["Service"]["Address"], "10.0.0.9", "the peer's address");
        assert_eq!(v[0]["Checks"][1]["Status"], "passing");
        let index2: u64 = h2["x-consul-index"].to_str().unwrap().parse().unwrap();
        assert!(index2 > index);
        let (s, h, _) = call(&c, Method::PUT, "/v1/agent/check/warn/nope", "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(h.contains_key("x-consul-index"), "also on errors");
        let (s, _, body) = call(&c, Method::GET, "/v1/kv/x", "").await;
        assert_eq!(s, StatusCode::NOT_IMPLEMENTED);
        assert!(body.contains("KV"), "{body}");
        let (s, _, body) = call(
            &c,
            Method::GET,
            "/v1/health/service/web?wait=soon&index=1",
            "",
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        let (s, _, body) = call(&c, Method::PUT, "/v1/agent/service/register", "{").await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    }

    #[tokio::test]
    async fn a_blocking_query_wakes_on_a_change() {
        let c = consul().await;
        let (s, _, body) = call(
            &c,
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"web","ID":"w1","Port":80}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let (_, h, _) = call(&c, Method::GET, "/v1/health/service/web", "").await;
        let index = h["x-consul-index"].to_str().unwrap().to_string();
        let c2 = c.clone();
        let waiter = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = call(
                &c2,
                Method::GET,
                &format!("/v1/health/service/web?index={index}&wait=20s"),
                "",
            )
            .await;
            (started.elapsed(), r)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "it blocks");
        call(
            &c,
            Method::PUT,
            "/v1/agent/service/maintenance/w1?enable=true&reason=upgrade",
            "",
        )
        .await;
        let (took, (_, _, body)) = waiter.await.unwrap();
        assert!(took < Duration::from_secs(5), "{took:?}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let maint = v[0]["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|ch| ch["CheckID"] == "_service_maintenance:w1")
            .cloned()
            .unwrap();
        assert_eq!(maint["Status"], "critical");
        assert_eq!(maint["Notes"], "upgrade");
    }
}
